"""Checkpoint loading: read a file or state dict, map it to the engine's layout, build the network.

Only the torchvision layout is read so far; other families (Detectron2, mmdetection,
matterport) will map onto the same canonical names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from engine.config import TORCHVISION_MASKRCNN_R50_FPN, TORCHVISION_MASKRCNN_R50_FPN_V2, MaskRCNNConfig
from engine.model import ArchitectureSpec, MaskRCNN
from weights import torchvision as tv_format
from weights.errors import CheckpointError, format_list

__all__ = ["CheckpointError", "LoadedCheckpoint", "read_state_dict", "load_checkpoint", "build_model"]


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint in the engine's canonical layout.

    Attributes:
        state_dict: float32 tensors under the engine's parameter names.
        spec: network sizes read from the tensors' shapes.
        config: the family's preset, with the batch-norm eps read from the file.
        family: checkpoint family name ("torchvision").
    """

    state_dict: dict[str, Tensor]
    spec: ArchitectureSpec
    config: MaskRCNNConfig
    family: str


def read_state_dict(source: str | os.PathLike | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state dict from a ``.pth`` path or a mapping (which is not modified)."""
    if isinstance(source, Mapping):
        state = dict(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, not a torch file, pickled objects
            raise CheckpointError(
                f"could not read {str(path)!r} as a PyTorch checkpoint ({type(exc).__name__}: {exc}); "
                "expected a state dict saved with torch.save"
            ) from exc
    else:
        raise TypeError(
            f"weights must be a path to a .pth file or a state dict (mapping of name to tensor); got {type(source).__name__}"
        )
    if not isinstance(state, Mapping):
        raise CheckpointError(f"expected a state dict (mapping of name to tensor); the file holds a {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            "expected a plain state dict of tensors; " + format_list("entries that are not tensors", map(str, bad))
        )
    return state


def load_checkpoint(source: str | os.PathLike | Mapping[str, Tensor]) -> LoadedCheckpoint:
    """Read a checkpoint and convert it to the engine's layout (torchvision family)."""
    state = read_state_dict(source)
    canonical, spec, eps = tv_format.convert(state)
    preset = TORCHVISION_MASKRCNN_R50_FPN_V2 if spec.fpn_norm else TORCHVISION_MASKRCNN_R50_FPN
    config = preset.replace(bn_eps=eps)
    return LoadedCheckpoint(state_dict=canonical, spec=spec, config=config, family="torchvision")


def build_model(checkpoint: LoadedCheckpoint, *, config: MaskRCNNConfig, precision: str = "fp32") -> MaskRCNN:
    """Instantiate the network and load the checkpoint's tensors into it, strictly.

    Raises:
        CheckpointError: listing missing, unexpected and wrongly shaped tensors.
    """
    model = MaskRCNN(spec=checkpoint.spec, config=config, precision=precision)
    expected = model.state_dict()
    given = checkpoint.state_dict
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    misshaped = [
        f"{k} {tuple(given[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in expected
        if k in given and given[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(format_list("missing", missing))
    if unexpected:
        problems.append(format_list("unexpected", unexpected))
    if misshaped:
        problems.append(format_list("wrong shape", misshaped))
    if problems:
        raise CheckpointError(f"{checkpoint.family} checkpoint does not fit the network: " + "; ".join(problems))
    model.load_state_dict(given, strict=True)
    return model.eval().requires_grad_(False)
