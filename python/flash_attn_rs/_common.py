"""What the torch and numpy paths share: checking flash-attn's options, and the head-dim padding.

Nothing here touches a tensor's data, so it also runs while torch.compile traces a call.
"""

import math
import numbers
import operator

from . import _native

#: Head dims with a kernel of their own. Any other head dim up to the largest is zero-padded to the next
#: one (padding q and k with zeros leaves every score unchanged; v's zero columns give output columns
#: that are cut off again), as flash-attn pads head dims to a multiple of 8.
HEAD_DIMS = tuple(_native.HEAD_DIMS)

#: How q, k and v arrive: three tensors, q and a packed kv (`[..., 2, Hk, D]`), or one packed qkv
#: (`[..., 3, H, D]`).
PACK_NONE, PACK_KV, PACK_QKV = 0, 1, 2


class Options:
    """flash-attn's keyword arguments, checked and in canonical form. `alibi_slopes` is the caller's
    tensor or array (checked by the path that runs it); `return_probs`: make S_dmask (flash-attn makes it
    only with return_attn_probs and dropout_p > 0); `rng_state`: an explicit dropout (seed, offset) or
    None (drawn by the path)."""

    __slots__ = ("softmax_scale", "causal", "window_left", "window_right", "softcap", "deterministic",
                 "dropout_p", "alibi_slopes", "return_probs", "rng_state")

    def __init__(self, softmax_scale, causal, window_left, window_right, softcap, deterministic, dropout_p=0.0,
                 alibi_slopes=None, return_probs=False, rng_state=None):
        self.softmax_scale = softmax_scale
        self.causal = causal
        self.window_left = window_left
        self.window_right = window_right
        self.softcap = softcap
        self.deterministic = deterministic
        self.dropout_p = dropout_p
        self.alibi_slopes = alibi_slopes
        self.return_probs = return_probs
        self.rng_state = rng_state

    @property
    def extras(self):
        """Whether the call needs ALiBi, dropout or S_dmask (the eager path that passes them on)."""
        return self.alibi_slopes is not None or self.dropout_p > 0 or self.return_probs


def flag(x, name):
    """A flag as flash-attn reads it (any value with a truth value: bool, int, numpy bool, a one-element
    tensor); a value without one (a tensor of several elements) is a TypeError naming it."""
    try:
        return bool(x)
    except Exception as e:  # noqa: BLE001 - whatever __bool__ raises, the caller gets the argument's name
        raise TypeError(f"{name}: must be a bool, got {type(x).__name__} ({e})") from None


def _is_int(x):
    """An int, or a value that is one (numpy / torch integer scalars, 0-dim integer arrays); arrays of several
    elements are not (their __index__ raises)."""
    if isinstance(x, int):
        return True
    if not hasattr(type(x), "__index__"):
        return False
    try:
        operator.index(x)
    except Exception:  # noqa: BLE001 - whatever __index__ raises, the value is not an int
        return False
    return True


def rng_state(x):
    """An explicit dropout (seed, offset): a pair of ints, or a 2-element array or tensor (what the hub's
    fwd returns as rng_state), each in 0..2**64; None stays None."""
    if x is None:
        return None
    try:
        vals = x.tolist() if hasattr(x, "tolist") else list(x)
    except TypeError:
        raise TypeError(f"rng_state: expected (seed, offset), got {type(x).__name__}") from None
    if len(vals) != 2 or not all(_is_int(v) and not isinstance(v, bool) for v in vals):
        raise TypeError(f"rng_state: expected two ints (seed, offset), got {vals!r}")
    # An int64 tensor holds a seed past 2**63 as a negative number: take its two's complement bits.
    seed, offset = (int(v) + 2**64 if -2**63 <= int(v) < 0 else int(v) for v in vals)
    if not (0 <= seed < 2**64 and 0 <= offset < 2**64):
        raise ValueError(f"rng_state: seed and offset must be in 0..2**64, got {vals!r}")
    return seed, offset


def finite(x):
    """Whether a float is finite, by comparisons only (which torch.compile traces on a symbolic float, where
    math.isfinite breaks the graph)."""
    return -math.inf < x < math.inf


def _float(x, name):
    """A real number argument (an int, a float, a numpy scalar, a Fraction, ...) as a Python float. One
    that a float cannot hold (an int or Fraction past 1.8e308, whose float() raises OverflowError) is a
    ValueError naming the argument, as other out-of-range values are."""
    try:
        return float(x)
    except (OverflowError, ValueError):
        raise ValueError(f"{name}: {type(x).__name__} value out of a float's range") from None


def check_int_cache_seqlens(n, batch):
    """flash_attn_with_kvcache's int cache_seqlens `n`, which becomes one entry per batch entry of q: `n` and
    the batch (that vector's length) in the i32 range the library takes, else a ValueError naming
    cache_seqlens or q, not the allocation error (naming nothing) of a vector past it."""
    if not -2**31 <= n < 2**31:
        raise ValueError(f"cache_seqlens: {n} is out of range")
    if batch >= 2**31:
        raise ValueError(f"q: batch size {batch} exceeds the i32 range")


def options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
            return_probs=False, rng_state_=None):
    """Checks flash-attn's options. `return_probs`: the caller asked for the probabilities
    (return_attn_probs / return_softmax); as in flash-attn, S_dmask is made only when dropout_p > 0 too."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p: must be a float, got {type(dropout_p).__name__}")
    dropout_p = _float(dropout_p, "dropout_p")
    if not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p: must be in [0, 1), got {dropout_p}")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
            raise TypeError(f"softmax_scale: must be a float or None, got {type(softmax_scale).__name__}")
        softmax_scale = _float(softmax_scale, "softmax_scale")
        if not finite(softmax_scale):
            raise ValueError(f"softmax_scale: must be finite, got {softmax_scale}")
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap: must be a float, got {type(softcap).__name__}")
    softcap = _float(softcap, "softcap")
    if not finite(softcap):
        raise ValueError(f"softcap: must be finite (0.0 = off), got {softcap}")
    # flash-attn: softcap > 0 turns it on, anything else leaves it off.
    softcap = max(softcap, 0.0)
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise TypeError(f"window_size: must be a pair (left, right) of ints, got {window_size!r}") from None
    if not (_is_int(left) and _is_int(right)) or isinstance(left, bool) or isinstance(right, bool):
        raise TypeError(f"window_size: must be a pair (left, right) of ints, got {window_size!r}")
    left, right = int(left), int(right)
    # flash-attn: a negative side is unbounded.
    left = -1 if left < 0 else left
    right = -1 if right < 0 else right
    if left >= 2**62 or right >= 2**62:
        raise ValueError(f"window_size: {window_size!r} is out of range")
    return Options(softmax_scale, flag(causal, "causal"), left, right, softcap, flag(deterministic, "deterministic"),
                   dropout_p, alibi_slopes, flag(return_probs, "return_attn_probs") and dropout_p > 0,
                   rng_state(rng_state_))


def padded_head_dim(d, arg):
    """The head dim the kernels run at for head dim `d`: `d` itself or the next supported one."""
    for h in HEAD_DIMS:
        if d <= h:
            if d == 0:
                break
            return h
    raise ValueError(f"{arg}: head dim {d} is not supported: flash_attn_rs runs head dims 1 to {HEAD_DIMS[-1]} "
                     f"({', '.join(map(str, HEAD_DIMS))} directly, others zero-padded to the next of these)")


def check_rotary_dim(rotary_cos, d):
    """flash_attn_with_kvcache at a padded head dim: the library sees the padded one, so the rotary dim
    (twice rotary_cos's columns) is checked against the caller's `d` here."""
    if rotary_cos is not None and getattr(rotary_cos, "ndim", 0) == 2 and 2 * rotary_cos.shape[1] > d:
        raise ValueError(f"rotary_cos: rotary_dim {2 * rotary_cos.shape[1]} (twice its {rotary_cos.shape[1]} columns) "
                         f"exceeds the head dim {d}")


def default_scale(scale, d):
    """`scale`, or 1/sqrt(d) when it is None; `d` (q's head dim) checked first, so that a head dim of 0
    gets `padded_head_dim`'s error naming q rather than a ZeroDivisionError."""
    padded_head_dim(d, "q")
    return d ** -0.5 if scale is None else scale


def check_rank(t, name, rank):
    layout = getattr(t, "layout", None)
    if layout is not None and str(layout) != "torch.strided":
        raise TypeError(f"{name}: must be a dense (strided) tensor, got layout {layout}")
    if t.ndim != rank:
        raise ValueError(f"{name}: expected {rank} dimensions, got {t.ndim} (shape {tuple(t.shape)})")


def check_packed(t, name, n, rank):
    """A packed qkv (`n` = 3) or kv (`n` = 2): `rank` dimensions, the packing axis third from last."""
    check_rank(t, name, rank)
    if t.shape[-3] != n:
        what = "q, k, v" if n == 3 else "k, v"
        raise ValueError(f"{name}: dimension {rank - 3} must have size {n} ({what}), got shape {tuple(t.shape)}")


def check_disjoint(outputs, inputs, overlaps):
    """No output (name, array) shares an element with an input or another output (None entries skipped),
    by `overlaps` (the path's, the library's rule): the check the library makes on the outputs it writes,
    for those the package writes itself (head dims that run padded)."""
    outputs = [(n, t) for n, t in outputs if t is not None]
    inputs = [(n, t) for n, t in inputs if t is not None]
    for i, (name, t) in enumerate(outputs):
        for other, u in inputs + outputs[i + 1:]:
            if overlaps(t, u):
                raise ValueError(f"{name}: overlaps {other}: an output may not alias an input or another output")


def check_head_dims(d, others):
    """Every (name, tensor) of `others` has head dim `d` (before padding, so the message is the user's)."""
    for name, t in others:
        if t.shape[-1:] != (d,):
            raise ValueError(f"{name}: head dim {t.shape[-1] if t.ndim else None} must equal q's head dim {d} "
                             f"(shape {tuple(t.shape)})")


def check_own_memory(t, name, self_overlaps):
    """`t`, an output the package writes itself (head dims that run padded): no two elements share memory
    (`self_overlaps`, the path's test by the library's rule), as the library requires of those it writes."""
    if self_overlaps(t):
        raise ValueError(f"{name}: has elements that share memory (a broadcast or overlapping layout): an output "
                         f"needs its own memory at every position")


#: The library's error (ValueError) for a varlen S_dmask without both max lengths.
MAX_SEQLEN_REQUIRED = "max_seqlen_q: is required with s_dmask (return_attn_probs), whose shape it sets"


def s_dmask_shape(q, lens, k=None):
    """S_dmask's shape: `[B, H, Sq, Sk]`, varlen `[B, H, max_seqlen_q, max_seqlen_k]` (ValueError, as the
    library's, where either max is None: nothing else sets that shape, and reading cu_seqlens for it would
    synchronize)."""
    if lens is None:
        return (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    cu_q, _, max_q, max_k = lens[:4]
    if max_q is None or max_k is None:
        raise ValueError(MAX_SEQLEN_REQUIRED)
    return (cu_q.shape[0] - 1 if cu_q.ndim == 1 else 0, q.shape[1], max_q, max_k)


def alloc_s_dmask(alloc, q, lens, k=None):
    """S_dmask (`s_dmask_shape`) from `alloc(shape)`. The array library's own error where it cannot be
    allocated (numpy's MemoryError / ValueError, torch's RuntimeError) names no argument: a ValueError naming
    what sets the shape instead (the max lengths for varlen, else return_attn_probs over q and k)."""
    shape = s_dmask_shape(q, lens, k)
    try:
        return alloc(shape)
    except (MemoryError, ValueError, RuntimeError):
        what = "max_seqlen_q, max_seqlen_k" if lens is not None else "return_attn_probs"
        raise ValueError(f"{what}: S_dmask of shape {tuple(shape)} ({q.dtype}, O(S^2)) cannot be "
                         f"allocated") from None


def dropout_arg(o, seed_offset):
    """The native dropout argument: None, or (p, seed, offset)."""
    return (o.dropout_p,) + tuple(seed_offset) if o.dropout_p > 0 else None


def index(x, name):
    """An int argument (max_seqlen_q, ...), as a Python int."""
    if isinstance(x, bool):
        raise TypeError(f"{name}: must be an int, got bool")
    try:
        x = operator.index(x)
    except TypeError:
        raise TypeError(f"{name}: must be an int, got {type(x).__name__}") from None
    if x < 0:
        raise ValueError(f"{name}: must be >= 0, got {x}")
    return x


def max_seqlen(x, name):
    """A max_seqlen_q / max_seqlen_k: None (not known: the kernels find the lengths on the device) or an
    int >= 0, as a Python int."""
    return None if x is None else index(x, name)


def unsupported_varlen(leftpad_k=None):
    if leftpad_k is not None:
        raise NotImplementedError("leftpad_k: is not implemented by flash_attn_rs (pass None)")
