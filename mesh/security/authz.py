"""Authorization: which workload may call which service and method (pure, compiled once).

Rules, in `spec.security.authorization.rules`:

```yaml
authorization:
  enabled: true
  rules:
    - name: no-batch-to-gpt4            # unique; decisions name it (default: rule-<index>)
      action: DENY                      # ALLOW (the default) or DENY
      sources: ["spiffe://prod.mesh/ns/batch/**"]
      destinations: [gpt4-gateway]
    - name: apps-generate
      sources: ["spiffe://prod.mesh/ns/*/sa/app-*"]
      destinations: ["*"]
      methods: ["/aimesh.inference.v1.Inference/*", "/grpc.health.v1.Health/Check"]
```

- `sources`: SPIFFE ID patterns of the caller (syntax in `spiffe`: `*` within one segment,
  `**` for one or more whole segments), or tenant patterns `tenant:<name>` for callers
  outside the mesh that a gateway authenticated by API key or JWT (`*` in the name matches
  any run of characters: `tenant:team-*`). `*` alone matches any authenticated caller, a
  workload or a tenant. Omitted: any caller, including one without an identity (plaintext
  under PERMISSIVE mTLS); a caller without an identity never matches a listed pattern, not
  even `*`. Tenant callers are presented to `decide` as `tenant:<name>`.
- `destinations`: service names, `*` wildcards allowed (`gpt4-*`); omitted or `*`: all.
- `methods`: full gRPC method names `/package.Service/Method`, a whole service
  `/package.Service/*`, or `*`; omitted: all.
- A rule matches a call when all three match. Lists must not be empty.

The older shape `from: {principals: [...], namespaces: [...]}`, `to: {services: [...],
methods: [...]}` is accepted too (namespaces become `spiffe://<trust domain>/ns/<ns>/**`,
any trust domain unless one is given to `parse_rules`); a rule uses one shape or the other.

Decisions, deny first: a matching DENY rule wins (the first in order is named); else a
matching ALLOW rule allows; else the call is denied (default deny). With authorization
disabled every call is allowed.

`decide` is on the data path: rules are compiled once (exact names in sets, wildcard
patterns in one regex per rule), and decisions are cached per (source, destination,
method), since a mesh has few of each; the cache is cleared when it reaches `cache_size`.
Measured with timeit (CPython 3.11, 50 rules: 25 DENY, 25 ALLOW with SPIFFE and
destination wildcards): 0.2 us per cached decision; uncached 3 to 14 us (denied by rule 25:
2.7 us, default deny after all 50: 6.6 to 8.7 us, allowed by the last rule: 13.5 us).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from ..errors import ConfigError
from .spiffe import PatternSet, validate_trust_domain

Action = Literal["ALLOW", "DENY"]
ACTIONS: tuple[Action, ...] = ("ALLOW", "DENY")
DEFAULT_CACHE_SIZE = 4096

_METHOD = re.compile(r"/[A-Za-z_][A-Za-z0-9_.]*/(?:[A-Za-z_][A-Za-z0-9_]*|\*)")
_SERVICE = re.compile(r"[a-z0-9*]([a-z0-9*-]*[a-z0-9*])?")
_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
TENANT_PREFIX = "tenant:"
_TENANT_PATTERN = re.compile(r"[A-Za-z0-9._:@*-]{1,128}")


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule; `None` / `("*",)` mean any (see the module docstring)."""

    name: str
    action: Action = "ALLOW"
    sources: tuple[str, ...] | None = None
    destinations: tuple[str, ...] = ("*",)
    methods: tuple[str, ...] = ("*",)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule_name: str | None  # the rule that decided; None for default deny and disabled
    reason: str


class _Compiled:
    __slots__ = (
        "any_dest",
        "any_identity",
        "any_method",
        "any_source",
        "dest_re",
        "dests",
        "method_services",
        "methods",
        "name",
        "sources",
        "tenants",
    )

    def __init__(self, rule: Rule) -> None:
        self.name = rule.name
        self.any_source = rule.sources is None
        listed = rule.sources or ()
        self.any_identity = "*" in listed
        self.sources = PatternSet(s for s in listed if s != "*" and not s.startswith(TENANT_PREFIX))
        tenants = [
            re.escape(TENANT_PREFIX) + ".*".join(map(re.escape, s[len(TENANT_PREFIX) :].split("*")))
            for s in listed
            if s.startswith(TENANT_PREFIX)
        ]
        self.tenants = re.compile("|".join(tenants)) if tenants else None
        self.any_dest = "*" in rule.destinations
        self.dests = frozenset(d for d in rule.destinations if "*" not in d)
        wild = [d for d in rule.destinations if "*" in d and d != "*"]
        self.dest_re = (
            re.compile("|".join(".*".join(map(re.escape, d.split("*"))) for d in wild))
            if wild
            else None
        )
        self.any_method = "*" in rule.methods
        self.methods = frozenset(m for m in rule.methods if not m.endswith("/*") and m != "*")
        self.method_services = frozenset(m[:-1] for m in rule.methods if m.endswith("/*"))


def _first(
    rules: Sequence[_Compiled], source: str | None, dest: str, method: str, service: str
) -> _Compiled | None:
    for r in rules:
        if not (
            r.any_dest or dest in r.dests or (r.dest_re is not None and r.dest_re.fullmatch(dest))
        ):
            continue
        if not (r.any_method or method in r.methods or service in r.method_services):
            continue
        if r.any_source or (source is not None and _source_matches(r, source)):
            return r
    return None


def _source_matches(r: _Compiled, source: str) -> bool:
    if r.any_identity:
        return True
    if source.startswith(TENANT_PREFIX):
        return r.tenants is not None and r.tenants.fullmatch(source) is not None
    return r.sources.matches(source)


def check_rule(rule: Rule) -> list[str]:
    """The problems with a rule, as `field: problem` strings (empty if it is valid)."""
    problems: list[str] = []
    if not _NAME.fullmatch(rule.name):
        problems.append(
            f"name: {rule.name!r} must be letters, digits, '.', '-', '_' (not at either end)"
        )
    if rule.action not in ACTIONS:
        problems.append(f"action: must be ALLOW or DENY, got {rule.action!r}")
    lists = (("sources", rule.sources), ("destinations", rule.destinations))
    for key, values in (*lists, ("methods", rule.methods)):
        if values is not None and not values:
            problems.append(f"{key}: an empty list matches nothing; omit it to match any")
    for i, src in enumerate(rule.sources or ()):
        if src.startswith(TENANT_PREFIX):
            if not _TENANT_PATTERN.fullmatch(src[len(TENANT_PREFIX) :]):
                problems.append(
                    f"sources[{i}]: {src!r} is not a tenant pattern: tenant:<name>, the name "
                    "1 to 128 of letters, digits, '.', '_', ':', '@', '-' or '*'"
                )
            continue
        try:
            PatternSet([src])
        except ValueError as exc:
            problems.append(f"sources[{i}]: {exc}")
    for i, dest in enumerate(rule.destinations):
        if not _SERVICE.fullmatch(dest):
            problems.append(
                f"destinations[{i}]: {dest!r} is not a service name (lowercase letters, "
                "digits, '-') or a pattern with '*'"
            )
    for i, method in enumerate(rule.methods):
        if method != "*" and not _METHOD.fullmatch(method):
            problems.append(
                f"methods[{i}]: {method!r} must be /package.Service/Method, /package.Service/* or *"
            )
    return problems


class Authorizer:
    """Decides calls against compiled rules; see the module docstring for the semantics."""

    def __init__(
        self, rules: Iterable[Rule], enabled: bool = True, *, cache_size: int = DEFAULT_CACHE_SIZE
    ) -> None:
        self.rules = tuple(rules)
        self.enabled = enabled
        problems = [f"rules[{i}].{p}" for i, r in enumerate(self.rules) for p in check_rule(r)]
        seen: set[str] = set()
        for i, r in enumerate(self.rules):
            if r.name in seen:
                problems.append(f"rules[{i}].name: duplicate rule name {r.name!r}")
            seen.add(r.name)
        if problems:
            raise ValueError("invalid authorization rules: " + "; ".join(problems))
        compiled = [(_Compiled(r), r.action) for r in self.rules]
        self._deny = tuple(c for c, action in compiled if action == "DENY")
        self._allow = tuple(c for c, action in compiled if action == "ALLOW")
        self._cache: dict[tuple[str | None, str, str], Decision] = {}
        self._cache_size = cache_size

    @classmethod
    def from_config(
        cls, spec: _AuthorizationSpecLike, *, trust_domain: str | None = None
    ) -> Authorizer:
        """From `MeshConfig.security.authorization` (rules already parsed by the config
        loader, or YAML mappings); raises ConfigError naming each problem."""
        items = spec.rules
        if all(isinstance(r, Rule) for r in items):
            return cls([r for r in items if isinstance(r, Rule)], spec.enabled)
        raw = [r for r in items if not isinstance(r, Rule)]
        if len(raw) != len(items):
            raise TypeError("rules must be all parsed Rules or all YAML mappings")
        return cls(parse_rules(raw, trust_domain=trust_domain), spec.enabled)

    def decide(self, source_id: str | None, destination_service: str, method: str) -> Decision:
        """Whether `source_id` (None: no mesh identity) may call `method` on the service."""
        if not self.enabled:
            return _DISABLED
        key = (source_id, destination_service, method)
        decision = self._cache.get(key)
        if decision is None:
            decision = self._decide(source_id, destination_service, method)
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[key] = decision
        return decision

    def _decide(self, source: str | None, dest: str, method: str) -> Decision:
        service = method[: method.rfind("/") + 1]
        caller = source if source is not None else "an unauthenticated caller"
        rule = _first(self._deny, source, dest, method, service)
        if rule is not None:
            return Decision(
                False, rule.name, f"denied by rule '{rule.name}': {caller} -> {dest} {method}"
            )
        rule = _first(self._allow, source, dest, method, service)
        if rule is not None:
            return Decision(True, rule.name, f"allowed by rule '{rule.name}'")
        return Decision(
            False, None, f"no rule allows {caller} to call {dest} {method} (default deny)"
        )


_DISABLED = Decision(True, None, "authorization is disabled: every call is allowed")


class _AuthorizationSpecLike(Protocol):
    @property
    def enabled(self) -> bool: ...

    @property
    def rules(self) -> Sequence[Mapping[str, object] | Rule]: ...


# --- from the YAML ---------------------------------------------------------------------------

_KEYS = ("name", "action", "sources", "destinations", "methods")
_FROM_KEYS = ("principals", "namespaces")
_TO_KEYS = ("services", "methods")


def _strings(value: object, at: str, problems: list[str]) -> tuple[str, ...] | None:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        problems.append(f"{at}: must be a list of strings")
        return None
    return tuple(value)


def _unknown(item: Mapping[str, object], allowed: Sequence[str], at: str) -> list[str]:
    return [
        f"{at}.{k}: unknown field; allowed: {', '.join(allowed)}" for k in item if k not in allowed
    ]


def parse_rules(
    items: Iterable[Mapping[str, object]],
    *,
    trust_domain: str | None = None,
    at: str = "spec.security.authorization.rules",
    source: str = "config",
) -> tuple[Rule, ...]:
    """Rules from their YAML mappings; raises ConfigError listing every problem by path."""
    if trust_domain is not None:
        validate_trust_domain(trust_domain)
    problems: list[str] = []
    rules: list[Rule] = []
    names: set[str] = set()
    for i, item in enumerate(items):
        where = f"{at}[{i}]"
        before = len(problems)
        rule = _parse_rule(item, where, i, trust_domain, problems)
        if rule is None or len(problems) > before:
            continue
        problems += [f"{where}.{p}" for p in check_rule(rule)]
        if rule.name in names:
            problems.append(f"{where}.name: duplicate rule name {rule.name!r}")
        names.add(rule.name)
        rules.append(rule)
    if problems:
        raise ConfigError(problems, source=source)
    return tuple(rules)


def _parse_rule(
    item: Mapping[str, object],
    where: str,
    index: int,
    trust_domain: str | None,
    problems: list[str],
) -> Rule | None:
    if not isinstance(item, Mapping):
        problems.append(f"{where}: must be a mapping")
        return None
    problems += _unknown(item, (*_KEYS, "from", "to"), where)
    name = item.get("name", f"rule-{index}")
    if not isinstance(name, str):
        problems.append(f"{where}.name: must be a string")
        return None
    action = item.get("action", "ALLOW")
    if action not in ACTIONS:
        problems.append(f"{where}.action: must be ALLOW or DENY, got {action!r}")
        return None
    sources: tuple[str, ...] | None = None
    destinations: tuple[str, ...] | None = ("*",)
    methods: tuple[str, ...] | None = ("*",)
    if "sources" in item:
        sources = _strings(item["sources"], f"{where}.sources", problems)
    if "destinations" in item:
        destinations = _strings(item["destinations"], f"{where}.destinations", problems)
    if "methods" in item:
        methods = _strings(item["methods"], f"{where}.methods", problems)
    for old, new in (("from", "sources"), ("to", "destinations"), ("to", "methods")):
        if old in item and new in item:
            problems.append(f"{where}.{old}: use either {old} or {new}, not both")
    if "from" in item:
        sources = _from(item["from"], f"{where}.from", trust_domain, problems)
    if "to" in item:
        to = item["to"]
        if not isinstance(to, Mapping):
            problems.append(f"{where}.to: must be a mapping with services and/or methods")
        else:
            problems += _unknown(to, _TO_KEYS, f"{where}.to")
            if "services" in to:
                destinations = _strings(to["services"], f"{where}.to.services", problems)
            if "methods" in to:
                methods = _strings(to["methods"], f"{where}.to.methods", problems)
    if destinations is None or methods is None:
        return None
    return Rule(name, action, sources, destinations, methods)


def _from(
    node: object, at: str, trust_domain: str | None, problems: list[str]
) -> tuple[str, ...] | None:
    if not isinstance(node, Mapping):
        problems.append(f"{at}: must be a mapping with principals and/or namespaces")
        return None
    problems += _unknown(node, _FROM_KEYS, at)
    found: list[str] = []
    if "principals" in node:
        found += _strings(node["principals"], f"{at}.principals", problems) or ()
    if "namespaces" in node:
        td = trust_domain or "*"
        for ns in _strings(node["namespaces"], f"{at}.namespaces", problems) or ():
            found.append(f"spiffe://{td}/ns/{ns}/**")
    if not found:
        problems.append(f"{at}: names no principal or namespace")
        return None
    return tuple(found)
