"""CUDA graphs for a replica's forward pass: which sizes are captured, which one a batch runs on, and (on a GPU)
that replaying them gives the answers of the forward pass run op by op, and that a failed capture leaves the
replica serving op by op."""

import logging

import numpy as np
import pytest
import torch

from convray.workers.cuda_graphs import GraphedForward, capture_sizes, graph_size_for, graphed_forward
from convray.workers.replica import ModelRunner, warm_up_batch_sizes
from tests.conftest import SHIPPED_MODELS


def test_a_graph_is_captured_for_every_batch_size_up_to_64_then_powers_of_two_and_the_maximum():
    assert capture_sizes(1) == [1]
    assert capture_sizes(32) == list(range(1, 33))
    assert capture_sizes(64) == list(range(1, 65))
    assert capture_sizes(128) == [*range(1, 65), 128]
    assert capture_sizes(300) == [*range(1, 65), 128, 256, 300]
    assert capture_sizes(4096) == [*range(1, 65), 128, 256, 512, 1024, 2048, 4096]


@pytest.mark.parametrize("max_batch_size", [1, 2, 3, 64, 65, 300, 4096])
def test_every_captured_size_has_run_op_by_op_at_load_before_its_capture(max_batch_size):
    warmed = {1, 2, *warm_up_batch_sizes(max_batch_size)}  # the graph's own warm-up runs 1 and 2
    assert set(capture_sizes(max_batch_size)) <= warmed


def test_a_batch_runs_on_the_smallest_graph_that_holds_it_and_on_none_past_the_largest():
    sizes = capture_sizes(300)
    assert graph_size_for(1, sizes) == 1
    assert graph_size_for(64, sizes) == 64
    assert graph_size_for(65, sizes) == 128  # padded
    assert graph_size_for(257, sizes) == 300
    assert graph_size_for(301, sizes) is None  # run op by op


def test_a_cpu_replica_ignores_cuda_graphs_and_says_so():
    plain = ModelRunner(str(SHIPPED_MODELS), "digits", 1, device="cpu", threads=1)
    asked = ModelRunner(str(SHIPPED_MODELS), "digits", 1, device="cpu", threads=1, cuda_graphs=True)
    assert asked.describe()["cuda_graphs"] is False
    pixels = np.random.default_rng(0).integers(0, 256, (5, 1, 8, 8), dtype=np.uint8)
    np.testing.assert_array_equal(asked.predict(pixels)[0], plain.predict(pixels)[0])


def test_cuda_graphs_do_not_combine_with_torch_compile_even_on_cpu():
    with pytest.raises(ValueError, match="do not combine with graph 'compiled'"):
        ModelRunner(str(SHIPPED_MODELS), "digits", 1, device="cpu", graph="compiled", cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("graph,amp,tolerance", [("frozen", "none", 1e-5), ("eager", "bf16", 1e-2)])
def test_a_gpu_replica_replaying_graphs_answers_every_batch_size_as_op_by_op(graph, amp, tolerance):
    plain = ModelRunner(str(SHIPPED_MODELS), "digits", 1, device="cuda", graph=graph, amp=amp, max_batch_size=12)
    graphed = ModelRunner(
        str(SHIPPED_MODELS), "digits", 1, device="cuda", graph=graph, amp=amp, max_batch_size=12, cuda_graphs=True
    )
    assert graphed.describe()["cuda_graphs"] is True and plain.describe()["cuda_graphs"] is False
    rng = np.random.default_rng(0)
    for size in [1, 7, 2, 12, 3, 4, 5, 6, 8, 9, 10, 11, 1]:  # the smallest graph first: the last one captured
        pixels = rng.integers(0, 256, (size, 1, 8, 8), dtype=np.uint8)
        expected, got = plain.predict(pixels)[0], graphed.predict(pixels)[0]
        assert got.shape == (size, 10)
        np.testing.assert_allclose(got, expected, atol=tolerance)


class CountingForward:
    """A forward pass that counts the calls that reach it (captures and warm-up included)."""

    def __init__(self, forward):
        self.forward, self.calls = forward, 0

    def __call__(self, pixels):
        self.calls += 1
        return self.forward(pixels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_padded_batch_is_not_changed_by_what_the_padding_rows_hold_and_a_larger_one_runs_op_by_op():
    runner = ModelRunner(str(SHIPPED_MODELS), "digits", 1, device="cuda", max_batch_size=2)
    forward = CountingForward(runner._forward)
    with torch.inference_mode():
        graphed = GraphedForward(forward, (1, 8, 8), [4, 8], torch.device("cuda"))
        rng = np.random.default_rng(1)
        full = torch.from_numpy(rng.integers(0, 256, (8, 1, 8, 8), dtype=np.uint8)).cuda()
        graphed(full)  # leaves these images in the input buffer's tail
        for size in (3, 5):  # padded to 4 and 8
            batch = torch.from_numpy(rng.integers(0, 256, (size, 1, 8, 8), dtype=np.uint8)).cuda()
            calls = forward.calls
            got = graphed(batch).clone()
            assert forward.calls == calls  # replayed, not run
            torch.testing.assert_close(got, runner._forward(batch), atol=1e-5, rtol=0)
        calls = forward.calls
        graphed(full.repeat(2, 1, 1, 1))  # 16: past the largest graph
        assert forward.calls == calls + 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_forward_pass_a_graph_cannot_hold_is_served_op_by_op_with_a_warning(caplog):
    runner = ModelRunner(str(SHIPPED_MODELS), "digits", 1, device="cuda", max_batch_size=4)
    stream = torch.cuda.current_stream()

    def syncs_with_the_host(pixels):  # .item() waits for the GPU: not allowed while capturing
        probabilities = runner._forward(pixels)
        probabilities.sum().item()
        return probabilities

    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        assert graphed_forward(syncs_with_the_host, (1, 8, 8), 4, torch.device("cuda")) is None
    assert "could not capture CUDA graphs" in caplog.text
    assert torch.cuda.current_stream() == stream  # not left on the capture's side stream
    assert runner.predict(np.zeros((3, 1, 8, 8), np.uint8))[0].shape == (3, 10)
