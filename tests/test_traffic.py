"""The traffic generator (testbed.traffic): real requests from the cluster's pods and
clients to its Services, one row per request.

The root tests build the services.yaml cluster once (through the CLI, under a unique
name, downed in a finalizer) and keep request counts small."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess

import numpy as np
import pytest

from conftest import run_cli
from testbed import netns, state
from testbed.errors import InputError
from testbed.podserver import control
from testbed.traffic import (
    MAX_DURATION,
    MAX_REQUESTS,
    Source,
    Target,
    _arrival_times,
    _Plan,
    flush_conntrack,
    host_load,
    run,
    set_source_ports,
    summary,
)

root = pytest.mark.root
COLUMNS = [
    "client", "worker", "seq", "start_ns", "lag_us", "resolve_us", "connect_us", "total_us",
    "bytes", "status", "backend", "source_seen", "error", "warmup",
]


# --------------------------------------------------------------------------- no root


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(requests=MAX_REQUESTS + 1), "requests"),
        (dict(requests=0), "requests"),
        (dict(duration=MAX_DURATION + 1), "duration"),
        (dict(duration=0), "duration"),
        (dict(), "requests"),  # neither requests nor duration: unbounded, refused
        (dict(requests=10, warmup=MAX_REQUESTS), "warmup"),
        (dict(requests=10, ask="both"), "ask"),
        (dict(requests=10, connection="pipelined"), "connection"),
        (dict(requests=10, rate=-1), "rate"),
        (dict(requests=10, arrivals="bursty", rate=5), "arrivals"),
        (dict(requests=10, timeout=0), "timeout"),
        (dict(requests=10, concurrency=0), "concurrency"),
        (dict(requests=10, concurrency=2, processes=3), "processes"),
    ],
)
def test_bad_parameters_are_one_line_input_errors(kw, field):
    with pytest.raises(InputError) as e:
        run([Source("c", "tb-nonexistent-x")], Target("10.0.0.1", 80), **kw)
    assert e.value.field == field and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "target, field",
    [
        (Target("10.0.0.300", 80), "Target.ip"),
        (Target("10.0.0.1", 0), "Target.port"),
        (Target("10.0.0.1", 80, protocol="sctp"), "Target.protocol"),  # type: ignore[arg-type]
        (Target("10.0.0.1", 80, path="hostname"), "Target.path"),
        (Target("10.0.0.1", 80, path="/a b"), "Target.path"),
        (Target("10.0.0.1", 80, host_name="a b"), "Target.host_name"),
    ],
)
def test_bad_targets(target, field):
    with pytest.raises(InputError) as e:
        run([Source("c", "tb-nonexistent-x")], target, requests=1)
    assert e.value.field == field, str(e.value)


def test_tcp_probe_needs_new_connections():
    with pytest.raises(InputError, match="connection"):
        run([Source("c", "tb-x")], Target("10.0.0.1", 80, protocol="tcp"), requests=1, connection="keepalive")


def test_sources_must_be_project_namespaces():
    with pytest.raises(InputError) as e:
        run([Source("host", "default")], Target("10.0.0.1", 80), requests=1)
    assert e.value.field == "sources[0].netns" and "tb-" in str(e.value)
    with pytest.raises(InputError, match="concurrency"):
        run([Source("a", "tb-a"), Source("b", "tb-b")], Target("10.0.0.1", 80), requests=1, concurrency=1)
    with pytest.raises(InputError, match="flush|namespace"):
        flush_conntrack("host")  # never the host's table
    with pytest.raises(InputError, match="namespace"):
        set_source_ports("host", (40000, 41000))  # never the host's port range


def _plan(proc, nprocs, rate, arrivals, total=None, duration_ns=None):
    return _Plan(
        proc=proc, nprocs=nprocs, sources=[], slot_ids=[], slot_src=[], slot_count=None,
        target=Target("10.0.0.1", 80), family=socket.AF_INET, payload=b"", connection="new",
        timeout_ns=1, duration_ns=duration_ns, total=total, max_rows=1, rate=rate, arrivals=arrivals, seed=7,
    )


@pytest.mark.parametrize("arrivals", ["poisson", "uniform"])
def test_arrival_schedule_is_one_sequence_whatever_the_processes(arrivals):
    one = list(_arrival_times(_plan(0, 1, 1000.0, arrivals, total=2000), 0))
    split = sorted(t for p in range(3) for t in _arrival_times(_plan(p, 3, 1000.0, arrivals, total=2000), 0))
    assert one == split and len(one) == 2000
    gaps = np.diff([0, *one]) / 1e9
    assert abs(gaps.mean() - 1e-3) < 1e-4  # 1000/s
    if arrivals == "uniform":
        assert gaps[1:].std() < 1e-6
    else:  # exponential gaps: std == mean
        assert 0.8e-3 < gaps.std() < 1.2e-3
    # a duration bounds the schedule too
    timed = list(_arrival_times(_plan(0, 1, 1000.0, arrivals, duration_ns=500_000_000), 0))
    assert 400 < len(timed) < 600 and max(timed) < 500_000_000


def test_host_load():
    h = host_load()
    assert h["cpus"] >= 1 and h["loadavg_1m"] >= 0 and h["procs_running"] >= 1


# --------------------------------------------------------------------------- cluster


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"ttrf-{secrets.token_hex(3)}"
    try:
        run_cli("up", "tests/data/services.yaml", "--name", name, check=True)
        yield state.load_cluster(name)
    finally:
        run_cli("down", "--name", name)


def _svc_ip(c, name):
    return next(s for s in c.services if s["metadata"]["name"] == name)["spec"]["clusterIP"]


def _myapp(c):
    return [p for p in c.pods if p.labels.get("app") == "myapp"]


def _toolbox(c):
    return [p for p in c.pods if p.labels.get("app") == "toolbox"]


def _src(pod):
    return Source(pod.name, pod.netns)


@root
def test_rows_and_backends_pod_to_clusterip(cluster):
    cip = _svc_ip(cluster, "my-clusterip-service")
    client = _toolbox(cluster)[0]
    df = run([_src(client)], Target(cip, 80), requests=60)
    assert list(df.columns) == COLUMNS
    assert len(df) == 60 and (df["error"] == "").all() and (df["status"] == 200).all()
    assert set(df["backend"]) == {p.name for p in _myapp(cluster)}
    assert (df["client"] == client.name).all()
    assert df["seq"].tolist() == list(range(60)) and df["start_ns"].is_monotonic_increasing
    assert df["connect_us"].notna().all() and (df["connect_us"] < df["total_us"]).all()
    assert df["resolve_us"].isna().all() and (df["lag_us"] == 0).all() and not df["warmup"].any()
    assert (df["bytes"] > 100).all()  # status line, headers and the pod name
    assert df.attrs["requests"] == 60 and df.attrs["elapsed_s"] > 0


@root
def test_source_seen_is_the_client_pod_ip(cluster):
    cip = _svc_ip(cluster, "my-clusterip-service")
    client = _toolbox(cluster)[1]
    df = run([_src(client)], Target(cip, 80), requests=20, ask="clientip")
    seen = df["source_seen"].str.rsplit(":", n=1)
    assert {s[0] for s in seen} == {client.ip}  # pod -> ClusterIP is not masqueraded
    assert len({s[1] for s in seen}) == 20  # a new connection (source port) per request
    assert (df["backend"] == "").all()


@root
@pytest.mark.parametrize("concurrency", [1, 5])
def test_service_without_endpoints_gives_econnrefused_rows(cluster, concurrency):
    ip = _svc_ip(cluster, "empty")
    # kube-proxy REJECTs with an ICMP error, which the kernel rate-limits per peer
    # (net.ipv4.icmp_ratelimit: a burst of 6, then 1/s; beyond it SYNs just go
    # unanswered until a retransmit gets an answer): stay within the burst, one
    # client pod (on its own node) per case
    client = _toolbox(cluster)[0 if concurrency == 1 else 1]
    df = run([_src(client)], Target(ip, 80), requests=5, concurrency=concurrency)
    assert len(df) == 5 and (df["error"] == "ECONNREFUSED").all()
    assert (df["backend"] == "").all() and df["connect_us"].isna().all()
    # at once: a blocking connect() would miss the ICMP error and wait 1 s for the retransmit
    assert (df["total_us"] < 100_000).all()


@root
@pytest.mark.parametrize("concurrency", [1, 3])  # the blocking (one slot) and the epoll engine
def test_dropped_traffic_times_out_as_rows(cluster, concurrency):
    # eTP=Local NodePort on node3, which has no myapp pod: kube-proxy DROPs
    node3 = cluster.node("node3")
    client = cluster.clients[0]
    df = run([Source(client.name, client.netns)], Target(node3.ip, 30081), requests=3, concurrency=concurrency, timeout=0.3)
    assert len(df) == 3 and (df["error"] == "ETIMEDOUT").all()
    assert ((df["total_us"] >= 300_000) & (df["total_us"] < 1_000_000)).all()


@root
def test_stopped_pod_gives_errors_not_missing_rows(cluster):
    pod = _myapp(cluster)[0]
    other = _myapp(cluster)[1]
    sock = str(state.control_socket(cluster.name))
    client = _toolbox(cluster)[2]
    assert "error" not in control(sock, "stop", pod=pod.key)
    try:
        direct = run([_src(client)], Target(pod.ip, 8080), requests=10)
        assert len(direct) == 10 and (direct["error"] == "ECONNREFUSED").all()
        # the Service still lists it (no endpoint change): its share of requests fails
        via = run([_src(client)], Target(_svc_ip(cluster, "my-clusterip-service"), 80), requests=40)
        assert len(via) == 40
        assert set(via["error"]) == {"", "ECONNREFUSED"}
        assert set(via.loc[via["error"] == "", "backend"]) == {other.name}
        for conc in (1, 3):
            udp = run([_src(client)], Target(pod.ip, 8080, protocol="udp"), requests=3, concurrency=conc, timeout=0.5)
            assert (udp["error"] == "ECONNREFUSED").all()  # ICMP port unreachable (within its rate limit)
        # a UDP port that takes the datagram and never answers: a timeout row
        with netns.entered(_toolbox(cluster)[0].netns):
            mute = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        mute.bind(("0.0.0.0", 9199))
        try:
            for conc in (1, 2):
                lost = run([_src(client)], Target(_toolbox(cluster)[0].ip, 9199, protocol="udp"), requests=2,
                           concurrency=conc, timeout=0.2)
                assert (lost["error"] == "ETIMEDOUT").all() and lost["total_us"].between(200_000, 900_000).all()
        finally:
            mute.close()
    finally:
        control(sock, "start", pod=pod.key)


@root
@pytest.mark.parametrize("concurrency", [1, 4])
def test_keepalive_reuses_one_connection_per_worker(cluster, concurrency):
    cip = _svc_ip(cluster, "my-clusterip-service")
    client = _toolbox(cluster)[0]
    ka = run([_src(client)], Target(cip, 80), requests=80, concurrency=concurrency, connection="keepalive")
    assert len(ka) == 80 and (ka["error"] == "").all()
    assert ka["connect_us"].notna().sum() == concurrency  # one connect per worker
    assert ka.groupby("worker")["backend"].nunique().max() == 1  # a connection sticks to its backend
    src = run([_src(client)], Target(cip, 80), requests=80, concurrency=concurrency, connection="keepalive", ask="clientip")
    assert src["source_seen"].nunique() == concurrency  # one source port per connection
    new = run([_src(client)], Target(cip, 80), requests=80, concurrency=concurrency, connection="new", ask="clientip")
    assert new["connect_us"].notna().all() and new["source_seen"].nunique() == 80


@root
def test_udp_new_and_keepalive(cluster):
    ip = _svc_ip(cluster, "dns-like")
    client = _toolbox(cluster)[2]
    want = {p.name for p in _myapp(cluster)}
    new = run([_src(client)], Target(ip, 53, protocol="udp"), requests=40)
    assert (new["error"] == "").all() and set(new["backend"]) == want  # new socket, new conntrack entry
    new3 = run([_src(client)], Target(ip, 53, protocol="udp"), requests=40, concurrency=3)
    assert (new3["error"] == "").all() and set(new3["backend"]) == want
    assert new["connect_us"].isna().all() and (new["status"] == 0).all()
    for conc in (1, 3):
        ka = run([_src(client)], Target(ip, 53, protocol="udp"), requests=30, concurrency=conc, connection="keepalive")
        assert (ka["error"] == "").all() and ka.groupby("worker")["backend"].nunique().max() == 1
    seen = run([_src(client)], Target(ip, 53, protocol="udp"), requests=5, ask="clientip")
    assert {s.split(":")[0] for s in seen["source_seen"]} == {client.ip}


@root
def test_tcp_connect_only(cluster):
    df = run([_src(_toolbox(cluster)[0])], Target(_myapp(cluster)[1].ip, 8080, protocol="tcp"), requests=20)
    assert (df["error"] == "").all() and (df["bytes"] == 0).all()
    assert ((df["total_us"] - df["connect_us"]).between(0, 50)).all()  # the request is the connect


@root
@pytest.mark.parametrize("arrivals", ["uniform", "poisson"])
def test_open_loop_rate_is_respected(cluster, arrivals):
    cip = _svc_ip(cluster, "my-clusterip-service")
    df = run([_src(_toolbox(cluster)[0])], Target(cip, 80), requests=150, rate=500.0, arrivals=arrivals, concurrency=4)
    assert len(df) == 150 and (df["error"] == "").all()
    span = (df["start_ns"].iloc[-1] - df["start_ns"].iloc[0]) / 1e9
    assert 0.22 < span < 0.45, span  # 149 gaps at 500/s = 0.3 s
    # lag is how late each request started against its arrival: small on an idle
    # host, a few ms when other work holds both CPUs (it is measured, not assumed)
    assert (df["lag_us"] >= 0).all() and df["lag_us"].median() < 50_000
    if arrivals == "uniform":
        gaps = np.diff(df["start_ns"]) / 1e3
        assert abs(np.median(gaps) - 2000) < 600  # 2 ms apart


@root
def test_open_loop_overload_shows_as_lag_and_cancelled_rows(cluster):
    cip = _svc_ip(cluster, "my-clusterip-service")
    # far more than one slot can serve: arrivals queue (lag grows), the rest is cancelled at the deadline
    df = run([_src(_toolbox(cluster)[0])], Target(cip, 80), duration=0.2, rate=200_000.0, concurrency=1, arrivals="uniform")
    done = df[df["error"] == ""]
    cancelled = df[df["error"] == "ECANCELED"]
    assert len(done) > 10 and len(cancelled) > len(done)
    assert done["lag_us"].iloc[-1] > 50_000  # the last served arrival waited long
    assert cancelled["total_us"].isna().all()


@root
def test_warmup_rows_are_flagged(cluster):
    cip = _svc_ip(cluster, "my-clusterip-service")
    df = run([_src(_toolbox(cluster)[0])], Target(cip, 80), requests=30, warmup=8, concurrency=2)
    assert len(df) == 38 and df["warmup"].sum() == 8
    assert df.loc[df["warmup"], "seq"].tolist() == list(range(8))
    assert summary(df)["requests"] == 30


@root
def test_concurrency_and_processes_give_consistent_rows(cluster):
    cip = _svc_ip(cluster, "my-clusterip-service")
    pods = _toolbox(cluster)
    sources = [_src(p) for p in pods]
    df = run(sources, Target(cip, 80), requests=300, concurrency=6, processes=2, ask="clientip")
    assert len(df) == 300 and (df["error"] == "").all()
    assert df["seq"].tolist() == list(range(300)) and df["start_ns"].is_monotonic_increasing
    assert sorted(df["worker"].unique()) == list(range(6))
    assert df.groupby("worker").size().tolist() == [50] * 6
    # worker j sends from sources[j % 3], and the pod saw that source's address
    ip_of = {p.name: p.ip for p in pods}
    for w, rows in df.groupby("worker"):
        assert set(rows["client"]) == {pods[w % 3].name}
        assert {s.split(":")[0] for s in rows["source_seen"]} == {ip_of[pods[w % 3].name]}
    # both processes ran at the same time: even and odd workers interleave in time
    even = df[df["worker"] % 2 == 0]["start_ns"]
    odd = df[df["worker"] % 2 == 1]["start_ns"]
    assert even.min() < odd.max() and odd.min() < even.max()
    assert df.attrs["processes"] == 2


@root
def test_duration_bounds_the_run(cluster):
    cip = _svc_ip(cluster, "my-clusterip-service")
    df = run([_src(_toolbox(cluster)[1])], Target(cip, 80), duration=0.3, concurrency=2)
    assert len(df) > 20 and (df["error"] == "").all()
    t0 = df.attrs["t0_ns"]
    assert df["start_ns"].min() >= t0 and df["start_ns"].max() < t0 + 300_000_000
    assert df.attrs["elapsed_s"] < 0.3 + 0.2


@root
def test_resolver_hook(cluster):
    cip = _svc_ip(cluster, "my-clusterip-service")
    client = _toolbox(cluster)[0]
    asked = []

    def resolver(name):
        asked.append((name, os.stat("/proc/thread-self/ns/net").st_ino))
        return cip

    t = Target("0.0.0.0", 80, host_name="my-clusterip-service.default.svc.cluster.local")
    df = run([_src(client)], t, requests=10, resolver=resolver)
    assert (df["error"] == "").all() and df["resolve_us"].notna().all()
    assert len(asked) == 10 and asked[0][0] == t.host_name
    assert {ino for _, ino in asked} == {netns.inode(client.netns)}  # called inside the pod's namespace

    def nxdomain(name):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    bad = run([_src(client)], t, requests=4, resolver=nxdomain)
    assert (bad["error"] == "EAI_NONAME").all() and bad["connect_us"].isna().all()
    # one resolver per source (e.g. testbed.dns.address_resolver(pod) for each pod)
    other = _toolbox(cluster)[1]
    per = run([_src(client), _src(other)], t, requests=6, concurrency=2,
              resolver={client.name: resolver, other.name: nxdomain})
    assert set(per.loc[per["client"] == client.name, "error"]) == {""}
    assert set(per.loc[per["client"] == other.name, "error"]) == {"EAI_NONAME"}
    with pytest.raises(InputError, match="resolver"):
        run([_src(client), _src(other)], t, requests=2, concurrency=2, resolver={client.name: resolver})


@root
def test_source_ports_follow_the_namespaces_range(cluster):
    pod = _toolbox(cluster)[2]
    cip = _svc_ip(cluster, "my-clusterip-service")
    with pytest.raises(InputError, match="ip_local_port_range"):
        set_source_ports(pod.netns, (50000, 40000))
    try:
        set_source_ports(pod.netns, (51000, 51099))
        df = run([_src(pod)], Target(cip, 80), requests=20, ask="clientip")
        ports = {int(s.rsplit(":", 1)[1]) for s in df["source_seen"]}
        assert len(df) == 20 and (df["error"] == "").all()
        assert len(ports) > 1 and all(51000 <= p <= 51099 for p in ports), sorted(ports)
        with netns.entered(pod.netns):
            assert open("/proc/sys/net/ipv4/ip_local_port_range").read().split() == ["51000", "51099"]
    finally:
        set_source_ports(pod.netns, (32768, 60999))  # Linux's default, for the tests after this one


@root
def test_flush_conntrack(cluster):
    cip = _svc_ip(cluster, "dns-like")
    pod = _toolbox(cluster)[0]  # on node1: its node's conntrack sees the DNAT
    run([_src(pod)], Target(cip, 53, protocol="udp"), requests=10)
    node = cluster.node(pod.node)
    assert flush_conntrack(node.netns) >= 10
    with netns.entered(node.netns):
        left = subprocess.run(["conntrack", "-L", "-p", "udp", "--orig-dst", cip], capture_output=True, text=True)
    assert cip not in left.stdout


@root
def test_default_resolver_reads_the_pods_resolv_conf(cluster):
    """The pod's resolv.conf (search list, ndots) is honoured and the queries leave
    from the pod: a tiny DNS server in another pod answers only the search-expanded
    name, and records who asked."""
    import threading

    import dns.message
    import dns.rcode
    import dns.rrset

    cip = _svc_ip(cluster, "my-clusterip-service")
    client, server_pod = _toolbox(cluster)[0], _toolbox(cluster)[1]
    fqdn = "my-clusterip-service.default.svc.cluster.local."
    with netns.entered(server_pod.netns):
        srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("0.0.0.0", 53))
    srv.settimeout(0.1)
    askers: set[str] = set()
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                data, peer = srv.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            q = dns.message.from_wire(data)
            r = dns.message.make_response(q)
            name = q.question[0].name.to_text()
            askers.add(peer[0])
            if name == fqdn and q.question[0].rdtype == dns.rdatatype.A:
                r.answer.append(dns.rrset.from_text(fqdn, 5, "IN", "A", cip))
            else:
                r.set_rcode(dns.rcode.NXDOMAIN)
            srv.sendto(r.to_wire(), peer)

    conf_dir = os.path.join("/etc/netns", client.netns)
    conf = os.path.join(conf_dir, "resolv.conf")
    previous = open(conf).read() if os.path.exists(conf) else None  # the cluster DNS may have written one
    os.makedirs(conf_dir, exist_ok=True)
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with open(conf, "w") as f:
            f.write(f"search default.svc.cluster.local svc.cluster.local cluster.local\n"
                    f"nameserver {server_pod.ip}\noptions ndots:5\n")
        df = run([_src(client)], Target("0.0.0.0", 80, host_name="my-clusterip-service"), requests=12)
        assert (df["error"] == "").all(), df["error"].value_counts()
        assert set(df["backend"]) == {p.name for p in _myapp(cluster)}
        assert (df["resolve_us"] > 0).all() and (df["total_us"] > df["resolve_us"] + df["connect_us"]).all()
        assert askers == {client.ip}  # asked from inside the client pod
        bad = run([_src(client)], Target("0.0.0.0", 80, host_name="nosuch"), requests=2)
        assert (bad["error"] == "EAI_NONAME").all()
    finally:
        stop.set()
        t.join(2)
        srv.close()
        if previous is not None:
            with open(conf, "w") as f:
                f.write(previous)
        else:
            os.unlink(conf)
            with contextlib.suppress(OSError):
                os.rmdir(conf_dir)


@root
def test_http_framing_edge_cases(cluster):
    """Responses split across segments, without Content-Length (body to EOF), and
    garbage: rows say what happened."""
    import threading
    import time

    server_pod, client = _toolbox(cluster)[1], _toolbox(cluster)[0]
    replies = {
        9101: [b"HTTP/1.1 200 OK\r\nContent-Le", b"ngth: 5\r\n\r\nhel", b"lo"],  # in pieces
        9102: [b"HTTP/1.0 200 OK\r\n\r\nto-eof", None],  # no length: ends at close
        9103: [b"SSH-2.0-OpenSSH\r\n\r\n"],  # not HTTP
        9104: [b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort", None],  # closed early
    }
    listeners = []
    with netns.entered(server_pod.netns):
        for port in replies:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            s.listen(16)
            s.settimeout(0.1)
            listeners.append((port, s))
    stop = threading.Event()

    def serve(port, ls):
        while not stop.is_set():
            try:
                c, _ = ls.accept()
            except (TimeoutError, OSError):
                continue
            with contextlib.suppress(OSError):
                c.recv(4096)
                for part in replies[port]:
                    if part is None:
                        break
                    c.sendall(part)
                    time.sleep(0.002)
                if None in replies[port]:
                    c.close()
                    continue
                c.settimeout(1)
                c.recv(4096)  # until the client's RST
            c.close()

    threads = [threading.Thread(target=serve, args=ls, daemon=True) for ls in listeners]
    for t in threads:
        t.start()
    try:
        def one(port):
            return run([_src(client)], Target(server_pod.ip, port, path="/x"), requests=3, timeout=1.0)

        pieces = one(9101)
        assert (pieces["error"] == "").all() and set(pieces["backend"]) == {"hello"}
        assert (pieces["bytes"] == len(b"".join(replies[9101]))).all()
        eof = one(9102)
        assert (eof["error"] == "").all() and set(eof["backend"]) == {"to-eof"}
        assert (one(9103)["error"] == "EPROTO").all()
        assert (one(9104)["error"] == "EOF").all()
    finally:
        stop.set()
        for t in threads:
            t.join(2)
        for _, s in listeners:
            s.close()


def test_source_for():
    from testbed.model import Client, Cluster, Node, Pod

    c = Cluster(
        name="x",
        nodes=[Node(name="node1", ip="192.168.56.11", pod_cidr="10.233.64.0/24", pod_gateway="10.233.64.1", netns="tb-1-node-node1")],
        pods=[Pod(namespace="default", name="web-0", node="node1", ip="10.233.64.2", netns="tb-1-pod-default-web-0"),
              Pod(namespace="other", name="web-0", node="node1", ip="10.233.64.3", netns="tb-1-pod-other-web-0")],
        clients=[Client(name="client1", ip="192.168.56.201", netns="tb-1-client-client1")],
    )
    from testbed.traffic import source_for

    assert source_for(c, "client1") == Source("client1", "tb-1-client-client1")
    assert source_for(c, "other/web-0").netns == "tb-1-pod-other-web-0"
    assert source_for(c, "node1").netns == "tb-1-node-node1"
    with pytest.raises(InputError, match="ambiguous"):
        source_for(c, "web-0")
    with pytest.raises(InputError, match="no pod"):
        source_for(c, "nope")
