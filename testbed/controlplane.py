"""The emulated control plane: kube-apiserver admission of Services (validation and
allocation, :mod:`testbed.apiserver`) and the EndpointSlice controller
(:mod:`testbed.endpointslices`), over the objects kept in the cluster model.

Pure: no kernel. Every change goes through :func:`admit` / :func:`reconcile`, and the
result (Services with their allocations, EndpointSlices) is what every kube-proxy reads.
"""

from __future__ import annotations

import copy
from typing import Any

from testbed import apiserver, endpointslices
from testbed.model import Cluster

# kubespray reserves the first Service IP for `kubernetes` and the third for CoreDNS.
MANAGED_BY = "endpointslice-controller.k8s.io"


def registry(cluster: Cluster, existing: list[dict[str, Any]] | None = None) -> apiserver.ServiceRegistry:
    """A ServiceRegistry holding ``existing`` (already admitted) Services."""
    reg = apiserver.ServiceRegistry(
        cluster.network.service_cidr,
        lb_pools=cluster.extra.get("loadBalancerPools", []),
        seed=int(cluster.extra.get("seed", 0)),  # reproducible allocations run after run
    )
    # restore: reserve the stored allocations (ClusterIPs, nodePorts, LB IPs) and keep
    # the uids, so EndpointSlices keep matching their owner Services
    reg.restore([copy.deepcopy(s) for s in existing or []])
    return reg


def _is_managed(slice_: dict[str, Any]) -> bool:
    labels = (slice_.get("metadata") or {}).get("labels") or {}
    return labels.get("endpointslice.kubernetes.io/managed-by") == MANAGED_BY


def admit_all(cluster: Cluster, file: str | None = None) -> None:
    """Admit the cluster's (not yet admitted) Services in order, as `kubectl apply`
    of the topology file would; then reconcile EndpointSlices. Raises InputError with
    kube-apiserver's message on the first invalid Service."""
    reg = registry(cluster)
    cluster.services = [reg.create(copy.deepcopy(svc), file=file) for svc in cluster.services]
    reconcile(cluster)


def reconcile(cluster: Cluster) -> None:
    """The EndpointSlice controller: slices for every Service with a selector, from
    the pods that are Ready (servers listening) or not; user-managed slices kept."""
    user = [s for s in cluster.endpointslices if not _is_managed(s)]
    managed = [s for s in cluster.endpointslices if _is_managed(s)]
    cluster.endpointslices = user + endpointslices.reconcile(cluster.services, cluster.pods, existing=managed)


def objects(cluster: Cluster) -> list[dict[str, Any]]:
    """What kube-proxy watches: Services and EndpointSlices."""
    return [*cluster.services, *cluster.endpointslices]
