//! dk/dv (+ atomic dq) on mma.sync: a block owns `BN` keys of one kv head and walks every q head of its
//! group and every query block that sees the keys (S^T = K Q^T, dP^T = V dO^T, P and dS in registers,
//! dV += P^T dO, dK += dS^T Q); dQ = dS K goes to the f32 accumulator with atomics when there is one.

use super::{add_dq_fragment, dqa_addr, grad_tile, grid_block, keep_tile, lse_index, mask_tile, row_addr, sequences, step_walk, KqAt, KvArgs};
use crate::mods::HeadMods;
use crate::arch::cp_async::{commit_group, cp_async_4, wait_group};
use crate::arch::mem::st_global_u32;
use crate::arch::reg::opaque_u32;
use crate::arch::smem;
use crate::arch::sreg::{block_idx_y, grid_dim_x, thread_idx_x};
use crate::arch::sync::sync_threads;
use crate::block::tile_needs_mask;
use crate::params::BwdParams;
use crate::tile::{a_fragment, load_tile, mma_x4, warp_gemm, Elem, SmemTile, BF16, F16};
use crate::variants::{row_pitch_bytes, BwdConfig};

/// Compile-time shape of the dk/dv kernel: `D` head dim, `BN` keys, `BM` queries per step, `NW` warps,
/// `KT` m16 tiles of keys per warp, `DWN` n8 tiles of dK/dV columns per warp (`D / WM / 8`), `QN` n8 tiles of S^T columns per warp
/// (`BM / WM / 8`). Stable Rust cannot size arrays by those quotients, so they are given.
struct KvShape<const D: usize, const BN: usize, const BM: usize, const NW: usize, const KT: usize, const DQT: usize, const DWN: usize, const QN: usize>;

impl<const D: usize, const BN: usize, const BM: usize, const NW: usize, const KT: usize, const DQT: usize, const DWN: usize, const QN: usize> KvShape<D, BN, BM, NW, KT, DQT, DWN, QN> {
    const CONFIG: BwdConfig = BwdConfig { head_dim: D, block_n: BN, block_m: BM, warps: NW, key_tiles: KT, dq_tiles: DQT };
    const WN: usize = Self::CONFIG.wn();
    const WM: usize = Self::CONFIG.wm();
    /// Warps of dQ along the queries (`16 * DQT` rows each), and dQ columns per warp.
    const RM: usize = BM / (16 * DQT);
    const DC: usize = Self::CONFIG.dq_cols();
    const THREADS: usize = Self::CONFIG.threads();
    const RB: u32 = row_pitch_bytes(D) as u32;
    const PB: u32 = Self::CONFIG.p_row_bytes() as u32;
    const K_OFF: u32 = 0;
    const V_OFF: u32 = BN as u32 * Self::RB;
    const QS_OFF: u32 = 2 * BN as u32 * Self::RB;
    const LSE_OFF: u32 = Self::QS_OFF + 4 * BM as u32 * Self::RB;
    const DS_OFF: u32 = Self::LSE_OFF + 4 * BM as u32 * 4;
    const PT_OFF: u32 = Self::DS_OFF + BN as u32 * Self::PB;
    const CHECK: () = {
        assert!(Self::CONFIG.is_valid() && BN <= 128);
        assert!(DWN * 8 * Self::WM == D && QN * 8 * Self::WM == BM && D % 16 == 0);
        assert!(Self::PT_OFF as usize + if Self::WM > 1 { BN * Self::PB as usize } else { 0 } == Self::CONFIG.smem_bytes());
        assert!((BN * D / 8) % Self::THREADS == 0 && (BM * D / 8) % Self::THREADS == 0);
    };
    #[inline(always)]
    fn q_stage(base: u32, s: usize) -> u32 {
        base + Self::QS_OFF + s as u32 * BM as u32 * Self::RB
    }
    #[inline(always)]
    fn do_stage(base: u32, s: usize) -> u32 {
        base + Self::QS_OFF + (2 + s as u32) * BM as u32 * Self::RB
    }
    #[inline(always)]
    fn lse_stage(base: u32, s: usize) -> u32 {
        base + Self::LSE_OFF + s as u32 * BM as u32 * 4
    }
    #[inline(always)]
    fn delta_stage(base: u32, s: usize) -> u32 {
        base + Self::LSE_OFF + (2 + s as u32) * BM as u32 * 4
    }
}

/// Start the copies of one step (q head `h`, query rows from `m0`) into stage `stage`: Q and dO rows (zero past the sequence), and their lse_log2 and D.
#[inline(always)]
unsafe fn load_q_step<const D: usize, const BN: usize, const BM: usize, const NW: usize, const KT: usize, const DQT: usize, const DWN: usize, const QN: usize>(p: &BwdParams, a: &KvArgs, base: u32, stage: usize, h: i32, m0: i32, tid: usize) {
    type S<const D: usize, const BN: usize, const BM: usize, const NW: usize, const KT: usize, const DQT: usize, const DWN: usize, const QN: usize> = KvShape<D, BN, BM, NW, KT, DQT, DWN, QN>;
    let threads = S::<D, BN, BM, NW, KT, DQT, DWN, QN>::THREADS;
    let rows = a.sq.used - m0;
    let q = row_addr(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, a.bidb, a.sq.start + m0, h);
    let g = row_addr(p.dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride, a.bidb, a.sq.start + m0, h);
    unsafe {
        load_tile::<D>(S::<D, BN, BM, NW, KT, DQT, DWN, QN>::q_stage(base, stage), q, p.q_row_stride * 2, rows, tid, BM, threads);
        load_tile::<D>(S::<D, BN, BM, NW, KT, DQT, DWN, QN>::do_stage(base, stage), g, p.do_row_stride * 2, rows, tid, BM, threads);
    }
    if tid < BM {
        let r = tid as i32;
        let valid = r < rows;
        let at = if valid { lse_index(p, a.bidb, a.sq.start, h, m0 + r) as u64 * 4 } else { 0 };
        unsafe {
            cp_async_4(S::<D, BN, BM, NW, KT, DQT, DWN, QN>::lse_stage(base, stage) + tid as u32 * 4, p.lse_log2.wrapping_add(at), valid);
            cp_async_4(S::<D, BN, BM, NW, KT, DQT, DWN, QN>::delta_stage(base, stage) + tid as u32 * 4, p.delta.wrapping_add(at), valid);
        }
    }
}

/// dK and dV of keys `[n0, n0 + BN)` of kv head `hk` (this warp's part), accumulated over the group's
/// q heads and the query blocks that see the keys; dQ contributions go to the accumulator if there is one.
#[inline(always)]
unsafe fn dkdv_block<E: Elem, const D: usize, const BN: usize, const BM: usize, const NW: usize, const KT: usize, const DQT: usize, const DWN: usize, const QN: usize, const MODS: bool>(
    p: &BwdParams,
    a: &KvArgs,
    tid: usize,
    acc_dk: &mut [[[f32; 4]; DWN]; KT],
    acc_dv: &mut [[[f32; 4]; DWN]; KT],
) {
    type S<const D: usize, const BN: usize, const BM: usize, const NW: usize, const KT: usize, const DQT: usize, const DWN: usize, const QN: usize> = KvShape<D, BN, BM, NW, KT, DQT, DWN, QN>;
    let () = S::<D, BN, BM, NW, KT, DQT, DWN, QN>::CHECK;
    let (wn_count, wm_count) = (S::<D, BN, BM, NW, KT, DQT, DWN, QN>::WN, S::<D, BN, BM, NW, KT, DQT, DWN, QN>::WM);
    let (rb, pb) = (S::<D, BN, BM, NW, KT, DQT, DWN, QN>::RB, S::<D, BN, BM, NW, KT, DQT, DWN, QN>::PB);
    let threads = S::<D, BN, BM, NW, KT, DQT, DWN, QN>::THREADS;
    let base = smem::base();

    let (steps, next, mut cur) = step_walk::<false>(p, a, BN as i32, BM as i32);
    if steps == 0 {
        return;
    }

    // Prologue: K, V and the first step in one group.
    let k = row_addr(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, a.bidb, a.sk.start + a.n0, a.hk);
    let v = row_addr(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, a.bidb, a.sk.start + a.n0, a.hk);
    unsafe {
        let (k_s, v_s) = (base + S::<D, BN, BM, NW, KT, DQT, DWN, QN>::K_OFF, base + S::<D, BN, BM, NW, KT, DQT, DWN, QN>::V_OFF);
        load_tile::<D>(k_s, k, p.k_row_stride * 2, a.cols, tid, BN, threads);
        load_tile::<D>(v_s, v, p.v_row_stride * 2, a.cols, tid, BN, threads);
        load_q_step::<D, BN, BM, NW, KT, DQT, DWN, QN>(p, a, base, 0, cur.0, cur.1 * BM as i32, tid);
    }
    commit_group();

    let mut it = 0;
    while it < steps {
        let stage = (it & 1) as usize;
        // Per-thread shared-memory offsets are recomputed each step from laundered inputs rather than
        // hoisted out of the loop and kept live (see arch/reg.rs): that kept dozens of registers busy.
        let base = opaque_u32(base);
        let tid = opaque_u32(tid as u32) as usize;
        let (warp, lane) = (tid / 32, tid % 32);
        let (g, t) = ((lane / 4) as i32, (lane % 4) as i32);
        let (wn, wm) = (warp % wn_count, warp / wn_count);
        let (kv_row0, q_col0, d_col0) = (16 * KT * wn, wm * QN * 8, wm * DWN * 8);
        let k_s = base + S::<D, BN, BM, NW, KT, DQT, DWN, QN>::K_OFF;
        let v_s = base + S::<D, BN, BM, NW, KT, DQT, DWN, QN>::V_OFF;
        let ds_s = base + S::<D, BN, BM, NW, KT, DQT, DWN, QN>::DS_OFF;
        let pt_s = base + S::<D, BN, BM, NW, KT, DQT, DWN, QN>::PT_OFF;
        wait_group::<0>();
        // Step `it`'s data is visible, and every warp is done with step it-1 (its stage and dS^T).
        sync_threads();
        let nxt = next(cur);
        if it + 1 < steps {
            unsafe { load_q_step::<D, BN, BM, NW, KT, DQT, DWN, QN>(p, a, base, 1 - stage, nxt.0, nxt.1 * BM as i32, tid) };
            commit_group();
        }
        let (h, m0) = (cur.0, cur.1 * BM as i32);
        cur = nxt;
        let rows = a.sq.used - m0;
        let masked = rows < BM as i32 || tile_needs_mask(m0, rows, a.n0, BN as i32, a.sq.used, a.sk.used, p.window_left, p.window_right);
        let q_s = S::<D, BN, BM, NW, KT, DQT, DWN, QN>::q_stage(base, stage);
        let do_s = S::<D, BN, BM, NW, KT, DQT, DWN, QN>::do_stage(base, stage);

        // S^T = K Q^T and dP^T = V dO^T: this warp's 16*KT keys x QN*8 queries.
        let mut acc_s = [[[0f32; 4]; QN]; KT];
        let mut acc_dp = [[[0f32; 4]; QN]; KT];
        let (k, v) = (SmemTile::new(k_s, rb).at(kv_row0, 0).a(lane), SmemTile::new(v_s, rb).at(kv_row0, 0).a(lane));
        let (q, dout) = (SmemTile::new(q_s, rb).at(q_col0, 0).b(lane), SmemTile::new(do_s, rb).at(q_col0, 0).b(lane));
        // Two passes (S^T, then dP^T) keep half the fragments live: registers are what this kernel runs out of.
        warp_gemm::<E, KT, QN>(
            &mut acc_s, D / 16, QN / 2,
            #[inline(always)] |kk, kt| unsafe { k.load(kt * 16, kk * 16) },
            #[inline(always)] |kk, np| unsafe { q.load(np * 16, kk * 16) },
        );
        warp_gemm::<E, KT, QN>(
            &mut acc_dp, D / 16, QN / 2,
            #[inline(always)] |kk, kt| unsafe { v.load(kt * 16, kk * 16) },
            #[inline(always)] |kk, np| unsafe { dout.load(np * 16, kk * 16) },
        );

        // P and dS in place of S^T and dP^T; dS^T (and P^T when warps split the queries) to shared memory.
        let lse_s = S::<D, BN, BM, NW, KT, DQT, DWN, QN>::lse_stage(base, stage);
        let delta_s = S::<D, BN, BM, NW, KT, DQT, DWN, QN>::delta_stage(base, stage);
        let mods = HeadMods::new::<MODS>(&p.mods, a.bidb, h, p.h, p.batch);
        let at = KqAt { row0: m0 + q_col0 as i32 + 2 * t, key0: a.n0 + kv_row0 as i32 + g, shift: a.sk.used - a.sq.used };
        let keep = keep_tile::<KT, QN>(&mods, &at);
        // ALiBi's three-instruction form (the two-instruction one is not measured on these kernels).
        grad_tile::<KT, QN, MODS, false>(p, &mods, at, keep, &mut acc_s, &mut acc_dp, lse_s, delta_s, q_col0, t);
        // On boundary tiles only, P and dS of hidden pairs are zeroed.
        if masked {
            mask_tile::<KT, QN>(p, a, &mut acc_s, &mut acc_dp, m0, rows, kv_row0 as i32 + g, q_col0 as i32 + 2 * t);
        }
        for j in 0..QN {
            let qc = (q_col0 + 8 * j) as u32 + 2 * t as u32;
            for kt in 0..KT {
                for half in 0..2usize {
                    let at = ((kv_row0 as i32 + 16 * kt as i32 + g + 8 * half as i32) as u32) * pb + qc * 2;
                    unsafe { smem::st_u32(ds_s + at, E::pack(acc_dp[kt][j][2 * half], acc_dp[kt][j][2 * half + 1])) };
                    if wm_count > 1 {
                        unsafe { smem::st_u32(pt_s + at, E::pack(acc_s[kt][j][2 * half], acc_s[kt][j][2 * half + 1])) };
                    }
                }
            }
        }
        sync_threads();

        // dV += P^T dO and dK += dS^T Q: this warp's 16*KT keys x DWN*8 columns, k over all BM queries.
        let (pt, ds) = (SmemTile::new(pt_s, pb).at(kv_row0, 0).a(lane), SmemTile::new(ds_s, pb).at(kv_row0, 0).a(lane));
        let (dout_t, q_t) = (SmemTile::new(do_s, rb).at(0, d_col0).b_trans(lane), SmemTile::new(q_s, rb).at(0, d_col0).b_trans(lane));
        for kk in 0..BM / 16 {
            let mut pa = [[0u32; 4]; KT];
            let mut da = [[0u32; 4]; KT];
            for kt in 0..KT {
                if wm_count == 1 {
                    pa[kt] = a_fragment::<E>(&acc_s[kt][2 * kk], &acc_s[kt][2 * kk + 1]);
                    da[kt] = a_fragment::<E>(&acc_dp[kt][2 * kk], &acc_dp[kt][2 * kk + 1]);
                } else {
                    pa[kt] = unsafe { pt.load(kt * 16, kk * 16) };
                    da[kt] = unsafe { ds.load(kt * 16, kk * 16) };
                }
            }
            for dp in 0..DWN / 2 {
                let ob = unsafe { dout_t.load(kk * 16, dp * 16) };
                let qb = unsafe { q_t.load(kk * 16, dp * 16) };
                for kt in 0..KT {
                    mma_x4::<E, DWN>(&mut acc_dv[kt], dp, pa[kt], ob);
                    mma_x4::<E, DWN>(&mut acc_dk[kt], dp, da[kt], qb);
                }
            }
        }

        // dQ (rows m0..) += dS K, added to the f32 accumulator: warp (rm, cd) owns 16 rows x DC columns.
        if p.dq_accum != 0 {
            let rm_count = S::<D, BN, BM, NW, KT, DQT, DWN, QN>::RM;
            let dc = S::<D, BN, BM, NW, KT, DQT, DWN, QN>::DC;
            let (rm, cd) = (warp % rm_count, warp / rm_count);
            let ds_t = SmemTile::new(ds_s, pb).at(0, rm * 16 * DQT).a_trans(lane);
            let k_t = SmemTile::new(k_s, rb).at(0, cd * dc).b_trans(lane);
            let row_a = (rm * 16 * DQT) as i32 + g;
            let dqa = dqa_addr(p, a.bidb, a.sq.start + m0, h, (cd * dc) as i64);
            // Columns in chunks of CH n8 tiles (4 * CH * DQT accumulator registers live at a time).
            let ch = if dc % 32 == 0 { 4 } else { 2 };
            for c in 0..dc / (8 * ch) {
                let mut acc = [[[0f32; 4]; 4]; DQT];
                warp_gemm::<E, DQT, 4>(
                    &mut acc, BN / 16, ch / 2,
                    #[inline(always)] |kk, mt| unsafe { ds_t.load(kk * 16, mt * 16) },
                    #[inline(always)] |kk, dp| unsafe { k_t.load(kk * 16, (c * ch + 2 * dp) * 8) },
                );
                for mt in 0..DQT {
                    for j in 0..ch {
                        let col = ((c * ch + j) * 8) as i64 + 2 * t as i64;
                        unsafe { add_dq_fragment(dqa, p.dqa_row_stride, row_a + 16 * mt as i32, col, acc[mt][j]) };
                    }
                }
            }
        }
        it += 1;
    }
    // The next key block (grid stride) reloads K/V and step 0: every warp must be done reading.
    sync_threads();
}

/// Kernel body: stride over this (sequence, kv head)'s key blocks; keys of no sequence get dk = dv = 0.
#[inline(always)]
unsafe fn dkdv_entry<E: Elem, const D: usize, const BN: usize, const BM: usize, const NW: usize, const KT: usize, const DQT: usize, const DWN: usize, const QN: usize, const MODS: bool>(p: &BwdParams) {
    let tid = thread_idx_x() as usize;
    let hk = block_idx_y() as i32;
    let (bidb, mut n_block) = grid_block(p, BN as i32, true, false);
    let (sq, sk) = sequences(p, bidb);
    let wn_count = BN / (16 * KT);
    let (warp, lane) = (tid / 32, tid % 32);
    let (g, t) = ((lane / 4) as i32, (lane % 4) as i32);
    let (wn, wm) = (warp % wn_count, warp / wn_count);
    let kv_row = (16 * KT * wn) as i32 + g;
    let d_col = (wm * DWN * 8) as i32 + 2 * t;

    while n_block * (BN as i32) < sk.slot_len {
        let n0 = n_block * BN as i32;
        let mut acc_dk = [[[0f32; 4]; DWN]; KT];
        let mut acc_dv = [[[0f32; 4]; DWN]; KT];
        if n0 < sk.used {
            let cols = if sk.used - n0 < BN as i32 { sk.used - n0 } else { BN as i32 };
            let args = KvArgs { bidb, hk, group: p.h / p.h_k, sq, sk, n0, cols };
            unsafe { dkdv_block::<E, D, BN, BM, NW, KT, DQT, DWN, QN, MODS>(p, &args, tid, &mut acc_dk, &mut acc_dv) };
        }
        // Epilogue: dk = scale * acc, dv = acc, in the input type, for every key row of the slot.
        for kt in 0..KT {
            for half in 0..2usize {
                let r = n0 + kv_row + 16 * kt as i32 + 8 * half as i32;
                if r < sk.slot_len {
                    let dk = row_addr(p.dk, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, bidb, sk.start + r, hk);
                    let dv = row_addr(p.dv, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, bidb, sk.start + r, hk);
                    for j in 0..DWN {
                        let off = ((d_col + 8 * j as i32) * 2) as u64;
                        let (k0, k1) = (acc_dk[kt][j][2 * half] * p.scale, acc_dk[kt][j][2 * half + 1] * p.scale);
                        unsafe {
                            st_global_u32(dk + off, E::pack(k0, k1));
                            st_global_u32(dv + off, E::pack(acc_dv[kt][j][2 * half], acc_dv[kt][j][2 * half + 1]));
                        }
                    }
                }
            }
        }
        n_block += grid_dim_x() as i32;
    }
}

macro_rules! dkdv_kernels {
    ($(($d:literal, $dt:ident, $name:expr, $dq:expr)),* $(,)?) => {$(
        const _: () = {
            const C: BwdConfig = crate::variants::bwd_config($d);
            #[unsafe(export_name = $name)]
            pub unsafe extern "ptx-kernel" fn kernel(p: BwdParams) {
                unsafe { dkdv_entry::<$dt, $d, { C.block_n }, { C.block_m }, { C.warps }, { C.key_tiles }, { C.dq_tiles }, { $d / C.wm() / 8 }, { C.block_m / C.wm() / 8 }, false>(&p) }
            }
            #[unsafe(export_name = concat!($name, "_mods"))]
            pub unsafe extern "ptx-kernel" fn kernel_mods(p: BwdParams) {
                unsafe { dkdv_entry::<$dt, $d, { C.block_n }, { C.block_m }, { C.warps }, { C.key_tiles }, { C.dq_tiles }, { $d / C.wm() / 8 }, { C.block_m / C.wm() / 8 }, true>(&p) }
            }
        };
    )*};
}
crate::for_each_bwd_variant!(dkdv_kernels);
