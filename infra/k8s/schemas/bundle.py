#!/usr/bin/env python3
"""Writes the committed Kubernetes schemas (deployment-apps-v1.json,
poddisruptionbudget-policy-v1.json) as standalone files: the strict schema of one kind from
the PyPI package kubernetes-validate, with only the definitions it references, inlined under
`$defs`. Re-run after bumping the package (README.md in this folder says how)."""
import json
import pathlib
import sys

import kubernetes_validate

VERSION = "v1.37.0"
KINDS = ["deployment-apps-v1", "poddisruptionbudget-policy-v1"]
PREFIX = "/api/_definitions.json#/$defs/"

src = pathlib.Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"{VERSION}-local-strict"
out_dir = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent)
defs = json.loads((src / "_definitions.json").read_text())["$defs"]


def rewrite(node, wanted):
    """Points each $ref (file-relative in the kind's schema, local in _definitions.json) at
    the bundle's own $defs and collects the names."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith((PREFIX, "#/$defs/")):
            name = ref.split("#/$defs/", 1)[1]
            wanted.add(name)
            node["$ref"] = "#/$defs/" + name
        for v in node.values():
            rewrite(v, wanted)
    elif isinstance(node, list):
        for v in node:
            rewrite(v, wanted)


for kind in KINDS:
    schema = json.loads((src / f"{kind}.json").read_text())
    wanted, done, bundled = set(), set(), {}
    rewrite(schema, wanted)
    while wanted - done:
        name = sorted(wanted - done)[0]
        done.add(name)
        d = json.loads(json.dumps(defs[name]))
        rewrite(d, wanted)
        bundled[name] = d
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$defs"] = dict(sorted(bundled.items()))
    (out_dir / f"{kind}.json").write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    print(f"{kind}.json: {len(bundled)} definitions")
