"""The pod workload server (testbed.podserver) as a real subprocess, probed from a
client namespace. Topology, all in throwaway namespaces named ``tb-test<hex>-*``::

    cli (10.77.1.1) --veth-- pod1 (10.77.1.2)
    cli (10.77.2.1) --veth-- pod2 (10.77.2.2)
"""

from __future__ import annotations

import http.client
import os
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed import netns
from testbed.model import Cluster, ContainerPort, Pod
from testbed.podserver import control, http_response, pod_hostname

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]

ROOT = Path(__file__).resolve().parents[1]
POD1_IP = "10.77.1.2"
POD2_IP = "10.77.2.2"
HTTP = 8080
UDP = 8081


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def nets():
    prefix = f"tb-test{secrets.token_hex(4)}-"
    names = {role: prefix + role for role in ("cli", "pod1", "pod2")}
    created: list[str] = []
    try:
        for name in names.values():
            netns.create(name)
            created.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        cli = names["cli"]
        for i, role in ((1, "pod1"), (2, "pod2")):
            pod = names[role]
            _ip("-n", cli, "link", "add", f"c{i}", "type", "veth", "peer", "name", "eth0", "netns", pod)
            _ip("-n", cli, "addr", "add", f"10.77.{i}.1/24", "dev", f"c{i}")
            _ip("-n", pod, "addr", "add", f"10.77.{i}.2/24", "dev", "eth0")
            _ip("-n", cli, "link", "set", f"c{i}", "up")
            _ip("-n", pod, "link", "set", "eth0", "up")
        yield names
    finally:
        for name in created:
            netns.delete(name)


def _pod(name: str, ns: str, ip: str, ports: list[ContainerPort], **kw) -> Pod:
    return Pod(namespace="default", name=name, node="n1", ip=ip, ports=ports, netns=ns, **kw)


def _cluster(nets, *, pod1: bool = True, pod2: bool = False) -> Cluster:
    ports = [ContainerPort(port=HTTP), ContainerPort(port=UDP, protocol="UDP")]
    pods = [_pod("noports", nets["pod1"], POD1_IP, [])]  # no ports: not served
    if pod1:
        pods.append(_pod("web-1", nets["pod1"], POD1_IP, [*ports, ContainerPort(port=9999, protocol="SCTP")]))
    if pod2:
        pods.append(_pod("web-2", nets["pod2"], POD2_IP, ports))
    return Cluster(name="t", pods=pods)


class Server:
    def __init__(self, tmp: Path, cluster: Cluster, *extra: str):
        self.cluster_file = tmp / "cluster.json"
        self.sock = str(tmp / "control.sock")
        self.log = tmp / "podserver.log"
        self.write(cluster)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "testbed.podserver", "--cluster", str(self.cluster_file),
             "--control", self.sock, "--log", str(self.log), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        )

    def write(self, cluster: Cluster) -> None:
        tmp = self.cluster_file.with_suffix(".tmp")
        tmp.write_text(cluster.model_dump_json())
        tmp.rename(self.cluster_file)

    def wait_ready(self, timeout: float = 30.0) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        out = b""
        while not out.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError(f"no 'ready' within {timeout}s; log: {self.logtext()}")
            chunk = os.read(self.proc.stdout.fileno(), 100)
            if not chunk:
                raise AssertionError(f"server exited ({self.proc.poll()}) before ready; "
                                     f"stderr: {self.proc.stderr.read()!r}; log: {self.logtext()}")
            out += chunk
        assert out == b"ready\n"
        # stdout is closed after 'ready'
        assert sel.select(5) and os.read(self.proc.stdout.fileno(), 100) == b""
        sel.close()

    def logtext(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()


@pytest.fixture
def server(nets, tmp_path):
    servers: list[Server] = []

    def start(cluster: Cluster, *extra: str) -> Server:
        s = Server(tmp_path, cluster, *extra)
        servers.append(s)
        s.wait_ready()
        return s

    yield start
    for s in servers:
        s.kill()


# ----------------------------------------------------------------- client side


def _connect(ns: str, ip: str, port: int = HTTP) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(ip, port, timeout=5)
    with netns.entered(ns):
        conn.connect()
    return conn


def get(ns: str, ip: str, path: str, port: int = HTTP) -> tuple[int, bytes, http.client.HTTPResponse]:
    conn = _connect(ns, ip, port)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read(), r
    finally:
        conn.close()


def raw(ns: str, ip: str, data: bytes, port: int = HTTP) -> bytes:
    """Send raw bytes, read until the server closes."""
    with netns.entered(ns):
        s = socket.create_connection((ip, port), timeout=5)
    with s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def udp(ns: str, ip: str, msg: bytes, port: int = UDP) -> tuple[bytes, tuple[str, int]]:
    with netns.entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.settimeout(5)
        s.connect((ip, port))
        s.send(msg)
        return s.recv(4096), s.getsockname()


def refused(ns: str, ip: str, port: int = HTTP) -> bool:
    with netns.entered(ns):
        s = socket.socket()
    with s:
        s.settimeout(5)
        try:
            s.connect((ip, port))
        except ConnectionRefusedError:
            return True
    return False


# ----------------------------------------------------------------- tests


def test_http_endpoints(nets, server):
    srv = server(_cluster(nets))
    cli = nets["cli"]
    status, body, r = get(cli, POD1_IP, "/hostname")
    assert (status, body) == (200, b"web-1")
    assert r.getheader("Content-Type") == "text/plain; charset=utf-8"
    assert r.getheader("Content-Length") == "5"
    assert get(cli, POD1_IP, "/hostName")[:2] == (200, b"web-1")
    assert get(cli, POD1_IP, "/echo?msg=hello%20world")[:2] == (200, b"hello world")
    assert get(cli, POD1_IP, "/echo?msg=a+b&code=503")[:2] == (503, b"a b")
    assert get(cli, POD1_IP, "/echo")[:2] == (200, b"")
    status, body, _ = get(cli, POD1_IP, "/")
    assert status == 200 and body.startswith(b"NOW: ")
    assert get(cli, POD1_IP, "/healthz")[:2] == (200, b"")
    assert get(cli, POD1_IP, "/nope")[0] == 404

    # /clientip: the client's true address and port
    conn = _connect(cli, POD1_IP)
    try:
        local = conn.sock.getsockname()
        conn.request("GET", "/clientip")
        r = conn.getresponse()
        assert r.read().decode() == f"{local[0]}:{local[1]}"
        assert local[0] == "10.77.1.1"
    finally:
        conn.close()

    # a pod without ports is not served; the SCTP port is skipped with a warning
    st = control(srv.sock, "status")
    assert st["pods"] == {"default/web-1": "running"}
    assert st["pid"] == srv.proc.pid
    assert "SCTP port 9999 not served" in srv.logtext()


def test_keepalive_and_connection_handling(nets, server):
    server(_cluster(nets))
    cli = nets["cli"]
    conn = _connect(cli, POD1_IP)
    try:
        port = conn.sock.getsockname()[1]
        for path, want in (("/hostname", b"web-1"), ("/echo?msg=x", b"x"), ("/clientip", f"10.77.1.1:{port}".encode())):
            conn.request("GET", path)
            r = conn.getresponse()
            assert r.read() == want and not r.will_close
            assert conn.sock.getsockname()[1] == port  # same connection
    finally:
        conn.close()

    # Connection: close is honoured; HTTP/1.0 closes by default; raw() reads until EOF
    out = raw(cli, POD1_IP, b"GET /hostname HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out == http_response(200, b"web-1", keep=False)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close\r\n" in out
    out = raw(cli, POD1_IP, b"GET /hostname HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.0 200 OK\r\n") and out.endswith(b"\r\n\r\nweb-1")
    # pipelining, HEAD, a POST form body, bare-LF line ends, then close
    out = raw(
        cli, POD1_IP,
        b"GET /echo?msg=one HTTP/1.1\r\n\r\n"
        b"HEAD /hostname HTTP/1.1\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 8\r\n\r\nmsg=body"
        b"GET /echo?msg=lf HTTP/1.1\nConnection: close\n\n",
    )
    parts = out.split(b"HTTP/1.1 200 OK\r\n")
    assert len(parts) == 5 and parts[0] == b""
    assert parts[1].endswith(b"\r\n\r\none")
    assert parts[2].endswith(b"Content-Length: 5\r\n\r\n")  # HEAD: no body
    assert parts[3].endswith(b"\r\n\r\nbody")
    assert parts[4].endswith(b"\r\n\r\nlf")
    assert raw(cli, POD1_IP, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")


def test_close_wait_lets_client_close_first(nets, server):
    server(_cluster(nets), "--close-wait", "2")
    cli = nets["cli"]
    with netns.entered(cli):
        s = socket.create_connection((POD1_IP, HTTP), timeout=5)
    with s:
        s.sendall(b"GET /hostname HTTP/1.1\r\nConnection: close\r\n\r\n")
        resp = http_response(200, b"web-1", keep=False)
        got = b""
        while len(got) < len(resp):
            got += s.recv(4096)
        assert got == resp
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):  # the server waits for us to close
            s.recv(1)
    # ... and closes by itself when the client does not
    with netns.entered(cli):
        s = socket.create_connection((POD1_IP, HTTP), timeout=5)
    with s:
        t0 = time.monotonic()
        s.sendall(b"GET /hostname HTTP/1.0\r\n\r\n")
        got = b""
        while chunk := s.recv(4096):
            got += chunk
        assert got.endswith(b"web-1") and 1.5 < time.monotonic() - t0 < 4


def test_udp(nets, server):
    server(_cluster(nets))
    cli = nets["cli"]
    assert udp(cli, POD1_IP, b"hostname")[0] == b"web-1"
    assert udp(cli, POD1_IP, b"  HOSTNAME\n")[0] == b"web-1"  # trimmed and lower-cased, as netexec
    reply, local = udp(cli, POD1_IP, b"clientip")
    assert reply.decode() == f"{local[0]}:{local[1]}" and local[0] == "10.77.1.1"
    assert udp(cli, POD1_IP, b"echo Hello World\n")[0] == b"hello world"  # netexec lower-cases


def test_stop_start(nets, server):
    srv = server(_cluster(nets))
    cli = nets["cli"]
    idle = _connect(cli, POD1_IP)  # an established connection: closed by stop
    try:
        assert control(srv.sock, "stop", pod="default/web-1") == {"pod": "default/web-1", "state": "stopped"}
        assert refused(cli, POD1_IP)
        with pytest.raises((ConnectionRefusedError, TimeoutError)):  # ICMP port unreachable
            udp(cli, POD1_IP, b"hostname")
        assert control(srv.sock, "status")["pods"] == {"default/web-1": "stopped"}
        idle.sock.settimeout(5)
        assert idle.sock.recv(10) == b""  # the server closed it
    finally:
        idle.close()
    assert control(srv.sock, "start", pod="default/web-1")["state"] == "running"
    assert get(cli, POD1_IP, "/hostname")[:2] == (200, b"web-1")
    assert udp(cli, POD1_IP, b"hostname")[0] == b"web-1"
    # errors
    assert "error" in control(srv.sock, "stop", pod="default/nope")
    assert "error" in control(srv.sock, "stop")
    assert "error" in control(srv.sock, "frobnicate")


def test_reload(nets, server):
    srv = server(_cluster(nets))
    cli = nets["cli"]
    assert get(cli, POD1_IP, "/hostname")[1] == b"web-1"
    assert refused(cli, POD2_IP)
    # scale: add web-2, remove web-1
    srv.write(_cluster(nets, pod1=False, pod2=True))
    reply = control(srv.sock, "reload")
    assert reply == {"added": ["default/web-2"], "removed": ["default/web-1"], "changed": []}
    assert get(cli, POD2_IP, "/hostname")[1] == b"web-2"
    assert refused(cli, POD1_IP)
    assert control(srv.sock, "status")["pods"] == {"default/web-2": "running"}
    # a changed hostname (spec.hostname) reopens the pod
    c = _cluster(nets, pod1=False, pod2=True)
    c.pods[-1].hostname = "custom"
    srv.write(c)
    assert control(srv.sock, "reload")["changed"] == ["default/web-2"]
    assert get(cli, POD2_IP, "/hostname")[1] == b"custom"
    # a bad file is an error, the server keeps serving
    srv.cluster_file.write_text("{not json")
    assert "error" in control(srv.sock, "reload")
    assert get(cli, POD2_IP, "/hostname")[1] == b"custom"


def test_sigterm_exits_quickly(nets, server):
    srv = server(_cluster(nets, pod2=True))
    conn = _connect(nets["cli"], POD1_IP)  # an open connection must not delay exit
    try:
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(5) == 0
        assert time.monotonic() - t0 < 2
    finally:
        conn.close()
    assert not os.path.exists(srv.sock)
    assert refused(nets["cli"], POD1_IP)


def test_start_failure_exits_nonzero(nets, tmp_path):
    c = _cluster(nets)
    c.pods[-1].netns = "tb-test-does-not-exist"
    s = Server(tmp_path, c)
    try:
        assert s.proc.wait(30) == 1
        assert s.proc.stdout.read() == b""  # never 'ready'
        assert "does not exist" in s.logtext()
    finally:
        s.kill()


def test_pod_hostname():
    p = _pod("x" * 70, "", "10.0.0.1", [])
    assert pod_hostname(p) == "x" * 63
    p = _pod("web-0", "", "10.0.0.1", [], hostname="h")
    assert pod_hostname(p) == "h"
