//! The KV cache's small kernels around the attention (which is the paged forward's: `fwd::kv::Pages`
//! reads a contiguous cache as one page per row): the append of k_new / v_new into the caller's cache
//! with rotary embedding (and q's rotation into a scratch copy), and the combine of split-KV's partial
//! results (also the public `combine`). Both are memory-bound and run one thread per feature pair /
//! one warp per 32 columns of an output row. Every index read from device memory is clamped or checked, so bogus
//! lengths, rows or tables never touch memory outside the tensors.

use crate::arch::math::{div_rem_u32, exp2, log2};
use crate::arch::mem::{ld_global_nc_f32, ld_global_nc_i32, ld_global_nc_u16, st_global_f32, st_global_u16};
use crate::arch::shfl::{shfl_idx_u32, shfl_xor_f32};
use crate::arch::sreg::{block_idx_x, thread_idx_x};
use crate::params::{AppendParams, CombineParams, DTYPE_BF16, DTYPE_F16, DTYPE_F32};
use crate::tile::{Elem, BF16, F16};
use crate::variants::{combine_warps_per_row, APPEND_THREADS, COMBINE_WARPS};

const LOG2_E: f32 = core::f32::consts::LOG2_E;

#[inline(always)]
fn shfl_idx_f32(v: f32, src: u32) -> f32 {
    f32::from_bits(shfl_idx_u32(v.to_bits(), src))
}
const LN_2: f32 = core::f32::consts::LN_2;

#[inline(always)]
fn clamp(x: i32, lo: i32, hi: i32) -> i32 {
    let x = if x > hi { hi } else { x };
    if x < lo { lo } else { x }
}

/// Load one element of type `E` as f32.
#[inline(always)]
unsafe fn ld_elem<E: Elem>(addr: u64) -> f32 {
    E::unpack(unsafe { ld_global_nc_u16(addr) }).0
}

/// Store `x` rounded to `E` (round to nearest even, as the host's conversions).
#[inline(always)]
unsafe fn st_elem<E: Elem>(addr: u64, x: f32) {
    unsafe { st_global_u16(addr, E::pack(x, 0.0)) }
}

/// Features `(a, b)` of pair `c` and whether they turn: rotary pairs (2c, 2c+1) interleaved or
/// (c, c + dim/2); past the rotated features, the plain pair (2c, 2c+1).
#[inline(always)]
fn pair(ap: &AppendParams, c: i32) -> (i32, i32, bool) {
    // (Validation gives rotary tables at least one position; a table without one turns nothing.)
    let half = if ap.rotary_len > 0 { ap.rotary_dim / 2 } else { 0 };
    if c < half {
        if ap.interleaved != 0 { (2 * c, 2 * c + 1, true) } else { (c, c + half, true) }
    } else {
        (2 * c, 2 * c + 1, false)
    }
}

/// (x, y) turned to position `pos` by column `c` of the tables (pos clamped into them).
#[inline(always)]
unsafe fn rotate<E: Elem>(ap: &AppendParams, x: f32, y: f32, pos: i32, c: i32) -> (f32, f32) {
    let pos = clamp(pos, 0, ap.rotary_len - 1) as i64;
    let (cos_at, sin_at) = (pos * ap.cos_row + c as i64, pos * ap.sin_row + c as i64);
    let (cos, sin) = unsafe {
        if ap.rotary_f32 != 0 {
            (ld_global_nc_f32(ap.rotary_cos + (cos_at * 4) as u64), ld_global_nc_f32(ap.rotary_sin + (sin_at * 4) as u64))
        } else {
            (ld_elem::<E>(ap.rotary_cos + (cos_at * 2) as u64), ld_elem::<E>(ap.rotary_sin + (sin_at * 2) as u64))
        }
    };
    // As the host computes it: two products and a sum, no fused multiply-add.
    (sub_nofma(x * cos, y * sin), add_nofma(x * sin, y * cos))
}

/// `a - b` and `a + b` rounded once each (kept apart from the products, so no FMA contracts them).
#[inline(always)]
fn sub_nofma(a: f32, b: f32) -> f32 {
    let r: f32;
    unsafe { core::arch::asm!("sub.rn.f32 {r}, {a}, {b};", r = out(reg32) r, a = in(reg32) a, b = in(reg32) b, options(pure, nomem, nostack)) };
    r
}
#[inline(always)]
fn add_nofma(a: f32, b: f32) -> f32 {
    let r: f32;
    unsafe { core::arch::asm!("add.rn.f32 {r}, {a}, {b};", r = out(reg32) r, a = in(reg32) a, b = in(reg32) b, options(pure, nomem, nostack)) };
    r
}

/// One feature pair: of k_new and v_new (item < append_items: appended at position `cache_seqlens[b] +
/// i` of the batch entry's cache row, k turned there), or of q (turned to its position into q_rot).
#[inline(always)]
unsafe fn append_entry<E: Elem>(ap: &AppendParams) {
    let item = block_idx_x() as i64 * APPEND_THREADS as i64 + thread_idx_x() as i64;
    if item >= ap.items {
        return;
    }
    let pairs = (ap.head_dim / 2) as i64;
    let c = (item % pairs) as i32;
    let (fa, fb, turns) = pair(ap, c);
    if item < ap.append_items {
        let rh = item / pairs;
        let h = (rh % ap.h_k as i64) as i32;
        let r = rh / ap.h_k as i64;
        let (b, i) = ((r / ap.seqlen_new as i64) as i32, (r % ap.seqlen_new as i64) as i32);
        let pos = unsafe { ld_global_nc_i32(ap.cache_seqlens + b as u64 * 4) } as i64 + i as i64;
        // Where position `pos` of the entry's row lives; nothing past the row's capacity is written.
        let row = if ap.block_table != 0 {
            if pos < 0 || pos >= ap.max_blocks as i64 * ap.cache_rows as i64 {
                return;
            }
            let (page, off) = div_rem_u32(pos as u32, ap.cache_rows as u32);
            let entry = unsafe { ld_global_nc_i32(ap.block_table + ((b as i64 * ap.block_table_stride + page as i64) * 4) as u64) };
            (clamp(entry, 0, ap.cache_batch - 1) as i64, off as i64)
        } else {
            if pos < 0 || pos >= ap.cache_rows as i64 {
                return;
            }
            let e = if ap.cache_batch_idx != 0 { unsafe { ld_global_nc_i32(ap.cache_batch_idx + b as u64 * 4) } } else { b };
            (clamp(e, 0, ap.cache_batch - 1) as i64, pos)
        };
        let at = |base: u64, s: &[i64; 3], f: i32| base + ((row.0 * s[0] + row.1 * s[1] + h as i64 * s[2] + f as i64) * 2) as u64;
        let src = |base: u64, s: &[i64; 3], f: i32| base + ((b as i64 * s[0] + i as i64 * s[1] + h as i64 * s[2] + f as i64) * 2) as u64;
        unsafe {
            let (x, y) = (ld_elem::<E>(src(ap.k_new, &ap.k_new_strides, fa)), ld_elem::<E>(src(ap.k_new, &ap.k_new_strides, fb)));
            let (x, y) = if turns { rotate::<E>(ap, x, y, pos as i32, c) } else { (x, y) };
            st_elem::<E>(at(ap.k_cache, &ap.k_strides, fa), x);
            st_elem::<E>(at(ap.k_cache, &ap.k_strides, fb), y);
            let (x, y) = (ld_elem::<E>(src(ap.v_new, &ap.v_new_strides, fa)), ld_elem::<E>(src(ap.v_new, &ap.v_new_strides, fb)));
            st_elem::<E>(at(ap.v_cache, &ap.v_strides, fa), x);
            st_elem::<E>(at(ap.v_cache, &ap.v_strides, fb), y);
        }
    } else {
        let rh = (item - ap.append_items) / pairs;
        let h = (rh % ap.h as i64) as i32;
        let r = rh / ap.h as i64;
        let (b, i) = ((r / ap.seqlen_q as i64) as i32, (r % ap.seqlen_q as i64) as i32);
        let pos = unsafe { ld_global_nc_i32(ap.cache_seqlens + b as u64 * 4) } + if ap.q_per_row != 0 { i } else { 0 };
        let s = &ap.q_strides;
        let src = |f: i32| ap.q + ((b as i64 * s[0] + i as i64 * s[1] + h as i64 * s[2] + f as i64) * 2) as u64;
        let dst = |f: i32| ap.q_rot + ((rh * ap.head_dim as i64 + f as i64) * 2) as u64;
        unsafe {
            let (x, y) = (ld_elem::<E>(src(fa)), ld_elem::<E>(src(fb)));
            let (x, y) = if turns { rotate::<E>(ap, x, y, pos, c) } else { (x, y) };
            st_elem::<E>(dst(fa), x);
            st_elem::<E>(dst(fb), y);
        }
    }
}

#[unsafe(export_name = "flash_kvcache_append_bf16")]
pub unsafe extern "ptx-kernel" fn append_bf16(p: AppendParams) {
    unsafe { append_entry::<BF16>(&p) }
}

#[unsafe(export_name = "flash_kvcache_append_f16")]
pub unsafe extern "ptx-kernel" fn append_f16(p: AppendParams) {
    unsafe { append_entry::<F16>(&p) }
}

#[inline(always)]
unsafe fn store_any(base: u64, idx: i64, dtype: i32, x: f32) {
    unsafe {
        match dtype {
            DTYPE_F32 => st_global_f32(base + (idx * 4) as u64, x),
            DTYPE_BF16 => st_elem::<BF16>(base + (idx * 2) as u64, x),
            DTYPE_F16 => st_elem::<F16>(base + (idx * 2) as u64, x),
            _ => {}
        }
    }
}

/// A partial result's element type: its loads as f32 (one kernel body per type).
trait Partial {
    const BYTES: i64;
    unsafe fn load(addr: u64) -> f32;
}
struct PartialF32;
impl Partial for PartialF32 {
    const BYTES: i64 = 4;
    #[inline(always)]
    unsafe fn load(addr: u64) -> f32 {
        unsafe { ld_global_nc_f32(addr) }
    }
}
impl<E: Elem> Partial for E {
    const BYTES: i64 = 2;
    #[inline(always)]
    unsafe fn load(addr: u64) -> f32 {
        unsafe { ld_elem::<E>(addr) }
    }
}

/// Splits whose partial loads a lane has in flight at once (`combine_with`).
const COMBINE_UNROLL: usize = 16;

/// lse = max + log(sum_i exp(lse_i - max)), out = sum_i w_i out_i with w_i = exp(lse_i - lse); a row no
/// partial saw a key for (every lse_i -inf) is out 0, lse -inf. One warp per (batch, row, head) and 32
/// columns (`combine_warps_per_row`): few rows with many splits (decode) still spread over the GPU.
/// Each warp reads the row's LSEs itself (a lane per split, 32 at a time), then walks the splits with
/// `COMBINE_UNROLL` loads in flight per lane (each a column), lane j holding split j's weight.
#[unsafe(export_name = "flash_combine")]
pub unsafe extern "ptx-kernel" fn combine(cp: CombineParams) {
    // After the decode kernel, the host launches this one programmatically (Hopper): its blocks start
    // while the decode's last ones run, and wait here for the partials.
    crate::arch::sync::grid_dependency_wait();
    unsafe {
        match cp.in_dtype {
            DTYPE_F32 => combine_with::<PartialF32>(&cp),
            DTYPE_BF16 => combine_with::<BF16>(&cp),
            _ => combine_with::<F16>(&cp),
        }
    }
}

#[inline(always)]
unsafe fn combine_with<P: Partial>(cp: &CombineParams) {
    let col_warps = combine_warps_per_row(cp.head_dim as usize) as i64;
    let warp = block_idx_x() as i64 * COMBINE_WARPS as i64 + (thread_idx_x() / 32) as i64;
    let lane = (thread_idx_x() % 32) as i32;
    let (row_idx, chunk) = (warp / col_warps, (warp % col_warps) as i32);
    if row_idx >= cp.rows {
        return;
    }
    let h = (row_idx % cp.heads as i64) as i32;
    let br = row_idx / cp.heads as i64;
    let (b, r) = ((br / cp.seqlen as i64) as i32, (br % cp.seqlen as i64) as i32);
    // Where the partials of out row (b, r, h) are: packed (kv head, packed row), or the same.
    let (ph_idx, pr_idx) = if cp.pack > 1 {
        let (hk, g) = div_rem_u32(h as u32, cp.pack as u32);
        (hk as i64, r as i64 * cp.pack as i64 + g as i64)
    } else {
        (h as i64, r as i64)
    };
    let [ps, pb, ph, pr] = cp.pl_strides;
    let lse_at = |i: i32| unsafe { ld_global_nc_f32(cp.partial_lse + ((i as i64 * ps + b as i64 * pb + ph_idx * ph + pr_idx * pr) * 4) as u64) };
    // Base-2 exponents throughout: l * log2(e). Lane j keeps split j's LSE of the first 32.
    let first = if lane < cp.splits { lse_at(lane) } else { f32::NEG_INFINITY };
    let mut max = first;
    let mut i = lane + 32;
    while i < cp.splits {
        let l = lse_at(i);
        max = if l > max { l } else { max };
        i += 32;
    }
    for s in [16, 8, 4, 2, 1] {
        let o = shfl_xor_f32(max, s as u32);
        max = if o > max { o } else { max };
    }
    let [os, ob, or, oh] = cp.po_strides;
    let [ob2, or2, oh2] = cp.out_strides;
    let out_row = b as i64 * ob2 + r as i64 * or2 + h as i64 * oh2;
    let [lb, lh, lr] = cp.lse_strides;
    let lse_idx = b as i64 * lb + h as i64 * lh + r as i64 * lr;
    let c = chunk * 32 + lane;
    let col = c < cp.head_dim;
    if max == f32::NEG_INFINITY || max != max {
        if col {
            unsafe { store_any(cp.out, out_row + c as i64, cp.out_dtype, 0.0) };
        }
        if chunk == 0 && lane == 0 {
            unsafe { st_global_f32(cp.lse + (lse_idx * 4) as u64, f32::NEG_INFINITY) };
        }
        return;
    }
    let max2 = max * LOG2_E;
    let mut sum = if lane < cp.splits { exp2(first * LOG2_E - max2) } else { 0.0 };
    let mut i = lane + 32;
    while i < cp.splits {
        sum += exp2(lse_at(i) * LOG2_E - max2);
        i += 32;
    }
    for s in [16, 8, 4, 2, 1] {
        sum += shfl_xor_f32(sum, s as u32);
    }
    let lse2 = max2 + log2(sum);
    // This lane's column of every split, the splits 32 at a time (lane j holding split j's weight,
    // shuffled to every lane), `COMBINE_UNROLL` loads issued before their products. A split of weight 0
    // (no key) is not read: its partial may be anything.
    let src = cp.partial_out.wrapping_add(((b as i64 * ob + pr_idx * or + ph_idx * oh + c as i64) * P::BYTES) as u64);
    let mut acc = 0f32;
    let mut chunk0 = 0;
    while chunk0 < cp.splits {
        let i = chunk0 + lane;
        let l = if chunk0 == 0 { first } else if i < cp.splits { lse_at(i) } else { f32::NEG_INFINITY };
        let w_mine = if i < cp.splits { exp2(l * LOG2_E - lse2) } else { 0.0 };
        let n = if cp.splits - chunk0 < 32 { cp.splits - chunk0 } else { 32 };
        let mut j = 0;
        while j < n {
            let mut part = [0f32; COMBINE_UNROLL];
            let mut w = [0f32; COMBINE_UNROLL];
            for u in 0..COMBINE_UNROLL {
                w[u] = shfl_idx_f32(w_mine, (j as u32 + u as u32) % 32);
                if j + (u as i32) < n && w[u] > 0.0 && col {
                    part[u] = unsafe { P::load(src.wrapping_add(((chunk0 + j + u as i32) as i64 * os * P::BYTES) as u64)) };
                }
            }
            for u in 0..COMBINE_UNROLL {
                if j + (u as i32) < n && w[u] > 0.0 {
                    acc += w[u] * part[u];
                }
            }
            j += COMBINE_UNROLL as i32;
        }
        chunk0 += 32;
    }
    if col {
        unsafe { store_any(cp.out, out_row + c as i64, cp.out_dtype, acc) };
    }
    if chunk == 0 && lane == 0 {
        unsafe { st_global_f32(cp.lse + (lse_idx * 4) as u64, lse2 * LN_2) };
    }
}
