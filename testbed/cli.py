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

    cluster = topology.load(args.topology)  # validated before anything is created
    if args.name:
        cluster.name = args.name
    _need_root("up")
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
    if not hits:
        raise InputError(f'Invalid value: "{target}": no pod, node or client of that name in cluster {cluster.name}', field="TARGET")
    if len(hits) > 1:
        raise InputError(f'Invalid value: "{target}": ambiguous (several pods); use NAMESPACE/NAME', field="TARGET")
    return hits[0]


def cmd_exec(args: argparse.Namespace) -> int:
    from testbed import netns, state

    _need_root("exec")
    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise InputError("no command given: testbed exec TARGET -- COMMAND [ARG...]")
    cluster = state.load_cluster(state.resolve(args.name))
    ns = _resolve_target(cluster, args.target)
    fd = os.open(netns.path(ns), os.O_RDONLY)
    netns.setns(fd)  # the main thread, then exec: the command runs in the namespace
    os.close(fd)
    try:
        os.execvp(cmd[0], cmd)
    except FileNotFoundError:
        err_console.print(f"error: {cmd[0]}: command not found")
        return 127
    return 0  # not reached


def cmd_down(args: argparse.Namespace) -> int:
    from testbed import lifecycle, state

    _need_root("down")
    try:
        name = state.resolve(args.name)
    except TestbedError as e:
        console.print(f"nothing to do: {e}")
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


def cmd_doctor(args: argparse.Namespace) -> int:
    from testbed import doctor

    return doctor.main(console, json_output=args.json)


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="testbed", description="Emulate a Kubernetes cluster's Service networking on network namespaces.")
    p.add_argument("--version", action="version", version=f"testbed {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("up", help="build a cluster from a topology file")
    s.add_argument("topology", metavar="TOPOLOGY", help="topology YAML (e.g. topologies/seed.yaml)")
    s.add_argument("--name", help="cluster name (default: the topology's metadata.name)")
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

    s = sub.add_parser("doctor", help="what this machine supports, and which proxy modes can run")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_doctor)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except TestbedError as e:
        err_console.print(f"error: {e}", markup=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted: everything this command built was removed")
        return 130


if __name__ == "__main__":
    sys.exit(main())
