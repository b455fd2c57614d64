//! `flash_attn::candle` (feature `candle`): candle-flash-attn 0.11's functions on candle tensors, against a
//! naive attention composed from candle ops in f32 (q k^T * scale, softcap, masks built as tensors,
//! softmax, times v; GQA by repeating kv heads), on fresh random inputs (the seed is printed;
//! `FA_TEST_SEED=<seed>` replays a run):
//! forward dense (causal, windows, softcap, GQA, strided inputs; decoding steps, which CUDA runs on the KV
//! cache's decode kernels), varlen against per-sequence dense calls
//! of the reference, seqused, paged, `*_with_lse` against the reference's logsumexp, gradients through
//! candle's autograd (`Var` + `backward()`, loss = sum(out * w)) against the reference's, bad inputs
//! through every function and 300 random ill-formed calls (errors, never panics), and the same
//! comparisons on candle CUDA tensors when built with `candle-cuda` and a GPU is present (else
//! `SKIPPED candle cuda: ...`).
//!
//! Tolerances: inputs are rounded to bf16/f16 before both sides see them, so the differences are the
//! library's (f32 accumulation, P rounded to the input dtype on the GPU, out and gradients rounded to the
//! input dtype once): relative to the largest reference magnitude, out 2e-2 (bf16) / 4e-3 (f16), LSE 2e-3
//! absolute, gradients 6e-2 / 1.5e-2.

use candle_core::{DType, Device, Result, Tensor, Var};
use flash_attn::candle as fa;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------------------------------------------
// Random inputs

fn seed() -> u64 {
    let s = std::env::var("FA_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    println!("seed = {s} (FA_TEST_SEED={s} replays this run)");
    s
}

/// Uniform(-amp, amp) values of `shape`, rounded to `dtype` (returned in `dtype`, on the CPU).
fn rand_tensor(rng: &mut StdRng, shape: &[usize], amp: f32, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-amp..amp)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

fn u32s(v: &[u32], dev: &Device) -> Tensor {
    Tensor::new(v, dev).unwrap()
}

fn cumsum(lens: &[usize]) -> Vec<u32> {
    let mut c = vec![0u32];
    for &l in lens {
        c.push(c.last().unwrap() + l as u32);
    }
    c
}

// ---------------------------------------------------------------------------------------------------
// The naive reference (f32 candle ops; differentiable)

/// A window as candle-flash-attn resolves it against `bound` (the key length; `max_seqlen_k` for varlen):
/// `None` or a size above `bound` is unbounded (`None` here); left-only gets right = `bound`.
fn resolve(win: (Option<usize>, Option<usize>), bound: usize) -> (Option<usize>, Option<usize>) {
    let l = win.0.filter(|&w| w <= bound);
    let mut r = win.1.filter(|&w| w <= bound);
    if l.is_some() && r.is_none() {
        r = Some(bound);
    }
    (l, r)
}

/// Visible iff j >= i + sk - sq - left and j <= i + sk - sq + right, for a resolved window.
fn visible(i: usize, j: usize, sq: usize, sk: usize, (l, r): (Option<usize>, Option<usize>)) -> bool {
    let diag = i as i64 + sk as i64 - sq as i64;
    l.is_none_or(|l| j as i64 >= diag - l as i64) && r.is_none_or(|r| j as i64 <= diag + r as i64)
}

/// Reference attention on f32 `[B, Sq, Hq, D]`, `[B, Sk, Hk, D]`: (out `[B, Sq, Hq, D]`, lse `[B, Hq, Sq]`).
/// `win` is resolved (see `resolve`).
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, win: (Option<usize>, Option<usize>), softcap: f32) -> Result<(Tensor, Tensor)> {
    reference_with(q, k, v, scale, win, softcap, None)
}

/// `reference` with ALiBi: f32 slopes `[Hq]` or `[B, Hq]` add `-slope * |i + sk - sq - j|` to the
/// (scaled, softcapped) score of query i and key j.
fn reference_with(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, win: (Option<usize>, Option<usize>), softcap: f32, alibi: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    let (b, sq, hq, d) = q.dims4()?;
    let (_, sk, hk, _) = k.dims4()?;
    let dev = q.device();
    let rep = hq / hk;
    let expand = |t: &Tensor| -> Result<Tensor> { t.unsqueeze(3)?.broadcast_as((b, sk, hk, rep, d))?.contiguous()?.reshape((b, sk, hq, d)) };
    let qt = q.transpose(1, 2)?.contiguous()?;
    let kt = expand(k)?.transpose(1, 2)?.contiguous()?;
    let vt = expand(v)?.transpose(1, 2)?.contiguous()?;
    let mut s = (qt.matmul(&kt.t()?.contiguous()?)? * scale as f64)?;
    if softcap > 0.0 {
        s = ((s / softcap as f64)?.tanh()? * softcap as f64)?;
    }
    let mut m01 = vec![0f32; sq * sk];
    for i in 0..sq {
        for j in 0..sk {
            m01[i * sk + j] = if visible(i, j, sq, sk, win) { 1.0 } else { 0.0 };
        }
    }
    if let Some(slopes) = alibi {
        let dist: Vec<f32> = (0..sq * sk).map(|x| ((x / sk) as f32 + sk as f32 - sq as f32 - (x % sk) as f32).abs()).collect();
        let dist = Tensor::from_vec(dist, (1, 1, sq, sk), dev)?;
        let slopes = slopes.reshape((slopes.elem_count() / hq, hq, 1, 1))?;
        s = s.broadcast_sub(&slopes.broadcast_mul(&dist)?)?;
    }
    let mask01 = Tensor::from_vec(m01, (1, 1, sq, sk), dev)?;
    let maskneg = ((mask01.clone() - 1.0)? * 1e30)?;
    let s = s.broadcast_add(&maskneg)?;
    let m = s.max_keepdim(3)?.detach();
    let e = s.broadcast_sub(&m)?.exp()?.broadcast_mul(&mask01)?;
    let sum = e.sum_keepdim(3)?;
    let p = e.broadcast_div(&(&sum + 1e-30)?)?;
    let out = p.matmul(&vt)?.transpose(1, 2)?;
    let lse = (m + sum.log()?)?.squeeze(3)?;
    Ok((out, lse))
}

// ---------------------------------------------------------------------------------------------------
// Comparisons

fn host(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// max |a - b| (equal infinities count as 0) and max |b|.
fn max_err(a: &Tensor, b: &Tensor) -> (f32, f32) {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (a, b) = (host(a), host(b));
    let mut err = 0f32;
    let mut mag = 0f32;
    for (x, y) in a.iter().zip(&b) {
        assert!(!x.is_nan(), "NaN in the result");
        if x.is_infinite() || y.is_infinite() {
            assert_eq!(x, y, "infinities differ");
            continue;
        }
        err = err.max((x - y).abs());
        mag = mag.max(y.abs());
    }
    (err, mag)
}

fn out_tol(dt: DType) -> f32 {
    if dt == DType::BF16 { 2e-2 } else { 4e-3 }
}
fn grad_tol(dt: DType) -> f32 {
    if dt == DType::BF16 { 6e-2 } else { 1.5e-2 }
}

/// Relative to the reference's largest magnitude (at least 1e-2).
fn check(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let (err, mag) = max_err(got, want);
    let bound = tol * mag.max(1e-2);
    println!("  {what}: max err {err:.3e} (max |ref| {mag:.3e}, bound {bound:.3e})");
    assert!(err <= bound, "{what}: max err {err:e} > {bound:e} (max |ref| {mag:e})");
}

fn check_abs(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let (err, _) = max_err(got, want);
    println!("  {what}: max err {err:.3e} (bound {tol:.1e})");
    assert!(err <= tol, "{what}: max err {err:e} > {tol:e}");
}

fn f32v(t: &Tensor) -> Var {
    Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap()
}

// ---------------------------------------------------------------------------------------------------
// Dense

#[derive(Clone, Copy, Debug)]
struct Dense {
    b: usize,
    sq: usize,
    sk: usize,
    hq: usize,
    hk: usize,
    d: usize,
    win: (Option<usize>, Option<usize>),
    softcap: f32,
    dtype: DType,
}

fn dense_cases() -> Vec<Dense> {
    let c = |b, sq, sk, hq, hk, d, win, softcap, dtype| Dense { b, sq, sk, hq, hk, d, win, softcap, dtype };
    vec![
        c(2, 37, 37, 4, 4, 64, (None, None), 0.0, DType::BF16),
        c(2, 37, 37, 4, 4, 64, (None, Some(0)), 0.0, DType::F16),
        c(1, 19, 45, 6, 2, 128, (None, Some(0)), 0.0, DType::BF16),
        c(2, 45, 19, 4, 1, 32, (None, Some(0)), 0.0, DType::F16),
        c(1, 33, 40, 4, 2, 96, (Some(7), Some(3)), 0.0, DType::BF16),
        c(1, 40, 33, 2, 2, 64, (Some(5), None), 0.0, DType::F16),
        c(1, 30, 30, 2, 1, 256, (None, Some(4)), 0.0, DType::BF16),
        c(2, 28, 31, 4, 2, 192, (None, None), 30.0, DType::BF16),
        c(1, 24, 24, 2, 2, 64, (Some(3), Some(0)), 5.0, DType::F16),
        c(1, 16, 16, 2, 2, 64, (Some(100), Some(100)), 0.0, DType::BF16),
        // Left-only window: right becomes Sk (candle-flash-attn's rule), which binds when Sq > 2 Sk.
        c(1, 40, 12, 2, 2, 64, (Some(3), None), 0.0, DType::BF16),
        // Head dims without kernels of their own (zero-padded to 96, 64, 192, 32 by the adapter).
        c(2, 29, 33, 4, 2, 80, (None, Some(0)), 0.0, DType::BF16),
        c(1, 21, 21, 2, 2, 40, (None, None), 12.0, DType::F16),
        c(1, 17, 26, 2, 1, 160, (Some(4), Some(1)), 0.0, DType::BF16),
        c(1, 9, 9, 2, 2, 8, (None, Some(0)), 0.0, DType::F16),
    ]
}

/// Our call for a dense case through the most specific candle-flash-attn function that expresses it.
fn run_dense(c: &Dense, q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    match (c.win, c.softcap) {
        ((None, None), 0.0) => fa::flash_attn(q, k, v, scale, false),
        ((None, Some(0)), 0.0) => fa::flash_attn(q, k, v, scale, true),
        ((l, r), 0.0) => fa::flash_attn_windowed(q, k, v, scale, l, r),
        ((l, r), cap) => fa::flash_attn_alibi_windowed_softcap(q, k, v, None, scale, l, r, cap),
    }
}

fn dense_inputs(rng: &mut StdRng, c: &Dense) -> (Tensor, Tensor, Tensor) {
    let q = rand_tensor(rng, &[c.b, c.sq, c.hq, c.d], 2.0, c.dtype);
    let k = rand_tensor(rng, &[c.b, c.sk, c.hk, c.d], 2.0, c.dtype);
    let v = rand_tensor(rng, &[c.b, c.sk, c.hk, c.d], 1.0, c.dtype);
    (q, k, v)
}

/// Forward, LSE and gradients of one dense case on `dev`, against the reference on the CPU.
fn dense_case(rng: &mut StdRng, c: &Dense, dev: &Device) {
    println!("{c:?} on {:?}", dev.location());
    let (q, k, v) = dense_inputs(rng, c);
    let scale = 1.0 / (c.d as f32).sqrt() * rng.gen_range(0.5..1.5);
    let w = rand_tensor(rng, &[c.b, c.sq, c.hq, c.d], 1.0, DType::F32);

    // Reference (f32, CPU) with gradients.
    let (rq, rk, rv) = (f32v(&q), f32v(&k), f32v(&v));
    let (rout, rlse) = reference(rq.as_tensor(), rk.as_tensor(), rv.as_tensor(), scale, resolve(c.win, c.sk), c.softcap).unwrap();
    let rgrads = (&rout * &w).unwrap().sum_all().unwrap().backward().unwrap();

    // Ours.
    let [qv, kv, vv] = [&q, &k, &v].map(|t| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap());
    let out = run_dense(c, qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), scale).unwrap();
    assert_eq!(out.dims(), q.dims());
    assert_eq!(out.dtype(), c.dtype);
    check("out", &out, &rout, out_tol(c.dtype));
    let (out2, lse) = fa::flash_attn_windowed_softcap_with_lse(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), scale, c.win.0, c.win.1, c.softcap).unwrap();
    assert_eq!(lse.dims(), &[c.b, c.hq, c.sq]);
    assert_eq!(lse.dtype(), DType::F32);
    check_abs("lse", &lse, &rlse, 2e-3);
    check_abs("out == out of *_with_lse", &out2, &out, 0.0);

    let w_dev = w.to_device(dev).unwrap();
    let grads = (out.to_dtype(DType::F32).unwrap() * &w_dev).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, ours, theirs) in [("dq", &qv, &rq), ("dk", &kv, &rk), ("dv", &vv, &rv)] {
        let g = grads.get(ours.as_tensor()).expect("no gradient");
        assert_eq!(g.dims(), ours.dims());
        check(name, g, rgrads.get(theirs.as_tensor()).unwrap(), grad_tol(c.dtype));
    }
}

#[test]
fn dense_forward_lse_and_gradients() {
    let mut rng = StdRng::seed_from_u64(seed());
    // With the decoding steps' shapes (the CPU path runs `raw::fwd` for them; CUDA the KV cache's kernels).
    for c in dense_cases().into_iter().chain(decode_cases()) {
        dense_case(&mut rng, &c, &Device::Cpu);
    }
}

/// Empty batches, queries or keys: out and lse of the right shapes (rows that see no key: out 0, lse
/// -inf), and gradients through candle's autograd of the right shapes, all 0; the packed call with no rows.
#[test]
fn empty_tensors() {
    let mut rng = StdRng::seed_from_u64(seed());
    for (qs, ks) in [([0usize, 4, 2, 64], [0usize, 4, 2, 64]), ([1, 0, 2, 64], [1, 5, 2, 64]), ([1, 3, 2, 64], [1, 0, 2, 64])] {
        let (q, k, v) = (rand_tensor(&mut rng, &qs, 1.0, DType::BF16), rand_tensor(&mut rng, &ks, 1.0, DType::BF16), rand_tensor(&mut rng, &ks, 1.0, DType::BF16));
        let (out, lse) = fa::flash_attn_with_lse(&q, &k, &v, 0.125, false).unwrap();
        assert_eq!(out.dims(), &qs[..], "out for q {qs:?}, k {ks:?}");
        assert_eq!(lse.dims(), &[qs[0], qs[2], qs[1]][..], "lse for q {qs:?}, k {ks:?}");
        if ks[1] == 0 {
            assert!(host(&out).iter().all(|&x| x == 0.0), "out of rows that see no key");
            assert!(host(&lse).iter().all(|&x| x == f32::NEG_INFINITY), "lse of rows that see no key");
        }
        let (qv, kv, vv) = (Var::from_tensor(&q).unwrap(), Var::from_tensor(&k).unwrap(), Var::from_tensor(&v).unwrap());
        let out = fa::flash_attn(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), 0.125, true).unwrap();
        let grads = out.to_dtype(DType::F32).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var, shape) in [("q", &qv, &qs), ("k", &kv, &ks), ("v", &vv, &ks)] {
            // A gradient that nothing reached may be absent; one that is present is all 0.
            if let Some(g) = grads.get(var.as_tensor()) {
                assert_eq!(g.dims(), &shape[..], "d{name} for q {qs:?}, k {ks:?}");
                assert!(host(g).iter().all(|&x| x == 0.0), "d{name} for q {qs:?}, k {ks:?}");
            }
        }
    }
    let q = rand_tensor(&mut rng, &[0, 2, 64], 1.0, DType::BF16);
    let cu = u32s(&[0, 0], &Device::Cpu);
    let out = fa::flash_attn_varlen(&q, &q, &q, &cu, &cu, 0, 0, 0.125, false).unwrap();
    assert_eq!(out.dims(), &[0, 2, 64][..]);
}

/// Strided inputs: q/k/v as transposes of `[B, H, S, D]` tensors (strides passed through), and a q whose
/// head dim is not contiguous (copied first); a broadcast incoming gradient (loss = out.sum()). Also at a
/// head dim the adapter pads (80), whose padded copies must be conformed too, and q, k, v sliced out of a
/// fused qkv tensor there.
#[test]
fn dense_strided_inputs() {
    let mut rng = StdRng::seed_from_u64(seed());
    let (b, s, h) = (2, 21, 4);
    for (dtype, d) in [(DType::BF16, 64), (DType::F16, 64), (DType::BF16, 80), (DType::F16, 80)] {
        println!("{dtype:?}, head dim {d}");
        let qh = rand_tensor(&mut rng, &[b, h, s, d], 2.0, dtype);
        let kh = rand_tensor(&mut rng, &[b, h, s, d], 2.0, dtype);
        let vh = rand_tensor(&mut rng, &[b, h, s, d], 1.0, dtype);
        let (q, k, v) = (qh.transpose(1, 2).unwrap(), kh.transpose(1, 2).unwrap(), vh.transpose(1, 2).unwrap());
        assert!(!q.is_contiguous());
        let scale = 0.125;
        let (rout, _) = reference(&q.to_dtype(DType::F32).unwrap(), &k.to_dtype(DType::F32).unwrap(), &v.to_dtype(DType::F32).unwrap(), scale, (None, Some(0)), 0.0).unwrap();
        let out = fa::flash_attn(&q, &k, &v, scale, true).unwrap();
        check("out (strided q/k/v)", &out, &rout, out_tol(dtype));
        // q, k, v as slices of one fused [B, S, 3, H, D] tensor.
        let qkv = Tensor::stack(&[&q, &k, &v], 2).unwrap();
        let [qs, ks, vs] = [0, 1, 2].map(|i| qkv.narrow(2, i, 1).unwrap().squeeze(2).unwrap());
        assert!(!qs.is_contiguous());
        let out = fa::flash_attn(&qs, &ks, &vs, scale, true).unwrap();
        check("out (slices of a fused qkv)", &out, &rout, out_tol(dtype));
        // q with the head dim strided: [B, S, H, D] from a [B, S, D, H] tensor.
        let qt = q.contiguous().unwrap().transpose(2, 3).unwrap().contiguous().unwrap().transpose(2, 3).unwrap();
        assert_eq!(qt.stride()[3], h);
        let out = fa::flash_attn(&qt, &k, &v, scale, true).unwrap();
        check("out (head dim strided)", &out, &rout, out_tol(dtype));

        // Gradients with a broadcast (stride 0) incoming gradient, through the strided views.
        let [qv, kv, vv] = [&qh, &kh, &vh].map(|t| Var::from_tensor(t).unwrap());
        let out = fa::flash_attn(&qv.transpose(1, 2).unwrap(), &kv.transpose(1, 2).unwrap(), &vv.transpose(1, 2).unwrap(), scale, true).unwrap();
        let grads = out.sum_all().unwrap().backward().unwrap();
        let (rq, rk, rv) = (f32v(&qh), f32v(&kh), f32v(&vh));
        let (rout, _) = reference(&rq.transpose(1, 2).unwrap(), &rk.transpose(1, 2).unwrap(), &rv.transpose(1, 2).unwrap(), scale, (None, Some(0)), 0.0).unwrap();
        let rgrads = rout.sum_all().unwrap().backward().unwrap();
        for (name, ours, theirs) in [("dq", &qv, &rq), ("dk", &kv, &rk), ("dv", &vv, &rv)] {
            check(name, grads.get(ours.as_tensor()).unwrap(), rgrads.get(theirs.as_tensor()).unwrap(), grad_tol(dtype));
        }
    }
}

/// candle-flash-attn's `FlashAttn` op struct applied directly: the same forward and gradients as the
/// functions.
#[test]
fn op_struct_matches_functions() {
    let mut rng = StdRng::seed_from_u64(seed());
    let c = Dense { b: 2, sq: 23, sk: 29, hq: 4, hk: 2, d: 64, win: (Some(9), Some(0)), softcap: 0.0, dtype: DType::BF16 };
    let (q, k, v) = dense_inputs(&mut rng, &c);
    let w = rand_tensor(&mut rng, &[c.b, c.sq, c.hq, c.d], 1.0, DType::F32);
    let op = || fa::FlashAttn { softmax_scale: 0.11, alibi_slopes: None, window_size_left: c.win.0, window_size_right: c.win.1, softcap: None };
    let [q1, k1, v1] = [&q, &k, &v].map(|t| Var::from_tensor(t).unwrap());
    let [q2, k2, v2] = [&q, &k, &v].map(|t| Var::from_tensor(t).unwrap());
    let out1 = q1.apply_op3(&k1, &v1, op()).unwrap();
    let out2 = fa::flash_attn_windowed(&q2, &k2, &v2, 0.11, c.win.0, c.win.1).unwrap();
    check_abs("FlashAttn op out vs flash_attn_windowed", &out1, &out2, 0.0);
    let g1 = (out1.to_dtype(DType::F32).unwrap() * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (out2.to_dtype(DType::F32).unwrap() * &w).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, a, b) in [("dq", &q1, &q2), ("dk", &k1, &k2), ("dv", &v1, &v2)] {
        check_abs(name, g1.get(a.as_tensor()).unwrap(), g2.get(b.as_tensor()).unwrap(), 0.0);
    }
    let alibi = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    expect_err("FlashAttn op with alibi [Hq - 1]", || q.apply_op3(&k, &v, fa::FlashAttn { alibi_slopes: Some(alibi.clone()), ..op() }));
    expect_err("FlashAttn op with rank-3 k", || q.apply_op3(&k.get(0).unwrap(), &v, op()));
    expect_err("FlashAttn op with f32", || q.to_dtype(DType::F32)?.apply_op3(&k.to_dtype(DType::F32)?, &v.to_dtype(DType::F32)?, op()));
}

// ---------------------------------------------------------------------------------------------------
// Varlen, seqused, paged

#[derive(Clone, Debug)]
struct Packed {
    /// Rows of each slot (the cumulative lengths' differences).
    slots_q: Vec<usize>,
    slots_k: Vec<usize>,
    /// Used rows of each slot (seqused; equal to the slots without it).
    used_q: Option<Vec<usize>>,
    used_k: Option<Vec<usize>>,
    /// Rows after the last slot (no sequence's).
    tail_q: usize,
    hq: usize,
    hk: usize,
    d: usize,
    win: (Option<usize>, Option<usize>),
    softcap: f32,
    dtype: DType,
}

fn packed_cases(rng: &mut StdRng) -> Vec<Packed> {
    let mut lens = |n: usize, max: usize| -> Vec<usize> { (0..n).map(|_| rng.gen_range(0..=max)).collect() };
    let (a, b2, c, d, e, f) = (lens(3, 40), lens(3, 40), lens(4, 30), lens(4, 30), lens(2, 50), lens(2, 50));
    let p = |slots_q: Vec<usize>, slots_k: Vec<usize>, hq, hk, d, win, softcap, dtype| Packed {
        slots_q,
        slots_k,
        used_q: None,
        used_k: None,
        tail_q: 0,
        hq,
        hk,
        d,
        win,
        softcap,
        dtype,
    };
    let mut cases = vec![
        p(a.clone(), b2.clone(), 4, 2, 64, (None, None), 0.0, DType::BF16),
        p(a.clone(), a.clone(), 4, 4, 128, (None, Some(0)), 0.0, DType::F16),
        p(c.clone(), d.clone(), 6, 2, 32, (None, Some(0)), 0.0, DType::BF16),
        p(e.clone(), f.clone(), 2, 1, 96, (Some(6), Some(2)), 0.0, DType::F16),
        p(vec![17, 0, 33], vec![25, 9, 0], 2, 2, 64, (None, None), 20.0, DType::BF16),
        // Windows resolve against max_seqlen_k (30), not each sequence's length (as candle-flash-attn).
        p(vec![8, 5], vec![1, 30], 2, 1, 64, (Some(6), Some(2)), 0.0, DType::F16),
        // A head dim without kernels of its own (zero-padded to 96 by the adapter).
        p(c.clone(), d.clone(), 4, 2, 80, (None, Some(0)), 0.0, DType::BF16),
    ];
    // seqused: slots with padding, used <= slot; and rows past the last slot.
    let mut s = p(vec![20, 31, 12], vec![24, 18, 30], 4, 2, 64, (None, Some(0)), 0.0, DType::BF16);
    s.used_q = Some(vec![13, 31, 0]);
    s.used_k = Some(vec![24, 7, 19]);
    s.tail_q = 5;
    cases.push(s);
    let mut s = p(vec![16, 16], vec![40, 40], 2, 2, 128, (Some(9), Some(0)), 0.0, DType::F16);
    s.used_k = Some(vec![33, 12]);
    cases.push(s);
    let mut s = p(vec![16, 16, 8], vec![16, 16, 8], 2, 1, 64, (None, None), 0.0, DType::BF16);
    s.used_q = Some(vec![9, 16, 3]);
    cases.push(s);
    cases
}

fn rows(p: &Packed, side_q: bool) -> (Vec<usize>, Vec<usize>) {
    if side_q {
        (p.slots_q.clone(), p.used_q.clone().unwrap_or_else(|| p.slots_q.clone()))
    } else {
        (p.slots_k.clone(), p.used_k.clone().unwrap_or_else(|| p.slots_k.clone()))
    }
}

/// The reference over a packed layout: per-sequence dense calls over the used rows of each slot, zeros
/// (lse -inf) elsewhere. q, k, v f32 `[T, H, D]`; returns out `[Tq, Hq, D]`, lse `[Hq, Tq]`.
fn reference_packed(p: &Packed, q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<(Tensor, Tensor)> {
    let (slots_q, used_q) = rows(p, true);
    let (slots_k, used_k) = rows(p, false);
    let (cq, ck) = (cumsum(&slots_q), cumsum(&slots_k));
    let win = resolve(p.win, used_k.iter().copied().max().unwrap_or(0));
    let dev = q.device();
    let mut outs = vec![];
    let mut lses = vec![];
    let pad = |n: usize, outs: &mut Vec<Tensor>, lses: &mut Vec<Tensor>| -> Result<()> {
        if n > 0 {
            outs.push(Tensor::zeros((n, p.hq, p.d), DType::F32, dev)?);
            lses.push(Tensor::full(f32::NEG_INFINITY, (p.hq, n), dev)?);
        }
        Ok(())
    };
    for b in 0..slots_q.len() {
        let (uq, uk) = (used_q[b], used_k[b]);
        if uq > 0 {
            let qb = q.narrow(0, cq[b] as usize, uq)?.unsqueeze(0)?;
            let kb = k.narrow(0, ck[b] as usize, uk)?.unsqueeze(0)?;
            let vb = v.narrow(0, ck[b] as usize, uk)?.unsqueeze(0)?;
            let (o, l) = if uk > 0 {
                reference(&qb, &kb, &vb, scale, win, p.softcap)?
            } else {
                (Tensor::zeros((1, uq, p.hq, p.d), DType::F32, dev)?, Tensor::full(f32::NEG_INFINITY, (1, p.hq, uq), dev)?)
            };
            outs.push(o.squeeze(0)?);
            lses.push(l.squeeze(0)?);
        }
        pad(slots_q[b] - uq, &mut outs, &mut lses)?;
    }
    pad(p.tail_q, &mut outs, &mut lses)?;
    if outs.is_empty() {
        return Ok((Tensor::zeros((0, p.hq, p.d), DType::F32, dev)?, Tensor::zeros((p.hq, 0), DType::F32, dev)?));
    }
    Ok((Tensor::cat(&outs, 0)?, Tensor::cat(&lses, 1)?))
}

/// Our call for a packed case through the most specific function that expresses it; (out, lse).
fn run_packed(p: &Packed, q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, dev: &Device) -> Result<(Tensor, Option<Tensor>)> {
    let (slots_q, used_q) = rows(p, true);
    let (slots_k, used_k) = rows(p, false);
    let (cq, ck) = (u32s(&cumsum(&slots_q), dev), u32s(&cumsum(&slots_k), dev));
    let (mq, mk) = (used_q.iter().copied().max().unwrap_or(0), used_k.iter().copied().max().unwrap_or(0));
    if p.used_q.is_some() || p.used_k.is_some() {
        let uq = p.used_q.as_ref().map(|u| u32s(&u.iter().map(|&x| x as u32).collect::<Vec<_>>(), dev));
        let uk = p.used_k.as_ref().map(|u| u32s(&u.iter().map(|&x| x as u32).collect::<Vec<_>>(), dev));
        let out = fa::flash_attn_varlen_seqused(q, k, v, &cq, &ck, uq.as_ref(), uk.as_ref(), mq, mk, scale, p.win.0, p.win.1, p.softcap)?;
        let (out2, lse) = fa::flash_attn_varlen_seqused_with_lse(q, k, v, &cq, &ck, uq.as_ref(), uk.as_ref(), mq, mk, scale, p.win.0, p.win.1, p.softcap)?;
        check_abs("out == out of *_with_lse", &out2, &out, 0.0);
        return Ok((out, Some(lse)));
    }
    let out = match (p.win, p.softcap) {
        ((None, None), 0.0) => fa::flash_attn_varlen(q, k, v, &cq, &ck, mq, mk, scale, false)?,
        ((None, Some(0)), 0.0) => fa::flash_attn_varlen(q, k, v, &cq, &ck, mq, mk, scale, true)?,
        ((l, r), 0.0) => fa::flash_attn_varlen_windowed(q, k, v, &cq, &ck, mq, mk, scale, l, r)?,
        ((l, r), cap) => fa::flash_attn_varlen_alibi_windowed_softcap(q, k, v, None, &cq, &ck, mq, mk, scale, l, r, cap)?,
    };
    let (out2, lse) = fa::flash_attn_varlen_windowed_softcap_with_lse(q, k, v, &cq, &ck, mq, mk, scale, p.win.0, p.win.1, p.softcap)?;
    check_abs("out == out of *_with_lse", &out2, &out, 0.0);
    if p.win == (None, Some(0)) && p.softcap == 0.0 {
        let (out3, lse3) = fa::flash_attn_varlen_with_lse(q, k, v, &cq, &ck, mq, mk, scale, true)?;
        check_abs("flash_attn_varlen_with_lse out", &out3, &out, 0.0);
        check_abs("flash_attn_varlen_with_lse lse", &lse3, &lse, 0.0);
    }
    Ok((out, Some(lse)))
}

fn packed_case(rng: &mut StdRng, p: &Packed, dev: &Device) {
    println!("{p:?} on {:?}", dev.location());
    let tq = p.slots_q.iter().sum::<usize>() + p.tail_q;
    let tk = p.slots_k.iter().sum::<usize>();
    let q = rand_tensor(rng, &[tq, p.hq, p.d], 2.0, p.dtype);
    let k = rand_tensor(rng, &[tk, p.hk, p.d], 2.0, p.dtype);
    let v = rand_tensor(rng, &[tk, p.hk, p.d], 1.0, p.dtype);
    let w = rand_tensor(rng, &[tq, p.hq, p.d], 1.0, DType::F32);
    let scale = 1.0 / (p.d as f32).sqrt();

    let (rq, rk, rv) = (f32v(&q), f32v(&k), f32v(&v));
    let (rout, rlse) = reference_packed(p, rq.as_tensor(), rk.as_tensor(), rv.as_tensor(), scale).unwrap();
    let rgrads = (&rout * &w).unwrap().sum_all().unwrap().backward().unwrap();

    let [qv, kv, vv] = [&q, &k, &v].map(|t| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap());
    let (out, lse) = run_packed(p, qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), scale, dev).unwrap();
    assert_eq!(out.dims(), q.dims());
    check("out", &out, &rout, out_tol(p.dtype));
    if let Some(lse) = lse {
        assert_eq!(lse.dims(), &[p.hq, tq]);
        check_abs("lse", &lse, &rlse, 2e-3);
    }
    let grads = (out.to_dtype(DType::F32).unwrap() * w.to_device(dev).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, ours, theirs) in [("dq", &qv, &rq), ("dk", &kv, &rk), ("dv", &vv, &rv)] {
        let want = rgrads.get(theirs.as_tensor()).cloned().unwrap_or_else(|| theirs.zeros_like().unwrap());
        check(name, grads.get(ours.as_tensor()).expect("no gradient"), &want, grad_tol(p.dtype));
    }
}

#[test]
fn varlen_and_seqused_forward_lse_and_gradients() {
    let mut rng = StdRng::seed_from_u64(seed());
    for p in packed_cases(&mut rng) {
        packed_case(&mut rng, &p, &Device::Cpu);
    }
}

/// i32 cumulative lengths work like u32 ones.
#[test]
fn varlen_i32_seqlens() {
    let mut rng = StdRng::seed_from_u64(seed());
    let (hq, d) = (2, 64);
    let lens = [13usize, 29, 7];
    let t: usize = lens.iter().sum();
    let q = rand_tensor(&mut rng, &[t, hq, d], 2.0, DType::BF16);
    let k = rand_tensor(&mut rng, &[t, hq, d], 2.0, DType::BF16);
    let v = rand_tensor(&mut rng, &[t, hq, d], 1.0, DType::BF16);
    let cu = cumsum(&lens);
    let cu_u = u32s(&cu, &Device::Cpu);
    let cu_i = Tensor::new(cu.iter().map(|&x| x as i32).collect::<Vec<_>>().as_slice(), &Device::Cpu).unwrap();
    let a = fa::flash_attn_varlen(&q, &k, &v, &cu_u, &cu_u, 29, 29, 0.125, true).unwrap();
    let b = fa::flash_attn_varlen(&q, &k, &v, &cu_i, &cu_i, 29, 29, 0.125, true).unwrap();
    check_abs("i32 == u32 seqlens", &a, &b, 0.0);
}

/// A paged K/V cache and the same keys laid out contiguously (varlen), for comparing the two.
struct PagedSetup {
    q: Tensor,
    /// The cache `[nblocks, pbs, Hk, D]`.
    kc: Tensor,
    vc: Tensor,
    /// Each sequence's keys in order, packed `[Tk, Hk, D]`.
    k: Tensor,
    v: Tensor,
    /// Row of the flattened cache each packed key comes from (to map packed gradients onto the cache).
    map: Vec<u32>,
    table: Vec<u32>,
    batch: usize,
    max_blocks: usize,
    nblocks: usize,
    pbs: usize,
    cq: Vec<u32>,
    ck: Vec<u32>,
    max_q: usize,
    max_k: usize,
    /// Loss weights: loss = sum(out * w).
    w: Tensor,
}

/// Random lengths (some 0), a random block table over a cache with `spare` blocks no sequence uses,
/// garbage entries past each sequence's blocks (and a spare column), and with `share` the first block
/// of sequence 1 also sequence 0's (prefix sharing: its gradients sum).
#[allow(clippy::too_many_arguments)]
fn paged_setup(rng: &mut StdRng, pbs: usize, hq: usize, hk: usize, d: usize, lens_q: &[usize], lens_k: &[usize], spare: usize, share: bool, dtype: DType) -> PagedSetup {
    let batch = lens_q.len();
    let need: Vec<usize> = lens_k.iter().map(|l| l.div_ceil(pbs)).collect();
    let max_blocks = need.iter().copied().max().unwrap_or(0) + 1;
    let nblocks = need.iter().sum::<usize>() + spare;
    let mut perm: Vec<u32> = (0..nblocks as u32).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, rng.gen_range(0..=i));
    }
    let mut next = perm.into_iter();
    let mut table = vec![0u32; batch * max_blocks];
    for b in 0..batch {
        for s in 0..max_blocks {
            table[b * max_blocks + s] = if s < need[b] { next.next().unwrap() } else { [u32::MAX - s as u32, rng.gen_range(0..1000), nblocks as u32][s % 3] };
        }
    }
    if share && batch > 1 && need[0] > 0 && need[1] > 0 {
        table[max_blocks] = table[0];
    }
    let kc = rand_tensor(rng, &[nblocks, pbs, hk, d], 2.0, dtype);
    let vc = rand_tensor(rng, &[nblocks, pbs, hk, d], 1.0, dtype);
    let q = rand_tensor(rng, &[lens_q.iter().sum(), hq, d], 2.0, dtype);
    let mut map = vec![];
    for b in 0..batch {
        for j in 0..lens_k[b] {
            map.push(table[b * max_blocks + j / pbs] * pbs as u32 + (j % pbs) as u32);
        }
    }
    let rows = Tensor::new(map.as_slice(), &Device::Cpu).unwrap();
    let gather = |c: &Tensor| c.reshape((nblocks * pbs, hk, d)).unwrap().index_select(&rows, 0).unwrap();
    let (k, v) = (gather(&kc), gather(&vc));
    let max_q = lens_q.iter().copied().max().unwrap_or(0);
    let max_k = lens_k.iter().copied().max().unwrap_or(0);
    let w = rand_tensor(rng, q.dims(), 1.0, DType::F32);
    PagedSetup { q, kc, vc, k, v, map, table, batch, max_blocks, nblocks, pbs, cq: cumsum(lens_q), ck: cumsum(lens_k), max_q, max_k, w }
}

/// Forward and gradients of the paged call on `dev` against varlen over the contiguous keys on the CPU
/// (the packed dk, dv summed onto the cache rows they come from): bitwise on the CPU (`exact`), else
/// within the tolerances. `table_i32`: the block table as i32 (garbage entries as -1 or beyond).
fn paged_vs_contiguous(p: &PagedSetup, dev: &Device, win: (Option<usize>, Option<usize>), softcap: f32, table_i32: bool, exact: bool) {
    let dtype = p.q.dtype();
    let (hk, d) = (p.kc.dim(2).unwrap(), p.kc.dim(3).unwrap());
    let scale = 1.0 / (d as f32).sqrt();
    let w = &p.w;
    let cpu = Device::Cpu;

    // Varlen over the contiguous keys, on the CPU.
    let [rq, rk, rv] = [&p.q, &p.k, &p.v].map(|t| Var::from_tensor(t).unwrap());
    let (cq, ck) = (u32s(&p.cq, &cpu), u32s(&p.ck, &cpu));
    let want = fa::flash_attn_varlen_alibi_windowed_softcap(&rq, &rk, &rv, None, &cq, &ck, p.max_q, p.max_k, scale, win.0, win.1, softcap).unwrap();
    let rgrads = (want.to_dtype(DType::F32).unwrap() * w).unwrap().sum_all().unwrap().backward().unwrap();
    let rows = Tensor::new(p.map.as_slice(), &cpu).unwrap();
    let onto_cache = |g: &Tensor| {
        Tensor::zeros((p.nblocks * p.pbs, hk, d), dtype, &cpu).unwrap().index_add(&rows, g, 0).unwrap().reshape(p.kc.dims()).unwrap()
    };
    let want_dk = onto_cache(rgrads.get(&rk).unwrap());
    let want_dv = onto_cache(rgrads.get(&rv).unwrap());

    // Paged, on `dev`.
    let [q, kc, vc] = [&p.q, &p.kc, &p.vc].map(|t| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap());
    let table = if table_i32 {
        let t: Vec<i32> = p.table.iter().map(|&x| if x >= p.nblocks as u32 { -1 } else { x as i32 }).collect();
        Tensor::new(t.as_slice(), &cpu).unwrap().to_device(dev).unwrap()
    } else {
        u32s(&p.table, dev)
    };
    let table = table.reshape((p.batch, p.max_blocks)).unwrap();
    let got = fa::flash_attn_varlen_paged_windowed(&q, &kc, &vc, &u32s(&p.cq, dev), &u32s(&p.ck, dev), &table, None, p.max_q, p.max_k, scale, win.0, win.1, p.pbs, Some(softcap))
        .unwrap();
    assert_eq!(got.dims(), p.q.dims());
    let grads = (got.to_dtype(DType::F32).unwrap() * w.to_device(dev).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
    let (dq, dk, dv) = (grads.get(&q).expect("no dq"), grads.get(&kc).expect("no dk"), grads.get(&vc).expect("no dv"));
    assert_eq!(dk.dims(), p.kc.dims());
    let results = [("out", &got, &want, out_tol(dtype)), ("dq", dq, rgrads.get(&rq).unwrap(), grad_tol(dtype)), ("dk", dk, &want_dk, grad_tol(dtype)), ("dv", dv, &want_dv, grad_tol(dtype))];
    for (name, got, want, tol) in results {
        if exact {
            check_abs(&format!("paged {name} == contiguous"), got, want, 0.0);
        } else {
            check(&format!("paged {name} vs contiguous"), got, want, tol);
        }
    }
}

/// Page sizes 1, 3, 16 (and any others given), random tables with spare blocks, shared blocks, GQA,
/// windows, softcap, u32 and i32 tables.
fn paged_cases(rng: &mut StdRng, dev: &Device, page_sizes: &[usize], exact: bool) {
    for &pbs in page_sizes {
        for (i, dtype) in [DType::BF16, DType::F16].into_iter().enumerate() {
            let mut lens = |n: usize, max: usize| -> Vec<usize> { (0..n).map(|_| rng.gen_range(0..=max)).collect() };
            let (lens_q, mut lens_k) = (lens(3, 12), lens(3, 45));
            lens_k[1] = lens_k[1].max(1);
            lens_k[0] = lens_k[0].max(pbs); // sequence 0 has a first block to share
            // d 80: a head dim without kernels of its own (the adapter pads the whole cache to 96).
            let (hq, hk, d) = [(4, 2, 64), (2, 2, 80)][i];
            let p = paged_setup(rng, pbs, hq, hk, d, &lens_q, &lens_k, 5, i == 1, dtype);
            for (win, softcap) in [((None, None), 0.0), ((None, Some(0)), 0.0), ((Some(5), Some(2)), 0.0), ((None, Some(0)), 15.0)] {
                println!("paged pbs {pbs} {dtype:?} lens_q {lens_q:?} lens_k {lens_k:?} hq {hq} hk {hk} d {d} win {win:?} softcap {softcap} shared {} on {:?}", i == 1, dev.location());
                paged_vs_contiguous(&p, dev, win, softcap, false, exact);
            }
            println!("paged pbs {pbs} i32 table on {:?}", dev.location());
            paged_vs_contiguous(&p, dev, (None, Some(0)), 0.0, true, exact);
        }
    }
}

#[test]
fn paged_matches_contiguous_bitwise() {
    let mut rng = StdRng::seed_from_u64(seed());
    paged_cases(&mut rng, &Device::Cpu, &[1, 3, 16], true);
}

// ---------------------------------------------------------------------------------------------------
// ALiBi

/// ALiBi slopes f32 `[Hq]` or `[B, Hq]` (`per_batch`), on the CPU.
fn slopes(rng: &mut StdRng, b: usize, hq: usize, per_batch: bool) -> Tensor {
    let n = if per_batch { b * hq } else { hq };
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(0.02f32..0.8)).collect();
    let t = Tensor::from_vec(v, n, &Device::Cpu).unwrap();
    if per_batch { t.reshape((b, hq)).unwrap() } else { t }
}

/// Dense ALiBi through every function that takes slopes (and the op struct): forward and gradients
/// against the reference.
#[test]
fn alibi_dense_forward_and_gradients() {
    let mut rng = StdRng::seed_from_u64(seed());
    alibi_dense_cases(&mut rng, &Device::Cpu);
}

/// `alibi_dense_forward_and_gradients` with q, k, v, the slopes and the loss weights on `dev` (the
/// reference on the CPU).
fn alibi_dense_cases(rng: &mut StdRng, dev: &Device) {
    let c = |b, sq, sk, hq, hk, d, win, softcap, dtype| Dense { b, sq, sk, hq, hk, d, win, softcap, dtype };
    let cases = [
        c(2, 29, 29, 4, 2, 64, (None, None), 0.0, DType::BF16),
        c(2, 19, 37, 4, 4, 64, (None, Some(0)), 0.0, DType::F16),
        c(1, 37, 19, 6, 2, 128, (None, Some(0)), 0.0, DType::BF16),
        c(2, 24, 31, 2, 1, 32, (Some(6), Some(3)), 0.0, DType::F16),
        c(1, 30, 30, 4, 2, 96, (Some(4), Some(0)), 8.0, DType::BF16),
        c(2, 17, 23, 2, 2, 64, (None, None), 12.0, DType::F16),
    ];
    for (i, c) in cases.iter().enumerate() {
        for per_batch in [false, true] {
            println!("alibi {c:?} per_batch {per_batch} on {:?}", dev.location());
            let (q, k, v) = dense_inputs(rng, c);
            let al = slopes(rng, c.b, c.hq, per_batch);
            let scale = 1.0 / (c.d as f32).sqrt();
            let w = rand_tensor(rng, &[c.b, c.sq, c.hq, c.d], 1.0, DType::F32);
            let (rq, rk, rv) = (f32v(&q), f32v(&k), f32v(&v));
            let (rout, _) = reference_with(rq.as_tensor(), rk.as_tensor(), rv.as_tensor(), scale, resolve(c.win, c.sk), c.softcap, Some(&al)).unwrap();
            let rgrads = (&rout * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (q, k, v, al, w) = (q.to_device(dev).unwrap(), k.to_device(dev).unwrap(), v.to_device(dev).unwrap(), al.to_device(dev).unwrap(), w.to_device(dev).unwrap());
            let [qv, kv, vv] = [&q, &k, &v].map(|t| Var::from_tensor(t).unwrap());
            let (qt, kt, vt) = (qv.as_tensor(), kv.as_tensor(), vv.as_tensor());
            let out = match (c.win, c.softcap, i % 2) {
                ((None, None), 0.0, _) => fa::flash_attn_alibi(qt, kt, vt, &al, scale, false),
                ((None, Some(0)), 0.0, 0) => fa::flash_attn_alibi(qt, kt, vt, &al, scale, true),
                ((l, r), 0.0, _) => fa::flash_attn_alibi_windowed(qt, kt, vt, &al, scale, l, r),
                ((l, r), cap, _) => fa::flash_attn_alibi_windowed_softcap(qt, kt, vt, Some(&al), scale, l, r, cap),
            }
            .unwrap();
            check("out", &out, &rout, out_tol(c.dtype));
            let grads = (out.to_dtype(DType::F32).unwrap() * &w).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, ours, theirs) in [("dq", &qv, &rq), ("dk", &kv, &rk), ("dv", &vv, &rv)] {
                check(name, grads.get(ours.as_tensor()).expect("no gradient"), rgrads.get(theirs.as_tensor()).unwrap(), grad_tol(c.dtype));
            }
            // The op struct: the same forward and gradients.
            if c.softcap == 0.0 {
                let op = fa::FlashAttn { softmax_scale: scale, alibi_slopes: Some(al.clone()), window_size_left: c.win.0, window_size_right: c.win.1, softcap: None };
                let [q2, k2, v2] = [&q, &k, &v].map(|t| Var::from_tensor(t).unwrap());
                let out2 = q2.apply_op3(&k2, &v2, op).unwrap();
                check_abs("FlashAttn op (alibi) out", &out2, &out, 0.0);
                let g2 = (out2.to_dtype(DType::F32).unwrap() * &w).unwrap().sum_all().unwrap().backward().unwrap();
                for (name, a, b) in [("dq", &q2, &qv), ("dk", &k2, &kv), ("dv", &v2, &vv)] {
                    check_abs(&format!("FlashAttn op (alibi) {name}"), g2.get(a.as_tensor()).unwrap(), grads.get(b.as_tensor()).unwrap(), 0.0);
                }
            }
        }
    }
}

/// Varlen ALiBi (slopes over each sequence's own lengths) through every varlen function that takes
/// them: forward and gradients against per-sequence reference calls.
#[test]
fn alibi_varlen_forward_and_gradients() {
    let mut rng = StdRng::seed_from_u64(seed());
    alibi_varlen_cases(&mut rng, &Device::Cpu);
}

/// `alibi_varlen_forward_and_gradients` with every tensor of the call on `dev` (the reference on the
/// CPU).
fn alibi_varlen_cases(rng: &mut StdRng, dev: &Device) {
    let cases = [
        (vec![13usize, 0, 29], vec![21usize, 7, 29], 4, 2, 64, (None, None), 0.0, DType::BF16),
        (vec![9, 31], vec![40, 31], 4, 4, 128, (None, Some(0)), 0.0, DType::F16),
        (vec![17, 5, 22], vec![17, 12, 3], 2, 1, 64, (Some(5), Some(1)), 0.0, DType::BF16),
        (vec![11, 20], vec![25, 8], 4, 2, 32, (None, Some(0)), 10.0, DType::F16),
    ];
    for (lens_q, lens_k, hq, hk, d, win, softcap, dtype) in cases {
        for per_batch in [false, true] {
            println!("varlen alibi lens_q {lens_q:?} lens_k {lens_k:?} hq {hq} hk {hk} d {d} win {win:?} softcap {softcap} {dtype:?} per_batch {per_batch} on {:?}", dev.location());
            let batch = lens_q.len();
            let (tq, tk) = (lens_q.iter().sum::<usize>(), lens_k.iter().sum::<usize>());
            let q = rand_tensor(rng, &[tq, hq, d], 2.0, dtype);
            let k = rand_tensor(rng, &[tk, hk, d], 2.0, dtype);
            let v = rand_tensor(rng, &[tk, hk, d], 1.0, dtype);
            let w = rand_tensor(rng, &[tq, hq, d], 1.0, DType::F32);
            let al = slopes(rng, batch, hq, per_batch);
            let scale = 1.0 / (d as f32).sqrt();
            let (mq, mk) = (*lens_q.iter().max().unwrap(), *lens_k.iter().max().unwrap());
            let (cq, ck) = (cumsum(&lens_q), cumsum(&lens_k));

            // Reference: one dense call per sequence.
            let (rq, rk, rv) = (f32v(&q), f32v(&k), f32v(&v));
            let mut outs = vec![];
            for b in 0..batch {
                let (lq, lk) = (lens_q[b], lens_k[b]);
                if lq == 0 {
                    continue;
                }
                let qb = rq.narrow(0, cq[b] as usize, lq).unwrap().unsqueeze(0).unwrap();
                let kb = rk.narrow(0, ck[b] as usize, lk).unwrap().unsqueeze(0).unwrap();
                let vb = rv.narrow(0, ck[b] as usize, lk).unwrap().unsqueeze(0).unwrap();
                let sb = if per_batch { al.get(b).unwrap() } else { al.clone() };
                outs.push(reference_with(&qb, &kb, &vb, scale, resolve(win, mk), softcap, Some(&sb)).unwrap().0.squeeze(0).unwrap());
            }
            let rout = Tensor::cat(&outs, 0).unwrap();
            let rgrads = (&rout * &w).unwrap().sum_all().unwrap().backward().unwrap();

            let (q, k, v, al, w) = (q.to_device(dev).unwrap(), k.to_device(dev).unwrap(), v.to_device(dev).unwrap(), al.to_device(dev).unwrap(), w.to_device(dev).unwrap());
            let [qv, kv, vv] = [&q, &k, &v].map(|t| Var::from_tensor(t).unwrap());
            let (qt, kt, vt) = (qv.as_tensor(), kv.as_tensor(), vv.as_tensor());
            let (cqt, ckt) = (u32s(&cq, dev), u32s(&ck, dev));
            let out = match (win, softcap) {
                ((None, None), 0.0) => fa::flash_attn_varlen_alibi(qt, kt, vt, &al, &cqt, &ckt, mq, mk, scale, false),
                ((None, Some(0)), 0.0) => fa::flash_attn_varlen_alibi(qt, kt, vt, &al, &cqt, &ckt, mq, mk, scale, true),
                ((l, r), 0.0) => fa::flash_attn_varlen_alibi_windowed(qt, kt, vt, &al, &cqt, &ckt, mq, mk, scale, l, r),
                ((l, r), cap) => fa::flash_attn_varlen_alibi_windowed_softcap(qt, kt, vt, Some(&al), &cqt, &ckt, mq, mk, scale, l, r, cap),
            }
            .unwrap();
            check("out", &out, &rout, out_tol(dtype));
            if softcap == 0.0 {
                let out2 = fa::flash_attn_varlen_alibi_windowed(qt, kt, vt, &al, &cqt, &ckt, mq, mk, scale, win.0, win.1).unwrap();
                check_abs("varlen_alibi_windowed == the same call", &out2, &out, 0.0);
            }
            let grads = (out.to_dtype(DType::F32).unwrap() * &w).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, ours, theirs) in [("dq", &qv, &rq), ("dk", &kv, &rk), ("dv", &vv, &rv)] {
                check(name, grads.get(ours.as_tensor()).expect("no gradient"), rgrads.get(theirs.as_tensor()).unwrap(), grad_tol(dtype));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Bad inputs: an error, never a panic, through every function.

fn expect_err(what: &str, f: impl FnOnce() -> Result<Tensor>) {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(_)) => panic!("{what}: expected an error, got Ok"),
        Ok(Err(e)) => println!("  {what}: {e}"),
        Err(_) => panic!("{what}: panicked instead of returning an error"),
    }
}

/// `expect_err` whose message names `arg` as this API calls it (the library's cu_seqlens_* are seqlens_* here).
fn expect_err_naming(what: &str, arg: &str, f: impl FnOnce() -> Result<Tensor>) {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(_)) => panic!("{what}: expected an error, got Ok"),
        Ok(Err(e)) => {
            let msg = e.to_string();
            assert!(msg.contains(&format!("{arg}:")) && !msg.contains("cu_seqlens"), "{what}: the message {msg:?} does not name {arg}");
        }
        Err(_) => panic!("{what}: panicked instead of returning an error"),
    }
}

#[test]
fn bad_inputs_are_errors() {
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(seed());
    let t = |rng: &mut StdRng, shape: &[usize], dt: DType| rand_tensor(rng, shape, 1.0, dt);
    let bf = DType::BF16;
    let q = t(&mut rng, &[1, 8, 4, 64], bf);
    let k = t(&mut rng, &[1, 8, 2, 64], bf);
    let q32 = q.to_dtype(DType::F32).unwrap();
    let k32 = k.to_dtype(DType::F32).unwrap();
    let kf16 = k.to_dtype(DType::F16).unwrap();
    let q3 = t(&mut rng, &[8, 4, 64], bf);
    let k3 = t(&mut rng, &[8, 2, 64], bf);
    let q_d264 = t(&mut rng, &[1, 8, 4, 264], bf);
    let k_d264 = t(&mut rng, &[1, 8, 2, 264], bf);
    let q_h3 = t(&mut rng, &[1, 8, 3, 64], bf);
    let k_b2 = t(&mut rng, &[2, 8, 2, 64], bf);
    let k_d32 = t(&mut rng, &[1, 8, 2, 32], bf);
    let alibi = Tensor::zeros(4, DType::F32, &dev).unwrap();
    let alibi3 = Tensor::zeros(3, DType::F32, &dev).unwrap();
    let alibi_b2 = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
    let alibi_r3 = Tensor::zeros((1, 1, 4), DType::F32, &dev).unwrap();
    let alibi_bf16 = alibi.to_dtype(bf).unwrap();
    let alibi_strided = Tensor::zeros((4, 2), DType::F32, &dev).unwrap().narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
    let (qr, kr) = (&q, &k);

    // Dense.
    expect_err("f32 q/k/v", || fa::flash_attn(&q32, &k32, &k32, 0.1, false));
    expect_err("f32 q only", || fa::flash_attn(&q32, qr, qr, 0.1, false));
    expect_err("q rank 3", || fa::flash_attn(&q3, kr, kr, 0.1, false));
    expect_err("k rank 3", || fa::flash_attn(qr, &k3, &k3, 0.1, false));
    expect_err("head dim 264", || fa::flash_attn(&q_d264, &k_d264, &k_d264, 0.1, false));
    expect_err("k head dim != q head dim", || fa::flash_attn(qr, &k_d32, &k_d32, 0.1, false));
    expect_err("Hq % Hk != 0", || fa::flash_attn(&q_h3, kr, kr, 0.1, false));
    expect_err("k dtype != q dtype", || fa::flash_attn(qr, &kf16, &kf16, 0.1, false));
    expect_err("v dtype != k dtype", || fa::flash_attn(qr, kr, &kf16, 0.1, false));
    expect_err("batch mismatch", || fa::flash_attn(qr, &k_b2, &k_b2, 0.1, false));
    expect_err("v shape != k shape", || fa::flash_attn(qr, kr, &k_b2, 0.1, false));
    // At a head dim the adapter pads, the library's message says its shapes are the padded ones.
    let (q40, k40, v40) = (t(&mut rng, &[1, 8, 4, 40], bf), t(&mut rng, &[1, 8, 2, 40], bf), t(&mut rng, &[1, 7, 2, 40], bf));
    let e = fa::flash_attn(&q40, &k40, &v40, 0.1, false).expect_err("v shape != k shape at head dim 40");
    assert!(e.to_string().contains("head dim 40 runs zero-padded to 64"), "{e}");
    expect_err("windowed: f32", || fa::flash_attn_windowed(&q32, &k32, &k32, 0.1, Some(1), None));
    expect_err("windowed: rank", || fa::flash_attn_windowed(&q3, &k3, &k3, 0.1, Some(1), Some(0)));
    assert!(fa::flash_attn_alibi(qr, kr, kr, &alibi, 0.1, true).is_ok(), "alibi: the good call must work");
    assert!(fa::flash_attn_alibi(qr, kr, kr, &alibi_strided, 0.1, true).is_ok(), "alibi: strided slopes are copied");
    expect_err("alibi [Hq - 1]", || fa::flash_attn_alibi(qr, kr, kr, &alibi3, 0.1, true));
    expect_err("alibi [B + 1, Hq]", || fa::flash_attn_alibi(qr, kr, kr, &alibi_b2, 0.1, true));
    expect_err("alibi rank 3", || fa::flash_attn_alibi(qr, kr, kr, &alibi_r3, 0.1, true));
    expect_err("alibi bf16", || fa::flash_attn_alibi(qr, kr, kr, &alibi_bf16, 0.1, true));
    expect_err("alibi f32 q", || fa::flash_attn_alibi(&q32, &k32, &k32, &alibi, 0.1, true));
    expect_err("alibi_windowed [Hq - 1]", || fa::flash_attn_alibi_windowed(qr, kr, kr, &alibi3, 0.1, None, None));
    expect_err("alibi_windowed_softcap Some([Hq - 1])", || fa::flash_attn_alibi_windowed_softcap(qr, kr, kr, Some(&alibi3), 0.1, None, None, 0.0));
    expect_err("FlashAttn op alibi [Hq - 1]", || q.apply_op3(kr, kr, fa::FlashAttn { softmax_scale: 0.1, alibi_slopes: Some(alibi3.clone()), window_size_left: None, window_size_right: None, softcap: None }));
    expect_err("FlashAttn op alibi bf16", || q.apply_op3(kr, kr, fa::FlashAttn { softmax_scale: 0.1, alibi_slopes: Some(alibi_bf16.clone()), window_size_left: None, window_size_right: None, softcap: None }));
    expect_err("alibi_windowed_softcap bad head dim", || fa::flash_attn_alibi_windowed_softcap(&q_d264, &k_d264, &k_d264, None, 0.1, None, None, 1.0));
    // candle-flash-attn's softcap: a negative one is off (as 0); NaN and infinities are errors here.
    let off = fa::flash_attn_alibi_windowed_softcap(qr, kr, kr, None, 0.1, None, Some(0), 0.0).unwrap();
    for c in [-1.0f32, -0.0, -1e30] {
        let got = fa::flash_attn_alibi_windowed_softcap(qr, kr, kr, None, 0.1, None, Some(0), c).unwrap();
        assert_eq!(got.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(), off.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(), "softcap {c} is not off");
    }
    let capped = fa::flash_attn_alibi_windowed_softcap(qr, kr, kr, None, 0.1, None, Some(0), 0.5).unwrap();
    assert!(capped.sub(&off).unwrap().abs().unwrap().to_dtype(DType::F32).unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "softcap 0.5 changed nothing");
    expect_err("softcap NaN", || fa::flash_attn_alibi_windowed_softcap(qr, kr, kr, None, 0.1, None, None, f32::NAN));
    expect_err("softcap inf", || fa::flash_attn_alibi_windowed_softcap(qr, kr, kr, None, 0.1, None, None, f32::INFINITY));
    expect_err("FlashAttn op softcap -inf", || q.apply_op3(kr, kr, fa::FlashAttn { softmax_scale: 0.1, alibi_slopes: None, window_size_left: None, window_size_right: None, softcap: Some(f32::NEG_INFINITY) }));
    expect_err("with_lse f32", || fa::flash_attn_with_lse(&q32, &k32, &k32, 0.1, true).map(|r| r.0));
    expect_err("windowed_softcap_with_lse Hq % Hk", || fa::flash_attn_windowed_softcap_with_lse(&q_h3, kr, kr, 0.1, None, None, 0.0).map(|r| r.0));

    // Varlen.
    let cu = u32s(&[0, 3, 8], &dev);
    let cu2 = u32s(&[0, 8], &dev);
    let cu_long = u32s(&[0, 3, 9], &dev);
    let cu_down = u32s(&[0, 5, 3], &dev);
    let cu_f32 = Tensor::new(&[0f32, 3., 8.], &dev).unwrap();
    let cu_rank2 = u32s(&[0, 3, 8], &dev).reshape((1, 3)).unwrap();
    let cu_empty = Tensor::zeros(0, DType::U32, &dev).unwrap();
    let cu_huge = u32s(&[0, 3, 0x8000_0000], &dev);
    let k3f16 = k3.to_dtype(DType::F16).unwrap();
    let q3_32 = q3.to_dtype(DType::F32).unwrap();
    let q3_d264 = t(&mut rng, &[8, 4, 264], bf);
    let k3_d264 = t(&mut rng, &[8, 2, 264], bf);
    let q3_h3 = t(&mut rng, &[8, 3, 64], bf);
    let (q3r, k3r, cur) = (&q3, &k3, &cu);
    expect_err("varlen f32", || fa::flash_attn_varlen(&q3_32, &q3_32, &q3_32, cur, cur, 5, 5, 0.1, false));
    expect_err("varlen q rank 4", || fa::flash_attn_varlen(qr, kr, kr, cur, cur, 5, 5, 0.1, false));
    expect_err("varlen head dim 264", || fa::flash_attn_varlen(&q3_d264, &k3_d264, &k3_d264, cur, cur, 5, 5, 0.1, false));
    expect_err("varlen Hq % Hk", || fa::flash_attn_varlen(&q3_h3, k3r, k3r, cur, cur, 5, 5, 0.1, false));
    expect_err("varlen k dtype", || fa::flash_attn_varlen(q3r, &k3f16, &k3f16, cur, cur, 5, 5, 0.1, false));
    expect_err_naming("seqlens_k length != seqlens_q length", "seqlens_k", || fa::flash_attn_varlen(q3r, k3r, k3r, cur, &cu2, 5, 8, 0.1, false));
    expect_err("seqlens_q past total_q", || fa::flash_attn_varlen(q3r, k3r, k3r, &cu_long, cur, 6, 5, 0.1, false));
    expect_err_naming("seqlens_k past total_k", "seqlens_k", || fa::flash_attn_varlen(q3r, k3r, k3r, cur, &cu_long, 5, 6, 0.1, false));
    expect_err("seqlens decreasing", || fa::flash_attn_varlen(q3r, k3r, k3r, &cu_down, &cu_down, 5, 5, 0.1, false));
    expect_err("seqlens >= 2^31 (as u32)", || fa::flash_attn_varlen(q3r, k3r, k3r, &cu_huge, cur, 5, 5, 0.1, false));
    // ... named as the caller's value, not as the negative int32 it reads as.
    let e = fa::flash_attn_varlen(q3r, k3r, k3r, &cu_huge, cur, 5, 5, 0.1, false).unwrap_err().to_string();
    assert!(e.contains("seqlens_q: entry") && e.contains("exceeds 2^31 - 1"), "seqlens >= 2^31: {e}");
    expect_err("seqlens f32", || fa::flash_attn_varlen(q3r, k3r, k3r, &cu_f32, &cu_f32, 5, 5, 0.1, false));
    expect_err("seqlens rank 2", || fa::flash_attn_varlen(q3r, k3r, k3r, &cu_rank2, &cu_rank2, 5, 5, 0.1, false));
    expect_err("seqlens empty", || fa::flash_attn_varlen(q3r, k3r, k3r, &cu_empty, &cu_empty, 5, 5, 0.1, false));
    expect_err("max_seqlen_q too small", || fa::flash_attn_varlen(q3r, k3r, k3r, cur, cur, 2, 5, 0.1, false));
    expect_err("max_seqlen_k too small", || fa::flash_attn_varlen(q3r, k3r, k3r, cur, cur, 5, 2, 0.1, false));
    // A max_seqlen_k past i64 with a window size past i64 too: named as max_seqlen_k (the window once
    // wrapped to a negative left bound, and the error named the window).
    expect_err_naming("max_seqlen_k past i64 with a window", "max_seqlen_k", || fa::flash_attn_varlen_windowed(q3r, k3r, k3r, cur, cur, 5, usize::MAX, 0.1, Some(1 << 63), None));
    expect_err("varlen_windowed seqlens len", || fa::flash_attn_varlen_windowed(q3r, k3r, k3r, cur, &cu2, 5, 8, 0.1, Some(2), Some(0)));
    assert!(fa::flash_attn_varlen_alibi(q3r, k3r, k3r, &alibi_b2, cur, cur, 5, 5, 0.1, true).is_ok(), "varlen_alibi [B, Hq]: the good call must work");
    expect_err("varlen_alibi [Hq - 1]", || fa::flash_attn_varlen_alibi(q3r, k3r, k3r, &alibi3, cur, cur, 5, 5, 0.1, true));
    expect_err("varlen_alibi [B + 1, Hq]", || fa::flash_attn_varlen_alibi(q3r, k3r, k3r, &alibi_b2, &cu2, &cu2, 8, 8, 0.1, true));
    expect_err("varlen_alibi bad lens", || fa::flash_attn_varlen_alibi(q3r, k3r, k3r, &alibi, &cu_long, cur, 6, 5, 0.1, true));
    expect_err("varlen_alibi_windowed bf16 slopes", || fa::flash_attn_varlen_alibi_windowed(q3r, k3r, k3r, &alibi_bf16, cur, cur, 5, 5, 0.1, None, Some(0)));
    expect_err("varlen_alibi_windowed_softcap Some(rank 3)", || fa::flash_attn_varlen_alibi_windowed_softcap(q3r, k3r, k3r, Some(&alibi_r3), cur, cur, 5, 5, 0.1, None, None, 0.0));
    expect_err("varlen_alibi_windowed_softcap f32", || fa::flash_attn_varlen_alibi_windowed_softcap(&q3_32, &q3_32, &q3_32, None, cur, cur, 5, 5, 0.1, None, None, 0.0));
    expect_err("varlen_with_lse bad lens", || fa::flash_attn_varlen_with_lse(q3r, k3r, k3r, &cu_long, cur, 6, 5, 0.1, true).map(|r| r.0));
    expect_err("varlen_windowed_softcap_with_lse rank", || fa::flash_attn_varlen_windowed_softcap_with_lse(qr, kr, kr, cur, cur, 5, 5, 0.1, None, None, 0.0).map(|r| r.0));

    // Seqused.
    let used2 = u32s(&[2, 5], &dev);
    let used3 = u32s(&[1, 1, 1], &dev);
    let used_big = u32s(&[4, 5], &dev);
    let used_f32 = Tensor::new(&[1f32, 1.], &dev).unwrap();
    expect_err("seqused_q wrong length", || fa::flash_attn_varlen_seqused(q3r, k3r, k3r, cur, cur, Some(&used3), None, 5, 5, 0.1, None, None, 0.0));
    expect_err("seqused_k wrong length", || fa::flash_attn_varlen_seqused(q3r, k3r, k3r, cur, cur, None, Some(&used3), 5, 5, 0.1, None, None, 0.0));
    expect_err("seqused_q > slot", || fa::flash_attn_varlen_seqused(q3r, k3r, k3r, cur, cur, Some(&used_big), None, 5, 5, 0.1, None, None, 0.0));
    expect_err("seqused_k > slot", || fa::flash_attn_varlen_seqused(q3r, k3r, k3r, cur, cur, Some(&used2), Some(&used_big), 5, 5, 0.1, None, None, 0.0));
    expect_err("seqused f32", || fa::flash_attn_varlen_seqused(q3r, k3r, k3r, cur, cur, Some(&used_f32), None, 5, 5, 0.1, None, None, 0.0));
    expect_err("seqused_with_lse rank", || fa::flash_attn_varlen_seqused_with_lse(qr, kr, kr, cur, cur, None, None, 5, 5, 0.1, None, None, 0.0).map(|r| r.0));

    // Paged.
    let kc = t(&mut rng, &[4, 16, 2, 64], bf);
    let table = u32s(&[0, 1, 2, 3], &dev).reshape((2, 2)).unwrap();
    let cuk = u32s(&[0, 20, 30], &dev);
    let (kcr, tr, cukr) = (&kc, &table, &cuk);
    let paged = |q: &Tensor, k: &Tensor, cq: &Tensor, ck: &Tensor, tbl: &Tensor, mm: Option<&Tensor>, pbs: usize| {
        fa::flash_attn_varlen_paged_windowed(q, k, k, cq, ck, tbl, mm, 5, 20, 0.1, None, None, pbs, None)
    };
    assert!(paged(q3r, kcr, cur, cukr, tr, None, 16).is_ok(), "paged: the good call must work");
    expect_err("paged mm_prefix_ranges", || paged(q3r, kcr, cur, cukr, tr, Some(&cu), 16));
    expect_err("paged page_block_size mismatch", || paged(q3r, kcr, cur, cukr, tr, None, 32));
    expect_err("paged k rank 3", || paged(q3r, k3r, cur, cukr, tr, None, 16));
    expect_err("paged block_table rank 1", || paged(q3r, kcr, cur, cukr, cur, None, 16));
    expect_err("paged block_table f32", || paged(q3r, kcr, cur, cukr, &cu_f32.reshape((1, 3)).unwrap(), None, 16));
    expect_err("paged seqlens_k length", || paged(q3r, kcr, cur, &cu2, tr, None, 16));
    expect_err("paged seqlens_k decreasing", || paged(q3r, kcr, cur, &u32s(&[0, 20, 10], &dev), tr, None, 16));
    expect_err("paged q f32", || paged(&q3_32, kcr, cur, cukr, tr, None, 16));
    expect_err("paged q rank 4", || paged(qr, kcr, cur, cukr, tr, None, 16));
    expect_err("paged v shape != k shape", || {
        fa::flash_attn_varlen_paged_windowed(q3r, kcr, &kc.narrow(0, 0, 3)?, cur, cukr, tr, None, 5, 20, 0.1, None, None, 16, None)
    });
    expect_err("paged v dtype != k dtype", || {
        fa::flash_attn_varlen_paged_windowed(q3r, kcr, &kc.to_dtype(DType::F16)?, cur, cukr, tr, None, 5, 20, 0.1, None, None, 16, None)
    });
    expect_err("paged page_block_size 0", || paged(q3r, &kc.narrow(1, 0, 0).unwrap(), cur, &u32s(&[0, 0, 0], &dev), tr, None, 0));
    expect_err("paged block_table rows != B", || paged(q3r, kcr, cur, cukr, &u32s(&[0, 1, 2], &dev).reshape((3, 1)).unwrap(), None, 16));
    expect_err("paged block entry out of range", || paged(q3r, kcr, cur, cukr, &u32s(&[0, 1, 4, 3], &dev).reshape((2, 2)).unwrap(), None, 16));
    let tbl_neg = Tensor::new(&[0i32, 1, -1, 3], &dev).unwrap().reshape((2, 2)).unwrap();
    expect_err("paged block entry -1 (i32)", || paged(q3r, kcr, cur, cukr, &tbl_neg, None, 16));
    expect_err("paged keys past the table row", || {
        fa::flash_attn_varlen_paged_windowed(q3r, kcr, kcr, cur, &u32s(&[0, 20, 53], &dev), tr, None, 5, 40, 0.1, None, None, 16, None)
    });
    expect_err("paged max_seqlen_k too small", || fa::flash_attn_varlen_paged_windowed(q3r, kcr, kcr, cur, cukr, tr, None, 5, 19, 0.1, None, None, 16, None));
    expect_err("paged max_seqlen_q too small", || fa::flash_attn_varlen_paged_windowed(q3r, kcr, kcr, cur, cukr, tr, None, 4, 20, 0.1, None, None, 16, None));
    expect_err("paged seqlens_q past total_q", || paged(q3r, kcr, &cu_long, cukr, tr, None, 16));
    expect_err("paged head dim 264", || paged(&q3_d264, &t(&mut rng, &[4, 16, 2, 264], bf), cur, cukr, tr, None, 16));
    expect_err("paged Hq % Hk", || paged(&q3_h3, kcr, cur, cukr, tr, None, 16));
}

/// Odd but legal-looking inputs must not panic (an error or a result, either is fine).
#[test]
fn odd_inputs_do_not_panic() {
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(seed());
    let q0 = rand_tensor(&mut rng, &[1, 0, 2, 64], 1.0, DType::BF16);
    let q = rand_tensor(&mut rng, &[1, 8, 2, 64], 1.0, DType::BF16);
    let k0 = rand_tensor(&mut rng, &[1, 0, 2, 64], 1.0, DType::BF16);
    type Case<'a> = (&'a str, Box<dyn FnOnce() -> Result<Tensor> + 'a>);
    let cases: Vec<Case> = vec![
        ("empty q", Box::new(|| fa::flash_attn(&q0, &q, &q, 0.1, true))),
        ("empty k", Box::new(|| fa::flash_attn(&q, &k0, &k0, 0.1, true))),
        ("negative softcap", Box::new(|| fa::flash_attn_alibi_windowed_softcap(&q, &q, &q, None, 0.1, None, None, -1.0))),
        ("NaN scale", Box::new(|| fa::flash_attn(&q, &q, &q, f32::NAN, false))),
        ("huge windows", Box::new(|| fa::flash_attn_windowed(&q, &q, &q, 0.1, Some(usize::MAX), Some(usize::MAX)))),
        ("zero-length sequences", Box::new(|| {
            let q3 = q.squeeze(0)?;
            fa::flash_attn_varlen(&q3, &q3, &q3, &u32s(&[0, 0, 8, 8], &dev), &u32s(&[0, 8, 8, 8], &dev), 8, 8, 0.1, true)
        })),
    ];
    for (what, f) in cases {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(r) => println!("  {what}: {}", r.map(|t| format!("ok {:?}", t.dims())).unwrap_or_else(|e| format!("error: {e}"))),
            Err(_) => panic!("{what}: panicked"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// CUDA: the same comparisons on candle CUDA tensors.

#[cfg(feature = "candle-cuda")]
fn cuda_device() -> std::result::Result<Device, String> {
    Device::new_cuda(0).map_err(|e| format!("no CUDA device ({e})"))
}

#[cfg(not(feature = "candle-cuda"))]
fn cuda_device() -> std::result::Result<Device, String> {
    Err("built without feature candle-cuda".into())
}

/// The CUDA device for a CUDA test, or None after printing the skip notice (no GPU, or built without
/// `candle-cuda`).
fn cuda_or_skip() -> Option<Device> {
    cuda_device().map_err(|why| println!("SKIPPED candle cuda: {why}")).ok()
}

#[test]
fn cuda_forward_and_gradients() {
    let Some(dev) = cuda_or_skip() else { return };
    let mut rng = StdRng::seed_from_u64(seed());
    for c in dense_cases() {
        dense_case(&mut rng, &c, &dev);
    }
    for p in packed_cases(&mut rng) {
        packed_case(&mut rng, &p, &dev);
    }
    paged_cases(&mut rng, &dev, &[1, 3, 16], false);
    // CUDA results against our CPU path on the same inputs (also covers a longer sequence).
    let c = Dense { b: 2, sq: 300, sk: 517, hq: 8, hk: 2, d: 128, win: (None, Some(0)), softcap: 0.0, dtype: DType::BF16 };
    let (q, k, v) = dense_inputs(&mut rng, &c);
    let cpu = fa::flash_attn_with_lse(&q, &k, &v, 0.09, true).unwrap();
    let gpu = fa::flash_attn_with_lse(&q.to_device(&dev).unwrap(), &k.to_device(&dev).unwrap(), &v.to_device(&dev).unwrap(), 0.09, true).unwrap();
    check("cuda out vs cpu out", &gpu.0, &cpu.0, out_tol(c.dtype));
    check_abs("cuda lse vs cpu lse", &gpu.1, &cpu.1, 2e-3);
    // Inputs on different devices are an error.
    expect_err("q on cuda, k on cpu", || fa::flash_attn(&q.to_device(&dev).unwrap(), &k, &v, 0.1, false));
    let q3 = q.get(0).unwrap().to_device(&dev).unwrap();
    let k3 = k.get(0).unwrap().to_device(&dev).unwrap();
    expect_err("seqlens on cpu, q on cuda", || fa::flash_attn_varlen(&q3, &k3, &k3, &u32s(&[0, 300], &Device::Cpu), &u32s(&[0, 517], &Device::Cpu), 300, 517, 0.1, false));
}

/// The paged forward on CUDA (zero-copy over the cache; page sizes for both the cp.async kernels and
/// Hopper's warp-specialized one) and its backward, against varlen over contiguous keys on the CPU; and
/// ALiBi on CUDA tensors (zero-copy slopes) through every function and the op struct, forward and
/// gradients against the reference, plus CUDA against our CPU path on the same inputs.
#[test]
fn cuda_paged_and_alibi() {
    let Some(dev) = cuda_or_skip() else { return };
    let mut rng = StdRng::seed_from_u64(seed());
    paged_cases(&mut rng, &dev, &[1, 3, 8, 16, 32, 64, 256], false);
    // A longer cache: several pages per sequence on the warp-specialized kernel, GQA, causal.
    let p = paged_setup(&mut rng, 64, 8, 2, 128, &[300, 1, 77], &[700, 513, 77], 7, true, DType::BF16);
    paged_vs_contiguous(&p, &dev, (None, Some(0)), 0.0, false, false);

    alibi_dense_cases(&mut rng, &dev);
    alibi_varlen_cases(&mut rng, &dev);
    // A longer ALiBi call (several key blocks, GQA, causal): CUDA against our CPU path.
    let c = Dense { b: 2, sq: 300, sk: 517, hq: 8, hk: 2, d: 128, win: (None, Some(0)), softcap: 0.0, dtype: DType::BF16 };
    let (q, k, v) = dense_inputs(&mut rng, &c);
    let al = slopes(&mut rng, c.b, c.hq, true);
    let cpu = fa::flash_attn_alibi(&q, &k, &v, &al, 0.09, true).unwrap();
    let [qg, kg, vg, ag] = [&q, &k, &v, &al].map(|t| t.to_device(&dev).unwrap());
    check("cuda alibi out vs cpu out", &fa::flash_attn_alibi(&qg, &kg, &vg, &ag, 0.09, true).unwrap(), &cpu, out_tol(c.dtype));
    expect_err("alibi slopes on the CPU, q on CUDA", || fa::flash_attn_alibi(&qg, &kg, &kg, &al, 0.1, true));
}

/// One random call for `random_bad_inputs_are_errors`: a dense, varlen, seqused or paged function on
/// tensors of random shapes and dtypes (also ones the library never takes) and seqlens / block tables
/// holding edge values, on `dev`. Returns whether it ran (else it returned an error).
fn random_call(rng: &mut StdRng, dev: &Device) -> bool {
    let pick = |rng: &mut StdRng, xs: &[usize]| xs[rng.gen_range(0..xs.len())];
    let (b, s, h, d) = (pick(rng, &[0, 1, 2]), pick(rng, &[0, 1, 3, 9]), pick(rng, &[1, 2, 4]), pick(rng, &[0, 32, 40, 64, 64, 64, 128, 300]));
    let hk = pick(rng, &[1, h, h, 3]);
    let dtypes = [DType::BF16, DType::F16, DType::F32, DType::U32];
    let main = dtypes[rng.gen_range(0..2)];
    let t = |rng: &mut StdRng, shape: &[usize]| {
        let dt = if rng.gen_bool(0.9) { main } else { dtypes[rng.gen_range(0..dtypes.len())] };
        let x = rand_tensor(rng, shape, 1.0, DType::F32);
        x.to_dtype(dt).unwrap().to_device(dev).unwrap()
    };
    let edges = [0u32, 1, 2, 3, 5, 9, 100, u32::MAX];
    let idx = |rng: &mut StdRng, n: usize| {
        let mut v: Vec<u32> = (0..n).map(|_| if rng.gen_bool(0.7) { rng.gen_range(0..=(b * s) as u32) } else { edges[rng.gen_range(0..edges.len())] }).collect();
        if rng.gen_bool(0.7) {
            v.sort_unstable();
        }
        u32s(&v, dev)
    };
    let window = |rng: &mut StdRng| if rng.gen_bool(0.5) { None } else { Some(pick(rng, &[0, 2, usize::MAX])) };
    let scale = [0.125f32, 0.0, -1.0, f32::NAN][rng.gen_range(0..4)];
    match rng.gen_range(0..4) {
        0 => {
            let dv = pick(rng, &[d, d, d + 1]);
            let (q, k, v) = (t(rng, &[b, s, h, d]), t(rng, &[b, s, hk, d]), t(rng, &[b, s, hk, dv]));
            let ha = pick(rng, &[h, h + 1]);
            let alibi = if rng.gen_bool(0.3) { Some(if rng.gen_bool(0.8) { rand_tensor(rng, &[ha], 0.5, DType::F32).to_device(dev).unwrap() } else { t(rng, &[ha]) }) } else { None };
            let (wl, wr) = (window(rng), window(rng));
            let softcap = [0.0, 5.0, -1.0][rng.gen_range(0..3)];
            fa::flash_attn_alibi_windowed_softcap(&q, &k, &v, alibi.as_ref(), scale, wl, wr, softcap).is_ok()
        }
        1 => {
            let tq = b * s;
            let (q, k, v) = (t(rng, &[tq, h, d]), t(rng, &[tq, hk, d]), t(rng, &[tq, hk, d]));
            let nk = pick(rng, &[b + 1, b + 1, b]);
            let (cq, ck) = (idx(rng, b + 1), idx(rng, nk));
            let (wl, wr) = (window(rng), window(rng));
            let (mq, mk) = (pick(rng, &[0, s, 10_000]), pick(rng, &[0, s, 10_000]));
            fa::flash_attn_varlen_windowed(&q, &k, &v, &cq, &ck, mq, mk, scale, wl, wr).is_ok()
        }
        2 => {
            let tq = b * s;
            let (q, k, v) = (t(rng, &[tq, h, d]), t(rng, &[tq, hk, d]), t(rng, &[tq, hk, d]));
            let (cq, ck) = (idx(rng, b + 1), idx(rng, b + 1));
            let nu = pick(rng, &[b, b + 1]);
            let used = if rng.gen_bool(0.5) { Some(idx(rng, nu)) } else { None };
            fa::flash_attn_varlen_seqused(&q, &k, &v, &cq, &ck, None, used.as_ref(), s, s, scale, None, None, 0.0).is_ok()
        }
        _ => {
            let (blocks, page) = (pick(rng, &[0, 1, 3]), pick(rng, &[1, 2, 16]));
            let tq = b * s;
            let (q, k, v) = (t(rng, &[tq, h, d]), t(rng, &[blocks, page, hk, d]), t(rng, &[blocks, page, hk, d]));
            let (cq, ck, table) = (idx(rng, b + 1), idx(rng, b + 1), idx(rng, b * 2).reshape((b, 2)).unwrap());
            let (wl, wr) = (window(rng), window(rng));
            let pbs = pick(rng, &[page, page, page + 1]);
            fa::flash_attn_varlen_paged_windowed(&q, &k, &v, &cq, &ck, &table, None, s, 2 * page, scale, wl, wr, pbs, None).is_ok()
        }
    }
}

/// Random, mostly ill-formed calls (`random_call`): each returns an error or an output, never panics;
/// on the CPU, and on candle CUDA tensors where built with `candle-cuda` and a GPU is present.
#[test]
fn random_bad_inputs_are_errors() {
    let mut rng = StdRng::seed_from_u64(seed());
    let mut devices = vec![Device::Cpu];
    match cuda_device() {
        Ok(dev) => devices.push(dev),
        Err(why) => println!("SKIPPED candle cuda (random bad inputs): {why}"),
    }
    for dev in &devices {
        let mut ran = 0;
        for i in 0..300 {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| random_call(&mut rng, dev))) {
                Ok(true) => ran += 1,
                Ok(false) => {}
                Err(_) => panic!("call {i} on {dev:?} panicked (see the seed above)"),
            }
        }
        println!("random_bad_inputs_are_errors on {dev:?}: {ran} of 300 calls ran, the rest returned errors");
    }
}

/// Gradients of sum(out * w) for `f` on (q, k, v) moved to `dev`, as host f32 vectors (dq, dk, dv).
fn grads_on(dev: &Device, q: &Tensor, k: &Tensor, v: &Tensor, w: &Tensor, f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>) -> [Vec<f32>; 3] {
    let [qv, kv, vv] = [q, k, v].map(|t| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap());
    let out = f(qv.as_tensor(), kv.as_tensor(), vv.as_tensor()).unwrap();
    let grads = (out.to_dtype(DType::F32).unwrap() * w.to_device(dev).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
    [&qv, &kv, &vv].map(|x| host(grads.get(x.as_tensor()).expect("no gradient")))
}

/// Runs `body` with `set_deterministic_backward(on)`, restoring the setting after; one such body at a
/// time (the setting is process-wide and the tests run on parallel threads).
fn with_deterministic<T>(on: bool, body: impl FnOnce() -> T) -> T {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let was = fa::deterministic_backward();
    fa::set_deterministic_backward(on);
    let r = body();
    fa::set_deterministic_backward(was);
    r
}

/// The calls `deterministic_backward_*` run: (what, dense shape, function). Several key blocks per
/// sequence (the dq of a query row gets several key blocks' adds: atomics would order them by timing),
/// GQA, causal and not, ALiBi (at head dim 256 the `_mods_det` kernels), varlen.
fn deterministic_calls(rng: &mut StdRng) -> Vec<(&'static str, Dense, Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>>)> {
    let c = |b, sq, sk, hq, hk, d, dtype| Dense { b, sq, sk, hq, hk, d, win: (None, None), softcap: 0.0, dtype };
    let al = slopes(rng, 2, 4, true);
    let al2 = al.clone();
    vec![
        ("dense hdim 128 causal", c(2, 300, 517, 8, 2, 128, DType::BF16), Box::new(|q: &Tensor, k: &Tensor, v: &Tensor| fa::flash_attn(q, k, v, 0.09, true))),
        ("dense hdim 64", c(1, 400, 400, 4, 4, 64, DType::F16), Box::new(|q: &Tensor, k: &Tensor, v: &Tensor| fa::flash_attn(q, k, v, 0.125, false))),
        (
            "dense hdim 256 alibi",
            c(2, 200, 333, 4, 2, 256, DType::BF16),
            Box::new(move |q: &Tensor, k: &Tensor, v: &Tensor| fa::flash_attn_alibi(q, k, v, &al.to_device(q.device())?, 0.06, false)),
        ),
        (
            "dense hdim 192 alibi causal",
            c(2, 150, 260, 4, 1, 192, DType::F16),
            Box::new(move |q: &Tensor, k: &Tensor, v: &Tensor| fa::flash_attn_alibi(q, k, v, &al2.to_device(q.device())?, 0.07, true)),
        ),
        (
            "varlen hdim 128 (the dense batch packed)",
            c(1, 480, 480, 4, 2, 128, DType::BF16),
            Box::new(|q: &Tensor, k: &Tensor, v: &Tensor| {
                let (q, k, v) = (q.squeeze(0)?, k.squeeze(0)?, v.squeeze(0)?);
                let cu = u32s(&[0, 130, 130, 480], q.device());
                fa::flash_attn_varlen(&q, &k, &v, &cu, &cu, 350, 350, 0.09, true)?.unsqueeze(0)
            }),
        ),
    ]
}

/// `set_deterministic_backward` on the CPU path (deterministic either way): the gradients with it on are
/// the ones with it off, bit for bit, and the setting reads back.
#[test]
fn deterministic_backward_setting_on_the_cpu() {
    let mut rng = StdRng::seed_from_u64(seed());
    for (what, c, f) in deterministic_calls(&mut rng) {
        let (q, k, v) = dense_inputs(&mut rng, &c);
        let w = rand_tensor(&mut rng, &[c.b, c.sq, c.hq, c.d], 1.0, DType::F32);
        let off = with_deterministic(false, || grads_on(&Device::Cpu, &q, &k, &v, &w, &f));
        let on = with_deterministic(true, || {
            assert!(fa::deterministic_backward());
            grads_on(&Device::Cpu, &q, &k, &v, &w, &f)
        });
        for (name, a, b) in [("dq", &on[0], &off[0]), ("dk", &on[1], &off[1]), ("dv", &on[2], &off[2])] {
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: {name} changed with the setting on the CPU");
        }
    }
}

/// `set_deterministic_backward(true)` on CUDA: each call's backward twice gives the same bits, within
/// the gradient tolerance of the CPU path's (itself checked against the reference elsewhere).
#[test]
fn deterministic_backward_on_cuda() {
    let Some(dev) = cuda_or_skip() else { return };
    let mut rng = StdRng::seed_from_u64(seed());
    for (what, c, f) in deterministic_calls(&mut rng) {
        println!("deterministic: {what}");
        let (q, k, v) = dense_inputs(&mut rng, &c);
        let w = rand_tensor(&mut rng, &[c.b, c.sq, c.hq, c.d], 1.0, DType::F32);
        let cpu = grads_on(&Device::Cpu, &q, &k, &v, &w, &f);
        let (first, second) = with_deterministic(true, || (grads_on(&dev, &q, &k, &v, &w, &f), grads_on(&dev, &q, &k, &v, &w, &f)));
        for (i, name) in ["dq", "dk", "dv"].into_iter().enumerate() {
            assert!(first[i].iter().zip(&second[i]).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: deterministic {name} not reproducible");
            let scale = cpu[i].iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-2);
            let err = first[i].iter().zip(&cpu[i]).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
            assert!(err <= grad_tol(c.dtype), "{what}: {name} vs the CPU path: relative max err {err:e} > {:e}", grad_tol(c.dtype));
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Decoding steps: few query rows per kv head, which the CUDA path runs on the KV cache's decode kernels
// (`flash_attn::raw::dense_fwd_decodes`).

fn decode_cases() -> Vec<Dense> {
    let c = |b, sq, sk, hq, hk, d, win, softcap, dtype| Dense { b, sq, sk, hq, hk, d, win, softcap, dtype };
    vec![
        c(1, 1, 700, 32, 8, 128, (None, None), 0.0, DType::BF16),
        c(2, 1, 1, 8, 8, 64, (None, Some(0)), 0.0, DType::F16),
        c(3, 4, 300, 16, 2, 64, (None, Some(0)), 0.0, DType::BF16),
        c(1, 2, 129, 8, 1, 256, (Some(17), Some(0)), 0.0, DType::BF16),
        c(2, 1, 200, 4, 4, 96, (Some(40), Some(3)), 20.0, DType::F16),
        c(1, 8, 64, 8, 1, 32, (None, None), 5.0, DType::BF16),
        c(1, 1, 2500, 16, 2, 192, (None, Some(0)), 0.0, DType::BF16),
        // Sq > Sk under causal: rows that see no key (out 0, lse -inf).
        c(1, 6, 3, 4, 2, 64, (None, Some(0)), 0.0, DType::F16),
    ]
}

/// Decoding steps on CUDA, which the adapter runs on the KV cache's decode kernels: forward, lse and
/// gradients (from the saved lse) against the reference; and a generation loop's calls, keys and values
/// narrowed out of a preallocated cache (candle-nn's KV cache), against our CPU path.
#[test]
fn cuda_decoding_steps() {
    let Some(dev) = cuda_or_skip() else { return };
    let mut rng = StdRng::seed_from_u64(seed());
    for c in decode_cases() {
        let dt = if c.dtype == DType::BF16 { flash_attn::DType::BF16 } else { flash_attn::DType::F16 };
        let opts = flash_attn::AttnOptions::default();
        assert!(flash_attn::raw::dense_fwd_decodes(&[c.b, c.sq, c.hq, c.d], &[c.b, c.sk, c.hk, c.d], dt, &opts, false), "{c:?} must be routed");
        dense_case(&mut rng, &c, &dev);
    }
    // Caches seq-major ([B, S, Hk, D], narrowed) and head-major ([B, Hk, S, D], narrowed and transposed
    // for the call, as candle-transformers' models keep theirs).
    let (b, hq, hk, d, cap) = (2, 32, 8, 128, 4096);
    for head_major in [false, true] {
        let shape = if head_major { [b, hk, cap, d] } else { [b, cap, hk, d] };
        let kc = rand_tensor(&mut rng, &shape, 2.0, DType::BF16);
        let vc = rand_tensor(&mut rng, &shape, 1.0, DType::BF16);
        let (kg, vg) = (kc.to_device(&dev).unwrap(), vc.to_device(&dev).unwrap());
        let keys = |t: &Tensor, sk: usize| if head_major { t.narrow(2, 0, sk).unwrap().transpose(1, 2).unwrap() } else { t.narrow(1, 0, sk).unwrap() };
        for sk in [1, 31, 1000, 4096] {
            let q = rand_tensor(&mut rng, &[b, 1, hq, d], 2.0, DType::BF16);
            let cpu = fa::flash_attn_with_lse(&q, &keys(&kc, sk), &keys(&vc, sk), 0.088, true).unwrap();
            let gpu = fa::flash_attn_with_lse(&q.to_device(&dev).unwrap(), &keys(&kg, sk), &keys(&vg, sk), 0.088, true).unwrap();
            let what = format!("decode step over {sk} cached keys (head-major {head_major})");
            check(&format!("{what}: cuda out vs cpu"), &gpu.0, &cpu.0, out_tol(DType::BF16));
            check_abs(&format!("{what}: cuda lse vs cpu"), &gpu.1, &cpu.1, 2e-3);
        }
    }
}
