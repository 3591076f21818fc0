"""Stale UDP conntrack entries, removed the way kube-proxy removes them.

Mirrors ``CleanStaleEntries`` (pkg/proxy/conntrack/cleanup.go), which every proxy mode
runs after a sync: for each UDP Service port with serving endpoints, a flow whose
original destination is the Service's IP:port (ClusterIP, LoadBalancer IPs,
externalIPs) — or whose original destination port is its NodePort — and whose reply
source is not one of those endpoints is deleted. Without this a UDP client keeps
talking to a deleted pod until the entry times out. kube-proxy lists and deletes
over netlink; we use the ``conntrack`` tool (the same netlink calls) inside the node.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from testbed.kubeproxy import run_in
from testbed.proxy.types import Endpoint, ServicePort, ServicePortName

_ENTRY = re.compile(r"src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+).*?src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)")


def stale_filters(
    services: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, Sequence[Endpoint]],
    entries_text: str,
) -> list[list[str]]:
    """``conntrack -D`` argument lists for the stale UDP flows in ``conntrack -L`` output
    (pure; see the module docstring)."""
    by_ip_port: dict[tuple[str, int], set[str]] = {}
    by_node_port: dict[int, set[str]] = {}
    for spn, svc in services.items():
        if svc.protocol != "UDP":
            continue
        ips = {ep.ip for ep in endpoints.get(spn, ()) if ep.serving}
        if not ips:
            continue  # a Service without endpoints needs no cleaning
        for vip in (svc.cluster_ip, *svc.load_balancer_vips, *svc.external_ips):
            by_ip_port[(vip, svc.port)] = ips
        if svc.node_port:
            by_node_port[svc.node_port] = ips
    filters: list[list[str]] = []
    seen: set[tuple] = set()
    for line in entries_text.splitlines():
        if not line.startswith("udp"):
            continue
        m = _ENTRY.search(line)
        if not m:
            continue
        orig_dst, orig_dport, reply_src = m.group(2), int(m.group(4)), m.group(5)
        eps = by_ip_port.get((orig_dst, orig_dport))
        if eps is not None and reply_src not in eps and ("ip", orig_dst, orig_dport, reply_src) not in seen:
            seen.add(("ip", orig_dst, orig_dport, reply_src))
            filters.append(["-p", "udp", "--orig-dst", orig_dst, "--orig-port-dst", str(orig_dport), "--reply-src", reply_src])
        eps = by_node_port.get(orig_dport)
        if eps is not None and reply_src not in eps and ("np", orig_dport, reply_src) not in seen:
            seen.add(("np", orig_dport, reply_src))
            filters.append(["-p", "udp", "--orig-port-dst", str(orig_dport), "--reply-src", reply_src])
    return filters


def clean_stale_entries(ns: str, services, endpoints) -> int:  # noqa: ANN001
    """Delete the stale UDP flows in namespace ``ns``; returns how many filters ran."""
    if not any(s.protocol == "UDP" for s in services.values()):
        return 0
    listing = run_in(ns, ["conntrack", "-L", "-p", "udp"], check=False).stdout
    filters = stale_filters(services, endpoints, listing)
    for f in filters:
        run_in(ns, ["conntrack", "-D", *f], check=False)  # exit 1 = nothing matched any more
    return len(filters)
