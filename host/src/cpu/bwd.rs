//! The CPU backward, flash-attention 2's algorithm: P_ij = exp(s_ij - lse_i) is recomputed from the
//! forward's LSE (s with ALiBi's bias), Z_ij the dropout factor regenerated from the same Philox counters
//! (1 / (1 - p) kept, 0 dropped; 1 without dropout), D_i = dout_i . out_i,
//! dS_ij = P_ij (Z_ij dout_i . v_j - D_i), then dV = (P Z)^T dout, dK = scale dX^T Q and dQ = scale dX K,
//! where dX = dS * ds/dx carries the softcap's tanh (1 - tanh^2); the bias is constant in q and k.
//!
//! Work items write disjoint outputs, so no sum is ever split between threads and no float atomics are
//! needed. Two walks, the same sums in the same order (so the same bits):
//!   fused (enough (sequence, kv head) pairs for the threads, or a call small enough to run on the calling
//!          thread alone, `map_items`): one work item per pair walks its key
//!          tiles in order; per tile it walks its group's q heads and the queries that see the tile,
//!          summing dK / dV for the tile and adding the tile's dq terms to the pair's dq rows;
//!   two passes (else): dk/dv per (sequence, kv head, key tile) as above without dq, then dq per
//!          (sequence, q head, query tile) over the key tiles its rows see, recomputing S and dP.
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
use super::tile::{seen_rows, weighted_rows, weighted_tile, weighted_tile_of, KeysT};
use super::seqlen::{self, SeqInfo};
use super::{call_work, load_rows, map_items, serial, HostSlice, BLOCK_M, BLOCK_N};
use crate::error::Result;
use crate::problem::{BwdProblem, Problem, Strides};

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
    let work = 3 * call_work(p);
    let rows_delta: Vec<Vec<f32>> = map_items(&heads, work, |&(b, h)| {
        let sq = seqs[b].s.seqlen_q;
        let (mut o, mut g) = (vec![0.0f32; sq * d], vec![0.0f32; sq * d]);
        load_rows(od, out_base[b] + h * bp.out.head, bp.out.row, sq, d, &mut o);
        load_rows(dod, seqs[b].dout_base + h * bp.dout.head, bp.dout.row, sq, d, &mut g);
        o.chunks_exact(d).zip(g.chunks_exact(d)).map(|(o, g)| dot(o, g)).collect()
    });
    let mut delta = vec![0.0f32; lse.len()];
    for (&(b, h), r) in heads.iter().zip(&rows_delta) {
        let at = seqs[b].s.lse_base + h * lse_head_stride;
        delta[at..at + r.len()].copy_from_slice(r);
    }
    let x = Inputs { q: qd, k: kd, v: vd, dout: dod, lse, delta: &delta, mods };

    // Keys and rows of no sequence stay 0.
    let mut dk = vec![0.0f32; p.total_k * p.hk * d];
    let mut dv = vec![0.0f32; p.total_k * p.hk * d];
    let mut dq = vec![0.0f32; p.total_q * p.hq * d];
    let mut put_keys = |b: usize, hk: usize, n_block: usize, tk: &[f32], tv: &[f32]| {
        for (c, (k_row, v_row)) in tk.chunks_exact(d).zip(tv.chunks_exact(d)).enumerate() {
            let at = ((seqs[b].key_row0 + n_block * BLOCK_N + c) * p.hk + hk) * d;
            dk[at..at + d].copy_from_slice(k_row);
            dv[at..at + d].copy_from_slice(v_row);
        }
    };
    if serial(work) || seqs.len() * p.hk >= 2 * rayon::current_num_threads() {
        // Enough (sequence, kv head) pairs to keep every thread busy, or one thread for all: one work item per pair walks its key
        // tiles in order and adds each tile's dq terms to its group's rows there, the dq pass's sums in the
        // dq pass's order (the same bits), so each tile's S and dP are computed once.
        let items: Vec<(usize, usize)> = (0..seqs.len()).flat_map(|b| (0..p.hk).map(move |hk| (b, hk))).collect();
        // Per pair: its key tiles' (dk, dv), its group's dq rows.
        type Pair = (Vec<(Vec<f32>, Vec<f32>)>, Vec<f32>);
        let parts: Vec<Pair> = map_items(&items, work, |&(b, hk)| {
            let s = &infos[b];
            let mut group_dq = vec![0.0f32; group * s.seqlen_q * d];
            let tiles = (0..s.seqlen_k.div_ceil(BLOCK_N)).map(|n| dkdv_tile(p, bp, &x, &seqs[b], b, lse_head_stride, hk, group, n, Some(&mut group_dq))).collect();
            group_dq.iter_mut().for_each(|x| *x *= p.scale);
            (tiles, group_dq)
        });
        for (&(b, hk), (tiles, group_dq)) in items.iter().zip(&parts) {
            for (n_block, (tk, tv)) in tiles.iter().enumerate() {
                put_keys(b, hk, n_block, tk, tv);
            }
            for (g, rows) in group_dq.chunks_exact(infos[b].seqlen_q.max(1) * d).enumerate() {
                for (r, row) in rows.chunks_exact(d).enumerate() {
                    let at = ((infos[b].out_row0 + r) * p.hq + hk * group + g) * d;
                    dq[at..at + d].copy_from_slice(row);
                }
            }
        }
        return Ok([dq, dk, dv]);
    }

    // dk, dv: per (sequence, kv head, key tile).
    let kv_items: Vec<(usize, usize, usize)> =
        infos.iter().enumerate().flat_map(|(b, s)| (0..p.hk).flat_map(move |hk| (0..s.seqlen_k.div_ceil(BLOCK_N)).map(move |n| (b, hk, n)))).collect();
    let kv_tiles: Vec<(Vec<f32>, Vec<f32>)> = map_items(&kv_items, work, |&(b, hk, n)| dkdv_tile(p, bp, &x, &seqs[b], b, lse_head_stride, hk, group, n, None));
    for (&(b, hk, n_block), (tk, tv)) in kv_items.iter().zip(&kv_tiles) {
        put_keys(b, hk, n_block, tk, tv);
    }

    // dq: per (sequence, q head, query tile).
    let q_items: Vec<(usize, usize, usize)> =
        infos.iter().enumerate().flat_map(|(b, s)| (0..p.hq).flat_map(move |h| (0..s.seqlen_q.div_ceil(BLOCK_M)).map(move |m| (b, h, m)))).collect();
    let q_tiles: Vec<Vec<f32>> = map_items(&q_items, work, |&(b, h, m)| dq_tile(p, bp, &x, &seqs[b], b, lse_head_stride, h, group, m));
    for (&(b, h, m_block), t) in q_items.iter().zip(&q_tiles) {
        for (r, row) in t.chunks_exact(d).enumerate() {
            let at = ((seqs[b].s.out_row0 + m_block * BLOCK_M + r) * p.hq + h) * d;
            dq[at..at + d].copy_from_slice(row);
        }
    }

    Ok([dq, dk, dv])
}

/// dk and dv (`cols * D` each) of key tile `n_block` of kv head `hk`; with `dq` (the group's q heads' rows of
/// the sequence, `[group][seqlen_q][D]`), the tile's dq terms (before the factor `scale`) added to it.
#[allow(clippy::too_many_arguments)]
fn dkdv_tile(p: &Problem, bp: &BwdProblem, x: &Inputs<'_>, seq: &Seq, bidb: usize, lse_head_stride: usize, hk: usize, group: usize, n_block: usize, dq: Option<&mut [f32]>) -> (Vec<f32>, Vec<f32>) {
    by_head_dim!(p.head_dim, dkdv_dim(p, bp, x, seq, bidb, lse_head_stride, hk, group, n_block, dq))
}

multiversion!(#[allow(clippy::too_many_arguments)] fn dkdv_dim<const D: usize>(p: &Problem, bp: &BwdProblem, x: &Inputs<'_>, seq: &Seq, bidb: usize, lse_head_stride: usize, hk: usize, group: usize, n_block: usize, dq: Option<&mut [f32]>) -> (Vec<f32>, Vec<f32>) = dkdv_in);

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn dkdv_in<const D: usize, const W: usize>(p: &Problem, bp: &BwdProblem, x: &Inputs<'_>, seq: &Seq, bidb: usize, lse_head_stride: usize, hk: usize, group: usize, n_block: usize, mut dq: Option<&mut [f32]>) -> (Vec<f32>, Vec<f32>) {
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
    let mut t = Grads::new();
    let mut by_key = [(0usize, 0usize); BLOCK_N];

    for h in hk * group..(hk + 1) * group {
        let mods = x.mods.head(bidb, h);
        let score = Score::new(p, &mods, sq, sk);
        for m_block in 0..sq.div_ceil(BLOCK_M) {
            let i0 = m_block * BLOCK_M;
            let rows = (sq - i0).min(BLOCK_M);
            let seen = |r: usize| {
                let (a, b) = range(i0 + r);
                (a.max(j0) - j0, b.min(j0 + cols).saturating_sub(j0))
            };
            let Some((first, last, span)) = seen_rows(rows, seen) else { continue };
            load_rows(x.q, s.q_base + i0 * p.q.row + h * p.q.head, p.q.row, rows, d, &mut q);
            load_rows(x.dout, seq.dout_base + i0 * bp.dout.row + h * bp.dout.head, bp.dout.row, rows, d, &mut g);
            let at0 = s.lse_base + h * lse_head_stride + i0;
            t.tile::<D, W>(&score, &mods, &kt, &vt, &q, &g, &x.lse[at0..at0 + rows], &x.delta[at0..at0 + rows], i0, j0, first..last, seen);
            // Each key's sums over the rows that see it, in row order.
            let (ranges, keys) = (&t.ranges[first..last], span.start * d..span.end * d);
            let by_key = t.ordered.then(|| {
                rows_by_key(ranges, span.clone(), &mut by_key);
                &by_key
            });
            weighted_keys::<D>(&mut dv[keys.clone()], &t.pz[first..last], span.start, &g[first * d..last * d], ranges, by_key);
            weighted_keys::<D>(&mut dk[keys], &t.dx[first..last], span.start, &q[first * d..last * d], ranges, by_key);
            if let Some(dq) = dq.as_deref_mut() {
                // dq_r += dX_rj k_j, as the dq pass adds them.
                let at = ((h - hk * group) * sq + i0 + first) * d;
                weighted_tile_of::<D>(&mut dq[at..at + (last - first) * d], &t.dx[first..last], ranges, &k, d);
            }
        }
    }
    dk.iter_mut().for_each(|x| *x *= p.scale);
    (dk, dv)
}

/// For each key c of `acc`'s rows (key c0 first, rows `d` wide): `acc_c += w[r][c] * rows_r` over the rows r that
/// see it (`ranges[r]` holds row r's keys), in row order. Where the ranges are ordered (both ends growing with the
/// row) `by_key[c]` holds the rows that see key c (consecutive, `rows_by_key`): four keys at a time share each
/// row's loads over the rows that see all four, each key's other rows before and after those on their own;
/// otherwise key by key. Per element the same operations as key by key (the same bits); no row is read for a key
/// it does not see.
#[inline(always)]
fn weighted_keys<const D: usize>(acc: &mut [f32], w: &[[f32; BLOCK_N]], c0: usize, rows: &[f32], ranges: &[(usize, usize)], by_key: Option<&[(usize, usize); BLOCK_N]>) {
    let d = if D > 0 { D } else { rows.len() / w.len().max(1) };
    let Some(by_key) = by_key else {
        for (i, a) in acc.chunks_exact_mut(d).enumerate() {
            let c = c0 + i;
            let seen: Vec<usize> = (0..w.len()).filter(|&r| ranges[r].0 <= c && c < ranges[r].1).collect();
            key_rows::<D>(a, w, c, rows, seen.into_iter());
        }
        return;
    };
    let mut blocks = acc.chunks_exact_mut(KEYS * d);
    let mut c = c0;
    for block in &mut blocks {
        let (r0, r1) = (by_key[c + KEYS - 1].0, by_key[c].1);
        if D == 0 || r0 >= r1 {
            for (i, a) in block.chunks_exact_mut(d).enumerate() {
                let (f, e) = by_key[c + i];
                key_rows::<D>(a, w, c + i, rows, f..e);
            }
        } else {
            for (i, a) in block.chunks_exact_mut(d).enumerate() {
                key_rows::<D>(a, w, c + i, rows, by_key[c + i].0..r0);
            }
            keys_block::<D>(block, &w[r0..r1], c, &rows[r0 * d..r1 * d], d);
            for (i, a) in block.chunks_exact_mut(d).enumerate() {
                key_rows::<D>(a, w, c + i, rows, r1..by_key[c + i].1);
            }
        }
        c += KEYS;
    }
    for a in blocks.into_remainder().chunks_exact_mut(d) {
        let (f, e) = by_key[c];
        key_rows::<D>(a, w, c, rows, f..e);
        c += 1;
    }
}

/// For each key c of `keys`, the rows of `ranges` (ordered: both ends growing with the row) that see it: from the
/// first whose range ends after c to the first whose range starts after it.
fn rows_by_key(ranges: &[(usize, usize)], keys: std::ops::Range<usize>, by_key: &mut [(usize, usize); BLOCK_N]) {
    let (mut first, mut end) = (0, 0);
    for c in keys {
        while first < ranges.len() && ranges[first].1 <= c {
            first += 1;
        }
        while end < ranges.len() && ranges[end].0 <= c {
            end += 1;
        }
        by_key[c] = (first, end);
    }
}

/// `acc += w[r][c] * rows_r` over the rows r of `among` (rows `acc.len()` wide), in order.
#[inline(always)]
fn key_rows<const D: usize>(acc: &mut [f32], w: &[[f32; BLOCK_N]], c: usize, rows: &[f32], among: impl Iterator<Item = usize>) {
    let d = acc.len();
    let (mut col, mut at, mut n) = ([0.0f32; BLOCK_M], [0usize; BLOCK_M], 0);
    for r in among {
        (col[n], at[n]) = (w[r][c], r);
        n += 1;
    }
    if n > 0 {
        weighted_rows::<D>(acc, &col[..n], |i| &rows[at[i] * d..][..d]);
    }
}

multiversion!(
    /// `weighted_keys`' shared part: KEYS keys of `acc` (key c first) over all the rows of `w` / `rows`, compiled on
    /// its own (inlined into the tile loop, LLVM may leave it scalar).
    fn keys_block<const D: usize>(acc: &mut [f32], w: &[[f32; BLOCK_N]], c: usize, rows: &[f32], d: usize) -> () = keys_block_in
);

#[inline(always)]
fn keys_block_in<const D: usize, const W: usize>(acc: &mut [f32], w: &[[f32; BLOCK_N]], c: usize, rows: &[f32], d: usize) {
    let d = if D > 0 { D } else { d };
    for e in (0..d).step_by(W) {
        let mut o = [[0.0f32; W]; KEYS];
        for (i, o) in o.iter_mut().enumerate() {
            *o = acc[i * d + e..][..W].try_into().expect("W columns");
        }
        for (wr, row) in w.iter().zip(rows.chunks_exact(d)) {
            let x: &[f32; W] = row[e..e + W].try_into().expect("W columns");
            for (i, o) in o.iter_mut().enumerate() {
                let wi = wr[c + i];
                for (o, &x) in o.iter_mut().zip(x) {
                    *o += wi * x;
                }
            }
        }
        for (i, o) in o.iter().enumerate() {
            acc[i * d + e..][..W].copy_from_slice(o);
        }
    }
}

/// Keys per block of `weighted_keys`.
const KEYS: usize = 4;

/// dq (`rows * D`) of query tile `m_block` of q head `h`.
#[allow(clippy::too_many_arguments)]
fn dq_tile(p: &Problem, bp: &BwdProblem, x: &Inputs<'_>, seq: &Seq, bidb: usize, lse_head_stride: usize, h: usize, group: usize, m_block: usize) -> Vec<f32> {
    by_head_dim!(p.head_dim, dq_dim(p, bp, x, seq, bidb, lse_head_stride, h, group, m_block))
}

multiversion!(#[allow(clippy::too_many_arguments)] fn dq_dim<const D: usize>(p: &Problem, bp: &BwdProblem, x: &Inputs<'_>, seq: &Seq, bidb: usize, lse_head_stride: usize, h: usize, group: usize, m_block: usize) -> Vec<f32> = dq_in);

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn dq_in<const D: usize, const W: usize>(p: &Problem, bp: &BwdProblem, x: &Inputs<'_>, seq: &Seq, bidb: usize, lse_head_stride: usize, h: usize, group: usize, m_block: usize) -> Vec<f32> {
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
    let mut t = Grads::new();

    let (lo, _) = range(i0);
    let (_, hi) = range(i0 + rows - 1);
    for n_block in lo / BLOCK_N..hi.div_ceil(BLOCK_N) {
        let j0 = n_block * BLOCK_N;
        let cols = (sk - j0).min(BLOCK_N);
        let seen = |r: usize| {
            let (a, b) = range(i0 + r);
            (a.max(j0) - j0, b.min(j0 + cols).saturating_sub(j0))
        };
        let Some((first, last, _)) = seen_rows(rows, seen) else { continue };
        load_rows(x.k, s.k_base + j0 * p.k.row + hk * p.k.head, p.k.row, cols, d, &mut k);
        load_rows(x.v, s.v_base + j0 * p.v.row + hk * p.v.head, p.v.row, cols, d, &mut v);
        kt.set(&k, cols);
        vt.set(&v, cols);
        t.tile::<D, W>(&score, &mods, &kt, &vt, &q, &g, lse, delta, i0, j0, first..last, seen);
        // dq_r += dX_rj k_j, key after key.
        weighted_tile::<D>(&mut dq[first * d..last * d], &t.dx[first..last], &t.ranges[first..last], &k);
    }
    dq.iter_mut().for_each(|x| *x *= p.scale);
    dq
}

/// A query tile's (P_ij Z_ij, dX_ij) against a key tile, both passes' shared arithmetic, so they agree on every
/// P and dX bit for bit: Z_ij = dropout's 1 / (1 - p) where kept, 0 where dropped (1 without dropout), and dX
/// the gradient with respect to q.k without the factor `scale`: dX = P (Z dout.v - D) ds/dx, since
/// out = sum_j P_j Z_j v_j makes dL/dP_j = Z_j dout.v_j and sum_j P_j Z_j dout.v_j = dout.out = D. The
/// scores are the forward's (`KeysT`, `Score`), P = exp(s - lse) as s_dmask's.
struct Grads {
    s: Vec<[f32; BLOCK_N]>,
    dp: Vec<[f32; BLOCK_N]>,
    ds_dx: [f32; BLOCK_N],
    keep: [bool; BLOCK_N],
    factor: [f32; BLOCK_N],
    pz: Vec<[f32; BLOCK_N]>,
    dx: Vec<[f32; BLOCK_N]>,
    /// Each row's keys in the tile (none for a row whose LSE is -inf), and whether the rows' ranges are ordered
    /// (both ends growing with the row; a row of -inf LSE among rows that see keys breaks that).
    ranges: [(usize, usize); BLOCK_M],
    ordered: bool,
}

impl Grads {
    fn new() -> Grads {
        let tile = || vec![[0.0f32; BLOCK_N]; BLOCK_M];
        Grads { s: tile(), dp: tile(), ds_dx: [0.0; BLOCK_N], keep: [false; BLOCK_N], factor: [1.0; BLOCK_N], pz: tile(), dx: tile(), ranges: [(0, 0); BLOCK_M], ordered: true }
    }

    /// `pz[r]`, `dx[r]` over row r's keys `seen(r)` (`ranges[r]`; none where its LSE is -inf: it sees no key) for
    /// the rows r of `rows` (`q`, `dout` hold the query tile's rows from its row 0, which is query i0; `lse`,
    /// `delta` its rows' values) against the key tile from key j0.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn tile<const D: usize, const W: usize>(&mut self, score: &Score, mods: &HeadMods, kt: &KeysT, vt: &KeysT, q: &[f32], dout: &[f32], lse: &[f32], delta: &[f32], i0: usize, j0: usize, rows: std::ops::Range<usize>, seen: impl Fn(usize) -> (usize, usize)) {
        let d = if D > 0 { D } else { kt.d() };
        let (first, last) = (rows.start, rows.end);
        kt.scores_rows::<D, W>(&q[first * d..last * d], &mut self.s[first..last]);
        vt.scores_rows::<D, W>(&dout[first * d..last * d], &mut self.dp[first..last]);
        self.ordered = true;
        for r in rows {
            if lse[r] == f32::NEG_INFINITY {
                self.ranges[r] = (0, 0);
                self.ordered = false;
                continue;
            }
            let (a, b) = seen(r);
            self.ranges[r] = (a, b);
            let i = i0 + r;
            let s = &mut self.s[r];
            score.apply_grad(&mut s[a..b], &mut self.ds_dx[a..b], i, j0 + a);
            mods.dropout_row(i, j0 + a, &mut self.keep, &mut self.factor[a..b]);
            let (dp, pz, dx) = (&self.dp[r], &mut self.pz[r], &mut self.dx[r]);
            for j in a..b {
                let pr = exp(s[j] - lse[r]);
                pz[j] = pr * self.factor[j];
                dx[j] = pr * (dp[j] * self.factor[j] - delta[r]) * self.ds_dx[j];
            }
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
