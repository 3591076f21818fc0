"""Shared fixtures. The session guard proves the host namespace is left untouched."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTBED = [sys.executable, "-m", "testbed"]
IS_ROOT = os.geteuid() == 0


def _run(cmd: list[str]) -> str:
    if not shutil.which(cmd[0]):
        return f"<{cmd[0]} not installed>"
    r = subprocess.run(cmd, capture_output=True, text=True)
    return r.stdout + (f"<exit {r.returncode}: {r.stderr.strip()}>" if r.returncode else "")


def host_snapshot() -> dict[str, str]:
    """The host namespace's network state, normalised for packet counters and
    timestamps, without the project's own objects (namespaces named tb-...)."""
    snap = {
        "iptables-save": _run(["iptables-save"]),
        "iptables-legacy-save": _run(["iptables-legacy-save"]),
        "nft list ruleset": _run(["nft", "list", "ruleset"]),
        "ip link": _run(["ip", "-o", "link", "show"]),
        "ip addr": _run(["ip", "-o", "addr", "show"]),
        "ip route": _run(["ip", "route", "show", "table", "all"]),
        "ip netns": "\n".join(
            line for line in _run(["ip", "netns", "list"]).splitlines() if not line.startswith("tb-")
        ),
    }
    for k, v in snap.items():
        v = "\n".join(line for line in v.splitlines() if not line.startswith("#"))
        v = re.sub(r"\[\d+:\d+\]", "[]", v)
        v = re.sub(r"packets \d+ bytes \d+", "packets bytes", v)
        snap[k] = v
    return snap


@pytest.fixture(scope="session", autouse=True)
def host_guard():
    """Fails the run if the host's iptables/nft rules, links, addresses, routes or
    namespaces differ after the whole test session, or testbed objects are left."""
    if not IS_ROOT:
        yield
        return
    before = host_snapshot()
    left_before = set(n for n in _run(["ip", "netns", "list"]).split() if n.startswith("tb-"))
    yield
    after = host_snapshot()
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, f"the test run changed the host namespace: {changed}: " + "; ".join(
        f"{k}: before={before[k]!r} after={after[k]!r}" for k in changed
    )
    left = set(n for n in _run(["ip", "netns", "list"]).split() if n.startswith("tb-")) - left_before
    assert not left, f"the test run left namespaces behind: {sorted(left)}"


def run_cli(*args: str, check: bool = False, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([*TESTBED, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"testbed {' '.join(args)} -> {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")
    return r


requires_root = pytest.mark.skipif(not IS_ROOT, reason="needs root")


@pytest.fixture
def throwaway_ns():
    """A fresh, empty network namespace (``tb-t<hex>-x``), deleted after the test."""
    import secrets

    from testbed import netns

    name = f"tb-t{secrets.token_hex(3)}-x"
    netns.create(name)
    try:
        yield name
    finally:
        netns.delete(name)


def pytest_collection_modifyitems(config, items):
    """Tests marked `root` need real kernel objects: skip them (loudly) without root."""
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root (creates network namespaces)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def sigint_default() -> None:
    """``preexec_fn`` for a child a test sends SIGINT: a shell that ran the suite in the
    background (no job control) leaves SIGINT ignored, children inherit that and Python
    then never raises KeyboardInterrupt; a terminal's Ctrl-C meets the default."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
