"""The EndpointSlice controller: Services + Pods -> ``discovery.k8s.io/v1`` EndpointSlices.

:func:`reconcile` does one sync of every Service, as ``pkg/controller/endpointslice``
with the reconciler of ``staging/src/k8s.io/endpointslice`` does it, and returns the
cluster's EndpointSlices shaped as ``kubectl get endpointslice -o yaml`` prints them.

Mirrored from the controller:

* Only Services with a non-empty ``selector`` get slices, and not ``type:
  ExternalName``; headless Services do. A selector matches Pods of the Service's
  namespace by label equality. Slices not labelled
  ``endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io``
  (user-managed, mirrored...) are passed through untouched.
* Pods without an IP are left out (``ShouldPodBeInEndpoints``); a Pod whose node is
  unknown (when ``nodes`` is given) is left out unless ``publishNotReadyAddresses``.
* Endpoint (``podToEndpoint``): ``addresses: [podIP]``; ``conditions.serving`` = Pod
  ready, ``conditions.ready`` = ready and not terminating, or always true with
  ``publishNotReadyAddresses``; ``terminating: false`` (the model has no terminating
  Pods); ``nodeName``; ``zone`` from the node's ``topology.kubernetes.io/zone`` label;
  ``hostname`` when the Pod has ``hostname`` and its ``subdomain`` is the Service name
  (``ShouldSetHostname``); ``targetRef`` to the Pod.
* Ports (``getEndpointPorts``): one per Service port, in Service order, ``name`` always
  present (``""`` for an unnamed port); a named ``targetPort`` is looked up among the
  Pod's container ports with the same protocol, and a Service port that does not
  resolve for a Pod is left out of that Pod's port list. Pods are grouped by their
  resolved port list; each group gets its own slices.
* At most ``max_endpoints_per_slice`` (100) endpoints per slice;
  ``reconcileByPortMapping`` + ``finalize``: existing slices keep their names and their
  endpoints where still wanted, slices marked for update are filled first (fullest
  first), a small remainder goes into the unchanged slice it fits best
  (``getSliceToFill``), new slices are created for the rest, and creates are turned into
  updates of slices that would otherwise be deleted (so names survive a port change).
* A Service with no endpoints at all gets one placeholder slice (no endpoints, no ports).
* Labels: the Service's labels, plus ``kubernetes.io/service-name``,
  ``endpointslice.kubernetes.io/managed-by`` and, for headless Services,
  ``service.kubernetes.io/headless: ""``. ``ownerReferences``: the Service, as
  controller. ``metadata.generateName``: ``<service>-``; ``name``: that plus 5
  characters from the API server's ``generateName`` alphabet.
* Empty ``endpoints`` / ``ports`` lists print as ``null``, as they come back from the
  API server (``kubectl`` shows ``endpoints: null``); read them with ``or []``.

Simplified (deterministic where the controller is random or time-based):

* name suffixes come from a hash of ``seed``, namespace, Service and a counter instead
  of ``rand``; endpoints are placed in Pod-name order where the controller pops them
  from a map in random order; slices are visited in name order where it uses map order;
* no ``endpoints.kubernetes.io/last-change-trigger-time`` annotation, no
  ``creationTimestamp`` / ``resourceVersion`` / ``generation`` / slice ``uid``;
* slices of a Service that lost its selector are dropped (the controller leaves them
  alone) and slices of a deleted Service are dropped (the garbage collector would);
* no topology hints, no ``trafficDistribution`` hints, no Endpoints (v1) objects.
"""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Any, Iterable, Iterator, Mapping, Sequence

from testbed.apiserver import object_uid
from testbed.model import Node, Pod

__all__ = [
    "LABEL_SERVICE_NAME",
    "LABEL_MANAGED_BY",
    "LABEL_HEADLESS",
    "CONTROLLER_NAME",
    "MAX_ENDPOINTS_PER_SLICE",
    "by_service",
    "ready_endpoints",
    "reconcile",
    "slices_for_service",
]

LABEL_SERVICE_NAME = "kubernetes.io/service-name"
LABEL_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
LABEL_HEADLESS = "service.kubernetes.io/headless"
CONTROLLER_NAME = "endpointslice-controller.k8s.io"
MAX_ENDPOINTS_PER_SLICE = 100
LABEL_ZONE = "topology.kubernetes.io/zone"


def by_service(slices: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    """(namespace, Service name) -> the EndpointSlices labelled with that Service
    (``kubernetes.io/service-name``), in the given order; slices without the label are
    left out. One pass: asking it once for many Services costs O(slices)."""
    out: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for sl in slices:
        meta = sl.get("metadata") or {}
        svc = (meta.get("labels") or {}).get(LABEL_SERVICE_NAME)
        if svc is not None:
            out.setdefault((meta.get("namespace") or "default", svc), []).append(sl)
    return out


def ready_endpoints(slices: Iterable[Mapping[str, Any]]) -> Iterator[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """(slice, endpoint) for every endpoint of ``slices`` whose ``conditions.ready`` is
    not false (nil counts as ready, as for kube-proxy), in slice order."""
    for sl in slices:
        for ep in sl.get("endpoints") or ():
            if (ep.get("conditions") or {}).get("ready", True) is not False:
                yield sl, ep


# k8s.io/apimachinery/pkg/util/rand: the alphabet generateName suffixes are drawn from
# (no vowels, no confusable characters).
_ALPHANUMS = "bcdfghjklmnpqrstvwxz2456789"
_MAX_GENERATED_NAME_LENGTH = 63 - 5


def _service_key(svc: Mapping[str, Any]) -> tuple[str, str]:
    meta = svc.get("metadata") or {}
    return (str(meta.get("namespace") or "default"), str(meta.get("name") or ""))


def _service_uid(svc: Mapping[str, Any]) -> str:
    meta = svc.get("metadata") or {}
    namespace, name = _service_key(svc)
    return str(meta.get("uid") or object_uid("Service", namespace, name))


def _is_headless(spec: Mapping[str, Any]) -> bool:
    """``!isServiceIPSet``: clusterIP ``None`` or empty."""
    return spec.get("clusterIP") in (None, "", "None")


def _address_types(spec: Mapping[str, Any]) -> list[str]:
    """``getAddressTypesForService``."""
    families = spec.get("ipFamilies") or []
    types = []
    for fam in families:
        if fam == "IPv4" and "IPv4" not in types:
            types.append("IPv4")
        if fam == "IPv6" and "IPv6" not in types:
            types.append("IPv6")
    if types:
        return types
    cluster_ip = spec.get("clusterIP") or ""
    if cluster_ip and cluster_ip != "None":
        return ["IPv6" if ":" in cluster_ip else "IPv4"]
    if cluster_ip == "None":
        return ["IPv4", "IPv6"]
    return ["IPv4"]  # a manifest that never went through the API server


def _find_port(pod: Pod, port: Mapping[str, Any]) -> int | None:
    """``findPort``: a number as is, a name among the Pod's ports of the same protocol."""
    target = port.get("targetPort")
    protocol = port.get("protocol") or "TCP"
    if target is None or target == 0 or target == "":
        target = port.get("port")
    if isinstance(target, str):
        for cp in pod.ports:
            if cp.name == target and cp.protocol == protocol:
                return cp.port
        return None
    if isinstance(target, int) and not isinstance(target, bool):
        return target
    return None


def _endpoint_ports(svc: Mapping[str, Any], pod: Pod) -> list[dict[str, Any]]:
    spec = svc.get("spec") or {}
    ports = []
    for port in spec.get("ports") or []:
        number = _find_port(pod, port)
        if number is None:
            continue
        entry: dict[str, Any] = {"name": str(port.get("name") or ""), "port": number, "protocol": port.get("protocol") or "TCP"}
        if port.get("appProtocol") is not None:
            entry = {"appProtocol": port["appProtocol"], **entry}
        ports.append(entry)
    return ports


def _port_key(ports: Sequence[Mapping[str, Any]] | None) -> tuple:
    """``NewPortMapKey``: order-insensitive identity of a port list."""
    return tuple(sorted((p.get("name") or "", p.get("protocol") or "TCP", p.get("port") or 0, p.get("appProtocol") or "") for p in ports or []))


def _ip_version(ip: str) -> int | None:
    try:
        return ipaddress.ip_address(ip).version
    except ValueError:
        return None


def _pod_endpoint(pod: Pod, svc: Mapping[str, Any], address_type: str, node: Node | None) -> dict[str, Any]:
    spec = svc.get("spec") or {}
    namespace, name = _service_key(svc)
    serving = bool(pod.ready)
    terminating = False
    ready = bool(spec.get("publishNotReadyAddresses")) or (serving and not terminating)
    want = 6 if address_type == "IPv6" else 4
    addresses = [pod.ip] if pod.ip and _ip_version(pod.ip) == want else []
    ep: dict[str, Any] = {
        "addresses": addresses,
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
    }
    if pod.hostname and pod.subdomain == name and pod.namespace == namespace:
        ep["hostname"] = pod.hostname
    if pod.node:
        ep["nodeName"] = pod.node
    ep["targetRef"] = {"kind": "Pod", "name": pod.name, "namespace": pod.namespace, "uid": object_uid("Pod", pod.namespace, pod.name)}
    if node is not None and node.labels.get(LABEL_ZONE):
        ep["zone"] = node.labels[LABEL_ZONE]
    return ep


def _endpoint_hash(ep: Mapping[str, Any]) -> tuple:
    """``hashEndpoint``: addresses, hostname, targetRef namespace/name."""
    ref = ep.get("targetRef") or {}
    return (tuple(sorted(ep.get("addresses") or [])), ep.get("hostname") or "", ref.get("namespace") or "", ref.get("name") or "")


def _endpoints_equal(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """``EndpointsEqualBeyondHash``."""
    keys = ("conditions", "nodeName", "zone", "hints")
    if any((a.get(k) or None) != (b.get(k) or None) for k in keys):
        return False
    return (a.get("targetRef") or {}) == (b.get("targetRef") or {})


def _prefix(service_name: str) -> str:
    """``getEndpointSlicePrefix``: ``<name>-`` unless that is not a valid prefix."""
    prefix = f"{service_name}-"
    if len(prefix) > 253:
        prefix = service_name
    return prefix


def _labels(svc: Mapping[str, Any]) -> dict[str, str]:
    """``setEndpointSliceLabels``."""
    meta = svc.get("metadata") or {}
    labels = {
        k: str(v) for k, v in (meta.get("labels") or {}).items() if k not in (LABEL_SERVICE_NAME, LABEL_MANAGED_BY, LABEL_HEADLESS)
    }
    if _is_headless(svc.get("spec") or {}):
        labels[LABEL_HEADLESS] = ""
    labels[LABEL_SERVICE_NAME] = str(meta.get("name") or "")
    labels[LABEL_MANAGED_BY] = CONTROLLER_NAME
    return dict(sorted(labels.items()))


def _owned_by(slice_: Mapping[str, Any], svc: Mapping[str, Any]) -> bool:
    uid = _service_uid(svc)
    for ref in (slice_.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("uid") == uid and ref.get("kind") == "Service" and ref.get("apiVersion") == "v1":
            return True
    return False


class _Namer:
    """Deterministic ``generateName``: 5 characters of a hash, skipping names in use."""

    def __init__(self, seed: int, taken: Iterable[tuple[str, str]]):
        self.seed = seed
        self.taken = set(taken)
        self.counters: dict[tuple[str, str], int] = {}

    def name(self, namespace: str, service: str, prefix: str) -> str:
        base = prefix[:_MAX_GENERATED_NAME_LENGTH]
        while True:
            n = self.counters.get((namespace, service), 0)
            self.counters[(namespace, service)] = n + 1
            digest = hashlib.sha256(f"{self.seed}/{namespace}/{service}/{n}".encode()).digest()
            suffix = "".join(_ALPHANUMS[b % len(_ALPHANUMS)] for b in digest[:5])
            name = base + suffix
            if (namespace, name) not in self.taken:
                self.taken.add((namespace, name))
                return name


def _new_slice(svc: Mapping[str, Any], address_type: str, ports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    namespace, name = _service_key(svc)
    return {
        "addressType": address_type,
        "apiVersion": "discovery.k8s.io/v1",
        "endpoints": [],
        "kind": "EndpointSlice",
        "metadata": {
            "generateName": _prefix(name),
            "labels": _labels(svc),
            "name": "",
            "namespace": namespace,
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "blockOwnerDeletion": True,
                    "controller": True,
                    "kind": "Service",
                    "name": name,
                    "uid": _service_uid(svc),
                }
            ],
        },
        "ports": [dict(p) for p in ports],
    }


def _copy_slice(slice_: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in slice_.items()}
    out["metadata"] = dict(slice_.get("metadata") or {})
    out["endpoints"] = [dict(ep) for ep in slice_.get("endpoints") or []]
    out["ports"] = [dict(p) for p in slice_.get("ports") or []]
    return out


def _reconcile_port_mapping(
    svc: Mapping[str, Any],
    existing: list[dict[str, Any]],
    desired: dict[tuple, dict[str, Any]],
    address_type: str,
    ports: Sequence[Mapping[str, Any]],
    max_per_slice: int,
) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """``reconcileByPortMapping``. ``desired`` is an ordered hash -> endpoint map that
    is consumed. Returns (create, update, delete, unchanged)."""
    by_name: dict[str, dict[str, Any]] = {}
    unchanged: list[str] = []
    to_update: list[str] = []
    to_delete: list[str] = []
    labels = _labels(svc)
    for slice_ in sorted(existing, key=lambda s: s["metadata"]["name"]):
        name = slice_["metadata"]["name"]
        by_name[name] = slice_
        new_endpoints = []
        updated = False
        for ep in slice_.get("endpoints") or []:
            got = desired.pop(_endpoint_hash(ep), None)
            if got is not None:
                new_endpoints.append(got)
                if not _endpoints_equal(got, ep):
                    updated = True
        labels_changed = (slice_.get("metadata") or {}).get("labels") != labels
        old_count = len(slice_.get("endpoints") or [])
        if updated or old_count != len(new_endpoints):
            if not new_endpoints:
                to_delete.append(name)
            else:
                copy = _copy_slice(slice_)
                copy["endpoints"] = new_endpoints
                copy["metadata"]["labels"] = dict(labels)
                by_name[name] = copy
                to_update.append(name)
        elif labels_changed:
            copy = _copy_slice(slice_)
            copy["metadata"]["labels"] = dict(labels)
            by_name[name] = copy
            to_update.append(name)
        else:
            unchanged.append(name)

    def pop_any() -> dict[str, Any]:
        key = next(iter(desired))
        return desired.pop(key)

    # 2. fill the slices being updated, fullest first
    if desired and to_update:
        for name in sorted(to_update, key=lambda n: -len(by_name[n]["endpoints"])):
            slice_ = by_name[name]
            while desired and len(slice_["endpoints"]) < max_per_slice:
                slice_["endpoints"].append(pop_any())
    # 3. fit the remainder into an unchanged slice, or create new ones
    to_create: list[dict[str, Any]] = []
    while desired:
        fill = None
        if len(desired) < max_per_slice and unchanged:
            closest = max_per_slice
            for name in unchanged:
                diff = max_per_slice - (len(desired) + len(by_name[name].get("endpoints") or []))
                if 0 <= diff < closest:
                    closest, fill = diff, by_name[name]
                    if diff == 0:
                        break
        if fill is None:
            fill = _new_slice(svc, address_type, ports)
        else:
            fill = _copy_slice(fill)
            by_name[fill["metadata"]["name"]] = fill
        while desired and len(fill["endpoints"]) < max_per_slice:
            fill["endpoints"].append(pop_any())
        if fill["metadata"]["name"]:
            to_update.append(fill["metadata"]["name"])
            unchanged.remove(fill["metadata"]["name"])
        else:
            to_create.append(fill)
    return (
        to_create,
        [by_name[n] for n in sorted(set(to_update))],
        [by_name[n] for n in sorted(to_delete)],
        [by_name[n] for n in sorted(unchanged)],
    )


def slices_for_service(
    svc: Mapping[str, Any],
    pods: Sequence[Pod],
    existing: Sequence[Mapping[str, Any]] = (),
    nodes: Mapping[str, Node] | None = None,
    namer: _Namer | None = None,
    max_endpoints_per_slice: int = MAX_ENDPOINTS_PER_SLICE,
) -> list[dict[str, Any]]:
    """One ``Reconcile`` of one Service: its EndpointSlices after the sync.

    ``existing`` are the slices currently labelled for this Service and managed by the
    controller. ``pods`` may be all Pods; selection happens here.
    """
    namespace, name = _service_key(svc)
    spec = svc.get("spec") or {}
    selector = spec.get("selector") or {}
    if not selector or spec.get("type") == "ExternalName":
        return []
    if namer is None:
        namer = _Namer(0, [((s.get("metadata") or {}).get("namespace"), (s.get("metadata") or {}).get("name")) for s in existing])
    selected = sorted(
        (p for p in pods if p.namespace == namespace and all(p.labels.get(k) == v for k, v in selector.items())),
        key=lambda p: p.name,
    )
    result: list[dict[str, Any]] = []
    supported = _address_types(spec)
    to_delete: list[dict[str, Any]] = []
    by_type: dict[str, list[dict[str, Any]]] = {}
    for slice_ in existing:
        addr = slice_.get("addressType")
        if addr not in supported:
            continue  # deleted
        by_type.setdefault(addr, []).append(slice_)
    for address_type in supported:
        current = by_type.get(address_type, [])
        owned = [s for s in current if _owned_by(s, svc)]
        to_delete = [s for s in current if not _owned_by(s, svc)]
        existing_by_ports: dict[tuple, list[dict[str, Any]]] = {}
        for s in owned:
            existing_by_ports.setdefault(_port_key(s.get("ports")), []).append(s)
        desired: dict[tuple, dict[tuple, dict[str, Any]]] = {}
        desired_ports: dict[tuple, list[dict[str, Any]]] = {}
        for pod in selected:
            if not pod.ip:
                continue
            node = None
            if nodes is not None:
                node = nodes.get(pod.node)
                if node is None and not spec.get("publishNotReadyAddresses"):
                    continue
            ports = _endpoint_ports(svc, pod)
            key = _port_key(ports)
            desired.setdefault(key, {})
            desired_ports.setdefault(key, ports)
            ep = _pod_endpoint(pod, svc, address_type, node)
            if ep["addresses"]:
                desired[key].setdefault(_endpoint_hash(ep), ep)
        creates: list[dict] = []
        updates: list[dict] = []
        unchanged: list[dict] = []
        for key, endpoints in desired.items():
            c, u, d, keep = _reconcile_port_mapping(
                svc, existing_by_ports.get(key, []), endpoints, address_type, desired_ports[key], max_endpoints_per_slice
            )
            creates += c
            updates += u
            to_delete += d
            unchanged += keep
        for key, slices in existing_by_ports.items():
            if key not in desired:
                to_delete += slices
        if len(current) == len(to_delete) and not creates:
            placeholder = _new_slice(svc, address_type, [])
            if len(to_delete) == 1 and _placeholder_equal(to_delete[0], placeholder):
                unchanged.append(to_delete.pop())
            else:
                creates.append(placeholder)
        # finalize: turn creates into updates of slices that would be deleted
        to_delete.sort(key=lambda s: s["metadata"]["name"])
        i = 0
        while i < len(to_delete) and creates:
            victim = to_delete[i]
            new = creates[-1]
            if victim.get("addressType") == new["addressType"] and _owned_by(victim, svc):
                new["metadata"]["name"] = victim["metadata"]["name"]
                creates.pop()
                updates.append(new)
                to_delete.pop(i)
            else:
                i += 1
        for new in creates:
            new["metadata"]["name"] = namer.name(namespace, name, new["metadata"]["generateName"])
        result += unchanged + updates + creates
    return [_finish(s) for s in result]


def _placeholder_equal(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """``placeholderSliceCompare``: namespace, labels, owners, no endpoints and ports."""
    ma, mb = a.get("metadata") or {}, b.get("metadata") or {}
    return (
        ma.get("namespace") == mb.get("namespace")
        and (ma.get("labels") or {}) == (mb.get("labels") or {})
        and (ma.get("ownerReferences") or []) == (mb.get("ownerReferences") or [])
        and not a.get("endpoints")
        and not a.get("ports")
        and a.get("addressType") == b.get("addressType")
    )


def _finish(slice_: dict[str, Any]) -> dict[str, Any]:
    """Print empty lists as ``null`` the way they come back from the API server."""
    out = dict(slice_)
    out["endpoints"] = slice_.get("endpoints") or None
    out["ports"] = slice_.get("ports") or None
    return {k: out[k] for k in sorted(out)}


def reconcile(
    services: Sequence[Mapping[str, Any]],
    pods: Sequence[Pod],
    existing: Sequence[Mapping[str, Any]] | None = None,
    *,
    nodes: Sequence[Node] | None = None,
    seed: int = 0,
    max_endpoints_per_slice: int = MAX_ENDPOINTS_PER_SLICE,
) -> list[dict[str, Any]]:
    """Sync every Service once; return all EndpointSlices of the cluster.

    ``existing`` is the previous result (or ``kubectl get endpointslices`` dicts):
    controller-managed slices are reconciled (names kept where they still fit),
    other slices are returned unchanged. ``nodes`` enables the node checks (unknown
    node -> Pod skipped) and ``zone``. Output is sorted by namespace, then name.
    Deterministic: the same inputs and ``seed`` give the same slices.
    """
    existing = list(existing or [])
    node_map = {n.name: n for n in nodes} if nodes is not None else None
    managed: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    passthrough: list[dict[str, Any]] = []
    for slice_ in existing:
        meta = slice_.get("metadata") or {}
        labels = meta.get("labels") or {}
        if labels.get(LABEL_MANAGED_BY) == CONTROLLER_NAME and labels.get(LABEL_SERVICE_NAME):
            managed.setdefault((str(meta.get("namespace") or "default"), str(labels[LABEL_SERVICE_NAME])), []).append(slice_)
        else:
            passthrough.append(dict(slice_))
    namer = _Namer(seed, [((s.get("metadata") or {}).get("namespace") or "default", (s.get("metadata") or {}).get("name")) for s in existing])
    out: list[dict[str, Any]] = list(passthrough)
    for svc in sorted(services, key=_service_key):
        out += slices_for_service(
            svc,
            pods,
            managed.get(_service_key(svc), []),
            node_map,
            namer,
            max_endpoints_per_slice,
        )
    return sorted(out, key=lambda s: ((s.get("metadata") or {}).get("namespace") or "", (s.get("metadata") or {}).get("name") or ""))
