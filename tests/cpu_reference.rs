//! The CPU path against an f64 reference written from the definition, over random dense and varlen
//! layouts, masks, softcaps, GQA ratios, dtypes and head dims; plus the exact properties (packing
//! independence, empty rows, default scale, causal == window (-1, 0)).
//!
//! Tolerances. The reference runs in f64 on the very values the library reads (inputs are generated
//! already rounded to bf16/f16). The library works in f32 and rounds `out` to the input dtype once, so
//!   |out - ref| <= u * |ref| + atol_out,  u = 2^-8 (bf16) or 2^-11 (f16), the unit roundoff of the
//!   final rounding, and atol_out = 2^-12 * max|v| for the f32 work before it: the softmax weights carry
//!   the scores' f32 error (about sqrt(D) * 2^-24 * |score| for the dot product, a few ulps for exp and
//!   tanh) and the weighted sum of up to 300 keys adds about sk * 2^-24 relative, together far below
//!   2^-12 for the sizes here. With FA_TEST_VERBOSE=1 the tests print the worst |diff| / tolerance:
//!   about 0.91 for out (set by the final rounding, which the u * |ref| term bounds tightly) and about
//!   0.14 for LSE.
//!   A row the reference leaves empty must be exactly 0.
//!   LSE is f32 end to end: |lse - ref| <= 2^-20 * |ref| + 2^-20 * (1 + smax), where smax bounds the
//!   scores' magnitude (|scale| * D * max|q| * max|k|, or the softcap), since their absolute error
//!   scales with it. Empty rows must be exactly -inf.

#[path = "common/mod.rs"]
mod common;

use common::*;
use flash_attn::{fwd, varlen_fwd, AttnOptions, DType, FwdOutput, Tensor, Varlen};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// Tolerance of one case: |score| is bounded by |scale| * D * max|q| * max|k|, or by the softcap.
fn tolerance(o: &Opts, dtype: DType, d: usize, amp: Amp) -> Tolerance {
    let mut smax = o.reference(d).scale.abs() * d as f64 * amp.q as f64 * amp.k as f64;
    if o.softcap > 0.0 {
        smax = smax.min(o.softcap as f64);
    }
    Tolerance::new(dtype, amp.v as f64, smax)
}

fn outputs(o: &FwdOutput) -> (Vec<f32>, Vec<f32>) {
    (o.out.to_f32_vec().unwrap(), o.lse.to_f32_vec().unwrap())
}

fn report(name: &str, worst: (f64, f64)) {
    if std::env::var_os("FA_TEST_VERBOSE").is_some() {
        eprintln!("{name}: worst |diff|/tol out {:.3} lse {:.3}", worst.0, worst.1);
    }
}

#[derive(Clone, Debug)]
struct DenseCase {
    dtype: DType,
    d: usize,
    b: usize,
    sq: usize,
    sk: usize,
    heads: (usize, usize),
    opts: Opts,
    amp: Amp,
    strided: [bool; 3],
    seed: u64,
}

fn dense_case() -> impl Strategy<Value = DenseCase> {
    (dtype(), head_dim(), 0usize..=3, seqlen(), seqlen(), heads(), opts(), amp(), any::<[bool; 3]>(), any::<u64>())
        .prop_map(|(dtype, d, b, sq, sk, heads, opts, amp, strided, seed)| DenseCase { dtype, d, b, sq, sk, heads, opts, amp, strided, seed })
}

fn run_dense(c: &DenseCase) -> Result<(f64, f64), String> {
    let (hq, hk) = c.heads;
    let mut rng = rng(c.seed);
    let q = random_values(&mut rng, c.b * c.sq * hq * c.d, c.amp.q, c.dtype);
    let k = random_values(&mut rng, c.b * c.sk * hk * c.d, c.amp.k, c.dtype);
    let v = random_values(&mut rng, c.b * c.sk * hk * c.d, c.amp.v, c.dtype);
    let qt = make_tensor(&q, &[c.b, c.sq, hq, c.d], c.dtype, c.strided[0], &mut rng);
    let kt = make_tensor(&k, &[c.b, c.sk, hk, c.d], c.dtype, c.strided[1], &mut rng);
    let vt = make_tensor(&v, &[c.b, c.sk, hk, c.d], c.dtype, c.strided[2], &mut rng);
    let o = fwd(&qt, &kt, &vt, &c.opts.attn()).map_err(|e| e.to_string())?;
    if o.out.shape() != [c.b, c.sq, hq, c.d] || o.lse.shape() != [c.b, hq, c.sq] || o.out.dtype() != c.dtype {
        return Err(format!("shapes: out {:?} {}, lse {:?}", o.out.shape(), o.out.dtype(), o.lse.shape()));
    }
    let (ref_out, ref_lse) = reference_fwd(&q, &k, &v, c.b, c.sq, c.sk, hq, hk, c.d, &c.opts.reference(c.d));
    let (out, lse) = outputs(&o);
    check_close(&out, &lse, &ref_out, &ref_lse, &tolerance(&c.opts, c.dtype, c.d, c.amp))
}

/// A packed batch: per sequence (real_q, pad_q, real_k, pad_k); padding rows exist only with seqused.
#[derive(Clone, Debug)]
struct VarlenCase {
    dtype: DType,
    d: usize,
    heads: (usize, usize),
    opts: Opts,
    amp: Amp,
    strided: [bool; 3],
    seed: u64,
    seqs: Vec<(usize, usize, usize, usize)>,
    seqused: (bool, bool),
    tail: (usize, usize),
    extra_max: (usize, usize),
}

fn varlen_case() -> impl Strategy<Value = VarlenCase> {
    let seq = (seqlen(), 0usize..=3, seqlen(), 0usize..=3);
    let layout = (proptest::collection::vec(seq, 0..=4), any::<(bool, bool)>(), (0usize..=5, 0usize..=5), (0usize..=3, 0usize..=3));
    (dtype(), head_dim(), heads(), opts(), amp(), any::<[bool; 3]>(), any::<u64>(), layout).prop_map(
        |(dtype, d, heads, opts, amp, strided, seed, (seqs, seqused, tail, extra_max))| VarlenCase { dtype, d, heads, opts, amp, strided, seed, seqs, seqused, tail, extra_max },
    )
}

/// Everything a varlen call needs, in logical form and as tensors.
struct Packed {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    qt: Tensor,
    kt: Tensor,
    vt: Tensor,
    cu_q: Vec<usize>,
    cu_k: Vec<usize>,
    real_q: Vec<usize>,
    real_k: Vec<usize>,
    tq: usize,
    cu_q_t: Tensor,
    cu_k_t: Tensor,
    used_q_t: Option<Tensor>,
    used_k_t: Option<Tensor>,
    max_q: usize,
    max_k: usize,
}

impl Packed {
    fn new(c: &VarlenCase) -> Packed {
        let (hq, hk) = c.heads;
        let slot = |real: usize, pad: usize, seqused: bool| if seqused { real + pad } else { real };
        let prefix = |lens: Vec<usize>| -> Vec<usize> { std::iter::once(0).chain(lens.iter().scan(0, |acc, &l| { *acc += l; Some(*acc) })).collect() };
        let cu_q = prefix(c.seqs.iter().map(|s| slot(s.0, s.1, c.seqused.0)).collect());
        let cu_k = prefix(c.seqs.iter().map(|s| slot(s.2, s.3, c.seqused.1)).collect());
        let real_q: Vec<usize> = c.seqs.iter().map(|s| s.0).collect();
        let real_k: Vec<usize> = c.seqs.iter().map(|s| s.2).collect();
        let (tq, tk) = (cu_q.last().unwrap() + c.tail.0, cu_k.last().unwrap() + c.tail.1);
        let mut rng = rng(c.seed);
        let q = random_values(&mut rng, tq * hq * c.d, c.amp.q, c.dtype);
        let k = random_values(&mut rng, tk * hk * c.d, c.amp.k, c.dtype);
        let v = random_values(&mut rng, tk * hk * c.d, c.amp.v, c.dtype);
        let qt = make_tensor(&q, &[tq, hq, c.d], c.dtype, c.strided[0], &mut rng);
        let kt = make_tensor(&k, &[tk, hk, c.d], c.dtype, c.strided[1], &mut rng);
        let vt = make_tensor(&v, &[tk, hk, c.d], c.dtype, c.strided[2], &mut rng);
        let i32s = |x: &[usize]| Tensor::from_i32(x.iter().map(|&l| l as i32).collect(), &[x.len()]).unwrap();
        Packed {
            cu_q_t: i32s(&cu_q),
            cu_k_t: i32s(&cu_k),
            used_q_t: c.seqused.0.then(|| i32s(&real_q)),
            used_k_t: c.seqused.1.then(|| i32s(&real_k)),
            max_q: real_q.iter().copied().max().unwrap_or(0) + c.extra_max.0,
            max_k: real_k.iter().copied().max().unwrap_or(0) + c.extra_max.1,
            q,
            k,
            v,
            qt,
            kt,
            vt,
            cu_q,
            cu_k,
            real_q,
            real_k,
            tq,
        }
    }

    fn run(&self, opts: &AttnOptions) -> flash_attn::Result<FwdOutput> {
        let vl = Varlen {
            cu_seqlens_q: &self.cu_q_t,
            cu_seqlens_k: &self.cu_k_t,
            max_seqlen_q: Some(self.max_q),
            max_seqlen_k: Some(self.max_k),
            seqused_q: self.used_q_t.as_ref(),
            seqused_k: self.used_k_t.as_ref(),
        };
        varlen_fwd(&self.qt, &self.kt, &self.vt, &vl, opts)
    }
}

fn run_varlen(c: &VarlenCase) -> Result<(f64, f64), String> {
    let (hq, hk) = c.heads;
    let p = Packed::new(c);
    let o = p.run(&c.opts.attn()).map_err(|e| e.to_string())?;
    if o.out.shape() != [p.tq, hq, c.d] || o.lse.shape() != [hq, p.tq] {
        return Err(format!("shapes: out {:?}, lse {:?}", o.out.shape(), o.lse.shape()));
    }
    let (ref_out, ref_lse) = reference_varlen_fwd(&p.q, &p.k, &p.v, &p.cu_q, &p.cu_k, &p.real_q, &p.real_k, p.tq, hq, hk, c.d, &c.opts.reference(c.d));
    let (out, lse) = outputs(&o);
    check_close(&out, &lse, &ref_out, &ref_lse, &tolerance(&c.opts, c.dtype, c.d, c.amp))
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn dense_matches_reference(c in dense_case()) {
        let worst = run_dense(&c).map_err(TestCaseError::fail)?;
        report("dense", worst);
    }

    #[test]
    fn varlen_matches_reference(c in varlen_case()) {
        let worst = run_varlen(&c).map_err(TestCaseError::fail)?;
        report("varlen", worst);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Varlen over a packed batch equals one dense B=1 call per sequence (on its real rows), bit for bit.
    #[test]
    fn packing_is_bitwise_independent(c in varlen_case()) {
        let (hq, hk) = c.heads;
        let p = Packed::new(&c);
        let opts = c.opts.attn();
        let (out, lse) = outputs(&p.run(&opts).unwrap());
        for b in 0..c.seqs.len() {
            let (sq, sk) = (p.real_q[b], p.real_k[b]);
            let rows = |x: &[f32], row0: usize, n: usize, h: usize| x[row0 * h * c.d..][..n * h * c.d].to_vec();
            let qt = Tensor::from_f32(&rows(&p.q, p.cu_q[b], sq, hq), &[1, sq, hq, c.d], c.dtype).unwrap();
            let kt = Tensor::from_f32(&rows(&p.k, p.cu_k[b], sk, hk), &[1, sk, hk, c.d], c.dtype).unwrap();
            let vt = Tensor::from_f32(&rows(&p.v, p.cu_k[b], sk, hk), &[1, sk, hk, c.d], c.dtype).unwrap();
            let (out1, lse1) = outputs(&fwd(&qt, &kt, &vt, &opts).unwrap());
            prop_assert_eq!(bits(&out[p.cu_q[b] * hq * c.d..][..sq * hq * c.d]), bits(&out1), "out of sequence {}", b);
            for h in 0..hq {
                prop_assert_eq!(bits(&lse[h * p.tq + p.cu_q[b]..][..sq]), bits(&lse1[h * sq..][..sq]), "lse of sequence {} head {}", b, h);
            }
        }
    }

    /// The causal mask is the window (-1, 0), and causal with a window keeps its left side.
    #[test]
    fn causal_is_window_minus1_0(c in dense_case(), left in window_side()) {
        let mut causal = c.clone();
        causal.opts = Opts { causal: true, window: (left, -1), ..c.opts };
        let mut window = c.clone();
        window.opts = Opts { causal: false, window: (left, 0), ..c.opts };
        let run = |c: &DenseCase| {
            let mut rng = rng(c.seed);
            let (hq, hk) = c.heads;
            let q = random_values(&mut rng, c.b * c.sq * hq * c.d, 1.0, c.dtype);
            let k = random_values(&mut rng, c.b * c.sk * hk * c.d, 1.0, c.dtype);
            let v = random_values(&mut rng, c.b * c.sk * hk * c.d, 1.0, c.dtype);
            let t = |x: &[f32], s: usize, h: usize| Tensor::from_f32(x, &[c.b, s, h, c.d], c.dtype).unwrap();
            outputs(&fwd(&t(&q, c.sq, hq), &t(&k, c.sk, hk), &t(&v, c.sk, hk), &c.opts.attn()).unwrap())
        };
        let (a, b) = (run(&causal), run(&window));
        prop_assert_eq!(bits(&a.0), bits(&b.0));
        prop_assert_eq!(bits(&a.1), bits(&b.1));
    }
}

/// q `[1, sq, 2, 64]`, k/v `[1, sk, 2, 64]` with fixed random contents.
fn small_dense(sq: usize, sk: usize, dtype: DType) -> (Vec<f32>, Vec<f32>, Vec<f32>, Tensor, Tensor, Tensor) {
    let mut r = rng(rand::random());
    let q = random_values(&mut r, sq * 2 * 64, 1.0, dtype);
    let k = random_values(&mut r, sk * 2 * 64, 1.0, dtype);
    let v = random_values(&mut r, sk * 2 * 64, 1.0, dtype);
    let (qt, kt, vt) = (
        Tensor::from_f32(&q, &[1, sq, 2, 64], dtype).unwrap(),
        Tensor::from_f32(&k, &[1, sk, 2, 64], dtype).unwrap(),
        Tensor::from_f32(&v, &[1, sk, 2, 64], dtype).unwrap(),
    );
    (q, k, v, qt, kt, vt)
}

#[test]
fn fully_masked_rows_are_zero_with_lse_minus_inf() {
    // Sq > Sk causal: query i sees keys j <= i + Sk - Sq, so the first Sq - Sk rows see nothing.
    let (sq, sk) = (100, 30);
    let (_, _, _, q, k, v) = small_dense(sq, sk, DType::BF16);
    let (out, lse) = outputs(&fwd(&q, &k, &v, &AttnOptions { causal: true, ..Default::default() }).unwrap());
    for h in 0..2 {
        for i in 0..sq {
            let row = &out[(i * 2 + h) * 64..][..64];
            let l = lse[h * sq + i];
            assert!(row.iter().all(|x| !x.is_nan()) && !l.is_nan(), "NaN in row {i}");
            if i < sq - sk {
                assert!(row.iter().all(|&x| x == 0.0), "row {i} head {h} must be 0");
                assert_eq!(l, f32::NEG_INFINITY, "lse row {i} head {h}");
            } else {
                assert!(l.is_finite(), "row {i} sees keys");
            }
        }
    }
    // No keys at all (dense Sk = 0, and a varlen sequence with 0 keys): every row is empty.
    let (_, _, _, q, k, v) = small_dense(5, 0, DType::F16);
    let (out, lse) = outputs(&fwd(&q, &k, &v, &AttnOptions::default()).unwrap());
    assert!(out.iter().all(|&x| x == 0.0) && lse.iter().all(|&l| l == f32::NEG_INFINITY));
    let q = Tensor::from_f32(&vec![0.5; 5 * 2 * 64], &[5, 2, 64], DType::F16).unwrap();
    let k = Tensor::from_f32(&vec![0.5; 3 * 2 * 64], &[3, 2, 64], DType::F16).unwrap();
    let (cu_q, cu_k) = (Tensor::from_i32(vec![0, 2, 5], &[3]).unwrap(), Tensor::from_i32(vec![0, 0, 3], &[3]).unwrap());
    let vl = Varlen { cu_seqlens_q: &cu_q, cu_seqlens_k: &cu_k, max_seqlen_q: Some(3), max_seqlen_k: Some(3), seqused_q: None, seqused_k: None };
    let (out, lse) = outputs(&varlen_fwd(&q, &k, &k, &vl, &AttnOptions::default()).unwrap());
    for h in 0..2 {
        for i in 0..5 {
            let empty = i < 2;
            assert_eq!(out[(i * 2 + h) * 64] == 0.0, empty, "row {i}");
            assert_eq!(lse[h * 5 + i] == f32::NEG_INFINITY, empty, "row {i}");
        }
    }
}

#[test]
fn default_scale_is_inverse_sqrt_head_dim() {
    // 1/sqrt(d) rounded once to f32, as flash-attn's Python `d ** -0.5` reaches its kernels (the Python
    // package pads head dims without kernels and passes that value: the CLI and the library must agree).
    for d in 1..=512usize {
        let want = (d as f64).powf(-0.5) as f32;
        assert_eq!(AttnOptions::default_scale(d), want, "d = {d}");
    }
    for &d in &HEAD_DIMS {
        let mut r = rng(rand::random());
        let (sq, sk) = (17, 23);
        let q = random_values(&mut r, sq * d, 2.0, DType::BF16);
        let k = random_values(&mut r, sk * d, 2.0, DType::BF16);
        let v = random_values(&mut r, sk * d, 1.0, DType::BF16);
        let t = |x: &[f32], s: usize| Tensor::from_f32(x, &[1, s, 1, d], DType::BF16).unwrap();
        let (qt, kt, vt) = (t(&q, sq), t(&k, sk), t(&v, sk));
        let default = outputs(&fwd(&qt, &kt, &vt, &AttnOptions::default()).unwrap());
        let explicit = outputs(&fwd(&qt, &kt, &vt, &AttnOptions { softmax_scale: Some(AttnOptions::default_scale(d)), ..Default::default() }).unwrap());
        assert_eq!(bits(&default.0), bits(&explicit.0), "d = {d}");
        assert_eq!(bits(&default.1), bits(&explicit.1), "d = {d}");
        let o = RefOpts { scale: 1.0 / (d as f64).sqrt(), softcap: 0.0, causal: false, window: (-1, -1) };
        let (ref_out, ref_lse) = reference_fwd(&q, &k, &v, 1, sq, sk, 1, 1, d, &o);
        let tol = Tolerance::new(DType::BF16, 1.0, o.scale * d as f64 * 4.0);
        check_close(&default.0, &default.1, &ref_out, &ref_lse, &tol).unwrap();
    }
}
