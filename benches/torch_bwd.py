"""PyTorch's side of the backward comparison, on the shapes (and shape names) of benches/bwd.rs: SDPA with
the flash backend and with the cuDNN backend, and aten._flash_attention_forward / _backward for the ragged
varlen batch; on the score-modifier rows (`mods/...`) SDPA flash and cuDNN without modifiers and with
dropout_p = 0.1 (no ALiBi there); with the flash_attn_rs wheel importable, ours through flash_attn_func on
the dense rows, right after them (`ours-py`). Each is timed twice: the backward alone (given one forward's
graph or outputs) and forward + backward. Prints `RESULT <backend>-bwd|<backend>-fwdbwd <shape> <median ms>
<TFLOP/s>` lines, or `SKIPPED <backend>-<kind> <shape>: <error>` where a backend rejects a shape or an op is
missing. CUDA events around back-to-back calls, timed as criterion times ours (torch_fwd.py's `median_ms`).
FLOPs: backward 2.5x the forward's 4*B*H*Sq*Sk*D (halved for causal), forward + backward 3.5x."""
import sys
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from torch_fwd import MODS_DROPOUT, MODS_SHAPES, flash_attn_rs, median_ms, ragged_lengths, selected

BWD_FLOPS, FWDBWD_FLOPS = 2.5, 3.5


def report(backend, name, flops, make):
    """Time the function `make()` returns; an exception from either is a SKIPPED line, never fatal."""
    try:
        ms = median_ms(make())
    except Exception as e:
        msg = " ".join(str(e).split())[:160]
        print(f"SKIPPED {backend} {name}: {type(e).__name__}: {msg}", flush=True)
        return
    print(f"RESULT {backend} {name} {ms:.4f} {flops / (ms * 1e-3) / 1e12:.1f}", flush=True)


def bench_pair(backend, name, fwd_flops, forward, backward):
    """`forward()` returns what `backward(it)` needs: time the backward alone on one forward's result, then both."""
    def bwd_only():
        saved = forward()  # once, outside the timing
        return lambda: backward(saved)

    def fwd_bwd():
        return lambda: backward(forward())

    report(f"{backend}-bwd", name, BWD_FLOPS * fwd_flops, bwd_only)
    report(f"{backend}-fwdbwd", name, FWDBWD_FLOPS * fwd_flops, fwd_bwd)


def rand(*shape):
    """Uniform in [-0.5, 0.5), bf16, on the GPU."""
    return torch.rand(*shape, device="cuda", dtype=torch.bfloat16).sub_(0.5)


def main():
    filt = sys.argv[1] if len(sys.argv) > 1 else ""
    torch.manual_seed(0)
    print("torch", torch.__version__, torch.cuda.get_device_name(0), flush=True)
    tokens = 16384
    for d in (64, 96, 128, 192, 256):
        h = 2048 // d
        for s in (512, 2048, 8192, 16384):
            b = tokens // s
            # SDPA takes [B, H, S, D]: transposed views of [B, S, H, D] leaves, as flash-attn users have them;
            # dout in the same layout. Gradients are taken with respect to the views, so the timed backward is
            # SDPA's own node only.
            q, k, v = (rand(b, s, h, d).requires_grad_().transpose(1, 2) for _ in range(3))
            dout = rand(b, s, h, d).transpose(1, 2)
            for causal in (False, True):
                name = f"fwd/hdim{d}/s{s}/b{b}/h{h}/causal{int(causal)}"
                if not selected(name, filt):
                    continue
                flops = 4 * b * h * s * s * d / (2 if causal else 1)
                for backend, kind in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    def forward(kind=kind, causal=causal):
                        with sdpa_kernel(kind):
                            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                    def backward(out):
                        return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

                    bench_pair(backend, name, flops, forward, backward)
                if flash_attn_rs is not None:
                    # Ours through flash_attn_func (its custom op's backward node) on the same leaves, timed
                    # right after the SDPA rows (`ours-py`): the comparison within one process and harness.
                    qs, ks, vs, dos = (t.transpose(1, 2) for t in (q, k, v, dout))

                    def forward(causal=causal):
                        return flash_attn_rs.flash_attn_func(qs, ks, vs, causal=causal)

                    def backward(out):
                        return torch.autograd.grad(out, (qs, ks, vs), dos, retain_graph=True)

                    bench_pair("ours-py", name, flops, forward, backward)
    for d, s in MODS_SHAPES:
        h, b = 2048 // d, tokens // s
        q, k, v = (rand(b, s, h, d).requires_grad_().transpose(1, 2) for _ in range(3))
        dout = rand(b, s, h, d).transpose(1, 2)
        for causal in (False, True):
            flops = 4 * b * h * s * s * d / (2 if causal else 1)
            for mod, p in (("none", 0.0), (f"dropout{MODS_DROPOUT}", MODS_DROPOUT)):
                name = f"mods/hdim{d}/s{s}/b{b}/h{h}/causal{int(causal)}/{mod}"
                if not selected(name, filt):
                    continue
                for backend, kind in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                    def forward(kind=kind, causal=causal, p=p):
                        with sdpa_kernel(kind):
                            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=p)

                    def backward(out):
                        return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

                    bench_pair(backend, name, flops, forward, backward)
    lens = ragged_lengths()
    h, d = 16, 128
    total = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
    q, k, v, dout = (rand(total, h, d) for _ in range(4))
    mx = max(lens)
    for causal in (False, True):
        name = f"varlen/hdim{d}/ragged64/h{h}/causal{int(causal)}"
        if not selected(name, filt):
            continue
        flops = sum(4 * h * l * l * d for l in lens) / (2 if causal else 1)

        # aten::_flash_attention_forward(q, k, v, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
        #     return_debug_mask, *, scale) -> (out, logsumexp, rng_state, unused, debug_attn_mask)
        # aten::_flash_attention_backward(grad_out, q, k, v, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
        #     dropout_p, is_causal, rng_state, unused, *, scale) -> (dq, dk, dv)
        def forward(causal=causal):
            return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, mx, mx, 0.0, causal, False, scale=None)

        def backward(o, causal=causal):
            out, lse, rng_state, unused = o[:4]
            return torch.ops.aten._flash_attention_backward(
                dout, q, k, v, out, lse, cu, cu, mx, mx, 0.0, causal, rng_state, unused, scale=None
            )

        bench_pair("flash", name, flops, forward, backward)


if __name__ == "__main__":
    main()
