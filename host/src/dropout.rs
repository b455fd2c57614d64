//! Dropout's keep-mask: a pure function of (seed, offset, sequence, head, query, key), so the forward,
//! the backward (which regenerates it, nothing is stored) and every target draw the same mask bit for
//! bit. Integer arithmetic only (no allocation, no float on the device side): it compiles for the kernels
//! as it is.
//!
//! # The mask
//!
//! Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel Random Numbers: As Easy as 1, 2, 3", SC11; the
//! Random123 definition) maps a 128-bit counter `[c0, c1, c2, c3]` and a 64-bit key `[k0, k1]` to four
//! 32-bit words `x[0..4]`. Score (i, j) of query head `h` of sequence `b` (the batch index, or the
//! sequence's index in `cu_seqlens` for packed inputs; `i` and `j` count from the sequence's first query
//! and first key, 0-based) is kept iff
//!
//! ```text
//! key     = [seed as u32, (seed >> 32) as u32]
//! sub     = offset.wrapping_add(b * Hq + h)                  (u64; Hq = the number of query heads)
//! counter = [j / 2, (i / 16) * 8 + i % 8, sub as u32, (sub >> 32) as u32]
//! lane    = j % 2 + 2 * ((i / 8) % 2)
//! keep    = philox4x32_10(counter, key)[lane] < threshold
//! threshold = min(floor((1 - p) * 2^32), 2^32 - 1)           (in f64, computed once on the host)
//! ```
//!
//! So one Philox call decides the 2 x 2 scores (i, j), (i, j + 1), (i + 8, j), (i + 8, j + 1) of
//! every 16-row block (i % 16 < 8, j even): exactly the four accumulator elements one thread holds per
//! 8-column chunk of an `mma.sync` m16n8 or a `wgmma` m64nN product of S = Q K^T, so a kernel makes one
//! call per four of its scores and wastes none. Kept scores are scaled by `1 / (1 - p)` (`scale`, an f32
//! computed on the host). The keep probability is `threshold / 2^32`, within 2^-32 of 1 - p.
//!
//! A call uses the subsequences `offset .. offset + B * Hq`: callers drawing independent masks for
//! consecutive calls with one seed advance `offset` by at least `B * Hq` (torch's generator, as
//! flash-attn uses it, advances by `B * Hq * 32`).

/// Philox4x32's multipliers and Weyl key increments (Random123).
const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// The 64-bit product `a * b` as (high word, low word).
#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let x = a as u64 * b as u64;
    ((x >> 32) as u32, x as u32)
}

/// Philox4x32-10: ten rounds of the Philox S-box over the counter, the key bumped by the Weyl sequence
/// between rounds.
#[inline]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The keep threshold of dropout probability `p` in [0, 1): keep iff a 32-bit draw is below it.
pub fn keep_threshold(p: f32) -> u32 {
    let t = ((1.0 - p as f64) * 4_294_967_296.0).floor();
    if t >= u32::MAX as f64 { u32::MAX } else { t as u32 }
}

/// A validated dropout (0 < p < 1): everything a target needs to draw and apply the mask.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutParams {
    /// The probability of dropping a score.
    pub p: f32,
    pub seed: u64,
    pub offset: u64,
    /// Keep iff the draw is below this (`keep_threshold(p)`).
    pub threshold: u32,
    /// `1 / (1 - p)`, rounded to f32 once: the factor of every kept probability.
    pub scale: f32,
}

impl DropoutParams {
    /// The dropout of probability `p` (checked to be in [0, 1) by the caller); `None` for p = 0, which
    /// costs nothing.
    pub fn new(p: f32, seed: u64, offset: u64) -> Option<DropoutParams> {
        (p > 0.0).then(|| DropoutParams { p, seed, offset, threshold: keep_threshold(p), scale: (1.0 / (1.0 - p as f64)) as f32 })
    }

    /// The Philox key.
    #[inline]
    pub fn key(&self) -> [u32; 2] {
        [self.seed as u32, (self.seed >> 32) as u32]
    }

    /// The counter and output lane that decide score (i, j) of head `bh = b * Hq + h`.
    #[inline]
    pub fn counter(&self, bh: u64, i: u32, j: u32) -> ([u32; 4], usize) {
        let sub = self.offset.wrapping_add(bh);
        ([j / 2, (i / 16) * 8 + i % 8, sub as u32, (sub >> 32) as u32], (j % 2 + 2 * ((i / 8) % 2)) as usize)
    }

    /// Whether score (i, j) of head `bh = b * Hq + h` is kept.
    #[inline]
    pub fn keep(&self, bh: u64, i: u32, j: u32) -> bool {
        let (counter, lane) = self.counter(bh, i, j);
        philox4x32_10(counter, self.key())[lane] < self.threshold
    }

    /// The keep decisions of scores (i, j0), (i, j0 + 1), .. of head `bh` into `keep` (one Philox call
    /// per pair of keys).
    pub fn keep_row(&self, bh: u64, i: u32, j0: u32, keep: &mut [bool]) {
        let mut j = j0;
        let mut at = 0;
        while at < keep.len() {
            let (counter, lane) = self.counter(bh, i, j);
            let x = philox4x32_10(counter, self.key());
            // Lanes of this row: even key at lane & !1, odd key at lane | 1.
            let row_lane = lane & 2;
            keep[at] = x[row_lane + (j % 2) as usize] < self.threshold;
            if j % 2 == 0 && at + 1 < keep.len() {
                keep[at + 1] = x[row_lane + 1] < self.threshold;
                at += 1;
                j += 1;
            }
            at += 1;
            j += 1;
        }
    }
}
