"""Decode throughput: posttrain_jax's jitted sampler next to transformers' `generate`.

One run exports one set of random "bench-small" weights to a Hugging Face
directory, starts one long-lived subprocess per variant (its own interpreter,
threads and peak RSS) that loads those weights, compiles / warms up, and then
waits for orders. The driver then asks every variant in turn for one timed
round, `--rounds` times (A B C A B C ...), so load from other processes on the
machine hits every variant alike. Variants:

    jax-fp32           Sampler.generate_padded, greedy, fp32 params and compute
    jax-bf16           the same with params cast to bfloat16 and bfloat16 compute
    jax-fp32-sample    temperature 1.0 sampling (optional)
    torch-fp32         LlamaForCausalLM.generate, sdpa, DynamicCache, greedy
    torch-fp32-static  the same with cache_implementation="static"
    torch-bf16         model.to(torch.bfloat16)
    torch-fp32-sample  do_sample=True, temperature 1.0 (optional)
    bandwidth          memory read bandwidth (1 GiB sum), for the roofline

A round of a model variant times one prefill-only call (1 new token) and one
full call (batch x `--new-tokens`, no early stop); tokens/s = batch x new
tokens / wall time of the full call. Output: JSON lines on stdout, appended
to `--out`: one `decode` record per variant (medians and every round), one
`memory_bandwidth` record and one `decode_summary` (ratios, roofline, greedy
agreement of the two fp32 implementations, load averages).

    .venv/bin/python benchmarks/decode.py                      # bench-small, 8 x (64 + 128), 5 rounds
    .venv/bin/python benchmarks/decode.py --variants jax-fp32,torch-fp32 --rounds 3
    .venv/bin/python benchmarks/decode.py --quick --preset tiny-llama --batch 2 --prompt-len 8 --new-tokens 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from posttrain_jax.cpu_devices import host_device_flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from sft_step import emit, max_rss_mib

VARIANTS = ("jax-fp32", "jax-fp32-tp2", "jax-bf16", "jax-fp32-sample", "torch-fp32", "torch-fp32-static", "torch-bf16",
            "torch-fp32-sample")
DEFAULT_VARIANTS = "jax-fp32,jax-fp32-tp2,torch-fp32,torch-fp32-static,jax-bf16,torch-bf16"
FRAMEWORKS = {"jax": "posttrain_jax", "torch": "transformers"}
TARGET = 1.4  # the issue's goal: ours >= 1.4x transformers' tokens/s (fp32, DynamicCache)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="bench-small", help="posttrain_jax.models preset (default bench-small)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128, help="generated per row, always all of them")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per variant (default 5; 1 with --quick)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of: {', '.join(VARIANTS)}")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--bandwidth-mib", type=int, default=None, help="array summed to measure bandwidth "
                   "(default 1024; 64 with --quick)")
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the JAX subprocesses")
    p.add_argument("--out", default=os.path.join(HERE, "results", "decode.jsonl"), help="JSONL file to append to")
    p.add_argument("--parallel-setup", action="store_true", help="start (load, compile) the model variants all "
                   "at once: faster, but their setup times then overlap (timed rounds are always one at a time)")
    p.add_argument("--quick", action="store_true", help="smoke test: one round, small bandwidth array, parallel setup")
    p.add_argument("--worker", choices=(*VARIANTS, "bandwidth"), help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    args.parallel_setup = args.parallel_setup or args.quick
    if args.bandwidth_mib is None:
        args.bandwidth_mib = 64 if args.quick else 1024
    return args


def weight_bytes(config, itemsize: int) -> dict:
    """Bytes of all weights, and of those a decode step reads (the embedding table is only gathered from)."""
    total = config.num_params() * itemsize
    embed = config.vocab_size * config.hidden_size * itemsize
    read = total - (0 if config.tie_embeddings else embed)
    return {"weight_bytes": total, "weight_bytes_read_per_step": read}


def kv_bytes_per_step(config, batch: int, slots: int, itemsize: int) -> int:
    """K and V of every layer over `slots` cache slots (ours attends over the whole preallocated cache)."""
    return 2 * config.num_layers * batch * slots * config.num_kv_heads * config.head_dim * itemsize


# ------------------------------------------------------------------ workers (run in subprocesses)

def worker_export(args) -> dict:
    """Random weights (seed 0) written as a transformers directory, and the prompts, shared by every variant."""
    import jax

    from posttrain_jax.models import create_model, export_hf, preset
    config = preset(args.preset)
    # With a (one-device) mesh the init is one jitted program: much faster than eager op-by-op init.
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
    export_hf(create_model(config, mesh=mesh, seed=0), args.data_dir, dtype="float32")
    rng = np.random.default_rng(0)
    # Ids above the special tokens (0..2), so no prompt contains an EOS.
    np.save(os.path.join(args.data_dir, "prompts.npy"),
            rng.integers(3, config.vocab_size, size=(args.batch, args.prompt_len), dtype=np.int32))
    byte_counts = {}
    for dtype, itemsize in (("fp32", 4), ("bf16", 2)):
        byte_counts[dtype] = {**weight_bytes(config, itemsize), "kv_bytes_per_step_full_cache": kv_bytes_per_step(
            config, args.batch, args.prompt_len + args.new_tokens, itemsize)}
    return {"num_params": config.num_params(), "bytes": byte_counts}


class JaxRunner:
    """Our Sampler on the exported weights; one Sampler (program + donated cache) per call shape.

    Each program is called twice before timing (the compile, then one warm call); the rounds
    then reuse the donated cache the program hands back.
    """

    def __init__(self, args, variant: str):
        import jax
        from flax import nnx

        from posttrain_jax.models import load_hf
        from posttrain_jax.sampling import Sampler, SamplingParams
        self.jax = jax
        dtype = "bfloat16" if "bf16" in variant else "float32"
        # tp2: the CPU as two devices with heads, MLP and vocab split over `tensor` (XLA runs one thread per
        # device, and a single small-batch matmul uses one core): both cores, as torch's 2 threads do.
        mesh = None
        if variant.endswith("-tp2"):
            from posttrain_jax.mesh import make_mesh
            mesh = make_mesh({"tensor": 2}, devices=jax.devices()[:2])
        model = load_hf(args.data_dir, dtype=dtype, compute_dtype=dtype, mesh=mesh)
        self.graphdef, self.state = nnx.split(model)
        self.samplers = {name: Sampler(self.graphdef, model.config, mesh=mesh) for name in ("prefill", "full")}
        self.prompts = np.load(os.path.join(args.data_dir, "prompts.npy"))
        self.mask = np.ones_like(self.prompts)
        sampling = {"greedy": True} if "sample" not in variant else {"temperature": 1.0}
        self.full = SamplingParams(max_new_tokens=args.new_tokens, **sampling)
        self.prefill_only = SamplingParams(max_new_tokens=1, **sampling)
        self.calls = 0
        start = time.perf_counter()
        for _ in range(2):  # compile, then a warm call
            self.prefill()
            self.generate()
        self.info = {"framework": FRAMEWORKS["jax"], "version": f"jax {jax.__version__}", "dtype": dtype,
                     "compile_and_first_call_s": time.perf_counter() - start,
                     "xla_flags": os.environ.get("XLA_FLAGS", ""), "compilations": self.compilations()}

    def compilations(self) -> int:
        return sum(s.compilations() for s in self.samplers.values())

    def _run(self, which: str, params):
        self.calls += 1  # a fresh key per call, as a sampling loop would pass
        out = self.samplers[which].generate_padded(self.state, self.prompts, self.mask, params,
                                                   self.jax.random.key(self.calls))
        return self.jax.block_until_ready(out).tokens

    def prefill(self):
        return self._run("prefill", self.prefill_only)

    def generate(self):
        return np.asarray(self._run("full", self.full))


class TorchRunner:
    """transformers' generate on the exported weights (sdpa attention, KV cache on)."""

    def __init__(self, args, variant: str):
        import torch
        import transformers
        self.torch = torch
        torch.set_num_threads(args.threads)
        dtype = torch.bfloat16 if "bf16" in variant else torch.float32
        model = transformers.AutoModelForCausalLM.from_pretrained(args.data_dir, attn_implementation="sdpa",
                                                                  dtype=torch.float32)
        self.model = model.to(dtype).eval()
        notes = []
        kw = {"do_sample": False} if "sample" not in variant else {"do_sample": True, "temperature": 1.0,
                                                                       "top_k": 0, "top_p": 1.0}
        if variant.endswith("static"):
            kw["cache_implementation"] = "static"
            # transformers 5.23: for a config with `layer_types`, generate() builds a dict of masks for the
            # static cache that LlamaModel.forward cannot take ('dict' object has no attribute 'ndim').
            # All layers are full attention here, which is also what Llama does without the attribute.
            if hasattr(self.model.config, "layer_types") and set(self.model.config.layer_types) == {"full_attention"}:
                del self.model.config.layer_types
                notes.append("deleted config.layer_types (all full attention) to work around transformers' "
                             "static-cache mask bug for Llama")
        self.prompts = torch.from_numpy(np.load(os.path.join(args.data_dir, "prompts.npy"))).long()
        self.common = {"attention_mask": torch.ones_like(self.prompts), "use_cache": True, "pad_token_id": 0, **kw}
        self.new_tokens = args.new_tokens
        torch.manual_seed(0)
        start = time.perf_counter()
        self.prefill()
        self.generate()
        self.info = {"framework": FRAMEWORKS["torch"], "dtype": str(dtype).removeprefix("torch."),
                     "version": f"torch {torch.__version__}, transformers {transformers.__version__}",
                     "threads": torch.get_num_threads(), "attn_implementation": "sdpa",
                     "cache_implementation": kw.get("cache_implementation", "dynamic"),
                     "compile_and_first_call_s": time.perf_counter() - start, "notes": notes}

    def _run(self, n):
        with self.torch.inference_mode():
            return self.model.generate(self.prompts, max_new_tokens=n, min_new_tokens=n, **self.common)

    def prefill(self):
        return self._run(1)

    def generate(self):
        return self._run(self.new_tokens)[:, self.prompts.shape[1]:].numpy()


class BandwidthRunner:
    """Read bandwidth: the better of a jitted jnp.sum and numpy's sum over one array (both stream it once).

    Its setup also writes the shared weights and prompts (`worker_export`): one interpreter fewer.
    """

    def __init__(self, args, variant: str):
        import jax
        import jax.numpy as jnp
        n = args.bandwidth_mib * 2**20 // 4
        self.host = np.ones(n, np.float32)
        self.device = jnp.asarray(self.host)
        jitted = jax.jit(jnp.sum)
        jitted(self.device).block_until_ready()
        self.fns = {"jax": lambda: jitted(self.device).block_until_ready(), "numpy": self.host.sum}
        self.info = {"framework": "jax+numpy", "bytes": self.host.nbytes, "model": worker_export(args)}

    def measure(self) -> dict:
        result = {}
        for name, fn in self.fns.items():
            best = min(_timed(fn)[0] for _ in range(3))
            result[name] = self.host.nbytes / best
        return result


def _timed(fn):
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - start, time.process_time() - cpu, out


def serve(args) -> None:
    """A worker: set up, say ready, then answer `round` / `finish` lines from the driver, one JSON line each."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries go to stderr, never into the protocol
    kind = args.worker.split("-")[0]
    runner = {"jax": JaxRunner, "torch": TorchRunner, "bandwidth": BandwidthRunner}[kind](args, args.worker)
    reply.write(json.dumps({"ready": True, **runner.info}) + "\n")
    last_tokens = None
    for line in sys.stdin:
        command = line.strip()
        if command == "round" and kind == "bandwidth":
            reply.write(json.dumps(runner.measure()) + "\n")
        elif command == "round":
            prefill_s, _, _ = _timed(runner.prefill)
            total_s, cpu_s, last_tokens = _timed(runner.generate)
            reply.write(json.dumps({"prefill_s": prefill_s, "total_s": total_s, "cpu_s": cpu_s,
                                    "loadavg_1m": os.getloadavg()[0]}) + "\n")
        elif command == "finish":
            final = {"max_rss_mib": max_rss_mib(), "tokens": None if last_tokens is None else last_tokens.tolist()}
            if hasattr(runner, "compilations"):  # no recompilation during the timed rounds
                final["compilations_end"] = runner.compilations()
            reply.write(json.dumps(final) + "\n")
            return
        else:
            raise SystemExit(f"decode.py worker {args.worker}: unknown command {command!r}")


# ------------------------------------------------------------------ driver

class Worker:
    """One long-lived worker subprocess, spoken to over stdin/stdout."""

    def __init__(self, variant: str, argv: list[str], args, data_dir: str):
        env = dict(os.environ)
        if not variant.startswith("torch"):
            flags = " ".join(f for f in (env.get("XLA_FLAGS", ""), args.xla_flags) if f)
            env["XLA_FLAGS"] = (host_device_flags(2, flags) if variant.endswith("-tp2") else flags).strip()
            env.setdefault("JAX_PLATFORMS", "cpu")
        self.variant = variant
        self.cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", variant, "--data-dir", data_dir]
        self.proc = subprocess.Popen(self.cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise SystemExit(f"decode.py: {self.variant} worker exited with code {code} (its stderr is above): "
                             f"{' '.join(self.cmd)}")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            stream.close()
        self.proc.wait(timeout=60)


def variant_record(variant: str, info: dict, rounds: list[dict], final: dict, args) -> dict:
    """Medians and every round of one variant: tokens/s of the whole call and of decode alone."""
    tokens = args.batch * args.new_tokens
    total = [r["total_s"] for r in rounds]
    prefill = [r["prefill_s"] for r in rounds]
    # The decode part: the new tokens after the first one (which prefill produces), over the time after it
    # (prefill is timed in its own call, so on tiny shapes noise can make it longer than the whole call).
    decode_s = [t - p for t, p in zip(total, prefill) if t > p]
    steps = max(args.new_tokens - 1, 1)
    record = {"bench": "decode", "variant": variant, **{k: v for k, v in info.items() if k != "ready"},
              "tokens_per_call": tokens, "tokens_per_s": tokens / statistics.median(total),
              "tokens_per_s_rounds": [round(tokens / t, 2) for t in total],
              "total_s_median": statistics.median(total), "total_s_rounds": [round(t, 4) for t in total],
              "prefill_s_median": statistics.median(prefill), "prefill_s_rounds": [round(p, 4) for p in prefill],
              "decode_tokens_per_s": args.batch * steps / statistics.median(decode_s) if decode_s else None,
              "decode_step_ms": 1000 * statistics.median(decode_s) / steps if decode_s else None,
              "cpu_s_median": statistics.median(r["cpu_s"] for r in rounds),
              "loadavg_1m_rounds": [round(r["loadavg_1m"], 2) for r in rounds], "max_rss_mib": final["max_rss_mib"],
              **({"compilations_end": final["compilations_end"]} if "compilations_end" in final else {})}
    return record


def agreement(a, b) -> dict | None:
    """Greedy tokens of two implementations: the fraction of equal tokens before each row's first difference."""
    if a is None or b is None:
        return None
    same_prefix = []
    for row_a, row_b in zip(a, b):
        n = next((i for i, (x, y) in enumerate(zip(row_a, row_b)) if x != y), len(row_a))
        same_prefix.append(n)
    return {"rows_identical": sum(n == len(a[0]) for n in same_prefix), "rows": len(a),
            "mean_prefix_fraction": sum(same_prefix) / (len(a) * len(a[0])), "first_difference": same_prefix}


def summary(records: dict, tokens: dict, bandwidth: list[dict], model: dict, args, common: dict,
            load: dict) -> dict:
    """Ratios ours / transformers, the memory-bound roofline and how close the fp32 decode gets to it."""
    bw = max(max(b.values()) for b in bandwidth)
    out = {**common, "bench": "decode_summary", "target_ratio": TARGET, "bandwidth_bytes_per_s": bw, **load}
    for name, ref in (("ratio_fp32", "torch-fp32"), ("ratio_fp32_vs_static", "torch-fp32-static"),
                      ("ratio_bf16", "torch-bf16"), ("ratio_sample", "torch-fp32-sample")):
        ours = "jax-bf16" if "bf16" in ref else "jax-fp32-sample" if "sample" in ref else "jax-fp32"
        if ours in records and ref in records:
            out[name] = records[ours]["tokens_per_s"] / records[ref]["tokens_per_s"]
    out["num_params"] = model["num_params"]
    out["tokens_per_s"] = {v: r["tokens_per_s"] for v, r in records.items()}
    out["decode_tokens_per_s"] = {v: r["decode_tokens_per_s"] for v, r in records.items()}
    for dtype, counts in model["bytes"].items():
        w, kv = counts, counts["kv_bytes_per_step_full_cache"]
        out[f"roofline_{dtype}"] = {
            **counts,
            # The brief's estimate: every weight byte read once per step, batch tokens per step.
            "tokens_per_s_all_weights": args.batch * bw / w["weight_bytes"],
            "tokens_per_s_read_weights": args.batch * bw / w["weight_bytes_read_per_step"],
            "tokens_per_s_read_weights_and_kv": args.batch * bw / (w["weight_bytes_read_per_step"] + kv)}
    if "jax-fp32" in records and records["jax-fp32"]["decode_tokens_per_s"]:
        out["ours_fraction_of_roofline"] = (records["jax-fp32"]["decode_tokens_per_s"]
                                            / out["roofline_fp32"]["tokens_per_s_read_weights_and_kv"])
    out["greedy_agreement"] = {f"{a} vs {b}": agreement(tokens.get(a), tokens.get(b)) for a, b in
                               (("jax-fp32", "torch-fp32"), ("torch-fp32", "torch-fp32-static"),
                                ("jax-bf16", "torch-bf16"), ("jax-fp32", "jax-bf16"))
                               if a in tokens and b in tokens}
    return out


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        serve(args)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"decode.py: unknown --variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    common = {"run": time.strftime("%Y%m%dT%H%M%S"), "host": platform.node(), "cpus": os.cpu_count(),
              "preset": args.preset, "batch": args.batch, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "rounds": args.rounds}
    load = {"loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="decode_bench_") as data_dir:
        workers = {}
        try:
            # One at a time, so no setup (compilation) competes with another; the bandwidth worker
            # comes first because it also writes the weights and prompts every other worker loads.
            for variant in ["bandwidth", *variants]:
                workers[variant] = Worker(variant, argv, args, data_dir)
                if variant == "bandwidth" or not args.parallel_setup:
                    workers[variant].info = workers[variant].read()
            for variant in variants:
                if args.parallel_setup:
                    workers[variant].info = workers[variant].read()
            rounds = {v: [] for v in workers}
            for index in range(args.rounds):  # interleaved: bandwidth A B C, bandwidth A B C, ...
                for variant, worker in workers.items():
                    rounds[variant].append(worker.ask("round"))
                    if "total_s" in rounds[variant][-1]:  # progress, off the JSON stream
                        print(f"decode.py: round {index + 1}/{args.rounds} {variant}: "
                              f"{args.batch * args.new_tokens / rounds[variant][-1]['total_s']:.1f} tokens/s",
                              file=sys.stderr, flush=True)
            finals = {v: w.ask("finish") for v, w in workers.items()}
        finally:
            for worker in workers.values():
                if worker.proc.poll() is None:
                    worker.proc.kill()
                    worker.proc.wait()
    load["loadavg_end"] = os.getloadavg()
    model = workers["bandwidth"].info["model"]
    bandwidth = rounds.pop("bandwidth")
    emit({**common, "bench": "memory_bandwidth", "framework": "jax+numpy",
          "bytes": workers["bandwidth"].info["bytes"], "bytes_per_s_rounds": bandwidth,
          "bytes_per_s_best": max(max(b.values()) for b in bandwidth)}, args.out)
    records, tokens = {}, {}
    for variant in variants:
        records[variant] = variant_record(variant, workers[variant].info, rounds[variant], finals[variant], args)
        tokens[variant] = finals[variant]["tokens"]
        emit({**common, **records[variant]}, args.out)
    emit(summary(records, tokens, bandwidth, model, args, common, load), args.out)


if __name__ == "__main__":
    main()
