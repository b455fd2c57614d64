//! One query tile of one (sequence, head): the mainloop over key tiles with the online softmax, and the
//! epilogue that normalizes the accumulator and forms the LSE. Empty rows end with sum 0: out 0, LSE -inf.

use super::mask::key_range;
use super::seqlen::SeqInfo;
use super::{load_rows, BLOCK_M, BLOCK_N};
use crate::problem::Problem;
use crate::tensor::CpuData;

/// The input storages and the element offset of this work item's q head and kv head.
pub(crate) struct Operands<'a> {
    pub q: &'a CpuData,
    pub k: &'a CpuData,
    pub v: &'a CpuData,
    pub q_head: usize,
    pub k_head: usize,
    pub v_head: usize,
}

/// Normalized f32 output rows (`rows * D`) and their LSE.
pub(crate) struct TileOut {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
}

pub(crate) fn attend(p: &Problem, x: &Operands<'_>, s: &SeqInfo, m_block: usize) -> TileOut {
    let d = p.head_dim;
    let (sq, sk) = (s.seqlen_q, s.seqlen_k);
    let i0 = m_block * BLOCK_M;
    let rows = (sq - i0).min(BLOCK_M);
    let range = |i: usize| key_range(i, sq, sk, p.window_left, p.window_right);

    let mut q = vec![0.0f32; rows * d];
    load_rows(x.q, s.q_base + i0 * p.q.row + x.q_head, p.q.row, rows, d, &mut q);
    let mut acc = vec![0.0f32; rows * d];
    let mut row_max = vec![f32::NEG_INFINITY; rows];
    let mut row_sum = vec![0.0f32; rows];

    let (lo, _) = range(i0);
    let (_, hi) = range(i0 + rows - 1);
    let mut k = vec![0.0f32; BLOCK_N * d];
    let mut v = vec![0.0f32; BLOCK_N * d];
    let mut scores = [0.0f32; BLOCK_N];
    let softcap_pre = if p.softcap > 0.0 { p.scale / p.softcap } else { 0.0 };
    for n_block in lo / BLOCK_N..hi.div_ceil(BLOCK_N) {
        let j0 = n_block * BLOCK_N;
        let cols = (sk - j0).min(BLOCK_N);
        load_rows(x.k, s.k_base + j0 * p.k.row + x.k_head, p.k.row, cols, d, &mut k);
        load_rows(x.v, s.v_base + j0 * p.v.row + x.v_head, p.v.row, cols, d, &mut v);
        for r in 0..rows {
            let (a, b) = range(i0 + r);
            let (a, b) = (a.max(j0) - j0, b.min(j0 + cols).saturating_sub(j0));
            if a >= b {
                // Nothing visible here: the row's state is untouched, so its result never depends on which
                // other rows share its tile.
                continue;
            }
            let q_row = &q[r * d..][..d];
            let s_row = &mut scores[a..b];
            for (sc, k_row) in s_row.iter_mut().zip(k[a * d..b * d].chunks_exact(d)) {
                let qk = dot(q_row, k_row);
                *sc = if p.softcap > 0.0 { p.softcap * (qk * softcap_pre).tanh() } else { qk * p.scale };
            }
            // Online softmax: rescale what was accumulated under the old max.
            let block_max = s_row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let new_max = row_max[r].max(block_max);
            let acc_row = &mut acc[r * d..][..d];
            if new_max != row_max[r] {
                let alpha = (row_max[r] - new_max).exp();
                row_sum[r] *= alpha;
                acc_row.iter_mut().for_each(|o| *o *= alpha);
                row_max[r] = new_max;
            }
            for (&sc, v_row) in s_row.iter().zip(v[a * d..b * d].chunks_exact(d)) {
                let pr = (sc - new_max).exp();
                row_sum[r] += pr;
                acc_row.iter_mut().zip(v_row).for_each(|(o, &x)| *o += pr * x);
            }
        }
    }

    let mut lse = vec![f32::NEG_INFINITY; rows];
    for r in 0..rows {
        if row_sum[r] > 0.0 {
            let inv = 1.0 / row_sum[r];
            acc[r * d..][..d].iter_mut().for_each(|o| *o *= inv);
            lse[r] = row_max[r] + row_sum[r].ln();
        }
    }
    TileOut { out: acc, lse }
}

/// q.k with eight independent partial sums, so it vectorizes; head dims are multiples of 32.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}
