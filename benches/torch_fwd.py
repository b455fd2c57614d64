"""PyTorch's side of the forward comparison, on the same shapes as benches/fwd.rs: SDPA with the flash
backend and with the cuDNN backend, and aten._flash_attention_forward for the ragged varlen batch; and, at
head dim 128 when the flash_attn_rs wheel is importable, our kernels through the Python package
(`flash_attn_func`, backend `python`) and, on the same tensors, through its native call with precomputed
arguments (backend `direct`), and at every head dim `flash_attn_func` timed as the SDPA rows are, right
after them (backend `ours-py`). The score-modifier rows (`mods/...`, benches/fwd.rs's): SDPA flash and
cuDNN without modifiers and with dropout_p = 0.1 (SDPA's flash backend takes no ALiBi bias: the `alibi`
rows are ours only). Prints `RESULT <backend> <shape> <median ms> <TFLOP/s>` lines. CUDA events around
back-to-back calls, warm-up and samples as criterion takes ours (`median_ms`)."""
import os
import sys
import torch

try:
    import flash_attn_rs
except ImportError:
    flash_attn_rs = None
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

MASK64 = (1 << 64) - 1
# benches/common.rs's score-modifier rows: (head dim, seqlen) and the dropout probability.
MODS_SHAPES = [(d, s) for d in (64, 96, 128, 192, 256) for s in (2048, 8192)]
MODS_DROPOUT = 0.1


def ragged_lengths():
    x = 0x9E3779B97F4A7C15
    out = []
    for _ in range(64):
        x ^= (x << 13) & MASK64
        x ^= x >> 7
        x ^= (x << 17) & MASK64
        out.append(64 + x % (4096 - 64 + 1))
    return out


def batch_ms(fn, n):
    """GPU milliseconds of `n` calls queued back to back between two events."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


# benches/common.rs's criterion settings (its `--warm-up-time` / `--measurement-time` flags: set the same here).
WARMUP_S = float(os.environ.get("FA_BENCH_WARMUP_S", "0.3"))
MEASURE_S = float(os.environ.get("FA_BENCH_MEASURE_S", "1.2"))
SAMPLES = 10


def median_ms(fn):
    """Milliseconds per call, timed as criterion times our rows (benches/common.rs): calls back to back in
    doubling batches for WARMUP_S of GPU time, then SAMPLES samples of d, 2d, .., SAMPLES*d back-to-back
    calls (d sized so that they take about MEASURE_S), each between two CUDA events; the median of the
    samples' per-call times. Both sides thus keep the GPU busy for the same time. This script's timing
    before 2026-12-04, 30 single calls with a synchronization after each, left the GPU idle between calls,
    and how long it has been busy matters (ours at hdim 128 S=8192: 645 TFLOP/s in 0.5 s samples, 585 in
    the table's 1.2 s ones)."""
    spent, calls, n = 0.0, 0, 1
    while spent < WARMUP_S * 1e3:
        spent += batch_ms(fn, n)
        calls += n
        n *= 2
    per_call = spent / calls
    d = max(1, round(MEASURE_S * 1e3 / per_call / (SAMPLES * (SAMPLES + 1) / 2)))
    times = sorted(batch_ms(fn, d * i) / (d * i) for i in range(1, SAMPLES + 1))
    return times[len(times) // 2]


def report(backend, name, flops, fn):
    try:
        ms = median_ms(fn)
        print(f"RESULT {backend} {name} {ms:.4f} {flops / (ms * 1e-3) / 1e12:.1f}", flush=True)
    except Exception as e:  # a backend that rejects a shape is reported, not fatal
        print(f"RESULT {backend} {name} nan nan  # {type(e).__name__}: {str(e)[:80]}", flush=True)


def loop_ms(fn, n=10):
    """Milliseconds per call of `n` calls queued back to back between two events, as a training loop
    queues them (a call's host time overlaps the previous call's kernel)."""
    fn()
    return batch_ms(fn, n) / n


def report_pair(name, flops, python, direct_call, rounds=9):
    """`python` and `direct` measured in alternation (rounds of 10 back-to-back calls each, the median of
    the rounds): the clock and power state of the GPU drift over seconds, and the two are compared with
    each other."""
    times = {"python": [], "direct": []}
    for _ in range(rounds):
        for backend, fn in (("python", python), ("direct", direct_call)):
            times[backend].append(loop_ms(fn))
    for backend, ts in times.items():
        ms = sorted(ts)[len(ts) // 2]
        print(f"RESULT {backend} {name} {ms:.4f} {flops / (ms * 1e-3) / 1e12:.1f}", flush=True)


def direct(q, k, v, causal):
    """Our forward through the native module with every argument precomputed: the kernels as a caller holding
    raw pointers runs them, on the same tensors and in the same harness as the Python column."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], device=q.device, dtype=torch.float32)
    desc = lambda t, dt: (t.data_ptr(), dt, tuple(t.shape), t.stride())  # noqa: E731
    dev = ("cuda", q.device.index, torch.cuda.current_stream(q.device).cuda_stream)
    args = (desc(q, "bf16"), desc(k, "bf16"), desc(v, "bf16"), desc(out, "bf16"), desc(lse, "f32"),
            q.shape[-1] ** -0.5, causal, -1, -1, 0.0, dev)
    return lambda: flash_attn_rs._native.fwd(*args)


def selected(name, filt):
    """The run's shape filter: comma-separated substrings, any of them (as FA_BENCH_FILTER in the Rust benches)."""
    return any(f in name for f in filt.split(","))


def main():
    filt = sys.argv[1] if len(sys.argv) > 1 else ""
    torch.manual_seed(0)
    dev = "cuda"
    print("torch", torch.__version__, torch.cuda.get_device_name(0), flush=True)
    tokens = 16384
    for d in (64, 96, 128, 192, 256):
        h = 2048 // d
        for s in (512, 2048, 8192, 16384):
            b = tokens // s
            # SDPA takes [B, H, S, D]; transpose a [B, S, H, D] tensor like flash-attn users do.
            q, k, v = (torch.rand(b, s, h, d, device=dev, dtype=torch.bfloat16).sub_(0.5).transpose(1, 2) for _ in range(3))
            for causal in (False, True):
                name = f"fwd/hdim{d}/s{s}/b{b}/h{h}/causal{int(causal)}"
                if not selected(name, filt):
                    continue
                flops = 4 * b * h * s * s * d / (2 if causal else 1)
                for backend, kind in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    def run(kind=kind, causal=causal):
                        with sdpa_kernel(kind):
                            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    report(backend, name, flops, run)
                if flash_attn_rs is not None:
                    # The [B, S, H, D] tensors the SDPA inputs are transposed views of.
                    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
                    ours = lambda causal=causal: flash_attn_rs.flash_attn_func(qs, ks, vs, causal=causal)  # noqa: E731
                    # Ours timed as the SDPA rows just were, right after them on the same tensors (`ours-py`):
                    # the one comparison that shares a process, a harness and the GPU's recent load.
                    report("ours-py", name, flops, ours)
                    if d == 128:
                        report_pair(name, flops, ours, direct(qs, ks, vs, causal))
    for d, s in MODS_SHAPES:
        h, b = 2048 // d, tokens // s
        q, k, v = (torch.rand(b, s, h, d, device=dev, dtype=torch.bfloat16).sub_(0.5).transpose(1, 2) for _ in range(3))
        for causal in (False, True):
            flops = 4 * b * h * s * s * d / (2 if causal else 1)
            for mod, p in (("none", 0.0), (f"dropout{MODS_DROPOUT}", MODS_DROPOUT)):
                name = f"mods/hdim{d}/s{s}/b{b}/h{h}/causal{int(causal)}/{mod}"
                if not selected(name, filt):
                    continue
                for backend, kind in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    def run(kind=kind, causal=causal, p=p):
                        with sdpa_kernel(kind):
                            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=p)
                    report(backend, name, flops, run)
    lens = ragged_lengths()
    h, d = 16, 128
    total = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
    q, k, v = (torch.rand(total, h, d, device=dev, dtype=torch.bfloat16).sub_(0.5) for _ in range(3))
    mx = max(lens)
    for causal in (False, True):
        name = f"varlen/hdim{d}/ragged64/h{h}/causal{int(causal)}"
        if not selected(name, filt):
            continue
        flops = sum(4 * h * l * l * d for l in lens) / (2 if causal else 1)
        def run(causal=causal):
            return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, mx, mx, 0.0, causal, False, scale=None)
        report("flash", name, flops, run)


if __name__ == "__main__":
    main()
