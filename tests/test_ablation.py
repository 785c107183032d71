"""The ablation command end to end on a tiny grid (the full grid is for people, not CI)."""

import json

from posttrain_jax import ablation
from posttrain_jax.config import apply_overrides


def test_ablation_grid_writes_table_and_plot(tmp_path):
    config = apply_overrides(ablation.default_config(), [
        f"--config.out_dir={tmp_path}", "--config.aggregations=['mean_per_microbatch', 'token_mean']",
        "--config.learning_rates=[0.003]", "--config.accum_steps=[2]",
        "--config.gradient_splits=[[1, 8, 1], [2, 2, 2]]", "--config.sft.data.quickstart_num_train=400",
        "--config.sft.data.quickstart_num_eval=16", "--config.sft.train.steps=3", "--config.sft.train.global_batch=16",
        f"--config.sft.output_dir={tmp_path}/data"])
    rows = ablation.main(config)
    grads = {r["aggregation"]: r["max_rel_diff"] for r in rows if r["kind"] == "gradient" and r["split"] == [2, 2, 2]}
    assert grads["token_mean"] < 2e-5 < 1e-2 < grads["mean_per_microbatch"]
    assert len([r for r in rows if r["kind"] == "train"]) == 2
    table = (tmp_path / "table.md").read_text()
    assert "| token_mean | 2x2x2 |" in table and "eval exact match" in table
    assert (tmp_path / "ablation.png").stat().st_size > 1000
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 6
    json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])
