"""Writes BENCHMARKS.md's "Reliability" section from the logs of scripts/reliability.sh."""

import argparse
import datetime
import os
import re
import sys

sys.path.insert(0, os.path.dirname(__file__))
from bench_common import cpu, write_section  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("logs")
p.add_argument("out")
p.add_argument("--fuzz-cases", type=int, required=True)
p.add_argument("--contract-examples", type=int, required=True)
p.add_argument("--contract-seed", type=int, required=True)
p.add_argument("--soak-seconds", type=float, required=True)
a = p.parse_args()


def log(name):
    with open(os.path.join(a.logs, name + ".log")) as f:
        return f.read()


def elapsed(text):
    m = re.search(r"elapsed: (\d+) s", text)
    return m.group(1) if m else "?"


fuzz = log("fuzz")
# The properties (the reference's own test is not one).
properties = sorted(
    set(re.findall(r"PASS \[.*?\] .*?api::fuzz::(\w+)", fuzz)) - {"the_reference_reads_what_the_wire_documents"}
)
contract = log("contract")
schemathesis = re.search(r"schemathesis \(.*?\): (.*)", contract)
generated = re.search(r"(\d+) generated, (\d+) passed", contract)
soak = log("soak")
soak_lines = re.findall(r"^soak: (.*)$", soak, re.M)
faults = log("faults")
fault_lines = re.findall(r"^faults: (.*)$", faults, re.M)
# The rounds of the shared-batch test, as one line.
rounds = [re.search(r"held (\d+) of the (\d+)", l) for l in fault_lines if l.startswith("round")]
fault_lines = [l for l in fault_lines if not l.startswith("round")]
if rounds:
    held = ", ".join(m.group(1) for m in rounds)
    fault_lines.append(
        f"{len(rounds)} rounds of 36 concurrent requests, one of them marked, with batching on: the marked "
        f"batch held {held} of the {rounds[0].group(2)} encode requests on the faulty model (each failed with "
        "500 naming the model, or was served exactly); the 24 on its other graph and on another model "
        "were served every time, and so was the next batch"
    )
if not (properties and generated and len(soak_lines) == 2 and fault_lines):
    sys.exit("reliability_report: a log lacks its summary; did every test run?")

rows = [
    (
        "Request parsers (src/api/fuzz.rs, proptest)",
        f"{len(properties)} properties × {a.fuzz_cases:,} cases: {', '.join(properties)}",
        "0 panics, 0 disagreements with the serde_json::Value reference, every refusal a 4xx",
        elapsed(fuzz),
    ),
    (
        "API contract (schemathesis 4.32.5 over openapi.yaml, tests/openapi.rs)",
        f"27 operations, seed {a.contract_seed}, {a.contract_examples} examples per operation, every check: "
        f"{generated.group(1)} requests",
        f"{int(generated.group(1)) - int(generated.group(2))} failures",
        elapsed(contract),
    ),
    (
        "Soak (tests/soak.rs)",
        soak_lines[0],
        "0 wrong answers, 0 unexpected statuses; " + soak_lines[1],
        elapsed(soak),
    ),
]
fault_rows = "\n".join(f"- {l}" for l in fault_lines)
table = "\n".join(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in rows)
section = f"""## Reliability

`make reliability` (scripts/reliability.sh; part of `make bench`), {datetime.date.today()},
{cpu()}, release builds. `make test` runs the same checks briefly (256 cases per property,
40 schemathesis examples per operation with seed 1, a 15 s soak). Any failure stops the script
before this section is written, so what is here passed.

| check | what ran | what was lost | wall seconds |
|---|---|---|---|
{table}

The soak's load generator (12 client tasks in the test process) shares the two cores with
the server, so its request rate is a floor, not the server's capacity.

Faults injected (tests/faults.rs), each costing only what it touched:

{fault_rows}
"""
write_section(a.out, "## Reliability", section)
