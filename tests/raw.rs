//! The raw layer on host memory (CPU target): results against the f64 reference, strided caller outputs
//! written exactly within their views, backward bitwise equal to the `Tensor` API, and every bad input
//! (aliasing outputs, short workspace, misaligned CUDA rows, mismatched strides) a typed error naming the
//! argument, checked before any device memory would be touched; random output layouts in one arena: a
//! call writes only within its out and lse views, a refused one writes nothing.

#[path = "common/mod.rs"]
mod common;

use common::*;
use flash_attn::raw::{self, BwdViews, FwdViews, Workspace};
use flash_attn::{AttnOptions, DType, Error, Target, Tensor, VarlenViews, View};
use half::bf16;
use rand::Rng;

fn contiguous(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn bf(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

fn view<T>(buf: &[T], offset: usize, dtype: DType, shape: &'static [usize], strides: &'static [usize]) -> View<'static> {
    View { addr: buf.as_ptr() as u64 + (offset * std::mem::size_of::<T>()) as u64, dtype, shape, strides }
}

fn leak(v: Vec<usize>) -> &'static [usize] {
    Box::leak(v.into_boxed_slice())
}

/// Dense forward into a caller's out whose rows are padded (and the padding a sentinel): out and lse
/// match the f64 reference, and no element outside the two views changes.
#[test]
fn dense_forward_into_strided_caller_memory() {
    let (seed, mut rng) = seeded("dense_forward_into_strided_caller_memory");
    for (causal, window, softcap) in [(false, (-1, -1), 0.0), (true, (-1, -1), 0.0), (false, (20, 5), 0.0), (true, (-1, -1), 4.0)] {
        let (b, sq, sk, hq, hk, d) = (2, 37, 53, 4, 2, 64);
        let q = random_values(&mut rng, b * sq * hq * d, 1.0, DType::BF16);
        let k = random_values(&mut rng, b * sk * hk * d, 1.0, DType::BF16);
        let v = random_values(&mut rng, b * sk * hk * d, 1.0, DType::BF16);
        let (qb, kb, vb) = (bf(&q), bf(&k), bf(&v));
        // out rows padded by 16 elements, starting 8 elements in; the rest is a sentinel.
        let pad = 16;
        let row = hq * d + pad;
        let sentinel = bf16::from_f32(-7.5);
        let mut out = vec![sentinel; 8 + b * sq * row + 8];
        let mut lse = vec![f32::NAN; b * hq * sq + 3];
        let (qs, ks, ls) = (leak(vec![b, sq, hq, d]), leak(vec![b, sk, hk, d]), leak(vec![b, hq, sq]));
        let out_strides = leak(vec![sq * row, row, d, 1]);
        let views = FwdViews {
            q: view(&qb, 0, DType::BF16, qs, leak(contiguous(qs))),
            k: view(&kb, 0, DType::BF16, ks, leak(contiguous(ks))),
            v: view(&vb, 0, DType::BF16, ks, leak(contiguous(ks))),
            out: View { addr: out.as_mut_ptr() as u64 + 16, dtype: DType::BF16, shape: qs, strides: out_strides },
            lse: View { addr: lse.as_mut_ptr() as u64, dtype: DType::F32, shape: ls, strides: leak(contiguous(ls)) },
            alibi_slopes: None,
            s_dmask: None,
        };
        let opts = AttnOptions { causal, window, softcap, ..Default::default() };
        unsafe { raw::fwd(&views, &opts, Target::Cpu) }.unwrap();
        let mut got = Vec::new();
        for (i, x) in out.iter().enumerate() {
            let inside = i >= 8 && i < 8 + b * sq * row && (i - 8) % row < hq * d;
            if inside {
                got.push(x.to_f32());
            } else {
                assert_eq!(x.to_bits(), sentinel.to_bits(), "seed {seed}: out[{i}] outside the view was written");
            }
        }
        assert!(lse[b * hq * sq..].iter().all(|x| x.is_nan()), "seed {seed}: lse written past its view");
        let r = RefOpts { scale: 1.0 / (d as f64).sqrt(), softcap: softcap as f64, causal, window };
        let (ro, rl) = reference_fwd(&q, &k, &v, b, sq, sk, hq, hk, d, &r);
        let smax = if softcap > 0.0 { softcap as f64 } else { d as f64 * r.scale };
        check_close(&got, &lse[..b * hq * sq], &ro, &rl, &Tolerance::new(DType::BF16, 1.0, smax)).unwrap_or_else(|e| panic!("seed {seed}: {opts:?}: {e}"));
    }
}

/// `fwd_decode` on the CPU is `fwd`, bit for bit, with no workspace; on CUDA targets it decides without a GPU
/// which calls are decoding steps (`dense_fwd_decodes`).
#[test]
fn fwd_decode_on_the_cpu_is_fwd() {
    let (seed, mut rng) = seeded("fwd_decode_on_the_cpu_is_fwd");
    for (sq, causal, window, softcap) in [(1, false, (-1, -1), 0.0), (3, true, (-1, -1), 0.0), (2, false, (7, 0), 0.0), (1, false, (-1, -1), 5.0)] {
        let (b, sk, hq, hk, d) = (3, 45, 8, 2, 64);
        let q = bf(&random_values(&mut rng, b * sq * hq * d, 1.0, DType::BF16));
        let k = bf(&random_values(&mut rng, b * sk * hk * d, 1.0, DType::BF16));
        let v = bf(&random_values(&mut rng, b * sk * hk * d, 1.0, DType::BF16));
        let (qs, ks, ls) = (leak(vec![b, sq, hq, d]), leak(vec![b, sk, hk, d]), leak(vec![b, hq, sq]));
        let run = |decode: bool| {
            let mut out = vec![bf16::ZERO; q.len()];
            let mut lse = vec![0f32; b * hq * sq];
            let views = FwdViews {
                q: view(&q, 0, DType::BF16, qs, leak(contiguous(qs))),
                k: view(&k, 0, DType::BF16, ks, leak(contiguous(ks))),
                v: view(&v, 0, DType::BF16, ks, leak(contiguous(ks))),
                out: View { addr: out.as_mut_ptr() as u64, dtype: DType::BF16, shape: qs, strides: leak(contiguous(qs)) },
                lse: View { addr: lse.as_mut_ptr() as u64, dtype: DType::F32, shape: ls, strides: leak(contiguous(ls)) },
                alibi_slopes: None,
                s_dmask: None,
            };
            let opts = AttnOptions { causal, window, softcap, ..Default::default() };
            assert!(raw::dense_fwd_decodes(qs, ks, DType::BF16, &opts, false), "a decoding step's shape");
            assert_eq!(raw::decode_workspace_bytes(&views, &opts, Target::Cpu).unwrap(), 0);
            if decode {
                unsafe { raw::fwd_decode(&views, &opts, Workspace::default(), Target::Cpu) }.unwrap();
            } else {
                unsafe { raw::fwd(&views, &opts, Target::Cpu) }.unwrap();
            }
            (out.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
        };
        assert!(run(true) == run(false), "seed {seed}: sq {sq} causal {causal} window {window:?} softcap {softcap}: fwd_decode differs from fwd");
    }
}

/// Packed forward with seqused and a tail on host memory: matches the f64 reference, padding rows 0 /
/// -inf.
#[test]
fn varlen_forward_on_host_memory() {
    let (seed, mut rng) = seeded("varlen_forward_on_host_memory");
    let (hq, hk, d) = (2, 1, 32);
    let (cu_q, cu_k, used_q, used_k) = (vec![0i32, 30, 30, 75], vec![0i32, 40, 41, 100], vec![25i32, 0, 45], vec![40i32, 1, 50]);
    let (tq, tk) = (80, 104);
    let q = random_values(&mut rng, tq * hq * d, 1.0, DType::BF16);
    let k = random_values(&mut rng, tk * hk * d, 1.0, DType::BF16);
    let v = random_values(&mut rng, tk * hk * d, 1.0, DType::BF16);
    let (qb, kb, vb) = (bf(&q), bf(&k), bf(&v));
    let mut out = vec![bf16::from_f32(3.0); tq * hq * d];
    let mut lse = vec![0.0f32; hq * tq];
    let (qs, ks, ls) = (leak(vec![tq, hq, d]), leak(vec![tk, hk, d]), leak(vec![hq, tq]));
    let views = FwdViews {
        q: view(&qb, 0, DType::BF16, qs, leak(contiguous(qs))),
        k: view(&kb, 0, DType::BF16, ks, leak(contiguous(ks))),
        v: view(&vb, 0, DType::BF16, ks, leak(contiguous(ks))),
        out: View { addr: out.as_mut_ptr() as u64, dtype: DType::BF16, shape: qs, strides: leak(contiguous(qs)) },
        lse: View { addr: lse.as_mut_ptr() as u64, dtype: DType::F32, shape: ls, strides: leak(contiguous(ls)) },
        alibi_slopes: None,
        s_dmask: None,
    };
    let vec1 = |x: &Vec<i32>| view(x, 0, DType::I32, leak(vec![x.len()]), leak(vec![1]));
    let vl = VarlenViews { cu_seqlens_q: vec1(&cu_q), cu_seqlens_k: vec1(&cu_k), max_seqlen_q: Some(45), max_seqlen_k: Some(50), seqused_q: Some(vec1(&used_q)), seqused_k: Some(vec1(&used_k)) };
    let opts = AttnOptions { causal: true, ..Default::default() };
    unsafe { raw::varlen_fwd(&views, &vl, &opts, Target::Cpu) }.unwrap();
    let us = |x: &[i32]| x.iter().map(|&v| v as usize).collect::<Vec<_>>();
    let r = RefOpts { scale: 1.0 / (d as f64).sqrt(), softcap: 0.0, causal: true, window: (-1, -1) };
    let (ro, rl) = reference_varlen_fwd(&q, &k, &v, &us(&cu_q), &us(&cu_k), &us(&used_q), &us(&used_k), tq, hq, hk, d, &r);
    let got: Vec<f32> = out.iter().map(|x| x.to_f32()).collect();
    check_close(&got, &lse, &ro, &rl, &Tolerance::new(DType::BF16, 1.0, d as f64 * r.scale)).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
}

/// The backward into caller memory (dq, dk, dv as interleaved slices of one packed gradient buffer)
/// equals the `Tensor` API's backward bitwise (itself checked against the f64 reference in
/// cpu_backward.rs), and writes every element of the packed buffer.
#[test]
fn backward_into_a_packed_gradient_buffer() {
    let (seed, mut rng) = seeded("backward_into_a_packed_gradient_buffer");
    let (b, s, h, d) = (2, 40, 2, 64);
    let n = b * s * h * d;
    let [q, k, v, dout] = [(); 4].map(|_| random_values(&mut rng, n, 1.0, DType::BF16));
    let opts = AttnOptions { causal: true, softcap: 3.0, ..Default::default() };
    let shape = [b, s, h, d];
    let t = |x: &[f32]| Tensor::from_f32(x, &shape, DType::BF16).unwrap();
    let (qt, kt, vt, gt) = (t(&q), t(&k), t(&v), t(&dout));
    let f = flash_attn::fwd(&qt, &kt, &vt, &opts).unwrap();
    let want = flash_attn::bwd(&gt, &qt, &kt, &vt, &f.out, &f.lse, &opts, false).unwrap();

    let (qb, kb, vb, gb) = (bf(&q), bf(&k), bf(&v), bf(&dout));
    let ob = bf(&f.out.to_f32_vec().unwrap());
    let lse = f.lse.to_f32_vec().unwrap();
    let mut grads = vec![bf16::NAN; 3 * n];
    let (sh, ls) = (leak(shape.to_vec()), leak(vec![b, h, s]));
    let cont = leak(contiguous(sh));
    let packed = leak(vec![s * 3 * h * d, 3 * h * d, d, 1]);
    let base = grads.as_mut_ptr() as u64;
    let g = |i: usize| View { addr: base + (i * h * d * 2) as u64, dtype: DType::BF16, shape: sh, strides: packed };
    let bv = BwdViews {
        dout: view(&gb, 0, DType::BF16, sh, cont),
        q: view(&qb, 0, DType::BF16, sh, cont),
        k: view(&kb, 0, DType::BF16, sh, cont),
        v: view(&vb, 0, DType::BF16, sh, cont),
        out: view(&ob, 0, DType::BF16, sh, cont),
        lse: view(&lse, 0, DType::F32, ls, leak(contiguous(ls))),
        dq: g(0),
        dk: g(1),
        dv: g(2),
        alibi_slopes: None,
    };
    unsafe { raw::bwd(&bv, &opts, false, Workspace::default(), Target::Cpu) }.unwrap();
    for (i, (name, w)) in [("dq", &want.dq), ("dk", &want.dk), ("dv", &want.dv)].into_iter().enumerate() {
        let got: Vec<f32> = (0..b * s).flat_map(|r| grads[(r * 3 + i) * h * d..][..h * d].iter().map(|x| x.to_f32()).collect::<Vec<_>>()).collect();
        let w = w.to_f32_vec().unwrap();
        assert!(got.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits()), "seed {seed}: {name} differs from the Tensor API");
    }
    assert!(grads.iter().all(|x| !x.is_nan()), "seed {seed}: an element of the packed gradient buffer was not written");
}

/// Bad raw calls return typed errors naming the argument, for CPU and CUDA targets alike (validation
/// needs no device: these run without a GPU, and none of them reaches one).
#[test]
fn bad_raw_calls_are_typed_errors() {
    let (b, s, h, d) = (1, 16, 2, 64);
    let n = b * s * h * d;
    let buf = vec![bf16::ZERO; 4 * n + 64];
    let lse = vec![0.0f32; 2 * b * h * s];
    let (sh, ls) = (leak(vec![b, s, h, d]), leak(vec![b, h, s]));
    let cont = leak(contiguous(sh));
    let at = |i: usize| View { addr: buf.as_ptr() as u64 + (i * n * 2) as u64, dtype: DType::BF16, shape: sh, strides: cont };
    let lse_v = View { addr: lse.as_ptr() as u64, dtype: DType::F32, shape: ls, strides: leak(contiguous(ls)) };
    let good = FwdViews { q: at(0), k: at(1), v: at(2), out: at(3), lse: lse_v, alibi_slopes: None, s_dmask: None };
    let o = AttnOptions::default();
    let cuda = Target::Cuda { ordinal: 0, stream: 0 };
    // fwd_decode (a decoding step's shape: 16 query rows per kv head) fails as fwd does, naming the same argument.
    let fwd_err = |t: FwdViews<'_>, target| {
        let e = unsafe { raw::fwd(&t, &o, target) }.expect_err("must fail");
        let d = unsafe { raw::fwd_decode(&t, &o, Workspace::default(), target) }.expect_err("fwd_decode must fail");
        assert_eq!(e.to_string(), d.to_string(), "fwd_decode's error");
        e
    };
    let is = |e: Error, arg: &str| {
        let msg = e.to_string();
        assert!(msg.contains(arg), "{msg:?} should name {arg}");
    };
    for target in [Target::Cpu, cuda] {
        is(fwd_err(FwdViews { out: at(0), ..good }, target), "out"); // out is q
        is(fwd_err(FwdViews { out: View { addr: at(2).addr + 64, ..at(2) }, ..good }, target), "out"); // overlaps v
        is(fwd_err(FwdViews { lse: View { addr: at(3).addr, ..lse_v }, ..good }, target), "lse"); // overlaps out
        // An out whose rows share memory (a broadcast over the sequence, heads one row apart).
        let shared = FwdViews { out: View { strides: leak(vec![s * h * d, 0, d, 1]), ..at(3) }, ..good };
        is(fwd_err(shared, target), "out: has elements that share memory");
        is(fwd_err(FwdViews { out: View { strides: leak(vec![s * h * d, h * d, d / 2, 1]), ..at(3) }, ..good }, target), "out: has elements");
        is(fwd_err(FwdViews { q: View { strides: leak(vec![1]), ..at(0) }, ..good }, target), "q"); // strides of the wrong rank
        is(fwd_err(FwdViews { lse: View { dtype: DType::BF16, ..lse_v }, ..good }, target), "lse");
        is(fwd_err(FwdViews { out: View { shape: leak(vec![b, s, h, 32]), strides: leak(contiguous(&[b, s, h, 32])), ..at(3) }, ..good }, target), "out");
    }
    // CUDA rows must be 16-byte aligned; the CPU takes any address.
    let odd = FwdViews { q: View { addr: at(0).addr + 2, ..at(0) }, ..good };
    is(fwd_err(odd, cuda), "q");

    // The backward: workspace too small or misaligned on CUDA; dq aliasing dk.
    let grads = vec![bf16::ZERO; 3 * n];
    let g = |i: usize| View { addr: grads.as_ptr() as u64 + (i * n * 2) as u64, dtype: DType::BF16, shape: sh, strides: cont };
    let bv = BwdViews { dout: at(3), q: at(0), k: at(1), v: at(2), out: at(3), lse: lse_v, dq: g(0), dk: g(1), dv: g(2), alibi_slopes: None };
    let need = raw::bwd_workspace_bytes(sh, false).unwrap();
    assert!(need > 0 && raw::bwd_workspace_bytes(sh, true).unwrap() < need, "the deterministic backward needs no dq accumulator");
    let bwd_err = |t: BwdViews<'_>, ws, target| unsafe { raw::bwd(&t, &o, false, ws, target) }.expect_err("must fail");
    is(bwd_err(bv, Workspace { addr: 1 << 20, bytes: need - 1 }, cuda), "workspace");
    is(bwd_err(bv, Workspace { addr: (1 << 20) + 16, bytes: need }, cuda), "workspace");
    is(bwd_err(bv, Workspace { addr: at(0).addr & !255, bytes: need + 4096 }, cuda), "workspace"); // overlaps q
    for target in [Target::Cpu, cuda] {
        is(bwd_err(BwdViews { dk: g(0), ..bv }, Workspace { addr: 1 << 20, bytes: need }, target), "dq");
        is(bwd_err(BwdViews { dv: at(1), ..bv }, Workspace { addr: 1 << 20, bytes: need }, target), "dv");
        is(bwd_err(BwdViews { dk: View { strides: leak(vec![s * h * d, 0, d, 1]), ..g(1) }, ..bv }, Workspace { addr: 1 << 20, bytes: need }, target), "dk: has elements that share memory");
    }
    assert!(matches!(raw::bwd_workspace_bytes(&[2, 3, 48], false), Err(Error::HeadDim { got: 48 })));
    assert!(matches!(raw::bwd_workspace_bytes(&[2, 3], false), Err(Error::Rank { .. })));
}

/// Every element address of `v` (elements of `size` bytes), as byte ranges `[start, end)`.
fn view_bytes(v: &View<'_>, size: usize) -> Vec<(u64, u64)> {
    let n: usize = v.shape.iter().product();
    let mut out = Vec::with_capacity(n);
    for mut i in 0..n {
        let mut off = 0;
        for (&dim, &stride) in v.shape.iter().zip(v.strides).rev() {
            off += (i % dim) * stride;
            i /= dim;
        }
        let start = v.addr + (off * size) as u64;
        out.push((start, start + size as u64));
    }
    out
}

/// Random dense forwards on host memory whose out and lse views sit at random places of one arena, with
/// random strides (padded, permuted, zero: self-overlapping), dtypes and head dims now and then wrong,
/// and the two views sometimes overlapping: a call either fails with a typed error and the arena is
/// untouched, or succeeds and changes no arena byte outside its two views.
#[test]
fn random_raw_outputs_stay_within_their_views() {
    let (seed, mut rng) = seeded("random_raw_outputs_stay_within_their_views");
    let mut ran = 0;
    for case in 0..300 {
        let (b, sq, sk, hq) = (rng.gen_range(1..3), rng.gen_range(1..9), rng.gen_range(1..9), [1, 2, 4][rng.gen_range(0..3)]);
        let hk = if rng.gen_bool(0.9) { [1, hq][rng.gen_range(0..2)] } else { 3 };
        let d = [32, 64, 64, 40][rng.gen_range(0..4)];
        let qs = leak(vec![b, sq, hq, d]);
        let ks = leak(vec![b, sk, hk, d]);
        let ls = leak(vec![b, hq, sq]);
        let qb: Vec<bf16> = (0..b * sq * hq * d).map(|_| bf16::from_f32(rng.gen_range(-1.0..1.0))).collect();
        let kb: Vec<bf16> = (0..b * sk * hk * d).map(|_| bf16::from_f32(rng.gen_range(-1.0..1.0))).collect();
        let vb: Vec<bf16> = (0..b * sk * hk * d).map(|_| bf16::from_f32(rng.gen_range(-1.0..1.0))).collect();
        // Strides for out and lse: contiguous with random padding per dimension, now and then a 0 or the
        // dimensions swapped (the CPU writes any layout; overlapping elements must be refused).
        let strides_for = |shape: &[usize], rng: &mut rand::rngs::StdRng| -> Vec<usize> {
            let mut s = vec![1; shape.len()];
            for i in (0..shape.len().saturating_sub(1)).rev() {
                s[i] = s[i + 1] * shape[i + 1] + if rng.gen_bool(0.3) { rng.gen_range(0..5) } else { 0 };
            }
            if rng.gen_bool(0.05) {
                let i = rng.gen_range(0..shape.len());
                s[i] = 0;
            }
            if rng.gen_bool(0.05) && shape.len() >= 2 {
                s.swap(0, 1);
            }
            s
        };
        let out_strides = leak(strides_for(qs, &mut rng));
        let lse_strides = leak(strides_for(ls, &mut rng));
        let span = |shape: &[usize], strides: &[usize]| shape.iter().zip(strides).map(|(&n, &s)| (n - 1) * s).sum::<usize>() + 1;
        let (out_bytes, lse_bytes) = (span(qs, out_strides) * 2, span(ls, lse_strides) * 4);
        // One arena of u32 words (aligned for f32), filled with a sentinel; out and lse at random word
        // offsets, overlapping now and then.
        let words = (out_bytes + lse_bytes) / 4 + 64;
        let sentinel = 0xA5A5_A5A5u32;
        let mut arena = vec![sentinel; words];
        let out_at = rng.gen_range(0..4usize);
        let lse_at = if rng.gen_bool(0.1) { rng.gen_range(0..out_bytes / 4 + 1) } else { out_at + out_bytes / 4 + 1 + rng.gen_range(0..4usize) };
        let base = arena.as_mut_ptr() as u64;
        let out_dtype = if rng.gen_bool(0.95) { DType::BF16 } else { DType::F16 };
        let lse_dtype = if rng.gen_bool(0.95) { DType::F32 } else { DType::BF16 };
        let views = FwdViews {
            q: view(&qb, 0, DType::BF16, qs, leak(contiguous(qs))),
            k: view(&kb, 0, DType::BF16, ks, leak(contiguous(ks))),
            v: view(&vb, 0, DType::BF16, ks, leak(contiguous(ks))),
            out: View { addr: base + (out_at * 4) as u64, dtype: out_dtype, shape: qs, strides: out_strides },
            lse: View { addr: base + (lse_at * 4) as u64, dtype: lse_dtype, shape: ls, strides: lse_strides },
            alibi_slopes: None,
            s_dmask: None,
        };
        let causal = rng.gen_bool(0.5);
        let opts = AttnOptions { causal, ..Default::default() };
        let lse_size = if lse_dtype == DType::F32 { 4 } else { 2 };
        let mut allowed: Vec<(u64, u64)> = view_bytes(&views.out, 2);
        allowed.extend(view_bytes(&views.lse, lse_size));
        let within_arena = allowed.iter().all(|&(s, e)| s >= base && e <= base + (words * 4) as u64);
        assert!(within_arena, "seed {seed}: case {case}: the test placed a view outside its arena");
        // SAFETY: every view lies within its buffer (checked just above for out and lse).
        let result = unsafe { raw::fwd(&views, &opts, Target::Cpu) };
        let bytes = unsafe { std::slice::from_raw_parts(arena.as_ptr() as *const u8, words * 4) };
        let sentinel_bytes = sentinel.to_le_bytes();
        match result {
            Ok(()) => {
                ran += 1;
                allowed.sort_unstable();
                let mut next = 0;
                for (i, &byte) in bytes.iter().enumerate() {
                    let addr = base + i as u64;
                    while next < allowed.len() && allowed[next].1 <= addr {
                        next += 1;
                    }
                    let inside = next < allowed.len() && allowed[next].0 <= addr;
                    if !inside {
                        assert_eq!(byte, sentinel_bytes[i % 4], "seed {seed}: case {case}: byte {i} of the arena, outside out and lse, was written");
                    }
                }
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(!msg.is_empty(), "seed {seed}: case {case}: an error without a message");
                assert!(arena.iter().all(|&w| w == sentinel), "seed {seed}: case {case}: {msg}, but the arena was written");
            }
        }
    }
    eprintln!("random_raw_outputs_stay_within_their_views: {ran} of 300 calls ran, the rest were refused");
}
