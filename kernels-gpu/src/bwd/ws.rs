//! Hopper dK/dV kernel (+ atomic dQ), warp-specialized (sm_90a): the wg kernel's products and
//! element-wise step (wg.rs: a block owns 128 keys of one kv head, consumer warpgroup w keys 64w..,
//! 64-row query steps over every q head of the group) fed by the bulk tensor copy engine. Warpgroup 0
//! produces: its first warp walks the same key blocks and steps, lane 0 copying K and V (one stage per key
//! block) and each step's Q and dO (`STAGES` stages) with tensor copies, the 32 lanes the step's lse_log2
//! and D rows with cp.async, all completing on the stages' barriers. Warpgroups 1 and 2 consume: they
//! wait for a stage, run the step, and release it once their products have read it; their dS^T halves
//! meet in one of two dS^T buffers (one named barrier per step: the buffer written at step i was last read
//! at step i - 2, before either warpgroup passed step i - 1's barrier).
//! In both modes (`bwd_ws_dq_helpers`: every head dim here) the consumers put each step's dQ in a shared buffer (f32, in the boxes
//! of the accumulator's tensor map: `dq_offset`; one stage, its own barriers) and go on; one thread of
//! warpgroup 0's second warp reduces the buffer into the accumulator with bulk tensor reductions
//! (`cp.reduce.async.bulk.tensor ... add`, one per 32-column box), so the consumers' issue no longer
//! waits on the LG queue (RESULTS.md, Backward).
//! The deterministic mode runs the `_det` twin (`ORDERED`, at every head dim: `bwd_ordered_by_default`):
//! one key block per CTA as in the default mode, CTA x on block gx - 1 - x, and every step's dq adds in a
//! fixed order across CTAs: the helper adds CTA x's after CTA x - 1 (the next key block) added its own to
//! the same rows, waiting on a counter per (row block, q head) that prep zeroes (`BwdParams::dq_sem`,
//! `help_dq`), and passes the turn on once its reductions have completed. Within a CTA an element gets
//! one add per step.
//! (This kernel does not run the split copies: their CTAs walk several key blocks, which one K/V stage
//! here serializes: 0.95x the wg kernel at hdim 128.)
//! The copy engine reads rows past a sequence (the next sequence's, or the caller's padding, not zeros),
//! so the consumers zero those rows of a partial key block's K and V and of a partial step's Q and dO
//! before the products read them: the same operands the wg kernel's zero-filling copies give.

use super::convert::convert_rows;
use super::wg::{issue_dq, issue_keys_x_dim, step_grads, store_dk_dv, Place};
use super::{dq_turn_counter, grid_block, lse_index, sequences, step_walk, takes_key_block, DqTurn, KvArgs};
use crate::block::InteriorRows;
use crate::arch::cp_async::{commit_group, cp_async_4, wait_group};
use crate::arch::math::div_rem_u32;
use crate::arch::reg::opaque_u32;
use crate::arch::smem;
use crate::arch::sreg::{block_idx_y, grid_dim_x, thread_idx_x};
use crate::arch::sync::{fence_gpu, named_sync, sync_threads};
use crate::arch::wgmma::{self, fence_proxy_async_shared, sw128_offset};
use crate::arch::{mbarrier, tma};
use crate::fwd::wg::{wait_acc, WgElem};
use crate::params::{BwdParams, BwdTmaMaps, DQ_PASS_NO_FENCE};
use crate::pipeline::{Pipeline, Stage};
use crate::tile::{BF16, F16};
use crate::variants::{bwd_ws_dq_helpers, bwd_ws_smem_bytes, BWD_WG_BLOCK_M, BWD_WG_BLOCK_N, BWD_WS_BARRIER_BYTES, BWD_WS_STAGES, BWD_WS_THREADS, DQ_ACCUM_BLOCK_M};

const BN: usize = BWD_WG_BLOCK_N;
const BM: usize = BWD_WG_BLOCK_M;
const STAGES: u32 = BWD_WS_STAGES as u32;
const CONSUMERS: usize = 256;
/// Named barriers (0 is the block's): both consumer warpgroups.
const BAR_CONSUMERS: u32 = 1;
/// The dQ helper: lane 0 of the producer warpgroup's second warp.
const HELPER_TID: usize = 32;
/// Arrivals that fill the dQ buffer: both consumer warpgroups, at head dim 64 the one whose turn it is.
const DQ_PRODUCERS: [u32; 2] = [CONSUMERS as u32, 128];
/// Registers per thread after the split (the block starts at 168: 384 threads in 64K registers), the producer
/// warpgroup's and the consumers'. Where the consumers' accumulators leave room, more for the producer
/// warpgroup, whose copy warp and dQ helper spilled at 24 (the ordered helper reloaded its spills from L2 each
/// step: its turn spin's `ld.acquire` invalidates L1): at head dim 64, and at 96 in the `_det` twin only (its
/// default-mode twins ran 1-4% slower at 40 / 232; RESULTS.md, Deterministic backward).
const REGS: (u32, u32) = (24, 240);
const REGS_64: (u32, u32) = (56, 224);
const REGS_96_DET: (u32, u32) = (40, 232);
const _: () = {
    assert!(BWD_WS_THREADS == 128 + CONSUMERS);
    assert!(128 * REGS.0 + CONSUMERS as u32 * REGS.1 <= 168 * 384);
    assert!(128 * REGS_64.0 + CONSUMERS as u32 * REGS_64.1 <= 168 * 384);
    assert!(128 * REGS_96_DET.0 + CONSUMERS as u32 * REGS_96_DET.1 <= 168 * 384);
};
/// Arrivals that fill a step stage: the producer lane announcing the tensor copies' bytes, and the 32
/// lanes' arrivals once their lse_log2 and D copies have landed.
const STEP_PRODUCERS: u32 = 1 + 32;

/// Shared memory for head dim `D`: K and V (BN rows), `STAGES` stages of Q and of dO (BM rows), two dS^T
/// buffers (BN keys x BM queries, queries contiguous), the stages' lse_log2 and D rows, the barriers.
/// Tiles in 64-column groups (`DP` columns: the head dim rounded up), 128-byte swizzled, 1024-aligned.
struct Lay<const D: usize>;

impl<const D: usize> Lay<D> {
    const DP: usize = D.div_ceil(64) * 64;
    const KV: u32 = (BN * Self::DP * 2) as u32;
    const QT: u32 = (BM * Self::DP * 2) as u32;
    const DST: u32 = (BN * BM * 2) as u32;
    const K: u32 = 0;
    const V: u32 = Self::KV;
    const Q: u32 = 2 * Self::KV;
    const DO: u32 = Self::Q + STAGES * Self::QT;
    const DS: u32 = Self::DO + STAGES * Self::QT;
    const LSE: u32 = Self::DS + 2 * Self::DST;
    const DELTA: u32 = Self::LSE + STAGES * (BM * 4) as u32;
    /// A step's dQ (f32, `dq_offset`), where the consumers hand it to the helper.
    const DQ: u32 = Self::DELTA + STAGES * (BM * 4) as u32;
    const DQB: u32 = (BM * Self::DP * 4) as u32;
    const BARS: u32 = Self::DQ + Self::DQB;
    const CHECK: () = {
        assert!(D == 64 || D == 96 || D == 128);
        // Every head dim here hands dQ to the helper, in both modes (the dQ buffer's bytes).
        assert!(bwd_ws_dq_helpers(D));
        assert!(BN == 128 && BM == 64 && DQ_ACCUM_BLOCK_M % BM == 0);
        assert!(Self::LSE % 1024 == 0 && Self::DQ % 1024 == 0 && Self::BARS % 8 == 0);
        assert!(2 * Pipeline::<1>::BYTES + Pipeline::<STAGES>::BYTES <= BWD_WS_BARRIER_BYTES as u32);
        assert!((Self::BARS as usize + BWD_WS_BARRIER_BYTES) == bwd_ws_smem_bytes(D));
    };
    /// Stage `s`'s Q, dO, lse_log2 and D.
    #[inline(always)]
    fn stage(base: u32, s: u32) -> [u32; 4] {
        [base + Self::Q + s * Self::QT, base + Self::DO + s * Self::QT, base + Self::LSE + s * (BM * 4) as u32, base + Self::DELTA + s * (BM * 4) as u32]
    }
}

/// The pipelines: K/V (one stage, a key block's), the steps', and a step's dQ from the consumers (its
/// producers: every consumer thread arrives) to the helpers.
struct Pipes {
    kv: Pipeline<1>,
    step: Pipeline<STAGES>,
    dq: Pipeline<1>,
}

impl Pipes {
    #[inline(always)]
    fn at<const D: usize>(base: u32) -> Pipes {
        let bars = base + Lay::<D>::BARS;
        Pipes { kv: Pipeline::at(bars), step: Pipeline::at(bars + Pipeline::<1>::BYTES), dq: Pipeline::at(bars + Pipeline::<1>::BYTES + Pipeline::<STAGES>::BYTES) }
    }
}

/// Byte offset in the dQ buffer of (row, column `col`) of a step's dQ: the accumulator map's boxes of 64
/// rows x 32 f32 columns (128 bytes) in the copy engine's 128-byte swizzle, the layout of the bf16
/// tiles' 64-column groups (`sw128_offset`; the buffer 1024-aligned), so that a warp's `st.shared.v2`
/// of eight rows x four column pairs fills two wavefronts.
#[inline(always)]
pub(super) fn dq_offset(row: u32, col: u32) -> u32 {
    sw128_offset(BM as u32, row, col / 4) + (col % 4) * 4
}

/// The dQ helper: for every step of every key block, wait for the consumers' dQ, reduce its boxes into
/// the accumulator (q head `h`, rows from `m0`; rows past the map's end are skipped, rows past the
/// sequence inside it carry exact zeros, as the wg kernel's own adds: `wg::step_dq`), wait until the copy
/// engine has read the buffer, release it. With one CTA (grid x = 1) each step's reductions complete
/// before the release, so the consumers that wait for the last one convert dq with every add landed.
/// In the ordered deterministic mode (`ORDERED`) the helper waits for each step's turn (`DqTurn`, the
/// counter of the step's rows and column half 0) before its reductions and passes it on once they have
/// completed (as FA3's deterministic dQ writer): one f32 add order per element whichever CTA runs first.
/// Where the CTAs reach each query block at least two steps apart (`DqTurn::defers`: spread walks) it
/// passes a step's turn on after the next step's reductions are issued, so its wait for their completion
/// overlaps them.
#[inline(always)]
unsafe fn help_dq<const D: usize, const ORDERED: bool>(p: &BwdParams, maps: u64, pipes: &Pipes) {
    let base = smem::base();
    let dq_map = maps + 512;
    let single = grid_dim_x() == 1;
    let on = p.dq_accum != 0;
    if on {
        unsafe { tma::prefetch_map(dq_map) };
    }
    let mut ds = Stage::<1>::START;
    for_each_key_block::<ORDERED>(p, #[inline(always)] |_, _, args| {
        let Some(a) = args else { return };
        let (steps, next_step, mut cur) = step_walk::<ORDERED>(p, &a, BN as i32, BM as i32);
        let turn = DqTurn::of::<ORDERED>(p, &a, BN as i32, BM as i32);
        let defer = ORDERED && turn.defers();
        let fence = p.dq_rotate & DQ_PASS_NO_FENCE == 0;
        // A deferred turn (`DqTurn::defers`): the last step's counter and rows, passed on once the next
        // step's reductions are issued and its own have completed.
        let mut pending: Option<(u64, i32)> = None;
        let (q_row, _, b) = a.map_origin(p);
        let mut it = 0;
        while it < steps {
            let (h, m0) = (cur.0, cur.1 * BM as i32);
            cur = next_step(cur);
            let counter = if ORDERED { dq_turn_counter(p, a.bidb, a.sq.start + m0, h, 0) } else { 0 };
            unsafe {
                pipes.dq.consumer_wait(ds);
                if ORDERED {
                    turn.wait_alone(counter, m0, BM as i32);
                }
                if on {
                    for c in 0..D / 32 {
                        tma::reduce_add_4d(base + Lay::<D>::DQ + (c * BM * 128) as u32, dq_map, [(32 * c) as i32, q_row + m0, h, b]);
                    }
                    tma::bulk_commit();
                    if single {
                        tma::bulk_wait::<0>();
                        fence_gpu();
                    } else {
                        tma::bulk_wait_read::<0>();
                    }
                }
                pipes.dq.consumer_release(ds);
                if defer {
                    // The last step's reductions (every group but this step's) complete before its turn
                    // passes on.
                    if let Some((c, r)) = pending {
                        tma::bulk_wait::<1>();
                        turn.pass_alone(c, r, BM as i32, fence);
                    }
                    pending = Some((counter, m0));
                } else if ORDERED {
                    // The reductions complete before the next CTA's turn.
                    tma::bulk_wait::<0>();
                    turn.pass_alone(counter, m0, BM as i32, fence);
                }
            }
            ds.advance();
            it += 1;
        }
        if let Some((c, r)) = pending {
            unsafe {
                tma::bulk_wait::<0>();
                turn.pass_alone(c, r, BM as i32, fence);
            }
        }
    });
    unsafe { tma::bulk_wait::<0>() };
}

/// The key blocks this CTA walks (grid x strides over them, as the wg kernel's): `f(slice, n0, args)` for
/// each, `args` when the block has keys of the sequence. Returns the CTA's grid slice.
#[inline(always)]
fn for_each_key_block<const ORDERED: bool>(p: &BwdParams, mut f: impl FnMut(i32, i32, Option<KvArgs>)) -> i32 {
    let hk = block_idx_y() as i32;
    // The ordered deterministic mode: one key block per CTA, in reverse (CTA x - 1 holds the next block,
    // whose dq adds come first: on a causal mask it reaches each query block first).
    let (bidb, mut n_block) = grid_block(p, BN as i32, true, ORDERED);
    let (sq, sk) = sequences(p, bidb);
    // Unchecked (`div_rem_u32`): h_k >= 1 by validation.
    let group = div_rem_u32(p.h as u32, p.h_k as u32).0 as i32;
    while n_block * (BN as i32) < sk.slot_len {
        let n0 = n_block * BN as i32;
        let args = (n0 < sk.used && takes_key_block::<ORDERED>(n_block)).then(|| KvArgs { bidb, hk, group, sq, sk, n0, cols: if sk.used - n0 < BN as i32 { sk.used - n0 } else { BN as i32 } });
        f(bidb, n0, args);
        n_block += grid_dim_x() as i32;
    }
    bidb
}

/// The producer warp: for every key block with steps, K and V, then each step's Q, dO (lane 0, tensor
/// copies) and lse_log2, D (every lane, two rows each of both, zero-filled past the sequence).
#[inline(always)]
unsafe fn produce<const D: usize, const ORDERED: bool>(p: &BwdParams, maps: u64, pipes: &Pipes, lane: u32) {
    let base = smem::base();
    let (q_map, k_map, v_map, do_map) = (maps, maps + 128, maps + 256, maps + 384);
    if lane == 0 {
        unsafe {
            for m in [q_map, k_map, v_map, do_map] {
                tma::prefetch_map(m);
            }
        }
    }
    let groups = D.div_ceil(64);
    let mut kvs = Stage::<1>::START;
    let mut ss = Stage::<STAGES>::START;
    for_each_key_block::<ORDERED>(p, #[inline(always)] |_, _, args| {
        let Some(a) = args else { return };
        let (steps, next_step, mut cur) = step_walk::<ORDERED>(p, &a, BN as i32, BM as i32);
        if steps == 0 {
            return;
        }
        let (q_row, k_row, b) = a.map_origin(p);
        if lane == 0 {
            unsafe {
                pipes.kv.producer_acquire(kvs);
                let bar = pipes.kv.producer_expect(kvs, 2 * Lay::<D>::KV);
                for c in 0..groups {
                    let col = (c * 64) as i32;
                    tma::load_4d(base + Lay::<D>::K + (c * BN * 128) as u32, k_map, [col, k_row + a.n0, a.hk, b], bar);
                    tma::load_4d(base + Lay::<D>::V + (c * BN * 128) as u32, v_map, [col, k_row + a.n0, a.hk, b], bar);
                }
            }
        }
        kvs.advance();
        let mut it = 0;
        while it < steps {
            let (h, m0) = (cur.0, cur.1 * BM as i32);
            cur = next_step(cur);
            let [q_s, do_s, lse_s, delta_s] = Lay::<D>::stage(base, ss.index);
            unsafe {
                // Every lane waits: its cp.async writes the stage too.
                pipes.step.producer_acquire(ss);
                if lane == 0 {
                    let bar = pipes.step.producer_expect(ss, 2 * Lay::<D>::QT);
                    for c in 0..groups {
                        let col = (c * 64) as i32;
                        tma::load_4d(q_s + (c * BM * 128) as u32, q_map, [col, q_row + m0, h, b], bar);
                        tma::load_4d(do_s + (c * BM * 128) as u32, do_map, [col, q_row + m0, h, b], bar);
                    }
                }
                let rows = a.sq.used - m0;
                for half in 0..2u32 {
                    let r = (lane + 32 * half) as i32;
                    let valid = r < rows;
                    let at = if valid { lse_index(p, a.bidb, a.sq.start, h, m0 + r) as u64 * 4 } else { 0 };
                    cp_async_4(lse_s + r as u32 * 4, p.lse_log2.wrapping_add(at), valid);
                    cp_async_4(delta_s + r as u32 * 4, p.delta.wrapping_add(at), valid);
                }
                // Each lane waits for its own copies, then arrives (a release of what they wrote): the
                // form compute-sanitizer's racecheck follows. With `cp.async.mbarrier.arrive.noinc`
                // instead (the copies completing on the barrier by themselves) racecheck reported
                // hazards between these copies and the consumers' reads under some host allocation
                // patterns (PyTorch's caching allocator, a pool; RESULTS, Host side).
                commit_group();
                wait_group::<0>();
                mbarrier::arrive(pipes.step.full_barrier(ss));
            }
            ss.advance();
            it += 1;
        }
    });
}

/// Zero rows `[valid, ROWS)` of a `ROWS`-row swizzled tile at `tile` (`D` columns in 64-column groups):
/// by every consumer thread, then visible to wgmma and to both warpgroups (a consumer barrier).
#[inline(always)]
unsafe fn zero_rows<const D: usize, const ROWS: usize>(tiles: [u32; 2], valid: i32, ctid: usize) {
    let chunks = D.div_ceil(64) * 8;
    let n = (ROWS - valid as usize) * chunks;
    let mut idx = ctid;
    while idx < n {
        let (r, c) = ((valid as usize + idx / chunks) as u32, (idx % chunks) as u32);
        for t in tiles {
            unsafe { smem::st_v4(t + sw128_offset(ROWS as u32, r, c), [0; 4]) };
        }
        idx += CONSUMERS;
    }
    fence_proxy_async_shared();
    named_sync(BAR_CONSUMERS, CONSUMERS as u32);
}

/// Where a consumer thread stands: its pipelines' stages and the steps it ran (dS^T buffer parity, and
/// the head dim 64 warpgroups' dQ turns).
struct Consumer {
    kv: Stage<1>,
    step: Stage<STAGES>,
    dq: Stage<1>,
    steps_done: u32,
}

/// One key block's steps for this consumer thread (`ctid`, warpgroup `ctid / 128` with keys 64 wg..): the
/// wg kernel's `block` on pipeline stages; `leader` releases K and V for its warpgroup, every thread the
/// step stages.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn consume<E: WgElem, const D: usize, const DN: usize, const MODS: bool, const ORDERED: bool>(p: &BwdParams, a: &KvArgs, pipes: &Pipes, st: &mut Consumer, ctid: usize, leader: bool, acc_dk: &mut [[f32; 4]; DN], acc_dv: &mut [[f32; 4]; DN]) {
    let base = smem::base();
    let (steps, next_step, mut cur) = step_walk::<ORDERED>(p, a, BN as i32, BM as i32);
    if steps == 0 {
        return;
    }
    let interior = InteriorRows::of(a.n0, BN as i32, a.sq.used, a.sk.used, p.window_left, p.window_right);
    let (k_s, v_s) = (base + Lay::<D>::K, base + Lay::<D>::V);
    unsafe { pipes.kv.consumer_wait(st.kv) };
    if a.cols < BN as i32 {
        unsafe { zero_rows::<D, BN>([k_s, v_s], a.cols, ctid) };
    }
    let mut it = 0;
    while it < steps {
        let base = opaque_u32(base);
        let ctid = opaque_u32(ctid as u32) as usize;
        let Place { wg, t, key0, .. } = Place::of(ctid);
        let (h, m0) = (cur.0, cur.1 * BM as i32);
        cur = next_step(cur);
        let rows = a.sq.used - m0;
        let [q_s, do_s, lse_s, delta_s] = Lay::<D>::stage(base, st.step.index);
        unsafe { pipes.step.consumer_wait(st.step) };
        if rows < BM as i32 {
            unsafe { zero_rows::<D, BM>([q_s, do_s], rows, ctid) };
        }

        // dS^T to this step's buffer.
        let parity = st.steps_done & 1;
        let ds_s = base + Lay::<D>::DS + parity * Lay::<D>::DST;
        let (mut pa, mut da) = unsafe { step_grads::<E, D, MODS>(p, a, interior, [k_s, v_s], [q_s, do_s, lse_s, delta_s], ds_s, h, m0, wg, key0, t) };
        // dV += P^T dO and dK += dS^T Q. Where both warpgroups hand the helper dQ every step (`dq_first`:
        // head dims 96 / 128), dK is issued after dQ, so that dQ's wait leaves dK's product in flight
        // under the dQ buffer's stores (0.97-0.98x the time, RESULTS.md, Backward). Not at 64, where the
        // warpgroups take the steps' dQ in turns: there synccheck reported divergent barriers.
        let dq_first = D != 64;
        unsafe {
            issue_keys_x_dim::<E, D, DN>(acc_dv, &pa, do_s);
            if !dq_first {
                issue_keys_x_dim::<E, D, DN>(acc_dk, &da, q_s);
            }
        }
        // Both warpgroups' dS^T is in the buffer.
        named_sync(BAR_CONSUMERS, CONSUMERS as u32);

        // dQ (at d64 on the warpgroups in turn) to the helper.
        if D != 64 || wg == parity {
            let dk = if dq_first { Some((&mut *acc_dk, &da, q_s)) } else { None };
            unsafe { hand_dq::<E, D, DN>(pipes, &mut st.dq, ds_s, k_s, wg, ctid, dk) };
        } else {
            // The other warpgroup fills the buffer this step: both keep count of the fills.
            st.dq.advance();
        }
        wait_acc::<0, DN>(acc_dv);
        wait_acc::<0, DN>(acc_dk);
        wgmma::keep_a4(&mut pa);
        wgmma::keep_a4(&mut da);
        // This thread is done with the stage (its reads of lse_log2 and D, and its warpgroup's products,
        // which have landed). Every consumer thread arrives, not one per warpgroup: the bar.sync above
        // orders all their reads before a leader's arrival too, but racecheck (compute-sanitizer
        // 2025.3) reported hazards on these rows under some host allocation patterns until both this
        // and the producer lanes' plain arrivals were in (RESULTS, Host side).
        unsafe { pipes.step.consumer_release(st.step) };
        st.step.advance();
        st.steps_done += 1;
        it += 1;
    }
    // K and V are read (the last dQ product has landed).
    if leader {
        unsafe { pipes.kv.consumer_release(st.kv) };
    }
    st.kv.advance();
}

/// A step's dQ = dS K for warpgroup `wg` (its 64 head-dim columns, at 64 all: `step_dq`'s product) into
/// the dQ buffer once the helper released it, visible to the copy engine, then this thread's arrival on
/// its full barrier. With `dk` (dK += dS^T Q: the accumulator, dS^T's A fragments, Q) that product is
/// issued right after dQ's and left in flight (the caller waits for it), under the buffer's stores.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn hand_dq<E: WgElem, const D: usize, const DN: usize>(pipes: &Pipes, ds: &mut Stage<1>, ds_s: u32, k_s: u32, wg: u32, ctid: usize, dk: Option<(&mut [[f32; 4]; DN], &[[u32; 4]; 4], u32)>) {
    // Head-dim columns c0.. (at 64 all of them, one warpgroup per step).
    let c0 = if D != 64 { 64 * wg } else { 0 };
    let mut acc_q = unsafe { issue_dq::<E>(ds_s, k_s, c0) };
    if let Some((acc_dk, da, q_s)) = dk {
        unsafe { issue_keys_x_dim::<E, D, DN>(acc_dk, da, q_s) };
        wgmma::wait1_n64(&mut acc_q);
    } else {
        wgmma::wait0_n64(&mut acc_q);
    }
    let dq_s = smem::base() + Lay::<D>::DQ;
    // This thread's rows 16 (warp % 4) + g (+ 8), columns c0 + 8 j + 2 t (+ 1).
    let (lane, warp) = ((ctid % 32) as u32, ((ctid / 32) % 4) as u32);
    let row = 16 * warp + lane / 4;
    let col = c0 + 2 * (lane % 4);
    unsafe {
        pipes.dq.producer_acquire(*ds);
        for j in 0..8u32 {
            for half in 0..2u32 {
                let k = (2 * half) as usize;
                smem::st_v2_f32(dq_s + dq_offset(row + 8 * half, col + 8 * j), [acc_q[j as usize][k], acc_q[j as usize][k + 1]]);
            }
        }
        fence_proxy_async_shared();
        mbarrier::arrive(pipes.dq.full_barrier(*ds));
    }
    ds.advance();
}

/// Kernel body: barriers set up by thread 0, then the roles. Keys of no sequence get dk = dv = 0; with
/// grid x = 1 the consumers also convert dq of the group's rows (as the wg kernel).
#[inline(always)]
unsafe fn entry<E: WgElem, const D: usize, const DN: usize, const MODS: bool, const ORDERED: bool>(p: &BwdParams, maps: u64) {
    let () = Lay::<D>::CHECK;
    let tid = thread_idx_x() as usize;
    let pipes = Pipes::at::<D>(smem::base());
    if tid == 0 {
        unsafe {
            pipes.kv.init(2);
            pipes.step.init_with(STEP_PRODUCERS, CONSUMERS as u32);
            pipes.dq.init_with(DQ_PRODUCERS[(D == 64) as usize], 1);
        }
        mbarrier::fence_init();
    }
    sync_threads();
    if tid < 128 {
        if D == 64 {
            tma::regs_dec::<{ REGS_64.0 }>();
        } else if D == 96 && ORDERED {
            tma::regs_dec::<{ REGS_96_DET.0 }>();
        } else {
            tma::regs_dec::<{ REGS.0 }>();
        }
        if tid < 32 {
            unsafe { produce::<D, ORDERED>(p, maps, &pipes, tid as u32) };
        } else if tid == HELPER_TID {
            unsafe { help_dq::<D, ORDERED>(p, maps, &pipes) };
        }
        return;
    }
    if D == 64 {
        tma::regs_inc::<{ REGS_64.1 }>();
    } else if D == 96 && ORDERED {
        tma::regs_inc::<{ REGS_96_DET.1 }>();
    } else {
        tma::regs_inc::<{ REGS.1 }>();
    }
    let ctid = tid - 128;
    let leader = ctid % 128 == 0;
    let Place { t, key0, .. } = Place::of(ctid);
    let mut st = Consumer { kv: Stage::START, step: Stage::START, dq: Stage::START, steps_done: 0 };
    let hk = block_idx_y() as i32;
    let bidb = for_each_key_block::<ORDERED>(p, #[inline(always)] |bidb, n0, args| {
        let mut acc_dk = [[0f32; 4]; DN];
        let mut acc_dv = [[0f32; 4]; DN];
        let sk = match &args {
            Some(a) => {
                unsafe { consume::<E, D, DN, MODS, ORDERED>(p, a, &pipes, &mut st, ctid, leader, &mut acc_dk, &mut acc_dv) };
                a.sk
            }
            None => sequences(p, bidb).1,
        };
        unsafe { store_dk_dv::<E, D, DN>(p, &sk, bidb, hk, n0, &acc_dk, &acc_dv, key0, t) };
    });
    if grid_dim_x() == 1 {
        // The helper released the last step's dQ: its reductions have landed (`help_dq`).
        unsafe { pipes.dq.producer_acquire(st.dq) };
        fence_gpu();
        named_sync(BAR_CONSUMERS, CONSUMERS as u32);
        let (sq, _) = sequences(p, bidb);
        let group = div_rem_u32(p.h as u32, p.h_k as u32).0 as i32;
        let mut h = hk * group;
        while h < (hk + 1) * group {
            unsafe { convert_rows::<E, CONSUMERS, 4>(p, bidb, &sq, h, 0, sq.slot_len, ctid) };
            h += 1;
        }
    }
}

macro_rules! bwd_ws_kernels {
    ($(($d:literal, $dt:ident, $name:expr)),* $(,)?) => {$(
        const _: () = {
            #[unsafe(export_name = $name)]
            pub unsafe extern "ptx-kernel" fn kernel(p: BwdParams, _maps: BwdTmaMaps) {
                let maps = crate::param_address!(concat!($name, "_param_1"));
                unsafe { entry::<$dt, $d, { ($d as usize).div_ceil(64) * 8 }, false, false>(&p, maps) }
            }
            // With score modifiers (`BwdParams::mods`), as the wg kernel's `_mods` twin.
            #[unsafe(export_name = concat!($name, "_mods"))]
            pub unsafe extern "ptx-kernel" fn kernel_mods(p: BwdParams, _maps: BwdTmaMaps) {
                let maps = crate::param_address!(concat!($name, "_mods_param_1"));
                unsafe { entry::<$dt, $d, { ($d as usize).div_ceil(64) * 8 }, true, false>(&p, maps) }
            }
            /// ALiBi without dropout: the parameters' dropout set off, so the compiler drops its code.
            #[unsafe(export_name = concat!($name, "_alibi"))]
            pub unsafe extern "ptx-kernel" fn kernel_alibi(p: BwdParams, _maps: BwdTmaMaps) {
                let maps = crate::param_address!(concat!($name, "_alibi_param_1"));
                let p = BwdParams { mods: p.mods.without_dropout(), ..p };
                unsafe { entry::<$dt, $d, { ($d as usize).div_ceil(64) * 8 }, true, false>(&p, maps) }
            }
            // The ordered deterministic mode (`BwdParams::dq_sem`).
            #[unsafe(export_name = concat!($name, "_det"))]
            pub unsafe extern "ptx-kernel" fn kernel_det(p: BwdParams, _maps: BwdTmaMaps) {
                let maps = crate::param_address!(concat!($name, "_det_param_1"));
                unsafe { entry::<$dt, $d, { ($d as usize).div_ceil(64) * 8 }, false, true>(&p, maps) }
            }
        };
    )*};
}
crate::for_each_bwd_ws_variant!(bwd_ws_kernels);
