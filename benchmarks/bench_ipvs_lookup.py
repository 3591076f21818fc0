#!/usr/bin/env python3
"""Benchmark: what IPVS virtual services cost a new connection to one VIP, in the guest
kernel (User-Mode Linux 6.1), and whether virtual services in *other* network
namespaces cost the same — the question behind the demo's IPVS latency growth, where
three emulated nodes share one kernel.

    sudo .venv/bin/python benchmarks/bench_ipvs_lookup.py [--services 10000] [--rounds 4]

Inside one fresh guest: namespaces ``client`` -> ``router`` -> ``server`` (veths);
``router`` has IPVS virtual service ``10.96.0.10:80`` (NAT, rr) to the server and the
address on a dummy ``kube-ipvs0``, as kube-proxy's ipvs mode programs a ClusterIP. A
closed loop of connects from ``client`` to the VIP (SO_LINGER 0, no data; a bounded
number per state) measures connect times in five states, in rounds (A, B, C, D, E, A,
B, ...), so slow stretches of the machine hit every state alike:

* **A** only the probed virtual service;
* **B** plus ``--services`` more virtual services (ClusterIP:80, one real server
  each) in ``router``, added after the probed one;
* **C** the same number in each of two *other* namespaces (nothing in ``router``
  but the probed one): what the other emulated nodes' kube-proxies add;
* **D** no more virtual services, but ``--services`` more /32 addresses on
  ``router``'s ``kube-ipvs0`` (kube-proxy binds every ClusterIP there);
* **E** the same addresses on a ``kube-ipvs0`` in each of the two other namespaces
  (nothing more in ``router``): the other emulated nodes' bound ClusterIPs. In this
  kernel (6.1) the IPv4 address hash table (``inet_addr_lst``, 256 buckets) is one for
  all network namespaces.

Printed per state: connect p10 / p25 / p50 (µs) over all rounds and each round's
p10. Mirrors kube-proxy's ipvs mode in the shape of what it programs (one virtual
service per ClusterIP:port; each ClusterIP bound to kube-ipvs0), one part at a time.
Nothing touches the host: all of it lives and dies in the guest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GUEST_SCRIPT = r'''
import ctypes, math, os, socket, struct, subprocess, sys, time
N, ROUNDS, PER = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def sh(*a, inp=None):
    subprocess.run(a, input=inp, text=True, check=True, capture_output=True)
for n in ("client", "router", "server", "other1", "other2"):
    sh("ip", "netns", "add", n); sh("ip", "-n", n, "link", "set", "lo", "up")
for n in ("other1", "other2"):
    sh("ip", "-n", n, "link", "add", "kube-ipvs0", "type", "dummy")
sh("ip", "link", "add", "c0", "netns", "client", "type", "veth", "peer", "name", "r0", "netns", "router")
sh("ip", "link", "add", "s0", "netns", "server", "type", "veth", "peer", "name", "r1", "netns", "router")
for ns, dev, addr in (("client", "c0", "10.1.0.2/24"), ("router", "r0", "10.1.0.1/24"),
                      ("server", "s0", "10.2.0.2/24"), ("router", "r1", "10.2.0.1/24")):
    sh("ip", "-n", ns, "addr", "add", addr, "dev", dev); sh("ip", "-n", ns, "link", "set", dev, "up")
sh("ip", "-n", "client", "route", "add", "default", "via", "10.1.0.1")
sh("ip", "-n", "server", "route", "add", "default", "via", "10.2.0.1")
sh("ip", "netns", "exec", "router", "sysctl", "-qw", "net.ipv4.ip_forward=1")
sh("ip", "-n", "router", "link", "add", "kube-ipvs0", "type", "dummy")
sh("ip", "-n", "router", "addr", "add", "10.96.0.10/32", "dev", "kube-ipvs0")
sh("ip", "netns", "exec", "router", "ipvsadm", "-A", "-t", "10.96.0.10:80", "-s", "rr")
sh("ip", "netns", "exec", "router", "ipvsadm", "-a", "-t", "10.96.0.10:80", "-r", "10.2.0.2:80", "-m")
srv = subprocess.Popen(["ip", "netns", "exec", "server", sys.executable, "-c", """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('10.2.0.2', 80)); s.listen(512)
while True:
    c, _ = s.accept(); c.close()
"""])
time.sleep(1.0)
BULK = "".join(f"-A -t 10.97.{i // 250}.{i % 250 + 1}:80 -s rr\n-a -t 10.97.{i // 250}.{i % 250 + 1}:80 -r 10.2.0.2:80 -m\n"
               for i in range(N))
ADDRS = "".join(f"address add 10.97.{i // 250}.{i % 250 + 1}/32 dev kube-ipvs0\n" for i in range(N))
def fill(ns):
    sh("ip", "netns", "exec", ns, "ipvsadm", "-R", inp=BULK)
def clear(ns, keep_probe):
    sh("ip", "netns", "exec", ns, "ipvsadm", "-C")
    if keep_probe:
        sh("ip", "netns", "exec", "router", "ipvsadm", "-A", "-t", "10.96.0.10:80", "-s", "rr")
        sh("ip", "netns", "exec", "router", "ipvsadm", "-a", "-t", "10.96.0.10:80", "-r", "10.2.0.2:80", "-m")
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open("/run/netns/client", os.O_RDONLY)
assert libc.setns(fd, 0x40000000) == 0
def measure():
    out = []
    deadline = time.monotonic() + 60
    for i in range(PER + 50):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.settimeout(2)
        t = time.perf_counter_ns(); s.connect(("10.96.0.10", 80)); out.append((time.perf_counter_ns() - t) / 1000)
        s.close()
        if time.monotonic() > deadline:
            break
    return out[50:]
res = {s: [] for s in "ABCDE"}
rounds = {s: [] for s in "ABCDE"}
def pct(v, q):  # nearest rank
    v = sorted(v); return v[max(0, min(len(v) - 1, math.ceil(round(q / 100 * len(v), 9)) - 1))]
for r in range(ROUNDS):
    for state in "ABCDE":
        if state == "B":
            fill("router")
        elif state == "C":
            fill("other1"); fill("other2")
        elif state == "D":
            sh("ip", "-n", "router", "-batch", "-", inp=ADDRS)
        elif state == "E":
            sh("ip", "-n", "other1", "-batch", "-", inp=ADDRS); sh("ip", "-n", "other2", "-batch", "-", inp=ADDRS)
        v = measure()
        res[state] += v; rounds[state].append(pct(v, 10))
        if state == "B":
            clear("router", keep_probe=True)
        elif state == "C":
            clear("other1", False); clear("other2", False)
        elif state == "D":
            sh("ip", "-n", "router", "-batch", "-", inp=ADDRS.replace("address add", "address del"))
        elif state == "E":
            for n in ("other1", "other2"):
                sh("ip", "-n", n, "-batch", "-", inp=ADDRS.replace("address add", "address del"))
        print(f"round {r + 1} {state}: p10 {pct(v, 10):.0f} us", flush=True)
srv.kill()
for state, label in (("A", "probe only"), ("B", f"+{N} in the same namespace"), ("C", f"+{N} in each of 2 other namespaces"),
                     ("D", f"+{N} addresses on kube-ipvs0"), ("E", f"+{N} addresses in each of 2 other namespaces")):
    v = res[state]
    print(f"{state} {label:38s} p10 {pct(v, 10):6.0f}  p25 {pct(v, 25):6.0f}  p50 {pct(v, 50):6.0f} us  "
          f"rounds p10: {' '.join(f'{x:.0f}' for x in rounds[state])}", flush=True)
'''


def main() -> int:
    from benchmarks.in_guest import run_script

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=10000, help="virtual services added per namespace (default 10000)")
    ap.add_argument("--rounds", type=int, default=4, help="A/B/C/D/E rounds (default 4)")
    ap.add_argument("--per-state", type=int, default=1500, help="connects per state and round (default 1500)")
    ap.add_argument("--timeout", type=float, default=900, help="bound on the whole guest run, s")
    a = ap.parse_args()
    return run_script(GUEST_SCRIPT, [str(a.services), str(a.rounds), str(a.per_state)], name="ipvs-lookup",
                      timeout=a.timeout, mem="2G")


if __name__ == "__main__":
    sys.exit(main())
