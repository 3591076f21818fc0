"""kube-proxy's ipvs mode as a pure function.

:func:`render_ipvs` computes the whole state kube-proxy's ipvs ``Proxier.syncProxyRules``
(``pkg/proxy/ipvs/proxier.go``, read at ``b0f823e6``, the newest ipvs proxier; helpers
``pkg/proxy/ipvs/ipset.go``, ``ipset/ipset.go``, ``ipset/types.go``, ``util/ipvs.go``,
``netlink_linux.go`` at current master) leaves on one node:

* the sysctls ``NewProxier`` sets (:attr:`IPVSRender.sysctls`);
* the ``kube-ipvs0`` dummy link and the addresses bound to it (``EnsureDummyDevice``,
  ``syncService(bindAddr)``): every ClusterIP, and every externalIP / LoadBalancer IP
  that is not already an address of another interface of the node;
* the IPVS virtual servers (one per ClusterIP, externalIP, LoadBalancer ingress IP, and
  per node IP for a NodePort) and their real servers (``syncService`` /
  ``syncEndpoint``), scheduler from ``--ipvs-scheduler``, ClientIP affinity as IPVS
  persistence, masquerading ("Masq") forwarding with weight 1;
* the 17 ipsets of ``ipsetInfo`` with their entries (``syncIPSetEntries``);
* the ``iptables-restore --noflush --counters`` buffer (``writeIptablesRules``:
  ``natChains + natRules + filterChains + filterRules``) and the jump rules from the
  built-in chains (``createAndLinkKubeChain``, ``EnsureRule(Prepend)``).

Three texts are what an applier feeds to the kernel, byte for byte:
:attr:`IPVSRender.ipvsadm_text` (``ipvsadm -R``; the same lines ``ipvsadm -S -n`` prints),
:attr:`IPVSRender.ipset_text` (``ipset restore -exist``; the lines ``ipset save``
prints, without the kernel's ``bucketsize``/``initval`` tail) and
:attr:`IPVSRender.iptables` (``iptables-restore --noflush --counters``).
:func:`render_ipvs_text` puts them, with the addresses and sysctls, in one readable text
(``testbed proxy render --proxy-mode ipvs``).

kube-proxy syncs IPVS and ipsets incrementally: it reads the kernel and adds / updates /
removes only the difference. :func:`ipvs_restore_diff` and :func:`ipset_restore_diff`
compute that difference as ``ipvsadm -R`` / ``ipset restore`` input from the desired
render and the kernel's current state (parsed with :func:`parse_ipvsadm_save` /
:func:`parse_ipset_save`); against an empty kernel each returns exactly the rendered
text. The iptables buffer is always written whole, as kube-proxy's ipvs mode does.

Determinism: where kube-proxy iterates a Go map (the service map, a node's addresses,
a set's entries), this module uses sorted orders, so renders are reproducible.

What differs from kube-proxy (also in :data:`DEVIATIONS`): kube-proxy adds set entries
one ``ipset add`` at a time and skips an entry the kernel refuses; ``ipset restore``
refuses the whole batch, so the one entry kind the kernel rejects and kube-proxy's
validation lets through (a ``hash:ip,port,net`` entry for a ``/0`` source range) is
left out here, with the same end result. Removed real servers are deleted at once
(kube-proxy's graceful-termination manager first sets their weight to 0 and deletes
them when their connections are gone; UDP/SCTP ones it deletes at once too).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from testbed.errors import InputError

from .iptables import JumpRule
from .types import NodePortAddresses, ProxierFlags
from .servicemap import build_maps
from .types import Endpoint, NamespacedName, ServicePort, ServicePortName, categorize_endpoints, join_host_port

__all__ = [
    "IPVSConfig",
    "IPVSRender",
    "VirtualServer",
    "RealServer",
    "IPSet",
    "IPSET_INFO",
    "IPVS_JUMP_RULES",
    "DUMMY_DEVICE",
    "DEFAULT_SCHEDULER",
    "PROBE_VIRTUAL_SERVER",
    "DEVIATIONS",
    "validate_scheduler",
    "render_ipvs",
    "render_ipvs_text",
    "parse_ipvsadm_save",
    "parse_proc_ip_vs",
    "parse_ipset_save",
    "ipvs_restore_diff",
    "ipset_restore_diff",
    "canonical_entry",
]

# --- constants (proxier.go, ipset.go) --------------------------------------------------

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_SOURCE_RANGES_FIREWALL = "KUBE-SOURCE-RANGES-FIREWALL"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_NODE_PORT = "KUBE-NODE-PORT"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_LOAD_BALANCER = "KUBE-LOAD-BALANCER"
KUBE_IPVS_FILTER = "KUBE-IPVS-FILTER"
KUBE_IPVS_OUT_FILTER = "KUBE-IPVS-OUT-FILTER"

#: ``defaultScheduler``
DEFAULT_SCHEDULER = "rr"
#: ``defaultDummyDevice``: the dummy link every service address is bound to.
DUMMY_DEVICE = "kube-ipvs0"

#: ``utilipvs.FlagPersistent`` (ClientIP affinity), ``FlagHashed`` (set by the kernel on
#: every service; ignored when comparing), ``FlagSourceHash`` (``IP_VS_SVC_F_SCHED2``,
#: ``mh-port`` for the ``mh`` scheduler, ``sh-port`` for ``sh``).
FLAG_PERSISTENT = 0x1
FLAG_HASHED = 0x2
FLAG_SOURCE_HASH = 0x10
_SCHED_FLAG_BITS = {0x08: "flag-1", 0x10: "flag-2", 0x20: "flag-3"}
_SCHED_FLAG_NAMES = {  # ipvsadm's names for IP_VS_SVC_F_SCHED1..3 per scheduler
    "sh": {0x08: "sh-fallback", 0x10: "sh-port"},
    "mh": {0x08: "mh-fallback", 0x10: "mh-port"},
}

#: The virtual server ``CanUseIPVSProxier`` adds and deletes to check that the kernel
#: has the configured scheduler (TEST-NET-2, never a real service).
PROBE_VIRTUAL_SERVER = ("198.51.100.0", 20000, "TCP")

# ipset types (ipset/types.go)
HASH_IP_PORT = "hash:ip,port"
HASH_IP_PORT_IP = "hash:ip,port,ip"
HASH_IP_PORT_NET = "hash:ip,port,net"
BITMAP_PORT = "bitmap:port"
HASH_IP = "hash:ip"
#: ``DefaultPortRange`` of ``bitmap:port`` sets.
DEFAULT_PORT_RANGE = "0-65535"

KUBE_LOOP_BACK = "KUBE-LOOP-BACK"
KUBE_CLUSTER_IP = "KUBE-CLUSTER-IP"
KUBE_EXTERNAL_IP = "KUBE-EXTERNAL-IP"
KUBE_EXTERNAL_IP_LOCAL = "KUBE-EXTERNAL-IP-LOCAL"
KUBE_LOAD_BALANCER_SET = "KUBE-LOAD-BALANCER"
KUBE_LOAD_BALANCER_FW = "KUBE-LOAD-BALANCER-FW"
KUBE_LOAD_BALANCER_LOCAL = "KUBE-LOAD-BALANCER-LOCAL"
KUBE_LOAD_BALANCER_SOURCE_IP = "KUBE-LOAD-BALANCER-SOURCE-IP"
KUBE_LOAD_BALANCER_SOURCE_CIDR = "KUBE-LOAD-BALANCER-SOURCE-CIDR"
KUBE_NODE_PORT_TCP = "KUBE-NODE-PORT-TCP"
KUBE_NODE_PORT_LOCAL_TCP = "KUBE-NODE-PORT-LOCAL-TCP"
KUBE_NODE_PORT_UDP = "KUBE-NODE-PORT-UDP"
KUBE_NODE_PORT_LOCAL_UDP = "KUBE-NODE-PORT-LOCAL-UDP"
KUBE_NODE_PORT_SCTP = "KUBE-NODE-PORT-SCTP-HASH"
KUBE_NODE_PORT_LOCAL_SCTP = "KUBE-NODE-PORT-LOCAL-SCTP-HASH"
KUBE_HEALTH_CHECK_NODE_PORT = "KUBE-HEALTH-CHECK-NODE-PORT"
KUBE_IPVS_IPS = "KUBE-IPVS-IPS"


@dataclass(frozen=True, slots=True)
class _SetInfo:
    name: str
    set_type: str
    comment: str


#: ``ipsetInfo``: every set kube-proxy's ipvs mode creates on each sync, in its order,
#: with the comment its iptables rules carry (``IPSet.getComment``).
IPSET_INFO: tuple[_SetInfo, ...] = (
    _SetInfo(KUBE_LOOP_BACK, HASH_IP_PORT_IP, "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"),
    _SetInfo(KUBE_CLUSTER_IP, HASH_IP_PORT, "Kubernetes service cluster ip + port for masquerade purpose"),
    _SetInfo(KUBE_EXTERNAL_IP, HASH_IP_PORT, "Kubernetes service external ip + port for masquerade and filter purpose"),
    _SetInfo(KUBE_EXTERNAL_IP_LOCAL, HASH_IP_PORT, "Kubernetes service external ip + port with externalTrafficPolicy=local"),
    _SetInfo(KUBE_LOAD_BALANCER_SET, HASH_IP_PORT, "Kubernetes service lb portal"),
    _SetInfo(KUBE_LOAD_BALANCER_FW, HASH_IP_PORT, "Kubernetes service load balancer ip + port for load balancer with sourceRange"),
    _SetInfo(KUBE_LOAD_BALANCER_LOCAL, HASH_IP_PORT, "Kubernetes service load balancer ip + port with externalTrafficPolicy=local"),
    _SetInfo(KUBE_LOAD_BALANCER_SOURCE_IP, HASH_IP_PORT_IP, "Kubernetes service load balancer ip + port + source IP for packet filter purpose"),
    _SetInfo(KUBE_LOAD_BALANCER_SOURCE_CIDR, HASH_IP_PORT_NET, "Kubernetes service load balancer ip + port + source cidr for packet filter purpose"),
    _SetInfo(KUBE_NODE_PORT_TCP, BITMAP_PORT, "Kubernetes nodeport TCP port for masquerade purpose"),
    _SetInfo(KUBE_NODE_PORT_LOCAL_TCP, BITMAP_PORT, "Kubernetes nodeport TCP port with externalTrafficPolicy=local"),
    _SetInfo(KUBE_NODE_PORT_UDP, BITMAP_PORT, "Kubernetes nodeport UDP port for masquerade purpose"),
    _SetInfo(KUBE_NODE_PORT_LOCAL_UDP, BITMAP_PORT, "Kubernetes nodeport UDP port with externalTrafficPolicy=local"),
    _SetInfo(KUBE_NODE_PORT_SCTP, HASH_IP_PORT, "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'"),
    _SetInfo(KUBE_NODE_PORT_LOCAL_SCTP, HASH_IP_PORT, "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'"),
    _SetInfo(KUBE_HEALTH_CHECK_NODE_PORT, BITMAP_PORT, "Kubernetes health check node port"),
    _SetInfo(KUBE_IPVS_IPS, HASH_IP, "Addresses on the ipvs interface"),
)
_SET_BY_NAME = {s.name: s for s in IPSET_INFO}

#: ``ipsetWithIptablesChain``: (set, table, from chain, target, match type, protocol).
#: The ``-LOCAL-`` NodePort sets come before the plain ones (RETURN before MARK-MASQ).
_IPSET_WITH_CHAIN: tuple[tuple[str, str, str, str, str, str], ...] = (
    (KUBE_LOOP_BACK, "nat", KUBE_POSTROUTING, "MASQUERADE", "dst,dst,src", ""),
    (KUBE_LOAD_BALANCER_SET, "nat", KUBE_SERVICES, KUBE_LOAD_BALANCER, "dst,dst", ""),
    (KUBE_LOAD_BALANCER_LOCAL, "nat", KUBE_LOAD_BALANCER, "RETURN", "dst,dst", ""),
    (KUBE_NODE_PORT_LOCAL_TCP, "nat", KUBE_NODE_PORT, "RETURN", "dst", "tcp"),
    (KUBE_NODE_PORT_TCP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst", "tcp"),
    (KUBE_NODE_PORT_LOCAL_UDP, "nat", KUBE_NODE_PORT, "RETURN", "dst", "udp"),
    (KUBE_NODE_PORT_UDP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst", "udp"),
    (KUBE_NODE_PORT_LOCAL_SCTP, "nat", KUBE_NODE_PORT, "RETURN", "dst,dst", "sctp"),
    (KUBE_NODE_PORT_SCTP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst,dst", "sctp"),
    (KUBE_LOAD_BALANCER_FW, "filter", KUBE_PROXY_FIREWALL, KUBE_SOURCE_RANGES_FIREWALL, "dst,dst", ""),
    (KUBE_LOAD_BALANCER_SOURCE_CIDR, "filter", KUBE_SOURCE_RANGES_FIREWALL, "RETURN", "dst,dst,src", ""),
    (KUBE_LOAD_BALANCER_SOURCE_IP, "filter", KUBE_SOURCE_RANGES_FIREWALL, "RETURN", "dst,dst,src", ""),
)

#: ``iptablesChains``: the chains declared (and so flushed) in every restore buffer.
_NAT_CHAINS = (KUBE_SERVICES, KUBE_POSTROUTING, KUBE_NODE_PORT, KUBE_LOAD_BALANCER, KUBE_MARK_MASQ)
_FILTER_CHAINS = (
    KUBE_FORWARD, KUBE_NODE_PORT, KUBE_PROXY_FIREWALL, KUBE_SOURCE_RANGES_FIREWALL, KUBE_IPVS_FILTER, KUBE_IPVS_OUT_FILTER,
)


def _jump(table: str, chain: str, target: str, comment: str) -> JumpRule:
    return JumpRule(table, chain, target, ("-m", "comment", "--comment", comment, "-j", target))


#: ``iptablesJumpChain``: ensured with ``EnsureRule(Prepend, ...)`` on every sync (so on
#: an empty table the order in a built-in chain is the reverse of this list).
IPVS_JUMP_RULES: tuple[JumpRule, ...] = (
    _jump("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    _jump("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    _jump("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
    _jump("filter", "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
    _jump("filter", "INPUT", KUBE_NODE_PORT, "kubernetes health check rules"),
    _jump("filter", "INPUT", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
    _jump("filter", "FORWARD", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
    _jump("filter", "INPUT", KUBE_IPVS_FILTER, "kubernetes ipvs access filter"),
    _jump("filter", "OUTPUT", KUBE_IPVS_OUT_FILTER, "kubernetes ipvs access filter"),
)

#: ``utilkernel.IPVSConnReuseModeMinSupportedKernelVersion`` / ``...FixedKernelVersion``.
CONN_REUSE_MODE_MIN_KERNEL = (4, 1)
CONN_REUSE_MODE_FIXED_KERNEL = (5, 9)

DEVIATIONS = (
    "removed real servers are deleted at once (kube-proxy's graceful termination sets weight 0 "
    "and deletes TCP ones when their connections are gone)",
    "a real server's weight is corrected whenever it differs (kube-proxy: on its first sync only)",
    "ipset entries are written with one `ipset restore`; a hash:ip,port,net entry for a /0 source "
    "range, which the kernel refuses and kube-proxy logs and skips, is left out",
    "Go map iteration orders (services, node addresses, set entries) are replaced by sorted orders",
)

_SCHEDULER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,15}$")


def validate_scheduler(name: str | None) -> str:
    """The effective ``--ipvs-scheduler``: empty means ``rr`` (``NewProxier``).

    kube-proxy accepts any name since v1.27 (PR #114878 removed the list check) and
    instead tries the scheduler on the kernel (``CanUseIPVSProxier``: add, then delete,
    a dummy virtual server with it); the applier does that probe. Here only what no
    kernel could accept is refused: a scheduler name is at most 15 characters
    (``IP_VS_SCHEDNAME_MAXLEN`` 16 with the NUL) of letters, digits, ``_`` or ``-``.
    """
    name = (name or "").strip()
    if not name:
        return DEFAULT_SCHEDULER
    if not _SCHEDULER_NAME.match(name):
        raise InputError(
            f'Invalid value: "{name}": an IPVS scheduler name is 1-15 letters, digits, "_" or "-" '
            "(e.g. rr, wrr, lc, wlc, lblc, lblcr, sh, dh, sed, nq, mh)",
            field="--ipvs-scheduler",
        )
    return name


def _parse_kernel_version(text: str | None) -> tuple[int, ...] | None:
    """``version.ParseGeneric`` of ``uname -r`` (leading ``major.minor[.patch]``)."""
    if not text:
        return None
    m = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        return None
    return tuple(int(x) for x in m.groups() if x is not None)


# --- configuration --------------------------------------------------------------------


@dataclass
class IPVSConfig(ProxierFlags):
    """kube-proxy flags / fields that shape ipvs mode (names after the flags).

    * ``hostname_override``: the node name (``--hostname-override``); endpoints whose
      ``nodeName`` equals it are local.
    * ``node_ip``: ``nodeIPs[family]``; a LoadBalancer source range containing it lets
      the node itself reach the LB IP (``KUBE-LOAD-BALANCER-SOURCE-IP``), else
      ``KUBE-IPVS-OUT-FILTER`` drops node -> LB IP.
    * ``cluster_cidr``: ``--cluster-cidr`` (local-traffic detector); empty: no-op detector.
    * ``masquerade_bit`` / ``masquerade_mark`` / ``masquerade_all``: as in iptables mode
      (``--iptables-masquerade-bit``, ``--masquerade-all``); ``masquerade_mark=None``
      formats ``1 << bit`` with Go's ``%#08x`` (``0x00004000``).
    * ``nodeport_addresses``: ``--nodeport-addresses``; empty or a ``/0``: "match all",
      NodePorts listen on every address of the node except those on kube-ipvs0.
    * ``node_addresses``: the addresses of the node's interfaces other than kube-ipvs0
      (what ``GetAllLocalAddressesExcept("kube-ipvs0")`` reads; loopback, IPv6
      link-local and other-family addresses are dropped here as kube-proxy drops them).
      ``None`` means ``[node_ip]``.
    * ``ipvs_scheduler`` (``--ipvs-scheduler``, default ``rr``), ``ipvs_strict_arp``
      (``--ipvs-strict-arp``), ``ipvs_exclude_cidrs`` (``--ipvs-exclude-cidrs``: virtual
      servers there are never deleted), ``ipvs_tcp_timeout`` / ``ipvs_tcpfin_timeout`` /
      ``ipvs_udp_timeout`` (seconds; any > 0 means ``ipvsadm --set``).
    * ``random_fully``: ``iptables.HasRandomFully()`` (iptables >= 1.6.2; true here).
    * ``ip_family``: ``IPv4`` or ``IPv6`` (IPv6 sets are named ``KUBE-6-...``).
    * ``topology_labels`` / ``prefer_same_traffic_distribution``: topology-aware routing.
    * ``kernel_version``: the node's ``uname -r``; decides ``conn_reuse_mode``. ``None``:
      unknown (the sysctl is left alone and the text says so).
    """

    hostname_override: str = ""
    node_ip: str | None = None
    cluster_cidr: str | None = None
    masquerade_bit: int = 14
    masquerade_mark: str | None = None
    masquerade_all: bool = False
    nodeport_addresses: Sequence[str] = ()
    node_addresses: Sequence[str] | None = None
    ipvs_scheduler: str = DEFAULT_SCHEDULER
    ipvs_strict_arp: bool = False
    ipvs_exclude_cidrs: Sequence[str] = ()
    ipvs_tcp_timeout: int = 0
    ipvs_tcpfin_timeout: int = 0
    ipvs_udp_timeout: int = 0
    random_fully: bool = True
    ip_family: str = "IPv4"
    topology_labels: Mapping[str, str] = field(default_factory=dict)
    prefer_same_traffic_distribution: bool = True
    kernel_version: str | None = None

    def set_name(self, name: str) -> str:
        """``NewIPSet``: IPv6 sets use the prefix ``KUBE-6-``, cut to 31 characters."""
        if self.is_ipv6 and name.startswith("KUBE-"):
            return name.replace("KUBE-", "KUBE-6-", 1)[:31]
        return name


# --- kernel objects ---------------------------------------------------------------------


_PROTO_OPT = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}
_OPT_PROTO = {"-t": "TCP", "--tcp-service": "TCP", "-u": "UDP", "--udp-service": "UDP", "--sctp-service": "SCTP"}


@dataclass(frozen=True, slots=True)
class VirtualServer:
    """``utilipvs.VirtualServer``. ``flags`` never holds the kernel's ``FlagHashed``."""

    address: str
    protocol: str
    port: int
    scheduler: str = DEFAULT_SCHEDULER
    flags: int = 0
    timeout: int = 0

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.protocol, self.address, self.port)

    def __str__(self) -> str:
        """``VirtualServer.String()``: ``JoinHostPort(addr, port)/PROTO``."""
        return f"{join_host_port(self.address, self.port)}/{self.protocol}"

    def service_args(self) -> str:
        return f"{_PROTO_OPT[self.protocol]} {join_host_port(self.address, self.port)}"

    def ipvsadm_line(self, op: str = "-A") -> str:
        """``-A -t ADDR:PORT -s SCHED [-p TIMEOUT] [-b FLAGS]``, as ``ipvsadm -S -n`` prints it."""
        line = f"{op} {self.service_args()} -s {self.scheduler}"
        if self.flags & FLAG_PERSISTENT:
            line += f" -p {self.timeout}"
        sched_flags = [
            _SCHED_FLAG_NAMES.get(self.scheduler, {}).get(bit, name)
            for bit, name in sorted(_SCHED_FLAG_BITS.items())
            if self.flags & bit
        ]
        if sched_flags:
            line += " -b " + ",".join(sched_flags)
        return line


@dataclass(frozen=True, slots=True)
class RealServer:
    """``utilipvs.RealServer`` (masquerading forwarding: kube-proxy leaves the
    connection flags at 0, which is ``IP_VS_CONN_F_MASQ``)."""

    address: str
    port: int
    weight: int = 1

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)

    def __str__(self) -> str:
        return join_host_port(self.address, self.port)

    def ipvsadm_line(self, vs: VirtualServer, op: str = "-a") -> str:
        return f"{op} {vs.service_args()} -r {join_host_port(self.address, self.port)} -m -w {self.weight}"


@dataclass(frozen=True, slots=True)
class IPSet:
    """One kube-proxy ipset (``utilipset.IPSet`` + its active entries, sorted)."""

    name: str
    set_type: str
    family: str
    comment: str
    entries: tuple[str, ...] = ()

    def create_line(self) -> str:
        """``createSet``'s arguments (``hashsize 1024 maxelem 65536`` / ``range 0-65535``)."""
        if self.set_type == BITMAP_PORT:
            return f"create {self.name} {self.set_type} range {DEFAULT_PORT_RANGE}"
        return f"create {self.name} {self.set_type} family {self.family} hashsize 1024 maxelem 65536"

    def lines(self) -> list[str]:
        return [self.create_line(), *(f"add {self.name} {e}" for e in self.entries)]


@dataclass(frozen=True)
class IPVSRender:
    """The desired state of one node in ipvs mode. See the module docstring."""

    virtual_servers: tuple[VirtualServer, ...]
    real_servers: Mapping[tuple[str, str, int], tuple[RealServer, ...]]
    bind_addresses: tuple[str, ...]
    ipsets: tuple[IPSet, ...]
    iptables: str
    jump_rules: tuple[JumpRule, ...]
    sysctls: tuple[tuple[str, int], ...]
    conn_reuse_mode: str
    ipvs_timeouts: tuple[int, int, int] | None
    scheduler: str
    exclude_cidrs: tuple[str, ...]
    ip_family: str
    health_check_node_ports: Mapping[NamespacedName, int]
    no_local_endpoints_internal: int
    no_local_endpoints_external: int
    #: which VirtualServer keys belong to which Service (for ``rules --service``)
    service_of: Mapping[tuple[str, str, int], NamespacedName]

    @property
    def ipvsadm_text(self) -> str:
        """``ipvsadm -R`` input: each virtual server, then its real servers."""
        out: list[str] = []
        for vs in self.virtual_servers:
            out.append(vs.ipvsadm_line())
            out.extend(rs.ipvsadm_line(vs) for rs in self.real_servers.get(vs.key, ()))
        return "".join(line + "\n" for line in out)

    @property
    def ipset_text(self) -> str:
        """``ipset restore -exist`` input: every set (created on every sync, as
        ``ensureIPSet`` does) and its entries."""
        return "".join(line + "\n" for s in self.ipsets for line in s.lines())

    def ipset(self, name: str) -> IPSet:
        for s in self.ipsets:
            if s.name == name or s.name == name.replace("KUBE-", "KUBE-6-", 1)[:31]:
                return s
        raise KeyError(name)

    @property
    def nat_rules_count(self) -> int:
        return _count_rules(self.iptables, "nat")

    @property
    def filter_rules_count(self) -> int:
        return _count_rules(self.iptables, "filter")


def _count_rules(text: str, table: str) -> int:
    n = 0
    current = ""
    for line in text.splitlines():
        if line.startswith("*"):
            current = line[1:]
        elif line.startswith("-A ") and current == table:
            n += 1
    return n


# --- the sync -------------------------------------------------------------------------


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.split("/")[0])
    except ValueError:
        return None


def _valid_for_set(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, v6: bool) -> bool:
    """``netlinkHandle.isValidForSet``: this family, not loopback, not IPv6 link-local."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if (ip.version == 6) != v6:
        return False
    if v6 and ip.is_link_local:
        return False
    return not ip.is_loopback


def _sorted_ips(ips: Iterable[str]) -> list[str]:
    return sorted(set(ips), key=lambda s: (ipaddress.ip_address(s).version, int(ipaddress.ip_address(s))))


def render_ipvs(
    services: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, Sequence[Endpoint]],
    config: IPVSConfig,
) -> IPVSRender:
    """``syncProxyRules`` of kube-proxy's ipvs proxier for these maps on one node."""
    v6 = config.is_ipv6
    family = "inet6" if v6 else "inet"
    scheduler = validate_scheduler(config.ipvs_scheduler)
    node_name = config.hostname_override
    topo = config.topology_labels
    prefer_node = config.prefer_same_traffic_distribution
    node_ip = _ip(config.node_ip) if config.node_ip else None

    # nodeAddressSet: every valid local address except those on kube-ipvs0.
    raw_addresses = config.node_addresses if config.node_addresses is not None else (
        [config.node_ip] if config.node_ip else []
    )
    node_address_set: set[str] = set()
    for text in raw_addresses:
        ip = _ip(text)
        if ip is not None and _valid_for_set(ip, v6):
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            node_address_set.add(str(ip))

    # Node IPs that get a virtual server per NodePort (computed once, if any NodePort).
    node_ips: list[str] = []
    if any(svc.node_port for svc in services.values()):
        npa = NodePortAddresses(config.ip_family, config.nodeport_addresses)
        if npa.match_all:
            node_ips = _sorted_ips(node_address_set)
        else:
            node_ips = [str(ip) for ip in npa.node_ips(raw_addresses) if not ip.is_loopback]

    entries: dict[str, set[str]] = {s.name: set() for s in IPSET_INFO}
    vs_order: list[tuple[str, str, int]] = []
    vs_by_key: dict[tuple[str, str, int], VirtualServer] = {}
    rs_by_key: dict[tuple[str, str, int], tuple[RealServer, ...]] = {}
    service_of: dict[tuple[str, str, int], NamespacedName] = {}
    bind: set[str] = set()
    lb_no_node_access: list[tuple[str, str, int]] = []
    no_local_internal: set[str] = set()
    no_local_external: set[str] = set()
    hc_ports: dict[NamespacedName, int] = {}

    base_flags = FLAG_SOURCE_HASH if scheduler == "mh" else 0

    def add_vs(vs: VirtualServer, rs: Sequence[Endpoint], nn: NamespacedName) -> None:
        # syncService then syncEndpoint: a second Service port on the same address:port
        # replaces the first one's settings and real servers (last writer wins).
        if vs.key not in vs_by_key:
            vs_order.append(vs.key)
        vs_by_key[vs.key] = vs
        service_of[vs.key] = nn
        rs_by_key[vs.key] = tuple(sorted({RealServer(ep.ip, ep.port): None for ep in rs}, key=_rs_sort_key))

    for spn in sorted(services):
        svc = services[spn]
        proto = svc.protocol.lower()
        proto_upper = svc.protocol.upper()
        nn = spn.namespaced_name
        name_key = f"{spn.namespace}/{spn.name}"
        eps = endpoints.get(spn) or []

        # Handle traffic that loops back to the originator with SNAT.
        for ep in eps:
            if not ep.is_local(node_name) or not ep.ip or not ep.port:
                continue
            entries[KUBE_LOOP_BACK].add(f"{ep.ip},{proto}:{ep.port},{ep.ip}")

        cluster_eps, local_eps, _reachable, has_any = categorize_endpoints(
            eps, svc, node_name, topo, prefer_same_node=prefer_node
        )

        def endpoints_for(only_local: bool) -> Sequence[Endpoint]:
            # syncEndpoint: with a Local policy and no local endpoint ipvs mode falls back
            # to the cluster endpoints (PR #97081), where iptables/nftables drop.
            if only_local:
                if local_eps:
                    return local_eps
                if has_any and svc.internal_policy_local:
                    no_local_internal.add(name_key)
                if has_any and svc.external_policy_local:
                    no_local_external.add(name_key)
                return cluster_eps
            return cluster_eps

        flags = base_flags
        timeout = 0
        if svc.session_affinity_client_ip:
            flags |= FLAG_PERSISTENT
            timeout = int(svc.session_affinity_timeout or 0)

        def make_vs(address: str, port: int) -> VirtualServer:
            return VirtualServer(address, proto_upper, port, scheduler, flags, timeout)

        # Capture the clusterIP.
        entries[KUBE_CLUSTER_IP].add(f"{svc.cluster_ip},{proto}:{svc.port}")
        add_vs(make_vs(svc.cluster_ip, svc.port), endpoints_for(svc.internal_policy_local), nn)
        bind.add(svc.cluster_ip)

        # Capture externalIPs.
        for eip in svc.external_ips:
            entry = f"{eip},{proto}:{svc.port}"
            entries[KUBE_EXTERNAL_IP_LOCAL if svc.external_policy_local else KUBE_EXTERNAL_IP].add(entry)
            add_vs(make_vs(eip, svc.port), endpoints_for(svc.external_policy_local), nn)
            if eip not in node_address_set:  # never bind an address another interface has
                bind.add(eip)

        # Capture load-balancer ingress.
        for lbip in svc.load_balancer_vips:
            entry = f"{lbip},{proto}:{svc.port}"
            entries[KUBE_LOAD_BALANCER_SET].add(entry)
            if svc.external_policy_local:
                entries[KUBE_LOAD_BALANCER_LOCAL].add(entry)
            if svc.load_balancer_source_ranges:
                entries[KUBE_LOAD_BALANCER_FW].add(entry)
                allow_from_node = False
                for cidr in svc.load_balancer_source_ranges:
                    net = ipaddress.ip_network(cidr, strict=False)
                    if net.prefixlen > 0:  # the kernel refuses /0 in hash:ip,port,net
                        entries[KUBE_LOAD_BALANCER_SOURCE_CIDR].add(f"{lbip},{proto}:{svc.port},{cidr}")
                    if node_ip is not None and node_ip.version == net.version and node_ip in net:
                        allow_from_node = True
                if allow_from_node:
                    entries[KUBE_LOAD_BALANCER_SOURCE_IP].add(f"{lbip},{proto}:{svc.port},{lbip}")
                else:
                    lb_no_node_access.append((lbip, proto, svc.port))
            add_vs(make_vs(lbip, svc.port), endpoints_for(svc.external_policy_local), nn)
            if lbip not in node_address_set:
                bind.add(lbip)

        if svc.node_port:
            if not node_ips:
                # kube-proxy `continue`s here: no NodePort, and no health-check port either.
                continue
            if proto in ("tcp", "udp"):
                np_set = KUBE_NODE_PORT_TCP if proto == "tcp" else KUBE_NODE_PORT_UDP
                np_local = KUBE_NODE_PORT_LOCAL_TCP if proto == "tcp" else KUBE_NODE_PORT_LOCAL_UDP
                np_entries = [str(svc.node_port)]
            elif proto == "sctp":
                np_set, np_local = KUBE_NODE_PORT_SCTP, KUBE_NODE_PORT_LOCAL_SCTP
                np_entries = [f"{ip},sctp:{svc.node_port}" for ip in node_ips]
            else:  # "It should never hit"
                np_set = np_local = ""
                np_entries = []
            if np_set:
                entries[np_set].update(np_entries)
                if svc.external_policy_local:
                    entries[np_local].update(np_entries)
            for ip in node_ips:
                add_vs(make_vs(ip, svc.node_port), endpoints_for(svc.external_policy_local), nn)

        if svc.health_check_node_port:
            entries[KUBE_HEALTH_CHECK_NODE_PORT].add(str(svc.health_check_node_port))
            hc_ports[nn] = svc.health_check_node_port

    # Set the KUBE-IPVS-IPS set to the "activeBindAddrs".
    entries[KUBE_IPVS_IPS] = set(bind)

    ipsets = tuple(
        IPSet(config.set_name(info.name), info.set_type, family, info.comment, tuple(sorted(entries[info.name])))
        for info in IPSET_INFO
    )
    non_empty = {info.name for info in IPSET_INFO if entries[info.name]}
    iptables = _iptables_text(config, non_empty, lb_no_node_access)

    sysctls: list[tuple[str, int]] = [("net/ipv4/vs/conntrack", 1)]
    kv = _parse_kernel_version(config.kernel_version)
    if kv is None:
        conn_reuse = "kernel version unknown: left as it is"
    elif kv < CONN_REUSE_MODE_MIN_KERNEL:
        conn_reuse = f"kernel {config.kernel_version} < 4.1 has no conn_reuse_mode: not set"
    elif kv >= CONN_REUSE_MODE_FIXED_KERNEL:
        conn_reuse = f"kernel {config.kernel_version} >= 5.9: left as it is (kubernetes#93297)"
    else:
        conn_reuse = f"kernel {config.kernel_version} < 5.9: set to 0"
        sysctls.append(("net/ipv4/vs/conn_reuse_mode", 0))
    sysctls += [
        ("net/ipv4/vs/expire_nodest_conn", 1),
        ("net/ipv4/vs/expire_quiescent_template", 1),
        ("net/ipv4/ip_forward", 1),
    ]
    if config.ipvs_strict_arp:
        sysctls += [("net/ipv4/conf/all/arp_ignore", 1), ("net/ipv4/conf/all/arp_announce", 2)]
    timeouts = (int(config.ipvs_tcp_timeout), int(config.ipvs_tcpfin_timeout), int(config.ipvs_udp_timeout))
    if any(t < 0 for t in timeouts):
        raise InputError("Invalid value: must be greater than or equal to 0", field="--ipvs-tcp-timeout/--ipvs-tcpfin-timeout/--ipvs-udp-timeout")

    return IPVSRender(
        virtual_servers=tuple(vs_by_key[k] for k in vs_order),
        real_servers=rs_by_key,
        bind_addresses=tuple(_sorted_ips(bind)),
        ipsets=ipsets,
        iptables=iptables,
        jump_rules=IPVS_JUMP_RULES,
        sysctls=tuple(sysctls),
        conn_reuse_mode=conn_reuse,
        ipvs_timeouts=timeouts if any(timeouts) else None,
        scheduler=scheduler,
        exclude_cidrs=tuple(c for c in config.ipvs_exclude_cidrs if (":" in c) == v6),
        ip_family=config.ip_family,
        health_check_node_ports=hc_ports,
        no_local_endpoints_internal=len(no_local_internal),
        no_local_endpoints_external=len(no_local_external),
        service_of=service_of,
    )


def _rs_sort_key(rs: RealServer) -> str:
    # kube-proxy sorts endpoints by their "ip:port" string (byEndpoint)
    return join_host_port(rs.address, rs.port)


def _iptables_text(config: IPVSConfig, non_empty: set[str], lb_no_node_access: list[tuple[str, str, int]]) -> str:
    """``createAndLinkKubeChain`` (chain lines) + ``writeIptablesRules``; the buffer is
    ``natChains + natRules + filterChains + filterRules``."""
    mark = config.mark
    sname = config.set_name
    nat: list[str] = [f"-A {KUBE_SERVICES} -s {'::1/128' if config.is_ipv6 else '127.0.0.0/8'} -j RETURN"]
    flt: list[str] = []

    def comment(set_name: str) -> str:
        return f'"{_SET_BY_NAME[set_name].comment}"'

    for set_name, table, from_chain, target, match_type, proto in _IPSET_WITH_CHAIN:
        if set_name not in non_empty:
            continue
        line = f"-A {from_chain}"
        if proto:
            line += f" -p {proto}"
        line += f" -m comment --comment {comment(set_name)} -m set --match-set {sname(set_name)} {match_type} -j {target}"
        (flt if table == "filter" else nat).append(line)

    if KUBE_CLUSTER_IP in non_empty:
        head = f"-A {KUBE_SERVICES} -m comment --comment {comment(KUBE_CLUSTER_IP)} -m set --match-set {sname(KUBE_CLUSTER_IP)}"
        local_cidr = config.local_cidr()
        if config.masquerade_all:
            nat.append(f"{head} dst,dst -j {KUBE_MARK_MASQ}")
        elif local_cidr:
            # masquerade off-cluster traffic to a service VIP
            nat.append(f"{head} dst,dst ! -s {local_cidr} -j {KUBE_MARK_MASQ}")
        else:
            # no detector: masquerade OUTPUT traffic whose source is a VIP
            nat.append(f"{head} src,dst -j {KUBE_MARK_MASQ}")

    def external_ip_rules(head: str) -> None:
        # traffic from off the machine (not from a bridge, not local) ...
        nat.append(f"{head} -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT")
        # ... and traffic to external IPs that happen to be local addresses
        nat.append(f"{head} -m addrtype --dst-type LOCAL -j ACCEPT")

    if KUBE_EXTERNAL_IP in non_empty:
        head = (f"-A {KUBE_SERVICES} -m comment --comment {comment(KUBE_EXTERNAL_IP)} "
                f"-m set --match-set {sname(KUBE_EXTERNAL_IP)} dst,dst")
        nat.append(f"{head} -j {KUBE_MARK_MASQ}")
        external_ip_rules(head)
    if KUBE_EXTERNAL_IP_LOCAL in non_empty:
        head = (f"-A {KUBE_SERVICES} -m comment --comment {comment(KUBE_EXTERNAL_IP_LOCAL)} "
                f"-m set --match-set {sname(KUBE_EXTERNAL_IP_LOCAL)} dst,dst")
        external_ip_rules(head)

    nat.append(f"-A {KUBE_SERVICES} -m addrtype --dst-type LOCAL -j {KUBE_NODE_PORT}")
    nat.append(f"-A {KUBE_LOAD_BALANCER} -j {KUBE_MARK_MASQ}")
    flt.append(f"-A {KUBE_SOURCE_RANGES_FIREWALL} -j DROP")
    for ip, proto, port in lb_no_node_access:  # node -> LB IP, when no source range allows the node
        flt.append(f"-A {KUBE_IPVS_OUT_FILTER} -s {ip} -m ipvs --vaddr {ip} --vproto {proto} --vport {port} -j DROP")
    # acceptIPVSTraffic: must be last in KUBE-SERVICES
    for set_name in (KUBE_CLUSTER_IP, KUBE_LOAD_BALANCER_SET):
        if set_name in non_empty:
            nat.append(f"-A {KUBE_SERVICES} -m set --match-set {sname(set_name)} dst,dst -j ACCEPT")
    flt.append(f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding rules" -m mark --mark {mark}/{mark} -j ACCEPT')
    flt.append(
        f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    )
    flt.append(
        f"-A {KUBE_NODE_PORT} -m comment --comment {comment(KUBE_HEALTH_CHECK_NODE_PORT)} "
        f"-m set --match-set {sname(KUBE_HEALTH_CHECK_NODE_PORT)} dst -j ACCEPT"
    )
    # KUBE-IPVS-FILTER: no access to host ports through VIPs (kubernetes#72236)
    for set_name, match_type in (
        (KUBE_LOAD_BALANCER_SET, "dst,dst"), (KUBE_CLUSTER_IP, "dst,dst"), (KUBE_EXTERNAL_IP, "dst,dst"),
        (KUBE_EXTERNAL_IP_LOCAL, "dst,dst"), (KUBE_HEALTH_CHECK_NODE_PORT, "dst"),
    ):
        flt.append(f"-A {KUBE_IPVS_FILTER} -m set --match-set {sname(set_name)} {match_type} -j RETURN")
    flt.append(f"-A {KUBE_IPVS_FILTER} -m conntrack --ctstate NEW -m set --match-set {sname(KUBE_IPVS_IPS)} dst -j REJECT")
    nat.append(f"-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN")
    nat.append(f"-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}")
    masq = f'-A {KUBE_POSTROUTING} -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE'
    nat.append(masq + " --random-fully" if config.random_fully else masq)
    nat.append(f"-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}")

    parts = ["*nat", *(f":{c} - [0:0]" for c in _NAT_CHAINS), *nat, "COMMIT"]
    parts += ["*filter", *(f":{c} - [0:0]" for c in _FILTER_CHAINS), *flt, "COMMIT"]
    return "\n".join(parts) + "\n"


# --- the text `testbed proxy render --proxy-mode ipvs` prints ----------------------------


def render_ipvs_text(objects_or_maps: Any, config: IPVSConfig) -> str:
    """Everything kube-proxy's ipvs mode programs on one node, readable.

    ``objects_or_maps`` is a list of manifests (Services, EndpointSlices, ``kind: List``)
    or a ``(service_map, endpoints_map)`` pair. Sections start with a ``# `` line; the
    lines of the ``ipvsadm -R``, ``ipset restore`` and ``iptables-restore`` sections are
    exactly what an applier feeds those tools.
    """
    if isinstance(objects_or_maps, tuple) and len(objects_or_maps) == 2 and isinstance(objects_or_maps[0], Mapping):
        services, endpoints = objects_or_maps
    else:
        services, endpoints = build_maps(objects_or_maps, config.ip_family)
    r = render_ipvs(services, endpoints, config)
    plen = 128 if config.is_ipv6 else 32
    out = [f"# sysctl (conn_reuse_mode: {r.conn_reuse_mode})"]
    out += [f"{k.replace('/', '.')} = {v}" for k, v in r.sysctls]
    if r.ipvs_timeouts:
        out.append("# ipvsadm --set TCP TCPFIN UDP")
        out.append("--set " + " ".join(str(t) for t in r.ipvs_timeouts))
    out.append(f"# ip link add {DUMMY_DEVICE} type dummy (left down); ip addr add ADDRESS dev {DUMMY_DEVICE}")
    out += [f"{a}/{plen}" for a in r.bind_addresses]
    out.append(f"# ipvsadm -R (scheduler {r.scheduler})")
    out += r.ipvsadm_text.splitlines()
    out.append("# ipset restore -exist")
    out += r.ipset_text.splitlines()
    out.append("# iptables-restore --noflush --counters")
    out += r.iptables.splitlines()
    out.append("# iptables -t TABLE -I CHAIN (ensured on every sync, EnsureRule(Prepend))")
    for j in r.jump_rules:
        args = " ".join(f'"{a}"' if " " in a else a for a in j.args)
        out.append(f"-t {j.table} -I {j.chain} {args}")
    return "\n".join(out) + "\n"


# --- reading the kernel back, and the incremental difference --------------------------------


def _split_host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    return str(ipaddress.ip_address(host)), int(port)


def parse_ipvsadm_save(text: str) -> tuple[dict[tuple[str, str, int], VirtualServer], dict[tuple[str, str, int], dict[tuple[str, int], RealServer]]]:
    """``ipvsadm -S -n`` output -> virtual servers and their real servers (by key).

    ``ipvsadm`` prints the service flags it knows (``-p`` persistent, ``-b`` scheduler
    flags); the kernel's ``hashed`` bit is not printed, as kube-proxy ignores it."""
    vss: dict[tuple[str, str, int], VirtualServer] = {}
    rss: dict[tuple[str, str, int], dict[tuple[str, int], RealServer]] = {}
    for raw in text.splitlines():
        tok = raw.split()
        if len(tok) < 3 or tok[0] not in ("-A", "-a"):
            continue
        proto = _OPT_PROTO.get(tok[1])
        if proto is None:  # fwmark services (-f) are not kube-proxy's
            continue
        addr, port = _split_host_port(tok[2])
        key = (proto, addr, port)
        opts: dict[str, str] = {}
        i = 3
        while i < len(tok):
            opt = tok[i]
            if i + 1 < len(tok) and not tok[i + 1].startswith("-"):
                opts[opt] = tok[i + 1]
                i += 2
            else:
                opts[opt] = ""
                i += 1
        if tok[0] == "-A":
            flags = 0
            timeout = 0
            if "-p" in opts or "--persistent" in opts:
                flags |= FLAG_PERSISTENT
                timeout = int(opts.get("-p") or opts.get("--persistent") or 300)
            sched = opts.get("-s") or opts.get("--scheduler") or "wlc"
            for name in (opts.get("-b") or opts.get("--sched-flags") or "").split(","):
                for bit, generic in _SCHED_FLAG_BITS.items():
                    if name and name in (generic, _SCHED_FLAG_NAMES.get(sched, {}).get(bit)):
                        flags |= bit
            vss[key] = VirtualServer(addr, proto, port, sched, flags, timeout)
            rss.setdefault(key, {})
        else:
            raddr, rport = _split_host_port(opts.get("-r") or opts.get("--real-server") or "")
            weight = int(opts.get("-w") or opts.get("--weight") or 1)
            rss.setdefault(key, {})[(raddr, rport)] = RealServer(raddr, rport, weight)
    return vss, rss


_PROC_PROTO = {"TCP": "TCP", "UDP": "UDP", "SCTP": "SCTP"}


def _proc_host_port(text: str) -> tuple[str, int]:
    """``0A60000A:0050`` or ``[2001:0000:...:0001]:0035`` -> (canonical address, port)."""
    host, _, port = text.rpartition(":")
    if host.startswith("["):
        addr = str(ipaddress.ip_address(host[1:-1]))
    else:
        addr = str(ipaddress.IPv4Address(int(host, 16)))
    return addr, int(port, 16)


def parse_proc_ip_vs(text: str) -> tuple[dict[tuple[str, str, int], str], dict[tuple[str, str, int], dict[tuple[str, int], RealServer]]]:
    """``/proc/net/ip_vs`` (``ip_vs_info_seq_show``: the whole table in one read, hex
    addresses) -> ({key: scheduler}, {key: {(addr, port): RealServer}}). Service flags
    and the persistence timeout (printed there in jiffies) come from the netlink service
    dump instead; firewall-mark services are skipped."""
    scheds: dict[tuple[str, str, int], str] = {}
    rss: dict[tuple[str, str, int], dict[tuple[str, int], RealServer]] = {}
    key = None
    for line in text.splitlines():
        tok = line.split()
        if not tok:
            continue
        if tok[0] in _PROC_PROTO and len(tok) >= 3:
            addr, port = _proc_host_port(tok[1])
            key = (tok[0], addr, port)
            scheds[key] = tok[2]
            rss[key] = {}
        elif tok[0] == "->" and key is not None and len(tok) >= 4 and not tok[1].startswith("Remote"):
            addr, port = _proc_host_port(tok[1])
            rss[key][(addr, port)] = RealServer(addr, port, int(tok[3]))
        elif tok[0] == "FWM":
            key = None
    return scheds, rss


def ipvs_restore_diff(
    desired: IPVSRender,
    current_vs: Mapping[tuple[str, str, int], VirtualServer],
    current_rs: Mapping[tuple[str, str, int], Mapping[tuple[str, int], RealServer]],
    changed: set | None = None,
) -> tuple[str, dict[str, int]]:
    """``ipvsadm -R`` input that turns the kernel's IPVS state into ``desired``:
    ``syncService`` (``-A`` new, ``-E`` changed scheduler/flags/timeout), ``syncEndpoint``
    (``-a`` new real servers, ``-e`` weight, ``-d`` removed ones) per wanted virtual
    server in render order, then ``cleanLegacyService`` (``-D`` every other virtual
    server of this family outside ``--ipvs-exclude-cidrs``). Against an empty kernel
    the result is exactly ``desired.ipvsadm_text``. Returns ``(text, counts)``; the keys
    of the wanted virtual servers that changed (themselves or their real servers) are
    added to ``changed`` when given."""
    out: list[str] = []
    counts = {"vs_add": 0, "vs_edit": 0, "vs_del": 0, "rs_add": 0, "rs_edit": 0, "rs_del": 0}
    for vs in desired.virtual_servers:
        mark = len(out)
        cur = current_vs.get(vs.key)
        if cur is None:
            out.append(vs.ipvsadm_line("-A"))
            counts["vs_add"] += 1
        elif (cur.scheduler, cur.flags & ~FLAG_HASHED, cur.timeout) != (vs.scheduler, vs.flags, vs.timeout):
            out.append(vs.ipvsadm_line("-E"))
            counts["vs_edit"] += 1
        have = current_rs.get(vs.key, {}) if cur is not None else {}
        want = desired.real_servers.get(vs.key, ())
        want_keys = set()
        for rs in want:
            want_keys.add(rs.key)
            old = have.get(rs.key)
            if old is None:
                out.append(rs.ipvsadm_line(vs, "-a"))
                counts["rs_add"] += 1
            elif old.weight != rs.weight:
                out.append(rs.ipvsadm_line(vs, "-e"))
                counts["rs_edit"] += 1
        for key in sorted(set(have) - want_keys, key=lambda k: join_host_port(*k)):
            out.append(f"-d {vs.service_args()} -r {join_host_port(*key)}")
            counts["rs_del"] += 1
        if changed is not None and len(out) > mark:
            changed.add(vs.key)
    wanted = {vs.key for vs in desired.virtual_servers}
    excluded = [ipaddress.ip_network(c, strict=False) for c in desired.exclude_cidrs]
    v6 = desired.ip_family == "IPv6"
    for key in sorted(set(current_vs) - wanted, key=lambda k: (k[0], _ip_sort(k[1]), k[2])):
        ip = ipaddress.ip_address(key[1])
        if (ip.version == 6) != v6 or any(ip.version == n.version and ip in n for n in excluded):
            continue
        out.append(f"-D {current_vs[key].service_args()}")
        counts["vs_del"] += 1
    return "".join(line + "\n" for line in out), counts


def _ip_sort(text: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(text)
    return (ip.version, int(ip))


def canonical_entry(set_type: str, entry: str) -> str:
    """An ipset entry as ``ipset save`` prints it: a ``/32`` (``/128``) net of a
    ``hash:ip,port,net`` entry is printed as a bare address. kube-proxy compares
    without this and re-adds such an entry on every sync; comparing canonically
    reaches the same kernel state without the churn."""
    if set_type == HASH_IP_PORT_NET:
        head, _, net = entry.rpartition(",")
        if net.endswith("/32") or net.endswith("/128"):
            return f"{head},{net.rsplit('/', 1)[0]}"
    return entry


def parse_ipset_save(text: str) -> dict[str, set[str]]:
    """``ipset save`` output -> {set name: entries} (every set, even empty ones)."""
    sets: dict[str, set[str]] = {}
    for line in text.splitlines():
        tok = line.split(None, 2)
        if len(tok) >= 2 and tok[0] == "create":
            sets.setdefault(tok[1], set())
        elif len(tok) == 3 and tok[0] == "add":
            sets.setdefault(tok[1], set()).add(tok[2].strip())
    return sets


def ipset_restore_diff(desired: IPVSRender, current: Mapping[str, Iterable[str]]) -> tuple[str, dict[str, int]]:
    """``ipset restore -exist`` input for ``syncIPSetEntries`` of every set: the
    ``create`` line (``ensureIPSet``, every sync), then ``del`` the entries the kernel
    has and kube-proxy no longer wants, then ``add`` the missing ones (both sorted, as
    ``sets.String.List()``). Against an empty kernel: exactly ``desired.ipset_text``."""
    out: list[str] = []
    counts = {"add": 0, "del": 0}
    for s in desired.ipsets:
        out.append(s.create_line())
        have = {canonical_entry(s.set_type, e) for e in current.get(s.name, ())}
        want = {canonical_entry(s.set_type, e): e for e in s.entries}
        for e in sorted(have - want.keys()):
            out.append(f"del {s.name} {e}")
            counts["del"] += 1
        for e in s.entries:
            if canonical_entry(s.set_type, e) not in have:
                out.append(f"add {s.name} {e}")
                counts["add"] += 1
    return "".join(line + "\n" for line in out), counts
