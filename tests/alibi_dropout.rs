//! ALiBi, dropout and the probabilities (`s_dmask`, return_attn_probs) on the CPU (issue 14), forward and
//! backward, against an f64 reference written here from the definitions:
//!   s_ij = softcap(scale q_i.k_j) - slope |i + Sk - Sq - j|,  P = softmax(s) over the visible keys,
//!   Z_ij = keep_ij / (1 - p),  out_i = sum_j P_ij Z_ij v_j,  lse_i = log sum_j exp(s_ij),
//!   dv_j = sum_i P_ij Z_ij dout_i,  dS_ij = P_ij (Z_ij dout_i.v_j - dout_i.out_i),  dx = dS ds/dx,
//!   dq_i = scale sum_j dx_ij k_j,  dk_j = scale sum_i dx_ij q_i.
//! The reference takes keep from the library's `s_dmask` (its sign), and that sign is checked against
//! the mask as documented in `flash_attn::dropout` (Philox4x32-10 counters written out again here), whose
//! Philox is checked against Random123's published known answers. Plus keep-rate statistics, seeds and
//! offsets, the packing rule (sequence b of a packed call = a call of its own at offset + b * Hq),
//! bitwise determinism, the paged and KV-cache paths, every bad input, and the CUDA target's
//! `Unsupported`.
//!
//! Tolerances are cpu_reference.rs's and cpu_backward.rs's with the score bound smax grown by the
//! largest bias (max |slope| * the longest distance) and the value bound by dropout's 1 / (1 - p).
//! Proptest prints each failing case (its seed included); the other tests print their seeds.

#[path = "common/mod.rs"]
mod common;

use common::*;
use flash_attn::dropout::{philox4x32_10, DropoutParams};
use flash_attn::raw::{self, Workspace};
use flash_attn::{
    bwd_with, fwd, fwd_kvcache, fwd_with, varlen_bwd_with, varlen_fwd_paged_with, varlen_fwd_with, AttnOptions, BwdOutput, DType, Device, Dropout, Error, Extras, FwdOutput, KvCache,
    KvCacheOptions, PagedVarlen, Result, Target, Tensor, Varlen, View,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use rand::rngs::StdRng;
use rand::Rng;

fn seeded(test: &str) -> (u64, StdRng) {
    let seed: u64 = rand::thread_rng().r#gen();
    eprintln!("{test}: seed {seed}");
    (seed, rng(seed))
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_f32_vec().unwrap().iter().map(|v| v.to_bits()).collect()
}

fn i32s(x: &[usize]) -> Tensor {
    Tensor::from_i32(x.iter().map(|&v| v as i32).collect(), &[x.len()]).unwrap()
}

fn prefix(lens: impl Iterator<Item = usize>) -> Vec<usize> {
    std::iter::once(0).chain(lens.scan(0, |acc, l| { *acc += l; Some(*acc) })).collect()
}

fn expect_err<T: std::fmt::Debug>(r: Result<T>, is: impl Fn(&Error) -> bool, name: &str) {
    let e = r.expect_err("call must fail");
    assert!(is(&e), "unexpected error variant: {e:?}");
    assert!(e.to_string().contains(name), "message {:?} does not name {name:?}", e.to_string());
}

// ---------------------------------------------------------------------------------------------------
// Philox and the documented mask

#[test]
fn philox_known_answers() {
    // Random123's kat_vectors for philox4x32_10: counter, key, output.
    let kats = [
        ([0u32; 4], [0u32; 2], [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]),
        ([u32::MAX; 4], [u32::MAX; 2], [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]),
        ([0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344], [0xa409_3822, 0x299f_31d0], [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]),
    ];
    for (counter, key, want) in kats {
        assert_eq!(philox4x32_10(counter, key), want, "counter {counter:08x?} key {key:08x?}");
    }
}

/// The keep rule exactly as `flash_attn::dropout` documents it, written out again.
fn documented_keep(p: f32, seed: u64, offset: u64, bh: u64, i: u32, j: u32) -> bool {
    let key = [seed as u32, (seed >> 32) as u32];
    let sub = offset.wrapping_add(bh);
    let counter = [j / 2, (i / 16) * 8 + i % 8, sub as u32, (sub >> 32) as u32];
    let lane = (j % 2 + 2 * ((i / 8) % 2)) as usize;
    let threshold = ((1.0 - p as f64) * 2f64.powi(32)).floor().min(u32::MAX as f64) as u32;
    philox4x32_10(counter, key)[lane] < threshold
}

#[test]
fn keep_threshold_and_scale() {
    for (p, t) in [(0.5f32, 1u32 << 31), (0.25, 3 << 30), (0.75, 1 << 30), (1.0 - f32::EPSILON / 2.0, 256), (1e-30, u32::MAX)] {
        let d = DropoutParams::new(p, 0, 0).unwrap();
        assert_eq!(d.threshold, t, "p = {p}");
        assert_eq!(d.scale, (1.0 / (1.0 - p as f64)) as f32, "p = {p}");
    }
    assert!(DropoutParams::new(0.0, 1, 2).is_none(), "p = 0 is no dropout");
}

#[test]
fn mask_follows_the_documented_counters() {
    let (_, mut r) = seeded("mask_follows_the_documented_counters");
    for _ in 0..200 {
        let (p, seed, offset) = (r.gen_range(0.01f32..0.99), r.r#gen::<u64>(), if r.gen_bool(0.2) { u64::MAX - r.gen_range(0..4) } else { r.r#gen() });
        let d = DropoutParams::new(p, seed, offset).unwrap();
        let (bh, i, j0) = (r.gen_range(0..1u64 << 40), r.gen_range(0..1u32 << 30), r.gen_range(0..1u32 << 30));
        let mut row = vec![false; r.gen_range(1..70)];
        d.keep_row(bh, i, j0, &mut row);
        for (c, &k) in row.iter().enumerate() {
            let j = j0 + c as u32;
            assert_eq!(k, documented_keep(p, seed, offset, bh, i, j), "p {p} seed {seed} offset {offset} bh {bh} ({i}, {j})");
            assert_eq!(k, d.keep(bh, i, j));
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The reference

/// One sequence's options for the reference.
struct RefCase<'a> {
    o: RefOpts,
    /// Per query head, or none.
    slopes: Option<&'a [f64]>,
    /// Dropout probability (0 = off) and keep(h, i, j).
    p: f64,
    keep: &'a dyn Fn(usize, usize, usize) -> bool,
}

/// Forward and backward of one sequence: q, dout `[sq, hq, d]`, k, v `[sk, hk, d]` (f64); `given_out` is
/// what the library's backward reads (for the D-term error bound). Returns out `[sq, hq, d]`, lse
/// `[hq, sq]`, P `[hq, sq, sk]` (0 where invisible) and the gradients with their magnitudes.
struct RefOut {
    out: Vec<f64>,
    lse: Vec<f64>,
    probs: Vec<f64>,
    g: RefGrads,
}

#[allow(clippy::too_many_arguments)]
fn reference(q: &[f64], k: &[f64], v: &[f64], dout: &[f64], given_out: &[f64], sq: usize, sk: usize, hq: usize, hk: usize, d: usize, c: &RefCase<'_>) -> RefOut {
    let z = |n: usize| vec![0.0f64; n];
    let (mut out, mut lse, mut probs) = (z(sq * hq * d), vec![f64::NEG_INFINITY; hq * sq], z(hq * sq * sk));
    let mut g = RefGrads { dq: z(sq * hq * d), dk: z(sk * hk * d), dv: z(sk * hk * d), dq_mag: z(sq * hq * d), dk_mag: z(sk * hk * d), dv_mag: z(sk * hk * d), dq_derr: z(sq * hq * d), dk_derr: z(sk * hk * d) };
    let o = &c.o;
    for h in 0..hq {
        let hkv = h / (hq / hk);
        for i in 0..sq {
            let keys: Vec<usize> = (0..sk).filter(|&j| visible(o, i, j, sq, sk)).collect();
            if keys.is_empty() {
                continue;
            }
            let qi = &q[(i * hq + h) * d..][..d];
            let gi = &dout[(i * hq + h) * d..][..d];
            let kj = |j: usize| &k[(j * hk + hkv) * d..][..d];
            let vj = |j: usize| &v[(j * hk + hkv) * d..][..d];
            let (s, ds_dx): (Vec<f64>, Vec<f64>) = keys
                .iter()
                .map(|&j| {
                    let x = o.scale * (0..d).map(|y| qi[y] * kj(j)[y]).sum::<f64>();
                    let (s, ds) = if o.softcap > 0.0 {
                        let t = (x / o.softcap).tanh();
                        (o.softcap * t, 1.0 - t * t)
                    } else {
                        (x, 1.0)
                    };
                    let bias = c.slopes.map_or(0.0, |sl| sl[h] * (i as f64 + sk as f64 - sq as f64 - j as f64).abs());
                    (s - bias, ds)
                })
                .unzip();
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = s.iter().map(|s| (s - max).exp()).sum();
            lse[h * sq + i] = max + sum.ln();
            let p: Vec<f64> = s.iter().map(|s| (s - max).exp() / sum).collect();
            let zf: Vec<f64> = keys.iter().map(|&j| if (c.keep)(h, i, j) { 1.0 / (1.0 - c.p) } else { 0.0 }).collect();
            let mut oi = vec![0.0f64; d];
            for (t, &j) in keys.iter().enumerate() {
                probs[(h * sq + i) * sk + j] = p[t];
                (0..d).for_each(|y| oi[y] += p[t] * zf[t] * vj(j)[y]);
            }
            out[(i * hq + h) * d..][..d].copy_from_slice(&oi);
            // Backward.
            let dp: Vec<f64> = keys.iter().enumerate().map(|(t, &j)| zf[t] * (0..d).map(|y| gi[y] * vj(j)[y]).sum::<f64>()).collect();
            let delta: f64 = (0..d).map(|y| gi[y] * oi[y]).sum();
            let d_abs: f64 = (0..d).map(|y| gi[y].abs() * oi[y].abs()).sum();
            let e_i: f64 = (0..d).map(|y| gi[y].abs() * (given_out[(i * hq + h) * d + y] - oi[y]).abs()).sum();
            for (t, &j) in keys.iter().enumerate() {
                let dx = p[t] * (dp[t] - delta) * ds_dx[t];
                let dp_abs: f64 = zf[t] * (0..d).map(|y| gi[y].abs() * vj(j)[y].abs()).sum::<f64>();
                let mag = o.scale.abs() * p[t] * (dp_abs + d_abs) * ds_dx[t];
                let derr = o.scale.abs() * p[t] * ds_dx[t] * e_i;
                for y in 0..d {
                    let (qa, ka) = ((i * hq + h) * d + y, (j * hk + hkv) * d + y);
                    g.dq[qa] += o.scale * dx * kj(j)[y];
                    g.dk[ka] += o.scale * dx * qi[y];
                    g.dv[ka] += p[t] * zf[t] * gi[y];
                    g.dq_mag[qa] += mag * kj(j)[y].abs();
                    g.dk_mag[ka] += mag * qi[y].abs();
                    g.dv_mag[ka] += p[t] * zf[t] * gi[y].abs();
                    g.dq_derr[qa] += derr * kj(j)[y].abs();
                    g.dk_derr[ka] += derr * qi[y].abs();
                }
            }
        }
    }
    RefOut { out, lse, probs, g }
}

/// The reference's P against the library's |s_dmask| (P = exp(s - lse): relative error of the score's
/// and the LSE's absolute errors).
fn check_probs(got: &[f32], want: &[f64], rel: f64) -> std::result::Result<(), String> {
    for (e, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w == 0.0 {
            if g != 0.0 {
                return Err(format!("s_dmask[{e}] = {g}, reference P 0"));
            }
            continue;
        }
        let g = g.abs() as f64;
        if !((g - w).abs() <= rel * w + 2f64.powi(-40)) {
            return Err(format!("|s_dmask[{e}]| = {g}, reference P {w}"));
        }
    }
    Ok(())
}

/// One gradient against the reference: |g - ref| <= u |ref| + tiny + (1 + 2u) (c mag + derr), exactly 0
/// where nothing enters (cpu_backward.rs).
fn check_grad(name: &str, got: &[f32], r: &[f64], mag: &[f64], derr: Option<&[f64]>, dtype: DType, c: f64) -> std::result::Result<(), String> {
    let u = unit_roundoff(dtype);
    let tiny = u * if dtype == DType::F16 { 2f64.powi(-14) } else { 2f64.powi(-126) };
    for (e, (&g, &r)) in got.iter().zip(r).enumerate() {
        let g = g as f64;
        let rest = c * mag[e] + derr.map_or(0.0, |x| x[e]);
        if r == 0.0 && rest == 0.0 {
            if g != 0.0 {
                return Err(format!("{name}[{e}] = {g}, must be exactly 0"));
            }
            continue;
        }
        let bound = u * r.abs() + tiny + (1.0 + 2.0 * u) * rest;
        if !(g.is_finite() && (g - r).abs() <= bound) {
            return Err(format!("{name}[{e}] = {g}, reference {r} (|diff| {:.3e}, tolerance {bound:.3e})", (g - r).abs()));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Cases

#[derive(Clone, Debug)]
enum Layout {
    Dense { b: usize, sq: usize, sk: usize },
    /// Per sequence (real_q, pad_q, real_k, pad_k); padding only with seqused.
    Varlen { seqs: Vec<(usize, usize, usize, usize)>, seqused: (bool, bool), extra_max: (usize, usize) },
}

#[derive(Clone, Debug)]
struct Case {
    dtype: DType,
    d: usize,
    heads: (usize, usize),
    opts: Opts,
    /// 0: no ALiBi; 1: slopes [Hq]; 2: slopes [B, Hq].
    alibi: u8,
    p: f32,
    seed: u64,
    offset: u64,
    data_seed: u64,
    layout: Layout,
}

fn short() -> impl Strategy<Value = usize> {
    prop_oneof![3 => 0usize..=9, 2 => 0usize..=70, 1 => 60usize..=130]
}

fn layout() -> impl Strategy<Value = Layout> {
    let dense = (0usize..=2, short(), short()).prop_map(|(b, sq, sk)| Layout::Dense { b, sq, sk });
    let seq = (short(), 0usize..=3, short(), 0usize..=3);
    let varlen = (proptest::collection::vec(seq, 0..=3), any::<(bool, bool)>(), (0usize..=2, 0usize..=2)).prop_map(|(seqs, seqused, extra_max)| Layout::Varlen { seqs, seqused, extra_max });
    prop_oneof![dense, varlen]
}

fn case() -> impl Strategy<Value = Case> {
    let p = prop_oneof![2 => Just(0.0f32), 1 => Just(0.5f32), 2 => 0.05f32..0.9];
    let d = proptest::sample::select(vec![32usize, 64, 128]);
    (dtype(), d, heads(), opts(), 0u8..3, p, any::<(u64, u64, u64)>(), layout()).prop_map(|(dtype, d, heads, opts, alibi, p, (seed, offset, data_seed), layout)| Case {
        dtype,
        d,
        heads,
        opts,
        alibi,
        p,
        seed,
        offset,
        data_seed,
        layout,
    })
}

/// A case made concrete: values, tensors, lengths.
struct Setup {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
    qt: Tensor,
    kt: Tensor,
    vt: Tensor,
    dout_t: Tensor,
    /// `[B, Hq]` row-major, whatever the tensor's shape.
    slopes: Vec<f32>,
    slopes_t: Option<Tensor>,
    cu_q: Vec<usize>,
    cu_k: Vec<usize>,
    real_q: Vec<usize>,
    real_k: Vec<usize>,
    tq: usize,
    max_q: usize,
    max_k: usize,
    varlen: Option<(Tensor, Tensor, Option<Tensor>, Option<Tensor>)>,
    opts: AttnOptions,
}

impl Setup {
    fn new(c: &Case) -> Setup {
        let (hq, hk, d) = (c.heads.0, c.heads.1, c.d);
        let mut rng = rng(c.data_seed);
        let (cu_q, cu_k, real_q, real_k, max_q, max_k, varlen) = match &c.layout {
            Layout::Dense { b, sq, sk } => (prefix((0..*b).map(|_| *sq)), prefix((0..*b).map(|_| *sk)), vec![*sq; *b], vec![*sk; *b], *sq, *sk, None),
            Layout::Varlen { seqs, seqused, extra_max } => {
                let slot = |real: usize, pad: usize, used: bool| if used { real + pad } else { real };
                let cu_q = prefix(seqs.iter().map(|s| slot(s.0, s.1, seqused.0)));
                let cu_k = prefix(seqs.iter().map(|s| slot(s.2, s.3, seqused.1)));
                let real_q: Vec<usize> = seqs.iter().map(|s| s.0).collect();
                let real_k: Vec<usize> = seqs.iter().map(|s| s.2).collect();
                let max_q = real_q.iter().copied().max().unwrap_or(0) + extra_max.0;
                let max_k = real_k.iter().copied().max().unwrap_or(0) + extra_max.1;
                let vl = (i32s(&cu_q), i32s(&cu_k), seqused.0.then(|| i32s(&real_q)), seqused.1.then(|| i32s(&real_k)));
                (cu_q, cu_k, real_q, real_k, max_q, max_k, Some(vl))
            }
        };
        let batch = real_q.len();
        let (tq, tk) = (*cu_q.last().unwrap(), *cu_k.last().unwrap());
        let q = random_values(&mut rng, tq * hq * d, 1.0, c.dtype);
        let k = random_values(&mut rng, tk * hk * d, 1.0, c.dtype);
        let v = random_values(&mut rng, tk * hk * d, 1.0, c.dtype);
        let dout = random_values(&mut rng, tq * hq * d, 1.0, c.dtype);
        let (q_shape, k_shape) = match varlen {
            None => (vec![batch, max_q, hq, d], vec![batch, max_k, hk, d]),
            Some(_) => (vec![tq, hq, d], vec![tk, hk, d]),
        };
        let strided = rng.r#gen::<[bool; 4]>();
        let qt = make_tensor(&q, &q_shape, c.dtype, strided[0], &mut rng);
        let kt = make_tensor(&k, &k_shape, c.dtype, strided[1], &mut rng);
        let vt = make_tensor(&v, &k_shape, c.dtype, strided[2], &mut rng);
        let dout_t = make_tensor(&dout, &q_shape, c.dtype, strided[3], &mut rng);
        // Slopes in [-0.25, 1] (negative ones too: a bias growing with distance), as ALiBi's 2^-x are.
        let per_head: Vec<f32> = (0..hq).map(|_| rng.gen_range(-0.25f32..1.0)).collect();
        let (slopes, slopes_t) = match c.alibi {
            1 => ((0..batch).flat_map(|_| per_head.clone()).collect(), Some(make_tensor(&per_head, &[hq], DType::F32, rng.gen_bool(0.5), &mut rng))),
            2 => {
                let s: Vec<f32> = (0..batch * hq).map(|_| rng.gen_range(-0.25f32..1.0)).collect();
                let t = make_tensor(&s, &[batch, hq], DType::F32, rng.gen_bool(0.5), &mut rng);
                (s, Some(t))
            }
            _ => (vec![0.0; batch * hq], None),
        };
        let opts = AttnOptions { dropout: Dropout { p: c.p, seed: c.seed, offset: c.offset }, ..c.opts.attn() };
        Setup { q, k, v, dout, qt, kt, vt, dout_t, slopes, slopes_t, cu_q, cu_k, real_q, real_k, tq, max_q, max_k, varlen, opts }
    }

    fn varlen(&self) -> Option<Varlen<'_>> {
        self.varlen.as_ref().map(|(cu_q, cu_k, used_q, used_k)| Varlen {
            cu_seqlens_q: cu_q,
            cu_seqlens_k: cu_k,
            max_seqlen_q: self.max_q,
            max_seqlen_k: self.max_k,
            seqused_q: used_q.as_ref(),
            seqused_k: used_k.as_ref(),
        })
    }

    fn extras(&self) -> Extras<'_> {
        Extras { alibi_slopes: self.slopes_t.as_ref(), return_attn_probs: true }
    }

    fn fwd(&self, opts: &AttnOptions) -> Result<FwdOutput> {
        match self.varlen() {
            None => fwd_with(&self.qt, &self.kt, &self.vt, &self.extras(), opts),
            Some(vl) => varlen_fwd_with(&self.qt, &self.kt, &self.vt, &vl, &self.extras(), opts),
        }
    }

    fn bwd(&self, f: &FwdOutput, opts: &AttnOptions) -> Result<BwdOutput> {
        match self.varlen() {
            None => bwd_with(&self.dout_t, &self.qt, &self.kt, &self.vt, &f.out, &f.lse, &self.extras(), opts, true),
            Some(vl) => varlen_bwd_with(&self.dout_t, &self.qt, &self.kt, &self.vt, &f.out, &f.lse, &vl, &self.extras(), opts, true),
        }
    }
}

fn run_case(c: &Case) -> std::result::Result<(), String> {
    let (hq, hk, d) = (c.heads.0, c.heads.1, c.d);
    let s = Setup::new(c);
    let f = s.fwd(&s.opts).map_err(|e| e.to_string())?;
    let g = s.bwd(&f, &s.opts).map_err(|e| e.to_string())?;
    let batch = s.real_q.len();
    let mask = f.s_dmask.as_ref().ok_or("no s_dmask")?;
    if mask.shape() != [batch, hq, s.max_q, s.max_k] || mask.dtype() != DType::F32 {
        return Err(format!("s_dmask: {:?} {}, expected [{batch}, {hq}, {}, {}] f32", mask.shape(), mask.dtype(), s.max_q, s.max_k));
    }
    let (out, lse, mask) = (f.out.to_f32_vec().unwrap(), f.lse.to_f32_vec().unwrap(), mask.to_f32_vec().unwrap());
    let (dq, dk, dv) = (g.dq.to_f32_vec().unwrap(), g.dk.to_f32_vec().unwrap(), g.dv.to_f32_vec().unwrap());
    let o = c.opts.reference(d);
    let at = |b: usize, h: usize, i: usize, j: usize| ((b * hq + h) * s.max_q + i) * s.max_k + j;
    let dropout = DropoutParams::new(c.p, c.seed, c.offset);
    for b in 0..batch {
        let (sq, sk, rq, rk) = (s.real_q[b], s.real_k[b], s.cu_q[b], s.cu_k[b]);
        // keep from s_dmask's sign, checked against the documented Philox counters.
        for h in 0..hq {
            for i in 0..sq {
                for j in 0..sk {
                    let m = mask[at(b, h, i, j)];
                    let documented = dropout.is_none() || documented_keep(c.p, c.seed, c.offset, (b * hq + h) as u64, i as u32, j as u32);
                    if visible(&o, i, j, sq, sk) && m.is_sign_negative() == documented {
                        return Err(format!("s_dmask[{b}, {h}, {i}, {j}] = {m}: the documented mask {} it", if documented { "keeps" } else { "drops" }));
                    }
                    if !visible(&o, i, j, sq, sk) && m.to_bits() != 0 {
                        return Err(format!("s_dmask[{b}, {h}, {i}, {j}] = {m}: a hidden key must be +0"));
                    }
                }
            }
        }
        let keep = |h: usize, i: usize, j: usize| !mask[at(b, h, i, j)].is_sign_negative();
        let slopes: Vec<f64> = s.slopes[b * hq..][..hq].iter().map(|&x| x as f64).collect();
        let rc = RefCase { o, slopes: s.slopes_t.as_ref().map(|_| &slopes[..]), p: c.p as f64, keep: &keep };
        let qr = rq * hq * d..(rq + sq) * hq * d;
        let kr = rk * hk * d..(rk + sk) * hk * d;
        let r = reference(&f64s(&s.q[qr.clone()]), &f64s(&s.k[kr.clone()]), &f64s(&s.v[kr.clone()]), &f64s(&s.dout[qr.clone()]), &f64s(&out[qr.clone()]), sq, sk, hq, hk, d, &rc);

        // Bounds: |score| <= |scale| D (q, k in [-1, 1]) or the softcap, plus the largest bias.
        let mut smax = o.scale.abs() * d as f64;
        if o.softcap > 0.0 {
            smax = smax.min(o.softcap);
        }
        smax += slopes.iter().fold(0.0f64, |a, x| a.max(x.abs())) * sq.max(sk) as f64 * f64::from(s.slopes_t.is_some());
        let zmax = 1.0 / (1.0 - c.p as f64);
        let tol = Tolerance::new(c.dtype, zmax, smax);
        let lse_b: Vec<f32> = (0..hq).flat_map(|h| if s.varlen.is_some() { lse[h * s.tq + rq..][..sq].to_vec() } else { lse[(b * hq + h) * sq..][..sq].to_vec() }).collect();
        check_close(&out[qr.clone()], &lse_b, &r.out, &r.lse, &tol).map_err(|e| format!("sequence {b}: {e}"))?;
        let probs_b: Vec<f32> = (0..hq).flat_map(|h| (0..sq).flat_map(move |i| (0..sk).map(move |j| (h, i, j)))).map(|(h, i, j)| mask[at(b, h, i, j)]).collect();
        check_probs(&probs_b, &r.probs, 2f64.powi(-18) * (1.0 + smax)).map_err(|e| format!("sequence {b}: {e}"))?;
        let rel = 2f64.powi(-19) * (1.0 + smax) + 2f64.powi(-16);
        check_grad("dq", &dq[qr.clone()], &r.g.dq, &r.g.dq_mag, Some(&r.g.dq_derr), c.dtype, rel).map_err(|e| format!("sequence {b}: {e}"))?;
        check_grad("dk", &dk[kr.clone()], &r.g.dk, &r.g.dk_mag, Some(&r.g.dk_derr), c.dtype, rel).map_err(|e| format!("sequence {b}: {e}"))?;
        check_grad("dv", &dv[kr], &r.g.dv, &r.g.dv_mag, None, c.dtype, rel).map_err(|e| format!("sequence {b}: {e}"))?;
        // Padding of s_dmask is exactly 0.
        for h in 0..hq {
            for i in 0..s.max_q {
                for j in 0..s.max_k {
                    if (i >= sq || j >= sk) && mask[at(b, h, i, j)].to_bits() != 0 {
                        return Err(format!("s_dmask[{b}, {h}, {i}, {j}] = {}: padding must be +0", mask[at(b, h, i, j)]));
                    }
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    /// ALiBi ([Hq] or [B, Hq]) and dropout, with every mask option (causal, window, softcap, scale),
    /// GQA / MQA, dense and varlen (seqused, slack in max_seqlen): out, lse, s_dmask and the gradients.
    #[test]
    fn matches_reference(c in case()) {
        run_case(&c).map_err(TestCaseError::fail)?;
    }
}
