"""Service and EndpointSlice manifests -> kube-proxy's service map and endpoints map.

Mirrors what kube-proxy's change trackers build (``pkg/proxy/servicechangetracker.go``,
``serviceport.go`` ``newBaseServiceInfo``, ``endpointschangetracker.go`` and
``endpointslicecache.go``), for one IP family, from the plain ``dict``\\ s that
``yaml.safe_load`` returns for manifests as ``kubectl get -o yaml`` writes them.

What is kept, as kube-proxy does it:

* Services with ``clusterIP: None`` / empty clusterIP (headless) and ``type:
  ExternalName`` are skipped (``ShouldSkipService``); so is a Service with no ClusterIP
  of the family (``GetClusterIPByFamily``).
* One :class:`~testbed.proxy.types.ServicePort` per ``spec.ports[]``, keyed by
  ``ServicePortName(namespace, name, port.name, port.protocol)``.
* externalIPs, ``status.loadBalancer.ingress[].ip`` (only ``ipMode`` unset or ``VIP``)
  and ``loadBalancerSourceRanges`` filtered to the family; source ranges are
  whitespace-trimmed (the API lets ``" 203.0.113.0/25"`` through) and printed as their
  network; addresses are parsed "sloppily" like ``netutils.ParseIPSloppy`` (IPv4 parts
  with leading zeros are decimal: ``172.30.0.041`` is ``172.30.0.41``).
* ``externalTrafficPolicy: Local`` counts only for externally accessible Services
  (LoadBalancer, NodePort, or ClusterIP with externalIPs); ``healthCheckNodePort`` only
  for ``type: LoadBalancer`` with eTP=Local.
* EndpointSlices are matched to their Service by the ``kubernetes.io/service-name``
  label and the slice namespace; slices of the other address type are ignored; each
  slice port (by name and protocol) becomes one endpoints-map key. A port with no
  ``name`` key (nil, not ``""``) or a nil/zero port number is ignored, as kube-proxy does.
  Endpoint conditions: nil ``ready`` and nil ``serving`` count as true, nil
  ``terminating`` as false. The same ``ip:port`` in several places is kept once,
  preferring a non-terminating copy. Each list is sorted by ``ip:port`` string.

Deviations (deterministic where kube-proxy is random): slices are merged in slice-name
order where kube-proxy uses Go map order; a Service with an unparseable clusterIP is
skipped (kube-proxy would write ``<nil>``; the API server never allows one).
"""

from __future__ import annotations

import ipaddress
import re
from socket import AF_INET as _AF_INET, inet_pton as _inet_pton
from functools import lru_cache
from typing import Any, Iterable, Iterator, Mapping

from .types import (
    Endpoint,
    EndpointsMap,
    NamespacedName,
    ServicePort,
    ServicePortMap,
    ServicePortName,
)

__all__ = [
    "LABEL_SERVICE_NAME",
    "DEFAULT_CLIENT_IP_TIMEOUT",
    "parse_ip_sloppy",
    "parse_cidr_sloppy",
    "ip_family_of",
    "iter_objects",
    "service_to_service_map",
    "build_service_map",
    "build_endpoints_map",
    "build_maps",
    "changed_services",
    "health_check_node_ports",
]

#: ``discovery.LabelServiceName``
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
#: ``v1.DefaultClientIPServiceAffinitySeconds``: what the API server fills in for
#: ``sessionAffinity: ClientIP`` without ``sessionAffinityConfig``.
DEFAULT_CLIENT_IP_TIMEOUT = 10800

_V4_SLOPPY = re.compile(r"^([0-9]+)\.([0-9]+)\.([0-9]+)\.([0-9]+)\Z")  # \Z: "$" would take a trailing newline


def parse_ip_sloppy(text: Any) -> str | None:
    """``netutils.ParseIPSloppy(s).String()``, or ``None`` if ``s`` is not an IP.

    IPv4 parts may carry leading zeros (read as decimal, like Go before 1.17); an
    IPv4-mapped IPv6 address prints as IPv4, as Go's ``net.IP.String()`` does.
    """
    if not isinstance(text, str) or not text or "%" in text:
        return None
    try:  # the usual case: IPv4 already canonical (inet_pton takes no leading zeros), itself
        _inet_pton(_AF_INET, text)
        return text
    except (OSError, ValueError):
        return _parse_ip_sloppy(text)


@lru_cache(maxsize=1 << 17)
def _parse_ip_sloppy(text: str) -> str | None:  # the same endpoint IPs recur across Services and syncs
    m = _V4_SLOPPY.match(text)
    if m:
        parts = [int(p) for p in m.groups()]
        if any(p > 255 for p in parts):
            return None
        return "%d.%d.%d.%d" % tuple(parts)
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def parse_cidr_sloppy(text: Any) -> str | None:
    """``netutils.ParseCIDRSloppy(s)`` -> the network's ``String()`` (host bits cleared),
    or ``None`` if ``s`` is not a CIDR. The prefix length may have leading zeros."""
    if not isinstance(text, str) or "/" not in text:
        return None
    addr, _, prefix = text.partition("/")
    ip = parse_ip_sloppy(addr)
    if ip is None or not prefix.isascii() or not prefix.isdigit():
        return None
    bits = int(prefix)
    if bits > (128 if ":" in ip else 32):
        return None
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


def ip_family_of(ip: str) -> str:
    """``IPv4`` or ``IPv6`` for a canonical address or CIDR string."""
    return "IPv6" if ":" in ip else "IPv4"


def _is_ipv6_string(text: str) -> bool:
    """``netutils.IsIPv6String``."""
    ip = parse_ip_sloppy(text)
    return ip is not None and ":" in ip


def iter_objects(objects: Iterable[Mapping[str, Any] | None]) -> Iterator[Mapping[str, Any]]:
    """Every object, with ``kind: List`` (``kubectl get -o yaml`` of many) flattened."""
    for obj in objects:
        if not obj:
            continue
        kind = obj.get("kind") or ""
        if kind.endswith("List") and isinstance(obj.get("items"), list):
            yield from iter_objects(obj.get("items") or [])
        else:
            yield obj


# --- Services ------------------------------------------------------------------------


def _cluster_ip_by_family(spec: Mapping[str, Any], ip_family: str) -> str:
    """``proxyutil.GetClusterIPByFamily``."""
    families = spec.get("ipFamilies") or []
    if not families:
        cip = spec.get("clusterIP") or ""
        if not cip or cip == "None":
            return ""
        if (ip_family == "IPv6") == _is_ipv6_string(cip):
            return cip
        return ""
    cips = spec.get("clusterIPs") or []
    for idx, fam in enumerate(families):
        if fam == ip_family and idx < len(cips):
            return cips[idx]
    return ""


def _should_skip_service(spec: Mapping[str, Any]) -> bool:
    """``proxyutil.ShouldSkipService``: headless (None/empty clusterIP) or ExternalName."""
    cip = spec.get("clusterIP") or ""
    if cip in ("", "None"):
        return True
    return spec.get("type") == "ExternalName"


def _externally_accessible(spec: Mapping[str, Any]) -> bool:
    """``apiservice.ExternallyAccessible``."""
    typ = spec.get("type") or "ClusterIP"
    return typ in ("LoadBalancer", "NodePort") or (typ == "ClusterIP" and bool(spec.get("externalIPs")))


def _external_policy_local(spec: Mapping[str, Any]) -> bool:
    """``apiservice.ExternalPolicyLocal``."""
    return _externally_accessible(spec) and spec.get("externalTrafficPolicy") == "Local"


def _needs_health_check(spec: Mapping[str, Any]) -> bool:
    """``apiservice.NeedsHealthCheck``."""
    return (spec.get("type") or "ClusterIP") == "LoadBalancer" and _external_policy_local(spec)


def service_to_service_map(service: Mapping[str, Any], ip_family: str = "IPv4") -> ServicePortMap:
    """``ServiceChangeTracker.serviceToServiceMap`` + ``newBaseServiceInfo`` for one
    ``v1 Service`` dict. Returns ``{}`` for skipped Services."""
    meta = service.get("metadata") or {}
    spec = service.get("spec") or {}
    status = service.get("status") or {}
    if _should_skip_service(spec):
        return {}
    cluster_ip = parse_ip_sloppy(_cluster_ip_by_family(spec, ip_family))
    if cluster_ip is None:
        return {}

    namespace = meta.get("namespace") or "default"
    name = meta.get("name") or ""

    ext_local = _external_policy_local(spec)
    int_local = spec.get("internalTrafficPolicy") == "Local"

    affinity_timeout: int | None = None
    if spec.get("sessionAffinity") == "ClientIP":
        cfg = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {})
        timeout = cfg.get("timeoutSeconds")
        affinity_timeout = int(timeout) if timeout is not None else DEFAULT_CLIENT_IP_TIMEOUT

    external_ips = []
    for raw in spec.get("externalIPs") or []:
        ip = parse_ip_sloppy(raw)
        if ip is not None and ip_family_of(ip) == ip_family:
            external_ips.append(ip)

    source_ranges = []
    for raw in spec.get("loadBalancerSourceRanges") or []:
        cidr = parse_cidr_sloppy(raw.strip() if isinstance(raw, str) else raw)
        if cidr is not None and ip_family_of(cidr) == ip_family:
            source_ranges.append(cidr)

    lb_vips = []
    for ing in ((status.get("loadBalancer") or {}).get("ingress") or []):
        raw = ing.get("ip") or ""
        if not raw:
            continue
        mode = ing.get("ipMode")
        if mode is not None and mode != "VIP":  # proxyutil.IsVIPMode
            continue
        ip = parse_ip_sloppy(raw)
        if ip is not None and ip_family_of(ip) == ip_family:
            lb_vips.append(ip)

    hcnp = 0
    if _needs_health_check(spec):
        hcnp = int(spec.get("healthCheckNodePort") or 0)

    result: ServicePortMap = {}
    external_ips_t, lb_vips_t, source_ranges_t = tuple(external_ips), tuple(lb_vips), tuple(source_ranges)
    for port in spec.get("ports") or ():
        protocol = port.get("protocol") or "TCP"
        spn = ServicePortName(namespace, name, port.get("name") or "", protocol)
        # positional, in ServicePort's field order: cluster_ip, port, protocol, node_port,
        # session_affinity_timeout, external_ips, load_balancer_vips,
        # load_balancer_source_ranges, health_check_node_port, external_policy_local,
        # internal_policy_local, target_port
        result[spn] = ServicePort(
            cluster_ip, int(port.get("port") or 0), protocol, int(port.get("nodePort") or 0), affinity_timeout,
            external_ips_t, lb_vips_t, source_ranges_t, hcnp, ext_local, int_local, port.get("targetPort"),
        )
    return result


def build_service_map(objects: Iterable[Mapping[str, Any] | None], ip_family: str = "IPv4") -> ServicePortMap:
    """The ``proxy.ServicePortMap`` for every ``kind: Service`` in ``objects`` (other
    kinds are ignored; ``kind: List`` is flattened)."""
    result: ServicePortMap = {}
    for obj in iter_objects(objects):
        if obj.get("kind") == "Service":
            result.update(service_to_service_map(obj, ip_family))
    return result


# --- EndpointSlices ------------------------------------------------------------------


def _hint_names(hints: Any, key: str) -> frozenset[str] | None:
    if not hints:
        return None
    items = hints.get(key) or []
    names = frozenset(h.get("name") for h in items if h and h.get("name") is not None)
    return names or None


def build_endpoints_map(
    objects: Iterable[Mapping[str, Any] | None],
    ip_family: str = "IPv4",
    *,
    prefer_same_traffic_distribution: bool = True,
) -> EndpointsMap:
    """The ``proxy.EndpointsMap`` for every ``kind: EndpointSlice`` in ``objects``.

    ``prefer_same_traffic_distribution`` is the ``PreferSameTrafficDistribution``
    feature gate: without it ``hints.forNodes`` is dropped, as kube-proxy does.
    """
    return _endpoints_map(
        [o for o in iter_objects(objects) if o.get("kind") == "EndpointSlice"], ip_family, prefer_same_traffic_distribution
    )


def _endpoint_bases(obj: Mapping[str, Any], prefer_same_traffic_distribution: bool) -> list[tuple]:
    """Each endpoint of a slice without its port: (ip, ready, serving, terminating,
    nodeName, zone, zone hints, node hints); endpoints without a parseable first
    address are left out."""
    parse = parse_ip_sloppy
    base = []
    for ep in obj.get("endpoints") or ():
        addresses = ep.get("addresses")
        if not addresses:
            continue
        ip = parse(addresses[0])
        if ip is None:
            continue
        cond = ep.get("conditions")
        if cond:
            ready = cond.get("ready")
            serving = cond.get("serving")
            terminating = cond.get("terminating")
            # nil ready/serving count as true, nil terminating as false
            ready = ready is None or bool(ready)
            serving = serving is None or bool(serving)
            terminating = terminating is not None and bool(terminating)
        else:
            ready, serving, terminating = True, True, False
        hints = ep.get("hints")
        if hints:
            zone_hints = _hint_names(hints, "forZones")
            node_hints = _hint_names(hints, "forNodes") if prefer_same_traffic_distribution else None
        else:
            zone_hints = node_hints = None
        base.append((ip, ready, serving, terminating, ep.get("nodeName"), ep.get("zone"), zone_hints, node_hints))
    return base


def _endpoints_map(objects: list[Mapping[str, Any]], ip_family: str, prefer_same_traffic_distribution: bool) -> EndpointsMap:
    address_type = ip_family  # discovery.AddressTypeIPv4 == "IPv4"
    slices: dict[tuple[str, str], Mapping[str, Any]] = {}
    for obj in objects:
        meta = obj.get("metadata") or {}
        svc_name = (meta.get("labels") or {}).get(LABEL_SERVICE_NAME)
        if not svc_name or not meta.get("namespace") or not meta.get("name"):
            continue  # endpointSliceCacheKeys error
        if obj.get("addressType") != address_type:
            continue
        slices[(meta["namespace"], meta["name"])] = obj

    # Endpoints are immutable values: equal ones (the same pod behind many Services, or
    # many ports of one slice) share one object, built once per call.
    interned: dict[tuple, Endpoint] = {}
    by_port: dict[ServicePortName, dict[str, Endpoint]] = {}
    for key in sorted(slices):
        obj = slices[key]
        ports = obj.get("ports")
        if not ports:
            continue
        namespace = key[0]
        svc_name = obj["metadata"]["labels"][LABEL_SERVICE_NAME]
        base = None  # the port-independent part of each endpoint: read once, at the first usable port
        for port in ports:
            port_name = port.get("name")
            if port_name is None:
                continue  # "Ignoring port with nil name"
            number = port.get("port")
            if not number:
                continue  # "Ignoring invalid endpoint port"
            spn = ServicePortName(namespace, svc_name, port_name, port.get("protocol") or "TCP")
            ep_set = by_port.get(spn)
            if ep_set is None:
                ep_set = by_port[spn] = {}
            if base is None:
                base = _endpoint_bases(obj, prefer_same_traffic_distribution)
            if base:
                number = int(number)
            for ip, ready, serving, terminating, node_name, zone, zone_hints, node_hints in base:
                ikey = (ip, number, ready, serving, terminating, node_name, zone, zone_hints, node_hints)
                try:
                    endpoint = interned.get(ikey)
                    if endpoint is None:
                        endpoint = interned[ikey] = Endpoint(*ikey)
                except TypeError:  # an unhashable nodeName/zone in a hand-written file
                    endpoint = Endpoint(*ikey)
                k = endpoint.endpoint
                if not terminating or k not in ep_set:  # the same ip:port: a non-terminating copy wins
                    ep_set[k] = endpoint

    return {spn: [eps[k] for k in sorted(eps)] for spn, eps in by_port.items() if eps}


def build_maps(
    objects: Iterable[Mapping[str, Any] | None], ip_family: str = "IPv4"
) -> tuple[ServicePortMap, EndpointsMap]:
    """``(service map, endpoints map)`` from one list of manifests of any kinds."""
    services: ServicePortMap = {}
    slices: list[Mapping[str, Any]] = []
    for obj in iter_objects(objects):
        kind = obj.get("kind")
        if kind == "Service":
            services.update(service_to_service_map(obj, ip_family))
        elif kind == "EndpointSlice":
            slices.append(obj)
    return services, _endpoints_map(slices, ip_family, True)


# --- changes between two syncs -------------------------------------------------------


def _group(mapping: Mapping[ServicePortName, Any]) -> dict[NamespacedName, dict[ServicePortName, Any]]:
    out: dict[NamespacedName, dict[ServicePortName, Any]] = {}
    for spn, value in mapping.items():
        out.setdefault(NamespacedName(spn.namespace, spn.name), {})[spn] = value
    return out


def changed_services(
    old_services: Mapping[ServicePortName, ServicePort],
    new_services: Mapping[ServicePortName, ServicePort],
    old_endpoints: Mapping[ServicePortName, list[Endpoint]],
    new_endpoints: Mapping[ServicePortName, list[Endpoint]],
) -> set[NamespacedName]:
    """The Services whose chains a partial sync must rewrite: the union of
    ``UpdateServiceMapResult.UpdatedServices`` (the Service's port map changed, or it
    was added or deleted) and ``UpdateEndpointsMapResult.UpdatedServices`` (its
    endpoints changed). kube-proxy also counts a slice update that leaves the computed
    endpoints identical; that only rewrites identical chains, so it is not modelled."""
    changed: set[NamespacedName] = set()
    for old, new in ((_group(old_services), _group(new_services)), (_group(old_endpoints), _group(new_endpoints))):
        for nn in old.keys() | new.keys():
            if old.get(nn) != new.get(nn):
                changed.add(nn)
    return changed


def health_check_node_ports(services: Mapping[ServicePortName, ServicePort]) -> dict[NamespacedName, int]:
    """``ServicePortMap.HealthCheckNodePorts``."""
    out: dict[NamespacedName, int] = {}
    for spn, svc in services.items():
        if svc.health_check_node_port:
            out[spn.namespaced_name] = svc.health_check_node_port
    return out
