//! The mma.sync kernels' tile vocabulary: the 16-bit element type and its mma, row-major tiles in
//! shared memory that know each lane's `ldmatrix` address, and the warp GEMM k-loop. Fragment layouts
//! are `mma.m16n8k16`'s (arch/mma.rs): an accumulator pair of n8 tiles is one k16 A fragment.

use crate::arch::cp_async::cp_async_16;
use crate::arch::ldmatrix::{ldmatrix_x4, ldmatrix_x4_trans};
use crate::arch::math::{pack_bf16x2, pack_f16x2, unpack_bf16x2, unpack_f16x2};
use crate::arch::mma::{mma_bf16, mma_f16};
use crate::arch::reg::{opaque_i64, opaque_u32};
use crate::variants::row_pitch_bytes;

/// The 16-bit input type: which mma and which f32 -> 16-bit packing.
pub trait Elem {
    fn mma(d: &mut [f32; 4], a: [u32; 4], b: [u32; 2]);
    fn pack(lo: f32, hi: f32) -> u32;
    fn unpack(x: u32) -> (f32, f32);
}

pub struct BF16;
pub struct F16;

impl Elem for BF16 {
    #[inline(always)]
    fn mma(d: &mut [f32; 4], a: [u32; 4], b: [u32; 2]) {
        mma_bf16(d, a, b)
    }
    #[inline(always)]
    fn pack(lo: f32, hi: f32) -> u32 {
        pack_bf16x2(lo, hi)
    }
    #[inline(always)]
    fn unpack(x: u32) -> (f32, f32) {
        unpack_bf16x2(x)
    }
}

impl Elem for F16 {
    #[inline(always)]
    fn mma(d: &mut [f32; 4], a: [u32; 4], b: [u32; 2]) {
        mma_f16(d, a, b)
    }
    #[inline(always)]
    fn pack(lo: f32, hi: f32) -> u32 {
        pack_f16x2(lo, hi)
    }
    #[inline(always)]
    fn unpack(x: u32) -> (f32, f32) {
        unpack_f16x2(x)
    }
}

/// The A fragment of one k16 step from two n8 accumulator tiles (the mma's C layout of columns 0-7 and
/// 8-15 is its A layout), packed to 16 bits.
#[inline(always)]
pub(crate) fn a_fragment<E: Elem>(lo: &[f32; 4], hi: &[f32; 4]) -> [u32; 4] {
    [E::pack(lo[0], lo[1]), E::pack(lo[2], lo[3]), E::pack(hi[0], hi[1]), E::pack(hi[2], hi[3])]
}

/// A row-major tile of 16-bit values in shared memory: its address and row pitch in bytes (padded
/// pitches keep an ldmatrix's 8 rows in 8 different bank groups), seen from element (`row0`, `col0`).
#[derive(Clone, Copy)]
pub(crate) struct SmemTile {
    base: u32,
    pitch: u32,
    row0: usize,
    col0: usize,
}

/// A tile as one lane addresses it for `ldmatrix_x4` (`.trans` when `TRANS`): `load(row, col)` reads the
/// 16 x 16 block at element (row, col) as four 8 x 8 matrices, in the order the operand wants them.
#[derive(Clone, Copy)]
pub(crate) struct Ldsm<const TRANS: bool> {
    addr: u32,
    pitch: u32,
}

impl SmemTile {
    #[inline(always)]
    pub(crate) fn new(base: u32, pitch: u32) -> SmemTile {
        SmemTile { base, pitch, row0: 0, col0: 0 }
    }

    /// The tile from element (row, col) on: a warp's part, whose run-time offsets are folded into the
    /// lane addresses once, so every load adds a compile-time constant.
    #[inline(always)]
    pub(crate) fn at(self, row: usize, col: usize) -> SmemTile {
        SmemTile { row0: self.row0 + row, col0: self.col0 + col, ..self }
    }

    /// Lane `l` gives row `l % 8` of matrix `l / 8`; matrices at block offsets (0, 0), (8, 0), (0, 8),
    /// (8, 8): rows first.
    #[inline(always)]
    fn rows_first(self, lane: usize) -> u32 {
        let row = self.row0 as u32 + (lane % 8) as u32 + ((lane / 8) % 2) as u32 * 8;
        self.base + (row * self.pitch + self.col0 as u32 * 2 + (lane / 16) as u32 * 16)
    }

    /// Matrices at (0, 0), (0, 8), (8, 0), (8, 8): columns first.
    #[inline(always)]
    fn cols_first(self, lane: usize) -> u32 {
        let row = self.row0 as u32 + (lane % 8) as u32 + (lane / 16) as u32 * 8;
        self.base + (row * self.pitch + self.col0 as u32 * 2 + ((lane / 8) % 2) as u32 * 16)
    }

    /// A of a product from a `[m][k]` tile: `load(m, k)` is the A fragment of rows m..m+16, k..k+16.
    #[inline(always)]
    pub(crate) fn a(self, lane: usize) -> Ldsm<false> {
        Ldsm { addr: self.rows_first(lane), pitch: self.pitch }
    }

    /// B of a product from an `[n][k]` tile (B^T stored, as K in Q K^T): `load(n, k)` is the B
    /// fragments of columns n..n+8 (`[0..2]`) and n+8..n+16 (`[2..4]`), k..k+16.
    #[inline(always)]
    pub(crate) fn b(self, lane: usize) -> Ldsm<false> {
        Ldsm { addr: self.cols_first(lane), pitch: self.pitch }
    }

    /// B from a `[k][n]` tile, transposed on read (as V in P V): `load(k, n)` as `b`'s.
    #[inline(always)]
    pub(crate) fn b_trans(self, lane: usize) -> Ldsm<true> {
        Ldsm { addr: self.rows_first(lane), pitch: self.pitch }
    }

    /// A from a `[k][m]` tile, transposed on read (as dS^T in dS K): `load(k, m)` as `a`'s.
    #[inline(always)]
    pub(crate) fn a_trans(self, lane: usize) -> Ldsm<true> {
        Ldsm { addr: self.cols_first(lane), pitch: self.pitch }
    }
}

impl<const TRANS: bool> Ldsm<TRANS> {
    #[inline(always)]
    pub(crate) unsafe fn load(&self, row: usize, col: usize) -> [u32; 4] {
        let at = self.addr + row as u32 * self.pitch + (col * 2) as u32;
        unsafe { if TRANS { ldmatrix_x4_trans(at) } else { ldmatrix_x4(at) } }
    }
}

/// One A fragment times one B x4 (two n8 tiles): `acc[2j] += a b[0..2]`, `acc[2j+1] += a b[2..4]`.
#[inline(always)]
pub(crate) fn mma_x4<E: Elem, const N: usize>(acc: &mut [[f32; 4]; N], j: usize, a: [u32; 4], b: [u32; 4]) {
    E::mma(&mut acc[2 * j], a, [b[0], b[1]]);
    E::mma(&mut acc[2 * j + 1], a, [b[2], b[3]]);
}

/// `acc += A B` for one warp: `MT` m16 tiles of rows x the first `2 n16` n8 tiles of columns, over `k16`
/// k16 steps. Each step takes every A fragment first (`a(kk, mt)`), then for each column pair `j` B's x4
/// (`b(kk, j)`: n8 tiles 2j and 2j+1) times all of them.
#[inline(always)]
pub(crate) fn warp_gemm<E: Elem, const MT: usize, const N: usize>(acc: &mut [[[f32; 4]; N]; MT], k16: usize, n16: usize, mut a: impl FnMut(usize, usize) -> [u32; 4], mut b: impl FnMut(usize, usize) -> [u32; 4]) {
    for kk in 0..k16 {
        let mut fa = [[0u32; 4]; MT];
        // An index loop: iter_mut().enumerate() numbered the PTX registers otherwise, and ptxas allocated
        // the forward's d128 kernel with 16 more bytes of spills from the same instructions.
        #[allow(clippy::needless_range_loop)]
        for mt in 0..MT {
            fa[mt] = a(kk, mt);
        }
        for j in 0..n16 {
            let fb = b(kk, j);
            for mt in 0..MT {
                mma_x4::<E, N>(&mut acc[mt], j, fa[mt], fb);
            }
        }
    }
}

/// Copy `rows` rows of `D` 16-bit values into a padded shared tile with `threads` threads; rows at or
/// past `valid_rows` are zero-filled without touching global memory. `rows` and `threads` are
/// compile-time constants after inlining (stable const generics cannot take `16 * MT * NW`).
#[inline(always)]
pub(crate) unsafe fn load_tile<const D: usize>(dst: u32, src: u64, row_stride_bytes: i64, valid_rows: i32, tid: usize, rows: usize, threads: usize) {
    unsafe { load_tile_as::<D, false>(dst, src, row_stride_bytes, valid_rows, tid, rows, threads) }
}

/// `load_tile`, where a whole tile (`valid_rows >= rows`) takes a loop of its own whose copies test no
/// row (the decode kernels, whose tiles are nearly all whole: a compare and two selects less per copy).
#[inline(always)]
pub(crate) unsafe fn load_tile_whole_fast<const D: usize>(dst: u32, src: u64, row_stride_bytes: i64, valid_rows: i32, tid: usize, rows: usize, threads: usize) {
    unsafe {
        if valid_rows >= rows as i32 {
            load_tile_as::<D, true>(dst, src, row_stride_bytes, valid_rows, tid, rows, threads)
        } else {
            load_tile_as::<D, false>(dst, src, row_stride_bytes, valid_rows, tid, rows, threads)
        }
    }
}

/// `load_tile`; `WHOLE`: every row is valid (no row test).
#[inline(always)]
unsafe fn load_tile_as<const D: usize, const WHOLE: bool>(dst: u32, src: u64, row_stride_bytes: i64, valid_rows: i32, tid: usize, rows: usize, threads: usize) {
    let chunks = D / 8;
    let row_bytes = row_pitch_bytes(D) as u32;
    // Recompute the per-thread offsets here, each tile, instead of keeping them all live (opaque_u32).
    let tid = opaque_u32(tid as u32) as usize;
    let row_stride_bytes = opaque_i64(row_stride_bytes);
    if threads % chunks == 0 {
        // Each pass covers `threads / chunks` whole rows: a thread keeps its column, and its addresses
        // advance by a fixed step (one 64-bit multiply per tile instead of one per copy).
        let pass_rows = threads / chunks;
        let (r0, c) = (tid / chunks, tid % chunks);
        let mut g = src.wrapping_add((r0 as i64 * row_stride_bytes + c as i64 * 16) as u64);
        let g_step = (pass_rows as i64 * row_stride_bytes) as u64;
        let mut s = dst + r0 as u32 * row_bytes + c as u32 * 16;
        let mut i = 0;
        while i < rows / pass_rows {
            let valid = WHOLE || ((r0 + i * pass_rows) as i32) < valid_rows;
            unsafe { cp_async_16(s, if valid { g } else { src }, valid) };
            g = g.wrapping_add(g_step);
            s += pass_rows as u32 * row_bytes;
            i += 1;
        }
        return;
    }
    let mut i = 0;
    while i < rows * chunks / threads {
        let idx = tid + i * threads;
        let (r, c) = (idx / chunks, idx % chunks);
        let valid = WHOLE || (r as i32) < valid_rows;
        let g = if valid { src.wrapping_add((r as i64 * row_stride_bytes + c as i64 * 16) as u64) } else { src };
        unsafe { cp_async_16(dst + r as u32 * row_bytes + c as u32 * 16, g, valid) };
        i += 1;
    }
}

/// `load_tile` into `N` tiles at once (K and V) for rows that are not evenly strided (paged K/V): row
/// `r`'s addresses are `row(r)`, asked once per row and only for rows below `valid_rows` (the rest are
/// zero-filled; `fallback`, readable addresses, stand in for their sources). A rolled loop (an opaque
/// trip count): each row's lookup is a division and a load, not worth keeping every row's live.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn load_tile_rows<const D: usize, const N: usize>(dst: [u32; N], fallback: [u64; N], valid_rows: i32, tid: usize, rows: usize, threads: usize, row: impl Fn(i32) -> [u64; N]) {
    let chunks = D / 8;
    let row_bytes = row_pitch_bytes(D) as u32;
    let tid = opaque_u32(tid as u32) as usize;
    let n = opaque_u32((rows * chunks / threads) as u32) as usize;
    let mut i = 0;
    while i < n {
        let idx = tid + i * threads;
        let (r, c) = (idx / chunks, idx % chunks);
        let valid = (r as i32) < valid_rows;
        let g = if valid { row(r as i32) } else { fallback };
        for j in 0..N {
            let src = if valid { g[j].wrapping_add(c as u64 * 16) } else { g[j] };
            unsafe { cp_async_16(dst[j] + r as u32 * row_bytes + c as u32 * 16, src, valid) };
        }
        i += 1;
    }
}
