"""The cluster fabric in the kernel: namespaces, veths, bridges, addresses, routes.

Shape (all of it inside namespaces the run owns; nothing in the host namespace):

* a *switch* namespace holding bridge ``br0``, the node network (a rack switch / a
  Vagrant private network). The host kernel has br_netfilter on, so a bridge's
  frames cross the FORWARD chain of the namespace holding it: keeping the bridge in
  our own namespace keeps the host's netfilter out of the path.
* one namespace per *node*: ``eth0`` (veth into the switch) with the node IP, a pod
  bridge ``cni0`` holding the first address of the node's podCIDR (the bridge CNI
  plugin's gateway), IP forwarding on, and a route to every other node's podCIDR via
  that node's IP (host-gw / kubenet style). Pod ports on ``cni0`` are in hairpin mode,
  as kubelet's bridge networking sets them, so a pod can reach itself via a Service.
* one namespace per *pod*: ``eth0`` (veth into its node's ``cni0``), the pod IP, a
  default route via the gateway.
* one namespace per external *client*: ``eth0`` on the switch with a client IP.
* the switch's bridge holds the node network's first address, the default gateway of
  nodes and clients (as a real node has one): traffic to an address nobody routes —
  e.g. a ClusterIP whose Service has no endpoints — is routed to it, so the packet
  reaches the FORWARD chain where kube-proxy REJECTs it, instead of failing the route
  lookup before any rule runs. The gateway forwards nothing.

Everything goes through netlink (pyroute2) from this one process: a netlink socket
opened inside :func:`testbed.netns.entered` stays in that namespace, so no process is
forked per namespace (forking costs ~4x here).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Callable, Iterator

from pyroute2 import IPRoute

from testbed import netns
from testbed.model import PREFIX, Cluster, Pod

Progress = Callable[[str, int, int], None]  # (phase, done, total)

# Fixed interface indexes: a fresh namespace has only lo (1), so the veth end we
# create in it can be given ifindex 2; this saves a netlink lookup per namespace.
LO_INDEX = 1
ETH0_INDEX = 2
BRPORT_MODE_HAIRPIN = 1


@contextlib.contextmanager
def rtnl(ns: str) -> Iterator[IPRoute]:
    """A netlink (rtnetlink) socket living in namespace ``ns``."""
    with netns.entered(ns):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def mac_for(ip: str) -> str:
    """A locally administered unicast MAC (02:74:62 = "tb") ending in the IPv4 address's
    last three bytes: the same address for the same IP in every run."""
    b = ipaddress.IPv4Address(ip).packed
    return "02:74:62:%02x:%02x:%02x" % (b[1], b[2], b[3])


def _nsfd(ns: str) -> int:
    return os.open(netns.path(ns), os.O_RDONLY)


def _veth_into(ipr: IPRoute, ifname: str, peer_ns: str, master: int | None) -> int:
    """Create veth ``ifname`` in ``ipr``'s namespace with its peer ``eth0`` (ifindex 2)
    created directly inside ``peer_ns``; enslave our end to ``master`` and bring it up.
    Returns our end's ifindex."""
    fd = _nsfd(peer_ns)
    try:
        kw = {"master": master} if master else {}
        ipr.link("add", ifname=ifname, kind="veth", state="up", peer={"ifname": "eth0", "net_ns_fd": fd, "index": ETH0_INDEX}, **kw)
    finally:
        os.close(fd)
    return ipr.link_lookup(ifname=ifname)[0]


def _setup_endpoint(ns: str, cidr_ip: str, prefixlen: int, gateway: str | None = None) -> None:
    """Inside ``ns``: lo up, eth0 up with its address, optional default route."""
    with rtnl(ns) as ipr:
        ipr.link("set", index=LO_INDEX, state="up")
        ipr.link("set", index=ETH0_INDEX, state="up")
        ipr.addr("add", index=ETH0_INDEX, address=cidr_ip, prefixlen=prefixlen)
        if gateway:
            ipr.route("add", dst="default", gateway=gateway)


def _prefixlen(cidr: str) -> int:
    return ipaddress.IPv4Network(cidr).prefixlen


def gateway_ip(cluster: Cluster) -> str:
    """The node network's default gateway: its first host address."""
    return str(ipaddress.IPv4Network(cluster.network.node_subnet).network_address + 1)


def run_namespaces(run_id: str) -> list[str]:
    return netns.list_names(f"{PREFIX}{run_id}-")


def build(cluster: Cluster, progress: Progress | None = None) -> None:
    """Create the whole fabric of ``cluster`` (whose namespaces are already named).

    On any failure everything of this run created so far is removed before the
    exception propagates: nothing half-built is left in the kernel.
    """
    assert cluster.run_id, "assign_netns() first"
    try:
        _build(cluster, progress or (lambda *_: None))
    except BaseException:
        teardown(cluster.run_id)
        raise


def _build(cluster: Cluster, progress: Progress) -> None:
    node_plen = _prefixlen(cluster.network.node_subnet)
    pod_plen = cluster.network.node_prefix
    total = 1 + len(cluster.nodes) + len(cluster.clients) + len(cluster.pods)
    done = 0

    netns.create(cluster.switch_netns)
    with rtnl(cluster.switch_netns) as sw:
        sw.link("set", index=LO_INDEX, state="up")
        # A bridge whose address is not set takes the lowest address of its ports, so a
        # port joining later (a new pod) can change it under its neighbours' ARP caches:
        # the gateway's MAC moves and traffic to it is lost until they re-resolve (5-8 s).
        # Set explicitly, the kernel keeps it (addr_assign_type NET_ADDR_SET).
        gateway = gateway_ip(cluster)
        sw.link("add", ifname="br0", kind="bridge", state="up", address=mac_for(gateway))
        br0 = sw.link_lookup(ifname="br0")[0]
        sw.addr("add", index=br0, address=gateway, prefixlen=node_plen)
        done += 1
        progress("network", done, total)

        for i, node in enumerate(cluster.nodes):
            netns.create(node.netns)
            _veth_into(sw, f"n{i}", node.netns, br0)
            with rtnl(node.netns) as ipr:
                ipr.link("set", index=LO_INDEX, state="up")
                ipr.link("set", index=ETH0_INDEX, state="up")
                ipr.addr("add", index=ETH0_INDEX, address=node.ip, prefixlen=node_plen)
                ipr.route("add", dst="default", gateway=gateway)
                ipr.link("add", ifname="cni0", kind="bridge", state="up", address=mac_for(node.pod_gateway))
                cni0 = ipr.link_lookup(ifname="cni0")[0]
                ipr.addr("add", index=cni0, address=node.pod_gateway, prefixlen=pod_plen)
                for other in cluster.nodes:
                    if other.name != node.name:
                        ipr.route("add", dst=other.pod_cidr, gateway=other.ip)
            with netns.entered(node.netns):
                netns.sysctl("net.ipv4.ip_forward", 1)
            done += 1
            progress("nodes", done, total)

        for i, client in enumerate(cluster.clients):
            netns.create(client.netns)
            _veth_into(sw, f"c{i}", client.netns, br0)
            _setup_endpoint(client.netns, client.ip, node_plen, gateway)
            done += 1
            progress("clients", done, total)

    for node in cluster.nodes:
        pods = cluster.pods_on(node.name)
        if not pods:
            continue
        with rtnl(node.netns) as ipr:
            cni0 = ipr.link_lookup(ifname="cni0")[0]
            for pod in pods:
                add_pod(ipr, cni0, pod, pod_plen, node.pod_gateway)
                done += 1
                progress("pods", done, total)


def pod_ifname(pod: Pod) -> str:
    """Node-side name of a pod's veth: ``veth`` + the pod IP in hex (<= 15 chars, and
    unique within the node because pod IPs are)."""
    return "veth%08x" % int(ipaddress.IPv4Address(pod.ip))


def add_pod(ipr: IPRoute, cni0: int, pod: Pod, plen: int, gateway: str) -> None:
    """Create ``pod``'s namespace and wire it into its node's ``cni0`` (``ipr`` lives
    in the node namespace)."""
    netns.create(pod.netns)
    idx = _veth_into(ipr, pod_ifname(pod), pod.netns, cni0)
    ipr.brport("set", index=idx, mode=BRPORT_MODE_HAIRPIN)
    _setup_endpoint(pod.netns, pod.ip, plen, gateway)


def add_pods(cluster: Cluster, pods: list[Pod]) -> None:
    """Wire new pods into a live cluster (scale up, apply). On failure the pods'
    namespaces created so far are removed again."""
    done: list[Pod] = []
    try:
        for node in cluster.nodes:
            mine = [p for p in pods if p.node == node.name]
            if not mine:
                continue
            with rtnl(node.netns) as ipr:
                cni0 = ipr.link_lookup(ifname="cni0")[0]
                for pod in mine:
                    done.append(pod)
                    add_pod(ipr, cni0, pod, cluster.network.node_prefix, node.pod_gateway)
    except BaseException:
        remove_pods(done)
        raise


def remove_pods(pods: list[Pod]) -> None:
    """Delete pods' namespaces (their veths go with them)."""
    for pod in pods:
        netns.delete(pod.netns)


def teardown(run_id: str) -> int:
    """Delete every namespace of run ``run_id`` (idempotent). The kernel frees them,
    and the veths and bridges inside, asynchronously. Returns how many were removed."""
    names = run_namespaces(run_id)
    for name in names:
        netns.delete(name)
    return len(names)
