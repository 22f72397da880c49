"""Whether request bodies are valid by openapi.yaml: reads a JSON array of [method, path, body]
on stdin, writes a JSON array of error strings (null: valid) to stdout. tests/openapi.rs
compares these verdicts with the server's answers, so the spec and the server cannot drift
apart on the cases the contract fuzzing once found."""

import json
import sys

import jsonschema
import yaml

spec = yaml.safe_load(open(sys.argv[1]))


def follow(node):
    while "$ref" in node and len(node) == 1 and node["$ref"].startswith("#/components/requestBodies/"):
        node = spec["components"]["requestBodies"][node["$ref"].rsplit("/", 1)[1]]
    return node


out = []
for method, path, body in json.load(sys.stdin):
    op = spec["paths"][path][method.lower()]
    schema = follow(op["requestBody"])["content"]["application/json"]["schema"]
    # The whole components section travels with the schema so its local $refs resolve.
    root = dict(schema, components=spec["components"])
    errors = sorted(jsonschema.Draft202012Validator(root).iter_errors(body), key=str)
    out.append(errors[0].message if errors else None)
json.dump(out, sys.stdout)
