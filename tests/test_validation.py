"""Manifest validation: each rule with kube-apiserver's / kubectl's exact text.

Expected strings are built from the messages in Kubernetes' sources
(``k8s.io/apimachinery/pkg/util/validation``, ``pkg/apis/core/validation``,
``pkg/apis/apps/validation``, ``pkg/apis/discovery/validation``) and, where the
sources print a value with Go formatting, from real kubectl output quoted in public bug
reports (``v1.LabelSelector{MatchLabels:map[string]string(nil), ...}``).
"""

from __future__ import annotations

import copy

import pytest

from testbed.errors import InputError
from testbed.validation import (
    APIError,
    aggregate,
    check_namespaces,
    go_quote,
    validate_object,
)

DNS1035 = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic "
    "character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for "
    "validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
)
DNS1123_LABEL = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and "
    "end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
DNS1123_SUBDOMAIN = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must "
    "start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
LABEL_VALUE = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must "
    "start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used "
    "for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)
LABEL_KEY_NAME = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
    "alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is "
    "'([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)
PORT_RANGE = "must be between 1 and 65535, inclusive"
IP_EXAMPLE = "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"


def service(name="my-svc", **spec):
    spec.setdefault("selector", {"app": "myapp"})
    spec.setdefault("ports", [{"port": 80, "targetPort": 8080}])
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec}


def deployment(name="web", labels=None, selector="default", containers=None, **spec):
    labels = {"app": "myapp"} if labels is None else labels
    obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 3,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": containers
                    if containers is not None
                    else [{"name": "app", "image": "nginx:1.27", "ports": [{"containerPort": 8080, "name": "http"}]}]
                },
            },
        },
    }
    if selector == "default":
        obj["spec"]["selector"] = {"matchLabels": {"app": "myapp"}}
    elif selector is not None:
        obj["spec"]["selector"] = selector
    obj["spec"].update(spec)
    return obj


def error_of(obj, file="topologies/x.yaml") -> str:
    with pytest.raises(InputError) as info:
        validate_object(obj, file=file)
    return str(info.value)


def svc_error(*errs: str, name="my-svc") -> str:
    return f'topologies/x.yaml: The Service "{name}" is invalid: ' + aggregate(errs)


# ---- the format ------------------------------------------------------------------------


def test_valid_objects_pass_and_are_not_modified():
    objs = [
        service(),
        service(type="NodePort", ports=[{"port": 80, "nodePort": 30080}]),
        service(type="LoadBalancer", externalTrafficPolicy="Local"),
        service(clusterIP="None", ports=[]),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext"}, "spec": {"type": "ExternalName", "externalName": "db.example.com."}},
        deployment(),
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}},
    ]
    for obj in objs:
        before = copy.deepcopy(obj)
        validate_object(obj)
        assert obj == before


def test_one_error_is_printed_alone_and_several_in_brackets():
    assert error_of(service(ports=[{"port": 0, "targetPort": 8080}])) == svc_error(f"spec.ports[0].port: Invalid value: 0: {PORT_RANGE}")
    # targetPort is defaulted to port before validation, so port 0 fails twice, as in
    # kube-apiserver
    assert error_of(service(ports=[{"port": 0}])) == (
        'topologies/x.yaml: The Service "my-svc" is invalid: ['
        f"spec.ports[0].port: Invalid value: 0: {PORT_RANGE}, "
        f"spec.ports[0].targetPort: Invalid value: 0: {PORT_RANGE}]"
    )
    msg = error_of(service(ports=[{"port": 0, "targetPort": 80}, {"port": 70000}]))
    assert msg == (
        'topologies/x.yaml: The Service "my-svc" is invalid: ['
        "spec.ports[0].name: Required value, "
        f"spec.ports[0].port: Invalid value: 0: {PORT_RANGE}, "
        "spec.ports[1].name: Required value, "
        f"spec.ports[1].port: Invalid value: 70000: {PORT_RANGE}, "
        f"spec.ports[1].targetPort: Invalid value: 70000: {PORT_RANGE}]"
    )


def test_error_is_an_input_error_with_the_causes():
    with pytest.raises(APIError) as info:
        validate_object(service(ports=[{"port": 0, "targetPort": 80}]), file="f.yaml")
    err = info.value
    assert isinstance(err, InputError) and err.exit_code == 2
    assert err.reason == "Invalid" and err.kind == "Service" and err.name == "my-svc"
    assert [c.field for c in err.causes] == ["spec.ports[0].port"]
    assert err.file == "f.yaml"


def test_go_quote():
    assert go_quote('a"b\\c\n') == '"a\\"b\\\\c\\n"'


# ---- kinds, decode, strict fields -------------------------------------------------------


def test_unknown_kind_is_kubectls_no_matches():
    obj = {"apiVersion": "v1", "kind": "Foo", "metadata": {"name": "x"}}
    assert error_of(obj) == (
        'resource mapping not found for name: "x" namespace: "" from "topologies/x.yaml": '
        'no matches for kind "Foo" in version "v1"; ensure CRDs are installed first'
    )


def test_removed_api_version_is_no_matches():
    obj = deployment()
    obj["apiVersion"] = "extensions/v1beta1"
    assert 'no matches for kind "Deployment" in version "extensions/v1beta1"' in error_of(obj)


def test_missing_kind_and_api_version():
    assert error_of({"apiVersion": "v1", "metadata": {"name": "x"}}) == (
        """unable to decode "topologies/x.yaml": Object 'Kind' is missing in '{"apiVersion":"v1","metadata":{"name":"x"}}'"""
    )
    assert error_of({"kind": "Service", "metadata": {"name": "x"}}) == (
        """unable to decode "topologies/x.yaml": Object 'apiVersion' is missing in '{"kind":"Service","metadata":{"name":"x"}}'"""
    )


def test_builtin_kind_not_emulated_says_so():
    msg = error_of({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}})
    assert 'kind "ConfigMap" in version "v1" is not emulated by the testbed' in msg


def test_strict_unknown_field():
    obj = service()
    obj["spec"]["ports"][0]["nodeport"] = 30080
    obj["spec"]["selctor"] = {}
    assert error_of(obj) == (
        'topologies/x.yaml: Service in version "v1" cannot be handled as a Service: strict decoding error: '
        'unknown field "spec.ports[0].nodeport", unknown field "spec.selctor"'
    )
    dep = deployment()
    dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["protocl"] = "TCP"
    assert error_of(dep).endswith(
        'Deployment in version "v1" cannot be handled as a Deployment: strict decoding error: '
        'unknown field "spec.template.spec.containers[0].ports[0].protocl"'
    )


def test_wrong_json_types():
    assert error_of(service(ports=[{"port": "80"}])).endswith(
        "Service in version \"v1\" cannot be handled as a Service: json: cannot unmarshal string into Go struct "
        "field ServicePort.spec.ports.port of type int32"
    )
    obj = service()
    obj["metadata"]["labels"] = {"enabled": True}
    assert error_of(obj).endswith(
        "json: cannot unmarshal bool into Go struct field ObjectMeta.metadata.labels of type string"
    )
    assert error_of(deployment(replicas="3")).endswith(
        "json: cannot unmarshal string into Go struct field DeploymentSpec.spec.replicas of type int32"
    )


# ---- metadata ---------------------------------------------------------------------------


def test_service_name_is_a_dns1035_label():
    assert error_of(service("My_Svc")) == svc_error(f'metadata.name: Invalid value: "My_Svc": {DNS1035}', name="My_Svc")
    # starts with a digit: fine for most objects, not for a Service
    assert DNS1035 in error_of(service("1svc"))
    assert error_of(service("a" * 64)).endswith(
        f'metadata.name: Invalid value: "{"a" * 64}": must be no more than 63 characters'
    )


def test_name_required():
    obj = service()
    del obj["metadata"]["name"]
    assert error_of(obj) == 'topologies/x.yaml: The Service "" is invalid: metadata.name: Required value: name or generateName is required'


def test_deployment_and_pod_names_are_dns1123_subdomains():
    assert error_of(deployment("Web")) == (
        f'topologies/x.yaml: The Deployment "Web" is invalid: metadata.name: Invalid value: "Web": {DNS1123_SUBDOMAIN}'
    )
    validate_object(deployment("web.v1"))  # dots are fine in a subdomain


def test_statefulset_name_is_a_dns1123_label():
    sts = deployment("db.v1")
    sts["kind"] = "StatefulSet"
    sts["spec"].pop("replicas")
    assert error_of(sts) == 'topologies/x.yaml: The StatefulSet "db.v1" is invalid: metadata.name: Invalid value: "db.v1": must not contain dots'


def test_namespace_is_a_dns1123_label():
    obj = service()
    obj["metadata"]["namespace"] = "Team_A"
    assert error_of(obj) == svc_error(f'metadata.namespace: Invalid value: "Team_A": {DNS1123_LABEL}')
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team.a"}}
    assert error_of(ns) == 'topologies/x.yaml: The Namespace "team.a" is invalid: metadata.name: Invalid value: "team.a": must not contain dots'


def test_label_key_and_value_syntax():
    obj = service()
    obj["metadata"]["labels"] = {"-bad": "ok", "app": "bad value"}
    assert error_of(obj) == svc_error(
        f'metadata.labels: Invalid value: "-bad": {LABEL_KEY_NAME}',
        f'metadata.labels: Invalid value: "bad value": {LABEL_VALUE}',
    )
    obj["metadata"]["labels"] = {"example.com/": "x"}
    assert error_of(obj) == svc_error(
        'metadata.labels: Invalid value: "example.com/": name part must be non-empty',
        f'metadata.labels: Invalid value: "example.com/": {LABEL_KEY_NAME}',
    )


def test_service_selector_label_syntax():
    assert error_of(service(selector={"app": "my app"})) == svc_error(f'spec.selector: Invalid value: "my app": {LABEL_VALUE}')


def test_namespace_must_exist():
    objs = [service(), {**service("b"), "metadata": {"name": "b", "namespace": "team-a"}}]
    with pytest.raises(APIError, match=r'^f.yaml: namespaces "team-a" not found$'):
        check_namespaces(objs, file="f.yaml")
    check_namespaces(objs + [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}}])


# ---- Service ----------------------------------------------------------------------------


def test_service_type_supported_values():
    assert error_of(service(type="Foo")) == svc_error(
        'spec.type: Unsupported value: "Foo": supported values: "ClusterIP", "ExternalName", "LoadBalancer", "NodePort"'
    )


def test_ports_required_except_headless_and_external_name():
    assert error_of(service(ports=[])) == svc_error("spec.ports: Required value")
    validate_object(service(clusterIP="None", ports=[]))


def test_port_and_target_port_range():
    assert error_of(service(ports=[{"port": 80, "targetPort": 70000}])) == svc_error(
        f"spec.ports[0].targetPort: Invalid value: 70000: {PORT_RANGE}"
    )
    assert error_of(service(ports=[{"port": -1, "targetPort": 8080}])) == svc_error(f"spec.ports[0].port: Invalid value: -1: {PORT_RANGE}")
    # targetPort 0 (or "") is defaulted to port by the API server, so it is accepted
    validate_object(service(ports=[{"port": 80, "targetPort": 0}]))


def test_named_target_port_must_be_an_iana_svc_name():
    assert error_of(service(ports=[{"port": 80, "targetPort": "8080"}])) == svc_error(
        'spec.ports[0].targetPort: Invalid value: "8080": must contain at least one letter (a-z)'
    )
    assert error_of(service(ports=[{"port": 80, "targetPort": "Http_Port--long-name"}])) == svc_error(
        'spec.ports[0].targetPort: Invalid value: "Http_Port--long-name": must be no more than 15 characters',
        'spec.ports[0].targetPort: Invalid value: "Http_Port--long-name": must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)',
        'spec.ports[0].targetPort: Invalid value: "Http_Port--long-name": must not contain consecutive hyphens',
    )
    validate_object(service(ports=[{"port": 80, "targetPort": "http"}]))


def test_protocol_supported_values():
    assert error_of(service(ports=[{"port": 80, "protocol": "tcp"}])) == svc_error(
        'spec.ports[0].protocol: Unsupported value: "tcp": supported values: "SCTP", "TCP", "UDP"'
    )


def test_port_names_required_with_several_ports_and_unique():
    assert error_of(service(ports=[{"port": 80, "name": "http"}, {"port": 443}])) == svc_error(
        "spec.ports[1].name: Required value"
    )
    assert error_of(service(ports=[{"port": 80, "name": "web"}, {"port": 443, "name": "web"}])) == svc_error(
        'spec.ports[1].name: Duplicate value: "web"'
    )
    assert error_of(service(ports=[{"port": 80, "name": "Web"}])) == svc_error(f'spec.ports[0].name: Invalid value: "Web": {DNS1123_LABEL}')


def test_node_port_forbidden_on_cluster_ip():
    assert error_of(service(ports=[{"port": 80, "nodePort": 30080}])) == svc_error(
        "spec.ports[0].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'"
    )


def test_duplicate_protocol_node_port():
    ports = [{"name": "a", "port": 80, "nodePort": 30080}, {"name": "b", "port": 81, "nodePort": 30080}]
    assert error_of(service(type="NodePort", ports=ports)) == svc_error("spec.ports[1].nodePort: Duplicate value: 30080")
    ports[1]["protocol"] = "UDP"  # same nodePort on another protocol is fine
    validate_object(service(type="NodePort", ports=ports))


def test_cluster_ip_must_be_an_ip_or_none():
    assert error_of(service(clusterIP="10.233.0.300")) == svc_error(f'spec.clusterIPs[0]: Invalid value: "10.233.0.300": {IP_EXAMPLE}')
    assert error_of(service(clusterIP="10.0.0.1", clusterIPs=["10.0.0.2"])) == svc_error(
        'spec.clusterIPs: Invalid value: []string{"10.0.0.2"}: first value must match `clusterIP`'
    )
    assert error_of(service(clusterIPs=["10.0.0.2"])) == svc_error(
        'spec.clusterIPs: Invalid value: []string{"10.0.0.2"}: must be empty when `clusterIP` is not specified'
    )
    assert error_of(service(clusterIP="None", type="NodePort")) == svc_error(
        "spec.clusterIPs[0]: Invalid value: \"None\": may not be set to 'None' for NodePort services"
    )


def test_external_name():
    def ext(**spec):
        return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db"}, "spec": {"type": "ExternalName", **spec}}

    assert error_of(ext()) == 'topologies/x.yaml: The Service "db" is invalid: spec.externalName: Required value'
    assert error_of(ext(externalName="Db_Host")) == (
        f'topologies/x.yaml: The Service "db" is invalid: spec.externalName: Invalid value: "Db_Host": {DNS1123_SUBDOMAIN}'
    )
    assert error_of(ext(externalName="db.example.com", clusterIP="10.0.0.1")) == (
        'topologies/x.yaml: The Service "db" is invalid: spec.clusterIPs: Forbidden: may not be set for ExternalName services'
    )


def test_session_affinity():
    assert error_of(service(sessionAffinity="Sticky")) == svc_error(
        'spec.sessionAffinity: Unsupported value: "Sticky": supported values: "ClientIP", "None"'
    )
    for bad in (0, 86401):
        obj = service(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": bad}})
        assert error_of(obj) == svc_error(
            f"spec.sessionAffinityConfig.clientIP.timeoutSeconds: Invalid value: {bad}: must be greater than 0 and less than 86400"
        )
    validate_object(service(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 86400}}))
    validate_object(service(sessionAffinity="ClientIP"))  # defaulted to 10800


def test_external_traffic_policy_only_for_externally_accessible():
    assert error_of(service(externalTrafficPolicy="Local")) == svc_error(
        'spec.externalTrafficPolicy: Invalid value: "Local": may only be set for externally-accessible services'
    )
    assert error_of(service(type="NodePort", externalTrafficPolicy="local")) == svc_error(
        'spec.externalTrafficPolicy: Unsupported value: "local": supported values: "Cluster", "Local"'
    )
    validate_object(service(externalIPs=["192.168.56.50"], externalTrafficPolicy="Local"))


def test_internal_traffic_policy_values():
    assert error_of(service(internalTrafficPolicy="Node")) == svc_error(
        'spec.internalTrafficPolicy: Unsupported value: "Node": supported values: "Cluster", "Local"'
    )


def test_health_check_node_port_only_for_lb_local():
    assert error_of(service(type="NodePort", healthCheckNodePort=30100)) == svc_error(
        "spec.healthCheckNodePort: Invalid value: 30100: may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'"
    )


def test_load_balancer_source_ranges():
    assert error_of(service(type="LoadBalancer", loadBalancerSourceRanges=["10.0.0.0/33"])) == svc_error(
        'spec.LoadBalancerSourceRanges[0]: Invalid value: "10.0.0.0/33": must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)'
    )
    assert error_of(service(loadBalancerSourceRanges=["10.0.0.0/8"])) == svc_error(
        "spec.LoadBalancerSourceRanges: Forbidden: may only be used when `type` is 'LoadBalancer'"
    )
    validate_object(service(type="LoadBalancer", loadBalancerSourceRanges=[" 203.0.113.0/25"]))


def test_external_ips():
    assert error_of(service(externalIPs=["1.2.3"])) == svc_error(f'spec.externalIPs[0]: Invalid value: "1.2.3": {IP_EXAMPLE}')
    assert error_of(service(externalIPs=["127.0.0.1"])) == svc_error(
        'spec.externalIPs[0]: Invalid value: "127.0.0.1": may not be in the loopback range (127.0.0.0/8, ::1/128)'
    )


def test_lb_kubelet_port():
    assert error_of(service(type="LoadBalancer", ports=[{"port": 10250}])) == svc_error(
        "spec.ports[0]: Invalid value: 10250: may not expose port 10250 externally since it is used by kubelet"
    )


# ---- workloads --------------------------------------------------------------------------


def test_deployment_selector_required_and_must_match_template():
    # The real message is quoted in countless bug reports.
    assert error_of(deployment(selector=None)) == (
        'topologies/x.yaml: The Deployment "web" is invalid: [spec.selector: Required value, '
        'spec.template.metadata.labels: Invalid value: map[string]string{"app":"myapp"}: `selector` does not match template `labels`]'
    )
    assert error_of(deployment(selector={"matchLabels": {"app": "other"}})) == (
        'topologies/x.yaml: The Deployment "web" is invalid: spec.template.metadata.labels: Invalid value: '
        'map[string]string{"app":"myapp"}: `selector` does not match template `labels`'
    )


def test_empty_selector():
    assert error_of(deployment(selector={})) == (
        'topologies/x.yaml: The Deployment "web" is invalid: spec.selector: Invalid value: v1.LabelSelector{MatchLabels:'
        "map[string]string(nil), MatchExpressions:[]v1.LabelSelectorRequirement(nil)}: empty selector is invalid for deployment"
    )


def test_match_expressions():
    sel = {"matchExpressions": [{"key": "app", "operator": "In", "values": ["myapp", "other"]}]}
    validate_object(deployment(selector=sel))
    sel = {"matchExpressions": [{"key": "app", "operator": "In"}]}
    assert "spec.selector.matchExpressions[0].values: Required value: must be specified when `operator` is 'In' or 'NotIn'" in error_of(
        deployment(selector=sel)
    )


def test_replicas_not_negative():
    assert error_of(deployment(replicas=-1)) == (
        'topologies/x.yaml: The Deployment "web" is invalid: spec.replicas: Invalid value: -1: must be greater than or equal to 0'
    )


def test_containers_required():
    assert error_of(deployment(containers=[])) == 'topologies/x.yaml: The Deployment "web" is invalid: spec.template.spec.containers: Required value'


def test_container_fields():
    containers = [{"name": "app", "ports": [{"containerPort": 8080}]}]
    assert error_of(deployment(containers=containers)) == (
        'topologies/x.yaml: The Deployment "web" is invalid: spec.template.spec.containers[0].image: Required value'
    )
    containers = [{"name": "app", "image": "x"}, {"name": "app", "image": "y"}]
    assert error_of(deployment(containers=containers)) == (
        'topologies/x.yaml: The Deployment "web" is invalid: spec.template.spec.containers[1].name: Duplicate value: "app"'
    )


def test_container_ports():
    def dep(*ports):
        return deployment(containers=[{"name": "app", "image": "x", "ports": list(ports)}])

    prefix = 'topologies/x.yaml: The Deployment "web" is invalid: spec.template.spec.containers[0].ports'
    assert error_of(dep({"containerPort": 70000})) == f"{prefix}[0].containerPort: Invalid value: 70000: {PORT_RANGE}"
    assert error_of(dep({"containerPort": 0})) == f"{prefix}[0].containerPort: Required value"
    assert error_of(dep({"containerPort": 53, "protocol": "ICMP"})) == (
        f'{prefix}[0].protocol: Unsupported value: "ICMP": supported values: "SCTP", "TCP", "UDP"'
    )
    assert error_of(dep({"containerPort": 80, "name": "http"}, {"containerPort": 81, "name": "http"})) == (
        f'{prefix}[1].name: Duplicate value: "http"'
    )
    assert error_of(dep({"containerPort": 80, "name": "-http"})) == f'{prefix}[0].name: Invalid value: "-http": must not begin or end with a hyphen'


def test_template_restart_policy_must_be_always():
    obj = deployment()
    obj["spec"]["template"]["spec"]["restartPolicy"] = "Never"
    assert error_of(obj) == (
        'topologies/x.yaml: The Deployment "web" is invalid: spec.template.spec.restartPolicy: Unsupported value: "Never": supported values: "Always"'
    )


def test_daemonset_without_selector_only_reports_the_mismatch():
    ds = deployment(selector=None)
    ds["kind"] = "DaemonSet"
    ds["spec"].pop("replicas")
    assert error_of(ds) == (
        'topologies/x.yaml: The DaemonSet "web" is invalid: spec.template.metadata.labels: Invalid value: '
        'map[string]string{"app":"myapp"}: `selector` does not match template `labels`'
    )


def test_statefulset_template_is_checked_as_its_first_pod():
    sts = deployment("db", containers=[{"name": "db", "image": "postgres", "ports": [{"containerPort": 99999}]}])
    sts["kind"] = "StatefulSet"
    sts["spec"]["serviceName"] = "db"
    assert error_of(sts) == (
        f'topologies/x.yaml: The Pod "db-0" is invalid: spec.containers[0].ports[0].containerPort: Invalid value: 99999: {PORT_RANGE}'
    )


def test_pod():
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "client"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}], "hostname": "Client_1", "nodeName": "node1"},
    }
    assert error_of(pod) == f'topologies/x.yaml: The Pod "client" is invalid: spec.hostname: Invalid value: "Client_1": {DNS1123_LABEL}'


# ---- EndpointSlice ----------------------------------------------------------------------


def endpoint_slice(**fields):
    obj = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "manual-1", "labels": {"kubernetes.io/service-name": "manual"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.233.64.5"]}],
        "ports": [{"name": "http", "port": 80}],
    }
    obj.update(fields)
    return obj


def test_endpoint_slice():
    validate_object(endpoint_slice())
    prefix = 'topologies/x.yaml: The EndpointSlice "manual-1" is invalid: '
    assert error_of(endpoint_slice(addressType="IP")) == prefix + 'addressType: Unsupported value: "IP": supported values: "FQDN", "IPv4", "IPv6"'
    assert error_of(endpoint_slice(endpoints=[{"addresses": []}])) == prefix + "endpoints[0].addresses: Required value: must contain at least 1 address"
    assert error_of(endpoint_slice(endpoints=[{"addresses": ["fd00::1"]}])) == (
        prefix + 'endpoints[0].addresses[0]: Invalid value: "fd00::1": must be a valid IPv4 address'
    )
    assert error_of(endpoint_slice(ports=[{"port": 80}, {"port": 81}])) == prefix + 'ports[1].name: Duplicate value: ""'
    assert error_of(endpoint_slice(ports=[{"name": "http", "port": 80, "protocol": "HTTP"}])) == (
        prefix + 'ports[0].protocol: Unsupported value: "HTTP": supported values: "SCTP", "TCP", "UDP"'
    )


def test_list_items_are_validated_one_by_one():
    lst = {"apiVersion": "v1", "kind": "List", "items": [service(), service("Bad")]}
    assert error_of(lst) == svc_error(f'metadata.name: Invalid value: "Bad": {DNS1035}', name="Bad")
