"""Hugging Face transformers on these kernels: an attention function for transformers' AttentionInterface.

    import flash_attn_rs.hf
    flash_attn_rs.hf.register()                  # registers the name "fa_rs"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fa_rs", dtype=torch.bfloat16)
    # or: model.set_attn_implementation("fa_rs")

(Not a name with "flash" in it: transformers takes any such name for a flash-attn package or hub kernel.)

What transformers' `flash_attention_2` runs through flash-attn, this runs here, without the flash-attn package
and without synchronizing where the kernels do not need it:

- No padding: `flash_attn_func`, causal (or the module's `is_causal`), the model's scaling, `sliding_window` as
  flash-attn's window `(w - 1, w - 1)`, `softcap` (Gemma 2), dropout while training, GQA / MQA. Decoding steps
  that need no gradient run the KV cache's split-KV decode kernels over the cache in place.
- A padding mask (`attention_mask` `[B, L]`, what `padding_mask`, the registered mask function, gives: None unless a
  row has padding or a static cache unwritten slots): each row's run of real tokens becomes one sequence of a varlen
  call over the padded batch, in place, through `cu_seqlens` and `seqused` computed on the device: no unpadding
  gather, no `.item()`, no copy where the batch is laid out token-major (else one `reshape`). Causal is per sequence,
  aligned bottom-right as in flash-attn's varlen call, so left and right padding, chunked prefill, static caches and
  decoding over a padded cache give what transformers' flash-attn path gives; in causal or windowed calls the padded
  query rows come out 0 (gradients 0) from the kernels themselves. Without a causal mask or window (encoders,
  an encoder-decoder's cross-attention over the encoder's padding) every query row is computed over the real keys.
  Decoding steps (one query row) run the KV cache's kernels over the cache in place, with `cache_leftpad`.
  A row whose real tokens are not one run (holes in the mask) is compacted first (an argsort and a gather,
  then the result scattered back; a sliding window then counts real tokens, as flash-attn's path does, where eager
  attention counts positions); eager calls check for holes once per mask (one host read per forward: every layer
  gets the same mask), compiled ones assume padding masks (one run per row), as tokenizers and transformers'
  caches make them.
- Packed sequences (padding-free training): `cu_seq_lens_q` / `cu_seq_lens_k` from the collator
  (`DataCollatorWithFlattening(return_flash_attn_kwargs=True)`) run as they are; with only `position_ids`
  (batch 1, each sequence restarting at the smallest position) the sequence starts are found once per
  `position_ids` tensor (one host read, as transformers' flash-attn path does in every layer).

Not implemented: attention sinks (`s_aux`, gpt-oss): NotImplementedError. float32 inputs run in autocast's dtype
when autocast is on, else raise TypeError (as flash-attn does). `output_attentions` returns None weights.
"""

import os

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

from . import _sdpa_decodes, _torch_impl, flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

NAME = "fa_rs"
_HALF = (torch.float16, torch.bfloat16)


def register(name=NAME):
    """Registers `attention` with transformers' AttentionInterface under `name` and `padding_mask` as its mask
    function, and returns the name: pass it as `attn_implementation`. Needs transformers 5 (AttentionInterface,
    AttentionMaskInterface). `name` must not contain "flash" (transformers would look for a flash-attn package)."""
    if "flash" in name:
        raise ValueError(f"flash_attn_rs.hf.register: name {name!r}: transformers takes names with 'flash' for "
                         "flash-attn packages or hub kernels")
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
    except ImportError as e:
        raise ImportError(f"flash_attn_rs.hf.register: needs transformers with AttentionInterface ({e})") from e
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, padding_mask)
    return name


# The mask functions transformers composes that a padding mask plus the attention call's causal flag and window
# express (sliding windows come to `attention` as `sliding_window`; packed sequences through position_ids or
# cu_seq_lens). Anything else (chunked attention, bidirectional image-token blocks, a model's own or_mask /
# and_mask functions) would be dropped: `padding_mask` raises for it instead.
_PLAIN_MASK_PARTS = frozenset({
    "causal_mask_function", "bidirectional_mask_function", "sliding_window_overlay.<locals>.inner_mask",
    "sliding_window_bidirectional_overlay.<locals>.inner_mask", "packed_sequence_mask_function.<locals>.inner_mask",
})


def _relative_interval(fn, reach=4096):
    """Whether mask function `fn` is a function of kv - q alone that holds on one interval of it around 0 (what a
    causal flag and a window express), probed at two far-apart query positions over |kv - q| <= reach (and past
    it: the interval's ends must lie inside); False where it is not, or reads state it cannot be probed on."""
    try:
        rel = torch.arange(-reach - 2, reach + 3)
        rows = []
        for base in (reach + 3, 20 * reach):
            v = fn(torch.tensor(0), torch.tensor(0), torch.tensor(base), base + rel)
            rows.append(torch.as_tensor(v, dtype=torch.bool).expand(rel.shape))
    except Exception:  # noqa: BLE001 - indexing a batch's tensors out of range, a model's own state, ...
        return False
    if not torch.equal(rows[0], rows[1]) or not bool(rows[0][reach + 2]):
        return False
    on = rows[0].nonzero().flatten()
    one_run = int(on[-1] - on[0]) + 1 == len(on)
    # Both ends inside the probed range (or the whole of it: unbounded on that side).
    return one_run and bool(rows[0][0] == rows[0][1]) and bool(rows[0][-1] == rows[0][-2])


def _unplain_mask_part(fn):
    """The qualified name of a part of transformers' mask function `fn` outside `_PLAIN_MASK_PARTS` (through
    and_masks' compositions; an or_masks composition counts where it is a function of kv - q on one interval around
    0, as a model's bidirectional layers make it: Gemma 3's use_bidirectional_attention), or None."""
    name = getattr(fn, "__qualname__", type(fn).__name__)
    if name == "or_masks.<locals>.or_mask":
        return None if _relative_interval(fn) else name
    if name in ("and_masks.<locals>.and_mask", "remap_positions_for_packed_sequence.<locals>.inner_mask"):
        # A conjunction, or a mask function over per-sequence positions (packing, which `attention` does itself).
        for cell in fn.__closure__ or ():
            parts = cell.cell_contents
            for part in parts if isinstance(parts, tuple) else (parts,) if callable(parts) else ():
                if (bad := _unplain_mask_part(part)) is not None:
                    return bad
        return None
    return None if name in _PLAIN_MASK_PARTS else name


# `padding_mask`'s entry for a static cache's slots past the tokens so far (not written yet).
UNWRITTEN = -1


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                 **kwargs):
    """The mask function registered with `attention` (transformers calls it once per forward; every layer gets its
    result): the caller's `[B, L]` padding mask's last kv_length columns, as flash-attn's path takes them; None in
    eager calls where nothing is padded (one host read; compiled calls keep the mask, whose all-ones rows cost a
    varlen call instead of a dense one, rather than break the graph). Where a causal mask's keys include slots past
    the last query's position (a static cache's unwritten ones, from q_offset + q_length on; a tensor q_offset, as
    static caches pass, is not read): an int8 mask, 1 / 0 for the written slots (real / padding) and UNWRITTEN (-1)
    for the others; `attention` then takes the queries as the last q_length written positions. A bidirectional
    mask (an encoder's, cross-attention's) without padding: None, every key real.

    Raises NotImplementedError where the model's mask is more than that (`_PLAIN_MASK_PARTS`: chunked attention,
    prefix-LM image blocks, a model's own mask functions) or it adds ALiBi to its mask (Falcon with alibi=True):
    these kernels would attend to keys the model's mask hides."""
    config = kwargs.get("config")
    if getattr(config, "alibi", False):
        raise NotImplementedError("flash_attn_rs.hf: models that add ALiBi to their attention mask (config.alibi) are "
                                  "not supported here; use attn_implementation='sdpa'")
    if mask_function is not None and not torch.compiler.is_compiling():
        bad = _unplain_mask_part(mask_function)
        if bad is not None:
            raise NotImplementedError(f"flash_attn_rs.hf: this model's attention mask has a part ({bad}) beyond a "
                                      "causal, sliding-window or bidirectional mask over padding, which these kernels "
                                      "would not apply; use attn_implementation='sdpa'")
    mask = None if attention_mask is None else attention_mask[:, -kv_length:]
    # A causal mask's keys past the last query's position hold no token yet (a static cache's unwritten slots; the
    # caller's mask, or generate's all-ones one, may cover them): q_offset + q_length - kv_offset slots are written.
    bidirectional = "allow_is_bidirectional_skip" in kwargs  # transformers' bidirectional masks pass it
    written = q_offset + q_length - kv_offset
    if bidirectional or (not isinstance(written, torch.Tensor) and written >= kv_length):
        if mask is None or (not torch.compiler.is_compiling() and mask.shape[1] == kv_length and bool(mask.all())):
            return None
        return mask
    device = written.device if isinstance(written, torch.Tensor) else mask.device if mask is not None else kwargs.get("device")
    slot = torch.arange(kv_length, device=device)
    real = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    if mask is not None:  # as long as kv_length or shorter (then its end is the tokens' end)
        real[:, :mask.shape[1]] = mask.to(device=device, dtype=torch.bool)
    return torch.where(slot < written, real.to(torch.int8), UNWRITTEN).to(torch.int8)


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, softcap=None,
              is_causal=None, s_aux=None, **kwargs):
    """transformers' attention-interface call: query `[B, Hq, Sq, D]`, key and value `[B, Hk, Sk, D]`,
    attention_mask a `[B, L]` padding mask (L <= Sk: keys past L are not used) or None. Returns
    (out `[B, Sq, Hq, Dv]`, None)."""
    if s_aux is not None:
        raise NotImplementedError("flash_attn_rs.hf.attention: attention sinks (s_aux) are not implemented")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"flash_attn_rs.hf.attention: query, key, value of ranks {query.dim()}, {key.dim()}, "
                         f"{value.dim()}: expected [B, H, S, D] each")
    (bq, _, _, dq), (bk, hk, sk, dk), (bv, hv, sv, _) = query.shape, key.shape, value.shape
    if bk != bq or bv != bq or hv != hk or sv != sk or dk != dq:
        raise ValueError(f"flash_attn_rs.hf.attention: query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                         f"{tuple(value.shape)}: key and value must share the batch ({bq}), heads and length, and key "
                         "the query's head dim")
    q, k, v = _half(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    d, dv = q.shape[-1], v.shape[-1]
    if dv < d:  # e.g. MLA's value head dim below the query's: zero columns, cut from the result below
        v = F.pad(v, [0, d - dv])
    elif dv > d:
        raise ValueError(f"flash_attn_rs.hf.attention: value's head dim {dv} exceeds query's {d}")
    deterministic = kwargs.get("deterministic")
    if deterministic is None:
        deterministic = os.environ.get("FLASH_ATTENTION_DETERMINISTIC", "0") == "1"
    opts = {
        "softmax_scale": scaling,
        "causal": bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)),
        "window_size": (sliding_window - 1, sliding_window - 1) if sliding_window else (-1, -1),
        "softcap": softcap if softcap else 0.0,
    }
    train = {"dropout_p": dropout, "deterministic": bool(deterministic)}
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if attention_mask is not None:
        out = _padded(q, k, v, attention_mask, opts, train)
    elif cu_q is not None and cu_k is not None:
        out = _packed(q, k, v, cu_q, cu_k, kwargs.get("max_length_q"), kwargs.get("max_length_k"), opts, train)
    elif (cu := _position_starts(kwargs.get("position_ids"), q)) is not None:
        out = _packed(q, k, v, cu[0], cu[0], cu[1], cu[1], opts, train)
    elif _sdpa_decodes(q, k, v, dropout):
        out = flash_attn_with_kvcache(q, k, v, cache_seqlens=k.shape[1], **opts)
    else:
        out = flash_attn_func(q, k, v, **opts, **train)
    return (out[..., :dv] if dv < d else out), None


def _half(q, k, v):
    """q, k, v in one half dtype: q's, or autocast's for float32 under autocast."""
    dt = q.dtype
    if dt not in _HALF:
        dev = q.device.type
        if dt == torch.float32 and torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) in _HALF:
            dt = torch.get_autocast_dtype(dev)
        else:
            raise TypeError(f"flash_attn_rs.hf.attention: query is {dt}: the kernels take torch.float16 or "
                            "torch.bfloat16 (load the model in one, or run it under autocast)")
    return tuple(t if t.dtype == dt else t.to(dt) for t in (q, k, v))


def _flat(t):
    """t `[B, S, H, D]` as `[B * S, H, D]` (a view where the layout allows, else a copy)."""
    return t.reshape(t.shape[0] * t.shape[1], t.shape[2], t.shape[3])


def _packed(q, k, v, cu_q, cu_k, max_q, max_k, opts, train):
    """Sequences packed along the batch's rows (batch 1 in practice), cut by int32 cu_seqlens."""
    b, sq = q.shape[:2]
    lens = [c if c.dtype == torch.int32 else c.to(torch.int32) for c in (cu_q, cu_k)]
    # Lengths held in tensors stay on the device: the kernels find each sequence themselves.
    max_q, max_k = (m if isinstance(m, int) else None for m in (max_q, max_k))
    out = flash_attn_varlen_func(_flat(q), _flat(k), _flat(v), lens[0], lens[1], max_q, max_k, **opts, **train)
    return out.view(b, sq, *out.shape[1:])


# Per-tensor results of host reads and small index computations, so that the layers of one forward, which get
# the same mask / position_ids tensor, pay for them once. Keyed weakly on the tensor and checked against its
# version counter: an in-place write invalidates the entry. Writes PyTorch does not count (through `.data`, a
# numpy view of a CPU tensor, DLPack) are caught for CPU tensors by a copy of their contents, compared at each
# call (cheap beside the attention; a device tensor's would be a read back and a synchronization: there only the
# counter). Inference tensors (torch.inference_mode) have no version counter: each call recomputes.
_MEMO = WeakTensorKeyDictionary()


def _memo(t, key, compute):
    if torch.compiler.is_compiling() or t.is_inference():  # inference tensors have no version counter
        return compute()
    entry = _MEMO.get(t)
    host = t.device.type == "cpu"
    if entry is None or entry[0] != t._version or (host and not _same_contents(entry[1], t)):
        entry = (t._version, t.detach().clone() if host else None, {})
        _MEMO[t] = entry
    if key not in entry[2]:
        entry[2][key] = compute()
    return entry[2][key]


def _same_contents(copy, t):
    return copy.shape == t.shape and copy.dtype == t.dtype and bool(torch.equal(copy, t.detach()))


def _position_starts(pos, q):
    """(cu_seqlens int32, longest) when position_ids `[1, S]` packs several sequences (each restarting at
    the smallest position), else None."""
    if pos is None or q.shape[0] != 1 or q.shape[1] == 1 or pos.dim() != 2 or pos.shape != (1, q.shape[1]):
        return None

    def compute():
        p = pos.reshape(-1)
        start = p == p.min()
        start[0] = True
        starts = start.nonzero().flatten().to(torch.int32)
        if starts.numel() < 2:
            return None
        cu = torch.cat([starts, starts.new_tensor([p.numel()])]).to(q.device)
        return cu, int(cu.diff().max())

    return _memo(pos, ("pos", q.device), compute)


def _runs(m):
    """Per row of a bool mask `[B, L]`: the first real position and the count of real ones (int32)."""
    count = m.sum(1, dtype=torch.int32)
    first = m.to(torch.int32).argmax(1).to(torch.int32)  # the first maximum: the first True (0 for none)
    return first, count


def _has_holes(m, first, count):
    """Whether some row's real positions are not one run (read back to the host)."""
    last = m.shape[1] - 1 - m.flip(1).to(torch.int32).argmax(1)
    return bool(((count > 0) & (last - first + 1 != count)).any())


def _slots(first, count, s):
    """cu_seqlens and seqused of the padded batch's rows `[B * s]` as B + 1 sequences: an empty one over
    row 0's leading padding, then row b's run of `count[b]` real tokens from `b * s + first[b]`, whose slot
    reaches to the start of the next row's run (its padding and the next row's leading padding: written 0)."""
    b = first.shape[0]
    zero = first.new_zeros(1)
    starts = torch.arange(b, dtype=torch.int32, device=first.device) * s + first
    return torch.cat([zero, starts, zero + b * s]), torch.cat([zero, count])


def _padded(q, k, v, mask, opts, train, memo_key=None, compact_compiled=False):
    """Attention over the padded batch under `mask` `[B, L]` (see the module); `memo_key`: the tensor whose version
    keys the cached index computations (default `mask`; a caller's own mask that `mask` is a view of). Compiled
    calls cannot look for holes: with `compact_compiled` they compact every mask (correct for any mask, a gather of
    k and v more), else they take the mask as one run per row."""
    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    if mask.dim() != 2 or mask.shape[0] != b or mask.shape[1] > sk:
        raise ValueError(f"flash_attn_rs.hf.attention: attention_mask of shape {tuple(mask.shape)}: expected a padding "
                         f"mask [{b}, L] with L <= {sk} keys (the mask function register() installs, padding_mask, gives one)")
    lk = mask.shape[1]
    if lk == 0 or sq == 0:  # no keys (or no queries): every query row sees nothing, out 0
        return q.new_zeros(b, sq, *q.shape[2:])
    if lk < sk:  # a static cache's unused tail
        k, v = k[:, :lk], v[:, :lk]
    # Without a causal mask or window every query row sees every real key, wherever it stands: each is computed
    # (padded ones too, harmlessly, as SDPA does). That keeps the decoder's rows of an encoder-decoder's
    # cross-attention (not causal, over the encoder's padding mask, other lengths or not) all real.
    every = not opts["causal"] and tuple(opts["window_size"]) == (-1, -1)
    if sq > lk and not every:
        raise ValueError(f"flash_attn_rs.hf.attention: {sq} queries over an attention_mask of {lk} keys")

    def compute():
        mk = mask.to(q.device)
        m = mk if mk.dtype == torch.bool else mk > 0
        # The queries are the last sq positions (flash-attn's path), or with a static cache's unwritten slots
        # (UNWRITTEN entries) the last sq written ones; the one row of a decoding step is real.
        if sq == 1:
            mq = torch.ones(b, 1, dtype=torch.bool, device=m.device)
        elif mk.dtype == torch.bool:
            mq = m[:, lk - sq:]
        else:
            at = (mk >= 0).sum(1, keepdim=True) - sq + torch.arange(sq, device=m.device)
            mq = m.gather(1, at.clamp(min=0)) & (at >= 0)
        perm = perm_q = None
        if (compact_compiled if torch.compiler.is_compiling() else _has_holes(m, *_runs(m))):
            # Holes: each row's real tokens moved to its front, in order (what unpadding does), put back after.
            perm = torch.argsort((~m).to(torch.int8), dim=1, stable=True)
            if not every and sq > 1:
                perm_q = perm if sq == lk else torch.argsort((~mq).to(torch.int8), dim=1, stable=True)
            m = m.gather(1, perm)
            if perm_q is not None:
                mq = mq.gather(1, perm_q)
        first_k, count_k = _runs(m)
        # A query sees keys up to its own position: the real queries end where the real keys do (a suffix of
        # one run), so each row's bottom-right alignment of count_q queries over count_k keys is the causal one.
        runs_q = (torch.zeros_like(count_k), torch.full_like(count_k, sq)) if every else _runs(mq)
        return perm, perm_q, (first_k + count_k, first_k), _slots(*runs_q, sq) + _slots(first_k, count_k, lk)

    perm, perm_q, cache, slots = _memo(mask if memo_key is None else memo_key, ("mask", b, sq, lk, every, q.device), compute)
    if perm is not None:
        k, v = (t.gather(1, perm[:, :, None, None].expand_as(t)) for t in (k, v))
    if perm_q is not None:
        q = q.gather(1, perm_q[:, :, None, None].expand_as(q))
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if (sq == 1 and not grad and train["dropout_p"] == 0 and k.stride(3) == 1 and v.stride(3) == 1
            and q.shape[3] in _torch_impl._DECODE_HEAD_DIMS and not _torch_impl._functorch_active()):
        # A decoding step over a padded cache: the KV cache's kernels over key and value in place, each row
        # seeing its keys from cache_leftpad to cache_seqlens (the one query row is real, as in flash-attn's path).
        return flash_attn_with_kvcache(q, k, v, cache_seqlens=cache[0], cache_leftpad=cache[1], **opts)
    cu_q, used_q, cu_k, used_k = slots
    out = flash_attn_varlen_func(_flat(q), _flat(k), _flat(v), cu_q, cu_k, None, None, seqused_q=used_q,
                                 seqused_k=used_k, **opts, **train)
    out = out.view(b, sq, *out.shape[1:])
    if perm_q is not None:
        out = torch.empty_like(out).scatter_(1, perm_q[:, :, None, None].expand_as(out), out)
    return out
