"""One block call of an op that builds its output from several fused calls merged in float32
(the ring and the all-gather op): which rows a call takes, the key padding mask as a bias, and
the rows that see no real key.
"""

from __future__ import annotations

import functools

import torch

from lightning_seqpar.ops._kernels import forward_output_layout

# Stand-in for the lse of "no key seen yet". A finite value keeps the merge free of inf - inf;
# any real lse is larger by ~1e30, so sigmoid weights against it round to exactly 0 or 1.
EMPTY_LSE = -1.0e30


def key_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive `[B, 1, 1, Lk]` bias from a key padding mask (True = real key)."""
    if mask is None:
        return None
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return bias[:, None, None, :]


def rows_without_keys(mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Which query rows of a block see no real key: `[B, 1, Lq or 1]`."""
    if causal:
        return (mask.cumsum(-1) == 0)[:, None, :]
    return (~mask.any(-1))[:, None, None]


def block_forward(kernel, q, k, v, *, scale, causal, key_mask):
    """`kernel.forward` on one block with the keys of `key_mask` (`[B, Lk]` or None) masked;
    rows that see no real key come back as out 0, lse EMPTY_LSE, so merging them changes
    nothing."""
    out, lse = kernel.forward(q, k, v, scale=scale, causal=causal, bias=key_bias(key_mask, q.dtype))
    if key_mask is not None:
        empty = rows_without_keys(key_mask, causal)
        lse = lse.masked_fill(empty, EMPTY_LSE)
        out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    return out, lse


def finish_lse_(lse: torch.Tensor) -> torch.Tensor:
    """+inf on the rows that saw no key at all, so their backward is zero."""
    return lse.masked_fill_(lse < EMPTY_LSE / 2, float("inf"))


def row_view(x: torch.Tensor, rows: slice, dim: int = 2) -> torch.Tensor:
    """Rows of `x` along its sequence dim (2, or 0 for the backward's sequence-major K/V), as
    a view: `narrow` costs a fraction of the CPU time of `x[:, :, rows]`, and the ops make
    several per block."""
    return x.narrow(dim, rows.start, rows.stop - rows.start)


def all_rows(rows: slice, x: torch.Tensor) -> bool:
    """Whether `rows` are every row of `x` (its sequence dim, 2)."""
    return rows.start == 0 and rows.stop == x.size(2)


class RowRanges:
    """Row ranges of one tensor of the local rows, as the block kernels take them (`prepare`
    of each range; by default the range itself, as a view): each range is prepared once per
    call of the op, however many blocks use it (under zigzag, every ring step uses one of the
    same two halves; the all-gather op makes two calls per half)."""

    def __init__(self, x: torch.Tensor, prepare=lambda rows: rows):
        self.x, self._prepare, self._copies = x, prepare, {}

    def __call__(self, rows: slice) -> torch.Tensor:
        if all_rows(rows, self.x):
            return self.x
        key = (rows.start, rows.stop)
        if key not in self._copies:
            self._copies[key] = self._prepare(row_view(self.x, rows))
        return self._copies[key]


def backward_rows(kernel, q, lse, dout, out) -> tuple[RowRanges, RowRanges, RowRanges, RowRanges]:
    """Row ranges of q, lse, dout and out for `kernel.backward`; dout and out are converted to
    the layout that backward reads, and lse ranges made dense as every kernel wants them, once
    per call, not once per block."""
    dout, out = (forward_output_layout(t.to(q.dtype), kernel) for t in (dout, out))
    kernel_layout = functools.partial(forward_output_layout, kernel=kernel)
    return (RowRanges(q), RowRanges(lse, torch.Tensor.contiguous), RowRanges(dout, kernel_layout),
            RowRanges(out, kernel_layout))
