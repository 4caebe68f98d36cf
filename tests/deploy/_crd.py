"""A custom resource against its CustomResourceDefinition's schema, offline: jsonschema on
the version's openAPIV3Schema, plus the unknown-field check that `kubectl apply` makes with
strict field validation (an API server prunes fields its structural schema does not name,
so a misspelt one would vanish silently)."""

from __future__ import annotations

from typing import Any

import jsonschema

_TOP_LEVEL = ("apiVersion", "kind", "metadata")  # checked by the API server, not the schema


def version_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    [found] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema: dict[str, Any] = found["schema"]["openAPIV3Schema"]
    return schema


def unknown_fields(node: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths of `node`'s fields that `schema` does not name (where it names its fields)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out = []
    if isinstance(node, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in node.items():
            if not path and key in _TOP_LEVEL:
                continue
            if properties is not None:
                if key not in properties:
                    out.append(f"{path}.{key}")
                else:
                    out += unknown_fields(value, properties[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += unknown_fields(value, extra, f"{path}.{key}")
    elif isinstance(node, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(node):
            out += unknown_fields(value, schema["items"], f"{path}[{i}]")
    return out


def crd_errors(doc: dict[str, Any], crd: dict[str, Any]) -> list[str]:
    """Everything the schema refuses in `doc` (empty: valid)."""
    schema = version_schema(crd, doc["apiVersion"].rsplit("/", 1)[-1])
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    return errors + [f"unknown field {p}" for p in unknown_fields(doc, schema)]
