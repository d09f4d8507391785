"""A replica's forward pass on a GPU replayed from captured CUDA graphs: one launch per batch, not one per op.

Run op by op, a forward pass costs the CPU a kernel launch per operation (tens of microseconds each through
TorchScript's interpreter or eager PyTorch), and at the batch sizes a serving replica sees, the GPU waits on
those launches. A CUDA graph records the whole pass once and replays it with one call. A graph is fixed to
the shapes it was captured with, so ``GraphedForward`` captures one per batch size of ``capture_sizes`` and
runs a batch on the smallest that holds it, its tail rows padding (every image is computed on its own: the
padding changes no other row's output).

Captured graphs read their input from one fixed buffer and write their output to fixed tensors, so a replay
and the copy of its output must not overlap another's: the replica's model lock serialises them. All graphs
share one memory pool (they never run at once), so their activations cost the largest graph's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]

CAPTURE_EVERY_SIZE_UP_TO = 64  # past it, graphs for powers of two and the maximum: a batch is padded to one


def capture_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes to capture a graph for, ascending.

    Every one up to ``CAPTURE_EVERY_SIZE_UP_TO``, then powers of two and ``max_batch_size`` itself: a
    ``--max-batch-size`` of 4096 must not capture 4096 graphs.
    """
    sizes = list(range(1, min(max_batch_size, CAPTURE_EVERY_SIZE_UP_TO) + 1))
    power = CAPTURE_EVERY_SIZE_UP_TO * 2
    while power < max_batch_size:
        sizes.append(power)
        power *= 2
    if max_batch_size > CAPTURE_EVERY_SIZE_UP_TO:
        sizes.append(max_batch_size)
    return sizes


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

        Call under the same ``torch.inference_mode`` and autocast as the replays will run in, after ``forward``
        has run at least once on ``device``.

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

    A failed capture is logged as a warning: the replica then serves op by op rather than not at all. An
    out-of-memory error is raised: the op-by-op pass needs most of that memory too.
    """
    try:
        return GraphedForward(forward, image_shape, capture_sizes(max_batch_size), device)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:  # an op the capture cannot hold, a driver refusing: serve without graphs
        log.warning(
            "could not capture CUDA graphs (%s: %s); running the forward pass op by op", type(exc).__name__, exc
        )
        return None
