"""Tülu 3 SFT, 8B (Tülu 3 report, Table 11): Llama 3.1 8B base, sum loss.

lr 5e-6, effective batch 128 sequences, max length 4096, 2 epochs, linear
schedule with warmup ratio 0.03, no weight decay. The `sum` aggregation divides
the summed token losses by the constant `train.sum_constant` = 128 (the global
batch in sequences), which only rescales the learning rate and is the same
for any split of the batch over devices and accumulation steps. Gradients are
clipped at 1.0 as in open-instruct.

Set the model and data paths:
  --config.model.hf_path=/models/Llama-3.1-8B --config.tokenizer=/models/Llama-3.1-8B
  --config.data.sources='[{"path": "/data/tulu-3-sft-mixture/*.parquet"}]'
"""

from posttrain_jax.trainers.sft import default_config


def get_config(arg: str = ""):
    c = default_config()
    c.output_dir = "runs/tulu3-sft-8b"
    c.model.preset = "llama3.1-8b"
    c.model.dtype = "bfloat16"  # fp32 master weights, bf16 compute
    c.model.remat = True
    c.chat_template = "llama3"
    c.data.quickstart_task = False
    c.data.seq_len = 4096
    c.data.packing = True
    c.data.sources = []
    c.data.epochs = 2.0  # multiplies every source's own epochs
    c.train.global_batch = 128
    c.train.accum_steps = 1  # raise on small slices: the gradient does not change with the split
    c.train.loss_aggregation = "sum"
    c.train.sum_constant = 128.0
    c.train.loss_chunk_size = 0  # automatic: the fused LM head holds ~128 MiB of logits per device at a time
    c.train.log_every = 10
    c.train.checkpoint_every = 500
    c.optim.learning_rate = 5e-6
    c.optim.schedule = "linear"
    c.optim.warmup_ratio = 0.03
    c.optim.weight_decay = 0.0
    c.optim.max_grad_norm = 1.0
    c.optim.b2 = 0.999
    c.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
    return c
