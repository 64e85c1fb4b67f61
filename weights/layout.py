"""Helpers shared by the readers of checkpoint families whose names differ from the engine's.

Each family module keeps a table of (canonical-name pattern, builder) rules that give its own
name for every canonical parameter; the functions here turn such a table into names, name maps
and size checks, so that Detectron2 and mmdetection share one implementation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from weights.errors import CheckpointError, format_list
from weights.spec import ArchitectureSpec, canonical_shapes

#: (pattern on the canonical name, builder(match, sizes) -> family name or None)
Rules = Sequence[tuple[re.Pattern, Callable]]


def family_name(rules: Rules, canonical: str, *, box_head_convs: int, rpn_conv_depth: int, family: str) -> str:
    """The family's name for a canonical parameter name.

    Raises:
        KeyError: the name has no counterpart in that family.
    """
    sizes = {"box_convs": box_head_convs, "rpn_convs": rpn_conv_depth}
    for pattern, build in rules:
        m = pattern.match(canonical)
        if m:
            name = build(m, sizes)
            if name is not None:
                return name
    raise KeyError(f"no {family} name for {canonical!r}")


def expected_shapes(spec: ArchitectureSpec, *, box_pool_size: int) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every tensor of the engine's network for ``spec`` (:func:`weights.spec.canonical_shapes`)."""
    return canonical_shapes(spec, box_pool_size=box_pool_size)


def name_map(to_family: Callable[..., str], spec: ArchitectureSpec, shapes: Mapping) -> dict[str, str]:
    """Family name -> canonical name of every tensor in ``shapes``."""
    return {to_family(k, box_head_convs=spec.box_head_convs, rpn_conv_depth=spec.rpn_conv_depth): k for k in shapes}


def indices(state: Mapping[str, Tensor], pattern: str) -> list[int]:
    """Sorted distinct integers captured by group 1 of ``pattern`` over the state's keys."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state if (m := rx.match(k))})


def require(state: Mapping, keys: Iterable[str], *, family: str, expected: str, why: str = "") -> None:
    """CheckpointError listing the ``keys`` that ``state`` lacks."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(
            f"this is not a complete {family} Mask R-CNN R-FPN checkpoint{why}; "
            + format_list("missing keys", missing)
            + f"; {expected}"
        )


def dim(state: Mapping[str, Tensor], key: str, axis: int, *, family: str) -> int:
    """Size of ``state[key]`` along ``axis``, with a clear error when the tensor has fewer dimensions."""
    shape = tuple(state[key].shape)
    if axis >= len(shape):
        raise CheckpointError(f"{key} has shape {shape}; a {family} Mask R-CNN has more dimensions there")
    return int(shape[axis])


@dataclass(frozen=True)
class FamilyLayout:
    """One family's naming bound to the helpers above: what each reader needs, written once.

    Attributes:
        family: the family's display name ("Detectron2", "mmdetection").
        rules: canonical-name pattern -> family-name builder (:data:`Rules`).
        expected: what a complete checkpoint of the family holds, for error messages.
        stage_prefix: the key prefix of ResNet stage ``t`` = 1..4 (``backbone.layer{t}``, or
            Detectron2's ``backbone.bottom_up.res{t + 1}``).
    """

    family: str
    rules: Rules
    expected: str
    stage_prefix: Callable[[int], str]

    def name(self, canonical: str, *, box_head_convs: int = 0, rpn_conv_depth: int = 1) -> str:
        """The family's name for a canonical parameter name (KeyError when it has none)."""
        return family_name(
            self.rules, canonical, box_head_convs=box_head_convs, rpn_conv_depth=rpn_conv_depth, family=self.family
        )

    def name_map(self, spec: ArchitectureSpec, *, box_pool_size: int = 7, shapes: Mapping | None = None) -> dict[str, str]:
        """Family name -> canonical name of every tensor of a network with these sizes."""
        if shapes is None:
            shapes = expected_shapes(spec, box_pool_size=box_pool_size)
        return name_map(self.name, spec, shapes)

    def count(self, state: Mapping[str, Tensor], pattern: str) -> list[int]:
        return indices(state, pattern)

    def require(self, state: Mapping, keys: Iterable[str], why: str = "") -> None:
        require(state, keys, family=self.family, expected=self.expected, why=why)

    def dim(self, state: Mapping[str, Tensor], key: str, axis: int) -> int:
        return dim(state, key, axis, family=self.family)

    def bottleneck_stages(self, state: Mapping[str, Tensor]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]:
        """The ResNet / ResNeXt body's sizes from the stage keys: blocks per stage, inner widths,
        output channels, and the groups of the 3x3 convs.

        Raises:
            CheckpointError: a stage without blocks, or not a bottleneck network.
        """
        stages = [self.stage_prefix(t) for t in (1, 2, 3, 4)]
        blocks = tuple(len(indices(state, rf"^{re.escape(p)}\.(\d+)\.conv1\.weight$")) for p in stages)
        if min(blocks) == 0:
            raise CheckpointError(
                f"backbone stages {stages[0]} .. {stages[-1]} have {blocks} blocks; every stage needs at "
                f"least one ({stages[0]}.0.conv1.weight ...); {self.expected}"
            )
        self.require(
            state, [f"{p}.0.conv{k}.weight" for p in stages for k in (1, 3)], " (only bottleneck ResNets / ResNeXts are supported)"
        )
        widths = tuple(self.dim(state, f"{p}.0.conv1.weight", 0) for p in stages)
        outs = tuple(self.dim(state, f"{p}.0.conv3.weight", 0) for p in stages)
        groups = max(widths[0] // max(self.dim(state, f"{stages[0]}.0.conv2.weight", 1), 1), 1)
        return blocks, widths, outs, groups
