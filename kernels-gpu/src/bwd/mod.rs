//! Attention backward on tensor cores (flash-attention 2's algorithm), four kernels:
//!   prep:    D_i = dout_i . out_i and the LSE in base 2 (+inf for a row that saw no key, so P = 0);
//!            the dq accumulator zeroed on every row the dk/dv kernels add to (atomic path);
//!   dk/dv:   a block owns `BN` keys of one kv head and walks every q head of its group and every query
//!            block that sees the keys: S^T = K Q^T, dP^T = V dO^T, P = exp2(S scale - lse),
//!            dS = P (dP - D) [x (1 - tanh^2) with softcap], dV += P^T dO, dK += dS^T Q; with a dq
//!            accumulator it also adds dQ = dS K to it with f32 atomics (the default path);
//!   dq:      the deterministic path's dq on mma.sync: a block owns query rows and walks their key tiles
//!            (like the forward), dQ += dS K in registers: every sum has one fixed order (on Hopper the
//!            deterministic mode keeps the wgmma dK/dV kernel instead: its CTAs walk fixed key blocks,
//!            each adding into its own copy of the accumulator, `BwdParams::dq_splits`);
//!   convert: dq = scale * accumulator in the input type (the Hopper dK/dV kernel does it itself when one
//!            CTA walks all key blocks of its sequence and kv head).
//! dK/dV sum over the group's q heads inside one block, so they never need atomics. Rows and keys of no
//! sequence (seqused padding, tail rows) get zero gradients, written here.

mod convert;
mod dkdv;
mod dq;
mod prep;
// Hopper dK/dV kernels on wgmma (atomic dq): 128 keys per block at head dims 64, 96 and 128, 64 at 192
// and 256.
#[cfg(fa_sm90)]
mod wg;
#[cfg(fa_sm90)]
mod wide;
// The warp-specialized one (bulk tensor copies by a producer warpgroup) at 64, 96 and 128.
#[cfg(fa_sm90)]
mod ws;

use crate::arch::math::{exp2, fma, sub_abs_fma, tanh};
use crate::arch::mem::ld_i32_at;
use crate::arch::sreg::{block_idx_x, block_idx_z, grid_dim_x};
use crate::arch::smem;
use crate::block::m_block_range;
use crate::mask::for_each_hidden_kq;
use crate::mods::{keep_kq, kq_bit, HeadMods};
use crate::params::{BwdParams, DQ_ROTATE, DQ_ROTATE_SPREAD};
use crate::seqlen::SeqlenInfo;

/// The (q, k) sequences of grid slice `bidb` (`seqlen::Lengths::slice`).
#[inline(always)]
fn sequences(p: &BwdParams, bidb: i32) -> (SeqlenInfo, SeqlenInfo) {
    p.lengths().slice(bidb, ld_i32_at)
}

/// This CTA's grid slice and first block of `bm` query rows (`keys`: keys), from which it strides by grid
/// x: slice z from block x (`rev`: `gx - 1 - x`); with slot scheduling (`BwdParams::slots`, never with
/// `rev`) grid x's slot (`seqlen::Lengths::slot_block`), grid x being the slot count.
#[inline(always)]
fn grid_block(p: &BwdParams, bm: i32, keys: bool, rev: bool) -> (i32, i32) {
    let (x, gx) = (block_idx_x() as i32, grid_dim_x() as i32);
    if !rev && p.slots != 0 {
        p.lengths().slot_block(x, bm, keys, gx, ld_i32_at)
    } else {
        (block_idx_z() as i32, if rev { gx - 1 - x } else { x })
    }
}

/// Whether a dK/dV CTA takes key block `n_block` of its grid-strided walk: always, but in the ordered
/// deterministic mode (`ORDERED`) only the first, as its turns hold one key block per CTA. A grid short of
/// the sequence's key blocks (a max_seqlen_k below its key count, invalid input) then leaves the rest at
/// dk = dv = 0 rather than wait for a turn that has passed.
#[inline(always)]
fn takes_key_block<const ORDERED: bool>(n_block: i32) -> bool {
    !ORDERED || n_block < grid_dim_x() as i32
}

/// Byte address of row `row` (of sequence `bidb`, head `h`) in a 16-bit operand.
#[inline(always)]
fn row_addr(base: u64, batch_stride: i64, row_stride: i64, head_stride: i64, b: i32, row: i32, h: i32) -> u64 {
    base.wrapping_add(((b as i64 * batch_stride + row as i64 * row_stride + h as i64 * head_stride) * 2) as u64)
}

/// Index of the LSE-shaped workspace entry of (sequence `b` starting at packed row `start`, head `h`, row).
#[inline(always)]
fn lse_index(p: &BwdParams, b: i32, start: i32, h: i32, row: i32) -> i64 {
    b as i64 * p.lse_batch_stride + h as i64 * p.lse_head_stride + start as i64 + row as i64
}

/// Byte address of column `col` of packed row `row` (head `h`, sequence slice `b`) in the f32 dq
/// accumulator.
#[inline(always)]
fn dqa_addr(p: &BwdParams, b: i32, row: i32, h: i32, col: i64) -> u64 {
    p.dq_accum.wrapping_add(((b as i64 * p.dqa_batch_stride + row as i64 * p.dqa_row_stride + h as i64 * p.dqa_head_stride + col) * 4) as u64)
}

/// `dqa_addr` in this CTA's copy of the accumulator: copy `block_idx_x` in the deterministic backward
/// on Hopper (`BwdParams::dq_splits`), else the one copy (stride 0).
#[cfg(fa_sm90)]
#[inline(always)]
fn dqa_addr_split(p: &BwdParams, b: i32, row: i32, h: i32) -> u64 {
    let split = crate::arch::sreg::block_idx_x() as i64 * p.dqa_split_stride;
    dqa_addr(p, b, row, h, 0).wrapping_add((split * 4) as u64)
}

/// The ordered deterministic mode's turn counter (`BwdParams::dq_sem`) of accumulator row `row` (its
/// step's first, from the sequence's start) of sequence `b`, q head `h`, column half `half`: prep zeroes
/// it, the dK/dV kernels wait on it and pass it on (`DqTurn`).
#[inline(always)]
fn dq_turn_counter(p: &BwdParams, b: i32, row: i32, h: i32, half: u32) -> u64 {
    let at = b as i64 * p.sem_batch_stride + (row as i64 * p.h as i64 + h as i64) * 2 + half as i64;
    p.dq_sem.wrapping_add((at * 4) as u64)
}

/// The ordered deterministic mode's turns (`BwdParams::dq_sem`) for one key block: this CTA's index `x`
/// among its (sequence, kv head)'s (it takes key block `gx - 1 - x`), and the query blocks `[pred.0,
/// pred.1)` its predecessor (CTA x - 1, the key block one higher) adds dq to, each after which it writes
/// x into that (row block, head, half)'s counter: there this CTA waits for x before its own adds.
#[cfg(fa_sm90)]
#[derive(Clone, Copy)]
pub(super) struct DqTurn {
    pub x: u32,
    pub pred: (i32, i32),
    /// The rotated walk (`rotation`): the sequence's key blocks n (0: not rotated); `x` is then the key
    /// block's index kb.
    pub rot_n: i32,
    /// With spread starts (`Rotation::spread`): the sequence's query blocks M; else 0.
    pub rot_m: i32,
}

#[cfg(fa_sm90)]
impl DqTurn {
    /// The turns of key block `a` (CTA x), whose predecessor's block starts `bn` keys later; outside the
    /// ordered mode (`ORDERED` false) none, unused.
    #[inline(always)]
    pub(super) fn of<const ORDERED: bool>(p: &BwdParams, a: &KvArgs, bn: i32, bm: i32) -> DqTurn {
        if !ORDERED {
            return DqTurn { x: 0, pred: (0, 0), rot_n: 0, rot_m: 0 };
        }
        if let Some(r) = rotation(p, a, bn, bm) {
            return DqTurn { x: r.kb as u32, pred: (0, 0), rot_n: r.n, rot_m: if r.spread { r.m } else { 0 } };
        }
        let n0 = a.n0 + bn;
        let pred = if n0 < a.sk.used {
            let cols = if a.sk.used - n0 < bn { a.sk.used - n0 } else { bn };
            m_block_range(n0, cols, a.sq.used, a.sk.used, p.window_left, p.window_right, bm)
        } else {
            (0, 0)
        };
        DqTurn { x: crate::arch::sreg::block_idx_x(), pred, rot_n: 0, rot_m: 0 }
    }

    /// The counter value query block `m` shows when this CTA's turn comes, and whether it waits for it.
    /// Rotated (`rot_n` = n): the key blocks reach m in the order last, .., 0, n - 1, .., last + 1, where
    /// last is the highest key block whose walk starts at or before m: min(m, n - 1) where key block kb
    /// starts at kb, ((m + 1) n - 1) / M where it starts at floor(kb M / n) (spread); kb's turn is
    /// (last - kb) mod n, and it always waits (turn 0 finds the counter prep zeroed). Otherwise x, waited
    /// for where CTA x - 1 adds to m too.
    #[inline(always)]
    fn turn(&self, m: i32) -> (u32, bool) {
        if self.rot_n > 0 {
            let last = if self.rot_m > 0 {
                crate::arch::math::div_rem_u32(((m + 1) * self.rot_n - 1) as u32, self.rot_m as u32).0 as i32
            } else if m < self.rot_n - 1 {
                m
            } else {
                self.rot_n - 1
            };
            let d = last - self.x as i32;
            ((if d < 0 { d + self.rot_n } else { d }) as u32, true)
        } else {
            (self.x, self.pred.0 <= m && m < self.pred.1)
        }
    }

    /// Waits for this step's turn on `counter` (the step's row block starts at `m0`, `bm` rows per block)
    /// where CTA x - 1 adds to the same rows: the warpgroup's `leader` spins with `ld.acquire` until that
    /// CTA passed the turn on, and the warpgroup meets at named barrier `bar`.
    #[inline(always)]
    pub(super) unsafe fn wait(&self, counter: u64, m0: i32, bm: i32, leader: bool, bar: u32) {
        let (turn, waits) = self.turn(m0 / bm);
        if waits {
            if leader {
                while unsafe { crate::arch::mem::ld_acquire_gpu_u32(counter) } != turn {}
            }
            crate::arch::sync::named_sync(bar, 128);
        }
    }

    /// Whether this CTA may pass a step's turn on after its next step's adds were issued: spread starts
    /// and M >= 2 n, so that consecutive key blocks reach each query block at least two steps apart
    /// (floor(M / n) >= 2 between starts, ceil(M / n) across the wrap), and a step's turn waits only on
    /// turns of earlier steps.
    #[inline(always)]
    pub(super) fn defers(&self) -> bool {
        self.rot_m > 0 && 2 * self.rot_n <= self.rot_m
    }

    /// `wait` for a lone thread (the ws kernel's dQ helper, `bwd::ws`): spins with `ld.acquire` until
    /// CTA x - 1 passed the turn on, where it adds to the same rows.
    #[inline(always)]
    pub(super) unsafe fn wait_alone(&self, counter: u64, m0: i32, bm: i32) {
        let (turn, waits) = self.turn(m0 / bm);
        if waits {
            while unsafe { crate::arch::mem::ld_acquire_gpu_u32(counter) } != turn {}
        }
    }

    /// `pass` for a lone thread whose reductions have completed (`tma::bulk_wait`: the wait, then
    /// `fence.proxy.async.global`): the `st.release` of this CTA's turn + 1, after a `fence.acq_rel.gpu`
    /// only with `fence` (`BwdParams::dq_rotate` bit 2 clear). Without it the deferred pass
    /// (`DqTurn::defers`) ran 0.84x the time at head dim 64 (RESULTS.md, Deterministic backward): the fence
    /// also waited for the next step's reductions in flight.
    #[inline(always)]
    pub(super) unsafe fn pass_alone(&self, counter: u64, m0: i32, bm: i32, fence: bool) {
        if fence {
            crate::arch::sync::fence_gpu();
        }
        unsafe { crate::arch::mem::st_release_gpu_u32(counter, self.turn(m0 / bm).0 + 1) };
    }

    /// Passes the turn on (the counter to this CTA's turn + 1: CTA x + 1's, or the next key block to
    /// reach query block `m0 / bm` in the rotated walk) once every thread of the warpgroup has made its
    /// reductions: named barrier `bar`, then the `leader`'s `st.release` (cumulative: it releases the
    /// reductions the barrier ordered before it, as CUTLASS's semaphore releases a block's stores). No
    /// fence in every thread: `fence.acq_rel.gpu` is a MEMBAR.GPU and an L1 invalidation (CCTL.IVALL) in
    /// each warp, every step.
    #[inline(always)]
    pub(super) unsafe fn pass(&self, counter: u64, m0: i32, bm: i32, leader: bool, bar: u32) {
        crate::arch::sync::named_sync(bar, 128);
        if leader {
            unsafe { crate::arch::mem::st_release_gpu_u32(counter, self.turn(m0 / bm).0 + 1) };
        }
    }
}

/// P of one visible score without softcap: `s` = q.k, `lse2` the row's LSE in base 2 (less ALiBi's
/// base-2 bias, with score modifiers).
#[inline(always)]
fn prob_plain(p: &BwdParams, s: f32, lse2: f32) -> f32 {
    exp2(fma(s, p.scale_log2, -lse2))
}

/// The same with softcap: the score is `tanh(s * softcap_pre)` (times scale_log2); P and that tanh, whose
/// derivative `1 - tanh^2` multiplies dS.
#[inline(always)]
fn prob_softcap(p: &BwdParams, s: f32, lse2: f32) -> (f32, f32) {
    let t = tanh(s * p.softcap_pre);
    (exp2(fma(t, p.scale_log2, -lse2)), t)
}

/// P and dS of one visible score without softcap (`prob_plain`): `dp` = dout . v, `delta` = D_i.
#[inline(always)]
fn grad_elem_plain(p: &BwdParams, s: f32, dp: f32, lse2: f32, delta: f32) -> (f32, f32) {
    let pr = prob_plain(p, s, lse2);
    (pr, pr * (dp - delta))
}

/// The same with softcap (`prob_softcap`).
#[inline(always)]
fn grad_elem_softcap(p: &BwdParams, s: f32, dp: f32, lse2: f32, delta: f32) -> (f32, f32) {
    let (pr, t) = prob_softcap(p, s, lse2);
    (pr, pr * (dp - delta) * (1.0 - t * t))
}

/// `grad_elem_plain` with dropout: `(P z, P (z dP - D))` as `(P z, (P z) dP - P D)`, `z` being 1 / (1 - p)
/// where the score is kept and 0 where dropped (one multiply and the select more than the plain step).
#[inline(always)]
fn grad_elem_plain_drop(p: &BwdParams, s: f32, dp: f32, lse2: f32, delta: f32, z: f32) -> (f32, f32) {
    let pr = prob_plain(p, s, lse2);
    let pz = pr * z;
    (pz, fma(pz, dp, -(pr * delta)))
}

/// `grad_elem_softcap` with dropout, as `grad_elem_plain_drop`.
#[inline(always)]
fn grad_elem_softcap_drop(p: &BwdParams, s: f32, dp: f32, lse2: f32, delta: f32, z: f32) -> (f32, f32) {
    let (pr, t) = prob_softcap(p, s, lse2);
    let pz = pr * z;
    (pz, fma(pz, dp, -(pr * delta)) * (1.0 - t * t))
}

// ---------------------------------------------------------------------------------------------------
// Shared by the dk/dv kernels (mma.sync, dkdv.rs, and wgmma, wg.rs): the walk and the element-wise step.

/// One key block's view of its sequence and head, fixed over the walk.
pub(super) struct KvArgs {
    bidb: i32,
    hk: i32,
    group: i32,
    sq: SeqlenInfo,
    sk: SeqlenInfo,
    n0: i32,
    cols: i32,
}

impl KvArgs {
    /// Where this key block's sequence starts in the 4-d tensor maps (Q, K, V, dO and the dq
    /// accumulator: columns, rows, heads, batches): varlen, at its packed rows of batch 0; dense, at row 0
    /// of batch `bidb`. Returns (Q's first row, K's first row, batch).
    #[cfg(fa_sm90)]
    #[inline(always)]
    fn map_origin(&self, p: &BwdParams) -> (i32, i32, i32) {
        if p.cu_seqlens_q != 0 { (self.sq.start, self.sk.start, 0) } else { (0, 0, self.bidb) }
    }
}

/// The steps a key block walks, (q head, query block) in order: head-major over its group, query blocks
/// `m_min..m_max` of `bm` rows (those that see its keys). Returns the step count, the successor of a step
/// and the first step. Counters, not `it / m_count`: a division by a runtime value costs dozens of
/// instructions per step. In the ordered mode's rotated walk (`rotation`) each head's query blocks start
/// at this key block's index kb and wrap: kb, kb + 1, .., m_max - 1, m_min, .., kb - 1.
#[inline(always)]
fn step_walk<const ORDERED: bool>(p: &BwdParams, a: &KvArgs, bn: i32, bm: i32) -> (i32, impl Fn((i32, i32)) -> (i32, i32), (i32, i32)) {
    let (m_min, m_max) = m_block_range(a.n0, a.cols, a.sq.used, a.sk.used, p.window_left, p.window_right, bm);
    let m_count = if m_max > m_min { m_max - m_min } else { 0 };
    let start = if ORDERED { rotation(p, a, bn, bm).map_or(m_min, |r| r.start) } else { m_min };
    let next = move |(h, m): (i32, i32)| {
        if !ORDERED {
            if m + 1 < m_max { (h, m + 1) } else { (h + 1, m_min) }
        } else {
            let m2 = if m + 1 < m_max { m + 1 } else { m_min };
            if m2 == start { (h + 1, start) } else { (h, m2) }
        }
    };
    (m_count * a.group, next, (a.hk * a.group, start))
}

/// The ordered mode's rotated walk (`BwdParams::dq_rotate`) for key block `a` (`bn` keys per block, `bm`
/// query rows per step), where the host allows it and every key block of the sequence sees every query
/// block (no causal mask, no window; then `m_block_range` is `[0, M)` for each) and `n <= M`; else None
/// (the walk from `m_min`, the turns by CTA index). Key block kb's walk starts at query block kb, or
/// spread (`dq_rotate` bit 1) at floor(kb M / n), so that where M >= 2 n the key blocks reach each query
/// block at least two steps apart. The CTA of key block kb reaches query block m at its step `(m -
/// start) mod M` of each head, all those times distinct (the starts are); `DqTurn::turn` orders the adds
/// by them.
#[inline(always)]
fn rotation(p: &BwdParams, a: &KvArgs, bn: i32, bm: i32) -> Option<Rotation> {
    if p.dq_rotate & (DQ_ROTATE | DQ_ROTATE_SPREAD) == 0 || p.window_left >= 0 || p.window_right >= 0 || a.sq.used <= 0 || a.sk.used <= 0 {
        return None;
    }
    let n = (a.sk.used - 1) / bn + 1;
    let m = (a.sq.used - 1) / bm + 1;
    let kb = a.n0 / bn;
    let spread = p.dq_rotate & DQ_ROTATE_SPREAD != 0;
    // No overflow: the host rotates only where grid x (>= n) fits the multiprocessors.
    let start = if spread { crate::arch::math::div_rem_u32((kb * m) as u32, n as u32).0 as i32 } else { kb };
    (n <= m).then_some(Rotation { kb, n, m, start, spread })
}

/// A key block's rotated walk (`rotation`): its index kb among the sequence's n key blocks, the query
/// blocks M, the walk's first query block, and whether the starts are spread (all but the start read by
/// `DqTurn`, which only sm_90 builds have).
#[derive(Clone, Copy)]
#[cfg_attr(not(fa_sm90), allow(dead_code))]
struct Rotation {
    kb: i32,
    n: i32,
    m: i32,
    start: i32,
    spread: bool,
}

/// Add one n8 accumulator fragment (rows `row_a`, `row_a + 8`; columns `col`, `col + 1`) to the f32 dq
/// accumulator at `dqa` (row stride in elements). No row check: rows past the sequence carry dS = 0
/// exactly (zeroed with the masked pairs), so they add zeros to rows prep zeroed (`dq_accum_rows`), and
/// the accumulator has `DQ_ACCUM_BLOCK_M` rows of slack after its last row (host), so those adds stay
/// inside it. On sm_90 each row's pair is one 8-byte vector reduction.
#[inline(always)]
unsafe fn add_dq_fragment(dqa: u64, row_stride: i64, row_a: i32, col: i64, frag: [f32; 4]) {
    let at = dqa.wrapping_add(((row_a as i64 * row_stride + col) * 4) as u64);
    let at8 = at.wrapping_add((8 * row_stride * 4) as u64);
    #[cfg(fa_sm90)]
    unsafe {
        use crate::arch::mem::red_add_v2_f32;
        red_add_v2_f32(at, [frag[0], frag[1]]);
        red_add_v2_f32(at8, [frag[2], frag[3]]);
    }
    #[cfg(not(fa_sm90))]
    unsafe {
        use crate::arch::mem::red_add_f32;
        red_add_f32(at, frag[0]);
        red_add_f32(at + 4, frag[1]);
        red_add_f32(at8, frag[2]);
        red_add_f32(at8 + 4, frag[3]);
    }
}

/// Zero P^T and dS^T of the hidden (query, key) pairs among this thread's `KT` key tiles x `QN` query
/// tiles of the step at query row `m0` (`rows` real rows): keys `n0 + key0 + 16 kt (+ 8)`, query columns
/// `col0 + 8 j (+ 1)` (the fragment layout of both backward kernels). Shared by the mma.sync and wgmma
/// kernels.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn mask_tile<const KT: usize, const QN: usize>(p: &BwdParams, a: &KvArgs, acc_s: &mut [[[f32; 4]; QN]; KT], acc_dp: &mut [[[f32; 4]; QN]; KT], m0: i32, rows: i32, key0: i32, col0: i32) {
    for_each_hidden_kq::<KT, QN>(m0 + col0, rows - col0, a.n0 + key0, a.sq.used, a.sk.used, p.window_left, p.window_right, #[inline(always)] |kt, j, i| {
        acc_s[kt][j][i] = 0.0;
        acc_dp[kt][j][i] = 0.0;
    });
}

/// Where a thread's key-major fragments are: the query of element 0 of its tile (0, 0) (`row0`: the
/// step's first query + its column offset + 2 t) and its key (`key0`: the key block's first key + its row
/// offset + g), and seqlen_k - seqlen_q (`shift`). For the score modifiers.
#[derive(Clone, Copy)]
struct KqAt {
    row0: i32,
    key0: i32,
    shift: i32,
}

/// P^T and dS^T in place of S^T and dP^T for this thread's `KT` key tiles x `QN` query tiles (queries
/// from `q_col0`; their lse_log2 and D at `lse_s`, `delta_s`). The unmasked formula everywhere (inputs
/// past the sequence are zero-filled, so finite); softcap, and dropout, decided once per tile, outside
/// the loops (inside, LLVM kept one branch per element). With score modifiers (`MODS`): ALiBi's bias
/// in the exponent, and dropout: P^T (what dV takes) is P Z and dS = P (dP Z - D), with Z = 1 / (1 - p)
/// where kept and 0 where dropped (`keep`: the tile's `keep_tile`). Shared by the mma.sync and wgmma
/// kernels.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn grad_tile<const KT: usize, const QN: usize, const MODS: bool, const FAST: bool>(p: &BwdParams, mods: &HeadMods, at: KqAt, keep: u32, acc_s: &mut [[[f32; 4]; QN]; KT], acc_dp: &mut [[[f32; 4]; QN]; KT], lse_s: u32, delta_s: u32, q_col0: usize, t: i32) {
    if MODS && FAST && mods.slope_log2 < 0.0 {
        grad_tile_signed::<KT, QN, MODS, FAST, false>(p, mods, at, keep, acc_s, acc_dp, lse_s, delta_s, q_col0, t)
    } else {
        grad_tile_signed::<KT, QN, MODS, FAST, true>(p, mods, at, keep, acc_s, acc_dp, lse_s, delta_s, q_col0, t)
    }
}

/// `grad_tile` with the ALiBi form fixed: `FAST` with the slope's sign, `ADD` where it is 0 or above
/// (also NaN and no ALiBi): l + |slope d|, else l - |slope d|.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn grad_tile_signed<const KT: usize, const QN: usize, const MODS: bool, const FAST: bool, const ADD: bool>(p: &BwdParams, mods: &HeadMods, at: KqAt, keep: u32, acc_s: &mut [[[f32; 4]; QN]; KT], acc_dp: &mut [[[f32; 4]; QN]; KT], lse_s: u32, delta_s: u32, q_col0: usize, t: i32) {
    match (p.softcap_pre != 0.0, mods.dropout) {
        (true, true) => grad_tile_with::<KT, QN, true, MODS, true, FAST, ADD>(p, mods, at, keep, acc_s, acc_dp, lse_s, delta_s, q_col0, t),
        (true, false) => grad_tile_with::<KT, QN, true, MODS, false, FAST, ADD>(p, mods, at, keep, acc_s, acc_dp, lse_s, delta_s, q_col0, t),
        (false, true) => grad_tile_with::<KT, QN, false, MODS, true, FAST, ADD>(p, mods, at, keep, acc_s, acc_dp, lse_s, delta_s, q_col0, t),
        (false, false) => grad_tile_with::<KT, QN, false, MODS, false, FAST, ADD>(p, mods, at, keep, acc_s, acc_dp, lse_s, delta_s, q_col0, t),
    }
}

/// Dropout's decisions for a key-major tile at `at` (`grad_tile`'s `keep`: `mods::keep_kq`'s word, bit
/// `kq_bit` for each element; 0 without dropout). Called once the S^T and dP^T products have landed:
/// drawn before their waits, the decisions ran 1-4% slower on the wgmma kernels (H200,
/// benches/RESULTS.md). Every lane of the warp (shuffles).
#[inline(always)]
fn keep_tile<const KT: usize, const QN: usize>(mods: &HeadMods, at: &KqAt) -> u32 {
    if mods.dropout { keep_kq::<KT, QN>(mods, at.row0, at.key0) } else { 0 }
}

/// `grad_tile`'s loops, with softcap, dropout and ALiBi's form fixed at compile time. ALiBi's bias:
/// slope |d| with d an add and |d| an AND (three instructions per score), or with `FAST` in two
/// (`sub_abs_fma`, as the forward's `mods::alibi_qk_fast`): ±|slope base + slope c|, the element's
/// offset c an immediate, slope base once per tile.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn grad_tile_with<const KT: usize, const QN: usize, const SOFTCAP: bool, const MODS: bool, const DROP: bool, const FAST: bool, const ADD: bool>(p: &BwdParams, mods: &HeadMods, at: KqAt, keep: u32, acc_s: &mut [[[f32; 4]; QN]; KT], acc_dp: &mut [[[f32; 4]; QN]; KT], lse_s: u32, delta_s: u32, q_col0: usize, t: i32) {
    // ALiBi: |query + shift - key| = |base + (8 j + i % 2) - (16 kt + 8 (i / 2))|.
    let base = (at.row0 + at.shift - at.key0) as f32;
    let sb = mods.slope_log2 * base;
    for j in 0..QN {
        let qc = (q_col0 + 8 * j) as u32 + 2 * t as u32;
        let lse2 = unsafe { smem::ld_v2_f32(lse_s + qc * 4) };
        let delta = unsafe { smem::ld_v2_f32(delta_s + qc * 4) };
        for kt in 0..KT {
            for i in 0..4 {
                let (s, dp) = (acc_s[kt][j][i], acc_dp[kt][j][i]);
                let mut l = lse2[i % 2];
                if MODS && FAST {
                    let c = ((8 * j + i % 2) as i32 - (16 * kt + 8 * (i / 2)) as i32) as f32;
                    l = sub_abs_fma::<ADD>(l, mods.slope_log2, c, sb);
                } else if MODS {
                    let d = base + ((8 * j + i % 2) as i32 - (16 * kt + 8 * (i / 2)) as i32) as f32;
                    l = fma(mods.slope_log2, d.abs(), l);
                }
                let (pr, ds) = if DROP {
                    // P Z and dS = P Z dP - P D (one FMA where the plain step subtracts, then multiplies).
                    let z = if (keep >> kq_bit::<QN>(kt, j, i)) & 1 != 0 { mods.scale } else { 0.0 };
                    if SOFTCAP { grad_elem_softcap_drop(p, s, dp, l, delta[i % 2], z) } else { grad_elem_plain_drop(p, s, dp, l, delta[i % 2], z) }
                } else if SOFTCAP {
                    grad_elem_softcap(p, s, dp, l, delta[i % 2])
                } else {
                    grad_elem_plain(p, s, dp, l, delta[i % 2])
                };
                acc_s[kt][j][i] = pr;
                acc_dp[kt][j][i] = ds;
            }
        }
    }
}
