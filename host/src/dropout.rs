//! Dropout: the keep-mask (defined exactly in [`mask`], the same source file the kernels compile) and
//! the validated parameters of a call.

#[path = "shared/dropout.rs"]
pub mod mask;
pub use mask::{counter, draw, keep_threshold, philox4x32_10};

/// A validated dropout (0 < p < 1): everything a target needs to draw and apply the mask.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutParams {
    /// The probability of dropping a score.
    pub p: f32,
    pub seed: u64,
    pub offset: u64,
    /// Keep iff the 8-bit draw is below this (`keep_threshold(p)`).
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
        mask::key(self.seed)
    }

    /// Whether score (i, j) of head `bh = b * Hq + h` is kept.
    #[inline]
    pub fn keep(&self, bh: u64, i: u32, j: u32) -> bool {
        let words = philox4x32_10(counter(self.offset.wrapping_add(bh), i, j), self.key());
        draw(&words, i, j) < self.threshold
    }

    /// The keep decisions of scores (i, j0), (i, j0 + 1), .. of head `bh` into `keep` (the four Philox
    /// calls of a 16-key block drawn once for its keys).
    pub fn keep_row(&self, bh: u64, i: u32, j0: u32, keep: &mut [bool]) {
        let (sub, key) = (self.offset.wrapping_add(bh), self.key());
        let mut block: Option<(u32, [[u32; 4]; 4])> = None;
        for (at, k) in keep.iter_mut().enumerate() {
            let j = j0.wrapping_add(at as u32);
            let words = match block {
                Some((bj, w)) if bj == j / 16 => w,
                _ => {
                    // The calls of keys j & !15 + 2 c, c = 0..4 (j % 8 / 2 = c).
                    let base = j & !15;
                    let w = core::array::from_fn(|c| philox4x32_10(counter(sub, i, base + 2 * c as u32), key));
                    block = Some((j / 16, w));
                    w
                }
            };
            *k = draw(&words[((j % 8) / 2) as usize], i, j) < self.threshold;
        }
    }
}
