"""Bringing a cluster up and down: topology -> state dir -> fabric -> pod servers.

The order makes every step recoverable: the run directory (with the run id) is
written before the first namespace exists, the pod server's pid is recorded as soon
as it is spawned, and any failure or interruption tears the run down before the
error propagates. ``testbed clean`` covers what a ``kill -9`` leaves.
"""

from __future__ import annotations

import os
import secrets

from testbed import clean, fabric, state
from testbed.errors import InputError, KernelError, StateError
from testbed.fabric import Progress
from testbed.model import Cluster

PODSERVER_READY_TIMEOUT = 120.0


def new_run_id() -> str:
    """6 hex digits: short enough for names, random so a new run never reuses the
    namespace names of one the kernel is still tearing down."""
    return secrets.token_hex(3)


def up(cluster: Cluster, progress: Progress | None = None) -> Cluster:
    if cluster.name in state.names():
        info = state.load_info(cluster.name)
        raise StateError(
            f"cluster {cluster.name!r} is already up (run {info.run_id if info else '?'}): "
            "run `testbed down` first (or `testbed clean` after a crash)"
        )
    cluster.assign_netns(new_run_id())
    info = state.RunInfo(name=cluster.name, run_id=cluster.run_id, builder_pid=os.getpid(), topology=cluster.source)
    state.create(info)
    try:
        state.save_cluster(cluster)
        fabric.build(cluster, progress)
        info.podserver_pid = start_podserver(cluster, info)
        sync_proxies(cluster, full=True)
        from testbed import dns

        record_dns_sync(cluster, dns.start(cluster, state.run_dir(cluster.name)))  # cluster DNS + the outside world
        state.save_cluster(cluster)
        info.phase = "up"
        state.save_info(info)
    except BaseException:
        clean.clean(cluster.run_id)
        raise
    return cluster


def proxy_settings(cluster: Cluster) -> dict:
    return cluster.extra.setdefault("proxy", {"mode": "iptables", "backend": "nft"})


def sync_proxies(cluster: Cluster, full: bool = False, parallel: bool = True) -> list:
    """kube-proxy on every node, then the load-balancer announcements; saves state.
    ``parallel=False``: the nodes' kube-proxies one after another (see
    :func:`testbed.kubeproxy.sync_all`)."""
    from testbed import controlplane, kubeproxy, loadbalancer

    settings = proxy_settings(cluster)
    results = kubeproxy.sync_all(cluster, controlplane.objects(cluster), settings, state.run_dir(cluster.name), full=full,
                                 parallel=parallel)
    loadbalancer.announce(cluster)
    from testbed import dns

    record_dns_sync(cluster, dns.update(cluster, state.run_dir(cluster.name)))  # records follow every change
    cluster.extra["lastSync"] = [r.__dict__ for r in results]
    state.save_cluster(cluster)
    return results


def record_dns_sync(cluster: Cluster, dsync) -> None:  # noqa: ANN001 - dns.DNSSync | None
    """Keep the last DNS record update in the cluster state: which serial, how it was
    applied and how long the slowest DNS pod took to serve it (None: DNS not started)."""
    if dsync is not None:
        cluster.extra["lastDNSSync"] = {"serial": dsync.serial, "mode": dsync.mode, "records": dsync.records,
                                        "generation": dsync.generation, "max_delay_s": round(dsync.max_delay, 6)}


def start_podserver(cluster: Cluster, info: state.RunInfo) -> int:
    """Spawn the one process that serves every pod; wait until all sockets listen."""
    from testbed import podserver

    if not any(p.ports for p in cluster.pods):
        return 0

    def record(pid: int) -> None:
        info.podserver_pid = pid
        state.save_info(info)

    return podserver.spawn(state.cluster_file(cluster.name), state.control_socket(cluster.name),
                           state.log_file(cluster.name), timeout=PODSERVER_READY_TIMEOUT, on_spawn=record)


def down(name: str) -> clean.CleanReport:
    """Stop the pod servers, delete the run's namespaces and its state (idempotent)."""
    info = state.load_info(name)
    if info is None:
        state.remove(name)
        return clean.CleanReport(run_dirs=[name])
    info.phase = "stopping"
    state.save_info(info)
    return clean.clean(info.run_id)


def _podserver_alive(info: state.RunInfo) -> bool:
    return bool(info.podserver_pid) and clean.is_podserver(info.podserver_pid)


def change_pods(cluster: Cluster, added: list, removed: list) -> list:
    """Make the kernel and the pod servers follow a changed pod list (the model is
    already changed), then let the EndpointSlice controller and every kube-proxy
    catch up. Order as in Kubernetes: a removed pod leaves the endpoints first (its
    server stops), a new pod joins once its server listens."""
    from testbed import controlplane, podserver

    info = state.load_info(cluster.name)
    if info is None:
        raise StateError(f"cluster {cluster.name!r} has no run state")
    fabric.add_pods(cluster, added)
    try:
        state.save_cluster(cluster)
        if _podserver_alive(info):
            reply = podserver.control(str(state.control_socket(cluster.name)), "reload")
            if "error" in reply or reply.get("errors"):
                raise KernelError(f"pod servers did not take the change: {reply.get('error') or reply.get('errors')}")
        elif any(p.ports for p in cluster.pods):
            info.podserver_pid = start_podserver(cluster, info)
            state.save_info(info)
    except BaseException:
        fabric.remove_pods(added)
        raise
    fabric.remove_pods(removed)
    controlplane.reconcile(cluster)
    return sync_proxies(cluster)


def set_pod_ready(cluster: Cluster, key: str, ready: bool) -> list:
    """Stop or start one pod's server (its sockets close: the endpoint dies, as when a
    container exits) and mark the pod not Ready / Ready; the EndpointSlice controller,
    every kube-proxy and the cluster DNS follow."""
    from testbed import controlplane, podserver

    pod = next((p for p in cluster.pods if p.key == key or p.name == key), None)
    if pod is None:
        raise InputError(f'pods "{key}" not found')
    if not pod.ports:
        raise InputError(f'pod "{pod.key}" has no containerPorts: nothing to stop or start')
    reply = podserver.control(str(state.control_socket(cluster.name)), "start" if ready else "stop", pod=pod.key)
    if "error" in reply:
        raise KernelError(f"pod server: {reply['error']}")
    pod.ready = ready
    controlplane.reconcile(cluster)
    return sync_proxies(cluster)
