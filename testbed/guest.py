"""The guest kernel: User-Mode Linux, for what the host kernel lacks (IPVS, netem).

This machine's kernel has no ip_vs and no netem; Debian's ``user-mode-linux`` (a
Linux 6.1 kernel that runs as an ordinary process, ``/usr/bin/linux.uml``, modules
in /usr/lib/uml/modules/<release>) has both. The guest's root file system is the
host's own ``/`` through hostfs, so the project's venv and files run inside as
they are. Its network stack is its own: nothing it does appears in the host's
namespaces (the only host object is, for a cluster guest, a tap device inside a
run-owned namespace ``tb-<id>-guest``).

Two ways to use it:

* :func:`run` boots a fresh guest, runs one command inside, returns its exit
  status and output, and powers the guest off (``testbed guest -- CMD``).
* :func:`start_cluster_guest` keeps a guest alive with a cluster inside
  (``testbed up --kernel uml``): later CLI calls are sent to an agent in the guest
  with :func:`forward`; :func:`stop` ends it.

How a guest is started (see :mod:`testbed.guest_agent` for the inside):

* an *exchange directory* on the host holds ``init`` (a fixed shell script: mounts
  proc, sysfs and a tmpfs on /run, then execs the agent), ``spec.json`` (argv,
  environment, working directory, modules, sysctls) and receives the results;
  for :func:`run` it is a ``tb-guest-*`` temporary directory, for a cluster
  ``/run/testbed/<name>/guest``; both are removed when the guest is gone;
* everything variable reaches the guest on the kernel command line (the kernel
  hands unknown ``key=value`` words to init as environment variables), among them
  the marker ``tb_guest=<id>`` by which every ``linux.uml`` process we start is
  found again (:func:`find_guest_processes`), and ``uml_dir=`` so that UML's own
  pid/mconsole directory is inside the exchange directory too;
* the UML process tree gets its own session (one process group: the kernel and
  its helper processes) which is SIGKILLed on timeout, error or Ctrl-C;
  :func:`run`'s guests also die with their parent (``PR_SET_PDEATHSIG``).

A trap of this host (measured on it, not in older notes): the CPU has AVX-512 and
AMX, so the kernel's XSAVE area is larger than the one UML 6.1 hands to
``PTRACE_SETREGSET(NT_X86_XSTATE)``, which the host refuses (EFAULT) and UML
panics at the first process ("ptrace set fp regs failed, errno = 14"). We start
``linux.uml`` under a seccomp filter that makes that one ptrace request fail
(EIO), so UML falls back to ``PTRACE_GETFPREGS``/``SETFPREGS`` (x87/SSE state
only). UML then does not restore AVX/AVX-512 registers after it handled a page
fault of a guest process (the host's signal delivery resets them), which silently
corrupts glibc's AVX2/EVEX string functions (printf printed its format string,
python failed in getpath). So every guest process runs with wide vectors off:
``GLIBC_TUNABLES`` (glibc's string functions and memcpy), ``OPENSSL_ia32cap``,
``NPY_DISABLE_CPU_FEATURES``, ``OPENBLAS_CORETYPE``, ``ARROW_USER_SIMD_LEVEL``
(:data:`NO_WIDE_VECTORS`) — given on the kernel command line so that even init
has them. Code that uses AVX by its own CPUID test, outside these libraries, is
not covered (none of the project's tools do).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from testbed.errors import InputError, KernelError, NotRootError, StateError

UML_BINARY = "linux.uml"
UML_MODULES_DIR = "/usr/lib/uml/modules"
UML_CONFIG = "/usr/share/doc/user-mode-linux/config.gz"
AGENT = Path(__file__).resolve().with_name("guest_agent.py")
MARKER = "tb_guest"  # tb_guest=<id> on the command line of every linux.uml we start
TMP_PREFIX = "tb-guest-"

# Kernel modules loaded at boot: what kube-proxy's three modes, the fabric and the
# traffic use — every IPVS scheduler kube-proxy accepts (a scheduler sweep must not
# load one inside a measured sync), the ipset types of kube-proxy's sets, the iptables
# matches and targets of its rules, netem/htb/tbf. Nothing else is loaded: each
# module costs 20-60 ms of boot here (this list: boot to ready 3.7 s; with another 27
# link types, qdiscs, classifiers and matches: 5.3 s). kernel.modprobe points at a
# wrapper with the UML module tree that logs every request the kernel makes
# (/run/tbguest-modules/requests.log in the guest), but a load the kernel asks for
# that way fails in this guest (measured: `ip link add X type ifb`, `iptables -m
# limit`): a module the project starts to use must be added here.
# ``bpfilter`` first: without it this 6.1 kernel asks for it (request_module, i.e.
# a modprobe process) on every iptables get/setsockopt — ~20 ms each in the guest,
# 2-3 per iptables call — and a node kernel built like this one (BPFILTER_UMH=m, as
# Debian's) loads it at its first iptables call anyway. Its user-mode helper answers
# ENOPROTOOPT and the kernel goes on with x_tables as usual.
GUEST_MODULES: tuple[str, ...] = (
    "bpfilter",
    "veth", "bridge", "br_netfilter", "dummy", "tun",
    "nf_conntrack", "nf_nat", "nf_conntrack_netlink", "nfnetlink_acct", "nf_reject_ipv4",
    "ip_tables", "iptable_nat", "iptable_filter", "iptable_mangle", "iptable_raw",
    "xt_nat", "xt_statistic", "xt_comment", "xt_mark", "xt_connmark", "xt_addrtype", "xt_tcpudp", "xt_sctp",
    "xt_conntrack", "xt_state", "xt_MASQUERADE", "xt_REDIRECT", "xt_recent", "xt_multiport", "xt_set",
    "xt_ipvs", "xt_physdev", "xt_nfacct", "ipt_REJECT",
    "ip_vs", *(f"ip_vs_{s}" for s in ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh", "fo", "ovf")),
    "ip_set", *(f"ip_set_{t}" for t in ("hash_ip", "hash_ipport", "hash_ipportip", "hash_ipportnet", "hash_net",
                                        "bitmap_port")),
    "sch_netem", "sch_htb", "sch_tbf",
)

# Global sysctls set at boot, as on the host (ENVIRONMENT.md: bridged frames cross
# the FORWARD chain of the namespace holding the bridge). Per-namespace ones are
# the business of whoever builds the namespaces.
GUEST_SYSCTLS: dict[str, str] = {
    "net.bridge.bridge-nf-call-iptables": "1",
    "net.bridge.bridge-nf-call-ip6tables": "1",
}

# Raised (never lowered) at boot: what kube-proxy's conntracker does once per node
# kernel at start-up (cmd/kube-proxy/app/conntrack.go, SetMax): nf_conntrack_max =
# max(conntrack.maxPerCore 32768 x CPUs, conntrack.min 131072) if lower, hashsize =
# max/4 if lower. All nodes of a guest share its one kernel (1 CPU), so it is done
# here; the guest's own default would be 8192. (The host has 262144 already.)
CONNTRACK_MAX = max(32768 * 1, 131072)
GUEST_RAISE: dict[str, int] = {
    "/proc/sys/net/netfilter/nf_conntrack_max": CONNTRACK_MAX,
    "/sys/module/nf_conntrack/parameters/hashsize": CONNTRACK_MAX // 4,
}

# See the module docstring: UML cannot restore wide vector registers here.
NO_WIDE_VECTORS: dict[str, str] = {
    "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX_Fast_Unaligned_Load",
    # OpenSSL: ~CPUID.1:ECX.AVX (bit 60 of word 1) : ~CPUID.7:EBX.{AVX2,AVX512F,DQ,IFMA,BW,VL}
    "OPENSSL_ia32cap": "~0x1000000000000000:~0xc0230020",
    "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR AVX512_SKX AVX512_CLX AVX512_CNL "
                                "AVX512_KNL AVX512_KNM AVX512F AVX512CD AVX2 FMA3 F16C AVX",
    "OPENBLAS_CORETYPE": "Nehalem",
    "ARROW_USER_SIMD_LEVEL": "NONE",
}

# Cluster guests: host end (tap in the run's namespace) and guest end of the link.
TAP = "tbtap0"
HOST_ADDRESS = "169.254.77.1"
GUEST_ADDRESS = "169.254.77.2"
PREFIXLEN = 30
AGENT_PORT = 7077

INIT_SCRIPT = """\
#!/bin/sh
# PID 1 of a testbed guest kernel (User-Mode Linux), written by testbed.guest.
# Fixed text: tb_python, tb_agent (and tb_dir, tb_guest) come from the kernel
# command line. /run first: ip netns would otherwise write the host's /run/netns.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755 tmpfs /run
exec "$tb_python" -I -S "$tb_agent" init
"""

_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/+@:-]*$")


class GuestError(KernelError):
    """The guest kernel could not be started, crashed, or did not answer."""

    guest_id: str = ""


class GuestTimeout(GuestError):
    def __init__(self, timeout: float):
        self.timeout = timeout
        super().__init__(f"guest kernel did not finish within {timeout:g} s: killed")


@dataclass
class GuestResult:
    returncode: int
    stdout: str
    stderr: str
    boot_s: float  # host clock: start of linux.uml -> the guest is ready (modules loaded)
    total_s: float  # host clock: start of linux.uml -> it exited
    info: dict[str, Any] = field(default_factory=dict)  # the guest's ready.json (+ result timings)


# --------------------------------------------------------------------------- UML binary


def uml_binary() -> str:
    path = shutil.which(UML_BINARY) or ("/usr/bin/linux.uml" if os.access("/usr/bin/linux.uml", os.X_OK) else None)
    if path is None:
        raise GuestError("no guest kernel: linux.uml is not installed (Debian package user-mode-linux)")
    return path


def available() -> bool:
    try:
        uml_binary()
    except GuestError:
        return False
    return bool(_module_releases())


def _module_releases() -> list[str]:
    try:
        return sorted(d for d in os.listdir(UML_MODULES_DIR) if os.path.isdir(os.path.join(UML_MODULES_DIR, d)))
    except OSError:
        return []


def uml_config() -> dict[str, str]:
    """The guest kernel's build configuration (CONFIG_X -> y/m/value); {} if unknown."""
    try:
        with gzip.open(UML_CONFIG, "rt") as f:
            return dict(m.groups() for m in re.finditer(r"^(CONFIG_\w+)=(.*)$", f.read(), re.M))
    except OSError:
        return {}


# --------------------------------------------------------------------------- processes


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] not in "ZX"
    except (OSError, IndexError):
        return False


def find_guest_processes(guest_id: str | None = None) -> list[int]:
    """Live processes of the guests this module started (``linux.uml`` and the
    ``unshare`` holding it; any guest, or one guest id), found by the marker."""
    want = f"{MARKER}={guest_id}" if guest_id else f"{MARKER}="
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        cmd = _cmdline(int(entry))
        if not cmd or not os.path.basename(cmd[0]).startswith(("linux", "unshare")):
            continue
        if any(a == want or (guest_id is None and a.startswith(want)) for a in cmd[1:]) and _alive(int(entry)):
            found.append(int(entry))
    return sorted(found)


def _kill_guest(pgid: int, guest_id: str, wait_s: float = 5.0) -> list[int]:
    """SIGKILL the guest's process group and any stray process carrying its marker;
    wait (bounded) until none is alive. Returns the pids that were alive."""
    pids = find_guest_processes(guest_id)
    if pgid and pids:  # a live member keeps the group id from being reused
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while True:
        left = find_guest_processes(guest_id)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if left:
        raise GuestError(f"guest {guest_id}: linux.uml process(es) {left} survived SIGKILL")
    return sorted(set(pids))


# --------------------------------------------------------------------------- boot


def _check_path(what: str, path: str) -> str:
    if not _SAFE_PATH.match(path) or len(path) > 400:
        raise InputError(f'Invalid value: "{path}": a path handed to the guest kernel may only contain '
                         "letters, digits and ._/+@:-", field=what)
    return path


def _new_id() -> str:
    return secrets.token_hex(3)


def guest_env(env: dict[str, str] | None = None, python: str | None = None) -> dict[str, str]:
    """The environment of a command in the guest: a clean login-like one with the
    project's venv first on PATH, ``env`` on top, wide vectors always off."""
    python = python or sys.executable
    venv_bin = os.path.dirname(python)
    base = {
        "PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "TESTBED_GUEST": "1",
    }
    if os.path.exists(os.path.join(os.path.dirname(venv_bin), "pyvenv.cfg")):
        base["VIRTUAL_ENV"] = os.path.dirname(venv_bin)
    base.update(env or {})
    base.update(NO_WIDE_VECTORS)
    return base


def _kernel_argv(guest_id: str, xdir: str, mem: str, net: bool) -> list[str]:
    if not re.fullmatch(r"\d+[KMG]?", mem):
        raise InputError(f'Invalid value: "{mem}": memory size like 1G or 512M', field="mem")
    python = _check_path("python", sys.executable)
    argv = [
        uml_binary(), f"mem={mem}", "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "rw",
        f"init={xdir}/init", "con0=null,fd:1", "con=null", "ssl=null", "quiet",
        f"uml_dir={xdir}", f"umid=tb-{guest_id}",
        f"{MARKER}={guest_id}", f"tb_dir={xdir}", f"tb_python={python}", f"tb_agent={_check_path('agent', str(AGENT))}",
        # for init and the agent itself (no spaces on a kernel command line; numpy takes commas)
        *(f"{k}={v.replace(' ', ',')}" for k, v in NO_WIDE_VECTORS.items()),
    ]
    if net:
        argv.append(f"eth0=tuntap,{TAP}")
    return argv


def launcher_argv(kargv: list[str], die_with_parent: bool) -> list[str]:
    """The command line that starts linux.uml (``kargv``) the way every guest starts:

    ``python -I -S guest_agent.py launch PPID`` (a few ms: prctl, then exec) installs
    the seccomp filter of the module docstring, and with ``die_with_parent`` makes
    itself die with us (``PR_SET_PDEATHSIG``); it execs ``unshare --pid --fork
    --kill-child``, which makes linux.uml PID 1 of a new PID namespace and kills it
    when ``unshare`` dies: when PID 1 of a namespace dies, however it dies, the
    kernel kills every process in it (UML's helper processes would otherwise
    survive a SIGKILL of the UML kernel process, measured)."""
    unshare = shutil.which("unshare") or "/usr/bin/unshare"
    return [sys.executable, "-I", "-S", str(AGENT), "launch", str(os.getpid()) if die_with_parent else "0",
            unshare, "--pid", "--fork", "--kill-child", "--", *kargv]


#: ``TESTBED_GUEST_CPU``: the host CPU every guest process is pinned to (a number), or
#: ``none``; default: the last CPU this process may use, when it may use two or more.
GUEST_CPU_ENV = "TESTBED_GUEST_CPU"
#: How the launcher learns the CPU (it pins itself, then execs: no process of the
#: guest ever runs elsewhere, not even UML's first helper).
LAUNCH_CPU_ENV = "TB_GUEST_CPU"


def guest_cpu() -> int | None:
    """The host CPU the guest runs on (``None``: not pinned).

    The guest kernel is one CPU; its processes are host processes that hand the CPU
    to each other (ptrace). Left to the host scheduler they hop between cores, and
    every cross-core wake-up costs what a VM's idle core takes to wake: measured with
    a bare veth connect loop in the guest, connect times fell into stretches of ~90
    and ~400 us lasting seconds; pinned, the ~400 us stretches are gone (the p95 of
    the demo's probes fell from 500-900 to 330-500 us)."""
    v = os.environ.get(GUEST_CPU_ENV, "").strip().lower()
    allowed = sorted(os.sched_getaffinity(0))
    if v in ("none", "off", "no"):
        return None
    if v:
        if not (v.isascii() and v.isdigit()) or int(v) not in allowed:
            raise InputError(f"Invalid value: {v!r}: must be none or one of the CPUs this process may use "
                             f"({', '.join(map(str, allowed))})", field=GUEST_CPU_ENV)
        return int(v)
    return allowed[-1] if len(allowed) >= 2 else None


def _launch(kargv: list[str], xdir: str, die_with_parent: bool) -> subprocess.Popen:
    """Start a guest (see :func:`launcher_argv`) in its own session — its process
    group is the whole guest — with console output to ``xdir/console.log``, pinned to
    :func:`guest_cpu`."""
    env = _uml_env()
    cpu = guest_cpu()
    if cpu is not None:
        env[LAUNCH_CPU_ENV] = str(cpu)
    with open(os.path.join(xdir, "console.log"), "wb") as console:
        return subprocess.Popen(launcher_argv(kargv, die_with_parent), stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _write_exchange(xdir: str, spec: dict) -> None:
    init = os.path.join(xdir, "init")
    with open(init, "w") as f:
        f.write(INIT_SCRIPT)
    os.chmod(init, 0o755)
    with open(os.path.join(xdir, "spec.json"), "w") as f:
        json.dump(spec, f)


def _uml_env() -> dict[str, str]:
    """linux.uml's own environment: it keeps guest RAM in a file under TMPDIR (tmpfs
    is needed for speed) — /dev/shm, unlinked at once."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    if os.path.isdir("/dev/shm"):
        env["TMPDIR"] = "/dev/shm"
    return env


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _console_tail(xdir: str, n: int = 3) -> str:
    try:
        with open(os.path.join(xdir, "console.log"), errors="replace") as f:
            lines = [ln.strip() for ln in f.read().splitlines() if ln.strip() and not ln.startswith((" [<", "Call Trace", "Stack:"))]
    except OSError:
        return ""
    interesting = [ln for ln in lines if re.search(r"panic|error|fail|killed|unable|cannot", ln, re.I)]
    return " | ".join((interesting or lines)[-n:])


class _Tail:
    """Copies what a file gains to a stream (streamed command output)."""

    def __init__(self, path: str, stream: IO[bytes]):
        self.path, self.stream, self.pos = path, stream, 0

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            return
        if data:
            self.pos += len(data)
            self.stream.write(data)
            self.stream.flush()


def run(
    argv: list[str],
    *,
    timeout: float,
    mem: str = "1G",
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    modules: list[str] | tuple[str, ...] | None = None,
    stream: tuple[IO[bytes], IO[bytes]] | None = None,
) -> GuestResult:
    """Boot a fresh guest kernel, run ``argv`` inside, power it off.

    The guest sees the host's files (the same venv: ``python`` on PATH is this
    project's), with its own /run, /dev, /etc (overlay) and network stack;
    ``cwd`` defaults to the current directory. ``modules`` (default
    :data:`GUEST_MODULES`) are loaded before the command starts. ``stream``: copy the
    command's stdout/stderr to these binary streams while it runs.

    Raises :class:`GuestTimeout` (after killing every process of the guest) when the
    whole thing takes longer than ``timeout`` seconds, :class:`GuestError` when the
    guest crashes; KeyboardInterrupt also kills the guest first. Leaves nothing
    behind (no process, no file).
    """
    if not argv:
        raise InputError("no command given", field="argv")
    cwd = cwd or os.getcwd()
    guest_id = _new_id()
    xdir = tempfile.mkdtemp(prefix=TMP_PREFIX + guest_id + "-")
    proc: subprocess.Popen | None = None
    t0 = time.monotonic()
    try:
        _check_path("exchange directory", xdir)
        spec = {
            "mode": "run", "argv": [str(a) for a in argv], "cwd": cwd, "env": guest_env(env),
            "modules": list(GUEST_MODULES if modules is None else modules), "sysctls": GUEST_SYSCTLS,
            "raise": GUEST_RAISE,
        }
        _write_exchange(xdir, spec)
        kargv = _kernel_argv(guest_id, xdir, mem, net=False)
        proc = _launch(kargv, xdir, die_with_parent=True)
        tails = [_Tail(os.path.join(xdir, "stdout"), stream[0]), _Tail(os.path.join(xdir, "stderr"), stream[1])] if stream else []
        boot_s = None
        deadline = t0 + timeout
        while True:
            try:
                proc.wait(timeout=0.02)
                break
            except subprocess.TimeoutExpired:
                pass
            if boot_s is None and os.path.exists(os.path.join(xdir, "ready.json")):
                boot_s = time.monotonic() - t0
            for t in tails:
                t.pump()
            if time.monotonic() > deadline:
                raise GuestTimeout(timeout)
        total_s = time.monotonic() - t0
        for t in tails:
            t.pump()
        ready = _read_json(os.path.join(xdir, "ready.json")) or {}
        result = _read_json(os.path.join(xdir, "result.json"))
        if result is None or "rc" not in result:
            why = (result or {}).get("error") or _console_tail(xdir) or f"linux.uml exited with status {proc.returncode}"
            raise GuestError(f"guest kernel ended without a result: {why}")
        out, err = (_read_text(os.path.join(xdir, n)) for n in ("stdout", "stderr"))
        info = dict(ready, guest_id=guest_id)
        info.update({k: v for k, v in result.items() if k != "rc"})
        if int(result["rc"]) < 0:  # killed by a signal: the guest kernel's console says why (e.g. its OOM killer)
            info["console_tail"] = _console_tail(xdir, 40)
        return GuestResult(int(result["rc"]), out, err, round(boot_s if boot_s is not None else total_s, 3), round(total_s, 3), info)
    except GuestError as e:
        e.guest_id = guest_id  # which guest it was (its processes and files are gone)
        raise
    finally:
        if proc is not None:
            _kill_guest(proc.pid, guest_id)
            with contextlib.suppress(ChildProcessError, OSError):
                proc.wait(timeout=5)
        shutil.rmtree(xdir, ignore_errors=True)


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def main_guest(argv: list[str], timeout: float) -> int:
    """``testbed guest [--timeout S] -- CMD ARGS...``: stream the command's output,
    return its exit status (a command killed by signal N gives 128+N, as a shell)."""
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise InputError("no command given: testbed guest [--timeout S] -- COMMAND [ARG...]")
    r = run(argv, timeout=timeout, stream=(sys.stdout.buffer, sys.stderr.buffer))
    return r.returncode if r.returncode >= 0 else 128 - r.returncode


# --------------------------------------------------------------------------- capabilities

_PROBE_SCRIPT = """\
import json, sys
from testbed import doctor
checks = dict(doctor._guarded(doctor.probe_netns, ("netns",)))
for fn, keys in doctor.KERNEL_PROBES:
    checks.update(doctor._guarded(fn, keys))
print(json.dumps({k: checks[k].as_dict() for k in doctor.KERNEL_KEYS if k in checks}))
"""


def capabilities(timeout: float = 180.0) -> dict[str, Any]:
    """Boot the guest once and report what its kernel has, with the same probes and
    keys as ``testbed doctor``'s host-kernel section (each in a throwaway namespace
    inside the guest), plus a summary::

        {"available": bool, "detail": str, "release": str, "boot_s": float,
         "modules_failed": [..], "kernel": {KEY: {"status", "detail", ...}},
         "summary": {"ip_vs": bool, "ipvs_schedulers": [..], "netem": bool,
                     "iptables_legacy_nat": bool, "nftables_ip_nat": bool,
                     "dummy": bool, "ipset": bool},
         "proxy_modes": {"iptables": bool, "ipvs": bool, "nftables": bool}}
    """
    if not available():
        return {"available": False, "detail": "linux.uml or its modules are not installed (Debian package user-mode-linux)"}
    try:
        r = run([sys.executable, "-c", _PROBE_SCRIPT], timeout=timeout)
    except GuestError as e:
        return {"available": False, "detail": str(e)}
    try:
        kernel = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"available": False, "detail": f"the probe in the guest failed (exit {r.returncode}): {last}"}

    def ok(key: str) -> bool:
        return kernel.get(key, {}).get("status") == "ok"

    scheds = kernel.get("ip_vs_schedulers", {}).get("schedulers", {})
    summary = {
        "ip_vs": ok("ip_vs"),
        "ipvs_schedulers": sorted(s for s, v in scheds.items() if v),
        "netem": ok("netem"),
        "iptables_legacy_nat": ok("iptables_legacy"),
        "nftables_ip_nat": ok("nftables"),
        "dummy": ok("dummy"),
        "ipset": ok("ipset"),
    }
    modes = {
        "iptables": ok("iptables_legacy") or ok("iptables_nft"),
        "ipvs": summary["ip_vs"] and summary["dummy"] and summary["ipset"] and (ok("iptables_legacy") or ok("iptables_nft")),
        "nftables": summary["nftables_ip_nat"],
    }
    release = r.info.get("release", "?")
    return {
        "available": True,
        "detail": f"linux.uml {release}: " + ", ".join(m for m, v in modes.items() if v) + " mode(s)",
        "release": release,
        "boot_s": r.boot_s,
        "modules_failed": r.info.get("modules_failed", []),
        "kernel": kernel,
        "summary": summary,
        "proxy_modes": modes,
    }


# --------------------------------------------------------------------------- choosing a kernel


def _host_lacks(mode: str) -> list[str]:
    """What the host kernel lacks for a kube-proxy mode (doctor's probes, each in a
    throwaway namespace). Needs root."""
    from testbed import doctor

    def check(fn: Callable[[], dict], key: str) -> bool:
        try:
            return fn()[key].ok
        except Exception:  # noqa: BLE001 - a probe that cannot run counts as missing
            return False

    lack = []
    if mode == "ipvs":
        if not check(doctor.probe_ip_vs, "ip_vs"):
            lack.append("ip_vs")
        if not check(doctor.probe_links, "dummy"):
            lack.append("dummy links")
        if not check(doctor.probe_ipset, "ipset"):
            lack.append("ipset")
    elif mode == "nftables":
        if not check(doctor.probe_nftables, "nftables"):
            lack.append("nftables nat + numgen")
    elif mode == "iptables":
        if not (check(doctor.probe_iptables_legacy, "iptables_legacy") or check(doctor.probe_iptables_nft, "iptables_nft")):
            lack.append("iptables")
    return lack


def guest_lacks(mode: str) -> list[str]:
    """What the guest kernel lacks for a kube-proxy mode, from its build
    configuration (no boot; :func:`capabilities` checks the real thing)."""
    cfg = uml_config()
    if not cfg:  # no config file: judge by module files
        names = set()
        for rel in _module_releases():
            for _root, _dirs, files in os.walk(os.path.join(UML_MODULES_DIR, rel)):
                names.update(f.split(".ko")[0] for f in files if ".ko" in f)
        have = {"CONFIG_IP_VS": "ip_vs" in names, "CONFIG_DUMMY": "dummy" in names, "CONFIG_IP_SET": "ip_set" in names,
                "CONFIG_IP_NF_NAT": "iptable_nat" in names, "CONFIG_NF_TABLES_IPV4": False}
    else:
        have = {k: cfg.get(k) in ("y", "m") for k in ("CONFIG_IP_VS", "CONFIG_DUMMY", "CONFIG_IP_SET", "CONFIG_IP_NF_NAT",
                                                      "CONFIG_NF_TABLES_IPV4", "CONFIG_NFT_NUMGEN")}
    needs = {
        "iptables": {"CONFIG_IP_NF_NAT": "iptables nat"},
        "ipvs": {"CONFIG_IP_VS": "ip_vs", "CONFIG_DUMMY": "dummy links", "CONFIG_IP_SET": "ipset", "CONFIG_IP_NF_NAT": "iptables nat"},
        "nftables": {"CONFIG_NF_TABLES_IPV4": "nf_tables for IPv4", "CONFIG_NFT_NUMGEN": "nft numgen"},
    }[mode]
    return [label for k, label in needs.items() if not have.get(k, False)]


def choose_kernel(requested: str, modes: list[str]) -> tuple[str, str]:
    """Which kernel a cluster runs on: ``host`` or ``uml``, and why (one line to show).

    ``auto``: the host when its kernel has what every requested proxy mode needs,
    else the guest when it has it. Inside a guest it is always ``host`` (no guest in
    a guest)."""
    if requested not in ("host", "uml", "auto"):
        raise InputError(f'Unsupported value: "{requested}": supported values: "host", "uml", "auto"', field="--kernel")
    bad = [m for m in modes if m not in ("iptables", "ipvs", "nftables")]
    if bad:
        raise InputError(f'Unsupported value: "{bad[0]}": supported values: "iptables", "ipvs", "nftables"', field="proxy-mode")
    inside = os.environ.get("TESTBED_GUEST") == "1"
    if requested == "host":
        return "host", "requested (--kernel host)"
    if requested == "uml":
        if inside:
            raise InputError("--kernel uml inside a guest kernel: no guest in a guest", field="--kernel")
        if not available():
            raise GuestError("no guest kernel: linux.uml or its modules are not installed (Debian package user-mode-linux)")
        lack = {m: guest_lacks(m) for m in modes}
        lack = {m: v for m, v in lack.items() if v}
        if lack:
            m, what = next(iter(lack.items()))
            raise InputError(f"{m} mode cannot run in the guest kernel: it lacks {', '.join(what)}", field="--kernel")
        return "uml", "requested (--kernel uml)"
    if inside:
        return "host", "already inside the guest kernel"
    host_lack = {m: v for m in modes if (v := _host_lacks(m))}
    if not host_lack:
        return "host", f"the host kernel has what {', '.join(modes)} mode needs"
    why = "; ".join(f"{', '.join(v)} ({m} mode)" for m, v in host_lack.items())
    if not available():
        return "host", f"the host kernel lacks {why} and no guest kernel is installed: trying the host anyway"
    guest_lack = {m: v for m in modes if (v := guest_lacks(m))}
    if guest_lack:
        gwhy = "; ".join(f"{', '.join(v)} ({m} mode)" for m, v in guest_lack.items())
        return "host", f"the host kernel lacks {why}, the guest kernel lacks {gwhy}: trying the host anyway"
    release = (_module_releases() or ["?"])[-1]
    return "uml", f"the host kernel lacks {why}: using the User-Mode Linux guest kernel {release}"


# --------------------------------------------------------------------------- cluster guests


@dataclass
class GuestHandle:
    """A background guest kernel holding one cluster (saved as guest.json)."""

    name: str
    guest_id: str
    netns: str  # host namespace holding the tap device: tb-<guest_id>-guest
    tap: str
    host_address: str
    guest_address: str
    port: int
    token: str
    exchange_dir: str
    pid: int = 0  # linux.uml (session leader; its process group is the guest)
    started: float = field(default_factory=time.time)
    argv_up: list[str] = field(default_factory=list)
    up_returncode: int | None = None
    up_stdout: str = ""
    up_stderr: str = ""
    boot_s: float = 0.0
    up_s: float = 0.0

    @property
    def alive(self) -> bool:
        return bool(self.pid) and self.pid in find_guest_processes(self.guest_id)


def guest_file(name: str) -> Path:
    from testbed import state

    return state.run_dir(name) / "guest.json"


def load_handle(name: str) -> GuestHandle | None:
    data = _read_json(str(guest_file(name)))
    if not data:
        return None
    try:
        return GuestHandle(**data)
    except TypeError:
        return None


def _save_handle(h: GuestHandle) -> None:
    path = guest_file(h.name)
    tmp = path.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the agent's token
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(asdict(h), indent=1))
    os.replace(tmp, path)


def lives_in_guest(name: str) -> bool:
    """Does cluster ``name`` (as the host's state knows it) live in a guest kernel?"""
    return guest_file(name).exists()


def _guest_up_argv(name: str, argv_up: list[str]) -> list[str]:
    """``testbed up`` as the guest runs it: --kernel dropped, --name set, and the
    iptables backend legacy (the guest kernel has no nf_tables for IPv4)."""
    out: list[str] = []
    it = iter(argv_up)
    for a in it:
        if a == "--kernel":
            next(it, None)
            continue
        if a.startswith("--kernel="):
            continue
        out.append(a)
    if not out or out[0] != "up":
        out.insert(0, "up")
    backend = None
    for i, a in enumerate(out):
        if a == "--iptables-backend" and i + 1 < len(out):
            backend = out[i + 1]
        elif a.startswith("--iptables-backend="):
            backend = a.split("=", 1)[1]
    if backend == "nft":
        raise InputError('Unsupported value: "nft": the guest kernel has no nf_tables for IPv4: use --iptables-backend legacy',
                         field="--iptables-backend")
    if backend is None:
        out += ["--iptables-backend", "legacy"]
    names = [out[i + 1] for i, a in enumerate(out) if a == "--name" and i + 1 < len(out)]
    names += [a.split("=", 1)[1] for a in out if a.startswith("--name=")]
    if not names:
        out += ["--name", name]
    elif names[-1] != name:
        raise InputError(f'Invalid value: "{names[-1]}": does not match the cluster name {name!r}', field="--name")
    return out


def _ns_run(ns: str, argv: list[str]) -> None:
    from testbed import netns

    with netns.entered(ns):
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise GuestError(f"{' '.join(argv)} in {ns} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()}")


def start_cluster_guest(
    name: str,
    argv_up: list[str],
    *,
    mem: str = "1G",
    timeout: float = 900.0,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> GuestHandle:
    """Boot a background guest kernel that runs ``testbed up`` (``argv_up``, e.g.
    ``["up", "topo.yaml", "--proxy-mode", "ipvs"]``) and then serves forwarded CLI
    calls (:func:`forward`) until :func:`stop`.

    Host side, in this order (each step recoverable by ``testbed clean``): the run
    directory /run/testbed/<name>/ with run.json (run id = the guest id, so
    ``clean``/``down`` of that run also remove the guest) and guest.json; namespace
    ``tb-<id>-guest`` with tap device ``tbtap0`` (169.254.77.1/30); linux.uml started
    inside that namespace (so ``testbed clean`` kills it as a process inside one of
    ours), guest eth0 169.254.77.2/30.

    Returns the handle; ``up_returncode``/``up_stdout``/``up_stderr`` are the guest's
    ``testbed up`` result. If that failed, the guest is already stopped and the
    cluster state removed. Any other failure stops it too and raises.
    """
    from testbed import netns, state

    uml_binary()
    if os.environ.get("TESTBED_GUEST") == "1":
        raise InputError("--kernel uml inside a guest kernel: no guest in a guest", field="--kernel")
    guest_argv = _guest_up_argv(name, list(argv_up))
    if name in state.names():
        info = state.load_info(name)
        raise StateError(f"cluster {name!r} is already up (run {info.run_id if info else '?'}): "
                         "run `testbed down` first (or `testbed clean` after a crash)")
    guest_id = _new_id()
    topo = guest_argv[1] if len(guest_argv) > 1 and not guest_argv[1].startswith("-") else ""
    info = state.RunInfo(name=name, run_id=guest_id, builder_pid=os.getpid(), topology=topo)
    state.create(info)  # run dir first: from here on `testbed clean` finds everything
    xdir = str(state.run_dir(name) / "guest")
    h = GuestHandle(
        name=name, guest_id=guest_id, netns=f"tb-{guest_id}-guest", tap=TAP, host_address=HOST_ADDRESS,
        guest_address=GUEST_ADDRESS, port=AGENT_PORT, token=secrets.token_hex(16), exchange_dir=xdir,
        argv_up=guest_argv,
    )
    t0 = time.monotonic()
    try:
        os.makedirs(xdir, mode=0o700)
        _check_path("exchange directory", xdir)
        _save_handle(h)
        netns.create(h.netns)
        _ns_run(h.netns, ["ip", "link", "set", "lo", "up"])
        _ns_run(h.netns, ["ip", "tuntap", "add", "dev", TAP, "mode", "tap"])
        _ns_run(h.netns, ["ip", "addr", "add", f"{HOST_ADDRESS}/{PREFIXLEN}", "dev", TAP])
        _ns_run(h.netns, ["ip", "link", "set", TAP, "up"])
        spec = {
            "mode": "serve", "cwd": cwd or os.getcwd(), "env": guest_env(env), "modules": list(GUEST_MODULES),
            "sysctls": GUEST_SYSCTLS, "raise": GUEST_RAISE, "hostname": f"tb-guest-{name}"[:63], "token": h.token, "up_argv": guest_argv,
            "up_timeout": timeout, "net": {"guest_address": GUEST_ADDRESS, "prefixlen": PREFIXLEN, "port": AGENT_PORT},
        }
        _write_exchange(xdir, spec)
        kargv = _kernel_argv(guest_id, xdir, mem, net=True)
        with netns.entered(h.netns):
            # started from a thread inside the tap namespace: UML (and its helpers) live there
            proc = _launch(kargv, xdir, die_with_parent=False)
        h.pid = proc.pid
        _save_handle(h)
        if progress:
            progress("booting the guest kernel")
        deadline = t0 + timeout
        up = None
        while up is None:
            if proc.poll() is not None:
                why = _read_json(os.path.join(xdir, "result.json")) or {}
                raise GuestError("guest kernel stopped before `testbed up` finished: "
                                 + (why.get("error") or _console_tail(xdir) or f"linux.uml exit status {proc.returncode}"))
            if not h.boot_s and os.path.exists(os.path.join(xdir, "ready.json")):
                h.boot_s = round(time.monotonic() - t0, 3)
                if progress:
                    progress("testbed up inside the guest")
            up = _read_json(os.path.join(xdir, "up.json"))
            if up is None:
                if time.monotonic() > deadline:
                    raise GuestTimeout(timeout)
                time.sleep(0.05)
        h.up_returncode, h.up_stdout, h.up_stderr = int(up["rc"]), up.get("stdout", ""), up.get("stderr", "")
        h.up_s = round(time.monotonic() - t0, 3)
        if h.up_returncode != 0:
            _teardown(h)
            return h
        while not os.path.exists(os.path.join(xdir, "serving")):
            if proc.poll() is not None:
                raise GuestError("guest kernel stopped after `testbed up`: " + (_console_tail(xdir) or "no message"))
            if time.monotonic() > deadline:
                raise GuestTimeout(timeout)
            time.sleep(0.02)
        _save_handle(h)
        info.phase = "up"
        state.save_info(info)
        return h
    except BaseException:
        _teardown(h)
        raise


def forward(name: str, argv: list[str], *, timeout: float = 900.0, cwd: str | None = None) -> tuple[int, str, str]:
    """Run ``testbed ARGV`` inside the guest holding cluster ``name``; returns
    (exit status, stdout, stderr) of that command. Non-interactive (stdin is
    /dev/null); relative paths are relative to ``cwd`` (default: ours), which the
    guest sees as we do."""
    h = load_handle(name)
    if h is None:
        raise StateError(f"cluster {name!r} does not live in a guest kernel")
    if os.geteuid() != 0:
        raise NotRootError(f"cluster {name!r} lives in a guest kernel: reaching it")
    if not h.alive:
        raise StateError(f"the guest kernel of cluster {name!r} is not running (pid {h.pid}): "
                         f"`testbed down --name {name}` removes what is left")
    req = {"token": h.token, "argv": [str(a) for a in argv], "cwd": cwd or os.getcwd(), "timeout": timeout}
    return _request(h, req, timeout + 30)


def _request(h: GuestHandle, req: dict, timeout: float) -> tuple[int, str, str]:
    from testbed import netns

    try:
        with netns.entered(h.netns):  # the socket belongs to the tap namespace
            s = socket.create_connection((h.guest_address, h.port), timeout=10)
    except OSError as e:
        raise GuestError(f"cannot reach the agent of guest {h.guest_id} ({h.guest_address}:{h.port} in {h.netns}): {e.strerror or e}") from None
    with s:
        s.settimeout(timeout)
        try:
            s.sendall(json.dumps(req).encode() + b"\n")
            chunks = []
            while True:
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        except TimeoutError:
            raise GuestError(f"the guest agent did not answer within {timeout:g} s") from None
    try:
        reply = json.loads(b"".join(chunks))
        return int(reply["rc"]), str(reply.get("stdout", "")), str(reply.get("stderr", ""))
    except (ValueError, KeyError, TypeError):
        raise GuestError("the guest agent's answer was cut short (guest crashed?)") from None


def forward_cli(name: str | None, argv: list[str]) -> int | None:
    """For the host CLI: when the cluster (``--name``, or the only one up) lives in a
    guest kernel, run ``testbed ARGV`` there, print its output and return its exit
    status; None when it does not (run the command on the host)."""
    from testbed import state

    try:
        cname = state.resolve(name)
    except StateError:
        return None
    if not lives_in_guest(cname):
        return None
    rc, out, err = forward(cname, argv)
    sys.stdout.write(out)
    sys.stdout.flush()
    sys.stderr.write(err)
    sys.stderr.flush()
    return rc


def stop(name: str) -> bool:
    """Stop the guest kernel of cluster ``name``: kill it (with everything inside),
    delete its tap namespace, remove the cluster's run directory. Idempotent;
    returns whether there was a guest."""
    h = load_handle(name)
    if h is None:
        return False
    _teardown(h)
    return True


def _teardown(h: GuestHandle) -> None:
    """Kill the guest, delete its tap namespace, remove the cluster's run directory."""
    from testbed import netns, state

    _kill_guest(h.pid, h.guest_id)  # killpg only while a member lives (no stale group id)
    netns.delete(h.netns)
    state.remove(h.name)


def cleanup(run_id: str | None = None) -> tuple[list[int], list[str]]:
    """For ``testbed clean``: kill the linux.uml processes this module started (all,
    or those of guest/run id ``run_id``) and remove :func:`run`'s temporary
    directories that no live guest uses. Returns (killed pids, removed dirs).
    (Cluster guests also live in a ``tb-<id>-guest`` namespace: the existing
    namespace rule of clean covers them.)"""
    pids = find_guest_processes(run_id)
    live_ids = set()
    for pid in pids:
        for a in _cmdline(pid):
            if a.startswith(f"{MARKER}="):
                live_ids.add(a.split("=", 1)[1])
    for gid in sorted(live_ids):
        with contextlib.suppress(GuestError):
            _kill_guest(0, gid)
    removed = []
    tmp = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for d in os.listdir(tmp):
            if not d.startswith(TMP_PREFIX):
                continue
            gid = d[len(TMP_PREFIX):].split("-", 1)[0]
            if (run_id is None or gid == run_id) and not find_guest_processes(gid):
                shutil.rmtree(os.path.join(tmp, d), ignore_errors=True)
                removed.append(os.path.join(tmp, d))
    return pids, removed


def _main() -> int:  # pragma: no cover - `python -m testbed.guest -- CMD` until the CLI has `testbed guest`
    from testbed.errors import TestbedError

    try:
        return main_guest(sys.argv[1:], timeout=float(os.environ.get("TB_GUEST_TIMEOUT", "120")))
    except TestbedError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: the guest kernel was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main())
