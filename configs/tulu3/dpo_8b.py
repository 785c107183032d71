"""Tülu 3 DPO, 8B (Tülu 3 report, Table 20): length-normalised DPO on the SFT model.

dpo_norm (log-ratios divided by response length), beta 5, lr 5e-7, effective
batch 128 pairs, max length 2048, 1 epoch, linear schedule, warmup ratio 0.1,
no weight decay. Reference log-probs are computed once and cached, as Tülu 3
does. Set the model and data:
  --config.model.checkpoint=runs/tulu3-sft-8b/checkpoints   (or --config.model.hf_path=...)
  --config.tokenizer=/models/Llama-3.1-8B
  --config.data.sources='[{"path": "/data/tulu3-8b-preference-mixture/*.parquet"}]'
"""

from posttrain_jax.trainers.dpo import default_config


def get_config():
    c = default_config()
    c.output_dir = "runs/tulu3-dpo-8b"
    c.model.preset = "llama3.1-8b"
    c.model.checkpoint = ""
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.tokenizer = ""
    c.chat_template = "llama3"
    c.data.quickstart_task = False
    c.data.sft_eval_path = ""
    c.data.seq_len = 4096  # chosen and rejected share a row: 2 x 2048
    c.train.global_pairs = 128
    c.train.loss_type = "dpo_norm"
    c.train.beta = 5.0
    c.train.nll_coef = 0.0  # Tülu 3 DPO has no NLL term
    c.train.reference = "cached"
    c.train.loss_chunk_size = 0  # automatic: the fused LM head holds ~128 MiB of logits per device at a time
    c.train.log_every = 10
    c.train.checkpoint_every = 200
    c.optim.learning_rate = 5e-7
    c.optim.schedule = "linear"
    c.optim.warmup_ratio = 0.1
    c.optim.weight_decay = 0.0
    c.optim.b2 = 0.999
    return c
