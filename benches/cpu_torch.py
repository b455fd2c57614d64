"""The CPU path against PyTorch's CPU SDPA, both through Python in one process (bf16, `[B, S, H, D]`):
forward, then forward + backward, min of N timed calls after one warm-up, ms, and PyTorch's time over ours.

    python/build.sh && pip install --no-deps target/wheels/flash_attn_rs-*.whl   # (and torch)
    T=2 RAYON_NUM_THREADS=2 python3 benches/cpu_torch.py [N]                     # T: PyTorch's threads
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

import flash_attn_rs as fa

torch.set_num_threads(int(os.environ.get("T", "2")))
N = int(sys.argv[1]) if len(sys.argv) > 1 else 9


def best_ms(f):
    f()
    times = []
    for _ in range(N):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


for b, s, h, d, causal in [(1, 1024, 8, 64, True), (4, 256, 8, 128, True), (1, 1024, 8, 128, True), (1, 2048, 4, 64, False)]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(b, s, h, d, dtype=torch.bfloat16)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    gt = g.transpose(1, 2).contiguous()
    ours_f = best_ms(lambda: fa.flash_attn_func(q, k, v, causal=causal))
    torch_f = best_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))
    ours_fb = best_ms(lambda: fa.flash_attn_func(q, k, v, causal=causal).backward(g))
    torch_fb = best_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).backward(gt))
    print(f"B{b} S{s} H{h} D{d} causal={causal}: fwd ours {ours_f:.2f} torch {torch_f:.2f} ({torch_f / ours_f:.2f}x) | "
          f"fwd+bwd ours {ours_fb:.2f} torch {torch_fb:.2f} ({torch_fb / ours_fb:.2f}x)", flush=True)
