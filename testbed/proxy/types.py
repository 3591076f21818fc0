"""kube-proxy's shared, mode-neutral vocabulary.

Mirrors ``k8s.io/kubernetes/pkg/proxy`` (files ``types.go``, ``serviceport.go``,
``endpoint.go`` and ``topology.go``, read at the versions listed in
``/work/shared/kube-proxy-reference.md`` §0 and at current ``master``). The iptables,
ipvs and nftables renderers all consume these types, exactly as kube-proxy's three
proxiers consume ``proxy.ServicePortMap`` / ``proxy.EndpointsMap``:

* ``dict[ServicePortName, ServicePort]``  is ``proxy.ServicePortMap``;
* ``dict[ServicePortName, list[Endpoint]]`` is ``proxy.EndpointsMap`` (each list sorted by
  the endpoint string, as ``endpointsMapFromEndpointInfo`` leaves it).

Unlike kube-proxy, an :class:`Endpoint` does not freeze "is local" at creation time: it
keeps its ``nodeName`` and :meth:`Endpoint.is_local` is asked with the node name of the
proxier being rendered. That lets one endpoints map serve every emulated node; the
result is the same as kube-proxy's ``EndpointSliceCache.isLocal``.
"""

from __future__ import annotations

import ipaddress

from dataclasses import dataclass, field
from typing import Iterable, Mapping, NamedTuple, Sequence

__all__ = [
    "NamespacedName",
    "ServicePortName",
    "ServicePort",
    "Endpoint",
    "ServicePortMap",
    "EndpointsMap",
    "categorize_endpoints",
    "join_host_port",
    "LABEL_TOPOLOGY_ZONE",
]

#: ``v1.LabelTopologyZone``: the node label that carries the node's zone.
LABEL_TOPOLOGY_ZONE = "topology.kubernetes.io/zone"


class NamespacedName(NamedTuple):
    """``types.NamespacedName``. ``str()`` is ``namespace/name``."""

    namespace: str
    name: str

    def __str__(self) -> str:  # pragma: no cover - trivial
        return f"{self.namespace}/{self.name}"


class ServicePortName(NamedTuple):
    """``proxy.ServicePortName``: one port of one Service.

    ``str()`` mirrors ``ServicePortName.String()``: ``ns/name:port`` or, when the port
    has no name, ``ns/name``. The protocol is *not* part of the string (it is part of
    the identity, so TCP and UDP ports with the same name are different keys).
    """

    namespace: str
    name: str
    port_name: str = ""
    protocol: str = "TCP"

    def __str__(self) -> str:
        if self.port_name:
            return f"{self.namespace}/{self.name}:{self.port_name}"
        return f"{self.namespace}/{self.name}"

    @property
    def namespaced_name(self) -> NamespacedName:
        return NamespacedName(self.namespace, self.name)


def join_host_port(ip: str, port: int) -> str:
    """Go ``net.JoinHostPort(ip, strconv.Itoa(port))``: IPv6 hosts get brackets."""
    if ":" in ip:
        return f"[{ip}]:{port}"
    return f"{ip}:{port}"


@dataclass(slots=True, unsafe_hash=True)
class ServicePort:
    """``proxy.BaseServicePortInfo`` (``serviceport.go``): what a proxier knows of one
    Service port, already filtered to one IP family. A value: never changed once built
    (not ``frozen``, because a frozen dataclass's ``__init__`` costs ~5x as much and a
    sync builds one per Service port; hashed and compared by value all the same).

    Built from a ``v1.Service`` by :func:`testbed.proxy.servicemap.service_to_service_map`
    (``newBaseServiceInfo``). Addresses are canonical strings (Go ``net.IP.String()``),
    source ranges are canonical network CIDRs (``*net.IPNet.String()``).

    ``session_affinity_timeout`` is ``StickyMaxAgeSeconds``: the ClientIP affinity
    timeout in seconds when ``sessionAffinity: ClientIP``, else ``None`` (kube-proxy
    keeps the type and the timeout apart; here "ClientIP" is exactly "timeout is not
    None").
    """

    cluster_ip: str
    port: int
    protocol: str = "TCP"
    node_port: int = 0
    session_affinity_timeout: int | None = None
    external_ips: tuple[str, ...] = ()
    load_balancer_vips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    health_check_node_port: int = 0
    external_policy_local: bool = False
    internal_policy_local: bool = False
    # Not used by the iptables proxier; kept for the other renderers and for humans.
    target_port: int | str | None = None

    # --- the ServicePort interface (serviceport.go) ---------------------------------

    @property
    def session_affinity_client_ip(self) -> bool:
        """``SessionAffinityType() == v1.ServiceAffinityClientIP``."""
        return self.session_affinity_timeout is not None

    def externally_accessible(self) -> bool:
        """``ExternallyAccessible()``: reachable other than by ClusterIP."""
        return self.node_port != 0 or bool(self.load_balancer_vips) or bool(self.external_ips)

    def uses_cluster_endpoints(self) -> bool:
        """``UsesClusterEndpoints()``: iTP=Cluster, or any external access (eTP=Local still
        needs Cluster endpoints for the short-circuit rules)."""
        return not self.internal_policy_local or self.externally_accessible()

    def uses_local_endpoints(self) -> bool:
        """``UsesLocalEndpoints()``."""
        return self.internal_policy_local or (self.external_policy_local and self.externally_accessible())

    def __str__(self) -> str:
        """``BaseServicePortInfo.String()``: ``IP:Port/Protocol`` (Go ``%s:%d/%s``)."""
        return f"{self.cluster_ip}:{self.port}/{self.protocol}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """``proxy.BaseEndpointInfo`` (``endpoint.go``): one address:port of a Service port.

    * ``ready``: ready and not terminating (``conditions.ready``; nil counts as ready).
    * ``serving``: ready regardless of terminating (nil counts as serving).
    * ``terminating``: nil counts as not terminating.
    * ``zone_hints`` / ``node_hints``: ``hints.forZones[].name`` / ``hints.forNodes[].name``
      (``None`` when the slice gave none).

    ``str()`` is ``net.JoinHostPort(ip, port)``; it is what kube-proxy sorts by and hashes.
    """

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    zone_hints: frozenset[str] | None = None
    node_hints: frozenset[str] | None = None
    endpoint: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoint", join_host_port(self.ip, self.port))

    def __str__(self) -> str:
        return self.endpoint

    def is_local(self, node_name: str) -> bool:
        """``IsLocal()`` for a proxier running on ``node_name``
        (``EndpointSliceCache.isLocal``: the node name must be non-empty and equal)."""
        return bool(node_name) and self.node_name == node_name

    def is_serving_terminating(self) -> bool:
        return self.serving and self.terminating


ServicePortMap = dict[ServicePortName, ServicePort]
EndpointsMap = dict[ServicePortName, list[Endpoint]]


# --- topology.go ---------------------------------------------------------------------

TOPOLOGY_PREFER_SAME_NODE = "PreferSameNode"  # v1.ServiceTrafficDistributionPreferSameNode
TOPOLOGY_PREFER_SAME_ZONE = "PreferSameZone"  # v1.ServiceTrafficDistributionPreferSameZone


def _topology_mode_from_hints(
    endpoints: Sequence[Endpoint], node_name: str, zone: str, prefer_same_node: bool
) -> str:
    """``topologyModeFromHints``: "", "PreferSameZone" or "PreferSameNode"."""
    has_ready = False
    has_for_node = False
    all_node_hints = True
    has_for_zone = False
    all_zone_hints = True
    for ep in endpoints:
        if not ep.ready:
            continue
        has_ready = True
        if not ep.node_hints:
            all_node_hints = False
        elif node_name in ep.node_hints:
            has_for_node = True
        if not ep.zone_hints:
            all_zone_hints = False
        elif zone in ep.zone_hints:
            has_for_zone = True
    if not has_ready:
        return ""
    if prefer_same_node and all_node_hints and has_for_node:
        return TOPOLOGY_PREFER_SAME_NODE
    if all_zone_hints and has_for_zone:
        return TOPOLOGY_PREFER_SAME_ZONE
    return ""


def _available_for_topology(ep: Endpoint, mode: str, node_name: str, zone: str) -> bool:
    """``availableForTopology``."""
    if mode == "":
        return True
    if mode == TOPOLOGY_PREFER_SAME_NODE:
        return bool(ep.node_hints) and node_name in ep.node_hints
    if mode == TOPOLOGY_PREFER_SAME_ZONE:
        return bool(ep.zone_hints) and zone in ep.zone_hints
    return False


def categorize_endpoints(
    endpoints: Sequence[Endpoint] | None,
    svc: ServicePort,
    node_name: str,
    topology_labels: Mapping[str, str] | None = None,
    *,
    prefer_same_node: bool = True,
) -> tuple[list[Endpoint], list[Endpoint], list[Endpoint], bool]:
    """``proxy.CategorizeEndpoints`` (``topology.go``, current master).

    Returns ``(cluster_endpoints, local_endpoints, all_reachable_endpoints,
    has_any_endpoints)``:

    * cluster endpoints: the ready endpoints, filtered by topology hints when every ready
      endpoint has a hint and one matches this node (PreferSameNode, needs the
      ``PreferSameTrafficDistribution`` feature gate: ``prefer_same_node``) or this node's
      zone (``topology_labels["topology.kubernetes.io/zone"]``); if no endpoint is ready
      anywhere, the serving-and-terminating ones. Empty when the service never uses
      Cluster policy.
    * local endpoints: the local ready endpoints, else the local serving-and-terminating
      ones. Empty when the service never uses Local policy.
    * all reachable: the union (the SEP chains kube-proxy writes). Where kube-proxy
      builds the union from a Go map (random order) this returns it sorted by endpoint
      string, so renders are deterministic.
    * has any: some endpoint is ready, or serving and terminating, anywhere.

    ``endpoints`` must be sorted by endpoint string (as the endpoints map keeps them).
    """
    if not endpoints:
        return [], [], [], False
    if not svc.internal_policy_local and not svc.external_policy_local:
        # The common Service (Cluster policies): when every endpoint is ready and none
        # carries a hint, the steps below keep them all; skip them.
        for ep in endpoints:
            if not ep.ready or ep.zone_hints or ep.node_hints:
                break
        else:
            cluster = list(endpoints)
            return cluster, [], cluster, True

    zone = (topology_labels or {}).get(LABEL_TOPOLOGY_ZONE, "")
    cluster: list[Endpoint] = []
    local: list[Endpoint] = []
    topology_mode = ""
    use_serving_terminating = False
    has_any = False

    if svc.uses_cluster_endpoints():
        topology_mode = _topology_mode_from_hints(endpoints, node_name, zone, prefer_same_node)
        if topology_mode:
            cluster = [
                ep for ep in endpoints if ep.ready and _available_for_topology(ep, topology_mode, node_name, zone)
            ]
        else:
            cluster = [ep for ep in endpoints if ep.ready]
        if not cluster:
            cluster = [ep for ep in endpoints if ep.serving and ep.terminating]
        if cluster:
            has_any = True

    if not svc.uses_local_endpoints():
        return cluster, local, cluster, has_any

    has_local_ready = False
    has_local_serving_terminating = False
    for ep in endpoints:
        if ep.ready:
            has_any = True
            if ep.is_local(node_name):
                has_local_ready = True
        elif ep.serving and ep.terminating:
            has_any = True
            if ep.is_local(node_name):
                has_local_serving_terminating = True

    if has_local_ready:
        local = [ep for ep in endpoints if ep.ready and ep.is_local(node_name)]
    elif has_local_serving_terminating:
        use_serving_terminating = True
        local = [ep for ep in endpoints if ep.is_local(node_name) and ep.serving and ep.terminating]

    if not svc.uses_cluster_endpoints():
        return cluster, local, local, has_any

    if topology_mode == "" and not use_serving_terminating:
        # cluster is every ready endpoint, so it is a superset of local.
        return cluster, local, cluster, has_any

    merged: dict[str, Endpoint] = {}
    for ep in cluster:
        merged[ep.endpoint] = ep
    for ep in local:
        merged[ep.endpoint] = ep
    all_reachable = [merged[k] for k in sorted(merged)]
    return cluster, local, all_reachable, has_any


class NodePortAddresses:
    """``proxyutil.NodePortAddresses`` (``nodeport_addresses.go``): ``--nodeport-addresses``
    resolved for one IP family; shared by every mode."""

    def __init__(self, ip_family: str, cidrs: Sequence[str]):
        v6 = ip_family == "IPv6"
        nets = []
        for text in cidrs:
            try:
                net = ipaddress.ip_network(text.strip(), strict=False)
            except ValueError:
                continue
            if (net.version == 6) == v6:
                nets.append(net)
        if not nets:
            nets = [ipaddress.ip_network("::/0" if v6 else "0.0.0.0/0")]
        self.cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.match_all = False
        self.contains_ipv4_loopback = False
        loop = ipaddress.ip_address("127.0.0.0")
        for net in nets:
            if net.version == 4 and (net.network_address.is_loopback or loop in net):
                self.contains_ipv4_loopback = True
            if net.prefixlen == 0:
                self.cidrs = [net]
                self.match_all = True
                break
            self.cidrs.append(net)

    def node_ips(self, addresses: Iterable[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        """``GetNodeIPs``: the node addresses inside the CIDRs (kube-proxy dedups through
        a Go map, so its order is random; here: sorted)."""
        found = {}
        for text in addresses:
            try:
                ip = ipaddress.ip_address(text.split("/")[0])
            except ValueError:
                continue
            for net in self.cidrs:
                if ip.version == net.version and ip in net:
                    found[str(ip)] = ip
        return sorted(found.values())


def format_masquerade_mark(bit: int) -> str:
    """``fmt.Sprintf("%#08x", 1<<bit)`` as in ``NewProxier``: ``0x00004000`` for 14
    (Go pads eight digits after the ``0x``)."""
    return "0x%08x" % (1 << bit)


class ProxierFlags:
    """What every mode's config derives the same way from kube-proxy's flags (a mixin
    for the configs' dataclasses, which define ``masquerade_mark``, ``masquerade_bit``,
    ``ip_family`` and ``cluster_cidr``)."""

    masquerade_mark: str | None
    masquerade_bit: int
    ip_family: str
    cluster_cidr: str | None

    @property
    def mark(self) -> str:
        """The masquerade mark: the literal ``masquerade_mark``, else kube-proxy's own
        Go ``%#08x`` of ``1 << masquerade_bit`` (``0x00004000``)."""
        return self.masquerade_mark if self.masquerade_mark else format_masquerade_mark(self.masquerade_bit)

    @property
    def is_ipv6(self) -> bool:
        return self.ip_family == "IPv6"

    def local_cidr(self) -> str | None:
        """The ``--cluster-cidr`` entry of this family (``NewDetectLocalByCIDR``); None: the
        no-op local-traffic detector."""
        if not self.cluster_cidr:
            return None
        for part in self.cluster_cidr.split(","):
            part = part.strip()
            if part and (":" in part) == self.is_ipv6:
                return part
        return None


def changed_service_names(changed) -> set[tuple[str, str]]:  # noqa: ANN001
    """A partial sync's ``UpdatedServices`` as ``(namespace, name)`` pairs, from
    ServicePortNames, NamespacedNames or plain pairs (empty for a full sync's None)."""
    out: set[tuple[str, str]] = set()
    for item in changed or ():
        out.add((item.namespace, item.name) if isinstance(item, ServicePortName) else (item[0], item[1]))
    return out
