"""The numpy path: arrays in host memory, run by the library's CPU path.

numpy has no bfloat16: float16 arrays run as f16, and ml_dtypes' bfloat16 arrays (if that package is
installed) as bf16. Outputs are new numpy arrays (out in q's dtype, lse float32); arrays whose layout the
library cannot take (negative or unaligned strides, a head dim that is not contiguous, foreign byte order)
are copied first, as flash-attn copies tensors whose last dimension is not contiguous.
"""

import numpy as np

from . import _common, _native
from ._common import PACK_KV, PACK_NONE, PACK_QKV

_FLOAT = "float16 or bfloat16"


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
    # A dimension of extent 1 may have any stride in numpy (even a negative one): give it the one a
    # contiguous array would have.
    strides, run = [], 1
    for n, s in zip(reversed(a.shape), reversed(a.strides)):
        strides.append(run if n == 1 else s // item)
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
    if a.dtype != dtype:
        raise TypeError(f"{name}: dtype {a.dtype} does not match q's dtype {dtype}")
    if a.dtype.isnative and _layout_ok(a):
        return a, False
    return np.empty(shape, dtype), True


def _lens(lens):
    cu_q, cu_k, max_q, max_k, used_q, used_k = lens
    names = ("cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k")
    arrays = [None if t is None else _array(t, n, "int32") for n, t in zip(names, (cu_q, cu_k, used_q, used_k))]
    descs = [None if t is None else _desc(t, n, "int32") for n, t in zip(names, arrays)]
    max_q, max_k = _common.index(max_q, "max_seqlen_q"), _common.index(max_k, "max_seqlen_k")
    return arrays, (descs[0], descs[1], max_q, max_k, descs[2], descs[3])


def _pad(a, dp):
    d = a.shape[-1]
    if d == dp:
        return a
    p = np.zeros(a.shape[:-1] + (dp,), a.dtype)
    p[..., :d] = a
    return p


def _split(q, k, v, pack):
    if pack == PACK_QKV:
        return q[..., 0, :, :], q[..., 1, :, :], q[..., 2, :, :]
    if pack == PACK_KV:
        return q, k[..., 0, :, :], k[..., 1, :, :]
    return q, k, v


def attention(pack, q, k, v, lens, o):
    """flash_attn_*_func on numpy arrays: returns (out, lse)."""
    varlen = lens is not None
    rank = 3 if varlen else 4
    if pack == PACK_QKV:
        q = _array(q, "qkv")
        _common.check_packed(q, "qkv", 3, rank + 1)
        d, inputs = q.shape[-1], [q]
    elif pack == PACK_KV:
        q, k = _array(q, "q"), _array(k, "kv")
        _common.check_rank(q, "q", rank)
        _common.check_packed(k, "kv", 2, rank + 1)
        d, inputs = q.shape[-1], [q, k]
        _common.check_head_dims(d, [("kv", k)])
    else:
        q, k, v = _array(q, "q"), _array(k, "k"), _array(v, "v")
        for name, t in (("q", q), ("k", k), ("v", v)):
            _common.check_rank(t, name, rank)
        d, inputs = q.shape[-1], [q, k, v]
        _common.check_head_dims(d, [("k", k), ("v", v)])
    scale = o.softmax_scale if o.softmax_scale is not None else d ** -0.5
    dp = _common.padded_head_dim(d, "q")
    inputs = [_pad(t, dp) for t in inputs] + [None] * (3 - len(inputs))
    q, k, v = _split(*inputs, pack)
    out = np.empty(q.shape, q.dtype)
    lse_shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    lse = np.empty(lse_shape, np.float32)
    _run_fwd(q, k, v, out, lse, lens, scale, o)
    return (out[..., :d] if dp != d else out), lse


def _run_fwd(q, k, v, out, lse, lens, scale, o):
    args = (_desc(q, "q"), _desc(k, "k"), _desc(v, "v"), _desc(out, "out"), _desc(lse, "lse", "float32"))
    tail = (scale, o.causal, o.window_left, o.window_right, o.softcap, "cpu")
    if lens is None:
        _native.fwd(*args, *tail)
    else:
        keep, (cu_q, cu_k, max_q, max_k, used_q, used_k) = _lens(lens)
        _native.varlen_fwd(*args, cu_q, cu_k, max_q, max_k, used_q, used_k, *tail)
        del keep


def fwd(q, k, v, out, lens, scale, o):
    """The hub's fwd / varlen_fwd: no padding, optional caller's out; returns [out, lse, None, None]."""
    q, k, v = _array(q, "q"), _array(k, "k"), _array(v, "v")
    varlen = lens is not None
    for name, t in (("q", q), ("k", k), ("v", v)):
        _common.check_rank(t, name, 3 if varlen else 4)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if out is None:
        target, copy_back = np.empty(q.shape, q.dtype), False
    else:
        target, copy_back = _output(out, "out", q.shape, q.dtype)
    lse_shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    lse = np.empty(lse_shape, np.float32)
    _run_fwd(q, k, v, target, lse, lens, scale, o)
    if copy_back:
        out[...] = target
    return [target if out is None else out, lse, None, None]


def bwd(dout, q, k, v, out, lse, dq, dk, dv, lens, scale, o):
    """The hub's bwd / varlen_bwd; returns [dq, dk, dv, None]."""
    q, k, v = _array(q, "q"), _array(k, "k"), _array(v, "v")
    dout, out = _array(dout, "dout"), _array(out, "out")
    lse = _array(lse, "softmax_lse", "float32")
    if not lse.flags.c_contiguous:
        lse = np.ascontiguousarray(lse)
    varlen = lens is not None
    for name, t in (("q", q), ("k", k), ("v", v)):
        _common.check_rank(t, name, 3 if varlen else 4)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    grads = []
    for name, g, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if g is None:
            grads.append((np.empty(like.shape, like.dtype), None))
        else:
            t, copy_back = _output(g, name, like.shape, q.dtype)
            grads.append((t, g if copy_back else None))
    (tq, _), (tk, _), (tv, _) = grads
    args = (_desc(dout, "dout"), _desc(q, "q"), _desc(k, "k"), _desc(v, "v"), _desc(out, "out"),
            _desc(lse, "softmax_lse", "float32"), _desc(tq, "dq"), _desc(tk, "dk"), _desc(tv, "dv"))
    tail = (scale, o.causal, o.window_left, o.window_right, o.softcap, o.deterministic, None, "cpu")
    if lens is None:
        _native.bwd(*args, *tail)
    else:
        keep, (cu_q, cu_k, max_q, max_k, used_q, used_k) = _lens(lens)
        _native.varlen_bwd(*args, cu_q, cu_k, max_q, max_k, used_q, used_k, *tail)
        del keep
    result = []
    for (t, user), given in zip(grads, (dq, dk, dv)):
        if user is not None:
            user[...] = t
        result.append(t if given is None else given)
    return result + [None]
