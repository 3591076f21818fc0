"""Real traffic from inside the emulated cluster's namespaces (tests only).

Sockets are opened with the calling thread inside the namespace, so they belong to
it; only addresses inside namespaces the run created are ever contacted."""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager

from testbed import netns


def http_get(ns: str, ip: str, port: int, path: str = "/hostname", timeout: float = 3.0) -> str:
    with netns.entered(ns):
        s = socket.create_connection((ip, port), timeout=timeout)
    try:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    assert b" 200 " in status, status
    return body.decode().strip()


def udp_ask(ns: str, ip: str, port: int, msg: str, timeout: float = 2.0) -> str:
    with netns.entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout)
        s.sendto(msg.encode(), (ip, port))
        return s.recv(65536).decode().strip()
    finally:
        s.close()


@contextmanager
def tcp_echo_server(ns: str, port: int):
    """A tiny server inside ``ns`` that answers each connection with the peer's ip:port."""
    with netns.entered(ns):
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", port))
        srv.listen(16)
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, addr = srv.accept()
            except (TimeoutError, OSError):
                continue
            c.sendall(f"{addr[0]}:{addr[1]}".encode())
            c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(2)
        srv.close()


def tcp_read(ns: str, ip: str, port: int, timeout: float = 3.0) -> str:
    with netns.entered(ns):
        s = socket.create_connection((ip, port), timeout=timeout)
    try:
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data.decode()
    finally:
        s.close()
