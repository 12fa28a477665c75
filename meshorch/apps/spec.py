"""Application specs: parse and validate, canonical JSON, digest.

An application is a versioned set of services; a service runs one or more containers as
``replicas`` instances or one instance ``per_host``. ``docs/app-spec.md`` documents every
field with a full example.

- ``parse_app_spec(text)`` reads YAML or JSON (a document whose first character is ``{``
  is JSON) and raises ``SpecError`` listing *every* problem, each prefixed by its path
  (``services[0].containers[1].resources.memory_limit: must be a size like 256Mi``).
- ``to_json(spec)`` is the canonical form stored in the replicated state: every default
  written out, CPU as ``"500m"``, memory in bytes, durations as floats. It is itself a
  valid spec, and ``from_json(to_json(spec)) == spec``.
- ``spec_digest(spec)`` is the sha256 of the canonical JSON with sorted keys, so it does
  not change with formatting, key order or defaults written or left out.
- A secret reference without ``tenant`` means the app's own tenant: ``parse_app_spec`` and
  ``from_json`` take the tenant the app is put for (``default`` when not given), and the
  canonical JSON writes it out. ``require_own_secrets(spec, tenant)`` raises
  ``ForeignSecret`` (code ``foreign_secret``) naming every reference to another tenant's
  secret: an app may use only its own tenant's secrets.

Pure: no I/O, no clock.

Its size: the application spec is one schema with many fields, each validated with a
message that names it; the dataclasses and their checks read best side by side.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, TypeVar

import orjson

from meshorch.errors import RemoteInputError
from meshorch.secrets.keyring import (
    DEFAULT_TENANT,
    FILE_RULE,
    SECRET_NAME_RULE,
    TENANT_RULE,
    SecretRef,
    is_secret_file,
    is_secret_name,
    is_tenant,
)

API_VERSION = "meshorch/v1"
# The canonical JSON must fit in one replicated value (512 KiB) with room to spare.
MAX_SPEC_BYTES = 256 * 1024
# YAML aliases can expand a small text into a huge tree ("billion laughs").
MAX_YAML_NODES = 50_000
MAX_REPLICAS = 1000
MAX_CPU_MILLIS = 1024 * 1000
# Sizes stay exact in every JSON reader (JavaScript included).
MAX_MEMORY_BYTES = 2**53

Protocol = Literal["tcp", "udp"]
RestartKind = Literal["always", "on-failure", "never"]
ConstraintOp = Literal["in", "not_in", "exists", "equals"]
ProbeKind = Literal["startup", "liveness", "readiness"]

_PROTOCOLS: dict[object, Protocol] = {"tcp": "tcp", "udp": "udp"}
_RESTART: dict[object, RestartKind] = {
    "always": "always",
    "on-failure": "on-failure",
    "never": "never",
}
_OPS: dict[object, ConstraintOp] = {
    "in": "in",
    "not_in": "not_in",
    "exists": "exists",
    "equals": "equals",
}
_PROBE_KINDS: tuple[ProbeKind, ...] = ("startup", "liveness", "readiness")

_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,251}[A-Za-z0-9])?")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_RE = re.compile(
    r"(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?"  # registry host, optional
    rf"{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"  # tag
    r"(?:@sha256:[0-9a-f]{64})?"  # digest
)
_CPU_RE = re.compile(r"(?:(\d+)m|(\d+(?:\.\d+)?))")
_MEMORY_RE = re.compile(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?")
_MEMORY_UNITS = {
    None: 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


class SpecError(RemoteInputError):
    """An application spec that cannot be accepted; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__("bad_spec", f"the application spec has {count}:\n{lines}")


class ForeignSecret(SpecError):
    """The spec references secrets of a tenant other than the app's; ``problems`` names
    each field (``services[0].containers[0].secrets[1].tenant: ...``)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems)
        self.code = "foreign_secret"


# --- the spec ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpCheck:
    """Ready when ``GET path`` on ``port`` answers 2xx or 3xx."""

    port: int
    path: str = "/"


@dataclass(frozen=True, slots=True)
class TcpCheck:
    """Ready when a TCP connection to ``port`` opens."""

    port: int


@dataclass(frozen=True, slots=True)
class ExecCheck:
    """Ready when ``command`` run in the container exits 0."""

    command: tuple[str, ...]


Check = HttpCheck | TcpCheck | ExecCheck


@dataclass(frozen=True, slots=True)
class Probe:
    check: Check
    period_s: float = 10.0
    timeout_s: float = 1.0
    failure_threshold: int = 3
    initial_delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Probes:
    startup: Probe | None = None
    liveness: Probe | None = None
    readiness: Probe | None = None


@dataclass(frozen=True, slots=True)
class PortSpec:
    container_port: int
    protocol: Protocol = "tcp"


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """A file written into the container before it starts."""

    path: str
    content: str


@dataclass(frozen=True, slots=True)
class Resources:
    """CPU in millicores, memory in bytes. No CPU limit means no CPU cap."""

    cpu_request_millis: int
    cpu_limit_millis: int | None
    memory_request_bytes: int
    memory_limit_bytes: int


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    name: str
    image: str
    resources: Resources
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # sorted by name
    ports: tuple[PortSpec, ...] = ()
    files: tuple[ConfigFile, ...] = ()
    probes: Probes = Probes()
    secrets: tuple[SecretRef, ...] = ()
    # The app's tenant's secret holding the registry credentials of ``image``: the site
    # pulls the image itself when its catalogue lacks it (docs/app-spec.md).
    pull_secret: str | None = None

    @property
    def image_is_pinned(self) -> bool:
        """True when the image is named by digest, so every host runs the same bytes."""
        return "@sha256:" in self.image


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    policy: RestartKind = "always"
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0


@dataclass(frozen=True, slots=True)
class Constraint:
    """A rule on one host label. ``not_in`` also matches hosts without the label."""

    label: str
    op: ConstraintOp
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.label)
        if self.op == "exists":
            return value is not None
        if self.op == "not_in":
            return value not in self.values
        return value is not None and value in self.values  # "in", and "equals" (one value)


@dataclass(frozen=True, slots=True)
class Ingress:
    """The site's ingress address forwards TCP ``port`` to ``target_port`` of the
    service's ready instances."""

    port: int
    target_port: int


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str
    containers: tuple[ContainerSpec, ...]
    replicas: int | None = 1  # None: one instance per eligible host
    restart: RestartPolicy = RestartPolicy()
    constraints: tuple[Constraint, ...] = ()
    anti_affinity: bool = False
    ingress: Ingress | None = None
    priority: int = 0  # a host short of memory or disk evicts lower priorities first

    @property
    def ports(self) -> tuple[int, ...]:
        """The TCP ports its containers listen on."""
        return tuple(
            p.container_port for c in self.containers for p in c.ports if p.protocol == "tcp"
        )

    @property
    def per_host(self) -> bool:
        return self.replicas is None

    @property
    def cpu_request_millis(self) -> int:
        return sum(c.resources.cpu_request_millis for c in self.containers)

    @property
    def memory_request_bytes(self) -> int:
        return sum(c.resources.memory_request_bytes for c in self.containers)

    def allows_host(self, labels: Mapping[str, str]) -> bool:
        return all(c.matches(labels) for c in self.constraints)


@dataclass(frozen=True, slots=True)
class AppSpec:
    name: str
    version: str
    services: tuple[ServiceSpec, ...]

    def service(self, name: str) -> ServiceSpec | None:
        return next((s for s in self.services if s.name == name), None)


# --- entry points -----------------------------------------------------------------------


def parse_app_spec(text: str | bytes, *, tenant: str = DEFAULT_TENANT) -> AppSpec:
    """Parse a YAML or JSON spec; raise ``SpecError`` listing every problem.

    ``tenant``: the tenant the app is put for; a secret reference without ``tenant`` is
    that tenant's."""
    raw = text.encode("utf-8", errors="surrogatepass") if isinstance(text, str) else text
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError([f"(document): {len(raw)} bytes, the limit is {MAX_SPEC_BYTES}"])
    try:
        decoded = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError([f"(document): not UTF-8 ({exc.reason} at byte {exc.start})"]) from exc
    ctx = _Ctx(tenant)
    data = (
        _load_json(ctx, decoded) if decoded.lstrip().startswith("{") else _load_yaml(ctx, decoded)
    )
    if ctx.problems:  # unreadable, or duplicate keys: listed with the field problems
        load_problems, ctx.problems = ctx.problems, []
        if data is not None:
            _app(ctx, data)
        raise SpecError(load_problems + ctx.problems)
    return _validated(ctx, data)


def from_json(data: Mapping[str, object], *, tenant: str = DEFAULT_TENANT) -> AppSpec:
    """Rebuild a spec from its canonical JSON (validated again: state may be old).
    ``tenant`` as for ``parse_app_spec`` (the canonical form names every secret's tenant)."""
    return _validated(_Ctx(tenant), data)


def foreign_secrets(spec: AppSpec, tenant: str) -> list[str]:
    """A problem for each secret reference of ``spec`` to a tenant other than ``tenant``,
    with its field path. Looks up nothing: whether that secret exists plays no part."""
    return [
        f"services[{i}].containers[{j}].secrets[{k}].tenant: {ref.tenant!r} is not the "
        f"app's tenant {tenant!r}; an app may use only its own tenant's secrets"
        for i, service in enumerate(spec.services)
        for j, container in enumerate(service.containers)
        for k, ref in enumerate(container.secrets)
        if ref.tenant != tenant
    ]


def require_own_secrets(spec: AppSpec, tenant: str) -> None:
    """Raise ``ForeignSecret`` unless every secret ``spec`` references is ``tenant``'s."""
    problems = foreign_secrets(spec, tenant)
    if problems:
        raise ForeignSecret(problems)


def to_json(spec: AppSpec) -> dict[str, object]:
    """The canonical form: every default explicit, accepted back by ``from_json``."""
    return {
        "api_version": API_VERSION,
        "name": spec.name,
        "version": spec.version,
        "services": [_service_json(s) for s in spec.services],
    }


def spec_digest(spec: AppSpec) -> str:
    """``sha256:<hex>`` of the canonical JSON with sorted keys."""
    canonical = orjson.dumps(to_json(spec), option=orjson.OPT_SORT_KEYS)
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def format_cpu(millis: int) -> str:
    return f"{millis}m"


def format_memory(size: int) -> str:
    """Bytes in the largest binary unit that divides them exactly (``256Mi``)."""
    for unit, factor in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _validated(ctx: _Ctx, data: object) -> AppSpec:
    spec = _app(ctx, data)
    if ctx.problems or spec is None:
        raise SpecError(ctx.problems or ["(document): invalid"])
    return spec


# --- loading ----------------------------------------------------------------------------


def _load_yaml(ctx: _Ctx, text: str) -> object:
    # PyYAML is imported at the first YAML spec: an agent fed JSON specs never loads it.
    from meshorch.apps.spec_yaml import UnreadableYaml, load_yaml

    try:
        data, duplicates = load_yaml(text, MAX_YAML_NODES)
    except UnreadableYaml as exc:
        ctx.bad("", str(exc))
        return None
    ctx.problems.extend(duplicates)
    return data


def _load_json(ctx: _Ctx, text: str) -> object:
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        result: dict[str, object] = {}
        for key, value in items:
            if key in result:
                duplicates.append(f"duplicate key {key!r}")
            result[key] = value
        return result

    def constant(name: str) -> object:
        raise ValueError(f"{name} is not a JSON number")

    try:
        data = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except ValueError as exc:
        ctx.bad("", f"not valid JSON: {exc}")
        return None
    except RecursionError:
        ctx.bad("", "nested too deeply")
        return None
    ctx.problems.extend(duplicates)
    return data


# --- validation -------------------------------------------------------------------------
#
# Each checker records its problems in the context and returns None for a bad value; a
# composite is built only when all its parts are good, so one pass finds every problem.
# A required field that is missing is reported once, by ``_Ctx.fields``; checkers given
# None stay silent. Defaults are fed through the checkers like written values.

T = TypeVar("T")
_Checker = Callable[["_Ctx", object, str], T | None]


class _Ctx:
    def __init__(self, tenant: str = DEFAULT_TENANT) -> None:
        self.problems: list[str] = []
        self.tenant = tenant  # the app's: a secret reference without a tenant is its

    def bad(self, path: str, message: str) -> None:
        self.problems.append(f"{path or '(document)'}: {message}")

    def fields(
        self, value: object, path: str, required: Sequence[str], optional: Sequence[str]
    ) -> dict[str, object] | None:
        """The known fields of a mapping, nulls dropped; unknown and missing ones reported."""
        if value is None:
            return None
        if not isinstance(value, Mapping):
            self.bad(path, f"must be a mapping, not {_kind(value)}")
            return None
        known = (*required, *optional)
        result: dict[str, object] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.bad(path, f"key {key!r} must be a string")
            elif key not in known:
                self.bad(_join(path, key), "unknown field" + _did_you_mean(key, known))
            elif item is not None:
                result[key] = item
        for key in required:
            if key not in result:
                self.bad(_join(path, key), "required")
        return result


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _did_you_mean(key: str, known: Sequence[str]) -> str:
    import difflib  # a misspelt key only: not loaded by an agent whose specs are right

    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__


def _str(ctx: _Ctx, value: object, path: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        hint = " (quote it)" if isinstance(value, bool | int | float) else ""
        ctx.bad(path, f"must be a string, not {_kind(value)}{hint}")
        return None
    return value


def _matching(
    ctx: _Ctx, value: object, path: str, pattern: re.Pattern[str], what: str
) -> str | None:
    text = _str(ctx, value, path)
    if text is not None and not pattern.fullmatch(text):
        ctx.bad(path, f"{text!r} is not {what}")
        return None
    return text


def _name(ctx: _Ctx, value: object, path: str) -> str | None:
    return _matching(
        ctx, value, path, _NAME_RE, "a name: 1-63 of a-z, 0-9, '-', no '-' at either end"
    )


def _bool(ctx: _Ctx, value: object, path: str) -> bool | None:
    if value is None:
        return None
    if not isinstance(value, bool):
        ctx.bad(path, f"must be true or false, not {_kind(value)}")
        return None
    return value


def _int(ctx: _Ctx, value: object, path: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        ctx.bad(path, f"must be a whole number, not {_kind(value)}")
        return None
    if not low <= value <= high:
        ctx.bad(path, f"must be between {low} and {high}, not {value}")
        return None
    return value


def _port(ctx: _Ctx, value: object, path: str) -> int | None:
    return _int(ctx, value, path, 1, 65535)


def _seconds(ctx: _Ctx, value: object, path: str, *, positive: bool) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        ctx.bad(path, f"must be a number of seconds, not {_kind(value)}")
        return None
    seconds = float(value)
    if not (seconds > 0 if positive else seconds >= 0) or seconds > 86400 * 365:
        ctx.bad(path, f"must be {'more than' if positive else 'at least'} 0 and at most a year")
        return None
    return seconds


def _string_list(ctx: _Ctx, value: object, path: str, *, non_empty: bool) -> tuple[str, ...] | None:
    items = _list(ctx, value, path, _str)
    if items is not None and non_empty and not items:
        ctx.bad(path, "must not be empty")
        return None
    return items


def _list(
    ctx: _Ctx,
    value: object,
    path: str,
    checker: _Checker[T],
    unique: Callable[[T], str] | None = None,
) -> tuple[T, ...] | None:
    """Check every item; ``unique`` names a key that no two good items may share."""
    if value is None:
        return None
    if not isinstance(value, list | tuple):
        ctx.bad(path, f"must be a list, not {_kind(value)}")
        return None
    items = [checker(ctx, item, f"{path}[{i}]") for i, item in enumerate(value)]
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        key = unique(item) if unique is not None and item is not None else None
        if key is not None and key in first:
            ctx.bad(f"{path}[{i}]", f"{key} is already declared by {path}[{first[key]}]")
            items[i] = None
        elif key is not None:
            first[key] = i
    good = tuple(item for item in items if item is not None)
    return good if len(good) == len(items) else None


def _unique_names(ctx: _Ctx, value: object, path: str) -> None:
    """Report repeated ``name`` fields, read from the raw items so broken items count too."""
    if not isinstance(value, list | tuple):
        return
    first: dict[str, int] = {}
    for i, item in enumerate(value):
        name = item.get("name") if isinstance(item, Mapping) else None
        if isinstance(name, str) and name in first:
            ctx.bad(f"{path}[{i}].name", f"{name!r} is already used by {path}[{first[name]}]")
        elif isinstance(name, str):
            first[name] = i


def _cpu(ctx: _Ctx, value: object, path: str, *, allow_zero: bool) -> int | None:
    if value is None:
        return None
    cores: Decimal | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        cores = Decimal(str(value))
    elif isinstance(value, str) and (match := _CPU_RE.fullmatch(value)):
        cores = Decimal(match[1]) / 1000 if match[1] else Decimal(match[2])
    millis = cores * 1000 if cores is not None and cores.is_finite() else None
    if millis is None or millis != millis.to_integral_value():
        ctx.bad(path, 'must be CPU cores like 0.5, or millicores like "500m"')
        return None
    if not (0 if allow_zero else 1) <= millis <= MAX_CPU_MILLIS:
        ctx.bad(path, f"must be {'0' if allow_zero else '1m'} to {MAX_CPU_MILLIS // 1000} cores")
        return None
    return int(millis)


def _memory(ctx: _Ctx, value: object, path: str, *, allow_zero: bool) -> int | None:
    if value is None:
        return None
    size: Decimal | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = Decimal(value)
    elif isinstance(value, str) and (match := _MEMORY_RE.fullmatch(value)):
        size = Decimal(match[1]) * _MEMORY_UNITS[match[2]]
    if size is None or size != size.to_integral_value():
        ctx.bad(path, "must be a size like 256Mi, 1Gi, 500M or a number of bytes")
        return None
    if not (0 if allow_zero else 1) <= size <= MAX_MEMORY_BYTES:
        ctx.bad(path, f"must be {'0' if allow_zero else '1 byte'} to {MAX_MEMORY_BYTES} bytes")
        return None
    return int(size)


# --- the sections, outside in -----------------------------------------------------------


def _app(ctx: _Ctx, value: object) -> AppSpec | None:
    m = ctx.fields(value, "", ("api_version", "name", "version", "services"), ())
    if m is None:
        if value is None:
            ctx.bad("", "the document is empty")
        return None
    api = m.get("api_version")
    if api is not None and api != API_VERSION:
        ctx.bad("api_version", f"must be {API_VERSION!r}, not {api!r}")
    name = _name(ctx, m.get("name"), "name")
    what = "a version: 1-128 of A-Z, a-z, 0-9, '.', '_', '+', '-'"
    version = _matching(ctx, m.get("version"), "version", _VERSION_RE, what)
    services = _list(ctx, m.get("services"), "services", _service)
    _unique_names(ctx, m.get("services"), "services")
    if services == ():
        ctx.bad("services", "must list at least one service")
    ingress_ports = [s.ingress.port for s in services or () if s.ingress is not None]
    if len(ingress_ports) != len(set(ingress_ports)):
        ctx.bad("services", "two services ask for the same ingress port")
        return None
    if name is None or version is None or not services or api != API_VERSION:
        return None
    return AppSpec(name, version, services)


def _service(ctx: _Ctx, value: object, path: str) -> ServiceSpec | None:
    optional = (
        "replicas",
        "per_host",
        "restart",
        "constraints",
        "anti_affinity",
        "ingress",
        "priority",
    )
    m = ctx.fields(value, path, ("name", "containers"), optional)
    if m is None:
        return None
    start = len(ctx.problems)
    name = _name(ctx, m.get("name"), f"{path}.name")
    per_host = _bool(ctx, m.get("per_host", False), f"{path}.per_host")
    replicas = None
    if per_host and "replicas" in m:
        ctx.bad(f"{path}.replicas", "cannot be set with per_host: true")
    elif not per_host:
        replicas = _int(ctx, m.get("replicas", 1), f"{path}.replicas", 0, MAX_REPLICAS)
    containers = _list(ctx, m.get("containers"), f"{path}.containers", _container)
    _unique_names(ctx, m.get("containers"), f"{path}.containers")
    if containers == ():
        ctx.bad(f"{path}.containers", "must list at least one container")
    restart = _restart(ctx, m.get("restart", {}), f"{path}.restart")
    constraints = _list(ctx, m.get("constraints", ()), f"{path}.constraints", _constraint)
    anti_affinity = _bool(ctx, m.get("anti_affinity", False), f"{path}.anti_affinity")
    priority = _int(ctx, m.get("priority", 0), f"{path}.priority", -1000, 1000)
    ingress = None
    if m.get("ingress") is not None:
        ingress = _ingress(ctx, m["ingress"], f"{path}.ingress", containers or ())
    if (
        len(ctx.problems) > start
        or name is None
        or not containers
        or restart is None
        or constraints is None
        or anti_affinity is None
        or priority is None
    ):
        return None
    return ServiceSpec(
        name, containers, replicas, restart, constraints, anti_affinity, ingress, priority
    )


def _ingress(
    ctx: _Ctx, value: object, path: str, containers: tuple[ContainerSpec, ...]
) -> Ingress | None:
    m = ctx.fields(value, path, ("port", "target_port"), ())
    if m is None:
        return None
    port = _port(ctx, m.get("port"), f"{path}.port")
    target = _port(ctx, m.get("target_port"), f"{path}.target_port")
    if port is None or target is None:
        return None
    declared = {p.container_port for c in containers for p in c.ports if p.protocol == "tcp"}
    if containers and target not in declared:  # (unparsed containers are reported already)
        ctx.bad(f"{path}.target_port", f"must be a TCP port a container declares, not {target}")
        return None
    return Ingress(port, target)


def _container(ctx: _Ctx, value: object, path: str) -> ContainerSpec | None:
    optional = ("command", "env", "ports", "files", "probes", "secrets", "pull_secret")
    m = ctx.fields(value, path, ("name", "image", "resources"), optional)
    if m is None:
        return None
    start = len(ctx.problems)
    name = _name(ctx, m.get("name"), f"{path}.name")
    what = "an image reference like registry/name:tag or name@sha256:<64 hex digits>"
    image = _matching(ctx, m.get("image"), f"{path}.image", _IMAGE_RE, what)
    command = _string_list(ctx, m.get("command", ()), f"{path}.command", non_empty=False)
    env = _env(ctx, m.get("env", {}), f"{path}.env")
    ports = _list(ctx, m.get("ports", ()), f"{path}.ports", _port_spec, _port_key)
    files = _list(ctx, m.get("files", ()), f"{path}.files", _file, _file_key)
    resources = _resources(ctx, m.get("resources"), f"{path}.resources")
    probes = _probes(ctx, m.get("probes", {}), f"{path}.probes")
    secrets = _list(ctx, m.get("secrets", ()), f"{path}.secrets", _secret_ref, _secret_file_key)
    pull_secret = _str(ctx, m.get("pull_secret"), f"{path}.pull_secret")
    if pull_secret is not None and not is_secret_name(pull_secret):
        what = f"{pull_secret!r} is not a secret name: {SECRET_NAME_RULE}"
        ctx.bad(f"{path}.pull_secret", what)
    if secrets and env is not None:
        _secret_env_clashes(ctx, secrets, env, f"{path}.secrets")
    if (
        len(ctx.problems) > start
        or name is None
        or image is None
        or resources is None
        or command is None
        or env is None
        or ports is None
        or files is None
        or probes is None
        or secrets is None
    ):
        return None
    return ContainerSpec(
        name, image, resources, command, env, ports, files, probes, secrets, pull_secret
    )


def _port_key(port: PortSpec) -> str:
    return f"port {port.container_port}/{port.protocol}"


def _file_key(file: ConfigFile) -> str:
    return f"path {file.path}"


def _env(ctx: _Ctx, value: object, path: str) -> tuple[tuple[str, str], ...] | None:
    if not isinstance(value, Mapping):
        ctx.bad(path, f"must be a mapping of NAME: value, not {_kind(value)}")
        return None
    start = len(ctx.problems)
    pairs: list[tuple[str, str]] = []
    for key, item in value.items():
        if not isinstance(key, str) or not _ENV_RE.fullmatch(key):
            ctx.bad(_join(path, str(key)), "is not a variable name: A-Z, a-z, 0-9, '_'")
            continue
        if item is None:
            ctx.bad(_join(path, key), "must be a string, not null")
        text = _str(ctx, item, _join(path, key))
        if text is not None:
            pairs.append((key, text))
    return tuple(sorted(pairs)) if len(ctx.problems) == start else None


def _secret_ref(ctx: _Ctx, value: object, path: str) -> SecretRef | None:
    m = ctx.fields(value, path, ("name",), ("tenant", "file", "env"))
    if m is None:
        return None
    start = len(ctx.problems)
    name = _str(ctx, m.get("name"), f"{path}.name")
    if name is not None and not is_secret_name(name):
        ctx.bad(f"{path}.name", f"{name!r} is not a secret name: {SECRET_NAME_RULE}")
    tenant = _str(ctx, m.get("tenant", ctx.tenant), f"{path}.tenant")
    if tenant is not None and not is_tenant(tenant):
        ctx.bad(f"{path}.tenant", f"{tenant!r} is not a tenant: {TENANT_RULE}")
    file = _str(ctx, m.get("file", name), f"{path}.file")
    if file is not None and not is_secret_file(file) and ("file" in m or is_secret_name(name)):
        ctx.bad(f"{path}.file", f"{file!r} is not {FILE_RULE}")
    env = _str(ctx, m.get("env"), f"{path}.env")
    if env is not None and not _ENV_RE.fullmatch(env):
        ctx.bad(f"{path}.env", f"{env!r} is not a variable name: A-Z, a-z, 0-9, '_'")
    if len(ctx.problems) > start or name is None or tenant is None or file is None:
        return None
    return SecretRef(name, tenant, file, env)


def _secret_file_key(ref: SecretRef) -> str:
    return f"file {ref.file}"


def _secret_env_clashes(
    ctx: _Ctx, secrets: tuple[SecretRef, ...], env: tuple[tuple[str, str], ...], path: str
) -> None:
    names = {key for key, _ in env}
    seen: dict[str, int] = {}
    for i, ref in enumerate(secrets):
        if ref.env is None:
            continue
        if ref.env in names:
            ctx.bad(f"{path}[{i}].env", f"{ref.env} is also set in env")
        elif ref.env in seen:
            ctx.bad(f"{path}[{i}].env", f"{ref.env} is already set by {path}[{seen[ref.env]}]")
        else:
            seen[ref.env] = i


def _port_spec(ctx: _Ctx, value: object, path: str) -> PortSpec | None:
    m = ctx.fields(value, path, ("container_port",), ("protocol",))
    if m is None:
        return None
    port = _port(ctx, m.get("container_port"), f"{path}.container_port")
    protocol = _choice(ctx, m.get("protocol", "tcp"), f"{path}.protocol", _PROTOCOLS)
    if port is None or protocol is None:
        return None
    return PortSpec(port, protocol)


def _choice(ctx: _Ctx, value: object, path: str, choices: dict[object, T]) -> T | None:
    if value is None:
        return None
    if isinstance(value, str) and value in choices:
        return choices[value]
    ctx.bad(path, f"must be one of {', '.join(map(str, choices))}, not {value!r}")
    return None


def _file(ctx: _Ctx, value: object, path: str) -> ConfigFile | None:
    m = ctx.fields(value, path, ("path", "content"), ())
    if m is None:
        return None
    file_path = _str(ctx, m.get("path"), f"{path}.path")
    content = _str(ctx, m.get("content"), f"{path}.content")
    if file_path is not None and not _is_clean_absolute(file_path):
        ctx.bad(f"{path}.path", f"{file_path!r} must be an absolute path without '..', '.' or '//'")
        return None
    if file_path is None or content is None:
        return None
    return ConfigFile(file_path, content)


def _is_clean_absolute(path: str) -> bool:
    parts = path.split("/")
    return (
        len(path) > 1
        and path.startswith("/")
        and "\x00" not in path
        and all(part not in ("", ".", "..") for part in parts[1:])
    )


def _resources(ctx: _Ctx, value: object, path: str) -> Resources | None:
    optional = ("cpu_request", "cpu_limit", "memory_request")
    m = ctx.fields(value, path, ("memory_limit",), optional)
    if m is None:
        return None
    start = len(ctx.problems)
    cpu_limit = _cpu(ctx, m.get("cpu_limit"), f"{path}.cpu_limit", allow_zero=False)
    memory_limit = _memory(ctx, m.get("memory_limit"), f"{path}.memory_limit", allow_zero=False)
    # Like Kubernetes, a request left out is the limit; no CPU limit: no CPU request.
    cpu_request = (
        _cpu(ctx, m["cpu_request"], f"{path}.cpu_request", allow_zero=True)
        if "cpu_request" in m
        else cpu_limit or 0
    )
    memory_request = (
        _memory(ctx, m["memory_request"], f"{path}.memory_request", allow_zero=True)
        if "memory_request" in m
        else memory_limit
    )
    if cpu_request is not None and cpu_limit is not None and cpu_request > cpu_limit:
        ctx.bad(
            f"{path}.cpu_request",
            f"{format_cpu(cpu_request)} is more than cpu_limit {format_cpu(cpu_limit)}",
        )
    if memory_request is not None and memory_limit is not None and memory_request > memory_limit:
        ctx.bad(
            f"{path}.memory_request",
            f"{format_memory(memory_request)} is more than memory_limit "
            f"{format_memory(memory_limit)}",
        )
    if len(ctx.problems) > start or cpu_request is None or memory_limit is None:
        return None
    if memory_request is None:
        return None
    return Resources(cpu_request, cpu_limit, memory_request, memory_limit)


def _probes(ctx: _Ctx, value: object, path: str) -> Probes | None:
    m = ctx.fields(value, path, (), _PROBE_KINDS)
    if m is None:
        return None
    start = len(ctx.problems)
    found = {kind: _probe(ctx, m[kind], f"{path}.{kind}") for kind in _PROBE_KINDS if kind in m}
    if len(ctx.problems) > start:
        return None
    return Probes(found.get("startup"), found.get("liveness"), found.get("readiness"))


def _probe(ctx: _Ctx, value: object, path: str) -> Probe | None:
    kinds = ("http", "tcp", "exec")
    optional = (*kinds, "period_s", "timeout_s", "failure_threshold", "initial_delay_s")
    m = ctx.fields(value, path, (), optional)
    if m is None:
        return None
    start = len(ctx.problems)
    given = [k for k in kinds if k in m]
    if len(given) != 1:
        found = f", found {' and '.join(given)}" if given else ""
        ctx.bad(path, f"needs exactly one of http, tcp, exec{found}")
    checks = [_check(ctx, kind, m[kind], f"{path}.{kind}") for kind in given]
    check = checks[0] if len(checks) == 1 else None
    period = _seconds(ctx, m.get("period_s", 10.0), f"{path}.period_s", positive=True)
    timeout = _seconds(ctx, m.get("timeout_s", 1.0), f"{path}.timeout_s", positive=True)
    threshold = _int(ctx, m.get("failure_threshold", 3), f"{path}.failure_threshold", 1, 1000)
    delay = _seconds(ctx, m.get("initial_delay_s", 0.0), f"{path}.initial_delay_s", positive=False)
    if period is not None and timeout is not None and timeout > period:
        ctx.bad(f"{path}.timeout_s", f"{timeout:g}s is longer than period_s {period:g}s")
    if (
        len(ctx.problems) > start
        or check is None
        or period is None
        or timeout is None
        or threshold is None
        or delay is None
    ):
        return None
    return Probe(check, period, timeout, threshold, delay)


def _check(ctx: _Ctx, kind: str, value: object, path: str) -> Check | None:
    if kind == "exec":
        m = ctx.fields(value, path, ("command",), ())
        if m is None:
            return None
        command = _string_list(ctx, m.get("command"), f"{path}.command", non_empty=True)
        return ExecCheck(command) if command is not None else None
    if kind == "tcp":
        m = ctx.fields(value, path, ("port",), ())
        if m is None:
            return None
        port = _port(ctx, m.get("port"), f"{path}.port")
        return TcpCheck(port) if port is not None else None
    m = ctx.fields(value, path, ("port",), ("path",))
    if m is None:
        return None
    port = _port(ctx, m.get("port"), f"{path}.port")
    url_path = _str(ctx, m.get("path", "/"), f"{path}.path")
    if url_path is not None and not url_path.startswith("/"):
        ctx.bad(f"{path}.path", f"{url_path!r} must start with '/'")
        return None
    return HttpCheck(port, url_path) if port is not None and url_path is not None else None


def _restart(ctx: _Ctx, value: object, path: str) -> RestartPolicy | None:
    optional = ("policy", "backoff_initial_s", "backoff_max_s")
    m = ctx.fields(value, path, (), optional)
    if m is None:
        return None
    policy = _choice(ctx, m.get("policy", "always"), f"{path}.policy", _RESTART)
    initial = _seconds(
        ctx, m.get("backoff_initial_s", 1.0), f"{path}.backoff_initial_s", positive=True
    )
    most = _seconds(ctx, m.get("backoff_max_s", 300.0), f"{path}.backoff_max_s", positive=True)
    if initial is not None and most is not None and most < initial:
        ctx.bad(f"{path}.backoff_max_s", f"{most:g}s is less than backoff_initial_s {initial:g}s")
        return None
    if policy is None or initial is None or most is None:
        return None
    return RestartPolicy(policy, initial, most)


def _constraint(ctx: _Ctx, value: object, path: str) -> Constraint | None:
    m = ctx.fields(value, path, ("label", "op"), ("values",))
    if m is None:
        return None
    what = "a label name: A-Z, a-z, 0-9, '.', '_', '/', '-'"
    label = _matching(ctx, m.get("label"), f"{path}.label", _LABEL_RE, what)
    op = _choice(ctx, m.get("op"), f"{path}.op", _OPS)
    values = _string_list(ctx, m.get("values", ()), f"{path}.values", non_empty=False)
    if label is None or op is None or values is None:
        return None
    wanted = {"exists": "must be empty for op exists", "equals": "must hold exactly one value"}
    ok = {"exists": not values, "equals": len(values) == 1}.get(op, bool(values))
    if not ok:
        ctx.bad(f"{path}.values", wanted.get(op, f"must hold at least one value for op {op}"))
        return None
    return Constraint(label, op, values)


# --- canonical JSON ---------------------------------------------------------------------


def _service_json(service: ServiceSpec) -> dict[str, object]:
    count: dict[str, object] = (
        {"per_host": True} if service.replicas is None else {"replicas": service.replicas}
    )
    return {
        "name": service.name,
        **count,
        "containers": [_container_json(c) for c in service.containers],
        "restart": {
            "policy": service.restart.policy,
            "backoff_initial_s": service.restart.backoff_initial_s,
            "backoff_max_s": service.restart.backoff_max_s,
        },
        "constraints": [
            {"label": c.label, "op": c.op, "values": list(c.values)} for c in service.constraints
        ],
        "anti_affinity": service.anti_affinity,
        # Left out when absent/default: the digest of older specs stays the same.
        **({} if service.priority == 0 else {"priority": service.priority}),
        **(
            {}
            if service.ingress is None
            else {
                "ingress": {
                    "port": service.ingress.port,
                    "target_port": service.ingress.target_port,
                }
            }
        ),
    }


def _container_json(container: ContainerSpec) -> dict[str, object]:
    r = container.resources
    resources: dict[str, object] = {
        "cpu_request": format_cpu(r.cpu_request_millis),
        "memory_request": r.memory_request_bytes,
        "memory_limit": r.memory_limit_bytes,
    }
    if r.cpu_limit_millis is not None:
        resources["cpu_limit"] = format_cpu(r.cpu_limit_millis)
    probes = {
        kind: _probe_json(probe)
        for kind in _PROBE_KINDS
        if (probe := getattr(container.probes, kind)) is not None
    }
    data: dict[str, object] = {
        "name": container.name,
        "image": container.image,
        "command": list(container.command),
        "env": dict(container.env),
        "ports": [
            {"container_port": p.container_port, "protocol": p.protocol} for p in container.ports
        ],
        "files": [{"path": f.path, "content": f.content} for f in container.files],
        "resources": resources,
        "probes": probes,
    }
    if container.secrets:  # left out when empty: the digest of older specs stays the same
        data["secrets"] = [_secret_json(ref) for ref in container.secrets]
    if container.pull_secret is not None:  # likewise
        data["pull_secret"] = container.pull_secret
    return data


def _secret_json(ref: SecretRef) -> dict[str, object]:
    data: dict[str, object] = {"name": ref.name, "tenant": ref.tenant, "file": ref.file}
    if ref.env is not None:
        data["env"] = ref.env
    return data


def _probe_json(probe: Probe) -> dict[str, object]:
    check = probe.check
    body: dict[str, object]
    if isinstance(check, HttpCheck):
        body = {"http": {"port": check.port, "path": check.path}}
    elif isinstance(check, TcpCheck):
        body = {"tcp": {"port": check.port}}
    else:
        body = {"exec": {"command": list(check.command)}}
    return {
        **body,
        "period_s": probe.period_s,
        "timeout_s": probe.timeout_s,
        "failure_threshold": probe.failure_threshold,
        "initial_delay_s": probe.initial_delay_s,
    }
