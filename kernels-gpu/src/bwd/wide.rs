//! Hopper dK/dV kernel (+ atomic dQ) on wgmma for the wide head dims, 192 and 256 (sm_90a module), where
//! the 128-key kernel's dK and dV accumulators (64 keys x D each, per warpgroup) do not fit the registers.
//! A block owns 64 keys of one kv head and walks the q heads of its group and the 64-row query blocks that
//! see them (the walk of the other dK/dV kernels). Per step, all operands in 128-byte-swizzled shared
//! memory:
//!   S^T = K Q^T and dP^T = V dO^T: warpgroup w takes the step's queries 32w..32w+31 (all 64 keys, so each
//!   warp keeps 16 keys, the element-wise part the other kernels' with one key tile and four query tiles);
//!   P^T and dS^T to shared memory ([key][query]);
//!   warpgroup 0: dV += P^T dO, warpgroup 1: dK += dS^T Q, over every head-dim column (A from shared
//!   memory, B read transposed);
//!   dQ = dS K in 64-column chunks, even chunks warpgroup 0, odd ones 1, added to the f32 accumulator:
//!   at head dim 192 (`bwd_wide_dq_bulk`) through shared memory by the copy engine's bulk reductions
//!   (`dq_bulk`), elsewhere by each thread's vector reductions.
//! No second K/V buffer (at d256 the tiles take 209 KB): a key block's copies start after its
//! predecessor's last step.

use super::convert::convert_rows;
use super::wg::{load_step_to, StepStages};
use super::wg::BAR_TURN;
use super::ws::dq_offset;
use super::{add_dq_fragment, dqa_addr_split, grad_tile, grid_block, keep_tile, mask_tile, row_addr, sequences, step_walk, dq_turn_counter, takes_key_block, DqTurn, KqAt, KvArgs};
use crate::arch::cp_async::commit_group;
use crate::arch::mem::st_global_u32;
use crate::arch::reg::opaque_u32;
use crate::arch::smem;
use crate::arch::sreg::{block_idx_y, grid_dim_x, thread_idx_x};
use crate::arch::sync::{fence_gpu, named_sync, sync_threads};
use crate::arch::tma;
use crate::arch::wgmma::{self, desc_sw128, sw128_offset};
use crate::block::tile_needs_mask;
use crate::fwd::wg::{copies_visible, kmajor_desc, load_tile_sw128, sized, wait_acc, WgElem, THREADS as COPY_THREADS};
use crate::mods::HeadMods;
use crate::params::BwdParams;
use crate::variants::{bwd_wg_block_n, bwd_wg_smem_bytes, bwd_wide_dq_bulk, BWD_WG_BLOCK_M, BWD_WG_THREADS, DQ_ACCUM_BLOCK_M};

const BN: usize = 64;
const BM: usize = BWD_WG_BLOCK_M;

/// Shared memory for head dim `D`: K, V (BN rows), two stages of Q and of dO (BM rows), P^T and dS^T (BN
/// keys x BM queries, queries contiguous), two stages of the rows' lse_log2 and D, and with
/// `bwd_wide_dq_bulk` the warpgroups' dQ buffers. Tiles swizzled in 64-column groups, 1024-aligned.
struct Lay<const D: usize>;

impl<const D: usize> Lay<D> {
    const KV: u32 = (BN * D * 2) as u32;
    const QT: u32 = (BM * D * 2) as u32;
    const K: u32 = 0;
    const V: u32 = Self::KV;
    const Q: u32 = 2 * Self::KV;
    const DO: u32 = Self::Q + 2 * Self::QT;
    const PT: u32 = Self::DO + 2 * Self::QT;
    const DS: u32 = Self::PT + (BN * BM * 2) as u32;
    const LSE: u32 = Self::DS + (BN * BM * 2) as u32;
    /// With `bwd_wide_dq_bulk`: two dQ buffers per warpgroup, each a 64-column chunk (f32) as two of the
    /// accumulator map's boxes (`dq_offset`), warpgroup w's at `DQ + 2 w DQB`.
    const DQ: u32 = Self::LSE + (4 * BM * 4) as u32;
    const DQB: u32 = (BM * 64 * 4) as u32;
    const END: u32 = Self::DQ + if bwd_wide_dq_bulk(D) { 4 * Self::DQB } else { 0 };
    const CHECK: () = {
        assert!(D == 192 || D == 256);
        assert!(BN == bwd_wg_block_n(D) && BM == 64 && DQ_ACCUM_BLOCK_M % BM == 0);
        // The tile copies are the forward's, written for its 256 threads.
        assert!(BWD_WG_THREADS == COPY_THREADS);
        assert!(Self::LSE % 1024 == 0 && Self::DQ % 1024 == 0 && Self::END as usize == bwd_wg_smem_bytes(D));
    };
    /// The step stages (`StepStages`).
    const STAGES: StepStages = StepStages { q: Self::Q, dout: Self::DO, qt: Self::QT, lse: Self::LSE };
}

/// Start the copies of one step (q head `h`, query rows from `m0`) into stage `stage`.
#[inline(always)]
unsafe fn load_step<const D: usize>(p: &BwdParams, a: &KvArgs, base: u32, stage: usize, h: i32, m0: i32, tid: usize) {
    unsafe { load_step_to::<D>(p, a, Lay::<D>::STAGES.at(base, stage), h, m0, tid) }
}

/// `acc = keys x queries^T` over the head dim: `keys` the key tile (K or V, all 64 keys), `queries` the
/// step's query tile (Q or dO) from row `q0` (32 of them), both K-major. Issued and committed, not waited
/// for.
#[inline(always)]
unsafe fn issue_scores<E: WgElem, const D: usize>(acc: &mut [[f32; 4]; 4], keys: u32, queries: u32, q0: u32) {
    // Descriptors from their low words (`*_lo`; group strides BN and BM rows of 128 bytes, the generated
    // functions' constants).
    const { assert!(BN == 64 && BM == 64) };
    let (ad, bd) = (kmajor_desc(keys, BN as u32, 0, 0) as u32, kmajor_desc(queries, BM as u32, q0, 0) as u32);
    unsafe {
        if D == 192 {
            E::ss_n32_k12_lo(acc, ad, bd)
        } else {
            E::ss_n32_k16_lo(acc, ad, bd)
        }
    }
}

/// `acc += keys_x_queries x tile` over every head-dim column: `keys_x_queries` P^T or dS^T in shared
/// memory ([key][query], K-major), `tile` the step's dO or Q ([query][D], read transposed). Issued and
/// committed, not waited for.
#[inline(always)]
unsafe fn issue_grad<E: WgElem, const D: usize, const DN: usize>(acc: &mut [[f32; 4]; DN], keys_x_queries: u32, tile: u32) {
    let (ad, bd) = (kmajor_desc(keys_x_queries, BN as u32, 0, 0) as u32, desc_sw128(tile, BM as u32 * 128, 1024) as u32);
    unsafe {
        if D == 192 {
            E::st_n192_k4_lo(sized(acc), ad, bd)
        } else {
            E::st_n256_k4_lo(sized(acc), ad, bd)
        }
    }
}

/// dV (warpgroup 0) or dK (warpgroup 1) of keys `[n0, n0 + 64)` of kv head `hk` in `acc`, over the group's
/// q heads and the query blocks that see the keys; dQ contributions go to the accumulator. Returns its
/// step count.
#[inline(always)]
unsafe fn block<E: WgElem, const D: usize, const DN: usize, const MODS: bool, const ORDERED: bool>(p: &BwdParams, maps: u64, a: &KvArgs, tid: usize, acc: &mut [[f32; 4]; DN]) -> i32 {
    let () = Lay::<D>::CHECK;
    let base = smem::base();
    let (steps, next_step, mut cur) = step_walk::<ORDERED>(p, a, BN as i32, BM as i32);
    if steps == 0 {
        return 0;
    }
    let turn = DqTurn::of::<ORDERED>(p, a, BN as i32, BM as i32);
    // dQ by bulk reductions (`dq_bulk`): at the head dims with room for the buffers, in the default mode
    // with one accumulator (the split copies of the deterministic mode, `dqa_split_stride`, and the ordered
    // one keep the threads' reductions). The accumulator's map is the fifth of `maps` (`BwdTmaMaps`);
    // its rows start where `map_origin` says.
    let bulk = bwd_wide_dq_bulk(D) && !ORDERED && p.dqa_split_stride == 0;
    let dq_map = maps + 512;
    let (q_row, _, q_batch) = a.map_origin(p);
    // This warpgroup's bulk chunks so far in this key block: their buffers alternate.
    let mut chunks = 0u32;
    unsafe {
        let k = row_addr(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, a.bidb, a.sk.start + a.n0, a.hk);
        let v = row_addr(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, a.bidb, a.sk.start + a.n0, a.hk);
        load_tile_sw128::<D, BN>(base + Lay::<D>::K, k, p.k_row_stride * 2, a.cols, tid);
        load_tile_sw128::<D, BN>(base + Lay::<D>::V, v, p.v_row_stride * 2, a.cols, tid);
        load_step::<D>(p, a, base, 0, cur.0, cur.1 * BM as i32, tid);
    }
    commit_group();

    let mut it = 0;
    while it < steps {
        let stage = (it & 1) as usize;
        let base = opaque_u32(base);
        let tid = opaque_u32(tid as u32) as usize;
        let (warp, lane) = (tid / 32, tid % 32);
        let wg = (warp / 4) as u32;
        let (g, t) = ((lane / 4) as i32, (lane % 4) as i32);
        // This warp's keys (rows of S^T): 16 * (warp % 4) + g, + 8; its warpgroup's queries 32 wg...
        let key0 = (16 * (warp % 4)) as i32 + g;
        let q0 = 32 * wg;
        // Step it's data is visible, and every warp is done with step it-1 (its stage, P^T and dS^T).
        copies_visible::<0>();
        let nxt = next_step(cur);
        if it + 1 < steps {
            unsafe { load_step::<D>(p, a, base, 1 - stage, nxt.0, nxt.1 * BM as i32, tid) };
            commit_group();
        }
        let (k_s, v_s) = (base + Lay::<D>::K, base + Lay::<D>::V);
        let (h, m0) = (cur.0, cur.1 * BM as i32);
        cur = nxt;
        let rows = a.sq.used - m0;
        let [q_s, do_s, lse_s, delta_s] = Lay::<D>::STAGES.at(base, stage);

        let mut acc_s = [[[0f32; 4]; 4]; 1];
        let mut acc_dp = [[[0f32; 4]; 4]; 1];
        unsafe {
            issue_scores::<E, D>(&mut acc_s[0], k_s, q_s, q0);
            issue_scores::<E, D>(&mut acc_dp[0], v_s, do_s, q0);
        }
        wait_acc::<1, 4>(&mut acc_s[0]);
        wait_acc::<0, 4>(&mut acc_dp[0]);
        let mods = HeadMods::new::<MODS>(&p.mods, a.bidb, h, p.h, p.batch);
        let at = KqAt { row0: m0 + q0 as i32 + 2 * t, key0: a.n0 + key0, shift: a.sk.used - a.sq.used };
        let keep = keep_tile::<1, 4>(&mods, &at);

        // P^T and dS^T in place (one key tile, four query tiles per warp; ALiBi in two instructions per
        // score: H200 0.99x the time of three).
        grad_tile::<1, 4, MODS, true>(p, &mods, at, keep, &mut acc_s, &mut acc_dp, lse_s, delta_s, q0 as usize, t);
        if rows < BM as i32 || tile_needs_mask(m0, rows, a.n0, BN as i32, a.sq.used, a.sk.used, p.window_left, p.window_right) {
            mask_tile::<1, 4>(p, a, &mut acc_s, &mut acc_dp, m0, rows, key0, q0 as i32 + 2 * t);
        }
        // P^T and dS^T to shared memory, [key][query] swizzled.
        let (pt_s, ds_s) = (base + Lay::<D>::PT, base + Lay::<D>::DS);
        for j in 0..4 {
            for half in 0..2usize {
                let key = (key0 + 8 * half as i32) as u32;
                let q = q0 + (8 * j) as u32 + 2 * t as u32;
                let off = sw128_offset(BN as u32, key, q / 8) + (q % 8) * 2;
                unsafe {
                    smem::st_u32(pt_s + off, E::pack(acc_s[0][j][2 * half], acc_s[0][j][2 * half + 1]));
                    smem::st_u32(ds_s + off, E::pack(acc_dp[0][j][2 * half], acc_dp[0][j][2 * half + 1]));
                }
            }
        }
        wgmma::fence_proxy_async_shared();
        // Both warpgroups' halves of P^T and dS^T are in shared memory.
        sync_threads();

        // Warpgroup 0: dV += P^T dO; warpgroup 1: dK += dS^T Q.
        unsafe {
            if wg == 0 {
                issue_grad::<E, D, DN>(acc, pt_s, do_s);
            } else {
                issue_grad::<E, D, DN>(acc, ds_s, q_s);
            }
        }

        // dQ = dS K, 64 head-dim columns at a time: chunk c on warpgroup c % 2.
        let dqa = dqa_addr_split(p, a.bidb, a.sq.start + m0, h);
        let row = (16 * (warp % 4)) as i32 + g;
        // The ordered mode: this warpgroup's chunks after CTA x - 1's (one counter per warpgroup half).
        let leader = warp % 4 == 0 && lane == 0;
        let counter = if ORDERED { dq_turn_counter(p, a.bidb, a.sq.start + m0, h, wg) } else { 0 };
        if ORDERED {
            unsafe { turn.wait(counter, m0, BM as i32, leader, BAR_TURN + wg) };
        }
        let mut c = wg as usize;
        while c < D / 64 {
            let (ad, bd) = (desc_sw128(ds_s, 16, 1024) as u32, desc_sw128(k_s + c as u32 * (BN as u32 * 128), 16, 1024) as u32);
            let mut acc_q = [[0f32; 4]; 8];
            unsafe { E::tt_n64_k4_lo(&mut acc_q, ad, bd) };
            wgmma::wait0_n64(&mut acc_q);
            if bulk {
                let buf = base + Lay::<D>::DQ + (2 * wg + (chunks & 1)) * Lay::<D>::DQB;
                unsafe { dq_bulk(buf, dq_map, &acc_q, [(64 * c) as i32, q_row + m0, h, q_batch], row as u32, t as u32, wg, leader) };
                chunks += 1;
            } else {
                // Rows past the sequence carry exact zeros to rows prep zeroed (the accumulator has slack
                // rows), as in the other kernels.
                for j in 0..8 {
                    let col = (64 * c + 8 * j) as i64 + 2 * t as i64;
                    unsafe { add_dq_fragment(dqa, p.dqa_row_stride, row, col, acc_q[j]) };
                }
            }
            c += 2;
        }
        if ORDERED {
            unsafe { turn.pass(counter, m0, BM as i32, leader, BAR_TURN + wg) };
        }
        // dV / dK have landed (the next step overwrites P^T and dS^T).
        wait_acc::<0, DN>(acc);
        it += 1;
    }
    if bulk && tid % 128 == 0 {
        // The copy engine has read this block's last dQ buffers (the next block's first chunks write them,
        // and the CTA may exit next); with one CTA per (sequence, kv head) the reductions have landed, for
        // the convert at the end (`entry`'s fence).
        unsafe {
            if grid_dim_x() == 1 {
                tma::bulk_wait::<0>();
            } else {
                tma::bulk_wait_read::<0>();
            }
        }
    }
    // Every warp is done reading this block's K/V and stages before the next block loads over them.
    sync_threads();
    steps
}

/// The named barrier of warpgroup `wg`'s dQ buffers (`dq_bulk`): ids `BAR_DQ`, `BAR_DQ + 1`.
const BAR_DQ: u32 = BAR_TURN + 2;

/// Reduce a 64-column chunk of a step's dQ (`acc_q`: this thread's fragment of rows `row`, `row + 8`,
/// columns `8 j + 2 t`, + 1) into the accumulator at map coordinates `at` (first column, first row, q
/// head, batch) through warpgroup `wg`'s buffer `buf`: once the copy engine has read the buffer's last
/// chunk (this warpgroup's chunk before last: the buffers alternate, `bulk_wait_read::<1>` by the
/// warpgroup's leader, which issued it), the threads write the fragment in the map's two boxes of 32
/// columns (`ws::dq_offset`'s layout), and the leader issues both boxes' reductions as one bulk group.
/// Rows past the map's end are skipped; rows past the sequence inside it add exact zeros (dS is zero
/// there), as the threads' own reductions do. Every thread of the warpgroup.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dq_bulk(buf: u32, dq_map: u64, acc_q: &[[f32; 4]; 8], at: [i32; 4], row: u32, t: u32, wg: u32, leader: bool) {
    if leader {
        unsafe { tma::bulk_wait_read::<1>() };
    }
    named_sync(BAR_DQ + wg, 128);
    for (j, frag) in acc_q.iter().enumerate() {
        let col = 8 * j as u32 + 2 * t;
        for half in 0..2usize {
            unsafe { smem::st_v2_f32(buf + dq_offset(row + 8 * half as u32, col), [frag[2 * half], frag[2 * half + 1]]) };
        }
    }
    wgmma::fence_proxy_async_shared();
    named_sync(BAR_DQ + wg, 128);
    if leader {
        unsafe {
            tma::reduce_add_4d(buf, dq_map, at);
            tma::reduce_add_4d(buf + (BM * 128) as u32, dq_map, [at[0] + 32, at[1], at[2], at[3]]);
            tma::bulk_commit();
        }
    }
}

/// Kernel body: stride over this (sequence, kv head)'s key blocks; keys of no sequence get dk = dv = 0.
/// With grid x = 1 also dq of the group's rows (as the 128-key kernel).
#[inline(always)]
pub(super) unsafe fn entry<E: WgElem, const D: usize, const DN: usize, const MODS: bool, const ORDERED: bool>(p: &BwdParams, maps: u64) {
    let tid = thread_idx_x() as usize;
    let hk = block_idx_y() as i32;
    // The ordered deterministic mode: one key block per CTA, in reverse (bwd/ws.rs).
    let (bidb, mut n_block) = grid_block(p, BN as i32, true, ORDERED);
    let (sq, sk) = sequences(p, bidb);
    let (warp, lane) = (tid / 32, tid % 32);
    let wg = warp / 4;
    let (g, t) = ((lane / 4) as i32, (lane % 4) as i32);
    let key0 = (16 * (warp % 4)) as i32 + g;

    while n_block * (BN as i32) < sk.slot_len {
        let n0 = n_block * BN as i32;
        let mut acc = [[0f32; 4]; DN];
        if n0 < sk.used && takes_key_block::<ORDERED>(n_block) {
            let args = KvArgs { bidb, hk, group: p.h / p.h_k, sq, sk, n0, cols: if sk.used - n0 < BN as i32 { sk.used - n0 } else { BN as i32 } };
            unsafe { block::<E, D, DN, MODS, ORDERED>(p, maps, &args, tid, &mut acc) };
        }
        // Warpgroup 0 writes dV, warpgroup 1 dK (scaled).
        for half in 0..2usize {
            let r = n0 + key0 + 8 * half as i32;
            if r < sk.slot_len {
                let (out, scale) = if wg == 0 {
                    (row_addr(p.dv, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, bidb, sk.start + r, hk), 1.0)
                } else {
                    (row_addr(p.dk, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, bidb, sk.start + r, hk), p.scale)
                };
                for j in 0..DN {
                    let off = ((8 * j as i32 + 2 * t) * 2) as u64;
                    unsafe { st_global_u32(out + off, E::pack(acc[j][2 * half] * scale, acc[j][2 * half + 1] * scale)) };
                }
            }
        }
        n_block += grid_dim_x() as i32;
    }
    if grid_dim_x() == 1 {
        fence_gpu();
        sync_threads();
        let group = p.h / p.h_k;
        let mut h = hk * group;
        while h < (hk + 1) * group {
            unsafe { convert_rows::<E, BWD_WG_THREADS, 4>(p, bidb, &sq, h, 0, sq.slot_len, tid) };
            h += 1;
        }
    }
}
