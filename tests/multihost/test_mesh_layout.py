"""Multi-host pieces that need no second process: device order, DCN meshes, start-up detection, bucket outputs.

Device layouts are checked on fake device objects carrying what the mesh code reads
(`id`, `process_index`, `slice_index`, `platform`, `device_kind`), so multi-host
and multi-slice layouts can be exercised on one CPU.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest

from posttrain_jax import mesh as mesh_lib
from posttrain_jax import metrics
from posttrain_jax.mesh import cloud_tpu_process_count, device_grid, initialize_distributed, processes_contiguous


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    process_index: int
    slice_index: int = 0
    platform: str = "cpu"
    device_kind: str = "cpu"


def fake_devices(processes: int, per_process: int, slices: int = 1) -> list[FakeDevice]:
    """Process-major within slice-major ids, as JAX numbers multi-slice processes."""
    per_slice = processes // slices
    return [FakeDevice(p * per_process + i, p, p // per_slice) for p in range(processes) for i in range(per_process)]


def owners(grid: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda d: d.process_index)(grid)


def test_interleaved_devices_are_laid_out_process_major():
    devices = fake_devices(2, 4)
    interleaved = [devices[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)]  # a plain reshape would alternate processes
    assert not processes_contiguous(np.asarray(interleaved, dtype=object).reshape(2, 4, 1))
    for shape, expected in (({"fsdp": -1}, [[0, 0, 0, 0, 1, 1, 1, 1]]),
                            ({"data": 2, "fsdp": 2, "tensor": 2}, [[[0, 0], [0, 0]], [[1, 1], [1, 1]]])):
        grid = device_grid(shape, interleaved)
        assert processes_contiguous(grid)
        assert owners(grid).reshape(np.shape(expected)).tolist() == expected
        assert sorted(d.id for d in grid.flat) == list(range(8))


def test_tensor_axis_must_fit_in_a_process():
    devices = fake_devices(4, 2)
    with pytest.raises(ValueError, match=r"tensor axis \(4\) must divide the devices of each process"):
        device_grid({"fsdp": 2, "tensor": 4}, [devices[i] for i in (0, 2, 4, 6, 1, 3, 5, 7)])


def test_multislice_puts_slices_on_dcn_data_by_default():
    devices = fake_devices(4, 2, slices=2)  # 2 slices x 2 hosts x 2 devices
    grid = device_grid({"data": 2, "fsdp": -1}, devices)
    assert grid.shape == (2, 4, 1)
    slices = np.vectorize(lambda d: d.slice_index)(grid)
    assert slices[:, :, 0].tolist() == [[0, 0, 0, 0], [1, 1, 1, 1]]
    assert owners(grid)[:, :, 0].tolist() == [[0, 0, 1, 1], [2, 2, 3, 3]]
    same = device_grid({"data": 2, "fsdp": -1, "dcn_data": 1, "dcn_fsdp": 1, "dcn_tensor": 1}, devices)
    assert (same == grid).all()  # all-1 DCN sizes (config defaults) mean the default
    # Interleaved hosts inside each slice: the hybrid mesh is rebuilt slice by slice, process-major.
    mixed = [devices[i] for i in (0, 2, 1, 3, 4, 6, 5, 7)]
    assert owners(device_grid({"data": 2, "fsdp": -1}, mixed))[:, :, 0].tolist() == [[0, 0, 1, 1], [2, 2, 3, 3]]
    # fsdp over DCN, data inside each slice.
    grid = device_grid({"data": 2, "fsdp": 4, "dcn_fsdp": 2}, fake_devices(2, 4, slices=2))
    assert np.vectorize(lambda d: d.slice_index)(grid)[:, :, 0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]


def test_dcn_errors_name_the_keys():
    with pytest.raises(ValueError, match=r"dcn_data=3.*spans 3 slices but the devices form 2"):
        device_grid({"data": 6, "fsdp": -1, "dcn_data": 3}, fake_devices(12, 1, slices=2))
    with pytest.raises(ValueError, match=r"data=1 cannot span dcn_data=2 slices"):
        device_grid({"data": 1, "fsdp": -1}, fake_devices(4, 2, slices=2))
    with pytest.raises(ValueError, match=r"all 8 devices are in one slice; drop the dcn_\* keys"):
        device_grid({"fsdp": -1, "dcn_data": 2}, fake_devices(2, 4))
    with pytest.raises(ValueError, match=r"unknown mesh axes \['model'\]"):
        device_grid({"model": 8}, fake_devices(1, 8))


def test_single_process_mesh_is_unchanged():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()]
    assert mesh.axis_names == mesh_lib.AXES and all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_cloud_tpu_process_count():
    no_metadata = lambda key: pytest.fail(f"asked the metadata server for {key} off a TPU VM")  # noqa: E731
    assert cloud_tpu_process_count({}, on_tpu_vm=False, metadata=no_metadata) == 1
    assert cloud_tpu_process_count({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}, on_tpu_vm=True) == 4
    assert cloud_tpu_process_count({"TPU_WORKER_HOSTNAMES": "a,b", "MEGASCALE_NUM_SLICES": "2"}, on_tpu_vm=True) == 4
    answers = {"worker-network-endpoints": "w-0:uid:10.0.0.2,w-1:uid:10.0.0.3",
               "tpu-env": "ACCELERATOR_TYPE: 'v5p-16'\nMEGASCALE_NUM_SLICES: '3'\n"}
    assert cloud_tpu_process_count({}, on_tpu_vm=True, metadata=answers.get) == 6
    assert cloud_tpu_process_count({}, on_tpu_vm=True, metadata=lambda key: None) == 1  # Colab: one host
    assert cloud_tpu_process_count({"TPU_SKIP_MDS_QUERY": "1"}, on_tpu_vm=True, metadata=no_metadata) == 1


@pytest.fixture
def calls(monkeypatch):
    """Record jax.distributed.initialize instead of starting it."""
    made = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args: made.append(args))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    return made


def test_initialize_distributed_sources(calls, monkeypatch):
    monkeypatch.setattr(mesh_lib, "_on_cloud_tpu_vm", lambda: False)
    assert initialize_distributed(environ={}) is False  # one host: nothing started
    assert initialize_distributed(environ={"TPU_WORKER_HOSTNAMES": "a,b"}) is False  # not a TPU VM (as JAX)
    assert initialize_distributed(None, 1, 0, environ={}) is False
    assert initialize_distributed("10.0.0.2:1234", 2, 1, environ={}) is True
    assert initialize_distributed(environ={"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "4",
                                           "JAX_PROCESS_ID": "3"}) is True
    monkeypatch.setattr(mesh_lib, "_on_cloud_tpu_vm", lambda: True)
    assert initialize_distributed(environ={"TPU_WORKER_HOSTNAMES": "a"}) is False  # a one-host slice
    assert initialize_distributed(environ={"TPU_WORKER_HOSTNAMES": "a,b"}) is True  # JAX finds the rest
    assert calls == [("10.0.0.2:1234", 2, 1), ("h:9", 4, 3), (None, None, None)]


def test_initialize_distributed_errors(calls):
    with pytest.raises(ValueError, match=r"missing: --num-processes, --process-id"):
        initialize_distributed("h:1", environ={})
    with pytest.raises(ValueError, match=r"process id 2 of 2 processes \(from flags\)"):
        initialize_distributed("h:1", 2, 2, environ={})
    with pytest.raises(ValueError, match=r"must be host:port"):
        initialize_distributed("localhost", 2, 0, environ={})
    assert calls == []


def test_metrics_on_a_bucket_are_rewritten_whole(tmp_path, monkeypatch):
    """Object stores cannot append: rows are kept and the file rewritten; a resumed run keeps the old rows."""
    assert metrics.is_remote("gs://bucket/run") and not metrics.is_remote("/tmp/run")
    monkeypatch.setattr(metrics, "is_remote", lambda path: True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False, flush_every_s=3600)
    writer.log(2, {"loss": 0.5})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'  # not flushed yet
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["train/loss"] == 0.5
