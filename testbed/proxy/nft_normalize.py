"""kube-proxy's nftables test normal form, and the kernel's view mapped onto it.

kube-proxy's unit tests (``pkg/proxy/nftables/proxier_test.go``) do not compare the
transaction a sync sends: they run it against ``knftables.Fake`` (an in-memory table),
take ``Fake.Dump()`` (the resulting table, one ``add`` command per object, rule and
element) and compare that, after ``sortNFTablesTransaction``
(``pkg/proxy/nftables/helpers_test.go``), with the expected text. This module provides
the three pieces:

* :class:`FakeNFTables`: ``knftables.Fake`` -- applies our transaction text (``add`` /
  ``flush`` / ``delete`` of table, chain, rule, set, map, element), atomically, with the
  kernel's errors for missing objects; :meth:`~FakeNFTables.dump` is ``Fake.Dump()``;
  :meth:`~FakeNFTables.kernel_state` is what kube-proxy lists from it before a sync;
  :attr:`~FakeNFTables.last_operations` is ``LastTransaction.NumOperations()``.
* :func:`sort_nftables_transaction`: ``sortNFTablesTransaction``.
* :func:`dump_from_nft_list`: the kernel's own ``nft list table ip kube-proxy`` output
  turned into the same ``Fake.Dump()`` form, so a live node's table can be compared with
  what was rendered. ``nft`` prints rules in its canonical syntax, not the syntax
  kube-proxy writes; each difference that kube-proxy's rules produce is mapped back (see
  :data:`NFT_LIST_MAPPINGS`, each entry measured with nft 1.0.6 on kernel 6.18).

Pure: nothing here touches the kernel.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from .nftables import KernelState

__all__ = [
    "OBJECT_ORDER",
    "sort_nftables_transaction",
    "FakeNFTables",
    "NFTError",
    "NFT_LIST_MAPPINGS",
    "dump_from_nft_list",
    "canonical_anonymous_sets",
    "live_normal_form",
    "normal_form",
]

#: ``objectOrder`` (higher sorts first; anything else 0).
OBJECT_ORDER = {"table": 10, "chain": 9, "rule": 8, "set": 7, "map": 6, "element": 5}


def sort_nftables_transaction(text: str) -> str:
    """``sortNFTablesTransaction``: drop blank lines and ``#`` comments, then stable-sort by
    object type (table, chain, rule, set, map, element), then by object name (the fifth
    word); ``add rule`` lines of one chain keep their order; other lines of the same type
    and name sort by the whole line."""
    lines = [ln for ln in text.split("\n") if ln and not ln.startswith("#")]

    def key(item: tuple[int, str]) -> tuple:
        idx, line = item
        words = line.split(" ")
        if len(words) < 5:  # never produced by a dump: keep them first, in order
            return (-100, "", idx, "")
        kind = words[1]
        return (-OBJECT_ORDER.get(kind, 0), words[4], 0 if kind == "rule" else 1, line if kind != "rule" else "")

    return "\n".join(line for _, line in sorted(enumerate(lines), key=key))


def normal_form(text: str) -> str:
    """A transaction or dump in the normal form kube-proxy's tests compare: the state it
    produces on an empty :class:`FakeNFTables`, dumped and sorted. Text that is already a
    ``Fake.Dump()`` (only ``add`` lines) normalises to itself, sorted."""
    fake = FakeNFTables()
    ops = [ln for ln in text.split("\n") if ln.strip() and not ln.startswith("#")]
    if ops and all(ln.startswith("add ") for ln in ops):
        fake.parse_dump(text)  # a dump may name sets before declaring them
    else:
        fake.apply(text)
    return sort_nftables_transaction(fake.dump())


# --- knftables.Fake ----------------------------------------------------------------------


class NFTError(Exception):
    """What ``nft -f`` would refuse (``Error: No such file or directory``, ...)."""


@dataclass
class _Chain:
    spec: str  # the "{ ... }" part of "add chain", or ""
    rules: list[str] = field(default_factory=list)


@dataclass
class _Set:
    kind: str  # "set" | "map"
    spec: str
    elements: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # key -> (value, comment)


_ELEMENT_RE = re.compile(r'^\{ (?P<key>[^"]*?)(?: comment (?P<comment>"(?:[^"\\]|\\.)*"))?(?: : (?P<value>.*))? \}$')


class FakeNFTables:
    """``knftables.Fake`` for one table (family ``ip``/``ip6``, name ``kube-proxy``).

    Stricter than the Go fake where the kernel is stricter: flushing or deleting a missing
    object, deleting a chain that is still a jump/goto target, and adding an
    element whose key exists with another value are errors; a failed transaction changes
    nothing (``nft -f`` is atomic)."""

    def __init__(self, family: str = "ip", table: str = "kube-proxy"):
        self.family = family
        self.table_name = table
        self.table: str | None = None  # the table's "{ ... }" spec once added
        self.chains: dict[str, _Chain] = {}
        self.sets: dict[str, _Set] = {}
        self.last_operations = 0
        self.transactions = 0

    # -- applying -------------------------------------------------------------------

    def apply(self, text: str) -> None:
        """Run one transaction (``nft -f`` input in knftables' syntax). Atomic."""
        ops = [ln for ln in text.split("\n") if ln.strip() and not ln.lstrip().startswith("#")]
        saved = (self.table, copy.deepcopy(self.chains), copy.deepcopy(self.sets))
        try:
            for line in ops:
                self._op(line)
        except Exception:
            self.table, self.chains, self.sets = saved
            raise
        self.last_operations = len(ops)
        self.transactions += 1

    def parse_dump(self, text: str) -> None:
        """``Fake.ParseDump``: load a dump (``add`` lines; order free)."""
        lines = [ln for ln in text.split("\n") if ln.strip() and not ln.startswith("#")]
        order = {"table": 0, "chain": 1, "set": 1, "map": 1, "rule": 2, "element": 2}
        lines.sort(key=lambda ln: order.get(ln.split(" ")[1], 3))
        self.apply("\n".join(lines))

    def _op(self, line: str) -> None:
        words = line.split(" ", 5)
        if len(words) < 4:
            raise NFTError(f"syntax error: {line!r}")
        verb, kind, family, table = words[:4]
        if family != self.family or table != self.table_name:
            raise NFTError(f"unexpected table {family} {table}: {line!r}")
        name = words[4] if len(words) > 4 else ""
        rest = words[5] if len(words) > 5 else ""
        if kind != "table" and self.table is None:
            raise NFTError(f"No such file or directory: table {family} {table}: {line!r}")
        if kind == "table":
            if verb == "add":
                if self.table is None:
                    self.table = " ".join(words[4:])
            elif verb == "delete":
                self.table, self.chains, self.sets = None, {}, {}
            elif verb == "flush":
                self.chains = {k: _Chain(c.spec) for k, c in self.chains.items()}
                for s in self.sets.values():
                    s.elements.clear()
            else:
                raise NFTError(f"unsupported: {line!r}")
        elif kind == "chain":
            ch = self.chains.get(name)
            if verb == "add":
                if ch is None:
                    self.chains[name] = _Chain(rest)
                elif rest and ch.spec and rest != ch.spec:
                    raise NFTError(f"Operation not supported: chain {name} exists with {ch.spec}: {line!r}")
            elif ch is None:
                raise NFTError(f"No such file or directory: chain {name}: {line!r}")
            elif verb == "flush":
                ch.rules.clear()
            elif verb == "delete":
                # the kernel drops the chain's rules with it; only a chain that is still a
                # jump/goto target (a rule or a verdict-map element) is refused
                if self._referenced(name):
                    raise NFTError(f"Device or resource busy: chain {name} is referenced: {line!r}")
                del self.chains[name]
            else:
                raise NFTError(f"unsupported: {line!r}")
        elif kind == "rule":
            ch = self.chains.get(name)
            if ch is None:
                raise NFTError(f"No such file or directory: chain {name}: {line!r}")
            if verb != "add":
                raise NFTError(f"unsupported: {line!r}")
            self._check_refs(rest, line)
            ch.rules.append(rest)
        elif kind in ("set", "map"):
            s = self.sets.get(name)
            if verb == "add":
                if s is None:
                    self.sets[name] = _Set(kind, rest)
                elif s.kind != kind:
                    raise NFTError(f"File exists: {name} is a {s.kind}: {line!r}")
            elif s is None or s.kind != kind:
                raise NFTError(f"No such file or directory: {kind} {name}: {line!r}")
            elif verb == "flush":
                s.elements.clear()
            elif verb == "delete":
                if self._set_referenced(name):
                    raise NFTError(f"Device or resource busy: {kind} {name} is referenced: {line!r}")
                del self.sets[name]
            else:
                raise NFTError(f"unsupported: {line!r}")
        elif kind == "element":
            s = self.sets.get(name)
            if s is None:
                raise NFTError(f"No such file or directory: set {name}: {line!r}")
            m = _ELEMENT_RE.match(rest)
            if not m:
                raise NFTError(f"syntax error in element: {line!r}")
            key, comment, value = m.group("key"), m.group("comment"), m.group("value") or ""
            if verb == "add":
                if (s.kind == "map") != bool(value):
                    raise NFTError(f"element value does not match {s.kind} {name}: {line!r}")
                if value:
                    self._check_refs(value, line)
                old = s.elements.get(key)
                if old is None:
                    s.elements[key] = (value, comment)
                elif old[0] != value:
                    raise NFTError(f"File exists: element {key} of {name}: {line!r}")
            elif verb == "delete":
                if key not in s.elements:
                    raise NFTError(f"No such file or directory: element {key} of {name}: {line!r}")
                del s.elements[key]
            else:
                raise NFTError(f"unsupported: {line!r}")
        else:
            raise NFTError(f"unsupported object {kind}: {line!r}")

    _TARGET_RE = re.compile(r"\b(?:jump|goto) (\S+)")
    _SETREF_RE = re.compile(r"@(\S+)")

    _COMMENT_RE = re.compile(r' comment "(?:[^"\\]|\\.)*"')

    def _check_refs(self, text: str, line: str) -> None:
        text = self._COMMENT_RE.sub("", text)
        for target in self._TARGET_RE.findall(text):
            if target not in self.chains:
                raise NFTError(f"No such file or directory: chain {target}: {line!r}")
        for ref in self._SETREF_RE.findall(text):
            if ref not in self.sets:
                raise NFTError(f"No such file or directory: set {ref}: {line!r}")

    def _referenced(self, chain: str) -> bool:
        pat = re.compile(rf"\b(?:jump|goto) {re.escape(chain)}(?:\s|$)")
        for ch in self.chains.values():
            if any(pat.search(r) for r in ch.rules):
                return True
        for s in self.sets.values():
            if any(pat.search(v) for v, _ in s.elements.values()):
                return True
        return False

    def _set_referenced(self, name: str) -> bool:
        pat = re.compile(rf"@{re.escape(name)}(?:\s|$)")
        return any(pat.search(r) for ch in self.chains.values() for r in ch.rules)

    # -- reading --------------------------------------------------------------------

    def kernel_state(self) -> KernelState:
        """What kube-proxy lists before a sync (no table: ``KernelState()``)."""
        if self.table is None:
            return KernelState()
        return KernelState(
            chains=frozenset(self.chains),
            sets=frozenset(n for n, s in self.sets.items() if s.kind == "set"),
            elements={n: {k: v for k, (v, _) in s.elements.items()} for n, s in self.sets.items()},
        )

    def dump(self) -> str:
        """``Fake.Dump()``: the table, chains with their rules, sets and maps with their
        elements, one ``add`` command per line, names sorted."""
        if self.table is None:
            return ""
        pre = f"{self.family} {self.table_name}"
        out = [f"add table {pre}" + (f" {self.table}" if self.table else "")]
        for name in sorted(self.chains):
            ch = self.chains[name]
            out.append(f"add chain {pre} {name}" + (f" {ch.spec}" if ch.spec else ""))
            out += [f"add rule {pre} {name} {r}" for r in ch.rules]
        for kind in ("set", "map"):
            for name in sorted(n for n, s in self.sets.items() if s.kind == kind):
                s = self.sets[name]
                out.append(f"add {kind} {pre} {name} {s.spec}")
                for key, (value, comment) in s.elements.items():
                    text = f"add element {pre} {name} {{ {key}"
                    if comment is not None:
                        text += f" comment {comment}"
                    if value:
                        text += f" : {value}"
                    out.append(text + " }")
        return "\n".join(out) + "\n"

    def rule_count(self) -> int:
        return sum(len(c.rules) for c in self.chains.values())


# --- the kernel's listing -----------------------------------------------------------------

#: How ``nft list table`` (nft 1.0.6) prints what kube-proxy writes, and what
#: :func:`dump_from_nft_list` maps it back to (``printed -> written``):
NFT_LIST_MAPPINGS: tuple[tuple[str, str], ...] = (
    ("type filter hook prerouting priority dstnat - 10; policy accept;", "priority -110 (knftables writes the number)"),
    ("priority dstnat / filter / srcnat", "priority -100 / 0 / 100"),
    ("policy accept; (every base chain)", "left out (kube-proxy sets no policy)"),
    ("meta mark set meta mark | 0x00004000", "mark set mark or 0x00004000"),
    ("meta mark & 0x00004000 == 0x00000000 return", "mark and 0x00004000 == 0 return"),
    ("meta mark set meta mark ^ 0x00004000", "mark set mark xor 0x00004000"),
    ("ip daddr 172.30.0.0/16 drop (a one-element anonymous set)", "ip daddr { 172.30.0.0/16 } drop"),
    ("ip saddr != { 5.6.7.8, 203.0.113.0/25 } (nft sorts)", "ip saddr != { 5.6.7.8 , 203.0.113.0/25 } (kube-proxy joins with ' , ')"),
    ("ip daddr { 10.96.0.0/12, 172.30.0.0/16 } drop (nft sorts)", "ip daddr { 10.96.0.0/12,172.30.0.0/16 } drop (joined with ',')"),
    ("numgen random mod 2 vmap { 0 : goto a, 1 : goto b }", "numgen random mod 2 vmap { 0 : goto a , 1 : goto b }"),
    ("set: size 65535 (kernel default for dynamic sets)", "left out"),
    ("set: flags dynamic,timeout / timeout 3h", "flags dynamic,timeout ; timeout 10800s ;"),
    ("elements = { a, b } inside the set/map block", "one add element line per element"),
    ("reject", "reject (unchanged; JSON says icmp port-unreachable)"),
)

#: kube-proxy writes these anonymous sets in its own order (source ranges, then LB IPs;
#: ServiceCIDRs as listed); nft keeps them sorted. :func:`canonical_anonymous_sets` sorts
#: both sides the same way before a live table is compared with a render.
_ANON_SET_RE = re.compile(r"\b(ip6? (?:saddr != |daddr ))\{ ([^}]*) \}")


def _addr_key(text: str):  # noqa: ANN202
    import ipaddress

    try:
        net = ipaddress.ip_network(text, strict=False)
        return (net.version, int(net.network_address), net.prefixlen)
    except ValueError:
        return (9, 0, 0, text)


def canonical_anonymous_sets(text: str) -> str:
    """Sort the members of the address sets in ``ip saddr != { ... }`` / ``ip daddr
    { ... }`` rules (nft's order), keeping kube-proxy's separators (`` , `` for source
    ranges, ``,`` for ServiceCIDRs)."""

    def fix(m: re.Match) -> str:
        sep = " , " if "saddr" in m.group(1) else ","
        items = [x.strip() for x in m.group(2).split(",") if x.strip()]
        return f"{m.group(1)}{{ {sep.join(sorted(items, key=_addr_key))} }}"

    return _ANON_SET_RE.sub(fix, text)


_DURATION_RE = re.compile(r"(\d+)([dhms])")
_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def _seconds(text: str) -> int:
    return sum(int(n) * _UNITS[u] for n, u in _DURATION_RE.findall(text))


_NAMED_PRIORITY = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}


def _priority(text: str) -> int:
    m = re.fullmatch(r"(-?\d+)|([a-z]+)(?: ([+-]) (\d+))?", text.strip())
    if not m:
        raise ValueError(f"priority {text!r}")
    if m.group(1):
        return int(m.group(1))
    val = _NAMED_PRIORITY[m.group(2)]
    if m.group(3):
        val += int(m.group(4)) * (1 if m.group(3) == "+" else -1)
    return val


def _rule_back(rule: str) -> str:
    """One rule as ``nft list`` prints it -> as kube-proxy writes it."""
    r = rule
    r = re.sub(r"meta mark set meta mark \| (0x[0-9a-f]+)", r"mark set mark or \1", r)
    r = re.sub(r"meta mark set meta mark \^ (0x[0-9a-f]+)", r"mark set mark xor \1", r)
    r = re.sub(r"meta mark & (0x[0-9a-f]+) == 0x0+ ", r"mark and \1 == 0 ", r)
    # numgen vmaps: "a, b" -> "a , b"
    r = re.sub(r"(vmap \{ )(.*?)( \})", lambda m: m.group(1) + m.group(2).replace(", ", " , ") + m.group(3), r)
    # anonymous sets of addresses: "{ a, b }" -> "{ a , b }", and a bare CIDR after
    # "ip daddr"/"ip saddr !=" that nft collapsed from a one-element set back into braces
    r = re.sub(r"\b(ip6? daddr) (\S+/\d+) drop", r"\1 { \2 } drop", r)
    r = re.sub(r"\b(ip6? saddr != )(\S+/\d+) drop", r"\1{ \2 } drop", r)
    return canonical_anonymous_sets(r)


def dump_from_nft_list(text: str, family: str = "ip", table: str = "kube-proxy") -> str:
    """``nft list table <family> <table>`` output -> ``Fake.Dump()`` form (see
    :data:`NFT_LIST_MAPPINGS`). Numbers nft prints in its own formatting (the mark as
    ``0x00004000``) stay as printed: compare with a render whose mark is written the same
    way (kube-proxy's own ``%#08x`` is)."""
    pre = f"{family} {table}"
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    block: str | None = None  # "chain NAME" | "set NAME" | "map NAME"
    props: dict = {}
    rules: list[str] = []
    elem_buf: str | None = None
    table_comment = None

    def flush_block() -> None:
        nonlocal block, props, rules
        if block is None:
            return
        kind, name = block.split(" ", 1)
        if kind == "chain":
            spec_parts = []
            if "hook" in props:
                spec_parts.append(f"type {props['type']} hook {props['hook']} priority {props['priority']} ;")
            if "comment" in props:
                spec_parts.append(f"comment {props['comment']} ;")
            out.append(f"add chain {pre} {name}" + (" { " + " ".join(spec_parts) + " }" if spec_parts else ""))
            out.extend(f"add rule {pre} {name} {_rule_back(r)}" for r in rules)
        else:
            spec = f"type {props['type']} ;"
            if props.get("flags"):
                spec += f" flags {props['flags']} ;"
            if props.get("timeout") is not None:
                spec += f" timeout {props['timeout']}s ;"
            if "comment" in props:
                spec += f" comment {props['comment']} ;"
            out.append(f"add {kind} {pre} {name} {{ {spec} }}")
            for el in props.get("elements", []):
                out.append(f"add element {pre} {name} {{ {el} }}")
        block, props, rules = None, {}, []

    while i < len(lines):
        raw = lines[i]
        s = raw.strip()
        i += 1
        if elem_buf is not None:
            elem_buf += " " + s
            if s.endswith("}"):
                props["elements"] = _split_elements(elem_buf)
                elem_buf = None
            continue
        if not s:
            continue
        if s.startswith("table "):
            continue
        if block is None:
            if s.startswith("comment "):
                table_comment = s[len("comment ") :]
                continue
            m = re.match(r"(chain|set|map) (\S+) \{$", s)
            if m:
                block = f"{m.group(1)} {m.group(2)}"
                continue
            if s == "}":
                continue
            raise ValueError(f"unexpected line in nft listing: {raw!r}")
        if s == "}":
            flush_block()
            continue
        kind = block.split(" ", 1)[0]
        if kind == "chain":
            m = re.match(r"type (\S+) hook (\S+) priority (.+?); policy \S+;$", s)
            if m:
                props.update(type=m.group(1), hook=m.group(2), priority=_priority(m.group(3)))
            elif s.startswith("comment ") and not rules:
                props["comment"] = s[len("comment ") :]
            else:
                rules.append(s)
        else:
            if s.startswith("type "):
                props["type"] = s[len("type ") :]
            elif s.startswith("flags "):
                props["flags"] = s[len("flags ") :]
            elif s.startswith("timeout "):
                props["timeout"] = _seconds(s[len("timeout ") :])
            elif s.startswith("size "):
                pass
            elif s.startswith("comment "):
                props["comment"] = s[len("comment ") :]
            elif s.startswith("elements = {"):
                elem_buf = s[len("elements = ") :]
                if s.endswith("}"):
                    props["elements"] = _split_elements(elem_buf)
                    elem_buf = None
            else:
                raise ValueError(f"unexpected line in {block}: {raw!r}")
    head = f"add table {pre}" + (f" {{ comment {table_comment} ; }}" if table_comment else "")
    return "\n".join([head, *out]) + "\n"


def live_normal_form(text: str) -> str:
    """The normal form for comparing a live table with a render: a ``Fake.Dump()`` or
    :func:`dump_from_nft_list` output, sorted as kube-proxy's tests sort, with the
    anonymous address sets in nft's order (:func:`canonical_anonymous_sets`)."""
    return sort_nftables_transaction(canonical_anonymous_sets(text))


def _split_elements(text: str) -> list[str]:
    """``{ a, b comment "x" : drop, c }`` -> ``["a", 'b comment "x" : drop', "c"]``."""
    body = text.strip()
    assert body.startswith("{") and body.endswith("}"), body
    body = body[1:-1].strip()
    items, cur, in_q = [], "", False
    for ch in body:
        if ch == '"':
            in_q = not in_q
        if ch == "," and not in_q:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        items.append(cur.strip())
    return items
