//! Hopper forward (sm_90a): the same algorithm and block walk as the mma.sync kernel, with both products
//! on wgmma. A block is two warpgroups over 128 query rows (each warp keeps 16 rows, so the accumulator
//! layout, the masking and the online softmax are the mma.sync kernel's with one m-tile per warp).
//! Q and two stages of K/V sit in shared memory in the 128-byte swizzle wgmma reads (cp.async fills it):
//! S = Q K^T reads both from there, O += P V takes P from registers and V transposed on read.

use super::{a_fragment, for_each_row_block, BlockArgs, Elem, BF16, F16};
use crate::arch::cp_async::{commit_group, cp_async_16, wait_group};
use crate::arch::math::tanh;
use crate::arch::mem::{st_global_f32, st_global_u32};
use crate::arch::reg::{opaque_i64, opaque_u32};
use crate::arch::smem;
use crate::arch::sync::sync_threads;
use crate::arch::wgmma::{self, desc_sw128, sw128_offset};
use crate::block::{n_block_range, tile_needs_mask};
use crate::mask::key_range;
use crate::params::FwdParams;
use crate::softmax::{finalize_row, update_row, RowState};
use crate::variants::{fwd_wg_config, fwd_wg_smem_bytes};

/// Query rows per block (two warpgroups of 64) and threads.
const BM: usize = 128;
const THREADS: usize = 256;

/// The 16-bit input type's wgmma products at the shapes this kernel uses.
pub trait WgElem: Elem {
    unsafe fn ss_n128(d: &mut [[f32; 4]; 16], a: u64, b: u64, accumulate: u32);
    unsafe fn rs_n64(d: &mut [[f32; 4]; 8], a: [u32; 4], b: u64);
    unsafe fn rs_n128(d: &mut [[f32; 4]; 16], a: [u32; 4], b: u64);
}

impl WgElem for BF16 {
    #[inline(always)]
    unsafe fn ss_n128(d: &mut [[f32; 4]; 16], a: u64, b: u64, accumulate: u32) {
        unsafe { wgmma::ss_n128_bf16(d, a, b, accumulate) }
    }
    #[inline(always)]
    unsafe fn rs_n64(d: &mut [[f32; 4]; 8], a: [u32; 4], b: u64) {
        unsafe { wgmma::rs_n64_bf16(d, a, b) }
    }
    #[inline(always)]
    unsafe fn rs_n128(d: &mut [[f32; 4]; 16], a: [u32; 4], b: u64) {
        unsafe { wgmma::rs_n128_bf16(d, a, b) }
    }
}

impl WgElem for F16 {
    #[inline(always)]
    unsafe fn ss_n128(d: &mut [[f32; 4]; 16], a: u64, b: u64, accumulate: u32) {
        unsafe { wgmma::ss_n128_f16(d, a, b, accumulate) }
    }
    #[inline(always)]
    unsafe fn rs_n64(d: &mut [[f32; 4]; 8], a: [u32; 4], b: u64) {
        unsafe { wgmma::rs_n64_f16(d, a, b) }
    }
    #[inline(always)]
    unsafe fn rs_n128(d: &mut [[f32; 4]; 16], a: [u32; 4], b: u64) {
        unsafe { wgmma::rs_n128_f16(d, a, b) }
    }
}

/// `O += P V` over one k16 step at N = D (`DN = D / 8` accumulator tiles).
#[inline(always)]
unsafe fn pv<E: WgElem, const DN: usize>(acc: &mut [[f32; 4]; DN], a: [u32; 4], b: u64) {
    // DN is 8 or 16 (checked in Tile::CHECK): the casts only name the array's length.
    unsafe {
        if DN == 8 {
            E::rs_n64(&mut *(acc as *mut [[f32; 4]; DN] as *mut [[f32; 4]; 8]), a, b)
        } else {
            E::rs_n128(&mut *(acc as *mut [[f32; 4]; DN] as *mut [[f32; 4]; 16]), a, b)
        }
    }
}

/// Wait for this warpgroup's O product (`DN` accumulator tiles).
#[inline(always)]
fn wait_o<const DN: usize>(acc: &mut [[f32; 4]; DN]) {
    unsafe {
        if DN == 8 {
            wgmma::wait_n64(&mut *(acc as *mut [[f32; 4]; DN] as *mut [[f32; 4]; 8]))
        } else {
            wgmma::wait_n128(&mut *(acc as *mut [[f32; 4]; DN] as *mut [[f32; 4]; 16]))
        }
    }
}

/// Shared-memory layout for head dim `D` and `BN` keys per tile: Q, K stages, V stages, each tile
/// `[D / 64][rows][64]` swizzled (sw128_offset), every 64-column group 1024-byte aligned.
struct Tile<const D: usize, const BN: usize>;

impl<const D: usize, const BN: usize> Tile<D, BN> {
    const Q_BYTES: u32 = (BM * D * 2) as u32;
    const KV_BYTES: u32 = (BN * D * 2) as u32;
    const CHECK: () = {
        let c = match fwd_wg_config(D) {
            Some(c) => c,
            None => panic!("no Hopper forward for this head dim"),
        };
        assert!(c.block_n == BN && c.block_m() == BM && c.threads() == THREADS && BN == 128);
        assert!(D == 64 || D == 128);
        assert!(fwd_wg_smem_bytes(&c) == (Self::Q_BYTES + 4 * Self::KV_BYTES) as usize);
    };
    #[inline(always)]
    fn k_stage(base: u32, s: usize) -> u32 {
        base + Self::Q_BYTES + s as u32 * Self::KV_BYTES
    }
    #[inline(always)]
    fn v_stage(base: u32, s: usize) -> u32 {
        base + Self::Q_BYTES + (2 + s as u32) * Self::KV_BYTES
    }
}

/// Copy `ROWS` rows of `D` 16-bit values into a swizzled tile; rows at or past `valid_rows` are
/// zero-filled without touching global memory. A thread keeps one 16-byte column chunk and walks rows
/// `THREADS / (D / 8)` apart (a multiple of 8: its swizzled chunk stays the same).
#[inline(always)]
unsafe fn load_tile_sw128<const D: usize, const ROWS: usize>(dst: u32, src: u64, row_stride_bytes: i64, valid_rows: i32, tid: usize) {
    let chunks = D / 8;
    let pass_rows = THREADS / chunks;
    let tid = opaque_u32(tid as u32) as usize;
    let row_stride_bytes = opaque_i64(row_stride_bytes);
    let (r0, c) = (tid / chunks, tid % chunks);
    let mut g = src.wrapping_add((r0 as i64 * row_stride_bytes + c as i64 * 16) as u64);
    let g_step = (pass_rows as i64 * row_stride_bytes) as u64;
    let mut s = dst + sw128_offset(ROWS as u32, r0 as u32, c as u32);
    let mut i = 0;
    while i < ROWS / pass_rows {
        let valid = ((r0 + i * pass_rows) as i32) < valid_rows;
        unsafe { cp_async_16(s, if valid { g } else { src }, valid) };
        g = g.wrapping_add(g_step);
        s += (pass_rows * 128) as u32;
        i += 1;
    }
}

/// Start the copies of K/V tile `n_block` into stage `stage`.
#[inline(always)]
unsafe fn load_kv<const D: usize, const BN: usize>(base: u32, stage: usize, a: &BlockArgs, n_block: i32, tid: usize) {
    let n0 = n_block as i64 * BN as i64;
    let valid = a.seqlen_k - n_block * BN as i32;
    unsafe {
        load_tile_sw128::<D, BN>(Tile::<D, BN>::k_stage(base, stage), a.k.wrapping_add((n0 * a.k_row_bytes) as u64), a.k_row_bytes, valid, tid);
        load_tile_sw128::<D, BN>(Tile::<D, BN>::v_stage(base, stage), a.v.wrapping_add((n0 * a.v_row_bytes) as u64), a.v_row_bytes, valid, tid);
    }
}

/// One block's attention over rows `[m0, m0 + 128) ∩ [0, seqlen_q)` (the mma.sync kernel's `attend`
/// with wgmma products). `DN = D / 8`, `NN = BN / 8`.
#[inline(always)]
unsafe fn attend<E: WgElem, const D: usize, const DN: usize, const BN: usize, const NN: usize>(a: &BlockArgs, tid: usize) {
    let () = Tile::<D, BN>::CHECK;
    let base = smem::base();
    let warp = tid / 32;
    let wg = (warp / 4) as u32;
    let lane = tid % 32;
    let (g, t) = ((lane / 4) as i32, (lane % 4) as i32);
    let rows = {
        let r = a.seqlen_q - a.m0;
        if r > BM as i32 { BM as i32 } else { r }
    };
    let scale_log2 = if a.scale_log2 < 0.0 { -a.scale_log2 } else { a.scale_log2 };
    let (n_min, n_max) = n_block_range(a.m0, rows, a.seqlen_q, a.seqlen_k, a.window_left, a.window_right, BN as i32);

    let mut acc_o = [[0f32; 4]; DN];
    let mut row_state = [RowState::EMPTY; 2];

    if n_max > n_min {
        // Prologue: Q and the last K/V tile in one group.
        unsafe { load_tile_sw128::<D, BM>(base, a.q, a.q_row_bytes, rows, tid) };
        let n_tiles = n_max - n_min;
        unsafe { load_kv::<D, BN>(base, 0, a, n_max - 1, tid) };
        commit_group();

        let mut it = 0;
        while it < n_tiles {
            let n_block = n_max - 1 - it;
            let stage = (it & 1) as usize;
            if it + 1 < n_tiles {
                unsafe { load_kv::<D, BN>(base, 1 - stage, a, n_block - 1, tid) };
                commit_group();
                wait_group::<1>();
            } else {
                wait_group::<0>();
            }
            // The copies wrote through the generic proxy; wgmma reads through the async one.
            wgmma::fence_proxy_async_shared();
            sync_threads();
            let n0 = n_block * BN as i32;
            let masked = tile_needs_mask(a.m0, rows, n0, BN as i32, a.seqlen_q, a.seqlen_k, a.window_left, a.window_right);
            let base = opaque_u32(base);
            let k_s = Tile::<D, BN>::k_stage(base, stage);
            let v_s = Tile::<D, BN>::v_stage(base, stage);

            // S = Q K^T: this warpgroup's 64 rows x BN keys, k16 steps along the head dim (four per
            // 64-column group: +32 bytes inside the swizzled row).
            let mut acc_s = [[0f32; 4]; 16];
            wgmma::fence();
            for kk in 0..D / 16 {
                let col = (kk % 4) as u32 * 32;
                let qa = desc_sw128(base + (kk / 4) as u32 * (BM as u32 * 128) + wg * 64 * 128 + col, 16, 1024);
                let kb = desc_sw128(k_s + (kk / 4) as u32 * (BN as u32 * 128) + col, 16, 1024);
                unsafe { E::ss_n128(&mut acc_s, qa, kb, (kk > 0) as u32) };
            }
            wgmma::commit();
            wgmma::wait_n128(&mut acc_s);

            if a.softcap_pre != 0.0 {
                for frag in acc_s.iter_mut() {
                    for x in frag.iter_mut() {
                        *x = tanh(*x * a.softcap_pre);
                    }
                }
            } else if a.scale_log2 < 0.0 {
                for frag in acc_s.iter_mut() {
                    for x in frag.iter_mut() {
                        *x = -*x;
                    }
                }
            }

            if masked {
                for h in 0..2 {
                    let row = a.m0 + (warp * 16) as i32 + g + 8 * h as i32;
                    let (lo, hi) = key_range(row, a.seqlen_q, a.seqlen_k, a.window_left, a.window_right);
                    for j in 0..NN {
                        for e in 0..2 {
                            let col = n0 + 8 * j as i32 + 2 * t + e as i32;
                            if col < lo || col > hi {
                                acc_s[j][2 * h + e] = f32::NEG_INFINITY;
                            }
                        }
                    }
                }
            }

            for h in 0..2 {
                let mut s_row = [[0f32; 2]; NN];
                for j in 0..NN {
                    s_row[j] = [acc_s[j][2 * h], acc_s[j][2 * h + 1]];
                }
                if let Some(f) = update_row(&mut row_state[h], &mut s_row, scale_log2) {
                    for frag in acc_o.iter_mut() {
                        frag[2 * h] *= f;
                        frag[2 * h + 1] *= f;
                    }
                }
                for j in 0..NN {
                    acc_s[j][2 * h] = s_row[j][0];
                    acc_s[j][2 * h + 1] = s_row[j][1];
                }
            }

            // O += P V: P's k16 steps are pairs of S tiles (mma.sync's C layout is wgmma's register A);
            // V [keys][D] is N-major: 16 keys = two 8-row groups (2048 bytes), 64-column groups BN * 128
            // bytes apart.
            let mut pa = [[0u32; 4]; 8];
            for kk in 0..NN / 2 {
                pa[kk] = a_fragment::<E>(&acc_s[2 * kk], &acc_s[2 * kk + 1]);
            }
            wgmma::fence();
            for kk in 0..BN / 16 {
                let vb = desc_sw128(v_s + kk as u32 * 16 * 128, BN as u32 * 128, 1024);
                unsafe { pv::<E, DN>(&mut acc_o, pa[kk], vb) };
            }
            wgmma::commit();
            wait_o::<DN>(&mut acc_o);
            // The next iteration's copy overwrites this stage.
            sync_threads();
            it += 1;
        }
    }

    // Epilogue: O / rowsum in the input type, and the LSE. Empty rows come out as 0 and -inf.
    for h in 0..2 {
        let (inv_sum, lse) = finalize_row(&row_state[h], scale_log2);
        let r = (warp * 16) as i32 + g + 8 * h as i32;
        if r < rows {
            let o_row = a.o + (r as i64 * a.o_row_stride * 2) as u64;
            for j in 0..DN {
                let v = E::pack(acc_o[j][2 * h] * inv_sum, acc_o[j][2 * h + 1] * inv_sum);
                unsafe { st_global_u32(o_row + ((8 * j as i32 + 2 * t) * 2) as u64, v) };
            }
            if t == 0 {
                unsafe { st_global_f32(a.lse + (r * 4) as u64, lse) };
            }
        }
    }
}

macro_rules! fwd_wg_kernels {
    ($(($d:literal, $dt:ident, $name:literal)),* $(,)?) => {$(
        const _: () = {
            #[unsafe(export_name = $name)]
            pub unsafe extern "ptx-kernel" fn kernel(p: FwdParams) {
                unsafe { for_each_row_block::<$d>(&p, BM, THREADS, |args, tid| attend::<$dt, $d, { $d / 8 }, 128, 16>(args, tid)) }
            }
        };
    )*};
}
crate::for_each_fwd_wg_variant!(fwd_wg_kernels);
