"""Experiments: compare kube-proxy's modes on an emulated cluster (``testbed run``).

An experiment file is YAML, validated like a topology file (one line naming the file,
the field and the rule; nothing is created before it passes)::

    name: ipvs-vs-iptables
    topology: ../topologies/seed.yaml     # a file (relative to this one) or {inline: [documents]}
    kernel: auto                          # host | uml | auto
    seed: 1
    repetitions: 3
    modes:                                # a mode name, or a mapping with its settings
      - iptables                          #   iptables: backend legacy | nft (default: nft if the kernel has it)
      - {mode: ipvs, scheduler: rr}
      - nftables
    sweep:                                # expanded into trials (mode x endpoints x services x repetition)
      services: [0, 1000, 10000]          # background Services (synthetic, see testbed.synthetic)
      endpoints: [3]                      # endpoints per background Service
      scheduler: [rr]                     # IPVS schedulers (ipvs modes only)
    background: {namespace: bench, addresses: pods}
    measure: [latency, fairness, sync]    # + source_ip, affinity, per_node
    traffic:                              # defaults for every target
      connection: new                     # new | keepalive
      protocol: http                      # http | tcp | udp
      requests: 2000                      # and/or duration (s)
      concurrency: 1                      # worker slots per source
      source_order: parallel              # parallel | sequential: the sources one after another
      rate: null                          # open loop: requests/s
      warmup: 100
      targets:
        - {name: clusterip, service: default/my-clusterip-service, via: clusterIP, from: [app=toolbox]}
        - {name: nodeport, service: default/my-nodeport-service, via: nodePort, node: node3, from: [client1]}
        - {name: lb, service: default/my-lb-service, via: loadBalancer, from: [client2]}
        - {name: direct, service: default/my-clusterip-service, via: pod, from: [app=toolbox]}  # no Service: the control
    profiles:                             # overlays selected with --profile
      quick: {sweep: {services: [0, 1000]}, repetitions: 1, traffic: {requests: 500}}

One *trial* is one (mode variant, endpoints, services, repetition): the background is
set to that many synthetic Services (the probed Services sort after them: last in
kube-proxy's dispatch order), the control plane is measured (a full sync, "add one
Service while N exist", "delete it again"), conntrack is flushed on every node, and
every target gets its requests (one row each, :mod:`testbed.traffic`; probes straight
to a pod and probes through a Service draw disjoint source ports,
:func:`testbed.traffic.set_source_ports`). A trial's raw rows are written to
``DIR/trials/`` and journaled in ``DIR/trials.jsonl`` before the next starts, so
Ctrl-C keeps every finished trial and ``--resume DIR`` runs the rest.
At the end (or on Ctrl-C) :func:`testbed.report.build` turns the raw rows into
``summary.csv``, ``sync.csv``, plots and ``report.md``/``report.html``.

Kernels: modes are compared only inside one kernel. ``kernel: uml`` (or ``auto`` when
the host cannot run a requested mode and the guest kernel can, e.g. IPVS here) runs
the same experiment inside the User-Mode Linux guest (:mod:`testbed.guest`), writing
into the same results folder through hostfs; modes the chosen kernel cannot run are
skipped with the reason recorded (``manifest.json`` and the report).
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from testbed.errors import InputError, KernelError, TestbedError

__all__ = [
    "Experiment",
    "Variant",
    "Trial",
    "load",
    "expand",
    "main_run",
    "run",
    "manifest_info",
]

MODES = ("iptables", "ipvs", "nftables")
MEASURES = ("latency", "fairness", "sync", "source_ip", "affinity", "per_node")
VIAS = ("clusterIP", "nodePort", "loadBalancer", "dns")
IPVS_SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh")
MAX_SERVICES = 60_000  # a /16 service CIDR; the topology's CIDR is the real bound
MAX_TRIALS = 10_000
KERNEL_RUNTIME_ENV = "TESTBED_KERNEL_RUNTIME"  # "host" / "uml": overrides the detection
GUEST_TIMEOUT = 3 * 3600.0  # one guest run; trials are journaled, so --resume continues after it
GUEST_MEM = "10G"  # the guest's RAM (a sparse file in /dev/shm: only what it touches): 3 nodes x 10,000 Services of rules, pandas, the pod servers (3G ran out; 6G ran out at the end of the full profile: its OOM killer ended the run)


# --------------------------------------------------------------------------- the file


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _mode_name(v: str) -> str:
    if v not in MODES:
        raise ValueError(f'Unsupported value: "{v}": supported values: "iptables", "ipvs", "nftables"')
    return v


ModeName = Annotated[str, AfterValidator(_mode_name)]


class ModeSpec(_Spec):
    mode: Literal["iptables", "ipvs", "nftables"]
    backend: Literal["legacy", "nft"] | None = None  # iptables backend (iptables and ipvs modes use iptables)
    scheduler: str | None = None  # ipvs only

    @model_validator(mode="after")
    def _check(self) -> ModeSpec:
        if self.scheduler is not None:
            if self.mode != "ipvs":
                raise ValueError(f'Invalid value: "{self.scheduler}": scheduler applies to mode "ipvs" only')
            if self.scheduler not in IPVS_SCHEDULERS:
                raise ValueError(f'Unsupported value: "{self.scheduler}": supported values: ' + ", ".join(f'"{s}"' for s in IPVS_SCHEDULERS))
        if self.backend is not None and self.mode == "nftables":
            raise ValueError(f'Invalid value: "{self.backend}": backend applies to modes "iptables" and "ipvs"')
        return self


class SweepSpec(_Spec):
    services: list[int] = Field(default_factory=lambda: [0])
    endpoints: list[int] = Field(default_factory=lambda: [3])
    scheduler: list[str] | None = None

    @field_validator("services")
    @classmethod
    def _services(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("Required value: at least one number of Services")
        for n in v:
            if not 0 <= n <= MAX_SERVICES:
                raise ValueError(f"Invalid value: {n}: must be between 0 and {MAX_SERVICES}, inclusive")
        if len(set(v)) != len(v):
            raise ValueError(f"Duplicate value: {[n for n in v if v.count(n) > 1][0]}")
        return v

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("Required value: at least one number of endpoints")
        for n in v:
            if not 0 <= n <= 1000:
                raise ValueError(f"Invalid value: {n}: must be between 0 and 1000, inclusive")
        if len(set(v)) != len(v):
            raise ValueError(f"Duplicate value: {[n for n in v if v.count(n) > 1][0]}")
        return v

    @field_validator("scheduler")
    @classmethod
    def _sched(cls, v: list[str] | None) -> list[str] | None:
        for s in v or []:
            if s not in IPVS_SCHEDULERS:
                raise ValueError(f'Unsupported value: "{s}": supported values: ' + ", ".join(f'"{x}"' for x in IPVS_SCHEDULERS))
        if v is not None and not v:
            raise ValueError("Required value: at least one scheduler (or leave scheduler out)")
        return v


class BackgroundSpec(_Spec):
    namespace: str = "bench"
    addresses: Literal["pods", "unreachable"] = "pods"

    @field_validator("namespace")
    @classmethod
    def _ns(cls, v: str) -> str:
        if not re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", v) or len(v) > 63:
            raise ValueError(f'Invalid value: "{v}": a lowercase RFC 1123 label must consist of lower case alphanumeric '
                             "characters or '-', and must start and end with an alphanumeric character")
        return v


class TrafficSpec(_Spec):
    """Traffic settings; every field can be overridden per target."""

    connection: Literal["new", "keepalive"] | None = None
    protocol: Literal["http", "tcp", "udp"] | None = None
    requests: int | None = Field(None, ge=1, le=10_000_000)
    duration: float | None = Field(None, gt=0, le=3600)
    concurrency: int | None = Field(None, ge=1, le=1000)
    rate: float | None = Field(None, gt=0, le=10_000_000)
    warmup: int | None = Field(None, ge=0, le=1_000_000)
    timeout: float | None = Field(None, gt=0, le=300)
    # How a target's sources send: all at once, or one after another (requests and
    # duration split evenly; each source warms up with warmup/sources, rounded up). On a small machine parallel sources queue behind each
    # other for the CPU, and their connect times then measure that queue.
    source_order: Literal["parallel", "sequential"] | None = None


TRAFFIC_DEFAULTS = {"connection": "new", "protocol": "http", "requests": None, "duration": None, "concurrency": 1,
                    "rate": None, "warmup": 0, "timeout": 2.0, "source_order": "parallel"}


class TargetSpec(TrafficSpec):
    name: str
    service: str  # NAMESPACE/NAME or NAME (namespace default)
    # pod: straight to the Service's first ready endpoint (pod IP and target port): the
    # same path without the Service, a control for what the Service adds
    via: Literal["clusterIP", "nodePort", "loadBalancer", "dns", "pod"] = "clusterIP"
    port: int | str | None = None  # Service port number or name; default: the first of the protocol
    node: str | None = None  # nodePort: the node entered, or "all"
    sources: list[str] = Field(alias="from")
    measure: list[str] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", v) or len(v) > 63:
            raise ValueError(f'Invalid value: "{v}": must be a lowercase RFC 1123 label (e.g. "clusterip")')
        return v

    @field_validator("sources")
    @classmethod
    def _from(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("Required value: at least one pod, client or node (or a label selector app=NAME)")
        return v

    @field_validator("measure")
    @classmethod
    def _measure(cls, v: list[str] | None) -> list[str] | None:
        for m in v or []:
            if m not in MEASURES or m == "sync":
                ok = [x for x in MEASURES if x != "sync"]
                raise ValueError(f'Unsupported value: "{m}": supported values: ' + ", ".join(f'"{x}"' for x in ok))
        return v


class TrafficSection(TrafficSpec):
    targets: list[TargetSpec]

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[TargetSpec]) -> list[TargetSpec]:
        if not v:
            raise ValueError("Required value: at least one target")
        names = [t.name for t in v]
        for n in names:
            if names.count(n) > 1:
                raise ValueError(f'Duplicate value: "{n}"')
        return v


class InlineTopology(_Spec):
    inline: list[dict[str, Any]] | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _one(self) -> InlineTopology:
        if (self.inline is None) == (self.file is None):
            raise ValueError('Invalid value: give exactly one of "file" or "inline"')
        return self


class Experiment(_Spec):
    name: str
    topology: str | InlineTopology
    kernel: Literal["host", "uml", "auto"] = "host"
    seed: int = Field(0, ge=0, le=2**31 - 1)
    repetitions: int = Field(1, ge=1, le=1000)
    modes: list[ModeName | ModeSpec]
    sweep: SweepSpec = Field(default_factory=SweepSpec)
    background: BackgroundSpec = Field(default_factory=BackgroundSpec)
    measure: list[str] = Field(default_factory=lambda: ["latency", "fairness", "sync"])
    traffic: TrafficSection
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", v) or len(v) > 63:
            raise ValueError(f'Invalid value: "{v}": a lowercase RFC 1123 label must consist of lower case alphanumeric '
                             "characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name')")
        return v

    @field_validator("modes")
    @classmethod
    def _modes(cls, v: list[str | ModeSpec]) -> list[str | ModeSpec]:
        if not v:
            raise ValueError("Required value: at least one mode")
        return v

    @field_validator("measure")
    @classmethod
    def _measure(cls, v: list[str]) -> list[str]:
        for m in v:
            if m not in MEASURES:
                raise ValueError(f'Unsupported value: "{m}": supported values: ' + ", ".join(f'"{x}"' for x in MEASURES))
        return v

    def mode_specs(self) -> list[ModeSpec]:
        return [ModeSpec(mode=m) if isinstance(m, str) else m for m in self.modes]


# --------------------------------------------------------------------------- errors


def _loc_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        p = str(part)
        # union branches (str, ModeSpec, InlineTopology, literal[...], ...) are not fields
        if p in ("str", "int", "float", "none") or "[" in p or p[:1].isupper() or p.startswith("function-"):
            continue
        out += ("." if out else "") + ("from" if p == "sources" else p)
    return out


def _first_error(e: ValidationError, file: str) -> InputError:
    errs = e.errors()

    def rank(err: dict) -> int:
        # of a union's branches, report the one the user meant: a mapping's errors for
        # a mapping, a string's for a string; unknown fields first
        if err["type"] == "extra_forbidden":
            return 0
        given = err.get("input")
        if isinstance(given, dict) and err["type"] in ("string_type", "int_type", "float_type", "list_type"):
            return 3
        if isinstance(given, str) and err["type"] in ("model_type", "model_attributes_type", "dict_type"):
            return 3
        return 1

    errs.sort(key=rank)
    err = errs[0]
    path = _loc_path(err["loc"])
    if err["type"] == "extra_forbidden":
        return InputError(f'unknown field "{path}"', file=file, field=path)
    if err["type"] == "missing":
        return InputError("Required value", file=file, field=path)
    msg = err["msg"]
    ctx = err.get("ctx") or {}
    value = json.dumps(err.get("input"), default=str)
    rules = {
        "greater_than_equal": lambda: f"must be greater than or equal to {ctx.get('ge')}",
        "greater_than": lambda: f"must be greater than {ctx.get('gt')}",
        "less_than_equal": lambda: f"must be less than or equal to {ctx.get('le')}",
        "int_parsing": lambda: "must be an integer", "int_type": lambda: "must be an integer",
        "int_from_float": lambda: "must be an integer",
        "float_parsing": lambda: "must be a number", "float_type": lambda: "must be a number",
        "list_type": lambda: "must be a list", "dict_type": lambda: "must be a mapping",
        "model_type": lambda: "must be a mapping", "model_attributes_type": lambda: "must be a mapping",
        "string_type": lambda: "must be a string", "bool_type": lambda: "must be true or false",
    }
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    elif err["type"] == "literal_error":
        allowed = str(ctx.get("expected", "")).replace(" or ", ", ").replace("'", '"')
        msg = f"Unsupported value: {value}: supported values: {allowed}"
    elif err["type"] in rules:
        msg = f"Invalid value: {value}: {rules[err['type']]()}"
    else:
        msg = f"Invalid value: {value}: {msg}"
    return InputError(msg, file=file, field=path)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of a profile over the experiment: mappings merge, the rest replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# --------------------------------------------------------------------------- loading


@dataclass
class Loaded:
    """A validated experiment, ready to expand: the spec (profile applied), its file,
    the topology file it uses and the cluster model (admitted, not yet up)."""

    spec: Experiment
    file: str
    profile: str | None
    topology_file: str
    cluster: Any  # testbed.model.Cluster
    raw: dict[str, Any]  # the experiment document after the profile overlay
    text: str  # the experiment file as read


def read(file: str) -> tuple[dict[str, Any], str]:
    from testbed.topology import load_yaml

    docs, text = load_yaml(file)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise InputError("expected one YAML document: a mapping with name, topology, modes, traffic, ...", file=file)
    return docs[0], text


def load(file: str, profile: str | None = None, kernel: str | None = None, workdir: str | None = None) -> Loaded:
    """Read and validate an experiment file (pure: nothing is created in the kernel).

    ``profile`` selects an overlay from ``profiles:``; ``kernel`` overrides ``kernel:``.
    An inline topology is written to ``workdir/topology.yaml`` (the results folder) so
    it can be read like a file. Raises :class:`InputError` (one line) on bad input.
    """
    from testbed import controlplane, topology

    raw, text = read(file)
    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise InputError(f"Invalid value: {json.dumps(profiles, default=str)}: must be a mapping of profile names to overlays",
                         file=file, field="profiles")
    for pname, overlay in profiles.items():
        if not isinstance(overlay, dict):
            raise InputError(f"Invalid value: {json.dumps(overlay, default=str)}: a profile is a mapping merged over the experiment",
                             file=file, field=f"profiles.{pname}")
        if "profiles" in overlay or "name" in overlay:
            bad = "profiles" if "profiles" in overlay else "name"
            raise InputError(f'Forbidden: a profile cannot set "{bad}"', file=file, field=f"profiles.{pname}.{bad}")
    # the file itself first, then every profile must give a valid experiment, whichever is chosen now
    try:
        Experiment.model_validate(raw)
    except ValidationError as e:
        raise _first_error(e, file) from None
    for pname in profiles:
        try:
            Experiment.model_validate(_merge(raw, profiles[pname]))
        except ValidationError as e:
            err = _first_error(e, file)
            raise InputError(f"{err.detail} (with profile {pname})", file=file,
                             field=f"profiles.{pname}.{err.field}" if err.field else f"profiles.{pname}") from None
    if profile is not None:
        if profile not in profiles:
            known = ", ".join(f'"{p}"' for p in profiles) or "none defined"
            raise InputError(f'Unsupported value: "{profile}": profiles in this file: {known}', file=file, field="--profile")
        raw = _merge(raw, profiles[profile])
    if kernel is not None:
        if kernel not in ("host", "uml", "auto"):
            raise InputError(f'Unsupported value: "{kernel}": supported values: "host", "uml", "auto"', field="--kernel")
        raw = dict(raw, kernel=kernel)
    try:
        spec = Experiment.model_validate(raw)
    except ValidationError as e:
        raise _first_error(e, file) from None

    base = Path(file).resolve().parent
    if isinstance(spec.topology, str) or spec.topology.file is not None:
        rel = spec.topology if isinstance(spec.topology, str) else spec.topology.file
        topo_file = str(Path(rel) if os.path.isabs(rel) else (base / rel))
        if not Path(topo_file).is_file():
            raise InputError(f'Invalid value: "{rel}": no such file (relative to the experiment file)', file=file, field="topology")
    else:
        if workdir is None:
            import tempfile

            workdir = tempfile.mkdtemp(prefix="testbed-exp-")
        Path(workdir).mkdir(parents=True, exist_ok=True)
        topo_file = str(Path(workdir) / "topology.yaml")
        Path(topo_file).write_text(yaml.safe_dump_all(spec.topology.inline, sort_keys=False))
    cluster = topology.load(topo_file)
    cluster.extra["seed"] = spec.seed
    with contextlib.suppress(ImportError):  # as `testbed up` does: kube-system/coredns at the third Service IP
        from testbed import dns

        dns.add_system_objects(cluster)
    controlplane.admit_all(cluster, file=topo_file)
    _check_against_cluster(spec, cluster, file)
    return Loaded(spec=spec, file=str(file), profile=profile, topology_file=topo_file, cluster=cluster, raw=raw, text=text)


def _service(cluster, ref: str) -> dict[str, Any] | None:  # noqa: ANN001
    ns, _, name = ref.rpartition("/")
    ns = ns or "default"
    for s in cluster.services:
        if (s["metadata"].get("namespace") or "default") == ns and s["metadata"]["name"] == name:
            return s
    return None


def _service_port(svc: dict[str, Any], port: int | str | None, protocol: str) -> dict[str, Any] | None:
    want = "UDP" if protocol == "udp" else "TCP"
    for p in (svc.get("spec") or {}).get("ports") or []:
        if p.get("protocol", "TCP") != want:
            continue
        if port is None or p.get("port") == port or p.get("name") == port:
            return p
    return None


def _sources(cluster, entries: list[str]) -> list[tuple[str, str, str, str]]:  # noqa: ANN001
    """``(name, netns, ip, node)`` of each source entry: a client, a node, a pod
    (NAME or NAMESPACE/NAME) or every pod matching a label selector ``k=v[,k=v]``.
    Raises KeyError(entry) for an entry that names nothing."""
    out: list[tuple[str, str, str, str]] = []
    for entry in entries:
        if "=" in entry:
            sel = dict(kv.split("=", 1) for kv in entry.split(","))
            hits = [p for p in cluster.pods if all(p.labels.get(k) == v for k, v in sel.items())]
            if not hits:
                raise KeyError(entry)
            out += [(p.key, p.netns, p.ip, p.node) for p in hits]
            continue
        hits = [(c.name, c.netns, c.ip, "") for c in cluster.clients if c.name == entry]
        hits += [(n.name, n.netns, n.ip, n.name) for n in cluster.nodes if n.name == entry]
        hits += [(p.key, p.netns, p.ip, p.node) for p in cluster.pods if entry in (p.key, p.name)]
        if len(hits) != 1:
            raise KeyError(entry)
        out.append(hits[0])
    seen: set[str] = set()
    return [s for s in out if not (s[0] in seen or seen.add(s[0]))]


def _check_against_cluster(spec: Experiment, cluster, file: str) -> None:  # noqa: ANN001
    """What only the topology can tell: targets name real Services reachable the way
    asked, sources exist, the background fits and sorts before every target."""
    from testbed import synthetic

    bg = spec.background.namespace
    for i, t in enumerate(spec.traffic.targets):
        f = f"traffic.targets[{i}]"
        svc = _service(cluster, t.service)
        if svc is None:
            raise InputError(f'Not found: "{t.service}": no Service of that name in the topology', file=file, field=f"{f}.service")
        ns = svc["metadata"].get("namespace") or "default"
        spec_ = svc.get("spec") or {}
        proto = _effective(spec, t)["protocol"]
        port = _service_port(svc, t.port, proto)
        if port is None:
            raise InputError(f"Not found: the Service has no {'UDP' if proto == 'udp' else 'TCP'} port"
                             + (f" {t.port!r}" if t.port is not None else "") + f" for protocol {proto}", file=file, field=f"{f}.port")
        if spec_.get("clusterIP") in (None, "", "None"):
            raise InputError(f'Invalid value: "{t.service}": headless and ExternalName Services get no kube-proxy rules',
                             file=file, field=f"{f}.service")
        if t.via == "nodePort" and not port.get("nodePort"):
            raise InputError(f'Invalid value: "nodePort": Service {t.service} has type {spec_.get("type", "ClusterIP")} (no nodePort)',
                             file=file, field=f"{f}.via")
        if t.via == "loadBalancer" and spec_.get("type") != "LoadBalancer":
            raise InputError(f'Invalid value: "loadBalancer": Service {t.service} has type {spec_.get("type", "ClusterIP")}',
                             file=file, field=f"{f}.via")
        if t.via == "loadBalancer" and not ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress"):
            raise InputError(f"Invalid value: \"loadBalancer\": Service {t.service} got no LoadBalancer IP (no loadBalancerPools in the topology?)",
                             file=file, field=f"{f}.via")
        if t.node is not None:
            if t.via != "nodePort":
                raise InputError(f'Invalid value: "{t.node}": node applies to via: nodePort', file=file, field=f"{f}.node")
            if t.node != "all" and t.node not in [n.name for n in cluster.nodes]:
                raise InputError(f'Not found: "{t.node}": no node of that name (or "all")', file=file, field=f"{f}.node")
        try:
            _sources(cluster, t.sources)
        except KeyError as e:
            raise InputError(f'Not found: "{e.args[0]}": no client, node or pod of that name (or pods matching it)',
                             file=file, field=f"{f}.from") from None
        if bg >= ns and spec.sweep.services != [0]:
            raise InputError(
                f'Invalid value: "{bg}": must sort before the namespace of every target ("{ns}", {t.service}) so the probed '
                "Service is last in kube-proxy's dispatch order", file=file, field="background.namespace")
        if "affinity" in _measures(spec, t) and spec_.get("sessionAffinity") != "ClientIP":
            raise InputError(f"Invalid value: \"affinity\": Service {t.service} has no sessionAffinity: ClientIP",
                             file=file, field=f"{f}.measure")
        eff = _effective(spec, t)
        if eff["requests"] is None and eff["duration"] is None:
            raise InputError("Required value: requests or duration (here or under traffic)", file=file, field=f"{f}.requests")
        if eff["protocol"] == "tcp" and eff["connection"] != "new":
            raise InputError('Invalid value: "keepalive": protocol tcp measures connections (always new)', file=file, field=f"{f}.connection")
    cap = synthetic.service_capacity(cluster.network.service_cidr, [s["spec"].get("clusterIP") for s in cluster.services
                                                                   if s["spec"].get("clusterIP") not in (None, "None")])
    most = max(spec.sweep.services) + 1  # +1: the "add one Service" measurement
    if most > cap:
        raise InputError(f"Invalid value: {most - 1}: the topology's kubeServiceAddresses ({cluster.network.service_cidr}) "
                         f"has room for {cap} background Services", file=file, field="sweep.services")


def _effective(spec: Experiment, t: TargetSpec) -> dict[str, Any]:
    out = dict(TRAFFIC_DEFAULTS)
    for src in (spec.traffic, t):
        for k in TRAFFIC_DEFAULTS:
            v = getattr(src, k)
            if v is not None:
                out[k] = v
    return out


def _measures(spec: Experiment, t: TargetSpec) -> list[str]:
    return list(t.measure) if t.measure is not None else [m for m in spec.measure if m != "sync"]


# --------------------------------------------------------------------------- trials


@dataclass(frozen=True)
class Variant:
    """One kube-proxy configuration: mode, iptables backend, IPVS scheduler."""

    mode: str
    backend: str | None  # None: chosen for the kernel at run time
    scheduler: str  # "" unless ipvs

    @property
    def key(self) -> str:
        parts = [self.mode]
        if self.mode in ("iptables", "ipvs") and self.backend:
            parts.append(self.backend)
        if self.scheduler:
            parts.append(self.scheduler)
        return "-".join(parts)

    def label(self, backend: str | None = None) -> str:
        b = backend or self.backend
        if self.mode == "iptables":
            return f"iptables ({b})" if b else "iptables"
        if self.mode == "ipvs":
            return f"ipvs {self.scheduler}"
        return "nftables"


@dataclass(frozen=True)
class Trial:
    variant: Variant
    endpoints: int
    services: int
    rep: int

    @property
    def id(self) -> str:
        return f"{self.variant.key}-e{self.endpoints}-s{self.services}-r{self.rep}"


def variants(spec: Experiment) -> list[Variant]:
    out: list[Variant] = []
    for m in spec.mode_specs():
        if m.mode == "ipvs":
            scheds = spec.sweep.scheduler or [m.scheduler or "rr"]
            if m.scheduler and spec.sweep.scheduler:
                scheds = spec.sweep.scheduler
            for s in scheds:
                out.append(Variant("ipvs", m.backend, s))
        else:
            out.append(Variant(m.mode, m.backend, ""))
    seen: set[Variant] = set()
    return [v for v in out if not (v in seen or seen.add(v))]


def expand(spec: Experiment) -> list[Trial]:
    """The sweep as trials, in the order they run: per variant (one cluster each), per
    endpoints, Services ascending (the background only grows), repetitions innermost."""
    trials = [
        Trial(v, e, n, r)
        for v in variants(spec)
        for e in spec.sweep.endpoints
        for n in sorted(spec.sweep.services)
        for r in range(spec.repetitions)
    ]
    if len(trials) > MAX_TRIALS:
        raise InputError(f"Invalid value: {len(trials)} trials: at most {MAX_TRIALS} (fewer modes, sizes or repetitions)", field="sweep")
    return trials


# --------------------------------------------------------------------------- the machine


def _cmd(argv: list[str], timeout: float = 5.0) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (FileNotFoundError, subprocess.TimeoutExpired, PermissionError):
        return ""
    return (r.stdout or r.stderr).strip()


def kernel_runtime() -> str:
    """``uml`` inside the User-Mode Linux guest, else ``host``."""
    env = os.environ.get(KERNEL_RUNTIME_ENV)
    if env in ("host", "uml"):
        return env
    if os.environ.get("TESTBED_GUEST") == "1":  # set by testbed.guest for every guest command
        return "uml"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return "uml" if re.search(r"^(model name|vendor_id)\s*:\s*(UML|User Mode Linux)", cpuinfo, re.M) or "uml" in platform.release() else "host"


_DMI_VIRT = (  # systemd's dmi_vendor_table (src/basic/virt.c), by product_name / sys_vendor
    ("KVM", "kvm"), ("OpenStack", "kvm"), ("KubeVirt", "kvm"), ("Amazon EC2", "amazon"), ("QEMU", "qemu"),
    ("VMware", "vmware"), ("VMW", "vmware"), ("innotek GmbH", "oracle"), ("VirtualBox", "oracle"), ("Oracle Corporation", "oracle"),
    ("Xen", "xen"), ("Bochs", "bochs"), ("Parallels", "parallels"), ("BHYVE", "bhyve"), ("Hyper-V", "microsoft"),
    ("Apple Virtualization", "apple"), ("Google Compute Engine", "google"),
)


def virtualization() -> str:
    """``systemd-detect-virt``'s answer; without it, the DMI product/vendor names the
    way systemd maps them; ``none`` on bare metal."""
    if shutil.which("systemd-detect-virt"):
        r = subprocess.run(["systemd-detect-virt"], capture_output=True, text=True, timeout=5)
        out = r.stdout.strip()
        if out:
            return out
    for f in ("product_name", "sys_vendor", "board_vendor", "bios_vendor"):
        try:
            text = Path(f"/sys/class/dmi/id/{f}").read_text().strip()
        except OSError:
            continue
        for needle, name in _DMI_VIRT:
            if text.startswith(needle):
                return name
    if kernel_runtime() == "uml":
        return "uml"
    try:
        if re.search(r"^flags\s*:.*\bhypervisor\b", Path("/proc/cpuinfo").read_text(), re.M):
            return "vm-other"
    except OSError:
        pass
    return "none"


def _distro() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def _git(root: Path) -> dict[str, Any]:
    if not (root / ".git").exists() or not shutil.which("git"):
        return {"commit": None, "dirty": None}
    commit = _cmd(["git", "-C", str(root), "rev-parse", "HEAD"]) or None
    # untracked files count: a new module not yet committed changes what ran
    status = _cmd(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=normal"])
    return {"commit": commit, "dirty": bool(status)}


def provisioned_by(env_file: str = "/etc/testbed.env") -> str | None:
    """``vagrant`` on the project's Vagrant VM: its provisioner writes
    ``TESTBED_MACHINE=vagrant`` into ``/etc/testbed.env``; None elsewhere."""
    try:
        text = Path(env_file).read_text()
    except OSError:
        return None
    m = re.search(r"^TESTBED_MACHINE=(\S+)$", text, re.M)
    return m.group(1) if m else None


def manifest_info() -> dict[str, Any]:
    """Where and with what a run happened (``manifest.json``'s machine part)."""
    from importlib import metadata

    u = platform.uname()
    tools = {
        "iptables": _cmd(["iptables", "--version"]),
        "iptables-legacy": _cmd(["iptables-legacy", "--version"]),
        "iptables-nft": _cmd(["iptables-nft", "--version"]),
        "nft": _cmd(["nft", "--version"]),
        "ipvsadm": _cmd(["ipvsadm", "--version"]),
        "ipset": _cmd(["ipset", "--version"]),
        "conntrack": _cmd(["conntrack", "--version"]),
    }
    pkgs = {}
    for p in ("testbed", "pyroute2", "pydantic", "numpy", "pandas", "pyarrow", "scipy", "matplotlib", "rich", "PyYAML", "Markdown"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            pkgs[p] = metadata.version(p)
    return {
        "kernel": {"release": u.release, "runtime": kernel_runtime(), "uname": " ".join(u), "version": u.version},
        "machine": {"virtualization": virtualization(), "provisioned_by": provisioned_by(), "cpus": os.cpu_count(),
                    "arch": u.machine, "hostname": u.node},
        "distro": _distro(),
        "tools": tools,
        "python": sys.version.split()[0],
        "packages": pkgs,
        "git": _git(Path(__file__).resolve().parent.parent),
    }


def capabilities() -> dict[str, Any]:
    """What the running kernel can do for each mode (``testbed doctor``'s probes)."""
    from testbed import doctor

    rep = doctor.run()
    modes = rep["proxy_modes"]
    return {
        "backends": modes["iptables"].get("backends", []),
        "modes": {m: {"ok": modes[m]["status"] == "ok", "detail": modes[m]["detail"]} for m in MODES},
        "guest": rep["guest_kernel"],
    }


def _proxier_available(mode: str) -> str | None:
    mod = {"ipvs": "testbed.kubeproxy_ipvs", "nftables": "testbed.kubeproxy_nftables"}.get(mode)
    if mod is None:
        return None
    import importlib.util

    if importlib.util.find_spec(mod) is None:
        return f"{mod} is not in this version of testbed"
    return None


def resolve_variant(v: Variant, caps: dict[str, Any], runtime: str) -> tuple[str | None, str | None]:
    """``(backend, None)`` when this kernel can run ``v``, else ``(None, reason)``."""
    mc = caps["modes"][v.mode]
    if not mc["ok"]:
        return None, f"{v.mode} cannot run on this kernel ({runtime}: {mc['detail']})"
    why = _proxier_available(v.mode)
    if why:
        return None, why
    if v.mode == "nftables":
        return None, None
    backends = caps["backends"]
    if v.backend is None:
        return ("nft" if "nft" in backends else backends[0]) if backends else None, None if backends else "no iptables backend works here"
    if v.backend not in backends:
        return None, f"iptables backend {v.backend} does not work on this kernel ({runtime}; works: {', '.join(backends) or 'none'})"
    return v.backend, None


# --------------------------------------------------------------------------- results folder


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def journal(dir_: Path) -> list[dict[str, Any]]:
    """The finished trials (``trials.jsonl``), in the order they finished."""
    p = dir_ / "trials.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if line.strip():
                out.append(json.loads(line))
    return out


def _append_journal(dir_: Path, entry: dict[str, Any]) -> None:
    with open(dir_ / "trials.jsonl", "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- one trial


@dataclass
class Probe:
    """One traffic pass of a trial: a target reached one way (an entry node for
    per-node NodePort), asking one question."""

    target: str
    via: str
    entry: str
    ask: str
    ip: str
    port: int
    host_name: str | None
    sources: list[tuple[str, str, str, str]]
    settings: dict[str, Any]
    expected: list[str]  # backends (pod names) the Service should spread over
    service: str
    measures: list[str]


def probes(spec: Experiment, cluster) -> list[Probe]:  # noqa: ANN001
    """The traffic passes of one trial, from the live cluster's Services."""
    from testbed import endpointslices

    out: list[Probe] = []
    slices_of = endpointslices.by_service(cluster.endpointslices)  # once for every target
    for t in spec.traffic.targets:
        svc = _service(cluster, t.service)
        assert svc is not None
        s = svc["spec"]
        eff = _effective(spec, t)
        port = _service_port(svc, t.port, eff["protocol"])
        assert port is not None
        sources = _sources(cluster, t.sources)
        measures = _measures(spec, t)
        ns = svc["metadata"].get("namespace") or "default"
        name = svc["metadata"]["name"]
        slices = slices_of.get((ns, name), [])
        eps = _ready_endpoints(slices)
        entries: list[tuple[str, str, int, str | None]] = []
        if t.via == "clusterIP":
            entries.append(("all", s["clusterIP"], port["port"], None))
        elif t.via == "dns":
            entries.append(("all", s["clusterIP"], port["port"], f"{name}.{ns}.svc.cluster.local"))
        elif t.via == "loadBalancer":
            ip = svc["status"]["loadBalancer"]["ingress"][0]["ip"]
            entries.append(("all", ip, port["port"], None))
        elif t.via == "pod":
            direct = _pod_endpoint(slices, port)
            if direct is None:  # no ready endpoint: run_trial records the probe as skipped
                entries.append(("all", "", 0, None))
            else:
                eps = [(direct[0], "")]
                entries.append(("all", direct[1], direct[2], None))
        else:
            nodes = [n for n in cluster.nodes] if t.node == "all" else [cluster.node(t.node or cluster.nodes[0].name)]
            entries += [(n.name if t.node == "all" else "all", n.ip, port["nodePort"], None) for n in nodes]
        local = s.get("externalTrafficPolicy") == "Local" and t.via in ("nodePort", "loadBalancer")
        for entry, ip, pnum, host in entries:
            expected = sorted(p for p, node in eps if not local or entry == "all" or node == entry)
            asks = ["hostname"] + (["clientip"] if "source_ip" in measures else [])
            for ask in asks:
                settings = dict(eff)
                if ask == "clientip":  # the second pass only checks addresses: keep it short
                    settings["requests"] = min(settings["requests"] or 200, 200)
                    settings["duration"] = None if settings["requests"] else settings["duration"]
                    settings["warmup"] = 0
                out.append(Probe(t.name, t.via, entry, ask, ip, int(pnum), host, sources, settings, expected, f"{ns}/{name}", measures))
    return out


def _ready_endpoints(slices: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(pod, node) of every ready endpoint of one Service's EndpointSlices."""
    from testbed import endpointslices

    out = set()
    for _sl, ep in endpointslices.ready_endpoints(slices):
        ref = (ep.get("targetRef") or {}).get("name") or (ep.get("addresses") or [""])[0]
        out.add((ref, ep.get("nodeName") or ""))
    return sorted(out)


def _pod_endpoint(slices: list[dict[str, Any]], port: dict[str, Any]) -> tuple[str, str, int] | None:
    """(pod, IP, port) of the Service port's first ready endpoint (by pod name), from the
    Service's EndpointSlices: where ``via: pod`` sends."""
    from testbed import endpointslices

    found = []
    for sl in slices:
        sport = next((p for p in sl.get("ports") or [] if (p.get("name") or "") == (port.get("name") or "")
                      and (p.get("protocol") or "TCP") == (port.get("protocol") or "TCP")), None)
        if sport is None or not sport.get("port"):
            continue
        for _sl, ep in endpointslices.ready_endpoints([sl]):
            if ep.get("addresses"):
                ref = (ep.get("targetRef") or {}).get("name") or ep["addresses"][0]
                found.append((ref, ep["addresses"][0], int(sport["port"])))
    return min(found) if found else None


def _share(total: int | None, parts: int, i: int) -> int | None:
    """Part ``i`` of ``total`` requests split evenly over ``parts`` (the first ones get
    the remainder)."""
    if total is None:
        return None
    return total // parts + (1 if i < total % parts else 0)


def _sync_rows(results: list, op: str, t0: float) -> list[dict[str, Any]]:
    rows = []
    wall = time.perf_counter() - t0
    for r in results:
        d = dict(r.__dict__) if hasattr(r, "__dict__") else asdict(r)
        d = {k: v for k, v in d.items() if isinstance(v, int | float | str | bool) or v is None}
        d["op"] = op
        d["wall_s"] = wall
        rows.append(d)
    return rows


def set_background(cluster, n: int, endpoints: int, spec: Experiment) -> bool:  # noqa: ANN001
    """Make the cluster hold exactly ``n`` synthetic Services with ``endpoints`` each;
    returns whether anything changed."""
    from testbed import synthetic

    cur = synthetic.background_count(cluster)
    have_eps = cluster.extra.get("backgroundEndpoints")
    changed = False
    if have_eps is not None and have_eps != endpoints and cur:
        synthetic.remove(cluster, 0)
        cur, changed = 0, True
    if cur > n:
        synthetic.remove(cluster, n)
        changed = True
    elif cur < n:
        synthetic.admit(cluster, synthetic.for_cluster(cluster, n - cur, endpoints, seed=spec.seed, start=cur,
                                                       namespace=spec.background.namespace, addresses=spec.background.addresses))
        changed = True
    cluster.extra["backgroundEndpoints"] = endpoints
    return changed


def run_trial(trial: Trial, spec: Experiment, cluster, backend: str | None, runtime: str, dir_: Path) -> dict[str, Any]:  # noqa: ANN001
    """One trial on a live cluster; writes its raw rows; returns its journal entry."""
    import pandas as pd

    from testbed import lifecycle, synthetic, traffic

    t0 = time.perf_counter()
    if set_background(cluster, trial.services, trial.endpoints, spec):
        lifecycle.sync_proxies(cluster)  # bring kube-proxy to this size (not measured)
    scale_s = time.perf_counter() - t0
    common = {
        "trial": trial.id, "variant": trial.variant.label(backend), "mode": trial.variant.mode, "proxy_backend": backend or "",
        "scheduler": trial.variant.scheduler, "kernel": runtime, "services": trial.services,
        "services_total": len(cluster.services), "endpoints": trial.endpoints, "rep": trial.rep,
    }
    sync_rows: list[dict[str, Any]] = []
    if "sync" in spec.measure:
        t = time.perf_counter()
        # each node's kube-proxy timed alone, as on a node with its own CPUs
        sync_rows += _sync_rows(lifecycle.sync_proxies(cluster, full=True, parallel=False), "full", t)
        extra = synthetic.for_cluster(cluster, 1, max(trial.endpoints, 1), seed=spec.seed, start=trial.services,
                                      namespace=spec.background.namespace, addresses=spec.background.addresses)
        synthetic.admit(cluster, extra)
        t = time.perf_counter()
        sync_rows += _sync_rows(lifecycle.sync_proxies(cluster, parallel=False), "add_one", t)
        synthetic.remove(cluster, trial.services)
        t = time.perf_counter()
        sync_rows += _sync_rows(lifecycle.sync_proxies(cluster, parallel=False), "delete_one", t)
    for node in cluster.nodes:
        traffic.flush_conntrack(node.netns)
    frames = []
    load_before = traffic.host_load()
    skipped: list[str] = []
    for k, pr in enumerate(probes(spec, cluster)):
        pos, total = synthetic.dispatch_position(cluster, *pr.service.split("/", 1))
        s = pr.settings
        if pr.via == "pod" and not pr.ip:
            skipped.append(f"{pr.target}: Service {pr.service} has no ready endpoint to send to")
            continue
        sources = [traffic.Source(name, ns) for name, ns, _ip, _node in pr.sources]
        # Probes straight to a pod and probes through a Service use disjoint source
        # ports, so IPVS's entries of one never catch the other's replies.
        for src in sources:
            traffic.set_source_ports(src.netns, traffic.DIRECT_PORTS if pr.via == "pod" else traffic.SERVICE_PORTS)
        target = traffic.Target(pr.ip, pr.port, protocol=s["protocol"], path=f"/{pr.ask}", host_name=pr.host_name)
        seed = spec.seed * 1000 + trial.rep * 100 + k
        try:
            n = len(sources)
            if s["source_order"] == "sequential" and n > 1:  # (sources, requests, duration, slots, warmup, seed)
                runs = [([src], _share(s["requests"], n, i), s["duration"] / n if s["duration"] else None, s["concurrency"],
                         -(-s["warmup"] // n), seed * 100 + i) for i, src in enumerate(sources)]
            else:
                runs = [(sources, s["requests"], s["duration"], s["concurrency"] * n, s["warmup"], seed)]
            parts = []
            for i, (srcs, requests, duration, slots, warmup, run_seed) in enumerate(runs):
                if requests == 0:
                    continue  # fewer requests than sources
                part = traffic.run(srcs, target, connection=s["connection"], requests=requests, duration=duration,
                                   concurrency=slots, rate=s["rate"], warmup=warmup, timeout=s["timeout"], seed=run_seed,
                                   ask=pr.ask)
                if len(runs) > 1:  # one numbering over the target's passes: worker slots as in parallel order
                    w = part["worker"]
                    part = part.assign(worker=w.where(w < 0, w * n + i))
                parts.append(part)
            df = parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
        except InputError as e:  # e.g. no DNS in this cluster: the probe is skipped, the reason kept
            skipped.append(f"{pr.target}: {e}")
            continue
        src_ip = {name: ip for name, _ns, ip, _node in pr.sources}
        src_node = {name: node for name, _ns, _ip, node in pr.sources}
        df = df.assign(
            client=df["client"].astype(str), backend=df["backend"].astype(str), error=df["error"].astype(str),
            source_seen=df["source_seen"].astype(str),
            client_ip=df["client"].astype(str).map(src_ip), client_node=df["client"].astype(str).map(src_node),
            target=pr.target, via=pr.via, entry=pr.entry, ask=pr.ask, service=pr.service,
            protocol=s["protocol"], connection=s["connection"], dst=f"{pr.ip}:{pr.port}",
            expected_backends=",".join(pr.expected), dispatch_position=pos, dispatch_total=total,
            measures=",".join(pr.measures),
        )
        frames.append(df)
    load_after = traffic.host_load()
    trials_dir = dir_ / "trials"
    trials_dir.mkdir(exist_ok=True)
    samples = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    for k, v in common.items():
        samples[k] = v
    _write_parquet(samples, trials_dir / f"{trial.id}.samples.parquet")
    syncs = pd.DataFrame(sync_rows)
    for k, v in common.items():
        syncs[k] = v
    _write_parquet(syncs, trials_dir / f"{trial.id}.sync.parquet")
    return {"trial": trial.id, **common, "finished": _now(), "scale_s": scale_s, "rows": len(samples),
            "skipped_probes": skipped, "host_load_before": load_before, "host_load_after": load_after}


def _write_parquet(df, path: Path) -> None:  # noqa: ANN001
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the run


class _Bar:
    """rich progress: trials done / total with ETA (on a terminal); a line per trial
    otherwise."""

    def __init__(self, console, total: int, done: int, title: str):  # noqa: ANN001
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = console
        self.live = console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("trials"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False, disable=not self.live,
        )
        self.task = self.progress.add_task(title, total=total, completed=done)

    def __enter__(self) -> _Bar:
        self.progress.__enter__()
        return self

    def __exit__(self, *a) -> None:  # noqa: ANN002
        self.progress.__exit__(*a)

    def status(self, text: str) -> None:
        self.progress.update(self.task, description=text)

    def advance(self, line: str) -> None:
        self.progress.advance(self.task)
        if self.live:
            self.progress.console.print(line, highlight=False)
        else:
            self.console.print(line, highlight=False)


def default_out(name: str) -> Path:
    return Path("results") / name / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main_run(file: str | None, *, profile: str | None, kernel: str | None, out: str | None, resume: str | None, console,  # noqa: ANN001
                      guest_child: bool = False) -> int:
    """``testbed run FILE [--profile P] [--kernel K] [--out DIR] [--resume DIR]``.

    Returns the exit status: 0 done, 130 interrupted (finished trials kept). Bad input
    raises :class:`InputError` before anything is created."""
    dir_: Path | None = None
    if resume:
        dir_ = Path(resume)
        manifest_path = dir_ / "manifest.json"
        saved = dir_ / "experiment.yaml"
        if not manifest_path.exists() or not saved.exists():
            raise InputError("not a results folder of `testbed run` (no manifest.json / experiment.yaml)", file=str(dir_), field="--resume")
        old = json.loads(manifest_path.read_text())
        if file is not None and _sha256(file) != old["experiment"]["sha256"]:
            raise InputError(f"the experiment file changed since this run started (sha256 {old['experiment']['sha256'][:12]}...); "
                             "start a new run instead", file=file, field="--resume")
        base_file = old["experiment"]["file"]
        loaded = _load_saved(str(saved), old["experiment"].get("profile"), kernel or old["experiment"].get("kernel_requested"), base_file)
    else:
        if file is None:
            raise InputError("Required value: the experiment file (or --resume DIR)", field="FILE")
        base_file = str(file)
        loaded = load(file, profile=profile, kernel=kernel)
    spec = loaded.spec
    trials = expand(spec)
    if os.geteuid() != 0:
        from testbed.errors import NotRootError

        raise NotRootError("`testbed run`")
    if dir_ is None:
        dir_ = Path(out) if out else default_out(spec.name)
        if (dir_ / "manifest.json").exists():
            raise InputError("already holds a run: continue it with --resume, or choose another --out", file=str(dir_), field="--out")
        dir_.mkdir(parents=True, exist_ok=True)
        if not isinstance(spec.topology, str) and spec.topology.inline is not None:
            shutil.copyfile(loaded.topology_file, dir_ / "topology.yaml")
            loaded.topology_file = str(dir_ / "topology.yaml")
    runtime = kernel_runtime()
    chosen, reason = choose_kernel(spec.kernel, spec, runtime)
    if chosen == "uml" and runtime == "host":
        return _run_in_guest(loaded, dir_, console, reason, resume=bool(resume), base_file=base_file)
    return run(loaded, trials, dir_, console, base_file=base_file, kernel_reason=reason, resumed=bool(resume),
               one_variant=guest_child)


def _load_saved(file: str, profile: str | None, kernel: str | None, base_file: str) -> Loaded:
    """Load the copy of the experiment saved in a results folder: relative topology
    paths are resolved against the original file's folder."""
    raw, text = read(file)
    topo = raw.get("topology")
    base = Path(base_file).resolve().parent
    if isinstance(topo, str) and not os.path.isabs(topo):
        raw["topology"] = str(base / topo)
    elif isinstance(topo, dict) and isinstance(topo.get("file"), str) and not os.path.isabs(topo["file"]):
        raw["topology"] = dict(topo, file=str(base / topo["file"]))
    tmp = Path(file).with_name("experiment.resolved.yaml")
    tmp.write_text(yaml.safe_dump(raw, sort_keys=False))
    loaded = load(str(tmp), profile=profile, kernel=kernel, workdir=str(Path(file).parent))
    loaded.text = text
    return loaded


def choose_kernel(requested: str, spec: Experiment, runtime: str) -> tuple[str, str]:
    """Which kernel runs this experiment, and why (said on screen and in the manifest).

    Unlike ``testbed up --kernel auto`` (one cluster, one mode: the kernel must run
    it), an experiment compares modes: ``auto`` takes the host when it can run every
    mode asked, else the guest kernel when it runs modes the host cannot (IPVS here);
    modes the chosen kernel cannot run are skipped there, with the reason recorded."""
    if runtime == "uml":
        return "uml", "running inside the User-Mode Linux guest kernel"
    if requested == "host":
        return "host", "requested (kernel: host)"
    modes = sorted({v.mode for v in variants(spec)})
    try:
        from testbed import guest
    except ImportError:
        guest = None  # type: ignore[assignment]
    if guest is None or not guest.available():
        if requested == "uml":
            raise KernelError("kernel: uml asked, but no guest kernel is installed (Debian package user-mode-linux)")
        return "host", "auto: no guest kernel installed, so the host kernel (modes it lacks are skipped)"
    if requested == "uml":
        return "uml", "requested (kernel: uml)"
    host_lack = {m: v for m in modes if (v := guest._host_lacks(m))}
    if not host_lack:
        return "host", f"auto: the host kernel runs every mode asked ({', '.join(modes)})"
    guest_lack = {m: v for m in modes if (v := guest.guest_lacks(m))}
    if not set(host_lack) - set(guest_lack):
        why = "; ".join(f"{m} needs {', '.join(v)}" for m, v in host_lack.items())
        return "host", f"auto: the host kernel lacks what some modes need ({why}) and the guest kernel does not run more of them"
    why = "; ".join(f"{m} needs {', '.join(v)}" for m, v in host_lack.items())
    gwhy = "; ".join(f"{m} needs {', '.join(v)}" for m, v in guest_lack.items())
    return "uml", (f"auto: the host kernel lacks what {', '.join(host_lack)} mode needs ({why}); the User-Mode Linux guest "
                   f"kernel runs it" + (f" (there {gwhy}: skipped)" if guest_lack else ""))


def _run_in_guest(loaded: Loaded, dir_: Path, console, reason: str, *, resume: bool, base_file: str) -> int:  # noqa: ANN001
    """Re-run this experiment inside the UML guest (``--kernel host`` there), results
    written straight into ``dir_`` through hostfs; the progress bar follows the
    journal the guest writes. Ctrl-C kills the guest (its cluster dies with it): the
    finished trials stay, the report is built from them here, ``--resume`` goes on."""
    import io

    from testbed import guest, report

    spec = loaded.spec
    console.print(f"kernel: User-Mode Linux guest — {reason}", highlight=False)
    dir_ = dir_.resolve()
    argv = [sys.executable, "-m", "testbed.experiment", "run", "--kernel", "host", "--guest-child"]
    if resume:
        argv += ["--resume", str(dir_)]
    else:
        (dir_ / "experiment.yaml").write_text(loaded.text)
        argv += [str(Path(base_file).resolve()), "--out", str(dir_)]
        if loaded.profile:
            argv += ["--profile", loaded.profile]
    total = len(expand(spec))
    stop = threading.Event()
    t0 = time.monotonic()
    from testbed import traffic

    outer_load_before = traffic.host_load()  # the real machine's; the guest records its own 1 CPU

    def watch(bar: _Bar) -> None:
        shown = len(journal(dir_))
        while not stop.wait(1.0):
            done = journal(dir_)
            for e in done[shown:]:
                bar.advance(f"  {e['trial']}: {e.get('rows', 0)} requests (guest kernel)")
            shown = len(done)

    res = None
    out, err = io.BytesIO(), io.BytesIO()
    status = "complete"
    failure: KernelError | None = None
    try:
        with _Bar(console, total, len(journal(dir_)), f"{spec.name} (guest kernel)") as bar:
            th = threading.Thread(target=watch, args=(bar,), daemon=True)
            th.start()
            try:
                # one guest per variant (see run(): one_variant), until every trial is done
                for _ in range(len(variants(spec)) + 1):
                    before = len(journal(dir_))
                    res = guest.run(argv, timeout=GUEST_TIMEOUT, mem=GUEST_MEM, cwd=os.getcwd(),
                                    env={"PYTHONUNBUFFERED": "1", "TESTBED_KERNEL_REQUESTED": spec.kernel},
                                    stream=(out, err))
                    status_inside = json.loads((dir_ / "manifest.json").read_text()).get("status") \
                        if (dir_ / "manifest.json").exists() else None
                    if res.returncode != 0 or status_inside != "incomplete" or len(journal(dir_)) == before:
                        break
                    argv = [*argv[:argv.index("--guest-child") + 1], "--resume", str(dir_)]
            finally:
                stop.set()
                th.join(3)
    except KeyboardInterrupt:
        status = "interrupted"
    except KernelError as e:  # the guest kernel crashed or timed out: keep what finished
        status, failure = "failed", e
    finally:  # what the run inside printed, for the record
        with open(dir_ / "guest.log", "ab") as f:
            f.write(out.getvalue() + b"\n--- stderr ---\n" + err.getvalue())
            if res is not None and res.info.get("console_tail"):
                f.write(b"\n--- guest kernel console ---\n" + res.info["console_tail"].encode())
    manifest_path = dir_ / "manifest.json"
    if manifest_path.exists():
        m = json.loads(manifest_path.read_text())
        m["guest"] = {"kernel_choice": reason, "host_cpu": guest.guest_cpu(),
                      "boot_s": getattr(res, "boot_s", None), "total_s": getattr(res, "total_s", None),
                      "returncode": getattr(res, "returncode", None), "outer_host": manifest_info()["kernel"],
                      "outer_elapsed_s": time.monotonic() - t0,
                      "outer_host_load": {"before": outer_load_before, "after": traffic.host_load()}}
        if res is not None and res.returncode not in (0, 130):
            status = "failed"
        if status != "complete":
            m["status"] = status
        write_json(manifest_path, m)
        if journal(dir_):  # on the host: the guest runs leave the report to us
            report.build(dir_, final=m.get("status") == "complete")
    if failure is not None:
        raise KernelError(f"{failure}; {len(journal(dir_))}/{total} trials kept in {dir_}: continue with "
                          f"`testbed run --resume {dir_}`")
    if status == "interrupted":
        console.print(f"interrupted: the guest kernel was stopped; {len(journal(dir_))}/{total} trials kept in {dir_}; "
                      f"continue with `testbed run --resume {dir_}`", highlight=False)
        return 130
    assert res is not None
    for line in (res.stdout or "").strip().splitlines()[-2:]:
        console.print(line, highlight=False)
    if res.returncode not in (0, 130):
        lines = (res.stderr or res.stdout or "").strip().splitlines()
        why = res.info.get("console_tail") or (lines[-1] if lines else "no output")
        raise KernelError(f"the run inside the guest kernel failed (exit {res.returncode}): {why}")
    return res.returncode


def run(loaded: Loaded, trials: list[Trial], dir_: Path, console, *, base_file: str, kernel_reason: str = "",  # noqa: ANN001
        resumed: bool = False, one_variant: bool = False) -> int:
    """Run every trial not yet journaled in ``dir_`` on this kernel; write the report.

    ``one_variant`` (a run inside the guest kernel): stop after one variant's trials and
    leave the report to the caller, which starts a fresh guest for the next variant.
    The guest kernel backs every page of a guest process with a host mapping, and a
    host process may hold only ``vm.max_map_count`` (65,530) of them: one process
    through the whole full profile (two variants up to 10,000 Services, then pandas)
    ran out of them at its end (the guest kernel's console: ``do_syscall_stub: syscall
    9 failed ... Failed to flush page``; the process was killed)."""
    from testbed import lifecycle, report, traffic

    spec = loaded.spec
    runtime = kernel_runtime()
    caps = capabilities()
    done = {e["trial"] for e in journal(dir_)}
    saved = dir_ / "experiment.yaml"
    if not saved.exists():
        saved.write_text(loaded.text)
    manifest_path = dir_ / "manifest.json"
    manifest: dict[str, Any] = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    # what the user asked (a run inside the guest is started with --kernel host)
    requested = manifest.get("experiment", {}).get("kernel_requested") or os.environ.get("TESTBED_KERNEL_REQUESTED") or spec.kernel
    info = manifest_info()
    variants_info: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    backends: dict[str, str | None] = {}
    for v in variants(spec):
        b, why = resolve_variant(v, caps, runtime)
        if why:
            skipped[v.key] = why
        backends[v.key] = b
        variants_info[v.key] = {"mode": v.mode, "backend": b, "scheduler": v.scheduler, "label": v.label(b), "skipped": why}
    manifest.update({
        "schema": 1,
        "name": spec.name,
        "status": "running",
        "started": manifest.get("started", _now()),
        "experiment": {
            "file": os.path.abspath(base_file), "sha256": hashlib.sha256(loaded.text.encode()).hexdigest(),
            "profile": loaded.profile, "kernel_requested": requested, "seed": spec.seed,
            "topology": loaded.topology_file, "topology_sha256": _sha256(loaded.topology_file),
            "resolved": json.loads(spec.model_dump_json(by_alias=True, exclude={"profiles"})),
        },
        "seed": spec.seed,
        **info,
        "guest_or_host": "guest" if runtime == "uml" else "host",
        # measured syncs: each node's kube-proxy alone, one after another (run_trial); a
        # resumed run whose first trials were timed all at once (older code) is "mixed"
        "sync_nodes": "sequential" if not done or manifest.get("sync_nodes") == "sequential" else "mixed",
        "kernel_choice": kernel_reason,
        "capabilities": caps,
        "variants": variants_info,
        "skipped": skipped,
        "trials": {"total": len(trials), "done": len(done)},
    })
    manifest.setdefault("host_load", {})["before" if not resumed else f"before_resume_{len(done)}"] = traffic.host_load()
    write_json(manifest_path, manifest)

    todo = [t for t in trials if t.id not in done and t.variant.key not in skipped]
    runnable = [t for t in trials if t.variant.key not in skipped]
    console.print(f"experiment {spec.name}: {len(runnable)} trials ({len(todo)} to run) on the {runtime} kernel "
                  f"{info['kernel']['release']}; results in {dir_}", highlight=False)
    console.print(f"  kernel: {kernel_reason}", highlight=False)
    for k, why in skipped.items():
        console.print(f"  skipped {k}: {why}", highlight=False)
    status = "complete"
    cluster_name = None
    t_start = time.monotonic()
    try:
        with _Bar(console, len(runnable), len(runnable) - len(todo), spec.name) as bar:
            for v in variants(spec):
                mine = [t for t in todo if t.variant == v]
                if not mine:
                    continue
                backend = backends[v.key]
                cluster = copy.deepcopy(loaded.cluster)
                cluster.name = cluster_name = f"x{spec.name[:40]}-{secrets.token_hex(3)}"
                cluster.extra["proxy"] = {"mode": v.mode, "backend": backend or "legacy", "scheduler": v.scheduler or "rr"}
                bar.status(f"{v.label(backend)}: cluster up")
                lifecycle.up(cluster)
                try:
                    for trial in mine:
                        bar.status(f"{v.label(backend)}: {trial.services} Services, rep {trial.rep + 1}")
                        entry = run_trial(trial, spec, cluster, backend, runtime, dir_)
                        _append_journal(dir_, entry)
                        bar.advance(f"  {trial.id}: {entry['rows']} requests" + (f" (skipped: {'; '.join(entry['skipped_probes'])})" if entry["skipped_probes"] else ""))
                finally:
                    bar.status(f"{v.label(backend)}: cluster down")
                    lifecycle.down(cluster.name)
                    cluster_name = None
                if one_variant:
                    break
    except KeyboardInterrupt:
        status = "interrupted"
        if cluster_name:
            with contextlib.suppress(BaseException):
                lifecycle.down(cluster_name)
    except BaseException:
        status = "failed"
        raise
    finally:
        finished = journal(dir_)
        manifest = json.loads(manifest_path.read_text())
        all_done = {t.id for t in runnable} <= {e["trial"] for e in finished}
        manifest["status"] = "complete" if status == "complete" and all_done else (status if status != "complete" else "incomplete")
        manifest["finished"] = _now()
        manifest["elapsed_s"] = manifest.get("elapsed_s", 0.0) + (time.monotonic() - t_start)
        manifest["trials"] = {"total": len(runnable), "done": len({e["trial"] for e in finished}), "skipped_variants": len(skipped)}
        manifest.setdefault("host_load", {})["after"] = traffic.host_load()
        write_json(manifest_path, manifest)
        if finished and not one_variant:
            with contextlib.suppress(KeyboardInterrupt):
                report.build(dir_, final=manifest["status"] == "complete")
    if status == "interrupted":
        console.print(f"interrupted: {len(finished)}/{len(runnable)} trials kept in {dir_}; continue with "
                      f"`testbed run --resume {dir_}`", highlight=False)
        return 130
    console.print(f"done: {len(finished)} trials; report: {dir_ / 'report.md'}", highlight=False)
    return 0


# --------------------------------------------------------------------------- __main__ (until cli.py wires it)


def _main(argv: list[str] | None = None) -> int:
    import argparse

    from rich.console import Console

    console = Console(highlight=False, stderr=False)
    err = Console(stderr=True, highlight=False)
    p = argparse.ArgumentParser(prog="python -m testbed.experiment")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("file", nargs="?")
    r.add_argument("--profile")
    r.add_argument("--kernel", choices=["host", "uml", "auto"])
    r.add_argument("--resume", metavar="DIR")
    r.add_argument("--out", metavar="DIR")
    r.add_argument("--guest-child", action="store_true", help=argparse.SUPPRESS)
    rp = sub.add_parser("report")
    rp.add_argument("dir")
    a = p.parse_args(argv)
    try:
        if a.cmd == "report":
            from testbed import report

            return report.main_report(a.dir, console)
        return main_run(a.file, profile=a.profile, kernel=a.kernel, out=a.out, resume=a.resume, console=console,
                        guest_child=a.guest_child)
    except TestbedError as e:
        err.print(f"error: {e}", markup=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(_main())
