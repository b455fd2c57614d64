//! convert: dq = scale * the f32 accumulator (the sum of its copies in order 0, 1, ..., see
//! `BwdParams::dq_splits`), in the input type; rows of no sequence get 0. Head dim at run time. The
//! Hopper dK/dV kernel runs `convert_rows` itself when one CTA walks all key blocks.

use super::{dqa_addr, grid_block, row_addr, sequences};
use crate::arch::math::div_rem_u32;
use crate::arch::mem::{ld_global_v4, st_global_v4};
use crate::arch::sreg::{block_idx_y, grid_dim_x, thread_idx_x};
use crate::tile::{Elem, BF16, F16};
use crate::params::BwdParams;
use crate::seqlen::SeqlenInfo;
use crate::variants::BWD_ROWS_PER_BLOCK;

/// Row and 16-byte chunk of chunk index `idx >= 0` (`chunks > 0` per row) from row `r0`: unchecked
/// division (`div_rem_u32`), so that no trap path reaches the warp-specialized kernel's consumers.
#[inline(always)]
fn row_chunk(r0: i32, idx: i32, chunks: i32) -> (i32, i32) {
    let (q, r) = div_rem_u32(idx as u32, chunks as u32);
    (r0 + q as i32, r as i32)
}

/// dq = scale * dq_accum in the input type for rows `[r0, r1)` of slot `sq` (sequence `bidb`), head `h`:
/// real rows converted, padding and tail rows 0; 16-byte stores. Thread `tid` of `THREADS` takes every
/// `THREADS`-th 16-byte chunk, `UNROLL` chunks' loads in flight at once.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn convert_rows<E: Elem, const THREADS: usize, const UNROLL: usize>(p: &BwdParams, bidb: i32, sq: &SeqlenInfo, h: i32, r0: i32, r1: i32, tid: usize) {
    let chunks = p.head_dim / 8;
    let total = (r1 - r0) * chunks;
    let mut idx0 = tid as i32;
    while idx0 < total {
        let mut x = [[[0u32; 4]; 2]; UNROLL];
        for (u, xu) in x.iter_mut().enumerate() {
            let idx = idx0 + (u * THREADS) as i32;
            let (r, c) = row_chunk(r0, idx, chunks);
            if idx < total && r < sq.used {
                let a = dqa_addr(p, bidb, sq.start + r, h, c as i64 * 8);
                *xu = unsafe { [ld_global_v4(a), ld_global_v4(a + 16)] };
            }
        }
        // The other copies of the accumulator, added in order (deterministic on Hopper). (The copy loop
        // outside the chunk loop, so that the chunk loop unrolls and `x` stays in registers.)
        let mut split = 1;
        while split < p.dq_splits {
            let off = (split as i64 * p.dqa_split_stride * 4) as u64;
            for (u, xu) in x.iter_mut().enumerate() {
                let idx = idx0 + (u * THREADS) as i32;
                let (r, c) = row_chunk(r0, idx, chunks);
                if idx < total && r < sq.used {
                    let a = dqa_addr(p, bidb, sq.start + r, h, c as i64 * 8).wrapping_add(off);
                    let y = unsafe { [ld_global_v4(a), ld_global_v4(a + 16)] };
                    for i in 0..2 {
                        for j in 0..4 {
                            xu[i][j] = (f32::from_bits(xu[i][j]) + f32::from_bits(y[i][j])).to_bits();
                        }
                    }
                }
            }
            split += 1;
        }
        for (u, xu) in x.iter().enumerate() {
            let idx = idx0 + (u * THREADS) as i32;
            let (r, c) = row_chunk(r0, idx, chunks);
            if idx < total {
                // Rows past `used` loaded nothing: their zeros pack to zeros.
                let f = |x: u32| f32::from_bits(x) * p.scale;
                let v = [E::pack(f(xu[0][0]), f(xu[0][1])), E::pack(f(xu[0][2]), f(xu[0][3])), E::pack(f(xu[1][0]), f(xu[1][1])), E::pack(f(xu[1][2]), f(xu[1][3]))];
                let dst = row_addr(p.dq, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, bidb, sq.start + r, h) + c as u64 * 16;
                unsafe { st_global_v4(dst, v) };
            }
        }
        idx0 += (UNROLL * THREADS) as i32;
    }
}

/// The convert kernel: a block converts 128-row blocks of one head (`convert_rows`).
#[inline(always)]
unsafe fn convert_entry<E: Elem>(p: &BwdParams) {
    let bm = BWD_ROWS_PER_BLOCK as i32;
    let h = block_idx_y() as i32;
    let (bidb, mut m_block) = grid_block(p, bm, false, false);
    let (sq, _) = sequences(p, bidb);
    while m_block * bm < sq.slot_len {
        let m0 = m_block * bm;
        let m1 = if sq.slot_len - m0 < bm { sq.slot_len } else { m0 + bm };
        unsafe { convert_rows::<E, BWD_ROWS_PER_BLOCK, 1>(p, bidb, &sq, h, m0, m1, thread_idx_x() as usize) };
        m_block += grid_dim_x() as i32;
    }
}

#[unsafe(export_name = "flash_bwd_dq_convert_bf16")]
pub unsafe extern "ptx-kernel" fn convert_bf16(p: BwdParams) {
    unsafe { convert_entry::<BF16>(&p) }
}
#[unsafe(export_name = "flash_bwd_dq_convert_f16")]
pub unsafe extern "ptx-kernel" fn convert_f16(p: BwdParams) {
    unsafe { convert_entry::<F16>(&p) }
}
