"""kube-proxy iptables mode, rendered without root: golden tests.

Expected texts come from kube-proxy's own unit tests
(``pkg/proxy/iptables/proxier_test.go`` @ 531be81208e2274ef42e72525a26610a9622bcdf) and
are compared, as kube-proxy compares them, after ``sortIPTablesRules``. Packet-flow
tests port kube-proxy's ``tracePacket`` / ``runPacketFlowTests`` and run the same cases.
Configuration mirrors ``NewFakeProxier``: node ``test-node`` / 192.168.0.2, pod CIDR
10.0.0.0/8, mark ``0x4000``, no ``--random-fully``, localhost NodePorts on, nfacct on.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from testbed.proxy import (
    IPTablesConfig,
    NamespacedName,
    ServicePortName,
    build_endpoints_map,
    build_maps,
    build_service_map,
    changed_services,
    render_iptables,
    render_iptables_sync,
    sort_iptables_rules,
)
from testbed.proxy.iptables import (
    JUMP_RULES,
    chains_from_iptables_save,
    compute_probability,
    format_masquerade_mark,
    port_proto_hash,
    service_port_endpoint_chain_name,
)
from testbed.proxy.normalize import chain_rules, go_stable_sort, parse_iptables_dump, parse_rule
from testbed.proxy.types import Endpoint, ServicePort, categorize_endpoints

VECTORS = Path(__file__).parent / "vectors"

TEST_NODE_NAME = "test-node"
TEST_NODE_IP = "192.168.0.2"
TEST_NODE_IP_ALT = "192.168.1.2"
TEST_EXTERNAL_IP = "192.168.99.11"
TEST_EXTERNAL_CLIENT = "203.0.113.2"
TEST_EXTERNAL_CLIENT_BLOCKED = "203.0.113.130"
TEST_NODE_IPS = [TEST_NODE_IP, TEST_NODE_IP_ALT, TEST_EXTERNAL_IP, "2001:db8::1", "2001:db8:1::2"]


def fake_config(**overrides) -> IPTablesConfig:
    """``NewFakeProxier``'s settings."""
    cfg = IPTablesConfig(
        hostname_override=TEST_NODE_NAME,
        node_ip=TEST_NODE_IP,
        cluster_cidr="10.0.0.0/8",
        masquerade_mark="0x4000",
        masquerade_all=False,
        nodeport_addresses=(),
        node_addresses=["127.0.0.1", "::1", *TEST_NODE_IPS],
        localhost_nodeports=True,
        nfacct=True,
        random_fully=False,
        tcp_be_liberal=False,
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


def ep(ip, node=None, ready=None, serving=None, terminating=None):
    e = {"addresses": [ip]}
    cond = {k: v for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating)) if v is not None}
    if cond:
        e["conditions"] = cond
    if node:
        e["nodeName"] = node
    return e


def eslice(ns, svc_name, endpoints, ports, num=1, address_type="IPv4"):
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "addressType": address_type,
        "metadata": {
            "namespace": ns,
            "name": f"{svc_name}-{num}",
            "labels": {"kubernetes.io/service-name": svc_name},
        },
        "endpoints": endpoints,
        "ports": ports,
    }


def eport(name, number, protocol="TCP"):
    return {"name": name, "port": number, "protocol": protocol}


def render(objects, **cfg):
    svcs, eps = build_maps(objects)
    return render_iptables_sync(svcs, eps, fake_config(**cfg))


def h16(s: str) -> str:
    """Independent copy of kube-proxy's chain hash (sha256, base32, 16 chars)."""
    return base64.b32encode(hashlib.sha256(s.encode()).digest()).decode()[:16]


def load_yaml(*paths: Path) -> list:
    docs = []
    for p in paths:
        docs += [d for d in yaml.safe_load_all(p.read_text()) if d]
    return docs


def nat_rule_count(text: str) -> int:
    """``countRules(TableNAT, ...)``."""
    dump = parse_iptables_dump(text)
    return sum(len(c.rules) for c in dump.get_table("nat").chains)


def check_rule_jumps(rule_data: str) -> None:
    """Port of ``checkIPTablesRuleJumps``: every jump goes to a created, filled chain and
    every created chain is used."""
    tables = {}
    for block in rule_data.split("COMMIT\n"):
        lines = [l for l in block.strip("\n").split("\n") if l]
        if lines:
            tables[lines[0][1:]] = lines
    builtin = {"ACCEPT", "REJECT", "DROP", "MARK", "RETURN", "DNAT", "SNAT", "MASQUERADE"}
    for name, lines in tables.items():
        created = {m.group(1) for l in lines if (m := re.match(r"^:([^ ]*)", l))}
        created -= {m.group(1) for l in lines if (m := re.search(r"-X ([^ ]*)", l))}
        filled = {m.group(1) for l in lines if (m := re.search(r"-A ([^ ]*)", l))}
        jumped = {m.group(1) for l in lines if (m := re.search(r"-j ([^ ]*)", l))} - builtin
        assert not (jumped - created) and not (filled - created), (name, jumped - created, filled - created)
        assert not (jumped - filled - {"KUBE-NODEPORTS"}), (name, jumped - filled)
        extra = created - jumped - {
            "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING",
            "KUBE-FORWARD", "KUBE-MARK-MASQ", "KUBE-PROXY-FIREWALL", "KUBE-FIREWALL",
        }
        assert not extra, (name, extra)


# --- Vector 1: TestOverallIPTablesRules, from YAML manifests ----------------------------

OVERALL = VECTORS / "overall_iptables"


def overall_objects():
    return load_yaml(OVERALL / "services.yaml", OVERALL / "endpointslices.yaml")


def test_overall_iptables_rules_from_manifests():
    result = render(overall_objects())
    expected = (OVERALL / "expected.txt").read_text()
    assert sort_iptables_rules(result.text) == expected
    # The sync_proxy_rules_iptables_total{table="nat"} metric equals the nat rules.
    assert result.nat_rules_count == nat_rule_count(expected) == 55
    assert result.filter_rules_count == 10
    check_rule_jumps(expected)


def test_overall_raw_text_is_restore_input():
    text = render(overall_objects()).text
    assert text.startswith("*filter\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n")
    assert text.endswith("COMMIT\n")
    assert text.count("COMMIT\n") == 2
    filter_part, nat_part = text.split("COMMIT\n")[:2]
    assert nat_part.startswith("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n")
    # chain lines precede rules in each table, and the NodePort tail rule is the last
    # KUBE-SERVICES rule kube-proxy writes
    for part in (filter_part, nat_part):
        lines = part.strip("\n").split("\n")[1:]
        kinds = [l[0] for l in lines]
        assert kinds == sorted(kinds, key=lambda k: k != ":")
    svc_rules = [l for l in nat_part.split("\n") if l.startswith("-A KUBE-SERVICES ")]
    assert "must be the last rule" in svc_rules[-1]


def test_overall_service_map_from_manifests():
    svcs, eps = build_maps(overall_objects())
    assert len(svcs) == 6
    svc5 = svcs[ServicePortName("ns5", "svc5", "p80", "TCP")]
    assert svc5.load_balancer_source_ranges == ("203.0.113.0/25",)  # leading space trimmed
    assert svc5.session_affinity_timeout == 10800
    assert svc5.health_check_node_port == 0  # eTP=Cluster: NeedsHealthCheck is false
    svc2 = svcs[ServicePortName("ns2", "svc2", "p80", "TCP")]
    assert svc2.external_policy_local and svc2.health_check_node_port == 30000
    assert svc2.load_balancer_vips == ("1.2.3.4",) and svc2.external_ips == ("192.168.99.22",)
    assert ServicePortName("ns6", "svc6", "p80", "TCP") not in eps
    ns4 = eps[ServicePortName("ns4", "svc4", "p80", "TCP")]
    assert [str(e) for e in ns4] == ["10.180.0.4:80", "10.180.0.5:80"]
    assert [e.is_local(TEST_NODE_NAME) for e in ns4] == [False, True]


def test_default_mark_is_go_formatted():
    assert format_masquerade_mark(14) == "0x00004000"
    assert format_masquerade_mark(31) == "0x80000000"
    cfg = IPTablesConfig(hostname_override="n", cluster_cidr="10.0.0.0/8")
    assert cfg.mark == "0x00004000"
    text = render_iptables({}, {}, cfg)
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000\n" in text
    assert "-m mark ! --mark 0x00004000/0x00004000 -j RETURN" in text
    assert "--random-fully" in text  # real iptables on this machine supports it


# --- small exact vectors --------------------------------------------------------------


@pytest.mark.parametrize("random_fully", [False, True])
def test_masquerade_rule(random_fully):
    text = render_iptables({}, {}, fake_config(random_fully=random_fully))
    suffix = " --random-fully" if random_fully else ""
    assert chain_rules(text, "nat", "KUBE-POSTROUTING") == (
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n"
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n"
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE'
        + suffix
        + "\n"
    )


FORWARD_TAIL = (
    '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT\n'
    '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n'
)


@pytest.mark.parametrize(
    "nfacct, tcp_liberal, drop_rule",
    [
        (False, False, "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n"),
        (
            True,
            False,
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP\n",
        ),
        (False, True, ""),
    ],
)
def test_drop_invalid_rule(nfacct, tcp_liberal, drop_rule):
    text = render_iptables({}, {}, fake_config(nfacct=nfacct, tcp_be_liberal=tcp_liberal))
    assert chain_rules(text, "filter", "KUBE-FORWARD") == drop_rule + FORWARD_TAIL


FIREWALL_RULE = (
    '-A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 '
    "! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n"
)


@pytest.mark.parametrize(
    "family, localhost_nodeports, nodeport_addresses, expect_firewall",
    [
        ("IPv4", True, (), True),
        ("IPv4", False, (), False),
        ("IPv4", False, ("192.168.0.0/24", "127.0.0.1/32"), False),
        ("IPv4", False, ("192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64"), False),
        ("IPv6", True, (), False),
        ("IPv6", False, (), False),
        ("IPv6", False, ("192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64"), False),
    ],
)
def test_nodeports_kube_firewall(family, localhost_nodeports, nodeport_addresses, expect_firewall):
    cfg = fake_config(
        ip_family=family,
        localhost_nodeports=localhost_nodeports,
        nodeport_addresses=nodeport_addresses,
        cluster_cidr="fd00:10::/64" if family == "IPv6" else "10.0.0.0/8",
        node_ip="2001:db8::1" if family == "IPv6" else TEST_NODE_IP,
    )
    text = render_iptables({}, {}, cfg)
    assert chain_rules(text, "filter", "KUBE-FIREWALL") == (FIREWALL_RULE if expect_firewall else "")


def test_compute_probability():
    table = {
        1: "1.0000000000",
        2: "0.5000000000",
        10: "0.1000000000",
        100: "0.0100000000",
        1000: "0.0010000000",
        10000: "0.0001000000",
        100000: "0.0000100000",
        100001: "0.0000099999",
    }
    for n, want in table.items():
        assert compute_probability(n) == want
    prev = 0.0
    for i in range(100000, 1, -1):
        cur = float("%0.10f" % (1.0 / i))
        assert cur > prev, i
        prev = cur


HASH_VECTORS = [
    # (service port name, protocol, endpoint or None, expected chain suffix)
    ("ns1/svc1:p80", "tcp", None, "XPGD46QRK7WJZT7O"),
    ("ns2/svc2:p80", "tcp", None, "GNZBNJ2PO5MGZ6GT"),
    ("ns3/svc3:p80", "tcp", None, "X27LE4BHSL4DOUIK"),
    ("ns4/svc4:p80", "tcp", None, "4SW47YFZTEDKD3PK"),
    ("ns5/svc5:p80", "tcp", None, "NUKIZ6OKUXPJNT4C"),
    ("ns2/svc2:p8080", "tcp", None, "2VJB64SDSIJUP5T6"),
    ("ns4/svc4:p8082", "tcp", None, "EBDQOQU5SJFXRIL3"),
    ("ns1/svc1:p80", "tcp", "10.180.0.1:80", "SXIVWICOYRO3J4NJ"),
    ("ns2/svc2:p80", "tcp", "10.180.0.2:80", "RS4RBKLTHTF2IUXJ"),
    ("ns3/svc3:p80", "tcp", "10.180.0.3:80", "OYPFS5VJICHGATKP"),
    ("ns4/svc4:p80", "tcp", "10.180.0.4:80", "UKSFD7AGPMPPLUHC"),
    ("ns4/svc4:p80", "tcp", "10.180.0.5:80", "C6EBXVWJJZMIWKLZ"),
    ("ns5/svc5:p80", "tcp", "10.180.0.3:80", "I77PXRDZVX7PMWMN"),
    ("ns1/svc1:p80", "tcp", "10.0.0.0:80", "DKGQUZGBKLTPAR56"),
    ("ns3/svc3:p8081", "tcp", "203.0.113.4:8081", "RUVVH7YV3PHQBDOS"),
    ("ns4/svc4:p8082", "tcp", "10.4.0.1:8082", "SU5STNODRYEWJAUF"),
    ("ns3/svc3:p80", "tcp", "10.0.3.2:80", "DKCFIS26GWF2WLWC"),
]


@pytest.mark.parametrize("name, proto, endpoint, want", HASH_VECTORS)
def test_chain_name_hashes(name, proto, endpoint, want):
    if endpoint is None:
        assert port_proto_hash(name, proto) == want
    else:
        assert service_port_endpoint_chain_name(name, proto, endpoint) == "KUBE-SEP-" + want
    assert h16(name + proto + (endpoint or "")) == want
    # Full base32 of sha256("ns1/svc1:p80tcp") from the vectors file.
    assert (
        base64.b32encode(hashlib.sha256(b"ns1/svc1:p80tcp").digest()).decode()
        == "XPGD46QRK7WJZT7ONRPOTZ5VR35MJ4TXQWCF6RBTQMVGOUHJFHOQ===="
    )


def test_chain_hash_table_encoding_matches_base32():
    """The 10-bit table encoding gives base32's first 16 characters for any digest
    (names of every length, non-ASCII too, and digests with high/low bits set)."""
    from testbed.proxy.iptables import _b32_16

    rng = __import__("random").Random(7)
    samples = ["", "ns1/svc1:p80tcp", "é/ü:πudp10.0.0.1:80"] + [
        "".join(rng.choice("abc/:-.0123456789") for _ in range(rng.randrange(1, 80))) for _ in range(3000)
    ]
    for s in samples:
        assert _b32_16(s) == h16(s), s


@pytest.mark.parametrize("text, want", [
    ("10.0.0.1", "10.0.0.1"), ("0.0.0.0", "0.0.0.0"), ("255.255.255.255", "255.255.255.255"),
    ("172.30.0.041", "172.30.0.41"), ("010.000.000.001", "10.0.0.1"), ("256.0.0.1", None), ("1.2.3", None),
    (" 1.2.3.4", None), ("1.2.3.4\x00", None), ("1.2.3.4\n", None), ("01.2.3.4\n", None),
    ("fd00::0001", "fd00::1"), ("::ffff:1.2.3.4", "1.2.3.4"),
    ("fe80::1%eth0", None), ("", None), (None, None), (17, None),
])
def test_parse_ip_sloppy(text, want):
    """``netutils.ParseIPSloppy(s).String()``: canonical IPv4 comes back as it is (the
    fast path), everything else through the parser."""
    from testbed.proxy.servicemap import parse_ip_sloppy

    assert parse_ip_sloppy(text) == want


def test_service_port_name_string():
    assert str(ServicePortName("ns1", "svc1", "p80", "TCP")) == "ns1/svc1:p80"
    assert str(ServicePortName("ns1", "svc1", "", "TCP")) == "ns1/svc1"
    assert str(Endpoint("fd00::1", 80)) == "[fd00::1]:80"
    # byEndpoint is a plain string order: 10.0.0.10 sorts before 10.0.0.2
    objs = [eslice("ns", "s", [ep("10.0.0.2"), ep("10.0.0.10")], [eport("", 80)]), service("ns", "s", cluster_ip="172.30.0.1", ports=[port("", 80)])]
    eps = build_endpoints_map(objs)
    assert [str(e) for e in eps[ServicePortName("ns", "s", "", "TCP")]] == ["10.0.0.10:80", "10.0.0.2:80"]


def test_bad_ips():
    """TestBadIPs: leading-zero addresses are read as decimal and written canonically."""
    result = render(load_yaml(VECTORS / "bad_ips" / "services.yaml"))
    expected = (VECTORS / "bad_ips" / "expected.txt").read_text()
    assert sort_iptables_rules(result.text) == expected
    check_rule_jumps(expected)


# --- sortIPTablesRules (TestSortIPTablesRules cases) -----------------------------------


SORT_CASES = [
    (
        "correctly match same service name in different styles of comments",
        """
*filter
COMMIT
*nat
:KUBE-SERVICES - [0:0]
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" svc2 line 1
-A KUBE-SERVICES -m comment --comment ns2/svc2 svc2 line 2
-A KUBE-SERVICES -m comment --comment "ns2/svc2 blah" svc2 line 3
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" svc1 line 1
-A KUBE-SERVICES -m comment --comment ns1/svc1 svc1 line 2
-A KUBE-SERVICES -m comment --comment "ns1/svc1 blah" svc1 line 3
-A KUBE-SERVICES -m comment --comment ns4/svc4 svc4 line 1
-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" svc4 line 2
-A KUBE-SERVICES -m comment --comment "ns4/svc4 blah" svc4 line 3
-A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" svc3 line 1
-A KUBE-SERVICES -m comment --comment "ns3/svc3 blah" svc3 line 2
-A KUBE-SERVICES -m comment --comment ns3/svc3 svc3 line 3
COMMIT
""",
        """*filter
COMMIT
*nat
:KUBE-SERVICES - [0:0]
-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" svc1 line 1
-A KUBE-SERVICES -m comment --comment ns1/svc1 svc1 line 2
-A KUBE-SERVICES -m comment --comment "ns1/svc1 blah" svc1 line 3
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" svc2 line 1
-A KUBE-SERVICES -m comment --comment ns2/svc2 svc2 line 2
-A KUBE-SERVICES -m comment --comment "ns2/svc2 blah" svc2 line 3
-A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" svc3 line 1
-A KUBE-SERVICES -m comment --comment "ns3/svc3 blah" svc3 line 2
-A KUBE-SERVICES -m comment --comment ns3/svc3 svc3 line 3
-A KUBE-SERVICES -m comment --comment ns4/svc4 svc4 line 1
-A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" svc4 line 2
-A KUBE-SERVICES -m comment --comment "ns4/svc4 blah" svc4 line 3
COMMIT
""",
    ),
    (
        "unexpected junk lines are preserved",
        """
*filter
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]
:KUBE-AAAAA - [0:0]
:KUBE-ZZZZZ - [0:0]
:WHY-IS-THIS-CHAIN-HERE - [0:0]
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" svc2 line 1
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
-A KUBE-ZZZZZ -m comment --comment "mystery chain number 1"
-A KUBE-SERVICES -m comment --comment ns2/svc2 svc2 line 2
-A WHY-IS-THIS-CHAIN-HERE -j ACCEPT
-A KUBE-SERVICES -m comment --comment "ns2/svc2 blah" svc2 line 3
-A KUBE-AAAAA -m comment --comment "mystery chain number 2"
COMMIT
""",
        """*filter
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-AAAAA - [0:0]
:KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]
:KUBE-ZZZZZ - [0:0]
:WHY-IS-THIS-CHAIN-HERE - [0:0]
-A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" svc2 line 1
-A KUBE-SERVICES -m comment --comment ns2/svc2 svc2 line 2
-A KUBE-SERVICES -m comment --comment "ns2/svc2 blah" svc2 line 3
-A KUBE-AAAAA -m comment --comment "mystery chain number 2"
-A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
-A KUBE-ZZZZZ -m comment --comment "mystery chain number 1"
-A WHY-IS-THIS-CHAIN-HERE -j ACCEPT
COMMIT
""",
    ),
    (
        "extra tables",
        """
*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
-A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
-A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*mangle
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
-A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
""",
        """*filter
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
-A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*mangle
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
-A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
-A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
""",
    ),
]


@pytest.mark.parametrize("name, given, want", SORT_CASES, ids=[c[0] for c in SORT_CASES])
def test_sort_iptables_rules(name, given, want):
    assert sort_iptables_rules(given) == want


def test_sort_iptables_rules_non_kube_chains_last():
    given = "*nat\n:AAA-FIRST - [0:0]\n:KUBE-ZZZ - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [5:7]\n-A AAA-FIRST -j ACCEPT\n-A KUBE-ZZZ -j ACCEPT\nCOMMIT\n"
    assert sort_iptables_rules(given) == (
        "*nat\n:KUBE-NODEPORTS - [5:7]\n:KUBE-SERVICES - [0:0]\n:KUBE-ZZZ - [0:0]\n:AAA-FIRST - [0:0]\n"
        "-A KUBE-ZZZ -j ACCEPT\n-A AAA-FIRST -j ACCEPT\nCOMMIT\n"
    )


def test_sort_keeps_rules_without_comment_where_go_puts_them():
    """Go's SliceStable with orderByCommentServiceName (false whenever a comment is
    missing) on a mix of commented and uncommented KUBE-NODEPORTS rules."""
    given = (
        "*filter\n:KUBE-NODEPORTS - [0:0]\n"
        "-A KUBE-NODEPORTS -m comment --comment ns3/c -j ACCEPT\n"
        "-A KUBE-NODEPORTS -j ACCEPT\n"
        "-A KUBE-NODEPORTS -m comment --comment ns1/a -j ACCEPT\n"
        "-A KUBE-NODEPORTS -m comment --comment ns2/b -j ACCEPT\n"
        "COMMIT\n"
    )
    # Insertion sort: ns1/a is not "less" than the uncommented rule, so it stays behind
    # it, and ns2/b is not less than ns1/a. A key-based sort would give -, a, b, c.
    assert chain_rules(sort_iptables_rules(given), "filter", "KUBE-NODEPORTS") == (
        "-A KUBE-NODEPORTS -m comment --comment ns3/c -j ACCEPT\n"
        "-A KUBE-NODEPORTS -j ACCEPT\n"
        "-A KUBE-NODEPORTS -m comment --comment ns1/a -j ACCEPT\n"
        "-A KUBE-NODEPORTS -m comment --comment ns2/b -j ACCEPT\n"
    )


def test_sort_iptables_rules_errors():
    with pytest.raises(ValueError, match="no COMMIT line"):
        sort_iptables_rules("*filter\n:KUBE-SERVICES - [0:0]\n")
    with pytest.raises(ValueError, match="no such chain"):
        sort_iptables_rules("*nat\n-A KUBE-NOPE -j ACCEPT\nCOMMIT\n")
    with pytest.raises(ValueError, match="cannot negate"):
        parse_rule("-A X ! -j ACCEPT")


def test_go_stable_sort_matches_a_stable_sort():
    import random

    rng = random.Random(7)
    for n in (0, 1, 5, 19, 20, 21, 41, 100, 257):
        items = [(rng.randrange(6), i) for i in range(n)]
        got = list(items)
        go_stable_sort(got, lambda a, b: a[0] < b[0])
        assert got == sorted(items, key=lambda x: x[0])


# --- partial sync: TestSyncProxyRulesRepeated ----------------------------------------


class FakeNatTable:
    """The kernel's nat chains, as ``iptables-restore --noflush`` leaves them."""

    def __init__(self):
        self.chains: set[str] = set()

    def restore(self, text: str) -> None:
        for chain in parse_iptables_dump(text).get_table("nat").chains:
            if chain.deleted:
                self.chains.discard(chain.name)
            else:
                self.chains.add(chain.name)

    def save(self) -> str:
        """What ``iptables-save -t nat`` would list (chain lines only matter)."""
        lines = ["*nat"] + [f":{c} - [0:0]" for c in sorted(self.chains)] + ["COMMIT"]
        return "\n".join(lines) + "\n"


def test_sync_proxy_rules_repeated():
    steps = VECTORS / "sync_repeated"
    kernel = FakeNatTable()
    cfg = fake_config()
    svc_objs = {
        "svc1": service("ns1", "svc1", cluster_ip="172.30.0.41", type="ClusterIP", ports=[port("p80", 80)]),
        "svc2": service("ns2", "svc2", cluster_ip="172.30.0.42", type="ClusterIP", ports=[port("p8080", 8080)]),
    }
    slice_objs = {
        "svc1": eslice("ns1", "svc1", [ep("10.0.1.1")], [eport("p80", 80)]),
        "svc2": eslice("ns2", "svc2", [ep("10.0.2.1")], [eport("p8080", 8080)]),
    }
    state = {"svcs": {}, "eps": {}}

    def sync(step: int, full: bool = False):
        svcs = build_service_map(svc_objs.values())
        eps = build_endpoints_map(slice_objs.values())
        changed = None if full else changed_services(state["svcs"], svcs, state["eps"], eps)
        result = render_iptables_sync(svcs, eps, cfg, changed=changed, existing_nat_chains=kernel.save())
        state["svcs"], state["eps"] = svcs, eps
        expected = (steps / f"step{step}.txt").read_text()
        assert sort_iptables_rules(result.text) == expected, f"step {step}"
        assert result.nat_rules_synced == nat_rule_count(expected), f"step {step}"
        kernel.restore(result.text)
        return result

    r = sync(1, full=True)
    total = nat_rule_count((steps / "step1.txt").read_text())
    assert r.nat_rules_count == total == 15
    assert r.jump_rules == JUMP_RULES

    # Add a new service and its endpoints: only its SVC and SEP chains are written.
    svc_objs["svc3"] = service("ns3", "svc3", cluster_ip="172.30.0.43", type="ClusterIP", ports=[port("p80", 80)])
    slice_objs["svc3"] = eslice("ns3", "svc3", [ep("10.0.3.1")], [eport("p80", 80)])
    r = sync(2)
    total += 5
    assert r.nat_rules_count == total and not r.full_sync and r.jump_rules == ()

    # Delete a service: its chains are flushed and deleted.
    del svc_objs["svc2"]
    r = sync(3)
    total -= 5
    assert r.nat_rules_count == total
    assert r.deleted_nat_chains == ("KUBE-SEP-UHEGFW77JX3KXTOV", "KUBE-SVC-2VJB64SDSIJUP5T6")

    # Add a service without endpoints (REJECT only), then its endpoints.
    svc_objs["svc4"] = service("ns4", "svc4", cluster_ip="172.30.0.44", type="ClusterIP", ports=[port("p80", 80)])
    r = sync(4)
    assert r.nat_rules_count == total
    slice_objs["svc4"] = eslice("ns4", "svc4", [ep("10.0.4.1")], [eport("p80", 80)])
    r = sync(5)
    total += 5
    assert r.nat_rules_count == total

    # Change an endpoint: svc3's SVC and SEP chains are rewritten, the old SEP deleted.
    slice_objs["svc3"] = eslice("ns3", "svc3", [ep("10.0.3.2")], [eport("p80", 80)])
    r = sync(6)
    assert r.nat_rules_count == total

    # Add an endpoint.
    slice_objs["svc3"] = eslice("ns3", "svc3", [ep("10.0.3.2"), ep("10.0.3.3")], [eport("p80", 80)])
    r = sync(7)
    total += 3
    assert r.nat_rules_count == total

    # No changes: no service chain is rewritten.
    r = sync(8)
    assert r.nat_rules_count == total

    # Delete svc4; (kube-proxy's partial restore fails in the test on purpose) the full
    # resync rewrites everything and deletes svc4's chains, which are still in the kernel.
    del svc_objs["svc4"]
    r = sync(9, full=True)
    total -= 5
    assert r.nat_rules_count == total


def test_partial_sync_accepts_service_port_names_and_tuples():
    objs = [
        service("ns1", "svc1", cluster_ip="172.30.0.41", ports=[port("p80", 80)]),
        eslice("ns1", "svc1", [ep("10.0.1.1")], [eport("p80", 80)]),
        service("ns2", "svc2", cluster_ip="172.30.0.42", ports=[port("p80", 80)]),
        eslice("ns2", "svc2", [ep("10.0.2.1")], [eport("p80", 80)]),
    ]
    svcs, eps = build_maps(objs)
    cfg = fake_config()
    by_port = render_iptables(svcs, eps, cfg, changed={ServicePortName("ns1", "svc1", "p80", "TCP")})
    by_name = render_iptables(svcs, eps, cfg, changed={NamespacedName("ns1", "svc1")})
    by_tuple = render_iptables(svcs, eps, cfg, changed=[("ns1", "svc1")])
    assert by_port == by_name == by_tuple
    assert ":KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]" in by_port
    assert "KUBE-SVC-" + h16("ns2/svc2:p80tcp") + " - [0:0]" not in by_port
    # both services' KUBE-SERVICES rules are always rewritten
    assert '"ns2/svc2:p80 cluster IP"' in by_port
    # existing chains of unchanged services are "active", so never deleted
    existing = {"KUBE-SVC-" + h16("ns2/svc2:p80tcp"), "KUBE-SEP-" + h16("ns2/svc2:p80tcp10.0.2.1:80"), "KUBE-SVC-STALE0000000000"}
    r = render_iptables_sync(svcs, eps, cfg, changed=set(), existing_nat_chains=existing)
    assert r.deleted_nat_chains == ("KUBE-SVC-STALE0000000000",)
    # non-service chains found in the kernel are left alone
    r = render_iptables_sync(svcs, eps, cfg, existing_nat_chains=":DOCKER - [0:0]\n:KUBE-MARK-DROP - [0:0]\n")
    assert r.deleted_nat_chains == ()


def test_chains_from_iptables_save():
    save = "# Generated by iptables-save\n*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SVC-AAAA - [0:0]\n-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n"
    assert chains_from_iptables_save(save) == {"PREROUTING", "KUBE-SVC-AAAA"}


# --- large cluster mode: TestSyncProxyRulesLargeClusterMode ---------------------------


def count_endpoints_and_comments(text: str, match: str):
    """``countEndpointsAndComments``."""
    num_eps = num_comments = 0
    matched = ""
    for line in text.split("\n"):
        if line.startswith("-A KUBE-SEP-") and "-j DNAT" in line:
            num_eps += 1
            if "--comment" in line:
                num_comments += 1
            if match in line:
                matched = line
    return matched, num_eps, num_comments


def test_large_cluster_mode():
    half = 1000 // 2 - 1
    svc_objs = [
        service("ns1", "svc1", cluster_ip="172.30.0.41", type="ClusterIP", ports=[port("p80", 80)]),
        service("ns2", "svc2", cluster_ip="172.30.0.42", type="ClusterIP", ports=[port("p8080", 8080)]),
        service("ns3", "svc3", cluster_ip="172.30.0.43", type="ClusterIP", ports=[port("p8081", 8081)]),
    ]
    slices = [
        eslice("ns1", "svc1", [ep(f"10.0.{i % 256}.{i // 256}") for i in range(half)], [eport("p80", 80)]),
        eslice("ns2", "svc2", [ep(f"10.1.{i % 256}.{i // 256}") for i in range(half)], [eport("p8080", 8080)]),
    ]
    cfg = fake_config(masquerade_all=True)
    kernel = FakeNatTable()
    prev = {"svcs": {}, "eps": {}}

    def sync(full=False, cleanup=True):
        svcs, eps = build_maps(svc_objs + slices)
        changed = None if full else changed_services(prev["svcs"], svcs, prev["eps"], eps)
        r = render_iptables_sync(
            svcs, eps, cfg, changed=changed, existing_nat_chains=kernel.save() if cleanup else None
        )
        prev["svcs"], prev["eps"] = svcs, eps
        kernel.restore(r.text)
        return r

    r = sync(full=True)
    expected_eps = 2 * half
    assert not r.large_cluster_mode and r.total_endpoints == expected_eps
    first, n, c = count_endpoints_and_comments(r.text, "10.0.0.0")
    assert first == "-A KUBE-SEP-DKGQUZGBKLTPAR56 -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.0.0.0:80"
    assert n == expected_eps and c == n

    slices.append(
        eslice("ns3", "svc3", [ep("203.0.113.4"), ep("203.0.113.8"), ep("203.0.113.12")], [eport("p8081", 8081)])
    )
    r = sync()
    assert r.large_cluster_mode
    first, n, c = count_endpoints_and_comments(r.text, "203.0.113.4")
    assert first == "-A KUBE-SEP-RUVVH7YV3PHQBDOS -m tcp -p tcp -j DNAT --to-destination 203.0.113.4:8081"
    assert (n, c) == (3, 0)  # partial sync: only svc3's endpoints, without comments
    # SVC -> SEP rules lose their comment too; the service-level comments stay.
    svc3 = "KUBE-SVC-" + h16("ns3/svc3:p8081tcp")
    assert chain_rules(r.text, "nat", svc3).splitlines()[1:] == [
        f"-A {svc3} -m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-{h16('ns3/svc3:p8081tcp203.0.113.12:8081')}",
        f"-A {svc3} -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-{h16('ns3/svc3:p8081tcp203.0.113.4:8081')}",
        f"-A {svc3} -j KUBE-SEP-{h16('ns3/svc3:p8081tcp203.0.113.8:8081')}",
    ]
    assert chain_rules(r.text, "nat", svc3).splitlines()[0] == (
        f'-A {svc3} -m comment --comment "ns3/svc3:p8081 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 8081 -j KUBE-MARK-MASQ'
    )

    r = sync(full=True)
    expected_eps += 3
    first, n, c = count_endpoints_and_comments(r.text, "10.0.0.0")
    assert first == "-A KUBE-SEP-DKGQUZGBKLTPAR56 -m tcp -p tcp -j DNAT --to-destination 10.0.0.0:80"
    assert (n, c) == (expected_eps, 0)

    svc_objs.append(service("ns4", "svc4", cluster_ip="172.30.0.44", type="ClusterIP", ports=[port("p8082", 8082)]))
    slices.append(eslice("ns4", "svc4", [ep("10.4.0.1")], [eport("p8082", 8082)]))
    r = sync()
    first, n, _ = count_endpoints_and_comments(r.text, "10.4.0.1")
    assert first == "-A KUBE-SEP-SU5STNODRYEWJAUF -m tcp -p tcp -j DNAT --to-destination 10.4.0.1:8082"
    assert n == 1

    # Deleting a service in large-cluster mode: kube-proxy skips the iptables-save
    # cleanup until syncPeriod has passed (existing_nat_chains=None) ...
    del svc_objs[-1]
    r = sync(cleanup=False)
    first, n, _ = count_endpoints_and_comments(r.text, "10.4.0.1")
    assert (first, n) == ("", 0)
    assert "-X " not in r.text
    # ... then deletes the stale chains.
    r = sync()
    assert "-X KUBE-SVC-EBDQOQU5SJFXRIL3" in r.text
    assert "-X KUBE-SEP-SU5STNODRYEWJAUF" in r.text

    r = sync(full=True)
    _, n, _ = count_endpoints_and_comments(r.text, "10.0.0.0")
    assert n == expected_eps


def test_large_cluster_threshold_is_strictly_greater_than_1000():
    objs = [
        service("ns1", "svc1", cluster_ip="172.30.0.41", ports=[port("p80", 80)]),
        eslice("ns1", "svc1", [ep(f"10.0.{i // 250}.{i % 250}") for i in range(1000)], [eport("p80", 80)]),
    ]
    assert not render(objs).large_cluster_mode
    objs[1]["endpoints"].append(ep("10.9.9.9"))
    r = render(objs)
    assert r.large_cluster_mode and r.total_endpoints == 1001
    assert "--comment ns1/svc1:p80 " not in r.text
    assert '"ns1/svc1:p80 cluster IP"' in r.text


# --- hand-checked goldens: affinity, iTP=Local, nodeport-addresses, IPv6 ---------------


def test_session_affinity_two_endpoints():
    objs = [
        service(
            "ns1", "svc1", cluster_ip="172.30.0.41", type="ClusterIP", ports=[port("p80", 80)],
            sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 300}},
        ),
        eslice("ns1", "svc1", [ep("10.180.0.2"), ep("10.180.0.1")], [eport("p80", 80)]),
    ]
    text = render(objs).text
    svc = "KUBE-SVC-XPGD46QRK7WJZT7O"
    sep1 = "KUBE-SEP-SXIVWICOYRO3J4NJ"
    sep2 = "KUBE-SEP-" + h16("ns1/svc1:p80tcp10.180.0.2:80")
    assert chain_rules(text, "nat", svc) == (
        f'-A {svc} -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ\n'
        f'-A {svc} -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m recent --name {sep1} --rcheck --seconds 300 --reap -j {sep1}\n'
        f'-A {svc} -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -m recent --name {sep2} --rcheck --seconds 300 --reap -j {sep2}\n'
        f'-A {svc} -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.5000000000 -j {sep1}\n'
        f'-A {svc} -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -j {sep2}\n'
    )
    assert chain_rules(text, "nat", sep2) == (
        f"-A {sep2} -m comment --comment ns1/svc1:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ\n"
        f"-A {sep2} -m comment --comment ns1/svc1:p80 -m recent --name {sep2} --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80\n"
    )
    # ClientIP without sessionAffinityConfig: the API default, 10800 s.
    del objs[0]["spec"]["sessionAffinityConfig"]
    assert "--rcheck --seconds 10800 --reap" in render(objs).text


def itp_local_objects(nodes):
    return [
        service("ns1", "svc1", cluster_ip="172.30.1.1", ports=[port("", 80)], internalTrafficPolicy="Local", selector={"foo": "bar"}),
        eslice(
            "ns1", "svc1",
            [ep(f"10.0.1.{i + 1}", node=n, ready=True) for i, n in enumerate(nodes)],
            [eport("", 80)],
        ),
    ]


def test_internal_traffic_policy_local_svl_chain():
    r = render(itp_local_objects([TEST_NODE_NAME, "node1", "node2"]))
    svl = "KUBE-SVL-" + h16("ns1/svc1tcp")
    sep = "KUBE-SEP-" + h16("ns1/svc1tcp10.0.1.1:80")
    expected = f"""*filter
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
{FIREWALL_RULE}-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP
{FORWARD_TAIL}COMMIT
*nat
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:{sep} - [0:0]
:{svl} - [0:0]
-A KUBE-SERVICES -m comment --comment "ns1/svc1 cluster IP" -m tcp -p tcp -d 172.30.1.1 --dport 80 -j {svl}
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
-A {sep} -m comment --comment ns1/svc1 -s 10.0.1.1 -j KUBE-MARK-MASQ
-A {sep} -m comment --comment ns1/svc1 -m tcp -p tcp -j DNAT --to-destination 10.0.1.1:80
-A {svl} -m comment --comment "ns1/svc1 cluster IP" -m tcp -p tcp -d 172.30.1.1 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A {svl} -m comment --comment "ns1/svc1 -> 10.0.1.1:80" -j {sep}
COMMIT
"""
    assert sort_iptables_rules(r.text) == expected
    check_rule_jumps(expected)

    # No local endpoint: DROP in filter KUBE-SERVICES, no nat chains.
    r = render(itp_local_objects(["node0", "node1", "node2"]))
    assert chain_rules(r.text, "filter", "KUBE-SERVICES") == (
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1 has no local endpoints" -m tcp -p tcp -d 172.30.1.1 --dport 80 -j DROP\n'
    )
    assert r.active_nat_chains == frozenset() and r.no_local_endpoints_internal == 1


def nodeport_objects():
    return [
        service("ns1", "svc1", cluster_ip="172.30.0.41", type="NodePort", ports=[port("p80", 80, node_port=3001)]),
        eslice("ns1", "svc1", [ep("10.180.0.1"), ep("10.180.2.1", node=TEST_NODE_NAME)], [eport("p80", 80)]),
    ]


TAIL = '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain"'


@pytest.mark.parametrize(
    "localhost, addresses, tail, localhost_rule",
    [
        (True, (), [f"{TAIL} -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"], True),
        (False, (), [f"{TAIL} -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS"], False),
        (False, ("192.168.0.0/24", "127.0.0.1/32"), [f"{TAIL} -d 192.168.0.2 -j KUBE-NODEPORTS"], False),
        (
            False,
            ("192.168.0.0/24", "192.168.1.0/24", "2001:db8::/64"),
            [f"{TAIL} -d 192.168.0.2 -j KUBE-NODEPORTS", f"{TAIL} -d 192.168.1.2 -j KUBE-NODEPORTS"],
            False,
        ),
        # TestHealthCheckNodePort's configuration: localhost only.
        (True, ("127.0.0.0/8",), [f"{TAIL} -d 127.0.0.1 -j KUBE-NODEPORTS"], True),
        # localhost NodePorts requested, but --nodeport-addresses excludes loopback: off.
        (True, ("192.168.0.0/24",), [f"{TAIL} -d 192.168.0.2 -j KUBE-NODEPORTS"], False),
        # a 0.0.0.0/0 entry means "match all" whatever else is listed
        (True, ("192.168.0.0/24", "0.0.0.0/0"), [f"{TAIL} -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"], True),
    ],
)
def test_nodeport_addresses(localhost, addresses, tail, localhost_rule):
    r = render(nodeport_objects(), localhost_nodeports=localhost, nodeport_addresses=addresses)
    svc_rules = chain_rules(r.text, "nat", "KUBE-SERVICES").splitlines()
    assert svc_rules[1:] == tail
    ext = "KUBE-EXT-XPGD46QRK7WJZT7O"
    want = []
    if localhost_rule:
        want.append(
            f"-A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -m tcp -p tcp -d 127.0.0.0/8 --dport 3001 "
            f"-m nfacct --nfacct-name localhost_nps_accepted_pkts -j {ext}"
        )
    want.append(f"-A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -m tcp -p tcp --dport 3001 -j {ext}")
    assert chain_rules(r.text, "nat", "KUBE-NODEPORTS").splitlines() == want
    assert (":KUBE-FIREWALL - [0:0]" in r.text) == localhost_rule
    assert r.localhost_nodeports == localhost_rule


def test_ipv6_family():
    objs = [
        service("ns1", "svc1", cluster_ip="fd00:172:30::41", type="NodePort", ports=[port("p80", 80, node_port=3001)], ipFamilies=["IPv6"], clusterIPs=["fd00:172:30::41"]),
        eslice("ns1", "svc1", [ep("fd00:10:180::1"), ep("fd00:10:180::2:1", node=TEST_NODE_NAME)], [eport("p80", 80)], address_type="IPv6"),
        # an IPv4 service is invisible to the IPv6 proxier
        service("ns2", "svc2", cluster_ip="172.30.0.42", ports=[port("p80", 80)]),
    ]
    svcs, eps = build_maps(objs, "IPv6")
    assert list(svcs) == [ServicePortName("ns1", "svc1", "p80", "TCP")]
    text = render_iptables(svcs, eps, fake_config(ip_family="IPv6", cluster_cidr="10.0.0.0/8,fd00:10::/64", node_ip="2001:db8::1"))
    assert f"{TAIL} -m addrtype --dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS\n" in text
    assert "KUBE-FIREWALL" not in text and "127.0.0.0/8" not in text
    sep = "KUBE-SEP-" + h16("ns1/svc1:p80tcp[fd00:10:180::1]:80")
    assert f"-A {sep} -m comment --comment ns1/svc1:p80 -s fd00:10:180::1 -j KUBE-MARK-MASQ\n" in text
    assert f"-m tcp -p tcp -j DNAT --to-destination [fd00:10:180::1]:80\n" in text
    assert "! -s fd00:10::/64 -j KUBE-MARK-MASQ" in text


def test_jump_rules_data():
    assert len(JUMP_RULES) == 14
    first = JUMP_RULES[0]
    assert (first.table, first.chain, first.target) == ("filter", "INPUT", "KUBE-EXTERNAL-SERVICES")
    assert first.args == (
        "-m", "conntrack", "--ctstate", "NEW",
        "-m", "comment", "--comment", "kubernetes externally-visible service portals",
        "-j", "KUBE-EXTERNAL-SERVICES",
    )
    assert first.check_argv()[:4] == ["-t", "filter", "-C", "INPUT"]
    nat = [j for j in JUMP_RULES if j.table == "nat"]
    assert [(j.chain, j.target) for j in nat] == [
        ("OUTPUT", "KUBE-SERVICES"), ("PREROUTING", "KUBE-SERVICES"), ("POSTROUTING", "KUBE-POSTROUTING"),
    ]
    assert nat[2].args == ("-m", "comment", "--comment", "kubernetes postrouting rules", "-j", "KUBE-POSTROUTING")
    assert JUMP_RULES[-1].args == ("-j", "KUBE-FIREWALL")  # kubelet's chain: no comment


# --- service map / endpoints map -----------------------------------------------------


def test_headless_and_external_name_are_ignored():
    objs = [
        service("somewhere-else", "headless", cluster_ip="None", type="ClusterIP", ports=[port("rpc", 1234, "UDP")]),
        service("somewhere-else", "headless-without-port", cluster_ip="None", type="ClusterIP", ports=[]),
        service("somewhere-else", "external-name", cluster_ip="172.30.55.4", type="ExternalName", ports=[port("blah", 1235, "UDP")], externalName="foo2.bar.com"),
    ]
    assert build_service_map(objs) == {}


def test_build_service_map_ports_and_health_checks():
    objs = {"kind": "List", "items": [
        service("somewhere-else", "cluster-ip", cluster_ip="172.30.55.4", type="ClusterIP",
                ports=[port("something", 1234, "UDP"), port("somethingelse", 1235, "UDP"), port("sctpport", 1236, "SCTP")]),
        service("somewhere", "only-local-load-balancer", cluster_ip="172.30.55.12", type="LoadBalancer",
                ports=[port("foobar2", 8677, "UDP", 30063, 7002), port("baz", 8678, "UDP", 30064, 7003)],
                lb_ips=["5.6.7.8"], externalTrafficPolicy="Local", healthCheckNodePort=345),
    ]}
    svcs = build_service_map([objs])
    assert len(svcs) == 5
    from testbed.proxy.servicemap import health_check_node_ports

    assert health_check_node_ports(svcs) == {NamespacedName("somewhere", "only-local-load-balancer"): 345}
    sctp = svcs[ServicePortName("somewhere-else", "cluster-ip", "sctpport", "SCTP")]
    assert (sctp.cluster_ip, sctp.port, sctp.protocol) == ("172.30.55.4", 1236, "SCTP")


def test_endpoint_slice_conversion_rules():
    objs = [
        service("ns1", "svc1", cluster_ip="172.30.0.41", ports=[port("p80", 80)]),
        eslice("ns1", "svc1", [
            ep("10.0.0.1"),  # no conditions at all: ready
            ep("10.0.0.2", ready=False, serving=True, terminating=True),
            ep("10.0.0.3", ready=False, serving=True, terminating=True),
        ], [eport("p80", 80), {"port": 81, "protocol": "TCP"}, {"name": "zero", "port": 0}]),
        # the same IP again in another slice, not terminating: that copy wins
        eslice("ns1", "svc1", [ep("10.0.0.3", ready=True)], [eport("p80", 80)], num=2),
        # ... and a later terminating copy does not replace it
        eslice("ns1", "svc1", [ep("10.0.0.3", ready=False, terminating=True)], [eport("p80", 80)], num=4),
        # wrong address type, no service-name label: ignored
        eslice("ns1", "svc1", [ep("fd00::1")], [eport("p80", 80)], num=3, address_type="IPv6"),
        {"kind": "EndpointSlice", "addressType": "IPv4", "metadata": {"namespace": "ns1", "name": "x"},
         "endpoints": [ep("10.9.9.9")], "ports": [eport("p80", 80)]},
    ]
    eps = build_endpoints_map(objs)
    assert list(eps) == [ServicePortName("ns1", "svc1", "p80", "TCP")]
    got = eps[ServicePortName("ns1", "svc1", "p80", "TCP")]
    assert [(str(e), e.ready, e.serving, e.terminating) for e in got] == [
        ("10.0.0.1:80", True, True, False),
        ("10.0.0.2:80", False, True, True),
        ("10.0.0.3:80", True, True, False),
    ]


def test_endpoints_of_a_slice_are_only_read_for_a_usable_port():
    """kube-proxy reads a slice's endpoints per usable port: a slice whose ports are all
    ignored contributes nothing, whatever its endpoints hold."""
    def sl(ports, endpoints):  # noqa: ANN001, ANN202
        return {"kind": "EndpointSlice", "addressType": "IPv4", "ports": ports, "endpoints": endpoints,
                "metadata": {"namespace": "ns1", "name": "s", "labels": {"kubernetes.io/service-name": "svc1"}}}

    assert build_endpoints_map([sl([{"name": "", "port": "abc"}], [])]) == {}
    assert build_endpoints_map([sl([{"port": 80}], [dict(ep("10.0.0.1"), hints={"forZones": ["z"]})])]) == {}
    assert build_endpoints_map([sl([{"name": "p", "port": 0}], [None])]) == {}


def test_load_balancer_ip_mode_proxy_is_ignored():
    """TestLoadBalancerIngressRouteTypeProxy."""
    for mode, want in (("Proxy", False), ("VIP", True), (None, True)):
        obj = service("ns1", "svc1", cluster_ip="10.20.30.41", type="LoadBalancer", ports=[port("p80", 80, node_port=3001)])
        ing = {"ip": "1.2.3.4"}
        if mode:
            ing["ipMode"] = mode
        obj["status"] = {"loadBalancer": {"ingress": [ing]}}
        r = render([obj, eslice("ns1", "svc1", [ep("10.180.0.1")], [eport("p80", 80)])])
        rules = parse_iptables_dump(r.text).get_chain("nat", "KUBE-SERVICES").rules
        assert any(x.destination_address and x.destination_address.value == "1.2.3.4" for x in rules) == want


def test_categorize_endpoints_topology_hints():
    svc = ServicePort(cluster_ip="172.30.0.1", port=80)
    eps = [
        Endpoint("10.0.0.1", 80, zone_hints=frozenset({"zone-a"})),
        Endpoint("10.0.0.2", 80, zone_hints=frozenset({"zone-b"})),
        Endpoint("10.0.0.3", 80, zone_hints=frozenset({"zone-a"}), ready=False, serving=True, terminating=True),
    ]
    cluster, local, reachable, has_any = categorize_endpoints(eps, svc, "n1", {"topology.kubernetes.io/zone": "zone-a"})
    assert [str(e) for e in cluster] == ["10.0.0.1:80"] and reachable == cluster and has_any and local == []
    # no hint for our zone: hints ignored
    cluster, *_ = categorize_endpoints(eps, svc, "n1", {"topology.kubernetes.io/zone": "zone-c"})
    assert [str(e) for e in cluster] == ["10.0.0.1:80", "10.0.0.2:80"]
    # not ready, serving, not terminating (inconsistent, but kube-proxy's rule is
    # "serving AND terminating") is never used
    cluster, _, _, has_any = categorize_endpoints([Endpoint("10.0.0.4", 80, ready=False)], svc, "n1")
    assert cluster == [] and not has_any
    local_svc = replace(svc, internal_policy_local=True)
    cluster, local, _, has_any = categorize_endpoints([Endpoint("10.0.0.4", 80, ready=False, node_name="n1")], local_svc, "n1")
    assert (cluster, local, has_any) == ([], [], False)
    # only serving-terminating endpoints: fall back to them
    cluster, _, _, has_any = categorize_endpoints(eps[2:], svc, "n1")
    assert [str(e) for e in cluster] == ["10.0.0.3:80"] and has_any


# --- packet flows: port of kube-proxy's tracePacket / runPacketFlowTests ----------------


def _address_matches(value, ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if "/" in value.value:
        net = ipaddress.ip_network(value.value, strict=False)
        matched = addr.version == net.version and addr in net
    else:
        matched = addr == ipaddress.ip_address(value.value)
    return matched != value.negated


class Tracer:
    def __init__(self, text: str, node_ips=TEST_NODE_IPS):
        self.dump = parse_iptables_dump(text)
        self.local_ips = {"127.0.0.1", "::1", *node_ips}
        self.matches: list[str] = []
        self.outputs: list[str] = []
        self.mark_masq = False

    def rule_matches(self, rule, src, proto, dst, dport) -> bool:
        if rule.source_address is not None and not _address_matches(rule.source_address, src):
            return False
        if rule.source_type is not None and not rule.source_type.matches("LOCAL" if src in self.local_ips else "not-matched"):
            return False
        if rule.protocol is not None and not rule.protocol.matches(proto):
            return False
        if rule.destination_address is not None and not _address_matches(rule.destination_address, dst):
            return False
        if rule.destination_type is not None and not rule.destination_type.matches("LOCAL" if dst in self.local_ips else "not-matched"):
            return False
        if rule.destination_port is not None and not rule.destination_port.matches(dport):
            return False
        if rule.affinity_check is not None or rule.mark_check is not None or rule.ct_state_check is not None:
            return False
        return True

    def run_chain(self, table, chain, src, proto, dst, dport) -> bool:
        c = self.dump.get_chain(table, chain)
        if c is None:
            return False
        for rule in c.rules:
            if rule.jump is None or not self.rule_matches(rule, src, proto, dst, dport):
                continue
            self.matches.append(rule.raw)
            target = rule.jump.value
            if target == "KUBE-MARK-MASQ":
                self.mark_masq = True
                continue
            if target in ("ACCEPT", "REJECT", "DROP"):
                self.outputs.append(target)
                return True
            if target == "DNAT":
                self.outputs.append(rule.dnat_destination.value)
                return True
            terminated = self.run_chain(table, target, src, proto, dst, dport)
            if terminated and rule.probability is None:
                return True
        return False


def trace_packet(text, src, proto, dst, dport):
    t = Tracer(text)
    # nat PREROUTING only jumps to KUBE-SERVICES (a jump rule kube-proxy ensures)
    t.run_chain("nat", "KUBE-SERVICES", src, proto, dst, dport)
    if t.outputs:
        dst = t.outputs[0].split(":")[0]
    for chain in ("KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL"):
        t.run_chain("filter", chain, src, proto, dst, dport)
    return t.matches, ", ".join(t.outputs), t.mark_masq


def run_flows(text, flows):
    """flows: (name, source, dest, port, output, masq[, protocol])."""
    errors = []
    for flow in flows:
        name, src, dst, dport, output, masq = flow[:6]
        proto = (flow[6] if len(flow) > 6 else "TCP").lower()
        matches, got, got_masq = trace_packet(text, src, proto, dst, str(dport))
        if got != output or got_masq != masq:
            errors.append(f"{name}: expected {output!r}/{masq}, got {got!r}/{got_masq}\n  " + "\n  ".join(matches))
    assert not errors, "\n".join(errors)


def test_trace_overall_vector():
    """TestTracePacket's flows, on vector 1's expected rules."""
    text = (OVERALL / "expected.txt").read_text()
    run_flows(text, [
        ("no match", "10.0.0.2", "10.0.0.3", 80, "", False),
        ("single endpoint", "10.0.0.2", "172.30.0.41", 80, "10.180.0.1:80", False),
        ("multiple endpoints", "10.0.0.2", "172.30.0.44", 80, "10.180.0.4:80, 10.180.0.5:80", False),
        ("LOCAL, KUBE-MARK-MASQ", TEST_NODE_IP, "192.168.99.22", 80, "10.180.0.2:80", True),
        ("DROP", TEST_EXTERNAL_CLIENT, "192.168.99.22", 80, "DROP", False),
        ("ACCEPT (NodePortHealthCheck)", TEST_NODE_IP, TEST_NODE_IP, 30000, "ACCEPT", False),
        ("REJECT", "10.0.0.2", "172.30.0.46", 80, "REJECT", False),
    ])


def test_no_endpoints_reject():
    text = render([
        service("ns1", "svc1", cluster_ip="172.30.0.41", type="LoadBalancer", externalIPs=["192.168.99.11"],
                ports=[port("p80", 80, node_port=3001)], lb_ips=["1.2.3.4"]),
    ]).text
    run_flows(text, [
        ("pod to cluster IP with no endpoints", "10.0.0.2", "172.30.0.41", 80, "REJECT", False),
        ("external to external IP with no endpoints", TEST_EXTERNAL_CLIENT, "192.168.99.11", 80, "REJECT", False),
        ("pod to NodePort with no endpoints", "10.0.0.2", TEST_NODE_IP, 3001, "REJECT", False),
        ("external to NodePort with no endpoints", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3001, "REJECT", False),
        ("pod to LoadBalancer IP with no endpoints", "10.0.0.2", "1.2.3.4", 80, "REJECT", False),
        ("external to LoadBalancer IP with no endpoints", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, "REJECT", False),
    ])


def test_cluster_ip_general():
    text = render([
        service("ns1", "svc1", cluster_ip="172.30.0.41", ports=[port("http", 80)]),
        service("ns2", "svc2", cluster_ip="172.30.0.42", ports=[
            port("http", 80), port("https", 443, target_port=8443), port("dns-udp", 53, "UDP"),
            port("dns-tcp", 53, target_port=5353), port("dns-sctp", 53, "SCTP"),
        ]),
        eslice("ns1", "svc1", [ep("10.180.0.1", node=TEST_NODE_NAME)], [eport("http", 80)]),
        eslice("ns2", "svc2", [ep("10.180.0.1", node=TEST_NODE_NAME), ep("10.180.2.1", node="node2")], [
            eport("http", 80), eport("https", 8443), eport("dns-udp", 53, "UDP"), eport("dns-tcp", 5353), eport("dns-sctp", 53, "SCTP"),
        ]),
    ]).text
    run_flows(text, [
        ("simple clusterIP", "10.180.0.2", "172.30.0.41", 80, "10.180.0.1:80", False),
        ("hairpin to cluster IP", "10.180.0.1", "172.30.0.41", 80, "10.180.0.1:80", True),
        ("clusterIP with multiple endpoints", "10.180.0.2", "172.30.0.42", 80, "10.180.0.1:80, 10.180.2.1:80", False),
        ("clusterIP with TargetPort", "10.180.0.2", "172.30.0.42", 443, "10.180.0.1:8443, 10.180.2.1:8443", False),
        ("TCP", "10.180.0.2", "172.30.0.42", 53, "10.180.0.1:5353, 10.180.2.1:5353", False, "TCP"),
        ("UDP", "10.180.0.2", "172.30.0.42", 53, "10.180.0.1:53, 10.180.2.1:53", False, "UDP"),
        ("SCTP", "10.180.0.2", "172.30.0.42", 53, "10.180.0.1:53, 10.180.2.1:53", False, "SCTP"),
        ("TCP-only port does not match UDP traffic", "10.180.0.2", "172.30.0.42", 80, "", False, "UDP"),
        ("svc1 does not accept svc2's ports", "10.180.0.2", "172.30.0.41", 443, "", False),
    ])


def test_load_balancer_source_ranges():
    """TestLoadBalancer."""
    r = render([
        service("ns1", "svc1", cluster_ip="172.30.0.41", type="LoadBalancer", ports=[port("p80", 80, node_port=3001)],
                lb_ips=["1.2.3.4", "5.6.7.8"], loadBalancerSourceRanges=["192.168.0.0/24", " 203.0.113.0/25"]),
        eslice("ns1", "svc1", [ep("10.180.0.1")], [eport("p80", 80)]),
    ])
    fw = "KUBE-FW-XPGD46QRK7WJZT7O"
    ext = "KUBE-EXT-XPGD46QRK7WJZT7O"
    # the node IP is inside a source range, so the LB IPs are allowed as sources too
    assert chain_rules(r.text, "nat", fw) == (
        f'-A {fw} -m comment --comment "ns1/svc1:p80 loadbalancer IP" -s 192.168.0.0/24 -j {ext}\n'
        f'-A {fw} -m comment --comment "ns1/svc1:p80 loadbalancer IP" -s 203.0.113.0/25 -j {ext}\n'
        f'-A {fw} -m comment --comment "ns1/svc1:p80 loadbalancer IP" -s 1.2.3.4 -j {ext}\n'
        f'-A {fw} -m comment --comment "ns1/svc1:p80 loadbalancer IP" -s 5.6.7.8 -j {ext}\n'
        f'-A {fw} -m comment --comment "other traffic to ns1/svc1:p80 will be dropped by KUBE-PROXY-FIREWALL"\n'
    )
    out = "10.180.0.1:80"
    run_flows(r.text, [
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


def etp_objects(policy):
    return [
        service("ns1", "svc1", cluster_ip="172.30.0.41", type="LoadBalancer", externalTrafficPolicy=policy,
                externalIPs=["192.168.99.11"], ports=[port("p80", 80, node_port=3001, target_port=80)],
                healthCheckNodePort=30000, lb_ips=["1.2.3.4"]),
        eslice("ns1", "svc1", [ep("10.180.0.1"), ep("10.180.2.1", node=TEST_NODE_NAME)], [eport("p80", 80)]),
    ]


def test_external_traffic_policy_local():
    r = render(etp_objects("Local"))
    both, local = "10.180.0.1:80, 10.180.2.1:80", "10.180.2.1:80"
    run_flows(r.text, [
        ("pod to cluster IP hits both endpoints, unmasqueraded", "10.0.0.2", "172.30.0.41", 80, both, False),
        ("pod to external IP hits both endpoints, unmasqueraded", "10.0.0.2", "192.168.99.11", 80, both, False),
        ("external to external IP hits only local endpoint, unmasqueraded", TEST_EXTERNAL_CLIENT, "192.168.99.11", 80, local, False),
        ("pod to LB IP hits only both endpoints, unmasqueraded", "10.0.0.2", "1.2.3.4", 80, both, False),
        ("external to LB IP hits only local endpoint, unmasqueraded", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, local, False),
        ("pod to NodePort hits both endpoints, unmasqueraded", "10.0.0.2", TEST_NODE_IP, 3001, both, False),
        ("external to NodePort hits only local endpoint, unmasqueraded", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3001, local, False),
    ])
    ext, svl = "KUBE-EXT-XPGD46QRK7WJZT7O", "KUBE-SVL-XPGD46QRK7WJZT7O"
    assert chain_rules(r.text, "nat", ext).splitlines()[-1] == f"-A {ext} -j {svl}"
    assert r.health_check_node_ports == {NamespacedName("ns1", "svc1"): 30000}
    assert chain_rules(r.text, "filter", "KUBE-NODEPORTS") == (
        '-A KUBE-NODEPORTS -m comment --comment "ns1/svc1:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT\n'
    )


def test_external_traffic_policy_cluster():
    r = render(etp_objects("Cluster"))
    both = "10.180.0.1:80, 10.180.2.1:80"
    run_flows(r.text, [
        ("pod to cluster IP hits both endpoints, unmasqueraded", "10.0.0.2", "172.30.0.41", 80, both, False),
        ("pod to external IP hits both endpoints, masqueraded", "10.0.0.2", "192.168.99.11", 80, both, True),
        ("external to external IP hits both endpoints, masqueraded", TEST_EXTERNAL_CLIENT, "192.168.99.11", 80, both, True),
        ("pod to LB IP hits both endpoints, masqueraded", "10.0.0.2", "1.2.3.4", 80, both, True),
        ("external to LB IP hits both endpoints, masqueraded", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, both, True),
        ("pod to NodePort hits both endpoints, masqueraded", "10.0.0.2", TEST_NODE_IP, 3001, both, True),
        ("external to NodePort hits both endpoints, masqueraded", TEST_EXTERNAL_CLIENT, TEST_NODE_IP, 3001, both, True),
    ])
    assert "KUBE-SVL-" not in r.text and r.health_check_node_ports == {}


@pytest.mark.parametrize(
    "policy, nodes, output",
    [
        ("Cluster", [TEST_NODE_NAME, "node1", "node2"], "10.0.1.1:80, 10.0.1.2:80, 10.0.1.3:80"),
        ("Local", [TEST_NODE_NAME, "node1", "node2"], "10.0.1.1:80"),
        ("Local", [TEST_NODE_NAME, TEST_NODE_NAME, "node2"], "10.0.1.1:80, 10.0.1.2:80"),
        ("Local", ["node0", "node1", "node2"], "DROP"),
    ],
)
def test_internal_traffic_policy(policy, nodes, output):
    objs = itp_local_objects(nodes)
    objs[0]["spec"]["internalTrafficPolicy"] = policy
    run_flows(render(objs).text, [("pod to ClusterIP", "10.0.0.2", "172.30.1.1", 80, output, False)])
    run_flows(render(objs[:1]).text, [("endpoints deleted", "10.0.0.2", "172.30.1.1", 80, "REJECT", False)])


TERMINATING_CASES = {
    "ready endpoints exist": [
        ep("10.0.1.1", TEST_NODE_NAME, True, True, False),
        ep("10.0.1.2", TEST_NODE_NAME, True, True, False),
        ep("10.0.1.3", TEST_NODE_NAME, False, True, True),
        ep("10.0.1.4", TEST_NODE_NAME, False, False, True),
        ep("10.0.1.5", "node-1", True, True, False),
    ],
    "only terminating endpoints exist": [
        ep("10.0.1.2", TEST_NODE_NAME, False, True, True),
        ep("10.0.1.3", TEST_NODE_NAME, False, True, True),
        ep("10.0.1.4", TEST_NODE_NAME, False, False, True),
        ep("10.0.1.5", "node-1", True, True, False),
    ],
    "terminating endpoints on remote node": [ep("10.0.1.5", "node-1", False, True, True)],
    "no usable endpoints on any node": [
        ep("10.0.1.5", TEST_NODE_NAME, False, False, True),
        ep("10.0.1.5", "node-1", False, False, True),
    ],
}


def terminating_objects(policy, case):
    return [
        service("ns1", "svc1", cluster_ip="172.30.1.1", type="LoadBalancer", externalTrafficPolicy=policy,
                ports=[port("", 80, target_port=80)], healthCheckNodePort=30000, lb_ips=["1.2.3.4"]),
        eslice("ns1", "svc1", TERMINATING_CASES[case], [eport("", 80)]),
    ]


@pytest.mark.parametrize(
    "case, to_cluster_ip, to_lb",
    [
        ("ready endpoints exist", "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80", "10.0.1.1:80, 10.0.1.2:80"),
        ("only terminating endpoints exist", "10.0.1.5:80", "10.0.1.2:80, 10.0.1.3:80"),
        ("terminating endpoints on remote node", "10.0.1.5:80", "DROP"),
        ("no usable endpoints on any node", "REJECT", "REJECT"),
    ],
)
def test_terminating_endpoints_traffic_policy_local(case, to_cluster_ip, to_lb):
    objs = terminating_objects("Local", case)
    run_flows(render(objs).text, [
        ("pod to clusterIP", "10.0.0.2", "172.30.1.1", 80, to_cluster_ip, False),
        ("external to LB", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, to_lb, False),
    ])
    run_flows(render(objs[:1]).text, [
        ("pod to clusterIP after endpoints deleted", "10.0.0.2", "172.30.1.1", 80, "REJECT", False),
        ("external to LB after endpoints deleted", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, "REJECT", False),
    ])


TERMINATING_CLUSTER_CASES = {
    "ready endpoints exist": [
        ep("10.0.1.1", TEST_NODE_NAME, True, True, False),
        ep("10.0.1.2", TEST_NODE_NAME, True, True, False),
        ep("10.0.1.3", "another-node", False, True, True),
        ep("10.0.1.4", "another-node", False, False, True),
        ep("10.0.1.5", "another-node", True, True, False),
    ],
    "only terminating endpoints exist": [
        ep("10.0.1.2", TEST_NODE_NAME, False, True, True),
        ep("10.0.1.3", TEST_NODE_NAME, False, True, True),
        ep("10.0.1.4", "another-node", False, False, True),
        ep("10.0.1.5", "another-node", False, True, True),
    ],
    "terminating endpoints on remote node": [ep("10.0.1.5", "node-1", False, True, True)],
    "no usable endpoints on any node": [
        ep("10.0.1.5", TEST_NODE_NAME, False, False, True),
        ep("10.0.1.5", "node-1", False, False, True),
    ],
}


@pytest.mark.parametrize(
    "case, output, masq",
    [
        ("ready endpoints exist", "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80", True),
        ("only terminating endpoints exist", "10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80", True),
        ("terminating endpoints on remote node", "10.0.1.5:80", True),
        ("no usable endpoints on any node", "REJECT", False),
    ],
)
def test_terminating_endpoints_traffic_policy_cluster(case, output, masq):
    objs = terminating_objects("Cluster", case)
    objs[1]["endpoints"] = TERMINATING_CLUSTER_CASES[case]
    run_flows(render(objs).text, [
        ("pod to clusterIP", "10.0.0.2", "172.30.1.1", 80, output, False),
        ("external to LB", TEST_EXTERNAL_CLIENT, "1.2.3.4", 80, output, masq),
    ])


def internal_external_objects():
    objs = []
    for i, extra in enumerate(({}, {"externalTrafficPolicy": "Local"}, {"internalTrafficPolicy": "Local"}), start=1):
        objs.append(service(f"ns{i}", f"svc{i}", cluster_ip=f"172.30.0.4{i}", type="LoadBalancer",
                            ports=[port("p80", 80, node_port=3000 + i)], healthCheckNodePort=30000 + i,
                            lb_ips=[("1.2.3.4", "5.6.7.8", "9.10.11.12")[i - 1]], **extra))
        objs.append(eslice(f"ns{i}", f"svc{i}", [ep(f"10.180.0.{i}", TEST_NODE_NAME), ep(f"10.180.1.{i}", "remote")], [eport("p80", 80)]))
    return objs


def _flows_internal_external():
    n, e, lo = TEST_NODE_IP, TEST_EXTERNAL_CLIENT, "127.0.0.1"
    s1, s2, s3 = "10.180.0.1:80, 10.180.1.1:80", "10.180.0.2:80, 10.180.1.2:80", "10.180.0.3:80, 10.180.1.3:80"
    return [
        ("pod to ClusterIP", "10.0.0.2", "172.30.0.41", 80, s1, False),
        ("pod to NodePort", "10.0.0.2", n, 3001, s1, True),
        ("pod to LB", "10.0.0.2", "1.2.3.4", 80, s1, True),
        ("node to ClusterIP", n, "172.30.0.41", 80, s1, True),
        ("node to NodePort", n, n, 3001, s1, True),
        ("localhost to NodePort", lo, lo, 3001, s1, True),
        ("node to LB", n, "1.2.3.4", 80, s1, True),
        ("external to ClusterIP", e, "172.30.0.41", 80, s1, True),
        ("external to NodePort", e, n, 3001, s1, True),
        ("external to LB", e, "1.2.3.4", 80, s1, True),
        ("pod to ClusterIP with eTP:Local", "10.0.0.2", "172.30.0.42", 80, s2, False),
        ("pod to NodePort with eTP:Local", "10.0.0.2", n, 3002, s2, False),
        ("pod to LB with eTP:Local", "10.0.0.2", "5.6.7.8", 80, s2, False),
        ("node to ClusterIP with eTP:Local", n, "172.30.0.42", 80, s2, True),
        ("node to NodePort with eTP:Local", n, n, 3001, s1, True),
        ("localhost to NodePort with eTP:Local", lo, lo, 3002, s2, True),
        ("node to LB with eTP:Local", n, "5.6.7.8", 80, s2, True),
        ("external to ClusterIP with eTP:Local", e, "172.30.0.42", 80, s2, True),
        ("external to NodePort with eTP:Local", e, n, 3002, "10.180.0.2:80", False),
        ("external to LB with eTP:Local", e, "5.6.7.8", 80, "10.180.0.2:80", False),
        ("pod to ClusterIP with iTP:Local", "10.0.0.2", "172.30.0.43", 80, "10.180.0.3:80", False),
        ("pod to NodePort with iTP:Local", "10.0.0.2", n, 3003, s3, True),
        ("pod to LB with iTP:Local", "10.0.0.2", "9.10.11.12", 80, s3, True),
        ("node to ClusterIP with iTP:Local", n, "172.30.0.43", 80, "10.180.0.3:80", True),
        ("node to NodePort with iTP:Local", n, n, 3003, s3, True),
        ("localhost to NodePort with iTP:Local", lo, lo, 3003, s3, True),
        ("node to LB with iTP:Local", n, "9.10.11.12", 80, s3, True),
        ("external to ClusterIP with iTP:Local", e, "172.30.0.43", 80, "10.180.0.3:80", True),
        ("external to NodePort with iTP:Local", e, n, 3003, s3, True),
        ("external to LB with iTP:Local", e, "9.10.11.12", 80, s3, True),
    ]


_NO_DETECTOR = {
    "node to ClusterIP": {"masq": False},
    "node to ClusterIP with eTP:Local": {"masq": False},
    "node to ClusterIP with iTP:Local": {"masq": False},
    "external to ClusterIP": {"masq": False},
    "external to ClusterIP with eTP:Local": {"masq": False},
    "external to ClusterIP with iTP:Local": {"masq": False},
    "pod to NodePort with eTP:Local": {"output": "10.180.0.2:80"},
    "pod to LB with eTP:Local": {"output": "10.180.0.2:80"},
}
_MASQ_ALL = {
    "pod to ClusterIP": {"masq": True},
    "pod to ClusterIP with eTP:Local": {"masq": True},
    "pod to ClusterIP with iTP:Local": {"masq": True},
}


@pytest.mark.parametrize(
    "masquerade_all, detector, overrides",
    [
        (False, True, {}),
        (False, False, _NO_DETECTOR),
        (True, True, _MASQ_ALL),
        (True, False, {**_MASQ_ALL, **{k: v for k, v in _NO_DETECTOR.items() if "output" in v}}),
    ],
    ids=["base", "no LocalTrafficDetector", "masqueradeAll", "masqueradeAll, no LocalTrafficDetector"],
)
def test_internal_external_masquerade(masquerade_all, detector, overrides):
    r = render(internal_external_objects(), masquerade_all=masquerade_all, cluster_cidr="10.0.0.0/8" if detector else None)
    flows = []
    applied = 0
    for name, src, dst, dport, output, masq in _flows_internal_external():
        o = overrides.get(name, {})
        applied += bool(o)
        flows.append((name, src, dst, dport, o.get("output", output), o.get("masq", masq)))
    assert applied == len(overrides)
    run_flows(r.text, flows)


def test_sync_all_one_node_at_a_time(monkeypatch, tmp_path):
    """parallel=False: each node's kube-proxy runs alone (the experiments time syncs that
    way); the default runs them at once."""
    import threading
    import time as _time

    from testbed import conntrack, kubeproxy
    from testbed.model import Cluster, Network, Node

    spans: list[tuple[float, float]] = []
    lock = threading.Lock()

    class Fake:
        def __init__(self, node):
            self.node = node

        def sync(self, objects, full, maps):
            t0 = _time.perf_counter()
            _time.sleep(0.05)
            with lock:
                spans.append((t0, _time.perf_counter()))
            return self.node.name

    monkeypatch.setattr(kubeproxy, "proxier_for", lambda cluster, node, settings, state_dir: Fake(node))
    monkeypatch.setattr(conntrack, "clean_stale_entries", lambda *a, **k: None)
    nodes = [Node(name=f"n{i}", ip=f"192.168.56.1{i}", pod_cidr=f"10.233.{64 + i}.0/24", pod_gateway=f"10.233.{64 + i}.1",
                  netns=f"tb-x-n{i}") for i in range(3)]
    cluster = Cluster(name="x", run_id="x", nodes=nodes, network=Network())

    def overlaps() -> bool:
        s = sorted(spans)
        return any(b[0] < a[1] for a, b in zip(s, s[1:]))

    assert kubeproxy.sync_all(cluster, [], {}, tmp_path, parallel=False) == ["n0", "n1", "n2"]
    assert not overlaps()
    spans.clear()
    kubeproxy.sync_all(cluster, [], {}, tmp_path)
    assert overlaps()
