"""Tülu 3.1-style RL with verifiable rewards, with GRPO in place of PPO: G=16, beta 0.01 (k3), reward 10.

As in the Tülu 3.1 release: GRPO with 16 samples per prompt, KL coefficient
0.01 with the k3 estimator, a verifiable reward of 10 for a correct final
answer (GSM8K "####", MATH \\boxed{}, else the last number), lr 5e-7,
temperature 1.0, Llama 3 template. Set the model and prompts:
  --config.model.checkpoint=runs/tulu3-dpo-8b/checkpoints  (or model.hf_path=/models/Llama-3.1-Tulu-3-8B-DPO)
  --config.tokenizer=/models/Llama-3.1-8B
  --config.data.path=/data/rlvr_gsm_math.jsonl    rows {"messages" or "prompt": ..., "answer": ...}
"""

from posttrain_jax.trainers.grpo import default_config


def get_config():
    c = default_config()
    c.output_dir = "runs/tulu31-grpo-8b"
    c.model.preset = "llama3.1-8b"
    c.model.checkpoint = ""
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.tokenizer = ""
    c.chat_template = "llama3"
    c.data.quickstart_task = False
    c.data.path = "data/rlvr_gsm_math.jsonl"
    c.data.eval_path = ""
    c.data.max_prompt_length = 2048
    c.rewards = [{"name": "math", "extract": "auto", "correct": 10.0, "incorrect": 0.0}]
    c.sampling.max_new_tokens = 2048
    c.sampling.temperature = 1.0
    c.grpo.prompts_per_step = 32
    c.grpo.group_size = 16
    c.grpo.beta = 0.01
    c.grpo.kl_estimator = "k3"
    c.grpo.loss_aggregation = "token_mean"
    c.grpo.num_iterations = 1
    c.grpo.loss_chunk_size = 0  # automatic: the fused LM head holds ~128 MiB of logits per device at a time
    c.train.steps = 0
    c.train.accum_steps = 16
    c.train.log_every = 1
    c.train.checkpoint_every = 50
    c.optim.learning_rate = 5e-7
    c.optim.schedule = "linear"
    c.optim.warmup_ratio = 0.0
    return c
