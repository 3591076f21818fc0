"""kube-proxy on every node: the nftables-mode applier (thin; rendering is pure, in
:mod:`testbed.proxy.nftables`).

Mirrors what ``Proxier.syncProxyRules`` of ``pkg/proxy/nftables/proxier.go`` (``531be812``)
does around the transaction it builds, with ``nft`` run inside the node's namespace
(knftables runs ``nft -f -`` the same way):

* before each sync it lists the table's chain names (``nft -j list chains ip``, knftables
  ``List("chain")``) and set names (``nft -t -j list sets ip``: ``List("sets")``; ``-t``
  leaves out the elements -- 10,000 anonymous vmaps make the full listing take seconds);
  on a full sync it also reads the elements of the six sets/maps it reconciles
  (``nft -j list set|map ip kube-proxy NAME``: ``ListElements`` in ``readOrReset``); on a
  partial sync it uses what it remembered from the last sync, as kube-proxy does;
* stale service/endpoint chains flushed by an earlier sync at least one second ago are
  deleted first, in their own transaction; if that fails the sync becomes a full one;
* the sync's transaction goes to ``nft -f -`` in one piece (atomic); when it fails the
  next sync is a full one and the stale-chain bookkeeping is dropped, as kube-proxy does;
* the first sync (and one every ``FullSyncPeriod``, an hour) is full; later ones are
  partial: only Services whose ServicePorts or endpoints changed get their chains
  rewritten, every set/map element is reconciled.

Load time, measured here (kernel 6.18, nft 1.0.6; ``benchmarks/bench_nftables.py``): one
transaction of N Services x 3 endpoints takes ``nft -f`` about 0.3 s for 1k, 5-7 s for 5k
and 25-28 s for 10k Services, almost all of it kernel time, growing faster than the
transaction: every rule's anonymous ``numgen ... vmap`` set is resolved within the
transaction being built, at a cost that grows with the operations already in it. The same
operations in ~10,000-operation ``nft -f`` runs (``max_transaction_ops``) load 10k Services
in ~11 s, but a table loaded that way was briefly half-loaded; kube-proxy never does that, so
it is opt-in. A full resync of an already-populated table (every chain flushed and
re-filled) costs about twice the first load; partial syncs cost what their few operations
cost plus the listing (~0.3-1 s at 10k Services).

What a long-running kube-proxy keeps in memory between syncs (the stale chains and when
they went stale, whether it has synced and set up its base chains, the element storages,
the per-Service fingerprints that decide a partial sync) lives in ``state_file``, so each
CLI call continues where the previous one stopped. No health-check node ports are served
and no metrics exported; stale UDP conntrack entries are cleaned by
:func:`testbed.kubeproxy.sync_all` for every mode.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from testbed.errors import KernelError
from testbed.kubeproxy import SyncResult, run_in, service_fingerprints
from testbed.model import Cluster, Node
from testbed.proxy import servicemap
from testbed.proxy.nft_normalize import dump_from_nft_list
from testbed.proxy.nftables import (
    ELEMENT_CONTAINERS,
    TABLE,
    KernelState,
    NFTablesConfig,
    kernel_state_from_nft_json,
    render_nftables_sync,
)

#: ``proxyutil.FullSyncPeriod``: a partial-sync proxier still does a full sync this often.
FULL_SYNC_PERIOD_S = 3600.0

STATE_MODE = "nftables"


def node_config(cluster: Cluster, node: Node, **overrides) -> NFTablesConfig:
    """The nftables kube-proxy configuration of one node, as kubespray deploys it:
    node name, node IP, ``clusterCIDR = kube_pods_subnet`` (local-traffic detection by
    CIDR), ``--nodeport-addresses`` unset (match every local address), the masquerade bit
    14, and the cluster's one ServiceCIDR (``kube_service_addresses``)."""
    cfg = NFTablesConfig(
        hostname_override=node.name,
        node_ip=node.ip,
        cluster_cidr=cluster.network.pod_cidr,
        nodeport_addresses=(),
        node_addresses=[node.ip, node.pod_gateway, "127.0.0.1"],
        service_cidrs=[cluster.network.service_cidr],
        topology_labels=dict(node.labels),
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _nft(ns: str, argv: list[str], input: str | None = None, check: bool = True):  # noqa: ANN202, A002
    try:
        return run_in(ns, ["nft", *argv], input=input, check=check)
    except FileNotFoundError as e:
        if shutil.which("nft") is None:
            raise KernelError("nft is not installed (Debian package nftables): the nftables proxy mode needs it") from e
        raise KernelError(f"network namespace {ns} does not exist (is the cluster up?)") from e


class NFTablesProxier:
    """kube-proxy (nftables mode) of one node.

    ``max_transaction_ops``: ``None`` (the default) sends each sync as the one atomic
    transaction kube-proxy sends. A number splits the first load of a node that has no
    table yet into consecutive ``nft -f`` runs of at most that many operations -- the same
    operations in the same order, so the same final table, but not atomic: while it loads,
    some Services already work and others not yet. It exists because this kernel loads a
    transaction full of anonymous ``numgen ... vmap`` sets super-linearly in the
    transaction's length (see ``benchmarks/bench_nftables.py``): 10,000 Services load in
    about half the time as ~10,000-20,000-operation pieces. Syncs of a live table are never
    split (a piece boundary between ``flush chain`` and its rules would leave a Service
    without rules in between).
    """

    def __init__(self, cluster: Cluster, node: Node, state_file: Path, max_transaction_ops: int | None = None, **config):
        self.cluster = cluster
        self.node = node
        self.state_file = Path(state_file)
        self.max_transaction_ops = max_transaction_ops
        self.config = node_config(cluster, node, **config)

    # --- state between syncs -------------------------------------------------------

    def _load(self) -> dict:
        try:
            data = json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return data if data.get("mode") == STATE_MODE else {}

    def _save(self, data: dict) -> None:
        data["mode"] = STATE_MODE
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.state_file)

    # --- the kernel ----------------------------------------------------------------------

    def kernel_state(self, elements: dict | None = None) -> KernelState:
        """What the node's table holds now (``KernelState()`` when there is no table):
        chain and set names from the kernel; the reconciled sets' and maps' elements from
        the kernel too unless ``elements`` (kube-proxy's remembered storages) is given."""
        ns, fam = self.node.netns, self.config.family
        chains = _nft(ns, ["-j", "list", "chains", fam]).stdout
        sets = _nft(ns, ["-t", "-j", "list", "sets", fam]).stdout
        names = kernel_state_from_nft_json(chains, sets, table=TABLE, family=fam)
        if names.chains is None:
            return KernelState()
        if elements is None:
            docs = [
                _nft(ns, ["-j", "list", kind, fam, TABLE, name], check=False).stdout
                for kind, name in ELEMENT_CONTAINERS
            ]
            elements = kernel_state_from_nft_json(*docs, table=TABLE, family=fam).elements
        return KernelState(chains=names.chains, sets=names.sets, elements={k: dict(v) for k, v in elements.items()})

    # --- one sync --------------------------------------------------------------------

    def sync(self, objects: list[dict], full: bool = False, maps: tuple | None = None) -> SyncResult:
        ns = self.node.netns
        t0 = time.perf_counter()
        now = time.time()
        if maps is None or self.config.ip_family != "IPv4":  # maps: built by the caller for IPv4
            maps = servicemap.build_maps(objects, self.config.ip_family)
        services, endpoints = maps
        prev = self._load()
        prints = service_fingerprints(services, endpoints)
        full = (
            full
            or not prev
            or prev.get("need_full_sync", True)
            or now - float(prev.get("last_full_sync", 0.0)) > FULL_SYNC_PERIOD_S
        )
        changed = None
        if not full:
            old = prev.get("services", {})
            changed = {tuple(k.split("/", 1)) for k in old.keys() | prints.keys() if old.get(k) != prints.get(k)}
        stale = {k: float(v) for k, v in (prev.get("stale_chains") or {}).items()}
        flushed = bool(prev.get("flushed"))
        synced_once = bool(prev.get("synced_once"))

        kernel = self.kernel_state(None if full else prev.get("elements"))
        result = render_nftables_sync(
            services, endpoints, self.config, changed=changed, kernel=kernel,
            stale_chains=stale, now=now, flushed=flushed, synced_once=synced_once,
        )
        t1 = time.perf_counter()
        t_apply = 0.0
        deleted = 0
        if result.stale_text:
            ta = time.perf_counter()
            r = _nft(ns, ["-f", "-"], input=result.stale_text, check=False)
            t_apply += time.perf_counter() - ta
            if r.returncode == 0:
                deleted = len(result.deleted_chains)
            else:
                # "Unable to delete stale chains; will retry later": the sync goes full;
                # the chains are still there and are found stale again below.
                full, changed = True, None
                tr = time.perf_counter()
                result = render_nftables_sync(
                    services, endpoints, self.config, changed=None, kernel=self.kernel_state(),
                    stale_chains={k: v for k, v in stale.items() if k not in result.deleted_chains},
                    now=now, flushed=flushed, synced_once=synced_once,
                )
                t1 += time.perf_counter() - tr
        ta = time.perf_counter()
        r = None
        # Pieces only for the first load of a node without a table: splitting a sync that
        # rewrites live chains would leave them empty between two pieces.
        pieces = self._pieces(result.text) if kernel.chains is None else ([result.text] if result.text else [])
        for piece in pieces:
            r = _nft(ns, ["-f", "-"], input=piece, check=False)
            if r.returncode != 0:
                break
        t_apply += time.perf_counter() - ta
        state = {
            "services": prints,
            "flushed": flushed or result.full_sync,
            "synced_once": True,
            "last_full_sync": now if result.full_sync else float(prev.get("last_full_sync", 0.0)),
        }
        if r is not None and r.returncode != 0:
            # kube-proxy: "nftables sync failed"; staleChains is cleared and the next
            # sync is a full one.
            self._save({
                **state, "services": {}, "stale_chains": {}, "elements": None, "need_full_sync": True,
                "last_full_sync": float(prev.get("last_full_sync", 0.0)),
            })
            msg = (r.stderr or r.stdout).strip().splitlines()
            raise KernelError(f"nft -f in {ns} failed (exit {r.returncode}): {' '.join(msg[:2])}")
        self._save({
            **state,
            "stale_chains": dict(result.stale_chains),
            "elements": {k: dict(v) for k, v in result.element_storage.items()},
            "need_full_sync": False,
        })
        return SyncResult(
            node=self.node.name,
            full=result.full_sync,
            render_s=t1 - t0,
            apply_s=t_apply,
            changed_services=result.changed_services,
            nat_rules=result.nat_rules,
            filter_rules=result.filter_rules,
            deleted_chains=deleted,
        )

    def _pieces(self, text: str) -> list[str]:
        """The transaction, or its consecutive pieces of at most ``max_transaction_ops``
        lines (every operation only needs objects that earlier lines created)."""
        if not text:
            return []
        limit = self.max_transaction_ops
        if not limit:
            return [text]
        lines = text.splitlines(keepends=True)
        if len(lines) <= limit:
            return [text]
        return ["".join(lines[i : i + limit]) for i in range(0, len(lines), limit)]

    # --- looking at it -----------------------------------------------------------------

    def live_rules(self, service: str | None = None) -> str:
        """``nft list table ip kube-proxy`` of this node; with ``service`` (``ns/name``)
        only that Service's chains, rules and set/map elements, one per line in the
        ``add ...`` form kube-proxy's tests use."""
        text = _nft(self.node.netns, ["list", "table", self.config.family, TABLE], check=False).stdout
        if not service:
            return text
        return filter_service(dump_from_nft_list(text, self.config.family, TABLE), service, self._service_ips(service))

    def _service_ips(self, service: str) -> set[str]:
        ns, _, name = service.partition("/")
        ips: set[str] = set()
        for svc in self.cluster.services:
            meta = svc.get("metadata") or {}
            if (meta.get("namespace") or "default") == ns and meta.get("name") == name:
                spec = svc.get("spec") or {}
                ips.update(ip for ip in (spec.get("clusterIPs") or [spec.get("clusterIP")]) if ip and ip != "None")
                ips.update(spec.get("externalIPs") or [])
                for ing in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []:
                    if ing.get("ip"):
                        ips.add(ing["ip"])
        return ips


def filter_service(dump: str, service: str, ips: set[str] | frozenset[str] = frozenset()) -> str:
    """The lines of a ``Fake.Dump()``-form listing that belong to one Service
    (``ns/name``): its chains and their rules (every chain name holds ``ns/name/``), the
    map elements pointing at them or commented with its port names, and the
    ``cluster-ips`` elements of its addresses."""
    ns, _, name = service.partition("/")
    mark = f"-{ns}/{name}/"
    comment = re.compile(rf'comment "{re.escape(ns)}/{re.escape(name)}(?::[^"]*)?"')
    keep = []
    for line in dump.splitlines():
        words = line.split(" ")
        if len(words) < 5:
            continue
        kind, obj = words[1], words[4]
        if kind in ("chain", "rule", "set") and mark in obj:
            keep.append(line)
        elif kind == "element":
            key = line[line.index("{") + 2 :].split(" ")[0]
            if mark in line or comment.search(line) or (obj == "cluster-ips" and key in ips):
                keep.append(line)
    return "\n".join(keep) + ("\n" if keep else "")
