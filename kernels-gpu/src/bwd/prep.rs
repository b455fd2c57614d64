//! prep: D_i = dout_i . out_i and the LSE in base 2 for every real row, and (atomic dq path) the f32 dq
//! accumulator (each of its copies) zeroed wherever the dk/dv kernels add to it. Head dim at run time; four threads per row.

use super::{dq_turn_counter, dqa_addr, grid_block, lse_index, row_addr, sequences};
use crate::arch::math::fma;
use crate::arch::mem::{ld_global_nc_f32, ld_global_nc_v4, st_global_f32, st_global_u32, st_global_v4};
use crate::arch::shfl::shfl_xor_f32;
use crate::arch::sreg::{block_idx_y, grid_dim_x, thread_idx_x};
use crate::tile::{Elem, BF16, F16};
use crate::params::BwdParams;
use crate::block::dq_accum_rows;
use crate::variants::{BWD_ROWS_PER_BLOCK, BWD_WG_BLOCK_M, DQ_ACCUM_BLOCK_M};

/// Threads per row in prep: each takes every `PREP_LANES`-th 16-byte chunk of the row, so a warp reads
/// 8 rows x 64 contiguous bytes per load (every head dim is a multiple of 32).
const PREP_LANES: i32 = 4;

/// D_i and lse_log2 for every real row and, with an accumulator, the f32 dq accumulator zeroed on every
/// row the dk/dv kernels add to: the real rows (which the convert kernel reads back) and the rest of the
/// last query block (`dq_accum_rows`), to which they add exact zeros. Those are padding rows past
/// seqused, the next sequence's rows, tail rows or the host's slack rows past the last sequence: left
/// unwritten, each reduction would read a word nothing wrote (compute-sanitizer's initcheck flags it).
#[inline(always)]
unsafe fn prep_entry<E: Elem>(p: &BwdParams) {
    let bm = BWD_ROWS_PER_BLOCK as i32;
    let rows_per_pass = BWD_ROWS_PER_BLOCK as i32 / PREP_LANES;
    let h = block_idx_y() as i32;
    let (bidb, mut m_block) = grid_block(p, bm, false, false);
    let (sq, _) = sequences(p, bidb);
    let tid = thread_idx_x() as i32;
    let (sub, row_in_pass) = (tid % PREP_LANES, tid / PREP_LANES);
    let chunks = p.head_dim / 8;
    // A multiple of DQ_ACCUM_BLOCK_M, so of prep's blocks only those holding real rows hold these rows.
    let accum_rows = if p.dq_accum != 0 { dq_accum_rows(sq.used, DQ_ACCUM_BLOCK_M as i32) } else { 0 };
    while m_block * bm < sq.used {
        let mut pass = 0;
        while pass < bm {
            let r = m_block * bm + pass + row_in_pass;
            // All four lanes of a row agree on `valid`: the shuffles below run on full warps.
            let valid = r < sq.used;
            let rr = if valid { r } else { 0 };
            let o = row_addr(p.o, p.o_batch_stride, p.o_row_stride, p.o_head_stride, bidb, sq.start + rr, h);
            let g = row_addr(p.dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride, bidb, sq.start + rr, h);
            let mut acc = [0f32; 2];
            let mut c = sub;
            while valid && c < chunks {
                let (ov, gv) = unsafe { (ld_global_nc_v4(o + c as u64 * 16), ld_global_nc_v4(g + c as u64 * 16)) };
                for i in 0..4 {
                    let (o0, o1) = E::unpack(ov[i]);
                    let (g0, g1) = E::unpack(gv[i]);
                    acc[0] = fma(o0, g0, acc[0]);
                    acc[1] = fma(o1, g1, acc[1]);
                }
                c += PREP_LANES;
            }
            let mut d = acc[0] + acc[1];
            d += shfl_xor_f32(d, 1);
            d += shfl_xor_f32(d, 2);
            if r < accum_rows {
                // Every copy of the accumulator (`BwdParams::dq_splits`).
                let mut split = 0;
                while split < p.dq_splits {
                    let a = dqa_addr(p, bidb, sq.start + r, h, 0).wrapping_add((split as i64 * p.dqa_split_stride * 4) as u64);
                    let mut c = sub;
                    while c < 2 * chunks {
                        unsafe { st_global_v4(a + c as u64 * 16, [0; 4]) };
                        c += PREP_LANES;
                    }
                    split += 1;
                }
            }
            // The ordered deterministic mode's turn counters (`BwdParams::dq_sem`): one per step (row block
            // of the dK/dV kernels) and column half, the step's first row's.
            if p.dq_sem != 0 && valid && sub < 2 && r % BWD_WG_BLOCK_M as i32 == 0 {
                unsafe { st_global_u32(dq_turn_counter(p, bidb, sq.start + r, h, sub as u32), 0) };
            }
            if valid && sub == 0 {
                let at = lse_index(p, bidb, sq.start, h, r) as u64 * 4;
                let lse = unsafe { ld_global_nc_f32(p.lse + at) };
                let lse2 = if lse == f32::NEG_INFINITY { f32::INFINITY } else { lse * core::f32::consts::LOG2_E };
                unsafe {
                    st_global_f32(p.delta + at, d);
                    st_global_f32(p.lse_log2 + at, lse2);
                }
            }
            pass += rows_per_pass;
        }
        m_block += grid_dim_x() as i32;
    }
}

#[unsafe(export_name = "flash_bwd_prep_bf16")]
pub unsafe extern "ptx-kernel" fn prep_bf16(p: BwdParams) {
    unsafe { prep_entry::<BF16>(&p) }
}
#[unsafe(export_name = "flash_bwd_prep_f16")]
pub unsafe extern "ptx-kernel" fn prep_f16(p: BwdParams) {
    unsafe { prep_entry::<F16>(&p) }
}
