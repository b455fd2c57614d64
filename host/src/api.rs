//! The `Tensor` API: allocating entry points over the raw layer. Each checks that every tensor lives on
//! q's device, allocates the outputs there (and the backward's workspace), and runs `raw` on that device:
//! the CPU path, or the kernels on the legacy default stream (where `Tensor` orders all its work).

use crate::error::{Error, Result};
use crate::raw::{self, BwdViews, CombineViews, FwdViews, KvCacheViews, Workspace};
use crate::tensor::Tensor;
use crate::types::{DType, Device, KvCacheOptions, PagedVarlenViews, Target, VarlenViews, View, STREAM_LEGACY};
use crate::validate;

pub use crate::types::AttnOptions;

/// Packed-sequence layout for the varlen entry points.
#[derive(Clone, Copy, Debug)]
pub struct Varlen<'a> {
    /// int32 `[B+1]`: sequence b's queries are rows `cu_seqlens_q[b]..cu_seqlens_q[b+1]` of q.
    pub cu_seqlens_q: &'a Tensor,
    /// int32 `[B+1]`: sequence b's keys are rows `cu_seqlens_k[b]..cu_seqlens_k[b+1]` of k and v.
    pub cu_seqlens_k: &'a Tensor,
    /// At least every (used) query length; `None`: not known (see `VarlenViews::max_seqlen_k`).
    pub max_seqlen_q: Option<usize>,
    /// At least every (used) key length; `None`: not known.
    pub max_seqlen_k: Option<usize>,
    /// int32 `[B]`: only the first `seqused_q[b]` rows of slot b are real; the rest are written as 0.
    pub seqused_q: Option<&'a Tensor>,
    /// int32 `[B]`: only the first `seqused_k[b]` keys of slot b are attended to.
    pub seqused_k: Option<&'a Tensor>,
}

impl<'a> Varlen<'a> {
    /// The raw layer's view of these tensors.
    pub fn views(&self) -> VarlenViews<'a> {
        VarlenViews {
            cu_seqlens_q: self.cu_seqlens_q.view(),
            cu_seqlens_k: self.cu_seqlens_k.view(),
            max_seqlen_q: self.max_seqlen_q,
            max_seqlen_k: self.max_seqlen_k,
            seqused_q: self.seqused_q.map(Tensor::view),
            seqused_k: self.seqused_k.map(Tensor::view),
        }
    }
}

/// Packed sequences over a paged K/V cache, for `varlen_fwd_paged`: k and v are
/// `[num_blocks, page_size, Hk, D]`, and key t of sequence b is row `t % page_size` of block
/// `block_table[b][t / page_size]`.
#[derive(Clone, Copy, Debug)]
pub struct PagedVarlen<'a> {
    /// int32 `[B+1]`: sequence b's queries are rows `cu_seqlens_q[b]..cu_seqlens_q[b+1]` of q.
    pub cu_seqlens_q: &'a Tensor,
    /// int32 `[B+1]`: sequence b has `cu_seqlens_k[b+1] - cu_seqlens_k[b]` keys. `None`: `seqused_k`
    /// gives the key counts and is required.
    pub cu_seqlens_k: Option<&'a Tensor>,
    /// At least every (used) query length; `None`: not known (see `VarlenViews::max_seqlen_k`).
    pub max_seqlen_q: Option<usize>,
    /// At least every key count; `None`: not known.
    pub max_seqlen_k: Option<usize>,
    /// int32 `[B]`: only the first `seqused_q[b]` rows of slot b are real; the rest are written as 0.
    pub seqused_q: Option<&'a Tensor>,
    /// int32 `[B]`: sequence b attends to its first `seqused_k[b]` keys.
    pub seqused_k: Option<&'a Tensor>,
    /// int32 `[B, max_blocks]`: each sequence's pages, in order.
    pub block_table: &'a Tensor,
}

impl<'a> PagedVarlen<'a> {
    /// The raw layer's view of these tensors.
    pub fn views(&self) -> PagedVarlenViews<'a> {
        PagedVarlenViews {
            cu_seqlens_q: self.cu_seqlens_q.view(),
            cu_seqlens_k: self.cu_seqlens_k.map(Tensor::view),
            max_seqlen_q: self.max_seqlen_q,
            max_seqlen_k: self.max_seqlen_k,
            seqused_q: self.seqused_q.map(Tensor::view),
            seqused_k: self.seqused_k.map(Tensor::view),
            block_table: self.block_table.view(),
        }
    }
    fn tensors(&self) -> impl Iterator<Item = (&'static str, &'a Tensor)> {
        let opt = [("cu_seqlens_k", self.cu_seqlens_k), ("seqused_q", self.seqused_q), ("seqused_k", self.seqused_k)];
        [("cu_seqlens_q", self.cu_seqlens_q), ("block_table", self.block_table)].into_iter().chain(opt.into_iter().filter_map(|(a, t)| t.map(|t| (a, t))))
    }
}

/// The KV-cache forward's inputs beside q and the caches (flash-attn's `flash_attn_with_kvcache`; see
/// `raw::KvCacheViews` for the layouts). `KvCache::new(cache_seqlens)` leaves every optional one out.
#[derive(Clone, Copy, Debug)]
pub struct KvCache<'a> {
    /// int32 `[B]`: the end of row b's valid cache entries before the append.
    pub cache_seqlens: &'a Tensor,
    /// int32 `[B, max_blocks]`: the caches are paged, `[num_blocks, page_size, Hk, D]`.
    pub block_table: Option<&'a Tensor>,
    /// `[B, S_new, Hk, D]`: keys and values appended at positions `cache_seqlens[b]..` (both or neither).
    pub k_new: Option<&'a Tensor>,
    pub v_new: Option<&'a Tensor>,
    /// `[S_ro, rotary_dim / 2]`, q's dtype or f32: rotary embedding of q and k_new (both or neither).
    pub rotary_cos: Option<&'a Tensor>,
    pub rotary_sin: Option<&'a Tensor>,
    /// int32 `[B]`: the cache row of batch entry b (contiguous caches only).
    pub cache_batch_idx: Option<&'a Tensor>,
    /// int32 `[B]`: the first valid cache entry of each row.
    pub cache_leftpad: Option<&'a Tensor>,
    /// f32 `[Hq]` or `[B, Hq]`: ALiBi over each row's keys (see `raw::KvCacheViews::alibi_slopes`).
    pub alibi_slopes: Option<&'a Tensor>,
}

impl<'a> KvCache<'a> {
    pub fn new(cache_seqlens: &'a Tensor) -> KvCache<'a> {
        KvCache { cache_seqlens, block_table: None, k_new: None, v_new: None, rotary_cos: None, rotary_sin: None, cache_batch_idx: None, cache_leftpad: None, alibi_slopes: None }
    }
    /// The raw layer's views of a call with these inputs.
    fn views<'v>(&self, q: &'v Tensor, k_cache: View<'v>, v_cache: View<'v>, out: View<'v>, lse: View<'v>) -> KvCacheViews<'v>
    where
        'a: 'v,
    {
        KvCacheViews {
            q: q.view(),
            k_cache,
            v_cache,
            cache_seqlens: self.cache_seqlens.view(),
            block_table: self.block_table.map(Tensor::view),
            k_new: self.k_new.map(Tensor::view),
            v_new: self.v_new.map(Tensor::view),
            rotary_cos: self.rotary_cos.map(Tensor::view),
            rotary_sin: self.rotary_sin.map(Tensor::view),
            cache_batch_idx: self.cache_batch_idx.map(Tensor::view),
            cache_leftpad: self.cache_leftpad.map(Tensor::view),
            alibi_slopes: self.alibi_slopes.map(Tensor::view),
            out,
            lse,
        }
    }
    fn tensors(&self) -> impl Iterator<Item = (&'static str, &'a Tensor)> {
        let opt = [
            ("block_table", self.block_table),
            ("k_new", self.k_new),
            ("v_new", self.v_new),
            ("rotary_cos", self.rotary_cos),
            ("rotary_sin", self.rotary_sin),
            ("cache_batch_idx", self.cache_batch_idx),
            ("cache_leftpad", self.cache_leftpad),
            ("alibi_slopes", self.alibi_slopes),
        ];
        std::iter::once(("cache_seqlens", self.cache_seqlens)).chain(opt.into_iter().filter_map(|(a, t)| t.map(|t| (a, t))))
    }
}

/// The optional inputs and outputs of a call beyond q, k, v and `AttnOptions`: flash-attn's
/// `alibi_slopes` and `return_attn_probs`. Give the backward the same as the forward (it reads the
/// slopes; dropout's mask comes from `AttnOptions::dropout`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Extras<'a> {
    /// f32 `[Hq]` or `[B, Hq]` (B sequences for varlen), on q's device: ALiBi, the score of query i and
    /// key j becoming `softcap(scale * q_i . k_j) - slope * |i + Sk - Sq - j|` (see
    /// `raw::FwdViews::alibi_slopes`).
    pub alibi_slopes: Option<&'a Tensor>,
    /// The forward also returns `s_dmask`, the probabilities (`FwdOutput::s_dmask`). O(S^2): for tests.
    pub return_attn_probs: bool,
}

/// Attention output in the input dtype and the f32 row log-sum-exp (natural log; -inf for empty rows).
#[derive(Clone, Debug)]
pub struct FwdOutput {
    /// `[B, Sq, Hq, D]`, or `[Tq, Hq, D]` for varlen.
    pub out: Tensor,
    /// `[B, Hq, Sq]`, or `[Hq, Tq]` for varlen.
    pub lse: Tensor,
    /// With `Extras::return_attn_probs`: f32 `[B, Hq, Sq, Sk]` (varlen `[B, Hq, max_seqlen_q,
    /// max_seqlen_k]`, zero-padded), the softmax probabilities before dropout's scaling, negated where
    /// dropout dropped them, 0 where the mask hides a key (see `raw::FwdViews::s_dmask`).
    pub s_dmask: Option<Tensor>,
}

/// Gradients of the loss with respect to q, k and v: contiguous, in the input dtype, with q's, k's and
/// v's shapes.
#[derive(Clone, Debug)]
pub struct BwdOutput {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
}

/// Dense forward: q `[B, Sq, Hq, D]`, k and v `[B, Sk, Hk, D]`.
pub fn fwd(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttnOptions) -> Result<FwdOutput> {
    run_fwd(q, k, v, None, &Extras::default(), opts)
}

/// Packed forward: q `[Tq, Hq, D]`, k and v `[Tk, Hk, D]`, sequences given by `varlen`.
pub fn varlen_fwd(q: &Tensor, k: &Tensor, v: &Tensor, varlen: &Varlen<'_>, opts: &AttnOptions) -> Result<FwdOutput> {
    run_fwd(q, k, v, Some(varlen), &Extras::default(), opts)
}

/// `fwd` with ALiBi slopes and / or the probabilities (`extras`), on either device (with dropout too).
pub fn fwd_with(q: &Tensor, k: &Tensor, v: &Tensor, extras: &Extras<'_>, opts: &AttnOptions) -> Result<FwdOutput> {
    run_fwd(q, k, v, None, extras, opts)
}

/// `varlen_fwd` with ALiBi slopes (`[Hq]` or `[B, Hq]`, B sequences) and / or the probabilities.
pub fn varlen_fwd_with(q: &Tensor, k: &Tensor, v: &Tensor, varlen: &Varlen<'_>, extras: &Extras<'_>, opts: &AttnOptions) -> Result<FwdOutput> {
    run_fwd(q, k, v, Some(varlen), extras, opts)
}

/// Dense forward into caller-provided outputs: `out` `[B, Sq, Hq, D]` in q's dtype (any row/head/batch
/// strides, last dim contiguous) and `lse` contiguous f32 `[B, Hq, Sq]`, on q's device. Nothing outside
/// the two views is written.
pub fn fwd_into(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttnOptions, out: &mut Tensor, lse: &mut Tensor) -> Result<()> {
    run_fwd_into(q, k, v, None, None, opts, out, lse, None)
}

/// Packed forward into caller-provided outputs: `out` `[Tq, Hq, D]`, `lse` contiguous f32 `[Hq, Tq]`.
/// With static shapes (graph capture), every row of both is written, padding included.
pub fn varlen_fwd_into(q: &Tensor, k: &Tensor, v: &Tensor, varlen: &Varlen<'_>, opts: &AttnOptions, out: &mut Tensor, lse: &mut Tensor) -> Result<()> {
    run_fwd_into(q, k, v, Some(varlen), None, opts, out, lse, None)
}

/// Dense backward: the gradients of q, k, v given `dout` (the gradient of `out`) and the forward's `out`
/// and `lse` (both as `fwd` returned them, for the same `opts`). dout and out are `[B, Sq, Hq, D]` in q's
/// dtype (head dim contiguous); lse is contiguous f32 `[B, Hq, Sq]`.
///
/// `deterministic` asks for bitwise-reproducible gradients. The CPU path always is: every gradient
/// element is one sequential f32 sum in a fixed order, whatever the number of threads.
#[allow(clippy::too_many_arguments)]
pub fn bwd(dout: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, lse: &Tensor, opts: &AttnOptions, deterministic: bool) -> Result<BwdOutput> {
    run_bwd(dout, q, k, v, out, lse, None, None, opts, deterministic)
}

/// `bwd` of a forward run with `fwd_with`: give it the same `extras` (the ALiBi slopes are read;
/// `return_attn_probs` is ignored) and the same `opts` (dropout's mask is regenerated from them).
#[allow(clippy::too_many_arguments)]
pub fn bwd_with(dout: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, lse: &Tensor, extras: &Extras<'_>, opts: &AttnOptions, deterministic: bool) -> Result<BwdOutput> {
    run_bwd(dout, q, k, v, out, lse, None, extras.alibi_slopes, opts, deterministic)
}

/// Packed backward: dout and out `[Tq, Hq, D]`, lse `[Hq, Tq]`, sequences given by `varlen` as in
/// `varlen_fwd`. Rows of no sequence (seqused padding, tail rows) get dq = 0, and keys past a sequence's
/// used length get dk = dv = 0.
#[allow(clippy::too_many_arguments)]
pub fn varlen_bwd(dout: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, lse: &Tensor, varlen: &Varlen<'_>, opts: &AttnOptions, deterministic: bool) -> Result<BwdOutput> {
    run_bwd(dout, q, k, v, out, lse, Some(varlen), None, opts, deterministic)
}

/// `varlen_bwd` of a forward run with `varlen_fwd_with` (the same `extras` and `opts`).
#[allow(clippy::too_many_arguments)]
pub fn varlen_bwd_with(dout: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, lse: &Tensor, varlen: &Varlen<'_>, extras: &Extras<'_>, opts: &AttnOptions, deterministic: bool) -> Result<BwdOutput> {
    run_bwd(dout, q, k, v, out, lse, Some(varlen), extras.alibi_slopes, opts, deterministic)
}

/// Packed forward over a paged K/V cache: q `[Tq, Hq, D]`, k and v `[num_blocks, page_size, Hk, D]`,
/// sequences and pages given by `varlen`. Out `[Tq, Hq, D]`, lse `[Hq, Tq]` as `varlen_fwd`. On CUDA the
/// index tensors' contents are not checked (see `raw::varlen_fwd_paged`: the kernels clamp them).
pub fn varlen_fwd_paged(q: &Tensor, k: &Tensor, v: &Tensor, varlen: &PagedVarlen<'_>, opts: &AttnOptions) -> Result<FwdOutput> {
    varlen_fwd_paged_with(q, k, v, varlen, &Extras::default(), opts)
}

/// `varlen_fwd_paged` with ALiBi slopes and / or the probabilities (`extras`).
pub fn varlen_fwd_paged_with(q: &Tensor, k: &Tensor, v: &Tensor, varlen: &PagedVarlen<'_>, extras: &Extras<'_>, opts: &AttnOptions) -> Result<FwdOutput> {
    let others: Vec<(&'static str, &Tensor)> = [("k", k), ("v", v)].into_iter().chain(varlen.tensors()).chain(extras.alibi_slopes.map(|t| ("alibi_slopes", t))).collect();
    let device = same_device(q, &others, None)?;
    let vl = varlen.views();
    let mut p = validate::validate_varlen_paged(&q.view(), &k.view(), &v.view(), &vl, opts)?;
    validate::check_alibi(&mut p, extras.alibi_slopes.map(Tensor::view).as_ref())?;
    let mut out = Tensor::uninit(&p.out_shape(), q.dtype(), device)?;
    let mut lse = Tensor::uninit(&p.lse_shape(), DType::F32, device)?;
    let mut s_dmask = if extras.return_attn_probs { Some(s_dmask_tensor(&p.s_dmask_shape()?, device)?) } else { None };
    let views = FwdViews {
        q: q.view(),
        k: k.view(),
        v: v.view(),
        out: out.view_mut(),
        lse: lse.view_mut(),
        alibi_slopes: extras.alibi_slopes.map(Tensor::view),
        s_dmask: s_dmask.as_mut().map(Tensor::view_mut),
    };
    // Safety: every view is of a live tensor on `device`.
    unsafe { raw::varlen_fwd_paged(&views, &vl, opts, target(device)) }?;
    Ok(FwdOutput { out, lse, s_dmask })
}

/// KV-cache forward, flash-attn's `flash_attn_with_kvcache`: q `[B, Sq, Hq, D]` over the caches
/// `[B_cache, S_cache, Hk, D]` (or paged, with `cache.block_table`), after appending `cache.k_new` /
/// `cache.v_new` to them in place (k_new rotated when `cache.rotary_cos` / `rotary_sin` are given; q is
/// rotated too). Out `[B, Sq, Hq, D]`, lse `[B, Hq, Sq]`. On CUDA the kernels clamp the index
/// tensors' contents instead of checking them (see `raw::fwd_kvcache`).
pub fn fwd_kvcache(q: &Tensor, k_cache: &mut Tensor, v_cache: &mut Tensor, cache: &KvCache<'_>, opts: &AttnOptions, kv: &KvCacheOptions) -> Result<FwdOutput> {
    let others: Vec<(&'static str, &Tensor)> = [("k_cache", &*k_cache), ("v_cache", &*v_cache)].into_iter().chain(cache.tensors()).collect();
    let device = same_device(q, &others, None)?;
    // The outputs are q's size (everything else is checked by the raw layer).
    let &[b, sq, hq, d] = q.shape() else { return Err(Error::Rank { arg: "q", got: q.rank(), expected: 4 }) };
    let mut out = Tensor::uninit(&[b, sq, hq, d], q.dtype(), device)?;
    let mut lse = Tensor::uninit(&[b, hq, sq], DType::F32, device)?;
    let views = cache.views(q, k_cache.view_mut(), v_cache.view_mut(), out.view_mut(), lse.view_mut());
    // The workspace (q rotated, split-KV's partials) is freed on the stream after the kernels using it.
    let ws_buf = match (device, raw::kvcache_workspace_bytes(&views, opts, kv, target(device))?) {
        (Device::Cuda(ordinal), bytes) if bytes > 0 => Some(crate::cuda::DeviceBuffer::uninit(ordinal, bytes)?),
        _ => None,
    };
    let workspace = ws_buf.as_ref().map_or(Workspace::default(), |b| Workspace { addr: b.ptr(), bytes: b.len_bytes() });
    // Safety: every view is of a live tensor on `device`; the caches are borrowed mutably.
    unsafe { raw::fwd_kvcache(&views, opts, kv, workspace, target(device)) }?;
    Ok(FwdOutput { out, lse, s_dmask: None })
}

/// Merges partial attention results over disjoint key sets of the same queries: `partial_out`
/// `[n, B, Sq, H, D]` (or packed `[n, T, H, D]`; f16, bf16 or f32) with f32 `partial_lse`
/// `[n, B, H, Sq]` (`[n, H, T]`), into out (partial_out's dtype, the shape without n) and lse: the
/// exact log-sum-exp merge. Out and lse of split-KV, or of context parallelism's shards.
pub fn combine(partial_out: &Tensor, partial_lse: &Tensor) -> Result<FwdOutput> {
    let device = same_device(partial_out, &[("partial_lse", partial_lse)], None)?;
    let (os, ls) = (partial_out.shape(), partial_lse.shape());
    let mut out = Tensor::uninit(os.get(1..).unwrap_or(&[]), partial_out.dtype(), device)?;
    let mut lse = Tensor::uninit(ls.get(1..).unwrap_or(&[]), DType::F32, device)?;
    let views = CombineViews { partial_out: partial_out.view(), partial_lse: partial_lse.view(), out: out.view_mut(), lse: lse.view_mut() };
    // Safety: every view is of a live tensor on `device`.
    unsafe { raw::combine(&views, target(device)) }?;
    Ok(FwdOutput { out, lse, s_dmask: None })
}

/// Copies the varlen length tensors to the host (from the device if need be) and checks their contents:
/// the check the entry points skip for device tensors, for callers who want it. `total_q`/`total_k` are
/// the row counts of q and k.
pub fn check_varlen_contents(varlen: &Varlen<'_>, total_q: usize, total_k: usize) -> Result<crate::problem::HostSeqlens> {
    let read = |arg: &'static str, t: &Tensor| -> Result<Vec<i32>> {
        if t.dtype() != DType::I32 {
            return Err(Error::DType { arg, got: t.dtype().to_string(), expected: "i32" });
        }
        if t.rank() != 1 {
            return Err(Error::Rank { arg, got: t.rank(), expected: 1 });
        }
        t.to_i32_vec()
    };
    let host = crate::problem::HostSeqlens {
        cu_seqlens_q: read("cu_seqlens_q", varlen.cu_seqlens_q)?,
        cu_seqlens_k: read("cu_seqlens_k", varlen.cu_seqlens_k)?,
        seqused_q: varlen.seqused_q.map(|t| read("seqused_q", t)).transpose()?,
        seqused_k: varlen.seqused_k.map(|t| read("seqused_k", t)).transpose()?,
    };
    validate::check_varlen_contents(host, varlen.max_seqlen_q, varlen.max_seqlen_k, total_q, total_k)
}

/// What the CUDA path leaves to the kernels' clamps, checked on host tensors: a paged call's lengths and
/// block table (every tensor on the CPU; k and v are read for their shapes only). The same typed errors
/// the CPU path gives: for callers that hold the indices on the host anyway (the CLI) and want a bad
/// one reported rather than clamped on the device.
pub fn check_paged_varlen_contents(q: &Tensor, k: &Tensor, v: &Tensor, varlen: &PagedVarlen<'_>, opts: &AttnOptions) -> Result<()> {
    let others: Vec<(&'static str, &Tensor)> = [("k", k), ("v", v)].into_iter().chain(varlen.tensors()).collect();
    host_only(q, &others)?;
    let vl = varlen.views();
    let p = validate::validate_varlen_paged(&q.view(), &k.view(), &v.view(), &vl, opts)?;
    // Safety: every view is of a live host tensor.
    let host = unsafe { crate::cpu::host_paged_seqlens(&vl) };
    validate::check_paged_varlen_contents(&p, host, vl.max_seqlen_q, vl.max_seqlen_k).map(|_| ())
}

/// `check_paged_varlen_contents` for the KV cache: cache_seqlens, cache_leftpad, cache_batch_idx, the
/// block table and the rotary tables' positions against the caches, on host tensors.
pub fn check_kvcache_contents(q: &Tensor, k_cache: &Tensor, v_cache: &Tensor, cache: &KvCache<'_>, opts: &AttnOptions, kv: &KvCacheOptions) -> Result<()> {
    let others: Vec<(&'static str, &Tensor)> = [("k_cache", k_cache), ("v_cache", v_cache)].into_iter().chain(cache.tensors()).collect();
    host_only(q, &others)?;
    let &[b, sq, hq, d] = q.shape() else { return Err(Error::Rank { arg: "q", got: q.rank(), expected: 4 }) };
    let mut out = Tensor::uninit(&[b, sq, hq, d], q.dtype(), Device::Cpu)?;
    let mut lse = Tensor::uninit(&[b, hq, sq], DType::F32, Device::Cpu)?;
    let views = cache.views(q, k_cache.view(), v_cache.view(), out.view_mut(), lse.view_mut());
    let kp = validate::validate_kvcache(&views, opts, kv)?;
    // Safety: every view is of a live host tensor.
    validate::check_kvcache_contents(&kp, unsafe { crate::cpu::host_kvcache(&views) }).map(|_| ())
}

/// Every tensor on the CPU (the content checks read them).
fn host_only(q: &Tensor, others: &[(&'static str, &Tensor)]) -> Result<()> {
    for (arg, t) in std::iter::once(("q", q)).chain(others.iter().copied()) {
        if t.device() != Device::Cpu {
            return Err(Error::Value { arg, msg: format!("is on {:?}: the content checks read host tensors", t.device()) });
        }
    }
    Ok(())
}

/// The raw target for tensors on `device`: the `Tensor` API runs on the legacy default stream.
fn target(device: Device) -> Target {
    match device {
        Device::Cpu => Target::Cpu,
        Device::Cuda(ordinal) => Target::Cuda { ordinal, stream: STREAM_LEGACY },
    }
}

/// Every tensor on q's device; returns it.
fn same_device(q: &Tensor, others: &[(&'static str, &Tensor)], varlen: Option<&Varlen<'_>>) -> Result<Device> {
    let lens = varlen.map(|vl| [Some(("cu_seqlens_q", vl.cu_seqlens_q)), Some(("cu_seqlens_k", vl.cu_seqlens_k)), vl.seqused_q.map(|t| ("seqused_q", t)), vl.seqused_k.map(|t| ("seqused_k", t))]);
    for (arg, t) in others.iter().copied().chain(lens.into_iter().flatten().flatten()) {
        if t.device() != q.device() {
            return Err(Error::DeviceMismatch { arg, got: t.device().to_string(), expected: q.device().to_string() });
        }
    }
    Ok(q.device())
}

fn run_fwd(q: &Tensor, k: &Tensor, v: &Tensor, varlen: Option<&Varlen<'_>>, extras: &Extras<'_>, opts: &AttnOptions) -> Result<FwdOutput> {
    let slopes = extras.alibi_slopes.map(|t| ("alibi_slopes", t));
    let others: Vec<(&'static str, &Tensor)> = [("k", k), ("v", v)].into_iter().chain(slopes).collect();
    let device = same_device(q, &others, varlen)?;
    let mut p = validate::validate_fwd(&q.view(), &k.view(), &v.view(), varlen.map(Varlen::views).as_ref(), opts)?;
    validate::check_alibi(&mut p, extras.alibi_slopes.map(Tensor::view).as_ref())?;
    let mut out = Tensor::uninit(&p.out_shape(), q.dtype(), device)?;
    let mut lse = Tensor::uninit(&p.lse_shape(), DType::F32, device)?;
    let mut s_dmask = if extras.return_attn_probs { Some(s_dmask_tensor(&p.s_dmask_shape()?, device)?) } else { None };
    run_fwd_into(q, k, v, varlen, extras.alibi_slopes, opts, &mut out, &mut lse, s_dmask.as_mut())?;
    Ok(FwdOutput { out, lse, s_dmask })
}

#[allow(clippy::too_many_arguments)]
fn run_fwd_into(q: &Tensor, k: &Tensor, v: &Tensor, varlen: Option<&Varlen<'_>>, alibi_slopes: Option<&Tensor>, opts: &AttnOptions, out: &mut Tensor, lse: &mut Tensor, s_dmask: Option<&mut Tensor>) -> Result<()> {
    let mut others = vec![("k", k), ("v", v), ("out", &*out), ("lse", &*lse)];
    others.extend(alibi_slopes.map(|t| ("alibi_slopes", t)));
    let device = same_device(q, &others, varlen)?;
    if let Some(m) = &s_dmask {
        same_device(q, &[("s_dmask", m)], None)?;
    }
    let views = FwdViews {
        q: q.view(),
        k: k.view(),
        v: v.view(),
        out: out.view_mut(),
        lse: lse.view_mut(),
        alibi_slopes: alibi_slopes.map(Tensor::view),
        s_dmask: s_dmask.map(|m| m.view_mut()),
    };
    // Decoding steps on CUDA (`raw::dense_fwd_decodes`) run the KV cache's split-KV decode kernels over k and
    // v in place (`raw::fwd_decode`; errors name the dense forward's arguments).
    if let (Device::Cuda(ordinal), None, true) = (device, varlen, views.alibi_slopes.is_none() && views.s_dmask.is_none())
        && raw::dense_fwd_decodes(q.shape(), k.shape(), q.dtype(), opts, false)
    {
        return decode_fwd(&views, opts, ordinal);
    }
    // Safety: every view is of a live tensor on `device`, which the legacy stream orders its frees after.
    unsafe {
        match varlen {
            None => raw::fwd(&views, opts, target(device)),
            Some(vl) => raw::varlen_fwd(&views, &vl.views(), opts, target(device)),
        }
    }
}

/// return_attn_probs' output, f32 of `shape` (O(S^2): too large for memory is an error naming it).
fn s_dmask_tensor(shape: &[usize], device: Device) -> Result<Tensor> {
    Tensor::zeros(shape, DType::F32, device).map_err(|e| match e {
        Error::TooLarge { msg, .. } => Error::TooLarge { arg: "s_dmask", msg: format!("{shape:?} f32 (return_attn_probs): {msg}") },
        e => e,
    })
}

/// A dense forward on device `ordinal` as a decoding step (`raw::fwd_decode`), with its workspace (where it
/// needs one) allocated here and freed after the kernels on the legacy stream.
fn decode_fwd(views: &FwdViews<'_>, opts: &AttnOptions, ordinal: usize) -> Result<()> {
    let device = Device::Cuda(ordinal);
    let bytes = raw::decode_workspace_bytes(views, opts, target(device))?;
    let ws_buf = if bytes > 0 { Some(crate::cuda::DeviceBuffer::uninit(ordinal, bytes)?) } else { None };
    let workspace = ws_buf.as_ref().map_or(Workspace::default(), |b| Workspace { addr: b.ptr(), bytes: b.len_bytes() });
    // Safety: every view is of a live tensor on `device` (k and v only read).
    unsafe { raw::fwd_decode(views, opts, workspace, target(device)) }
}

#[allow(clippy::too_many_arguments)]
fn run_bwd(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    varlen: Option<&Varlen<'_>>,
    alibi_slopes: Option<&Tensor>,
    opts: &AttnOptions,
    deterministic: bool,
) -> Result<BwdOutput> {
    let mut others = vec![("k", k), ("v", v), ("dout", dout), ("out", out), ("lse", lse)];
    others.extend(alibi_slopes.map(|t| ("alibi_slopes", t)));
    let device = same_device(q, &others, varlen)?;
    let vl = varlen.map(Varlen::views);
    let bp = validate::validate_bwd(&dout.view(), &q.view(), &k.view(), &v.view(), &out.view(), &lse.view(), vl.as_ref(), opts)?;
    let p = &bp.fwd;
    let mut dq = Tensor::uninit(&p.out_shape(), q.dtype(), device)?;
    let mut dk = Tensor::uninit(&p.kv_shape(), q.dtype(), device)?;
    let mut dv = Tensor::uninit(&p.kv_shape(), q.dtype(), device)?;
    // The workspace is freed on the stream after the kernels that use it.
    let ws_buf = match device {
        Device::Cpu => None,
        Device::Cuda(ordinal) => Some(crate::cuda::DeviceBuffer::uninit(ordinal, raw::bwd_workspace_bytes_fast(q.shape(), p.batch, p.hk, deterministic)?)?),
    };
    let workspace = ws_buf.as_ref().map_or(Workspace::default(), |b| Workspace { addr: b.ptr(), bytes: b.len_bytes() });
    let views = BwdViews {
        dout: dout.view(),
        q: q.view(),
        k: k.view(),
        v: v.view(),
        out: out.view(),
        lse: lse.view(),
        dq: dq.view_mut(),
        dk: dk.view_mut(),
        dv: dv.view_mut(),
        alibi_slopes: alibi_slopes.map(Tensor::view),
    };
    // Safety: as in run_fwd_into; the workspace is a live buffer of the required size.
    unsafe {
        match &vl {
            None => raw::bwd(&views, opts, deterministic, workspace, target(device)),
            Some(vl) => raw::varlen_bwd(&views, vl, opts, deterministic, workspace, target(device)),
        }
    }?;
    drop(ws_buf);
    Ok(BwdOutput { dq, dk, dv })
}
