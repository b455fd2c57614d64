//! One query tile of one (sequence, head): the mainloop over key tiles with the online softmax, and the
//! epilogue that normalizes the accumulator and forms the LSE. Empty rows end with sum 0: out 0, LSE -inf.
//! A split-KV work item walks only its range of key tiles; its result is merged with the other splits'.

use super::kv::KeyRows;
use super::mask::key_range;
use super::score::{HeadMods, Score};
use super::seqlen::SeqInfo;
use super::{load_rows, HostSlice, BLOCK_M, BLOCK_N};
use crate::problem::Problem;

/// The input storages and the element offset of this work item's q head and kv head.
pub(crate) struct Operands<'a> {
    pub q: HostSlice<'a>,
    pub k: HostSlice<'a>,
    pub v: HostSlice<'a>,
    /// Where the rows of k and v are.
    pub keys: &'a KeyRows<'a>,
    pub q_head: usize,
    pub k_head: usize,
    pub v_head: usize,
}

/// Normalized f32 output rows (`rows * D`) and their LSE.
pub(crate) struct TileOut {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
}

/// Query tile `m_block` of sequence `s` over the key tiles of `n_blocks` that its rows can see, with the
/// head's ALiBi and dropout (`m`): dropped probabilities count in the row sum (the LSE is that of every
/// visible score) but not in the accumulator, and kept ones enter it times 1 / (1 - p).
pub(crate) fn attend(p: &Problem, x: &Operands<'_>, s: &SeqInfo, m: &HeadMods, m_block: usize, n_blocks: std::ops::Range<usize>) -> TileOut {
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
    let (mut keep, mut factor) = ([false; BLOCK_N], [1.0f32; BLOCK_N]);
    let score = Score::new(p, m, sq, sk);
    for n_block in (lo / BLOCK_N).max(n_blocks.start)..hi.div_ceil(BLOCK_N).min(n_blocks.end) {
        let j0 = n_block * BLOCK_N;
        let cols = (sk - j0).min(BLOCK_N);
        x.keys.load(x.k, &p.k, s, s.k_base, x.k_head, j0, cols, d, &mut k);
        x.keys.load(x.v, &p.v, s, s.v_base, x.v_head, j0, cols, d, &mut v);
        for r in 0..rows {
            let (a, b) = range(i0 + r);
            let (a, b) = (a.max(j0) - j0, b.min(j0 + cols).saturating_sub(j0));
            if a >= b {
                // Nothing visible here: the row's state is untouched, so its result never depends on which
                // other rows share its tile.
                continue;
            }
            let (i, q_row) = (i0 + r, &q[r * d..][..d]);
            let s_row = &mut scores[a..b];
            let k_rows = &k[a * d..b * d];
            for (t, (sc4, k4)) in s_row.chunks_mut(4).zip(k_rows.chunks(4 * d)).enumerate() {
                let qk = dot4(q_row, k4, d);
                for (u, (sc, &qk)) in sc4.iter_mut().zip(&qk).enumerate() {
                    *sc = score.score(qk, i, j0 + a + 4 * t + u);
                }
            }
            let dropout = m.dropout.is_some();
            if dropout {
                m.dropout_row(i, j0 + a, &mut keep, &mut factor[a..b]);
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
            for ((sc4, f4), v4) in s_row.chunks(4).zip(factor[a..b].chunks(4)).zip(v[a * d..b * d].chunks(4 * d)) {
                let mut pr = [0.0f32; 4];
                for ((pr, &sc), &f) in pr.iter_mut().zip(sc4).zip(f4) {
                    *pr = (sc - new_max).exp();
                    row_sum[r] += *pr;
                    if dropout {
                        *pr *= f;
                    }
                }
                if v4.len() == 4 * d {
                    // Same order as one key at a time; four keys per pass just saves loads and stores of acc.
                    let (v0, rest) = v4.split_at(d);
                    let (v1, rest) = rest.split_at(d);
                    let (v2, v3) = rest.split_at(d);
                    for ((o, (&x0, &x1)), (&x2, &x3)) in acc_row.iter_mut().zip(v0.iter().zip(v1)).zip(v2.iter().zip(v3)) {
                        *o = (((*o + pr[0] * x0) + pr[1] * x1) + pr[2] * x2) + pr[3] * x3;
                    }
                } else {
                    for (&pr, v_row) in pr.iter().zip(v4.chunks_exact(d)) {
                        acc_row.iter_mut().zip(v_row).for_each(|(o, &x)| *o += pr * x);
                    }
                }
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

/// The probabilities of query tile `m_block` of sequence `s` (`s_dmask` rows, `rows * seqlen_k`):
/// P = exp(s - lse) for the keys each row sees, negated where dropout drops them, +0 elsewhere; `lse`
/// holds the tile's rows' forward LSE. The scores are the forward's bit for bit.
pub(crate) fn probs(p: &Problem, x: &Operands<'_>, s: &SeqInfo, m: &HeadMods, m_block: usize, lse: &[f32]) -> Vec<f32> {
    let d = p.head_dim;
    let (sq, sk) = (s.seqlen_q, s.seqlen_k);
    let i0 = m_block * BLOCK_M;
    let rows = (sq - i0).min(BLOCK_M);
    let range = |i: usize| key_range(i, sq, sk, p.window_left, p.window_right);
    let mut q = vec![0.0f32; rows * d];
    load_rows(x.q, s.q_base + i0 * p.q.row + x.q_head, p.q.row, rows, d, &mut q);
    let mut probs = vec![0.0f32; rows * sk];
    let mut k = vec![0.0f32; BLOCK_N * d];
    let (mut keep, mut factor) = ([true; BLOCK_N], [1.0f32; BLOCK_N]);
    let score = Score::new(p, m, sq, sk);
    let (lo, _) = range(i0);
    let (_, hi) = range(i0 + rows - 1);
    for n_block in lo / BLOCK_N..hi.div_ceil(BLOCK_N) {
        let j0 = n_block * BLOCK_N;
        let cols = (sk - j0).min(BLOCK_N);
        x.keys.load(x.k, &p.k, s, s.k_base, x.k_head, j0, cols, d, &mut k);
        for r in 0..rows {
            let (a, b) = range(i0 + r);
            let (a, b) = (a.max(j0) - j0, b.min(j0 + cols).saturating_sub(j0));
            if a >= b {
                continue;
            }
            let i = i0 + r;
            if m.dropout.is_some() {
                m.dropout_row(i, j0 + a, &mut keep[a..b], &mut factor[a..b]);
            }
            let out = &mut probs[r * sk + j0..][..cols];
            for (t, k4) in k[a * d..b * d].chunks(4 * d).enumerate() {
                for (u, &qk) in dot4(&q[r * d..][..d], k4, d).iter().enumerate().take(k4.len() / d) {
                    let c = a + 4 * t + u;
                    let pr = (score.score(qk, i, j0 + c) - lse[r]).exp();
                    out[c] = if keep[c] { pr } else { -pr };
                }
            }
        }
    }
    probs
}

/// q.k for up to four keys (`k4` holds them, `d` apart), each with eight independent partial sums so it
/// vectorizes; head dims are multiples of 32. A key's result does not depend on its neighbours.
#[inline(always)]
fn dot4(q: &[f32], k4: &[f32], d: usize) -> [f32; 4] {
    let n = k4.len() / d;
    let mut acc = [[0.0f32; 8]; 4];
    if n == 4 {
        let (k0, rest) = k4.split_at(d);
        let (k1, rest) = rest.split_at(d);
        let (k2, k3) = rest.split_at(d);
        fn chunks(x: &[f32]) -> std::slice::Iter<'_, [f32; 8]> {
            x.as_chunks::<8>().0.iter()
        }
        let keys = chunks(k0).zip(chunks(k1)).zip(chunks(k2).zip(chunks(k3)));
        for (qc, ((c0, c1), (c2, c3))) in chunks(q).zip(keys) {
            for l in 0..8 {
                acc[0][l] += qc[l] * c0[l];
                acc[1][l] += qc[l] * c1[l];
                acc[2][l] += qc[l] * c2[l];
                acc[3][l] += qc[l] * c3[l];
            }
        }
    } else {
        for (t, k_row) in k4.chunks_exact(d).enumerate() {
            for (x, y) in q.chunks_exact(8).zip(k_row.chunks_exact(8)) {
                for l in 0..8 {
                    acc[t][l] += x[l] * y[l];
                }
            }
        }
    }
    acc.map(|a| ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])))
}
