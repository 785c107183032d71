"""Full fine-tuning vs LoRA vs QLoRA SFT steps: posttrain_jax next to PyTorch + PEFT, in one run.

Each (framework, method) runs in its own fresh subprocess (no shared cores or RSS
high-water mark) and reports one JSON line: tokens/s of the median step, peak RSS,
the optimizer state's bytes (AdamW moments of what is trained), trained and total
parameter counts, and for JAX the compiled step's memory analysis. Methods:

- `full`: every weight trained (the `sft_step.py` step);
- `lora`: rank `--rank` adapters on attention q/k/v/o and MLP gate/up/down, base frozen;
- `qlora`: the same with the frozen base in NF4 (ours: qwix, dequantized on the fly;
  PyTorch: bitsandbytes 4-bit, which needs CUDA; reported as unavailable otherwise).

A summary line gives LoRA's optimizer state as a fraction of full fine-tuning's and
ours / PEFT tokens/s per method.

    .venv/bin/python benchmarks/lora_sft.py                         # bench-small, 8 x 512, r=16
    .venv/bin/python benchmarks/lora_sft.py --preset gemma3-270m    # the real Gemma 3 270M shape (random weights)
    .venv/bin/python benchmarks/lora_sft.py --quick --preset tiny-llama --batch 2 --seq-len 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import sft_step  # noqa: E402  (the shared batch, timing and RSS helpers)
from posttrain_jax.cpu_devices import default_cpu_flags  # noqa: E402

METHODS = ("full", "lora", "qlora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="bench-small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 6; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2; 1 with --quick)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--frameworks", default="jax,torch")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join(HERE, "results", "lora_sft.jsonl"))
    p.add_argument("--quick", action="store_true", help="smoke test: few steps")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 6)
    args.warmup = args.warmup or (1 if args.quick else 2)
    args.threads = args.threads or os.cpu_count() or 1
    return args


def _nbytes(tree) -> int:
    import jax
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def worker_jax(args, method: str) -> dict:
    import jax
    from posttrain_jax.mesh import make_mesh
    from posttrain_jax.models import create_model, preset
    from posttrain_jax.models.lora import LoraConfig, apply_lora
    from posttrain_jax.sharding import DEFAULT_RULES, batch_sharding, logical_rules, shard_batch
    from posttrain_jax.train import frozen_state, init_train_state, jit_train_step, make_optimizer, make_train_step
    from posttrain_jax.train import trainable_split
    from posttrain_jax.trainers.sft_objective import make_sft_denominator, make_sft_objective

    mesh, rules = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}), DEFAULT_RULES
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    config = preset(args.preset)
    model = create_model(config, mesh=mesh, rules=rules, seed=0)
    if method != "full":
        apply_lora(model, LoraConfig(rank=args.rank, alpha=2.0 * args.rank,
                                     quantize_base="nf4" if method == "qlora" else "none"), mesh=mesh, rules=rules)
    trainable, frozen, _ = trainable_split(model)
    tx, schedule = make_optimizer(learning_rate=1e-4, total_steps=1000, warmup_ratio=0.05, max_grad_norm=1.0)
    graphdef, state = init_train_state(model, tx, seed=0, mesh=mesh, trainable=trainable)
    assert (frozen is None) == (method == "full") and (frozen_state(model, trainable) is None) == (frozen is None)
    del model
    step = make_train_step(graphdef, tx, make_sft_objective("token_mean", data_shards=shards),
                           make_sft_denominator("token_mean", data_shards=shards), data_shards=shards,
                           schedule=schedule)
    step_fn = jit_train_step(step, state, batch_sharding(mesh, rules), base=frozen)
    with jax.set_mesh(mesh), logical_rules(rules):
        batch = shard_batch(sft_step.synthetic_batch(config.vocab_size, args.batch, args.seq_len), mesh, rules)
        start = time.perf_counter()
        lowered = step_fn.lower(state, batch)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        holder = {"state": state}
        del state

        def run_step():
            # Through the jit (it compiled once more in the warm-up steps), not `compiled`: an AOT executable
            # expects default layouts, and a QLoRA base's int4 arrays carry a packed (sub-byte) one on CPU.
            holder["state"], metrics = step_fn(holder["state"], batch)
            return float(jax.block_until_ready(metrics)["loss"])

        times, cpu_times, losses = sft_step.timed_steps(run_step, args.steps, args.warmup)
    state = holder["state"]
    record = {"framework": "posttrain_jax", "method": method, "version": f"jax {jax.__version__}",
              "compile_s": compile_s, "trained_params": sum(x.size for x in jax.tree.leaves(state.params)),
              "total_params": config.num_params(), "optimizer_state_bytes": _nbytes(state.opt_state),
              "frozen_bytes": _nbytes(frozen) if frozen is not None else 0, "trained_bytes": _nbytes(state.params),
              **sft_step.throughput(args, times, cpu_times), "loss_first": losses[0], "loss_last": losses[-1],
              "max_rss_mib": sft_step.max_rss_mib()}
    analysis = compiled.memory_analysis()
    if analysis is not None:
        fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
        mem = {f.replace("_size_in_bytes", "_mib"): getattr(analysis, f, 0) / 2**20 for f in fields}
        mem["total_mib"] = mem["argument_mib"] + mem["output_mib"] - mem["alias_mib"] + mem["temp_mib"]
        record["xla_memory"] = mem
    return record


def worker_torch(args, method: str) -> dict:
    import torch
    import transformers
    from posttrain_jax.models import preset, to_hf_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = preset(args.preset)
    hf = to_hf_config(config)
    hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    if method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return {"framework": "pytorch+peft", "method": method, "unavailable": "bitsandbytes is not installed "
                    "(its 4-bit layers need CUDA); QLoRA has no PyTorch baseline on this machine"}
        if not torch.cuda.is_available():
            return {"framework": "pytorch+peft", "method": method,
                    "unavailable": "bitsandbytes 4-bit needs a CUDA device"}
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)
    if method != "full":
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                           target_modules=TARGETS, lora_dropout=0.0))
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    run_step = sft_step.torch_sft_step(model, opt, trained,
                                       sft_step.synthetic_batch(config.vocab_size, args.batch, args.seq_len))
    times, cpu_times, losses = sft_step.timed_steps(run_step, args.steps, args.warmup)
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                      if torch.is_tensor(t) and t.dim() > 0)
    return {"framework": "pytorch+peft" if method != "full" else "pytorch", "method": method,
            "version": f"torch {torch.__version__}, transformers {transformers.__version__}",
            "trained_params": sum(p.numel() for p in trained), "total_params": sum(p.numel() for p in
                                                                                   model.parameters()),
            "optimizer_state_bytes": state_bytes, **sft_step.throughput(args, times, cpu_times),
            "loss_first": losses[0], "loss_last": losses[-1], "max_rss_mib": sft_step.max_rss_mib()}


def run_worker(args, framework: str, method: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{framework}:{method}", "--result-file",
           result_file, "--preset", args.preset, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
           "--rank", str(args.rank), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    if framework == "jax":  # the XLA:CPU defaults every posttrain-jax command sets
        env["XLA_FLAGS"] = default_cpu_flags(env.get("XLA_FLAGS", ""))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0 and framework == "jax":  # our own failures are never hidden
        os.unlink(result_file)
        raise RuntimeError(f"{framework}:{method} worker failed:\n{proc.stderr[-4000:]}")
    if proc.returncode != 0:  # the peer's: recorded, e.g. PyTorch killed for memory at Gemma's 8 x 512
        os.unlink(result_file)
        why = "killed (SIGKILL: the kernel's OOM killer?)" if proc.returncode == -9 else proc.stderr[-2000:]
        print(f"{framework}:{method} worker failed with exit code {proc.returncode}", file=sys.stderr)
        name = "pytorch" if method == "full" else "pytorch+peft"
        return {"framework": name, "method": method,
                "error": f"exit code {proc.returncode}: {why}"}
    with open(result_file) as f:
        record = json.load(f)
    os.unlink(result_file)
    return record


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        framework, method = args.worker.split(":")
        record = (worker_jax if framework == "jax" else worker_torch)(args, method)
        with open(args.result_file, "w") as f:
            json.dump(record, f)
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    common = {"preset": args.preset, "batch": args.batch, "seq_len": args.seq_len, "rank": args.rank,
              "quick": args.quick, "loadavg_start": os.getloadavg()[0]}
    records = {}
    with open(args.out, "a") as out:
        def emit(row):
            line = json.dumps({**common, **row})
            print(line, flush=True)
            out.write(line + "\n")

        for method in args.methods.split(","):
            for framework in args.frameworks.split(","):
                record = run_worker(args, framework, method)
                records[(framework, method)] = record
                emit({"bench": "lora_sft_step", **record})
        summary = {"bench": "lora_sft_summary"}
        full = records.get(("jax", "full"))
        for method in ("lora", "qlora"):
            ours = records.get(("jax", method))
            if ours and full and "tokens_per_s" in ours and "tokens_per_s" in full:
                summary[f"{method}_optimizer_state_fraction_of_full"] = (ours["optimizer_state_bytes"]
                                                                         / full["optimizer_state_bytes"])
                summary[f"{method}_step_speed_vs_full"] = ours["tokens_per_s"] / full["tokens_per_s"]
        for method in args.methods.split(","):
            ours, theirs = records.get(("jax", method)), records.get(("torch", method))
            if ours and theirs and "tokens_per_s" in ours and "tokens_per_s" in theirs:
                summary[f"{method}_tokens_per_s_vs_pytorch"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
                summary[f"{method}_peak_rss_vs_pytorch"] = ours["max_rss_mib"] / theirs["max_rss_mib"]
        summary["loadavg_end"] = os.getloadavg()[0]
        summary["median_note"] = "single round; rerun on an idle machine for comparable timings"
        emit(summary)


if __name__ == "__main__":
    main()
