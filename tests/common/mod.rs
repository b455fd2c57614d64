//! Shared test helpers: an f64 reference attention written from the definition (plain loops, no tiling,
//! nothing from the library but the tensor constructors), random inputs, strided layouts, and the
//! tolerance check.
#![allow(dead_code)]

use flash_attn::{DType, Tensor};
use half::{bf16, f16};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::io::Write;

pub const HEAD_DIMS: [usize; 6] = [32, 64, 96, 128, 192, 256];

/// Attention options as the reference sees them: the mask is the intersection of every condition given.
#[derive(Clone, Copy, Debug)]
pub struct RefOpts {
    pub scale: f64,
    pub softcap: f64,
    pub causal: bool,
    pub window: (i64, i64),
}

/// One sequence, straight from the definition. q is `[sq, hq, d]`, k and v `[sk, hk, d]`, all row-major
/// logical values (already rounded to the input dtype). Returns out `[sq, hq, d]` and lse `[hq, sq]` in
/// f64; a row that sees no key has out 0 and lse -inf.
#[allow(clippy::too_many_arguments)]
pub fn reference_attention(q: &[f32], k: &[f32], v: &[f32], sq: usize, sk: usize, hq: usize, hk: usize, d: usize, o: &RefOpts) -> (Vec<f64>, Vec<f64>) {
    reference_attention_f64(&f64s(q), &f64s(k), &f64s(v), sq, sk, hq, hk, d, o)
}

pub fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Whether query i of a (sq, sk) sequence sees key j: the intersection of every condition in `o`, around
/// the bottom-right aligned diagonal (query i lines up with key i + sk - sq).
pub fn visible(o: &RefOpts, i: usize, j: usize, sq: usize, sk: usize) -> bool {
    let diag = i as i64 + sk as i64 - sq as i64;
    let j = j as i64;
    (!o.causal || j <= diag) && (o.window.0 < 0 || j >= diag - o.window.0) && (o.window.1 < 0 || j <= diag + o.window.1)
}

/// `reference_attention` on f64 inputs (for finite differences).
#[allow(clippy::too_many_arguments)]
pub fn reference_attention_f64(q: &[f64], k: &[f64], v: &[f64], sq: usize, sk: usize, hq: usize, hk: usize, d: usize, o: &RefOpts) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0f64; sq * hq * d];
    let mut lse = vec![f64::NEG_INFINITY; hq * sq];
    for h in 0..hq {
        let hkv = h / (hq / hk);
        for i in 0..sq {
            // Bottom-right aligned diagonal: query i lines up with key i + sk - sq.
            let diag = i as i64 + sk as i64 - sq as i64;
            let visible = |j: usize| {
                let j = j as i64;
                (!o.causal || j <= diag) && (o.window.0 < 0 || j >= diag - o.window.0) && (o.window.1 < 0 || j <= diag + o.window.1)
            };
            let keys: Vec<usize> = (0..sk).filter(|&j| visible(j)).collect();
            if keys.is_empty() {
                continue;
            }
            let scores: Vec<f64> = keys
                .iter()
                .map(|&j| {
                    let mut dot = 0.0f64;
                    for x in 0..d {
                        dot += q[(i * hq + h) * d + x] * k[(j * hk + hkv) * d + x];
                    }
                    let s = o.scale * dot;
                    if o.softcap > 0.0 { o.softcap * (s / o.softcap).tanh() } else { s }
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for (&j, s) in keys.iter().zip(&scores) {
                let p = (s - max).exp() / sum;
                for x in 0..d {
                    out[(i * hq + h) * d + x] += p * v[(j * hk + hkv) * d + x];
                }
            }
            lse[h * sq + i] = max + sum.ln();
        }
    }
    (out, lse)
}

/// Dense batch: q `[b, sq, hq, d]`, k/v `[b, sk, hk, d]`. Returns out `[b, sq, hq, d]`, lse `[b, hq, sq]`.
#[allow(clippy::too_many_arguments)]
pub fn reference_fwd(q: &[f32], k: &[f32], v: &[f32], b: usize, sq: usize, sk: usize, hq: usize, hk: usize, d: usize, o: &RefOpts) -> (Vec<f64>, Vec<f64>) {
    let (nq, nk) = (sq * hq * d, sk * hk * d);
    let mut out = Vec::with_capacity(b * nq);
    let mut lse = Vec::with_capacity(b * hq * sq);
    for bi in 0..b {
        let (o1, l1) = reference_attention(&q[bi * nq..][..nq], &k[bi * nk..][..nk], &v[bi * nk..][..nk], sq, sk, hq, hk, d, o);
        out.extend(o1);
        lse.extend(l1);
    }
    (out, lse)
}

/// Packed batch: q `[tq, hq, d]`, k/v `[tk, hk, d]`; sequence b is rows `cu_q[b]..cu_q[b] + used_q[b]` of q
/// and `cu_k[b]..cu_k[b] + used_k[b]` of k/v. Returns out `[tq, hq, d]`, lse `[hq, tq]`; rows of no
/// sequence are out 0, lse -inf.
#[allow(clippy::too_many_arguments)]
pub fn reference_varlen_fwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cu_q: &[usize],
    cu_k: &[usize],
    used_q: &[usize],
    used_k: &[usize],
    tq: usize,
    hq: usize,
    hk: usize,
    d: usize,
    o: &RefOpts,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0f64; tq * hq * d];
    let mut lse = vec![f64::NEG_INFINITY; hq * tq];
    for b in 0..used_q.len() {
        let (sq, sk) = (used_q[b], used_k[b]);
        let (rq, rk) = (cu_q[b], cu_k[b]);
        let (o1, l1) = reference_attention(&q[rq * hq * d..][..sq * hq * d], &k[rk * hk * d..][..sk * hk * d], &v[rk * hk * d..][..sk * hk * d], sq, sk, hq, hk, d, o);
        out[rq * hq * d..][..sq * hq * d].copy_from_slice(&o1);
        for h in 0..hq {
            lse[h * tq + rq..][..sq].copy_from_slice(&l1[h * sq..][..sq]);
        }
    }
    (out, lse)
}

/// `x` rounded to `dtype` and back.
pub fn round(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::F16 => f16::from_f32(x).to_f32(),
        DType::BF16 => bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// `n` values uniform in `[-amp, amp]`, rounded to `dtype` (so the reference sees exactly what the library
/// reads).
pub fn random_values(rng: &mut StdRng, n: usize, amp: f32, dtype: DType) -> Vec<f32> {
    (0..n).map(|_| round(rng.gen_range(-amp..=amp), dtype)).collect()
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// A fresh seed per run (or FA_TEST_SEED), printed past the capture so that a failure reproduces.
pub fn seeded(test: &str) -> (u64, StdRng) {
    let seed = std::env::var("FA_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let _ = writeln!(std::io::stderr(), "{test}: seed {seed} (rerun with FA_TEST_SEED={seed})");
    (seed, rng(seed))
}

/// A host tensor holding `logical` (row-major values of `shape`, last dim contiguous). With `strided`,
/// the leading dims are stored in a random order, each with random padding, at a random offset, and every
/// element outside the view is NaN, so reading outside it poisons the result.
pub fn make_tensor(logical: &[f32], shape: &[usize], dtype: DType, strided: bool, rng: &mut StdRng) -> Tensor {
    if !strided {
        return Tensor::from_f32(logical, shape, dtype).unwrap();
    }
    let rank = shape.len();
    let mut order: Vec<usize> = (0..rank - 1).collect(); // physical order, outermost first
    for i in (1..order.len()).rev() {
        order.swap(i, rng.gen_range(0..=i));
    }
    let mut strides = vec![1usize; rank];
    let mut pitch = shape[rank - 1] + rng.gen_range(0..3) * 8;
    for &dim in order.iter().rev() {
        strides[dim] = pitch;
        pitch = pitch * shape[dim].max(1) + rng.gen_range(0..3) * 8;
    }
    let offset = rng.gen_range(0..17);
    let mut storage = vec![f32::NAN; offset + pitch + 1];
    let mut idx = vec![0usize; rank];
    for &x in logical {
        storage[offset + idx.iter().zip(&strides).map(|(i, s)| i * s).sum::<usize>()] = x;
        for dim in (0..rank).rev() {
            idx[dim] += 1;
            if idx[dim] < shape[dim] {
                break;
            }
            idx[dim] = 0;
        }
    }
    let n = storage.len();
    Tensor::from_f32(&storage, &[n], dtype).unwrap().as_strided(shape, &strides, offset).unwrap()
}

/// `make_tensor` on `device`: with `strided`, the whole NaN-filled storage is uploaded, shifted so the view
/// starts 16-byte aligned (the CUDA path's contract), and the same view taken of it there (a read
/// outside the view poisons the result).
pub fn make_tensor_on(logical: &[f32], shape: &[usize], dtype: DType, strided: bool, rng: &mut StdRng, device: flash_attn::Device) -> Tensor {
    let host = make_tensor(logical, shape, dtype, strided, rng);
    if !strided {
        return host.to_device(device).unwrap();
    }
    let n = host.storage_len();
    let shift = (8 - host.offset() % 8) % 8;
    let mut storage = vec![f32::NAN; shift];
    storage.extend(host.as_strided(&[n], &[1], 0).unwrap().to_f32_vec().unwrap());
    let flat = Tensor::from_f32(&storage, &[n + shift], dtype).unwrap().to_device(device).unwrap();
    flat.as_strided(host.shape(), host.strides(), host.offset() + shift).unwrap()
}

/// A vector of lengths or offsets as an int32 tensor on `device`.
pub fn i32_tensor_on(v: &[usize], device: flash_attn::Device) -> Tensor {
    Tensor::from_i32(v.iter().map(|&x| x as i32).collect(), &[v.len()]).unwrap().to_device(device).unwrap()
}

/// Unit roundoff of the output dtype.
pub fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
        _ => 2f64.powi(-24),
    }
}

/// Tolerances (see cpu_reference.rs for why): the library computes in f32 and rounds `out` to the input
/// dtype once at the end.
///   out: |out - ref| <= u * |ref| + atol_out, u the dtype's unit roundoff, atol_out = 2^-12 * vmax.
///   lse: |lse - ref| <= 2^-20 * |ref| + atol_lse, atol_lse = 2^-20 * (1 + smax).
/// `vmax` bounds |v|, `smax` bounds |score| (|scale| * D * qmax * kmax, or the softcap).
pub struct Tolerance {
    pub u: f64,
    pub atol_out: f64,
    pub rtol_lse: f64,
    pub atol_lse: f64,
}

impl Tolerance {
    pub fn new(dtype: DType, vmax: f64, smax: f64) -> Tolerance {
        let lse = 2f64.powi(-20);
        Tolerance { u: unit_roundoff(dtype), atol_out: 2f64.powi(-12) * vmax, rtol_lse: lse, atol_lse: lse * (1.0 + smax) }
    }
}

/// The GPU kernels' tolerance (tests/gpu.rs explains it): P is rounded to the input dtype before P.V.
pub fn gpu_tolerance(dtype: DType, vmax: f64, smax: f64) -> Tolerance {
    let u = unit_roundoff(dtype);
    Tolerance { u, atol_out: 2.0 * u * vmax, rtol_lse: 0.0, atol_lse: 2f64.powi(-14) * (1.0 + smax) }
}

/// Compares the library's out and lse (as f32 values in logical order) to the reference; the first
/// mismatch is reported. On success, returns the largest |diff| / tolerance seen for out and for lse.
pub fn check_close(out: &[f32], lse: &[f32], ref_out: &[f64], ref_lse: &[f64], tol: &Tolerance) -> Result<(f64, f64), String> {
    let mut worst = (0.0f64, 0.0f64);
    if out.len() != ref_out.len() || lse.len() != ref_lse.len() {
        return Err(format!("sizes: out {} vs {}, lse {} vs {}", out.len(), ref_out.len(), lse.len(), ref_lse.len()));
    }
    for (i, (&g, &r)) in out.iter().zip(ref_out).enumerate() {
        let g = g as f64;
        // A row the reference leaves empty must be exactly zero, not merely small.
        let bound = tol.u * r.abs() + tol.atol_out;
        worst.0 = worst.0.max((g - r).abs() / bound);
        let ok = if r == 0.0 { g == 0.0 } else { g.is_finite() && (g - r).abs() <= bound };
        if !ok {
            return Err(format!("out[{i}] = {g}, reference {r} (|diff| {:.3e})", (g - r).abs()));
        }
    }
    for (i, (&g, &r)) in lse.iter().zip(ref_lse).enumerate() {
        let g = g as f64;
        let bound = tol.rtol_lse * r.abs() + tol.atol_lse;
        let ok = if r == f64::NEG_INFINITY { g == f64::NEG_INFINITY } else { g.is_finite() && (g - r).abs() <= bound };
        if r.is_finite() {
            worst.1 = worst.1.max((g - r).abs() / bound);
        }
        if !ok {
            return Err(format!("lse[{i}] = {g}, reference {r}"));
        }
    }
    Ok(worst)
}

/// Strategy: a sequence length, usually short, often past one or several 64-row tiles.
pub fn seqlen() -> impl Strategy<Value = usize> {
    prop_oneof![3 => 0usize..=9, 2 => 0usize..=140, 1 => 100usize..=300]
}

/// Strategy: (hq, hk) with group sizes 1, 2, 4, and MQA (hk = 1).
pub fn heads() -> impl Strategy<Value = (usize, usize)> {
    prop_oneof![(1usize..=3).prop_map(|h| (h, h)), (1usize..=2).prop_map(|h| (2 * h, h)), Just((4, 1)), Just((8, 2)), (2usize..=6).prop_map(|h| (h, 1)),]
}

/// Strategy: one side of a window, -1 (unbounded) or a small or large width.
pub fn window_side() -> impl Strategy<Value = i64> {
    prop_oneof![2 => Just(-1i64), 2 => 0i64..8, 1 => 0i64..200]
}

pub fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::BF16), Just(DType::F16)]
}

pub fn head_dim() -> impl Strategy<Value = usize> {
    proptest::sample::select(HEAD_DIMS.to_vec())
}

/// The f64 reference backward of one sequence, and what the tolerance needs to know about it.
pub struct RefGrads {
    /// `[sq, hq, d]`, `[sk, hk, d]`, `[sk, hk, d]`: the exact gradients of sum(dout * out).
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
    /// Per element, the sum of the magnitudes of everything that enters it (the scale of its rounding
    /// error): dv: sum_i P |dout_i|; dq, dk: |scale| sum P (|dout|.|v_j| + |dout|.|out|) |ds/dx| |k_j| or |q_i|.
    pub dq_mag: Vec<f64>,
    pub dk_mag: Vec<f64>,
    pub dv_mag: Vec<f64>,
    /// Per element, how far dq and dk move when each row's D = dout . out is computed from the `out` the
    /// backward is given instead of the exact one: |scale| sum P |ds/dx| E_i |k_j| or |q_i|, with
    /// E_i = sum |dout_i| |given out_i - exact out_i|. Zero without a given out.
    pub dq_derr: Vec<f64>,
    pub dk_derr: Vec<f64>,
}

/// ALiBi and dropout for `reference_attention_full`: the slope of each query head (the bias of score (i, j)
/// is `-slope * |i + sk - sq - j|`, after the scale and the softcap), and dropout's probability with its
/// keep(h, i, j) decisions (kept probabilities scaled by 1 / (1 - p)).
pub struct RefMods<'a> {
    pub slopes: Option<&'a [f64]>,
    pub p: f64,
    pub keep: &'a dyn Fn(usize, usize, usize) -> bool,
}

fn keep_all(_: usize, _: usize, _: usize) -> bool {
    true
}

impl RefMods<'static> {
    /// No ALiBi, no dropout.
    pub fn none() -> RefMods<'static> {
        RefMods { slopes: None, p: 0.0, keep: &keep_all }
    }
}

/// One sequence's forward and backward: out `[sq, hq, d]`, lse `[hq, sq]`, P `[hq, sq, sk]` (0 where
/// invisible) and the gradients with their magnitudes.
pub struct RefOut {
    pub out: Vec<f64>,
    pub lse: Vec<f64>,
    pub probs: Vec<f64>,
    pub g: RefGrads,
}

/// One sequence's backward, straight from the definition: softmax Jacobian dS_j = P_j (dP_j Z_j - D) with
/// dP = dout . v, Z dropout's factor (1 without it) and D = dout . out, the softcap s = c tanh(x / c)
/// differentiated through its tanh, x = scale q.k (ALiBi's bias is constant in x). q and dout are
/// `[sq, hq, d]`, k and v `[sk, hk, d]`; `given_out` (`[sq, hq, d]`) is the out the library's backward
/// reads, used only for `dq_derr`/`dk_derr`. Rows that see no key contribute nothing.
#[allow(clippy::too_many_arguments)]
pub fn reference_attention_full(q: &[f64], k: &[f64], v: &[f64], dout: &[f64], given_out: Option<&[f64]>, sq: usize, sk: usize, hq: usize, hk: usize, d: usize, o: &RefOpts, m: &RefMods<'_>) -> RefOut {
    let z = |n: usize| vec![0.0f64; n];
    let (mut out, mut lse, mut probs) = (z(sq * hq * d), vec![f64::NEG_INFINITY; hq * sq], z(hq * sq * sk));
    let mut g = RefGrads { dq: z(sq * hq * d), dk: z(sk * hk * d), dv: z(sk * hk * d), dq_mag: z(sq * hq * d), dk_mag: z(sk * hk * d), dv_mag: z(sk * hk * d), dq_derr: z(sq * hq * d), dk_derr: z(sk * hk * d) };
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
            // Scores and ds/dx.
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
                    let bias = m.slopes.map_or(0.0, |sl| sl[h] * (i as f64 + sk as f64 - sq as f64 - j as f64).abs());
                    (s - bias, ds)
                })
                .unzip();
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = s.iter().map(|s| (s - max).exp()).sum();
            lse[h * sq + i] = max + sum.ln();
            let p: Vec<f64> = s.iter().map(|s| (s - max).exp() / sum).collect();
            let zf: Vec<f64> = keys.iter().map(|&j| if (m.keep)(h, i, j) { 1.0 / (1.0 - m.p) } else { 0.0 }).collect();
            let mut oi = vec![0.0f64; d];
            for (t, &j) in keys.iter().enumerate() {
                probs[(h * sq + i) * sk + j] = p[t];
                (0..d).for_each(|y| oi[y] += p[t] * zf[t] * vj(j)[y]);
            }
            out[(i * hq + h) * d..][..d].copy_from_slice(&oi);
            let dp: Vec<f64> = keys.iter().enumerate().map(|(t, &j)| zf[t] * (0..d).map(|y| gi[y] * vj(j)[y]).sum::<f64>()).collect();
            let delta: f64 = (0..d).map(|y| gi[y] * oi[y]).sum();
            // Magnitudes for the tolerance.
            let d_abs: f64 = (0..d).map(|y| gi[y].abs() * oi[y].abs()).sum();
            let e_i: f64 = given_out.map_or(0.0, |go| (0..d).map(|y| gi[y].abs() * (go[(i * hq + h) * d + y] - oi[y]).abs()).sum());
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

/// `reference_attention_full`'s gradients without ALiBi or dropout.
#[allow(clippy::too_many_arguments)]
pub fn reference_attention_bwd(q: &[f64], k: &[f64], v: &[f64], dout: &[f64], given_out: Option<&[f64]>, sq: usize, sk: usize, hq: usize, hk: usize, d: usize, o: &RefOpts) -> RefGrads {
    reference_attention_full(q, k, v, dout, given_out, sq, sk, hq, hk, d, o, &RefMods::none()).g
}

/// One gradient against a reference: |g - ref| <= u |ref| + tiny + (1 + 2u) (c mag + derr), u the dtype's
/// unit roundoff, tiny u times its smallest normal; exactly 0 where nothing enters (ref, mag and derr
/// all 0). Returns the worst |diff| / bound (cpu_backward.rs's header has the model).
pub fn check_grad(name: &str, got: &[f32], r: &[f64], mag: &[f64], derr: Option<&[f64]>, dtype: DType, c: f64) -> std::result::Result<f64, String> {
    if got.len() != r.len() {
        return Err(format!("{name}: {} elements, reference {}", got.len(), r.len()));
    }
    let u = unit_roundoff(dtype);
    let tiny = u * if dtype == DType::F16 { 2f64.powi(-14) } else { 2f64.powi(-126) };
    let mut worst = 0.0f64;
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
        worst = worst.max((g - r).abs() / bound);
        if !(g.is_finite() && (g - r).abs() <= bound) {
            return Err(format!("{name}[{e}] = {g}, reference {r} (|diff| {:.3e}, tolerance {bound:.3e}, mag {:.3e})", (g - r).abs(), mag[e]));
        }
    }
    Ok(worst)
}

/// A packed batch's reference backward: q/dout/out `[tq, hq, d]`, k/v `[tk, hk, d]`; sequence b is rows
/// `cu_q[b]..cu_q[b] + used_q[b]` of q and `cu_k[b]..cu_k[b] + used_k[b]` of k/v (a dense batch is
/// `cu = [0, s, 2s, ..]`). Rows and keys of no sequence get all-zero gradients, magnitudes and errors.
#[allow(clippy::too_many_arguments)]
pub fn reference_varlen_bwd(q: &[f32], k: &[f32], v: &[f32], dout: &[f32], given_out: &[f32], cu_q: &[usize], cu_k: &[usize], used_q: &[usize], used_k: &[usize], hq: usize, hk: usize, d: usize, o: &RefOpts) -> RefGrads {
    let (nq, nk) = (q.len(), k.len());
    let z = |n: usize| vec![0.0f64; n];
    let mut g = RefGrads { dq: z(nq), dk: z(nk), dv: z(nk), dq_mag: z(nq), dk_mag: z(nk), dv_mag: z(nk), dq_derr: z(nq), dk_derr: z(nk) };
    for b in 0..used_q.len() {
        let (sq, sk) = (used_q[b], used_k[b]);
        let (qr, kr) = (cu_q[b] * hq * d..(cu_q[b] + sq) * hq * d, cu_k[b] * hk * d..(cu_k[b] + sk) * hk * d);
        let s = reference_attention_bwd(&f64s(&q[qr.clone()]), &f64s(&k[kr.clone()]), &f64s(&v[kr.clone()]), &f64s(&dout[qr.clone()]), Some(&f64s(&given_out[qr.clone()])), sq, sk, hq, hk, d, o);
        g.dq[qr.clone()].copy_from_slice(&s.dq);
        g.dq_mag[qr.clone()].copy_from_slice(&s.dq_mag);
        g.dq_derr[qr].copy_from_slice(&s.dq_derr);
        g.dk[kr.clone()].copy_from_slice(&s.dk);
        g.dv[kr.clone()].copy_from_slice(&s.dv);
        g.dk_mag[kr.clone()].copy_from_slice(&s.dk_mag);
        g.dv_mag[kr.clone()].copy_from_slice(&s.dv_mag);
        g.dk_derr[kr].copy_from_slice(&s.dk_derr);
    }
    g
}

/// Mask and score options of one fuzz case.
#[derive(Clone, Copy, Debug)]
pub struct Opts {
    pub causal: bool,
    pub window: (i64, i64),
    pub softcap: f32,
    pub scale: Option<f32>,
    /// Kernel selection (CUDA only; results agree up to rounding).
    pub kernels: flash_attn::KernelChoice,
}

/// Strategy: causal or not, a window side each way, softcap off or on, default or custom (also negative)
/// scale.
pub fn opts() -> impl Strategy<Value = Opts> {
    let softcap = prop_oneof![3 => Just(0.0f32), 2 => 0.5f32..30.0];
    let scale = prop_oneof![3 => Just(None), 1 => (-0.3f32..0.3).prop_map(Some)];
    (any::<bool>(), window_side(), window_side(), softcap, scale).prop_map(|(causal, l, r, softcap, scale)| Opts { causal, window: (l, r), softcap, scale, kernels: Default::default() })
}

impl Opts {
    pub fn attn(&self) -> flash_attn::AttnOptions {
        flash_attn::AttnOptions { softmax_scale: self.scale, causal: self.causal, window: self.window, softcap: self.softcap, kernels: self.kernels, ..Default::default() }
    }
    pub fn reference(&self, d: usize) -> RefOpts {
        RefOpts { scale: self.scale.map_or(1.0 / (d as f64).sqrt(), f64::from), softcap: self.softcap as f64, causal: self.causal, window: self.window }
    }
}

/// Value ranges of q, k (small to sharp softmaxes) and v.
#[derive(Clone, Copy, Debug)]
pub struct Amp {
    pub q: f32,
    pub k: f32,
    pub v: f32,
}

pub fn amp() -> impl Strategy<Value = Amp> {
    let a = || proptest::sample::select(vec![0.5f32, 1.0, 2.0]);
    (a(), a(), proptest::sample::select(vec![1.0f32, 3.0])).prop_map(|(q, k, v)| Amp { q, k, v })
}

/// A paged copy of packed k and v (`[tk, hk, d]`, sequence b's `keys[b]` keys from row `cu_k[b]`): each
/// sequence takes the blocks of `page` rows its keys need from a shuffled pool of those plus
/// `extra_blocks` (at least `min_blocks` in all); table rows are `max_blocks` entries long (the longest
/// need plus a draw from `slack`), garbage from `garbage` past a sequence's blocks (entries no key is
/// read through); rows no key lives in are NaN, so reading one shows.
pub struct PagedCopy {
    pub kp: Vec<f32>,
    pub vp: Vec<f32>,
    /// `[keys.len(), max_blocks]`, row-major.
    pub table: Vec<i32>,
    pub max_blocks: usize,
    pub num_blocks: usize,
}

#[allow(clippy::too_many_arguments)]
pub fn paged_copy(rng: &mut StdRng, k: &[f32], v: &[f32], cu_k: &[usize], keys: &[usize], hk: usize, d: usize, page: usize, extra_blocks: usize, min_blocks: usize, slack: std::ops::Range<usize>, garbage: std::ops::Range<i32>) -> PagedCopy {
    let needed: Vec<usize> = keys.iter().map(|n| n.div_ceil(page)).collect();
    let max_blocks = needed.iter().copied().max().unwrap_or(0) + rng.gen_range(slack);
    let num_blocks = (needed.iter().sum::<usize>() + extra_blocks).max(min_blocks);
    let mut pool: Vec<usize> = (0..num_blocks).collect();
    pool.shuffle(rng);
    let mut table = vec![0i32; keys.len() * max_blocks];
    let mut kp = vec![f32::NAN; num_blocks * page * hk * d];
    let mut vp = kp.clone();
    let mut next = pool.into_iter();
    for b in 0..keys.len() {
        for i in 0..max_blocks {
            table[b * max_blocks + i] = if i < needed[b] { next.next().unwrap() as i32 } else { rng.gen_range(garbage.clone()) };
        }
        for t in 0..keys[b] {
            let block = table[b * max_blocks + t / page] as usize;
            let (src, dst) = ((cu_k[b] + t) * hk * d, (block * page + t % page) * hk * d);
            kp[dst..dst + hk * d].copy_from_slice(&k[src..src + hk * d]);
            vp[dst..dst + hk * d].copy_from_slice(&v[src..src + hk * d]);
        }
    }
    PagedCopy { kp, vp, table, max_blocks, num_blocks }
}
