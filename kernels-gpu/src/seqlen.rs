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

    /// A paged sequence's keys: counted by the slot `[cu_start, cu_end)` of cu_seqlens_k (where given)
    /// cut to `seqused`, else by `seqused`, and clamped to the `capacity` keys a block-table row
    /// addresses. Where they lie is the block table's business: `start` is 0.
    pub fn counted(slot: Option<(i32, i32)>, seqused: Option<i32>, capacity: i32) -> SeqlenInfo {
        let cap = if capacity > 0 { capacity } else { 0 };
        let slot_len = match slot {
            // In i64: bogus entries may be anything.
            Some((a, b)) => {
                let n = b as i64 - a as i64;
                if n < 0 { 0 } else if n > cap as i64 { cap } else { n as i32 }
            }
            None => match seqused {
                Some(u) => clamp(u, 0, cap),
                None => cap,
            },
        };
        let used = match seqused {
            Some(u) => clamp(u, 0, slot_len),
            None => slot_len,
        };
        SeqlenInfo { start: 0, slot_len, used }
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
    /// Paged K/V (the paged forward kernels set it): `Some(keys a block-table row addresses)`; the key
    /// side is then `SeqlenInfo::counted` (cu_seqlens_k may be absent, 0) and the tail slice has no keys.
    pub paged_keys: Option<i32>,
    /// KV cache (paged only): int32 `[batch]` positions of each sequence's key 0 in its block-table
    /// row (0 = none), and the rows appended to the cache, counted on top of `seqused_k`.
    pub k_first: u64,
    pub seqused_k_add: i32,
}

impl Lengths {
    /// The (q, k) sequences of grid slice `bidb`: sequence `bidb` when `bidb < batch`, else (varlen only)
    /// the buffers' tail rows past the last sequence, all padding. `read(ptr, i)` loads int32 `i` of the
    /// device array at `ptr`.
    #[inline(always)]
    pub fn slice(&self, bidb: i32, read: impl Fn(u64, i32) -> i32) -> (SeqlenInfo, SeqlenInfo) {
        if bidb >= self.batch {
            let tail_q = SeqlenInfo::tail(read(self.cu_seqlens_q, self.batch), self.total_q);
            // A paged tail has no keys (and cu_seqlens_k may be absent).
            let tail_k = match self.paged_keys {
                Some(_) => SeqlenInfo { start: 0, slot_len: 0, used: 0 },
                None => SeqlenInfo::tail(read(self.cu_seqlens_k, self.batch), self.total_k),
            };
            (tail_q, tail_k)
        } else if self.cu_seqlens_q != 0 {
            let used_q = if self.seqused_q != 0 { Some(read(self.seqused_q, bidb)) } else { None };
            let used_k = if self.seqused_k != 0 { Some(read(self.seqused_k, bidb)) } else { None };
            let sq = SeqlenInfo::varlen(read(self.cu_seqlens_q, bidb), read(self.cu_seqlens_q, bidb + 1), used_q, self.total_q);
            let sk = match self.paged_keys {
                None => SeqlenInfo::varlen(read(self.cu_seqlens_k, bidb), read(self.cu_seqlens_k, bidb + 1), used_k, self.total_k),
                Some(capacity) => {
                    let slot = if self.cu_seqlens_k != 0 { Some((read(self.cu_seqlens_k, bidb), read(self.cu_seqlens_k, bidb + 1))) } else { None };
                    SeqlenInfo::counted(slot, used_k, capacity)
                }
            };
            (sq, sk)
        } else {
            let sk = match self.paged_keys {
                None => SeqlenInfo::dense(self.seqlen_k),
                Some(capacity) => self.cache_keys(bidb, capacity, &read),
            };
            (SeqlenInfo::dense(self.seqlen_q), sk)
        }
    }

    /// Slot scheduling, for a varlen grid sized without the max lengths: virtual row block `v` of
    /// `slots = total / bm + batch + 1` (`problem::slot_count` on the host) on the query side (`keys`: the key side) as
    /// (sequence slice, its row block). Sequence b owns the `cu[b+1] / bm - cu[b] / bm + 1` slots from
    /// `cu[b] / bm + b` on (at least its row blocks), the tail slice (b = batch) the rest, so every row
    /// block of every slice has one slot; a slot past its slice's rows has nothing to do. Found by binary
    /// search over cu_seqlens (clamped as `SeqlenInfo::varlen` does); unsorted (bogus) cu_seqlens get
    /// some slice, or row block `slots`, past every slice's rows: never a negative block.
    #[inline(always)]
    pub fn slot_block(&self, v: i32, bm: i32, keys: bool, slots: i32, read: impl Fn(u64, i32) -> i32) -> (i32, i32) {
        let (cu, total) = if keys { (self.cu_seqlens_k, self.total_k) } else { (self.cu_seqlens_q, self.total_q) };
        let total = if total > 0 { total } else { 0 };
        // Unchecked in effect: bm is a positive constant where the kernels call this.
        let first = |b: i32| clamp(read(cu, b), 0, total) / bm + b;
        let (mut lo, mut hi) = (0, self.batch + 1);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if first(mid) <= v {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let at = first(lo);
        if at <= v { (lo, v - at) } else { (lo, slots) }
    }

    /// Dense queries over a paged (or KV-cache) sequence's keys: `seqused_k[b] + seqused_k_add` keys of
    /// its table row (all `capacity` without seqused_k), from position `k_first[b]` on (`start`), all
    /// clamped to the row: `start + used <= capacity`.
    #[inline(always)]
    fn cache_keys(&self, bidb: i32, capacity: i32, read: &impl Fn(u64, i32) -> i32) -> SeqlenInfo {
        let cap = if capacity > 0 { capacity } else { 0 };
        let first = if self.k_first != 0 { clamp(read(self.k_first, bidb), 0, cap) } else { 0 };
        let end = if self.seqused_k != 0 { read(self.seqused_k, bidb) as i64 + self.seqused_k_add as i64 } else { cap as i64 };
        let n = end - first as i64;
        let room = (cap - first) as i64;
        let n = if n < 0 { 0 } else if n > room { room as i32 } else { n as i32 };
        SeqlenInfo { start: first, slot_len: n, used: n }
    }
}
