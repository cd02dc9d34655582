"""Would CUDA graphs take the host out of a short ring? One simulated ring rank's forward and
backward (the op's own functions, NCCL transfers included), run eagerly and replayed from a
CUDA graph captured as the op captures it (`lightning_seqpar.ops._graphs._Captured`), each
against one fused SDPA call on the whole sequence (efficiency = SDPA time / (N x rank time),
as in `benchmarks/attention.py`).

A replay here includes copying fresh inputs into the graph's buffers and its outputs out, as an
op that reuses one graph for every layer of a model would have to; "replay alone" leaves those
copies out. The replayed outputs are compared with the eager ones before anything is timed: the
forward bit for bit; the backward differs between two eager calls too (cuDNN's dQ sums in no
fixed order), so its replay must be as close to an eager call as a second eager call is.

    python benchmarks/diagnostics/ring_graph_capture.py --causal --head-dim 64
    python benchmarks/diagnostics/ring_graph_capture.py --causal --head-dim 128 --tokens 8192
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import apply_ring_args, one_shape_parser, time_ms, whole_sequence_sdpa_ms  # noqa: E402
from benchmarks.simulated_ring import every_rank_holds_mine, fake_group  # noqa: E402
from lightning_seqpar.ops._comm import Ring  # noqa: E402
from lightning_seqpar.ops._graphs import _Captured  # noqa: E402
from lightning_seqpar.ops.ring_attention import ring_attention_backward, ring_attention_forward  # noqa: E402


def main():
    parser = one_shape_parser(__doc__, tokens=4096, head_dim=64)
    parser.add_argument("--reps", type=int, default=20)
    a = parser.parse_args()
    apply_ring_args(a)
    if a.transfer != "nccl":
        raise SystemExit("capture the ring with --transfer nccl: the other transfers sync with Python-side events")
    if not torch.cuda.is_available():
        raise SystemExit("CUDA graphs need a CUDA device")
    n, dtype, scale = a.world_size, torch.bfloat16, a.head_dim ** -0.5

    def randn(length):
        return torch.randn(1, a.heads, length, a.head_dim, device="cuda", dtype=dtype)

    sdpa_fwd, sdpa_fwdbwd = whole_sequence_sdpa_ms(a.heads, n * a.tokens, a.head_dim, a.causal, dtype, "cuda", a.reps)

    q, k, v, dout = (randn(a.tokens) for _ in range(4))
    with fake_group(0, n), every_rank_holds_mine():
        ring = Ring()

        def forward(q, k, v):
            return ring_attention_forward(q, k, v, ring, None, causal=a.causal, scale=scale, layout="zigzag")

        out, lse = forward(q, k, v)

        def backward(dout, q, k, v, out, lse):
            return ring_attention_backward(dout, q, k, v, out, lse, ring, None, causal=a.causal, scale=scale, layout="zigzag")

        eager = {"forward": (forward, [q, k, v]), "backward": (backward, [dout, q, k, v, out, lse])}
        rows = []
        for name, (fn, inputs) in eager.items():
            # The two eager calls also make NCCL connect and build cuDNN's plans and Triton's
            # kernels, as the op's first call of a signature does before it captures.
            want, again = fn(*inputs), fn(*inputs)
            captured = _Captured(fn, inputs, group=None)

            def run():
                return captured(inputs)

            got = run()
            for w, e, g in zip(want, again, got):
                eager_gap, replay_gap = ((w.float() - x.float()).abs().max().item() for x in (e, g))
                if replay_gap > 2 * eager_gap:
                    raise AssertionError(f"{name}: the replay differs from an eager call by {replay_gap}, two eager calls by {eager_gap}")
                print(f"{name}: max |replay - eager| {replay_gap:.3g}, max |eager - eager| {eager_gap:.3g}")
            eager_ms = time_ms(lambda: fn(*inputs), "cuda", a.reps)
            replay_ms = time_ms(run, "cuda", a.reps)
            alone_ms = time_ms(captured.graph.replay, "cuda", a.reps)
            rows.append((name, eager_ms, replay_ms, alone_ms))

    sdpa = {"forward": sdpa_fwd, "backward": sdpa_fwdbwd - sdpa_fwd}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {a.tokens} tokens per rank, N = {n}, "
          f"{a.heads} heads x {a.head_dim}, {'causal zigzag' if a.causal else 'non-causal'}, bf16, NCCL transfers to self")
    print(f"{'pass':<10}{'eager ms':>10}{'replay ms':>11}{'alone ms':>10}{'eager eff':>11}{'replay eff':>12}{'alone eff':>11}")
    for name, eager_ms, replay_ms, alone_ms in rows:
        ref = sdpa[name]
        print(f"{name:<10}{eager_ms:>10.3f}{replay_ms:>11.3f}{alone_ms:>10.3f}"
              f"{ref / (n * eager_ms):>11.3f}{ref / (n * replay_ms):>12.3f}{ref / (n * alone_ms):>11.3f}")
    fwd_e, fwd_r = rows[0][1], rows[0][2]
    bwd_e, bwd_r = rows[1][1], rows[1][2]
    print(f"{'fwd+bwd':<10}{fwd_e + bwd_e:>10.3f}{fwd_r + bwd_r:>11.3f}{'':>10}"
          f"{sdpa_fwdbwd / (n * (fwd_e + bwd_e)):>11.3f}{sdpa_fwdbwd / (n * (fwd_r + bwd_r)):>12.3f}")


if __name__ == "__main__":
    main()
