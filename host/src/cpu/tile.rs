//! One query tile of one (sequence, kv head): the mainloop over key tiles with the online softmax, and the
//! epilogue that normalizes the accumulator and forms the LSE. Empty rows end with sum 0: out 0, LSE -inf.
//! A tile's rows are query positions times q heads of one kv head's group (`TileRows`: with GQA the group's
//! heads share each K / V tile's loads); each row's arithmetic is its own, the same whatever its
//! tile-mates. A split-KV work item walks only its range of key tiles; its result is merged with the other
//! splits'.

use super::kv::KeyRows;
use super::mask::key_range;
use super::math::exp;
use super::simd::{by_head_dim, multiversion};
use super::score::{HeadMods, Mods, Score};
use super::seqlen::SeqInfo;
use super::{load_rows, HostSlice, BLOCK_M, BLOCK_N};
use crate::problem::Problem;

/// The input storages and the element offset of this work item's kv head.
pub(crate) struct Operands<'a> {
    pub q: HostSlice<'a>,
    pub k: HostSlice<'a>,
    pub v: HostSlice<'a>,
    /// Where the rows of k and v are.
    pub keys: &'a KeyRows<'a>,
    pub k_head: usize,
    pub v_head: usize,
}

/// A tile's rows: query positions `i0..i0 + positions`, each with q heads `h0..h0 + heads` (row r is position
/// `i0 + r / heads`, head `h0 + r % heads`); at most BLOCK_M rows.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TileRows {
    pub i0: usize,
    pub positions: usize,
    pub h0: usize,
    pub heads: usize,
}

impl TileRows {
    pub(crate) fn len(&self) -> usize {
        self.positions * self.heads
    }

    /// Row r's (query position, q head).
    pub(crate) fn at(&self, r: usize) -> (usize, usize) {
        (self.i0 + r / self.heads, self.h0 + r % self.heads)
    }

    /// The tiles of one sequence (`seqlen_q` queries) for a kv head with `group` q heads from `h0`: the
    /// group's heads in chunks of up to BLOCK_M, each chunk's positions in tiles of BLOCK_M / chunk rows.
    pub(crate) fn tiles(seqlen_q: usize, h0: usize, group: usize) -> impl Iterator<Item = TileRows> {
        // No q heads (a legal empty problem): no chunks.
        let per = group.clamp(1, BLOCK_M);
        let positions = BLOCK_M / per;
        (0..group.div_ceil(per)).flat_map(move |c| {
            let heads = per.min(group - c * per);
            (0..seqlen_q.div_ceil(positions)).map(move |t| TileRows { i0: t * positions, positions: positions.min(seqlen_q - t * positions), h0: h0 + c * per, heads })
        })
    }
}

/// Normalized f32 output rows (`rows * D`) and their LSE.
pub(crate) struct TileOut {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
}

/// The tile `rows` of sequence `s` (batch entry `bidb`) over the key tiles of `n_blocks` that its rows can see,
/// with each head's ALiBi and dropout (`mods`): dropped probabilities count in the row sum (the LSE is that of
/// every visible score) but not in the accumulator, and kept ones enter it times 1 / (1 - p).
///
/// Compiled per head dim (the loops over D unrolled, a row's accumulator in registers) and per vector ISA
/// (`simd`: AVX-512F, AVX2, the baseline; the same operations in the same order, so the same bits).
pub(crate) fn attend(p: &Problem, x: &Operands<'_>, s: &SeqInfo, mods: &Mods, bidb: usize, rows: TileRows, n_blocks: std::ops::Range<usize>) -> TileOut {
    by_head_dim!(p.head_dim, attend_dim(p, x, s, mods, bidb, rows, n_blocks))
}

multiversion!(fn attend_dim<const D: usize>(p: &Problem, x: &Operands<'_>, s: &SeqInfo, mods: &Mods, bidb: usize, rows: TileRows, n_blocks: std::ops::Range<usize>) -> TileOut = attend_in);

/// `attend` for head dim D (0: `p.head_dim`, not known at compile time).
#[inline(always)]
fn attend_in<const D: usize, const W: usize>(p: &Problem, x: &Operands<'_>, s: &SeqInfo, mods: &Mods, bidb: usize, tile: TileRows, n_blocks: std::ops::Range<usize>) -> TileOut {
    let d = if D > 0 { D } else { p.head_dim };
    let (sq, sk) = (s.seqlen_q, s.seqlen_k);
    let rows = tile.len();
    let range = |i: usize| key_range(i, sq, sk, p.window_left, p.window_right);
    let heads: Vec<HeadMods> = (0..tile.heads).map(|g| mods.head(bidb, tile.h0 + g)).collect();
    let scores: Vec<Score> = heads.iter().map(|m| Score::new(p, m, sq, sk)).collect();

    let mut q = vec![0.0f32; rows * d];
    if tile.heads == 1 {
        load_rows(x.q, s.q_base + tile.i0 * p.q.row + tile.h0 * p.q.head, p.q.row, rows, d, &mut q);
    } else {
        for (r, row) in q.chunks_exact_mut(d).enumerate() {
            let (i, h) = tile.at(r);
            load_rows(x.q, s.q_base + i * p.q.row + h * p.q.head, 0, 1, d, row);
        }
    }
    let mut acc = vec![0.0f32; rows * d];
    let mut row_max = vec![f32::NEG_INFINITY; rows];
    let mut row_sum = vec![0.0f32; rows];

    let (lo, _) = range(tile.at(0).0);
    let (_, hi) = range(tile.at(rows - 1).0);
    let mut k = vec![0.0f32; BLOCK_N * d];
    let mut kt = KeysT::new(d);
    let mut v = vec![0.0f32; BLOCK_N * d];
    // The tile's scores, then its probabilities, row by row (each row's keys `ranges`).
    let mut probs = vec![[0.0f32; BLOCK_N]; rows];
    let mut ranges = [(0usize, 0usize); BLOCK_M];
    let (mut keep, mut factor) = ([false; BLOCK_N], [1.0f32; BLOCK_N]);
    let dropout = mods.dropout().is_some();
    for n_block in (lo / BLOCK_N).max(n_blocks.start)..hi.div_ceil(BLOCK_N).min(n_blocks.end) {
        let j0 = n_block * BLOCK_N;
        let cols = (sk - j0).min(BLOCK_N);
        // The rows that see a key of this tile (consecutive: both ends of a row's range grow with the row)
        // and every key one of them sees.
        let seen = |r: usize| {
            let (a, b) = range(tile.at(r).0);
            (a.max(j0) - j0, b.min(j0 + cols).saturating_sub(j0))
        };
        let Some((first, last, _)) = seen_rows(rows, seen) else { continue };
        x.keys.load(x.k, &p.k, s, s.k_base, x.k_head, j0, cols, d, &mut k);
        x.keys.load(x.v, &p.v, s, s.v_base, x.v_head, j0, cols, d, &mut v);
        if n_block + 1 < hi.div_ceil(BLOCK_N).min(n_blocks.end) {
            // The next tile's keys, on their way while this one is computed.
            let (j1, next) = (j0 + BLOCK_N, (sk - j0 - BLOCK_N).min(BLOCK_N));
            x.keys.prefetch(x.k, &p.k, s, s.k_base, x.k_head, j1, next, d);
            x.keys.prefetch(x.v, &p.v, s, s.v_base, x.v_head, j1, next, d);
        }
        kt.set(&k, cols);
        kt.scores_rows::<D, W>(&q[first * d..last * d], &mut probs[first..last]);
        for r in first..last {
            let (a, b) = seen(r);
            let i = tile.at(r).0;
            let row = &mut probs[r];
            let s_row = &mut row[a..b];
            scores[r % tile.heads].apply(s_row, i, j0 + a);
            if dropout {
                heads[r % tile.heads].dropout_row(i, j0 + a, &mut keep, &mut factor[a..b]);
            }
            // Online softmax: rescale what was accumulated under the old max.
            let new_max = row_max[r].max(lane_max(s_row));
            if new_max != row_max[r] {
                let alpha = exp(row_max[r] - new_max);
                row_sum[r] *= alpha;
                acc[r * d..][..d].iter_mut().for_each(|o| *o *= alpha);
                row_max[r] = new_max;
            }
            s_row.iter_mut().for_each(|sc| *sc = exp(*sc - new_max));
            row_sum[r] += lane_sum(s_row);
            if dropout {
                s_row.iter_mut().zip(&factor[a..b]).for_each(|(pr, f)| *pr *= f);
            }
            ranges[r] = (a, b);
        }
        weighted_tile::<D>(&mut acc[first * d..last * d], &probs[first..last], &ranges[first..last], &v);
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

/// The tile's rows that see a key of a key tile (`seen(r)`: row r's keys, tile-relative; consecutive rows,
/// both ends of a row's range growing with the row) and every key one of them sees; None when no row does.
#[inline(always)]
pub(crate) fn seen_rows(rows: usize, seen: impl Fn(usize) -> (usize, usize)) -> Option<(usize, usize, std::ops::Range<usize>)> {
    let sees = |r: usize| {
        let (a, b) = seen(r);
        a < b
    };
    let first = (0..rows).find(|&r| sees(r))?;
    let last = (first..rows).take_while(|&r| sees(r)).last().unwrap_or(first) + 1;
    Some((first, last, seen(first).0..seen(last - 1).1))
}

/// The sum of `x` in eight lanes (element t in lane t mod 8), then a fixed tree over the lanes: vectorized,
/// and the same for a row whatever its tile-mates.
#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    let mut l = [0.0f32; 8];
    let (chunks, rest) = x.as_chunks::<8>();
    for c in chunks {
        for (l, &v) in l.iter_mut().zip(c) {
            *l += v;
        }
    }
    for (l, &v) in l.iter_mut().zip(rest) {
        *l += v;
    }
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
}

/// `acc += sum over i of w[i] row(i)`, i ascending for each element (rows as long as acc). For a known D in
/// column blocks of 64 (then 32), each block's accumulators in registers over the rows.
#[inline(always)]
pub(crate) fn weighted_rows<'a, const D: usize>(acc: &mut [f32], w: &[f32], row: impl Fn(usize) -> &'a [f32]) {
    if D > 0 {
        let mut c = 0;
        while c + 64 <= D {
            weighted_cols::<64>(acc, w, &row, c);
            c += 64;
        }
        if c < D {
            weighted_cols::<32>(acc, w, &row, c);
        }
    } else {
        for (i, &wi) in w.iter().enumerate() {
            acc.iter_mut().zip(row(i)).for_each(|(o, &x)| *o += wi * x);
        }
    }
}

/// `weighted_rows` over columns `c..c + W`.
#[inline(always)]
fn weighted_cols<'a, const W: usize>(acc: &mut [f32], w: &[f32], row: &impl Fn(usize) -> &'a [f32], c: usize) {
    let at: &mut [f32; W] = (&mut acc[c..c + W]).try_into().expect("W columns");
    let mut o = *at;
    for (i, &wi) in w.iter().enumerate() {
        let r: &[f32; W] = row(i)[c..c + W].try_into().expect("W columns");
        for (o, &x) in o.iter_mut().zip(r) {
            *o += wi * x;
        }
    }
    *at = o;
}

/// The largest of `x` (-inf when empty; NaNs skipped, as `f32::max` does) in eight lanes: vectorized.
#[inline(always)]
fn lane_max(x: &[f32]) -> f32 {
    let mut l = [f32::NEG_INFINITY; 8];
    let (chunks, rest) = x.as_chunks::<8>();
    for c in chunks {
        for (l, &v) in l.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    for (l, &v) in l.iter_mut().zip(rest) {
        *l = l.max(v);
    }
    (l[0].max(l[4]).max(l[1].max(l[5]))).max(l[2].max(l[6]).max(l[3].max(l[7])))
}

/// `weighted_rows` for each row r of `acc` (rows `d` wide) over its keys `ranges[r]` (key j's row at `rows[j * d..]`)
/// with weights `w[r]`, keys
/// ascending: four rows at a time share each key row's loads over the keys all four see, each row's other keys
/// before and after those on its own. Per element the same operations as `weighted_rows` (the same bits); no
/// key outside a row's range is read.
#[inline(always)]
pub(crate) fn weighted_tile<const D: usize>(acc: &mut [f32], w: &[[f32; BLOCK_N]], ranges: &[(usize, usize)], rows: &[f32]) {
    let d = if D > 0 { D } else { acc.len() / w.len().max(1) };
    let row = |j: usize| &rows[j * d..][..d];
    let one = |a: &mut [f32], w: &[f32; BLOCK_N], (lo, hi): (usize, usize)| {
        if lo < hi {
            weighted_rows::<D>(a, &w[lo..hi], |i| row(lo + i));
        }
    };
    let (blocks, rest) = w.as_chunks::<ROWS>();
    let (acc_blocks, acc_rest) = acc.split_at_mut(blocks.len() * ROWS * d);
    for ((wb, ab), rb) in blocks.iter().zip(acc_blocks.chunks_exact_mut(ROWS * d)).zip(ranges.chunks_exact(ROWS)) {
        let lo = rb.iter().map(|r| r.0).max().unwrap_or(0);
        let hi = rb.iter().map(|r| r.1).min().unwrap_or(0);
        if D == 0 || lo >= hi {
            for ((a, w), &r) in ab.chunks_exact_mut(d).zip(wb).zip(rb) {
                one(a, w, r);
            }
            continue;
        }
        for ((a, w), &(a0, _)) in ab.chunks_exact_mut(d).zip(wb).zip(rb) {
            one(a, w, (a0, lo));
        }
        rows_block::<D>(ab, wb, lo..hi, &rows[lo * d..hi * d], d);
        for ((a, w), &(_, b0)) in ab.chunks_exact_mut(d).zip(wb).zip(rb) {
            one(a, w, (hi, b0));
        }
    }
    for ((w, a), &r) in rest.iter().zip(acc_rest.chunks_exact_mut(d)).zip(&ranges[blocks.len() * ROWS..]) {
        one(a, w, r);
    }
}

multiversion!(
    /// `weighted_tile` with the key rows in one slice (row j at `j * d`), compiled on its own: inlined into the
    /// backward's dK / dV loop, LLVM left it scalar.
    pub(crate) fn weighted_tile_of<const D: usize>(acc: &mut [f32], w: &[[f32; BLOCK_N]], ranges: &[(usize, usize)], rows: &[f32], d: usize) -> () = weighted_tile_of_in
);

#[inline(always)]
fn weighted_tile_of_in<const D: usize, const W: usize>(acc: &mut [f32], w: &[[f32; BLOCK_N]], ranges: &[(usize, usize)], rows: &[f32], _d: usize) {
    weighted_tile::<D>(acc, w, ranges, rows);
}

multiversion!(
    /// `weighted_tile`'s shared part: ROWS rows of `acc` over keys `keys` (key rows in `rows` from the range's first,
    /// `d` apart), compiled on its own (inlined into the tile loops, LLVM left it scalar).
    fn rows_block<const D: usize>(acc: &mut [f32], w: &[[f32; BLOCK_N]; ROWS], keys: std::ops::Range<usize>, rows: &[f32], d: usize) -> () = rows_block_in
);

#[inline(always)]
fn rows_block_in<const D: usize, const W: usize>(acc: &mut [f32], w: &[[f32; BLOCK_N]; ROWS], keys: std::ops::Range<usize>, rows: &[f32], d: usize) {
    let j0 = keys.start;
    let mut c = 0;
    while c < d {
        weighted_cols_rows::<W>(acc, d, w, keys.clone(), &|j| &rows[(j - j0) * d..][..d], c);
        c += W;
    }
}

/// Rows per block of `weighted_tile` and `KeysT::scores_rows`.
const ROWS: usize = 4;

/// `weighted_tile` of ROWS rows over columns `c..c + W`, their accumulators in registers.
#[inline(always)]
fn weighted_cols_rows<'a, const W: usize>(acc: &mut [f32], d: usize, w: &[[f32; BLOCK_N]; ROWS], keys: std::ops::Range<usize>, row: &impl Fn(usize) -> &'a [f32], c: usize) {
    let mut o = [[0.0f32; W]; ROWS];
    for (r, o) in o.iter_mut().enumerate() {
        *o = acc[r * d + c..][..W].try_into().expect("W columns");
    }
    for j in keys {
        let x: &[f32; W] = row(j)[c..c + W].try_into().expect("W columns");
        for (o, w) in o.iter_mut().zip(w) {
            let wj = w[j];
            for (o, &x) in o.iter_mut().zip(x) {
                *o += wj * x;
            }
        }
    }
    for (r, o) in o.iter().enumerate() {
        acc[r * d + c..][..W].copy_from_slice(o);
    }
}

/// A key tile transposed, `[D][BLOCK_N]`, so that a query row's scores against all its keys are one
/// vector accumulation per head-dim element: q.k_j = sum over e of q[e] k_j[e], e in order, the same for
/// every key wherever it stands in the tile (`attend` and `probs` share it, so s_dmask's scores are the
/// forward's bit for bit). Columns past the tile's keys hold zeros or an earlier tile's keys: their
/// scores are never read.
pub(crate) struct KeysT {
    t: Vec<f32>,
    d: usize,
}

impl KeysT {
    pub(crate) fn new(d: usize) -> KeysT {
        KeysT { t: vec![0.0; d * BLOCK_N], d }
    }

    /// The head dim.
    pub(crate) fn d(&self) -> usize {
        self.d
    }

    /// Transposes the first `cols` keys of `k` (`[cols][d]`): in 8 x 8 blocks (which vectorize), the last
    /// `cols % 8` keys one by one.
    #[inline(always)]
    pub(crate) fn set(&mut self, k: &[f32], cols: usize) {
        let d = self.d;
        let full = cols / 8 * 8;
        for j0 in (0..full).step_by(8) {
            for e0 in (0..d).step_by(8) {
                let mut b = [[0.0f32; 8]; 8];
                for (j, b) in b.iter_mut().enumerate() {
                    *b = k[(j0 + j) * d + e0..][..8].try_into().expect("8 elements");
                }
                for e in 0..8 {
                    let dst: &mut [f32; 8] = (&mut self.t[(e0 + e) * BLOCK_N + j0..][..8]).try_into().expect("8 keys");
                    for (x, b) in dst.iter_mut().zip(&b) {
                        *x = b[e];
                    }
                }
            }
        }
        for (j, k_row) in k.chunks_exact(d).enumerate().take(cols).skip(full) {
            for (e, &x) in k_row.iter().enumerate() {
                self.t[e * BLOCK_N + j] = x;
            }
        }
    }

    /// `scores` of each row of `q` (rows `d` wide) into `out`, four rows by W keys at a time sharing each key
    /// element's loads (the same sums in the same order, so the same bits; W: `multiversion!`'s).
    #[inline(always)]
    pub(crate) fn scores_rows<const D: usize, const W: usize>(&self, q: &[f32], out: &mut [[f32; BLOCK_N]]) {
        let d = if D > 0 { D } else { self.d };
        let (blocks, rest) = out.as_chunks_mut::<ROWS>();
        let (q_blocks, q_rest) = q.split_at(blocks.len() * ROWS * d);
        for (ob, qb) in blocks.iter_mut().zip(q_blocks.chunks_exact(ROWS * d)) {
            for part in 0..BLOCK_N / W {
                let mut s = [[0.0f32; W]; ROWS];
                for (e, k_e) in self.t.as_chunks::<BLOCK_N>().0[..d].iter().enumerate() {
                    let k_e: &[f32; W] = k_e[part * W..][..W].try_into().expect("W keys");
                    for (r, s) in s.iter_mut().enumerate() {
                        let qe = qb[r * d + e];
                        for (s, &x) in s.iter_mut().zip(k_e) {
                            *s += qe * x;
                        }
                    }
                }
                for (o, s) in ob.iter_mut().zip(&s) {
                    o[part * W..][..W].copy_from_slice(s);
                }
            }
        }
        for (o, qr) in rest.iter_mut().zip(q_rest.chunks_exact(d)) {
            self.scores::<D>(qr, o);
        }
    }

    /// q.k_j for every column j of the tile.
    #[inline(always)]
    pub(crate) fn scores<const D: usize>(&self, q: &[f32], out: &mut [f32; BLOCK_N]) {
        let mut s = [0.0f32; BLOCK_N];
        let d = if D > 0 { D } else { self.d };
        for (&qe, k_e) in q[..d].iter().zip(self.t.as_chunks::<BLOCK_N>().0) {
            for (s, &x) in s.iter_mut().zip(k_e) {
                *s += qe * x;
            }
        }
        *out = s;
    }
}

/// The probabilities of query tile `m_block` of sequence `s` (`s_dmask` rows, `rows * seqlen_k`):
/// P = exp(s - lse) for the keys each row sees, negated where dropout drops them, +0 elsewhere; `lse`
/// holds the tile's rows' forward LSE. The scores are the forward's bit for bit.
pub(crate) fn probs(p: &Problem, x: &Operands<'_>, s: &SeqInfo, m: &HeadMods, q_head: usize, m_block: usize, lse: &[f32]) -> Vec<f32> {
    let d = p.head_dim;
    let (sq, sk) = (s.seqlen_q, s.seqlen_k);
    let i0 = m_block * BLOCK_M;
    let rows = (sq - i0).min(BLOCK_M);
    let range = |i: usize| key_range(i, sq, sk, p.window_left, p.window_right);
    let mut q = vec![0.0f32; rows * d];
    load_rows(x.q, s.q_base + i0 * p.q.row + q_head, p.q.row, rows, d, &mut q);
    let mut probs = vec![0.0f32; rows * sk];
    let mut k = vec![0.0f32; BLOCK_N * d];
    let mut kt = KeysT::new(d);
    let mut scores = [0.0f32; BLOCK_N];
    let (mut keep, mut factor) = ([true; BLOCK_N], [1.0f32; BLOCK_N]);
    let score = Score::new(p, m, sq, sk);
    let (lo, _) = range(i0);
    let (_, hi) = range(i0 + rows - 1);
    for n_block in lo / BLOCK_N..hi.div_ceil(BLOCK_N) {
        let j0 = n_block * BLOCK_N;
        let cols = (sk - j0).min(BLOCK_N);
        x.keys.load(x.k, &p.k, s, s.k_base, x.k_head, j0, cols, d, &mut k);
        kt.set(&k, cols);
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
            kt.scores::<0>(&q[r * d..][..d], &mut scores);
            score.apply(&mut scores[a..b], i, j0 + a);
            let out = &mut probs[r * sk + j0..][..cols];
            for c in a..b {
                let pr = exp(scores[c] - lse[r]);
                out[c] = if keep[c] { pr } else { -pr };
            }
        }
    }
    probs
}
