//! The score of query i and key j, and what happens to its probability, in one place for the forward,
//! the backward and the probabilities (`s_dmask`), so all three agree bit for bit:
//!   s = softcap(scale * q.k) - slope * |i + Sk - Sq - j|   (ALiBi's bias after scale and softcap)
//!   P = exp(s - lse), times 1 / (1 - p) where dropout keeps it and 0 where it drops it.

use crate::dropout::DropoutParams;
use crate::error::{Error, Result};
use crate::problem::Problem;
use crate::types::View;

/// The call's ALiBi slopes (host copies, `[B, Hq]` row-major) and dropout.
pub(crate) struct Mods {
    slopes: Option<Vec<f32>>,
    dropout: Option<DropoutParams>,
    hq: usize,
}

impl Mods {
    /// Reads the slopes `p.alibi` describes from `slopes` and checks that they are finite.
    ///
    /// # Safety
    /// `slopes` must be valid host memory (its layout already validated into `p.alibi`).
    pub(crate) unsafe fn read(p: &Problem, slopes: Option<&View<'_>>) -> Result<Mods> {
        let slopes = match (p.alibi, slopes) {
            (Some(a), Some(t)) => {
                let mut v = Vec::with_capacity(p.batch * p.hq);
                for b in 0..p.batch {
                    for h in 0..p.hq {
                        let at = t.addr as usize + (b * a.batch_stride + h * a.head_stride) * 4;
                        // Safety: the validated view covers every (b, h) element.
                        let x = unsafe { *(at as *const f32) };
                        if !x.is_finite() {
                            let at = if a.batch_stride > 0 { format!("[{b}, {h}]") } else { format!("[{h}]") };
                            return Err(Error::Value { arg: "alibi_slopes", msg: format!("entry {at} is {x}: slopes must be finite") });
                        }
                        v.push(x);
                    }
                }
                Some(v)
            }
            _ => None,
        };
        Ok(Mods { slopes, dropout: p.dropout, hq: p.hq })
    }

    /// The call's dropout.
    pub(crate) fn dropout(&self) -> Option<DropoutParams> {
        self.dropout
    }

    /// The modifiers of sequence b, query head h.
    pub(crate) fn head(&self, b: usize, h: usize) -> HeadMods {
        HeadMods { slope: self.slopes.as_ref().map(|s| s[b * self.hq + h]), dropout: self.dropout, bh: (b * self.hq + h) as u64 }
    }
}

/// The modifiers of one (sequence, query head).
#[derive(Clone, Copy, Debug)]
pub(crate) struct HeadMods {
    pub slope: Option<f32>,
    pub dropout: Option<DropoutParams>,
    /// b * Hq + h: the head's Philox subsequence before the offset.
    pub bh: u64,
}

impl HeadMods {
    /// The factor of each probability of query i against keys j0.. (`factor.len()` of them): dropout's
    /// 1 / (1 - p) where kept, 0 where dropped; all 1 without dropout.
    pub(crate) fn dropout_row(&self, i: usize, j0: usize, keep: &mut [bool], factor: &mut [f32]) {
        match &self.dropout {
            None => factor.fill(1.0),
            Some(d) => {
                let keep = &mut keep[..factor.len()];
                d.keep_row(self.bh, i as u32, j0 as u32, keep);
                factor.iter_mut().zip(keep.iter()).for_each(|(f, &k)| *f = if k { d.scale } else { 0.0 });
            }
        }
    }
}

/// The score arithmetic of one (sequence, head) of a (seqlen_q, seqlen_k) sequence.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Score {
    scale: f32,
    softcap: f32,
    /// scale / softcap, computed once.
    softcap_pre: f32,
    slope: Option<f32>,
    /// seqlen_k - seqlen_q: query i lines up with key i + shift.
    shift: i64,
}

impl Score {
    pub(crate) fn new(p: &Problem, m: &HeadMods, seqlen_q: usize, seqlen_k: usize) -> Score {
        let softcap_pre = p.softcap_pre();
        Score { scale: p.scale, softcap: p.softcap, softcap_pre, slope: m.slope, shift: seqlen_k as i64 - seqlen_q as i64 }
    }

    /// `apply`, and the scores' derivatives with respect to x = scale q.k into `ds_dx` (s = c tanh(x / c):
    /// 1 - tanh^2 = sech^2; ALiBi's bias is constant in x). sech^2(y) = 4 e / (1 + e)^2 with e = exp(-2 |y|),
    /// to full relative precision: `1 - t * t` cancels where tanh saturates (|y| of a few units up), and there
    /// dS, dq and dk are made of these small derivatives. The scores are `apply`'s, bit for bit.
    #[inline(always)]
    pub(crate) fn apply_grad(&self, s: &mut [f32], ds_dx: &mut [f32], i: usize, j0: usize) {
        if self.softcap > 0.0 {
            for (&x, g) in s.iter().zip(ds_dx.iter_mut()) {
                let e = (-2.0 * (x * self.softcap_pre).abs()).exp();
                *g = 4.0 * e / ((1.0 + e) * (1.0 + e));
            }
        } else {
            ds_dx.fill(1.0);
        }
        self.apply(s, i, j0);
    }

    /// `score` of query i against keys j0.. in place: `s[t]` holds q.k of key j0 + t on entry (the
    /// same operations per element, the branches out of the loops).
    #[inline(always)]
    pub(crate) fn apply(&self, s: &mut [f32], i: usize, j0: usize) {
        if self.softcap > 0.0 {
            s.iter_mut().for_each(|x| *x = self.softcap * (*x * self.softcap_pre).tanh());
        } else {
            s.iter_mut().for_each(|x| *x *= self.scale);
        }
        if let Some(slope) = self.slope {
            for (t, x) in s.iter_mut().enumerate() {
                *x -= slope * (i as i64 + self.shift - (j0 + t) as i64).unsigned_abs() as f32;
            }
        }
    }
}
