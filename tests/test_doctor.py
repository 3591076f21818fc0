"""`testbed doctor`: real runs against this machine's kernel, compared with the truth
computed here independently (with `ip netns` / `tc` / `ip link`, not testbed.netns),
and proof that the host namespace is left exactly as it was."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys

import pytest

from conftest import IS_ROOT, ROOT, host_snapshot, run_cli
from testbed import doctor

STATUSES = {doctor.OK, doctor.MISSING, doctor.ERROR, doctor.NEEDS_ROOT}
TOP_KEYS = {"schema", "root", "elapsed_s", "system", "kernel", "tools", "uml", "proxy_modes", "guest_kernel", "guest"}
SECTION_KEYS = {
    "system": {"root", "python", "kernel", "distro"},
    "kernel": set(doctor.KERNEL_KEYS),
    "tools": {"ip", "tc", "iptables", "nft", "ipset", "ipvsadm", "conntrack", "dnsmasq", "wrk", "dig"},
    "uml": {"linux_uml", "modules", "ip_vs", "nf_tables", "sch_netem", "dummy"},
    "proxy_modes": {"iptables", "ipvs", "nftables"},
}


def _doctor_namespaces() -> list[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in r.stdout.splitlines() if line.startswith(doctor.NS_PREFIX)]


def _check_shape(rep: dict) -> None:
    assert set(rep) == TOP_KEYS
    assert rep["schema"] == 1
    for section, keys in SECTION_KEYS.items():
        assert set(rep[section]) == keys, section
        for name, c in rep[section].items():
            assert c["status"] in STATUSES, (section, name, c)
            assert isinstance(c["detail"], str) and c["detail"], (section, name, c)
    for c in rep["tools"].values():
        assert {"version", "path"} <= set(c)
    for c in rep["proxy_modes"].values():
        assert c["runs_on_host"] in (True, False, None)
    g = rep["guest_kernel"]
    assert {"status", "detail", "available", "ipvs", "netem"} <= set(g)


@pytest.fixture(scope="module")
def kernel_truth() -> dict[str, bool]:
    """What the host kernel really has, found in our own namespace made with `ip netns`."""
    if not IS_ROOT:
        pytest.skip("needs root")
    ns = f"tb-test{secrets.token_hex(3)}-doctor"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        def in_ns(*cmd: str) -> subprocess.CompletedProcess:
            return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True)

        if shutil.which("ipvsadm"):
            in_ns("ipvsadm", "-L", "-n")  # lets a modular kernel autoload ip_vs, as doctor may
        return {
            "netem": in_ns("tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms").returncode == 0,
            "ip_vs": in_ns("test", "-e", "/proc/net/ip_vs").returncode == 0,
            "dummy": in_ns("ip", "link", "add", "tbt-dummy", "type", "dummy").returncode == 0,
        }
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)


@pytest.mark.root
def test_doctor_json_matches_the_kernel_and_leaves_the_host_alone(kernel_truth):
    before = host_snapshot()
    left_before = set(_doctor_namespaces())
    r = run_cli("doctor", "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    rep = json.loads(r.stdout)
    _check_shape(rep)

    assert rep["root"] is True
    k = rep["kernel"]
    for name in ("netns", "veth", "bridge"):
        assert k[name]["status"] == "ok", (name, k[name])
    for name in ("ip_vs", "netem", "dummy"):
        want = "ok" if kernel_truth[name] else "missing"
        assert k[name]["status"] == want, (name, k[name], kernel_truth)
    # conclusions follow from the probes
    modes = rep["proxy_modes"]
    assert modes["ipvs"]["runs_on_host"] is (kernel_truth["ip_vs"] and kernel_truth["dummy"]
                                              and k["ipset"]["status"] == "ok"
                                              and modes["iptables"]["runs_on_host"])
    assert modes["iptables"]["runs_on_host"] is (k["iptables_legacy"]["status"] == "ok" or k["iptables_nft"]["status"] == "ok")
    assert modes["nftables"]["runs_on_host"] is (k["nftables"]["status"] == "ok")
    uml_there = bool(shutil.which("linux.uml")) and os.path.isdir(doctor.UML_MODULES_DIR)
    assert rep["guest_kernel"]["available"] is uml_there
    if uml_there:  # the booted guest kernel is probed too: IPVS there, no nf_tables for IPv4
        assert rep["guest"]["kernel"]["ip_vs"]["status"] == "ok"
        assert rep["guest"]["proxy_modes"] == {"iptables": True, "ipvs": True, "nftables": False}

    assert set(_doctor_namespaces()) - left_before == set(), "doctor left a tb-doctor-* namespace"
    after = host_snapshot()
    changed = [key for key in before if before[key] != after[key]]
    assert not changed, {key: (before[key], after[key]) for key in changed}


@pytest.mark.root
def test_doctor_table_names_the_proxy_modes():
    r = run_cli("doctor", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    out = r.stdout
    assert "proxy modes" in out
    for word in ("iptables mode", "ipvs mode", "nftables mode", "guest kernel (UML)", "netem", "ip_vs"):
        assert word in out, word
    assert _doctor_namespaces() == []


@pytest.mark.root
def test_doctor_reports_missing_tools_as_missing():
    """With no tools on PATH every tool-based probe says "missing", never a traceback."""
    r = run_cli("doctor", "--json", timeout=60, env={**os.environ, "PATH": "/nonexistent"})
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    rep = json.loads(r.stdout)
    _check_shape(rep)
    for name, c in rep["tools"].items():
        assert c["status"] == "missing" and c["path"] is None, (name, c)
    for name in ("iptables_legacy", "iptables_nft", "nftables", "ipset", "netem", "htb", "tbf"):
        assert rep["kernel"][name]["status"] == "missing", (name, rep["kernel"][name])
        assert "not installed" in rep["kernel"][name]["detail"]
    assert rep["kernel"]["veth"]["status"] == "ok"  # netlink, no tool needed
    assert _doctor_namespaces() == []


def _unprivileged_cmd() -> list[str]:
    if not IS_ROOT:
        return [sys.executable, "-m", "testbed"]
    if not shutil.which("setpriv"):
        pytest.skip("needs setpriv to drop root")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "testbed"]


def test_doctor_without_root_reports_what_it_can():
    r = subprocess.run([*_unprivileged_cmd(), "doctor", "--json"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    rep = json.loads(r.stdout)
    _check_shape(rep)
    assert rep["root"] is False
    assert all(c["status"] == "needs root" for c in rep["kernel"].values())
    assert all(c["runs_on_host"] is None for c in rep["proxy_modes"].values())
    # versions and UML files need no root
    if shutil.which("ip"):
        assert rep["tools"]["ip"]["status"] == "ok" and rep["tools"]["ip"]["version"]
    assert rep["uml"]["linux_uml"]["status"] == ("ok" if shutil.which("linux.uml") else "missing")


# --------------------------------------------------------------------------- units (no root)


def test_missing_tool_is_missing_not_a_traceback(monkeypatch):
    monkeypatch.setitem(doctor.TOOLS, "ip", (["tb-no-such-tool", "-V"], "tb-no-such-package"))
    c = doctor.probe_tool("ip")
    assert c.status == "missing" and c.extra == {"version": None, "path": None}

    def probe():
        doctor._run(["tb-no-such-tool"])
        return {}

    res = doctor._guarded(probe, ("a", "b"))
    assert {k: c.status for k, c in res.items()} == {"a": "missing", "b": "missing"}
    assert "tb-no-such-tool not installed" in res["a"].detail


def test_kernel_error_text_is_classified():
    def done(rc: int, err: str) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess([], rc, "", err)

    c = doctor._failed(done(2, "Error: Specified qdisc kind is unknown.\n"))
    assert (c.status, c.detail) == ("missing", "Error: Specified qdisc kind is unknown.")
    c = doctor._failed(done(2, "modprobe: FATAL: Module ip_vs not found\nCan't initialize ipvs: Protocol not available\n"))
    assert c.status == "missing" and c.detail.startswith("Can't initialize ipvs")
    c = doctor._failed(done(1, "iptables-restore: line 3 failed\n"))
    assert c.status == "error"


def test_conclusions():
    ok, missing = doctor.Check("ok", "x"), doctor.Check("missing", "x")
    kernel = {k: ok for k in doctor.KERNEL_KEYS}
    kernel.update(ip_vs=missing, dummy=missing, iptables_legacy=missing)
    uml = {k: ok for k in SECTION_KEYS["uml"]}
    modes, guest = doctor.conclude(True, kernel, uml)
    assert modes["iptables"].extra == {"runs_on_host": True, "backends": ["nft"]}
    assert modes["ipvs"].extra["runs_on_host"] is False and "ip_vs" in modes["ipvs"].detail
    assert modes["nftables"].extra["runs_on_host"] is True
    assert guest.extra == {"available": True, "ipvs": True, "netem": True}
    modes, guest = doctor.conclude(False, kernel, {**uml, "linux_uml": missing})
    assert all(m.status == "needs root" and m.extra["runs_on_host"] is None for m in modes.values())
    assert guest.extra["available"] is False
