"""kubectl-like verbs on a live cluster: every change resyncs every node's rules and
real traffic follows; bad manifests are refused with kube-apiserver's message."""

from __future__ import annotations

import subprocess

import pytest

from conftest import run_cli
from nethelpers import http_get, udp_ask
from testbed import state
from testbed.model import Cluster

pytestmark = pytest.mark.root

NAME = "tkubectl"


@pytest.fixture(scope="module")
def live():
    run_cli("down", "--name", NAME)
    run_cli("up", "topologies/seed.yaml", "--name", NAME, check=True)
    try:
        yield
    finally:
        run_cli("down", "--name", NAME)


def cluster():
    return state.load_cluster(NAME)


def svc(c, name):
    return next(s for s in c.services if s["metadata"]["name"] == name)


def hits(c, service: str, n: int = 24) -> set[str]:
    ip = svc(c, service)["spec"]["clusterIP"]
    client = next(p for p in c.pods if p.labels.get("app") == "toolbox" and p.node == "node3")
    return {http_get(client.netns, ip, 80, "/hostname") for _ in range(n)}


def myapp(c):
    return {p.name for p in c.pods if p.labels.get("app") == "myapp"}


def _gateway_macs(c) -> dict[str, str]:
    from testbed.fabric import rtnl

    out = {}
    for n in c.nodes:
        with rtnl(n.netns) as ipr:
            out[n.name] = ipr.get_links(ifname="cni0")[0].get_attr("IFLA_ADDRESS")
    return out


def test_scale_up_and_down_changes_endpoints_rules_and_traffic(live):
    from testbed.fabric import mac_for

    c = cluster()
    # the pod gateway keeps its address when pods join (else their neighbours' ARP
    # caches point at a MAC the bridge no longer has, and traffic is lost for seconds)
    assert _gateway_macs(c) == {n.name: mac_for(n.pod_gateway) for n in c.nodes}
    r = run_cli("scale", "--name", NAME, "deployment/myapp", "--replicas", "4", check=True)
    assert _gateway_macs(cluster()) == {n.name: mac_for(n.pod_gateway) for n in c.nodes}
    assert "scaled (+2 -0 pods)" in r.stdout
    c = cluster()
    assert len(myapp(c)) == 4
    assert hits(c, "my-clusterip-service", 60) == myapp(c)
    r = run_cli("scale", "--name", NAME, "deployment/myapp", "--replicas", "1", check=True)
    assert "(+0 -3 pods)" in r.stdout
    c = cluster()
    (only,) = myapp(c)
    assert hits(c, "my-clusterip-service") == {only}
    for node in c.nodes:
        rules = run_cli("rules", "--name", NAME, node.name, "--service", "default/my-clusterip-service", check=True).stdout
        assert rules.count("-j DNAT") == 1, rules
    # the removed pods' namespaces are gone, stale SEP chains deleted
    assert all(p.ip in rules or p.name == only for p in c.pods if p.labels.get("app") == "myapp")
    run_cli("scale", "--name", NAME, "deployment/myapp", "--replicas", "2", check=True)


def test_apply_new_service_then_delete(live, tmp_path):
    f = tmp_path / "svc.yaml"
    f.write_text(
        """
apiVersion: v1
kind: Service
metadata: {name: added, namespace: default}
spec:
  selector: {app: myapp}
  ports: [{name: udp, protocol: UDP, port: 5353, targetPort: udp}]
"""
    )
    before = run_cli("rules", "--name", NAME, "node1", check=True).stdout
    r = run_cli("apply", "--name", NAME, "-f", str(f), check=True)
    assert "service/added created" in r.stdout
    c = cluster()
    ip = svc(c, "added")["spec"]["clusterIP"]
    client = next(p for p in c.pods if p.labels.get("app") == "toolbox")
    assert {udp_ask(client.netns, ip, 5353, "hostname") for _ in range(24)} == myapp(c)
    r = run_cli("apply", "--name", NAME, "-f", str(f), check=True)
    assert "service/added unchanged" in r.stdout
    r = run_cli("delete", "--name", NAME, "-f", str(f), check=True)
    assert 'service "added" deleted' in r.stdout
    after = run_cli("rules", "--name", NAME, "node1", check=True).stdout
    strip = lambda t: sorted(l for l in t.splitlines() if not l.startswith("#") and "[" not in l)  # noqa: E731
    assert strip(after) == strip(before)  # stale chains flushed and deleted
    r = run_cli("delete", "--name", NAME, "-f", str(f))
    assert r.returncode == 2 and r.stderr.strip().endswith('services "added" not found')


def test_apply_workload_creates_pods_and_endpoints(live, tmp_path):
    f = tmp_path / "web.yaml"
    f.write_text(
        """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: x, ports: [{containerPort: 9376, name: http}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: http}]
"""
    )
    r = run_cli("apply", "--name", NAME, "-f", str(f), check=True)
    assert "deployment.apps/web created" in r.stdout and "service/web created" in r.stdout
    c = cluster()
    web = {p.name for p in c.pods if p.labels.get("app") == "web"}
    assert len(web) == 3 and hits(c, "web", 40) == web
    run_cli("delete", "--name", NAME, "-f", str(f), check=True)
    c = cluster()
    assert not [p for p in c.pods if p.labels.get("app") == "web"]


@pytest.mark.parametrize(
    "manifest,message",
    [
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec:\n  type: NodePort\n  selector: {app: myapp}\n"
            "  ports: [{port: 80, nodePort: 8080}]\n",
            'The Service "bad" is invalid: spec.ports[0].nodePort: Invalid value: 8080: provided port is not in the '
            "valid range. The range of valid ports is 30000-32767",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec:\n  type: NodePort\n  selector: {app: myapp}\n"
            "  ports: [{port: 80, nodePort: 30080}]\n",
            'The Service "bad" is invalid: spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated',
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec:\n  selector: {app: myapp}\n"
            "  ports: [{port: 80, nodePort: 30111}]\n",
            "The Service \"bad\" is invalid: spec.ports[0].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'",
        ),
    ],
)
def test_bad_manifest_is_refused_and_cluster_unchanged(live, tmp_path, manifest, message):
    f = tmp_path / "bad.yaml"
    # a good object first: it must not be applied either (all or nothing)
    f.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: fine}\nspec:\n  selector: {app: myapp}\n"
                 "  ports: [{port: 81}]\n---\n" + manifest)
    before = state.cluster_file(NAME).read_text()
    rules = subprocess.run(["ip", "netns", "exec", cluster().nodes[0].netns, "iptables-nft-save", "-t", "nat"],
                           capture_output=True, text=True).stdout
    r = run_cli("apply", "--name", NAME, "-f", str(f))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {f}: {message}"]
    assert state.cluster_file(NAME).read_text() == before
    after = subprocess.run(["ip", "netns", "exec", cluster().nodes[0].netns, "iptables-nft-save", "-t", "nat"],
                           capture_output=True, text=True).stdout
    strip = lambda t: [l for l in t.splitlines() if not l.startswith("#")]  # noqa: E731
    assert strip(after) == strip(rules)


def test_get_outputs(live):
    r = run_cli("get", "--name", NAME, "services", check=True)
    assert "my-nodeport-service" in r.stdout and "80:30080/TCP" in r.stdout and "google.com" in r.stdout
    r = run_cli("get", "--name", NAME, "endpointslices", "-o", "yaml", check=True)
    assert "kubernetes.io/service-name: my-clusterip-service" in r.stdout
    r = run_cli("get", "--name", NAME, "pods", check=True)
    assert "toolbox" in r.stdout
    r = run_cli("get", "--name", NAME, "widgets")
    assert r.returncode == 2 and 'the server doesn\'t have a resource type "widgets"' in r.stderr


def test_apply_takes_back_what_get_o_yaml_prints(live, tmp_path):
    """`get -o yaml` prints a `kind: List`; applying it back goes item by item, as
    kubectl's resource builder does, and changes nothing."""
    before = state.cluster_file(NAME).read_text()
    f = tmp_path / "services.yaml"
    f.write_text(run_cli("get", "--name", NAME, "services", "-o", "yaml", check=True).stdout)
    r = run_cli("apply", "--name", NAME, "-f", str(f), check=True)
    lines = [line for line in r.stdout.splitlines() if line.startswith("service/")]
    assert len(lines) == len(cluster().services) and all(line.endswith(" unchanged") for line in lines), r.stdout
    c = cluster()
    assert [s["spec"].get("clusterIP") for s in c.services] == [
        s["spec"].get("clusterIP") for s in Cluster.model_validate_json(before).services]


def test_udp_conntrack_of_removed_endpoint_is_cleaned(live, tmp_path):
    """kube-proxy's CleanStaleEntries: a UDP flow pinned (by conntrack) to a pod that
    goes away is deleted, so the same client socket reaches a remaining pod at once."""
    import socket

    from testbed import netns

    run_cli("scale", "--name", NAME, "deployment/myapp", "--replicas", "2", check=True)
    c = cluster()
    pods = [p for p in c.pods if p.labels.get("app") == "myapp"]
    doomed = pods[-1]  # scaling down to 1 removes the newest replica
    ip = svc(c, "my-clusterip-service")["spec"]["clusterIP"]
    f = tmp_path / "udp.yaml"
    f.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: udp-ct}\nspec:\n  selector: {app: myapp}\n"
                 "  ports: [{name: u, protocol: UDP, port: 7777, targetPort: 8080}]\n")
    run_cli("apply", "--name", NAME, "-f", str(f), check=True)
    ip = svc(cluster(), "udp-ct")["spec"]["clusterIP"]
    client = next(p for p in c.pods if p.labels.get("app") == "toolbox" and p.node == "node3")
    sock = None
    for _ in range(40):  # find a source port whose flow lands on the doomed pod
        with netns.entered(client.netns):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        s.sendto(b"hostname", (ip, 7777))
        if s.recv(100).decode() == doomed.name:
            sock = s
            break
        s.close()
    assert sock is not None
    sock.sendto(b"hostname", (ip, 7777))
    assert sock.recv(100).decode() == doomed.name  # conntrack pins the flow
    run_cli("scale", "--name", NAME, "deployment/myapp", "--replicas", "1", check=True)
    sock.sendto(b"hostname", (ip, 7777))
    assert sock.recv(100).decode() == pods[0].name
    sock.close()
    run_cli("delete", "--name", NAME, "-f", str(f), check=True)
    run_cli("scale", "--name", NAME, "deployment/myapp", "--replicas", "2", check=True)


def test_pod_stop_makes_it_not_ready_everywhere(live):
    c = cluster()
    pods = sorted(p.name for p in c.pods if p.labels.get("app") == "myapp")
    victim, survivor = pods[0], pods[1]
    r = run_cli("pod", "--name", NAME, "stop", victim, check=True)
    assert "not Ready" in r.stdout
    c = cluster()
    eps = [e for s in c.endpointslices if s["metadata"]["labels"].get("kubernetes.io/service-name") == "my-clusterip-service"
           for e in s.get("endpoints") or []]
    assert {e["targetRef"]["name"]: e["conditions"]["ready"] for e in eps} == {victim: False, survivor: True}
    assert hits(c, "my-clusterip-service") == {survivor}
    r = run_cli("get", "--name", NAME, "pods", check=True)
    assert any(victim in line and "0/1" in line for line in r.stdout.splitlines())
    run_cli("pod", "--name", NAME, "start", victim, check=True)
    assert hits(cluster(), "my-clusterip-service") == set(pods)
