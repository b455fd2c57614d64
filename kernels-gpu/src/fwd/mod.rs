//! Fused attention forward on tensor cores (mma.sync m16n8k16, f32 accumulate).
//! A block owns 16*MT*NW query rows of one (sequence, head); it walks the K/V tiles those rows can see,
//! last to first, through a two-stage cp.async pipeline: S = Q K^T, online softmax in registers, O += P V.
//! The epilogue writes O / rowsum and the LSE; rows that saw no key, and padding rows, get 0 and -inf.
//! On Hopper the sm_90a module's `wg` kernels take head dims 64, 96, 128, 192 and 256 (wgmma).

pub(crate) mod kv;
mod probs;
#[cfg(fa_sm90)]
pub(crate) mod wg;
#[cfg(fa_sm90)]
mod wg_elem;
#[cfg(fa_sm90)]
mod ws;

use crate::arch::cp_async::{commit_group, wait_group};
use crate::arch::math::{div_rem_u32, exp2, fma, tanh};
use crate::arch::reg::opaque_u32;
use crate::arch::mem::{ld_i32_at, st_global_f32, st_global_u32, st_global_v2_f32, st_global_v4};
use crate::arch::smem;
use crate::arch::sreg::{block_idx_x, block_idx_y, block_idx_z, grid_dim_x, thread_idx_x};
use crate::arch::sync::{cluster_sync, sync_threads};
use crate::block::{n_block_range, tile_needs_mask};
use crate::mask::{allowed, for_each_hidden_qk};
use crate::mods::{alibi_qk, alibi_qk_fast, keep_qk, AlibiCode, HeadMods, MIN_ALIBI_SCALE};
use crate::params::{CombineParams, FwdParams};
use crate::seqlen::SeqlenInfo;
use crate::softmax::{finalize_row, quad_sum, update_row, update_row_offset, RowState};
use crate::tile::{warp_gemm, SmemTile};
use crate::variants::FwdConfig;
// The tile vocabulary, also imported from here by the kernels of this module.
pub(crate) use crate::tile::{a_fragment, load_tile, load_tile_rows, load_tile_whole_fast};
use kv::{KvRows, Pages, Rows, TilePages};
pub use crate::tile::{Elem, BF16, F16};

/// Compile-time shape of a kernel: head dim `D` (`DN = D / 8` n8 tiles), `MT` m16 tiles per warp, `NW`
/// warps, `BN` keys per tile, `NN` n8 tiles of them per warp: `BN / 8`, or with `KW = BN / (8 NN)` > 1
/// (`FwdConfig::key_warps`, the decode kernels) each group of `KW` warps shares its rows and splits the
/// tile's keys. Stable Rust cannot size arrays by `D / 8`, so both are given.
struct Shape<const D: usize, const DN: usize, const MT: usize, const NW: usize, const BN: usize, const NN: usize>;

impl<const D: usize, const DN: usize, const MT: usize, const NW: usize, const BN: usize, const NN: usize> Shape<D, DN, MT, NW, BN, NN> {
    const KW: usize = BN / (8 * NN);
    /// The layout arithmetic is the host's too (grid, shared-memory size): one definition in variants.rs.
    const CONFIG: FwdConfig = FwdConfig { head_dim: D, m_tiles: MT, warps: NW, key_warps: Self::KW, block_n: BN, q_in_regs: false };
    const BM: usize = Self::CONFIG.block_m();
    const THREADS: usize = Self::CONFIG.threads();
    const ROW_BYTES: u32 = Self::CONFIG.row_bytes() as u32;
    const Q_BYTES: u32 = Self::BM as u32 * Self::ROW_BYTES;
    const KV_BYTES: u32 = BN as u32 * Self::ROW_BYTES;
    const CHECK: () = {
        assert!(DN * 8 == D && NN * 8 * Self::KW == BN && NW % Self::KW == 0 && D % 16 == 0 && NN % 2 == 0);
        assert!((Self::BM * D / 8) % Self::THREADS == 0 && (BN * D / 8) % Self::THREADS == 0);
        // The layout below is the one the host sizes: the Q tile, then two stages of K and V, or with
        // key warps one K and one V buffer.
        assert!((Self::Q_BYTES + if Self::KW > 1 { 2 } else { 4 } * Self::KV_BYTES) as usize == Self::CONFIG.smem_bytes());
        // The merge's scratch (`merge_key_warps`) fits in the K/V stages.
        assert!(Self::KW == 1 || (Self::KW <= 8 && (NW * 32 * (MT * DN * 16 + MT * 16)) as u32 <= 2 * Self::KV_BYTES));
    };

    /// Shared address of K stage `s` (V stage `s` follows both K stages).
    #[inline(always)]
    fn k_stage(base: u32, s: usize) -> u32 {
        base + Self::Q_BYTES + s as u32 * Self::KV_BYTES
    }
    #[inline(always)]
    fn v_stage(base: u32, s: usize) -> u32 {
        base + Self::Q_BYTES + (2 + s as u32) * Self::KV_BYTES
    }
}

/// Write rows `[row_begin, row_end)` of one head as padding: out 0, LSE -inf. 16-byte stores.
#[inline(always)]
unsafe fn write_padding<const D: usize>(p: &FwdParams, o_head: u64, lse_head: u64, row_begin: i32, row_end: i32, tid: usize, threads: usize) {
    let chunks = (D / 8) as i64;
    let n = (row_end - row_begin) as i64 * chunks;
    let mut idx = tid as i64;
    while idx < n {
        let r = row_begin as i64 + idx / chunks;
        let c = idx % chunks;
        unsafe { st_global_v4(o_head + ((r * p.o_row_stride + c * 8) * 2) as u64, [0; 4]) };
        if c == 0 {
            unsafe { st_global_f32(lse_head + (r * 4) as u64, f32::NEG_INFINITY) };
        }
        idx += threads as i64;
    }
}

/// Everything one block needs to attend rows `[m0, m0 + BM)` of one (sequence, head).
pub(crate) struct BlockArgs {
    /// Q rows `m0..` of this head, and the row stride in bytes; packed GQA (`q_pack > 1`): the first row
    /// of the group's first q head, and `q_pack_bytes` between the group's heads.
    pub(crate) q: u64,
    pub(crate) q_row_bytes: i64,
    pub(crate) q_pack_bytes: i64,
    /// Where this sequence's K/V rows of its kv head are (contiguous or paged).
    pub(crate) kv: KvRows,
    /// Out row `m0` of this head, its row stride in elements, and LSE row `m0`.
    pub(crate) o: u64,
    pub(crate) o_row_stride: i64,
    pub(crate) lse: u64,
    pub(crate) m0: i32,
    pub(crate) seqlen_q: i32,
    pub(crate) seqlen_k: i32,
    pub(crate) window_left: i32,
    pub(crate) window_right: i32,
    pub(crate) scale_log2: f32,
    pub(crate) softcap_pre: f32,
    /// ALiBi and dropout (`HeadMods::OFF` in kernels without them).
    pub(crate) mods: HeadMods,
    /// Split-KV (paged kernels): this block attends split `split` of `num_splits` of its key tiles and
    /// writes `o` as f32 (`o_f32`; its row stride then counts 2-byte units). 0, 1, false elsewhere.
    pub(crate) split: i32,
    pub(crate) num_splits: i32,
    pub(crate) o_f32: bool,
    /// Packed GQA (`FwdParams::q_pack`, the `_decode` kernels): row r is query `r / q_pack` of
    /// `seqlen_q / q_pack`; 1 elsewhere.
    pub(crate) q_pack: i32,
    /// The decode kernels' own epilogue (`DecodeOut`); `DecodeOut::NONE` elsewhere.
    pub(crate) fin: DecodeOut,
}

/// Where a decode block that finishes its rows itself writes them (`CombineParams`, the `_decode_fin`
/// kernels' second parameter, `out` nonzero): the out row of query 0 of the kv head's first q head in this
/// sequence, and the elements between queries (`out_row`) and between the group's q heads (`out_head`);
/// the same for the LSE (f32). The blocks of one row block's `num_splits` splits form a cluster (one block
/// without split-KV) and merge their states through distributed shared memory (`finish_decode`), so no
/// partial results and no combine kernel. `fused` false: f32 partials for the combine kernel.
#[derive(Clone, Copy)]
pub(crate) struct DecodeOut {
    pub(crate) fused: bool,
    pub(crate) out: u64,
    pub(crate) out_row: i64,
    pub(crate) out_head: i64,
    pub(crate) lse: u64,
    pub(crate) lse_row: i64,
    pub(crate) lse_head: i64,
}

impl DecodeOut {
    pub(crate) const NONE: DecodeOut = DecodeOut { fused: false, out: 0, out_row: 0, out_head: 0, lse: 0, lse_row: 0, lse_head: 0 };

    /// Kv head `hk` of sequence `b` (q heads `hk * pack..`) in `cp`'s out and lse (2-byte out elements).
    #[inline(always)]
    fn new(cp: &CombineParams, b: i32, hk: i32) -> DecodeOut {
        if cp.out == 0 {
            return DecodeOut::NONE;
        }
        let (b, h0) = (b as i64, hk as i64 * cp.pack as i64);
        let ([ob, or, oh], [lb, lh, lr]) = (cp.out_strides, cp.lse_strides);
        DecodeOut {
            fused: true,
            out: cp.out.wrapping_add(((b * ob + h0 * oh) * 2) as u64),
            out_row: or,
            out_head: oh,
            lse: cp.lse.wrapping_add(((b * lb + h0 * lh) * 4) as u64),
            lse_row: lr,
            lse_head: lh,
        }
    }
}

impl BlockArgs {
    /// The queries rows `[m0, m0 + rows)` are: (first, count), and how many the sequence has.
    #[inline(always)]
    pub(crate) fn queries(&self, rows: i32) -> (i32, i32, i32) {
        if self.q_pack <= 1 {
            return (self.m0, rows, self.seqlen_q);
        }
        // Unchecked divisions: q_pack > 1.
        let pack = self.q_pack as u32;
        let first = div_rem_u32(self.m0 as u32, pack).0 as i32;
        let last = div_rem_u32((self.m0 + rows - 1) as u32, pack).0 as i32;
        (first, last - first + 1, div_rem_u32(self.seqlen_q as u32, pack).0 as i32)
    }

    /// This block's share `[lo, hi)` of the key tiles `[n_min, n_max)`: all of them, or with split-KV
    /// the `split`-th of `num_splits` nearly equal runs (possibly empty: the block then writes 0 / -inf).
    #[inline(always)]
    pub(crate) fn split_range(&self, n_min: i32, n_max: i32) -> (i32, i32) {
        if self.num_splits <= 1 || n_max <= n_min {
            return (n_min, n_max);
        }
        // Unchecked division: num_splits > 1 here.
        let per = div_rem_u32((n_max - n_min + self.num_splits - 1) as u32, self.num_splits as u32).0 as i32;
        let lo = n_min + self.split * per;
        let hi = if lo + per < n_max { lo + per } else { n_max };
        if lo < hi { (lo, hi) } else { (n_min, n_min) }
    }

    /// The scale the online softmax multiplies raw scores by: `|scale_log2|` (with ALiBi at least
    /// `MIN_ALIBI_SCALE`, which its bias in raw units is divided by).
    #[inline(always)]
    pub(crate) fn softmax_scale(&self) -> f32 {
        let s = if self.scale_log2 < 0.0 { -self.scale_log2 } else { self.scale_log2 };
        if self.mods.alibi && s < MIN_ALIBI_SCALE { MIN_ALIBI_SCALE } else { s }
    }
}

/// One block's attention over rows `[m0, m0 + BM) ∩ [0, seqlen_q)`.
#[inline(always)]
unsafe fn attend<E: Elem, const D: usize, const DN: usize, const MT: usize, const NW: usize, const BN: usize, const NN: usize, const QR: usize, const DECODE: bool>(a: &BlockArgs, tid: usize) {
    let () = Shape::<D, DN, MT, NW, BN, NN>::CHECK;
    let bm = Shape::<D, DN, MT, NW, BN, NN>::BM;
    let threads = Shape::<D, DN, MT, NW, BN, NN>::THREADS;
    let row_bytes = Shape::<D, DN, MT, NW, BN, NN>::ROW_BYTES;
    let base = smem::base();
    let kw = Shape::<D, DN, MT, NW, BN, NN>::KW;
    // This warp's rows (16 MT from `row_warp * 16 MT`) and, with key warps, its keys of each tile
    // (8 NN from `key_part * 8 NN`).
    let (row_warp, key_part) = (tid / 32 / kw, tid / 32 % kw);
    let lane = tid % 32;
    let (g, t) = ((lane / 4) as i32, (lane % 4) as i32);
    let rows = {
        let r = a.seqlen_q - a.m0;
        if r > bm as i32 { bm as i32 } else { r }
    };
    let scale_log2 = a.softmax_scale();
    let (qm0, qrows, sq) = a.queries(rows);
    let (n_min, n_max) = n_block_range(qm0, qrows, sq, a.seqlen_k, a.window_left, a.window_right, BN as i32);
    let (n_min, n_max) = a.split_range(n_min, n_max);

    let mut acc_o = [[[0f32; 4]; DN]; MT];
    // With QR = D / 16, this warp's Q fragments stay in registers after the first tile (fewer
    // shared-memory reads per mma); with QR = 0 they are re-read from shared memory every tile.
    let mut q_regs = [[[0u32; 4]; QR]; MT];
    let mut row_state = [[RowState::EMPTY; 2]; MT];

    if n_max > n_min {
        // Prologue: Q and the last K/V tile in one group. Paged: each tile's block-table entries are read
        // a tile ahead (`TilePages`), so that their latency hides under the previous tile's products.
        if a.q_pack > 1 {
            // Packed GQA: packed row m0 + r is query (m0 + r) / q_pack of the group's q head
            // (m0 + r) % q_pack. Unchecked division: q_pack > 1.
            let pack = a.q_pack as u32;
            unsafe {
                load_tile_rows::<D, 1>([base], [a.q], rows, tid, bm, threads, #[inline(always)] |r| {
                    let (i, g) = div_rem_u32((a.m0 + r) as u32, pack);
                    [a.q.wrapping_add((i as i64 * a.q_row_bytes + g as i64 * a.q_pack_bytes) as u64)]
                })
            };
        } else {
            unsafe { load_tile::<D>(base, a.q, a.q_row_bytes, rows, tid, bm, threads) };
        }
        let n_tiles = n_max - n_min;
        let paged = a.kv.pages.paged();
        let pages_of = |n_block: i32| if paged { unsafe { a.kv.tile_pages(n_block * BN as i32, BN, tid) } } else { TilePages::NONE };
        // Key warps (the decode kernels): one K and one V buffer, loaded in turns: V_i under S_i's
        // product, K_{i+1} under P_i V_i (groups Q + K_0, V_0, then K, V alternately; empty past the
        // last tile, so that `wait_group::<1>` always finds the operand about to be read).
        let staggered = Shape::<D, DN, MT, NW, BN, NN>::KW > 1;
        let (k_buf, v_buf) = (Shape::<D, DN, MT, NW, BN, NN>::k_stage(base, 0), Shape::<D, DN, MT, NW, BN, NN>::k_stage(base, 1));
        if staggered {
            let tp = pages_of(n_max - 1);
            unsafe { load_one::<D, false>(k_buf, a, n_max - 1, tp, tid, BN, threads) };
            commit_group();
            unsafe { load_one::<D, true>(v_buf, a, n_max - 1, tp, tid, BN, threads) };
            commit_group();
        } else {
            unsafe { load_kv::<D, DN, MT, NW, BN, NN>(base, 0, a, n_max - 1, pages_of(n_max - 1), tid) };
            commit_group();
        }
        let mut ahead = if n_tiles > 1 { pages_of(n_max - 2) } else { TilePages::NONE };

        let mut it = 0;
        while it < n_tiles {
            let n_block = n_max - 1 - it;
            let stage = (it & 1) as usize;
            if staggered {
                wait_group::<1>();
            } else if it + 1 < n_tiles {
                unsafe { load_kv::<D, DN, MT, NW, BN, NN>(base, 1 - stage, a, n_block - 1, ahead, tid) };
                commit_group();
                if it + 2 < n_tiles {
                    ahead = pages_of(n_block - 2);
                }
                wait_group::<1>();
            } else {
                wait_group::<0>();
            }
            sync_threads();
            let n0 = n_block * BN as i32;
            let masked = tile_needs_mask(qm0, qrows, n0, BN as i32, sq, a.seqlen_k, a.window_left, a.window_right);
            let k_s = if staggered { k_buf } else { Shape::<D, DN, MT, NW, BN, NN>::k_stage(base, stage) };
            let v_s = if staggered { v_buf } else { Shape::<D, DN, MT, NW, BN, NN>::v_stage(base, stage) };
            let key0 = key_part * 8 * NN;

            // S = Q K^T for this warp's 16*MT rows and its 8*NN keys of the tile.
            let mut acc_s = [[[0f32; 4]; NN]; MT];
            let q = SmemTile::new(base, row_bytes).at(row_warp * 16 * MT, 0).a(lane);
            let k = SmemTile::new(k_s, row_bytes).at(key0, 0).b(lane);
            if QR > 0 && it == 0 {
                for (mt, regs) in q_regs.iter_mut().enumerate() {
                    for (kk, frag) in regs.iter_mut().enumerate() {
                        *frag = unsafe { q.load(mt * 16, kk * 16) };
                    }
                }
            }
            warp_gemm::<E, MT, NN>(
                &mut acc_s, D / 16, NN / 2,
                #[inline(always)] |kk, mt| if QR > 0 { q_regs[mt][kk] } else { unsafe { q.load(mt * 16, kk * 16) } },
                #[inline(always)] |kk, np| unsafe { k.load(np * 16, kk * 16) },
            );

            if staggered {
                // Every warp is done with K_i: K_{i+1} into its buffer.
                sync_threads();
                if it + 1 < n_tiles {
                    unsafe { load_one::<D, false>(k_buf, a, n_block - 1, ahead, tid, BN, threads) };
                }
                commit_group();
            }

            // P overwrites S (online softmax); a row whose max moved rescales its O.
            scores_to_p::<MT, NN>(a, &mut acc_s, &mut row_state, masked, a.m0 + (row_warp * 16 * MT) as i32 + g, n0 + key0 as i32, t, scale_log2, AlibiCode::general(false), DECODE, false, #[inline(always)]
            |mt, h, f| {
                for frag in acc_o[mt].iter_mut() {
                    frag[2 * h] *= f;
                    frag[2 * h + 1] *= f;
                }
            });

            if staggered {
                // V_i (K_{i+1} may still be in flight).
                wait_group::<1>();
                sync_threads();
            }
            // O += P V: the S accumulator layout of two n8 tiles is exactly the A fragment of one k16 step.
            let v = SmemTile::new(v_s, row_bytes).at(key0, 0).b_trans(lane);
            warp_gemm::<E, MT, DN>(
                &mut acc_o, NN / 2, DN / 2,
                #[inline(always)] |kk, mt| a_fragment::<E>(&acc_s[mt][2 * kk], &acc_s[mt][2 * kk + 1]),
                #[inline(always)] |kk, dp| unsafe { v.load(kk * 16, dp * 16) },
            );
            // The next iteration's copy overwrites this stage.
            sync_threads();
            if staggered {
                if it + 1 < n_tiles {
                    unsafe { load_one::<D, true>(v_buf, a, n_block - 1, ahead, tid, BN, threads) };
                    if it + 2 < n_tiles {
                        ahead = pages_of(n_block - 2);
                    }
                }
                commit_group();
            }
            it += 1;
        }
    }

    if kw > 1 {
        // Every warp reaches this (the loop's bounds are the block's); the stages are free after it.
        // The warps that return early start no copy into them: a decode block attends one row block
        // (its grid's x covers them all), so nothing overwrites the scratch while warp 0 reads it.
        let scratch = Shape::<D, DN, MT, NW, BN, NN>::k_stage(base, 0);
        let holds = unsafe { merge_key_warps::<MT, DN>(scratch, &mut acc_o, &mut row_state, key_part, kw, row_warp, lane, scale_log2) };
        if DECODE && a.fin.fused {
            // The first key warp's area of the merge's scratch, which the merge never writes (the
            // upper halves write, the lower read their partners').
            let publish = scratch;
            unsafe { finish_decode::<E, D, DN, MT>(a, &acc_o, &row_state, holds, publish, rows, tid, threads, scale_log2) };
            return;
        }
        if !holds {
            return;
        }
    }
    store_out::<E, MT, DN>(a, &acc_o, &row_state, D, (row_warp * 16 * MT) as i32 + g, rows, t, scale_log2);
}

/// The decode kernels' own epilogue (`DecodeOut`): the warp holding the block's merged state (`holds`:
/// the first key warp, rows 0..16 MT of the block) publishes it in shared memory at `publish` (O
/// unnormalized, f32 `[16 MT][D]`, then each row's max in base-2 units and its sum); after a cluster
/// barrier the cluster's blocks (one per split, `a.split` its rank) share out the rows, rank r taking
/// rows r, r + splits, ..: each merges the row's states of every block against their common max and
/// writes the row's out (q's dtype) and LSE, at the unpacked query and q head. A second cluster barrier
/// keeps every block's shared memory alive until the cluster has read it. Every thread of the block.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn finish_decode<E: Elem, const D: usize, const DN: usize, const MT: usize>(a: &BlockArgs, acc_o: &[[[f32; 4]; DN]; MT], row_state: &[[RowState; 2]; MT], holds: bool, publish: u32, rows: i32, tid: usize, threads: usize, scale_log2: f32) {
    let bm = 16 * MT;
    let () = PublishFits::<D, DN, MT>::CHECK;
    let lane = tid % 32;
    let (g, t) = (lane / 4, lane % 4);
    let o_at = |r: usize, c: usize| publish + ((r * D + c) * 4) as u32;
    let ml_at = |r: usize| publish + ((bm * D + 2 * r) * 4) as u32;
    // Laundered like the merge's conditions: one barrier, reached by every warp.
    if opaque_u32(holds as u32) != 0 {
        for mt in 0..MT {
            for h in 0..2 {
                let r = 16 * mt + 8 * h + g;
                let st = &row_state[mt][h];
                let sum = quad_sum(st.sum);
                for (j, frag) in acc_o[mt].iter().enumerate() {
                    unsafe { smem::st_v2_f32(o_at(r, 8 * j + 2 * t), [frag[2 * h], frag[2 * h + 1]]) };
                }
                if t == 0 {
                    let m = if st.max == f32::NEG_INFINITY { f32::NEG_INFINITY } else { st.max * scale_log2 };
                    unsafe { smem::st_v2_f32(ml_at(r), [m, sum]) };
                }
            }
        }
    }
    cluster_sync();
    let (splits, rank) = (a.num_splits as usize, a.split as usize);
    let mine = (rows as usize).saturating_sub(rank).div_ceil(splits);
    let mut item = tid;
    while item < mine * D {
        let (k, c) = (item / D, item % D);
        let r = rank + k * splits;
        // The row's state in each block: its max (base 2, -inf where it saw no key), sum, and O column c.
        let mut m = [f32::NEG_INFINITY; MAX_DECODE_CLUSTER];
        let mut l = [0f32; MAX_DECODE_CLUSTER];
        let mut o = [0f32; MAX_DECODE_CLUSTER];
        for s in 0..MAX_DECODE_CLUSTER {
            if s < splits {
                unsafe {
                    m[s] = smem::ld_cluster_f32(ml_at(r), s as u32);
                    l[s] = smem::ld_cluster_f32(ml_at(r) + 4, s as u32);
                    o[s] = smem::ld_cluster_f32(o_at(r, c), s as u32);
                }
            }
        }
        let mut max = f32::NEG_INFINITY;
        for &x in m.iter() {
            max = if x > max { x } else { max };
        }
        let (mut sum, mut acc) = (0f32, 0f32);
        if max != f32::NEG_INFINITY {
            for s in 0..MAX_DECODE_CLUSTER {
                // exp2(-inf) == 0: a block that saw no key of the row (or no block past `splits`) adds nothing.
                let w = exp2(m[s] - max);
                if w > 0.0 {
                    sum += w * l[s];
                    acc += w * o[s];
                }
            }
        }
        // As `finalize_row`: a row without keys (or a NaN) is out 0, LSE -inf.
        let (inv, lse) = if sum == 0.0 || sum != sum { (0.0, f32::NEG_INFINITY) } else { (crate::arch::math::rcp(sum) * a.mods.scale, (max + crate::arch::math::log2(sum)) * core::f32::consts::LN_2) };
        let (i, gq) = div_rem_u32((a.m0 + r as i32) as u32, a.q_pack as u32);
        let out = a.fin.out.wrapping_add(((i as i64 * a.fin.out_row + gq as i64 * a.fin.out_head + c as i64) * 2) as u64);
        unsafe { crate::arch::mem::st_global_u16(out, E::pack(acc * inv, 0.0)) };
        if c == 0 {
            unsafe { st_global_f32(a.fin.lse.wrapping_add(((i as i64 * a.fin.lse_row + gq as i64 * a.fin.lse_head) * 4) as u64), lse) };
        }
        item += threads;
    }
    cluster_sync();
}

/// `finish_decode`'s published state fits the first key warp's area of `merge_key_warps`' scratch.
struct PublishFits<const D: usize, const DN: usize, const MT: usize>;
impl<const D: usize, const DN: usize, const MT: usize> PublishFits<D, DN, MT> {
    const CHECK: () = assert!(16 * MT * D * 4 + 16 * MT * 8 <= 32 * 16 * (MT * DN + MT));
}

/// The most blocks (splits) one decode cluster merges (`finish_decode`); the host launches more splits
/// with partial results and the combine kernel.
pub(crate) const MAX_DECODE_CLUSTER: usize = crate::variants::MAX_DECODE_CLUSTER;

/// Key warps (`FwdConfig::key_warps`): the `kw` warps of each row group hold online-softmax states of
/// the same rows over different keys, element for element in the same fragment layout. They merge in a
/// tree through `scratch` (shared memory past the Q tile, free once the tile loop is done): each round
/// the upper half of the warps still holding a state writes it, and the lower half folds the partner's
/// into its own against the rows' common max, one partner per round, so no warp holds more than its own
/// O and one partner's fragments (a merge of every part at once kept three parts' O in registers and
/// spilled). The group's first warp (`key_part` 0) ends with the whole state and returns true: it
/// alone stores the rows. Rows that no warp saw a key of stay max -inf, sum 0. Every warp of the
/// block reaches the barriers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn merge_key_warps<const MT: usize, const DN: usize>(scratch: u32, acc_o: &mut [[[f32; 4]; DN]; MT], row_state: &mut [[RowState; 2]; MT], key_part: usize, kw: usize, row_warp: usize, lane: usize, scale_log2: f32) -> bool {
    // Per warp: its O fragments (MT DN float4s per lane), then its row states (MT float4s per lane:
    // max and sum of both row halves); lane-interleaved, so each 16-byte access is conflict-free.
    let per_warp = (32 * 16 * (MT * DN + MT)) as u32;
    let at = |part: usize, i: usize| scratch + (row_warp * kw + part) as u32 * per_warp + ((i * 32 + lane) * 16) as u32;
    let mut half = kw / 2;
    while half >= 1 {
        // `key_part` laundered at each use: LLVM otherwise threads the writers' branch into the readers'
        // past the barrier (the two conditions are correlated) and duplicates the barrier into both,
        // so the block's warps would meet at two different bar.sync (compute-sanitizer synccheck:
        // "divergent threads in block"; rust-lang/rust#137086).
        let part = opaque_u32(key_part as u32) as usize;
        let writes = part >= half && part < 2 * half;
        if writes {
            for mt in 0..MT {
                for (j, frag) in acc_o[mt].iter().enumerate() {
                    unsafe { smem::st_v4(at(key_part, mt * DN + j), frag.map(f32::to_bits)) };
                }
                let rs = &row_state[mt];
                unsafe { smem::st_v4(at(key_part, MT * DN + mt), [rs[0].max, rs[0].sum, rs[1].max, rs[1].sum].map(f32::to_bits)) };
            }
        }
        sync_threads();
        let part = opaque_u32(key_part as u32) as usize;
        if part < half {
            let partner = part + half;
            for mt in 0..MT {
                let other = unsafe { smem::ld_v4(at(partner, MT * DN + mt)) }.map(f32::from_bits);
                let mut f = [[0f32; 2]; 2];
                for h in 0..2 {
                    let mine = &mut row_state[mt][h];
                    let (om, os) = (other[2 * h], other[2 * h + 1]);
                    let max = if om > mine.max { om } else { mine.max };
                    // exp2(-inf) == 0 drops a side that saw no key; rows neither side saw stay -inf / 0.
                    let factor = |m: f32| if max == f32::NEG_INFINITY { 0.0 } else { exp2((m - max) * scale_log2) };
                    f[0][h] = factor(mine.max);
                    f[1][h] = factor(om);
                    mine.sum = mine.sum * f[0][h] + os * f[1][h];
                    mine.max = max;
                }
                for j in 0..DN {
                    let o = unsafe { smem::ld_v4(at(partner, mt * DN + j)) }.map(f32::from_bits);
                    for (i, x) in acc_o[mt][j].iter_mut().enumerate() {
                        *x = *x * f[0][i / 2] + o[i] * f[1][i / 2];
                    }
                }
            }
        }
        half /= 2;
    }
    key_part == 0
}

/// The scores of one K/V tile -> unnormalized P in place (the online softmax), for this thread's `MT`
/// m16 x `NN` n8 tiles: tanh for softcap or the sign of a negative scale, ALiBi's bias (in raw units),
/// -inf on hidden keys
/// when the tile is `masked` (this thread's rows `row0 + 16 mt (+ 8)`, keys `n0 + 8 j + 2 t (+ 1)`),
/// then each row's update (the row sums take every probability), then dropout's zeros;
/// `rescale(mt, h, f)` for each row whose max moved. Shared by the mma.sync and wgmma kernels.
/// `lazy` (a constant per kernel): `softmax::RESCALE_LOG2`'s lazy max.
/// `alibi_code` (a constant per kernel): its `linear`, ALiBi's linear form on tiles beside the diagonal
/// (below), and its `fast` general form (`mods::alibi_qk_fast`). The linear form: the
/// wgmma kernels take it at head dims <= 64 (H200, hdim 64: ALiBi's forward cost 1.32-1.34 -> 1.23-1.29); at 128 it
/// raised the `_mods` kernels' spills (188/200 -> 380/476 bytes) and the cost (1.10-1.11 -> 1.13-1.20);
/// the ws forward's `_alibi` copies (no dropout code) take it up to head dim 128.
/// `packed_dropout` (a constant per kernel): dropout is left to the caller, which applies it to P once
/// packed (`pack_p` with `mods::drop_p`, the wgmma kernels).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn scores_to_p<const MT: usize, const NN: usize>(a: &BlockArgs, acc_s: &mut [[[f32; 4]; NN]; MT], row_state: &mut [[RowState; 2]; MT], masked: bool, row0: i32, n0: i32, t: i32, scale_log2: f32, alibi_code: AlibiCode, lazy: bool, packed_dropout: bool, mut rescale: impl FnMut(usize, usize, f32)) {
    if a.softcap_pre != 0.0 {
        for mt in 0..MT {
            for j in 0..NN {
                for i in 0..4 {
                    acc_s[mt][j][i] = tanh(acc_s[mt][j][i] * a.softcap_pre);
                }
            }
        }
    } else if a.scale_log2 < 0.0 {
        // A negative softmax scale: s * scale == (-s) * |scale|, so the max and the -inf of masked keys
        // keep their meaning.
        for mt in 0..MT {
            for j in 0..NN {
                for i in 0..4 {
                    acc_s[mt][j][i] = -acc_s[mt][j][i];
                }
            }
        }
    }
    // ALiBi. Where this warp's rows and the tile's keys lie on one side of the diagonal (`side` +-1: every
    // tile of a causal mask but the diagonal's), |i + shift - j| = side (i + shift - j) is linear: each
    // score gets side slope c (c = 8 j + e, its key's offset from key0: one FFMA), each thread-row the rest,
    // -side slope (row + shift - key0), as the offset of its softmax update. Else the general form.
    // (Without `linear_alibi`, the general form exactly as it was: that branch's code is unchanged.)
    let linear_alibi = alibi_code.linear;
    let (side, slope_raw) = if linear_alibi && a.mods.alibi {
        let slope_raw = a.mods.raw_slope(a.softmax_scale());
        (alibi_side::<MT, NN>(row0, n0, a.seqlen_k - a.seqlen_q), slope_raw)
    } else {
        (0, 0.0)
    };
    if a.mods.alibi {
        if side == 0 {
            let (slope, key0, shift) = (a.mods.raw_slope(a.softmax_scale()), n0 + 2 * t, a.seqlen_k - a.seqlen_q);
            if alibi_code.fast { alibi_qk_fast::<MT, NN>(acc_s, slope, row0, key0, shift) } else { alibi_qk::<MT, NN>(acc_s, slope, row0, key0, shift) }
        } else {
            let sl = if side > 0 { slope_raw } else { -slope_raw };
            for mt in 0..MT {
                for j in 0..NN {
                    for i in 0..4 {
                        acc_s[mt][j][i] = fma(sl, (8 * j + i % 2) as f32, acc_s[mt][j][i]);
                    }
                }
            }
        }
    }
    // Only tiles that straddle a boundary; interior tiles skip this entirely.
    if masked && a.q_pack > 1 {
        // Packed rows: each row's own query (row / q_pack).
        let (pack, sq) = (a.q_pack as u32, div_rem_u32(a.seqlen_q as u32, a.q_pack as u32).0 as i32);
        for mt in 0..MT {
            for h in 0..2 {
                let qi = div_rem_u32((row0 + (16 * mt + 8 * h) as i32) as u32, pack).0 as i32;
                for j in 0..NN {
                    for e in 0..2 {
                        if !allowed(qi, n0 + 2 * t + (8 * j + e) as i32, sq, a.seqlen_k, a.window_left, a.window_right) {
                            acc_s[mt][j][2 * h + e] = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
    } else if masked {
        for_each_hidden_qk::<MT, NN>(row0, n0 + 2 * t, a.seqlen_q, a.seqlen_k, a.window_left, a.window_right, #[inline(always)] |mt, j, i| acc_s[mt][j][i] = f32::NEG_INFINITY);
    }
    for mt in 0..MT {
        for h in 0..2 {
            let mut s_row = [[0f32; 2]; NN];
            for j in 0..NN {
                s_row[j] = [acc_s[mt][j][2 * h], acc_s[mt][j][2 * h + 1]];
            }
            // One update loop in a kernel with modifiers (an offset of 0 leaves the plain arithmetic).
            let moved = if linear_alibi && a.mods.modded {
                let base = (row0 + (16 * mt + 8 * h) as i32 + a.seqlen_k - a.seqlen_q - n0 - 2 * t) as f32;
                let offset = match side {
                    0 => 0.0,
                    s if s > 0 => -slope_raw * base,
                    _ => slope_raw * base,
                };
                if lazy { update_row_offset::<NN, true>(&mut row_state[mt][h], &mut s_row, scale_log2, offset) } else { update_row_offset::<NN, false>(&mut row_state[mt][h], &mut s_row, scale_log2, offset) }
            } else {
                if lazy { update_row::<NN, true>(&mut row_state[mt][h], &mut s_row, scale_log2) } else { update_row::<NN, false>(&mut row_state[mt][h], &mut s_row, scale_log2) }
            };
            if let Some(f) = moved {
                rescale(mt, h, f);
            }
            for j in 0..NN {
                acc_s[mt][j][2 * h] = s_row[j][0];
                acc_s[mt][j][2 * h + 1] = s_row[j][1];
            }
        }
    }
    // Dropped probabilities leave O (kept ones are scaled by 1 / (1 - p) in the epilogue).
    if a.mods.dropout && !packed_dropout {
        keep_qk::<MT, NN>(&a.mods, row0, n0 + 2 * t, #[inline(always)] |mt, j, i, keep| {
            if !keep {
                acc_s[mt][j][i] = 0.0;
            }
        });
    }
}

/// Which side of the diagonal this warp's rows (`row0 - g` to `+ 16 MT`) and the tile's keys (`n0` to
/// `+ 8 NN`) lie on: +1 where every i + shift - j >= 0, -1 where every one is <= 0, else 0. Warp-uniform.
#[inline(always)]
fn alibi_side<const MT: usize, const NN: usize>(row0: i32, n0: i32, shift: i32) -> i32 {
    let (r_lo, r_hi) = ((row0 & !7) as i64, (row0 & !7) as i64 + (16 * MT) as i64 - 1);
    let (k_lo, k_hi) = (n0 as i64, n0 as i64 + (8 * NN) as i64 - 1);
    if r_lo + shift as i64 - k_hi >= 0 {
        1
    } else if r_hi + shift as i64 - k_lo <= 0 {
        -1
    } else {
        0
    }
}

/// The epilogue: O / rowsum in the input type and the LSE, for this thread's rows `r0 + 16 mt (+ 8)` of
/// the block's `rows` (columns `8 j + 2 t (+ 1)`, those below `head_dim`). Empty rows come out as 0 and
/// -inf. Shared by the mma.sync and wgmma kernels.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn store_out<E: Elem, const MT: usize, const DN: usize>(a: &BlockArgs, acc_o: &[[[f32; 4]; DN]; MT], row_state: &[[RowState; 2]; MT], head_dim: usize, r0: i32, rows: i32, t: i32, scale_log2: f32) {
    for mt in 0..MT {
        for h in 0..2 {
            let (inv_sum, lse) = finalize_row(&row_state[mt][h], scale_log2);
            let inv_sum = inv_sum * a.mods.scale;
            let r = r0 + (mt * 16 + 8 * h) as i32;
            if r < rows {
                let o_row = a.o + (r as i64 * a.o_row_stride * 2) as u64;
                for j in 0..DN.min(head_dim / 8) {
                    let (x, y) = (acc_o[mt][j][2 * h] * inv_sum, acc_o[mt][j][2 * h + 1] * inv_sum);
                    if a.o_f32 {
                        unsafe { st_global_v2_f32(o_row + ((8 * j as i32 + 2 * t) * 4) as u64, [x, y]) };
                    } else {
                        unsafe { st_global_u32(o_row + ((8 * j as i32 + 2 * t) * 2) as u64, E::pack(x, y)) };
                    }
                }
                if t == 0 {
                    unsafe { st_global_f32(a.lse + (r * 4) as u64, lse) };
                }
            }
        }
    }
}

/// Start the copies of K/V tile `n_block` into stage `stage`.
#[inline(always)]
unsafe fn load_kv<const D: usize, const DN: usize, const MT: usize, const NW: usize, const BN: usize, const NN: usize>(base: u32, stage: usize, a: &BlockArgs, n_block: i32, tp: TilePages, tid: usize) {
    let threads = Shape::<D, DN, MT, NW, BN, NN>::THREADS;
    let valid = a.seqlen_k - n_block * BN as i32;
    let (k_dst, v_dst) = (Shape::<D, DN, MT, NW, BN, NN>::k_stage(base, stage), Shape::<D, DN, MT, NW, BN, NN>::v_stage(base, stage));
    if a.kv.pages.paged() {
        unsafe { load_kv_paged::<D>(k_dst, v_dst, a, n_block, valid, tp, tid, BN, threads) };
        return;
    }
    let (k, v) = (a.kv.tile::<false>(n_block, BN), a.kv.tile::<true>(n_block, BN));
    unsafe {
        load_tile::<D>(k_dst, k, a.kv.k.row_bytes, valid, tid, BN, threads);
        load_tile::<D>(v_dst, v, a.kv.v.row_bytes, valid, tid, BN, threads);
    }
}

/// K (`V` false) or V of tile `n_block` alone (the staggered decode loop; paged, as the decode kernels
/// are): as `load_kv_paged`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn load_one<const D: usize, const V: bool>(dst: u32, a: &BlockArgs, n_block: i32, tp: TilePages, tid: usize, bn: usize, threads: usize) {
    let n0 = n_block * bn as i32;
    let valid = a.seqlen_k - n0;
    let rows = if V { &a.kv.v } else { &a.kv.k };
    unsafe {
        if tp.span == 1 {
            let block = a.kv.page0_block(tp);
            load_tile_whole_fast::<D>(dst, rows.at(block, tp.off0 as i32), rows.row_bytes, valid, tid, bn, threads);
        } else if tp.span <= 32 && 32 % (D / 8) == 0 {
            a.kv.load_pages_by_warp::<D, V>(dst, tp, valid, tid, bn, threads);
        } else if tp.span <= 32 {
            if V {
                a.kv.load_pages::<D, { kv::V_ONLY }>(dst, dst, tp, valid, tid, bn, threads);
            } else {
                a.kv.load_pages::<D, { kv::K_ONLY }>(dst, dst, tp, valid, tid, bn, threads);
            }
        } else {
            load_tile_rows::<D, 1>([dst], [rows.base], valid, tid, bn, threads, #[inline(always)] |r| {
                let (block, off) = a.kv.pages.locate(n0 + r);
                [rows.at(block, off)]
            });
        }
    }
}

/// Paged K and V of tile `n_block` (`bn` keys, `valid` of them in the sequence): at the row stride where
/// the tile's keys share a page, else row by row through the block table (one lookup per row for both).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn load_kv_paged<const D: usize>(k_dst: u32, v_dst: u32, a: &BlockArgs, n_block: i32, valid: i32, tp: TilePages, tid: usize, bn: usize, threads: usize) {
    let n0 = n_block * bn as i32;
    let (k, v) = (&a.kv.k, &a.kv.v);
    unsafe {
        if tp.span == 1 {
            // One page: its rows follow at the row stride.
            let block = a.kv.page0_block(tp);
            load_tile::<D>(k_dst, k.at(block, tp.off0 as i32), k.row_bytes, valid, tid, bn, threads);
            load_tile::<D>(v_dst, v.at(block, tp.off0 as i32), v.row_bytes, valid, tid, bn, threads);
        } else if tp.span <= 32 {
            a.kv.load_pages::<D, { kv::K_AND_V }>(k_dst, v_dst, tp, valid, tid, bn, threads);
        } else {
            // More than 32 pages (tiny pages): row by row.
            load_tile_rows::<D, 2>([k_dst, v_dst], [k.base, v.base], valid, tid, bn, threads, #[inline(always)] |r| {
                let (block, off) = a.kv.pages.locate(n0 + r);
                [k.at(block, off), v.at(block, off)]
            });
        }
    }
}

/// Kernel body: find this block's (sequence, head), then stride over its row blocks, last first (long
/// sequences' and causal blocks' heavy tiles start earliest). Padding rows are written here too.
#[inline(always)]
unsafe fn fwd_entry<E: Elem, const D: usize, const DN: usize, const MT: usize, const NW: usize, const BN: usize, const NN: usize, const QR: usize, const PAGED: bool, const MODS: bool, const DECODE: bool>(p: &FwdParams, fin: Option<&CombineParams>) {
    let bm = Shape::<D, DN, MT, NW, BN, NN>::BM;
    let threads = Shape::<D, DN, MT, NW, BN, NN>::THREADS;
    unsafe { for_each_row_block::<D, PAGED, MODS, DECODE>(p, fin, bm, threads, #[inline(always)] |args, _next, tid| attend::<E, D, DN, MT, NW, BN, NN, QR, DECODE>(args, tid)) }
}

/// One (sequence, head) of a forward problem: its rows in the buffers and its lengths. Grid slice
/// `bidb` is sequence `bidb` (or, past the last one, varlen's tail rows: all padding).
pub(crate) struct HeadSlice {
    pub(crate) sq: SeqlenInfo,
    pub(crate) sk: SeqlenInfo,
    pub(crate) bidb: i32,
    pub(crate) bidh: i32,
    pub(crate) bidh_kv: i32,
    q_head: u64,
    pub(crate) kv: KvRows,
    o_head: u64,
    lse_head: u64,
    mods: HeadMods,
    split: i32,
    num_splits: i32,
    o_f32: bool,
    q_pack: i32,
    fin: DecodeOut,
}

impl HeadSlice {
    #[inline(always)]
    pub(crate) fn new<const PAGED: bool, const MODS: bool>(p: &FwdParams, bidb: i32, bidh: i32) -> HeadSlice {
        // The tail slice's keys are never read (its rows are all padding).
        let mut lengths = p.lengths();
        if PAGED {
            lengths.paged_keys = Some(Pages::capacity(p));
            (lengths.k_first, lengths.seqused_k_add) = (p.cache_leftpad, p.seqused_k_add);
        }
        let (sq, sk) = lengths.slice(bidb, ld_i32_at);
        // Unchecked divisions (arch::math::div_rem_u32): h and h_k are positive by validation.
        let bidh_kv = div_rem_u32(bidh as u32, div_rem_u32(p.h as u32, p.h_k as u32).0).0 as i32;
        let (b, h, hk) = (bidb as i64, bidh as i64, bidh_kv as i64);
        // Paged: k and v are [num_blocks, page_size, Hk, D] (the batch strides are the block strides) and
        // the sequence's keys are at positions sk.start.. of its block table row.
        let mut pages = Pages::new::<PAGED>(p, bidb);
        let (kb, k0) = if pages.paged() { (0, 0) } else { (b, sk.start as i64) };
        if pages.paged() {
            pages.first = sk.start;
        }
        let rows = |base: u64, batch: i64, row: i64, head: i64| Rows {
            base: base + ((kb * batch + k0 * row + hk * head) * 2) as u64,
            row_bytes: row * 2,
            block_bytes: batch * 2,
        };
        let kv = KvRows { k: rows(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride), v: rows(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride), pages };
        HeadSlice {
            sq,
            sk,
            bidb,
            bidh,
            bidh_kv,
            q_head: p.q + ((b * p.q_batch_stride + sq.start as i64 * p.q_row_stride + h * p.q_head_stride) * 2) as u64,
            kv,
            o_head: p.o + ((b * p.o_batch_stride + sq.start as i64 * p.o_row_stride + h * p.o_head_stride) * 2) as u64,
            lse_head: p.lse + ((b * p.lse_batch_stride + h * p.lse_head_stride + sq.start as i64) * 4) as u64,
            mods: HeadMods::new::<MODS>(&p.mods, bidb, bidh, p.h, p.batch),
            split: 0,
            num_splits: 1,
            o_f32: false,
            q_pack: 1,
            fin: DecodeOut::NONE,
        }
    }

    /// Split-KV's slice `split` of `num_splits`: f32 partial results at the split's offsets.
    #[inline(always)]
    fn into_split(mut self, p: &FwdParams, split: i32, num_splits: i32) -> HeadSlice {
        let (o_off, lse_off) = (split as i64 * p.batch as i64 * p.o_batch_stride, split as i64 * p.batch as i64 * p.lse_batch_stride);
        self.o_head = self.o_head.wrapping_add((o_off * 2) as u64);
        self.lse_head = self.lse_head.wrapping_add((lse_off * 4) as u64);
        (self.split, self.num_splits, self.o_f32) = (split, num_splits, true);
        self
    }

    /// What `attend` needs for the rows from `m0`.
    #[inline(always)]
    pub(crate) fn args_at(&self, p: &FwdParams, m0: i32) -> BlockArgs {
        BlockArgs {
            q: if self.q_pack > 1 { self.q_head } else { self.q_head + ((m0 as i64 * p.q_row_stride) * 2) as u64 },
            q_row_bytes: p.q_row_stride * 2,
            q_pack_bytes: p.q_pack_head_stride * 2,
            kv: self.kv,
            o: self.o_head + ((m0 as i64 * p.o_row_stride) * 2) as u64,
            o_row_stride: p.o_row_stride,
            lse: self.lse_head + (m0 as i64 * 4) as u64,
            m0,
            seqlen_q: self.sq.used,
            seqlen_k: self.sk.used,
            window_left: p.window_left,
            window_right: p.window_right,
            scale_log2: p.scale_log2,
            softcap_pre: p.softcap_pre,
            mods: self.mods,
            split: self.split,
            num_splits: self.num_splits,
            o_f32: self.o_f32,
            q_pack: self.q_pack,
            fin: self.fin,
        }
    }

    /// Write the padding rows of `[m0, m0 + bm)` (those past the real rows, inside the slot) with
    /// `threads` threads.
    #[inline(always)]
    pub(crate) unsafe fn pad_block<const D: usize>(&self, p: &FwdParams, m0: i32, bm: i32, tid: usize, threads: usize) {
        let (sq, o_head, lse_head) = (self.sq, self.o_head, self.lse_head);
        let pad_begin = if m0 > sq.used { m0 } else { sq.used };
        let pad_end = if m0 + bm < sq.slot_len { m0 + bm } else { sq.slot_len };
        if pad_begin < pad_end {
            unsafe { write_padding::<D>(p, o_head, lse_head, pad_begin, pad_end, tid, threads) };
        }
    }
}

/// Shared by the forward kernels: for each `bm`-row block this block owns (grid stride over the
/// sequence's slot), `attend` the rows inside the sequence (also given the next such block, if any) and
/// write the padding rows past it.
#[inline(always)]
/// `DECODE` (the `_decode` kernels): q packed (`FwdParams::q_pack`), f32 partial results whatever the
/// split count (the combine kernel unpacks them).
pub(crate) unsafe fn for_each_row_block<const D: usize, const PAGED: bool, const MODS: bool, const DECODE: bool>(p: &FwdParams, fin: Option<&CombineParams>, bm: usize, threads: usize, mut attend: impl FnMut(&BlockArgs, Option<&BlockArgs>, usize)) {
    let bm = bm as i32;
    let tid = thread_idx_x() as usize;
    let z = block_idx_z() as i32;
    // Row blocks x, x + stride, .. of slice z, heaviest (last) first; with slot scheduling
    // (`FwdParams::slots`) grid x walks the virtual row blocks of every slice instead.
    let (grid_m, x) = (grid_dim_x() as i32, block_idx_x() as i32);
    let (z, mut m_block, stride) = if !DECODE && p.slots > 0 {
        let (b, m) = p.lengths().slot_block(p.slots - 1 - x, bm, false, p.slots, ld_i32_at);
        (b, m, p.slots)
    } else {
        (z, grid_m - 1 - x, grid_m)
    };
    let mut head = if DECODE || (PAGED && p.num_splits > 1) {
        // Unchecked division: num_splits >= 1.
        let (bidb, split) = div_rem_u32(z as u32, p.num_splits as u32);
        HeadSlice::new::<PAGED, MODS>(p, bidb as i32, block_idx_y() as i32).into_split(p, split as i32, p.num_splits)
    } else {
        HeadSlice::new::<PAGED, MODS>(p, z, block_idx_y() as i32)
    };
    if DECODE {
        head.q_pack = p.q_pack;
        if let Some(cp) = fin {
            head.fin = DecodeOut::new(cp, head.bidb, head.bidh);
        }
        // The combine after this grid (launched programmatically on Hopper) may start once every block
        // of this one has: its blocks take the slots ours leave and wait for our partials.
        crate::arch::sync::launch_dependents();
        // After an append (launched programmatically after it on Hopper): its new keys and turned q
        // before any read of the cache or q.
        crate::arch::sync::grid_dependency_wait();
    }
    let sq = head.sq;
    while m_block * bm < sq.slot_len {
        let m0 = m_block * bm;
        if m0 < sq.used {
            let next_m0 = m0 + stride * bm;
            let next = if next_m0 < sq.used { Some(head.args_at(p, next_m0)) } else { None };
            attend(&head.args_at(p, m0), next.as_ref(), tid);
        }
        unsafe { head.pad_block::<D>(p, m0, bm, tid, threads) };
        m_block += stride;
    }
}

// Each variant five times: over contiguous K/V; with score modifiers (`_mods`); over paged K/V (`_paged`);
// both (`_paged_mods`); decode over a paged (or KV) cache with q packed (`_decode`).
macro_rules! fwd_kernels {
    ($(($d:literal, $dt:ident, $name:expr)),* $(,)?) => {$(
        const _: () = {
            const C: crate::variants::FwdConfig = crate::variants::fwd_config($d);
            #[unsafe(export_name = $name)]
            pub unsafe extern "ptx-kernel" fn kernel(p: FwdParams) {
                unsafe { fwd_entry::<$dt, $d, { $d / 8 }, { C.m_tiles }, { C.warps }, { C.block_n }, { C.block_n / 8 }, { if C.q_in_regs { $d / 16 } else { 0 } }, false, false, false>(&p, None) }
            }
            #[unsafe(export_name = concat!($name, "_mods"))]
            pub unsafe extern "ptx-kernel" fn kernel_mods(p: FwdParams) {
                unsafe { fwd_entry::<$dt, $d, { $d / 8 }, { C.m_tiles }, { C.warps }, { C.block_n }, { C.block_n / 8 }, { if C.q_in_regs { $d / 16 } else { 0 } }, false, true, false>(&p, None) }
            }
            #[unsafe(export_name = concat!($name, "_paged"))]
            pub unsafe extern "ptx-kernel" fn kernel_paged(p: FwdParams) {
                unsafe { fwd_entry::<$dt, $d, { $d / 8 }, { C.m_tiles }, { C.warps }, { C.block_n }, { C.block_n / 8 }, { if C.q_in_regs { $d / 16 } else { 0 } }, true, false, false>(&p, None) }
            }
            // Decode over a KV cache (packed GQA, 16 packed rows per block, its warps splitting each
            // tile's keys: `decode_config`; f32 partials; the lazy max, and whole tiles copied without
            // row tests).
            #[unsafe(export_name = concat!($name, "_decode"))]
            pub unsafe extern "ptx-kernel" fn kernel_decode(p: FwdParams) {
                const K: crate::variants::FwdConfig = crate::variants::decode_config($d);
                unsafe { fwd_entry::<$dt, $d, { $d / 8 }, { K.m_tiles }, { K.warps }, { K.block_n }, { K.block_n / 8 / K.key_warps }, 0, true, false, true>(&p, None) }
            }
            // The same, finishing its rows itself (`DecodeOut`, `finish_decode`): its own export, so that
            // the partials' kernel above keeps its code (with the epilogue's registers, batch 1 at 8k keys
            // ran 1.04x slower through it).
            #[unsafe(export_name = concat!($name, "_decode_fin"))]
            pub unsafe extern "ptx-kernel" fn kernel_decode_fin(p: FwdParams, fin: CombineParams) {
                const K: crate::variants::FwdConfig = crate::variants::decode_config($d);
                unsafe { fwd_entry::<$dt, $d, { $d / 8 }, { K.m_tiles }, { K.warps }, { K.block_n }, { K.block_n / 8 / K.key_warps }, 0, true, false, true>(&p, Some(&fin)) }
            }
            #[unsafe(export_name = concat!($name, "_paged_mods"))]
            pub unsafe extern "ptx-kernel" fn kernel_paged_mods(p: FwdParams) {
                unsafe { fwd_entry::<$dt, $d, { $d / 8 }, { C.m_tiles }, { C.warps }, { C.block_n }, { C.block_n / 8 }, { if C.q_in_regs { $d / 16 } else { 0 } }, true, true, false>(&p, None) }
            }
        };
    )*};
}
crate::for_each_fwd_variant!(fwd_kernels);
