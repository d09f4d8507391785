"""The forward pass a replica runs on every batch, built once when a model version loads.

uint8 pixels (N, C, H, W) in, float32 probabilities (N, classes) out: normalisation, the CNN and its
output activation as one module, with activations in channels-last memory format (oneDNN on CPU and
cuDNN on GPU have faster kernels for it). ``graph`` chooses how that module runs:

- ``frozen``: traced with TorchScript and frozen: weights become constants, dropout and identity layers
  vanish, and TorchScript's interpreter runs the remaining ops without a Python call per layer. On the
  2-core VM a batch takes 20-45% less CPU than eager for digits and 10-40% less for a ResNet-style
  model at 224x224, depending on the batch size (docs/benchmarks.md). torch marks TorchScript
  deprecated in favour of ``torch.compile``, which measured slower here on CPU and compiles for seconds
  at load; so ``frozen`` stays the default while torch has it, and ``auto`` falls back to ``eager`` on
  a torch without it.
- ``compiled``: ``torch.compile`` (Inductor) with dynamic batch sizes. It compiles during the warm-up at
  load (about 20 s for digits on the 2-core VM; its guards recompile at some batch sizes, 1 and 16 on CPU,
  so a replica runs every batch size up to 64 at load, ``ModelRunner``) and needs a C++ compiler on CPU, Triton and a
  C compiler (for its launchers) on a GPU; the shipped images have no compiler.
- ``eager``: the module as it is, one Python call per layer.
- ``auto``: ``frozen``, or ``eager`` when mixed precision is on (a TorchScript trace does not carry
  autocast reliably; ``compiled`` does, so pick it to have both) or torch has no TorchScript.

The eager module stays as it was for ``explain``, which needs hooks and gradients.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from convray.workers.models import CNN
from convray.workers.transforms import Normaliser

GraphChoice = Literal["auto", "frozen", "compiled", "eager"]
Graph = Literal["frozen", "compiled", "eager"]
Forward = Callable[[torch.Tensor], torch.Tensor]

log = logging.getLogger(__name__)


def has_torchscript() -> bool:
    """Whether this torch still has TorchScript's trace and freeze (deprecated since torch 2.5)."""
    return hasattr(torch.jit, "trace") and hasattr(torch.jit, "freeze")


def resolve_graph(graph: GraphChoice, amp: str) -> Graph:
    """The graph ``auto`` stands for given ``amp`` and this torch; an explicit choice is kept.

    Raises:
        ValueError: ``frozen`` was asked for together with mixed precision, or this torch has no TorchScript.
    """
    if graph == "auto":
        return "frozen" if amp == "none" and has_torchscript() else "eager"
    if graph == "frozen" and amp != "none":
        raise ValueError(f"graph 'frozen' does not combine with amp {amp!r}; use graph 'compiled' or 'eager'")
    if graph == "frozen" and not has_torchscript():
        raise ValueError(f"graph 'frozen' needs TorchScript, which torch {torch.__version__} no longer has")
    return graph


class ServingModule(nn.Module):
    """Normalise uint8 pixels, run the CNN in channels-last layout, return its probabilities."""

    def __init__(self, model: CNN, normalise: Normaliser) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", normalise.mean)
        self.register_buffer("std", normalise.std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """float32 probabilities (N, classes) for uint8 pixels (N, C, H, W) on the model's device."""
        x = pixels.to(torch.float32).div(255.0).sub(self.mean).div(self.std)
        return self.model.probabilities(x.contiguous(memory_format=torch.channels_last)).float()


class FrozenForward:
    """A frozen TorchScript module called with the graph executor's run-time optimisation off.

    That executor profiles the shapes it sees and specialises (on a GPU: compiles fused kernels) per
    batch size, so in the first minutes of traffic each new batch size could pay a compile. What freezing
    gains on CPU comes from the freeze itself (measured the same with the executor's optimisation on
    and off), so serving runs it off: every batch size costs the same from the first request.
    """

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        self.module = module

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """The module's probabilities for ``pixels``."""
        with torch.jit.optimized_execution(False):
            return self.module(pixels)


def serving_forward(
    model: CNN, normalise: Normaliser, graph: GraphChoice, amp: str, example: torch.Tensor
) -> tuple[Graph, Forward]:
    """The graph ``graph`` resolves to and its batch function, built and warmed (see ``build_forward``).

    Under ``auto`` a model that cannot be frozen is served eager, with a warning, rather than not at all;
    an explicit choice that fails raises.

    Raises:
        ValueError: see ``resolve_graph``.
        Exception: an explicitly chosen graph could not be built (the message says why).
    """
    resolved = resolve_graph(graph, amp)
    try:
        return resolved, build_forward(model, normalise, resolved, example)
    except Exception as exc:
        if graph != "auto" or resolved == "eager":
            raise
        log.warning("could not build the %s graph (%s: %s); serving the model eager", resolved, type(exc).__name__, exc)
        return "eager", build_forward(model, normalise, "eager", example)


def build_forward(model: CNN, normalise: Normaliser, graph: Graph, example: torch.Tensor) -> Forward:
    """The batch function for ``model`` (already on its device, in eval mode), warmed up on ``example``.

    ``example`` is a uint8 batch of at least two images of the model's (C, H, W) on its device; the warm-up
    runs one image and the whole example twice each, so no request pays for tracing or compiling.
    """
    model.to(memory_format=torch.channels_last)
    serving = ServingModule(model, normalise).eval()
    forward: Forward = serving
    with torch.inference_mode():
        if graph == "frozen":
            with warnings.catch_warnings():
                # 'same' padding reads H and W as Python ints; they are fixed by the model's input contract,
                # so baking them into the trace is right (only the batch size varies).
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", DeprecationWarning)  # see the module docstring
                # check_trace would trace a second time and compare (0.75 s per load); tests/workers/test_forward.py
                # checks frozen against eager instead, for every block and head kind.
                forward = FrozenForward(torch.jit.freeze(torch.jit.trace(serving, example, check_trace=False)))
        elif graph == "compiled":
            forward = torch.compile(serving, dynamic=True)
        for batch in (example[:1], example, example[:1], example):
            forward(batch)
    return forward
