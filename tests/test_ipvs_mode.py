"""kube-proxy's ipvs mode on a real kernel, with real traffic.

The host kernel here has no IP_VS, so the checks run inside the User-Mode Linux guest
(:mod:`testbed.guest`): one guest boot runs this same file with ``--inside``, which brings
``tests/data/services.yaml`` up in ipvs mode (``--iptables-backend legacy``: the guest has
no nf_tables NAT), looks at the kernel's virtual servers, sends traffic, scales the
Deployment up and down (incremental syncs), tears the cluster down, and prints one JSON
line of observations. The pytest side asserts on them, one test per behaviour. On a host
kernel that has IP_VS the same checks run on the host directly.

Bounded: every request has a timeout, every loop a fixed count; the guest run a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUEST_TIMEOUT = 420.0
MARK = "IPVS-CHECK-RESULT "

# ------------------------------------------------------------------ inside (host or guest)


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def _ipvs_table(ns: str) -> dict[str, list[str]]:
    """``ipvsadm -S -n`` of a node as {"-t VIP:PORT": [real servers]} plus the raw lines."""
    from testbed.kubeproxy import run_in

    out: dict[str, list[str]] = {}
    for line in run_in(ns, ["ipvsadm", "-S", "-n"]).stdout.splitlines():
        tok = line.split()
        if tok[:1] == ["-A"]:
            out.setdefault(f"{tok[1]} {tok[2]}", [])
            out.setdefault("_lines", []).append(line)
        elif tok[:1] == ["-a"]:
            out.setdefault(f"{tok[1]} {tok[2]}", []).append(f"{tok[4]} {' '.join(tok[5:])}")
    return out


def _connect(ns: str, ip: str, port: int, timeout: float, sport: int | None = None, get: bool = False) -> str:
    """"ok", "refused", "timeout" or "error N" for a TCP connect from ``ns``. With
    ``sport``: from that source port, closed with an RST as the traffic generator
    closes; with ``get``: GET /hostname, the pod's name instead of "ok"."""
    from testbed import netns

    with netns.entered(ns):
        s = socket.socket()
    s.settimeout(timeout)
    try:
        if sport is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.bind(("0.0.0.0", sport))
        s.connect((ip, port))
        if not get:
            return "ok"
        s.sendall(b"GET /hostname HTTP/1.1\r\nHost: x\r\n\r\n")
        return s.recv(65536).partition(b"\r\n\r\n")[2].decode().strip()
    except ConnectionRefusedError:
        return "refused"
    except (TimeoutError, socket.timeout):
        return "timeout"
    except OSError as e:
        return f"error {e.errno}"
    finally:
        s.close()


def _port_reuse(ns: str, cip: str, pods: dict[str, str]) -> dict:
    """A pod asks the ClusterIP from one source port, then asks the backend that answered
    straight away from the same port (and, for contrast, from another port). IPVS still
    holds the first connection (CLOSE, 10 s) and matches the second one's reply to it.
    This is why the experiment's probes straight to a pod never share source ports with
    its probes through a Service (testbed.traffic.set_source_ports). The ports are below
    the ephemeral range, so no earlier connection of this check can hold them."""
    via = _connect(ns, cip, 80, 3.0, sport=20000, get=True)
    ip = next((i for i, p in pods.items() if p == via), "")
    return {"via": via, "same_port": _connect(ns, ip, 8080, 1.5, sport=20000, get=True) if ip else "",
            "other_port": _connect(ns, ip, 8080, 1.5, sport=20002, get=True) if ip else ""}


def scheduler_checks() -> dict:
    """The proxier alone on a bare namespace: the ``mh`` scheduler and its flag, a
    scheduler the kernel lacks (``CanUseIPVSProxier``), no-op and incremental syncs,
    and reconciling after someone flushed IPVS."""
    from testbed import netns
    from testbed.errors import InputError
    from testbed.fabric import rtnl
    from testbed.kubeproxy import run_in
    from testbed.kubeproxy_ipvs import IPVSProxier
    from testbed.model import Cluster, Node

    tag = secrets.token_hex(3)
    ns, ns2 = f"tb-ipvst{tag}-n1", f"tb-ipvst{tag}-n2"
    out: dict = {}
    netns.create(ns)
    try:
        with rtnl(ns) as ipr:
            ipr.link("set", index=1, state="up")
            ipr.link("add", ifname="eth0", kind="dummy", state="up")
            ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address="10.180.0.1", prefixlen=16)
        node = Node(name="n1", ip="10.180.0.1", pod_cidr="10.244.0.0/24", pod_gateway="10.244.0.1", netns=ns)
        cluster = Cluster(name="sched", nodes=[node])
        state = Path(f"/tmp/{ns}.json")

        def objs(*ips):
            return [
                {"kind": "Service", "metadata": {"namespace": "ns1", "name": "svc1"},
                 "spec": {"clusterIP": "10.96.0.10", "sessionAffinity": "ClientIP",
                          "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}},
                {"kind": "EndpointSlice", "addressType": "IPv4",
                 "metadata": {"namespace": "ns1", "name": "svc1-1", "labels": {"kubernetes.io/service-name": "svc1"}},
                 "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}],
                 "endpoints": [{"addresses": [ip]} for ip in ips]},
            ]

        p = IPVSProxier(cluster, node, state, scheduler="mh")
        p.sync(objs("10.180.0.5", "10.180.0.6"), full=True)
        out["mh"] = run_in(ns, ["ipvsadm", "-S", "-n"]).stdout
        p.sync(objs("10.180.0.5", "10.180.0.6"))
        out["noop_counts"] = p.last_counts
        p.sync(objs("10.180.0.6", "10.180.0.7"))
        out["change_counts"] = p.last_counts
        out["after_change"] = run_in(ns, ["ipvsadm", "-S", "-n"]).stdout
        run_in(ns, ["ipvsadm", "-C"])
        p.sync(objs("10.180.0.6", "10.180.0.7"))
        out["after_flush"] = run_in(ns, ["ipvsadm", "-S", "-n"]).stdout
        p.sync([])
        out["after_delete"] = {"ipvs": run_in(ns, ["ipvsadm", "-S", "-n"]).stdout, "counts": p.last_counts}
        state.unlink(missing_ok=True)
        # a scheduler the kernel lacks: refused before anything is changed, on a fresh node
        netns.create(ns2)
        with rtnl(ns2) as ipr:
            ipr.link("set", index=1, state="up")
        node2 = Node(name="n2", ip="10.180.0.1", pod_cidr="10.244.1.0/24", pod_gateway="10.244.1.1", netns=ns2)
        try:
            IPVSProxier(Cluster(name="sched", nodes=[node2]), node2, state, scheduler="nosuch").sync(objs("10.180.0.5"), full=True)
            out["nosuch"] = "accepted"
        except InputError as e:
            out["nosuch"] = str(e)
        out["after_nosuch"] = {
            "ipvs": run_in(ns2, ["ipvsadm", "-S", "-n"]).stdout,
            "sets": run_in(ns2, ["ipset", "save"]).stdout,
            "links": run_in(ns2, ["ip", "-o", "link", "show"]).stdout.count("\n"),
            "kube_chains": run_in(ns2, ["iptables-legacy-save"]).stdout.count("KUBE-"),
            "state_file": state.exists(),
        }
        state.unlink(missing_ok=True)
    finally:
        netns.delete(ns)
        netns.delete(ns2)
    return out


def multi_namespace_read_check() -> dict:
    """Three namespaces holding the same 200 virtual servers x 3 real servers, as three
    nodes do: reading one node's IPVS table back must see all of them (the kernel's
    /proc/net/ip_vs listing loses whole services when several namespaces use IPVS)."""
    from testbed import netns
    from testbed.fabric import rtnl
    from testbed.kubeproxy import run_in
    from testbed.kubeproxy_ipvs import read_ipvs

    tag = secrets.token_hex(3)
    names = [f"tb-ipvsr{tag}-n{i}" for i in range(3)]
    text = "".join(
        f"-A -t 10.96.{i // 200}.{i % 200 + 1}:80 -s rr\n"
        + "".join(f"-a -t 10.96.{i // 200}.{i % 200 + 1}:80 -r 10.181.{j}.{i % 200 + 1}:8080 -m -w 1\n" for j in (1, 2, 3))
        for i in range(200)
    )
    out: dict = {}
    try:
        for ns in names:
            netns.create(ns)
            with rtnl(ns) as ipr:
                ipr.link("add", ifname="d0", kind="dummy", state="up")
                ipr.addr("add", index=ipr.link_lookup(ifname="d0")[0], address="10.181.0.254", prefixlen=16)
            run_in(ns, ["ipvsadm", "-R"], input=text)
        for ns in names:
            vs, rs = read_ipvs(ns)
            with netns.entered(ns), open("/proc/thread-self/net/ip_vs") as f:
                proc_services = sum(1 for line in f.read().splitlines() if line.startswith("TCP"))
            out[ns[-2:]] = {"vs": len(vs), "rs": sum(len(v) for v in rs.values()), "proc_services": proc_services}
    finally:
        for ns in names:
            netns.delete(ns)
    return out


def inside() -> dict:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    from nethelpers import http_get, udp_ask

    from testbed import netns, state
    from testbed.fabric import rtnl
    from testbed.kubeproxy import run_in

    name = f"tipvs-{secrets.token_hex(3)}"
    res: dict = {"name": name}
    t = time.monotonic()
    r = _cli("up", "tests/data/services.yaml", "--name", name, "--proxy-mode", "ipvs", "--iptables-backend", "legacy")
    res["up"] = {"rc": r.returncode, "stderr": r.stderr[-1500:], "s": round(time.monotonic() - t, 1)}
    try:
        if r.returncode != 0:
            return res
        c = state.load_cluster(name)
        svc = {s["metadata"]["name"]: s for s in c.services}
        myapp = sorted(p.name for p in c.pods if p.labels.get("app") == "myapp")
        pod_ip = {p.name: p.ip for p in c.pods}
        toolbox = {p.node: p for p in c.pods if p.labels.get("app") == "toolbox"}
        res["myapp"] = {p: pod_ip[p] for p in myapp}
        res["nodes"] = {n.name: {"ip": n.ip, "gw": n.pod_gateway} for n in c.nodes}
        res["clients"] = [cl.ip for cl in c.clients]
        res["svc"] = {
            n: {"clusterIP": s["spec"].get("clusterIP"),
                "lb": [i["ip"] for i in ((s.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []],
                "nodePorts": [p.get("nodePort") for p in s["spec"].get("ports", []) if p.get("nodePort")]}
            for n, s in svc.items()
        }
        res["sync"] = c.extra.get("lastSync")
        # the cluster DNS is a Service too: queries cross the IPVS rules
        from testbed import dns

        resolver = dns.resolver_for(toolbox["node1"])
        res["dns"] = {
            "clusterip": [a.address for a in resolver.resolve("my-clusterip-service", "A")],
            "headless": sorted(a.address for a in resolver.resolve("my-headless-service", "A")),
            "tcp": [a.address for a in resolver.resolve("my-clusterip-service.default.svc.cluster.local", "A", tcp=True)],
        }

        # the kernel's state on each node
        res["ipvs"] = {n.name: _ipvs_table(n.netns) for n in c.nodes}
        n1 = c.node("node1")
        res["ipvsadm_Ln_node1"] = run_in(n1.netns, ["ipvsadm", "-Ln"]).stdout
        with rtnl(n1.netns) as ipr:
            idx = ipr.link_lookup(ifname="kube-ipvs0")
            link = ipr.get_links(idx[0])[0] if idx else None
            res["kube_ipvs0"] = {
                "exists": bool(idx),
                "up": bool(link and link.get("flags", 0) & 1),
                "kind": link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") if link else None,
                "addresses": sorted(f"{a.get('address')}/{a['prefixlen']}" for a in ipr.get_addr(index=idx[0])) if idx else [],
            }
        sets = run_in(n1.netns, ["ipset", "save"]).stdout
        res["ipvs_ips_set"] = sorted(line.split()[2] for line in sets.splitlines() if line.startswith("add KUBE-IPVS-IPS "))
        res["sets"] = sorted({line.split()[1] for line in sets.splitlines() if line.startswith("create ")})
        with netns.entered(n1.netns):
            res["sysctl"] = {k: open(f"/proc/sys/net/ipv4/vs/{k}").read().strip()
                             for k in ("conntrack", "expire_nodest_conn", "expire_quiescent_template", "conn_reuse_mode")}
        res["jumps"] = [line for line in run_in(n1.netns, ["iptables-legacy-save"]).stdout.splitlines()
                        if line.startswith("-A ") and line.split()[1] in ("INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING")]

        # ClusterIP round robin from one client pod on each node
        cip = svc["my-clusterip-service"]["spec"]["clusterIP"]
        res["rr"] = {node: dict(Counter(http_get(p.netns, cip, 80, "/hostname") for _ in range(20))) for node, p in toolbox.items()}
        res["clientip_from_pod"] = {node: http_get(p.netns, cip, 80, "/clientip").split(":")[0] for node, p in toolbox.items()}
        res["pod_ip"] = {node: p.ip for node, p in toolbox.items()}
        res["port_reuse"] = _port_reuse(toolbox["node2"].netns, cip, {pod_ip[p]: p for p in myapp})

        # NodePort (eTP=Cluster) from an external client, on every node
        client = c.clients[0]
        res["nodeport"] = {}
        for n in c.nodes:
            seen = [http_get(client.netns, n.ip, 30080, "/clientip").split(":")[0] for _ in range(4)]
            names = {http_get(client.netns, n.ip, 30080, "/hostname") for _ in range(6)}
            res["nodeport"][n.name] = {"sources": sorted(set(seen)), "pods": sorted(names)}

        # eTP=Local NodePort: local endpoint only, client address kept; no local endpoint
        np_local = svc["local-nodeport"]["spec"]["ports"][0]["nodePort"]
        res["local_nodeport"] = {}
        for n in c.nodes:
            entry: dict = {"conn": _connect(client.netns, n.ip, np_local, 1.5)}
            if entry["conn"] == "ok":
                entry["pods"] = sorted({http_get(client.netns, n.ip, np_local, "/hostname") for _ in range(4)})
                entry["source"] = http_get(client.netns, n.ip, np_local, "/clientip").split(":")[0]
            res["local_nodeport"][n.name] = entry

        # LoadBalancer IPs (bound to kube-ipvs0 on every node)
        lb = svc["my-lb-service"]["status"]["loadBalancer"]["ingress"][0]["ip"]
        res["lb"] = {cl.name: sorted({http_get(cl.netns, lb, 80, "/hostname") for _ in range(6)}) for cl in c.clients}
        llb = svc["local-lb"]["status"]["loadBalancer"]["ingress"][0]["ip"]
        res["local_lb_sources"] = sorted({http_get(client.netns, llb, 80, "/clientip").split(":")[0] for _ in range(6)})

        # no endpoints: refused at once; UDP; session affinity
        t0 = time.monotonic()
        res["empty"] = {"conn": _connect(toolbox["node1"].netns, svc["empty"]["spec"]["clusterIP"], 80, 3.0),
                        "s": round(time.monotonic() - t0, 2)}
        dns = svc["dns-like"]["spec"]["clusterIP"]
        res["udp"] = dict(Counter(udp_ask(toolbox["node3"].netns, dns, 53, "hostname") for _ in range(10)))
        sticky = svc["sticky"]["spec"]["clusterIP"]
        pod = toolbox["node3"]
        extra = [f"10.233.66.{100 + i}" for i in range(8)]
        with rtnl(pod.netns) as ipr:
            for a in extra:
                ipr.addr("add", index=2, address=a, prefixlen=24)
        chosen = {}
        for a in extra:
            answers = set()
            for _ in range(3):
                with netns.entered(pod.netns):
                    s = socket.socket()
                s.bind((a, 0))
                s.settimeout(3)
                s.connect((sticky, 80))
                s.sendall(b"GET /hostname HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
                s.close()
                answers.add(data.split(b"\r\n\r\n", 1)[1].decode())
            chosen[a] = sorted(answers)
        res["sticky"] = chosen

        # `testbed rules` shows the live IPVS state
        rr = _cli("rules", "node1", "--name", name)
        rs = _cli("rules", "node1", "--name", name, "--service", "default/my-nodeport-service")
        res["rules"] = {"rc": rr.returncode, "out": rr.stdout, "svc_rc": rs.returncode, "svc_out": rs.stdout}

        # incremental syncs: scale up (a real server added everywhere), then down
        def loopback() -> dict[str, list[str]]:
            return {n.name: sorted(line.split()[2] for line in run_in(n.netns, ["ipset", "save"]).stdout.splitlines()
                                   if line.startswith("add KUBE-LOOP-BACK ")) for n in c.nodes}

        res["loopback_before"] = loopback()
        t0 = time.monotonic()
        up3 = _cli("scale", "deployment/myapp", "--replicas", "3", "--name", name)
        res["scale_up"] = {"rc": up3.returncode, "out": up3.stdout + up3.stderr, "s": round(time.monotonic() - t0, 1)}
        c = state.load_cluster(name)
        res["sync_after_up"] = c.extra.get("lastSync")
        res["myapp3"] = {p.name: p.ip for p in c.pods if p.labels.get("app") == "myapp"}
        res["myapp3_node"] = {p.name: p.node for p in c.pods if p.labels.get("app") == "myapp"}
        res["loopback_up"] = loopback()
        res["ipvs3_node2"] = _ipvs_table(c.node("node2").netns)
        if up3.returncode != 0:
            raise AssertionError(f"scale to 3 failed: {res['scale_up']}")
        # The guest kernel is 10-18x slower than the host: give each connect TCP's second
        # SYN retransmission (3 s after the first) before calling it a timeout; a request
        # that still fails stops the checks with the state of the path it took.
        rr3: Counter = Counter()
        for i in range(30):
            try:
                rr3[http_get(toolbox["node2"].netns, cip, 80, "/hostname", timeout=7.0)] += 1
            except OSError as e:
                node2 = c.node("node2").netns
                diag = {"request": i, "error": repr(e), "so_far": dict(rr3), "myapp3": res["myapp3"],
                        "myapp3_node": res["myapp3_node"], "scale_up": res["scale_up"],
                        "ipvsadm_node2": run_in(node2, ["ipvsadm", "-Ln", "--stats", "-t", f"{cip}:80"], check=False).stdout,
                        "ipvs_conns_node2": run_in(node2, ["ipvsadm", "-Lnc"], check=False).stdout[-2000:],
                        "conntrack_node2": run_in(node2, ["conntrack", "-L", "-d", cip], check=False).stdout[-1500:]}
                for n in c.nodes:
                    diag[f"neigh_{n.name}"] = run_in(n.netns, ["ip", "neigh", "show"], check=False).stdout[-800:]
                raise AssertionError(f"ClusterIP request after the scale-up failed: {diag}") from e
        res["rr3"] = dict(rr3)
        t0 = time.monotonic()
        down2 = _cli("scale", "deployment/myapp", "--replicas", "2", "--name", name)
        res["scale_down"] = {"rc": down2.returncode, "out": down2.stdout + down2.stderr, "s": round(time.monotonic() - t0, 1)}
        c = state.load_cluster(name)
        res["sync_after_down"] = c.extra.get("lastSync")
        res["ipvs2_node2"] = _ipvs_table(c.node("node2").netns)
        res["loopback_down"] = loopback()
    except Exception as e:  # noqa: BLE001 - reported to the host side, which fails the tests
        import traceback

        res["error"] = "".join(traceback.format_exception(e))[-8000:]
        # modules the kernel asked for on demand (the guest agent's modprobe wrapper logs them)
        with contextlib.suppress(OSError):
            res["module_requests"] = Path("/run/tbguest-modules/requests.log").read_text().splitlines()
    finally:
        d = _cli("down", "--name", name)
        res["down"] = {"rc": d.returncode, "out": d.stdout[-300:]}
        res["left_namespaces"] = [n for n in os.listdir("/run/netns") if res["name"] in n] if os.path.isdir("/run/netns") else []
    return res


if __name__ == "__main__" and sys.argv[1:] == ["--inside"]:
    sys.path.insert(0, str(ROOT))
    result = inside()
    try:
        result["scheduler"] = scheduler_checks()
        result["multi_ns_read"] = multi_namespace_read_check()
    except Exception as e:  # noqa: BLE001
        import traceback

        result["error"] = "".join(traceback.format_exception(e))[-3000:]
    print(MARK + json.dumps(result), flush=True)
    sys.exit(0)

# ------------------------------------------------------------------ pytest side (host)

import pytest  # noqa: E402

pytestmark = pytest.mark.root


def _host_has_ip_vs() -> bool:
    return os.path.exists("/proc/net/ip_vs")


def _guest():
    try:
        from testbed import guest  # noqa: PLC0415
    except ImportError:
        return None
    return guest if hasattr(guest, "run") else None


@pytest.fixture(scope="module")
def res():
    argv = [sys.executable, str(Path(__file__).resolve()), "--inside"]
    if _host_has_ip_vs():
        r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=GUEST_TIMEOUT)
        out, err = r.stdout, r.stderr
    else:
        guest = _guest()
        if guest is None or (hasattr(guest, "available") and not guest.available()):
            pytest.skip("IPVS needs a kernel with ip_vs: the host has none (no /proc/net/ip_vs) and no UML guest "
                        "can run here (testbed.guest missing, or user-mode-linux not installed)")
        r = guest.run(argv, timeout=GUEST_TIMEOUT, cwd=str(ROOT))
        out, err = r.stdout, r.stderr
    lines = [line for line in out.splitlines() if line.startswith(MARK)]
    assert lines, f"no result from the ipvs checks (exit {r.returncode}):\n{out[-3000:]}\n{err[-3000:]}"
    data = json.loads(lines[-1][len(MARK):])
    assert "error" not in data, data["error"]
    return data


def test_the_guest_preloads_every_module_the_scenario_needs(res):
    """The guest loads testbed.guest.GUEST_MODULES at boot and nothing else; a module
    the kernel asks for later is logged by the modprobe wrapper (and cannot be loaded
    there). The whole IPVS scenario must not ask for any."""
    assert not res.get("module_requests"), res.get("module_requests")


def test_cluster_comes_up_and_down_cleanly(res):
    assert res["up"]["rc"] == 0, res["up"]["stderr"]
    assert res["down"]["rc"] == 0 and res["left_namespaces"] == []
    assert all(s["full"] for s in res["sync"])


def test_virtual_and_real_servers_on_node1(res):
    pods = res["myapp"]
    both = sorted(f"{ip}:8080 -m -w 1" for ip in pods.values())
    node1_pod = next(ip for name, ip in pods.items() if ip.startswith("10.233.64."))
    t = res["ipvs"]["node1"]
    s = res["svc"]
    assert sorted(t[f"-t {s['my-clusterip-service']['clusterIP']}:80"]) == both
    assert t[f"-t {s['empty']['clusterIP']}:80"] == []  # a virtual server without real servers
    assert sorted(t[f"-u {s['dns-like']['clusterIP']}:53"]) == both
    assert sorted(t[f"-t {s['my-lb-service']['lb'][0]}:80"]) == both
    # one virtual server per node address for each NodePort (eth0 and the cni0 gateway)
    for addr in (res["nodes"]["node1"]["ip"], res["nodes"]["node1"]["gw"]):
        assert sorted(t[f"-t {addr}:30080"]) == both
        assert t[f"-t {addr}:{s['local-nodeport']['nodePorts'][0]}"] == [f"{node1_pod}:8080 -m -w 1"]  # eTP=Local
    # ClientIP affinity is IPVS persistence
    assert f"-A -t {s['sticky']['clusterIP']}:80 -s rr -p 600" in t["_lines"]
    ln = res["ipvsadm_Ln_node1"]
    assert f"TCP  {s['my-clusterip-service']['clusterIP']}:80 rr" in ln
    assert f"  -> {node1_pod}:8080" in ln and "Masq    1" in ln


def test_local_policy_falls_back_to_cluster_endpoints_on_a_node_without_local_ones(res):
    pods = sorted(f"{ip}:8080 -m -w 1" for ip in res["myapp"].values())
    port = res["svc"]["local-nodeport"]["nodePorts"][0]
    assert sorted(res["ipvs"]["node3"][f"-t {res['nodes']['node3']['ip']}:{port}"]) == pods


def test_kube_ipvs0_and_sets(res):
    k = res["kube_ipvs0"]
    assert k["exists"] and k["kind"] == "dummy" and not k["up"]
    want = sorted({s["clusterIP"] for s in res["svc"].values() if s["clusterIP"] not in (None, "None")}
                  | {ip for s in res["svc"].values() for ip in s["lb"]})
    assert sorted(a.split("/")[0] for a in k["addresses"]) == sorted(want)
    assert all(a.endswith("/32") for a in k["addresses"])
    assert sorted(res["ipvs_ips_set"]) == sorted(want)
    assert len(res["sets"]) == 17 and "KUBE-LOOP-BACK" in res["sets"] and "KUBE-NODE-PORT-LOCAL-TCP" in res["sets"]
    assert res["sysctl"]["conntrack"] == "1" and res["sysctl"]["expire_nodest_conn"] == "1"
    assert res["sysctl"]["expire_quiescent_template"] == "1"
    assert '-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER' in res["jumps"]
    assert '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES' in res["jumps"]


def test_round_robin_counts_differ_by_at_most_one(res):
    for node, counts in res["rr"].items():
        assert sorted(counts) == sorted(res["myapp"]), (node, counts)
        assert max(counts.values()) - min(counts.values()) <= 1, (node, counts)
    # pod -> ClusterIP keeps the pod's address (no masquerade from the pod CIDR)
    assert res["clientip_from_pod"] == res["pod_ip"]


def test_a_direct_connection_on_a_port_ipvs_still_holds_times_out(res):
    """The kernel behaviour behind testbed.traffic.set_source_ports: IPVS rewrites the
    reply of a direct connection that reuses a (client, port, backend) it still holds."""
    r = res["port_reuse"]
    assert r["via"] in res["myapp"], r
    assert r["same_port"] == "timeout" and r["other_port"] == r["via"], r


def test_nodeport_masquerades_and_reaches_every_pod(res):
    for node, seen in res["nodeport"].items():
        assert seen["pods"] == sorted(res["myapp"]), node
        assert set(seen["sources"]) <= {res["nodes"][node]["ip"], res["nodes"][node]["gw"]}, (node, seen)


def test_local_nodeport_keeps_the_client_address(res):
    for node, entry in res["local_nodeport"].items():
        if node == "node3":
            # the fallback to remote pods without masquerade: the reply comes from the pod's
            # address, which the client does not accept (kubernetes PR #97081's caveat)
            assert entry["conn"] == "timeout", entry
        else:
            assert entry["conn"] == "ok" and len(entry["pods"]) == 1 and entry["source"] == res["clients"][0], entry
    assert res["local_lb_sources"] == [res["clients"][0]]


def test_load_balancer_ip(res):
    for client, pods in res["lb"].items():
        assert pods == sorted(res["myapp"]), client


def test_no_endpoints_udp_and_affinity(res):
    assert res["empty"]["conn"] == "refused" and res["empty"]["s"] < 1.0
    assert sorted(res["udp"]) == sorted(res["myapp"]) and max(res["udp"].values()) - min(res["udp"].values()) <= 1
    assert all(len(answers) == 1 for answers in res["sticky"].values()), res["sticky"]
    assert {a[0] for a in res["sticky"].values()} == set(res["myapp"])


def test_rules_command(res):
    r = res["rules"]
    assert r["rc"] == 0 and r["out"].startswith("# ipvsadm -S -n\n")
    assert f"-A -t {res['svc']['my-clusterip-service']['clusterIP']}:80 -s rr" in r["out"]
    assert "create KUBE-CLUSTER-IP hash:ip,port" in r["out"] and "-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN" in r["out"]
    assert r["svc_rc"] == 0 and ":30080 -s rr" in r["svc_out"] and "add KUBE-NODE-PORT-TCP 30080" in r["svc_out"]
    assert res["svc"]["my-clusterip-service"]["clusterIP"] + ":" not in r["svc_out"]


def test_incremental_syncs_follow_scaling(res):
    assert res["scale_up"]["rc"] == 0 and res["scale_down"]["rc"] == 0, (res["scale_up"], res["scale_down"])
    assert not any(s["full"] for s in res["sync_after_up"] + res["sync_after_down"])
    cip = f"-t {res['svc']['my-clusterip-service']['clusterIP']}:80"
    assert sorted(res["ipvs3_node2"][cip]) == sorted(f"{ip}:8080 -m -w 1" for ip in res["myapp3"].values())
    assert len(res["myapp3"]) == 3
    counts = res["rr3"]
    assert sorted(counts) == sorted(res["myapp3"]) and max(counts.values()) - min(counts.values()) <= 1
    assert sorted(res["ipvs2_node2"][cip]) == sorted(f"{ip}:8080 -m -w 1" for ip in res["myapp"].values())
    # the third pod's hairpin entries came (on its node only) and went
    (new,) = set(res["myapp3"]) - set(res["myapp"])
    ip, node = res["myapp3"][new], res["myapp3_node"][new]
    added = {n: sorted(set(res["loopback_up"][n]) - set(res["loopback_before"][n])) for n in res["loopback_up"]}
    assert added == {n: ([f"{ip},tcp:8080,{ip}", f"{ip},udp:8080,{ip}"] if n == node else []) for n in added}
    assert res["loopback_down"] == res["loopback_before"]


def test_scheduler_probe_noop_and_incremental_syncs(res):
    s = res["scheduler"]
    assert s["mh"] == (
        "-A -u 10.96.0.10:53 -s mh -p 10800 -b mh-port\n"
        "-a -u 10.96.0.10:53 -r 10.180.0.5:5353 -m -w 1\n"
        "-a -u 10.96.0.10:53 -r 10.180.0.6:5353 -m -w 1\n"
    )
    assert s["noop_counts"] == {"vs_add": 0, "vs_edit": 0, "vs_del": 0, "rs_add": 0, "rs_edit": 0, "rs_del": 0,
                                "set_add": 0, "set_del": 0, "bind": 0, "unbind": 0}
    assert s["change_counts"]["rs_add"] == 1 and s["change_counts"]["rs_del"] == 1 and s["change_counts"]["set_add"] == 0
    assert s["after_change"].splitlines()[1:] == ["-a -u 10.96.0.10:53 -r 10.180.0.6:5353 -m -w 1",
                                                  "-a -u 10.96.0.10:53 -r 10.180.0.7:5353 -m -w 1"]
    assert s["after_flush"] == s["after_change"]  # read back from the kernel, not remembered
    assert s["after_delete"]["ipvs"] == "" and s["after_delete"]["counts"]["vs_del"] == 1
    assert s["after_delete"]["counts"]["unbind"] == 1
    assert s["nosuch"].startswith('--ipvs-scheduler: Invalid value: "nosuch": the kernel cannot use this IPVS scheduler')
    assert "\n" not in s["nosuch"]
    assert s["after_nosuch"] == {"ipvs": "", "sets": "", "links": 1, "kube_chains": 0, "state_file": False}


# ------------------------------------------------------------------ host kernel (no ip_vs needed)


def test_address_batches_over_rtnetlink(throwaway_ns):
    """Bind / unbind / dump as the applier does it (here on ``lo``: the host has no dummy links)."""
    from testbed.kubeproxy_ipvs import RtnlAddr

    addrs = [f"10.96.{i // 250}.{i % 250 + 1}" for i in range(3000)]  # more than one batch
    with RtnlAddr(throwaway_ns) as r:
        assert r.links() == {"lo": 1}
        r.change("add", 1, addrs)
        r.change("add", 1, addrs[:10])  # already there: not an error (EnsureAddressBind)
        have = {a for i, a in r.addresses() if i == 1}
        assert set(addrs) <= have and "127.0.0.1" not in have  # lo is down: no 127.0.0.1 yet
        r.change("del", 1, addrs[:2990])
        r.change("del", 1, addrs[:5])  # already gone: not an error (UnbindAddress)
        assert {a for i, a in r.addresses() if i == 1} == set(addrs[2990:])
        from testbed.errors import KernelError

        with pytest.raises(KernelError):
            r.change("add", 999, ["10.97.0.1"])  # no such link


def test_rendered_sets_and_rules_load_into_a_real_kernel(throwaway_ns):
    """The seed render's ``ipset restore`` and ``iptables-restore`` texts, as the real
    tools take them (host kernel: ipset and legacy xtables are here, ip_vs is not)."""
    import yaml

    from testbed.kubeproxy import run_in
    from testbed.proxy.ipvs import IPVSConfig, ipset_restore_diff, parse_ipset_save, render_ipvs
    from testbed.proxy.servicemap import build_maps

    objs = [d for d in yaml.safe_load_all((ROOT / "tests/vectors/ipvs/seed_objects.yaml").read_text()) if d]
    cfg = IPVSConfig(hostname_override="node1", node_ip="192.168.56.11", cluster_cidr="10.233.64.0/18",
                     node_addresses=["192.168.56.11", "10.233.64.1"], kernel_version=os.uname().release)
    r = render_ipvs(*build_maps(objs), cfg)
    run_in(throwaway_ns, ["ipset", "restore", "-exist"], input=r.ipset_text)
    current = parse_ipset_save(run_in(throwaway_ns, ["ipset", "save"]).stdout)
    assert sorted(current) == sorted(s.name for s in r.ipsets)
    assert ipset_restore_diff(r, current)[1] == {"add": 0, "del": 0}
    run_in(throwaway_ns, ["iptables-legacy-restore", "--noflush", "--counters"], input=r.iptables)
    run_in(throwaway_ns, ["iptables-legacy-restore", "--noflush", "--counters"], input=r.iptables)  # idempotent
    saved = run_in(throwaway_ns, ["iptables-legacy-save"]).stdout
    assert saved.count("-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN") == 1
    assert "--match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE" in saved
    assert "--match-set KUBE-IPVS-IPS dst -j REJECT" in saved


def test_any_ipsets(throwaway_ns):
    from testbed.kubeproxy import run_in
    from testbed.kubeproxy_ipvs import any_ipsets

    assert any_ipsets(throwaway_ns) is False
    run_in(throwaway_ns, ["ipset", "create", "KUBE-CLUSTER-IP", "hash:ip,port"])
    assert any_ipsets(throwaway_ns) is True


def test_reading_ipvs_back_is_complete_with_several_namespaces(res):
    """The incremental sync diffs against what it reads back: a short read would make it
    re-add existing real servers (`ipvsadm -R`: "Destination already exists")."""
    for node, counts in res["multi_ns_read"].items():
        assert (counts["vs"], counts["rs"]) == (200, 600), (node, counts)
    # and the scenario does hit the kernel's short /proc listing (else this proves nothing)
    assert any(c["proc_services"] < 200 for c in res["multi_ns_read"].values()), res["multi_ns_read"]


def test_cluster_dns_through_ipvs(res):
    ip = res["svc"]["my-clusterip-service"]["clusterIP"]
    assert res["dns"]["clusterip"] == [ip] and res["dns"]["tcp"] == [ip]
    assert res["dns"]["headless"] == sorted(res["myapp"].values())
