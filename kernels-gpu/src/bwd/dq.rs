//! The deterministic path's dq: a block owns query rows of one (sequence, q head) and walks the key tiles
//! they see, last first, like the forward (S = Q K^T, dP = dO V^T, dS in registers); dQ += dS K stays in
//! registers, so every sum has one fixed order.

use super::{grad_elem_plain, grad_elem_softcap, lse_index, row_addr, sequences};
use crate::arch::cp_async::{commit_group, wait_group};
use crate::arch::ldmatrix::{ldmatrix_x4, ldmatrix_x4_trans};
use crate::arch::mem::{ld_global_nc_f32, st_global_u32};
use crate::arch::reg::opaque_u32;
use crate::arch::smem;
use crate::arch::sreg::{block_idx_x, block_idx_y, block_idx_z, grid_dim_x, thread_idx_x};
use crate::arch::sync::sync_threads;
use crate::block::{n_block_range, tile_needs_mask};
use crate::fwd::{a_fragment, load_tile, Elem, BF16, F16};
use crate::mask::key_range;
use crate::params::BwdParams;
use crate::variants::FwdConfig;

/// P and dS of one score, zero when hidden by the mask.
#[inline(always)]
fn grad_elem(p: &BwdParams, s: f32, dp: f32, lse2: f32, delta: f32, visible: bool) -> (f32, f32) {
    if !visible {
        (0.0, 0.0)
    } else if p.softcap_pre != 0.0 {
        grad_elem_softcap(p, s, dp, lse2, delta)
    } else {
        grad_elem_plain(p, s, dp, lse2, delta)
    }
}

/// dq of rows `[m0, m0 + 16 NW)` of one (sequence, q head): walks the key tiles those rows see, last
/// first, through a two-stage K/V pipeline; dQ += dS K stays in registers. `DN = D / 8`, `NN = BN / 8`.
#[inline(always)]
unsafe fn dq_entry<E: Elem, const D: usize, const DN: usize, const NW: usize, const BN: usize, const NN: usize>(p: &BwdParams) {
    const fn cfg(d: usize, nw: usize, bn: usize) -> FwdConfig {
        FwdConfig { head_dim: d, m_tiles: 1, warps: nw, block_n: bn, q_in_regs: false }
    }
    let c = cfg(D, NW, BN);
    let bm = c.block_m() as i32;
    let threads = c.threads();
    let rb = c.row_bytes() as u32;
    let tid = thread_idx_x() as usize;
    let (warp, lane) = (tid / 32, tid % 32);
    let (g, t) = ((lane / 4) as i32, (lane % 4) as i32);
    let (h, bidb) = (block_idx_y() as i32, block_idx_z() as i32);
    let (sq, sk) = sequences(p, bidb);
    let hk = h / (p.h / p.h_k);
    let base = smem::base();
    let (q_s, do_s) = (base, base + bm as u32 * rb);
    let kv_stage = |s: usize| base + 2 * bm as u32 * rb + s as u32 * 2 * BN as u32 * rb;

    let mut m_block = grid_dim_x() as i32 - 1 - block_idx_x() as i32;
    while m_block * bm < sq.slot_len {
        let m0 = m_block * bm;
        let rows = sq.used - m0;
        let mut acc_dq = [[0f32; 4]; DN];
        let (n_min, n_max) = if rows > 0 { n_block_range(m0, if rows < bm { rows } else { bm }, sq.used, sk.used, p.window_left, p.window_right, BN as i32) } else { (0, 0) };
        if n_max > n_min {
            // This thread's two rows: lse_log2 (+inf past the sequence, so P = 0 there) and D.
            let mut lse2 = [f32::INFINITY; 2];
            let mut delta = [0f32; 2];
            for half in 0..2 {
                let r = (warp * 16) as i32 + g + 8 * half as i32;
                if r < rows {
                    let at = lse_index(p, bidb, sq.start, h, m0 + r) as u64 * 4;
                    unsafe {
                        lse2[half] = ld_global_nc_f32(p.lse_log2 + at);
                        delta[half] = ld_global_nc_f32(p.delta + at);
                    }
                }
            }
            let q = row_addr(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, bidb, sq.start + m0, h);
            let gd = row_addr(p.dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride, bidb, sq.start + m0, h);
            let k = row_addr(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, bidb, sk.start, hk);
            let v = row_addr(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, bidb, sk.start, hk);
            let load_kv = |stage: usize, n_block: i32| {
                let n0 = n_block as i64 * BN as i64;
                let valid = sk.used - n_block * BN as i32;
                unsafe {
                    load_tile::<D>(kv_stage(stage), k.wrapping_add((n0 * p.k_row_stride * 2) as u64), p.k_row_stride * 2, valid, tid, BN, threads);
                    load_tile::<D>(kv_stage(stage) + BN as u32 * rb, v.wrapping_add((n0 * p.v_row_stride * 2) as u64), p.v_row_stride * 2, valid, tid, BN, threads);
                }
            };
            unsafe {
                load_tile::<D>(q_s, q, p.q_row_stride * 2, rows, tid, bm as usize, threads);
                load_tile::<D>(do_s, gd, p.do_row_stride * 2, rows, tid, bm as usize, threads);
            }
            load_kv(0, n_max - 1);
            commit_group();
            let n_tiles = n_max - n_min;
            let mut it = 0;
            while it < n_tiles {
                let n_block = n_max - 1 - it;
                let stage = (it & 1) as usize;
                let base = opaque_u32(base);
                let tid = opaque_u32(tid as u32) as usize;
                let (warp, lane) = (tid / 32, tid % 32);
                let (g, t) = ((lane / 4) as i32, (lane % 4) as i32);
                let (q_s, do_s) = (base, base + bm as u32 * rb);
                wait_group::<0>();
                sync_threads();
                if it + 1 < n_tiles {
                    load_kv(1 - stage, n_block - 1);
                    commit_group();
                }
                let n0 = n_block * BN as i32;
                let masked = tile_needs_mask(m0, if rows < bm { rows } else { bm }, n0, BN as i32, sq.used, sk.used, p.window_left, p.window_right);
                let (k_s, v_s) = (kv_stage(stage), kv_stage(stage) + BN as u32 * rb);

                // S = Q K^T and dP = dO V^T for this warp's 16 rows.
                let mut acc_s = [[0f32; 4]; NN];
                let mut acc_dp = [[0f32; 4]; NN];
                let a_lane = (((warp * 16) + lane % 8 + ((lane / 8) % 2) * 8) as u32) * rb + (lane / 16) as u32 * 16;
                let b_lane = ((lane % 8 + (lane / 16) * 8) as u32) * rb + ((lane / 8) % 2) as u32 * 16;
                for kk in 0..D / 16 {
                    let qa = unsafe { ldmatrix_x4(q_s + a_lane + (kk * 32) as u32) };
                    let oa = unsafe { ldmatrix_x4(do_s + a_lane + (kk * 32) as u32) };
                    for np in 0..NN / 2 {
                        let kb = unsafe { ldmatrix_x4(k_s + b_lane + (np * 16) as u32 * rb + (kk * 32) as u32) };
                        E::mma(&mut acc_s[2 * np], qa, [kb[0], kb[1]]);
                        E::mma(&mut acc_s[2 * np + 1], qa, [kb[2], kb[3]]);
                        let vb = unsafe { ldmatrix_x4(v_s + b_lane + (np * 16) as u32 * rb + (kk * 32) as u32) };
                        E::mma(&mut acc_dp[2 * np], oa, [vb[0], vb[1]]);
                        E::mma(&mut acc_dp[2 * np + 1], oa, [vb[2], vb[3]]);
                    }
                }
                for half in 0..2 {
                    let row = m0 + (warp * 16) as i32 + g + 8 * half as i32;
                    let (lo, hi) = key_range(row, sq.used, sk.used, p.window_left, p.window_right);
                    for j in 0..NN {
                        for e in 0..2 {
                            let col = n0 + 8 * j as i32 + 2 * t + e as i32;
                            let visible = !masked || (col >= lo && col <= hi);
                            let i = 2 * half + e;
                            let (_, ds) = grad_elem(p, acc_s[j][i], acc_dp[j][i], lse2[half], delta[half], visible);
                            acc_dp[j][i] = ds;
                        }
                    }
                }
                // dQ += dS K: dS's accumulator layout is the A fragment; K [keys][d] is read transposed.
                let kb_lane = ((lane % 8 + ((lane / 8) % 2) * 8) as u32) * rb + (lane / 16) as u32 * 16;
                for kk in 0..NN / 2 {
                    let da = a_fragment::<E>(&acc_dp[2 * kk], &acc_dp[2 * kk + 1]);
                    for dp in 0..DN / 2 {
                        let b = unsafe { ldmatrix_x4_trans(k_s + kb_lane + (kk * 16) as u32 * rb + (dp * 32) as u32) };
                        E::mma(&mut acc_dq[2 * dp], da, [b[0], b[1]]);
                        E::mma(&mut acc_dq[2 * dp + 1], da, [b[2], b[3]]);
                    }
                }
                it += 1;
            }
            sync_threads();
        }
        // Epilogue: every row of the slot in this block; padding rows get 0 (their accumulator is 0).
        for half in 0..2 {
            let r = m0 + (warp * 16) as i32 + g + 8 * half as i32;
            if r < sq.slot_len {
                let dst = row_addr(p.dq, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, bidb, sq.start + r, h);
                for j in 0..DN {
                    let (x0, x1) = (acc_dq[j][2 * half] * p.scale, acc_dq[j][2 * half + 1] * p.scale);
                    unsafe { st_global_u32(dst + ((8 * j as i32 + 2 * t) * 2) as u64, E::pack(x0, x1)) };
                }
            }
        }
        m_block += grid_dim_x() as i32;
    }
}

macro_rules! dq_kernels {
    ($(($d:literal, $dt:ident, $name:literal, $dq:literal)),* $(,)?) => {$(
        const _: () = {
            const Q: FwdConfig = crate::variants::dq_config($d);
            #[unsafe(export_name = $dq)]
            pub unsafe extern "ptx-kernel" fn kernel(p: BwdParams) {
                unsafe { dq_entry::<$dt, $d, { $d / 8 }, { Q.warps }, { Q.block_n }, { Q.block_n / 8 }>(&p) }
            }
        };
    )*};
}
crate::for_each_bwd_variant!(dq_kernels);
