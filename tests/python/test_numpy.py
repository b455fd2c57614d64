"""flash_attn_rs on numpy arrays (the CPU path; no GPU, no torch): every public function against a float64
reference written from the definition of attention, and every kind of bad input a Python exception that
names the argument.

Each test draws fresh random inputs; the seed is printed (pytest shows it for a failing test) and is in
every assertion message. FA_TEST_SEED=<seed> replays a run.
"""

import os
import random
import sys

import numpy as np
import pytest

import flash_attn_rs as fa
from flash_attn_rs import _native

F16 = np.float16
U16 = 2.0 ** -11  # float16's unit roundoff


# --- Seeds -------------------------------------------------------------------------------------------

def new_rng(test):
    seed = int(os.environ.get("FA_TEST_SEED") or random.SystemRandom().randrange(2**63))
    print(f"{test}: seed {seed} (FA_TEST_SEED={seed} replays it)")
    return seed, np.random.default_rng(seed)


def randn(rng, shape, dtype=F16, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


# --- The float64 reference ---------------------------------------------------------------------------

def visible(sq, sk, causal, window):
    """mask[i, j]: query i sees key j (bottom-right aligned: the diagonal is j = i + sk - sq)."""
    left, right = window
    if causal:
        right = 0
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    diag = i + sk - sq
    mask = np.ones((sq, sk), bool)
    if left >= 0:
        mask &= j >= diag - left
    if right >= 0:
        mask &= j <= diag + right
    return mask


def ref_probs(q, k, scale, causal, window, softcap, alibi=None):
    """One sequence: q [sq, hq, d], k [sk, hk, d] (float64), alibi slopes [hq] or None. Returns P
    [hq, sq, sk], lse [hq, sq], the scores before the softcap and the mask."""
    sq, hq, _ = q.shape
    sk, hk, _ = k.shape
    kk = np.repeat(k, hq // hk, axis=1)
    x = np.einsum("qhd,khd->hqk", q, kk) * scale
    s = softcap * np.tanh(x / softcap) if softcap > 0 else x
    if alibi is not None:
        # flash-attn: - slope * |i + sk - sq - j|, after scale and softcap.
        dist = np.abs(np.arange(sq)[:, None] + sk - sq - np.arange(sk)[None, :])
        s = s - np.asarray(alibi, np.float64)[:, None, None] * dist[None]
    mask = visible(sq, sk, causal, window)[None]
    s = np.where(mask, s, -np.inf)
    m = s.max(axis=-1, keepdims=True) if sk else np.full((hq, sq, 1), -np.inf)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(mask, np.exp(s - m), 0.0)
    tot = e.sum(axis=-1, keepdims=True)
    p = e / np.where(tot > 0, tot, 1.0)
    lse = np.where(tot[..., 0] > 0, np.log(np.where(tot[..., 0] > 0, tot[..., 0], 1.0)) + m[..., 0], -np.inf)
    return p, lse, x, mask


def ref_attention(q, k, v, scale, causal=False, window=(-1, -1), softcap=0.0, alibi=None, keep=None,
                  dropout_p=0.0):
    """One sequence: out [sq, hq, d] and lse [hq, sq], in float64, from the definition. `keep` [hq, sq, sk]
    (bool): dropout's keep mask, kept probabilities scaled by 1 / (1 - dropout_p)."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    hq, hk = q.shape[1], k.shape[1]
    p, lse, _, _ = ref_probs(q, k, scale, causal, window, softcap, alibi)
    if keep is not None:
        p = np.where(keep, p / (1 - dropout_p), 0.0)
    vv = np.repeat(v, hq // hk, axis=1)
    out = np.einsum("hqk,khd->qhd", p, vv)
    return out, lse


def ref_attention_bwd(q, k, v, out, dout, scale, causal=False, window=(-1, -1), softcap=0.0, alibi=None,
                      keep=None, dropout_p=0.0):
    """One sequence's gradients of sum(dout * out). D_i = dout_i . out_i uses the `out` given (the one
    the library's backward reads). ALiBi and dropout (`keep`) as in ref_attention."""
    q, k, v, out, dout = (np.asarray(t, np.float64) for t in (q, k, v, out, dout))
    hq, hk = q.shape[1], k.shape[1]
    g = hq // hk
    p, _, x, mask = ref_probs(q, k, scale, causal, window, softcap, alibi)
    kk, vv = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    m = np.ones_like(p) if keep is None else np.where(keep, 1 / (1 - dropout_p), 0.0)
    dv = np.einsum("hqk,qhd->khd", p * m, dout)
    dp = np.einsum("qhd,khd->hqk", dout, vv) * m
    dd = np.einsum("qhd,qhd->hq", dout, out)[..., None]
    ds = p * (dp - dd)
    if softcap > 0:
        ds = ds * (1.0 - np.tanh(x / softcap) ** 2)
    ds = np.where(mask, ds, 0.0)
    dq = scale * np.einsum("hqk,khd->qhd", ds, kk)
    dk = scale * np.einsum("hqk,qhd->khd", ds, q)
    sk, d = k.shape[0], k.shape[2]
    dk = dk.reshape(sk, hk, g, d).sum(axis=2)
    dv = dv.reshape(sk, hk, g, d).sum(axis=2)
    return dq, dk, dv


# --- Tolerances --------------------------------------------------------------------------------------

def check_out(got, ref, vmax, seed, what="out", u=U16):
    """The library computes in f32 and rounds out once: |diff| <= u |ref| + 2^-12 vmax (tests/common's
    bound), with a factor 2 to spare. A row the reference leaves empty must be exactly 0."""
    got = np.asarray(got, np.float64)
    assert got.shape == ref.shape, f"seed {seed}: {what} shape {got.shape} != {ref.shape}"
    bound = 2 * (u * np.abs(ref) + 2.0 ** -12 * vmax)
    bad = ~(np.abs(got - ref) <= bound)
    assert not bad.any(), (f"seed {seed}: {what} differs at {np.argwhere(bad)[:5].tolist()}: "
                           f"got {got[bad][:5]}, reference {ref[bad][:5]}")
    assert np.all(got[ref == 0] == 0), f"seed {seed}: {what}: rows that see no key must be exactly 0"


def check_lse(got, ref, smax, seed, what="lse"):
    got = np.asarray(got, np.float64)
    assert got.shape == ref.shape, f"seed {seed}: {what} shape {got.shape} != {ref.shape}"
    inf = np.isneginf(ref)
    assert np.array_equal(np.isneginf(got), inf), f"seed {seed}: {what}: -inf exactly where no key is seen"
    bound = 4 * 2.0 ** -20 * (np.abs(ref[~inf]) + 1 + smax)
    diff = np.abs(got[~inf] - ref[~inf])
    assert np.all(diff <= bound), f"seed {seed}: {what}: max |diff| {diff.max():.3e}"


def check_grad(got, ref, seed, what, u=U16):
    """Gradients: rounded once to f16 from f32 sums; 2u |ref| plus 2^-9 of the largest magnitude."""
    got = np.asarray(got, np.float64)
    assert got.shape == ref.shape, f"seed {seed}: {what} shape {got.shape} != {ref.shape}"
    if ref.size == 0:
        return
    bound = 2 * u * np.abs(ref) + 2.0 ** -9 * max(np.abs(ref).max(), 1e-3)
    bad = ~(np.abs(got - ref) <= bound)
    assert not bad.any(), (f"seed {seed}: {what} differs at {np.argwhere(bad)[:5].tolist()}: "
                           f"got {got[bad][:5]}, reference {ref[bad][:5]}")


def smax_of(q, k, scale, softcap):
    if softcap > 0:
        return softcap
    return abs(scale) * q.shape[-1] * np.abs(q.astype(np.float64)).max() * np.abs(k.astype(np.float64)).max()


MASKS = [
    # (causal, window, softcap)
    (False, (-1, -1), 0.0),
    (True, (-1, -1), 0.0),
    (False, (20, 5), 0.0),
    (False, (0, 0), 0.0),
    (True, (7, -1), 0.0),
    (False, (-1, 3), 0.0),
    (False, (-1, -1), 5.0),
    (True, (16, -1), 2.0),
]


# --- Dense -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal,window,softcap", MASKS)
@pytest.mark.parametrize("sq,sk,hq,hk,d", [(37, 53, 4, 2, 64), (70, 29, 3, 1, 32), (64, 64, 2, 2, 128)])
def test_dense_forward(causal, window, softcap, sq, sk, hq, hk, d):
    seed, rng = new_rng("test_dense_forward")
    b = 2
    q, k, v = randn(rng, (b, sq, hq, d)), randn(rng, (b, sk, hk, d)), randn(rng, (b, sk, hk, d))
    out, lse, probs = fa.flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap,
                                         return_attn_probs=True)
    assert probs is None
    assert out.dtype == F16 and out.shape == q.shape, seed
    assert lse.dtype == np.float32 and lse.shape == (b, hq, sq), seed
    scale = d ** -0.5
    for i in range(b):
        ro, rl = ref_attention(q[i], k[i], v[i], scale, causal, window, softcap)
        check_out(out[i], ro, np.abs(v).max(), seed)
        check_lse(lse[i], rl, smax_of(q, k, scale, softcap), seed)


def test_defaults_and_scale():
    """softmax_scale None is 1/sqrt(D); causal=False, window (-1, -1), softcap 0 are flash-attn's defaults;
    a given scale is used as is; return_attn_probs=False returns out alone."""
    seed, rng = new_rng("test_defaults_and_scale")
    q, k, v = randn(rng, (1, 20, 2, 64)), randn(rng, (1, 30, 2, 64)), randn(rng, (1, 30, 2, 64))
    out = fa.flash_attn_func(q, k, v)
    assert isinstance(out, np.ndarray)
    explicit = fa.flash_attn_func(q, k, v, 0.0, 64 ** -0.5, False, (-1, -1), 0.0, None, False, False)
    assert np.array_equal(out, explicit), seed
    out2 = fa.flash_attn_func(q, k, v, softmax_scale=0.3)
    ro, _ = ref_attention(q[0], k[0], v[0], 0.3)
    check_out(out2[0], ro, np.abs(v).max(), seed)
    # flash-attn: a negative softcap is off, a negative window side unbounded.
    assert np.array_equal(fa.flash_attn_func(q, k, v, softcap=-1.0), out), seed
    assert np.array_equal(fa.flash_attn_func(q, k, v, window_size=(-5, -2)), out), seed


def test_empty_arrays():
    """Empty batches, queries or keys, as numpy makes them with astype (every stride 0): the forward and
    backward return arrays of the right shapes, no error; rows that see no key come out 0 with lse -inf,
    and every gradient is 0 (no key: out is constant in q; no query: nothing depends on k, v)."""
    seed, rng = new_rng("test_empty_arrays")
    for qs, ks in [((0, 4, 2, 64), (0, 4, 2, 64)), ((1, 0, 2, 64), (1, 5, 2, 64)), ((1, 3, 2, 64), (1, 0, 2, 64))]:
        q = rng.standard_normal(qs).astype(F16)
        k, v = rng.standard_normal(ks).astype(F16), rng.standard_normal(ks).astype(F16)
        out, lse, _ = fa.flash_attn_func(q, k, v, return_attn_probs=True)
        assert out.shape == qs and lse.shape == (qs[0], qs[2], qs[1]), (seed, qs, ks)
        if ks[1] == 0:
            assert np.all(out == 0) and np.all(np.isneginf(lse)), (seed, qs, ks)
        dq, dk, dv, _ = fa.bwd(rng.standard_normal(qs).astype(F16), q, k, v, out, lse)
        assert (dq.shape, dk.shape, dv.shape) == (qs, ks, ks), (seed, qs, ks)
        assert not dq.any() and not dk.any() and not dv.any(), (seed, qs, ks)
    # Packed: no rows at all, one empty sequence.
    q = rng.standard_normal((0, 2, 64)).astype(F16)
    cu = np.array([0, 0], np.int32)
    out, lse, _ = fa.flash_attn_varlen_func(q, q, q, cu, cu, 0, 0, return_attn_probs=True)
    assert out.shape == (0, 2, 64) and lse.shape == (2, 0), seed


def test_causal_bottom_right_and_empty_rows():
    """Sq > Sk, causal: query i sees keys j <= i + Sk - Sq, so the first Sq - Sk rows see nothing and
    come out exactly 0 with lse -inf (never NaN)."""
    seed, rng = new_rng("test_causal_bottom_right_and_empty_rows")
    sq, sk = 9, 4
    q, k, v = randn(rng, (1, sq, 2, 64)), randn(rng, (1, sk, 2, 64)), randn(rng, (1, sk, 2, 64))
    out, lse, _ = fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert np.all(out[0, : sq - sk] == 0), seed
    assert np.all(np.isneginf(lse[0, :, : sq - sk])), seed
    assert np.all(np.isfinite(lse[0, :, sq - sk:])), seed
    # Row sq - sk sees key 0 only: out = v[0], lse = its score.
    np.testing.assert_allclose(out[0, sq - sk], v[0, 0], rtol=0, atol=1e-3, err_msg=f"seed {seed}")
    ro, rl = ref_attention(q[0], k[0], v[0], 64 ** -0.5, causal=True)
    check_out(out[0], ro, np.abs(v).max(), seed)
    check_lse(lse[0], rl, smax_of(q, k, 64 ** -0.5, 0), seed)


@pytest.mark.parametrize("d", [8, 40, 80, 100, 160, 200])
def test_head_dim_padding(d):
    """Head dims without a kernel run zero-padded to the next one, with the scale of the real head dim."""
    seed, rng = new_rng("test_head_dim_padding")
    q, k, v = randn(rng, (2, 19, 2, d)), randn(rng, (2, 23, 1, d)), randn(rng, (2, 23, 1, d))
    out, lse, _ = fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert out.shape == q.shape, seed
    for i in range(2):
        ro, rl = ref_attention(q[i], k[i], v[i], d ** -0.5, causal=True)
        check_out(out[i], ro, np.abs(v).max(), seed)
        check_lse(lse[i], rl, smax_of(q, k, d ** -0.5, 0), seed)


def test_strided_and_foreign_layouts():
    """Views the library cannot take (negative strides, head dim not contiguous, big-endian, unaligned)
    are copied first; strided views it can take are read in place; every result equals the contiguous one."""
    seed, rng = new_rng("test_strided_and_foreign_layouts")
    q, k, v = randn(rng, (2, 33, 4, 64)), randn(rng, (2, 41, 2, 64)), randn(rng, (2, 41, 2, 64))
    want = fa.flash_attn_func(q, k, v, causal=True)
    # [B, H, S, D] storage viewed as [B, S, H, D] (what a transpose gives).
    qt = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    assert not qt.flags.c_contiguous
    assert np.array_equal(fa.flash_attn_func(qt, k, v, causal=True), want), seed
    # Negative strides.
    kr = np.ascontiguousarray(k[:, ::-1])[:, ::-1]
    assert np.array_equal(fa.flash_attn_func(q, kr, v, causal=True), want), seed
    # Head dim not contiguous.
    vf = np.asfortranarray(v)
    assert np.array_equal(fa.flash_attn_func(q, k, vf, causal=True), want), seed
    # Big-endian float16.
    qb = q.astype(q.dtype.newbyteorder(">"))
    assert np.array_equal(fa.flash_attn_func(qb, k, v, causal=True), want), seed
    # Unaligned: float16 elements at an odd byte offset.
    raw = np.zeros(q.nbytes + 1, np.uint8)
    qu = raw[1:].view(F16).reshape(q.shape)
    qu[...] = q
    assert qu.ctypes.data % 2 == 1
    assert np.array_equal(fa.flash_attn_func(qu, k, v, causal=True), want), seed
    # Broadcast kv heads (stride 0) read in place.
    k1, v1 = k[:, :, :1], v[:, :, :1]
    kb, vb = np.broadcast_to(k1, k.shape), np.broadcast_to(v1, v.shape)
    assert np.array_equal(fa.flash_attn_func(q, kb, vb), fa.flash_attn_func(q, k1, v1)), seed


# --- Packed inputs -----------------------------------------------------------------------------------

def test_qkvpacked_and_kvpacked_equal_separate():
    seed, rng = new_rng("test_qkvpacked_and_kvpacked_equal_separate")
    qkv = randn(rng, (2, 45, 3, 4, 64))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    want, want_lse, _ = fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    out, lse, _ = fa.flash_attn_qkvpacked_func(qkv, causal=True, return_attn_probs=True)
    assert np.array_equal(out, want) and np.array_equal(lse, want_lse), seed
    q2, kv = randn(rng, (2, 17, 4, 64)), randn(rng, (2, 45, 2, 2, 64))
    want = fa.flash_attn_func(q2, kv[:, :, 0], kv[:, :, 1], window_size=(8, 8))
    assert np.array_equal(fa.flash_attn_kvpacked_func(q2, kv, window_size=(8, 8)), want), seed
    # Padded head dim through the packed path.
    qkv40 = randn(rng, (1, 12, 3, 2, 40))
    want = fa.flash_attn_func(qkv40[:, :, 0], qkv40[:, :, 1], qkv40[:, :, 2], causal=True)
    assert np.array_equal(fa.flash_attn_qkvpacked_func(qkv40, causal=True), want), seed


def random_lengths(rng, b, max_len, allow_zero=True):
    lens = rng.integers(0 if allow_zero else 1, max_len + 1, size=b)
    return lens


def cu(lens):
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


@pytest.mark.parametrize("causal,window,softcap", MASKS)
def test_varlen_forward(causal, window, softcap):
    """Each packed sequence against the reference of that sequence alone (GQA, a zero-length sequence
    among them)."""
    seed, rng = new_rng("test_varlen_forward")
    b, hq, hk, d = 4, 4, 2, 64
    lq = random_lengths(rng, b, 70)
    lk = random_lengths(rng, b, 90)
    lq[1] = 0
    cq, ck = cu(lq), cu(lk)
    q, k, v = randn(rng, (cq[-1], hq, d)), randn(rng, (ck[-1], hk, d)), randn(rng, (ck[-1], hk, d))
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cq, ck, int(lq.max()), int(lk.max()), causal=causal,
                                            window_size=window, softcap=softcap, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (hq, cq[-1]), seed
    scale = d ** -0.5
    for i in range(b):
        qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        ro, rl = ref_attention(q[qs], k[ks], v[ks], scale, causal, window, softcap)
        check_out(out[qs], ro, np.abs(v).max(), seed, what=f"out of sequence {i}")
        check_lse(lse[:, qs], rl, smax_of(q, k, scale, softcap), seed, what=f"lse of sequence {i}")


def test_varlen_equals_per_sequence_calls():
    """Packed-versus-separate: varlen over a packed batch gives each sequence's flash_attn_func result."""
    seed, rng = new_rng("test_varlen_equals_per_sequence_calls")
    b, h, d = 3, 2, 128
    lq, lk = random_lengths(rng, b, 50, False), random_lengths(rng, b, 80, False)
    cq, ck = cu(lq), cu(lk)
    q, k, v = randn(rng, (cq[-1], h, d)), randn(rng, (ck[-1], h, d)), randn(rng, (ck[-1], h, d))
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cq, ck, int(lq.max()), int(lk.max()), causal=True,
                                            return_attn_probs=True)
    for i in range(b):
        qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        o1, l1, _ = fa.flash_attn_func(q[None, qs], k[None, ks], v[None, ks], causal=True, return_attn_probs=True)
        np.testing.assert_allclose(out[qs].astype(np.float64), o1[0].astype(np.float64), rtol=2 * U16,
                                   atol=2.0 ** -12, err_msg=f"seed {seed}: sequence {i}")
        np.testing.assert_allclose(lse[:, qs], l1[0], rtol=1e-6, atol=1e-6, err_msg=f"seed {seed}: sequence {i}")


def test_varlen_packed_variants():
    seed, rng = new_rng("test_varlen_packed_variants")
    lens = random_lengths(rng, 3, 40, False)
    c = cu(lens)
    qkv = randn(rng, (c[-1], 3, 2, 64))
    want = fa.flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], c, c, int(lens.max()), int(lens.max()),
                                     causal=True)
    got = fa.flash_attn_varlen_qkvpacked_func(qkv, c, int(lens.max()), causal=True)
    assert np.array_equal(got, want), seed
    q, kv = randn(rng, (c[-1], 4, 64)), randn(rng, (c[-1], 2, 2, 64))
    want = fa.flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], c, c, int(lens.max()), int(lens.max()), softcap=3.0)
    got = fa.flash_attn_varlen_kvpacked_func(q, kv, c, c, int(lens.max()), int(lens.max()), softcap=3.0)
    assert np.array_equal(got, want), seed


def test_seqused():
    """seqused_q / seqused_k: only the first seqused[b] rows of slot b are real; the other query rows,
    and rows past cu_seqlens_q[B], come out 0 with lse -inf."""
    seed, rng = new_rng("test_seqused")
    b, h, d = 3, 2, 64
    slot_q, slot_k = np.array([20, 16, 24]), np.array([30, 12, 40])
    used_q = np.array([13, 0, 24], np.int32)
    used_k = np.array([30, 5, 17], np.int32)
    cq, ck = cu(slot_q), cu(slot_k)
    extra = 5  # rows of q past cu_seqlens_q[B]
    q = randn(rng, (cq[-1] + extra, h, d))
    k, v = randn(rng, (ck[-1], h, d)), randn(rng, (ck[-1], h, d))
    for causal in (False, True):
        out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cq, ck, 24, 40, causal=causal, return_attn_probs=True,
                                                seqused_q=used_q, seqused_k=used_k)
        real = np.zeros(q.shape[0], bool)
        for i in range(b):
            qs = slice(cq[i], cq[i] + used_q[i])
            ks = slice(ck[i], ck[i] + used_k[i])
            real[qs] = True
            ro, rl = ref_attention(q[qs], k[ks], v[ks], d ** -0.5, causal)
            check_out(out[qs], ro, np.abs(v).max(), seed, what=f"out of sequence {i}")
            check_lse(lse[:, qs], rl, smax_of(q, k, d ** -0.5, 0), seed, what=f"lse of sequence {i}")
        assert np.all(out[~real] == 0), seed
        assert np.all(np.isneginf(lse[:, ~real])), seed


def test_bf16_with_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    seed, rng = new_rng("test_bf16_with_ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    q, k, v = randn(rng, (1, 30, 2, 64), bf16), randn(rng, (1, 40, 2, 64), bf16), randn(rng, (1, 40, 2, 64), bf16)
    out, lse, _ = fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert out.dtype == bf16, seed
    ro, rl = ref_attention(q[0].astype(np.float64), k[0].astype(np.float64), v[0].astype(np.float64), 0.125, True)
    check_out(out[0].astype(np.float64), ro, np.abs(v.astype(np.float64)).max(), seed, u=2.0 ** -8)
    check_lse(lse[0], rl, smax_of(q.astype(np.float64), k.astype(np.float64), 0.125, 0), seed)


# --- The hub's low-level functions -------------------------------------------------------------------

@pytest.mark.parametrize("causal,window,softcap", [MASKS[0], MASKS[1], MASKS[2], MASKS[6], MASKS[7]])
@pytest.mark.parametrize("d", [64, 80])
def test_hub_fwd_bwd(causal, window, softcap, d):
    """fwd writes into a given out and returns it with the lse; bwd's gradients (GQA: dk/dv summed over each
    kv head's query heads) against the reference; deterministic=True gives the same bits. Head dim 80 has
    no kernels of its own (padded around the calls)."""
    seed, rng = new_rng("test_hub_fwd_bwd")
    b, sq, sk, hq, hk = 2, 29, 37, 4, 2
    q, k, v = randn(rng, (b, sq, hq, d)), randn(rng, (b, sk, hk, d)), randn(rng, (b, sk, hk, d))
    dout = randn(rng, (b, sq, hq, d))
    out = np.full(q.shape, 7.0, F16)
    res = fa.fwd(q, k, v, out, None, 0.0, None, causal, window[0], window[1], softcap, False, None)
    assert isinstance(res, list) and len(res) == 4 and res[0] is out, seed
    lse = res[1]
    assert lse.shape == (b, hq, sq) and lse.dtype == np.float32, seed
    dq, dk, dv, extra = fa.bwd(dout, q, k, v, out, lse, is_causal=causal, window_size_left=window[0],
                               window_size_right=window[1], softcap=softcap)
    assert extra is None
    scale = d ** -0.5
    for i in range(b):
        ro, _ = ref_attention(q[i], k[i], v[i], scale, causal, window, softcap)
        check_out(out[i], ro, np.abs(v).max(), seed)
        rq, rk, rv = ref_attention_bwd(q[i], k[i], v[i], out[i], dout[i], scale, causal, window, softcap)
        check_grad(dq[i], rq, seed, "dq")
        check_grad(dk[i], rk, seed, "dk")
        check_grad(dv[i], rv, seed, "dv")
    # Into given buffers; deterministic is the CPU path's only mode anyway.
    gq, gk, gv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    res = fa.bwd(dout, q, k, v, out, lse, gq, gk, gv, None, 0.0, None, causal, window[0], window[1], softcap,
                 True)
    assert res[0] is gq and res[1] is gk and res[2] is gv, seed
    assert np.array_equal(gq, dq) and np.array_equal(gk, dk) and np.array_equal(gv, dv), seed


@pytest.mark.parametrize("d", [64, 40])
def test_hub_given_outputs_are_checked(d):
    """The hub ops' given outputs get the same errors, naming them, at a head dim that runs padded (40: the
    package writes them itself) as at one with kernels (64): wrong type, dtype or shape, read-only, aliased;
    and an out / dout of another head dim is named, not q."""
    seed, rng = new_rng("test_hub_given_outputs_are_checked")
    q, k, v = randn(rng, (1, 5, 2, d)), randn(rng, (1, 6, 2, d)), randn(rng, (1, 6, 2, d))
    for bad, err, msg in [([0], TypeError, "out: expected a numpy.ndarray"),
                          (np.empty(q.shape, np.int8), TypeError, "out: dtype int8"),
                          (np.empty(q.shape, np.float32), TypeError, "out: dtype float32"),
                          (np.empty((1, 5, 2, d + 8), F16), ValueError, "out: shape"),
                          (np.empty_like(q), ValueError, "out: is read-only")]:
        if msg.endswith("read-only"):
            bad.flags.writeable = False
        with pytest.raises(err, match=msg):
            fa.fwd(q, k, v, bad)
    with pytest.raises(ValueError, match="out: overlaps q"):
        fa.fwd(q, k, v, q)
    out, lse, *_ = fa.fwd(q, k, v)
    dout = randn(rng, q.shape)
    both = np.empty_like(k)
    with pytest.raises(ValueError, match="dk: overlaps dv"):
        fa.bwd(dout, q, k, v, out, lse, None, both, both)
    with pytest.raises(TypeError, match="dk: expected a numpy.ndarray"):
        fa.bwd(dout, q, k, v, out, lse, None, "x")
    dq, dk, dv, _ = fa.bwd(dout, q, k, v, out, lse)
    gk = np.full_like(k, 9.0)
    res = fa.bwd(dout, q, k, v, out, lse, None, gk)
    assert res[1] is gk and np.array_equal(gk, dk) and np.array_equal(res[0], dq), seed
    if d == 40:
        wide = randn(rng, (1, 5, 2, 64))
        for name, args in [("out", (dout, q, k, v, wide, lse)), ("dout", (wide, q, k, v, out, lse))]:
            with pytest.raises(ValueError, match=f"{name}: head dim 64 must equal q's head dim 40"):
                fa.bwd(*args)


def test_outputs_sharing_memory_are_refused():
    """An out whose elements share memory (a writable stride-0 view) is refused, naming it, rather than
    written in an order that decides the result."""
    seed, rng = new_rng("test_outputs_sharing_memory_are_refused")
    q = randn(rng, (2, 6, 2, 64))
    base = np.empty((1, 6, 2, 64), F16)
    shared = np.lib.stride_tricks.as_strided(base, shape=q.shape, strides=(0,) + base.strides[1:], writeable=True)
    with pytest.raises(ValueError, match="out: has elements that share memory"):
        fa.fwd(q, q, q, shared)


@pytest.mark.parametrize("d", [64, 40])
def test_kvcache_aliased_caches_are_refused(d):
    """Appending into one array given as both caches is refused at every head dim (at 40 the package
    appends into its padded copies and writes them back)."""
    seed, rng = new_rng("test_kvcache_aliased_caches_are_refused")
    cache = randn(rng, (1, 8, 1, d))
    q, kn, vn = randn(rng, (1, 1, 2, d)), randn(rng, (1, 1, 1, d)), randn(rng, (1, 1, 1, d))
    with pytest.raises(ValueError, match="k_cache: overlaps v_cache"):
        fa.flash_attn_with_kvcache(q, cache, cache, kn, vn, cache_seqlens=3)
    assert np.isfinite(fa.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=3)).all(), seed


def test_kvcache_errors_name_k_and_v():
    """flash_attn_with_kvcache's new keys and values are its arguments k and v: errors about them say so (the
    library's own names for them are k_new and v_new)."""
    seed, rng = new_rng("test_kvcache_errors_name_k_and_v")
    q, kc, vc = randn(rng, (1, 1, 2, 64)), randn(rng, (1, 8, 2, 64)), randn(rng, (1, 8, 2, 64))
    with pytest.raises(ValueError, match=r"^k: shape \[1, 1, 3, 64\]"):
        fa.flash_attn_with_kvcache(q, kc, vc, randn(rng, (1, 1, 3, 64)), randn(rng, (1, 1, 2, 64)), cache_seqlens=2)
    with pytest.raises(ValueError, match=r"^v: is missing: k and v are appended together"):
        fa.flash_attn_with_kvcache(q, kc, vc, randn(rng, (1, 1, 2, 64)), cache_seqlens=2)
    with pytest.raises(TypeError, match=r"^v: dtype"):
        fa.flash_attn_with_kvcache(q, kc, vc, randn(rng, (1, 1, 2, 64)), randn(rng, (1, 1, 2, 64)).astype(np.float32),
                                   cache_seqlens=2)


def test_tiny_softcap_is_finite():
    """A softcap so small that scale / softcap overflows float32: every score is within softcap of 0, so the
    attention is the mean of v (lse log Sk), forward and backward finite, zero q rows too (0 * inf was
    NaN)."""
    seed, rng = new_rng("test_tiny_softcap_is_finite")
    q, k, v = randn(rng, (2, 5, 2, 32)), randn(rng, (2, 7, 2, 32)), randn(rng, (2, 7, 2, 32))
    q[0, 1] = 0
    for c in (1e-40, 1e-30):
        out, lse, _ = fa.flash_attn_func(q, k, v, softcap=c, return_attn_probs=True)
        mean = v.astype(np.float64).mean(axis=1, keepdims=True)
        assert np.isfinite(out).all() and np.isfinite(lse).all(), (seed, c)
        assert np.abs(out - mean).max() < 1e-2, (seed, c)
        assert np.abs(lse - np.log(7)).max() < 1e-5, (seed, c)
        dq, dk, dv = fa.bwd(np.ones_like(out), q, k, v, out, lse, softcap=c)[:3]
        for g in (dq, dk, dv):
            assert np.isfinite(g).all(), (seed, c)


def test_numpy_float_scalars_as_options():
    """numpy scalars (float32 too) are floats for softmax_scale, softcap and dropout_p, as Python floats
    (values exact in float32, so both calls must give the same bits)."""
    seed, rng = new_rng("test_numpy_float_scalars_as_options")
    q, k, v = randn(rng, (1, 7, 2, 64)), randn(rng, (1, 9, 2, 64)), randn(rng, (1, 9, 2, 64))
    state = (int(rng.integers(2**63)), 3)
    for kw in [dict(softmax_scale=0.125, softcap=3.0), dict(dropout_p=0.25, softcap=0.5)]:
        want = fa.flash_attn_func(q, k, v, **kw, rng_state=state)
        got = fa.flash_attn_func(q, k, v, **{n: np.float32(x) for n, x in kw.items()}, rng_state=state)
        assert np.array_equal(got, want), (seed, kw)


def test_options_past_a_float_are_value_errors():
    """softmax_scale, softcap and dropout_p that a float cannot hold (ints and Fractions past 1.8e308: their
    float() raises OverflowError) are ValueErrors naming the argument, at every entry point; values a float
    holds still run (and give the same bits as the equal float)."""
    from fractions import Fraction
    seed, rng = new_rng("test_options_past_a_float_are_value_errors")
    b, sq, sk, hq, hk, d = 2, int(rng.integers(1, 9)), int(rng.integers(1, 9)), 4, 2, int(rng.choice([32, 40, 64]))
    q, k, v = randn(rng, (b, sq, hq, d)), randn(rng, (b, sk, hk, d)), randn(rng, (b, sk, hk, d))
    out, lse, _ = fa.flash_attn_func(q, k, v, return_attn_probs=True)
    cu_q = np.arange(0, (b + 1) * sq, sq, dtype=np.int32)
    cu_k = np.arange(0, (b + 1) * sk, sk, dtype=np.int32)
    packed = lambda t: t.reshape(-1, *t.shape[2:])  # noqa: E731
    calls = {
        "flash_attn_func": lambda **kw: fa.flash_attn_func(q, k, v, **kw),
        "flash_attn_varlen_func": lambda **kw: fa.flash_attn_varlen_func(packed(q), packed(k), packed(v), cu_q, cu_k,
                                                                         sq, sk, **kw),
        "fwd": lambda softmax_scale=None, softcap=0.0, dropout_p=0.0: fa.fwd(
            q, k, v, softmax_scale=softmax_scale, softcap=softcap, p_dropout=dropout_p),
        "bwd": lambda softmax_scale=None, softcap=0.0, dropout_p=0.0: fa.bwd(
            out, q, k, v, out, lse, softmax_scale=softmax_scale, softcap=softcap, p_dropout=dropout_p,
            rng_state=(1, 0)),
        "flash_attn_with_kvcache": lambda softmax_scale=None, softcap=0.0: fa.flash_attn_with_kvcache(
            q, k, v, cache_seqlens=sk, softmax_scale=softmax_scale, softcap=softcap),
    }
    huge = [10**400, -10**400, Fraction(10**400, 3)]
    for name, call in calls.items():
        options = ["softmax_scale", "softcap"] + (["dropout_p"] if name != "flash_attn_with_kvcache" else [])
        for opt in options:
            for x in huge:
                with pytest.raises(ValueError) as info:
                    call(**{opt: x})
                assert opt in str(info.value), (seed, name, opt, str(info.value))
        # Ints and Fractions a float holds run as that float.
        want = call(softmax_scale=0.5, softcap=4.0)
        got = call(softmax_scale=Fraction(1, 2), softcap=4)
        listed = lambda r: r if isinstance(r, (list, tuple)) else [r]  # noqa: E731
        for w, g in zip(listed(want), listed(got)):
            if w is not None:
                assert np.array_equal(w, g), (seed, name)


def test_varlen_without_cu_seqlens_is_a_type_error_naming_it():
    """A varlen call (no block_table) with cu_seqlens_q or cu_seqlens_k None: a TypeError naming that argument
    and asking for an array, as for any other wrong type (the native layer's "(address, dtype, shape,
    strides)" tuple is nothing a caller passes). With both given the same call runs."""
    seed, rng = new_rng("test_varlen_without_cu_seqlens_is_a_type_error_naming_it")
    lens = rng.integers(0, 9, int(rng.integers(1, 4)))
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    t, hk, d = int(cu[-1]), int(rng.integers(1, 3)), int(rng.choice([32, 40, 64]))
    q, k, v = randn(rng, (t, 2 * hk, d)), randn(rng, (t, hk, d)), randn(rng, (t, hk, d))
    lse = np.zeros((2 * hk, t), np.float32)
    calls = {
        "flash_attn_varlen_func": lambda cq, ck: fa.flash_attn_varlen_func(q, k, v, cq, ck, None, None),
        "flash_attn_varlen_kvpacked_func": lambda cq, ck: fa.flash_attn_varlen_kvpacked_func(
            q, np.stack([k, v], axis=1), cq, ck, None, None),
        "varlen_fwd": lambda cq, ck: fa.varlen_fwd(q, k, v, cq, ck),
        "varlen_bwd": lambda cq, ck: fa.varlen_bwd(q, q, k, v, q, lse, cq, ck),
    }
    for name, call in calls.items():
        call(cu, cu)
        for missing, args in (("cu_seqlens_q", (None, cu)), ("cu_seqlens_k", (cu, None))):
            with pytest.raises(TypeError) as info:
                call(*args)
            msg = str(info.value)
            assert msg.startswith(missing + ":") and "numpy.ndarray" in msg, (seed, name, msg)


def test_kvcache_int_seqlens_over_a_huge_batch_is_a_value_error():
    """An int cache_seqlens becomes one entry per batch entry of q: a (zero-size) q whose batch is past the
    i32 range is a ValueError naming q, as the library's checks name it, not numpy's MemoryError from
    allocating that vector."""
    seed, rng = new_rng("test_kvcache_int_seqlens_over_a_huge_batch_is_a_value_error")
    hk, d = int(rng.integers(1, 3)), int(rng.choice([32, 40, 64]))
    batch = int(rng.integers(2**31, 2**44))
    q = np.empty((batch, 0, 2 * hk, d), F16)
    kc, vc = np.empty((batch, 0, hk, d), F16), np.empty((batch, 0, hk, d), F16)
    for seqlens in (0, None):
        with pytest.raises(ValueError) as info:
            fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens)
        assert str(info.value).startswith("q:") and "batch" in str(info.value), (seed, batch, str(info.value))


@pytest.mark.parametrize("d", [32, 48])
def test_hub_varlen_fwd_bwd(d):
    seed, rng = new_rng("test_hub_varlen_fwd_bwd")
    h, hk = 4, 1
    lq, lk = np.array([11, 0, 25]), np.array([19, 7, 25])
    cq, ck = cu(lq), cu(lk)
    q, k, v = randn(rng, (cq[-1], h, d)), randn(rng, (ck[-1], hk, d)), randn(rng, (ck[-1], hk, d))
    dout = randn(rng, q.shape)
    out, lse, *_ = fa.varlen_fwd(q, k, v, cq, ck, max_seqlen_q=25, max_seqlen_k=25, is_causal=True)
    assert lse.shape == (h, cq[-1]), seed
    dq, dk, dv, _ = fa.varlen_bwd(dout, q, k, v, out, lse, cq, ck, max_seqlen_q=25, max_seqlen_k=25,
                                  is_causal=True)
    for i in range(3):
        qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        ro, rl = ref_attention(q[qs], k[ks], v[ks], d ** -0.5, True)
        check_out(out[qs], ro, np.abs(v).max(), seed)
        rq, rk, rv = ref_attention_bwd(q[qs], k[ks], v[ks], out[qs], dout[qs], d ** -0.5, True)
        check_grad(dq[qs], rq, seed, f"dq of sequence {i}")
        check_grad(dk[ks], rk, seed, f"dk of sequence {i}")
        check_grad(dv[ks], rv, seed, f"dv of sequence {i}")
    # seqused_k through the hub: keys past it are not seen.
    used_k = np.array([5, 7, 1], np.int32)
    out2, lse2, *_ = fa.varlen_fwd(q, k, v, cq, ck, seqused_k=used_k, max_seqlen_q=25, max_seqlen_k=25)
    for i in range(3):
        qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i] + used_k[i])
        ro, _ = ref_attention(q[qs], k[ks], v[ks], d ** -0.5)
        check_out(out2[qs], ro, np.abs(v).max(), seed)


# --- Paged K/V ---------------------------------------------------------------------------------------

def to_pages(rng, arrays, lens, page, spare=3):
    """Packed keys / values `[Tk, hk, d]` (each of `arrays`) of sequences of `lens` scattered into the same
    shuffled pages, noise elsewhere: ([pages [num_blocks, page, hk, d] of each], block_table int32
    [B, max_blocks], unused entries pointing anywhere inside the cache)."""
    need = [(int(n) + page - 1) // page for n in lens]
    max_blocks = max(max(need), 1)
    num_blocks = sum(need) + spare
    pages = [randn(rng, (num_blocks, page) + a.shape[1:]) for a in arrays]
    order = rng.permutation(num_blocks)
    table = np.zeros((len(lens), max_blocks), np.int32)
    start, used = 0, 0
    for b, n in enumerate(lens):
        for i in range(need[b]):
            blk = order[used]
            used += 1
            table[b, i] = blk
            rows = min(page, int(n) - i * page)
            for p, a in zip(pages, arrays):
                p[blk, :rows] = a[start + i * page: start + i * page + rows]
        table[b, need[b]:] = rng.integers(0, num_blocks, size=max_blocks - need[b])
        start += int(n)
    return pages, table


@pytest.mark.parametrize("page", [16, 3, 1, 256])
@pytest.mark.parametrize("causal,window,softcap", [MASKS[0], MASKS[1], MASKS[2], MASKS[7]])
def test_paged_equals_contiguous(page, causal, window, softcap):
    """flash_attn_varlen_func with block_table: bitwise the contiguous varlen result over the same keys
    (the CPU path), key counts from cu_seqlens_k, from cu_seqlens_k cut by seqused_k, or from seqused_k
    alone (cu_seqlens_k None)."""
    seed, rng = new_rng("test_paged_equals_contiguous")
    b, hq, hk, d = 4, 4, 2, 64
    lq, lk = random_lengths(rng, b, 40), random_lengths(rng, b, 70)
    lk[0] = max(lk[0], 1)
    cq, ck = cu(lq), cu(lk)
    q = randn(rng, (cq[-1], hq, d))
    k, v = randn(rng, (ck[-1], hk, d)), randn(rng, (ck[-1], hk, d))
    (kp, vp), table = to_pages(rng, [k, v], lk, page)
    mq, mk = int(lq.max()), int(lk.max())
    opts = dict(causal=causal, window_size=window, softcap=softcap, return_attn_probs=True)
    want, want_lse, _ = fa.flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, **opts)
    got, got_lse, _ = fa.flash_attn_varlen_func(q, kp, vp, cq, ck, mq, mk, block_table=table, **opts)
    assert np.array_equal(got, want) and np.array_equal(got_lse, want_lse), seed
    # seqused_k alone (flash-attn 3), and cutting cu_seqlens_k.
    used = lk.astype(np.int32)
    got2 = fa.flash_attn_varlen_func(q, kp, vp, cq, None, mq, mk, block_table=table, seqused_k=used, **opts)
    assert np.array_equal(got2[0], want) and np.array_equal(got2[1], want_lse), seed
    cut = (lk // 2).astype(np.int32)
    want3 = fa.flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, seqused_k=cut, **opts)
    got3 = fa.flash_attn_varlen_func(q, kp, vp, cq, ck, mq, mk, block_table=table, seqused_k=cut, **opts)
    assert np.array_equal(got3[0], want3[0]) and np.array_equal(got3[1], want3[1]), seed
    # The hub's varlen_fwd with block_table, into a given out.
    out = np.empty_like(q)
    res = fa.varlen_fwd(q, kp, vp, cq, ck, out=out, block_table=table, max_seqlen_q=mq, max_seqlen_k=mk,
                        is_causal=causal, window_size_left=window[0], window_size_right=window[1], softcap=softcap)
    assert res[0] is out and np.array_equal(out, want) and np.array_equal(res[1], want_lse), seed


def test_paged_padded_head_dim_and_alibi():
    """A head dim without a kernel (zero-padded pages) and ALiBi through the paged path equal the
    contiguous ones."""
    seed, rng = new_rng("test_paged_padded_head_dim_and_alibi")
    lq, lk = np.array([5, 9]), np.array([20, 13])
    cq, ck = cu(lq), cu(lk)
    d, page = 40, 8
    q, k = randn(rng, (cq[-1], 2, d)), randn(rng, (ck[-1], 1, d))
    (kp,), table = to_pages(rng, [k], lk, page)
    slopes = np.array([0.25, 0.5], np.float32)
    want = fa.flash_attn_varlen_func(q, k, k, cq, ck, 9, 20, causal=True, alibi_slopes=slopes)
    got = fa.flash_attn_varlen_func(q, kp, kp, cq, ck, 9, 20, causal=True, alibi_slopes=slopes, block_table=table)
    assert got.shape == q.shape and np.array_equal(got, want), seed


# --- max_seqlen None (not known) ----------------------------------------------------------------------

def skewed_varlen(rng, hq=4, hk=2, d=64):
    """A packed batch whose lengths are far from their mean (one long sequence, an empty one, short ones;
    random each run): (lq, lk, cu_seqlens_q, cu_seqlens_k, q, k, v)."""
    lq, lk = random_lengths(rng, 5, 12), random_lengths(rng, 5, 12)
    lq[0], lk[0] = rng.integers(100, 160), rng.integers(120, 200)
    lq[3] = lk[3] = 0
    lq[4], lk[4] = rng.integers(40, 80), rng.integers(40, 80)
    cq, ck = cu(lq), cu(lk)
    q, k, v = randn(rng, (cq[-1], hq, d)), randn(rng, (ck[-1], hk, d)), randn(rng, (ck[-1], hk, d))
    return lq, lk, cq, ck, q, k, v


@pytest.mark.parametrize("causal,window,softcap", [MASKS[0], MASKS[1], MASKS[2], MASKS[7]])
def test_varlen_max_seqlen_none(causal, window, softcap):
    """max_seqlen_q / max_seqlen_k None: bitwise the call with the exact maxima (out and lse), through
    flash_attn_varlen_func (also with seqused_k), the kvpacked and qkvpacked variants, paged K/V and the
    hub's varlen_fwd (whose defaults are None)."""
    seed, rng = new_rng("test_varlen_max_seqlen_none")
    lq, lk, cq, ck, q, k, v = skewed_varlen(rng)
    mq, mk = int(lq.max()), int(lk.max())
    opts = dict(causal=causal, window_size=window, softcap=softcap, return_attn_probs=True)
    want, want_lse, _ = fa.flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, **opts)
    for mq2, mk2 in ((None, None), (None, mk), (mq, None)):
        got, got_lse, s = fa.flash_attn_varlen_func(q, k, v, cq, ck, mq2, mk2, **opts)
        assert s is None, seed  # return_attn_probs without dropout: no S_dmask, so no max is needed
        assert np.array_equal(got, want) and np.array_equal(got_lse, want_lse), f"seed {seed}: {mq2}, {mk2}"
    used = (lk // 2).astype(np.int32)
    want_u = fa.flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, seqused_k=used, **opts)
    got_u = fa.flash_attn_varlen_func(q, k, v, cq, ck, None, None, seqused_k=used, **opts)
    assert np.array_equal(got_u[0], want_u[0]) and np.array_equal(got_u[1], want_u[1]), seed
    # kvpacked; qkvpacked (one cu_seqlens for q and k).
    kv = np.stack([k, v], axis=1)
    want2 = fa.flash_attn_varlen_kvpacked_func(q, kv, cq, ck, mq, mk, **opts)
    got2 = fa.flash_attn_varlen_kvpacked_func(q, kv, cq, ck, None, None, **opts)
    assert np.array_equal(got2[0], want2[0]) and np.array_equal(got2[1], want2[1]), seed
    qkv = randn(rng, (cq[-1], 3, 2, 64))
    want3 = fa.flash_attn_varlen_qkvpacked_func(qkv, cq, mq, **opts)
    got3 = fa.flash_attn_varlen_qkvpacked_func(qkv, cq, None, **opts)
    assert np.array_equal(got3[0], want3[0]) and np.array_equal(got3[1], want3[1]), seed
    # Paged K/V: key counts from cu_seqlens_k, and from seqused_k alone.
    (kp, vp), table = to_pages(rng, [k, v], lk, 16)
    got4 = fa.flash_attn_varlen_func(q, kp, vp, cq, ck, None, None, block_table=table, **opts)
    assert np.array_equal(got4[0], want) and np.array_equal(got4[1], want_lse), seed
    got5 = fa.flash_attn_varlen_func(q, kp, vp, cq, None, None, None, block_table=table,
                                     seqused_k=lk.astype(np.int32), **opts)
    assert np.array_equal(got5[0], want) and np.array_equal(got5[1], want_lse), seed
    # The hub's varlen_fwd: max_seqlen_q / max_seqlen_k default to None, contiguous and paged.
    hub = dict(is_causal=causal, window_size_left=window[0], window_size_right=window[1], softcap=softcap)
    res = fa.varlen_fwd(q, k, v, cq, ck, **hub)
    assert np.array_equal(res[0], want) and np.array_equal(res[1], want_lse), seed
    res = fa.varlen_fwd(q, kp, vp, cq, ck, block_table=table, **hub)
    assert np.array_equal(res[0], want) and np.array_equal(res[1], want_lse), seed


def test_varlen_max_seqlen_none_backward_and_extras():
    """With max_seqlen None the hub's varlen_fwd and varlen_bwd are bitwise the calls with the maxima, plain,
    with ALiBi and with dropout (the same seed: the mask does not depend on the maxima)."""
    seed, rng = new_rng("test_varlen_max_seqlen_none_backward_and_extras")
    lq, lk, cq, ck, q, k, v = skewed_varlen(rng, hq=4, hk=1, d=32)
    maxima = dict(max_seqlen_q=int(lq.max()), max_seqlen_k=int(lk.max()))
    dout = randn(rng, q.shape)
    slopes = rng.uniform(0.01, 0.5, 4).astype(np.float32)
    for extra in (dict(), dict(alibi_slopes=slopes), dict(p_dropout=0.2)):
        what = f"seed {seed}: {list(extra)}"
        draw = int(rng.integers(2**62))
        out, lse, _, rs = fa.varlen_fwd(q, k, v, cq, ck, is_causal=True, gen=np.random.default_rng(draw),
                                        **maxima, **extra)
        got = fa.varlen_fwd(q, k, v, cq, ck, is_causal=True, gen=np.random.default_rng(draw), **extra)
        assert np.array_equal(got[0], out) and np.array_equal(got[1], lse), what
        assert (rs is None) == (got[3] is None) and (rs is None or np.array_equal(got[3], rs)), what
        want_g = fa.varlen_bwd(dout, q, k, v, out, lse, cq, ck, is_causal=True, rng_state=rs, **maxima, **extra)
        got_g = fa.varlen_bwd(dout, q, k, v, out, lse, cq, ck, is_causal=True, rng_state=rs, **extra)
        for name, a, b in zip(("dq", "dk", "dv"), got_g, want_g):
            assert np.array_equal(a, b), f"{what}: {name}"
    # Dropout through flash_attn_varlen_func with an explicit (seed, offset).
    rs = (int(rng.integers(2**63)), 0)
    want = fa.flash_attn_varlen_func(q, k, v, cq, ck, *maxima.values(), dropout_p=0.2, causal=True, rng_state=rs)
    got = fa.flash_attn_varlen_func(q, k, v, cq, ck, None, None, dropout_p=0.2, causal=True, rng_state=rs)
    assert np.array_equal(got, want), seed


def test_varlen_max_seqlen_none_with_s_dmask_raises():
    """S_dmask (return_attn_probs with dropout, the hub's return_softmax) is [B, H, max_seqlen_q,
    max_seqlen_k]: without both maxima every entry raises the library's ValueError naming max_seqlen_q,
    the native layer included; nothing else reads the lengths for it."""
    seed, rng = new_rng("test_varlen_max_seqlen_none_with_s_dmask_raises")
    lq, lk, cq, ck, q, k, v = skewed_varlen(rng)
    mq, mk = int(lq.max()), int(lk.max())
    (kp, vp), table = to_pages(rng, [k, v], lk, 16)
    kv, qkv = np.stack([k, v], axis=1), randn(rng, (cq[-1], 3, 2, 64))
    probs = dict(dropout_p=0.1, return_attn_probs=True, rng_state=(1, 2))
    calls = {
        "varlen_func (None, None)": lambda: fa.flash_attn_varlen_func(q, k, v, cq, ck, None, None, **probs),
        "varlen_func (max, None)": lambda: fa.flash_attn_varlen_func(q, k, v, cq, ck, mq, None, **probs),
        "varlen_func (None, max)": lambda: fa.flash_attn_varlen_func(q, k, v, cq, ck, None, mk, **probs),
        "varlen_func paged": lambda: fa.flash_attn_varlen_func(q, kp, vp, cq, ck, None, None, block_table=table,
                                                               **probs),
        "varlen_kvpacked_func": lambda: fa.flash_attn_varlen_kvpacked_func(q, kv, cq, ck, None, None, **probs),
        "varlen_qkvpacked_func": lambda: fa.flash_attn_varlen_qkvpacked_func(qkv, cq, None, **probs),
        "hub varlen_fwd": lambda: fa.varlen_fwd(q, k, v, cq, ck, return_softmax=True),
        "hub varlen_fwd paged": lambda: fa.varlen_fwd(q, kp, vp, cq, ck, block_table=table, max_seqlen_q=mq,
                                                      return_softmax=True),
    }
    for name, call in calls.items():
        try:
            call()
        except ValueError as e:
            # The qkv-packed function names its own argument (one max_seqlen for both sides).
            arg = "max_seqlen" if "qkvpacked" in name else "max_seqlen_q"
            assert f"{arg}: is required with s_dmask" in str(e), f"seed {seed}: {name}: {e}"
        else:
            pytest.fail(f"seed {seed}: {name}: no error")
    # The native layer: the library's own check (Error::Value, mapped to ValueError).
    out, lse = np.empty_like(q), np.empty((q.shape[1], q.shape[0]), np.float32)
    s_dmask = np.zeros((5, q.shape[1], mq, mk), np.float32)
    args = (_d(q), _d(k), _d(v), _d(out), _d(lse), _d(cq), _d(ck))
    tail = (None, None, None, False, -1, -1, 0.0, "cpu")
    with pytest.raises(ValueError, match="max_seqlen_q: is required with s_dmask"):
        _native.varlen_fwd(*args, None, mk, *tail, s_dmask=_d(s_dmask))
    _native.varlen_fwd(*args, mq, mk, *tail, s_dmask=_d(s_dmask))
    want = out.copy()
    _native.varlen_fwd(*args, None, None, *tail)
    assert np.array_equal(out, want), seed


@pytest.mark.parametrize("value,exc", [(-1, ValueError), (2**70, ValueError), (8.0, TypeError), (True, TypeError),
                                       ("8", TypeError)])
def test_native_max_seqlen_bad_values(value, exc):
    """The native layer takes None or an int in 0..=2^62 for each max, and names the argument otherwise."""
    q, k, v, c = _vq()
    out, lse = np.empty_like(q), np.empty((q.shape[1], q.shape[0]), np.float32)
    args = (_d(q), _d(k), _d(v), _d(out), _d(lse), _d(c), _d(c))
    tail = (None, None, None, False, -1, -1, 0.0, "cpu")
    for name, pair in (("max_seqlen_q", (value, None)), ("max_seqlen_k", (None, value))):
        with pytest.raises(exc, match=name):
            _native.varlen_fwd(*args, *pair, *tail)


# --- KV cache ----------------------------------------------------------------------------------------

def rotate(x, cos, sin, pos, interleaved):
    """flash-attn's rotary embedding of x [..., d] at positions `pos` (broadcast over x's leading dims but
    the last two), in float32 as the library computes it, rounded to x's dtype."""
    half = cos.shape[1]
    rd = 2 * half
    y = x.astype(np.float32)
    c = cos[pos].astype(np.float32)[..., None, :]
    s_ = sin[pos].astype(np.float32)[..., None, :]
    if interleaved:
        a, b = y[..., 0:rd:2].copy(), y[..., 1:rd:2].copy()
        y[..., 0:rd:2] = a * c - b * s_
        y[..., 1:rd:2] = a * s_ + b * c
    else:
        a, b = y[..., :half].copy(), y[..., half:rd].copy()
        y[..., :half] = a * c - b * s_
        y[..., half:rd] = a * s_ + b * c
    return y.astype(x.dtype)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("d", [64, 80])
def test_kvcache_append_rotary(interleaved, causal, paged, d):
    """flash_attn_with_kvcache: k and v appended in place (k rotated) at cache_seqlens, q rotated at its
    position, attention over each row's cache against a reference written here; cache_seqlens as an int
    and as an array; entries beyond the appended ones untouched; paged equals contiguous bitwise (the paged calls
    pass rotary_interleaved as a numpy bool, which is a flag as any other). Head dim
    80 has no kernels of its own (padded to 96 around the call, the caches copied back)."""
    seed, rng = new_rng("test_kvcache_append_rotary")
    b, s_cache, hq, hk, s_new, sq, rd = 3, 64, 4, 2, 3, 3, 32
    seqlens = np.array([0, 17, 50], np.int32)
    k_cache, v_cache = randn(rng, (b, s_cache, hk, d)), randn(rng, (b, s_cache, hk, d))
    q, k_new, v_new = randn(rng, (b, sq, hq, d)), randn(rng, (b, s_new, hk, d)), randn(rng, (b, s_new, hk, d))
    angle = np.arange(s_cache)[:, None] * (1.0 / 10000 ** (np.arange(rd // 2) / (rd // 2)))[None]
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    kc0, vc0 = k_cache.copy(), v_cache.copy()
    if paged:
        page = 16
        nb = b * s_cache // page
        perm = rng.permutation(nb).astype(np.int32)
        table = perm.reshape(b, s_cache // page)
        kc, vc = np.empty((nb, page, hk, d), F16), np.empty((nb, page, hk, d), F16)
        kc[table.reshape(-1)] = k_cache.reshape(nb, page, hk, d)
        vc[table.reshape(-1)] = v_cache.reshape(nb, page, hk, d)
    else:
        table, kc, vc = None, k_cache, v_cache
    out, lse = fa.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                                         cache_seqlens=seqlens, block_table=table, causal=causal,
                                         rotary_interleaved=np.bool_(interleaved) if paged else interleaved,
                                         return_softmax_lse=True)
    if paged:
        k_cache, v_cache = kc[table.reshape(-1)].reshape(kc0.shape), vc[table.reshape(-1)].reshape(vc0.shape)
    for i in range(b):
        n = int(seqlens[i])
        pos = n + np.arange(s_new)
        k_rot = rotate(k_new[i], cos, sin, pos, interleaved)
        assert np.array_equal(k_cache[i, n:n + s_new], k_rot), f"seed {seed}: k appended rotated in row {i}"
        assert np.array_equal(v_cache[i, n:n + s_new], v_new[i]), f"seed {seed}: v appended in row {i}"
        rest = np.ones(s_cache, bool)
        rest[n:n + s_new] = False
        assert np.array_equal(k_cache[i, rest], kc0[i, rest]), f"seed {seed}: k_cache untouched elsewhere"
        assert np.array_equal(v_cache[i, rest], vc0[i, rest]), f"seed {seed}: v_cache untouched elsewhere"
        qpos = n + np.arange(sq) if causal else np.full(sq, n)
        q_rot = rotate(q[i], cos, sin, qpos, interleaved)
        sk = n + s_new
        ro, rl = ref_attention(q_rot, k_cache[i, :sk], v_cache[i, :sk], d ** -0.5, causal)
        check_out(out[i], ro, np.abs(v_cache).max(), seed, what=f"out of row {i}")
        check_lse(lse[i], rl, smax_of(q_rot, k_cache, d ** -0.5, 0), seed, what=f"lse of row {i}")
    # cache_seqlens as an int: every row at the same position; without k / v nothing is written.
    kc1, vc1 = kc0.copy(), vc0.copy()
    o1 = fa.flash_attn_with_kvcache(q, kc1, vc1, cache_seqlens=20, causal=causal)
    assert np.array_equal(kc1, kc0) and np.array_equal(vc1, vc0), seed
    o2 = fa.flash_attn_with_kvcache(q, kc0, vc0, cache_seqlens=np.full(b, 20, np.int32), causal=causal)
    assert np.array_equal(o1, o2), seed
    for i in range(b):
        ro, _ = ref_attention(q[i], kc0[i, :20], vc0[i, :20], d ** -0.5, causal)
        check_out(o1[i], ro, np.abs(vc0).max(), seed)


def test_kvcache_batch_idx_leftpad_splits():
    """cache_batch_idx picks cache rows, cache_leftpad skips each row's first entries, num_splits gives
    the unsplit result up to rounding, and a cache the library cannot take in place (non-contiguous head
    dim) is still updated in the caller's array."""
    seed, rng = new_rng("test_kvcache_batch_idx_leftpad_splits")
    b, s_cache, h, d = 2, 96, 2, 64
    kc, vc = randn(rng, (4, s_cache, h, d)), randn(rng, (4, s_cache, h, d))
    q, kn, vn = randn(rng, (b, 1, h, d)), randn(rng, (b, 1, h, d)), randn(rng, (b, 1, h, d))
    idx = np.array([3, 1], np.int32)
    left = np.array([5, 0], np.int32)
    seqlens = np.array([40, 90], np.int32)
    kc0, vc0 = kc.copy(), vc.copy()
    out, lse = fa.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens, cache_batch_idx=idx,
                                         cache_leftpad=left, causal=True, num_splits=1, return_softmax_lse=True)
    for i in range(b):
        r, n = idx[i], seqlens[i]
        assert np.array_equal(kc[r, n], kn[i, 0]) and np.array_equal(vc[r, n], vn[i, 0]), seed
        ro, rl = ref_attention(q[i], kc[r, left[i]:n + 1], vc[r, left[i]:n + 1], d ** -0.5, True)
        check_out(out[i], ro, np.abs(vc).max(), seed)
        check_lse(lse[i], rl, smax_of(q, kc, d ** -0.5, 0), seed)
    untouched = [0, 2]
    assert np.array_equal(kc[untouched], kc0[untouched]), seed
    for splits in (0, 3, 7):
        o2 = fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens + 1, cache_batch_idx=idx,
                                        cache_leftpad=left, causal=True, num_splits=splits)
        np.testing.assert_allclose(o2.astype(np.float64), out.astype(np.float64), rtol=2 * U16, atol=2.0 ** -11,
                                   err_msg=f"seed {seed}: num_splits {splits}")
    # A Fortran-ordered cache (head dim not contiguous): updated through a copy, in the caller's array.
    kf, vf = np.asfortranarray(kc0), np.asfortranarray(vc0)
    o3 = fa.flash_attn_with_kvcache(q, kf, vf, kn, vn, cache_seqlens=seqlens, cache_batch_idx=idx,
                                    cache_leftpad=left, causal=True, num_splits=1)
    assert np.array_equal(kf, kc) and np.array_equal(vf, vc) and np.array_equal(o3, out), seed


# --- ALiBi, dropout, S_dmask -------------------------------------------------------------------------

@pytest.mark.parametrize("causal,window,softcap", [MASKS[0], MASKS[1], MASKS[2], MASKS[6]])
@pytest.mark.parametrize("per_batch", [False, True])
def test_alibi_forward_backward(causal, window, softcap, per_batch):
    """alibi_slopes ([H] or [B, H]) against the reference (- slope * |i + Sk - Sq - j|), forward and the
    hub's backward, dense and varlen (each sequence's own lengths)."""
    seed, rng = new_rng("test_alibi_forward_backward")
    b, sq, sk, hq, hk, d = 2, 23, 31, 4, 2, 64
    q, k, v = randn(rng, (b, sq, hq, d)), randn(rng, (b, sk, hk, d)), randn(rng, (b, sk, hk, d))
    slopes = (rng.random((b, hq) if per_batch else hq) * 0.5).astype(np.float32)
    opts = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes)
    out, lse, probs = fa.flash_attn_func(q, k, v, return_attn_probs=True, **opts)
    assert probs is None, seed
    scale = d ** -0.5
    dout = randn(rng, q.shape)
    dq, dk, dv, _ = fa.bwd(dout, q, k, v, out, lse, alibi_slopes=slopes, is_causal=causal,
                           window_size_left=window[0], window_size_right=window[1], softcap=softcap)
    for i in range(b):
        sl = slopes[i] if per_batch else slopes
        ro, rl = ref_attention(q[i], k[i], v[i], scale, causal, window, softcap, alibi=sl)
        check_out(out[i], ro, np.abs(v).max(), seed)
        check_lse(lse[i], rl, smax_of(q, k, scale, softcap) + sl.max() * sk, seed)
        rq, rk, rv = ref_attention_bwd(q[i], k[i], v[i], out[i], dout[i], scale, causal, window, softcap, alibi=sl)
        check_grad(dq[i], rq, seed, "dq")
        check_grad(dk[i], rk, seed, "dk")
        check_grad(dv[i], rv, seed, "dv")
    # Varlen: the batch packed, with one shorter sequence.
    lq, lk = np.array([sq, 9]), np.array([sk, 30])
    cq, ck = cu(lq), cu(lk)
    qv = np.concatenate([q[0], q[1, :9]])
    kv_, vv = np.concatenate([k[0], k[1, :30]]), np.concatenate([v[0], v[1, :30]])
    ov = fa.flash_attn_varlen_func(qv, kv_, vv, cq, ck, sq, sk, **opts)
    for i in range(2):
        sl = slopes[i] if per_batch else slopes
        qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        ro, _ = ref_attention(qv[qs], kv_[ks], vv[ks], scale, causal, window, softcap, alibi=sl)
        check_out(ov[qs], ro, np.abs(v).max(), seed, what=f"varlen out of sequence {i}")


def keep_of(s_dmask):
    """Dropout's keep mask from S_dmask: dropped probabilities are stored negated (sign bit set)."""
    return ~np.signbit(s_dmask)


@pytest.mark.parametrize("p", [0.17, 0.5])
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_forward_backward(p, causal):
    """dropout_p with return_attn_probs: S_dmask holds P (|S_dmask| against the reference) negated where
    dropped; out and the hub's backward (given fwd's rng_state) against the reference with that keep
    mask; about p of the probabilities dropped; the same rng_state gives the same bits, another seed
    another mask; np.random.seed replays the drawn seed."""
    seed, rng = new_rng("test_dropout_forward_backward")
    b, sq, sk, hq, hk, d = 2, 37, 45, 4, 2, 64
    q, k, v = randn(rng, (b, sq, hq, d)), randn(rng, (b, sk, hk, d)), randn(rng, (b, sk, hk, d))
    rs = (int(rng.integers(0, 2**63)), int(rng.integers(0, 1000)))
    out, lse, s_dmask = fa.flash_attn_func(q, k, v, dropout_p=p, causal=causal, return_attn_probs=True,
                                           rng_state=rs)
    assert s_dmask.shape == (b, hq, sq, sk) and s_dmask.dtype == F16, seed
    scale = d ** -0.5
    keep = keep_of(s_dmask)
    visible_all = np.broadcast_to(visible(sq, sk, causal, (-1, -1)), keep.shape)
    frac = 1 - keep[visible_all].mean()
    assert abs(frac - p) < 0.05, f"seed {seed}: dropped {frac:.3f} of the probabilities, p = {p}"
    res = fa.fwd(q, k, v, p_dropout=p, is_causal=causal, return_softmax=True)
    rng_state = res[3]
    assert rng_state.dtype == np.int64 and rng_state.shape == (2,), seed
    dout = randn(rng, q.shape)
    dq, dk, dv, _ = fa.bwd(dout, q, k, v, res[0], res[1], p_dropout=p, is_causal=causal, rng_state=rng_state)
    keep2 = keep_of(res[2])
    for i in range(b):
        pr, rl, _, _ = ref_probs(q[i].astype(np.float64), k[i].astype(np.float64), scale, causal, (-1, -1), 0.0)
        np.testing.assert_allclose(np.abs(s_dmask[i].astype(np.float64)), pr, rtol=2 * U16, atol=2.0 ** -14,
                                   err_msg=f"seed {seed}: |S_dmask| is P")
        ro, _ = ref_attention(q[i], k[i], v[i], scale, causal, keep=keep[i], dropout_p=p)
        check_out(out[i], ro, np.abs(v).max() / (1 - p), seed)
        check_lse(lse[i], rl, smax_of(q, k, scale, 0), seed)
        ro2, _ = ref_attention(q[i], k[i], v[i], scale, causal, keep=keep2[i], dropout_p=p)
        check_out(res[0][i], ro2, np.abs(v).max() / (1 - p), seed, what="hub out")
        rq, rk, rv = ref_attention_bwd(q[i], k[i], v[i], res[0][i], dout[i], scale, causal, keep=keep2[i],
                                       dropout_p=p)
        check_grad(dq[i], rq, seed, "dq")
        check_grad(dk[i], rk, seed, "dk")
        check_grad(dv[i], rv, seed, "dv")
    again = fa.flash_attn_func(q, k, v, dropout_p=p, causal=causal, rng_state=rs)
    assert np.array_equal(again, out), seed
    other = fa.flash_attn_func(q, k, v, dropout_p=p, causal=causal, rng_state=(rs[0] ^ 1, rs[1]))
    assert not np.array_equal(other, out), seed
    np.random.seed(seed % 2**32)
    a = fa.flash_attn_func(q, k, v, dropout_p=p, causal=causal)
    np.random.seed(seed % 2**32)
    b2 = fa.flash_attn_func(q, k, v, dropout_p=p, causal=causal)
    assert np.array_equal(a, b2), seed
    # The hub's rng_state fed back as the functions' rng_state gives the hub's output.
    assert np.array_equal(fa.flash_attn_func(q, k, v, dropout_p=p, causal=causal, rng_state=rng_state), res[0]), seed


def test_dropout_varlen_and_packed():
    """Varlen dropout: S_dmask [B, H, max_seqlen_q, max_seqlen_k] (each sequence top left, zero padding),
    out against the reference with its keep mask; the packed variants equal the separate call."""
    seed, rng = new_rng("test_dropout_varlen_and_packed")
    lens = np.array([13, 30, 1])
    c = cu(lens)
    h, d, p = 2, 32, 0.3
    qkv = randn(rng, (c[-1], 3, h, d))
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    rs = (12345, 7)
    out, lse, s = fa.flash_attn_varlen_func(q, k, v, c, c, 30, 30, dropout_p=p, causal=True,
                                            return_attn_probs=True, rng_state=rs)
    assert s.shape == (3, h, 30, 30), seed
    for i in range(3):
        n = int(lens[i])
        sl = slice(c[i], c[i + 1])
        assert np.all(s[i, :, n:] == 0) and np.all(s[i, :, :, n:] == 0), seed
        ro, _ = ref_attention(q[sl], k[sl], v[sl], d ** -0.5, True, keep=keep_of(s[i, :, :n, :n]), dropout_p=p)
        check_out(out[sl], ro, np.abs(v).max() / (1 - p), seed, what=f"out of sequence {i}")
    o2 = fa.flash_attn_varlen_qkvpacked_func(qkv, c, 30, dropout_p=p, causal=True, rng_state=rs)
    assert np.array_equal(o2, out), seed
    o3 = fa.flash_attn_varlen_kvpacked_func(q, qkv[:, 1:], c, c, 30, 30, dropout_p=p, causal=True, rng_state=rs)
    assert np.array_equal(o3, out), seed
    # Dense packed variants too.
    qkv4 = randn(rng, (2, 20, 3, h, d))
    want = fa.flash_attn_func(qkv4[:, :, 0], qkv4[:, :, 1], qkv4[:, :, 2], dropout_p=p, rng_state=rs,
                              alibi_slopes=np.array([0.1, 0.2], np.float32))
    got = fa.flash_attn_qkvpacked_func(qkv4, dropout_p=p, rng_state=rs, alibi_slopes=np.array([0.1, 0.2], np.float32))
    assert np.array_equal(got, want), seed
    got = fa.flash_attn_kvpacked_func(qkv4[:, :, 0], qkv4[:, :, 1:], dropout_p=p, rng_state=rs,
                                      alibi_slopes=np.array([0.1, 0.2], np.float32))
    assert np.array_equal(got, want), seed


def _aligned(shape, dtype):
    """A zeroed array whose data is 16-byte aligned (the CUDA row check passes before the feature check)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.zeros(n + 16, np.uint8)
    off = (-raw.ctypes.data) % 16
    return raw[off:off + n].view(dtype).reshape(shape)


def _d(a):
    return (a.ctypes.data, {np.dtype(F16): "f16", np.dtype(np.float32): "f32", np.dtype(np.int32): "i32"}[a.dtype],
            a.shape, tuple(s // a.itemsize for s in a.strides))


def test_native_cuda_checks_before_launching():
    """On CUDA the library checks every argument before anything runs: a bad one is the same error as on
    the CPU, ALiBi, dropout and S_dmask included (they run on CUDA; no GPU is needed here, no device
    memory is touched, and on a GPU machine nothing is launched). flash_attn_with_kvcache without the
    workspace it needs (here: split-KV's partials) validates, runs nothing and returns the bytes it needs."""
    q, out = _aligned((1, 16, 2, 64), F16), _aligned((1, 16, 2, 64), F16)
    lse = _aligned((1, 2, 16), np.float32)
    dev = ("cuda", 0, 0)
    args = (_d(q), _d(q), _d(q), _d(out), _d(lse), None, False, -1, -1, 0.0, dev)
    with pytest.raises(ValueError, match="dropout_p"):
        _native.fwd(*args, dropout=(1.5, 1, 2))
    with pytest.raises(ValueError, match="alibi_slopes"):
        _native.fwd(*args, alibi_slopes=_d(_aligned((3,), np.float32)))
    with pytest.raises(TypeError, match="alibi_slopes"):
        _native.fwd(*args, alibi_slopes=_d(_aligned((2,), np.int32)))
    with pytest.raises(ValueError, match="s_dmask"):
        _native.fwd(*args, s_dmask=_d(_aligned((1, 2, 16, 15), np.float32)))
    with pytest.raises(ValueError, match="s_dmask"):
        _native.fwd(*args, s_dmask=_d(_aligned((1, 2, 16, 32), np.float32)[..., ::2]))
    cache = _aligned((1, 32, 2, 64), F16)
    seqlens = _aligned((1,), np.int32)
    need = _native.fwd_kvcache(_d(q), _d(cache), _d(cache), _d(seqlens), _d(out), _d(lse), None, False, -1, -1,
                               0.0, False, 2, dev)
    assert need >= 2 * 16 * 2 * 64 * 4, need
    with pytest.raises(ValueError, match="workspace"):
        _native.fwd_kvcache(_d(q), _d(cache), _d(cache), _d(seqlens), _d(out), _d(lse), None, False, -1, -1, 0.0,
                            False, 2, dev, workspace=(q.ctypes.data, need))
    # A bad argument is still a ValueError first.
    with pytest.raises(ValueError):
        _native.fwd(*args[:3], _d(out[:, :8]), *args[4:], dropout=(0.1, 1, 2))
    with pytest.raises(TypeError, match="dropout"):
        _native.fwd(*args, dropout=(0.1, 1))


# --- Bad input ---------------------------------------------------------------------------------------

def _inputs():
    rng = np.random.default_rng(0)
    q, k, v = randn(rng, (1, 8, 4, 64)), randn(rng, (1, 8, 2, 64)), randn(rng, (1, 8, 2, 64))
    c = np.array([0, 8], np.int32)
    return q, k, v, c


def _dq_over_lse(q, k, v):
    """The hub's bwd with dq laid over softmax_lse (one buffer: lse its first 32 floats)."""
    buf = np.zeros(q.size // 2, np.float32)
    return fa.bwd(q, q, k, v, q, buf[:32].reshape(1, 4, 8), dq=buf.view(F16).reshape(q.shape))


def _vq():
    q, k, v, c = _inputs()
    return q[0], k[0], v[0], c


BAD = [
    # (name, call, exception, words the message must contain)
    ("q a list", lambda q, k, v, c: fa.flash_attn_func(q.tolist(), k, v), TypeError, ["q", "list"]),
    ("k a list", lambda q, k, v, c: fa.flash_attn_func(q, k.tolist(), v), TypeError, ["k"]),
    ("q float32", lambda q, k, v, c: fa.flash_attn_func(q.astype(np.float32), k.astype(np.float32),
                                                        v.astype(np.float32)), TypeError, ["q", "f32"]),
    ("q float64", lambda q, k, v, c: fa.flash_attn_func(q.astype(np.float64), k, v), TypeError, ["q", "float64"]),
    ("v int8", lambda q, k, v, c: fa.flash_attn_func(q, k, v.astype(np.int8)), TypeError, ["v", "int8"]),
    ("k float32 beside f16 q", lambda q, k, v, c: fa.flash_attn_func(q, k.astype(np.float32), v), TypeError,
     ["k", "f32"]),
    ("q rank 3", lambda q, k, v, c: fa.flash_attn_func(q[0], k, v), ValueError, ["q", "4 dimensions"]),
    ("k batch", lambda q, k, v, c: fa.flash_attn_func(q, np.concatenate([k, k]), np.concatenate([v, v])),
     ValueError, ["k", "batch"]),
    ("v shape", lambda q, k, v, c: fa.flash_attn_func(q, k, v[:, :4]), ValueError, ["v"]),
    ("heads", lambda q, k, v, c: fa.flash_attn_func(q[:, :, :3], k, v), ValueError, ["num_heads"]),
    ("head dim mismatch", lambda q, k, v, c: fa.flash_attn_func(q, k[..., :32], v[..., :32]), ValueError,
     ["k", "head dim"]),
    ("head dim 300", lambda q, k, v, c: fa.flash_attn_func(*(np.zeros((1, 4, 1, 300), F16),) * 3), ValueError,
     ["head dim 300"]),
    ("dropout negative", lambda q, k, v, c: fa.flash_attn_func(q, k, v, dropout_p=-0.1), ValueError, ["dropout_p"]),
    ("dropout str", lambda q, k, v, c: fa.flash_attn_func(q, k, v, dropout_p="0.1"), TypeError, ["dropout_p"]),
    ("rng_state 3", lambda q, k, v, c: fa.flash_attn_func(q, k, v, dropout_p=0.1, rng_state=(1, 2, 3)), TypeError,
     ["rng_state"]),
    ("rng_state negative", lambda q, k, v, c: fa.flash_attn_func(q, k, v, dropout_p=0.1, rng_state=(1, -2**64)),
     ValueError, ["rng_state"]),
    ("hub bwd dropout without rng_state", lambda q, k, v, c: fa.bwd(q, q, k, v, q, np.zeros((1, 4, 8), np.float32),
                                                                    p_dropout=0.1), ValueError, ["rng_state"]),
    ("dropout 1.5", lambda q, k, v, c: fa.flash_attn_func(q, k, v, dropout_p=1.5), ValueError, ["dropout_p"]),
    ("alibi count", lambda q, k, v, c: fa.flash_attn_func(q, k, v, alibi_slopes=np.ones(3, np.float32)),
     ValueError, ["alibi_slopes"]),
    ("alibi float16", lambda q, k, v, c: fa.flash_attn_func(q, k, v, alibi_slopes=np.ones(4, F16)),
     TypeError, ["alibi_slopes"]),
    ("alibi list", lambda q, k, v, c: fa.flash_attn_func(q, k, v, alibi_slopes=[1.0] * 4), TypeError,
     ["alibi_slopes"]),
    ("window str", lambda q, k, v, c: fa.flash_attn_func(q, k, v, window_size="ab"), TypeError, ["window_size"]),
    ("window 3", lambda q, k, v, c: fa.flash_attn_func(q, k, v, window_size=(1, 2, 3)), TypeError,
     ["window_size"]),
    ("window float", lambda q, k, v, c: fa.flash_attn_func(q, k, v, window_size=(1.5, 2)), TypeError,
     ["window_size"]),
    ("scale nan", lambda q, k, v, c: fa.flash_attn_func(q, k, v, softmax_scale=float("nan")), ValueError,
     ["softmax_scale"]),
    ("scale str", lambda q, k, v, c: fa.flash_attn_func(q, k, v, softmax_scale="1"), TypeError, ["softmax_scale"]),
    ("softcap inf", lambda q, k, v, c: fa.flash_attn_func(q, k, v, softcap=float("inf")), ValueError, ["softcap"]),
    ("qkv not packed", lambda q, k, v, c: fa.flash_attn_qkvpacked_func(np.zeros((1, 4, 2, 2, 64), F16)), ValueError,
     ["qkv", "3"]),
    ("kv rank", lambda q, k, v, c: fa.flash_attn_kvpacked_func(q, k), ValueError, ["kv", "5 dimensions"]),
    ("cu_seqlens int64", lambda q, k, v, c: fa.flash_attn_varlen_func(*_vq()[:3], c.astype(np.int64), c, 8, 8),
     TypeError, ["cu_seqlens_q"]),
    ("cu_seqlens list", lambda q, k, v, c: fa.flash_attn_varlen_func(*_vq()[:3], [0, 8], c, 8, 8), TypeError,
     ["cu_seqlens_q"]),
    ("cu_seqlens decreasing", lambda q, k, v, c: fa.flash_attn_varlen_func(
        *_vq()[:3], np.array([0, 6, 3], np.int32), np.array([0, 4, 8], np.int32), 8, 8), ValueError,
     ["cu_seqlens_q", "non-decreasing"]),
    ("cu_seqlens past q", lambda q, k, v, c: fa.flash_attn_varlen_func(
        *_vq()[:3], np.array([0, 9], np.int32), c, 9, 8), ValueError, ["cu_seqlens_q"]),
    ("cu_seqlens lengths differ", lambda q, k, v, c: fa.flash_attn_varlen_func(
        *_vq()[:3], np.array([0, 4, 8], np.int32), c, 8, 8), ValueError, ["cu_seqlens_k"]),
    ("cu_seqlens 2-d", lambda q, k, v, c: fa.flash_attn_varlen_func(*_vq()[:3], c[None], c[None], 8, 8),
     ValueError, ["cu_seqlens_q"]),
    ("max_seqlen small", lambda q, k, v, c: fa.flash_attn_varlen_func(*_vq()[:3], c, c, 7, 8), ValueError,
     ["max_seqlen_q"]),
    ("max_seqlen negative", lambda q, k, v, c: fa.flash_attn_varlen_func(*_vq()[:3], c, c, -1, 8), ValueError,
     ["max_seqlen_q"]),
    ("max_seqlen float", lambda q, k, v, c: fa.flash_attn_varlen_func(*_vq()[:3], c, c, 8.0, 8), TypeError,
     ["max_seqlen_q"]),
    ("seqused too long", lambda q, k, v, c: fa.flash_attn_varlen_func(
        *_vq()[:3], c, c, 8, 9, seqused_k=np.array([9], np.int32)), ValueError, ["seqused_k"]),
    ("seqused negative", lambda q, k, v, c: fa.flash_attn_varlen_func(
        *_vq()[:3], c, c, 8, 8, seqused_q=np.array([-1], np.int32)), ValueError, ["seqused_q"]),
    ("seqused count", lambda q, k, v, c: fa.flash_attn_varlen_func(
        *_vq()[:3], c, c, 8, 8, seqused_q=np.array([1, 2], np.int32)), ValueError, ["seqused_q"]),
    ("block_table float", lambda q, k, v, c: fa.flash_attn_varlen_func(
        _vq()[0], k.reshape(2, 4, 2, 64), v.reshape(2, 4, 2, 64), c, c, 8, 8,
        block_table=np.array([[0, 1]], np.float32)), TypeError, ["block_table"]),
    ("block_table out of range", lambda q, k, v, c: fa.flash_attn_varlen_func(
        _vq()[0], k.reshape(2, 4, 2, 64), v.reshape(2, 4, 2, 64), c, c, 8, 8,
        block_table=np.array([[0, 2]], np.int32)), ValueError, ["block_table"]),
    ("block_table too short", lambda q, k, v, c: fa.flash_attn_varlen_func(
        _vq()[0], k.reshape(2, 4, 2, 64), v.reshape(2, 4, 2, 64), c, c, 8, 8,
        block_table=np.array([[0]], np.int32)), ValueError, []),
    ("paged k rank", lambda q, k, v, c: fa.flash_attn_varlen_func(*_vq()[:3], c, c, 8, 8,
                                                                  block_table=np.array([[0]], np.int32)),
     ValueError, ["k", "4 dimensions"]),
    ("paged without key counts", lambda q, k, v, c: fa.flash_attn_varlen_func(
        _vq()[0], k.reshape(2, 4, 2, 64), v.reshape(2, 4, 2, 64), c, None, 8, 8,
        block_table=np.array([[0, 1]], np.int32)), ValueError, ["seqused_k"]),
    ("kvcache k without v", lambda q, k, v, c: fa.flash_attn_with_kvcache(
        q[:, :1], np.zeros((1, 16, 2, 64), F16), np.zeros((1, 16, 2, 64), F16), k=k[:, :1], cache_seqlens=3),
     ValueError, ["v"]),
    ("kvcache past capacity", lambda q, k, v, c: fa.flash_attn_with_kvcache(
        q[:, :1], np.zeros((1, 16, 2, 64), F16), np.zeros((1, 16, 2, 64), F16), k=k[:, :4], v=v[:, :4],
        cache_seqlens=14), ValueError, ["cache_seqlens"]),
    ("kvcache read-only cache", lambda q, k, v, c: fa.flash_attn_with_kvcache(
        q[:, :1], np.broadcast_to(np.zeros(1, F16), (1, 16, 2, 64)), np.zeros((1, 16, 2, 64), F16), k=k[:, :1],
        v=v[:, :1], cache_seqlens=3), ValueError, ["k_cache", "read-only"]),
    ("kvcache cache_seqlens float", lambda q, k, v, c: fa.flash_attn_with_kvcache(
        q[:, :1], np.zeros((1, 16, 2, 64), F16), np.zeros((1, 16, 2, 64), F16), cache_seqlens=3.0), TypeError,
     ["cache_seqlens"]),
    ("kvcache cache_seqlens int64", lambda q, k, v, c: fa.flash_attn_with_kvcache(
        q[:, :1], np.zeros((1, 16, 2, 64), F16), np.zeros((1, 16, 2, 64), F16), cache_seqlens=np.array([3])),
     TypeError, ["cache_seqlens"]),
    ("kvcache rotary without k", lambda q, k, v, c: fa.flash_attn_with_kvcache(
        q[:, :1], np.zeros((1, 16, 2, 64), F16), np.zeros((1, 16, 2, 64), F16), cache_seqlens=3,
        rotary_cos=np.ones((16, 16), np.float32)), ValueError, ["rotary"]),
    ("kvcache rotary too short", lambda q, k, v, c: fa.flash_attn_with_kvcache(
        q[:, :1], np.zeros((1, 16, 2, 64), F16), np.zeros((1, 16, 2, 64), F16), k=k[:, :2], v=v[:, :2],
        cache_seqlens=3, rotary_cos=np.ones((4, 16), np.float32), rotary_sin=np.ones((4, 16), np.float32)),
     ValueError, ["rotary"]),
    ("kvcache rotary_interleaved array", lambda q, k, v, c: fa.flash_attn_with_kvcache(
        q[:, :1], np.zeros((1, 16, 2, 64), F16), np.zeros((1, 16, 2, 64), F16), cache_seqlens=3,
        rotary_interleaved=np.ones(2, bool)), TypeError, ["rotary_interleaved"]),
    # Scalars float32 cannot hold (the kernels' precision): an error, not a value rounded to 0 (softcap and
    # dropout_p would be off) or past the range.
    ("softcap rounds to 0 in float32", lambda q, k, v, c: fa.flash_attn_func(q, k, v, softcap=1e-300), ValueError,
     ["softcap", "float32"]),
    ("dropout_p rounds to 0 in float32", lambda q, k, v, c: fa.flash_attn_func(q, k, v, dropout_p=1e-46), ValueError,
     ["dropout_p", "float32"]),
    ("dropout_p rounds to 1 in float32", lambda q, k, v, c: fa.flash_attn_func(q, k, v, dropout_p=0.999999999),
     ValueError, ["dropout_p", "[0, 1)", "0.999999999"]),
    ("softmax_scale past float32", lambda q, k, v, c: fa.flash_attn_func(q, k, v, softmax_scale=1e300), ValueError,
     ["softmax_scale", "float32"]),
    ("hub softcap rounds to 0 in float32", lambda q, k, v, c: fa.fwd(q, k, v, softcap=1e-300), ValueError,
     ["softcap", "float32"]),
    # 2^59 bytes of out: past any address space, so no allocator can grant it (overcommit or not).
    ("out past memory", lambda q, k, v, c: (lambda t: fa.flash_attn_func(t, t, t))(np.lib.stride_tricks.as_strided(
        np.zeros(64, F16), (1, 2 ** 52, 1, 64), (0, 0, 0, 2))), ValueError, ["q", "allocated"]),
    ("hub dq aliases softmax_lse", lambda q, k, v, c: _dq_over_lse(q, k, v), ValueError, ["dq", "overlaps softmax_lse"]),
    ("kvcache num_splits negative", lambda q, k, v, c: fa.flash_attn_with_kvcache(
        q[:, :1], np.zeros((1, 16, 2, 64), F16), np.zeros((1, 16, 2, 64), F16), cache_seqlens=3, num_splits=-1),
     ValueError, ["num_splits"]),
    ("kvcache cache_batch_idx out of range", lambda q, k, v, c: fa.flash_attn_with_kvcache(
        q[:, :1], np.zeros((1, 16, 2, 64), F16), np.zeros((1, 16, 2, 64), F16), cache_seqlens=3,
        cache_batch_idx=np.array([1], np.int32)), ValueError, ["cache_batch_idx"]),
    ("varlen rank", lambda q, k, v, c: fa.flash_attn_varlen_func(q, k, v, c, c, 8, 8), ValueError,
     ["q", "3 dimensions"]),
    ("hub out shape", lambda q, k, v, c: fa.fwd(q, k, v, out=np.empty((1, 8, 4, 32), F16)), ValueError, ["out"]),
    ("hub out dtype", lambda q, k, v, c: fa.fwd(q, k, v, out=np.empty(q.shape, np.float32)), TypeError, ["out"]),
    ("hub out read-only", lambda q, k, v, c: fa.fwd(q, k, v, out=np.broadcast_to(np.zeros(1, F16), q.shape)),
     ValueError, ["out", "read-only"]),
    ("hub out aliases q", lambda q, k, v, c: fa.fwd(q, k, v, out=q), ValueError, ["out", "overlaps q"]),
    ("varlen S_dmask past memory", lambda q, k, v, c: fa.flash_attn_varlen_func(
        q[0], k[0], v[0], c, c, 2 ** 40, 2 ** 40, dropout_p=0.5, return_attn_probs=True), ValueError,
     ["max_seqlen_q", "S_dmask"]),
    ("hub paged out aliases q", lambda q, k, v, c: (lambda qt, kp: fa.varlen_fwd(
        qt, kp, kp.copy(), np.array([0, 4, 10], np.int32), np.array([0, 5, 13], np.int32), out=qt,
        block_table=np.array([[0, 1], [2, 3]], np.int32), max_seqlen_q=6, max_seqlen_k=8))(
        np.zeros((10, 4, 64), F16), np.zeros((4, 4, 2, 64), F16)), ValueError, ["out", "overlaps q"]),
    ("hub head dim 264", lambda q, k, v, c: fa.fwd(*(np.zeros((1, 4, 1, 264), F16),) * 3), ValueError,
     ["head dim 264"]),
    ("hub out of the wrong head dim", lambda q, k, v, c: fa.fwd(*(np.zeros((1, 4, 1, 40), F16),) * 3,
                                                                 out=np.zeros((1, 4, 1, 64), F16)), ValueError, ["out"]),
    ("hub leftpad_k", lambda q, k, v, c: fa.varlen_fwd(*_vq()[:3], c, c, leftpad_k=c, max_seqlen_q=8,
                                                      max_seqlen_k=8), NotImplementedError, ["leftpad_k"]),
    ("hub lse shape", lambda q, k, v, c: fa.bwd(q, q, k, v, q, np.zeros((1, 4, 7), np.float32)), ValueError,
     ["softmax_lse"]),
    ("hub lse dtype", lambda q, k, v, c: fa.bwd(q, q, k, v, q, np.zeros((1, 4, 8), F16)), TypeError, ["softmax_lse"]),
    ("hub dq shape", lambda q, k, v, c: fa.bwd(q, q, k, v, q, np.zeros((1, 4, 8), np.float32),
                                              dq=np.empty_like(k)), ValueError, ["dq"]),
    ("hub dk aliases dv", lambda q, k, v, c: (lambda g: fa.bwd(q, q, k, v, q, np.zeros((1, 4, 8), np.float32),
                                                               dk=g, dv=g))(np.empty_like(k)), ValueError, ["dk"]),
    # Outputs of a layout the library cannot write in place (filled from a temporary): the same checks.
    ("hub out with a zero-stride head dim", lambda q, k, v, c: fa.fwd(q, k, v, out=np.lib.stride_tricks.as_strided(
        np.zeros(1, F16), q.shape, (0,) * 4)), ValueError, ["out", "share memory"]),
    ("hub strided out over a strided q", lambda q, k, v, c: (lambda w: fa.fwd(w[..., ::2], k, v, out=w[..., ::2]))(
        np.repeat(q, 2, axis=-1)), ValueError, ["out", "overlaps q"]),
    ("hub strided dk aliases dv", lambda q, k, v, c: (lambda w: fa.bwd(q, q, k, v, q, np.zeros((1, 4, 8), np.float32),
                                                                       dk=w[..., ::2], dv=w[..., ::2]))(
        np.zeros(k.shape[:-1] + (2 * k.shape[-1],), F16)), ValueError, ["dk", "overlaps dv"]),
    # Head dim 0 with the default scale (1/sqrt(0)): the head dim's error naming q, at every entry point.
    ("head dim 0", lambda q, k, v, c: fa.flash_attn_func(*(q[..., :0],) * 3), ValueError, ["q", "head dim 0"]),
    ("varlen head dim 0", lambda q, k, v, c: fa.flash_attn_varlen_func(*(q[0, ..., :0],) * 3, c, c, 8, 8), ValueError,
     ["q", "head dim 0"]),
    ("kvcache head dim 0", lambda q, k, v, c: fa.flash_attn_with_kvcache(q[..., :0], k[..., :0], v[..., :0],
                                                                         cache_seqlens=np.array([8], np.int32)),
     ValueError, ["q", "head dim 0"]),
    ("hub head dim 0", lambda q, k, v, c: fa.fwd(*(q[..., :0],) * 3), ValueError, ["q", "head dim 0"]),
    ("hub bwd head dim 0", lambda q, k, v, c: fa.bwd(*(q[..., :0],) * 5, np.zeros((1, 4, 8), np.float32)), ValueError,
     ["q", "head dim 0"]),
    ("preload without CUDA", lambda q, k, v, c: fa.preload(0) if not fa.cuda_available() else
     (_ for _ in ()).throw(RuntimeError("cuda: skipped, CUDA present")), RuntimeError, ["cuda"]),
    ("preload bad device", lambda q, k, v, c: fa.preload("gpu"), ValueError, ["device"]),
]


@pytest.mark.parametrize("name,call,exc,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(name, call, exc, words):
    with pytest.raises(exc) as info:
        call(*_inputs())
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{name}: message {msg!r} lacks {w!r}"


NATIVE_BAD = [
    ("tensor not a tuple", dict(q=[0, "f16", (1,), (1,)]), TypeError, "q"),
    ("tensor of 3", dict(q=(0, "f16", (1,))), TypeError, "q"),
    ("address str", dict(q=("0", "f16", (1, 1, 1, 64), (64, 64, 64, 1))), TypeError, "q"),
    ("address negative", dict(q=(-16, "f16", (1, 1, 1, 64), (64, 64, 64, 1))), ValueError, "q"),
    ("address huge", dict(q=(2**70, "f16", (1, 1, 1, 64), (64, 64, 64, 1))), ValueError, "q"),
    ("dtype unknown", dict(q=(0, "f64", (1, 1, 1, 64), (64, 64, 64, 1))), TypeError, "q"),
    ("dtype int", dict(q=(0, 2, (1, 1, 1, 64), (64, 64, 64, 1))), TypeError, "q"),
    ("shape negative", dict(q=(0, "f16", (1, -1, 1, 64), (64, 64, 64, 1))), ValueError, "q"),
    ("shape str", dict(q=(0, "f16", "abcd", (64, 64, 64, 1))), TypeError, "q"),
    ("strides count", dict(q=(0, "f16", (1, 1, 1, 64), (64, 1))), ValueError, "q"),
    ("shape huge", dict(q=(0, "f16", (2**63, 1, 1, 64), (64, 64, 64, 1))), ValueError, "q"),
    ("rank", dict(q=(0, "f16", (1, 1, 64), (64, 64, 1))), ValueError, "q"),
    ("causal int", dict(causal=1), TypeError, "causal"),
    ("window str", dict(window_size_left="1"), TypeError, "window_size_left"),
    ("window huge", dict(window_size_left=2**80), ValueError, "window_size_left"),
    ("softcap str", dict(softcap="0"), TypeError, "softcap"),
    ("device unknown", dict(device="tpu"), ValueError, "device"),
    ("device tuple", dict(device=("cuda", 0)), TypeError, "device"),
    ("device ordinal", dict(device=("cuda", -1, 0)), ValueError, "device"),
    ("device int", dict(device=0), TypeError, "device"),
]


@pytest.mark.parametrize("name,change,exc,word", NATIVE_BAD, ids=[b[0] for b in NATIVE_BAD])
def test_native_bad_arguments(name, change, exc, word):
    """The native module checks every argument before anything runs (its addresses here point at nothing:
    nothing may be read)."""
    t = (0, "f16", (1, 1, 1, 64), (64, 64, 64, 1))
    lse = (0, "f32", (1, 1, 1), (1, 1, 1))
    args = dict(q=t, k=t, v=t, out=t, lse=lse, softmax_scale=None, causal=False, window_size_left=-1,
                window_size_right=-1, softcap=0.0, device="cpu")
    args.update(change)
    with pytest.raises(exc) as info:
        _native.fwd(*args.values())
    assert word in str(info.value), f"{name}: {info.value}"


def test_native_cuda_without_a_gpu_is_an_error():
    if _native.cuda_available():
        pytest.skip("CUDA is present")
    q, out = np.zeros((1, 16, 2, 64), F16), np.zeros((1, 16, 2, 64), F16)
    d = (q.ctypes.data, "f16", q.shape, (2048, 128, 64, 1))
    o = (out.ctypes.data, "f16", q.shape, (2048, 128, 64, 1))
    lse = np.zeros((1, 2, 16), np.float32)
    if q.ctypes.data % 16 or out.ctypes.data % 16:
        pytest.skip("numpy gave a buffer that is not 16-byte aligned")
    with pytest.raises(RuntimeError, match="cuda"):
        _native.fwd(d, d, d, o, (lse.ctypes.data, "f32", lse.shape, (32, 16, 1)), None, False, -1, -1, 0.0,
                    ("cuda", 0, 0))
    with pytest.raises(RuntimeError, match="cuda"):
        _native.preload(0)


def test_native_workspace_bytes():
    assert isinstance(_native.bwd_workspace_bytes((2, 128, 4, 64), False), int)
    assert _native.bwd_workspace_bytes((2, 128, 4, 64), True) >= 0
    # The full-speed size: the default mode's is the same; the deterministic one holds dq copies.
    assert _native.bwd_workspace_bytes((2, 128, 4, 64), False, 2, 4) == _native.bwd_workspace_bytes((2, 128, 4, 64), False)
    assert _native.bwd_workspace_bytes((2, 128, 4, 64), True, 2, 4) > _native.bwd_workspace_bytes((2, 128, 4, 64), True)
    with pytest.raises(ValueError, match="sequences and kv_heads"):
        _native.bwd_workspace_bytes((2, 128, 4, 64), True, 2)
    with pytest.raises(ValueError, match="kv_heads"):
        _native.bwd_workspace_bytes((2, 128, 4, 64), True, 2, -1)
    with pytest.raises(TypeError):
        _native.bwd_workspace_bytes("abc", False)
    with pytest.raises(TypeError):
        _native.bwd_workspace_bytes((2, 128, 4, 64), 1)


def test_import_needs_no_torch():
    """The package imports without torch (and, here, without CUDA): numpy arrays need neither."""
    if fa._torch is None:
        assert "flash_attn_rs._torch_impl" not in sys.modules
    assert fa.cuda_available() in (True, False)
    assert fa.HEAD_DIMS == (32, 64, 96, 128, 192, 256)


def _random_call(rng):
    """One call of a public entry point with random, mostly ill-formed arguments (shapes, dtypes, index
    arrays at the edges, options out of range): `(name, thunk)`."""
    pick = lambda xs: xs[int(rng.integers(len(xs)))]
    b, s, sk, h, d = pick([0, 1, 2]), pick([0, 1, 3, 9]), pick([0, 1, 5]), pick([1, 2, 4]), pick([0, 7, 32, 64, 64, 300])
    hk = pick([1, h, 3])

    def arr(shape):
        dt = pick([F16] * 6 + [np.float32, np.int32, np.float64])
        a = (rng.standard_normal([abs(x) for x in shape]) * pick([1.0, 1.0, 1e4])).astype(dt)
        if rng.random() < 0.1 and a.ndim >= 2:
            a = np.swapaxes(a, 0, 1)
        return a

    def ints(shape):
        return np.array([pick([0, 1, 2, 3, 5, 8, -1, 100, 2**31 - 1]) for _ in range(int(np.prod(shape)))],
                        dtype=pick([np.int32] * 5 + [np.int64])).reshape(shape)

    opts = {}
    for key, values in (("causal", [True, False, None]), ("window_size", [(-1, 0), (3, -1), (-2, 1), (1,), "ab"]),
                        ("softcap", [0.0, 5.0, -1.0, float("nan")]), ("softmax_scale", [None, 0.1, float("nan"), 0.0])):
        if rng.random() < 0.25:
            opts[key] = pick(values)
    which = pick(["func", "varlen", "kvcache", "qkv", "hub"])
    if which == "func":
        if rng.random() < 0.2:
            opts["dropout_p"] = pick([0.1, 1.0, -0.1, float("nan")])
        if rng.random() < 0.2:
            opts["alibi_slopes"] = arr(pick([[h], [b, h], [h + 1]]))
        if rng.random() < 0.2:
            opts["return_attn_probs"] = True
        q, k, v = arr([b, s, h, d]), arr([b, sk, hk, d]), arr([b, sk, hk, pick([d, d, d + 1])])
        return which, lambda: fa.flash_attn_func(q, k, v, **opts)
    if which == "varlen":
        t = pick([0, 4, 9])
        if rng.random() < 0.3:
            nb, page = pick([0, 1, 3]), pick([1, 2, 16])
            k, v = arr([nb, page, hk, d]), arr([nb, page, hk, d])
            opts["block_table"] = ints([b, pick([0, 1, 2])])
        else:
            k, v = arr([t, hk, d]), arr([t, hk, d])
        if rng.random() < 0.2:
            opts["seqused_k"] = ints([b])
        q, cq, ck = arr([t, h, d]), ints([b + 1]), ints([b + 1])
        mq, mk = pick([None, 0, 4, -1, 10**12]), pick([None, 4, 9])
        return which, lambda: fa.flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, **opts)
    if which == "kvcache":
        sc, kw = pick([0, 4, 8]), {k: opts[k] for k in opts if k != "return_attn_probs"}
        if rng.random() < 0.4:
            sn = pick([0, 1, 2])
            kw["k"], kw["v"] = arr([b, sn, hk, d]), arr([b, sn, hk, d])
        if rng.random() < 0.3:
            rd = pick([0, 2, 4, d, d + 2])
            kw["rotary_cos"], kw["rotary_sin"] = arr([8, rd // 2]), arr([8, rd // 2])
        for key in ("cache_batch_idx", "cache_leftpad"):
            if rng.random() < 0.2:
                kw[key] = ints([b])
        if rng.random() < 0.2:
            kw["block_table"] = ints([b, 2])
        if rng.random() < 0.3:
            kw["num_splits"] = pick([0, 3, -1, 10**6])
        if rng.random() < 0.8:
            kw["cache_seqlens"] = pick([ints([b]), 3, -1])
        q, kc, vc = arr([b, s, h, d]), arr([pick([b, b + 1, 1]), sc, hk, d]), arr([b, sc, hk, d])
        return which, lambda: fa.flash_attn_with_kvcache(q, kc, vc, **kw)
    if which == "qkv":
        qkv = arr([b, s, 3, h, d])
        return which, lambda: fa.flash_attn_qkvpacked_func(qkv, **opts)
    q, k, v = arr([b, s, h, d]), arr([b, sk, hk, d]), arr([b, sk, hk, d])
    out = pick([None, arr([b, s, h, d])])
    return which, lambda: fa.fwd(q, k, v, out=out, p_dropout=pick([0.0, 0.2]))


def test_random_bad_input_raises_typed_errors():
    """Random, mostly ill-formed calls of the public entry points either run or raise ValueError,
    TypeError or NotImplementedError (never another exception: a ZeroDivisionError from the default
    scale at head dim 0 was one)."""
    seed, rng = new_rng("test_random_bad_input_raises_typed_errors")
    ran = 0
    for i in range(600):
        which, call = _random_call(rng)
        try:
            call()
            ran += 1
        except (ValueError, TypeError, NotImplementedError):
            pass
        except Exception as e:  # anything else fails the test, with the call that raised it
            raise AssertionError(f"seed {seed}: call {i} ({which}) raised {type(e).__name__}: {e}") from e
    print(f"test_random_bad_input_raises_typed_errors: {ran} of 600 calls ran")


# --- Random bad arguments ----------------------------------------------------------------------------

def _odd_values(rng, d):
    """Values of every kind an argument might wrongly get (and some right ones)."""
    r = lambda *s, dt=F16: randn(rng, s, dt)  # noqa: E731
    return [None, 0, 1, -1, 2**31, 2**63, -2**63, 1.5, float("nan"), float("inf"), -0.0, True, "x", b"x", [], (),
            [1, 2], (1, 2), (1, 2, 3), (-5, -5), (2**40, -2**40), np.int32(3), np.float32(0.5), np.array(3),
            np.array([]), np.zeros((0,), np.int32), np.zeros((2,), np.int32), np.array([0, 3, 8], np.int64),
            np.array([-1, 3, 8], np.int32), np.array([0, 9, 8], np.int32), np.array([0, 2**31 - 1], np.int32),
            np.zeros((3, 3), np.int32), np.full((2,), 2**30, np.int32), np.zeros(4, np.float32),
            np.full(4, np.nan, np.float32), np.full((2, 2), 99, np.int32), r(2, 8, 4, d), r(8, 4, d), r(2, 8, 4, 40),
            r(2, 8, 4, d, dt=np.float32), r(2, 12, 2, d)[:, ::-1], r(1, 1, 1, 1), r(0, 0, 0, 0), r(2, 8, 3, 4, d),
            np.zeros((2, 8, 4, d), F16)[..., ::2], np.zeros((2, 8, 4, d), F16)[:, :, :1].repeat(4, 2), object(), {}]


@pytest.mark.parametrize("d", [64, 40])
def test_random_bad_arguments_raise_typed_errors(d):
    """Every entry point with one or two arguments replaced by odd values (wrong types, shapes, dtypes,
    lengths, strides; at a head dim with kernels and at one that runs padded) either runs or raises
    TypeError / ValueError / NotImplementedError: never another exception, nor the native layer's
    internal error (a Rust panic)."""
    import inspect
    seed, rng = new_rng("test_random_bad_arguments_raise_typed_errors")
    r = lambda *s: randn(rng, s)  # noqa: E731
    cu = np.array([0, 3, 8], np.int32)
    q, k, v = r(2, 8, 4, d), r(2, 12, 2, d), r(2, 12, 2, d)
    qp, kp, vp = r(8, 4, d), r(8, 2, d), r(8, 2, d)
    out, lse, _ = fa.flash_attn_func(q, k, v, return_attn_probs=True)
    outp, lsep, _ = fa.flash_attn_varlen_func(qp, kp, vp, cu, cu, 5, 5, return_attn_probs=True)
    entries = {
        "flash_attn_func": dict(q=q, k=k, v=v),
        "flash_attn_kvpacked_func": dict(q=q, kv=r(2, 12, 2, 2, d)),
        "flash_attn_qkvpacked_func": dict(qkv=r(2, 8, 3, 4, d)),
        "flash_attn_varlen_func": dict(q=qp, k=kp, v=vp, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5,
                                       max_seqlen_k=5),
        "flash_attn_varlen_qkvpacked_func": dict(qkv=r(8, 3, 4, d), cu_seqlens=cu, max_seqlen=5),
        "flash_attn_with_kvcache": dict(q=r(2, 1, 4, d), k_cache=r(2, 16, 2, d), v_cache=r(2, 16, 2, d),
                                        k=r(2, 1, 2, d), v=r(2, 1, 2, d), cache_seqlens=np.array([3, 5], np.int32)),
        "fwd": dict(q=q, k=k, v=v),
        "varlen_fwd": dict(q=qp, k=kp, v=vp, cu_seqlens_q=cu, cu_seqlens_k=cu),
        "bwd": dict(dout=r(2, 8, 4, d), q=q, k=k, v=v, out=out, softmax_lse=lse),
        "varlen_bwd": dict(dout=r(8, 4, d), q=qp, k=kp, v=vp, out=outp, softmax_lse=lsep, cu_seqlens_q=cu,
                           cu_seqlens_k=cu),
    }
    odd = _odd_values(rng, d)
    calls = 0
    for name, base in entries.items():
        fn = getattr(fa, name)
        params = [p for p in inspect.signature(fn).parameters if p != "gen"]
        for _ in range(150):
            kw = {n: (x.copy() if isinstance(x, np.ndarray) else x) for n, x in base.items()}
            changed = {}
            for _ in range(int(rng.integers(1, 3))):
                p = params[int(rng.integers(len(params)))]
                kw[p] = changed[p] = odd[int(rng.integers(len(odd)))]
            calls += 1
            what = f"seed {seed}: {name}({', '.join(f'{p}={type(x).__name__}' for p, x in changed.items())})"
            try:
                fn(**kw)
            except (TypeError, ValueError, NotImplementedError) as e:
                assert "internal error" not in str(e) and "panick" not in str(e), f"{what}: {e}"
            except MemoryError:
                pass
            except Exception as e:  # noqa: BLE001
                raise AssertionError(f"{what}: untyped {type(e).__name__}: {e}") from e
    assert calls == 150 * len(entries)


def test_sdpa_needs_torch():
    """scaled_dot_product_attention (PyTorch's SDPA on these kernels) is torch-only: without torch (this
    CI's venv, or FLASH_ATTN_RS_NO_TORCH) it raises TypeError naming what it needs, for numpy arrays too."""
    if fa._torch is not None:
        pytest.skip("torch importable here: tests/python/gpu_check.py covers the function")
    seed, rng = new_rng("test_sdpa_needs_torch")
    q = randn(rng, (1, 2, 5, 64))
    with pytest.raises(TypeError, match="needs torch"):
        fa.scaled_dot_product_attention(q, q, q)
    assert "scaled_dot_product_attention" in fa.__all__


def test_packed_functions_name_their_own_arguments():
    """Errors of the packed functions name qkv / kv, cu_seqlens and max_seqlen (their arguments), not the q,
    k, v, cu_seqlens_q / _k and max_seqlen_q / _k the library checks; q keeps its name beside kv."""
    seed, rng = new_rng("test_packed_functions_name_their_own_arguments")
    b, s, h, d = 2, int(rng.integers(3, 40)), 2, 64
    q = randn(rng, (b, s, h, d))
    qkv32 = rng.standard_normal((b, s, 3, h, d)).astype(np.float32)
    kv32 = rng.standard_normal((b, s, 2, h, d)).astype(np.float32)
    cu = np.array([0, s, 2 * s], np.int32)
    cases = [
        (lambda: fa.flash_attn_qkvpacked_func(qkv32), "qkv:"),
        (lambda: fa.flash_attn_kvpacked_func(q, kv32), "kv:"),
        (lambda: fa.flash_attn_kvpacked_func(q.astype(np.float32), randn(rng, (b, s, 2, h, d))), "q:"),
        (lambda: fa.flash_attn_varlen_qkvpacked_func(randn(rng, (2 * s, 3, h, d)), cu[::-1].copy(), s),
         "cu_seqlens:"),
        (lambda: fa.flash_attn_varlen_qkvpacked_func(randn(rng, (2 * s, 3, h, d)), cu, -1), "max_seqlen:"),
        (lambda: fa.flash_attn_varlen_kvpacked_func(q.reshape(-1, h, d), kv32.reshape(-1, 2, h, d), cu, cu, s, s),
         "kv:"),
    ]
    for call, want in cases:
        with pytest.raises((TypeError, ValueError)) as e:
            call()
        msg = str(e.value)
        assert want in msg, f"seed {seed}: {msg!r} should name {want}"
        for lib in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"):
            assert lib not in msg, f"seed {seed}: {msg!r} names {lib}"
