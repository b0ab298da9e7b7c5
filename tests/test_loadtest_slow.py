"""The load test at a reduced size, on the real SmolLM2 served by `softprompt serve` in a subprocess: every answer
equal to its offline one, no errors, RSS flat after warm-up: no growth past the working set's early peak
(benchmarks/loadtest.py's own pass criteria)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_reduced_load_test_passes(tmp_path):
    out = tmp_path / "loadtest.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loadtest.py"), "--requests", "240",
                           "--clients", "16", "--tasks", "8", "--distinct", "40", "--warmup", "60",
                           "--out", str(out)], capture_output=True, text=True, timeout=1500, cwd=ROOT)
    result = json.loads(out.read_text()) if out.exists() else {}
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert result["passed"] and result["errors"] == 0 and result["mismatches"] == 0
    assert result["requests"] == 240
