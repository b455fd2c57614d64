//! Shared test helpers: an f64 reference attention written from the definition (plain loops, no tiling,
//! nothing from the library but the tensor constructors), random inputs, strided layouts, and the
//! tolerance check.
#![allow(dead_code)]

use flash_attn::{DType, Tensor};
use half::{bf16, f16};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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
                        dot += q[(i * hq + h) * d + x] as f64 * k[(j * hk + hkv) * d + x] as f64;
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
                    out[(i * hq + h) * d + x] += p * v[(j * hk + hkv) * d + x] as f64;
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
