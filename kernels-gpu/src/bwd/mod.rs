//! Attention backward on tensor cores (flash-attention 2's algorithm), four kernels:
//!   prep:    D_i = dout_i . out_i and the LSE in base 2 (+inf for a row that saw no key, so P = 0);
//!            the row's dq accumulator zeroed (atomic path);
//!   dk/dv:   a block owns `BN` keys of one kv head and walks every q head of its group and every query
//!            block that sees the keys: S^T = K Q^T, dP^T = V dO^T, P = exp2(S scale - lse),
//!            dS = P (dP - D) [x (1 - tanh^2) with softcap], dV += P^T dO, dK += dS^T Q; with a dq
//!            accumulator it also adds dQ = dS K to it with f32 atomics (the default path);
//!   dq:      the deterministic path's dq: a block owns query rows and walks their key tiles (like the
//!            forward), dQ += dS K in registers: every sum has one fixed order;
//!   convert: dq = scale * accumulator in the input type (the Hopper dK/dV kernel does it itself when one
//!            CTA walks all key blocks of its sequence and kv head).
//! dK/dV sum over the group's q heads inside one block, so they never need atomics. Rows and keys of no
//! sequence (seqused padding, tail rows) get zero gradients, written here.

use crate::arch::cp_async::{commit_group, cp_async_4, wait_group};
use crate::arch::ldmatrix::{ldmatrix_x4, ldmatrix_x4_trans};
use crate::arch::math::{exp2, fma, tanh};
use crate::arch::reg::opaque_u32;
use crate::arch::shfl::shfl_xor_f32;
use crate::arch::mem::{ld_global_nc_f32, ld_global_nc_i32, ld_global_nc_v4, ld_global_v4, st_global_f32, st_global_u32, st_global_v4};
use crate::arch::smem;
use crate::arch::sreg::{block_idx_x, block_idx_y, block_idx_z, grid_dim_x, thread_idx_x};
use crate::arch::sync::sync_threads;
use crate::block::{m_block_range, n_block_range, tile_needs_mask};
use crate::fwd::{a_fragment, load_tile, Elem, BF16, F16};
use crate::mask::{key_range, Band};
use crate::params::BwdParams;
use crate::seqlen::SeqlenInfo;
use crate::variants::{row_pitch_bytes, BwdConfig, FwdConfig, BWD_ROWS_PER_BLOCK};

// Hopper dK/dV kernel on wgmma (head dims 64 and 128, atomic dq).
#[cfg(fa_sm90)]
mod wg;

/// The (q, k) sequences of grid slice `bidb` (`seqlen::Lengths::slice`).
#[inline(always)]
fn sequences(p: &BwdParams, bidb: i32) -> (SeqlenInfo, SeqlenInfo) {
    p.lengths().slice(bidb, |ptr, i| unsafe { ld_global_nc_i32(ptr + (i as u64) * 4) })
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

/// P and dS of one visible score without softcap: `s` = q.k, `dp` = dout . v, `lse2` the row's LSE in
/// base 2, `delta` = D_i.
#[inline(always)]
fn grad_elem_plain(p: &BwdParams, s: f32, dp: f32, lse2: f32, delta: f32) -> (f32, f32) {
    let pr = exp2(fma(s, p.scale_log2, -lse2));
    (pr, pr * (dp - delta))
}

/// The same with softcap: the score is `tanh(s * softcap_pre)` (times scale_log2), whose derivative
/// `1 - tanh^2` multiplies dS.
#[inline(always)]
fn grad_elem_softcap(p: &BwdParams, s: f32, dp: f32, lse2: f32, delta: f32) -> (f32, f32) {
    let t = tanh(s * p.softcap_pre);
    let pr = exp2(fma(t, p.scale_log2, -lse2));
    (pr, pr * (dp - delta) * (1.0 - t * t))
}

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

// ---------------------------------------------------------------------------------------------------
// prep

/// Threads per row in prep: each takes every `PREP_LANES`-th 16-byte chunk of the row, so a warp reads
/// 8 rows x 64 contiguous bytes per load (every head dim is a multiple of 32).
const PREP_LANES: i32 = 4;

/// D_i and lse_log2 for every real row, and (with an accumulator) the row's f32 dq accumulator zeroed:
/// the only rows the convert kernel reads (the dk/dv kernels add exact zeros to every other row they
/// touch, which no one reads).
#[inline(always)]
unsafe fn prep_entry<E: Elem>(p: &BwdParams) {
    let bm = BWD_ROWS_PER_BLOCK as i32;
    let rows_per_pass = BWD_ROWS_PER_BLOCK as i32 / PREP_LANES;
    let (h, bidb) = (block_idx_y() as i32, block_idx_z() as i32);
    let (sq, _) = sequences(p, bidb);
    let tid = thread_idx_x() as i32;
    let (sub, row_in_pass) = (tid % PREP_LANES, tid / PREP_LANES);
    let chunks = p.head_dim / 8;
    let mut m_block = block_idx_x() as i32;
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
            if valid {
                if p.dq_accum != 0 {
                    let a = p.dq_accum.wrapping_add(((bidb as i64 * p.dqa_batch_stride + (sq.start + r) as i64 * p.dqa_row_stride + h as i64 * p.dqa_head_stride) * 4) as u64);
                    let mut c = sub;
                    while c < 2 * chunks {
                        unsafe { st_global_v4(a + c as u64 * 16, [0; 4]) };
                        c += PREP_LANES;
                    }
                }
                if sub == 0 {
                    let at = lse_index(p, bidb, sq.start, h, r) as u64 * 4;
                    let lse = unsafe { ld_global_nc_f32(p.lse + at) };
                    let lse2 = if lse == f32::NEG_INFINITY { f32::INFINITY } else { lse * core::f32::consts::LOG2_E };
                    unsafe {
                        st_global_f32(p.delta + at, d);
                        st_global_f32(p.lse_log2 + at, lse2);
                    }
                }
            }
            pass += rows_per_pass;
        }
        m_block += grid_dim_x() as i32;
    }
}

// ---------------------------------------------------------------------------------------------------
// convert

/// dq = scale * dq_accum in the input type for rows `[r0, r1)` of slot `sq` (sequence `bidb`), head `h`:
/// real rows converted, padding and tail rows 0; 16-byte stores. Thread `tid` of `THREADS` takes every
/// `THREADS`-th 16-byte chunk, `UNROLL` chunks' loads in flight at once.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn convert_rows<E: Elem, const THREADS: usize, const UNROLL: usize>(p: &BwdParams, bidb: i32, sq: &SeqlenInfo, h: i32, r0: i32, r1: i32, tid: usize) {
    let chunks = p.head_dim / 8;
    let total = (r1 - r0) * chunks;
    let mut idx0 = tid as i32;
    while idx0 < total {
        let mut x = [[[0u32; 4]; 2]; UNROLL];
        for (u, xu) in x.iter_mut().enumerate() {
            let idx = idx0 + (u * THREADS) as i32;
            let (r, c) = (r0 + idx / chunks, idx % chunks);
            if idx < total && r < sq.used {
                let a = p.dq_accum.wrapping_add(((bidb as i64 * p.dqa_batch_stride + (sq.start + r) as i64 * p.dqa_row_stride + h as i64 * p.dqa_head_stride + c as i64 * 8) * 4) as u64);
                *xu = unsafe { [ld_global_v4(a), ld_global_v4(a + 16)] };
            }
        }
        for (u, xu) in x.iter().enumerate() {
            let idx = idx0 + (u * THREADS) as i32;
            let (r, c) = (r0 + idx / chunks, idx % chunks);
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
    let (h, bidb) = (block_idx_y() as i32, block_idx_z() as i32);
    let (sq, _) = sequences(p, bidb);
    let mut m_block = block_idx_x() as i32;
    while m_block * bm < sq.slot_len {
        let m0 = m_block * bm;
        let m1 = if sq.slot_len - m0 < bm { sq.slot_len } else { m0 + bm };
        unsafe { convert_rows::<E, BWD_ROWS_PER_BLOCK, 1>(p, bidb, &sq, h, m0, m1, thread_idx_x() as usize) };
        m_block += grid_dim_x() as i32;
    }
}

// ---------------------------------------------------------------------------------------------------
// dk / dv (+ atomic dq)

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

/// One key block's view of its sequence and head, fixed over the walk.
struct KvArgs {
    bidb: i32,
    hk: i32,
    group: i32,
    sq: SeqlenInfo,
    sk: SeqlenInfo,
    n0: i32,
    cols: i32,
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

/// `acc += A B^T` over the head dim, both operands row-major `[rows][D]` in shared memory: A is `16 * KT`
/// rows from `a` (this lane's ldmatrix address), B is `8 * QN` rows from `b`.
#[inline(always)]
unsafe fn rows_times_cols<E: Elem, const D: usize, const KT: usize, const QN: usize>(acc: &mut [[[f32; 4]; QN]; KT], a: u32, b: u32, rb: u32) {
    for kk in 0..D / 16 {
        let mut fa = [[0u32; 4]; KT];
        for (kt, frag) in fa.iter_mut().enumerate() {
            *frag = unsafe { ldmatrix_x4(a + (kt * 16) as u32 * rb + (kk * 32) as u32) };
        }
        for np in 0..QN / 2 {
            let fb = unsafe { ldmatrix_x4(b + (np * 16) as u32 * rb + (kk * 32) as u32) };
            for kt in 0..KT {
                E::mma(&mut acc[kt][2 * np], fa[kt], [fb[0], fb[1]]);
                E::mma(&mut acc[kt][2 * np + 1], fa[kt], [fb[2], fb[3]]);
            }
        }
    }
}

/// Add one n8 accumulator fragment (rows `row_a`, `row_a + 8`; columns `col`, `col + 1`) to the f32 dq
/// accumulator at `dqa` (row stride in elements). No row check: rows past the sequence carry dS = 0
/// exactly (zeroed with the masked pairs), so they add zeros, and the accumulator has `block_m` rows of
/// slack after its last row (host), so those adds stay inside it. On sm_90 each row's pair is one
/// 8-byte vector reduction.
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

/// The steps a key block walks, (q head, query block) in order: head-major over its group, query blocks
/// `m_min..m_max` of `bm` rows (those that see its keys). Returns the step count, the successor of a step
/// and the first step. Counters, not `it / m_count`: a division by a runtime value costs dozens of
/// instructions per step.
#[inline(always)]
fn step_walk(p: &BwdParams, a: &KvArgs, bm: i32) -> (i32, impl Fn((i32, i32)) -> (i32, i32), (i32, i32)) {
    let (m_min, m_max) = m_block_range(a.n0, a.cols, a.sq.used, a.sk.used, p.window_left, p.window_right, bm);
    let m_count = if m_max > m_min { m_max - m_min } else { 0 };
    let next = move |(h, m): (i32, i32)| if m + 1 < m_max { (h, m + 1) } else { (h + 1, m_min) };
    (m_count * a.group, next, (a.hk * a.group, m_min))
}

/// Zero P^T and dS^T of the hidden (query, key) pairs among this thread's `KT` key tiles x `QN` query
/// tiles of the step at query row `m0` (`rows` real rows): keys `n0 + key0 + 16 kt (+ 8)`, query columns
/// `col0 + 8 j (+ 1)` (the fragment layout of both backward kernels). Shared by the mma.sync and wgmma
/// kernels; every per-element test is a compare against a compile-time offset (`mask::Band`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn mask_tile<const KT: usize, const QN: usize>(p: &BwdParams, a: &KvArgs, acc_s: &mut [[[f32; 4]; QN]; KT], acc_dp: &mut [[[f32; 4]; QN]; KT], m0: i32, rows: i32, key0: i32, col0: i32) {
    let band = Band::new(m0 + col0, a.n0 + key0, a.sq.used, a.sk.used, p.window_left, p.window_right);
    for j in 0..QN {
        for e in 0..2 {
            let dr = (8 * j + e) as i32;
            let row_ok = col0 + dr < rows;
            for kt in 0..KT {
                for half in 0..2 {
                    let dk = (16 * kt + 8 * half) as i32;
                    if !(row_ok && a.n0 + key0 + dk < a.sk.used && band.sees(dk - dr)) {
                        acc_s[kt][j][2 * half + e] = 0.0;
                        acc_dp[kt][j][2 * half + e] = 0.0;
                    }
                }
            }
        }
    }
}

/// P^T and dS^T in place of S^T and dP^T for this thread's `KT` key tiles x `QN` query tiles (queries
/// from `q_col0`; their lse_log2 and D at `lse_s`, `delta_s`). The unmasked formula everywhere (inputs
/// past the sequence are zero-filled, so finite); softcap or not decided once per tile, outside the loops
/// (inside, LLVM kept one branch per element). Shared by the mma.sync and wgmma kernels.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn grad_tile<const KT: usize, const QN: usize>(p: &BwdParams, acc_s: &mut [[[f32; 4]; QN]; KT], acc_dp: &mut [[[f32; 4]; QN]; KT], lse_s: u32, delta_s: u32, q_col0: usize, t: i32) {
    if p.softcap_pre != 0.0 {
        grad_tile_with::<KT, QN, true>(p, acc_s, acc_dp, lse_s, delta_s, q_col0, t)
    } else {
        grad_tile_with::<KT, QN, false>(p, acc_s, acc_dp, lse_s, delta_s, q_col0, t)
    }
}

/// `grad_tile`'s loops, with or without softcap fixed at compile time.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn grad_tile_with<const KT: usize, const QN: usize, const SOFTCAP: bool>(p: &BwdParams, acc_s: &mut [[[f32; 4]; QN]; KT], acc_dp: &mut [[[f32; 4]; QN]; KT], lse_s: u32, delta_s: u32, q_col0: usize, t: i32) {
    for j in 0..QN {
        let qc = (q_col0 + 8 * j) as u32 + 2 * t as u32;
        let lse2 = unsafe { smem::ld_v2_f32(lse_s + qc * 4) };
        let delta = unsafe { smem::ld_v2_f32(delta_s + qc * 4) };
        for kt in 0..KT {
            for i in 0..4 {
                let (s, dp) = (acc_s[kt][j][i], acc_dp[kt][j][i]);
                (acc_s[kt][j][i], acc_dp[kt][j][i]) = if SOFTCAP { grad_elem_softcap(p, s, dp, lse2[i % 2], delta[i % 2]) } else { grad_elem_plain(p, s, dp, lse2[i % 2], delta[i % 2]) };
            }
        }
    }
}

/// dK and dV of keys `[n0, n0 + BN)` of kv head `hk` (this warp's part), accumulated over the group's
/// q heads and the query blocks that see the keys; dQ contributions go to the accumulator if there is one.
#[inline(always)]
unsafe fn dkdv_block<E: Elem, const D: usize, const BN: usize, const BM: usize, const NW: usize, const KT: usize, const DQT: usize, const DWN: usize, const QN: usize>(
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

    let (steps, next, mut cur) = step_walk(p, a, BM as i32);
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
        let a_lane = ((kv_row0 + lane % 8 + ((lane / 8) % 2) * 8) as u32) * rb + (lane / 16) as u32 * 16;
        let b_lane = ((q_col0 + lane % 8 + (lane / 16) * 8) as u32) * rb + ((lane / 8) % 2) as u32 * 16;
        // Two passes (S^T, then dP^T) keep half the fragments live: registers are what this kernel runs out of.
        unsafe {
            rows_times_cols::<E, D, KT, QN>(&mut acc_s, k_s + a_lane, q_s + b_lane, rb);
            rows_times_cols::<E, D, KT, QN>(&mut acc_dp, v_s + a_lane, do_s + b_lane, rb);
        }

        // P and dS in place of S^T and dP^T; dS^T (and P^T when warps split the queries) to shared memory.
        let lse_s = S::<D, BN, BM, NW, KT, DQT, DWN, QN>::lse_stage(base, stage);
        let delta_s = S::<D, BN, BM, NW, KT, DQT, DWN, QN>::delta_stage(base, stage);
        grad_tile::<KT, QN>(p, &mut acc_s, &mut acc_dp, lse_s, delta_s, q_col0, t);
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
        let pt_lane = ((kv_row0 + lane % 8 + ((lane / 8) % 2) * 8) as u32) * pb + (lane / 16) as u32 * 16;
        let bt_lane = ((lane % 8 + ((lane / 8) % 2) * 8) as u32) * rb + (d_col0 * 2) as u32 + (lane / 16) as u32 * 16;
        for kk in 0..BM / 16 {
            let mut pa = [[0u32; 4]; KT];
            let mut da = [[0u32; 4]; KT];
            for kt in 0..KT {
                if wm_count == 1 {
                    pa[kt] = a_fragment::<E>(&acc_s[kt][2 * kk], &acc_s[kt][2 * kk + 1]);
                    da[kt] = a_fragment::<E>(&acc_dp[kt][2 * kk], &acc_dp[kt][2 * kk + 1]);
                } else {
                    let off = pt_lane + (kt * 16) as u32 * pb + (kk * 32) as u32;
                    pa[kt] = unsafe { ldmatrix_x4(pt_s + off) };
                    da[kt] = unsafe { ldmatrix_x4(ds_s + off) };
                }
            }
            for dp in 0..DWN / 2 {
                let off = (kk * 16) as u32 * rb + (dp * 32) as u32;
                let ob = unsafe { ldmatrix_x4_trans(do_s + bt_lane + off) };
                let qb = unsafe { ldmatrix_x4_trans(q_s + bt_lane + off) };
                for kt in 0..KT {
                    E::mma(&mut acc_dv[kt][2 * dp], pa[kt], [ob[0], ob[1]]);
                    E::mma(&mut acc_dv[kt][2 * dp + 1], pa[kt], [ob[2], ob[3]]);
                    E::mma(&mut acc_dk[kt][2 * dp], da[kt], [qb[0], qb[1]]);
                    E::mma(&mut acc_dk[kt][2 * dp + 1], da[kt], [qb[2], qb[3]]);
                }
            }
        }

        // dQ (rows m0..) += dS K, added to the f32 accumulator: warp (rm, cd) owns 16 rows x DC columns.
        if p.dq_accum != 0 {
            let rm_count = S::<D, BN, BM, NW, KT, DQT, DWN, QN>::RM;
            let dc = S::<D, BN, BM, NW, KT, DQT, DWN, QN>::DC;
            let (rm, cd) = (warp % rm_count, warp / rm_count);
            let dsa_lane = ((lane % 8 + (lane / 16) * 8) as u32) * pb + ((rm * 16 * DQT + ((lane / 8) % 2) * 8) * 2) as u32;
            let kb_lane = ((lane % 8 + ((lane / 8) % 2) * 8) as u32) * rb + ((cd * dc) * 2) as u32 + (lane / 16) as u32 * 16;
            let row_a = (rm * 16 * DQT) as i32 + g;
            let dqa = p.dq_accum.wrapping_add(((a.bidb as i64 * p.dqa_batch_stride + (a.sq.start + m0) as i64 * p.dqa_row_stride + h as i64 * p.dqa_head_stride + (cd * dc) as i64) * 4) as u64);
            // Columns in chunks of CH n8 tiles (4 * CH * DQT accumulator registers live at a time).
            let ch = if dc % 32 == 0 { 4 } else { 2 };
            for c in 0..dc / (8 * ch) {
                let mut acc = [[[0f32; 4]; 4]; DQT];
                for kk in 0..BN / 16 {
                    let mut ds_a = [[0u32; 4]; DQT];
                    for (mt, frag) in ds_a.iter_mut().enumerate() {
                        *frag = unsafe { ldmatrix_x4_trans(ds_s + dsa_lane + (kk * 16) as u32 * pb + (mt * 32) as u32) };
                    }
                    for dp in 0..ch / 2 {
                        let b = unsafe { ldmatrix_x4_trans(k_s + kb_lane + (kk * 16) as u32 * rb + ((c * ch + 2 * dp) * 16) as u32) };
                        for mt in 0..DQT {
                            E::mma(&mut acc[mt][2 * dp], ds_a[mt], [b[0], b[1]]);
                            E::mma(&mut acc[mt][2 * dp + 1], ds_a[mt], [b[2], b[3]]);
                        }
                    }
                }
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
unsafe fn dkdv_entry<E: Elem, const D: usize, const BN: usize, const BM: usize, const NW: usize, const KT: usize, const DQT: usize, const DWN: usize, const QN: usize>(p: &BwdParams) {
    let tid = thread_idx_x() as usize;
    let (hk, bidb) = (block_idx_y() as i32, block_idx_z() as i32);
    let (sq, sk) = sequences(p, bidb);
    let wn_count = BN / (16 * KT);
    let (warp, lane) = (tid / 32, tid % 32);
    let (g, t) = ((lane / 4) as i32, (lane % 4) as i32);
    let (wn, wm) = (warp % wn_count, warp / wn_count);
    let kv_row = (16 * KT * wn) as i32 + g;
    let d_col = (wm * DWN * 8) as i32 + 2 * t;

    let mut n_block = block_idx_x() as i32;
    while n_block * (BN as i32) < sk.slot_len {
        let n0 = n_block * BN as i32;
        let mut acc_dk = [[[0f32; 4]; DWN]; KT];
        let mut acc_dv = [[[0f32; 4]; DWN]; KT];
        if n0 < sk.used {
            let cols = if sk.used - n0 < BN as i32 { sk.used - n0 } else { BN as i32 };
            let args = KvArgs { bidb, hk, group: p.h / p.h_k, sq, sk, n0, cols };
            unsafe { dkdv_block::<E, D, BN, BM, NW, KT, DQT, DWN, QN>(p, &args, tid, &mut acc_dk, &mut acc_dv) };
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

// ---------------------------------------------------------------------------------------------------
// deterministic dq

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

macro_rules! bwd_kernels {
    ($(($d:literal, $dt:ident, $name:literal, $dq:literal)),* $(,)?) => {$(
        const _: () = {
            const C: BwdConfig = crate::variants::bwd_config($d);
            const Q: FwdConfig = crate::variants::dq_config($d);
            #[unsafe(export_name = $name)]
            pub unsafe extern "ptx-kernel" fn kernel(p: BwdParams) {
                unsafe { dkdv_entry::<$dt, $d, { C.block_n }, { C.block_m }, { C.warps }, { C.key_tiles }, { C.dq_tiles }, { $d / C.wm() / 8 }, { C.block_m / C.wm() / 8 }>(&p) }
            }
            #[unsafe(export_name = $dq)]
            pub unsafe extern "ptx-kernel" fn dq_kernel(p: BwdParams) {
                unsafe { dq_entry::<$dt, $d, { $d / 8 }, { Q.warps }, { Q.block_n }, { Q.block_n / 8 }>(&p) }
            }
        };
    )*};
}
crate::for_each_bwd_variant!(bwd_kernels);

#[unsafe(export_name = "flash_bwd_prep_bf16")]
pub unsafe extern "ptx-kernel" fn prep_bf16(p: BwdParams) {
    unsafe { prep_entry::<BF16>(&p) }
}
#[unsafe(export_name = "flash_bwd_prep_f16")]
pub unsafe extern "ptx-kernel" fn prep_f16(p: BwdParams) {
    unsafe { prep_entry::<F16>(&p) }
}
#[unsafe(export_name = "flash_bwd_dq_convert_bf16")]
pub unsafe extern "ptx-kernel" fn convert_bf16(p: BwdParams) {
    unsafe { convert_entry::<BF16>(&p) }
}
#[unsafe(export_name = "flash_bwd_dq_convert_f16")]
pub unsafe extern "ptx-kernel" fn convert_f16(p: BwdParams) {
    unsafe { convert_entry::<F16>(&p) }
}
