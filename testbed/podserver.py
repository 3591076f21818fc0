"""The pod workload: one process serving every pod of a cluster.

Each emulated pod "runs" the part of the Kubernetes e2e image ``agnhost netexec``
that Service tests use, on each of its containerPorts:

* TCP ports speak HTTP/1.x: ``/hostname`` (and the old ``/hostName``) → the pod's
  hostname, ``/clientip`` → ``ip:port`` of the peer as the pod saw it,
  ``/echo?msg=X[&code=N]`` → X, ``/healthz`` → 200, ``/`` → ``NOW: <time>``,
  anything else → 404 (agnhost's Go mux would answer ``NOW:`` there; the project
  wants unknown paths to be visible). Bodies carry no trailing newline, as netexec's.
* UDP ports answer the datagrams ``hostname``, ``clientip`` and ``echo X`` (the
  text trimmed and lower-cased first, exactly as netexec does; unknown commands
  get no answer).
* SCTP ports are skipped with a warning.

One asyncio loop serves all pods: for each pod the listening sockets are created
while the thread is inside the pod's network namespace (:func:`netns.entered`),
so they belong to it; connections accepted on them do too. Per-connection state
is one small :class:`asyncio.Protocol`; accepting bypasses ``loop.create_server``
(which spawns a Task per connection) and builds the transport directly.

The server never closes a keep-alive connection first (the client's close leaves
TIME_WAIT on the client, see ENVIRONMENT.md's trap). After a response to
``Connection: close`` (or HTTP/1.0) it closes at once, as agnhost does, unless
``close_wait`` > 0: then it waits that long for the client's FIN before closing.

CLI::

    python -m testbed.podserver --cluster CLUSTER.json --control SOCK [--log FILE]

prints ``ready`` on stdout once every socket listens, closes stdout and serves
until SIGTERM/SIGINT. Control: one JSON object per line on the unix socket SOCK,
see :func:`control`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes

from testbed import netns
from testbed.errors import TestbedError
from testbed.model import Cluster, Pod

log = logging.getLogger("testbed.podserver")

DEFAULT_BACKLOG = 4096
MAX_HEAD = 64 * 1024  # request line + headers
MAX_BODY = 1024 * 1024
UDP_MAX = 2048  # netexec reads datagrams into a 2048-byte buffer
ACCEPT_BATCH = 64


class PodServerError(TestbedError):
    """A pod's sockets could not be opened, or a control request was invalid."""


# --------------------------------------------------------------------------- HTTP

_CT = b"Content-Type: text/plain; charset=utf-8\r\n"
_NOSNIFF = b"X-Content-Type-Options: nosniff\r\n"
_CONN_CLOSE = b"Connection: close\r\n"
_CONN_KEEP = b"Connection: keep-alive\r\n"
_NOT_FOUND = b"404 page not found\n"  # Go's http.NotFound body
_status_lines: dict[tuple[bool, int], bytes] = {}


def _status_line(ver11: bool, code: int) -> bytes:
    try:
        return _status_lines[(ver11, code)]
    except KeyError:
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = f"status code {code}"  # what Go writes for codes it does not know
        line = f"HTTP/1.{1 if ver11 else 0} {code} {phrase}\r\n".encode()
        _status_lines[(ver11, code)] = line
        return line


def http_response(
    code: int, body: bytes, *, ver11: bool = True, keep: bool = True, head: bool = False, extra: bytes = b""
) -> bytes:
    """One complete HTTP response (status line, headers, body)."""
    if ver11:
        conn = b"" if keep else _CONN_CLOSE
    else:
        conn = _CONN_KEEP if keep else _CONN_CLOSE
    if code in (204, 304):  # no body allowed
        return b"".join((_status_line(ver11, code), conn, extra, b"\r\n"))
    return b"".join(
        (
            _status_line(ver11, code),
            _CT,
            extra,
            b"Content-Length: %d\r\n" % len(body),
            conn,
            b"\r\n",
            b"" if head else body,
        )
    )


def pod_hostname(pod: Pod) -> str:
    """The pod's hostname as the kubelet sets it: ``spec.hostname`` or the pod name,
    cut to 63 characters without a trailing ``-``/``.``."""
    name = pod.hostname or pod.name
    if len(name) > 63:
        name = name[:63].rstrip("-.")
    return name


def _now_body() -> bytes:
    # Go's time.Time.String(), in UTC, without the monotonic clock reading.
    ns = time.time_ns()
    secs, frac = divmod(ns, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(secs))
    frac_s = f".{frac:09d}".rstrip("0").rstrip(".")
    return f"NOW: {stamp}{frac_s} +0000 UTC".encode()


def _addr_str(addr: Any) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Site:
    """What one pod serves, with the common responses pre-encoded."""

    __slots__ = ("key", "hostname", "host_body", "cache", "conns", "close_wait")

    def __init__(self, pod: Pod, close_wait: float):
        self.key = pod.key
        self.hostname = pod_hostname(pod)
        self.host_body = self.hostname.encode()
        self.close_wait = close_wait
        self.conns: set[_HttpConn] = set()
        # (path, ver11, keep, head) -> response bytes, for the responses that never change.
        self.cache: dict[tuple[bytes, bool, bool, bool], bytes] = {}
        for ver11 in (True, False):
            for keep in (True, False):
                for head in (False, True):
                    for path in (b"/hostname", b"/hostName"):
                        self.cache[(path, ver11, keep, head)] = http_response(
                            200, self.host_body, ver11=ver11, keep=keep, head=head
                        )
                    self.cache[(b"/healthz", ver11, keep, head)] = http_response(
                        200, b"", ver11=ver11, keep=keep, head=head
                    )


def _query_values(query: bytes, body: bytes | None) -> dict[str, bytes]:
    """Go's ``r.FormValue`` semantics: form body values win over the URL query's,
    the first value of a name wins, ``+`` is a space."""
    out: dict[str, bytes] = {}
    for src in (body, query):
        if not src:
            continue
        for k, v in parse_qsl(
            src.decode("utf-8", "surrogateescape"), keep_blank_values=True, errors="surrogateescape"
        ):
            out.setdefault(k, v.encode("utf-8", "surrogateescape"))
    return out


class _HttpConn(asyncio.Protocol):
    """One accepted TCP connection of one pod: HTTP/1.x, keep-alive, pipelining."""

    __slots__ = ("site", "transport", "buf", "closing", "timer", "continued")

    def __init__(self, site: _Site):
        self.site = site
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.closing = False
        self.timer: asyncio.TimerHandle | None = None
        self.continued = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.site.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.site.conns.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None

    def eof_received(self) -> bool:
        return False  # close our side too (the client closed first: no TIME_WAIT here)

    # A client pipelining requests without reading the answers: stop reading it.
    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def _finish(self, resp: bytes) -> None:
        """Send the last response of the connection, then close (now or after close_wait)."""
        t = self.transport
        t.write(resp)
        self.closing = True
        self.buf = b""
        wait = self.site.close_wait
        if wait > 0:
            self.timer = asyncio.get_running_loop().call_later(wait, t.close)
        else:
            t.close()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.buf:
            data = self.buf + data
            self.buf = b""
        site = self.site
        write = self.transport.write
        while data:
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                head = data[:end]
                rest = end + 4
            else:
                end = data.find(b"\n\n")  # bare-LF requests (printf | nc)
                if end < 0:
                    if len(data) > MAX_HEAD:
                        self._finish(http_response(431, b"431 Request Header Fields Too Large", keep=False))
                        return
                    self.buf = data
                    return
                head = data[:end].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
                rest = end + 2
            nl = head.find(b"\r\n")
            if nl < 0:
                line = head
                hdrs = b""
            else:
                line = head[:nl]
                hdrs = head[nl:].lower()  # starts with \r\n: every header is "\r\nname:"
            parts = line.split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                if not line.strip() and rest < len(data):  # stray CRLF between requests
                    data = data[rest:]
                    continue
                self._finish(http_response(400, b"400 Bad Request", keep=False))
                return
            method, target, version = parts
            ver11 = version != b"HTTP/1.0"
            keep = ver11
            clen = 0
            if hdrs:
                i = hdrs.find(b"\r\nconnection:")
                if i >= 0:
                    j = hdrs.find(b"\r\n", i + 2)
                    val = hdrs[i + 13 : j] if j >= 0 else hdrs[i + 13 :]
                    if b"close" in val:
                        keep = False
                    elif b"keep-alive" in val:
                        keep = True
                if b"\r\ntransfer-encoding:" in hdrs:
                    self._finish(http_response(501, b"chunked request bodies are not supported", keep=False))
                    return
                i = hdrs.find(b"\r\ncontent-length:")
                if i >= 0:
                    j = hdrs.find(b"\r\n", i + 2)
                    try:
                        clen = int(hdrs[i + 17 : j] if j >= 0 else hdrs[i + 17 :])
                    except ValueError:
                        clen = -1
                    if clen < 0 or clen > MAX_BODY:
                        self._finish(http_response(413 if clen > 0 else 400, b"bad request body", keep=False))
                        return
            body = None
            if clen:
                if len(data) - rest < clen:
                    if not self.continued and b"\r\nexpect: 100-continue" in hdrs and ver11:
                        write(b"HTTP/1.1 100 Continue\r\n\r\n")
                        self.continued = True
                    self.buf = data
                    return
                body = data[rest : rest + clen]
                rest += clen
                self.continued = False
            data = data[rest:]

            # -- route
            q = target.find(b"?")
            if q >= 0:
                path = target[:q]
                query = target[q + 1 :]
            else:
                path = target
                query = b""
            if not path.startswith(b"/"):
                if path.startswith((b"http://", b"https://")):  # absolute-form
                    s = path.find(b"/", path.find(b"//") + 2)
                    path = path[s:] if s >= 0 else b"/"
            if b"%" in path:
                path = unquote_to_bytes(path)
            is_head = method == b"HEAD"
            resp = site.cache.get((path, ver11, keep, is_head))
            if resp is None:
                if path == b"/clientip":
                    peer = self.transport.get_extra_info("peername")
                    resp = http_response(200, _addr_str(peer).encode(), ver11=ver11, keep=keep, head=is_head)
                elif path == b"/echo":
                    if body is not None and b"\r\ncontent-type: application/x-www-form-urlencoded" not in hdrs:
                        body = None
                    vals = _query_values(query, body)
                    msg = vals.get("msg", b"")
                    code_s = vals.get("code", b"")
                    code = 200
                    if code_s:
                        try:
                            code = int(code_s)
                            if not 200 <= code <= 999:
                                raise ValueError
                        except ValueError:
                            msg = b"argument 'code' must be an integer or empty, got %s\n" % json.dumps(
                                code_s.decode("utf-8", "replace")
                            ).encode()
                            code = 200
                    resp = http_response(code, msg, ver11=ver11, keep=keep, head=is_head)
                elif path == b"/":
                    resp = http_response(200, _now_body(), ver11=ver11, keep=keep, head=is_head)
                else:
                    resp = http_response(404, _NOT_FOUND, ver11=ver11, keep=keep, head=is_head, extra=_NOSNIFF)
            if not keep:
                self._finish(resp)
                return
            write(resp)


class _UdpProto(asyncio.DatagramProtocol):
    """One UDP port of one pod: netexec's UDP commands."""

    __slots__ = ("site", "transport")

    def __init__(self, site: _Site):
        self.site = site
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        text = data[:UDP_MAX].decode("utf-8", "replace").strip().lower()
        if text == "hostname":
            out = self.site.host_body
        elif text.startswith("echo "):
            out = text.split(" ", 1)[1].encode()
        elif text == "clientip":
            out = _addr_str(addr).encode()
        else:
            return  # netexec only logs unknown commands
        self.transport.sendto(out, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # e.g. ICMP port unreachable from a client that went away


# --------------------------------------------------------------------------- pods

_SERVED_PROTOCOLS = ("TCP", "UDP")


def _pod_spec(pod: Pod) -> tuple[Any, ...]:
    """What, if it changes, means a pod's sockets must be reopened."""
    return (pod.netns, pod_hostname(pod), tuple(sorted({(p.port, p.protocol) for p in pod.ports})))


class _PodRuntime:
    __slots__ = ("pod", "spec", "site", "tcp", "udp", "running", "error")

    def __init__(self, pod: Pod, close_wait: float):
        self.pod = pod
        self.spec = _pod_spec(pod)
        self.site = _Site(pod, close_wait)
        self.tcp: list[socket.socket] = []
        self.udp: list[asyncio.DatagramTransport] = []
        self.running = False
        self.error: str | None = None


class PodServer:
    """All pods' netexec servers on the running asyncio loop.

    Usage: ``srv = PodServer(cluster); await srv.start(); ...; await srv.close()``.
    Pods are keyed ``namespace/name``; only pods with ports are served.
    """

    def __init__(
        self,
        cluster: Cluster,
        *,
        cluster_file: str | os.PathLike[str] | None = None,
        backlog: int = DEFAULT_BACKLOG,
        close_wait: float = 0.0,
    ):
        self.cluster = cluster
        self.cluster_file = Path(cluster_file) if cluster_file else None
        self.backlog = backlog
        self.close_wait = close_wait
        self.pods: dict[str, _PodRuntime] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._control: asyncio.AbstractServer | None = None
        self._control_path: str | None = None
        self._lock = asyncio.Lock()

    # -- sockets

    def _open_sockets(self, rt: _PodRuntime) -> tuple[list[socket.socket], list[socket.socket]]:
        """Create (inside the pod's namespace) and bind all listening sockets of a pod."""
        pod = rt.pod
        if not pod.netns:
            raise PodServerError(f"pod {pod.key}: no network namespace assigned")
        tcp: list[socket.socket] = []
        udp: list[socket.socket] = []
        try:
            with netns.entered(pod.netns):
                for port, proto in rt.spec[2]:
                    if proto == "TCP":
                        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                        tcp.append(s)
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        s.bind(("0.0.0.0", port))
                        s.listen(self.backlog)
                    elif proto == "UDP":
                        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
                        udp.append(s)
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        s.bind(("0.0.0.0", port))
                    else:
                        log.warning("pod %s: %s port %d not served (only TCP and UDP are)", pod.key, proto, port)
        except FileNotFoundError as e:
            for s in tcp + udp:
                s.close()
            raise PodServerError(f"pod {pod.key}: network namespace {pod.netns} does not exist") from e
        except OSError as e:
            for s in tcp + udp:
                s.close()
            raise PodServerError(f"pod {pod.key}: cannot listen: {e.strerror or e}") from e
        return tcp, udp

    def _serve_sockets(self, rt: _PodRuntime, tcp: list[socket.socket], udp: list[socket.socket]) -> list[Any]:
        """Register opened sockets on the loop; returns awaitables (UDP endpoints)."""
        loop = self._loop
        assert loop is not None
        site = rt.site
        for s in tcp:
            loop.add_reader(s.fileno(), self._accept, s, site)
        rt.tcp = tcp
        rt.running = True
        rt.error = None
        return [
            loop.create_datagram_endpoint(lambda site=site: _UdpProto(site), sock=s)  # type: ignore[misc]
            for s in udp
        ]

    def _accept(self, lsock: socket.socket, site: _Site) -> None:
        loop = self._loop
        make = getattr(loop, "_make_socket_transport", None)
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = lsock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("pod %s: accept: %s; pausing accepts for 1 s", site.key, e)
                    fd = lsock.fileno()
                    loop.remove_reader(fd)

                    def resume() -> None:
                        if lsock.fileno() == fd:  # still open (pod not stopped meanwhile)
                            loop.add_reader(fd, self._accept, lsock, site)

                    loop.call_later(1.0, resume)
                    return
                raise
            conn.setblocking(False)
            proto = _HttpConn(site)
            if make is not None:
                make(conn, proto, extra={"peername": addr})
            else:  # pragma: no cover - event loops without the selector internals
                loop.create_task(loop.connect_accepted_socket(lambda proto=proto: proto, conn))

    async def _start_pod(self, rt: _PodRuntime) -> None:
        tcp, udp = self._open_sockets(rt)
        eps = self._serve_sockets(rt, tcp, udp)
        try:
            rt.udp = [tr for tr, _ in await asyncio.gather(*eps)]
        except BaseException:
            self._stop_pod(rt, connections=True)
            raise

    def _stop_pod(self, rt: _PodRuntime, *, connections: bool) -> None:
        loop = self._loop
        for s in rt.tcp:
            with contextlib.suppress(Exception):
                loop.remove_reader(s.fileno())
            s.close()
        for tr in rt.udp:
            tr.close()
        rt.tcp = []
        rt.udp = []
        rt.running = False
        if connections:
            for c in list(rt.site.conns):
                if c.transport is not None:
                    c.transport.close()

    # -- public API

    @staticmethod
    def served(cluster: Cluster) -> dict[str, Pod]:
        """The pods this server serves: those with at least one containerPort."""
        return {p.key: p for p in cluster.pods if p.ports}

    async def start(self) -> None:
        """Open every pod's sockets. All or nothing: on failure nothing stays open."""
        self._loop = asyncio.get_running_loop()
        async with self._lock:
            opened: list[tuple[_PodRuntime, list[socket.socket], list[socket.socket]]] = []
            try:
                for key, pod in self.served(self.cluster).items():
                    rt = _PodRuntime(pod, self.close_wait)
                    tcp, udp = self._open_sockets(rt)
                    opened.append((rt, tcp, udp))
                    self.pods[key] = rt
            except BaseException:
                for _rt, tcp, udp in opened:
                    for s in tcp + udp:
                        s.close()
                self.pods.clear()
                raise
            eps: list[Any] = []
            for rt, tcp, udp in opened:
                eps.append(asyncio.gather(*self._serve_sockets(rt, tcp, udp)))
            results = await asyncio.gather(*eps)
            for (rt, _tcp, _udp), res in zip(opened, results, strict=True):
                rt.udp = [tr for tr, _ in res]
        log.info("serving %d pods", len(self.pods))

    def _get(self, key: str) -> _PodRuntime:
        try:
            return self.pods[key]
        except KeyError:
            raise PodServerError(f"no such pod: {key}") from None

    async def stop_pod(self, key: str, *, connections: bool = True) -> None:
        """Close the pod's listening sockets (new connections are refused) and, unless
        ``connections=False``, its established connections (as if its process died)."""
        async with self._lock:
            rt = self._get(key)
            self._stop_pod(rt, connections=connections)
        log.info("stopped %s", key)

    async def start_pod(self, key: str) -> None:
        """Re-open a stopped pod's listening sockets (no-op if it is running)."""
        async with self._lock:
            rt = self._get(key)
            if not rt.running:
                try:
                    await self._start_pod(rt)
                except PodServerError as e:
                    rt.error = str(e)
                    raise
        log.info("started %s", key)

    async def reload(self, cluster: Cluster) -> dict[str, Any]:
        """Reconcile with a new cluster: serve new pods, stop and forget removed ones,
        reopen pods whose namespace, hostname or ports changed (a stopped pod stays
        stopped). Returns what changed; failures are listed under ``errors``."""
        added: list[str] = []
        removed: list[str] = []
        changed: list[str] = []
        errors: dict[str, str] = {}
        async with self._lock:
            want = self.served(cluster)
            for key in [k for k in self.pods if k not in want]:
                self._stop_pod(self.pods.pop(key), connections=True)
                removed.append(key)
            for key, pod in want.items():
                old = self.pods.get(key)
                if old is not None and old.spec == _pod_spec(pod):
                    old.pod = pod
                    continue
                rt = _PodRuntime(pod, self.close_wait)
                if old is not None:
                    was_running = old.running
                    self._stop_pod(old, connections=True)
                    changed.append(key)
                    if not was_running:
                        self.pods[key] = rt
                        continue
                else:
                    added.append(key)
                self.pods[key] = rt
                try:
                    await self._start_pod(rt)
                except PodServerError as e:
                    rt.error = errors[key] = str(e)
                    log.error("%s", e)
            self.cluster = cluster
        log.info("reload: %d added, %d removed, %d changed", len(added), len(removed), len(changed))
        out: dict[str, Any] = {"added": added, "removed": removed, "changed": changed}
        if errors:
            out["errors"] = errors
        return out

    async def reload_file(self) -> dict[str, Any]:
        if self.cluster_file is None:
            raise PodServerError("no cluster file to reload from")
        try:
            cluster = Cluster.model_validate_json(self.cluster_file.read_text())
        except (OSError, ValueError) as e:
            raise PodServerError(f"{self.cluster_file}: {e}") from e
        return await self.reload(cluster)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pods": {k: ("running" if rt.running else "stopped") for k, rt in self.pods.items()},
            "pid": os.getpid(),
        }
        errors = {k: rt.error for k, rt in self.pods.items() if rt.error}
        if errors:
            out["errors"] = errors
        return out

    async def close(self) -> None:
        """Close every socket: listeners, connections, the control socket."""
        if self._control is not None:
            self._control.close()
            self._control = None
            if self._control_path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._control_path)
        for rt in self.pods.values():
            self._stop_pod(rt, connections=True)
        self.pods.clear()
        await asyncio.sleep(0)  # let transports run their close callbacks

    # -- control socket

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        """Execute one control request (the JSON protocol of the control socket)."""
        op = req.get("op")
        try:
            if op == "status":
                return self.status()
            if op in ("stop", "start"):
                key = req.get("pod")
                if not isinstance(key, str):
                    return {"error": f"{op}: 'pod' (namespace/name) is required"}
                if op == "stop":
                    await self.stop_pod(key, connections=bool(req.get("connections", True)))
                else:
                    await self.start_pod(key)
                return {"pod": key, "state": "running" if self.pods[key].running else "stopped"}
            if op == "reload":
                return await self.reload_file()
            return {"error": f"unknown op: {op!r}"}
        except PodServerError as e:
            return {"error": str(e)}

    async def _control_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                if not line.strip():
                    continue
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError("not a JSON object")
                except ValueError as e:
                    reply: dict[str, Any] = {"error": f"bad request: {e}"}
                else:
                    try:
                        reply = await self.handle(req)
                    except Exception as e:  # never let one request kill the server
                        log.exception("control request %r failed", req)
                        reply = {"error": f"{type(e).__name__}: {e}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def serve_control(self, path: str | os.PathLike[str]) -> None:
        """Listen for control requests on the unix socket ``path``."""
        path = os.fspath(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._control = await asyncio.start_unix_server(self._control_client, path=path)
        self._control_path = path


def control(sockpath: str | os.PathLike[str], op: str, *, timeout: float = 30.0, **kw: Any) -> dict[str, Any]:
    """Send one control request to a running pod server and return its reply.

    ``control(path, "status")``, ``control(path, "stop", pod="default/web-0")``,
    ``control(path, "start", pod=...)``, ``control(path, "reload")``. A failed
    request returns ``{"error": "..."}`` (it is not raised).
    """
    req = dict(kw, op=op)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(os.fspath(sockpath))
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("pod server closed the control connection without replying")
            buf += chunk
    return json.loads(buf)


# --------------------------------------------------------------------------- CLI


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _announce_ready() -> None:
    """Write ``ready`` and close the pipe to the parent (fd 1 then points at /dev/null)."""
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


async def _amain(args: argparse.Namespace, on_ready: Callable[[], None] = _announce_ready) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        cluster = Cluster.model_validate_json(Path(args.cluster).read_text())
    except (OSError, ValueError) as e:
        log.error("%s: %s", args.cluster, e)
        return 2
    srv = PodServer(cluster, cluster_file=args.cluster, backlog=args.backlog, close_wait=args.close_wait)
    try:
        await srv.start()
        await srv.serve_control(args.control)
    except (PodServerError, OSError) as e:
        log.error("%s", e)
        await srv.close()
        return 1
    on_ready()
    await stop.wait()
    log.info("signal received, exiting")
    await srv.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.podserver", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cluster", required=True, help="cluster JSON (testbed.model.Cluster)")
    ap.add_argument("--control", required=True, help="unix socket path for control requests")
    ap.add_argument("--log", help="log file (default: stderr)")
    ap.add_argument("--backlog", type=int, default=DEFAULT_BACKLOG, help="listen() backlog per TCP port")
    ap.add_argument(
        "--close-wait",
        type=float,
        default=0.0,
        help="after answering 'Connection: close', wait up to this many seconds for the client to "
        "close first (avoids TIME_WAIT on the pod side); 0 = close at once like agnhost",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    handler: logging.Handler = logging.FileHandler(args.log) if args.log else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s podserver[%(process)d] %(levelname)s %(message)s"))
    root = logging.getLogger()  # ours and asyncio's (never to an unread stderr pipe)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    _raise_nofile()
    # Until the loop's own handlers are installed, a SIGTERM/SIGINT is still a clean exit.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    return asyncio.run(_amain(args))


if __name__ == "__main__":
    raise SystemExit(main())


def spawn(cluster_file: str | os.PathLike, control: str | os.PathLike, log: str | os.PathLike, *, timeout: float,
          what: str = "pod servers", on_spawn=None) -> int:  # noqa: ANN001
    """Start ``python -m testbed.podserver`` detached (its own session: it outlives the
    CLI, and a Ctrl-C in the terminal does not reach it) and wait until it says every
    socket listens. ``on_spawn(pid)`` runs as soon as the process exists, before the
    wait (so crash cleanup can find it). Returns the pid; on failure kills it and
    raises KernelError with the last line of its log."""
    import select
    import subprocess
    import time as _time

    from testbed.errors import KernelError

    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "testbed.podserver", "--cluster", str(cluster_file), "--control", str(control),
             "--log", str(log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=logf, start_new_session=True,
        )
    if on_spawn is not None:
        on_spawn(proc.pid)
    assert proc.stdout is not None
    deadline = _time.monotonic() + timeout
    line = b""
    while _time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            break
        if proc.poll() is not None:
            break
    proc.stdout.close()
    if line.strip() != b"ready":
        proc.kill()
        try:
            with open(log, errors="replace") as f:
                tail = f.read().strip().splitlines()[-1:]
        except OSError:
            tail = []
        raise KernelError(f"{what} did not become ready: {tail[0] if tail else 'no output'}")
    return proc.pid
