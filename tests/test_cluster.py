"""The seed cluster on real namespaces: real TCP/UDP through the kernel."""

from __future__ import annotations

import json
import os

import pytest

from conftest import run_cli
from nethelpers import http_get, tcp_echo_server, tcp_read, udp_ask
from testbed import netns, state

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def seed():
    run_cli("down", "--name", "tseed")
    run_cli("up", "topologies/seed.yaml", "--name", "tseed", check=True)
    try:
        yield state.load_cluster("tseed")
    finally:
        run_cli("down", "--name", "tseed")


def _pods(c, app):
    return [p for p in c.pods if p.labels.get("app") == app]


def test_up_prints_table_and_status(seed):
    r = run_cli("status", "--name", "tseed", check=True)
    for p in seed.pods:
        assert p.name in r.stdout and p.ip in r.stdout
    assert "Running" in r.stdout and "node3" in r.stdout and "192.168.56.201" in r.stdout


def test_namespaces_named_with_run_prefix(seed):
    from testbed import dns

    mine = netns.list_names(f"tb-{seed.run_id}-")
    assert len(mine) == 1 + len(seed.nodes) + len(seed.clients) + len(seed.pods) + len(dns.external_hosts(seed))
    assert all(netns.exists(p.netns) for p in seed.pods)


def test_pod_to_pod_same_node_and_across_nodes(seed):
    myapp = _pods(seed, "myapp")
    for client in _pods(seed, "toolbox"):
        for target in myapp:
            assert http_get(client.netns, target.ip, 8080, "/hostname") == target.name
            # the pod sees the true source address (no NAT on the pod network)
            assert http_get(client.netns, target.ip, 8080, "/clientip").split(":")[0] == client.ip
    same = [t for t in _pods(seed, "toolbox") if t.node == myapp[0].node]
    other = [t for t in _pods(seed, "toolbox") if t.node != myapp[0].node]
    assert same and other  # both paths were exercised


def test_echo_and_udp(seed):
    target = _pods(seed, "myapp")[0]
    client = [p for p in _pods(seed, "toolbox") if p.node == "node3"][0]
    assert http_get(client.netns, target.ip, 8080, "/echo?msg=hello") == "hello"
    assert udp_ask(client.netns, target.ip, 8080, "hostname") == target.name
    assert udp_ask(client.netns, target.ip, 8080, "clientip").split(":")[0] == client.ip


def test_node_to_pod(seed):
    target = _pods(seed, "myapp")[1]
    for node in seed.nodes:
        src = http_get(node.netns, target.ip, 8080, "/clientip").split(":")[0]
        # from its own node a pod is reached over cni0 (gateway address), from another via eth0
        expect = node.pod_gateway if node.name == target.node else node.ip
        assert src == expect


def test_client_to_node(seed):
    node = seed.nodes[2]
    with tcp_echo_server(node.netns, 9000):
        for client in seed.clients:
            assert tcp_read(client.netns, node.ip, 9000).split(":")[0] == client.ip


def test_exec_runs_inside_namespace(seed):
    r = run_cli("exec", "--name", "tseed", "client2", "--", "ip", "-o", "-4", "addr", "show", "dev", "eth0", check=True)
    assert "192.168.56.202/24" in r.stdout
    pod = _pods(seed, "myapp")[0]
    r = run_cli("exec", "--name", "tseed", f"default/{pod.name}", "--", "ip", "-o", "-4", "addr", "show", "dev", "eth0", check=True)
    assert f"{pod.ip}/24" in r.stdout
    r = run_cli("exec", "--name", "tseed", "node1", "--", "sh", "-c", "exit 7")
    assert r.returncode == 7


def test_up_twice_is_refused(seed):
    r = run_cli("up", "topologies/seed.yaml", "--name", "tseed")
    assert r.returncode == 1
    assert "already up" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_run_state_on_disk(seed):
    info = json.loads((state.run_dir("tseed") / "run.json").read_text())
    assert info["phase"] == "up" and info["run_id"] == seed.run_id
    assert os.path.exists(f"/proc/{info['podserver_pid']}")


def test_down_is_idempotent_and_complete():
    run_cli("up", "topologies/seed.yaml", "--name", "tdown", check=True)
    c = state.load_cluster("tdown")
    pid = state.load_info("tdown").podserver_pid
    r = run_cli("down", "--name", "tdown", check=True)
    assert "is down" in r.stdout
    assert netns.list_names(f"tb-{c.run_id}-") == []
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z"
    assert not state.run_dir("tdown").exists()
    r = run_cli("down", "--name", "tdown")
    assert r.returncode == 0 and "nothing to do" in r.stdout
