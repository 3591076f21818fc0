"""kube-proxy's test-side handling of ``iptables-restore`` text.

Mirrors ``pkg/util/iptables/testing/parse.go`` (``ParseIPTablesDump``, ``ParseRule``,
``IPTablesDump.String``) and ``sortIPTablesRules`` / ``assertIPTablesChainEqual`` from
``pkg/proxy/iptables/proxier_test.go`` (read at ``531be812``). kube-proxy's tests compare
its output only after :func:`sort_iptables_rules`, because the proxier walks Go maps:

* tables sort by name (``filter`` before ``nat``);
* in each table the chains sort: ``KUBE-NODEPORTS``, ``KUBE-SERVICES``, other ``KUBE-*``
  alphabetically, then the rest alphabetically; rules are printed grouped by chain in
  that order, then ``-X`` lines for deleted chains;
* in ``KUBE-NODEPORTS`` and ``KUBE-SERVICES`` of both tables the rules are stable-sorted
  by the service name in their comment (the comment up to the first space or colon),
  keeping nat ``KUBE-SERVICES``'s "must be the last rule" rule last; other chains keep
  their order.

The stable sort is Go's ``sort.SliceStable`` (insertion sort in blocks of 20, then
SymMerge) run with kube-proxy's comparison function, so even rules without a comment
(for which that comparison is not a strict order) land where Go puts them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, MutableSequence

__all__ = [
    "IPTablesValue",
    "Rule",
    "Chain",
    "Table",
    "IPTablesDump",
    "parse_rule",
    "parse_iptables_dump",
    "sort_iptables_rules",
    "chain_rules",
    "go_stable_sort",
]


@dataclass(slots=True)
class IPTablesValue:
    """``iptablestest.IPTablesValue``: a parameter value, possibly negated."""

    value: str
    negated: bool = False

    def matches(self, other: str) -> bool:
        return (self.value != other) if self.negated else (self.value == other)


# param -> (field, kind, negatable); kind "value" takes an argument, "bool" does not.
_PARAMS: dict[str, tuple[str, str, bool]] = {
    "-A": ("chain", "str", False),
    "--comment": ("comment", "value", False),
    "-p": ("protocol", "value", True),
    "-s": ("source_address", "value", True),
    "--src-type": ("source_type", "value", True),
    "--sport": ("source_port", "value", True),
    "-d": ("destination_address", "value", True),
    "--dst-type": ("destination_type", "value", True),
    "--dport": ("destination_port", "value", True),
    "--match-set": ("match_set", "value", True),
    "-j": ("jump", "value", False),
    "--random-fully": ("random_fully", "bool", False),
    "--probability": ("probability", "value", False),
    "--to-destination": ("dnat_destination", "value", False),
    "--rcheck": ("affinity_check", "bool", True),
    "--mark": ("mark_check", "value", True),
    "--ctstate": ("ct_state_check", "value", True),
    "--name": ("affinity_name", "value", False),
    "--seconds": ("affinity_seconds", "value", False),
    "--set": ("affinity_set", "bool", True),
    "--reap": ("affinity_reap", "bool", False),
    "--mode": ("statistic_mode", "value", False),
}


@dataclass(slots=True)
class Rule:
    """``iptablestest.Rule``: one ``-A`` line, with the parameters kube-proxy uses.

    Value parameters are :class:`IPTablesValue` or ``None``; flag parameters are
    ``None`` (absent), ``True`` or ``False`` (negated)."""

    raw: str
    chain: str = ""
    comment: IPTablesValue | None = None
    protocol: IPTablesValue | None = None
    source_address: IPTablesValue | None = None
    source_type: IPTablesValue | None = None
    source_port: IPTablesValue | None = None
    destination_address: IPTablesValue | None = None
    destination_type: IPTablesValue | None = None
    destination_port: IPTablesValue | None = None
    match_set: IPTablesValue | None = None
    jump: IPTablesValue | None = None
    random_fully: bool | None = None
    probability: IPTablesValue | None = None
    dnat_destination: IPTablesValue | None = None
    affinity_check: bool | None = None
    mark_check: IPTablesValue | None = None
    ct_state_check: IPTablesValue | None = None
    affinity_name: IPTablesValue | None = None
    affinity_seconds: IPTablesValue | None = None
    affinity_set: bool | None = None
    affinity_reap: bool | None = None
    statistic_mode: IPTablesValue | None = None


@dataclass
class Chain:
    name: str
    packets: int = 0
    bytes: int = 0
    rules: list[Rule] = field(default_factory=list)
    deleted: bool = False


@dataclass
class Table:
    name: str
    chains: list[Chain] = field(default_factory=list)

    def get_chain(self, name: str) -> Chain | None:
        for chain in self.chains:
            if chain.name == name:
                return chain
        return None


@dataclass
class IPTablesDump:
    tables: list[Table] = field(default_factory=list)

    def get_table(self, name: str) -> Table | None:
        for table in self.tables:
            if table.name == name:
                return table
        return None

    def get_chain(self, table: str, chain: str) -> Chain | None:
        t = self.get_table(table)
        return t.get_chain(chain) if t else None

    def __str__(self) -> str:
        """``IPTablesDump.String()``."""
        out: list[str] = []
        for t in self.tables:
            out.append(f"*{t.name}")
            for c in t.chains:
                out.append(f":{c.name} - [{c.packets}:{c.bytes}]")
            for c in t.chains:
                for r in c.rules:
                    out.append(r.raw)
            for c in t.chains:
                if c.deleted:
                    out.append(f"-X {c.name}")
            out.append("COMMIT")
        return "".join(line + "\n" for line in out)


# A single word, or a quoted string, at the start or after whitespace.
_WORD = re.compile(r'(?:^|\s)("[^"]*"|[^"]\S*)')
_DECLARE_TABLE = re.compile(r"^\*(.*)$")
_DECLARE_CHAIN = re.compile(r"^:([^ ]*) - \[([0-9]*):([0-9]*)\]$")
_ADD_RULE = re.compile(r"^-A ([^ ]*) (.*)$")
_DELETE_CHAIN = re.compile(r"^-X (.*)$")


def parse_rule(rule: str, strict: bool = False) -> Rule:
    """``iptablestest.ParseRule``. Raises ``ValueError`` on a malformed rule."""
    parsed = Rule(raw=rule)
    words = [m.group(1).strip('"') for m in _WORD.finditer(rule)]
    if len(words) < 2 or words[0] != "-A":
        raise ValueError('bad iptables rule (does not start with "-A CHAIN")')
    if len(words) < 3:
        raise ValueError("bad iptables rule (no match rules)")
    negated = False
    w = 0
    n = len(words)
    while w < n:
        word = words[w]
        if word == "-m" and w < n - 1:
            w += 2
            continue
        if word == "!":
            negated = True
            w += 1
            continue
        spec = _PARAMS.get(word)
        if spec is not None:
            attr, kind, negatable = spec
            if negated and not negatable:
                raise ValueError(f"cannot negate parameter {word!r}")
            if kind != "bool" and w == n - 1:
                raise ValueError(f"parameter {word!r} requires an argument")
            if kind == "bool":
                setattr(parsed, attr, not negated)
                w += 1
            elif kind == "value":
                setattr(parsed, attr, IPTablesValue(words[w + 1], negated))
                w += 2
            else:
                setattr(parsed, attr, words[w + 1])
                w += 2
        elif strict:
            raise ValueError(f"unrecognized parameter {word!r}")
        else:
            w += 1
        negated = False
    return parsed


def parse_iptables_dump(data: str) -> IPTablesDump:
    """``iptablestest.ParseIPTablesDump``. Raises ``ValueError`` like the Go errors."""
    dump = IPTablesDump()
    state = "table"
    table: Table | None = None
    for raw_line in data.strip("\n").split("\n"):
        line = raw_line.strip()
        while True:
            if line == "" or line[0] == "#":
                break
            if state == "table":
                m = _DECLARE_TABLE.match(line)
                if not m:
                    raise ValueError(
                        f"could not parse iptables data (table {len(dump.tables) + 1} starts with {line!r} not a table name)"
                    )
                table = Table(m.group(1))
                dump.tables.append(table)
                state = "chains"
                break
            if state == "chains":
                m = _DECLARE_CHAIN.match(line)
                if not m:
                    state = "rules"
                    continue  # retry this line as a rule
                assert table is not None
                table.chains.append(Chain(m.group(1), int(m.group(2) or 0), int(m.group(3) or 0)))
                break
            # state == "rules"
            assert table is not None
            m = _ADD_RULE.match(line)
            if m:
                chain = table.get_chain(m.group(1))
                if chain is None:
                    raise ValueError(f"error parsing rule {line!r}: no such chain {m.group(1)!r}")
                if chain.deleted:
                    raise ValueError(f"cannot add rules to deleted chain {m.group(1)!r}")
                chain.rules.append(parse_rule(line, False))
                break
            m = _DELETE_CHAIN.match(line)
            if m:
                chain = table.get_chain(m.group(1))
                if chain is None:
                    raise ValueError(f"error parsing rule {line!r}: no such chain {m.group(1)!r}")
                if chain.rules:
                    raise ValueError(f"cannot delete chain {m.group(1)!r} after adding rules")
                chain.deleted = True
                break
            if line == "COMMIT":
                state = "table"
                break
            raise ValueError(f"error parsing rule {line!r}")
    if state != "table":
        raise ValueError("could not parse iptables data (no COMMIT line?)")
    return dump


# --- Go's sort.SliceStable ----------------------------------------------------------


def go_stable_sort(data: MutableSequence, less: Callable[[object, object], bool]) -> None:
    """Go ``sort.SliceStable(data, less)`` (``stable_func``), in place: the same
    comparisons in the same order, so the result matches Go's even when ``less`` is
    not a strict weak order."""
    n = len(data)

    def insertion_sort(a: int, b: int) -> None:
        for i in range(a + 1, b):
            j = i
            while j > a and less(data[j], data[j - 1]):
                data[j], data[j - 1] = data[j - 1], data[j]
                j -= 1

    def swap_range(a: int, b: int, k: int) -> None:
        for i in range(k):
            data[a + i], data[b + i] = data[b + i], data[a + i]

    def rotate(a: int, m: int, b: int) -> None:
        i = m - a
        j = b - m
        while i != j:
            if i > j:
                swap_range(m - i, m, j)
                i -= j
            else:
                swap_range(m - i, m + j - i, i)
                j -= i
        swap_range(m - i, m, i)

    def sym_merge(a: int, m: int, b: int) -> None:
        if m - a == 1:
            i, j = m, b
            while i < j:
                h = (i + j) >> 1
                if less(data[h], data[a]):
                    i = h + 1
                else:
                    j = h
            for k in range(a, i - 1):
                data[k], data[k + 1] = data[k + 1], data[k]
            return
        if b - m == 1:
            i, j = a, m
            while i < j:
                h = (i + j) >> 1
                if not less(data[m], data[h]):
                    i = h + 1
                else:
                    j = h
            for k in range(m, i, -1):
                data[k], data[k - 1] = data[k - 1], data[k]
            return
        mid = (a + b) >> 1
        nn = mid + m
        if m > mid:
            start, r = nn - b, mid
        else:
            start, r = a, m
        p = nn - 1
        while start < r:
            c = (start + r) >> 1
            if not less(data[p - c], data[c]):
                start = c + 1
            else:
                r = c
        end = nn - start
        if start < m < end:
            rotate(start, m, end)
        if a < start < mid:
            sym_merge(a, start, mid)
        if mid < end < b:
            sym_merge(mid, end, b)

    block = 20
    a, b = 0, block
    while b <= n:
        insertion_sort(a, b)
        a = b
        b += block
    insertion_sort(a, n)
    while block < n:
        a, b = 0, 2 * block
        while b <= n:
            sym_merge(a, a + block, b)
            a = b
            b += 2 * block
        m = a + block
        if m < n:
            sym_merge(a, m, n)
        block *= 2


# --- sortIPTablesRules --------------------------------------------------------------


def _service_name_of(comment: str) -> str:
    for i, ch in enumerate(comment):
        if ch == " " or ch == ":":
            return comment[:i]
    return comment


def _order_by_comment_service_name(r1: Rule, r2: Rule) -> bool:
    """``orderByCommentServiceName``."""
    if r1.comment is None or r2.comment is None:
        return False
    return _service_name_of(r1.comment.value) < _service_name_of(r2.comment.value)


def _chain_sort_key(name: str) -> tuple[int, str]:
    if name == "KUBE-NODEPORTS":
        return (0, "")
    if name == "KUBE-SERVICES":
        return (1, "")
    if name.startswith("KUBE-"):
        return (2, name)
    return (3, name)


def _must_be_last(rule: Rule) -> bool:
    return rule.comment is not None and "must be the last rule" in rule.comment.value


def _nat_services_less(r1: Rule, r2: Rule) -> bool:
    if _must_be_last(r1):
        return False
    if _must_be_last(r2):
        return True
    return _order_by_comment_service_name(r1, r2)


def sort_iptables_rules(rule_data: str) -> str:
    """``sortIPTablesRules``: kube-proxy's test normalisation of restore input.

    Like ``assertIPTablesRulesEqual``, leading spaces, tabs and newlines are trimmed
    first."""
    dump = parse_iptables_dump(rule_data.lstrip(" \t\n"))
    dump.tables.sort(key=lambda t: t.name)
    for table in dump.tables:
        table.chains.sort(key=lambda c: _chain_sort_key(c.name))
    for tname in ("filter", "nat"):
        chain = dump.get_chain(tname, "KUBE-NODEPORTS")
        if chain is not None:
            go_stable_sort(chain.rules, _order_by_comment_service_name)
    chain = dump.get_chain("filter", "KUBE-SERVICES")
    if chain is not None:
        go_stable_sort(chain.rules, _order_by_comment_service_name)
    chain = dump.get_chain("nat", "KUBE-SERVICES")
    if chain is not None:
        go_stable_sort(chain.rules, _nat_services_less)
    return str(dump)


def chain_rules(rule_data: str, table: str, chain: str) -> str:
    """The raw rules of one chain, one per line (``assertIPTablesChainEqual``'s view);
    ``""`` if the chain is absent or empty."""
    dump = parse_iptables_dump(rule_data.lstrip(" \t\n"))
    c = dump.get_chain(table, chain)
    if c is None:
        return ""
    return "".join(r.raw + "\n" for r in c.rules)
