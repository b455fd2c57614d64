//! Hopper forward (sm_90a): the same algorithm and block walk as the mma.sync kernel, with both products
//! on wgmma. A block is two warpgroups over 128 query rows (each warp keeps 16 rows, so the accumulator
//! layout, the masking and the online softmax are the mma.sync kernel's with one m-tile per warp).
//! Q and two slots each of K and V tiles sit in shared memory in the 128-byte swizzle wgmma reads
//! (cp.async fills them; K runs one tile ahead of V): S = Q K^T reads both from there, O += P V takes P
//! from registers and V transposed on read. Tiles are 128 keys (64 at head dims 192 and 256, whose O
//! accumulators are 1.5 and 2 times as large); head dim 96 runs O += P V at 128 columns over zero-filled
//! V columns (measured: n96 products ran the kernel at 0.83 of flash).

use super::{a_fragment, for_each_row_block, scores_to_p, store_out, BlockArgs, BF16, F16};
use crate::arch::cp_async::{commit_group, cp_async_16, wait_group};
use crate::arch::reg::{opaque_i64, opaque_u32};
use crate::arch::smem;
use crate::arch::sreg::thread_idx_x;
use crate::arch::sync::sync_threads;
use crate::arch::wgmma::{self, desc_sw128, sw128_offset};
use crate::block::{n_block_range, tile_needs_mask};
use crate::mods::{drop_p, kept_p, AlibiCode, KeptP};
use crate::params::FwdParams;
use crate::softmax::RowState;
use crate::variants::{fwd_wg_config, fwd_wg_smem_bytes, fwd_ws_wide_block_n, FwdConfig, FWD_WS_TALL_ROWS};

/// Query rows per block (two warpgroups of 64) and threads.
const BM: usize = 128;
pub(crate) const THREADS: usize = 256;
/// Slots per operand. Tile i's step reads K_{i+1} and V_i while K_{i+2} and V_{i+1} land (K runs one tile
/// ahead of V); tile t of the running count sits in slot t % 2 of each.
const SLOTS: usize = 2;

pub(crate) use super::wg_elem::WgElem;

/// Reinterpret `&mut [T; N]` as `&mut [T; M]` where the caller has checked `N == M` (const generics
/// cannot name the concrete length the generated wrappers take).
#[inline(always)]
pub(crate) unsafe fn sized<T, const N: usize, const M: usize>(x: &mut [T; N]) -> &mut [T; M] {
    debug_assert!(N == M);
    unsafe { &mut *(x as *mut [T; N] as *mut [T; M]) }
}

/// Wait until at most `PENDING` (0 or 1) of this warpgroup's wgmma groups are in flight; `acc` (`N8` n8
/// tiles: 4, 8, 16, 24 or 32) belongs to the groups that completed.
#[inline(always)]
pub(crate) fn wait_acc<const PENDING: u32, const N8: usize>(acc: &mut [[f32; 4]; N8]) {
    unsafe {
        match (PENDING, N8) {
            (0, 4) => wgmma::wait0_n32(sized(acc)),
            (0, 8) => wgmma::wait0_n64(sized(acc)),
            (0, 16) => wgmma::wait0_n128(sized(acc)),
            (0, 24) => wgmma::wait0_n192(sized(acc)),
            (0, _) => wgmma::wait0_n256(sized(acc)),
            (_, 4) => wgmma::wait1_n32(sized(acc)),
            (_, 8) => wgmma::wait1_n64(sized(acc)),
            (_, 16) => wgmma::wait1_n128(sized(acc)),
            (_, 24) => wgmma::wait1_n192(sized(acc)),
            (_, _) => wgmma::wait1_n256(sized(acc)),
        }
    }
}

/// `keep_a*` for `KP` P fragments (4, 7 or 8).
#[inline(always)]
pub(crate) fn keep_p<const KP: usize>(pa: &mut [[u32; 4]; KP]) {
    unsafe {
        match KP {
            4 => wgmma::keep_a4(sized(pa)),
            7 => wgmma::keep_a7(sized(pa)),
            _ => wgmma::keep_a8(sized(pa)),
        }
    }
}

/// Shared-memory layout for head dim `D` and `BN` keys per tile: Q, two K slots, two V slots, each tile
/// `[ceil(D / 64)][rows][64]` swizzled (sw128_offset), every 64-column group 1024-byte aligned (at head
/// dim 96 the second group's upper half is zeros: S reads up to column 96, P V all 128, O's last 32
/// columns come out 0 and are not stored). `QM` query rows: the wg kernel's 128, or the ws forward's
/// tall tiles' 192 (`FWD_WS_TALL_ROWS`, three consumer warpgroups).
pub(crate) struct Tile<const D: usize, const BN: usize, const QM: usize>;

impl<const D: usize, const BN: usize, const QM: usize> Tile<D, BN, QM> {
    pub(crate) const Q_BYTES: u32 = (QM * D.div_ceil(64) * 64 * 2) as u32;
    pub(crate) const KV_BYTES: u32 = (BN * D.div_ceil(64) * 64 * 2) as u32;
    /// Q and both slots of K and V: where the tiles end (the ws forward's barriers start there).
    pub(crate) const BYTES: u32 = Self::Q_BYTES + 2 * SLOTS as u32 * Self::KV_BYTES;
    pub(crate) const CHECK: () = {
        let c = match fwd_wg_config(D) {
            Some(c) => c,
            None => panic!("no Hopper forward for this head dim"),
        };
        assert!(c.block_m() == BM && c.threads() == THREADS);
        // The tall tiles: head dim 64 only (one 64-column group, so the products' `*_lo` forms, whose
        // group strides are 128 rows, hold).
        assert!(QM == BM || (QM == FWD_WS_TALL_ROWS && D == 64));
        // The wg kernel's shapes, or the warp-specialized wide-tile kernel's.
        assert!(c.block_n == BN || matches!(fwd_ws_wide_block_n(D), Some(n) if n == BN));
        assert!((D == 64 && BN == 128) || (D == 96 && BN == 128) || (D == 128 && BN == 128) || (D == 192 && (BN == 64 || BN == 112)) || (D == 256 && BN == 64));
        assert!(fwd_wg_smem_bytes(&FwdConfig { block_n: BN, warps: QM / 16, ..c }) == Self::BYTES as usize);
    };
    #[inline(always)]
    pub(crate) fn k_slot(base: u32, t: usize) -> u32 {
        base + Self::Q_BYTES + (t % SLOTS) as u32 * Self::KV_BYTES
    }
    #[inline(always)]
    pub(crate) fn v_slot(base: u32, t: usize) -> u32 {
        base + Self::Q_BYTES + (SLOTS + t % SLOTS) as u32 * Self::KV_BYTES
    }
}

/// Wait until at most `PENDING` of this thread's cp.async groups are in flight, then make every thread's
/// landed copies visible to wgmma: the copies wrote through the generic proxy, wgmma reads through the
/// async one (fence), and the barrier gathers all threads' copies. Block-uniform control flow only.
#[inline(always)]
pub(crate) fn copies_visible<const PENDING: u32>() {
    wait_group::<PENDING>();
    wgmma::fence_proxy_async_shared();
    sync_threads();
}

/// Copy `ROWS` rows of `D` 16-bit values into a swizzled tile; rows at or past `valid_rows` are
/// zero-filled without touching global memory. A thread keeps one 16-byte column chunk and walks rows a
/// multiple of 8 apart (its swizzled chunk stays the same): where the threads divide into a row's chunks
/// (head dims 64, 128, 256) all chunks at once, `THREADS / (D / 8)` rows apart; else (96, 192) one
/// 64-column group after another, `THREADS / 8` rows apart (at 96 the second group's upper half is
/// zero-filled).
#[inline(always)]
pub(crate) unsafe fn load_tile_sw128<const D: usize, const ROWS: usize>(dst: u32, src: u64, row_stride_bytes: i64, valid_rows: i32, tid: usize) {
    let chunks = D / 8;
    let tid = opaque_u32(tid as u32) as usize;
    let row_stride_bytes = opaque_i64(row_stride_bytes);
    if THREADS % chunks == 0 {
        let pass_rows = THREADS / chunks;
        let (r0, c) = (tid / chunks, tid % chunks);
        unsafe { copy_column::<ROWS>(dst, src, row_stride_bytes, r0, c, pass_rows, valid_rows, true) };
    } else {
        let pass_rows = THREADS / 8;
        let (r0, c8) = (tid / 8, tid % 8);
        for group in 0..D.div_ceil(64) {
            let c = group * 8 + c8;
            unsafe { copy_column::<ROWS>(dst, src, row_stride_bytes, r0, c, pass_rows, valid_rows, c < chunks) };
        }
    }
}

/// Chunk `c` of rows `r0, r0 + step, ..` (`ROWS / step` of them) of a swizzled tile; zero-filled past
/// `valid_rows` or where `!in_row` (a column past the head dim).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn copy_column<const ROWS: usize>(dst: u32, src: u64, row_stride_bytes: i64, r0: usize, c: usize, step: usize, valid_rows: i32, in_row: bool) {
    let mut g = src.wrapping_add((r0 as i64 * row_stride_bytes + c as i64 * 16) as u64);
    let g_step = (step as i64 * row_stride_bytes) as u64;
    let mut s = dst + sw128_offset(ROWS as u32, r0 as u32, c as u32);
    let mut row = r0 as i32;
    let mut i = 0;
    while i < ROWS / step {
        let valid = in_row && row < valid_rows;
        unsafe { cp_async_16(s, if valid { g } else { src }, valid) };
        // Laundered: left visible, LLVM rebuilds every copy's address as a 64-bit `row * stride`.
        g = opaque_i64(g.wrapping_add(g_step) as i64) as u64;
        s += (step * 128) as u32;
        row += step as i32;
        i += 1;
    }
}

/// Start the copies of K (`V == false`) or V tile `n_block` into the slot of running tile `t`. Paged:
/// rows at the row stride where the tile's keys share a page, else row by row through the block table.
#[inline(always)]
unsafe fn load_kv<const D: usize, const BN: usize, const V: bool>(base: u32, t: usize, a: &BlockArgs, n_block: i32, tid: usize) {
    let valid = a.seqlen_k - n_block * BN as i32;
    let dst = if V { Tile::<D, BN, BM>::v_slot(base, t) } else { Tile::<D, BN, BM>::k_slot(base, t) };
    let rows = a.kv.rows::<V>();
    if !a.kv.pages.paged() {
        unsafe { load_tile_sw128::<D, BN>(dst, a.kv.tile::<V>(n_block, BN), rows.row_bytes, valid, tid) };
        return;
    }
    let n0 = n_block * BN as i32;
    unsafe {
        match a.kv.page_run(n0, if valid < BN as i32 { valid } else { BN as i32 }) {
            Some((block, off)) => load_tile_sw128::<D, BN>(dst, rows.at(block, off), rows.row_bytes, valid, tid),
            None => load_tile_sw128_rows::<D, BN>(dst, rows.base, valid, tid, #[inline(always)] |r| {
                let (block, off) = a.kv.pages.locate(n0 + r);
                rows.at(block, off)
            }),
        }
    }
}

/// `load_tile_sw128` for rows that are not evenly strided (paged K/V): row `r`'s address is `row(r)`,
/// asked only for rows below `valid_rows` (the rest, and columns past the head dim, are zero-filled;
/// `fallback`, any readable address, stands in for their source). A rolled loop, as `load_tile_rows`.
#[inline(always)]
unsafe fn load_tile_sw128_rows<const D: usize, const ROWS: usize>(dst: u32, fallback: u64, valid_rows: i32, tid: usize, row: impl Fn(i32) -> u64) {
    let chunks = D / 8;
    // Chunks per row in whole 64-column groups.
    let padded = D.div_ceil(64) * 8;
    let tid = opaque_u32(tid as u32) as usize;
    let n = opaque_u32((ROWS * padded / THREADS) as u32) as usize;
    let mut i = 0;
    while i < n {
        let idx = tid + i * THREADS;
        let (r, c) = (idx / padded, idx % padded);
        let valid = c < chunks && (r as i32) < valid_rows;
        let g = if valid { row(r as i32).wrapping_add(c as u64 * 16) } else { fallback };
        unsafe { cp_async_16(dst + sw128_offset(ROWS as u32, r as u32, c as u32), g, valid) };
        i += 1;
    }
}

/// S = Q K^T of running tile `t` for warpgroup `wg`'s 64 rows: k16 steps along the head dim, four per
/// 64-column group (+32 bytes inside the swizzled row). Issued and committed, not waited for. `INC` (the
/// ws kernel): the descriptors are formed inside the asm block from their low words (`*_lo`; in the wg
/// kernel's paged twin a 64-bit form of that raised ptxas's spills from 20 to 200 bytes, so the wg kernel
/// keeps them in registers).
#[inline(always)]
pub(crate) unsafe fn issue_s<E: WgElem, const D: usize, const BN: usize, const QM: usize, const NN: usize, const INC: bool>(acc_s: &mut [[f32; 4]; NN], base: u32, wg: u32, t: usize) {
    let base = opaque_u32(base);
    let k_s = Tile::<D, BN, QM>::k_slot(base, t);
    if INC {
        // Descriptors from their low words, formed inside the asm block (`*_lo`: an add and a move per
        // step, against about six instructions per product where they are built here; one 32-bit register
        // per operand, where 64-bit ones had raised ptxas's spills). Group strides: 128 and BN rows of
        // 128 bytes (the generated functions' constants; at head dim 64, one group, Q's is not used).
        const { assert!(QM == 128 || D == 64) };
        let (qa, kb) = (kmajor_desc(base, QM as u32, wg * 64, 0) as u32, kmajor_desc(k_s, BN as u32, 0, 0) as u32);
        unsafe {
            match (D, BN) {
                (64, _) => E::ss_n128_k4_lo(sized(acc_s), qa, kb),
                (96, _) => E::ss_n128_k6_lo(sized(acc_s), qa, kb),
                (128, _) => E::ss_n128_k8_lo(sized(acc_s), qa, kb),
                (192, 112) => E::ss_n112_k12_lo(sized(acc_s), qa, kb),
                (192, _) => E::ss_n64_k12_lo(sized(acc_s), qa, kb),
                _ => E::ss_n64_k16_lo(sized(acc_s), qa, kb),
            }
        }
        return;
    }
    let mut qa = [0u64; 16];
    let mut kb = [0u64; 16];
    for kk in 0..D / 16 {
        qa[kk] = kmajor_desc(base, QM as u32, wg * 64, kk);
        kb[kk] = kmajor_desc(k_s, BN as u32, 0, kk);
    }
    // (D, BN) is one of Tile::CHECK's five.
    unsafe {
        match D {
            64 => E::ss_n128_k4(sized(acc_s), &first(&qa), &first(&kb)),
            96 => E::ss_n128_k6(sized(acc_s), &first(&qa), &first(&kb)),
            128 => E::ss_n128_k8(sized(acc_s), &first(&qa), &first(&kb)),
            192 => E::ss_n64_k12(sized(acc_s), &first(&qa), &first(&kb)),
            _ => E::ss_n64_k16(sized(acc_s), &qa, &kb),
        }
    }
}

/// The first `M` descriptors.
#[inline(always)]
pub(crate) fn first<const M: usize, const N: usize>(x: &[u64; N]) -> [u64; M] {
    core::array::from_fn(|i| x[i])
}

/// Descriptor of k16 step `kk` of a K-major swizzled tile (`rows` rows per 64-column group) from row
/// `r0` (a multiple of 8): four k16 steps per group, 32 bytes apart inside the swizzled row.
#[inline(always)]
pub(crate) fn kmajor_desc(tile: u32, rows: u32, r0: u32, kk: usize) -> u64 {
    desc_sw128(tile + (kk / 4) as u32 * (rows * 128) + r0 * 128 + (kk % 4) as u32 * 32, 16, 1024)
}

/// O += P V with V of running tile `t` ([keys][D], N-major: 16 keys = two 8-row groups, 2048 bytes;
/// 64-column groups BN * 128 bytes apart). Issued and committed, not waited for. `INC` (the ws kernel):
/// the descriptors are formed inside the asm block from their low word (`*_lo`).
#[inline(always)]
pub(crate) unsafe fn issue_pv<E: WgElem, const D: usize, const DN: usize, const BN: usize, const QM: usize, const KP: usize, const INC: bool>(acc_o: &mut [[f32; 4]; DN], pa: &[[u32; 4]; KP], base: u32, t: usize) {
    let v_s = Tile::<D, BN, QM>::v_slot(opaque_u32(base), t);
    if INC || KP == 7 {
        // B's descriptors from the low word (`rs_*_lo`; see `issue_s`; the 112-key tiles have no other form).
        let vb = desc_sw128(v_s, BN as u32 * 128, 1024) as u32;
        let mut pa = *pa;
        unsafe {
            match D {
                64 => E::rs_n64_k8_lo(sized(acc_o), sized(&mut pa), vb),
                96 | 128 => E::rs_n128_k8_lo(sized(acc_o), sized(&mut pa), vb),
                192 if KP == 7 => E::rs_n192_k7_lo(sized(acc_o), sized(&mut pa), vb),
                192 => E::rs_n192_k4_lo(sized(acc_o), sized(&mut pa), vb),
                _ => E::rs_n256_k4_lo(sized(acc_o), sized(&mut pa), vb),
            }
        }
        return;
    }
    let mut vb = [0u64; KP];
    for (kk, d) in vb.iter_mut().enumerate() {
        *d = desc_sw128(v_s + kk as u32 * 16 * 128, BN as u32 * 128, 1024);
    }
    let mut pa = *pa;
    unsafe {
        match D {
            64 => E::rs_n64_k8(sized(acc_o), sized(&mut pa), sized(&mut vb)),
            96 => E::rs_n128_k8(sized(acc_o), sized(&mut pa), sized(&mut vb)),
            128 => E::rs_n128_k8(sized(acc_o), sized(&mut pa), sized(&mut vb)),
            192 => E::rs_n192_k4(sized(acc_o), sized(&mut pa), sized(&mut vb)),
            _ => E::rs_n256_k4(sized(acc_o), sized(&mut pa), sized(&mut vb)),
        }
    }
}

/// Scores of tile `n_block` (this warp's 16 rows) -> P as the A fragments of the P V product (`pa`), and
/// each row's O rescale factor (`factor`, 1 when the max did not move).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn softmax<E: WgElem, const BN: usize, const NN: usize, const KP: usize>(a: &BlockArgs, acc_s: &mut [[f32; 4]; NN], row_state: &mut [RowState; 2], pa: &mut [[u32; 4]; KP], kept: &KeptP, factor: &mut [f32; 2], n_block: i32, rows: i32, warp: usize, scale_log2: f32, alibi_code: AlibiCode, lazy: bool) {
    softmax_in_place::<BN, NN>(a, acc_s, row_state, factor, n_block, rows, warp, scale_log2, alibi_code, lazy);
    pack_p::<E, NN, KP>(a, acc_s, pa, kept);
}

/// `softmax` with P left in `acc_s` (f32): `pack_p` converts it (and applies dropout) when the
/// registers of the previous P are free.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn softmax_in_place<const BN: usize, const NN: usize>(a: &BlockArgs, acc_s: &mut [[f32; 4]; NN], row_state: &mut [RowState; 2], factor: &mut [f32; 2], n_block: i32, rows: i32, warp: usize, scale_log2: f32, alibi_code: AlibiCode, lazy: bool) {
    let lane = opaque_u32(thread_idx_x()) as usize % 32;
    let (g, t) = ((lane / 4) as i32, (lane % 4) as i32);
    let n0 = n_block * BN as i32;
    let masked = tile_needs_mask(a.m0, rows, n0, BN as i32, a.seqlen_q, a.seqlen_k, a.window_left, a.window_right);
    let row0 = a.m0 + (warp * 16) as i32 + g;
    scores_to_p::<1, NN>(a, core::array::from_mut(acc_s), core::array::from_mut(row_state), masked, row0, n0, t, scale_log2, alibi_code, lazy, true, #[inline(always)] |_, h, f| factor[h] = f);
}

/// P (f32, in the accumulator layout) -> the A fragments of the P V product: its k16 steps are pairs of
/// S tiles (mma.sync's C layout is wgmma's register A); then dropout's zeros (`scores_to_p` leaves them
/// to this function), `kept` being the tile's `kept_of`.
#[inline(always)]
pub(crate) fn pack_p<E: WgElem, const NN: usize, const KP: usize>(a: &BlockArgs, acc_s: &[[f32; 4]; NN], pa: &mut [[u32; 4]; KP], kept: &KeptP) {
    for kk in 0..NN / 2 {
        pa[kk] = a_fragment::<E>(&acc_s[2 * kk], &acc_s[2 * kk + 1]);
    }
    if a.mods.dropout {
        drop_p::<KP>(kept, pa);
    }
}

/// Dropout's verdicts for key tile `n_block` of this warp's rows (`KeptP::ALL` without dropout), drawn
/// where an asynchronous product hides the integer work (`ws::kept_under_s` says which).
#[inline(always)]
pub(crate) fn kept_of<const BN: usize, const KP: usize>(a: &BlockArgs, n_block: i32, warp: usize) -> KeptP {
    if !a.mods.dropout {
        return KeptP::ALL;
    }
    let lane = opaque_u32(thread_idx_x()) as i32 % 32;
    let (g, t) = (lane / 4, lane % 4);
    kept_p::<KP>(&a.mods, a.m0 + (warp * 16) as i32 + g, n_block * BN as i32 + 2 * t)
}

/// O's rows (this thread's two: g and g + 8 of its warp's 16) times their softmax rescale factors.
#[inline(always)]
pub(crate) fn rescale_o<const DN: usize>(acc_o: &mut [[f32; 4]; DN], factor: &[f32; 2]) {
    for frag in acc_o.iter_mut() {
        frag[0] *= factor[0];
        frag[1] *= factor[0];
        frag[2] *= factor[1];
        frag[3] *= factor[1];
    }
}

/// Rows of the block inside the sequence (at most `QM`) and its key tiles `[n_min, n_max)`.
#[inline(always)]
pub(crate) fn block_plan<const BN: usize, const QM: usize>(a: &BlockArgs) -> (i32, i32, i32) {
    let rows = {
        let r = a.seqlen_q - a.m0;
        if r > QM as i32 { QM as i32 } else { r }
    };
    let (n_min, n_max) = n_block_range(a.m0, rows, a.seqlen_q, a.seqlen_k, a.window_left, a.window_right, BN as i32);
    let (n_min, n_max) = a.split_range(n_min, n_max);
    (rows, n_min, n_max)
}

/// Start the copies a block's first steps need, its tile 0 being running tile `t0`: Q and K_0 in one
/// group (the first S), K_1 (if any) and V_0 in the next (the first loop step).
#[inline(always)]
unsafe fn load_first<const D: usize, const BN: usize>(base: u32, a: &BlockArgs, rows: i32, n_max: i32, n_tiles: i32, t0: usize, tid: usize) {
    unsafe {
        load_tile_sw128::<D, BM>(base, a.q, a.q_row_bytes, rows, tid);
        load_kv::<D, BN, false>(base, t0, a, n_max - 1, tid);
    }
    commit_group();
    if n_tiles > 1 {
        unsafe { load_kv::<D, BN, false>(base, t0 + 1, a, n_max - 2, tid) };
    }
    unsafe { load_kv::<D, BN, true>(base, t0, a, n_max - 1, tid) };
    commit_group();
}

/// One block's attention over rows `[m0, m0 + 128) ∩ [0, seqlen_q)` (the mma.sync kernel's `attend`
/// with wgmma products). `DN` n8 tiles of O (the head dim in whole 64-column groups), `NN = BN / 8`, `KP = BN / 16`.
/// Its tile i is running tile `t0 + i`;
/// `prefetched`: its first copies were started by the previous block. While its last product runs, it
/// starts the copies of `next` (the same block's next row block, if any). Returns the next block's `t0`
/// and whether its copies are started.
#[inline(always)]
unsafe fn attend<E: WgElem, const D: usize, const DN: usize, const BN: usize, const NN: usize, const KP: usize>(a: &BlockArgs, next: Option<&BlockArgs>, t0: usize, prefetched: bool, tid: usize) -> (usize, bool) {
    let () = Tile::<D, BN, BM>::CHECK;
    let base = smem::base();
    let warp = tid / 32;
    let wg = (warp / 4) as u32;
    let lane = tid % 32;
    let (g, t) = ((lane / 4) as i32, (lane % 4) as i32);
    let scale_log2 = a.softmax_scale();
    let (rows, n_min, n_max) = block_plan::<BN, BM>(a);

    let mut acc_o = [[0f32; 4]; DN];
    let mut row_state = [RowState::EMPTY; 2];
    let mut ret = (t0, false);

    if n_max > n_min {
        // Tiles walk n_max-1 down to n_min. Prologue: the first copies (unless already started), S of
        // tile 0 and its P.
        let n_tiles = n_max - n_min;
        let tile = |i: i32| t0 + i as usize;
        if !prefetched {
            unsafe { load_first::<D, BN>(base, a, rows, n_max, n_tiles, t0, tid) };
        }
        copies_visible::<1>();
        let mut acc_s = [[0f32; 4]; NN];
        unsafe { issue_s::<E, D, BN, BM, NN, false>(&mut acc_s, base, wg, tile(0)) };
        let kept = kept_of::<BN, KP>(a, n_max - 1, warp);
        wait_acc::<0, NN>(&mut acc_s);
        let mut pa = [[0u32; 4]; KP];
        softmax::<E, BN, NN, KP>(a, &mut acc_s, &mut row_state, &mut pa, &kept, &mut [1f32; 2], n_max - 1, rows, warp, scale_log2, AlibiCode::general(D <= 64), false);

        // Iteration i < n_tiles - 1: S of tile i+1 and O += P_i V_i go to the tensor cores back to back; the
        // softmax of tile i+1 runs while O's product is in flight, and O is rescaled once it lands. Both
        // products are issued unconditionally (the last tile is peeled off below): a product issued in
        // one branch only would make the compiler copy its in-flight accumulators at the join, and ptxas
        // then serializes every wgmma.
        let mut i = 0;
        while i + 1 < n_tiles {
            // K_{i+1} and V_i have landed; every warp is done with K_i and V_{i-1}, whose slots take K_{i+2}
            // and V_{i+1}.
            copies_visible::<0>();
            if i + 2 < n_tiles {
                unsafe { load_kv::<D, BN, false>(base, tile(i + 2), a, n_max - 3 - i, tid) };
            }
            unsafe { load_kv::<D, BN, true>(base, tile(i + 1), a, n_max - 2 - i, tid) };
            commit_group();
            unsafe {
                issue_s::<E, D, BN, BM, NN, false>(&mut acc_s, base, wg, tile(i + 1));
                issue_pv::<E, D, DN, BN, BM, KP, false>(&mut acc_o, &pa, base, tile(i));
            }
            let kept = kept_of::<BN, KP>(a, n_max - 2 - i, warp);
            wait_acc::<1, NN>(&mut acc_s);
            let mut pa_next = [[0u32; 4]; KP];
            let mut factor = [1f32; 2];
            softmax::<E, BN, NN, KP>(a, &mut acc_s, &mut row_state, &mut pa_next, &kept, &mut factor, n_max - 2 - i, rows, warp, scale_log2, AlibiCode::general(D <= 64), false);
            wait_acc::<0, DN>(&mut acc_o);
            keep_p::<KP>(&mut pa);
            rescale_o(&mut acc_o, &factor);
            pa = pa_next;
            i += 1;
        }
        // V of the last tile has landed (the last loop step waited for it; with one tile, the prologue
        // did not, so wait here), and every warpgroup is done with Q and all K: the next block's Q, K_0,
        // K_1 and V_0 (the V slot after the last one's) load while the last product and the epilogue run.
        copies_visible::<0>();
        let t_next = tile(n_tiles);
        ret = (t_next, false);
        if let Some(nx) = next {
            let (rows_nx, n_min_nx, n_max_nx) = block_plan::<BN, BM>(nx);
            if n_max_nx > n_min_nx {
                unsafe { load_first::<D, BN>(base, nx, rows_nx, n_max_nx, n_max_nx - n_min_nx, t_next, tid) };
                ret = (t_next, true);
            }
        }
        // The last tile: O += P V only.
        unsafe { issue_pv::<E, D, DN, BN, BM, KP, false>(&mut acc_o, &pa, base, tile(n_tiles - 1)) };
        wait_acc::<0, DN>(&mut acc_o);
        keep_p::<KP>(&mut pa);
    }

    store_out::<E, 1, DN>(a, core::array::from_ref(&acc_o), core::array::from_ref(&row_state), D, (warp * 16) as i32 + g, rows, t, scale_log2);
    ret
}

/// Kernel body: like `for_each_row_block`, with the row blocks of one (sequence, head) chained so each
/// block's first copies start under the previous block's last product, when the host's grid gives a block
/// several row blocks (`fwd_launch`: masked problems, or K/V that fits L2).
#[inline(always)]
unsafe fn wg_entry<E: WgElem, const D: usize, const DN: usize, const BN: usize, const NN: usize, const KP: usize, const PAGED: bool>(p: &FwdParams) {
    let mut t0 = 0usize;
    let mut prefetched = false;
    unsafe {
        // No score modifiers (the mma.sync and ws kernels have them).
        for_each_row_block::<D, PAGED, false, false>(p, None, BM, THREADS, #[inline(always)] |args, next, tid| {
            (t0, prefetched) = attend::<E, D, DN, BN, NN, KP>(args, next, t0, prefetched, tid);
        })
    }
}

macro_rules! fwd_wg_kernels {
    ($(($d:literal, $dt:ident, $name:expr)),* $(,)?) => {$(
        const _: () = {
            const BN: usize = match fwd_wg_config($d) { Some(c) => c.block_n, None => 0 };
            #[unsafe(export_name = $name)]
            pub unsafe extern "ptx-kernel" fn kernel(p: FwdParams) {
                // O in whole 64-column groups: head dim 96 multiplies P by V's zero-filled columns up to 128.
                unsafe { wg_entry::<$dt, $d, { ($d + 63) / 64 * 8 }, BN, { BN / 8 }, { BN / 16 }, false>(&p) }
            }
            #[unsafe(export_name = concat!($name, "_paged"))]
            pub unsafe extern "ptx-kernel" fn kernel_paged(p: FwdParams) {
                unsafe { wg_entry::<$dt, $d, { ($d + 63) / 64 * 8 }, BN, { BN / 8 }, { BN / 16 }, true>(&p) }
            }
        };
    )*};
}
crate::for_each_fwd_wg_variant!(fwd_wg_kernels);
