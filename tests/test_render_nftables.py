"""kube-proxy nftables mode, rendered without root: golden tests.

Expected texts come from kube-proxy's own unit tests (``pkg/proxy/nftables/proxier_test.go``
@ 81810de635aa13aa0a32992f6def3aa9d6025ebc, for the proxier @ 531be812) and are compared
as kube-proxy compares them: our transaction is run against a ``knftables.Fake``
equivalent (:class:`FakeNFTables`), whose ``Dump()`` is put through
``sortNFTablesTransaction``. Packet-flow tests port kube-proxy's nftables
``tracePacket`` / ``runPacketFlowTests`` (``helpers_test.go`` @ 803d40a5) and run the
same cases. Configuration mirrors ``NewFakeProxier``: node ``test-node`` / 192.168.0.2,
pod CIDR 10.0.0.0/8, service CIDR 172.30.0.0/16, mark ``0x4000``, nodePortAddresses
192.168.0.2/32 + 2001:db8::1/128.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from testbed.proxy.nft_normalize import (
    FakeNFTables,
    NFTError,
    dump_from_nft_list,
    normal_form,
    sort_nftables_transaction,
)
from testbed.proxy.nftables import (
    KernelState,
    NFTablesConfig,
    hash_and_truncate,
    is_service_chain_name,
    kernel_state_from_nft_json,
    render_nftables_sync,
    service_port_endpoint_chain_name_base,
    stale_chain_deletions,
)
from testbed.proxy.servicemap import build_maps, changed_services
from testbed.proxy.types import ServicePortName

VECTORS = Path(__file__).parent / "vectors" / "overall_nftables"

TEST_NODE_NAME = "test-node"
TEST_NODE_IP = "192.168.0.2"
TEST_NODE_IP_ALT = "192.168.1.2"
TEST_EXTERNAL_IP = "192.168.99.11"
TEST_NODE_IPV6 = "2001:db8::1"
TEST_NODE_IPV6_ALT = "2001:db8:1::2"
TEST_EXTERNAL_CLIENT = "203.0.113.2"
TEST_EXTERNAL_CLIENT_BLOCKED = "203.0.113.130"
TEST_NODE_IPS = [TEST_NODE_IP, TEST_NODE_IP_ALT, TEST_EXTERNAL_IP, TEST_NODE_IPV6, TEST_NODE_IPV6_ALT]


def fake_config(family: str = "IPv4", **overrides) -> NFTablesConfig:
    """``NewFakeProxier(ipFamily)``."""
    v6 = family == "IPv6"
    cfg = NFTablesConfig(
        hostname_override=TEST_NODE_NAME,
        node_ip=TEST_NODE_IPV6 if v6 else TEST_NODE_IP,
        cluster_cidr="fd00:10::/64" if v6 else "10.0.0.0/8",
        masquerade_mark="0x4000",
        nodeport_addresses=[f"{TEST_NODE_IP}/32", f"{TEST_NODE_IPV6}/128"],
        node_addresses=["127.0.0.1", "::1", *TEST_NODE_IPS],
        service_cidrs=["fd00:10:96::/112"] if v6 else ["172.30.0.0/16"],
        ip_family=family,
    )
    return replace(cfg, **overrides)


# --- manifest builders (dicts shaped like kubectl's YAML) ------------------------------


def service(ns, name, *, cluster_ip, ports, type=None, lb_ips=(), **spec):
    s = {"clusterIP": cluster_ip, "ports": ports, **spec}
    if type:
        s["type"] = type
    obj = {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": ns, "name": name}, "spec": s}
    if lb_ips:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in lb_ips]}}
    return obj


def port(name, number, protocol="TCP", node_port=None, target_port=None):
    p = {"name": name, "port": number, "protocol": protocol}
    if node_port:
        p["nodePort"] = node_port
    if target_port is not None:
        p["targetPort"] = target_port
    return p


def ep(ip, node=None):
    e = {"addresses": [ip]}
    if node:
        e["nodeName"] = node
    return e


def eslice(ns, svc_name, endpoints, ports, num=1, address_type="IPv4"):
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "addressType": address_type,
        "metadata": {"namespace": ns, "name": f"{svc_name}-{num}", "labels": {"kubernetes.io/service-name": svc_name}},
        "endpoints": endpoints,
        "ports": ports,
    }


def eport(name, number, protocol="TCP"):
    return {"name": name, "port": number, "protocol": protocol}


def load_yaml(*paths: Path) -> list:
    return [d for p in paths for d in yaml.safe_load_all(p.read_text()) if d]


class FakeProxier:
    """kube-proxy's nftables ``Proxier`` driven like its unit tests drive it: each
    :meth:`sync` is one ``syncProxyRules`` over the objects given, against a
    :class:`FakeNFTables`. The first sync is full; later ones are partial with the
    Services that changed since the previous sync."""

    def __init__(self, family="IPv4", fake: FakeNFTables | None = None, **cfg):
        self.config = fake_config(family, **cfg)
        self.nft = fake or FakeNFTables("ip6" if family == "IPv6" else "ip")
        self.services: dict = {}
        self.endpoints: dict = {}
        self.stale: dict[str, float] = {}
        self.now = 1000.0
        self.flushed = False
        self.synced_once = False
        self.need_full_sync = True
        self.result = None

    def sync(self, objects, *, advance: float = 0.01):
        self.now += advance
        services, endpoints = build_maps(objects, self.config.ip_family)
        changed = None if self.need_full_sync else changed_services(self.services, services, self.endpoints, endpoints)
        r = render_nftables_sync(
            services, endpoints, self.config, changed=changed, kernel=self.nft.kernel_state(),
            stale_chains=self.stale, now=self.now, flushed=self.flushed, synced_once=self.synced_once,
        )
        if r.stale_text:
            self.nft.apply(r.stale_text)
        self.nft.apply(r.text)
        self.flushed = self.flushed or r.full_sync
        self.synced_once = True
        self.need_full_sync = False
        self.stale = dict(r.stale_chains)
        self.services, self.endpoints = services, endpoints
        self.result = r
        return r

    def age_stale_chains(self):
        """``ageStaleChains``: make it look as if two seconds had passed."""
        self.stale = {k: v - 2.0 for k, v in self.stale.items()}


def assert_nftables_equal(expected: str, dump: str) -> None:
    """``assertNFTablesTransactionEqual``."""
    assert sort_nftables_transaction(dump) == sort_nftables_transaction(expected)


# --- sortNFTablesTransaction (Test_sortNFTablesTransaction, Test_diffNFTablesTransaction) --

SORT_INPUT = """
add table ip testing { comment "rules for kube-proxy" ; }

add chain ip testing mark-for-masquerade
add rule ip testing mark-for-masquerade mark set mark or 0x4000
add chain ip testing masquerading
add rule ip testing masquerading mark and 0x4000 == 0 return
add rule ip testing masquerading mark set mark xor 0x4000
add rule ip testing masquerading masquerade fully-random

add set ip testing firewall { type ipv4_addr . inet_proto . inet_service ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }
add set ip testing firewall-allow { type ipv4_addr . inet_proto . inet_service . ipv4_addr ; flags interval ; comment "destinations+sources that are allowed by LoadBalancerSourceRanges" ; }
add chain ip testing firewall-check
add chain ip testing firewall-allow-check
add rule ip testing firewall-allow-check ip daddr . meta l4proto . th dport . ip saddr @firewall-allow return
add rule ip testing firewall-allow-check drop
add rule ip testing firewall-check ip daddr . meta l4proto . th dport @firewall jump firewall-allow-check

# svc1
add chain ip testing service-ULMVA6XW-ns1/svc1/tcp/p80
add rule ip testing service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip testing service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }

add chain ip testing endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80
add rule ip testing endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade
add rule ip testing endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80

add element ip testing service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }

# svc2
add chain ip testing service-42NFTM6N-ns2/svc2/tcp/p80
add rule ip testing service-42NFTM6N-ns2/svc2/tcp/p80 ip daddr 172.30.0.42 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip testing service-42NFTM6N-ns2/svc2/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80 }
add chain ip testing external-42NFTM6N-ns2/svc2/tcp/p80
add rule ip testing external-42NFTM6N-ns2/svc2/tcp/p80 ip saddr 10.0.0.0/8 goto service-42NFTM6N-ns2/svc2/tcp/p80 comment "short-circuit pod traffic"
add rule ip testing external-42NFTM6N-ns2/svc2/tcp/p80 fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"
add rule ip testing external-42NFTM6N-ns2/svc2/tcp/p80 fib saddr type local goto service-42NFTM6N-ns2/svc2/tcp/p80 comment "short-circuit local traffic"
add chain ip testing endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80
add rule ip testing endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80 ip saddr 10.180.0.2 jump mark-for-masquerade
add rule ip testing endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80 meta l4proto tcp dnat to 10.180.0.2:80

add element ip testing service-ips { 172.30.0.42 . tcp . 80 : goto service-42NFTM6N-ns2/svc2/tcp/p80 }
add element ip testing service-ips { 192.168.99.22 . tcp . 80 : goto external-42NFTM6N-ns2/svc2/tcp/p80 }
add element ip testing service-ips { 1.2.3.4 . tcp . 80 : goto external-42NFTM6N-ns2/svc2/tcp/p80 }
add element ip testing service-nodeports { tcp . 3001 : goto external-42NFTM6N-ns2/svc2/tcp/p80 }

add element ip testing no-endpoint-nodeports { tcp . 3001 comment "ns2/svc2:p80" : drop }
add element ip testing no-endpoint-services { 1.2.3.4 . tcp . 80 comment "ns2/svc2:p80" : drop }
add element ip testing no-endpoint-services { 192.168.99.22 . tcp . 80 comment "ns2/svc2:p80" : drop }
"""

SORT_EXPECTED = """
add table ip testing { comment "rules for kube-proxy" ; }
add chain ip testing endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80
add chain ip testing endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80
add chain ip testing external-42NFTM6N-ns2/svc2/tcp/p80
add chain ip testing firewall-allow-check
add chain ip testing firewall-check
add chain ip testing mark-for-masquerade
add chain ip testing masquerading
add chain ip testing service-42NFTM6N-ns2/svc2/tcp/p80
add chain ip testing service-ULMVA6XW-ns1/svc1/tcp/p80
add rule ip testing endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade
add rule ip testing endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80
add rule ip testing endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80 ip saddr 10.180.0.2 jump mark-for-masquerade
add rule ip testing endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80 meta l4proto tcp dnat to 10.180.0.2:80
add rule ip testing external-42NFTM6N-ns2/svc2/tcp/p80 ip saddr 10.0.0.0/8 goto service-42NFTM6N-ns2/svc2/tcp/p80 comment "short-circuit pod traffic"
add rule ip testing external-42NFTM6N-ns2/svc2/tcp/p80 fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"
add rule ip testing external-42NFTM6N-ns2/svc2/tcp/p80 fib saddr type local goto service-42NFTM6N-ns2/svc2/tcp/p80 comment "short-circuit local traffic"
add rule ip testing firewall-allow-check ip daddr . meta l4proto . th dport . ip saddr @firewall-allow return
add rule ip testing firewall-allow-check drop
add rule ip testing firewall-check ip daddr . meta l4proto . th dport @firewall jump firewall-allow-check
add rule ip testing mark-for-masquerade mark set mark or 0x4000
add rule ip testing masquerading mark and 0x4000 == 0 return
add rule ip testing masquerading mark set mark xor 0x4000
add rule ip testing masquerading masquerade fully-random
add rule ip testing service-42NFTM6N-ns2/svc2/tcp/p80 ip daddr 172.30.0.42 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip testing service-42NFTM6N-ns2/svc2/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80 }
add rule ip testing service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip testing service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }
add set ip testing firewall { type ipv4_addr . inet_proto . inet_service ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }
add set ip testing firewall-allow { type ipv4_addr . inet_proto . inet_service . ipv4_addr ; flags interval ; comment "destinations+sources that are allowed by LoadBalancerSourceRanges" ; }
add element ip testing no-endpoint-nodeports { tcp . 3001 comment "ns2/svc2:p80" : drop }
add element ip testing no-endpoint-services { 1.2.3.4 . tcp . 80 comment "ns2/svc2:p80" : drop }
add element ip testing no-endpoint-services { 192.168.99.22 . tcp . 80 comment "ns2/svc2:p80" : drop }
add element ip testing service-ips { 1.2.3.4 . tcp . 80 : goto external-42NFTM6N-ns2/svc2/tcp/p80 }
add element ip testing service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }
add element ip testing service-ips { 172.30.0.42 . tcp . 80 : goto service-42NFTM6N-ns2/svc2/tcp/p80 }
add element ip testing service-ips { 192.168.99.22 . tcp . 80 : goto external-42NFTM6N-ns2/svc2/tcp/p80 }
add element ip testing service-nodeports { tcp . 3001 : goto external-42NFTM6N-ns2/svc2/tcp/p80 }
"""


def test_sort_nftables_transaction():
    assert sort_nftables_transaction(SORT_INPUT) == SORT_EXPECTED.strip()


def test_diff_nftables_transaction():
    assert sort_nftables_transaction(SORT_INPUT) == sort_nftables_transaction(SORT_EXPECTED)
    not_expected = "\n".join(SORT_EXPECTED.split("\n")[2:])
    assert sort_nftables_transaction(SORT_INPUT) != sort_nftables_transaction(not_expected)
    # rules of one chain keep their order: swapping two is a difference
    swapped = SORT_EXPECTED.replace(
        "add rule ip testing masquerading mark set mark xor 0x4000\nadd rule ip testing masquerading masquerade fully-random",
        "add rule ip testing masquerading masquerade fully-random\nadd rule ip testing masquerading mark set mark xor 0x4000",
    )
    assert swapped != SORT_EXPECTED
    assert sort_nftables_transaction(SORT_INPUT) != sort_nftables_transaction(swapped)


# --- Vector 3: TestOverallNFTablesRules, from YAML manifests -------------------------------


def overall_objects():
    return load_yaml(VECTORS / "services.yaml", VECTORS / "endpointslices.yaml")


def test_overall_nftables_rules_from_manifests():
    fp = FakeProxier()
    r = fp.sync(overall_objects())
    expected = (VECTORS / "expected.txt").read_text()
    assert_nftables_equal(expected, fp.nft.dump())
    # the metrics-like counts agree with what the table holds
    assert r.nat_rules + r.filter_rules == fp.nft.rule_count() == 57
    assert r.elements == 24 and r.no_local_endpoints_external == 1 and r.no_local_endpoints_internal == 0
    assert r.full_sync and r.changed_services == 6 and r.stale_text == ""


def test_overall_comparison_can_fail():
    """The normal form is sensitive to one missing element, one changed rule, one rule
    moved within its chain."""
    fp = FakeProxier()
    fp.sync(overall_objects())
    dump = fp.nft.dump()
    expected = (VECTORS / "expected.txt").read_text()
    for broken in (
        expected.replace('add element ip kube-proxy cluster-ips { 172.30.0.46 }\n', ""),
        expected.replace("ip saddr != 10.0.0.0/8 jump", "ip saddr != 10.0.0.0/16 jump", 1),
        expected.replace(
            "add rule ip kube-proxy masquerading mark set mark xor 0x4000\nadd rule ip kube-proxy masquerading masquerade fully-random",
            "add rule ip kube-proxy masquerading masquerade fully-random\nadd rule ip kube-proxy masquerading mark set mark xor 0x4000",
        ),
    ):
        assert broken != expected
        assert sort_nftables_transaction(broken) != sort_nftables_transaction(dump)


def test_overall_transaction_is_nft_input():
    """The text is what ``nft -f`` gets: knftables' one-command-per-line syntax, numeric
    base-chain priorities, the base chains added then deleted once on the first sync."""
    r = render_nftables_sync(*build_maps(overall_objects()), fake_config())
    lines = r.text.splitlines()
    assert lines[0] == 'add table ip kube-proxy { comment "rules for kube-proxy" ; }'
    assert lines[1:3] == ["add chain ip kube-proxy filter-prerouting-pre-dnat", "delete chain ip kube-proxy filter-prerouting-pre-dnat"]
    assert "add chain ip kube-proxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }" in lines
    assert "add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }" in lines
    assert all(ln.split(" ")[0] in ("add", "flush", "delete") and ln.split(" ")[2:4] == ["ip", "kube-proxy"] for ln in lines)
    assert r.operations == len(lines)
    # a kube-proxy that already set up its base chains does not add+delete them again
    again = render_nftables_sync(*build_maps(overall_objects()), fake_config(), flushed=True)
    assert "delete chain" not in again.text and again.operations == r.operations - 16


def test_no_services_is_base_rules():
    """``TestProxyInUserns``-style: a sync with nothing to proxy leaves exactly baseRules."""
    expected = (VECTORS / "expected.txt").read_text().split("# svc1")[0]
    fp = FakeProxier()
    fp.sync([])
    assert_nftables_equal(expected, fp.nft.dump())


def test_default_mark_and_match_all_nodeports():
    """kube-proxy's own mark formatting, and ``--nodeport-addresses`` unset (match all):
    ``fib daddr type local`` with localhost excluded, the nodeport-ips set deleted."""
    cfg = fake_config(masquerade_mark=None, nodeport_addresses=())
    assert cfg.mark == "0x00004000"
    fake = FakeNFTables()
    text = render_nftables_sync({}, {}, cfg).text
    assert "add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }\n" \
           "delete set ip kube-proxy nodeport-ips\n" in text
    fake.apply(text)
    dump = fake.dump()
    assert "nodeport-ips" not in dump
    assert "add rule ip kube-proxy mark-for-masquerade mark set mark or 0x00004000\n" in dump
    assert "add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n" in dump
    assert "add rule ip kube-proxy nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports\n" in dump
    # the same config twice: the set is added and deleted again (add+delete never fails)
    fake.apply(render_nftables_sync({}, {}, cfg, kernel=fake.kernel_state(), flushed=True).text)


def test_no_local_detector_and_no_service_cidrs():
    objs = [service("ns1", "svc1", cluster_ip="172.30.0.41", ports=[port("p80", 80)]),
            eslice("ns1", "svc1", [ep("10.180.0.1")], [eport("p80", 80)])]
    text = render_nftables_sync(*build_maps(objs), fake_config(cluster_cidr=None, service_cidrs=())).text
    assert "saddr != 10.0.0.0/8" not in text and "Drop traffic to unallocated ClusterIPs" not in text
    text = render_nftables_sync(*build_maps(objs), fake_config(masquerade_all=True)).text
    assert "add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 jump mark-for-masquerade\n" in text


# --- names --------------------------------------------------------------------------------


def h8(s: str) -> str:
    """Independent copy of kube-proxy's hash (sha256, base32, 8 chars)."""
    return base64.b32encode(hashlib.sha256(s.encode()).digest()).decode()[:8]


@pytest.mark.parametrize("name, want", [
    ("ns1/svc1/tcp/p80", "ULMVA6XW"),
    ("ns5/svc5/tcp/p80", "HVFWP5L3"),
    ("ns2/svc2/tcp/p8080", "MHHHYRWA"),
    ("ns1/svc1/tcp/p80__10.180.0.1/80", "5OJB2KTY"),
    ("ns2/svc2/tcp/p80__10.180.0.2/80", "SGOXE6O3"),
])
def test_chain_name_hashes(name, want):
    assert hash_and_truncate(name) == f"{want}-{name}" == f"{h8(name)}-{name}"


def test_ipv6_endpoint_chain_and_truncation():
    spn = ServicePortName("ns1", "svc1", "p80", "TCP")
    assert service_port_endpoint_chain_name_base(spn, "tcp", "[fd00:10:180::1]:80") == hash_and_truncate(
        "ns1/svc1/tcp/p80__fd00.10.180..1/80"
    )
    long = "x" * 300
    out = hash_and_truncate(long)
    assert len(out) == 240 and out.endswith("...") and out.startswith(h8(long) + "-")
    assert is_service_chain_name("service-ULMVA6XW-ns1/svc1/tcp/p80") and not is_service_chain_name("services")


# --- TestSyncProxyRulesRepeated -------------------------------------------------------------

BASE_RULES = (VECTORS / "expected.txt").read_text().split("# svc1")[0]

SVC1 = """
add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5TPGNJF2-ns1/svc1/tcp/p80__10.0.1.1/80 }
add chain ip kube-proxy endpoint-5TPGNJF2-ns1/svc1/tcp/p80__10.0.1.1/80
add rule ip kube-proxy endpoint-5TPGNJF2-ns1/svc1/tcp/p80__10.0.1.1/80 ip saddr 10.0.1.1 jump mark-for-masquerade
add rule ip kube-proxy endpoint-5TPGNJF2-ns1/svc1/tcp/p80__10.0.1.1/80 meta l4proto tcp dnat to 10.0.1.1:80
"""
SVC2 = """
add chain ip kube-proxy service-MHHHYRWA-ns2/svc2/tcp/p8080
add rule ip kube-proxy service-MHHHYRWA-ns2/svc2/tcp/p8080 ip daddr 172.30.0.42 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-MHHHYRWA-ns2/svc2/tcp/p8080 numgen random mod 1 vmap { 0 : goto endpoint-7RVP4LUQ-ns2/svc2/tcp/p8080__10.0.2.1/8080 }
add chain ip kube-proxy endpoint-7RVP4LUQ-ns2/svc2/tcp/p8080__10.0.2.1/8080
add rule ip kube-proxy endpoint-7RVP4LUQ-ns2/svc2/tcp/p8080__10.0.2.1/8080 ip saddr 10.0.2.1 jump mark-for-masquerade
add rule ip kube-proxy endpoint-7RVP4LUQ-ns2/svc2/tcp/p8080__10.0.2.1/8080 meta l4proto tcp dnat to 10.0.2.1:8080
"""
SVC3 = """
add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 ip daddr 172.30.0.43 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-2OCDJSZQ-ns3/svc3/tcp/p80__10.0.3.1/80 }
add chain ip kube-proxy endpoint-2OCDJSZQ-ns3/svc3/tcp/p80__10.0.3.1/80
add rule ip kube-proxy endpoint-2OCDJSZQ-ns3/svc3/tcp/p80__10.0.3.1/80 ip saddr 10.0.3.1 jump mark-for-masquerade
add rule ip kube-proxy endpoint-2OCDJSZQ-ns3/svc3/tcp/p80__10.0.3.1/80 meta l4proto tcp dnat to 10.0.3.1:80
"""
SVC3_MOVED = """
add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 ip daddr 172.30.0.43 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80 }
add chain ip kube-proxy endpoint-2OCDJSZQ-ns3/svc3/tcp/p80__10.0.3.1/80
add chain ip kube-proxy endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80
add rule ip kube-proxy endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80 ip saddr 10.0.3.2 jump mark-for-masquerade
add rule ip kube-proxy endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80 meta l4proto tcp dnat to 10.0.3.2:80
"""
SVC3_TWO = """
add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 ip daddr 172.30.0.43 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 numgen random mod 2 vmap { 0 : goto endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80 , 1 : goto endpoint-TQ2QKHCZ-ns3/svc3/tcp/p80__10.0.3.3/80 }
add chain ip kube-proxy endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80
add rule ip kube-proxy endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80 ip saddr 10.0.3.2 jump mark-for-masquerade
add rule ip kube-proxy endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80 meta l4proto tcp dnat to 10.0.3.2:80
add chain ip kube-proxy endpoint-TQ2QKHCZ-ns3/svc3/tcp/p80__10.0.3.3/80
add rule ip kube-proxy endpoint-TQ2QKHCZ-ns3/svc3/tcp/p80__10.0.3.3/80 ip saddr 10.0.3.3 jump mark-for-masquerade
add rule ip kube-proxy endpoint-TQ2QKHCZ-ns3/svc3/tcp/p80__10.0.3.3/80 meta l4proto tcp dnat to 10.0.3.3:80
"""
SVC4 = """
add chain ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80
add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 ip daddr 172.30.0.44 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-WAHRBT2B-ns4/svc4/tcp/p80__10.0.4.1/80 }
add chain ip kube-proxy endpoint-WAHRBT2B-ns4/svc4/tcp/p80__10.0.4.1/80
add rule ip kube-proxy endpoint-WAHRBT2B-ns4/svc4/tcp/p80__10.0.4.1/80 ip saddr 10.0.4.1 jump mark-for-masquerade
add rule ip kube-proxy endpoint-WAHRBT2B-ns4/svc4/tcp/p80__10.0.4.1/80 meta l4proto tcp dnat to 10.0.4.1:80
"""


def elements(*lines: str) -> str:
    return "\n" + "\n".join(f"add element ip kube-proxy {ln}" for ln in lines) + "\n"


CIP = "cluster-ips {{ 172.30.0.{} }}".format
SIP = {
    1: "service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }",
    2: "service-ips { 172.30.0.42 . tcp . 8080 : goto service-MHHHYRWA-ns2/svc2/tcp/p8080 }",
    3: "service-ips { 172.30.0.43 . tcp . 80 : goto service-4AT6LBPK-ns3/svc3/tcp/p80 }",
    4: "service-ips { 172.30.0.44 . tcp . 80 : goto service-LAUZTJTB-ns4/svc4/tcp/p80 }",
}


def cip_svc(ns, name, ip, port_name, number):
    return service(ns, name, cluster_ip=ip, type="ClusterIP", ports=[port(port_name, number)])


def test_sync_proxy_rules_repeated():
    """``TestSyncProxyRulesRepeated``: full then partial syncs, the dump after each and
    the number of operations of each sync's transaction."""
    fp = FakeProxier()
    svc1 = cip_svc("ns1", "svc1", "172.30.0.41", "p80", 80)
    svc2 = cip_svc("ns2", "svc2", "172.30.0.42", "p8080", 8080)
    svc3 = cip_svc("ns3", "svc3", "172.30.0.43", "p80", 80)
    svc4 = cip_svc("ns4", "svc4", "172.30.0.44", "p80", 80)
    eps1 = eslice("ns1", "svc1", [ep("10.0.1.1")], [eport("p80", 80)])
    eps2 = eslice("ns2", "svc2", [ep("10.0.2.1")], [eport("p8080", 8080)])
    eps3 = eslice("ns3", "svc3", [ep("10.0.3.1")], [eport("p80", 80)])
    eps3_moved = eslice("ns3", "svc3", [ep("10.0.3.2")], [eport("p80", 80)])
    eps3_two = eslice("ns3", "svc3", [ep("10.0.3.2"), ep("10.0.3.3")], [eport("p80", 80)])
    eps3_empty = eslice("ns3", "svc3", [], [eport("p80", 80)])
    eps4 = eslice("ns4", "svc4", [ep("10.0.4.1")], [eport("p80", 80)])

    fp.sync([svc1, svc2, eps1, eps2])
    assert_nftables_equal(BASE_RULES + elements(CIP(41), CIP(42), SIP[1], SIP[2]) + SVC1 + SVC2, fp.nft.dump())

    # Add a new service and its endpoints.
    fp.sync([svc1, svc2, svc3, eps1, eps2, eps3])
    assert_nftables_equal(BASE_RULES + elements(CIP(41), CIP(42), CIP(43), SIP[1], SIP[2], SIP[3]) + SVC1 + SVC2 + SVC3, fp.nft.dump())
    assert fp.nft.last_operations == 10  # 2 elements; add+flush 2 chains, 2 rules each

    # Delete a service; its chains are flushed, not deleted yet.
    fp.sync([svc1, svc3, eps1, eps2, eps3])
    assert_nftables_equal(
        BASE_RULES + elements(CIP(41), CIP(43), SIP[1], SIP[3]) + SVC1
        + "add chain ip kube-proxy service-MHHHYRWA-ns2/svc2/tcp/p8080\n"
        + "add chain ip kube-proxy endpoint-7RVP4LUQ-ns2/svc2/tcp/p8080__10.0.2.1/8080\n" + SVC3,
        fp.nft.dump(),
    )
    assert fp.nft.last_operations == 4  # delete 2 elements, flush 2 chains

    # Time passes; the stale chains are deleted in their own transaction.
    fp.age_stale_chains()
    fp.sync([svc1, svc3, eps1, eps2, eps3])
    after_delete = BASE_RULES + elements(CIP(41), CIP(43), SIP[1], SIP[3]) + SVC1 + SVC3
    assert_nftables_equal(after_delete, fp.nft.dump())
    assert fp.result.deleted_chains and fp.nft.last_operations == 0

    # Add a service, sync, then add its endpoints.
    fp.sync([svc1, svc3, svc4, eps1, eps2, eps3])
    assert_nftables_equal(
        BASE_RULES + elements(CIP(41), CIP(43), CIP(44), SIP[1], SIP[3]) + SVC1 + SVC3
        + elements('no-endpoint-services { 172.30.0.44 . tcp . 80 comment "ns4/svc4:p80" : goto reject-chain }'),
        fp.nft.dump(),
    )
    assert fp.nft.last_operations == 2
    fp.sync([svc1, svc3, svc4, eps1, eps2, eps3, eps4])
    assert_nftables_equal(
        BASE_RULES + elements(CIP(41), CIP(43), CIP(44), SIP[1], SIP[3], SIP[4]) + SVC1 + SVC3 + SVC4, fp.nft.dump()
    )
    assert fp.nft.last_operations == 10

    # Change an endpoint of an existing service: the old endpoint chain stays (flushed).
    fp.sync([svc1, svc3, svc4, eps1, eps2, eps3_moved, eps4])
    assert_nftables_equal(
        BASE_RULES + elements(CIP(41), CIP(43), CIP(44), SIP[1], SIP[3], SIP[4]) + SVC1 + SVC3_MOVED + SVC4, fp.nft.dump()
    )
    assert fp.nft.last_operations == 9

    # (the old svc3 endpoint chain goes in the next sync) Add an endpoint to a service.
    fp.age_stale_chains()
    fp.sync([svc1, svc3, svc4, eps1, eps2, eps3_two, eps4])
    two = BASE_RULES + elements(CIP(41), CIP(43), CIP(44), SIP[1], SIP[3], SIP[4]) + SVC1 + SVC3_TWO + SVC4
    assert_nftables_equal(two, fp.nft.dump())
    assert fp.nft.last_operations == 12

    # Empty a service's endpoints; its chains are flushed, not deleted.
    fp.sync([svc1, svc3, svc4, eps1, eps2, eps3_empty, eps4])
    assert_nftables_equal(
        BASE_RULES + elements(CIP(41), CIP(43), CIP(44), SIP[1],
                              'no-endpoint-services { 172.30.0.43 . tcp . 80 comment "ns3/svc3:p80" : goto reject-chain }', SIP[4])
        + SVC1
        + "add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80\n"
        + "add chain ip kube-proxy endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80\n"
        + "add chain ip kube-proxy endpoint-TQ2QKHCZ-ns3/svc3/tcp/p80__10.0.3.3/80\n"
        + SVC4,
        fp.nft.dump(),
    )
    assert fp.nft.last_operations == 5
    assert set(fp.stale) == {
        "service-4AT6LBPK-ns3/svc3/tcp/p80",
        "endpoint-SWWHDC7X-ns3/svc3/tcp/p80__10.0.3.2/80",
        "endpoint-TQ2QKHCZ-ns3/svc3/tcp/p80__10.0.3.3/80",
    }

    # Restore the endpoints at once: the chains come back and are no longer stale.
    fp.sync([svc1, svc3, svc4, eps1, eps2, eps3_two, eps4])
    assert_nftables_equal(two, fp.nft.dump())
    assert fp.nft.last_operations == 14
    assert fp.stale == {}

    # Empty and restore after the stale chains aged: deleted, then recreated.
    fp.sync([svc1, svc3, svc4, eps1, eps2, eps3_empty, eps4])
    fp.age_stale_chains()
    fp.sync([svc1, svc3, svc4, eps1, eps2, eps3_two, eps4])
    assert fp.result.deleted_chains
    assert_nftables_equal(two, fp.nft.dump())

    # A sync with no changes: same rules, an empty transaction.
    fp.sync([svc1, svc3, svc4, eps1, eps2, eps3_two, eps4])
    assert_nftables_equal(two, fp.nft.dump())
    assert fp.nft.last_operations == 0 and fp.result.text == ""


def test_stale_chains_need_one_second():
    text, remaining, deleted = stale_chain_deletions({"a/x": 10.0, "b/y": 10.5}, 11.2)
    assert text == "delete chain ip kube-proxy a/x\n" and remaining == {"b/y": 10.5} and deleted == ("a/x",)
    assert stale_chain_deletions({"a/x": 10.0}, 11.0)[0] == ""  # not strictly before now-1s


def test_sync_proxy_rules_startup():
    """``TestSyncProxyRulesStartup``: a restarted kube-proxy keeps the endpoint chains it
    finds and adds only the missing set/map elements."""
    setup_ops = FakeProxier().sync([]).operations
    fake = FakeNFTables()
    fake.parse_dump(BASE_RULES + """
add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
add chain ip kube-proxy endpoint-5TPGNJF2-ns1/svc1/tcp/p80__10.0.1.1/80
add chain ip kube-proxy service-MHHHYRWA-ns2/svc2/tcp/p8080
add chain ip kube-proxy endpoint-7RVP4LUQ-ns2/svc2/tcp/p8080__10.0.2.1/8080
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5TPGNJF2-ns1/svc1/tcp/p80__10.0.1.1/80 }
add rule ip kube-proxy endpoint-5TPGNJF2-ns1/svc1/tcp/p80__10.0.1.1/80 ip saddr 10.0.1.1 jump mark-for-masquerade
add rule ip kube-proxy endpoint-5TPGNJF2-ns1/svc1/tcp/p80__10.0.1.1/80 meta l4proto tcp dnat to 10.0.1.1:80
add rule ip kube-proxy service-MHHHYRWA-ns2/svc2/tcp/p8080 ip daddr 172.30.0.42 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-MHHHYRWA-ns2/svc2/tcp/p8080 numgen random mod 1 vmap { 0 : goto endpoint-7RVP4LUQ-ns2/svc2/tcp/p8080__10.0.2.1/8080 }
add rule ip kube-proxy endpoint-7RVP4LUQ-ns2/svc2/tcp/p8080__10.0.2.1/8080 ip saddr 10.0.2.1 jump mark-for-masquerade
add rule ip kube-proxy endpoint-7RVP4LUQ-ns2/svc2/tcp/p8080__10.0.2.1/8080 meta l4proto tcp dnat to 10.0.2.1:8080
add element ip kube-proxy cluster-ips { 172.30.0.41 }
add element ip kube-proxy cluster-ips { 172.30.0.42 }
add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }
add element ip kube-proxy service-ips { 172.30.0.42 . tcp . 8080 : goto service-MHHHYRWA-ns2/svc2/tcp/p8080 }
""")
    fp = FakeProxier(fake=fake)
    fp.sync([
        cip_svc("ns1", "svc1", "172.30.0.41", "p80", 80),
        cip_svc("ns2", "svc2", "172.30.0.42", "p8080", 8080),
        cip_svc("ns3", "svc3", "172.30.0.43", "p80", 80),
        eslice("ns1", "svc1", [ep("10.0.1.1"), ep("10.0.1.2")], [eport("p80", 80)]),
        eslice("ns2", "svc2", [ep("10.0.2.1")], [eport("p8080", 8080)]),
    ])
    assert_nftables_equal(
        BASE_RULES + elements(CIP(41), CIP(42), CIP(43), SIP[1], SIP[2],
                              'no-endpoint-services { 172.30.0.43 . tcp . 80 comment "ns3/svc3:p80" : goto reject-chain }')
        + """
add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 2 vmap { 0 : goto endpoint-5TPGNJF2-ns1/svc1/tcp/p80__10.0.1.1/80 , 1 : goto endpoint-ZCZBVNAZ-ns1/svc1/tcp/p80__10.0.1.2/80 }
add chain ip kube-proxy endpoint-5TPGNJF2-ns1/svc1/tcp/p80__10.0.1.1/80
add rule ip kube-proxy endpoint-5TPGNJF2-ns1/svc1/tcp/p80__10.0.1.1/80 ip saddr 10.0.1.1 jump mark-for-masquerade
add rule ip kube-proxy endpoint-5TPGNJF2-ns1/svc1/tcp/p80__10.0.1.1/80 meta l4proto tcp dnat to 10.0.1.1:80
add chain ip kube-proxy endpoint-ZCZBVNAZ-ns1/svc1/tcp/p80__10.0.1.2/80
add rule ip kube-proxy endpoint-ZCZBVNAZ-ns1/svc1/tcp/p80__10.0.1.2/80 ip saddr 10.0.1.2 jump mark-for-masquerade
add rule ip kube-proxy endpoint-ZCZBVNAZ-ns1/svc1/tcp/p80__10.0.1.2/80 meta l4proto tcp dnat to 10.0.1.2:80
""" + SVC2,
        fp.nft.dump(),
    )
    assert fp.nft.last_operations == setup_ops + 14


def test_partial_sync_leaves_unchanged_services_alone():
    fp = FakeProxier()
    objs = overall_objects()
    fp.sync(objs)
    full = fp.result
    # no change at all: nothing to do
    r = fp.sync(objs)
    assert not r.full_sync and r.text == "" and r.changed_services == 0
    assert (r.nat_rules, r.filter_rules, r.elements) == (full.nat_rules, full.filter_rules, full.elements)
    # ns4/svc4 loses its local endpoint: only its chains are touched
    objs2 = [o for o in objs if not (o["kind"] == "EndpointSlice" and o["metadata"]["name"] == "svc4-1")]
    objs2.append(eslice("ns4", "svc4", [ep("10.180.0.4")], [eport("p80", 80)]))
    r = fp.sync(objs2)
    touched = {ln.split(" ")[4] for ln in r.text.splitlines() if ln.split(" ")[1] in ("chain", "rule")}
    assert touched and all("ns4/svc4" in c for c in touched), touched
    assert r.flushed_chains == ("endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80",)
    assert r.nat_rules == full.nat_rules - 2  # one endpoint chain emptied; the numgen rule stays
    assert r.nat_rules + r.filter_rules == fp.nft.rule_count()


def test_session_affinity_sets_follow_the_service():
    svc = service("ns1", "svc1", cluster_ip="172.30.0.41", ports=[port("p80", 80)],
                  sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}})
    plain = service("ns1", "svc1", cluster_ip="172.30.0.41", ports=[port("p80", 80)])
    eps = eslice("ns1", "svc1", [ep("10.180.0.1"), ep("10.180.0.2")], [eport("p80", 80)])
    fp = FakeProxier()
    fp.sync([svc, eps])
    dump = fp.nft.dump()
    sets = [ln for ln in dump.splitlines() if ln.startswith("add set ip kube-proxy affinity-")]
    assert len(sets) == 2 and all(ln.endswith("{ type ipv4_addr ; flags dynamic,timeout ; timeout 600s ; }") for ln in sets)
    chain = "service-ULMVA6XW-ns1/svc1/tcp/p80"
    rules = [ln.split(chain + " ", 1)[1] for ln in dump.splitlines() if ln.startswith(f"add rule ip kube-proxy {chain} ")]
    aff1 = hash_and_truncate("ns1/svc1/tcp/p80__10.180.0.1/80")
    aff2 = hash_and_truncate("ns1/svc1/tcp/p80__10.180.0.2/80")
    assert rules == [
        "ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
        f"ip saddr @affinity-{aff1} goto endpoint-{aff1}",
        f"ip saddr @affinity-{aff2} goto endpoint-{aff2}",
        f"numgen random mod 2 vmap {{ 0 : goto endpoint-{aff1} , 1 : goto endpoint-{aff2} }}",
    ]
    # a partial sync of the unchanged Service re-adds nothing; dropping affinity deletes the sets
    assert fp.sync([svc, eps]).text == ""
    r = fp.sync([plain, eps])
    assert f"delete set ip kube-proxy affinity-{aff1}" in r.text
    assert "affinity-" not in fp.nft.dump()


def test_elements_are_reconciled_one_by_one():
    """nftElementStorage: a changed verdict is deleted then added; leftovers deleted."""
    fp = FakeProxier()
    svc = service("ns1", "svc1", cluster_ip="172.30.0.41", type="NodePort", ports=[port("p80", 80, node_port=3001)])
    fp.sync([svc])
    assert 'no-endpoint-nodeports { tcp . 3001 comment "ns1/svc1:p80" : goto reject-chain }' in fp.nft.dump()
    r = fp.sync([svc, eslice("ns1", "svc1", [ep("10.180.0.1")], [eport("p80", 80)])])
    elems = [ln for ln in r.text.splitlines() if " element " in ln]
    assert elems == [
        "add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }",
        "add element ip kube-proxy service-nodeports { tcp . 3001 : goto external-ULMVA6XW-ns1/svc1/tcp/p80 }",
        "delete element ip kube-proxy no-endpoint-services { 172.30.0.41 . tcp . 80 }",
        "delete element ip kube-proxy no-endpoint-nodeports { tcp . 3001 }",
    ]
    # the same key with another verdict: delete + add (nft refuses to overwrite)
    storage = KernelState(chains=frozenset(), sets=frozenset(), elements={"no-endpoint-services": {"172.30.0.41 . tcp . 80": "drop"}})
    r = render_nftables_sync(*build_maps([svc]), fake_config(), changed=set(), kernel=storage)
    assert "delete element ip kube-proxy no-endpoint-services { 172.30.0.41 . tcp . 80 }\n" \
           'add element ip kube-proxy no-endpoint-services { 172.30.0.41 . tcp . 80 comment "ns1/svc1:p80" : goto reject-chain }\n' in r.text


def test_fake_refuses_what_nft_refuses():
    fake = FakeNFTables()
    fake.apply(render_nftables_sync({}, {}, fake_config()).text)
    before = fake.dump()
    for bad in (
        "add rule ip kube-proxy no-such-chain drop",
        "add rule ip kube-proxy services jump no-such-chain",
        "delete chain ip kube-proxy services",  # still a jump target
        "delete element ip kube-proxy service-ips { 1.2.3.4 . tcp . 80 }",
        "add element ip kube-proxy cluster-ips { 1.2.3.4 }\nflush chain ip kube-proxy nope",  # atomic
    ):
        with pytest.raises(NFTError):
            fake.apply(bad)
        assert fake.dump() == before


# --- the kernel's listings ------------------------------------------------------------------

NFT_JSON_MAPS = json.dumps({"nftables": [
    {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
    {"map": {"family": "ip", "name": "service-ips", "table": "kube-proxy", "type": ["ipv4_addr", "inet_proto", "inet_service"],
             "handle": 12, "map": "verdict",
             "elem": [[{"concat": ["172.30.0.41", "tcp", 80]}, {"goto": {"target": "service-ULMVA6XW-ns1/svc1/tcp/p80"}}]]}},
    {"map": {"family": "ip", "name": "no-endpoint-services", "table": "kube-proxy", "handle": 13, "map": "verdict",
             "type": ["ipv4_addr", "inet_proto", "inet_service"],
             "elem": [[{"elem": {"val": {"concat": ["1.2.3.4", "tcp", 80]}, "comment": "ns2/svc2:p80"}}, {"drop": None}]]}},
    {"map": {"family": "ip", "name": "other", "table": "someone-else", "handle": 1, "map": "verdict", "type": "ipv4_addr",
             "elem": [["9.9.9.9", {"drop": None}]]}},
]})
NFT_JSON_SETS = json.dumps({"nftables": [
    {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
    {"set": {"family": "ip", "name": "cluster-ips", "table": "kube-proxy", "type": "ipv4_addr", "handle": 11, "elem": ["172.30.0.41"]}},
    {"set": {"family": "ip", "name": "affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80", "table": "kube-proxy",
             "type": "ipv4_addr", "handle": 22, "size": 65535, "flags": ["timeout"], "timeout": 10800}},
]})
NFT_JSON_CHAINS = json.dumps({"nftables": [
    {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
    {"chain": {"family": "ip", "table": "kube-proxy", "name": "services", "handle": 18}},
    {"chain": {"family": "ip", "table": "kube-proxy", "name": "service-ULMVA6XW-ns1/svc1/tcp/p80", "handle": 26}},
]})


def test_kernel_state_from_nft_json():
    """The shapes ``nft -j list chains/sets/maps ip`` print (nft 1.0.6)."""
    ks = kernel_state_from_nft_json(NFT_JSON_CHAINS, NFT_JSON_SETS, NFT_JSON_MAPS)
    assert ks.chains == {"services", "service-ULMVA6XW-ns1/svc1/tcp/p80"}
    assert ks.sets == {"cluster-ips", "affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80"}
    assert ks.elements["service-ips"] == {"172.30.0.41 . tcp . 80": "goto service-ULMVA6XW-ns1/svc1/tcp/p80"}
    assert ks.elements["no-endpoint-services"] == {"1.2.3.4 . tcp . 80": "drop"}
    assert ks.elements["cluster-ips"] == {"172.30.0.41": ""}
    assert "other" not in ks.elements
    # no table: kube-proxy's listing fails; nothing is known
    empty = kernel_state_from_nft_json(json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}]}))
    assert empty.chains is None and empty.sets is None and empty.elements == {}


NFT_LIST = """table ip kube-proxy {
	comment "rules for kube-proxy"
	set cluster-ips {
		type ipv4_addr
		comment "Active ClusterIPs"
		elements = { 172.30.0.41, 172.30.0.45 }
	}

	map no-endpoint-services {
		type ipv4_addr . inet_proto . inet_service : verdict
		comment "vmap to drop or reject packets to services with no endpoints"
		elements = { 1.2.3.4 . tcp . 80 comment "ns2/svc2:p80" : drop,
			     172.30.0.46 . tcp . 80 comment "ns6/svc6:p80" : goto reject-chain }
	}

	set affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 {
		type ipv4_addr
		size 65535
		flags dynamic,timeout
		timeout 3h
	}

	chain filter-prerouting-pre-dnat {
		type filter hook prerouting priority dstnat - 10; policy accept;
		ct state new jump firewall-check
	}

	chain filter-output-pre-dnat {
		type filter hook output priority -110; policy accept;
	}

	chain nat-postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		jump masquerading
	}

	chain reject-chain {
		comment "helper for @no-endpoint-services / @no-endpoint-nodeports"
		reject
	}

	chain mark-for-masquerade {
		meta mark set meta mark | 0x00004000
	}

	chain masquerading {
		meta mark & 0x00004000 == 0x00000000 return
		meta mark set meta mark ^ 0x00004000
		masquerade fully-random
	}

	chain cluster-ips-check {
		ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
		ip daddr 172.30.0.0/16 drop comment "Drop traffic to unallocated ClusterIPs"
	}

	chain firewall-check {
	}

	chain masquerading2 {
		numgen random mod 2 vmap { 0 : goto reject-chain, 1 : goto firewall-check }
	}

	chain firewall-HVFWP5L3-ns5/svc5/tcp/p80 {
		ip saddr != { 5.6.7.8, 203.0.113.0/25 } drop
	}
}
"""


def test_dump_from_nft_list_maps_nft_syntax_back():
    """What nft 1.0.6 prints (captured from this kernel) in kube-proxy's own syntax."""
    dump = dump_from_nft_list(NFT_LIST)
    lines = dump.splitlines()
    assert lines[0] == 'add table ip kube-proxy { comment "rules for kube-proxy" ; }'
    for want in (
        "add chain ip kube-proxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }",
        "add chain ip kube-proxy filter-output-pre-dnat { type filter hook output priority -110 ; }",
        "add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }",
        'add chain ip kube-proxy reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }',
        "add rule ip kube-proxy reject-chain reject",
        "add rule ip kube-proxy mark-for-masquerade mark set mark or 0x00004000",
        "add rule ip kube-proxy masquerading mark and 0x00004000 == 0 return",
        "add rule ip kube-proxy masquerading mark set mark xor 0x00004000",
        'add rule ip kube-proxy cluster-ips-check ip daddr { 172.30.0.0/16 } drop comment "Drop traffic to unallocated ClusterIPs"',
        "add rule ip kube-proxy masquerading2 numgen random mod 2 vmap { 0 : goto reject-chain , 1 : goto firewall-check }",
        "add rule ip kube-proxy firewall-HVFWP5L3-ns5/svc5/tcp/p80 ip saddr != { 5.6.7.8 , 203.0.113.0/25 } drop",
        "add set ip kube-proxy affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 { type ipv4_addr ; flags dynamic,timeout ; timeout 10800s ; }",
        "add element ip kube-proxy cluster-ips { 172.30.0.45 }",
        'add element ip kube-proxy no-endpoint-services { 172.30.0.46 . tcp . 80 comment "ns6/svc6:p80" : goto reject-chain }',
        "add chain ip kube-proxy firewall-check",
    ):
        assert want in lines, want
    # and it loads into the fake (every reference resolves)
    fake = FakeNFTables()
    fake.parse_dump(dump.replace("add rule ip kube-proxy filter-prerouting-pre-dnat ct state new jump firewall-check\n", ""))


def test_normal_form_of_transaction_and_dump_agree():
    r = render_nftables_sync(*build_maps(overall_objects()), fake_config())
    fake = FakeNFTables()
    fake.apply(r.text)
    assert normal_form(r.text) == normal_form(fake.dump()) == sort_nftables_transaction(fake.dump())


# --- packet flows: port of kube-proxy's nftables tracePacket / runPacketFlowTests ----------

_IGNORED = re.compile(r' *comment "[^"]*"$|^ct state new')
_R = {k: re.compile(v) for k, v in {
    "dest_addr": r"^ip6* daddr (!= )?(\S+)",
    "dest_addr_lookup": r"^ip6* daddr (!= )?\{([^}]*)\}",
    "dest_local": r"^fib daddr type local",
    "dest_port": r"^(tcp|udp|sctp) dport (\d+)",
    "dest_ip_only_lookup": r"^ip6* daddr @(\S+)",
    "dest_lookup": r"^ip6* daddr \. meta l4proto \. th dport @(\S+)",
    "dest_dispatch": r"^ip6* daddr \. meta l4proto \. th dport vmap @(\S+)$",
    "dest_port_dispatch": r"^meta l4proto \. th dport vmap @(\S+)$",
    "source_addr": r"^ip6* saddr (!= )?(\S+)",
    "source_addr_lookup": r"^ip6* saddr (!= )?\{([^}]*)\}",
    "source_local": r"^fib saddr type local",
    "endpoint_vmap": r"^numgen random mod \d+ vmap \{(.*)\}$",
    "masquerade": r"^jump mark-for-masquerade$",
    "jump": r"^(jump|goto) (\S+)$",
    "return": r"^return$",
    "verdict": r"^(drop|reject)$",
    "dnat": r"^meta l4proto (tcp|udp|sctp) dnat to (\S+)$",
}.items()}
_VMAP_ENTRY = re.compile(r"\d+ : goto (\S+)")


def _address_matches(ip: str, want: bool, rule_address: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if "/" in rule_address:
        net = ipaddress.ip_network(rule_address, strict=False)
        match = addr.version == net.version and addr in net
    else:
        match = addr == ipaddress.ip_address(rule_address)
    return match == want


def _address_matches_set(ip: str, want: bool, text: str) -> bool:
    for address in text.replace(" ", "").split(","):
        if _address_matches(ip, True, address) != want:
            return False
    return True


class NFTablesTracer:
    """``nftablesTracer`` over a :class:`FakeNFTables`."""

    def __init__(self, fake: FakeNFTables, node_ips):
        self.fake = fake
        self.node_ips = set(node_ips)
        self.matches: list[str] = []
        self.outputs: list[str] = []
        self.mark_masq = False

    def elements(self, name):
        return self.fake.sets[name].elements if name in self.fake.sets else {}

    def run_chain(self, chain, src, proto, dst, dport) -> bool:
        ch = self.fake.chains.get(chain)
        assert ch is not None, f"unknown chain {chain}"
        for rule_obj in ch.rules:
            rule = _IGNORED.sub("", rule_obj)
            while rule:
                rule = rule.lstrip(" ")
                m = None

                def take(name):
                    nonlocal m
                    m = _R[name].match(rule)
                    return m is not None

                if take("dest_ip_only_lookup"):
                    rule = rule[m.end():]
                    if not any(k.split(" . ")[0] == dst for k in self.elements(m.group(1))):
                        rule = ""
                elif take("dest_lookup"):
                    rule = rule[m.end():]
                    if f"{dst} . {proto} . {dport}" not in self.elements(m.group(1)):
                        rule = ""
                elif take("dest_dispatch"):
                    value = self.elements(m.group(1)).get(f"{dst} . {proto} . {dport}")
                    rule = value[0] if value else ""
                elif take("dest_port_dispatch"):
                    value = self.elements(m.group(1)).get(f"{proto} . {dport}")
                    rule = value[0] if value else ""
                elif take("dest_addr_lookup"):
                    rule = rule[m.end():]
                    if not _address_matches_set(dst, m.group(1) != "!= ", m.group(2)):
                        rule = ""
                elif take("dest_addr"):
                    rule = rule[m.end():]
                    if not _address_matches(dst, m.group(1) != "!= ", m.group(2)):
                        rule = ""
                elif take("dest_local"):
                    rule = rule[m.end():]
                    if dst not in self.node_ips:
                        rule = ""
                elif take("dest_port"):
                    rule = rule[m.end():]
                    if proto != m.group(1) or dport != m.group(2):
                        rule = ""
                elif take("source_addr_lookup"):
                    rule = rule[m.end():]
                    if not _address_matches_set(src, m.group(1) != "!= ", m.group(2)):
                        rule = ""
                elif take("source_addr"):
                    rule = rule[m.end():]
                    if not _address_matches(src, m.group(1) != "!= ", m.group(2)):
                        rule = ""
                elif take("source_local"):
                    rule = rule[m.end():]
                    if src not in self.node_ips:
                        rule = ""
                elif take("masquerade"):
                    rule = rule[m.end():]
                    self.matches.append(rule_obj)
                    self.mark_masq = True
                elif take("jump"):
                    rule = rule[m.end():]
                    self.matches.append(rule_obj)
                    if self.run_chain(m.group(2), src, proto, dst, dport):
                        return True
                    if m.group(1) == "goto":
                        return False
                elif take("verdict"):
                    self.matches.append(rule_obj)
                    self.outputs.append(m.group(1).upper())
                    return True
                elif take("return"):
                    self.matches.append(rule_obj)
                    return False
                elif take("dnat"):
                    self.matches.append(rule_obj)
                    self.outputs.append(m.group(2))
                    return True
                elif take("endpoint_vmap"):
                    for target in _VMAP_ENTRY.findall(m.group(1)):
                        self.matches.append(rule_obj)
                        self.run_chain(target, src, proto, dst, dport)
                    return True
                else:
                    raise AssertionError(f"unmatched rule: {rule_obj}")
        return False


def trace_packet(fake, src, proto, dst, dport, node_ips=TEST_NODE_IPS):
    """``tracePacket`` (the pre-DNAT filter chain of the current proxier first)."""
    t = NFTablesTracer(fake, node_ips)
    if t.run_chain("filter-prerouting-pre-dnat", src, proto, dst, dport):
        return t.matches, ", ".join(t.outputs), t.mark_masq
    t.run_chain("nat-prerouting", src, proto, dst, dport)
    if t.outputs:
        host, _, _ = t.outputs[0].rpartition(":")
        dst = host.strip("[]")
    if t.run_chain("filter-forward", src, proto, dst, dport):
        return t.matches, ", ".join(t.outputs), t.mark_masq
    t.run_chain("filter-input", src, proto, dst, dport)
    return t.matches, ", ".join(t.outputs), t.mark_masq


def run_flows(fake, flows):
    """flows: (name, source, dest, port, output, masq[, protocol])."""
    errors = []
    for flow in flows:
        name, src, dst, dport, output, masq = flow[:6]
        proto = (flow[6] if len(flow) > 6 else "TCP").lower()
        matches, got, got_masq = trace_packet(fake, src, proto, dst, str(dport))
        if got != output or got_masq != masq:
            errors.append(f"{name}: expected {output!r}/{masq}, got {got!r}/{got_masq}\n  " + "\n  ".join(matches))
    assert not errors, "\n".join(errors)


def synced(objects, family="IPv4", **cfg):
    fp = FakeProxier(family, **cfg)
    fp.sync(objects)
    return fp.nft


def test_no_endpoints_reject():
    fake = synced([
        service("ns1", "svc1", cluster_ip="172.30.0.41", type="LoadBalancer", externalIPs=["192.168.99.11"],
                ports=[port("p80", 80, node_port=3001)], lb_ips=["1.2.3.4"]),
    ])
    run_flows(fake, [
        ("pod to cluster IP with no endpoints", "10.0.0.2", "172.30.0.41", 80, "REJECT", False),
        ("external to external IP with no endpoints", TEST_EXTERNAL_CLIENT, "192.168.99.11", 80, "REJECT", False),
        ("pod to NodePort with no endpoints", "10.0.0.2", TEST_NODE_IP, 3001, "REJECT", False),
        ("external to NodePort with no endpoints", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3001, "REJECT", False),
        ("pod to LoadBalancer IP with no endpoints", "10.0.0.2", "1.2.3.4", 80, "REJECT", False),
        ("external to LoadBalancer IP with no endpoints", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, "REJECT", False),
    ])


def test_cluster_ip_general():
    fake = synced([
        service("ns1", "svc1", cluster_ip="172.30.0.41", ports=[port("http", 80)]),
        service("ns2", "svc2", cluster_ip="172.30.0.42", ports=[
            port("http", 80), port("https", 443, target_port=8443), port("dns-udp", 53, "UDP"),
            port("dns-tcp", 53, target_port=5353), port("dns-sctp", 53, "SCTP"),
        ]),
        eslice("ns1", "svc1", [ep("10.180.0.1", node=TEST_NODE_NAME)], [eport("http", 80)]),
        eslice("ns2", "svc2", [ep("10.180.0.1", node=TEST_NODE_NAME), ep("10.180.2.1", node="node2")], [
            eport("http", 80), eport("https", 8443), eport("dns-udp", 53, "UDP"), eport("dns-tcp", 5353), eport("dns-sctp", 53, "SCTP"),
        ]),
    ])
    run_flows(fake, [
        ("simple clusterIP", "10.180.0.2", "172.30.0.41", 80, "10.180.0.1:80", False),
        ("hairpin to cluster IP", "10.180.0.1", "172.30.0.41", 80, "10.180.0.1:80", True),
        ("clusterIP with multiple endpoints", "10.180.0.2", "172.30.0.42", 80, "10.180.0.1:80, 10.180.2.1:80", False),
        ("clusterIP with TargetPort", "10.180.0.2", "172.30.0.42", 443, "10.180.0.1:8443, 10.180.2.1:8443", False),
        ("TCP", "10.180.0.2", "172.30.0.42", 53, "10.180.0.1:5353, 10.180.2.1:5353", False, "TCP"),
        ("UDP", "10.180.0.2", "172.30.0.42", 53, "10.180.0.1:53, 10.180.2.1:53", False, "UDP"),
        ("SCTP", "10.180.0.2", "172.30.0.42", 53, "10.180.0.1:53, 10.180.2.1:53", False, "SCTP"),
        ("TCP-only port does not match UDP traffic", "10.180.0.2", "172.30.0.42", 80, "REJECT", False, "UDP"),
        ("svc1 does not accept svc2's ports", "10.180.0.2", "172.30.0.41", 443, "REJECT", False),
        ("packet to unallocated cluster ip", "10.180.0.2", "172.30.0.50", 80, "DROP", False),
    ])


def test_load_balancer():
    fake = synced([
        service("ns1", "svc1", cluster_ip="172.30.0.41", type="LoadBalancer", ports=[port("p80", 80, node_port=3001)],
                lb_ips=["1.2.3.4", "5.6.7.8"], loadBalancerSourceRanges=["192.168.0.0/24", " 203.0.113.0/25"]),
        eslice("ns1", "svc1", [ep("10.180.0.1")], [eport("p80", 80)]),
    ])
    # the node IP is inside a source range, so the LB IPs are allowed as sources too
    assert fake.chains["firewall-ULMVA6XW-ns1/svc1/tcp/p80"].rules == [
        "ip saddr != { 192.168.0.0/24 , 203.0.113.0/25 , 1.2.3.4 , 5.6.7.8 } drop"
    ]
    out = "10.180.0.1:80"
    run_flows(fake, [
        ("pod to cluster IP", "10.0.0.2", "172.30.0.41", 80, out, False),
        ("external to nodePort", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3001, out, True),
        ("nodePort bypasses LoadBalancerSourceRanges", TEST_EXTERNAL_CLIENT_BLOCKED, TEST_NODE_IP, 3001, out, True),
        ("accepted external to LB1", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, out, True),
        ("accepted external to LB2", TEST_EXTERNAL_CLIENT, "5.6.7.8", 80, out, True),
        ("blocked external to LB1", TEST_EXTERNAL_CLIENT_BLOCKED, "1.2.3.4", 80, "DROP", False),
        ("blocked external to LB2", TEST_EXTERNAL_CLIENT_BLOCKED, "5.6.7.8", 80, "DROP", False),
        ("pod to LB1 (blocked by LoadBalancerSourceRanges)", "10.0.0.2", "1.2.3.4", 80, "DROP", False),
        ("pod to LB2 (blocked by LoadBalancerSourceRanges)", "10.0.0.2", "5.6.7.8", 80, "DROP", False),
        ("node to LB1 (allowed by LoadBalancerSourceRanges)", TEST_NODE_IP, "1.2.3.4", 80, out, True),
        ("node to LB2 (allowed by LoadBalancerSourceRanges)", TEST_NODE_IP, "5.6.7.8", 80, out, True),
        ("same node to LB1, SNATted to LB1 (implicitly allowed)", "1.2.3.4", "1.2.3.4", 80, out, True),
        ("same node to LB2, SNATted to LB2 (implicitly allowed)", "5.6.7.8", "5.6.7.8", 80, out, True),
    ])


@pytest.mark.parametrize("family, nodeport_addresses, allow_alt", [
    ("IPv4", None, False),
    ("IPv4", ["192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64"], True),
    ("IPv6", None, False),
    ("IPv6", ["192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64", "2001:db8:1::2/128"], True),
])
def test_node_ports(family, nodeport_addresses, allow_alt):
    v6 = family == "IPv6"
    svc_ip, ep1, ep2 = ("fd00:172:30::41", "fd00:10:180::1", "fd00:10:180::2:1") if v6 else ("172.30.0.41", "10.180.0.1", "10.180.2.1")
    node_ip = TEST_NODE_IPV6 if v6 else TEST_NODE_IP
    cfg = {} if nodeport_addresses is None else {"nodeport_addresses": nodeport_addresses}
    fake = synced([
        service("ns1", "svc1", cluster_ip=svc_ip, type="NodePort", ports=[port("p80", 80, node_port=3001)]),
        eslice("ns1", "svc1", [ep(ep1), ep(ep2, node=TEST_NODE_NAME)], [eport("p80", 80)], address_type=family),
    ], family, **cfg)
    pod, client, alt = ("fd00:10::2", "2600:5200::1", TEST_NODE_IPV6_ALT) if v6 else ("10.0.0.2", TEST_EXTERNAL_CLIENT, TEST_NODE_IP_ALT)
    join = (lambda ip: f"[{ip}]:80") if v6 else (lambda ip: f"{ip}:80")
    output = f"{join(ep1)}, {join(ep2)}"
    run_flows(fake, [
        ("pod to cluster IP", pod, svc_ip, 80, output, False),
        ("external to nodePort", client, node_ip, 3001, output, True),
        ("node to nodePort", node_ip, node_ip, 3001, output, True),
    ])
    if allow_alt:
        run_flows(fake, [("external to nodePort on secondary IP", client, alt, 3001, output, True)])
    else:
        run_flows(fake, [("secondary nodeIP ignores NodePorts", client, alt, 3001, "", False)])
    if v6:
        assert fake.family == "ip6" and "add table ip6 kube-proxy" in fake.dump()


def etp_objects(policy):
    return [
        service("ns1", "svc1", cluster_ip="172.30.0.41", type="LoadBalancer", externalTrafficPolicy=policy,
                externalIPs=["192.168.99.11"], ports=[port("p80", 80, node_port=3001, target_port=80)],
                healthCheckNodePort=30000, lb_ips=["1.2.3.4"]),
        eslice("ns1", "svc1", [ep("10.180.0.1"), ep("10.180.2.1", node=TEST_NODE_NAME)], [eport("p80", 80)]),
    ]


def test_external_traffic_policy_local():
    fake = synced(etp_objects("Local"))
    both, local = "10.180.0.1:80, 10.180.2.1:80", "10.180.2.1:80"
    run_flows(fake, [
        ("pod to cluster IP hits both endpoints, unmasqueraded", "10.0.0.2", "172.30.0.41", 80, both, False),
        ("pod to external IP hits both endpoints, unmasqueraded", "10.0.0.2", "192.168.99.11", 80, both, False),
        ("external to external IP hits only local endpoint, unmasqueraded", TEST_EXTERNAL_CLIENT, "192.168.99.11", 80, local, False),
        ("pod to LB IP hits only both endpoints, unmasqueraded", "10.0.0.2", "1.2.3.4", 80, both, False),
        ("external to LB IP hits only local endpoint, unmasqueraded", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, local, False),
        ("pod to NodePort hits both endpoints, unmasqueraded", "10.0.0.2", TEST_NODE_IP, 3001, both, False),
        ("external to NodePort hits only local endpoint, unmasqueraded", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3001, local, False),
    ])
    # no healthCheckNodePort rule in nftables mode
    assert "30000" not in fake.dump()


def test_external_traffic_policy_cluster():
    fake = synced(etp_objects("Cluster"))
    both = "10.180.0.1:80, 10.180.2.1:80"
    run_flows(fake, [
        ("pod to cluster IP hits both endpoints, unmasqueraded", "10.0.0.2", "172.30.0.41", 80, both, False),
        ("pod to external IP hits both endpoints, masqueraded", "10.0.0.2", "192.168.99.11", 80, both, True),
        ("external to external IP hits both endpoints, masqueraded", TEST_EXTERNAL_CLIENT, "192.168.99.11", 80, both, True),
        ("pod to LB IP hits both endpoints, masqueraded", "10.0.0.2", "1.2.3.4", 80, both, True),
        ("external to LB IP hits both endpoints, masqueraded", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, both, True),
        ("pod to NodePort hits both endpoints, masqueraded", "10.0.0.2", TEST_NODE_IP, 3001, both, True),
        ("external to NodePort hits both endpoints, masqueraded", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3001, both, True),
    ])
    assert "local-" not in fake.dump()


def test_tracer_can_fail():
    """The tracer is a real check: a wrong expectation is reported."""
    fake = synced(etp_objects("Cluster"))
    with pytest.raises(AssertionError):
        run_flows(fake, [("wrong", "10.0.0.2", "172.30.0.41", 80, "10.180.0.1:80", False)])


# --- the applier's pure helpers --------------------------------------------------------------


def test_transaction_pieces_load_the_same_table():
    """``max_transaction_ops`` splits a transaction into consecutive pieces; every piece
    only needs what earlier ones created, so applying them in order gives the same table."""
    from testbed.kubeproxy_nftables import NFTablesProxier
    from testbed.model import Cluster, Node

    node = Node(name="test-node", ip=TEST_NODE_IP, pod_cidr="10.0.0.0/24", pod_gateway="10.0.0.1", netns="unused")
    text = render_nftables_sync(*build_maps(overall_objects()), fake_config()).text
    whole = FakeNFTables()
    whole.apply(text)
    for limit in (1, 7, 50, 10_000):
        pieces = NFTablesProxier(Cluster(name="x", nodes=[node]), node, Path("/nonexistent"), max_transaction_ops=limit)._pieces(text)
        assert "".join(pieces) == text and all(len(p.splitlines()) <= limit for p in pieces)
        fake = FakeNFTables()
        for p in pieces:
            fake.apply(p)
        assert fake.dump() == whole.dump() and fake.transactions == len(pieces)
    assert NFTablesProxier(Cluster(name="x", nodes=[node]), node, Path("/nonexistent"))._pieces(text) == [text]


def test_filter_service_lines():
    from testbed.kubeproxy_nftables import filter_service

    fp = FakeProxier()
    fp.sync(overall_objects())
    out = filter_service(fp.nft.dump(), "ns2/svc2", {"172.30.0.42", "1.2.3.4", "192.168.99.22"})
    lines = out.splitlines()
    assert "add element ip kube-proxy cluster-ips { 172.30.0.42 }" in lines
    assert 'add element ip kube-proxy no-endpoint-nodeports { tcp . 3001 comment "ns2/svc2:p80" : drop }' in lines
    assert "add chain ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80" in lines
    assert all("ns2/svc2" in ln or "172.30.0.42" in ln for ln in lines)
    assert not any("svc1" in ln or "172.30.0.41" in ln for ln in lines)


def test_canonical_anonymous_sets():
    from testbed.proxy.nft_normalize import canonical_anonymous_sets, live_normal_form

    rule = "add rule ip kube-proxy firewall-X ip saddr != { 203.0.113.0/25 , 192.168.0.0/24 , 5.6.7.8 } drop"
    assert canonical_anonymous_sets(rule) == "add rule ip kube-proxy firewall-X ip saddr != { 5.6.7.8 , 192.168.0.0/24 , 203.0.113.0/25 } drop"
    assert canonical_anonymous_sets("ip daddr { 172.30.0.0/16,10.96.0.0/12 } drop") == "ip daddr { 10.96.0.0/12,172.30.0.0/16 } drop"
    # the kernel's listing of a render with two source ranges and LB IPs compares equal
    fake = synced([
        service("ns1", "svc1", cluster_ip="172.30.0.41", type="LoadBalancer", ports=[port("p80", 80, node_port=3001)],
                lb_ips=["1.2.3.4", "5.6.7.8"], loadBalancerSourceRanges=["192.168.0.0/24", " 203.0.113.0/25"]),
        eslice("ns1", "svc1", [ep("10.180.0.1")], [eport("p80", 80)]),
    ])
    listed = "\n".join([
        "table ip kube-proxy {",
        "\tchain firewall-ULMVA6XW-ns1/svc1/tcp/p80 {",
        "\t\tip saddr != { 1.2.3.4, 5.6.7.8, 192.168.0.0/24, 203.0.113.0/25 } drop",
        "\t}",
        "}",
    ])
    live = [ln for ln in live_normal_form(dump_from_nft_list(listed)).splitlines() if " rule " in ln]
    want = [ln for ln in live_normal_form(fake.dump()).splitlines() if "rule ip kube-proxy firewall-ULMVA6XW" in ln]
    assert live == want


def test_service_fingerprints_are_the_same_in_every_process():
    """The partial-sync decision survives across CLI calls: the per-Service digests do not
    depend on the interpreter's string-hash seed (topology hints are frozensets)."""
    import os
    import subprocess
    import sys

    code = (
        "import json, yaml; from testbed.proxy.servicemap import build_maps; "
        "from testbed.kubeproxy_nftables import service_fingerprints; "
        "objs = json.loads(open(0).read()); print(json.dumps(service_fingerprints(*build_maps(objs)), sort_keys=True))"
    )
    hinted = eslice("ns1", "svc1", [dict(ep("10.180.0.1"), zone="a", hints={"forZones": [{"name": z} for z in "abcdefgh"]})],
                    [eport("p80", 80)])
    objs = [service("ns1", "svc1", cluster_ip="172.30.0.41", ports=[port("p80", 80)]), hinted, *overall_objects()]
    outs = set()
    for seed in ("1", "2", "3"):
        r = subprocess.run([sys.executable, "-c", code], input=json.dumps(objs), capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}, cwd=Path(__file__).parent.parent, check=True)
        outs.add(r.stdout)
    assert len(outs) == 1
    prints = json.loads(outs.pop())
    assert set(prints) == {"ns1/svc1", "ns2/svc2", "ns3/svc3", "ns4/svc4", "ns5/svc5", "ns6/svc6"}
