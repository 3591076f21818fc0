"""The guest kernel runtime (User-Mode Linux): commands run there with their output
and exit status, IPVS and namespaces there and never on the host, hangs and Ctrl-C
kill every UML process, and a cluster lives in a background guest reached by
forwarded CLI calls."""

from __future__ import annotations

import glob
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from conftest import ROOT, sigint_default
from testbed import guest, netns
from testbed.errors import InputError, StateError

NO_UML = "no linux.uml or UML modules (Debian package user-mode-linux)"

def _host_view() -> dict[str, str]:
    """The host namespace's links and named namespaces (others' tb-* runs come and go:
    only names a test picked itself are compared for those)."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {"links": "\n".join(sorted(ln.split("<")[0] for ln in links.splitlines()))}


def _mine_gone(guest_id: str) -> None:
    assert guest.find_guest_processes(guest_id) == [], "a linux.uml process of the guest survived"
    assert glob.glob(os.path.join(tempfile.gettempdir(), f"{guest.TMP_PREFIX}{guest_id}-*")) == [], "temp files left"


# --------------------------------------------------------------------------- pure


def test_guest_up_argv_drops_kernel_names_cluster_and_uses_legacy_iptables():
    assert guest._guest_up_argv("c1", ["up", "t.yaml", "--kernel", "uml", "--proxy-mode", "ipvs"]) == [
        "up", "t.yaml", "--proxy-mode", "ipvs", "--iptables-backend", "legacy", "--name", "c1"]
    assert guest._guest_up_argv("c1", ["up", "t.yaml", "--kernel=auto", "--name", "c1", "--iptables-backend", "legacy"]) == [
        "up", "t.yaml", "--name", "c1", "--iptables-backend", "legacy"]
    with pytest.raises(InputError, match="no nf_tables for IPv4"):
        guest._guest_up_argv("c1", ["up", "t.yaml", "--iptables-backend", "nft"])
    with pytest.raises(InputError, match="does not match"):
        guest._guest_up_argv("c1", ["up", "t.yaml", "--name", "c2"])


def test_seccomp_filter_targets_only_the_xstate_regset():
    # 11 classic-BPF instructions; the only non-ALLOW return is EIO, reached only for
    # ptrace(PTRACE_{GET,SET}REGSET, pid, NT_X86_XSTATE) on x86-64
    import struct

    from testbed import guest_agent as ga

    code = ga.xstate_filter()
    insns = [struct.unpack("HBBI", code[i:i + 8]) for i in range(0, len(code), 8)]
    assert len(insns) == 11
    assert [k for c, _, _, k in insns if c == ga.BPF_RET_K] == [ga.SECCOMP_RET_ALLOW, ga.SECCOMP_RET_EIO]
    assert [k for c, _, _, k in insns if c == ga.BPF_JEQ_K] == [0xC000003E, 101, 0x4204, 0x4205, 0x202]
    assert [k for c, _, _, k in insns if c == ga.BPF_LD_W_ABS] == [4, 0, 16, 32]  # arch, nr, args[0], args[2]

    def verdict(arch: int, nr: int, a0: int, a2: int) -> int:  # interpret the program
        data = {4: arch, 0: nr, 16: a0, 32: a2}
        pc, acc = 0, 0
        while True:
            c, jt, jf, k = insns[pc]
            if c == ga.BPF_LD_W_ABS:
                acc, pc = data[k], pc + 1
            elif c == ga.BPF_JEQ_K:
                pc = pc + 1 + (jt if acc == k else jf)
            else:
                return k

    x86 = 0xC000003E
    assert verdict(x86, 101, 0x4204, 0x202) == verdict(x86, 101, 0x4205, 0x202) == ga.SECCOMP_RET_EIO
    for args in ((x86, 101, 0x4204, 0x200), (x86, 101, 0x4205, 1), (x86, 101, 12, 0x202),
                 (x86, 0, 0x4204, 0x202), (0x40000003, 101, 0x4204, 0x202)):
        assert verdict(*args) == ga.SECCOMP_RET_ALLOW, args


# --------------------------------------------------------------------------- run()


@pytest.mark.root
@pytest.mark.skipif(not guest.available(), reason=NO_UML)
def test_run_returns_output_and_exit_status():
    script = ("import os, sys; print('out', os.uname().release, os.getcwd(), os.environ['TESTBED_GUEST']); "
              "print('err', file=sys.stderr); sys.exit(7)")
    r = guest.run(["python3", "-c", script], timeout=60, cwd=str(ROOT), env={"X": "1"})
    assert r.returncode == 7, r
    release = r.stdout.split()[1]
    assert release == r.info["release"] and release != os.uname().release  # the guest's kernel
    assert r.stdout.split()[2:] == [str(ROOT), "1"]
    assert r.stderr == "err\n"
    assert 0 < r.boot_s < r.total_s < 60
    assert r.info["modules_failed"] == []
    _mine_gone(r.info["guest_id"])
    r = guest.run(["no-such-command-tb"], timeout=60, modules=[])
    assert r.returncode == 127 and "No such file" in r.stderr


def _affinities_while_running(monkeypatch, guest_id: str) -> set[frozenset[int]]:
    """Boot a guest (id ``guest_id``) that sleeps; the CPU sets of its host processes."""
    import threading

    monkeypatch.setattr(guest, "_new_id", lambda: guest_id)
    seen: set[frozenset[int]] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for pid in guest.find_guest_processes(guest_id):
                try:
                    seen.add(frozenset(os.sched_getaffinity(pid)))
                except OSError:
                    pass
            time.sleep(0.1)

    th = threading.Thread(target=watch)
    th.start()
    try:
        r = guest.run(["sleep", "2"], timeout=60, modules=[])
    finally:
        done.set()
        th.join()
    assert r.returncode == 0, r.stderr
    return seen


@pytest.mark.root
@pytest.mark.skipif(not guest.available(), reason=NO_UML)
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: nothing to pin")
def test_the_guest_runs_pinned_to_one_host_cpu(monkeypatch):
    cpus = sorted(os.sched_getaffinity(0))
    monkeypatch.delenv(guest.GUEST_CPU_ENV, raising=False)
    assert guest.guest_cpu() == cpus[-1]
    assert _affinities_while_running(monkeypatch, "a1b2c3") == {frozenset({cpus[-1]})}
    monkeypatch.setenv(guest.GUEST_CPU_ENV, str(cpus[0]))
    assert _affinities_while_running(monkeypatch, "a1b2c4") == {frozenset({cpus[0]})}
    monkeypatch.setenv(guest.GUEST_CPU_ENV, "none")
    assert guest.guest_cpu() is None
    assert _affinities_while_running(monkeypatch, "a1b2c5") == {frozenset(cpus)}
    monkeypatch.setenv(guest.GUEST_CPU_ENV, "99")
    with pytest.raises(InputError, match=r"^TESTBED_GUEST_CPU: Invalid value: '99': must be none or one of the CPUs"):
        guest.guest_cpu()


IPVS_SCRIPT = r"""
import json, os, subprocess, sys
ns = sys.argv[1]
def run(*argv):
    r = subprocess.run(argv, capture_output=True, text=True)
    return {"rc": r.returncode, "out": r.stdout, "err": r.stderr}
out = {"proc_ip_vs": os.path.exists("/proc/net/ip_vs")}
out["add"] = run("ip", "netns", "add", ns)
out["ipvsadm"] = run("ip", "netns", "exec", ns, "ipvsadm", "-A", "-t", "10.0.0.1:80", "-s", "rr")
out["list"] = run("ip", "netns", "exec", ns, "ipvsadm", "-Ln")
out["run_netns"] = sorted(os.listdir("/run/netns"))
os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
open(f"/etc/netns/{ns}/resolv.conf", "w").write("nameserver 10.233.0.3\n")
out["netem"] = run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms")
print(json.dumps(out))
"""


@pytest.mark.root
@pytest.mark.skipif(not guest.available(), reason=NO_UML)
def test_ipvs_and_namespaces_inside_the_guest_never_reach_the_host():
    ns = f"tb-gst{secrets.token_hex(3)}-ipvs"
    before = _host_view()
    r = guest.run(["python3", "-c", IPVS_SCRIPT, ns], timeout=90)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["proc_ip_vs"] is True
    assert out["add"]["rc"] == 0 and out["ipvsadm"]["rc"] == 0, out
    assert "TCP  10.0.0.1:80 rr" in out["list"]["out"]
    assert ns in out["run_netns"]
    assert out["netem"]["rc"] == 0, out["netem"]
    # nothing of it on the host: no /run/netns entry, no /etc/netns files, no link
    assert not os.path.exists(os.path.join(netns.NETNS_RUN_DIR, ns))
    assert not os.path.exists(f"/etc/netns/{ns}")
    assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert _host_view() == before
    _mine_gone(r.info["guest_id"])


@pytest.mark.root
@pytest.mark.skipif(not guest.available(), reason=NO_UML)
def test_a_hang_is_killed_after_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(guest.GuestTimeout, match=r"^guest kernel did not finish within 6 s: killed$") as e:
        guest.run(["sleep", "300"], timeout=6)
    assert time.monotonic() - t0 < 12
    _mine_gone(e.value.guest_id)


CTRL_C = """
import sys
from testbed import guest
guest.run(["sleep", "300"], timeout=120)
"""


def _guest_of(parent: int, deadline: float) -> tuple[str, str]:
    """(guest id, exchange dir) of the guest that process ``parent`` started."""
    while time.monotonic() < deadline:
        for pid in guest.find_guest_processes():
            cmd = guest._cmdline(pid)
            try:
                ppid = int(open(f"/proc/{pid}/stat").read().rsplit(") ", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == parent:
                args = dict(a.split("=", 1) for a in cmd if "=" in a)
                return args[guest.MARKER], args["tb_dir"]
        time.sleep(0.05)
    raise AssertionError("the guest did not start")


@pytest.mark.root
@pytest.mark.skipif(not guest.available(), reason=NO_UML)
def test_ctrl_c_kills_the_guest_and_removes_its_files():
    p = subprocess.Popen([sys.executable, "-c", CTRL_C], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=sigint_default)
    try:
        deadline = time.monotonic() + 60
        gid, xdir = _guest_of(p.pid, deadline)
        while not os.path.exists(os.path.join(xdir, "ready.json")):  # the command runs
            assert time.monotonic() < deadline, "guest never became ready"
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0 and "KeyboardInterrupt" in err
    _mine_gone(gid)
    assert not os.path.exists(xdir)


@pytest.mark.root
@pytest.mark.skipif(not guest.available(), reason=NO_UML)
def test_kill_9_of_the_caller_takes_the_guest_down_and_clean_removes_the_files():
    # linux.uml is PID 1 of its own PID namespace and dies with `unshare`, which dies
    # with its parent: no helper process can outlive a SIGKILLed caller
    p = subprocess.Popen([sys.executable, "-c", CTRL_C], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         preexec_fn=sigint_default)
    try:
        gid, xdir = _guest_of(p.pid, time.monotonic() + 60)
        assert len(guest.find_guest_processes(gid)) >= 2  # unshare + linux.uml (+ helpers)
        p.kill()
        p.wait(timeout=10)
        deadline = time.monotonic() + 10
        while guest.find_guest_processes(gid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert guest.find_guest_processes(gid) == []
        assert os.path.isdir(xdir)  # a SIGKILLed process cannot remove files: `testbed clean` does
        pids, dirs = guest.cleanup(gid)
        assert pids == [] and dirs == [xdir] and not os.path.exists(xdir)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.root
@pytest.mark.skipif(not guest.available(), reason=NO_UML)
def test_capabilities_of_the_guest_kernel():
    c = guest.capabilities(timeout=120)
    assert c["available"], c
    s = c["summary"]
    assert s["ip_vs"] and {"rr", "wrr", "lc", "sh", "mh"} <= set(s["ipvs_schedulers"])
    assert s["netem"] and s["dummy"] and s["ipset"] and s["iptables_legacy_nat"]
    has_nft_ipv4 = guest.uml_config().get("CONFIG_NF_TABLES_IPV4") == "y"
    assert s["nftables_ip_nat"] is has_nft_ipv4
    assert c["proxy_modes"] == {"iptables": True, "ipvs": True, "nftables": has_nft_ipv4}
    assert c["kernel"]["ip_vs"]["status"] == "ok" and c["kernel"]["netem"]["status"] == "ok"


def _host_has_ip_vs() -> bool:
    name = f"tb-gst{secrets.token_hex(3)}-probe"
    netns.create(name)
    try:
        with netns.entered(name):
            return os.path.exists("/proc/net/ip_vs")
    finally:
        netns.delete(name)


@pytest.mark.root
def test_choose_kernel(monkeypatch):
    assert guest.choose_kernel("host", ["ipvs"])[0] == "host"
    kernel, why = guest.choose_kernel("auto", ["iptables"])
    assert kernel == "host", why
    kernel, why = guest.choose_kernel("auto", ["ipvs"])
    if _host_has_ip_vs():
        assert kernel == "host", why
    elif guest.available():
        assert kernel == "uml" and "ip_vs" in why, why
    with pytest.raises(InputError, match="Unsupported value"):
        guest.choose_kernel("qemu", ["iptables"])
    if guest.available() and guest.uml_config().get("CONFIG_NF_TABLES_IPV4") != "y":
        with pytest.raises(InputError, match="nftables mode cannot run in the guest kernel"):
            guest.choose_kernel("uml", ["nftables"])
    monkeypatch.setenv("TESTBED_GUEST", "1")  # inside a guest: never a guest in the guest
    assert guest.choose_kernel("auto", ["ipvs"]) == ("host", "already inside the guest kernel")


# --------------------------------------------------------------------------- cluster guests

FETCH = r"""
import json, socket, sys
seen = []
for _ in range(int(sys.argv[2])):
    s = socket.create_connection((sys.argv[1], 80), timeout=5)
    s.sendall(b"GET /hostname HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    s.close()
    seen.append(data.split(b"\r\n\r\n", 1)[1].decode())
print(json.dumps(sorted(set(seen))))
"""


@pytest.mark.root
@pytest.mark.skipif(not guest.available(), reason=NO_UML)
def test_cluster_in_a_background_guest_answers_forwarded_commands():
    name = f"gst-{secrets.token_hex(3)}"
    before = _host_view()
    h = guest.start_cluster_guest(name, ["up", "tests/data/guest_small.yaml", "--kernel", "uml"], cwd=str(ROOT))
    try:
        assert h.up_returncode == 0, h.up_stderr
        assert f"cluster {name} is up" in h.up_stdout
        assert guest.lives_in_guest(name) and h.alive and netns.exists(h.netns)
        assert h.netns == f"tb-{h.guest_id}-guest"

        rc, out, err = guest.forward(name, ["get", "pods", "--name", name, "-o", "yaml"])
        assert rc == 0, err
        web = {p["metadata"]["name"]: p for p in yaml.safe_load(out)["items"] if p["metadata"]["labels"].get("app") == "web"}
        assert len(web) == 2 and {p["spec"]["nodeName"] for p in web.values()} == {"node1", "node2"}
        rc, out, err = guest.forward(name, ["get", "svc", "--name", name, "-o", "yaml"])
        assert rc == 0, err
        cip = next(s["spec"]["clusterIP"] for s in yaml.safe_load(out)["items"] if s["metadata"]["name"] == "web")

        # real traffic inside the guest: node1 -> ClusterIP -> kube-proxy's iptables rules -> both pods
        rc, out, err = guest.forward(name, ["exec", "--name", name, "node1", "--", "python3", "-c", FETCH, cip, "16"])
        assert rc == 0, err
        assert json.loads(out) == sorted(web)

        # a failing command keeps its exit status and its one-line error
        rc, out, err = guest.forward(name, ["get", "nosuch", "--name", name])
        assert rc == 2 and "doesn't have a resource type" in err
    finally:
        assert guest.stop(name) is True
    assert not h.alive and guest.find_guest_processes(h.guest_id) == []
    assert not netns.exists(h.netns) and not guest.lives_in_guest(name)
    assert not os.path.exists(h.exchange_dir)
    assert guest.stop(name) is False  # idempotent
    assert _host_view() == before


@pytest.mark.root
@pytest.mark.skipif(not guest.available(), reason=NO_UML)
def test_a_failing_up_in_the_guest_leaves_nothing():
    name = f"gst-{secrets.token_hex(3)}"
    h = guest.start_cluster_guest(name, ["up", "tests/data/bad/overlap.yaml"], cwd=str(ROOT))
    assert h.up_returncode == 2
    assert "overlaps spec.network.kubeServiceAddresses" in h.up_stderr
    assert guest.find_guest_processes(h.guest_id) == []
    assert not netns.exists(h.netns) and not guest.lives_in_guest(name)
    with pytest.raises(StateError):
        guest.forward(name, ["status"])
