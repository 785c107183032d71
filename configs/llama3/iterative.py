"""Llama 3's iterative post-training (Llama 3 paper §4.1-4.2, Fig. 7): six rounds of RM -> rejection sampling ->
SFT -> DPO -> model averaging, preference data accumulating across rounds.

What the paper states and this config sets:
- six rounds; each round's reward model is trained "on top of the pre-trained checkpoint" on all preference data
  so far (no margin term: Llama 3 dropped Llama 2's), here the seed data plus each round's on-policy pairs;
- rejection sampling: K = 10-30 samples per prompt "from the latest chat model policy (usually the best
  performing checkpoint from the previous post-training iteration)", the RM picks the best (K = 20 here);
- SFT: the pre-trained model fine-tuned on the mix plus the rejection-sampled data, lr 1e-5, 8.5k-9k steps
  (9k here), loss on target tokens only;
- DPO: lr 1e-5, beta 0.1, + 0.2 x NLL on chosen, header/end-of-turn tokens masked, on the most recent batches
  of preference data (dpo.data "latest"); only "significantly better" / "better" pairs of human data are kept;
- model averaging of runs with different data or hyperparameters at each stage (here: two DPO runs, seeds and
  beta differ; add candidates to average more).
Our choices where the paper is silent: temperature 1.0 / top-p 0.95 for sampling, RM lr 1e-5 (Llama 2) and
one epoch of 512 pairs per batch (Llama 2), the held-out metric (a verifier's greedy accuracy here; with a
reward model use eval.metric="greedy_reward").

Fill in (paths are yours):
  --config.base.hf_path=/models/Llama-3.1-8B          (pre-trained; RM and SFT start here every round)
  --config.tokenizer=/models/Llama-3.1-8B-Instruct
  --config.data.sft_mix="[{'path': '/data/sft_mix.jsonl'}]"  --config.data.preferences="['/data/prefs.jsonl']"
  --config.data.prompts=/data/prompts.jsonl (with ground truth for verifiers)  --config.data.eval_path=/data/heldout.jsonl
"""

from posttrain_jax.trainers.pipeline import default_config

STEPS = {"rm": 1000, "sft": 9000, "dpo": 2000}


def get_config():
    c = default_config()
    c.output_dir = "runs/llama3-iterative"
    c.rounds = 6
    c.chat_template = "llama3"
    c.tokenizer = ""
    c.base.checkpoint = ""
    c.base.preset = "llama3.1-8b"
    c.base.dtype = "bfloat16"
    c.base.remat = True
    c.data.quickstart_task = False
    c.data.prompts_per_round = 100_000
    c.rm.overrides = {"data": {"seq_len": 8192}, "train": {"steps": STEPS["rm"], "global_pairs": 512,
                                                            "use_margin": False},
                      "optim": {"learning_rate": 1e-5}}
    c.rejection.use_reward_model = True
    c.rejection.rewards = []  # the round's RM only; add verifiers (e.g. math) for prompts with checkable answers
    c.rejection.reward_model_options = {"batch_size": 16, "max_length": 8192}
    c.rejection.overrides = {"data": {"max_prompt_length": 4096},
                             "rejection": {"num_samples": 20, "prompts_per_batch": 32, "require_correct": [],
                                           "drop_truncated": True},
                             "sampling": {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 4096}}
    c.sft.init = "base"
    c.sft.accumulate = True
    c.sft.overrides = {"data": {"seq_len": 8192, "packing": True}, "train": {"steps": STEPS["sft"], "global_batch": 64,
                                                                            "loss_chunk_size": 0},
                       "optim": {"learning_rate": 1e-5}}
    c.pairs.mode = "reward"  # best vs worst by the RM; "verifier" pairs pass vs fail (Qwen 2.5)
    c.pairs.min_margin = 0.0
    c.dpo.data = "latest"
    c.dpo.candidates = [{"seed": 0}, {"seed": 1, "train": {"beta": 0.05}}]
    c.dpo.overrides = {"data": {"seq_len": 8192, "mask_special_tokens": True},
                       "train": {"steps": STEPS["dpo"], "global_pairs": 64, "loss_type": "sigmoid", "beta": 0.1,
                                 "nll_coef": 0.2, "nll_normalization": "token", "loss_chunk_size": 0},
                       "optim": {"learning_rate": 1e-5, "warmup_ratio": 0.0}}
    c.average.enabled = True
    c.eval.metric = "greedy_reward"
    c.eval.rewards = [{"name": "math", "extract": "auto", "correct": 1.0, "incorrect": 0.0}]
    c.eval.overrides = {"eval": {"num_samples": 8, "ks": [1, 8], "prompts_per_batch": 64},
                        "data": {"max_prompt_length": 4096}, "sampling": {"max_new_tokens": 4096, "temperature": 1.0}}
    return c
