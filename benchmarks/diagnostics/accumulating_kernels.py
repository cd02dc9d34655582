"""Would a block kernel that folds each block into a running output pay for itself? (diagnostic)

The ring's block calls go to cuDNN through SDPA's aten op, which returns (out, lse) for one
block; the blocks are then folded by a separate kernel. Folding inside the attention kernel
would save that pass, but none of torch's fused backends takes a running output, so such a
kernel would have to be written from one whose source we can change: FlexAttention, the
Triton attention torch ships (it also returns the lse). This times one rank's ring calls
(`attention.py`'s "calls alone", zigzag, rank 0) with each kernel: cuDNN (the ring's), flash
(torch's FlashAttention-2 op) and compiled FlexAttention. A kernel that folds in is at best
as fast as the kernel it is built from, so FlexAttention's column is the ceiling of that
route. Prints efficiency = SDPA on the whole sequence / (N x the calls' time), forward and
forward+backward; every kernel's out and lse are first checked against float32 matmul
attention on two heads of the first two calls (under a causal mask: the own block's square
causal call and a visiting block's full one).

    python benchmarks/diagnostics/accumulating_kernels.py --tokens 4096 8192
"""
import argparse
import itertools
import sys

sys.path.insert(0, ".")
import torch

from benchmarks.common import card, time_block_calls, time_ms, whole_sequence_sdpa_ms
from lightning_seqpar.ops._kernels import KERNELS
from lightning_seqpar.ops._pieces import causal_step_tasks

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
parser.add_argument("--world-size", type=int, default=8)
parser.add_argument("--heads", type=int, default=32)
parser.add_argument("--reps", type=int, default=10)
a = parser.parse_args()
if not torch.cuda.is_available():
    sys.exit("accumulating_kernels.py times CUDA kernels: run it on a machine with a GPU")
from torch.nn.attention import flex_attention as flex_module  # noqa: E402

create_block_mask, flex_attention = flex_module.create_block_mask, flex_module.flex_attention
# The lse is asked for by `return_aux` where torch has it; `return_lse` is its deprecated form.
LSE = {"return_aux": flex_module.AuxRequest(lse=True)} if hasattr(flex_module, "AuxRequest") else {"return_lse": True}

n, dtype = a.world_size, torch.bfloat16
# Every call shape (and the checks' two-head ones) compiles its own kernel; past dynamo's
# default limit of 8 FlexAttention falls back to its unfused form and times nothing useful.
torch._dynamo.config.recompile_limit = 256
compiled_flex = torch.compile(flex_attention, dynamic=False)


class Flex:
    """FlexAttention through `torch.compile`, returning (out, lse) as the block kernels do."""

    name = "flex"

    def __init__(self):
        self._masks = {}

    def _mask(self, lq, lk):
        if (lq, lk) not in self._masks:
            self._masks[lq, lk] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, lq, lk, device="cuda")
        return self._masks[lq, lk]

    def forward(self, q, k, v, *, scale, causal):
        mask = self._mask(q.size(2), k.size(2)) if causal else None
        out, aux = compiled_flex(q, k, v, block_mask=mask, scale=scale, **LSE)
        return out, getattr(aux, "lse", aux)


def reference(q, k, v, scale, causal):
    """float32 matmul attention: (out, lse)."""
    return KERNELS["math"].forward(q.float(), k.float(), v.float(), scale=scale, causal=causal, bias=None)


def checked(name, forward, q, k, v, scale, causal):
    """Max relative error of a kernel's out and lse on two heads of a call, against `reference`."""
    q, k, v = (t[:, :2].contiguous() for t in (q, k, v))
    out, lse = forward(q, k, v)
    want_out, want_lse = reference(q, k, v, scale, causal)
    err = max(((out.float() - want_out).norm() / want_out.norm()).item(),
              ((lse.float() - want_lse).norm() / want_lse.norm()).item())
    if err > 2e-2:
        raise AssertionError(f"{name} is wrong on a {tuple(q.shape)} x {tuple(k.shape)} call (causal={causal}): rel err {err:.2e}")
    return err


def time_flex(flex, calls, scale):
    """Forward, and forward+backward (autograd through FlexAttention's own backward), ms."""
    def forward():
        for q, k, v, c in calls:
            flex.forward(q, k, v, scale=scale, causal=c)

    leaves = [tuple(t.detach().requires_grad_() for t in (q, k, v)) + (c,) for q, k, v, c in calls]
    douts = [torch.randn_like(q) for q, *_ in leaves]

    def forward_backward():
        for (q, k, v, c), dout in zip(leaves, douts):
            out, _ = flex.forward(q, k, v, scale=scale, causal=c)
            torch.autograd.grad(out, (q, k, v), dout)

    return time_ms(forward, "cuda", a.reps), time_ms(forward_backward, "cuda", a.reps)


flex = Flex()
print(f"# {card('cuda')} | torch {torch.__version__} | bf16 | {a.heads} heads | N = {n}, rank 0 of zigzag")
print(f"{'D':>4} {'mask':>7} {'tok':>6} {'kernel':>6} {'calls':>5} {'err':>8} | {'fwd ms':>7} {'eff':>5} | {'f+b ms':>7} {'eff':>5}")
for dim, causal, tokens in itertools.product(a.head_dims, [False, True], a.tokens):
    sdpa_f, sdpa_fb = whole_sequence_sdpa_ms(a.heads, n * tokens, dim, causal, dtype, "cuda", a.reps)
    q, k, v = (torch.randn(1, a.heads, tokens, dim, device="cuda", dtype=dtype) for _ in range(3))
    scale = dim ** -0.5
    tasks = [t for s in range(n) for t in causal_step_tasks(0, (0 - s) % n, n, tokens, "zigzag", causal)]
    calls = [(q[:, :, t.q].contiguous(), k[:, :, t.k].contiguous(), v[:, :, t.k].contiguous(), t.causal) for t in tasks]
    for name in ("cudnn", "flash", "flex"):
        errors = []
        for cq, ck, cv, c in calls[:2]:
            if name == "flex":
                fwd = lambda x, y, z, c=c: flex.forward(x, y, z, scale=scale, causal=c)  # noqa: E731
            else:
                fwd = lambda x, y, z, c=c: KERNELS[name].forward(x, y, z, scale=scale, causal=c, bias=None)  # noqa: E731
            errors.append(checked(name, fwd, cq, ck, cv, scale, c))
        f, fb = time_flex(flex, calls, scale) if name == "flex" else time_block_calls(KERNELS[name], calls, scale, "cuda", a.reps)
        print(f"{dim:>4} {'causal' if causal else 'full':>7} {tokens:>6} {name:>6} {len(calls):>5} {max(errors):8.1e} | "
              f"{f:7.3f} {sdpa_f / (n * f):5.3f} | {fb:7.3f} {sdpa_fb / (n * fb):5.3f}", flush=True)
