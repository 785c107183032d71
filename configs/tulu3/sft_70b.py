"""Tülu 3 SFT, 70B (Tülu 3 report, Table 11): the 8B recipe with lr 2e-6.

On a pod, shard weights over `fsdp` and heads/MLP over `tensor`: the default
mesh here is fsdp = all devices / 8, tensor = 8.
"""

import importlib.util
import os


def get_config(arg: str = ""):
    # Config files are not a package: load the 8B sibling by path.
    spec = importlib.util.spec_from_file_location("_tulu3_sft_8b", os.path.join(os.path.dirname(__file__), "sft_8b.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    c.output_dir = "runs/tulu3-sft-70b"
    c.model.preset = "llama3.1-70b"
    c.optim.learning_rate = 2e-6
    c.mesh = {"data": 1, "fsdp": -1, "tensor": 8}
    return c
