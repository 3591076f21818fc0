"""Kubernetes manifests checked the way ``kubectl apply`` + kube-apiserver check them.

:func:`validate_object` takes one object as ``yaml.safe_load`` returns it and raises
:class:`APIError` (an :class:`~testbed.errors.InputError`) whose single line is what a
user would read from ``kubectl apply``, e.g.::

    topologies/x.yaml: The Service "my-svc" is invalid: spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive

The three stages kube-apiserver runs are mirrored in order:

1. **Decode** (``BadRequest``): a field of the wrong JSON type, and -- kubectl's default
   ``--validate=strict`` (server-side field validation) -- an unknown field::

       Service in version "v1" cannot be handled as a Service: strict decoding error: unknown field "spec.portz"

   Strict checking covers what this project reads: object metadata, the whole Service,
   the whole EndpointSlice, workload specs down to the pod template, containers'
   ``ports``. Unknown fields elsewhere in a pod spec (volumes, probes, security
   contexts...) are ignored rather than risk rejecting a field newer than this table.
2. **Defaulting** (``pkg/apis/core/v1/defaults.go``, ``pkg/apis/apps/v1/defaults.go``):
   validation runs on the defaulted object, as in the API server, so an omitted
   ``protocol`` or ``sessionAffinity`` is never an error.
3. **Validation** (``pkg/apis/core/validation``, ``pkg/apis/apps/validation``,
   ``pkg/apis/discovery/validation``): every field error of the object, joined the way
   ``errors.NewInvalid`` + ``utilerrors.Aggregate`` join them: one error alone, several
   as ``[err1, err2]``. The ``The <Kind> "<name>" is invalid: `` prefix is kubectl's
   (it prints the Kind without its group); kubectl would put several errors on separate
   ``* `` lines, this project keeps the API server's one-line join.

Messages are copied from Kubernetes (release-1.33/1.34 era sources, read from
``kubernetes/kubernetes``). Values are printed as ``field.Error`` prints them: Go ``%v``
for numbers and bools, ``%q`` for strings, ``%#v`` otherwise
(``[]string{"10.0.0.1"}``, ``map[string]string{"app":"web"}``).

Service allocation (ClusterIP, NodePort, LoadBalancer IP) is not here: see
:mod:`testbed.apiserver`, which calls :func:`default_service` and
:func:`service_errors`.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

from testbed.errors import InputError

__all__ = [
    "APIError",
    "FieldError",
    "GoValue",
    "SUPPORTED_KINDS",
    "aggregate",
    "check_namespaces",
    "cluster_ips_related_errors",
    "decode_object",
    "default_object",
    "default_service",
    "go_format",
    "go_quote",
    "invalid_error",
    "is_headless",
    "label_selector_matches",
    "needs_health_check",
    "parse_cidr_sloppy",
    "parse_ip_sloppy",
    "service_errors",
    "validate_object",
    "validate_pod_spec",
]

# --------------------------------------------------------------------------------------
# Go-style printing of field values (field/errors.go ErrorBody)
# --------------------------------------------------------------------------------------


class GoValue:
    """A value already rendered the way Go's ``%#v`` would print it."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"GoValue({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GoValue) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


def go_quote(text: str) -> str:
    """Go ``strconv.Quote``: double quotes, backslash escapes, printable Unicode kept."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif not ch.isprintable() and code > 0x7F:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def go_format(value: Any) -> str:
    """How ``field.Error`` prints a bad value: ``%v`` for numbers/bools, ``%q`` for strings."""
    if isinstance(value, GoValue):
        return value.text
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if value != int(value) else str(int(value))
    if isinstance(value, str):
        return go_quote(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return go_string_slice(value).text
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return go_string_map(value).text
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def go_string_slice(values: Sequence[str] | None) -> GoValue:
    """``%#v`` of a ``[]string``."""
    if values is None:
        return GoValue("[]string(nil)")
    return GoValue("[]string{" + ", ".join(go_quote(str(v)) for v in values) + "}")


def go_string_map(values: Mapping[str, str] | None) -> GoValue:
    """``%#v`` of a ``map[string]string`` (Go prints maps with sorted keys)."""
    if values is None:
        return GoValue("map[string]string(nil)")
    items = sorted((str(k), str(v)) for k, v in values.items())
    return GoValue("map[string]string{" + ", ".join(f"{go_quote(k)}:{go_quote(v)}" for k, v in items) + "}")


# --------------------------------------------------------------------------------------
# field.Error and the Invalid status error
# --------------------------------------------------------------------------------------

REQUIRED = "Required value"
INVALID = "Invalid value"
NOT_SUPPORTED = "Unsupported value"
DUPLICATE = "Duplicate value"
FORBIDDEN = "Forbidden"
TOO_LONG = "Too long"
TOO_MANY = "Too many"
INTERNAL = "Internal error"
NOT_FOUND = "Not found"

# Types whose body never shows the bad value (field/errors.go ErrorBody).
_NO_VALUE = {REQUIRED, FORBIDDEN, TOO_LONG, INTERNAL}


class FieldError:
    """One ``field.Error``: ``str()`` is ``<path>: <type>[: <value>][: <detail>]``."""

    __slots__ = ("type", "field", "value", "detail")

    def __init__(self, type: str, field: str, value: Any = None, detail: str = ""):
        self.type = type
        self.field = field
        self.value = value
        self.detail = detail

    def body(self) -> str:
        if self.type in _NO_VALUE:
            text = self.type
        else:
            text = f"{self.type}: {go_format(self.value)}"
        if self.detail:
            text += f": {self.detail}"
        return text

    def __str__(self) -> str:
        return f"{self.field}: {self.body()}"

    def __repr__(self) -> str:
        return f"FieldError({str(self)!r})"


def required(path: str, detail: str = "") -> FieldError:
    return FieldError(REQUIRED, path, "", detail)


def invalid(path: str, value: Any, detail: str) -> FieldError:
    return FieldError(INVALID, path, value, detail)


def not_supported(path: str, value: Any, valid: Iterable[str]) -> FieldError:
    valid = list(valid)
    detail = ("supported values: " + ", ".join(go_quote(v) for v in valid)) if valid else ""
    return FieldError(NOT_SUPPORTED, path, value, detail)


def duplicate(path: str, value: Any) -> FieldError:
    return FieldError(DUPLICATE, path, value, "")


def forbidden(path: str, detail: str) -> FieldError:
    return FieldError(FORBIDDEN, path, "", detail)


def too_many(path: str, actual: int, maximum: int) -> FieldError:
    return FieldError(TOO_MANY, path, actual, f"must have at most {maximum} items")


def internal(path: str, message: str) -> FieldError:
    return FieldError(INTERNAL, path, None, message)


def aggregate(errors: Iterable[Any]) -> str:
    """``utilerrors.NewAggregate(...).Error()``: one message alone, several as ``[a, b]``.

    Repeated messages are kept once, as ``ErrorList.ToAggregate`` does.
    """
    seen: list[str] = []
    for err in errors:
        text = str(err)
        if text not in seen:
            seen.append(text)
    if len(seen) == 1:
        return seen[0]
    return "[" + ", ".join(seen) + "]"


class APIError(InputError):
    """An error the API server (or kubectl) would return for a manifest.

    ``reason`` is the ``metav1.StatusReason`` (``Invalid``, ``BadRequest``,
    ``NotFound``, ``AlreadyExists``, ``InternalError``) or ``NoMatch`` for kubectl's
    own "no matches for kind". ``causes`` holds the :class:`FieldError` list of an
    ``Invalid`` error.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        kind: str | None = None,
        name: str | None = None,
        causes: Sequence[FieldError] = (),
        file: str | None = None,
        field: str | None = None,
    ):
        super().__init__(message, file=file, field=field)
        self.reason = reason
        self.kind = kind
        self.name = name
        self.causes = list(causes)


def invalid_error(kind: str, name: str, errors: Sequence[FieldError], file: str | None = None) -> APIError:
    """``apierrors.NewInvalid`` as kubectl prints it: ``The Kind "name" is invalid: ...``."""
    message = f"The {kind} {go_quote(name)} is invalid"
    if errors:
        message += ": " + aggregate(errors)
    return APIError(message, reason="Invalid", kind=kind, name=name, causes=errors, file=file)


# --------------------------------------------------------------------------------------
# k8s.io/apimachinery/pkg/util/validation
# --------------------------------------------------------------------------------------


def max_len_error(length: int) -> str:
    return f"must be no more than {length} characters"


def regex_error(msg: str, fmt: str, *examples: str) -> str:
    if not examples:
        return msg + " (regex used for validation is '" + fmt + "')"
    msg += " (e.g. "
    for i, example in enumerate(examples):
        if i > 0:
            msg += " or "
        msg += "'" + example + "', "
    return msg + "regex used for validation is '" + fmt + "')"


def inclusive_range_error(lo: int, hi: int) -> str:
    return f"must be between {lo} and {hi}, inclusive"


EMPTY_ERROR = "must be non-empty"
IS_NEGATIVE_ERROR_MSG = "must be greater than or equal to 0"

_DNS1123_LABEL_FMT = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
    "and must start and end with an alphanumeric character"
)
_DNS1123_SUBDOMAIN_FMT = _DNS1123_LABEL_FMT + "(\\." + _DNS1123_LABEL_FMT + ")*"
_DNS1123_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
    "and must start and end with an alphanumeric character"
)
_DNS1035_LABEL_FMT = "[a-z]([-a-z0-9]*[a-z0-9])?"
_DNS1035_LABEL_MSG = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', "
    "start with an alphabetic character, and end with an alphanumeric character"
)
_LABEL_KEY_FMT = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_LABEL_KEY_MSG = "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
_LABEL_VALUE_FMT = "(" + _LABEL_KEY_FMT + ")?"
_LABEL_VALUE_MSG = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
    "and must start and end with an alphanumeric character"
)

_RE_DNS1123_LABEL = re.compile(_DNS1123_LABEL_FMT)
_RE_DNS1123_SUBDOMAIN = re.compile(_DNS1123_SUBDOMAIN_FMT)
_RE_DNS1035_LABEL = re.compile(_DNS1035_LABEL_FMT)
_RE_LABEL_KEY = re.compile(_LABEL_KEY_FMT)
_RE_LABEL_VALUE = re.compile(_LABEL_VALUE_FMT)
_RE_PORT_NAME_CHARSET = re.compile("[-a-z0-9]+")
_RE_PORT_NAME_LETTER = re.compile("[a-z]")


def is_dns1123_label(value: str) -> list[str]:
    errs = []
    if len(value) > 63:
        errs.append(max_len_error(63))
    if not _RE_DNS1123_LABEL.fullmatch(value):
        if _RE_DNS1123_SUBDOMAIN.fullmatch(value):
            errs.append("must not contain dots")
        else:
            errs.append(regex_error(_DNS1123_LABEL_MSG, _DNS1123_LABEL_FMT, "my-name", "123-abc"))
    return errs


def is_dns1123_subdomain(value: str) -> list[str]:
    errs = []
    if len(value) > 253:
        errs.append(max_len_error(253))
    if not _RE_DNS1123_SUBDOMAIN.fullmatch(value):
        errs.append(regex_error(_DNS1123_SUBDOMAIN_MSG, _DNS1123_SUBDOMAIN_FMT, "example.com"))
    return errs


def is_dns1035_label(value: str) -> list[str]:
    errs = []
    if len(value) > 63:
        errs.append(max_len_error(63))
    if not _RE_DNS1035_LABEL.fullmatch(value):
        errs.append(regex_error(_DNS1035_LABEL_MSG, _DNS1035_LABEL_FMT, "my-name", "abc-123"))
    return errs


def is_qualified_name(value: str) -> list[str]:
    """``IsQualifiedName`` / ``content.IsLabelKey``: an optional DNS prefix, ``/``, a name."""
    errs: list[str] = []
    parts = value.split("/")
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix:
            errs.append("prefix part " + EMPTY_ERROR)
        else:
            errs.extend("prefix part " + m for m in is_dns1123_subdomain(prefix))
    else:
        return [
            "a qualified name "
            + regex_error(_LABEL_KEY_MSG, _LABEL_KEY_FMT, "MyName", "my.name", "123-abc")
            + " with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        ]
    if not name:
        errs.append("name part " + EMPTY_ERROR)
    elif len(name) > 63:
        errs.append("name part " + max_len_error(63))
    if not _RE_LABEL_KEY.fullmatch(name):
        errs.append("name part " + regex_error(_LABEL_KEY_MSG, _LABEL_KEY_FMT, "MyName", "my.name", "123-abc"))
    return errs


def is_valid_label_value(value: str) -> list[str]:
    errs = []
    if len(value) > 63:
        errs.append(max_len_error(63))
    if not _RE_LABEL_VALUE.fullmatch(value):
        errs.append(regex_error(_LABEL_VALUE_MSG, _LABEL_VALUE_FMT, "MyValue", "my_value", "12345"))
    return errs


def is_valid_port_num(port: int) -> list[str]:
    if 1 <= port <= 65535:
        return []
    return [inclusive_range_error(1, 65535)]


def is_valid_port_name(port: str) -> list[str]:
    """IANA_SVC_NAME (RFC 6335), lower case only."""
    errs = []
    if len(port) > 15:
        errs.append(max_len_error(15))
    if not _RE_PORT_NAME_CHARSET.fullmatch(port):
        errs.append("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)")
    if not _RE_PORT_NAME_LETTER.search(port):
        errs.append("must contain at least one letter (a-z)")
    if "--" in port:
        errs.append("must not contain consecutive hyphens")
    if port and (port[0] == "-" or port[-1] == "-"):
        errs.append("must not begin or end with a hyphen")
    return errs


_V4_SLOPPY = re.compile(r"([0-9]+)\.([0-9]+)\.([0-9]+)\.([0-9]+)")


def parse_ip_sloppy(text: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``netutils.ParseIPSloppy``: IPv4 parts may carry leading zeros (read as decimal).

    An IPv4-mapped IPv6 address comes back as IPv4, like Go's 4-in-6 ``net.IP``.
    """
    if not isinstance(text, str) or not text:
        return None
    m = _V4_SLOPPY.fullmatch(text)
    if m:
        parts = [int(p) for p in m.groups()]
        if all(p <= 255 for p in parts):
            return ipaddress.IPv4Address(".".join(map(str, parts)))
        return None
    if ":" not in text or "%" in text:
        return None
    try:
        addr = ipaddress.IPv6Address(text)
    except ValueError:
        return None
    return addr.ipv4_mapped or addr


def parse_cidr_sloppy(text: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """``netutils.ParseCIDRSloppy``: host bits may be set (``10.0.0.1/24`` is fine)."""
    if not isinstance(text, str) or "/" not in text:
        return None
    addr_text, _, bits_text = text.partition("/")
    if not bits_text.isdigit() or (len(bits_text) > 1 and bits_text[0] == "0"):
        return None
    addr = parse_ip_sloppy(addr_text)
    if addr is None:
        return None
    bits = int(bits_text)
    # A 4-in-6 address keeps its IPv6 mask width in Go; keep the common case simple.
    if isinstance(addr, ipaddress.IPv4Address) and ":" in addr_text:
        bits -= 96
    if bits < 0 or bits > addr.max_prefixlen:
        return None
    return ipaddress.ip_network(f"{addr}/{bits}", strict=False)


_IP_EXAMPLE = "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"
_CIDR_EXAMPLE = "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"


def is_valid_ip(path: str, value: str) -> list[FieldError]:
    if parse_ip_sloppy(value) is None:
        return [invalid(path, value, _IP_EXAMPLE)]
    return []


def is_valid_cidr(path: str, value: str) -> list[FieldError]:
    if parse_cidr_sloppy(value) is None:
        return [invalid(path, value, _CIDR_EXAMPLE)]
    return []


def validate_non_special_ip(value: str, path: str) -> list[FieldError]:
    """``ValidateNonSpecialIP`` / ``ValidateEndpointIP`` (external IPs, endpoints)."""
    ip = parse_ip_sloppy(value)
    if ip is None:
        return [invalid(path, value, "must be a valid IP address")]
    errs = []
    if ip.is_unspecified:
        errs.append(invalid(path, value, f"may not be unspecified ({value})"))
    if ip.is_loopback:
        errs.append(invalid(path, value, "may not be in the loopback range (127.0.0.0/8, ::1/128)"))
    if (ip.version == 4 and ip in ipaddress.ip_network("169.254.0.0/16")) or (
        ip.version == 6 and ip in ipaddress.ip_network("fe80::/10")
    ):
        errs.append(invalid(path, value, "may not be in the link-local range (169.254.0.0/16, fe80::/10)"))
    if (ip.version == 4 and ip in ipaddress.ip_network("224.0.0.0/24")) or (
        ip.version == 6 and ip in ipaddress.ip_network("ff02::/16")
    ):
        errs.append(invalid(path, value, "may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)"))
    return errs


# --------------------------------------------------------------------------------------
# Object metadata, labels, selectors
# --------------------------------------------------------------------------------------


def _name_errors(fn: Callable[[str], list[str]], path: str, value: str) -> list[FieldError]:
    return [invalid(path, value, msg) for msg in fn(value)]


def validate_labels(labels: Any, path: str) -> list[FieldError]:
    errs: list[FieldError] = []
    if not isinstance(labels, dict):
        return errs
    for key, value in labels.items():
        errs.extend(invalid(path, key, msg) for msg in is_qualified_name(str(key)))
        errs.extend(invalid(path, value, msg) for msg in is_valid_label_value(str(value)))
    return errs


def validate_annotations(annotations: Any, path: str) -> list[FieldError]:
    errs: list[FieldError] = []
    if not isinstance(annotations, dict):
        return errs
    total = 0
    for key, value in annotations.items():
        errs.extend(invalid(path, key, msg) for msg in is_qualified_name(str(key).lower()))
        total += len(str(key)) + len(str(value))
    if total > 256 * 1024:
        errs.append(FieldError(TOO_LONG, path, "", f"must have at most {256 * 1024} bytes"))
    return errs


def validate_object_meta(meta: Mapping[str, Any], namespaced: bool, name_fn: Callable[[str], list[str]]) -> list[FieldError]:
    """``ValidateObjectMetaAccessor`` for create."""
    errs: list[FieldError] = []
    generate_name = meta.get("generateName") or ""
    if generate_name:
        # maskTrailingDash, quirk included: name[:len(name)-2] + "a"
        masked = generate_name[:-2] + "a" if len(generate_name) > 1 and generate_name.endswith("-") else generate_name
        errs.extend(invalid("metadata.generateName", generate_name, m) for m in name_fn(masked))
    name = meta.get("name") or ""
    if not name:
        errs.append(required("metadata.name", "name or generateName is required"))
    else:
        errs.extend(_name_errors(name_fn, "metadata.name", name))
    if namespaced:
        namespace = meta.get("namespace") or ""
        if not namespace:
            errs.append(required("metadata.namespace"))
        else:
            errs.extend(_name_errors(is_dns1123_label, "metadata.namespace", namespace))
    generation = meta.get("generation")
    if isinstance(generation, int) and generation < 0:
        errs.append(invalid("metadata.generation", generation, IS_NEGATIVE_ERROR_MSG))
    errs.extend(validate_labels(meta.get("labels"), "metadata.labels"))
    errs.extend(validate_annotations(meta.get("annotations"), "metadata.annotations"))
    for finalizer in meta.get("finalizers") or []:
        errs.extend(invalid("metadata.finalizers", finalizer, m) for m in is_qualified_name(str(finalizer)))
    return errs


_SELECTOR_OPS = ("In", "NotIn", "Exists", "DoesNotExist")


def validate_label_selector(selector: Any, path: str) -> list[FieldError]:
    """``ValidateLabelSelector`` (metav1.LabelSelector)."""
    errs: list[FieldError] = []
    if not isinstance(selector, dict):
        return errs
    errs.extend(validate_labels(selector.get("matchLabels"), path + ".matchLabels"))
    for i, expr in enumerate(selector.get("matchExpressions") or []):
        p = f"{path}.matchExpressions[{i}]"
        expr = expr if isinstance(expr, dict) else {}
        op = expr.get("operator") or ""
        values = expr.get("values") or []
        if op in ("In", "NotIn"):
            if not values:
                errs.append(required(p + ".values", "must be specified when `operator` is 'In' or 'NotIn'"))
        elif op in ("Exists", "DoesNotExist"):
            if values:
                errs.append(forbidden(p + ".values", "may not be specified when `operator` is 'Exists' or 'DoesNotExist'"))
        else:
            errs.append(invalid(p + ".operator", op, "not a valid selector operator"))
        errs.extend(invalid(p + ".key", expr.get("key") or "", m) for m in is_qualified_name(str(expr.get("key") or "")))
    return errs


def label_selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str] | None) -> bool:
    """``metav1.LabelSelectorAsSelector(selector).Matches(labels)``.

    ``None`` selects nothing (``labels.Nothing()``), ``{}`` selects everything.
    """
    if selector is None:
        return False
    labels = labels or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and (key not in labels or labels[key] not in values):
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _selector_is_valid(selector: Any) -> bool:
    """Whether ``LabelSelectorAsSelector`` would succeed."""
    if selector is None:
        return True
    for expr in selector.get("matchExpressions") or []:
        if expr.get("operator") not in _SELECTOR_OPS:
            return False
        if expr.get("operator") in ("In", "NotIn") and not expr.get("values"):
            return False
        if expr.get("operator") in ("Exists", "DoesNotExist") and expr.get("values"):
            return False
        if is_qualified_name(str(expr.get("key") or "")):
            return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if is_qualified_name(str(key)) or is_valid_label_value(str(value)):
            return False
    return True


def _go_label_selector(selector: Mapping[str, Any]) -> GoValue:
    """``%#v`` of a ``v1.LabelSelector`` (as seen in real 'empty selector' errors)."""
    labels = selector.get("matchLabels")
    exprs = selector.get("matchExpressions")
    labels_text = go_string_map(labels).text if labels is not None else "map[string]string(nil)"
    if exprs is None:
        exprs_text = "[]v1.LabelSelectorRequirement(nil)"
    else:
        exprs_text = "[]v1.LabelSelectorRequirement{" + ", ".join(
            "v1.LabelSelectorRequirement{Key:%s, Operator:%s, Values:%s}"
            % (go_quote(str(e.get("key") or "")), go_quote(str(e.get("operator") or "")), go_string_slice(e.get("values")).text)
            for e in exprs
        ) + "}"
    return GoValue(f"v1.LabelSelector{{MatchLabels:{labels_text}, MatchExpressions:{exprs_text}}}")


# --------------------------------------------------------------------------------------
# Decoding: JSON types and strict (unknown) fields
# --------------------------------------------------------------------------------------

# A schema node is one of:
#   "string" | "int32" | "int64" | "bool" | "intstr" | "any"
#   ("list", Go type text, node)        e.g. ("list", "[]v1.ServicePort", SERVICE_PORT)
#   ("map", Go type text, value node)   e.g. ("map", "map[string]string", "string")
#   Struct(...)
# Go type texts are what encoding/json prints in "of type ...".


class Struct:
    __slots__ = ("name", "gotype", "fields", "strict")

    def __init__(self, name: str, gotype: str, fields: dict[str, Any], strict: bool = True):
        self.name = name  # Go struct name used in "Go struct field <Name>.<path>"
        self.gotype = gotype  # e.g. "v1.ServiceSpec"
        self.fields = fields
        self.strict = strict


_STR_MAP = ("map", "map[string]string", "string")
_STR_LIST = ("list", "[]string", "string")

OWNER_REFERENCE = Struct(
    "OwnerReference",
    "v1.OwnerReference",
    {"apiVersion": "string", "kind": "string", "name": "string", "uid": "string", "controller": "bool", "blockOwnerDeletion": "bool"},
)
OBJECT_META = Struct(
    "ObjectMeta",
    "v1.ObjectMeta",
    {
        "name": "string",
        "generateName": "string",
        "namespace": "string",
        "selfLink": "string",
        "uid": "string",
        "resourceVersion": "string",
        "generation": "int64",
        "creationTimestamp": "any",
        "deletionTimestamp": "any",
        "deletionGracePeriodSeconds": "int64",
        "labels": _STR_MAP,
        "annotations": _STR_MAP,
        "ownerReferences": ("list", "[]v1.OwnerReference", OWNER_REFERENCE),
        "finalizers": _STR_LIST,
        "managedFields": "any",
    },
)
CLIENT_IP_CONFIG = Struct("ClientIPConfig", "v1.ClientIPConfig", {"timeoutSeconds": "int32"})
SESSION_AFFINITY_CONFIG = Struct("SessionAffinityConfig", "v1.SessionAffinityConfig", {"clientIP": CLIENT_IP_CONFIG})
SERVICE_PORT = Struct(
    "ServicePort",
    "v1.ServicePort",
    {"name": "string", "protocol": "string", "appProtocol": "string", "port": "int32", "targetPort": "intstr", "nodePort": "int32"},
)
SERVICE_SPEC = Struct(
    "ServiceSpec",
    "v1.ServiceSpec",
    {
        "ports": ("list", "[]v1.ServicePort", SERVICE_PORT),
        "selector": _STR_MAP,
        "clusterIP": "string",
        "clusterIPs": _STR_LIST,
        "type": "string",
        "externalIPs": _STR_LIST,
        "sessionAffinity": "string",
        "loadBalancerIP": "string",
        "loadBalancerSourceRanges": _STR_LIST,
        "externalName": "string",
        "externalTrafficPolicy": "string",
        "healthCheckNodePort": "int32",
        "publishNotReadyAddresses": "bool",
        "sessionAffinityConfig": SESSION_AFFINITY_CONFIG,
        "ipFamilies": _STR_LIST,
        "ipFamilyPolicy": "string",
        "allocateLoadBalancerNodePorts": "bool",
        "loadBalancerClass": "string",
        "internalTrafficPolicy": "string",
        "trafficDistribution": "string",
    },
)
SERVICE = Struct(
    "Service",
    "v1.Service",
    {"apiVersion": "string", "kind": "string", "metadata": OBJECT_META, "spec": SERVICE_SPEC, "status": "any"},
)
CONTAINER_PORT = Struct(
    "ContainerPort",
    "v1.ContainerPort",
    {"name": "string", "hostPort": "int32", "containerPort": "int32", "protocol": "string", "hostIP": "string"},
)
CONTAINER = Struct(
    "Container",
    "v1.Container",
    {"name": "string", "image": "string", "ports": ("list", "[]v1.ContainerPort", CONTAINER_PORT), "imagePullPolicy": "string"},
    strict=False,
)
POD_SPEC = Struct(
    "PodSpec",
    "v1.PodSpec",
    {
        "containers": ("list", "[]v1.Container", CONTAINER),
        "initContainers": ("list", "[]v1.Container", CONTAINER),
        "restartPolicy": "string",
        "dnsPolicy": "string",
        "nodeSelector": _STR_MAP,
        "nodeName": "string",
        "hostNetwork": "bool",
        "hostname": "string",
        "subdomain": "string",
        "terminationGracePeriodSeconds": "int64",
    },
    strict=False,
)
POD_TEMPLATE = Struct("PodTemplateSpec", "v1.PodTemplateSpec", {"metadata": OBJECT_META, "spec": POD_SPEC})
POD = Struct("Pod", "v1.Pod", {"apiVersion": "string", "kind": "string", "metadata": OBJECT_META, "spec": POD_SPEC, "status": "any"})
LABEL_SELECTOR_REQ = Struct(
    "LabelSelectorRequirement", "v1.LabelSelectorRequirement", {"key": "string", "operator": "string", "values": _STR_LIST}
)
LABEL_SELECTOR = Struct(
    "LabelSelector",
    "v1.LabelSelector",
    {"matchLabels": _STR_MAP, "matchExpressions": ("list", "[]v1.LabelSelectorRequirement", LABEL_SELECTOR_REQ)},
)


def _workload(kind: str, extra: dict[str, Any]) -> Struct:
    spec_fields = {"selector": LABEL_SELECTOR, "template": POD_TEMPLATE, "minReadySeconds": "int32", "revisionHistoryLimit": "int32"}
    spec_fields.update(extra)
    spec = Struct(f"{kind}Spec", f"v1.{kind}Spec", spec_fields)
    return Struct(kind, f"v1.{kind}", {"apiVersion": "string", "kind": "string", "metadata": OBJECT_META, "spec": spec, "status": "any"})


DEPLOYMENT = _workload(
    "Deployment", {"replicas": "int32", "strategy": "any", "paused": "bool", "progressDeadlineSeconds": "int32"}
)
STATEFUL_SET = _workload(
    "StatefulSet",
    {
        "replicas": "int32",
        "serviceName": "string",
        "podManagementPolicy": "string",
        "updateStrategy": "any",
        "volumeClaimTemplates": "any",
        "persistentVolumeClaimRetentionPolicy": "any",
        "ordinals": "any",
    },
)
DAEMON_SET = _workload("DaemonSet", {"updateStrategy": "any", "templateGeneration": "int64"})
REPLICA_SET = _workload("ReplicaSet", {"replicas": "int32"})
NAMESPACE = Struct("Namespace", "v1.Namespace", {"apiVersion": "string", "kind": "string", "metadata": OBJECT_META, "spec": "any", "status": "any"})
OBJECT_REFERENCE = Struct(
    "ObjectReference",
    "v1.ObjectReference",
    {"kind": "string", "namespace": "string", "name": "string", "uid": "string", "apiVersion": "string", "resourceVersion": "string", "fieldPath": "string"},
)
ENDPOINT_CONDITIONS = Struct("EndpointConditions", "v1.EndpointConditions", {"ready": "bool", "serving": "bool", "terminating": "bool"})
ENDPOINT = Struct(
    "Endpoint",
    "v1.Endpoint",
    {
        "addresses": _STR_LIST,
        "conditions": ENDPOINT_CONDITIONS,
        "hostname": "string",
        "targetRef": OBJECT_REFERENCE,
        "deprecatedTopology": _STR_MAP,
        "nodeName": "string",
        "zone": "string",
        "hints": "any",
    },
)
ENDPOINT_PORT = Struct("EndpointPort", "v1.EndpointPort", {"name": "string", "protocol": "string", "port": "int32", "appProtocol": "string"})
ENDPOINT_SLICE = Struct(
    "EndpointSlice",
    "v1.EndpointSlice",
    {
        "apiVersion": "string",
        "kind": "string",
        "metadata": OBJECT_META,
        "addressType": "string",
        "endpoints": ("list", "[]v1.Endpoint", ENDPOINT),
        "ports": ("list", "[]v1.EndpointPort", ENDPOINT_PORT),
    },
)


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "string"  # dates and other YAML scalars arrive as strings in JSON


class _DecodeError(Exception):
    pass


def _decode(node: Any, value: Any, struct_name: str, field_path: str, path: str, unknown: list[str]) -> None:
    """Walk ``value`` against ``node``; raise :class:`_DecodeError` on a type error and
    collect unknown fields of strict structs in ``unknown``."""
    if value is None or node == "any":
        return

    def type_error(gotype: str, shown: str | None = None) -> _DecodeError:
        kind = shown or _json_kind(value)
        return _DecodeError(f"json: cannot unmarshal {kind} into Go struct field {struct_name}.{field_path} of type {gotype}")

    if isinstance(node, Struct):
        if not isinstance(value, dict):
            raise type_error(node.gotype)
        for key, sub in value.items():
            child = node.fields.get(key)
            sub_path = f"{path}.{key}" if path else str(key)
            sub_field = f"{field_path}.{key}" if field_path else str(key)
            if child is None:
                if node.strict:
                    unknown.append(sub_path)
                continue
            _decode(child, sub, node.name, sub_field, sub_path, unknown)
        return
    if isinstance(node, tuple):
        shape, gotype, elem = node
        if shape == "list":
            if not isinstance(value, list):
                raise type_error(gotype)
            for i, item in enumerate(value):
                _decode(elem, item, struct_name, field_path, f"{path}[{i}]", unknown)
        else:  # map
            if not isinstance(value, dict):
                raise type_error(gotype)
            for key, item in value.items():
                _decode(elem, item, struct_name, field_path, f"{path}.{key}", unknown)
        return
    if node == "string":
        if not isinstance(value, str):
            raise type_error("string")
    elif node == "bool":
        if not isinstance(value, bool):
            raise type_error("bool")
    elif node in ("int32", "int64"):
        bits = 31 if node == "int32" else 63
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise type_error(node)
        if isinstance(value, float) and not value.is_integer():
            raise type_error(node, f"number {value}")
        if not -(2**bits) <= int(value) < 2**bits:
            raise type_error(node, f"number {int(value)}")
    elif node == "intstr":
        if isinstance(value, bool) or isinstance(value, (list, dict)):
            raise _DecodeError(f"json: cannot unmarshal {_json_kind(value)} into Go value of type int32")


def _check_decode(obj: Mapping[str, Any], schema: Struct, kind: str, version: str, file: str | None = None) -> None:
    unknown: list[str] = []
    try:
        _decode(schema, obj, schema.name, "", "", unknown)
    except _DecodeError as exc:
        raise APIError(
            f"{kind} in version {go_quote(version)} cannot be handled as a {kind}: {exc}", reason="BadRequest", kind=kind, file=file
        ) from None
    if unknown:
        detail = ", ".join(f"unknown field {go_quote(p)}" for p in unknown)
        raise APIError(
            f"{kind} in version {go_quote(version)} cannot be handled as a {kind}: strict decoding error: {detail}",
            reason="BadRequest",
            kind=kind,
            file=file,
        )


# --------------------------------------------------------------------------------------
# Defaulting (pkg/apis/core/v1/defaults.go, pkg/apis/apps/v1/defaults.go)
# --------------------------------------------------------------------------------------

DEFAULT_CLIENT_IP_SERVICE_AFFINITY_SECONDS = 10800
MAX_CLIENT_IP_SERVICE_AFFINITY_SECONDS = 86400
KUBELET_PORT = 10250


def _externally_accessible(spec: Mapping[str, Any]) -> bool:
    typ = spec.get("type")
    return typ in ("LoadBalancer", "NodePort") or (typ == "ClusterIP" and bool(spec.get("externalIPs")))


def needs_health_check(spec: Mapping[str, Any]) -> bool:
    return spec.get("type") == "LoadBalancer" and spec.get("externalTrafficPolicy") == "Local"


def default_service(svc: dict[str, Any]) -> dict[str, Any]:
    """``SetDefaults_Service`` in place (returns ``svc``)."""
    spec = svc.setdefault("spec", {})
    if spec is None:
        spec = svc["spec"] = {}
    if not spec.get("sessionAffinity"):
        spec["sessionAffinity"] = "None"
    if spec["sessionAffinity"] == "None":
        spec.pop("sessionAffinityConfig", None)
    if spec["sessionAffinity"] == "ClientIP":
        cfg = spec.get("sessionAffinityConfig")
        client_ip = cfg.get("clientIP") if isinstance(cfg, dict) else None
        if not isinstance(client_ip, dict) or client_ip.get("timeoutSeconds") is None:
            spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": DEFAULT_CLIENT_IP_SERVICE_AFFINITY_SECONDS}}
    if not spec.get("type"):
        spec["type"] = "ClusterIP"
    for port in spec.get("ports") or []:
        if not isinstance(port, dict):
            continue
        if not port.get("protocol"):
            port["protocol"] = "TCP"
        target = port.get("targetPort")
        if target in (None, 0, ""):
            port["targetPort"] = port.get("port")
    if _externally_accessible(spec) and not spec.get("externalTrafficPolicy"):
        spec["externalTrafficPolicy"] = "Cluster"
    if spec.get("internalTrafficPolicy") is None and spec["type"] in ("NodePort", "LoadBalancer", "ClusterIP"):
        spec["internalTrafficPolicy"] = "Cluster"
    if spec["type"] == "LoadBalancer" and spec.get("allocateLoadBalancerNodePorts") is None:
        spec["allocateLoadBalancerNodePorts"] = True
    return svc


def normalize_cluster_ips(spec: dict[str, Any]) -> None:
    """``normalizeClusterIPs`` for a create: a lone ``clusterIP`` initialises ``clusterIPs``."""
    if spec.get("clusterIP") and not spec.get("clusterIPs"):
        spec["clusterIPs"] = [spec["clusterIP"]]


def _default_container(container: dict[str, Any]) -> None:
    for port in container.get("ports") or []:
        if isinstance(port, dict) and not port.get("protocol"):
            port["protocol"] = "TCP"
    if not container.get("imagePullPolicy"):
        image = str(container.get("image") or "")
        tag = image.rsplit("/", 1)[-1]
        tag = tag.split("@", 1)[0]
        container["imagePullPolicy"] = "Always" if (":" not in tag or tag.endswith(":latest")) and "@" not in image else "IfNotPresent"
    if not container.get("terminationMessagePolicy"):
        container["terminationMessagePolicy"] = "File"


def _default_pod_spec(spec: dict[str, Any], is_pod: bool) -> None:
    if not spec.get("dnsPolicy"):
        spec["dnsPolicy"] = "ClusterFirst"
    if not spec.get("restartPolicy"):
        spec["restartPolicy"] = "Always"
    for key in ("containers", "initContainers"):
        for container in spec.get(key) or []:
            if isinstance(container, dict):
                _default_container(container)
                if is_pod and spec.get("hostNetwork"):
                    for port in container.get("ports") or []:
                        if isinstance(port, dict) and not port.get("hostPort"):
                            port["hostPort"] = port.get("containerPort")


def default_object(obj: dict[str, Any]) -> dict[str, Any]:
    """Apply the API server's defaulting to a (copied) manifest; returns it."""
    kind = obj.get("kind")
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = obj["metadata"] = {}
    if kind in _NAMESPACED and not meta.get("namespace"):
        meta["namespace"] = "default"  # kubectl fills in the context's namespace
    if kind == "Service":
        default_service(obj)
        normalize_cluster_ips(obj["spec"])
    elif kind == "Pod":
        _default_pod_spec(obj.setdefault("spec", {}) or {}, True)
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        spec = obj.get("spec")
        if not isinstance(spec, dict):
            spec = obj["spec"] = {}
        template = spec.get("template")
        if not isinstance(template, dict):
            template = spec["template"] = {}
        pod_spec = template.get("spec")
        if not isinstance(pod_spec, dict):
            pod_spec = template["spec"] = {}
        _default_pod_spec(pod_spec, False)
        if kind in ("Deployment", "StatefulSet", "ReplicaSet") and spec.get("replicas") is None:
            spec["replicas"] = 1
        if kind == "Deployment":
            strategy = spec.get("strategy")
            if not isinstance(strategy, dict):
                strategy = spec["strategy"] = {}
            if not strategy.get("type"):
                strategy["type"] = "RollingUpdate"
            if strategy["type"] == "RollingUpdate":
                ru = strategy.get("rollingUpdate")
                if not isinstance(ru, dict):
                    ru = strategy["rollingUpdate"] = {}
                ru.setdefault("maxUnavailable", "25%")
                ru.setdefault("maxSurge", "25%")
        if kind == "StatefulSet":
            if not spec.get("podManagementPolicy"):
                spec["podManagementPolicy"] = "OrderedReady"
            strategy = spec.get("updateStrategy")
            if not isinstance(strategy, dict):
                strategy = spec["updateStrategy"] = {}
            if not strategy.get("type"):
                strategy["type"] = "RollingUpdate"
    elif kind == "EndpointSlice":
        for port in obj.get("ports") or []:
            if isinstance(port, dict):
                if port.get("name") is None:
                    port["name"] = ""
                if port.get("protocol") is None:
                    port["protocol"] = "TCP"
    return obj


# --------------------------------------------------------------------------------------
# Pod spec (parts of ValidatePodSpec that matter for Service networking)
# --------------------------------------------------------------------------------------

_PROTOCOLS = ("SCTP", "TCP", "UDP")  # sets.List(supportedPortProtocols): sorted


def _validate_container_ports(ports: Any, path: str) -> list[FieldError]:
    errs: list[FieldError] = []
    names: set[str] = set()
    for i, port in enumerate(ports or []):
        p = f"{path}[{i}]"
        port = port if isinstance(port, dict) else {}
        name = port.get("name") or ""
        if name:
            msgs = is_valid_port_name(name)
            if msgs:
                errs.extend(invalid(p + ".name", name, m) for m in msgs)
            elif name in names:
                errs.append(duplicate(p + ".name", name))
            else:
                names.add(name)
        cport = port.get("containerPort") or 0
        if cport == 0:
            errs.append(required(p + ".containerPort"))
        else:
            errs.extend(invalid(p + ".containerPort", cport, m) for m in is_valid_port_num(cport))
        hport = port.get("hostPort") or 0
        if hport:
            errs.extend(invalid(p + ".hostPort", hport, m) for m in is_valid_port_num(hport))
        proto = port.get("protocol") or ""
        if not proto:
            errs.append(required(p + ".protocol"))
        elif proto not in _PROTOCOLS:
            errs.append(not_supported(p + ".protocol", proto, _PROTOCOLS))
    return errs


def _validate_container_common(c: Mapping[str, Any], path: str) -> list[FieldError]:
    errs: list[FieldError] = []
    name = c.get("name") or ""
    if not name:
        errs.append(required(path + ".name"))
    else:
        errs.extend(_name_errors(is_dns1123_label, path + ".name", name))
    if not c.get("image"):
        errs.append(required(path + ".image"))
    tmp = c.get("terminationMessagePolicy") or ""
    if not tmp:
        errs.append(required(path + ".terminationMessagePolicy"))
    elif tmp not in ("File", "FallbackToLogsOnError"):
        errs.append(not_supported(path + ".terminationMessagePolicy", tmp, ("File", "FallbackToLogsOnError")))
    errs.extend(_validate_container_ports(c.get("ports"), path + ".ports"))
    pull = c.get("imagePullPolicy") or ""
    if not pull:
        errs.append(required(path + ".imagePullPolicy"))
    elif pull not in ("Always", "IfNotPresent", "Never"):
        errs.append(not_supported(path + ".imagePullPolicy", pull, ("Always", "IfNotPresent", "Never")))
    return errs


def _host_port_conflicts(containers: Sequence[Mapping[str, Any]], path: str) -> list[FieldError]:
    errs: list[FieldError] = []
    seen: set[str] = set()
    for ci, c in enumerate(containers):
        for pi, port in enumerate(c.get("ports") or []):
            if not isinstance(port, dict) or not port.get("hostPort"):
                continue
            key = f"{port.get('protocol') or ''}/{port.get('hostIP') or ''}/{port['hostPort']}"
            if key in seen:
                errs.append(duplicate(f"{path}[{ci}].ports[{pi}].hostPort", key))
            seen.add(key)
    return errs


def validate_pod_spec(spec: Mapping[str, Any], path: str, is_pod: bool) -> list[FieldError]:
    errs: list[FieldError] = []
    containers = [c if isinstance(c, dict) else {} for c in (spec.get("containers") or [])]
    init = [c if isinstance(c, dict) else {} for c in (spec.get("initContainers") or [])]
    # validateContainers
    if not containers:
        errs.append(required(path + ".containers"))
    else:
        names: set[str] = set()
        for i, c in enumerate(containers):
            p = f"{path}.containers[{i}]"
            errs.extend(_validate_container_common(c, p))
            if c.get("name") in names:
                errs.append(duplicate(p + ".name", c.get("name") or ""))
            else:
                names.add(c.get("name"))
            if c.get("restartPolicy") is not None:
                errs.append(forbidden(p + ".restartPolicy", "may not be set for non-init containers"))
        errs.extend(_host_port_conflicts(containers, path + ".containers"))
    # validateInitContainers
    all_names = {c.get("name") for c in containers}
    for i, c in enumerate(init):
        p = f"{path}.initContainers[{i}]"
        errs.extend(_validate_container_common(c, p))
        if c.get("name") in all_names:
            errs.append(duplicate(p + ".name", c.get("name") or ""))
        elif c.get("name"):
            all_names.add(c.get("name"))
        errs.extend(_host_port_conflicts([c], path + ".initContainers"))
    # validatePodHostNetworkDeps
    if spec.get("hostNetwork"):
        for ci, c in enumerate(containers):
            for pi, port in enumerate(c.get("ports") or []):
                if not isinstance(port, dict):
                    continue
                hp, cp = port.get("hostPort") or 0, port.get("containerPort") or 0
                if (is_pod or hp != 0) and hp != cp:
                    errs.append(
                        invalid(f"{path}.containers[{ci}].ports[{pi}].hostPort", hp, "must match `containerPort` when `hostNetwork` is true")
                    )
    restart = spec.get("restartPolicy") or ""
    if not restart:
        errs.append(required(path + ".restartPolicy"))
    elif restart not in ("Always", "OnFailure", "Never"):
        errs.append(not_supported(path + ".restartPolicy", restart, ("Always", "OnFailure", "Never")))
    dns = spec.get("dnsPolicy") or ""
    if not dns:
        errs.append(required(path + ".dnsPolicy"))
    elif dns not in ("ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"):
        errs.append(not_supported(path + ".dnsPolicy", dns, ("ClusterFirstWithHostNet", "ClusterFirst", "Default", "None")))
    errs.extend(validate_labels(spec.get("nodeSelector"), path + ".nodeSelector"))
    if spec.get("nodeName"):
        errs.extend(_name_errors(is_dns1123_subdomain, path + ".nodeName", spec["nodeName"]))
    if spec.get("hostname"):
        errs.extend(_name_errors(is_dns1123_label, path + ".hostname", spec["hostname"]))
    if spec.get("subdomain"):
        errs.extend(_name_errors(is_dns1123_label, path + ".subdomain", spec["subdomain"]))
    return errs


def _validate_pod_template(template: Mapping[str, Any], path: str) -> list[FieldError]:
    """``ValidatePodTemplateSpec``."""
    meta = template.get("metadata") or {}
    errs = validate_labels(meta.get("labels"), path + ".labels")
    errs.extend(validate_annotations(meta.get("annotations"), path + ".annotations"))
    errs.extend(validate_pod_spec(template.get("spec") or {}, path + ".spec", False))
    return errs


# --------------------------------------------------------------------------------------
# Kinds
# --------------------------------------------------------------------------------------


def _nonnegative(value: Any, path: str) -> list[FieldError]:
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        return [invalid(path, value, IS_NEGATIVE_ERROR_MSG)]
    return []


def _validate_pod(obj: Mapping[str, Any]) -> list[FieldError]:
    errs = validate_object_meta(obj.get("metadata") or {}, True, is_dns1123_subdomain)
    errs.extend(validate_pod_spec(obj.get("spec") or {}, "spec", True))
    for i, c in enumerate((obj.get("spec") or {}).get("containers") or []):
        image = (c or {}).get("image") or ""
        if image and image != image.strip():
            errs.append(invalid(f"spec.containers[{i}].image", image, "must not have leading or trailing whitespace"))
    return errs


def _template_for_rs(spec: Mapping[str, Any], kind_word: str) -> list[FieldError]:
    """``ValidatePodTemplateSpecForReplicaSet`` (Deployment and ReplicaSet)."""
    errs: list[FieldError] = []
    selector = spec.get("selector")
    template = spec.get("template") or {}
    labels = (template.get("metadata") or {}).get("labels")
    if not _selector_is_valid(selector):
        return [invalid("spec.selector", _go_label_selector(selector), "invalid label selector")]
    empty = selector is not None and not (selector.get("matchLabels") or selector.get("matchExpressions"))
    if not empty and not label_selector_matches(selector, labels):
        errs.append(invalid("spec.template.metadata.labels", go_string_map(labels), "`selector` does not match template `labels`"))
    errs.extend(_validate_pod_template(template, "spec.template"))
    restart = (template.get("spec") or {}).get("restartPolicy")
    if restart != "Always":
        errs.append(not_supported("spec.template.spec.restartPolicy", restart or "", ["Always"]))
    if (template.get("spec") or {}).get("activeDeadlineSeconds") is not None:
        errs.append(forbidden("spec.template.spec.activeDeadlineSeconds", f"activeDeadlineSeconds in {kind_word} is not Supported"))
    return errs


def _selector_required(spec: Mapping[str, Any], kind_word: str) -> list[FieldError]:
    selector = spec.get("selector")
    if selector is None:
        return [required("spec.selector")]
    errs = validate_label_selector(selector, "spec.selector")
    if not (selector.get("matchLabels") or selector.get("matchExpressions")):
        errs.append(invalid("spec.selector", _go_label_selector(selector), f"empty selector is invalid for {kind_word}"))
    return errs


def _validate_deployment(obj: Mapping[str, Any]) -> list[FieldError]:
    errs = validate_object_meta(obj.get("metadata") or {}, True, is_dns1123_subdomain)
    spec = obj.get("spec") or {}
    errs.extend(_nonnegative(spec.get("replicas"), "spec.replicas"))
    errs.extend(_selector_required(spec, "deployment"))
    errs.extend(_template_for_rs(spec, "ReplicaSet"))
    strategy = spec.get("strategy") or {}
    stype = strategy.get("type")
    if stype == "Recreate":
        if strategy.get("rollingUpdate") is not None:
            errs.append(forbidden("spec.strategy.rollingUpdate", "may not be specified when strategy `type` is 'Recreate'"))
    elif stype != "RollingUpdate":
        errs.append(
            not_supported(
                "spec.strategy",
                GoValue(
                    "apps.DeploymentStrategy{Type:%s, RollingUpdate:(*apps.RollingUpdateDeployment)(nil)}" % go_quote(str(stype or ""))
                ),
                ["Recreate", "RollingUpdate"],
            )
        )
    errs.extend(_nonnegative(spec.get("minReadySeconds"), "spec.minReadySeconds"))
    errs.extend(_nonnegative(spec.get("revisionHistoryLimit"), "spec.revisionHistoryLimit"))
    pds = spec.get("progressDeadlineSeconds")
    if pds is not None:
        errs.extend(_nonnegative(pds, "spec.progressDeadlineSeconds"))
        if isinstance(pds, int) and pds <= (spec.get("minReadySeconds") or 0):
            errs.append(invalid("spec.progressDeadlineSeconds", pds, "must be greater than minReadySeconds"))
    return errs


def _validate_replica_set(obj: Mapping[str, Any]) -> list[FieldError]:
    errs = validate_object_meta(obj.get("metadata") or {}, True, is_dns1123_subdomain)
    spec = obj.get("spec") or {}
    errs.extend(_nonnegative(spec.get("replicas"), "spec.replicas"))
    errs.extend(_nonnegative(spec.get("minReadySeconds"), "spec.minReadySeconds"))
    errs.extend(_selector_required(spec, "deployment"))  # sic: apps validation says "deployment" here too
    errs.extend(_template_for_rs(spec, "ReplicaSet"))
    return errs


def _validate_daemon_set(obj: Mapping[str, Any]) -> list[FieldError]:
    errs = validate_object_meta(obj.get("metadata") or {}, True, is_dns1123_subdomain)
    spec = obj.get("spec") or {}
    selector = spec.get("selector")
    template = spec.get("template") or {}
    errs.extend(validate_label_selector(selector, "spec.selector"))
    labels = (template.get("metadata") or {}).get("labels")
    if _selector_is_valid(selector):
        empty = selector is not None and not (selector.get("matchLabels") or selector.get("matchExpressions"))
        if not empty and not label_selector_matches(selector, labels):
            errs.append(invalid("spec.template.metadata.labels", go_string_map(labels), "`selector` does not match template `labels`"))
    if selector is not None and not (selector.get("matchLabels") or selector.get("matchExpressions")):
        errs.append(invalid("spec.selector", _go_label_selector(selector), "empty selector is invalid for daemonset"))
    errs.extend(_validate_pod_template(template, "spec.template"))
    restart = (template.get("spec") or {}).get("restartPolicy")
    if restart != "Always":
        errs.append(not_supported("spec.template.spec.restartPolicy", restart or "", ["Always"]))
    errs.extend(_nonnegative(spec.get("minReadySeconds"), "spec.minReadySeconds"))
    return errs


def _validate_stateful_set(obj: Mapping[str, Any]) -> list[FieldError]:
    """``ValidateStatefulSet``. Note: the API server does not validate the template's
    pod spec for StatefulSets (a TODO in apps/validation); see :func:`validate_object`."""
    errs = validate_object_meta(obj.get("metadata") or {}, True, is_dns1123_label)
    spec = obj.get("spec") or {}
    pmp = spec.get("podManagementPolicy") or ""
    if not pmp:
        errs.append(required("spec.podManagementPolicy"))
    elif pmp not in ("OrderedReady", "Parallel"):
        errs.append(invalid("spec.podManagementPolicy", pmp, "must be 'OrderedReady' or 'Parallel'"))
    strategy = spec.get("updateStrategy") or {}
    stype = strategy.get("type") or ""
    if not stype:
        errs.append(required("spec.updateStrategy"))
    elif stype == "OnDelete" and strategy.get("rollingUpdate") is not None:
        errs.append(
            invalid(
                "spec.updateStrategy.rollingUpdate",
                GoValue(go_format(strategy.get("rollingUpdate"))),
                "only allowed for updateStrategy 'RollingUpdate'",
            )
        )
    elif stype not in ("OnDelete", "RollingUpdate"):
        errs.append(
            invalid(
                "spec.updateStrategy",
                GoValue("apps.StatefulSetUpdateStrategy{Type:%s, RollingUpdate:(*apps.RollingUpdateStatefulSetStrategy)(nil)}" % go_quote(stype)),
                "must be 'RollingUpdate' or 'OnDelete'",
            )
        )
    errs.extend(_nonnegative(spec.get("replicas"), "spec.replicas"))
    errs.extend(_nonnegative(spec.get("minReadySeconds"), "spec.minReadySeconds"))
    errs.extend(_selector_required(spec, "statefulset"))
    selector = spec.get("selector")
    template = spec.get("template") or {}
    if not _selector_is_valid(selector):
        errs.append(invalid("spec.selector", _go_label_selector(selector), ""))
    else:
        labels = (template.get("metadata") or {}).get("labels")
        empty = selector is not None and not (selector.get("matchLabels") or selector.get("matchExpressions"))
        if not empty and not label_selector_matches(selector, labels):
            errs.append(invalid("spec.template.metadata.labels", go_string_map(labels), "`selector` does not match template `labels`"))
        errs.extend(validate_labels(labels, "spec.template.labels"))
    restart = (template.get("spec") or {}).get("restartPolicy")
    if restart != "Always":
        errs.append(not_supported("spec.template.spec.restartPolicy", restart or "", ["Always"]))
    return errs


def _validate_namespace(obj: Mapping[str, Any]) -> list[FieldError]:
    meta = dict(obj.get("metadata") or {})
    meta.pop("namespace", None)  # cleared for cluster-scoped objects before validation
    return validate_object_meta(meta, False, is_dns1123_label)


# ---- Service ---------------------------------------------------------------------------

_SERVICE_TYPES = ("ClusterIP", "ExternalName", "LoadBalancer", "NodePort")  # sets.List: sorted
_AFFINITIES = ("ClientIP", "None")
_TRAFFIC_POLICIES = ("Cluster", "Local")
_IP_FAMILIES = ("IPv4", "IPv6")
_IP_FAMILY_POLICIES = ("PreferDualStack", "RequireDualStack", "SingleStack")


def is_headless(spec: Mapping[str, Any]) -> bool:
    ips = spec.get("clusterIPs") or []
    return len(ips) == 1 and ips[0] == "None"


def _validate_port_num_or_name(value: Any, path: str) -> list[FieldError]:
    if isinstance(value, str):
        return [invalid(path, value, m) for m in is_valid_port_name(value)]
    if isinstance(value, int) and not isinstance(value, bool):
        return [invalid(path, value, m) for m in is_valid_port_num(value)]
    return [internal(path, f"unknown type: {value!r}")]


def _validate_service_port(sp: Mapping[str, Any], require_name: bool, names: set[str], path: str) -> list[FieldError]:
    errs: list[FieldError] = []
    name = sp.get("name") or ""
    if require_name and not name:
        errs.append(required(path + ".name"))
    elif name:
        errs.extend(_name_errors(is_dns1123_label, path + ".name", name))
        if name in names:
            errs.append(duplicate(path + ".name", name))
        else:
            names.add(name)
    port = sp.get("port") or 0
    errs.extend(invalid(path + ".port", port, m) for m in is_valid_port_num(port))
    proto = sp.get("protocol") or ""
    if not proto:
        errs.append(required(path + ".protocol"))
    elif proto not in _PROTOCOLS:
        errs.append(not_supported(path + ".protocol", proto, _PROTOCOLS))
    target = sp.get("targetPort")
    if target is None:
        target = 0
    errs.extend(_validate_port_num_or_name(target, path + ".targetPort"))
    if sp.get("appProtocol") is not None:
        errs.extend(invalid(path + ".appProtocol", sp["appProtocol"], m) for m in is_qualified_name(sp["appProtocol"]))
    return errs


def cluster_ips_related_errors(spec: Mapping[str, Any]) -> list[FieldError]:
    """``ValidateServiceClusterIPsRelatedFields``."""
    if spec.get("type") == "ExternalName":
        return []
    errs: list[FieldError] = []
    has_invalid = False
    cluster_ip = spec.get("clusterIP") or ""
    cluster_ips = list(spec.get("clusterIPs") or [])
    families = list(spec.get("ipFamilies") or [])
    if cluster_ip:
        if not cluster_ips:
            errs.append(required("spec.clusterIPs"))
        elif cluster_ips[0] != cluster_ip:
            errs.append(invalid("spec.clusterIPs", go_string_slice(cluster_ips), "first value must match `clusterIP`"))
    elif cluster_ips:
        errs.append(invalid("spec.clusterIPs", go_string_slice(cluster_ips), "must be empty when `clusterIP` is not specified"))
    seen: set[str] = set()
    for i, fam in enumerate(families):
        if fam not in _IP_FAMILIES:
            errs.append(not_supported(f"spec.ipFamilies[{i}]", fam, _IP_FAMILIES))
        if fam in seen:
            errs.append(duplicate(f"spec.ipFamilies[{i}]", fam))
        seen.add(fam)
    policy = spec.get("ipFamilyPolicy")
    if policy is not None and policy not in _IP_FAMILY_POLICIES:
        errs.append(not_supported("spec.ipFamilyPolicy", policy, _IP_FAMILY_POLICIES))
    for i, ip in enumerate(cluster_ips):
        if i == 0 and ip == "None":
            if len(cluster_ips) > 1:
                has_invalid = True
                errs.append(invalid("spec.clusterIPs", go_string_slice(cluster_ips), "'None' must be the first and only value"))
            continue
        ip_errs = is_valid_ip(f"spec.clusterIPs[{i}]", ip)
        has_invalid = has_invalid or bool(ip_errs)
        errs.extend(ip_errs)
    if len(cluster_ips) > 2:
        errs.append(invalid("spec.clusterIPs", go_string_slice(cluster_ips), "may only hold up to 2 values"))
    if has_invalid:
        return errs
    if len(cluster_ips) > 1:
        versions = [parse_ip_sloppy(ip).version for ip in cluster_ips]  # type: ignore[union-attr]
        if len(set(versions)) != len(versions) or len(versions) != 2:
            errs.append(invalid("spec.clusterIPs", go_string_slice(cluster_ips), "may specify no more than one IP for each IP family"))
    if not is_headless(spec) and cluster_ips and families:
        for i, ip in enumerate(cluster_ips):
            if i > len(families) - 1:
                break
            v6 = parse_ip_sloppy(ip).version == 6  # type: ignore[union-attr]
            if families[i] == "IPv4" and v6:
                errs.append(invalid(f"spec.clusterIPs[{i}]", ip, f"expected an IPv4 value as indicated by `ipFamilies[{i}]`"))
            if families[i] == "IPv6" and not v6:
                errs.append(invalid(f"spec.clusterIPs[{i}]", ip, f"expected an IPv6 value as indicated by `ipFamilies[{i}]`"))
    return errs


def service_errors(svc: Mapping[str, Any]) -> list[FieldError]:
    """``ValidateService`` on a defaulted Service (create)."""
    meta = svc.get("metadata") or {}
    spec = svc.get("spec") or {}
    errs = validate_object_meta(meta, True, is_dns1035_label)
    annotations = meta.get("annotations") or {}
    hints = annotations.get("service.kubernetes.io/topology-aware-hints")
    mode = annotations.get("service.kubernetes.io/topology-mode")
    if hints is not None and mode is not None and hints != mode:
        errs.append(
            invalid(
                "metadata.annotations[service.kubernetes.io/topology-mode]",
                mode,
                "must match annotations[service.kubernetes.io/topology-aware-hints] when both are specified",
            )
        )
    typ = spec.get("type") or ""
    ports = [p if isinstance(p, dict) else {} for p in (spec.get("ports") or [])]
    headless = is_headless(spec)
    if not ports and not headless and typ != "ExternalName":
        errs.append(required("spec.ports"))
    if typ == "LoadBalancer":
        for i, port in enumerate(ports):
            if port.get("port") == KUBELET_PORT:
                errs.append(
                    invalid(f"spec.ports[{i}]", KUBELET_PORT, f"may not expose port {KUBELET_PORT} externally since it is used by kubelet")
                )
        if headless:
            errs.append(invalid("spec.clusterIPs[0]", "None", "may not be set to 'None' for LoadBalancer services"))
    elif typ == "NodePort":
        if headless:
            errs.append(invalid("spec.clusterIPs[0]", "None", "may not be set to 'None' for NodePort services"))
    elif typ == "ExternalName":
        if spec.get("clusterIPs"):
            errs.append(forbidden("spec.clusterIPs", "may not be set for ExternalName services"))
        if spec.get("ipFamilies"):
            errs.append(forbidden("spec.ipFamilies", "may not be set for ExternalName services"))
        if spec.get("ipFamilyPolicy") is not None:
            errs.append(forbidden("spec.ipFamilyPolicy", "may not be set for ExternalName services"))
        cname = str(spec.get("externalName") or "")
        cname = cname[:-1] if cname.endswith(".") else cname
        if cname:
            errs.extend(_name_errors(is_dns1123_subdomain, "spec.externalName", cname))
        else:
            errs.append(required("spec.externalName"))
    names: set[str] = set()
    for i, port in enumerate(ports):
        errs.extend(_validate_service_port(port, len(ports) > 1, names, f"spec.ports[{i}]"))
    if spec.get("selector") is not None:
        errs.extend(validate_labels(spec.get("selector"), "spec.selector"))
    affinity = spec.get("sessionAffinity") or ""
    if not affinity:
        errs.append(required("spec.sessionAffinity"))
    elif affinity not in _AFFINITIES:
        errs.append(not_supported("spec.sessionAffinity", affinity, _AFFINITIES))
    if affinity == "ClientIP":
        cfg = spec.get("sessionAffinityConfig")
        when = "when session affinity type is ClientIP"
        if cfg is None:
            errs.append(required("spec.sessionAffinityConfig", when))
        elif cfg.get("clientIP") is None:
            errs.append(required("spec.sessionAffinityConfig.clientIP", when))
        elif cfg["clientIP"].get("timeoutSeconds") is None:
            errs.append(required("spec.sessionAffinityConfig.clientIP.timeoutSeconds", when))
        else:
            timeout = cfg["clientIP"]["timeoutSeconds"]
            if timeout <= 0 or timeout > MAX_CLIENT_IP_SERVICE_AFFINITY_SECONDS:
                errs.append(
                    invalid(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        timeout,
                        f"must be greater than 0 and less than {MAX_CLIENT_IP_SERVICE_AFFINITY_SECONDS}",
                    )
                )
    elif affinity == "None" and spec.get("sessionAffinityConfig") is not None:
        errs.append(forbidden("spec.sessionAffinityConfig", "must not be set when session affinity is None"))
    errs.extend(cluster_ips_related_errors(spec))
    for i, ip in enumerate(spec.get("externalIPs") or []):
        p = f"spec.externalIPs[{i}]"
        ip_errs = is_valid_ip(p, ip)
        errs.extend(ip_errs or validate_non_special_ip(ip, p))
    if not typ:
        errs.append(required("spec.type"))
    elif typ not in _SERVICE_TYPES:
        errs.append(not_supported("spec.type", typ, _SERVICE_TYPES))
    if typ == "ClusterIP":
        for i, port in enumerate(ports):
            if port.get("nodePort"):
                errs.append(forbidden(f"spec.ports[{i}].nodePort", "may not be used when `type` is 'ClusterIP'"))
    node_ports: set[tuple[str, int]] = set()
    for i, port in enumerate(ports):
        np = port.get("nodePort") or 0
        if not np:
            continue
        key = (port.get("protocol") or "", np)
        if key in node_ports:
            errs.append(duplicate(f"spec.ports[{i}].nodePort", np))
        node_ports.add(key)
    port_keys: set[tuple[str, int]] = set()
    for i, port in enumerate(ports):
        key = (port.get("protocol") or "", port.get("port") or 0)
        if key in port_keys:
            errs.append(
                duplicate(
                    f"spec.ports[{i}]",
                    GoValue(
                        "core.ServicePort{Name:\"\", Protocol:%s, AppProtocol:(*string)(nil), Port:%d, "
                        "TargetPort:intstr.IntOrString{Type:0, IntVal:0, StrVal:\"\"}, NodePort:0}" % (go_quote(key[0]), key[1])
                    ),
                )
            )
        port_keys.add(key)
    ranges = spec.get("loadBalancerSourceRanges") or []
    if ranges:
        p = "spec.LoadBalancerSourceRanges"  # sic: kube-apiserver's capitalisation
        if typ != "LoadBalancer":
            errs.append(forbidden(p, "may only be used when `type` is 'LoadBalancer'"))
        for i, value in enumerate(ranges):
            errs.extend(is_valid_cidr(f"{p}[{i}]", str(value).strip()))
    elif "service.beta.kubernetes.io/load-balancer-source-ranges" in annotations:
        p = "metadata.annotations[service.beta.kubernetes.io/load-balancer-source-ranges]"
        if typ != "LoadBalancer":
            errs.append(forbidden(p, "may only be used when `type` is 'LoadBalancer'"))
        value = str(annotations["service.beta.kubernetes.io/load-balancer-source-ranges"]).strip()
        if value:
            for cidr in value.split(","):
                errs.extend(is_valid_cidr(p, cidr.strip()))
    if spec.get("allocateLoadBalancerNodePorts") is not None and typ != "LoadBalancer":
        errs.append(forbidden("spec.allocateLoadBalancerNodePorts", "may only be used when `type` is 'LoadBalancer'"))
    if typ == "LoadBalancer" and spec.get("allocateLoadBalancerNodePorts") is None:
        errs.append(required("allocateLoadBalancerNodePorts"))
    if typ == "LoadBalancer":
        if spec.get("loadBalancerClass") is not None:
            errs.extend(
                invalid("spec.loadBalancerClass", spec["loadBalancerClass"], m) for m in is_qualified_name(spec["loadBalancerClass"])
            )
    elif spec.get("loadBalancerClass") is not None:
        errs.append(forbidden("spec.loadBalancerClass", "may only be used when `type` is 'LoadBalancer'"))
    # validateServiceExternalTrafficPolicy
    etp = spec.get("externalTrafficPolicy") or ""
    if not _externally_accessible(spec):
        if etp:
            errs.append(invalid("spec.externalTrafficPolicy", etp, "may only be set for externally-accessible services"))
    elif not etp:
        errs.append(required("spec.externalTrafficPolicy"))
    elif etp not in _TRAFFIC_POLICIES:
        errs.append(not_supported("spec.externalTrafficPolicy", etp, _TRAFFIC_POLICIES))
    hcnp = spec.get("healthCheckNodePort") or 0
    if not needs_health_check(spec):
        if hcnp:
            errs.append(
                invalid(
                    "spec.healthCheckNodePort",
                    hcnp,
                    "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'",
                )
            )
    elif not hcnp:
        errs.append(required("spec.healthCheckNodePort"))
    else:
        errs.extend(invalid("spec.healthCheckNodePort", hcnp, m) for m in is_valid_port_num(hcnp))
    # validateServiceInternalTrafficFieldsValue
    itp = spec.get("internalTrafficPolicy")
    if itp is None:
        if typ in ("NodePort", "LoadBalancer", "ClusterIP"):
            errs.append(required("spec.internalTrafficPolicy"))
    elif itp not in _TRAFFIC_POLICIES:
        errs.append(not_supported("spec.internalTrafficPolicy", itp, _TRAFFIC_POLICIES))
    td = spec.get("trafficDistribution")
    if td is not None and td not in ("PreferClose", "PreferSameZone", "PreferSameNode"):
        errs.append(not_supported("spec.trafficDistribution", td, ("PreferClose", "PreferSameZone", "PreferSameNode")))
    return errs


# ---- EndpointSlice ---------------------------------------------------------------------

_ADDRESS_TYPES = ("FQDN", "IPv4", "IPv6")


def _is_fqdn(path: str, name: str) -> list[FieldError]:
    if not name:
        return [required(path)]
    if name.endswith("."):
        name = name[:-1]
    msgs = is_dns1123_subdomain(name)
    if msgs:
        return [invalid(path, name, ",".join(msgs))]
    if len(name.split(".")) < 2:
        return [invalid(path, name, "should be a domain with at least two segments separated by dots")]
    for label in name.split("."):
        msgs = is_dns1123_label(label)
        if msgs:
            return [invalid(path, label, ",".join(msgs))]
    return []


def _validate_endpoint_slice(obj: Mapping[str, Any]) -> list[FieldError]:
    errs = validate_object_meta(obj.get("metadata") or {}, True, is_dns1123_subdomain)
    addr_type = obj.get("addressType") or ""
    if not addr_type:
        errs.append(required("addressType"))
    elif addr_type not in _ADDRESS_TYPES:
        errs.append(not_supported("addressType", addr_type, _ADDRESS_TYPES))
    endpoints = obj.get("endpoints") or []
    if len(endpoints) > 1000:
        errs.append(too_many("endpoints", len(endpoints), 1000))
    else:
        for i, ep in enumerate(endpoints):
            ep = ep if isinstance(ep, dict) else {}
            p = f"endpoints[{i}]"
            addresses = ep.get("addresses") or []
            if not addresses:
                errs.append(required(p + ".addresses", "must contain at least 1 address"))
            elif len(addresses) > 100:
                errs.append(too_many(p + ".addresses", len(addresses), 100))
            for j, address in enumerate(addresses):
                ap = f"{p}.addresses[{j}]"
                if addr_type == "IPv4":
                    ip = parse_ip_sloppy(address)
                    if ip is None or ip.version != 4:
                        errs.append(invalid(ap, address, "must be a valid IPv4 address"))
                    errs.extend(validate_non_special_ip(address, ap))
                elif addr_type == "IPv6":
                    ip = parse_ip_sloppy(address)
                    if ip is None or ip.version != 6:
                        errs.append(invalid(ap, address, "must be a valid IPv6 address"))
                    errs.extend(validate_non_special_ip(address, ap))
                elif addr_type == "FQDN":
                    errs.extend(_is_fqdn(ap, address))
            if ep.get("nodeName") is not None:
                errs.extend(_name_errors(is_dns1123_subdomain, p + ".nodeName", ep["nodeName"]))
            topology = ep.get("deprecatedTopology") or {}
            if len(topology) > 16:
                errs.append(too_many(p + ".deprecatedTopology", len(topology), 16))
            errs.extend(validate_labels(topology, p + ".deprecatedTopology"))
            if ep.get("hostname") is not None:
                errs.extend(_name_errors(is_dns1123_label, p + ".hostname", ep["hostname"]))
    ports = obj.get("ports") or []
    if len(ports) > 20000:
        errs.append(too_many("ports", len(ports), 20000))
    else:
        names: set[str] = set()
        for i, port in enumerate(ports):
            port = port if isinstance(port, dict) else {}
            p = f"ports[{i}]"
            name = port.get("name") or ""
            if name:
                errs.extend(_name_errors(is_dns1123_label, p + ".name", name))
            if name in names:
                errs.append(duplicate(p + ".name", name))
            else:
                names.add(name)
            proto = port.get("protocol")
            if proto is None:
                errs.append(required(p + ".protocol"))
            elif proto not in _PROTOCOLS:
                errs.append(not_supported(p + ".protocol", proto, _PROTOCOLS))
            if port.get("appProtocol") is not None:
                errs.extend(invalid(p + ".appProtocol", port["appProtocol"], m) for m in is_qualified_name(port["appProtocol"]))
    return errs


# --------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------

#: (apiVersion, kind) -> (schema, validator). Namespace has no namespace.
SUPPORTED_KINDS: dict[tuple[str, str], tuple[Struct, Callable[[Mapping[str, Any]], list[FieldError]]]] = {
    ("v1", "Pod"): (POD, _validate_pod),
    ("v1", "Service"): (SERVICE, service_errors),
    ("v1", "Namespace"): (NAMESPACE, _validate_namespace),
    ("apps/v1", "Deployment"): (DEPLOYMENT, _validate_deployment),
    ("apps/v1", "StatefulSet"): (STATEFUL_SET, _validate_stateful_set),
    ("apps/v1", "DaemonSet"): (DAEMON_SET, _validate_daemon_set),
    ("apps/v1", "ReplicaSet"): (REPLICA_SET, _validate_replica_set),
    ("discovery.k8s.io/v1", "EndpointSlice"): (ENDPOINT_SLICE, _validate_endpoint_slice),
}
_NAMESPACED = {"Pod", "Service", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "EndpointSlice"}

# Built-in kinds a kubectl user may well put in a manifest; the testbed does not
# emulate them, and says so rather than pretending the server lacks them.
_BUILTIN_UNEMULATED = {
    ("v1", k)
    for k in (
        "ConfigMap",
        "Secret",
        "ServiceAccount",
        "Endpoints",
        "PersistentVolumeClaim",
        "PersistentVolume",
        "LimitRange",
        "ResourceQuota",
        "Node",
        "Event",
    )
} | {
    ("batch/v1", "Job"),
    ("batch/v1", "CronJob"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("networking.k8s.io/v1", "Ingress"),
    ("networking.k8s.io/v1", "IngressClass"),
    ("policy/v1", "PodDisruptionBudget"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("apps/v1", "ControllerRevision"),
}


def _clone(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def _compact_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def decode_object(obj: Any, file: str | None = None) -> tuple[str, str]:
    """The checks kubectl and the server's decoder make before validation.

    Returns ``(apiVersion, kind)``; raises :class:`APIError` for a missing or unknown
    kind and for decode errors.
    """
    source = file or "STDIN"
    if not isinstance(obj, dict):
        raise APIError(
            f"unable to decode {go_quote(source)}: json: cannot unmarshal {_json_kind(obj)} into Go value of type map[string]interface {{}}",
            reason="BadRequest",
            file=file,
        )
    kind = obj.get("kind")
    version = obj.get("apiVersion")
    if not kind:
        err = APIError(f"unable to decode {go_quote(source)}: Object 'Kind' is missing in '{_compact_json(obj)}'", reason="BadRequest")
        err.file = file
        raise err
    if not version:
        err = APIError(
            f"unable to decode {go_quote(source)}: Object 'apiVersion' is missing in '{_compact_json(obj)}'", reason="BadRequest"
        )
        err.file = file
        raise err
    if (version, kind) not in SUPPORTED_KINDS:
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        name = str(meta.get("name") or "")
        namespace = str(meta.get("namespace") or "")
        if (version, kind) in _BUILTIN_UNEMULATED:
            supported = ", ".join(f"{v} {k}" for v, k in SUPPORTED_KINDS)
            raise APIError(
                f"{kind} {go_quote(name)}: kind {go_quote(kind)} in version {go_quote(version)} is not emulated by the testbed "
                f"(supported: {supported})",
                reason="NoMatch",
                kind=kind,
                name=name,
                file=file,
            )
        err = APIError(
            f"resource mapping not found for name: {go_quote(name)} namespace: {go_quote(namespace)} from {go_quote(source)}: "
            f"no matches for kind {go_quote(kind)} in version {go_quote(version)}; ensure CRDs are installed first",
            reason="NoMatch",
            kind=kind,
            name=name,
        )
        err.file = file
        raise err
    schema, _ = SUPPORTED_KINDS[(version, kind)]
    _check_decode(obj, schema, kind, version.split("/")[-1], file)
    return version, kind


def validate_object(obj: dict, file: str | None = None) -> None:
    """Check one manifest as ``kubectl apply`` against kube-apiserver would.

    Raises :class:`APIError` (an :class:`InputError`) with kubectl's / the API
    server's text; returns ``None`` when the object would be accepted. The object is
    not modified (defaulting happens on a copy).

    Deviation: for a StatefulSet, whose pod template the API server does not
    validate, the template is also checked the way the Pod the StatefulSet controller
    creates (``<name>-0``) would be, and reported as that Pod's error -- the error a
    user would otherwise only find in the StatefulSet's events.
    """
    if isinstance(obj, dict) and obj.get("kind") == "List" and obj.get("apiVersion") == "v1":
        for item in obj.get("items") or []:
            validate_object(item, file)
        return
    version, kind = decode_object(obj, file)
    defaulted = default_object(_clone(obj))
    if kind == "Service":
        # The API server allocates before it validates; stand in for the allocation
        # that fills a required field (see testbed.apiserver for the real thing).
        spec = defaulted["spec"]
        if needs_health_check(spec) and not spec.get("healthCheckNodePort"):
            spec["healthCheckNodePort"] = 1
    _, validator = SUPPORTED_KINDS[(version, kind)]
    errors = validator(defaulted)
    name = str((defaulted.get("metadata") or {}).get("name") or "")
    if errors:
        raise invalid_error(kind, name, errors, file)
    if kind == "StatefulSet":
        spec = defaulted.get("spec") or {}
        template = spec.get("template") or {}
        pod_name = f"{name}-0"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": (defaulted.get("metadata") or {}).get("namespace")},
            "spec": _clone(template.get("spec") or {}),
        }
        pod["spec"].setdefault("hostname", pod_name)
        if spec.get("serviceName"):
            pod["spec"].setdefault("subdomain", spec["serviceName"])
        pod_errors = validate_pod_spec(pod["spec"], "spec", True)
        if pod_errors:
            raise invalid_error("Pod", pod_name, pod_errors, file)


BUILTIN_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


def check_namespaces(objs: Iterable[Mapping[str, Any]], file: str | None = None, known: Iterable[str] = BUILTIN_NAMESPACES) -> None:
    """The NamespaceLifecycle admission check: every namespaced object's namespace must
    exist (a built-in one or a ``Namespace`` in ``objs``). Message:
    ``namespaces "foo" not found``."""
    existing = set(known)
    objs = list(objs)
    for obj in objs:
        if obj.get("kind") == "Namespace":
            existing.add(str((obj.get("metadata") or {}).get("name") or ""))
    for obj in objs:
        if obj.get("kind") not in _NAMESPACED:
            continue
        namespace = (obj.get("metadata") or {}).get("namespace") or "default"
        if namespace not in existing:
            raise APIError(f"namespaces {go_quote(namespace)} not found", reason="NotFound", kind="Namespace", name=namespace, file=file)
