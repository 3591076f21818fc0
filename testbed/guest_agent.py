"""Inside a testbed guest kernel (User-Mode Linux): PID 1, the set-up, the agent.

The host side is :mod:`testbed.guest`; read its docstring first. This file runs
*inside* the guest, started by the guest's ``/sbin/init`` stand-in (a fixed shell
script the host writes) as::

    $tb_python -I -S guest_agent.py init        # PID 1 (standard library only: fast)
    $tb_python -I    guest_agent.py serve       # the cluster agent (venv site-packages)

(and, on the host, ``guest_agent.py launch``: the exec wrapper that starts linux.uml,
see :func:`launch`).

Everything variable comes from the kernel command line, which the kernel hands to
init as environment variables: ``tb_dir`` (the host directory shared with the host
through hostfs), ``tb_python``, ``tb_agent``, ``tb_guest`` (the guest id). The
host writes ``spec.json`` there; the guest answers with files in the same
directory (hostfs writes go straight through to the host file):

``ready.json``   set-up finished (modules, mounts, network), with guest timings;
``stdout``, ``stderr``, ``result.json``   the command's output and exit status
(``run`` mode);
``up.json``, ``serving``   the ``testbed up`` result and "the agent listens"
(``serve`` mode).

PID 1 forks one *worker* that does all the work, reaps every orphan, and when the
worker exits kills whatever is left, syncs and powers the guest off (the UML
process on the host then exits). The worker:

1. mounts what a root filesystem shared with the host needs so that nothing the
   guest does lands in the host's state: tmpfs on /run (already done by the init
   script, before anything runs: ``ip netns`` would otherwise write the host's
   /run/netns), devtmpfs is on /dev, tmpfs on /dev/shm, devpts, and an overlay on
   /etc whose upper layer is a tmpfs (``/etc/netns/<ns>/`` files written in the
   guest stay in the guest);
2. loads the kernel modules listed in the spec with ``modprobe -d`` from a module
   tree linked in the guest's tmpfs to /usr/lib/uml/modules/<release>, and points
   ``kernel.modprobe`` at a wrapper doing the same, so that any other module the
   kernel asks for (an iptables match, a qdisc) is loaded on demand;
3. writes the sysctls of the spec, the host name, brings ``lo`` up and, for a
   cluster guest, addresses ``eth0`` (the host's tap device is the other end);
4. ``run``: runs argv with the spec's environment and working directory, stdout and
   stderr into the shared files; ``serve``: execs ``guest_agent.py serve``.

The serve agent pre-imports the testbed CLI once, runs the spec's ``testbed up``
argv, then accepts one JSON request per TCP connection on the guest's eth0::

    {"token": T, "argv": ["get", "pods", ...], "cwd": "/work/main", "timeout": 900}
    -> {"rc": 0, "stdout": "...", "stderr": "..."}

Each request is served by a forked supervisor which forks the command itself in a
new session (so ``testbed exec``'s ``execvp`` and crashes are contained, and a
timeout kills the command's whole process group); the pre-imported modules make a
forwarded command cost a fork instead of a Python start (seconds in the guest).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback

XDIR = "/run/tbguest"  # where the host's exchange directory is mounted in the guest
MODROOT = "/run/tbguest-modules"  # modprobe -d root: lib/modules/<release> -> /usr/lib/uml/modules/<release>
UML_MODULES = "/usr/lib/uml/modules"
MODPROBE = "/usr/sbin/modprobe"
REQ_DIR = "/run/tbguest-req"
MAX_REQUEST = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
RB_POWER_OFF = 0x4321FEDC


def _mount(src: str, dst: str, fstype: str, options: str | None = None, flags: int = 0) -> None:
    if _libc.mount(src.encode(), dst.encode(), fstype.encode(), flags, options.encode() if options else None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount -t {fstype} {dst}: {os.strerror(e)}")


def _uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def _write_json(name: str, obj: dict) -> None:
    """Write a result file for the host (tmp + rename: the host never reads half a file)."""
    tmp = os.path.join(XDIR, f".{name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, os.path.join(XDIR, name))


def _log(msg: str) -> None:
    with contextlib.suppress(OSError), open(os.path.join(XDIR, "agent.log"), "a") as f:
        f.write(f"[{_uptime():8.3f}] {msg}\n")


# --------------------------------------------------------------------------- PID 1


def pid1() -> int:
    host_dir = os.environ.get("tb_dir", "")
    os.makedirs(XDIR, exist_ok=True)
    _mount(host_dir, XDIR, "hostfs", host_dir)  # hostfs: the option is the host path
    worker = os.fork()
    if worker == 0:
        rc = 1
        try:
            rc = worker_main()
        except BaseException:  # noqa: BLE001 - reported to the host, then power off
            _log("worker failed:\n" + traceback.format_exc())
            with contextlib.suppress(Exception):
                _write_json("result.json", {"error": traceback.format_exc().strip().splitlines()[-1]})
        os._exit(rc)
    while True:  # PID 1 reaps every orphan until the worker is done
        try:
            pid, _ = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == worker:
            break
    power_off()
    return 0


def power_off() -> None:
    """Kill what is left, flush hostfs, power the (UML) machine off: the host process exits."""
    with contextlib.suppress(OSError):
        os.kill(-1, signal.SIGKILL)  # from PID 1: every other process
    with contextlib.suppress(ChildProcessError, OSError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    os.sync()
    _libc.reboot(RB_POWER_OFF)
    with contextlib.suppress(OSError), open("/proc/sysrq-trigger", "w") as f:  # fallback
        f.write("o")
    time.sleep(5)


# --------------------------------------------------------------------------- set-up


def _sh(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {(r.stderr or r.stdout).strip()}")
    return r


def setup_mounts() -> None:
    if not os.path.ismount("/dev"):
        _mount("devtmpfs", "/dev", "devtmpfs")
    for d, fstype, opts in (("/dev/shm", "tmpfs", "mode=1777"), ("/dev/pts", "devpts", "gid=5,mode=620,ptmxmode=666")):
        os.makedirs(d, exist_ok=True)
        if not os.path.ismount(d):
            with contextlib.suppress(OSError):
                _mount(fstype, d, fstype, opts)


def setup_etc_overlay() -> None:
    """/etc: the host's, read-only underneath a tmpfs upper layer (overlayfs; after
    the modules: overlay is one)."""
    ovl = "/run/tbguest-etc"
    os.makedirs(ovl, exist_ok=True)
    _mount("tmpfs", ovl, "tmpfs", "mode=0755")
    os.makedirs(f"{ovl}/upper")
    os.makedirs(f"{ovl}/work")
    _mount("overlay", "/etc", "overlay", f"lowerdir=/etc,upperdir={ovl}/upper,workdir={ovl}/work")


def setup_modules(modules: list[str]) -> list[str]:
    """Load ``modules``; returns those that failed. Later module requests of the kernel
    go through a wrapper with the same module tree."""
    release = os.uname().release
    tree = os.path.join(MODROOT, "lib", "modules")
    os.makedirs(tree, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.symlink(os.path.join(UML_MODULES, release), os.path.join(tree, release))
    wrapper = os.path.join(MODROOT, "modprobe")
    with open(wrapper, "w") as f:  # each on-demand load is logged: boot-time modules are a measured choice
        f.write(f'#!/bin/sh\necho "$@" >> {MODROOT}/requests.log\nexec {MODPROBE} -d {MODROOT} "$@"\n')
    os.chmod(wrapper, 0o755)
    with open("/proc/sys/kernel/modprobe", "w") as f:
        f.write(wrapper)
    if not modules:
        return []
    if _sh([MODPROBE, "-a", "-d", MODROOT, *modules], check=False).returncode == 0:
        return []
    return [m for m in modules if _sh([MODPROBE, "-d", MODROOT, m], check=False).returncode != 0]


def setup_sysctls(sysctls: dict[str, str]) -> dict[str, str]:
    failed = {}
    for key, value in sysctls.items():
        try:
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(str(value))
        except OSError as e:
            failed[key] = e.strerror or str(e)
    return failed


def raise_values(values: dict[str, int]) -> dict[str, str]:
    """Write each integer file (a sysctl, a module parameter) when its value is lower."""
    failed = {}
    for path, value in values.items():
        try:
            with open(path) as f:
                if int(f.read().split()[0]) >= int(value):
                    continue
            with open(path, "w") as f:
                f.write(str(value))
        except (OSError, ValueError, IndexError) as e:
            failed[path] = getattr(e, "strerror", None) or str(e)
    return failed


def setup_network(spec: dict) -> None:
    with open("/proc/sys/kernel/hostname", "w") as f:
        f.write(spec.get("hostname") or "tb-guest")
    _sh(["ip", "link", "set", "lo", "up"])
    net = spec.get("net")
    if net:
        _sh(["ip", "addr", "add", f"{net['guest_address']}/{net['prefixlen']}", "dev", "eth0"])
        _sh(["ip", "link", "set", "eth0", "up"])


def worker_main() -> int:
    t0 = _uptime()
    with open(os.path.join(XDIR, "spec.json")) as f:
        spec = json.load(f)
    setup_mounts()
    t_mounts = _uptime()
    failed = setup_modules(list(dict.fromkeys(["overlay", *spec.get("modules", [])])))  # overlay: for /etc
    t_modules = _uptime()
    setup_etc_overlay()
    failed_sysctls = setup_sysctls(spec.get("sysctls", {}))
    failed_sysctls.update(raise_values(spec.get("raise", {})))
    setup_network(spec)
    ready = {
        "release": os.uname().release,
        "uptime_init": t0,
        "uptime_ready": _uptime(),
        "mounts_s": round(t_mounts - t0, 3),
        "modules_s": round(t_modules - t_mounts, 3),
        "modules_failed": failed,
        "sysctls_failed": failed_sysctls,
    }
    _write_json("ready.json", ready)
    if spec["mode"] == "serve":
        python = os.environ["tb_python"]
        os.execve(python, [python, "-I", os.environ["tb_agent"], "serve"], spec["env"])
    return run_command(spec)


def run_command(spec: dict) -> int:
    argv, env, cwd = spec["argv"], spec["env"], spec["cwd"]
    with open(os.path.join(XDIR, "stdout"), "wb") as out, open(os.path.join(XDIR, "stderr"), "wb") as err:
        t0 = _uptime()
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd)
        except OSError as e:  # as a shell reports it: 127 not found, 126 not executable
            target = e.filename or argv[0]
            err.write(f"guest: {target}: {e.strerror}\n".encode())
            rc = 127 if isinstance(e, FileNotFoundError) else 126
        else:
            rc = p.wait()
        t1 = _uptime()
    _write_json("result.json", {"rc": rc, "uptime_start": t0, "uptime_end": t1})
    return 0


# --------------------------------------------------------------------------- serve


def serve() -> int:
    """The cluster agent: pre-import the CLI, run ``testbed up``, then serve requests."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    log = open(os.path.join(XDIR, "agent.log"), "a", buffering=1)
    # stdout/stderr are not a terminal while the CLI is imported (fixed-width output)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    with open(os.path.join(XDIR, "spec.json")) as f:
        spec = json.load(f)
    t0 = _uptime()
    for mod in ("testbed.cli", "testbed.state", "testbed.model", "testbed.lifecycle", "testbed.topology",
                "testbed.controlplane", "testbed.kubeproxy", "testbed.fabric", "testbed.podserver",
                "testbed.manifests", "testbed.workloads", "testbed.netns", "yaml", "rich.table", "rich.progress"):
        try:
            __import__(mod)
        except Exception as e:  # noqa: BLE001 - a module that fails here fails again, visibly, in the command
            _log(f"pre-import {mod}: {type(e).__name__}: {e}")
    _log(f"pre-imported the CLI in {_uptime() - t0:.2f} s")
    os.makedirs(REQ_DIR, exist_ok=True)
    net = spec["net"]
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((net["guest_address"], net["port"]))
    srv.listen(16)
    t1 = _uptime()
    rc, out, err = run_cli(spec["up_argv"], spec["cwd"], float(spec.get("up_timeout", 600)))
    _write_json("up.json", {"rc": rc, "stdout": out, "stderr": err, "uptime_start": t1, "uptime_end": _uptime()})
    if rc != 0:
        return rc
    _write_json("serving", {"uptime": _uptime()})
    token = spec["token"]
    children: set[int] = set()
    while True:
        r, _, _ = select.select([srv], [], [], 1.0)
        while children:  # reap finished supervisors
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            children.discard(pid)
        if not r:
            continue
        conn, _ = srv.accept()
        pid = os.fork()
        if pid == 0:
            srv.close()
            code = 0
            try:
                code = handle(conn, token)
            except BaseException:  # noqa: BLE001
                _log("request failed:\n" + traceback.format_exc())
            finally:
                with contextlib.suppress(OSError):
                    conn.close()
                os._exit(code)
        conn.close()
        children.add(pid)


def _recv_request(conn: socket.socket) -> dict:
    conn.settimeout(30)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too large")
    return json.loads(buf)


def handle(conn: socket.socket, token: str) -> int:
    req = _recv_request(conn)
    if req.get("token") != token:
        reply = {"rc": 2, "stdout": "", "stderr": "guest agent: bad token\n"}
    elif req.get("op") == "ping":
        reply = {"rc": 0, "stdout": "pong\n", "stderr": ""}
    elif req.get("op") == "shutdown":
        conn.sendall(json.dumps({"rc": 0, "stdout": "", "stderr": ""}).encode())
        os.kill(os.getppid(), signal.SIGTERM)  # the serve agent exits; PID 1 powers off
        return 0
    else:
        argv = [str(a) for a in req.get("argv", [])]
        rc, out, err = run_cli(argv, str(req.get("cwd") or "/"), float(req.get("timeout") or 900))
        reply = {"rc": rc, "stdout": out, "stderr": err}
    conn.settimeout(60)
    conn.sendall(json.dumps(reply).encode())
    conn.shutdown(socket.SHUT_WR)  # EOF for the host even if a process the command left holds the socket
    return 0


def run_cli(argv: list[str], cwd: str, timeout: float) -> tuple[int, str, str]:
    """``testbed ARGV`` in a forked child (new session; stdout/stderr to files), bounded
    by ``timeout``; returns (exit status, stdout, stderr)."""
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    out_path, err_path = os.path.join(REQ_DIR, f"{tag}.out"), os.path.join(REQ_DIR, f"{tag}.err")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    pid = os.fork()
    if pid == 0:
        rc = 1
        try:
            os.setsid()
            fd0 = os.open("/dev/null", os.O_RDONLY)
            fd1 = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            fd2 = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            for fd, target in ((fd0, 0), (fd1, 1), (fd2, 2)):
                os.dup2(fd, target)
                os.close(fd)
            os.chdir(cwd)
            from testbed import cli

            rc = int(cli.main(argv) or 0)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - shown to the host user as the command's stderr
            traceback.print_exc()
            rc = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(rc)
    timed_out = False
    pidfd = os.pidfd_open(pid)
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
            timed_out = True
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    texts = []
    for path in (out_path, err_path):
        try:
            with open(path, "rb") as f:
                texts.append(f.read().decode("utf-8", "replace"))
        except OSError:
            texts.append("")
        with contextlib.suppress(OSError):
            os.unlink(path)
    if timed_out:
        texts[1] += f"guest agent: `testbed {' '.join(argv[:2])}` did not finish within {timeout:.0f} s: killed\n"
    return rc, texts[0], texts[1]


# --------------------------------------------------------------------------- host side: the launcher

# Runs on the HOST, as ``python -I -S guest_agent.py launch PPID PROG ARGS...`` (see
# testbed.guest.launcher_argv): an exec wrapper instead of a preexec_fn (not safe in
# a threaded caller). UML 6.1 hands PTRACE_SETREGSET(NT_X86_XSTATE) a buffer of the
# size of an AVX-only XSAVE area; a host with AVX-512/AMX refuses it (EFAULT) and UML
# panics at its first process. This filter makes PTRACE_{GET,SET}REGSET of
# NT_X86_XSTATE fail with EIO, so UML's start-up probe finds no XSTATE support and it
# uses PTRACE_GETFPREGS/SETFPREGS (x87/SSE state) instead.

AUDIT_ARCH_X86_64 = 0xC000003E
NR_PTRACE = 101
PTRACE_GETREGSET, PTRACE_SETREGSET, NT_X86_XSTATE = 0x4204, 0x4205, 0x202
BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06
SECCOMP_RET_ALLOW, SECCOMP_RET_EIO = 0x7FFF0000, 0x00050000 | 5  # SECCOMP_RET_ERRNO | EIO
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 38, 22, 2


def xstate_filter() -> bytes:
    """Classic BPF over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}:
    struct sock_filter {u16 code; u8 jt; u8 jf; u32 k} x 11."""
    import struct

    def insn(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k)

    return b"".join([
        insn(BPF_LD_W_ABS, 0, 0, 4), insn(BPF_JEQ_K, 0, 7, AUDIT_ARCH_X86_64),  # 0,1: other arch -> 9
        insn(BPF_LD_W_ABS, 0, 0, 0), insn(BPF_JEQ_K, 0, 5, NR_PTRACE),          # 2,3: not ptrace -> 9
        insn(BPF_LD_W_ABS, 0, 0, 16), insn(BPF_JEQ_K, 1, 0, PTRACE_GETREGSET),  # 4,5: args[0] request
        insn(BPF_JEQ_K, 0, 2, PTRACE_SETREGSET),                                 # 6
        insn(BPF_LD_W_ABS, 0, 0, 32), insn(BPF_JEQ_K, 1, 0, NT_X86_XSTATE),     # 7,8: args[2] regset
        insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),                                # 9
        insn(BPF_RET_K, 0, 0, SECCOMP_RET_EIO),                                  # 10
    ])


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def launch(argv: list[str]) -> int:
    """``launch PPID PROG ARGS...``: PPID != 0: die with that parent process."""
    parent, prog = int(argv[0]), argv[1]
    _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if parent:
        if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, None, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != parent:  # it died before the line above
            return 1
    cpu = os.environ.pop("TB_GUEST_CPU", "")  # guest.LAUNCH_CPU_ENV: pin the whole guest to it
    if cpu:
        os.sched_setaffinity(0, {int(cpu)})
    code = xstate_filter()
    buf = ctypes.create_string_buffer(code, len(code))
    prog_ = _SockFprog(len(code) // 8, ctypes.addressof(buf))
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog_), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
    os.execv(prog, [prog, *argv[2:]])
    return 127  # not reached


def main(argv: list[str]) -> int:
    mode = argv[1] if len(argv) > 1 else ""
    if mode == "init":
        return pid1()
    if mode == "serve":
        return serve()
    if mode == "launch":
        return launch(argv[2:])
    print(f"usage: {argv[0]} init|serve (inside a testbed guest kernel) | launch PPID PROG ARGS... (host)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
