//! flash-attn's `return_attn_probs` (`s_dmask`): every score's probability, recomputed from q, k and the
//! forward's LSE after the forward, one thread per (query, key): P = exp(s - lse) with the forward's
//! score (softcap, ALiBi), 0 where the mask hides the key and outside the sequence, negated where
//! dropout dropped it (the same keep-mask, drawn per score). O(S^2 D) work: for testing and debugging.

use super::{HeadSlice, BF16, F16};
use crate::arch::math::{exp2, tanh};
use crate::arch::mem::{ld_global_nc_v4, st_global_f32, st_global_u16};
use crate::arch::sreg::{block_idx_x, block_idx_y, block_idx_z, grid_dim_y, thread_idx_x};
use crate::dropout::{counter, draw, key, philox4x32_10};
use crate::mask::allowed;
use crate::params::ProbsParams;
use crate::tile::Elem;
use crate::variants::PROBS_THREADS;

const LOG2_E: f32 = core::f32::consts::LOG2_E;

/// q_i . k_j in f32 over `d` columns (16-byte chunks; the head dim is a multiple of 8).
#[inline(always)]
unsafe fn dot<E: Elem>(q: u64, k: u64, d: i32) -> f32 {
    let mut acc = 0f32;
    let mut c = 0;
    while c < d {
        let (a, b) = unsafe { (ld_global_nc_v4(q + c as u64 * 2), ld_global_nc_v4(k + c as u64 * 2)) };
        for w in 0..4 {
            let (a0, a1) = E::unpack(a[w]);
            let (b0, b1) = E::unpack(b[w]);
            acc += a0 * b0 + a1 * b1;
        }
        c += 8;
    }
    acc
}

#[inline(always)]
unsafe fn probs_entry<E: Elem, const OUT_F32: bool, const PAGED: bool>(pp: &ProbsParams) {
    let p = &pp.fwd;
    let (bidb, h) = ((block_idx_z() / p.h as u32) as i32, (block_idx_z() % p.h as u32) as i32);
    let head = HeadSlice::new::<PAGED, true>(p, bidb, h);
    let (sq, sk) = (head.sq, head.sk);
    let j = (block_idx_x() as usize * PROBS_THREADS + thread_idx_x() as usize) as i32;
    if j >= pp.s_cols {
        return;
    }
    let out_head = pp.s_dmask.wrapping_add(((bidb as i64 * pp.s_batch_stride + h as i64 * pp.s_head_stride) * if OUT_F32 { 4 } else { 2 }) as u64);
    // Key j's row (paged: through the block table; the index clamped inside k).
    let k_row = if j < sk.used {
        if PAGED {
            let (block, off) = unsafe { head.kv.pages.locate(j) };
            head.kv.k.at(block, off)
        } else {
            head.kv.k.base.wrapping_add((j as i64 * head.kv.k.row_bytes) as u64)
        }
    } else {
        0
    };
    let m = head.mods;
    let mut i = block_idx_y() as i32;
    while i < pp.s_rows {
        let mut prob = 0f32;
        if i < sq.used && j < sk.used && allowed(i, j, sq.used, sk.used, p.window_left, p.window_right) {
            let q_row = head.q_head.wrapping_add((i as i64 * p.q_row_stride * 2) as u64);
            let qk = unsafe { dot::<E>(q_row, k_row, pp.head_dim) };
            let s = if p.softcap_pre != 0.0 { tanh(qk * p.softcap_pre) } else { qk };
            let dist = (i + sk.used - sq.used - j) as f32;
            let lse = unsafe { crate::arch::mem::ld_global_nc_f32(head.lse_head.wrapping_add((i as i64 * 4) as u64)) };
            prob = exp2(s * p.scale_log2 - m.slope_log2 * dist.abs() - lse * LOG2_E);
            if m.dropout {
                let w = philox4x32_10(counter(m.sub, i as u32, j as u32), key(m.seed));
                if draw(&w, i as u32, j as u32) >= m.threshold {
                    prob = -prob;
                }
            }
        }
        let at = out_head.wrapping_add(((i as i64 * pp.s_row_stride + j as i64) * if OUT_F32 { 4 } else { 2 }) as u64);
        unsafe {
            if OUT_F32 {
                st_global_f32(at, prob);
            } else {
                st_global_u16(at, E::pack(prob, 0.0));
            }
        }
        i += grid_dim_y() as i32;
    }
}

macro_rules! probs_kernels {
    ($(($e:ident, $f32:literal, $name:literal)),* $(,)?) => {$(
        const _: () = {
            #[unsafe(export_name = $name)]
            pub unsafe extern "ptx-kernel" fn kernel(pp: ProbsParams) {
                if pp.fwd.block_table != 0 {
                    unsafe { probs_entry::<$e, $f32, true>(&pp) }
                } else {
                    unsafe { probs_entry::<$e, $f32, false>(&pp) }
                }
            }
        };
    )*};
}
probs_kernels!(
    (BF16, true, "flash_probs_bf16_f32"),
    (BF16, false, "flash_probs_bf16"),
    (F16, true, "flash_probs_f16_f32"),
    (F16, false, "flash_probs_f16"),
);
