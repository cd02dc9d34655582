"""What the backward's layout copies cost, and whether moving rows in wide words speeds them up.

The ring's backward copies K and V to sequence-major (`[L, B, H, D]`) and dout to the layout the
fused kernels' backward reads (`[B, L, H, D]` storage). torch's copy of a permuted tensor moves one
element per computed index; `rows` views each row as 16-, 8- or 4-byte words first (a trial
that was not kept: results/layout_copies_h100.txt). Times each way against a plain copy of the
same bytes (event-timed medians):

    python benchmarks/diagnostics/layout_copies.py
"""

import sys

sys.path.insert(0, ".")
import torch  # noqa: E402

from benchmarks.common import time_ms  # noqa: E402

# Widest words a row copy moves: complex128 is 16 bytes, copied bit for bit.
WORDS = ((16, torch.complex128), (8, torch.int64), (4, torch.int32))


def as_words(t: torch.Tensor, width: int, word: torch.dtype):
    """`t` viewed as `word`s along its last dim, or None where its rows can't be."""
    if t.stride(-1) != 1 or (t.size(-1) * t.element_size()) % width:
        return None
    ratio = width // t.element_size()
    if t.storage_offset() % ratio or any(stride % ratio for stride in t.stride()[:-1]):
        return None
    return t.view(word)


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """`dst.copy_(src)` in the widest words both tensors' rows allow."""
    for width, word in WORDS:
        if width > src.element_size():
            wide_dst, wide_src = as_words(dst, width, word), as_words(src, width, word)
            if wide_dst is not None and wide_src is not None:
                wide_dst.copy_(wide_src)
                return dst
    return dst.copy_(src)


def us(fn) -> float:
    return time_ms(fn, "cuda", 50, warmup=5) * 1e3


print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__}; times in us (median of 50)")
print(f"{'shape [B, H, L, D]':>22s} {'dtype':>9s} {'MiB':>5s} | {'plain copy':>10s} | {'seq-major torch':>15s} {'rows':>6s} | "
      f"{'B,L,H,D torch':>13s} {'rows':>6s}")
for shape in ((1, 32, 4096, 128), (1, 32, 4096, 64), (1, 32, 8192, 128), (2, 8, 8192, 64)):
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(shape, device="cuda").to(dtype)
        b, h, length, d = shape
        flat = torch.empty_like(x)
        seq = torch.empty((length, b, h, d), device="cuda", dtype=dtype)
        blhd = torch.empty((b, length, h, d), device="cuda", dtype=dtype).transpose(1, 2)
        src_seq = x.permute(2, 0, 1, 3)
        for dst, src in ((seq, src_seq), (blhd, x)):
            copy_rows(dst, src)
            assert torch.equal(dst, src)
        print(f"{str(list(shape)):>22s} {str(dtype)[6:]:>9s} {x.numel() * x.element_size() / 2**20:5.0f} | {us(lambda: flat.copy_(x)):10.1f} | "
              f"{us(lambda: seq.copy_(src_seq)):15.1f} {us(lambda: copy_rows(seq, src_seq)):6.1f} | "
              f"{us(lambda: blhd.copy_(x)):13.1f} {us(lambda: copy_rows(blhd, x)):6.1f}")
