"""Services made real by kube-proxy's nftables mode on every node: the table each node's
kernel holds is exactly the rendered one, and real traffic goes where kube-proxy sends it."""

from __future__ import annotations

import secrets
import socket
import time
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from nethelpers import http_get, udp_ask
from testbed import controlplane, netns, state
from testbed.fabric import rtnl
from testbed.kubeproxy import run_in
from testbed.kubeproxy_nftables import node_config
from testbed.proxy import servicemap
from testbed.proxy.nft_normalize import FakeNFTables, dump_from_nft_list, live_normal_form
from testbed.proxy.nftables import render_nftables_sync

pytestmark = pytest.mark.root

N = 24  # requests per check: P(missing one of 2 random endpoints) = 2 * 0.5**24


@pytest.fixture(scope="module")
def cluster():
    name = f"tnft-{secrets.token_hex(3)}"
    run_cli("up", "tests/data/services.yaml", "--name", name, "--proxy-mode", "nftables", check=True)
    try:
        yield state.load_cluster(name)
    finally:
        r = run_cli("down", "--name", name)
        assert r.returncode == 0 and "is down" in r.stdout, (r.stdout, r.stderr)


def svc(c, name):
    return next(s for s in c.services if s["metadata"]["name"] == name)


def myapp(c):
    return [p for p in c.pods if p.labels.get("app") == "myapp"]


def toolbox(c):
    return [p for p in c.pods if p.labels.get("app") == "toolbox"]


def live_table(node) -> str:
    return run_in(node.netns, ["nft", "list", "table", "ip", "kube-proxy"]).stdout


def rendered_state(c, node) -> str:
    """The table a full sync of this node's kube-proxy produces, in kube-proxy's test
    normal form (knftables.Fake after the transaction, sorted)."""
    services, endpoints = servicemap.build_maps(controlplane.objects(c))
    fake = FakeNFTables()
    fake.apply(render_nftables_sync(services, endpoints, node_config(c, node)).text)
    return live_normal_form(fake.dump())


def connect_outcome(ns: str, ip: str, port: int, timeout: float = 1.0) -> tuple[str, float]:
    with netns.entered(ns):
        s = socket.socket()
    s.settimeout(timeout)
    t = time.monotonic()
    try:
        s.connect((ip, port))
        return "connected", time.monotonic() - t
    except ConnectionRefusedError:
        return "refused", time.monotonic() - t
    except (TimeoutError, socket.timeout):
        return "timeout", time.monotonic() - t
    finally:
        s.close()


def test_every_node_holds_exactly_the_rendered_table(cluster):
    for node in cluster.nodes:
        live = live_normal_form(dump_from_nft_list(live_table(node)))
        assert live == rendered_state(cluster, node), node.name
    # the mode is really nftables: kube-proxy's iptables chains are nowhere
    saved = run_in(cluster.nodes[0].netns, ["iptables-nft-save"], check=False).stdout
    assert "KUBE-SERVICES" not in saved


def test_clusterip_from_pods_on_every_node_reaches_every_pod(cluster):
    ip = svc(cluster, "my-clusterip-service")["spec"]["clusterIP"]
    want = {p.name for p in myapp(cluster)}
    for client in toolbox(cluster):
        seen = {http_get(client.netns, ip, 80, "/hostname") for _ in range(N)}
        assert seen == want, (client.node, seen)
        # pod to ClusterIP keeps the pod's address (ip saddr != podCIDR: no masquerade)
        assert http_get(client.netns, ip, 80, "/clientip").split(":")[0] == client.ip


def test_nodeport_from_external_client_on_every_node_with_masquerade(cluster):
    client = cluster.clients[0]
    want = {p.name for p in myapp(cluster)}
    for node in cluster.nodes:  # node3 has no myapp pod: eTP=Cluster forwards anyway
        seen = {http_get(client.netns, node.ip, 30080, "/hostname") for _ in range(N)}
        assert seen == want, (node.name, seen)
        for _ in range(6):
            src = http_get(client.netns, node.ip, 30080, "/clientip").split(":")[0]
            assert src in (node.ip, node.pod_gateway), (node.name, src)  # masquerade fully-random


def test_loadbalancer_ip_from_external_clients(cluster):
    s = svc(cluster, "my-lb-service")
    ip = s["status"]["loadBalancer"]["ingress"][0]["ip"]
    want = {p.name for p in myapp(cluster)}
    for client in cluster.clients:
        seen = {http_get(client.netns, ip, 80, "/hostname") for _ in range(N)}
        assert seen == want


def test_external_traffic_policy_local(cluster):
    client = cluster.clients[1]
    local = {p.node: p.name for p in myapp(cluster)}
    assert set(local) != {n.name for n in cluster.nodes}  # some node has no local endpoint
    for node in cluster.nodes:
        if node.name in local:
            for _ in range(8):
                assert http_get(client.netns, node.ip, 30081, "/hostname") == local[node.name]
                assert http_get(client.netns, node.ip, 30081, "/clientip").split(":")[0] == client.ip
        else:
            # no-endpoint-nodeports: drop (not reject) on a node without a local endpoint
            outcome, took = connect_outcome(client.netns, node.ip, 30081)
            assert outcome == "timeout" and took >= 0.9, (node.name, outcome)


def test_loadbalancer_local_keeps_the_client_address(cluster):
    ip = svc(cluster, "local-lb")["status"]["loadBalancer"]["ingress"][0]["ip"]
    for _ in range(N):
        assert http_get(cluster.clients[0].netns, ip, 80, "/clientip").split(":")[0] == cluster.clients[0].ip


def test_session_affinity_client_ip(cluster):
    ip = svc(cluster, "sticky")["spec"]["clusterIP"]
    pod = [p for p in toolbox(cluster) if p.node == "node3"][0]
    extra = [f"10.233.66.{100 + i}" for i in range(16)]  # 16 client addresses on one pod
    with rtnl(pod.netns) as ipr:
        for a in extra:
            ipr.addr("add", index=2, address=a, prefixlen=24)
    chosen = {}
    for a in extra:
        answers = set()
        for _ in range(6):
            with netns.entered(pod.netns):
                s = socket.socket()
            s.bind((a, 0))
            s.settimeout(3)
            s.connect((ip, 80))
            s.sendall(b"GET /hostname HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            s.close()
            answers.add(data.split(b"\r\n\r\n", 1)[1].decode())
        assert len(answers) == 1, (a, answers)
        chosen[a] = answers.pop()
    assert set(chosen.values()) == {p.name for p in myapp(cluster)}
    # the per-endpoint affinity sets of node3 hold the client addresses, with a timeout
    table = live_table(cluster.node("node3"))
    assert "flags dynamic,timeout" in table and "timeout 10m" in table
    assert all(a in table for a in extra)


def test_service_without_endpoints_rejects_at_once(cluster):
    ip = svc(cluster, "empty")["spec"]["clusterIP"]
    outcome, took = connect_outcome(toolbox(cluster)[0].netns, ip, 80, timeout=3)
    assert outcome == "refused" and took < 0.5  # no-endpoint-services -> reject-chain


def test_cluster_ip_checks(cluster):
    client = toolbox(cluster)[1]
    ip = svc(cluster, "my-clusterip-service")["spec"]["clusterIP"]
    # a port the Service does not have: cluster-ips-check rejects
    outcome, took = connect_outcome(client.netns, ip, 81, timeout=3)
    assert outcome == "refused" and took < 0.5
    # an address of the service CIDR no Service holds: dropped
    used = {s["spec"].get("clusterIP") for s in cluster.services}
    free = next(f"10.233.63.{i}" for i in range(250, 2, -1) if f"10.233.63.{i}" not in used)
    outcome, _ = connect_outcome(client.netns, free, 80)
    assert outcome == "timeout"


def test_udp_service(cluster):
    ip = svc(cluster, "dns-like")["spec"]["clusterIP"]
    client = toolbox(cluster)[2]
    seen = {udp_ask(client.netns, ip, 53, "hostname") for _ in range(N)}
    assert seen == {p.name for p in myapp(cluster)}


def test_rules_command_shows_the_table(cluster):
    r = run_cli("rules", "node1", "--name", cluster.name, check=True)
    assert "table ip kube-proxy" in r.stdout and "numgen random mod 2 vmap" in r.stdout
    r = run_cli("rules", "node1", "--name", cluster.name, "--service", "default/my-nodeport-service", check=True)
    assert "tcp . 30080 : goto external-" in r.stdout and "/my-nodeport-service/" in r.stdout
    assert "my-clusterip-service" not in r.stdout and "sticky" not in r.stdout


def test_headless_and_external_name_get_no_rules(cluster):
    r = run_cli("rules", "node2", "--name", cluster.name, check=True)
    assert "my-headless-service" not in r.stdout and "my-external-service" not in r.stdout


def test_scale_down_is_a_partial_sync_that_removes_the_endpoint(cluster, tmp_path: Path):
    """Last: it changes the cluster. kubectl scale -> one pod fewer -> every node's
    kube-proxy does a partial sync; the endpoint chain is flushed at once and deleted by
    a sync at least a second later (kube-proxy's staleChains)."""
    before = {p.name: p.ip for p in myapp(cluster)}
    r = run_cli("scale", "deployment/myapp", "--replicas", "1", "--name", cluster.name, check=True)
    assert "-1 pods" in r.stdout
    c = state.load_cluster(cluster.name)
    assert all(not res["full"] for res in c.extra["lastSync"]), c.extra["lastSync"]
    (kept,) = myapp(c)
    gone_ip = next(ip for name, ip in before.items() if name != kept.name)
    ip = svc(c, "my-clusterip-service")["spec"]["clusterIP"]
    for client in toolbox(c):
        assert {http_get(client.netns, ip, 80, "/hostname") for _ in range(8)} == {kept.name}
    node1 = c.node("node1")
    table = live_table(node1)
    assert f"dnat to {gone_ip}:8080" not in table
    stale = [ln.split()[1] for ln in table.splitlines() if ln.strip().startswith("chain endpoint-") and f"__{gone_ip}/" in ln]
    assert stale, "the removed endpoint's chains are flushed, not yet deleted"
    # the table is still exactly what a full sync of the new state would write, plus the
    # flushed (empty) stale chains
    live = live_normal_form(dump_from_nft_list(table))
    want = rendered_state(c, node1).split("\n")
    extra = [ln for ln in live.split("\n") if ln not in want]
    assert extra and all(ln.startswith("add chain ip kube-proxy ") and f"__{gone_ip}/" in ln for ln in extra), extra
    assert [ln for ln in want if ln not in live.split("\n")] == []
    # a later sync (a new Service) at least a second after deletes them
    time.sleep(1.1)
    f = tmp_path / "svc.yaml"
    f.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "late", "namespace": "default"},
                                 "spec": {"selector": {"app": "myapp"}, "ports": [{"name": "http", "port": 8081, "targetPort": 8080}]}}))
    run_cli("apply", "-f", str(f), "--name", cluster.name, check=True)
    c = state.load_cluster(cluster.name)
    assert all(not res["full"] for res in c.extra["lastSync"])
    assert any(res["deleted_chains"] for res in c.extra["lastSync"])
    table = live_table(node1)
    assert f"__{gone_ip}/" not in table
    assert live_normal_form(dump_from_nft_list(table)) == rendered_state(c, node1)
    late = svc(c, "late")["spec"]["clusterIP"]
    assert http_get(toolbox(c)[0].netns, late, 8081, "/hostname") == kept.name


# --- the applier alone, on a throwaway node namespace ----------------------------------------

VECTOR = Path(__file__).parent / "vectors" / "overall_nftables"


@pytest.fixture
def bare_node(tmp_path: Path, throwaway_ns: str):
    """A fresh namespace playing one node (no cluster), deleted afterwards."""
    from testbed.model import Cluster, Network, Node

    node = Node(name="test-node", ip="192.168.0.2", pod_cidr="10.0.0.0/24", pod_gateway="10.0.0.1", netns=throwaway_ns)
    cluster = Cluster(name="bare", nodes=[node], network=Network(service_cidr="172.30.0.0/16", pod_cidr="10.0.0.0/8"))
    return cluster, node, tmp_path / "kube-proxy-test-node.json"


def vector_objects():
    return [d for p in ("services.yaml", "endpointslices.yaml") for d in yaml.safe_load_all((VECTOR / p).read_text()) if d]


def test_applier_pieces_restart_and_recovery(bare_node):
    from testbed.errors import KernelError
    from testbed.kubeproxy_nftables import NFTablesProxier

    cluster, node, state_file = bare_node
    objs = vector_objects()
    services, endpoints = servicemap.build_maps(objs)

    def want():
        fake = FakeNFTables()
        fake.apply(render_nftables_sync(services, endpoints, node_config(cluster, node)).text)
        return live_normal_form(fake.dump())

    def live():
        return live_normal_form(dump_from_nft_list(live_table(node)))

    # a full sync in pieces of 25 operations: the same table as one transaction
    res = NFTablesProxier(cluster, node, state_file, max_transaction_ops=25).sync(objs)
    assert res.full and live() == want()
    # a kube-proxy restart (no memory, table in place): base chains re-created, same table
    state_file.unlink()
    res = NFTablesProxier(cluster, node, state_file).sync(objs)
    assert res.full and live() == want()
    # someone deletes the table; the next (partial) sync fails as kube-proxy's would ...
    run_in(node.netns, ["nft", "delete", "table", "ip", "kube-proxy"])
    objs2 = [o for o in objs if o["metadata"].get("namespace") != "ns1"]
    services, endpoints = servicemap.build_maps(objs2)
    with pytest.raises(KernelError, match="nft -f"):
        NFTablesProxier(cluster, node, state_file).sync(objs2)
    # ... and the one after is a full sync that puts everything back
    res = NFTablesProxier(cluster, node, state_file).sync(objs2)
    assert res.full and live() == want()
