//! Dropout's keep-mask: a pure function of (seed, offset, sequence, head, query, key), so the forward,
//! the backward (which regenerates it, nothing is stored) and every target draw the same mask bit for
//! bit. Integer arithmetic only: this file is compiled for the kernels (kernels-gpu) and for the host
//! (`flash_attn::dropout`), so there is one definition.
//!
//! # The mask
//!
//! Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel Random Numbers: As Easy as 1, 2, 3", SC11; the
//! Random123 definition) maps a 128-bit counter `[c0, c1, c2, c3]` and a 64-bit key `[k0, k1]` to four
//! 32-bit words `x[0..4]`, sixteen 8-bit draws (flash-attn 2's and PyTorch's draw width). Score (i, j) of
//! query head `h` of sequence `b` (the batch index, or the sequence's index in `cu_seqlens` for packed
//! inputs; `i` and `j` count from the sequence's first query and first key, 0-based) is kept iff
//!
//! ```text
//! key     = [seed as u32, (seed >> 32) as u32]
//! sub     = offset.wrapping_add(b * Hq + h)                      (u64; Hq = the number of query heads)
//! counter = [(j / 16) * 4 + (j % 8) / 2, (i / 16) * 4 + (i % 8) / 2, sub as u32, (sub >> 32) as u32]
//! word    = 2 * ((i % 2) ^ ((j / 16) % 2)) + ((j % 2) ^ ((i / 16) % 2))
//! byte    = (j / 8) % 2 + 2 * ((i / 8) % 2)
//! draw    = (philox4x32_10(counter, key)[word] >> (8 * byte)) & 0xff
//! keep    = draw < threshold,   threshold = round((1 - p) * 256) clamped to [1, 255]   (f64, on the host)
//! ```
//!
//! So one Philox call decides the 4 x 4 scores of rows {i, i + 1, i + 8, i + 9} and keys {j, j + 1, j +
//! 8, j + 9} of a 16 x 16 block (i % 16 and j % 16 in {0, 2, 4, 6}). In an `mma.sync` m16n8 or `wgmma`
//! accumulator a thread holds 8 scores of such a block: rows {g, g + 8} x keys {2t, 2t + 1, 2t + 8, 2t +
//! 9} of S = Q K^T, or keys {g, g + 8} x queries {2t, .., 2t + 9} of S^T = K Q^T. Either way that is half
//! of one call, and the lane with g ^ 1 (lane ^ 4) holds the other half. So the two lanes share the
//! calls of two neighbouring blocks: each draws the block whose index (key block for S, query block for
//! S^T) has its g's parity, keeps the two words of its own half (words 0, 1 for S and 0, 2 for S^T: that
//! is what the XORs in `word` arrange) and trades the other two for its partner's: one call per 16
//! scores per thread in both layouts, and two shuffles. The bytes of a word are the thread's two rows
//! (S) or keys (S^T) times its two n8 tiles of the block.
//! Kept scores are scaled by `1 / (1 - p)` (an f32 computed on the host). The keep
//! probability is `threshold / 256`: within 2^-9 of 1 - p for p in [2^-9, 1 - 2^-9] (exact where p is a
//! multiple of 1/256), and every p > 0 drops at least 1 score in 256 (flash-attn 2 also quantizes p to
//! 8 bits).
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
#[inline(always)]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    let mut round = 0;
    while round < 10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
        round += 1;
    }
    c
}

/// The Philox key of `seed`.
#[inline(always)]
pub fn key(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// The counter of the call deciding score (i, j) of subsequence `sub` (`offset + b * Hq + h`).
#[inline(always)]
pub fn counter(sub: u64, i: u32, j: u32) -> [u32; 4] {
    [(j / 16) * 4 + (j % 8) / 2, (i / 16) * 4 + (i % 8) / 2, sub as u32, (sub >> 32) as u32]
}

/// Score (i, j)'s 8-bit draw among its call's words.
#[inline(always)]
pub fn draw(words: &[u32; 4], i: u32, j: u32) -> u32 {
    let word = 2 * ((i % 2) ^ ((j / 16) % 2)) + ((j % 2) ^ ((i / 16) % 2));
    (words[word as usize] >> (8 * ((j / 8) % 2 + 2 * ((i / 8) % 2)))) & 0xff
}

/// The keep threshold of dropout probability `p` in (0, 1): keep iff an 8-bit draw is below it.
pub fn keep_threshold(p: f32) -> u32 {
    // Round half up; `as` truncates a positive value.
    let t = ((1.0 - p as f64) * 256.0 + 0.5) as u32;
    t.clamp(1, 255)
}
