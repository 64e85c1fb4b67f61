"""Run a probe in a fresh interpreter: a long pytest process keeps freed heap memory, which hides
page faults and the growth of the resident memory that some tests measure."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_probe(code: str, *args: str, timeout: float = 300) -> dict:
    """``python -c code args...`` with the checkout importable; returns the JSON object the probe
    prints on its last line of standard output."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])
