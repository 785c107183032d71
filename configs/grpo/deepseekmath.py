"""DeepSeekMath-style GRPO (Shao et al. 2024, §4.1-4.2): G=64, beta 0.04, one update per rollout.

Outcome rewards from a reward model (the paper's setup), per-sequence token mean
(its 1/G sum_i 1/|o_i| sum_t), group-normalised advantages, k3 KL to the
SFT reference, policy lr 1e-6, 1024 completions per step (16 prompts x 64),
max length 1024. Set the model, prompts and reward model:
  --config.model.hf_path=/models/deepseek-math-7b-instruct  (or model.checkpoint=runs/<sft run>/checkpoints)
  --config.tokenizer=/models/deepseek-math-7b-instruct
  --config.data.path=/data/math_prompts.jsonl    rows {"prompt": ..., "answer": ...}
  --config.rewards='[{"name": "reward_model", "checkpoint": "runs/<rm run>/checkpoints", "tokenizer": "..."}]'
A verifier instead of the RM: rewards=[{"name": "math", "extract": "boxed", "correct": 1.0}].
"""

from posttrain_jax.trainers.grpo import default_config


def get_config():
    c = default_config()
    c.output_dir = "runs/grpo-deepseekmath"
    c.model.preset = "qwen2.5-7b"  # replaced by model.hf_path / model.checkpoint
    c.model.checkpoint = ""
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.tokenizer = ""
    c.chat_template = "chatml"
    c.data.quickstart_task = False
    c.data.path = "data/math_prompts.jsonl"
    c.data.eval_path = ""
    c.data.max_prompt_length = 512
    c.rewards = [{"name": "reward_model", "checkpoint": "runs/rm/checkpoints", "tokenizer": "", "max_length": 1536}]
    c.sampling.max_new_tokens = 1024
    c.sampling.temperature = 1.0
    c.grpo.prompts_per_step = 16
    c.grpo.group_size = 64
    c.grpo.beta = 0.04
    c.grpo.kl_estimator = "k3"
    c.grpo.loss_aggregation = "sequence_mean"
    c.grpo.advantage_scale = "group"
    c.grpo.num_iterations = 1
    c.grpo.num_minibatches = 1
    c.grpo.loss_chunk_size = 0  # automatic: the fused LM head holds ~128 MiB of logits per device at a time
    c.train.steps = 0  # one epoch of the prompts
    c.train.accum_steps = 16
    c.train.log_every = 1
    c.train.checkpoint_every = 50
    c.optim.learning_rate = 1e-6
    c.optim.schedule = "constant"
    c.optim.warmup_ratio = 0.0
    return c
