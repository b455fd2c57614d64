//! The CPU path: flash-attention's tiled forward in plain Rust (the backward is in bwd.rs). Each work
//! item is one query tile of one (sequence, head); it walks the key tiles its rows can see, keeping a
//! running row max, sum and f32 accumulator (online softmax), and writes out = acc / sum and
//! lse = max + ln(sum).
//!
//! Tiles start at each sequence's row 0 and every row's arithmetic depends only on its own sequence, so a
//! packed varlen batch gives bitwise the same result as one call per sequence. Keys come through
//! `kv::KeyRows` (contiguous rows or pages), which changes addresses only: a paged call is bitwise the
//! contiguous one. The KV-cache forward (kvcache.rs) appends to the cache first; with split-KV, each
//! split of a row's key tiles is a work item of its own and `combine::merge` joins them. The hot loops
//! (`tile.rs`, `bwd.rs`) are compiled per head dim and vector ISA (`simd.rs`), with e^x from `math.rs`;
//! every variant gives the same bits (`set_vectors`, tests/cpu_simd.rs).

mod bwd;
pub(crate) mod combine;
mod kv;
mod math;
pub(crate) mod kvcache;
mod mask;
mod rotary;
mod score;
mod simd;
mod seqlen;
mod tile;

use crate::error::{Error, Result};
use crate::problem::{BwdProblem, HostKvCache, HostPagedSeqlens, HostSeqlens, Problem};
use crate::types::{BwdViews, DType, FwdViews, KvCacheViews, PagedVarlenViews, VarlenViews, View};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;
use score::Mods;
pub use simd::{set_vectors, Vectors};
use seqlen::SeqInfo;

/// Query rows per work item and keys per tile.
pub(crate) const BLOCK_M: usize = 64;
pub(crate) const BLOCK_N: usize = 64;

/// `f` over `items`, in order: on rayon's threads, or on this one where the call is too small to pay for waking
/// them (`work`: about its multiply-adds; below 2^20, tens of microseconds of arithmetic, about what waking the pool costs). Each item's
/// result is its own either way.
pub(crate) fn map_items<T: Sync, R: Send>(items: &[T], work: usize, f: impl Fn(&T) -> R + Sync + Send) -> Vec<R> {
    if serial(work) || items.len() < 2 {
        items.iter().map(f).collect()
    } else {
        items.par_iter().map(f).collect()
    }
}

/// Whether `map_items` runs a call of this much work on the calling thread alone.
pub(crate) fn serial(work: usize) -> bool {
    work < 1 << 20
}

/// About the multiply-adds of an attention call (every query against every key, twice over D).
pub(crate) fn call_work(p: &Problem) -> usize {
    p.total_q.saturating_mul(p.hq).saturating_mul(p.seqlen_k.max(1)).saturating_mul(2 * p.head_dim)
}

/// Host memory of one input, typed so reads need no casts: its elements from the view's first one to
/// its last (indices are strides from there).
#[derive(Clone, Copy, Debug)]
pub(crate) enum HostSlice<'a> {
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    F32(&'a [f32]),
}

/// The view's elements as a host slice.
///
/// # Safety
/// The view must be valid host memory for reads over its whole span, unchanged while the slice lives.
unsafe fn host_slice<'a>(arg: &'static str, t: &View<'_>) -> Result<HostSlice<'a>> {
    let span = t.span().ok_or_else(|| Error::TooLarge { arg, msg: "the view's span exceeds usize".into() })?;
    // A dangling but aligned pointer for empty views, which from_raw_parts requires to be non-null.
    let ptr = |align: usize| if span == 0 { align as *const u8 } else { t.addr as *const u8 };
    unsafe {
        Ok(match t.dtype {
            DType::F16 => HostSlice::F16(std::slice::from_raw_parts(ptr(2) as *const f16, span)),
            DType::BF16 => HostSlice::BF16(std::slice::from_raw_parts(ptr(2) as *const bf16, span)),
            DType::F32 => HostSlice::F32(std::slice::from_raw_parts(ptr(4) as *const f32, span)),
            DType::I32 => return Err(Error::DType { arg, got: "i32".into(), expected: "f16, bf16 or f32" }),
        })
    }
}

/// Host copies of the varlen lengths (checked by the caller).
///
/// # Safety
/// The views must be valid host memory (their structure already validated: contiguous int32 vectors).
pub(crate) unsafe fn host_seqlens(vl: &VarlenViews<'_>) -> HostSeqlens {
    let read = |t: &View<'_>| -> Vec<i32> { if t.shape[0] == 0 { Vec::new() } else { unsafe { std::slice::from_raw_parts(t.addr as *const i32, t.shape[0]).to_vec() } } };
    HostSeqlens { cu_seqlens_q: read(&vl.cu_seqlens_q), cu_seqlens_k: read(&vl.cu_seqlens_k), seqused_q: vl.seqused_q.as_ref().map(read), seqused_k: vl.seqused_k.as_ref().map(read) }
}

/// The int32 entries of a validated index tensor (a contiguous vector, or a matrix with contiguous
/// rows), row-major.
///
/// # Safety
/// The view must be valid host memory.
unsafe fn read_i32(t: &View<'_>) -> Vec<i32> {
    let (rows, cols, pitch) = match t.shape {
        [n] => (1, *n, 0),
        [r, c] => (*r, *c, t.strides[0]),
        _ => unreachable!("validated index tensors are vectors or matrices"),
    };
    let mut v = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        if cols > 0 {
            let at = t.addr as usize + r * pitch * 4;
            v.extend_from_slice(unsafe { std::slice::from_raw_parts(at as *const i32, cols) });
        }
    }
    v
}

/// Host copies of a paged varlen call's index tensors (checked by the caller).
///
/// # Safety
/// The views must be valid host memory (their structure already validated).
pub(crate) unsafe fn host_paged_seqlens(pv: &PagedVarlenViews<'_>) -> HostPagedSeqlens {
    unsafe {
        HostPagedSeqlens {
            cu_seqlens_q: read_i32(&pv.cu_seqlens_q),
            cu_seqlens_k: pv.cu_seqlens_k.as_ref().map(|t| read_i32(t)),
            seqused_q: pv.seqused_q.as_ref().map(|t| read_i32(t)),
            seqused_k: pv.seqused_k.as_ref().map(|t| read_i32(t)),
            block_table: read_i32(&pv.block_table),
        }
    }
}

/// Host copies of a KV-cache call's index tensors (checked by the caller).
///
/// # Safety
/// The views must be valid host memory (their structure already validated).
pub(crate) unsafe fn host_kvcache(t: &KvCacheViews<'_>) -> HostKvCache {
    unsafe {
        HostKvCache {
            cache_seqlens: read_i32(&t.cache_seqlens),
            cache_batch_idx: t.cache_batch_idx.as_ref().map(|t| read_i32(t)),
            cache_leftpad: t.cache_leftpad.as_ref().map(|t| read_i32(t)),
            block_table: t.block_table.as_ref().map(|t| read_i32(t)),
        }
    }
}

/// Write `src` (one row of the last dimension) at element offset `at` of a view, rounding to its dtype.
///
/// # Safety
/// The view must be valid host memory for writes at `at..at + src.len()`, aliasing nothing being read.
unsafe fn store_row(t: &View<'_>, at: usize, src: &[f32]) {
    let at = t.addr as usize + at * t.dtype.size();
    let n = src.len();
    unsafe {
        match t.dtype {
            DType::F16 => std::slice::from_raw_parts_mut(at as *mut f16, n).convert_from_f32_slice(src),
            DType::BF16 => std::slice::from_raw_parts_mut(at as *mut bf16, n).convert_from_f32_slice(src),
            DType::F32 => std::slice::from_raw_parts_mut(at as *mut f32, n).copy_from_slice(src),
            DType::I32 => unreachable!("validated outputs are f16, bf16 or f32"),
        }
    }
}

/// Write `values` (row-major over the view's shape) into a view whose last dimension is contiguous,
/// rounding to its dtype once.
///
/// # Safety
/// The view must be valid host memory for writes over its whole span, aliasing nothing being read.
unsafe fn scatter(t: &View<'_>, values: &[f32]) {
    if t.numel() == 0 {
        return;
    }
    for (r, src) in values.chunks_exact(t.shape[t.rank() - 1]).enumerate() {
        unsafe { store_row(t, row_offset(t, r), src) };
    }
}

/// Writes 0 over every element of a view whose last dimension is contiguous.
///
/// # Safety
/// As `scatter`.
unsafe fn zero_rows(t: &View<'_>) {
    if t.numel() == 0 {
        return;
    }
    let last = t.shape[t.rank() - 1];
    let zeros = vec![0.0f32; last];
    for r in 0..t.numel() / last {
        unsafe { store_row(t, row_offset(t, r), &zeros) };
    }
}

/// Element offset of row `r` (row-major over every dimension but the last) of a view.
fn row_offset(t: &View<'_>, r: usize) -> usize {
    let (mut lin, mut off) = (r, 0usize);
    for d in (0..t.rank() - 1).rev() {
        off += (lin % t.shape[d]) * t.strides[d];
        lin /= t.shape[d];
    }
    off
}

/// The forward on host memory, into the caller's out and lse.
///
/// # Safety
/// As `raw::fwd` on `Target::Cpu`; `p.seqlens` is filled in for varlen.
pub(crate) unsafe fn fwd_into(p: &Problem, t: &FwdViews<'_>) -> Result<()> {
    let (q, k, v) = unsafe { (host_slice("q", &t.q)?, host_slice("k", &t.k)?, host_slice("v", &t.v)?) };
    let mods = unsafe { Mods::read(p, t.alibi_slopes.as_ref())? };
    unsafe {
        let lse = fwd(p, q, k, v, &mods, 1, &t.out)?;
        if let Some(view) = &t.s_dmask {
            probs_into(p, q, k, &mods, &lse, view)?;
        }
        scatter(&t.lse, &lse);
    }
    Ok(())
}

/// The probabilities of every (sequence, head) (`tile::probs`) into `view`, `[B, Hq, Sq, Sk]` (varlen:
/// `[B, Hq, max_seqlen_q, max_seqlen_k]`, each sequence at the top left of its block, zero-padded; the last
/// dimension contiguous). O(S^2): the tiles go in chunks of a few per thread, straight into the view, so the
/// memory beyond the view's own is a few tiles.
///
/// # Safety
/// As `scatter` for `view`.
unsafe fn probs_into(p: &Problem, qd: HostSlice<'_>, kd: HostSlice<'_>, mods: &Mods, lse: &[f32], view: &View<'_>) -> Result<()> {
    let (seqs, lse_head_stride) = seqlen::sequences(p)?;
    let keys = kv::KeyRows::new(p);
    let group = p.hq / p.hk;
    let (sq_max, sk_max) = (p.seqlen_q, p.seqlen_k);
    if p.batch * p.hq * sq_max * sk_max == 0 {
        return Ok(());
    }
    // Every row 0 first (the padding), then the sequences' rows over it; row (b, h, i) of the view.
    unsafe { zero_rows(view) };
    let row_at = |b: usize, h: usize, i: usize| row_offset(view, (b * p.hq + h) * sq_max + i);
    let items: Vec<(usize, usize, usize)> = seqs.iter().enumerate().flat_map(|(b, s)| (0..p.hq).flat_map(move |h| (0..s.seqlen_q.div_ceil(BLOCK_M)).map(move |m| (b, h, m)))).collect();
    for chunk in items.chunks(4 * rayon::current_num_threads()) {
        let tiles: Vec<Vec<f32>> = map_items(chunk, call_work(p), |&(b, h, m_block)| {
            let s = &seqs[b];
            let operands = tile::Operands { q: qd, k: kd, v: kd, keys: &keys, k_head: (h / group) * p.k.head, v_head: 0 };
            let at = s.lse_base + h * lse_head_stride + m_block * BLOCK_M;
            let rows = (s.seqlen_q - m_block * BLOCK_M).min(BLOCK_M);
            tile::probs(p, &operands, s, &mods.head(b, h), h * p.q.head, m_block, &lse[at..at + rows])
        });
        for (&(b, h, m_block), t) in chunk.iter().zip(&tiles) {
            let sk = seqs[b].seqlen_k;
            if sk == 0 {
                continue;
            }
            for (r, row) in t.chunks_exact(sk).enumerate() {
                unsafe { store_row(view, row_at(b, h, m_block * BLOCK_M + r), row) };
            }
        }
    }
    Ok(())
}

/// The backward on host memory, into the caller's dq, dk, dv.
///
/// # Safety
/// As `raw::bwd` on `Target::Cpu`; `bp.fwd.seqlens` is filled in for varlen.
pub(crate) unsafe fn bwd_into(bp: &BwdProblem, t: &BwdViews<'_>) -> Result<()> {
    let [dout, q, k, v, out] = unsafe { [host_slice("dout", &t.dout)?, host_slice("q", &t.q)?, host_slice("k", &t.k)?, host_slice("v", &t.v)?, host_slice("out", &t.out)?] };
    let HostSlice::F32(lse) = (unsafe { host_slice("lse", &t.lse)? }) else { unreachable!("validated lse is f32") };
    let mods = unsafe { Mods::read(&bp.fwd, t.alibi_slopes.as_ref())? };
    let [dq, dk, dv] = bwd::bwd(bp, dout, q, k, v, out, lse, &mods)?;
    unsafe {
        scatter(&t.dq, &dq);
        scatter(&t.dk, &dk);
        scatter(&t.dv, &dv);
    }
    Ok(())
}

/// Forward pass on host memory described by a validated `Problem`: out straight into `out` (a view shaped
/// `out_shape`, last dimension contiguous, rounded to its dtype once), the work items in chunks so that
/// only a few tiles' f32 rows exist at a time; the lse returned (contiguous `lse_shape`). With `splits` > 1 each
/// row's key tiles are cut into that many ranges (as even as whole tiles allow; some may be empty), attended
/// to separately and merged.
///
/// # Safety
/// As `scatter` for `out`, which aliases nothing the call reads.
unsafe fn fwd(p: &Problem, qd: HostSlice<'_>, kd: HostSlice<'_>, vd: HostSlice<'_>, mods: &Mods, splits: usize, out: &View<'_>) -> Result<Vec<f32>> {
    let (seqs, lse_head_stride) = seqlen::sequences(p)?;
    let keys = kv::KeyRows::new(p);
    let d = p.head_dim;
    let group = p.hq / p.hk;
    let splits = splits.max(1);

    // Rows no tile covers (varlen padding past seqused_q or cu_seqlens_q[B]) stay out 0, LSE -inf: every row
    // 0 first.
    let mut lse = vec![f32::NEG_INFINITY; p.hq * p.total_q];
    if out.numel() == 0 {
        return Ok(lse);
    }
    unsafe { zero_rows(out) };
    let mut row = vec![0.0f32; d];

    // Work items: a tile of one (sequence, kv head) (`TileRows`: with GQA the group's q heads share it) and a
    // split of its key tiles.
    let items: Vec<(usize, usize, tile::TileRows, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(b, s)| (0..p.hk).flat_map(move |hk| tile::TileRows::tiles(s.seqlen_q, hk * group, group).flat_map(move |t| (0..splits).map(move |i| (b, hk, t, i)))))
        .collect();
    let mut parts = vec![0.0f32; splits];
    for chunk in items.chunks(splits * 64 * rayon::current_num_threads()) {
        let tiles: Vec<tile::TileOut> = map_items(chunk, call_work(p), |&(b, hk, rows, split)| {
            let operands = tile::Operands { q: qd, k: kd, v: vd, keys: &keys, k_head: hk * p.k.head, v_head: hk * p.v.head };
            let per_split = seqs[b].seqlen_k.div_ceil(BLOCK_N).div_ceil(splits);
            let n_blocks = if splits == 1 { 0..usize::MAX } else { split * per_split..(split + 1) * per_split };
            tile::attend(p, &operands, &seqs[b], mods, b, rows, n_blocks)
        });
        for (work, split_tiles) in chunk.chunks_exact(splits).zip(tiles.chunks_exact(splits)) {
            let (b, _, rows, _) = work[0];
            let s: &SeqInfo = &seqs[b];
            for r in 0..rows.len() {
                let (i, h) = rows.at(r);
                let l = if splits == 1 {
                    row.copy_from_slice(&split_tiles[0].out[r * d..][..d]);
                    split_tiles[0].lse[r]
                } else {
                    parts.iter_mut().zip(split_tiles).for_each(|(x, t)| *x = t.lse[r]);
                    combine::merge(&parts, |i| &split_tiles[i].out[r * d..][..d], &mut row)
                };
                unsafe { store_row(out, row_offset(out, (s.out_row0 + i) * p.hq + h), &row) };
                lse[s.lse_base + h * lse_head_stride + i] = l;
            }
        }
    }
    Ok(lse)
}

/// Asks the CPU to fetch rows `first, first + stride, ..` (n of them, each `d` contiguous elements) of `data`
/// into its caches ahead of their loads: a tile's rows lie a row of every kv head apart, too far apart for the
/// hardware prefetchers, and without this a decoding step read its cache at a fifth of the memory bandwidth.
/// A hint only (prefetches never fault); nothing on other architectures.
fn prefetch_rows(data: HostSlice<'_>, first: usize, stride: usize, n: usize, d: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let (base, elem, len) = match data {
            HostSlice::F16(x) => (x.as_ptr() as *const u8, 2, x.len()),
            HostSlice::BF16(x) => (x.as_ptr() as *const u8, 2, x.len()),
            HostSlice::F32(x) => (x.as_ptr() as *const u8, 4, x.len()),
        };
        for r in 0..n {
            let at = first + r * stride;
            if at + d > len {
                break;
            }
            for line in (0..d * elem).step_by(64) {
                // Safety: prefetching is a hint without architectural effect; the address is in the slice.
                unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(base.wrapping_add(at * elem + line) as *const i8) };
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, first, stride, n, d);
}

/// Rows `first, first + stride, ..` (n of them, each `d` contiguous elements) of `data`, widened to f32
/// into `dst` (`n * d` long); inlined, so that in the hot loops it compiles with their vector ISA.
#[inline(always)]
fn load_rows(data: HostSlice<'_>, first: usize, stride: usize, n: usize, d: usize, dst: &mut [f32]) {
    for (r, row) in dst.chunks_exact_mut(d).take(n).enumerate() {
        let at = first + r * stride;
        match data {
            HostSlice::F16(x) => x[at..at + d].convert_to_f32_slice(row),
            // Exact: bf16 is f32's upper half (a loop that vectorizes, where half's converter did not).
            HostSlice::BF16(x) => row.iter_mut().zip(&x[at..at + d]).for_each(|(o, h)| *o = f32::from_bits(u32::from(h.to_bits()) << 16)),
            HostSlice::F32(x) => row.copy_from_slice(&x[at..at + d]),
        }
    }
}
