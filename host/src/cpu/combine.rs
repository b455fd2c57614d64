//! Merging partial attention results over disjoint key sets: with weights w_i = exp(lse_i - max lse),
//! out = sum w_i out_i / sum w_i and lse = max + ln(sum w_i). Exact (the log-sum-exp of the union), in
//! f64 so the result is the merge rounded once. Partials that saw no key (lse -inf) weigh nothing; if
//! none saw a key the row is out 0, lse -inf.

use super::{host_slice, scatter, HostSlice};
use crate::error::Result;
use crate::problem::CombineProblem;
use crate::types::CombineViews;
use rayon::prelude::*;

/// Merges the partials `(lse[i], out_row(i))` of one row into `out`; returns the row's LSE.
pub(crate) fn merge<'a>(lse: &[f32], out_row: impl Fn(usize) -> &'a [f32], out: &mut [f32]) -> f32 {
    let max = lse.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        out.fill(0.0);
        return f32::NEG_INFINITY;
    }
    let weights: Vec<f64> = lse.iter().map(|&l| (f64::from(l) - f64::from(max)).exp()).collect();
    let sum: f64 = weights.iter().sum();
    let mut acc = vec![0.0f64; out.len()];
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            acc.iter_mut().zip(out_row(i)).for_each(|(a, &o)| *a += w * f64::from(o));
        }
    }
    out.iter_mut().zip(&acc).for_each(|(o, &a)| *o = (a / sum) as f32);
    (f64::from(max) + sum.ln()) as f32
}

/// The public combine on host memory, into the caller's out and lse.
///
/// # Safety
/// As `raw::combine` on `Target::Cpu`.
pub(crate) unsafe fn combine_into(cp: &CombineProblem, t: &CombineViews<'_>) -> Result<()> {
    let po = unsafe { host_slice("partial_out", &t.partial_out)? };
    let HostSlice::F32(pl) = (unsafe { host_slice("partial_lse", &t.partial_lse)? }) else { unreachable!("validated partial_lse is f32") };
    let (n, d, heads, seqlen) = (cp.splits, cp.head_dim, cp.heads, cp.seqlen);
    let [so, bo, ro, ho] = cp.partial_out;
    let [sl, bl, hl, rl] = cp.partial_lse;
    // One work item per (batch, row): its heads' out rows are contiguous in the result.
    let rows: Vec<(Vec<f32>, Vec<f32>)> = (0..cp.batch * seqlen)
        .into_par_iter()
        .map(|item| {
            let (b, r) = (item / seqlen, item % seqlen);
            let mut out = vec![0.0f32; heads * d];
            let mut parts = vec![0.0f32; n * d];
            let mut lse_parts = vec![0.0f32; n];
            let lse: Vec<f32> = (0..heads)
                .map(|h| {
                    for i in 0..n {
                        lse_parts[i] = pl[i * sl + b * bl + h * hl + r * rl];
                        if d > 0 {
                            super::load_rows(po, i * so + b * bo + r * ro + h * ho, 0, 1, d, &mut parts[i * d..][..d]);
                        }
                    }
                    merge(&lse_parts, |i| &parts[i * d..][..d], &mut out[h * d..][..d])
                })
                .collect();
            (out, lse)
        })
        .collect();
    let mut out = Vec::with_capacity(cp.batch * seqlen * heads * d);
    let mut lse = vec![0.0f32; cp.batch * heads * seqlen];
    for (item, (o, l)) in rows.iter().enumerate() {
        out.extend_from_slice(o);
        let (b, r) = (item / seqlen, item % seqlen);
        for (h, &x) in l.iter().enumerate() {
            lse[(b * heads + h) * seqlen + r] = x;
        }
    }
    unsafe {
        scatter(&t.out, &out);
        scatter(&t.lse, &lse);
    }
    Ok(())
}
