import json
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings

from meshorch.apps.spec import (
    MAX_SPEC_BYTES,
    AppSpec,
    Constraint,
    ForeignSecret,
    HttpCheck,
    SpecError,
    TcpCheck,
    foreign_secrets,
    from_json,
    parse_app_spec,
    require_own_secrets,
    spec_digest,
    to_json,
)
from meshorch.errors import RemoteInputError
from tests.apps.strategies import app_specs

MI = 2**20
DOC = Path(__file__).resolve().parents[2] / "docs" / "app-spec.md"

GOOD_YAML = """
api_version: meshorch/v1
name: shop
version: "1.2.0"
services:
  - name: web
    replicas: 2
    anti_affinity: true
    containers:
      - name: nginx
        image: localhost/web@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
        ports: [{container_port: 8080}]
        env: {MODE: "prod"}
        resources: {cpu_request: 250m, cpu_limit: 0.5, memory_limit: 128Mi}
        probes:
          readiness: {http: {port: 8080, path: /healthz}, period_s: 5}
  - name: agent
    per_host: true
    constraints: [{label: zone, op: in, values: [a, b]}]
    containers:
      - name: agent
        image: busybox
        command: [/bin/agent, --verbose]
        files: [{path: /etc/agent.conf, content: "x = 1\\n"}]
        resources: {memory_request: 32Mi, memory_limit: 64Mi}
        probes:
          liveness: {tcp: {port: 9}}
          startup: {exec: {command: [/bin/true]}, failure_threshold: 30}
    restart: {policy: on-failure, backoff_initial_s: 2, backoff_max_s: 60}
"""


def problems_of(text: str | bytes) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_app_spec(text)
    return caught.value.problems


# --- good specs -------------------------------------------------------------------------


def test_good_yaml_is_parsed_with_defaults_filled_in() -> None:
    spec = parse_app_spec(GOOD_YAML)
    assert (spec.name, spec.version) == ("shop", "1.2.0")
    web, agent = spec.services
    assert web.replicas == 2 and web.anti_affinity and not web.per_host
    nginx = web.containers[0]
    assert nginx.image_is_pinned
    assert nginx.resources.cpu_request_millis == 250
    assert nginx.resources.cpu_limit_millis == 500
    assert nginx.resources.memory_request_bytes == 128 * MI  # defaults to the limit
    assert nginx.probes.readiness is not None
    assert nginx.probes.readiness.check == HttpCheck(8080, "/healthz")
    assert nginx.probes.readiness.period_s == 5.0
    assert nginx.probes.readiness.timeout_s == 1.0
    assert web.restart.policy == "always"
    assert agent.per_host and agent.replicas is None
    assert agent.constraints == (Constraint("zone", "in", ("a", "b")),)
    assert agent.containers[0].resources.cpu_request_millis == 0
    assert agent.containers[0].resources.cpu_limit_millis is None
    assert agent.containers[0].probes.liveness is not None
    assert agent.containers[0].probes.liveness.check == TcpCheck(9)
    assert agent.restart.backoff_max_s == 60.0
    assert agent.memory_request_bytes == 32 * MI


def test_json_and_yaml_give_the_same_spec() -> None:
    as_json = json.dumps(yaml.safe_load(GOOD_YAML))
    assert parse_app_spec(as_json) == parse_app_spec(GOOD_YAML)
    assert parse_app_spec(as_json.encode()) == parse_app_spec(GOOD_YAML)


def test_the_documented_example_is_valid() -> None:
    block = re.search(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
    assert block is not None
    spec = parse_app_spec(block[1])
    assert [s.name for s in spec.services] == ["web", "backend"]
    assert spec.version == "2024-05-01"  # a YAML date stays a string


@pytest.mark.parametrize(
    "value, millis",
    [("500m", 500), (0.5, 500), ("0.25", 250), (2, 2000), ("2", 2000), (0.001, 1)],
)
def test_cpu_quantities(value: object, millis: int) -> None:
    text = GOOD_YAML.replace("cpu_limit: 0.5", f"cpu_limit: {json.dumps(value)}")
    text = text.replace("cpu_request: 250m", "cpu_request: 0")
    assert parse_app_spec(text).services[0].containers[0].resources.cpu_limit_millis == millis


@pytest.mark.parametrize(
    "value, size",
    [
        ("256Mi", 256 * MI),
        ("1Gi", 2**30),
        ("1.5Gi", 3 * 2**29),
        ("500M", 500 * 10**6),
        (4096, 4096),
    ],
)
def test_memory_quantities(value: object, size: int) -> None:
    text = GOOD_YAML.replace("memory_limit: 128Mi", f"memory_limit: {json.dumps(value)}")
    assert parse_app_spec(text).services[0].containers[0].resources.memory_limit_bytes == size


# --- every problem, with its path -------------------------------------------------------

BAD_YAML = """
api_version: meshorch/v2
name: Bad_Name
services:
  - name: web
    replicas: 2
    per_host: true
    colour: red
    containers:
      - name: a
        image: "BAD IMAGE"
        env: {PORT: 8080, 1X: a}
        ports: [{container_port: 80}, {container_port: 80, protocol: tcp}, {container_port: 0}]
        files: [{path: etc/x, content: a}]
        resources: {memory_limit: 12 apples, cpu_request: 2, cpu_limit: 1}
        probes:
          readiness: {http: {port: 0}, tcp: {port: 1}, timeout_s: 20}
          liveness: {period_s: 5}
          warmup: {tcp: {port: 1}}
      - name: a
        image: x
        resources: {memry_limit: 1Gi, cpu_limit: "500Mi"}
    restart: {policy: sometimes, backoff_initial_s: 10, backoff_max_s: 5}
    constraints: [{label: zone, op: exists, values: [a]}, {label: z, op: in}, {label: z, op: near}]
  - name: web
    replicas: -1
    anti_affinity: "yes"
    containers: []
"""

EXPECTED_PROBLEMS = [
    "version: required",
    "api_version: must be 'meshorch/v1', not 'meshorch/v2'",
    "name: 'Bad_Name' is not a name: 1-63 of a-z, 0-9, '-', no '-' at either end",
    "services[0].colour: unknown field",
    "services[0].replicas: cannot be set with per_host: true",
    "services[0].containers[0].image: 'BAD IMAGE' is not an image reference like "
    "registry/name:tag or name@sha256:<64 hex digits>",
    "services[0].containers[0].env.PORT: must be a string, not a number (quote it)",
    "services[0].containers[0].env.1X: is not a variable name: A-Z, a-z, 0-9, '_'",
    "services[0].containers[0].ports[2].container_port: must be between 1 and 65535, not 0",
    "services[0].containers[0].files[0].path: 'etc/x' must be an absolute path without "
    "'..', '.' or '//'",
    "services[0].containers[0].resources.memory_limit: must be a size like 256Mi, 1Gi, "
    "500M or a number of bytes",
    "services[0].containers[0].resources.cpu_request: 2000m is more than cpu_limit 1000m",
    "services[0].containers[0].probes.warmup: unknown field (did you mean 'startup'?)",
    "services[0].containers[0].ports[1]: port 80/tcp is already declared by "
    "services[0].containers[0].ports[0]",
    "services[0].containers[0].probes.readiness: needs exactly one of http, tcp, exec, "
    "found http and tcp",
    "services[0].containers[0].probes.readiness.http.port: must be between 1 and 65535, not 0",
    "services[0].containers[0].probes.readiness.timeout_s: 20s is longer than period_s 10s",
    "services[0].containers[0].probes.liveness: needs exactly one of http, tcp, exec",
    "services[0].containers[1].resources.memry_limit: unknown field (did you mean 'memory_limit'?)",
    "services[0].containers[1].resources.memory_limit: required",
    "services[0].containers[1].resources.cpu_limit: must be CPU cores like 0.5, "
    'or millicores like "500m"',
    "services[0].containers[1].name: 'a' is already used by services[0].containers[0]",
    "services[0].restart.policy: must be one of always, on-failure, never, not 'sometimes'",
    "services[0].restart.backoff_max_s: 5s is less than backoff_initial_s 10s",
    "services[0].constraints[0].values: must be empty for op exists",
    "services[0].constraints[1].values: must hold at least one value for op in",
    "services[0].constraints[2].op: must be one of in, not_in, exists, equals, not 'near'",
    "services[1].replicas: must be between 0 and 1000, not -1",
    "services[1].containers: must list at least one container",
    "services[1].anti_affinity: must be true or false, not a string",
    "services[1].name: 'web' is already used by services[0]",
]


def test_every_problem_is_listed_at_once_with_its_path() -> None:
    problems = problems_of(BAD_YAML)
    assert sorted(problems) == sorted(EXPECTED_PROBLEMS)


def test_spec_error_is_a_remote_input_error_listing_the_problems() -> None:
    with pytest.raises(RemoteInputError) as caught:
        parse_app_spec(BAD_YAML)
    assert caught.value.code == "bad_spec"
    message = str(caught.value)
    assert message.startswith(f"the application spec has {len(EXPECTED_PROBLEMS)} problems:")
    assert all(p in message for p in EXPECTED_PROBLEMS)


def test_memory_limit_is_required_and_requests_are_at_most_limits() -> None:
    text = GOOD_YAML.replace("memory_request: 32Mi, memory_limit: 64Mi", "memory_request: 32Mi")
    assert problems_of(text) == ["services[1].containers[0].resources.memory_limit: required"]
    text = GOOD_YAML.replace("memory_request: 32Mi", "memory_request: 1Gi")
    assert problems_of(text) == [
        "services[1].containers[0].resources.memory_request: 1Gi is more than memory_limit 64Mi"
    ]


@pytest.mark.parametrize("value", ['"0.0005"', '"500Mi"', '"-1"', "0", "true", '"1e3"'])
def test_bad_cpu_limits(value: str) -> None:
    text = GOOD_YAML.replace("cpu_limit: 0.5", f"cpu_limit: {value}").replace(
        "cpu_request: 250m", "cpu_request: 0"
    )
    [problem] = problems_of(text)
    assert problem.startswith("services[0].containers[0].resources.cpu_limit: must be")


@pytest.mark.parametrize("value", ['"12 apples"', '"0.5"', "0", '"1Gb"', "1.5", '"-5Mi"'])
def test_bad_memory_limits(value: str) -> None:
    text = GOOD_YAML.replace("memory_limit: 128Mi", f"memory_limit: {value}")
    text = text.replace("cpu_limit: 0.5", "cpu_limit: 0.5, memory_request: 0")
    [problem] = problems_of(text)
    assert problem.startswith("services[0].containers[0].resources.memory_limit: must be")


def test_a_missing_or_empty_document() -> None:
    assert problems_of("") == ["(document): the document is empty"]
    assert problems_of("[1, 2]") == ["(document): must be a mapping, not a list"]
    assert sorted(problems_of("{}")) == [
        "api_version: required",
        "name: required",
        "services: required",
        "version: required",
    ]


def test_unreadable_documents() -> None:
    [problem] = problems_of("name: [")
    assert problem.startswith("(document): not valid YAML: line 1, column 8:")
    [problem] = problems_of('{"name": }')
    assert problem.startswith("(document): not valid JSON:")
    assert problems_of('{"a": NaN}') == ["(document): not valid JSON: NaN is not a JSON number"]
    assert problems_of(b"\xff\xfe") == ["(document): not UTF-8 (invalid start byte at byte 0)"]
    [problem] = problems_of("a: 1\n---\nb: 2\n")
    assert "expected a single document" in problem
    [problem] = problems_of("a: !!python/object:os.system {}\n")
    assert "could not determine a constructor" in problem


def test_duplicate_keys_are_problems_in_yaml_and_json() -> None:
    text = GOOD_YAML.replace("    replicas: 2\n", "    replicas: 2\n    replicas: 3\n")
    assert problems_of(text) == ["line 8: duplicate key 'replicas'"]
    data = json.dumps(yaml.safe_load(GOOD_YAML))
    text = data.replace('"name": "shop"', '"name": "shop", "name": "shop"')
    assert problems_of(text) == ["duplicate key 'name'"]


def test_yaml_bombs_and_recursion_are_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    [problem] = problems_of("\n".join(lines))
    assert "YAML nodes, the limit is 50000" in problem
    assert problems_of("a: &x [1, *x]") == ["(document): not valid YAML: recursive alias"]


def test_oversized_specs_are_refused() -> None:
    [problem] = problems_of("#" * (MAX_SPEC_BYTES + 1))
    assert problem == f"(document): {MAX_SPEC_BYTES + 1} bytes, the limit is {MAX_SPEC_BYTES}"


def test_null_is_a_field_left_out() -> None:
    text = GOOD_YAML.replace("    anti_affinity: true\n", "    anti_affinity:\n")
    assert not parse_app_spec(text).services[0].anti_affinity


# --- canonical JSON and digest ----------------------------------------------------------


def test_canonical_json_round_trips_exactly() -> None:
    spec = parse_app_spec(GOOD_YAML)
    canonical = to_json(spec)
    assert from_json(canonical) == spec
    assert to_json(from_json(canonical)) == canonical
    # The canonical form is itself a valid spec, readable back from its JSON text.
    assert parse_app_spec(json.dumps(canonical)) == spec
    resources = canonical["services"][0]["containers"][0]["resources"]  # type: ignore[index]
    assert resources == {
        "cpu_request": "250m",
        "cpu_limit": "500m",
        "memory_request": 128 * MI,
        "memory_limit": 128 * MI,
    }


def test_from_json_validates_again() -> None:
    canonical = to_json(parse_app_spec(GOOD_YAML))
    with pytest.raises(SpecError) as caught:
        from_json({**canonical, "name": "NOPE"})
    assert caught.value.problems == [
        "name: 'NOPE' is not a name: 1-63 of a-z, 0-9, '-', no '-' at either end"
    ]


def test_digest_is_stable_across_formats_key_order_and_defaults() -> None:
    spec = parse_app_spec(GOOD_YAML)
    digest = spec_digest(spec)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    reordered = dict(reversed(list(yaml.safe_load(GOOD_YAML).items())))
    assert spec_digest(parse_app_spec(json.dumps(reordered, indent=4))) == digest
    with_defaults = GOOD_YAML.replace("period_s: 5}", "period_s: 5.0, timeout_s: 1}")
    with_defaults = with_defaults.replace("cpu_request: 250m", "cpu_request: 0.25")
    assert spec_digest(parse_app_spec(with_defaults)) == digest
    assert spec_digest(from_json(to_json(spec))) == digest
    bumped = GOOD_YAML.replace('version: "1.2.0"', 'version: "1.2.1"')
    assert spec_digest(parse_app_spec(bumped)) != digest


def test_digest_is_pinned() -> None:
    # Changing the canonical form changes every stored digest: it must be deliberate.
    spec = parse_app_spec(GOOD_YAML)
    expected = (
        "sha256:"
        + __import__("hashlib")
        .sha256(
            json.dumps(
                to_json(spec), sort_keys=True, separators=(",", ":"), ensure_ascii=False
            ).encode()
        )
        .hexdigest()
    )
    assert spec_digest(spec) == expected


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(app_specs())
def test_any_spec_round_trips_through_canonical_json(spec: AppSpec) -> None:
    canonical = to_json(spec)
    assert from_json(canonical) == spec
    assert parse_app_spec(json.dumps(canonical)) == spec
    assert parse_app_spec(yaml.safe_dump(canonical)) == spec
    assert spec_digest(from_json(canonical)) == spec_digest(spec)


# --- constraint semantics ---------------------------------------------------------------


@pytest.mark.parametrize(
    "constraint, labels, ok",
    [
        (Constraint("zone", "in", ("a", "b")), {"zone": "b"}, True),
        (Constraint("zone", "in", ("a", "b")), {"zone": "c"}, False),
        (Constraint("zone", "in", ("a",)), {}, False),
        (Constraint("zone", "not_in", ("a",)), {}, True),
        (Constraint("zone", "not_in", ("a",)), {"zone": "a"}, False),
        (Constraint("gpu", "exists"), {"gpu": ""}, True),
        (Constraint("gpu", "exists"), {}, False),
        (Constraint("disk", "equals", ("ssd",)), {"disk": "ssd"}, True),
        (Constraint("disk", "equals", ("ssd",)), {"disk": "hdd"}, False),
    ],
)
def test_constraints_match_labels(constraint: Constraint, labels: dict[str, str], ok: bool) -> None:
    assert constraint.matches(labels) is ok


def test_service_priority_is_read_validated_and_left_out_of_the_digest_when_default() -> None:
    base = parse_app_spec(GOOD_YAML)
    text = GOOD_YAML.replace("  - name: web\n", "  - name: web\n    priority: 7\n", 1)
    spec = parse_app_spec(text)
    assert spec.services[0].priority == 7 and base.services[0].priority == 0
    assert from_json(to_json(spec)) == spec
    assert "priority" not in to_json(base)["services"][0]  # type: ignore[index]
    with pytest.raises(SpecError, match="priority"):
        parse_app_spec(
            GOOD_YAML.replace("  - name: web\n", "  - name: web\n    priority: 5000\n", 1)
        )


def _with_secrets(refs: list[dict[str, str]]) -> dict[str, object]:
    return {
        "api_version": "meshorch/v1",
        "name": "grab",
        "version": "1",
        "services": [
            {"name": "web", "replicas": 1, "containers": [
                {"name": "main", "image": "busybox", "resources": {"memory_limit": "16Mi"},
                 "secrets": refs},
            ]},
        ],
    }  # fmt: skip


def test_a_secret_without_tenant_is_the_apps_tenants() -> None:
    doc = _with_secrets([{"name": "db-password"}, {"name": "tls", "tenant": "default"}])
    spec = parse_app_spec(json.dumps(doc), tenant="acme")
    refs = spec.services[0].containers[0].secrets
    assert [(r.tenant, r.name) for r in refs] == [("acme", "db-password"), ("default", "tls")]
    # The canonical form names it: a site of any release reads the same tenant.
    written = to_json(spec)["services"][0]["containers"][0]["secrets"]  # type: ignore[index]
    assert written[0] == {"name": "db-password", "tenant": "acme", "file": "db-password"}
    assert from_json(to_json(spec), tenant="other") == spec
    assert from_json(doc, tenant="acme") == spec
    # Not given: the default tenant, as before (its specs keep their digest).
    plain = parse_app_spec(json.dumps(doc))
    assert plain.services[0].containers[0].secrets[0].tenant == "default"
    assert spec_digest(plain) != spec_digest(spec)


def test_foreign_secrets_are_named_by_their_field() -> None:
    doc = _with_secrets(
        [
            {"name": "api-key"},
            {"name": "db-password", "tenant": "acme"},
            {"name": "x", "tenant": "b"},
        ]
    )
    spec = parse_app_spec(json.dumps(doc), tenant="evil")
    problems = foreign_secrets(spec, "evil")
    assert [p.split(":")[0] for p in problems] == [
        "services[0].containers[0].secrets[1].tenant",
        "services[0].containers[0].secrets[2].tenant",
    ]
    with pytest.raises(ForeignSecret) as info:
        require_own_secrets(spec, "evil")
    assert info.value.code == "foreign_secret" and info.value.problems == problems
    assert isinstance(info.value, RemoteInputError)
    own = parse_app_spec(json.dumps(_with_secrets([{"name": "api-key"}])), tenant="evil")
    require_own_secrets(own, "evil")  # its own: fine
    assert foreign_secrets(own, "evil") == []
    with pytest.raises(ForeignSecret):
        require_own_secrets(own, "acme")
