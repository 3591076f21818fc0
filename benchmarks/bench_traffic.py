#!/usr/bin/env python3
"""Benchmark: the traffic generator (testbed.traffic) against wrk, measured in the
same run, on the same paths, from the same client pods, to the same pod servers.

Goals (issue #5, 2-core machine): new connections/s >= 0.7x wrk's at the same
concurrency and path; p50 at concurrency 1 <= 1.3x wrk's.

    sudo .venv/bin/python benchmarks/bench_traffic.py [--reps 3] [--seconds 2] [--json FILE]

Cluster (built with `testbed up`, torn down at the end): 3 nodes, a `web`
Deployment (3 pods, one per node, the pod server on 8080) behind a ClusterIP
Service (port 80, kube-proxy iptables mode, nft backend), and two client pods on
node1 (no ports). Paths:

* ``direct``: client pod -> the web pod on the same node (pod IP, node1's cni0 bridge);
* ``clusterip``: client pod -> the ClusterIP, DNATed by node1's kube-proxy rules to
  one of 3 pods (2 of them on other nodes).

Each path has its own client pod, so no connection of one path ever shares a
client address with the other (ENVIRONMENT.md's trap: direct then via a VIP within
60 s drops SYNs). Configurations run interleaved (wrk first on even repetitions,
the generator first on odd ones) and the medians over repetitions are reported.

What is compared, and how it is kept fair:

* Same CPU budget: ``wrk -t1`` (one thread) against the generator with
  ``processes=1`` (its default here); the pod server is one process on the other core.
* New connections: wrk can only open one connection per request by sending
  ``Connection: close``; the pod server then closes first (as agnhost does) and
  wrk closes too, so TIME_WAIT lands on both sides. Client-side TIME_WAIT exhausts
  wrk's ephemeral ports within seconds (measured here: 600 req/s instead of 12k), so
  the client pods get ``net.ipv4.tcp_tw_reuse=1`` (a per-namespace sysctl; the
  generator runs under the same setting but does not need it: it closes with an RST,
  leaving no TIME_WAIT anywhere). Server-side TIME_WAIT does not slow new SYNs from
  the same client (timestamps let the kernel reuse the tuple): the client's
  TCPSynRetrans counter is printed for every run to show no SYN was lost.
* Latency: wrk's latency starts when it writes the request, after connect(); the
  generator's ``total_us - connect_us`` is the same interval and is what the p50
  ratio uses (the generator's full ``total_us`` p50, connect included, is shown too).
* Rate: wrk's Requests/sec; the generator's successful rows / elapsed time.
* Every run starts with empty conntrack tables on the nodes (``conntrack -F``):
  wrk's FIN-closed connections leave TIME_WAIT entries for 120 s, the generator's
  RST-closed ones CLOSE entries for 10 s; neither may fill the table for the other.

Then the cost of recording rows: the generator with ``record=False`` (counts only)
against the default, same path and load, as throughput and as CPU time per request
(user + system of the generator's process, rows assembled into the DataFrame
included; less sensitive than throughput to other work on the host). CPU per
request is shown for wrk too (its process's user + system time).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testbed import netns, state  # noqa: E402
from testbed.traffic import Source, Target, flush_conntrack, host_load, run, summary  # noqa: E402

TESTBED = [sys.executable, "-m", "testbed"]

TOPOLOGY = """
apiVersion: testbed.io/v1alpha1
kind: Topology
metadata: {name: bench-traffic}
spec:
  nodes: 3
  clients: 0
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: agnhost, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: loadgen, namespace: default}
spec:
  replicas: 2
  selector: {matchLabels: {app: loadgen}}
  template:
    metadata: {labels: {app: loadgen}}
    spec:
      nodeSelector: {kubernetes.io/hostname: node1}
      containers: [{name: loadgen, image: agnhost}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TESTBED, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def syn_retrans(ns: str) -> int:
    """TcpExt TCPSynRetrans of a namespace (its /proc/net/netstat)."""
    with netns.entered(ns), open("/proc/thread-self/net/netstat") as f:
        lines = f.read().splitlines()
    for head, vals in zip(lines[::2], lines[1::2]):
        if head.startswith("TcpExt:"):
            return int(dict(zip(head.split()[1:], vals.split()[1:]))["TCPSynRetrans"])
    return 0


_UNIT = {"us": 1.0, "ms": 1e3, "s": 1e6}


def run_wrk(ns: str, url: str, conns: int, seconds: float, new: bool) -> dict:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency"]
    if new:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    before = syn_retrans(ns)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with netns.entered(ns):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = r.stdout
    if r.returncode != 0 or "Requests/sec" not in out:
        raise SystemExit(f"wrk failed: {r.stderr.strip() or out}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"\n\s+50%\s+([\d.]+)(us|ms|s)\b", out)
    p50 = float(m.group(1)) * _UNIT[m.group(2)]
    errs = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    done = int(re.search(r"(\d+) requests in", out).group(1))
    cpu = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / max(1, done) * 1e6
    return {"rate": rate, "p50": p50, "errors": errs + (int(non2xx.group(1)) if non2xx else 0),
            "synretrans": syn_retrans(ns) - before, "cpu_us": cpu}


def run_gen(src: Source, target: Target, conns: int, seconds: float, new: bool, record: bool = True) -> dict:
    before = syn_retrans(src.netns)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    df = run([src], target, duration=seconds, concurrency=conns, connection="new" if new else "keepalive",
             processes=1, record=record)
    r1 = resource.getrusage(resource.RUSAGE_SELF)  # in-process (processes=1): rows assembled too
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    out = {"synretrans": syn_retrans(src.netns) - before}
    if not record:
        n = int(df["requests"].sum())
        out.update(rate=(n - int(df["errors"].sum())) / df.attrs["elapsed_s"], errors=int(df["errors"].sum()),
                   cpu_us=cpu / max(1, n) * 1e6)
        return out
    s = summary(df)
    ok = s["ok"]
    if not ok:
        raise SystemExit(f"every request of the generator failed ({s['errors']}): is the cluster still up?")
    out.update(rate=ok / df.attrs["elapsed_s"], errors=s["requests"] - ok, cpu_us=cpu / max(1, len(df)) * 1e6,
               p50=s["response_us"]["p50"], p50_total=s["total_us"]["p50"])
    return out


def med(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0, help="per run (wrk takes whole seconds)")
    ap.add_argument("--conns", default="1,50")
    ap.add_argument("--json", help="write every measurement here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (sudo)")
    if not 1 <= args.reps <= 20 or not 1 <= args.seconds <= 30:
        raise SystemExit("--reps 1..20, --seconds 1..30")
    conns = [int(x) for x in args.conns.split(",")]
    name = f"bench-traffic-{secrets.token_hex(3)}"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(TOPOLOGY)
        topo = f.name
    try:
        r = cli("up", topo, "--name", name)
        if r.returncode != 0:
            raise SystemExit(f"testbed up failed: {r.stderr.strip()}")
        c = state.load_cluster(name)
        web = {p.node: p for p in c.pods if p.labels.get("app") == "web"}
        lg = [p for p in c.pods if p.labels.get("app") == "loadgen"]
        cip = next(s for s in c.services if s["metadata"]["name"] == "web")["spec"]["clusterIP"]
        paths = {
            "direct": (Source(lg[0].name, lg[0].netns), Target(web["node1"].ip, 8080)),
            "clusterip": (Source(lg[1].name, lg[1].netns), Target(cip, 80)),
        }
        for src, _ in paths.values():
            with netns.entered(src.netns):
                netns.sysctl("net.ipv4.tcp_tw_reuse", 1)
        print(f"cluster {name}: direct {lg[0].name} -> {web['node1'].ip}:8080 (same node); "
              f"clusterip {lg[1].name} -> {cip}:80 (3 pods on 3 nodes)")
        print(f"host load at start: {host_load()}")
        results: dict[str, dict[str, list[dict]]] = {}
        configs = [(p, new, k) for p in paths for new in (True, False) for k in conns]
        for rep in range(args.reps):
            for path, new, k in configs:
                src, tgt = paths[path]
                key = f"{path} {'new' if new else 'keepalive'} c={k}"
                url = f"http://{tgt.ip}:{tgt.port}{tgt.path}"
                slot = results.setdefault(key, {"wrk": [], "gen": []})
                order = ("wrk", "gen") if rep % 2 == 0 else ("gen", "wrk")
                for tool in order:
                    for n in c.nodes:  # every run starts from empty conntrack tables
                        flush_conntrack(n.netns)
                    if tool == "wrk":
                        slot["wrk"].append(run_wrk(src.netns, url, k, args.seconds, new))
                    else:
                        slot["gen"].append(run_gen(src, tgt, k, args.seconds, new))
            print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr)
        rec: dict[str, dict[str, list[dict]]] = {}
        for rep in range(args.reps):
            for k in conns:
                src, tgt = paths["direct"]
                slot = rec.setdefault(f"direct new c={k}", {"record": [], "norecord": []})
                for record in ((True, False) if rep % 2 == 0 else (False, True)):
                    for n in c.nodes:
                        flush_conntrack(n.netns)
                    slot["record" if record else "norecord"].append(run_gen(src, tgt, k, args.seconds, True, record))

        print()
        print("generator vs wrk -t1 (medians of %d runs of %gs; p50 = request written -> response, connect excluded)"
              % (args.reps, args.seconds))
        hdr = f"{'path / connections / concurrency':<28} {'wrk req/s':>10} {'gen req/s':>10} {'ratio':>6}  " \
              f"{'wrk p50':>8} {'gen p50':>8} {'ratio':>6}  {'gen p50 incl. connect':>21}  {'CPU us/req w/g':>14}  " \
              f"{'errors w/g':>10}  {'SYN retrans w/g':>15}"
        print(hdr)
        goals = []
        for key, slot in results.items():
            w, g = slot["wrk"], slot["gen"]
            wr, gr, wp, gp = med(w, "rate"), med(g, "rate"), med(w, "p50"), med(g, "p50")
            if " new " in key:
                goals.append((f"{key}: new connections/s ratio {gr / wr:.2f} >= 0.7", gr / wr >= 0.7))
                if key.endswith("c=1"):
                    goals.append((f"{key}: p50 ratio {gp / wp:.2f} <= 1.3", gp / wp <= 1.3))
            print(f"{key:<28} {wr:>10.0f} {gr:>10.0f} {gr / wr:>6.2f}  {wp:>6.1f}us {gp:>6.1f}us {gp / wp:>6.2f}  "
                  f"{med(g, 'p50_total'):>19.1f}us  {med(w, 'cpu_us'):>6.1f}/{med(g, 'cpu_us'):<7.1f}  "
                  f"{sum(r['errors'] for r in w):>4}/{sum(r['errors'] for r in g):<5}  "
                  f"{sum(r['synretrans'] for r in w):>7}/{sum(r['synretrans'] for r in g):<7}")
        print(f"host load at end: {host_load()}")
        for text, ok in goals:
            print(f"goal {'met' if ok else 'MISSED'}: {text}")
        print()
        print("cost of recording one row per request (direct path, new connections)")
        for key, slot in rec.items():
            a, b = med(slot["record"], "rate"), med(slot["norecord"], "rate")
            ca, cb = med(slot["record"], "cpu_us"), med(slot["norecord"], "cpu_us")
            print(f"{key:<28} recording {a:>8.0f} req/s {ca:>5.1f} us CPU/req   counting only {b:>8.0f} req/s "
                  f"{cb:>5.1f} us CPU/req   rate ratio {a / b:.3f}, CPU +{ca - cb:.2f} us/req")
        if args.json:
            Path(args.json).write_text(json.dumps({"compare": results, "recording": rec}, indent=1))
    finally:
        cli("down", "--name", name)
        os.unlink(topo)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
