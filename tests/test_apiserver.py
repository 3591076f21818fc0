"""Service allocation as kube-apiserver's Service REST storage does it."""

from __future__ import annotations

import ipaddress
import time

import pytest

from testbed.apiserver import ServiceRegistry
from testbed.errors import InputError
from testbed.validation import APIError


def svc(name="web", namespace=None, annotations=None, **spec):
    spec.setdefault("selector", {"app": "myapp"})
    spec.setdefault("ports", [{"name": "http", "port": 80, "targetPort": 8080}])
    meta = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def fail(fn, *args, **kwargs) -> str:
    with pytest.raises(APIError) as info:
        fn(*args, **kwargs)
    return str(info.value)


@pytest.fixture
def reg():
    return ServiceRegistry("10.233.0.0/18", seed=7)


# ---- defaults -----------------------------------------------------------------------------


def test_cluster_ip_service_gets_api_server_defaults(reg):
    out = reg.create(svc())
    ip = out["spec"]["clusterIP"]
    assert out["spec"] == {
        "clusterIP": ip,
        "clusterIPs": [ip],
        "internalTrafficPolicy": "Cluster",
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        "selector": {"app": "myapp"},
        "sessionAffinity": "None",
        "type": "ClusterIP",
    }
    assert out["metadata"]["namespace"] == "default" and out["metadata"]["uid"]
    assert out["status"] == {"loadBalancer": {}}
    assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.233.0.0/18")


def test_target_port_defaults_to_port_and_client_ip_timeout(reg):
    out = reg.create(svc(ports=[{"port": 53, "protocol": "UDP"}], sessionAffinity="ClientIP"))
    assert out["spec"]["ports"] == [{"port": 53, "protocol": "UDP", "targetPort": 53}]
    assert out["spec"]["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 10800}}


def test_node_port_and_lb_defaults(reg):
    out = reg.create(svc(type="NodePort"))
    assert out["spec"]["externalTrafficPolicy"] == "Cluster"
    assert 30000 <= out["spec"]["ports"][0]["nodePort"] <= 32767
    lb = reg.create(svc("lb", type="LoadBalancer", externalTrafficPolicy="Local"))
    assert lb["spec"]["allocateLoadBalancerNodePorts"] is True
    hc = lb["spec"]["healthCheckNodePort"]
    assert 30000 <= hc <= 32767 and hc != lb["spec"]["ports"][0]["nodePort"]
    assert reg.node_port_allocated(hc)


def test_headless_and_external_name(reg):
    headless = reg.create(svc("db", clusterIP="None"))
    assert headless["spec"]["clusterIPs"] == ["None"] and headless["spec"]["ipFamilyPolicy"] == "SingleStack"
    # headless without selector: the API server asks for both families, even single-stack
    bare = reg.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bare"}, "spec": {"clusterIP": "None"}})
    assert bare["spec"]["ipFamilyPolicy"] == "RequireDualStack" and bare["spec"]["ipFamilies"] == ["IPv4", "IPv6"]
    ext = reg.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext"}, "spec": {"type": "ExternalName", "externalName": "db.example.com"}})
    assert ext["spec"] == {"externalName": "db.example.com", "sessionAffinity": "None", "type": "ExternalName"}


# ---- ClusterIP ------------------------------------------------------------------------------


def test_requested_cluster_ip(reg):
    out = reg.create(svc(clusterIP="10.233.0.50"))
    assert out["spec"]["clusterIP"] == "10.233.0.50" and out["spec"]["clusterIPs"] == ["10.233.0.50"]
    assert reg.cluster_ip_allocated("10.233.0.50")


def test_cluster_ip_already_allocated(reg):
    reg.create(svc("a", clusterIP="10.233.0.50"))
    assert fail(reg.create, svc("b", clusterIP="10.233.0.50"), file="t.yaml") == (
        't.yaml: The Service "b" is invalid: spec.clusterIPs: Invalid value: []string{"10.233.0.50"}: '
        "failed to allocate IP 10.233.0.50: provided IP is already allocated"
    )


def test_cluster_ip_out_of_range(reg):
    expected = (
        'The Service "b" is invalid: spec.clusterIPs: Invalid value: []string{"%s"}: '
        "failed to allocate IP %s: the provided network does not match the current range"
    )
    for ip in ("10.96.0.10", "10.233.0.0", "10.233.63.255"):  # outside, network, broadcast
        assert fail(reg.create, svc("b", clusterIP=ip)) == expected % (ip, ip)


def test_invalid_cluster_ip_is_caught_before_allocation(reg):
    assert fail(reg.create, svc(clusterIP="10.233.0.300")) == (
        'The Service "web" is invalid: spec.clusterIPs[0]: Invalid value: "10.233.0.300": '
        "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"
    )


def test_dynamic_cluster_ips_avoid_the_static_band(reg):
    # /18: 16382 usable addresses, the lower 256 (10.233.0.1 - 10.233.1.0) are kept for
    # requested IPs while the upper band has room
    first = int(ipaddress.ip_address("10.233.0.1"))
    ips = [int(ipaddress.ip_address(reg.create(svc(f"s{i}"))["spec"]["clusterIP"])) for i in range(300)]
    assert len(set(ips)) == 300
    assert all(ip >= first + 256 for ip in ips)
    assert all(ip <= int(ipaddress.ip_address("10.233.63.254")) for ip in ips)


def test_cluster_ip_range_full():
    reg = ServiceRegistry("10.0.0.0/30", seed=1)  # two usable addresses
    reg.create(svc("a"))
    reg.create(svc("b"))
    assert fail(reg.create, svc("c")) == "Internal error occurred: failed to allocate a serviceIP: range is full"


def test_kubespray_system_services_reserve_first_and_third_address():
    reg = ServiceRegistry("10.233.0.0/18", system_services=True)
    kubernetes = reg.get("default", "kubernetes")
    coredns = reg.get("kube-system", "coredns")
    assert kubernetes["spec"]["clusterIP"] == "10.233.0.1"
    assert kubernetes["spec"]["ports"] == [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]
    assert coredns["spec"]["clusterIP"] == "10.233.0.3"
    assert [(p["name"], p["port"], p["protocol"]) for p in coredns["spec"]["ports"]] == [
        ("dns", 53, "UDP"),
        ("dns-tcp", 53, "TCP"),
        ("metrics", 9153, "TCP"),
    ]
    assert "provided IP is already allocated" in fail(reg.create, svc(clusterIP="10.233.0.3"))
    assert "kubernetes" not in {s["metadata"]["name"] for s in ServiceRegistry().list()}


def test_ipv6_or_dual_stack_not_configured(reg):
    assert fail(reg.create, svc(ipFamilies=["IPv6"])) == (
        'The Service "web" is invalid: spec.ipFamilies[0]: Invalid value: "IPv6": not configured on this cluster'
    )
    assert fail(reg.create, svc(ipFamilyPolicy="RequireDualStack")) == (
        'The Service "web" is invalid: spec.ipFamilyPolicy: Invalid value: "RequireDualStack": '
        "this cluster is not configured for dual-stack services"
    )
    assert reg.create(svc(ipFamilyPolicy="PreferDualStack"))["spec"]["ipFamilies"] == ["IPv4"]


def test_dual_stack_registry():
    reg = ServiceRegistry("10.233.0.0/18,fd00:10:233::/112", seed=3)
    out = reg.create(svc(ipFamilyPolicy="RequireDualStack"))
    assert out["spec"]["ipFamilies"] == ["IPv4", "IPv6"]
    v4, v6 = out["spec"]["clusterIPs"]
    assert ipaddress.ip_address(v4).version == 4 and ipaddress.ip_address(v6).version == 6
    assert out["spec"]["clusterIP"] == v4


# ---- NodePort -------------------------------------------------------------------------------


def test_requested_node_port(reg):
    out = reg.create(svc(type="NodePort", ports=[{"port": 80, "nodePort": 30080}]))
    assert out["spec"]["ports"][0]["nodePort"] == 30080


def test_node_port_out_of_range(reg):
    # the message of the reference, verbatim
    assert fail(reg.create, svc(type="NodePort", ports=[{"port": 80, "nodePort": 8080}]), file="t.yaml") == (
        't.yaml: The Service "web" is invalid: spec.ports[0].nodePort: Invalid value: 8080: '
        "provided port is not in the valid range. The range of valid ports is 30000-32767"
    )


def test_node_port_already_allocated(reg):
    reg.create(svc("a", type="NodePort", ports=[{"port": 80, "nodePort": 30080}]))
    assert fail(reg.create, svc("b", type="NodePort", ports=[{"port": 80, "nodePort": 30080}])) == (
        'The Service "b" is invalid: spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated'
    )


def test_custom_node_port_range():
    reg = ServiceRegistry(node_port_range="30000-30001")
    reg.create(svc("a", type="NodePort"))
    reg.create(svc("b", type="NodePort"))
    assert fail(reg.create, svc("c", type="NodePort")) == "Internal error occurred: failed to allocate a nodePort: range is full"
    assert "The range of valid ports is 30000-30001" in fail(reg.create, svc("d", type="NodePort", ports=[{"port": 1, "nodePort": 30002}]))


def test_same_port_number_on_tcp_and_udp_shares_the_node_port(reg):
    ports = [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]
    out = reg.create(svc(type="NodePort", ports=ports))
    assert out["spec"]["ports"][0]["nodePort"] == out["spec"]["ports"][1]["nodePort"]


def test_dynamic_node_ports_avoid_the_static_band(reg):
    # 30000-32767: the lower 86 ports (30000-30085) are kept for requested nodePorts
    ports = [reg.create(svc(f"s{i}", type="NodePort"))["spec"]["ports"][0]["nodePort"] for i in range(200)]
    assert len(set(ports)) == 200 and min(ports) >= 30086 and max(ports) <= 32767


def test_health_check_node_port_requested_but_taken(reg):
    reg.create(svc("a", type="NodePort", ports=[{"port": 80, "nodePort": 30100}]))
    assert fail(reg.create, svc("lb", type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=30100)) == (
        "Internal error occurred: failed to allocate requested HealthCheck NodePort 30100: provided port is already allocated"
    )


def test_allocate_load_balancer_node_ports_false(reg):
    out = reg.create(svc(type="LoadBalancer", allocateLoadBalancerNodePorts=False))
    assert "nodePort" not in out["spec"]["ports"][0]


# ---- all-or-nothing, order, release -----------------------------------------------------


def test_failed_create_allocates_nothing(reg):
    reg.create(svc("taken", type="NodePort", ports=[{"port": 80, "nodePort": 30090}]))
    bad = svc(
        "b",
        type="LoadBalancer",
        externalTrafficPolicy="Local",
        clusterIP="10.233.0.77",
        ports=[{"name": "a", "port": 80, "nodePort": 30081}, {"name": "b", "port": 81, "nodePort": 30090}],
    )
    assert "spec.ports[1].nodePort: Invalid value: 30090: provided port is already allocated" in fail(reg.create, bad)
    assert not reg.cluster_ip_allocated("10.233.0.77")
    assert not reg.node_port_allocated(30081)
    assert len(reg) == 1
    # validation failure after a successful allocation also gives everything back
    bad = svc("Bad_Name", type="NodePort", clusterIP="10.233.0.78", ports=[{"port": 80, "nodePort": 30082}])
    assert "metadata.name" in fail(reg.create, bad)
    assert not reg.cluster_ip_allocated("10.233.0.78") and not reg.node_port_allocated(30082)


def test_allocation_errors_come_before_validation_errors(reg):
    # kube-apiserver allocates in BeginCreate, before the strategy validates
    reg.create(svc("a", type="NodePort", ports=[{"port": 80, "nodePort": 30080}]))
    bad = svc("b", type="NodePort", ports=[{"name": "Bad_Name", "port": 80, "nodePort": 30080}])
    assert fail(reg.create, bad) == 'The Service "b" is invalid: spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated'


def test_delete_releases_everything(reg):
    out = reg.create(svc(type="LoadBalancer", externalTrafficPolicy="Local", clusterIP="10.233.0.60", ports=[{"port": 80, "nodePort": 30060}]))
    hc = out["spec"]["healthCheckNodePort"]
    reg.delete("default", "web")
    assert not reg.cluster_ip_allocated("10.233.0.60") and not reg.node_port_allocated(30060) and not reg.node_port_allocated(hc)
    again = reg.create(svc("again", type="NodePort", clusterIP="10.233.0.60", ports=[{"port": 80, "nodePort": 30060}]))
    assert again["spec"]["clusterIP"] == "10.233.0.60"
    assert fail(reg.delete, "default", "web") == 'services "web" not found'


def test_already_exists(reg):
    reg.create(svc())
    assert fail(reg.create, svc(), file="t.yaml") == 't.yaml: services "web" already exists'
    assert len(reg.list()) == 1


def test_namespaces_are_separate(reg):
    reg.create(svc(namespace="a"))
    reg.create(svc(namespace="b"))
    assert [(s["metadata"]["namespace"], s["metadata"]["name"]) for s in reg.list()] == [("a", "web"), ("b", "web")]


# ---- update -----------------------------------------------------------------------------


def test_update_keeps_allocations_and_refuses_a_new_cluster_ip(reg):
    first = reg.create(svc(type="NodePort"))
    ip, np = first["spec"]["clusterIP"], first["spec"]["ports"][0]["nodePort"]
    again = reg.update(svc(type="NodePort", ports=[{"name": "http", "port": 80}, {"name": "https", "port": 443}]))
    assert again["spec"]["clusterIP"] == ip and again["spec"]["ports"][0]["nodePort"] == np
    assert again["metadata"]["uid"] == first["metadata"]["uid"]
    assert fail(reg.update, svc(type="NodePort", clusterIP="10.233.0.9")) == (
        'The Service "web" is invalid: spec.clusterIPs[0]: Invalid value: []string{"10.233.0.9"}: may not change once set'
    )


def test_update_type_change_releases_node_ports(reg):
    first = reg.create(svc(type="NodePort"))
    np = first["spec"]["ports"][0]["nodePort"]
    out = reg.update(svc(type="ClusterIP"))
    assert "nodePort" not in out["spec"]["ports"][0] and not reg.node_port_allocated(np)
    out = reg.update(svc(type="LoadBalancer", externalTrafficPolicy="Local"))
    assert out["spec"]["healthCheckNodePort"] and out["spec"]["ports"][0]["nodePort"]


def test_update_missing(reg):
    assert fail(reg.update, svc()) == 'services "web" not found'


# ---- LoadBalancer (MetalLB) -----------------------------------------------------------------


@pytest.fixture
def lb():
    return ServiceRegistry(lb_pools=[{"name": "default", "addresses": ["192.168.56.240-192.168.56.241"]}, {"name": "extra", "addresses": ["192.168.57.0/30"]}])


def ingress(out):
    return [i["ip"] for i in out["status"]["loadBalancer"].get("ingress", [])]


def test_lb_ips_first_free_of_the_first_pool(lb):
    assert ingress(lb.create(svc("a", type="LoadBalancer"))) == ["192.168.56.240"]
    assert lb.get("default", "a")["status"]["loadBalancer"]["ingress"] == [{"ip": "192.168.56.240", "ipMode": "VIP"}]
    assert ingress(lb.create(svc("b", type="LoadBalancer"))) == ["192.168.56.241"]
    assert ingress(lb.create(svc("c", type="LoadBalancer"))) == ["192.168.57.0"]
    lb.delete("default", "a")
    assert ingress(lb.create(svc("d", type="LoadBalancer"))) == ["192.168.56.240"]


def test_lb_requested_ip_and_pool(lb):
    out = lb.create(svc("a", type="LoadBalancer", annotations={"metallb.universe.tf/loadBalancerIPs": "192.168.57.2"}))
    assert ingress(out) == ["192.168.57.2"]
    assert ingress(lb.create(svc("b", type="LoadBalancer", loadBalancerIP="192.168.56.241"))) == ["192.168.56.241"]
    assert ingress(lb.create(svc("c", type="LoadBalancer", annotations={"metallb.io/address-pool": "extra"}))) == ["192.168.57.0"]


def test_lb_failure_leaves_the_service_pending_with_an_event(lb):
    lb.create(svc("a", type="LoadBalancer", loadBalancerIP="192.168.56.240"))
    out = lb.create(svc("b", type="LoadBalancer", loadBalancerIP="192.168.56.240"))
    assert out["status"] == {"loadBalancer": {}}
    assert lb.events[-1]["reason"] == "AllocationFailed" and lb.events[-1]["type"] == "Warning"
    assert lb.events[-1]["message"] == 'Failed to allocate IP for "default/b": can\'t change sharing key for "default/b", address also in use by default/a'
    lb.create(svc("c", type="LoadBalancer", loadBalancerIP="10.1.1.1"))
    assert lb.events[-1]["message"] == 'Failed to allocate IP for "default/c": ["10.1.1.1"] is not allowed in config'


def test_lb_shared_ip(lb):
    share = {"metallb.universe.tf/allow-shared-ip": "web", "metallb.universe.tf/loadBalancerIPs": "192.168.56.240"}
    a = lb.create(svc("a", type="LoadBalancer", annotations=share, ports=[{"port": 80}]))
    b = lb.create(svc("b", type="LoadBalancer", annotations=share, ports=[{"port": 443}]))
    assert ingress(a) == ingress(b) == ["192.168.56.240"]


def test_lb_type_change_releases_the_ip(lb):
    lb.create(svc("a", type="LoadBalancer"))
    out = lb.update(svc("a", type="ClusterIP"))
    assert out["status"] == {"loadBalancer": {}}
    assert ingress(lb.create(svc("b", type="LoadBalancer"))) == ["192.168.56.240"]


def test_bad_pool():
    with pytest.raises(InputError, match="invalid CIDR"):
        ServiceRegistry(lb_pools=[{"name": "p", "addresses": ["192.168.56.0/33"]}])


# ---- determinism, scale, restore ------------------------------------------------------------


def allocations(seed):
    reg = ServiceRegistry(seed=seed)
    out = [reg.create(svc(f"s{i}", type="NodePort")) for i in range(50)]
    return [(s["spec"]["clusterIP"], s["spec"]["ports"][0]["nodePort"]) for s in out]


def test_same_seed_same_allocations():
    assert allocations(1) == allocations(1)
    assert allocations(1) != allocations(2)


def test_twenty_thousand_services_are_cheap():
    reg = ServiceRegistry("10.96.0.0/16", seed=0)
    start = time.perf_counter()
    ips = {reg.create(svc(f"s{i}"))["spec"]["clusterIP"] for i in range(20000)}
    elapsed = time.perf_counter() - start
    assert len(ips) == 20000 and len(reg) == 20000
    assert elapsed < 30  # no pathological slowness (about 1 s on a laptop)


def test_restore_reserves_stored_allocations():
    lb_pools = [{"name": "default", "addresses": ["192.168.56.240/30"]}]
    reg = ServiceRegistry(lb_pools=lb_pools, seed=5)
    stored = reg.create(svc(type="LoadBalancer"))
    again = ServiceRegistry(lb_pools=lb_pools, seed=5)
    again.restore([stored])
    assert again.get("default", "web") == stored
    assert "provided IP is already allocated" in fail(again.create, svc("b", clusterIP=stored["spec"]["clusterIP"]))
    assert ingress(again.create(svc("c", type="LoadBalancer"))) == ["192.168.56.241"]
    with pytest.raises(InputError, match="already exists"):
        again.restore([stored])
