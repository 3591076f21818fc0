"""LoadBalancer IPs reach the nodes the way MetalLB in BGP mode gets them there: the
clients' router (here: each client namespace's routing table) has a route per
LoadBalancer IP with the announcing nodes as next hops.

Announcing nodes, as MetalLB's speakers decide: every node for
``externalTrafficPolicy: Cluster``; only nodes with a ready local endpoint for
``Local``. Several next hops form one ECMP route (per-flow hashing).
kube-proxy itself never binds LoadBalancer IPs in iptables/nftables mode: the packets
arrive at a node addressed to the LB IP and kube-proxy's rules DNAT them.
"""

from __future__ import annotations

import contextlib
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from testbed import endpointslices
from testbed.fabric import ETH0_INDEX, rtnl
from testbed.model import Cluster


def lb_ips(svc: dict[str, Any]) -> list[str]:
    ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    return [i["ip"] for i in ingress if i.get("ip")]


def announcing_nodes(cluster: Cluster, svc: dict[str, Any]) -> list[str]:
    """Node IPs that announce this Service's LB IPs."""
    spec = svc.get("spec") or {}
    if spec.get("externalTrafficPolicy") != "Local":
        return [n.ip for n in cluster.nodes]
    meta = svc.get("metadata") or {}
    key = (meta.get("namespace") or "default", meta.get("name"))
    local_nodes = set()
    for _sl, ep in endpointslices.ready_endpoints(endpointslices.by_service(cluster.endpointslices).get(key, ())):
        if ep.get("nodeName"):
            local_nodes.add(ep["nodeName"])
    return [n.ip for n in cluster.nodes if n.name in local_nodes]


def desired_routes(cluster: Cluster) -> dict[str, list[str]]:
    """LB IP -> next-hop node IPs."""
    routes: dict[str, list[str]] = {}
    for svc in cluster.services:
        if (svc.get("spec") or {}).get("type") != "LoadBalancer":
            continue
        hops = announcing_nodes(cluster, svc)
        for ip in lb_ips(svc):
            routes[ip] = hops
    return routes


def announce(cluster: Cluster) -> dict[str, list[str]]:
    """Make every client's routes to LB IPs match :func:`desired_routes`."""
    routes = desired_routes(cluster)
    previous: dict[str, list[str]] = cluster.extra.get("lbRoutes", {})
    for client in cluster.clients:
        with rtnl(client.netns) as ipr:
            for ip in previous.keys() - routes.keys():
                with contextlib.suppress(NetlinkError):
                    ipr.route("del", dst=f"{ip}/32")
            for ip, hops in routes.items():
                with contextlib.suppress(NetlinkError):
                    ipr.route("del", dst=f"{ip}/32")
                if not hops:
                    continue  # nobody announces it: unreachable, as with MetalLB
                if len(hops) == 1:
                    ipr.route("add", dst=f"{ip}/32", gateway=hops[0], oif=ETH0_INDEX)
                else:
                    ipr.route("add", dst=f"{ip}/32", multipath=[{"gateway": h, "oif": ETH0_INDEX} for h in hops])
    cluster.extra["lbRoutes"] = routes
    return routes
