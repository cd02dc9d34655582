"""Where the ring's CPU time goes on a GPU (diagnostic, not committed)."""
import cProfile, pstats, io, sys, time, statistics
from pathlib import Path
sys.path.insert(0, ".")
import torch
from benchmarks.simulated_ring import every_rank_holds_mine, fake_group
from lightning_seqpar.ops import ring_attention
from lightning_seqpar.ops._kernels import KERNELS
from lightning_seqpar.ops._merge import _triton_fold
from benchmarks.simulated_ring import _simulated_transfer

dev = "cuda"
def cpu_us(fn, n=200):
    for _ in range(10): fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n): fn()
    cpu = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return cpu

# micro: tiny shapes so the GPU is never the bottleneck
q = torch.randn(1, 32, 256, 128, device=dev, dtype=torch.bfloat16)
k, v = torch.randn_like(q), torch.randn_like(q)
cud = KERNELS["cudnn"]; fl = KERNELS["flash"]
o, l = cud.forward(q, k, v, scale=0.1, causal=False, bias=None)
do = torch.randn_like(q)
acc_o = torch.zeros(1, 256, 32, 128, device=dev).transpose(1, 2); acc_l = torch.zeros(1, 32, 256, device=dev)
kv = torch.stack([k, v])
print("cudnn fwd call us", cpu_us(lambda: cud.forward(q, k, v, scale=0.1, causal=True, bias=None)))
print("cudnn bwd call us", cpu_us(lambda: cud.backward(do, q, k, v, o, l, scale=0.1, causal=True, bias=None)))
print("flash fwd call us", cpu_us(lambda: fl.forward(q, k, v, scale=0.1, causal=True, bias=None)))
print("raw aten cudnn fwd us", cpu_us(lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=0.1)))
fold = _triton_fold()
print("triton fold of 1 block us", cpu_us(lambda: fold([(slice(0, 256), o, l)], (acc_o, acc_l), acc_o, acc_l)))
print("triton fold of 4 blocks us", cpu_us(lambda: fold([(slice(0, 256), o, l)] * 4, (acc_o, acc_l), acc_o, acc_l)))
print("sim transfer us", cpu_us(lambda: _simulated_transfer(kv)))
print("empty us", cpu_us(lambda: torch.empty((2, 1, 32, 256, 128), device=dev)))
print("narrow+contig us", cpu_us(lambda: k.narrow(2, 0, 128).contiguous()))
print("add_ us", cpu_us(lambda: acc_l.add_(acc_l)))
print("get_device_capability us", cpu_us(lambda: torch.cuda.get_device_capability(q.device)))

def ring_case(tokens, causal, reps=20, prof=False):
    qkv = [torch.randn(1, 32, tokens, 128, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    g = torch.randn_like(qkv[0])
    def fwd(): return ring_attention(*qkv, causal=causal, layout="zigzag")
    def step(): torch.autograd.grad(fwd(), qkv, g)
    with fake_group(0, 8), every_rank_holds_mine():
        for name, fn in (("fwd", fwd), ("fwd+bwd", step)):
            for _ in range(3): fn()
            torch.cuda.synchronize()
            cpu, wall = [], []
            for _ in range(reps):
                torch.cuda.synchronize()
                t = time.perf_counter(); fn(); c = time.perf_counter(); torch.cuda.synchronize(); w = time.perf_counter()
                cpu.append((c - t) * 1e3); wall.append((w - t) * 1e3)
            # GPU-only time: the same calls queued behind a long sleep kernel would need graphs; use events
            print(f"ring N=8 {tokens} causal={causal} {name}: cpu {statistics.median(cpu):.3f} ms wall {statistics.median(wall):.3f} ms")
        if prof:
            pr = cProfile.Profile(); pr.enable()
            for _ in range(reps): step()
            torch.cuda.synchronize(); pr.disable()
            s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30); print(s.getvalue()[:6000])

for t in (1024, 4096, 8192):
    for c in (True, False):
        ring_case(t, c, prof=(t == 4096 and c))
