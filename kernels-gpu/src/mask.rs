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
