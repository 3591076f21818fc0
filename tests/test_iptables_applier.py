"""The iptables-mode applier's recovery (root: a throwaway namespace, legacy backend)."""

from __future__ import annotations

import secrets
import subprocess

import pytest

from testbed import kubeproxy, netns
from testbed.errors import KernelError
from testbed.synthetic import synthetic_objects


@pytest.fixture
def bare_ns():
    name = f"tb-ipt{secrets.token_hex(3)}-node"
    netns.create(name)
    try:
        yield name
    finally:
        netns.delete(name)


def nat_chains(ns: str) -> set[str]:
    with netns.entered(ns):
        out = subprocess.run(["iptables-legacy-save", "-t", "nat"], capture_output=True, text=True, check=True).stdout
    return {line[1:].split(" ", 1)[0] for line in out.splitlines() if line.startswith(":")}


@pytest.mark.root
def test_failed_restore_makes_the_next_sync_full(bare_ns, tmp_path, monkeypatch):
    """kube-proxy sets needFullSync after a failed restore; so does the applier (its
    state file goes, and with it what a partial sync would build on)."""
    from testbed.model import Cluster, Network, Node

    node = Node(name="node1", ip="192.168.0.2", pod_cidr="10.233.64.0/24", pod_gateway="10.233.64.1", netns=bare_ns)
    cluster = Cluster(name="bare", nodes=[node], network=Network(service_cidr="10.233.0.0/18", pod_cidr="10.233.64.0/18"))
    state = tmp_path / "kube-proxy-node1.json"
    proxier = kubeproxy.IPTablesProxier(cluster, node, "legacy", state)
    objs = synthetic_objects(3, 2)
    assert proxier.sync(objs).full
    assert not proxier.sync(objs).full and state.exists()

    real = kubeproxy.run_in

    def failing_restore(ns, argv, input=None, check=True, meanwhile=None):  # noqa: A002, ANN001
        if "--counters" in argv:  # the sync's restore; a truncated input makes the real tool fail
            return real(ns, argv, input=(input or "").split("COMMIT", 1)[0] + "COMMIT\n*nat\n-A NO-SUCH-CHAIN -j RETURN\n",
                        check=check, meanwhile=meanwhile)
        return real(ns, argv, input=input, check=check, meanwhile=meanwhile)

    monkeypatch.setattr(kubeproxy, "run_in", failing_restore)
    with pytest.raises(KernelError, match="iptables-legacy-restore"):
        proxier.sync(synthetic_objects(4, 2))
    assert not state.exists()
    monkeypatch.undo()
    r = proxier.sync(synthetic_objects(4, 2))
    assert r.full and r.changed_services == 4
    assert sum(c.startswith("KUBE-SVC-") for c in nat_chains(bare_ns)) == 4


@pytest.mark.root
def test_tool_is_killed_when_the_caller_fails_meanwhile(bare_ns):
    """Work done beside the tool (``meanwhile``) that fails does not leave the tool
    running: it is killed and reaped before the error goes on."""

    def boom():
        raise RuntimeError("meanwhile failed")

    with pytest.raises(RuntimeError, match="meanwhile failed"):
        kubeproxy.run_in(bare_ns, ["sleep", "30"], input="", meanwhile=boom)
    assert subprocess.run(["pgrep", "-x", "-f", "sleep 30"], capture_output=True).returncode == 1
