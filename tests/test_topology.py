"""Topology files: the seed loads as documented; every bad input is one exact line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli
from testbed import topology
from testbed.errors import InputError

BAD = "tests/data/bad"

BAD_CASES = {
    "syntax.yaml": "line 7, column 11: YAML syntax error: mapping values are not allowed here",
    "unknown_field.yaml": 'spec.nodez: unknown field "spec.nodez"',
    "overlap.yaml": 'spec.network.kubePodsSubnet: Invalid value: "10.233.64.0/18": overlaps '
    "spec.network.kubeServiceAddresses (10.233.0.0/16)",
    "duplicate_node.yaml": 'spec.nodes[2].name: Duplicate value: "node1"',
    "duplicate_client.yaml": 'spec.clients[0].name: Duplicate value: "alpha"',
    "pod_cidr_small.yaml": 'spec.network.kubePodsSubnet: Invalid value: "10.233.64.0/22": too small for 5 nodes '
    "with a /24 each (room for 4)",
    "node_cidr_full.yaml": "spec.network.kubeNetworkNodePrefix: Invalid value: 29: node node1's pod CIDR "
    "10.233.64.0/29 is too small for its 6 pods",
    "bad_name.yaml": 'spec.nodes[0].name: Invalid value: "Node_1": a lowercase RFC 1123 label must consist of '
    "lower case alphanumeric characters or '-', and must start and end with an alphanumeric character "
    "(e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
    "bad_cidr.yaml": 'spec.network.nodeSubnet: Invalid value: "192.168.56.1/33": must be a valid CIDR value, '
    "(e.g. 10.9.8.0/24 or 2001:db8::/64)",
    "not_topology.yaml": 'kind: Unsupported value: "Service": the first document must be the Topology (kind: Topology)',
    "no_selector_match.yaml": "Pod/gpu-pod.spec.nodeSelector: 0/2 nodes are available: 2 node(s) didn't match "
    "Pod's node affinity/selector.",
    "duplicate_workload.yaml": 'deployments.apps "web" already exists',
}


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_topology_message(name):
    with pytest.raises(InputError) as e:
        topology.load(f"{BAD}/{name}")
    assert str(e.value) == f"{BAD}/{name}: {BAD_CASES[name]}"


def test_missing_file():
    with pytest.raises(InputError, match=r"^tests/data/nope.yaml: no such file$"):
        topology.load("tests/data/nope.yaml")


def test_seed_cluster_shape():
    c = topology.load(str(ROOT / "topologies/seed.yaml"))
    assert [n.name for n in c.nodes] == ["node1", "node2", "node3"]
    assert [n.ip for n in c.nodes] == ["192.168.56.11", "192.168.56.12", "192.168.56.13"]
    assert [n.pod_cidr for n in c.nodes] == ["10.233.64.0/24", "10.233.65.0/24", "10.233.66.0/24"]
    assert [n.pod_gateway for n in c.nodes] == ["10.233.64.1", "10.233.65.1", "10.233.66.1"]
    assert c.network.service_cidr == "10.233.0.0/18"
    assert [cl.ip for cl in c.clients] == ["192.168.56.201", "192.168.56.202"]
    myapp = [p for p in c.pods if p.labels.get("app") == "myapp"]
    assert [p.node for p in myapp] == ["node1", "node2"]  # least-loaded spread; node3 has none
    assert all(p.name.startswith("myapp-") and p.labels["pod-template-hash"] in p.name for p in myapp)
    assert {(cp.port, cp.protocol) for cp in myapp[0].ports} == {(8080, "TCP"), (8080, "UDP")}
    toolbox = [p for p in c.pods if p.labels.get("app") == "toolbox"]
    assert sorted(p.node for p in toolbox) == ["node1", "node2", "node3"]  # DaemonSet: one per node
    assert {s["metadata"]["name"] for s in c.services} == {
        "my-clusterip-service", "my-nodeport-service", "my-lb-service", "my-external-service", "my-headless-service",
    }
    # every pod IP inside its node's podCIDR, all distinct
    import ipaddress

    for p in c.pods:
        assert ipaddress.ip_address(p.ip) in ipaddress.ip_network(c.node(p.node).pod_cidr)
    assert len({p.ip for p in c.pods}) == len(c.pods)


def test_deterministic_names():
    a = topology.load(str(ROOT / "topologies/seed.yaml"))
    b = topology.load(str(ROOT / "topologies/seed.yaml"))
    assert [p.name for p in a.pods] == [p.name for p in b.pods]


def test_statefulset_and_node_selection(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text(
        """
apiVersion: testbed.io/v1alpha1
kind: Topology
metadata: {name: sts}
spec:
  nodes:
    - {name: a, labels: {disk: ssd}}
    - {name: b}
  clients: 0
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: data}
spec:
  serviceName: db
  replicas: 3
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      nodeSelector: {disk: ssd}
      containers: [{name: db, image: x, ports: [{containerPort: 5432, name: pg}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: pinned}
spec:
  nodeName: b
  containers: [{name: c, image: x}]
"""
    )
    c = topology.load(str(f))
    db = [p for p in c.pods if p.owner_kind == "StatefulSet"]
    assert [(p.name, p.node, p.hostname, p.subdomain, p.namespace) for p in db] == [
        ("db-0", "a", "db-0", "db", "data"), ("db-1", "a", "db-1", "db", "data"), ("db-2", "a", "db-2", "db", "data"),
    ]
    assert [p.node for p in c.pods if p.name == "pinned"] == ["b"]
    assert c.clients == []


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_cli_bad_topology_one_line_exit_2_nothing_created(name):
    before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    r = run_cli("up", f"{BAD}/{name}")
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert lines == [f"error: {BAD}/{name}: {BAD_CASES[name]}"], r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    after = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    assert after == before
    assert not os.path.exists("/run/testbed/bad")


def test_cli_usage_error_is_one_line():
    r = run_cli("up")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: the following arguments are required: TOPOLOGY (see `testbed up --help`)"
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_not_root_is_one_line():
    def demote():
        os.setgid(65534)
        os.setuid(65534)

    r = subprocess.run(
        [sys.executable, "-m", "testbed", "up", "topologies/seed.yaml"],
        capture_output=True, text=True, cwd=ROOT, preexec_fn=demote, env={**os.environ, "HOME": "/tmp"},
    )
    assert r.returncode == 2, r
    assert r.stderr.strip().splitlines() == [
        "error: `testbed up` needs root (network namespaces and kernel rules): run it with sudo"
    ]
