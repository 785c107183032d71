"""`posttrain-jax compile`: train steps compiled for TPU slices on this CPU host (libtpu, compile-only devices)."""

import os
import re
import subprocess
import sys

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # before libtpu loads: other test processes may hold it
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

from posttrain_jax.aot.command import advice, compile_step  # noqa: E402
from posttrain_jax.aot.topology import GiB, parse_topology  # noqa: E402

libtpu = pytest.importorskip("libtpu", reason="needs the tpu-compile extra (libtpu)")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_topology_names():
    cases = {"v5p-16": ("v5:2x2x2", 8), "v5p-8": ("v5:2x2x1", 4), "v6e-16": ("v6e:4x4", 16), "v6e-8": ("v6e:2x4", 8),
             "v5e-4": ("v5e:2x2", 4), "v5e-1": ("v5e:1x1", 1), "v4-32": ("v4:2x2x4", 16), "v5p:2x2x4": ("v5:2x2x4", 16)}
    for name, (libtpu_name, chips) in cases.items():
        t = parse_topology(name)
        assert (t.libtpu_name, t.chips) == (libtpu_name, chips), name
    assert parse_topology("v6e-16").chip.hbm_bytes == int(31.25 * GiB)
    with pytest.raises(ValueError, match="unknown --topology 'tpu7-8'"):
        parse_topology("tpu7-8")
    with pytest.raises(ValueError, match="multiple of 2"):
        parse_topology("v5p-3")


def _compile(*args, **kwargs):
    # conftest asks for "highest" matmul precision (fp32 passes) for parity tests; the splash kernel's
    # bf16 dots compile only at the default precision, which is what a training run uses.
    import jax
    with jax.default_matmul_precision("default"):
        return compile_step(*args, **kwargs)


def _config(trainer, **train):
    from posttrain_jax.cli import _trainer
    config = _trainer(trainer).default_config()
    config.model.checkpoint = ""
    config.model.preset = "tiny-llama"
    config.model.dtype = "bfloat16"
    for key, value in train.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


@pytest.mark.parametrize("trainer", ["sft", "rm", "dpo", "grpo"])
def test_every_trainer_compiles_for_a_slice(trainer):
    # sft with train.accum_steps=2 crashes libtpu 0.0.42.1 since scanned layers landed (RET_CHECK in
    # while_loop_all_reduce_code_motion.cc: the accumulation scan around the layer scan); rm covers accumulation.
    overrides = {"grpo": {"grpo__beta": 0.04, "grpo__num_minibatches": 2}, "rm": {"train__accum_steps": 2},
                 "dpo": {"data__seq_len": 64}}.get(trainer, {})
    config = _config(trainer, **overrides)
    if trainer != "sft":  # sft compiles the splash kernel (attention=auto on TPU); the others the quicker xla path
        config.model.attention = "xla"
    report = _compile(config, trainer, "v5e-4", per_chip_batch=2, keep_hlo=True)
    assert report["chips"] == 4 and report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert report["rows"] == 2 * 4 * report["accum_steps"]
    assert 0 < report["total_bytes"] < GiB and report["fits"]
    # Arguments hold at least this chip's quarter of params + 2 Adam moments (float32).
    assert report["argument_bytes"] >= 3 * 4 * report["params"] / 4
    assert report["flops_per_chip"] > 0 and report["compile_s"] > 0
    if trainer != "sft":
        return
    hlo = report["hlo"]
    # Weight gradients leave each chip reduce-scattered (FSDP), and the [vocab, hidden] embedding table
    # (tiny-llama: 512 x 64, untied) is never gathered whole, nor is its gradient reduced whole.
    assert "reduce-scatter" in hlo
    table = re.compile(r"(all-gather|all-reduce|reduce-scatter)[-a-z]*\(.*\b(f32|bf16)\[512,64\]")
    whole = [line.strip()[:200] for line in hlo.splitlines()
             if re.search(r"= \S*\[512,64\]\S* (all-gather|all-reduce)", line) or table.search(line)]
    assert not whole, whole


def test_qlora_sft_compiles_with_the_adapters_as_the_state():
    """The LoRA step as the trainers run it: adapters (+ moments) in the donated state, the nf4 base apart."""
    config = _config("sft", lora__enabled=True, lora__rank=4, lora__quantize_base="nf4", model__attention="xla")
    report = _compile(config, "sft", "v5e-4", per_chip_batch=2)
    assert report["lora"] == {"rank": 4, "quantize_base": "nf4"} and report["fits"]
    full = _compile(_config("sft", model__attention="xla"), "sft", "v5e-4", per_chip_batch=2)
    # Params: the base's (quantization scales not counted) + the adapters'.
    assert report["params"] == full["params"] + report["trainable_params"]
    assert report["trainable_params"] < 0.1 * full["params"]
    # No AdamW moments of the base and 4-bit projections: well under the full step's arguments.
    assert report["argument_bytes"] < 0.5 * full["argument_bytes"]


def test_cli_reports_and_fails_with_advice(tmp_path):
    """Full (xla) attention scores of 64 x 4096-token rows cannot fit one v5e chip: exit 1 and one line of advice."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)
    out = tmp_path / "report.jsonl"
    proc = subprocess.run([sys.executable, "-m", "posttrain_jax.cli", "compile", "sft", "--topology", "v5e-1",
                           "--config.model.preset=tiny-llama", "--config.model.attention=xla",
                           "--config.data.seq_len=4096", "--per-chip-batch=64",
                           f"--json={out}"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "of 16.00 GiB HBM" in proc.stdout and "DOES NOT FIT" in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("sft step does not fit v5e-1: ") and "lower --per-chip-batch (now 64" in last, last
    assert out.read_text().count("\n") == 1


def test_advice_names_the_larger_part():
    report = {"trainer": "sft", "topology": "v5p-16", "total_bytes": 60 * GiB, "hbm_bytes": 40 * GiB,
              "temp_bytes": 10 * GiB, "argument_bytes": 45 * GiB, "per_chip_batch": 2, "remat": "full",
              "mesh": {"data": 1, "fsdp": 8, "tensor": 1}}
    line = advice(report)
    assert "\n" not in line and line.index("mesh.fsdp=8") < line.index("--per-chip-batch")


@pytest.mark.slow
def test_llama8b_sft_on_v5p16():
    config = _config("sft")
    config.model.preset = "llama3.1-8b"
    config.model.remat = "full"
    config.data.seq_len = 4096
    report = _compile(config, "sft", "v5p-16", per_chip_batch=2)
    assert report["params"] > 8e9 and report["fits"], report
