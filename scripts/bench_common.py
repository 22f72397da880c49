"""What the Python benchmarks share: the red wine quality table that linfa-datasets ships
(found through cargo, so no download, as flowtrain's `--data wine` reads it), the machine's
description, and replacing one section of BENCHMARKS.md."""

import csv
import gzip
import json
import os
import subprocess
import sys

import numpy as np


def wine_quality():
    """(feature names, features [N, 11], quality [N])."""
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    pkg = next(p for p in meta["packages"] if p["name"] == "linfa-datasets")
    path = os.path.join(os.path.dirname(pkg["manifest_path"]), "data", "winequality-red.csv.gz")
    with gzip.open(path, "rt") as f:
        rows = list(csv.reader(f))
    names = rows[0][:-1]
    data = np.array([[float(v) for v in r] for r in rows[1:]])
    return names, data[:, :-1], data[:, -1]


def cpu():
    """'MODEL, N cores' for the report."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        name = "unknown CPU"
    return f"{name}, {os.cpu_count()} cores"


def write_section(path, heading, section):
    """Replaces the section starting at `heading` (up to the next `## `) in the Markdown file
    at `path` with `section`, or appends it."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        text = "# Benchmarks\n\n"
    start = text.find(heading)
    if start < 0:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}", file=sys.stderr)
