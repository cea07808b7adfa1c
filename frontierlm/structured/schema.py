"""JSON schemas enforced as written: rewrite older drafts to 2020-12, give keywords the type they apply to, and
decide, keyword by keyword, which backend enforces the schema. A keyword no backend enforces is refused (a
ValueError naming it and its JSON pointer) instead of being dropped.

xgrammar ignores type-specific keywords in a schema without "type" and several keyword combinations (pattern or
format together with a length, enum or const beside other constraints, required without properties, allOf,
siblings of anyOf and $ref, multipleOf on numbers); this module rewrites what can be rewritten equivalently
(types split per keyword group, enum values filtered by their siblings, integer bounds rounded, disjoint oneOf
as anyOf) and marks the rest for llguidance, which enforces them.
"""
from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field

import jsonschema

from frontierlm.structured.schema_drafts import pointer as _pointer, upgrade_draft

ANNOTATIONS = {"title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly", "$comment",
               "$schema", "$id", "$anchor", "discriminator"}
TYPE_KEYWORDS = {
    "string": {"minLength", "maxLength", "pattern", "format"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "array": {"items", "prefixItems", "minItems", "maxItems"},
    "object": {"properties", "required", "additionalProperties", "patternProperties", "minProperties",
               "maxProperties"},
}
APPLICATORS = {"anyOf", "oneOf", "allOf", "$ref"}
GENERIC = {"type", "enum", "const", "$defs"} | APPLICATORS
REFUSED = {
    "uniqueItems": "no backend can track which items were already written",
    "contains": "no backend enforces it", "minContains": "no backend enforces it",
    "maxContains": "no backend enforces it", "not": "no backend enforces negation",
    "if": "no backend enforces conditionals", "then": "no backend enforces conditionals",
    "else": "no backend enforces conditionals", "dependentSchemas": "no backend enforces it",
    "propertyNames": "no backend enforces it together with the other object keywords",
    "unevaluatedProperties": "no backend enforces it beside applicators",
    "unevaluatedItems": "no backend enforces it beside applicators",
    "$dynamicRef": "dynamic references are not supported", "$dynamicAnchor": "dynamic references are not supported",
    "$recursiveRef": "dynamic references are not supported",
    "$recursiveAnchor": "dynamic references are not supported",
    "contentEncoding": "no backend decodes string contents", "contentMediaType": "no backend decodes string contents",
    "contentSchema": "no backend decodes string contents", "$vocabulary": "custom vocabularies are not supported",
}
XGRAMMAR_FORMATS = {"date", "date-time", "time", "email", "uuid", "ipv4", "ipv6", "uri", "hostname", "duration"}
GUIDANCE_FORMATS = XGRAMMAR_FORMATS
ALL_TYPES = ["string", "number", "array", "object", "boolean", "null"]
_LOOKAROUND = re.compile(r"\(\?<?[=!]|\\[1-9]")


@dataclass
class NormalizedSchema:
    schema: dict | bool
    guidance_reasons: list[str] = field(default_factory=list)  # why xgrammar cannot enforce it ("kw at #/path")


def _refuse(keyword: str, path: tuple, why: str):
    raise ValueError(f"keyword {keyword!r} at {_pointer(path)} cannot be enforced ({why}); the request is refused "
                     "rather than the keyword ignored")


# ---- pass 2: audit, type inference, backend choice ------------------------------------------------------
def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}[type(v)]


def _anchored(pattern: str) -> bool:
    """^...$ around the whole pattern: the one form where xgrammar's whole-string match is JSON Schema's search."""
    return pattern.startswith("^") and pattern.endswith("$") and not pattern.endswith("\\$") and "|" not in pattern


def _listed_values(s: dict) -> set[str] | None:
    """The values an enum / const allows, as canonical JSON (None when the schema lists none)."""
    if "const" in s:
        return {json.dumps(s["const"], sort_keys=True)}
    if isinstance(s.get("enum"), list):
        return {json.dumps(v, sort_keys=True) for v in s["enum"]}
    return None


class _Normalizer:
    def __init__(self, root: dict | bool):
        self.root = root
        self.reasons: list[str] = []

    def guidance(self, keyword: str, path: tuple) -> None:
        self.reasons.append(f"{keyword} at {_pointer(path)}")

    def resolve(self, ref: str, path: tuple):
        if ref == "#":
            return self.root
        if not ref.startswith("#/"):
            _refuse("$ref", path, f"only references inside the schema are followed, got {ref!r}")
        node = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            try:
                node = node[int(part)] if isinstance(node, list) else node[part]
            except (KeyError, IndexError, ValueError, TypeError):
                _refuse("$ref", path, f"{ref!r} points at nothing")
        return node

    def node(self, s, path: tuple):
        if isinstance(s, bool):
            return s
        if not isinstance(s, dict):
            raise ValueError(f"the schema at {_pointer(path)} must be an object or a boolean")
        for k in s:
            if k in REFUSED:
                _refuse(k, path, REFUSED[k])
            if k == "dependentRequired":
                continue
            if not (k in ANNOTATIONS or k in GENERIC or k.startswith("x-")
                    or any(k in kws for kws in TYPE_KEYWORDS.values())):
                _refuse(k, path, "not a JSON Schema 2020-12 keyword")
        s = {k: v for k, v in s.items() if not k.startswith("x-") and k not in ("discriminator", "$schema")}
        if isinstance(s.get("$ref"), str):
            self.resolve(s["$ref"], path)
        elif "$ref" in s:
            raise ValueError(f"'$ref' at {_pointer(path)} must be a string")
        if "dependentRequired" in s:  # {a: [b]} == a absent, or a and b present
            extra = [{"anyOf": [{"properties": {name: False}}, {"required": [name, *deps]}]}
                     for name, deps in s.pop("dependentRequired").items()]
            s["allOf"] = list(s.get("allOf", [])) + extra
            self.guidance("dependentRequired", path)
        s = self.children(s, path)
        if "enum" in s or "const" in s:
            return self.values(s, path)
        if "oneOf" in s:
            s = self.one_of(s, path)
        if "allOf" in s and len(s["allOf"]) == 1 and not set(s) - ANNOTATIONS - {"allOf", "$defs"}:
            only = s.pop("allOf")[0]
            if isinstance(only, dict):
                s = {**s, **only}
        return self.types(s, path)

    def children(self, s: dict, path: tuple) -> dict:
        for k in ("properties", "patternProperties", "$defs"):
            if k in s:
                if not isinstance(s[k], dict):
                    raise ValueError(f"{k!r} at {_pointer(path)} must be an object")
                s[k] = {n: self.node(v, path + (k, n)) for n, v in s[k].items()}
                if k == "properties" and any(v is False for v in s[k].values()):
                    self.guidance("a false property schema", path + (k,))
        for k in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if k in s:
                if not isinstance(s[k], list) or not s[k]:
                    raise ValueError(f"{k!r} at {_pointer(path)} must be a non-empty list")
                s[k] = [self.node(v, path + (k, i)) for i, v in enumerate(s[k])]
        for k in ("items", "additionalProperties"):
            if k in s:
                s[k] = self.node(s[k], path + (k,))
        return s

    def values(self, s: dict, path: tuple) -> dict:
        """enum / const: keep the values the sibling keywords allow, then enforce just the list."""
        values = [s["const"]] if "const" in s else s["enum"]
        if not isinstance(values, list) or not values:
            raise ValueError(f"'enum' at {_pointer(path)} must be a non-empty list")
        siblings = {k: v for k, v in s.items() if k not in ("enum", "const") and k not in ANNOTATIONS}
        if "const" in s and "enum" in s:
            siblings["enum"] = s["enum"]
        if siblings:
            check = {**siblings}
            if isinstance(self.root, dict) and "$defs" in self.root and "$defs" not in check:
                check["$defs"] = self.root["$defs"]
            refs = json.dumps(siblings)
            if '"$ref"' in refs and '"#/$defs/' not in refs:
                self.guidance("enum beside $ref", path)
                return s
            validator = jsonschema.Draft202012Validator(check)
            values = [v for v in values if validator.is_valid(v)]
            if not values:
                raise ValueError(f"no value of 'enum' / 'const' at {_pointer(path)} satisfies its other keywords")
        return {**{k: v for k, v in s.items() if k in ANNOTATIONS}, "enum": values}

    def one_of(self, s: dict, path: tuple) -> dict:
        branches = [self.deref(b, path) for b in s["oneOf"]]
        for i, a in enumerate(branches):
            for b in branches[i + 1:]:
                if not self.disjoint(a, b):
                    _refuse("oneOf", path, "its branches may overlap, and no backend enforces exactly one match; "
                            "use anyOf, or make the branches differ by type or by a const / enum property")
        s = dict(s)
        branches = s.pop("oneOf")
        if "anyOf" in s:
            s["allOf"] = list(s.get("allOf", [])) + [{"anyOf": branches}]
        else:
            s["anyOf"] = branches
        return s

    def deref(self, s, path: tuple, depth: int = 0):
        while isinstance(s, dict) and "$ref" in s and depth < 32:
            s, depth = self.resolve(s["$ref"], path), depth + 1
        return s

    def type_set(self, s) -> set[str]:
        if not isinstance(s, dict):
            return set(ALL_TYPES) if s else set()
        if _listed_values(s) is not None:
            return {_json_type(v) for v in ([s["const"]] if "const" in s else s["enum"])}
        t = s.get("type")
        if t is None:
            return set(ALL_TYPES)
        return {"number" if x == "integer" else x for x in ([t] if isinstance(t, str) else t)}

    def disjoint(self, a, b) -> bool:
        if not self.type_set(a) & self.type_set(b):
            return True
        if isinstance(a, dict) and isinstance(b, dict):
            va, vb = _listed_values(a), _listed_values(b)
            if va is not None and vb is not None:
                return not va & vb
            props_a, props_b = a.get("properties", {}), b.get("properties", {})
            for name in set(a.get("required", [])) & set(b.get("required", [])):
                pa, pb = self.deref(props_a.get(name, True), ()), self.deref(props_b.get(name, True), ())
                if isinstance(pa, dict) and isinstance(pb, dict) and _listed_values(pa) is not None \
                        and _listed_values(pb) is not None and self.disjoint(pa, pb):
                    return True
        return False

    def types(self, s: dict, path: tuple) -> dict:
        t = s.get("type")
        if t is not None:
            declared = [t] if isinstance(t, str) else list(t)
            bad = [x for x in declared if x not in ALL_TYPES + ["integer"]]
            if bad:
                raise ValueError(f"'type' at {_pointer(path)} names unknown types {bad}")
        else:
            declared = None
        groups = [g for g, kws in TYPE_KEYWORDS.items() if kws & s.keys()]
        applicators = APPLICATORS & s.keys()
        if groups and (declared is None or len(declared) > 1):
            if applicators:  # a split would have to merge into the applicators: guidance keeps them apart
                self.guidance(f"{'/'.join(sorted(TYPE_KEYWORDS[groups[0]] & s.keys()))} beside "
                              f"{'/'.join(sorted(applicators))} without a single type", path)
                return s
            return self.split_by_type(s, declared, path)
        if declared is not None and len(declared) == 1:
            return self.typed(s, declared[0], path)
        if applicators - {"anyOf", "$ref"} or (applicators and set(s) - ANNOTATIONS - {"$defs"} - applicators):
            self.guidance("/".join(sorted(applicators)) + " beside other keywords", path)
        elif len(applicators) > 1:
            self.guidance("/".join(sorted(applicators)) + " together", path)
        return s

    def split_by_type(self, s: dict, declared: list | None, path: tuple) -> dict:
        """{"minimum": 0} means: numbers are >= 0, anything else goes; one anyOf branch per type."""
        declared = declared or ALL_TYPES
        keep = {k: v for k, v in s.items() if k in ANNOTATIONS or k == "$defs"}
        branches, plain = [], []
        for t in declared:
            group = TYPE_KEYWORDS.get("number" if t == "integer" else t, set())
            kws = {k: v for k, v in s.items() if k in group}
            if kws:
                branches.append(self.typed({"type": t, **kws}, t, path))
            else:
                plain.append(t)
        if plain:
            branches.append({"type": plain[0] if len(plain) == 1 else plain})
        return {**keep, "anyOf": branches} if len(branches) > 1 else {**keep, **branches[0]}

    def typed(self, s: dict, t: str, path: tuple) -> dict:
        group = TYPE_KEYWORDS.get("number" if t == "integer" else t, set())
        other = set().union(*TYPE_KEYWORDS.values()) - group
        s = {k: v for k, v in s.items() if k not in other}  # keywords of another type never apply
        if set(s) & APPLICATORS:
            self.guidance("/".join(sorted(set(s) & APPLICATORS)) + f" beside 'type': {t!r}", path)
        if t == "string":
            self.string(s, path)
        elif t in ("integer", "number"):
            s = self.number(s, t, path)
        elif t == "array":
            if "maxItems" in s and len(s.get("prefixItems", [])) > s["maxItems"]:
                self.guidance("maxItems below the number of prefixItems", path)
        elif t == "object":
            for key in s.get("patternProperties", {}):
                if not _anchored(key):
                    self.guidance("patternProperties key without ^...$ (JSON Schema searches)", path)
            missing = set(s.get("required", [])) - set(s.get("properties", {}))
            if missing:
                self.guidance(f"required {sorted(missing)} without properties", path)
        return s

    def string(self, s: dict, path: tuple) -> None:
        fmt = s.get("format")
        if fmt is not None and fmt not in XGRAMMAR_FORMATS | GUIDANCE_FORMATS:
            _refuse("format", path, f"format {fmt!r} is not enforced by any backend; enforced formats: "
                    f"{', '.join(sorted(XGRAMMAR_FORMATS | GUIDANCE_FORMATS))}")
        pattern = s.get("pattern")
        if pattern is not None:
            if not isinstance(pattern, str):
                raise ValueError(f"'pattern' at {_pointer(path)} must be a string")
            if _LOOKAROUND.search(pattern):
                _refuse("pattern", path, "look-around and back-references are not supported by any backend")
            if not _anchored(pattern):
                self.guidance("pattern without ^...$ (JSON Schema searches, xgrammar matches whole)", path)
        if sum(bool(s.keys() & g) for g in ({"pattern"}, {"format"}, {"minLength", "maxLength"})) > 1:
            self.guidance("pattern / format / length combined", path)
        elif s.keys() & {"minLength", "maxLength"}:  # xgrammar's length-bounded strings take raw control chars
            self.guidance("minLength / maxLength (xgrammar lets raw control characters into such strings)", path)

    def number(self, s: dict, t: str, path: tuple) -> dict:
        s = dict(s)
        for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
            if k in s and (not isinstance(s[k], (int, float)) or isinstance(s[k], bool) or not math.isfinite(s[k])):
                raise ValueError(f"{k!r} at {_pointer(path)} must be a finite number")
        if t == "integer":  # xgrammar takes integer bounds only; the rounded bound allows the same integers
            if "exclusiveMinimum" in s:
                lo = math.floor(s.pop("exclusiveMinimum")) + 1
                s["minimum"] = max(lo, math.ceil(s.get("minimum", lo)))
            if "exclusiveMaximum" in s:
                hi = math.ceil(s.pop("exclusiveMaximum")) - 1
                s["maximum"] = min(hi, math.floor(s.get("maximum", hi)))
            for k, rnd in (("minimum", math.ceil), ("maximum", math.floor)):
                if k in s:
                    s[k] = int(rnd(s[k]))
            if "minimum" in s and "maximum" in s and s["minimum"] > s["maximum"]:
                raise ValueError(f"no integer at {_pointer(path)} lies between minimum and maximum")
            m = s.get("multipleOf")
            if m is not None and not float(m).is_integer():
                self.guidance("multipleOf that is not an integer", path)
        elif "multipleOf" in s:
            self.guidance("multipleOf on a number", path)
        return s


def normalize_schema(schema) -> NormalizedSchema:
    """The schema in 2020-12 spelling with types made explicit, plus the reasons (if any) it needs guidance.
    Property order is kept as written. Raises ValueError naming a keyword that no backend enforces."""
    if isinstance(schema, str):
        schema = json.loads(schema)
    root = upgrade_draft(copy.deepcopy(schema))
    if root is False:
        raise ValueError("the schema is false: no output can satisfy it")
    norm = _Normalizer(root)
    out = norm.node(root, ())
    return NormalizedSchema(out, norm.reasons)


def canonical_key(schema) -> str:
    """A cache key equal for schemas that differ only in keyword order, but not in property order (which is
    the order the output is written in)."""
    def canon(node, ordered: bool = False):
        if isinstance(node, dict):
            items = [(k, canon(v, k in ("properties", "patternProperties") and isinstance(v, dict)))
                     for k, v in node.items()]
            return ["{ordered}" if ordered else "{}", items if ordered else sorted(items, key=lambda kv: kv[0])]
        if isinstance(node, list):
            return [canon(v) for v in node]
        return node
    return json.dumps(canon(schema), separators=(",", ":"), ensure_ascii=False)
