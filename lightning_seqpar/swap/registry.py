"""Which attention classes run through the ring, and how: `register_attention`."""

from __future__ import annotations

from typing import Callable

from torch import nn

from lightning_seqpar.swap.multihead import check_multihead_attention, multihead_attention_ring_forward

# ring_forward(module, ring: RingContext, *forward_args, **forward_kwargs) -> forward's output
RingForward = Callable[..., object]


class _Entry:
    def __init__(self, ring_forward: RingForward, check: Callable[[nn.Module], None] | None):
        self.ring_forward = ring_forward
        self.check = check


_REGISTRY: dict[type, _Entry] = {}


def register_attention(
    module_class: type,
    ring_forward: RingForward | None = None,
    *,
    check: Callable[[nn.Module], None] | None = None,
):
    """Run every instance of `module_class` through the ring under `SeqParStrategy`.

    `ring_forward(module, ring, *args, **kwargs)` replaces the module's forward during a run
    and takes the same arguments; `ring` is a `RingContext` whose `ring.attention(q, k, v,
    causal=..., scale=..., key_padding_mask=...)` computes exact attention of the local queries
    `[B, Hq, L_local, D]` over the whole sequence. Global positions of the local tokens are in
    `trainer.strategy.position_ids`. `check(module)`, if given, runs at swap time and may raise
    for configurations your forward can't handle.

    The module keeps its parameters and `state_dict` keys. Subclasses that don't override
    `forward` are covered too. Usable as a decorator: `@register_attention(MyAttention)` on
    the ring forward function.
    """
    if not isinstance(module_class, type) or not issubclass(module_class, nn.Module):
        raise TypeError(f"register_attention needs an nn.Module subclass, got {module_class!r}")
    if ring_forward is None:
        def decorate(fn: RingForward) -> RingForward:
            register_attention(module_class, fn, check=check)
            return fn
        return decorate
    if not callable(ring_forward):
        raise TypeError(f"ring_forward must be callable, got {ring_forward!r}")
    _REGISTRY[module_class] = _Entry(ring_forward, check)
    return ring_forward


def unregister_attention(module_class: type) -> None:
    """Undo `register_attention` (the built-in nn.MultiheadAttention entry included)."""
    _REGISTRY.pop(module_class, None)


# model_hook(model) -> ModelRouting | None: routes whole models that bring their own attention
# dispatch (e.g. transformers' attention-function registry); see `register_model_hook`.
_MODEL_HOOKS: list[Callable] = []


def register_model_hook(hook: Callable) -> Callable:
    """Let `hook(model)` route models of a library through the ring during `swap_attention`.

    The hook returns None when `model` holds nothing of its kind, else an object with
    `modules` (qualified name -> attention module it routes; counted and reported like
    registered modules, and skipped by the rest of the swap), `label` (how the report names
    them) and `remove()` (undo, called by `restore_attention`). Registering twice is a no-op.
    """
    if hook not in _MODEL_HOOKS:
        _MODEL_HOOKS.append(hook)
    return hook


def model_hooks() -> tuple[Callable, ...]:
    return tuple(_MODEL_HOOKS)


def registered_entry(module: nn.Module) -> tuple[type, _Entry] | None:
    """The entry for `module`: its class's own, or a base class's when forward isn't overridden."""
    for cls in type(module).__mro__:
        entry = _REGISTRY.get(cls)
        if entry is not None and type(module).forward is cls.forward:
            return cls, entry
    return None


register_attention(nn.MultiheadAttention, multihead_attention_ring_forward, check=check_multihead_attention)
