"""The EndpointSlice controller, on the seed example and on the edge cases."""

from __future__ import annotations

import re

import pytest

from testbed.apiserver import ServiceRegistry, object_uid
from testbed.endpointslices import reconcile
from testbed.model import ContainerPort, Node, Pod
from testbed.validation import validate_object

NODES = [Node(name=f"node{i}", ip=f"192.168.56.1{i}", pod_cidr=f"10.233.{64 + i}.0/24", pod_gateway=f"10.233.{64 + i}.1") for i in (1, 2, 3)]


def web_pods(n=6, unready=("web-2",), http=8080, namespace="default", prefix="web", app="myapp"):
    pods = []
    for i in range(n):
        node = NODES[i % 3]
        pods.append(
            Pod(
                namespace=namespace,
                name=f"{prefix}-{i}",
                node=node.name,
                ip=f"10.233.{64 + i % 3}.{10 + i // 3}",
                labels={"app": app},
                ports=[ContainerPort(port=http, name="http")],
                ready=f"{prefix}-{i}" not in unready,
                owner_kind="Deployment",
                owner_name=prefix,
            )
        )
    return pods


@pytest.fixture
def registry():
    reg = ServiceRegistry(seed=0)
    reg.create(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "labels": {"tier": "frontend"}},
            "spec": {"selector": {"app": "myapp"}, "ports": [{"port": 80, "targetPort": 8080}]},
        }
    )
    reg.create(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web-named"},
            "spec": {"selector": {"app": "myapp"}, "ports": [{"name": "web", "port": 80, "targetPort": "http"}]},
        }
    )
    reg.create(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web-headless"},
            "spec": {"clusterIP": "None", "selector": {"app": "myapp"}, "ports": [{"port": 8080}]},
        }
    )
    reg.create(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "external"},
            "spec": {"type": "ExternalName", "externalName": "db.example.com", "selector": {"app": "myapp"}},
        }
    )
    return reg


def slices_of(slices, service):
    return [s for s in slices if s["metadata"]["labels"].get("kubernetes.io/service-name") == service]


def test_seed_example_shapes(registry):
    slices = reconcile(registry.list(), web_pods(), nodes=NODES)
    assert {s["metadata"]["labels"]["kubernetes.io/service-name"] for s in slices} == {"web", "web-named", "web-headless"}
    (web,) = slices_of(slices, "web")
    svc = registry.get("default", "web")
    name = web["metadata"]["name"]
    assert re.fullmatch(r"web-[bcdfghjklmnpqrstvwxz2456789]{5}", name)
    assert web == {
        "addressType": "IPv4",
        "apiVersion": "discovery.k8s.io/v1",
        "endpoints": web["endpoints"],
        "kind": "EndpointSlice",
        "metadata": {
            "generateName": "web-",
            "labels": {
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": "web",
                "tier": "frontend",
            },
            "name": name,
            "namespace": "default",
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "blockOwnerDeletion": True,
                    "controller": True,
                    "kind": "Service",
                    "name": "web",
                    "uid": svc["metadata"]["uid"],
                }
            ],
        },
        "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
    }
    assert [ep["targetRef"]["name"] for ep in web["endpoints"]] == [f"web-{i}" for i in range(6)]
    assert web["endpoints"][0] == {
        "addresses": ["10.233.64.10"],
        "conditions": {"ready": True, "serving": True, "terminating": False},
        "nodeName": "node1",
        "targetRef": {"kind": "Pod", "name": "web-0", "namespace": "default", "uid": object_uid("Pod", "default", "web-0")},
    }
    assert {ep["nodeName"] for ep in web["endpoints"]} == {"node1", "node2", "node3"}
    for s in slices:
        validate_object(s)  # what the controller writes, the API server accepts


def test_unready_pod_is_listed_not_ready(registry):
    (web,) = slices_of(reconcile(registry.list(), web_pods()), "web")
    conditions = {ep["targetRef"]["name"]: ep["conditions"] for ep in web["endpoints"]}
    assert conditions["web-2"] == {"ready": False, "serving": False, "terminating": False}
    assert conditions["web-1"] == {"ready": True, "serving": True, "terminating": False}


def test_publish_not_ready_addresses_marks_ready_but_not_serving():
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "myapp"}, "publishNotReadyAddresses": True, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    (web,) = reconcile([svc], web_pods())
    conditions = {ep["targetRef"]["name"]: ep["conditions"] for ep in web["endpoints"]}
    assert conditions["web-2"] == {"ready": True, "serving": False, "terminating": False}


def test_named_target_port_is_resolved_per_pod(registry):
    pods = web_pods(3, unready=()) + web_pods(2, unready=(), http=9090, prefix="canary")
    slices = slices_of(reconcile(registry.list(), pods), "web-named")
    by_port = {s["ports"][0]["port"]: sorted(ep["targetRef"]["name"] for ep in s["endpoints"]) for s in slices}
    assert by_port == {8080: ["web-0", "web-1", "web-2"], 9090: ["canary-0", "canary-1"]}
    assert all(s["ports"] == [{"name": "web", "port": s["ports"][0]["port"], "protocol": "TCP"}] for s in slices)
    assert len({s["metadata"]["name"] for s in slices}) == 2


def test_pod_without_the_named_port_gets_a_slice_without_ports(registry):
    pods = web_pods(2, unready=())
    pods.append(Pod(namespace="default", name="plain", node="node1", ip="10.233.64.99", labels={"app": "myapp"}))
    slices = slices_of(reconcile(registry.list(), pods), "web-named")
    portless = [s for s in slices if s["ports"] is None]
    assert len(slices) == 2 and len(portless) == 1
    assert [ep["targetRef"]["name"] for ep in portless[0]["endpoints"]] == ["plain"]


def test_named_port_must_match_protocol():
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "dns"},
        "spec": {"selector": {"app": "dns"}, "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"}]},
    }
    pod = Pod(namespace="default", name="dns-0", node="node1", ip="10.233.64.53", labels={"app": "dns"}, ports=[ContainerPort(port=5353, name="dns", protocol="TCP")])
    (s,) = reconcile([svc], [pod])
    assert s["ports"] is None  # the TCP port named "dns" does not serve the UDP Service port


def test_headless_service_gets_slices_with_headless_label_and_hostnames(registry):
    pods = web_pods(3, unready=())
    pods[0] = pods[0].model_copy(update={"hostname": "web-0", "subdomain": "web-headless"})
    pods[1] = pods[1].model_copy(update={"hostname": "web-1", "subdomain": "other"})
    (s,) = slices_of(reconcile(registry.list(), pods), "web-headless")
    assert s["metadata"]["labels"]["service.kubernetes.io/headless"] == ""
    assert s["endpoints"][0]["hostname"] == "web-0"
    assert "hostname" not in s["endpoints"][1]  # subdomain is another Service
    assert s["ports"] == [{"name": "", "port": 8080, "protocol": "TCP"}]


def test_headless_without_ports():
    reg = ServiceRegistry()
    reg.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db"}, "spec": {"clusterIP": "None", "selector": {"app": "myapp"}}})
    (s,) = reconcile(reg.list(), web_pods(2, unready=()))
    assert s["ports"] is None and len(s["endpoints"]) == 2
    # A manifest that never went through the API server has no ipFamilies; for a
    # headless Service the controller then assumes both families
    raw = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db"}, "spec": {"clusterIP": "None", "selector": {"app": "myapp"}}}
    v4, v6 = sorted(reconcile([raw], web_pods(2, unready=())), key=lambda s: s["addressType"])
    assert (v4["addressType"], len(v4["endpoints"])) == ("IPv4", 2)
    assert (v6["addressType"], v6["endpoints"]) == ("IPv6", None)


def test_no_slices_for_external_name_or_selectorless(registry):
    selectorless = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "manual"}, "spec": {"ports": [{"port": 80}]}}
    user_slice = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "manual-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "manual"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["192.168.56.99"]}],
        "ports": [{"name": "", "port": 80, "protocol": "TCP"}],
    }
    slices = reconcile(registry.list() + [selectorless], web_pods(), existing=[user_slice])
    assert slices_of(slices, "external") == []
    assert slices_of(slices, "manual") == [user_slice]


def test_more_than_100_pods_are_split(registry):
    pods = web_pods(250, unready=())
    slices = slices_of(reconcile(registry.list(), pods), "web")
    assert sorted(len(s["endpoints"]) for s in slices) == [50, 100, 100]
    names = [ep["targetRef"]["name"] for s in slices for ep in s["endpoints"]]
    assert sorted(names) == sorted(p.name for p in pods)
    assert len({s["metadata"]["name"] for s in slices}) == 3


def test_service_without_pods_gets_a_placeholder(registry):
    (s,) = slices_of(reconcile(registry.list(), []), "web")
    assert s["endpoints"] is None and s["ports"] is None
    assert s["metadata"]["generateName"] == "web-"


def test_only_pods_with_an_ip_in_the_namespace():
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {"selector": {"app": "myapp"}, "ports": [{"port": 80}]}}
    pods = web_pods(2, unready=()) + web_pods(2, unready=(), namespace="other", prefix="far")
    pods.append(Pod(namespace="default", name="pending", node="node1", ip="", labels={"app": "myapp"}))
    (s,) = reconcile([svc], pods)
    assert [ep["targetRef"]["name"] for ep in s["endpoints"]] == ["web-0", "web-1"]


def test_nodes_give_zones_and_unknown_nodes_drop_pods():
    nodes = [n.model_copy(update={"labels": {"topology.kubernetes.io/zone": f"zone-{n.name[-1]}"}}) for n in NODES[:2]]
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {"selector": {"app": "myapp"}, "ports": [{"port": 80}]}}
    (s,) = reconcile([svc], web_pods(3, unready=()), nodes=nodes)
    assert [(ep["targetRef"]["name"], ep["zone"]) for ep in s["endpoints"]] == [("web-0", "zone-1"), ("web-1", "zone-2")]


def test_reruns_are_identical_and_names_are_kept(registry):
    pods = web_pods(250, unready=())
    first = reconcile(registry.list(), pods)
    assert reconcile(registry.list(), pods) == first
    assert reconcile(registry.list(), pods, existing=first) == first
    # scale down: surviving slices keep their names
    second = reconcile(registry.list(), pods[:120], existing=first)
    names = {s["metadata"]["name"] for s in slices_of(first, "web")}
    kept = {s["metadata"]["name"] for s in slices_of(second, "web")}
    assert kept <= names and sum(len(s["endpoints"]) for s in slices_of(second, "web")) == 120
    # scale up again: fewer than 100 new endpoints go into the one unchanged slice they
    # fit best (getSliceToFill), no new slice is made, nothing is rebalanced
    third = reconcile(registry.list(), pods[:180], existing=second)
    sizes2 = {s["metadata"]["name"]: len(s["endpoints"]) for s in slices_of(second, "web")}
    sizes3 = {s["metadata"]["name"]: len(s["endpoints"]) for s in slices_of(third, "web")}
    assert set(sizes3) == kept and sum(sizes3.values()) == 180
    grown = [n for n in sizes3 if sizes3[n] != sizes2[n]]
    assert len(grown) == 1 and sizes3[grown[0]] <= 100
    best = min((100 - 60 - n, name) for name, n in sizes2.items() if 100 - 60 - n >= 0)[1]
    assert grown == [best]
    # a different seed names new slices differently
    other = reconcile(registry.list(), pods, seed=1)
    assert {s["metadata"]["name"] for s in other} != {s["metadata"]["name"] for s in first}


def test_port_change_keeps_the_slice_name(registry):
    first = reconcile(registry.list(), web_pods(4, unready=()))
    (before,) = slices_of(first, "web")
    svc = registry.get("default", "web")
    svc["spec"]["ports"][0]["targetPort"] = 9090
    services = [s if s["metadata"]["name"] != "web" else svc for s in registry.list()]
    (after,) = slices_of(reconcile(services, web_pods(4, unready=()), existing=first), "web")
    assert after["metadata"]["name"] == before["metadata"]["name"]
    assert after["ports"] == [{"name": "", "port": 9090, "protocol": "TCP"}]


def test_deleted_service_loses_its_slices(registry):
    first = reconcile(registry.list(), web_pods())
    registry.delete("default", "web")
    assert slices_of(reconcile(registry.list(), web_pods(), existing=first), "web") == []


def test_recreated_service_gets_new_slices(registry):
    first = reconcile(registry.list(), web_pods())
    old = registry.delete("default", "web")
    registry.create({k: v for k, v in old.items() if k != "status"} | {"metadata": {"name": "web"}})
    (s,) = slices_of(reconcile(registry.list(), web_pods(), existing=first), "web")
    assert s["metadata"]["ownerReferences"][0]["uid"] == registry.get("default", "web")["metadata"]["uid"]
