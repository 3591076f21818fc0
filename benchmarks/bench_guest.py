#!/usr/bin/env python3
"""Benchmark: the guest kernel (User-Mode Linux) — boot-to-ready time of
``testbed.guest.run`` and what it adds on the host, against a bare ``linux.uml``
boot measured in the same run.

Goal (issue #4): boot-to-ready <= 5 s.

    sudo .venv/bin/python benchmarks/bench_guest.py [--reps 5] [--no-cluster]

Rows (medians of --reps runs, seconds):

* ``raw boot->halt``: linux.uml with ENVIRONMENT.md's recipe and a shell init that
  mounts proc, sysfs, a tmpfs on /run and powers off at once (the yardstick; with
  the seccomp filter this host needs, see testbed/guest.py);
* ``raw + modprobe``: the same init also loading testbed.guest.GUEST_MODULES with
  ``modprobe -a -d`` (what any guest needs before kube-proxy can run);
* ``run(true) ready``: ``testbed.guest.run(["true"])`` from the start of linux.uml to
  "ready" (mounts, overlay /etc, modules, sysctls, agent up: the command starts);
* ``run(true) total``: start to exit of linux.uml; ``run(true) wall``: the whole
  call, with the host side (exchange directory, spawn, kill check, clean-up) —
  ``host overhead`` = wall - total;
* with the cluster guest (default; ``--no-cluster`` skips it): ``testbed up`` of
  tests/data/guest_small.yaml inside a background guest, then a forwarded
  ``testbed get pods`` (pre-imported agent, a fork per call) against the same
  command as a fresh ``python -m testbed`` inside the guest.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testbed import guest  # noqa: E402

RAW_INIT = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /run
{modprobe}
echo o > /proc/sysrq-trigger
sleep 30
"""


def raw_boot(modules: bool) -> float:
    """Seconds from exec of linux.uml to its exit, init powering off at once."""
    d = tempfile.mkdtemp(prefix="tb-guest-bench-")
    try:
        tree = os.path.join(d, "mods", "lib", "modules")
        os.makedirs(tree)
        for rel in guest._module_releases():
            os.symlink(os.path.join(guest.UML_MODULES_DIR, rel), os.path.join(tree, rel))
        modprobe = f"/usr/sbin/modprobe -a -d {d}/mods {' '.join(guest.GUEST_MODULES)}" if modules else ""
        init = os.path.join(d, "init")
        with open(init, "w") as f:
            f.write(RAW_INIT.format(modprobe=modprobe))
        os.chmod(init, 0o755)
        tunables = guest.NO_WIDE_VECTORS["GLIBC_TUNABLES"]
        argv = [guest.uml_binary(), "mem=1G", "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "rw",
                f"init={init}", "con0=null,fd:1", "con=null", "ssl=null", "quiet", f"uml_dir={d}",
                f"GLIBC_TUNABLES={tunables}"]
        t = time.perf_counter()
        # the seccomp filter this host needs, without unshare (the bare recipe)
        launch = [sys.executable, "-I", "-S", str(guest.AGENT), "launch", str(os.getpid())]
        p = subprocess.Popen([*launch, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=guest._uml_env(), start_new_session=True)
        try:
            p.wait(timeout=60)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
        return time.perf_counter() - t
    finally:
        shutil.rmtree(d, ignore_errors=True)


def guest_run() -> tuple[float, float, float]:
    t = time.perf_counter()
    r = guest.run(["true"], timeout=60)
    wall = time.perf_counter() - t
    assert r.returncode == 0, r
    return r.boot_s, r.total_s, wall


def cluster(reps: int) -> dict[str, float]:
    name = f"bench-guest-{secrets.token_hex(3)}"
    t = time.perf_counter()
    h = guest.start_cluster_guest(name, ["up", "tests/data/guest_small.yaml"], cwd=str(ROOT))
    up = time.perf_counter() - t
    try:
        if h.up_returncode != 0:
            raise SystemExit(f"testbed up in the guest failed: {h.up_stderr.strip().splitlines()[-1:]}")
        fwd, fresh = [], []
        for _ in range(reps):
            t = time.perf_counter()
            rc, _, err = guest.forward(name, ["get", "pods", "--name", name])
            fwd.append(time.perf_counter() - t)
            assert rc == 0, err
            t = time.perf_counter()
            rc, _, err = guest.forward(name, ["exec", "--name", name, "node1", "--", sys.executable, "-m", "testbed",
                                              "get", "pods", "--name", name])
            fresh.append(time.perf_counter() - t)
            assert rc == 0, err
        return {"boot": h.boot_s, "up": up, "forward": statistics.median(fwd), "fresh": statistics.median(fresh)}
    finally:
        guest.stop(name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-cluster", action="store_true", help="skip the cluster-guest rows (~20 s)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("benchmark needs root", file=sys.stderr)
        return 2
    if not guest.available():
        print("no guest kernel (Debian package user-mode-linux)", file=sys.stderr)
        return 2
    raw = statistics.median(raw_boot(False) for _ in range(a.reps))
    raw_mod = statistics.median(raw_boot(True) for _ in range(a.reps))
    runs = [guest_run() for _ in range(a.reps)]
    ready, total, wall = (statistics.median(x) for x in zip(*runs))
    print(f"{'measure':<32} {'seconds':>8} {'x raw boot':>10}")
    for label, v in (("raw boot->halt (yardstick)", raw), ("raw + modprobe of GUEST_MODULES", raw_mod),
                     ("run(true) boot->ready", ready), ("run(true) total (linux.uml)", total),
                     ("run(true) wall (whole call)", wall)):
        print(f"{label:<32} {v:8.2f} {v / raw:10.2f}")
    print(f"{'host overhead (wall - total)':<32} {wall - total:8.3f}")
    print(f"{'agent+setup (ready - raw+mod)':<32} {ready - raw_mod:8.3f}")
    if not a.no_cluster:
        c = cluster(a.reps)
        print(f"{'cluster guest boot->ready':<32} {c['boot']:8.2f}")
        print(f"{'cluster guest up (small topo)':<32} {c['up']:8.2f}")
        print(f"{'forwarded `get pods`':<32} {c['forward']:8.2f}")
        print(f"{'fresh `python -m testbed get`':<32} {c['fresh']:8.2f}   (inside the guest, via exec)")
    print(f"medians of {a.reps} runs; goal: boot->ready <= 5 s ({'met' if ready <= 5 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
