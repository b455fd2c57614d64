//! The CPU backward, flash-attention 2's algorithm: P_ij = exp(s_ij - lse_i) is recomputed from the
//! forward's LSE (s with ALiBi's bias), Z_ij the dropout factor regenerated from the same Philox counters
//! (1 / (1 - p) kept, 0 dropped; 1 without dropout), D_i = dout_i . out_i,
//! dS_ij = P_ij (Z_ij dout_i . v_j - D_i), then dV = (P Z)^T dout, dK = scale dX^T Q and dQ = scale dX K,
//! where dX = dS * ds/dx carries the softcap's tanh (1 - tanh^2); the bias is constant in q and k.
//!
//! Two passes, each writing disjoint outputs, so no sum is ever split between threads and no float
//! atomics are needed:
//!   dk/dv: one work item per (sequence, kv head, key tile) walks its group's q heads and the queries
//!          that see the tile;
//!   dq:    one work item per (sequence, q head, query tile) walks the key tiles its rows see.
//! Every gradient element is one sequential f32 sum in a fixed order (q heads of the group, then queries
//! or keys ascending), so the result is bitwise the same whatever the thread count or schedule:
//! `deterministic` holds trivially. Each row's and key's arithmetic depends only on its own sequence, so
//! a packed batch gives bitwise the result of one call per sequence. The scores are the forward's and
//! s_dmask's bit for bit (`tile::KeysT`, `Score`, P = exp(s - lse) as s_dmask's); both passes are compiled per
//! head dim with AVX2 / AVX-512 variants (`simd`), the same bits in each.

use super::mask::key_range;
use super::math::exp;
use super::score::{HeadMods, Mods, Score};
use super::simd::{by_head_dim, multiversion};
use super::tile::{weighted_rows, KeysT};
use super::seqlen::{self, SeqInfo};
use super::{load_rows, HostSlice, BLOCK_M, BLOCK_N};
use crate::error::Result;
use crate::problem::{BwdProblem, Problem, Strides};
use rayon::prelude::*;

/// The storages and per-row values every work item reads.
struct Inputs<'a> {
    q: HostSlice<'a>,
    k: HostSlice<'a>,
    v: HostSlice<'a>,
    dout: HostSlice<'a>,
    /// Indexed like the LSE: `SeqInfo::lse_base + h * lse_head_stride + i`.
    lse: &'a [f32],
    delta: &'a [f32],
    /// ALiBi and dropout.
    mods: &'a Mods,
}

/// One sequence as the backward sees it: its forward `SeqInfo`, where its dout rows start, and the
/// row of dk/dv that holds its key 0.
struct Seq {
    s: SeqInfo,
    dout_base: usize,
    key_row0: usize,
}

/// Backward pass on host memory described by a validated `BwdProblem`: dq, dk, dv in f32, contiguous
/// in q's and k's shapes.
#[allow(clippy::too_many_arguments)]
pub(crate) fn bwd(bp: &BwdProblem, dod: HostSlice<'_>, qd: HostSlice<'_>, kd: HostSlice<'_>, vd: HostSlice<'_>, od: HostSlice<'_>, lse: &[f32], mods: &Mods) -> Result<[Vec<f32>; 3]> {
    let p = &bp.fwd;
    let (infos, lse_head_stride) = seqlen::sequences(p)?;
    let seqs: Vec<Seq> = infos
        .iter()
        .enumerate()
        .map(|(b, &s)| Seq { s, dout_base: row_base(p, &bp.dout, b), key_row0: key_row0(p, b) })
        .collect();
    let out_base: Vec<usize> = (0..seqs.len()).map(|b| row_base(p, &bp.out, b)).collect();
    let (d, group) = (p.head_dim, p.hq / p.hk);

    // D_i = dout_i . out_i, laid out like the LSE (rows of no sequence are never read).
    let heads: Vec<(usize, usize)> = (0..seqs.len()).flat_map(|b| (0..p.hq).map(move |h| (b, h))).collect();
    let rows_delta: Vec<Vec<f32>> = heads
        .par_iter()
        .map(|&(b, h)| {
            let sq = seqs[b].s.seqlen_q;
            let (mut o, mut g) = (vec![0.0f32; sq * d], vec![0.0f32; sq * d]);
            load_rows(od, out_base[b] + h * bp.out.head, bp.out.row, sq, d, &mut o);
            load_rows(dod, seqs[b].dout_base + h * bp.dout.head, bp.dout.row, sq, d, &mut g);
            o.chunks_exact(d).zip(g.chunks_exact(d)).map(|(o, g)| dot(o, g)).collect()
        })
        .collect();
    let mut delta = vec![0.0f32; lse.len()];
    for (&(b, h), r) in heads.iter().zip(&rows_delta) {
        let at = seqs[b].s.lse_base + h * lse_head_stride;
        delta[at..at + r.len()].copy_from_slice(r);
    }
    let x = Inputs { q: qd, k: kd, v: vd, dout: dod, lse, delta: &delta, mods };

    // dk, dv: per (sequence, kv head, key tile). Keys of no sequence stay 0.
    let kv_items: Vec<(usize, usize, usize)> =
        infos.iter().enumerate().flat_map(|(b, s)| (0..p.hk).flat_map(move |hk| (0..s.seqlen_k.div_ceil(BLOCK_N)).map(move |n| (b, hk, n)))).collect();
    let kv_tiles: Vec<(Vec<f32>, Vec<f32>)> = kv_items.par_iter().map(|&(b, hk, n)| dkdv_tile(p, bp, &x, &seqs[b], b, lse_head_stride, hk, group, n)).collect();
    let mut dk = vec![0.0f32; p.total_k * p.hk * d];
    let mut dv = vec![0.0f32; p.total_k * p.hk * d];
    for (&(b, hk, n_block), (tk, tv)) in kv_items.iter().zip(&kv_tiles) {
        for (c, (k_row, v_row)) in tk.chunks_exact(d).zip(tv.chunks_exact(d)).enumerate() {
            let at = ((seqs[b].key_row0 + n_block * BLOCK_N + c) * p.hk + hk) * d;
            dk[at..at + d].copy_from_slice(k_row);
            dv[at..at + d].copy_from_slice(v_row);
        }
    }

    // dq: per (sequence, q head, query tile). Rows of no sequence stay 0.
    let q_items: Vec<(usize, usize, usize)> =
        infos.iter().enumerate().flat_map(|(b, s)| (0..p.hq).flat_map(move |h| (0..s.seqlen_q.div_ceil(BLOCK_M)).map(move |m| (b, h, m)))).collect();
    let q_tiles: Vec<Vec<f32>> = q_items.par_iter().map(|&(b, h, m)| dq_tile(p, bp, &x, &seqs[b], b, lse_head_stride, h, group, m)).collect();
    let mut dq = vec![0.0f32; p.total_q * p.hq * d];
    for (&(b, h, m_block), t) in q_items.iter().zip(&q_tiles) {
        for (r, row) in t.chunks_exact(d).enumerate() {
            let at = ((seqs[b].s.out_row0 + m_block * BLOCK_M + r) * p.hq + h) * d;
            dq[at..at + d].copy_from_slice(row);
        }
    }

    Ok([dq, dk, dv])
}

/// dk and dv (`cols * D` each) of key tile `n_block` of kv head `hk`.
#[allow(clippy::too_many_arguments)]
fn dkdv_tile(p: &Problem, bp: &BwdProblem, x: &Inputs<'_>, seq: &Seq, bidb: usize, lse_head_stride: usize, hk: usize, group: usize, n_block: usize) -> (Vec<f32>, Vec<f32>) {
    by_head_dim!(p.head_dim, dkdv_dim(p, bp, x, seq, bidb, lse_head_stride, hk, group, n_block))
}

multiversion!(fn dkdv_dim<const D: usize>(p: &Problem, bp: &BwdProblem, x: &Inputs<'_>, seq: &Seq, bidb: usize, lse_head_stride: usize, hk: usize, group: usize, n_block: usize) -> (Vec<f32>, Vec<f32>) = dkdv_in);

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn dkdv_in<const D: usize>(p: &Problem, bp: &BwdProblem, x: &Inputs<'_>, seq: &Seq, bidb: usize, lse_head_stride: usize, hk: usize, group: usize, n_block: usize) -> (Vec<f32>, Vec<f32>) {
    let (s, d) = (&seq.s, if D > 0 { D } else { p.head_dim });
    let (sq, sk) = (s.seqlen_q, s.seqlen_k);
    let range = |i: usize| key_range(i, sq, sk, p.window_left, p.window_right);
    let j0 = n_block * BLOCK_N;
    let cols = (sk - j0).min(BLOCK_N);
    let (mut k, mut v) = (vec![0.0f32; cols * d], vec![0.0f32; cols * d]);
    load_rows(x.k, s.k_base + j0 * p.k.row + hk * p.k.head, p.k.row, cols, d, &mut k);
    load_rows(x.v, s.v_base + j0 * p.v.row + hk * p.v.head, p.v.row, cols, d, &mut v);
    let (mut kt, mut vt) = (KeysT::new(d), KeysT::new(d));
    kt.set(&k, cols);
    vt.set(&v, cols);
    let (mut dk, mut dv) = (vec![0.0f32; cols * d], vec![0.0f32; cols * d]);
    let (mut q, mut g) = (vec![0.0f32; BLOCK_M * d], vec![0.0f32; BLOCK_M * d]);
    // Per row of the query tile: P Z and dX against the tile's keys (0 where the row does not see a key).
    let (mut pz, mut dx) = (vec![[0.0f32; BLOCK_N]; BLOCK_M], vec![[0.0f32; BLOCK_N]; BLOCK_M]);
    let mut seen = [(0usize, 0usize); BLOCK_M];
    let mut t = Tile::new();

    for h in hk * group..(hk + 1) * group {
        let mods = x.mods.head(bidb, h);
        let score = Score::new(p, &mods, sq, sk);
        for m_block in 0..sq.div_ceil(BLOCK_M) {
            let i0 = m_block * BLOCK_M;
            let rows = (sq - i0).min(BLOCK_M);
            // Both ends of a row's key range grow with the row, so the tile's rows see keys lo..hi.
            let (lo, _) = range(i0);
            let (_, hi) = range(i0 + rows - 1);
            if hi <= j0 || lo >= j0 + cols {
                continue;
            }
            load_rows(x.q, s.q_base + i0 * p.q.row + h * p.q.head, p.q.row, rows, d, &mut q);
            load_rows(x.dout, seq.dout_base + i0 * bp.dout.row + h * bp.dout.head, bp.dout.row, rows, d, &mut g);
            for r in 0..rows {
                let at = s.lse_base + h * lse_head_stride + i0 + r;
                let (a, b) = range(i0 + r);
                let (a, b) = (a.max(j0) - j0, b.min(j0 + cols).saturating_sub(j0));
                seen[r] = if a >= b || x.lse[at] == f32::NEG_INFINITY { (0, 0) } else { (a, b) };
                if seen[r].0 < seen[r].1 {
                    t.grads::<D>(&score, &mods, &kt, &vt, &q[r * d..][..d], &g[r * d..][..d], x.lse[at], x.delta[at], i0 + r, j0, (a, b));
                    pz[r][a..b].copy_from_slice(&t.pz[a..b]);
                    dx[r][a..b].copy_from_slice(&t.dx[a..b]);
                }
            }
            // Each key's sums over the tile's rows, in row order.
            for c in 0..cols {
                rows_into::<D>(&mut dv[c * d..][..d], &pz[..rows], &seen[..rows], c, &g, d);
                rows_into::<D>(&mut dk[c * d..][..d], &dx[..rows], &seen[..rows], c, &q, d);
            }
        }
    }
    dk.iter_mut().for_each(|x| *x *= p.scale);
    (dk, dv)
}

/// `acc += w[r][c] * rows_r` over the rows r that see key c, in row order (rows `d` wide).
#[inline(always)]
fn rows_into<const D: usize>(acc: &mut [f32], w: &[[f32; BLOCK_N]], seen: &[(usize, usize)], c: usize, rows: &[f32], d: usize) {
    let mut col = [0.0f32; BLOCK_M];
    let mut n = 0;
    let mut at = [0usize; BLOCK_M];
    for (r, (w, &(a, b))) in w.iter().zip(seen).enumerate() {
        if a <= c && c < b {
            col[n] = w[c];
            at[n] = r;
            n += 1;
        }
    }
    if n == 0 {
        return;
    }
    weighted_rows::<D>(acc, &col[..n], |i| &rows[at[i] * d..][..d]);
}

/// dq (`rows * D`) of query tile `m_block` of q head `h`.
#[allow(clippy::too_many_arguments)]
fn dq_tile(p: &Problem, bp: &BwdProblem, x: &Inputs<'_>, seq: &Seq, bidb: usize, lse_head_stride: usize, h: usize, group: usize, m_block: usize) -> Vec<f32> {
    by_head_dim!(p.head_dim, dq_dim(p, bp, x, seq, bidb, lse_head_stride, h, group, m_block))
}

multiversion!(fn dq_dim<const D: usize>(p: &Problem, bp: &BwdProblem, x: &Inputs<'_>, seq: &Seq, bidb: usize, lse_head_stride: usize, h: usize, group: usize, m_block: usize) -> Vec<f32> = dq_in);

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn dq_in<const D: usize>(p: &Problem, bp: &BwdProblem, x: &Inputs<'_>, seq: &Seq, bidb: usize, lse_head_stride: usize, h: usize, group: usize, m_block: usize) -> Vec<f32> {
    let (s, d) = (&seq.s, if D > 0 { D } else { p.head_dim });
    let (sq, sk) = (s.seqlen_q, s.seqlen_k);
    let range = |i: usize| key_range(i, sq, sk, p.window_left, p.window_right);
    let i0 = m_block * BLOCK_M;
    let rows = (sq - i0).min(BLOCK_M);
    let hk = h / group;
    let (mut q, mut g) = (vec![0.0f32; rows * d], vec![0.0f32; rows * d]);
    load_rows(x.q, s.q_base + i0 * p.q.row + h * p.q.head, p.q.row, rows, d, &mut q);
    load_rows(x.dout, seq.dout_base + i0 * bp.dout.row + h * bp.dout.head, bp.dout.row, rows, d, &mut g);
    let at0 = s.lse_base + h * lse_head_stride + i0;
    let (lse, delta) = (&x.lse[at0..at0 + rows], &x.delta[at0..at0 + rows]);
    let mut dq = vec![0.0f32; rows * d];
    let (mut k, mut v) = (vec![0.0f32; BLOCK_N * d], vec![0.0f32; BLOCK_N * d]);
    let (mut kt, mut vt) = (KeysT::new(d), KeysT::new(d));
    let mods = x.mods.head(bidb, h);
    let score = Score::new(p, &mods, sq, sk);
    let mut t = Tile::new();

    let (lo, _) = range(i0);
    let (_, hi) = range(i0 + rows - 1);
    for n_block in lo / BLOCK_N..hi.div_ceil(BLOCK_N) {
        let j0 = n_block * BLOCK_N;
        let cols = (sk - j0).min(BLOCK_N);
        load_rows(x.k, s.k_base + j0 * p.k.row + hk * p.k.head, p.k.row, cols, d, &mut k);
        load_rows(x.v, s.v_base + j0 * p.v.row + hk * p.v.head, p.v.row, cols, d, &mut v);
        kt.set(&k, cols);
        vt.set(&v, cols);
        for r in 0..rows {
            let (a, b) = range(i0 + r);
            let (a, b) = (a.max(j0) - j0, b.min(j0 + cols).saturating_sub(j0));
            if a >= b || lse[r] == f32::NEG_INFINITY {
                continue;
            }
            t.grads::<D>(&score, &mods, &kt, &vt, &q[r * d..][..d], &g[r * d..][..d], lse[r], delta[r], i0 + r, j0, (a, b));
            // dq_r += dX_rj k_j, key after key.
            weighted_rows::<D>(&mut dq[r * d..][..d], &t.dx[a..b], |i| &k[(a + i) * d..][..d]);
        }
    }
    dq.iter_mut().for_each(|x| *x *= p.scale);
    dq
}

/// One query row's (P_j Z_j, dX_j) against a key tile, both passes' shared arithmetic, so they agree on every
/// P and dX bit for bit: Z_j = dropout's 1 / (1 - p) where kept, 0 where dropped (1 without dropout), and dX
/// the gradient with respect to q.k without the factor `scale`: dX = P (Z dout.v - D) ds/dx, since
/// out = sum_j P_j Z_j v_j makes dL/dP_j = Z_j dout.v_j and sum_j P_j Z_j dout.v_j = dout.out = D. The
/// scores are the forward's (`KeysT`, `Score`), P = exp(s - lse) as s_dmask's.
struct Tile {
    s: [f32; BLOCK_N],
    dp: [f32; BLOCK_N],
    ds_dx: [f32; BLOCK_N],
    keep: [bool; BLOCK_N],
    factor: [f32; BLOCK_N],
    pz: [f32; BLOCK_N],
    dx: [f32; BLOCK_N],
}

impl Tile {
    fn new() -> Tile {
        Tile { s: [0.0; BLOCK_N], dp: [0.0; BLOCK_N], ds_dx: [0.0; BLOCK_N], keep: [false; BLOCK_N], factor: [1.0; BLOCK_N], pz: [0.0; BLOCK_N], dx: [0.0; BLOCK_N] }
    }

    /// `pz[a..b]`, `dx[a..b]` of query i (`q`, `dout` its rows) against keys j0 + a..j0 + b.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn grads<const D: usize>(&mut self, score: &Score, mods: &HeadMods, kt: &KeysT, vt: &KeysT, q: &[f32], dout: &[f32], lse: f32, delta: f32, i: usize, j0: usize, (a, b): (usize, usize)) {
        kt.scores::<D>(q, &mut self.s);
        vt.scores::<D>(dout, &mut self.dp);
        score.apply_grad(&mut self.s[a..b], &mut self.ds_dx[a..b], i, j0 + a);
        mods.dropout_row(i, j0 + a, &mut self.keep, &mut self.factor[a..b]);
        for j in a..b {
            let pr = exp(self.s[j] - lse);
            self.pz[j] = pr * self.factor[j];
            self.dx[j] = pr * (self.dp[j] * self.factor[j] - delta) * self.ds_dx[j];
        }
    }
}

/// Dot product with eight independent partial sums so it vectorizes; head dims are multiples of 32.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (x, y) in a.as_chunks::<8>().0.iter().zip(b.as_chunks::<8>().0) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Storage index of row 0, head 0 of sequence `b` in an operand with strides `st` shaped like q.
fn row_base(p: &Problem, st: &Strides, b: usize) -> usize {
    match &p.seqlens {
        Some(s) if p.varlen => s.cu_seqlens_q[b] as usize * st.row,
        _ => b * st.batch,
    }
}

/// Row of the contiguous dk/dv buffers that holds key 0 of sequence `b`.
fn key_row0(p: &Problem, b: usize) -> usize {
    match &p.seqlens {
        Some(s) if p.varlen => s.cu_seqlens_k[b] as usize,
        _ => b * p.seqlen_k,
    }
}
