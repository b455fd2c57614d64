//! The CPU backward against an f64 reference written from the definition (itself checked against finite
//! differences), over random dense and varlen layouts, masks, softcaps, GQA ratios, dtypes and head dims;
//! plus packing independence and determinism (both bitwise) and validate_bwd's errors.
//!
//! Tolerances. Inputs are generated already rounded to bf16/f16, and the library's backward is given the
//! library's own forward out and LSE, as in training. The library works in f32 and rounds each gradient
//! to the input dtype once at the end, so for every element
//!   |g - ref| <= u |ref| + tiny + (1 + 2u) (c * mag + derr),
//! where u is the dtype's unit roundoff (2^-8 bf16, 2^-11 f16) for the final rounding and tiny = u times
//! the smallest normal (f16 gradients can land among the subnormals). `mag` (from the reference) sums the
//! magnitudes of everything entering the element, the scale of its f32 error; c = 2^-19 (1 + smax) +
//! 2^-16 covers the relative error of the recomputed P (the score's and the forward LSE's absolute errors
//! grow with smax, which bounds |score|, as in cpu_reference.rs) and of f32 sums of up to a few hundred
//! terms (dot products over D <= 256, sums over the keys or queries of a sequence). `derr` is not f32
//! error but the algorithm's: D_i = dout_i . out_i is formed from the forward's out *rounded to the input
//! dtype*, and the reference bounds exactly how far that moves dq and dk. dv has no such term.
//! Gradient elements whose reference, magnitude and derr are all 0 (rows or keys of no sequence, keys no
//! query sees, rows that see no key) must be exactly 0. With FA_TEST_VERBOSE=1 the tests print the worst
//! |diff| / tolerance per gradient.

#[path = "common/mod.rs"]
mod common;

use common::*;
use flash_attn::{bwd, fwd, varlen_bwd, varlen_fwd, AttnOptions, BwdOutput, DType, Device, Error, Result, Tensor, Varlen};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

// ---------------------------------------------------------------------------------------------------
// (a) The reference itself against central differences in f64.

/// L = sum(dout * out) on f64 inputs.
#[allow(clippy::too_many_arguments)]
fn loss(q: &[f64], k: &[f64], v: &[f64], dout: &[f64], sq: usize, sk: usize, hq: usize, hk: usize, d: usize, o: &RefOpts) -> f64 {
    let (out, _) = reference_attention_f64(q, k, v, sq, sk, hq, hk, d, o);
    out.iter().zip(dout).map(|(a, b)| a * b).sum()
}

#[test]
fn reference_gradients_match_finite_differences() {
    let cases = [
        // Sq > Sk causal (the first rows see nothing) with a left window, softcap and GQA.
        (6, 5, 4, 2, RefOpts { scale: 0.9, softcap: 1.5, causal: true, window: (2, -1) }),
        // Sq < Sk, a two-sided window, softcap and MQA.
        (4, 9, 3, 1, RefOpts { scale: -0.6, softcap: 2.0, causal: false, window: (3, 1) }),
        // No mask, no softcap.
        (5, 6, 2, 2, RefOpts { scale: 0.5, softcap: 0.0, causal: false, window: (-1, -1) }),
    ];
    let d = 3;
    let mut r = rng(7);
    let mut uniform = |n: usize| -> Vec<f64> { (0..n).map(|_| rand::Rng::gen_range(&mut r, -1.5..1.5)).collect() };
    for (sq, sk, hq, hk, o) in cases {
        let (q, k, v, dout) = (uniform(sq * hq * d), uniform(sk * hk * d), uniform(sk * hk * d), uniform(sq * hq * d));
        let g = reference_attention_bwd(&q, &k, &v, &dout, None, sq, sk, hq, hk, d, &o);
        let l = |q: &[f64], k: &[f64], v: &[f64]| loss(q, k, v, &dout, sq, sk, hq, hk, d, &o);
        let h = 1e-5;
        let shifted = |x: &[f64], dir: &[f64], t: f64| -> Vec<f64> { x.iter().zip(dir).map(|(x, r)| x + t * r).collect() };
        // A random direction for each input: the directional derivative is sum(R * grad).
        let (rq, rk, rv) = (uniform(q.len()), uniform(k.len()), uniform(v.len()));
        let fd_q = (l(&shifted(&q, &rq, h), &k, &v) - l(&shifted(&q, &rq, -h), &k, &v)) / (2.0 * h);
        let fd_k = (l(&q, &shifted(&k, &rk, h), &v) - l(&q, &shifted(&k, &rk, -h), &v)) / (2.0 * h);
        let fd_v = (l(&q, &k, &shifted(&v, &rv, h)) - l(&q, &k, &shifted(&v, &rv, -h))) / (2.0 * h);
        let proj = |r: &[f64], g: &[f64]| r.iter().zip(g).map(|(a, b)| a * b).sum::<f64>();
        // Central differences err by O(h^2) ~ 1e-10 here, rounding by ~1e-16 / h ~ 1e-11.
        for (name, fd, an) in [("dq", fd_q, proj(&rq, &g.dq)), ("dk", fd_k, proj(&rk, &g.dk)), ("dv", fd_v, proj(&rv, &g.dv))] {
            assert!((fd - an).abs() <= 1e-7 * (1.0 + an.abs()), "{name} (sq {sq} sk {sk}): finite difference {fd}, reference {an}");
            assert!(an.abs() > 1e-3, "{name}: a vanishing projection checks nothing");
        }
        // And element by element: every entry, masked rows (exactly 0) included.
        for (name, x, grad) in [("dq", 0, &g.dq), ("dk", 1, &g.dk), ("dv", 2, &g.dv)] {
            for e in 0..grad.len() {
                let mut plus = [q.clone(), k.clone(), v.clone()];
                let mut minus = plus.clone();
                plus[x][e] += h;
                minus[x][e] -= h;
                let fd = (l(&plus[0], &plus[1], &plus[2]) - l(&minus[0], &minus[1], &minus[2])) / (2.0 * h);
                assert!((fd - grad[e]).abs() <= 1e-7 * (1.0 + grad[e].abs()), "{name}[{e}]: finite difference {fd}, reference {}", grad[e]);
            }
        }
        if o.causal && sq > sk {
            assert!(g.dq[..hq * d].iter().all(|&x| x == 0.0), "row 0 sees no key: dq must be exactly 0");
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// (b) The library against the reference.

// dout is within [-1, 1]; q, k and v take their ranges from `amp()` (common/).

/// Shorter than the forward's sequences: the f64 reference backward does several times its work.
fn bwd_seqlen() -> impl Strategy<Value = usize> {
    prop_oneof![3 => 0usize..=9, 2 => 0usize..=80, 1 => 60usize..=150]
}

/// Dense `[b, sq/sk, ..]`, or packed sequences (real_q, pad_q, real_k, pad_k) where padding rows exist
/// only with seqused, plus tail rows after the last sequence and slack in max_seqlen.
#[derive(Clone, Debug)]
enum Layout {
    Dense { b: usize, sq: usize, sk: usize },
    Varlen { seqs: Vec<(usize, usize, usize, usize)>, seqused: (bool, bool), tail: (usize, usize), extra_max: (usize, usize) },
}

#[derive(Clone, Debug)]
struct Case {
    dtype: DType,
    d: usize,
    heads: (usize, usize),
    opts: Opts,
    amp: Amp,
    /// q, k, v, dout, out stored with random strides and offsets.
    strided: [bool; 5],
    seed: u64,
    layout: Layout,
}

fn dense_layout() -> impl Strategy<Value = Layout> {
    (0usize..=3, bwd_seqlen(), bwd_seqlen()).prop_map(|(b, sq, sk)| Layout::Dense { b, sq, sk })
}

fn varlen_layout() -> impl Strategy<Value = Layout> {
    let seq = (bwd_seqlen(), 0usize..=3, bwd_seqlen(), 0usize..=3);
    (proptest::collection::vec(seq, 0..=3), any::<(bool, bool)>(), (0usize..=5, 0usize..=5), (0usize..=3, 0usize..=3))
        .prop_map(|(seqs, seqused, tail, extra_max)| Layout::Varlen { seqs, seqused, tail, extra_max })
}

fn case(layout: impl Strategy<Value = Layout>) -> impl Strategy<Value = Case> {
    let head_dim = proptest::sample::select(vec![32usize, 64, 128, 256]);
    (dtype(), head_dim, heads(), opts(), amp(), any::<[bool; 5]>(), any::<u64>(), layout)
        .prop_map(|(dtype, d, heads, opts, amp, strided, seed, layout)| Case { dtype, d, heads, opts, amp, strided, seed, layout })
}

/// A case made concrete: logical values, tensors, lengths, and the forward's out and LSE.
struct Setup {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
    out: Vec<f32>,
    qt: Tensor,
    kt: Tensor,
    vt: Tensor,
    dout_t: Tensor,
    out_t: Tensor,
    lse_t: Tensor,
    /// Sequence b: rows cu_q[b].. (real_q[b] of them) of q, cu_k[b].. (real_k[b]) of k and v.
    cu_q: Vec<usize>,
    cu_k: Vec<usize>,
    real_q: Vec<usize>,
    real_k: Vec<usize>,
    tq: usize,
    varlen: Option<VarlenTensors>,
}

struct VarlenTensors {
    cu_q: Tensor,
    cu_k: Tensor,
    used_q: Option<Tensor>,
    used_k: Option<Tensor>,
    max_q: usize,
    max_k: usize,
}

impl VarlenTensors {
    fn get(&self) -> Varlen<'_> {
        Varlen { cu_seqlens_q: &self.cu_q, cu_seqlens_k: &self.cu_k, max_seqlen_q: Some(self.max_q), max_seqlen_k: Some(self.max_k), seqused_q: self.used_q.as_ref(), seqused_k: self.used_k.as_ref() }
    }
}

fn prefix(lens: impl Iterator<Item = usize>) -> Vec<usize> {
    std::iter::once(0).chain(lens.scan(0, |acc, l| { *acc += l; Some(*acc) })).collect()
}

fn i32s(x: &[usize]) -> Tensor {
    Tensor::from_i32(x.iter().map(|&l| l as i32).collect(), &[x.len()]).unwrap()
}

impl Setup {
    fn new(c: &Case) -> Setup {
        let (hq, hk, d) = (c.heads.0, c.heads.1, c.d);
        let (cu_q, cu_k, real_q, real_k, tq, tk, varlen) = match &c.layout {
            Layout::Dense { b, sq, sk } => {
                let (b, sq, sk) = (*b, *sq, *sk);
                (prefix((0..b).map(|_| sq)), prefix((0..b).map(|_| sk)), vec![sq; b], vec![sk; b], b * sq, b * sk, None)
            }
            Layout::Varlen { seqs, seqused, tail, extra_max } => {
                let slot = |real: usize, pad: usize, used: bool| if used { real + pad } else { real };
                let cu_q = prefix(seqs.iter().map(|s| slot(s.0, s.1, seqused.0)));
                let cu_k = prefix(seqs.iter().map(|s| slot(s.2, s.3, seqused.1)));
                let real_q: Vec<usize> = seqs.iter().map(|s| s.0).collect();
                let real_k: Vec<usize> = seqs.iter().map(|s| s.2).collect();
                let vt = VarlenTensors {
                    cu_q: i32s(&cu_q),
                    cu_k: i32s(&cu_k),
                    used_q: seqused.0.then(|| i32s(&real_q)),
                    used_k: seqused.1.then(|| i32s(&real_k)),
                    max_q: real_q.iter().copied().max().unwrap_or(0) + extra_max.0,
                    max_k: real_k.iter().copied().max().unwrap_or(0) + extra_max.1,
                };
                let (tq, tk) = (cu_q.last().unwrap() + tail.0, cu_k.last().unwrap() + tail.1);
                (cu_q, cu_k, real_q, real_k, tq, tk, Some(vt))
            }
        };
        let batch = real_q.len();
        let mut rng = rng(c.seed);
        let q = random_values(&mut rng, tq * hq * d, c.amp.q, c.dtype);
        let k = random_values(&mut rng, tk * hk * d, c.amp.k, c.dtype);
        let v = random_values(&mut rng, tk * hk * d, c.amp.v, c.dtype);
        let dout = random_values(&mut rng, tq * hq * d, 1.0, c.dtype);
        let (q_shape, k_shape) = match varlen {
            None => (vec![batch, tq / batch.max(1), hq, d], vec![batch, tk / batch.max(1), hk, d]),
            Some(_) => (vec![tq, hq, d], vec![tk, hk, d]),
        };
        let qt = make_tensor(&q, &q_shape, c.dtype, c.strided[0], &mut rng);
        let kt = make_tensor(&k, &k_shape, c.dtype, c.strided[1], &mut rng);
        let vt = make_tensor(&v, &k_shape, c.dtype, c.strided[2], &mut rng);
        let dout_t = make_tensor(&dout, &q_shape, c.dtype, c.strided[3], &mut rng);
        let f = match &varlen {
            None => fwd(&qt, &kt, &vt, &c.opts.attn()),
            Some(vl) => varlen_fwd(&qt, &kt, &vt, &vl.get(), &c.opts.attn()),
        }
        .unwrap();
        let out = f.out.to_f32_vec().unwrap();
        let out_t = make_tensor(&out, &q_shape, c.dtype, c.strided[4], &mut rng);
        Setup { q, k, v, dout, out, qt, kt, vt, dout_t, out_t, lse_t: f.lse, cu_q, cu_k, real_q, real_k, tq, varlen }
    }

    fn run(&self, opts: &AttnOptions, deterministic: bool) -> Result<BwdOutput> {
        match &self.varlen {
            None => bwd(&self.dout_t, &self.qt, &self.kt, &self.vt, &self.out_t, &self.lse_t, opts, deterministic),
            Some(vl) => varlen_bwd(&self.dout_t, &self.qt, &self.kt, &self.vt, &self.out_t, &self.lse_t, &vl.get(), opts, deterministic),
        }
    }
}


fn run_case(c: &Case) -> std::result::Result<[f64; 3], String> {
    let (hq, hk, d) = (c.heads.0, c.heads.1, c.d);
    let s = Setup::new(c);
    let g = s.run(&c.opts.attn(), false).map_err(|e| e.to_string())?;
    for (name, t, want) in [("dq", &g.dq, s.qt.shape()), ("dk", &g.dk, s.kt.shape()), ("dv", &g.dv, s.vt.shape())] {
        if t.shape() != want || t.dtype() != c.dtype || !t.is_contiguous() {
            return Err(format!("{name}: {:?} {} (contiguous {}), expected {want:?} {}", t.shape(), t.dtype(), t.is_contiguous(), c.dtype));
        }
    }
    let o = c.opts.reference(d);
    let r = reference_varlen_bwd(&s.q, &s.k, &s.v, &s.dout, &s.out, &s.cu_q, &s.cu_k, &s.real_q, &s.real_k, hq, hk, d, &o);
    let mut smax = o.scale.abs() * d as f64 * c.amp.q as f64 * c.amp.k as f64;
    if o.softcap > 0.0 {
        smax = smax.min(o.softcap);
    }
    let rel = 2f64.powi(-19) * (1.0 + smax) + 2f64.powi(-16);
    let v = |t: &Tensor| t.to_f32_vec().unwrap();
    Ok([
        check_grad("dq", &v(&g.dq), &r.dq, &r.dq_mag, Some(&r.dq_derr), c.dtype, rel)?,
        check_grad("dk", &v(&g.dk), &r.dk, &r.dk_mag, Some(&r.dk_derr), c.dtype, rel)?,
        check_grad("dv", &v(&g.dv), &r.dv, &r.dv_mag, None, c.dtype, rel)?,
    ])
}

fn report(name: &str, worst: [f64; 3]) {
    if std::env::var_os("FA_TEST_VERBOSE").is_some() {
        eprintln!("{name}: worst |diff|/tol dq {:.3} dk {:.3} dv {:.3}", worst[0], worst[1], worst[2]);
    }
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_f32_vec().unwrap().iter().map(|v| v.to_bits()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn dense_matches_reference(c in case(dense_layout())) {
        report("dense", run_case(&c).map_err(TestCaseError::fail)?);
    }

    #[test]
    fn varlen_matches_reference(c in case(varlen_layout())) {
        report("varlen", run_case(&c).map_err(TestCaseError::fail)?);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// (c) Varlen backward over a packed batch equals one dense B=1 backward per sequence (given the same
    /// out and LSE rows), bit for bit.
    #[test]
    fn packing_is_bitwise_independent(c in case(varlen_layout())) {
        let (hq, hk, d) = (c.heads.0, c.heads.1, c.d);
        let s = Setup::new(&c);
        let opts = c.opts.attn();
        let g = s.run(&opts, false).unwrap();
        let (dq, dk, dv) = (bits(&g.dq), bits(&g.dk), bits(&g.dv));
        let lse = s.lse_t.to_f32_vec().unwrap();
        for b in 0..s.real_q.len() {
            let (sq, sk) = (s.real_q[b], s.real_k[b]);
            let rows = |x: &[f32], row0: usize, n: usize, h: usize| x[row0 * h * d..][..n * h * d].to_vec();
            let t = |x: Vec<f32>, n: usize, h: usize| Tensor::from_f32(&x, &[1, n, h, d], c.dtype).unwrap();
            let lse1: Vec<f32> = (0..hq).flat_map(|h| lse[h * s.tq + s.cu_q[b]..][..sq].to_vec()).collect();
            let g1 = bwd(
                &t(rows(&s.dout, s.cu_q[b], sq, hq), sq, hq),
                &t(rows(&s.q, s.cu_q[b], sq, hq), sq, hq),
                &t(rows(&s.k, s.cu_k[b], sk, hk), sk, hk),
                &t(rows(&s.v, s.cu_k[b], sk, hk), sk, hk),
                &t(rows(&s.out, s.cu_q[b], sq, hq), sq, hq),
                &Tensor::from_f32(&lse1, &[1, hq, sq], DType::F32).unwrap(),
                &opts,
                false,
            ).unwrap();
            prop_assert_eq!(&dq[s.cu_q[b] * hq * d..][..sq * hq * d], &bits(&g1.dq)[..], "dq of sequence {}", b);
            prop_assert_eq!(&dk[s.cu_k[b] * hk * d..][..sk * hk * d], &bits(&g1.dk)[..], "dk of sequence {}", b);
            prop_assert_eq!(&dv[s.cu_k[b] * hk * d..][..sk * hk * d], &bits(&g1.dv)[..], "dv of sequence {}", b);
        }
    }

    /// (d) Repeated runs, deterministic or not, on one thread or several, are bitwise identical (with one
    /// thread the CPU path walks each (sequence, kv head) once; with many, in two passes).
    #[test]
    fn runs_are_bitwise_deterministic(c in case(varlen_layout())) {
        let s = Setup::new(&c);
        let opts = c.opts.attn();
        let all = |g: BwdOutput| [bits(&g.dq), bits(&g.dk), bits(&g.dv)];
        let first = all(s.run(&opts, true).unwrap());
        for threads in [1, 3, 32] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for deterministic in [true, false] {
                let again = pool.install(|| all(s.run(&opts, deterministic).unwrap()));
                prop_assert!(again == first, "threads {} deterministic {}", threads, deterministic);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// (e) validate_bwd's errors.

/// Asserts `r` failed with an error `is` accepts, whose message mentions `name`.
#[track_caller]
fn expect_err<T: std::fmt::Debug>(r: Result<T>, is: impl Fn(&Error) -> bool, name: &str) {
    let e = r.expect_err("call must fail");
    assert!(is(&e), "unexpected error variant: {e:?}");
    assert!(e.to_string().contains(name), "message {:?} does not name {name:?}", e.to_string());
}

fn z(shape: &[usize], dtype: DType) -> Tensor {
    Tensor::zeros(shape, dtype, Device::Cpu).unwrap()
}

#[test]
fn validate_bwd_errors() {
    let o = AttnOptions::default();
    let bf = DType::BF16;
    let (q, k) = (z(&[2, 5, 4, 64], bf), z(&[2, 7, 2, 64], bf));
    let lse = z(&[2, 4, 5], DType::F32);
    let call = |dout: &Tensor, out: &Tensor, lse: &Tensor| bwd(dout, &q, &k, &k, out, lse, &o, false);
    let g = call(&q, &q, &lse).unwrap();
    assert_eq!((g.dq.shape(), g.dk.shape(), g.dv.shape()), (q.shape(), k.shape(), k.shape()));

    // q, k, v go through validate_fwd.
    expect_err(bwd(&q, &q, &k, &z(&[2, 7, 2, 32], bf), &q, &lse, &o, false), |e| matches!(e, Error::Shape { arg: "v", .. }), "v");
    expect_err(bwd(&q, &q, &k, &k, &q, &lse, &AttnOptions { softcap: -1.0, ..o }, false), |e| matches!(e, Error::Value { arg: "softcap", .. }), "softcap");

    // dout and out: dtype, rank, shape, contiguity.
    for (arg, bad_dout) in [("dout", true), ("out", false)] {
        let pick = |bad: &Tensor| if bad_dout { call(bad, &q, &lse) } else { call(&q, bad, &lse) };
        expect_err(pick(&z(&[2, 5, 4, 64], DType::F16)), |e| matches!(e, Error::DTypeMismatch { arg: a, .. } if *a == arg), arg);
        expect_err(pick(&z(&[2, 5, 4, 64], DType::F32)), |e| matches!(e, Error::DTypeMismatch { arg: a, .. } if *a == arg), arg);
        expect_err(pick(&z(&[10, 4, 64], bf)), |e| matches!(e, Error::Rank { arg: a, got: 3, expected: 4 } if *a == arg), arg);
        expect_err(pick(&z(&[2, 6, 4, 64], bf)), |e| matches!(e, Error::Shape { arg: a, .. } if *a == arg), arg);
        expect_err(pick(&z(&[2, 5, 2, 64], bf)), |e| matches!(e, Error::Shape { arg: a, .. } if *a == arg), arg);
        let wide = z(&[2, 5, 4, 128], bf);
        let strided_last = wide.as_strided(&[2, 5, 4, 64], &[5 * 4 * 128, 4 * 128, 128, 2], 0).unwrap();
        expect_err(pick(&strided_last), |e| matches!(e, Error::NotContiguous { arg: a } if *a == arg), arg);
        // Strided rows are fine.
        let rows = wide.as_strided(&[2, 5, 4, 64], &[5 * 4 * 128, 4 * 128, 128, 1], 64).unwrap();
        pick(&rows).unwrap();
    }

    // lse: f32, the forward's LSE shape, contiguous.
    expect_err(call(&q, &q, &z(&[2, 4, 5], bf)), |e| matches!(e, Error::DType { arg: "lse", .. }), "lse");
    expect_err(call(&q, &q, &z(&[2, 5, 4], DType::F32)), |e| matches!(e, Error::Shape { arg: "lse", .. }), "lse");
    expect_err(call(&q, &q, &z(&[4, 10], DType::F32)), |e| matches!(e, Error::Rank { arg: "lse", .. }), "lse");
    let transposed = z(&[2, 5, 4], DType::F32).as_strided(&[2, 4, 5], &[20, 1, 4], 0).unwrap();
    expect_err(call(&q, &q, &transposed), |e| matches!(e, Error::Shape { arg: "lse", .. }), "lse");

    // Varlen: lse is [Hq, Tq]; the lengths are checked as in the forward.
    let (qv, kv) = (z(&[10, 4, 64], bf), z(&[14, 2, 64], bf));
    let (cu_q, cu_k) = (i32s(&[0, 5, 10]), i32s(&[0, 7, 14]));
    let vl = Varlen { cu_seqlens_q: &cu_q, cu_seqlens_k: &cu_k, max_seqlen_q: Some(5), max_seqlen_k: Some(7), seqused_q: None, seqused_k: None };
    let vcall = |dout: &Tensor, lse: &Tensor, vl: &Varlen<'_>| varlen_bwd(dout, &qv, &kv, &kv, &qv, lse, vl, &o, false);
    vcall(&qv, &z(&[4, 10], DType::F32), &vl).unwrap();
    expect_err(vcall(&qv, &z(&[2, 4, 5], DType::F32), &vl), |e| matches!(e, Error::Rank { arg: "lse", .. }), "lse");
    expect_err(vcall(&qv, &z(&[4, 9], DType::F32), &vl), |e| matches!(e, Error::Shape { arg: "lse", .. }), "lse");
    expect_err(vcall(&q, &z(&[4, 10], DType::F32), &vl), |e| matches!(e, Error::Rank { arg: "dout", .. }), "dout");
    expect_err(vcall(&z(&[10, 2, 64], bf), &z(&[4, 10], DType::F32), &vl), |e| matches!(e, Error::Shape { arg: "dout", .. }), "dout");
    let short = Varlen { max_seqlen_q: Some(4), ..vl };
    expect_err(vcall(&qv, &z(&[4, 10], DType::F32), &short), |e| matches!(e, Error::SeqLens { arg: "max_seqlen_q", .. }), "max_seqlen_q");

    // The canonical problem carries dout's and out's strides.
    let rows = z(&[2, 5, 4, 128], bf).as_strided(&[2, 5, 4, 64], &[5 * 4 * 128, 4 * 128, 128, 1], 64).unwrap();
    let p = flash_attn::validate::validate_bwd(&rows.view(), &q.view(), &k.view(), &k.view(), &q.view(), &lse.view(), None, &o).unwrap();
    assert_eq!((p.dout.batch, p.dout.row, p.dout.head), (2560, 512, 128));
    assert_eq!((p.out.batch, p.out.row, p.out.head), (1280, 256, 64));
}

/// Zero-size problems are legal and give empty or all-zero gradients.
#[test]
fn zero_sizes() {
    let bf = DType::BF16;
    let o = AttnOptions::default();
    for (b, sq, sk) in [(0, 3, 3), (1, 0, 4), (1, 4, 0), (2, 0, 0)] {
        let (q, k) = (z(&[b, sq, 2, 32], bf), z(&[b, sk, 2, 32], bf));
        let g = bwd(&q, &q, &k, &k, &q, &z(&[b, 2, sq], DType::F32), &o, true).unwrap();
        assert!(g.dk.to_f32_vec().unwrap().iter().chain(&g.dq.to_f32_vec().unwrap()).all(|&x| x == 0.0));
    }
    // No q heads (one kv head): forward, backward and the KV cache run and return empty results.
    let (q, k) = (z(&[2, 3, 0, 32], bf), z(&[2, 5, 1, 32], bf));
    let f = fwd(&q, &k, &k, &o).unwrap();
    assert_eq!((f.out.shape(), f.lse.shape()), (&[2, 3, 0, 32][..], &[2, 0, 3][..]));
    let g = bwd(&q, &q, &k, &k, &f.out, &f.lse, &o, false).unwrap();
    assert!(g.dk.to_f32_vec().unwrap().iter().all(|&x| x == 0.0));
    let (mut kc, mut vc) = (k.clone(), k.clone());
    let lens = Tensor::from_i32(vec![5, 4], &[2]).unwrap();
    let r = flash_attn::fwd_kvcache(&q, &mut kc, &mut vc, &flash_attn::KvCache::new(&lens), &o, &flash_attn::KvCacheOptions::default()).unwrap();
    assert_eq!(r.out.shape(), &[2, 3, 0, 32][..]);
}

/// The backward's two walks (one per (sequence, kv head) adding dq as it goes, or dk/dv then dq in two
/// passes: which one runs depends on the thread count) give the same bits, on problems large enough to run
/// on rayon's threads, with every score modifier.
#[test]
fn backward_walks_give_the_same_bits() {
    use rand::Rng;
    let (seed, mut r) = seeded("backward_walks_give_the_same_bits");
    for n in 0..6 {
        let d = [64, 128, 32][n % 3];
        let dtype = if r.gen_bool(0.5) { DType::BF16 } else { DType::F16 };
        let (b, hk, group) = (2, 2, r.gen_range(1..=3));
        let hq = hk * group;
        let (sq, sk) = (r.gen_range(100..=260), r.gen_range(100..=260));
        let causal = r.gen_bool(0.5);
        let window = if r.gen_bool(0.3) { (r.gen_range(0..80) as i64, r.gen_range(0..80) as i64) } else { (-1, -1) };
        let softcap = if r.gen_bool(0.3) { 5.0 } else { 0.0 };
        let dropout = if r.gen_bool(0.3) { flash_attn::Dropout { p: 0.2, seed: r.r#gen(), offset: r.gen_range(0..1000) } } else { flash_attn::Dropout::default() };
        let opts = AttnOptions { causal, window, softcap, dropout, ..Default::default() };
        let mut t = |shape: &[usize]| Tensor::from_f32(&random_values(&mut r, shape.iter().product(), 2.0, dtype), shape, dtype).unwrap();
        let (q, k, v, dout) = (t(&[b, sq, hq, d]), t(&[b, sk, hk, d]), t(&[b, sk, hk, d]), t(&[b, sq, hq, d]));
        let slopes = r.gen_bool(0.4).then(|| Tensor::from_f32(&random_values(&mut r, hq, 0.5, DType::F32), &[hq], DType::F32).unwrap());
        let extras = flash_attn::Extras { alibi_slopes: slopes.as_ref(), return_attn_probs: false };
        let o = flash_attn::fwd_with(&q, &k, &v, &extras, &opts).unwrap();
        let grads = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let g = pool.install(|| flash_attn::bwd_with(&dout, &q, &k, &v, &o.out, &o.lse, &extras, &opts, false).unwrap());
            [bits(&g.dq), bits(&g.dk), bits(&g.dv)]
        };
        // One thread: B * Hk = 4 pairs fill it (one walk); 32 threads: they do not (two passes).
        assert!(grads(1) == grads(32), "seed {seed}, case {n} (D {d}, {dtype:?}, Sq {sq}, Sk {sk}, H {hq}/{hk}, {opts:?}): the walks differ");
    }
}

/// Keys a query does not see never reach its results, even non-finite ones (a cache row that overflowed, say):
/// with inf and NaN in some keys' k and v, the out, LSE and dq of every query that sees none of them are bitwise
/// those of the same call with finite values there. Causal and windowed masks, GQA, problems of several tiles
/// (the CPU path's tiles share loads between rows whose keys differ).
#[test]
fn hidden_non_finite_keys_never_reach_a_row() {
    use rand::Rng;
    let (seed, mut r) = seeded("hidden_non_finite_keys_never_reach_a_row");
    for n in 0..8 {
        let d = [64, 128, 32, 96][n % 4];
        let dtype = if r.gen_bool(0.5) { DType::BF16 } else { DType::F16 };
        let (hk, group) = (r.gen_range(1..=2), r.gen_range(1..=3));
        let hq = hk * group;
        let s: usize = r.gen_range(70..=200);
        let window = if n % 2 == 0 { (-1, 0) } else { (r.gen_range(5..40) as i64, r.gen_range(0..4) as i64) };
        let opts = AttnOptions { window, ..Default::default() };
        // Keys from `hidden` on hold inf / NaN in the poisoned call; query i sees key j iff
        // i - left <= j <= i + right, so queries below hidden - right see none of them (the window's left side
        // only hides more).
        let hidden = r.gen_range(s / 2..s - 1);
        let clean_rows = hidden.saturating_sub(window.1 as usize);
        let values = |r: &mut rand::rngs::StdRng, n: usize| random_values(r, n, 2.0, dtype);
        let (q, k, v, dout) = (values(&mut r, s * hq * d), values(&mut r, s * hk * d), values(&mut r, s * hk * d), values(&mut r, s * hq * d));
        let (mut k_bad, mut v_bad) = (k.clone(), v.clone());
        for j in hidden..s {
            for x in 0..hk * d {
                k_bad[j * hk * d + x] = if x % 3 == 0 { f32::NAN } else { f32::INFINITY };
                v_bad[j * hk * d + x] = if x % 2 == 0 { f32::NEG_INFINITY } else { f32::NAN };
            }
        }
        let t = |x: &[f32], h: usize| Tensor::from_f32(x, &[1, s, h, d], dtype).unwrap();
        let run = |k: &[f32], v: &[f32]| {
            let (qt, kt, vt, gt) = (t(&q, hq), t(k, hk), t(v, hk), t(&dout, hq));
            let o = fwd(&qt, &kt, &vt, &opts).unwrap();
            let g = bwd(&gt, &qt, &kt, &vt, &o.out, &o.lse, &opts, false).unwrap();
            (o.out.to_f32_vec().unwrap(), o.lse.to_f32_vec().unwrap(), g.dq.to_f32_vec().unwrap())
        };
        let (clean, bad) = (run(&k, &v), run(&k_bad, &v_bad));
        let rows = clean_rows * hq * d;
        let case = format!("seed {seed}, case {n} (D {d}, {dtype:?}, S {s}, H {hq}/{hk}, window {window:?}, keys {hidden}.. poisoned)");
        // The first element whose bits differ, if any.
        let differs = |a: &[f32], b: &[f32]| a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits());
        if let Some(at) = differs(&clean.0[..rows], &bad.0[..rows]) {
            panic!("out element {at} (row {}) differs: {} vs {}; {case}", at / (hq * d), clean.0[at], bad.0[at]);
        }
        if let Some(at) = differs(&clean.2[..rows], &bad.2[..rows]) {
            panic!("dq element {at} (row {}) differs: {} vs {}; {case}", at / (hq * d), clean.2[at], bad.2[at]);
        }
        for h in 0..hq {
            if let Some(i) = differs(&clean.1[h * s..h * s + clean_rows], &bad.1[h * s..h * s + clean_rows]) {
                panic!("lse of head {h}, row {i} differs; {case}");
            }
        }
    }
}
