"""Host time per eager call (us) of the KV cache path from Python, decode shape N1 S1024 Hq32 Hk8 D128 bf16: where
kvcache_fast's time goes (torch's allocations and fill, the native call, the Python around it). GPU machine:
PYTHONPATH=<the wheel's install dir> python3 benches/py_kvcache_host.py"""
import cProfile, pstats, time, torch
import flash_attn_rs as fa
from flash_attn_rs import _torch_impl as ti

def host_us(fn, n=2000):
    for _ in range(50): fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6

torch.manual_seed(0)
q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 1024, 8, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
lens = torch.full((1,), 1024, dtype=torch.int32, device="cuda")
def routed():
    min_keys, ti._EAGER_ROUTE_MIN_KEYS = ti._EAGER_ROUTE_MIN_KEYS, 0
    try:
        return fa.flash_attn_func(q, k, v)
    finally:
        ti._EAGER_ROUTE_MIN_KEYS = min_keys

with torch.no_grad():
    rows = {
        "torch.full": lambda: torch.full((1,), 1024, dtype=torch.int32, device="cuda"),
        "torch.empty": lambda: torch.empty(q.shape, dtype=q.dtype, device=q.device),
        "current_device": lambda: torch.cuda.current_device(),
        "flash_attn_func (routed)": routed,
        "kvcache_fast, int seqlens": lambda: ti.kvcache_fast(q, k, v, None, None, None, None, 1024, None, None, None, None, False, (-1, -1), 0.0, False, None, 0),
        "kvcache_fast, tensor seqlens": lambda: ti.kvcache_fast(q, k, v, None, None, None, None, lens, None, None, None, None, False, (-1, -1), 0.0, False, None, 0),
        "flash_attn_with_kvcache, tensor": lambda: fa.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens),
    }
    out, lse = ti.kvcache_fast(q, k, v, None, None, None, None, lens, None, None, None, None, False, (-1, -1), 0.0, False, None, 0)
    args = (ti._kv_desc(q), ti._kv_desc(k), ti._kv_desc(v), ti._kv_desc(lens), ti._kv_desc(out), ti._kv_desc(lse),
            128 ** -0.5, False, -1, -1, 0.0, False, 0, ti._device(q))
    need = ti._native.fwd_kvcache(*args)
    ws = torch.empty(max(need, 1), dtype=torch.uint8, device="cuda")
    rows["native fwd_kvcache, args precomputed"] = lambda: ti._native.fwd_kvcache(*args, workspace=(ws.data_ptr(), need))
    rows["native fwd_kvcache, size query only"] = lambda: ti._native.fwd_kvcache(*args)
    rows["_device(q)"] = lambda: ti._device(q)
    rows0, ti._DECODE_ROWS = ti._DECODE_ROWS, 0
    rows["flash_attn_func (dense)"] = lambda: fa.flash_attn_func(q, k, v)
    rows["sdpa (routed)"] = lambda: fa.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)
    for name, fn in rows.items():
        print(f"PROF {name:<40} {host_us(fn):8.1f} us", flush=True)
    ti._DECODE_ROWS = rows0
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(2000):
        ti.kvcache_fast(q, k, v, None, None, None, None, 1024, None, None, None, None, False, (-1, -1), 0.0, False, None, 0)
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(12)
