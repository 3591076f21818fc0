"""kube-proxy's dataplane programming, reproduced as pure functions.

* :mod:`testbed.proxy.types`: the mode-neutral vocabulary (``ServicePortName``,
  ``ServicePort``, ``Endpoint``, ``categorize_endpoints``), as in ``pkg/proxy``.
* :mod:`testbed.proxy.servicemap`: Service / EndpointSlice manifests -> service map and
  endpoints map, as kube-proxy's change trackers build them.
* :mod:`testbed.proxy.iptables`: iptables mode (``render_iptables`` /
  ``render_iptables_sync``), the exact ``iptables-restore`` input of one sync.
* :mod:`testbed.proxy.normalize`: kube-proxy's test normalisation of that text.

Nothing here touches the kernel.
"""

from .iptables import (
    JUMP_RULES,
    IPTablesConfig,
    IPTablesRender,
    JumpRule,
    chains_from_iptables_save,
    render_iptables,
    render_iptables_sync,
)
from .normalize import sort_iptables_rules
from .servicemap import build_endpoints_map, build_maps, build_service_map, changed_services
from .types import (
    Endpoint,
    EndpointsMap,
    NamespacedName,
    ServicePort,
    ServicePortMap,
    ServicePortName,
    categorize_endpoints,
)

__all__ = [
    "Endpoint",
    "EndpointsMap",
    "IPTablesConfig",
    "IPTablesRender",
    "JUMP_RULES",
    "JumpRule",
    "NamespacedName",
    "ServicePort",
    "ServicePortMap",
    "ServicePortName",
    "build_endpoints_map",
    "build_maps",
    "build_service_map",
    "categorize_endpoints",
    "chains_from_iptables_save",
    "changed_services",
    "render_iptables",
    "render_iptables_sync",
    "sort_iptables_rules",
]
