"""The cluster DNS (issue #6): records as CoreDNS's kubernetes plugin serves them,
pods resolving as kubelet sets them up, an emulated outside world behind the
upstream server, and DNS traffic crossing kube-proxy's rules.

Pure tests first (no root); then real clusters, queried from inside pods with
``dig``/``getent`` (through ``testbed exec``) and the Python resolver."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest
import yaml

from conftest import ROOT, run_cli
from nethelpers import http_get
from testbed import controlplane, netns, state, topology
from testbed import dns as tdns
from testbed.model import Pod

DATA = ROOT / "tests" / "data" / "dns.yaml"
Z = "cluster.local"


# --------------------------------------------------------------------------- pure


@pytest.fixture(scope="module")
def model():
    c = topology.load(str(DATA))
    tdns.add_system_objects(c)
    controlplane.admit_all(c)
    c.assign_netns("abc123")
    return c


def _pod(c, name):
    return next(p for p in c.pods if p.name == name or p.key == name)


def _svc(c, key):
    ns, name = key.split("/")
    return next(s for s in c.services if (s["metadata"].get("namespace") or "default", s["metadata"]["name"]) == (ns, name))


def test_system_objects_are_kubesprays_coredns(model):
    dep, svc = tdns.system_objects(model)
    assert dep["kind"] == "Deployment" and dep["metadata"] == {
        "name": "coredns", "namespace": "kube-system",
        "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "coredns", "addonmanager.kubernetes.io/mode": "Reconcile"}}
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["template"]["metadata"]["labels"] == {"k8s-app": "kube-dns"}
    assert dep["spec"]["template"]["spec"]["dnsPolicy"] == "Default"
    assert "ports" not in dep["spec"]["template"]["spec"]["containers"][0]  # dnsmasq owns port 53, not the pod server
    assert svc["spec"]["clusterIP"] == "10.233.0.3"
    assert [(p["name"], p["port"], p["protocol"]) for p in svc["spec"]["ports"]] == [("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")]
    # admitted first, with kubespray's skydns_server address, endpoints on port 53
    assert model.services[0]["metadata"]["name"] == "coredns" and model.services[0]["spec"]["clusterIP"] == "10.233.0.3"
    dns_pods = tdns.dns_pods(model)
    assert len(dns_pods) == 2 and all(p.name.startswith("coredns-") and not p.ports for p in dns_pods)
    slices = [s for s in model.endpointslices if s["metadata"]["labels"]["kubernetes.io/service-name"] == "coredns"]
    assert sorted(a for s in slices for e in s["endpoints"] for a in e["addresses"]) == sorted(p.ip for p in dns_pods)
    assert {(p["name"], p["port"]) for s in slices for p in s["ports"]} == {("dns", 53), ("dns-tcp", 53)}


def test_system_objects_follow_the_service_range_and_are_not_added_twice(model):
    c = model.model_copy(deep=True)
    c.network.service_cidr = "10.96.0.0/12"
    assert tdns.service_ip(c) == "10.96.0.3" and tdns.system_objects(c)[1]["spec"]["clusterIP"] == "10.96.0.3"
    n_pods, n_svcs = len(model.pods), len(model.services)
    c = model.model_copy(deep=True)
    assert tdns.add_system_objects(c) == [] and (len(c.pods), len(c.services)) == (n_pods, n_svcs)
    one = model.model_copy(deep=True)
    one.nodes = one.nodes[:1]
    assert tdns.system_objects(one)[0]["spec"]["replicas"] == 1


def test_records_follow_the_dns_specification(model):
    rec = tdns.records(model)
    hosts = {}
    for ip, name in rec.hosts:
        hosts.setdefault(name, set()).add(ip)
    cip = _svc(model, "default/my-clusterip-service")["spec"]["clusterIP"]
    assert hosts[f"my-clusterip-service.default.svc.{Z}"] == {cip}
    assert hosts[f"coredns.kube-system.svc.{Z}"] == {"10.233.0.3"}
    web0, web1 = _pod(model, "web-0"), _pod(model, "web-1")
    myapp = {p.ip for p in model.pods if p.labels.get("app") == "myapp"}
    # headless: one A per ready endpoint; StatefulSet pods by hostname; others by dashed IP
    assert hosts[f"nginx.default.svc.{Z}"] == {web0.ip, web1.ip}
    assert hosts[f"web-0.nginx.default.svc.{Z}"] == {web0.ip}
    assert hosts[f"my-headless-service.default.svc.{Z}"] == myapp
    for ip in myapp:
        assert hosts[f"{ip.replace('.', '-')}.my-headless-service.default.svc.{Z}"] == {ip}
    # pod records
    probe = _pod(model, "probe")
    assert hosts[f"{probe.ip.replace('.', '-')}.other.pod.{Z}"] == {probe.ip}
    # PTR: the first name of an address; headless endpoints name it as the spec says
    first = {}
    for ip, name in rec.hosts:
        first.setdefault(ip, name)
    assert first[web0.ip] == f"web-0.nginx.default.svc.{Z}" and first[cip] == f"my-clusterip-service.default.svc.{Z}"
    # ExternalName
    assert (f"db-ext.default.svc.{Z}", "db.example.test") in rec.cnames
    assert (f"my-external-service.default.svc.{Z}", "google.com") in rec.cnames
    assert tdns.external_targets(rec) == ["db.example.test", "google.com"]
    # SRV: named ports only; ClusterIP -> the Service, headless -> each endpoint (endpoint port)
    srv = {(s.name, s.target, s.port, s.priority, s.weight) for s in rec.srvs}
    assert (f"_http._tcp.my-clusterip-service.default.svc.{Z}", f"my-clusterip-service.default.svc.{Z}", 80, 0, 100) in srv
    assert {x for x in srv if x[0] == f"_web._tcp.nginx.default.svc.{Z}"} == {
        (f"_web._tcp.nginx.default.svc.{Z}", f"web-{i}.nginx.default.svc.{Z}", 80, 0, 50) for i in (0, 1)}
    assert {x[2] for x in srv if x[0] == f"_http._tcp.my-headless-service.default.svc.{Z}"} == {8080}  # targetPort
    assert (f"_dns._udp.coredns.kube-system.svc.{Z}", f"coredns.kube-system.svc.{Z}", 53, 0, 100) in srv
    assert not any("empty" in s for s in hosts)  # no such Service in this topology
    assert (f"dns-version.{Z}", "1.1.0") in rec.txts


def test_srv_weight_is_corednss_float_percentage():
    assert [tdns.srv_weights(n) for n in (1, 2, 3, 4, 6, 7)] == [100, 50, 33, 25, 16, 14]


def test_not_ready_endpoints_and_empty_headless_services_have_no_records(model):
    c = model.model_copy(deep=True)
    _pod(c, "web-1").ready = False
    controlplane.reconcile(c)
    rec = tdns.records(c)
    names = {n for _, n in rec.hosts}
    assert f"web-1.nginx.default.svc.{Z}" not in names and f"web-0.nginx.default.svc.{Z}" in names
    assert {t for n, t, *_ in [(s.name, s.target) for s in rec.srvs] if n.endswith(f"nginx.default.svc.{Z}")} == {f"web-0.nginx.default.svc.{Z}"}
    c.pods = [p for p in c.pods if p.labels.get("app") != "web"]
    controlplane.reconcile(c)
    rec = tdns.records(c)
    assert not any(n.endswith(f"nginx.default.svc.{Z}") for _, n in rec.hosts)  # -> NXDOMAIN
    assert not any(s.name.endswith(f"nginx.default.svc.{Z}") for s in rec.srvs)


def test_the_synthetic_background_is_not_published(model):
    """An experiment's background Services are for the proxies (kube-proxy's benchmarks
    have no DNS): no records."""
    from testbed import synthetic

    c = model.model_copy(deep=True)
    before = tdns.records(c)
    synthetic.admit(c, synthetic.for_cluster(c, 2000, 3, seed=1, namespace="bench"))
    rec = tdns.records(c)
    assert rec.hosts == before.hosts and rec.srvs == before.srvs
    assert not any(".bench.svc." in n for _, n in rec.hosts)


def test_resolv_conf_as_kubelet_writes_it(model):
    assert tdns.resolv_conf(model, _pod(model, "web-0")) == (
        f"search default.svc.{Z} svc.{Z} {Z}\nnameserver 10.233.0.3\noptions ndots:5\n")
    assert tdns.resolv_conf(model, _pod(model, "probe")).startswith(f"search other.svc.{Z} svc.{Z} {Z}\n")
    up = tdns.upstream(model).ip
    assert tdns.resolv_conf(model, tdns.dns_pods(model)[0]) == f"nameserver {up}\n"  # dnsPolicy: Default
    assert tdns.resolv_conf(model, _pod(model, "custom-dns")) == (
        "search svc.cluster.local example.test\nnameserver 10.233.0.3\noptions ndots:2 edns0\n")
    # ClusterFirst + dnsConfig: appended, options merged by name (kubelet appendDNSConfig)
    c = model.model_copy(deep=True)
    w = next(w for w in c.workloads if w["metadata"]["name"] == "web")
    w["spec"]["template"]["spec"]["dnsConfig"] = {"searches": ["example.test", f"svc.{Z}"], "options": [{"name": "ndots", "value": "1"}, {"name": "rotate"}]}
    assert tdns.resolv_conf(c, _pod(c, "web-0")) == (
        f"search default.svc.{Z} svc.{Z} {Z} example.test\nnameserver 10.233.0.3\noptions ndots:1 rotate\n")


def test_outside_world_takes_free_node_network_addresses(model):
    hosts = tdns.external_hosts(model)
    assert [(h.name, h.ip, h.netns) for h in hosts] == [
        ("dns-upstream", "192.168.56.2", "tb-abc123-ext-dns-upstream"), ("db", "192.168.56.3", "tb-abc123-ext-db"),
        ("web", "192.168.56.4", "tb-abc123-ext-web")]
    c = model.model_copy(deep=True)
    c.clients[0].ip = "192.168.56.3"
    assert [h.ip for h in tdns.external_hosts(c)] == ["192.168.56.2", "192.168.56.4", "192.168.56.5"]
    conf = tdns.upstream_config(model)
    assert "local=/#/" in conf and "host-record=db.example.test,192.168.56.3" in conf
    assert "host-record=www.example.test,google.com,www.google.com,192.168.56.4" in conf


def test_rendered_dnsmasq_files(model):
    rec = tdns.records(model)
    prim = tdns.render_primary_config("192.168.56.2", "/d/hosts", "/d/servers")
    assert "server=192.168.56.2\nlocal=/cluster.local/\n" in prim and "no-resolv" in prim and "txt-record=dns-version.cluster.local,1.1.0" in prim
    sec = tdns.render_secondary_config(rec, "/d/hosts", 7)
    assert f"port={tdns.secondary_port(7)}" in sec and "listen-address=127.0.0.1" in sec
    assert f"cname=db-ext.default.svc.{Z},db.example.test,5" in sec
    assert f"srv-host=_web._tcp.nginx.default.svc.{Z},web-0.nginx.default.svc.{Z},80,0,50" in sec
    servers = tdns.render_servers_file(rec, 7).splitlines()
    assert f"server=/db-ext.default.svc.{Z}/127.0.0.1#{tdns.secondary_port(7)}" in servers
    assert f"server=/_web._tcp.nginx.default.svc.{Z}/127.0.0.1#{tdns.secondary_port(7)}" in servers
    hosts = tdns.render_hosts(rec, 5, [("192.168.56.3", "db.example.test")])
    assert hosts.splitlines()[-2:] == ["192.168.56.3 db.example.test", "127.128.0.5 testbed-serial.invalid"]
    # only CNAME/SRV changes make a new generation
    c = model.model_copy(deep=True)
    c.pods = [p for p in c.pods if p.name != "probe"]
    assert tdns.secondary_records(tdns.records(c)) == tdns.secondary_records(rec)


# --------------------------------------------------------------------------- live clusters


def _bring_up(name: str, backend: str, tmp: Path):
    run_cli("down", "--name", name)
    run_cli("up", str(DATA), "--name", name, "--iptables-backend", backend, check=True)
    c = state.load_cluster(name)
    assert tdns.dns_service(c) is not None, "`up` adds kube-system/coredns"
    assert c.extra.get("lastDNSSync", {}).get("mode") == "start", "`up` starts the cluster DNS"
    return c


def _refresh(name: str, serial_before: int | None = None):
    """The cluster after a CLI change. The CLI itself must have brought the DNS
    records up to date (nothing here calls dns.update): its last DNS sync is recorded
    with a bounded delay, and a further update finds nothing left to change."""
    c = state.load_cluster(name)
    sync = c.extra.get("lastDNSSync")
    assert sync is not None and sync["max_delay_s"] < tdns.RELOAD_TIMEOUT, sync
    if serial_before is not None:
        assert sync["serial"] > serial_before, "the CLI change did not update the cluster DNS"
    rec = tdns.records(c)
    served = (tdns.dns_dir(state.run_dir(name)) / "cluster" / "hosts" / "records").read_text().splitlines()
    assert served[-1] == f"{tdns.serial_address(sync['serial'])} {tdns.SERIAL_NAME}"
    assert [f"{ip} {n}" for ip, n in rec.hosts] == served[1:1 + len(rec.hosts)], "DNS records are behind the cluster"
    return c, sync


def _serial(name: str) -> int:
    return state.load_cluster(name).extra["lastDNSSync"]["serial"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    name = "tdns-nft"
    c = _bring_up(name, "nft", tmp_path_factory.mktemp("dns"))
    try:
        yield c
    finally:
        run_cli("down", "--name", name)


def exec_(c, target: str, *cmd: str, check: bool = True):
    return run_cli("exec", "--name", c.name, target, "--", *cmd, check=check, timeout=60)


def dig(c, target: str, *args: str) -> list[str]:
    return exec_(c, target, "dig", "+short", "+tries=2", "+time=2", *args).stdout.split()


def ask(ns: str, name: str, rdtype: str = "A", server: str = "10.233.0.3", tcp: bool = False) -> dns.message.Message:
    """One query sent from inside namespace ``ns`` (to the DNS Service by default)."""
    q = dns.message.make_query(name, rdtype)
    with netns.entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
    try:
        if tcp:
            s.settimeout(3)
            s.connect((server, 53))
            s.setblocking(False)
            return dns.query.tcp(q, server, timeout=3, sock=s)
        s.setblocking(False)
        return dns.query.udp(q, server, timeout=3, sock=s)
    finally:
        s.close()


def a_set(ns: str, name: str, **kw) -> set[str]:
    r = ask(ns, name, **kw)
    return {rd.address for rrset in r.answer if rrset.rdtype == dns.rdatatype.A for rd in rrset}


def toolbox(c, node: str = "node3") -> Pod:
    return next(p for p in c.pods if p.labels.get("app") == "toolbox" and p.node == node)


root = pytest.mark.root


@root
def test_pods_get_kubelets_resolv_conf(cluster):
    c = cluster
    tb = toolbox(c)
    assert Path(tdns.resolv_conf_path(tb.netns)).read_text() == f"search default.svc.{Z} svc.{Z} {Z}\nnameserver 10.233.0.3\noptions ndots:5\n"
    # what a process in the pod sees (`ip netns exec` bind-mounts it)
    assert "nameserver 10.233.0.3" in exec_(c, tb.key, "cat", "/etc/resolv.conf").stdout
    up = tdns.upstream(c).ip
    assert Path(tdns.resolv_conf_path(c.nodes[0].netns)).read_text() == f"nameserver {up}\n"
    assert Path(tdns.resolv_conf_path(tdns.dns_pods(c)[0].netns)).read_text() == f"nameserver {up}\n"


@root
def test_service_a_record_from_dig_over_udp_and_tcp(cluster):
    c = cluster
    cip = _svc(c, "default/my-clusterip-service")["spec"]["clusterIP"]
    assert dig(c, toolbox(c).key, f"my-clusterip-service.default.svc.{Z}") == [cip]
    assert dig(c, toolbox(c, "node1").key, "+tcp", f"my-clusterip-service.default.svc.{Z}") == [cip]
    r = ask(toolbox(c, "node2").netns, f"my-clusterip-service.default.svc.{Z}")
    assert r.flags & dns.flags.AA and r.answer[0].ttl == 5  # authoritative, CoreDNS's TTL
    assert a_set(toolbox(c, "node2").netns, f"my-lb-service.default.svc.{Z}", tcp=True) == {_svc(c, "default/my-lb-service")["spec"]["clusterIP"]}


@root
def test_short_names_through_the_search_path(cluster):
    c = cluster
    cip = _svc(c, "default/my-clusterip-service")["spec"]["clusterIP"]
    out = exec_(c, toolbox(c).key, "getent", "hosts", "my-clusterip-service").stdout.split()
    assert out[:2] == [cip, f"my-clusterip-service.default.svc.{Z}"]
    probe = _pod(c, "probe")  # namespace other: the short name is not its own Service
    assert exec_(c, probe.key, "getent", "hosts", "my-clusterip-service", check=False).returncode == 2
    assert exec_(c, probe.key, "getent", "hosts", "my-clusterip-service.default").stdout.split()[0] == cip
    # the Python resolver reads the same resolv.conf and asks from inside the pod
    res = tdns.resolver_for(toolbox(c))
    assert {r.address for r in res.resolve("my-clusterip-service", "A")} == {cip}
    assert {r.address for r in tdns.resolver_for(probe).resolve("my-clusterip-service.default", "A")} == {cip}
    with pytest.raises(dns.resolver.NXDOMAIN):
        tdns.resolver_for(probe).resolve("my-clusterip-service", "A")


@root
def test_headless_statefulset_names_srv_and_ptr(cluster):
    c = cluster
    web = {p.name: p.ip for p in c.pods if p.labels.get("app") == "web"}
    ns = toolbox(c).netns
    assert a_set(ns, f"nginx.default.svc.{Z}") == set(web.values())
    assert set(dig(c, toolbox(c).key, f"nginx.default.svc.{Z}")) == set(web.values())
    for name, ip in web.items():
        assert a_set(ns, f"{name}.nginx.default.svc.{Z}") == {ip}
    assert exec_(c, toolbox(c).key, "getent", "hosts", "web-0.nginx").stdout.split()[0] == web["web-0"]
    srv = dig(c, toolbox(c).key, "SRV", f"_web._tcp.nginx.default.svc.{Z}")
    assert sorted(zip(srv[0::4], srv[1::4], srv[2::4], srv[3::4])) == [
        ("0", "50", "80", f"web-{i}.nginx.default.svc.{Z}.") for i in (0, 1)]
    r = ask(ns, f"_web._tcp.nginx.default.svc.{Z}", "SRV", tcp=True)  # (the additional A records are optional)
    assert sorted(rd.target.to_text() for rrset in r.answer for rd in rrset) == [f"web-{i}.nginx.default.svc.{Z}." for i in (0, 1)]
    assert dig(c, toolbox(c).key, "-x", web["web-1"]) == [f"web-1.nginx.default.svc.{Z}."]
    myapp = {p.ip for p in c.pods if p.labels.get("app") == "myapp"}
    assert a_set(ns, f"my-headless-service.default.svc.{Z}") == myapp


@root
def test_clusterip_srv_pod_records_version_and_ptr(cluster):
    c = cluster
    tb = toolbox(c)
    assert dig(c, tb.key, "SRV", f"_http._tcp.my-clusterip-service.default.svc.{Z}") == [
        "0", "100", "80", f"my-clusterip-service.default.svc.{Z}."]
    assert dig(c, tb.key, "SRV", f"_dns-tcp._tcp.coredns.kube-system.svc.{Z}") == ["0", "100", "53", f"coredns.kube-system.svc.{Z}."]
    probe = _pod(c, "probe")
    assert a_set(tb.netns, f"{probe.ip.replace('.', '-')}.other.pod.{Z}") == {probe.ip}
    assert dig(c, tb.key, "TXT", f"dns-version.{Z}") == ['"1.1.0"']
    cip = _svc(c, "default/my-clusterip-service")["spec"]["clusterIP"]
    assert dig(c, tb.key, "-x", cip) == [f"my-clusterip-service.default.svc.{Z}."]


@root
def test_external_name_cname_chain_and_a_connection_through_it(cluster):
    c = cluster
    tb = toolbox(c, "node1")
    db, web = tdns.external_hosts(c)[1:]
    r = ask(tb.netns, f"db-ext.default.svc.{Z}")
    chain = [(rrset.name.to_text(), dns.rdatatype.to_text(rrset.rdtype), [rd.to_text() for rd in rrset]) for rrset in r.answer]
    assert chain == [(f"db-ext.default.svc.{Z}.", "CNAME", ["db.example.test."]), ("db.example.test.", "A", [db.ip])]
    # a real client: getent through the search path, then a connection to the external host
    out = exec_(c, tb.key, "getent", "hosts", "db-ext").stdout.split()
    assert out[0] == db.ip and f"db-ext.default.svc.{Z}" in out
    ip = next(iter(tdns.resolver_for(tb).resolve("db-ext", "A"))).address
    assert http_get(tb.netns, ip, 5432, "/hostname") == "db.example.test"
    assert http_get(tb.netns, ip, 5432, "/clientip").split(":")[0] == tb.ip  # routed, not masqueraded
    # the seed's externalName google.com stays inside the emulation
    ip = next(iter(tdns.resolver_for(tb).resolve("my-external-service", "A"))).address
    assert ip == web.ip and http_get(tb.netns, ip, 80, "/hostname") == "www.example.test"
    # an ExternalName pointing at another Service of the cluster
    cip = _svc(c, "default/my-clusterip-service")["spec"]["clusterIP"]
    assert a_set(tb.netns, f"alias-int.default.svc.{Z}") == {cip}
    assert http_get(tb.netns, next(iter(tdns.resolver_for(tb).resolve("alias-int", "A"))).address, 80, "/hostname").startswith("myapp-")


@root
def test_nxdomain_for_unknown_names_and_nothing_leaves_the_machine(cluster):
    c = cluster
    tb = toolbox(c)
    for name in (f"nope.default.svc.{Z}", f"web-9.nginx.default.svc.{Z}", f"empty.default.svc.{Z}", "nope.example.test", "www.debian.org"):
        assert ask(tb.netns, name).rcode() == dns.rcode.NXDOMAIN, name
    out = exec_(c, tb.key, "dig", "+tries=2", "+time=2", f"nope.default.svc.{Z}").stdout
    assert "status: NXDOMAIN" in out
    with pytest.raises(dns.resolver.NXDOMAIN):
        tdns.resolver_for(tb).resolve("does-not-exist", "A")
    # nodes and clients resolve through the outside world's server
    assert exec_(c, "client1", "getent", "hosts", "google.com").stdout.split()[0] == tdns.external_hosts(c)[2].ip


@root
def test_dns_traffic_goes_through_kube_proxys_service_rules(cluster):
    c = cluster
    rules = run_cli("rules", "node1", "--name", c.name, "--service", "kube-system/coredns", check=True).stdout
    assert "10.233.0.3/32" in rules and "dport 53" in rules and "KUBE-SEP-" in rules
    cip = _svc(c, "default/my-clusterip-service")["spec"]["clusterIP"]
    for node in c.nodes:  # from every node's pods, UDP and TCP, to the ClusterIP
        for tcp in (False, True):
            assert a_set(toolbox(c, node.name).netns, f"my-clusterip-service.default.svc.{Z}", tcp=tcp) == {cip}
    # each DNS pod answers on its own address too (the endpoints kube-proxy picks from)
    for p in tdns.dns_pods(c):
        assert a_set(toolbox(c).netns, f"my-clusterip-service.default.svc.{Z}", server=p.ip) == {cip}


@root
def test_scaling_changes_headless_answers(cluster):
    c = cluster
    ns = toolbox(c).netns
    try:
        serial = _serial(c.name)
        run_cli("scale", "--name", c.name, "statefulset/web", "--replicas", "3", check=True)
        c2, sync = _refresh(c.name, serial)
        web = {p.name: p.ip for p in c2.pods if p.labels.get("app") == "web"}
        assert len(web) == 3
        assert a_set(ns, f"nginx.default.svc.{Z}") == set(web.values())
        assert a_set(ns, f"web-2.nginx.default.svc.{Z}") == {web["web-2"]}
        r = ask(ns, f"_web._tcp.nginx.default.svc.{Z}", "SRV")
        assert sorted((rd.weight, rd.target.to_text()) for rrset in r.answer for rd in rrset) == [
            (33, f"web-{i}.nginx.default.svc.{Z}.") for i in range(3)]
        run_cli("scale", "--name", c.name, "deployment/myapp", "--replicas", "3", check=True)
        c3, _ = _refresh(c.name)
        assert a_set(ns, f"my-headless-service.default.svc.{Z}") == {p.ip for p in c3.pods if p.labels.get("app") == "myapp"}
        assert len(a_set(ns, f"my-headless-service.default.svc.{Z}")) == 3
    finally:
        run_cli("scale", "--name", c.name, "statefulset/web", "--replicas", "2", check=True)
        run_cli("scale", "--name", c.name, "deployment/myapp", "--replicas", "2", check=True)
    _refresh(c.name)
    assert ask(ns, f"web-2.nginx.default.svc.{Z}").rcode() == dns.rcode.NXDOMAIN
    assert len(a_set(ns, f"nginx.default.svc.{Z}")) == 2


@root
def test_scaling_the_dns_deployment(cluster):
    c = cluster
    ns = toolbox(c).netns
    cip = _svc(c, "default/my-clusterip-service")["spec"]["clusterIP"]
    d = str(tdns.dns_dir(state.run_dir(c.name)) / "cluster" / "dnsmasq.conf")
    try:
        serial = _serial(c.name)
        run_cli("scale", "--name", c.name, "-n", "kube-system", "deployment/coredns", "--replicas", "3", check=True)
        c2, _ = _refresh(c.name, serial)
        pods = tdns.dns_pods(c2)
        assert len(pods) == 3
        for p in pods:  # each replica answers (a new pod got its own dnsmasq)
            assert a_set(ns, f"my-clusterip-service.default.svc.{Z}", server=p.ip) == {cip}
        run_cli("scale", "--name", c.name, "-n", "kube-system", "deployment/coredns", "--replicas", "1", check=True)
        c3, _ = _refresh(c.name)
        assert len(tdns.dns_pods(c3)) == 1
        # the removed replicas' dnsmasq are gone (they would keep their namespaces alive)
        primaries = [p for p in os.listdir("/proc") if p.isdigit() and any(d in a for a in tdns._cmdline(int(p)))]
        assert len(primaries) == 1
        for _ in range(8):
            assert a_set(ns, f"my-clusterip-service.default.svc.{Z}") == {cip}
    finally:
        run_cli("scale", "--name", c.name, "-n", "kube-system", "deployment/coredns", "--replicas", "2", check=True)
        _refresh(c.name)


@root
def test_pod_hostname_and_subdomain(cluster, tmp_path):
    """A plain Pod with spec.hostname/subdomain and a headless Service of that name:
    <hostname>.<subdomain>.<ns>.svc A -> the pod's IP (the DNS specification)."""
    c = cluster
    ns = toolbox(c).netns
    f = tmp_path / "sub.yaml"
    f.write_text(yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "sub", "namespace": "default"},
         "spec": {"clusterIP": "None", "selector": {"app": "sub"}, "ports": [{"name": "http", "port": 8080}]}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sub-pod", "namespace": "default", "labels": {"app": "sub"}},
         "spec": {"hostname": "alpha", "subdomain": "sub",
                  "containers": [{"name": "c", "image": "registry.k8s.io/e2e-test-images/agnhost:2.53",
                                  "ports": [{"containerPort": 8080}]}]}},
    ]))
    serial = _serial(c.name)
    run_cli("apply", "--name", c.name, "-f", str(f), check=True)
    try:
        c2, _ = _refresh(c.name, serial)
        pod = _pod(c2, "sub-pod")
        assert a_set(ns, f"alpha.sub.default.svc.{Z}") == {pod.ip}
        assert a_set(ns, f"sub.default.svc.{Z}") == {pod.ip}
        assert http_get(ns, pod.ip, 8080, "/hostname") == "alpha"  # the pod's hostname, as agnhost answers
    finally:
        serial = _serial(c.name)
        run_cli("delete", "--name", c.name, "-f", str(f), check=True)
    _refresh(c.name, serial)
    assert ask(ns, f"alpha.sub.default.svc.{Z}").rcode() == dns.rcode.NXDOMAIN


@root
def test_apply_and_delete_services(cluster, tmp_path):
    c = cluster
    ns = toolbox(c).netns
    f = tmp_path / "svc.yaml"
    f.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: late, namespace: default}\n"
        "spec:\n  selector: {app: myapp}\n  ports: [{name: http, port: 8000, targetPort: 8080}]\n"
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: late-ext, namespace: default}\n"
        "spec: {type: ExternalName, externalName: www.example.test}\n")
    run_cli("apply", "--name", c.name, "-f", str(f), check=True)
    c2, _ = _refresh(c.name)
    ip = _svc(c2, "default/late")["spec"]["clusterIP"]
    assert a_set(ns, f"late.default.svc.{Z}") == {ip}
    assert [rd.port for rrset in ask(ns, f"_http._tcp.late.default.svc.{Z}", "SRV").answer for rd in rrset] == [8000]
    assert a_set(ns, f"late-ext.default.svc.{Z}") == {tdns.external_hosts(c)[2].ip}
    assert http_get(ns, next(iter(tdns.resolver_for(toolbox(c)).resolve("late", "A"))).address, 8000, "/hostname").startswith("myapp-")
    run_cli("delete", "--name", c.name, "-f", str(f), check=True)
    _refresh(c.name)
    for name in (f"late.default.svc.{Z}", f"late-ext.default.svc.{Z}", f"_http._tcp.late.default.svc.{Z}"):
        assert ask(ns, name, "SRV" if name.startswith("_") else "A").rcode() == dns.rcode.NXDOMAIN, name
    # a Service of the topology goes too
    ext = tmp_path / "ext.yaml"
    ext.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db-ext", "namespace": "default"},
                                   "spec": {"type": "ExternalName", "externalName": "db.example.test"}}))
    try:
        run_cli("delete", "--name", c.name, "-f", str(ext), check=True)
        _refresh(c.name)
        assert ask(ns, f"db-ext.default.svc.{Z}").rcode() == dns.rcode.NXDOMAIN
    finally:
        run_cli("apply", "--name", c.name, "-f", str(ext), check=True)
        _refresh(c.name)
    assert a_set(ns, f"db-ext.default.svc.{Z}") == {tdns.external_hosts(c)[1].ip}


@root
def test_readiness_changes_reach_dns_and_updates_never_stop_answering(cluster):
    c = state.load_cluster(cluster.name)
    ns = toolbox(c).netns
    name = f"my-clusterip-service.default.svc.{Z}"
    cip = _svc(c, "default/my-clusterip-service")["spec"]["clusterIP"]
    stop = threading.Event()
    results: list[bool] = []

    def hammer():  # bounded: at most 5000 queries / 10 s
        t_end = time.monotonic() + 10
        while not stop.is_set() and len(results) < 5000 and time.monotonic() < t_end:
            try:
                results.append(a_set(ns, name) == {cip})
            except (dns.exception.DNSException, OSError):
                results.append(False)

    t = threading.Thread(target=hammer)
    t.start()
    try:
        web1 = _pod(c, "web-1")
        # the pod's server dies (`testbed pod stop`): not Ready, out of the headless answers
        serial = _serial(c.name)
        run_cli("pod", "--name", c.name, "stop", "web-1", check=True)
        c2, sync = _refresh(c.name, serial)
        assert sync["mode"] == "generation" and sync["max_delay_s"] < 1.0  # SRV set changed: no restart
        assert f"web-1.nginx.default.svc.{Z}" not in {n for _, n in tdns.records(c2).hosts}
        assert a_set(ns, f"nginx.default.svc.{Z}") == {_pod(c, "web-0").ip}
        assert ask(ns, f"web-1.nginx.default.svc.{Z}").rcode() == dns.rcode.NXDOMAIN
        serial = _serial(c.name)
        run_cli("pod", "--name", c.name, "start", "web-1", check=True)
        _, sync = _refresh(c.name, serial)
        assert sync["mode"] == "generation"
        assert a_set(ns, f"web-1.nginx.default.svc.{Z}") == {web1.ip}
        sync = tdns.update(state.load_cluster(c.name), state.run_dir(c.name))  # nothing changed: the hosts file only
        assert sync.mode == "inotify" and sync.max_delay < 0.5
    finally:
        stop.set()
        t.join(15)
    assert len(results) > 20 and all(results), f"{results.count(False)} of {len(results)} queries failed during updates"


@root
def test_legacy_backend_and_stop(tmp_path_factory):
    name = "tdns-legacy"
    c = _bring_up(name, "legacy", tmp_path_factory.mktemp("dnsl"))
    try:
        tb = toolbox(c, "node2")
        cip = _svc(c, "default/my-clusterip-service")["spec"]["clusterIP"]
        assert exec_(c, tb.key, "getent", "hosts", "my-clusterip-service").stdout.split()[0] == cip
        ip = next(iter(tdns.resolver_for(tb).resolve("db-ext", "A"))).address
        assert http_get(tb.netns, ip, 80, "/hostname") == "db.example.test"
        d = str(tdns.dns_dir(state.run_dir(name)))
        pids = [p for p in os.listdir("/proc") if p.isdigit() and any(d in a for a in tdns._cmdline(int(p)))]
        assert len(pids) >= 2 * len(tdns.dns_pods(c)) + 2  # primaries, secondaries, upstream, external servers
        tdns.stop(c, state.run_dir(name))
        time.sleep(0.05)
        assert not [p for p in os.listdir("/proc") if p.isdigit() and any(d in a for a in tdns._cmdline(int(p)))]
        assert not any(netns.exists(h.netns) for h in tdns.external_hosts(c))
        assert tdns.update(c, state.run_dir(name)) is None
        # a start that fails (port 53 taken in a DNS pod) leaves nothing behind
        with netns.entered(tdns.dns_pods(c)[-1].netns):
            squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("0.0.0.0", 53))
        squatter.listen()
        try:
            with pytest.raises(tdns.KernelError, match="dnsmasq in .* failed"):
                tdns.start(c, state.run_dir(name))
        finally:
            squatter.close()
        time.sleep(0.05)
        assert not [p for p in os.listdir("/proc") if p.isdigit() and any(d in a for a in tdns._cmdline(int(p)))]
        assert not any(netns.exists(h.netns) for h in tdns.external_hosts(c))
        assert tdns.sync(c, state.run_dir(name)).mode == "start"  # and it starts again
        assert exec_(c, tb.key, "getent", "hosts", "db-ext").stdout.split()[0] == tdns.external_hosts(c)[1].ip
    finally:
        run_cli("down", "--name", name)
