//! Hopper dK/dV kernel (+ atomic dQ) on wgmma, head dims 64, 96 and 128 (sm_90a module). The algorithm and the
//! walk are the mma.sync kernel's (a block owns 128 keys of one kv head and walks every q head of its group
//! and every 64-row query block that sees them); warpgroup w owns keys 64w..64w+63, so each warp keeps 16
//! keys and the element-wise part is the mma.sync kernel's with one key tile per warp. All operands sit in
//! shared memory in the 128-byte swizzle (arch/wgmma.rs): per step
//!   S^T = K Q^T and dP^T = V dO^T (smem x smem, keys x queries),
//!   P^T, dS^T in registers; dS^T also to shared memory for dQ,
//!   dV += P^T dO and dK += dS^T Q (P^T, dS^T from registers, dO and Q transposed on read),
//!   dQ = dS K (both transposed on read; warpgroup w takes head-dim columns 64w.. at d96 and d128, the
//!   warpgroups take all 64 in turn at d64), added to the f32 accumulator with 8-byte vector reductions.
//! Head dim 96 lays its tiles out as two 64-column groups (the second half-filled with zeros, as the
//! forward's): S^T and dP^T take six k16 steps; dV, dK and dQ, whose B operands are read transposed
//! (N-major, in whole 64-column groups), run over 128 columns (the last 32 zero, never stored).

use super::convert::convert_rows;
use super::{add_dq_fragment, dqa_addr_split, grad_tile, grid_block, keep_tile, lse_index, mask_tile, row_addr, sequences, step_walk, dq_turn_counter, takes_key_block, DqTurn, KqAt, KvArgs};
use crate::mods::HeadMods;
use crate::arch::cp_async::{commit_group, cp_async_4};
use crate::arch::mem::st_global_u32;
use crate::arch::reg::opaque_u32;
use crate::arch::smem;
use crate::arch::sreg::{block_idx_y, grid_dim_x, thread_idx_x};
use crate::arch::sync::{fence_gpu, sync_threads};
use crate::arch::wgmma::{self, desc_sw128, sw128_offset};
use crate::block::InteriorRows;
use crate::fwd::wg::{copies_visible, kmajor_desc, load_tile_sw128, sized, wait_acc, WgElem, THREADS as COPY_THREADS};
use crate::params::{BwdParams, BwdTmaMaps};
use crate::seqlen::SeqlenInfo;
use crate::tile::{a_fragment, BF16, F16};
use crate::variants::{bwd_wg_smem_bytes, BWD_WG_BLOCK_M, BWD_WG_BLOCK_N, BWD_WG_THREADS, DQ_ACCUM_BLOCK_M};

const BN: usize = BWD_WG_BLOCK_N;
const BM: usize = BWD_WG_BLOCK_M;

/// Shared memory for head dim `D`: K, V (BN rows), two stages of Q and of dO (BM rows), dS^T (BN keys x
/// BM queries, queries contiguous), two stages of the rows' lse_log2 and D, then the second buffer of K
/// and V (a block's successor loads into the buffer its predecessor did not use). Tiles swizzled in
/// 64-column groups (`DP` columns: the head dim rounded up to a group), 1024-aligned.
struct Lay<const D: usize>;

impl<const D: usize> Lay<D> {
    const DP: usize = D.div_ceil(64) * 64;
    const KV: u32 = (BN * Self::DP * 2) as u32;
    const QT: u32 = (BM * Self::DP * 2) as u32;
    const K: u32 = 0;
    const V: u32 = Self::KV;
    const Q: u32 = 2 * Self::KV;
    const DO: u32 = Self::Q + 2 * Self::QT;
    const DS: u32 = Self::DO + 2 * Self::QT;
    const LSE: u32 = Self::DS + (BN * BM * 2) as u32;
    const KV1: u32 = Self::LSE + (4 * BM * 4) as u32;
    const CHECK: () = {
        assert!(D == 64 || D == 96 || D == 128);
        assert!(BN == 128 && BM == 64 && DQ_ACCUM_BLOCK_M % BM == 0);
        // The tile copies are the forward's, written for its 256 threads.
        assert!(BWD_WG_THREADS == COPY_THREADS);
        assert!(Self::KV1 % 1024 == 0 && (Self::KV1 + 2 * Self::KV) as usize == bwd_wg_smem_bytes(D));
    };
    /// K and V of buffer `kv` (0 or 1).
    #[inline(always)]
    fn k(base: u32, kv: u32) -> u32 {
        base + Self::K + kv * Self::KV1
    }
    #[inline(always)]
    fn v(base: u32, kv: u32) -> u32 {
        base + Self::V + kv * Self::KV1
    }
    /// The step stages (`StepStages`).
    const STAGES: StepStages = StepStages { q: Self::Q, dout: Self::DO, qt: Self::QT, lse: Self::LSE };
}

/// Start the copies of one step (q head `h`, query rows from `m0`) into stage `stage`.
#[inline(always)]
unsafe fn load_step<const D: usize>(p: &BwdParams, a: &KvArgs, base: u32, stage: usize, h: i32, m0: i32, tid: usize) {
    unsafe { load_step_to::<D>(p, a, Lay::<D>::STAGES.at(base, stage), h, m0, tid) }
}

/// The copies of one step of either Hopper dK/dV kernel (q head `h`, `BM` query rows from `m0`): Q and dO
/// into the swizzled tiles at `dst[0]`, `dst[1]`, the rows' lse_log2 and D to `dst[2]`, `dst[3]`.
#[inline(always)]
pub(super) unsafe fn load_step_to<const D: usize>(p: &BwdParams, a: &KvArgs, dst: [u32; 4], h: i32, m0: i32, tid: usize) {
    let rows = a.sq.used - m0;
    let q = row_addr(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, a.bidb, a.sq.start + m0, h);
    let g = row_addr(p.dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride, a.bidb, a.sq.start + m0, h);
    unsafe {
        load_tile_sw128::<D, BM>(dst[0], q, p.q_row_stride * 2, rows, tid);
        load_tile_sw128::<D, BM>(dst[1], g, p.do_row_stride * 2, rows, tid);
    }
    if tid < BM {
        let r = tid as i32;
        let valid = r < rows;
        let at = if valid { lse_index(p, a.bidb, a.sq.start, h, m0 + r) as u64 * 4 } else { 0 };
        unsafe {
            cp_async_4(dst[2] + tid as u32 * 4, p.lse_log2.wrapping_add(at), valid);
            cp_async_4(dst[3] + tid as u32 * 4, p.delta.wrapping_add(at), valid);
        }
    }
}

/// Where either Hopper dK/dV kernel keeps its steps' operands in shared memory: two stages of the Q and
/// dO tiles (`qt` bytes each, from offsets `q` and `dout`) and of the rows' lse_log2 and D (`BM` f32
/// each from `lse`: lse_log2 of stages 0 and 1, then D of stages 0 and 1).
pub(super) struct StepStages {
    pub q: u32,
    pub dout: u32,
    pub qt: u32,
    pub lse: u32,
}

impl StepStages {
    /// Stage `s`'s Q, dO, lse_log2 and D above `base` (`load_step_to`'s destinations).
    #[inline(always)]
    pub(super) fn at(&self, base: u32, s: usize) -> [u32; 4] {
        let s = s as u32;
        let rows = BM as u32 * 4;
        [base + self.q + s * self.qt, base + self.dout + s * self.qt, base + self.lse + s * rows, base + self.lse + (2 + s) * rows]
    }
}

/// Start the copies of key block `a`'s K and V into buffer `kv`.
#[inline(always)]
unsafe fn load_kv<const D: usize>(p: &BwdParams, a: &KvArgs, base: u32, kv: u32, tid: usize) {
    let k = row_addr(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, a.bidb, a.sk.start + a.n0, a.hk);
    let v = row_addr(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, a.bidb, a.sk.start + a.n0, a.hk);
    unsafe {
        load_tile_sw128::<D, BN>(Lay::<D>::k(base, kv), k, p.k_row_stride * 2, a.cols, tid);
        load_tile_sw128::<D, BN>(Lay::<D>::v(base, kv), v, p.v_row_stride * 2, a.cols, tid);
    }
}

/// `acc = rows x cols^T` over the head dim for warpgroup `wg`'s 64 keys: `rows` the key tile (K or V),
/// `cols` the step's query tile (Q or dO), both K-major. Issued and committed, not waited for.
#[inline(always)]
pub(super) unsafe fn issue_keys_x_queries<E: WgElem, const D: usize>(acc: &mut [[f32; 4]; 8], keys: u32, queries: u32, wg: u32) {
    // Descriptors from their low words, formed inside the asm block (`*_lo`; group strides BN and BM
    // rows of 128 bytes: the generated functions' constants).
    const { assert!(BN == 128 && BM == 64) };
    let (ad, bd) = (kmajor_desc(keys, BN as u32, wg * 64, 0) as u32, kmajor_desc(queries, BM as u32, 0, 0) as u32);
    unsafe {
        match D {
            64 => E::ss_n64_k4_lo(acc, ad, bd),
            96 => E::ss_n64_k6_lo(acc, ad, bd),
            _ => E::ss_n64_k8_lo(acc, ad, bd),
        }
    }
}

/// `acc += frags x tile`: `frags` this warpgroup's keys x the step's 64 queries (four k16 steps), `tile` the
/// step's query tile (dO or Q, [query][D], transposed on read). Issued and committed, not waited for.
#[inline(always)]
pub(super) unsafe fn issue_keys_x_dim<E: WgElem, const D: usize, const DN: usize>(acc: &mut [[f32; 4]; DN], frags: &[[u32; 4]; 4], tile: u32) {
    let bd = desc_sw128(tile, BM as u32 * 128, 1024) as u32;
    unsafe {
        if D == 64 {
            E::rs_n64_k4_lo(sized(acc), frags, bd)
        } else {
            E::rs_n128_k4_lo(sized(acc), frags, bd)
        }
    }
}

/// One step of either 128-key Hopper dK/dV kernel for this thread (warpgroup `wg`, keys 64 wg.. of the
/// block; this warp's 16 from `key0`, the thread's fragment column pair `t`): S^T = K Q^T and dP^T = V dO^T (`kv`: K, V; `stage`: Q, dO, lse_log2,
/// D of q head `h`, rows from `m0`), P^T and dS^T in place (the mma.sync kernel's element-wise step, one
/// key tile per warp, masked where the tile needs it), dS^T to `ds_s` ([key][query] swizzled: dQ's A
/// operand, transposed on read) and made visible to wgmma. Returns P^T's and dS^T's A fragments (dV's
/// and dK's).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn step_grads<E: WgElem, const D: usize, const MODS: bool>(p: &BwdParams, a: &KvArgs, interior: InteriorRows, kv: [u32; 2], stage: [u32; 4], ds_s: u32, h: i32, m0: i32, wg: u32, key0: i32, t: i32) -> ([[u32; 4]; 4], [[u32; 4]; 4]) {
    let [k_s, v_s] = kv;
    let [q_s, do_s, lse_s, delta_s] = stage;
    let rows = a.sq.used - m0;
    // One key tile per warp: the shape the shared element-wise helpers take (KT = 1).
    let mut acc_s = [[[0f32; 4]; 8]; 1];
    let mut acc_dp = [[[0f32; 4]; 8]; 1];
    unsafe {
        issue_keys_x_queries::<E, D>(&mut acc_s[0], k_s, q_s, wg);
        issue_keys_x_queries::<E, D>(&mut acc_dp[0], v_s, do_s, wg);
    }
    wgmma::wait1_n64(&mut acc_s[0]);
    wgmma::wait0_n64(&mut acc_dp[0]);
    let mods = HeadMods::new::<MODS>(&p.mods, a.bidb, h, p.h, p.batch);
    let at = KqAt { row0: m0 + 2 * t, key0: a.n0 + key0, shift: a.sk.used - a.sq.used };
    let keep = keep_tile::<1, 8>(&mods, &at);
    // ALiBi's two-instruction form above head dim 64 (H200: 0.97-0.99x the time at 96 / 128; at 64 one
    // run had it 1.02-1.03x, benches/RESULTS.md).
    if D > 64 {
        grad_tile::<1, 8, MODS, true>(p, &mods, at, keep, &mut acc_s, &mut acc_dp, lse_s, delta_s, 0, t);
    } else {
        grad_tile::<1, 8, MODS, false>(p, &mods, at, keep, &mut acc_s, &mut acc_dp, lse_s, delta_s, 0, t);
    }
    if rows < BM as i32 || interior.needs_mask(m0, BM as i32) {
        mask_tile::<1, 8>(p, a, &mut acc_s, &mut acc_dp, m0, rows, key0, 2 * t);
    }
    for j in 0..8 {
        for half in 0..2usize {
            let key = (key0 + 8 * half as i32) as u32;
            let q = (8 * j) as u32 + 2 * t as u32;
            let at = ds_s + sw128_offset(BN as u32, key, q / 8) + (q % 8) * 2;
            unsafe { smem::st_u32(at, E::pack(acc_dp[0][j][2 * half], acc_dp[0][j][2 * half + 1])) };
        }
    }
    wgmma::fence_proxy_async_shared();
    let mut pa = [[0u32; 4]; 4];
    let mut da = [[0u32; 4]; 4];
    for kk in 0..4 {
        pa[kk] = a_fragment::<E>(&acc_s[0][2 * kk], &acc_s[0][2 * kk + 1]);
        da[kk] = a_fragment::<E>(&acc_dp[0][2 * kk], &acc_dp[0][2 * kk + 1]);
    }
    (pa, da)
}

/// dQ = dS K of one step (q head `h`, rows from `m0`; both warpgroups' dS^T at `ds_s`, K at `k_s`) for
/// warpgroup `wg`: its 64 head-dim columns at d96 and d128 (at d96 the second's last 32 are zero and not
/// added), all 64 at d64 (the caller alternates the warpgroups), added to the f32 accumulator. Rows: warp
/// `warp`'s 16 queries (fragment row `g`, column pair `t`); rows past the sequence carry exact zeros to rows prep zeroed (the accumulator has
/// slack rows), as in the mma.sync kernel.
///
/// `ORDERED` (the ordered deterministic mode, `BwdParams::dq_sem`): the adds wait for this step's turn
/// (`turn`: CTA x - 1's adds done where it has any) and then pass it on (x + 1), one counter per column
/// half (the warpgroup's; at d64 the one), waited on by the warpgroup's first thread and shared by its
/// named barrier `BAR_TURN + wg`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn step_dq<E: WgElem, const D: usize, const ORDERED: bool>(p: &BwdParams, a: &KvArgs, ds_s: u32, k_s: u32, h: i32, m0: i32, wg: u32, warp: usize, g: i32, t: i32, turn: &DqTurn) {
    let c0 = if D != 64 { wg * 64 } else { 0 };
    let mut acc_q = unsafe { issue_dq::<E>(ds_s, k_s, c0) };
    let leader = warp % 4 == 0 && g == 0 && t == 0;
    let counter = if ORDERED { dq_turn_counter(p, a.bidb, a.sq.start + m0, h, if D == 64 { 0 } else { wg }) } else { 0 };
    if ORDERED {
        unsafe { turn.wait(counter, m0, BM as i32, leader, BAR_TURN + wg) };
    }
    wgmma::wait0_n64(&mut acc_q);
    let dqa = dqa_addr_split(p, a.bidb, a.sq.start + m0, h);
    let row = (16 * (warp % 4)) as i32 + g;
    for j in 0..8 {
        let col = (c0 as usize + 8 * j) as i64 + 2 * t as i64;
        if D != 96 || col < D as i64 {
            unsafe { add_dq_fragment(dqa, p.dqa_row_stride, row, col, acc_q[j]) };
        }
    }
    if ORDERED {
        unsafe { turn.pass(counter, m0, BM as i32, leader, BAR_TURN + wg) };
    }
}

/// Issue a step's dQ = dS K over the head-dim columns `c0..c0 + 64` (both warpgroups' dS^T at `ds_s`, K at
/// `k_s`); the caller waits for it (`wgmma::wait0_n64`).
#[inline(always)]
pub(super) unsafe fn issue_dq<E: WgElem>(ds_s: u32, k_s: u32, c0: u32) -> [[f32; 4]; 8] {
    let (ad, bd) = (desc_sw128(ds_s, 16, 1024) as u32, desc_sw128(k_s + (c0 / 64) * (BN as u32 * 128), 16, 1024) as u32);
    let mut acc_q = [[0f32; 4]; 8];
    unsafe { E::tt_n64_k8_lo(&mut acc_q, ad, bd) };
    acc_q
}

/// Named barriers 2 and 3: the ordered mode's turn of warpgroup 0 and 1 (`step_dq`; the wg kernel uses
/// barrier 0, the ws kernel 0 and 1).
pub(super) const BAR_TURN: u32 = 2;

/// dK (scaled) and dV of keys `[n0, n0 + 128)` of kv head `hk`, sequence `bidb` (slot `sk`), from this
/// thread's accumulators (its warp's 16 keys from `key0`, column pair `t`): rows past the slot are
/// not written, rows of no key hold zeros. (d96: the accumulators' last four column tiles are the zero
/// padding.)
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn store_dk_dv<E: WgElem, const D: usize, const DN: usize>(p: &BwdParams, sk: &SeqlenInfo, bidb: i32, hk: i32, n0: i32, acc_dk: &[[f32; 4]; DN], acc_dv: &[[f32; 4]; DN], key0: i32, t: i32) {
    for half in 0..2usize {
        let r = n0 + key0 + 8 * half as i32;
        if r < sk.slot_len {
            let dk = row_addr(p.dk, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, bidb, sk.start + r, hk);
            let dv = row_addr(p.dv, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, bidb, sk.start + r, hk);
            for j in 0..D / 8 {
                let off = ((8 * j as i32 + 2 * t) * 2) as u64;
                let (k0, k1) = (acc_dk[j][2 * half] * p.scale, acc_dk[j][2 * half + 1] * p.scale);
                unsafe {
                    st_global_u32(dk + off, E::pack(k0, k1));
                    st_global_u32(dv + off, E::pack(acc_dv[j][2 * half], acc_dv[j][2 * half + 1]));
                }
            }
        }
    }
}

/// Where thread `tid` of the 128-key kernels' two (consumer) warpgroups sits: its warp, its warpgroup
/// (keys 64 wg..), its fragment row `g` and column pair `t`, and its warp's first key row `key0` = 16 warp
/// + g (it holds keys key0 and key0 + 8 of the block's S^T).
#[derive(Clone, Copy)]
pub(super) struct Place {
    pub warp: usize,
    pub wg: u32,
    pub g: i32,
    pub t: i32,
    pub key0: i32,
}

impl Place {
    #[inline(always)]
    pub(super) fn of(tid: usize) -> Place {
        let (warp, lane) = (tid / 32, tid % 32);
        let (g, t) = ((lane / 4) as i32, (lane % 4) as i32);
        Place { warp, wg: (warp / 4) as u32, g, t, key0: (16 * warp) as i32 + g }
    }
}

/// Where a key block's copies stand: its K/V buffer, the stage of its first step, and whether its
/// predecessor already started its K/V and first step's copies.
#[derive(Clone, Copy)]
struct Pipe {
    kv: u32,
    stage0: i32,
    prefetched: bool,
}

/// The key block after `a` in this CTA (the grid strides over key blocks), if it has keys; none in the
/// ordered mode (one key block per CTA).
#[inline(always)]
fn successor<const ORDERED: bool>(a: &KvArgs) -> Option<KvArgs> {
    if ORDERED {
        return None;
    }
    let n0 = a.n0 + grid_dim_x() as i32 * BN as i32;
    (n0 < a.sk.used).then(|| KvArgs { n0, cols: if a.sk.used - n0 < BN as i32 { a.sk.used - n0 } else { BN as i32 }, ..*a })
}

/// dK and dV of keys `[n0, n0 + 128)` of kv head `hk` (this warpgroup's 64), over the group's q heads and
/// the query blocks that see the keys; dQ contributions go to the accumulator (always present here).
/// During its last step it starts the copies of its successor (if that has steps). Returns its step count.
#[inline(always)]
unsafe fn block<E: WgElem, const D: usize, const DN: usize, const MODS: bool, const ORDERED: bool>(p: &BwdParams, a: &KvArgs, pipe: Pipe, tid: usize, acc_dk: &mut [[f32; 4]; DN], acc_dv: &mut [[f32; 4]; DN]) -> i32 {
    let () = Lay::<D>::CHECK;
    let base = smem::base();
    let (steps, next_step, mut cur) = step_walk::<ORDERED>(p, a, BN as i32, BM as i32);
    if steps == 0 {
        return 0;
    }
    let turn = DqTurn::of::<ORDERED>(p, a, BN as i32, BM as i32);
    if !pipe.prefetched {
        unsafe {
            load_kv::<D>(p, a, base, pipe.kv, tid);
            load_step::<D>(p, a, base, pipe.stage0 as usize, cur.0, cur.1 * BM as i32, tid);
        }
        commit_group();
    }

    let interior = InteriorRows::of(a.n0, BN as i32, a.sq.used, a.sk.used, p.window_left, p.window_right);
    // `it` counts from the first step's stage, so `it & 1` is every step's stage.
    let mut it = pipe.stage0;
    let end = steps + pipe.stage0;
    while it < end {
        let stage = (it & 1) as usize;
        let base = opaque_u32(base);
        let tid = opaque_u32(tid as u32) as usize;
        let Place { warp, wg, g, t, key0 } = Place::of(tid);
        // Step it's data is visible, and every warp is done with step it-1 (its stage and dS^T).
        copies_visible::<0>();
        let nxt = next_step(cur);
        if it + 1 < end {
            unsafe { load_step::<D>(p, a, base, 1 - stage, nxt.0, nxt.1 * BM as i32, tid) };
            commit_group();
        } else if let Some(b) = successor::<ORDERED>(a) {
            // The successor's K/V go to the other buffer (its predecessor's reads are behind the
            // barrier at the start of this block's first step), its first step to the other stage.
            let (b_steps, _, first) = step_walk::<ORDERED>(p, &b, BN as i32, BM as i32);
            if b_steps > 0 {
                unsafe {
                    load_kv::<D>(p, &b, base, 1 - pipe.kv, tid);
                    load_step::<D>(p, &b, base, 1 - stage, first.0, first.1 * BM as i32, tid);
                }
                commit_group();
            }
        }
        let k_s = Lay::<D>::k(base, pipe.kv);
        let v_s = Lay::<D>::v(base, pipe.kv);
        let (h, m0) = (cur.0, cur.1 * BM as i32);
        cur = nxt;
        let [q_s, do_s, lse_s, delta_s] = Lay::<D>::STAGES.at(base, stage);

        let ds_s = base + Lay::<D>::DS;
        let (mut pa, mut da) = unsafe { step_grads::<E, D, MODS>(p, a, interior, [k_s, v_s], [q_s, do_s, lse_s, delta_s], ds_s, h, m0, wg, key0, t) };
        // dV += P^T dO and dK += dS^T Q.
        unsafe {
            issue_keys_x_dim::<E, D, DN>(acc_dv, &pa, do_s);
            issue_keys_x_dim::<E, D, DN>(acc_dk, &da, q_s);
        }
        // Both warpgroups' dS^T is in shared memory.
        sync_threads();

        // dQ: at d64 on the warpgroups in turn (even steps warpgroup 0, odd steps 1).
        if D != 64 || wg == (it & 1) as u32 {
            unsafe { step_dq::<E, D, ORDERED>(p, a, ds_s, k_s, h, m0, wg, warp, g, t, &turn) };
        }
        // dV and dK have landed; P^T and dS^T fragments stay live until here.
        wait_acc::<0, DN>(acc_dv);
        wait_acc::<0, DN>(acc_dk);
        wgmma::keep_a4(&mut pa);
        wgmma::keep_a4(&mut da);
        it += 1;
    }
    // Every warp is done reading this block's K/V and stages before anyone moves on (a successor without
    // steps does not pass a barrier before the next one loads into this buffer).
    sync_threads();
    steps
}

/// Kernel body: stride over this (sequence, kv head)'s key blocks; keys of no sequence get dk = dv = 0.
/// With grid x = 1 also dq of the group's rows (see the end).
#[inline(always)]
unsafe fn entry<E: WgElem, const D: usize, const DN: usize, const MODS: bool, const ORDERED: bool>(p: &BwdParams, _maps: u64) {
    let tid = thread_idx_x() as usize;
    let hk = block_idx_y() as i32;
    // The ordered deterministic mode (`ORDERED`, bwd/ws.rs): one key block per CTA, in reverse.
    let (bidb, mut n_block) = grid_block(p, BN as i32, true, ORDERED);
    let (sq, sk) = sequences(p, bidb);
    let Place { t, key0, .. } = Place::of(tid);

    // Key blocks x, x + gx, ...: the host gives a CTA one key block, or all of them (grid x = 1,
    // `bwd_wg_grid_x`), each one's first copies then overlapping its predecessor's last step.
    let mut pipe = Pipe { kv: 0, stage0: 0, prefetched: false };
    while n_block * (BN as i32) < sk.slot_len {
        let n0 = n_block * BN as i32;
        let mut acc_dk = [[0f32; 4]; DN];
        let mut acc_dv = [[0f32; 4]; DN];
        let mut prefetched = false;
        if n0 < sk.used && takes_key_block::<ORDERED>(n_block) {
            let args = KvArgs { bidb, hk, group: p.h / p.h_k, sq, sk, n0, cols: if sk.used - n0 < BN as i32 { sk.used - n0 } else { BN as i32 } };
            let steps = unsafe { block::<E, D, DN, MODS, ORDERED>(p, &args, pipe, tid, &mut acc_dk, &mut acc_dv) };
            if steps > 0 {
                pipe.kv ^= 1;
                pipe.stage0 ^= steps & 1;
                // What the last step started (the same test).
                prefetched = successor::<ORDERED>(&args).is_some_and(|b| step_walk::<ORDERED>(p, &b, BN as i32, BM as i32).0 > 0);
            }
        }
        pipe.prefetched = prefetched;
        unsafe { store_dk_dv::<E, D, DN>(p, &sk, bidb, hk, n0, &acc_dk, &acc_dv, key0, t) };
        n_block += grid_dim_x() as i32;
    }
    // One key-block column (grid x = 1): this CTA added every dq contribution of its rows (all q heads of
    // its group; other sequences' blocks add exact zeros at most), so it converts them itself and the
    // host skips the convert pass.
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

/// The Hopper dK/dV kernel of each head dim: this file's 128-key kernel up to 128, the 64-key one of
/// wide.rs above (only the one a head dim runs is instantiated).
pub(super) struct Dim<const D: usize>;
/// `maps`: the address of the kernel's second parameter (`BwdTmaMaps`), whose dq accumulator map the wide
/// kernels' bulk reductions use (`wide::dq_bulk`); the 128-key kernel reads none.
pub(super) trait Kernel {
    unsafe fn run<E: WgElem, const MODS: bool, const ORDERED: bool>(p: &BwdParams, maps: u64);
}
macro_rules! dim_kernel {
    ($($d:literal => $entry:ident),*) => {$(
        impl Kernel for Dim<$d> {
            #[inline(always)]
            unsafe fn run<E: WgElem, const MODS: bool, const ORDERED: bool>(p: &BwdParams, maps: u64) {
                unsafe { $entry::<E, $d, { ($d as usize).div_ceil(64) * 8 }, MODS, ORDERED>(p, maps) }
            }
        }
    )*};
}
use super::wide::entry as wide_entry;
dim_kernel!(64 => entry, 96 => entry, 128 => entry, 192 => wide_entry, 256 => wide_entry);

macro_rules! bwd_wg_kernels {
    // `$d` a token tree, so `mods_det!` can match the literal head dims.
    ($(($d:tt, $dt:ident, $name:expr)),* $(,)?) => {$(
        // Every export takes the tensor maps second (`BwdTmaMaps`; the host passes them to every Hopper
        // dK/dV kernel), as the warp-specialized kernels do.
        const _: () = {
            #[unsafe(export_name = $name)]
            pub unsafe extern "ptx-kernel" fn kernel(p: BwdParams, _maps: BwdTmaMaps) {
                let maps = crate::param_address!(concat!($name, "_param_1"));
                unsafe { <Dim<$d> as Kernel>::run::<$dt, false, false>(&p, maps) }
            }
            #[unsafe(export_name = concat!($name, "_mods"))]
            pub unsafe extern "ptx-kernel" fn kernel_mods(p: BwdParams, _maps: BwdTmaMaps) {
                let maps = crate::param_address!(concat!($name, "_mods_param_1"));
                unsafe { <Dim<$d> as Kernel>::run::<$dt, true, false>(&p, maps) }
            }
            /// The `_mods` kernel for ALiBi without dropout: the parameters' dropout is set off here, so
            /// the compiler drops the dropout code (and its registers) from this copy.
            #[unsafe(export_name = concat!($name, "_alibi"))]
            pub unsafe extern "ptx-kernel" fn kernel_alibi(p: BwdParams, _maps: BwdTmaMaps) {
                let maps = crate::param_address!(concat!($name, "_alibi_param_1"));
                let p = BwdParams { mods: p.mods.without_dropout(), ..p };
                unsafe { <Dim<$d> as Kernel>::run::<$dt, true, false>(&p, maps) }
            }
            // The ordered deterministic mode (`BwdParams::dq_sem`).
            #[unsafe(export_name = concat!($name, "_det"))]
            pub unsafe extern "ptx-kernel" fn kernel_det(p: BwdParams, _maps: BwdTmaMaps) {
                let maps = crate::param_address!(concat!($name, "_det_param_1"));
                unsafe { <Dim<$d> as Kernel>::run::<$dt, false, true>(&p, maps) }
            }
            mods_det!($d, $dt, $name);
        };
    )*};
}
/// The ordered deterministic mode with score modifiers (`_mods_det`), at the wide head dims only (there the
/// split copies ran at 0.61-0.67x the default mode; at 64-128 ALiBi / dropout keep the split copies, at
/// 0.85-0.88x, and `bwd_wg_mods_det_kernel_name` names none).
macro_rules! mods_det {
    (64, $dt:ident, $name:expr) => {};
    (96, $dt:ident, $name:expr) => {};
    (128, $dt:ident, $name:expr) => {};
    ($d:tt, $dt:ident, $name:expr) => {
        #[unsafe(export_name = concat!($name, "_mods_det"))]
        pub unsafe extern "ptx-kernel" fn kernel_mods_det(p: BwdParams, _maps: BwdTmaMaps) {
            let maps = crate::param_address!(concat!($name, "_mods_det_param_1"));
            unsafe { <Dim<$d> as Kernel>::run::<$dt, true, true>(&p, maps) }
        }
    };
}
crate::for_each_bwd_wg_variant!(bwd_wg_kernels);
