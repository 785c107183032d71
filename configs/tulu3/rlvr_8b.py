"""Tülu 3 RLVR for Llama 3.1 8B: PPO with verifiable rewards and a value model from the general RM.

Settings of the Tülu 3 report (Lambert et al. 2024, section 6 and its PPO hyperparameter table):
PPO with a verifiable reward of 10 for a correct answer (GSM8K / MATH / IFEval constraints; here
the math verifier), -10 for a response without an EOS token, a value model initialised from the
general reward model, KL penalty beta = 0.05 (k1, in the reward; the report sweeps 0.1 / 0.05 /
0.03 / 0.01), gamma 1, GAE lambda 0.95, clip 0.2, 4 PPO epochs over 1 minibatch per rollout,
value-function coefficient 0.1, lr 3e-7 with a linear schedule and no warm-up, gradient-norm
clipping at 1, temperature 1, an effective batch of 224 responses, prompts and responses up to
2,048 / 1,024 tokens. Set the model, the reward model and the prompts:

    --config.model.checkpoint=runs/tulu3-dpo-8b/checkpoints  (or model.hf_path=/models/Llama-3.1-Tulu-3-8B-DPO)
    --config.critic.checkpoint=runs/tulu3-rm-8b/checkpoints  (or critic.hf_path=/models/Llama-3.1-Tulu-3-8B-RM)
    --config.tokenizer=/models/Llama-3.1-8B
    --config.data.path=/data/rlvr_gsm_math_if.jsonl          rows {"messages" or "prompt": ..., "answer": ...}
"""

from posttrain_jax.trainers.rl import default_config


def get_config():
    c = default_config()
    c.output_dir = "runs/tulu3-rlvr-8b"
    c.model.preset = "llama3.1-8b"
    c.model.checkpoint = "runs/tulu3-dpo-8b/checkpoints"
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.tokenizer = ""
    c.chat_template = "llama3"
    c.data.quickstart_task = False
    c.data.path = "data/rlvr_gsm_math_if.jsonl"
    c.data.eval_path = ""
    c.data.max_prompt_length = 2048
    c.rewards = [{"name": "math", "extract": "auto", "correct": 10.0, "incorrect": 0.0}]
    c.sampling.max_new_tokens = 1024
    c.sampling.temperature = 1.0
    c.rl.algorithm = "ppo"
    c.rl.prompts_per_step = 224
    c.rl.group_size = 1
    c.rl.kl_coef = 0.05
    c.rl.kl_estimator = "k1"
    c.rl.gamma = 1.0
    c.rl.lam = 0.95
    c.rl.epsilon_low = c.rl.epsilon_high = 0.2
    c.rl.num_epochs = 4
    c.rl.num_minibatches = 1
    c.rl.missing_eos_penalty = 10.0
    c.rl.loss_chunk_size = 512
    c.rl.forward_chunks = 8
    c.critic.checkpoint = "runs/tulu3-rm-8b/checkpoints"
    c.critic.vf_coef = 0.1
    c.critic.value_clip = 0.2
    c.critic.learning_rate = 3e-7
    c.critic.schedule = "linear"
    c.train.steps = 0  # 100,000 episodes / 224 per step: set train.steps=446 or data.epochs
    c.train.accum_steps = 8
    c.train.log_every = 1
    c.train.checkpoint_every = 50
    c.optim.learning_rate = 3e-7
    c.optim.schedule = "linear"
    c.optim.warmup_ratio = 0.0
    c.optim.max_grad_norm = 1.0
    return c
