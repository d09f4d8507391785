"""What a CNN sees: feature maps of chosen blocks and class activation maps (CAM, Grad-CAM).

Pure tensor functions on a built ``CNN``; ``workers.replica.ModelRunner.explain`` runs them on the
replica's device. Both maps are returned raw (no normalisation, no resizing); rendering is the caller's.

- CAM (Zhou et al. 2016, https://arxiv.org/abs/1512.04150): when a class score is a linear function of
  the global average of the last block's maps, ``score_k = sum_c w_kc * mean(A_c) + b_k``, the map
  ``sum_c w_kc * A_c`` says where in the image the class was found. That holds for a ``gap`` head
  (``w`` = the 1x1 conv weights) and a ``gap_fc`` head with no hidden layers (``w`` = the dense weights).
- Grad-CAM (Selvaraju et al. 2017, https://arxiv.org/abs/1610.02391) works for any head: weight each
  map by the spatial mean of the class score's gradient with respect to it, sum, and keep the positive part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from convray.workers.spec import CNNSpec, GAPFCHead, GAPHead

if TYPE_CHECKING:  # the front end imports this module (Explanation, choose_method) and must not load torch
    import torch

    from convray.workers.models import CNN

CamMethod = Literal["cam", "grad_cam"]
CamChoice = Literal["auto", "cam", "grad_cam"]


@dataclass(frozen=True)
class Explanation:
    """One image's feature maps, probabilities and class activation maps, as numpy arrays."""

    blocks: list[str]  # block names, ``block<i>_<type>``, in network order
    shapes: list[tuple[int, int, int]]  # each block's full output shape (C, H, W)
    feature_maps: list[np.ndarray]  # float32 (C', H, W) per block; C' = min(C, max_channels)
    probabilities: np.ndarray  # float32 (classes,), the model's output activation, as predict returns
    classes: np.ndarray  # int64 (k,), the top-k classes, most probable first (ties by index)
    cams: np.ndarray  # float32 (k, h, w) at the last block's resolution, one per class in ``classes``
    method: CamMethod
    cam_block: str  # the block whose maps the CAMs weight (the last one)


def block_names(model: CNN) -> list[str]:
    """The feature blocks' names, ``block<i>_<type>``, as ``workers.spec.output_shapes`` names them."""
    return [f"block{i}_{block.type}" for i, block in enumerate(model.spec.blocks)]


def cam_applies(spec: CNNSpec) -> bool:
    """Whether class scores are linear in the last block's pooled maps: a ``gap`` or hidden-less ``gap_fc`` head."""
    return isinstance(spec.head, GAPHead) or (isinstance(spec.head, GAPFCHead) and not spec.head.hidden)


def cam_weights(model: CNN) -> torch.Tensor | None:
    """The (classes, C) weights that make class scores linear in the last block's pooled maps, or None."""
    if not cam_applies(model.spec):
        return None
    if isinstance(model.spec.head, GAPHead):
        return model.head[0].weight[:, :, 0, 0]  # 1x1 conv: (classes, C, 1, 1)
    return model.head[1].weight  # GlobalAvgPool, then Linear(C, classes)


def choose_method(spec: CNNSpec, requested: CamChoice) -> CamMethod:
    """``cam`` where the head allows it and ``auto`` or ``cam`` was asked for; else ``grad_cam``.

    Raises:
        ValueError: ``cam`` was asked for but the head is not ``gap`` or ``gap_fc`` without hidden layers.
    """
    if requested == "grad_cam":
        return "grad_cam"
    if cam_applies(spec):
        return "cam"
    if requested == "cam":
        hidden = " with hidden layers" if isinstance(spec.head, GAPFCHead) else ""
        raise ValueError(
            "CAM needs a 'gap' head or a 'gap_fc' head with no hidden layers; this model's head is "
            f"{spec.head.type!r}{hidden}; ask for Grad-CAM (or auto)"
        )
    return "grad_cam"


def grad_cam(model: CNN, last_maps: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Grad-CAM maps (k, h, w) for one image's last-block maps (1, C, h, w): ReLU(sum_c alpha_kc * A_c)."""
    import torch

    maps = last_maps.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model.head(maps)  # (1, classes)
        cams = []
        for k in classes:
            (gradient,) = torch.autograd.grad(logits[0, k], maps, retain_graph=True)  # (1, C, h, w)
            alpha = gradient[0].mean(dim=(1, 2))  # (C,)
            cams.append(torch.relu(torch.einsum("c,chw->hw", alpha, maps[0].detach())))
    return torch.stack(cams)


def explain(
    model: CNN,
    x: torch.Tensor,
    blocks: list[str],
    top_k: int,
    method: CamChoice = "auto",
    max_channels: int | None = None,
) -> Explanation:
    """Feature maps of ``blocks``, probabilities and top-k class activation maps for one normalised image.

    Args:
        model: the CNN, in eval mode.
        x: one normalised image (1, C, H, W) on the model's device.
        blocks: block names to return maps of, any order (returned in network order); empty means none.
        top_k: how many classes get a class activation map, most probable first.
        method: ``cam``, ``grad_cam``, or ``auto`` (CAM where the head allows it, else Grad-CAM).
        max_channels: return at most this many channels of each block (the first ones); None for all.

    Raises:
        ValueError: an unknown block name (the message lists the valid ones), a bad ``top_k``, or
            ``cam`` asked of a head it does not apply to.
    """
    import torch

    names = block_names(model)
    unknown = [b for b in blocks if b not in names]
    if unknown:
        raise ValueError(f"unknown block(s) {unknown}; this model's blocks are {names}")
    num_classes = model.spec.num_classes
    if not 1 <= top_k <= num_classes:
        raise ValueError(f"top_k must be between 1 and the model's {num_classes} classes, got {top_k}")
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"explain takes one image (1, C, H, W), got {tuple(x.shape)}")
    chosen = choose_method(model.spec, method)
    wanted = set(blocks)
    kept, shapes, maps = [], [], []
    with torch.no_grad():
        h = x
        for name, block in zip(names, model.features, strict=True):
            h = block(h)  # (1, C, H, W)
            if name in wanted:
                kept.append(name)
                shapes.append((int(h.shape[1]), int(h.shape[2]), int(h.shape[3])))
                maps.append(h[0, :max_channels].float().cpu().numpy())
        logits = model.head(h)
        if model.spec.output == "sigmoid":
            probabilities = torch.sigmoid(logits)[0]
        else:
            probabilities = torch.softmax(logits, dim=-1)[0]
        probabilities_np = probabilities.float().cpu().numpy()
    classes = np.argsort(-probabilities_np, kind="stable")[:top_k]
    weights = cam_weights(model)
    if chosen == "cam" and weights is not None:
        with torch.no_grad():
            cams = torch.einsum("kc,chw->khw", weights[torch.as_tensor(classes, device=h.device)], h[0])
    else:
        cams = grad_cam(model, h, [int(k) for k in classes])
    return Explanation(
        blocks=kept,
        shapes=shapes,
        feature_maps=maps,
        probabilities=probabilities_np,
        classes=classes.astype(np.int64),
        cams=cams.float().cpu().numpy(),
        method=chosen,
        cam_block=names[-1],
    )
