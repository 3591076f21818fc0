"""kube-proxy's nftables mode as a pure function.

:func:`render_nftables_sync` returns exactly the transaction kube-proxy's
``syncProxyRules`` (``pkg/proxy/nftables/proxier.go``, read at ``531be812``, v1.34-era
master, the version kube-proxy's ``TestOverallNFTablesRules`` vector matches) hands to
knftables, written the way knftables serialises it for ``nft -f -`` (``objects.go``
``writeOperation``): one ``add``/``flush``/``delete`` command per line, every object
qualified with ``ip kube-proxy``, comments as Go ``%q``, base-chain priorities as numbers
(knftables converts ``dstnat-10`` to ``-110`` itself, because older ``nft`` rejects some
named priorities in some hooks), ``@`` joined to the set name (``knftables.Concat``).

The text is real ``nft`` CLI input: the applier feeds it, byte for byte, to ``nft -f -``
inside the node's namespace (:mod:`testbed.kubeproxy_nftables`).

What the sync does, in kube-proxy's order:

* **stale chains** (``staleChains``): service/endpoint chains that stopped being used
  were flushed by an earlier sync; the ones flushed at least one second ago are deleted
  in a separate, earlier transaction (:attr:`NFTablesRender.stale_text`) -- kernels
  before 6.2 keep a chain "in use" for a moment after its last map element is gone.
* **full sync** (``changed=None``): ``setupNFTables`` -- the table, base chains (on the
  very first sync of a kube-proxy process also added and deleted once, so changed
  priorities apply: ``flushed``), the jump rules, the fixed chains and rules, the sets and
  maps; the maps' and sets' current elements are read back from the kernel
  (``readOrReset``).
* **every Service port** (sorted, where kube-proxy walks a Go map): the set/map elements
  are reconciled one by one against what the kernel holds (``nftElementStorage``: only
  new, changed -- delete then add -- or leftover elements appear in the transaction);
  the Service's chains are rewritten only on a full sync or when the Service changed
  (``changed`` holds it): ``add chain`` + ``flush chain`` then its rules.
* chains with a ``/`` in their name that exist in the kernel but are no longer wanted are
  flushed and remembered as stale; unused ``affinity-*`` sets are deleted at once;
  leftover elements are deleted.

Deterministic where kube-proxy is random: Services in sorted order, leftover elements
and stale chains sorted. Nothing here touches the kernel: what the kernel holds comes in
as :class:`KernelState` (see :func:`kernel_state_from_nft_json`).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Mapping, Sequence

from .types import Endpoint, NamespacedName, NodePortAddresses, ProxierFlags, ServicePort, changed_service_names, ServicePortName, categorize_endpoints

__all__ = [
    "TABLE",
    "ELEMENT_CONTAINERS",
    "BASE_CHAINS",
    "JUMP_CHAINS",
    "NFTablesConfig",
    "KernelState",
    "NFTablesRender",
    "render_nftables_sync",
    "render_nftables",
    "stale_chain_deletions",
    "kernel_state_from_nft_json",
    "hash_and_truncate",
    "service_port_chain_name_base",
    "service_port_endpoint_chain_name_base",
    "is_service_chain_name",
    "is_affinity_set_name",
]

# --- names (proxier.go constants) ----------------------------------------------------

#: ``kubeProxyTable``; the table's family is ``ip`` (IPv4) or ``ip6``.
TABLE = "kube-proxy"

FILTER_PREROUTING_PRE_DNAT = "filter-prerouting-pre-dnat"
FILTER_OUTPUT_PRE_DNAT = "filter-output-pre-dnat"
FILTER_INPUT = "filter-input"
FILTER_FORWARD = "filter-forward"
FILTER_OUTPUT = "filter-output"
NAT_PREROUTING = "nat-prerouting"
NAT_OUTPUT = "nat-output"
NAT_POSTROUTING = "nat-postrouting"

SERVICES_CHAIN = "services"
SERVICE_IPS_MAP = "service-ips"
SERVICE_NODEPORTS_MAP = "service-nodeports"
NODEPORT_IPS_SET = "nodeport-ips"
CLUSTER_IPS_SET = "cluster-ips"
SERVICE_ENDPOINTS_CHECK_CHAIN = "service-endpoints-check"
NODEPORT_ENDPOINTS_CHECK_CHAIN = "nodeport-endpoints-check"
NO_ENDPOINT_SERVICES_MAP = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS_MAP = "no-endpoint-nodeports"
REJECT_CHAIN = "reject-chain"
CLUSTER_IPS_CHECK_CHAIN = "cluster-ips-check"
FIREWALL_IPS_MAP = "firewall-ips"
FIREWALL_CHECK_CHAIN = "firewall-check"
MARK_MASQ_CHAIN = "mark-for-masquerade"
MASQUERADING_CHAIN = "masquerading"

SERVICE_PREFIX = "service-"  # servicePortPolicyClusterChainNamePrefix
LOCAL_PREFIX = "local-"  # servicePortPolicyLocalChainNamePrefix
EXTERNAL_PREFIX = "external-"  # serviceExternalChainNamePrefix
ENDPOINT_PREFIX = "endpoint-"  # servicePortEndpointChainNamePrefix
AFFINITY_PREFIX = "affinity-"  # servicePortEndpointAffinityNamePrefix
FIREWALL_PREFIX = "firewall-"  # servicePortFirewallChainNamePrefix

#: ``knftables.NameLengthMax``
NAME_LENGTH_MAX = 256
#: ``chainNamePrefixLengthMax``
CHAIN_NAME_PREFIX_LENGTH_MAX = 16
#: ``chainNameBaseLengthMax``
CHAIN_NAME_BASE_LENGTH_MAX = NAME_LENGTH_MAX - CHAIN_NAME_PREFIX_LENGTH_MAX


@dataclass(frozen=True, slots=True)
class BaseChain:
    """``nftablesBaseChain``: ``priority`` as kube-proxy names it, ``priority_value`` as
    knftables writes it (``ParsePriority``: dstnat=-100, filter=0, srcnat=100)."""

    name: str
    type: str
    hook: str
    priority: str
    priority_value: int


#: ``nftablesBaseChains``, in kube-proxy's order.
BASE_CHAINS: tuple[BaseChain, ...] = (
    BaseChain(FILTER_PREROUTING_PRE_DNAT, "filter", "prerouting", "dstnat-10", -110),
    BaseChain(FILTER_OUTPUT_PRE_DNAT, "filter", "output", "dstnat-10", -110),
    BaseChain(FILTER_INPUT, "filter", "input", "filter", 0),
    BaseChain(FILTER_FORWARD, "filter", "forward", "filter", 0),
    BaseChain(FILTER_OUTPUT, "filter", "output", "filter", 0),
    BaseChain(NAT_PREROUTING, "nat", "prerouting", "dstnat", -100),
    BaseChain(NAT_OUTPUT, "nat", "output", "dstnat", -100),
    BaseChain(NAT_POSTROUTING, "nat", "postrouting", "srcnat", 100),
)

#: ``nftablesJumpChains``: (destination chain, source base chain, extra match), in order.
JUMP_CHAINS: tuple[tuple[str, str, str], ...] = (
    (NODEPORT_ENDPOINTS_CHECK_CHAIN, FILTER_INPUT, "ct state new"),
    (SERVICE_ENDPOINTS_CHECK_CHAIN, FILTER_INPUT, "ct state new"),
    (SERVICE_ENDPOINTS_CHECK_CHAIN, FILTER_FORWARD, "ct state new"),
    (SERVICE_ENDPOINTS_CHECK_CHAIN, FILTER_OUTPUT, "ct state new"),
    (FIREWALL_CHECK_CHAIN, FILTER_PREROUTING_PRE_DNAT, "ct state new"),
    (FIREWALL_CHECK_CHAIN, FILTER_OUTPUT_PRE_DNAT, "ct state new"),
    (SERVICES_CHAIN, NAT_OUTPUT, ""),
    (SERVICES_CHAIN, NAT_PREROUTING, ""),
    (MASQUERADING_CHAIN, NAT_POSTROUTING, ""),
    (CLUSTER_IPS_CHECK_CHAIN, FILTER_FORWARD, "ct state new"),
    (CLUSTER_IPS_CHECK_CHAIN, FILTER_OUTPUT, "ct state new"),
)

#: The sets/maps whose elements kube-proxy reconciles (``nftElementStorage``).
ELEMENT_CONTAINERS: tuple[tuple[str, str], ...] = (
    ("set", CLUSTER_IPS_SET),
    ("map", SERVICE_IPS_MAP),
    ("map", FIREWALL_IPS_MAP),
    ("map", NO_ENDPOINT_SERVICES_MAP),
    ("map", NO_ENDPOINT_NODEPORTS_MAP),
    ("map", SERVICE_NODEPORTS_MAP),
)

#: Chains whose rules run in nat hooks (for the nat/filter rule counts of a sync).
_NAT_FIXED_CHAINS = frozenset({NAT_PREROUTING, NAT_OUTPUT, NAT_POSTROUTING, SERVICES_CHAIN, MASQUERADING_CHAIN, MARK_MASQ_CHAIN})


# --- hashing and names -----------------------------------------------------------------


@lru_cache(maxsize=1 << 18)
def hash_and_truncate(name: str) -> str:
    """``hashAndTruncate``: ``base32(sha256(name))[:8] + "-" + name``, cut to
    ``chainNameBaseLengthMax`` (240) with a trailing ``...``."""
    digest = hashlib.sha256(name.encode()).digest()
    out = base64.b32encode(digest[:5]).decode() + "-" + name  # base32 of 5 bytes = the first 8 chars of all 32
    if len(out) > CHAIN_NAME_BASE_LENGTH_MAX:
        out = out[: CHAIN_NAME_BASE_LENGTH_MAX - 3] + "..."
    return out


def service_port_chain_name_base(spn: ServicePortName, protocol: str) -> str:
    """``servicePortChainNameBase``: ``HASH-ns/svc/proto/port``."""
    return hash_and_truncate(f"{spn.namespace}/{spn.name}/{protocol}/{spn.port_name}")


def service_port_endpoint_chain_name_base(spn: ServicePortName, protocol: str, endpoint: str) -> str:
    """``servicePortEndpointChainNameBase``: ``HASH-ns/svc/proto/port__epIP/epPort``; the
    colons of an IPv6 endpoint IP become dots."""
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    if ":" in host:
        host = host.replace(":", ".")
    return hash_and_truncate(f"{spn.namespace}/{spn.name}/{protocol}/{spn.port_name}__{host}/{port}")


def is_service_chain_name(chain: str) -> bool:
    """``isServiceChainName``: every service/endpoint chain has a ``/``, no fixed one does."""
    return "/" in chain


def is_affinity_set_name(name: str) -> bool:
    """``isAffinitySetName``."""
    return name.startswith(AFFINITY_PREFIX)


def _q(text: str) -> str:
    """Go ``%q`` for the plain comments kube-proxy writes."""
    return json.dumps(text, ensure_ascii=False)


# --- configuration ---------------------------------------------------------------------


@dataclass
class NFTablesConfig(ProxierFlags):
    """kube-proxy flags/fields that shape the nftables rules (names after the flags).

    * ``hostname_override``: the node name; endpoints whose ``nodeName`` equals it are local.
    * ``node_ip``: the node's primary IP (``nodeIPs[family]``): a loadBalancerSourceRanges
      entry containing it also allows the LB IPs as sources (``allowFromNode``).
    * ``cluster_cidr``: ``--cluster-cidr`` (comma list; the family's entry is used), the
      local-traffic detector by cluster CIDR (``ip saddr``/``ip saddr !=``); empty: no-op
      detector (those rules are left out).
    * ``masquerade_bit`` (``--iptables-masquerade-bit``, 14; the nftables mode reuses the
      flag) and ``masquerade_mark``: the mark string; ``None`` means kube-proxy's own
      ``%#08x`` formatting (``0x00004000``); its unit tests use ``"0x4000"``.
    * ``masquerade_all``: ``--masquerade-all``.
    * ``nodeport_addresses``: ``--nodeport-addresses`` CIDRs; empty (or none of this
      family, or a ``/0``) means "match all" (``fib daddr type local``); otherwise the
      ``nodeport-ips`` set holds the node addresses inside them (loopback skipped).
    * ``node_addresses``: the addresses on the node's interfaces (``GetNodeIPs`` input);
      ``None`` means ``[node_ip]``.
    * ``service_cidrs``: the ServiceCIDR objects' ranges (``OnServiceCIDRsChanged``); the
      family's ones become ``ip daddr { ... } drop`` in ``cluster-ips-check``.
    * ``ip_family``: ``IPv4`` (table ``ip kube-proxy``) or ``IPv6`` (``ip6``).
    * ``topology_labels``, ``prefer_same_traffic_distribution``: as for iptables.
    """

    hostname_override: str = ""
    node_ip: str | None = None
    cluster_cidr: str | None = None
    masquerade_bit: int = 14
    masquerade_mark: str | None = None
    masquerade_all: bool = False
    nodeport_addresses: Sequence[str] = ()
    node_addresses: Sequence[str] | None = None
    service_cidrs: Sequence[str] = ()
    ip_family: str = "IPv4"
    topology_labels: Mapping[str, str] = field(default_factory=dict)
    prefer_same_traffic_distribution: bool = True

    @property
    def family(self) -> str:
        """The nftables family of the table: ``ip`` or ``ip6``."""
        return "ip6" if self.is_ipv6 else "ip"

    def service_cidrs_string(self) -> str:
        """``proxier.serviceCIDRs``: this family's CIDRs joined with ``,``."""
        return ",".join(c for c in self.service_cidrs if c and (":" not in c) != self.is_ipv6)


# --- what the kernel holds ---------------------------------------------------------------


@dataclass
class KernelState:
    """What kube-proxy reads from the kernel for one sync.

    * ``chains``: the chain names in the table (``nftables.List("chain")``); ``None`` when
      listing failed or the table does not exist (kube-proxy then cannot spot stale chains).
    * ``sets``: the set names (``List("sets")``: sets only, not maps); ``None`` likewise.
    * ``elements``: per set/map name, ``{key: value}`` with the parts of a concatenation
      joined by ``" . "`` and the value a verdict such as ``goto service-...`` or ``drop``
      (``""`` for set elements): what ``ListElements`` gives ``nftElementStorage``. A missing
      name means "no such set/map" (an empty storage, nothing flushed).
    """

    chains: frozenset[str] | None = None
    sets: frozenset[str] | None = None
    elements: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def empty_table(cls) -> "KernelState":
        return cls(chains=frozenset(), sets=frozenset(), elements={})


def _json_scalar(v) -> str:  # noqa: ANN001
    if isinstance(v, dict):
        if "prefix" in v:
            p = v["prefix"]
            return f"{p['addr']}/{p['len']}"
        if "range" in v:
            a, b = v["range"]
            return f"{_json_scalar(a)}-{_json_scalar(b)}"
    return str(v)


def _json_key(v) -> str:  # noqa: ANN001
    if isinstance(v, dict) and "elem" in v:
        v = v["elem"]["val"]
    if isinstance(v, dict) and "concat" in v:
        return " . ".join(_json_scalar(p) for p in v["concat"])
    return _json_scalar(v)


def _json_verdict(v) -> str:  # noqa: ANN001
    if isinstance(v, dict) and len(v) == 1:
        (verb, arg), = v.items()
        if isinstance(arg, dict) and "target" in arg:
            return f"{verb} {arg['target']}"
        if arg is None:
            return verb
    return _json_key(v)


def kernel_state_from_nft_json(*documents: str, table: str = TABLE, family: str = "ip") -> KernelState:
    """A :class:`KernelState` from the JSON that ``nft -j list chains <family>``,
    ``nft -j list sets <family>``, ``nft -j list maps <family>`` (or ``nft -j list table``)
    print. Objects of other tables are ignored. When no document mentions the table (no
    such table), ``chains`` and ``sets`` stay ``None``, as kube-proxy's failed listing."""
    chains: set[str] = set()
    sets: set[str] = set()
    elements: dict[str, dict[str, str]] = {}
    seen = False
    for doc in documents:
        if not doc.strip():
            continue
        for obj in json.loads(doc).get("nftables", []):
            (kind, body), = obj.items()
            if not isinstance(body, dict) or body.get("family") != family:
                continue
            if kind == "table":
                seen = seen or body.get("name") == table
                continue
            if body.get("table") != table:
                continue
            seen = True
            if kind == "chain":
                chains.add(body["name"])
            elif kind in ("set", "map"):
                if kind == "set":
                    sets.add(body["name"])
                elems = elements.setdefault(body["name"], {})
                for e in body.get("elem", []) or []:
                    if kind == "map":
                        k, v = e
                        elems[_json_key(k)] = _json_verdict(v)
                    else:
                        elems[_json_key(e)] = ""
    if not seen:
        return KernelState()
    return KernelState(chains=frozenset(chains), sets=frozenset(sets), elements=elements)


# --- the transaction -----------------------------------------------------------------------


class _Tx:
    """A knftables ``Transaction`` written straight to text (``writeOperation``)."""

    __slots__ = ("lines", "prefix")

    def __init__(self, family: str):
        self.lines: list[str] = []
        self.prefix = f"{family} {TABLE}"

    def add_chain(self, name: str) -> None:
        self.lines.append(f"add chain {self.prefix} {name}")

    def flush_chain(self, name: str) -> None:
        self.lines.append(f"flush chain {self.prefix} {name}")

    def delete_chain(self, name: str) -> None:
        self.lines.append(f"delete chain {self.prefix} {name}")

    def rule(self, chain: str, rule: str, comment: str | None = None) -> None:
        if comment is None:
            self.lines.append(f"add rule {self.prefix} {chain} {rule}")
        else:
            self.lines.append(f"add rule {self.prefix} {chain} {rule} comment {_q(comment)}")

    def add_element(self, container: str, key: str, value: str = "", comment: str | None = None) -> None:
        text = f"add element {self.prefix} {container} {{ {key}"
        if comment is not None:
            text += f" comment {_q(comment)}"
        if value:
            text += f" : {value}"
        self.lines.append(text + " }")

    def delete_element(self, container: str, key: str) -> None:
        self.lines.append(f"delete element {self.prefix} {container} {{ {key} }}")


class _ElementStorage:
    """``nftElementStorage``: the elements kube-proxy believes a set/map holds, reconciled
    element by element (``ensureElem`` / ``cleanupLeftoverKeys``)."""

    __slots__ = ("name", "elements", "leftover")

    def __init__(self, name: str, current: Mapping[str, str] | None):
        self.name = name
        self.elements: dict[str, str] = dict(current or {})
        self.leftover: set[str] = set(self.elements)

    def ensure(self, tx: _Tx, key: str, value: str = "", comment: str | None = None) -> None:
        existing = self.elements.get(key)
        if existing is not None:
            if existing != value:
                tx.delete_element(self.name, key)
                tx.add_element(self.name, key, value, comment)
                self.elements[key] = value
            self.leftover.discard(key)
        else:
            tx.add_element(self.name, key, value, comment)
            self.elements[key] = value

    def cleanup(self, tx: _Tx) -> int:
        n = 0
        for key in sorted(self.leftover):
            tx.delete_element(self.name, key)
            del self.elements[key]
            n += 1
        self.leftover = set(self.elements)
        return n


@dataclass(frozen=True)
class NFTablesRender:
    """One sync's output.

    * ``text``: the main transaction (``nft -f -`` input); ``""`` when there is nothing to
      do (kube-proxy still runs an empty transaction; nft accepts empty input).
    * ``stale_text``: the earlier transaction deleting stale chains flushed at least a
      second ago (``""`` if none); run it first, then ``text``.
    * ``operations``: ``LastTransaction.NumOperations()`` of ``text``.
    * ``stale_chains``: chain -> time it became stale, to keep for the next sync.
    * ``deleted_chains``: deleted by ``stale_text``; ``flushed_chains``: stale chains
      flushed by ``text``.
    * ``nat_rules`` / ``filter_rules``: rules the table holds after this sync (those in
      chains that run in nat hooks -- ``services``, ``masquerading``, service/endpoint
      chains -- and the rest: checks, firewall and reject chains), counted whether this sync
      wrote them or left them in place.
    * ``elements``: set + map elements the table holds after this sync.
    * ``element_storage``: kube-proxy's ``nftElementStorage`` contents after this sync
      (set/map name -> ``{key: value}``), what a partial sync may start from instead of
      reading the elements back from the kernel (kube-proxy reads them on full syncs only).
    * ``no_local_endpoints_internal/external``: ``sync_proxy_rules_no_local_endpoints_total``.
    """

    text: str
    stale_text: str
    operations: int
    full_sync: bool
    stale_chains: Mapping[str, float]
    deleted_chains: tuple[str, ...]
    flushed_chains: tuple[str, ...]
    active_chains: frozenset[str]
    active_affinity_sets: frozenset[str]
    nat_rules: int
    filter_rules: int
    elements: int
    element_storage: Mapping[str, Mapping[str, str]]
    changed_services: int
    total_endpoints: int
    no_local_endpoints_internal: int
    no_local_endpoints_external: int


def stale_chain_deletions(
    stale_chains: Mapping[str, float], now: float, family: str = "ip"
) -> tuple[str, dict[str, float], tuple[str, ...]]:
    """The stale-chain step at the start of ``syncProxyRules``: chains that became stale
    more than one second before ``now`` are deleted (``delete chain``) in their own
    transaction. Returns ``(transaction text, remaining stale chains, deleted chains)``."""
    one_second_ago = now - 1.0
    tx = _Tx(family)
    remaining = dict(stale_chains)
    deleted = []
    for chain in sorted(stale_chains):
        if stale_chains[chain] < one_second_ago:
            tx.delete_chain(chain)
            del remaining[chain]
            deleted.append(chain)
    return ("\n".join(tx.lines) + "\n" if tx.lines else ""), remaining, tuple(deleted)


def render_nftables(
    services: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, Sequence[Endpoint]],
    config: NFTablesConfig,
    **kwargs,
) -> str:
    """The main ``nft -f`` transaction of one sync. See :func:`render_nftables_sync`."""
    return render_nftables_sync(services, endpoints, config, **kwargs).text


def render_nftables_sync(
    services: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, Sequence[Endpoint]],
    config: NFTablesConfig,
    *,
    changed: Iterable[ServicePortName | NamespacedName | tuple[str, str]] | None = None,
    kernel: KernelState | None = None,
    stale_chains: Mapping[str, float] | None = None,
    now: float = 0.0,
    flushed: bool = False,
    synced_once: bool = False,
) -> NFTablesRender:
    """``Proxier.syncProxyRules`` of the nftables mode for these maps.

    * ``changed=None``: a full sync (``doFullSync``): ``setupNFTables`` plus every Service's
      chains. ``changed=<set>``: a partial sync; only Services named there (by namespace
      and name; :func:`testbed.proxy.servicemap.changed_services` computes them) get their
      chains rewritten; every Service's set/map elements are still reconciled. As in
      kube-proxy, a partial sync is correct only on top of a successful sync with the same
      ``config``.
    * ``kernel``: what the kernel holds now (chains, sets, elements), listed *before*
      ``stale_text`` runs (the chains it deletes are taken out here). ``None``: nothing
      could be listed (a fresh node: no table yet).
    * ``stale_chains`` / ``now`` (seconds, any clock, the same one every sync): the stale
      chains of the previous syncs and when each became stale.
    * ``flushed``: this kube-proxy already did its first full sync (else the base chains are
      added and deleted once, so their priorities can change).
    * ``synced_once``: this kube-proxy already synced once; the first sync after a restart
      keeps endpoint chains already in the kernel (``epChainSkipUpdate``).
    """
    full_sync = changed is None
    changed_nn = changed_service_names(changed)

    fam = config.family
    is_v6 = config.is_ipv6
    ip_x = "ip6" if is_v6 else "ip"
    addr_type = "ipv6_addr" if is_v6 else "ipv4_addr"
    no_localhost = "ip6 daddr != ::1" if is_v6 else "ip daddr != 127.0.0.0/8"
    mark = config.mark
    node_name = config.hostname_override
    topo = config.topology_labels
    prefer_node = config.prefer_same_traffic_distribution
    local_cidr = config.local_cidr()
    npa = NodePortAddresses(config.ip_family, config.nodeport_addresses)
    node_ip = None
    if config.node_ip:
        try:
            node_ip = ipaddress.ip_address(config.node_ip)
        except ValueError:
            node_ip = None

    kernel = kernel if kernel is not None else KernelState()
    stale_text, stale, deleted = stale_chain_deletions(stale_chains or {}, now, fam)
    existing_chains = None if kernel.chains is None else set(kernel.chains) - set(deleted)
    existing_affinity = None if kernel.sets is None else {s for s in kernel.sets if is_affinity_set_name(s)}

    tx = _Tx(fam)
    add = tx.lines.append
    pre = tx.prefix
    fixed_rules_nat = 0
    fixed_rules_filter = 0

    # --- setupNFTables (full sync) ------------------------------------------------------
    # On a partial sync these objects are already in the kernel; their rule counts are
    # the same as on the last full sync, so they are counted here either way.
    setup = _Tx(fam)
    s_add = setup.lines.append
    s_add(f"add table {pre} {{ comment {_q('rules for kube-proxy')} ; }}")
    if not flushed:
        for bc in BASE_CHAINS:
            s_add(f"add chain {pre} {bc.name}")
            s_add(f"delete chain {pre} {bc.name}")
    for bc in BASE_CHAINS:
        s_add(f"add chain {pre} {bc.name} {{ type {bc.type} hook {bc.hook} priority {bc.priority_value} ; }}")
        s_add(f"flush chain {pre} {bc.name}")
    created: set[str] = set()

    def ensure_fixed(chain: str) -> None:
        if chain not in created:
            created.add(chain)
            setup.add_chain(chain)
            setup.flush_chain(chain)

    def fixed_rule(chain: str, rule: str, comment: str | None = None) -> None:
        nonlocal fixed_rules_nat, fixed_rules_filter
        setup.rule(chain, rule, comment)
        if chain in _NAT_FIXED_CHAINS:
            fixed_rules_nat += 1
        else:
            fixed_rules_filter += 1

    for dst, src, extra in JUMP_CHAINS:
        ensure_fixed(dst)
        fixed_rule(src, f"{extra} jump {dst}" if extra else f"jump {dst}")
    for chain in (SERVICES_CHAIN, CLUSTER_IPS_CHECK_CHAIN, MASQUERADING_CHAIN, MARK_MASQ_CHAIN):
        ensure_fixed(chain)
    fixed_rule(MARK_MASQ_CHAIN, f"mark set mark or {mark}")
    fixed_rule(MASQUERADING_CHAIN, f"mark and {mark} == 0 return")
    fixed_rule(MASQUERADING_CHAIN, f"mark set mark xor {mark}")
    fixed_rule(MASQUERADING_CHAIN, "masquerade fully-random")
    s_add(f"add set {pre} {CLUSTER_IPS_SET} {{ type {addr_type} ; comment {_q('Active ClusterIPs')} ; }}")
    fixed_rule(CLUSTER_IPS_CHECK_CHAIN, f"{ip_x} daddr @{CLUSTER_IPS_SET} reject", "Reject traffic to invalid ports of ClusterIPs")
    service_cidrs = config.service_cidrs_string()
    if service_cidrs:
        fixed_rule(CLUSTER_IPS_CHECK_CHAIN, f"{ip_x} daddr {{ {service_cidrs} }} drop", "Drop traffic to unallocated ClusterIPs")
    s_add(f"add set {pre} {NODEPORT_IPS_SET} {{ type {addr_type} ; comment {_q('IPs that accept NodePort traffic')} ; }}")
    nodeport_ip_elements = 0
    if npa.match_all:
        s_add(f"delete set {pre} {NODEPORT_IPS_SET}")
    else:
        s_add(f"flush set {pre} {NODEPORT_IPS_SET}")
        addresses = config.node_addresses if config.node_addresses is not None else [a for a in (config.node_ip,) if a]
        for ip in npa.node_ips(addresses):
            if ip.is_loopback:
                continue  # "localhost NodePorts are not supported"
            setup.add_element(NODEPORT_IPS_SET, str(ip))
            nodeport_ip_elements += 1
    s_add(
        f"add map {pre} {NO_ENDPOINT_SERVICES_MAP} {{ type {addr_type} . inet_proto . inet_service : verdict ; "
        f"comment {_q('vmap to drop or reject packets to services with no endpoints')} ; }}"
    )
    s_add(
        f"add map {pre} {NO_ENDPOINT_NODEPORTS_MAP} {{ type inet_proto . inet_service : verdict ; "
        f"comment {_q('vmap to drop or reject packets to service nodeports with no endpoints')} ; }}"
    )
    s_add(f"add chain {pre} {REJECT_CHAIN} {{ comment {_q('helper for @no-endpoint-services / @no-endpoint-nodeports')} ; }}")
    s_add(f"flush chain {pre} {REJECT_CHAIN}")
    fixed_rule(REJECT_CHAIN, "reject")
    fixed_rule(SERVICE_ENDPOINTS_CHECK_CHAIN, f"{ip_x} daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES_MAP}")
    if npa.match_all:
        fixed_rule(NODEPORT_ENDPOINTS_CHECK_CHAIN, f"{no_localhost} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS_MAP}")
    else:
        fixed_rule(
            NODEPORT_ENDPOINTS_CHECK_CHAIN,
            f"{ip_x} daddr @{NODEPORT_IPS_SET} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS_MAP}",
        )
    s_add(
        f"add map {pre} {FIREWALL_IPS_MAP} {{ type {addr_type} . inet_proto . inet_service : verdict ; "
        f"comment {_q('destinations that are subject to LoadBalancerSourceRanges')} ; }}"
    )
    ensure_fixed(FIREWALL_CHECK_CHAIN)
    fixed_rule(FIREWALL_CHECK_CHAIN, f"{ip_x} daddr . meta l4proto . th dport vmap @{FIREWALL_IPS_MAP}")
    s_add(
        f"add map {pre} {SERVICE_IPS_MAP} {{ type {addr_type} . inet_proto . inet_service : verdict ; "
        f"comment {_q('ClusterIP, ExternalIP and LoadBalancer IP traffic')} ; }}"
    )
    s_add(f"add map {pre} {SERVICE_NODEPORTS_MAP} {{ type inet_proto . inet_service : verdict ; comment {_q('NodePort traffic')} ; }}")
    fixed_rule(SERVICES_CHAIN, f"{ip_x} daddr . meta l4proto . th dport vmap @{SERVICE_IPS_MAP}")
    if npa.match_all:
        fixed_rule(SERVICES_CHAIN, f"fib daddr type local {no_localhost} meta l4proto . th dport vmap @{SERVICE_NODEPORTS_MAP}")
    else:
        fixed_rule(SERVICES_CHAIN, f"{ip_x} daddr @{NODEPORT_IPS_SET} meta l4proto . th dport vmap @{SERVICE_NODEPORTS_MAP}")
    if full_sync:
        tx.lines.extend(setup.lines)

    # readOrReset (full sync) / the storages kept since the last sync (partial sync): both
    # are what the kernel holds.
    elems = kernel.elements
    cluster_ips = _ElementStorage(CLUSTER_IPS_SET, elems.get(CLUSTER_IPS_SET))
    service_ips = _ElementStorage(SERVICE_IPS_MAP, elems.get(SERVICE_IPS_MAP))
    firewall_ips = _ElementStorage(FIREWALL_IPS_MAP, elems.get(FIREWALL_IPS_MAP))
    no_ep_services = _ElementStorage(NO_ENDPOINT_SERVICES_MAP, elems.get(NO_ENDPOINT_SERVICES_MAP))
    no_ep_nodeports = _ElementStorage(NO_ENDPOINT_NODEPORTS_MAP, elems.get(NO_ENDPOINT_NODEPORTS_MAP))
    service_nodeports = _ElementStorage(SERVICE_NODEPORTS_MAP, elems.get(SERVICE_NODEPORTS_MAP))

    active_chains: set[str] = set()
    active_affinity: set[str] = set()
    total_endpoints = sum(len(endpoints.get(spn) or ()) for spn in services)
    no_local_internal = 0
    no_local_external = 0
    svc_rules = 0  # rules in service/endpoint chains (nat) after this sync
    fw_rules = 0  # rules in firewall chains (filter)

    def ensure_chain(chain: str, skip: bool) -> None:
        """``ensureChain``: add + flush, once per sync; only recorded when skipped."""
        if chain in active_chains:
            return
        active_chains.add(chain)
        if not skip:
            add(f"add chain {pre} {chain}")
            add(f"flush chain {pre} {chain}")

    def ep_chain_skip_update(ep_chain: str, affinity_set: str, wants_affinity: bool) -> bool:
        """``epChainSkipUpdate``: only on the first sync of a restarted kube-proxy."""
        if synced_once or existing_chains is None or existing_affinity is None:
            return False
        return ep_chain in existing_chains and wants_affinity == (affinity_set in existing_affinity)

    for spn in sorted(services):
        svc = services[spn]
        proto = svc.protocol.lower()
        name = str(spn)
        base = service_port_chain_name_base(spn, proto)
        cluster_chain = SERVICE_PREFIX + base
        local_chain = LOCAL_PREFIX + base
        external_chain = EXTERNAL_PREFIX + base
        fw_chain = FIREWALL_PREFIX + base
        affinity = svc.session_affinity_client_ip

        cluster_eps, local_eps, reachable, has_endpoints = categorize_endpoints(
            endpoints.get(spn), svc, node_name, topo, prefer_same_node=prefer_node
        )
        skip = not full_sync and (spn.namespace, spn.name) not in changed_nn

        ep_names: dict[str, tuple[str, str]] = {}
        for ep in (*reachable, *cluster_eps, *local_eps):
            if ep.endpoint not in ep_names:
                epbase = service_port_endpoint_chain_name_base(spn, proto, ep.endpoint)
                ep_names[ep.endpoint] = (ENDPOINT_PREFIX + epbase, AFFINITY_PREFIX + epbase)

        for ep in reachable:
            ep_chain, aff_set = ep_names[ep.endpoint]
            ensure_chain(ep_chain, skip or ep_chain_skip_update(ep_chain, aff_set, affinity))
            if affinity:
                active_affinity.add(aff_set)

        uses_cluster_chain = bool(cluster_eps) and svc.uses_cluster_endpoints()
        if uses_cluster_chain:
            ensure_chain(cluster_chain, skip)
        uses_local_chain = bool(local_eps) and svc.uses_local_endpoints()
        if uses_local_chain:
            ensure_chain(local_chain, skip)

        internal_chain = cluster_chain
        has_internal = has_endpoints
        if svc.internal_policy_local:
            internal_chain = local_chain
            if not local_eps:
                has_internal = False
        external_policy_chain = cluster_chain
        has_external = has_endpoints
        if svc.external_policy_local:
            external_policy_chain = local_chain
            if not local_eps:
                has_external = False
        uses_ext = has_endpoints and svc.externally_accessible()
        if uses_ext:
            ensure_chain(external_chain, skip)

        int_verdict = ext_verdict = ""
        if not has_endpoints:
            int_verdict = ext_verdict = f"goto {REJECT_CHAIN}"
        else:
            if not has_internal:
                int_verdict = "drop"
                no_local_internal += 1
            if not has_external:
                ext_verdict = "drop"
                no_local_external += 1

        port = str(svc.port)
        cip = svc.cluster_ip

        # Capture the clusterIP.
        cluster_ips.ensure(tx, cip)
        if has_internal:
            service_ips.ensure(tx, f"{cip} . {proto} . {port}", f"goto {internal_chain}")
        else:
            no_ep_services.ensure(tx, f"{cip} . {proto} . {port}", int_verdict, name)

        # Capture externalIPs.
        for eip in svc.external_ips:
            if has_endpoints:
                service_ips.ensure(tx, f"{eip} . {proto} . {port}", f"goto {external_chain}")
            if not has_external:
                no_ep_services.ensure(tx, f"{eip} . {proto} . {port}", ext_verdict, name)

        uses_fw = bool(svc.load_balancer_vips) and bool(svc.load_balancer_source_ranges)
        if uses_fw:
            ensure_chain(fw_chain, skip)

        # Capture load-balancer ingress.
        for lbip in svc.load_balancer_vips:
            if has_endpoints:
                service_ips.ensure(tx, f"{lbip} . {proto} . {port}", f"goto {external_chain}")
            if uses_fw:
                firewall_ips.ensure(tx, f"{lbip} . {proto} . {port}", f"goto {fw_chain}")
        if not has_external:
            for lbip in svc.load_balancer_vips:
                no_ep_services.ensure(tx, f"{lbip} . {proto} . {port}", ext_verdict, name)

        # Capture nodeports.
        if svc.node_port:
            if has_endpoints:
                service_nodeports.ensure(tx, f"{proto} . {svc.node_port}", f"goto {external_chain}")
            if not has_external:
                no_ep_nodeports.ensure(tx, f"{proto} . {svc.node_port}", ext_verdict, name)

        # Everything below is the Service's chains: left as they are on a partial sync
        # when the Service did not change (only counted).
        if skip:
            svc_rules += _service_chain_rules(
                svc, config, local_cidr is not None, has_internal, uses_ext, has_external,
                uses_cluster_chain, len(cluster_eps), uses_local_chain, len(local_eps), len(reachable),
            )
            fw_rules += 1 if uses_fw else 0
            continue

        # Internal traffic.
        if has_internal:
            if config.masquerade_all:
                tx.rule(internal_chain, f"{ip_x} daddr {cip} jump {MARK_MASQ_CHAIN}")
                svc_rules += 1
            elif local_cidr is not None:
                tx.rule(internal_chain, f"{ip_x} daddr {cip} {ip_x} saddr != {local_cidr} jump {MARK_MASQ_CHAIN}")
                svc_rules += 1

        # External traffic.
        if uses_ext:
            if not svc.external_policy_local:
                tx.rule(external_chain, f"jump {MARK_MASQ_CHAIN}")
                svc_rules += 1
            else:
                if local_cidr is not None:
                    tx.rule(external_chain, f"{ip_x} saddr {local_cidr} goto {cluster_chain}", "short-circuit pod traffic")
                    svc_rules += 1
                tx.rule(external_chain, f"fib saddr type local jump {MARK_MASQ_CHAIN}", "masquerade local traffic")
                tx.rule(external_chain, f"fib saddr type local goto {cluster_chain}", "short-circuit local traffic")
                svc_rules += 2
            if has_external:
                tx.rule(external_chain, f"goto {external_policy_chain}")
                svc_rules += 1

        # Firewall (loadBalancerSourceRanges).
        if uses_fw:
            sources: list[str] = []
            allow_from_node = False
            for cidr in svc.load_balancer_source_ranges:
                if sources:
                    sources.append(",")
                sources.append(cidr)
                if node_ip is not None and _cidr_contains(cidr, node_ip):
                    allow_from_node = True
            if allow_from_node:
                for lbip in svc.load_balancer_vips:
                    sources += [",", lbip]
            tx.rule(fw_chain, f"{ip_x} saddr != {{ {' '.join(sources)} }} drop")
            fw_rules += 1

        # Per-endpoint affinity sets.
        if affinity:
            timeout = svc.session_affinity_timeout
            for ep in reachable:
                add(f"add set {pre} {ep_names[ep.endpoint][1]} {{ type {addr_type} ; flags dynamic,timeout ; timeout {timeout}s ; }}")

        if uses_cluster_chain:
            svc_rules += _service_to_endpoint_rules(tx, ip_x, affinity, cluster_chain, cluster_eps, ep_names)
        if uses_local_chain:
            svc_rules += _service_to_endpoint_rules(tx, ip_x, affinity, local_chain, local_eps, ep_names)

        # Per-endpoint chains.
        for ep in reachable:
            ep_chain, aff_set = ep_names[ep.endpoint]
            svc_rules += 3 if affinity else 2
            if ep_chain_skip_update(ep_chain, aff_set, affinity):
                continue
            tx.rule(ep_chain, f"{ip_x} saddr {ep.ip} jump {MARK_MASQ_CHAIN}")
            if affinity:
                tx.rule(ep_chain, f"update @{aff_set} {{ {ip_x} saddr }}")
            tx.rule(ep_chain, f"meta l4proto {proto} dnat to {ep.endpoint}")

    # Stale service/endpoint chains: flushed now, deleted by a later sync.
    flushed_chains: list[str] = []
    if existing_chains is not None:
        for chain in sorted(existing_chains):
            if is_service_chain_name(chain):
                if chain not in active_chains:
                    tx.flush_chain(chain)
                    stale[chain] = now
                    flushed_chains.append(chain)
                else:
                    stale.pop(chain, None)

    # Unused affinity sets go at once.
    if existing_affinity is not None:
        for set_name in sorted(existing_affinity - active_affinity):
            add(f"delete set {pre} {set_name}")

    n_elements = 0
    storages = (cluster_ips, service_ips, firewall_ips, no_ep_services, no_ep_nodeports, service_nodeports)
    for storage in storages:
        storage.cleanup(tx)
        n_elements += len(storage.elements)

    text = "\n".join(tx.lines) + "\n" if tx.lines else ""
    return NFTablesRender(
        text=text,
        stale_text=stale_text,
        operations=len(tx.lines),
        full_sync=full_sync,
        stale_chains=stale,
        deleted_chains=deleted,
        flushed_chains=tuple(flushed_chains),
        active_chains=frozenset(active_chains),
        active_affinity_sets=frozenset(active_affinity),
        nat_rules=fixed_rules_nat + svc_rules,
        filter_rules=fixed_rules_filter + fw_rules,
        elements=n_elements + nodeport_ip_elements,
        element_storage={st.name: st.elements for st in storages},
        changed_services=len({(s.namespace, s.name) for s in services}) if full_sync else len(changed_nn),
        total_endpoints=total_endpoints,
        no_local_endpoints_internal=no_local_internal,
        no_local_endpoints_external=no_local_external,
    )


def _service_to_endpoint_rules(
    tx: _Tx, ip_x: str, affinity: bool, chain: str, eps: Sequence[Endpoint], names: Mapping[str, tuple[str, str]]
) -> int:
    """``writeServiceToEndpointRules``: affinity lookups, then ``numgen random mod N vmap``
    over the endpoints in order. Returns the number of rules written."""
    n = 0
    if affinity:
        for ep in eps:
            ep_chain, aff_set = names[ep.endpoint]
            tx.rule(chain, f"{ip_x} saddr @{aff_set} goto {ep_chain}")
            n += 1
    parts = [f"{i} : goto {names[ep.endpoint][0]}" for i, ep in enumerate(eps)]
    tx.rule(chain, f"numgen random mod {len(eps)} vmap {{ {' , '.join(parts)} }}")
    return n + 1


def _service_chain_rules(
    svc: ServicePort,
    config: NFTablesConfig,
    has_detector: bool,
    has_internal: bool,
    uses_ext: bool,
    has_external: bool,
    uses_cluster_chain: bool,
    n_cluster: int,
    uses_local_chain: bool,
    n_local: int,
    n_reachable: int,
) -> int:
    """How many rules the Service's service/local/external/endpoint chains hold (what a
    sync that rewrote them would write), for a Service a partial sync leaves alone."""
    n = 0
    if has_internal and (config.masquerade_all or has_detector):
        n += 1
    if uses_ext:
        if not svc.external_policy_local:
            n += 1
        else:
            n += 3 if has_detector else 2
        if has_external:
            n += 1
    aff = svc.session_affinity_client_ip
    if uses_cluster_chain:
        n += 1 + (n_cluster if aff else 0)
    if uses_local_chain:
        n += 1 + (n_local if aff else 0)
    n += n_reachable * (3 if aff else 2)
    return n


@lru_cache(maxsize=4096)
def _parse_net(cidr: str):  # noqa: ANN202
    return ipaddress.ip_network(cidr, strict=False)


def _cidr_contains(cidr: str, ip) -> bool:  # noqa: ANN001
    try:
        net = _parse_net(cidr)
    except ValueError:
        return False
    return ip.version == net.version and ip in net
