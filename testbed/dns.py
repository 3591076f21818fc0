"""The cluster DNS: CoreDNS's ``kubernetes`` plugin, emulated with a real dnsmasq
running inside the DNS pods, behind the kubespray-style Service
``kube-system/coredns`` (ClusterIP = the third address of the Service range,
``10.233.0.3``) that kube-proxy programs like any other Service, so DNS traffic
itself crosses the dataplane under test.

Reference: kubernetes/dns ``docs/specification.md`` (schema 1.1.0 as CoreDNS
reports it) and CoreDNS's ``kubernetes`` plugin as kubespray configures it
(``kubernetes cluster.local in-addr.arpa ip6.arpa { pods insecure; fallthrough
in-addr.arpa ip6.arpa }``, ``forward . /etc/resolv.conf``, ``cache 30``, TTL 5).

Records (pure: :func:`records`, from ``cluster.services``, ``cluster.endpointslices``
and ``cluster.pods``):

* ``<svc>.<ns>.svc.<zone>`` A -> the ClusterIP (every non-headless Service that has one);
* headless (``clusterIP: None``): one A per *ready* endpoint (EndpointSlice
  ``conditions.ready``; the controller already folds ``publishNotReadyAddresses`` in),
  NXDOMAIN when none is ready;
* ``<hostname>.<svc>.<ns>.svc.<zone>`` A per ready endpoint, hostname = the
  endpoint's ``hostname`` (StatefulSet pods: ``spec.hostname`` with ``subdomain`` =
  the Service) or else the address with dashes (CoreDNS ``endpointHostname``). As in
  CoreDNS these exist for ClusterIP Services' endpoints too;
* SRV ``_<port>._<proto>.<svc>.<ns>.svc.<zone>`` per *named* port: -> the Service name
  and Service port for ClusterIP Services, -> every ready endpoint's hostname name and
  the endpoint's port for headless ones; priority 0, weight ``floor(100/N)`` over the
  N records of the name (CoreDNS ``backend_lookup.go`` SRV);
* ExternalName: CNAME ``<svc>.<ns>.svc.<zone>`` -> ``externalName``, with the target's
  A records in the same answer (CoreDNS resolves the target upstream at query time);
* PTR for ClusterIPs and endpoint addresses (the name first written for an address);
* ``<a-b-c-d>.<ns>.pod.<zone>`` A for every pod (see "Differences");
* TXT ``dns-version.<zone>`` = ``1.1.0``;
* any other name under ``<zone>``: NXDOMAIN; everything else goes upstream.

dnsmasq mechanics (chosen by measurement, see :func:`update`; port 53 never stops
answering). Each DNS pod runs a *primary* dnsmasq on port 53 whose configuration is
static for the run:

* A/PTR records live in one hosts file in its ``--hostsdir``, which dnsmasq watches
  with inotify; it is replaced atomically (``rename``): no signal, served ~1-3 ms later;
* CNAME and SRV records can only come from a dnsmasq configuration, which dnsmasq
  never re-reads (stopping and restarting it closes port 53 for ~20 ms per pod
  here, see benchmarks/bench_dns.py). So they live in a *secondary* dnsmasq on a
  loopback port of the same pod, one per record-set *generation*; the primary's ``--servers-file`` (re-read on
  SIGHUP) routes exactly those names to it. When CNAME/SRV records change (Services
  with named ports or ExternalNames come and go, headless endpoints change) the next
  generation's secondary starts beside the old one, the servers-file is rewritten,
  the primaries get SIGHUP (they re-read servers-file and hosts and drop their cache;
  queries wait in the socket meanwhile), then the old secondaries stop.

Every update writes a serial record (``testbed-serial.invalid`` A ``127.128.x.y``) into
the hosts file, and each generation answers ``testbed-generation.invalid``; the update
waits until every DNS pod answers both on port 53: the delay is measured, bounded
(:data:`RELOAD_TIMEOUT`) and returned (:class:`DNSSync`).

The outside world (all inside namespaces of the run, on the node network; nothing
leaves the machine): an upstream DNS server (another dnsmasq) in namespace
``tb-<run>-ext-dns-upstream``, authoritative for ``example.test`` and ``google.com``
(NXDOMAIN for every other name), and external hosts ``db`` (``db.example.test``) and
``web`` (``www.example.test``, ``google.com``, ``www.google.com``) answering with the
pod server (agnhost netexec subset; ``/hostname`` = their first name). They route the
pod CIDRs via the nodes (as a ToR router peering with Calico's BGP would), so pods
reach them with their own addresses. The cluster dnsmasq forwards non-cluster names
to that upstream only (``--no-resolv --server=<upstream>``).

Pods resolve as kubelet sets them up (``GetPodDNS``): ``dnsPolicy: ClusterFirst`` ->
``search <ns>.svc.<zone> svc.<zone> <zone>``, ``nameserver <DNS service IP>``,
``options ndots:5``; ``Default`` -> the node's resolver (the upstream); ``None`` ->
``dnsConfig`` only; ``dnsConfig`` merged in all cases; written in containerd's
format to ``/etc/netns/<pod netns>/resolv.conf`` (``ip netns exec`` bind-mounts it).
Nodes and clients resolve through the upstream. :func:`resolver_for` gives a
dnspython resolver reading that same file, whose queries leave from the pod's
namespace.

Differences from CoreDNS, on purpose or forced by dnsmasq:

* pod records exist for existing pods only (CoreDNS ``pods verified``; kubespray's
  ``pods insecure`` answers any ``a-b-c-d`` in an existing namespace), and a pod IP
  that no Service endpoint names gets a PTR to its pod record (CoreDNS would forward
  that PTR query upstream);
* dnsmasq's ``--cname`` target must be known locally, so each ExternalName target
  outside the cluster zone is resolved through the upstream (a real query from a DNS
  pod) at every update and served from the cluster DNS with the CNAME; a direct
  query for that target is then answered from this copy too (same data, TTL 5
  instead of the upstream's);
* answers with several A records keep dnsmasq's order (CoreDNS's ``loadbalance``
  plugin shuffles them);
* CNAME and SRV answers come through the primary's forwarder, so they lack the AA
  flag and may be served from its cache for up to their TTL (5 s) when only the A
  records behind them changed (a new generation clears the cache); the two
  ``*.invalid`` names above exist;
* no SRV records for ExternalName Services, no IPv6, no ``metrics`` port.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import ipaddress
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rdatatype
import dns.resolver

from testbed import endpointslices, netns
from testbed.errors import InputError, KernelError
from testbed.model import PREFIX, Cluster, ContainerPort, Pod

CLUSTER_DOMAIN = "cluster.local"  # kubespray dns_domain
DNS_NAMESPACE = "kube-system"
DNS_NAME = "coredns"  # kubespray names both the Deployment and the Service coredns
DNS_LABELS = {"k8s-app": "kube-dns"}
DNS_IMAGE = "registry.k8s.io/coredns/coredns:v1.11.3"
SCHEMA_VERSION = "1.1.0"  # CoreDNS kubernetes plugin DNSSchemaVersion
TTL = 5  # CoreDNS kubernetes plugin defaultTTL
CACHE_MAX_TTL = 30  # kubespray Corefile: cache 30
FORWARD_MAX = 1000  # kubespray Corefile: forward ... { max_concurrent 1000 }
UPSTREAM_TTL = 300
RELOAD_TIMEOUT = 60.0  # seconds a record change may take before it is an error (the delay itself is measured;
#   thousands of records in the 1-CPU guest kernel under load take seconds)
START_TIMEOUT = 10.0
SERIAL_NAME = "testbed-serial.invalid"
SERIAL_BASE = int(ipaddress.IPv4Address("127.128.0.0"))
GENERATION_NAME = "testbed-generation.invalid"
GENERATION_BASE = int(ipaddress.IPv4Address("127.129.0.0"))
SECONDARY_PORT_BASE = 20000
ETC_NETNS = "/etc/netns"
# kubelet's limits (validation.MaxDNSNameservers / MaxDNSSearchPaths)
MAX_NAMESERVERS = 3
MAX_SEARCHES = 32


# --------------------------------------------------------------------------- system objects


def service_ip(cluster: Cluster) -> str:
    """kubespray's ``skydns_server``: the third address of ``kube_service_addresses``."""
    return str(ipaddress.IPv4Network(cluster.network.service_cidr).network_address + 3)


def system_objects(cluster: Cluster) -> tuple[dict[str, Any], dict[str, Any]]:
    """The DNS Deployment and Service as kubespray deploys them (pure).

    The pod template has no containerPorts: dnsmasq listens on port 53 itself, and the
    pod server only serves pods that declare ports. The Service's ports have no
    ``targetPort`` (it defaults to the number 53, which needs no containerPort).
    Replicas: kubespray's ``dns_min_replicas``, ``min(2, number of nodes)``.
    """
    labels = {**DNS_LABELS, "kubernetes.io/name": "coredns", "addonmanager.kubernetes.io/mode": "Reconcile"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": DNS_NAME, "namespace": DNS_NAMESPACE, "labels": dict(labels)},
        "spec": {
            "replicas": min(2, max(1, len(cluster.nodes))),
            "selector": {"matchLabels": dict(DNS_LABELS)},
            "template": {
                "metadata": {"labels": dict(DNS_LABELS)},
                "spec": {
                    "priorityClassName": "system-cluster-critical",
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "dnsPolicy": "Default",  # CoreDNS itself resolves through the node's resolver
                    "containers": [{"name": "coredns", "image": DNS_IMAGE, "args": ["-conf", "/etc/coredns/Corefile"]}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": DNS_NAME, "namespace": DNS_NAMESPACE, "labels": dict(labels)},
        "spec": {
            "selector": dict(DNS_LABELS),
            "clusterIP": service_ip(cluster),
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            ],
        },
    }
    return deployment, service


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "default", meta.get("name", "")


def add_system_objects(cluster: Cluster) -> list[Pod]:
    """Add the DNS Deployment (its pods placed) and Service to a cluster that is not
    admitted yet; the Service goes first so no other Service is allocated its IP.
    Whichever of the two the topology already declares is kept as declared.
    Returns the DNS pods added."""
    from testbed import workloads

    deployment, service = system_objects(cluster)
    external_hosts(cluster)  # the outside world must fit on the node network: fail before anything is built
    added: list[Pod] = []
    if workloads.find(cluster, "Deployment", DNS_NAMESPACE, DNS_NAME) is None:
        added = workloads.create(cluster, deployment)
    if not any(_key(s) == (DNS_NAMESPACE, DNS_NAME) for s in cluster.services):
        cluster.services.insert(0, service)
    return added


def dns_service(cluster: Cluster) -> dict[str, Any] | None:
    return next((s for s in cluster.services if _key(s) == (DNS_NAMESPACE, DNS_NAME)), None)


def cluster_dns_ip(cluster: Cluster) -> str:
    """The nameserver kubelet gives pods (``--cluster-dns``): the DNS Service's ClusterIP."""
    svc = dns_service(cluster)
    ip = ((svc or {}).get("spec") or {}).get("clusterIP")
    return ip if ip and ip != "None" else service_ip(cluster)


def dns_pods(cluster: Cluster) -> list[Pod]:
    """The pods that run the cluster DNS server: those the DNS Service selects."""
    svc = dns_service(cluster)
    selector = ((svc or {}).get("spec") or {}).get("selector") or DNS_LABELS
    ns = _key(svc)[0] if svc else DNS_NAMESPACE
    return [p for p in cluster.pods if p.namespace == ns and p.ip and all(p.labels.get(k) == v for k, v in selector.items())]


# --------------------------------------------------------------------------- the outside world


@dataclass(frozen=True)
class ExternalHost:
    """A host outside the cluster, on the node network."""

    name: str
    ip: str
    netns: str
    fqdns: tuple[str, ...] = ()
    ports: tuple[tuple[int, str], ...] = ()


UPSTREAM_NAME = "dns-upstream"
EXTERNAL_ZONES = ("example.test", "google.com")
# (name, DNS names (the first is its hostname), ports)
EXTERNAL_WORLD: tuple[tuple[str, tuple[str, ...], tuple[tuple[int, str], ...]], ...] = (
    ("db", ("db.example.test",), ((5432, "TCP"), (80, "TCP"))),
    ("web", ("www.example.test", "google.com", "www.google.com"), ((80, "TCP"), (443, "TCP"), (80, "UDP"))),
)


def _used_node_network_ips(cluster: Cluster) -> set[ipaddress.IPv4Address]:
    used = {ipaddress.IPv4Address(n.ip) for n in cluster.nodes} | {ipaddress.IPv4Address(c.ip) for c in cluster.clients}
    net = ipaddress.IPv4Network(cluster.network.node_subnet)
    used.add(net.network_address + 1)  # the switch's gateway
    for pool in cluster.extra.get("loadBalancerPools", []) or []:
        for a in pool.get("addresses", []):
            try:
                if "-" in a:
                    lo, hi = (ipaddress.IPv4Address(x.strip()) for x in a.split("-", 1))
                    used.update(ipaddress.IPv4Address(i) for i in range(int(lo), int(hi) + 1) if ipaddress.IPv4Address(i) in net)
                else:
                    used.update(h for h in ipaddress.IPv4Network(a, strict=False) if h in net)
                    used.add(ipaddress.IPv4Network(a, strict=False).network_address)
                    used.add(ipaddress.IPv4Network(a, strict=False).broadcast_address)
            except ValueError:
                continue
    return used


def external_hosts(cluster: Cluster) -> list[ExternalHost]:
    """The upstream DNS server first, then the external hosts (pure, deterministic):
    the first free addresses of the node network from ``.2`` up."""
    net = ipaddress.IPv4Network(cluster.network.node_subnet)
    used = _used_node_network_ips(cluster)
    free = (h for h in net.hosts() if h not in used)
    base = f"{PREFIX}{cluster.run_id}-ext-"
    out = []
    try:
        out.append(ExternalHost(UPSTREAM_NAME, str(next(free)), base + UPSTREAM_NAME, (), ((53, "UDP"), (53, "TCP"))))
        for name, fqdns, ports in EXTERNAL_WORLD:
            out.append(ExternalHost(name, str(next(free)), base + name, fqdns, ports))
    except StopIteration:
        raise InputError(
            f'Invalid value: "{net}": no free addresses left for the upstream DNS server and external hosts',
            file=cluster.source or None, field="spec.network.nodeSubnet",
        ) from None
    return out


def upstream(cluster: Cluster) -> ExternalHost:
    return external_hosts(cluster)[0]


def upstream_config(cluster: Cluster) -> str:
    """dnsmasq configuration of the outside world's DNS server (pure): authoritative
    data for the external hosts, NXDOMAIN for any other name (``local=/#/``)."""
    lines = [
        "# testbed: the outside world's DNS server (generated)",
        "no-hosts",
        "no-resolv",
        "local=/#/",
        f"local-ttl={UPSTREAM_TTL}",
        "user=nobody",
        "group=nogroup",
    ]
    for h in external_hosts(cluster)[1:]:
        lines.append(f"host-record={','.join(h.fqdns)},{h.ip}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- records (pure)


@dataclass(frozen=True)
class SRV:
    name: str
    target: str
    port: int
    priority: int = 0
    weight: int = 100


@dataclass
class Records:
    """What the cluster DNS serves. ``hosts``: (address, name) in order; the first name
    written for an address is its PTR."""

    hosts: list[tuple[str, str]] = field(default_factory=list)
    cnames: list[tuple[str, str]] = field(default_factory=list)
    srvs: list[SRV] = field(default_factory=list)
    txts: list[tuple[str, str]] = field(default_factory=list)

    def names(self) -> set[str]:
        return {n for _, n in self.hosts} | {c for c, _ in self.cnames} | {s.name for s in self.srvs} | {t for t, _ in self.txts}


def _ipv4(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).version == 4
    except ValueError:
        return False


def _cluster_ips(svc: dict[str, Any]) -> list[str]:
    spec = svc.get("spec") or {}
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    return [ip for ip in ips if ip != "None" and _ipv4(ip)]


def _is_headless(svc: dict[str, Any]) -> bool:
    return (svc.get("spec") or {}).get("clusterIP") == "None"


def endpoint_hostname(ep: dict[str, Any], address: str) -> str:
    """CoreDNS ``endpointHostname``: the endpoint's hostname, else its address with dashes."""
    return ep.get("hostname") or address.replace(".", "-").replace(":", "-")


def _ready_endpoints(slices: list[dict[str, Any]]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(address, hostname, slice ports) of every ready endpoint in one Service's
    EndpointSlices (:func:`testbed.endpointslices.by_service`), IPv4 only, deduplicated,
    in slice order."""
    out: list[tuple[str, str, list[dict[str, Any]]]] = []
    seen: set[tuple[str, str]] = set()
    ipv4 = (sl for sl in slices if sl.get("addressType", "IPv4") == "IPv4")
    for sl, ep in endpointslices.ready_endpoints(ipv4):
        for addr in ep.get("addresses") or []:
            host = endpoint_hostname(ep, addr)
            if (addr, host) in seen:
                continue
            seen.add((addr, host))
            out.append((addr, host, list(sl.get("ports") or [])))
    return out


def srv_weights(n: int) -> int:
    """CoreDNS SRV weight of each of ``n`` records of equal priority and weight 0:
    ``floor(100.0 / (100 * n) * 100)`` in float64, as backend_lookup.go computes it."""
    return int(math.floor((100.0 / float(100 * n)) * 100))


def records(cluster: Cluster, domain: str = CLUSTER_DOMAIN) -> Records:
    """Every record the cluster DNS serves (pure)."""
    rec = Records()
    seen_hosts: set[tuple[str, str]] = set()

    def host(ip: str, name: str) -> None:
        if (ip, name) not in seen_hosts:
            seen_hosts.add((ip, name))
            rec.hosts.append((ip, name))

    # The synthetic background of an experiment (testbed.synthetic) is for the proxies,
    # as in kube-proxy's own scale benchmarks: it is not published in DNS. Nothing
    # resolves it, and 10k more records would make every sync wait for dnsmasq to load
    # them (~15 s here, minutes in the guest kernel).
    from testbed.synthetic import _is_synthetic

    services = sorted((s for s in cluster.services if not _is_synthetic(s)), key=_key)
    by_service = endpointslices.by_service(cluster.endpointslices)
    endpoint_lines: list[tuple[str, str]] = []
    headless_first: list[tuple[str, str]] = []
    srv_by_name: dict[str, list[tuple[str, int]]] = {}
    for svc in services:
        ns, name = _key(svc)
        spec = svc.get("spec") or {}
        fqdn = f"{name}.{ns}.svc.{domain}"
        if spec.get("type") == "ExternalName":
            target = (spec.get("externalName") or "").rstrip(".")
            if target:
                rec.cnames.append((fqdn, target))
            continue
        headless = _is_headless(svc)
        if not headless and not _cluster_ips(svc):
            continue  # not admitted
        eps = _ready_endpoints(by_service.get((ns, name), []))
        lines = [(addr, f"{h}.{fqdn}") for addr, h, _ in eps]
        (headless_first if headless else endpoint_lines).extend(lines)
        for port in spec.get("ports") or []:
            pname = port.get("name")
            if not pname:
                continue  # unnamed ports have no SRV record
            proto = (port.get("protocol") or "TCP").lower()
            srv_name = f"_{pname}._{proto}.{fqdn}"
            if not headless:
                srv_by_name.setdefault(srv_name, []).append((fqdn, int(port["port"])))
                continue
            for _addr, h, ports in eps:
                for ep_port in ports:
                    if (ep_port.get("name") or "") == pname and (ep_port.get("protocol") or "TCP").lower() == proto:
                        srv_by_name.setdefault(srv_name, []).append((f"{h}.{fqdn}", int(ep_port["port"])))
    # PTR order: headless endpoints, then the ClusterIPs, then other endpoints
    for ip, n in headless_first:
        host(ip, n)
    for svc in services:
        ns, name = _key(svc)
        if (svc.get("spec") or {}).get("type") == "ExternalName" or _is_headless(svc):
            continue
        for ip in _cluster_ips(svc):
            host(ip, f"{name}.{ns}.svc.{domain}")
    for ip, n in endpoint_lines:
        host(ip, n)
    for svc in services:
        ns, name = _key(svc)
        if _is_headless(svc):
            for addr, _h, _p in _ready_endpoints(by_service.get((ns, name), [])):
                host(addr, f"{name}.{ns}.svc.{domain}")
    for pod in sorted(cluster.pods, key=lambda p: (p.namespace, p.name)):
        if pod.ip and _ipv4(pod.ip):
            host(pod.ip, f"{pod.ip.replace('.', '-')}.{pod.namespace}.pod.{domain}")
    for srv_name, targets in srv_by_name.items():
        w = srv_weights(len(targets))
        rec.srvs.extend(SRV(srv_name, t, p, 0, w) for t, p in targets)
    rec.txts.append((f"dns-version.{domain}", SCHEMA_VERSION))
    return rec


def in_zone(name: str, domain: str = CLUSTER_DOMAIN) -> bool:
    name = name.rstrip(".").lower()
    return name == domain or name.endswith("." + domain)


def external_targets(rec: Records, domain: str = CLUSTER_DOMAIN) -> list[str]:
    """ExternalName targets outside the cluster zone (they need an upstream lookup)."""
    return sorted({t for _, t in rec.cnames if not in_zone(t, domain)})


def render_hosts(rec: Records, serial: int, external: list[tuple[str, str]] = ()) -> str:
    """The hosts file dnsmasq reads from its hostsdir (pure)."""
    out = [f"# testbed cluster DNS records, serial {serial} (generated)"]
    out += [f"{ip} {name}" for ip, name in rec.hosts]
    out += [f"{ip} {name}" for ip, name in external]
    out.append(f"{ipaddress.IPv4Address(SERIAL_BASE + serial)} {SERIAL_NAME}")
    return "\n".join(out) + "\n"


def serial_address(serial: int) -> str:
    return str(ipaddress.IPv4Address(SERIAL_BASE + serial))


def generation_address(gen: int) -> str:
    return str(ipaddress.IPv4Address(GENERATION_BASE + gen))


def secondary_port(gen: int) -> int:
    """The loopback port of the record-set generation ``gen`` (two live at once at most)."""
    return SECONDARY_PORT_BASE + gen % 1000


def render_primary_config(upstream_ip: str, hostsdir: str, servers_file: str, domain: str = CLUSTER_DOMAIN) -> str:
    """The configuration of the dnsmasq answering on port 53 of a DNS pod (pure).
    Static for the whole run: A/PTR records come from ``hostsdir`` (inotify), and the
    names of CNAME/SRV records are routed by ``servers_file`` (re-read on SIGHUP) to
    the generation's secondary dnsmasq on a loopback port."""
    lines = [
        "# testbed cluster DNS: CoreDNS's kubernetes plugin emulated by dnsmasq (generated)",
        "no-hosts",
        "no-resolv",
        f"server={upstream_ip}",  # forward . <upstream>
        f"local=/{domain}/",  # authoritative for the zone: unknown names are NXDOMAIN
        f"hostsdir={hostsdir}",
        f"servers-file={servers_file}",
        f"local-ttl={TTL}",
        f"max-cache-ttl={CACHE_MAX_TTL}",
        f"dns-forward-max={FORWARD_MAX}",
        "user=nobody",
        "group=nogroup",
        f"txt-record=dns-version.{domain},{SCHEMA_VERSION}",
    ]
    return "\n".join(lines) + "\n"


def render_secondary_config(rec: Records, hostsdir: str, gen: int) -> str:
    """The configuration of generation ``gen``'s secondary dnsmasq (pure): the CNAME
    and SRV records (dnsmasq only takes them from its configuration), answering on
    127.0.0.1 only; it reads the same hosts so CNAME targets and SRV targets resolve
    in the same answer; any other name is NXDOMAIN."""
    lines = [
        f"# testbed cluster DNS: CNAME/SRV records, generation {gen} (generated)",
        "no-hosts",
        "no-resolv",
        "local=/#/",
        f"port={secondary_port(gen)}",
        "listen-address=127.0.0.1",
        "bind-interfaces",
        f"hostsdir={hostsdir}",
        f"local-ttl={TTL}",
        "user=nobody",
        "group=nogroup",
        f"host-record={GENERATION_NAME},{generation_address(gen)}",
    ]
    lines += [f"cname={name},{target},{TTL}" for name, target in rec.cnames]
    lines += [f"srv-host={s.name},{s.target},{s.port},{s.priority},{s.weight}" for s in rec.srvs]
    return "\n".join(lines) + "\n"


def secondary_records(rec: Records) -> str:
    """What decides a new generation: the CNAME and SRV records, nothing else."""
    return "\n".join([*(f"{n} {t}" for n, t in rec.cnames), *(f"{s.name} {s.target} {s.port} {s.weight}" for s in rec.srvs)])


def render_servers_file(rec: Records, gen: int) -> str:
    """The primary's servers-file (pure): every CNAME/SRV name -> the secondary."""
    port = secondary_port(gen)
    names = sorted({n for n, _ in rec.cnames} | {s.name for s in rec.srvs} | {GENERATION_NAME})
    return "".join(f"server=/{n}/127.0.0.1#{port}\n" for n in names)


# --------------------------------------------------------------------------- resolv.conf (pure)


def _omit_duplicates(items: list[str]) -> list[str]:
    seen: set[str] = set()
    return [i for i in items if not (i in seen or seen.add(i))]


def _merge_options(existing: list[str], extra: list[dict[str, Any]]) -> list[str]:
    """kubelet ``mergeDNSOptions``: by name, later values override, order kept."""
    order: list[str] = []
    values: dict[str, str | None] = {}
    for opt in existing:
        name, _, value = opt.partition(":")
        if name not in values:
            order.append(name)
        values[name] = value if _ else None
    for opt in extra:
        name = opt.get("name") or ""
        if not name:
            continue
        if name not in values:
            order.append(name)
        values[name] = None if opt.get("value") is None else str(opt.get("value"))
    return [n if values[n] is None else f"{n}:{values[n]}" for n in order]


def pod_spec(cluster: Cluster, pod: Pod) -> dict[str, Any]:
    """The pod's spec as its workload's template (or the bare Pod manifest) gives it."""
    for w in cluster.workloads:
        ns, name = _key(w)
        if ns != pod.namespace:
            continue
        if pod.owner_kind is None and w.get("kind") == "Pod" and name == pod.name:
            return w.get("spec") or {}
        if w.get("kind") == pod.owner_kind and name == pod.owner_name:
            return ((w.get("spec") or {}).get("template") or {}).get("spec") or {}
    return {}


def host_dns(cluster: Cluster) -> tuple[list[str], list[str], list[str]]:
    """The node's own resolver (kubelet ``--resolv-conf``): the outside world's DNS."""
    return [upstream(cluster).ip], [], []


def pod_dns(cluster: Cluster, pod: Pod, domain: str = CLUSTER_DOMAIN) -> tuple[list[str], list[str], list[str]]:
    """kubelet ``GetPodDNS``: (nameservers, searches, options)."""
    spec = pod_spec(cluster, pod)
    policy = spec.get("dnsPolicy") or "ClusterFirst"
    servers, searches, options = host_dns(cluster)  # Default (and ClusterFirst on the host network)
    if policy == "None":
        servers, searches, options = [], [], []
    elif policy == "ClusterFirstWithHostNet" or (policy == "ClusterFirst" and not spec.get("hostNetwork")):
        servers = [cluster_dns_ip(cluster)]
        searches = _omit_duplicates([f"{pod.namespace}.svc.{domain}", f"svc.{domain}", domain, *searches])
        options = ["ndots:5"]
    cfg = spec.get("dnsConfig") or {}
    if cfg:
        servers = _omit_duplicates([*servers, *(cfg.get("nameservers") or [])])
        searches = _omit_duplicates([*searches, *(cfg.get("searches") or [])])
        options = _merge_options(options, cfg.get("options") or [])
    return servers[:MAX_NAMESERVERS], searches[:MAX_SEARCHES], options


def render_resolv_conf(servers: list[str], searches: list[str], options: list[str]) -> str:
    """resolv.conf as containerd writes it for a pod sandbox."""
    text = ""
    if searches:
        text += f"search {' '.join(searches)}\n"
    for s in servers:
        text += f"nameserver {s}\n"
    if options:
        text += f"options {' '.join(options)}\n"
    return text


def resolv_conf(cluster: Cluster, pod: Pod) -> str:
    return render_resolv_conf(*pod_dns(cluster, pod))


def resolv_conf_path(netns_name: str) -> str:
    return os.path.join(ETC_NETNS, netns_name, "resolv.conf")


def _atomic_write(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_resolv_confs(cluster: Cluster) -> list[str]:
    """Write ``/etc/netns/<netns>/resolv.conf`` for every pod (kubelet's view), node,
    client and external host (the outside world's DNS); remove those of this run's
    pods that no longer exist. Returns the files written."""
    written = []
    node_text = render_resolv_conf(*host_dns(cluster))
    for pod in cluster.pods:
        if pod.netns:
            p = resolv_conf_path(pod.netns)
            _atomic_write(p, resolv_conf(cluster, pod))
            written.append(p)
    others = [n.netns for n in cluster.nodes] + [c.netns for c in cluster.clients] + [h.netns for h in external_hosts(cluster)]
    for ns in others:
        if ns:
            p = resolv_conf_path(ns)
            _atomic_write(p, node_text)
            written.append(p)
    if cluster.run_id:
        keep = {p.netns for p in cluster.pods}
        prefix = f"{PREFIX}{cluster.run_id}-pod-"
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(ETC_NETNS):
                if name.startswith(prefix) and name not in keep:
                    shutil.rmtree(os.path.join(ETC_NETNS, name), ignore_errors=True)
    return written


class PodResolver(dns.resolver.Resolver):
    """A dnspython resolver configured from a pod's resolv.conf whose queries leave
    from the pod's network namespace (its sockets are opened inside it)."""

    def __init__(self, netns_name: str, resolv_conf_text: str):
        super().__init__(configure=False)
        self.netns = netns_name
        self.read_resolv_conf(io.StringIO(resolv_conf_text))
        self.use_search_by_default = True  # the glibc stub applies the search list
        attempts = 2  # glibc RES_DFLRETRY
        for line in resolv_conf_text.splitlines():
            if line.startswith("options"):
                for opt in line.split()[1:]:
                    if opt.startswith("attempts:"):
                        with contextlib.suppress(ValueError):
                            attempts = int(opt.split(":", 1)[1])
        self.lifetime = float(self.timeout) * max(1, attempts) * (len(self.search) + 1)

    def resolve(self, *args: Any, **kwargs: Any) -> dns.resolver.Answer:  # type: ignore[override]
        with netns.entered(self.netns):
            return super().resolve(*args, **kwargs)


def resolver_for(pod: Pod, cluster: Cluster | None = None) -> PodResolver:
    """A resolver that behaves as the pod's own stub resolver: it reads the pod's
    ``/etc/netns/<netns>/resolv.conf`` (or computes it from ``cluster``)."""
    if cluster is not None:
        text = resolv_conf(cluster, pod)
    else:
        try:
            text = Path(resolv_conf_path(pod.netns)).read_text()
        except FileNotFoundError:
            raise KernelError(f"pod {pod.key} has no resolv.conf ({resolv_conf_path(pod.netns)}): is the cluster DNS started?") from None
    return PodResolver(pod.netns, text)


def address_resolver(pod: Pod, cluster: Cluster | None = None) -> Callable[[str], str]:
    """``name -> first IPv4 address``, resolved as the pod would: the shape of
    :data:`testbed.traffic.Resolver` (resolution timed apart from connect())."""
    res = resolver_for(pod, cluster)

    def resolve(name: str) -> str:
        return next(iter(res.resolve(name, "A"))).address

    return resolve


# --------------------------------------------------------------------------- processes


def dnsmasq_binary() -> str:
    path = shutil.which("dnsmasq", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not path:
        raise KernelError("dnsmasq not found: install Debian's dnsmasq-base (scripts/setup.sh does)")
    return path


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _ours(pid: int, marker: str) -> bool:
    """Is ``pid`` alive and started by us (an argument names ``marker``, a path)?"""
    return bool(pid) and _alive(pid) and any(marker in a for a in _cmdline(pid))


def _kill(pid: int, marker: str, timeout: float = 3.0) -> None:
    """SIGTERM a process we started (checked by its command line), SIGKILL after
    ``timeout``; returns once it has exited (its sockets are closed)."""
    if not _ours(pid, marker):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.0005)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while _alive(pid) and time.monotonic() < deadline + timeout:
            time.sleep(0.001)


def _spawn_dnsmasq(ns: str, conf: Path, pid_file: Path, log: Path) -> int:
    """Start dnsmasq inside namespace ``ns``; it daemonises once its sockets listen
    (the parent's exit status tells whether it could). Returns the daemon's pid."""
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()
    argv = [dnsmasq_binary(), f"--conf-file={conf}", f"--pid-file={pid_file}", f"--log-facility={log}"]
    with netns.entered(ns):
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise KernelError(f"dnsmasq in {ns} did not start within {START_TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        msg = out.decode(errors="replace").strip().splitlines()
        raise KernelError(f"dnsmasq in {ns} failed (exit {proc.returncode}): {msg[-1] if msg else 'no output'}")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            return int(pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            time.sleep(0.001)
    raise KernelError(f"dnsmasq in {ns} wrote no pid file {pid_file}")


def _query(ns: str, server: str, name: str, rdtype: str = "A", timeout: float = 0.2) -> dns.message.Message:
    """One UDP query sent from inside namespace ``ns``."""
    q = dns.message.make_query(name, rdtype)
    with netns.entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)  # dnspython wants a non-blocking socket
    try:
        return dns.query.udp(q, server, timeout=timeout, sock=sock)
    finally:
        sock.close()


# --------------------------------------------------------------------------- lifecycle


@dataclass
class DNSSync:
    """One record update: how it was applied and how long each DNS pod took to serve it."""

    serial: int
    mode: str  # "start" | "inotify" (A/PTR only changed) | "generation" (CNAME/SRV changed: SIGHUP)
    delays: dict[str, float] = field(default_factory=dict)
    records: int = 0
    external_lookup_s: float = 0.0
    generation: int = 0  # of the CNAME/SRV record set

    @property
    def max_delay(self) -> float:
        return max(self.delays.values(), default=0.0)


def dns_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "dns"


@contextlib.contextmanager
def _locked(d: Path) -> Iterator[None]:
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load_state(d: Path) -> dict[str, Any] | None:
    try:
        return json.loads((d / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _save_state(d: Path, st: dict[str, Any]) -> None:
    _atomic_write(d / "state.json", json.dumps(st, indent=1))


def _safe(name: str) -> str:
    return name.replace("/", "_")


def _build_outside_world(cluster: Cluster) -> None:
    """Namespaces of the upstream DNS server and the external hosts, on the switch,
    with a default route to the node network's gateway and a route to every node's
    podCIDR via that node."""
    from testbed import fabric

    plen = ipaddress.IPv4Network(cluster.network.node_subnet).prefixlen
    gateway = fabric.gateway_ip(cluster)
    with fabric.rtnl(cluster.switch_netns) as sw:
        br0 = sw.link_lookup(ifname="br0")[0]
        for i, h in enumerate(external_hosts(cluster)):
            if netns.exists(h.netns):
                continue
            netns.create(h.netns)
            # a fresh name: the switch end of a previous incarnation may linger while
            # the kernel frees its namespace (asynchronously)
            fabric._veth_into(sw, f"x{secrets.token_hex(3)}{i}", h.netns, br0)
            with fabric.rtnl(h.netns) as ipr:
                # a MAC derived from the address: the nodes' neighbour caches stay valid
                # if the host is re-created (stop, start)
                ipr.link("set", index=fabric.ETH0_INDEX, address=fabric.mac_for(h.ip))
            fabric._setup_endpoint(h.netns, h.ip, plen, gateway)
            with fabric.rtnl(h.netns) as ipr:
                for node in cluster.nodes:
                    ipr.route("add", dst=node.pod_cidr, gateway=node.ip)


def _external_cluster(cluster: Cluster) -> Cluster:
    """The external hosts as pods of a pseudo-cluster the pod server can serve."""
    pods = [
        Pod(namespace="external", name=h.name, node="", ip=h.ip, hostname=h.fqdns[0], netns=h.netns,
            ports=[ContainerPort(port=p, protocol=proto) for p, proto in h.ports])  # type: ignore[arg-type]
        for h in external_hosts(cluster)[1:]
    ]
    return Cluster(name=f"{cluster.name}-external", run_id=cluster.run_id, pods=pods)


def _start_external_server(cluster: Cluster, d: Path) -> int:
    ext = d / "external"
    ext.mkdir(parents=True, exist_ok=True)
    cfile = ext / "cluster.json"
    _atomic_write(cfile, _external_cluster(cluster).model_dump_json(indent=1))
    from testbed import podserver

    return podserver.spawn(cfile, ext / "podserver.sock", ext / "podserver.log", timeout=START_TIMEOUT * 3,
                           what="external hosts' servers")


def _resolve_external(cluster: Cluster, pods: list[Pod], targets: list[str]) -> list[tuple[str, str]]:
    """A records of ExternalName targets, asked from a DNS pod to the upstream (a real
    query across the node network, as CoreDNS's upstream lookup is)."""
    if not targets:
        return []
    up = upstream(cluster).ip
    ns = pods[0].netns if pods else upstream(cluster).netns
    out: list[tuple[str, str]] = []
    for name in targets:
        try:
            r = _query(ns, up, name, "A", timeout=1.0)
        except (dns.exception.DNSException, OSError):
            continue
        for rrset in r.answer:
            if rrset.rdtype == dns.rdatatype.A:
                out.extend((rd.address, name) for rd in rrset)
    return out


def _write_hosts(d: Path, text: str) -> None:
    """Replace the hosts file atomically (rename within one filesystem: dnsmasq's
    inotify sees one IN_MOVED_TO and reads the whole new file)."""
    tmp = d / "cluster" / "records.tmp"
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, d / "cluster" / "hosts" / "records")


def _primary_conf(d: Path) -> Path:
    return d / "cluster" / "dnsmasq.conf"


def _secondary_conf(d: Path, gen: int) -> Path:
    return d / "cluster" / f"secondary-{gen}.conf"


def _answers(ns: str, serial: int, gen: int) -> bool:
    """Does the DNS server on port 53 of ``ns`` serve hosts serial ``serial`` and
    route CNAME/SRV names to generation ``gen``?"""
    try:
        for name, want in ((SERIAL_NAME, serial_address(serial)), (GENERATION_NAME, generation_address(gen))):
            r = _query(ns, "127.0.0.1", name, timeout=0.05)
            if not any(rd.to_text() == want for rrset in r.answer for rd in rrset):
                return False
    except (dns.exception.DNSException, OSError):
        return False
    return True


def _wait_serial(pods: list[Pod], serial: int, gen: int, t0: float, timeout: float = RELOAD_TIMEOUT) -> dict[str, float]:
    """Poll every DNS pod until it serves ``serial``/``gen``; each one's delay since ``t0``."""
    delays: dict[str, float] = {}
    waiting = list(pods)
    deadline = t0 + timeout
    while waiting:
        for pod in list(waiting):
            if _answers(pod.netns, serial, gen):
                delays[pod.key] = time.perf_counter() - t0
                waiting.remove(pod)
        if waiting:
            if time.perf_counter() > deadline:
                raise KernelError(
                    f"cluster DNS in {waiting[0].key} did not serve record serial {serial} (generation {gen}) "
                    f"within {timeout:.0f} s (its logs are in the run directory, dns/cluster/)"
                )
            time.sleep(0.0005)
    return delays


def start(cluster: Cluster, run_dir: str | Path) -> DNSSync:
    """Bring the cluster DNS up: the outside world (upstream DNS + external hosts),
    dnsmasq in every DNS pod, resolv.conf files. Idempotent: a started DNS is updated."""
    d = dns_dir(run_dir)
    with _locked(d):
        st = _load_state(d)
        if st is not None:
            return _apply(cluster, d, st)
        try:
            for sub in ("cluster/hosts", "upstream", "external"):
                (d / sub).mkdir(parents=True, exist_ok=True)
            for p in (d, d / "cluster", d / "cluster" / "hosts", d / "upstream"):
                os.chmod(p, 0o755)  # dnsmasq reads them as nobody
            st = {"serial": 0, "gen": 0, "records": None, "instances": {}, "upstream_pid": 0, "external_pid": 0}
            _save_state(d, st)
            _build_outside_world(cluster)
            up = upstream(cluster)
            _atomic_write(d / "upstream" / "dnsmasq.conf", upstream_config(cluster))
            st["upstream_pid"] = _spawn_dnsmasq(
                up.netns, d / "upstream" / "dnsmasq.conf", d / "upstream" / "dnsmasq.pid", d / "upstream" / "dnsmasq.log"
            )
            _save_state(d, st)
            st["external_pid"] = _start_external_server(cluster, d)
            _save_state(d, st)
            _atomic_write(_primary_conf(d), render_primary_config(up.ip, str(d / "cluster" / "hosts"), str(d / "cluster" / "servers")))
            return _apply(cluster, d, st)
        except BaseException:
            _stop_locked(cluster, d)  # nothing half-built stays behind
            raise


def update(cluster: Cluster, run_dir: str | Path) -> DNSSync | None:
    """Make the running cluster DNS serve the cluster's current records (after apply,
    delete, scale, readiness changes). No-op (None) if it was never started."""
    d = dns_dir(run_dir)
    if _load_state(d) is None:
        return None
    with _locked(d):
        st = _load_state(d)
        if st is None:
            return None
        return _apply(cluster, d, st)


def sync(cluster: Cluster, run_dir: str | Path) -> DNSSync:
    """Start the cluster DNS, or update it if it runs."""
    return start(cluster, run_dir)


def _apply(cluster: Cluster, d: Path, st: dict[str, Any]) -> DNSSync:
    """Serve the cluster's current records in every DNS pod, without a moment in which
    port 53 does not answer:

    * A/PTR only changed: replace the hosts file (inotify; no signal);
    * CNAME/SRV changed: start the next generation's secondary dnsmasq beside the old
      one, point the servers-file at it, SIGHUP the primaries (they re-read the
      servers-file and hosts and drop their cache), then stop the old secondaries.
    """
    primary = _primary_conf(d)
    write_resolv_confs(cluster)
    pods = dns_pods(cluster)
    wanted = {p.key: p for p in pods}
    instances: dict[str, dict[str, Any]] = st["instances"]
    for key in [k for k, inst in instances.items() if k not in wanted or inst["netns"] != wanted[k].netns]:
        inst = instances.pop(key)  # DNS pod gone: its dnsmasq would keep the namespace alive
        _kill(inst["pid"], str(primary))
        _kill(inst.get("secondary_pid", 0), str(_secondary_conf(d, inst.get("gen", 0))))
    serial = int(st["serial"]) + 1
    rec = records(cluster)
    t = time.perf_counter()
    external = _resolve_external(cluster, pods, external_targets(rec))
    lookup = time.perf_counter() - t
    hosts = render_hosts(rec, serial, external)
    sec_hash = hashlib.sha256(secondary_records(rec).encode()).hexdigest()
    new_gen = sec_hash != st.get("records")
    gen = int(st["gen"]) + 1 if new_gen else int(st["gen"])
    t0 = time.perf_counter()
    old_secondaries: list[tuple[int, int]] = []
    if new_gen:
        _atomic_write(_secondary_conf(d, gen), render_secondary_config(rec, str(d / "cluster" / "hosts"), gen))
    _write_hosts(d, hosts)  # the secondaries read it at start for CNAME/SRV targets
    started = False
    for pod in pods:
        inst = instances.setdefault(pod.key, {"netns": pod.netns, "pid": 0, "secondary_pid": 0, "gen": 0})
        if inst.get("gen") != gen or not _ours(inst.get("secondary_pid", 0), str(_secondary_conf(d, gen))):
            if inst.get("secondary_pid"):
                old_secondaries.append((inst["secondary_pid"], inst.get("gen", 0)))
            base = d / "cluster" / _safe(pod.key)
            inst["secondary_pid"] = _spawn_dnsmasq(
                pod.netns, _secondary_conf(d, gen), Path(f"{base}.secondary-{gen}.pid"), Path(f"{base}.secondary.log")
            )
            inst["gen"] = gen
            _save_state(d, st)
    if new_gen:
        _atomic_write(d / "cluster" / "servers", render_servers_file(rec, gen))
    for pod in pods:
        inst = instances[pod.key]
        if _ours(inst["pid"], str(primary)):
            if new_gen:
                os.kill(inst["pid"], signal.SIGHUP)
        else:
            pid_file, log = _instance_paths(d, pod)
            inst["pid"] = _spawn_dnsmasq(pod.netns, primary, pid_file, log)
            started = True
            _save_state(d, st)
    st["records"] = sec_hash
    st["gen"] = gen
    _save_state(d, st)
    delays = _wait_serial(pods, serial, gen, t0)
    st["serial"] = serial
    _save_state(d, st)
    for pid, old_gen in old_secondaries:
        _kill(pid, str(_secondary_conf(d, old_gen)))
    if new_gen:  # every older generation has stopped: drop its files
        for stale in (d / "cluster").glob("*.secondary-*.pid"):
            if not stale.name.endswith(f".secondary-{gen}.pid"):
                stale.unlink(missing_ok=True)
        for stale in (d / "cluster").glob("secondary-*.conf"):
            if stale.name != f"secondary-{gen}.conf":
                stale.unlink(missing_ok=True)
    mode = "start" if started else ("generation" if new_gen else "inotify")
    n = len(rec.hosts) + len(rec.cnames) + len(rec.srvs) + len(rec.txts) + len(external)
    return DNSSync(serial, mode, delays, n, lookup, gen)


def _instance_paths(d: Path, pod: Pod) -> tuple[Path, Path]:
    return d / "cluster" / f"{_safe(pod.key)}.pid", d / "cluster" / f"{_safe(pod.key)}.log"


def stop(cluster: Cluster, run_dir: str | Path) -> None:
    """Stop every DNS process of the run and remove the outside world's namespaces
    (idempotent). ``testbed clean`` does the same after a crash."""
    d = dns_dir(run_dir)
    if not d.exists():
        return
    with _locked(d):
        _stop_locked(cluster, d)


def _stop_locked(cluster: Cluster, d: Path) -> None:
    st = _load_state(d) or {}
    for inst in (st.get("instances") or {}).values():
        _kill(inst.get("pid", 0), str(_primary_conf(d)))
        _kill(inst.get("secondary_pid", 0), str(_secondary_conf(d, inst.get("gen", 0))))
    _kill(st.get("upstream_pid", 0), str(d / "upstream" / "dnsmasq.conf"))
    _kill(st.get("external_pid", 0), str(d / "external" / "cluster.json"))
    if cluster.run_id:
        for h in external_hosts(cluster):
            netns.delete(h.netns)
            shutil.rmtree(os.path.join(ETC_NETNS, h.netns), ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (d / "state.json").unlink()


__all__ = [
    "CLUSTER_DOMAIN", "DNSSync", "address_resolver", "ExternalHost", "PodResolver", "Records", "SRV",
    "add_system_objects", "cluster_dns_ip", "dns_pods", "external_hosts", "records", "render_hosts", "render_primary_config",
    "render_secondary_config", "render_servers_file",
    "resolv_conf", "resolver_for", "service_ip", "start", "stop", "sync", "system_objects",
    "update", "upstream", "upstream_config", "write_resolv_confs",
]

