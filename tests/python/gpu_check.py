"""flash_attn_rs on PyTorch tensors, on the GPU machine (torch 2.11, Python 3.12, one CUDA GPU).

    python/build.sh                                   # here: target/wheels/flash_attn_rs-*-abi3-*.whl
    # on the GPU machine (carry target/wheels):
    pip install --no-deps --target /tmp/fa target/wheels/flash_attn_rs-*.whl
    PYTHONPATH=/tmp/fa python3 tests/python/gpu_check.py [--quick] [--device cpu] [--no-bench]

Checks, each printed as a PASS or FAIL line (exit status 1 if any failed):
- forward and gradients against PyTorch's SDPA math backend in float64 (causal bottom-right through an
  explicit mask, GQA through repeat_interleave), and against a float64 reference of the definition for
  what SDPA lacks (sliding window, softcap), in bf16 and f16; deterministic=True gives the same bits twice;
- scaled_dot_product_attention against PyTorch's own function in float64 (top-left is_causal, GQA, scale,
  a padded head dim; decoding steps on the KV cache's path, its bits, also over broadcast keys), the calls
  it hands to PyTorch (another attn_mask, float32, ...) giving PyTorch's bits, also when patched into
  torch.nn.functional;
- the eager path (plain tensors, no compile) and the custom ops give the same bits;
- torch.compile(fullgraph=True) of small attention modules (dense, qkv-packed, varlen): no graph break,
  same results and gradients as eager;
- CUDA graph capture and replay of the forward and of forward + backward, with new inputs copied in;
  and of a KV-cache serving step (flash_attn_with_kvcache: append + rotary, split-KV; contiguous and
  paged), bitwise against eager calls (out, lse, caches);
- a non-default stream: the kernels run after earlier work on that stream, not on the default stream;
- packed versus separate: flash_attn_varlen_func over a packed batch (and its gradients) against
  flash_attn_func per sequence;
- max_seqlen_q / max_seqlen_k None on a skewed batch: the same out, lse and gradients as with the maxima
  (eager path, custom ops, torch.compile), no device synchronization, S_dmask without them a ValueError;
- a kernels-hub-style script through fwd / varlen_fwd / bwd against SDPA;
- paged K/V (flash_attn_varlen_func with block_table, the hub's varlen_fwd with block_table): against the
  contiguous varlen call over the same keys and against flash-attn's semantics computed in torch (keys
  gathered through the block table), page sizes 16, 256 and 3, key counts from cu_seqlens_k or seqused_k;
  torch.compile(fullgraph=True) of a paged call;
- ALiBi, dropout, S_dmask on either device: ALiBi against the reference (dense, varlen, paged), dropout's
  autograd gradients equal the hub's bwd given the forward's rng_state, torch.manual_seed replays the mask;
  the custom ops fwd_ext / bwd_ext give the eager path's bits and torch.compile(fullgraph=True) traces them;
  on CUDA the same rng_state drops the same scores as the CPU (S_dmask's signs bitwise);
  flash_attn_with_kvcache on CUDA equals the CPU's call (caches bitwise, out and lse within rounding;
  rotary, paged, split-KV) and on the CPU appends in place;
- torch.func: grad / vjp against autograd; vmap through the ops' own batching rules with PyTorch's fallback
  switched off (dense calls folded into the batch, varlen / dropout per example), each example's bits;
- flash_attn_rs.hf (transformers' attention interface): hf_check.py's checks.
Then, unless --no-bench: Python-level overhead per call against calling the native function directly,
for head dim 128, S >= 2048 the time of "ours via Python" against "ours direct", and SDPA decoding steps
(scaled_dot_product_attention, flash_attn_func, PyTorch's SDPA).

--device cpu runs what applies to CPU tensors (the CPU path), at smaller sizes: for a machine without a GPU.
"""

import argparse
import math
import statistics
import sys
import time
import traceback
import zlib

import numpy as np
import torch
import torch.nn.functional as F

import flash_attn_rs as fa
from flash_attn_rs import _native

FAILURES = []


def report(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILURES.append(name)


def check(name):
    """Decorator: runs a check, turning an exception into a FAIL line."""
    def wrap(fn):
        def run(*args, **kwargs):
            try:
                fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the run
                traceback.print_exc()
                report(name, False, f"{type(e).__name__}: {e}")
        return run
    return wrap


# --- References (float64) ----------------------------------------------------------------------------

def visible(sq, sk, causal, window, device):
    left, right = window
    if causal:
        right = 0
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    diag = i + sk - sq
    mask = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= j >= diag - left
    if right >= 0:
        mask &= j <= diag + right
    return mask


def ref_attention(q, k, v, scale, causal=False, window=(-1, -1), softcap=0.0):
    """q [B, Sq, H, D], k, v [B, Sk, Hk, D] (float64, differentiable): out [B, Sq, H, D], lse [B, H, Sq]."""
    h, hk = q.shape[2], k.shape[2]
    k, v = k.repeat_interleave(h // hk, dim=2), v.repeat_interleave(h // hk, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    mask = visible(q.shape[1], k.shape[1], causal, window, q.device)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


def sdpa_math(q, k, v, scale, causal, dtype=torch.float64):
    """PyTorch's SDPA math backend in `dtype` on [B, S, H, D] tensors; causal aligned bottom-right through an
    explicit mask, GQA through repeat_interleave."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    h, hk = q.shape[2], k.shape[2]
    qt = q.to(dtype).transpose(1, 2)
    kt = k.to(dtype).repeat_interleave(h // hk, dim=2).transpose(1, 2)
    vt = v.to(dtype).repeat_interleave(h // hk, dim=2).transpose(1, 2)
    mask = visible(q.shape[1], k.shape[1], True, (-1, -1), q.device) if causal else None
    with sdpa_kernel(SDPBackend.MATH):
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return o.transpose(1, 2)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# --- Forward and gradients ---------------------------------------------------------------------------

def grads_of(fn, inputs, dout):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(dout)
    return out.detach(), [t.grad for t in inputs]


def compare(name, ours, ref, lowp, factor, floor):
    """|ours - ref| <= factor * |lowp - ref| + floor: ours is no less accurate than the same math done in
    the input dtype (the criterion of flash-attn's own tests)."""
    e, base = max_err(ours, ref), max_err(lowp, ref)
    ok = math.isfinite(e) and e <= factor * base + floor
    return ok, f"{name} err {e:.2e} (input-dtype math {base:.2e})"


def forward_backward_case(dev, dtype, b, sq, sk, h, hk, d, causal, window=(-1, -1), softcap=0.0, use_sdpa=True):
    seed = zlib.crc32(repr((b, sq, sk, h, hk, d, causal, window, softcap, str(dtype))).encode())
    torch.manual_seed(seed)
    q = torch.randn(b, sq, h, d, device=dev, dtype=dtype)
    k = torch.randn(b, sk, hk, d, device=dev, dtype=dtype)
    v = torch.randn(b, sk, hk, d, device=dev, dtype=dtype)
    dout = torch.randn(b, sq, h, d, device=dev, dtype=dtype)
    scale = d ** -0.5
    opts = dict(causal=causal, window_size=window, softcap=softcap)

    out, (dq, dk, dv) = grads_of(lambda q, k, v: fa.flash_attn_func(q, k, v, **opts), (q, k, v), dout)
    _, lse, _ = fa.flash_attn_func(q, k, v, return_attn_probs=True, **opts)
    if use_sdpa:
        ref = lambda q, k, v, dt: sdpa_math(q, k, v, scale, causal, dt)  # noqa: E731
    else:
        ref = lambda q, k, v, dt: ref_attention(q.to(dt), k.to(dt), v.to(dt), scale, causal, window, softcap)[0]  # noqa: E731
    ro, (rq, rk, rv) = grads_of(lambda q, k, v: ref(q, k, v, torch.float64), (q.double(), k.double(), v.double()),
                                dout.double())
    lo, (lq, lk, lv) = grads_of(lambda q, k, v: ref(q, k, v, torch.float32 if dtype == torch.float32 else dtype)
                                .to(dtype), (q, k, v), dout)
    _, rlse = ref_attention(q.double(), k.double(), v.double(), scale, causal, window, softcap)

    what = f"{str(dtype)[6:]} B{b} Sq{sq} Sk{sk} H{h}/{hk} D{d} causal={causal} window={window} softcap={softcap}"
    details, ok_all = [], True
    for name, ours, r, low, factor in (("out", out, ro, lo, 2), ("dq", dq, rq, lq, 3), ("dk", dk, rk, lk, 3),
                                       ("dv", dv, rv, lv, 3)):
        ok, det = compare(name, ours, r, low, factor, 1e-3 if name == "out" else 3e-3)
        ok_all &= ok
        details.append(det)
    finite = torch.isfinite(rlse)
    lse_err = (lse.double() - rlse).abs()[finite].max().item() if finite.any() else 0.0
    lse_ok = lse_err <= 1e-3 * (1 + rlse[finite].abs().max().item()) and bool(
        torch.equal(torch.isneginf(lse), ~finite))
    ok_all &= lse_ok
    details.append(f"lse err {lse_err:.2e}")
    report(f"forward+backward vs {'SDPA math' if use_sdpa else 'f64 reference'} [{what}]", ok_all,
           ", ".join(details) + f" (seed {seed})")


@check("forward and gradients")
def check_forward_backward(dev, quick):
    big = not quick and dev.type == "cuda"
    for dtype in (torch.bfloat16, torch.float16):
        forward_backward_case(dev, dtype, 2, 128, 128, 4, 4, 64, False)
        forward_backward_case(dev, dtype, 2, 100, 300, 8, 2, 128, True)  # GQA, Sq < Sk causal (bottom-right)
        forward_backward_case(dev, dtype, 1, 77, 77, 6, 1, 96, True)  # MQA
        if big:
            forward_backward_case(dev, dtype, 2, 1024, 1024, 8, 2, 128, True)
            forward_backward_case(dev, dtype, 1, 513, 1031, 4, 4, 256, False)
            forward_backward_case(dev, dtype, 3, 257, 257, 4, 2, 192, True)
            forward_backward_case(dev, dtype, 2, 300, 200, 4, 4, 32, False)
    # What SDPA does not do: window, softcap, head dims zero-padded to a supported one.
    forward_backward_case(dev, torch.bfloat16, 2, 150, 220, 4, 2, 64, False, (32, 8), 0.0, use_sdpa=False)
    forward_backward_case(dev, torch.bfloat16, 2, 150, 220, 4, 2, 64, True, (40, -1), 0.0, use_sdpa=False)
    forward_backward_case(dev, torch.float16, 2, 130, 130, 4, 4, 128, True, (-1, -1), 30.0, use_sdpa=False)
    forward_backward_case(dev, torch.bfloat16, 1, 90, 90, 2, 2, 80, True)  # head dim 80 -> 96
    forward_backward_case(dev, torch.float16, 1, 64, 100, 2, 1, 40, False)  # head dim 40 -> 64


@check("scaled_dot_product_attention")
def check_sdpa(dev, quick):
    """fa.scaled_dot_product_attention against PyTorch's own function: out and gradients within the
    input-dtype math's error of float64 SDPA (torch's is_causal: top-left), the layout and dtype it
    returns; the calls it hands to PyTorch (attn_mask, float32, is_causal with L < S, GQA without
    enable_gqa) give PyTorch's bits, or NotImplementedError with fallback=False; dropout's mask is
    flash_attn_func's for the same seed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def torch_sdpa(q, k, v, dt, **kw):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q.to(dt), k.to(dt), v.to(dt), **kw)

    cases = [  # dtype, N, Hq, Hk, L, S, E, is_causal, scale
        (torch.bfloat16, 2, 4, 4, 96, 96, 64, True, None),
        (torch.float16, 2, 8, 2, 130, 70, 128, True, 0.05),  # GQA, L > S: top-left rows see every key from S - 1 on
        (torch.bfloat16, 1, 4, 1, 50, 190, 96, False, None),  # MQA, L < S
        (torch.float16, 1, 2, 2, 33, 33, 80, True, None),  # head dim 80, padded
    ]
    if not quick and dev.type == "cuda":
        cases += [(torch.bfloat16, 2, 16, 4, 1024, 1024, 128, True, None), (torch.float16, 1, 8, 8, 700, 300, 256, True, None)]
    for dtype, n, hq, hk, l, s_, e, causal, scale in cases:
        seed = zlib.crc32(repr((n, hq, hk, l, s_, e, causal, scale, str(dtype))).encode())
        torch.manual_seed(seed)
        q = torch.randn(n, hq, l, e, device=dev, dtype=dtype)
        k = torch.randn(n, hk, s_, e, device=dev, dtype=dtype)
        v = torch.randn(n, hk, s_, e, device=dev, dtype=dtype)
        dout = torch.randn(n, hq, l, e, device=dev, dtype=dtype)
        kw = dict(is_causal=causal, scale=scale, enable_gqa=hq != hk)
        out, grads = grads_of(lambda q, k, v: fa.scaled_dot_product_attention(q, k, v, **kw, fallback=False), (q, k, v), dout)
        ro, rgrads = grads_of(lambda q, k, v: torch_sdpa(q, k, v, torch.float64, **kw), (q.double(), k.double(), v.double()), dout.double())
        lo, lgrads = grads_of(lambda q, k, v: torch_sdpa(q, k, v, dtype, **kw), (q, k, v), dout)
        what = f"{str(dtype)[6:]} N{n} H{hq}/{hk} L{l} S{s_} E{e} is_causal={causal} scale={scale}"
        ok = out.shape == (n, hq, l, e) and out.dtype == dtype and out.device == q.device
        details = [f"shape {tuple(out.shape)} {out.dtype}"]
        for name, ours, r, low, factor in (("out", out, ro, lo, 2), ("dq", grads[0], rgrads[0], lgrads[0], 3),
                                           ("dk", grads[1], rgrads[1], lgrads[1], 3), ("dv", grads[2], rgrads[2], lgrads[2], 3)):
            good, det = compare(name, ours, r, low, factor, 1e-3 if name == "out" else 3e-3)
            ok &= good
            details.append(det)
        report(f"scaled_dot_product_attention vs PyTorch's [{what}]", ok, ", ".join(details) + f" (seed {seed})")

    # Decoding steps (few query rows per key head, no gradient) run flash_attn_with_kvcache's decode path when
    # compiled, on the CPU, and eagerly on CUDA from 32768 key rows times key heads (else flash_attn_func's):
    # its bits, and PyTorch's result within the input-dtype math's error; with gradients flash_attn_func.
    from flash_attn_rs import _torch_impl
    for dtype, n, hq, hk, l, s_, e, causal in [(torch.bfloat16, 2, 8, 2, 1, 300, 128, False),
                                                (torch.float16, 1, 4, 4, 4, 1000, 64, False),
                                                (torch.bfloat16, 3, 8, 1, 8, 5, 128, True),
                                                (torch.bfloat16, 1, 32, 8, 1, 4096, 128, False)]:
        torch.manual_seed(n * 1000 + l)
        q = torch.randn(n, hq, l, e, device=dev, dtype=dtype)
        k = torch.randn(n, hk, s_, e, device=dev, dtype=dtype)
        v = torch.randn(n, hk, s_, e, device=dev, dtype=dtype)
        kw = dict(is_causal=causal, enable_gqa=hq != hk)
        with torch.no_grad():
            got = fa.scaled_dot_product_attention(q, k, v, **kw, fallback=False)
            window = (-1, l - s_) if causal else (-1, -1)
            want = fa.flash_attn_with_kvcache(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cache_seqlens=s_,
                                              window_size=window).transpose(1, 2)
            routed = dev.type != "cuda" or _torch_impl._eager_route_pays((n, s_, hk))
            if not routed:  # eager on CUDA below the threshold: flash_attn_func's dense kernels
                eager_want = fa.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                window_size=window).transpose(1, 2)
            # Compiled, the same choice and the KV cache's op (in the one graph): the same bits.
            torch._dynamo.reset()
            traced = []

            def backend(gm, example_inputs):
                traced.extend(str(node.target) for node in gm.graph.nodes)
                return gm.forward

            compiled = torch.compile(lambda q, k, v: fa.scaled_dot_product_attention(q, k, v, **kw, fallback=False),
                                     backend=backend, fullgraph=True)(q, k, v)
            via_op = any("fwd_kvcache_read" in t for t in traced)
        ro = torch_sdpa(q, k, v, torch.float64, **kw)
        lo = torch_sdpa(q, k, v, dtype, **kw)
        ok, det = compare("out", got, ro, lo, 2, 1e-3)
        ok &= torch.equal(got, want if routed else eager_want) and torch.equal(compiled, want) and via_op
        ok &= got.shape == (n, hq, l, e)
        qg = q.clone().requires_grad_(True)
        dense = fa.scaled_dot_product_attention(qg, k, v, **kw)
        ok2, det2 = compare("out with grad (flash_attn_func)", dense.detach(), ro, lo, 2, 1e-3)
        dense.float().sum().backward()
        report(f"scaled_dot_product_attention decoding step [{str(dtype)[6:]} N{n} H{hq}/{hk} L{l} S{s_} E{e} "
               f"is_causal={causal}]", ok and ok2 and qg.grad is not None,
               f"{det}, {det2}, routed {routed}: the expected bits: {torch.equal(got, want if routed else eager_want)}, "
               f"compiled: {torch.equal(compiled, want)} "
               f"(its op traced: {via_op})")

    # Decoding steps over keys / values in odd layouts (broadcast along the batch, the heads, the head dim:
    # the last runs flash_attn_func, which copies it).
    torch.manual_seed(5)
    q = torch.randn(3, 8, 2, 64, device=dev, dtype=torch.bfloat16)
    layouts = {"batch": torch.randn(1, 2, 70, 64, device=dev, dtype=torch.bfloat16).expand(3, 2, 70, 64),
               "heads": torch.randn(3, 1, 70, 64, device=dev, dtype=torch.bfloat16).expand(3, 2, 70, 64),
               "head dim": torch.randn(3, 2, 70, 1, device=dev, dtype=torch.bfloat16).expand(3, 2, 70, 64)}
    odd = []
    for name, kv in layouts.items():
        with torch.no_grad():
            got = fa.scaled_dot_product_attention(q, kv, kv, enable_gqa=True, fallback=False)
        ok, det = compare("out", got, torch_sdpa(q, kv, kv, torch.float64, enable_gqa=True),
                          torch_sdpa(q, kv, kv, torch.bfloat16, enable_gqa=True), 2, 1e-3)
        if not ok:
            odd.append(f"{name}: {det}")
    report("scaled_dot_product_attention decoding steps over broadcast keys", not odd, "; ".join(odd))

    # Handed to PyTorch: its own result, bit for bit; NotImplementedError with fallback=False.
    torch.manual_seed(7)
    q = torch.randn(2, 4, 40, 64, device=dev, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 60, 64, device=dev, dtype=torch.bfloat16)
    mask = torch.rand(40, 60, device=dev) > 0.3
    handed = [
        ("attn_mask", (q, k[:, :1].expand(2, 4, 60, 64), k[:, :1].expand(2, 4, 60, 64)), dict(attn_mask=mask)),
        ("float32", (q.float(), k.float(), k.float()), dict(enable_gqa=True)),
        ("is_causal with L < S", (q, k, k), dict(is_causal=True, enable_gqa=True)),
        ("rank 3", (q[0], k[0], k[0]), dict(enable_gqa=True)),
        ("value head dim 32", (q, k, k[..., :32]), dict(enable_gqa=True)),
        ("dropout_p 1", (q, k, k), dict(dropout_p=1.0, enable_gqa=True)),
    ]
    bad = []
    for name, args, kw in handed:
        if name == "dropout_p 1":
            # PyTorch's cuDNN backend raises for dropout_p 1 on CUDA, then crashes the process on the next call:
            # ours hands such calls to its math backend (every probability dropped: out 0, gradients 0).
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.MATH):
                want = F.scaled_dot_product_attention(*args, **kw)
            qg = args[0].clone().requires_grad_(True)
            got = fa.scaled_dot_product_attention(qg, *args[1:], **kw)
            got.float().sum().backward()
            if not (torch.equal(got, want) and not got.any() and qg.grad is not None and not qg.grad.any()):
                bad.append(f"{name}: not PyTorch's math backend's zeros (out and gradient)")
        else:
            want = F.scaled_dot_product_attention(*args, **kw)
        got = fa.scaled_dot_product_attention(*args, **kw)
        if not torch.equal(got, want):
            bad.append(f"{name}: not PyTorch's result")
        try:
            fa.scaled_dot_product_attention(*args, **kw, fallback=False)
            bad.append(f"{name}: ran with fallback=False")
        except NotImplementedError:
            pass
    # In place of torch.nn.functional's (the handed calls reach PyTorch's, not this one again).
    orig = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = fa.scaled_dot_product_attention
    try:
        name, args, kw = handed[0]
        if not torch.equal(F.scaled_dot_product_attention(*args, **kw), orig(*args, **kw)):
            bad.append("patched into torch.nn.functional: not PyTorch's result")
    finally:
        F.scaled_dot_product_attention = orig
    # GQA without enable_gqa: PyTorch's error.
    try:
        fa.scaled_dot_product_attention(q, k, k)
        bad.append("GQA without enable_gqa ran")
    except RuntimeError:
        pass
    # Dropout: flash_attn_func's mask for the same seed.
    torch.manual_seed(11)
    got = fa.scaled_dot_product_attention(q, k, k, dropout_p=0.3, enable_gqa=True)
    torch.manual_seed(11)
    want = fa.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2), dropout_p=0.3).transpose(1, 2)
    if not torch.equal(got, want):
        bad.append("dropout: not flash_attn_func's mask")
    report("scaled_dot_product_attention hands the rest to PyTorch", not bad, "; ".join(bad))
    # Key / value without heads: PyTorch 2.11's own function divides by their count (SIGFPE with enable_gqa,
    # or when query has none either): a ValueError naming them, in a child process (a crash ends only it).
    # enable_gqa without a truth value: a TypeError naming it.
    import subprocess
    child = ("import torch, flash_attn_rs as fa\n"
             "q = torch.randn(2, 4, 8, 64, device=%r, dtype=torch.bfloat16)\n"
             "for hq, hk, hv, gqa in ((4, 0, 0, True), (4, 2, 0, True), (0, 0, 0, False)):\n"
             "    try:\n"
             "        fa.scaled_dot_product_attention(q[:, :hq], q[:, :hk], q[:, :hv], enable_gqa=gqa)\n"
             "        print('ran', hq, hk, hv)\n"
             "    except ValueError as e:\n"
             "        print('ValueError', str(e).split(':')[0])\n"
             "try:\n"
             "    fa.scaled_dot_product_attention(q, q, q, enable_gqa=torch.ones(2))\n"
             "except TypeError as e:\n"
             "    print('TypeError', str(e).split(':')[0])\n") % str(dev)
    run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    want = "ValueError key\nValueError value\nValueError key\nTypeError enable_gqa\n"
    report("scaled_dot_product_attention: key / value without heads a ValueError (not PyTorch's SIGFPE), "
           "enable_gqa without a truth value a TypeError", run.returncode == 0 and run.stdout == want,
           f"exit {run.returncode}: {run.stdout!r} {run.stderr[-200:]!r}")


@check("deterministic backward")
@check("scaled_dot_product_attention with a key-padding mask")
def check_sdpa_key_padding(dev, quick):
    """A boolean key-padding attn_mask [N or 1, 1, 1, S] runs on these kernels (fallback=False): out and gradients
    against PyTorch's SDPA in float64 with the same mask (rows with a real key), one-run and holed masks, GQA,
    decoding steps, more queries than keys; a query whose keys are all masked gets 0."""
    torch.manual_seed(21)
    bad = []
    for n, hq, hk, l, s, holes in ((3, 4, 4, 20, 33, False), (3, 8, 2, 1, 40, False), (2, 4, 4, 17, 17, True),
                                   (2, 4, 2, 50, 9, True), (1, 2, 2, 64, 64, False)):
        q = torch.randn(n, hq, l, 64, device=dev, dtype=torch.bfloat16)
        k = torch.randn(n, hk, s, 64, device=dev, dtype=torch.bfloat16)
        v = torch.randn(n, hk, s, 64, device=dev, dtype=torch.bfloat16)
        dout = torch.randn(n, hq, l, 64, device=dev, dtype=torch.bfloat16)
        m = torch.zeros(n, 1, 1, s, dtype=torch.bool, device=dev)
        for i in range(n):
            if holes:
                m[i, 0, 0] = torch.rand(s, device=dev) < 0.6
            else:
                m[i, 0, 0, int(torch.randint(0, s // 2, ())):] = True
            m[i, 0, 0, -1] = True
        gqa = hq != hk
        run = lambda q, k, v, dt: F.scaled_dot_product_attention(q.to(dt), k.to(dt), v.to(dt), attn_mask=m,  # noqa: E731
                                                                 enable_gqa=gqa)
        out, grads = grads_of(lambda q, k, v: fa.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=gqa,
                                                                              fallback=False), (q, k, v), dout)
        ro, rg = grads_of(lambda q, k, v: run(q, k, v, torch.float64), (q, k, v), dout.double())
        lo, lg = grads_of(lambda q, k, v: run(q, k, v, torch.bfloat16), (q, k, v), dout)
        for name, a, r, low, factor, floor in [("out", out, ro, lo, 2, 1e-3)] + [
                (nm, a, r, low, 3, 3e-3) for nm, a, r, low in zip(("dq", "dk", "dv"), grads, rg, lg)]:
            ok, det = compare(name, a, r, low, factor, floor)
            if not ok:
                bad.append(f"N{n} H{hq}/{hk} L{l} S{s} holes={holes}: {det}")
    # A row with no real key: 0, not NaN.
    q = torch.randn(2, 2, 3, 64, device=dev, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 5, 64, device=dev, dtype=torch.bfloat16)
    m = torch.ones(2, 1, 1, 5, dtype=torch.bool, device=dev)
    m[1] = False
    o = fa.scaled_dot_product_attention(q, k, k, attn_mask=m, fallback=False)
    if not (torch.isfinite(o).all() and (o[1] == 0).all()):
        bad.append("a fully masked row is not 0")
    # Compiled (no host read: every mask compacted) equals eager on a mask with holes; a mask made under
    # torch.inference_mode (no version counter to cache by) runs.
    m = torch.tensor([True, False, True, False, True], device=dev).reshape(1, 1, 1, 5).expand(2, 1, 1, 5)
    f = lambda q, k, m: fa.scaled_dot_product_attention(q, k, k, attn_mask=m, fallback=False)  # noqa: E731
    torch._dynamo.reset()
    if not torch.equal(torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, m), f(q, k, m)):
        bad.append("compiled with holes differs from eager")
    with torch.inference_mode():
        mi = m.clone()
        if not torch.equal(f(q, k, mi), f(q, k, m)):
            bad.append("an inference-mode mask differs")
    # One CPU mask tensor refilled between calls by writes PyTorch's version counter does not see (through .data,
    # or a numpy buffer): each call follows the mask's contents, as PyTorch's function does (a CUDA mask's are
    # compared by the version counter only: reading them back would synchronize every call).
    if dev == "cpu":
        m = torch.zeros(2, 1, 1, 5, dtype=torch.bool, device=dev)
        for lens in ((5, 2), (1, 4), (3, 5)):
            m.data.zero_()
            for i, n_real in enumerate(lens):
                m.data[i, 0, 0, :n_real] = True
            ref = F.scaled_dot_product_attention(q.double(), k.double(), k.double(), attn_mask=m)
            low = F.scaled_dot_product_attention(q, k, k, attn_mask=m)
            if not compare(f"out, .data refill {lens}", f(q, k, m), ref, low, 2, 1e-3)[0]:
                bad.append(f"a mask refilled through .data ({lens}) runs with an earlier fill's layout")
        import numpy as np
        buf = np.zeros((2, 1, 1, 5), dtype=np.bool_)
        mn = torch.from_numpy(buf)
        for lens in ((5, 2), (1, 4)):
            buf[:] = False
            for i, n_real in enumerate(lens):
                buf[i, 0, 0, :n_real] = True
            ref = F.scaled_dot_product_attention(q.double(), k.double(), k.double(), attn_mask=mn)
            low = F.scaled_dot_product_attention(q, k, k, attn_mask=mn)
            if not compare(f"out, numpy refill {lens}", f(q, k, mn), ref, low, 2, 1e-3)[0]:
                bad.append(f"a mask refilled through its numpy buffer ({lens}) runs with an earlier fill's layout")
    report("scaled_dot_product_attention with a key-padding mask vs PyTorch's in float64 (out, gradients)", not bad,
           "; ".join(bad))


def check_deterministic(dev, quick):
    torch.manual_seed(1)
    q = torch.randn(2, 512, 8, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 512, 2, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 512, 2, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(2, 512, 8, 128, device=dev, dtype=torch.bfloat16)
    runs = []
    for _ in range(3):
        g = torch.autograd.grad(fa.flash_attn_func(q, k, v, causal=True, deterministic=True), (q, k, v), dout)
        runs.append(g)
    same = all(torch.equal(a, b) for r in runs[1:] for a, b in zip(runs[0], r))
    g_default = torch.autograd.grad(fa.flash_attn_func(q, k, v, causal=True), (q, k, v), dout)
    close = all(max_err(a, b) <= 2e-2 * b.abs().max().item() for a, b in zip(g_default, runs[0]))
    report("deterministic=True: bitwise-equal gradients over 3 runs, close to the default mode", same and close,
           f"same={same} close={close}")


@check("eager path and custom ops agree")
def check_paths(dev, quick):
    """Plain eager calls skip the custom ops' dispatch (an autograd.Function around the same bodies): both
    routes give the same bits (forward, and deterministic gradients), for every packing."""
    from flash_attn_rs import _torch_impl
    torch.manual_seed(9)
    qkv = torch.randn(2, 130, 3, 4, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    q = torch.randn(2, 130, 4, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(2, 170, 2, 2, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0, 60, 130, 260], dtype=torch.int32, device=dev)
    calls = {
        "flash_attn_func": (lambda: fa.flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], causal=True, deterministic=True,
                                                       return_attn_probs=True), (q, kv)),
        "flash_attn_kvpacked_func": (lambda: fa.flash_attn_kvpacked_func(q, kv, window_size=(9, 3), deterministic=True,
                                                                         return_attn_probs=True), (q, kv)),
        "flash_attn_qkvpacked_func": (lambda: fa.flash_attn_qkvpacked_func(qkv, softcap=5.0, deterministic=True,
                                                                           return_attn_probs=True), (qkv,)),
        "flash_attn_varlen_qkvpacked_func": (lambda: fa.flash_attn_varlen_qkvpacked_func(
            qkv.view(-1, 3, 4, 64), cu, 130, causal=True, deterministic=True, return_attn_probs=True), (qkv,)),
    }
    for name, (fn, inputs) in calls.items():
        results = []
        for fast in (True, False):
            _torch_impl.EAGER_FAST_PATH = fast
            try:
                out, lse, _ = fn()
                grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
            finally:
                _torch_impl.EAGER_FAST_PATH = True
            results.append((out, lse) + tuple(grads))
        same = all(torch.equal(a, b) for a, b in zip(*results))
        report(f"eager path == custom ops: {name} (out, lse, deterministic gradients)", same)

    # flash_attn_func's fast path (_torch_impl.dense_fast) takes the common call, also on views (k, v of a
    # packed kv) and on a q at an offset that breaks the CUDA row alignment (copied), and gives the general
    # eager path's bits.
    from flash_attn_rs._common import PACK_NONE
    flat = torch.randn(2 * 130 * 4 * 64 + 1, device=dev, dtype=torch.bfloat16)
    q_odd = flat[1:].view(2, 130, 4, 64)
    ok = True
    for qq in (q.detach(), q_odd):
        k, v = kv.detach()[:, :, 0], kv.detach()[:, :, 1]
        fast = _torch_impl.dense_fast(qq, k, v, 0.0, None, True, (-1, -1), 0.0, None, False)
        o = fa._common.options(0.0, None, True, (-1, -1), 0.0, None, False)
        general = _torch_impl.attention(PACK_NONE, qq, k, v, None, o)
        ok = ok and fast is not None and all(torch.equal(a, b) for a, b in zip(fast, general))
    report("flash_attn_func's fast path taken for the common call, same bits as the general path", ok)


# --- torch.compile -----------------------------------------------------------------------------------

class Attention(torch.nn.Module):
    def __init__(self, dim, heads, kv_heads, packed):
        super().__init__()
        self.h, self.hk, self.hd, self.packed = heads, kv_heads, dim // heads, packed
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.hd)
        self.o = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, s, _ = x.shape
        qkv = self.qkv(x)
        if self.packed:
            out = fa.flash_attn_qkvpacked_func(qkv.view(b, s, 3, self.h, self.hd), causal=True)
        else:
            q, k, v = qkv.view(b, s, self.h + 2 * self.hk, self.hd).split([self.h, self.hk, self.hk], dim=2)
            out = fa.flash_attn_func(q, k, v, causal=True, window_size=(64, -1))
        return self.o(out.reshape(b, s, -1))


class VarlenAttention(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.h, self.hd = heads, dim // heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x, cu_seqlens, max_seqlen):
        t = x.shape[0]
        q, k, v = self.qkv(x).view(t, 3, self.h, self.hd).unbind(1)
        return fa.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)


@check("torch.compile")
def check_compile(dev, quick):
    dtype = torch.bfloat16
    for packed, hk in ((False, 2), (True, 4)):
        torch.manual_seed(2)
        m = Attention(256, 4, hk, packed).to(dev, dtype)
        x = torch.randn(2, 200, 256, device=dev, dtype=dtype, requires_grad=True)
        eager_out = m(x)
        eager_grads = torch.autograd.grad(eager_out.float().square().sum(), [x] + list(m.parameters()))
        torch._dynamo.reset()
        cm = torch.compile(m, fullgraph=True)
        out = cm(x)
        grads = torch.autograd.grad(out.float().square().sum(), [x] + list(m.parameters()))
        e = max_err(out, eager_out) / eager_out.abs().max().item()
        ge = max(max_err(a, b) / max(b.abs().max().item(), 1e-6) for a, b in zip(grads, eager_grads))
        report(f"torch.compile(fullgraph=True) of an attention module ({'qkv-packed' if packed else 'GQA, window'})",
               e < 2e-2 and ge < 5e-2, f"relative err out {e:.2e}, gradients {ge:.2e}")
    torch.manual_seed(3)
    m = VarlenAttention(128, 2).to(dev, dtype)
    lens = [37, 100, 1, 64]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
    x = torch.randn(sum(lens), 128, device=dev, dtype=dtype, requires_grad=True)
    eager_out = m(x, cu, max(lens))
    eager_g = torch.autograd.grad(eager_out.float().sum(), x)[0]
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True)
    out = cm(x, cu, max(lens))
    g = torch.autograd.grad(out.float().sum(), x)[0]
    e = max_err(out, eager_out) / eager_out.abs().max().item()
    ge = max_err(g, eager_g) / eager_g.abs().max().item()
    report("torch.compile(fullgraph=True) of a varlen attention module", e < 2e-2 and ge < 5e-2,
           f"relative err out {e:.2e}, gradient {ge:.2e}")


# --- CUDA graphs and streams -------------------------------------------------------------------------

@check("CUDA graph")
def check_cuda_graph(dev, quick):
    fa.preload(dev)
    torch.manual_seed(4)
    shape_q, shape_kv = (2, 256, 8, 128), (2, 256, 2, 128)
    q = torch.randn(shape_q, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(shape_kv, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(shape_kv, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(shape_q, device=dev, dtype=torch.bfloat16)

    def step():
        out = fa.flash_attn_func(q, k, v, causal=True)
        return (out,) + torch.autograd.grad(out, (q, k, v), dout)

    # Warm up on a side stream (as PyTorch asks before capturing), then capture forward + backward.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static = step()
    g_fwd = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g_fwd):
        static_fwd = fa.flash_attn_func(q, k, v, causal=True)
    ok, worst = True, 0.0
    for _ in range(3):
        with torch.no_grad():
            q.copy_(torch.randn_like(q))
            k.copy_(torch.randn_like(k))
            v.copy_(torch.randn_like(v))
        dout.copy_(torch.randn_like(dout))
        g.replay()
        g_fwd.replay()
        want = step()
        # The forward is deterministic: the same bits. The default backward sums dq with atomics: close.
        ok &= torch.equal(static_fwd, want[0]) and torch.equal(static[0], want[0])
        for a, b in zip(static[1:], want[1:]):
            worst = max(worst, max_err(a, b) / b.abs().max().item())
    torch.cuda.synchronize()
    ok &= worst <= 1e-2
    report("CUDA graph capture and replay (forward; forward + backward with workspace), new inputs each replay",
           ok, f"gradients' relative err {worst:.1e}")


@check("a KV-cache step in a CUDA graph")
def check_kvcache_graph(dev, quick):
    """A serving step (append one key and value per row with rotary, decode with split-KV) captured
    into a CUDA graph and replayed over new q / new keys, the caches reset: the same bits as eager calls
    on the same inputs (out, lse, both caches), contiguous and paged."""
    fa.preload(dev)
    torch.manual_seed(11)
    b, cap, h, hk, d, rot, page = 3, 384, 8, 2, 128, 64, 64
    lens = torch.tensor([300, 17, 200], dtype=torch.int32, device=dev)
    pos = torch.arange(cap, device=dev, dtype=torch.float32)[:, None]
    inv = 10000.0 ** (-torch.arange(0, rot, 2, device=dev, dtype=torch.float32) / rot)
    cos, sin = torch.cos(pos * inv), torch.sin(pos * inv)
    for paged in (False, True):
        if paged:
            blocks = b * cap // page
            table = ((torch.arange(blocks, device=dev) * 7 + 3) % blocks).to(torch.int32).reshape(b, cap // page)
            shape = (blocks, page, hk, d)
        else:
            table, shape = None, (b, cap, hk, d)
        k0 = torch.randn(shape, device=dev, dtype=torch.bfloat16)
        v0 = torch.randn(shape, device=dev, dtype=torch.bfloat16)
        kc, vc = k0.clone(), v0.clone()
        q = torch.randn(b, 1, h, d, device=dev, dtype=torch.bfloat16)
        kn = torch.randn(b, 1, hk, d, device=dev, dtype=torch.bfloat16)
        vn = torch.randn(b, 1, hk, d, device=dev, dtype=torch.bfloat16)

        def step(q, kc, vc, kn, vn):
            return fa.flash_attn_with_kvcache(q, kc, vc, k=kn, v=vn, rotary_cos=cos, rotary_sin=sin,
                                              cache_seqlens=lens, block_table=table, causal=True,
                                              rotary_interleaved=False, num_splits=3, return_softmax_lse=True)

        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            step(q, kc, vc, kn, vn)
        torch.cuda.current_stream(dev).wait_stream(side)
        def matches_eager(run, rounds):
            """`run()` (out, lse) over new q / new keys, the caches reset, against an eager step on the same
            inputs, bitwise (out, lse, caches), `rounds` times."""
            ok = True
            for _ in range(rounds):
                q.copy_(torch.randn_like(q))
                kn.copy_(torch.randn_like(kn))
                vn.copy_(torch.randn_like(vn))
                kc.copy_(k0)
                vc.copy_(v0)
                got = [t.clone() for t in run()] + [kc.clone(), vc.clone()]
                kc2, vc2 = k0.clone(), v0.clone()
                want = step(q, kc2, vc2, kn, vn)
                ok &= all(torch.equal(a, w) for a, w in zip(got, [want[0], want[1], kc2, vc2]))
            torch.cuda.synchronize(dev)
            return ok

        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static = step(q, kc, vc, kn, vn)
        report(f"flash_attn_with_kvcache (append + rotary, split-KV{', paged' if paged else ''}) captured in a "
               "CUDA graph and replayed == eager, bitwise (out, lse, caches)",
               matches_eager(lambda: (g.replay(), static)[1], 2))
        # The same step compiled with CUDA graphs (torch.compile's reduce-overhead: the custom op inside).
        torch._dynamo.reset()
        compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
        report(f"flash_attn_with_kvcache{' (paged)' if paged else ''} under torch.compile(mode='reduce-overhead') "
               "== eager, bitwise (out, lse, caches)", matches_eager(lambda: compiled(q, kc, vc, kn, vn), 3))


@check("non-default stream")
def check_stream(dev, quick):
    torch.manual_seed(5)
    q1 = torch.randn(1, 1024, 8, 128, device=dev, dtype=torch.bfloat16)
    q2 = torch.randn_like(q1)
    k = torch.randn(1, 1024, 8, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    want1, want2 = fa.flash_attn_func(q1, k, v), fa.flash_attn_func(q2, k, v)
    q = q1.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)  # keeps s busy for a while (~0.1 s)
        q.copy_(q2)  # queued behind the sleep on s
        out = fa.flash_attn_func(q, k, v)  # must run after the copy: on s, not on the default stream
    s.synchronize()
    torch.cuda.current_stream().wait_stream(s)
    ok = torch.equal(out, want2) and not torch.equal(out, want1)
    report("kernels run on the current (non-default) stream, after earlier work on it", ok)


# --- Packed versus separate --------------------------------------------------------------------------

@check("packed versus separate")
def check_packed_vs_separate(dev, quick):
    torch.manual_seed(6)
    lens_q, lens_k = [1, 77, 256, 130, 5], [40, 77, 300, 130, 1]
    h, hk, d = 8, 2, 128
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=dev)
    q = torch.randn(sum(lens_q), h, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(sum(lens_k), hk, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(sum(lens_k), hk, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(sum(lens_q), h, d, device=dev, dtype=torch.bfloat16)
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                            return_attn_probs=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    worst = {"out": 0.0, "lse": 0.0, "dq": 0.0, "dk": 0.0, "dv": 0.0}
    for i in range(len(lens_q)):
        qs, ks = slice(cu_q[i].item(), cu_q[i + 1].item()), slice(cu_k[i].item(), cu_k[i + 1].item())
        qi, ki, vi = (t[None, sl].detach().requires_grad_(True) for t, sl in ((q, qs), (k, ks), (v, ks)))
        oi, li, _ = fa.flash_attn_func(qi, ki, vi, causal=True, return_attn_probs=True)
        gi = torch.autograd.grad(oi, (qi, ki, vi), dout[None, qs])
        for name, a, b in (("out", out[qs], oi[0]), ("dq", dq[qs], gi[0][0]), ("dk", dk[ks], gi[1][0]),
                           ("dv", dv[ks], gi[2][0])):
            worst[name] = max(worst[name], max_err(a, b) / max(b.abs().max().item(), 1e-6))
        fin = torch.isfinite(li[0])
        worst["lse"] = max(worst["lse"], max_err(lse[:, qs][fin], li[0][fin]) if fin.any() else 0.0)
    ok = worst["out"] <= 1e-2 and worst["lse"] <= 1e-3 and max(worst["dq"], worst["dk"], worst["dv"]) <= 2e-2
    report("flash_attn_varlen_func over a packed batch == flash_attn_func per sequence (out, lse, gradients)", ok,
           ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    # Packed inputs through the packed functions, and their gradients in one packed tensor.
    qkv = torch.randn(2, 150, 3, 4, 64, device=dev, dtype=torch.float16, requires_grad=True)
    o1 = fa.flash_attn_qkvpacked_func(qkv, causal=True)
    g1 = torch.autograd.grad(o1, qkv, torch.ones_like(o1))[0]
    qkv2 = qkv.detach().clone().requires_grad_(True)
    o2 = fa.flash_attn_func(*qkv2.unbind(2), causal=True)
    g2 = torch.autograd.grad(o2, qkv2, torch.ones_like(o2))[0]
    report("flash_attn_qkvpacked_func == flash_attn_func on the unpacked views (out and packed gradient)",
           torch.equal(o1, o2) and max_err(g1, g2) <= 1e-2 * g2.abs().max().item() and g1.shape == qkv.shape)


# --- max_seqlen None (not known) ----------------------------------------------------------------------

@check("max_seqlen None")
def check_max_seqlen_none(dev, quick):
    """flash_attn_varlen_func with max_seqlen_q / max_seqlen_k None (the kernels find each sequence in
    cu_seqlens on the device; nothing reads it on the host) against the same call with the
    maxima, on a skewed batch (two sequences far longer than the mean, an empty one): forward out and lse,
    autograd's gradients; eagerly, through the custom ops and under torch.compile(fullgraph=True); no
    device synchronization on the way; S_dmask without the maxima a ValueError naming max_seqlen_q."""
    from flash_attn_rs import _torch_impl
    torch.manual_seed(12)
    lens_q, lens_k = [1500, 3, 40, 0, 700], [1300, 9, 40, 0, 900]
    if quick:
        lens_q, lens_k = [300, 3, 40, 0, 140], [260, 9, 40, 0, 180]
    h, hk, d, dtype = 8, 2, 128, torch.bfloat16
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=dev)
    q = torch.randn(sum(lens_q), h, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lens_k), hk, d, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lens_k), hk, d, device=dev, dtype=dtype, requires_grad=True)
    dout = torch.randn(sum(lens_q), h, d, device=dev, dtype=dtype)
    mq, mk = max(lens_q), max(lens_k)

    def run(max_q, max_k, **kw):
        out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, return_attn_probs=True, **kw)
        return (out, lse) + torch.autograd.grad(out, (q, k, v), dout)

    def rel(a, b):
        return max_err(a, b) / max(b.abs().max().item(), 1e-6)

    def lse_err(a, b):
        fin = torch.isfinite(b)
        if not torch.equal(torch.isfinite(a), fin):
            return float("inf")
        return max_err(a[fin], b[fin]) if fin.any() else 0.0

    for opts in (dict(causal=True), dict(causal=False), dict(window_size=(200, 17), softcap=5.0)):
        for fast in (True, False):
            _torch_impl.EAGER_FAST_PATH = fast
            try:
                want = run(mq, mk, **opts)
                for max_q, max_k in ((None, None), (mq, None), (None, mk)):
                    got = run(max_q, max_k, **opts)
                    e_out, e_lse = rel(got[0], want[0]), lse_err(got[1], want[1])
                    e_g = [rel(a, b) for a, b in zip(got[2:], want[2:])]
                    # The forward: the same per-row arithmetic (expected bitwise); the default backward sums
                    # dq with atomics, whose order the schedule changes.
                    ok = e_out <= 1e-3 and e_lse <= 1e-4 and max(e_g) <= 1e-2
                    report(f"max_seqlen ({max_q}, {max_k}) == ({mq}, {mk}): {opts}, "
                           f"{'eager path' if fast else 'custom ops'}", ok,
                           f"out {'bitwise' if torch.equal(got[0], want[0]) else f'{e_out:.1e}'}, "
                           f"lse {e_lse:.1e}, dq {e_g[0]:.1e}, dk {e_g[1]:.1e}, dv {e_g[2]:.1e}")
            finally:
                _torch_impl.EAGER_FAST_PATH = True
    if dev.type == "cuda":
        # No host read of cu_seqlens anywhere on the way (forward and backward): a synchronizing op raises.
        want = run(mq, mk, causal=True)
        torch.cuda.synchronize(dev)
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = run(None, None, causal=True)
            ok, detail = True, ""
        except RuntimeError as e:
            ok, detail = False, f"{type(e).__name__}: {e}"
        finally:
            torch.cuda.set_sync_debug_mode(mode)
        if ok:
            ok = rel(got[0], want[0]) <= 1e-3
            detail = f"out {'bitwise' if torch.equal(got[0], want[0]) else f'{rel(got[0], want[0]):.1e}'}"
        report("max_seqlen None: forward and backward without a device synchronization", ok, detail)
    # torch.compile(fullgraph=True): None through the ops' `SymInt?` arguments, forward and backward.
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, None, None, causal=True),
                       fullgraph=True)
    out = fn(q, k, v)
    g = torch.autograd.grad(out, (q, k, v), dout)
    want = run(mq, mk, causal=True)
    e_g = max(rel(a, b) for a, b in zip(g, want[2:]))
    report("torch.compile(fullgraph=True) with max_seqlen None == eager with the maxima",
           rel(out, want[0]) <= 1e-3 and e_g <= 1e-2, f"out {rel(out, want[0]):.1e}, gradients {e_g:.1e}")
    # S_dmask's shape is [B, H, max_seqlen_q, max_seqlen_k]: without them, a clear error (and no launch).
    for name, fn in (("flash_attn_varlen_func(dropout_p=0.1, return_attn_probs=True)",
                      lambda: fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, None, mk, dropout_p=0.1,
                                                        return_attn_probs=True)),
                     ("hub varlen_fwd(return_softmax=True)",
                      lambda: fa.varlen_fwd(q.detach(), k.detach(), v.detach(), cu_q, cu_k, return_softmax=True))):
        try:
            fn()
            report(f"error: max_seqlen None with S_dmask, {name}", False, "no exception")
        except ValueError as e:
            report(f"error: max_seqlen None with S_dmask, {name}", "max_seqlen_q" in str(e), str(e))


# --- The hub's functions -----------------------------------------------------------------------------

def _causal_grads_vs_sdpa(q, k, v, dout, grads):
    """(ok, detail) for each of dq, dk, dv of causal attention against autograd through SDPA math in float64
    (and in the input dtype, for the tolerance)."""
    d = q.shape[-1]
    _, ref = grads_of(lambda q, k, v: sdpa_math(q, k, v, d ** -0.5, True), (q.double(), k.double(), v.double()),
                      dout.double())
    _, low = grads_of(lambda q, k, v: sdpa_math(q, k, v, d ** -0.5, True, torch.bfloat16), (q, k, v), dout)
    return [compare(n, a, r, lo, 3, 3e-3) for n, a, r, lo in zip(("dq", "dk", "dv"), grads, ref, low)]


@check("kernels-hub-style script")
def check_hub(dev, quick):
    import flash_attn_rs as flash_attn  # what kernels.get_kernel("kernels-community/flash-attn") would give
    torch.manual_seed(7)
    b, s, h, d = 2, 333, 8, 128
    q = torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16)
    out, softmax_lse, *_ = flash_attn.fwd(q, k, v, is_causal=True)
    ref = sdpa_math(q, k, v, d ** -0.5, True)
    low = sdpa_math(q, k, v, d ** -0.5, True, torch.bfloat16)
    ok, det = compare("out", out, ref, low, 2, 1e-3)
    _, rlse = ref_attention(q.double(), k.double(), v.double(), d ** -0.5, True)
    ok &= max_err(softmax_lse, rlse) <= 1e-3 * (1 + rlse.abs().max().item())
    report("hub fwd(q, k, v, is_causal=True) vs SDPA math", ok, det)
    # varlen_fwd over the same batch packed, into a given out.
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=dev)
    given = torch.empty(b * s, h, d, device=dev, dtype=torch.bfloat16)
    res = flash_attn.varlen_fwd(q.reshape(b * s, h, d), k.reshape(b * s, h, d), v.reshape(b * s, h, d), cu, cu,
                                out=given, max_seqlen_q=s, max_seqlen_k=s, is_causal=True)
    ok2, det2 = compare("out", res[0].view(b, s, h, d), ref, low, 2, 1e-3)
    report("hub varlen_fwd(..., out=given) vs SDPA math", ok2 and res[0] is given, det2)
    # bwd into given buffers against autograd through SDPA math in float64.
    dout = torch.randn_like(q)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    res = flash_attn.bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, is_causal=True)
    oks = _causal_grads_vs_sdpa(q, k, v, dout, (dq, dk, dv))
    report("hub bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, is_causal=True) vs SDPA math",
           all(o for o, _ in oks) and res[0] is dq, ", ".join(d for _, d in oks))
    # Head dim 80 (no kernels of its own, padded around the hub calls) against SDPA math too.
    d = 80
    q, k, v, dout = (torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16) for _ in range(4))
    out = torch.empty_like(q)
    res = flash_attn.fwd(q, k, v, out=out, is_causal=True)
    dq, dk, dv, _ = flash_attn.bwd(dout, q, k, v, out, res[1], is_causal=True)
    ref = sdpa_math(q, k, v, d ** -0.5, True)
    low = sdpa_math(q, k, v, d ** -0.5, True, torch.bfloat16)
    ok, det = compare("out", out, ref, low, 2, 1e-3)
    oks = _causal_grads_vs_sdpa(q, k, v, dout, (dq, dk, dv))
    report("hub fwd / bwd at head dim 80 (padded) vs SDPA math",
           ok and all(o for o, _ in oks) and res[0] is out and dq.shape == q.shape,
           ", ".join([det] + [d_ for _, d_ in oks]))


# --- Errors ------------------------------------------------------------------------------------------

@check("errors")
def check_errors(dev, quick):
    q = torch.randn(1, 16, 2, 64, device=dev, dtype=torch.bfloat16)
    cases = [
        ("float32 q", lambda: fa.flash_attn_func(q.float(), q.float(), q.float()), TypeError),
        ("cu_seqlens int64", lambda: fa.flash_attn_varlen_func(q[0], q[0], q[0], torch.tensor([0, 16], device=dev),
                                                               torch.tensor([0, 16], device=dev), 16, 16), TypeError),
        ("dropout_p 1.5", lambda: fa.flash_attn_func(q, q, q, dropout_p=1.5), ValueError),
        ("alibi_slopes count", lambda: fa.flash_attn_func(q, q, q, alibi_slopes=torch.ones(3, device=dev)), ValueError),
        ("block_table float", lambda: fa.flash_attn_varlen_func(
            q[0], q.view(2, 8, 2, 64), q.view(2, 8, 2, 64), torch.tensor([0, 16], dtype=torch.int32, device=dev),
            torch.tensor([0, 16], dtype=torch.int32, device=dev), 16, 16,
            block_table=torch.tensor([[0, 1]], dtype=torch.float32, device=dev)), TypeError),
        ("hub bwd p_dropout without rng_state", lambda: fa.bwd(q, q, q, q, q, torch.zeros(1, 2, 16, device=dev),
                                                               p_dropout=0.1), ValueError),
        ("heads", lambda: fa.flash_attn_func(torch.randn(1, 16, 3, 64, device=dev, dtype=torch.bfloat16), q, q),
         ValueError),
        ("numpy k", lambda: fa.flash_attn_func(q, q.cpu().float().numpy(), q), TypeError),
        ("window_size", lambda: fa.flash_attn_func(q, q, q, window_size=3), TypeError),
        ("head dim 512", lambda: fa.flash_attn_func(*(torch.zeros(1, 4, 1, 512, device=dev,
                                                                  dtype=torch.bfloat16),) * 3), ValueError),
        ("head dim 0", lambda: fa.flash_attn_func(*(torch.zeros(1, 4, 1, 0, device=dev,
                                                                dtype=torch.bfloat16),) * 3), ValueError),
        ("head dim 0, varlen", lambda: fa.flash_attn_varlen_func(
            *(torch.zeros(4, 1, 0, device=dev, dtype=torch.bfloat16),) * 3,
            torch.tensor([0, 4], dtype=torch.int32, device=dev), torch.tensor([0, 4], dtype=torch.int32, device=dev),
            4, 4), ValueError),
        ("head dim 0, kv cache", lambda: fa.flash_attn_with_kvcache(
            torch.zeros(1, 1, 1, 0, device=dev, dtype=torch.bfloat16),
            *(torch.zeros(1, 8, 1, 0, device=dev, dtype=torch.bfloat16),) * 2,
            cache_seqlens=torch.tensor([4], dtype=torch.int32, device=dev)), ValueError),
    ]
    # At head dim 40 (run padded: the package writes the hub ops' given outputs and the caches itself) the
    # same errors as where the library writes them.
    q40 = torch.randn(1, 16, 2, 40, device=dev, dtype=torch.bfloat16)
    lse40 = torch.zeros(1, 2, 16, device=dev)
    both = torch.empty_like(q40)
    cache40 = torch.zeros(1, 8, 2, 40, device=dev, dtype=torch.bfloat16)
    cases += [
        ("hub fwd out float32, head dim 40", lambda: fa.fwd(q40, q40, q40, torch.empty(q40.shape, device=dev)),
         TypeError),
        ("hub bwd dk is dv, head dim 40", lambda: fa.bwd(q40, q40, q40, q40, q40, lse40, None, both, both), ValueError),
        ("hub bwd out of head dim 64, q 40", lambda: fa.bwd(q40, q40, q40, q40, q, lse40), ValueError),
        ("kv cache k_cache is v_cache, head dim 40", lambda: fa.flash_attn_with_kvcache(
            q40[:, :1], cache40, cache40, q40[:, :1], q40[:, :1], cache_seqlens=2), ValueError),
    ]
    # The hub's fwd with ALiBi / dropout and with block_table (paths that copy their result into `out`) check
    # it as the plain path's native call does; bwd names the forward's LSE as its argument, softmax_lse.
    slopes = torch.ones(2, device=dev)
    qp = q[0]
    cu_p = torch.tensor([0, 16], dtype=torch.int32, device=dev)
    pages = torch.zeros(2, 8, 2, 64, device=dev, dtype=torch.bfloat16)
    table = torch.tensor([[0, 1]], dtype=torch.int32, device=dev)
    wide = torch.empty(1, 1, 2, 64, device=dev, dtype=torch.bfloat16).expand(q.shape)
    cases += [
        ("hub fwd ALiBi, out float32", lambda: fa.fwd(q, q, q, torch.empty(q.shape, device=dev), slopes), TypeError,
         "out"),
        ("hub fwd dropout, out expanded", lambda: fa.fwd(q, q, q, wide, p_dropout=0.1), ValueError, "out"),
        ("hub varlen_fwd paged, out float32", lambda: fa.varlen_fwd(
            qp, pages, pages, cu_p, cu_p, torch.empty(qp.shape, device=dev), block_table=table), TypeError, "out"),
        ("hub bwd softmax_lse float16", lambda: fa.bwd(q, q, q, q, q, torch.zeros(1, 2, 16, device=dev).half()),
         TypeError, "softmax_lse"),
    ]
    # Arguments that only look like what they should be: several-element arrays where an int goes, sparse
    # tensors, a cache that requires grad (a non-leaf too: autograd would not see the append).
    cache = torch.zeros(1, 8, 2, 64, device=dev, dtype=torch.bfloat16)
    grad_cache = torch.zeros(1, 8, 2, 64, device=dev, requires_grad=True) * 1
    cases += [
        ("cache_seqlens a numpy array", lambda: fa.flash_attn_with_kvcache(
            q[:, :1], cache, cache.clone(), cache_seqlens=np.array([3], np.int32)), TypeError, "cache_seqlens"),
        ("window_size of arrays", lambda: fa.flash_attn_func(q, q, q, window_size=(torch.tensor([2, 3]), 1)),
         TypeError, "window_size"),
        ("sparse k", lambda: fa.flash_attn_func(q, q.to_sparse(), q), TypeError, "k"),
        ("sparse q, kv cache", lambda: fa.flash_attn_with_kvcache(q[:, :1].to_sparse(), cache, cache.clone()),
         TypeError, "q"),
        ("kv cache k of the wrong heads (named k, not k_new)", lambda: fa.flash_attn_with_kvcache(
            q[:, :1], cache, cache.clone(), q[:, :1, :1], q[:, :1], cache_seqlens=2), ValueError, "k"),
        ("non-leaf k_cache requiring grad, appended to", lambda: fa.flash_attn_with_kvcache(
            q[:, :1], grad_cache.bfloat16(), cache.clone(), q[:, :1], q[:, :1], cache_seqlens=2), ValueError,
         "k_cache"),
    ]
    if dev.type == "cuda":
        cu = torch.tensor([0, 16], dtype=torch.int32)
        cases += [
            ("k on the CPU", lambda: fa.flash_attn_func(q, q.cpu(), q.cpu()), ValueError),
            ("cu_seqlens on the CPU", lambda: fa.flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 16, 16), ValueError),
        ]
    for name, fn, exc, *arg in cases:
        try:
            fn()
            report(f"error: {name}", False, "no exception")
        except exc as e:
            # Where given, the argument the message must begin with.
            report(f"error: {name}", not arg or str(e).startswith(arg[0] + ":"), f"{type(e).__name__}: {e}")


@check("autograd edges")
def check_autograd_edges(dev, quick):
    """What autograd must not get silently wrong: a second derivative through the attention raises (not a
    gradient missing its terms), eagerly and through the custom ops; the LSE carries no gradient on either
    path; in-place writes into a caller's tensors bump its version counter; outputs whose elements share
    memory (expanded views) are refused."""
    q = torch.randn(1, 24, 2, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    from flash_attn_rs import _torch_impl

    def via_ops(fn):
        def run():
            _torch_impl.EAGER_FAST_PATH = False
            try:
                return fn()
            finally:
                _torch_impl.EAGER_FAST_PATH = True
        return run

    plain = lambda: fa.flash_attn_func(q, q, q, causal=True)  # noqa: E731
    alibi = lambda: fa.flash_attn_func(q, q, q, alibi_slopes=torch.ones(2, device=dev))  # noqa: E731
    for path, fn in [("eager", plain), ("ALiBi path", alibi), ("custom ops", via_ops(plain)),
                     ("custom ops, ALiBi", via_ops(alibi)), ("compiled", torch.compile(plain, fullgraph=True))]:
        for how in ("backward()", "autograd.grad(loss + penalty, q)"):
            loss = fn().float().sum()
            (g,) = torch.autograd.grad(loss, q, create_graph=True)
            penalty = g.float().square().sum()
            try:
                if how == "backward()":
                    penalty.backward()
                else:
                    # The gradient penalty's way: the second-order term must not be silently left out.
                    torch.autograd.grad(loss + penalty, q)
                report(f"double backward raises ({path}, {how})", False, "no exception")
            except RuntimeError as e:
                # Compiled graphs: torch's own refusal (AOTAutograd has no double backward).
                report(f"double backward raises ({path}, {how})", "not differentiable" in str(e) or path == "compiled",
                       str(e)[:100])
    compiled = torch.compile(lambda: fa.flash_attn_func(q, q, q, return_attn_probs=True)[1], fullgraph=True)
    report("LSE carries no gradient (eager, compiled)",
           not fa.flash_attn_func(q, q, q, return_attn_probs=True)[1].requires_grad and not compiled().requires_grad)
    x = q.detach()
    out = torch.empty_like(x)
    before = out._version
    fa.fwd(x, x, x, out)
    report("hub fwd bumps out's version counter", out._version > before, f"{before} -> {out._version}")
    cache = torch.zeros(2, 8, 2, 64, device=dev, dtype=torch.bfloat16)
    before = cache._version
    fa.flash_attn_with_kvcache(x[:, :1], cache[:1], cache[1:], x[:, :1], x[:, :1], cache_seqlens=2)
    report("kv cache append bumps the caches' version counter", cache._version > before)
    wide = torch.empty(1, 1, 2, 64, device=dev, dtype=torch.bfloat16).expand(2, 24, 2, 64)
    x2 = torch.cat([x, x])
    for name, fn in [("hub fwd into an expanded out", lambda: fa.fwd(x2, x2, x2, wide)),
                     ("kv cache append into an expanded cache", lambda: fa.flash_attn_with_kvcache(
                         x2[:, :1], cache[:1].expand(2, 8, 2, 64), cache[1:].expand(2, 8, 2, 64), x2[:, :1],
                         x2[:, :1], cache_seqlens=2))]:
        try:
            fn()
            report(f"error: {name}", False, "no exception")
        except ValueError as e:
            report(f"error: {name}", "share memory" in str(e), str(e)[:120])
    # Outputs the package fills from a result of its own (a head dim that is not contiguous, the ALiBi path):
    # the library's checks, not torch's RuntimeError from copy_ into an expanded tensor, nor a silent write
    # into an input.
    lse = fa.fwd(x2, x2, x2)[1]
    flat = torch.zeros(1, device=dev, dtype=torch.bfloat16).expand(x2.shape)  # head dim stride 0
    alias = x2.clone()
    wide = torch.empty(*x2.shape[:-1], 128, device=dev, dtype=torch.bfloat16)
    for name, fn, want in [
            ("hub fwd into an out expanded along the head dim", lambda: fa.fwd(x2, x2, x2, flat), "share memory"),
            ("hub bwd into a dq expanded along the head dim", lambda: fa.bwd(x2, x2, x2, x2, x2, lse, dq=flat),
             "share memory"),
            ("hub bwd into strided dq and dk sharing memory", lambda: fa.bwd(
                x2, x2, x2, x2, x2, lse, dq=wide[..., ::2], dk=wide[..., ::2]), "dq: overlaps dk"),
            ("hub fwd into a strided out that is the strided q", lambda: (lambda w: fa.fwd(w, x2, x2, w))(
                torch.cat([x2, x2], -1)[..., ::2]), "overlaps q"),
            ("hub fwd with ALiBi into an out that is q", lambda: fa.fwd(alias, x2, x2, alias,
                                                                       alibi_slopes=torch.ones(2, device=dev)),
             "overlaps q")]:
        try:
            fn()
            report(f"error: {name}", False, "no exception")
        except ValueError as e:
            report(f"error: {name}", want in str(e), str(e)[:120])


def _func_inputs(dev, seed):
    """torch.func checks' inputs: a generator, a bf16 randn on dev, then dense GQA q, k, v, packed qp, kp and
    their cu_seqlens (two sequences)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dev, torch.bfloat16)  # noqa: E731
    q, k, v = r(2, 40, 4, 64), r(2, 33, 2, 64), r(2, 33, 2, 64)
    qp, kp = r(40, 4, 64), r(33, 2, 64)
    cu_q = torch.tensor([0, 15, 40], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, 20, 33], dtype=torch.int32, device=dev)
    return g, r, (q, k, v, qp, kp, cu_q, cu_k)


@check("torch.func transforms")
def check_torch_func(dev, quick):
    """torch.func's reverse mode (grad, vjp) through the attention gives bitwise what autograd gives (the same
    kernels: dense, GQA, causal, varlen, packed qkv, ALiBi, dropout with a fixed rng_state, SDPA); a nested
    grad (a second derivative) raises, as double backward does; forward mode (torch.func.jvp,
    torch.autograd.forward_ad) raises NotImplementedError instead of returning a zero or missing tangent;
    vmap over the forward gives the per-example calls' results."""
    import torch.autograd.forward_ad as fwAD
    g, r, (q, k, v, qp, kp, cu_q, cu_k) = _func_inputs(dev, 11)
    slopes = torch.rand(4, generator=g).to(dev)
    qkv = r(2, 40, 3, 4, 64)
    calls = [
        ("dense, GQA, causal", lambda q: fa.flash_attn_func(q, k, v, causal=True), q),
        ("window, softcap", lambda q: fa.flash_attn_func(q, k, v, window_size=(7, 2), softcap=5.0), q),
        ("varlen", lambda q: fa.flash_attn_varlen_func(q, kp, kp, cu_q, cu_k, 25, 20, causal=True), qp),
        ("packed qkv", lambda x: fa.flash_attn_qkvpacked_func(x, causal=True), qkv),
        ("ALiBi", lambda q: fa.flash_attn_func(q, k, v, alibi_slopes=slopes), q),
        ("dropout", lambda q: fa.flash_attn_func(q, k, v, dropout_p=0.25, rng_state=(9, 0)), q),
        ("SDPA", lambda q: fa.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=True, enable_gqa=True).transpose(1, 2), q),
    ]
    for name, f, x in calls:
        wo = torch.randn(f(x).shape, generator=g).to(dev)
        loss = lambda x: (f(x).float() * wo).sum()  # noqa: E731
        got = torch.func.grad(loss)(x)
        xr = x.clone().requires_grad_(True)
        loss(xr).backward()
        out, vjp_fn = torch.func.vjp(f, x)
        (vj,) = vjp_fn(torch.ones_like(out))
        xr2 = x.clone().requires_grad_(True)
        f(xr2).float().sum().backward()
        report(f"torch.func.grad / vjp == autograd ({name})",
               torch.equal(got, xr.grad) and torch.equal(vj, xr2.grad),
               f"max |diff| {(got.float() - xr.grad.float()).abs().max().item():.2e}")
    try:
        torch.func.grad(lambda q: torch.func.grad(lambda q: fa.flash_attn_func(q, k, v).float().sum())(q).float().sum())(q)
        report("nested torch.func.grad raises", False, "no exception")
    except RuntimeError as e:
        report("nested torch.func.grad raises", "not differentiable" in str(e), str(e)[:100])
    for name, fn in [("torch.func.jvp", lambda: torch.func.jvp(lambda q: fa.flash_attn_func(q, k, v), (q,), (q,))),
                     ("forward_ad", lambda: _dual_call(fwAD, q, k, v))]:
        try:
            fn()
            report(f"forward-mode AD raises ({name})", False, "no exception")
        except NotImplementedError as e:
            report(f"forward-mode AD raises ({name})", "forward-mode AD" in str(e), str(e)[:80])
    batched = torch.func.vmap(lambda q: fa.flash_attn_func(q, k, v, causal=True))(torch.stack([q, q.flip(1)]))
    report("vmap over the forward == per-example calls",
           torch.equal(batched[0], fa.flash_attn_func(q, k, v, causal=True))
           and torch.equal(batched[1], fa.flash_attn_func(q.flip(1), k, v, causal=True)))
    # Per-example gradients (vmap over grad: the backward's functional op, batched per example) and jacrev.
    per = lambda q, k, v: fa.flash_attn_func(q[None], k[None], v[None], alibi_slopes=slopes).float().sum()  # noqa: E731
    grads = torch.func.vmap(torch.func.grad(per, argnums=(0, 1, 2)))(q, k, v)
    loop = [torch.stack(t) for t in zip(*[torch.func.grad(per, argnums=(0, 1, 2))(q[i], k[i], v[i]) for i in range(2)])]
    qs, ks = q[:1, :3, :1, :32].contiguous(), k[:1, :4, :1, :32].contiguous()
    jac = torch.func.jacrev(lambda q: fa.flash_attn_func(q, ks, ks).float())(qs)
    rows = []
    for idx in range(qs.numel()):
        qr = qs.clone().requires_grad_(True)
        (gr,) = torch.autograd.grad(fa.flash_attn_func(qr, ks, ks).float().flatten()[idx], qr)
        rows.append(gr)
    report("vmap(grad) per-example gradients == a loop of grads; jacrev == autograd's rows",
           all(torch.equal(a, b) for a, b in zip(grads, loop))
           and torch.equal(jac.reshape(qs.numel(), *qs.shape), torch.stack(rows)))
    # grad over vmap (the other nesting: vmap's wrapper hides that grad tracks the inputs), also with slopes
    # made inside the differentiated function (constants there, not a gradient with respect to them).
    qs3 = torch.stack([q, q.flip(1)])
    wo = torch.randn(qs3.shape, generator=g).to(dev)
    ok = True
    for f in (lambda q: fa.flash_attn_func(q, k, v, causal=True),
              lambda q: fa.flash_attn_func(q, k, v, alibi_slopes=torch.full((4,), 0.25, device=dev))):
        got = torch.func.grad(lambda x: (torch.func.vmap(f)(x).float() * wo).sum())(qs3)
        xr = qs3.clone().requires_grad_(True)
        (torch.stack([f(xr[i]) for i in range(2)]).float() * wo).sum().backward()
        ok &= torch.equal(got, xr.grad)
    report("torch.func.grad(vmap(f)) == autograd over the examples (plain; ALiBi slopes made inside)", ok)
    cache = r(2, 40, 2, 64)
    try:
        got = torch.func.grad(lambda x: torch.func.vmap(lambda q: fa.flash_attn_with_kvcache(
            q, cache, cache, cache_seqlens=33))(x).float().sum())(torch.stack([q[:, :1], q[:, 1:2]]))
        report("NotImplementedError: grad over vmap through flash_attn_with_kvcache", False,
               f"no exception (gradient of abs sum {got.float().abs().sum().item()})")
    except NotImplementedError as e:
        report("NotImplementedError: grad over vmap through flash_attn_with_kvcache", True, str(e)[:90])
    batched = torch.func.vmap(lambda q: fa.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=33))(
        torch.stack([q[:, :1], q[:, 1:2]]))
    report("vmap over flash_attn_with_kvcache == per-example calls",
           torch.equal(batched[1], fa.flash_attn_with_kvcache(q[:, 1:2], cache, cache, cache_seqlens=33)))
    # What has no derivative here raises under torch.func rather than giving zeros or failing inside torch.
    refused = {
        "grad with respect to alibi_slopes": lambda: torch.func.grad(
            lambda s: fa.flash_attn_func(q, k, v, alibi_slopes=s).float().sum())(slopes),
        "grad through flash_attn_with_kvcache": lambda: torch.func.grad(
            lambda q: fa.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=33).float().sum())(q[:, :1]),
        "hub fwd under vmap": lambda: torch.func.vmap(lambda q: fa.fwd(q, k, v, alibi_slopes=slopes)[0])(q[None]),
        "vmap over a KV cache append": lambda: torch.func.vmap(lambda q, kn: fa.flash_attn_with_kvcache(
            q, cache.clone(), cache.clone(), kn, kn, cache_seqlens=3))(q[None, :, :1], k[None, :, :1]),
        "hub bwd under grad": lambda: torch.func.grad(lambda q: fa.bwd(q, q, k, v, q, torch.zeros(
            2, 4, 40, device=dev))[0].float().sum())(q),
        "paged K/V under vmap": lambda: torch.func.vmap(lambda q: fa.flash_attn_varlen_func(
            q, cache.reshape(5, 16, 2, 64), cache.reshape(5, 16, 2, 64), cu_q, cu_k, 25, 20,
            block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=dev)))(qp[None]),
    }
    for name, fn in refused.items():
        try:
            fn()
            report(f"NotImplementedError: {name}", False, "no exception")
        except NotImplementedError as e:
            report(f"NotImplementedError: {name}", True, str(e)[:90])
    # torch.compile: a float option that changes between calls (a symbolic float on the recompile) and a
    # KV-cache call on inputs that require grad (no backward: out carries no grad, as eagerly).
    f = torch.compile(lambda q, c: fa.flash_attn_func(q, k, v, softcap=c), fullgraph=True, backend="aot_eager")
    ok = all(torch.equal(f(q, c), fa.flash_attn_func(q, k, v, softcap=c)) for c in (2.0, 3.0, 4.5))
    qg = q[:, :1].clone().requires_grad_(True)
    dec = torch.compile(lambda q: fa.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=33), fullgraph=True,
                        backend="aot_eager")(qg)
    report("torch.compile: changing float options, a KV-cache call on requires_grad inputs == eager",
           ok and not dec.requires_grad and torch.equal(dec, fa.flash_attn_with_kvcache(qg, cache, cache,
                                                                                         cache_seqlens=33)))


def _dual_call(fwAD, q, k, v):
    with fwAD.dual_level():
        return fa.flash_attn_func(fwAD.make_dual(q, torch.ones_like(q)), k, v)


@check("torch.func vmap rules")
def check_vmap_rules(dev, quick):
    """The ops' own batching rules: with PyTorch's per-example fallback switched off, vmap still runs every
    functional op (dense calls folded into the batch, varlen and dropout calls per example) and gives each
    example its own call's out and lse bitwise: the vmapped dim anywhere, inputs with and without it, ALiBi
    slopes per example, qkv packed; vmap(grad) equals a loop of grads."""
    import torch._C._functorch as functorch
    g, r, (q, k, v, qp, kp, cu_q, cu_k) = _func_inputs(dev, 12)
    n = 3
    qs = torch.stack([q, q.flip(1), q * 2])
    ks = torch.stack([k, k.flip(1), -k])
    slopes = torch.rand(n, 2, 4, generator=g).to(q.device)
    qkv = r(2, 40, n, 3, 4, 64)
    qps = torch.stack([qp, qp.flip(0), qp * 2])
    each = lambda f, *xs: [f(*(x[i] for x in xs)) for i in range(n)]  # noqa: E731
    cases = [
        ("dense, GQA, causal (q batched)", lambda q: fa.flash_attn_func(q, k, v, causal=True), (qs,), 0),
        ("q and k batched, window, softcap", lambda q, k: fa.flash_attn_func(q, k, v, window_size=(5, 3), softcap=4.0),
         (qs, ks), 0),
        ("ALiBi slopes per example [B, H]", lambda q, s: fa.flash_attn_func(q, k, v, alibi_slopes=s), (qs, slopes), 0),
        ("qkv packed, vmapped dim 2", lambda x: fa.flash_attn_qkvpacked_func(x, causal=True), (qkv,), 2),
        ("varlen (per example)", lambda q: fa.flash_attn_varlen_func(q, kp, kp, cu_q, cu_k, 25, 20, causal=True),
         (qps,), 0),
        ("dropout (per example)", lambda q: fa.flash_attn_func(q, k, v, dropout_p=0.3, rng_state=(5, 0)), (qs,), 0),
        ("lse returned", lambda q: fa.flash_attn_func(q, k, v, return_attn_probs=True)[:2], (qs,), 0),
    ]
    was = functorch._is_vmap_fallback_enabled()
    functorch._set_vmap_fallback_enabled(False)
    try:
        for name, f, xs, dim in cases:
            try:
                got = torch.func.vmap(f, in_dims=dim)(*xs)
                want = each(f, *(x.movedim(dim, 0) for x in xs))
                got = list(got) if isinstance(got, tuple) else [got]
                want = [list(w) if isinstance(w, tuple) else [w] for w in want]
                ok = all(torch.equal(got[o][i], want[i][o]) for i in range(n) for o in range(len(got)))
                report(f"vmap rule: {name} == per-example calls", ok)
            except Exception as e:  # noqa: BLE001
                report(f"vmap rule: {name} == per-example calls", False, f"{type(e).__name__}: {str(e)[:120]}")
        per = lambda q, k, v: fa.flash_attn_func(q[None], k[None], v[None], causal=True).float().sum()  # noqa: E731
        grads = torch.func.vmap(torch.func.grad(per, argnums=(0, 1, 2)))(q, k, v)
        loop = [torch.stack(t) for t in zip(*[torch.func.grad(per, argnums=(0, 1, 2))(q[i], k[i], v[i]) for i in range(2)])]
        report("vmap rule: vmap(grad) == a loop of grads (no fallback)",
               all(torch.allclose(a.float(), b.float(), rtol=0, atol=0) for a, b in zip(grads, loop)))
    finally:
        functorch._set_vmap_fallback_enabled(was)


@check("compiled native calls")
def check_compiled_native_calls(dev, quick):
    """The calls that hand tensors' addresses to native code outside the custom ops (the KV cache, the hub
    ops' and paged K/V's ALiBi / dropout) give under torch.compile what they give eagerly: traced, a
    temporary made in the graph (an int cache_seqlens' tensor, a contiguous copy of strided slopes) was
    freed before the native call read it."""
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g).to(device=dev, dtype=torch.bfloat16)  # noqa: E731
    slopes = torch.tensor([[0.5, 9.0], [0.25, 9.0], [0.1, 9.0], [0.3, 9.0]], device=dev)[:, 0]  # strided
    q, k, v = r(1, 16, 4, 64), r(1, 16, 2, 64), r(1, 16, 2, 64)
    qp, kp, vp = r(10, 4, 64), r(6, 4, 2, 64), r(6, 4, 2, 64)
    cu_q = torch.tensor([0, 4, 10], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, 7, 16], dtype=torch.int32, device=dev)
    table = torch.tensor([[0, 1, 5, 5], [2, 3, 4, 5]], dtype=torch.int32, device=dev)
    cache = r(1, 16, 2, 64)
    calls = {
        "KV cache, int cache_seqlens": lambda q: fa.flash_attn_with_kvcache(q[:, :1], cache, cache, cache_seqlens=3),
        "hub fwd, strided ALiBi slopes": lambda q: fa.fwd(q, k, v, alibi_slopes=slopes)[0],
        "paged K/V, strided ALiBi slopes": lambda q: fa.flash_attn_varlen_func(
            qp, kp, vp, cu_q, cu_k, 6, 9, block_table=table, alibi_slopes=slopes),
    }
    for name, fn in calls.items():
        want = fn(q)
        ok = True
        for _ in range(2 if quick else 4):
            torch._dynamo.reset()
            ok &= torch.equal(torch.compile(fn, backend="eager")(q), want)
        report(f"compiled == eager: {name}", ok)
    # The KV cache is a custom op under torch.compile: one graph (fullgraph), appends included, the caches
    # written as eagerly (also at head dim 40, run padded).
    lens = torch.tensor([5], dtype=torch.int32, device=dev)
    cos, sin = torch.rand(24, 16, generator=g).to(dev), torch.rand(24, 16, generator=g).to(dev)
    for d in (64, 40):
        qd, cd, kn = r(1, 2, 4, d), r(1, 16, 2, d), r(1, 2, 2, d)

        def step(q, kc, vc, kn):
            return fa.flash_attn_with_kvcache(q, kc, vc, kn, kn, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lens,
                                              causal=True, return_softmax_lse=True)

        def read(q, kc, vc):
            return fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=9, window_size=(3, 0))

        kc1, vc1 = cd.clone(), cd.clone()
        want = step(qd, kc1, vc1, kn)
        want_read = read(qd, kc1, vc1)
        for backend in ("eager", "aot_eager") if quick else ("eager", "aot_eager", "inductor"):
            torch._dynamo.reset()
            kc2, vc2 = cd.clone(), cd.clone()
            got = torch.compile(step, backend=backend, fullgraph=True)(qd, kc2, vc2, kn)
            got_read = torch.compile(read, backend=backend, fullgraph=True)(qd, kc2, vc2)
            report(f"KV cache under torch.compile(fullgraph=True, backend={backend}) == eager (head dim {d}: out, lse, "
                   "caches, then a read-only call)",
                   torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(kc2, kc1)
                   and torch.equal(vc2, vc1) and torch.equal(got_read, want_read))


@check("random bad arguments")
def check_random_arguments(dev, quick):
    """Every entry point with one or two arguments replaced by odd values (types, shapes, dtypes, devices,
    lengths, strides), at head dims 64 and 40 (padded): it runs or raises TypeError / ValueError /
    NotImplementedError, never another exception or the native layer's internal error."""
    import inspect
    seed = int(torch.randint(2**62, ()))
    gen = torch.Generator().manual_seed(seed)
    bad = []
    calls = 0
    for d in (64, 40):
        def r(*s, dt=torch.bfloat16, on=dev):
            return torch.randn(*s, generator=gen).to(dtype=dt, device=on)
        cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=dev)
        q, k, v = r(2, 8, 4, d), r(2, 12, 2, d), r(2, 12, 2, d)
        qp, kp, vp = r(8, 4, d), r(8, 2, d), r(8, 2, d)
        out, lse, _ = fa.flash_attn_func(q, k, v, return_attn_probs=True)
        outp, lsep, _ = fa.flash_attn_varlen_func(qp, kp, vp, cu, cu, 5, 5, return_attn_probs=True)
        odd = [None, 0, -1, 2**31, 2**63, 1.5, float("nan"), True, "x", [], (1, 2), (-5, -5), (2**40, -2**40),
               torch.tensor(3), torch.zeros(0, dtype=torch.int32, device=dev),
               torch.tensor([0, 3, 8], dtype=torch.int64, device=dev), torch.tensor([0, 9, 8], dtype=torch.int32, device=dev),
               torch.tensor([0, 3, 8], dtype=torch.int32), torch.full((2, 2), 99, dtype=torch.int32, device=dev),
               torch.full((4,), float("nan"), device=dev), r(2, 8, 4, d), r(8, 4, d), r(2, 8, 4, 40),
               r(2, 8, 4, d, dt=torch.float32), r(2, 8, 4, d, on="cpu"), r(2, 12, 2, d).transpose(1, 2),
               r(0, 0, 0, 0), r(2, 8, 3, 4, d), r(2, 8, 4, 2 * d)[..., ::2], r(1, 1, 4, d).expand(2, 8, 4, d),
               torch.empty(2, 8, 4, d, device="meta"), object()]
        entries = {
            "flash_attn_func": dict(q=q, k=k, v=v),
            "flash_attn_qkvpacked_func": dict(qkv=r(2, 8, 3, 4, d)),
            "flash_attn_varlen_func": dict(q=qp, k=kp, v=vp, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5,
                                           max_seqlen_k=5),
            "flash_attn_with_kvcache": dict(q=r(2, 1, 4, d), k_cache=r(2, 16, 2, d), v_cache=r(2, 16, 2, d),
                                            k=r(2, 1, 2, d), v=r(2, 1, 2, d),
                                            cache_seqlens=torch.tensor([3, 5], dtype=torch.int32, device=dev)),
            "fwd": dict(q=q, k=k, v=v),
            "bwd": dict(dout=r(2, 8, 4, d), q=q, k=k, v=v, out=out, softmax_lse=lse),
            "varlen_bwd": dict(dout=r(8, 4, d), q=qp, k=kp, v=vp, out=outp, softmax_lse=lsep, cu_seqlens_q=cu,
                               cu_seqlens_k=cu),
        }
        for name, base in entries.items():
            fn = getattr(fa, name)
            params = [p for p in inspect.signature(fn).parameters if p != "gen"]
            for _ in range(15 if quick else 40):
                kw = {n: (x.clone() if isinstance(x, torch.Tensor) else x) for n, x in base.items()}
                changed = {}
                for _ in range(int(torch.randint(1, 3, (), generator=gen))):
                    p = params[int(torch.randint(len(params), (), generator=gen))]
                    kw[p] = changed[p] = odd[int(torch.randint(len(odd), (), generator=gen))]
                calls += 1
                try:
                    fn(**kw)
                except (TypeError, ValueError, NotImplementedError) as e:
                    if "internal error" in str(e) or "panick" in str(e):
                        bad.append(f"d {d} {name}({', '.join(changed)}): {e}")
                except Exception as e:  # noqa: BLE001
                    bad.append(f"d {d} {name}({', '.join(f'{p}={type(x).__name__}' for p, x in changed.items())}): "
                               f"{type(e).__name__}: {str(e)[:120]}")
    report("random bad arguments raise typed errors", not bad,
           f"seed {seed}, {calls} calls" + ("; " + " | ".join(bad[:3]) if bad else ""))


@check("layouts")
def check_layouts(dev, quick):
    """Tensors the kernels cannot read in place (rows not 16-byte aligned, head dim not contiguous) are
    copied; a caller's out that cannot be written in place is written through a temporary."""
    torch.manual_seed(8)
    q, k, v = (torch.randn(2, 100, 4, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
    want = fa.flash_attn_func(q, k, v, causal=True)
    buf = torch.empty(q.numel() + 4, device=dev, dtype=torch.bfloat16)
    q_odd = buf[4:].view(q.shape)  # 8 bytes past an aligned start
    q_odd.copy_(q)
    k_t = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # head dim stride 100*4... not 1
    ok = torch.equal(fa.flash_attn_func(q_odd, k_t, v, causal=True), want)
    out_buf = torch.zeros(q.numel() + 4, device=dev, dtype=torch.bfloat16)
    out_odd = out_buf[4:].view(q.shape)
    res = fa.fwd(q, k, v, out=out_odd, is_causal=True)
    ok &= res[0] is out_odd and torch.equal(out_odd, want) and bool((out_buf[:4] == 0).all())
    report("misaligned and non-contiguous inputs copied, a misaligned out written through a temporary", ok)


@check("empty")
def check_empty(dev, quick):
    """Empty batches, queries or keys (dense and packed): forward and backward through autograd return
    tensors of the right shapes; rows that see no key come out 0 with lse -inf, every gradient is 0."""
    torch.manual_seed(9)
    for qs, ks in [((0, 4, 2, 64), (0, 4, 2, 64)), ((1, 0, 2, 64), (1, 5, 2, 64)), ((1, 3, 2, 64), (1, 0, 2, 64))]:
        q = torch.randn(qs, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(ks, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        out, lse, _ = fa.flash_attn_func(q, k, v, return_attn_probs=True)
        out.backward(torch.randn_like(out))
        ok = out.shape == qs and lse.shape == (qs[0], qs[2], qs[1])
        ok &= all(t.grad is not None and t.grad.shape == t.shape and not t.grad.any() for t in (q, k, v))
        if ks[1] == 0:
            ok &= not out.any() and bool(torch.isneginf(lse).all())
        report(f"empty: q {qs}, k {ks}", ok)
    q = torch.zeros(0, 2, 64, device=dev, dtype=torch.bfloat16)
    cu = torch.zeros(2, dtype=torch.int32, device=dev)
    out = fa.flash_attn_varlen_func(q, q, q, cu, cu, 0, 0)
    report("empty: packed, one empty sequence", out.shape == (0, 2, 64))


# --- Paged K/V ---------------------------------------------------------------------------------------

def _paged_case(dev, dtype, lens_q, lens_k, page, h, hk, d, causal, seed):
    """Packed q, contiguous k/v and the same keys scattered into shuffled pages with a block table."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=dev)
    q = torch.randn(sum(lens_q), h, d, generator=g).to(dev, dtype)
    k = torch.randn(sum(lens_k), hk, d, generator=g).to(dev, dtype)
    v = torch.randn(sum(lens_k), hk, d, generator=g).to(dev, dtype)
    need = [(n + page - 1) // page for n in lens_k]
    max_blocks = max(max(need), 1)
    num_blocks = sum(need) + 2
    order = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.randint(0, num_blocks, (len(lens_k), max_blocks), generator=g, dtype=torch.int32)
    kp = torch.randn(num_blocks, page, hk, d, generator=g).to(dev, dtype)
    vp = torch.randn(num_blocks, page, hk, d, generator=g).to(dev, dtype)
    used, start = 0, 0
    for b, n in enumerate(lens_k):
        for i in range(need[b]):
            blk = order[used]
            used += 1
            table[b, i] = blk
            rows = min(page, n - i * page)
            kp[blk, :rows] = k[start + i * page: start + i * page + rows]
            vp[blk, :rows] = v[start + i * page: start + i * page + rows]
        start += n
    return q, k, v, kp, vp, table.to(dev), cu_q, cu_k


def _gather_ref(q, kp, vp, table, cu_q, lens_k, causal, scale):
    """flash-attn's paged semantics in torch: key t of sequence b is row t % page of block
    table[b][t // page]; float64 attention per sequence."""
    page = kp.shape[1]
    outs = []
    for b, n in enumerate(lens_k):
        t = torch.arange(n, device=kp.device)
        blocks = table[b].long()[t // page]
        kb, vb = kp[blocks, t % page], vp[blocks, t % page]
        qs = q[cu_q[b]:cu_q[b + 1]]
        o, _ = ref_attention(qs[None].double(), kb[None].double(), vb[None].double(), scale, causal)
        outs.append(o[0])
    return torch.cat(outs)


@check("KV cache fast path")
def check_kvcache_fast_path(dev, quick):
    """flash_attn_with_kvcache's eager fast path (`_torch_impl.kvcache_fast`) gives the general path's bits
    (out, lse, both caches) over random calls: contiguous and paged caches, appends, rotary (both layouts,
    f32 and input-dtype tables), cache_batch_idx, cache_leftpad, int and tensor cache_seqlens, windows, causal,
    softcap, GQA, head dims with kernels and padded ones (which the general path takes)."""
    import random
    from flash_attn_rs import _torch_impl
    fast = _torch_impl.kvcache_fast
    seed = random.randrange(2**31)
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, dt: torch.randn(*shape, generator=g).to(dev, dt)  # noqa: E731
    odd = []
    for case in range(30 if quick else 120):
        dt = rnd.choice([torch.float16, torch.bfloat16])
        d = rnd.choice([32, 64, 128, 256, 40])
        b, hk = rnd.randint(1, 3), rnd.choice([1, 2])
        hq, sq, snew = hk * rnd.choice([1, 2, 4]), rnd.choice([1, 1, 2, 4]), rnd.choice([0, 0, 1, 2])
        paged, cap = rnd.random() < 0.3, rnd.choice([16, 32, 64])
        if paged:
            page = rnd.choice([1, 8, 16])
            nb = b * cap // page
            kc, table = r(nb, page, hk, d, dt=dt), torch.randperm(nb, generator=g).to(dev, torch.int32).reshape(b, -1)
        else:
            kc, table = r(b + 1, cap, hk, d, dt=dt), None
        vc = r(*kc.shape, dt=dt)
        lens_l = [rnd.randint(0, cap - snew) for _ in range(b)]
        lens = rnd.choice([torch.tensor(lens_l, dtype=torch.int32, device=dev), min(lens_l)])
        kn, vn = (r(b, snew, hk, d, dt=dt), r(b, snew, hk, d, dt=dt)) if snew else (None, None)
        cos = sin = None
        if rnd.random() < 0.4:
            ang = torch.rand(cap + sq + 2, rnd.choice([8, 16]), generator=g).to(dev) * 6
            cos, sin = (ang.cos(), ang.sin()) if rnd.random() < 0.5 else (ang.cos().to(dt), ang.sin().to(dt))
        bidx = (torch.tensor(rnd.sample(range(b + 1), b), dtype=torch.int32, device=dev)
                if not paged and rnd.random() < 0.3 else None)
        lp = None
        if rnd.random() < 0.2:
            lp = torch.tensor([rnd.randint(0, x) for x in lens_l], dtype=torch.int32, device=dev)
            lens = torch.tensor(lens_l, dtype=torch.int32, device=dev)
        kw = dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=lens, cache_batch_idx=bidx, cache_leftpad=lp,
                  block_table=table, softmax_scale=rnd.choice([None, 0.1]), causal=rnd.random() < 0.5,
                  window_size=rnd.choice([(-1, -1), (3, 0), (-1, 2)]), softcap=rnd.choice([0.0, 3.0]),
                  rotary_interleaved=rnd.random() < 0.5, num_splits=rnd.choice([0, 1, 3]), return_softmax_lse=True)
        q = r(b, sq, hq, d, dt=dt)
        got = []
        for use_fast in (True, False):
            _torch_impl.kvcache_fast = fast if use_fast else (lambda *a: None)
            try:
                kc2, vc2 = kc.clone(), vc.clone()
                out, lse = fa.flash_attn_with_kvcache(q, kc2, vc2, kn, vn, **kw)
                got.append((out, lse, kc2, vc2))
            finally:
                _torch_impl.kvcache_fast = fast
        if not all(torch.equal(a, w) for a, w in zip(*got)):
            odd.append(f"case {case} (d {d}, paged {paged}, append {snew}, rotary {cos is not None})")
    report("flash_attn_with_kvcache's fast path == the general path, bitwise", not odd, f"seed {seed}; " + "; ".join(odd))


@check("flash_attn_func decoding steps")
def check_func_decoding(dev, quick):
    """flash_attn_func at decoding shapes without gradients (at most DENSE_DECODE_MAX_ROWS query rows per key
    head, a head dim with decode kernels, enough keys: `_torch_impl._eager_route_pays`) runs
    flash_attn_with_kvcache's split-KV decode kernels on CUDA: its bits (out and lse), within the input-dtype
    math's error of float64; with inputs requiring grad the dense kernels (differentiable). GQA, causal, windows, softcap, strided keys, random key counts."""
    import random
    from flash_attn_rs import _torch_impl
    from flash_attn_rs._torch_impl import _DECODE_HEAD_DIMS, _DECODE_ROWS
    seed = random.randrange(2**31)
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    odd = []
    for case in range(12 if quick else 40):
        dt = rnd.choice([torch.float16, torch.bfloat16])
        d = rnd.choice(sorted(_DECODE_HEAD_DIMS))
        hk, group = rnd.choice([(1, 8), (2, 4), (4, 1), (8, 4)])
        b, sq, sk = (rnd.randint(1, 3), rnd.randint(1, max(1, min(4, _DECODE_ROWS // group))),
                     rnd.choice([1, rnd.randint(2, 4000), rnd.randint(4000, 20000)]))
        causal, window, softcap = rnd.choice([(False, (-1, -1), 0.0), (True, (-1, -1), 0.0), (False, (50, 0), 0.0),
                                              (True, (-1, -1), 10.0)])
        q = torch.randn(b, sq, hk * group, d, generator=g).to(dev, dt)
        k = torch.randn(b, hk, sk, d, generator=g).to(dev, dt).transpose(1, 2)  # head-major, as SDPA's caches
        v = torch.randn(b, sk, hk, d, generator=g).to(dev, dt)
        kw = dict(causal=causal, window_size=window, softcap=softcap)
        with torch.no_grad():
            out, lse, _ = fa.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
            want, want_lse = fa.flash_attn_with_kvcache(q, k, v, cache_seqlens=sk, return_softmax_lse=True, **kw)
        ro, rl = ref_attention(q.double(), k.double(), v.double(), d ** -0.5, causal, window, softcap)
        lo, _ = ref_attention(q, k, v, d ** -0.5, causal, window, softcap)
        ok, det = compare("out", out, ro, lo, 2, 1e-3)
        live = torch.isfinite(rl)
        ok &= bool(torch.equal(torch.isfinite(lse), live)) and max_err(lse[live], rl[live]) < 1e-3
        routed = torch.equal(out, want) and torch.equal(lse, want_lse)
        if dev.type == "cuda" and _DECODE_ROWS > 0 and _torch_impl._eager_route_pays(k.shape):
            ok &= routed
        qg = q.clone().requires_grad_(True)
        dense = fa.flash_attn_func(qg, k, v, **kw)
        ok2, det2 = compare("out with grad", dense.detach(), ro, lo, 2, 1e-3)
        dense.float().sum().backward()
        if not (ok and ok2 and qg.grad is not None and torch.isfinite(qg.grad).all()):
            odd.append(f"case {case} ({str(dt)[6:]} d{d} b{b} sq{sq} sk{sk} h{hk * group}/{hk} causal={causal} "
                       f"window={window} softcap={softcap}): {det}, {det2}, the KV cache's bits: {routed}")
    report("flash_attn_func decoding steps (the KV cache's kernels on CUDA)", not odd, f"seed {seed}; " + "; ".join(odd))


@check("paged K/V")
def check_paged(dev, quick):
    lens_q, lens_k = [1, 77, 200, 5], [300, 77, 200, 1]
    h, hk, d = 8, 2, 128
    for page in (16, 256, 3):
        for causal in (False, True):
            q, k, v, kp, vp, table, cu_q, cu_k = _paged_case(dev, torch.bfloat16, lens_q, lens_k, page, h, hk, d,
                                                             causal, 100 + page)
            mq, mk = max(lens_q), max(lens_k)
            want, want_lse, _ = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, causal=causal,
                                                          return_attn_probs=True)
            got, got_lse, _ = fa.flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, mq, mk, causal=causal,
                                                        block_table=table, return_attn_probs=True)
            used_k = torch.tensor(lens_k, dtype=torch.int32, device=dev)
            got2 = fa.flash_attn_varlen_func(q, kp, vp, cu_q, None, mq, mk, causal=causal, block_table=table,
                                             seqused_k=used_k)
            ref = _gather_ref(q, kp, vp, table, cu_q, lens_k, causal, d ** -0.5)
            err, base = max_err(got, ref), max_err(want, ref)
            fin = torch.isfinite(want_lse)
            ok = (err <= 2 * base + 1e-3 and torch.equal(got2, got) and torch.equal(torch.isfinite(got_lse), fin)
                  and max_err(got_lse[fin], want_lse[fin]) <= 1e-3)
            report(f"paged (page {page}, causal={causal}) vs contiguous varlen and vs torch gather reference", ok,
                   f"bitwise contiguous: {torch.equal(got, want)}, err vs float64 {err:.2e} "
                   f"(contiguous {base:.2e})")
    # The hub's varlen_fwd with block_table, into a given out; the caller's stream.
    q, k, v, kp, vp, table, cu_q, cu_k = _paged_case(dev, torch.float16, lens_q, lens_k, 16, h, hk, d, True, 7)
    given = torch.empty_like(q)
    stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            res = fa.varlen_fwd(q, kp, vp, cu_q, cu_k, out=given, block_table=table, max_seqlen_q=max(lens_q),
                                max_seqlen_k=max(lens_k), is_causal=True)
        torch.cuda.current_stream(dev).wait_stream(stream)
    else:
        res = fa.varlen_fwd(q, kp, vp, cu_q, cu_k, out=given, block_table=table, max_seqlen_q=max(lens_q),
                            max_seqlen_k=max(lens_k), is_causal=True)
    want = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True)
    ref = _gather_ref(q, kp, vp, table, cu_q, lens_k, True, d ** -0.5)
    report("hub varlen_fwd(..., block_table=..., out=given) on a side stream", res[0] is given and
           max_err(given, ref) <= 2 * max_err(want, ref) + 1e-3, f"err {max_err(given, ref):.2e}")
    # torch.compile(fullgraph=True) traces the paged op.
    fn = torch.compile(lambda q, kp, vp, cu_q, cu_k, table: fa.flash_attn_varlen_func(
        q, kp, vp, cu_q, cu_k, max(lens_q), max(lens_k), causal=True, block_table=table), fullgraph=True)
    got = fn(q, kp, vp, cu_q, cu_k, table)
    eager = fa.flash_attn_varlen_func(q, kp, vp, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                      block_table=table)
    report("torch.compile(fullgraph=True) of a paged call == eager", torch.equal(got, eager))


# --- ALiBi, dropout, S_dmask, KV cache ---------------------------------------------------------------

@check("ALiBi, dropout, S_dmask, KV cache")
def check_extras(dev, quick):
    torch.manual_seed(9)
    b, s, h, d = 2, 64, 4, 64
    q, k, v = (torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    slopes = torch.rand(h, device=dev) * 0.5
    kc, vc = (torch.zeros(b, 128, h, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
    where = dev.type.upper()
    # ALiBi against the reference (dense, varlen, paged).
    qd, kd, vd = q.double(), k.double(), v.double()
    out = fa.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes)
    dist = (torch.arange(s, device=dev)[:, None] - torch.arange(s, device=dev)[None, :]).abs().double()
    sc = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * d ** -0.5 - slopes.double()[None, :, None, None] * dist
    sc = sc.masked_fill(~visible(s, s, True, (-1, -1), dev), float("-inf"))
    ref = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(sc, -1), vd)
    report(f"{where} alibi_slopes vs reference", max_err(out, ref) <= 2e-2, f"err {max_err(out, ref):.2e}")
    cu = torch.tensor([0, s, 2 * s], dtype=torch.int32, device=dev)
    out_v = fa.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, s, s, causal=True,
                                      alibi_slopes=slopes)
    report(f"{where} varlen alibi_slopes vs reference", max_err(out_v.view_as(ref), ref) <= 2e-2,
           f"err {max_err(out_v.view_as(ref), ref):.2e}")
    table = torch.arange(8, dtype=torch.int32, device=dev).view(2, 4)
    out_p = fa.flash_attn_varlen_func(q.flatten(0, 1), k.reshape(8, 16, h, d), v.reshape(8, 16, h, d), cu, cu, s, s,
                                      causal=True, alibi_slopes=slopes, block_table=table)
    report(f"{where} paged alibi_slopes vs reference", max_err(out_p.view_as(ref), ref) <= 2e-2,
           f"err {max_err(out_p.view_as(ref), ref):.2e}")
    # Strided slopes (a column of a [H, 2] tensor): the same out and gradients as contiguous ones, eagerly and
    # through the custom ops (the backward read a contiguous copy it had already freed).
    strided = torch.stack([slopes, torch.full_like(slopes, 1e4)], 1)[:, 0]
    dout = torch.randn_like(q)

    def alibi_grads(sl, fast):
        fa._torch_impl.EAGER_FAST_PATH = fast
        try:
            x = [t.clone().requires_grad_(True) for t in (q, k, v)]
            o = fa.flash_attn_func(*x, causal=True, alibi_slopes=sl, deterministic=True)
            o.backward(dout)
            return [o.detach()] + [t.grad for t in x]
        finally:
            fa._torch_impl.EAGER_FAST_PATH = True

    want = alibi_grads(slopes, True)
    ok = all(all(torch.equal(a, b) for a, b in zip(alibi_grads(strided, fast), want)) for fast in (True, False))
    report(f"{where} strided alibi_slopes: out and gradients == contiguous slopes' (eager, custom ops)", ok)
    # Dropout: autograd's gradients equal the hub's bwd given the forward's rng_state; manual_seed replays.
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    rs = (2**63 + 5, 3)
    # Deterministic on both sides: CUDA's default backward adds dq with atomics (not bitwise reproducible).
    o, lse, sd = fa.flash_attn_func(qg, kg, vg, dropout_p=0.2, causal=True, return_attn_probs=True, rng_state=rs,
                                    deterministic=True)
    dout = torch.randn_like(o)
    o.backward(dout)
    dq, dk, dv, _ = fa.bwd(dout, q, k, v, o.detach(), lse, p_dropout=0.2, is_causal=True, rng_state=rs,
                           deterministic=True)
    frac = (torch.signbit(sd) & visible(s, s, True, (-1, -1), dev)).float().sum() / (b * h * s * (s + 1) / 2)
    report(f"{where} dropout: autograd gradients == hub bwd with the forward's rng_state",
           torch.equal(qg.grad, dq) and torch.equal(kg.grad, dk) and torch.equal(vg.grad, dv),
           f"dropped {frac:.3f} (p 0.2)")
    torch.manual_seed(11)
    o1 = fa.flash_attn_func(q, k, v, dropout_p=0.3)
    torch.manual_seed(11)
    o2 = fa.flash_attn_func(q, k, v, dropout_p=0.3)
    o3 = fa.flash_attn_func(q, k, v, dropout_p=0.3)
    report(f"{where} dropout: torch.manual_seed replays the mask, the next call draws another",
           torch.equal(o1, o2) and not torch.equal(o2, o3))
    # The custom ops (fwd_ext / bwd_ext: what torch.compile traces) give the eager path's bits, gradients too,
    # and torch.compile(fullgraph=True) traces ALiBi + dropout + S_dmask without a graph break.
    def extras_call(q, k, v):
        return fa.flash_attn_func(q, k, v, dropout_p=0.2, causal=True, alibi_slopes=slopes, return_attn_probs=True,
                                  rng_state=rs, deterministic=True)

    def run(fn):
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        o, lse, sd = fn(qg, kg, vg)
        o.backward(dout)
        return [o.detach(), lse, sd, qg.grad, kg.grad, vg.grad]

    eager = run(extras_call)
    fa._torch_impl.EAGER_FAST_PATH = False
    try:
        via_ops = run(extras_call)
    finally:
        fa._torch_impl.EAGER_FAST_PATH = True
    report(f"{where} alibi + dropout + S_dmask: custom ops == eager path (out, lse, S_dmask, gradients)",
           all(torch.equal(a, b) for a, b in zip(eager, via_ops)))
    torch._dynamo.reset()
    compiled = run(torch.compile(extras_call, fullgraph=True))
    report(f"{where} alibi + dropout + S_dmask: torch.compile(fullgraph=True) == eager (same rng_state)",
           all(torch.equal(a, b) for a, b in zip(eager, compiled)))
    # Without rng_state a compiled call draws a fresh seed per call (its graph's torch.randint).
    cf = torch.compile(lambda q, k, v: fa.flash_attn_func(q, k, v, dropout_p=0.3), fullgraph=True)
    c1, c2 = cf(q, k, v), cf(q, k, v)
    report(f"{where} dropout under torch.compile: each call draws its own mask", not torch.equal(c1, c2))
    if dev.type == "cuda":
        # The same (seed, offset) drops the same scores on both devices; the results agree up to rounding.
        cpu = [t.cpu() for t in (q, k, v, slopes)]
        oc, lc, sdc = fa.flash_attn_func(*cpu[:3], dropout_p=0.2, causal=True, alibi_slopes=cpu[3],
                                         return_attn_probs=True, rng_state=rs)
        og, lg, sdg = fa.flash_attn_func(q, k, v, dropout_p=0.2, causal=True, alibi_slopes=slopes,
                                         return_attn_probs=True, rng_state=rs)
        report("CUDA dropout + alibi: S_dmask's dropped set == the CPU's",
               torch.equal(torch.signbit(sdg.cpu()), torch.signbit(sdc)))
        report("CUDA dropout + alibi: out, lse, S_dmask vs the CPU's",
               max_err(og.cpu(), oc) <= 3e-2 and max_err(lg.cpu(), lc) <= 1e-3 and max_err(sdg.cpu(), sdc) <= 1e-2,
               f"out {max_err(og.cpu(), oc):.2e}, lse {max_err(lg.cpu(), lc):.2e}, S_dmask {max_err(sdg.cpu(), sdc):.2e}")
        # KV cache: the same call on both devices (append with rotary, per-row lengths, a paged cache, split-KV
        # counts incl. the heuristic): the caches bitwise equal, out and lse within rounding.
        half = 16
        pos = torch.arange(160, dtype=torch.float32)[:, None] * 10000 ** (-torch.arange(half) / half)
        cos, sin = pos.cos(), pos.sin()
        seqlens = torch.tensor([5, 97], dtype=torch.int32)
        # Head dim 80 (no kernels of its own): padded to 96 around the call on both devices.
        q80, k80, v80 = (torch.randn(b, s, h, 80, device=dev, dtype=torch.bfloat16) for _ in range(3))
        for paged, num_splits, dd in ((False, 1, d), (False, 0, d), (True, 3, d), (True, 0, d), (False, 0, 80),
                                      (True, 3, 80)):
            qx, kx, vx = (q, k, v) if dd == d else (q80, k80, v80)
            kc0, vc0 = (torch.randn(b, 128, h, dd, dtype=torch.bfloat16) for _ in range(2))
            table = None
            if paged:
                kc0, vc0 = kc0.view(b * 8, 16, h, dd), vc0.view(b * 8, 16, h, dd)
                table = torch.randperm(b * 8, dtype=torch.int32).view(b, 8)
            res = {}
            for name, on in (("cpu", lambda t: t), ("cuda", lambda t: None if t is None else t.to(dev))):
                kcx, vcx = on(kc0.clone()), on(vc0.clone())
                o, lse = fa.flash_attn_with_kvcache(on(qx[:, :3].cpu()), kcx, vcx, on(kx[:, :2].cpu()), on(vx[:, :2].cpu()),
                                                    rotary_cos=on(cos), rotary_sin=on(sin), cache_seqlens=on(seqlens),
                                                    block_table=on(table), causal=True, num_splits=num_splits,
                                                    return_softmax_lse=True)
                res[name] = [t.cpu() for t in (o, lse, kcx, vcx)]
            (oc, lc, kcc, vcc), (og, lg, kcg, vcg) = res["cpu"], res["cuda"]
            report(f"CUDA flash_attn_with_kvcache (paged {paged}, num_splits {num_splits}, d {dd}): caches == the CPU's",
                   torch.equal(kcc, kcg) and torch.equal(vcc, vcg) and not torch.equal(kcc, kc0))
            report(f"CUDA flash_attn_with_kvcache (paged {paged}, num_splits {num_splits}, d {dd}): out, lse vs the CPU's",
                   max_err(og, oc) <= 2e-2 and max_err(lg, lc) <= 1e-3,
                   f"out {max_err(og, oc):.2e}, lse {max_err(lg, lc):.2e}")
        return
    # KV cache on CPU tensors: appended in place, the result equal to attention over the updated cache.
    o, lse = fa.flash_attn_with_kvcache(q[:, :1], kc, vc, k[:, :2], v[:, :2], cache_seqlens=5, causal=True,
                                        return_softmax_lse=True)
    ok = torch.equal(kc[:, 5:7], k[:, :2]) and torch.equal(vc[:, 5:7], v[:, :2]) and bool((kc[:, 7:] == 0).all())
    want = fa.flash_attn_func(q[:, :1], kc[:, :7], vc[:, :7], causal=True)
    report("CPU flash_attn_with_kvcache appends in place and attends over the cache",
           ok and max_err(o, want) <= 1e-2, f"err {max_err(o, want):.2e}")


# --- Benchmarks --------------------------------------------------------------------------------------

def host_us_per_call(fn, n=200, reps=7):
    """Median host time per call (µs) over `reps` loops of `n` calls, synchronizing between loops only."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def gpu_ms(fn, n=20, reps=5):
    """Median per-call time (ms) by CUDA events over loops of `n` calls."""
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / n)
    return statistics.median(ts)


def direct_fwd(q, k, v, causal):
    """The native forward with everything precomputed: what a caller holding raw pointers pays."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], device=q.device, dtype=torch.float32)
    desc = lambda t, dt: (t.data_ptr(), dt, tuple(t.shape), t.stride())  # noqa: E731
    dev = ("cuda", q.device.index, torch.cuda.current_stream(q.device).cuda_stream)
    args = (desc(q, "bf16"), desc(k, "bf16"), desc(v, "bf16"), desc(out, "bf16"), desc(lse, "f32"),
            q.shape[-1] ** -0.5, causal, -1, -1, 0.0, dev)
    return lambda: _native.fwd(*args), out, lse


def direct_bwd(q, k, v, out, lse, causal):
    dout = torch.randn_like(out)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    nbytes = _native.bwd_workspace_bytes(tuple(q.shape), False)
    ws = torch.empty(nbytes, dtype=torch.uint8, device=q.device)
    desc = lambda t, dt: (t.data_ptr(), dt, tuple(t.shape), t.stride())  # noqa: E731
    dev = ("cuda", q.device.index, torch.cuda.current_stream(q.device).cuda_stream)
    args = tuple(desc(t, "bf16") for t in (dout, q, k, v, out)) + (desc(lse, "f32"),) + tuple(
        desc(t, "bf16") for t in (dq, dk, dv)) + (q.shape[-1] ** -0.5, causal, -1, -1, 0.0, False,
                                                 (ws.data_ptr(), nbytes), dev)
    return lambda: _native.bwd(*args), dout


def bench(dev, quick):
    print("\n# Python-level overhead per call (host µs; B1 S128 H8 D64 bf16, forward)", flush=True)
    q = torch.randn(1, 128, 8, 64, device=dev, dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    native, _, _ = direct_fwd(q, k, v, True)
    scale = 64 ** -0.5

    def op():
        torch.ops.flash_attn_rs.fwd(q, k, v, None, None, None, None, 0, 0, 0, scale, True, -1, -1, 0.0, False)

    from flash_attn_rs import _torch_impl
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    rows = [
        ("_native.fwd, arguments precomputed", native, True),
        ("torch.ops.flash_attn_rs.fwd (the custom op)", op, True),
        ("flash_attn_func, no grad", lambda: fa.flash_attn_func(q, k, v, causal=True), True),
        ("flash_attn_func, requires_grad inputs", lambda: fa.flash_attn_func(qg, kg, vg, causal=True), True),
        ("hub fwd", lambda: fa.fwd(q, k, v, is_causal=True), True),
        ("flash_attn_func, no grad, via the custom op", lambda: fa.flash_attn_func(q, k, v, causal=True), False),
        ("flash_attn_func, requires_grad, via the custom op", lambda: fa.flash_attn_func(qg, kg, vg, causal=True),
         False),
    ]
    base = None
    over = {}
    for name, fn, fast in rows:
        _torch_impl.EAGER_FAST_PATH = fast
        try:
            with torch.no_grad() if "no grad" in name else torch.enable_grad():
                us = host_us_per_call(fn)
        finally:
            _torch_impl.EAGER_FAST_PATH = True
        base = base or us
        over[name] = us - base
        print(f"  {name:<50} {us:8.1f} µs/call  (+{us - base:6.1f} µs over direct)", flush=True)
    # The eager flash_attn_func's Python-level overhead above the native call (target: <= 20 µs without grad).
    print(f"OVERHEAD nograd {over['flash_attn_func, no grad']:.1f}", flush=True)
    print(f"OVERHEAD grad {over['flash_attn_func, requires_grad inputs']:.1f}", flush=True)
    kernel = gpu_ms(native, n=200) * 1000
    print(f"  (GPU time of that kernel: {kernel:.1f} µs)", flush=True)

    print("\n# Head dim 128, bf16: ours via Python (flash_attn_func, autograd) vs ours direct (_native), ms",
          flush=True)
    print(f"  {'shape':<28} {'causal':<6} {'fwd py':>8} {'fwd dir':>8} {'ratio':>6} {'f+b py':>8} {'f+b dir':>8}"
          f" {'ratio':>6}", flush=True)
    shapes = [(8, 2048, 16), (4, 4096, 16), (2, 8192, 16), (1, 16384, 16)]
    if quick:
        shapes = shapes[:2]
    for b, s, h in shapes:
        for causal in (False, True):
            q = torch.randn(b, s, h, 128, device=dev, dtype=torch.bfloat16)
            k, v = torch.randn_like(q), torch.randn_like(q)
            nf, out, lse = direct_fwd(q, k, v, causal)
            nf()
            nb, dout = direct_bwd(q, k, v, out, lse, causal)
            qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
            with torch.no_grad():
                py_f = gpu_ms(lambda: fa.flash_attn_func(q, k, v, causal=causal))
            dir_f = gpu_ms(nf)

            def py_fb():
                o = fa.flash_attn_func(qg, kg, vg, causal=causal)
                torch.autograd.grad(o, (qg, kg, vg), dout)

            def dir_fb():
                nf()
                nb()

            py_b, dir_b = gpu_ms(py_fb, n=10), gpu_ms(dir_fb, n=10)
            print(f"  B{b} S{s} H{h} D128{'':<10} {str(causal):<6} {py_f:8.3f} {dir_f:8.3f} {py_f / dir_f:6.3f} "
                  f"{py_b:8.3f} {dir_b:8.3f} {py_b / dir_b:6.3f}", flush=True)
            del q, k, v, out, lse, dout, qg, kg, vg
            torch.cuda.empty_cache()

    print("\n# SDPA decoding steps (N, Hq 32, Hk 8, L 1, E 128, bf16, no grad): fa.scaled_dot_product_attention "
          "(the KV cache's decode path) vs flash_attn_func (one tile per head) vs PyTorch's SDPA, µs", flush=True)
    print("  (compiled: torch.compile(mode='reduce-overhead'), CUDA graphs: the GPU time without the host's)",
          flush=True)
    print(f"  {'shape':<16} {'fa sdpa':>9} {'fa func':>9} {'torch':>9} {'torch/fa':>9} {'fa comp':>9} {'torch comp':>10} "
          f"{'t/fa comp':>9}", flush=True)
    for n, s in [(1, 1024), (1, 8192), (1, 32768), (8, 8192), (32, 4096)]:
        q = torch.randn(n, 32, 1, 128, device=dev, dtype=torch.bfloat16)
        k = torch.randn(n, 8, s, 128, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        with torch.no_grad():
            ours = gpu_ms(lambda: fa.scaled_dot_product_attention(q, k, v, enable_gqa=True), n=50) * 1000
            func = gpu_ms(lambda: fa.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)), n=50) * 1000
            theirs = gpu_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), n=50) * 1000
            torch._dynamo.reset()
            ours_c = torch.compile(lambda q, k, v: fa.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                                   mode="reduce-overhead", fullgraph=True)
            theirs_c = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                                     mode="reduce-overhead", fullgraph=True)
            ours_ct = gpu_ms(lambda: ours_c(q, k, v), n=50) * 1000
            theirs_ct = gpu_ms(lambda: theirs_c(q, k, v), n=50) * 1000
        print(f"  N{n} S{s:<11} {ours:9.1f} {func:9.1f} {theirs:9.1f} {theirs / ours:9.2f} {ours_ct:9.1f} {theirs_ct:10.1f} "
              f"{theirs_ct / ours_ct:9.2f}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()


def check_hf(dev, quick):
    """hf_check.py's checks (flash_attn_rs.hf, transformers' attention interface; the model checks need
    transformers and print a SKIP line without it), their failures counted here."""
    import hf_check
    FAILURES.extend(hf_check.run(dev, quick))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="fewer and smaller cases")
    p.add_argument("--no-bench", action="store_true")
    p.add_argument("--bench-only", action="store_true", help="the benchmarks alone (CUDA)")
    a = p.parse_args()
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}, flash_attn_rs {fa.__version__}, "
          f"cuda_available={fa.cuda_available()}", flush=True)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("FAIL no CUDA device (use --device cpu for the CPU path)")
        return 1
    dev = torch.device("cuda", torch.cuda.current_device()) if a.device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(dev)}", flush=True)
    quick = a.quick or dev.type == "cpu"
    if a.bench_only:
        if dev.type != "cuda":
            print("FAIL --bench-only needs CUDA")
            return 1
        bench(dev, quick)
        return 0
    check_forward_backward(dev, quick)
    check_sdpa(dev, quick)
    check_sdpa_key_padding(dev, quick)
    check_deterministic(dev, quick)
    check_paths(dev, quick)
    check_compile(dev, quick)
    check_packed_vs_separate(dev, quick)
    check_max_seqlen_none(dev, quick)
    check_hub(dev, quick)
    check_errors(dev, quick)
    check_layouts(dev, quick)
    check_autograd_edges(dev, quick)
    check_torch_func(dev, quick)
    check_vmap_rules(dev, quick)
    check_random_arguments(dev, quick)
    check_compiled_native_calls(dev, quick)
    check_empty(dev, quick)
    check_paged(dev, quick)
    check_extras(dev, quick)
    check_kvcache_fast_path(dev, quick)
    check_func_decoding(dev, quick)
    check_hf(dev, quick)
    if dev.type == "cuda":
        check_cuda_graph(dev, quick)
        check_kvcache_graph(dev, quick)
        check_stream(dev, quick)
        if not a.no_bench:
            try:
                bench(dev, quick)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                report("benchmarks", False, f"{type(e).__name__}: {e}")
    print(f"\n{'FAIL' if FAILURES else 'PASS'}: {len(FAILURES)} check(s) failed" +
          (": " + ", ".join(FAILURES) if FAILURES else ""), flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
