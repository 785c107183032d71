"""End-to-end RL step: rollout tokens/s, train tokens/s, step time and the share of it spent generating.

Variants, each the real `posttrain-jax rl` loop (`posttrain_jax.rl.loop.run`) for `--steps`
steps on the same synthetic arithmetic prompts (prompts x samples as in the GRPO quickstart):

- `grpo`: on-policy GRPO (one update per rollout);
- `grpo-offpolicy`: GRPO with `rl.max_staleness=1` and truncated IS (cap 2);
- `ppo`: PPO with a critic from the policy's weights (GAE, 1 epoch x 1 minibatch, KL in the reward).

The model is a preset with random weights (`--preset quickstart` or `bench-small`) and the reward
a format check that a random model sometimes earns (a digit in the completion), so advantages are
non-zero and every update runs. The first step (compilation) is left out; the medians of the
others are reported, one JSON line per variant:

    .venv/bin/python benchmarks/rl_step.py                        # quickstart + bench-small, 4 steps
    .venv/bin/python benchmarks/rl_step.py --quick --preset tiny-llama --prompts 2 --group 2 --new-tokens 4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {
    "grpo": ["--config.rl.algorithm=grpo"],
    "grpo-offpolicy": ["--config.rl.algorithm=grpo", "--config.rl.max_staleness=1", "--config.rl.tis_cap=2.0"],
    "ppo": ["--config.rl.algorithm=ppo", "--config.rl.num_epochs=1"],
}


def _config(args, workdir: Path, preset: str, variant: str, tokenizer: str, prompts: str):
    from posttrain_jax.config import apply_overrides
    from posttrain_jax.trainers import rl

    return apply_overrides(rl.default_config(), [
        f"--config.output_dir={workdir / f'{preset}-{variant}'}", "--config.data.quickstart_task=False",
        f"--config.data.path={prompts}", "--config.data.eval_path=", f"--config.tokenizer={tokenizer}",
        "--config.model.checkpoint=", f"--config.model.preset={preset}", f"--config.rl.prompts_per_step={args.prompts}",
        f"--config.rl.group_size={args.group}", f"--config.sampling.max_new_tokens={args.new_tokens}",
        f"--config.train.steps={args.steps}", "--config.train.log_every=1", "--config.train.async_checkpoint=False",
        "--config.rewards=[{'name': 'format', 'pattern': '[0-9]', 'mode': 'search'}]", *VARIANTS[variant]])


def run_variant(args, workdir: Path, preset: str, variant: str, tokenizer: str, prompts: str) -> dict:
    from posttrain_jax.trainers import rl

    started = time.time()
    summary = rl.main(_config(args, workdir, preset, variant, tokenizer, prompts))
    timed = summary["history"][1:] or summary["history"]

    def median(key):
        return statistics.median(float(r[f"train/{key}"]) for r in timed)

    rollout, train = median("rollout_time_s"), median("train_time_s")
    return {"bench": "rl_step", "preset": preset, "variant": variant, "prompts": args.prompts, "group": args.group,
            "new_tokens": args.new_tokens, "timed_steps": len(timed),
            "rollout_tokens_per_s": median("rollout_tokens_per_s"), "train_tokens_per_s": median("train_tokens_per_s"),
            "step_time_s": rollout + train, "rollout_time_s": rollout, "train_time_s": train,
            "generate_share": rollout / max(rollout + train, 1e-9),
            "completion_length_mean": median("completion_length_mean"), "wall_time_s": time.time() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", help="model preset(s) (default: quickstart, bench-small)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="2 steps (smoke test)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "rl_step.jsonl"))
    args = parser.parse_args()
    if args.quick:
        args.steps = 2
    logging.basicConfig(level=logging.WARNING)
    from posttrain_jax.data import synthetic

    presets = args.preset or ["quickstart", "bench-small"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        tokenizer = str(synthetic.train_sentencepiece(workdir / "tok", synthetic.corpus(seed=0)))
        prompts = workdir / "prompts.jsonl"
        with open(prompts, "w") as f:
            for p in synthetic.generate_problems(max(64, args.prompts * (args.steps + 2)), seed=7, max_operand=19):
                f.write(json.dumps({"prompt": p.question, "answer": str(p.answer)}) + "\n")
        for preset in presets:
            for variant in args.variants.split(","):
                row = run_variant(args, workdir, preset, variant, tokenizer, str(prompts))
                print(json.dumps(row), flush=True)
                rows.append(row)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
