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
