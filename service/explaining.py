"""The Explain path, top to bottom: check -> decode -> ONE direct Ray call (no batcher) -> render PNGs.

Explain never enters a batcher, so it cannot delay a Classify batch in a queue; on the replica it runs
as one more call, and while it runs that replica counts it as in flight, so batches prefer the others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from convray.service.batching import MIN_RETRY_AFTER_S
from convray.service.codecs import ClassScore, DecodeLimits, decode_image, top_k
from convray.service.config import ExplainSettings
from convray.service.errors import InvalidInput, Overloaded, shown_items
from convray.service.inference import run_resolved
from convray.service.render import Grid, cam_overlay, feature_grid
from convray.workers.explain import CamChoice, CamMethod, Explanation, choose_method
from convray.workers.spec import output_shapes

if TYPE_CHECKING:
    from convray.service.registry import ModelRegistry, ServedModel


@dataclass(frozen=True)
class RenderedFeatureMap:
    """One block's feature maps as a PNG grid."""

    block: str
    shape: tuple[int, int, int]  # the block's full output (C, H, W)
    channels_shown: int
    grid: Grid


@dataclass(frozen=True)
class RenderedCam:
    """One class's activation map as a PNG heatmap over the input."""

    score: ClassScore
    png: bytes


@dataclass(frozen=True)
class ExplainAnswer:
    """The answer to one Explain request."""

    model: str
    version: int
    predictions: list[ClassScore]
    feature_maps: list[RenderedFeatureMap]
    cams: list[RenderedCam]
    method: CamMethod
    cam_block: str
    compute_s: float
    total_s: float
    replica: str


def render(
    pixels: np.ndarray, explanation: Explanation, labels: list[str]
) -> tuple[list[ClassScore], list[RenderedFeatureMap], list[RenderedCam]]:
    """The top-k scores, feature-map grids and CAM overlays of an explanation (CPU work: run it in a thread)."""
    scores = top_k(explanation.probabilities, labels, len(explanation.classes))
    maps = [
        RenderedFeatureMap(block, shape, len(values), feature_grid(values))
        for block, shape, values in zip(explanation.blocks, explanation.shapes, explanation.feature_maps, strict=True)
    ]
    cams = [RenderedCam(score, cam_overlay(pixels, cam)) for score, cam in zip(scores, explanation.cams, strict=True)]
    return scores, maps, cams


def evenly_spread(names: list[str], most: int) -> list[str]:
    """All of ``names`` if there are at most ``most``; else ``most`` of them, evenly spaced, first and last included."""
    if len(names) <= most:
        return list(names)
    if most == 1:
        return [names[-1]]
    return [names[round(i * (len(names) - 1) / (most - 1))] for i in range(most)]


MAX_NAMED_BLOCKS = 1024
"""The most block names an Explain request may hold, repeats included (the highest --explain-max-blocks)."""


class Explainer:
    """Explains encoded images with the registry's models, one direct replica call each."""

    def __init__(
        self,
        registry: ModelRegistry,
        limits: DecodeLimits,
        settings: ExplainSettings,
        default_top_k: int,
        executor: Executor,
    ) -> None:
        self._registry = registry
        self._limits = limits
        self._settings = settings
        self._default_top_k = default_top_k
        self._executor = executor
        self._started: list[float] = []  # when each call between admission and reply was admitted
        self._last_duration_s = 0.0  # of the last call to finish: how long a slot is likely to stay taken

    def _check(self, served: ServedModel, blocks: list[str], k: int, method: CamChoice) -> list[str]:
        """The blocks to explain, after checking every request field.

        None named means all, or, when the model has more than ``--explain-max-blocks``, that many of them spread
        evenly from the first to the last (a deep model's plain ``convray explain`` is not refused).
        """
        meta = served.metadata
        valid = [name for name, _ in output_shapes(meta.spec, meta.input.height, meta.input.width)]
        unknown = set(blocks).difference(valid)  # a set: a client may name millions (found in review)
        if unknown:
            listed = shown_items(unknown)
            raise InvalidInput(f"unknown block(s) {listed} for model {served.name!r}; valid blocks: {valid}")
        limit = self._settings.max_blocks
        chosen = list(dict.fromkeys(blocks)) or evenly_spread(valid, limit)
        if len(chosen) > limit:
            raise InvalidInput(
                f"{len(chosen)} blocks asked for, over the limit of {limit} "
                f"(--explain-max-blocks); name at most {limit} of {valid}"
            )
        if k > len(meta.labels):
            raise InvalidInput(f"top_k is {k} but model {served.name!r} has {len(meta.labels)} classes")
        if k > self._settings.max_top_k:
            raise InvalidInput(
                f"top_k is {k}, over the Explain limit of {self._settings.max_top_k} (--explain-max-top-k)"
            )
        try:
            choose_method(meta.spec, method)
        except ValueError as exc:
            raise InvalidInput(f"model {served.name!r}: {exc}") from None
        return chosen

    async def explain(
        self, image: bytes, model: str, version: int, blocks: Sequence[str], top_k_requested: int, method: CamChoice
    ) -> ExplainAnswer:
        """Feature maps, top-k class activation maps and probabilities of one image, rendered as PNGs.

        ``blocks``: the names of the blocks to explain (none: all, or an even spread), at most --explain-max-blocks
        once repeats are dropped; over ``MAX_NAMED_BLOCKS`` names are refused before they are copied or compared (a
        request may name millions: found in review).

        Raises:
            InvalidInput, ModelNotFound, ModelNotReady, Overloaded (--explain-max-in-flight): see ``service.errors``.
        """
        if len(blocks) > MAX_NAMED_BLOCKS:
            raise InvalidInput(
                f"{len(blocks)} blocks named, over the {MAX_NAMED_BLOCKS} read; name at most "
                f"{self._settings.max_blocks} (--explain-max-blocks)"
            )
        blocks = list(blocks)
        now = time.monotonic()
        if len(self._started) >= self._settings.max_in_flight:
            # The oldest call frees the first slot, about one call's duration after it started.
            retry_after_s = max(self._last_duration_s - (now - self._started[0]), MIN_RETRY_AFTER_S)
            raise Overloaded(
                f"{len(self._started)} Explain calls are being processed, the limit (--explain-max-in-flight); "
                f"retry in about {retry_after_s * 1e3:.0f} ms",
                retry_after_s=retry_after_s,
            )
        self._started.append(now)
        try:
            answer = await self._explain(image, model, version, blocks, top_k_requested, method)
        finally:
            self._started.remove(now)
        self._last_duration_s = time.monotonic() - now  # of an explanation: a refusal's 1 ms says nothing of one
        return answer

    async def _explain(
        self, image: bytes, model: str, version: int, blocks: list[str], top_k_requested: int, method: CamChoice
    ) -> ExplainAnswer:
        received = time.monotonic()
        loop = asyncio.get_running_loop()

        async def run(served: ServedModel) -> ExplainAnswer:
            labels = served.metadata.labels
            k = top_k_requested or min(self._default_top_k, len(labels), self._settings.max_top_k)
            chosen = self._check(served, blocks, k, method)
            contract = served.metadata.input
            pixels = await loop.run_in_executor(self._executor, decode_image, image, contract, self._limits)
            result = await served.pool.explain(pixels, chosen, k, method, self._settings.max_channels)
            explanation = result.explanation
            scores, maps, cams = await loop.run_in_executor(self._executor, render, pixels, explanation, labels)
            return ExplainAnswer(
                model=served.name,
                version=served.version,
                predictions=scores,
                feature_maps=maps,
                cams=cams,
                method=explanation.method,
                cam_block=explanation.cam_block,
                compute_s=result.compute_s,
                total_s=time.monotonic() - received,
                replica=result.replica,
            )

        # A version switched out while the image decodes: moved to the new one, as Classify is.
        return await run_resolved(self._registry, model, version, run)
