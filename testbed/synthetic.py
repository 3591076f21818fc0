"""Background Services for scale experiments, as kube-proxy's maintainers benchmark it.

kube-proxy's own benchmarks (``generateServiceEndpoints`` in
``pkg/proxy/iptables/proxier_test.go``, ``BenchmarkSyncProxyRules``) program N
ClusterIP Services with one TCP port each and one EndpointSlice per Service holding a
few ready endpoints; the endpoints are addresses nothing ever sends to. Here the same
workload is shaped as ``kubectl get -o yaml`` prints it (plain dicts) and sized to the
emulated cluster's own ranges (kubespray defaults):

* clusterIPs are requested explicitly, drawn at random (seeded) from the service CIDR
  the way the API server's random allocator hands them out, never its first address
  (``kubernetes.default``) and never an address in ``avoid`` (the real Services' IPs);
  they are then admitted by the emulated kube-apiserver (:func:`admit`) like any
  ``kubectl apply``;
* endpoints (``addresses="pods"``): pod addresses on the nodes' podCIDRs (``.2``
  onwards, round-robin over the nodes), so some are real pods and most are unused
  addresses on a real pod bridge; ``addresses="unreachable"``: addresses from
  198.18.0.0/15 (RFC 2544, benchmarking; nothing routes it);
* the Services have no selector and their EndpointSlices are labelled
  ``endpointslice.kubernetes.io/managed-by: testbed.io/synthetic``, as a custom
  endpoints controller would: the emulated EndpointSlice controller leaves them alone
  (it manages only slices of Services with a selector), and kube-proxy reads them like
  any other slice.

Names are ``svc-00000`` ... in ``namespace`` (default ``bench``). kube-proxy's iptables
proxier writes ``KUBE-SERVICES`` in service-port order (our renderer: sorted by
namespace, name, port): with the background in ``bench`` and the probed Services in a
namespace that sorts after it (``default``), every probed packet first walks past
every background rule -- the probed Service is *last* in the dispatch order, so the
per-packet cost of a linear chain shows (see :func:`dispatch_position`).

The output is prefix-stable: Services ``0..n-1`` do not depend on ``n``, so
``synthetic_objects(1, k, start=n)`` is exactly "one more Service" on top of
``synthetic_objects(n, k)``.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import random
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

__all__ = [
    "MANAGED_BY",
    "synthetic_objects",
    "service_capacity",
    "for_cluster",
    "admit",
    "remove",
    "background_count",
    "dispatch_position",
]

#: ``endpointslice.kubernetes.io/managed-by`` of the synthetic slices (not the
#: built-in controller's name, so the emulated controller passes them through).
MANAGED_BY = "testbed.io/synthetic"
LABEL_SYNTHETIC = "testbed.io/synthetic"
UNREACHABLE_NET = "198.18.0.0/15"  # RFC 2544 benchmarking range: never routed here

_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # utilrand.String's alphabet (no vowels)


@lru_cache(maxsize=8)
def _ip_order(service_cidr: str, seed: int) -> tuple[int, tuple[int, ...]]:
    net = ipaddress.ip_network(service_cidr)
    if net.version != 4:
        raise ValueError(f"service CIDR {service_cidr}: only IPv4 is generated")
    # host offsets 2 .. size-2 (network address, .1 for kubernetes.default, broadcast excluded)
    offsets = list(range(2, net.num_addresses - 1))
    random.Random(f"clusterip/{seed}").shuffle(offsets)
    return int(net.network_address), tuple(offsets)


def service_capacity(service_cidr: str = "10.233.0.0/18", avoid: Iterable[str] = ()) -> int:
    """How many Services :func:`synthetic_objects` can address in ``service_cidr``."""
    net = ipaddress.ip_network(service_cidr)
    taken = sum(1 for ip in set(avoid) if ipaddress.ip_address(ip) in net)
    return max(0, net.num_addresses - 3 - taken)


def _suffix(seed: int, namespace: str, name: str) -> str:
    """The 5 random characters the API server appends to ``generateName``."""
    digest = hashlib.sha256(f"{seed}/{namespace}/{name}".encode()).digest()
    return "".join(_SUFFIX_ALPHABET[b % len(_SUFFIX_ALPHABET)] for b in digest[:5])


def synthetic_objects(
    n_services: int,
    endpoints_per_service: int,
    seed: int = 0,
    namespace: str = "bench",
    *,
    start: int = 0,
    service_cidr: str = "10.233.0.0/18",
    pod_cidr: str = "10.233.64.0/18",
    node_prefix: int = 24,
    nodes: int | list[str] = 3,
    pods_per_node: int = 110,
    port: int = 80,
    target_port: int = 8080,
    port_name: str = "http",
    avoid: Iterable[str] = (),
    addresses: str = "pods",
) -> list[dict[str, Any]]:
    """``[Service, EndpointSlice, Service, EndpointSlice, ...]`` for Services number
    ``start`` .. ``start + n_services - 1``.

    ``nodes`` is a count (``node1``, ``node2``, ...) or the node names in topology
    order (node *k* owns the *k*-th ``/node_prefix`` block of ``pod_cidr``).
    Raises :class:`ValueError` when the service CIDR has too few free addresses or the
    nodes too few pods for one Service's endpoints.
    """
    if n_services < 0 or start < 0 or endpoints_per_service < 0:
        raise ValueError("n_services, start and endpoints_per_service must be >= 0")
    if addresses not in ("pods", "unreachable"):
        raise ValueError(f'addresses: Unsupported value: "{addresses}": supported values: "pods", "unreachable"')
    base_net, order = _ip_order(service_cidr, seed)
    avoid_off = {int(ipaddress.IPv4Address(ip)) - base_net for ip in avoid if ip and ip != "None"}
    offsets = [o for o in order if o not in avoid_off] if avoid_off else order
    if start + n_services > len(offsets):
        raise ValueError(
            f"service CIDR {service_cidr} has room for {len(offsets)} more Services, "
            f"{start + n_services} asked: use a larger kubeServiceAddresses"
        )
    node_names = [f"node{k + 1}" for k in range(nodes)] if isinstance(nodes, int) else list(nodes)
    if addresses == "pods":
        pod_net = ipaddress.ip_network(pod_cidr)
        blocks = list(pod_net.subnets(new_prefix=node_prefix))
        if not 1 <= len(node_names) <= len(blocks):
            raise ValueError(f"pod CIDR {pod_cidr} holds {len(blocks)} /{node_prefix} node blocks, {len(node_names)} asked")
        if pods_per_node < 1 or pods_per_node > blocks[0].num_addresses - 3:
            raise ValueError(f"pods_per_node must be 1..{blocks[0].num_addresses - 3} for /{node_prefix} node blocks")
        block_base = [int(b.network_address) + 2 for b in blocks[: len(node_names)]]
        pods_total = len(node_names) * pods_per_node
    else:
        unreachable = int(ipaddress.IPv4Network(UNREACHABLE_NET).network_address)
        pods_total = ipaddress.IPv4Network(UNREACHABLE_NET).num_addresses - 2
    if endpoints_per_service > pods_total:
        raise ValueError(f"{endpoints_per_service} endpoints per Service but only {pods_total} addresses")
    pod_port = {"name": port_name, "port": target_port, "protocol": "TCP"}

    out: list[dict[str, Any]] = []
    for i in range(start, start + n_services):
        name = f"svc-{i:05d}"
        cluster_ip = str(ipaddress.IPv4Address(base_net + offsets[i]))
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": namespace, "labels": {LABEL_SYNTHETIC: "true"}},
                "spec": {
                    "clusterIP": cluster_ip,
                    "clusterIPs": [cluster_ip],
                    "internalTrafficPolicy": "Cluster",
                    "ipFamilies": ["IPv4"],
                    "ipFamilyPolicy": "SingleStack",
                    "ports": [{"name": port_name, "port": port, "protocol": "TCP", "targetPort": target_port}],
                    "sessionAffinity": "None",
                    "type": "ClusterIP",
                },
                "status": {"loadBalancer": {}},
            }
        )
        endpoints = []
        for j in range(endpoints_per_service):
            pod = (i * endpoints_per_service + j) % pods_total
            if addresses == "pods":
                node, slot = pod % len(node_names), pod // len(node_names)
                ep: dict[str, Any] = {
                    "addresses": [str(ipaddress.IPv4Address(block_base[node] + slot))],
                    "conditions": {"ready": True, "serving": True, "terminating": False},
                    "nodeName": node_names[node],
                    "targetRef": {"kind": "Pod", "name": f"pod-{node_names[node]}-{slot}", "namespace": namespace},
                }
            else:
                ep = {
                    "addresses": [str(ipaddress.IPv4Address(unreachable + 1 + pod))],
                    "conditions": {"ready": True, "serving": True, "terminating": False},
                }
            endpoints.append(ep)
        out.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{name}-{_suffix(seed, namespace, name)}",
                    "namespace": namespace,
                    "generateName": f"{name}-",
                    "labels": {
                        "endpointslice.kubernetes.io/managed-by": MANAGED_BY,
                        "kubernetes.io/service-name": name,
                        LABEL_SYNTHETIC: "true",
                    },
                },
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": [dict(pod_port)],
            }
        )
    return out


# --------------------------------------------------------------------------- the cluster


def _is_synthetic(obj: dict[str, Any]) -> bool:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_SYNTHETIC) == "true"


def background_count(cluster) -> int:  # noqa: ANN001
    """How many synthetic Services the cluster holds."""
    return sum(1 for s in cluster.services if _is_synthetic(s))


def for_cluster(cluster, n_services: int, endpoints_per_service: int, *, seed: int = 0, namespace: str = "bench",
                start: int = 0, addresses: str = "pods") -> list[dict[str, Any]]:  # noqa: ANN001
    """:func:`synthetic_objects` sized to ``cluster`` (its ranges and node names),
    avoiding the clusterIPs of the cluster's own (non-synthetic) Services."""
    real_ips = [ip for s in cluster.services if not _is_synthetic(s)
                for ip in ((s.get("spec") or {}).get("clusterIPs") or [(s.get("spec") or {}).get("clusterIP")]) if ip]
    return synthetic_objects(
        n_services, endpoints_per_service, seed, namespace, start=start,
        service_cidr=cluster.network.service_cidr, pod_cidr=cluster.network.pod_cidr,
        node_prefix=cluster.network.node_prefix, nodes=[n.name for n in cluster.nodes],
        pods_per_node=min(110, 2 ** (32 - cluster.network.node_prefix) - 3),
        avoid=real_ips, addresses=addresses,
    )


def admit(cluster, objects: list[dict[str, Any]]) -> None:  # noqa: ANN001
    """Create the Services through the emulated kube-apiserver (validation, the
    requested clusterIP allocated -- it fails if taken) and add the slices."""
    from testbed import controlplane

    reg = controlplane.registry(cluster, existing=cluster.services)
    services = [reg.create(copy.deepcopy(o)) for o in objects if o.get("kind") == "Service"]
    cluster.services.extend(services)
    cluster.endpointslices.extend(copy.deepcopy(o) for o in objects if o.get("kind") == "EndpointSlice")


def remove(cluster, keep: int) -> int:  # noqa: ANN001
    """Delete synthetic Services number ``keep`` and above (and their slices), as
    ``kubectl delete`` would; returns how many were deleted."""
    def index(obj: dict[str, Any]) -> int:
        meta = obj.get("metadata") or {}
        name = (meta.get("labels") or {}).get("kubernetes.io/service-name") or meta.get("name", "")
        return int(name.split("-")[1]) if name.startswith("svc-") else -1

    before = len(cluster.services)
    cluster.services = [s for s in cluster.services if not (_is_synthetic(s) and index(s) >= keep)]
    cluster.endpointslices = [e for e in cluster.endpointslices if not (_is_synthetic(e) and index(e) >= keep)]
    return before - len(cluster.services)


def dispatch_position(cluster, namespace: str, name: str) -> tuple[int, int]:  # noqa: ANN001
    """``(position, total)`` of a Service among the Services kube-proxy programs, in the
    order our iptables renderer writes ``KUBE-SERVICES`` (namespace, name); 1-based.
    ``position == total`` means the Service is matched last."""
    keys = sorted(
        ((s["metadata"].get("namespace") or "default"), s["metadata"]["name"])
        for s in cluster.services
        if (s.get("spec") or {}).get("type") != "ExternalName" and (s.get("spec") or {}).get("clusterIP") not in (None, "", "None")
    )
    try:
        return keys.index((namespace, name)) + 1, len(keys)
    except ValueError:
        return 0, len(keys)
