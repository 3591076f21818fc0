"""kube-proxy's iptables mode as a pure function.

:func:`render_iptables` returns exactly the buffer kube-proxy's ``syncProxyRules``
(``pkg/proxy/iptables/proxier.go``, read at ``531be812``, v1.34-era master) feeds to
``iptables-restore --noflush --counters``: ``*filter``, chain lines, rules, ``COMMIT``,
``*nat``, chain lines, rules, ``COMMIT``. Rules are written in the order ``syncProxyRules``
writes them; where kube-proxy iterates a Go map (the service map, the set of stale
chains, the matching node IPs) this module uses a sorted order instead, so the output
is deterministic. Compare with kube-proxy's test expectations after
:func:`testbed.proxy.normalize.sort_iptables_rules`, as kube-proxy's own tests do.

Text conventions copied from kube-proxy (not from ``iptables-save``, which prints rules
differently: ``-d 172.30.0.41/32``, matches reordered, every non-alphanumeric comment
quoted): multi-word comments are written wrapped in ``"``; the bare service-port name
comment (``--comment ns1/svc1:p80``) is written unquoted.

Things kube-proxy does outside the restore buffer are returned as data in
:class:`IPTablesRender` for an applier: the jump rules from the built-in chains
(:data:`JUMP_RULES`, ``iptables -C`` / ``-I`` on full syncs only), the nfacct counters to
create, the canary chains. Partial syncs and stale-chain deletion: see
:func:`render_iptables_sync`.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Iterator, Mapping, NamedTuple, Sequence

from .types import (
    Endpoint,
    NodePortAddresses,
    ProxierFlags,
    changed_service_names,
    format_masquerade_mark,
    NamespacedName,
    ServicePort,
    ServicePortName,
    categorize_endpoints,
)

__all__ = [
    "IPTablesConfig",
    "IPTablesRender",
    "JumpRule",
    "JUMP_RULES",
    "CANARY_CHAIN",
    "CANARY_TABLES",
    "NFACCT_COUNTERS",
    "LARGE_CLUSTER_ENDPOINTS_THRESHOLD",
    "render_iptables",
    "render_iptables_sync",
    "IPTablesSync",
    "chains_from_iptables_save",
    "is_service_chain_name",
    "port_proto_hash",
    "service_port_endpoint_chain_name",
    "compute_probability",
    "format_masquerade_mark",
]

# Chain names (proxier.go constants).
KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_FIREWALL = "KUBE-FIREWALL"  # duplicate of kubelet's chain
#: ``kubeProxyCanaryChain``, created by ``ipt.Monitor`` in :data:`CANARY_TABLES`; if it
#: disappears, something flushed the tables and kube-proxy forces a full sync.
CANARY_CHAIN = "KUBE-PROXY-CANARY"
CANARY_TABLES = ("mangle", "nat", "filter")

SVC_PREFIX = "KUBE-SVC-"
SVL_PREFIX = "KUBE-SVL-"
FW_PREFIX = "KUBE-FW-"
EXT_PREFIX = "KUBE-EXT-"
SEP_PREFIX = "KUBE-SEP-"
_SERVICE_CHAIN_PREFIXES = (SVC_PREFIX, SVL_PREFIX, SEP_PREFIX, FW_PREFIX, EXT_PREFIX)

#: ``largeClusterEndpointsThreshold``: above this many endpoints (summed over the service
#: map), per-endpoint comments are dropped.
LARGE_CLUSTER_ENDPOINTS_THRESHOLD = 1000

#: ``metrics.IPTablesCTStateInvalidDroppedNFAcctCounter``
NFACCT_CT_STATE_INVALID_DROPPED = "ct_state_invalid_dropped_pkts"
#: ``metrics.LocalhostNodePortAcceptedNFAcctCounter``
NFACCT_LOCALHOST_NODEPORT_ACCEPTED = "localhost_nps_accepted_pkts"
NFACCT_COUNTERS = (NFACCT_CT_STATE_INVALID_DROPPED, NFACCT_LOCALHOST_NODEPORT_ACCEPTED)

_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_MUST_BE_LAST = '"kubernetes service nodeports; NOTE: this must be the last rule in this chain"'


# --- base-chain jump rules (iptablesJumpChains + iptablesKubeletJumpChains) -----------


@dataclass(frozen=True, slots=True)
class JumpRule:
    """A jump from a built-in chain that kube-proxy ensures with ``EnsureChain(table,
    target)`` then ``EnsureRule(Prepend, table, chain, args...)`` on every full sync.

    ``args`` are the rule arguments after ``-t table -I chain``; the comment is one
    argv element (no quotes). ``iptables -w -t T -C CHAIN args`` tests for it;
    ``iptables -w -t T -I CHAIN args`` prepends it. Because each is prepended, on an
    empty table the final order in a built-in chain is the reverse of :data:`JUMP_RULES`.
    """

    table: str
    chain: str
    target: str
    args: tuple[str, ...]

    def check_argv(self) -> list[str]:
        return ["-t", self.table, "-C", self.chain, *self.args]

    def insert_argv(self) -> list[str]:
        return ["-t", self.table, "-I", self.chain, *self.args]


def _jump(table: str, target: str, chain: str, comment: str, extra: Sequence[str] = ()) -> JumpRule:
    args = list(extra)
    if comment:
        args += ["-m", "comment", "--comment", comment]
    args += ["-j", target]
    return JumpRule(table, chain, target, tuple(args))


_NEW = ("-m", "conntrack", "--ctstate", "NEW")

#: In kube-proxy's order (``iptablesJumpChains`` then ``iptablesKubeletJumpChains``).
JUMP_RULES: tuple[JumpRule, ...] = (
    _jump("filter", KUBE_EXTERNAL_SERVICES, "INPUT", "kubernetes externally-visible service portals", _NEW),
    _jump("filter", KUBE_EXTERNAL_SERVICES, "FORWARD", "kubernetes externally-visible service portals", _NEW),
    _jump("filter", KUBE_NODEPORTS, "INPUT", "kubernetes health check service ports"),
    _jump("filter", KUBE_SERVICES, "FORWARD", "kubernetes service portals", _NEW),
    _jump("filter", KUBE_SERVICES, "OUTPUT", "kubernetes service portals", _NEW),
    _jump("filter", KUBE_FORWARD, "FORWARD", "kubernetes forwarding rules"),
    _jump("filter", KUBE_PROXY_FIREWALL, "INPUT", "kubernetes load balancer firewall", _NEW),
    _jump("filter", KUBE_PROXY_FIREWALL, "OUTPUT", "kubernetes load balancer firewall", _NEW),
    _jump("filter", KUBE_PROXY_FIREWALL, "FORWARD", "kubernetes load balancer firewall", _NEW),
    _jump("nat", KUBE_SERVICES, "OUTPUT", "kubernetes service portals"),
    _jump("nat", KUBE_SERVICES, "PREROUTING", "kubernetes service portals"),
    _jump("nat", KUBE_POSTROUTING, "POSTROUTING", "kubernetes postrouting rules"),
    _jump("filter", KUBE_FIREWALL, "INPUT", ""),
    _jump("filter", KUBE_FIREWALL, "OUTPUT", ""),
)


# --- names, hashes, probabilities ---------------------------------------------------


#: Two base32 characters (Go's ``base32.StdEncoding`` alphabet) per 10-bit value.
_B32_PAIRS = tuple(a + b for a in "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567" for b in "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


def _b32_16(data: str) -> str:
    """The first 16 characters of base32(sha256(data)). Base32 writes each 5 bytes as 8
    characters on their own, so these 16 are the encoding of the digest's first 10
    bytes: 80 bits, 8 table lookups of 10 bits (``base64.b32encode`` is a Python loop
    that costs ~4x as much; a cold 10k-Service sync hashes 40k names)."""
    n = int.from_bytes(hashlib.sha256(data.encode()).digest()[:10], "big")
    t = _B32_PAIRS
    return (t[n >> 70] + t[(n >> 60) & 1023] + t[(n >> 50) & 1023] + t[(n >> 40) & 1023]
            + t[(n >> 30) & 1023] + t[(n >> 20) & 1023] + t[(n >> 10) & 1023] + t[n & 1023])


@lru_cache(maxsize=1 << 17)
def port_proto_hash(service_port_name: str, protocol: str) -> str:
    """``portProtoHash``: first 16 chars of base32(sha256(name + lowercase protocol))."""
    return _b32_16(service_port_name + protocol)


@lru_cache(maxsize=1 << 18)
def service_port_endpoint_chain_name(service_port_name: str, protocol: str, endpoint: str) -> str:
    """``servicePortEndpointChainName``: ``KUBE-SEP-`` + 16 chars of
    base32(sha256(name + lowercase protocol + "ip:port"))."""
    return SEP_PREFIX + _b32_16(service_port_name + protocol + endpoint)


def is_service_chain_name(chain: str) -> bool:
    """``isServiceChainName``: a KUBE-SVC-/SVL-/SEP-/FW-/EXT- chain."""
    return chain.startswith(_SERVICE_CHAIN_PREFIXES)


@lru_cache(maxsize=4096)
def compute_probability(n: int) -> str:
    """``computeProbability``: Go ``fmt.Sprintf("%0.10f", 1.0/float64(n))``. Both Go and
    Python round the exact binary value correctly, so the strings agree."""
    return "%0.10f" % (1.0 / n)


def chains_from_iptables_save(text: str) -> set[str]:
    """``utiliptables.GetChainsFromTable``: the chain names declared in
    ``iptables-save -t nat`` output (lines ``:NAME POLICY [p:b]``)."""
    chains = set()
    for line in text.splitlines():
        if line.startswith(":"):
            end = line.find(" ")
            chains.add(line[1:end] if end > 0 else line[1:])
    return chains


# --- configuration ------------------------------------------------------------------


@dataclass
class IPTablesConfig(ProxierFlags):
    """kube-proxy flags/fields that shape the iptables rules (names after the flags).

    * ``hostname_override``: the node name (``--hostname-override``); endpoints whose
      ``nodeName`` equals it are local.
    * ``node_ip``: the node's primary IP (``nodeIPs[family]``); used by
      loadBalancerSourceRanges ("allow from node" rules).
    * ``cluster_cidr``: ``--cluster-cidr`` (comma list allowed; the family's entry is
      used). ``None``/empty: no-op local-traffic detector (no ``-s``/``! -s`` rules).
    * ``masquerade_bit`` (``--iptables-masquerade-bit``, 14) and ``masquerade_mark``: the
      mark string; ``None`` means kube-proxy's own ``%#08x`` formatting (``0x00004000``).
      kube-proxy's unit tests (``NewFakeProxier``) set ``"0x4000"``.
    * ``masquerade_all``: ``--masquerade-all``.
    * ``nodeport_addresses``: ``--nodeport-addresses`` CIDRs; empty (or none of this
      family, or a ``0.0.0.0/0``) means "match all" (``-m addrtype --dst-type LOCAL``).
    * ``node_addresses``: every address on the node's interfaces (``net.InterfaceAddrs``)
      used to resolve ``nodeport_addresses``; ``None`` means ``[node_ip, 127.0.0.1]``.
    * ``localhost_nodeports``: ``--iptables-localhost-nodeports`` (default true). As in
      ``NewProxier`` it is forced off when ``nodeport_addresses`` holds no IPv4 loopback
      address, and for IPv6.
    * ``nfacct``: whether the nfacct counters exist (``nfacct.Ensure`` succeeded); adds
      the ``-m nfacct`` matches.
    * ``random_fully``: ``iptables.HasRandomFully()`` (iptables >= 1.6.2: true on this
      machine; the unit tests' fake says false).
    * ``tcp_be_liberal``: sysctl ``net.netfilter.nf_conntrack_tcp_be_liberal`` != 0: no
      INVALID drop rule.
    * ``ip_family``: ``IPv4`` or ``IPv6`` (the single-stack proxier's family).
    * ``topology_labels``: this node's topology labels (``topology.kubernetes.io/zone``)
      for topology-aware routing; ``prefer_same_traffic_distribution``: that feature gate.
    """

    hostname_override: str = ""
    node_ip: str | None = None
    cluster_cidr: str | None = None
    masquerade_bit: int = 14
    masquerade_mark: str | None = None
    masquerade_all: bool = False
    nodeport_addresses: Sequence[str] = ()
    node_addresses: Sequence[str] | None = None
    localhost_nodeports: bool = True
    nfacct: bool = True
    random_fully: bool = True
    tcp_be_liberal: bool = False
    ip_family: str = "IPv4"
    topology_labels: Mapping[str, str] = field(default_factory=dict)
    prefer_same_traffic_distribution: bool = True

    def localhost_nodeports_enabled(self) -> bool:
        """``localhostNodePorts`` after ``NewProxier``/``NewDualStackProxier``: off for
        IPv6 and when ``--nodeport-addresses`` contains no IPv4 loopback address. Only
        then does kube-proxy set sysctl ``net/ipv4/conf/all/route_localnet=1``."""
        if not self.localhost_nodeports or self.is_ipv6:
            return False
        return NodePortAddresses(self.ip_family, self.nodeport_addresses).contains_ipv4_loopback


# --- result -------------------------------------------------------------------------


@dataclass(frozen=True)
class IPTablesRender:
    """One sync's output.

    * ``text``: the ``iptables-restore --noflush --counters`` input (``""`` from a
      streamed :class:`IPTablesSync` whose caller did not keep it).
    * ``full_sync``: whether every service's chains were written.
    * ``filter_rules_count``: ``sync_proxy_rules_iptables_total{table="filter"}``.
    * ``nat_rules_count``: ``sync_proxy_rules_iptables_total{table="nat"}``: rules that
      exist after this restore (written + kept unchanged - deleted chains).
    * ``nat_rules_synced``: ``sync_proxy_rules_iptables_last{table="nat"}``.
    * ``active_nat_chains``: service chains this sync wants (written or kept).
    * ``deleted_nat_chains``: stale chains flushed and ``-X``\\ ed by ``text``.
    * ``jump_rules`` / ``nfacct_counters``: what kube-proxy ensures outside the restore,
      on full syncs only (empty on partial syncs).
    * ``localhost_nodeports``: the effective setting; when true kube-proxy sets sysctl
      ``net/ipv4/conf/all/route_localnet=1``.
    """

    text: str
    full_sync: bool
    filter_rules_count: int
    nat_rules_count: int
    nat_rules_synced: int
    active_nat_chains: frozenset[str]
    deleted_nat_chains: tuple[str, ...]
    large_cluster_mode: bool
    total_endpoints: int
    no_local_endpoints_internal: int
    no_local_endpoints_external: int
    jump_rules: tuple[JumpRule, ...]
    nfacct_counters: tuple[str, ...]
    health_check_node_ports: Mapping[NamespacedName, int]
    localhost_nodeports: bool = False


class _Discard(list):
    """``proxyutil.NewDiscardLineBuffer``: counts lines, keeps nothing."""

    __slots__ = ("lines",)

    def __init__(self) -> None:
        super().__init__()
        self.lines = 0

    def append(self, _line: str) -> None:  # type: ignore[override]
        self.lines += 1


# --- the sync -----------------------------------------------------------------------


def render_iptables(
    services: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, Sequence[Endpoint]],
    config: IPTablesConfig,
    *,
    changed: Iterable[ServicePortName | NamespacedName | tuple[str, str]] | None = None,
    existing_nat_chains: str | Iterable[str] | None = None,
) -> str:
    """The ``iptables-restore`` input of one sync. See :func:`render_iptables_sync`."""
    return render_iptables_sync(
        services, endpoints, config, changed=changed, existing_nat_chains=existing_nat_chains
    ).text


def render_iptables_sync(
    services: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, Sequence[Endpoint]],
    config: IPTablesConfig,
    *,
    changed: Iterable[ServicePortName | NamespacedName | tuple[str, str]] | None = None,
    existing_nat_chains: str | Iterable[str] | None = None,
) -> IPTablesRender:
    """``Proxier.syncProxyRules`` for the given service and endpoints maps.

    * ``changed=None``: a full sync (``needFullSync``): every service's SVC/SVL/EXT/FW/SEP
      chains are declared and written.
    * ``changed=<set>``: a partial sync: only Services named in the set (by namespace
      and name, as kube-proxy's ``UpdatedServices``; a ``ServicePortName`` stands for its
      Service) get their chains written; the other chains are left to the kernel. The
      top-level chains (KUBE-SERVICES, KUBE-NODEPORTS, ...) are always rewritten.
      :func:`testbed.proxy.servicemap.changed_services` computes the set. As in
      kube-proxy, a partial sync is only correct on top of a successful previous sync
      with the same ``config``: do a full sync first, after a failed restore, after a
      config or topology-label change, and periodically (``FullSyncPeriod``).
    * ``existing_nat_chains``: the chains now in the kernel's nat table (the output of
      ``iptables-save -t nat``, or the names). Every KUBE-SVC-/SVL-/SEP-/FW-/EXT- chain
      there that this sync does not want is flushed (``:CHAIN - [0:0]``) and deleted
      (``-X CHAIN``). ``None`` skips that step, which is what kube-proxy does in large-
      cluster mode until ``syncPeriod`` has passed since the last cleanup.

    The text is the concatenation of :meth:`IPTablesSync.chunks`, the form an applier
    streams into ``iptables-restore``.
    """
    sync = IPTablesSync(services, endpoints, config, changed=changed, existing_nat_chains=existing_nat_chains)
    return sync.result("".join(sync.chunks()))


class _Planned(NamedTuple):
    """One ServicePort as the first pass leaves it: the locals of one iteration of
    ``syncProxyRules``' service loop that need no chain name."""

    svc: ServicePort
    name: str
    proto: str
    pmatch: str
    dport: str
    has_endpoints: bool
    has_internal: bool
    has_external: bool
    uses_ext: bool
    uses_fw: bool
    cluster_eps: Sequence[Endpoint] | None  # None: no KUBE-SVC chain
    local_eps: Sequence[Endpoint] | None  # None: no KUBE-SVL chain
    reachable: Sequence[Endpoint]
    write: bool  # its chains are written (full sync, or the Service changed)


class _Names(NamedTuple):
    """Its chains (second pass): ``KUBE-SVC-``/``SVL-``/``FW-``/``EXT-`` + the
    port-protocol hash, and the ``KUBE-SEP-`` chain of each reachable endpoint."""

    svc_chain: str
    svl_chain: str
    fw_chain: str
    ext_chain: str
    sep_names: Mapping[str, str]


class IPTablesSync:
    """One ``syncProxyRules``, rendered in passes so that an applier can stream it.

    kube-proxy writes four buffers (filter chains, filter rules, nat chains, nat rules)
    in one loop over the services and hands ``iptables-restore`` their concatenation.
    Here that loop runs as three passes over the services, each writing the lines of
    one part in kube-proxy's order, so the text can go to the restore while it is
    being made:

    1. constructing this object: every filter line (they depend on every Service's
       endpoints), and what the other passes need; no chain name is hashed here
       unless a filter rule names it;
    2. :meth:`chunks` yields the filter table and the top-level nat chains at once,
       then hashes the chain names and yields the nat chain lines (``:KUBE-SEP-...``)
       as it goes; the restore creates chains more slowly than they are named;
    3. then the nat rules (some 90 % of the text), in pieces.

    The concatenation is byte for byte the one-loop buffer (see
    :func:`render_iptables_sync`); :meth:`result` gives the counters once the chunks
    are consumed."""

    def __init__(
        self,
        services: Mapping[ServicePortName, ServicePort],
        endpoints: Mapping[ServicePortName, Sequence[Endpoint]],
        config: IPTablesConfig,
        *,
        changed: Iterable[ServicePortName | NamespacedName | tuple[str, str]] | None = None,
        existing_nat_chains: str | Iterable[str] | None = None,
    ) -> None:
        self.full_sync = full_sync = changed is None
        self.masquerade_all = config.masquerade_all
        self.existing_nat_chains = existing_nat_chains
        changed_nn = changed_service_names(changed)

        is_v6 = config.is_ipv6
        mark = config.mark
        node_name = config.hostname_override
        topo = config.topology_labels
        prefer_node = config.prefer_same_traffic_distribution
        self.local_cidr = config.local_cidr()
        self.localhost_nodeports = localhost_nodeports = config.localhost_nodeports_enabled()
        self.localhost_np_rule = localhost_nodeports and config.nfacct  # && ipFamily == IPv4 (implied)
        self.node_ip = None
        if config.node_ip:
            try:
                self.node_ip = ipaddress.ip_address(config.node_ip)
            except ValueError:
                self.node_ip = None

        filter_chains: list[str] = []
        filter_rules: list[str] = []
        for chain in (KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL):
            filter_chains.append(f":{chain} - [0:0]")
        nat_chains = [f":{chain} - [0:0]" for chain in (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ)]

        # The first nat rules (written in the third pass, first).
        masq = f'-A {KUBE_POSTROUTING} -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE'
        self.nat_head = [
            f"-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN",
            f"-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}",
            masq + " --random-fully" if config.random_fully else masq,
            f"-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}",
        ]

        if not is_v6 and localhost_nodeports:
            filter_chains.append(f":{KUBE_FIREWALL} - [0:0]")
            filter_rules.append(
                f'-A {KUBE_FIREWALL} -m comment --comment "block incoming localnet connections" '
                "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
            )

        total_endpoints = 0
        for spn in services:
            eps = endpoints.get(spn)
            if eps:
                total_endpoints += len(eps)
        self.large = total_endpoints > LARGE_CLUSTER_ENDPOINTS_THRESHOLD
        self.total_endpoints = total_endpoints

        no_local_internal = 0
        no_local_external = 0
        hc_ports: dict[NamespacedName, int] = {}
        plan: list[_Planned] = []

        for spn in sorted(services):
            svc = services[spn]
            proto = svc.protocol.lower()
            name = str(spn)
            if svc.health_check_node_port:
                hc_ports[spn.namespaced_name] = svc.health_check_node_port

            cluster_eps, local_eps, reachable, has_endpoints = categorize_endpoints(
                endpoints.get(spn), svc, node_name, topo, prefer_same_node=prefer_node
            )
            uses_cluster_chain = bool(cluster_eps) and svc.uses_cluster_endpoints()
            uses_local_chain = bool(local_eps) and svc.uses_local_endpoints()

            has_internal = has_endpoints
            if svc.internal_policy_local and not local_eps:
                has_internal = False
            has_external = has_endpoints
            if svc.external_policy_local and not local_eps:
                has_external = False
            uses_ext = has_endpoints and svc.externally_accessible()
            uses_fw = has_endpoints and bool(svc.load_balancer_vips) and bool(svc.load_balancer_source_ranges)

            int_target = int_comment = ext_target = ext_comment = ""
            if not has_endpoints:
                int_target = ext_target = "REJECT"
                int_comment = ext_comment = f'"{name} has no endpoints"'
            else:
                if not has_internal:
                    int_target = "DROP"
                    int_comment = f'"{name} has no local endpoints"'
                    no_local_internal += 1
                if not has_external:
                    ext_target = "DROP"
                    ext_comment = f'"{name} has no local endpoints"'
                    no_local_external += 1

            pmatch = f"-m {proto} -p {proto}"
            dport = f"--dport {svc.port}"

            # The filter rules of each step, in kube-proxy's order; the nat rules of
            # the same steps are written by _write_service_nat_rules.
            # Capture the clusterIP.
            if not has_internal:
                filter_rules.append(
                    f"-A {KUBE_SERVICES} -m comment --comment {int_comment} {pmatch} -d {svc.cluster_ip} {dport} -j {int_target}"
                )
            # Capture externalIPs.
            if not has_external:
                for eip in svc.external_ips:
                    filter_rules.append(
                        f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {ext_comment} {pmatch} -d {eip} {dport} -j {ext_target}"
                    )
            # Capture load-balancer ingress.
            if uses_fw:
                fw_chain = FW_PREFIX + port_proto_hash(name, proto)
                for lbip in svc.load_balancer_vips:
                    filter_rules.append(
                        f'-A {KUBE_PROXY_FIREWALL} -m comment --comment "{name} traffic not accepted by {fw_chain}" '
                        f"{pmatch} -d {lbip} {dport} -j DROP"
                    )
            if not has_external:
                for lbip in svc.load_balancer_vips:
                    filter_rules.append(
                        f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {ext_comment} {pmatch} -d {lbip} {dport} -j {ext_target}"
                    )
            # Capture nodeports.
            if svc.node_port and not has_external:
                filter_rules.append(
                    f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {ext_comment} -m addrtype --dst-type LOCAL "
                    f"{pmatch} --dport {svc.node_port} -j {ext_target}"
                )
            # Capture healthCheckNodePorts.
            if svc.health_check_node_port:
                filter_rules.append(
                    f'-A {KUBE_NODEPORTS} -m comment --comment "{name} health check node port" '
                    f"-m tcp -p tcp --dport {svc.health_check_node_port} -j ACCEPT"
                )

            plan.append(_Planned(
                svc, name, proto, pmatch, dport, has_endpoints, has_internal, has_external, uses_ext, uses_fw,
                cluster_eps if uses_cluster_chain else None, local_eps if uses_local_chain else None, reachable,
                # Unchanged services keep their SVC/SVL/EXT/FW/SEP chains (partial sync).
                full_sync or (spn.namespace, spn.name) in changed_nn,
            ))

        # Drop INVALID packets unless nf_conntrack_tcp_be_liberal is set.
        if not config.tcp_be_liberal:
            if config.nfacct:
                filter_rules.append(
                    f"-A {KUBE_FORWARD} -m conntrack --ctstate INVALID -m nfacct --nfacct-name {NFACCT_CT_STATE_INVALID_DROPPED} -j DROP"
                )
            else:
                filter_rules.append(f"-A {KUBE_FORWARD} -m conntrack --ctstate INVALID -j DROP")
        filter_rules.append(
            f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding rules" -m mark --mark {mark}/{mark} -j ACCEPT'
        )
        filter_rules.append(
            f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding conntrack rule" '
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        )

        self.nodeports_tail = _nodeports_tail(config, localhost_nodeports)
        self.head = "\n".join(["*filter", *filter_chains, *filter_rules, "COMMIT", "*nat", *nat_chains]) + "\n"
        self.filter_rules_count = len(filter_rules)
        self.plan = plan
        self.hc_ports = hc_ports
        self.no_local_internal = no_local_internal
        self.no_local_external = no_local_external
        self.active: frozenset[str] = frozenset()
        self.deleted: tuple[str, ...] = ()
        self._nat_written: int | None = None
        self._nat_skipped = 0

    def chunks(self, lines_per_chunk: int = 8192) -> Iterator[str]:
        """The restore input in pieces of about ``lines_per_chunk`` lines: the filter
        table and the top-level nat chains, the Services' nat chains, the nat rules,
        ``COMMIT``. Consumed once."""
        lines_per_chunk = max(1, lines_per_chunk)
        yield self.head

        # Second pass: the nat chain lines (written or, for unchanged Services, only
        # counted as kube-proxy's skipped-chain buffer does).
        chains: list[str] = []
        skipped = _Discard()
        active: set[str] = set()
        names: list[_Names] = []
        for p in self.plan:
            h = port_proto_hash(p.name, p.proto)
            n = _Names(SVC_PREFIX + h, SVL_PREFIX + h, FW_PREFIX + h, EXT_PREFIX + h, {})
            names.append(n)
            out = chains if p.write else skipped
            if p.uses_ext:
                out.append(f":{n.ext_chain} - [0:0]")
                active.add(n.ext_chain)
            if p.uses_fw:
                out.append(f":{n.fw_chain} - [0:0]")
                active.add(n.fw_chain)
            if p.cluster_eps is not None:
                out.append(f":{n.svc_chain} - [0:0]")
                active.add(n.svc_chain)
            if p.local_eps is not None:
                out.append(f":{n.svl_chain} - [0:0]")
                active.add(n.svl_chain)
            # KUBE-SEP-* of every endpoint a SVC/SVL chain may jump to (kube-proxy keeps
            # one per endpointInfo; all of them are in `reachable`, the union of the
            # cluster and local endpoints).
            sep_names = n.sep_names
            for ep in p.reachable:
                k = ep.endpoint
                sep = sep_names.get(k)
                if sep is None:
                    sep = sep_names[k] = service_port_endpoint_chain_name(p.name, p.proto, k)
                out.append(f":{sep} - [0:0]")
                active.add(sep)
            if len(chains) >= lines_per_chunk:
                yield "\n".join(chains) + "\n"
                chains = []

        # Delete chains no longer in use.
        deleted: list[str] = []
        existing_nat_chains = self.existing_nat_chains
        if existing_nat_chains is not None:
            existing = (
                chains_from_iptables_save(existing_nat_chains)
                if isinstance(existing_nat_chains, str)
                else set(existing_nat_chains)
            )
            for chain in sorted(existing - active):
                if not is_service_chain_name(chain):
                    continue
                chains.append(f":{chain} - [0:0]")
                deleted.append(chain)
        if chains:
            yield "\n".join(chains) + "\n"
        self.active, self.deleted = frozenset(active), tuple(deleted)

        # Third pass: the nat rules.
        skipped = _Discard()
        rules = list(self.nat_head)
        written = 0
        write = _write_service_nat_rules
        for p, n in zip(self.plan, names):
            write(rules, skipped, p, n, self)
            if len(rules) >= lines_per_chunk:
                written += len(rules)
                yield "\n".join(rules) + "\n"
                rules = []
        rules += [f"-X {chain}" for chain in deleted]
        rules += self.nodeports_tail
        written += len(rules)
        rules.append("COMMIT")
        yield "\n".join(rules) + "\n"
        self._nat_written, self._nat_skipped = written, skipped.lines

    def result(self, text: str = "") -> IPTablesRender:
        """The sync's counters (and ``text``, when the caller kept it), once
        :meth:`chunks` has been consumed."""
        if self._nat_written is None:
            raise RuntimeError("IPTablesSync.result() before its chunks were consumed")
        deleted = len(self.deleted)
        return IPTablesRender(
            text=text,
            full_sync=self.full_sync,
            filter_rules_count=self.filter_rules_count,
            nat_rules_count=self._nat_written + self._nat_skipped - deleted,
            nat_rules_synced=self._nat_written - deleted,
            active_nat_chains=self.active,
            deleted_nat_chains=self.deleted,
            large_cluster_mode=self.large,
            total_endpoints=self.total_endpoints,
            no_local_endpoints_internal=self.no_local_internal,
            no_local_endpoints_external=self.no_local_external,
            jump_rules=JUMP_RULES if self.full_sync else (),
            nfacct_counters=NFACCT_COUNTERS if self.full_sync else (),
            health_check_node_ports=self.hc_ports,
            localhost_nodeports=self.localhost_nodeports,
        )


def _nodeports_tail(config: IPTablesConfig, localhost_nodeports: bool) -> list[str]:
    """Finally, tail-call to the nodePorts chain (the last nat rules)."""
    is_v6 = config.is_ipv6
    npa = NodePortAddresses(config.ip_family, config.nodeport_addresses)
    if npa.match_all:
        dest = "-m addrtype --dst-type LOCAL"
        if is_v6:
            dest += " ! -d ::1/128"
        elif not localhost_nodeports:
            dest += " ! -d 127.0.0.0/8"
        return [f"-A {KUBE_SERVICES} -m comment --comment {_MUST_BE_LAST} {dest} -j {KUBE_NODEPORTS}"]
    addresses = config.node_addresses
    if addresses is None:
        addresses = [a for a in (config.node_ip, "::1" if is_v6 else "127.0.0.1") if a]
    return [
        f"-A {KUBE_SERVICES} -m comment --comment {_MUST_BE_LAST} -d {ip} -j {KUBE_NODEPORTS}"
        for ip in npa.node_ips(addresses)
        if not (ip.is_loopback and (is_v6 or not localhost_nodeports))
    ]


def _write_service_nat_rules(rules: list[str], skipped: _Discard, p: _Planned, n: _Names, sync: IPTablesSync) -> None:
    """The nat rules of one iteration of ``syncProxyRules``' service loop, in its
    order: the capture rules in KUBE-SERVICES/KUBE-NODEPORTS always go to ``rules``;
    the rules of the Service's own chains go there too when ``p.write``, else to
    ``skipped`` (which only counts them, as kube-proxy's skipped-service buffer)."""
    svc, name, pmatch, dport = p.svc, p.name, p.pmatch, p.dport
    ext_chain, svc_chain = n.ext_chain, n.svc_chain
    internal_chain = n.svl_chain if svc.internal_policy_local else svc_chain
    cip = svc.cluster_ip

    # Capture the clusterIP.
    if p.has_internal:
        rules.append(
            f'-A {KUBE_SERVICES} -m comment --comment "{name} cluster IP" {pmatch} -d {cip} {dport} -j {internal_chain}'
        )
    if p.has_endpoints:
        # Capture externalIPs.
        for eip in svc.external_ips:
            rules.append(
                f'-A {KUBE_SERVICES} -m comment --comment "{name} external IP" {pmatch} -d {eip} {dport} -j {ext_chain}'
            )
        # Capture load-balancer ingress.
        lb_chain = n.fw_chain if p.uses_fw else ext_chain
        for lbip in svc.load_balancer_vips:
            rules.append(
                f'-A {KUBE_SERVICES} -m comment --comment "{name} loadbalancer IP" {pmatch} -d {lbip} {dport} -j {lb_chain}'
            )
        # Capture nodeports.
        if svc.node_port:
            if sync.localhost_np_rule:
                rules.append(
                    f"-A {KUBE_NODEPORTS} -m comment --comment {name} {pmatch} -d 127.0.0.0/8 --dport {svc.node_port} "
                    f"-m nfacct --nfacct-name {NFACCT_LOCALHOST_NODEPORT_ACCEPTED} -j {ext_chain}"
                )
            rules.append(f"-A {KUBE_NODEPORTS} -m comment --comment {name} {pmatch} --dport {svc.node_port} -j {ext_chain}")

    out = rules if p.write else skipped

    # Internal traffic handling.
    if p.has_internal:
        args = f'-m comment --comment "{name} cluster IP" {pmatch} -d {cip} {dport}'
        if sync.masquerade_all:
            out.append(f"-A {internal_chain} {args} -j {KUBE_MARK_MASQ}")
        elif sync.local_cidr:
            out.append(f"-A {internal_chain} {args} ! -s {sync.local_cidr} -j {KUBE_MARK_MASQ}")

    # External traffic handling.
    if p.uses_ext:
        if not svc.external_policy_local:
            out.append(
                f'-A {ext_chain} -m comment --comment "masquerade traffic for {name} external destinations" -j {KUBE_MARK_MASQ}'
            )
        else:
            if sync.local_cidr:
                out.append(
                    f'-A {ext_chain} -m comment --comment "pod traffic for {name} external destinations" '
                    f"-s {sync.local_cidr} -j {svc_chain}"
                )
            out.append(
                f'-A {ext_chain} -m comment --comment "masquerade LOCAL traffic for {name} external destinations" '
                f"-m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}"
            )
            out.append(
                f'-A {ext_chain} -m comment --comment "route LOCAL traffic for {name} external destinations" '
                f"-m addrtype --src-type LOCAL -j {svc_chain}"
            )
        if p.has_external:
            external_policy_chain = n.svl_chain if svc.external_policy_local else svc_chain
            out.append(f"-A {ext_chain} -j {external_policy_chain}")

    # Firewall chain (loadBalancerSourceRanges).
    if p.uses_fw:
        fw_args = f'-A {n.fw_chain} -m comment --comment "{name} loadbalancer IP"'
        allow_from_node = False
        node_ip = sync.node_ip
        for cidr in svc.load_balancer_source_ranges:
            out.append(f"{fw_args} -s {cidr} -j {ext_chain}")
            if node_ip is not None and _cidr_contains(cidr, node_ip):
                allow_from_node = True
        if allow_from_node:
            for lbip in svc.load_balancer_vips:
                out.append(f"{fw_args} -s {lbip} -j {ext_chain}")
        out.append(
            f'-A {n.fw_chain} -m comment --comment "other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL"'
        )

    large = sync.large
    sep_names = n.sep_names
    if p.cluster_eps is not None:
        _service_to_endpoint_rules(out, name, svc, svc_chain, p.cluster_eps, sep_names, large)
    if p.local_eps is not None:
        _service_to_endpoint_rules(out, name, svc, n.svl_chain, p.local_eps, sep_names, large)

    # Per-endpoint chains.
    affinity = svc.session_affinity_client_ip
    tail = f" {pmatch} -j DNAT --to-destination "
    for ep in p.reachable:
        sep = sep_names[ep.endpoint]
        head = f"-A {sep}" if large else f"-A {sep} -m comment --comment {name}"
        out.append(f"{head} -s {ep.ip} -j {KUBE_MARK_MASQ}")
        if affinity:
            out.append(f"{head} -m recent --name {sep} --set{tail}{ep.endpoint}")
        else:
            out.append(f"{head}{tail}{ep.endpoint}")


def _service_to_endpoint_rules(
    out: list[str],
    name: str,
    svc: ServicePort,
    chain: str,
    eps: Sequence[Endpoint],
    sep_names: Mapping[str, str],
    large: bool,
) -> None:
    """``writeServiceToEndpointRules``: affinity checks, then the random choice."""
    if svc.session_affinity_client_ip:
        seconds = svc.session_affinity_timeout
        for ep in eps:
            sep = sep_names[ep.endpoint]
            head = f"-A {chain}" if large else f'-A {chain} -m comment --comment "{name} -> {ep.endpoint}"'
            out.append(f"{head} -m recent --name {sep} --rcheck --seconds {seconds} --reap -j {sep}")
    n = len(eps)
    last = n - 1
    for i, ep in enumerate(eps):
        sep = sep_names[ep.endpoint]
        head = f"-A {chain}" if large else f'-A {chain} -m comment --comment "{name} -> {ep.endpoint}"'
        if i < last:
            out.append(f"{head} -m statistic --mode random --probability {compute_probability(n - i)} -j {sep}")
        else:
            out.append(f"{head} -j {sep}")


@lru_cache(maxsize=4096)
def _parse_net(cidr: str) -> _IPNetwork:
    return ipaddress.ip_network(cidr, strict=False)


def _cidr_contains(cidr: str, ip: _IPAddress) -> bool:
    try:
        net = _parse_net(cidr)
    except ValueError:
        return False
    return ip.version == net.version and ip in net
