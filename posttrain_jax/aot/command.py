"""`posttrain-jax compile TRAINER --topology v5p-16 [--config FILE] [--config.key=value ...]`.

Compiles the trainer's configured train step for a TPU slice on this host
(libtpu's compiler, compile-only devices: no TPU, no jax.distributed, no
parameters, no data) and prints what one chip needs: bytes of arguments
(params, optimizer state, batch), outputs, temporaries and their total against
the chip's HBM, FLOPs per step and the compile time. Exits 1 with a one-line
message naming what to change when the step does not fit. MaxText's
`train_compile.py` is the model for this.

An enabled `lora` section compiles the LoRA / QLoRA step the trainers run: the
adapters (and their optimizer state) as the train state, the frozen base
(quantized with `lora.quantize_base`) as a separate, non-donated argument.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

from posttrain_jax.aot.topology import GiB, compile_devices, parse_topology, prepare_environment

TRAINERS = ("sft", "rm", "dpo", "grpo")


def compile_step(config, trainer: str, topology_name: str, *, per_chip_batch: int | None = None,
                 num_layers: int | None = None, loss_head_only: bool = False, keep_hlo: bool = False) -> dict:
    """Compile `trainer`'s train step under `config` for `topology_name`; returns the report (a dict).

    num_layers: override the model's depth (compile time vs depth). loss_head_only:
    compile only the gradient of the objective of a model with no layers
    (embedding lookup, final norm, LM head and loss, forward and backward), whose
    temporaries are what the head and loss cost. Raises ValueError for a config
    that cannot be laid out on the slice (mesh sizes, divisibility) and
    RuntimeError when libtpu is missing.
    """
    import jax

    from posttrain_jax.aot.plans import PLANS
    from posttrain_jax.mesh import make_mesh
    from posttrain_jax.sharding import batch_sharding, logical_rules
    from posttrain_jax.models.lora_runs import lora_config_of
    from posttrain_jax.train import make_grad_fn, make_train_step, optimizer_from_config
    from posttrain_jax.train import abstract_lora_train_state, abstract_train_state, jit_train_step

    topology = parse_topology(topology_name)
    devices = compile_devices(topology)
    shape = dict(config.mesh)
    num_devices = int(shape.pop("num_devices", 0) or 0)  # a mesh over the slice's first devices only
    mesh = make_mesh(shape, devices=devices[:num_devices] if num_devices else devices)
    rules = _rules(config)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    plan = PLANS[trainer](config, shards, per_chip_batch)
    if loss_head_only:
        num_layers = 0
    if num_layers is not None:
        layer_types = plan.model.layer_types[:num_layers] if plan.model.layer_types else ()
        plan.model = plan.model.replace(num_layers=num_layers, layer_types=layer_types)
    t = config.train
    tx, schedule = optimizer_from_config(config.optim, max(int(t.steps or 0), 1))
    section = config.get("lora")
    lora = lora_config_of(section) if section is not None and section.enabled else None
    base = None
    if lora is None:
        graphdef, state = abstract_train_state(plan.model, tx, mesh, rules, ema=plan.ema)
    elif loss_head_only:
        raise ValueError("loss_head_only compiles a model with no layers, so LoRA has nothing to adapt; "
                         "compile the head without the lora section")
    else:
        graphdef, state, base = abstract_lora_train_state(plan.model, tx, lora, mesh, rules, ema=plan.ema)
    step = make_train_step(graphdef, tx, plan.objective, plan.denominator, accum_steps=plan.accum_steps,
                           data_shards=shards, ema_decay=(t.get("ema_decay") or None) if plan.ema else None,
                           schedule=schedule, dropout=lora is not None and lora.dropout > 0)
    batch_shardings = {k: batch_sharding(mesh, rules, v.ndim) for k, v in plan.batch.items()}
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k]) for k, v in plan.batch.items()}
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    if loss_head_only:
        grads = make_grad_fn(graphdef, plan.objective, plan.denominator, accum_steps=plan.accum_steps,
                             data_shards=shards)
        jitted = jax.jit(grads, in_shardings=(state_shardings.params, batch_shardings),
                         out_shardings=(state_shardings.params, None))
        arguments = (state.params, batch)
    else:  # as the trainers jit it (a LoRA base: its own argument, not donated)
        jitted = jit_train_step(step, state, batch_shardings, base=base)
        arguments = (state, batch)
    started = time.perf_counter()
    compiled = error = None
    # The abstract mesh, not jax.set_mesh: trace-time constants (ensure_compile_time_eval, e.g. the splash
    # kernel's block tables) are computed eagerly, which compile-only devices cannot do.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), logical_rules(rules):
        lowered = jitted.lower(*arguments)
        lowered_at = time.perf_counter()
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 - libtpu reports an over-budget program as a compile error
            error = _out_of_memory(e)
            if error is None:
                raise
    finished = time.perf_counter()
    if compiled is not None:
        memory = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        sizes = dict(argument=memory.argument_size_in_bytes, output=memory.output_size_in_bytes,
                     alias=memory.alias_size_in_bytes, temp=memory.temp_size_in_bytes,
                     code=memory.generated_code_size_in_bytes)
        flops = float(cost.get("flops", 0.0))
    else:  # the compiler stopped at the HBM check: its own figure for temporaries, ours for the arguments
        outputs = _bytes_per_chip(arguments[0])  # the new state (aliased to the donated one), or the gradients
        sizes = dict(argument=_bytes_per_chip((arguments, base)), output=outputs, alias=0 if loss_head_only else outputs,
                     temp=error[0], code=0)
        flops = 0.0
    total = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
    report = {
        "trainer": trainer, "part": "loss_head" if loss_head_only else "step", "topology": topology.name,
        "libtpu_topology": topology.libtpu_name,
        "chips": topology.chips, "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "model": config.model.hf_path or config.model.checkpoint or config.model.preset,
        "num_layers": plan.model.num_layers, "dtype": plan.model.dtype, "param_dtype": plan.model.param_dtype,
        "remat": plan.model.remat, "rows": plan.rows, "seq_len": plan.seq_len, "accum_steps": plan.accum_steps,
        "per_chip_batch": plan.rows // (shards * plan.accum_steps),
        "params": int(sum(x.size for x in jax.tree.leaves((state.params, _weights(base))))),
        "trainable_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "lora": None if lora is None else {"rank": lora.rank, "quantize_base": lora.quantize_base},
        "argument_bytes": int(sizes["argument"]), "output_bytes": int(sizes["output"]),
        "alias_bytes": int(sizes["alias"]), "temp_bytes": int(sizes["temp"]), "code_bytes": int(sizes["code"]),
        "total_bytes": int(total), "hbm_bytes": topology.chip.hbm_bytes,
        "fits": compiled is not None and total <= topology.chip.hbm_bytes,
        "compiler_error": None if error is None else error[1],
        "flops_per_chip": flops, "flops_per_step": flops * topology.chips,
        "model_flops_per_step": plan.model.flops_per_token(plan.seq_len) * plan.rows * plan.seq_len,
        "step_time_lower_bound_s": (plan.model.flops_per_token(plan.seq_len) * plan.rows * plan.seq_len
                                    / topology.chips / topology.chip.peak_bf16_flops),
        "lower_s": lowered_at - started, "compile_s": finished - lowered_at,
    }
    if keep_hlo:
        report["hlo"] = compiled.as_text()
    return report


_OOM = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\)")


def _out_of_memory(error: Exception) -> tuple[int, str] | None:
    """(bytes of temporaries the compiler asked for, its message) when `error` is libtpu's HBM check, else None."""
    message = str(error)
    match = _OOM.search(message) if "RESOURCE_EXHAUSTED" in message else None
    if match is None:
        return None
    scale = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[match.group(2)]
    return int(float(match.group(1)) * scale), message.strip().splitlines()[0]


def _weights(base):
    """A LoRA base without its quantization scales (their elements are not parameters of the model)."""
    if base is None:
        return None
    from flax import nnx

    from posttrain_jax.models.lora import QuantScale
    return nnx.filter_state(base, nnx.Not(QuantScale))


def _bytes_per_chip(tree) -> int:
    """Bytes one chip holds of a pytree of ShapeDtypeStructs with shardings (the first device's shards)."""
    import jax
    import numpy as np
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def _rules(config):
    from posttrain_jax.sharding import DEFAULT_RULES, normalize_rules
    return normalize_rules(tuple(tuple(r) for r in config.sharding_rules)) + DEFAULT_RULES


def format_report(r: dict) -> str:
    gib = lambda b: f"{b / GiB:7.2f} GiB"  # noqa: E731
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [
        f"{r['trainer']} step of {r['model']} ({r['params'] / 1e9:.2f}B params, {r['num_layers']} layers, "
        f"{r['dtype']} compute, remat={r['remat']}{_lora_text(r)}) on {r['topology']} ({r['chips']} chips, {r['libtpu_topology']}; "
        f"mesh {mesh})",
        f"batch: {r['rows']} rows x {r['seq_len']} tokens per step = {r['per_chip_batch']} per chip"
        + (f" x {r['accum_steps']} accumulation steps" if r["accum_steps"] > 1 else ""),
        f"per chip:  arguments {gib(r['argument_bytes'])}   outputs {gib(r['output_bytes'])} "
        f"(aliased {gib(r['alias_bytes']).strip()})   temporaries {gib(r['temp_bytes'])}",
        f"           total     {gib(r['total_bytes'])}   of {r['hbm_bytes'] / GiB:.2f} GiB HBM "
        f"({100 * r['total_bytes'] / r['hbm_bytes']:.0f}%): {'fits' if r['fits'] else 'DOES NOT FIT'}",
        f"FLOPs per step: {r['model_flops_per_step']:.3e} (model: 6 x params x tokens + attention; "
        f"{r['model_flops_per_step'] / r['chips']:.3e} per chip, >= {r['step_time_lower_bound_s'] * 1e3:.0f} ms "
        f"per step at peak bf16); XLA's cost analysis: {r['flops_per_chip']:.3e} per chip (it counts a scanned "
        f"loop body once and no Pallas kernel)",
        f"compile: {r['compile_s']:.1f} s (+ {r['lower_s']:.1f} s tracing and lowering)",
    ]
    if r.get("compiler_error"):
        lines[4] = f"the compiler stopped at its HBM check: {r['compiler_error']}"
    return "\n".join(lines)


def _lora_text(r: dict) -> str:
    lora = r.get("lora")
    if not lora:
        return ""
    base = "" if lora["quantize_base"] == "none" else f", {lora['quantize_base']} base"
    return f"; LoRA r={lora['rank']}{base}: {r['trainable_params']:,} params trained"


def advice(r: dict) -> str:
    """One line: by how much the step misses, and the knobs that move the larger part."""
    over = (r["total_bytes"] - r["hbm_bytes"]) / GiB
    temp, args = r["temp_bytes"] / GiB, (r["argument_bytes"]) / GiB
    head = (f"{r['trainer']} step does not fit {r['topology']}: {r['total_bytes'] / GiB:.1f} GiB per chip > "
            f"{r['hbm_bytes'] / GiB:.2f} GiB HBM ({over:.1f} GiB over; temporaries {temp:.1f}, arguments {args:.1f})")
    activations = (f"lower --per-chip-batch (now {r['per_chip_batch']}; raise train.accum_steps to keep the global "
                   f"batch), or a stronger --config.model.remat (now {r['remat']})")
    state = (f"shard the state over more chips (mesh.fsdp={r['mesh']['fsdp']}: a larger slice or fewer "
             f"data/tensor replicas) or bfloat16 params (--config.model.param_dtype=bfloat16)")
    return f"{head}: {activations if temp >= args else state}; else {state if temp >= args else activations}"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="posttrain-jax compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("trainer", choices=TRAINERS)
    parser.add_argument("--topology", required=True, help="a TPU slice, e.g. v5p-16, v6e-16, v5e-4, v5p:2x2x4")
    parser.add_argument("--config", default=None, help="the trainer's config file (default: its quickstart)")
    parser.add_argument("--per-chip-batch", type=int, default=None,
                        help="rows per chip per micro-batch (default: the trainer's global batch / data shards)")
    parser.add_argument("--json", default=None, help="append the report as one JSON line to this file")
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (config overrides look like --config.key=value)")
    prepare_environment()
    from posttrain_jax.cli import _trainer
    from posttrain_jax.config import apply_overrides, check_keys, load_config
    module = _trainer(args.trainer)
    defaults = module.default_config()
    config = load_config(args.config) if args.config else defaults
    check_keys(config, defaults)
    config = apply_overrides(config, rest)
    try:
        report = compile_step(config, args.trainer, args.topology, per_chip_batch=args.per_chip_batch)
    except (ValueError, RuntimeError) as error:
        sys.exit(f"posttrain-jax compile: {error}")
    print(format_report(report))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(report) + "\n")
    if not report["fits"]:
        sys.exit(advice(report))
