"""The ablation command end to end on a tiny grid (the full grid is for people, not CI)."""

import json

import pytest

from posttrain_jax import ablation
from posttrain_jax.config import apply_overrides


def _tiny(tmp_path, *extra):
    return apply_overrides(ablation.default_config(), [
        f"--config.out_dir={tmp_path}", "--config.aggregations=['mean_per_microbatch', 'token_mean']",
        "--config.gradient_aggregations=['mean_per_microbatch', 'token_mean']",
        "--config.learning_rates=[0.003]", "--config.accum_steps=[4]", "--config.device_counts=[1, 2]",
        "--config.seeds=[0]", "--config.gradient_splits=[[1, 8, 1], [2, 2, 2]]", "--config.task.num_train=200",
        "--config.task.num_eval=8", "--config.sft.train.steps=2", "--config.sft.train.global_batch=16",
        "--config.sft.train.checkpoint_every=1", *extra])


def test_ablation_grid_writes_table_and_plot_and_resumes(tmp_path):
    rows = ablation.main(_tiny(tmp_path))
    grads = {r["aggregation"]: r["max_rel_diff"] for r in rows if r["kind"] == "gradient" and r["split"] == [2, 2, 2]}
    assert grads["token_mean"] < 2e-5 < 1e-2 < grads["mean_per_microbatch"]
    runs = [r for r in rows if r["kind"] == "train"]
    assert len(runs) == 4 and {r["micro_batch_rows"] for r in runs} == {4, 2}
    assert all(0.0 <= r["eval_exact_match_short"] <= 1.0 and r["eval_loss_long"] > 0 for r in runs)
    # Same seed, same batches: token_mean is the same run under both splits (to fp32 reduction order).
    tm = [r["final_loss_per_token"] for r in runs if r["aggregation"] == "token_mean"]
    assert abs(tm[0] - tm[1]) < 1e-5
    table = (tmp_path / "table.md").read_text()
    assert "| token_mean | 2x2x2 |" in table and "Split effect" in table and "short replies" in table
    assert (tmp_path / "ablation.png").stat().st_size > 1000

    # Stopped after the third cell (its result line cut mid-write): a rerun redoes only the fourth,
    # from that cell's checkpoint, and keeps the finished ones.
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    again = ablation.main(_tiny(tmp_path))
    assert [r["cell"] for r in again if r["kind"] == "train"] == [r["cell"] for r in runs]
    assert again[-1]["final_loss_per_token"] == pytest.approx(runs[-1]["final_loss_per_token"])
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(lines)  # the cut line replaced


def test_ablation_refuses_other_settings_in_the_same_out_dir(tmp_path):
    ablation._check_same_settings(_tiny(tmp_path))
    ablation._check_same_settings(_tiny(tmp_path, "--config.seeds=[0, 1]"))  # the grid may grow
    with pytest.raises(ValueError, match=r"sft.train.steps"):
        ablation._check_same_settings(_tiny(tmp_path, "--config.sft.train.steps=5"))


def test_length_mix_task_lengths(tmp_path):
    from posttrain_jax.data import synthetic
    path = synthetic.write_length_mix_jsonl(tmp_path / "t.jsonl", 200, long_fraction=0.5, max_operand=19)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    styles = [r["style"] for r in rows]
    assert 70 < styles.count("long") < 130
    for r in rows:
        reply = r["messages"][1]["content"]
        assert synthetic.check_answer(reply, r["answer"])
        assert (len(reply) > 40) == (r["style"] == "long")
