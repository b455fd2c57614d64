"""flash_attn_rs.hf (Hugging Face transformers' attention interface) against references, on CPU or CUDA tensors.

    PYTHONPATH=/tmp/fa python3 tests/python/hf_check.py [--device cpu] [--cases N] [--seed S]

gpu_check.py runs these too. Checks, each a PASS or FAIL line:
- `hf.attention` called as transformers calls it (query `[B, H, S, D]`, a `[B, L]` padding mask or None) on random
  cases: left, right, no and full padding, masks with holes, prefill, decoding steps over a padded cache, chunked
  prefill, a static cache's unused tail (L < Sk), causal or not, sliding windows, softcap, scaling, GQA, head dims
  64 / 128 / 80, key and value token-major or head-major, with and without gradients; against a float64 reference
  of flash-attn's padded semantics (each row's real tokens compacted, causal bottom-right per row): out, and the
  gradients of q, k, v; padded query rows and the gradients at padded rows exactly 0;
- packed sequences through position_ids and through the collator's cu_seq_lens kwargs, against each sequence alone;
- hf.padding_mask on transformers' calls: padding, static caches' unwritten slots (int and tensor q_offset),
  bidirectional masks;
- with transformers installed (skipped with a notice otherwise): small random Llama (GQA), Mistral (sliding
  window) and Gemma 2 (softcap, alternating sliding layers) models with `attn_implementation` the registered
  name against the same models' eager attention in float32: logits of padded batches (left and right padding),
  a training step's loss and gradients with padding, greedy generation from a left-padded batch (each step's
  logits against a full recomputation), and a packed batch against its sequences; a small BART (cross-attention over
  a padded encoder batch, cached generation) and BERT (right padding).
"""

import argparse
import copy
import math
import random
import sys
import traceback
import types

import torch

import flash_attn_rs.hf as hf

FAILURES = []


def report(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILURES.append(name)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def ref_dense(q, k, v, scale, causal, window, softcap):
    """q [Sq, H, D], k, v [Sk, Hk, D] in their dtype (differentiable): flash-attn's attention, bottom-right."""
    h, hk = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(h // hk, dim=1), v.repeat_interleave(h // hk, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    sq, sk = q.shape[0], k.shape[0]
    i = torch.arange(sq, device=q.device)[:, None] + sk - sq
    j = torch.arange(sk, device=q.device)[None, :]
    left, right = window
    seen = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if left >= 0:
        seen &= j >= i - left
    if causal or right >= 0:
        seen &= j <= i + (0 if causal else right)
    p = torch.nan_to_num(torch.softmax(s.masked_fill(~seen, float("-inf")), dim=-1), nan=0.0)
    return torch.einsum("hqk,khd->qhd", p, v)


def ref_padded(q, k, v, mask, scale, causal, window, softcap):
    """q [B, Sq, H, D], k, v [B, Sk, Hk, D], mask [B, L] (bool, or int8 with hf.UNWRITTEN for a static cache's
    unwritten slots) or None: each row's real keys (mask > 0) and real queries compacted and attended to as one
    sequence (flash-attn's unpadding); padded query rows 0. The queries (`real_queries`): without a causal mask or
    window all (an encoder-decoder's cross-attention); else the last Sq positions, or the last Sq written ones, each
    real where the mask is (the one query of a decoding step always)."""
    b, sq = q.shape[:2]
    out = torch.zeros_like(q[..., :v.shape[-1]])
    real_q = None if mask is None else real_queries(mask, sq, causal, window)
    for i in range(b):
        if mask is None:
            kq, qq = torch.arange(k.shape[1]), torch.arange(sq)
        else:
            kq = (mask[i] > 0).nonzero().flatten().cpu()
            qq = real_q[i].nonzero().flatten().cpu()
        o = ref_dense(q[i, qq], k[i, kq], v[i, kq], scale, causal, window, softcap)
        out = out.index_put((torch.tensor([i]).expand(len(qq)), qq), o)
    return out


def real_queries(mask, sq, causal, window):
    """The real query rows `[B, Sq]` of ref_padded's rule."""
    rows = []
    for i in range(mask.shape[0]):
        if not causal and window == (-1, -1):
            rows.append(torch.ones(sq, dtype=torch.bool, device=mask.device))
        elif sq == 1:
            rows.append(torch.ones(1, dtype=torch.bool, device=mask.device))
        else:
            n = int((mask[i] >= 0).sum()) if mask.dtype != torch.bool else mask.shape[1]
            rows.append(torch.tensor([n - sq + j >= 0 and bool(mask[i, n - sq + j] > 0) for j in range(sq)],
                                     device=mask.device))
    return torch.stack(rows)


def call(q, k, v, mask, causal, window, softcap, scale, q_heads_major=False, kv_heads_major=False, **kwargs):
    """hf.attention as transformers calls it: tensors [B, H, S, D] (transposed views of token-major storage,
    or head-major storage)."""
    def as_bhsd(t, heads_major):
        return t.transpose(1, 2).contiguous() if heads_major else t.transpose(1, 2)
    module = types.SimpleNamespace(is_causal=causal)
    sliding = window[0] + 1 if window[0] >= 0 else None
    out, weights = hf.attention(module, as_bhsd(q, q_heads_major), as_bhsd(k, kv_heads_major),
                                as_bhsd(v, kv_heads_major), mask, dropout=0.0, scaling=scale, sliding_window=sliding,
                                softcap=softcap or None, **kwargs)
    assert weights is None
    return out


def random_mask(rng, b, lk, kind):
    m = torch.zeros(b, lk, dtype=torch.bool)
    for i in range(b):
        n = rng.randint(0, lk) if rng.random() < 0.15 else rng.randint(max(1, lk // 3), lk)
        how = kind if kind != "mixed" else rng.choice(["left", "right", "none"])
        if how == "none":
            n = lk
        if how == "holes":
            m[i] = torch.tensor([rng.random() < 0.6 for _ in range(lk)])
        elif how == "right":
            m[i, :n] = True
        else:
            m[i, lk - n:] = True
    return m


def padded_case(dev, rng, dtype, case):
    b = rng.randint(1, 4)
    h, hk = rng.choice([(4, 4), (8, 2), (6, 1)])
    d = rng.choice([64, 128, 80])
    mode = rng.choice(["prefill", "prefill", "decode", "chunk", "static", "cross", "tail"])
    lk = rng.randint(2, 70)
    sk = lk + (rng.randint(1, 9) if mode == "static" else 0)
    sq = {"prefill": lk, "static": lk, "decode": 1, "chunk": rng.randint(2, min(lk, 7)), "cross": rng.randint(1, 80),
          "tail": rng.randint(1, min(lk, 7))}[mode]
    kind = rng.choice(["left", "right", "mixed", "holes"] if mode in ("prefill", "static", "cross", "chunk") else
                      ["left", "mixed"])
    causal = rng.random() < 0.7 and mode != "cross"  # cross: an encoder-decoder's (decoder queries, encoder keys)
    window = (rng.randint(1, lk), rng.randint(1, lk)) if rng.random() < 0.3 and mode != "cross" else (-1, -1)
    window = (window[0], window[0]) if window[0] >= 0 else window  # transformers' (w - 1, w - 1)
    softcap = rng.choice([0.0, 0.0, 5.0])
    scale = rng.choice([None, 0.3])
    grad = mode != "decode" and rng.random() < 0.5
    heads_major = rng.random() < 0.5
    seed = rng.randrange(1 << 30)
    torch.manual_seed(seed)
    mask = random_mask(rng, b, lk, kind).to(dev)
    if mode == "tail":
        # A static cache's mask as hf.padding_mask makes it: the written slots (1, or 0 where padded) then
        # hf.UNWRITTEN ones; the queries are the last sq written positions.
        written = torch.tensor([rng.randint(sq, lk) for _ in range(b)], device=dev)
        slot = torch.arange(lk, device=dev)[None]
        shifted = torch.stack([torch.roll(mask[i], int(written[i]) - lk) for i in range(b)])
        mask = torch.where(slot < written[:, None], shifted.to(torch.int8), torch.tensor(hf.UNWRITTEN, dtype=torch.int8, device=dev))
    q = torch.randn(b, sq, h, d, device=dev, dtype=dtype)
    k = torch.randn(b, sk, hk, d, device=dev, dtype=dtype)
    v = torch.randn(b, sk, hk, d, device=dev, dtype=dtype)
    dout = torch.randn(b, sq, h, d, device=dev, dtype=dtype)
    s = d ** -0.5 if scale is None else scale
    what = (f"#{case} {mode} B{b} Sq{sq} Sk{sk} L{lk} H{h}/{hk} D{d} {kind} causal={causal} window={window} "
            f"softcap={softcap} scale={scale} grad={grad} heads_major={heads_major} (seed {seed})")

    def ref(dt):
        return lambda q, k, v: ref_padded(q.to(dt), k.to(dt), v.to(dt), mask, s, causal, window, softcap)

    def ours(q, k, v):
        return call(q, k, v, mask, causal, window, softcap, scale, kv_heads_major=heads_major,
                    q_heads_major=heads_major and mode != "decode")

    tensors = (q, k, v)
    if grad:
        results = []
        for fn, dt in ((ours, dtype), (ref(torch.float64), torch.float64), (ref(dtype), dtype)):
            ins = [t.detach().to(dt).requires_grad_(True) for t in tensors]
            o = fn(*ins)
            results.append((o.detach(), torch.autograd.grad(o, ins, dout.to(dt))))
    else:
        with torch.no_grad():
            results = [(fn(*[t.to(dt) for t in tensors]), ()) for fn, dt in
                       ((ours, dtype), (ref(torch.float64), torch.float64), (ref(dtype), dtype))]
    (o, g), (ro, rg), (lo, lg) = results
    details, ok = [], o.shape == ro.shape
    for name, a, r, low, factor, floor in [("out", o, ro, lo, 2, 1e-3)] + [
            (n, a, r, low, 3, 3e-3) for n, a, r, low in zip(("dq", "dk", "dv"), g, rg, lg)]:
        e, base = max_err(a, r), max_err(low, r)
        ok &= math.isfinite(e) and e <= factor * base + floor
        details.append(f"{name} {e:.1e} ({base:.1e})")
    # Padded rows exactly 0: out and dq at padded queries, dk and dv at keys no row sees.
    mq = real_queries(mask, sq, causal, window)
    mk = mask > 0
    zeros = [o[~mq]] + ([g[0][~mq], g[1][:, :lk][~mk], g[2][:, :lk][~mk], g[1][:, lk:], g[2][:, lk:]] if grad else [])
    exact = all(bool((z == 0).all()) for z in zeros)
    report(f"hf.attention padded [{what}]", ok and exact, ", ".join(details) + ("" if exact else ", padded rows not 0"))


def check_padded(dev, cases, seed):
    rng = random.Random(seed)
    print(f"hf.attention padded cases: seed {seed}", flush=True)
    for case in range(cases):
        try:
            padded_case(dev, rng, rng.choice([torch.bfloat16, torch.float16]), case)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            report(f"hf.attention padded case #{case}", False, f"{type(e).__name__}: {e}")


def check_packed(dev, seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    lens = [rng.randint(1, 40) for _ in range(rng.randint(2, 6))]
    total, h, hk, d = sum(lens), 8, 2, 64
    q = torch.randn(1, total, h, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, total, hk, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, total, hk, d, device=dev, dtype=torch.bfloat16)
    first = rng.choice([0, 2])  # RoBERTa-like models start at padding_idx + 1
    pos = torch.cat([torch.arange(n) + first for n in lens])[None].to(dev)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
    ref = torch.cat([ref_dense(q[0, a:z].double(), k[0, a:z].double(), v[0, a:z].double(), d ** -0.5, True, (-1, -1),
                               0.0) for a, z in zip(cu[:-1].tolist(), cu[1:].tolist())])
    low = torch.cat([ref_dense(q[0, a:z], k[0, a:z], v[0, a:z], d ** -0.5, True, (-1, -1), 0.0)
                     for a, z in zip(cu[:-1].tolist(), cu[1:].tolist())])
    base = max_err(low, ref)
    for how, kwargs in (("position_ids", {"position_ids": pos}),
                        ("cu_seq_lens", {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lens),
                                         "max_length_k": max(lens)})):
        out = call(q, k, v, None, True, (-1, -1), 0.0, None, **kwargs)
        e = max_err(out[0], ref)
        report(f"hf.attention packed sequences through {how} == each sequence alone (lengths {lens}, seed {seed})",
               e <= 2 * base + 1e-3, f"err {e:.1e} ({base:.1e})")
    # One sequence (positions from an offset, as a continued prefill): the dense call.
    out = call(q, k, v, None, True, (-1, -1), 0.0, None, position_ids=torch.arange(total, device=dev)[None] + 5)
    ref1 = ref_dense(q[0].double(), k[0].double(), v[0].double(), d ** -0.5, True, (-1, -1), 0.0)
    report("hf.attention position_ids of one sequence: the dense call", max_err(out[0], ref1) <= 2e-2)


def check_errors(dev):
    q = torch.randn(1, 4, 2, 64, device=dev, dtype=torch.bfloat16)
    module = types.SimpleNamespace(is_causal=True)
    for name, args, kw, exc in (
            ("attention sinks", (q, q, q, None), {"s_aux": torch.zeros(4)}, NotImplementedError),
            ("float32 without autocast", (q.float(), q.float(), q.float(), None), {}, TypeError),
            ("a 4-D mask", (q, q, q, torch.ones(1, 1, 2, 2, dtype=torch.bool, device=dev)), {}, ValueError),
            ("a mask longer than the keys", (q, q, q, torch.ones(1, 3, dtype=torch.bool, device=dev)), {}, ValueError)):
        try:
            hf.attention(module, *args, **kw)
            report(f"hf.attention raises on {name}", False, "no error")
        except exc as e:
            report(f"hf.attention raises on {name}", "hf.attention" in str(e), f"{type(e).__name__}: {e}")


def check_padding_mask(dev):
    """hf.padding_mask (the registered mask function; no transformers needed) on transformers' calls."""
    u = hf.UNWRITTEN
    ones = torch.ones(2, 6, dtype=torch.bool, device=dev)
    left = ones.clone()
    left[0, :2] = False
    kw = {"device": dev}
    cases = [
        ("no padding, no cache slots past the tokens", hf.padding_mask(2, 6, 6, attention_mask=ones, **kw), None),
        ("left padding: the mask's last kv_length columns", hf.padding_mask(2, 6, 6, attention_mask=left, **kw), left),
        ("a static cache's prefill (int q_offset)", hf.padding_mask(2, 4, 6, 0, **kw), [[1, 1, 1, 1, u, u]] * 2),
        ("a static cache's decoding step (tensor q_offset)",
         hf.padding_mask(2, 1, 6, torch.tensor(3, device=dev), **kw), [[1, 1, 1, 1, u, u]] * 2),
        ("a static cache under a shorter padded mask", hf.padding_mask(2, 6, 8, 0, attention_mask=left, **kw),
         [[0, 0, 1, 1, 1, 1, u, u], [1, 1, 1, 1, 1, 1, u, u]]),
        ("a bidirectional mask without padding", hf.padding_mask(2, 3, 6, allow_is_bidirectional_skip=True, **kw), None),
    ]
    for what, got, want in cases:
        if want is None:
            ok = got is None
        else:
            want = want if isinstance(want, torch.Tensor) else torch.tensor(want, dtype=torch.int8, device=dev)
            ok = got is not None and got.dtype == want.dtype and torch.equal(got.to(dev), want)
        report(f"hf.padding_mask: {what}", ok, f"got {None if got is None else got.tolist()}")


# --- Whole models (transformers) ----------------------------------------------------------------------

def tiny_models():
    import transformers as tr
    common = dict(vocab_size=211, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    yield "Llama (GQA)", tr.LlamaForCausalLM, tr.LlamaConfig(**common)
    yield "Mistral (sliding window 5)", tr.MistralForCausalLM, tr.MistralConfig(**common, sliding_window=5)
    yield "Gemma 2 (softcap, sliding window 6)", tr.Gemma2ForCausalLM, tr.Gemma2Config(
        **common, head_dim=32, sliding_window=6, attn_logit_softcapping=20.0, final_logit_softcapping=None)


def check_models(dev, seed):
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("SKIP transformers model checks: transformers is not installed", flush=True)
        return
    name = hf.register()
    print(f"registered attn_implementation {name!r}", flush=True)
    for label, cls, cfg in tiny_models():
        try:
            model_case(dev, seed, label, cls, cfg, name)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            report(f"transformers {label}", False, f"{type(e).__name__}: {e}")
    try:
        check_encoder_decoder(dev, seed, name)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        report("transformers BART / BERT", False, f"{type(e).__name__}: {e}")


def count_calls(model):
    """A counter of the model's calls of hf.attention (wrapping the function its config names), so that a check
    fails if the model ran some other attention."""
    from transformers import AttentionInterface
    name = model.config._attn_implementation
    counter = [0]

    def counted(*args, **kwargs):
        counter[0] += 1
        return hf.attention(*args, **kwargs)
    AttentionInterface.register(name, counted)
    return counter


def three_models(cls, cfg, dev, seed, name):
    """The same random weights as (eager float32, `name` bfloat16, eager bfloat16) models, each with its own config
    (set_attn_implementation writes into it), and a counter of the middle one's hf.attention calls."""
    models = []
    for impl, dt in (("eager", torch.float32), (name, torch.bfloat16), ("eager", torch.bfloat16)):
        torch.manual_seed(seed)
        m = cls(copy.deepcopy(cfg)).to(dev).to(dt).eval()
        m.set_attn_implementation(impl)
        models.append(m)
    return (*models, count_calls(models[1]))


def model_case(dev, seed, label, cls, cfg, name):
    ref, ours, low, calls = three_models(cls, cfg, dev, seed, name)
    b, s = 3, 24
    ids = torch.randint(3, cfg.vocab_size, (b, s), device=dev)
    for side in ("left", "right"):
        am = torch.ones(b, s, dtype=torch.long, device=dev)
        for i, n in enumerate((0, 7, 15)):
            if n:
                am[i, :n] = 0 if side == "left" else 1
                if side == "right":
                    am[i, s - n:] = 0
                    am[i, :s - n] = 1
        real = am.bool()
        with torch.no_grad():
            lo, lr, ll = (m(input_ids=ids, attention_mask=am).logits.float() for m in (ours, ref, low))
        e, base = max_err(lo[real], lr[real]), max_err(ll[real], lr[real])
        report(f"transformers {label}: logits of a {side}-padded batch vs eager float32", e <= 2 * base + 1e-2,
               f"err {e:.2e} (eager bf16 {base:.2e}, seed {seed})")
    # A training step over the right-padded batch: loss and every parameter's gradient.
    labels = ids.masked_fill(am == 0, -100)
    grads = []
    for m in (ours, ref, low):
        m.zero_grad()
        m.train()
        loss = m(input_ids=ids, attention_mask=am, labels=labels).loss
        loss.backward()
        m.eval()
        grads.append((loss.detach().float(), torch.cat([p.grad.float().flatten() for p in m.parameters()])))
    (lo_, go), (lr_, gr), (ll_, gl) = grads
    e, base = max_err(go, gr), max_err(gl, gr)
    el, bl = abs(lo_ - lr_).item(), abs(ll_ - lr_).item()
    report(f"transformers {label}: training step with padding (loss, gradients) vs eager float32",
           e <= 2 * base + 1e-3 and el <= 2 * bl + 1e-2, f"grad err {e:.2e} ({base:.2e}), loss err {el:.2e} ({bl:.2e})")
    # Greedy generation from a left-padded batch (the cache's decoding steps over padded keys), each step's logits
    # against the eager float32 model over the whole sequence so far; with transformers' default cache and with a
    # static one (whose unwritten slots the keys include).
    padded = torch.ones(b, s, dtype=torch.long, device=dev)
    padded[1, :5] = 0
    padded[2, :11] = 0
    for cache, am in (("dynamic", padded), ("static", padded), ("static", torch.ones_like(padded))):
        kw = {"cache_implementation": "static"} if cache == "static" else {}
        with torch.no_grad():
            g = ours.generate(input_ids=ids, attention_mask=am, max_new_tokens=6, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0, **kw)
            full = g.sequences
            full_am = torch.cat([am, torch.ones(b, full.shape[1] - s, dtype=am.dtype, device=dev)], 1)
            lr = ref(input_ids=full, attention_mask=full_am).logits.float()
            ll = low(input_ids=full, attention_mask=full_am).logits.float()
        steps = torch.stack([x.float() for x in g.logits], 1)  # [B, new, V]: step t predicts token s + t
        e, base = max_err(steps, lr[:, s - 1:-1]), max_err(ll[:, s - 1:-1], lr[:, s - 1:-1])
        what = "a left-padded batch" if (am == 0).any() else "an unpadded batch"
        report(f"transformers {label}: greedy generation from {what} ({cache} cache), step logits vs eager float32",
               e <= 2 * base + 2e-2, f"err {e:.2e} (eager bf16 {base:.2e})")
    # torch.compile(fullgraph=True) (aot_eager: the custom ops' fake functions and the traced routing) of a padded
    # forward and of a training step: the eager calls' results.
    am = padded.clone()
    am[0, 20:] = 0
    labels = ids.masked_fill(am == 0, -100)
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        same_fwd = torch.equal(compiled(input_ids=ids, attention_mask=am).logits, ours(input_ids=ids, attention_mask=am).logits)
    grads = []
    for m in (compiled, ours):
        ours.zero_grad()
        ours.train()
        m(input_ids=ids, attention_mask=am, labels=labels).loss.backward()
        ours.eval()
        grads.append(torch.cat([p.grad.flatten() for p in ours.parameters()]))
    report(f"transformers {label}: torch.compile(fullgraph=True) of a padded forward and training step == eager",
           same_fwd and torch.equal(*grads), f"forward {'equal' if same_fwd else 'differs'}, gradients differ by "
           f"{max_err(*grads):.1e}")
    # A packed batch (position_ids restarting) against its sequences one by one.
    lens = [9, 4, 11]
    seqs = [torch.randint(3, cfg.vocab_size, (1, n), device=dev) for n in lens]
    pos = torch.cat([torch.arange(n, device=dev) for n in lens])[None]
    with torch.no_grad():
        packed = ours(input_ids=torch.cat(seqs, 1), position_ids=pos).logits.float()[0]
        alone = torch.cat([ours(input_ids=x).logits.float()[0] for x in seqs])
        alone_ref = torch.cat([ref(input_ids=x).logits.float()[0] for x in seqs])
    e = max_err(packed, alone_ref)
    base = max_err(alone, alone_ref)
    report(f"transformers {label}: packed batch (position_ids) == its sequences alone", e <= 2 * base + 1e-2,
           f"err {e:.2e} (alone {base:.2e})")
    report(f"transformers {label}: the model ran hf.attention", calls[0] > 0 and ours.config._attn_implementation == name,
           f"{calls[0]} calls")


def check_encoder_decoder(dev, seed, name):
    """A small random BART (encoder self-attention, causal decoder, cross-attention over the encoder's padding) and
    BERT (an encoder over right padding), against their eager attention in float32."""
    import transformers as tr
    torch.manual_seed(seed)
    b, s_enc, s_dec = 3, 19, 11
    enc_am = torch.ones(b, s_enc, dtype=torch.long, device=dev)
    enc_am[1, 12:] = 0
    enc_am[2, 4:] = 0
    common = dict(vocab_size=211, d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=64)
    cfg = tr.BartConfig(**common, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    ref, ours, low, calls = three_models(tr.BartForConditionalGeneration, cfg, dev, seed, name)
    ids = torch.randint(3, cfg.vocab_size, (b, s_enc), device=dev)
    dec = torch.randint(3, cfg.vocab_size, (b, s_dec), device=dev)
    with torch.no_grad():
        lr, lo, ll = (m(input_ids=ids, attention_mask=enc_am, decoder_input_ids=dec).logits.float() for m in (ref, ours, low))
    e, base = max_err(lo, lr), max_err(ll, lr)
    report("transformers BART: logits over a padded encoder batch (cross-attention) vs eager float32",
           e <= 2 * base + 1e-2, f"err {e:.2e} (eager bf16 {base:.2e})")
    with torch.no_grad():
        g = ours.generate(input_ids=ids, attention_mask=enc_am, max_new_tokens=5, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, min_new_tokens=5)
        full = g.sequences
        lr = ref(input_ids=ids, attention_mask=enc_am, decoder_input_ids=full[:, :-1]).logits.float()
        ll = low(input_ids=ids, attention_mask=enc_am, decoder_input_ids=full[:, :-1]).logits.float()
    steps = torch.stack([x.float() for x in g.logits], 1)
    e, base = max_err(steps, lr), max_err(ll, lr)
    report("transformers BART: greedy generation (cached cross-attention), step logits vs eager float32",
           e <= 2 * base + 2e-2, f"err {e:.2e} (eager bf16 {base:.2e})")
    report("transformers BART: the model ran hf.attention", calls[0] > 0, f"{calls[0]} calls")
    bcfg = tr.BertConfig(vocab_size=211, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=256, max_position_embeddings=64)
    *models, calls = three_models(tr.BertModel, bcfg, dev, seed, name)
    with torch.no_grad():
        hr, ho, hl = (m(input_ids=ids, attention_mask=enc_am).last_hidden_state.float() for m in models)
    real = enc_am.bool()
    e, base = max_err(ho[real], hr[real]), max_err(hl[real], hr[real])
    report("transformers BERT: hidden states of a right-padded batch vs eager float32", e <= 2 * base + 1e-2 and calls[0] > 0,
           f"err {e:.2e} (eager bf16 {base:.2e}), {calls[0]} calls")
    # Gemma 3 with bidirectional attention (EmbeddingGemma's layers: an or_masks composition over kv - q).
    gcfg = tr.Gemma3TextConfig(vocab_size=211, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=5,
                               use_bidirectional_attention=True, layer_types=["sliding_attention", "full_attention"])
    *models, calls = three_models(tr.Gemma3TextModel, gcfg, dev, seed, name)
    with torch.no_grad():
        hr, ho, hl = (m(input_ids=ids, attention_mask=enc_am).last_hidden_state.float() for m in models)
    e, base = max_err(ho[real], hr[real]), max_err(hl[real], hr[real])
    report("transformers Gemma 3 bidirectional: hidden states of a right-padded batch vs eager float32",
           e <= 2 * base + 1e-2 and calls[0] > 0, f"err {e:.2e} (eager bf16 {base:.2e}), {calls[0]} calls")
    # A mask beyond a padding mask plus causal / window: transformers' chunked attention (Llama 4) raises.
    from transformers.masking_utils import chunked_causal_mask_function
    try:
        hf.padding_mask(1, 4, 4, mask_function=chunked_causal_mask_function(2, torch.zeros(1, dtype=torch.long)))
        report("hf.padding_mask raises on chunked attention's mask function", False, "no error")
    except NotImplementedError as e:
        report("hf.padding_mask raises on chunked attention's mask function", "chunked" in str(e), str(e)[:80])


def run(dev, quick, seed=None, cases=None):
    """Every check on `dev`; returns the names of the failed ones."""
    seed = random.randrange(1 << 30) if seed is None else seed
    check_padded(dev, cases or (40 if quick else 150), seed)
    check_packed(dev, seed)
    check_errors(dev)
    check_padding_mask(dev)
    check_models(dev, seed)
    return FAILURES


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--cases", type=int)
    p.add_argument("--seed", type=int)
    a = p.parse_args()
    dev = torch.device(a.device)
    run(dev, a.device == "cpu", a.seed, a.cases)
    print(f"\n{'FAIL' if FAILURES else 'PASS'}: {len(FAILURES)} check(s) failed", flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
