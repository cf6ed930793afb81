"""The JSON Schema subset that ``response_format: json_schema`` supports for language models.

``check_schema`` refuses a schema that uses anything else (before the job runs, so a job never
passes with a constraint silently ignored); ``schema_violation`` checks a decoded output against
it. Pure Python: this module runs in the worker process too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

SCHEMA_KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "enum",
        "const",
        "anyOf",
        "oneOf",
        "allOf",
        "minItems",
        "maxItems",
        "uniqueItems",
        "minProperties",
        "maxProperties",
        "minLength",
        "maxLength",
        "pattern",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
    }
)
"""The keywords a schema may use; the output is checked against every one of them."""

SCHEMA_ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "format",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$schema",
        "$id",
        "$comment",
    }
)
"""Keywords accepted and not checked (annotations)."""

JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
MAX_SCHEMA_DEPTH = 32
"""Deepest nesting of subschemas accepted."""

_BOUNDS: dict[str, Callable[[float, float], bool]] = {
    "minimum": lambda v, b: v < b,
    "maximum": lambda v, b: v > b,
    "exclusiveMinimum": lambda v, b: v <= b,
    "exclusiveMaximum": lambda v, b: v >= b,
}
"""Numeric bounds: keyword -> whether ``value`` breaks ``bound``."""


class SchemaError(ValueError):
    """A schema leaves the supported subset; ``path`` is where (``schema.properties.a``)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def check_schema(schema: Any, path: str = "schema", depth: int = 0) -> None:
    """Raise ``SchemaError`` where ``schema`` leaves the supported subset."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise SchemaError(path, "a schema must be an object or a boolean")
    if depth > MAX_SCHEMA_DEPTH:
        raise SchemaError(path, f"nested deeper than {MAX_SCHEMA_DEPTH} levels")
    for key, sub in schema.items():
        where = f"{path}.{key}"
        if key in SCHEMA_ANNOTATIONS:
            continue
        if key not in SCHEMA_KEYWORDS:
            raise SchemaError(
                where,
                f"unsupported JSON Schema keyword {key!r} "
                f"(supported: {', '.join(sorted(SCHEMA_KEYWORDS))})",
            )
        if key == "type":
            types = sub if isinstance(sub, list) else [sub]
            if not types or any(t not in JSON_TYPES for t in types):
                raise SchemaError(where, f"must be one of {', '.join(JSON_TYPES)}, or a list")
        elif key == "properties":
            if not isinstance(sub, dict):
                raise SchemaError(where, "must be an object of schemas")
            for name, prop in sub.items():
                check_schema(prop, f"{where}.{name}", depth + 1)
        elif key in ("additionalProperties", "items"):
            check_schema(sub, where, depth + 1)
        elif key in ("anyOf", "oneOf", "allOf"):
            if not isinstance(sub, list) or not sub:
                raise SchemaError(where, "must be a non-empty list of schemas")
            for i, item in enumerate(sub):
                check_schema(item, f"{where}[{i}]", depth + 1)
        elif key == "required":
            if not isinstance(sub, list) or not all(isinstance(n, str) for n in sub):
                raise SchemaError(where, "must be a list of property names")
        elif key == "enum":
            if not isinstance(sub, list) or not sub:
                raise SchemaError(where, "must be a non-empty list")
        elif key == "pattern":
            try:
                re.compile(sub)
            except (re.error, TypeError) as e:
                raise SchemaError(where, f"not a regular expression: {e}") from e
        elif key == "uniqueItems":
            if not isinstance(sub, bool):
                raise SchemaError(where, "must be a boolean")
        elif key != "const" and (
            not isinstance(sub, (int, float)) or isinstance(sub, bool) or not math.isfinite(sub)
        ):
            raise SchemaError(where, "must be a number")


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _is_type(value: Any, expected: str) -> bool:
    actual = _type_of(value)
    if expected == "number":
        return actual in ("integer", "number")
    if expected == "integer":
        return actual == "integer" or (actual == "number" and float(value).is_integer())
    return actual == expected


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def schema_violation(value: Any, schema: Any, path: str = "$") -> str | None:
    """The first way ``value`` (decoded JSON) breaks ``schema``, as ``"<path>: <reason>"``, or
    None when it validates. ``schema`` must have passed ``check_schema``."""
    if schema is True:
        return None
    if schema is False:
        return f"{path}: no value is allowed here"
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, t) for t in types):
            return f"{path}: expected {' or '.join(types)}, got {_type_of(value)}"
    if "const" in schema and _canonical(value) != _canonical(schema["const"]):
        return f"{path}: must equal {json.dumps(schema['const'])}"
    if "enum" in schema and _canonical(value) not in {_canonical(v) for v in schema["enum"]}:
        return f"{path}: must be one of {json.dumps(schema['enum'])}"
    if (error := _combinator_violation(value, schema, path)) is not None:
        return error
    kind = _type_of(value)
    if kind == "object":
        return _object_violation(value, schema, path)
    if kind == "array":
        return _array_violation(value, schema, path)
    if kind == "string":
        if len(value) < schema.get("minLength", 0):
            return f"{path}: shorter than {schema['minLength']} characters"
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return f"{path}: longer than {schema['maxLength']} characters"
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            return f"{path}: does not match pattern {schema['pattern']!r}"
    if kind in ("integer", "number"):
        for key, breaks in _BOUNDS.items():
            if key in schema and breaks(value, schema[key]):
                return f"{path}: breaks {key} {schema[key]}"
    return None


def _combinator_violation(value: Any, schema: dict[str, Any], path: str) -> str | None:
    for key in ("allOf", "anyOf", "oneOf"):
        if key not in schema:
            continue
        errors = [schema_violation(value, sub, path) for sub in schema[key]]
        passed = sum(e is None for e in errors)
        if key == "allOf" and passed < len(errors):
            return next(e for e in errors if e is not None)
        if key == "anyOf" and passed == 0:
            return f"{path}: matches none of anyOf (first: {errors[0]})"
        if key == "oneOf" and passed != 1:
            return f"{path}: matches {passed} of oneOf, not exactly one"
    return None


def _object_violation(value: dict[str, Any], schema: dict[str, Any], path: str) -> str | None:
    for name in schema.get("required", ()):
        if name not in value:
            return f"{path}: missing required property {name!r}"
    if len(value) < schema.get("minProperties", 0):
        return f"{path}: fewer than {schema['minProperties']} properties"
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        return f"{path}: more than {schema['maxProperties']} properties"
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        sub = properties.get(name, extra)
        if sub is False:
            return f"{path}: unexpected property {name!r}"
        if (error := schema_violation(item, sub, f"{path}.{name}")) is not None:
            return error
    return None


def _array_violation(value: list[Any], schema: dict[str, Any], path: str) -> str | None:
    if len(value) < schema.get("minItems", 0):
        return f"{path}: fewer than {schema['minItems']} items"
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        return f"{path}: more than {schema['maxItems']} items"
    if schema.get("uniqueItems") and len({_canonical(v) for v in value}) != len(value):
        return f"{path}: items are not unique"
    if "items" in schema:
        for i, item in enumerate(value):
            if (error := schema_violation(item, schema["items"], f"{path}[{i}]")) is not None:
                return error
    return None
