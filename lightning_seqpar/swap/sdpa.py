"""Modules whose forward calls `F.scaled_dot_product_attention`: found by reading their code,
redirected to the ring while they run.

Detection reads bytecode, not source: a forward (or a method of the same class, or a function
of its module, that it calls, a few levels deep) that names `scaled_dot_product_attention`.
The redirect is a `TorchFunctionMode` entered by a forward pre-hook and left by a forward hook,
so it catches the call however the function was imported, and it reaches nothing outside the
module's own forward.
"""

from __future__ import annotations

import inspect
import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_seqpar.swap.context import active_context
from lightning_seqpar.swap.masks import decode_sdpa_mask, settle_causal

SDPA_NAME = "scaled_dot_product_attention"
_MAX_DEPTH = 3


def _code_objects(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _function_calls_sdpa(fn, owner: type | None, depth: int, seen: set) -> bool:
    fn = inspect.unwrap(getattr(fn, "__func__", fn))
    code = getattr(fn, "__code__", None)
    if code is None or code in seen or depth > _MAX_DEPTH:
        return False
    seen.add(code)
    fn_globals = getattr(fn, "__globals__", {})
    for block in _code_objects(code):
        if SDPA_NAME in block.co_names:
            return True
        for name in block.co_names:
            # A helper method of the same class, or a plain function of the defining module.
            candidate = inspect.getattr_static(owner, name, None) if owner is not None else None
            if candidate is None:
                candidate = fn_globals.get(name)
            if isinstance(candidate, (staticmethod, classmethod)):
                candidate = candidate.__func__
            if isinstance(candidate, types.FunctionType) and _function_calls_sdpa(candidate, owner, depth + 1, seen):
                return True
    return False


def calls_sdpa(module: nn.Module) -> bool:
    """Whether the module's own forward (not its children's) calls scaled_dot_product_attention."""
    forward = type(module).forward
    if forward is nn.Module.forward:
        return False
    return _function_calls_sdpa(forward, type(module), 0, set())


def sdpa_through_ring(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """`F.scaled_dot_product_attention` for local chunks: `[B, H, L_local, D]` each."""
    ring = active_context()
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(
            f"scaled_dot_product_attention under sequence parallelism needs [B, H, L_local, D] "
            f"inputs, got query {tuple(query.shape)} and key {tuple(key.shape)}"
        )
    batch, _, q_len, _ = query.shape
    k_len = key.size(2)
    if k_len != q_len:
        raise ValueError(
            f"scaled_dot_product_attention under sequence parallelism needs keys cut like the "
            f"queries (same local length), got {q_len} queries and {k_len} keys (a KV cache or "
            f"attention to a sequence that isn't cut is not supported)"
        )
    key_padding_mask, causal = None, bool(is_causal)
    if attn_mask is not None:
        try:
            key_padding_mask, kind = decode_sdpa_mask(attn_mask, batch, q_len, k_len)
        except ValueError as err:
            settle_causal(err, ring.group)
            raise
        # torch >= 2.5 takes a mask beside is_causal=True and applies both: a key padding mask
        # with causal attention, which the ring computes exactly.
        causal = settle_causal(kind, ring.group) or bool(is_causal)
    return ring.attention(
        query, key, value, causal=causal, scale=scale, key_padding_mask=key_padding_mask, dropout_p=dropout_p
    )


class _RedirectSDPA(TorchFunctionMode):
    """Sends scaled_dot_product_attention to the active ring; every other function runs as is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and active_context() is not None:
            return sdpa_through_ring(*args, **kwargs)
        return func(*args, **kwargs)


class _RedirectState:
    """One mode for every redirected module of the process; nested modules enter it once."""

    depth = 0
    mode: _RedirectSDPA | None = None


def _enter(module, args) -> None:
    if active_context() is None:
        return
    if _RedirectState.depth == 0:
        _RedirectState.mode = _RedirectSDPA()
        _RedirectState.mode.__enter__()
    _RedirectState.depth += 1


def _exit(module, args, output) -> None:
    if _RedirectState.depth == 0:
        return
    _RedirectState.depth -= 1
    if _RedirectState.depth == 0:
        mode, _RedirectState.mode = _RedirectState.mode, None
        mode.__exit__(None, None, None)


def redirect_sdpa(module: nn.Module) -> tuple:
    """Route the module's SDPA calls through the active ring; returns handles to undo it."""
    pre = module.register_forward_pre_hook(_enter)
    post = module.register_forward_hook(_exit, always_call=True)
    return pre, post
