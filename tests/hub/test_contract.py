"""The API's request contract: one declaration checks requests and writes the document."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from multidict import MultiDict

from central_hub import Hub, openapi
from central_hub.api import ROUTES
from central_hub.contract import MAX_PROBLEMS, BodyContract, Query, QueryContract
from central_hub.errors import ApiError, InputProblems
from tests.hub.conftest import MakeSite
from tests.hub.helpers import Operator

LIMIT = Query("limit", "integer", "", minimum=1, maximum=500)
WAIT = Query("wait", "number", "", minimum=0, maximum=30)
NAME = Query("name", "string", "", pattern="[a-z]+", max_length=10, error="bad_name")
COUNT = Query("count", "string", "", enum=("true", "false"))


def refused(contract: QueryContract, **given: str) -> ApiError:
    with pytest.raises(ApiError) as caught:
        contract.parse(MultiDict(given), ())
    assert caught.value.status == 400
    return caught.value


def test_query_parameters_are_converted_and_checked() -> None:
    contract = QueryContract([LIMIT, WAIT, NAME, COUNT])
    given = MultiDict(limit="7", wait="2.5", name="abc", count="true", other="ignored")
    assert contract.parse(given, ()) == {"limit": 7, "wait": 2.5, "name": "abc", "count": "true"}
    assert contract.parse(MultiDict(), ()) == {}
    for bad in ("0", "501", "-1", "1.5", "", "7 ", "\u0661", "9" * 30):
        error = refused(contract, limit=bad)
        assert error.code == "bad_limit" and "limit" in error.message, bad
    for bad in ("nan", "inf", "-0.1", "31", "x"):
        assert refused(contract, wait=bad).code == "bad_wait", bad
    for bad in ("ABC", "a-b", "", "a" * 11):
        assert refused(contract, name=bad).code == "bad_name", bad
    assert refused(contract, count="yes").code == "bad_count"
    with pytest.raises(ApiError) as caught:
        contract.parse(MultiDict([("limit", "1"), ("limit", "2")]), ["limit"])
    assert caught.value.code == "bad_query"


def body_refused(name: str, body: object) -> ApiError:
    """The refusal of ``body`` (a 400: an ApiError, or InputProblems listing several)."""
    try:
        BodyContract(name, openapi.SCHEMAS).check(body)
    except ApiError as exc:
        assert exc.status == 400
        return exc
    except InputProblems as exc:
        return ApiError(400, exc.code, "; ".join(exc.problems))
    raise AssertionError(f"{name} accepted {body!r}")


def test_bodies_are_refused_naming_the_field_with_the_routes_codes() -> None:
    BodyContract("SiteRequest", openapi.SCHEMAS).check({"id": "shop-1", "labels": {"a": "b"}})
    assert body_refused("SiteRequest", []).code == "bad_request"
    assert body_refused("Labels", ["x"]).code == "bad_labels"
    error = body_refused("SiteRequest", {"id": "shop-1", "owner": "me"})
    assert error.code == "field_not_allowed" and "owner" in error.message
    assert body_refused("SiteRequest", {"id": "Shop_1"}).code == "bad_site_id"
    assert body_refused("SiteRequest", {}).code == "bad_site_id"  # missing: its own code
    assert body_refused("SiteRequest", {"id": "s", "labels": {"a": 1}}).code == "bad_labels"
    placement = {"spec": "x", "placement": {"max_parallel": 0}}
    assert body_refused("AppRequest", placement).code == "bad_placement"
    assert body_refused("SecretRequest", {"name": "n"}).code == "bad_value"  # neither value
    assert body_refused("SecretRequest", {"name": "n", "x": 1}).code == "bad_request"
    report = body_refused("SiteReport", {"v": 1, "site": "s", "time": 1.0})
    assert report.code == "bad_report"


def test_every_problem_is_listed_up_to_a_bound() -> None:
    with pytest.raises(InputProblems) as caught:
        BodyContract("Labels", openapi.SCHEMAS).check({f"-{i}": "" for i in range(60)})
    assert caught.value.code == "bad_labels"
    assert len(caught.value.problems) == MAX_PROBLEMS


def test_the_document_states_what_the_server_checks() -> None:
    """Each route's parameters and body in the document are its declarations, verbatim."""
    document = openapi.document(ROUTES)
    for route in ROUTES:
        operation = document["paths"][route.path][route.method.lower()]
        documented = {p["name"]: p["schema"] for p in operation.get("parameters", [])}
        for query in (*route.query, *route.path_params):
            assert documented[query.name] == query.schema(), (route.path, query.name)
        if route.request is None:
            assert "requestBody" not in operation
        else:
            content = operation["requestBody"]["content"]["application/json"]
            assert content["schema"] == {"$ref": f"#/components/schemas/{route.request}"}
        for status in (route.status, *route.also):
            assert str(status) in operation["responses"], (route.path, status)


async def call(
    session: aiohttp.ClientSession, url: str, method: str, path: str, body: bytes, token: str
) -> tuple[int, Any, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.request(method, url + path, data=body, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers


async def test_callers_who_may_not_call_are_refused_before_their_input_is_read(
    hub: Hub, admin: Operator, session: aiohttp.ClientSession
) -> None:
    viewer = await admin.ok("POST", "/v1/tokens", {"role": "viewer", "tenant": "*"}, 201)
    garbage = b'{"id": "NOT AN ID", "extra": [1, 2]}'
    for token, status, code in ((None, 401, "unauthorized"), (viewer["token"], 403, "forbidden")):
        got, answer, _ = await call(session, hub.url, "POST", "/v1/sites", garbage, token or "")
        assert (got, answer["error"]["code"]) == (status, code)
    got, answer, _ = await call(session, hub.url, "GET", "/v1/deltas?limit=0", b"", "")
    assert (got, answer["error"]["code"]) == (401, "unauthorized")  # not bad_limit
    # The admin's bad input is a 400 naming the field, and changes nothing.
    got, answer, _ = await call(session, hub.url, "POST", "/v1/sites", garbage, admin.token)
    assert got == 400 and answer["error"]["code"] == "bad_site_id"
    assert any("extra" in p for p in answer["error"]["problems"])
    got, answer, _ = await call(session, hub.url, "GET", "/v1/sites?limit=1001", b"", admin.token)
    assert got == 400 and answer["error"]["code"] == "bad_limit"
    assert answer["error"]["message"].startswith("limit:")
    assert (await admin.ok("GET", "/v1/sites"))["sites"] == []
    assert hub.head.version == 0


async def test_a_405_says_which_methods_the_path_has(
    hub: Hub, admin: Operator, session: aiohttp.ClientSession, make_site: MakeSite
) -> None:
    await make_site("shop-1")
    for method, path, allowed in (
        ("DELETE", "/v1/fleet", {"GET"}),
        ("PATCH", "/v1/sites/shop-1", {"GET", "DELETE"}),
        ("TRACE", "/v1/tokens", {"GET", "POST"}),
    ):
        status, answer, headers = await call(session, hub.url, method, path, b"", admin.token)
        assert status == 405 and answer["error"]["code"] == "method_not_allowed"
        assert {m.strip() for m in headers["Allow"].split(",")} - {"HEAD"} == allowed
    assert orjson.loads(orjson.dumps(answer))  # still the JSON error shape
