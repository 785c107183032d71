"""SFT train-step throughput, MFU and peak memory: posttrain_jax next to PyTorch + transformers.

One run measures, each in its own fresh subprocess so the frameworks never share
the (few) cores or the RSS high-water mark:

1. `matmul_peak`: FLOP/s of a jitted n^3 fp32 matmul, the denominator of MFU;
2. `sft_step` / posttrain_jax: the step exactly as `posttrain_jax.trainers.sft.main`
   builds it (create_model, init_train_state, make_train_step with the SFT
   objective and denominator, jit_train_step), on a synthetic packed-free batch;
3. `sft_step` / pytorch: `LlamaForCausalLM` (sdpa) with the same config, AdamW,
   grad-norm clipping, cross-entropy over every token;
4. `sft_step_ratio`: ours / PyTorch tokens/s (medians over rounds).

Every measurement is one JSON line on stdout, also appended to `--out`.

    .venv/bin/python benchmarks/sft_step.py                      # bench-small, 8 x 512, both frameworks
    .venv/bin/python benchmarks/sft_step.py --rounds 3           # alternate jax/torch 3 times, report medians
    .venv/bin/python benchmarks/sft_step.py --frameworks jax     # ours only (tuning)
    .venv/bin/python benchmarks/sft_step.py --quick --preset tiny-llama --batch 2 --seq-len 32
    .venv/bin/python benchmarks/sft_step.py --real gemma3-270m --batch 4 --seq-len 256   # real weights (bench extra)
    .venv/bin/python benchmarks/sft_step.py --frameworks jax --profile                  # + per-op time shares
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from posttrain_jax.cpu_devices import default_cpu_flags, host_device_flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # real_models, xla_profile
FRAMEWORKS = {"jax": "posttrain_jax", "torch": "pytorch"}

# Extra XLA CPU flags for the JAX subprocess, appended to any XLA_FLAGS already in the environment; the
# worker then gets the defaults every `posttrain-jax` command sets (`cpu_devices.default_cpu_flags`: the
# depth-first scheduler), unless these name that flag (`--xla-flags=--xla_cpu_enable_concurrency_optimized_
# scheduler=true` measures without it). See benchmarks/README.md for what each one buys.
DEFAULT_XLA_FLAGS = ""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="bench-small", help="posttrain_jax.models preset (default bench-small)")
    p.add_argument("--real", choices=("gemma3-270m",), default=None,
                   help="a real pretrained checkpoint instead of --preset: both frameworks load its weights\n"
                        "(needs the bench extra; converted once into benchmarks/.cache/)")
    p.add_argument("--devices", type=int, default=1,
                   help="CPU devices for ours (xla_force_host_platform_device_count), data parallel over them")
    p.add_argument("--profile", action="store_true",
                   help="trace one extra step of ours and add per-op time shares to its record")
    p.add_argument("--batch", type=int, default=8, help="global batch in rows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 8; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after compilation (default 2; 1 --quick)")
    p.add_argument("--rounds", type=int, default=1, help="alternate the frameworks this many times")
    p.add_argument("--frameworks", default="jax,torch", help="comma list of: jax, torch")
    p.add_argument("--peak-size", type=int, default=2048, help="n of the n^3 fp32 matmul that measures peak FLOP/s")
    p.add_argument("--xla-flags", default=DEFAULT_XLA_FLAGS, help="extra XLA_FLAGS for the JAX subprocess")
    p.add_argument("--model-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelConfig field of ours, e.g. scan_layers=false, attention=blocked, remat=dots")
    p.add_argument("--loss-pass", default="auto", help="ours: the SFT objective's LM-head pass (auto, one_pass, recompute)")
    p.add_argument("--accum-steps", type=int, default=1,
                   help="ours: train.accum_steps (gradient accumulation over that many micro-batches in the step)")
    p.add_argument("--torch-micro-batch", type=int, default=None,
                   help="PyTorch: accumulate gradients over micro-batches of this many rows (same step, less\n"
                        "memory; how transformers.Trainer runs a batch that does not fit). Default: the whole batch")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: CPU count)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "sft_step.jsonl"), help="JSONL file to append to")
    p.add_argument("--quick", action="store_true", help="smoke test: few steps, small peak matmul")
    p.add_argument("--worker", choices=("peak", "jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.accum_steps < 1 or (args.torch_micro_batch is not None and args.torch_micro_batch < 1):
        p.error("--accum-steps and --torch-micro-batch must be >= 1")
    if args.steps is None:
        args.steps = 2 if args.quick else 8
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.quick:
        args.peak_size = min(args.peak_size, 512)
    if args.threads is None:
        args.threads = os.cpu_count() or 1
    return args


def synthetic_batch(vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> dict:
    """Unpacked rows, every token trained: the same arrays go to both frameworks."""
    import numpy as np
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, size=(batch, seq_len + 1), dtype=np.int32)
    ones = np.ones((batch, seq_len), np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
            "segment_ids": ones, "loss_mask": ones}


def torch_sft_step(model, opt, trained: list, batch: dict, micro_batch: int | None = None,
                   max_grad_norm: float = 1.0):
    """The PyTorch reference step on `batch` (numpy "tokens"/"targets" [batch, seq_len]): zero the grads,
    next-token cross-entropy (mean over tokens), backward, clip the global norm of `trained` at
    `max_grad_norm`, `opt.step()`. Returns run_step() -> the step's loss (a float, which syncs).

    `micro_batch` rows at a time (gradient accumulation, as `transformers.Trainer` runs a batch that does
    not fit): each micro-batch's mean loss is weighted by its share of the rows (= of the tokens: every row
    has `seq_len` trained tokens) before `backward`, so the accumulated gradient and the returned loss are
    the whole batch's token mean, the same update. Raises ValueError when `micro_batch` does not divide
    the batch."""
    import torch

    tokens = torch.from_numpy(batch["tokens"]).long()
    targets = torch.from_numpy(batch["targets"]).long()
    rows = tokens.shape[0]
    micro = micro_batch or rows
    if rows % micro:
        raise ValueError(f"--torch-micro-batch {micro} does not divide the batch of {rows} rows")

    def run_step():
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for start in range(0, rows, micro):
            logits = model(input_ids=tokens[start:start + micro], use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     targets[start:start + micro].reshape(-1)) * (micro / rows)
            del logits
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(trained, max_grad_norm)
        opt.step()
        return total

    return run_step


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def timed_steps(run_step, steps: int, warmup: int) -> tuple[list[float], list[float], list[float]]:
    """Wall and process-CPU seconds of `steps` steps after `warmup` untimed ones; every loss seen."""
    losses = []
    for _ in range(warmup):
        losses.append(run_step())
    times, cpu_times = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(run_step())  # run_step blocks until the step's results are ready
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return times, cpu_times, losses


def throughput(args, times: list[float], cpu_times: list[float]) -> dict:
    """Tokens/s from the median step; CPU seconds per step (all threads) tell work apart from waiting
    when other processes share the cores."""
    tokens = args.batch * args.seq_len
    median = statistics.median(times)
    return {"tokens_per_step": tokens, "step_time_s_median": median, "step_time_s_min": min(times),
            "step_times_s": [round(t, 4) for t in times], "tokens_per_s": tokens / median,
            "cpu_s_per_step_median": statistics.median(cpu_times)}


# ------------------------------------------------------------------ workers (run in subprocesses)

def worker_peak(args) -> dict:
    import jax
    from posttrain_jax.metrics import measure_matmul_peak
    return {"bench": "matmul_peak", "framework": "jax", "n": args.peak_size, "dtype": "float32",
            "flops_per_s": measure_matmul_peak(args.peak_size), "devices": str(jax.devices())}


def worker_jax(args) -> dict:
    import jax
    from posttrain_jax.mesh import make_mesh
    from posttrain_jax.models import create_model, preset
    from posttrain_jax.sharding import DEFAULT_RULES, batch_sharding, logical_rules, shard_batch
    from posttrain_jax.train import init_train_state, jit_train_step, make_optimizer, make_train_step
    from posttrain_jax.trainers.sft_objective import make_sft_denominator, make_sft_objective

    # Wired as posttrain_jax.trainers.sft.main does it (default mesh, rules, optimizer).
    mesh, rules = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}), DEFAULT_RULES
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    changes = model_overrides(args.model_set)
    if args.real:
        from posttrain_jax.models import load_hf
        from real_models import gemma3_270m_dir
        model = load_hf(gemma3_270m_dir(), mesh=mesh, rules=rules, **changes)
        config = model.config
    else:
        config = dataclasses.replace(preset(args.preset), **changes)
        model = create_model(config, mesh=mesh, rules=rules, seed=0)
    tx, schedule = make_optimizer(learning_rate=1e-4, total_steps=1000, warmup_ratio=0.05, max_grad_norm=1.0)
    graphdef, state = init_train_state(model, tx, seed=0, mesh=mesh)  # as the runner does
    del model
    step = make_train_step(graphdef, tx, make_sft_objective("token_mean", data_shards=shards, loss_pass=args.loss_pass),
                           make_sft_denominator("token_mean", accum_steps=args.accum_steps, data_shards=shards),
                           accum_steps=args.accum_steps, data_shards=shards, schedule=schedule)
    step_fn = jit_train_step(step, state, batch_sharding(mesh, rules))
    with jax.set_mesh(mesh), logical_rules(rules):
        batch = shard_batch(synthetic_batch(config.vocab_size, args.batch, args.seq_len), mesh, rules)
        start = time.perf_counter()
        # The executable jit would build; compiled ahead so its memory analysis can be read.
        compiled = step_fn.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        holder = {"state": state}
        del state

        def run_step():
            holder["state"], metrics = compiled(holder["state"], batch)
            return float(jax.block_until_ready(metrics)["loss"])  # also waits for the new state

        times, cpu_times, losses = timed_steps(run_step, args.steps, args.warmup)
        profile = None
        if args.profile:
            from xla_profile import op_shares
            profile = op_shares(run_step, compiled.as_text())
    jax.block_until_ready(holder["state"])
    record = {"framework": FRAMEWORKS["jax"], "version": f"jax {jax.__version__}", "compile_s": compile_s,
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "accum_steps": args.accum_steps,
              "flops_per_token": config.flops_per_token(args.seq_len),
              "num_params": config.num_params(), **throughput(args, times, cpu_times),
              "loss_first": losses[0], "loss_last": losses[-1], "max_rss_mib": max_rss_mib(),
              "devices": jax.device_count()}
    if profile is not None:
        record["op_profile"] = profile
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - optional on some backends
        analysis = None
    if analysis is not None:
        fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                  "generated_code_size_in_bytes")
        mem = {f.replace("_size_in_bytes", "_mib"): getattr(analysis, f, 0) / 2**20 for f in fields}
        # Donated state aliases the outputs: live = arguments + non-aliased outputs + temporaries.
        mem["total_mib"] = mem["argument_mib"] + mem["output_mib"] - mem["alias_mib"] + mem["temp_mib"]
        record["xla_memory"] = mem
    return record


def model_overrides(assignments: list[str]) -> dict:
    """ModelConfig changes from `--model-set FIELD=VALUE` (values parsed as Python literals when they are
    one, so `false`/`true` are booleans and numbers are numbers)."""
    import ast
    changes = {}
    for item in assignments:
        field, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--model-set {item!r}: expected FIELD=VALUE")
        value = {"true": "True", "false": "False"}.get(value.lower(), value)
        try:
            changes[field] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            changes[field] = value
    return changes


def worker_torch(args) -> dict:
    import torch
    import transformers
    from posttrain_jax.models import preset, to_hf_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.real:
        from posttrain_jax.models import from_hf_config
        from real_models import gemma3_270m_dir
        path = gemma3_270m_dir()
        with open(os.path.join(path, "config.json")) as f:
            config = from_hf_config(json.load(f))
        model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa",
                                                                  dtype=torch.float32)
    else:
        config = preset(args.preset)
        hf = to_hf_config(config)
        hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
        model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa",
                                                              dtype=torch.float32)
    model.train()
    trained = list(model.parameters())
    opt = torch.optim.AdamW(trained, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    run_step = torch_sft_step(model, opt, trained, synthetic_batch(config.vocab_size, args.batch, args.seq_len),
                              args.torch_micro_batch)
    times, cpu_times, losses = timed_steps(run_step, args.steps, args.warmup)
    n = args.peak_size
    a = torch.ones(n, n)
    best = min(_timeit(lambda: a @ a) for _ in range(5))
    return {"framework": FRAMEWORKS["torch"], "version": f"torch {torch.__version__}, transformers "
            f"{transformers.__version__}", "threads": torch.get_num_threads(), "attn_implementation": "sdpa",
            "micro_batch": args.torch_micro_batch or args.batch,
            "flops_per_token": config.flops_per_token(args.seq_len), "num_params": config.num_params(),
            **throughput(args, times, cpu_times), "loss_first": losses[0], "loss_last": losses[-1],
            "max_rss_mib": max_rss_mib(), "torch_matmul_flops_per_s": 2 * n**3 / best}


def _timeit(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------ driver

def run_worker(kind: str, argv: list[str], args) -> dict:
    """Run one worker in a fresh interpreter and return its record."""
    env = dict(os.environ)
    if kind in ("jax", "peak"):
        flags = " ".join(f for f in (env.get("XLA_FLAGS", ""), args.xla_flags) if f)
        if kind == "jax" and args.devices > 1:  # the user's flags first: an explicit scheduler setting wins
            flags = host_device_flags(args.devices, flags)
        env["XLA_FLAGS"] = default_cpu_flags(flags.strip())  # what the CLI runs with
        env.setdefault("JAX_PLATFORMS", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", kind, "--result-file", result]
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{kind} worker failed with exit code {proc.returncode}: {' '.join(cmd)}")
        with open(result) as f:
            return json.load(f)


def emit(record: dict, out_path: str) -> None:
    line = json.dumps(record, sort_keys=False)
    print(line, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "a") as f:
        f.write(line + "\n")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        record = {"peak": worker_peak, "jax": worker_jax, "torch": worker_torch}[args.worker](args)
        with open(args.result_file, "w") as f:
            json.dump(record, f)
        return

    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = set(frameworks) - set(FRAMEWORKS)
    if unknown:
        raise SystemExit(f"unknown --frameworks {sorted(unknown)}; choose from {sorted(FRAMEWORKS)}")
    run_id = time.strftime("%Y%m%dT%H%M%S")
    if args.real:  # convert once, outside the timed workers
        from real_models import gemma3_270m_dir
        gemma3_270m_dir()
    common = {"run": run_id, "host": platform.node(), "cpus": os.cpu_count(), "preset": args.real or args.preset,
              "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
              **({"model_set": args.model_set} if args.model_set else {}),
              **({"loss_pass": args.loss_pass} if args.loss_pass != "auto" else {}),
              **({"torch_micro_batch": args.torch_micro_batch} if args.torch_micro_batch else {}),
              **({"accum_steps": args.accum_steps} if args.accum_steps != 1 else {})}
    peaks, tokens_per_s = [], {f: [] for f in frameworks}
    for round_index in range(args.rounds):
        peak = run_worker("peak", argv, args)
        peaks.append(peak["flops_per_s"])
        emit({**common, "round": round_index, **peak}, args.out)
        for framework in frameworks:
            record = run_worker(framework, argv, args)
            # One peak for both frameworks (the best seen so far): MFU compares like with like.
            record["peak_flops_per_s"] = max(peaks)
            record["mfu"] = record["tokens_per_s"] * record["flops_per_token"] / max(peaks)
            tokens_per_s[framework].append(record["tokens_per_s"])
            flops_per_token = record["flops_per_token"]
            emit({**common, "round": round_index, "bench": "sft_step", **record}, args.out)
    if set(frameworks) == set(FRAMEWORKS):
        ours, theirs = (statistics.median(tokens_per_s[f]) for f in ("jax", "torch"))
        emit({**common, "bench": "sft_step_ratio", "rounds": args.rounds, "ours_tokens_per_s": ours,
              "pytorch_tokens_per_s": theirs, "ratio": ours / theirs, "target": 1.25 if args.real else 1.0,  # issue 10
              "ours_mfu": ours * flops_per_token / max(peaks), "pytorch_mfu": theirs * flops_per_token / max(peaks),
              **physical_limit(args, flops_per_token, max(peaks))}, args.out)


def physical_limit(args, flops_per_token: float, peak_flops_per_s: float) -> dict:
    """The step at the measured matmul peak: model FLOPs per step / peak FLOP/s (no attention kernel,
    softmax or optimizer time; the fused LM head's logit recompute is not counted as model FLOPs)."""
    flops_per_step = flops_per_token * args.batch * args.seq_len
    return {"flops_per_step": flops_per_step, "limit_step_time_s": flops_per_step / peak_flops_per_s,
            "limit_tokens_per_s": peak_flops_per_s / flops_per_token}


if __name__ == "__main__":
    main()
