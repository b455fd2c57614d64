"""Metamorphic fuzz of flash_attn_rs's PyTorch entry points on CPU tensors.

    python scripts/fuzz_torch_meta.py SEED N [IT,IT,...]     # N random problems (or only the listed ones)

Each random problem (dtype, batch, lengths, GQA, head dim incl. padded ones, causal / window / softcap / scale,
ALiBi [H] or [B, H], dropout with a fixed rng_state) runs through flash_attn_func on contiguous tensors with
gradients (deterministic=True), and then through other ways of asking the same thing, which must give the same
bits (out, lse, dq, dk, dv): random layouts (permuted storage, storage offsets, strided head dims and slopes),
the custom ops instead of the eager path, the kv / qkv packed functions, flash_attn_varlen_func over the batch
(max_seqlen given, None, or larger), the hub's fwd / bwd / varlen_fwd / varlen_bwd (also into strided
outputs), the numpy path, explicit zero-padding to a kernel head dim, and scaled_dot_product_attention where it
expresses the problem. The CPU path is deterministic, so any difference is a bug of the plumbing around it
(found this way: strided ALiBi slopes' gradients read from freed memory). Prints the failures with the
problem's parameters; exit status 1 if any."""
import sys
import numpy as np
import torch
import flash_attn_rs as fa
from flash_attn_rs import _torch_impl

seed0, N = int(sys.argv[1]), int(sys.argv[2])
ONLY = [int(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else None
fails = []
calls = 0


def layout(g, t):
    c = g.integers(0, 5)
    if c == 0:
        return t.clone()
    if c == 1:
        perm = list(g.permutation(t.ndim))
        inv = [perm.index(i) for i in range(t.ndim)]
        return t.permute(*perm).contiguous().permute(*inv)
    if c == 2:
        buf = torch.empty(t.numel() + 3, dtype=t.dtype)
        x = buf[3:].view(t.shape)
        x.copy_(t)
        return x
    if c == 3:
        buf = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        x = buf[..., ::2]
        x.copy_(t)
        return x
    buf = torch.empty(*[2 * s for s in t.shape], dtype=t.dtype)
    x = buf[tuple(slice(None, None, 2) for _ in t.shape)]
    x.copy_(t)
    return x


def same(name, a, b, cfg):
    if a is None and b is None:
        return
    if a is None or b is None or a.shape != b.shape or not torch.equal(a, b):
        extra = ""
        if a is not None and b is not None and a.shape == b.shape:
            extra = f" max diff {(a.double() - b.double()).abs().nan_to_num(1e9).max().item():.3g}"
        else:
            extra = f" shapes {None if a is None else tuple(a.shape)} {None if b is None else tuple(b.shape)}"
        fails.append(f"{name}:{extra} | {cfg}")


def run(fn, inputs, dout):
    xs = [t.detach().requires_grad_(True) for t in inputs]
    out, lse = fn(*xs)
    out.backward(dout)
    return out.detach(), lse, [t.grad for t in xs]


def one(it, g):
    global calls
    dt = torch.bfloat16 if g.random() < 0.5 else torch.float16
    b = int(g.integers(1, 4))
    hk = int(g.integers(1, 3))
    h = hk * int(g.integers(1, 3))
    d = int(g.choice([32, 64, 96, 128, 192, 256])) if g.random() < 0.6 else int(g.integers(1, 257))
    sq = int(g.integers(1, 40))
    sk = sq if g.random() < 0.3 else int(g.integers(1, 40))
    causal = bool(g.random() < 0.4)
    window = (int(g.integers(-1, sk + 2)), int(g.integers(-1, sk + 2))) if g.random() < 0.3 else (-1, -1)
    softcap = 0.0 if g.random() < 0.7 else 6.0
    scale = None if g.random() < 0.7 else 0.2
    alibi = torch.rand(h) * 0.3 if g.random() < 0.2 else None
    if alibi is not None and g.random() < 0.5:
        alibi = torch.rand(b, h) * 0.3
    dropout = 0.0 if g.random() < 0.8 else 0.25
    rs = (int(g.integers(0, 2**62)), 0)
    opts = dict(causal=causal, window_size=window, softcap=softcap, softmax_scale=scale, alibi_slopes=alibi,
                dropout_p=dropout, deterministic=True)
    if dropout:
        opts["rng_state"] = rs
    cfg = dict(it=it, dt=str(dt), b=b, h=h, hk=hk, d=d, sq=sq, sk=sk, causal=causal, window=window, softcap=softcap,
               scale=scale, alibi=None if alibi is None else tuple(alibi.shape), dropout=dropout)
    q = torch.randn(b, sq, h, d).to(dt)
    k = torch.randn(b, sk, hk, d).to(dt)
    v = torch.randn(b, sk, hk, d).to(dt)
    dout = torch.randn(b, sq, h, d).to(dt)

    def func(q, k, v, **kw):
        o, l, _ = fa.flash_attn_func(q, k, v, return_attn_probs=True, **{**opts, **kw})
        return o, l

    base = run(func, (q, k, v), dout)
    calls += 1

    def cmp(name, res, lse_fn=lambda l: l):
        o, l, gr = res
        same(name + " out", o, base[0], cfg)
        if l is not None:
            same(name + " lse", lse_fn(l), base[1], cfg)
        for nm, a, bb in zip(("dq", "dk", "dv"), gr, base[2]):
            same(f"{name} {nm}", a, bb, cfg)

    # 1. layouts (inputs, dout, strided slopes)
    lay = [layout(g, t) for t in (q, k, v)]
    kw = {}
    if alibi is not None:
        buf = torch.empty(*alibi.shape[:-1], 2 * alibi.shape[-1])
        buf[..., ::2] = alibi
        kw["alibi_slopes"] = buf[..., ::2]
    cmp("layouts", run(lambda q, k, v: func(q, k, v, **kw), lay, layout(g, dout)))
    # 2. custom ops path
    _torch_impl.EAGER_FAST_PATH = False
    try:
        cmp("custom ops", run(func, (q, k, v), dout))
    finally:
        _torch_impl.EAGER_FAST_PATH = True
    # 3. kvpacked
    def kvp(q, kv):
        o, l, _ = fa.flash_attn_kvpacked_func(q, kv, return_attn_probs=True, **opts)
        return o, l
    o, l, (gq, gkv) = run(kvp, (q, torch.stack([k, v], 2)), dout)
    cmp("kvpacked", (o, l, [gq, gkv[:, :, 0], gkv[:, :, 1]]))
    # 4. qkvpacked
    if sq == sk and h == hk:
        def qkvp(qkv):
            o, l, _ = fa.flash_attn_qkvpacked_func(qkv, return_attn_probs=True, **opts)
            return o, l
        o, l, (gqkv,) = run(qkvp, (torch.stack([q, k, v], 2),), dout)
        cmp("qkvpacked", (o, l, [gqkv[:, :, 0], gqkv[:, :, 1], gqkv[:, :, 2]]))
    # 5. varlen (each batch entry a sequence), with and without max_seqlen, and a few extra tail rows in q
    cu_q = torch.arange(b + 1, dtype=torch.int32) * sq
    cu_k = torch.arange(b + 1, dtype=torch.int32) * sk
    for mx in ((sq, sk), (None, None), (sq + 5, sk + 1)):
        def vf(q, k, v):
            o, l, _ = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, mx[0], mx[1], return_attn_probs=True, **opts)
            return o, l
        vf2 = vf
        if dropout and mx[0] is None:  # S_dmask needs the max lengths: no lse then
            vf2 = lambda q, k, v: (fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, None, None, **opts), None)  # noqa
        o, l, gr = run(vf2, (q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)), dout.flatten(0, 1))
        cmp(f"varlen max {mx}", (o.view(b, sq, h, d), None if l is None else l.view(h, b, sq).transpose(0, 1),
                                 [gr[0].view(b, sq, h, d), gr[1].view(b, sk, hk, d), gr[2].view(b, sk, hk, d)]))
    # 6. the hub's fwd / bwd
    hub_opts = dict(alibi_slopes=alibi, p_dropout=dropout, softmax_scale=scale, is_causal=causal,
                    window_size_left=window[0], window_size_right=window[1], softcap=softcap)
    if not dropout:  # (the hub's fwd draws its own dropout seed)
        res = fa.fwd(q, k, v, **hub_opts)
        same("hub fwd out", res[0], base[0], cfg)
        same("hub fwd lse", res[1], base[1], cfg)
        grads = fa.bwd(dout, q, k, v, base[0], base[1], deterministic=True, **hub_opts)
        for nm, a, bb in zip(("dq", "dk", "dv"), grads[:3], base[2]):
            same(f"hub bwd {nm}", a, bb, cfg)
        # into caller's strided outputs
        outs = [layout(g, torch.empty_like(t)) for t in (q, k, v)]
        grads = fa.bwd(layout(g, dout), layout(g, q), layout(g, k), layout(g, v), layout(g, base[0]), base[1],
                       *outs, deterministic=True, **hub_opts)
        for nm, a, bb, o_ in zip(("dq", "dk", "dv"), grads[:3], base[2], outs):
            same(f"hub bwd into strided {nm}", a, bb, cfg)
            if a is not o_:
                fails.append(f"hub bwd {nm} not the given tensor | {cfg}")
        out_t = layout(g, torch.empty_like(q))
        fa.fwd(layout(g, q), layout(g, k), layout(g, v), out_t, **hub_opts)
        same("hub fwd into strided out", out_t, base[0], cfg)
        # varlen hub
        r3 = fa.varlen_fwd(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, max_seqlen_q=sq,
                           max_seqlen_k=sk, **hub_opts)
        same("hub varlen_fwd out", r3[0].view(b, sq, h, d), base[0], cfg)
        gv = fa.varlen_bwd(dout.flatten(0, 1), q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), r3[0], r3[1], cu_q,
                           cu_k, max_seqlen_q=sq, max_seqlen_k=sk, deterministic=True, **hub_opts)
        for nm, a, bb in zip(("dq", "dk", "dv"), gv[:3], base[2]):
            same(f"hub varlen_bwd {nm}", a.view(bb.shape), bb, cfg)
    # 7. numpy path (forward)
    if dt == torch.float16 and not dropout:
        nq, nk, nv = (t.numpy() for t in (q, k, v))
        nopts = dict(opts)
        if alibi is not None:
            nopts["alibi_slopes"] = alibi.numpy()
        o, l, _ = fa.flash_attn_func(nq, nk, nv, return_attn_probs=True, **nopts)
        same("numpy out", torch.from_numpy(o), base[0], cfg)
        same("numpy lse", torch.from_numpy(l), base[1], cfg)
    # 8. explicit zero-padding to a kernel head dim gives the padded path's result
    if d not in fa.HEAD_DIMS:
        dp = next(x for x in fa.HEAD_DIMS if x >= d)
        pad = lambda t: torch.nn.functional.pad(t, [0, dp - d])  # noqa: E731
        o, l, gr = run(lambda q, k, v: func(q, k, v, softmax_scale=scale if scale is not None else d ** -0.5),
                       (pad(q), pad(k), pad(v)), pad(dout))
        cmp("explicit padding", (o[..., :d], l, [x[..., :d] for x in gr]))
    # 9. SDPA (top-left causal == bottom-right when sq == sk)
    if window == (-1, -1) and softcap == 0 and alibi is None and not dropout and (not causal or sq == sk):
        def sd(q, k, v):
            o = fa.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                is_causal=causal, scale=scale, enable_gqa=h != hk, fallback=False)
            return o.transpose(1, 2), None
        cmp("sdpa", run(sd, (q, k, v), dout))


for it in ONLY or range(N):
    g = np.random.default_rng(seed0 * 4241 + it)
    try:
        one(it, g)
    except Exception as e:  # noqa: BLE001
        import traceback
        tb = traceback.extract_tb(e.__traceback__)[-1]
        fails.append(f"it {it}: {type(e).__name__}: {str(e)[:300]} @ {tb.lineno}")
    if len(fails) > 30:
        break
print(f"seed {seed0}: {calls} problems, {len(fails)} failures")
for f in fails:
    print(" ", f[:600])
sys.exit(1 if fails else 0)
