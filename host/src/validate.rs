//! Every argument check, before anything runs: each failure is a typed `Error` naming the argument. The
//! result is a `Problem` in canonical form (causal folded into the window, default scale filled in,
//! strides copied out), so neither the CPU path nor the kernels re-check anything.
//!
//! Sizes are checked in u128 so that no combination of shapes and strides can overflow (or panic) here.

use crate::error::{Error, Result};
use crate::problem::{Alibi, BwdProblem, CombineProblem, Dims, DropoutParams, HostKeys, HostKvCache, HostPagedSeqlens, HostSeqlens, KvCacheProblem, Paged, Problem, Rotary, Strides, MAX_SPLITS};
use crate::types::{AttnOptions, BwdViews, CombineViews, DType, FwdViews, KvCacheOptions, KvCacheViews, PagedVarlenViews, VarlenViews, View, Workspace};
use crate::HEAD_DIMS;

const I32_MAX: u128 = i32::MAX as u128;
const I64_MAX: u128 = i64::MAX as u128;

/// Checks q, k, v (and the varlen lengths) against each other and `opts`, and returns the canonical problem.
pub fn validate_fwd(q: &View<'_>, k: &View<'_>, v: &View<'_>, varlen: Option<&VarlenViews<'_>>, opts: &AttnOptions) -> Result<Problem> {
    let rank = if varlen.is_some() { 3 } else { 4 };
    let (hq, hk, d) = check_operands(q, ("k", k), ("v", v), rank, rank)?;
    let (qs, ks) = (q.shape, k.shape);
    if varlen.is_none() && ks[0] != qs[0] {
        return Err(Error::Shape { arg: "k", msg: format!("batch size {} must equal q's batch size {}", ks[0], qs[0]) });
    }

    // Varlen structure: B comes from cu_seqlens; lengths must be int32 vectors of matching size.
    let (batch, seqlen_q, seqlen_k, total_q, total_k) = match varlen {
        None => {
            let total_q = checked_rows("q", qs[0], qs[1])?;
            let total_k = checked_rows("k", ks[0], ks[1])?;
            (qs[0], qs[1], ks[1], total_q, total_k)
        }
        Some(vl) => {
            let batch = check_varlen_structure(vl)?;
            (batch, vl.max_seqlen_q.unwrap_or(mean_len(qs[0], batch)), vl.max_seqlen_k.unwrap_or(mean_len(ks[0], batch)), qs[0], ks[0])
        }
    };
    check_options(opts)?;

    // Everything the kernels index with i32 (rows, heads, sequences) and i64 (element offsets).
    fits_i32("q", "batch size", batch)?;
    fits_i32("q", "num_heads", hq)?;
    fits_i32("k", "num_heads_k", hk)?;
    fits_i32(if varlen.is_some() { "max_seqlen_q" } else { "q" }, "seqlen_q", seqlen_q)?;
    fits_i32(if varlen.is_some() { "max_seqlen_k" } else { "k" }, "seqlen_k", seqlen_k)?;
    fits_i32("q", "total query rows", total_q)?;
    fits_i32("k", "total key rows", total_k)?;
    for (arg, t) in [("q", q), ("k", k), ("v", v)] {
        check_extent(arg, t)?;
    }
    check_out_elems(total_q, hq, d)?;

    // The totals bound every varlen length.
    let (bound_q, bound_k) = if varlen.is_some() { (total_q, total_k) } else { (seqlen_q, seqlen_k) };
    let (window_left, window_right) = canonical_window(opts, bound_q, bound_k);

    let strides = |t: &View<'_>| operand_strides(t, varlen.is_some());
    Ok(Problem {
        dtype: q.dtype,
        batch,
        hq,
        hk,
        head_dim: d,
        varlen: varlen.is_some(),
        seqlen_q,
        seqlen_k,
        max_given: varlen.is_none_or(|vl| vl.max_seqlen_q.is_some() && vl.max_seqlen_k.is_some()),
        total_q,
        total_k,
        window_left,
        window_right,
        scale: opts.scale_for(d),
        softcap: opts.softcap,
        q: strides(q),
        k: strides(k),
        v: strides(v),
        has_seqused_q: varlen.is_some_and(|vl| vl.seqused_q.is_some()),
        has_seqused_k: varlen.is_some_and(|vl| vl.seqused_k.is_some()),
        seqlens: None,
        paged: None,
        keys: None,
        alibi: None,
        dropout: dropout(opts),
    })
}

/// The output's element count must fit i64 (and usize).
fn check_out_elems(total_q: usize, hq: usize, d: usize) -> Result<()> {
    let out_elems = total_q as u128 * hq as u128 * d as u128;
    if out_elems > I64_MAX || out_elems > usize::MAX as u128 {
        return Err(Error::TooLarge { arg: "q", msg: format!("the output would have {out_elems} elements, more than i64 can index") });
    }
    Ok(())
}

/// The canonical mask: causal is the window (left, 0), and a bound that can never bind becomes -1
/// (unbounded). Row i of a (sq, sk) sequence sees j >= i + sk - sq - left for all i iff left >= sk - 1,
/// and j <= i + sk - sq + right for all j < sk iff right >= sq - 1; `bound_q` / `bound_k` bound every
/// sequence's sq / sk.
fn canonical_window(opts: &AttnOptions, bound_q: usize, bound_k: usize) -> (i64, i64) {
    let (mut window_left, mut window_right) = opts.window;
    if opts.causal {
        window_right = 0;
    }
    if window_left >= 0 && window_left as u64 >= bound_k as u64 {
        window_left = -1;
    }
    if window_right >= 0 && window_right as u64 >= bound_q as u64 {
        window_right = -1;
    }
    (window_left, window_right)
}

/// q and the two key-side operands (k, v or k_cache, v_cache, named by the caller): q f16 or bf16 of
/// rank `q_rank`, the others its dtype, of rank `kv_rank` and one shape, trailing dims `[.., H, D]` with
/// D a supported head dim shared by all three, Hq a multiple of Hk, D contiguous. Returns (Hq, Hk, D).
fn check_operands(q: &View<'_>, (k_arg, k): (&'static str, &View<'_>), (v_arg, v): (&'static str, &View<'_>), q_rank: usize, kv_rank: usize) -> Result<(usize, usize, usize)> {
    if !matches!(q.dtype, DType::F16 | DType::BF16) {
        return Err(Error::DType { arg: "q", got: q.dtype.to_string(), expected: "f16 or bf16" });
    }
    for (arg, t) in [(k_arg, k), (v_arg, v)] {
        if t.dtype != q.dtype {
            return Err(Error::DTypeMismatch { arg, got: t.dtype.to_string(), expected: format!("q's dtype {}", q.dtype) });
        }
    }
    for (arg, t) in [("q", q), (k_arg, k), (v_arg, v)] {
        check_strides_len(arg, t)?;
    }
    for (arg, t, rank) in [("q", q, q_rank), (k_arg, k, kv_rank), (v_arg, v, kv_rank)] {
        if t.rank() != rank {
            return Err(Error::Rank { arg, got: t.rank(), expected: rank });
        }
    }
    if k.shape != v.shape {
        return Err(Error::Shape { arg: v_arg, msg: format!("shape {:?} must equal {k_arg}'s shape {:?}", v.shape, k.shape) });
    }
    let (hq, d) = (q.shape[q_rank - 2], q.shape[q_rank - 1]);
    let hk = k.shape[kv_rank - 2];
    if k.shape[kv_rank - 1] != d {
        return Err(Error::Shape { arg: k_arg, msg: format!("head dim {} must equal q's head dim {d}", k.shape[kv_rank - 1]) });
    }
    if !HEAD_DIMS.contains(&d) {
        return Err(Error::HeadDim { got: d });
    }
    if hk == 0 || hq % hk != 0 {
        return Err(Error::Heads { hq, hk });
    }
    for (arg, t) in [("q", q), (k_arg, k), (v_arg, v)] {
        if t.strides[t.rank() - 1] != 1 {
            return Err(Error::NotContiguous { arg });
        }
    }
    Ok((hq, hk, d))
}

/// Checks the backward's arguments: q, k, v and the varlen lengths exactly as `validate_fwd` does, then
/// `dout` and `out` (q's dtype and device, the forward output's shape, head dim contiguous) and `lse`
/// (f32 on q's device, the forward's LSE shape `[B, Hq, Sq]` or `[Hq, Tq]`, contiguous as the forward
/// writes it).
#[allow(clippy::too_many_arguments)]
pub fn validate_bwd(dout: &View<'_>, q: &View<'_>, k: &View<'_>, v: &View<'_>, out: &View<'_>, lse: &View<'_>, varlen: Option<&VarlenViews<'_>>, opts: &AttnOptions) -> Result<BwdProblem> {
    let fwd = validate_fwd(q, k, v, varlen, opts)?;
    let out_shape = fwd.out_shape();
    check_like("dout", dout, q.dtype, &out_shape, false)?;
    check_like("out", out, q.dtype, &out_shape, false)?;
    check_like("lse", lse, DType::F32, &fwd.lse_shape(), true)?;
    let varlen = varlen.is_some();
    Ok(BwdProblem { dout: operand_strides(dout, varlen), out: operand_strides(out, varlen), fwd })
}

/// Checks a packed forward over a paged K/V cache: q `[Tq, Hq, D]`, k and v `[num_blocks, page_size, Hk,
/// D]` (any page size >= 1), the lengths and block table of `pv`. The problem is varlen with `paged` set
/// (`k.batch`, `v.batch` the block strides) and `total_k` every row of every block.
pub fn validate_varlen_paged(q: &View<'_>, k: &View<'_>, v: &View<'_>, pv: &PagedVarlenViews<'_>, opts: &AttnOptions) -> Result<Problem> {
    let (hq, hk, d) = check_operands(q, ("k", k), ("v", v), 3, 4)?;
    let len_q = int_vector("cu_seqlens_q", &pv.cu_seqlens_q)?;
    if len_q == 0 {
        return Err(Error::Shape { arg: "cu_seqlens_q", msg: "must have B+1 >= 1 entries, got 0".into() });
    }
    let batch = len_q - 1;
    if let Some(cu_k) = &pv.cu_seqlens_k {
        check_entries("cu_seqlens_k", cu_k, len_q, || format!("{len_q}, as many as cu_seqlens_q"))?;
    }
    for (arg, t) in [("seqused_q", pv.seqused_q), ("seqused_k", pv.seqused_k)] {
        if let Some(t) = t {
            check_entries(arg, &t, batch, || format!("B = {batch} (cu_seqlens_q has {len_q})"))?;
        }
    }
    if pv.cu_seqlens_k.is_none() && pv.seqused_k.is_none() {
        return Err(Error::Value { arg: "seqused_k", msg: "is required when cu_seqlens_k is absent: one of them gives the key counts".into() });
    }
    let paged = check_block_table(&pv.block_table, batch, "k", k)?;
    check_options(opts)?;

    let total_q = q.shape[0];
    let total_k = checked_rows("k", paged.num_blocks, paged.page_size)?;
    fits_i32("cu_seqlens_q", "batch size", batch)?;
    fits_i32("q", "num_heads", hq)?;
    fits_i32("k", "num_heads_k", hk)?;
    let seqlen_q = pv.max_seqlen_q.unwrap_or(mean_len(total_q, batch));
    // Without cu_seqlens_k the pool's rows are no sequence's: the mean is at most a table row's keys.
    let seqlen_k = pv.max_seqlen_k.unwrap_or(mean_len(total_k, batch).min(paged.capacity()));
    fits_i32("max_seqlen_q", "seqlen_q", seqlen_q)?;
    fits_i32("max_seqlen_k", "seqlen_k", seqlen_k)?;
    fits_i32("q", "total query rows", total_q)?;
    fits_i32("block_table", "keys per sequence (max_blocks * page_size)", paged.capacity())?;
    for (arg, t) in [("q", q), ("k", k), ("v", v), ("block_table", &pv.block_table)] {
        check_extent(arg, t)?;
    }
    check_out_elems(total_q, hq, d)?;
    let (window_left, window_right) = canonical_window(opts, total_q, paged.capacity());
    Ok(Problem {
        dtype: q.dtype,
        batch,
        hq,
        hk,
        head_dim: d,
        varlen: true,
        seqlen_q,
        seqlen_k,
        max_given: pv.max_seqlen_q.is_some() && pv.max_seqlen_k.is_some(),
        total_q,
        total_k,
        window_left,
        window_right,
        scale: opts.scale_for(d),
        softcap: opts.softcap,
        q: operand_strides(q, true),
        k: operand_strides(k, false),
        v: operand_strides(v, false),
        has_seqused_q: pv.seqused_q.is_some(),
        has_seqused_k: pv.seqused_k.is_some(),
        seqlens: None,
        paged: Some(paged),
        keys: None,
        alibi: None,
        dropout: dropout(opts),
    })
}

/// A block table over `k_arg`'s `[num_blocks, page_size, ..]`: int32 `[B, max_blocks]`, rows contiguous,
/// and a page size of at least 1.
fn check_block_table(t: &View<'_>, batch: usize, k_arg: &'static str, k: &View<'_>) -> Result<Paged> {
    let arg = "block_table";
    check_strides_len(arg, t)?;
    if t.dtype != DType::I32 {
        return Err(Error::DType { arg, got: t.dtype.to_string(), expected: "i32" });
    }
    if t.rank() != 2 {
        return Err(Error::Rank { arg, got: t.rank(), expected: 2 });
    }
    if t.shape[0] != batch {
        return Err(Error::Shape { arg, msg: format!("has {} rows, expected one per sequence (B = {batch})", t.shape[0]) });
    }
    if t.shape[1] > 1 && t.strides[1] != 1 {
        return Err(Error::NotContiguous { arg });
    }
    if k.shape[1] == 0 {
        return Err(Error::Shape { arg: k_arg, msg: format!("pages of {:?} hold no rows: with a block_table dimension 1 is the page size, at least 1", k.shape) });
    }
    Ok(Paged { page_size: k.shape[1], num_blocks: k.shape[0], max_blocks: t.shape[1] })
}

/// The paged forward's outputs, as `check_fwd_outputs`, the block table among the inputs.
pub fn check_paged_fwd_outputs(p: &Problem, t: &FwdViews<'_>, pv: &PagedVarlenViews<'_>) -> Result<()> {
    check_like("out", &t.out, p.dtype, &p.out_shape(), false)?;
    check_like("lse", &t.lse, DType::F32, &p.lse_shape(), true)?;
    if let Some(m) = &t.s_dmask {
        check_s_dmask(p, m)?;
    }
    let lens = [Some(("cu_seqlens_q", pv.cu_seqlens_q)), pv.cu_seqlens_k.map(|t| ("cu_seqlens_k", t)), pv.seqused_q.map(|t| ("seqused_q", t)), pv.seqused_k.map(|t| ("seqused_k", t)), Some(("block_table", pv.block_table))];
    let extra = t.alibi_slopes.as_ref().map(|x| ("alibi_slopes", x));
    let inputs = [("q", &t.q), ("k", &t.k), ("v", &t.v)].into_iter().chain(extra).chain(lens.iter().flatten().map(|(a, t)| (*a, t)));
    let (outputs, n_out) = fwd_outputs(t);
    no_alias(&outputs[..n_out], inputs)
}

/// Checks the contents of a paged varlen call's index tensors (host copies), for `p` as
/// `validate_varlen_paged` returned it: the query side as `check_varlen_contents` does, the key counts
/// (from cu_seqlens_k, cut to seqused_k where given; else seqused_k) within max_seqlen_k and the keys a
/// block table row addresses, and every block a sequence reads inside k.
pub fn check_paged_varlen_contents(p: &Problem, host: HostPagedSeqlens, max_seqlen_q: Option<usize>, max_seqlen_k: Option<usize>) -> Result<(HostSeqlens, HostKeys)> {
    let paged = p.paged.ok_or_else(|| Error::Value { arg: "block_table", msg: "the problem is not paged".into() })?;
    let batch = p.batch;
    let sizes = [("cu_seqlens_q", Some(host.cu_seqlens_q.len()), batch + 1), ("cu_seqlens_k", host.cu_seqlens_k.as_ref().map(Vec::len), batch + 1)];
    let sizes = sizes.into_iter().chain([("seqused_q", host.seqused_q.as_ref().map(Vec::len), batch), ("seqused_k", host.seqused_k.as_ref().map(Vec::len), batch)]);
    for (arg, len, want) in sizes.chain([("block_table", Some(host.block_table.len()), batch * paged.max_blocks)]) {
        if let Some(len) = len
            && len != want
        {
            return Err(Error::Shape { arg, msg: format!("has {len} entries, expected {want}") });
        }
    }
    let used_q = host.seqused_q.as_deref().map(|u| ("seqused_q", u));
    seq_lengths(Some(("cu_seqlens_q", &host.cu_seqlens_q)), used_q, ("max_seqlen_q", max_seqlen_q), Some(p.total_q), batch)?;
    if host.cu_seqlens_k.is_none() && host.seqused_k.is_none() {
        return Err(Error::Value { arg: "seqused_k", msg: "is required when cu_seqlens_k is absent: one of them gives the key counts".into() });
    }
    let cu_k = host.cu_seqlens_k.as_deref().map(|c| ("cu_seqlens_k", c));
    let used_k = host.seqused_k.as_deref().map(|u| ("seqused_k", u));
    let seqlen_k = seq_lengths(cu_k, used_k, ("max_seqlen_k", max_seqlen_k), None, batch)?;
    for (b, &len) in seqlen_k.iter().enumerate() {
        check_pages(&host.block_table, &paged, b, 0, len, || format!("its {len} keys"))?;
    }
    let keys = HostKeys { seqlen_k, batch: (0..batch).collect(), first: vec![0; batch], block_table: Some(host.block_table) };
    let seqlens = HostSeqlens { cu_seqlens_q: host.cu_seqlens_q, cu_seqlens_k: host.cu_seqlens_k.unwrap_or_default(), seqused_q: host.seqused_q, seqused_k: host.seqused_k };
    Ok((seqlens, keys))
}

/// Row b of the block table lists enough blocks for key positions `first..end`, each inside k.
fn check_pages(table: &[i32], paged: &Paged, b: usize, first: usize, end: usize, what: impl Fn() -> String) -> Result<()> {
    if end > paged.capacity() {
        let need = end.div_ceil(paged.page_size);
        return Err(Error::Value { arg: "block_table", msg: format!("row {b} has {} entries, too few for {} ({need} blocks of {} keys)", paged.max_blocks, what(), paged.page_size) });
    }
    for i in first / paged.page_size..end.div_ceil(paged.page_size) {
        let block = table[b * paged.max_blocks + i];
        if block < 0 || block as usize >= paged.num_blocks {
            return Err(Error::Value { arg: "block_table", msg: format!("entry [{b}, {i}] is {block}, outside 0..{} (the blocks of k and v)", paged.num_blocks) });
        }
    }
    Ok(())
}

/// Checks a KV-cache call (`KvCacheViews`): every tensor's dtype, shape and layout against q and the
/// cache, the options, the outputs (out and lse; the caches too when k_new is appended to them, which
/// may then overlap no input and not each other). The contents of the index tensors are the business of
/// `check_kvcache_contents`.
pub fn validate_kvcache(t: &KvCacheViews<'_>, opts: &AttnOptions, kv: &KvCacheOptions) -> Result<KvCacheProblem> {
    let (hq, hk, d) = check_operands(&t.q, ("k_cache", &t.k_cache), ("v_cache", &t.v_cache), 4, 4)?;
    let (qs, cs) = (t.q.shape, t.k_cache.shape);
    let (batch, seqlen_q) = (qs[0], qs[1]);
    let per_row = || format!("B = {batch} (q's batch size)");
    check_entries("cache_seqlens", &t.cache_seqlens, batch, per_row)?;
    let paged = t.block_table.as_ref().map(|bt| check_block_table(bt, batch, "k_cache", &t.k_cache)).transpose()?;
    match &t.cache_batch_idx {
        Some(_) if paged.is_some() => {
            return Err(Error::Value { arg: "cache_batch_idx", msg: "picks rows of a contiguous cache; a paged cache (block_table) has none".into() });
        }
        Some(idx) => check_entries("cache_batch_idx", idx, batch, per_row)?,
        None if paged.is_none() && cs[0] < batch => {
            return Err(Error::Shape { arg: "k_cache", msg: format!("has {} rows, fewer than q's batch size {batch} (cache_batch_idx picks the rows of another cache)", cs[0]) });
        }
        None => {}
    }
    if let Some(lp) = &t.cache_leftpad {
        check_entries("cache_leftpad", lp, batch, per_row)?;
    }
    let (k_new, v_new, seqlen_new) = match (&t.k_new, &t.v_new) {
        (None, None) => (None, None, 0),
        (Some(kn), Some(vn)) => {
            for (arg, x) in [("k_new", kn), ("v_new", vn)] {
                check_strides_len(arg, x)?;
                if x.dtype != t.q.dtype {
                    return Err(Error::DTypeMismatch { arg, got: x.dtype.to_string(), expected: format!("q's dtype {}", t.q.dtype) });
                }
                if x.rank() != 4 {
                    return Err(Error::Rank { arg, got: x.rank(), expected: 4 });
                }
                if x.shape[0] != batch || x.shape[2] != hk || x.shape[3] != d {
                    return Err(Error::Shape { arg, msg: format!("shape {:?} must be [B, S_new, Hk, D] = [{batch}, S_new, {hk}, {d}]", x.shape) });
                }
                if x.strides[3] != 1 {
                    return Err(Error::NotContiguous { arg });
                }
            }
            if vn.shape != kn.shape {
                return Err(Error::Shape { arg: "v_new", msg: format!("shape {:?} must equal k_new's shape {:?}", vn.shape, kn.shape) });
            }
            (Some(operand_strides(kn, false)), Some(operand_strides(vn, false)), kn.shape[1])
        }
        (Some(_), None) => return Err(Error::Value { arg: "v_new", msg: "is missing: k_new and v_new are appended together".into() }),
        (None, Some(_)) => return Err(Error::Value { arg: "k_new", msg: "is missing: k_new and v_new are appended together".into() }),
    };
    check_options(opts)?;
    if opts.dropout.p > 0.0 {
        return Err(Error::Value { arg: "dropout_p", msg: "the KV-cache forward (inference, as flash_attn_with_kvcache) takes no dropout: set it to 0".into() });
    }
    if kv.num_splits > MAX_SPLITS {
        return Err(Error::Value { arg: "num_splits", msg: format!("{} exceeds the most splits, {MAX_SPLITS} (0 = a heuristic)", kv.num_splits) });
    }
    let capacity = paged.map_or(cs[1], |p| p.capacity());
    // As in flash-attn, q rows take their own positions under causal or local attention: a window side
    // below the cache's capacity (flash-attn drops the others as unbounded), or one that the kernels apply
    // here (`canonical_window`: it bounds some row; a right side at or above the capacity still does with
    // more query rows than the cache holds).
    let (window_left, window_right) = canonical_window(opts, seqlen_q, capacity);
    let local = |w: i64| w >= 0 && (w as u64) < capacity as u64;
    let q_per_row = opts.causal || local(opts.window.0) || local(opts.window.1) || window_left >= 0 || window_right >= 0;
    let rotary = match (&t.rotary_cos, &t.rotary_sin) {
        (None, None) => None,
        (Some(cos), Some(sin)) => Some(check_rotary(cos, sin, t.q.dtype, d, kv.rotary_interleaved, q_per_row)?),
        (Some(_), None) => return Err(Error::Value { arg: "rotary_sin", msg: "is missing: rotary_cos and rotary_sin come together".into() }),
        (None, Some(_)) => return Err(Error::Value { arg: "rotary_cos", msg: "is missing: rotary_cos and rotary_sin come together".into() }),
    };

    let total_q = checked_rows("q", batch, seqlen_q)?;
    let total_k = checked_rows("k_cache", cs[0], cs[1])?;
    fits_i32("q", "batch size", batch)?;
    fits_i32("q", "num_heads", hq)?;
    fits_i32("k_cache", "num_heads_k", hk)?;
    fits_i32("k_cache", "keys per cache row", capacity)?;
    fits_i32("k_new", "seqlen_new", seqlen_new)?;
    let views = [Some(("q", &t.q)), Some(("k_cache", &t.k_cache)), Some(("v_cache", &t.v_cache)), t.k_new.as_ref().map(|x| ("k_new", x)), t.v_new.as_ref().map(|x| ("v_new", x))];
    let more = [
        t.rotary_cos.as_ref().map(|x| ("rotary_cos", x)),
        t.rotary_sin.as_ref().map(|x| ("rotary_sin", x)),
        t.block_table.as_ref().map(|x| ("block_table", x)),
        t.alibi_slopes.as_ref().map(|x| ("alibi_slopes", x)),
    ];
    for (arg, x) in views.iter().chain(&more).flatten() {
        check_extent(arg, x)?;
    }
    check_out_elems(total_q, hq, d)?;

    check_like("out", &t.out, t.q.dtype, &[batch, seqlen_q, hq, d], false)?;
    check_like("lse", &t.lse, DType::F32, &[batch, hq, seqlen_q], true)?;
    let appending = k_new.is_some();
    let caches = [("k_cache", &t.k_cache), ("v_cache", &t.v_cache)];
    let indices = [Some(("cache_seqlens", &t.cache_seqlens)), t.cache_batch_idx.as_ref().map(|x| ("cache_batch_idx", x)), t.cache_leftpad.as_ref().map(|x| ("cache_leftpad", x))];
    let inputs = views[..1].iter().chain(&views[3..]).chain(&more).chain(&indices).flatten().copied();
    let outputs = [("out", &t.out), ("lse", &t.lse)];
    if appending {
        no_alias(&[outputs[0], outputs[1], caches[0], caches[1]], inputs)?;
    } else {
        no_alias(&outputs, inputs.chain(caches))?;
    }

    let mut fwd = Problem {
        dtype: t.q.dtype,
        batch,
        hq,
        hk,
        head_dim: d,
        varlen: false,
        seqlen_q,
        seqlen_k: capacity,
        max_given: true,
        total_q,
        total_k,
        window_left,
        window_right,
        scale: opts.scale_for(d),
        softcap: opts.softcap,
        q: operand_strides(&t.q, false),
        k: operand_strides(&t.k_cache, false),
        v: operand_strides(&t.v_cache, false),
        has_seqused_q: false,
        has_seqused_k: false,
        seqlens: None,
        paged,
        keys: None,
        alibi: None,
        dropout: None,
    };
    check_alibi(&mut fwd, t.alibi_slopes.as_ref())?;
    Ok(KvCacheProblem {
        fwd,
        cache_batch: cs[0],
        seqlen_new,
        k_new,
        v_new,
        rotary,
        has_cache_batch_idx: t.cache_batch_idx.is_some(),
        has_cache_leftpad: t.cache_leftpad.is_some(),
        num_splits: kv.num_splits,
    })
}

/// cos and sin: `[S_ro, rotary_dim / 2]`, one shape and one dtype (q's or f32), rows contiguous, and
/// `2 <= rotary_dim <= D`.
fn check_rotary(cos: &View<'_>, sin: &View<'_>, q_dtype: DType, d: usize, interleaved: bool, q_per_row: bool) -> Result<Rotary> {
    for (arg, x) in [("rotary_cos", cos), ("rotary_sin", sin)] {
        check_strides_len(arg, x)?;
        if x.dtype != q_dtype && x.dtype != DType::F32 {
            return Err(Error::DType { arg, got: x.dtype.to_string(), expected: "q's dtype or f32" });
        }
        if x.rank() != 2 {
            return Err(Error::Rank { arg, got: x.rank(), expected: 2 });
        }
        if x.shape[1] > 1 && x.strides[1] != 1 {
            return Err(Error::NotContiguous { arg });
        }
    }
    if sin.dtype != cos.dtype {
        return Err(Error::DTypeMismatch { arg: "rotary_sin", got: sin.dtype.to_string(), expected: format!("rotary_cos's dtype {}", cos.dtype) });
    }
    if sin.shape != cos.shape {
        return Err(Error::Shape { arg: "rotary_sin", msg: format!("shape {:?} must equal rotary_cos's shape {:?}", sin.shape, cos.shape) });
    }
    let half = cos.shape[1];
    if half == 0 {
        return Err(Error::Value { arg: "rotary_cos", msg: "has no columns: [S_ro, rotary_dim / 2] needs rotary_dim >= 2".into() });
    }
    if 2 * half > d {
        return Err(Error::Value { arg: "rotary_cos", msg: format!("rotary_dim {} (twice its {half} columns) exceeds the head dim {d}", 2 * half) });
    }
    if cos.shape[0] == 0 {
        return Err(Error::Value { arg: "rotary_cos", msg: "has no rows: [S_ro, rotary_dim / 2] needs a row for every position it turns (S_ro >= 1)".into() });
    }
    fits_i32("rotary_cos", "positions", cos.shape[0])?;
    Ok(Rotary { dim: 2 * half, seqlen: cos.shape[0], interleaved, dtype: cos.dtype, cos_row: cos.strides[0], sin_row: sin.strides[0], q_per_row })
}

/// Checks the contents of a KV-cache call's index tensors (host copies) for `kp` as `validate_kvcache`
/// returned it, and resolves each row's keys: `cache_seqlens[b] >= 0`; `cache_leftpad[b]` in
/// `0..=cache_seqlens[b]`; `cache_seqlens[b] + S_new` within a cache row (or what its block table row
/// addresses); `cache_batch_idx[b]` a row of the cache; every block a row reads inside the cache; no cache
/// entry appended to twice; and the rotary tables long enough for every position they are read at.
pub fn check_kvcache_contents(kp: &KvCacheProblem, host: HostKvCache) -> Result<HostKeys> {
    let p = &kp.fwd;
    let batch = p.batch;
    let per_row = [("cache_seqlens", Some(host.cache_seqlens.len())), ("cache_batch_idx", host.cache_batch_idx.as_ref().map(Vec::len)), ("cache_leftpad", host.cache_leftpad.as_ref().map(Vec::len))];
    for (arg, len) in per_row {
        if let Some(len) = len
            && len != batch
        {
            return Err(Error::Shape { arg, msg: format!("has {len} entries, expected B = {batch}") });
        }
    }
    if let (Some(paged), Some(table)) = (&p.paged, &host.block_table)
        && table.len() != batch * paged.max_blocks
    {
        return Err(Error::Shape { arg: "block_table", msg: format!("has {} entries, expected {batch} x {}", table.len(), paged.max_blocks) });
    }
    let table = match (&p.paged, &host.block_table) {
        (Some(paged), Some(table)) => Some((paged, &table[..])),
        (None, None) => None,
        _ => return Err(Error::Value { arg: "block_table", msg: "must be given exactly when the cache is paged".into() }),
    };
    let s_new = kp.seqlen_new;
    let mut keys = HostKeys { seqlen_k: Vec::with_capacity(batch), batch: Vec::with_capacity(batch), first: Vec::with_capacity(batch), block_table: None };
    // Appended entries, as (cache row or block, position or row in the block) -> the batch entry writing it.
    let mut written = std::collections::HashMap::new();
    for b in 0..batch {
        let seqlen = host.cache_seqlens[b];
        if seqlen < 0 {
            return Err(Error::SeqLens { arg: "cache_seqlens", msg: format!("entry {b} is {seqlen}, a negative length") });
        }
        let seqlen = seqlen as usize;
        let leftpad = host.cache_leftpad.as_ref().map_or(0, |l| l[b]);
        if leftpad < 0 || leftpad as usize > seqlen {
            return Err(Error::SeqLens { arg: "cache_leftpad", msg: format!("entry {b} is {leftpad}, outside 0..={seqlen} (cache_seqlens[{b}])") });
        }
        let leftpad = leftpad as usize;
        let end = seqlen + s_new;
        if end > p.seqlen_k {
            let holds = match table {
                Some((paged, _)) => format!("the {} keys of block_table's {} blocks of {} per row", p.seqlen_k, paged.max_blocks, paged.page_size),
                None => format!("the {} entries of a cache row", p.seqlen_k),
            };
            return Err(Error::SeqLens { arg: "cache_seqlens", msg: format!("entry {b} is {seqlen}: with the {s_new} new keys, {end} exceeds {holds}") });
        }
        let row = match &host.cache_batch_idx {
            Some(idx) if idx[b] < 0 || idx[b] as usize >= kp.cache_batch => {
                return Err(Error::Value { arg: "cache_batch_idx", msg: format!("entry {b} is {}, outside 0..{} (the rows of k_cache)", idx[b], kp.cache_batch) });
            }
            Some(idx) => idx[b] as usize,
            None => b,
        };
        if let Some((paged, table)) = table {
            check_pages(table, paged, b, leftpad, end, || format!("cache_seqlens[{b}] + S_new = {end} keys"))?;
        }
        for pos in seqlen..end {
            let (slot, arg) = match table {
                Some((paged, table)) => ((table[b * paged.max_blocks + pos / paged.page_size] as usize, pos % paged.page_size), "block_table"),
                None => ((row, pos), "cache_batch_idx"),
            };
            if let Some(other) = written.insert(slot, b) {
                return Err(Error::Value { arg, msg: format!("batch entries {other} and {b} both append to cache entry {slot:?}: appended rows may not overlap") });
            }
        }
        if let Some(r) = &kp.rotary {
            let q_end = match (p.seqlen_q, r.q_per_row) {
                (0, _) => 0,
                (sq, true) => seqlen + sq,
                (_, false) => seqlen + 1,
            };
            let need = q_end.max(end * usize::from(s_new > 0));
            if need > r.seqlen {
                return Err(Error::Value { arg: "rotary_cos", msg: format!("has {} positions, but batch entry {b} reads position {}", r.seqlen, need - 1) });
            }
        }
        keys.seqlen_k.push(end - leftpad);
        keys.batch.push(row);
        keys.first.push(leftpad);
    }
    keys.block_table = host.block_table;
    Ok(keys)
}

/// Checks a combine (`CombineViews`): partial results `[n, B, Sq, H, D]` (packed `[n, T, H, D]`) in
/// f16, bf16 or f32 with f32 LSE `[n, B, H, Sq]` (`[n, H, T]`), merged into out of the partials' shape
/// less the first dimension (f16, bf16 or f32, head dim contiguous) and contiguous f32 lse. Any n >= 0.
pub fn validate_combine(t: &CombineViews<'_>) -> Result<CombineProblem> {
    let (po, pl) = (&t.partial_out, &t.partial_lse);
    for (arg, x) in [("partial_out", po), ("partial_lse", pl), ("out", &t.out), ("lse", &t.lse)] {
        check_strides_len(arg, x)?;
    }
    for (arg, x) in [("partial_out", po), ("out", &t.out)] {
        if !matches!(x.dtype, DType::F16 | DType::BF16 | DType::F32) {
            return Err(Error::DType { arg, got: x.dtype.to_string(), expected: "f16, bf16 or f32" });
        }
    }
    if pl.dtype != DType::F32 {
        return Err(Error::DType { arg: "partial_lse", got: pl.dtype.to_string(), expected: "f32" });
    }
    let s = po.shape;
    let packed = match s.len() {
        5 => false,
        4 => true,
        r => return Err(Error::Shape { arg: "partial_out", msg: format!("has rank {r}: expected [n, B, Sq, H, D] (rank 5) or packed [n, T, H, D] (rank 4)") }),
    };
    let (n, batch, seqlen, heads, d) = if packed { (s[0], 1, s[1], s[2], s[3]) } else { (s[0], s[1], s[2], s[3], s[4]) };
    let lse_shape = if packed { Dims::new(&[n, heads, seqlen]) } else { Dims::new(&[n, batch, heads, seqlen]) };
    if pl.rank() != lse_shape.len() {
        return Err(Error::Rank { arg: "partial_lse", got: pl.rank(), expected: lse_shape.len() });
    }
    if pl.shape != &lse_shape[..] {
        return Err(Error::Shape { arg: "partial_lse", msg: format!("shape {:?} must be {:?} (from partial_out's shape)", pl.shape, &lse_shape[..]) });
    }
    if po.strides[s.len() - 1] != 1 {
        return Err(Error::NotContiguous { arg: "partial_out" });
    }
    check_like("out", &t.out, t.out.dtype, &s[1..], false)?;
    check_like("lse", &t.lse, DType::F32, &lse_shape[1..], true)?;
    for (arg, x) in [("partial_out", po), ("partial_lse", pl)] {
        check_extent(arg, x)?;
    }
    no_alias(&[("out", &t.out), ("lse", &t.lse)], [("partial_out", po), ("partial_lse", pl)].into_iter())?;
    let (a, b) = (po.strides, pl.strides);
    let (partial_out, partial_lse) = if packed { ([a[0], 0, a[1], a[2]], [b[0], 0, b[1], b[2]]) } else { ([a[0], a[1], a[2], a[3]], [b[0], b[1], b[2], b[3]]) };
    Ok(CombineProblem { splits: n, batch, seqlen, heads, head_dim: d, partial_out, partial_lse, out: operand_strides(&t.out, packed) })
}

/// A tensor handed in beside q (dout, out, lse, or an output to write into): of `dtype`, of exactly
/// `shape`, head dim contiguous, or wholly contiguous with `contiguous`, and addressable with i64 offsets.
pub fn check_like(arg: &'static str, t: &View<'_>, dtype: DType, shape: &[usize], contiguous: bool) -> Result<()> {
    check_strides_len(arg, t)?;
    if t.dtype != dtype {
        return Err(match dtype {
            DType::F32 => Error::DType { arg, got: t.dtype.to_string(), expected: "f32" },
            _ => Error::DTypeMismatch { arg, got: t.dtype.to_string(), expected: format!("q's dtype {dtype}") },
        });
    }
    if t.rank() != shape.len() {
        return Err(Error::Rank { arg, got: t.rank(), expected: shape.len() });
    }
    if t.shape != shape {
        return Err(Error::Shape { arg, msg: format!("shape {:?} must be {shape:?} (from q's shape)", t.shape) });
    }
    if contiguous && !is_contiguous(t) {
        return Err(Error::Shape { arg, msg: "must be contiguous".into() });
    }
    if !shape.is_empty() && t.strides[shape.len() - 1] != 1 {
        return Err(Error::NotContiguous { arg });
    }
    check_extent(arg, t)
}

/// Whether the view is row-major contiguous (dimensions of extent 1, and empty views, may have any
/// strides).
pub fn is_contiguous(t: &View<'_>) -> bool {
    if t.numel() == 0 {
        return true;
    }
    let mut expected = 1usize;
    for (&n, &s) in t.shape.iter().zip(t.strides).rev() {
        if n != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(n);
    }
    true
}

/// One stride per dimension, and the address aligned to the element size (on every target: host slices
/// need it too).
fn check_strides_len(arg: &'static str, t: &View<'_>) -> Result<()> {
    if t.strides.len() != t.shape.len() {
        return Err(Error::Shape { arg, msg: format!("{} strides for {} dimensions", t.strides.len(), t.shape.len()) });
    }
    if !t.addr.is_multiple_of(t.dtype.size() as u64) {
        return Err(Error::Value { arg, msg: format!("address {:#x} is not aligned to its {}-byte elements", t.addr, t.dtype.size()) });
    }
    Ok(())
}

/// Strides of a `[B, S, H, D]` (or varlen `[T, H, D]`) operand, head dim contiguous.
fn operand_strides(t: &View<'_>, varlen: bool) -> Strides {
    let s = t.strides;
    if varlen { Strides { batch: 0, row: s[0], head: s[1] } } else { Strides { batch: s[0], row: s[1], head: s[2] } }
}

/// The forward's outputs: out like q's output shape in q's dtype, lse contiguous f32; neither may
/// overlap an input or the other.
pub fn check_fwd_outputs(p: &Problem, t: &FwdViews<'_>, varlen: Option<&VarlenViews<'_>>) -> Result<()> {
    check_like("out", &t.out, p.dtype, &p.out_shape(), false)?;
    check_like("lse", &t.lse, DType::F32, &p.lse_shape(), true)?;
    if let Some(m) = &t.s_dmask {
        check_s_dmask(p, m)?;
    }
    let (outputs, n_out) = fwd_outputs(t);
    let mut inputs = [("q", &t.q), ("k", &t.k), ("v", &t.v), ("q", &t.q)];
    let n_in = with_alibi(&mut inputs, 3, &t.alibi_slopes);
    check_no_alias(&outputs[..n_out], &inputs[..n_in], varlen)
}

/// The forward's outputs (out, lse, and s_dmask where given) as a list and its length (no allocation:
/// the CUDA path allocates nothing per call).
fn fwd_outputs<'v, 'a>(t: &'v FwdViews<'a>) -> ([(&'static str, &'v View<'a>); 3], usize) {
    match &t.s_dmask {
        Some(m) => ([("out", &t.out), ("lse", &t.lse), ("s_dmask", m)], 3),
        None => ([("out", &t.out), ("lse", &t.lse), ("lse", &t.lse)], 2),
    }
}

/// `list[..n]` with the slopes appended where given (`list` has room): the new length.
fn with_alibi<'v, 'a>(list: &mut [(&'static str, &'v View<'a>)], n: usize, slopes: &'v Option<View<'a>>) -> usize {
    match slopes {
        Some(x) => {
            list[n] = ("alibi_slopes", x);
            n + 1
        }
        None => n,
    }
}



/// The backward's outputs: dq like q, dk and dv like k, in q's dtype; none may overlap an input or
/// another output.
pub fn check_bwd_outputs(bp: &BwdProblem, t: &BwdViews<'_>, varlen: Option<&VarlenViews<'_>>) -> Result<()> {
    let p = &bp.fwd;
    check_like("dq", &t.dq, p.dtype, &p.out_shape(), false)?;
    check_like("dk", &t.dk, p.dtype, &p.kv_shape(), false)?;
    check_like("dv", &t.dv, p.dtype, &p.kv_shape(), false)?;
    let mut inputs = [("dout", &t.dout), ("q", &t.q), ("k", &t.k), ("v", &t.v), ("out", &t.out), ("lse", &t.lse), ("lse", &t.lse)];
    let n_in = with_alibi(&mut inputs, 6, &t.alibi_slopes);
    check_no_alias(&[("dq", &t.dq), ("dk", &t.dk), ("dv", &t.dv)], &inputs[..n_in], varlen)
}

/// No output shares an element with an input (varlen lengths included) or with another output.
fn check_no_alias(outputs: &[(&'static str, &View<'_>)], inputs: &[(&'static str, &View<'_>)], varlen: Option<&VarlenViews<'_>>) -> Result<()> {
    let lens = varlen.map(|vl| [Some(("cu_seqlens_q", vl.cu_seqlens_q)), Some(("cu_seqlens_k", vl.cu_seqlens_k)), vl.seqused_q.map(|t| ("seqused_q", t)), vl.seqused_k.map(|t| ("seqused_k", t))]);
    no_alias(outputs, inputs.iter().copied().chain(lens.iter().flatten().flatten().map(|(a, t)| (*a, t))))
}

/// No output shares an element with an input, with another output or with itself. (No allocation: the CUDA path
/// allocates nothing per call.)
fn no_alias<'v, 'a: 'v>(outputs: &[(&'static str, &'v View<'a>)], inputs: impl Iterator<Item = (&'static str, &'v View<'a>)> + Clone) -> Result<()> {
    for (i, &(arg, o)) in outputs.iter().enumerate() {
        if crate::alias::self_overlap(o) {
            return Err(Error::Value { arg, msg: "has elements that share memory (a broadcast or overlapping layout): an output needs its own memory at every position".into() });
        }
        for (other, t) in inputs.clone().chain(outputs[i + 1..].iter().copied()) {
            if crate::alias::overlap(o, t) {
                return Err(Error::Value { arg, msg: format!("overlaps {other}: an output may not alias an input or another output") });
            }
        }
    }
    Ok(())
}

/// The backward's workspace: at least `needed` bytes, 256-byte aligned, overlapping no tensor.
pub fn check_workspace(ws: &Workspace, needed: usize, t: &BwdViews<'_>) -> Result<()> {
    let views = [("dout", t.dout), ("q", t.q), ("k", t.k), ("v", t.v), ("out", t.out), ("lse", t.lse), ("dq", t.dq), ("dk", t.dk), ("dv", t.dv)];
    let slopes = t.alibi_slopes.map(|x| ("alibi_slopes", x));
    check_workspace_of(ws, needed, "bwd_workspace_bytes", views.into_iter().chain(slopes))
}

/// A caller's workspace: at least `needed` bytes (as `sizer` gives them), 256-byte aligned, overlapping
/// none of `views`.
pub fn check_workspace_of<'a>(ws: &Workspace, needed: usize, sizer: &str, views: impl IntoIterator<Item = (&'static str, View<'a>)>) -> Result<()> {
    if needed == 0 {
        return Ok(());
    }
    if ws.bytes < needed {
        return Err(Error::Value { arg: "workspace", msg: format!("{} bytes is less than the {needed} bytes needed ({sizer})", ws.bytes) });
    }
    if !ws.addr.is_multiple_of(256) {
        return Err(Error::Value { arg: "workspace", msg: format!("address {:#x} must be 256-byte aligned", ws.addr) });
    }
    // The workspace as 4-byte words.
    let shape = [ws.bytes.div_ceil(4)];
    let w = View { addr: ws.addr, dtype: DType::I32, shape: &shape, strides: &[1] };
    for (arg, v) in views {
        if crate::alias::overlap(&w, &v) {
            return Err(Error::Value { arg: "workspace", msg: format!("overlaps {arg}") });
        }
    }
    Ok(())
}

/// The kernels copy rows with 16-byte `cp.async`: on CUDA every view starts 16-byte aligned and every
/// stride but the last (of a dimension longer than 1) is a multiple of 16 bytes.
pub fn check_cuda_rows(views: &[(&'static str, &View<'_>)]) -> Result<()> {
    for &(arg, t) in views {
        let size = t.dtype.size() as u64;
        let rank = t.rank();
        let bad = !t.addr.is_multiple_of(16) || t.strides[..rank.saturating_sub(1)].iter().zip(t.shape).any(|(&s, &n)| n > 1 && !(s as u64 * size).is_multiple_of(16));
        if bad {
            return Err(Error::Value { arg, msg: "on CUDA every row must be 16-byte aligned: the address and strides must be multiples of 16 bytes (8 elements of f16/bf16)".into() });
        }
    }
    Ok(())
}

/// Grid y walks heads and z sequences: both are limited to 65535 by CUDA.
pub fn check_grid(grid: (u32, u32, u32)) -> Result<()> {
    for (arg, n) in [("num_heads", grid.1), ("batch", grid.2)] {
        if n > 65535 {
            return Err(Error::TooLarge { arg, msg: format!("{n} exceeds the CUDA grid limit of 65535") });
        }
    }
    Ok(())
}

/// Checks the contents of the varlen lengths (host copies): the check `validate_fwd` cannot make for
/// device memory. `total_q`/`total_k` are the row counts of q and k.
pub fn check_varlen_contents(seqlens: HostSeqlens, max_seqlen_q: Option<usize>, max_seqlen_k: Option<usize>, total_q: usize, total_k: usize) -> Result<HostSeqlens> {
    let len_q = seqlens.cu_seqlens_q.len();
    if len_q == 0 {
        return Err(Error::Shape { arg: "cu_seqlens_q", msg: "must have B+1 >= 1 entries, got 0".into() });
    }
    let batch = len_q - 1;
    if seqlens.cu_seqlens_k.len() != len_q {
        return Err(Error::Shape { arg: "cu_seqlens_k", msg: format!("has {} entries but cu_seqlens_q has {len_q}", seqlens.cu_seqlens_k.len()) });
    }
    for (arg, used) in [("seqused_q", &seqlens.seqused_q), ("seqused_k", &seqlens.seqused_k)] {
        if let Some(u) = used
            && u.len() != batch
        {
            return Err(Error::Shape { arg, msg: format!("has {} entries, expected B = {batch} (cu_seqlens has {len_q})", u.len()) });
        }
    }
    let q = (Some(("cu_seqlens_q", &seqlens.cu_seqlens_q[..])), seqlens.seqused_q.as_deref().map(|u| ("seqused_q", u)));
    seq_lengths(q.0, q.1, ("max_seqlen_q", max_seqlen_q), Some(total_q), batch)?;
    let k = (Some(("cu_seqlens_k", &seqlens.cu_seqlens_k[..])), seqlens.seqused_k.as_deref().map(|u| ("seqused_k", u)));
    seq_lengths(k.0, k.1, ("max_seqlen_k", max_seqlen_k), Some(total_k), batch)?;
    Ok(seqlens)
}

/// One side's lengths: slots from `cu` (checked against `total` rows where the rows are addressed by
/// it), each cut to `used[b]` where given, none longer than `max` where given. Returns the lengths.
fn seq_lengths(cu: Option<(&'static str, &[i32])>, used: Option<(&'static str, &[i32])>, (max_arg, max_seqlen): (&'static str, Option<usize>), total: Option<usize>, batch: usize) -> Result<Vec<usize>> {
    if let Some((arg, cu)) = cu {
        check_cu_seqlens(arg, cu, total)?;
    }
    (0..batch)
        .map(|b| {
            let slot = cu.map(|(_, cu)| i64::from(cu[b + 1]) - i64::from(cu[b]));
            let len = match (used, slot) {
                (Some((arg, u)), Some(slot)) if u[b] < 0 || i64::from(u[b]) > slot => {
                    let cu_arg = cu.map_or("", |(a, _)| a);
                    return Err(Error::SeqLens { arg, msg: format!("entry {b} is {}, outside 0..={slot} (the length of slot {b} in {cu_arg})", u[b]) });
                }
                (Some((arg, u)), None) if u[b] < 0 => return Err(Error::SeqLens { arg, msg: format!("entry {b} is {}, a negative length", u[b]) }),
                (Some((_, u)), _) => i64::from(u[b]),
                (None, Some(slot)) => slot,
                (None, None) => 0,
            };
            if let Some(max_seqlen) = max_seqlen
                && len as u64 > max_seqlen as u64
            {
                return Err(Error::SeqLens { arg: max_arg, msg: format!("{max_seqlen} is below the length {len} of sequence {b}") });
            }
            Ok(len as usize)
        })
        .collect()
}

/// Dtype, rank and length of the varlen tensors; returns the number of sequences B.
fn check_varlen_structure(vl: &VarlenViews<'_>) -> Result<usize> {
    let len_q = int_vector("cu_seqlens_q", &vl.cu_seqlens_q)?;
    let len_k = int_vector("cu_seqlens_k", &vl.cu_seqlens_k)?;
    if len_q == 0 {
        return Err(Error::Shape { arg: "cu_seqlens_q", msg: "must have B+1 >= 1 entries, got 0".into() });
    }
    if len_k != len_q {
        return Err(Error::Shape { arg: "cu_seqlens_k", msg: format!("has {len_k} entries but cu_seqlens_q has {len_q}") });
    }
    let batch = len_q - 1;
    for (arg, t) in [("seqused_q", vl.seqused_q), ("seqused_k", vl.seqused_k)] {
        if let Some(t) = t {
            check_entries(arg, &t, batch, || format!("B = {batch} (cu_seqlens has {len_q})"))?;
        }
    }
    Ok(batch)
}

/// An int32 vector the kernels read as a plain array: rank 1, contiguous, 4-byte aligned. Returns its
/// length.
fn int_vector(arg: &'static str, t: &View<'_>) -> Result<usize> {
    check_strides_len(arg, t)?;
    if t.dtype != DType::I32 {
        return Err(Error::DType { arg, got: t.dtype.to_string(), expected: "i32" });
    }
    if t.rank() != 1 {
        return Err(Error::Rank { arg, got: t.rank(), expected: 1 });
    }
    if t.shape[0] > 1 && t.strides[0] != 1 {
        return Err(Error::NotContiguous { arg });
    }
    Ok(t.shape[0])
}

/// An int32 vector of exactly `n` entries (`what` says where n comes from; formatted only on error, since
/// the CUDA path allocates nothing per call).
fn check_entries(arg: &'static str, t: &View<'_>, n: usize, what: impl Fn() -> String) -> Result<()> {
    let len = int_vector(arg, t)?;
    if len != n {
        return Err(Error::Shape { arg, msg: format!("has {len} entries, expected {}", what()) });
    }
    Ok(())
}

fn check_cu_seqlens(arg: &'static str, cu: &[i32], total: Option<usize>) -> Result<()> {
    if cu[0] != 0 {
        return Err(Error::SeqLens { arg, msg: format!("must start at 0, starts at {}", cu[0]) });
    }
    if let Some(b) = (1..cu.len()).find(|&b| cu[b] < cu[b - 1]) {
        return Err(Error::SeqLens { arg, msg: format!("must be non-decreasing, but entry {b} ({}) < entry {} ({})", cu[b], b - 1, cu[b - 1]) });
    }
    let last = cu[cu.len() - 1];
    if let Some(total) = total
        && last as u64 > total as u64
    {
        let of = if arg.ends_with('q') { "q" } else { "k" };
        return Err(Error::SeqLens { arg, msg: format!("last entry {last} exceeds the {total} rows of {of}") });
    }
    Ok(())
}

fn check_options(opts: &AttnOptions) -> Result<()> {
    if let Some(s) = opts.softmax_scale
        && !s.is_finite()
    {
        return Err(Error::Value { arg: "softmax_scale", msg: format!("must be finite, got {s}") });
    }
    if !(opts.softcap.is_finite() && opts.softcap >= 0.0) {
        return Err(Error::Value { arg: "softcap", msg: format!("must be finite and >= 0 (0 = off), got {}", opts.softcap) });
    }
    let (left, right) = opts.window;
    for (side, w) in [("left", left), ("right", right)] {
        if w < -1 {
            return Err(Error::Value { arg: "window", msg: format!("{side} value {w} must be >= -1 (-1 = unbounded)") });
        }
    }
    let p = opts.dropout.p;
    if !(0.0..1.0).contains(&p) {
        return Err(Error::Value { arg: "dropout_p", msg: format!("must be in [0, 1) (0 = off), got {p}") });
    }
    Ok(())
}

/// The canonical dropout of checked options: `None` at p = 0.
fn dropout(opts: &AttnOptions) -> Option<DropoutParams> {
    DropoutParams::new(opts.dropout.p, opts.dropout.seed, opts.dropout.offset)
}

/// ALiBi's slopes for `p`: f32 `[Hq]` (every sequence) or `[B, Hq]`, the last dimension contiguous;
/// records their layout in `p.alibi`. The values are the kernels' business (the CPU path checks that
/// they are finite, where it reads them).
pub fn check_alibi(p: &mut Problem, slopes: Option<&View<'_>>) -> Result<()> {
    let Some(t) = slopes else {
        p.alibi = None;
        return Ok(());
    };
    let arg = "alibi_slopes";
    check_strides_len(arg, t)?;
    if t.dtype != DType::F32 {
        return Err(Error::DType { arg, got: t.dtype.to_string(), expected: "f32" });
    }
    let per_batch = match t.shape {
        &[h] if h == p.hq => false,
        &[b, h] if b == p.batch && h == p.hq => true,
        s => {
            let what = if p.varlen { "B the number of sequences" } else { "B the batch size" };
            return Err(Error::Shape { arg, msg: format!("shape {s:?} must be [Hq] = [{}] or [B, Hq] = [{}, {}] ({what})", p.hq, p.batch, p.hq) });
        }
    };
    let rank = t.rank();
    if t.shape[rank - 1] > 1 && t.strides[rank - 1] != 1 {
        return Err(Error::NotContiguous { arg });
    }
    check_extent(arg, t)?;
    p.alibi = Some(Alibi { batch_stride: if per_batch && t.shape[0] > 1 { t.strides[0] } else { 0 }, head_stride: if t.shape[rank - 1] > 1 { 1 } else { 0 } });
    Ok(())
}

/// `s_dmask` (return_attn_probs) for `p`: f32 or q's dtype, `[B, Hq, Sq, Sk]` (varlen: `[B, Hq,
/// max_seqlen_q, max_seqlen_k]`), last dimension contiguous.
fn check_s_dmask(p: &Problem, t: &View<'_>) -> Result<()> {
    let arg = "s_dmask";
    let dtype = if t.dtype == DType::F32 { DType::F32 } else { p.dtype };
    if t.dtype != dtype {
        return Err(Error::DType { arg, got: t.dtype.to_string(), expected: "f32 or q's dtype" });
    }
    check_like(arg, t, dtype, &p.s_dmask_shape()?, false)
}

/// The mean length of `batch` sequences in `total` rows (rounded up; 0 for no rows): the scheduling
/// estimate that stands in for a max_seqlen the caller did not give.
fn mean_len(total: usize, batch: usize) -> usize {
    total.div_ceil(batch.max(1))
}

fn checked_rows(arg: &'static str, batch: usize, seqlen: usize) -> Result<usize> {
    let rows = batch as u128 * seqlen as u128;
    if rows > I32_MAX {
        return Err(Error::TooLarge { arg, msg: format!("{batch} x {seqlen} rows exceed the i32 row index") });
    }
    Ok(rows as usize)
}

fn fits_i32(arg: &'static str, what: &str, n: usize) -> Result<()> {
    if n as u128 > I32_MAX {
        return Err(Error::TooLarge { arg, msg: format!("{what} {n} exceeds the i32 range") });
    }
    Ok(())
}

/// The largest element offset the view reaches, and every stride, must fit i64.
fn check_extent(arg: &'static str, t: &View<'_>) -> Result<()> {
    if let Some(s) = t.strides.iter().find(|&&s| s as u128 > I64_MAX) {
        return Err(Error::TooLarge { arg, msg: format!("stride {s} exceeds the i64 range") });
    }
    if t.shape.contains(&0) {
        return Ok(());
    }
    let last = t.shape.iter().zip(t.strides).fold(0u128, |acc, (&n, &s)| acc.saturating_add((n as u128 - 1).saturating_mul(s as u128)));
    // Byte addresses of the whole view must not wrap either.
    if last > I64_MAX || (t.addr as u128).saturating_add(last.saturating_mul(t.dtype.size() as u128)) > u64::MAX as u128 {
        return Err(Error::TooLarge { arg, msg: format!("element offset {last} exceeds the i64 range") });
    }
    Ok(())
}
