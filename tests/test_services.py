"""Services made real by kube-proxy on every node: real traffic through the kernel's
rules, in iptables mode on both backends and in nftables mode (IPVS runs the same
checks inside the guest kernel: tests/test_ipvs_mode.py)."""

from __future__ import annotations

import errno
import socket
import time

import pytest

from conftest import run_cli
from nethelpers import http_get, udp_ask
from testbed import netns, state
from testbed.fabric import rtnl

pytestmark = pytest.mark.root

N = 24  # requests per check: P(missing one of 2 random endpoints) = 2 * 0.5**24


MODES = {"nft": ["--iptables-backend", "nft"], "legacy": ["--iptables-backend", "legacy"],
         "nftables": ["--proxy-mode", "nftables"]}


@pytest.fixture(scope="module", params=list(MODES))
def cluster(request):
    name = f"tsvc-{request.param}"
    run_cli("down", "--name", name)
    run_cli("up", "tests/data/services.yaml", "--name", name, *MODES[request.param], check=True)
    try:
        yield state.load_cluster(name)
    finally:
        run_cli("down", "--name", name)


def svc(c, name):
    return next(s for s in c.services if s["metadata"]["name"] == name)


def myapp(c):
    return [p for p in c.pods if p.labels.get("app") == "myapp"]


def toolbox(c):
    return [p for p in c.pods if p.labels.get("app") == "toolbox"]


def test_clusterip_from_pods_on_every_node_reaches_every_pod(cluster):
    ip = svc(cluster, "my-clusterip-service")["spec"]["clusterIP"]
    want = {p.name for p in myapp(cluster)}
    for client in toolbox(cluster):
        seen = {http_get(client.netns, ip, 80, "/hostname") for _ in range(N)}
        assert seen == want, (client.node, seen)
        # pod-to-ClusterIP keeps the pod's source address (no masquerade from the pod CIDR)
        assert http_get(client.netns, ip, 80, "/clientip").split(":")[0] == client.ip


def test_nodeport_from_external_client_on_every_node_with_masquerade(cluster):
    client = cluster.clients[0]
    want = {p.name for p in myapp(cluster)}
    for node in cluster.nodes:  # node3 has no myapp pod: eTP=Cluster forwards anyway
        seen = {http_get(client.netns, node.ip, 30080, "/hostname") for _ in range(N)}
        assert seen == want, (node.name, seen)
        for _ in range(6):
            src = http_get(client.netns, node.ip, 30080, "/clientip").split(":")[0]
            # masqueraded to the node's address on the way to the pod
            assert src in (node.ip, node.pod_gateway), (node.name, src)


def test_loadbalancer_ip_from_external_client(cluster):
    s = svc(cluster, "my-lb-service")
    ips = [i["ip"] for i in s["status"]["loadBalancer"]["ingress"]]
    assert ips and ips[0].startswith("192.168.56.24")
    want = {p.name for p in myapp(cluster)}
    for client in cluster.clients:
        seen = {http_get(client.netns, ips[0], 80, "/hostname") for _ in range(N)}
        assert seen == want


def test_external_traffic_policy_local(cluster):
    client = cluster.clients[1]
    local = {p.node: p.name for p in myapp(cluster)}
    for node in cluster.nodes:
        if node.name in local:
            for _ in range(8):
                assert http_get(client.netns, node.ip, 30081, "/hostname") == local[node.name]
                # the real client address arrives
                assert http_get(client.netns, node.ip, 30081, "/clientip").split(":")[0] == client.ip
        else:
            with netns.entered(client.netns):
                s = socket.socket()
            s.settimeout(1.0)
            t = time.monotonic()
            with pytest.raises((TimeoutError, socket.timeout)):
                s.connect((node.ip, 30081))  # DROP: no local endpoint on this node
            s.close()
            assert time.monotonic() - t >= 0.9


def test_loadbalancer_local_is_announced_only_by_nodes_with_endpoints(cluster):
    s = svc(cluster, "local-lb")
    ip = s["status"]["loadBalancer"]["ingress"][0]["ip"]
    assert s["spec"]["healthCheckNodePort"] >= 30000
    for _ in range(N):
        src = http_get(cluster.clients[0].netns, ip, 80, "/clientip").split(":")[0]
        assert src == cluster.clients[0].ip


def test_session_affinity_client_ip(cluster):
    ip = svc(cluster, "sticky")["spec"]["clusterIP"]
    pod = [p for p in toolbox(cluster) if p.node == "node3"][0]
    # 16 extra source addresses on one client pod: each sticks; together they spread
    extra = [f"10.233.66.{100 + i}" for i in range(16)]
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


def test_service_without_endpoints_rejects_at_once(cluster):
    ip = svc(cluster, "empty")["spec"]["clusterIP"]
    client = toolbox(cluster)[0]
    with netns.entered(client.netns):
        s = socket.socket()
    s.settimeout(3)
    t = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        s.connect((ip, 80))
    s.close()
    assert time.monotonic() - t < 0.5  # REJECT, not a timeout


def test_udp_service(cluster):
    ip = svc(cluster, "dns-like")["spec"]["clusterIP"]
    client = toolbox(cluster)[2]
    seen = set()
    for _ in range(N):
        # a fresh socket (new source port) per query: a new conntrack entry each time
        seen.add(udp_ask(client.netns, ip, 53, "hostname"))
    assert seen == {p.name for p in myapp(cluster)}


def test_rules_command_shows_live_rules(cluster):
    nft = cluster.extra["proxy"]["mode"] == "nftables"
    r = run_cli("rules", "node1", "--name", cluster.name, check=True)
    if nft:
        assert "table ip kube-proxy" in r.stdout and "service-ips" in r.stdout
    else:
        assert "-A KUBE-SERVICES" in r.stdout and "KUBE-SVC-" in r.stdout
    r = run_cli("rules", "node1", "--name", cluster.name, "--service", "default/my-nodeport-service", check=True)
    assert "30080" in r.stdout and "my-clusterip-service" not in r.stdout


def test_headless_and_external_name_get_no_rules(cluster):
    r = run_cli("rules", "node2", "--name", cluster.name, check=True)
    assert "my-headless-service" not in r.stdout and "my-external-service" not in r.stdout
    assert svc(cluster, "my-headless-service")["spec"]["clusterIP"] == "None"


def test_cluster_dns_through_this_mode(cluster):
    """The cluster DNS is itself a Service (kube-system/coredns at 10.233.0.3): queries
    cross this mode's rules, over UDP and TCP."""
    from testbed import dns

    client = toolbox(cluster)[0]
    res = dns.resolver_for(client)
    ip = svc(cluster, "my-clusterip-service")["spec"]["clusterIP"]
    assert [a.address for a in res.resolve("my-clusterip-service", "A")] == [ip]
    assert [a.address for a in res.resolve("my-clusterip-service.default.svc.cluster.local", "A", tcp=True)] == [ip]
    assert sorted(a.address for a in res.resolve("my-headless-service", "A")) == sorted(p.ip for p in myapp(cluster))
