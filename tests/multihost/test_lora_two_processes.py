"""A QLoRA SFT run as 2 processes x 4 CPU devices vs 1 x 8: the nf4 base quantized on the global mesh,
adapters-only checkpoints written by both processes, the same losses and adapters (fp32 reduction order).

Opt-in (slow) until it has passed once: on the shared, heavily loaded 2-core development machine (load ~35)
both attempts failed before training, once on the 300 s limit and once in gloo's 30 s context initialisation
(DEADLINE_EXCEEDED between the two processes), so it is not yet verified.
"""

import jax
import numpy as np
import pytest

from posttrain_jax.checkpointing import load_params
from posttrain_jax.data import synthetic
from tests.multihost import test_two_processes
from tests.multihost.test_two_processes import (LOSS_RTOL, PARAM_ATOL, PARAM_RTOL, STEPS, _args, _env, _finish,
                                                _free_port, _launch, _losses, _max_rel)

pytestmark = pytest.mark.slow

LORA = ["--config.lora.enabled=True", "--config.lora.rank=4", "--config.lora.quantize_base=nf4",
        "--config.optim.learning_rate=1e-2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_multihost")
    data, cache = root / "data", root / "xla_cache"
    synthetic.make_quickstart_data(data, num_train=400, num_eval=8, seed=0, show_work=True, max_operand=19)
    one, two = root / "one", root / "two"
    port = _free_port()
    procs = [_launch(_args(data, one, *LORA), _env(8, cache), root / "one.log")]
    procs += [_launch(_args(data, two, *LORA, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                            "--process-id", str(i)), _env(4, cache), root / f"two_{i}.log") for i in range(2)]
    # Three concurrent processes each compile the nf4 quantization and the LoRA step: more time than plain SFT.
    timeout, test_two_processes.TIMEOUT_S = test_two_processes.TIMEOUT_S, 2 * test_two_processes.TIMEOUT_S
    try:
        (rc_one, err_one), (rc0, err0), (rc1, err1) = _finish(procs)
    finally:
        test_two_processes.TIMEOUT_S = timeout
    assert rc_one == 0, err_one[-3000:]
    assert rc0 == 0 and rc1 == 0, f"process 0:\n{err0[-3000:]}\nprocess 1:\n{err1[-3000:]}"
    return one, two


def test_qlora_two_processes_match_one(runs):
    one, two = runs
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    print("QLoRA losses 1x8 vs 2x4:", [(a[s], b[s]) for s in a], f"max rel diff {_max_rel(a, b, a):.2e}")
    assert _max_rel(a, b, a) < LOSS_RTOL and b[STEPS] < b[1]
    x_tree, y_tree = (load_params(str(out / "checkpoints"), STEPS) for out in runs)
    names = [".".join(str(getattr(k, "key", k)) for k in path) for path, _ in
             jax.tree_util.tree_flatten_with_path(y_tree)[0]]
    assert names and all("_lora_" in n for n in names)  # adapters only
    for x, y in zip(jax.tree.leaves(x_tree), jax.tree.leaves(y_tree), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=PARAM_RTOL, atol=PARAM_ATOL)
