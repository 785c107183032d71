"""The benchmark harness runs and prints its JSON lines (a smoke test: no timing is asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_sft_step_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.jsonl"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sft_step.py"), "--quick", "--preset", "tiny-llama", "--batch", "2",
         "--seq-len", "32", "--steps", "2", "--warmup", "1", "--rounds", "1", "--peak-size", "256",
         "--devices", "2", "--profile", "--torch-micro-batch", "1", "--out", str(out)], capture_output=True,
        text=True, timeout=600,
        env={**os.environ, "XLA_FLAGS": ""})  # the real single CPU device, not the tests' 8 fake ones
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    benches = {(r["bench"], r.get("framework")) for r in rows}
    assert {("matmul_peak", "jax"), ("sft_step", "posttrain_jax"), ("sft_step", "pytorch")} <= benches
    ratio = [r for r in rows if r["bench"] == "sft_step_ratio"][0]
    assert ratio["ours_tokens_per_s"] > 0 and ratio["pytorch_tokens_per_s"] > 0 and "ours_mfu" in ratio
    assert ratio["limit_tokens_per_s"] > 0 and ratio["limit_step_time_s"] > 0
    ours = [r for r in rows if r.get("framework") == "posttrain_jax"][0]
    assert ours["devices"] == 2  # one CPU device per core, data parallel
    assert [r for r in rows if r.get("framework") == "pytorch"][0]["micro_batch"] == 1
    profile = ours["op_profile"]
    assert profile["op_time_ms"] > 0 and abs(sum(profile["by_kind"].values()) - 1.0) < 1e-3
    assert profile["by_kind"].get("matmul", 0) > 0 and profile["top_ops"]


def test_torch_micro_batches_take_the_whole_batch_step():
    """The PyTorch peer's gradient accumulation (`--torch-micro-batch`) is the same step as the whole batch:
    equal loss and equal gradients, read as the parameters after one SGD step at learning rate 1."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sft_step import synthetic_batch, torch_sft_step

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    batch = synthetic_batch(96, 4, 16)
    results = []
    for micro in (None, 2, 1):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).train()
        trained = list(model.parameters())
        opt = torch.optim.SGD(trained, lr=1.0)  # the update is the gradient itself
        # no clipping: a clip at norm 1 would hide a gradient scaled by a constant
        loss = torch_sft_step(model, opt, trained, batch, micro, max_grad_norm=float("inf"))()
        results.append((loss, torch.cat([p.detach().flatten() for p in trained])))
    for loss, params in results[1:]:
        assert abs(loss - results[0][0]) < 1e-5
        assert torch.max(torch.abs(params - results[0][1])).item() < 1e-6
    with pytest.raises(ValueError, match="does not divide"):
        torch_sft_step(model, opt, trained, batch, 3)


def test_decode_benchmark_smoke(tmp_path):
    out = tmp_path / "decode.jsonl"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--quick", "--preset", "tiny-llama", "--batch", "2",
         "--prompt-len", "8", "--new-tokens", "4", "--variants", "jax-fp32,torch-fp32", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "XLA_FLAGS": ""}, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["bench"] for r in rows] == ["memory_bandwidth", "decode", "decode", "decode_summary"]
    assert rows[0]["bytes_per_s_best"] > 0
    by_variant = {r["variant"]: r for r in rows if r["bench"] == "decode"}
    assert by_variant["jax-fp32"]["framework"] == "posttrain_jax"
    assert by_variant["torch-fp32"]["framework"] == "transformers"
    for r in by_variant.values():
        assert {"tokens_per_s", "tokens_per_s_rounds", "prefill_s_median", "total_s_rounds", "max_rss_mib",
                "loadavg_1m_rounds", "compile_and_first_call_s"} <= set(r)
        assert r["tokens_per_call"] == 2 * 4 and r["tokens_per_s"] > 0 and len(r["total_s_rounds"]) == 1
    # Steady state: nothing compiled during the timed round.
    assert by_variant["jax-fp32"]["compilations_end"] == by_variant["jax-fp32"]["compilations"]
    summary = rows[-1]
    assert summary["ratio_fp32"] > 0 and summary["target_ratio"] == 1.4
    assert summary["roofline_fp32"]["tokens_per_s_all_weights"] > 0 and "loadavg_start" in summary
    # Same weights and prompts on both sides: fp32 greedy tokens agree.
    assert summary["greedy_agreement"]["jax-fp32 vs torch-fp32"]["rows_identical"] == 2


def test_rl_step_benchmark_smoke(tmp_path):
    out = tmp_path / "rl.jsonl"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "rl_step.py"), "--quick", "--preset", "tiny-llama", "--prompts",
         "2", "--group", "2", "--new-tokens", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "XLA_FLAGS": ""}, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["grpo", "grpo-offpolicy", "ppo"]
    for r in rows:
        assert r["rollout_tokens_per_s"] > 0 and r["train_tokens_per_s"] > 0 and 0 < r["generate_share"] < 1


@pytest.mark.slow  # not yet run to completion here (the loaded dev machine timed out); opt in until verified
def test_lora_benchmark_smoke(tmp_path):
    out = tmp_path / "lora.jsonl"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "lora_sft.py"), "--quick", "--preset", "tiny-llama", "--batch", "2",
         "--seq-len", "16", "--rank", "4", "--methods", "full,qlora", "--frameworks", "jax,torch", "--out", str(out)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "XLA_FLAGS": ""}, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    steps = {(r["framework"], r["method"]): r for r in rows if r["bench"] == "lora_sft_step"}
    assert steps[("posttrain_jax", "qlora")]["trained_params"] < steps[("posttrain_jax", "full")]["trained_params"]
    assert steps[("pytorch", "full")]["tokens_per_s"] > 0
    summary = rows[-1]
    assert summary["bench"] == "lora_sft_summary" and 0 < summary["qlora_optimizer_state_fraction_of_full"] < 1


def test_aot_table_smoke(tmp_path):
    """One tiny row of the AOT table (libtpu's compiler, compile-only devices)."""
    import pytest
    pytest.importorskip("libtpu", reason="needs the tpu-compile extra (libtpu)")
    out = tmp_path / "aot.jsonl"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "aot_table.py"), "--quick", "--rows",
                             "tiny-v5e4-head", "--out", str(out)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "XLA_FLAGS": ""}, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert "error" not in row, row
    assert row["part"] == "loss_head" and row["topology"] == "v5e-4"
    assert row["argument_bytes"] > 0 and row["temp_bytes"] < 2**30
    assert "| tiny-v5e4-head | v5e-4 | 256 x 2 |" in result.stdout
