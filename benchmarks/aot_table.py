"""The AOT table: real presets compiled for TPU slices on this host with `posttrain-jax compile`.

Each row is compiled in its own subprocess (one at a time: an 8B step takes
minutes and ~10 GB of host RAM), appended as one JSON line to `--out`, and the
whole run is printed as a Markdown table. Rows:

- llama3.1-8b SFT, seq 8192, 2 sequences per chip, v5p-16 (target <= 40 GiB per chip)
- llama3.1-8b SFT, seq 4096, 2 sequences per chip, v6e-16 (target <= 28 GiB per chip)
- gemma3-1b SFT, seq 4096, 1 sequence, one v5e chip (a Colab TPU; bfloat16 params and moments)
- llama3.1-8b QLoRA SFT (r=16, nf4 base), seq 2048, 1 sequence, one v5e chip (issue 11: a Colab TPU)
- the same three full fine-tunes with only embedding + LM head + loss (forward and backward; target < 1 GiB temporaries)
- llama3.1-8b SFT on v5p-16 with 2 layers: compile time of 32 layers vs 2 (target <= 1.3x)

    .venv/bin/python benchmarks/aot_table.py                         # every row
    .venv/bin/python benchmarks/aot_table.py --rows llama8b-v5p16 --set model.remat=full
    .venv/bin/python benchmarks/aot_table.py --quick                 # tiny presets: checks the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GiB = 1024**3

LLAMA = {"model.preset": "llama3.1-8b", "model.dtype": "bfloat16", "model.param_dtype": "float32"}
GEMMA = {"model.preset": "gemma3-1b", "model.dtype": "bfloat16", "model.param_dtype": "bfloat16"}
ROWS = {
    "llama8b-v5p16": dict(topology="v5p-16", per_chip_batch=2, target_gib=40,
                          config={**LLAMA, "data.seq_len": 8192}),
    "llama8b-v6e16": dict(topology="v6e-16", per_chip_batch=2, target_gib=28,
                          config={**LLAMA, "data.seq_len": 4096}),
    "gemma1b-v5e1": dict(topology="v5e-1", per_chip_batch=1, target_gib=16,
                         config={**GEMMA, "data.seq_len": 4096}),
    "llama8b-qlora-v5e1": dict(topology="v5e-1", per_chip_batch=1, target_gib=16,
                               config={**LLAMA, "data.seq_len": 2048, "model.remat": "full", "lora.enabled": True,
                                       "lora.rank": 16, "lora.quantize_base": "nf4"}),
    "llama8b-v5p16-head": dict(topology="v5p-16", per_chip_batch=2, target_gib=1, loss_head_only=True,
                               config={**LLAMA, "data.seq_len": 8192}),
    "llama8b-v6e16-head": dict(topology="v6e-16", per_chip_batch=2, target_gib=1, loss_head_only=True,
                               config={**LLAMA, "data.seq_len": 4096}),
    "gemma1b-v5e1-head": dict(topology="v5e-1", per_chip_batch=1, target_gib=1, loss_head_only=True,
                              config={**GEMMA, "data.seq_len": 4096}),
    "llama8b-v5p16-2layers": dict(topology="v5p-16", per_chip_batch=2, num_layers=2,
                                  config={**LLAMA, "data.seq_len": 8192}),
}
QUICK = {"tiny-v5e4": dict(topology="v5e-4", per_chip_batch=2, target_gib=1,
                           config={"model.preset": "tiny-llama", "model.dtype": "bfloat16", "data.seq_len": 256}),
         "tiny-v5e4-head": dict(topology="v5e-4", per_chip_batch=2, target_gib=1, loss_head_only=True,
                                config={"model.preset": "tiny-llama", "model.dtype": "bfloat16", "data.seq_len": 256}),
         "tiny-v5e4-1layer": dict(topology="v5e-4", per_chip_batch=2, num_layers=1,
                                  config={"model.preset": "tiny-llama", "model.dtype": "bfloat16",
                                          "data.seq_len": 256})}


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def worker(spec: dict) -> dict:
    """In a fresh process: build the trainer's config with the row's overrides and compile it."""
    from posttrain_jax.aot.topology import prepare_environment
    prepare_environment()
    from posttrain_jax.aot.command import compile_step
    from posttrain_jax.config import apply_overrides
    from posttrain_jax.trainers import sft
    config = apply_overrides(sft.default_config(), [f"--config.{k}={v}" for k, v in spec["config"].items()])
    report = compile_step(config, "sft", spec["topology"], per_chip_batch=spec["per_chip_batch"],
                          num_layers=spec.get("num_layers"), loss_head_only=spec.get("loss_head_only", False))
    return report


def run_row(name: str, spec: dict, extra: dict) -> dict:
    spec = {**spec, "config": {**spec["config"], **extra}}
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)
    started = time.time()
    proc = subprocess.run(["nice", "-n", "10", sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        return {"row": name, "error": tail, "wall_s": time.time() - started, **spec}
    return {"row": name, **json.loads(lines[-1]), "target_gib": spec.get("target_gib"), "overrides": spec["config"],
            "wall_s": time.time() - started}


def markdown(results: list[dict]) -> str:
    out = ["| row | topology | seq x per chip | remat | args GiB | temps GiB | total GiB | HBM GiB | target | fits "
           "| model TFLOP/chip/step | compile s |", "|" + "---|" * 12]
    for r in results:
        if "error" in r:
            out.append(f"| {r['row']} | {r.get('topology', '')} | | | | | | | | error: {r['error'][-120:]} | | |")
            continue
        target = r.get("target_gib")
        measured = r["temp_bytes"] if r["part"] == "loss_head" else r["total_bytes"]
        met = "" if target is None else ("yes" if measured <= target * GiB else "no")
        out.append(
            f"| {r['row']} | {r['topology']} | {r['seq_len']} x {r['per_chip_batch']} | {r['remat']} | "
            f"{r['argument_bytes'] / GiB:.2f} | {r['temp_bytes'] / GiB:.2f} | {r['total_bytes'] / GiB:.2f} | "
            f"{r['hbm_bytes'] / GiB:.2f} | {'' if target is None else f'<= {target} ({met})'} | "
            f"{'yes' if r['fits'] else 'NO'} | {r['model_flops_per_step'] / r['chips'] / 1e12:.1f} | {r['compile_s']:.0f} |")
    by_row = {r["row"]: r for r in results if "error" not in r}
    for deep, shallow in (("llama8b-v5p16", "llama8b-v5p16-2layers"), ("tiny-v5e4", "tiny-v5e4-1layer")):
        if deep in by_row and shallow in by_row:
            a, b = by_row[deep], by_row[shallow]
            out.append(f"\ncompile time {a['num_layers']} vs {b['num_layers']} layers: {a['compile_s']:.0f} s vs "
                       f"{b['compile_s']:.0f} s = {a['compile_s'] / b['compile_s']:.2f}x (target <= 1.3x)")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="*", default=None, help=f"subset of {', '.join(ROWS)}")
    parser.add_argument("--quick", action="store_true", help="tiny presets only (checks the script)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every row, e.g. model.remat=full train.loss_chunk_size=1024")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "aot.jsonl"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    table = QUICK if args.quick else ROWS
    names = args.rows or list(table)
    extra = dict(item.split("=", 1) for item in args.set)
    run = {"commit": _git("rev-parse", "--short", "HEAD"), "subject": _git("log", "-1", "--format=%s"),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    results = []
    for name in names:
        result = {**run, **run_row(name, table[name], extra)}
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.out:
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")
    print("\n" + markdown(results))


if __name__ == "__main__":
    main()
