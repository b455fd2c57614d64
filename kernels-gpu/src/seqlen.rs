//! Where a sequence lives in the packed buffers and how long it is. Pure arithmetic, compiled for the host
//! too: the kernels clamp every length here, so bogus cu_seqlens/seqused can never index out of bounds.

/// One sequence as a kernel sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqlenInfo {
    /// First row of the slot in the packed buffer (0 for a dense batch, whose offset is the batch stride).
    pub start: i32,
    /// Rows in the slot: what the kernel must write (real rows plus padding).
    pub slot_len: i32,
    /// Real rows: the first `used` rows of the slot (`used <= slot_len`).
    pub used: i32,
}

impl SeqlenInfo {
    /// A dense batch: every slot holds `seqlen` real rows.
    pub fn dense(seqlen: i32) -> SeqlenInfo {
        let n = if seqlen > 0 { seqlen } else { 0 };
        SeqlenInfo { start: 0, slot_len: n, used: n }
    }

    /// A varlen slot `[cu_start, cu_end)` of a buffer of `total` rows, with an optional `seqused`.
    /// Everything is clamped into `[0, total]`, so the result is in bounds whatever the inputs hold.
    pub fn varlen(cu_start: i32, cu_end: i32, seqused: Option<i32>, total: i32) -> SeqlenInfo {
        let total = if total > 0 { total } else { 0 };
        let start = clamp(cu_start, 0, total);
        let end = clamp(cu_end, start, total);
        let slot_len = end - start;
        let used = match seqused {
            Some(u) => clamp(u, 0, slot_len),
            None => slot_len,
        };
        SeqlenInfo { start, slot_len, used }
    }

    /// The rows past the last sequence of a varlen batch (`[cu_last, total)`): all padding.
    pub fn tail(cu_last: i32, total: i32) -> SeqlenInfo {
        let total = if total > 0 { total } else { 0 };
        let start = clamp(cu_last, 0, total);
        SeqlenInfo { start, slot_len: total - start, used: 0 }
    }
}

#[inline(always)]
fn clamp(x: i32, lo: i32, hi: i32) -> i32 {
    if x < lo { lo } else if x > hi { hi } else { x }
}
