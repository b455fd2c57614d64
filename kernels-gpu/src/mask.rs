//! The mask predicate, in one place. Causal is the window (-1, 0); both are aligned to the bottom-right
//! corner: query row `i` of `seqlen_q` and key `j` of `seqlen_k` are on the diagonal when
//! `j == i + seqlen_k - seqlen_q`. Window bounds are inclusive; -1 is unbounded.

/// Inclusive key range `[lo, hi]` that query row `row` may see, clamped to `[0, seqlen_k - 1]`
/// (empty when `lo > hi`). i64 inside: windows near i32::MAX must not overflow.
#[inline(always)]
pub fn key_range(row: i32, seqlen_q: i32, seqlen_k: i32, window_left: i32, window_right: i32) -> (i32, i32) {
    let diag = row as i64 + seqlen_k as i64 - seqlen_q as i64;
    let last = seqlen_k as i64 - 1;
    let lo = if window_left >= 0 { diag - window_left as i64 } else { 0 };
    let hi = if window_right >= 0 { diag + window_right as i64 } else { last };
    let lo = if lo < 0 { 0 } else if lo > last + 1 { last + 1 } else { lo };
    let hi = if hi > last { last } else if hi < -1 { -1 } else { hi };
    (lo as i32, hi as i32)
}

/// Whether query row `row` sees key `col`.
#[inline(always)]
pub fn allowed(row: i32, col: i32, seqlen_q: i32, seqlen_k: i32, window_left: i32, window_right: i32) -> bool {
    let (lo, hi) = key_range(row, seqlen_q, seqlen_k, window_left, window_right);
    col >= lo && col <= hi
}

/// The mask near an anchor pair (row `row0`, key `key0`) as one interval: row `row0 + dr` sees key
/// `key0 + dk` (a key in `[0, seqlen_k)`) iff `sees(dk - dr)`, for `|dk - dr| < 1024`. The keys a row sees
/// are the band `key - row` in `[seqlen_k - seqlen_q - left, seqlen_k - seqlen_q + right]` (an end
/// unbounded at -1); the ends, relative to `key0 - row0`, are clamped to +-1024 (i64 before that). A
/// kernel with compile-time `dk`, `dr` pays two compares per element instead of a `key_range` per row.
#[derive(Clone, Copy)]
pub struct Band {
    lo: i32,
    hi: i32,
}

impl Band {
    const FAR: i64 = 1024;

    #[inline(always)]
    pub fn new(row0: i32, key0: i32, seqlen_q: i32, seqlen_k: i32, window_left: i32, window_right: i32) -> Band {
        let shift = seqlen_k as i64 - seqlen_q as i64 - (key0 as i64 - row0 as i64);
        let clamp = |x: i64| x.clamp(-Self::FAR, Self::FAR);
        let lo = if window_left >= 0 { clamp(shift - window_left as i64) } else { -Self::FAR };
        let hi = if window_right >= 0 { clamp(shift + window_right as i64) } else { Self::FAR };
        Band { lo: lo as i32, hi: hi as i32 }
    }

    #[inline(always)]
    pub fn sees(&self, off: i32) -> bool {
        off >= self.lo && off <= self.hi
    }
}

// The kernels apply the mask through these two walkers over a thread's mma accumulator fragments, one
// per layout (element `i` of an m16 x n8 tile sits at row `8 (i / 2)`, column `i % 2` of the thread's
// part).

/// `hide(mt, j, i)` for each element of a thread's query-major fragments (S = Q K^T: the forward kernels
/// and the backward's dq kernel) whose key its query does not see: `MT` m16 tiles of queries x `NN` n8
/// tiles of keys, element `i` of tile (mt, j) at query `row0 + 16 mt + 8 (i / 2)`, key
/// `key0 + 8 j + i % 2`. One `key_range` per query (it also bounds the keys by `seqlen_k`), taken relative
/// to `key0`, then two compares per element against the element's compile-time offset `8 j + i % 2`.
/// (Comparing the keys themselves, `key0 + 8 j + e`, made ptxas hold all 2 NN of them in registers across
/// both rows: in the 160-register tall kernels that spilled about 35 loads / stores per masked tile.)
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn for_each_hidden_qk<const MT: usize, const NN: usize>(row0: i32, key0: i32, seqlen_q: i32, seqlen_k: i32, window_left: i32, window_right: i32, mut hide: impl FnMut(usize, usize, usize)) {
    for mt in 0..MT {
        for h in 0..2 {
            let (lo, hi) = key_range(row0 + (mt * 16 + 8 * h) as i32, seqlen_q, seqlen_k, window_left, window_right);
            // Both within [-1 - key0, seqlen_k - key0]: no overflow for keys in i32.
            let (lo, hi) = (lo - key0, hi - key0);
            for j in 0..NN {
                for e in 0..2 {
                    let off = 8 * j as i32 + e as i32;
                    if off < lo || off > hi {
                        hide(mt, j, 2 * h + e);
                    }
                }
            }
        }
    }
}

/// `hide(kt, j, i)` for each hidden element of a thread's key-major fragments (S^T = K Q^T: both dk/dv
/// kernels): `KT` m16 tiles of keys x `QN` n8 tiles of queries, element `i` of tile (kt, j) at key
/// `key0 + 16 kt + 8 (i / 2)`, query `row0 + 8 j + i % 2`; queries from the `rows`-th on are hidden too
/// (padding rows). One `Band` for the tile: each element compares against compile-time offsets, where
/// a `key_range` per query would cost `2 QN` of them.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn for_each_hidden_kq<const KT: usize, const QN: usize>(row0: i32, rows: i32, key0: i32, seqlen_q: i32, seqlen_k: i32, window_left: i32, window_right: i32, mut hide: impl FnMut(usize, usize, usize)) {
    let band = Band::new(row0, key0, seqlen_q, seqlen_k, window_left, window_right);
    for j in 0..QN {
        for e in 0..2 {
            let dr = (8 * j + e) as i32;
            let row_ok = dr < rows;
            for kt in 0..KT {
                for h in 0..2 {
                    let dk = (16 * kt + 8 * h) as i32;
                    if !(row_ok && key0 + dk < seqlen_k && band.sees(dk - dr)) {
                        hide(kt, j, 2 * h + e);
                    }
                }
            }
        }
    }
}
