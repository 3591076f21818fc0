"""kube-proxy ipvs mode, rendered without root.

Expectations come from kube-proxy's own ipvs unit tests (``pkg/proxy/ipvs/proxier_test.go``
at current master: ``TestNodePortIPv4``, ``TestNodePortIPv6``, ``TestIPv6Proxier``,
``TestLoadBalancer``, ``TestOnlyLocalNodePorts``, ``TestHealthCheckNodePort``,
``TestLoadBalancerSourceRanges``, ``TestAcceptIPVSTraffic``, ``TestOnlyLocalLoadBalancing``,
``TestExternalIPs``, ``TestOnlyLocalExternalIPs``, ``TestSessionAffinity``,
``TestEndpointSliceE2E``, ``TestTestInternalTrafficPolicyE2E``,
``Test_EndpointSlice*Terminating*``, ``TestMultiPortServiceBindAddr``,
``TestCreateAndLinkKubeChain``, ``TestCleanLegacyService[6]``, ``Test_syncService``,
``TestIpIsValidForSet``), transcribed case by case: the fake IPVS's virtual/real servers,
the fake ipset's entries, and ``checkIptables``' per-chain (jump, matched set) lists.
The fake proxier's settings are mirrored: node ``test-node``, no local-traffic detector,
the node addresses given as the fake netlink handle's ``eth0``. Whole-text vectors are in
``tests/vectors/ipvs`` (see its README).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from testbed.errors import InputError
from testbed.proxy.ipvs import (
    IPVSConfig,
    RealServer,
    VirtualServer,
    _valid_for_set,
    canonical_entry,
    ipset_restore_diff,
    ipvs_restore_diff,
    parse_ipset_save,
    parse_ipvsadm_save,
    render_ipvs,
    render_ipvs_text,
    validate_scheduler,
)
from testbed.proxy.servicemap import build_maps

VEC = Path(__file__).parent / "vectors"
NODE = "test-node"


# --- builders: kubectl-shaped dicts, as kube-proxy's makeTestService / makeTestEndpointSlice ---


def port(name="p80", port=80, protocol="TCP", node_port=None, target_port=None):
    p = {"name": name, "port": port, "protocol": protocol}
    if node_port:
        p["nodePort"] = node_port
    if target_port is not None:
        p["targetPort"] = target_port
    return p


def service(ns, name, cluster_ip, ports, type=None, lb_ips=(), **spec):
    s = {"clusterIP": cluster_ip, "ports": ports, **spec}
    if type:
        s["type"] = type
    obj = {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": ns, "name": name}, "spec": s}
    if lb_ips:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in lb_ips]}}
    return obj


def ep(ip, node=None, ready=None, serving=None, terminating=None):
    e = {"addresses": [ip]}
    cond = {k: v for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating)) if v is not None}
    if cond:
        e["conditions"] = cond
    if node:
        e["nodeName"] = node
    return e


def eps(ns, svc, num, endpoints, ports, address_type="IPv4"):
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": f"{svc}-{num}", "labels": {"kubernetes.io/service-name": svc}},
        "addressType": address_type, "endpoints": endpoints,
        "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
    }


def fake_render(objects, node_ips=(), nodeport_addresses=(), family="IPv4", **cfg):
    """``NewFakeProxier`` + ``syncProxyRules``: ``node_ips`` are the fake handle's eth0."""
    config = IPVSConfig(hostname_override=NODE, node_addresses=list(node_ips), nodeport_addresses=list(nodeport_addresses),
                        ip_family=family, **cfg)
    services, endpoints = build_maps(objects, family)
    return render_ipvs(services, endpoints, config)


def ipvs_state(r):
    """The fake IPVS: {"IP:PORT/PROTO": (scheduler, flags, timeout, [real servers])}."""
    return {
        str(vs): (vs.scheduler, vs.flags, vs.timeout, [str(rs) for rs in r.real_servers[vs.key]])
        for vs in r.virtual_servers
    }


def set_entries(r, name):
    return sorted(r.ipset(name).entries)


def chain(r, name):
    """``checkIptables``' view: rules of ``name`` in nat then filter, as (jump, set, -s)."""
    out = []
    table = ""
    for line in r.iptables.splitlines():
        if line.startswith("*"):
            table = line
            continue
        tok = line.split()
        if len(tok) < 2 or tok[0] != "-A" or tok[1] != name:
            continue
        jump = tok[tok.index("-j") + 1] if "-j" in tok else None
        mset = tok[tok.index("--match-set") + 1] if "--match-set" in tok else ""
        src = tok[tok.index("-s") + 1] if "-s" in tok and tok[tok.index("-s") - 1] != "!" else ""
        out.append((table, jump, mset, src))
    order = {"*nat": 0, "*filter": 1}
    return [(j, m, s) for t, j, m, s in sorted(out, key=lambda x: order[x[0]])]


RETURN_LO = ("RETURN", "", "127.0.0.0/8")
SVC_TCP80 = service("ns1", "svc1", "10.20.30.41", [port(node_port=3001)], type="NodePort")


# --- TestNodePortIPv4 ------------------------------------------------------------------------


def test_nodeport_ipv4_service_with_two_endpoints_ignores_the_ipv6_slice():
    objs = [
        SVC_TCP80,
        eps("ns1", "svc1", 1, [ep("10.180.0.1")], [("p80", 80, "TCP")]),
        eps("ns1", "svc1", 2, [ep("1002:ab8::2:10")], [("p80", 80, "TCP")], address_type="IPv6"),
    ]
    r = fake_render(objs, node_ips=["100.101.102.103", "2001:db8::1:1"])
    assert ipvs_state(r) == {
        "10.20.30.41:80/TCP": ("rr", 0, 0, ["10.180.0.1:80"]),
        "100.101.102.103:3001/TCP": ("rr", 0, 0, ["10.180.0.1:80"]),
    }


def test_nodeport_ipv4_udp_sets_and_chains():
    objs = [
        service("ns1", "svc1", "10.20.30.41", [port(protocol="UDP", node_port=3001)], type="NodePort"),
        eps("ns1", "svc1", 1, [ep("10.180.0.1")], [("p80", 80, "UDP")]),
    ]
    r = fake_render(objs, node_ips=["100.101.102.103"], nodeport_addresses=["0.0.0.0/0"])
    assert ipvs_state(r) == {
        "10.20.30.41:80/UDP": ("rr", 0, 0, ["10.180.0.1:80"]),
        "100.101.102.103:3001/UDP": ("rr", 0, 0, ["10.180.0.1:80"]),
    }
    assert set_entries(r, "KUBE-NODE-PORT-UDP") == ["3001"]
    assert chain(r, "KUBE-NODE-PORT") == [("KUBE-MARK-MASQ", "KUBE-NODE-PORT-UDP", ""), ("ACCEPT", "KUBE-HEALTH-CHECK-NODE-PORT", "")]
    assert chain(r, "KUBE-SERVICES") == [
        RETURN_LO, ("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP", ""), ("KUBE-NODE-PORT", "", ""), ("ACCEPT", "KUBE-CLUSTER-IP", ""),
    ]


def test_nodeport_ipv4_no_endpoints_still_has_virtual_servers():
    r = fake_render([SVC_TCP80], node_ips=["100.101.102.103"])
    assert ipvs_state(r) == {
        "10.20.30.41:80/TCP": ("rr", 0, 0, []),
        "100.101.102.103:3001/TCP": ("rr", 0, 0, []),
    }


def test_nodeport_sctp_on_a_node_with_many_ips():
    objs = [
        service("ns1", "svc1", "10.20.30.41", [port(protocol="SCTP", node_port=3001)], type="NodePort"),
        eps("ns1", "svc1", 1, [ep("10.180.0.1")], [("p80", 80, "SCTP")]),
    ]
    ips = ["100.101.102.103", "100.101.102.104", "100.101.102.105", "2001:db8::1:1", "2001:db8::1:2", "2001:db8::1:3"]
    r = fake_render(objs, node_ips=ips)
    assert ipvs_state(r) == {
        "10.20.30.41:80/SCTP": ("rr", 0, 0, ["10.180.0.1:80"]),
        **{f"100.101.102.10{i}:3001/SCTP": ("rr", 0, 0, ["10.180.0.1:80"]) for i in (3, 4, 5)},
    }
    assert set_entries(r, "KUBE-NODE-PORT-SCTP-HASH") == [f"100.101.102.10{i},sctp:3001" for i in (3, 4, 5)]
    assert "--sctp-service 10.20.30.41:80" in r.ipvsadm_text


def test_nodeport_sctp_external_traffic_policy_local():
    objs = [
        service("ns1", "svc1", "10.20.30.41", [port(protocol="SCTP", node_port=3001)], type="NodePort",
                externalTrafficPolicy="Local"),
        eps("ns1", "svc1", 1, [ep("10.180.0.1", NODE), ep("10.180.1.1", "other-node")], [("p80", 80, "SCTP")]),
    ]
    r = fake_render(objs, node_ips=["100.101.102.103"])
    assert ipvs_state(r) == {
        "10.20.30.41:80/SCTP": ("rr", 0, 0, ["10.180.0.1:80", "10.180.1.1:80"]),
        "100.101.102.103:3001/SCTP": ("rr", 0, 0, ["10.180.0.1:80"]),
    }
    assert set_entries(r, "KUBE-NODE-PORT-SCTP-HASH") == ["100.101.102.103,sctp:3001"]
    assert set_entries(r, "KUBE-NODE-PORT-LOCAL-SCTP-HASH") == ["100.101.102.103,sctp:3001"]
    assert chain(r, "KUBE-NODE-PORT") == [
        ("RETURN", "KUBE-NODE-PORT-LOCAL-SCTP-HASH", ""), ("KUBE-MARK-MASQ", "KUBE-NODE-PORT-SCTP-HASH", ""),
        ("ACCEPT", "KUBE-HEALTH-CHECK-NODE-PORT", ""),
    ]
    assert "-A KUBE-NODE-PORT -p sctp -m comment" in r.iptables and "KUBE-NODE-PORT-SCTP-HASH dst,dst -j KUBE-MARK-MASQ" in r.iptables


# --- TestNodePortIPv6 / TestIPv6Proxier ----------------------------------------------------


def test_nodeport_ipv6():
    objs = [
        service("ns1", "svc1", "2020::1", [port(node_port=3001)], type="NodePort"),
        eps("ns1", "svc1", 1, [ep("10.180.0.1")], [("p80", 80, "TCP")]),
        eps("ns1", "svc1", 2, [ep("1002:ab8::2:10")], [("p80", 80, "TCP")], address_type="IPv6"),
    ]
    r = fake_render(objs, node_ips=["100.101.102.103", "2001:db8::1:1"], family="IPv6")
    assert ipvs_state(r) == {
        "[2020::1]:80/TCP": ("rr", 0, 0, ["[1002:ab8::2:10]:80"]),
        "[2001:db8::1:1]:3001/TCP": ("rr", 0, 0, ["[1002:ab8::2:10]:80"]),
    }
    assert "-A -t [2020::1]:80 -s rr\n-a -t [2020::1]:80 -r [1002:ab8::2:10]:80 -m -w 1\n" in r.ipvsadm_text
    # IPv6 sets: KUBE-6- prefix, cut to 31 characters, family inet6
    names = [s.name for s in r.ipsets]
    assert "KUBE-6-LOAD-BALANCER-SOURCE-CID" in names and "KUBE-6-NODE-PORT-LOCAL-SCTP-HAS" in names
    assert all(len(n) <= 31 and n.startswith("KUBE-6-") for n in names)
    assert r.ipset("KUBE-6-CLUSTER-IP").create_line() == "create KUBE-6-CLUSTER-IP hash:ip,port family inet6 hashsize 1024 maxelem 65536"
    assert r.ipset("KUBE-6-CLUSTER-IP").entries == ("2020::1,tcp:80",)
    assert "-A KUBE-SERVICES -s ::1/128 -j RETURN" in r.iptables
    assert "--match-set KUBE-6-NODE-PORT-TCP dst -j KUBE-MARK-MASQ" in r.iptables


def test_nodeport_ipv4_service_does_nothing_on_the_ipv6_proxier():
    objs = [
        service("ns1", "svc1", "10.20.30.41", [port(protocol="UDP", node_port=3001)], type="NodePort"),
        eps("ns1", "svc1", 1, [ep("10.180.0.1")], [("p80", 80, "UDP")], address_type="IPv6"),
    ]
    r = fake_render(objs, node_ips=["100.101.102.103"], nodeport_addresses=["0.0.0.0/0"], family="IPv6")
    assert ipvs_state(r) == {} and r.bind_addresses == ()


def test_ipv6_proxier_keeps_only_ipv6_services():
    objs = [
        service("ns1", "svc1", "10.20.30.41", [port()]),
        service("ns2", "svc2", "1002:ab8::2:1", [port("p8080", 8080)]),
        eps("ns1", "svc1", 1, [ep("10.180.0.1")], [("p80", 80, "TCP")]),
        eps("ns2", "svc2", 1, [ep("1009:ab8::5:6")], [("p8080", 8080, "TCP")], address_type="IPv6"),
    ]
    assert ipvs_state(fake_render(objs, family="IPv6")) == {"[1002:ab8::2:1]:8080/TCP": ("rr", 0, 0, ["[1009:ab8::5:6]:8080"])}
    assert ipvs_state(fake_render(objs)) == {"10.20.30.41:80/TCP": ("rr", 0, 0, ["10.180.0.1:80"])}
    assert ipvs_state(fake_render([service("ns1", "svc1", "2001::1", [port()])], family="IPv6")) == {
        "[2001::1]:80/TCP": ("rr", 0, 0, [])
    }


# --- load balancers, health checks, source ranges ---------------------------------------------


LB_CHAIN = [
    RETURN_LO, ("KUBE-LOAD-BALANCER", "KUBE-LOAD-BALANCER", ""), ("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP", ""),
    ("KUBE-NODE-PORT", "", ""), ("ACCEPT", "KUBE-CLUSTER-IP", ""), ("ACCEPT", "KUBE-LOAD-BALANCER", ""),
]


def test_load_balancer():
    objs = [
        service("ns1", "svc1", "10.20.30.41", [port(node_port=3001)], type="LoadBalancer", lb_ips=["1.2.3.4"]),
        # kube-proxy's test gives the slice UDP: no endpoint matches the TCP port
        eps("ns1", "svc1", 1, [ep("10.180.0.1")], [("p80", 80, "UDP")]),
    ]
    r = fake_render(objs)
    # no node address, so no NodePort virtual server (and kube-proxy `continue`s)
    assert list(ipvs_state(r)) == ["10.20.30.41:80/TCP", "1.2.3.4:80/TCP"]
    assert set_entries(r, "KUBE-LOAD-BALANCER") == ["1.2.3.4,tcp:80"]
    assert chain(r, "KUBE-SERVICES") == LB_CHAIN
    assert chain(r, "KUBE-LOAD-BALANCER") == [("KUBE-MARK-MASQ", "", "")]
    assert r.bind_addresses == ("1.2.3.4", "10.20.30.41")
    assert set_entries(r, "KUBE-NODE-PORT-TCP") == []


def test_no_node_address_skips_the_nodeport_and_the_health_check_port():
    """``syncProxyRules`` ``continue``s when a NodePort has no node IP to listen on, which
    also skips that Service port's health-check node port (kube-proxy's own quirk)."""
    svc = service("ns1", "svc1", "10.20.30.41", [port(node_port=3001)], type="LoadBalancer", lb_ips=["1.2.3.4"],
                  externalTrafficPolicy="Local", healthCheckNodePort=30000)
    r = fake_render([svc])
    assert set_entries(r, "KUBE-HEALTH-CHECK-NODE-PORT") == [] and set_entries(r, "KUBE-NODE-PORT-LOCAL-TCP") == []
    r = fake_render([svc], node_ips=["192.168.0.2"])
    assert set_entries(r, "KUBE-HEALTH-CHECK-NODE-PORT") == ["30000"] and set_entries(r, "KUBE-NODE-PORT-LOCAL-TCP") == ["3001"]
    assert r.health_check_node_ports == {("ns1", "svc1"): 30000}


def test_only_local_nodeports_with_nodeport_addresses():
    objs = [
        service("ns1", "svc1", "10.20.30.41", [port(node_port=3001)], type="NodePort", externalTrafficPolicy="Local"),
        eps("ns1", "svc1", 1, [ep("10.180.0.1", NODE), ep("10.180.1.1", "other-node")], [("p80", 80, "TCP")]),
    ]
    r = fake_render(objs, node_ips=["100.101.102.103", "2001:db8::"], nodeport_addresses=["100.101.102.0/24"])
    assert ipvs_state(r) == {
        "10.20.30.41:80/TCP": ("rr", 0, 0, ["10.180.0.1:80", "10.180.1.1:80"]),
        "100.101.102.103:3001/TCP": ("rr", 0, 0, ["10.180.0.1:80"]),
    }
    assert set_entries(r, "KUBE-NODE-PORT-TCP") == ["3001"] and set_entries(r, "KUBE-NODE-PORT-LOCAL-TCP") == ["3001"]
    assert chain(r, "KUBE-SERVICES") == [
        RETURN_LO, ("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP", ""), ("KUBE-NODE-PORT", "", ""), ("ACCEPT", "KUBE-CLUSTER-IP", ""),
    ]
    assert chain(r, "KUBE-NODE-PORT") == [
        ("RETURN", "KUBE-NODE-PORT-LOCAL-TCP", ""), ("KUBE-MARK-MASQ", "KUBE-NODE-PORT-TCP", ""),
        ("ACCEPT", "KUBE-HEALTH-CHECK-NODE-PORT", ""),
    ]


def test_health_check_node_ports_only_for_local_policy():
    def lb(name, etp, hcnp):
        return service("ns1", name, "10.20.30.41", [port(node_port=3000)], type="LoadBalancer",
                       externalTrafficPolicy=etp, healthCheckNodePort=hcnp)

    objs = [lb("valid-svc1", "Local", 30000), lb("valid-svc2", "Local", 30001), lb("invalid-svc3", "Cluster", 30002)]
    r = fake_render(objs, node_ips=["100.101.102.103", "2001:db8::"], nodeport_addresses=["100.101.102.0/24"])
    assert set_entries(r, "KUBE-HEALTH-CHECK-NODE-PORT") == ["30000", "30001"]
    assert chain(r, "KUBE-NODE-PORT") == [
        ("RETURN", "KUBE-NODE-PORT-LOCAL-TCP", ""), ("KUBE-MARK-MASQ", "KUBE-NODE-PORT-TCP", ""),
        ("ACCEPT", "KUBE-HEALTH-CHECK-NODE-PORT", ""),
    ]


def test_load_balancer_source_ranges():
    objs = [
        service("ns1", "svc1", "10.20.30.41", [port()], type="LoadBalancer", lb_ips=["1.2.3.4"],
                loadBalancerSourceRanges=["10.0.0.0/8"]),
        eps("ns1", "svc1", 1, [ep("10.180.0.1")], [("p80", 80, "TCP")]),
    ]
    r = fake_render(objs)
    assert ipvs_state(r) == {
        "10.20.30.41:80/TCP": ("rr", 0, 0, ["10.180.0.1:80"]),
        "1.2.3.4:80/TCP": ("rr", 0, 0, ["10.180.0.1:80"]),
    }
    assert set_entries(r, "KUBE-LOAD-BALANCER") == ["1.2.3.4,tcp:80"]
    assert set_entries(r, "KUBE-LOAD-BALANCER-FW") == ["1.2.3.4,tcp:80"]
    assert set_entries(r, "KUBE-LOAD-BALANCER-SOURCE-CIDR") == ["1.2.3.4,tcp:80,10.0.0.0/8"]
    assert set_entries(r, "KUBE-LOAD-BALANCER-SOURCE-IP") == []
    assert chain(r, "KUBE-SERVICES") == LB_CHAIN
    assert chain(r, "KUBE-PROXY-FIREWALL") == [("KUBE-SOURCE-RANGES-FIREWALL", "KUBE-LOAD-BALANCER-FW", "")]
    assert chain(r, "KUBE-SOURCE-RANGES-FIREWALL") == [("RETURN", "KUBE-LOAD-BALANCER-SOURCE-CIDR", ""), ("DROP", "", "")]
    # no node IP inside the ranges: the node itself may not reach the LB IP (kubernetes#119656)
    assert "-A KUBE-IPVS-OUT-FILTER -s 1.2.3.4 -m ipvs --vaddr 1.2.3.4 --vproto tcp --vport 80 -j DROP\n" in r.iptables


def test_load_balancer_source_range_containing_the_node_ip_allows_the_node():
    objs = [service("ns1", "svc1", "10.20.30.41", [port()], type="LoadBalancer", lb_ips=["1.2.3.4"],
                    loadBalancerSourceRanges=["10.0.0.0/8", "0.0.0.0/0"])]
    r = fake_render(objs, node_ip="10.1.1.1")
    assert set_entries(r, "KUBE-LOAD-BALANCER-SOURCE-IP") == ["1.2.3.4,tcp:80,1.2.3.4"]
    # the kernel refuses a /0 net in hash:ip,port,net (kube-proxy logs and skips it)
    assert set_entries(r, "KUBE-LOAD-BALANCER-SOURCE-CIDR") == ["1.2.3.4,tcp:80,10.0.0.0/8"]
    assert "KUBE-IPVS-OUT-FILTER -s" not in r.iptables
    assert chain(r, "KUBE-SOURCE-RANGES-FIREWALL") == [
        ("RETURN", "KUBE-LOAD-BALANCER-SOURCE-CIDR", ""), ("RETURN", "KUBE-LOAD-BALANCER-SOURCE-IP", ""), ("DROP", "", ""),
    ]


def test_accept_ipvs_traffic():
    objs = [
        service("ns1", "svc1", "10.20.30.40", [port(node_port=80)], type="ClusterIP", externalIPs=["5.6.7.8"]),
        service("ns1", "svc2", "10.20.30.41", [port(node_port=80)], type="LoadBalancer", lb_ips=["1.2.3.4"]),
        service("ns1", "svc3", "10.20.30.42", [port(node_port=80)], type="NodePort"),
    ]
    r = fake_render(objs)
    assert chain(r, "KUBE-SERVICES") == [
        RETURN_LO, ("KUBE-LOAD-BALANCER", "KUBE-LOAD-BALANCER", ""), ("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP", ""),
        ("KUBE-MARK-MASQ", "KUBE-EXTERNAL-IP", ""), ("ACCEPT", "KUBE-EXTERNAL-IP", ""), ("ACCEPT", "KUBE-EXTERNAL-IP", ""),
        ("KUBE-NODE-PORT", "", ""), ("ACCEPT", "KUBE-CLUSTER-IP", ""), ("ACCEPT", "KUBE-LOAD-BALANCER", ""),
    ]


def test_only_local_load_balancing():
    objs = [
        service("ns1", "svc1", "10.20.30.41", [port(node_port=3001)], type="LoadBalancer", lb_ips=["1.2.3.4"],
                externalTrafficPolicy="Local"),
        eps("ns1", "svc1", 1, [ep("10.180.0.1", NODE), ep("10.180.1.1", "other-node")], [("p80", 80, "TCP")]),
    ]
    r = fake_render(objs)
    assert ipvs_state(r)["1.2.3.4:80/TCP"] == ("rr", 0, 0, ["10.180.0.1:80"])
    assert len(r.virtual_servers) == 2
    assert set_entries(r, "KUBE-LOAD-BALANCER") == ["1.2.3.4,tcp:80"]
    assert set_entries(r, "KUBE-LOAD-BALANCER-LOCAL") == ["1.2.3.4,tcp:80"]
    assert chain(r, "KUBE-SERVICES") == LB_CHAIN
    assert chain(r, "KUBE-LOAD-BALANCER") == [("RETURN", "KUBE-LOAD-BALANCER-LOCAL", ""), ("KUBE-MARK-MASQ", "", "")]


# --- external IPs, affinity ---------------------------------------------------------------


def test_external_ips_one_virtual_server_each_of_this_family():
    objs = [
        service("ns1", "svc1", "10.20.30.41", [port(target_port=80)], type="ClusterIP",
                externalIPs=["50.60.70.81", "2012::51", "127.0.0.1"]),
        eps("ns1", "svc1", 1, [ep("10.180.0.1")], [("p80", 80, "UDP")]),
    ]
    r = fake_render(objs)
    assert sorted(ipvs_state(r)) == ["10.20.30.41:80/TCP", "127.0.0.1:80/TCP", "50.60.70.81:80/TCP"]
    assert sorted(r.ipset("KUBE-EXTERNAL-IP").entries) == ["127.0.0.1,tcp:80", "50.60.70.81,tcp:80"]
    # an address that is not on another interface is bound to kube-ipvs0 (loopback is never a node address)
    assert set(r.bind_addresses) == {"10.20.30.41", "50.60.70.81", "127.0.0.1"}


def test_only_local_external_ips_get_only_local_endpoints():
    objs = [
        service("ns1", "svc1", "10.20.30.41", [port(target_port=80)], type="NodePort",
                externalIPs=["50.60.70.81", "2012::51", "127.0.0.1"], externalTrafficPolicy="Local"),
        eps("ns1", "svc1", 1, [ep("10.180.0.1", NODE), ep("10.180.1.1", "other-node")], [("p80", 80, "TCP")]),
    ]
    r = fake_render(objs)
    assert ipvs_state(r) == {
        "10.20.30.41:80/TCP": ("rr", 0, 0, ["10.180.0.1:80", "10.180.1.1:80"]),
        "50.60.70.81:80/TCP": ("rr", 0, 0, ["10.180.0.1:80"]),
        "127.0.0.1:80/TCP": ("rr", 0, 0, ["10.180.0.1:80"]),
    }
    assert r.ipset("KUBE-EXTERNAL-IP").entries == ()
    assert sorted(r.ipset("KUBE-EXTERNAL-IP-LOCAL").entries) == ["127.0.0.1,tcp:80", "50.60.70.81,tcp:80"]
    # KUBE-EXTERNAL-IP-LOCAL: the two ACCEPT rules, no masquerade
    assert chain(r, "KUBE-SERVICES")[1:4] == [
        ("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP", ""), ("ACCEPT", "KUBE-EXTERNAL-IP-LOCAL", ""), ("ACCEPT", "KUBE-EXTERNAL-IP-LOCAL", ""),
    ]


def test_external_ip_that_is_a_node_address_is_not_bound():
    objs = [service("ns1", "svc1", "10.20.30.41", [port()], externalIPs=["192.168.0.2", "192.168.0.9"])]
    r = fake_render(objs, node_ips=["192.168.0.2"])
    assert r.bind_addresses == ("10.20.30.41", "192.168.0.9")
    assert sorted(r.ipset("KUBE-IPVS-IPS").entries) == ["10.20.30.41", "192.168.0.9"]
    assert "192.168.0.2:80/TCP" in ipvs_state(r)


def test_session_affinity_is_persistence_on_every_virtual_server():
    objs = [service("ns1", "svc1", "10.20.30.41", [port(node_port=3001)], type="NodePort", externalIPs=["50.60.70.81"],
                    sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 10800}})]
    r = fake_render(objs, node_ips=["100.101.102.103"])
    assert [(str(vs), vs.flags, vs.timeout) for vs in r.virtual_servers] == [
        ("10.20.30.41:80/TCP", 1, 10800), ("50.60.70.81:80/TCP", 1, 10800), ("100.101.102.103:3001/TCP", 1, 10800),
    ]
    assert r.ipvsadm_text.splitlines()[0] == "-A -t 10.20.30.41:80 -s rr -p 10800"


# --- endpoints: locality, traffic policies, terminating ----------------------------------------


def ep_svc(**spec):
    # kube-proxy's E2E tests: a port with no number (0), unnamed, targetPort 80
    return service("ns1", "svc1", "172.20.1.1", [{"name": "", "protocol": "TCP", "targetPort": 80}], **spec)


def test_endpointslice_e2e_loopback_and_real_servers():
    objs = [ep_svc(), eps("ns1", "svc1", 1, [
        ep("10.0.1.1", NODE, ready=True), ep("10.0.1.2", "node2", ready=True), ep("10.0.1.3", "node3", ready=True),
        ep("10.0.1.4", "node3", ready=False),
    ], [("", 80, "TCP")])]
    r = fake_render(objs)
    assert r.ipset("KUBE-LOOP-BACK").entries == ("10.0.1.1,tcp:80,10.0.1.1",)
    assert ipvs_state(r) == {"172.20.1.1:0/TCP": ("rr", 0, 0, ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80"])}
    r = fake_render([ep_svc()])  # slice deleted
    assert r.ipset("KUBE-LOOP-BACK").entries == () and ipvs_state(r) == {"172.20.1.1:0/TCP": ("rr", 0, 0, [])}


@pytest.mark.parametrize("itp,nodes,loopback,real", [
    ("Cluster", [NODE, "node1", "node2"], 1, ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80"]),
    ("Cluster", ["node0", "node1", "node2"], 0, ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80"]),
    ("Local", [NODE, "node1", "node2"], 1, ["10.0.1.1:80"]),
    ("Local", ["node0", "node1", "node2"], 0, []),  # iTP=Local: no cluster endpoints to fall back to
])
def test_internal_traffic_policy(itp, nodes, loopback, real):
    slice_ = eps("ns1", "svc1", 1, [ep(f"10.0.1.{i + 1}", n, ready=True) for i, n in enumerate(nodes)], [("", 80, "TCP")])
    r = fake_render([ep_svc(internalTrafficPolicy=itp), slice_])
    assert len(r.ipset("KUBE-LOOP-BACK").entries) == loopback
    assert ipvs_state(r) == {"172.20.1.1:0/TCP": ("rr", 0, 0, real)}


TERMINATING = [
    ep("10.0.1.1", NODE, ready=True, serving=True, terminating=False),
    ep("10.0.1.2", NODE, ready=True, serving=True, terminating=False),
    ep("10.0.1.3", NODE, ready=False, serving=True, terminating=True),
    ep("10.0.1.4", NODE, ready=False, serving=False, terminating=True),
    ep("10.0.1.5", "another-node", ready=True, serving=True, terminating=False),
]
ONLY_TERMINATING_CLUSTER = [
    ep("10.0.1.1", NODE, ready=False, serving=True, terminating=True),
    ep("10.0.1.2", NODE, ready=False, serving=True, terminating=True),
    ep("10.0.1.3", NODE, ready=False, serving=False, terminating=True),
    ep("10.0.1.4", "another-node", ready=False, serving=True, terminating=True),
    ep("10.0.1.5", "another-node", ready=False, serving=False, terminating=False),
]
ONLY_TERMINATING_LOCAL = ONLY_TERMINATING_CLUSTER[:4] + [ep("10.0.1.5", "another-node", ready=True, serving=True, terminating=False)]


@pytest.mark.parametrize("etp,endpoints,loopback,cluster_rs,external_rs", [
    ("Cluster", TERMINATING, 4, ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.5:80"], ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.5:80"]),
    ("Local", TERMINATING, 4, ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.5:80"], ["10.0.1.1:80", "10.0.1.2:80"]),
    ("Cluster", ONLY_TERMINATING_CLUSTER, 3, ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.4:80"], ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.4:80"]),
    ("Local", ONLY_TERMINATING_LOCAL, 3, ["10.0.1.5:80"], ["10.0.1.1:80", "10.0.1.2:80"]),
], ids=["ready-and-terminating-cluster", "ready-and-terminating-local", "only-terminating-cluster", "only-terminating-local"])
def test_endpointslice_ready_and_terminating(etp, endpoints, loopback, cluster_rs, external_rs):
    svc = service("ns1", "svc1", "172.20.1.1", [{"name": "", "port": 80, "protocol": "TCP", "targetPort": 80}],
                  type="NodePort", externalTrafficPolicy=etp, internalTrafficPolicy="Cluster", externalIPs=["1.2.3.4"])
    r = fake_render([svc, eps("ns1", "svc1", 1, endpoints, [("", 80, "TCP")])])
    assert len(r.ipset("KUBE-LOOP-BACK").entries) == loopback
    assert ipvs_state(r) == {"172.20.1.1:80/TCP": ("rr", 0, 0, cluster_rs), "1.2.3.4:80/TCP": ("rr", 0, 0, external_rs)}


def test_local_policy_without_local_endpoints_falls_back_to_cluster_endpoints():
    """ipvs mode's own rule (``syncEndpoint``, kubernetes PR #97081): iptables/nftables drop."""
    objs = [
        service("ns1", "svc1", "10.20.30.41", [port(node_port=3001)], type="LoadBalancer", lb_ips=["1.2.3.4"],
                externalTrafficPolicy="Local", healthCheckNodePort=30000),
        eps("ns1", "svc1", 1, [ep("10.180.0.2", "other-node")], [("p80", 80, "TCP")]),
    ]
    r = fake_render(objs, node_ips=["192.168.0.2"])
    assert {k: v[3] for k, v in ipvs_state(r).items()} == {
        "10.20.30.41:80/TCP": ["10.180.0.2:80"], "1.2.3.4:80/TCP": ["10.180.0.2:80"], "192.168.0.2:3001/TCP": ["10.180.0.2:80"],
    }
    assert r.no_local_endpoints_external == 1 and r.no_local_endpoints_internal == 0


def test_multi_port_service_binds_its_address_once():
    two = service("ns1", "svc1", "172.16.55.4", [port("port1", 1234), port("port2", 1235)])
    three = service("ns1", "svc1", "172.16.55.4", [port("port1", 1234), port("port2", 1235), port("port3", 1236, "UDP")])
    assert fake_render([two]).bind_addresses == ("172.16.55.4",)
    assert fake_render([three]).bind_addresses == ("172.16.55.4",)
    assert fake_render([]).bind_addresses == ()


def test_headless_and_external_name_services_get_nothing():
    objs = [service("ns1", "headless", "None", [port()]),
            service("ns1", "ext", "172.16.55.4", [port()], type="ExternalName", externalName="foo.bar")]
    r = fake_render(objs)
    assert r.virtual_servers == () and r.bind_addresses == ()


# --- chains, sysctls, scheduler ---------------------------------------------------------------


def test_chain_lines_as_create_and_link_kube_chain():
    r = fake_render([])
    nat, flt = r.iptables.split("COMMIT\n")[:2]
    assert [line for line in nat.splitlines() if line.startswith(":")] == [
        ":KUBE-SERVICES - [0:0]", ":KUBE-POSTROUTING - [0:0]", ":KUBE-NODE-PORT - [0:0]", ":KUBE-LOAD-BALANCER - [0:0]",
        ":KUBE-MARK-MASQ - [0:0]",
    ]
    assert [line for line in flt.splitlines() if line.startswith(":")] == [
        ":KUBE-FORWARD - [0:0]", ":KUBE-NODE-PORT - [0:0]", ":KUBE-PROXY-FIREWALL - [0:0]",
        ":KUBE-SOURCE-RANGES-FIREWALL - [0:0]", ":KUBE-IPVS-FILTER - [0:0]", ":KUBE-IPVS-OUT-FILTER - [0:0]",
    ]
    assert r.iptables.startswith("*nat\n") and "\nCOMMIT\n*filter\n" in r.iptables and r.iptables.endswith("COMMIT\n")


def test_empty_node_text_exactly():
    r = fake_render([], masquerade_mark="0x4000", random_fully=False)
    assert r.ipvsadm_text == ""
    assert r.iptables == (
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-NODE-PORT - [0:0]\n:KUBE-LOAD-BALANCER - [0:0]\n"
        ":KUBE-MARK-MASQ - [0:0]\n"
        "-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN\n"
        "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT\n"
        "-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ\n"
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n"
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n"
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE\n'
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n"
        "COMMIT\n"
        "*filter\n:KUBE-FORWARD - [0:0]\n:KUBE-NODE-PORT - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n"
        ":KUBE-SOURCE-RANGES-FIREWALL - [0:0]\n:KUBE-IPVS-FILTER - [0:0]\n:KUBE-IPVS-OUT-FILTER - [0:0]\n"
        "-A KUBE-SOURCE-RANGES-FIREWALL -j DROP\n"
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT\n'
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n'
        '-A KUBE-NODE-PORT -m comment --comment "Kubernetes health check node port" -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j ACCEPT\n'
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-LOAD-BALANCER dst,dst -j RETURN\n"
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN\n"
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP dst,dst -j RETURN\n"
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP-LOCAL dst,dst -j RETURN\n"
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j RETURN\n"
        "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT\n"
        "COMMIT\n"
    )
    # every set is created on every sync, even empty
    assert [s.name for s in r.ipsets] == [
        "KUBE-LOOP-BACK", "KUBE-CLUSTER-IP", "KUBE-EXTERNAL-IP", "KUBE-EXTERNAL-IP-LOCAL", "KUBE-LOAD-BALANCER",
        "KUBE-LOAD-BALANCER-FW", "KUBE-LOAD-BALANCER-LOCAL", "KUBE-LOAD-BALANCER-SOURCE-IP",
        "KUBE-LOAD-BALANCER-SOURCE-CIDR", "KUBE-NODE-PORT-TCP", "KUBE-NODE-PORT-LOCAL-TCP", "KUBE-NODE-PORT-UDP",
        "KUBE-NODE-PORT-LOCAL-UDP", "KUBE-NODE-PORT-SCTP-HASH", "KUBE-NODE-PORT-LOCAL-SCTP-HASH",
        "KUBE-HEALTH-CHECK-NODE-PORT", "KUBE-IPVS-IPS",
    ]
    assert r.ipset("KUBE-NODE-PORT-TCP").create_line() == "create KUBE-NODE-PORT-TCP bitmap:port range 0-65535"


@pytest.mark.parametrize("cfg,rule", [
    ({}, "-m set --match-set KUBE-CLUSTER-IP src,dst -j KUBE-MARK-MASQ"),  # no-op detector
    ({"cluster_cidr": "10.0.0.0/8"}, "-m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ"),
    ({"cluster_cidr": "10.0.0.0/8", "masquerade_all": True}, "-m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ"),
])
def test_cluster_ip_masquerade_rule(cfg, rule):
    r = fake_render([service("ns1", "svc1", "10.20.30.41", [port()])], **cfg)
    assert f'-A KUBE-SERVICES -m comment --comment "Kubernetes service cluster ip + port for masquerade purpose" {rule}\n' in r.iptables


def test_masquerade_mark_and_random_fully():
    r = fake_render([])
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000\n" in r.iptables  # Go %#08x of 1<<14
    assert "-j MASQUERADE --random-fully\n" in r.iptables
    assert "--or-mark 0x00000001\n" in fake_render([], masquerade_bit=0).iptables


@pytest.mark.parametrize("kernel,conn_reuse", [("4.0.9", None), ("4.19.0-26-amd64", 0), ("5.9.0", None), ("6.1.176", None)])
def test_sysctls_and_conn_reuse_mode_by_kernel(kernel, conn_reuse):
    r = fake_render([], kernel_version=kernel)
    sysctls = dict(r.sysctls)
    assert sysctls.get("net/ipv4/vs/conn_reuse_mode") == conn_reuse
    assert [k for k, _ in r.sysctls if k != "net/ipv4/vs/conn_reuse_mode"] == [
        "net/ipv4/vs/conntrack", "net/ipv4/vs/expire_nodest_conn", "net/ipv4/vs/expire_quiescent_template", "net/ipv4/ip_forward",
    ]
    assert all(v == 1 for k, v in r.sysctls if k != "net/ipv4/vs/conn_reuse_mode")
    strict = dict(fake_render([], ipvs_strict_arp=True).sysctls)
    assert strict["net/ipv4/conf/all/arp_ignore"] == 1 and strict["net/ipv4/conf/all/arp_announce"] == 2
    assert "net/ipv4/conf/all/arp_ignore" not in sysctls


def test_scheduler_names():
    assert validate_scheduler("") == "rr" and validate_scheduler(None) == "rr" and validate_scheduler("wlc") == "wlc"
    with pytest.raises(InputError) as e:
        validate_scheduler("round robin")
    assert str(e.value).startswith('--ipvs-scheduler: Invalid value: "round robin"')
    assert len(str(e.value).splitlines()) == 1
    svc = service("ns1", "svc1", "10.96.0.10", [port("dns", 53, "UDP")], sessionAffinity="ClientIP",
                  sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}})
    r = fake_render([svc], ipvs_scheduler="mh")
    # mh gets the source-hash flag (mh-port); the line is what `ipvsadm -S -n` prints
    assert r.virtual_servers[0].flags == 0x11
    assert r.ipvsadm_text == "-A -u 10.96.0.10:53 -s mh -p 600 -b mh-port\n"
    assert fake_render([svc], ipvs_scheduler="sh").ipvsadm_text == "-A -u 10.96.0.10:53 -s sh -p 600\n"


def test_ipvs_timeouts_and_exclude_cidrs():
    r = fake_render([], ipvs_tcp_timeout=900, ipvs_udp_timeout=30)
    assert r.ipvs_timeouts == (900, 0, 30)
    assert fake_render([]).ipvs_timeouts is None
    with pytest.raises(InputError):
        fake_render([], ipvs_tcp_timeout=-1)


@pytest.mark.parametrize("v6,ip,ok", [
    (False, "127.0.0.1", False), (False, "127.0.0.0", False), (False, "127.6.7.8", False), (False, "8.8.8.8", True),
    (False, "192.168.0.1", True), (False, "169.254.0.0", True), (False, "::ffff:169.254.0.0", True), (False, "1000::", False),
    (True, "::1", False), (True, "1000::", True), (True, "fe80::200:ff:fe01:1", False), (True, "8.8.8.8", False),
    (True, "::ffff:8.8.8.8", False),
])
def test_ip_is_valid_for_set(v6, ip, ok):
    import ipaddress

    assert _valid_for_set(ipaddress.ip_address(ip), v6) is ok


def test_nodeport_node_ips_exclude_loopback_and_other_family():
    """``TestGetNodeIPs``: the NodePort addresses of a match-all node."""
    svc = service("ns1", "svc1", "10.20.30.41", [port(node_port=3001)], type="NodePort")
    r = fake_render([svc], node_ips=["10.20.30.40", "fe80::200:ff:fe01:1", "127.0.0.1", "::1", "172.17.0.1"])
    assert [str(vs) for vs in r.virtual_servers] == ["10.20.30.41:80/TCP", "10.20.30.40:3001/TCP", "172.17.0.1:3001/TCP"]
    r6 = fake_render([service("ns1", "svc1", "2000::9", [port(node_port=3001)], type="NodePort")],
                     node_ips=["1.2.3.4", "1000::", "::1", "10.20.30.31", "2000::", "fe80::200:ff:fe01:1"], family="IPv6")
    assert [str(vs) for vs in r6.virtual_servers] == ["[2000::9]:80/TCP", "[1000::]:3001/TCP", "[2000::]:3001/TCP"]


# --- whole texts --------------------------------------------------------------------------------


def _load(*files):
    out = []
    for f in files:
        out += [d for d in yaml.safe_load_all(Path(f).read_text()) if d]
    return out


def test_overall_vector():
    objs = _load(VEC / "overall_iptables/services.yaml", VEC / "overall_iptables/endpointslices.yaml")
    cfg = IPVSConfig(hostname_override="test-node", node_ip="192.168.0.2", cluster_cidr="10.0.0.0/8",
                     node_addresses=["192.168.0.2", "127.0.0.1"], kernel_version="6.1.176", masquerade_mark="0x4000",
                     random_fully=False)
    assert render_ipvs_text(objs, cfg) == (VEC / "ipvs/overall_expected.txt").read_text()
    # the same text from the maps
    assert render_ipvs_text(build_maps(objs), cfg) == (VEC / "ipvs/overall_expected.txt").read_text()


@pytest.mark.parametrize("node,ip,gw", [("node1", "192.168.56.11", "10.233.64.1"), ("node3", "192.168.56.13", "10.233.66.1")])
def test_seed_vectors(node, ip, gw):
    objs = _load(VEC / "ipvs/seed_objects.yaml")
    cfg = IPVSConfig(hostname_override=node, node_ip=ip, cluster_cidr="10.233.64.0/18",
                     node_addresses=[ip, gw, "127.0.0.1"], kernel_version="6.1.176")
    assert render_ipvs_text(objs, cfg) == (VEC / f"ipvs/seed_{node}.txt").read_text()


def test_render_is_deterministic_and_independent_of_object_order():
    objs = _load(VEC / "ipvs/seed_objects.yaml")
    cfg = IPVSConfig(hostname_override="node1", node_ip="192.168.56.11", cluster_cidr="10.233.64.0/18",
                     node_addresses=["192.168.56.11", "10.233.64.1"], kernel_version="6.1.176")
    assert render_ipvs_text(objs, cfg) == render_ipvs_text(list(reversed(objs)), cfg)


# --- reading the kernel back; incremental syncs ---------------------------------------------


SAVED = """\
-A -t 10.96.0.10:80 -s rr
-a -t 10.96.0.10:80 -r 192.168.1.5:8080 -m -w 1
-A -t 10.96.0.11:80 -s wrr -p 10800
-A -u 10.96.0.10:53 -s mh -p 600 -b mh-port
-A --sctp-service [2001::1]:80 -s rr
-a --sctp-service [2001::1]:80 -r [2001::5]:80 -m -w 3
"""  # real `ipvsadm -S -n` output (UML guest, kernel 6.1), plus an IPv6 SCTP service


def test_parse_ipvsadm_save():
    vss, rss = parse_ipvsadm_save(SAVED)
    assert vss[("TCP", "10.96.0.10", 80)] == VirtualServer("10.96.0.10", "TCP", 80, "rr", 0, 0)
    assert vss[("TCP", "10.96.0.11", 80)] == VirtualServer("10.96.0.11", "TCP", 80, "wrr", 1, 10800)
    assert vss[("UDP", "10.96.0.10", 53)] == VirtualServer("10.96.0.10", "UDP", 53, "mh", 0x11, 600)
    assert rss[("TCP", "10.96.0.10", 80)] == {("192.168.1.5", 8080): RealServer("192.168.1.5", 8080, 1)}
    assert rss[("SCTP", "2001::1", 80)] == {("2001::5", 80): RealServer("2001::5", 80, 3)}
    # the lines round-trip
    assert "".join(vs.ipvsadm_line() + "\n" for vs in vss.values()).splitlines() == [
        line for line in SAVED.splitlines() if line.startswith("-A")
    ]


def _overall():
    objs = _load(VEC / "overall_iptables/services.yaml", VEC / "overall_iptables/endpointslices.yaml")
    return objs, dict(hostname_override="test-node", node_ip="192.168.0.2", node_addresses=["192.168.0.2"])


def test_ipvs_diff_against_empty_and_identical_kernels():
    objs, cfg = _overall()
    r = fake_render(objs, **{k: v for k, v in cfg.items() if k not in ("hostname_override", "node_addresses")},
                    node_ips=cfg["node_addresses"])
    text, counts = ipvs_restore_diff(r, {}, {})
    assert text == r.ipvsadm_text and counts["vs_add"] == len(r.virtual_servers) and counts["vs_del"] == 0
    vss, rss = parse_ipvsadm_save(r.ipvsadm_text)
    assert ipvs_restore_diff(r, vss, rss) == ("", {k: 0 for k in counts})


def test_ipvs_diff_changes():
    old = fake_render([
        service("ns1", "a", "10.0.0.1", [port()]),
        service("ns1", "b", "10.0.0.2", [port()]),
        eps("ns1", "a", 1, [ep("10.1.0.1"), ep("10.1.0.2")], [("p80", 80, "TCP")]),
    ])
    new = fake_render([
        service("ns1", "a", "10.0.0.1", [port()], sessionAffinity="ClientIP"),  # timeout defaults to 10800
        service("ns1", "c", "10.0.0.3", [port()]),
        eps("ns1", "a", 1, [ep("10.1.0.2"), ep("10.1.0.3")], [("p80", 80, "TCP")]),
    ])
    vss, rss = parse_ipvsadm_save(old.ipvsadm_text)
    rss[("TCP", "10.0.0.1", 80)][("10.1.0.2", 80)] = RealServer("10.1.0.2", 80, 5)  # someone changed a weight
    text, counts = ipvs_restore_diff(new, vss, rss)
    assert text == (
        "-E -t 10.0.0.1:80 -s rr -p 10800\n"
        "-e -t 10.0.0.1:80 -r 10.1.0.2:80 -m -w 1\n"
        "-a -t 10.0.0.1:80 -r 10.1.0.3:80 -m -w 1\n"
        "-d -t 10.0.0.1:80 -r 10.1.0.1:80\n"
        "-A -t 10.0.0.3:80 -s rr\n"
        "-D -t 10.0.0.2:80\n"
    )
    assert counts == {"vs_add": 1, "vs_edit": 1, "vs_del": 1, "rs_add": 1, "rs_edit": 1, "rs_del": 1}


def test_ipvs_diff_keeps_excluded_and_other_family_virtual_servers():
    """``TestCleanLegacyService`` / ``TestCleanLegacyService6``."""
    current = {}
    for addr, p in (("1.1.1.1", 53), ("2.2.2.2", 54), ("3.3.3.3", 55), ("4.4.4.4", 56), ("5.5.5.5", 57), ("6.6.6.6", 58),
                    ("1000::1", 59)):
        vs = VirtualServer(addr, "UDP", p, "rr")
        current[vs.key] = vs
    wanted = [service("ns1", "s0", "1.1.1.1", [port("dns", 53, "UDP")]), service("ns1", "s1", "2.2.2.2", [port("dns", 54, "UDP")])]
    r = fake_render(wanted, ipvs_exclude_cidrs=["3.3.3.0/24", "4.4.4.0/24", "3000::/64"])
    text, _ = ipvs_restore_diff(r, current, {})
    assert text == "-D -u 5.5.5.5:57\n-D -u 6.6.6.6:58\n"
    current6 = {}
    for addr, p in (("1000::1", 53), ("1000::2", 54), ("3000::1", 55), ("4000::1", 56), ("5000::1", 57), ("1000::6", 58),
                    ("9.9.9.9", 60)):
        vs = VirtualServer(addr, "UDP", p, "rr")
        current6[vs.key] = vs
    wanted6 = [service("ns1", "s0", "1000::1", [port("dns", 53, "UDP")]), service("ns1", "s1", "1000::2", [port("dns", 54, "UDP")])]
    r6 = fake_render(wanted6, family="IPv6", ipvs_exclude_cidrs=["3000::/64", "4000::/64", "9.0.0.0/8"])
    text6, _ = ipvs_restore_diff(r6, current6, {})
    assert text6 == "-D -u [1000::6]:58\n-D -u [5000::1]:57\n"


@pytest.mark.parametrize("old,new,edit", [
    (VirtualServer("1.2.3.4", "SCTP", 8080, "rr", 0), VirtualServer("1.2.3.4", "SCTP", 8080, "rr", 1, 10800), True),
    (VirtualServer("1.2.3.4", "SCTP", 8080, "rr", 0), VirtualServer("1.2.3.4", "SCTP", 8080, "wlc", 0), True),
    (VirtualServer("1.2.3.4", "SCTP", 53, "rr", 0), VirtualServer("1.2.3.4", "SCTP", 53, "rr", 0), False),
])
def test_sync_service_updates_only_a_changed_virtual_server(old, new, edit):
    """``Test_syncService``: the kernel's hashed flag (0x2) is not a difference."""
    from testbed.proxy.ipvs import IPVSRender

    r = fake_render([])
    desired = IPVSRender(**{**r.__dict__, "virtual_servers": (new,), "real_servers": {new.key: ()}})
    cur = VirtualServer(old.address, old.protocol, old.port, old.scheduler, old.flags | 0x2, old.timeout)
    text, counts = ipvs_restore_diff(desired, {cur.key: cur}, {cur.key: {}})
    assert (text == new.ipvsadm_line("-E") + "\n") if edit else (text == "")


IPSET_SAVED = """\
create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0xf5b3a1d6
add KUBE-CLUSTER-IP 10.233.0.10,udp:53
add KUBE-CLUSTER-IP 10.20.30.41,tcp:80
create KUBE-NODE-PORT-TCP bitmap:port range 0-65535
add KUBE-NODE-PORT-TCP 30080
create KUBE-LOAD-BALANCER-SOURCE-CIDR hash:ip,port,net family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0xf78fec85
add KUBE-LOAD-BALANCER-SOURCE-CIDR 1.2.3.4,tcp:80,10.0.0.9
create OTHER hash:ip family inet hashsize 1024 maxelem 65536
"""  # real `ipset save` output (ipset v7.17)


def test_ipset_diff():
    assert parse_ipset_save(IPSET_SAVED)["KUBE-NODE-PORT-TCP"] == {"30080"}
    assert parse_ipset_save(IPSET_SAVED)["OTHER"] == set()
    r = fake_render([service("ns1", "svc1", "10.20.30.41", [port()], type="LoadBalancer", lb_ips=["1.2.3.4"],
                             loadBalancerSourceRanges=["10.0.0.9/32"])])
    assert ipset_restore_diff(r, {}) == (r.ipset_text, {"add": sum(len(s.entries) for s in r.ipsets), "del": 0})
    text, counts = ipset_restore_diff(r, parse_ipset_save(IPSET_SAVED))
    lines = text.splitlines()
    assert [line for line in lines if not line.startswith("create ")] == [
        "del KUBE-CLUSTER-IP 10.233.0.10,udp:53",
        "add KUBE-LOAD-BALANCER 1.2.3.4,tcp:80",
        "add KUBE-LOAD-BALANCER-FW 1.2.3.4,tcp:80",
        "del KUBE-NODE-PORT-TCP 30080",
        "add KUBE-IPVS-IPS 1.2.3.4",
        "add KUBE-IPVS-IPS 10.20.30.41",
    ]  # "1.2.3.4,tcp:80,10.0.0.9/32" is what the kernel prints as "...,10.0.0.9": no churn
    assert counts == {"add": 4, "del": 2}
    assert [line for line in lines if line.startswith("create ")] == [s.create_line() for s in r.ipsets]
    assert canonical_entry("hash:ip,port,net", "1.2.3.4,tcp:80,10.0.0.0/8") == "1.2.3.4,tcp:80,10.0.0.0/8"


PROC_IP_VS = (  # a real /proc/net/ip_vs (UML guest, kernel 6.1): persistence, IPv6, SCTP, a firewall mark
    "IP Virtual Server version 1.2.1 (size=4096)\n"
    "Prot LocalAddress:Port Scheduler Flags\n"
    "  -> RemoteAddress:Port Forward Weight ActiveConn InActConn\n"
    "TCP  0A60000A:0050 rr  persistent 60000 FFFFFFFF\n"
    "  -> C0A80105:1F90      Masq    1      0          0         \n"
    "UDP  [2001:0000:0000:0000:0000:0000:0000:0001]:0035 mh \n"
    "  -> [2001:0000:0000:0000:0000:0000:0000:0005]:0050      Masq    3      0          0         \n"
    "SCTP  0A000001:0009 wrr  \n"
    "FWM  00000001 rr \n"
    "  -> C0A80106:0000      Masq    1      0          0         \n"
)


def test_parse_proc_ip_vs():
    from testbed.proxy.ipvs import parse_proc_ip_vs

    scheds, rss = parse_proc_ip_vs(PROC_IP_VS)
    assert scheds == {("TCP", "10.96.0.10", 80): "rr", ("UDP", "2001::1", 53): "mh", ("SCTP", "10.0.0.1", 9): "wrr"}
    assert rss == {
        ("TCP", "10.96.0.10", 80): {("192.168.1.5", 8080): RealServer("192.168.1.5", 8080, 1)},
        ("UDP", "2001::1", 53): {("2001::5", 80): RealServer("2001::5", 80, 3)},
        ("SCTP", "10.0.0.1", 9): {},
    }
