//! The mask as key ranges: with the window around the bottom-right diagonal, the keys query i sees are
//! one interval, and both of its ends grow with i, so a tile's keys are the first row's start to the last
//! row's end.

/// Keys `lo..hi` that query `i` of a (seqlen_q, seqlen_k) sequence sees; empty when `lo >= hi`.
#[inline]
pub(crate) fn key_range(i: usize, seqlen_q: usize, seqlen_k: usize, window_left: i64, window_right: i64) -> (usize, usize) {
    let sk = seqlen_k as i64;
    let diag = i as i64 + sk - seqlen_q as i64;
    let lo = if window_left >= 0 { diag.saturating_sub(window_left).clamp(0, sk) } else { 0 };
    let hi = if window_right >= 0 { diag.saturating_add(window_right).saturating_add(1).clamp(0, sk) } else { sk };
    (lo as usize, hi as usize)
}
