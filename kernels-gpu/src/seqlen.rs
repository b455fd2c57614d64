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

/// The length arrays and sizes both kernels' parameters carry: device addresses (0 = absent) and counts.
#[derive(Clone, Copy, Debug)]
pub struct Lengths {
    pub cu_seqlens_q: u64,
    pub cu_seqlens_k: u64,
    pub seqused_q: u64,
    pub seqused_k: u64,
    pub batch: i32,
    pub seqlen_q: i32,
    pub seqlen_k: i32,
    pub total_q: i32,
    pub total_k: i32,
}

impl Lengths {
    /// The (q, k) sequences of grid slice `bidb`: sequence `bidb` when `bidb < batch`, else (varlen only)
    /// the buffers' tail rows past the last sequence, all padding. `read(ptr, i)` loads int32 `i` of the
    /// device array at `ptr`.
    #[inline(always)]
    pub fn slice(&self, bidb: i32, read: impl Fn(u64, i32) -> i32) -> (SeqlenInfo, SeqlenInfo) {
        if bidb >= self.batch {
            (SeqlenInfo::tail(read(self.cu_seqlens_q, self.batch), self.total_q), SeqlenInfo::tail(read(self.cu_seqlens_k, self.batch), self.total_k))
        } else if self.cu_seqlens_q != 0 {
            let used_q = if self.seqused_q != 0 { Some(read(self.seqused_q, bidb)) } else { None };
            let used_k = if self.seqused_k != 0 { Some(read(self.seqused_k, bidb)) } else { None };
            (
                SeqlenInfo::varlen(read(self.cu_seqlens_q, bidb), read(self.cu_seqlens_q, bidb + 1), used_q, self.total_q),
                SeqlenInfo::varlen(read(self.cu_seqlens_k, bidb), read(self.cu_seqlens_k, bidb + 1), used_k, self.total_k),
            )
        } else {
            (SeqlenInfo::dense(self.seqlen_q), SeqlenInfo::dense(self.seqlen_k))
        }
    }
}
