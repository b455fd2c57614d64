"""The numpy path: arrays in host memory, run by the library's CPU path.

numpy has no bfloat16: float16 arrays run as f16, and ml_dtypes' bfloat16 arrays (if that package is
installed) as bf16. Outputs are new numpy arrays (out in q's dtype, lse float32); arrays whose layout the
library cannot take (negative or unaligned strides, a head dim that is not contiguous, foreign byte order)
are copied first, as flash-attn copies tensors whose last dimension is not contiguous.
"""

import numpy as np

from . import _common, _native
from ._common import PACK_KV, PACK_QKV

_FLOAT = "float16 or bfloat16"


_TOO_HARD = getattr(getattr(np, "exceptions", np), "TooHardError", None) or np.TooHardError


def _dtype_name(a, name, expected):
    dt = a.dtype
    if dt.type is np.float16:
        return "f16"
    if dt.name == "bfloat16" and dt.itemsize == 2:
        return "bf16"
    if dt.type is np.float32:
        return "f32"
    if dt.type is np.int32:
        return "i32"
    raise TypeError(f"{name}: dtype {dt} is not supported here, expected {expected}")


def _array(a, name, expected=_FLOAT):
    """`a` as an array the library can read: checked type and dtype, native byte order, non-negative
    element strides with the last dimension contiguous, element-aligned."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray (like q), got {type(a).__name__}")
    _dtype_name(a, name, expected)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if not _layout_ok(a):
        a = np.array(a, order="C", copy=True)  # a fresh array: aligned, even where `a` was contiguous
    return a


def _layout_ok(a):
    item = a.itemsize
    if a.size == 0:
        return a.flags.c_contiguous
    if a.ctypes.data % item:
        return False
    for n, s in zip(a.shape, a.strides):
        if n != 1 and (s < 0 or s % item):
            return False
    return a.ndim == 0 or a.shape[-1] == 1 or a.strides[-1] == item


def _desc(a, name, expected=_FLOAT):
    """The native module's view of `a`: (address, dtype, shape, element strides)."""
    item = a.itemsize
    # A dimension of extent 1 may have any stride in numpy (even a negative one), and an empty array may
    # have all strides 0: give those the strides a contiguous array would have.
    strides, run = [], 1
    for n, s in zip(reversed(a.shape), reversed(a.strides)):
        strides.append(run if n == 1 or a.size == 0 else s // item)
        run *= n
    return (a.ctypes.data, _dtype_name(a, name, expected), a.shape, tuple(reversed(strides)))


def _output(a, name, shape, dtype):
    """A caller's output array: written in place when the library can take its layout, else through a
    temporary copied back (the second value)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray (like q), got {type(a).__name__}")
    if not a.flags.writeable:
        raise ValueError(f"{name}: is read-only")
    if a.shape != tuple(shape):
        raise ValueError(f"{name}: shape {a.shape} must be {tuple(shape)} (from q's shape)")
    if a.dtype.newbyteorder("=") != dtype:
        raise TypeError(f"{name}: dtype {a.dtype} does not match q's dtype {dtype}")
    if a.dtype.isnative and _layout_ok(a):
        return a, False
    return _empty(shape, dtype, name), True


def _lens(lens):
    cu_q, cu_k, max_q, max_k, used_q, used_k = lens
    names = ("cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k")
    # Both cu_seqlens are required here (only paged K/V, `paged`, takes the key counts from seqused_k alone):
    # a missing one is named as any other argument of the wrong type, not as the native layer's tuple.
    for name, t in zip(names, (cu_q, cu_k)):
        if t is None:
            raise TypeError(f"{name}: expected a numpy.ndarray (int32 [B+1]), got NoneType")
    arrays = [None if t is None else _array(t, n, "int32") for n, t in zip(names, (cu_q, cu_k, used_q, used_k))]
    descs = [None if t is None else _desc(t, n, "int32") for n, t in zip(names, arrays)]
    max_q, max_k = _common.max_seqlen(max_q, "max_seqlen_q"), _common.max_seqlen(max_k, "max_seqlen_k")
    return arrays, (descs[0], descs[1], max_q, max_k, descs[2], descs[3])


#: The array type this path takes.
ARRAY = np.ndarray


def check_output(a, name, like):
    """A caller's output array for a result shaped and typed like `like` (raises as the library would)."""
    _output(a, name, like.shape, like.dtype.newbyteorder("="))
    _common.check_own_memory(a, name, _self_overlaps)


def _check_copied_output(a, name, inputs):
    """A caller's output `a` written through a temporary (a layout the library cannot write in place): checked
    as the library checks those it writes (every element its own; none shared with an input or another output
    among `inputs`), which copying the result into it would otherwise skip."""
    _common.check_own_memory(a, name, _self_overlaps)
    _common.check_disjoint([(name, a)], [(n, x) for n, x in inputs if n != name and isinstance(x, np.ndarray)],
                           overlaps)


def _self_overlaps(a):
    """Whether two elements of float array `a` share memory, by the library's rule (strides of whole
    elements, their signs aside; others are written through a copy)."""
    item = a.itemsize
    return all(st % item == 0 for st in a.strides) and _native.overlaps(
        (0, _dtype_name(a, "a", _FLOAT), a.shape, tuple(abs(st) // item for st in a.strides)), None)


def overlaps(a, b):
    """Whether arrays `a` and `b` share an element (numpy's exact test, any strides; too hard counts as yes)."""
    try:
        return bool(np.shares_memory(a, b, max_work=4096))
    except _TOO_HARD:
        return True


def cut(a, d):
    """`a` with its last dim cut to `d` (a contiguous copy)."""
    return np.ascontiguousarray(a[..., :d])


def _empty(shape, dtype, name, zeros=False):
    """An output (or padded copy) the call allocates. numpy's own MemoryError / ValueError where it cannot
    names no argument: a ValueError naming the input whose shape sets it instead."""
    try:
        return (np.zeros if zeros else np.empty)(shape, dtype)
    except (MemoryError, ValueError):
        raise ValueError(f"{name}: an array of shape {tuple(shape)} ({np.dtype(dtype)}) cannot be allocated "
                         f"(its shape follows from {name}'s)") from None


def assign(dst, src):
    dst[...] = src


def _pad(a, dp, name):
    d = a.shape[-1]
    if d == dp:
        return a
    p = _empty(a.shape[:-1] + (dp,), a.dtype, name, zeros=True)
    p[..., :d] = a
    return p


def _split(q, k, v, pack):
    if pack == PACK_QKV:
        return q[..., 0, :, :], q[..., 1, :, :], q[..., 2, :, :]
    if pack == PACK_KV:
        return q, k[..., 0, :, :], k[..., 1, :, :]
    return q, k, v


def seed_offset(o, gen=None):
    """The dropout (seed, offset) of a call: the explicit rng_state, else a seed drawn from `gen` (a
    numpy.random.Generator) or numpy's global RNG (np.random, so np.random.seed replays it), offset 0."""
    if o.dropout_p == 0:
        return None
    if o.rng_state is not None:
        return o.rng_state
    if gen is None:
        seed = np.random.randint(0, 2**63 - 1, dtype=np.int64)
    elif isinstance(gen, np.random.Generator):
        seed = gen.integers(0, 2**63 - 1, dtype=np.int64)
    else:
        raise TypeError(f"gen: expected a numpy.random.Generator or None, got {type(gen).__name__}")
    return int(seed), 0


def _extras(o, q, lens, k, seeds):
    """The native forward's optional arguments (alibi_slopes, s_dmask, dropout) and the S_dmask array (or
    None). `lens`: the checked varlen tuple (cu_q, cu_k, max_q, max_k, ...) or None."""
    alibi = None if o.alibi_slopes is None else _array(o.alibi_slopes, "alibi_slopes", "float32")
    s_dmask = _common.alloc_s_dmask(lambda shape: np.zeros(shape, q.dtype), q, lens, k) if o.return_probs else None
    kw = {}
    if alibi is not None:
        kw["alibi_slopes"] = _desc(alibi, "alibi_slopes", "float32")
    if s_dmask is not None:
        kw["s_dmask"] = _desc(s_dmask, "s_dmask")
    if o.dropout_p > 0:
        kw["dropout"] = _common.dropout_arg(o, seeds)
    return kw, (alibi, s_dmask)


def attention(pack, q, k, v, lens, o):
    """flash_attn_*_func on numpy arrays: returns (out, lse, S_dmask or None)."""
    varlen = lens is not None
    rank = 3 if varlen else 4
    if pack == PACK_QKV:
        q = _array(q, "qkv")
        _common.check_packed(q, "qkv", 3, rank + 1)
        d, inputs, names = q.shape[-1], [q], ("qkv",)
    elif pack == PACK_KV:
        q, k = _array(q, "q"), _array(k, "kv")
        _common.check_rank(q, "q", rank)
        _common.check_packed(k, "kv", 2, rank + 1)
        d, inputs, names = q.shape[-1], [q, k], ("q", "kv")
        _common.check_head_dims(d, [("kv", k)])
    else:
        q, k, v = _array(q, "q"), _array(k, "k"), _array(v, "v")
        for name, t in (("q", q), ("k", k), ("v", v)):
            _common.check_rank(t, name, rank)
        d, inputs, names = q.shape[-1], [q, k, v], ("q", "k", "v")
        _common.check_head_dims(d, [("k", k), ("v", v)])
    scale = _common.default_scale(o.softmax_scale, d)
    dp = _common.padded_head_dim(d, "q")
    inputs = [_pad(t, dp, n) for t, n in zip(inputs, names)] + [None] * (3 - len(inputs))
    q, k, v = _split(*inputs, pack)
    out = _empty(q.shape, q.dtype, "q")
    lse_shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    lse = _empty(lse_shape, np.float32, "q")
    s_dmask = _run_fwd(q, k, v, out, lse, lens, scale, o, seed_offset(o))
    return (out[..., :d] if dp != d else out), lse, s_dmask


def _run_fwd(q, k, v, out, lse, lens, scale, o, seeds=None):
    """Runs the forward; returns S_dmask (or None)."""
    args = (_desc(q, "q"), _desc(k, "k"), _desc(v, "v"), _desc(out, "out"), _desc(lse, "lse", "float32"))
    tail = (scale, o.causal, o.window_left, o.window_right, o.softcap, "cpu")
    if lens is None:
        kw, keep = _extras(o, q, None, k, seeds)
        _native.fwd(*args, *tail, **kw)
    else:
        keep, (cu_q, cu_k, max_q, max_k, used_q, used_k) = _lens(lens)
        kw, keep2 = _extras(o, q, (keep[0], None, max_q, max_k), k, seeds)
        _native.varlen_fwd(*args, cu_q, cu_k, max_q, max_k, used_q, used_k, *tail, **kw)
        keep = keep2
    return keep[1]


def fwd(q, k, v, out, lens, scale, o, gen=None):
    """The hub's fwd / varlen_fwd: no padding, optional caller's out; returns [out, lse, S_dmask,
    rng_state] (S_dmask with return_softmax, rng_state int64 [seed, offset] with dropout, else None)."""
    given = [("q", q), ("k", k), ("v", v)]  # the caller's arrays (those below may be copies)
    q, k, v = _array(q, "q"), _array(k, "k"), _array(v, "v")
    varlen = lens is not None
    for name, t in (("q", q), ("k", k), ("v", v)):
        _common.check_rank(t, name, 3 if varlen else 4)
    scale = _common.default_scale(scale, q.shape[-1])
    if out is None:
        target, copy_back = _empty(q.shape, q.dtype, "q"), False
    else:
        target, copy_back = _output(out, "out", q.shape, q.dtype)
        if copy_back:
            _check_copied_output(out, "out", given)
    lse_shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    lse = _empty(lse_shape, np.float32, "q")
    seeds = seed_offset(o, gen)
    s_dmask = _run_fwd(q, k, v, target, lse, lens, scale, o, seeds)
    if copy_back:
        out[...] = target
    rng = None if seeds is None else _rng_array(seeds)
    return [target if out is None else out, lse, s_dmask, rng]


def _rng_array(seeds):
    return np.array([s - 2**64 if s >= 2**63 else s for s in seeds], np.int64)


def bwd(dout, q, k, v, out, lse, dq, dk, dv, lens, scale, o):
    """The hub's bwd / varlen_bwd; returns [dq, dk, dv, None]. With dropout, o.rng_state is the forward's."""
    # The caller's arrays (those below may be copies), for the outputs written through temporaries.
    given = [("dout", dout), ("q", q), ("k", k), ("v", v), ("out", out), ("softmax_lse", lse), ("dq", dq), ("dk", dk),
             ("dv", dv)]
    q, k, v = _array(q, "q"), _array(k, "k"), _array(v, "v")
    dout, out = _array(dout, "dout"), _array(out, "out")
    lse = _array(lse, "softmax_lse", "float32")
    if not lse.flags.c_contiguous:
        lse = np.ascontiguousarray(lse)
    varlen = lens is not None
    for name, t in (("q", q), ("k", k), ("v", v)):
        _common.check_rank(t, name, 3 if varlen else 4)
    scale = _common.default_scale(scale, q.shape[-1])
    if o.dropout_p > 0 and o.rng_state is None:
        raise ValueError("rng_state: the forward's rng_state (seed, offset) is needed for a backward with "
                         "p_dropout > 0 (it regenerates the forward's mask)")
    grads = []
    for name, g, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if g is None:
            grads.append((_empty(like.shape, like.dtype, name[1:]), None))
        else:
            t, copy_back = _output(g, name, like.shape, q.dtype)
            if copy_back:
                _check_copied_output(g, name, given)
            grads.append((t, g if copy_back else None))
    (tq, _), (tk, _), (tv, _) = grads
    args = (_desc(dout, "dout"), _desc(q, "q"), _desc(k, "k"), _desc(v, "v"), _desc(out, "out"),
            _desc(lse, "softmax_lse", "float32"), _desc(tq, "dq"), _desc(tk, "dk"), _desc(tv, "dv"))
    tail = (scale, o.causal, o.window_left, o.window_right, o.softcap, o.deterministic, None, "cpu")
    kw, keep_alibi = _bwd_extras(o)
    if lens is None:
        _native.bwd(*args, *tail, **kw)
    else:
        keep, (cu_q, cu_k, max_q, max_k, used_q, used_k) = _lens(lens)
        _native.varlen_bwd(*args, cu_q, cu_k, max_q, max_k, used_q, used_k, *tail, **kw)
        del keep
    del keep_alibi
    result = []
    for (t, user), given in zip(grads, (dq, dk, dv)):
        if user is not None:
            user[...] = t
        result.append(t if given is None else given)
    return result + [None]


def _bwd_extras(o):
    kw, alibi = {}, None
    if o.alibi_slopes is not None:
        alibi = _array(o.alibi_slopes, "alibi_slopes", "float32")
        kw["alibi_slopes"] = _desc(alibi, "alibi_slopes", "float32")
    if o.dropout_p > 0:
        kw["dropout"] = _common.dropout_arg(o, o.rng_state)
    return kw, alibi


def paged(q, k, v, lens, block_table, o):
    """flash_attn_varlen_func with block_table: q `[Tq, H, D]`, k and v `[num_blocks, page_size, Hk, D]`.
    Returns (out, lse, S_dmask or None)."""
    q, k, v = _array(q, "q"), _array(k, "k"), _array(v, "v")
    _common.check_rank(q, "q", 3)
    _common.check_rank(k, "k", 4)
    _common.check_rank(v, "v", 4)
    d = q.shape[-1]
    _common.check_head_dims(d, [("k", k), ("v", v)])
    scale = _common.default_scale(o.softmax_scale, d)
    dp = _common.padded_head_dim(d, "q")
    q, k, v = _pad(q, dp, "q"), _pad(k, dp, "k"), _pad(v, dp, "v")
    cu_q, cu_k, max_q, max_k, used_q, used_k = lens
    names = ("cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k", "block_table")
    arrays = [None if t is None else _array(t, n, "int32")
              for n, t in zip(names, (cu_q, cu_k, used_q, used_k, block_table))]
    if arrays[0] is None:
        raise TypeError("cu_seqlens_q: expected a numpy.ndarray, got NoneType")
    descs = [None if t is None else _desc(t, n, "int32") for n, t in zip(names, arrays)]
    max_q, max_k = _common.max_seqlen(max_q, "max_seqlen_q"), _common.max_seqlen(max_k, "max_seqlen_k")
    out = _empty(q.shape, q.dtype, "q")
    lse = _empty((q.shape[1], q.shape[0]), np.float32, "q")
    kw, keep = _extras(o, q, (arrays[0], None, max_q, max_k), k, seed_offset(o))
    _native.varlen_fwd_paged(_desc(q, "q"), _desc(k, "k"), _desc(v, "v"), _desc(out, "out"),
                             _desc(lse, "lse", "float32"), descs[0], descs[1], max_q, max_k, descs[2], descs[3],
                             descs[4], scale, o.causal, o.window_left, o.window_right, o.softcap, "cpu", **kw)
    return (out[..., :d] if dp != d else out), lse, keep[1]


def _cache(a, name, writable):
    """A caller's cache, used in place where the library can take its layout, else through a copy (written
    back afterwards when `writable`): (array for the library, array to write back into or None)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray (like q), got {type(a).__name__}")
    _dtype_name(a, name, _FLOAT)
    if writable and not a.flags.writeable:
        raise ValueError(f"{name}: is read-only (k and v are appended to it in place)")
    if a.dtype.isnative and _layout_ok(a):
        return a, None
    return _array(a, name), (a if writable else None)


def kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
            block_table, o, rotary_interleaved, num_splits):
    """flash_attn_with_kvcache on numpy arrays: returns (out, lse); k and v are written into the caller's
    k_cache and v_cache."""
    q = _array(q, "q")
    _common.check_rank(q, "q", 4)
    appending = k is not None or v is not None
    kc, kc_back = _cache(k_cache, "k_cache", appending)
    vc, vc_back = _cache(v_cache, "v_cache", appending)
    d = q.shape[-1]
    scale = _common.default_scale(o.softmax_scale, d)
    # A head dim without kernels of its own: q, the caches and the new keys zero-padded to the next one
    # (copies of the whole caches, written back when appending), out cut back.
    dp = _common.padded_head_dim(d, "q")
    if dp != d:
        _common.check_rotary_dim(rotary_cos, d)
        if kc.ndim == 4 and vc.ndim == 4 and kc.shape[-1] == d and vc.shape[-1] == d:
            if appending:
                # The library's checks on the caches it appends to, which it sees only as copies here.
                _common.check_own_memory(k_cache, "k_cache", _self_overlaps)
                _common.check_own_memory(v_cache, "v_cache", _self_overlaps)
                _common.check_disjoint([("k_cache", k_cache), ("v_cache", v_cache)],
                                       [(n, t) for n, t in (("q", q), ("k", k), ("v", v)) if isinstance(t, ARRAY)],
                                       overlaps)
            q = _pad(q, dp, "q")
            kc_back, vc_back = (kc_back if kc_back is not None else kc), (vc_back if vc_back is not None else vc)
            kc, vc = _pad(kc, dp, "k_cache"), _pad(vc, dp, "v_cache")
            k, v = (None if t is None else _array(t, n) for t, n in ((k, "k"), (v, "v")))
            _common.check_head_dims(d, [(n, t) for n, t in (("k", k), ("v", v)) if t is not None])
            k, v = (None if t is None else _pad(t, dp, n) for t, n in ((k, "k"), (v, "v")))
            if not appending:
                kc_back = vc_back = None
    if block_table is not None:
        block_table = _array(block_table, "block_table", "int32")
    if cache_seqlens is None or isinstance(cache_seqlens, (int, np.integer)):
        if isinstance(cache_seqlens, bool):
            raise TypeError("cache_seqlens: must be an int or an int32 array, got bool")
        if cache_seqlens is None:
            # flash-attn: without cache_seqlens every row's cache is full.
            _common.check_rank(kc, "k_cache", 4)
            if block_table is not None:
                _common.check_rank(block_table, "block_table", 2)
                cache_seqlens = block_table.shape[1] * kc.shape[1]
            else:
                cache_seqlens = kc.shape[1]
        n = int(cache_seqlens)
        _common.check_int_cache_seqlens(n, q.shape[0])
        cache_seqlens = _empty((q.shape[0],), np.int32, "q")
        cache_seqlens[...] = n
    opt = {}
    keep = []
    for name, t, expected in (("block_table", block_table, "int32"), ("k_new", k, _FLOAT), ("v_new", v, _FLOAT),
                              ("rotary_cos", rotary_cos, "float16, bfloat16 or float32"),
                              ("rotary_sin", rotary_sin, "float16, bfloat16 or float32"),
                              ("cache_batch_idx", cache_batch_idx, "int32"), ("cache_leftpad", cache_leftpad, "int32"),
                              ("alibi_slopes", o.alibi_slopes, "float32")):
        if t is not None:
            label = name[0] if name in ("k_new", "v_new") else name
            a = _array(t, label, expected)
            keep.append(a)
            opt[name] = _desc(a, label, expected)
    seqlens = _array(cache_seqlens, "cache_seqlens", "int32")
    out = _empty(q.shape, q.dtype, "q")
    lse = _empty((q.shape[0], q.shape[2], q.shape[1]), np.float32, "q")
    _native.fwd_kvcache(_desc(q, "q"), _desc(kc, "k_cache"), _desc(vc, "v_cache"),
                        _desc(seqlens, "cache_seqlens", "int32"), _desc(out, "out"), _desc(lse, "lse", "float32"),
                        scale, o.causal, o.window_left, o.window_right, o.softcap, rotary_interleaved, num_splits,
                        "cpu", **opt)
    if kc_back is not None:
        kc_back[...] = kc[..., :kc_back.shape[-1]]
    if vc_back is not None:
        vc_back[...] = vc[..., :vc_back.shape[-1]]
    if out.shape[-1] != d:
        out = np.ascontiguousarray(out[..., :d])
    return out, lse


def fwd_paged(q, k, v, out, lens, block_table, o, gen=None):
    """The hub's varlen_fwd with block_table: [out, lse, S_dmask, rng_state] as `fwd` (a given `out` checked
    by the hub, `_hub_fwd`)."""
    seeds = seed_offset(o, gen)
    o.rng_state = seeds
    res, lse, s_dmask = paged(q, k, v, lens, block_table, o)
    if out is not None:
        out[...] = res
    return [res if out is None else out, lse, s_dmask, None if seeds is None else _rng_array(seeds)]
