"""``kubectl apply -f`` / ``kubectl delete -f`` against the emulated cluster, on the
model (pure). Every document is checked before anything changes: the work is done on
a copy of the cluster, which replaces the original only if every document went in,
so a bad manifest leaves the cluster as it was (kube-apiserver's message, exit 2).

Workload template changes are rolled out by replacing the pods (the Recreate
strategy); ``spec.replicas`` changes scale.
"""

from __future__ import annotations

import copy
from typing import Any

from testbed import controlplane, validation, workloads
from testbed.errors import InputError
from testbed.model import Cluster, Pod

_RESOURCE = {
    "Service": "service", "EndpointSlice": "endpointslice.discovery.k8s.io", "Deployment": "deployment.apps",
    "StatefulSet": "statefulset.apps", "DaemonSet": "daemonset.apps", "ReplicaSet": "replicaset.apps",
    "Pod": "pod", "Namespace": "namespace",
}
_PLURAL = {
    "Service": "services", "EndpointSlice": "endpointslices.discovery.k8s.io", "Deployment": "deployments.apps",
    "StatefulSet": "statefulsets.apps", "DaemonSet": "daemonsets.apps", "ReplicaSet": "replicasets.apps",
    "Pod": "pods", "Namespace": "namespaces",
}


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "default", meta.get("name", "")


def _commit(cluster: Cluster, work: Cluster) -> tuple[list[Pod], list[Pod]]:
    before = {(p.key, p.ip): p for p in cluster.pods}
    after = {(p.key, p.ip): p for p in work.pods}
    added = [p for k, p in after.items() if k not in before]
    removed = [p for k, p in before.items() if k not in after]
    for f in type(cluster).model_fields:
        setattr(cluster, f, getattr(work, f))
    return added, removed


def _strip_replicas(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k != "replicas"}


def apply(cluster: Cluster, docs: list[tuple[str, dict[str, Any]]]) -> tuple[list[str], list[Pod], list[Pod]]:
    work = cluster.model_copy(deep=True)
    reg = controlplane.registry(work, existing=work.services)
    lines: list[str] = []
    for file, obj in docs:
        kind = obj.get("kind")
        if kind not in _RESOURCE:
            validation.validate_object(obj, file)  # kubectl's "no matches for kind" message
            raise InputError(f'no matches for kind "{kind}" in version "{obj.get("apiVersion")}"', file=file)
        ns, name = _key(obj)
        res = f"{_RESOURCE[kind]}/{name}"
        if kind == "Namespace":
            validation.validate_object(obj, file)
            lines.append(f"{res} unchanged")
            continue
        if kind == "Service":
            existing = next((i for i, s in enumerate(work.services) if _key(s) == (ns, name)), None)
            if existing is None:
                work.services.append(reg.create(copy.deepcopy(obj), file=file))
                lines.append(f"{res} created")
            else:
                stored = reg.update(copy.deepcopy(obj), file=file)
                changed = stored != work.services[existing]
                work.services[existing] = stored
                lines.append(f"{res} {'configured' if changed else 'unchanged'}")
            continue
        validation.validate_object(obj, file)
        if kind == "EndpointSlice":
            i = next((i for i, s in enumerate(work.endpointslices) if _key(s) == (ns, name)), None)
            if i is None:
                work.endpointslices.append(obj)
                lines.append(f"{res} created")
            else:
                changed = work.endpointslices[i] != obj
                work.endpointslices[i] = obj
                lines.append(f"{res} {'configured' if changed else 'unchanged'}")
            continue
        current = workloads.find(work, kind, ns, name)
        if current is None:
            workloads.create(work, copy.deepcopy(obj), file)
            lines.append(f"{res} created")
        elif current == obj:
            lines.append(f"{res} unchanged")
        elif kind in workloads.SCALABLE and _strip_replicas(current.get("spec") or {}) == _strip_replicas(obj.get("spec") or {}):
            workloads.scale(work, kind, ns, name, int((obj.get("spec") or {}).get("replicas", 1)))
            lines.append(f"{res} configured")
        else:
            workloads.delete(work, kind, ns, name)
            workloads.create(work, copy.deepcopy(obj), file)
            lines.append(f"{res} configured")
    controlplane.reconcile(work)
    added, removed = _commit(cluster, work)
    return lines, added, removed


def delete(cluster: Cluster, docs: list[tuple[str, dict[str, Any]]]) -> tuple[list[str], list[Pod]]:
    work = cluster.model_copy(deep=True)
    reg = controlplane.registry(work, existing=work.services)
    lines: list[str] = []
    for file, obj in docs:
        kind = obj.get("kind")
        ns, name = _key(obj)
        if kind not in _RESOURCE:
            raise InputError(f'no matches for kind "{kind}" in version "{obj.get("apiVersion")}"', file=file)
        notfound = InputError(f'{_PLURAL[kind]} "{name}" not found', file=file)
        if kind == "Service":
            if not any(_key(s) == (ns, name) for s in work.services):
                raise notfound
            reg.delete(ns, name)
            work.services = [s for s in work.services if _key(s) != (ns, name)]
        elif kind == "EndpointSlice":
            if not any(_key(s) == (ns, name) for s in work.endpointslices):
                raise notfound
            work.endpointslices = [s for s in work.endpointslices if _key(s) != (ns, name)]
        elif kind == "Namespace":
            raise InputError(f'Forbidden: deleting namespaces is not emulated: namespace "{name}"', file=file)
        else:
            if workloads.find(work, kind, ns, name) is None:
                raise notfound
            workloads.delete(work, kind, ns, name)
        lines.append(f'{_RESOURCE[kind]} "{name}" deleted')
    controlplane.reconcile(work)
    _added, removed = _commit(cluster, work)
    return lines, removed
