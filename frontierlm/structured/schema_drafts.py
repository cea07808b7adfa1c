"""Older JSON-schema drafts (04, 06, 07, 2019-09) rewritten in 2020-12 spelling, so that one set of rules
(frontierlm/structured/schema.py) and both backends see one dialect."""
from __future__ import annotations

import json

_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalItems", "additionalProperties", "not", "if", "then", "else", "contains",
               "propertyNames", "unevaluatedProperties", "unevaluatedItems")


def pointer(path: tuple) -> str:
    """The JSON pointer (as a URI fragment) of a place in the schema."""
    return "#" + "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def _rewrite_ref(ref: str) -> str:
    if not ref.startswith("#/"):
        return ref
    parts = ref[2:].split("/")
    out = []
    for i, p in enumerate(parts):
        prev = parts[i - 1] if i else None
        if p == "definitions" and prev not in ("properties", "patternProperties"):
            p = "$defs"
        elif p == "items" and i + 1 < len(parts) and parts[i + 1].isdigit() and prev != "properties":
            p = "prefixItems"
        out.append(p)
    return "#/" + "/".join(out)


def upgrade_draft(node, path: tuple = ()):
    """A copy of `node` in 2020-12 spelling: tuple `items` -> `prefixItems` (+ `additionalItems` -> `items`),
    `definitions` -> `$defs`, `dependencies` -> `dependentRequired` / `dependentSchemas`, boolean
    `exclusiveMinimum` / `exclusiveMaximum` -> numeric ones, draft-04 `id` dropped (an annotation)."""
    if not isinstance(node, dict):
        if isinstance(node, bool):
            return node
        raise ValueError(f"the schema at {pointer(path)} must be an object or a boolean, got {json.dumps(node)}")
    out = {}
    for k, v in node.items():
        if k == "definitions":
            k = "$defs"
        if k == "id" and isinstance(v, str):
            continue
        out[k] = v
    if isinstance(out.get("items"), list):
        out["prefixItems"] = out.pop("items")
        if "additionalItems" in out:
            out["items"] = out.pop("additionalItems")
    else:
        out.pop("additionalItems", None)  # without tuple items it never applied
    if "dependencies" in out:
        deps = out.pop("dependencies")
        if not isinstance(deps, dict):
            raise ValueError(f"'dependencies' at {pointer(path)} must be an object")
        for name, dep in deps.items():
            key = "dependentRequired" if isinstance(dep, list) else "dependentSchemas"
            out.setdefault(key, {})[name] = dep
    for bound, excl in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(out.get(excl), bool):
            if out.pop(excl) and bound in out:
                out[excl] = out.pop(bound)
    if isinstance(out.get("$ref"), str):
        out["$ref"] = _rewrite_ref(out["$ref"])
    for k in _SUBSCHEMA_MAPS:
        if isinstance(out.get(k), dict):
            out[k] = {name: upgrade_draft(s, path + (k, name)) for name, s in out[k].items()}
    for k in _SUBSCHEMA_LISTS:
        if isinstance(out.get(k), list):
            out[k] = [upgrade_draft(s, path + (k, i)) for i, s in enumerate(out[k])]
    for k in _SUBSCHEMAS:
        if k in out:
            out[k] = upgrade_draft(out[k], path + (k,))
    return out
