"""The iptables-mode applier's streaming: the render in pieces (pure) and the restore
fed while they are made (root: a throwaway namespace, legacy backend)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from testbed import kubeproxy, netns
from testbed.errors import KernelError
from testbed.proxy import servicemap
from testbed.proxy.iptables import IPTablesSync, render_iptables_sync
from testbed.synthetic import synthetic_objects

from test_render_iptables import fake_config

OVERALL = Path(__file__).parent / "vectors" / "overall_iptables"


def overall_maps():
    objs = [d for p in sorted(OVERALL.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    return servicemap.build_maps(objs)


@pytest.mark.parametrize("changed", [None, "one"])
def test_chunks_are_the_render_head_first(changed):
    services, endpoints = overall_maps()
    if changed == "one":
        changed = {sorted(services)[0]}
    stale = ":KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]\n:KUBE-SEP-BBBBBBBBBBBBBBBB - [0:0]\n"
    cfg = fake_config()
    whole = render_iptables_sync(services, endpoints, cfg, changed=changed, existing_nat_chains=stale)
    sync = IPTablesSync(services, endpoints, cfg, changed=changed, existing_nat_chains=stale)
    with pytest.raises(RuntimeError):
        sync.result()  # counters only once the nat rules are written
    chunks = list(sync.chunks(lines_per_chunk=5))
    assert "".join(chunks) == whole.text
    assert sync.result(whole.text) == whole
    # First the whole filter table and the top-level nat chains (no Service's chain
    # is named before the filter table is out), then every Service's nat chain line
    # (stale ones last), then nat rules only, each chunk whole lines.
    head = chunks[0]
    assert head.startswith("*filter\n") and head.count("COMMIT\n") == 1
    assert head.split("*nat\n", 1)[1] == "".join(
        f":{c} - [0:0]\n" for c in ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"))
    kinds = "".join("c" if line.startswith(":") else "r" for c in chunks[1:] for line in c.splitlines())
    assert kinds == "c" * kinds.count("c") + "r" * kinds.count("r") and "c" in kinds
    assert all(c.endswith("\n") for c in chunks) and len(chunks) > 4
    lines = whole.text.splitlines()
    assert [line for line in lines if line.startswith(":")][-2:] == [
        ":KUBE-SEP-BBBBBBBBBBBBBBBB - [0:0]", ":KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]"]
    assert "-X KUBE-SVC-AAAAAAAAAAAAAAAA" in lines


def test_chunks_of_a_large_sync():
    services, endpoints = servicemap.build_maps(synthetic_objects(1200, 3))
    cfg = fake_config()
    sync = IPTablesSync(services, endpoints, cfg)
    chunks = list(sync.chunks(lines_per_chunk=1000))
    assert "".join(chunks) == render_iptables_sync(services, endpoints, cfg).text
    assert sync.result().large_cluster_mode and len(chunks) > 5


def nat_chains(ns: str) -> set[str]:
    with netns.entered(ns):
        out = subprocess.run(["iptables-legacy-save", "-t", "nat"], capture_output=True, text=True, check=True).stdout
    return {line[1:].split(" ", 1)[0] for line in out.splitlines() if line.startswith(":")}


def test_stream_in_feeds_the_tool_and_reports_its_failure(throwaway_ns):
    argv = ["iptables-legacy-restore", "--noflush"]
    kubeproxy.stream_in(throwaway_ns, argv, iter(["*nat\n:KUBE-TEST-A - [0:0]\n", "-A KUBE-TEST-A -j RETURN\n", "COMMIT\n"]))
    assert "KUBE-TEST-A" in nat_chains(throwaway_ns)
    with pytest.raises(KernelError, match="iptables-legacy-restore"):
        kubeproxy.stream_in(throwaway_ns, argv, iter(["*nat\n-A KUBE-NO-SUCH-CHAIN -j RETURN\nCOMMIT\n"]))


def test_stream_in_commits_nothing_when_making_the_input_fails(throwaway_ns):
    """A chunk that cannot be made kills the tool before it reads end-of-file: the
    table it was reading is not committed, and the error reaches the caller."""

    def chunks():
        yield "*nat\n:KUBE-TEST-B - [0:0]\n"
        yield "-A KUBE-TEST-B -j RETURN\n"
        raise ValueError("render bug")

    with pytest.raises(ValueError, match="render bug"):
        kubeproxy.stream_in(throwaway_ns, ["iptables-legacy-restore", "--noflush"], chunks())
    assert "KUBE-TEST-B" not in nat_chains(throwaway_ns)


def test_failed_restore_makes_the_next_sync_full(throwaway_ns, tmp_path, monkeypatch):
    """kube-proxy sets needFullSync after a failed restore; so does the applier (its
    state file goes, and with it what a partial sync would build on)."""
    from testbed.model import Cluster, Network, Node

    node = Node(name="node1", ip="192.168.0.2", pod_cidr="10.233.64.0/24", pod_gateway="10.233.64.1", netns=throwaway_ns)
    cluster = Cluster(name="bare", nodes=[node], network=Network(service_cidr="10.233.0.0/18", pod_cidr="10.233.64.0/18"))
    state = tmp_path / "kube-proxy-node1.json"
    proxier = kubeproxy.IPTablesProxier(cluster, node, "legacy", state)
    objs = synthetic_objects(3, 2)
    assert proxier.sync(objs).full
    assert not proxier.sync(objs).full and state.exists()

    def failing(ns, argv, chunks, meanwhile=None):  # noqa: ANN001
        raise KernelError("iptables-legacy-restore failed (exit 1): simulated")

    monkeypatch.setattr(kubeproxy, "stream_in", failing)
    with pytest.raises(KernelError):
        proxier.sync(synthetic_objects(4, 2))
    assert not state.exists()
    monkeypatch.undo()
    r = proxier.sync(synthetic_objects(4, 2))
    assert r.full and r.changed_services == 4
    assert sum(c.startswith("KUBE-SVC-") for c in nat_chains(throwaway_ns)) == 4
