"""A replica's forward pass on a GPU replayed from captured CUDA graphs: one launch per batch, not one per op.

Run op by op, a forward pass costs the CPU a kernel launch per operation (tens of microseconds each through
TorchScript's interpreter or eager PyTorch), and at the batch sizes a serving replica sees, the GPU waits on
those launches. A CUDA graph records the whole pass once and replays it with one call. A graph is fixed to
the shapes it was captured with, so ``GraphedForward`` captures one per batch size a GPU replica warms up
(``capture_sizes``) and runs a batch on the smallest that holds it, its tail rows padding (every image is
computed on its own: the padding changes no other row's output).

Captured graphs read their input from one fixed buffer and write their output to fixed tensors, so a replay
and the copy of its output must not overlap another's: the replica's model lock serialises them. All graphs
share one memory pool (they never run at once, and none reads another's memory), so their activations cost
the largest graph's.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable

import torch

from convray.workers.forward import Forward
from convray.workers.replica import every_batch_size

log = logging.getLogger(__name__)


def capture_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes to capture a graph for, ascending: ``replica.every_batch_size``, which a GPU replica has run.

    Every one up to ``replica.WARM_EVERY_SIZE_UP_TO``, then powers of two and ``max_batch_size`` itself (a
    ``--max-batch-size`` of 4096 must not capture 4096 graphs). Each has run op by op before its capture.
    """
    return every_batch_size(max_batch_size)


def graph_size_for(batch: int, sizes: list[int]) -> int | None:
    """The smallest of ``sizes`` (ascending) that holds ``batch`` images, or None when none does."""
    for size in sizes:
        if size >= batch:
            return size
    return None


class GraphedForward:
    """``forward`` captured as one CUDA graph per batch size, and called like it.

    Called on uint8 (N, C, H, W) on the GPU, it returns the probabilities of the N images: a view of the
    graph's output tensor, to copy (``.cpu()``) before the next call. A batch larger than every captured size
    runs through ``forward`` itself.
    """

    def __init__(self, forward: Forward, image_shape: tuple[int, ...], sizes: Iterable[int], device: torch.device):
        """Capture ``forward`` at each of ``sizes``.

        Call under the ``torch.inference_mode`` the replays will run in, and under autocast without its weight
        cache (``replica.autocast_context(..., cache=False)``), after ``forward`` has run on ``device``.

        Raises:
            torch.cuda.OutOfMemoryError: the graphs' memory does not fit.
            RuntimeError: ``forward`` does something a CUDA graph cannot hold (a host sync, a CPU tensor).
        """
        self.forward = forward
        self.sizes = sorted(set(sizes))
        self._input = torch.zeros((self.sizes[-1], *image_shape), dtype=torch.uint8, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # Warm-up and captures on one stream: libraries create their per-stream handles (cuBLAS workspaces)
        # on first use, which must not happen inside a capture.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for size in (self.sizes[-1], self.sizes[0]):
                forward(self._input[:size])
        torch.cuda.current_stream(device).wait_stream(stream)
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first: the pool it grows serves every smaller one
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                output = forward(self._input[:size])
            self._graphs[size] = (graph, output)
        torch.cuda.synchronize(device)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Probabilities for ``pixels`` (uint8, on the graphs' device); a view to copy before the next call."""
        batch = pixels.shape[0]
        size = graph_size_for(batch, self.sizes)
        if size is None:
            return self.forward(pixels)
        self._input[:batch].copy_(pixels)
        graph, output = self._graphs[size]
        graph.replay()
        return output[:batch]


def graphed_forward(
    forward: Forward, image_shape: tuple[int, ...], max_batch_size: int, device: torch.device
) -> GraphedForward | None:
    """``forward`` as CUDA graphs for batches of up to ``max_batch_size``, or None when the capture fails.

    A failed capture (an op a graph cannot hold, the graphs' memory past the replica's share) is logged as a
    warning and the replica serves op by op rather than not at all: its memory is let go and one batch is run
    op by op, so a capture that left the GPU unusable fails the load here instead of every batch later.

    Raises:
        RuntimeError: after a failed capture, the GPU no longer runs the forward pass (the message says why).
    """
    stream = torch.cuda.current_stream(device)
    try:
        return GraphedForward(forward, image_shape, capture_sizes(max_batch_size), device)
    except Exception as exc:  # noqa: BLE001 (any failure: the op-by-op pass is checked below)
        # A capture that ends in an error can leave its side stream current (torch.cuda.graph ends the capture
        # before it restores the stream, and ending one that failed raises).
        torch.cuda.set_stream(stream)
        failure = f"{type(exc).__name__}: {exc}"
    # Out of the except block: its traceback held the half-built graphs, their outputs and pool until here.
    gc.collect()
    torch.cuda.empty_cache()
    log.warning("could not capture CUDA graphs (%s); running the forward pass op by op", failure)
    try:
        forward(torch.zeros((1, *image_shape), dtype=torch.uint8, device=device))
        torch.cuda.synchronize(device)
    except Exception as exc:
        raise RuntimeError(f"the GPU cannot run the model after a failed CUDA graph capture: {exc}") from exc
    return None
