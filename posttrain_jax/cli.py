"""`posttrain-jax <command>`: one entry point for every job.

    posttrain-jax sft [--config FILE] [--config.key=value ...] [--resume]
    posttrain-jax rm  [--config FILE] ...        reward model (Bradley-Terry)
    posttrain-jax dpo [--config FILE] ...        DPO, IPO, hinge, dpo_norm, SimPO (+ NLL term)
    posttrain-jax grpo [--config FILE] ...       GRPO / DAPO / Dr. GRPO on verifiable or model rewards
    posttrain-jax rl --config.rl.algorithm=ppo|grpo|rloo|reinforce_pp|gspo ...   RL from swappable pieces
    posttrain-jax rejection-sample [--config FILE] ...   best of K samples -> SFT-ready JSONL (Llama 3)
    posttrain-jax eval [--config FILE] ...       held-out greedy accuracy, pass@k, maj@k, rewards, win rate A vs B
    posttrain-jax distill [--config FILE] ...    KD / GKD from a frozen teacher: forward/reverse KL, generalised JSD
    posttrain-jax pipeline [--config FILE] ...   Llama 3's rounds: RM -> rejection sampling -> SFT -> DPO -> average -> eval
    posttrain-jax sample --checkpoint RUN_OR_HF_DIR --prompt "..." [--greedy] [--max-new-tokens N]
    posttrain-jax score --checkpoint RM --tokenizer T --input in.jsonl --output out.jsonl
    posttrain-jax average --checkpoints A B C [--weights ...] --out D
    posttrain-jax export --checkpoint D --out HF_DIR [--peft]
    posttrain-jax ablate [--config configs/tulu3/loss_ablation.py] [--fast]   # Tülu 3 loss-aggregation grid
    posttrain-jax compile {sft,rm,dpo,grpo} --topology v5p-16 [--config FILE] [--per-chip-batch N] ...
                                                 # AOT-compile the train step for a TPU slice: bytes per chip

Without --config a trainer runs its embedded default (the CPU quickstart).
"""

from __future__ import annotations

import argparse
import logging
import sys


_MODULES = {"sft": "posttrain_jax.trainers.sft", "rm": "posttrain_jax.trainers.rm",
            "dpo": "posttrain_jax.trainers.dpo", "grpo": "posttrain_jax.trainers.grpo",
            "rl": "posttrain_jax.trainers.rl",
            "rejection-sample": "posttrain_jax.trainers.rejection", "ablate": "posttrain_jax.ablation",
            "eval": "posttrain_jax.eval.command", "distill": "posttrain_jax.trainers.distill",
            "pipeline": "posttrain_jax.trainers.pipeline"}


def _trainer(name: str):
    import importlib
    return importlib.import_module(_MODULES[name])


def _run_trainer(name: str, argv: list[str]) -> None:
    from posttrain_jax.config import apply_overrides, check_keys, load_config
    from posttrain_jax.mesh import initialize_distributed

    parser = argparse.ArgumentParser(prog=f"posttrain-jax {name}")
    parser.add_argument("--config", default=None, help="config file with get_config(); default: the quickstart")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--coordinator", help="multi-process: address:port of process 0 (not needed on Cloud TPU "
                        "VMs, where every host of the slice is found automatically)")
    parser.add_argument("--num-processes", type=int, help="multi-process: number of processes (one per host)")
    parser.add_argument("--process-id", type=int, help="multi-process: this process's index, 0 .. N-1")
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (config overrides look like --config.key=value)")
    # Explicit flags, JAX_COORDINATOR_ADDRESS, or a multi-host Cloud TPU slice; a single host starts nothing.
    if initialize_distributed(args.coordinator, args.num_processes, args.process_id):
        import jax
        if jax.process_index() != 0:  # one log for the run: process 0's (the others only warn)
            logging.getLogger().setLevel(logging.WARNING)
    module = _trainer(name)
    defaults = module.default_config()
    config = load_config(args.config) if args.config else defaults
    check_keys(config, defaults)
    config = apply_overrides(config, rest)
    module.main(config, resume=args.resume)


def _average(argv: list[str]) -> None:
    from posttrain_jax.checkpointing import average_checkpoints
    parser = argparse.ArgumentParser(prog="posttrain-jax average",
                                     description="Weighted mean of the params of N checkpoints (Llama 3 §4.1.5).")
    parser.add_argument("--checkpoints", nargs="+", required=True, help="checkpoint step directories")
    parser.add_argument("--weights", nargs="+", type=float, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    average_checkpoints(args.checkpoints, args.out, weights=args.weights)
    print(f"averaged {len(args.checkpoints)} checkpoints into {args.out}")


def _export(argv: list[str]) -> None:
    from posttrain_jax.trainers.export import export_checkpoint
    parser = argparse.ArgumentParser(prog="posttrain-jax export",
                                     description="Write a run checkpoint as a Hugging Face model directory.")
    parser.add_argument("--checkpoint", required=True, help="a run directory or one of its checkpoint steps")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: as trained)")
    parser.add_argument("--ema", action="store_true", help="export the EMA params instead of the live ones")
    parser.add_argument("--peft", action="store_true",
                        help="a LoRA run: write its adapters as a PEFT adapter directory (default: merged weights)")
    args = parser.parse_args(argv)
    export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, ema=args.ema, peft=args.peft)
    print(f"wrote a {'PEFT adapter' if args.peft else 'Hugging Face checkpoint'} to {args.out}")


def _score(argv: list[str]) -> None:
    from posttrain_jax.trainers.rm import score_main
    parser = argparse.ArgumentParser(prog="posttrain-jax score",
                                     description="Score prompt/response pairs with a trained reward model.")
    parser.add_argument("--checkpoint", required=True, help="an RM run directory or checkpoint step")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--input", required=True, help='JSONL rows {"prompt": ..., "response": ...}')
    parser.add_argument("--output", required=True, help="the rows with a 'reward' field added")
    parser.add_argument("--chat-template", default="auto",
                        help="auto (the tokenizer's own template), a built-in name, or a .jinja file")
    args = parser.parse_args(argv)
    score_main(args.checkpoint, args.tokenizer, args.input, args.output, args.chat_template)
    print(f"wrote rewards to {args.output}")


def _sample(argv: list[str]) -> None:
    from posttrain_jax.sampling.command import main as sample_main
    sample_main(argv)


def _ablate(argv: list[str]) -> None:
    import os
    import sys as _sys
    # The gradient part compares splits over 8 devices: on a CPU host, make 8 (before jax starts).
    if "jax" not in _sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
            from posttrain_jax.cpu_devices import host_device_flags
            os.environ["XLA_FLAGS"] = host_device_flags(8, os.environ.get("XLA_FLAGS", ""))
    # --fast: the small grid CI runs (see ablation.apply_fast).
    _run_trainer("ablate", ["--config.fast=True" if a == "--fast" else a for a in argv])


def _compile(argv: list[str]) -> None:
    from posttrain_jax.aot.command import main as compile_main
    compile_main(argv)


COMMANDS = {"sft": lambda argv: _run_trainer("sft", argv), "rm": lambda argv: _run_trainer("rm", argv),
            "dpo": lambda argv: _run_trainer("dpo", argv), "grpo": lambda argv: _run_trainer("grpo", argv),
            "rl": lambda argv: _run_trainer("rl", argv),
            "rejection-sample": lambda argv: _run_trainer("rejection-sample", argv), "sample": _sample,
            "eval": lambda argv: _run_trainer("eval", argv), "distill": lambda argv: _run_trainer("distill", argv),
            "pipeline": lambda argv: _run_trainer("pipeline", argv),
            "score": _score, "average": _average, "export": _export, "ablate": _ablate,
            "compile": _compile}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "jax" not in sys.modules:  # XLA reads its flags once, when the first backend starts
        import os
        from posttrain_jax.cpu_devices import default_cpu_flags
        os.environ["XLA_FLAGS"] = default_cpu_flags(os.environ.get("XLA_FLAGS", ""))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Orbax logs every save phase at INFO through absl; keep ours, quiet theirs.
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        print(f"\ncommands: {', '.join(COMMANDS)}")
        sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
