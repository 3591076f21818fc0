"""Crash cleanup (``testbed clean``): remove whatever any run left behind.

Works from the kernel's and /proc's point of view, not only from state files, so it
also cleans after a ``kill -9`` at any point of ``testbed up``:

1. processes: pod servers of testbed runs (recorded pids, and any process whose
   command line is ``-m testbed.podserver``), and every process whose network
   namespace is one of ours (e.g. a command left running by ``testbed exec``);
2. network namespaces named with the project prefix (their veths and bridges go
   with them; nothing of ours lives in the host namespace);
3. run directories under /run/testbed.

Idempotent: a second call finds nothing and says so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from dataclasses import dataclass, field

from testbed import netns, state
from testbed.model import PREFIX


ETC_NETNS = "/etc/netns"


def netns_etc_dirs(prefix: str) -> list[str]:
    try:
        return [n for n in os.listdir(ETC_NETNS) if n.startswith(prefix)]
    except FileNotFoundError:
        return []


@dataclass
class CleanReport:
    processes: list[int] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    run_dirs: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.processes or self.namespaces or self.run_dirs)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def is_podserver(pid: int, run_dirs: list[str] | None = None) -> bool:
    """Is ``pid`` a pod server (of one of ``run_dirs``, or of any run when None)?"""
    cmd = _cmdline(pid)
    if "testbed.podserver" not in cmd:
        return False
    return run_dirs is None or any(a.startswith(d) for a in cmd for d in run_dirs)


def find_processes(namespaces: list[str], run_dirs: list[str] | None = None) -> list[int]:
    """Pod servers (of ``run_dirs``, or of any run when None) and processes inside
    ``namespaces``."""
    inodes = {i for i in (netns.inode(n) for n in namespaces) if i is not None}
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid == me:
            continue
        if is_podserver(pid, run_dirs) or (inodes and _netns_inode(pid) in inodes):
            found.append(pid)
    return found


def kill(pids: list[int], timeout: float = 3.0) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after ``timeout``."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        if alive:
            time.sleep(0.02)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def clean(run_id: str | None = None) -> CleanReport:
    """Remove every object of run ``run_id``, or of every testbed run when None."""
    report = CleanReport()
    prefix = f"{PREFIX}{run_id}-" if run_id else PREFIX
    dirs = []
    for name in state.names():
        info = state.load_info(name)
        if run_id is None or (info and info.run_id == run_id):
            dirs.append(name)
    namespaces = netns.list_names(prefix)
    procs = find_processes(namespaces, None if run_id is None else [str(state.run_dir(d)) for d in dirs])
    kill(procs)
    from testbed import guest  # guest kernels of `testbed guest` / guest.run (cluster guests live in tb-<id>-guest)

    guest_pids, _ = guest.cleanup(run_id)
    report.processes = procs + [p for p in guest_pids if p not in procs]
    for name in namespaces:
        netns.delete(name)
        # per-namespace files `ip netns exec` mounts (a pod's resolv.conf)
        shutil.rmtree(os.path.join(ETC_NETNS, name), ignore_errors=True)
    for name in netns_etc_dirs(prefix):
        shutil.rmtree(os.path.join(ETC_NETNS, name), ignore_errors=True)
    report.namespaces = namespaces
    for name in dirs:
        state.remove(name)
    report.run_dirs = dirs
    return report
