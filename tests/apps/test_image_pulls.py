"""Which images the leader pulls by itself (meshorch.apps.image_pulls, pure part)."""

from __future__ import annotations

from meshorch.apps.image_pulls import PassGate, WantedImage, images_to_pull, pullable
from meshorch.apps.records import AppRecord
from meshorch.apps.spec import SpecError, parse_app_spec, to_json

SPEC = """
api_version: meshorch/v1
name: {name}
version: "1"
services:
  - name: s
    containers:
      - name: a
        image: {first}
        pull_secret: regcred
        resources: {{memory_limit: 16Mi}}
      - name: b
        image: {second}
        resources: {{memory_limit: 16Mi}}
"""


def record(name: str, first: str, second: str, tenant: str = "acme") -> AppRecord:
    text = SPEC.format(name=name, first=first, second=second).encode()
    return AppRecord(parse_app_spec(text, tenant=tenant), tenant)


def test_local_names_are_never_pulled() -> None:
    assert not pullable("localhost/meshorch-busybox:1")
    assert not pullable("Not A Ref!")
    assert pullable("localhost:5000/web:1")
    assert pullable("busybox:1.36")
    assert pullable("registry.example.com/pos/web@sha256:" + "a" * 64)


def test_each_missing_registry_image_once_with_the_first_apps_secret() -> None:
    apps = [
        record("one", "reg.example/pos/web:1", "localhost/meshorch-busybox:1"),
        record("two", "reg.example/pos/api:2", "reg.example/pos/web:1", tenant="other"),
    ]
    known = {"reg.example/pos/api:2"}
    assert images_to_pull(apps, known.__contains__) == [
        WantedImage("reg.example/pos/web:1", "acme", "regcred")
    ]
    assert images_to_pull(apps, lambda _ref: True) == []


def test_pull_secret_is_in_the_canonical_spec_only_when_given() -> None:
    spec = record("one", "reg.example/pos/web:1", "reg.example/pos/api:1").spec
    containers = to_json(spec)["services"][0]["containers"]  # type: ignore[index]
    assert containers[0]["pull_secret"] == "regcred" and "pull_secret" not in containers[1]
    bad = SPEC.format(name="x", first="reg.example/a:1", second="reg.example/b:1")
    try:
        parse_app_spec(bad.replace("regcred", "../etc"), tenant="acme")
    except SpecError as exc:
        assert any("pull_secret" in problem for problem in exc.problems), exc.problems
    else:
        raise AssertionError("a bad pull_secret was accepted")


def test_a_pass_runs_when_what_it_decides_from_changes_a_retry_is_due_or_time_passed() -> None:
    gate = PassGate(full_pass_s=2.0)
    never = float("inf")
    assert gate.due((1, frozenset({"h1"})), 0.0, never)  # the first pass
    assert not gate.due((1, frozenset({"h1"})), 0.2, never)  # nothing changed
    assert gate.due((2, frozenset({"h1"})), 0.4, never)  # an app or image record written
    assert not gate.due((2, frozenset({"h1"})), 0.6, never)
    assert gate.due((2, frozenset()), 0.8, never)  # a host (maybe the puller) went away
    assert not gate.due((2, frozenset()), 1.0, 5.0)
    assert gate.due((2, frozenset()), 1.2, 1.1)  # a failed pull's retry is due
    assert not gate.due((2, frozenset()), 3.1, never)
    assert gate.due((2, frozenset()), 3.2, never)  # the full pass, 2 s after the last
    gate.reset()  # leadership lost, or a pass failed
    assert gate.due((2, frozenset()), 3.3, never)
