"""Swapping a model's attention for the ring, and undoing it.

Nothing is replaced: a registered module gets an instance-level `forward` that calls its ring
forward, an SDPA-calling module gets two hooks. Parameters, their identity, and `state_dict`
keys stay as they were, so optimizers, DDP, checkpoints and the spawn launcher's copy-back of
weights all see the model the user built.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from lightning_seqpar.swap.context import active_context
from lightning_seqpar.swap.registry import model_hooks, registered_entry
from lightning_seqpar.swap.sdpa import calls_sdpa, redirect_sdpa

_MARK = "_seqpar_swapped"


def _call_ring_forward(ring_forward, module: nn.Module, *args, **kwargs):
    ring = active_context()
    if ring is None:
        # Outside a sequence-parallel run the module is its own single-device self.
        return type(module).forward(module, *args, **kwargs)
    return ring_forward(module, ring, *args, **kwargs)


@dataclass
class SwapReport:
    """What `swap_attention` did: module names by kind, and attention-like modules left alone."""

    registered: dict[str, str] = field(default_factory=dict)  # qualified name -> class name
    sdpa: dict[str, str] = field(default_factory=dict)
    left_alone: dict[str, str] = field(default_factory=dict)
    _undo: list = field(default_factory=list, repr=False)

    @property
    def count(self) -> int:
        return len(self.registered) + len(self.sdpa)

    def describe(self) -> str:
        kinds = Counter(self.registered.values())
        parts = [f"{n} × {cls}" for cls, n in sorted(kinds.items())]
        parts += [f"{n} × {cls} (SDPA)" for cls, n in sorted(Counter(self.sdpa.values()).items())]
        text = ", ".join(parts) if parts else "nothing"
        if self.left_alone:
            alone = ", ".join(f"{n} × {cls}" for cls, n in sorted(Counter(self.left_alone.values()).items()))
            text += f"; left alone: {alone}"
        return text


def _looks_like_attention(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower() or "attn" in type(module).__name__.lower()


def swap_attention(model: nn.Module) -> SwapReport:
    """Make every registered attention module and every module whose forward calls
    `F.scaled_dot_product_attention` run through the ring while a `RingContext` is active.

    Raises ValueError (from a registered check) for modules the ring can't reproduce.
    Already swapped modules are left as they are. Undo with `restore_attention(report)`.
    """
    report = SwapReport()
    for hook in model_hooks():
        routing = hook(model)
        if routing is None:
            continue
        report._undo.append((model, [routing]))
        for module in routing.modules.values():
            setattr(module, _MARK, ("registered", f"{type(module).__name__} ({routing.label})"))
            report._undo.append((module, []))
    for name, module in model.named_modules():
        if getattr(module, _MARK, None):
            kind, label = getattr(module, _MARK)
            (report.registered if kind == "registered" else report.sdpa)[name] = label or type(module).__name__
            continue
        found = registered_entry(module)
        if found is not None:
            _, entry = found
            if entry.check is not None:
                entry.check(module)
            module.forward = functools.partial(_call_ring_forward, entry.ring_forward, module)
            setattr(module, _MARK, ("registered", None))
            report.registered[name] = type(module).__name__
            report._undo.append((module, None))
        elif calls_sdpa(module):
            handles = redirect_sdpa(module)
            setattr(module, _MARK, ("sdpa", None))
            report.sdpa[name] = type(module).__name__
            report._undo.append((module, handles))
    swapped = set(report.registered) | set(report.sdpa)
    for name, module in model.named_modules():
        if name in swapped or not _looks_like_attention(module):
            continue
        inside = any(name.startswith(s + ".") for s in swapped if s)
        holds = any(s.startswith(name + ".") or name == "" for s in swapped)
        if not inside and not holds:
            report.left_alone[name] = type(module).__name__
    return report


def restore_attention(report: SwapReport) -> None:
    """Undo `swap_attention`: original forwards, no hooks."""
    for module, handles in report._undo:
        if handles is None:
            module.__dict__.pop("forward", None)
        else:
            for handle in handles:
                handle.remove()
        module.__dict__.pop(_MARK, None)
    report._undo.clear()
