"""Llama 3 rejection sampling (Llama 3 paper §4.2.2): K samples per prompt, the reward model keeps the best.

"For each prompt that we collect during human annotation, we sample K
(typically between 10 and 30) outputs from the latest chat model policy ...
and use our reward model to select the best candidate." The output is SFT
data for the next round. The paper does not give the sampling temperature;
1.0 with top-p 0.95 here is our choice. No threshold (the best is always
kept); set `--config.rejection.threshold=...` to drop prompts whose best
candidate the reward model scores low, and add a verifiable reward with
`require_correct` for prompts with a checkable answer.

Fill in (paths are yours):
  --config.model.checkpoint=runs/llama3-sft/checkpoints   (or --config.model.hf_path=/models/Llama-3.1-8B-Instruct)
  --config.tokenizer=/models/Llama-3.1-8B-Instruct         (tokenizer.json or its directory)
  --config.data.path=/data/prompts.jsonl                   ({"prompt": str | messages, ...} per line)
  --config.rewards="[{'name': 'reward_model', 'checkpoint': 'runs/llama3-rm/checkpoints',
                      'tokenizer': '/models/Llama-3.1-8B-Instruct', 'template': 'llama3', 'max_length': 4096}]"
  --config.rejection.output=/data/rs-round1.jsonl
A multi-host run writes /data/rs-round1-00000-of-000NN.jsonl etc.; train on them
with the SFT trainer, e.g. --config.data.sources="[{'path': '/data/rs-round1-*.jsonl'}]".
"""

from posttrain_jax.trainers.rejection import default_config


def get_config():
    c = default_config()
    c.output_dir = "runs/llama3-rejection-sampling"
    c.model.preset = "llama3.1-8b"
    c.model.checkpoint = ""  # the latest chat model policy (see above)
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"  # sampling only: no master weights needed
    c.tokenizer = ""
    c.chat_template = "llama3"
    c.data.quickstart_task = False
    c.data.path = ""
    c.data.max_prompt_length = 2048
    c.data.length_policy = "drop"  # counted and reported
    c.rewards = [{"name": "reward_model", "checkpoint": "", "tokenizer": "", "template": "llama3", "batch_size": 16,
                  "max_length": 4096}]
    c.sampling.max_new_tokens = 2048
    c.sampling.temperature = 1.0
    c.sampling.top_p = 0.95
    c.rejection.num_samples = 20
    c.rejection.prompts_per_batch = 32  # x 20 samples = 640 sequences per batch: size it to the HBM you have
    c.rejection.threshold = None
    c.rejection.require_correct = []
    c.rejection.drop_truncated = True
    return c
