"""The cluster model: plain data describing one emulated cluster.

Built (purely) from a topology file by :mod:`testbed.topology`, instantiated in the
kernel by :mod:`testbed.fabric`, saved as JSON in the run's state directory so every
CLI call sees the same cluster. Nothing here touches the kernel.

Kubernetes objects (Services, EndpointSlices, workload manifests) are kept as the
plain ``dict`` that ``yaml.safe_load`` gives for the manifest as ``kubectl`` writes it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Protocol = Literal["TCP", "UDP", "SCTP"]

# Every kernel object a run creates is named with this prefix, then the run id:
# network namespaces are ``tb-<runid>-<role>-<name>``.
PREFIX = "tb-"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContainerPort(_Model):
    """``spec.containers[].ports[]`` of a pod."""

    port: int  # containerPort
    protocol: Protocol = "TCP"
    name: str | None = None


class Node(_Model):
    name: str
    ip: str  # address on the node network (like a Vagrant private network)
    pod_cidr: str  # this node's slice of kube_pods_subnet (podCIDR)
    pod_gateway: str  # first address of pod_cidr, on the node's pod bridge (cni0)
    labels: dict[str, str] = Field(default_factory=dict)
    netns: str = ""  # kernel namespace name, set when the run id is known


class Pod(_Model):
    namespace: str
    name: str
    node: str  # spec.nodeName
    ip: str  # status.podIP
    labels: dict[str, str] = Field(default_factory=dict)
    ports: list[ContainerPort] = Field(default_factory=list)
    owner_kind: str | None = None  # Deployment, StatefulSet, DaemonSet or None for a bare Pod
    owner_name: str | None = None
    hostname: str | None = None  # spec.hostname (StatefulSet pods: the pod name)
    subdomain: str | None = None  # spec.subdomain (StatefulSet: serviceName)
    ready: bool = True  # Ready once its sockets listen
    netns: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class Client(_Model):
    """A host outside the cluster on the node network (an external client)."""

    name: str
    ip: str
    netns: str = ""


class Network(_Model):
    node_subnet: str = "192.168.56.0/24"
    service_cidr: str = "10.233.0.0/18"  # kubespray kube_service_addresses
    pod_cidr: str = "10.233.64.0/18"  # kubespray kube_pods_subnet
    node_prefix: int = 24  # kubespray kube_network_node_prefix


class Cluster(_Model):
    name: str
    run_id: str = ""
    source: str = ""  # topology file it was built from
    network: Network = Field(default_factory=Network)
    nodes: list[Node] = Field(default_factory=list)
    pods: list[Pod] = Field(default_factory=list)
    clients: list[Client] = Field(default_factory=list)
    switch_netns: str = ""
    # Kubernetes objects as loaded from manifests (dicts, kubectl's YAML shape).
    workloads: list[dict[str, Any]] = Field(default_factory=list)
    services: list[dict[str, Any]] = Field(default_factory=list)
    endpointslices: list[dict[str, Any]] = Field(default_factory=list)
    # Free-form per-issue extensions (load-balancer pools, proxy mode, ...).
    extra: dict[str, Any] = Field(default_factory=dict)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def pods_on(self, node: str) -> list[Pod]:
        return [p for p in self.pods if p.node == node]

    def assign_netns(self, run_id: str) -> None:
        """Name every namespace after the run id, so no two runs (even one still
        being torn down by the kernel) ever share a name."""
        self.run_id = run_id
        base = f"{PREFIX}{run_id}"
        self.switch_netns = f"{base}-switch"
        for n in self.nodes:
            n.netns = f"{base}-node-{n.name}"
        for c in self.clients:
            c.netns = f"{base}-client-{c.name}"
        for p in self.pods:
            p.netns = f"{base}-pod-{p.namespace}-{p.name}"
