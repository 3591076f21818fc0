#!/usr/bin/env python3
"""Benchmark: the cluster DNS (issue #6) -- record-update delay, availability during
updates, and query latency through kube-proxy -- each against the raw tool measured
in the same run.

    sudo .venv/bin/python benchmarks/bench_dns.py [--reps 20] [--queries 400]

Measured on a live cluster (tests/data/dns.yaml, iptables mode, nft backend):

* update delay: ``dns.update`` until every DNS pod serves the new records, for an
  A-only change (hosts file, inotify) and a CNAME/SRV change (new generation,
  SIGHUP); yardstick: a raw dnsmasq in a throwaway namespace pair serving a
  rewritten hosts file (inotify), and a raw dnsmasq restarted with a new
  configuration (the naive way to change CNAME/SRV records);
* availability: queries answered while records change (generation switch vs. the
  raw restart), from a client querying back-to-back;
* query latency (p50, one UDP query per fresh socket) from a pod: to the DNS Service
  ClusterIP (kube-proxy DNAT) vs. straight to a DNS pod's address.

Every loop is bounded in count and time; traffic only goes to addresses inside
namespaces created here.
"""

from __future__ import annotations

import argparse
import copy
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dns.exception  # noqa: E402
import dns.message  # noqa: E402
import dns.query  # noqa: E402

from testbed import controlplane, netns, state, topology  # noqa: E402
from testbed import dns as tdns  # noqa: E402
from testbed.fabric import _veth_into, rtnl  # noqa: E402

TESTBED = [sys.executable, "-m", "testbed"]
DATA = ROOT / "tests" / "data" / "dns.yaml"
NAME = "bench-dns"


def cli(*args: str) -> None:
    subprocess.run([*TESTBED, *args], check=True, stdout=subprocess.DEVNULL, cwd=ROOT, timeout=300)


def full_topology(path: Path) -> str:
    docs = topology.read_yaml_documents(str(DATA))
    head = copy.deepcopy(docs[0])
    head["spec"]["manifests"] = [str((DATA.parent / m).resolve()) for m in head["spec"].get("manifests", [])]
    dep, svc = tdns.system_objects(topology.load(str(DATA)))
    path.write_text(yaml.safe_dump_all([head, dep, svc, *docs[1:]], sort_keys=False))
    return str(path)


def query(ns: str, server: str, name: str, timeout: float = 1.0) -> dns.message.Message:
    q = dns.message.make_query(name, "A")
    with netns.entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    try:
        return dns.query.udp(q, server, timeout=timeout, sock=s)
    finally:
        s.close()


def answers(ns: str, server: str, name: str, want: str, timeout: float = 0.05) -> bool:
    try:
        r = query(ns, server, name, timeout)
    except (dns.exception.DNSException, OSError):
        return False
    return any(rd.to_text() == want for rrset in r.answer for rd in rrset)


def p50(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class Hammer:
    """Back-to-back queries from ``ns`` until stopped (bounded: 20k queries / 30 s)."""

    def __init__(self, ns: str, server: str, name: str):
        self.ok = self.failed = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(ns, server, name), daemon=True)

    def _run(self, ns: str, server: str, name: str) -> None:
        end = time.monotonic() + 30
        while not self._stop.is_set() and self.ok + self.failed < 20000 and time.monotonic() < end:
            try:
                r = query(ns, server, name, timeout=0.5)
                self.ok += bool(r.answer)
                self.failed += not r.answer
            except (dns.exception.DNSException, OSError):
                self.failed += 1

    def __enter__(self) -> "Hammer":
        self._t.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(35)


# --------------------------------------------------------------------------- raw dnsmasq yardstick


def raw_yardstick(reps: int) -> dict[str, float]:
    """A raw dnsmasq in throwaway namespaces: inotify delay, restart delay and the
    queries lost during restarts."""
    tag = f"tb-bd{secrets.token_hex(3)}"
    srv_ns, cli_ns = f"{tag}-srv", f"{tag}-cli"
    tmp = Path(tempfile.mkdtemp(prefix="bench-dns-"))
    os.chmod(tmp, 0o755)
    (tmp / "hosts").mkdir(mode=0o755)
    procs: list[int] = []
    out: dict[str, float] = {}
    try:
        netns.create(srv_ns)
        netns.create(cli_ns)
        with rtnl(srv_ns) as ipr:
            ipr.link("set", index=1, state="up")
            _veth_into(ipr, "v0", cli_ns, None)
            ipr.addr("add", index=ipr.link_lookup(ifname="v0")[0], address="10.255.0.1", prefixlen=24)
        with rtnl(cli_ns) as ipr:
            ipr.link("set", index=1, state="up")
            ipr.link("set", index=2, state="up")
            ipr.addr("add", index=2, address="10.255.0.2", prefixlen=24)

        def conf(i: int) -> Path:
            p = tmp / f"c{i}.conf"
            p.write_text(f"no-hosts\nno-resolv\nlocal=/#/\nhostsdir={tmp / 'hosts'}\nuser=nobody\ngroup=nogroup\n"
                         f"cname=alias{i}.bench.test,x.bench.test\nhost-record=gen.bench.test,127.0.{i // 256}.{i % 256}\n")
            return p

        def spawn(i: int) -> int:
            pid_file = tmp / "pid"
            pid_file.unlink(missing_ok=True)
            with netns.entered(srv_ns):
                subprocess.run([tdns.dnsmasq_binary(), f"--conf-file={conf(i)}", f"--pid-file={pid_file}"], check=True)
            while not pid_file.exists() or not pid_file.read_text().strip():
                time.sleep(0.0005)
            pid = int(pid_file.read_text())
            procs.append(pid)
            return pid

        def write_hosts(i: int) -> None:
            t = tmp / "h.tmp"
            t.write_text(f"10.1.{i // 256}.{i % 256} x.bench.test\n")
            os.chmod(t, 0o644)
            os.replace(t, tmp / "hosts" / "h")

        write_hosts(0)
        pid = spawn(0)
        while not answers(cli_ns, "10.255.0.1", "x.bench.test", "10.1.0.0"):
            time.sleep(0.001)
        ino = []
        for i in range(1, reps + 1):
            t0 = time.perf_counter()
            write_hosts(i)
            while not answers(cli_ns, "10.255.0.1", "x.bench.test", f"10.1.{i // 256}.{i % 256}"):
                time.sleep(0.0002)
            ino.append(time.perf_counter() - t0)
        restart = []
        with Hammer(cli_ns, "10.255.0.1", "x.bench.test") as h:
            for i in range(1, reps + 1):
                t0 = time.perf_counter()
                tdns._kill(pid, str(tmp))
                pid = spawn(i)
                while not answers(cli_ns, "10.255.0.1", "gen.bench.test", f"127.0.{i // 256}.{i % 256}"):
                    time.sleep(0.0002)
                restart.append(time.perf_counter() - t0)
        out = {"inotify": p50(ino), "restart": p50(restart), "restart_lost": h.failed, "restart_queries": h.ok + h.failed}
    finally:
        for p in procs:
            tdns._kill(p, str(tmp))
        netns.delete(srv_ns)
        netns.delete(cli_ns)
    return out


# --------------------------------------------------------------------------- the cluster


def cluster_measurements(reps: int, queries: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as td:
        cli("down", "--name", NAME)
        cli("up", str(DATA), "--name", NAME)
        c = state.load_cluster(NAME)
        if tdns.dns_service(c) is None:  # `up` does not add the DNS objects (yet)
            cli("down", "--name", NAME)
            cli("up", full_topology(Path(td) / "t.yaml"), "--name", NAME)
            c = state.load_cluster(NAME)
    try:
        run_dir = state.run_dir(NAME)
        t = time.perf_counter()
        first = tdns.sync(c, run_dir)
        start_s = time.perf_counter() - t
        inotify, calls = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            inotify.append(tdns.update(c, run_dir).max_delay)
            calls.append(time.perf_counter() - t0)
        web1 = next(p for p in c.pods if p.name == "web-1")
        client = next(p for p in c.pods if p.labels.get("app") == "toolbox" and p.node == "node3")
        name = "my-clusterip-service.default.svc.cluster.local"
        gen = []
        with Hammer(client.netns, "10.233.0.3", name) as h:
            for i in range(reps):
                web1.ready = i % 2 == 1
                controlplane.reconcile(c)
                s = tdns.update(c, run_dir)
                assert s.mode == "generation", s
                gen.append(s.max_delay)
        web1.ready = True
        controlplane.reconcile(c)
        tdns.update(c, run_dir)
        lat = {}
        for label, server in (("service", "10.233.0.3"), ("pod", tdns.dns_pods(c)[0].ip)):
            xs = []
            for _ in range(queries):
                t0 = time.perf_counter()
                query(client.netns, server, name)
                xs.append(time.perf_counter() - t0)
            lat[label] = p50(xs)
        res = tdns.resolver_for(client)
        xs = []
        for _ in range(max(1, queries // 4)):
            t0 = time.perf_counter()
            res.resolve("db-ext", "A")  # first search-path candidate, CNAME chain to the outside
            xs.append(time.perf_counter() - t0)
        return {
            "start": start_s, "start_delay": first.max_delay, "inotify": p50(inotify), "generation": p50(gen),
            "gen_lost": h.failed, "gen_queries": h.ok + h.failed, "q_service": lat["service"], "q_pod": lat["pod"],
            "resolve_cname": p50(xs), "records": first.records, "update_call": p50(calls),
        }
    finally:
        cli("down", "--name", NAME)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--queries", type=int, default=400)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    raw = raw_yardstick(args.reps)
    m = cluster_measurements(args.reps, args.queries)
    ms = 1000.0
    print(f"cluster DNS: {m['records']} records, started in {m['start'] * ms:.0f} ms (serving {m['start_delay'] * ms:.1f} ms after dnsmasq spawn)")
    print(f"{'update delay (p50)':34} {'testbed':>10} {'raw dnsmasq':>12} {'ratio':>7}")
    print(f"{'A/PTR change (inotify)':34} {m['inotify'] * ms:8.2f}ms {raw['inotify'] * ms:10.2f}ms {m['inotify'] / raw['inotify']:7.2f}")
    print(f"{'CNAME/SRV change (gen vs restart)':34} {m['generation'] * ms:8.2f}ms {raw['restart'] * ms:10.2f}ms {m['generation'] / raw['restart']:7.2f}")
    print(f"whole dns.update() call (records, resolv.conf files, ExternalName lookups, waiting): {m['update_call'] * ms:.1f} ms p50")
    print(f"queries lost while records changed: testbed {m['gen_lost']}/{m['gen_queries']} (generation switch), "
          f"raw restart {raw['restart_lost']}/{raw['restart_queries']}")
    print(f"query p50 from a pod: via Service {m['q_service'] * 1e6:.0f} us, to the DNS pod {m['q_pod'] * 1e6:.0f} us, "
          f"ratio {m['q_service'] / m['q_pod']:.2f}; resolve 'db-ext' (search + CNAME) {m['resolve_cname'] * 1e6:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
