"""Block kernels: one attention call of a ring step that returns (out, lse), and its backward
from the *global* out and lse of the whole ring.

Every kernel takes q, k, v `[B, H, Lq|Lk, D]` of equal head counts, and those whose aten op
handles grouped-query attention itself also fewer K/V heads (`takes_grouped_heads`; otherwise
the caller expands K/V after they have travelled), an optional additive key bias
`[B, 1, 1, Lk]` and a square causal flag. q, k and v may be row ranges of longer tensors (views
whose last dim is unit-stride): the ops pass them so, since a copy of K/V's rows at every ring
step cost as much as a sixth of that step's attention call on an H200 at 8K tokens per rank.
`lse` comes back as `[B, H, Lq]` in the accumulation dtype (float64 for float64 inputs, else
float32).

The fused kernels are torch's private SDPA aten ops, whose signatures move between releases;
they are called by keyword, and `math` (plain matmuls over one block) is always there to fall
back on and to test against.
"""

from __future__ import annotations

import os

import torch

from lightning_seqpar.ops._checks import register_shared_setting

aten = torch.ops.aten


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_grad_dtype(kernel, dtype: torch.dtype) -> torch.dtype:
    """The dtype of `kernel.backward`'s gradients for inputs of `dtype`: the fused kernels
    return the inputs' dtype, the math kernel the accumulation dtype it computes in."""
    return accumulation_dtype(dtype) if isinstance(kernel, MathKernel) else dtype


class MathKernel:
    """Plain matmul attention of one block: exact, any device and dtype, O(Lq*Lk) memory."""

    name = "math"

    @staticmethod
    def _probabilities(q, k, *, scale, causal, bias, lse=None):
        acc = accumulation_dtype(q.dtype)
        scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)).mul_(scale)
        if bias is not None:
            scores = scores + bias.to(acc)
        if causal:
            mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu_(1)
            scores = scores.masked_fill(mask, float("-inf"))
        if lse is None:
            lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.unsqueeze(-1))
        # Rows with no visible key: lse is -inf and exp gives NaN; they contribute nothing.
        probs = probs.masked_fill(~torch.isfinite(lse).unsqueeze(-1), 0.0)
        return probs, lse

    def forward(self, q, k, v, *, scale, causal, bias):
        probs, lse = self._probabilities(q, k, scale=scale, causal=causal, bias=bias)
        return torch.matmul(probs, v.to(probs.dtype)).to(q.dtype), lse

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, bias):
        probs, _ = self._probabilities(q, k, scale=scale, causal=causal, bias=bias, lse=lse)
        acc = probs.dtype
        dout_acc = dout.to(acc)
        dv = torch.matmul(probs.transpose(-1, -2), dout_acc)
        dprobs = torch.matmul(dout_acc, v.to(acc).transpose(-1, -2))
        delta = (dout_acc * out.to(acc)).sum(-1, keepdim=True)
        dscores = probs.mul_(dprobs.sub_(delta)).mul_(scale)
        dq = torch.matmul(dscores, k.to(acc))
        dk = torch.matmul(dscores.transpose(-1, -2), q.to(acc))
        return dq, dk, dv


class CpuFlashKernel:
    """torch's fused CPU flash attention (`_scaled_dot_product_flash_attention_for_cpu`)."""

    name = "cpu_flash"
    grouped_heads = True

    def forward(self, q, k, v, *, scale, causal, bias):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p=0.0, is_causal=causal, attn_mask=bias, scale=scale
        )
        return out, lse.to(accumulation_dtype(q.dtype))

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, bias):
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.to(q.dtype).contiguous(), q, k, v, out.to(q.dtype).contiguous(), lse.to(lse_dtype).contiguous(),
            dropout_p=0.0, is_causal=causal, attn_mask=bias, scale=scale,
        )


class _FusedCudaKernel:
    """Shared plumbing of the CUDA SDPA ops: their backward asks for the forward's philox state
    (unused, since dropout is rejected up front, but shape-checked), so the latest forward's
    state is kept and handed back."""

    def __init__(self):
        self._philox: tuple = (None, None)

    def _philox_state(self, device):
        seed, offset = self._philox
        if seed is None or seed.device != device:
            empty = torch.zeros((), dtype=torch.int64, device=device)
            return empty, empty
        return seed, offset


def _like_forward_output(x: torch.Tensor) -> torch.Tensor:
    """`[B, H, L, D]` values stored as `[B, L, H, D]`, the layout the CUDA SDPA forwards
    return their output in; their backwards read out and grad_out assuming it. No copy when
    `x` is stored so already (the ring converts dout and out once per backward)."""
    if x.transpose(1, 2).is_contiguous():
        return x
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def forward_output_layout(x: torch.Tensor, kernel) -> torch.Tensor:
    """`x` stored the way `kernel`'s backward reads out and grad_out: done once per backward
    instead of once per block."""
    return _like_forward_output(x) if isinstance(kernel, _FusedCudaKernel) else x


def accumulator_like(x: torch.Tensor, dtype: torch.dtype, kernel) -> torch.Tensor:
    """An uninitialised buffer shaped like `x` for summing or merging `kernel`'s results: in
    the kernel's output layout, so each `+=` or merge streams instead of transposing."""
    if isinstance(kernel, _FusedCudaKernel):
        b, h, length, d = x.shape
        return torch.empty((b, length, h, d), dtype=dtype, device=x.device).transpose(1, 2)
    return torch.empty(x.shape, dtype=dtype, device=x.device)


class CudaFlashKernel(_FusedCudaKernel):
    """`_scaled_dot_product_flash_attention` (FlashAttention-2): fp16/bf16, no bias."""

    name = "flash"
    grouped_heads = True

    def forward(self, q, k, v, *, scale, causal, bias):
        result = aten._scaled_dot_product_flash_attention(
            q, k, v, dropout_p=0.0, is_causal=causal, return_debug_mask=False, scale=scale
        )
        self._philox = (result[6], result[7])
        return result[0], result[1].float()

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, bias):
        seed, offset = self._philox_state(q.device)
        return aten._scaled_dot_product_flash_attention_backward(
            _like_forward_output(dout.to(q.dtype)), q, k, v, _like_forward_output(out.to(q.dtype)),
            lse.float().contiguous(), cum_seq_q=None, cum_seq_k=None, max_q=q.size(2), max_k=k.size(2),
            dropout_p=0.0, is_causal=causal, philox_seed=seed, philox_offset=offset, scale=scale,
        )


class CudaCudnnKernel(_FusedCudaKernel):
    """`_scaled_dot_product_cudnn_attention` (cuDNN fused attention): fastest on Hopper."""

    name = "cudnn"
    grouped_heads = True

    def forward(self, q, k, v, *, scale, causal, bias):
        result = aten._scaled_dot_product_cudnn_attention(
            q, k, v, attn_bias=bias, compute_log_sumexp=True, dropout_p=0.0, is_causal=causal,
            return_debug_mask=False, scale=scale,
        )
        self._philox = (result[6], result[7])
        lse = result[1]
        # cuDNN returns the softmax statistics as [B, H, Lq, 1].
        return result[0], lse.reshape(lse.shape[:3]).float()

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, bias):
        seed, offset = self._philox_state(q.device)
        return aten._scaled_dot_product_cudnn_attention_backward(
            _like_forward_output(dout.to(q.dtype)), q, k, v, _like_forward_output(out.to(q.dtype)),
            lse.float().unsqueeze(-1).contiguous(), philox_seed=seed, philox_offset=offset, attn_bias=bias,
            cum_seq_q=None, cum_seq_k=None, max_q=q.size(2), max_k=k.size(2),
            dropout_p=0.0, is_causal=causal, scale=scale,
        )


def _padded_last_dim(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """A copy of `x` whose last dim is zero-padded to a multiple of `multiple`: the aligned
    storage the memory-efficient kernel demands (the public SDPA pads the same way)."""
    size = x.size(-1)
    padded = x.new_zeros(*x.shape[:-1], -(-size // multiple) * multiple)
    padded[..., :size] = x
    return padded


def _aligned_bias(bias: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The `[B, 1, 1, Lk]` key bias as the efficient kernel takes it: `[B, H, Lq, Lk]` (expanded)
    over storage whose rows are padded to 16 elements, since the kernel rejects bias strides
    that aren't multiples of 16 bytes."""
    if bias is None:
        return None
    keys = bias.size(-1)
    if keys % 16:
        bias = _padded_last_dim(bias, 16)[..., :keys]
    return bias.expand(q.size(0), q.size(1), q.size(2), keys)


class CudaEfficientKernel(_FusedCudaKernel):
    """`_scaled_dot_product_efficient_attention` (memory-efficient): any float dtype, bias."""

    name = "efficient"

    def forward(self, q, k, v, *, scale, causal, bias):
        bias = _aligned_bias(bias, q, k)
        result = aten._scaled_dot_product_efficient_attention(
            q, k, v, attn_bias=bias, compute_log_sumexp=True, dropout_p=0.0, is_causal=causal, scale=scale
        )
        self._philox = (result[2], result[3])
        # The lse may come padded along the query dim; keep the real rows.
        return result[0], result[1][..., : q.size(2)].to(accumulation_dtype(q.dtype))

    def backward(self, dout, q, k, v, out, lse, *, scale, causal, bias):
        seed, offset = self._philox_state(q.device)
        bias = _aligned_bias(bias, q, k)
        # Its lse rows, too, must be padded as its forward lays them out (32): short blocks aren't.
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            _like_forward_output(dout.to(q.dtype)), q, k, v, bias, _like_forward_output(out.to(q.dtype)),
            _padded_last_dim(lse.float(), 32), philox_seed=seed, philox_offset=offset, dropout_p=0.0,
            grad_input_mask=[True, True, True, False], is_causal=causal, scale=scale,
        )
        return dq, dk, dv


KERNELS = {k.name: k for k in (MathKernel(), CpuFlashKernel(), CudaFlashKernel(), CudaCudnnKernel(), CudaEfficientKernel())}

KERNEL_ENV = "LIGHTNING_SEQPAR_KERNEL"


def _kernel_from_environment() -> str | None:
    """The kernel `LIGHTNING_SEQPAR_KERNEL` forces (unset or empty: none). An unknown name
    fails here, at import on every rank that has it, not at the first attention call: there
    it would raise on that rank alone, inside the ring, and leave its peers waiting."""
    name = os.environ.get(KERNEL_ENV) or None
    if name is not None and name not in KERNELS:
        raise ValueError(f"{KERNEL_ENV}={name!r} names no block kernel: set it to one of {sorted(KERNELS)}, or unset it")
    return name


_OVERRIDE: str | None = _kernel_from_environment()


def set_block_kernel(name: str | None) -> None:
    """Force one block kernel by name (see `KERNELS`), or None to choose automatically. The
    environment variable LIGHTNING_SEQPAR_KERNEL sets the starting value."""
    global _OVERRIDE
    if name is not None and name not in KERNELS:
        raise ValueError(f"unknown block kernel {name!r}: use one of {sorted(KERNELS)} or None")
    _OVERRIDE = name


def block_kernel_override() -> str | None:
    """The kernel `set_block_kernel` forces, if any."""
    return _OVERRIDE


# Ranks on different kernels could send partial gradients of different dtypes, so sizes.
register_shared_setting("set_block_kernel", lambda: 0 if _OVERRIDE is None else 1 + sorted(KERNELS).index(_OVERRIDE))


def _cudnn_usable(q) -> bool:
    if not hasattr(aten, "_scaled_dot_product_cudnn_attention"):
        return False
    major, _ = torch.cuda.get_device_capability(q.device)
    return major >= 9 and q.size(-1) in (64, 128)


_GROUPED_HEADS: dict = {}


def _grouped_heads_work(kernel, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether `kernel`, given 4 query heads on 2 K/V heads, gives what it gives on each K/V
    head repeated for its 2 query heads (query head h reads K/V head h // 2, as SDPA's
    `enable_gqa` and the ops' expansion do): out and lse, and dK/dV summed over the query heads
    that share a head. Tiny shapes; an error means no (older torch releases reject the head
    mismatch)."""
    gen = torch.Generator(device=device).manual_seed(0)
    q, dout = (torch.randn(1, 4, 16, head_dim, generator=gen, device=device).to(dtype) for _ in range(2))
    k, v = (torch.randn(1, 2, 16, head_dim, generator=gen, device=device).to(dtype) for _ in range(2))
    k2, v2 = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scale = head_dim ** -0.5
    try:
        out, lse = kernel.forward(q, k, v, scale=scale, causal=True, bias=None)
        grads = kernel.backward(dout, q, k, v, out, lse, scale=scale, causal=True, bias=None)
    except RuntimeError:
        return False
    out2, lse2 = kernel.forward(q, k2, v2, scale=scale, causal=True, bias=None)
    dq2, dk2, dv2 = kernel.backward(dout, q, k2, v2, out2, lse2, scale=scale, causal=True, bias=None)
    expected = (out2, lse2, dq2, dk2.unflatten(1, (2, 2)).sum(2), dv2.unflatten(1, (2, 2)).sum(2))
    tolerance = 1e-6 if dtype in (torch.float32, torch.float64) else 2e-2
    return all(
        got.shape == want.shape and torch.allclose(got.float(), want.float(), rtol=tolerance, atol=tolerance)
        for got, want in zip((out, lse, *grads), expected)
    )


def takes_grouped_heads(kernel, q: torch.Tensor) -> bool:
    """Can `kernel` be given K/V with fewer heads than `q` (grouped-query attention)? Then the
    ops skip expanding K/V into a copy at every block call and summing dK/dV back, which on an
    H200 added 15-22% to a 4K-token cuDNN forward call (32 query / 8 K/V heads). Probed once
    per kernel, device type, dtype and head dim."""
    if not getattr(kernel, "grouped_heads", False):
        return False
    key = (kernel.name, q.device.type, q.dtype, q.size(-1))
    if key not in _GROUPED_HEADS:
        with torch.no_grad():
            _GROUPED_HEADS[key] = _grouped_heads_work(kernel, q.device, q.dtype, q.size(-1))
    return _GROUPED_HEADS[key]


def head_expansion(kernel, q: torch.Tensor, k: torch.Tensor) -> int:
    """How many times the ops repeat each K/V head before a block call of `kernel`: 1 where
    the kernel takes grouped heads itself."""
    return 1 if takes_grouped_heads(kernel, q) else q.size(1) // k.size(1)


def select_block_kernel(q: torch.Tensor, has_bias: bool):
    """The kernel for these inputs: the override if set, else the fastest exact one."""
    if _OVERRIDE is not None:
        return KERNELS[_OVERRIDE]
    if q.device.type == "cpu":
        return KERNELS["cpu_flash"]
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        if has_bias:
            return KERNELS["efficient"]
        if _cudnn_usable(q):
            return KERNELS["cudnn"]
        return KERNELS["flash"]
    if q.device.type == "cuda" and q.dtype == torch.float32:
        return KERNELS["efficient"]
    return KERNELS["math"]
