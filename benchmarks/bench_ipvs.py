#!/usr/bin/env python3
"""Benchmark: kube-proxy's ipvs mode at scale, through the project's applier, against the
bare tools loading the same desired state, measured in the same run.

    sudo .venv/bin/python benchmarks/bench_ipvs.py                         # 1k, 5k, 10k; 3 reps
    sudo .venv/bin/python benchmarks/bench_ipvs.py --sizes 1000 --reps 1   # CI-sized

IPVS needs a kernel with ip_vs: with one on the host this runs here; otherwise the
measurement runs inside the UML guest (``testbed.guest.run``) and this process prints its
report. (``--inside`` is that guest half.) The pure renderer is timed on the host too.

Workload: N ClusterIP Services x 3 endpoints (:mod:`benchmarks.synthetic`, the shape of
kube-proxy's own benchmarks) on node ``node1``. For each N:

1. **render**: ``build_maps`` + ``render_ipvs``, in-process, no kernel.
2. **applier** (A): ``IPVSProxier.sync(objects, full=True)`` on a fresh node namespace:
   the whole call (maps, reading the kernel, render, sysctls, ``ipset restore``,
   ``ipvsadm -R``, binding N addresses to kube-ipvs0, ``iptables-legacy-restore``, jump
   rules, state file). **bare** (B): the same desired state loaded by the tools alone in
   another fresh namespace: ``ip link add kube-ipvs0 type dummy`` + ``ip -batch`` of the N
   ``addr add`` lines, ``ipset restore -exist``, ``ipvsadm -R``, ``iptables-legacy-restore
   --noflush --counters`` of the rendered texts (prepared beforehand, not timed). A and B
   alternate; medians. ratio = A / B (goal <= 1.2); ``apply`` = A without render.
3. **add one**: after A, one more Service + slice, ``sync()`` (incremental: only the
   differences reach the kernel), against the bare tools adding the same one Service
   (2 ``ip``/``ipset``/``ipvsadm`` lines each + the iptables buffer).

Every namespace is ``tb-bipvs<hex>-*``, created and deleted here; nothing touches the
host namespace's rules. Ratios are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.synthetic import service_capacity, synthetic_objects  # noqa: E402

TAG = f"tb-bipvs{secrets.token_hex(3)}"
EPS = 3
GOAL_RATIO = 1.2
MARK = "BENCH-IPVS-RESULT "
SERVICE_CIDR = "10.233.0.0/18"
BIG_SERVICE_CIDR = "10.96.0.0/12"


def objects_for(n: int) -> tuple[list[dict], list[dict]]:
    cidr = SERVICE_CIDR if n + 1 <= service_capacity(SERVICE_CIDR) else BIG_SERVICE_CIDR
    return synthetic_objects(n, EPS, service_cidr=cidr), synthetic_objects(1, EPS, start=n, service_cidr=cidr)


def time_render(n: int, reps: int) -> float:
    from testbed.proxy.ipvs import IPVSConfig, render_ipvs
    from testbed.proxy.servicemap import build_maps

    objs, _ = objects_for(n)
    cfg = IPVSConfig(hostname_override="node1", node_ip="192.168.56.11", cluster_cidr="10.233.64.0/18",
                     node_addresses=["192.168.56.11", "10.233.64.1"], kernel_version="6.1.0")
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        render_ipvs(*build_maps(objs), cfg)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


# ------------------------------------------------------------------ inside (a kernel with ip_vs)


def _cpu_idle() -> tuple[int, int]:
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    return vals[3] + vals[4], sum(vals)


def settle(max_wait: float, threshold: float = 0.85, window: float = 0.4) -> None:
    """Wait until the CPU is idle for two windows in a row (at most ``max_wait`` s)."""
    t0 = time.monotonic()
    good = 0
    while time.monotonic() - t0 < max_wait and good < 2:
        i0, s0 = _cpu_idle()
        time.sleep(window)
        i1, s1 = _cpu_idle()
        good = good + 1 if (i1 - i0) / max(1, s1 - s0) >= threshold else 0

_seq = 0


def _node_ns(role: str):
    """A fresh node-like namespace (lo, eth0 with the node IP and a route covering every
    synthetic pod address, so real servers are routable); returns (name, Cluster, Node)."""
    global _seq
    from testbed import netns
    from testbed.fabric import rtnl
    from testbed.model import Cluster, Node

    _seq += 1
    name = f"{TAG}-{role}{_seq}"
    netns.create(name)
    with rtnl(name) as ipr:
        ipr.link("set", index=1, state="up")
        ipr.link("add", ifname="eth0", kind="dummy", state="up")
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=eth0, address="192.168.56.11", prefixlen=24)
        ipr.addr("add", index=eth0, address="10.233.127.254", prefixlen=18)
    node = Node(name="node1", ip="192.168.56.11", pod_cidr="10.233.64.0/24", pod_gateway="10.233.64.1", netns=name)
    return name, Cluster(name="bench", run_id=TAG, nodes=[node]), node


def _tool(ns: str, argv: list[str], text: str | None, timeout: float) -> None:
    from testbed import netns

    with netns.entered(ns):
        r = subprocess.run(argv, input=text, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0 or (argv[0] == "ipvsadm" and r.stderr.strip()):
        raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()[:200]}")


def _bare(ns: str, texts: dict[str, str], timeout: float, steps: dict[str, float]) -> float:
    t0 = t = time.perf_counter()
    for name, argv, text in (
        ("link", ["ip", "link", "add", "kube-ipvs0", "type", "dummy"], None),
        ("ip -batch (bind)", ["ip", "-batch", "-"], texts["addr"]),
        ("ipset restore", ["ipset", "restore", "-exist"], texts["ipset"]),
        ("ipvsadm -R", ["ipvsadm", "-R"], texts["ipvs"]),
        ("iptables-restore", ["iptables-legacy-restore", "--noflush", "--counters"], texts["iptables"]),
    ):
        _tool(ns, argv, text, timeout)
        now = time.perf_counter()
        steps[name] = round(now - t, 3)
        t = now
    return time.perf_counter() - t0


def _bare_add_one(ns: str, texts: dict[str, str], timeout: float) -> float:
    t = time.perf_counter()
    _tool(ns, ["ip", "-batch", "-"], texts["addr"], timeout)
    _tool(ns, ["ipset", "restore", "-exist"], texts["ipset"], timeout)
    _tool(ns, ["ipvsadm", "-R"], texts["ipvs"], timeout)
    _tool(ns, ["iptables-legacy-restore", "--noflush", "--counters"], texts["iptables"], timeout)
    return time.perf_counter() - t


def measure(n: int, reps: int, timeout: float) -> dict:
    from testbed import netns
    from testbed.kubeproxy_ipvs import IPVSProxier, node_config
    from testbed.proxy.ipvs import render_ipvs
    from testbed.proxy.servicemap import build_maps

    objs, extra = objects_for(n)
    # the desired state the bare tools load: rendered once, not timed
    from testbed.model import Cluster, Node

    node0 = Node(name="node1", ip="192.168.56.11", pod_cidr="10.233.64.0/24", pod_gateway="10.233.64.1")
    cfg = node_config(Cluster(name="bench", nodes=[node0]), node0, node_addresses=["192.168.56.11", "10.233.127.254"], kernel_version=os.uname().release)
    r_full = render_ipvs(*build_maps(objs), cfg)
    r_plus = render_ipvs(*build_maps(objs + extra), cfg)
    texts = {"addr": "".join(f"addr add {a}/32 dev kube-ipvs0\n" for a in r_full.bind_addresses),
             "ipset": r_full.ipset_text, "ipvs": r_full.ipvsadm_text, "iptables": r_full.iptables}
    new_vs = [vs for vs in r_plus.virtual_servers if vs.key not in {v.key for v in r_full.virtual_servers}]
    plus = {
        "addr": "".join(f"addr add {vs.address}/32 dev kube-ipvs0\n" for vs in new_vs),
        "ipset": "".join(f"add {s.name} {e}\n" for s, s0 in zip(r_plus.ipsets, r_full.ipsets) for e in sorted(set(s.entries) - set(s0.entries))),
        "ipvs": "".join(vs.ipvsadm_line() + "\n" + "".join(rs.ipvsadm_line(vs) + "\n" for rs in r_plus.real_servers[vs.key]) for vs in new_vs),
        "iptables": r_plus.iptables,
    }
    res: dict = {"n": n, "virtual_servers": len(r_full.virtual_servers), "addresses": len(r_full.bind_addresses),
                 "set_entries": sum(len(s.entries) for s in r_full.ipsets), "A": [], "A_render": [], "A_apply": [],
                 "B": [], "A1": [], "B1": []}
    for rep in range(reps):
        for which in (("A", "B") if rep % 2 == 0 else ("B", "A")):
            ns, cluster, node = _node_ns(which.lower())
            state = Path(f"/tmp/{ns}.json")
            try:
                if which == "A":
                    p = IPVSProxier(cluster, node, state)
                    t = time.perf_counter()
                    sr = p.sync(objs, full=True)
                    res["A"].append(time.perf_counter() - t)
                    res["A_render"].append(sr.render_s)
                    res["A_apply"].append(sr.apply_s)
                    res.setdefault("A_steps", []).append(p.last_steps)
                    t = time.perf_counter()
                    p.sync(objs + extra)
                    res["A1"].append(time.perf_counter() - t)
                    res["A1_counts"] = p.last_counts
                    res.setdefault("A1_steps", []).append(p.last_steps)
                else:
                    bsteps: dict[str, float] = {}
                    res["B"].append(_bare(ns, texts, timeout, bsteps))
                    res.setdefault("B_steps", []).append(bsteps)
                    res["B1"].append(_bare_add_one(ns, plus, timeout))
            finally:
                state.unlink(missing_ok=True)
                netns.delete(ns)
            settle(20.0)  # the kernel frees a deleted namespace (10k virtual servers) after the fact
    for k in ("A", "B"):
        res[k + "_min"] = min(res[k])
    for k in ("A", "A_render", "A_apply", "B", "A1", "B1"):
        res[k] = statistics.median(res[k])
    for k in ("A_steps", "A1_steps", "B_steps"):
        res[k] = {name: round(statistics.median(s[name] for s in res[k]), 3) for name in res[k][0]}
    return res


def inside(sizes: list[int], reps: int, timeout: float) -> list[dict]:
    out = []
    for n in sizes:
        r = measure(n, reps, timeout)
        print(f"# n={n} A={r['A']:.2f}s B={r['B']:.2f}s", file=sys.stderr, flush=True)
        out.append(r)
    return out


# ------------------------------------------------------------------ report


def report(rows: list[dict], host_render: dict[int, float], where: str) -> None:
    print(f"kube-proxy ipvs mode, N ClusterIP Services x {EPS} endpoints, one node; kernel: {where}")
    print(f"{'N':>6} {'VS':>6} {'render(host)':>12} {'render':>8} {'applier A':>10} {'apply':>8} {'bare B':>8} "
          f"{'A/B':>6} {'apply/B':>8} {'+1 A':>7} {'+1 bare':>8}")
    for r in rows:
        hr = host_render.get(r["n"])
        print(f"{r['n']:>6} {r['virtual_servers']:>6} {(f'{hr:.2f}s' if hr is not None else '-'):>12} "
              f"{r['A_render']:>7.2f}s {r['A']:>9.2f}s {r['A_apply']:>7.2f}s {r['B']:>7.2f}s "
              f"{r['A'] / r['B']:>6.2f} {r['A_apply'] / r['B']:>8.2f} {r['A1']:>6.2f}s {r['B1']:>7.2f}s")
    for r in rows:
        print(f"  N={r['n']}: applier steps (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in r["A_steps"].items() if v >= 0.005))
        print(f"  N={r['n']}: bare tools (median s):    " + ", ".join(f"{k} {v:.2f}" for k, v in r["B_steps"].items()))
        print(f"  N={r['n']}: +1 Service steps:         " + ", ".join(f"{k} {v:.2f}" for k, v in r["A1_steps"].items() if v >= 0.005))
    worst = max(r["A"] / r["B"] for r in rows)
    worst_min = max(r["A_min"] / r["B_min"] for r in rows)
    print("best of the reps (noise only ever adds): " + ", ".join(
        f"N={r['n']}: A {r['A_min']:.2f}s / B {r['B_min']:.2f}s = {r['A_min'] / r['B_min']:.2f}" for r in rows))
    print(f"goal: applier / bare tools <= {GOAL_RATIO}: worst median ratio {worst:.2f}, worst best-of ratio {worst_min:.2f} "
          f"-> {'met' if worst <= GOAL_RATIO else 'NOT met'}")
    print("(A = IPVSProxier.sync(full=True), whole call; bare = ip -batch + ipset restore + ipvsadm -R + "
          "iptables-legacy-restore of the same state; +1 = one more Service, incremental)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,5000,10000", help="comma-separated Service counts")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=2400, help="bound on the whole guest run (s)")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    if os.geteuid() != 0:
        print("bench_ipvs needs root (network namespaces)", file=sys.stderr)
        return 2
    if args.inside:
        print(MARK + json.dumps(inside(sizes, args.reps, args.timeout)), flush=True)
        return 0
    host_render = {n: time_render(n, args.reps) for n in sizes}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--inside", "--sizes", args.sizes, "--reps", str(args.reps)]
    if os.path.exists("/proc/net/ip_vs"):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
        where = f"host {os.uname().release}"
    else:
        try:
            from testbed import guest
        except ImportError:
            print("the host kernel has no ip_vs and testbed.guest is not available: nothing measured", file=sys.stderr)
            return 2
        r = guest.run(cmd, timeout=args.timeout, cwd=str(ROOT))
        where = "UML guest (testbed.guest)"
    lines = [line for line in r.stdout.splitlines() if line.startswith(MARK)]
    if not lines:
        print(f"no result (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}", file=sys.stderr)
        return 1
    report(json.loads(lines[-1][len(MARK):]), host_render, where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
