"""Network namespaces, created and entered in-process (no fork per call).

Named namespaces follow iproute2's convention, so ``ip netns exec NAME`` and
``ip netns list`` see them: a file ``/run/netns/NAME`` onto which the namespace
is bind-mounted, ``/run/netns`` itself being a shared mount.

``netns.create()``/``NetNS()`` in pyroute2 fork a helper per call (~4x slower here);
instead we ``unshare(CLONE_NEWNET)`` in the calling thread, bind-mount
``/proc/thread-self/ns/net`` and ``setns()`` back. A socket created while a thread
is inside a namespace stays in that namespace, so one process can hold listening
sockets or netlink sockets in many namespaces (see :func:`entered`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator

NETNS_RUN_DIR = "/run/netns"

CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_SHARED = 1 << 20
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(src: str | None, dst: str, fstype: str | None, flags: int) -> None:
    _check(
        _libc.mount(src.encode() if src else None, dst.encode(), fstype.encode() if fstype else None, flags, None),
        f"mount {dst}",
    )


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at ``fd``."""
    _check(_libc.setns(fd, CLONE_NEWNET), "setns")


def path(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, name)


_run_dir_ready = False


def ensure_run_dir() -> None:
    """Make /run/netns a shared mount point, as ``ip netns add`` does."""
    global _run_dir_ready
    if _run_dir_ready:
        return
    os.makedirs(NETNS_RUN_DIR, mode=0o755, exist_ok=True)
    try:
        _mount("none", NETNS_RUN_DIR, "none", MS_SHARED | MS_REC)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        # Not a mount point yet: bind it onto itself, then make it shared.
        _mount(NETNS_RUN_DIR, NETNS_RUN_DIR, "none", MS_BIND | MS_REC)
        _mount("none", NETNS_RUN_DIR, "none", MS_SHARED | MS_REC)
    _run_dir_ready = True


def create(name: str) -> None:
    """Create the named network namespace (fails with EEXIST if the name is taken)."""
    ensure_run_dir()
    p = path(name)
    fd = os.open(p, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0)
    os.close(fd)
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        try:
            _mount("/proc/thread-self/ns/net", p, "none", MS_BIND)
        finally:
            setns(orig)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(p)
        raise
    finally:
        os.close(orig)


def delete(name: str) -> bool:
    """Remove the named namespace; the kernel frees it (and its links) asynchronously
    once no process or socket holds it. Idempotent: returns False if it did not exist."""
    p = path(name)
    existed = os.path.exists(p)
    if _libc.umount2(p.encode(), MNT_DETACH) != 0:
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOENT):
            raise OSError(e, f"umount {p}: {os.strerror(e)}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(p)
    return existed


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def list_names(prefix: str = "") -> list[str]:
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def inode(name: str) -> int | None:
    """The namespace's identity (the nsfs inode), as /proc/PID/ns/net shows it."""
    try:
        return os.stat(path(name)).st_ino
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body with the calling thread inside namespace ``name``.

    Sockets (including pyroute2 netlink sockets) opened in the body belong to that
    namespace for their whole life; files under /proc/sys/net opened in the body
    are that namespace's sysctls.
    """
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path(name), os.O_RDONLY)
        try:
            setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            setns(orig)
    finally:
        os.close(orig)


def sysctl(key: str, value: str | int) -> None:
    """Write a sysctl of the calling thread's current network namespace
    (use inside :func:`entered`)."""
    with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
        f.write(str(value))
