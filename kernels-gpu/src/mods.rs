//! Score modifiers: ALiBi's bias and dropout's keep-mask on a thread's accumulator fragments. Kernels
//! are generic over `MODS`: the `_mods` and `_paged_mods` twins read `params::ScoreMods` into a
//! `HeadMods` per (sequence, head); every other kernel builds `HeadMods::OFF`, whose constants remove
//! every use at compile time. Inside a `_mods` kernel each modifier the call does not have costs a
//! uniform branch, and leaves the arithmetic exactly the plain kernel's. (Measured, H200: carrying them
//! in every paged kernel cost the ragged paged batch 9% at page 256, hence separate `_paged_mods`.)
//!
//! Dropout's draws are `dropout.rs`'s (the host's file, compiled here too): one Philox call decides a
//! 4 x 4 set of a 16 x 16 block, half of it held by a lane and half by lane ^ 4, in both the query-major
//! layout (S = Q K^T) and the key-major one (S^T = K Q^T). The two lanes draw the calls of two
//! neighbouring blocks, one each, and trade halves with two shuffles (`traded`): one call per 16 scores
//! per lane either way.

use crate::arch::math::{fma, sub_abs_fma};
use crate::arch::mem::ld_global_nc_f32;
use crate::arch::reg::prmt;
use crate::arch::shfl::shfl_xor_u32;
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
}

/// One lane's half of a call `w` (see the module doc): words 0 and 1, or 2 and 3 where `second`
/// (query-major); words 0 and 2, or 1 and 3 (`KEY_MAJOR`).
#[inline(always)]
fn half<const KEY_MAJOR: bool>(w: [u32; 4], second: bool) -> [u32; 2] {
    match (KEY_MAJOR, second) {
        (false, false) => [w[0], w[1]],
        (false, true) => [w[2], w[3]],
        (true, false) => [w[0], w[2]],
        (true, true) => [w[1], w[3]],
    }
}

/// A lane pair's trade (lanes L and L ^ 4, see the module doc): of this lane's call `w`, it keeps the
/// first half (`half`), its own, and gets its partner's call's words that hold this lane's half of the
/// partner's block, in the same order. Every lane of the warp must call this (shuffles).
#[inline(always)]
fn traded<const KEY_MAJOR: bool>(w: [u32; 4]) -> ([u32; 2], [u32; 2]) {
    let send = half::<KEY_MAJOR>(w, true);
    (half::<KEY_MAJOR>(w, false), [shfl_xor_u32(send[0], 4), shfl_xor_u32(send[1], 4)])
}

/// The words deciding a query-major lane's scores in `nb` 16 x 16 blocks of keys: its rows `row0 = 16 qb +
/// g` and g + 8, keys `key0 = 16 kb0 + 2 t` (+ 1, + 8, + 9) of block `kb0 + b` for `f(b, words)`.
/// `words[0]` holds the keys of parity qb % 2, `words[1]` the others; byte `tile + 2 h` is row g + 8 h
/// in n8 tile `tile` of the block (`dropout.rs`). Pairs of blocks are traded; an odd last block is this lane's
/// own call, half of it used. Every lane of the warp must call this.
#[inline(always)]
fn qk_words(m: &HeadMods, row0: i32, key0: i32, nb: usize, mut f: impl FnMut(usize, [u32; 2])) {
    let p = (row0 & 1) as u32;
    let y = ((row0 >> 4) * 4 + ((row0 & 7) >> 1)) as u32;
    let (kb0, t) = ((key0 >> 4) as u32, ((key0 & 7) >> 1) as u32);
    // This lane draws the block of the pair whose parity is its row parity.
    let second = (kb0 ^ p) & 1;
    for c in 0..nb / 2 {
        let (own, got) = traded::<false>(m.words(4 * (kb0 + 2 * c as u32 + second) + t, y));
        let (first, other) = if second == 0 { (own, got) } else { (got, own) };
        f(2 * c, first);
        f(2 * c + 1, other);
    }
    if nb % 2 == 1 {
        let kb = kb0 + (nb - 1) as u32;
        let w = m.words(4 * kb + t, y);
        f(nb - 1, half::<false>(w, (p ^ kb) & 1 != 0));
    }
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
/// and one FMA per score (and in SASS an AND for |d|). `shift` = seqlen_k - seqlen_q.
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

/// `alibi_qk` in two instructions per score: slope |d| = |slope d| (slope >= 0; below 0 the bias adds),
/// and slope d = slope base - slope c, with base the row's distance to `key0` and c the key's offset from
/// it, a constant: one FMA with c as its immediate, then one add with |.| on its operand
/// (`sub_abs_fma`; `alibi_qk`'s takes three: an add, an AND for |d|, the FMA). The product slope base is
/// rounded once per row, so the bias carries an error of about 2^-24 slope (|d| + 8 NN). The slope's
/// sign picks one of two loops (warp-uniform: one head per row block).
#[inline(always)]
pub(crate) fn alibi_qk_fast<const MT: usize, const NN: usize>(acc: &mut [[[f32; 4]; NN]; MT], slope_raw: f32, row0: i32, key0: i32, shift: i32) {
    if slope_raw >= 0.0 { alibi_qk_sign::<MT, NN, false>(acc, slope_raw, row0, key0, shift) } else { alibi_qk_sign::<MT, NN, true>(acc, slope_raw, row0, key0, shift) }
}

/// `alibi_qk_fast`'s loop for slopes below 0 (`NEG`; NaN too) or not.
#[inline(always)]
fn alibi_qk_sign<const MT: usize, const NN: usize, const NEG: bool>(acc: &mut [[[f32; 4]; NN]; MT], slope_raw: f32, row0: i32, key0: i32, shift: i32) {
    for mt in 0..MT {
        for h in 0..2 {
            let sb = slope_raw * (row0 + (16 * mt + 8 * h) as i32 + shift - key0) as f32;
            for j in 0..NN {
                for e in 0..2 {
                    let s = &mut acc[mt][j][2 * h + e];
                    *s = sub_abs_fma::<NEG>(*s, -slope_raw, (8 * j + e) as f32, sb);
                }
            }
        }
    }
}

/// How a forward kernel applies ALiBi's bias (constants per kernel): `linear`, the linear form on tiles
/// beside the diagonal (`fwd::scores_to_p`); `fast`, the general form as `alibi_qk_fast` (else
/// `alibi_qk`).
#[derive(Clone, Copy)]
pub(crate) struct AlibiCode {
    pub linear: bool,
    pub fast: bool,
}

impl AlibiCode {
    pub(crate) const fn general(linear: bool) -> AlibiCode {
        AlibiCode { linear, fast: false }
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

/// Dropout's decisions for query-major fragments (as `alibi_qk`; `row0 = 16 a + g`, `key0 = 16 c + 2 t`:
/// this lane's position in its 16-row block and 16-key block): `f(mt, j, i, keep)`. `NN` even. Every lane
/// of the warp must call this (shuffles).
#[inline(always)]
pub(crate) fn keep_qk<const MT: usize, const NN: usize>(m: &HeadMods, row0: i32, key0: i32, mut f: impl FnMut(usize, usize, usize, bool)) {
    for mt in 0..MT {
        let row = row0 + 16 * mt as i32;
        let odd = ((row >> 4) & 1) as usize;
        qk_words(m, row, key0, NN / 2, #[inline(always)] |b, w| {
            for tile in 0..2 {
                for i in 0..4 {
                    let byte = (w[(i % 2) ^ odd] >> (8 * (tile + 2 * (i / 2)))) & 0xff;
                    f(mt, 2 * b + tile, i, byte < m.threshold);
                }
            }
        });
    }
}

/// Dropout's verdicts on a thread's packed P of one key tile (`kept_p`): for 16-key block b, `words[b]`
/// are `qk_words`'s two words after `Carry::kept_bytes` (the top bit of each byte set iff kept), and
/// `odd_rows` says whether the rows' 16-row block is odd (then `words[b][0]` holds the odd keys). The
/// draws do not depend on the scores, so kernels compute them where an asynchronous product hides the
/// integer work (`fwd::ws`'s `kept_under_s`).
#[derive(Clone, Copy)]
pub(crate) struct KeptP {
    pub words: [[u32; 2]; 8],
    pub odd_rows: bool,
}

impl KeptP {
    /// Every score kept (no dropout).
    pub(crate) const ALL: KeptP = KeptP { words: [[!0; 2]; 8], odd_rows: false };
}

/// `KeptP` of the `KP` A fragments of a P V product on wgmma (`KP <= 8` 16-key blocks; `row0 = 16 a + g`,
/// `key0` = the tile's first key (a multiple of 16) + 2 t). Per call (16 scores) one
/// `Carry::kept_bytes` per word. Every lane of the warp must call this (shuffles).
#[inline(always)]
pub(crate) fn kept_p<const KP: usize>(m: &HeadMods, row0: i32, key0: i32) -> KeptP {
    const { assert!(KP <= 8) };
    let carry = Carry::of(m.threshold);
    let mut kept = KeptP { words: KeptP::ALL.words, odd_rows: (row0 >> 4) & 1 != 0 };
    qk_words(m, row0, key0, KP, #[inline(always)] |b, w| kept.words[b] = [carry.kept_bytes(w[0]), carry.kept_bytes(w[1])]);
    kept
}

/// Dropout on packed P (`pa[kk]` = rows g, g + 8 of n8 tiles 2 kk and 2 kk + 1, two 16-bit probabilities
/// per register, the even key's low): per register a `prmt` spreads two verdicts (byte `tile` or `tile +
/// 2` of the even and the odd keys' words) over its 16-bit halves and an AND zeroes the dropped ones.
#[inline(always)]
pub(crate) fn drop_p<const KP: usize>(kept: &KeptP, pa: &mut [[u32; 4]; KP]) {
    // Selectors with words[b][0] as the even keys' word; odd rows swap the two sources (bit 2 of each nibble).
    let swap = if kept.odd_rows { 0x4444 } else { 0 };
    let sel = [[0xCC88 ^ swap, 0xEEAA ^ swap], [0xDD99 ^ swap, 0xFFBB ^ swap]];
    for (kk, frag) in pa.iter_mut().enumerate() {
        let [k0, k1] = kept.words[kk];
        for tile in 0..2 {
            frag[2 * tile] &= prmt(k0, k1, sel[tile][0]);
            frag[2 * tile + 1] &= prmt(k0, k1, sel[tile][1]);
        }
    }
}

/// The bit of `keep_kq`'s word that decides element `i` of key tile `kt`, query tile `j` (of `QN`), a
/// constant once inlined: byte `i / 2 + 2 (j % 2)` (the call's byte), bit `7 - i % 2 - 2 ((u / 2) % 2) - 4 (u
/// / 4)` in it, u = kt QN + j (query parity, the 16-query block's place in its pair, the pair).
#[inline(always)]
pub(crate) const fn kq_bit<const QN: usize>(kt: usize, j: usize, i: usize) -> u32 {
    let u = kt * QN + j;
    (8 * (i / 2 + 2 * (j % 2)) + 7 - i % 2 - 2 * ((u / 2) % 2) - 4 * (u / 4)) as u32
}

/// Dropout's decisions for key-major fragments (as `alibi_kq`; `key0 = 16 a + g`, `row0 = 16 c + 2 t`;
/// `KT` key tiles of 16 x `QN` query tiles of 8, `KT QN <= 8`): element `i` of tile (kt, j) is kept iff
/// bit `kq_bit::<QN>(kt, j, i)` is set. Pairs of 16-query blocks are traded (`traded`); with one block
/// per key tile (`QN == 2`) each lane draws that block's call and uses half of it. Every lane of the warp
/// must call this (shuffles).
#[inline(always)]
pub(crate) fn keep_kq<const KT: usize, const QN: usize>(m: &HeadMods, row0: i32, key0: i32) -> u32 {
    const { assert!(KT * QN <= 8 && QN % 2 == 0 && (QN == 2 || QN % 4 == 0)) };
    let carry = Carry::of(m.threshold);
    let (p, gp) = ((key0 & 1) as u32, ((key0 & 7) >> 1) as u32);
    let (qb0, t) = ((row0 >> 4) as u32, ((row0 & 7) >> 1) as u32);
    let kb0 = (key0 >> 4) as u32;
    let mut keep = 0u32;
    for kt in 0..KT {
        let kb = kb0 + kt as u32;
        let x = 4 * kb + gp;
        // A block's two words as verdicts: the even queries' at bit 7 of each byte, the odd ones' at bit 6
        // (words[0] holds the queries of parity kb % 2); the bits below are junk.
        let bits = #[inline(always)] |w: [u32; 2]| {
            let (e, o) = if kb & 1 == 0 { (w[0], w[1]) } else { (w[1], w[0]) };
            let (e, o) = (carry.kept_bytes(e), carry.kept_bytes(o));
            (e & 0x8080_8080) | ((o >> 1) & !0x8080_8080)
        };
        if QN == 2 {
            // One block: this lane's own call, the words of its keys (parity p): (p ^ qb % 2) + {0, 2}.
            let w = m.words(x, 4 * qb0 + t);
            let own = half::<true>(w, (p ^ qb0) & 1 != 0);
            let b = bits(own);
            let shift = 2 * (kt % 2) + 4 * (kt / 2);
            keep |= (b >> shift) & (0xc0c0_c0c0 >> shift);
        } else {
            // This lane draws the block of each pair whose parity is its key parity.
            let second = (qb0 ^ p) & 1;
            for c in 0..QN / 4 {
                let (own, got) = traded::<true>(m.words(x, 4 * (qb0 + 2 * c as u32 + second) + t));
                let (own, got) = (bits(own), bits(got));
                let (first, other) = if second == 0 { (own, got) } else { (got, own) };
                let pair = (first & 0xc0c0_c0c0) | ((other >> 2) & !0xc0c0_c0c0);
                let shift = 4 * (kt * QN / 4 + c);
                keep |= (pair >> shift) & (0xf0f0_f0f0 >> shift);
            }
        }
    }
    keep
}
