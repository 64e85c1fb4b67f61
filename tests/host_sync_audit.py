"""Counting host reads of device data on a CPU-only machine.

On CUDA, some operations make the host wait for the device: reading a value (``item``,
``int()``, ``float()``, ``bool()``, ``tolist``, ``cpu``, ``numpy``), and ops whose output size
depends on the data (``nonzero``, boolean-mask indexing, ``unique``, ``masked_select``,
``repeat_interleave`` without ``output_size``). On a CPU these cost nothing, so they are easy
to add unseen. :class:`HostSyncAudit` records every such call made while it is active: a
``TorchDispatchMode`` sees the aten ops, and the ``Tensor`` methods that read data without
going through the dispatcher (``tolist``, ``cpu``, ``numpy``, ``item``, ``__bool__``,
``__int__``, ``__float__``, ``__index__``) are wrapped for its duration.

Uploads that wait for the device are recorded too ("blocking upload"): on CUDA a copy from
pageable host memory without ``non_blocking=True`` ends in a stream synchronisation. On a CPU
such a copy is a no-op, so the calls themselves are recorded: ``Tensor.to`` of a CPU tensor to
a device without ``non_blocking=True``, and ``torch.tensor`` / ``torch.as_tensor`` with a
``device=``. (``engine.ragged.upload`` / ``kernels._dispatch.host_to_device`` make neither
call on a CPU device, and a pinned, non-blocking copy on CUDA.)

Kernel entry points can be declared opaque (``opaque={"module.attr": "stage", ...}``): inside
them nothing is recorded (on CUDA they are single device launches; their own host code is
audited separately), and each call is counted as a launch of that stage.

Each read records its kind and the innermost frame in the project's ``engine/``, ``kernels/``
or ``weights/`` code, so a failing test names the line.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import traceback
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_DIRS = tuple(os.path.join(ROOT, d) + os.sep for d in ("engine", "kernels", "weights"))

#: aten ops whose output size depends on device data
_DATA_DEPENDENT_OPS = {
    "aten.nonzero.default": "nonzero",
    "aten.nonzero_static.default": None,  # fixed size: no sync
    "aten.masked_select.default": "masked_select",
    "aten._unique2.default": "unique",
    "aten.unique_dim.default": "unique",
    "aten.unique_consecutive.default": "unique",
    "aten._unique.default": "unique",
    "aten._local_scalar_dense.default": "item",
    "aten.argwhere.default": "nonzero",
}

_WRAPPED_METHODS = ("tolist", "cpu", "numpy", "item", "__bool__", "__int__", "__float__", "__index__")


@dataclass(frozen=True)
class HostRead:
    """One host read: its kind (``item``, ``nonzero``, ``bool-mask index``, ``tolist`` ...), where
    (the innermost project frame) and ``callers`` (the project frames around it, innermost first)."""

    kind: str
    where: str
    callers: tuple[str, ...] = ()


@dataclass
class AuditReport:
    reads: list[HostRead] = field(default_factory=list)
    launches: Counter = field(default_factory=Counter)

    def summary(self) -> Counter:
        return Counter((r.kind, r.where) for r in self.reads)

    def format(self) -> str:
        lines = [f"{n} x {kind} at {where}" for (kind, where), n in sorted(self.summary().items(), key=lambda kv: kv[0][1])]
        return "\n".join(lines) if lines else "(no host reads)"


def _project_frames() -> tuple[str, ...]:
    """The project's frames of the current stack, innermost first (this module's own left out)."""
    return tuple(
        f"{os.path.relpath(frame.filename, ROOT)}:{frame.lineno} ({frame.name})"
        for frame in reversed(traceback.extract_stack())
        if frame.filename.startswith(PROJECT_DIRS) and os.path.abspath(frame.filename) != os.path.abspath(__file__)
    )


def _is_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices if i is not None)


class _Mode(TorchDispatchMode):
    def __init__(self, audit: "HostSyncAudit") -> None:
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        kind = None
        if name in _DATA_DEPENDENT_OPS:
            kind = _DATA_DEPENDENT_OPS[name]
        elif name in ("aten.index.Tensor", "aten.index_put_.default", "aten.index_put.default") and _is_bool_index(args[1]):
            kind = "bool-mask index"
        elif name.startswith("aten.repeat_interleave.Tensor") and kwargs.get("output_size") is None and (
            len(args) < 3 or args[2] is None
        ):
            kind = "repeat_interleave"
        if kind is not None:
            self.audit._record(kind)
        return func(*args, **kwargs)


class HostSyncAudit:
    """Context manager recording host reads (see the module docstring).

    Args:
        opaque: ``{"package.module.attr": stage}``: functions replaced, for the audit's duration,
            by wrappers that count a launch of ``stage`` and record nothing inside.
    """

    def __init__(self, *, opaque: dict[str, str] | None = None) -> None:
        self.opaque = dict(opaque or {})
        self.report = AuditReport()
        self._depth_opaque = 0
        self._stack = contextlib.ExitStack()

    def _record(self, kind: str) -> None:
        if self._depth_opaque == 0 and self._active:
            frames = _project_frames()
            self.report.reads.append(HostRead(kind, frames[0] if frames else "(outside the project)", frames))

    def _patch(self, owner, attr: str, replacement) -> None:
        original = getattr(owner, attr)
        setattr(owner, attr, replacement)
        self._stack.callback(setattr, owner, attr, original)

    def __enter__(self) -> "HostSyncAudit":
        self._active = True
        audit = self
        for method in _WRAPPED_METHODS:
            original = getattr(torch.Tensor, method)

            def wrapped(tensor, *args, __original=original, __method=method, **kwargs):
                audit._record(__method)
                return __original(tensor, *args, **kwargs)

            self._patch(torch.Tensor, method, wrapped)
        for dotted, stage in self.opaque.items():
            module_name, attr = dotted.rsplit(".", 1)
            module = importlib.import_module(module_name)
            original = getattr(module, attr)

            @functools.wraps(original)
            def opaque_call(*args, __original=original, __stage=stage, **kwargs):
                audit.report.launches[__stage] += 1
                audit._depth_opaque += 1
                try:
                    return __original(*args, **kwargs)
                finally:
                    audit._depth_opaque -= 1

            self._patch(module, attr, opaque_call)
        self._wrap_uploads()
        self._stack.enter_context(_Mode(self))
        return self

    def _wrap_uploads(self) -> None:
        audit = self
        original_to = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            target = kwargs.get("device")
            for a in args:
                if isinstance(a, (torch.device, str, torch.Tensor)):
                    target = a
            if target is not None and tensor.device.type == "cpu" and not kwargs.get("non_blocking", False):
                if not (len(args) >= 3 and args[2] is True):  # to(device, dtype, non_blocking)
                    audit._record("blocking upload")
            return original_to(tensor, *args, **kwargs)

        self._patch(torch.Tensor, "to", to)
        for name in ("tensor", "as_tensor"):
            original = getattr(torch, name)

            def factory(*args, __original=original, **kwargs):
                if kwargs.get("device") is not None:
                    audit._record("blocking upload")
                return __original(*args, **kwargs)

            self._patch(torch, name, factory)

    def __exit__(self, *exc) -> None:
        self._active = False
        self._stack.close()

    @contextlib.contextmanager
    def allowed(self, kind: str = "allowed read"):
        """Reads inside this block are not recorded (the one documented read of a run)."""
        self._depth_opaque += 1
        try:
            yield
        finally:
            self._depth_opaque -= 1
