"""The traffic generator: requests from client namespaces to a Service, one row each.

Clients are the cluster's own namespaces (pods, external clients), the target a
Service address (ClusterIP, NodePort, LoadBalancer IP) or a pod. Every request
becomes one row of a :class:`pandas.DataFrame` (tidy data: the runner's summaries
and plots are group-bys over these rows)::

    from testbed.traffic import Source, Target, run
    df = run([Source("toolbox-vp822", pod.netns)], Target("10.233.12.34", 80),
             requests=10_000, concurrency=4)

What a request is (``Target.protocol``):

* ``http`` — ``GET <path> HTTP/1.1`` with a ``Host`` header and nothing else (the
  same bytes ``wrk`` sends), the response read to its ``Content-Length``. The pod
  server answers the paths of ``agnhost netexec`` that Kubernetes' e2e Service tests
  use: ``/hostname`` (which backend served) and ``/clientip`` (the source address
  the backend saw: shows whether kube-proxy masqueraded).
* ``udp`` — the netexec datagram ``hostname`` or ``clientip``, one reply expected.
* ``tcp`` — a connection only (SYN, SYN-ACK, ACK, then RST): the cost of the
  path and of the DNAT alone, no application round trip.

``ask`` chooses the question: ``"hostname"`` puts the answer in ``backend``,
``"clientip"`` asks ``/clientip`` (or the ``clientip`` datagram) and puts it in
``source_seen``. There is no path answering both: a runner needing both makes two
passes.

Connections. ``connection="new"`` opens one connection per request (UDP: a new
socket, so a new source port and a new conntrack entry each time, which is what
spreads requests over endpoints); ``"keepalive"`` keeps one connection (or UDP
socket) per worker slot and sends the next request on it. Every TCP socket is
closed by the client with ``SO_LINGER 0``, i.e. with an RST: neither side keeps a
TIME_WAIT (see ENVIRONMENT.md §Traffic: a server-side TIME_WAIT left by a direct
connection makes SYNs through a VIP drop for 60 s, which would pollute the next
trial). The request never says ``Connection: close``: the pod server never closes
a keep-alive connection first, so the close is always ours.

Load models:

* closed loop (``rate=None``): ``concurrency`` worker slots, each sending its next
  request as soon as the previous one completed;
* open loop (``rate=R``): arrivals at ``R`` requests/s, **Poisson** by default
  (exponential gaps drawn from ``random.Random(seed)``) or ``arrivals="uniform"``
  (constant gap ``1/R``); each arrival is served by an idle slot, at most
  ``concurrency`` in flight. When none is idle the arrival waits: ``lag_us`` is how
  late it started against its schedule (add it to ``total_us`` for latency free of
  coordinated omission, as wrk2 does). The schedule is one global sequence whatever
  ``processes`` is (process ``p`` takes arrivals ``p, p+P, ...``), so a seed gives
  the same arrival times in every run.

The run stops after ``warmup + requests`` requests or after ``duration`` seconds
(whichever first; in-flight requests finish, bounded by ``timeout``; open-loop
arrivals still queued at the deadline become ``ECANCELED`` rows). The first
``warmup`` rows by start time are kept, flagged ``warmup=True``.

Columns (one row per request, ordered by ``start_ns``):

====================  ====================================================================
``client``            ``Source.name`` the request came from (categorical)
``worker``            the worker slot (0 .. concurrency-1)
``seq``               0, 1, ... in order of start time
``start_ns``          CLOCK_MONOTONIC ns when the request started (comparable across
                      processes: ``time.monotonic_ns``)
``lag_us``            open loop: start minus scheduled arrival; closed loop: 0
``resolve_us``        name resolution (``Target.host_name``), NaN when none
``connect_us``        connect() until established; NaN when the request reused a
                      connection, for UDP, and when the connection never came up
``total_us``          start until the whole response (includes resolve and connect);
                      for errors, until the error was seen
``bytes``             bytes received (headers and body)
``status``            HTTP status code (0: none, or not HTTP)
``backend``           the pod's answer to ``hostname`` ("" if not asked or no answer)
``source_seen``       the pod's answer to ``clientip`` ("" if not asked or no answer)
``error``             "" or a name: an errno name (``ECONNREFUSED``, ``ETIMEDOUT``,
                      ``ECONNRESET``, ``ENETUNREACH``, ...), ``EOF`` (closed before a
                      complete response), ``EPROTO`` (not an HTTP/1 response),
                      ``ECANCELED`` (open loop: never started before the deadline),
                      ``EAI_NONAME``/``EAI_AGAIN``/``EAI_FAIL`` (resolution failed)
``warmup``            True for the first ``warmup`` rows
====================  ====================================================================

``df.attrs`` holds the run's parameters, ``t0_ns``, ``elapsed_s`` and the host's
load (:func:`host_load`) before and after.

How it is fast (and why): no asyncio. A process with several slots runs one epoll
loop over non-blocking sockets; a process with one slot (concurrency 1) makes
blocking calls in a tight loop (connect, send, recv: no readiness round trip, and
the kernel's SO_SNDTIMEO/SO_RCVTIMEO are the timeouts). Requests are pre-encoded,
sockets are the C type ``_socket.socket`` (half the cost of ``socket.socket``),
stamps are ``time.monotonic_ns`` and rows are ten integers appended to a list that
is packed into ``array.array('q')`` chunks (no per-row objects survive). A socket is
created while the thread is inside its source's namespace (``setns``, ~1 µs, only
when the source changes) and then used from anywhere. After a non-blocking
``connect()`` returns ``EINPROGRESS`` the request is sent at once: on a veth path
the handshake has already completed inside the connect() call, so no extra wake-up
is paid (``EAGAIN`` falls back to waiting for writability). Several processes
(forked, started on one common ``t0``) are used when one core is the limit;
``processes=None`` uses one process per two CPUs, leaving the other core(s) to the
pod servers and the kernel. Sub-millisecond waits (open-loop arrivals) sleep in
``select()`` on the epoll descriptor or in ``clock_nanosleep``, with the timer
slack set to 1 ns.

Traps this avoids (ENVIRONMENT.md §Traffic): no TIME_WAIT (RST close, see above);
at high rates note that every connection leaves a conntrack entry in the nodes'
tables (10 s in CLOSE after an RST; 120 s in TIME_WAIT after a FIN close, as wrk's):
:func:`flush_conntrack` between trials. IPVS keeps its own connection entries (not
flushed by that) and would rewrite the reply of a direct connection reusing one's
client port: :func:`set_source_ports` keeps direct and Service probes apart.
kube-proxy answers a Service without endpoints with an ICMP REJECT, which the kernel
rate-limits per peer (``net.ipv4.icmp_ratelimit``: a burst of 6, then 1/s, measured
here): beyond the
burst a SYN gets no answer, its retransmit (1 s, 3 s, ...) gets the next token, so
such a Service shows immediate ``ECONNREFUSED`` rows at low rates, ``ECONNREFUSED``
after a second or ``ETIMEDOUT`` rows at higher ones. That is the kernel's real
behaviour, recorded as is. connect() is always non-blocking, as in curl, wrk or Go:
a blocking connect() misses the ICMP error that arrives while it still holds the
socket and waits for the retransmit (measured: 1.02 s instead of 20 µs).

Nothing here touches the host namespace: sources must be namespaces this project
created (``tb-...``), and :func:`flush_conntrack` and :func:`set_source_ports` refuse
any other namespace.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import ipaddress
import os
import random
import resource
import select
import _socket  # the C socket type: half the cost of socket.socket per connection
import socket
import struct
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from testbed import netns
from testbed.errors import InputError, KernelError
from testbed.model import PREFIX, Cluster

if TYPE_CHECKING:
    import pandas as pd

MAX_REQUESTS = 10_000_000  # also the cap on rows of a duration-bound run
MAX_DURATION = 3600.0
MAX_CONCURRENCY = 20_000
MAX_PROCESSES = 64
MAX_TIMEOUT = 300.0
MAX_RATE = 10_000_000.0
MAX_RESPONSE = 1 << 20  # an HTTP response larger than this is a protocol error here
READY_TIMEOUT = 60.0

Protocol = Literal["http", "tcp", "udp"]
Connection = Literal["new", "keepalive"]
Ask = Literal["hostname", "clientip"]
Arrivals = Literal["poisson", "uniform"]
Resolver = Callable[[str], str]


@dataclass(frozen=True)
class Source:
    """A client: a namespace the project created (a pod's, an external client's),
    optionally with the source address to bind (an extra address on it)."""

    name: str
    netns: str
    bind_ip: str | None = None


@dataclass(frozen=True)
class Target:
    """Where requests go. ``host_name``: a DNS name resolved (through the source's
    resolver) before each new connection; ``ip`` is then only the fallback shown in
    errors and the ``Host`` header carries the name."""

    ip: str
    port: int
    protocol: Protocol = "http"
    path: str = "/hostname"
    host_name: str | None = None


# --------------------------------------------------------------------------- helpers


def source_for(cluster: Cluster, name: str) -> Source:
    """The Source for a pod (``namespace/name`` or a unique pod name), an external
    client or a node of ``cluster``, named as given."""
    if "/" in name:
        hits = [p.netns for p in cluster.pods if p.key == name]
    else:
        hits = [p.netns for p in cluster.pods if p.name == name]
        hits += [c.netns for c in cluster.clients if c.name == name]
        hits += [n.netns for n in cluster.nodes if n.name == name]
    if len(hits) != 1:
        why = "no pod, client or node of that name" if not hits else "ambiguous; use NAMESPACE/NAME"
        raise InputError(f'Invalid value: "{name}": {why} in cluster {cluster.name}', field="source")
    return Source(name, hits[0])


def host_load() -> dict[str, float]:
    """The host's load, to record beside a trial: load averages, runnable
    processes, CPU count (the pod servers, the kernel and the generator share them)."""
    l1, l5, l15 = os.getloadavg()
    running = total = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/loadavg") as f:
            running, total = (int(x) for x in f.read().split()[3].split("/"))
    return {
        "loadavg_1m": l1,
        "loadavg_5m": l5,
        "loadavg_15m": l15,
        "procs_running": running,
        "procs_total": total,
        "cpus": os.cpu_count() or 1,
    }


def _own_netns(name: str, what: str) -> None:
    if not name.startswith(PREFIX):
        raise InputError(
            f'Invalid value: "{name}": not a namespace of this project (names start with "{PREFIX}")', field=what
        )
    if not netns.exists(name):
        raise InputError(f'Invalid value: "{name}": no such network namespace', field=what)


def flush_conntrack(ns: str) -> int:
    """Empty the conntrack table of namespace ``ns`` (a node's) with ``conntrack -F``,
    between trials, so no entry of one trial steers the next (a UDP flow keeps its
    endpoint while its entry lives; a TIME_WAIT entry can clash with a new tuple).
    Returns how many entries there were (``conntrack -C`` just before).

    This is experiment hygiene, not kube-proxy behaviour: kube-proxy deletes only
    the UDP entries of endpoints it removed (pkg/proxy/conntrack). Refuses any
    namespace the project did not create (never the host's table)."""
    _own_netns(ns, "netns")
    try:
        with netns.entered(ns):
            count = subprocess.run(["conntrack", "-C"], capture_output=True, text=True, timeout=30)
            r = subprocess.run(["conntrack", "-F"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise KernelError("conntrack is not installed (Debian package `conntrack`)") from None
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise KernelError(f"conntrack -F in {ns} failed (exit {r.returncode}): {msg[-1] if msg else ''}")
    try:
        return int(count.stdout.strip() or 0)
    except ValueError:
        return 0


#: Source ports of connections that go through a Service (``via`` clusterIP, nodePort,
#: loadBalancer, dns) and of those that go straight to a pod (``via: pod``, the
#: control): the two halves of Linux's default ``ip_local_port_range`` (32768-60999).
SERVICE_PORTS = (32768, 46883)
DIRECT_PORTS = (46884, 60999)


def set_source_ports(ns: str, ports: tuple[int, int]) -> None:
    """Set ``net.ipv4.ip_local_port_range`` of namespace ``ns`` (a pod's, node's or client's):
    the source ports its new connections draw from.

    Experiment hygiene, not kube-proxy behaviour. IPVS keeps a connection entry after
    the client's RST (10 s in CLOSE; 2 min in TIME_WAIT after a FIN) and matches
    replies by real server and client address:port, whatever the virtual address was.
    A direct connection from the same pod and source port to that same backend then
    has its SYN-ACK rewritten to come from the VIP, and times out: measured in the
    guest kernel, 16 of 16 such reuses within seconds timed out in ipvs mode, 0 of 16
    in iptables mode (tests/test_ipvs_mode.py checks one). Linux draws ports per
    destination from its own random offset, so a probe straight to a pod right after
    a Service probe from the same pods hit it now and then (ETIMEDOUT rows in the
    control). Disjoint ranges for the two kinds of probes rule it out. Refuses any
    namespace the project did not create."""
    _own_netns(ns, "netns")
    lo, hi = ports
    if not 1024 <= lo < hi <= 65535:
        raise InputError(f'Invalid value: "{lo}-{hi}": must be a range within 1024-65535', field="ip_local_port_range")
    with netns.entered(ns):
        netns.sysctl("net.ipv4.ip_local_port_range", f"{lo} {hi}")


def resolv_conf_resolver(ns: str, timeout: float = 2.0) -> Resolver:
    """A resolver behaving like the pod's libc: nameservers, ``search`` and
    ``ndots`` from ``/etc/netns/<ns>/resolv.conf`` (the file ``ip netns exec`` mounts
    over /etc/resolv.conf, where the kubelet-style pod resolv.conf lives), queried
    over UDP from the calling thread's namespace, no cache. Returns the first A
    record's address. (testbed.dns.address_resolver(pod) does the same from the
    cluster DNS module.)"""
    import dns.resolver

    path = os.path.join("/etc/netns", ns, "resolv.conf")
    if not os.path.exists(path):
        raise InputError(
            f"no resolver given and {path} does not exist (the cluster has no DNS for this client)",
            field="Target.host_name",
        )
    res = dns.resolver.Resolver(filename=path)
    res.cache = None

    def resolve(name: str) -> str:
        ans = res.resolve(name, "A", search=True, lifetime=timeout)
        return ans[0].address

    return resolve


def _resolve_error(e: BaseException) -> str:
    """getaddrinfo's names for what a failed resolution is."""
    if isinstance(e, socket.gaierror):
        for n in ("EAI_NONAME", "EAI_AGAIN", "EAI_FAIL", "EAI_NODATA"):
            if getattr(socket, n, None) == e.errno:
                return n
        return "EAI_FAIL"
    if isinstance(e, OSError) and e.errno:
        return errno.errorcode.get(e.errno, "EAI_FAIL")
    name = type(e).__name__
    if name in ("NXDOMAIN", "NoAnswer"):
        return "EAI_NONAME"
    if name in ("LifetimeTimeout", "Timeout", "NoNameservers"):
        return "EAI_AGAIN"  # glibc: a timeout or SERVFAIL is a temporary failure
    return "EAI_FAIL"


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_TIMERSLACK = 29
PR_GET_TIMERSLACK = 30


def _tune_process() -> int:
    """1 ns timer slack for the calling thread (precise open-loop sleeps) and as
    many fds as allowed; returns the previous slack (ns), or -1."""
    old = -1
    with contextlib.suppress(Exception):
        old = _libc.prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0)
        _libc.prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(1), 0, 0, 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return old


# --------------------------------------------------------------------------- plan


@dataclass
class _Plan:
    """What one worker process does (plain data: it crosses fork as is)."""

    proc: int
    nprocs: int
    sources: list[Source]
    slot_ids: list[int]  # global slot numbers of this process's slots
    slot_src: list[int]  # index into sources, per local slot
    slot_count: list[int] | None  # closed loop + requests: requests per slot
    target: Target
    family: int
    payload: bytes
    connection: Connection
    timeout_ns: int
    duration_ns: int | None
    total: int | None  # warmup + requests (global)
    max_rows: int
    rate: float | None
    arrivals: Arrivals
    seed: int
    resolvers: dict[int, Resolver] = field(default_factory=dict)


def _request_bytes(target: Target, ask: Ask) -> bytes:
    if target.protocol == "udp":
        return ask.encode()
    if target.protocol == "tcp":
        return b""
    path = "/clientip" if ask == "clientip" else target.path
    if target.host_name:
        host = target.host_name
    else:
        host = f"[{target.ip}]" if ":" in target.ip else target.ip
        host = f"{host}:{target.port}"
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def _validate(
    sources: Sequence[Source],
    target: Target,
    connection: str,
    requests: int | None,
    duration: float | None,
    concurrency: int,
    rate: float | None,
    arrivals: str,
    warmup: int,
    timeout: float,
    processes: int | None,
    ask: str,
) -> tuple[int, int]:
    """Refuse bad parameters with one line naming the field; returns (family, processes)."""

    def bad(fld: str, msg: str) -> InputError:
        return InputError(msg, field=fld)

    def is_int(v: Any) -> bool:
        return isinstance(v, int | np.integer) and not isinstance(v, bool)

    if not isinstance(target, Target):
        raise bad("target", "Invalid value: expected a testbed.traffic.Target")
    if target.protocol not in ("http", "tcp", "udp"):
        raise bad("Target.protocol", f'Unsupported value: "{target.protocol}": supported values: "http", "tcp", "udp"')
    try:
        if not isinstance(target.ip, str):
            raise ValueError
        ip = ipaddress.ip_address(target.ip)
    except ValueError:
        raise bad("Target.ip", f'Invalid value: "{target.ip}": must be a valid IP address') from None
    if not is_int(target.port) or not 1 <= target.port <= 65535:
        raise bad("Target.port", f"Invalid value: {target.port!r}: must be between 1 and 65535, inclusive")
    if target.protocol == "http" and (
        not isinstance(target.path, str)
        or not target.path.startswith("/") or any(c in target.path for c in " \r\n\t") or len(target.path) > 8192
    ):
        raise bad("Target.path", f'Invalid value: "{target.path}": must start with "/" and contain no whitespace')
    if target.host_name is not None:
        h = target.host_name
        if not isinstance(h, str) or not h or len(h) > 253 or any(c in h for c in " \r\n\t/:"):
            raise bad("Target.host_name", f'Invalid value: "{h}": must be a DNS name')
    if target.protocol == "tcp" and connection != "new":
        raise bad("connection", 'Invalid value: "keepalive": protocol "tcp" measures connections, so every request is a new one')
    if ask == "both":
        raise bad("ask", 'Unsupported value: "both": no path answers both; make one pass with "hostname" and one with "clientip"')
    if ask not in ("hostname", "clientip"):
        raise bad("ask", f'Unsupported value: "{ask}": supported values: "hostname", "clientip"')
    if connection not in ("new", "keepalive"):
        raise bad("connection", f'Unsupported value: "{connection}": supported values: "new", "keepalive"')
    if arrivals not in ("poisson", "uniform"):
        raise bad("arrivals", f'Unsupported value: "{arrivals}": supported values: "poisson", "uniform"')
    if requests is None and duration is None:
        raise bad("requests", "Required value: give requests, duration or both (the run must be bounded)")
    if requests is not None and (not is_int(requests) or not 1 <= requests <= MAX_REQUESTS):
        raise bad("requests", f"Invalid value: {requests!r}: must be between 1 and {MAX_REQUESTS}, inclusive")
    if duration is not None and (
        not isinstance(duration, int | float) or isinstance(duration, bool) or not 0 < duration <= MAX_DURATION
    ):
        raise bad("duration", f"Invalid value: {duration!r}: must be greater than 0 and at most {MAX_DURATION:g} s")
    if not is_int(warmup) or not 0 <= warmup <= MAX_REQUESTS:
        raise bad("warmup", f"Invalid value: {warmup!r}: must be between 0 and {MAX_REQUESTS}, inclusive")
    if requests is not None and requests + warmup > MAX_REQUESTS:
        raise bad("warmup", f"Invalid value: {warmup}: requests + warmup must be at most {MAX_REQUESTS}")
    if not is_int(concurrency) or not 1 <= concurrency <= MAX_CONCURRENCY:
        raise bad("concurrency", f"Invalid value: {concurrency!r}: must be between 1 and {MAX_CONCURRENCY}, inclusive")
    if concurrency < len(sources):
        raise bad(
            "concurrency",
            f"Invalid value: {concurrency}: must be at least the number of sources ({len(sources)}); "
            "each worker slot sends from one source",
        )
    if rate is not None and (
        not isinstance(rate, int | float) or isinstance(rate, bool) or not 0 < rate <= MAX_RATE
    ):
        raise bad("rate", f"Invalid value: {rate!r}: must be greater than 0 and at most {MAX_RATE:g} requests/s")
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not 0 < timeout <= MAX_TIMEOUT:
        raise bad("timeout", f"Invalid value: {timeout!r}: must be greater than 0 and at most {MAX_TIMEOUT:g} s")
    if processes is None:
        processes = min(concurrency, max(1, (os.cpu_count() or 2) // 2))
    if not is_int(processes) or not 1 <= processes <= MAX_PROCESSES:
        raise bad("processes", f"Invalid value: {processes!r}: must be between 1 and {MAX_PROCESSES}, inclusive")
    if processes > concurrency:
        raise bad("processes", f"Invalid value: {processes}: must be at most concurrency ({concurrency})")
    if not sources:
        raise bad("sources", "Required value: at least one Source")
    names = set()
    for k, s in enumerate(sources):
        if not isinstance(s, Source) or not isinstance(s.name, str) or not isinstance(s.netns, str):
            raise bad(f"sources[{k}]", "Invalid value: expected a testbed.traffic.Source(name: str, netns: str)")
        _own_netns(s.netns, f"sources[{k}].netns")
        if s.name in names:
            raise bad(f"sources[{k}].name", f'Duplicate value: "{s.name}"')
        names.add(s.name)
        if s.bind_ip is not None:
            try:
                if not isinstance(s.bind_ip, str):
                    raise ValueError
                b = ipaddress.ip_address(s.bind_ip)
            except ValueError:
                raise bad(f"sources[{k}].bind_ip", f'Invalid value: "{s.bind_ip}": must be a valid IP address') from None
            if b.version != ip.version:
                raise bad(f"sources[{k}].bind_ip", f'Invalid value: "{s.bind_ip}": not the address family of Target.ip')
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), int(processes)


def _plans(
    sources: Sequence[Source],
    target: Target,
    *,
    family: int,
    payload: bytes,
    connection: Connection,
    total: int | None,
    duration: float | None,
    concurrency: int,
    rate: float | None,
    arrivals: Arrivals,
    timeout: float,
    processes: int,
    seed: int,
    resolvers: dict[int, Resolver],
) -> list[_Plan]:
    """Split the run over processes: slot j sends from sources[j % S] and lives in
    process j % P; a closed-loop count is split evenly over slots."""
    plans = []
    for p in range(processes):
        slots = list(range(p, concurrency, processes))
        counts = None
        if total is not None and rate is None:
            counts = [total // concurrency + (1 if j < total % concurrency else 0) for j in slots]
        used = {j % len(sources) for j in slots}
        plans.append(
            _Plan(
                proc=p,
                nprocs=processes,
                sources=list(sources),
                slot_ids=slots,
                slot_src=[j % len(sources) for j in slots],
                slot_count=counts,
                target=target,
                family=family,
                payload=payload,
                connection=connection,
                timeout_ns=int(timeout * 1e9),
                duration_ns=None if duration is None else int(duration * 1e9),
                total=total,
                max_rows=max(1, MAX_REQUESTS // processes),
                rate=rate,
                arrivals=arrivals,
                seed=seed,
                resolvers={k: v for k, v in resolvers.items() if k in used},
            )
        )
    return plans


# --------------------------------------------------------------------------- engine

_LINGER0 = struct.pack("ii", 1, 0)
_EIN = select.EPOLLIN
_EOUT = select.EPOLLOUT
_EBAD = select.EPOLLERR | select.EPOLLHUP
_CL = b"Content-Length: "

# A worker's rows: NCOLS int64 per row, in this order, appended to a list that is
# packed into an array.array('q') every CHUNK values (compact, and list.extend of
# one tuple is the cheapest way Python has to store ten numbers).
COLS = ("slot", "start", "lag", "resolve", "connect", "total", "bytes", "status", "answer", "error")
NCOLS = len(COLS)
CHUNK = NCOLS * 4096


# _parse_http states
NEED_MORE, COMPLETE, TO_EOF, BAD = 0, 1, 2, 3


def _parse_http(b: bytes) -> tuple[int, int, bytes | None]:
    """Where an HTTP/1 response read so far stands: ``(state, status, body)``.

    ``NEED_MORE``: headers or body incomplete; ``COMPLETE``: ``body`` is the whole
    body (``Content-Length`` bytes; 1xx/204/304 have none); ``TO_EOF``: headers
    complete without a length, the body ends when the server closes; ``BAD``: not
    an HTTP/1 response, or larger than :data:`MAX_RESPONSE`. (The pod server always
    sends ``Content-Length``; chunked encoding is not needed and reads as TO_EOF.)
    """
    he = b.find(b"\r\n\r\n")
    if he < 0:
        return (BAD if len(b) > MAX_RESPONSE else NEED_MORE), 0, None
    if not b.startswith(b"HTTP/1.") or b[12:13] not in (b" ", b"\r"):
        return BAD, 0, None
    try:
        status = int(b[9:12])
    except ValueError:
        return BAD, 0, None
    cl = b.find(_CL, 0, he)
    if cl >= 0:
        cl += 16
    else:
        cl = b[:he].lower().find(b"\r\ncontent-length:")
        if cl < 0:
            if status in (204, 304) or 100 <= status < 200:
                return COMPLETE, status, b""
            return TO_EOF, status, None
        cl += 17
    try:
        need = he + 4 + int(b[cl : b.find(b"\r\n", cl, he + 2)])
    except ValueError:
        return BAD, status, None
    if len(b) < need:
        return (BAD if need > MAX_RESPONSE else NEED_MORE), status, None
    return COMPLETE, status, b[he + 4 : need]


def _body_at_eof(b: bytes) -> bytes:
    return b[b.find(b"\r\n\r\n") + 4 :]


def _arrival_times(plan: _Plan, t0: int):  # noqa: ANN202 - generator
    """This process's share of the global arrival schedule (absolute ns), in order."""
    rate = plan.rate
    assert rate is not None
    rng = random.Random(plan.seed)
    total = plan.total
    end = None if plan.duration_ns is None else t0 + plan.duration_ns
    k = 0
    t = 0.0
    step = 1e9 / rate
    P, me = plan.nprocs, plan.proc
    while total is None or k < total:
        if plan.arrivals == "poisson":
            t += rng.expovariate(1.0) * step
        else:
            t = k * step
        at = t0 + int(t)
        if end is not None and at >= end:
            return
        if k % P == me:
            yield at
        k += 1


def _engine(plan: _Plan, t0: int, record: bool = True) -> dict[str, Any]:
    """Run one process's share of the load, starting at ``t0`` (monotonic ns).
    Returns the rows as typed arrays (``record``) or just counts.

    Several slots: one epoll loop over non-blocking sockets. One slot: the same
    requests with blocking reads (:func:`_engine_single`): no readiness round trip,
    the lowest overhead and the most faithful latency at concurrency 1."""
    if len(plan.slot_src) == 1:
        return _engine_single(plan, t0, record)
    clock = time.monotonic_ns
    tgt = plan.target
    proto = tgt.protocol
    is_udp = proto == "udp"
    is_tcponly = proto == "tcp"
    keep = plan.connection == "keepalive"
    family = plan.family
    stype = (socket.SOCK_DGRAM if is_udp else socket.SOCK_STREAM) | socket.SOCK_NONBLOCK
    payload = plan.payload
    addr0 = (tgt.ip, tgt.port)
    timeout_ns = plan.timeout_ns
    sources = plan.sources
    slot_src = plan.slot_src
    nslots = len(slot_src)
    resolvers = plan.resolvers
    host_name = tgt.host_name
    parse = _parse_http

    # rows
    chunks: list[array.array] = []
    pend: list[int] = []
    put = pend.extend
    answers: dict[bytes, int] = {}
    errors: dict[str, int] = {"": 0}
    n_rows = 0
    n_err = 0
    max_rows = plan.max_rows

    # per-slot state
    socks: list[_socket.socket | None] = [None] * nslots
    phase = [0] * nslots  # 0 idle, 1 connecting, 2 waiting for the response, 3 reading a body to EOF
    t_start = [0] * nslots
    t_sched = [0] * nslots
    t_res = [-1] * nslots
    t_c0 = [0] * nslots  # when connect() was called
    t_conn = [-1] * nslots
    bufs = [b""] * nslots
    fdslot: dict[int, int] = {}
    left = list(plan.slot_count) if plan.slot_count is not None else None
    inflight = 0

    # namespaces: one fd per source, setns only when the source changes
    orig_ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    ns_fds: dict[int, int] = {}
    cur_src = -1
    ep = select.epoll()
    epfd = ep.fileno()

    def row(i: int, ts: int, lag: int, res: int, conn: int, total: int, nbytes: int, status: int, body, err: str) -> None:
        """Record one request (the hot path, :func:`finish`, has this inlined)."""
        nonlocal n_rows, n_err
        n_rows += 1
        if err:
            n_err += 1
        if not record:
            return
        a = -1
        if body is not None:
            a = answers.get(body)
            if a is None:
                a = answers[body] = len(answers)
        e = 0
        if err:
            e = errors.get(err)
            if e is None:
                e = errors[err] = len(errors)
        put((i, ts, lag, res, conn, total, nbytes, status, a, e))
        if len(pend) >= CHUNK:
            chunks.append(array.array("q", pend))
            pend.clear()

    def drop(i: int) -> None:
        """Close slot i's socket with an RST (SO_LINGER 0 was set) and forget it."""
        s = socks[i]
        if s is not None:
            fdslot.pop(s.fileno(), None)
            s.close()  # closing also removes it from the epoll set
            socks[i] = None

    def finish(i: int, now: int, nbytes: int, status: int, body, err: str) -> None:
        """Slot i's request is over (``err`` "" if it succeeded): record it, free the slot."""
        nonlocal inflight, n_rows, n_err
        n_rows += 1
        if record:
            a = -1
            if body is not None:
                a = answers.get(body)
                if a is None:
                    a = answers[body] = len(answers)
            e = 0
            if err:
                n_err += 1
                e = errors.get(err)
                if e is None:
                    e = errors[err] = len(errors)
            ts = t_start[i]
            put((i, ts, ts - t_sched[i], t_res[i], t_conn[i], now - ts, nbytes, status, a, e))
            if len(pend) >= CHUNK:
                chunks.append(array.array("q", pend))
                pend.clear()
        elif err:
            n_err += 1
        phase[i] = 0
        bufs[i] = b""
        inflight -= 1
        if err or not keep:
            drop(i)
        idle.append(i)

    def start(i: int, sched: int) -> bool:
        """Start slot i's next request; ``sched`` is its scheduled arrival (open
        loop) or -1 (closed loop: no lag). The request starts (``start_ns``) just
        before send() on a kept connection, else just before the name lookup or
        connect(): creating the socket is the generator's cost, not the path's.
        Closed loop: a request whose start stamp would fall at or after the end of a
        timed run is not started (False; the slot's socket is closed)."""
        nonlocal inflight, cur_src
        t_res[i] = -1
        t_conn[i] = -1
        inflight += 1
        s = socks[i]
        if s is not None:  # keep-alive: the next request on the open connection
            ts = clock()
            if sched < 0 and run_end is not None and ts >= run_end:
                inflight -= 1
                return False
            t_start[i] = ts
            t_sched[i] = sched if sched >= 0 else ts
            try:
                s.send(payload)
            except OSError as e:
                finish(i, clock(), 0, 0, None, errno.errorcode.get(e.errno or 0, "EIO"))
                return True
            phase[i] = 2
            return True
        src = slot_src[i]
        if src != cur_src:
            fd = ns_fds.get(src)
            if fd is None:
                fd = ns_fds[src] = os.open(netns.path(sources[src].netns), os.O_RDONLY)
            netns.setns(fd)
            cur_src = src
        try:
            s = _socket.socket(family, stype)
        except OSError as e:
            ts = t_start[i] = clock()
            t_sched[i] = sched if sched >= 0 else ts
            finish(i, ts, 0, 0, None, errno.errorcode.get(e.errno or 0, "EIO"))
            return True
        socks[i] = s
        fd = s.fileno()
        fdslot[fd] = i
        addr = addr0
        ts = -1
        try:
            if not is_udp:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
            bind = sources[src].bind_ip
            if bind is not None:
                s.bind((bind, 0))
            ts = clock()
            if sched < 0 and run_end is not None and ts >= run_end:
                inflight -= 1
                return False
            t_start[i] = ts
            t_sched[i] = sched if sched >= 0 else ts
            if host_name is not None:
                try:
                    addr = (resolvers[src](host_name), addr0[1])
                except Exception as e:  # noqa: BLE001 - any resolver failure is a row
                    now = clock()
                    t_res[i] = now - ts
                    finish(i, now, 0, 0, None, _resolve_error(e))
                    return True
                t_res[i] = clock() - ts
            c0 = t_c0[i] = clock()
            rc = s.connect_ex(addr)
        except OSError as e:
            now = clock()
            if ts < 0:  # failed before the start stamp (setsockopt, bind)
                t_start[i] = now
                t_sched[i] = sched if sched >= 0 else now
            finish(i, now, 0, 0, None, errno.errorcode.get(e.errno or 0, "EIO"))
            return True
        if rc and rc != errno.EINPROGRESS:
            finish(i, clock(), 0, 0, None, errno.errorcode.get(rc, "EIO"))
            return True
        if is_udp:
            try:
                s.send(payload)
            except OSError as e:
                finish(i, clock(), 0, 0, None, errno.errorcode.get(e.errno or 0, "EIO"))
                return True
            ep.register(fd, _EIN)
            phase[i] = 2
            return True
        c1 = clock()
        try:
            if is_tcponly:
                s.getpeername()  # ENOTCONN while the handshake is still going on
            else:
                s.send(payload)  # on veth the handshake completed inside connect()
        except (BlockingIOError, InterruptedError):
            ep.register(fd, _EOUT)
            phase[i] = 1
            return True
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                ep.register(fd, _EOUT)
                phase[i] = 1
                return True
            finish(i, clock(), 0, 0, None, errno.errorcode.get(e.errno or 0, "EIO"))
            return True
        t_conn[i] = c1 - c0
        if is_tcponly:
            finish(i, c1, 0, 0, None, "")
            return True
        ep.register(fd, _EIN)
        phase[i] = 2
        return True

    def on_response(i: int, data: bytes, now: int) -> None:
        """Data arrived for slot i's request; finish it once the response is whole."""
        if is_udp:
            finish(i, now, len(data), 0, data, "")
            return
        b = bufs[i] + data if bufs[i] else data
        state, status, body = parse(b)
        if state == COMPLETE:
            finish(i, now, len(b), status, body, "")
        elif state == NEED_MORE:
            bufs[i] = b
        elif state == TO_EOF:
            bufs[i] = b
            phase[i] = 3
        else:
            finish(i, now, len(b), status, None, "EPROTO")

    # arrivals (open loop) and stop conditions
    open_loop = plan.rate is not None
    arrivals_it = _arrival_times(plan, t0) if open_loop else None
    next_arr = next(arrivals_it, None) if arrivals_it is not None else None
    pending: deque[int] = deque()
    run_end = t0 + plan.duration_ns if plan.duration_ns is not None else None
    idle: deque[int] = deque(range(nslots))
    # request deadlines in start order (the timeout is the same for all, so this
    # FIFO is sorted); an entry is stale once its slot moved on (t_start differs)
    dlq: deque[tuple[int, int, int]] = deque()
    dl_put = dlq.append

    try:
        while True:
            now = clock()
            if now >= t0:
                break
            wait = (t0 - now) / 1e9
            if wait > 0.002:
                time.sleep(wait - 0.001)
            else:
                select.select([], [], [], wait)
        stopped = False  # no new request may start (deadline or row cap)
        while True:
            now = clock()
            if not stopped and ((run_end is not None and now >= run_end) or n_rows + inflight >= max_rows):
                stopped = True
            # 1. start what may start
            if open_loop:
                if stopped:
                    while pending:  # queued arrivals that never got a slot before the end
                        at = pending.popleft()
                        row(-1, at, -1, -1, -1, -1, 0, 0, None, "ECANCELED")
                    next_arr = None
                else:
                    while next_arr is not None and next_arr <= now:
                        pending.append(next_arr)
                        next_arr = next(arrivals_it, None)
                    while pending and idle and n_rows + inflight < max_rows:
                        i = idle.popleft()
                        start(i, pending.popleft())
                        if phase[i]:
                            dl_put((t_start[i] + timeout_ns, i, t_start[i]))
                if next_arr is None and not pending and not inflight:
                    break
            else:
                while idle:
                    i = idle.popleft()
                    if not stopped and run_end is not None and clock() >= run_end:
                        stopped = True
                    if stopped or (left is not None and left[i] <= 0):
                        drop(i)  # this slot is done
                        continue
                    if left is not None:
                        left[i] -= 1
                    if not start(i, -1):  # the run ended while the socket was made
                        stopped = True
                        drop(i)
                        continue
                    if phase[i]:
                        dl_put((t_start[i] + timeout_ns, i, t_start[i]))
                    if n_rows + inflight >= max_rows:
                        stopped = True
                if not inflight:
                    break
            # 2. wait for events, the next arrival, the end of the run or a timeout
            now = clock()
            until = dlq[0][0] if dlq else now + 100_000_000
            precise = False  # arrivals and the end of the run need better than epoll's 1 ms
            if open_loop and next_arr is not None and next_arr < until:
                until = next_arr
                precise = True
            if run_end is not None and not stopped and run_end < until:
                until = run_end
                precise = True
            wait_ns = until - now
            if wait_ns <= 0:
                events = ep.poll(0)
            elif not precise:
                events = ep.poll(wait_ns / 1e9)  # rounded up to whole ms
            elif wait_ns < 2_000_000:
                r, _, _ = select.select([epfd], [], [], wait_ns / 1e9)  # µs resolution
                events = ep.poll(0) if r else ()
            else:
                events = ep.poll((wait_ns // 1_000_000 - 1) / 1e3)
            for fd, ev in events:
                i = fdslot.get(fd)
                if i is None:
                    continue
                s = socks[i]
                ph = phase[i]
                if ph == 1:  # TCP handshake finished (or failed)
                    now = clock()
                    if ev & _EBAD:
                        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        finish(i, now, 0, 0, None, errno.errorcode.get(err, "EIO") if err else "ECONNRESET")
                        continue
                    t_conn[i] = now - t_c0[i]
                    if is_tcponly:
                        finish(i, now, 0, 0, None, "")
                        continue
                    try:
                        s.send(payload)
                    except OSError as e:
                        finish(i, clock(), 0, 0, None, errno.errorcode.get(e.errno or 0, "EIO"))
                        continue
                    ep.modify(fd, _EIN)
                    phase[i] = 2
                elif ph >= 2:
                    try:
                        data = s.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as e:
                        finish(i, clock(), len(bufs[i]), 0, None, errno.errorcode.get(e.errno or 0, "EIO"))
                        continue
                    now = clock()
                    if data:
                        if ph == 2:
                            on_response(i, data, now)
                        else:  # read-until-close body
                            bufs[i] += data
                            if len(bufs[i]) > MAX_RESPONSE:
                                finish(i, now, len(bufs[i]), 0, None, "EPROTO")
                        continue
                    # EOF
                    b = bufs[i]
                    if ph == 3:
                        drop(i)
                        finish(i, now, len(b), int(b[9:12]), _body_at_eof(b), "")
                    else:
                        finish(i, now, len(b), 0, None, "EOF")
                else:  # an idle kept-alive connection: closed or reset by the server
                    with contextlib.suppress(OSError):
                        s.recv(65536)
                    drop(i)
            # 3. timeouts
            if dlq:
                now = clock()
                while dlq and dlq[0][0] <= now:
                    _, i, ts = dlq.popleft()
                    if phase[i] and t_start[i] == ts:
                        finish(i, now, len(bufs[i]), 0, None, "ETIMEDOUT")
        t_end = clock()
    finally:
        for i in range(nslots):
            drop(i)
        ep.close()
        with contextlib.suppress(OSError):
            netns.setns(orig_ns)
        os.close(orig_ns)
        for fd in ns_fds.values():
            os.close(fd)
    out: dict[str, Any] = {"rows": n_rows, "errors": n_err, "t_end": t_end, "proc": plan.proc}
    if record:
        chunks.append(array.array("q", pend))
        out["chunks"] = chunks
        out["answers"] = list(answers)
        out["error_names"] = list(errors)
        out["slot_ids"] = plan.slot_ids
    return out


def _engine_single(plan: _Plan, t0: int, record: bool = True) -> dict[str, Any]:
    """One slot, blocking reads: request after request (closed loop) or at each
    arrival (open loop). Same rows, same meanings as :func:`_engine`. connect() is
    non-blocking (as in every real client; see the comment inside) and bounded by a
    poll() when the handshake is not done at once; then the socket blocks and the
    kernel's ``SO_RCVTIMEO`` bounds each wait for the response, plus a check of the
    whole request's time after each read."""
    clock = time.monotonic_ns
    tgt = plan.target
    is_udp = tgt.protocol == "udp"
    is_tcponly = tgt.protocol == "tcp"
    keep = plan.connection == "keepalive"
    family = plan.family
    stype = socket.SOCK_DGRAM if is_udp else socket.SOCK_STREAM
    payload = plan.payload
    addr0 = (tgt.ip, tgt.port)
    timeout_ns = plan.timeout_ns
    tv = struct.pack("ll", timeout_ns // 1_000_000_000, (timeout_ns % 1_000_000_000) // 1000)
    src = plan.sources[plan.slot_src[0]]
    resolve = plan.resolvers.get(plan.slot_src[0]) if tgt.host_name is not None else None
    host_name = tgt.host_name
    bind = src.bind_ip
    parse = _parse_http
    SOL, LINGER, RCVTIMEO = socket.SOL_SOCKET, socket.SO_LINGER, socket.SO_RCVTIMEO
    ecode = errno.errorcode
    timeouts = (errno.EAGAIN, errno.ETIMEDOUT)
    EINPROGRESS, ENOTCONN = errno.EINPROGRESS, errno.ENOTCONN

    chunks: list[array.array] = []
    pend: list[int] = []
    put = pend.extend
    answers: dict[bytes, int] = {}
    errors: dict[str, int] = {"": 0}
    n_rows = 0
    n_err = 0

    def err_id(err: str) -> int:
        e = errors.get(err)
        if e is None:
            e = errors[err] = len(errors)
        return e

    left = plan.slot_count[0] if plan.slot_count is not None else None
    max_rows = plan.max_rows
    run_end = t0 + plan.duration_ns if plan.duration_ns is not None else None
    open_loop = plan.rate is not None
    arrivals_it = _arrival_times(plan, t0) if open_loop else None
    s: _socket.socket | None = None
    sleep = time.sleep

    with netns.entered(src.netns):
        while clock() < t0:
            sleep(max(0.0, (t0 - clock()) / 1e9))
        try:
            while n_rows < max_rows:
                if left is not None:
                    if left <= 0:
                        break
                    left -= 1
                if open_loop:
                    sched = next(arrivals_it, None)  # type: ignore[arg-type]
                    if sched is None:
                        break
                    now = clock()
                    if sched > now:
                        sleep((sched - now) / 1e9)  # clock_nanosleep; 1 ns timer slack
                    elif run_end is not None and now >= run_end:
                        # late arrivals the run can no longer start: cancelled, as rows
                        while sched is not None and n_rows < max_rows:
                            n_rows += 1
                            n_err += 1
                            if record:
                                put((-1, sched, -1, -1, -1, -1, 0, 0, -1, err_id("ECANCELED")))
                            sched = next(arrivals_it, None)  # type: ignore[arg-type]
                        break
                elif run_end is not None and clock() >= run_end:
                    break
                else:
                    sched = -1
                res = conn = -1
                nbytes = status = 0
                body = None
                err = ""
                if s is None:
                    try:
                        s = _socket.socket(family, stype)
                        if not is_udp:
                            s.setsockopt(SOL, LINGER, _LINGER0)
                            s.setblocking(False)  # connect() as real clients do, see below
                        s.setsockopt(SOL, RCVTIMEO, tv)
                        if bind is not None:
                            s.bind((bind, 0))
                    except OSError as e:
                        err = ecode.get(e.errno or 0, "EIO")
                    ts = clock()
                    if sched < 0 and run_end is not None and ts >= run_end:
                        break  # the run ended while the socket was made: not started (closed below)
                    addr = addr0
                    if not err and resolve is not None:
                        try:
                            addr = (resolve(host_name), addr0[1])  # type: ignore[arg-type]
                        except Exception as e:  # noqa: BLE001 - any resolver failure is a row
                            err = _resolve_error(e)
                        res = clock() - ts
                    if not err:
                        c0 = clock()
                        rc = s.connect_ex(addr)  # type: ignore[union-attr]
                        c1 = clock()
                        if is_udp:
                            if rc:
                                err = ecode.get(rc, "EIO")
                        elif rc and rc != EINPROGRESS:
                            err = ecode.get(rc, "EIO")
                        else:
                            # A non-blocking connect(), like curl, wrk or Go: a blocking one
                            # misses an ICMP error that arrives while connect() still holds
                            # the socket (REJECT on a veth path: the error arrives inside the
                            # call) and waits for the SYN retransmit, 1 s (measured here).
                            # On veth the handshake is done when connect() returns: the
                            # request goes out at once (EAGAIN: wait for writability).
                            try:
                                if is_tcponly:
                                    s.getpeername()  # type: ignore[union-attr]
                                else:
                                    s.send(payload)  # type: ignore[union-attr]
                                sent = True
                            except (BlockingIOError, InterruptedError):
                                sent = False
                            except OSError as e:
                                sent = False
                                if e.errno != ENOTCONN:
                                    err = ecode.get(e.errno or 0, "EIO")
                            if not sent and not err:
                                po = select.poll()
                                po.register(s, _EOUT)  # type: ignore[arg-type]
                                if po.poll(max(0, -((clock() - ts - timeout_ns) // 1_000_000))):  # ms, rounded up
                                    c1 = clock()
                                    rc = s.getsockopt(SOL, socket.SO_ERROR)  # type: ignore[union-attr]
                                    if rc:
                                        err = ecode.get(rc, "EIO")
                                    elif not is_tcponly:
                                        try:
                                            s.send(payload)  # type: ignore[union-attr]
                                        except OSError as e:
                                            err = ecode.get(e.errno or 0, "EIO")
                                else:
                                    err = "ETIMEDOUT"
                            if not err:
                                conn = c1 - c0
                                if not is_tcponly:  # recv() now waits, SO_RCVTIMEO bounds it
                                    s.setblocking(True)  # type: ignore[union-attr]
                    now = clock()
                    if is_tcponly and not err:
                        now = c1
                    sent_already = not is_udp
                else:
                    ts = now = clock()
                    sent_already = False
                if not err and not is_tcponly:
                    try:
                        if not sent_already:
                            s.send(payload)  # type: ignore[union-attr]
                        b = s.recv(65536)  # type: ignore[union-attr]
                        if is_udp:
                            now = clock()
                            nbytes = len(b)
                            body = b
                        else:
                            while True:
                                now = clock()
                                state, status, body = parse(b)
                                if state == COMPLETE:
                                    break
                                if state == BAD:
                                    err = "EPROTO"
                                    break
                                if now - ts >= timeout_ns:
                                    err = "ETIMEDOUT"
                                    break
                                more = s.recv(65536)  # type: ignore[union-attr]
                                if not more:
                                    now = clock()
                                    if state == TO_EOF:
                                        body = _body_at_eof(b)
                                        s.close()  # type: ignore[union-attr]
                                        s = None
                                    else:
                                        err = "EOF"
                                    break
                                b += more
                            nbytes = len(b)
                    except OSError as e:
                        now = clock()
                        err = "ETIMEDOUT" if e.errno in timeouts else ecode.get(e.errno or 0, "EIO")
                n_rows += 1
                if err:
                    n_err += 1
                if record:
                    a = -1
                    if body is not None:
                        a = answers.get(body)
                        if a is None:
                            a = answers[body] = len(answers)
                    put((0, ts, 0 if sched < 0 else ts - sched, res, conn, now - ts, nbytes, status, a,
                         err_id(err) if err else 0))
                    if len(pend) >= CHUNK:
                        chunks.append(array.array("q", pend))
                        pend.clear()
                if s is not None and (err or not keep or is_tcponly):
                    s.close()  # SO_LINGER 0: an RST, no TIME_WAIT on either side
                    s = None
            t_end = clock()
        finally:
            if s is not None:
                s.close()
    out: dict[str, Any] = {"rows": n_rows, "errors": n_err, "t_end": t_end, "proc": plan.proc}
    if record:
        chunks.append(array.array("q", pend))
        out["chunks"] = chunks
        out["answers"] = list(answers)
        out["error_names"] = list(errors)
        out["slot_ids"] = plan.slot_ids
    return out


# --------------------------------------------------------------------------- processes


def _child(plan: _Plan, conn: Any, record: bool) -> None:  # pragma: no cover - runs in a fork
    try:
        _tune_process()
        conn.send(("ready", None))
        kind, t0 = conn.recv()
        if kind != "go":
            return
        conn.send(("done", _engine(plan, t0, record)))
    except KeyboardInterrupt:
        pass
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def _run_plans(plans: list[_Plan], record: bool) -> tuple[int, list[dict[str, Any]]]:
    """Run the plans, in this thread when there is one, else in forked processes
    that start together at one t0. Returns (t0, results)."""
    if len(plans) == 1:
        slack = _tune_process()
        try:
            t0 = time.monotonic_ns() + 1_000_000
            return t0, [_engine(plans[0], t0, record)]
        except OSError as e:  # e.g. a source namespace deleted meanwhile (requests' errors are rows)
            raise KernelError(f"traffic: {e}") from e
        finally:
            if slack > 0:
                _libc.prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(slack), 0, 0, 0)
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = []
    conns = []
    try:
        for plan in plans:
            a, b = ctx.Pipe(duplex=True)
            pr = ctx.Process(target=_child, args=(plan, b, record), daemon=True, name=f"traffic-{plan.proc}")
            pr.start()
            b.close()
            procs.append(pr)
            conns.append(a)
        deadline = time.monotonic() + READY_TIMEOUT
        for pr, c in zip(procs, conns, strict=True):
            msg = _recv(c, pr, deadline)
            if msg[0] != "ready":
                raise KernelError(f"traffic worker {pr.name} failed: {msg[1]}")
        t0 = time.monotonic_ns() + 5_000_000
        for c in conns:
            c.send(("go", t0))
        results = []
        for pr, c in zip(procs, conns, strict=True):
            msg = _recv(c, pr, None)
            if msg[0] != "done":
                raise KernelError(f"traffic worker {pr.name} failed: {msg[1]}")
            results.append(msg[1])
        for pr in procs:
            pr.join(5)
        return t0, results
    finally:
        for c in conns:
            c.close()
        for pr in procs:
            if pr.is_alive():
                pr.terminate()
                pr.join(2)
                if pr.is_alive():
                    pr.kill()
                    pr.join(2)


def _recv(c: Any, pr: Any, deadline: float | None) -> tuple[str, Any]:
    """The next message of a worker; bounded by ``deadline`` (or by the worker's own
    bounded run: it either answers or dies)."""
    while True:
        if c.poll(0.2):
            try:
                return c.recv()
            except EOFError:
                return ("error", f"exited with status {pr.exitcode}")
        if not pr.is_alive() and not c.poll(0):
            return ("error", f"exited with status {pr.exitcode}")
        if deadline is not None and time.monotonic() > deadline:
            return ("error", "not ready in time")


# --------------------------------------------------------------------------- public API


def run(
    sources: Sequence[Source],
    target: Target,
    *,
    connection: Connection = "new",
    requests: int | None = None,
    duration: float | None = None,
    concurrency: int = 1,
    rate: float | None = None,
    arrivals: Arrivals = "poisson",
    warmup: int = 0,
    timeout: float = 2.0,
    processes: int | None = None,
    seed: int = 0,
    ask: Ask = "hostname",
    resolver: Resolver | Mapping[str, Resolver] | None = None,
    record: bool = True,
) -> pd.DataFrame:
    """Send requests from ``sources`` to ``target``; one row per request (see the
    module docstring for the columns and the load models).

    ``requests`` counts measured requests (``warmup`` more are sent first and
    flagged); ``duration`` bounds the whole run in seconds; at least one is needed
    (``requests <= 10,000,000``, ``duration <= 3600``). ``concurrency`` worker slots
    (at least one per source; slot j sends from ``sources[j % len(sources)]``) spread
    over ``processes`` processes. ``rate`` makes it open-loop (requests/s,
    ``arrivals`` Poisson or uniform, seeded by ``seed``). ``timeout`` bounds each
    request (s). ``resolver(host_name) -> ip`` (one for all sources, or a mapping
    source name -> resolver, e.g. ``testbed.dns.address_resolver(pod)`` per pod) is
    called inside the source's namespace before each new connection when
    ``target.host_name`` is set; its time is ``resolve_us`` and an exception makes
    the row's error (``EAI_*``). Default: the namespace's /etc/netns/NAME/resolv.conf
    (see :func:`resolv_conf_resolver`).

    ``record=False`` keeps no rows (to measure the recorder's own cost): the frame
    then has one row per process with ``requests``, ``errors`` and ``elapsed_s``.
    Bad parameters raise :class:`InputError` before any socket exists.
    """
    family, nproc = _validate(
        sources, target, connection, requests, duration, concurrency, rate, arrivals, warmup, timeout, processes, ask
    )
    resolvers: dict[int, Resolver] = {}
    if target.host_name is not None:
        for k, s in enumerate(sources):
            if isinstance(resolver, Mapping):
                if s.name not in resolver:
                    raise InputError(f'Required value: no resolver for source "{s.name}"', field="resolver")
                resolvers[k] = resolver[s.name]
            elif resolver is not None:
                resolvers[k] = resolver
            else:
                resolvers[k] = resolv_conf_resolver(s.netns, timeout)
    total = None if requests is None else requests + warmup
    plans = _plans(
        sources,
        target,
        family=family,
        payload=_request_bytes(target, ask),
        connection=connection,
        total=total,
        duration=duration,
        concurrency=concurrency,
        rate=rate,
        arrivals=arrivals,
        timeout=timeout,
        processes=nproc,
        seed=seed,
        resolvers=resolvers,
    )
    load_before = host_load()
    t0, results = _run_plans(plans, record)
    load_after = host_load()
    import pandas as pd

    attrs = {
        "target": asdict(target),
        "sources": [asdict(s) for s in sources],
        "connection": connection,
        "requests": requests,
        "duration": duration,
        "concurrency": concurrency,
        "rate": rate,
        "arrivals": arrivals if rate is not None else None,
        "warmup": warmup,
        "timeout": timeout,
        "processes": nproc,
        "seed": seed,
        "ask": ask,
        "t0_ns": t0,
        "elapsed_s": (max(r["t_end"] for r in results) - t0) / 1e9,
        "host_load_before": load_before,
        "host_load_after": load_after,
    }
    if not record:
        df = pd.DataFrame(
            {
                "process": [r["proc"] for r in results],
                "requests": [r["rows"] for r in results],
                "errors": [r["errors"] for r in results],
                "elapsed_s": [(r["t_end"] - t0) / 1e9 for r in results],
            }
        )
    else:
        df = _frame(results, sources, concurrency, ask, warmup)
    df.attrs.update(attrs)
    return df


def _frame(results: list[dict[str, Any]], sources: Sequence[Source], concurrency: int, ask: Ask, warmup: int) -> pd.DataFrame:
    """The rows of every worker as one frame, ordered by start time."""
    import pandas as pd

    names = [s.name for s in sources]
    answer_ids: dict[str, int] = {"": 0}
    error_ids: dict[str, int] = {"": 0}
    blocks = []
    for r in results:
        m = np.concatenate([np.frombuffer(c, dtype=np.int64) for c in r["chunks"] if len(c)] or [np.zeros(0, np.int64)])
        m = m.reshape(-1, NCOLS).copy()
        # local slot -> global worker number (-1: an arrival cancelled before it had one)
        m[:, 0] = np.asarray(r["slot_ids"] + [-1], dtype=np.int64)[m[:, 0]]
        # per-process answer/error numbers -> run-wide ones (answer -1 -> "")
        lut = [answer_ids.setdefault(a.decode("utf-8", "replace").strip(), len(answer_ids)) for a in r["answers"]]
        m[:, 8] = np.asarray(lut + [0], dtype=np.int64)[m[:, 8]]
        lut = [error_ids.setdefault(e, len(error_ids)) for e in r["error_names"]]
        m[:, 9] = np.asarray(lut, dtype=np.int64)[m[:, 9]]
        blocks.append(m)
    m = np.concatenate(blocks) if blocks else np.zeros((0, NCOLS), np.int64)
    m = m[np.argsort(m[:, 1], kind="stable")]
    n = len(m)
    slot = m[:, 0]
    src_idx = np.where(slot >= 0, slot % len(sources), 0)  # a cancelled arrival: the first source

    def us(v: np.ndarray) -> np.ndarray:
        out = v.astype(np.float64) / 1e3
        out[v < 0] = np.nan
        return out

    answer_names = list(answer_ids)
    answer = pd.Categorical.from_codes(m[:, 8], categories=answer_names)
    blank = pd.Categorical.from_codes(np.zeros(n, np.int64), categories=[""])
    return pd.DataFrame(
        {
            "client": pd.Categorical.from_codes(src_idx, categories=names),
            "worker": slot.astype(np.int32),
            "seq": np.arange(n, dtype=np.int64),
            "start_ns": m[:, 1].copy(),
            "lag_us": us(m[:, 2]),
            "resolve_us": us(m[:, 3]),
            "connect_us": us(m[:, 4]),
            "total_us": us(m[:, 5]),
            "bytes": m[:, 6].copy(),
            "status": m[:, 7].astype(np.int16),
            "backend": answer if ask == "hostname" else blank,
            "source_seen": np.asarray(answer_names, dtype=object)[m[:, 8]] if ask == "clientip" else np.full(n, "", dtype=object),
            "error": pd.Categorical.from_codes(m[:, 9], categories=list(error_ids)),
            "warmup": np.arange(n) < warmup,
        }
    )


def summary(df: pd.DataFrame) -> dict[str, Any]:
    """Headline figures of a run's measured (non-warmup) rows: count, errors by
    name, rate over the measured span, latency percentiles (µs) of successful rows."""
    m = df[~df["warmup"]]
    ok = m[m["error"] == ""]
    out: dict[str, Any] = {"requests": len(m), "ok": len(ok), "errors": m.loc[m["error"] != "", "error"].value_counts().to_dict()}
    out["errors"] = {str(k): int(v) for k, v in out["errors"].items() if v}
    if len(m):
        first = m["start_ns"].min()
        last = (m["start_ns"] + m["total_us"].fillna(0) * 1e3).max()
        span = float(last - first) / 1e9
        out["span_s"] = span
        out["rate"] = len(m) / span if span > 0 else float("nan")
    for col in ("total_us", "connect_us", "lag_us"):
        v = ok[col].dropna()
        if len(v):
            out[col] = {f"p{q}": float(np.percentile(v, q)) for q in (50, 90, 99)} | {"mean": float(v.mean())}
    if len(ok):
        rest = (ok["total_us"] - ok["connect_us"].fillna(0)).dropna()
        out["response_us"] = {f"p{q}": float(np.percentile(rest, q)) for q in (50, 90, 99)}
    if "backend" in m:
        out["backends"] = {str(k): int(v) for k, v in ok["backend"].value_counts().items() if v and k != ""}
    return out
