"""The API's request contract: query parameters and bodies declared as data (pure).

A route's ``Query`` parameters and its request body schema (a JSON Schema of
``central_hub.openapi.SCHEMAS``) are the only statement of what the route accepts:
``central_hub.openapi`` documents them, and ``QueryContract`` and ``BodyContract`` refuse
what they do not allow before the handler runs, so the document and the server cannot
disagree. Bodies are checked by ``jsonschema_rs`` (Rust: no regex backtracking, a cost
linear in the body, which the hub bounds in size).

A refusal is a 400 listing the problems (``problems``), under the code of the first:
``bad_<name>`` or the ``x-error`` of the field's schema (or of an object around it);
``field_not_allowed`` (or the object's ``x-unknown-field-error``) for a field the schema
does not have; ``bad_request`` (or the schema's ``x-not-object-error``) for a body that is
not an object.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jsonschema_rs

from central_hub.errors import ApiError, InputProblems

Schema = dict[str, Any]
QueryType = Literal["integer", "number", "string"]

_INTEGER_RE = re.compile(r"-?[0-9]{1,20}")
MAX_PROBLEMS = 20  # listed in one refusal
MAX_QUERY_VALUE = 1024  # characters of a string parameter without its own maximum


@dataclass(frozen=True, slots=True)
class Query:
    """One query parameter: its type and every rule the server holds it to."""

    name: str
    type: QueryType
    description: str
    minimum: float | None = None
    maximum: float | None = None
    pattern: str | None = None  # the whole value must match (anchored in the schema)
    min_length: int | None = None
    max_length: int | None = None
    enum: tuple[str, ...] | None = None
    error: str | None = None  # the 400's code; default bad_<name>

    def schema(self) -> Schema:
        schema: Schema = {"type": self.type}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        if self.pattern is not None:
            schema["pattern"] = f"^(?:{self.pattern})$"
        if self.min_length is not None:
            schema["minLength"] = self.min_length
        if self.type == "string":
            schema["maxLength"] = self.max_length or MAX_QUERY_VALUE
        if self.enum is not None:
            schema["enum"] = list(self.enum)
        return schema

    @property
    def code(self) -> str:
        return self.error or f"bad_{self.name}"


def _convert(query: Query, raw: str) -> object:
    bad = ApiError(400, query.code, f"{query.name}: must be {_expected(query)}")
    if len(raw) > max(query.max_length or 0, MAX_QUERY_VALUE):  # refused unparsed
        raise bad
    if query.type == "integer":
        if not raw.isascii() or not _INTEGER_RE.fullmatch(raw):
            raise bad
        return int(raw)
    if query.type == "number":
        try:
            value = float(raw)
        except ValueError:
            raise bad from None
        if not math.isfinite(value):
            raise bad
        return value
    return raw


def _expected(query: Query) -> str:
    if query.enum is not None:
        return "one of " + ", ".join(query.enum)
    kind = {"integer": "an integer", "number": "a number", "string": "a string"}[query.type]
    if query.minimum is not None and query.maximum is not None:
        return f"{kind} from {query.minimum:g} to {query.maximum:g}"
    if query.minimum is not None:
        return f"{kind} of at least {query.minimum:g}"
    if query.pattern is not None:
        return f"{kind} matching {query.pattern}"
    return kind


class QueryContract:
    """The query parameters of one route, checked together."""

    def __init__(self, queries: Sequence[Query]) -> None:
        self.queries = {query.name: query for query in queries}
        self._validators = {
            query.name: jsonschema_rs.Draft202012Validator(query.schema(), validate_formats=False)
            for query in queries
        }

    def parse(self, given: Mapping[str, str], repeated: Sequence[str]) -> dict[str, object]:
        """The declared parameters present in ``given``, converted and checked (400 naming
        the parameter otherwise; a declared parameter given twice is refused)."""
        for name in repeated:
            if name in self.queries:
                raise ApiError(400, "bad_query", f"{name}: may appear once")
        values: dict[str, object] = {}
        for name, query in self.queries.items():
            raw = given.get(name)
            if raw is None:
                continue
            value = _convert(query, raw)
            if not self._validators[name].is_valid(value):
                raise ApiError(400, query.code, f"{name}: must be {_expected(query)}")
            values[name] = value
        return values


class BodyContract:
    """The JSON body of one route: a schema of ``schemas`` (``$ref`` resolved within)."""

    def __init__(self, name: str, schemas: Mapping[str, Schema]) -> None:
        self.name = name
        self.root: Schema = {
            "$ref": f"#/components/schemas/{name}",
            "components": {"schemas": dict(schemas)},
        }
        self._validator = jsonschema_rs.Draft202012Validator(self.root, validate_formats=False)

    def check(self, body: object) -> None:
        """400 listing every field the schema refuses (at most ``MAX_PROBLEMS``) under the
        first one's code; nothing when the body is valid."""
        if not isinstance(body, dict):  # every request body is an object
            root: list[str | int] = ["components", "schemas", self.name]
            code = self._code(root, "x-not-object-error") or "bad_request"
            raise ApiError(400, code, "the body must be a JSON object")
        refusals = list(itertools.islice(self._validator.iter_errors(body), MAX_PROBLEMS))
        if not refusals:
            return
        problems = [self._refusal(error) for error in refusals]
        raise InputProblems(
            problems[0].code, "the request is refused", [p.message for p in problems]
        )

    def _refusal(self, error: jsonschema_rs.ValidationError) -> ApiError:
        path = [str(part) for part in error.instance_path]
        field = ".".join(path) or "the body"
        kind = type(error.kind).__name__
        if kind == "AdditionalProperties":
            unexpected = sorted(str(name) for name in getattr(error.kind, "unexpected", []))
            where = f"{field}: " if path else ""
            return ApiError(
                400,
                self._code(list(error.schema_path), "x-unknown-field-error") or "field_not_allowed",
                f"{where}fields {unexpected} may not be set: {error.message}",
            )
        code = self._code(list(error.schema_path)) or (f"bad_{path[0]}" if path else "bad_request")
        if kind == "Required":
            missing = getattr(error.kind, "property", None)
            name = f"{field}.{missing}" if path else str(missing)
            # The missing field's own code, else its object's, else bad_<field>.
            parent: list[str | int] = [*error.schema_path][:-1]
            named = (
                self._code([*parent, "properties", str(missing)], only_last=True)
                or self._code(list(error.schema_path))
                or f"bad_{missing}"
            )
            return ApiError(400, named if not path else code, f"{name}: is required")
        return ApiError(400, code, f"{field}: {error.message}")

    def _code(
        self, schema_path: list[str | int], keyword: str = "x-error", *, only_last: bool = False
    ) -> str | None:
        """The innermost ``keyword`` (``x-error``: a field's refusal code) along the failing
        keyword's path in the schema."""
        node: object = self.root
        code = None
        for part in schema_path:
            if isinstance(node, dict):
                node = node.get(str(part))
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                return code if not only_last else None
            if isinstance(node, dict) and isinstance(node.get(keyword), str):
                code = node[keyword]
        if only_last:  # the node the whole path names, or nothing
            return node.get(keyword) if isinstance(node, dict) else None
        return code
