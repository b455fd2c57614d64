//! The deterministic path's dq: a block owns query rows of one (sequence, q head) and walks the key tiles
//! they see, last first, like the forward (S = Q K^T, dP = dO V^T, dS in registers); dQ += dS K stays in
//! registers, so every sum has one fixed order.

use super::{grad_elem_plain, grad_elem_softcap, lse_index, row_addr, sequences};
use crate::arch::cp_async::{commit_group, wait_group};
use crate::arch::mem::{ld_global_nc_f32, st_global_u32};
use crate::arch::reg::opaque_u32;
use crate::arch::smem;
use crate::arch::sreg::{block_idx_x, block_idx_y, block_idx_z, grid_dim_x, thread_idx_x};
use crate::arch::sync::sync_threads;
use crate::block::{n_block_range, tile_needs_mask};
use crate::arch::math::fma;
use crate::mask::for_each_hidden_qk;
use crate::mods::{keep_qk, HeadMods};
use crate::params::BwdParams;
use crate::tile::{a_fragment, load_tile, mma_x4, warp_gemm, Elem, SmemTile, BF16, F16};
use crate::variants::FwdConfig;

/// P and dS of one score.
#[inline(always)]
fn grad_elem(p: &BwdParams, s: f32, dp: f32, lse2: f32, delta: f32) -> (f32, f32) {
    if p.softcap_pre != 0.0 {
        grad_elem_softcap(p, s, dp, lse2, delta)
    } else {
        grad_elem_plain(p, s, dp, lse2, delta)
    }
}

/// dq of rows `[m0, m0 + 16 NW)` of one (sequence, q head): walks the key tiles those rows see, last
/// first, through a two-stage K/V pipeline; dQ += dS K stays in registers. `DN = D / 8`, `NN = BN / 8`.
#[inline(always)]
unsafe fn dq_entry<E: Elem, const D: usize, const DN: usize, const NW: usize, const BN: usize, const NN: usize, const MODS: bool>(p: &BwdParams) {
    const fn cfg(d: usize, nw: usize, bn: usize) -> FwdConfig {
        FwdConfig { head_dim: d, m_tiles: 1, warps: nw, key_warps: 1, block_n: bn, q_in_regs: false }
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
    let mods = HeadMods::new::<MODS>(&p.mods, bidb, h, p.h, p.batch);
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
                let (q, dout) = (SmemTile::new(q_s, rb).at(warp * 16, 0).a(lane), SmemTile::new(do_s, rb).at(warp * 16, 0).a(lane));
                let (k, v) = (SmemTile::new(k_s, rb).b(lane), SmemTile::new(v_s, rb).b(lane));
                for kk in 0..D / 16 {
                    let qa = unsafe { q.load(0, kk * 16) };
                    let oa = unsafe { dout.load(0, kk * 16) };
                    for np in 0..NN / 2 {
                        mma_x4::<E, NN>(&mut acc_s, np, qa, unsafe { k.load(np * 16, kk * 16) });
                        mma_x4::<E, NN>(&mut acc_dp, np, oa, unsafe { v.load(np * 16, kk * 16) });
                    }
                }
                // dS in place of dP (with score modifiers: ALiBi's bias in the exponent, dP Z for dropout);
                // on boundary tiles, zero where the mask hides the pair.
                let row0 = m0 + (warp * 16) as i32 + g;
                const { assert!(NN * 4 <= 32) };
                let mut keep = !0u32;
                if mods.dropout {
                    keep = 0;
                    keep_qk::<1, NN>(&mods, row0, n0 + 2 * t, #[inline(always)] |_, j, i, k| keep |= (k as u32) << (j * 4 + i));
                }
                // ALiBi: |query + shift - key| = |base + 8 (i / 2) - (8 j + i % 2)|.
                let base = (row0 + sk.used - sq.used - n0 - 2 * t) as f32;
                for j in 0..NN {
                    for i in 0..4 {
                        let (mut l, mut dp) = (lse2[i / 2], acc_dp[j][i]);
                        if MODS {
                            let d = base + ((8 * (i / 2)) as i32 - (8 * j + i % 2) as i32) as f32;
                            l = fma(mods.slope_log2, d.abs(), l);
                            dp *= if (keep >> (j * 4 + i)) & 1 != 0 { mods.scale } else { 0.0 };
                        }
                        acc_dp[j][i] = grad_elem(p, acc_s[j][i], dp, l, delta[i / 2]).1;
                    }
                }
                if masked {
                    for_each_hidden_qk::<1, NN>(row0, n0 + 2 * t, sq.used, sk.used, p.window_left, p.window_right, #[inline(always)] |_, j, i| acc_dp[j][i] = 0.0);
                }
                // dQ += dS K: dS's accumulator layout is the A fragment; K [keys][d] is read transposed.
                let k_t = SmemTile::new(k_s, rb).b_trans(lane);
                warp_gemm::<E, 1, DN>(
                    core::array::from_mut(&mut acc_dq), NN / 2, DN / 2,
                    #[inline(always)] |kk, _| a_fragment::<E>(&acc_dp[2 * kk], &acc_dp[2 * kk + 1]),
                    #[inline(always)] |kk, dp| unsafe { k_t.load(kk * 16, dp * 16) },
                );
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
    ($(($d:literal, $dt:ident, $name:expr, $dq:expr)),* $(,)?) => {$(
        const _: () = {
            const Q: FwdConfig = crate::variants::dq_config($d);
            #[unsafe(export_name = $dq)]
            pub unsafe extern "ptx-kernel" fn kernel(p: BwdParams) {
                unsafe { dq_entry::<$dt, $d, { $d / 8 }, { Q.warps }, { Q.block_n }, { Q.block_n / 8 }, false>(&p) }
            }
            #[unsafe(export_name = concat!($dq, "_mods"))]
            pub unsafe extern "ptx-kernel" fn kernel_mods(p: BwdParams) {
                unsafe { dq_entry::<$dt, $d, { $d / 8 }, { Q.warps }, { Q.block_n }, { Q.block_n / 8 }, true>(&p) }
            }
        };
    )*};
}
crate::for_each_bwd_variant!(dq_kernels);
