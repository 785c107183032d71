"""The benchmark harness runs and prints its JSON lines (a smoke test: no timing is asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sft_step_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.jsonl"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sft_step.py"), "--quick", "--preset", "tiny-llama", "--batch", "2",
         "--seq-len", "32", "--steps", "2", "--warmup", "1", "--rounds", "1", "--peak-size", "256",
         "--out", str(out)], capture_output=True, text=True, timeout=600,
        env={**os.environ, "XLA_FLAGS": ""})  # the real single CPU device, not the tests' 8 fake ones
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    benches = {(r["bench"], r.get("framework")) for r in rows}
    assert {("matmul_peak", "jax"), ("sft_step", "posttrain_jax"), ("sft_step", "pytorch")} <= benches
    ratio = [r for r in rows if r["bench"] == "sft_step_ratio"][0]
    assert ratio["ours_tokens_per_s"] > 0 and ratio["pytorch_tokens_per_s"] > 0 and "ours_mfu" in ratio
