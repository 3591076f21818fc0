"""kube-proxy on every node: the iptables-mode applier (thin; rendering is pure,
in :mod:`testbed.proxy.iptables`).

Mirrors what ``Proxier.syncProxyRules`` does around the rendered buffer
(pkg/proxy/iptables/proxier.go):

* on a full sync it ensures the jump rules from the built-in chains
  (``iptables -C`` then ``-I``, each prepended) and the canary chains;
* it feeds the buffer to ``iptables-restore --noflush --counters`` (with ``-w``), so
  only the chains declared in the buffer are flushed and rewritten; the buffer is
  streamed: the restore reads the filter table while the nat chains and rules are
  still being rendered (:class:`~testbed.proxy.iptables.IPTablesSync`), the bytes are
  the same; a failed restore makes the next sync a full one (``needFullSync``);
* later syncs are partial: only Services whose ServicePorts or endpoints changed get
  their chains rewritten; stale KUBE-SVC/SVL/SEP/FW/EXT chains (found with
  ``iptables-save -t nat``) are flushed and deleted with ``-X``;
* it sets the sysctls kube-proxy sets: ``net.ipv4.conf.all.route_localnet=1`` when
  localhost NodePorts are on, and checks ``nf_conntrack_tcp_be_liberal``.

Each node namespace runs the real tools (``iptables-legacy-restore`` or
``iptables-nft-restore``, chosen per cluster and recorded) spawned from a thread
that is inside the node's namespace.

What differs from a real kube-proxy, on purpose: no nfacct counters are created
(kube-proxy leaves out the ``-m nfacct`` matches when it cannot create them, and so
do we); UDP conntrack entries of removed endpoints are flushed with the ``conntrack``
tool as kube-proxy's conntrack cleanup does over netlink.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

from testbed import netns
from testbed.errors import InputError, KernelError
from testbed.model import Cluster, Node
from testbed.proxy import servicemap
from testbed.proxy.types import Endpoint, ServicePort
from testbed.proxy.iptables import (
    CANARY_CHAIN,
    CANARY_TABLES,
    JUMP_RULES,
    IPTablesConfig,
    IPTablesSync,
)

BACKENDS = ("legacy", "nft")


def tool(backend: str, name: str) -> str:
    """``iptables``/``iptables-save``/``iptables-restore`` of a backend."""
    if backend not in BACKENDS:
        raise InputError(f'Unsupported value: "{backend}": supported values: "legacy", "nft"', field="iptables backend")
    base, _, suffix = name.partition("-")
    return f"{base}-{backend}" + (f"-{suffix}" if suffix else "")


def run_in(ns: str, argv: list[str], input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a real tool inside namespace ``ns`` (no shell; argv as given)."""
    with netns.entered(ns):
        r = subprocess.run(argv, input=input, capture_output=True, text=True)
    return _checked(ns, r) if check else r


def _checked(ns: str, r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``r``, or a KernelError naming the tool, the namespace and its first line of
    complaint."""
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise KernelError(f"{' '.join(r.args[:3])} in {ns} failed (exit {r.returncode}): {msg[0] if msg else ''}")
    return r


#: ``F_SETPIPE_SZ`` (linux/fcntl.h); Python's ``fcntl`` module has it from 3.10 on.
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def stream_in(ns: str, argv: list[str], chunks: Iterable[str],
              meanwhile: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    """Run a real tool inside namespace ``ns`` with ``chunks`` written to its stdin as
    they are made: the tool works on the first while the later ones are being made.

    The calling thread makes the chunks (as fast as it can: Python, under the GIL) and
    hands them to a writer thread, which blocks on the pipe at the tool's pace without
    holding the GIL; then it runs ``meanwhile``. If making a chunk fails, the tool is
    killed before it can read end-of-file, so it never commits a table it has not
    seen whole, and the error is raised."""
    r_fd, w_fd = os.pipe()
    try:
        fcntl.fcntl(w_fd, _F_SETPIPE_SZ, 1 << 20)  # fewer wake-ups; the default max size
    except OSError:
        pass
    try:
        with netns.entered(ns):
            proc = subprocess.Popen(argv, stdin=r_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except BaseException:
        os.close(w_fd)
        raise
    finally:
        os.close(r_fd)
    pending: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    try:
        w = os.fdopen(w_fd, "wb")
    except BaseException:
        os.close(w_fd)
        proc.kill()
        proc.communicate()
        raise

    def write() -> None:
        try:
            while (data := pending.get()) is not None:
                w.write(data)
                w.flush()
        except BrokenPipeError:  # the tool exited early (it says why on stderr)
            while pending.get() is not None:
                pass
        except BaseException:
            proc.kill()  # before the pipe closes: a cut input must not reach end-of-file
            raise
        finally:
            try:
                w.close()  # end-of-file for the tool (if it is still alive)
            except BrokenPipeError:
                pass

    writer = threading.Thread(target=write, name="tool-input", daemon=True)
    try:
        writer.start()
    except BaseException:
        w.close()
        proc.kill()
        proc.communicate()
        raise
    made = False
    try:
        try:
            for chunk in chunks:
                pending.put(chunk.encode())
            made = True
        finally:
            if not made:
                proc.kill()  # before the writer closes the pipe: no end-of-file, no commit
            pending.put(None)
        if meanwhile is not None:
            meanwhile()
        out, err = proc.communicate()  # the tools here print a few lines at most
    except BaseException:  # also Ctrl-C while the tool runs: it does not outlive the call
        proc.kill()
        proc.communicate()
        raise
    finally:
        writer.join()
    return _checked(ns, subprocess.CompletedProcess(argv, proc.returncode, out, err))


def node_config(cluster: Cluster, node: Node, **overrides) -> IPTablesConfig:
    """The kube-proxy configuration of one node, as kubespray deploys it: node name,
    node IP, ``clusterCIDR = kube_pods_subnet`` (local-traffic detection by CIDR)."""
    cfg = IPTablesConfig(
        hostname_override=node.name,
        node_ip=node.ip,
        cluster_cidr=cluster.network.pod_cidr,
        node_addresses=[node.ip, node.pod_gateway, "127.0.0.1"],
        nfacct=False,
        random_fully=True,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@dataclass
class SyncResult:
    """One node's sync. ``render_s``: from the start to the moment the restore starts
    (in iptables mode the maps and the filter pass; the nat chains and rules are
    rendered while the restore reads, so they count in ``apply_s``, which runs until
    the restore has exited)."""

    node: str
    full: bool
    render_s: float
    apply_s: float
    changed_services: int
    nat_rules: int
    filter_rules: int
    deleted_chains: int


_SERVICE_PORT_FIELDS = attrgetter(*ServicePort.__slots__)
#: an Endpoint's fields but ``endpoint`` (``ip:port``, derived from two of them)
_ENDPOINT_FIELDS = attrgetter(*(f for f in Endpoint.__slots__ if f != "endpoint"))


def _endpoint_fields(ep: Endpoint) -> tuple:
    """An Endpoint as a tuple of its fields, hint sets sorted (``repr`` of a frozenset
    depends on the process's string-hash seed)."""
    t = _ENDPOINT_FIELDS(ep)
    if t[-1] is not None or t[-2] is not None:
        t = tuple(tuple(sorted(v)) if isinstance(v, frozenset) else v for v in t)
    return t


def service_fingerprints(services, endpoints) -> dict[str, str]:  # noqa: ANN001
    """``namespace/name`` -> a digest of the Service's ServicePorts and endpoints. Two syncs
    whose digests differ for a Service are what kube-proxy's change trackers report as
    ``UpdatedServices`` (its ServicePorts or its endpoints changed; added or deleted):
    the Services a partial sync rewrites, in every mode. The digest is the same in every
    process, so it can be kept in the state file."""
    groups: dict[tuple[str, str], list] = {}
    for spn, sp in services.items():
        groups.setdefault((spn.namespace, spn.name), []).append((0, spn.port_name, spn.protocol, _SERVICE_PORT_FIELDS(sp)))
    for spn, eps in endpoints.items():
        groups.setdefault((spn.namespace, spn.name), []).append(
            (1, spn.port_name, spn.protocol, tuple(map(_endpoint_fields, eps)))
        )
    b2 = hashlib.blake2b
    return {
        f"{k[0]}/{k[1]}": b2(repr(sorted(v) if len(v) > 1 else v).encode(), digest_size=8).hexdigest()
        for k, v in groups.items()
    }


class IPTablesProxier:
    """kube-proxy (iptables mode) of one node. State between syncs (what was last
    synced, for partial syncs) lives in ``state_file`` so every CLI call continues
    where the previous one stopped, as a long-running kube-proxy would."""

    def __init__(self, cluster: Cluster, node: Node, backend: str, state_file: Path, **config):
        self.cluster = cluster
        self.node = node
        self.backend = backend
        self.state_file = state_file
        self.config = node_config(cluster, node, **config)

    def _load(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def sync(self, objects: list[dict], full: bool = False, maps: tuple | None = None) -> SyncResult:
        """One sync of ``objects`` (Services, EndpointSlices); ``maps``: their
        ``servicemap.build_maps`` when the caller already built them (every node of a
        cluster reads the same objects)."""
        # A sync allocates hundreds of thousands of small objects and frees them
        # together: the cyclic garbage collector's passes in between cost ~10-30 %.
        was = gc.isenabled()
        gc.disable()
        try:
            return self._sync(objects, full, maps)
        finally:
            if was:
                gc.enable()

    def _sync(self, objects: list[dict], full: bool, maps: tuple | None = None) -> SyncResult:
        ns = self.node.netns
        t0 = time.perf_counter()
        services, endpoints = maps if maps is not None else servicemap.build_maps(objects)
        prev = self._load()
        full = full or not prev or prev.get("backend") != self.backend
        prints: dict[str, str] = {}
        changed = None
        if not full:  # a partial sync needs the fingerprints first: they decide what changed
            prints = service_fingerprints(services, endpoints)
            old = prev.get("services", {})
            changed = {tuple(k.split("/", 1)) for k in old.keys() | prints.keys() if old.get(k) != prints.get(k)}
        # One iptables-save: the nat chains (stale-chain cleanup, as kube-proxy's
        # `iptables-save -t nat`) and, on full syncs, which chains and jump rules exist.
        saved = run_in(ns, [tool(self.backend, "iptables-save")] + ([] if full else ["-t", "nat"])).stdout
        self.config.tcp_be_liberal = self._sysctl_int("net/netfilter/nf_conntrack_tcp_be_liberal") != 0
        # Everything but the nat rules is rendered here; the nat rules are formatted
        # while iptables-restore already reads the rest (IPTablesSync).
        sync = IPTablesSync(services, endpoints, self.config, changed=changed, existing_nat_chains=_table(saved, "nat"))
        t1 = time.perf_counter()
        if full:
            self._full_sync_setup(saved)
        # A full sync computes the fingerprints (for the next, partial, sync) while
        # iptables-restore loads the buffer: they only go into the state file.
        try:
            stream_in(ns, [tool(self.backend, "iptables-restore"), "-w", "5", "--noflush", "--counters"], sync.chunks(),
                      meanwhile=(lambda: prints.update(service_fingerprints(services, endpoints))) if full else None)
        except BaseException:
            # kube-proxy sets needFullSync after a failed restore: the next sync is full.
            self.state_file.unlink(missing_ok=True)
            raise
        result = sync.result()
        t2 = time.perf_counter()
        self.state_file.write_text(json.dumps({"backend": self.backend, "services": prints}))
        return SyncResult(
            node=self.node.name, full=full, render_s=t1 - t0, apply_s=t2 - t1,
            changed_services=len(prints) if changed is None else len(changed),
            nat_rules=result.nat_rules_count, filter_rules=result.filter_rules_count,
            deleted_chains=len(result.deleted_nat_chains),
        )

    def live_rules(self, service: str | None = None) -> str:
        """``iptables-save`` of this node (filter + nat), optionally one Service's lines."""
        text = run_in(self.node.netns, [tool(self.backend, "iptables-save")]).stdout
        return filter_service_lines(text, service) if service else text

    def _sysctl_int(self, key: str) -> int:
        try:
            with netns.entered(self.node.netns):
                return int(open(f"/proc/sys/{key}").read().strip())
        except (OSError, ValueError):
            return 0

    def _full_sync_setup(self, saved: str) -> None:
        """What kube-proxy does before the restore of a full sync: ``ipt.Monitor``'s
        canary chains, then for each base-chain jump ``EnsureChain(table, target)`` and
        ``EnsureRule(Prepend, ...)``. kube-proxy checks each rule with ``iptables -C``
        (one process each, and each reads the whole table: ~40 ms apiece at 10k
        Services); we check them all against the ``iptables-save`` taken for this sync
        and create what is missing in one ``iptables-restore --noflush`` whose ``-I``
        lines prepend in the same order, so the end state is the same."""
        ns = self.node.netns
        if self.config.localhost_nodeports:
            with netns.entered(ns):
                netns.sysctl("net.ipv4.conf.all.route_localnet", 1)
        chains = {t: set() for t in ("mangle", "filter", "nat")}
        rules = {t: set() for t in chains}
        table = None
        for line in saved.splitlines():
            if line.startswith("*"):
                table = line[1:].strip()
                chains.setdefault(table, set())
                rules.setdefault(table, set())
            elif table and line.startswith(":"):
                chains[table].add(line[1:].split(" ", 1)[0])
            elif table and line.startswith("-A "):
                rules[table].add(line)
        new_chains: dict[str, list[str]] = {t: [] for t in ("mangle", "filter", "nat")}
        inserts: dict[str, list[str]] = {t: [] for t in new_chains}
        for t in CANARY_TABLES:
            if CANARY_CHAIN not in chains.get(t, ()):
                new_chains[t].append(CANARY_CHAIN)
        for jump in JUMP_RULES:
            if jump.target not in chains.get(jump.table, ()) and jump.target not in new_chains[jump.table]:
                new_chains[jump.table].append(jump.target)
            if _save_form(jump) not in rules.get(jump.table, ()):
                inserts[jump.table].append(_save_form(jump).replace("-A ", "-I ", 1))
        text = "".join(
            f"*{t}\n" + "".join(f":{c} - [0:0]\n" for c in new_chains[t]) + "".join(f"{r}\n" for r in inserts[t]) + "COMMIT\n"
            for t in new_chains if new_chains[t] or inserts[t]
        )
        if text:
            run_in(ns, [tool(self.backend, "iptables-restore"), "-w", "5", "--noflush"], input=text)


def _table(saved: str, name: str) -> str:
    """One table's part of an ``iptables-save`` dump."""
    out, keep = [], False
    for line in saved.splitlines():
        if line.startswith("*"):
            keep = line == f"*{name}"
        if keep:
            out.append(line)
        if keep and line == "COMMIT":
            keep = False
    return "\n".join(out) + "\n"


def _save_form(jump) -> str:  # noqa: ANN001
    """A jump rule as ``iptables-save`` prints it (kube-proxy's argument order; the
    comment quoted)."""
    args = list(jump.args)
    for i, a in enumerate(args[:-1]):
        if a == "--comment" and not args[i + 1].replace("-", "").isalnum():
            args[i + 1] = f'"{args[i + 1]}"'
    return " ".join(["-A", jump.chain, *args])


MODES = ("iptables", "ipvs", "nftables")


def proxier_for(cluster: Cluster, node: Node, settings: dict, state_dir: Path):  # noqa: ANN201
    """kube-proxy of ``node`` in the mode ``settings["mode"]``. Every mode's proxier has
    ``sync(objects, full=False) -> SyncResult`` and ``live_rules(service=None) -> str``."""
    mode = settings.get("mode", "iptables")
    state_file = state_dir / f"kube-proxy-{node.name}.json"
    if mode == "iptables":
        return IPTablesProxier(cluster, node, settings.get("backend", "nft"), state_file)
    if mode == "nftables":
        from testbed.kubeproxy_nftables import NFTablesProxier

        return NFTablesProxier(cluster, node, state_file)
    if mode == "ipvs":
        from testbed.kubeproxy_ipvs import IPVSProxier

        return IPVSProxier(cluster, node, state_file, scheduler=settings.get("scheduler", "rr"))
    raise InputError(f'Unsupported value: "{mode}": supported values: "iptables", "ipvs", "nftables"', field="proxy-mode")


def sync_all(cluster: Cluster, objects: list[dict], settings: dict, state_dir: Path, full: bool = False,
             parallel: bool = True) -> list[SyncResult]:
    """Sync kube-proxy on every node (each node's own view: its name decides which
    endpoints are local), then clean stale UDP conntrack entries as every mode does.

    ``parallel`` (default): every node's kube-proxy at once, as on a real cluster. The
    emulated nodes share this machine's CPUs (and one Python process), so each node's
    sync time then includes waiting for the others; ``parallel=False`` runs them one
    after another, so each node's time is its own, as on a node with its own CPUs (what
    the experiments' sync measurements use)."""
    from testbed import conntrack

    # Every node's kube-proxy works independently, as on a real cluster (in parallel
    # unless the caller times each node alone).
    from concurrent.futures import ThreadPoolExecutor

    # The objects are the same for every node: their maps are built once (under one
    # GIL, building them in every node's thread would cost nodes x as much).
    maps = servicemap.build_maps(objects)
    workers = max(1, len(cluster.nodes)) if parallel else 1
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kube-proxy") as pool:
        futures = [pool.submit(proxier_for(cluster, node, settings, state_dir).sync, objects, full, maps)
                   for node in cluster.nodes]
        results = [f.result() for f in futures]
    services, endpoints = maps
    for node in cluster.nodes:
        conntrack.clean_stale_entries(node.netns, services, endpoints)
    return results


SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")


def filter_service_lines(text: str, service: str) -> str:
    """The lines of an ``iptables-save`` dump that belong to one Service (``ns/name``):
    those naming it in a comment, and every rule of the chains those lines jump to."""
    ns, _, name = service.partition("/")
    lines = text.splitlines()
    keep: list[str] = []
    chains: set[str] = set()
    for line in lines:
        if f"{ns}/{name}:" in line or f'"{ns}/{name} ' in line or f" {ns}/{name} " in line:
            keep.append(line)
            chains.update(tok for tok in line.split() if tok.startswith(SERVICE_CHAIN_PREFIXES))
    for line in lines:
        if line not in keep and any(f" {c} " in f" {line} " for c in chains):
            keep.append(line)
    return "\n".join(keep) + ("\n" if keep else "")
