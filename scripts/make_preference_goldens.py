"""Make the golden values that tests/losses checks the RM and DPO-family losses against.

The references are run, not re-derived: TRL's own loss code is executed on fixed
random inputs, with small stand-ins for the model and the accelerator (the
losses only see per-token log-probs / rewards, which the stand-ins return).

- TRL 1.16.0 (PyPI): `DPOTrainer._compute_loss` for loss_type sigmoid, robust,
  hinge, ipo, sigmoid_norm, sft and ["sigmoid", "sft"] with loss_weights
  [1, 0.2] (the Llama 3 DPO + 0.2 NLL recipe), from per-token log-probs and a
  completion mask, with precomputed reference log-probs; `RewardTrainer.compute_loss`
  with and without `margin` and `center_rewards_coefficient`.
- TRL 0.28.0 (PyPI, the last release whose `sigmoid` loss takes `label_smoothing`,
  i.e. conservative DPO): `DPOTrainer.dpo_loss` for sigmoid (with and without
  smoothing), robust, hinge and ipo (0.x's IPO receives per-token-averaged log-probs),
  run in a subprocess so the two TRL versions never meet.
- open-instruct (allenai/open-instruct, open_instruct/dpo_utils.py at commit
  008fc86ddf7c2e1df8d27f1119b14407d3bc6a35): `dpo_norm` (= its `dpo_loss` on
  log-probs averaged per response, `_get_batch_logps(average_log_prob=True)`,
  for policy and reference) and `simpo_loss`. open-instruct is not on PyPI and
  imports a training stack, so those two short functions are restated below
  in plain torch, term for term.

Every reference runs twice: in float32 (what the trainers compute; the test
tolerance 1e-6 relative is against these) and in float64 on the same float32
inputs (the exact value, reported for information).

Reproduce (nothing here is a dependency of the project or of CI):

    pip install --target /tmp/trl-1.16 --no-deps trl==1.16.0 accelerate==1.15.0 datasets==5.2.0 \
        dill multiprocess xxhash pandas pytz tzdata python-dateutil six requests urllib3 idna \
        certifi charset-normalizer
    pip install --target /tmp/trl-0.28 --no-deps trl==0.28.0
    .venv/bin/python scripts/make_preference_goldens.py --trl /tmp/trl-1.16 --trl-legacy /tmp/trl-0.28

(torch 2.13 CPU and transformers 5.23 come from the project's test extra.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import numpy as np

OPEN_INSTRUCT_COMMIT = "008fc86ddf7c2e1df8d27f1119b14407d3bc6a35"
OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "losses" / "goldens"
NUM_PAIRS, LENGTH = 12, 20


# --------------------------------------------------------------------------- inputs

def make_dpo_inputs(seed: int = 0) -> dict:
    """TRL's layout: rows = [chosen of pairs 0..P-1, rejected of pairs 0..P-1], right padded.

    Column 0 is always prompt, so TRL's shifted completion mask loses nothing.
    `token_logps[r, t]` is log p(token t | tokens < t).
    """
    rng = np.random.default_rng(seed)
    rows = 2 * NUM_PAIRS
    prompt_lengths = rng.integers(1, 7, rows)
    completion_lengths = np.array([rng.integers(1, LENGTH - p + 1) for p in prompt_lengths])
    attention_mask = np.zeros((rows, LENGTH), np.int64)
    completion_mask = np.zeros((rows, LENGTH), np.int64)
    for r, (p, c) in enumerate(zip(prompt_lengths, completion_lengths)):
        attention_mask[r, :p + c] = 1
        completion_mask[r, p:p + c] = 1
    token_logps = (-rng.exponential(1.0, (rows, LENGTH))).astype(np.float32)
    # The reference differs per token by a little noise; its sequence sums are the given inputs.
    ref_token_logps = token_logps + rng.normal(0.0, 0.6, (rows, LENGTH))
    ref_logps = (ref_token_logps * completion_mask).sum(axis=1).astype(np.float32)
    return {
        "num_pairs": NUM_PAIRS,
        "input_ids": rng.integers(3, 1000, (rows, LENGTH)).tolist(),
        "attention_mask": attention_mask.tolist(),
        "completion_mask": completion_mask.tolist(),
        "token_logps": token_logps.tolist(),
        "ref_chosen_logps": ref_logps[:NUM_PAIRS].tolist(),
        "ref_rejected_logps": ref_logps[NUM_PAIRS:].tolist(),
    }


def make_rm_inputs(seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    rewards = rng.normal(0.3, 1.5, 2 * NUM_PAIRS).astype(np.float32)
    # Llama 2 used a discrete margin from the preference-rating gap.
    margin = rng.choice(np.array([0.0, 1 / 3, 2 / 3, 1.0], np.float32), NUM_PAIRS)
    attention_mask = np.zeros((2 * NUM_PAIRS, LENGTH), np.int64)
    for r, n in enumerate(rng.integers(2, LENGTH + 1, 2 * NUM_PAIRS)):
        attention_mask[r, :n] = 1
    return {
        "num_pairs": NUM_PAIRS,
        "chosen_rewards": rewards[:NUM_PAIRS].tolist(),
        "rejected_rewards": rewards[NUM_PAIRS:].tolist(),
        "margin": margin.tolist(),
        "attention_mask": attention_mask.tolist(),
    }


# --------------------------------------------------------------------------- TRL 1.16 stand-ins

def _accelerator(torch):
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x,
                           unwrap_model=lambda m: m)


class _FusedHeadModel:
    """What `model(..., labels=labels, fused_lm_head=True)` returns in TRL 1.16: per-token
    log-probs of the next token, [rows, length-1], zero where the next label is -100."""

    training = True

    def __init__(self, torch, token_logps):
        self.torch, self.token_logps = torch, token_logps

    def __call__(self, input_ids, attention_mask, labels, fused_lm_head, use_cache=None, **kwargs):
        assert fused_lm_head
        valid = labels[:, 1:] != -100
        log_probs = self.token_logps[:, 1:].masked_fill(~valid, 0.0)
        zeros = self.torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool(), aux_loss=None)


def trl_dpo(inputs: dict, dtype_name: str, loss_types: list[str], loss_weights: list[float], beta: float,
            label_smoothing: float = 0.0) -> dict:
    import torch
    from trl.trainer.dpo_trainer import DPOTrainer

    dtype = getattr(torch, dtype_name)
    model = _FusedHeadModel(torch, torch.tensor(inputs["token_logps"], dtype=dtype))
    batch = {
        "input_ids": torch.tensor(inputs["input_ids"]),
        "attention_mask": torch.tensor(inputs["attention_mask"]),
        "completion_mask": torch.tensor(inputs["completion_mask"]),
        "ref_chosen_logps": torch.tensor(inputs["ref_chosen_logps"], dtype=dtype),
        "ref_rejected_logps": torch.tensor(inputs["ref_rejected_logps"], dtype=dtype),
    }
    trainer = SimpleNamespace(
        model=model, accelerator=_accelerator(torch), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, ref_model=None, f_divergence_type="reverse_kl", loss_types=loss_types,
        loss_weights=loss_weights, beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        args=SimpleNamespace(discopop_tau=0.05), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(trainer, model, batch, return_outputs=False)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return {"loss": float(loss), "metrics": {k: float(logged[k]) for k in (
        "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
        "logps/rejected")}}


def trl_rm(inputs: dict, dtype_name: str, use_margin: bool, center_coef: float | None) -> dict:
    import torch
    from trl.trainer.reward_trainer import RewardTrainer

    dtype = getattr(torch, dtype_name)
    rewards = torch.tensor(inputs["chosen_rewards"] + inputs["rejected_rewards"], dtype=dtype)
    model = lambda **kwargs: SimpleNamespace(logits=rewards[:, None])  # noqa: E731 - a sequence-classification head
    batch = {"input_ids": torch.ones_like(torch.tensor(inputs["attention_mask"])),
             "attention_mask": torch.tensor(inputs["attention_mask"])}
    if use_margin:
        batch["margin"] = torch.tensor(inputs["margin"], dtype=dtype)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), args=SimpleNamespace(center_rewards_coefficient=center_coef),
        accelerator=_accelerator(torch), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    with torch.no_grad():
        loss = RewardTrainer.compute_loss(trainer, model, batch)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return {"loss": float(loss),
            "metrics": {k: float(logged[k]) for k in ("accuracy", "margin", "mean_reward", "min_reward", "max_reward")}}


# --------------------------------------------------------------------------- TRL 0.28 (subprocess)

def legacy_worker() -> None:
    """Runs under TRL 0.28: reads {"cases": [...], "sequences": {...}} on stdin, writes results."""
    import transformers.utils.import_utils as import_utils

    # transformers 5 returns (available, version) here; TRL 0.28 treats the tuple as a bool,
    # so every optional package (wandb, weave, ...) would look installed.
    original = import_utils._is_package_available

    class Availability(tuple):
        def __bool__(self):
            return bool(self[0])

    import_utils._is_package_available = lambda *a, **k: Availability(original(*a, **k))
    import torch
    import trl
    from trl.trainer.dpo_config import FDivergenceType
    from trl.trainer.dpo_trainer import DPOTrainer

    request = json.load(sys.stdin)
    seq = request["sequences"]
    out = {"trl_version": trl.__version__, "results": []}
    for case in request["cases"]:
        per_dtype = {}
        for dtype_name in ("float32", "float64"):
            dtype = getattr(torch, dtype_name)
            t = {k: torch.tensor(v, dtype=dtype) for k, v in seq.items()}
            if case["loss_type"] == "ipo":  # TRL 0.x averages log-probs per token before IPO (policy and reference)
                args = [t["policy_chosen"] / t["chosen_lengths"], t["policy_rejected"] / t["rejected_lengths"],
                        t["ref_chosen"] / t["chosen_lengths"], t["ref_rejected"] / t["rejected_lengths"]]
            else:
                args = [t["policy_chosen"], t["policy_rejected"], t["ref_chosen"], t["ref_rejected"]]
            trainer = SimpleNamespace(accelerator=_accelerator(torch), reference_free=False,
                                      f_divergence_type=FDivergenceType.REVERSE_KL, f_divergence_params=None,
                                      beta=case["beta"], label_smoothing=case["label_smoothing"],
                                      args=SimpleNamespace(discopop_tau=0.05))
            with torch.no_grad():
                losses, chosen_rewards, rejected_rewards = DPOTrainer.dpo_loss(trainer, *args, case["loss_type"], None)
            per_dtype[dtype_name] = {
                "loss": float(losses.mean()),
                "metrics": {"rewards/chosen": float(chosen_rewards.mean()),
                            "rewards/rejected": float(rejected_rewards.mean()),
                            "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
                            "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().mean())}}
        out["results"].append(per_dtype)
    json.dump(out, sys.stdout)


def run_legacy(trl_legacy: str, deps: str, cases: list[dict], sequences: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([trl_legacy, deps]))
    proc = subprocess.run([sys.executable, __file__, "--legacy-worker"], input=json.dumps(
        {"cases": cases, "sequences": sequences}), capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise SystemExit(f"TRL legacy worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


# --------------------------------------------------------------------------- open-instruct, restated

def open_instruct_reference(inputs: dict, dtype_name: str, loss_type: str, beta: float, label_smoothing: float,
                            gamma_beta_ratio: float) -> dict:
    """open_instruct/dpo_utils.py @ OPEN_INSTRUCT_COMMIT, `dpo_norm` and `simpo`, in plain torch.

    Both average the log-probs per response (`average_log_prob=True`: sum over the
    label mask / its size), for the policy and (dpo_norm) the cached reference.
    Rewards are beta * the averaged log-ratio (dpo_norm) or beta * averaged log-prob (simpo).
    """
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, dtype_name)
    p = inputs["num_pairs"]
    token_logps = torch.tensor(inputs["token_logps"], dtype=dtype)
    mask = torch.tensor(inputs["completion_mask"], dtype=dtype)
    lengths = mask.sum(-1)
    average = (token_logps * mask).sum(-1) / lengths
    chosen, rejected = average[:p], average[p:]
    if loss_type == "dpo_norm":
        ref = torch.tensor(inputs["ref_chosen_logps"] + inputs["ref_rejected_logps"], dtype=dtype) / lengths
        ref_chosen, ref_rejected = ref[:p], ref[p:]
        logits = (chosen - rejected) - (ref_chosen - ref_rejected)
        chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    elif loss_type == "simpo":
        logits = (chosen - rejected) - gamma_beta_ratio
        chosen_rewards, rejected_rewards = beta * chosen, beta * rejected
    else:
        raise ValueError(loss_type)
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return {"loss": float(losses.mean()),
            "metrics": {"rewards/chosen": float(chosen_rewards.mean()),
                        "rewards/rejected": float(rejected_rewards.mean()),
                        "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
                        "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().mean())}}


# --------------------------------------------------------------------------- main

def _both(fn, inputs: dict, **kwargs) -> dict:
    f32, f64 = fn(inputs, "float32", **kwargs), fn(inputs, "float64", **kwargs)
    return {"loss": f32["loss"], "metrics": f32["metrics"],
            "loss_float64": f64["loss"], "metrics_float64": f64["metrics"]}


def sequence_sums(inputs: dict) -> dict:
    """Per-pair sequence log-prob sums (float32, summed in float64) for the sequence-level cases."""
    p = inputs["num_pairs"]
    mask = np.asarray(inputs["completion_mask"], np.float64)
    sums = (np.asarray(inputs["token_logps"], np.float64) * mask).sum(-1).astype(np.float32)
    lengths = mask.sum(-1).astype(np.float32)
    return {"policy_chosen": sums[:p].tolist(), "policy_rejected": sums[p:].tolist(),
            "ref_chosen": inputs["ref_chosen_logps"], "ref_rejected": inputs["ref_rejected_logps"],
            "chosen_lengths": lengths[:p].tolist(), "rejected_lengths": lengths[p:].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trl", required=False, help="directory holding trl==1.16.0 and its import deps")
    parser.add_argument("--trl-legacy", required=False, help="directory holding trl==0.28.0 (deps from --trl)")
    parser.add_argument("--out", default=str(OUT_DIR))
    parser.add_argument("--legacy-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.legacy_worker:
        legacy_worker()
        return
    if not args.trl or not args.trl_legacy:
        parser.error("--trl and --trl-legacy are required (see the module docstring)")
    sys.path.insert(0, args.trl)
    import torch
    import transformers
    import trl

    assert trl.__version__ == "1.16.0", trl.__version__
    dpo_inputs, rm_inputs = make_dpo_inputs(), make_rm_inputs()

    trl_cases = [  # (name, our loss_type, TRL loss_type list, weights, beta, label_smoothing)
        ("trl_sigmoid", "sigmoid", ["sigmoid"], [1.0], 0.1, 0.0),
        ("trl_robust", "robust", ["robust"], [1.0], 0.1, 0.2),
        ("trl_hinge", "hinge", ["hinge"], [1.0], 0.5, 0.0),
        ("trl_ipo", "ipo", ["ipo"], [1.0], 0.1, 0.0),
        ("trl_sigmoid_norm", "dpo_norm", ["sigmoid_norm"], [1.0], 5.0, 0.0),
        ("trl_sft", "sft", ["sft"], [1.0], 0.1, 0.0),
        ("trl_sigmoid_plus_0.2_sft", "sigmoid+sft", ["sigmoid", "sft"], [1.0, 0.2], 0.1, 0.0),
    ]
    cases = []
    for name, ours, loss_types, weights, beta, smoothing in trl_cases:
        result = _both(trl_dpo, dpo_inputs, loss_types=loss_types, loss_weights=weights, beta=beta,
                       label_smoothing=smoothing)
        cases.append({"name": name, "source": f"trl=={trl.__version__} DPOTrainer._compute_loss", "inputs": "tokens",
                      "loss_type": ours, "trl_loss_type": loss_types, "loss_weights": weights, "beta": beta,
                      "label_smoothing": smoothing, **result})

    for name, loss_type, beta, smoothing, ratio in [
            ("open_instruct_dpo_norm", "dpo_norm", 5.0, 0.0, 0.0),
            ("open_instruct_dpo_norm_smoothed", "dpo_norm", 5.0, 0.1, 0.0),
            ("open_instruct_simpo", "simpo", 2.0, 0.0, 0.3),
            ("open_instruct_simpo_smoothed", "simpo", 2.0, 0.1, 0.5)]:
        result = _both(open_instruct_reference, dpo_inputs, loss_type=loss_type, beta=beta,
                       label_smoothing=smoothing, gamma_beta_ratio=ratio)
        cases.append({"name": name, "source": f"allenai/open-instruct@{OPEN_INSTRUCT_COMMIT} dpo_utils.py (restated)",
                      "inputs": "tokens", "loss_type": loss_type, "beta": beta, "label_smoothing": smoothing,
                      "gamma_beta_ratio": ratio, **result})

    sequences = sequence_sums(dpo_inputs)
    legacy_cases = [{"name": "trl0_sigmoid", "loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0},
                    {"name": "trl0_cdpo", "loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.1},
                    {"name": "trl0_robust", "loss_type": "robust", "beta": 0.1, "label_smoothing": 0.2},
                    {"name": "trl0_hinge", "loss_type": "hinge", "beta": 0.5, "label_smoothing": 0.0},
                    {"name": "trl0_ipo", "loss_type": "ipo", "beta": 0.1, "label_smoothing": 0.0}]
    legacy = run_legacy(args.trl_legacy, args.trl, legacy_cases, sequences)
    for case, result in zip(legacy_cases, legacy["results"]):
        metrics = result["float32"]["metrics"]
        if case["loss_type"] == "ipo":  # 0.x logs rewards of the averaged log-probs; 1.x (what we follow) of the sums
            metrics = {}
        cases.append({**case, "source": f"trl=={legacy['trl_version']} DPOTrainer.dpo_loss", "inputs": "sequences",
                      "loss": result["float32"]["loss"], "metrics": metrics,
                      "loss_float64": result["float64"]["loss"],
                      "metrics_float64": result["float64"]["metrics"] if metrics else {}})

    meta = {"generator": "scripts/make_preference_goldens.py", "trl": trl.__version__,
            "trl_legacy": legacy["trl_version"], "open_instruct_commit": OPEN_INSTRUCT_COMMIT,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": metadata.version("accelerate"), "numpy": np.__version__,
            "note": "loss/metrics: reference run in float32; *_float64: same float32 inputs run in float64. "
                    "Metrics are the per-pair means the reference logs."}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dpo.json").write_text(json.dumps(
        {"meta": meta, "inputs": dpo_inputs, "sequences": sequences, "cases": cases}, indent=1) + "\n")

    rm_cases = []
    for name, use_margin, coef in [("trl_rm", False, None), ("trl_rm_margin", True, None),
                                   ("trl_rm_center", False, 0.01), ("trl_rm_margin_center", True, 0.01)]:
        result = _both(trl_rm, rm_inputs, use_margin=use_margin, center_coef=coef)
        rm_cases.append({"name": name, "source": f"trl=={trl.__version__} RewardTrainer.compute_loss",
                         "margin": use_margin, "center_rewards_coefficient": coef, **result})
    (out / "rm.json").write_text(json.dumps({"meta": meta, "inputs": rm_inputs, "cases": rm_cases}, indent=1) + "\n")
    print(f"wrote {out / 'dpo.json'} ({len(cases)} cases) and {out / 'rm.json'} ({len(rm_cases)} cases)")


if __name__ == "__main__":
    main()
