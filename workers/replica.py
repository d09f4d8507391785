"""One model replica: a model version on its device, turning uint8 pixel batches into probabilities.

``ModelRunner`` is a plain class, tested directly on CPU; ``workers.pool`` runs it as a Ray actor.
It knows tensors and numpy arrays, never protos.

torch, and the modules built on it, are imported inside the functions that use them: the front end imports
this module (Ray starts replicas from the class, and batches come back as ``ReplicaReply``) and would
otherwise load torch for nothing, about 180 MiB and 2 s per front-end process.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from convray.workers.repository import ModelRepository

if TYPE_CHECKING:
    import torch

    from convray.workers.direct import DirectAddress, DirectListener
    from convray.workers.explain import CamChoice, Explanation
    from convray.workers.forward import GraphChoice

DeviceChoice = Literal["auto", "cpu", "cuda"]
AmpChoice = Literal["none", "fp16", "bf16"]
_AMP_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}  # torch dtypes, by name
MAX_DIRECT_BATCH = 4096  # images; a direct-channel batch header asking for more is refused unread
WARM_EVERY_SIZE_UP_TO = 64  # past it, a GPU replica's warm-up runs powers of two and the maximum only


def warm_up_batch_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes a replica on a GPU runs once at load, beyond the graph's own 1 and 2 images.

    Every size up to ``WARM_EVERY_SIZE_UP_TO``, then powers of two and ``max_batch_size`` itself: a
    ``--max-batch-size`` in the thousands must not cost thousands of warm-up batches.
    """
    sizes = list(range(3, min(max_batch_size, WARM_EVERY_SIZE_UP_TO) + 1))
    power = WARM_EVERY_SIZE_UP_TO * 2
    while power < max_batch_size:
        sizes.append(power)
        power *= 2
    if max_batch_size > WARM_EVERY_SIZE_UP_TO:
        sizes.append(max_batch_size)
    return sizes


def every_batch_size(max_batch_size: int) -> list[int]:
    """The batch sizes, ascending, a replica runs at load where each must have run before a request meets it.

    Those of ``warm_up_batch_sizes`` and, before them, the 1 and 2 its graph's own warm-up runs outside ``predict``.
    """
    return [size for size in (1, 2) if size <= max_batch_size] + warm_up_batch_sizes(max_batch_size)


def select_device(requested: DeviceChoice, cuda_available: bool) -> torch.device:
    """``cuda`` when asked for or when ``auto`` and a GPU is visible, else ``cpu``.

    Raises:
        RuntimeError: ``cuda`` was asked for but no GPU is visible to this process.
    """
    import torch

    if requested == "cuda" and not cuda_available:
        raise RuntimeError("device 'cuda' requested but no GPU is visible (check --gpus-per-replica)")
    if requested == "cuda" or (requested == "auto" and cuda_available):
        return torch.device("cuda")
    return torch.device("cpu")


def limit_gpu_memory(device: torch.device, share: float) -> None:
    """Hold this process to ``share`` of its GPU's memory (``--gpus-per-replica`` below 1); nothing otherwise.

    Ray's fractional GPUs are bookkeeping only: four replicas of 0.25 on one card could together take more than
    it has, and then fail one another's batches with out-of-memory errors. torch's caching allocator enforces
    the fraction, so a replica past its share fails its own batches (a warm-up past it fails the load, naming
    the setting) and leaves its neighbours theirs. The CUDA context (a few hundred MiB) is outside the limit.
    """
    if device.type == "cuda" and 0 < share < 1:
        import torch

        torch.cuda.set_per_process_memory_fraction(float(share))  # the current device: the replica's one GPU


def autocast_context(
    device: torch.device, amp: AmpChoice, cache: bool = True
) -> contextlib.AbstractContextManager[object]:
    """Mixed precision for the forward pass, or a no-op when ``amp`` is ``none``.

    fp16 autocast is a GPU feature; on CPU only bf16 is offered by torch, so fp16 there is refused. ``cache``:
    whether autocast may keep the low-precision copies of the weights it makes for the context's length; a CUDA
    graph capture must not (its graphs would read copies freed when the context ends).
    """
    if amp == "none":
        return contextlib.nullcontext()
    if device.type == "cpu" and amp == "fp16":
        raise ValueError("amp 'fp16' needs a GPU; use 'bf16' or 'none' on CPU")
    import torch

    return torch.autocast(device_type=device.type, dtype=getattr(torch, _AMP_DTYPES[amp]), cache_enabled=cache)


def to_device(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """A uint8 batch as a tensor on ``device``; on a GPU through pinned memory with a non-blocking copy.

    A batch already in pinned memory (``batch_buffer``) is copied to the GPU as it is, not staged again.
    """
    import torch

    if not pixels.flags.writeable:  # arrays from Ray's object store are read-only views
        pixels = pixels.copy()
    tensor = torch.from_numpy(pixels)
    if device.type == "cuda":
        if not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=True)
    return tensor


def batch_buffer(shape: tuple[int, ...], device: torch.device) -> np.ndarray:
    """An uninitialised uint8 array to receive a batch for ``device`` into: pinned host memory for a GPU.

    Receiving straight into pinned memory saves ``to_device`` a host copy per batch; torch's caching
    host allocator reuses the blocks, so this costs no allocation once warm.
    """
    if device.type == "cuda":
        import torch

        return torch.empty(shape, dtype=torch.uint8, pin_memory=True).numpy()
    return np.empty(shape, dtype=np.uint8)


def gpu_memory_bytes(device: torch.device) -> tuple[int, int]:
    """(allocated, reserved) bytes of torch's CUDA caching allocator on ``device``; (0, 0) on CPU."""
    if device.type != "cuda":
        return 0, 0
    import torch

    return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)


class ReplicaReply(NamedTuple):
    """What one batch's Ray call brings back: the probabilities and the replica's own measurements.

    A named tuple, not a frozen dataclass: built once per batch, in a third of the time.
    """

    probabilities: np.ndarray  # (N, classes) float32
    compute_s: float  # forward pass, measured inside the replica
    gpu_memory_allocated_bytes: int  # after the batch; 0 on CPU
    gpu_memory_reserved_bytes: int  # after the batch; 0 on CPU


class ModelRunner:
    """Holds one model version on its device in inference mode and runs batches through it."""

    def __init__(
        self,
        model_repo: str,
        name: str,
        version: int,
        device: DeviceChoice = "auto",
        amp: AmpChoice = "none",
        threads: int | None = None,
        graph: GraphChoice = "auto",
        max_batch_size: int = 2,
        gpu_share: float = 1.0,
        cuda_graphs: bool = False,
    ) -> None:
        """Load the version onto its device, build its forward graph and warm it up.

        ``max_batch_size`` is the largest batch the front end sends; on a GPU the warm-up runs the batch
        sizes up to it that ``warm_up_batch_sizes`` lists. ``gpu_share``: the part of the GPU this replica was
        given (``--gpus-per-replica``), enforced on its memory (``limit_gpu_memory``). ``cuda_graphs``: on a GPU,
        replay the forward pass from CUDA graphs captured at load for each batch size up to ``max_batch_size``
        (``workers.cuda_graphs``); ignored on CPU.

        Raises:
            RuntimeError: on a GPU, a batch of ``max_batch_size`` images does not fit in its memory, or a failed
                CUDA graph capture left the GPU unusable.
            ValueError: ``cuda_graphs`` with the ``compiled`` graph (torch.compile has its own), even on CPU.
        """
        import torch

        from convray.workers.forward import serving_forward
        from convray.workers.models import prepare_for_inference
        from convray.workers.transforms import Normaliser

        if cuda_graphs and graph == "compiled":
            raise ValueError("CUDA graphs do not combine with graph 'compiled'; use graph 'frozen' or 'eager'")
        if threads:
            torch.set_num_threads(threads)
        # Fast paths (direct channel, compiled graph) call `run` from their own threads; Ray calls use the main one.
        self._model_lock = threading.Lock()
        self._listener: DirectListener | None = None
        loaded = ModelRepository(model_repo).load(name, version)
        self.name, self.version = name, version
        self.contract = loaded.metadata.input
        self.device = select_device(device, torch.cuda.is_available())
        limit_gpu_memory(self.device, gpu_share)
        self.amp: AmpChoice = amp
        self.module = prepare_for_inference(loaded.module).to(self.device)
        self._expected_shape = (self.contract.channels, self.contract.height, self.contract.width)
        self._normalise = Normaliser(self.contract.normalisation.mean, self.contract.normalisation.std, self.device)
        example = torch.zeros((2, *self._expected_shape), dtype=torch.uint8, device=self.device)
        # Built and warmed up here, so no request pays for it; an impossible amp is refused here, not per batch.
        with autocast_context(self.device, amp):
            self.graph, self._forward = serving_forward(self.module, self._normalise, graph, amp, example)
        self.warmed_up_to = 2  # every batch size up to this one has run once
        self.cuda_graphs = False  # whether batches replay captured CUDA graphs
        # torch.compile's guards recompile the graph at sizes its own warm-up did not call it the way `predict`
        # does (batches of 1 and 16 on CPU, measured with dynamo alone): those must happen here, not to a request.
        # On CPU up to 64 only: a batch of --max-batch-size (up to 4096) could take the host's memory.
        if self.device.type == "cuda":
            compiled = self.graph == "compiled"
            self.warm_up(every_batch_size(max_batch_size) if compiled else warm_up_batch_sizes(max_batch_size))
        elif self.graph == "compiled":
            self.warm_up(every_batch_size(min(max_batch_size, WARM_EVERY_SIZE_UP_TO)))
        if self.device.type == "cuda" and cuda_graphs:
            self._capture_graphs(max_batch_size)

    def _capture_graphs(self, max_batch_size: int) -> None:
        """Replace the forward pass by its CUDA graphs (``workers.cuda_graphs``); keep it if the capture fails."""
        import torch

        from convray.workers.cuda_graphs import graphed_forward

        with torch.inference_mode(), autocast_context(self.device, self.amp, cache=False):
            graphed = graphed_forward(self._forward, self._expected_shape, max_batch_size, self.device)
        if graphed is not None:
            self._forward, self.cuda_graphs = graphed, True

    def warm_up(self, batch_sizes: Iterable[int]) -> None:
        """Run one zero batch of each size through ``predict``, so no request is the first of its size.

        On a GPU the first batch of a new size pays for loading the kernels chosen for that shape and for
        growing the pinned and device memory pools (``scripts/first_batch_cost.py`` measures it). On CPU the
        first batch of a new size costs little next to its compute (oneDNN sets up its primitives), so the
        graph's own warm-up at 1 and 2 images is all a replica runs there, but for the ``compiled`` graph
        (sizes up to 64: torch.compile's recompiles).
        """
        import torch

        for size in batch_sizes:
            try:
                self.predict(np.zeros((size, *self._expected_shape), dtype=np.uint8))
            except torch.cuda.OutOfMemoryError as exc:
                raise RuntimeError(
                    f"a batch of {size} images of {self.name} does not fit in GPU memory; lower --max-batch-size "
                    f"or give each replica more of the GPU ({exc})"
                ) from None
            if size == self.warmed_up_to + 1:
                self.warmed_up_to = size

    def predict(self, pixels: np.ndarray) -> tuple[np.ndarray, float]:
        """Probabilities (N, classes) float32 for uint8 pixels (N, C, H, W), and the compute seconds.

        Raises:
            ValueError: the batch is not uint8 of the model's (C, H, W).
        """
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or tuple(pixels.shape[1:]) != self._expected_shape:
            raise ValueError(
                f"batch must be uint8 (N, {', '.join(map(str, self._expected_shape))}), "
                f"got {pixels.dtype} {tuple(pixels.shape)}"
            )
        import torch

        started = time.perf_counter()
        x = to_device(pixels, self.device)
        copied = time.perf_counter()
        with self._model_lock:  # another batch may hold it (a second in flight, explain): not compute time
            locked = time.perf_counter()
            with torch.inference_mode(), autocast_context(self.device, self.amp):
                probabilities = self._forward(x).cpu().numpy()
        return probabilities, (copied - started) + (time.perf_counter() - locked)

    def explain(
        self,
        pixels: np.ndarray,
        blocks: list[str] | None = None,
        top_k: int = 1,
        method: CamChoice = "auto",
        max_channels: int | None = None,
    ) -> tuple[Explanation, float]:
        """Feature maps, probabilities and class activation maps for one uint8 image (C, H, W).

        Runs in fp32 whatever ``amp`` is, one image at a time, outside the batched path.

        Args:
            pixels: one image, uint8 in the model's (C, H, W).
            blocks: block names (``block<i>_<type>``) to return feature maps of; None means all.
            top_k: classes that get a class activation map, most probable first.
            method: ``auto``, ``cam`` or ``grad_cam``; see ``workers.explain``.
            max_channels: at most this many channels per block (the first); None means all.

        Returns:
            The explanation and the compute seconds.

        Raises:
            ValueError: the image is outside the contract, or see ``workers.explain.explain``.
        """
        from convray.workers.explain import block_names, explain

        if pixels.dtype != np.uint8 or tuple(pixels.shape) != self._expected_shape:
            raise ValueError(
                f"image must be uint8 ({', '.join(map(str, self._expected_shape))}), "
                f"got {pixels.dtype} {tuple(pixels.shape)}"
            )
        started = time.perf_counter()
        x = self._normalise(to_device(pixels[None], self.device))
        names = block_names(self.module) if blocks is None else blocks
        with self._model_lock:
            explanation = explain(self.module, x, names, top_k, method, max_channels)
        return explanation, time.perf_counter() - started

    def run(self, pixels: np.ndarray) -> ReplicaReply:
        """``predict`` plus the replica's GPU memory, so one call carries every replica-side number back.

        Raises:
            ValueError: the batch is not uint8 of the model's (C, H, W).
        """
        probabilities, compute_s = self.predict(pixels)
        allocated, reserved = gpu_memory_bytes(self.device)
        return ReplicaReply(probabilities, compute_s, allocated, reserved)

    def open_direct_channel(self, token: bytes, host: str | None = None) -> DirectAddress:
        """Listen for batches over plain sockets (``workers.direct``); returns where to connect.

        ``host`` defaults to this node's IP as Ray knows it, so a front end on another node can connect.
        Connections must present ``token``. Opening again replaces the previous listener.
        """
        from convray.workers.direct import DirectListener  # lazy: direct imports this module

        if host is None:
            import ray  # lazy: this class is also used, and tested, without Ray

            host = ray.util.get_node_ip_address()
        if self._listener is not None:
            self._listener.close()
        max_batch_bytes = MAX_DIRECT_BATCH * int(np.prod(self._expected_shape))
        self._listener = DirectListener(
            self.run, token, host, max_batch_bytes, buffer=functools.partial(batch_buffer, device=self.device)
        )
        return self._listener.direct_address

    def describe(self) -> dict[str, Any]:
        """Where this replica runs and how: device, process id, model, version, input (C, H, W), graph, CUDA graphs."""
        return {
            "device": str(self.device),
            "pid": os.getpid(),
            "model": self.name,
            "version": self.version,
            "input_shape": list(self._expected_shape),
            "graph": self.graph,
            "warmed_up_to": self.warmed_up_to,
            "cuda_graphs": self.cuda_graphs,
        }
