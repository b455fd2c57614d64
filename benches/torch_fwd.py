"""PyTorch's side of the forward comparison, on the same shapes as benches/fwd.rs: SDPA with the flash
backend and with the cuDNN backend, and aten._flash_attention_forward for the ragged varlen batch; and, at
head dim 128 when the flash_attn_rs wheel is importable, our kernels through the Python package
(`flash_attn_func`, backend `python`). Prints `RESULT <backend> <shape> <median ms> <TFLOP/s>` lines. CUDA
events, warm-up, median of 30."""
import sys
import torch

try:
    import flash_attn_rs
except ImportError:
    flash_attn_rs = None
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

MASK64 = (1 << 64) - 1


def ragged_lengths():
    x = 0x9E3779B97F4A7C15
    out = []
    for _ in range(64):
        x ^= (x << 13) & MASK64
        x ^= x >> 7
        x ^= (x << 17) & MASK64
        out.append(64 + x % (4096 - 64 + 1))
    return out


def median_ms(fn, iters=30, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def report(backend, name, flops, fn):
    try:
        ms = median_ms(fn)
        print(f"RESULT {backend} {name} {ms:.4f} {flops / (ms * 1e-3) / 1e12:.1f}", flush=True)
    except Exception as e:  # a backend that rejects a shape is reported, not fatal
        print(f"RESULT {backend} {name} nan nan  # {type(e).__name__}: {str(e)[:80]}", flush=True)


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
                if filt not in name:
                    continue
                flops = 4 * b * h * s * s * d / (2 if causal else 1)
                for backend, kind in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    def run(kind=kind, causal=causal):
                        with sdpa_kernel(kind):
                            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    report(backend, name, flops, run)
                if flash_attn_rs is not None and d == 128:
                    # The [B, S, H, D] tensors the SDPA inputs are transposed views of.
                    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
                    report("python", name, flops, lambda causal=causal: flash_attn_rs.flash_attn_func(qs, ks, vs, causal=causal))
    lens = ragged_lengths()
    h, d = 16, 128
    total = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
    q, k, v = (torch.rand(total, h, d, device=dev, dtype=torch.bfloat16).sub_(0.5) for _ in range(3))
    mx = max(lens)
    for causal in (False, True):
        name = f"varlen/hdim{d}/ragged64/h{h}/causal{int(causal)}"
        if filt not in name:
            continue
        flops = sum(4 * h * l * l * d for l in lens) / (2 if causal else 1)
        def run(causal=causal):
            return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, mx, mx, 0.0, causal, False, scale=None)
        report("flash", name, flops, run)


if __name__ == "__main__":
    main()
