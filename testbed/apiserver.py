"""Service REST storage: defaulting, ClusterIP / NodePort allocation, MetalLB LB IPs.

:class:`ServiceRegistry` does for Service manifests what kube-apiserver's Service
storage (``pkg/registry/core/service/storage``) does on ``kubectl apply``, in the same
order, with the same messages:

*create* (``Store.Create`` -> ``beginCreate`` -> ``BeforeCreate``):

1. decode + defaulting (:mod:`testbed.validation`; unknown fields, wrong JSON types);
2. ``normalizeClusterIPs``; ``initIPFamilyFields`` (ipFamilyPolicy, ipFamilies, the
   clusterIPs pre-validation);
3. ClusterIP allocation, then NodePort allocation, then healthCheckNodePort
   (``allocateCreate``) -- **before** validation, as in the API server, so a Service
   with both a taken nodePort and, say, a bad port name reports the nodePort;
4. ``ValidateService``; 5. ``services "x" already exists``.

Any failure reverts every allocation of the call (all-or-nothing).

*update* (``beginUpdate`` -> ``BeforeUpdate``): ``patchAllocatedValues`` (a manifest
without clusterIP / nodePorts keeps the allocated ones, nodePorts matched by port
name), ``normalizeClusterIPs``, ``allocateUpdate`` (allocate what is new; what is no
longer needed is released only on success), then ``dropTypeDependentFields`` and
``ValidateServiceUpdate``.

Allocation mirrors the current defaults:

* ClusterIP: the ServiceCIDR/IPAddress allocator (``MultiCIDRServiceAllocator``, GA and
  on by default since v1.33). Usable addresses exclude the network address and, for
  IPv4, the broadcast address. Dynamic allocation picks a random offset in the upper
  band and scans forward (wrapping), falling back to the lower band, whose size is
  ``min(max(16, size/16), 256)`` (KEP-3070); requested IPs may come from anywhere.
* NodePort: the bitmap allocator with the same two bands, lower band
  ``min(max(16, size/32), 128)`` (KEP-3668): 86 ports for 30000-32767.
* Randomness comes from ``random.Random(seed)``: runs with the same seed and the same
  sequence of calls allocate the same values. Allocation is a ``bytearray`` lookup
  (``bytearray.find``), so tens of thousands of Services are cheap.
* LoadBalancer IPs: MetalLB's allocator (``internal/allocator``): a requested IP
  (``metallb.universe.tf/loadBalancerIPs`` / ``metallb.io/loadBalancerIPs``
  annotation, else ``spec.loadBalancerIP``), else a requested pool
  (``metallb.universe.tf/address-pool`` / ``metallb.io/address-pool``), else the first
  free address of the first pool that has one, scanning each pool's ranges in
  ascending order; ``allow-shared-ip`` sharing keys are honoured. As in a real
  cluster, a failure does not reject the Service: it stays ``<pending>`` (empty
  ``status.loadBalancer``) and a ``Warning AllocationFailed`` event is recorded in
  :attr:`ServiceRegistry.events`. Pools are taken in list order (MetalLB iterates a Go
  map for unpinned pools, i.e. in random order).
"""

from __future__ import annotations

import ipaddress
import random
import uuid
from typing import Any, Callable, Iterable, Mapping, Sequence

from testbed.errors import InputError
from testbed.validation import (
    APIError,
    FieldError,
    cluster_ips_related_errors,
    decode_object,
    default_object,
    forbidden,
    go_quote,
    go_string_slice,
    invalid,
    invalid_error,
    is_headless,
    needs_health_check,
    parse_ip_sloppy,
    service_errors,
)

__all__ = [
    "ServiceRegistry",
    "LBPool",
    "object_uid",
    "parse_port_range",
]

# Messages of pkg/registry/core/service/{ipallocator,portallocator}.
ERR_FULL = "range is full"
ERR_IP_ALLOCATED = "provided IP is already allocated"
# ClusterIP out of range: text of the *current default* allocator. With
# MultiCIDRServiceAllocator (GA, default on since v1.33) the MetaAllocator finds no
# ServiceCIDR containing the IP and returns ErrMismatchedNetwork. (The legacy bitmap
# allocator said "the provided IP (<ip>) is not in the valid range. The range of valid
# IPs is <cidr>".)
ERR_IP_MISMATCHED_NETWORK = "the provided network does not match the current range"
ERR_PORT_ALLOCATED = "provided port is already allocated"


def err_port_not_in_range(valid: str) -> str:
    return f"provided port is not in the valid range. The range of valid ports is {valid}"


def object_uid(kind: str, namespace: str | None, name: str) -> str:
    """A stable UID for an object that has none (pods of the cluster model)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"testbed:{kind}:{namespace or ''}/{name}"))


# --------------------------------------------------------------------------------------
# Allocation bitmaps
# --------------------------------------------------------------------------------------


def _range_offset(size: int, minimum: int, maximum: int, step: int) -> int:
    """``calculateRangeOffset``: ``min(max(min, size/step), max)``, 0 for tiny ranges."""
    if size <= minimum:
        return 0
    offset = size // step
    return max(minimum, min(offset, maximum))


class _Bitmap:
    """``randomScanStrategyWithOffset`` over ``size`` items, ``offset`` of them in the
    lower (static) band that dynamic allocation uses only when the upper band is full."""

    def __init__(self, size: int, offset: int, rng: random.Random):
        self.size = size
        self.offset = offset
        self.rng = rng
        self.count = 0
        self.bits = bytearray(size) if size <= (1 << 24) else None
        self.sparse: set[int] = set()

    def has(self, i: int) -> bool:
        if self.bits is not None:
            return self.bits[i] == 1
        return i in self.sparse

    def set(self, i: int) -> bool:
        if self.has(i):
            return False
        if self.bits is not None:
            self.bits[i] = 1
        else:
            self.sparse.add(i)
        self.count += 1
        return True

    def clear(self, i: int) -> None:
        if not self.has(i):
            return
        if self.bits is not None:
            self.bits[i] = 0
        else:
            self.sparse.discard(i)
        self.count -= 1

    def _scan(self, lo: int, hi: int, start: int) -> int | None:
        """First free index in [start, hi), then [lo, start)."""
        if self.bits is not None:
            i = self.bits.find(0, start, hi)
            if i < 0:
                i = self.bits.find(0, lo, start)
            return None if i < 0 else i
        for i in range(start, hi):
            if i not in self.sparse:
                return i
        for i in range(lo, start):
            if i not in self.sparse:
                return i
        return None

    def next_free(self) -> int | None:
        if self.count >= self.size:
            return None
        upper = self.size - self.offset
        if upper > 0:
            i = self._scan(self.offset, self.size, self.offset + self.rng.randrange(upper))
            if i is not None:
                return i
        if self.offset > 0:
            return self._scan(0, self.offset, self.rng.randrange(self.offset))
        return None


class _AllocError(Exception):
    pass


class _IPRange:
    """One ServiceCIDR's allocator."""

    def __init__(self, cidr: ipaddress.IPv4Network | ipaddress.IPv6Network, rng: random.Random):
        self.cidr = cidr
        self.family = "IPv4" if cidr.version == 4 else "IPv6"
        self.first = int(cidr.network_address) + 1
        last = int(cidr.broadcast_address)
        if cidr.version == 4:
            last -= 1
        self.last = last
        size = max(0, self.last - self.first + 1)
        self.bitmap = _Bitmap(size, _range_offset(cidr.num_addresses, 16, 256, 16), rng)

    def _addr(self, i: int) -> str:
        return str(ipaddress.ip_address(self.first + i))

    def index(self, ip: str) -> int | None:
        addr = parse_ip_sloppy(ip)
        if addr is None or addr.version != self.cidr.version:
            return None
        value = int(addr)
        if value < self.first or value > self.last:
            return None
        return value - self.first

    def allocate(self, ip: str) -> str:
        i = self.index(ip)
        if i is None:
            raise _AllocError(ERR_IP_MISMATCHED_NETWORK)
        if not self.bitmap.set(i):
            raise _AllocError(ERR_IP_ALLOCATED)
        return self._addr(i)

    def allocate_next(self) -> str:
        i = self.bitmap.next_free()
        if i is None:
            raise _AllocError(ERR_FULL)
        self.bitmap.set(i)
        return self._addr(i)

    def release(self, ip: str) -> None:
        i = self.index(ip)
        if i is not None:
            self.bitmap.clear(i)

    def has(self, ip: str) -> bool:
        i = self.index(ip)
        return i is not None and self.bitmap.has(i)


def parse_port_range(text: str) -> tuple[int, int]:
    """``net.ParsePortRange``: ``30000-32767``, ``30000+2767`` or a single port.

    Returns ``(base, size)``."""
    value = str(text).strip()
    try:
        if "-" in value:
            lo, hi = (int(p) for p in value.split("-", 1))
            base, size = lo, hi - lo + 1
        elif "+" in value:
            lo, extra = (int(p) for p in value.split("+", 1))
            base, size = lo, extra + 1
        else:
            base, size = int(value), 1
    except ValueError:
        raise InputError(f"unable to parse port range: {value}", field="node_port_range") from None
    if base < 0 or size <= 0 or base + size - 1 > 65535:
        raise InputError(f"invalid port range: {value}", field="node_port_range")
    return base, size


class _PortRange:
    def __init__(self, base: int, size: int, rng: random.Random):
        self.base = base
        self.size = size
        self.bitmap = _Bitmap(size, _range_offset(size, 16, 128, 32), rng)

    def spec(self) -> str:
        """``net.PortRange.String()``."""
        if self.size == 0:
            return ""
        return f"{self.base}-{self.base + self.size - 1}"

    def contains(self, port: int) -> bool:
        return self.base <= port < self.base + self.size

    def allocate(self, port: int) -> None:
        if not self.contains(port):
            raise _AllocError(err_port_not_in_range(self.spec()))
        if not self.bitmap.set(port - self.base):
            raise _AllocError(ERR_PORT_ALLOCATED)

    def allocate_next(self) -> int:
        i = self.bitmap.next_free()
        if i is None:
            raise _AllocError(ERR_FULL)
        self.bitmap.set(i)
        return self.base + i

    def release(self, port: int) -> None:
        if self.contains(port):
            self.bitmap.clear(port - self.base)

    def has(self, port: int) -> bool:
        return self.contains(port) and self.bitmap.has(port - self.base)


class _Txn:
    """Undo log: ``revert()`` runs the undo callbacks; ``commit()`` the deferred ones."""

    def __init__(self) -> None:
        self.undo: list[Callable[[], None]] = []
        self.deferred: list[Callable[[], None]] = []

    def revert(self) -> None:
        for fn in reversed(self.undo):
            fn()
        self.undo.clear()
        self.deferred.clear()

    def commit(self) -> None:
        for fn in self.deferred:
            fn()
        self.undo.clear()
        self.deferred.clear()


# --------------------------------------------------------------------------------------
# MetalLB
# --------------------------------------------------------------------------------------


class LBPool:
    """A MetalLB ``IPAddressPool``: ``addresses`` are CIDRs or ``a.b.c.d-e.f.g.h`` ranges."""

    def __init__(self, name: str, addresses: Sequence[str], auto_assign: bool = True, avoid_buggy_ips: bool = False):
        self.name = name
        self.auto_assign = auto_assign
        self.avoid_buggy_ips = avoid_buggy_ips
        self.ranges: list[tuple[int, int, int]] = []  # (first, last, version)
        if not name:
            raise InputError("load-balancer pool without a name", field="lb_pools")
        for text in addresses or []:
            self.ranges.append(self._parse(str(text).strip()))
        if not self.ranges:
            raise InputError(f"pool {go_quote(name)} has no addresses", field="lb_pools")

    def _parse(self, text: str) -> tuple[int, int, int]:
        if "/" in text:
            try:
                net = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise InputError(f"invalid CIDR {go_quote(text)} in pool {go_quote(self.name)}", field="lb_pools") from None
            return int(net.network_address), int(net.broadcast_address), net.version
        if "-" in text:
            lo_text, hi_text = (p.strip() for p in text.split("-", 1))
            try:
                lo, hi = ipaddress.ip_address(lo_text), ipaddress.ip_address(hi_text)
            except ValueError:
                raise InputError(f"invalid IP range {go_quote(text)} in pool {go_quote(self.name)}", field="lb_pools") from None
            if lo.version != hi.version or int(hi) < int(lo):
                raise InputError(f"invalid IP range {go_quote(text)} in pool {go_quote(self.name)}", field="lb_pools")
            return int(lo), int(hi), lo.version
        raise InputError(
            f"invalid address {go_quote(text)} in pool {go_quote(self.name)}: want a CIDR or a range a.b.c.d-e.f.g.h", field="lb_pools"
        )

    def contains(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if self.avoid_buggy_ips and _buggy(ip):
            return False
        value = int(ip)
        return any(lo <= value <= hi and ip.version == v for lo, hi, v in self.ranges)

    def addresses(self, version: int) -> Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        for lo, hi, v in self.ranges:
            if v != version:
                continue
            for value in range(lo, hi + 1):
                ip = ipaddress.ip_address(value)
                if self.avoid_buggy_ips and _buggy(ip):
                    continue
                yield ip


def _buggy(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """``ipConfusesBuggyFirmwares``: IPv4 ending in .0 or .255."""
    return ip.version == 4 and (int(ip) & 0xFF) in (0, 255)


_ANN_IPS = ("metallb.universe.tf/loadBalancerIPs", "metallb.io/loadBalancerIPs")
_ANN_POOL = ("metallb.universe.tf/address-pool", "metallb.io/address-pool")
_ANN_SHARING = ("metallb.universe.tf/allow-shared-ip", "metallb.io/allow-shared-ip")


def _annotation(meta: Mapping[str, Any], keys: Sequence[str]) -> str:
    annotations = meta.get("annotations") or {}
    for key in keys:
        if annotations.get(key):
            return str(annotations[key])
    return ""


class _MetalLB:
    def __init__(self, pools: Sequence[LBPool]):
        self.pools = list(pools)
        self.by_name = {p.name: p for p in self.pools}
        self.allocated: dict[str, tuple[str, list[str], list[tuple[str, int]], tuple[str, str]]] = {}
        self.ip_users: dict[str, set[str]] = {}

    def _pool_for(self, ips: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> LBPool | None:
        for pool in self.pools:
            if all(pool.contains(ip) for ip in ips):
                return pool
        return None

    def _check_sharing(self, key: str, ip: str, ports: Sequence[tuple[str, int]], sk: tuple[str, str]) -> str | None:
        users = self.ip_users.get(ip)
        if not users:
            return None
        others = sorted(u for u in users if u != key)
        for other in others:
            _, _, other_ports, other_sk = self.allocated[other]
            problem = None
            if not other_sk[0]:
                problem = "existing service does not allow sharing"
            elif not sk[0]:
                problem = "new service does not allow sharing"
            elif other_sk[0] != sk[0]:
                problem = f"sharing key {go_quote(sk[0])} does not match existing sharing key {go_quote(other_sk[0])}"
            elif other_sk[1] != sk[1]:
                problem = f"backend key {go_quote(sk[1])} does not match existing sharing key {go_quote(other_sk[1])}"
            if problem:
                return f"can't change sharing key for {go_quote(key)}, address also in use by {','.join(others)}"
            for port in ports:
                if port in other_ports:
                    return f"port {port[0]}/{port[1]} is already in use on {go_quote(ip)}"
        return None

    def _assign(self, key: str, pool: str, ips: list[str], ports: list[tuple[str, int]], sk: tuple[str, str]) -> None:
        self.unassign(key)
        self.allocated[key] = (pool, ips, ports, sk)
        for ip in ips:
            self.ip_users.setdefault(ip, set()).add(key)

    def unassign(self, key: str) -> None:
        old = self.allocated.pop(key, None)
        if not old:
            return
        for ip in old[1]:
            users = self.ip_users.get(ip)
            if users:
                users.discard(key)
                if not users:
                    del self.ip_users[ip]

    def allocate(self, key: str, svc: Mapping[str, Any]) -> list[str]:
        """Returns the IPs, or raises ``_AllocError`` with MetalLB's reason."""
        meta = svc.get("metadata") or {}
        spec = svc.get("spec") or {}
        ports = [(str(p.get("protocol") or "TCP"), int(p.get("port") or 0)) for p in spec.get("ports") or []]
        backend = ""
        if spec.get("externalTrafficPolicy") == "Local":
            backend = ",".join(f"{k}={v}" for k, v in sorted((spec.get("selector") or {}).items()))
        sk = (_annotation(meta, _ANN_SHARING), backend)
        version = 6 if (spec.get("ipFamilies") or ["IPv4"])[0] == "IPv6" else 4
        requested_text = _annotation(meta, _ANN_IPS) or str(spec.get("loadBalancerIP") or "")
        if requested_text:
            wanted = [s.strip() for s in requested_text.split(",") if s.strip()]
            parsed = [parse_ip_sloppy(s) for s in wanted]
            if any(p is None for p in parsed):
                raise _AllocError(f"invalid IP {go_quote(requested_text)} requested")
            ips = [str(p) for p in parsed]
            pool = self._pool_for(parsed)  # type: ignore[arg-type]
            if pool is None:
                raise _AllocError("[" + " ".join(go_quote(ip) for ip in ips) + "] is not allowed in config")
            for ip in ips:
                problem = self._check_sharing(key, ip, ports, sk)
                if problem:
                    raise _AllocError(problem)
            self._assign(key, pool.name, ips, ports, sk)
            return ips
        if key in self.allocated:
            pool_name, ips, _, _ = self.allocated[key]
            for ip in ips:
                problem = self._check_sharing(key, ip, ports, sk)
                if problem:
                    raise _AllocError(problem)
            self._assign(key, pool_name, ips, ports, sk)
            return ips
        pool_name = _annotation(meta, _ANN_POOL)
        if pool_name:
            pool = self.by_name.get(pool_name)
            if pool is None:
                raise _AllocError(f"unknown pool {go_quote(pool_name)}")
            candidates = [pool]
        else:
            candidates = [p for p in self.pools if p.auto_assign]
        for pool in candidates:
            for ip in pool.addresses(version):
                text = str(ip)
                if self._check_sharing(key, text, ports, sk) is None:
                    self._assign(key, pool.name, [text], ports, sk)
                    return [text]
        if pool_name:
            raise _AllocError(f"no available IPs in pool {go_quote(pool_name)}")
        raise _AllocError("no available IPs")


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------


def _clone(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def _omit_empty(obj: dict[str, Any]) -> None:
    """Drop what the API server would not return: ``omitempty`` fields of ServiceSpec,
    ServicePort and ObjectMeta holding their zero value (``ports: []``,
    ``selector: {}``, ``nodePort: 0``, ``name: ""``...)."""
    for part in (obj.get("metadata"), obj.get("spec")):
        if isinstance(part, dict):
            for key in [k for k, v in part.items() if v is None or v == [] or v == {} or v == "" or v is False or v == 0]:
                if key in ("allocateLoadBalancerNodePorts",) and part[key] is False:
                    continue
                del part[key]
    for port in (obj.get("spec") or {}).get("ports") or []:
        if isinstance(port, dict):
            for key in [k for k, v in port.items() if k in ("name", "nodePort", "appProtocol") and v in (None, "", 0)]:
                del port[key]


def _needs_cluster_ip(spec: Mapping[str, Any]) -> bool:
    return spec.get("type") != "ExternalName"


def _needs_node_port(spec: Mapping[str, Any]) -> bool:
    return spec.get("type") in ("NodePort", "LoadBalancer")


def _should_allocate_node_ports(spec: Mapping[str, Any]) -> bool:
    if spec.get("type") == "NodePort":
        return True
    if spec.get("type") == "LoadBalancer":
        return spec.get("allocateLoadBalancerNodePorts") is not False
    return False


def _node_ports(spec: Mapping[str, Any]) -> list[int]:
    """``collectServiceNodePorts``: each distinct non-zero nodePort."""
    seen: list[int] = []
    for port in spec.get("ports") or []:
        np = int(port.get("nodePort") or 0)
        if np and np not in seen:
            seen.append(np)
    return seen


def _family_of(ip: str) -> str:
    addr = parse_ip_sloppy(ip)
    return "IPv6" if addr is not None and addr.version == 6 else "IPv4"


def _not_found(namespace: str, name: str) -> APIError:
    return APIError(f'services {go_quote(name)} not found', reason="NotFound", kind="Service", name=name)


def _internal(message: str, file: str | None) -> APIError:
    return APIError(f"Internal error occurred: {message}", reason="InternalError", kind="Service", file=file)


class ServiceRegistry:
    """Services as kube-apiserver stores them, with allocation.

    ``service_cidr`` is ``--service-cluster-ip-range`` (one CIDR, or two of different
    families separated by a comma for dual-stack), ``node_port_range`` is
    ``--service-node-port-range``, ``lb_pools`` are MetalLB pools
    (``{"name": ..., "addresses": [...], "autoAssign": bool, "avoidBuggyIPs": bool}``
    dicts or :class:`LBPool`), ``seed`` seeds the allocators.

    ``system_services=True`` first creates kubespray's two system Services, which
    reserves their ClusterIPs: ``default/kubernetes`` at the first address of the
    range (10.233.0.1 for kubespray's 10.233.0.0/18; port https 443 -> 6443, no
    selector) and ``kube-system/coredns`` at the third (10.233.0.3; ports dns 53/UDP,
    dns-tcp 53/TCP, metrics 9153/TCP, selector ``k8s-app: kube-dns``).
    """

    def __init__(
        self,
        service_cidr: str | Sequence[str] = "10.233.0.0/18",
        node_port_range: str = "30000-32767",
        lb_pools: Sequence[Mapping[str, Any] | LBPool] | None = None,
        seed: int = 0,
        system_services: bool = False,
    ):
        self._rng = random.Random(seed)
        self._uid_rng = random.Random(f"{seed}/uid")
        cidrs = [c.strip() for c in service_cidr.split(",")] if isinstance(service_cidr, str) else list(service_cidr)
        if not cidrs or len(cidrs) > 2:
            raise InputError(f"service CIDR: expected one CIDR or two of different families, got {service_cidr!r}", field="service_cidr")
        self._ranges: dict[str, _IPRange] = {}
        for text in cidrs:
            try:
                net = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise InputError(f"invalid service CIDR {go_quote(text)}", field="service_cidr") from None
            if net.version == 4 and net.prefixlen < 12:
                raise InputError(
                    f"specified --service-cluster-ip-range {text} is too large; for 32-bit addresses, the mask must be >= 12",
                    field="service_cidr",
                )
            if net.version == 6 and net.prefixlen < 64:
                raise InputError(f"shortest allowed prefix length for service CIDR is 64, got {net.prefixlen}", field="service_cidr")
            rng = _IPRange(net, self._rng)
            if rng.family in self._ranges:
                raise InputError(f"service CIDRs {service_cidr!r} must be of different IP families", field="service_cidr")
            self._ranges[rng.family] = rng
        self.default_family = next(iter(self._ranges))
        base, size = parse_port_range(node_port_range)
        self._ports = _PortRange(base, size, self._rng)
        pools = []
        for pool in lb_pools or []:
            if isinstance(pool, LBPool):
                pools.append(pool)
            else:
                pools.append(
                    LBPool(
                        str(pool.get("name") or ""),
                        list(pool.get("addresses") or []),
                        auto_assign=pool.get("autoAssign", pool.get("auto_assign", True)) is not False,
                        avoid_buggy_ips=bool(pool.get("avoidBuggyIPs", pool.get("avoid_buggy_ips", False))),
                    )
                )
        names = [p.name for p in pools]
        if len(set(names)) != len(names):
            raise InputError("load-balancer pool names must be unique", field="lb_pools")
        self._lb = _MetalLB(pools)
        self._services: dict[tuple[str, str], dict[str, Any]] = {}
        #: Events a cluster would show (``kubectl get events``), oldest first.
        self.events: list[dict[str, str]] = []
        if system_services:
            self._create_system_services()

    # ---- public API ----------------------------------------------------------------

    @property
    def service_cidrs(self) -> list[str]:
        return [str(r.cidr) for r in self._ranges.values()]

    @property
    def node_port_range(self) -> str:
        return self._ports.spec()

    def create(self, svc: Mapping[str, Any], file: str | None = None) -> dict[str, Any]:
        """``kubectl create`` of one Service; returns the stored object (a copy)."""
        obj = self._decode(svc, file)
        meta = obj["metadata"]
        obj["status"] = {"loadBalancer": {}}  # PrepareForCreate clears status
        key = (meta["namespace"], str(meta.get("name") or ""))
        txn = _Txn()
        try:
            self._init_ip_family_fields(obj, None, file)
            self._alloc_cluster_ips(obj, txn, file)
            self._alloc_node_ports(obj, txn, file)
            errors = service_errors(obj)
            if errors:
                raise invalid_error("Service", key[1], errors, file)
            if key in self._services:
                raise APIError(f"services {go_quote(key[1])} already exists", reason="AlreadyExists", kind="Service", name=key[1], file=file)
        except BaseException:
            txn.revert()
            raise
        txn.commit()
        meta["uid"] = str(uuid.UUID(int=self._uid_rng.getrandbits(128), version=4))
        _omit_empty(obj)
        self._services[key] = obj
        self._sync_load_balancer(obj)
        return _clone(obj)

    def update(self, svc: Mapping[str, Any], file: str | None = None) -> dict[str, Any]:
        """``kubectl replace`` (PUT) of an existing Service; returns the stored object.

        Allocated values the manifest leaves out (clusterIP(s), nodePorts matched by port
        name, healthCheckNodePort) are kept, as ``patchAllocatedValues`` does.
        """
        obj = self._decode(svc, file, create=False)
        meta, spec = obj["metadata"], obj["spec"]
        key = (meta["namespace"], str(meta.get("name") or ""))
        old = self._services.get(key)
        if old is None:
            raise APIError(f"services {go_quote(key[1])} not found", reason="NotFound", kind="Service", name=key[1], file=file)
        old_spec = old["spec"]
        obj["status"] = _clone(old.get("status") or {"loadBalancer": {}})
        meta["uid"] = old["metadata"].get("uid")
        # beginUpdate: patchAllocatedValues, normalizeClusterIPs, allocateUpdate; then
        # BeforeUpdate: PrepareForUpdate (dropTypeDependentFields), ValidateServiceUpdate.
        self._patch_allocated_values(spec, old_spec)
        self._normalize_cluster_ips_update(spec, old_spec)
        txn = _Txn()
        try:
            self._init_ip_family_fields(obj, old, file)
            self._update_cluster_ips(obj, old, txn, file)
            self._update_node_ports(obj, old, txn, file)
            self._drop_type_dependent_fields(obj, old)
            errors = self._update_errors(obj["spec"], old_spec) + service_errors(obj)
            if errors:
                raise invalid_error("Service", key[1], errors, file)
        except BaseException:
            txn.revert()
            raise
        txn.commit()
        _omit_empty(obj)
        self._services[key] = obj
        self._sync_load_balancer(obj)
        return _clone(obj)

    def apply(self, svc: Mapping[str, Any], file: str | None = None) -> dict[str, Any]:
        """Create the Service, or update it if it exists (``kubectl apply``)."""
        meta = svc.get("metadata") if isinstance(svc, dict) else None
        namespace = str((meta or {}).get("namespace") or "default")
        name = str((meta or {}).get("name") or "")
        if (namespace, name) in self._services:
            return self.update(svc, file)
        return self.create(svc, file)

    def delete(self, namespace: str, name: str) -> dict[str, Any]:
        """Delete a Service and release everything it holds; returns it."""
        key = (namespace or "default", name)
        obj = self._services.pop(key, None)
        if obj is None:
            raise _not_found(*key)
        spec = obj["spec"]
        for ip in spec.get("clusterIPs") or []:
            if ip and ip != "None":
                rng = self._ranges.get(_family_of(ip))
                if rng:
                    rng.release(ip)
        for np in _node_ports(spec):
            self._ports.release(np)
        if spec.get("healthCheckNodePort"):
            self._ports.release(int(spec["healthCheckNodePort"]))
        self._lb.unassign(f"{key[0]}/{key[1]}")
        return _clone(obj)

    def restore(self, services: Iterable[Mapping[str, Any]]) -> None:
        """Reload Services stored by an earlier run (e.g. the cluster state file).

        Their clusterIPs, nodePorts, healthCheckNodePorts and LoadBalancer IPs are
        marked allocated again -- what the ClusterIP/NodePort repair controllers and
        MetalLB's controller do at start-up -- without re-validating them. A value two
        Services claim, or a Service stored twice, raises :class:`InputError`.
        """
        for svc in services:
            obj = _clone(dict(svc))
            meta = obj.setdefault("metadata", {})
            spec = obj.setdefault("spec", {})
            key = (str(meta.get("namespace") or "default"), str(meta.get("name") or ""))
            meta["namespace"] = key[0]
            if key in self._services:
                raise InputError(f'services {go_quote(key[1])} already exists', field="services")
            txn = _Txn()
            try:
                for ip in spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else []):
                    if ip == "None" or spec.get("type") == "ExternalName":
                        continue
                    rng = self._ranges.get(_family_of(ip))
                    idx = rng.index(ip) if rng is not None else None
                    if rng is None or idx is None or not rng.bitmap.set(idx):
                        raise InputError(f"service {key[0]}/{key[1]}: clusterIP {ip} is out of range or already allocated", field="services")
                    txn.undo.append(lambda r=rng, i=idx: r.bitmap.clear(i))
                numbers = _node_ports(spec) + ([int(spec["healthCheckNodePort"])] if spec.get("healthCheckNodePort") else [])
                for np in numbers:
                    if not self._ports.contains(np) or not self._ports.bitmap.set(np - self._ports.base):
                        raise InputError(f"service {key[0]}/{key[1]}: nodePort {np} is out of range or already allocated", field="services")
                    txn.undo.append(lambda p=np: self._ports.release(p))
            except InputError:
                txn.revert()
                raise
            meta.setdefault("uid", str(uuid.UUID(int=self._uid_rng.getrandbits(128), version=4)))
            ingress = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
            ips = [str(i["ip"]) for i in ingress if i.get("ip")]
            if spec.get("type") == "LoadBalancer" and ips:
                parsed = [parse_ip_sloppy(ip) for ip in ips]
                pool = self._lb._pool_for([p for p in parsed if p is not None])
                ports = [(str(p.get("protocol") or "TCP"), int(p.get("port") or 0)) for p in spec.get("ports") or []]
                backend = ""
                if spec.get("externalTrafficPolicy") == "Local":
                    backend = ",".join(f"{k}={v}" for k, v in sorted((spec.get("selector") or {}).items()))
                self._lb._assign(f"{key[0]}/{key[1]}", pool.name if pool else "", ips, ports, (_annotation(meta, _ANN_SHARING), backend))
            self._services[key] = obj

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        obj = self._services.get((namespace or "default", name))
        if obj is None:
            raise _not_found(namespace, name)
        return _clone(obj)

    def list(self) -> list[dict[str, Any]]:
        """Every stored Service, ordered by namespace then name (``kubectl get -A``)."""
        return [_clone(self._services[k]) for k in sorted(self._services)]

    def __len__(self) -> int:
        return len(self._services)

    def __contains__(self, key: object) -> bool:
        return key in self._services

    def cluster_ip_allocated(self, ip: str) -> bool:
        rng = self._ranges.get(_family_of(ip))
        return bool(rng and rng.has(ip))

    def node_port_allocated(self, port: int) -> bool:
        return self._ports.has(port)

    # ---- steps ---------------------------------------------------------------------

    def _decode(self, svc: Mapping[str, Any], file: str | None, create: bool = True) -> dict[str, Any]:
        version, kind = decode_object(svc, file)
        if kind != "Service":
            raise InputError(f"expected a Service, got {version} {kind}", file=file)
        obj = default_object(_clone(dict(svc)))  # also normalizeClusterIPs, right for a create
        if not create:
            # an update normalizes clusterIPs against the old object instead
            given = (svc.get("spec") or {}).get("clusterIPs")
            if given is None:
                obj["spec"].pop("clusterIPs", None)
            else:
                obj["spec"]["clusterIPs"] = _clone(given)
        obj.pop("status", None)
        return obj

    def _init_ip_family_fields(self, obj: dict[str, Any], old: Mapping[str, Any] | None, file: str | None) -> None:
        """``initIPFamilyFields``."""
        spec = obj["spec"]
        name = str(obj["metadata"].get("name") or "")
        if spec.get("type") == "ExternalName":
            return
        old_spec = (old or {}).get("spec") or {}
        if spec.get("ipFamilyPolicy") is None:
            if old is not None and old_spec.get("ipFamilyPolicy") is not None:
                spec["ipFamilyPolicy"] = old_spec["ipFamilyPolicy"]
            elif spec.get("clusterIP") == "None" and not spec.get("selector"):
                spec["ipFamilyPolicy"] = "RequireDualStack"
            else:
                spec["ipFamilyPolicy"] = "SingleStack"
        errors = cluster_ips_related_errors(spec)
        if errors:
            raise invalid_error("Service", name, errors, file)
        errors = []
        policy = spec["ipFamilyPolicy"]
        cluster_ips = list(spec.get("clusterIPs") or [])
        families = list(spec.get("ipFamilies") or [])
        if old is not None:
            if policy == "SingleStack":
                if cluster_ips == list(old_spec.get("clusterIPs") or []) and len(cluster_ips) > 1:
                    cluster_ips = cluster_ips[:1]
                    spec["clusterIPs"] = cluster_ips
                if families == list(old_spec.get("ipFamilies") or []) and len(families) > 1:
                    families = families[:1]
                    spec["ipFamilies"] = families
            else:
                if len(cluster_ips) < len(old_spec.get("clusterIPs") or []):
                    errors.append(invalid("spec.ipFamilyPolicy", policy, "must be 'SingleStack' to release the secondary cluster IP"))
                if len(families) < len(old_spec.get("ipFamilies") or []):
                    errors.append(invalid("spec.ipFamilyPolicy", policy, "must be 'SingleStack' to release the secondary IP family"))
        if policy == "SingleStack":
            if len(cluster_ips) == 2:
                errors.append(
                    invalid("spec.ipFamilyPolicy", policy, "must be 'RequireDualStack' or 'PreferDualStack' when multiple cluster IPs are specified")
                )
            if len(families) == 2:
                errors.append(
                    invalid("spec.ipFamilyPolicy", policy, "must be 'RequireDualStack' or 'PreferDualStack' when multiple IP families are specified")
                )
        for i, ip in enumerate(cluster_ips):
            if ip == "None":
                break
            fam = _family_of(ip)
            if i >= len(families):
                if fam not in self._ranges:
                    errors.append(invalid(f"spec.clusterIPs[{i}]", go_string_slice(cluster_ips), f"{fam} is not configured on this cluster"))
                else:
                    families.append(fam)
        spec["ipFamilies"] = families
        if errors:
            raise invalid_error("Service", name, errors, file)
        if spec.get("clusterIP") == "None" and not spec.get("selector"):
            if not families:
                families.append(self.default_family)
            if len(families) < 2 and policy != "SingleStack":
                families.append("IPv6" if families[0] == "IPv4" else "IPv4")
            return
        if policy == "RequireDualStack" and len(self._ranges) < 2:
            errors.append(invalid("spec.ipFamilyPolicy", policy, "this cluster is not configured for dual-stack services"))
        for i, fam in enumerate(families):
            if fam not in self._ranges:
                errors.append(invalid(f"spec.ipFamilies[{i}]", fam, "not configured on this cluster"))
        if errors:
            raise invalid_error("Service", name, errors, file)
        if not families:
            families.append(self.default_family)
        if policy != "SingleStack" and len(families) == 1 and len(self._ranges) == 2:
            families.append("IPv6" if families[0] == "IPv4" else "IPv4")

    def _alloc_ips(self, obj: dict[str, Any], to_alloc: dict[str, str], txn: _Txn, file: str | None) -> dict[str, str]:
        """``allocIPs``: requested IPs first-come in family order, else dynamic."""
        spec = obj["spec"]
        allocated: dict[str, str] = {}
        for family, ip in to_alloc.items():
            rng = self._ranges[family]
            try:
                if not ip:
                    got = rng.allocate_next()
                else:
                    if parse_ip_sloppy(ip) is None:
                        raise _internal(f"failed to parse service IP {go_quote(ip)}", file)
                    got = rng.allocate(ip)
            except _AllocError as exc:
                if not ip:
                    raise _internal(f"failed to allocate a serviceIP: {exc}", file) from None
                raise invalid_error(
                    "Service",
                    str(obj["metadata"].get("name") or ""),
                    [invalid("spec.clusterIPs", go_string_slice(spec.get("clusterIPs")), f"failed to allocate IP {ip}: {exc}")],
                    file,
                ) from None
            txn.undo.append(lambda r=rng, g=got: r.release(g))
            allocated[family] = ip or got
        return allocated

    def _alloc_cluster_ips(self, obj: dict[str, Any], txn: _Txn, file: str | None) -> None:
        """``allocClusterIPs``."""
        spec = obj["spec"]
        if spec.get("type") == "ExternalName":
            return
        if spec.get("clusterIPs") and spec["clusterIPs"][0] == "None":
            return
        cluster_ips = list(spec.get("clusterIPs") or [])
        to_alloc: dict[str, str] = {}
        for i, family in enumerate(spec.get("ipFamilies") or []):
            if i > len(cluster_ips) - 1:
                cluster_ips.append("")
            to_alloc[family] = cluster_ips[i]
        spec["clusterIPs"] = cluster_ips
        allocated = self._alloc_ips(obj, to_alloc, txn, file)
        for family, ip in allocated.items():
            i = spec["ipFamilies"].index(family)
            spec["clusterIPs"][i] = ip
            if i == 0:
                spec["clusterIP"] = ip

    def _alloc_node_ports(self, obj: dict[str, Any], txn: _Txn, file: str | None) -> None:
        """``txnAllocNodePorts``: ``initNodePorts`` then the health-check nodePort."""
        spec = obj["spec"]
        name = str(obj["metadata"].get("name") or "")
        if _needs_node_port(spec):
            ports = spec.get("ports") or []
            by_port: dict[int, int] = {}
            for i, port in enumerate(ports):
                if not port.get("nodePort") and not _should_allocate_node_ports(spec):
                    continue
                number = int(port.get("port") or 0)
                already = by_port.get(number, 0)
                if already == 0:
                    requested = next((int(p.get("nodePort") or 0) for p in ports if int(p.get("port") or 0) == number and p.get("nodePort")), 0)
                    if requested:
                        self._take_port(requested, txn, name, f"spec.ports[{i}].nodePort", file)
                        port["nodePort"] = requested
                        by_port[number] = requested
                    else:
                        port["nodePort"] = self._next_port(txn, "failed to allocate a nodePort: ", file)
                        by_port[number] = port["nodePort"]
                elif int(port.get("nodePort") or 0) != already:
                    if not port.get("nodePort"):
                        port["nodePort"] = already
                    else:
                        self._take_port(int(port["nodePort"]), txn, name, f"spec.ports[{i}].nodePort", file)
        if needs_health_check(spec):
            self._alloc_health_check_node_port(spec, txn, file)

    def _take_port(self, port: int, txn: _Txn, name: str, path: str, file: str | None) -> None:
        try:
            self._ports.allocate(port)
        except _AllocError as exc:
            raise invalid_error("Service", name, [invalid(path, port, str(exc))], file) from None
        txn.undo.append(lambda p=port: self._ports.release(p))

    def _next_port(self, txn: _Txn, prefix: str, file: str | None) -> int:
        try:
            port = self._ports.allocate_next()
        except _AllocError as exc:
            raise _internal(f"{prefix}{exc}", file) from None
        txn.undo.append(lambda p=port: self._ports.release(p))
        return port

    def _alloc_health_check_node_port(self, spec: dict[str, Any], txn: _Txn, file: str | None) -> None:
        hcnp = int(spec.get("healthCheckNodePort") or 0)
        if hcnp:
            try:
                self._ports.allocate(hcnp)
            except _AllocError as exc:
                raise _internal(f"failed to allocate requested HealthCheck NodePort {hcnp}: {exc}", file) from None
            txn.undo.append(lambda p=hcnp: self._ports.release(p))
        else:
            spec["healthCheckNodePort"] = self._next_port(txn, "failed to allocate a HealthCheck NodePort 0: ", file)

    # ---- update helpers -------------------------------------------------------------

    @staticmethod
    def _patch_allocated_values(spec: dict[str, Any], old_spec: Mapping[str, Any]) -> None:
        """``patchAllocatedValues``."""
        if _needs_cluster_ip(old_spec) and _needs_cluster_ip(spec):
            if not spec.get("clusterIP"):
                if old_spec.get("clusterIP"):
                    spec["clusterIP"] = old_spec["clusterIP"]
            if not spec.get("clusterIPs") and old_spec.get("clusterIPs"):
                spec["clusterIPs"] = list(old_spec["clusterIPs"])
        if _needs_node_port(old_spec) and _needs_node_port(spec):
            used = set(_node_ports(old_spec)) & set(_node_ports(spec))
            by_name = {str(p.get("name") or ""): int(p.get("nodePort") or 0) for p in old_spec.get("ports") or []}
            for port in spec.get("ports") or []:
                if not port.get("nodePort"):
                    old_value = by_name.get(str(port.get("name") or ""), 0)
                    if old_value and old_value not in used:
                        port["nodePort"] = old_value
        if needs_health_check(old_spec) and needs_health_check(spec) and not spec.get("healthCheckNodePort"):
            if old_spec.get("healthCheckNodePort"):
                spec["healthCheckNodePort"] = old_spec["healthCheckNodePort"]

    @staticmethod
    def _normalize_cluster_ips_update(spec: dict[str, Any], old_spec: Mapping[str, Any]) -> None:
        """``normalizeClusterIPs`` for an update."""
        old_ip = old_spec.get("clusterIP") or ""
        new_ip = spec.get("clusterIP") or ""
        same_plural = list(old_spec.get("clusterIPs") or []) == list(spec.get("clusterIPs") or [])
        if new_ip != old_ip and same_plural:
            if not new_ip:
                spec.pop("clusterIPs", None)
            else:
                spec["clusterIPs"] = [new_ip]
        elif not spec.get("clusterIPs") and new_ip:
            spec["clusterIPs"] = [new_ip]

    @staticmethod
    def _drop_type_dependent_fields(obj: dict[str, Any], old: Mapping[str, Any]) -> None:
        """``dropTypeDependentFields``: wipe what the new type does not use, if unchanged."""
        spec, old_spec = obj["spec"], old["spec"]
        if _needs_cluster_ip(old_spec) and not _needs_cluster_ip(spec):
            if list(spec.get("clusterIPs") or []) == list(old_spec.get("clusterIPs") or []):
                spec.pop("clusterIP", None)
                spec.pop("clusterIPs", None)
            if list(spec.get("ipFamilies") or []) == list(old_spec.get("ipFamilies") or []):
                spec.pop("ipFamilies", None)
            if spec.get("ipFamilyPolicy") == old_spec.get("ipFamilyPolicy"):
                spec.pop("ipFamilyPolicy", None)
        if _needs_node_port(old_spec) and not _needs_node_port(spec):
            old_ports = [int(p.get("nodePort") or 0) for p in old_spec.get("ports") or []]
            new_ports = [int(p.get("nodePort") or 0) for p in spec.get("ports") or []]
            if old_ports == new_ports or not any(new_ports):
                for port in spec.get("ports") or []:
                    port.pop("nodePort", None)
        if needs_health_check(old_spec) and not needs_health_check(spec):
            if int(spec.get("healthCheckNodePort") or 0) in (0, int(old_spec.get("healthCheckNodePort") or 0)):
                spec.pop("healthCheckNodePort", None)
        if old_spec.get("type") == "LoadBalancer" and spec.get("type") != "LoadBalancer":
            if spec.get("allocateLoadBalancerNodePorts") == old_spec.get("allocateLoadBalancerNodePorts"):
                spec.pop("allocateLoadBalancerNodePorts", None)
            if spec.get("loadBalancerClass") == old_spec.get("loadBalancerClass"):
                spec.pop("loadBalancerClass", None)
        accessible_old = old_spec.get("type") in ("NodePort", "LoadBalancer") or bool(old_spec.get("externalIPs"))
        accessible_new = spec.get("type") in ("NodePort", "LoadBalancer") or (
            spec.get("type") == "ClusterIP" and bool(spec.get("externalIPs"))
        )
        if accessible_old and not accessible_new and spec.get("externalTrafficPolicy") == old_spec.get("externalTrafficPolicy"):
            spec.pop("externalTrafficPolicy", None)
        if spec.get("type") != "LoadBalancer":
            obj["status"] = {"loadBalancer": {}}

    @staticmethod
    def _update_errors(spec: Mapping[str, Any], old_spec: Mapping[str, Any]) -> list[FieldError]:
        """The update-only checks of ``ValidateServiceUpdate``."""
        errors: list[FieldError] = []
        new_ips = list(spec.get("clusterIPs") or [])
        old_ips = list(old_spec.get("clusterIPs") or [])
        if spec.get("type") != "ExternalName" and old_spec.get("type") != "ExternalName" and not (is_headless(spec) and is_headless(old_spec)):
            if len(old_ips) == len(new_ips):
                for i, ip in enumerate(old_ips):
                    if ip != new_ips[i]:
                        errors.append(invalid(f"spec.clusterIPs[{i}]", go_string_slice(new_ips), "may not change once set"))
            elif len(old_ips) > len(new_ips):
                if not new_ips:
                    errors.append(invalid("spec.clusterIPs[0]", go_string_slice(new_ips), "primary clusterIP can not be unset"))
                elif new_ips[0] != old_ips[0]:
                    errors.append(invalid("spec.clusterIPs[0]", go_string_slice(new_ips), "may not change once set"))
            elif old_ips and new_ips[0] != old_ips[0]:
                errors.append(invalid("spec.clusterIPs[0]", go_string_slice(new_ips), "may not change once set"))
        if old_spec.get("type") == "LoadBalancer" and spec.get("type") == "LoadBalancer":
            if old_spec.get("loadBalancerClass") != spec.get("loadBalancerClass"):
                errors.append(invalid("spec.loadBalancerClass", spec.get("loadBalancerClass"), "may not change once set"))
        if needs_health_check(old_spec) and needs_health_check(spec):
            if spec.get("healthCheckNodePort") != old_spec.get("healthCheckNodePort"):
                errors.append(forbidden("spec.healthCheckNodePort", "field is immutable"))
        return errors

    def _update_cluster_ips(self, obj: dict[str, Any], old: Mapping[str, Any], txn: _Txn, file: str | None) -> None:
        """``updateClusterIPs`` (cases A-D)."""
        spec, old_spec = obj["spec"], old["spec"]
        if old_spec.get("type") == "ExternalName" and spec.get("type") != "ExternalName":
            self._alloc_cluster_ips(obj, txn, file)
            return
        if old_spec.get("clusterIPs") and old_spec["clusterIPs"][0] == "None":
            return
        if old_spec.get("type") != "ExternalName" and spec.get("type") == "ExternalName":
            for ip in old_spec.get("clusterIPs") or []:
                rng = self._ranges.get(_family_of(ip))
                if rng:
                    txn.deferred.append(lambda r=rng, i=ip: r.release(i))
            return
        old_fams, new_fams = list(old_spec.get("ipFamilies") or []), list(spec.get("ipFamilies") or [])
        if len(old_fams) == 1 and len(new_fams) == 2:
            ips = list(spec.get("clusterIPs") or [])
            if len(ips) < 2:
                ips.append("")
            spec["clusterIPs"] = ips
            allocated = self._alloc_ips(obj, {new_fams[1]: ips[1]}, txn, file)
            spec["clusterIPs"][1] = allocated[new_fams[1]]
        elif len(old_fams) == 2 and len(new_fams) == 1:
            ip = old_spec["clusterIPs"][1]
            rng = self._ranges.get(old_fams[1])
            if rng:
                txn.deferred.append(lambda r=rng, i=ip: r.release(i))

    def _update_node_ports(self, obj: dict[str, Any], old: Mapping[str, Any], txn: _Txn, file: str | None) -> None:
        """``txnUpdateNodePorts``."""
        spec, old_spec = obj["spec"], old["spec"]
        name = str(obj["metadata"].get("name") or "")
        if _needs_node_port(old_spec) and spec.get("type") in ("ExternalName", "ClusterIP"):
            for np in _node_ports(old_spec):
                txn.deferred.append(lambda p=np: self._ports.release(p))
        if _needs_node_port(spec):
            old_numbers = _node_ports(old_spec)
            taken: set[int] = set()
            seen: list[tuple[str, int]] = []
            for i, port in enumerate(spec.get("ports") or []):
                if not port.get("nodePort") and not _should_allocate_node_ports(spec):
                    continue
                np = int(port.get("nodePort") or 0)
                if np:
                    if np not in old_numbers and np not in taken:
                        self._take_port(np, txn, name, f"spec.ports[{i}].nodePort", file)
                        taken.add(np)
                else:
                    np = self._next_port(txn, "failed to allocate a nodePort: ", file)
                    port["nodePort"] = np
                pair = (str(port.get("protocol") or "TCP"), np)
                if pair in seen:
                    raise _internal(f"duplicate nodePort: {{{pair[0]} {pair[1]}}}", file)
                seen.append(pair)
            new_numbers = _node_ports(spec)
            for np in old_numbers:
                if np not in new_numbers:
                    txn.deferred.append(lambda p=np: self._ports.release(p))
        needed, needs = needs_health_check(old_spec), needs_health_check(spec)
        if not needed and needs:
            self._alloc_health_check_node_port(spec, txn, file)
        elif needed and not needs:
            hc = int(old_spec.get("healthCheckNodePort") or 0)
            if hc:
                txn.deferred.append(lambda p=hc: self._ports.release(p))

    # ---- LoadBalancer (MetalLB) ------------------------------------------------------

    def _sync_load_balancer(self, obj: dict[str, Any]) -> None:
        meta, spec = obj["metadata"], obj["spec"]
        key = f"{meta['namespace']}/{meta['name']}"
        if spec.get("type") != "LoadBalancer" or spec.get("loadBalancerClass"):
            self._lb.unassign(key)
            obj["status"] = {"loadBalancer": {}}
            return
        before = [i.get("ip") for i in ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []]
        try:
            ips = self._lb.allocate(key, obj)
        except _AllocError as exc:
            self._lb.unassign(key)
            obj["status"] = {"loadBalancer": {}}
            self.events.append(
                {
                    "namespace": meta["namespace"],
                    "object": f"service/{meta['name']}",
                    "type": "Warning",
                    "reason": "AllocationFailed",
                    "source": "metallb-controller",
                    "message": f"Failed to allocate IP for {go_quote(key)}: {exc}",
                }
            )
            return
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": ip, "ipMode": "VIP"} for ip in ips]}}
        if before != ips:
            self.events.append(
                {
                    "namespace": meta["namespace"],
                    "object": f"service/{meta['name']}",
                    "type": "Normal",
                    "reason": "IPAllocated",
                    "source": "metallb-controller",
                    "message": "Assigned IP [" + " ".join(go_quote(ip) for ip in ips) + "]",
                }
            )

    # ---- bootstrap -----------------------------------------------------------------

    def _create_system_services(self) -> None:
        rng = self._ranges[self.default_family]
        first = str(ipaddress.ip_address(rng.first))
        third = str(ipaddress.ip_address(rng.first + 2))
        self.create(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"component": "apiserver", "provider": "kubernetes"}},
                "spec": {"clusterIP": first, "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]},
            }
        )
        self.create(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": "coredns",
                    "namespace": "kube-system",
                    "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "coredns", "addonmanager.kubernetes.io/mode": "Reconcile"},
                    "annotations": {"prometheus.io/port": "9153", "prometheus.io/scrape": "true", "createdby": "kubespray"},
                },
                "spec": {
                    "selector": {"k8s-app": "kube-dns"},
                    "clusterIP": third,
                    "ports": [
                        {"name": "dns", "port": 53, "protocol": "UDP"},
                        {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                        {"name": "metrics", "port": 9153, "protocol": "TCP"},
                    ],
                },
            }
        )
