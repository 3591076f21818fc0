"""``testbed doctor``: what this machine supports, and which kube-proxy modes can run.

Every probe that creates a kernel object does so inside its own throwaway network
namespace ``tb-doctor-<6 hex>`` that is deleted again (try/finally): the host
namespace's links, rules and sets are never touched. Probes are independent and run
in a thread pool (:func:`testbed.netns.entered` moves only the calling thread).

Each check has a ``status`` (``ok``, ``missing``, ``error``, ``needs root``) and a short
``detail`` (a version, or the kernel's / tool's own error text). Without root only what
needs no namespace is probed (versions, the UML files); kernel probes say ``needs root``.

``--json`` prints one object with stable keys::

    {"schema": 1, "root": bool, "elapsed_s": float,
     "system":  {"root"|"python"|"kernel"|"distro": CHECK},
     "kernel":  {"netns"|"veth"|"bridge"|"dummy"|"br_netfilter"|"iptables_legacy"|
                 "iptables_nft"|"nftables"|"ipset"|"ip_vs"|"ip_vs_schedulers"|"netem"|
                 "htb"|"tbf"|"nf_conntrack": CHECK},
     "tools":   {"ip"|"tc"|"iptables"|"nft"|"ipset"|"ipvsadm"|"conntrack"|"dnsmasq"|
                 "wrk"|"dig": CHECK + {"version": str|null, "path": str|null}},
     "uml":     {"linux_uml"|"modules"|"ip_vs"|"nf_tables"|"sch_netem"|"dummy": CHECK},
     "proxy_modes": {"iptables"|"ipvs"|"nftables": CHECK + {"runs_on_host": bool|null}},
     "guest_kernel": CHECK + {"available": bool, "ipvs": bool, "netem": bool}}

where CHECK is ``{"status": str, "detail": str}``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from testbed import netns

OK = "ok"
MISSING = "missing"
ERROR = "error"
NEEDS_ROOT = "needs root"

NS_PREFIX = "tb-doctor-"
TIMEOUT = 10.0  # per subprocess; a probe never hangs the doctor
UML_MODULES_DIR = "/usr/lib/uml/modules"
IPVS_SCHEDULERS = ("rr", "wrr", "lc", "sh", "mh")

# Text of a failure that means "this kernel / tool lacks the feature" rather than
# "something went wrong".
_MISSING_RE = re.compile(
    r"unknown|not supported|not available|no such file|couldn't load|could not load|"
    r"can't initialize|not found|does not exist|not implemented|protocol not|"
    r"no such device|kernel doesn't support|not built in",
    re.I,
)
# stderr lines that are noise next to the real error text.
_NOISE_RE = re.compile(r"^(modprobe:|try `|#|warning:)", re.I)


@dataclass
class Check:
    status: str
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == OK

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "detail": self.detail, **self.extra}


# --------------------------------------------------------------------------- helpers


class _Missing(Exception):
    """A tool the probe needs is not installed."""


def _run(cmd: list[str], stdin: str | None = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``cmd`` (in the calling thread's namespace); a missing binary raises _Missing."""
    try:
        return subprocess.run(
            cmd, input=stdin, capture_output=True, text=True, timeout=timeout,
            stdin=None if stdin is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise _Missing(f"{cmd[0]} not installed") from None


def _err_text(r: subprocess.CompletedProcess, limit: int = 110) -> str:
    """The first meaningful line of a failed command's output."""
    lines = [ln.strip() for ln in (r.stderr + "\n" + r.stdout).splitlines() if ln.strip()]
    good = [ln for ln in lines if not _NOISE_RE.match(ln)] or lines
    text = good[0] if good else f"exit status {r.returncode}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _failed(r: subprocess.CompletedProcess, what: str = "") -> Check:
    text = _err_text(r)
    status = MISSING if _MISSING_RE.search(r.stderr + r.stdout) else ERROR
    return Check(status, f"{what}{text}")


def _tool_version(cmd: list[str]) -> str:
    """First line of ``cmd --version`` style output, "?" when it gives none."""
    try:
        r = _run(cmd, timeout=5)
    except (_Missing, subprocess.TimeoutExpired):
        return "?"
    return _first_line(r.stdout) or _first_line(r.stderr) or "?"


def _first_line(s: str, limit: int = 80) -> str:
    for ln in s.splitlines():
        if ln.strip():
            ln = ln.strip()
            return ln if len(ln) <= limit else ln[: limit - 1] + "…"
    return ""


def _version_of(text: str) -> str | None:
    m = re.search(r"\d+\.\d+(?:\.\d+)*", text)
    return m.group(0) if m else None


def _dpkg_version(package: str) -> str | None:
    try:
        r = _run(["dpkg-query", "-W", "-f", "${Version}", package], timeout=5)
    except (_Missing, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


@contextlib.contextmanager
def throwaway_ns() -> Iterator[str]:
    """A fresh namespace ``tb-doctor-<6 hex>``, deleted on exit whatever happens."""
    for _ in range(5):
        name = NS_PREFIX + secrets.token_hex(3)
        try:
            netns.create(name)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - five collisions of 24 random bits
        raise OSError(errno.EEXIST, "could not pick a free tb-doctor-* name")
    try:
        yield name
    finally:
        netns.delete(name)


def _guarded(fn: Callable[[], dict[str, Check]], keys: tuple[str, ...]) -> dict[str, Check]:
    """Run a probe; any exception becomes an error (or missing) result for its keys."""
    try:
        return fn()
    except _Missing as e:
        return {k: Check(MISSING, str(e)) for k in keys}
    except subprocess.TimeoutExpired as e:
        return {k: Check(ERROR, f"{e.cmd[0]} timed out after {e.timeout:.0f} s") for k in keys}
    except Exception as e:  # noqa: BLE001 - the doctor reports, it does not crash
        return {k: Check(ERROR, f"{type(e).__name__}: {e}"[:110]) for k in keys}


# --------------------------------------------------------------------------- system


def probe_system() -> dict[str, Check]:
    euid = os.geteuid()
    distro = ""
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    distro = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return {
        "root": Check(OK if euid == 0 else MISSING, f"euid {euid}" + ("" if euid == 0 else ": kernel probes skipped")),
        "python": Check(OK, f"{platform.python_version()} ({platform.python_implementation()})"),
        "kernel": Check(OK, os.uname().release),
        "distro": Check(OK if distro else MISSING, distro or "no PRETTY_NAME in /etc/os-release"),
    }


# --------------------------------------------------------------------------- kernel probes


def probe_netns() -> dict[str, Check]:
    t0 = time.perf_counter()
    with throwaway_ns() as ns:
        with netns.entered(ns):
            pass
    return {"netns": Check(OK, f"create/enter/delete {1000 * (time.perf_counter() - t0):.1f} ms")}


def _netlink_check(fn: Callable[[], Any], what: str) -> Check:
    """``what`` names the link, e.g. "veth pair": ok -> "veth pair"."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        fn()
    except NetlinkError as e:
        status = MISSING if e.code in (errno.EOPNOTSUPP, errno.ENOENT, errno.EPROTONOSUPPORT) else ERROR
        return Check(status, f"adding a {what}: {os.strerror(e.code) if e.code else e}")
    return Check(OK, f"{what} created")


def probe_links() -> dict[str, Check]:
    """veth, bridge and dummy link kinds; br_netfilter and conntrack sysctls."""
    from pyroute2 import IPRoute

    out: dict[str, Check] = {}
    with throwaway_ns() as ns:
        with netns.entered(ns):
            ipr = IPRoute()
            try:
                out["veth"] = _netlink_check(
                    lambda: ipr.link("add", ifname="tbd-veth0", kind="veth", peer="tbd-veth1"), "veth pair"
                )
                out["bridge"] = _netlink_check(lambda: ipr.link("add", ifname="tbd-br0", kind="bridge"), "bridge")
                out["dummy"] = _netlink_check(lambda: ipr.link("add", ifname="kube-ipvs0", kind="dummy"), "dummy kube-ipvs0")
                if out["dummy"].status == MISSING:
                    out["dummy"].detail += " (IPVS mode needs one)"
            finally:
                ipr.close()
            for key, path, label in (
                ("br_netfilter", "/proc/sys/net/bridge/bridge-nf-call-iptables", "bridge-nf-call-iptables"),
                ("nf_conntrack", "/proc/sys/net/netfilter/nf_conntrack_max", "nf_conntrack_max"),
            ):
                try:
                    with open(path) as f:
                        out[key] = Check(OK, f"{label} = {f.read().strip()}")
                except FileNotFoundError:
                    out[key] = Check(MISSING, f"no {path}")
                except OSError as e:
                    out[key] = Check(ERROR, f"{path}: {e.strerror}")
    return out


# A kube-proxy-shaped nat table: a Service chain, a probability split, a sticky rule.
IPTABLES_RULES = """\
*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-TBDOCTOR - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "tb/doctor cluster IP" -m tcp --dport 80 -j KUBE-SVC-TBDOCTOR
-A KUBE-SVC-TBDOCTOR -p tcp -m recent --name TBDOCTOR --rcheck --seconds 10800 --reap -j DNAT --to-destination 10.244.0.2:8080
-A KUBE-SVC-TBDOCTOR -p tcp -m statistic --mode random --probability 0.50000000000 -j DNAT --to-destination 10.244.0.3:8080
-A KUBE-SVC-TBDOCTOR -p tcp -j DNAT --to-destination 10.244.0.4:8080
COMMIT
"""


def _iptables_probe(backend: str) -> Check:
    """``iptables-<backend>-restore`` of a tiny nat table, then ``-save`` must show it."""
    version = _tool_version([f"iptables-{backend}", "--version"])
    with throwaway_ns() as ns, netns.entered(ns):
        r = _run([f"iptables-{backend}-restore"], stdin=IPTABLES_RULES)
        if r.returncode != 0:
            return _failed(r, f"{version}: ")
        s = _run([f"iptables-{backend}-save", "-t", "nat"])
    want = ("KUBE-SVC-TBDOCTOR", "statistic", "recent", "comment", "DNAT")
    lost = [w for w in want if w not in s.stdout]
    if s.returncode != 0 or lost:
        return Check(ERROR, f"{version}: -save does not show the rules ({', '.join(lost) or _err_text(s)})")
    return Check(OK, f"{version}: nat DNAT + statistic/comment/recent")


def probe_iptables_legacy() -> dict[str, Check]:
    return {"iptables_legacy": _iptables_probe("legacy")}


def probe_iptables_nft() -> dict[str, Check]:
    return {"iptables_nft": _iptables_probe("nft")}


NFT_RULES = """\
table ip tbdoctor {
    chain c {
        type nat hook prerouting priority -100;
        numgen random mod 2 vmap { 0 : accept, 1 : accept }
    }
}
"""


def probe_nftables() -> dict[str, Check]:
    version = _tool_version(["nft", "--version"])
    with throwaway_ns() as ns, netns.entered(ns):
        r = _run(["nft", "-f", "-"], stdin=NFT_RULES)
        if r.returncode != 0:
            return {"nftables": _failed(r, f"{version}: ")}
        s = _run(["nft", "list", "table", "ip", "tbdoctor"])
    if s.returncode != 0 or "numgen" not in s.stdout:
        return {"nftables": Check(ERROR, f"{version}: list does not show the numgen rule")}
    return {"nftables": Check(OK, f"{version}: nat chain + numgen vmap")}


def probe_ipset() -> dict[str, Check]:
    version = _tool_version(["ipset", "--version"])
    with throwaway_ns() as ns, netns.entered(ns):
        r = _run(["ipset", "create", "TBDOCTOR", "hash:ip,port"])
        if r.returncode != 0:
            return {"ipset": _failed(r, f"{version}: ")}
        s = _run(["ipset", "list", "TBDOCTOR"])
        _run(["ipset", "destroy", "TBDOCTOR"])
    if s.returncode != 0 or "TBDOCTOR" not in s.stdout:
        return {"ipset": _failed(s, f"{version}: list: ")}
    return {"ipset": Check(OK, f"{version}: hash:ip,port set created")}


def probe_ip_vs() -> dict[str, Check]:
    with throwaway_ns() as ns, netns.entered(ns):
        try:
            r: subprocess.CompletedProcess | None = _run(["ipvsadm", "-A", "-t", "10.0.0.1:80", "-s", "rr"])
        except _Missing:
            r = None
        proc = os.path.exists("/proc/net/ip_vs")
        if r is not None and r.returncode == 0:
            ipvs = Check(OK, "ipvsadm -A virtual service created")
        elif r is None:
            ipvs = Check(OK if proc else MISSING, ("/proc/net/ip_vs present" if proc else "no /proc/net/ip_vs") + " (ipvsadm not installed)")
        elif not proc:
            ipvs = Check(MISSING, "no /proc/net/ip_vs: " + _err_text(r))
        else:
            ipvs = _failed(r, "ipvsadm: ")
        if not ipvs.ok or r is None:
            why = "needs ip_vs" if not ipvs.ok else "needs ipvsadm"
            return {"ip_vs": ipvs, "ip_vs_schedulers": Check(MISSING, why, {"schedulers": {}})}
        scheds: dict[str, bool] = {}
        for i, s in enumerate(IPVS_SCHEDULERS):
            scheds[s] = _run(["ipvsadm", "-A", "-t", f"10.0.0.2:{81 + i}", "-s", s]).returncode == 0
    have = [s for s, v in scheds.items() if v]
    lack = [s for s, v in scheds.items() if not v]
    detail = " ".join(have) + (f"; missing: {' '.join(lack)}" if lack else "")
    return {"ip_vs": ipvs, "ip_vs_schedulers": Check(OK if not lack else MISSING, detail, {"schedulers": scheds})}


QDISCS = {
    "netem": ["netem", "delay", "1ms"],
    "htb": ["htb", "default", "1"],
    "tbf": ["tbf", "rate", "1mbit", "burst", "32kbit", "latency", "400ms"],
}


def _qdisc_probe(kind: str) -> Callable[[], dict[str, Check]]:
    def probe() -> dict[str, Check]:
        with throwaway_ns() as ns, netns.entered(ns):
            r = _run(["tc", "qdisc", "add", "dev", "lo", "root", *QDISCS[kind]])
        if r.returncode != 0:
            return {kind: _failed(r)}
        return {kind: Check(OK, "tc qdisc add dev lo root " + " ".join(QDISCS[kind]))}

    return probe


# (probe, the keys it reports)
KERNEL_PROBES: list[tuple[Callable[[], dict[str, Check]], tuple[str, ...]]] = [
    (probe_links, ("veth", "bridge", "dummy", "br_netfilter", "nf_conntrack")),
    (probe_iptables_legacy, ("iptables_legacy",)),
    (probe_iptables_nft, ("iptables_nft",)),
    (probe_nftables, ("nftables",)),
    (probe_ipset, ("ipset",)),
    (probe_ip_vs, ("ip_vs", "ip_vs_schedulers")),
    *((_qdisc_probe(k), (k,)) for k in QDISCS),
]
KERNEL_KEYS = ("netns", "veth", "bridge", "dummy", "br_netfilter", "iptables_legacy", "iptables_nft",
               "nftables", "ipset", "ip_vs", "ip_vs_schedulers", "netem", "htb", "tbf", "nf_conntrack")


# --------------------------------------------------------------------------- tools

# name -> (version command, Debian package to ask when the command gives no version)
TOOLS: dict[str, tuple[list[str], str]] = {
    "ip": (["ip", "-V"], "iproute2"),
    "tc": (["tc", "-V"], "iproute2"),
    "iptables": (["iptables", "--version"], "iptables"),
    "nft": (["nft", "--version"], "nftables"),
    "ipset": (["ipset", "--version"], "ipset"),
    # ipvsadm opens an IPVS socket (and runs modprobe ip_vs) even for --version/-h, in the
    # host namespace here: ask dpkg instead (the ip_vs probe runs it inside a throwaway netns).
    "ipvsadm": (["ipvsadm"], "ipvsadm"),
    "conntrack": (["conntrack", "--version"], "conntrack"),
    "dnsmasq": (["dnsmasq", "--version"], "dnsmasq-base"),
    "wrk": (["wrk", "--version"], "wrk"),
    "dig": (["dig", "-v"], "bind9-dnsutils"),
}


PACKAGE_VERSION_ONLY = {"ipvsadm"}


def probe_tool(name: str) -> Check:
    cmd, package = TOOLS[name]
    path = shutil.which(cmd[0])
    if path is None:
        return Check(MISSING, "not installed", {"version": None, "path": None})
    try:
        if name in PACKAGE_VERSION_ONLY:
            raise _Missing("no version command")
        r = _run(cmd, timeout=5)
        out = r.stdout + "\n" + r.stderr
    except (_Missing, subprocess.TimeoutExpired, OSError) as e:
        out = ""
        err = str(e)
    else:
        err = ""
    line = ""
    for ln in out.splitlines():
        if ln.strip() and _version_of(ln) and not _NOISE_RE.match(ln.strip()):
            line = _first_line(re.split(r"\s+Copyright", ln)[0])
            break
    version = _version_of(line) if line else None
    if version is None:  # e.g. a tool that needs the kernel feature to print its version
        pkg = _dpkg_version(package)
        if pkg:
            return Check(OK, f"package {package} {pkg}", {"version": _version_of(pkg) or pkg, "path": path})
        return Check(ERROR, err or _first_line(out) or "no version", {"version": None, "path": path})
    return Check(OK, line, {"version": version, "path": path})


# --------------------------------------------------------------------------- user-mode-linux


def _uml_version(path: str) -> str | None:
    """``linux.uml --version`` (prints the release and exits at once); bounded, and the
    whole process group is killed if it ever did something else (like booting)."""
    try:
        p = subprocess.Popen([path, "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    except OSError:
        return None
    try:
        out, _ = p.communicate(timeout=3)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return None
    line = _first_line(out)
    return line if p.returncode == 0 and re.fullmatch(r"\d+\.\d+[\w.+~-]*", line) else None


def _module_names(moddir: str) -> set[str]:
    """Module names found as files under ``moddir`` plus those listed as built in."""
    names: set[str] = set()
    for _root, _dirs, files in os.walk(moddir):
        for f in files:
            m = re.match(r"(.+)\.ko(\.(xz|zst|gz))?$", f)
            if m:
                names.add(m.group(1).replace("-", "_"))
    with contextlib.suppress(OSError), open(os.path.join(moddir, "modules.builtin")) as fh:
        for line in fh:
            base = os.path.basename(line.strip())
            names.add(re.sub(r"\.ko.*$", "", base).replace("-", "_"))
    return names


def probe_uml() -> dict[str, Check]:
    path = shutil.which("linux.uml") or ("/usr/bin/linux.uml" if os.access("/usr/bin/linux.uml", os.X_OK) else None)
    pkg = _dpkg_version("user-mode-linux")
    out: dict[str, Check] = {}
    release = None
    if path is None:
        out["linux_uml"] = Check(MISSING, "linux.uml not installed (Debian package user-mode-linux)")
    else:
        release = _uml_version(path)
        ver = release or "version unknown"
        out["linux_uml"] = Check(OK, f"{path} {ver}" + (f" (package {pkg})" if pkg else ""))
    try:
        releases = sorted(os.listdir(UML_MODULES_DIR), key=lambda v: [int(x) if x.isdigit() else 0 for x in re.split(r"[.-]", v)])
    except OSError:
        releases = []
    moddir = None
    if release and release in releases:
        moddir = os.path.join(UML_MODULES_DIR, release)
    elif releases:
        moddir = os.path.join(UML_MODULES_DIR, releases[-1])
    if moddir is None:
        out["modules"] = Check(MISSING, f"no {UML_MODULES_DIR}/<release>")
        names: set[str] = set()
    else:
        names = _module_names(moddir)
        out["modules"] = Check(OK, f"{moddir} ({len(names)} modules)")
    for key, mod in (("ip_vs", "ip_vs"), ("nf_tables", "nf_tables"), ("sch_netem", "sch_netem"), ("dummy", "dummy")):
        if moddir is None:
            out[key] = Check(MISSING, "no UML module directory")
        elif mod in names:
            extra = ""
            if key == "ip_vs":
                scheds = [s for s in IPVS_SCHEDULERS if f"ip_vs_{s}" in names]
                extra = f" (schedulers: {' '.join(scheds) or 'none'})"
            out[key] = Check(OK, f"{mod}.ko{extra}")
        else:
            out[key] = Check(MISSING, f"no {mod}.ko under {moddir}")
    return out


# --------------------------------------------------------------------------- conclusions


def conclude(root: bool, kernel: dict[str, Check], uml: dict[str, Check]) -> tuple[dict[str, Check], Check]:
    def verdict(needs: dict[str, bool], ok_detail: str) -> Check:
        if not root:
            return Check(NEEDS_ROOT, "kernel probes need root", {"runs_on_host": None})
        lack = [k for k, v in needs.items() if not v]
        if lack:
            return Check(MISSING, "missing: " + ", ".join(lack), {"runs_on_host": False})
        return Check(OK, ok_detail, {"runs_on_host": True})

    k = {key: c.ok for key, c in kernel.items()}
    backends = [b for b, key in (("legacy", "iptables_legacy"), ("nft", "iptables_nft")) if k.get(key)]
    iptables = verdict({"iptables (legacy or nft backend)": bool(backends)}, "backends: " + ", ".join(backends))
    iptables.extra["backends"] = backends if root else []
    ipvs = verdict(
        {"ip_vs": k.get("ip_vs", False), "dummy links": k.get("dummy", False), "ipset": k.get("ipset", False),
         "iptables": bool(backends)},
        "ip_vs, dummy, ipset, iptables" + (f"; schedulers {kernel['ip_vs_schedulers'].detail}" if "ip_vs_schedulers" in kernel else ""),
    )
    nft = verdict({"nftables (nat + numgen)": k.get("nftables", False)}, "nft nat chain + numgen vmap")
    modes = {"iptables": iptables, "ipvs": ipvs, "nftables": nft}

    available = uml["linux_uml"].ok and uml["modules"].ok
    g_ipvs = available and uml["ip_vs"].ok
    g_netem = available and uml["sch_netem"].ok
    if available:
        feats = [f for f, v in (("IPVS", g_ipvs), ("netem", g_netem)) if v]
        detail = "yes: linux.uml" + (f" ({', '.join(feats)} there)" if feats else " (no IPVS there)")
        guest = Check(OK, detail, {"available": True, "ipvs": g_ipvs, "netem": g_netem})
    else:
        guest = Check(MISSING, "no: " + (uml["linux_uml"].detail if not uml["linux_uml"].ok else uml["modules"].detail),
                      {"available": False, "ipvs": False, "netem": False})
    return modes, guest


# --------------------------------------------------------------------------- run + render


def run(guest_kernel: bool = True) -> dict[str, Any]:
    """All probes; returns the JSON-ready report. ``guest_kernel``: also boot the UML
    guest once (~5 s) and probe its kernel the same way."""
    t0 = time.perf_counter()
    root = os.geteuid() == 0
    system = probe_system()
    from testbed import guest as guest_mod

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="doctor") as pool:
        guest_f = pool.submit(guest_mod.capabilities, 120.0) if guest_kernel and root and guest_mod.available() else None
        tool_f = {name: pool.submit(probe_tool, name) for name in TOOLS}
        uml_f = pool.submit(_guarded, probe_uml, ("linux_uml", "modules", "ip_vs", "nf_tables", "sch_netem", "dummy"))
        kernel: dict[str, Check] = {}
        if not root:
            kernel = {k: Check(NEEDS_ROOT, "kernel probes need root") for k in KERNEL_KEYS}
        else:
            # netns first (and alone): it also makes /run/netns a shared mount once.
            kernel.update(_guarded(probe_netns, ("netns",)))
            if not kernel["netns"].ok:
                kernel.update({k: Check(ERROR, "no network namespaces") for k in KERNEL_KEYS if k != "netns"})
            else:
                futs = [pool.submit(_guarded, fn, keys) for fn, keys in KERNEL_PROBES]
                for f in futs:
                    kernel.update(f.result())
        tools = {name: f.result() for name, f in tool_f.items()}
        uml = uml_f.result()
        try:
            booted = guest_f.result() if guest_f else None
        except Exception as e:  # noqa: BLE001 - a guest that fails to boot is a finding, not a crash
            booted = {"available": False, "detail": f"guest kernel did not boot: {e}", "kernel": {}, "proxy_modes": {}}
    kernel = {k: kernel[k] for k in KERNEL_KEYS}  # stable order
    modes, guest = conclude(root, kernel, uml)
    return {
        "schema": 1,
        "root": root,
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "system": {k: c.as_dict() for k, c in system.items()},
        "kernel": {k: c.as_dict() for k, c in kernel.items()},
        "tools": {k: c.as_dict() for k, c in tools.items()},
        "uml": {k: c.as_dict() for k, c in uml.items()},
        "proxy_modes": {k: c.as_dict() for k, c in modes.items()},
        "guest_kernel": guest.as_dict(),
        "guest": booted,
    }


STYLE = {OK: "green", MISSING: "yellow", ERROR: "red", NEEDS_ROOT: "magenta"}
LABELS = {
    "system": {"root": "root", "python": "Python", "kernel": "kernel (uname -r)", "distro": "distro"},
    "kernel": {
        "netns": "network namespaces", "veth": "veth", "bridge": "bridge", "dummy": "dummy link (kube-ipvs0)",
        "br_netfilter": "br_netfilter", "iptables_legacy": "iptables legacy backend",
        "iptables_nft": "iptables nf_tables backend", "nftables": "nftables (nat, numgen)", "ipset": "ipset",
        "ip_vs": "ip_vs (IPVS)", "ip_vs_schedulers": "IPVS schedulers", "netem": "netem qdisc",
        "htb": "HTB qdisc", "tbf": "TBF qdisc", "nf_conntrack": "nf_conntrack",
    },
    "uml": {"linux_uml": "linux.uml", "modules": "module dir", "ip_vs": "ip_vs.ko", "nf_tables": "nf_tables.ko",
            "sch_netem": "sch_netem.ko", "dummy": "dummy.ko"},
    "proxy_modes": {"iptables": "iptables mode", "ipvs": "ipvs mode", "nftables": "nftables mode"},
}
SECTIONS = (
    ("system", "system"),
    ("kernel", "host kernel (in a throwaway netns)"),
    ("tools", "tools"),
    ("uml", "UML guest kernel (files only)"),
)


def _status_text(status: str) -> Text:
    return Text(status, style=STYLE.get(status, ""))


def render(report: dict[str, Any], console: Console) -> None:
    t = Table(title=f"testbed doctor ({report['elapsed_s']:.2f} s)", title_justify="left")
    t.add_column("CHECK", no_wrap=True)
    t.add_column("STATUS", no_wrap=True)
    t.add_column("DETAIL", overflow="fold")
    for key, title in SECTIONS:
        t.add_row(Text(title, style="bold"), "", "")
        for name, c in report[key].items():
            t.add_row(Text("  " + LABELS.get(key, {}).get(name, name)), _status_text(c["status"]), Text(c["detail"]))
        t.add_section()
    console.print(t)

    m = Table(title="proxy modes on the HOST kernel", title_justify="left")
    m.add_column("MODE", no_wrap=True)
    m.add_column("CAN RUN", no_wrap=True)
    m.add_column("DETAIL", overflow="fold")
    for name, c in report["proxy_modes"].items():
        can = {True: "yes", False: "no", None: "?"}[c["runs_on_host"]]
        m.add_row(LABELS["proxy_modes"][name], Text(can, style=STYLE[c["status"]]), Text(c["detail"]))
    g = report["guest_kernel"]
    m.add_section()
    m.add_row("guest kernel (UML)", Text("yes" if g["available"] else "no", style=STYLE[g["status"]]), Text(g["detail"]))
    booted = report.get("guest")
    if booted and booted.get("kernel"):
        for name, ok in booted.get("proxy_modes", {}).items():
            m.add_row(f"{LABELS['proxy_modes'].get(name, name)} in the guest", Text("yes" if ok else "no",
                      style="green" if ok else "yellow"), Text(f"UML kernel {booted.get('release', '')}"))
    console.print(m)
    if booted and booted.get("kernel"):
        gt = Table(title=f"guest kernel (UML {booted.get('release', '')}, booted in {booted.get('boot_s', 0):.1f} s)",
                   title_justify="left")
        gt.add_column("CHECK", no_wrap=True)
        gt.add_column("STATUS", no_wrap=True)
        gt.add_column("DETAIL", overflow="fold")
        for name, c in booted["kernel"].items():
            gt.add_row(LABELS["kernel"].get(name, name), _status_text(c["status"]), Text(c["detail"]))
        console.print(gt)
    elif booted:
        console.print(f"guest kernel: {booted.get('detail', 'not available')}")


def main(console: Console, json_output: bool = False, guest_kernel: bool = True) -> int:
    report = run(guest_kernel=guest_kernel)
    if json_output:
        console.print(json.dumps(report, indent=2), markup=False, highlight=False, emoji=False, soft_wrap=True)
    else:
        render(report, console)
    return 0
