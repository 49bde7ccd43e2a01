#!/usr/bin/env python3
"""Regenerate tests/data/kuberay/*.schema.json: KubeRay's RayJob and RayService CRDs as plain JSON Schema.

tests/test_kuberay.py validates deploy/kuberay/*.yaml against these files offline (no cluster, no kubectl).
They come from the CRDs of one pinned KubeRay release, read straight out of a git clone of KubeRay
(a bare clone is enough; nothing is checked out):

    git clone --bare https://github.com/ray-project/kuberay /tmp/kuberay.git
    python tools/kuberay_schema.py /tmp/kuberay.git v1.7.0

To move to a newer release, run it with that tag, then update KUBERAY_RELEASE in tests/test_kuberay.py.

The conversion keeps what `kubectl apply` (strict field validation, the default) enforces and JSON Schema can
say: a field the CRD does not list is an error (additionalProperties: false wherever the CRD lists properties
without x-kubernetes-preserve-unknown-fields); types, enums, required fields, patterns, bounds, int32/int64
ranges, nullable, int-or-string, list-type "set". A required field with a default is optional (the API server
fills it in before it validates). It drops what does not validate (descriptions, defaults, list-map keys,
map-type) and the CEL rules (x-kubernetes-validations; in v1.7.0: deletionStrategy's combinations, managedBy's
values, immutable fields), which the manifests here do not touch. It is stricter in one way: a null where the
CRD wants a value is an error here, where the API server silently drops the field. An extension it does not
know stops it. Subschemas that repeat (a pod spec appears three times in a RayJob) are stored once under
$defs, which keeps each file small enough to commit as plain JSON (~80 KB). `--check-samples` validates
KubeRay's own sample RayJobs and RayServices of the same release against the result (v1.7.0: 41, all valid).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml

CRDS = {"rayjob": "ray.io_rayjobs.yaml", "rayservice": "ray.io_rayservices.yaml"}
CRD_DIR = "ray-operator/config/crd/bases"
VERSION = "v1"
DROPPED = {"description", "default", "example", "externalDocs", "x-kubernetes-list-map-keys",
           "x-kubernetes-map-type", "x-kubernetes-validations", "x-kubernetes-embedded-resource"}
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
SHARED_MIN_CHARS = 400  # a repeated subschema at least this long (as JSON) goes to $defs


def convert(node: dict, root: bool = False) -> dict:
    """One CRD (OpenAPI v3, structural) schema node as a JSON Schema node."""
    out: dict = {}
    for key, value in node.items():
        if key in DROPPED or key in ("nullable", "format", "x-kubernetes-int-or-string",
                                     "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type"):
            continue
        if key == "properties":
            out[key] = {name: convert(child) for name, child in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = convert(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [convert(child) for child in value]
        elif key.startswith("x-kubernetes-"):
            raise ValueError(f"unknown CRD extension {key}: teach tools/kuberay_schema.py what it means")
        else:
            out[key] = value
    if "required" in out:  # the API server fills in defaults before it validates: a defaulted field may be absent
        out["required"] = [name for name in out["required"] if "default" not in node["properties"].get(name, {})]
        if not out["required"]:
            del out["required"]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("format") in INT_RANGES and out.get("type") == "integer":
        low, high = INT_RANGES[node["format"]]
        out.setdefault("minimum", low)
        out.setdefault("maximum", high)
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = True
    elif "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False  # kubectl's strict field validation: an unknown field is an error
    if root:
        # the object's metadata is ObjectMeta, checked by the API server itself (the CRD says only "object")
        out["properties"]["metadata"] = {"type": "object", "properties": {
            "name": {"type": "string"}, "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
    return out


def share(schema: dict) -> dict:
    """`schema` with each repeated subschema (as long as SHARED_MIN_CHARS or more) stored once in $defs and
    referenced; names come from the property the subschema first appears under."""
    counts: Counter[str] = Counter()

    def count(node):
        if isinstance(node, dict):
            counts[json.dumps(node, sort_keys=True)] += 1
            for child in node.values():
                count(child)
        elif isinstance(node, list):
            for child in node:
                count(child)

    count(schema)
    defs: dict[str, dict] = {}
    names: dict[str, str] = {}

    def rebuild(node, name: str, top: bool = False):
        if isinstance(node, list):
            return [rebuild(child, name) for child in node]
        if not isinstance(node, dict):
            return node
        key = json.dumps(node, sort_keys=True)
        new = {k: {p: rebuild(c, p) for p, c in v.items()} if k == "properties"
               else rebuild(v, name + {"items": "Item", "additionalProperties": "Value"}.get(k, ""))
               for k, v in node.items()}
        if top or counts[key] < 2 or len(key) < SHARED_MIN_CHARS:
            return new
        if key not in names:
            label, n = name, 2
            while label in defs:
                label, n = f"{name}{n}", n + 1
            names[key], defs[label] = label, new
        return {"$ref": f"#/$defs/{names[key]}"}

    out = rebuild(schema, "root", top=True)
    out["$defs"] = dict(sorted(defs.items()))
    return out


def crd_schema(crd: dict, source: str) -> dict:
    """The JSON Schema of a CRD's served, stored VERSION."""
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == VERSION]
    if not (version.get("served") and version.get("storage")):
        raise ValueError(f"{crd['metadata']['name']}: {VERSION} is not the served, stored version")
    schema = share(convert(version["schema"]["openAPIV3Schema"], root=True))
    kind = crd["spec"]["names"]["kind"]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$comment": f"{kind} {crd['spec']['group']}/{VERSION} from {source}; generated by tools/kuberay_schema.py",
            **schema}


def without_nulls(value):
    """`value` with its null fields dropped, as the API server drops them before it validates."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def check_samples(git_dir: str, commit: str, schemas: dict[str, dict]) -> list[str]:
    """KubeRay's own sample RayJobs and RayServices at `commit` that the schemas reject (none, if the
    conversion is faithful)."""
    import jsonschema

    validators = {name: jsonschema.Draft202012Validator(s) for name, s in schemas.items()}
    problems, seen = [], 0
    for path in git(git_dir, "ls-tree", "-r", "--name-only", commit, "ray-operator/config/samples/").split():
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(git(git_dir, "show", f"{commit}:{path}")):
            kind = doc.get("kind", "").lower() if isinstance(doc, dict) else ""
            if kind in validators and doc.get("apiVersion") == f"ray.io/{VERSION}":
                seen += 1
                problems += [f"{path}: {'.'.join(map(str, e.absolute_path))}: {e.message[:200]}"
                             for e in validators[kind].iter_errors(without_nulls(doc))]
    print(f"samples: {seen} RayJobs and RayServices, {len(problems)} problems")
    return problems


def git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True, text=True).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("git_dir", help="a clone of ray-project/kuberay (its .git directory, or a bare clone)")
    parser.add_argument("ref", help="the release tag to read, e.g. v1.7.0")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests/data/kuberay"),
                        help="folder of the schema files (default: tests/data/kuberay)")
    parser.add_argument("--check-samples", action="store_true",
                        help="also validate the release's sample RayJobs and RayServices (needs jsonschema)")
    args = parser.parse_args(argv)
    commit = git(args.git_dir, "rev-parse", f"{args.ref}^{{commit}}").strip()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    schemas = {}
    for name, crd_file in CRDS.items():
        text = git(args.git_dir, "show", f"{commit}:{CRD_DIR}/{crd_file}")
        crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # the C loader: 1.4 MB fast
        schema = crd_schema(crd, f"ray-project/kuberay {args.ref} ({commit}) {CRD_DIR}/{crd_file}")
        schemas[name] = schema
        path = out / f"{name}.schema.json"
        path.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
        print(f"{path}: {path.stat().st_size / 1024:.0f} KiB, {len(schema['$defs'])} shared subschemas")
    problems = check_samples(args.git_dir, commit, schemas) if args.check_samples else []
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
