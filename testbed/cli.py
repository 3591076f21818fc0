"""The ``testbed`` command line.

Every user error ends as one line on stderr and exit status 2 (no traceback);
kernel or state problems as one line and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from testbed import __version__
from testbed.errors import InputError, NotRootError, TestbedError

console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, highlight=False)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(f"{message} (see `{self.prog} --help`)", file=None)


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise NotRootError(f"`testbed {what}`")


# --------------------------------------------------------------------------- commands


def cmd_up(args: argparse.Namespace) -> int:
    from testbed import lifecycle, topology

    from testbed import controlplane

    cluster = topology.load(args.topology)  # validated before anything is created
    if args.name:
        cluster.name = args.name
    cluster.extra["proxy"] = {"mode": args.proxy_mode, "backend": args.iptables_backend or "nft", "scheduler": args.ipvs_scheduler}
    from testbed import dns

    dns.add_system_objects(cluster)  # kube-system/coredns: Deployment + Service at the third Service IP
    controlplane.admit_all(cluster)  # kube-apiserver admission: bad Services fail here
    if args.proxy_mode == "ipvs":
        from testbed.proxy.ipvs import validate_scheduler

        validate_scheduler(args.ipvs_scheduler)
    _need_root("up")
    from testbed import guest

    kernel, why = guest.choose_kernel(args.kernel, [args.proxy_mode])
    if kernel == "uml":
        err_console.print(f"kernel: {why}")
        argv_up = ["up", args.topology, "--name", cluster.name, "--proxy-mode", args.proxy_mode,
                   "--ipvs-scheduler", args.ipvs_scheduler]
        if args.iptables_backend:
            argv_up += ["--iptables-backend", args.iptables_backend]
        h = guest.start_cluster_guest(cluster.name, argv_up)
        sys.stdout.write(h.up_stdout)
        sys.stderr.write(h.up_stderr)
        if h.up_returncode == 0:
            console.print(f"inside guest kernel {h.guest_id} (host namespace {h.netns}); "
                          f"`testbed down --name {cluster.name}` stops it")
        return h.up_returncode
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=True, disable=not err_console.is_terminal,
    ) as bar:
        task = bar.add_task("building", total=None)

        def progress(phase: str, done: int, total: int) -> None:
            bar.update(task, description=phase, completed=done, total=total)

        lifecycle.up(cluster, progress)
    print_cluster(cluster, title=f"cluster {cluster.name} is up (run {cluster.run_id})")
    return 0


def _pod_states(name: str) -> dict[str, str]:
    from testbed import state

    sock = state.control_socket(name)
    if not sock.exists():
        return {}
    try:
        from testbed import podserver

        return podserver.control(str(sock), "status").get("pods", {})
    except Exception:  # noqa: BLE001 - a dead pod server shows as "unknown"
        return {}


def print_cluster(cluster, title: str, pod_states: dict[str, str] | None = None) -> None:  # noqa: ANN001
    """kubectl-like tables: nodes, clients, pods."""
    console.print(title)
    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("NODE", "INTERNAL-IP", "POD-CIDR", "PODS", "NAMESPACE"):
        t.add_column(col)
    for n in cluster.nodes:
        t.add_row(n.name, n.ip, n.pod_cidr, str(len(cluster.pods_on(n.name))), n.netns)
    console.print(t)
    if cluster.clients:
        t = Table(box=None, pad_edge=False, header_style="bold")
        for col in ("CLIENT", "IP", "NAMESPACE"):
            t.add_column(col)
        for c in cluster.clients:
            t.add_row(c.name, c.ip, c.netns)
        console.print(t)
    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("POD", "STATUS", "IP", "NODE", "PORTS"):
        t.add_column(col, no_wrap=True)
    for p in cluster.pods:
        ports = ",".join(f"{cp.port}/{cp.protocol}" for cp in p.ports) or "-"
        status = "Running"
        if pod_states is not None and p.ports:
            status = {"running": "Running", "stopped": "Stopped"}.get(pod_states.get(p.key, ""), "Unknown")
        t.add_row(p.key, status, p.ip, p.node, ports)
    console.print(t)


def cmd_status(args: argparse.Namespace) -> int:
    from testbed import netns, state

    name = state.resolve(args.name)
    cluster = state.load_cluster(name)
    info = state.load_info(name)
    missing = [ns for ns in [cluster.switch_netns, *(n.netns for n in cluster.nodes), *(p.netns for p in cluster.pods)] if not netns.exists(ns)]
    phase = info.phase if info else "unknown"
    print_cluster(cluster, title=f"cluster {name}: {phase} (run {cluster.run_id}, from {cluster.source})", pod_states=_pod_states(name))
    if missing:
        err_console.print(f"warning: {len(missing)} namespace(s) of this run are missing (e.g. {missing[0]}); `testbed down` and up again")
        return 1
    return 0


def _resolve_target(cluster, target: str) -> str:  # noqa: ANN001
    if "/" in target:
        hits = [p.netns for p in cluster.pods if p.key == target]
    else:
        hits = [p.netns for p in cluster.pods if p.name == target]
        hits += [n.netns for n in cluster.nodes if n.name == target]
        hits += [c.netns for c in cluster.clients if c.name == target]
        from testbed import dns

        hits += [h.netns for h in dns.external_hosts(cluster) if h.name == target]
    if not hits:
        raise InputError(f'Invalid value: "{target}": no pod, node or client of that name in cluster {cluster.name}', field="TARGET")
    if len(hits) > 1:
        raise InputError(f'Invalid value: "{target}": ambiguous (several pods); use NAMESPACE/NAME', field="TARGET")
    return hits[0]


def cmd_exec(args: argparse.Namespace) -> int:
    from testbed import state

    _need_root("exec")
    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise InputError("no command given: testbed exec TARGET -- COMMAND [ARG...]")
    cluster = state.load_cluster(state.resolve(args.name))
    ns = _resolve_target(cluster, args.target)
    # `ip netns exec` as a user would type it: it also bind-mounts /etc/netns/NAME/*
    # (e.g. the pod's resolv.conf) over /etc and remounts /sys for the namespace.
    os.execvp("ip", ["ip", "netns", "exec", ns, *cmd])
    return 0  # not reached


def cmd_down(args: argparse.Namespace) -> int:
    from testbed import lifecycle, state

    _need_root("down")
    try:
        name = state.resolve(args.name)
    except TestbedError as e:
        console.print(f"nothing to do: {e}")
        return 0
    from testbed import guest

    if guest.lives_in_guest(name):
        guest.stop(name)
        console.print(f"cluster {name} is down: its guest kernel was stopped")
        return 0
    report = lifecycle.down(name)
    console.print(f"cluster {name} is down: {len(report.namespaces)} namespaces, {len(report.processes)} processes removed")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from testbed import clean

    _need_root("clean")
    report = clean.clean(args.run)
    if report.empty():
        console.print("clean: nothing left behind")
    else:
        console.print(
            f"clean: removed {len(report.namespaces)} namespaces, killed {len(report.processes)} processes, "
            f"removed {len(report.run_dirs)} run directories"
        )
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    from testbed import kubeproxy, lifecycle, state

    _need_root("rules")
    cluster = state.load_cluster(state.resolve(args.name))
    try:
        cluster.node(args.node)
    except KeyError:
        raise InputError(f'Invalid value: "{args.node}": no node of that name in cluster {cluster.name}', field="NODE") from None
    proxier = kubeproxy.proxier_for(cluster, cluster.node(args.node), lifecycle.proxy_settings(cluster), state.run_dir(cluster.name))
    sys.stdout.write(proxier.live_rules(args.service))
    return 0


def _workload_ref(text: str) -> tuple[str, str]:
    kinds = {"deployment": "Deployment", "deploy": "Deployment", "deployments": "Deployment",
             "statefulset": "StatefulSet", "sts": "StatefulSet", "statefulsets": "StatefulSet",
             "replicaset": "ReplicaSet", "rs": "ReplicaSet", "replicasets": "ReplicaSet"}
    kind, _, name = text.partition("/")
    if not name or kind.lower() not in kinds:
        raise InputError(f'Invalid value: "{text}": expected deployment/NAME, statefulset/NAME or replicaset/NAME', field="RESOURCE")
    return kinds[kind.lower()], name


def _summary(results) -> str:  # noqa: ANN001
    if not results:
        return ""
    apply_ms = sum(r.apply_s for r in results) * 1000
    return f"; kube-proxy resynced {len(results)} nodes ({apply_ms:.0f} ms applying)"


def cmd_scale(args: argparse.Namespace) -> int:
    from testbed import lifecycle, state, workloads

    _need_root("scale")
    kind, name = _workload_ref(args.resource)
    cname = state.resolve(args.name)
    with state.locked(cname):
        cluster = state.load_cluster(cname)
        added, removed = workloads.scale(cluster, kind, args.namespace, name, args.replicas)
        results = lifecycle.change_pods(cluster, added, removed)
    console.print(f"{kind.lower()}.apps/{name} scaled (+{len(added)} -{len(removed)} pods){_summary(results)}")
    return 0


def cmd_pod(args: argparse.Namespace) -> int:
    from testbed import lifecycle, state

    _need_root("pod")
    cname = state.resolve(args.name)
    with state.locked(cname):
        cluster = state.load_cluster(cname)
        key = args.pod if "/" in args.pod else f"{args.namespace}/{args.pod}"
        results = lifecycle.set_pod_ready(cluster, key, args.action == "start")
    console.print(f"pod/{args.pod} {'started (Ready)' if args.action == 'start' else 'stopped (not Ready)'}{_summary(results)}")
    return 0


def _read_manifests(files: list[str]) -> list[tuple[str, dict]]:
    """Every object of the files, a ``kind: List`` (what ``get -o yaml`` prints) flattened
    into its items, as kubectl's resource builder does."""
    from testbed import topology
    from testbed.proxy.servicemap import iter_objects

    out = []
    for f in files:
        for obj in iter_objects(topology.read_yaml_documents(f)):
            if obj.get("kind") != "Topology":
                out.append((f, dict(obj)))
    return out


def cmd_apply(args: argparse.Namespace) -> int:
    from testbed import lifecycle, state
    from testbed import manifests as mf

    _need_root("apply")
    docs = _read_manifests(args.filename)
    cname = state.resolve(args.name)
    with state.locked(cname):
        cluster = state.load_cluster(cname)
        lines, added, removed = mf.apply(cluster, docs)  # all validated before anything changes
        results = lifecycle.change_pods(cluster, added, removed)
    for line in lines:
        console.print(line)
    console.print(_summary(results).lstrip("; "))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from testbed import lifecycle, state
    from testbed import manifests as mf

    _need_root("delete")
    docs = _read_manifests(args.filename)
    cname = state.resolve(args.name)
    with state.locked(cname):
        cluster = state.load_cluster(cname)
        lines, removed = mf.delete(cluster, docs)
        results = lifecycle.change_pods(cluster, [], removed)
    for line in lines:
        console.print(line)
    console.print(_summary(results).lstrip("; "))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    import yaml

    from testbed import state

    cluster = state.load_cluster(state.resolve(args.name))
    kind = {"svc": "services", "service": "services", "ep": "endpointslices", "endpointslice": "endpointslices",
            "po": "pods", "pod": "pods"}.get(args.resource, args.resource)
    if kind == "pods":
        items = [{"apiVersion": "v1", "kind": "Pod",
                  "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels},
                  "spec": {"nodeName": p.node, "hostname": p.hostname, "subdomain": p.subdomain,
                           "containers": [{"ports": [{"containerPort": cp.port, "protocol": cp.protocol, **({"name": cp.name} if cp.name else {})} for cp in p.ports]}]},
                  "status": {"podIP": p.ip, "phase": "Running", "conditions": [{"type": "Ready", "status": str(p.ready)}]}}
                 for p in cluster.pods]
    elif kind in ("services", "endpointslices"):
        items = getattr(cluster, kind)
    else:
        raise InputError(f'the server doesn\'t have a resource type "{args.resource}"')
    if args.output == "yaml":
        sys.stdout.write(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items}, sort_keys=False))
        return 0
    t = Table(box=None, pad_edge=False, header_style="bold")
    if kind == "services":
        for col in ("NAMESPACE", "NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)"):
            t.add_column(col, no_wrap=True)
        for s in items:
            spec = s.get("spec") or {}
            ext = [i.get("ip") for i in ((s.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []]
            ext += spec.get("externalIPs") or []
            if spec.get("type") == "ExternalName":
                ext = [spec.get("externalName", "")]
            ports = ",".join(f"{p.get('port')}{':' + str(p['nodePort']) if p.get('nodePort') else ''}/{p.get('protocol', 'TCP')}"
                             for p in spec.get("ports") or []) or "<none>"
            t.add_row(s["metadata"].get("namespace", "default"), s["metadata"]["name"], spec.get("type", "ClusterIP"),
                      spec.get("clusterIP", "<none>"),
                      # kubectl: a LoadBalancer still waiting for an address shows <pending>
                      ",".join(ext) or ("<pending>" if spec.get("type") == "LoadBalancer" else "<none>"), ports)
    elif kind == "endpointslices":
        for col in ("NAMESPACE", "NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS"):
            t.add_column(col, no_wrap=True)
        for s in items:
            ports = ",".join(str(p.get("port")) for p in s.get("ports") or []) or "<unset>"
            addrs = [a for e in s.get("endpoints") or [] for a in e.get("addresses", [])]
            t.add_row(s["metadata"].get("namespace", "default"), s["metadata"]["name"], s.get("addressType", ""), ports,
                      ",".join(addrs[:3]) + (f" + {len(addrs) - 3} more..." if len(addrs) > 3 else "") or "<unset>")
    else:
        for col in ("NAMESPACE", "NAME", "READY", "STATUS", "IP", "NODE"):
            t.add_column(col, no_wrap=True)
        for p in cluster.pods:
            t.add_row(p.namespace, p.name, "1/1" if p.ready else "0/1", "Running", p.ip, p.node)
    console.print(t)
    return 0


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f'invalid boolean value: "{text}" (true or false)')


def _render_nftables(args: argparse.Namespace, services, endpoints, nodeport_addresses) -> int:  # noqa: ANN001
    """kube-proxy's nftables mode: the `nft -f` transaction of a first full sync."""
    from testbed.proxy.nftables import NFTablesConfig, render_nftables

    cfg = NFTablesConfig(
        hostname_override=args.hostname_override, node_ip=args.node_ip, cluster_cidr=args.cluster_cidr,
        masquerade_bit=args.masquerade_bit, masquerade_mark=args.masquerade_mark, masquerade_all=args.masquerade_all,
        nodeport_addresses=nodeport_addresses,
        service_cidrs=[c for c in (args.service_cidrs or "").split(",") if c],
    )
    text = render_nftables(services, endpoints, cfg)
    if args.sorted:  # kube-proxy's unit tests' normal form (sortNFTablesTransaction of the final state)
        from testbed.proxy.nft_normalize import normal_form

        text = normal_form(text) + "\n"
    sys.stdout.write(text)
    return 0


def cmd_proxy_render(args: argparse.Namespace) -> int:
    """Exactly what kube-proxy would feed iptables-restore on that node (pure)."""
    from testbed import topology
    from testbed.proxy import servicemap
    from testbed.proxy.iptables import IPTablesConfig, render_iptables
    from testbed.proxy.normalize import sort_iptables_rules

    objects = []
    for f in args.filename:
        for obj in topology.read_yaml_documents(f):
            if obj.get("kind") == "Topology":
                continue
            # No admission here: kube-proxy renders whatever the API server holds (its
            # unit tests feed objects kube-apiserver would reject, e.g. a
            # healthCheckNodePort on an eTP=Cluster Service); it parses sloppily.
            objects.append(obj)
    services, endpoints = servicemap.build_maps(objects)
    nodeport_addresses = [c for c in (args.nodeport_addresses or "").split(",") if c]
    if args.proxy_mode == "ipvs":
        from testbed.proxy.ipvs import IPVSConfig, render_ipvs_text

        icfg = IPVSConfig(
            hostname_override=args.hostname_override, node_ip=args.node_ip, cluster_cidr=args.cluster_cidr,
            masquerade_bit=args.masquerade_bit, masquerade_mark=args.masquerade_mark, masquerade_all=args.masquerade_all,
            nodeport_addresses=nodeport_addresses, ipvs_scheduler=args.ipvs_scheduler, ipvs_strict_arp=args.ipvs_strict_arp,
            ipvs_exclude_cidrs=[c for c in args.ipvs_exclude_cidrs.split(",") if c],
            ipvs_tcp_timeout=args.ipvs_tcp_timeout, ipvs_tcpfin_timeout=args.ipvs_tcpfin_timeout,
            ipvs_udp_timeout=args.ipvs_udp_timeout, random_fully=args.random_fully, kernel_version=os.uname().release,
        )
        sys.stdout.write(render_ipvs_text((services, endpoints), icfg))
        return 0
    if args.proxy_mode == "nftables":
        return _render_nftables(args, services, endpoints, nodeport_addresses)
    cfg = IPTablesConfig(
        hostname_override=args.hostname_override,
        node_ip=args.node_ip,
        cluster_cidr=args.cluster_cidr,
        masquerade_bit=args.masquerade_bit,
        masquerade_mark=args.masquerade_mark,
        masquerade_all=args.masquerade_all,
        nodeport_addresses=nodeport_addresses,
        localhost_nodeports=args.localhost_nodeports,
        nfacct=args.nfacct,
        random_fully=args.random_fully,
    )
    text = render_iptables(services, endpoints, cfg)
    sys.stdout.write(sort_iptables_rules(text) if args.sorted else text)
    return 0


def cmd_guest(args: argparse.Namespace) -> int:
    from testbed import guest

    _need_root("guest")
    return guest.main_guest(list(args.command), timeout=args.timeout)


def cmd_run(args: argparse.Namespace) -> int:
    from testbed import experiment

    return experiment.main_run(args.file, profile=args.profile, kernel=args.kernel, out=args.out, resume=args.resume,
                               console=console)


def cmd_report(args: argparse.Namespace) -> int:
    from testbed import report

    return report.main_report(args.dir, console)


def cmd_doctor(args: argparse.Namespace) -> int:
    from testbed import doctor

    return doctor.main(console, json_output=args.json, guest_kernel=not args.no_guest)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="testbed", description="Emulate a Kubernetes cluster's Service networking on network namespaces.")
    p.add_argument("--version", action="version", version=f"testbed {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("up", help="build a cluster from a topology file")
    s.add_argument("topology", metavar="TOPOLOGY", help="topology YAML (e.g. topologies/seed.yaml)")
    s.add_argument("--name", help="cluster name (default: the topology's metadata.name)")
    s.add_argument("--proxy-mode", default="iptables", choices=["iptables", "ipvs", "nftables"],
                   help="kube-proxy mode (default iptables)")
    s.add_argument("--ipvs-scheduler", default="rr", metavar="SCHED", help="IPVS scheduler (rr, wrr, lc, sh, mh, ...)")
    s.add_argument("--iptables-backend", default=None, choices=["legacy", "nft"],
                   help="iptables backend kube-proxy uses in every node (default nft, as Debian 12's iptables; "
                        "legacy in the guest kernel)")
    s.add_argument("--kernel", default="auto", choices=["host", "uml", "auto"],
                   help="where the cluster runs: this kernel, a User-Mode Linux guest kernel, or auto "
                        "(the host when it has what the proxy mode needs; default)")
    s.set_defaults(func=cmd_up)

    s = sub.add_parser("status", help="show the live cluster")
    s.add_argument("--name")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("exec", help="run a command inside a pod, node or client (like kubectl exec)")
    s.add_argument("--name", help="cluster name")
    s.add_argument("target", metavar="TARGET", help="pod (NAME or NAMESPACE/NAME), node or client")
    s.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND")
    s.set_defaults(func=cmd_exec)

    s = sub.add_parser("down", help="remove the cluster")
    s.add_argument("--name")
    s.set_defaults(func=cmd_down)

    s = sub.add_parser("clean", help="remove everything any earlier run left behind (after a crash)")
    s.add_argument("--run", help="only this run id")
    s.set_defaults(func=cmd_clean)

    s = sub.add_parser("rules", help="show the live kube-proxy rules of one node")
    s.add_argument("--name", help="cluster name")
    s.add_argument("node", metavar="NODE")
    s.add_argument("--service", metavar="NAMESPACE/NAME", help="only the lines of this Service")
    s.set_defaults(func=cmd_rules)

    s = sub.add_parser("get", help="list services, endpointslices or pods (like kubectl get)")
    s.add_argument("--name", help="cluster name")
    s.add_argument("resource", metavar="RESOURCE", help="services|endpointslices|pods")
    s.add_argument("-o", "--output", choices=["table", "yaml"], default="table")
    s.set_defaults(func=cmd_get)

    s = sub.add_parser("scale", help="set the replicas of a Deployment/StatefulSet (like kubectl scale)")
    s.add_argument("--name", help="cluster name")
    s.add_argument("resource", metavar="deployment/NAME")
    s.add_argument("--replicas", type=int, required=True)
    s.add_argument("-n", "--namespace", default="default")
    s.set_defaults(func=cmd_scale)

    s = sub.add_parser("pod", help="stop or start one pod's server (endpoint churn, readiness changes)")
    s.add_argument("--name", help="cluster name")
    s.add_argument("action", choices=["stop", "start"])
    s.add_argument("pod", metavar="POD", help="NAME or NAMESPACE/NAME")
    s.add_argument("-n", "--namespace", default="default")
    s.set_defaults(func=cmd_pod)

    for verb, fn, text in (("apply", cmd_apply, "create or update objects from manifests (like kubectl apply -f)"),
                           ("delete", cmd_delete, "delete the objects named in manifests (like kubectl delete -f)")):
        s = sub.add_parser(verb, help=text)
        s.add_argument("--name", help="cluster name")
        s.add_argument("-f", "--filename", action="extend", nargs="+", required=True, metavar="FILE")
        s.set_defaults(func=fn)

    s = sub.add_parser("proxy", help="kube-proxy's rules, rendered without a cluster")
    psub = s.add_subparsers(dest="proxy_command", metavar="SUBCOMMAND", parser_class=_Parser)
    psub.required = True
    r = psub.add_parser("render", help="print what kube-proxy would program on one node for these manifests")
    r.add_argument("--proxy-mode", default="iptables", choices=["iptables", "ipvs", "nftables"])
    r.add_argument("--service-cidrs", default="", metavar="CIDR,...", help="nftables: the ServiceCIDR ranges")
    r.add_argument("--ipvs-scheduler", default="rr", metavar="SCHED")
    r.add_argument("--ipvs-strict-arp", action="store_true")
    r.add_argument("--ipvs-exclude-cidrs", default="", metavar="CIDR,...")
    r.add_argument("--ipvs-tcp-timeout", type=int, default=0)
    r.add_argument("--ipvs-tcpfin-timeout", type=int, default=0)
    r.add_argument("--ipvs-udp-timeout", type=int, default=0)
    r.add_argument("-f", "--filename", action="extend", nargs="+", required=True, metavar="FILE",
                   help="Service / EndpointSlice manifests (repeatable; multi-document YAML)")
    r.add_argument("--hostname-override", default="", metavar="NODE", help="this node's name (decides local endpoints)")
    r.add_argument("--node-ip", default=None, metavar="IP")
    r.add_argument("--cluster-cidr", default=None, metavar="CIDR", help="pod CIDR for local-traffic detection")
    r.add_argument("--masquerade-bit", type=int, default=14, dest="masquerade_bit")
    r.add_argument("--masquerade-mark", default=None, metavar="MARK",
                   help="literal mark string (kube-proxy's unit tests use 0x4000; default: %%#08x of 1<<bit)")
    r.add_argument("--masquerade-all", action="store_true")
    r.add_argument("--nodeport-addresses", default="", metavar="CIDR,...")
    r.add_argument("--localhost-nodeports", type=_bool, default=True, metavar="true|false")
    r.add_argument("--nfacct", type=_bool, default=True, metavar="true|false",
                   help="whether kube-proxy's nfacct counters exist (adds -m nfacct matches)")
    r.add_argument("--random-fully", type=_bool, default=True, metavar="true|false")
    r.add_argument("--sorted", action="store_true", help="normalise as kube-proxy's unit tests compare")
    r.set_defaults(func=cmd_proxy_render)

    s = sub.add_parser("run", help="run an experiment: compare kube-proxy modes, write a results folder")
    s.add_argument("file", nargs="?", metavar="FILE", help="experiment YAML (optional with --resume)")
    s.add_argument("--profile", metavar="NAME", help="sweep profile of the experiment file (e.g. quick, full)")
    s.add_argument("--kernel", choices=["host", "uml", "auto"], help="override the experiment's kernel")
    s.add_argument("--out", metavar="DIR", help="results folder (default results/<name>/<UTC timestamp>)")
    s.add_argument("--resume", metavar="DIR", help="continue an interrupted run in DIR")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("report", help="rebuild summary, plots and report of a results folder from its raw rows")
    s.add_argument("dir", metavar="DIR")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("guest", help="run a command inside a fresh User-Mode Linux guest kernel (IPVS, netem)")
    s.add_argument("--timeout", type=float, default=600.0, metavar="S", help="kill the guest after S seconds (default 600)")
    s.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND")
    s.set_defaults(func=cmd_guest)

    s = sub.add_parser("doctor", help="what this machine supports, and which proxy modes can run")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--no-guest", action="store_true", help="do not boot the UML guest kernel to probe it (saves ~5 s)")
    s.set_defaults(func=cmd_doctor)
    return p


# commands that act on a live cluster: sent to the guest kernel when the cluster lives in one
FORWARDED = {cmd_status, cmd_exec, cmd_get, cmd_rules, cmd_scale, cmd_apply, cmd_delete, cmd_pod}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.func in FORWARDED:
            from testbed import guest

            rc = guest.forward_cli(getattr(args, "name", None), list(sys.argv[1:] if argv is None else argv))
            if rc is not None:
                return rc
        return int(args.func(args) or 0)
    except TestbedError as e:
        err_console.print(f"error: {e}", markup=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        # A netlink socket the interrupt cut off mid-call leaves pyroute2's asyncio
        # generator unfinished; Python would report it at exit as a traceback. The run
        # is already torn down: say that, and nothing else.
        sys.unraisablehook = lambda _unraisable: None
        err_console.print("interrupted: everything this command built was removed")
        return 130


if __name__ == "__main__":
    sys.exit(main())
