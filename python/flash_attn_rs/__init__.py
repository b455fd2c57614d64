"""flash_attn_rs: FlashAttention with kernels written in Rust (compiled to PTX), behind flash-attn 2's
Python API.

    from flash_attn_rs import flash_attn_func, flash_attn_varlen_func
    out = flash_attn_func(q, k, v, causal=True)               # q [B, Sq, H, D], k/v [B, Sk, Hk, D]
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)

The flash_attn_*_func functions and flash_attn_with_kvcache take flash-attn 2.8's arguments, defaults and
layouts and return what it returns (with `return_attn_probs=True`: `(out, softmax_lse, S_dmask)`, S_dmask
None unless dropout_p > 0); `flash_attn_varlen_func` also takes `seqused_q` / `seqused_k` (int32 `[B]`:
only the first `seqused[b]` rows of slot b are real) and `block_table` (paged K/V), and every varlen
function takes max_seqlen_q / max_seqlen_k None (not known: nothing reads cu_seqlens on the host; needed
only to size S_dmask). `fwd`, `varlen_fwd`, `bwd` and `varlen_bwd` are the kernels hub's low-level
functions (flash-attn's C++ ops), returning lists whose first entries are out and softmax_lse (dq, dk, dv
for the backward).

- PyTorch tensors: CUDA tensors (float16 / bfloat16) run the GPU kernels on the current stream, in place,
  without synchronizing; CPU tensors run the CPU path. Differentiable (the backward reads the saved out
  and lse; `deterministic=True` gives bitwise-reproducible gradients), traceable by
  `torch.compile(fullgraph=True)`, capturable in CUDA graphs.
- numpy arrays (no torch needed): the CPU path on float16 arrays (or ml_dtypes' bfloat16), returning
  numpy arrays (softmax_lse float32).

Dropout (`dropout_p > 0`), `alibi_slopes` and the attention probabilities (S_dmask) run on both CPU and
CUDA tensors, and so do paged K/V (`block_table`) and flash_attn_with_kvcache (its CUDA workspace, for
q rotated and split-KV's partials, comes from PyTorch's caching allocator). Not implemented anywhere: the
hub's `leftpad_k`. Dropout's (seed, offset): the keyword-only `rng_state=(seed, offset)` of the
flash_attn_*_func functions, else a seed drawn from torch's default CPU generator (torch tensors on either
device: torch.manual_seed replays it) or numpy's global RNG (np.random.seed), offset 0; the mask is the
same on both devices for the same (seed, offset), and the backward (autograd, or the hub's bwd given fwd's
rng_state) regenerates it. ALiBi, dropout and S_dmask go through custom ops of their own (fwd_ext, bwd_ext),
which torch.compile traces (the seed is then the compiled graph's own draw unless rng_state is given); a
captured CUDA graph replays the seed drawn at capture.
Head dims up to 256 (32, 64, 96, 128, 192 and 256 directly, others zero-padded to the next of these: in
flash_attn_with_kvcache that copies the whole caches each call, and back into the caller's when appending).
Bad arguments raise TypeError, ValueError or RuntimeError (CUDA) naming the argument.

scaled_dot_product_attention: torch.nn.functional.scaled_dot_product_attention's arguments and layout on
these kernels (torch tensors; boolean key-padding masks too), handing what they do not cover (other masks,
float32, ...) to PyTorch's own.

flash_attn_rs.hf: Hugging Face transformers' attention interface (`flash_attn_rs.hf.register()`, then
`attn_implementation="fa_rs"`), padded batches as varlen calls in place.

Importing this package needs neither torch nor numpy, and no CUDA: libcuda is loaded at the first CUDA
call. Set FLASH_ATTN_RS_NO_TORCH=1 to keep it from importing torch (numpy arrays only).
"""

import re as _re
import numbers as _numbers
import os as _os

from . import _common, _native
from ._common import HEAD_DIMS, PACK_KV, PACK_NONE, PACK_QKV

__version__ = _native.__version__

try:
    import numpy as _np
    from . import _numpy_impl
except ImportError:  # pragma: no cover - numpy is optional
    _np = _numpy_impl = None

_torch = None
if not _os.environ.get("FLASH_ATTN_RS_NO_TORCH"):
    try:
        import torch as _torch
    except ImportError:
        _torch = None
if _torch is not None:
    from . import _torch_impl  # registers the custom ops (flash_attn_rs::fwd, fwd_into, bwd, fwd_ext, bwd_ext, fwd_paged)
    _dense_fast = _torch_impl.dense_fast
else:
    _torch_impl = _dense_fast = None

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "scaled_dot_product_attention",
    "fwd",
    "varlen_fwd",
    "bwd",
    "varlen_bwd",
    "preload",
    "cuda_available",
    "HEAD_DIMS",
]


def _path(x, name):
    """The torch or numpy implementation, by the type of the first tensor argument."""
    if _torch is not None and isinstance(x, _torch.Tensor):
        return _torch_impl
    if _np is not None and isinstance(x, _np.ndarray):
        return _numpy_impl
    kinds = " or ".join(k for k, m in (("torch.Tensor", _torch), ("numpy.ndarray", _np)) if m is not None)
    raise TypeError(f"{name}: expected a {kinds or 'torch.Tensor or numpy.ndarray (install torch or numpy)'}, "
                    f"got {type(x).__name__}")


def _result(r, return_attn_probs):
    out, lse, s_dmask = r
    return (out, lse, s_dmask) if _common.flag(return_attn_probs, "return_attn_probs") else out


# --- flash-attn 2.8's functions ----------------------------------------------------------------------

def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, rng_state=None):
    """Attention over q `[B, Sq, H, D]`, k and v `[B, Sk, Hk, D]` (H a multiple of Hk: GQA/MQA).

    causal: the mask aligned to the bottom-right corner (query i sees key j <= i + Sk - Sq);
    window_size (left, right): query i sees keys i + Sk - Sq - left ..= i + Sk - Sq + right (-1 = unbounded);
    softcap > 0: scores become softcap * tanh(score / softcap); softmax_scale defaults to 1/sqrt(D);
    alibi_slopes (float32 `[H]` or `[B, H]`): the score of query i, key j gets - slope * |i + Sk - Sq - j|;
    dropout_p: dropout of the probabilities (the backward regenerates the same mask). The mask's
    (seed, offset): `rng_state` if given, else drawn (torch tensors, CPU or CUDA: a seed from torch's
    default CPU generator, so torch.manual_seed replays it; numpy: from np.random's global RNG), offset 0;
    the same (seed, offset) gives the same mask on the CPU and on CUDA.
    Returns out `[B, Sq, H, D]`, or with return_attn_probs (out, softmax_lse `[B, H, Sq]` float32, S_dmask),
    S_dmask `[B, H, Sq, Sk]` in q's dtype (the probabilities, negated where dropped) when dropout_p > 0,
    else None (as flash-attn). A query that sees no key gets out 0 and softmax_lse -inf.
    ALiBi, dropout and S_dmask run on CPU and CUDA tensors alike. On CUDA, eager decoding steps without
    gradients (at most 64 query rows per key head, a head dim with decode kernels, no ALiBi or dropout; from
    2048 keys per sequence or 32768 key rows times kv heads, B * Sk * Hk, or whenever a CUDA graph is being
    captured) run
    flash_attn_with_kvcache's split-KV decode kernels over k and v in place: the same result up to the
    rounding of the split keys' merge, where one row tile per (sequence, head) would leave most of the GPU idle.
    """
    if _dense_fast is not None and rng_state is None:
        r = _dense_fast(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic)
        if r is not None:
            return _result((r[0], r[1], None), return_attn_probs)
    path = _path(q, "q")
    o = _common.options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                        return_attn_probs, rng_state)
    return _result(path.attention(PACK_NONE, q, k, v, None, o), return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              rng_state=None):
    """flash_attn_func over one packed qkv `[B, S, 3, H, D]` (its gradient is one packed tensor too)."""
    path = _path(qkv, "qkv")
    o = _common.options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                        return_attn_probs, rng_state)
    with _named(_QKV):
        return _result(path.attention(PACK_QKV, qkv, None, None, None, o), return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             rng_state=None):
    """flash_attn_func over q `[B, Sq, H, D]` and one packed kv `[B, Sk, 2, Hk, D]`."""
    path = _path(q, "q")
    o = _common.options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                        return_attn_probs, rng_state)
    with _named(_KV):
        return _result(path.attention(PACK_KV, q, kv, None, None, o), return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, seqused_q=None,
                           seqused_k=None, *, rng_state=None):
    """Attention over packed sequences: q `[Tq, H, D]`, k and v `[Tk, Hk, D]`; sequence b is rows
    cu_seqlens_q[b]..cu_seqlens_q[b+1] of q and cu_seqlens_k[b]..cu_seqlens_k[b+1] of k and v (int32
    `[B+1]`, on q's device). max_seqlen_q / max_seqlen_k: ints at least every length, or None (not known:
    the kernels then find each sequence in cu_seqlens on the device, so nothing reads it back to the host and the
    call does not synchronize; both are required only where S_dmask is made, i.e. return_attn_probs with
    dropout_p > 0: ValueError naming max_seqlen_q otherwise). seqused_q / seqused_k (int32 `[B]`, optional):
    only the first seqused[b] rows of slot b are used; the other query rows (and rows past
    cu_seqlens_q[B]) get out 0 and softmax_lse -inf. Masks, ALiBi, dropout as in flash_attn_func, per
    sequence (S_dmask `[B, H, max_seqlen_q, max_seqlen_k]`, each sequence at its block's top left).

    block_table (int32 `[B, max_blocks]`): paged K/V. k and v are then `[num_blocks, page_size, Hk, D]`
    and key t of sequence b is row t % page_size of block block_table[b][t // page_size]; sequence b has
    cu_seqlens_k[b+1] - cu_seqlens_k[b] keys (cut to seqused_k[b] where given), or, with cu_seqlens_k None
    (flash-attn 3's way), seqused_k[b]. Forward only (no gradient), CUDA and CPU.
    Returns out `[Tq, H, D]`, or with return_attn_probs (out, softmax_lse `[H, Tq]` float32, S_dmask).
    """
    path = _path(q, "q")
    o = _common.options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                        return_attn_probs, rng_state)
    lens = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k)
    if block_table is not None:
        return _result(path.paged(q, k, v, lens, block_table, o), return_attn_probs)
    out = path.attention(PACK_NONE, q, k, v, lens, o)
    return _result(out, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, rng_state=None):
    """flash_attn_varlen_func over one packed qkv `[T, 3, H, D]` (one cu_seqlens for q and k; max_seqlen
    an int or None, as there)."""
    path = _path(qkv, "qkv")
    o = _common.options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                        return_attn_probs, rng_state)
    lens = (cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, None, None)
    with _named(_QKV):
        return _result(path.attention(PACK_QKV, qkv, None, None, lens, o), return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                                    rng_state=None):
    """flash_attn_varlen_func over q `[Tq, H, D]` and one packed kv `[Tk, 2, Hk, D]` (max_seqlen_q /
    max_seqlen_k ints or None, as there)."""
    path = _path(q, "q")
    o = _common.options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                        return_attn_probs, rng_state)
    lens = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, None, None)
    with _named(_KV):
        return _result(path.attention(PACK_KV, q, kv, None, lens, o), return_attn_probs)


# Errors in the caller's argument names where the library's differ: the packed functions' library checks
# q, k and v (and one sequence's lengths for each side), which qkv / kv hold; flash_attn_with_kvcache's
# new keys and values are the library's k_new and v_new.
_QKV = {"q": "qkv", "k": "qkv", "v": "qkv", "cu_seqlens_q": "cu_seqlens", "cu_seqlens_k": "cu_seqlens",
        "max_seqlen_q": "max_seqlen", "max_seqlen_k": "max_seqlen"}
_KV = {"k": "kv", "v": "kv"}
_NEW_KV = {"k_new": "k", "v_new": "v"}
_ARG = _re.compile(r"\b(cu_seqlens_[qk]|max_seqlen_[qk]|[kv]_new|[qkv])\b")


class _named:
    """Re-raise a TypeError / ValueError from the block with the library's argument names mapped by `names`."""

    def __init__(self, names):
        self.names = names

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if kind is None or not issubclass(kind, (TypeError, ValueError)):
            return False
        msg = _ARG.sub(lambda m: self.names.get(m.group(1), m.group(1)), str(e))
        if msg == str(e):
            return False
        raise kind(msg) from None


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Decoding attention over a KV cache, flash-attn's flash_attn_with_kvcache: q `[B, Sq, H, D]`;
    k_cache, v_cache `[B_cache, S_cache, Hk, D]` (or pages `[num_blocks, page_size, Hk, D]` with
    block_table int32 `[B, max_blocks]`). If k, v (`[B, S_new, Hk, D]`) are given they are written into
    the caches in place at positions cache_seqlens[b].. (rotated first when rotary_cos / rotary_sin
    `[S_ro, rotary_dim / 2]` are given; q is rotated too, at position cache_seqlens[b] + i under causal or
    local attention, else cache_seqlens[b]); then q attends to each row's cache_seqlens[b] -
    cache_leftpad[b] + S_new entries. cache_seqlens: an int or int32 `[B]` (None: the whole cache);
    cache_batch_idx (int32 `[B]`): the cache row of each batch entry; num_splits: split-KV (0 = heuristic).
    Returns out `[B, Sq, H, D]`, or (out, softmax_lse `[B, H, Sq]`) with return_softmax_lse.
    CPU (numpy arrays, CPU tensors) and CUDA tensors. No gradient.
    """
    with _named(_NEW_KV):
        return _with_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                             cache_leftpad, block_table, softmax_scale, causal, window_size, softcap,
                             rotary_interleaved, alibi_slopes, num_splits, return_softmax_lse)


def _with_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                  block_table, softmax_scale, causal, window_size, softcap, rotary_interleaved, alibi_slopes,
                  num_splits, return_softmax_lse):
    return_softmax_lse = _common.flag(return_softmax_lse, "return_softmax_lse")
    rotary_interleaved = _common.flag(rotary_interleaved, "rotary_interleaved")
    if _torch_impl is not None:
        r = _torch_impl.kvcache_fast(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                                     cache_leftpad, block_table, softmax_scale, causal, window_size, softcap,
                                     rotary_interleaved, alibi_slopes, num_splits)
        if r is not None:
            return r if return_softmax_lse else r[0]
    path = _path(q, "q")
    o = _common.options(0.0, softmax_scale, causal, window_size, softcap, alibi_slopes, False)
    num_splits = _common.index(num_splits, "num_splits")
    out, lse = path.kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                            cache_leftpad, block_table, o, rotary_interleaved, num_splits)
    return (out, lse) if return_softmax_lse else out


# --- The kernels hub's low-level functions (flash-attn's C++ ops) ------------------------------------

def _hub_options(p_dropout, softmax_scale, is_causal, window_size_left, window_size_right, softcap, alibi_slopes,
                 return_softmax=False, deterministic=False, rng_state=None):
    o = _common.options(p_dropout, softmax_scale, is_causal, (window_size_left, window_size_right), softcap,
                        alibi_slopes, deterministic, False, rng_state)
    # The hub's return_softmax makes S_dmask whenever asked (flash-attn's op requires p_dropout > 0 for it).
    o.return_probs = _common.flag(return_softmax, "return_softmax")
    return o


def _hub_padding(q, others, o):
    """The hub ops at a head dim without kernels of their own (up to 256, as flash-attn's ops take): (d, dp),
    q's head dim and the next one with kernels, else None. Every (name, tensor) in `others` must then have
    q's head dim (a ValueError naming it: the library would only see q's unpadded dim). o's scale then
    defaults to 1/sqrt(d)."""
    d = q.shape[-1] if getattr(q, "ndim", 0) else 0
    if d == 0 or d in HEAD_DIMS or d > HEAD_DIMS[-1]:
        return None
    for name, t in others:
        if getattr(t, "ndim", 0) == 0:
            raise TypeError(f"{name}: expected a {type(q).__name__} like q, got {type(t).__name__}")
    _common.check_head_dims(d, others)
    o.softmax_scale = _common.default_scale(o.softmax_scale, d)
    return d, _common.padded_head_dim(d, "q")


def _check_given(path, given, inputs):
    """The caller's outputs at a padded head dim, (name, array or None, the input it is shaped like), before
    the call: checked as the library checks those it writes at the other head dims (type, dtype, shape,
    device, writable; no element shared with an input or another output)."""
    for name, t, like in given:
        if t is not None:
            path.check_output(t, name, like)
    # Inputs of another kind are the call's own error, found later.
    inputs = [(name, t) for name, t in inputs if isinstance(t, path.ARRAY)]
    _common.check_disjoint([(name, t) for name, t, _ in given], inputs, path.overlaps)


def _cut_into(path, t, d, given):
    """`t` (a padded result) cut to head dim `d`, written into `given` (checked by `_check_given`) when there
    is one (returned)."""
    if given is None:
        return path.cut(t, d)
    path.assign(given, t[..., :d])
    return given


def fwd(q, k, v, out=None, alibi_slopes=None, p_dropout=0.0, softmax_scale=None, is_causal=False,
        window_size_left=-1, window_size_right=-1, softcap=0.0, return_softmax=False, gen=None):
    """flash-attn's `fwd` op: q `[B, Sq, H, D]`, k and v `[B, Sk, Hk, D]`, into `out` if given. Returns
    [out, softmax_lse, S_dmask, rng_state]: S_dmask `[B, H, Sq, Sk]` with return_softmax (else None),
    rng_state int64 `[2]` (seed, offset) with p_dropout > 0 (else None), for bwd. `gen`: the generator the
    dropout seed is drawn from (torch: a torch.Generator; numpy: a numpy.random.Generator). D up to 256:
    those not in HEAD_DIMS run zero-padded to the next one (copies)."""
    path = _path(q, "q")
    o = _hub_options(p_dropout, softmax_scale, is_causal, window_size_left, window_size_right, softcap,
                     alibi_slopes, return_softmax)
    return _hub_fwd(path, q, k, v, out, None, None, o, gen)


def varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, out=None, seqused_k=None, leftpad_k=None, block_table=None,
               alibi_slopes=None, max_seqlen_q=None, max_seqlen_k=None, p_dropout=0.0, softmax_scale=None,
               zero_tensors=False, is_causal=False, window_size_left=-1, window_size_right=-1, softcap=0.0,
               return_softmax=False, gen=None):
    """flash-attn's `varlen_fwd` op: q `[Tq, H, D]`, k and v `[Tk, Hk, D]` (with block_table int32
    `[B, max_blocks]`: pages `[num_blocks, page_size, Hk, D]`), int32 cu_seqlens `[B+1]`. Returns [out,
    softmax_lse `[H, Tq]`, S_dmask, rng_state] as `fwd`. max_seqlen_q / max_seqlen_k: ints, or None (the
    default: not known, as in flash_attn_varlen_func; both are required with return_softmax, which sizes
    S_dmask `[B, H, max_seqlen_q, max_seqlen_k]` by them). zero_tensors is accepted and has no effect
    (every row of out is written)."""
    path = _path(q, "q")
    o = _hub_options(p_dropout, softmax_scale, is_causal, window_size_left, window_size_right, softcap,
                     alibi_slopes, return_softmax)
    _common.unsupported_varlen(leftpad_k)
    lens = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, None, seqused_k)
    return _hub_fwd(path, q, k, v, out, lens, block_table, o, gen)


def _hub_fwd(path, q, k, v, out, lens, block_table, o, gen):
    """fwd / varlen_fwd (paged with `block_table`), padded at head dims without kernels of their own (the
    output cut back into `out` where given)."""
    if path is _torch_impl:
        _torch_impl._no_functorch("varlen_fwd" if lens is not None else "fwd")

    def call(q, k, v, out):
        if block_table is not None:
            if out is not None:
                # The paged path fills the caller's out from its own result: the library's checks on the
                # outputs it writes (type, dtype, shape, writable; no element shared with q, k or v), made
                # here, before the call, for both paths.
                _check_given(path, [("out", out, q)], [("q", q), ("k", k), ("v", v)])
            return path.fwd_paged(q, k, v, out, lens, block_table, o, gen)
        return path.fwd(q, k, v, out, lens, o.softmax_scale, o, gen)
    pad = _hub_padding(q, (("k", k), ("v", v)), o)
    if pad is None:
        return call(q, k, v, out)
    d, dp = pad
    _check_given(path, [("out", out, q)], [("q", q), ("k", k), ("v", v)])
    res = call(path._pad(q, dp, "q"), path._pad(k, dp, "k"), path._pad(v, dp, "v"), None)
    res[0] = _cut_into(path, res[0], d, out)
    return res


def bwd(dout, q, k, v, out, softmax_lse, dq=None, dk=None, dv=None, alibi_slopes=None, p_dropout=0.0,
        softmax_scale=None, is_causal=False, window_size_left=-1, window_size_right=-1, softcap=0.0,
        deterministic=False, gen=None, rng_state=None):
    """flash-attn's `bwd` op: gradients of q, k, v from dout and the forward's out and softmax_lse, into
    dq, dk, dv if given. With p_dropout > 0, rng_state must be the forward's (ValueError otherwise: a fresh
    draw would not be the forward's mask). Returns [dq, dk, dv, None] (flash-attn's softmax_d is not made)."""
    path = _path(q, "q")
    o = _hub_options(p_dropout, softmax_scale, is_causal, window_size_left, window_size_right, softcap,
                     alibi_slopes, deterministic=deterministic, rng_state=rng_state)
    return _hub_bwd(path, dout, q, k, v, out, softmax_lse, dq, dk, dv, None, o)


def _hub_bwd(path, dout, q, k, v, out, softmax_lse, dq, dk, dv, lens, o):
    """bwd / varlen_bwd: the library names the forward's LSE `lse`, these ops `softmax_lse` (its errors are
    renamed)."""
    try:
        return _hub_bwd_padded(path, dout, q, k, v, out, softmax_lse, dq, dk, dv, lens, o)
    except (TypeError, ValueError) as e:
        msg = str(e)
        renamed = _LSE.sub("softmax_lse", msg)
        if renamed == msg:
            raise
        raise type(e)(renamed) from None


# The library's name of the forward's LSE where it names an argument: first in a message, or what an output
# overlaps ("dq: overlaps lse").
_LSE = _re.compile(r"^lse\b|(?<=overlaps )lse\b")


def _hub_bwd_padded(path, dout, q, k, v, out, softmax_lse, dq, dk, dv, lens, o):
    """bwd / varlen_bwd, padded as fwd is at head dims without kernels of their own (the gradients cut back
    into dq, dk, dv where given)."""
    if path is _torch_impl:
        _torch_impl._no_functorch("varlen_bwd" if lens is not None else "bwd")
    pad = _hub_padding(q, (("k", k), ("v", v), ("dout", dout), ("out", out)), o)
    if pad is None:
        return path.bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, lens, o.softmax_scale, o)
    d, dp = pad
    _check_given(path, [("dq", dq, q), ("dk", dk, k), ("dv", dv, v)],
                 [("dout", dout), ("q", q), ("k", k), ("v", v), ("out", out), ("softmax_lse", softmax_lse)])
    padded = [path._pad(t, dp, n) for t, n in zip((dout, q, k, v, out), ("dout", "q", "k", "v", "out"))]
    grads = path.bwd(*padded, softmax_lse, None, None, None, lens, o.softmax_scale, o)
    return [_cut_into(path, g, d, given) for g, given in zip(grads[:3], (dq, dk, dv))] + [None]


def varlen_bwd(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, dq=None, dk=None, dv=None,
               alibi_slopes=None, max_seqlen_q=None, max_seqlen_k=None, p_dropout=0.0, softmax_scale=None,
               zero_tensors=False, is_causal=False, window_size_left=-1, window_size_right=-1, softcap=0.0,
               deterministic=False, gen=None, rng_state=None):
    """flash-attn's `varlen_bwd` op over varlen_fwd's layouts (max_seqlen_q / max_seqlen_k ints or None, as
    there). Returns [dq, dk, dv, None]."""
    path = _path(q, "q")
    o = _hub_options(p_dropout, softmax_scale, is_causal, window_size_left, window_size_right, softcap,
                     alibi_slopes, deterministic=deterministic, rng_state=rng_state)
    lens = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, None, None)
    return _hub_bwd(path, dout, q, k, v, out, softmax_lse, dq, dk, dv, lens, o)


# --- PyTorch's SDPA ----------------------------------------------------------------------------------

_torch_sdpa = _torch.nn.functional.scaled_dot_product_attention if _torch is not None else None


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
                                 enable_gqa=False, fallback=True):
    """torch.nn.functional.scaled_dot_product_attention's arguments, layout and result on these kernels:
    query `[N, Hq, L, E]`, key and value `[N, Hk, S, E]` (torch tensors, CPU or CUDA, float16 / bfloat16;
    Hq a multiple of Hk with enable_gqa=True), returning `[N, Hq, L, E]` (a transposed view of a
    `[N, L, Hq, E]` result, as PyTorch's flash backend returns) and differentiable.

    is_causal is PyTorch's: aligned to the top-left corner (query i sees keys j <= i), unlike flash-attn's
    bottom-right `causal`; scale defaults to 1/sqrt(E); dropout_p drops probabilities whenever it is above
    0 (as PyTorch's function does, training or not; the mask's seed is drawn from torch's default CPU
    generator, see flash_attn_func). A boolean key-padding attn_mask `[N or 1, 1, 1, S]` (True: attend; an
    encoder's or a cross-attention's padding) runs here too, without is_causal, in place: each row's real keys
    as one varlen sequence (masks whose real keys are not one run are compacted first: eager calls read the
    mask back once per mask tensor to tell, and again when it changes: a CPU mask's contents are compared at each
    call, a CUDA mask's version counter only, which writes through `.data` or DLPack do not move; compiled calls
    compact every mask); a query whose keys are all masked
    gets 0 (PyTorch's math backend: NaN). Calls these kernels do not cover run PyTorch's own function
    instead, captured at import (so that this one can replace torch.nn.functional's): another attn_mask, other
    ranks, dtypes or devices, head dims above 256, key and value of different head dims, different head
    counts without enable_gqa, is_causal with fewer queries than keys (L < S: its top-left mask hides
    keys past the last row's, which a bottom-right window cannot express), empty tensors, a dropout_p
    outside [0, 1) or a scale that is not a finite number (PyTorch's answer, or its error; key or value without
    heads, where PyTorch 2.11's function divides by zero and kills the process, a ValueError naming it). With
    `fallback=False` those raise NotImplementedError instead. Decoding steps (at most 64 query rows per key
    head, nothing to differentiate, no dropout; compiled; eager on the CPU; eager on CUDA from 2048 keys per
    sequence or 32768 key rows times key heads N * S * Hk, or under CUDA-graph capture, as flash_attn_func) run flash_attn_with_kvcache's split-KV decode
    path over key and value in place, where flash_attn_func's one tile per (sequence, head) would leave most
    of the GPU idle.
    """
    if _torch is None:
        raise TypeError("scaled_dot_product_attention: needs torch (not installed, or FLASH_ATTN_RS_NO_TORCH set)")
    _common.flag(enable_gqa, "enable_gqa")  # a value without a truth value is a TypeError naming it, on every path
    why = _sdpa_unsupported(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if why is not None:
        if not _common.flag(fallback, "fallback"):
            raise NotImplementedError(f"scaled_dot_product_attention: {why} (fallback=True runs PyTorch's)")
        kw = {"enable_gqa": enable_gqa} if enable_gqa else {}
        for name, t in (("key", key), ("value", value)):
            if isinstance(t, _torch.Tensor) and t.ndim >= 3 and t.shape[-3] == 0:
                # PyTorch 2.11's function divides by the key / value heads (SIGFPE, the process dies) with
                # enable_gqa, and without it where query has none either: an error naming them instead.
                raise ValueError(f"{name}: has 0 heads (dimension {t.ndim - 3} of shape {tuple(t.shape)}), "
                                 f"which PyTorch's scaled_dot_product_attention cannot take")
        if type(dropout_p) in (int, float) and dropout_p == 1 and isinstance(query, _torch.Tensor) and query.is_cuda:
            # PyTorch 2.11's cuDNN backend raises for dropout_p 1 on the first call and crashes the process on
            # the next: its math backend answers (every probability dropped: out 0, gradients 0).
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.MATH):
                return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                   scale=scale, **kw)
        return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, **kw)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if attn_mask is not None:
        # A boolean key-padding mask `[N or 1, 1, 1, S]` (what _sdpa_unsupported lets through): each row's real
        # keys, every query row real, as flash_attn_rs.hf runs a padded encoder (in place, no unpadding gather).
        from . import hf
        mask = attn_mask.reshape(attn_mask.shape[0], attn_mask.shape[3]).expand(q.shape[0], -1)
        opts = {"softmax_scale": scale, "causal": False, "window_size": (-1, -1), "softcap": 0.0}
        train = {"dropout_p": dropout_p, "deterministic": False}
        return hf._padded(q, k, v, mask, opts, train, memo_key=attn_mask, compact_compiled=True).transpose(1, 2)
    window = (-1, q.shape[1] - k.shape[1]) if _common.flag(is_causal, "is_causal") else (-1, -1)
    if _sdpa_decodes(q, k, v, dropout_p):
        # A decoding step (few query rows per key head, no gradient): the KV cache's split-KV decode
        # kernels over key and value as a full cache, in place (their workspace from PyTorch's allocator).
        # Eager on CUDA through flash_attn_func's fast path, which runs them with no cache lengths tensor
        # (`raw::fwd_decode`); where it does not take the call (another current device, a scale that is not
        # a float, ...), compiled calls (the KV cache's op traces) and on the CPU as a KV cache call.
        fast = (_torch_impl.dense_fast(q, k, v, 0.0, scale, False, window, 0.0, None, False)
                if q.is_cuda and not _torch_impl._is_compiling() else None)
        if fast is not None:
            out = fast[0]
        else:
            out = flash_attn_with_kvcache(q, k, v, cache_seqlens=k.shape[1], softmax_scale=scale, window_size=window)
    else:
        out = flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=scale, window_size=window)
    return out.transpose(1, 2)


def _sdpa_decodes(q, k, v, dropout_p):
    """Whether an SDPA call (q `[N, L, Hq, E]`, k, v `[N, S, Hk, E]`) runs flash_attn_with_kvcache's decode
    path: nothing to differentiate, no dropout, and the library's rule for a dense forward as decoding steps
    (`_torch_impl._dense_decodes`, flash_attn_func's too: at most DENSE_DECODE_MAX_ROWS query rows per key head,
    a head dim with decode kernels; where flash_attn_func's row tiles would leave most of the GPU idle: one per
    (sequence, head)).
    Plain Python over the library's limits, so torch.compile traces the choice (and the KV cache's op)."""
    if dropout_p != 0 or _torch_impl._functorch_active():
        return False
    if _torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    # The KV cache takes its caches as they are (it appends in place): key and value's last dimension must
    # be contiguous already (flash_attn_func copies them otherwise).
    fits = (k.stride(3) == 1 and v.stride(3) == 1 and q.dtype in (_torch.float16, _torch.bfloat16)
            and _torch_impl._dense_decodes(q.shape, k.shape, v.shape))
    # Eager calls on CUDA: only where the KV cache path's host time pays (`_torch_impl._eager_route_pays`);
    # compiled ones always (their graph's host time is not per call).
    return fits and (not q.is_cuda or _torch_impl._is_compiling() or _torch_impl._eager_route_pays(k.shape))



def _sdpa_unsupported(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Why these kernels cannot run an SDPA call (None: they can)."""
    t = _torch.Tensor
    if not (isinstance(q, t) and isinstance(k, t) and isinstance(v, t)):
        return "query, key and value must be torch tensors"
    if attn_mask is not None and not (
            isinstance(attn_mask, t) and attn_mask.dtype == _torch.bool and attn_mask.ndim == 4 and not is_causal
            and q.ndim == 4 and k.ndim == 4 and attn_mask.shape[0] in (1, q.shape[0]) and attn_mask.shape[1] == 1
            and attn_mask.shape[2] == 1 and attn_mask.shape[3] == k.shape[2] and attn_mask.device == q.device):
        return "attn_mask (other than a boolean key-padding mask [N or 1, 1, 1, S] without is_causal)"
    real = lambda x: isinstance(x, _numbers.Real) and not isinstance(x, bool) and _common.finite(x)  # noqa: E731
    if not (real(dropout_p) and 0 <= dropout_p < 1):
        return f"dropout_p {dropout_p!r} (a number in [0, 1) here)"
    if scale is not None and not real(scale):
        return f"scale {scale!r} (a finite number here)"
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return f"query, key, value of rank {q.ndim}, {k.ndim}, {v.ndim} (4 here: [N, H, L, E])"
    if q.dtype not in (_torch.float16, _torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype} (float16 or bfloat16, all three the same)"
    if q.device.type not in ("cpu", "cuda") or k.device != q.device or v.device != q.device:
        return f"devices {q.device}, {k.device}, {v.device}"
    (n, hq, l, e), (nk, hk, s, ek), (nv, hv, sv, ev) = q.shape, k.shape, v.shape
    if nk != n or nv != n or hv != hk or sv != s or ek != e or ev != e:
        return f"shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if e > 256:
        return f"head dim {e} (at most 256)"
    if hq != hk and (not _common.flag(enable_gqa, "enable_gqa") or hk == 0 or hq % hk):
        return f"{hq} query heads over {hk} key heads" + ("" if enable_gqa else " without enable_gqa")
    if _common.flag(is_causal, "is_causal") and l < s:
        return f"is_causal (top-left) with fewer queries ({l}) than keys ({s})"
    if q.numel() == 0 or k.numel() == 0:
        return "empty tensors"
    return None


# --- Utilities ---------------------------------------------------------------------------------------

def cuda_available():
    """Whether a CUDA driver loads and reports a device (False, never an error, without one)."""
    return _native.cuda_available()


def preload(device=0):
    """Loads the kernels onto CUDA device `device` (an ordinal, "cuda:N" or a torch.device) now, e.g.
    before capturing a CUDA graph, so that no later call pays for it. RuntimeError without CUDA."""
    if isinstance(device, int) and not isinstance(device, bool):
        ordinal = device
    elif isinstance(device, str) or (_torch is not None and isinstance(device, _torch.device)):
        s = str(device)
        if s == "cuda":
            ordinal = _torch.cuda.current_device() if _torch is not None else 0
        elif s.startswith("cuda:") and s[5:].isdigit():
            ordinal = int(s[5:])
        else:
            raise ValueError(f"device: expected a CUDA device (an ordinal or 'cuda:N'), got {device!r}")
    else:
        raise TypeError(f"device: expected an int, str or torch.device, got {type(device).__name__}")
    _native.preload(ordinal)
