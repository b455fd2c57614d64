"""The PyTorch path: tensors used in place, on CUDA (the kernels, on the current stream) or the CPU.

Custom ops (namespace `flash_attn_rs`), so that torch.compile(fullgraph=True) traces the public
functions without graph breaks (plain eager calls run the same bodies without the ops' dispatch, see
`_eager`):

- `fwd`: the forward of every flash_attn_*_func (dense or varlen; q, k, v separate, kv packed or qkv
  packed), returning new out and lse, with its backward registered (`register_autograd`): it reads the
  saved out and lse and writes the gradients of packed inputs into one packed buffer, as flash-attn does.
- `fwd_into`: the hub's fwd / varlen_fwd into a caller's out.
- `bwd`: the backward into dq, dk, dv (mutated in place).
- `fwd_ext` / `bwd_ext`: the same with ALiBi, dropout (its (seed, offset) an int64 [2] CPU tensor) and
  S_dmask; `fwd_paged`: paged K/V, forward only.
- `fwd_kvcache` / `fwd_kvcache_read`: flash_attn_with_kvcache's native call over prepared tensors, with an
  append (k_cache, v_cache mutated) or without; eagerly the same body runs without the ops' dispatch.

Outputs and the backward's workspace come from torch.empty on q's device (so from PyTorch's caching
allocator, and from a graph's private pool while capturing a CUDA graph); the kernels are queued on
`torch.cuda.current_stream(device)`; nothing synchronizes. The library needs every row of q, k, v, out
and the gradients 16-byte aligned on CUDA: an input that is not (a view at an odd offset, say) is copied,
and a caller's output that is not is written through a temporary.
"""

import functools
import math
import numbers
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _common, _native
from ._common import PACK_KV, PACK_NONE, PACK_QKV

_DTYPES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.int32: "i32"}
_FLOAT = "torch.float16 or torch.bfloat16"
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


# --- Real tensors (inside the ops) -------------------------------------------------------------------

def _desc(t, name, expected=_FLOAT):
    """The native module's view of `t`: (address, dtype, shape, element strides)."""
    dt = _DTYPES.get(t.dtype)
    if dt is None:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported here, expected {expected}")
    shape, strides = tuple(t.shape), t.stride()
    if shape and shape[-1] == 1 and strides[-1] != 1:
        # Any stride will do for a dimension of extent 1, but the library wants the last one to be 1.
        strides = strides[:-1] + (1,)
    return (t.data_ptr(), dt, shape, strides)


def _device(q):
    """The native module's device argument for q's device."""
    dev = q.device
    if dev.type == "cuda":
        stream = _raw_stream(dev.index) if _raw_stream is not None else torch.cuda.current_stream(dev).cuda_stream
        return ("cuda", dev.index, stream)
    if dev.type == "cpu":
        return "cpu"
    raise ValueError(f"q: device {dev} is not supported (cpu or cuda)")


def _on_device(q, call, *args, **kwargs):
    """Runs a native call with q's device current, so that binding its context leaves PyTorch's current
    device as it was."""
    if q.device.type == "cuda" and q.device.index != torch.cuda.current_device():
        with torch.cuda.device(q.device):
            return call(*args, **kwargs)
    return call(*args, **kwargs)


def _same_device(q, named):
    for name, t in named:
        if t is not None and t.device != q.device:
            raise ValueError(f"{name}: is on {t.device} but q is on {q.device}")


def _rows_aligned(t):
    """The library's layout: head dim contiguous and, on CUDA, every row 16-byte aligned."""
    if t.ndim == 0:
        return True  # the library's rank check names it
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return False
    if not t.is_cuda:
        return True
    es = t.element_size()
    if t.data_ptr() % 16:
        return False
    return all(n <= 1 or (s * es) % 16 == 0 for n, s in zip(t.shape[:-1], t.stride()[:-1]))


def _input(t):
    return t if t is None or _rows_aligned(t) else t.clone(memory_format=torch.contiguous_format)


def _lse_input(t):
    return t if t.is_contiguous() else t.contiguous()


def _split(q, k, v, pack):
    """q, k, v as views of the packed tensors (the packing axis is third from last in every layout)."""
    if pack == PACK_QKV:
        return q.select(-3, 0), q.select(-3, 1), q.select(-3, 2)
    if pack == PACK_KV:
        return q, k.select(-3, 0), k.select(-3, 1)
    return q, k, v


def _lse_shape(q, varlen):
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def _varlen_descs(q, cu_q, cu_k, used_q, used_k):
    named = (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k), ("seqused_q", used_q), ("seqused_k", used_k))
    _same_device(q, named)
    return [None if t is None else _desc(t, n, "torch.int32") for n, t in named]


def _launch_fwd(q, k, v, out, lse, cu_q, cu_k, used_q, used_k, max_q, max_k, scale, causal, wl, wr, softcap,
                extras=None):
    _same_device(q, (("k", k), ("v", v), ("out", out), ("lse", lse)))
    q, k, v = _input(q), _input(k), _input(v)
    args = (_desc(q, "q"), _desc(k, "k"), _desc(v, "v"), _desc(out, "out"), _desc(lse, "lse", "torch.float32"))
    tail = (scale, causal, wl, wr, softcap, _device(q))
    extras = extras or {}
    if cu_q is None and cu_k is None:
        _on_device(q, _native.fwd, *args, *tail, **extras)
    else:
        if cu_q is None or cu_k is None:
            raise ValueError("cu_seqlens_q, cu_seqlens_k: give both or neither")
        d_cu_q, d_cu_k, d_used_q, d_used_k = _varlen_descs(q, cu_q, cu_k, used_q, used_k)
        _on_device(q, _native.varlen_fwd, *args, d_cu_q, d_cu_k, max_q, max_k, d_used_q, d_used_k, *tail, **extras)


def _launch_bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, used_q, used_k, max_q, max_k, scale, causal,
                wl, wr, softcap, deterministic, extras=None):
    _same_device(q, (("dout", dout), ("k", k), ("v", v), ("out", out), ("softmax_lse", lse), ("dq", dq),
                     ("dk", dk), ("dv", dv)))
    dout, q, k, v, out = _input(dout), _input(q), _input(k), _input(v), _input(out)
    lse = _lse_input(lse)
    # Gradients the library cannot write in place go through temporaries.
    targets = [g if _rows_aligned(g) else torch.empty(g.shape, dtype=g.dtype, device=g.device) for g in (dq, dk, dv)]
    device = _device(q)
    workspace = None
    if device != "cpu":
        # The full-speed size (the deterministic mode on Hopper splits dq over copies of its accumulator);
        # malformed shapes are reported by the call itself.
        cu_shape = tuple(getattr(cu_q, "shape", ()))
        sequences = (q.shape[0] if q.dim() else 1) if cu_q is None else (max(cu_shape[0] - 1, 1) if len(cu_shape) == 1 else 1)
        kv_heads = k.shape[-2] if k.dim() >= 2 else 1
        nbytes = _native.bwd_workspace_bytes(tuple(q.shape), deterministic, sequences, kv_heads)
        ws = torch.empty(nbytes, dtype=torch.uint8, device=q.device)
        workspace = (ws.data_ptr(), nbytes)
    args = (_desc(dout, "dout"), _desc(q, "q"), _desc(k, "k"), _desc(v, "v"), _desc(out, "out"),
            _desc(lse, "softmax_lse", "torch.float32"), _desc(targets[0], "dq"), _desc(targets[1], "dk"),
            _desc(targets[2], "dv"))
    tail = (scale, causal, wl, wr, softcap, deterministic, workspace, device)
    extras = extras or {}
    if cu_q is None and cu_k is None:
        _on_device(q, _native.bwd, *args, *tail, **extras)
    else:
        if cu_q is None or cu_k is None:
            raise ValueError("cu_seqlens_q, cu_seqlens_k: give both or neither")
        d_cu_q, d_cu_k, d_used_q, d_used_k = _varlen_descs(q, cu_q, cu_k, used_q, used_k)
        _on_device(q, _native.varlen_bwd, *args, d_cu_q, d_cu_k, max_q, max_k, d_used_q, d_used_k, *tail, **extras)
    for g, t in zip((dq, dk, dv), targets):
        if t is not g:
            g.copy_(t)


# --- The custom ops, and the eager path around them ------------------------------------------------
#
# Each op's body is a plain function; the op wraps it. In plain eager mode (no torch.compile, no tracing or
# dispatch mode, no functorch transform, plain tensors) the public functions call the bodies directly
# (through an autograd.Function where a gradient is needed), skipping the custom ops' Python dispatch:
# about 60 µs a call, 250 µs more with autograd, where the library call itself takes about 10. Everything
# else (torch.compile, torch.export, make_fx, FakeTensor, tensor subclasses) goes through the ops.

def _fwd_body(q: Tensor, k: Optional[Tensor], v: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
              cu_seqlens_k: Optional[Tensor], seqused_q: Optional[Tensor], seqused_k: Optional[Tensor],
              max_seqlen_q: Optional[int], max_seqlen_k: Optional[int], pack: int, softmax_scale: float,
              causal: bool, window_size_left: int, window_size_right: int, softcap: float,
              deterministic: bool) -> Tuple[Tensor, Tensor]:
    qq, kk, vv = _split(q, k, v, pack)
    out = torch.empty(qq.shape, dtype=qq.dtype, device=qq.device)
    lse = torch.empty(_lse_shape(qq, cu_seqlens_q is not None), dtype=torch.float32, device=qq.device)
    _launch_fwd(qq, kk, vv, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q,
                max_seqlen_k, softmax_scale, causal, window_size_left, window_size_right, softcap)
    return out, lse


def _fwd_into_body(q: Tensor, k: Tensor, v: Tensor, out: Tensor, cu_seqlens_q: Optional[Tensor],
                   cu_seqlens_k: Optional[Tensor], seqused_q: Optional[Tensor], seqused_k: Optional[Tensor],
                   max_seqlen_q: Optional[int], max_seqlen_k: Optional[int], softmax_scale: float, causal: bool,
                   window_size_left: int, window_size_right: int, softcap: float) -> Tensor:
    lse = torch.empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32, device=q.device)
    target = out if _rows_aligned(out) else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    _launch_fwd(q, k, v, target, lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q,
                max_seqlen_k, softmax_scale, causal, window_size_left, window_size_right, softcap)
    if target is not out:
        out.copy_(target)
    return lse


def _bwd_body(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor, dq: Tensor,
              dk: Tensor, dv: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
              seqused_q: Optional[Tensor], seqused_k: Optional[Tensor], max_seqlen_q: Optional[int],
              max_seqlen_k: Optional[int], softmax_scale: float, causal: bool, window_size_left: int,
              window_size_right: int, softcap: float, deterministic: bool) -> None:
    _launch_bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
                max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size_left, window_size_right, softcap,
                deterministic)


_fwd = torch.library.custom_op("flash_attn_rs::fwd", _fwd_body, mutates_args=())
_fwd_into = torch.library.custom_op("flash_attn_rs::fwd_into", _fwd_into_body, mutates_args=("out",))
_bwd = torch.library.custom_op("flash_attn_rs::bwd", _bwd_body, mutates_args=("dq", "dk", "dv"))


def _bwd_new_body(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor,
                  cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], seqused_q: Optional[Tensor],
                  seqused_k: Optional[Tensor], max_seqlen_q: Optional[int], max_seqlen_k: Optional[int],
                  softmax_scale: float, causal: bool, window_size_left: int, window_size_right: int, softcap: float,
                  deterministic: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """`bwd` returning new gradients (for torch.func: vmap batches an op that mutates nothing)."""
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    _bwd_body(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
              max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size_left, window_size_right, softcap,
              deterministic)
    return dq, dk, dv


def _grads_like_fake(dout, q, k, v, *args):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


torch.library.custom_op("flash_attn_rs::bwd_new", _bwd_new_body, mutates_args=()).register_fake(_grads_like_fake)


def _packed_grads(pack, dq, dk, dv):
    """New dq, dk, dv in the gradient layout of fwd's differentiable inputs (q, k, v; q, kv; or qkv)."""
    if pack == PACK_QKV:
        return torch.stack([dq, dk, dv], dim=-3), None, None
    if pack == PACK_KV:
        return dq, torch.stack([dk, dv], dim=-3), None
    return dq, dk, dv


@_fwd.register_fake
def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k, pack,
              softmax_scale, causal, window_size_left, window_size_right, softcap, deterministic):
    qq = q.select(-3, 0) if pack == PACK_QKV else q
    out = torch.empty(qq.shape, dtype=qq.dtype, device=qq.device)
    lse = torch.empty(_lse_shape(qq, cu_seqlens_q is not None), dtype=torch.float32, device=qq.device)
    return out, lse


@_fwd_into.register_fake
def _fwd_into_fake(q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k,
                   softmax_scale, causal, window_size_left, window_size_right, softcap):
    return torch.empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32, device=q.device)


@_bwd.register_fake
def _bwd_fake(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
              max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size_left, window_size_right, softcap,
              deterministic):
    return None


#: What differentiating the attention backward's gradients raises (create_graph=True, e.g. a gradient
#: penalty): the backward is not itself differentiable.
_TWICE = ("flash_attn_rs: the attention backward is not differentiable (double backward, as in a gradient "
          "penalty through create_graph=True, is not supported)")


class _TwiceGuard(torch.autograd.Function):
    """The backward's gradients (the last `n` tensors), made to depend on the backward's inputs (the others:
    the saved tensors and the incoming gradients that require grad) through a node that raises `_TWICE`
    when differentiated (`_once`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(n, *tensors):
        return tuple(t.clone() for t in tensors[len(tensors) - n:])

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_TWICE)


def _once(backward):
    """An autograd.Function backward (or an op's registered one) run without grad. Under create_graph=True
    (grad mode on in the backward: a gradient penalty, a nested torch.func.grad) its gradients come out of
    `_TwiceGuard`, connected to q, k, v and dout, so that differentiating them again raises instead of
    treating them as constants and silently leaving this backward's second-order terms out. (torch's
    once_differentiable does this only when an incoming gradient requires grad.)"""
    @functools.wraps(backward)
    def wrapper(ctx, *args):
        with torch.no_grad():
            grads = backward(ctx, *args)
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return grads
        tensors = [g for g in grads if isinstance(g, torch.Tensor)]
        anchors = [t for t in (*ctx.saved_tensors, *args)
                   if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
        if not tensors or not anchors:
            return grads
        it = iter(_TwiceGuard.apply(len(tensors), *anchors, *tensors))
        return tuple(next(it) if isinstance(g, torch.Tensor) else g for g in grads)
    return wrapper


def _backward(saved, params, dout, bwd):
    """The gradients of fwd's differentiable inputs (q, k, v; or q, kv; or qkv, each packed gradient one
    buffer), by `bwd` (the op, or its body on the eager path) from the saved out and lse."""
    q, k, v, cu_q, cu_k, used_q, used_k, out, lse = saved
    max_q, max_k, pack, scale, causal, wl, wr, softcap, det = params
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) if t is not None else None for t in (q, k, v)]
    qq, kk, vv = _split(q, k, v, pack)
    dq, dk, dv = _split(grads[0], grads[1], grads[2], pack)
    bwd(dout, qq, kk, vv, out, lse, dq, dk, dv, cu_q, cu_k, used_q, used_k, max_q, max_k, scale, causal, wl, wr,
        softcap, det)
    return tuple(grads)


def _fwd_setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, used_q, used_k, max_q, max_k, pack, scale, causal, wl, wr, softcap, det) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, cu_q, cu_k, used_q, used_k, out, lse)
    ctx.params = (max_q, max_k, pack, scale, causal, wl, wr, softcap, det)
    # As on the eager path: the LSE carries no gradient (flash-attn drops it too).
    ctx.mark_non_differentiable(lse)


def _fwd_grads(ctx, dout, dlse):
    # dlse is dropped: the LSE is an auxiliary output, as in flash-attn.
    return _backward(ctx.saved_tensors, ctx.params, dout, torch.ops.flash_attn_rs.bwd) + (None,) * 13


_fwd.register_autograd(_once(_fwd_grads), setup_context=_fwd_setup_context)


class _EagerFwd(torch.autograd.Function):
    """The fwd op's autograd on the eager path: the same bodies, without the op dispatch."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, used_q, used_k, max_q, max_k, pack, scale, causal, wl, wr, softcap, det):
        out, lse = _fwd_body(q, k, v, cu_q, cu_k, used_q, used_k, max_q, max_k, pack, scale, causal, wl, wr,
                             softcap, det)
        ctx.save_for_backward(q, k, v, cu_q, cu_k, used_q, used_k, out, lse)
        ctx.params = (max_q, max_k, pack, scale, causal, wl, wr, softcap, det)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @_once
    def backward(ctx, dout, dlse):
        return _backward(ctx.saved_tensors, ctx.params, dout, _bwd_body) + (None,) * 13


_fwd_ad = torch.autograd.forward_ad


def _no_forward_ad(*tensors):
    """Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad's dual tensors) has no rule here: an error,
    where the result would otherwise come back without its tangent (or with a zero one)."""
    if _fwd_ad._current_level < 0:
        return
    for t in tensors:
        if isinstance(t, torch.Tensor) and _fwd_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError("flash_attn_rs: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) "
                                      "is not supported: the kernels have no JVP rule (reverse mode is: backward, "
                                      "torch.autograd.grad, torch.func.grad / vjp)")


_is_grad_tracking = getattr(torch._C._functorch, "is_gradtrackingtensor", lambda t: False)
_is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)
_unwrapped = getattr(torch._C._functorch, "get_unwrapped", None)
_is_batched = getattr(torch._C._functorch, "is_batchedtensor", lambda t: False)


def _some_level(t, holds):
    """Whether `holds(w)` for some level w of tensor `t`'s functorch wrappers."""
    while _is_wrapped(t):
        if holds(t):
            return True
        if _unwrapped is None:  # pragma: no cover - another torch
            return False
        t = _unwrapped(t)
    return False


def _batched(t):
    """Whether tensor `t` is batched by vmap at some level of its functorch wrappers."""
    return _some_level(t, _is_batched)


def _tracks_grad(t):
    """Whether a torch.func grad transform differentiates through tensor `t`: at some level of its functorch
    wrappers, a grad-tracking tensor that requires grad. vmap's batched wrapper hides that (its requires_grad
    is False inside vmap under grad); a tensor made inside the differentiated function is grad-tracking but
    requires no grad (a constant there)."""
    return _some_level(t, lambda w: _is_grad_tracking(w) and w.requires_grad)


def _no_functorch(name):
    """Calls that do not run under torch.func transforms (the hub's ops, paged K/V): an error naming them,
    where a transform would otherwise fail inside torch with a message about data pointers or
    setup_context."""
    if _functorch_active():
        raise NotImplementedError(f"{name}: does not run under torch.func transforms (vmap, grad, jvp, ...); "
                                  "flash_attn_func and the other flash_attn_*_func functions do (reverse mode)")


def _no_slope_grads(alibi):
    """torch.func.grad with respect to alibi_slopes would return zeros (the kernels compute no gradient for
    the slopes): an error instead."""
    if isinstance(alibi, torch.Tensor) and _functorch_active() and _tracks_grad(alibi):
        raise NotImplementedError("alibi_slopes: gradients with respect to the slopes are not computed "
                                  "(torch.func.grad would return zeros for them)")


#: Set to False to send every call through the custom ops (tests compare the two paths).
EAGER_FAST_PATH = True
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager(*tensors):
    """Whether a call may skip the custom ops: plain eager mode on plain tensors."""
    if not EAGER_FAST_PATH or torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active() or torch._C._len_torch_dispatch_stack():
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def _func_fwd_grads(ctx, dout, dlse):
    q, k, v, cu_q, cu_k, used_q, used_k, out, lse = ctx.saved_tensors
    max_q, max_k, pack, scale, causal, wl, wr, softcap, det = ctx.params
    qq, kk, vv = _split(q, k, v, pack)
    grads = torch.ops.flash_attn_rs.bwd_new(dout, qq, kk, vv, out, lse, cu_q, cu_k, used_q, used_k, max_q, max_k,
                                            scale, causal, wl, wr, softcap, det)
    return _packed_grads(pack, *grads) + (None,) * 13


class _FuncFwd(torch.autograd.Function):
    """The fwd op under torch.func transforms (grad, vjp, functional_call under grad): functorch takes only
    autograd.Functions with a separate setup_context, which the op's `register_autograd` does not make. The
    same op, context and backward (the bwd op)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return torch.ops.flash_attn_rs.fwd(*args)

    setup_context = staticmethod(_fwd_setup_context)
    # The functional bwd op, so that vmap over the gradient (per-example gradients, jacrev) batches it.
    backward = staticmethod(_once(_func_fwd_grads))


def _functorch(*tensors):
    """Whether a call runs under a torch.func transform and needs its gradient (not inside torch.compile,
    which traces the custom ops), also where vmap's wrapper hides it (`_tracks_grad`: grad(vmap(f)), where the
    op's own autograd is refused)."""
    return (_functorch_active() and not torch.compiler.is_compiling() and torch.is_grad_enabled()
            and any(t is not None and (t.requires_grad or _tracks_grad(t)) for t in tensors))


def _call_fwd(*args):
    q, k, v, cu_q, cu_k, used_q, used_k = args[:7]
    if not _eager(q, k, v, cu_q, cu_k, used_q, used_k):
        if _functorch(q, k, v):
            return _FuncFwd.apply(*args)
        return torch.ops.flash_attn_rs.fwd(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v)):
        return _EagerFwd.apply(*args)
    return _fwd_body(*args)


def _call_fwd_into(*args):
    return _fwd_into_body(*args) if _eager(*args[:8]) and not args[3].requires_grad else \
        torch.ops.flash_attn_rs.fwd_into(*args)


def _call_bwd(*args):
    return _bwd_body(*args) if _eager(*args[:13]) else torch.ops.flash_attn_rs.bwd(*args)


# --- flash_attn_func's fast path ----------------------------------------------------------------------
#
# The common eager call (plain q, k, v of a kernel's head dim, float16 / bfloat16, head dim contiguous, on
# one device: the CPU, or the current CUDA device; the options in their plain types) in as few Python steps
# as it takes: the options checked inline, out and lse made by one allocation each, the tensors handed to
# the native `fwd_dense` as addresses, shapes and strides (which checks the CUDA row alignment and launches).
# Anything else, and every error, goes the general way (`attention`), which checks and says what is wrong;
# misaligned inputs go through `_fwd_body`, which copies them. Nothing here reads device memory or
# synchronizes.

_HALF = {torch.float16: "f16", torch.bfloat16: "bf16"}
_KERNEL_HEAD_DIMS = frozenset(_common.HEAD_DIMS)
_Tensor, _Parameter = torch.Tensor, torch.nn.Parameter
_empty, _empty_like, _float32, _uint8, _contiguous = (torch.empty, torch.empty_like, torch.float32, torch.uint8,
                                                     torch.contiguous_format)
_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_dispatch_depth = torch._C._len_torch_dispatch_stack
_grad_enabled = torch.is_grad_enabled
_cuda_current = getattr(torch._C, "_cuda_getDevice", None)
_isfinite = math.isfinite
_native_fwd_dense = _native.fwd_dense


def _dense_launch(q, k, v, a, decode=False):
    """The forward of `dense_fast`'s checked call `a` (its `_FastFwd` params): (out, lse). `decode`: a decoding
    step on CUDA, run by `raw::fwd_decode` (the KV cache's decode kernels over k and v in place, no cache lengths
    tensor; the workspace, where one is needed, from PyTorch's allocator: `_decode_call`)."""
    dt, qs, qst, kst, vst, ordinal, stream, scale, causal, wl, wr, softcap, _ = a
    out = _empty_like(q, memory_format=_contiguous)
    lse = _empty(qs[0], qs[2], qs[1], dtype=_float32, device=q.device)
    args = (dt, q.data_ptr(), qs, qst, k.data_ptr(), k.shape, kst, v.data_ptr(), v.shape, vst, out.data_ptr(),
            lse.data_ptr(), scale, causal, wl, wr, softcap, ordinal, stream)
    if (_decode_call(args, q.device) if decode else _native_fwd_dense(*args)):
        # A row of q, k or v is not 16-byte aligned: the general body copies it.
        return _fwd_body(q, k, v, None, None, None, None, 0, 0, PACK_NONE, scale, causal, wl, wr, softcap, a[12])
    return out, lse


# Workspace bytes `_decode_call` last needed per problem (0 for most: blocks that merge their splits
# themselves need none). A size that falls short is asked again, so the key only has to be usually right.
_DECODE_NEED = {}


def _decode_call(args, dev):
    """`fwd_dense`'s decode mode over `_dense_launch`'s `args`, with the workspace it needs: 0, or minus the
    misaligned rows' mask (as `fwd_dense`)."""
    # (ordinal, q's shape, k's shape, causal, window): what the workspace's size depends on.
    key = (args[17], args[2], args[5], args[13], args[14], args[15])
    need = _DECODE_NEED.get(key, 0)

    def run(need):
        ws = _empty(need, dtype=_uint8, device=dev) if need else None
        return _native_fwd_dense(*args, (0 if ws is None else ws.data_ptr(), need))

    r = run(need)
    if r > 0:
        # The bytes this problem needs (it ran nothing): remembered, then given.
        if len(_DECODE_NEED) > 1024:
            _DECODE_NEED.clear()
        _DECODE_NEED[key] = r
        r = run(r)
        if r > 0:  # pragma: no cover - the size depends on the problem only
            raise RuntimeError(f"flash_attn_rs: internal error: the decode path asked for {r} more workspace bytes")
    return r


class _FastFwd(torch.autograd.Function):
    """`_EagerFwd` for `dense_fast`: the same forward and backward, four arguments to apply."""

    @staticmethod
    def forward(ctx, q, k, v, a):
        out, lse = _dense_launch(q, k, v, a)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.a = a
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @_once
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        _, _, _, _, _, _, _, scale, causal, wl, wr, softcap, det = ctx.a
        grads = _backward((q, k, v, None, None, None, None, out, lse),
                          (0, 0, PACK_NONE, scale, causal, wl, wr, softcap, det), dout, _bwd_body)
        return grads + (None,)


# Function.apply without its Python wrapper, which binds no defaults here (no setup_context) and, outside
# functorch transforms (checked), only unwraps dead functorch wrappers: done here for the three tensors.
_unwrap_if_dead = getattr(getattr(torch._C, "_functorch", None), "unwrap_if_dead", None)
try:
    _fast_fwd_apply = super(torch.autograd.Function, _FastFwd).apply if _unwrap_if_dead is not None else None
except AttributeError:  # pragma: no cover - another torch
    _fast_fwd_apply = None


def _plain_options(softmax_scale, causal, window_size, softcap):
    """The fast paths' shared options in their plain types, made canonical as `_common.options` makes them:
    (window left, window right, softcap) with a negative side -1 and softcap at least 0; None where the
    general path must check them."""
    if (type(causal) is not bool or type(softcap) is not float or not _isfinite(softcap)
            or type(window_size) is not tuple or len(window_size) != 2):
        return None
    wl, wr = window_size
    if type(wl) is not int or type(wr) is not int or wl >= 2**62 or wr >= 2**62:
        return None
    if softmax_scale is not None and (type(softmax_scale) is not float or not _isfinite(softmax_scale)):
        return None
    return -1 if wl < 0 else wl, -1 if wr < 0 else wr, max(softcap, 0.0)


def dense_fast(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic):
    """flash_attn_func's (out, lse) for the common call, or None: then `attention` must run."""
    if not EAGER_FAST_PATH or _is_compiling() or _functorch_active() or _dispatch_depth() or _fwd_ad._current_level >= 0:
        return None
    if (type(q) not in _PLAIN or type(k) not in _PLAIN or type(v) not in _PLAIN or alibi_slopes is not None
            or type(deterministic) is not bool or type(dropout_p) is not float or dropout_p != 0.0):
        return None
    plain = _plain_options(softmax_scale, causal, window_size, softcap)
    if plain is None:
        return None
    wl, wr, softcap = plain
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return None
    dt = _HALF.get(q.dtype)
    if dt is None or k.dtype is not q.dtype or v.dtype is not q.dtype:
        return None
    qs = q.shape
    d = qs[3]
    if d not in _KERNEL_HEAD_DIMS or k.shape[3] != d or v.shape[3] != d:
        return None
    qst, kst, vst = q.stride(), k.stride(), v.stride()
    if qst[3] != 1 or kst[3] != 1 or vst[3] != 1:
        return None
    if q.is_cuda:
        ordinal = q.get_device()
        if (not (k.is_cuda and v.is_cuda) or k.get_device() != ordinal or v.get_device() != ordinal
                or _raw_stream is None or _cuda_current is None or _cuda_current() != ordinal):
            return None
        stream = _raw_stream(ordinal)
    elif q.is_cpu and k.is_cpu and v.is_cpu:
        ordinal, stream = -1, 0
    else:
        return None
    a = (dt, qs, qst, kst, vst, ordinal, stream, d ** -0.5 if softmax_scale is None else softmax_scale, causal, wl, wr,
         softcap, deterministic)
    if _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        if _fast_fwd_apply is None:
            return _FastFwd.apply(q, k, v, a)
        return _fast_fwd_apply(_unwrap_if_dead(q), _unwrap_if_dead(k), _unwrap_if_dead(v), a)
    if ordinal >= 0 and _dense_decodes(qs, k.shape, v.shape) and _eager_route_pays(k.shape):
        # A decoding step on CUDA: the KV cache's split-KV decode kernels over k and v as full caches, in
        # place (a row tile per (sequence, head) would leave most of the GPU idle and read each kv head
        # once per q head); the same result up to the rounding of the split keys' merge.
        return _dense_launch(q, k, v, a, decode=True)
    return _dense_launch(q, k, v, a)


_DECODE_ROWS, _DECODE_HEAD_DIMS = _native.DENSE_DECODE_MAX_ROWS, frozenset(_native.DENSE_DECODE_HEAD_DIMS)
# When an eager decoding step runs faster on the KV cache's kernels than on the dense ones (benches/RESULTS.md,
# "KV-cache decode"; py_decode_routes.py on the H200 machine, 2026-12-05): with raw::fwd_decode both paths cost about
# the same host time (18-21 us per call at 256-1k keys, the routed one 0.89-0.96x as fast there), and the dense
# kernel's time grows with the keys of each sequence (one row tile per sequence and head: 31 us at batch 1 and 2k
# keys against the routed call's 27). Hence from 2k keys, or from B * Sk * Hk = 32768 key rows times kv heads
# (where the earlier table had the routed call ahead at every batch).
_EAGER_ROUTE_MIN_SEQ = 2048
_EAGER_ROUTE_MIN_KEYS = 32768


def _eager_route_pays(ks):
    """Whether an eager decoding step on CUDA (k `[B, Sk, Hk, D]`) runs the KV cache's kernels: always while a CUDA
    graph is being captured (replays cost device time only, where they are 1.1-9x faster), else from
    `_EAGER_ROUTE_MIN_SEQ` keys or `_EAGER_ROUTE_MIN_KEYS` key rows times kv heads."""
    return (ks[1] >= _EAGER_ROUTE_MIN_SEQ or ks[0] * ks[1] * ks[2] >= _EAGER_ROUTE_MIN_KEYS
            or torch.cuda.is_current_stream_capturing())


def _dense_decodes(qs, ks, vs):
    """`raw::dense_fwd_decodes` for a dense forward without ALiBi or dropout (q `[B, Sq, Hq, D]`, k, v
    `[B, Sk, Hk, D]`; flash_attn_func's eager route and scaled_dot_product_attention's, which torch.compile
    traces): every size above 0, at most DENSE_DECODE_MAX_ROWS query rows per kv head, a head dim with decode
    kernels. Shapes that do not fit together run the dense path (whose validation names them)."""
    b, sq, hq, d = qs
    return (ks == vs and ks[0] == b and ks[3] == d and 0 < b and 0 < ks[1] < 2**31 and 0 < ks[2] and hq % ks[2] == 0
            and 0 < sq * (hq // ks[2]) <= _DECODE_ROWS and d in _DECODE_HEAD_DIMS)


# --- The public functions' torch path (traced by torch.compile) --------------------------------------

def _tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor (like q), got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name}: must be a dense (strided) tensor, got layout {t.layout}")
    return t


def _maybe_contiguous(t):
    # A 0-dim tensor passes as it is: the library's rank check names it.
    return t.contiguous() if t.ndim and t.stride(-1) != 1 else t


#: The array type this path takes.
ARRAY = torch.Tensor


def _writable(t, name):
    """`t`, an output the package writes in place, outside autograd: not a tensor that requires grad while
    grad is enabled. torch refuses in-place writes to such leaves and `out=` tensors that require grad; into
    a non-leaf the write would be invisible to the graph, whose gradients would then be wrong."""
    if t.requires_grad and torch.is_grad_enabled():
        what = "a leaf tensor that requires grad" if t.is_leaf else "a tensor that requires grad"
        raise ValueError(f"{name}: is {what}; it is written in place, where autograd cannot follow (pass one "
                         f"that does not, or call under torch.no_grad())")
    return t


def _written(*tensors):
    """Marks tensors the native code wrote in place as modified (their version counter), so that autograd
    sees the write as it sees torch's own in-place ops."""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        if t is not None and not t.is_inference():
            torch.autograd.graph.increment_version(t)


def check_output(t, name, like):
    """A caller's output tensor for a result shaped, typed and placed like `like` (raises as the library
    would)."""
    _writable(_tensor(t, name), name)
    if tuple(t.shape) != tuple(like.shape):
        raise ValueError(f"{name}: shape {tuple(t.shape)} must be {tuple(like.shape)} (from q's shape)")
    if t.dtype != like.dtype:
        raise TypeError(f"{name}: dtype {t.dtype} does not match q's dtype {like.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name}: is on {t.device} but q is on {like.device}")
    _common.check_own_memory(t, name, _self_overlaps)


def _check_copied_output(t, name, like, inputs):
    """A caller's output `t` that the package fills from a result of its own (a layout the library cannot
    write in place, or the ALiBi / dropout path): checked as the library checks those it writes (dtype,
    device, every element its own, no element shared with an input or another output among `inputs`), which
    the copy into it would otherwise skip (torch's copy_ into an expanded tensor raises a RuntimeError).
    Unsupported dtypes are left to the call's own error naming them."""
    if like.dtype not in _HALF:
        return
    check_output(t, name, like)
    _common.check_disjoint([(name, t)], [(n, x) for n, x in inputs if n != name and isinstance(x, torch.Tensor)
                                         and x.dtype in _DTYPES and x.device == t.device], overlaps)


def _self_overlaps(t):
    """Whether two elements of tensor `t` share memory, by the library's rule."""
    return _native.overlaps(_desc(t, "t"), None)


def overlaps(a, b):
    """Whether tensors `a` and `b` share an element (the library's rule)."""
    return _native.overlaps(_desc(a, "a"), _desc(b, "b"))


def cut(t, d):
    """`t` with its last dim cut to `d` (a contiguous copy)."""
    return t[..., :d].contiguous()


def assign(dst, src):
    dst.copy_(src)


def _pad(t, dp, name=None):
    """`t` zero-padded to head dim `dp` (`name`: the numpy path's, for its allocation errors; unused here)."""
    d = t.shape[-1]
    return t if d == dp else torch.nn.functional.pad(t, [0, dp - d])


def _seqlen(x, name):
    """A max_seqlen_q / max_seqlen_k: an int (or SymInt), or None (not known: the kernels find each
    sequence in cu_seqlens on the device, and nothing reads it back to the host)."""
    if x is None:
        return None
    if isinstance(x, torch.SymInt):
        return x
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name}: must be an int or None, got {type(x).__name__}")
    return int(x)


def _optional_tensor(t, name):
    return None if t is None else _tensor(t, name)


def _lens(lens):
    cu_q, cu_k, max_q, max_k, used_q, used_k = lens
    return (_tensor(cu_q, "cu_seqlens_q"), _tensor(cu_k, "cu_seqlens_k"), _optional_tensor(used_q, "seqused_q"),
            _optional_tensor(used_k, "seqused_k"), _seqlen(max_q, "max_seqlen_q"), _seqlen(max_k, "max_seqlen_k"))


def attention(pack, q, k, v, lens, o):
    """flash_attn_*_func on tensors: returns (out, lse); differentiable in q, k, v (or kv, qkv)."""
    _no_forward_ad(q, k, v, o.alibi_slopes)
    _no_slope_grads(o.alibi_slopes)
    varlen = lens is not None
    rank = 3 if varlen else 4
    if pack == PACK_QKV:
        _common.check_packed(q, "qkv", 3, rank + 1)
        d = q.shape[-1]
    elif pack == PACK_KV:
        k = _tensor(k, "kv")
        _common.check_rank(q, "q", rank)
        _common.check_packed(k, "kv", 2, rank + 1)
        d = q.shape[-1]
        _common.check_head_dims(d, [("kv", k)])
    else:
        k, v = _tensor(k, "k"), _tensor(v, "v")
        for name, t in (("q", q), ("k", k), ("v", v)):
            _common.check_rank(t, name, rank)
        d = q.shape[-1]
        _common.check_head_dims(d, [("k", k), ("v", v)])
    scale = _common.default_scale(o.softmax_scale, d)
    dp = _common.padded_head_dim(d, "q")
    q = _maybe_contiguous(_pad(q, dp))
    k = None if k is None else _maybe_contiguous(_pad(k, dp))
    v = None if v is None else _maybe_contiguous(_pad(v, dp))
    if varlen:
        cu_q, cu_k, used_q, used_k, max_q, max_k = _lens(lens)
    else:
        cu_q = cu_k = used_q = used_k = None
        max_q = max_k = 0
    if o.extras:
        out, lse, s_dmask = _attention_ext(q, k, v, cu_q, cu_k, used_q, used_k, max_q, max_k, pack, scale, o)
    else:
        out, lse = _call_fwd(q, k, v, cu_q, cu_k, used_q, used_k, max_q, max_k, pack, scale, o.causal,
                             o.window_left, o.window_right, o.softcap, o.deterministic)
        s_dmask = None
    return (out[..., :d] if dp != d else out), lse, s_dmask


def fwd(q, k, v, out, lens, scale, o, gen=None) -> List[Optional[Tensor]]:
    """The hub's fwd / varlen_fwd; returns [out, softmax_lse, S_dmask, rng_state]."""
    _no_functorch("fwd / varlen_fwd")
    _no_forward_ad(q, k, v, out, o.alibi_slopes)
    k, v = _tensor(k, "k"), _tensor(v, "v")
    rank = 3 if lens is not None else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        _common.check_rank(t, name, rank)
    scale = _common.default_scale(scale, q.shape[-1])
    inputs = [("q", q), ("k", k), ("v", v)]  # the caller's tensors (those below may be copies)
    q, k, v = _maybe_contiguous(q), _maybe_contiguous(k), _maybe_contiguous(v)
    if lens is not None:
        cu_q, cu_k, used_q, used_k, max_q, max_k = _lens(lens)
    else:
        cu_q = cu_k = used_q = used_k = None
        max_q = max_k = 0
    given = out
    if out is not None:
        _writable(_tensor(out, "out"), "out")
        if tuple(out.shape) != tuple(q.shape):
            raise ValueError(f"out: shape {tuple(out.shape)} must be {tuple(q.shape)} (from q's shape)")
        if o.extras or not _rows_aligned(out):
            _check_copied_output(out, "out", q, inputs)
    if o.extras:
        if out is not None:
            # Checked as the plain path's native call checks it (this path copies into it).
            check_output(out, "out", q)
        return _hub_fwd_ext(q, k, v, out, cu_q, cu_k, used_q, used_k, max_q, max_k, scale, o, gen)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = _call_fwd_into(q, k, v, out, cu_q, cu_k, used_q, used_k, max_q, max_k, scale, o.causal, o.window_left,
                         o.window_right, o.softcap)
    _written(given)
    return [out, lse, None, None]


# The hub ops' ALiBi / dropout calls go to the native bodies directly (not through the custom ops), which
# hand tensors' addresses to native code: never traced, so under torch.compile they run eagerly, whole,
# on real tensors (traced, a temporary made in the graph, such as a contiguous copy of strided slopes,
# was freed before the native call read it).
@torch.compiler.disable
def _hub_fwd_ext(q, k, v, out, cu_q, cu_k, used_q, used_k, max_q, max_k, scale, o, gen):
    seeds = seed_offset(o, q, gen)
    res, lse, s_dmask = _ext_fwd_body(q, k, v, cu_q, cu_k, used_q, used_k, max_q, max_k, PACK_NONE, scale,
                                      o.causal, o.window_left, o.window_right, o.softcap, o.alibi_slopes,
                                      _common.dropout_arg(o, seeds), o.return_probs)
    if out is None:
        out = res
    else:
        out.copy_(res)
    return [out, lse, s_dmask if o.return_probs else None, _rng_tensor(seeds, q)]


@torch.compiler.disable
def _hub_bwd_ext(args, q, o):
    _launch_bwd(*args, extras=_bwd_extras(o.alibi_slopes, q, _common.dropout_arg(o, o.rng_state)))


def bwd(dout, q, k, v, out, lse, dq, dk, dv, lens, scale, o) -> List[Optional[Tensor]]:
    """The hub's bwd / varlen_bwd; returns [dq, dk, dv, None]."""
    _no_functorch("bwd / varlen_bwd")
    _no_forward_ad(dout, q, k, v, out, lse, dq, dk, dv, o.alibi_slopes)
    k, v, out, lse, dout = _tensor(k, "k"), _tensor(v, "v"), _tensor(out, "out"), _tensor(lse, "softmax_lse"), \
        _tensor(dout, "dout")
    rank = 3 if lens is not None else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        _common.check_rank(t, name, rank)
    scale = _common.default_scale(scale, q.shape[-1])
    if lens is not None:
        cu_q, cu_k, used_q, used_k, max_q, max_k = _lens(lens)
    else:
        cu_q = cu_k = used_q = used_k = None
        max_q = max_k = 0
    grads = []
    for name, g, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if g is None:
            g = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        elif tuple(_writable(_tensor(g, name), name).shape) != tuple(like.shape):
            raise ValueError(f"{name}: shape {tuple(g.shape)} must be {tuple(like.shape)}")
        elif not _rows_aligned(g):
            _check_copied_output(g, name, like, [("dout", dout), ("q", q), ("k", k), ("v", v), ("out", out),
                                                 ("softmax_lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)])
        grads.append(g)
    args = (_maybe_contiguous(dout), _maybe_contiguous(q), _maybe_contiguous(k), _maybe_contiguous(v),
            _maybe_contiguous(out), lse, grads[0], grads[1], grads[2], cu_q, cu_k, used_q, used_k, max_q, max_k,
            scale, o.causal, o.window_left, o.window_right, o.softcap, o.deterministic)
    if o.alibi_slopes is not None or o.dropout_p > 0:
        if o.dropout_p > 0 and o.rng_state is None:
            raise ValueError("rng_state: the forward's rng_state (seed, offset) is needed for a backward with "
                             "p_dropout > 0 (it regenerates the forward's mask)")
        _hub_bwd_ext(args, q, o)
    else:
        _call_bwd(*args)
    _written(dq, dk, dv)
    return grads + [None]


# --- ALiBi, dropout, S_dmask (on the CPU and on CUDA) --------------------------------------------------
#
# The same bodies as above (`_launch_fwd` / `_launch_bwd` with the native call's optional arguments): in
# plain eager mode under an autograd.Function, else through the custom ops `fwd_ext` / `bwd_ext` (so
# torch.compile(fullgraph=True) traces them). The dropout mask is a function of (seed, offset) and the
# positions (flash_attn.dropout), identical on both devices: the backward regenerates it from the
# forward's (p, seed, offset), nothing is stored.

def seed_offset(o, q, gen=None):
    """The dropout (seed, offset) of a call, whatever q's device: the explicit rng_state, else a seed drawn
    from `gen` or torch's default CPU generator (torch.manual_seed replays it; CPU and CUDA tensors given
    the same seed draw the same mask), offset 0. Drawn on the host when the call is made: a captured CUDA
    graph replays the seed of its capture (pass rng_state to choose it)."""
    if o.dropout_p == 0:
        return None
    if o.rng_state is not None:
        return o.rng_state
    if gen is not None and not isinstance(gen, torch.Generator):
        raise TypeError(f"gen: expected a torch.Generator or None, got {type(gen).__name__}")
    device = gen.device if gen is not None else "cpu"
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=gen, dtype=torch.int64, device=device).item())
    return seed, 0


def _rng_tensor(seeds, q):
    if seeds is None:
        return None
    return torch.tensor([s - 2**64 if s >= 2**63 else s for s in seeds], dtype=torch.int64, device=q.device)


def _alibi(alibi, q):
    if alibi is None:
        return None
    alibi = _tensor(alibi, "alibi_slopes")
    _same_device(q, (("alibi_slopes", alibi),))
    return _maybe_contiguous(alibi) if alibi.ndim else alibi


class _Extras(dict):
    """The native calls' keyword arguments for ALiBi / dropout / S_dmask. They carry addresses only, so the
    dict holds the slopes it took one from (a contiguous copy of strided ones) for as long as it lives: the
    whole native call, which it is passed to."""
    keep = None


def _bwd_extras(alibi_slopes, q, dropout):
    """`_Extras` for the slopes (checked against q, made contiguous) and the native dropout argument."""
    extras = _Extras()
    alibi = _alibi(alibi_slopes, q)
    if alibi is not None:
        extras.keep = alibi
        extras["alibi_slopes"] = _desc(alibi, "alibi_slopes", "torch.float32")
    if dropout is not None:
        extras["dropout"] = dropout
    return extras


def _ext_fwd_body(q, k, v, cu_q, cu_k, used_q, used_k, max_q, max_k, pack, scale, causal, wl, wr, softcap, alibi,
                  dropout, want_probs):
    """The forward with ALiBi / dropout / S_dmask: (out, lse, S_dmask, or an empty tensor)."""
    qq, kk, vv = _split(q, k, v, pack)
    out = torch.empty(qq.shape, dtype=qq.dtype, device=qq.device)
    varlen = cu_q is not None
    lse = torch.empty(_lse_shape(qq, varlen), dtype=torch.float32, device=qq.device)
    extras = _bwd_extras(alibi, qq, dropout)
    if want_probs:
        lens = (cu_q, cu_k, max_q, max_k) if varlen else None
        s_dmask = _common.alloc_s_dmask(lambda shape: torch.zeros(shape, dtype=qq.dtype, device=qq.device), qq, lens,
                                        kk)
        extras["s_dmask"] = _desc(s_dmask, "s_dmask")
    else:
        s_dmask = torch.empty(0, dtype=qq.dtype, device=qq.device)
    _launch_fwd(qq, kk, vv, out, lse, cu_q, cu_k, used_q, used_k, max_q, max_k, scale, causal, wl, wr, softcap,
                extras)
    return out, lse, s_dmask


class _ExtFwd(torch.autograd.Function):
    """Autograd of the forward with ALiBi / dropout / S_dmask: the backward gets the same slopes and the same
    (p, seed, offset), so it regenerates the forward's dropout mask."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, used_q, used_k, max_q, max_k, pack, scale, causal, wl, wr, softcap, det,
                alibi, dropout, want_probs):
        out, lse, s_dmask = _ext_fwd_body(q, k, v, cu_q, cu_k, used_q, used_k, max_q, max_k, pack, scale, causal,
                                          wl, wr, softcap, alibi, dropout, want_probs)
        ctx.save_for_backward(q, k, v, cu_q, cu_k, used_q, used_k, out, lse, alibi)
        ctx.params = (max_q, max_k, pack, scale, causal, wl, wr, softcap, det, dropout)
        ctx.mark_non_differentiable(lse, s_dmask)
        return out, lse, s_dmask

    @staticmethod
    @_once
    def backward(ctx, dout, dlse, ds_dmask):
        q, k, v, cu_q, cu_k, used_q, used_k, out, lse, alibi = ctx.saved_tensors
        max_q, max_k, pack, scale, causal, wl, wr, softcap, det, dropout = ctx.params
        grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) if t is not None else None for t in (q, k, v)]
        qq, kk, vv = _split(q, k, v, pack)
        dq, dk, dv = _split(grads[0], grads[1], grads[2], pack)
        extras = _bwd_extras(alibi, qq, dropout)
        _launch_bwd(dout, qq, kk, vv, out, lse, dq, dk, dv, cu_q, cu_k, used_q, used_k, max_q, max_k, scale, causal,
                    wl, wr, softcap, det, extras)
        return tuple(grads) + (None,) * 16


# The same forward and backward as custom ops (`fwd_ext`, `bwd_ext`), for torch.compile / export / tracing:
# the dropout's (seed, offset) travel as an int64 [2] CPU tensor (`rng_state`), read on the host inside
# the ops, so a compiled graph draws its seed with a traceable torch.randint.

def _seeds_of(dropout_p, rng_state):
    """The native dropout argument from an int64 [2] (seed, offset) tensor (two's complement for >= 2^63)."""
    if dropout_p == 0 or rng_state is None:
        return None
    seed, offset = (int(x) for x in rng_state.tolist())
    return dropout_p, seed % 2**64, offset % 2**64


def _fwd_ext_body(q: Tensor, k: Optional[Tensor], v: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
                  cu_seqlens_k: Optional[Tensor], seqused_q: Optional[Tensor], seqused_k: Optional[Tensor],
                  max_seqlen_q: Optional[int], max_seqlen_k: Optional[int], pack: int, softmax_scale: float,
                  causal: bool, window_size_left: int, window_size_right: int, softcap: float, deterministic: bool,
                  alibi_slopes: Optional[Tensor], dropout_p: float, rng_state: Optional[Tensor],
                  return_probs: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _ext_fwd_body(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k, pack,
                         softmax_scale, causal, window_size_left, window_size_right, softcap, alibi_slopes,
                         _seeds_of(dropout_p, rng_state), return_probs)


def _bwd_ext_body(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor, dq: Tensor,
                  dk: Tensor, dv: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                  seqused_q: Optional[Tensor], seqused_k: Optional[Tensor], max_seqlen_q: Optional[int],
                  max_seqlen_k: Optional[int], softmax_scale: float, causal: bool, window_size_left: int,
                  window_size_right: int, softcap: float, deterministic: bool, alibi_slopes: Optional[Tensor],
                  dropout_p: float, rng_state: Optional[Tensor]) -> None:
    extras = _bwd_extras(alibi_slopes, q, _seeds_of(dropout_p, rng_state))
    _launch_bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
                max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size_left, window_size_right, softcap,
                deterministic, extras)


_fwd_ext = torch.library.custom_op("flash_attn_rs::fwd_ext", _fwd_ext_body, mutates_args=())
_bwd_ext = torch.library.custom_op("flash_attn_rs::bwd_ext", _bwd_ext_body, mutates_args=("dq", "dk", "dv"))


def _bwd_ext_new_body(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor,
                      cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], seqused_q: Optional[Tensor],
                      seqused_k: Optional[Tensor], max_seqlen_q: Optional[int], max_seqlen_k: Optional[int],
                      softmax_scale: float, causal: bool, window_size_left: int, window_size_right: int,
                      softcap: float, deterministic: bool, alibi_slopes: Optional[Tensor], dropout_p: float,
                      rng_state: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """`bwd_ext` returning new gradients (as `bwd_new`)."""
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    _bwd_ext_body(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
                  max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size_left, window_size_right, softcap,
                  deterministic, alibi_slopes, dropout_p, rng_state)
    return dq, dk, dv


torch.library.custom_op("flash_attn_rs::bwd_ext_new", _bwd_ext_new_body,
                        mutates_args=()).register_fake(_grads_like_fake)


@_fwd_ext.register_fake
def _fwd_ext_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k, pack,
                  softmax_scale, causal, window_size_left, window_size_right, softcap, deterministic, alibi_slopes,
                  dropout_p, rng_state, return_probs):
    qq, kk, _ = _split(q, k, v, pack)
    varlen = cu_seqlens_q is not None
    out = torch.empty(qq.shape, dtype=qq.dtype, device=qq.device)
    lse = torch.empty(_lse_shape(qq, varlen), dtype=torch.float32, device=qq.device)
    if return_probs:
        lens = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) if varlen else None
        s_dmask = torch.empty(_common.s_dmask_shape(qq, lens, kk), dtype=qq.dtype, device=qq.device)
    else:
        s_dmask = torch.empty(0, dtype=qq.dtype, device=qq.device)
    return out, lse, s_dmask


@_bwd_ext.register_fake
def _bwd_ext_fake(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
                  max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size_left, window_size_right, softcap,
                  deterministic, alibi_slopes, dropout_p, rng_state):
    return None


def _fwd_ext_setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, used_q, used_k, max_q, max_k, pack, scale, causal, wl, wr, softcap, det, alibi, p, rng,
     _) = inputs
    out, lse, s_dmask = output
    ctx.save_for_backward(q, k, v, cu_q, cu_k, used_q, used_k, out, lse, alibi, rng)
    ctx.mark_non_differentiable(lse, s_dmask)
    ctx.params = (max_q, max_k, pack, scale, causal, wl, wr, softcap, det, p)


def _fwd_ext_grads(ctx, dout, dlse, ds_dmask):
    q, k, v, cu_q, cu_k, used_q, used_k, out, lse, alibi, rng = ctx.saved_tensors
    max_q, max_k, pack, scale, causal, wl, wr, softcap, det, p = ctx.params
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) if t is not None else None for t in (q, k, v)]
    qq, kk, vv = _split(q, k, v, pack)
    dq, dk, dv = _split(grads[0], grads[1], grads[2], pack)
    torch.ops.flash_attn_rs.bwd_ext(dout, qq, kk, vv, out, lse, dq, dk, dv, cu_q, cu_k, used_q, used_k, max_q, max_k,
                                    scale, causal, wl, wr, softcap, det, alibi, p, rng)
    return tuple(grads) + (None,) * 17


_fwd_ext.register_autograd(_once(_fwd_ext_grads), setup_context=_fwd_ext_setup_context)


def _func_fwd_ext_grads(ctx, dout, dlse, ds_dmask):
    q, k, v, cu_q, cu_k, used_q, used_k, out, lse, alibi, rng = ctx.saved_tensors
    max_q, max_k, pack, scale, causal, wl, wr, softcap, det, p = ctx.params
    qq, kk, vv = _split(q, k, v, pack)
    grads = torch.ops.flash_attn_rs.bwd_ext_new(dout, qq, kk, vv, out, lse, cu_q, cu_k, used_q, used_k, max_q, max_k,
                                                scale, causal, wl, wr, softcap, det, alibi, p, rng)
    return _packed_grads(pack, *grads) + (None,) * 17


class _FuncFwdExt(torch.autograd.Function):
    """The fwd_ext op under torch.func transforms (as `_FuncFwd`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return torch.ops.flash_attn_rs.fwd_ext(*args)

    setup_context = staticmethod(_fwd_ext_setup_context)
    backward = staticmethod(_once(_func_fwd_ext_grads))


def _rng_state_tensor(o):
    """A traced call's dropout (seed, offset) as an int64 [2] CPU tensor: the explicit rng_state, else a seed
    drawn with torch.randint from the default CPU generator (inside a compiled graph, the graph's own draw),
    offset 0; None without dropout."""
    if o.dropout_p == 0:
        return None
    if o.rng_state is not None:
        return torch.tensor([x - 2**64 if x >= 2**63 else x for x in o.rng_state], dtype=torch.int64)
    seed = torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64)
    return torch.cat([seed, torch.zeros(1, dtype=torch.int64)])


def _attention_ext(q, k, v, cu_q, cu_k, used_q, used_k, max_q, max_k, pack, scale, o):
    alibi = o.alibi_slopes
    if not _eager(q, k, v, cu_q, cu_k, used_q, used_k, alibi if isinstance(alibi, torch.Tensor) else None):
        if alibi is not None:
            alibi = _alibi(alibi, q)
        op = _FuncFwdExt.apply if _functorch(q, k, v) else torch.ops.flash_attn_rs.fwd_ext
        out, lse, s_dmask = op(
            q, k, v, cu_q, cu_k, used_q, used_k, max_q, max_k, pack, scale, o.causal, o.window_left, o.window_right,
            o.softcap, o.deterministic, alibi, float(o.dropout_p), _rng_state_tensor(o), bool(o.return_probs))
        return out, lse, (s_dmask if o.return_probs else None)
    seeds = seed_offset(o, q)
    args = (q, k, v, cu_q, cu_k, used_q, used_k, max_q, max_k, pack, scale, o.causal, o.window_left,
            o.window_right, o.softcap, o.deterministic, o.alibi_slopes, _common.dropout_arg(o, seeds),
            o.return_probs)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v)):
        out, lse, s_dmask = _ExtFwd.apply(*args)
    else:
        out, lse, s_dmask = _ext_fwd_body(*args[:15], *args[16:])
    return out, lse, (s_dmask if o.return_probs else None)


# --- Paged K/V (flash_attn_varlen_func with block_table): a custom op, forward only ------------------------

def _launch_paged(q, k, v, out, lse, cu_q, cu_k, used_q, used_k, table, max_q, max_k, scale, causal, wl, wr, softcap,
                  extras=None):
    _same_device(q, (("k", k), ("v", v), ("out", out), ("lse", lse), ("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k),
                     ("seqused_q", used_q), ("seqused_k", used_k), ("block_table", table)))
    q, k, v = _input(q), _input(k), _input(v)
    idx = [None if t is None else _desc(t, n, "torch.int32") for n, t in
           (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k), ("seqused_q", used_q), ("seqused_k", used_k),
            ("block_table", table))]
    _on_device(q, _native.varlen_fwd_paged, _desc(q, "q"), _desc(k, "k"), _desc(v, "v"), _desc(out, "out"),
               _desc(lse, "lse", "torch.float32"), idx[0], idx[1], max_q, max_k, idx[2], idx[3], idx[4], scale, causal,
               wl, wr, softcap, _device(q), **(extras or {}))


def _paged_body(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Optional[Tensor],
                seqused_q: Optional[Tensor], seqused_k: Optional[Tensor], block_table: Tensor,
                max_seqlen_q: Optional[int], max_seqlen_k: Optional[int], softmax_scale: float, causal: bool,
                window_size_left: int, window_size_right: int, softcap: float) -> Tuple[Tensor, Tensor]:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    _launch_paged(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, block_table, max_seqlen_q,
                  max_seqlen_k, softmax_scale, causal, window_size_left, window_size_right, softcap)
    return out, lse


_fwd_paged = torch.library.custom_op("flash_attn_rs::fwd_paged", _paged_body, mutates_args=())


@_fwd_paged.register_fake
def _fwd_paged_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, block_table, max_seqlen_q,
                    max_seqlen_k, softmax_scale, causal, window_size_left, window_size_right, softcap):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device))


# Paged K/V with ALiBi / dropout / S_dmask: the native body directly, never traced (as `_hub_fwd_ext`).
@torch.compiler.disable
def _paged_ext(q, k, v, cu_q, cu_k, used_q, used_k, block_table, max_q, max_k, scale, o):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    extras = _bwd_extras(o.alibi_slopes, q, _common.dropout_arg(o, seed_offset(o, q)))
    s_dmask = None
    if o.return_probs:
        s_dmask = _common.alloc_s_dmask(lambda shape: torch.zeros(shape, dtype=q.dtype, device=q.device), q,
                                        (cu_q, None, max_q, max_k))
        extras["s_dmask"] = _desc(s_dmask, "s_dmask")
    _launch_paged(q, k, v, out, lse, cu_q, cu_k, used_q, used_k, block_table, max_q, max_k, scale, o.causal,
                  o.window_left, o.window_right, o.softcap, extras)
    return out, lse, s_dmask


def paged(q, k, v, lens, block_table, o):
    """flash_attn_varlen_func with block_table: (out, lse, S_dmask or None); forward only (the op has no
    autograd: a backward through it raises)."""
    _no_functorch("flash_attn_varlen_func with block_table (paged K/V)")
    _no_forward_ad(q, k, v, o.alibi_slopes)
    k, v, block_table = _tensor(k, "k"), _tensor(v, "v"), _tensor(block_table, "block_table")
    _common.check_rank(q, "q", 3)
    _common.check_rank(k, "k", 4)
    _common.check_rank(v, "v", 4)
    d = q.shape[-1]
    _common.check_head_dims(d, [("k", k), ("v", v)])
    scale = _common.default_scale(o.softmax_scale, d)
    dp = _common.padded_head_dim(d, "q")
    q, k, v = (_maybe_contiguous(_pad(t, dp)) for t in (q, k, v))
    cu_q, cu_k, max_q, max_k, used_q, used_k = lens
    cu_q = _tensor(cu_q, "cu_seqlens_q")
    cu_k, used_q, used_k = (_optional_tensor(t, n) for t, n in ((cu_k, "cu_seqlens_k"), (used_q, "seqused_q"),
                                                               (used_k, "seqused_k")))
    max_q, max_k = _seqlen(max_q, "max_seqlen_q"), _seqlen(max_k, "max_seqlen_k")
    block_table = _maybe_contiguous(block_table) if block_table.ndim else block_table
    s_dmask = None
    if o.extras:
        out, lse, s_dmask = _paged_ext(q, k, v, cu_q, cu_k, used_q, used_k, block_table, max_q, max_k, scale, o)
    else:
        args = (q, k, v, cu_q, cu_k, used_q, used_k, block_table, max_q, max_k, scale, o.causal, o.window_left,
                o.window_right, o.softcap)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if _eager(q, k, v, cu_q, cu_k, used_q, used_k, block_table) and not grad:
            out, lse = _paged_body(*args)
        else:
            out, lse = torch.ops.flash_attn_rs.fwd_paged(*args)
    return (out[..., :d] if dp != d else out), lse, s_dmask


def fwd_paged(q, k, v, out, lens, block_table, o, gen=None):
    """The hub's varlen_fwd with block_table: [out, lse, S_dmask, rng_state] (a given `out` checked by the
    hub, `_hub_fwd`)."""
    _no_functorch("varlen_fwd")
    _no_forward_ad(q, k, v, out, o.alibi_slopes)
    seeds = seed_offset(o, q, gen)
    o.rng_state = seeds
    res, lse, s_dmask = paged(q, k, v, lens, block_table, o)
    if out is not None:
        out.copy_(res)
    return [res if out is None else out, lse, s_dmask, _rng_tensor(seeds, q)]


# --- flash_attn_with_kvcache (eager) ------------------------------------------------------------

def _opt_input(t, name):
    """An optional tensor argument with its last dimension contiguous (copied if not)."""
    if t is None:
        return None
    t = _tensor(t, name)
    return _maybe_contiguous(t) if t.ndim else t


# Eagerly the native call directly; under torch.compile the custom op `fwd_kvcache` (declared to write
# k_cache and v_cache), so a compiled decoding step is one graph (CUDA graphs capture it too) and every
# tensor the native call reads (an int cache_seqlens' tensor, padded copies) is one the op was handed.
def kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
            block_table, o, rotary_interleaved, num_splits):
    """flash_attn_with_kvcache on tensors: (out, lse); k and v are written into k_cache and v_cache in
    place."""
    _no_forward_ad(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, o.alibi_slopes)
    if _functorch_active() and any(isinstance(t, torch.Tensor) and _tracks_grad(t)
                                   for t in (q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, o.alibi_slopes)):
        # torch.func.grad would return zeros through a call that has no backward.
        raise NotImplementedError("flash_attn_with_kvcache: has no backward (as flash-attn's); torch.func.grad "
                                  "through it is not supported")
    k_cache, v_cache = _tensor(k_cache, "k_cache"), _tensor(v_cache, "v_cache")
    if (k is not None or v is not None) and _functorch_active() and any(
            isinstance(t, torch.Tensor) and _batched(t) for t in (q, k_cache, v_cache, k, v, rotary_cos, rotary_sin)):
        # vmap has no batching rule for an op that writes its inputs (torch's RuntimeError about out= ops).
        raise NotImplementedError("flash_attn_with_kvcache: appending k and v (written into the caches in place) "
                                  "does not run under torch.func.vmap; call it per example, or without k and v")
    if k is not None or v is not None:
        _writable(k_cache, "k_cache")
        _writable(v_cache, "v_cache")
    given_caches = (k_cache, v_cache)
    _common.check_rank(q, "q", 4)
    q = _maybe_contiguous(q)
    d = q.shape[-1]
    scale = _common.default_scale(o.softmax_scale, d)
    # A head dim without kernels of its own: q, the caches and the new keys zero-padded to the next one
    # (copies of the whole caches, copied back into the caller's when appending), out cut back.
    dp = _common.padded_head_dim(d, "q")
    back = None
    if dp != d and k_cache.ndim == 4 and v_cache.ndim == 4 and k_cache.shape[-1] == d and v_cache.shape[-1] == d:
        _common.check_rotary_dim(rotary_cos, d)
        if k is not None:
            back = (k_cache, v_cache)
        if k is not None and not torch.compiler.is_compiling():
            # The library's checks on the caches it appends to, which it sees only as copies here (by the
            # tensors' addresses: eagerly only).
            _common.check_own_memory(k_cache, "k_cache", _self_overlaps)
            _common.check_own_memory(v_cache, "v_cache", _self_overlaps)
            _common.check_disjoint([("k_cache", k_cache), ("v_cache", v_cache)],
                                   [(n, t) for n, t in (("q", q), ("k", k), ("v", v)) if isinstance(t, ARRAY)],
                                   overlaps)
        q = _pad(q, dp).contiguous()
        k_cache, v_cache = _pad(k_cache, dp).contiguous(), _pad(v_cache, dp).contiguous()
        k, v = (None if t is None else _tensor(t, n) for t, n in ((k, "k"), (v, "v")))
        _common.check_head_dims(d, [(n, t) for n, t in (("k", k), ("v", v)) if t is not None])
        k, v = (None if t is None else _pad(t, dp).contiguous() for t in (k, v))
    named = [("block_table", block_table), ("k", k), ("v", v), ("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin),
             ("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad), ("alibi_slopes", o.alibi_slopes)]
    named = [(n, _opt_input(t, n)) for n, t in named]
    table = named[0][1]
    if cache_seqlens is None or (not isinstance(cache_seqlens, torch.Tensor)):
        if cache_seqlens is None:
            # flash-attn: without cache_seqlens every row's cache is full.
            _common.check_rank(k_cache, "k_cache", 4)
            if table is not None:
                _common.check_rank(table, "block_table", 2)
                n = table.shape[1] * k_cache.shape[1]
            else:
                n = k_cache.shape[1]
        else:
            if isinstance(cache_seqlens, bool) or not _common._is_int(cache_seqlens):
                raise TypeError(f"cache_seqlens: must be an int or an int32 tensor, got {type(cache_seqlens).__name__}")
            n = int(cache_seqlens)
        _common.check_int_cache_seqlens(n, q.shape[0])
        cache_seqlens = torch.full((q.shape[0],), n, dtype=torch.int32, device=q.device)
    args = (q, k_cache, v_cache, cache_seqlens, *(t for _, t in named), scale, o.causal, o.window_left,
            o.window_right, o.softcap, rotary_interleaved, num_splits)
    if not (torch.compiler.is_compiling() or _functorch_active()):
        out, lse = _kvcache_launch(*args)
    else:
        # The op that writes the caches only where there is something to append; without grad (out carries
        # none, as eagerly: the KV cache has no backward).
        op = torch.ops.flash_attn_rs.fwd_kvcache if k is not None else torch.ops.flash_attn_rs.fwd_kvcache_read
        with torch.no_grad():
            out, lse = op(*args)
    if back is not None:
        back[0].copy_(k_cache[..., :d])
        back[1].copy_(v_cache[..., :d])
    elif k is not None:
        _written(*given_caches)
    if out.shape[-1] != d:
        out = out[..., :d].contiguous()
    return out, lse


# --- flash_attn_with_kvcache's fast path ------------------------------------------------------------------
#
# A serving loop's eager call (plain tensors of a kernel's head dim, float16 / bfloat16, on q's device; an
# int32 tensor or an int cache_seqlens; the options in their plain types) in as few Python steps as it takes:
# the checks the native call cannot make (devices, in-place writes into tensors autograd tracks), out and lse
# allocated, the workspace's size remembered per problem shape (it depends on the shapes and options only),
# one native call. Anything else, and every error, goes the general way (`kvcache`).

_KV_NEED = {}
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _kv_desc(t):
    return (t.data_ptr(), _DTYPES[t.dtype], tuple(t.shape), t.stride())


def kvcache_fast(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                 block_table, softmax_scale, causal, window_size, softcap, rotary_interleaved, alibi_slopes,
                 num_splits):
    """flash_attn_with_kvcache's (out, lse) for the common eager call, or None: then `kvcache` must run."""
    if _is_compiling() or _functorch_active() or _dispatch_depth() or _fwd_ad._current_level >= 0:
        return None
    if (type(q) not in _PLAIN or type(k_cache) not in _PLAIN or type(v_cache) not in _PLAIN or alibi_slopes is not None
            or type(rotary_interleaved) is not bool or type(num_splits) is not int or num_splits < 0):
        return None
    plain = _plain_options(softmax_scale, causal, window_size, softcap)
    if plain is None:
        return None
    wl, wr, softcap = plain
    dt = _HALF.get(q.dtype)
    if dt is None or q.ndim != 4 or q.shape[3] not in _KERNEL_HEAD_DIMS or q.stride(3) != 1:
        return None
    dev = q.device
    n = q.shape[0]
    if type(cache_seqlens) is int:
        if not 0 <= cache_seqlens < 2**31 or n >= 2**31:
            return None
        cache_seqlens = torch.full((n,), cache_seqlens, dtype=torch.int32, device=dev)
    elif type(cache_seqlens) not in _PLAIN:
        return None
    optional = (block_table, k, v, rotary_cos, rotary_sin, cache_batch_idx, cache_leftpad)
    for t in (k_cache, v_cache, cache_seqlens, *optional):
        if t is not None and (type(t) not in _PLAIN or t.device != dev or t.dtype not in _DTYPES
                              or (t.ndim and t.stride(-1) != 1)):
            return None
    if k is not None and (k_cache.requires_grad or v_cache.requires_grad) and torch.is_grad_enabled():
        return None  # the general path says why not
    scale = q.shape[3] ** -0.5 if softmax_scale is None else softmax_scale
    out = _empty(q.shape, dtype=q.dtype, device=dev)
    lse = _empty((n, q.shape[2], q.shape[1]), dtype=_float32, device=dev)
    kw = {name: _kv_desc(t) for name, t in zip(("block_table", "k_new", "v_new", "rotary_cos", "rotary_sin",
                                                  "cache_batch_idx", "cache_leftpad"), optional) if t is not None}
    args = (_kv_desc(q), _kv_desc(k_cache), _kv_desc(v_cache), _kv_desc(cache_seqlens), _kv_desc(out), _kv_desc(lse),
            scale, causal, wl, wr, softcap, rotary_interleaved, num_splits, _device(q))
    ran = False
    if dev.type == "cuda":
        key = (dev.index, tuple(q.shape), tuple(k_cache.shape), None if k is None else tuple(k.shape),
               None if block_table is None else tuple(block_table.shape), rotary_cos is not None, causal, wl, wr,
               num_splits)
        need = _KV_NEED.get(key)
        if need is None:
            # Without a workspace the call says how many bytes it needs, or runs when it needs none.
            need = _on_device(q, _native.fwd_kvcache, *args, **kw)
            if len(_KV_NEED) > 1024:
                _KV_NEED.clear()
            _KV_NEED[key] = need
            ran = need == 0
        if need:
            ws = torch.empty(need, dtype=torch.uint8, device=dev)
            kw["workspace"] = (ws.data_ptr(), need)
    if not ran and _on_device(q, _native.fwd_kvcache, *args, **kw):
        return None  # a size the remembered one did not cover (it ran nothing): the general path asks again
    if k is not None:
        _written(k_cache, v_cache)
    return out, lse


def _kvcache_launch(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, block_table: Optional[Tensor],
                    k: Optional[Tensor], v: Optional[Tensor], rotary_cos: Optional[Tensor],
                    rotary_sin: Optional[Tensor], cache_batch_idx: Optional[Tensor], cache_leftpad: Optional[Tensor],
                    alibi_slopes: Optional[Tensor], softmax_scale: float, causal: bool, window_size_left: int,
                    window_size_right: int, softcap: float, rotary_interleaved: bool,
                    num_splits: int) -> Tuple[Tensor, Tensor]:
    """The native KV-cache call over prepared tensors (`kvcache`): new out and lse, the caches appended to
    in place; the CUDA workspace from PyTorch's allocator, on the call's stream."""
    named = [("block_table", block_table), ("k", k), ("v", v), ("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin),
             ("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad), ("alibi_slopes", alibi_slopes)]
    _same_device(q, [("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens)] + named)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
    kw = {("k_new" if n == "k" else "v_new" if n == "v" else n): _desc(t, n, _KVCACHE_EXPECTED.get(n, _FLOAT))
          for n, t in named if t is not None}
    args = (_desc(q, "q"), _desc(k_cache, "k_cache"), _desc(v_cache, "v_cache"),
            _desc(cache_seqlens, "cache_seqlens", "torch.int32"), _desc(out, "out"), _desc(lse, "lse", "torch.float32"),
            softmax_scale, causal, window_size_left, window_size_right, softcap, rotary_interleaved, num_splits,
            _device(q))
    # A call without the workspace it needs (CUDA: q rotated, split-KV's partials) runs nothing and says
    # how many bytes: they come from PyTorch's caching allocator, on the call's stream.
    need = _on_device(q, _native.fwd_kvcache, *args, **kw)
    if need:
        ws = torch.empty(need, dtype=torch.uint8, device=q.device)
        need = _on_device(q, _native.fwd_kvcache, *args, workspace=(ws.data_ptr(), need), **kw)
        assert need == 0, need
    return out, lse


_KVCACHE_EXPECTED = {"block_table": "torch.int32", "cache_batch_idx": "torch.int32", "cache_leftpad": "torch.int32",
                     "alibi_slopes": "torch.float32",
                     "rotary_cos": "torch.float16, torch.bfloat16 or torch.float32",
                     "rotary_sin": "torch.float16, torch.bfloat16 or torch.float32"}

def _kvcache_fake(q, k_cache, v_cache, cache_seqlens, block_table, k, v, rotary_cos, rotary_sin, cache_batch_idx,
                  cache_leftpad, alibi_slopes, softmax_scale, causal, window_size_left, window_size_right, softcap,
                  rotary_interleaved, num_splits):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device))


# Appending (k, v given) writes the caches; without, the call only reads them.
torch.library.custom_op("flash_attn_rs::fwd_kvcache", _kvcache_launch,
                        mutates_args=("k_cache", "v_cache")).register_fake(_kvcache_fake)
torch.library.custom_op("flash_attn_rs::fwd_kvcache_read", _kvcache_launch, mutates_args=()).register_fake(_kvcache_fake)


# --- vmap (torch.func) --------------------------------------------------------------------------------
#
# Batching rules for the functional ops that torch.func reaches (the forward, the functional backwards):
# a dense call's batch entries are independent, so the vmapped dim folds into the batch (examples x batch
# entries in one call; an input without the vmapped dim is repeated per example), and each example's out and
# lse are the bits of its own call (its gradients too, but for the order of the GPU's dq sums, which may
# depend on the batch). A call that does not fold (varlen, seqused, dropout: its keep-mask depends on the
# batch entry) runs once per example, as PyTorch's fallback would, without its warning.

def _vmap_loop(op, out_count):
    """A `register_vmap` rule for `op` that calls it once per example and stacks the results."""
    def rule(info, in_dims, *args):
        outs = [op(*[a if d is None else a.select(d, j) for a, d in zip(args, in_dims)]) for j in range(info.batch_size)]
        return tuple(torch.stack([o[i] for o in outs]) for i in range(out_count)), (0,) * out_count
    return rule


def _vmap_rule(op, tensors, out_count):
    """A `register_vmap` rule for `op`: `tensors` are the positions of its batch-major tensor arguments
    (None allowed), the other tensors (int32 lengths, rng_state) and `alibi_slopes` keep their meaning."""
    named = {a.name: i for i, a in enumerate(op.default._schema.arguments)}
    loop = _vmap_loop(op, out_count)
    lengths = [named[k] for k in ("cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k") if k in named]
    dropout_p, slopes = named.get("dropout_p"), named.get("alibi_slopes")
    # Arguments whose vmapped dim cannot fold (lengths, rng_state, ...): batched, the call runs per example.
    unfolded = [i for i in range(len(named)) if i not in tensors and i != slopes]

    def rule(info, in_dims, *args):
        n = info.batch_size
        first = args[tensors[0]]
        per_rank = first.dim() - (in_dims[tensors[0]] is not None)
        folds = ((dropout_p is None or args[dropout_p] == 0) and per_rank >= 1 and all(args[i] is None for i in lengths)
                 and all(in_dims[i] is None for i in unfolded))
        if not folds:
            return loop(info, in_dims, *args)
        front = lambda x, d: x.movedim(d, 0) if d is not None else x.unsqueeze(0).expand(n, *x.shape)  # noqa: E731
        b = front(first, in_dims[tensors[0]]).shape[1]
        folded = list(args)
        for i in tensors:
            if args[i] is not None:
                x = front(args[i], in_dims[i])
                folded[i] = x.reshape(n * b, *x.shape[2:])
        i = slopes
        if i is not None and args[i] is not None and (in_dims[i] is not None or args[i].dim() == 2):
            x = front(args[i], in_dims[i])  # [n, Hq] or [n, B, Hq]
            if x.dim() == 2:
                x = x.unsqueeze(1).expand(n, b, x.shape[-1])
            folded[i] = x.reshape(n * b, x.shape[-1])
        outs = op(*folded)
        # Every output is batch-major but fwd_ext's empty s_dmask (no return_probs), the same for all.
        empty = [o.dim() == 1 and o.numel() == 0 for o in outs]
        return (tuple(o if e else o.reshape(n, b, *o.shape[1:]) for o, e in zip(outs, empty)),
                tuple(None if e else 0 for e in empty))
    return rule


def _register_vmap_rules():
    if not hasattr(torch.library, "register_vmap"):  # older PyTorch: its per-example fallback
        return
    for name, tensors, outs in (("fwd", (0, 1, 2), 2), ("fwd_ext", (0, 1, 2), 3),
                                ("bwd_new", (0, 1, 2, 3, 4, 5), 3), ("bwd_ext_new", (0, 1, 2, 3, 4, 5), 3)):
        torch.library.register_vmap(f"flash_attn_rs::{name}", _vmap_rule(getattr(torch.ops.flash_attn_rs, name), tensors, outs))
    # KV-cache reads (the op that appends nothing) per example: folding would repeat the caches.
    torch.library.register_vmap("flash_attn_rs::fwd_kvcache_read", _vmap_loop(torch.ops.flash_attn_rs.fwd_kvcache_read, 2))


_register_vmap_rules()
