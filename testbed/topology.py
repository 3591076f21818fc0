"""Topology files: a validated description of a cluster, turned (purely) into a
:class:`testbed.model.Cluster`.

A topology file is a multi-document YAML file. Its first document is the
``Topology``; every further document is a real Kubernetes manifest (Deployment,
StatefulSet, DaemonSet, Pod, Service, EndpointSlice) exactly as ``kubectl`` reads it.
``spec.manifests`` may name more manifest files or folders, relative to the file::

    apiVersion: testbed.io/v1alpha1
    kind: Topology
    metadata: {name: seed}
    spec:
      nodes: 3                      # or [{name: node1, labels: {...}}, ...]
      clients: 1                    # hosts outside the cluster, on the node network
      network:                      # kubespray's defaults
        nodeSubnet: 192.168.56.0/24
        kubeServiceAddresses: 10.233.0.0/18
        kubePodsSubnet: 10.233.64.0/18
        kubeNetworkNodePrefix: 24
      loadBalancerPools:            # MetalLB IPAddressPool style
        - {name: default, addresses: [192.168.56.240/28]}
    ---
    apiVersion: apps/v1
    kind: Deployment
    ...

Replicas are spread over the eligible nodes (``nodeName``, ``nodeSelector``) the way
the default scheduler's spreading does on empty nodes: each pod goes to the eligible
node with the fewest pods, ties broken by node order.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from testbed.errors import InputError
from testbed.model import Client, Cluster, Network, Node

API_VERSION = "testbed.io/v1alpha1"

# kube-apiserver / apimachinery wording (k8s.io/apimachinery/pkg/util/validation).
DNS1123_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
    "and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', "
    "regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
DNS1123_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1123_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
    "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
    "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)

# Offsets of the first node / client address in the node subnet (node1 = .11, client1 = .201).
NODE_IP_OFFSET = 10
CLIENT_IP_OFFSET = 200



def _dns_label(v: str) -> str:
    if len(v) > 63:
        raise ValueError(f'Invalid value: "{v}": must be no more than 63 characters')
    if not DNS1123_LABEL_RE.match(v):
        raise ValueError(f'Invalid value: "{v}": {DNS1123_LABEL_MSG}')
    return v


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class NodeSpec(_Spec):
    name: str
    ip: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    _name = field_validator("name")(_dns_label)


class ClientSpec(_Spec):
    name: str
    ip: str | None = None

    _name = field_validator("name")(_dns_label)


class NetworkSpec(_Spec):
    node_subnet: str = Field("192.168.56.0/24", alias="nodeSubnet")
    kube_service_addresses: str = Field("10.233.0.0/18", alias="kubeServiceAddresses")
    kube_pods_subnet: str = Field("10.233.64.0/18", alias="kubePodsSubnet")
    kube_network_node_prefix: int = Field(24, alias="kubeNetworkNodePrefix")

    @field_validator("node_subnet", "kube_service_addresses", "kube_pods_subnet")
    @classmethod
    def _cidr(cls, v: str) -> str:
        try:
            net = ipaddress.ip_network(v, strict=True)
        except ValueError:
            raise ValueError(f'Invalid value: "{v}": must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)') from None
        if net.version != 4:
            raise ValueError(f'Invalid value: "{v}": only IPv4 is supported')
        return v


class PoolSpec(_Spec):
    name: str
    addresses: list[str]

    _name = field_validator("name")(_dns_label)


class TopologySpecBody(_Spec):
    nodes: int | list[NodeSpec] = 3
    clients: int | list[ClientSpec] = 1
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    load_balancer_pools: list[PoolSpec] = Field(default_factory=list, alias="loadBalancerPools")
    manifests: list[str] = Field(default_factory=list)


class Metadata(_Spec):
    name: str
    _name = field_validator("name")(_dns_label)


class TopologyDoc(_Spec):
    api_version: str = Field(API_VERSION, alias="apiVersion")
    kind: str = "Topology"
    metadata: Metadata
    spec: TopologySpecBody = Field(default_factory=TopologySpecBody)


# --------------------------------------------------------------------------- loading


def _pydantic_path(loc: tuple[Any, ...], aliases: dict[str, str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # union branches show up as 'int' / 'list[NodeSpec]' in loc: skip them
            if part in ("int", "str") or "[" in str(part) or str(part)[:1].isupper():
                continue
            out += ("." if out else "") + aliases.get(part, part)
    return out


_ALIASES = {
    "node_subnet": "nodeSubnet",
    "kube_service_addresses": "kubeServiceAddresses",
    "kube_pods_subnet": "kubePodsSubnet",
    "kube_network_node_prefix": "kubeNetworkNodePrefix",
    "load_balancer_pools": "loadBalancerPools",
    "api_version": "apiVersion",
}


def _first_error(e: ValidationError, file: str) -> InputError:
    errs = e.errors()
    # With `int | list[...]` unions pydantic reports one error per branch; the
    # list branch is the informative one when the user wrote a list.
    errs.sort(key=lambda err: 0 if any(isinstance(p, int) for p in err["loc"]) or err["type"] == "extra_forbidden" else 1)
    err = errs[0]
    path = _pydantic_path(err["loc"], _ALIASES)
    if err["type"] == "extra_forbidden":
        return InputError(f'unknown field "{path}"', file=file, field=path)
    if err["type"] == "missing":
        return InputError("Required value", file=file, field=path)
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    else:
        msg = f"Invalid value: {json.dumps(err.get('input'), default=str)}: {msg}"
    return InputError(msg, file=file, field=path)


def load_yaml(file: str) -> tuple[list[Any], str]:
    """A YAML file's documents (empty ones dropped) and its text; a missing file or a
    syntax error becomes one line naming the file (and the line and column)."""
    try:
        text = Path(file).read_text()
    except FileNotFoundError:
        raise InputError("no such file", file=file) from None
    except (IsADirectoryError, PermissionError) as e:
        raise InputError(e.strerror or str(e), file=file) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise InputError(f"{where}YAML syntax error: {e.problem}", file=file) from None
    except yaml.YAMLError as e:
        raise InputError(f"YAML syntax error: {e}", file=file) from None
    return docs, text


def read_yaml_documents(file: str) -> list[dict[str, Any]]:
    """All documents of a YAML file, each a mapping (a Kubernetes object or a Topology)."""
    docs, _text = load_yaml(file)
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise InputError(f"document {i + 1} is not a mapping (an object with apiVersion and kind)", file=file)
    return docs


def _manifest_files(base: Path, entries: list[str], file: str) -> list[str]:
    out: list[str] = []
    for i, entry in enumerate(entries):
        p = (base / entry) if not os.path.isabs(entry) else Path(entry)
        if p.is_dir():
            out.extend(str(f) for f in sorted(p.iterdir()) if f.suffix in (".yaml", ".yml", ".json"))
        elif p.is_file():
            out.append(str(p))
        else:
            raise InputError(f'Invalid value: "{entry}": no such file or directory', file=file, field=f"spec.manifests[{i}]")
    return out


def validate_manifest(obj: dict[str, Any], file: str) -> None:
    """kube-apiserver's validation of one manifest (testbed.validation), if available."""
    try:
        from testbed import validation
    except ImportError:  # pragma: no cover - during bring-up only
        return
    validation.validate_object(obj, file)


def load(file: str) -> Cluster:
    """Read and validate a topology file; return the cluster it describes (no run id yet).

    Raises :class:`InputError` with one line naming the file, the field and the rule.
    """
    docs = read_yaml_documents(file)
    if not docs:
        raise InputError("empty file: expected a Topology document", file=file)
    head = docs[0]
    if head.get("kind") != "Topology":
        raise InputError(
            f'kind: Unsupported value: "{head.get("kind")}": the first document must be the Topology (kind: Topology)',
            file=file,
        )
    if head.get("apiVersion", API_VERSION) != API_VERSION:
        raise InputError(f'apiVersion: Unsupported value: "{head.get("apiVersion")}": supported values: "{API_VERSION}"', file=file)
    try:
        topo = TopologyDoc.model_validate(head)
    except ValidationError as e:
        raise _first_error(e, file) from None

    manifests: list[tuple[str, dict[str, Any]]] = [(file, d) for d in docs[1:]]
    for extra in _manifest_files(Path(file).parent, topo.spec.manifests, file):
        # an included topology file contributes its manifests, not its Topology
        manifests.extend((extra, d) for d in read_yaml_documents(extra) if d.get("kind") != "Topology")
    for mfile, obj in manifests:
        if obj.get("kind") != "Service":  # Services are admitted (validated + allocated) by testbed.apiserver
            validate_manifest(obj, mfile)
    return build(topo, manifests, file)


# --------------------------------------------------------------------------- building


def _net(v: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(v)


def _host(net: ipaddress.IPv4Network, offset: int) -> str:
    return str(net.network_address + offset)


def build(topo: TopologyDoc, manifests: list[tuple[str, dict[str, Any]]], file: str) -> Cluster:
    spec = topo.spec
    nw = spec.network
    node_subnet = _net(nw.node_subnet)
    svc_net = _net(nw.kube_service_addresses)
    pod_net = _net(nw.kube_pods_subnet)

    nets = {
        "spec.network.nodeSubnet": node_subnet,
        "spec.network.kubeServiceAddresses": svc_net,
        "spec.network.kubePodsSubnet": pod_net,
    }
    names = list(nets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if nets[a].overlaps(nets[b]):
                raise InputError(f'Invalid value: "{nets[b]}": overlaps {a} ({nets[a]})', file=file, field=b)
    if not pod_net.prefixlen <= nw.kube_network_node_prefix <= 30:
        raise InputError(
            f"Invalid value: {nw.kube_network_node_prefix}: must be between the prefix of kubePodsSubnet "
            f"({pod_net.prefixlen}) and 30",
            file=file,
            field="spec.network.kubeNetworkNodePrefix",
        )

    # Nodes.
    node_specs = [NodeSpec(name=f"node{i + 1}") for i in range(spec.nodes)] if isinstance(spec.nodes, int) else spec.nodes
    if isinstance(spec.nodes, int) and spec.nodes < 1:
        raise InputError(f"Invalid value: {spec.nodes}: must be greater than or equal to 1", file=file, field="spec.nodes")
    client_specs = (
        [ClientSpec(name=f"client{i + 1}") for i in range(spec.clients)] if isinstance(spec.clients, int) else spec.clients
    )
    if isinstance(spec.clients, int) and spec.clients < 0:
        raise InputError(f"Invalid value: {spec.clients}: must be greater than or equal to 0", file=file, field="spec.clients")
    pod_subnets = list(pod_net.subnets(new_prefix=nw.kube_network_node_prefix))
    if len(node_specs) > len(pod_subnets):
        raise InputError(
            f"Invalid value: \"{pod_net}\": too small for {len(node_specs)} nodes with a /{nw.kube_network_node_prefix} "
            f"each (room for {len(pod_subnets)})",
            file=file,
            field="spec.network.kubePodsSubnet",
        )
    seen: dict[str, str] = {}
    # the first host address is the node network's default gateway (testbed.fabric)
    used_ips: dict[str, str] = {str(node_subnet.network_address + 1): "the node network's gateway"}

    def claim_ip(ip: str | None, offset: int, field: str) -> str:
        if ip is None:
            ip = _host(node_subnet, offset)
            if ipaddress.IPv4Address(ip) not in node_subnet or ipaddress.IPv4Address(ip) == node_subnet.broadcast_address:
                raise InputError(f'Invalid value: "{node_subnet}": too small for the nodes and clients', file=file, field="spec.network.nodeSubnet")
        else:
            try:
                addr = ipaddress.IPv4Address(ip)
            except ValueError:
                raise InputError(f'Invalid value: "{ip}": must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)', file=file, field=field) from None
            if addr not in node_subnet or addr in (node_subnet.network_address, node_subnet.broadcast_address):
                raise InputError(f'Invalid value: "{ip}": not a host address of spec.network.nodeSubnet ({node_subnet})', file=file, field=field)
        if ip in used_ips:
            raise InputError(f'Duplicate value: "{ip}" (already used by {used_ips[ip]})', file=file, field=field)
        used_ips[ip] = field
        return ip

    nodes: list[Node] = []
    for i, ns in enumerate(node_specs):
        field = f"spec.nodes[{i}]"
        if ns.name in seen:
            raise InputError(f'Duplicate value: "{ns.name}"', file=file, field=f"{field}.name")
        seen[ns.name] = field
        sub = pod_subnets[i]
        labels = {"kubernetes.io/hostname": ns.name, "kubernetes.io/os": "linux", **ns.labels}
        nodes.append(
            Node(
                name=ns.name,
                ip=claim_ip(ns.ip, NODE_IP_OFFSET + 1 + i, f"{field}.ip"),
                pod_cidr=str(sub),
                pod_gateway=_host(sub, 1),
                labels=labels,
            )
        )
    clients: list[Client] = []
    for i, cs in enumerate(client_specs):
        field = f"spec.clients[{i}]"
        if cs.name in seen:
            raise InputError(f'Duplicate value: "{cs.name}"', file=file, field=f"{field}.name")
        seen[cs.name] = field
        clients.append(Client(name=cs.name, ip=claim_ip(cs.ip, CLIENT_IP_OFFSET + 1 + i, f"{field}.ip")))

    pools = []
    for i, pool in enumerate(spec.load_balancer_pools):
        for j, a in enumerate(pool.addresses):
            _check_pool_range(a, file, f"spec.loadBalancerPools[{i}].addresses[{j}]", [svc_net, pod_net])
        pools.append({"name": pool.name, "addresses": list(pool.addresses)})

    cluster = Cluster(
        name=topo.metadata.name,
        source=os.path.abspath(file),
        network=Network(
            node_subnet=str(node_subnet), service_cidr=str(svc_net), pod_cidr=str(pod_net), node_prefix=nw.kube_network_node_prefix
        ),
        nodes=nodes,
        clients=clients,
        extra={"loadBalancerPools": pools} if pools else {},
    )
    _place_workloads(cluster, manifests)
    return cluster


def _check_pool_range(a: str, file: str, field: str, forbidden: list[ipaddress.IPv4Network]) -> None:
    try:
        if "-" in a:
            lo, hi = (ipaddress.IPv4Address(x.strip()) for x in a.split("-", 1))
            if hi < lo:
                raise ValueError
            nets = list(ipaddress.summarize_address_range(lo, hi))
        else:
            nets = [ipaddress.IPv4Network(a, strict=False)]
    except ValueError:
        raise InputError(f'Invalid value: "{a}": must be a CIDR or an address range "A-B"', file=file, field=field) from None
    for n in nets:
        for f in forbidden:
            if n.overlaps(f):
                raise InputError(f'Invalid value: "{a}": overlaps {f}', file=file, field=field)


def _place_workloads(cluster: Cluster, manifests: list[tuple[str, dict[str, Any]]]) -> None:
    from testbed import workloads

    for file, obj in manifests:
        kind = obj.get("kind")
        if kind == "Service":
            cluster.services.append(obj)
        elif kind == "EndpointSlice":
            cluster.endpointslices.append(obj)
        elif kind in workloads.KINDS:
            workloads.create(cluster, obj, file)
        # Namespace and friends: nothing to emulate
