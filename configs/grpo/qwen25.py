"""Qwen2.5-style GRPO (Qwen2.5 technical report, online RL): 8 responses per query, verifiable math rewards.

Group size 8, group-normalised advantages, k3 KL (beta 0.04), token-level mean,
the Qwen 2.5 chat template, answers in \\boxed{}. Set the model and prompts:
  --config.model.hf_path=/models/Qwen2.5-7B-Instruct --config.tokenizer=/models/Qwen2.5-7B-Instruct
  --config.data.path=/data/math_prompts.jsonl    rows {"prompt": ..., "answer": ...}
"""

from posttrain_jax.trainers.grpo import default_config


def get_config():
    c = default_config()
    c.output_dir = "runs/grpo-qwen25"
    c.model.preset = "qwen2.5-7b"
    c.model.checkpoint = ""
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.tokenizer = ""
    c.chat_template = "qwen2.5"
    c.data.quickstart_task = False
    c.data.path = "data/math_prompts.jsonl"
    c.data.eval_path = ""
    c.data.max_prompt_length = 1024
    c.rewards = [{"name": "math", "extract": "boxed", "correct": 1.0, "incorrect": 0.0}]
    c.sampling.max_new_tokens = 2048
    c.sampling.temperature = 1.0
    c.grpo.prompts_per_step = 64
    c.grpo.group_size = 8
    c.grpo.beta = 0.04
    c.grpo.kl_estimator = "k3"
    c.grpo.loss_aggregation = "token_mean"
    c.grpo.num_iterations = 1
    c.grpo.loss_chunk_size = 0  # automatic: the fused LM head holds ~128 MiB of logits per device at a time
    c.train.steps = 0
    c.train.accum_steps = 8
    c.train.log_every = 1
    c.train.checkpoint_every = 50
    c.optim.learning_rate = 1e-6
    c.optim.schedule = "constant"
    c.optim.warmup_ratio = 0.0
    return c
