"""Dense calls at decoding shapes from Python, one process (benches/RESULTS.md, "KV-cache decode"): flash_attn_func
without grad routed to the KV cache's decode kernels (the eager threshold set to 0) against the same call with the
routing off (the module's row limit set to 0: one row tile per (sequence, head)) and with the shipped rule, flash_attn_rs.scaled_dot_product_attention, PyTorch's SDPA; eager
back-to-back calls and CUDA-graph replays (device time); us per call, median of 7.
Run on the GPU machine: PYTHONPATH=<the wheel's install dir> python3 benches/py_decode_routes.py"""
import os, statistics, torch, torch.nn.functional as F
import flash_attn_rs as fa
from flash_attn_rs import _torch_impl

def eager_us(fn, n=200, reps=7):
    for _ in range(20): fn()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n): fn()
        b.record(); b.synchronize(); out.append(a.elapsed_time(b) * 1000 / n)
    return statistics.median(out)

def graph_us(fn, n=16, reps=7):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n): fn()
    for _ in range(5): g.replay()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(10): g.replay()
        b.record(); b.synchronize(); out.append(a.elapsed_time(b) * 1000 / (10 * n))
    return statistics.median(out)

rows0 = _torch_impl._DECODE_ROWS
print("DECODE  shape            | func routed  func dense  x | func default | fa sdpa routed  torch sdpa | graph: routed  dense  x  torch sdpa", flush=True)
with torch.no_grad():
    rows = [(1, 256), (1, 512), (1, 1024), (2, 1024), (1, 2048), (1, 4096), (1, 8192), (1, 32768), (8, 8192), (32, 4096), (64, 8192)]
    for n, s in rows[:int(os.environ.get("FA_DECODE_ROUTE_ROWS", len(rows)))]:
        torch.manual_seed(0)
        q = torch.randn(n, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(n, s, 8, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        f = lambda: fa.flash_attn_func(q, k, v)
        sd = lambda: fa.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
        ts = lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
        _torch_impl._DECODE_ROWS = rows0
        default_e = eager_us(f)  # the shipped rule (`_torch_impl._eager_route_pays`)
        min_keys, _torch_impl._EAGER_ROUTE_MIN_KEYS = _torch_impl._EAGER_ROUTE_MIN_KEYS, 0
        r_e, r_g = eager_us(f), graph_us(f)
        sd_e = eager_us(sd)
        _torch_impl._EAGER_ROUTE_MIN_KEYS = min_keys
        _torch_impl._DECODE_ROWS = 0
        d_e, d_g = eager_us(f), graph_us(f)
        _torch_impl._DECODE_ROWS = rows0
        t_e, t_g = eager_us(ts), graph_us(ts)
        print(f"DECODE  N{n} S{s:<6} | {r_e:9.1f} {d_e:10.1f} {d_e / r_e:5.2f} | {default_e:12.1f} | {sd_e:14.1f} {t_e:10.1f} | "
              f"{r_g:13.1f} {d_g:6.1f} {d_g / r_g:5.2f} {t_g:10.1f}", flush=True)
        del q, k, v, qt, kt, vt
        torch.cuda.empty_cache()
