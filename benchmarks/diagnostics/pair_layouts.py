"""How could a backward give two visiting K/V blocks to one block call, and what does it cost?
(diagnostic)

For one pair of ring steps (queries x two key blocks): the two calls the ring makes today, one
call on the two blocks concatenated (and dK/dV split back into contiguous halves to send home),
and one call on blocks that lie sequence-major ([L, B, H, D], so that each block is one
contiguous range of a pair buffer, and a receive could land in it). Prints times, the layout
cuDNN returns dK in, and the largest difference from the two-call gradients.

    python benchmarks/diagnostics/pair_layouts.py
"""
import itertools
import sys

sys.path.insert(0, ".")
import torch

from benchmarks.common import time_ms
from lightning_seqpar.ops._kernels import select_block_kernel


def us(fn):
    return 1e3 * time_ms(fn, "cuda", 20, warmup=3)


print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | bf16 | 32 heads")
for dim, tokens, q_len in itertools.product((64, 128), (4096, 8192), ("all", "half")):
    h = 32
    lq = tokens if q_len == "all" else tokens // 2
    q = torch.randn(1, h, lq, dim, device="cuda", dtype=torch.bfloat16)
    blocks = [torch.randn(2, 1, h, tokens, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    kernel = select_block_kernel(q, has_bias=False)
    scale = dim ** -0.5
    # A global out/lse that both layouts share: the pair's own forward.
    kcat = torch.cat([b[0] for b in blocks], 2)
    vcat = torch.cat([b[1] for b in blocks], 2)
    out, lse = kernel.forward(q, kcat, vcat, scale=scale, causal=False, bias=None)
    dout = torch.randn_like(out)

    def bwd(k, v):
        return kernel.backward(dout, q, k, v, out, lse, scale=scale, causal=False, bias=None)

    def two_calls():
        return [bwd(b[0], b[1]) for b in blocks]

    def cat_call():
        k = torch.cat([b[0] for b in blocks], 2)
        v = torch.cat([b[1] for b in blocks], 2)
        _, dk, dv = bwd(k, v)
        return [t.narrow(2, i * tokens, tokens).contiguous() for t in (dk, dv) for i in range(2)]

    # Sequence-major pair buffers: K and V each [2L, B, H, D]; block i is rows [iL, (i+1)L).
    kpair = torch.cat([b[0].permute(2, 0, 1, 3) for b in blocks], 0).contiguous()
    vpair = torch.cat([b[1].permute(2, 0, 1, 3) for b in blocks], 0).contiguous()
    kseq, vseq = kpair.permute(1, 2, 0, 3), vpair.permute(1, 2, 0, 3)

    def seq_call():
        _, dk, dv = bwd(kseq, vseq)
        halves = []
        for t in (dk, dv):
            for i in range(2):
                part = t.narrow(2, i * tokens, tokens)
                halves.append(part if part.permute(2, 0, 1, 3).is_contiguous() else part.contiguous())
        return halves, dk

    ref = two_calls()
    _, dk_seq, _ = bwd(kseq, vseq)
    got, dk_layout = seq_call()
    err = max((got[i].float() - ref[i % 2][1 + i // 2].float()).abs().max().item() for i in range(4))
    f_contig = us(lambda: kernel.forward(q, blocks[0][0], blocks[0][1], scale=scale, causal=False, bias=None))
    kone, vone = kseq.narrow(2, 0, tokens), vseq.narrow(2, 0, tokens)
    f_seq = us(lambda: kernel.forward(q, kone, vone, scale=scale, causal=False, bias=None))
    print(f"D={dim} Lq={lq} Lk={tokens}: backward two calls {us(two_calls):7.0f} us | cat+call+split {us(cat_call):7.0f} us | "
          f"seq-major call {us(seq_call):7.0f} us (dK strides {tuple(dk_layout.stride())}, max diff {err:.1e}) | "
          f"forward one block contiguous {f_contig:6.0f} us, seq-major {f_seq:6.0f} us", flush=True)
