//! Score modifiers: ALiBi's bias and dropout's keep-mask on a thread's accumulator fragments. Kernels
//! are generic over `MODS`: the `_mods` and `_paged_mods` twins read `params::ScoreMods` into a
//! `HeadMods` per (sequence, head); every other kernel builds `HeadMods::OFF`, whose constants remove
//! every use at compile time. Inside a `_mods` kernel each modifier the call does not have costs a
//! uniform branch, and leaves the arithmetic exactly the plain kernel's. (Measured, H200: carrying them
//! in every paged kernel cost the ragged paged batch 9% at page 256, hence separate `_paged_mods`.)
//!
//! Dropout's draws are `dropout.rs`'s (the host's file, compiled here too): one Philox call per 16 x 32
//! block of scores per thread, whose sixteen 8-bit draws are exactly the thread's elements there in the
//! query-major layout (S = Q K^T; word w = n8 tile w, byte e = element e); the key-major kernels (S^T = K
//! Q^T, a warp holding 16 keys) make the same call as the lane in that position, take the half of its
//! draws their 16 keys own, and trade the decisions with two shuffles.

use crate::arch::math::fma;
use crate::arch::mem::ld_global_nc_f32;
use crate::arch::reg::prmt;
use crate::arch::shfl::shfl_idx_u32;
use crate::dropout::{key, philox4x32_10};
use crate::params::{ScoreMods, DROPOUT_OFF};

const LOG2_E: f32 = core::f32::consts::LOG2_E;

/// The modifiers of one (sequence, query head).
#[derive(Clone, Copy)]
pub(crate) struct HeadMods {
    /// Whether this kernel has modifiers at all (a compile-time constant once inlined).
    pub modded: bool,
    /// Whether this call has ALiBi (uniform; false in kernels without modifiers).
    pub alibi: bool,
    /// ALiBi's slope times log2(e) (0 without ALiBi): the bias of score (i, j) in base 2 is
    /// `-slope_log2 * |i + seqlen_k - seqlen_q - j|`.
    pub slope_log2: f32,
    pub dropout: bool,
    /// The head's Philox subsequence (`offset + b * Hq + h`) and the seed.
    pub sub: u64,
    pub seed: u64,
    pub threshold: u32,
    /// 1 / (1 - p), or 1.
    pub scale: f32,
}

impl HeadMods {
    pub(crate) const OFF: HeadMods = HeadMods { modded: false, alibi: false, slope_log2: 0.0, dropout: false, sub: 0, seed: 0, threshold: DROPOUT_OFF, scale: 1.0 };

    /// Sequence `b`'s query head `h` of `hq`, from the parameters when `MODS`. (The slopes are read
    /// only for `b < batch`: varlen's tail slice has none, and attends nothing.)
    #[inline(always)]
    pub(crate) fn new<const MODS: bool>(m: &ScoreMods, b: i32, h: i32, hq: i32, batch: i32) -> HeadMods {
        if !MODS {
            return HeadMods::OFF;
        }
        let slope = if m.alibi_slopes != 0 && b < batch {
            let at = b as i64 * m.alibi_batch_stride + h as i64 * m.alibi_head_stride;
            unsafe { ld_global_nc_f32(m.alibi_slopes.wrapping_add((at * 4) as u64)) }
        } else {
            0.0
        };
        HeadMods {
            modded: true,
            alibi: m.alibi_slopes != 0,
            slope_log2: slope * LOG2_E,
            dropout: m.dropout_threshold < DROPOUT_OFF,
            sub: m.dropout_offset.wrapping_add((b as i64 * hq as i64 + h as i64) as u64),
            seed: m.dropout_seed,
            threshold: m.dropout_threshold,
            scale: m.dropout_scale,
        }
    }

    /// The call for counter `(x, y)`.
    #[inline(always)]
    fn words(&self, x: u32, y: u32) -> [u32; 4] {
        philox4x32_10([x, y, self.sub as u32, (self.sub >> 32) as u32], key(self.seed))
    }

    /// Half `half` of the call for counter `(x, y)` (its words 2 half and 2 half + 1: one 16-key half of
    /// the call's 32 keys) as keep bits: bit `2 e + w` for byte `e` of word `2 half + w`.
    #[inline(always)]
    fn keep_bits(&self, x: u32, y: u32, half: u32) -> u32 {
        let w = self.words(x, y);
        let (lo, hi) = if half == 0 { (w[0], w[1]) } else { (w[2], w[3]) };
        let c = Carry::of(self.threshold);
        // Verdict top bits to bits 8 e (lo) and 8 e + 1 (hi), then the four byte pairs to bits 2 e, 2 e + 1.
        let x = ((c.kept_bytes(lo) & 0x8080_8080) >> 7) | ((c.kept_bytes(hi) & 0x8080_8080) >> 6);
        let x = x | (x >> 6);
        (x & 0xf) | ((x >> 12) & 0xf0)
    }
}

/// The counter's (x, y) of a query-major lane at query `row0 = 16 a + g` and key `key0 = 32 c + 8 w + 2
/// t` (+ 1): `dropout.rs`'s `[(j / 32) 4 + (j % 8) / 2, (i / 16) 8 + i % 8]`.
#[inline(always)]
fn counter_qk(row0: i32, key0: i32) -> (u32, u32) {
    (((key0 >> 5) * 4 + ((key0 & 7) >> 1)) as u32, ((row0 >> 4) * 8 + (row0 & 7)) as u32)
}

/// The bytewise test `draw < threshold` on a word of four 8-bit draws: `draw < threshold` is the
/// absence of a carry out of `draw + 256 - threshold`.
#[derive(Clone, Copy)]
struct Carry {
    /// 256 - threshold in every byte.
    c: u32,
    /// Its low 7 bits, added without carries between bytes (the top bits are the third input of the
    /// carry-out majority).
    c_low: u32,
}

impl Carry {
    #[inline(always)]
    fn of(threshold: u32) -> Carry {
        let c = (256 - threshold) * 0x0101_0101;
        Carry { c, c_low: c & 0x7f7f_7f7f }
    }

    /// The top bit of each byte set iff that byte's draw is kept (the other bits are junk). Three
    /// integer operations besides the majority's.
    #[inline(always)]
    fn kept_bytes(self, word: u32) -> u32 {
        let s = (word & 0x7f7f_7f7f) + self.c_low;
        !((word & s) | (word & self.c) | (s & self.c))
    }
}

/// ALiBi on query-major fragments of raw scores (S = Q K^T: `MT` m16 x `NN` n8 tiles, element `i` of
/// tile (mt, j) at query `row0 + 16 mt + 8 (i / 2)`, key `key0 + 8 j + i % 2`): `s -= slope_raw |i +
/// shift - j|`, with `slope_raw` the slope in the softmax's raw units (`HeadMods::raw_slope`). One add
/// and one FMA per score. `shift` = seqlen_k - seqlen_q.
#[inline(always)]
pub(crate) fn alibi_qk<const MT: usize, const NN: usize>(acc: &mut [[[f32; 4]; NN]; MT], slope_raw: f32, row0: i32, key0: i32, shift: i32) {
    for mt in 0..MT {
        for h in 0..2 {
            let base = (row0 + (16 * mt + 8 * h) as i32 + shift - key0) as f32;
            for j in 0..NN {
                for e in 0..2 {
                    let d = base - (8 * j + e) as f32;
                    acc[mt][j][2 * h + e] = fma(-slope_raw, d.abs(), acc[mt][j][2 * h + e]);
                }
            }
        }
    }
}

/// The smallest |scale_log2| the forward's ALiBi divides by (`HeadMods::raw_slope`): a smaller scale (0
/// is passed as the smallest normal float) adds at most |q.k| 2^-60 to a base-2 score.
pub(crate) const MIN_ALIBI_SCALE: f32 = f32::from_bits((127 - 60) << 23);

impl HeadMods {
    /// ALiBi's slope in the forward's raw score units (the softmax multiplies raw scores by
    /// `scale`, at least `MIN_ALIBI_SCALE`): slope log2(e) / scale.
    #[inline(always)]
    pub(crate) fn raw_slope(&self, scale: f32) -> f32 {
        self.slope_log2 / scale
    }
}

/// Dropout's decisions for query-major fragments (as `alibi_qk`; `row0 = 16 a + g`, `key0 = 8 c + 2 t`:
/// this lane's position in its 16-row block and 8-key tile): `f(mt, j, i, keep)`. `NN` even; with `NN %
/// 4 == 0` the keys start at a multiple of 32 (one call per 32 keys), else at a multiple of 16 (one call
/// per 16 keys, half of its draws taken).
#[inline(always)]
pub(crate) fn keep_qk<const MT: usize, const NN: usize>(m: &HeadMods, row0: i32, key0: i32, mut f: impl FnMut(usize, usize, usize, bool)) {
    let (x0, y0) = counter_qk(row0, key0);
    let byte = |word: u32, e: usize| (word >> (8 * e)) & 0xff;
    for mt in 0..MT {
        if NN % 4 == 0 {
            for k in 0..NN / 4 {
                let w = m.words(x0 + 4 * k as u32, y0 + 8 * mt as u32);
                for (c, word) in w.iter().enumerate() {
                    for e in 0..4 {
                        f(mt, 4 * k + c, e, byte(*word, e) < m.threshold);
                    }
                }
            }
        } else {
            // The 16-key piece k starts at key0 - 2t + 16 k: its call's half (key / 16) % 2.
            let half0 = ((key0 >> 4) & 1) as u32;
            for k in 0..NN / 2 {
                let (half, x) = ((half0 + k as u32) & 1, x0 + 4 * ((half0 + k as u32) >> 1));
                let w = m.words(x, y0 + 8 * mt as u32);
                let (lo, hi) = if half == 0 { (w[0], w[1]) } else { (w[2], w[3]) };
                for e in 0..4 {
                    f(mt, 2 * k, e, byte(lo, e) < m.threshold);
                    f(mt, 2 * k + 1, e, byte(hi, e) < m.threshold);
                }
            }
        }
    }
}

/// Dropout's verdicts on a thread's packed P of one key tile (`kept_p`): for call k (keys 32 k..) word w
/// (n8 tile 4 k + w), the top bit of byte e set iff element e of that tile is kept. The draws do not
/// depend on the scores, so kernels compute them where an asynchronous product hides the integer work
/// (`fwd::ws`'s `kept_under_s`).
#[derive(Clone, Copy)]
pub(crate) struct KeptP(pub [[u32; 4]; 4]);

impl KeptP {
    /// Every score kept (no dropout).
    pub(crate) const ALL: KeptP = KeptP([[!0; 4]; 4]);
}

/// `KeptP` of the `KP` A fragments of a P V product on wgmma (`KP <= 8`: n8 tiles 0..2 KP; `row0 = 16 a +
/// g`, `key0` = the tile's first key (a multiple of 32) + 2 t). Per call (16 scores) one
/// `Carry::kept_bytes` per word.
#[inline(always)]
pub(crate) fn kept_p<const KP: usize>(m: &HeadMods, row0: i32, key0: i32) -> KeptP {
    let (x0, y0) = counter_qk(row0, key0);
    let carry = Carry::of(m.threshold);
    let mut kept = KeptP::ALL;
    for k in 0..KP.div_ceil(2) {
        let w = m.words(x0 + 4 * k as u32, y0);
        for (c, word) in w.iter().enumerate() {
            kept.0[k][c] = carry.kept_bytes(*word);
        }
    }
    kept
}

/// Dropout on packed P (`pa[kk]` = rows g, g + 8 of n8 tiles 2 kk and 2 kk + 1, two 16-bit probabilities
/// per register): per register a `prmt` spreads two bytes' verdicts over their 16-bit halves and an AND
/// zeroes the dropped ones.
#[inline(always)]
pub(crate) fn drop_p<const KP: usize>(kept: &KeptP, pa: &mut [[u32; 4]; KP]) {
    for (kk, frag) in pa.iter_mut().enumerate() {
        for tile in 0..2 {
            let v = kept.0[kk / 2][2 * (kk % 2) + tile];
            frag[2 * tile] &= prmt(v, 0, 0x9988);
            frag[2 * tile + 1] &= prmt(v, 0, 0xbbaa);
        }
    }
}

/// Dropout's decisions for key-major fragments (as `alibi_kq`; `key0 = 16 a + g`, `row0 = 16 c + 2 t`):
/// `f(kt, k, bits)` per key tile `kt` and pair `k` of query tiles (2 k, 2 k + 1), bit `4 kk + 2 (i % 2) +
/// i / 2` of `bits` set iff element `i` of tile (kt, 2 k + kk) is kept. Each lane draws for the (query,
/// key) position of the query-major lane with its (g, t) in the 16 x 32 block around its key tile, keeps
/// the half of the call its 16 keys own, then takes its own decisions from the two lanes that drew them
/// (`4 (2 t + e) + g / 2`). Every lane of the warp must call this (shuffles). `QN` even.
#[inline(always)]
pub(crate) fn keep_kq<const KT: usize, const QN: usize>(m: &HeadMods, row0: i32, key0: i32, mut f: impl FnMut(usize, usize, u32)) {
    let (g, t) = ((key0 & 7) as u32, ((row0 & 7) >> 1) as u32);
    // As the query-major lane (g, t): query row g of its 16-row block, key pair t.
    let y0 = ((row0 >> 4) * 8) as u32 + g;
    let tile0 = (key0 >> 4) as u32;
    for kt in 0..KT {
        let (x, half) = (((tile0 + kt as u32) >> 1) * 4 + t, (tile0 + kt as u32) & 1);
        for k in 0..QN / 2 {
            let bits = m.keep_bits(x, y0 + 8 * k as u32, half);
            // Lane (2t + e, g / 2) drew queries 2t + e (+ 8) against keys (g & !1) + {0, 1} (+ 8): its bit
            // 2 (g % 2 + 2 kk) + h is query 8 kk + 2t + e, key g (+ 8 h). Shifted by 2 (g % 2): 4 kk + h.
            let r0 = shfl_idx_u32(bits, 8 * t + g / 2) >> (2 * (g % 2));
            let r1 = shfl_idx_u32(bits, 8 * t + 4 + g / 2) >> (2 * (g % 2));
            f(kt, k, (r0 & 0x33) | ((r1 << 2) & 0xcc));
        }
    }
}
