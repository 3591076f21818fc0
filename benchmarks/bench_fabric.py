#!/usr/bin/env python3
"""Benchmark: `testbed up` / `testbed down` against the same topology built with
`ip -batch` (iproute2), measured in the same run.

Goals (issue #2, 2-core machine): 1,000 pods up <= 10 s, down <= 5 s, pod servers
<= 0.5 MB per pod, and up <= 1.5x the `ip -batch` yardstick.

    sudo .venv/bin/python benchmarks/bench_fabric.py [--reps 3] [--sizes 3x10,10x100]

`testbed up` is the whole command (Python start-up, validation, namespaces, links,
addresses, routes, pod servers listening); the yardstick builds only the links and
addresses, forking one `ip -n NS -batch` per namespace (iproute2 cannot switch
namespace inside one batch).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testbed import topology  # noqa: E402

TESTBED = [sys.executable, "-m", "testbed"]


def topology_text(nodes: int, pods_per_node: int) -> str:
    return f"""
apiVersion: testbed.io/v1alpha1
kind: Topology
metadata: {{name: bench}}
spec:
  nodes: {nodes}
  clients: 1
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: {nodes * pods_per_node}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers: [{{name: web, image: x, ports: [{{containerPort: 8080}}]}}]
"""


def run(cmd: list[str], **kw) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT, **kw)
    return time.perf_counter() - t


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_namespaces_gone(prefix: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(n.startswith(prefix) for n in os.listdir("/run/netns")):
        time.sleep(0.05)


def ip_batch_build(file: str, tag: str) -> tuple[float, float]:
    """Build the same fabric with ip -batch; return (build s, delete s)."""
    c = topology.load(file)
    c.assign_netns(tag)
    host = [f"netns add {c.switch_netns}"] + [f"netns add {n.netns}" for n in c.nodes]
    host += [f"netns add {x.netns}" for x in c.clients] + [f"netns add {p.netns}" for p in c.pods]
    per_ns: list[tuple[str, list[str]]] = []
    sw = ["link set lo up", "link add br0 type bridge", "link set br0 up"]
    for i, n in enumerate(c.nodes):
        sw += [f"link add n{i} type veth peer name eth0 netns {n.netns}", f"link set n{i} master br0 up"]
    for i, x in enumerate(c.clients):
        sw += [f"link add c{i} type veth peer name eth0 netns {x.netns}", f"link set c{i} master br0 up"]
    per_ns.append((c.switch_netns, sw))
    plen = c.network.node_prefix
    for n in c.nodes:
        cmds = ["link set lo up", "link set eth0 up", f"addr add {n.ip}/24 dev eth0", "link add cni0 type bridge",
                f"addr add {n.pod_gateway}/{plen} dev cni0", "link set cni0 up"]
        cmds += [f"route add {o.pod_cidr} via {o.ip}" for o in c.nodes if o.name != n.name]
        for j, p in enumerate(c.pods_on(n.name)):
            cmds += [f"link add veth{j:05d} type veth peer name eth0 netns {p.netns}",
                     f"link set veth{j:05d} master cni0 up", f"link set veth{j:05d} type bridge_slave hairpin on"]
        per_ns.append((n.netns, cmds))
    for x in c.clients:
        per_ns.append((x.netns, ["link set lo up", "link set eth0 up", f"addr add {x.ip}/24 dev eth0"]))
    for p in c.pods:
        node = c.node(p.node)
        per_ns.append((p.netns, ["link set lo up", "link set eth0 up", f"addr add {p.ip}/{plen} dev eth0",
                                 f"route add default via {node.pod_gateway}"]))
    t = time.perf_counter()
    subprocess.run(["ip", "-batch", "-"], input="\n".join(host) + "\n", text=True, check=True)
    for ns, cmds in per_ns:
        subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(cmds) + "\n", text=True, check=True)
    build = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run(["ip", "-batch", "-"], input="\n".join(h.replace("netns add", "netns del") for h in host) + "\n",
                   text=True, check=True)
    delete = time.perf_counter() - t
    wait_namespaces_gone(f"tb-{tag}-")
    return build, delete


def bench(nodes: int, ppn: int, reps: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "bench.yaml")
        Path(f).write_text(topology_text(nodes, ppn))
        ups, downs, rsses, yb, yd, ratios = [], [], [], [], [], []
        for rep in range(reps):
            # alternate A/B so drift hits both alike
            b, dl = ip_batch_build(f, f"y{rep:05d}")
            yb.append(b)
            yd.append(dl)
            u = run([*TESTBED, "up", f])
            from testbed import state

            pid = state.load_info("bench").podserver_pid
            rsses.append(rss_kb(pid) / (nodes * ppn))
            dn = run([*TESTBED, "down"])
            wait_namespaces_gone("tb-")
            ups.append(u)
            downs.append(dn)
            ratios.append(u / b)
        return {
            "up_s": statistics.median(ups), "down_s": statistics.median(downs),
            "ipbatch_up_s": statistics.median(yb), "ipbatch_down_s": statistics.median(yd),
            "ratio_up": statistics.median(ratios), "rss_kb_per_pod": statistics.median(rsses),
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sizes", default="3x10,10x100", help="NODESxPODS_PER_NODE,...")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("benchmark needs root", file=sys.stderr)
        return 2
    subprocess.run([*TESTBED, "clean"], stdout=subprocess.DEVNULL)
    print(f"{'topology':>14} {'pods':>5} {'up s':>7} {'down s':>7} {'ip-batch up s':>14} {'ip-batch down s':>16} "
          f"{'up/ip-batch':>12} {'podserver KB/pod':>17}")
    for size in a.sizes.split(","):
        n, p = (int(x) for x in size.split("x"))
        r = bench(n, p, a.reps)
        print(f"{n:>5} x {p:>3} pods {n * p:>5} {r['up_s']:7.2f} {r['down_s']:7.2f} {r['ipbatch_up_s']:14.2f} "
              f"{r['ipbatch_down_s']:16.2f} {r['ratio_up']:12.2f} {r['rss_kb_per_pod']:17.0f}")
    print("medians of", a.reps, "runs; goals: 1000 pods up <= 10 s, down <= 5 s, <= 512 KB/pod, up/ip-batch <= 1.5")
    return 0


if __name__ == "__main__":
    sys.exit(main())
