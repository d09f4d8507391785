"""The replica's model runner, on CPU: device choice, AMP, pinned-memory transfer and predictions."""

import concurrent.futures
import contextlib
import time

import numpy as np
import pytest
import torch

from convray.workers.data import load_digits_split
from convray.workers.replica import (
    ModelRunner,
    autocast_context,
    batch_buffer,
    gpu_memory_bytes,
    limit_gpu_memory,
    select_device,
    to_device,
    warm_up_batch_sizes,
)
from tests.conftest import SHIPPED_MODELS


def test_device_selection():
    assert select_device("auto", cuda_available=False).type == "cpu"
    assert select_device("auto", cuda_available=True).type == "cuda"
    assert select_device("cpu", cuda_available=True).type == "cpu"
    assert select_device("cuda", cuda_available=True).type == "cuda"
    with pytest.raises(RuntimeError, match="no GPU is visible"):
        select_device("cuda", cuda_available=False)


def test_autocast_is_off_by_default_and_bf16_works_on_cpu():
    cpu = torch.device("cpu")
    assert isinstance(autocast_context(cpu, "none"), contextlib.nullcontext)
    with autocast_context(cpu, "bf16"):
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="needs a GPU"):
        autocast_context(cpu, "fp16")


def test_a_replica_given_part_of_a_gpu_is_held_to_that_part_of_its_memory(monkeypatch):
    """Ray's fractional GPUs are bookkeeping only; torch's allocator enforces the share (the GPU test below)."""
    limits = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda share: limits.append(share))
    limit_gpu_memory(torch.device("cuda"), 0.25)
    limit_gpu_memory(torch.device("cuda"), 1.0)  # a whole GPU: no limit
    limit_gpu_memory(torch.device("cpu"), 0.25)  # on CPU a share means nothing
    assert limits == [0.25]
    ModelRunner(str(SHIPPED_MODELS), "digits", 1, device="cpu", threads=1, gpu_share=0.5)
    assert limits == [0.25]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_replica_past_its_share_of_memory_fails_its_own_allocations():
    torch.cuda.empty_cache()
    try:
        runner = ModelRunner(str(SHIPPED_MODELS), "digits", 1, device="cuda", gpu_share=0.01)
        runner.predict(np.zeros((4, 1, 8, 8), np.uint8))  # the model fits its share
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(torch.cuda.get_device_properties(0).total_memory // 20, dtype=torch.uint8, device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)  # the limit is the process's: the other tests need it off


def test_to_device_copies_read_only_arrays_on_cpu():
    pixels = np.arange(8, dtype=np.uint8).reshape(1, 1, 2, 4)
    pixels.flags.writeable = False
    tensor = to_device(pixels, torch.device("cpu"))
    assert tensor.dtype == torch.uint8 and tensor.tolist() == pixels.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_to_device_uses_pinned_memory_on_gpu():
    tensor = to_device(np.zeros((2, 1, 8, 8), np.uint8), torch.device("cuda"))
    assert tensor.is_cuda


def test_a_batch_buffer_for_the_cpu_is_a_plain_writable_uint8_array():
    buffer = batch_buffer((3, 1, 8, 8), torch.device("cpu"))
    assert buffer.shape == (3, 1, 8, 8) and buffer.dtype == np.uint8 and buffer.flags.writeable
    assert not torch.from_numpy(buffer).is_pinned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_batch_buffer_for_a_gpu_is_pinned_and_goes_to_the_device_as_it_is():
    buffer = batch_buffer((3, 1, 8, 8), torch.device("cuda"))
    buffer[:] = 7
    assert torch.from_numpy(buffer).is_pinned()
    assert to_device(buffer, torch.device("cuda")).sum().item() == 7 * buffer.size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_replica_reports_the_memory_torch_holds():
    reply = ModelRunner(str(SHIPPED_MODELS), "digits", 1, device="cuda").run(np.zeros((4, 1, 8, 8), np.uint8))
    assert 0 < reply.gpu_memory_allocated_bytes <= reply.gpu_memory_reserved_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_replica_has_run_every_batch_size_up_to_the_maximum_before_its_first_request():
    runner = ModelRunner(str(SHIPPED_MODELS), "digits", 1, device="cuda", max_batch_size=12)
    assert runner.describe()["warmed_up_to"] == 12
    reserved = torch.cuda.memory_reserved()
    for size in range(1, 13):
        runner.predict(np.zeros((size, 1, 8, 8), np.uint8))
    assert torch.cuda.memory_reserved() == reserved  # the device memory pool already holds what they need


def test_a_gpu_replica_warms_every_batch_size_up_to_64_then_powers_of_two_and_the_maximum():
    assert warm_up_batch_sizes(2) == []  # the graph's own warm-up runs 1 and 2
    assert warm_up_batch_sizes(32) == list(range(3, 33))
    assert warm_up_batch_sizes(64) == list(range(3, 65))
    assert warm_up_batch_sizes(300) == [*range(3, 65), 128, 256, 300]
    assert warm_up_batch_sizes(4096) == [*range(3, 65), 128, 256, 512, 1024, 2048, 4096]


def test_a_warm_up_batch_that_does_not_fit_the_gpu_fails_the_load_naming_the_setting(monkeypatch):
    runner = ModelRunner(str(SHIPPED_MODELS), "digits", 1, device="cpu", threads=1)

    def out_of_memory(pixels):  # what torch raises on a GPU; no CPU can make it happen
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(runner, "predict", out_of_memory)
    with pytest.raises(RuntimeError, match=r"batch of 4096 images of digits does not fit in GPU memory; lower"):
        runner.warm_up([4096])


def test_a_cpu_replica_warms_only_its_graph_at_one_and_two_images():
    # On CPU a new batch size costs ~0.1-1 ms once (scripts/first_batch_cost.py); warming 32 sizes of a large
    # model would cost seconds per load. (The compiled graph does warm them: see the next test.)
    runner = ModelRunner(str(SHIPPED_MODELS), "digits", 1, device="cpu", threads=1, max_batch_size=32)
    assert runner.describe()["warmed_up_to"] == 2
    runner.warm_up(range(3, 6))
    assert runner.describe()["warmed_up_to"] == 5


def test_a_compiled_graph_compiles_at_load_and_never_for_a_request(monkeypatch):
    """Found in review: torch.compile recompiled at batches of 1 and 16 on CPU, seconds each, on the request that
    met them. Dynamo traces for real; its graphs run as they are (no Inductor: minutes cold on 2 cores)."""
    compiled_graphs = []

    def counting_backend(graph_module, example_inputs):
        compiled_graphs.append(graph_module)
        return graph_module.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: real_compile(module, backend=counting_backend, **kw))
    torch._dynamo.reset()  # graphs compiled by earlier tests would hide this one's compiles
    try:
        runner = ModelRunner(str(SHIPPED_MODELS), "digits", 1, device="cpu", threads=1, graph="compiled",
                             max_batch_size=20)  # fmt: skip
        assert compiled_graphs and runner.describe()["warmed_up_to"] == 20
        at_load = len(compiled_graphs)
        for size in range(1, 21):
            runner.predict(np.zeros((size, 1, 8, 8), np.uint8))
            assert len(compiled_graphs) == at_load, f"compiled again for a batch of {size}"
    finally:
        torch._dynamo.reset()


def test_a_compiled_cpu_replica_warms_sizes_up_to_64_only(monkeypatch):
    """A batch of --max-batch-size (up to 4096) at load could take a CPU host's memory; past 64 a recompile may still
    meet a request (not measured)."""
    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)  # the warm-up's sizes are what is tested
    warmed = []
    monkeypatch.setattr(ModelRunner, "warm_up", lambda self, sizes: warmed.extend(sizes))
    ModelRunner(str(SHIPPED_MODELS), "digits", 1, device="cpu", threads=1, graph="compiled", max_batch_size=300)
    assert warmed == [1, 2, *range(3, 65)]


@pytest.fixture(scope="module")
def runner():
    return ModelRunner(str(SHIPPED_MODELS), "digits", 1, device="cpu", threads=1)


def test_runner_classifies_held_out_digits(runner):
    _, held_out = load_digits_split()
    probabilities, compute_s = runner.predict(held_out.images[:100])
    assert probabilities.shape == (100, 10) and probabilities.dtype == np.float32
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities.argmax(axis=1) == held_out.labels[:100]).mean() >= 0.95
    assert compute_s > 0


def test_runner_bf16_agrees_with_fp32_on_cpu():
    _, held_out = load_digits_split()
    fp32, _ = ModelRunner(str(SHIPPED_MODELS), "digits", 1, device="cpu").predict(held_out.images[:50])
    bf16_runner = ModelRunner(str(SHIPPED_MODELS), "digits", 1, device="cpu", amp="bf16")
    assert bf16_runner.graph == "eager"  # what 'auto' means with mixed precision
    bf16, _ = bf16_runner.predict(held_out.images[:50])
    assert bf16.dtype == np.float32
    assert (fp32.argmax(1) == bf16.argmax(1)).mean() >= 0.95


def test_the_frozen_and_the_eager_graph_give_the_same_probabilities(runner):
    _, held_out = load_digits_split()
    eager = ModelRunner(str(SHIPPED_MODELS), "digits", 1, device="cpu", graph="eager")
    for batch in (1, 7, 32):
        frozen_probabilities, _ = runner.predict(held_out.images[:batch])
        eager_probabilities, _ = eager.predict(held_out.images[:batch])
        np.testing.assert_allclose(frozen_probabilities, eager_probabilities, atol=1e-5)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 1, 8, 8), np.float32), np.zeros((2, 3, 8, 8), np.uint8), np.zeros((1, 8, 8), np.uint8)],
)
def test_runner_refuses_batches_outside_its_contract(runner, bad):
    with pytest.raises(ValueError, match=r"batch must be uint8 \(N, 1, 8, 8\)"):
        runner.predict(bad)


def test_runner_describes_itself(runner):
    info = runner.describe()
    assert info["device"] == "cpu" and info["model"] == "digits" and info["version"] == 1
    assert info["graph"] == "frozen"  # the default on CPU without mixed precision


def test_runner_explains_one_image_with_the_same_probabilities_as_predict(runner):
    _, held_out = load_digits_split()
    image = held_out.images[0]  # uint8 (1, 8, 8)
    explanation, compute_s = runner.explain(image, None, top_k=3)
    probabilities, _ = runner.predict(image[None])
    assert np.allclose(explanation.probabilities, probabilities[0], atol=1e-6)
    assert explanation.classes[0] == held_out.labels[0]
    assert explanation.blocks == [f"block{i}_{b.type}" for i, b in enumerate(runner.module.spec.blocks)]
    assert explanation.method == "cam" and explanation.cams.shape == (3, 2, 2)  # digits: gap_fc, no hidden
    assert compute_s > 0


def test_runner_explain_takes_blocks_method_and_a_channel_cap(runner):
    _, held_out = load_digits_split()
    explanation, _ = runner.explain(held_out.images[1], ["block3_conv"], 2, "grad_cam", max_channels=16)
    assert explanation.blocks == ["block3_conv"] and explanation.shapes == [(64, 4, 4)]
    assert explanation.feature_maps[0].shape == (16, 4, 4)
    assert explanation.method == "grad_cam" and len(explanation.classes) == 2


def test_runner_explain_refuses_an_image_outside_its_contract(runner):
    with pytest.raises(ValueError, match=r"image must be uint8 \(1, 8, 8\)"):
        runner.explain(np.zeros((1, 1, 8, 8), np.uint8), None, 1)


def test_a_cpu_replica_reports_zero_gpu_memory_with_each_batch(runner):
    _, held_out = load_digits_split()
    reply = runner.run(held_out.images[:4])
    assert reply.probabilities.shape == (4, 10) and reply.compute_s > 0
    assert (reply.gpu_memory_allocated_bytes, reply.gpu_memory_reserved_bytes) == (0, 0)
    assert gpu_memory_bytes(torch.device("cpu")) == (0, 0)


def test_time_a_batch_waits_for_another_on_the_same_model_is_not_counted_as_compute(runner):
    """With two batches in flight, one waits while the other runs; the metrics and the batch pacing
    need the forward pass alone."""
    _, held_out = load_digits_split()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with runner._model_lock:  # as a batch running in another thread would hold it
            waiter = pool.submit(runner.predict, held_out.images[:4])
            time.sleep(0.3)
            assert not waiter.done()
        _, compute_s = waiter.result(timeout=10)
    assert compute_s < 0.1  # the 0.3 s it waited is not in its compute time


def test_the_first_batch_cost_probe_runs_on_cpu_and_reports_its_totals():
    """scripts/first_batch_cost.py, which docs/benchmarks.md quotes for the GPU warm-up, still runs."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "first_batch_cost.py"), "--model-repo", str(SHIPPED_MODELS),
         "--device", "cpu", "--max-batch", "5"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["device"] == "cpu" and summary["graph"] == "frozen" and summary["warm_up_to"] == 2
    assert "3: " in result.stdout and "5: " in result.stdout and "6: " not in result.stdout
