"""Workload controllers, emulated: Deployment, ReplicaSet, StatefulSet, DaemonSet and
bare Pods turned into :class:`Pod` objects placed on nodes — at ``up``, and again when
a live cluster is scaled or a manifest applied.

Placement is the default scheduler's spreading on empty nodes: the eligible node
(``nodeName``, ``nodeSelector``) with the fewest pods, ties by node order. Pod IPs are
handed out as the host-local IPAM plugin does: the next free address after the last
one reserved on that node, wrapping around to ``.2`` (``.1`` is the gateway on
``cni0``) — so a deleted pod's IP is not reused at once (a node's neighbour cache
still holds its old MAC for a while). Names are deterministic:
``<deployment>-<pod-template-hash>-<5 chars>``, ``<statefulset>-<ordinal>``,
``<daemonset>-<5 chars>``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from typing import Any

from testbed.errors import InputError
from testbed.model import Cluster, ContainerPort, Pod

KINDS = ("Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet")
SCALABLE = ("Deployment", "StatefulSet", "ReplicaSet")

# kube-controller-manager's SafeEncodeString alphabet (k8s.io/apimachinery/pkg/util/rand):
# used for pod-template-hash and generated name suffixes.
_SAFE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def _safe_encode(digest: bytes, n: int) -> str:
    return "".join(_SAFE_ALPHABET[b % len(_SAFE_ALPHABET)] for b in digest[:n])


def pod_template_hash(template: dict[str, Any]) -> str:
    """A stable pod-template-hash (kube-controller-manager hashes the template too;
    we use sha256 of its canonical JSON, encoded in the same safe alphabet)."""
    return _safe_encode(hashlib.sha256(json.dumps(template, sort_keys=True).encode()).digest(), 10)


def generated_suffix(*parts: str) -> str:
    """A deterministic 5-character generateName suffix."""
    return _safe_encode(hashlib.sha256("/".join(parts).encode()).digest(), 5)


def _container_ports(pod_spec: dict[str, Any]) -> list[ContainerPort]:
    ports: list[ContainerPort] = []
    seen: set[tuple[int, str]] = set()
    for c in pod_spec.get("containers") or []:
        for p in c.get("ports") or []:
            key = (int(p["containerPort"]), p.get("protocol", "TCP"))
            if key in seen:
                continue
            seen.add(key)
            ports.append(ContainerPort(port=key[0], protocol=key[1], name=p.get("name")))
    return ports


def _meta(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "default", meta.get("name", "")


class Scheduler:
    """Least-loaded placement among eligible nodes, ties by node order; lowest free
    pod IP per node. Starts from the cluster's current pods."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.load = {n.name: 0 for n in cluster.nodes}
        self.used: dict[str, set[str]] = {n.name: set() for n in cluster.nodes}
        for p in cluster.pods:
            self.load[p.node] += 1
            self.used[p.node].add(p.ip)

    def place(self, pod_spec: dict[str, Any], what: str, file: str | None) -> str:
        nodes = self.cluster.nodes
        want = pod_spec.get("nodeName")
        if want:
            if want not in self.load:
                raise InputError(f'Invalid value: "{want}": no node of that name in the topology', file=file, field=f"{what}.spec.nodeName")
            return want
        selector = pod_spec.get("nodeSelector") or {}
        eligible = [n for n in nodes if all(n.labels.get(k) == v for k, v in selector.items())]
        if not eligible:
            raise InputError(
                f"0/{len(nodes)} nodes are available: {len(nodes)} node(s) didn't match Pod's node affinity/selector.",
                file=file,
                field=f"{what}.spec.nodeSelector",
            )
        return min(eligible, key=lambda n: self.load[n.name]).name

    def allocate_ip(self, node_name: str, file: str | None) -> str:
        sub = ipaddress.IPv4Network(self.cluster.node(node_name).pod_cidr)
        used = self.used[node_name]
        last_reserved = self.cluster.extra.setdefault("ipamLastReserved", {})
        first, last = 2, sub.num_addresses - 2
        start = int(ipaddress.IPv4Address(last_reserved.get(node_name, str(sub.network_address + 1)))) - int(sub.network_address) + 1
        for k in range(last - first + 1):
            off = first + (start - first + k) % (last - first + 1)
            ip = str(sub.network_address + off)
            if ip not in used:
                used.add(ip)
                self.load[node_name] += 1
                last_reserved[node_name] = ip
                return ip
        raise InputError(
            f"Invalid value: {self.cluster.network.node_prefix}: node {node_name}'s pod CIDR {sub} is too small "
            f"for its {self.load[node_name] + 1} pods",
            file=file,
            field="spec.network.kubeNetworkNodePrefix",
        )


def _new_pod(cluster: Cluster, sched: Scheduler, file: str | None, what: str, ns: str, name: str,
             template: dict[str, Any], owner: tuple[str, str] | None, extra_labels: dict[str, str],
             node: str | None = None, hostname: str | None = None, subdomain: str | None = None) -> Pod:
    pod_spec = template.get("spec") or {}
    if pod_spec.get("hostNetwork"):
        raise InputError("Unsupported value: true: hostNetwork pods are not emulated", file=file, field=f"{what}.spec.hostNetwork")
    if any(p.namespace == ns and p.name == name for p in cluster.pods):
        raise InputError(f'pods "{name}" already exists', file=file, field=what)
    node = node or sched.place(pod_spec, what, file)
    labels = dict((template.get("metadata") or {}).get("labels") or {})
    labels.update(extra_labels)
    pod = Pod(
        namespace=ns, name=name, node=node, ip=sched.allocate_ip(node, file), labels=labels,
        ports=_container_ports(pod_spec), owner_kind=owner[0] if owner else None, owner_name=owner[1] if owner else None,
        hostname=hostname or pod_spec.get("hostname"), subdomain=subdomain or pod_spec.get("subdomain"),
    )
    if cluster.run_id:
        pod.netns = f"tb-{cluster.run_id}-pod-{ns}-{name}"
    cluster.pods.append(pod)
    return pod


def owned(cluster: Cluster, kind: str, ns: str, name: str) -> list[Pod]:
    if kind == "Pod":
        return [p for p in cluster.pods if p.owner_kind is None and p.namespace == ns and p.name == name]
    return [p for p in cluster.pods if p.owner_kind == kind and p.owner_name == name and p.namespace == ns]


def find(cluster: Cluster, kind: str, ns: str, name: str) -> dict[str, Any] | None:
    for w in cluster.workloads:
        if w.get("kind") == kind and _meta(w) == (ns, name):
            return w
    return None


def _pod_name(obj: dict[str, Any], i: int) -> str:
    kind = obj["kind"]
    ns, name = _meta(obj)
    if kind == "StatefulSet":
        return f"{name}-{i}"
    if kind == "Deployment":
        rs = f"{name}-{pod_template_hash((obj.get('spec') or {}).get('template') or {})}"
        return f"{rs}-{generated_suffix(ns, rs, str(i))}"
    return f"{name}-{generated_suffix(ns, name, str(i))}"


def _add_replicas(cluster: Cluster, obj: dict[str, Any], file: str | None, count: int, sched: Scheduler) -> list[Pod]:
    kind = obj["kind"]
    ns, name = _meta(obj)
    spec = obj.get("spec") or {}
    template = spec.get("template") or {}
    what = f"{kind}/{name}"
    taken = {p.name for p in owned(cluster, kind, ns, name)}
    added = []
    i = 0
    while len(added) < count:
        pname = _pod_name(obj, i)
        i += 1
        if pname in taken:
            continue
        if kind == "StatefulSet":
            extra = {"statefulset.kubernetes.io/pod-name": pname, "apps.kubernetes.io/pod-index": str(i - 1)}
            added.append(_new_pod(cluster, sched, file, what, ns, pname, template, (kind, name), extra,
                                  hostname=pname, subdomain=spec.get("serviceName")))
        else:
            extra = {"pod-template-hash": pname.split("-")[-2]} if kind == "Deployment" else {}
            added.append(_new_pod(cluster, sched, file, what, ns, pname, template, (kind, name), extra))
    return added


def create(cluster: Cluster, obj: dict[str, Any], file: str | None = None) -> list[Pod]:
    """Add a workload and its pods to the cluster model; returns the new pods."""
    kind = obj["kind"]
    ns, name = _meta(obj)
    if find(cluster, kind, ns, name) is not None:
        raise InputError(f'{kind.lower()}s.apps "{name}" already exists' if kind != "Pod" else f'pods "{name}" already exists', file=file)
    sched = Scheduler(cluster)
    spec = obj.get("spec") or {}
    cluster.workloads.append(obj)
    try:
        if kind == "Pod":
            return [_new_pod(cluster, sched, file, f"Pod/{name}", ns, name, obj, None, {})]
        if kind == "DaemonSet":
            template = spec.get("template") or {}
            selector = (template.get("spec") or {}).get("nodeSelector") or {}
            return [
                _new_pod(cluster, sched, file, f"DaemonSet/{name}", ns, f"{name}-{generated_suffix(ns, name, n.name)}",
                         template, (kind, name), {}, node=n.name)
                for n in cluster.nodes
                if all(n.labels.get(k) == v for k, v in selector.items())
            ]
        return _add_replicas(cluster, obj, file, int(spec.get("replicas", 1)), sched)
    except BaseException:
        cluster.workloads.remove(obj)
        cluster.pods = [p for p in cluster.pods if not (p.owner_name == name and p.namespace == ns and p.owner_kind == (None if kind == "Pod" else kind))]
        raise


def delete(cluster: Cluster, kind: str, ns: str, name: str) -> list[Pod]:
    """Remove a workload and its pods from the model; returns the removed pods."""
    obj = find(cluster, kind, ns, name)
    if obj is None:
        what = "pods" if kind == "Pod" else f"{kind.lower()}s.apps"
        raise InputError(f'{what} "{name}" not found')
    gone = owned(cluster, kind, ns, name)
    cluster.workloads.remove(obj)
    cluster.pods = [p for p in cluster.pods if p not in gone]
    return gone


def scale(cluster: Cluster, kind: str, ns: str, name: str, replicas: int) -> tuple[list[Pod], list[Pod]]:
    """Set ``spec.replicas``; returns (added pods, removed pods). Scaling down removes
    the highest ordinals (StatefulSet) / the newest replicas (Deployment), as the
    controllers do when all pods are equally ready."""
    if kind not in SCALABLE:
        raise InputError(f'Invalid value: "{kind}": only deployment, statefulset and replicaset can be scaled', field="RESOURCE")
    if replicas < 0:
        raise InputError(f"Invalid value: {replicas}: must be greater than or equal to 0", field="spec.replicas")
    obj = find(cluster, kind, ns, name)
    if obj is None:
        raise InputError(f'{kind.lower()}s.apps "{name}" not found')
    current = owned(cluster, kind, ns, name)
    obj.setdefault("spec", {})["replicas"] = replicas
    if replicas >= len(current):
        return _add_replicas(cluster, obj, None, replicas - len(current), Scheduler(cluster)), []
    if kind == "StatefulSet":
        current.sort(key=lambda p: int(p.name.rsplit("-", 1)[1]))
    gone = current[replicas:]
    cluster.pods = [p for p in cluster.pods if p not in gone]
    return [], gone
