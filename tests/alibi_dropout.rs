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
//! bitwise determinism, the paged and KV-cache paths, every bad input, and the CUDA target's checks
//! before anything is launched (tests/gpu_mods.rs runs the CUDA kernels against this CPU path).
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
    let counter = [(j / 16) * 4 + (j % 8) / 2, (i / 16) * 4 + (i % 8) / 2, sub as u32, (sub >> 32) as u32];
    let word = (2 * ((i % 2) ^ ((j / 16) % 2)) + ((j % 2) ^ ((i / 16) % 2))) as usize;
    let byte = (j / 8) % 2 + 2 * ((i / 8) % 2);
    let draw = (philox4x32_10(counter, key)[word] >> (8 * byte)) & 0xff;
    let threshold = ((1.0 - p as f64) * 256.0).round().clamp(1.0, 255.0) as u32;
    draw < threshold
}

#[test]
fn keep_threshold_and_scale() {
    // Round to nearest (0.9 * 256 = 230.4, 0.7 * 256 = 179.2, 0.3 * 256 = 76.8), at least 1 score in 256
    // dropped and 1 kept.
    for (p, t) in [(0.5f32, 128u32), (0.25, 192), (0.75, 64), (0.1, 230), (0.3, 179), (0.7, 77), (1.0 - f32::EPSILON / 2.0, 1), (0.999, 1), (1e-30, 255), (0.001, 255)] {
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
        let diff = (g - w).abs();
        if diff.is_nan() || diff > rel * w + 2f64.powi(-40) {
            return Err(format!("|s_dmask[{e}]| = {g}, reference P {w}"));
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
            max_seqlen_q: Some(self.max_q),
            max_seqlen_k: Some(self.max_k),
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
        let rc = RefMods { slopes: s.slopes_t.as_ref().map(|_| &slopes[..]), p: c.p as f64, keep: &keep };
        let qr = rq * hq * d..(rq + sq) * hq * d;
        let kr = rk * hk * d..(rk + sk) * hk * d;
        let r = reference_attention_full(&f64s(&s.q[qr.clone()]), &f64s(&s.k[kr.clone()]), &f64s(&s.v[kr.clone()]), &f64s(&s.dout[qr.clone()]), Some(&f64s(&out[qr.clone()])), sq, sk, hq, hk, d, &o, &rc);

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

// ---------------------------------------------------------------------------------------------------
// The mask's statistics and its dependence on seed, offset, sequence and head

/// Dense bf16 inputs `[b, s, h, d]` for q, k, v (and dout).
fn dense_inputs(rng: &mut StdRng, b: usize, s: usize, h: usize, d: usize) -> [Tensor; 4] {
    std::array::from_fn(|_| Tensor::from_f32(&random_values(rng, b * s * h * d, 1.0, DType::BF16), &[b, s, h, d], DType::BF16).unwrap())
}

fn probs_of(q: &Tensor, k: &Tensor, v: &Tensor, extras: &Extras<'_>, opts: &AttnOptions) -> (FwdOutput, Vec<f32>) {
    let o = fwd_with(q, k, v, &Extras { return_attn_probs: true, ..*extras }, opts).unwrap();
    let m = o.s_dmask.as_ref().unwrap().to_f32_vec().unwrap();
    (o, m)
}

fn dropout(p: f32, seed: u64, offset: u64) -> AttnOptions {
    AttnOptions { dropout: Dropout { p, seed, offset }, ..Default::default() }
}

#[test]
fn keep_rate_is_binomial() {
    let (seed, mut r) = seeded("keep_rate_is_binomial");
    let (b, s, h, d) = (2, 256, 4, 32);
    let [q, k, v, _] = dense_inputs(&mut r, b, s, h, d);
    for p in [0.1f32, 0.5, 0.9] {
        let (_, m) = probs_of(&q, &k, &v, &Extras::default(), &dropout(p, r.r#gen(), r.r#gen()));
        let keep_p = DropoutParams::new(p, 0, 0).unwrap().threshold as f64 / 256.0;
        assert!((keep_p - (1.0 - p as f64)).abs() <= 1.0 / 512.0, "p {p}: keep probability {keep_p}");
        // Overall, and per (i % 32, j % 32) class: each Philox word, byte and call position on its own (the
        // word depends on i / 16 and j / 16 being odd).
        let mut dropped = [0usize; 1024];
        for (e, x) in m.iter().enumerate() {
            let (i, j) = ((e / s) % s, e % s);
            dropped[(i % 32) * 32 + j % 32] += usize::from(x.is_sign_negative());
        }
        let check = |n: usize, count: usize, what: &str| {
            let mean = n as f64 * (1.0 - keep_p);
            let sigma = (n as f64 * keep_p * (1.0 - keep_p)).sqrt();
            assert!((count as f64 - mean).abs() <= 6.0 * sigma, "seed {seed}, p {p}, {what}: {count} of {n} dropped, expected {mean:.0} +- {sigma:.0}");
        };
        check(m.len(), dropped.iter().sum(), "all");
        for (class, &c) in dropped.iter().enumerate() {
            check(m.len() / 1024, c, &format!("class i%32 = {}, j%32 = {}", class / 32, class % 32));
        }
        // Heads draw independent masks: two heads agree on about p^2 + (1-p)^2 of their scores.
        let agree = (0..s * s).filter(|&e| m[e].is_sign_negative() == m[s * s + e].is_sign_negative()).count();
        let want = p as f64 * p as f64 + (1.0 - p as f64).powi(2);
        let sigma = (s as f64 * s as f64 * want * (1.0 - want)).sqrt();
        assert!((agree as f64 - want * (s * s) as f64).abs() <= 6.0 * sigma, "seed {seed}, p {p}: heads 0 and 1 agree on {agree} of {}", s * s);
    }
}

#[test]
fn seed_and_offset_select_the_mask() {
    let (seed, mut r) = seeded("seed_and_offset_select_the_mask");
    let (b, s, h, d) = (2, 40, 3, 64);
    let [q, k, v, _] = dense_inputs(&mut r, b, s, h, d);
    let (key, offset) = (r.r#gen::<u64>(), r.r#gen::<u64>() >> 1);
    let signs = |m: &[f32]| m.iter().map(|x| x.is_sign_negative()).collect::<Vec<_>>();
    let (o1, m1) = probs_of(&q, &k, &v, &Extras::default(), &dropout(0.3, key, offset));
    let (o2, m2) = probs_of(&q, &k, &v, &Extras::default(), &dropout(0.3, key, offset));
    assert_eq!(bits(&o1.out), bits(&o2.out), "seed {seed}: same (seed, offset), same out");
    assert_eq!(m1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), m2.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "seed {seed}: same (seed, offset), same s_dmask");
    let (o3, m3) = probs_of(&q, &k, &v, &Extras::default(), &dropout(0.3, key ^ 1, offset));
    let (_, m4) = probs_of(&q, &k, &v, &Extras::default(), &dropout(0.3, key, offset + 1000));
    assert_ne!(signs(&m1), signs(&m3), "seed {seed}: another seed, another mask");
    assert_ne!(bits(&o1.out), bits(&o3.out), "seed {seed}: another seed, another out");
    assert_ne!(signs(&m1), signs(&m4), "seed {seed}: another offset, another mask");
    // The subsequence is offset + b * Hq + h: one more offset is the next head's mask.
    let (_, m5) = probs_of(&q, &k, &v, &Extras::default(), &dropout(0.3, key, offset + 1));
    let head = |m: &[f32], bi: usize, hi: usize| signs(&m[(bi * h + hi) * s * s..][..s * s]);
    for (bi, hi) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        let (nb, nh) = if hi + 1 < h { (bi, hi + 1) } else { (bi + 1, 0) };
        assert_eq!(head(&m5, bi, hi), head(&m1, nb, nh), "seed {seed}: (b {bi}, h {hi}) at offset + 1 is (b {nb}, h {nh}) at offset");
    }
    // p = 0: no dropout whatever the seed, bitwise the call without it (and nothing negative).
    let (o6, m6) = probs_of(&q, &k, &v, &Extras::default(), &dropout(0.0, key, offset));
    let plain = fwd(&q, &k, &v, &AttnOptions::default()).unwrap();
    assert_eq!(bits(&o6.out), bits(&plain.out), "seed {seed}: p = 0 is no dropout");
    assert!(m6.iter().all(|x| !x.is_sign_negative()), "seed {seed}: p = 0 drops nothing");
}

/// Zero slopes and p = 0 give bitwise the plain forward and backward; the backward is bitwise
/// reproducible with dropout and ALiBi.
#[test]
fn neutral_settings_are_bitwise_plain_and_backward_is_deterministic() {
    let (seed, mut r) = seeded("neutral_settings_are_bitwise_plain");
    let (b, s, h, d) = (2, 70, 4, 64);
    let [q, k, v, dout] = dense_inputs(&mut r, b, s, h, d);
    let zeros = Tensor::from_f32(&vec![0.0; h], &[h], DType::F32).unwrap();
    let causal = AttnOptions { causal: true, dropout: Dropout { p: 0.0, seed: r.r#gen(), offset: 3 }, ..Default::default() };
    let neutral = Extras { alibi_slopes: Some(&zeros), return_attn_probs: false };
    let (a, p) = (fwd_with(&q, &k, &v, &neutral, &causal).unwrap(), fwd(&q, &k, &v, &AttnOptions { causal: true, ..Default::default() }).unwrap());
    assert_eq!((bits(&a.out), bits(&a.lse)), (bits(&p.out), bits(&p.lse)), "seed {seed}: forward");
    let ga = bwd_with(&dout, &q, &k, &v, &a.out, &a.lse, &neutral, &causal, false).unwrap();
    let gp = flash_attn::bwd(&dout, &q, &k, &v, &p.out, &p.lse, &AttnOptions { causal: true, ..Default::default() }, false).unwrap();
    assert_eq!([bits(&ga.dq), bits(&ga.dk), bits(&ga.dv)], [bits(&gp.dq), bits(&gp.dk), bits(&gp.dv)], "seed {seed}: backward");

    let slopes = Tensor::from_f32(&(0..b * h).map(|i| 0.5f32.powi(i as i32 % 8)).collect::<Vec<_>>(), &[b, h], DType::F32).unwrap();
    let extras = Extras { alibi_slopes: Some(&slopes), return_attn_probs: false };
    let opts = AttnOptions { window: (20, 3), softcap: 5.0, dropout: Dropout { p: 0.2, seed: r.r#gen(), offset: r.r#gen() }, ..Default::default() };
    let f = fwd_with(&q, &k, &v, &extras, &opts).unwrap();
    let g1 = bwd_with(&dout, &q, &k, &v, &f.out, &f.lse, &extras, &opts, true).unwrap();
    let g2 = bwd_with(&dout, &q, &k, &v, &f.out, &f.lse, &extras, &opts, false).unwrap();
    assert_eq!([bits(&g1.dq), bits(&g1.dk), bits(&g1.dv)], [bits(&g2.dq), bits(&g2.dk), bits(&g2.dv)], "seed {seed}: deterministic backward");
}

/// Sequence b of a packed call draws its mask as a call of its own at offset + b * Hq, with its row of
/// [B, Hq] slopes: bit for bit, forward, s_dmask and backward.
#[test]
fn packed_sequences_are_calls_at_shifted_offsets() {
    let (seed, mut r) = seeded("packed_sequences_are_calls_at_shifted_offsets");
    let (hq, hk, d) = (4, 2, 64);
    let lens: Vec<(usize, usize)> = (0..3).map(|_| (r.gen_range(1..90), r.gen_range(1..90))).collect();
    let (cu_q, cu_k) = (prefix(lens.iter().map(|l| l.0)), prefix(lens.iter().map(|l| l.1)));
    let (tq, tk) = (*cu_q.last().unwrap(), *cu_k.last().unwrap());
    let vals = |r: &mut StdRng, n: usize| random_values(r, n, 1.0, DType::F16);
    let (q, k, v, dout) = (vals(&mut r, tq * hq * d), vals(&mut r, tk * hk * d), vals(&mut r, tk * hk * d), vals(&mut r, tq * hq * d));
    let slopes: Vec<f32> = (0..3 * hq).map(|_| r.gen_range(0.0f32..0.5)).collect();
    let t = |x: &[f32], shape: &[usize]| Tensor::from_f32(x, shape, DType::F16).unwrap();
    let (cu_q_t, cu_k_t) = (i32s(&cu_q), i32s(&cu_k));
    let max = |v: Vec<usize>| v.into_iter().max().unwrap();
    let (max_q, max_k) = (max(lens.iter().map(|l| l.0).collect()), max(lens.iter().map(|l| l.1).collect()));
    let vl = Varlen { cu_seqlens_q: &cu_q_t, cu_seqlens_k: &cu_k_t, max_seqlen_q: Some(max_q), max_seqlen_k: Some(max_k), seqused_q: None, seqused_k: None };
    let slopes_t = Tensor::from_f32(&slopes, &[3, hq], DType::F32).unwrap();
    let extras = Extras { alibi_slopes: Some(&slopes_t), return_attn_probs: true };
    let opts = AttnOptions { causal: true, dropout: Dropout { p: 0.4, seed: r.r#gen(), offset: r.r#gen::<u64>() >> 1 }, ..Default::default() };
    let (qt, kt, vt, gt) = (t(&q, &[tq, hq, d]), t(&k, &[tk, hk, d]), t(&v, &[tk, hk, d]), t(&dout, &[tq, hq, d]));
    let f = varlen_fwd_with(&qt, &kt, &vt, &vl, &extras, &opts).unwrap();
    let g = varlen_bwd_with(&gt, &qt, &kt, &vt, &f.out, &f.lse, &vl, &extras, &opts, false).unwrap();
    let (out, lse, mask) = (bits(&f.out), bits(&f.lse), bits(f.s_dmask.as_ref().unwrap()));
    let (dq, dk, dv) = (bits(&g.dq), bits(&g.dk), bits(&g.dv));
    for (b, &(sq, sk)) in lens.iter().enumerate() {
        let one = |x: &[f32], row0: usize, n: usize, h: usize| t(&x[row0 * h * d..][..n * h * d], &[1, n, h, d]);
        let (q1, k1, v1, g1) = (one(&q, cu_q[b], sq, hq), one(&k, cu_k[b], sk, hk), one(&v, cu_k[b], sk, hk), one(&dout, cu_q[b], sq, hq));
        let s1 = Tensor::from_f32(&slopes[b * hq..][..hq], &[hq], DType::F32).unwrap();
        let e1 = Extras { alibi_slopes: Some(&s1), return_attn_probs: true };
        let o1 = AttnOptions { dropout: Dropout { offset: opts.dropout.offset + (b * hq) as u64, ..opts.dropout }, ..opts };
        let f1 = fwd_with(&q1, &k1, &v1, &e1, &o1).unwrap();
        let ctx = format!("seed {seed}, sequence {b} ({sq} x {sk})");
        assert_eq!(bits(&f1.out), out[cu_q[b] * hq * d..][..sq * hq * d], "{ctx}: out");
        let lse1: Vec<u32> = (0..hq).flat_map(|h| lse[h * tq + cu_q[b]..][..sq].to_vec()).collect();
        assert_eq!(bits(&f1.lse), lse1, "{ctx}: lse");
        let m1 = bits(f1.s_dmask.as_ref().unwrap());
        for h in 0..hq {
            for i in 0..sq {
                assert_eq!(m1[(h * sq + i) * sk..][..sk], mask[((b * hq + h) * max_q + i) * max_k..][..sk], "{ctx}: s_dmask head {h} row {i}");
            }
        }
        let g1 = bwd_with(&g1, &q1, &k1, &v1, &f1.out, &f1.lse, &e1, &o1, false).unwrap();
        assert_eq!(bits(&g1.dq), dq[cu_q[b] * hq * d..][..sq * hq * d], "{ctx}: dq");
        assert_eq!(bits(&g1.dk), dk[cu_k[b] * hk * d..][..sk * hk * d], "{ctx}: dk");
        assert_eq!(bits(&g1.dv), dv[cu_k[b] * hk * d..][..sk * hk * d], "{ctx}: dv");
    }
}

// ---------------------------------------------------------------------------------------------------
// Paged K/V and the KV cache

/// ALiBi, dropout and s_dmask over paged K/V are bitwise the contiguous varlen call; ALiBi in the
/// KV-cache forward is the dense call over each row's cache entries (unsplit: bitwise; split: close).
#[test]
fn paged_and_kvcache_paths() {
    let (seed, mut r) = seeded("paged_and_kvcache_paths");
    let (hq, hk, d, page) = (4, 2, 64, 16);
    let lens = [(5usize, 40usize), (33, 17)];
    let (cu_q, cu_k) = (prefix(lens.iter().map(|l| l.0)), prefix(lens.iter().map(|l| l.1)));
    let (tq, tk) = (cu_q[2], cu_k[2]);
    let q = random_values(&mut r, tq * hq * d, 1.0, DType::BF16);
    let k = random_values(&mut r, tk * hk * d, 1.0, DType::BF16);
    let v = random_values(&mut r, tk * hk * d, 1.0, DType::BF16);
    // Pages: sequence b's keys in blocks listed by block_table row b (blocks in reverse order).
    let blocks: Vec<usize> = lens.iter().map(|l| l.1.div_ceil(page)).collect();
    let num_blocks = blocks.iter().sum::<usize>();
    let (mut kp, mut vp) = (vec![0.0f32; num_blocks * page * hk * d], vec![0.0f32; num_blocks * page * hk * d]);
    let mut table = vec![0i32; 2 * 3];
    let mut next = num_blocks;
    for (b, l) in lens.iter().enumerate() {
        for i in 0..blocks[b] {
            next -= 1;
            table[b * 3 + i] = next as i32;
        }
        for t in 0..l.1 {
            let dst = (table[b * 3 + t / page] as usize * page + t % page) * hk * d;
            kp[dst..dst + hk * d].copy_from_slice(&k[(cu_k[b] + t) * hk * d..][..hk * d]);
            vp[dst..dst + hk * d].copy_from_slice(&v[(cu_k[b] + t) * hk * d..][..hk * d]);
        }
    }
    let bf = |x: &[f32], shape: &[usize]| Tensor::from_f32(x, shape, DType::BF16).unwrap();
    let slopes = Tensor::from_f32(&[0.5, 0.25, 0.125, 0.0625], &[hq], DType::F32).unwrap();
    let extras = Extras { alibi_slopes: Some(&slopes), return_attn_probs: true };
    let opts = AttnOptions { window: (9, 2), dropout: Dropout { p: 0.25, seed: r.r#gen(), offset: 7 }, ..Default::default() };
    let (cu_q_t, cu_k_t, table_t) = (i32s(&cu_q), i32s(&cu_k), Tensor::from_i32(table, &[2, 3]).unwrap());
    let vl = Varlen { cu_seqlens_q: &cu_q_t, cu_seqlens_k: &cu_k_t, max_seqlen_q: Some(33), max_seqlen_k: Some(40), seqused_q: None, seqused_k: None };
    let contiguous = varlen_fwd_with(&bf(&q, &[tq, hq, d]), &bf(&k, &[tk, hk, d]), &bf(&v, &[tk, hk, d]), &vl, &extras, &opts).unwrap();
    let pv = PagedVarlen { cu_seqlens_q: &cu_q_t, cu_seqlens_k: Some(&cu_k_t), max_seqlen_q: Some(33), max_seqlen_k: Some(40), seqused_q: None, seqused_k: None, block_table: &table_t };
    let paged = varlen_fwd_paged_with(&bf(&q, &[tq, hq, d]), &bf(&kp, &[num_blocks, page, hk, d]), &bf(&vp, &[num_blocks, page, hk, d]), &pv, &extras, &opts).unwrap();
    for (name, a, b) in [("out", &paged.out, &contiguous.out), ("lse", &paged.lse, &contiguous.lse), ("s_dmask", paged.s_dmask.as_ref().unwrap(), contiguous.s_dmask.as_ref().unwrap())] {
        assert_eq!(bits(a), bits(b), "seed {seed}: paged {name}");
    }

    // KV cache: B = 2 rows of 24 valid entries in a cache of 32, Sq = 3, causal, [B, Hq] slopes.
    let (b, sq, cap, valid) = (2, 3, 32, 24);
    let qd = random_values(&mut r, b * sq * hq * d, 1.0, DType::BF16);
    let kc = random_values(&mut r, b * cap * hk * d, 1.0, DType::BF16);
    let vc = random_values(&mut r, b * cap * hk * d, 1.0, DType::BF16);
    let slopes2 = Tensor::from_f32(&(0..b * hq).map(|i| 1.0 / (i + 2) as f32).collect::<Vec<_>>(), &[b, hq], DType::F32).unwrap();
    let seqlens = i32s(&[valid; 2]);
    let causal = AttnOptions { causal: true, ..Default::default() };
    let cache = KvCache { alibi_slopes: Some(&slopes2), ..KvCache::new(&seqlens) };
    let crop = |x: &[f32]| -> Vec<f32> { (0..b).flat_map(|bi| x[bi * cap * hk * d..][..valid * hk * d].to_vec()).collect() };
    let dense = fwd_with(&bf(&qd, &[b, sq, hq, d]), &bf(&crop(&kc), &[b, valid, hk, d]), &bf(&crop(&vc), &[b, valid, hk, d]), &Extras { alibi_slopes: Some(&slopes2), return_attn_probs: false }, &causal).unwrap();
    for splits in [1, 3] {
        let (mut kt, mut vt) = (bf(&kc, &[b, cap, hk, d]), bf(&vc, &[b, cap, hk, d]));
        let o = fwd_kvcache(&bf(&qd, &[b, sq, hq, d]), &mut kt, &mut vt, &cache, &causal, &KvCacheOptions { num_splits: splits, ..Default::default() }).unwrap();
        if splits == 1 {
            assert_eq!((bits(&o.out), bits(&o.lse)), (bits(&dense.out), bits(&dense.lse)), "seed {seed}: KV cache with ALiBi, unsplit");
        } else {
            let (a, w) = (o.out.to_f32_vec().unwrap(), dense.out.to_f32_vec().unwrap());
            assert!(a.iter().zip(&w).all(|(x, y)| (x - y).abs() <= 2f32.powi(-7) * y.abs() + 2f32.powi(-12)), "seed {seed}: KV cache with ALiBi, {splits} splits");
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Bad input

#[test]
fn bad_inputs_are_typed_errors() {
    let (b, s, h, d) = (2, 8, 4, 32);
    let mut r = rng(1);
    let [q, k, v, dout] = dense_inputs(&mut r, b, s, h, d);
    let o = AttnOptions::default();
    let f32s = |shape: &[usize]| Tensor::from_f32(&vec![0.5; shape.iter().product()], shape, DType::F32).unwrap();
    let with = |t: &Tensor| fwd_with(&q, &k, &v, &Extras { alibi_slopes: Some(t), return_attn_probs: false }, &o);
    let shape_err = |e: &Error| matches!(e, Error::Shape { arg: "alibi_slopes", .. });
    expect_err(with(&f32s(&[h + 1])), shape_err, "alibi_slopes");
    expect_err(with(&f32s(&[b + 1, h])), shape_err, "alibi_slopes");
    expect_err(with(&f32s(&[1, b, h])), shape_err, "alibi_slopes");
    expect_err(with(&f32s(&[])), shape_err, "alibi_slopes");
    expect_err(with(&Tensor::from_f32(&[0.5; 4], &[h], DType::BF16).unwrap()), |e| matches!(e, Error::DType { arg: "alibi_slopes", .. }), "alibi_slopes");
    let strided = f32s(&[2 * h]).as_strided(&[h], &[2], 0).unwrap();
    expect_err(with(&strided), |e| matches!(e, Error::NotContiguous { arg: "alibi_slopes" }), "alibi_slopes");
    for bad in [f32::NAN, f32::INFINITY] {
        let t = Tensor::from_f32(&[0.5, bad, 0.5, 0.5], &[h], DType::F32).unwrap();
        expect_err(with(&t), |e| matches!(e, Error::Value { arg: "alibi_slopes", .. }), "alibi_slopes");
    }
    let slopes_gpu_less = f32s(&[h]);
    let extras = Extras { alibi_slopes: Some(&slopes_gpu_less), return_attn_probs: false };
    for p in [1.0f32, 1.5, -0.1, f32::NAN, f32::INFINITY] {
        let opts = AttnOptions { dropout: Dropout { p, seed: 1, offset: 0 }, ..o };
        expect_err(fwd(&q, &k, &v, &opts), |e| matches!(e, Error::Value { arg: "dropout_p", .. }), "dropout_p");
        expect_err(bwd_with(&dout, &q, &k, &v, &dout, &f32s(&[b, h, s]), &extras, &opts, false), |e| matches!(e, Error::Value { arg: "dropout_p", .. }), "dropout_p");
    }
    // The backward checks the slopes too.
    let lse = f32s(&[b, h, s]);
    let bad = Extras { alibi_slopes: Some(&f32s(&[3])), return_attn_probs: false };
    expect_err(bwd_with(&dout, &q, &k, &v, &dout, &lse, &bad, &o, false), shape_err, "alibi_slopes");
    // The KV cache takes no dropout.
    let seqlens = i32s(&[4, 4]);
    let (mut kc, mut vc) = (k.clone(), v.clone());
    let opts = AttnOptions { dropout: Dropout { p: 0.1, seed: 1, offset: 0 }, ..o };
    expect_err(fwd_kvcache(&q, &mut kc, &mut vc, &KvCache::new(&seqlens), &opts, &KvCacheOptions::default()), |e| matches!(e, Error::Value { arg: "dropout_p", .. }), "dropout_p");

    // Raw: s_dmask of the wrong shape or dtype, or overlapping another tensor.
    let (n, m) = (b * s * h * d, b * h * s * s);
    let buf = vec![0.0f32; 4 * n + m + 64];
    let (sh, ls, ms) = (leak(vec![b, s, h, d]), leak(vec![b, h, s]), leak(vec![b, h, s, s]));
    let at = |i: usize| View { addr: buf.as_ptr() as u64 + (i * n * 2) as u64, dtype: DType::BF16, shape: sh, strides: leak(contiguous(sh)) };
    let lse_v = View { addr: buf.as_ptr() as u64 + (4 * n * 2) as u64, dtype: DType::F32, shape: ls, strides: leak(contiguous(ls)) };
    let mask = View { addr: buf.as_ptr() as u64 + (2 * 4 * n) as u64 + 4096, dtype: DType::F32, shape: ms, strides: leak(contiguous(ms)) };
    let good = raw::FwdViews { q: at(0), k: at(1), v: at(2), out: at(3), lse: lse_v, alibi_slopes: None, s_dmask: Some(mask) };
    let run = |t: raw::FwdViews<'_>| unsafe { raw::fwd(&t, &o, Target::Cpu) };
    run(good).unwrap();
    let wrong = leak(vec![b, h, s, s + 1]);
    expect_err(run(raw::FwdViews { s_dmask: Some(View { shape: wrong, strides: leak(contiguous(wrong)), ..mask }), ..good }), |e| matches!(e, Error::Shape { arg: "s_dmask", .. }), "s_dmask");
    expect_err(run(raw::FwdViews { s_dmask: Some(View { dtype: DType::F16, ..mask }), ..good }), |e| matches!(e, Error::DType { arg: "s_dmask", .. }), "s_dmask");
    // (Two outputs overlapping: the first one is named, the other in the message.)
    expect_err(run(raw::FwdViews { s_dmask: Some(View { addr: at(3).addr, ..mask }), ..good }), |e| matches!(e, Error::Value { arg: "out", .. }), "s_dmask");
    expect_err(run(raw::FwdViews { s_dmask: Some(View { addr: at(0).addr, ..mask }), ..good }), |e| matches!(e, Error::Value { arg: "s_dmask", .. }), "s_dmask");
    let slopes_v = View { addr: at(3).addr, dtype: DType::F32, shape: leak(vec![h]), strides: leak(vec![1]) };
    expect_err(run(raw::FwdViews { alibi_slopes: Some(slopes_v), s_dmask: None, ..good }), |e| matches!(e, Error::Value { arg: "out", .. }), "alibi_slopes");
}

/// On CUDA a call asking for ALiBi, dropout or the probabilities runs the kernels (tests/gpu_mods.rs);
/// its arguments are checked first, so bad ones are the same errors as on the CPU, plus what the CUDA
/// path alone needs (the probabilities kernel's grid), before any device is touched: no GPU needed (these
/// addresses are never read), and on a GPU machine nothing is launched either.
#[test]
fn cuda_target_checks_before_launching() {
    let (b, s, h, d) = (1, 16, 2, 64);
    let (sh, ls, ms) = (leak(vec![b, s, h, d]), leak(vec![b, h, s]), leak(vec![b, h, s, s]));
    let at = |i: u64, shape: &'static [usize], dtype: DType| View { addr: (i + 1) << 24, dtype, shape, strides: leak(contiguous(shape)) };
    let t = |i: u64| at(i, sh, DType::BF16);
    let slopes = at(10, leak(vec![h]), DType::F32);
    let fv = raw::FwdViews { q: t(0), k: t(1), v: t(2), out: t(3), lse: at(4, ls, DType::F32), alibi_slopes: Some(slopes), s_dmask: None };
    let cuda = Target::Cuda { ordinal: 0, stream: 0 };
    let o = dropout(0.1, 1, 2);
    let fwd_err = |t: raw::FwdViews<'_>| unsafe { raw::fwd(&t, &o, cuda) };
    // Slopes: dtype, shape, layout.
    expect_err(fwd_err(raw::FwdViews { alibi_slopes: Some(View { dtype: DType::I32, ..slopes }), ..fv }), |e| matches!(e, Error::DType { arg: "alibi_slopes", .. }), "alibi_slopes");
    expect_err(fwd_err(raw::FwdViews { alibi_slopes: Some(at(10, leak(vec![h + 1]), DType::F32)), ..fv }), |e| matches!(e, Error::Shape { arg: "alibi_slopes", .. }), "alibi_slopes");
    expect_err(fwd_err(raw::FwdViews { alibi_slopes: Some(View { strides: leak(vec![2]), ..slopes }), ..fv }), |e| matches!(e, Error::NotContiguous { arg: "alibi_slopes" }), "alibi_slopes");
    expect_err(fwd_err(raw::FwdViews { alibi_slopes: Some(View { addr: slopes.addr + 2, ..slopes }), ..fv }), |e| matches!(e, Error::Value { arg: "alibi_slopes", .. }), "alibi_slopes");
    // s_dmask: shape, dtype, the probabilities kernel's layout (last dimension contiguous, elements
    // aligned), overlap with an input.
    let mask = at(5, ms, DType::F32);
    let with_mask = |m: View<'static>| raw::FwdViews { s_dmask: Some(m), ..fv };
    expect_err(fwd_err(with_mask(at(5, leak(vec![b, h, s, s + 1]), DType::F32))), |e| matches!(e, Error::Shape { arg: "s_dmask", .. }), "s_dmask");
    expect_err(fwd_err(with_mask(View { dtype: DType::F16, ..mask })), |e| matches!(e, Error::DType { arg: "s_dmask", .. }), "s_dmask");
    expect_err(fwd_err(with_mask(View { strides: leak(vec![h * s * s * 2, s * s * 2, s * 2, 2]), ..mask })), |e| matches!(e, Error::NotContiguous { arg: "s_dmask" }), "s_dmask");
    expect_err(fwd_err(with_mask(View { addr: mask.addr + 2, ..mask })), |e| matches!(e, Error::Value { arg: "s_dmask", .. }), "s_dmask");
    expect_err(fwd_err(with_mask(View { addr: fv.q.addr, ..mask })), |e| matches!(e, Error::Value { arg: "s_dmask", .. }), "s_dmask");
    // The probabilities kernel has a grid z index per (sequence, head): at most 65535 of them.
    let (bb, hh) = (300, 256);
    let (bsh, bls, bms) = (leak(vec![bb, 1, hh, 32]), leak(vec![bb, hh, 1]), leak(vec![bb, hh, 1, 1]));
    let big = |i: u64| at(i * 64, bsh, DType::BF16);
    let bfv = raw::FwdViews { q: big(0), k: big(1), v: big(2), out: big(3), lse: at(4 * 64, bls, DType::F32), alibi_slopes: None, s_dmask: Some(at(5 * 64, bms, DType::F32)) };
    expect_err(fwd_err(bfv), |e| matches!(e, Error::TooLarge { arg: "s_dmask", .. }), "65535");
    // Backward and paged forward: the slopes and the dropout probability are checked there too.
    let bv = raw::BwdViews { dout: t(5), q: t(0), k: t(1), v: t(2), out: t(3), lse: fv.lse, dq: t(6), dk: t(7), dv: t(8), alibi_slopes: Some(View { dtype: DType::F16, ..slopes }) };
    let ws = Workspace { addr: 1 << 40, bytes: raw::bwd_workspace_bytes(sh, false).unwrap() };
    expect_err(unsafe { raw::bwd(&bv, &o, false, ws, cuda) }, |e| matches!(e, Error::DType { arg: "alibi_slopes", .. }), "alibi_slopes");
    expect_err(unsafe { raw::bwd(&raw::BwdViews { alibi_slopes: None, ..bv }, &dropout(1.5, 1, 2), false, ws, cuda) }, |e| matches!(e, Error::Value { arg: "dropout_p", .. }), "dropout_p");
    let packed = |i: u64| at(i, leak(vec![s, h, d]), DType::BF16);
    let (pages, i32v) = (leak(vec![2, 8, h, d]), |i: u64, shape: Vec<usize>| at(i, leak(shape), DType::I32));
    let pv = raw::FwdViews { q: packed(0), k: at(1, pages, DType::BF16), v: at(2, pages, DType::BF16), out: packed(3), lse: at(4, leak(vec![h, s]), DType::F32), alibi_slopes: Some(at(10, leak(vec![b + 1, h]), DType::F32)), s_dmask: None };
    let paged = raw::PagedVarlenViews { cu_seqlens_q: i32v(11, vec![b + 1]), cu_seqlens_k: Some(i32v(12, vec![b + 1])), max_seqlen_q: Some(s), max_seqlen_k: Some(s), seqused_q: None, seqused_k: None, block_table: i32v(13, vec![b, 2]) };
    expect_err(unsafe { raw::varlen_fwd_paged(&pv, &paged, &o, cuda) }, |e| matches!(e, Error::Shape { arg: "alibi_slopes", .. }), "alibi_slopes");
    let _ = Device::Cpu;
}

fn leak<T>(v: Vec<T>) -> &'static [T] {
    Box::leak(v.into_boxed_slice())
}

fn contiguous(shape: &[usize]) -> Vec<usize> {
    let mut st = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        st[i] = st[i + 1] * shape[i + 1];
    }
    st
}
