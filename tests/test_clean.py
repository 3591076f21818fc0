"""Crash safety: `kill -9` of `testbed up` at different points, then `testbed clean`
leaves nothing: no namespaces, no processes, no state files."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from conftest import ROOT, TESTBED, run_cli
from testbed import clean, netns, state

pytestmark = pytest.mark.root

TOPOLOGY = """
apiVersion: testbed.io/v1alpha1
kind: Topology
metadata: {name: crashme}
spec:
  nodes: 4
  clients: 2
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 160
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: x, ports: [{containerPort: 8080}, {containerPort: 8081, protocol: UDP}]}]
"""


def _leftovers() -> dict[str, list]:
    procs = [pid for pid in clean.find_processes([]) if pid != os.getpid()]
    return {
        "namespaces": netns.list_names("tb-"),
        "processes": procs,
        "run_dirs": state.names(),
    }


def _dnsmasq_running() -> bool:
    from testbed.dns import _cmdline

    return any(
        any("dnsmasq" in a for a in cmd) and any("/run/testbed/crashme" in a for a in cmd)
        for cmd in (_cmdline(int(e)) for e in os.listdir("/proc") if e.isdigit())
    )


def _pod_namespaces() -> int:
    return sum(1 for n in netns.list_names("tb-") if "-pod-" in n)


# The points of `up` at which it is killed, each observed in the kernel and /proc
# (not guessed from a delay): the run directory written, no pod namespace yet; the
# fabric half built (switch, nodes, some pods); every pod namespace there; the pod
# server up (rules being written next); the cluster DNS starting; and, as a control,
# `up` finished.
PHASES = {
    "state-written": lambda: bool(state.names()) and _pod_namespaces() == 0,
    "fabric-half": lambda: 20 <= _pod_namespaces() < 120,
    "pods-built": lambda: _pod_namespaces() >= 160,
    "podserver-up": lambda: bool(clean.find_processes([])) and not _dnsmasq_running(),
    "dns-starting": _dnsmasq_running,
}


@pytest.mark.parametrize("phase", [*PHASES, "after-up"])
def test_kill_9_during_up_then_clean(tmp_path, phase):
    run_cli("clean")
    topo = tmp_path / "crash.yaml"
    topo.write_text(TOPOLOGY)
    proc = subprocess.Popen([*TESTBED, "up", str(topo)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if phase == "after-up":
            assert proc.wait(timeout=120) == 0
        else:
            at_phase = PHASES[phase]
            deadline = time.monotonic() + 60
            reached = False
            while proc.poll() is None and time.monotonic() < deadline:
                if at_phase():
                    reached = proc.poll() is None  # seen while `up` still ran
                    break
                time.sleep(0.001)
            assert reached, f"`up` never was at {phase} while running (exit {proc.poll()})"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    r = run_cli("clean", check=True)
    assert "clean:" in r.stdout
    assert _leftovers() == {"namespaces": [], "processes": [], "run_dirs": []}
    r = run_cli("clean", check=True)
    assert r.stdout.strip() == "clean: nothing left behind"


def test_clean_kills_processes_left_inside_namespaces(tmp_path):
    run_cli("clean")
    run_cli("up", "topologies/seed.yaml", "--name", "tclean", check=True)
    # a command left running inside a node, as `testbed exec` would leave it
    sleeper = subprocess.Popen([*TESTBED, "exec", "--name", "tclean", "node2", "--", "sleep", "60"], cwd=ROOT)
    time.sleep(0.5)
    assert sleeper.poll() is None
    r = run_cli("clean", check=True)
    assert sleeper.wait(timeout=5) != 0
    import re

    killed = int(re.search(r"killed (\d+) processes", r.stdout).group(1))
    assert killed >= 2, r.stdout  # the sleeper, the pod servers, the DNS servers
    assert _leftovers() == {"namespaces": [], "processes": [], "run_dirs": []}


def test_interrupt_during_up_removes_everything(tmp_path):
    """Ctrl-C (SIGINT) in the middle of `up` tears the run down by itself."""
    run_cli("clean")
    topo = tmp_path / "crash.yaml"
    topo.write_text(TOPOLOGY)
    proc = subprocess.Popen([*TESTBED, "up", str(topo)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:  # finished before the signal: take it down normally
        run_cli("down", "--name", "crashme", check=True)
    else:
        assert proc.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err
    assert _leftovers() == {"namespaces": [], "processes": [], "run_dirs": []}
