"""The Tülu 3 loss-aggregation ablation at 8B (Tülu 3 report §4.3, Table 11 settings), for a TPU pod.

The CPU grid (`loss_ablation.py`) on the real recipe: Llama 3.1 8B, the Tülu 3 SFT
mixture, lr 5e-6, 128 sequences per global batch, max length 4096, sum loss with
`sum_constant` 128, linear schedule with 3% warm-up, no weight decay, clipping at 1.0
(`configs/tulu3/sft_8b.py`). Rows are not packed (`packing=False`): per-micro-batch
averaging only reweights sequences when a micro-batch holds several of different
lengths. The grid is aggregation {mean_per_microbatch, sum} x accumulation {1, 4}
x seeds; the data-parallel width is the pod's (multi-host runs use every device, so
`device_counts` stays [0] = all): run the config once per slice size to add that axis,
each into its own `out_dir`. A cell is a full SFT run (one epoch here, to keep a
cell to hours), evaluated on the held-out split given in `sft.data.eval_path`.
The gradient part is off (`gradient_splits=[]`): at 8B it would hold 8 copies of
the gradient on the host.

Before launching, check that every cell fits (the step with accum 4 has the
smallest micro-batch, accum 1 the largest):
  posttrain-jax compile sft --config configs/tulu3/sft_8b.py --topology v5p-32 --config.data.packing=False \
      --config.train.accum_steps=1
The plan, compiled on a CPU host with libtpu (2026-11-29; remat=full, bf16 compute, fsdp=16):
  v5p-32 (16 chips, 95.74 GiB HBM each), 128 x 4096 tokens per step:
    accum 1 (8 rows per chip):     args 5.61 GiB + temporaries 26.06 GiB = 31.68 GiB per chip: fits
    accum 4 (2 rows per chip x 4): args 5.61 GiB + temporaries 13.95 GiB = 19.56 GiB per chip: fits
  (compile 220 s / 203 s). Every cell of the grid is one of these two steps.
Set the paths:
  --config.sft.model.hf_path=/models/Llama-3.1-8B --config.sft.tokenizer=/models/Llama-3.1-8B
  --config.sft.data.sources='[{"path": "/data/tulu-3-sft-mixture/*.parquet"}]'
  --config.sft.data.eval_path=/data/tulu3_heldout.jsonl
"""

from posttrain_jax.ablation import default_config

# Imported by path (configs/ is no package), so load the sibling the same way.
import importlib.util as _util
import os as _os

_spec = _util.spec_from_file_location("sft_8b", _os.path.join(_os.path.dirname(__file__), "sft_8b.py"))
_sft_8b = _util.module_from_spec(_spec)
_spec.loader.exec_module(_sft_8b)


def get_config():
    c = default_config()
    c.out_dir = "runs/tulu3-loss-ablation-8b"
    c.aggregations = ["mean_per_microbatch", "sum"]
    c.learning_rates = [5e-6]
    c.accum_steps = [1, 4]
    c.device_counts = [0]  # 0: every device of the run (the pod slice); see the docstring
    c.seeds = [0, 1, 2]
    c.gradient_splits = []
    c.task.num_train = 0  # the real mixture below, not the synthetic task
    c.sft = _sft_8b.get_config()
    c.sft.data.packing = False
    c.sft.data.epochs = 1.0
    return c
