#!/usr/bin/env python3
"""Benchmark: kube-proxy's nftables mode at scale, through the project's applier, against
a bare ``nft -f -`` of the same transaction, measured in the same run.

    sudo .venv/bin/python benchmarks/bench_nftables.py                        # 1k, 5k, 10k x 3 reps
    sudo .venv/bin/python benchmarks/bench_nftables.py --sizes 1000 --reps 1   # CI-sized
    sudo .venv/bin/python benchmarks/bench_nftables.py --sizes 5000 --batch-ops 5000,10000,20000

Workload: N ClusterIP Services x 3 endpoints (:mod:`benchmarks.synthetic`, the shape of
kube-proxy's own benchmarks). For each N:

1. **render**: ``build_maps`` + ``render_nftables_sync`` (a full sync on an empty node),
   in-process, no kernel.
2. **applier** (A): ``NFTablesProxier.sync(objects, full=True)`` on a fresh node namespace,
   wall time of the whole call (maps, the three ``nft -j list`` calls, render, ``nft -f``,
   state file). **bare** (B): ``nft -f -`` of the same transaction text in another fresh
   namespace. A and B alternate (A,B then B,A, ...), each after the machine has settled
   (tearing down a namespace with a big table keeps a kernel worker busy). Medians;
   ratio = A / B (goal <= 1.2).
3. **batched** (A'): the applier with ``max_transaction_ops`` (``--batch-ops``): the same
   operations in consecutive ``nft -f`` runs. Not kube-proxy's atomic transaction; shown
   because this kernel loads one big transaction of anonymous ``numgen ... vmap`` sets
   super-linearly in its length (the kernel time, ``sys``, is printed).
4. **add one**: after A's full sync, one more Service + its slice, ``sync()`` without
   ``full`` (a partial sync: only that Service's chains, every element reconciled); then
   ``sync(full=True)`` of the N+1 Services on the same populated namespace.

Every goal is printed as a ratio, never asserted. Namespaces are ``tb-bnft<6 hex>-*``,
created and always deleted here; nothing touches the host namespace. Each measurement is
bounded by ``--timeout``; on timeout the ``nft`` processes this script started are killed
by pid.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.synthetic import service_capacity, synthetic_objects  # noqa: E402
from testbed import kubeproxy_nftables, netns  # noqa: E402
from testbed.kubeproxy_nftables import NFTablesProxier, node_config  # noqa: E402
from testbed.model import Cluster, Network, Node  # noqa: E402
from testbed.proxy import servicemap  # noqa: E402
from testbed.proxy.nftables import render_nftables_sync  # noqa: E402

TAG = f"tb-bnft{secrets.token_hex(3)}"
EPS = 3
GOAL_RATIO = 1.2
SERVICE_CIDR = "10.233.0.0/18"
BIG_SERVICE_CIDR = "10.96.0.0/12"


class BenchTimeout(Exception):
    pass


def _my_nft_children() -> list[int]:
    me, out = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if int(rest[1]) == me and comm == "nft":
            out.append(int(entry))
    return out


def in_worker(fn: Callable[[], object], timeout: float) -> object:
    """Run ``fn`` in a worker thread (namespace work stays off the main thread), bounded by
    ``timeout``; on timeout the nft processes it started are SIGKILLed by pid."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            box["error"] = e

    th = threading.Thread(target=run, name="bench-worker", daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        for pid in _my_nft_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        th.join(10)
        raise BenchTimeout(f"a measurement took more than {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    return vals[3] + vals[4], sum(vals)


def settle(max_wait: float, threshold: float = 0.85, window: float = 0.4) -> float:
    """Wait until the CPUs are idle over two consecutive windows (a deleted namespace with
    a big table is freed by a kernel worker after the fact). Returns the seconds waited."""
    gc.collect()
    t0 = time.monotonic()
    good = 0
    while time.monotonic() - t0 < max_wait:
        i0, s0 = _cpu_times()
        time.sleep(window)
        i1, s1 = _cpu_times()
        good = good + 1 if (i1 - i0) / max(1, s1 - s0) >= threshold else 0
        if good >= 2:
            break
    return time.monotonic() - t0


_seq = 0


@contextlib.contextmanager
def throwaway_ns(role: str) -> Iterator[str]:
    global _seq
    _seq += 1
    name = f"{TAG}-{role}{_seq}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.delete(name)


def model(ns: str, service_cidr: str) -> tuple[Cluster, Node]:
    node = Node(name="node1", ip="192.168.56.11", pod_cidr="10.233.64.0/24", pod_gateway="10.233.64.1", netns=ns)
    return Cluster(name="bench", run_id=TAG, nodes=[node], network=Network(service_cidr=service_cidr)), node


def objects_for(n: int) -> tuple[list[dict], list[dict], str]:
    cidr = SERVICE_CIDR if n + 1 <= service_capacity(SERVICE_CIDR) else BIG_SERVICE_CIDR
    return synthetic_objects(n, EPS, service_cidr=cidr), synthetic_objects(1, EPS, start=n, service_cidr=cidr), cidr


def nft_children_time() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime, ru.ru_stime


@contextlib.contextmanager
def instrumented(rec: dict) -> Iterator[None]:
    """Time the applier's pieces (wraps, never edits, testbed.kubeproxy_nftables)."""
    orig_run_in = kubeproxy_nftables.run_in
    orig_render = kubeproxy_nftables.render_nftables_sync
    orig_build = servicemap.build_maps

    def run_in(ns, argv, input=None, check=True):  # noqa: ANN001, A002
        kind = "apply" if "-f" in argv else "list"
        t = time.perf_counter()
        try:
            return orig_run_in(ns, argv, input=input, check=check)
        finally:
            rec[kind] = rec.get(kind, 0.0) + time.perf_counter() - t
            rec[kind + "_n"] = rec.get(kind + "_n", 0) + 1

    def render(*a, **kw):  # noqa: ANN002, ANN003
        t = time.perf_counter()
        r = orig_render(*a, **kw)
        rec["render"] = rec.get("render", 0.0) + time.perf_counter() - t
        rec["result"] = r
        return r

    def build(*a, **kw):  # noqa: ANN002, ANN003
        t = time.perf_counter()
        r = orig_build(*a, **kw)
        rec["build_maps"] = rec.get("build_maps", 0.0) + time.perf_counter() - t
        return r

    kubeproxy_nftables.run_in = run_in
    kubeproxy_nftables.render_nftables_sync = render
    servicemap.build_maps = build
    try:
        yield
    finally:
        kubeproxy_nftables.run_in = orig_run_in
        kubeproxy_nftables.render_nftables_sync = orig_render
        servicemap.build_maps = orig_build


def timed_sync(proxier: NFTablesProxier, objects: list[dict], full: bool) -> dict:
    rec: dict = {}
    u0, s0 = nft_children_time()
    with instrumented(rec):
        t = time.perf_counter()
        rec["sync"] = proxier.sync(objects, full=full)
        rec["total"] = time.perf_counter() - t
    u1, s1 = nft_children_time()
    rec["nft_user"], rec["nft_sys"] = u1 - u0, s1 - s0
    return rec


def bare_nft(ns: str, text: str, timeout: float) -> dict:
    u0, s0 = nft_children_time()
    t = time.perf_counter()
    with netns.entered(ns):
        r = subprocess.run(["nft", "-f", "-"], input=text, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    u1, s1 = nft_children_time()
    if r.returncode != 0:
        raise RuntimeError(f"nft -f in {ns} failed: {(r.stderr or r.stdout).strip()[:300]}")
    return {"total": wall, "nft_user": u1 - u0, "nft_sys": s1 - s0}


def kernel_counts(ns: str) -> tuple[int, int]:
    """(chains, rules) in the node's table, outside any timed region."""
    with netns.entered(ns):
        out = subprocess.run(["nft", "list", "table", "ip", "kube-proxy"], capture_output=True, text=True).stdout
    chains = sum(1 for ln in out.splitlines() if ln.startswith("\tchain "))
    rules = 0
    in_chain = False
    for ln in out.splitlines():
        if ln.startswith("\tchain "):
            in_chain = True
        elif ln == "\t}":
            in_chain = False
        elif in_chain and ln.startswith("\t\t") and not ln.strip().startswith(("type ", "comment ")):
            rules += 1
    return chains, rules


def applier_run(n: int, objs: list[dict], extra: list[dict], cidr: str, batch: int | None, timeout: float,
                add_one: bool) -> dict:
    with throwaway_ns("a") as ns, tempfile.TemporaryDirectory(prefix="bnft-") as tmp:
        cluster, node = model(ns, cidr)
        proxier = NFTablesProxier(cluster, node, Path(tmp) / "kube-proxy-node1.json", max_transaction_ops=batch)
        rec = in_worker(lambda: timed_sync(proxier, objs, True), timeout)
        r = rec["result"]
        chains, rules = kernel_counts(ns)
        if rules != r.nat_rules + r.filter_rules:
            raise RuntimeError(f"N={n}: the kernel holds {rules} rules, the render says {r.nat_rules + r.filter_rules}")
        rec["kernel_chains"], rec["kernel_rules"] = chains, rules
        if add_one:
            more = objs + extra
            rec["add_one"] = in_worker(lambda: timed_sync(proxier, more, False), timeout)
            rec["full_again"] = in_worker(lambda: timed_sync(proxier, more, True), timeout)
        return rec


def bare_run(text: str, timeout: float) -> dict:
    with throwaway_ns("b") as ns:
        return in_worker(lambda: bare_nft(ns, text, timeout), timeout)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt_s(x: float) -> str:
    return f"{x:7.3f}s" if x == x else "    n/a"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,5000,10000", help="Service counts (comma list)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each A/B measurement (median)")
    ap.add_argument("--batch-ops", default="10000",
                    help="max_transaction_ops values for the batched applier (comma list; 0 = skip)")
    ap.add_argument("--timeout", type=float, default=600.0, help="bound of one measurement, seconds")
    ap.add_argument("--settle", type=float, default=30.0, help="max seconds to wait for an idle machine between runs")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    batches = [int(b) for b in args.batch_ops.split(",") if b.strip() and int(b) > 0]
    print(f"nftables mode: applier vs bare `nft -f -`, {EPS} endpoints per Service, {args.reps} reps, goal ratio <= {GOAL_RATIO}")
    print(subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip(), "| kernel", os.uname().release)
    rows = []
    for n in sizes:
        objs, extra, cidr = objects_for(n)
        cluster, node = model("unused", cidr)
        cfg = node_config(cluster, node)
        renders = []
        for _ in range(max(1, args.reps)):
            t = time.perf_counter()
            svcs, eps = servicemap.build_maps(objs)
            res = render_nftables_sync(svcs, eps, cfg)
            renders.append(time.perf_counter() - t)
        text = res.text
        a_runs: list[dict] = []
        b_runs: list[dict] = []
        for rep in range(args.reps):
            order = ("a", "b") if rep % 2 == 0 else ("b", "a")
            for which in order:
                settle(args.settle)
                if which == "a":
                    rec = applier_run(n, objs, extra, cidr, None, args.timeout, add_one=(rep == 0))
                    if rec["result"].text != text:
                        raise RuntimeError("the applier's transaction differs from the bench's render")
                    a_runs.append(rec)
                else:
                    b_runs.append(bare_run(text, args.timeout))
        batched: dict[int, list[dict]] = {}
        for b in batches:
            for _ in range(args.reps):
                settle(args.settle)
                batched.setdefault(b, []).append(applier_run(n, objs, extra, cidr, b, args.timeout, add_one=False))
        a = med([r["total"] for r in a_runs])
        bb = med([r["total"] for r in b_runs])
        first = a_runs[0]
        print(f"\nN={n}: {res.operations} operations, {len(text) / 1e6:.1f} MB, "
              f"{first['kernel_chains']} chains / {first['kernel_rules']} rules in the kernel")
        print(f"  render (build_maps + render)   {fmt_s(med(renders))}")
        print(f"  bare nft -f                    {fmt_s(bb)}   (nft user {med([r['nft_user'] for r in b_runs]):.2f}s, "
              f"sys {med([r['nft_sys'] for r in b_runs]):.2f}s)")
        print(f"  applier, one transaction (A)   {fmt_s(a)}   ratio A/B = {a / bb:.2f}  (goal <= {GOAL_RATIO})  "
              f"[maps {med([r['build_maps'] for r in a_runs]):.2f}s, list {med([r.get('list', 0) for r in a_runs]):.2f}s, "
              f"render {med([r['render'] for r in a_runs]):.2f}s, nft -f {med([r['apply'] for r in a_runs]):.2f}s]")
        for b, runs in batched.items():
            ab = med([r["total"] for r in runs])
            print(f"  applier, <= {b} ops/transaction {fmt_s(ab)}   ratio A'/B = {ab / bb:.2f}  "
                  f"({runs[0]['apply_n']} nft -f runs, nft sys {med([r['nft_sys'] for r in runs]):.2f}s; not atomic)")
        add = first["add_one"]
        again = first["full_again"]
        print(f"  add one Service: partial sync  {fmt_s(add['total'])}   ({add['result'].operations} operations; "
              f"list {add.get('list', 0):.2f}s, render {add['render']:.2f}s, nft -f {add.get('apply', 0):.3f}s)")
        print(f"  full resync of N+1 (populated) {fmt_s(again['total'])}   ({again['result'].operations} operations)")
        rows.append((n, med(renders), bb, a, {b: med([r["total"] for r in runs]) for b, runs in batched.items()},
                     add["total"], again["total"]))
    print("\nsummary (medians, seconds)")
    print(f"{'N':>7} {'render':>8} {'bare':>8} {'applier':>8} {'ratio':>6} " + " ".join(f"{'b' + str(b):>8}" for b in batches)
          + f" {'add-one':>8} {'full N+1':>9}")
    for n, rnd, bb, a, bat, add, again in rows:
        print(f"{n:>7} {rnd:8.3f} {bb:8.2f} {a:8.2f} {a / bb:6.2f} " + " ".join(f"{bat[b]:8.2f}" for b in batches)
              + f" {add:8.3f} {again:9.2f}")
    settle(args.settle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
