//! Which K/V tiles a block of query rows must visit, and which of those need the mask applied. Tiles that
//! causal/window mask entirely are never loaded; interior tiles run without the mask.

use crate::mask::key_range;

/// Half-open range `[n_min, n_max)` of K/V tiles of `block_n` keys that rows `[m0, m0 + rows)` can see.
/// Empty (`n_min >= n_max`) when every row is fully masked.
#[inline(always)]
pub fn n_block_range(m0: i32, rows: i32, seqlen_q: i32, seqlen_k: i32, window_left: i32, window_right: i32, block_n: i32) -> (i32, i32) {
    if rows <= 0 || seqlen_k <= 0 {
        return (0, 0);
    }
    // The key range grows monotonically with the row, so the first row bounds `lo` and the last `hi`.
    let (lo, _) = key_range(m0, seqlen_q, seqlen_k, window_left, window_right);
    let (_, hi) = key_range(m0 + rows - 1, seqlen_q, seqlen_k, window_left, window_right);
    if hi < lo {
        return (0, 0);
    }
    (lo / block_n, hi / block_n + 1)
}

/// Whether tile `[n0, n0 + block_n)` has a key that some row of `[m0, m0 + rows)` must not see.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn tile_needs_mask(m0: i32, rows: i32, n0: i32, block_n: i32, seqlen_q: i32, seqlen_k: i32, window_left: i32, window_right: i32) -> bool {
    let n_last = n0 + block_n - 1;
    if n_last >= seqlen_k {
        return true;
    }
    // Interior iff the first row already sees up to n_last and the last row still sees n0.
    let (lo_last, _) = key_range(m0 + rows - 1, seqlen_q, seqlen_k, window_left, window_right);
    let (_, hi_first) = key_range(m0, seqlen_q, seqlen_k, window_left, window_right);
    !(hi_first >= n_last && lo_last <= n0)
}

/// `tile_needs_mask` for one key tile and every row block, decided once per tile: the tile
/// `[n0, n0 + block_n)` is interior for rows `[m0, m0 + rows)` (rows >= 1) iff `first <= m0` and
/// `m0 + rows - 1 <= last`. A backward block keeps these two values across its steps instead of the
/// 64-bit pieces of `key_range`, which ptxas spilled and reloaded every step (hdim 128, nsight compute).
#[derive(Clone, Copy)]
pub struct InteriorRows {
    first: i32,
    last: i32,
}

impl InteriorRows {
    /// Row `i` sees key `n0 + block_n - 1` iff `i >= n_last - shift - right` (any row when `right` is
    /// unbounded) and key `n0` iff `i <= n0 - shift + left` (`key_range`, shift = seqlen_k - seqlen_q);
    /// no row when the tile reaches past the keys.
    #[inline(always)]
    pub fn of(n0: i32, block_n: i32, seqlen_q: i32, seqlen_k: i32, window_left: i32, window_right: i32) -> InteriorRows {
        let n_last = n0 + block_n - 1;
        if n_last >= seqlen_k {
            return InteriorRows { first: i32::MAX, last: -1 };
        }
        let shift = seqlen_k as i64 - seqlen_q as i64;
        let first = if window_right >= 0 { n_last as i64 - shift - window_right as i64 } else { 0 };
        let last = if window_left >= 0 { n0 as i64 - shift + window_left as i64 } else { i32::MAX as i64 };
        let clamp = |x: i64| if x < -1 { -1 } else if x > i32::MAX as i64 { i32::MAX } else { x as i32 };
        InteriorRows { first: clamp(first), last: clamp(last) }
    }

    /// `tile_needs_mask(m0, rows, ..)` of the tile this was made for.
    #[inline(always)]
    pub fn needs_mask(&self, m0: i32, rows: i32) -> bool {
        !(m0 >= self.first && m0 + rows - 1 <= self.last)
    }
}

/// The backward's transpose of `n_block_range`: half-open range `[m_min, m_max)` of query-row blocks of
/// `block_m` rows holding a row that sees some key of `[n0, n0 + cols)`. Empty when no row does.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn m_block_range(n0: i32, cols: i32, seqlen_q: i32, seqlen_k: i32, window_left: i32, window_right: i32, block_m: i32) -> (i32, i32) {
    if cols <= 0 || seqlen_q <= 0 || n0 >= seqlen_k {
        return (0, 0);
    }
    // Row i's keys are [diag - left, diag + right] ∩ [0, seqlen_k) with diag = i + seqlen_k - seqlen_q;
    // both ends grow with i, so the rows that see the tile are one interval [first, last].
    let shift = seqlen_k as i64 - seqlen_q as i64;
    let n_last = (n0 as i64 + cols as i64 - 1).min(seqlen_k as i64 - 1);
    let first = if window_right >= 0 { (n0 as i64 - shift - window_right as i64).max(0) } else { 0 };
    let last = if window_left >= 0 { (n_last - shift + window_left as i64).min(seqlen_q as i64 - 1) } else { seqlen_q as i64 - 1 };
    if first > last {
        return (0, 0);
    }
    ((first / block_m as i64) as i32, (last / block_m as i64) as i32 + 1)
}

/// Rows of a sequence's f32 dq accumulator that the dk/dv kernels add to: every query block of
/// `block_m` rows `m_block_range` can return lies below `seqlen_q` rounded up to a block (the rows past
/// `seqlen_q` get exact zeros). The backward's prep zeroes all of them, so no reduction reads a word
/// nothing wrote.
#[inline(always)]
pub fn dq_accum_rows(seqlen_q: i32, block_m: i32) -> i32 {
    if seqlen_q <= 0 { 0 } else { ((seqlen_q - 1) / block_m + 1) * block_m }
}
