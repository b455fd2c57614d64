//! The GPU suite: the fused CUDA kernels against the f64 reference on every head dim, dtype, mask and
//! layout; packing independence bitwise; padding written by the kernel; nothing written outside the
//! outputs, even with bogus device-resident lengths. On a machine without a CUDA GPU every test prints a
//! notice and passes vacuously (CI has no GPU; run this on the GPU machine before resolving GPU work).
//!
//! Kernel families. On a Hopper GPU every kernel test runs each case twice on the same inputs and
//! reference: with the default choice (the wgmma forward at head dims 64-256, mma.sync at 32) and with
//! `KernelChoice::no_wgmma` (the mma.sync forward at every head dim), which no other test reaches there.
//! Each passing test prints `KERNELS <test> passed on <GPU>:` and a line per (choice -> family) with its
//! runs and head dims (tests/common/kernels.rs); elsewhere only the default runs (it is mma.sync).
//!
//! Tolerances. The kernel rounds P (the softmax numerators, in [0, 1]) to the input dtype before the
//! P.V tensor-core product and rounds the output once; everything else is f32 (ex2.approx, 2 ulp).
//! With u the dtype's unit roundoff, each p_j carries a relative error <= u, so
//! |sum_j p_j v_j / l - ref| <= u * max|v| plus the output rounding u * |ref|; we allow twice the first
//! term (accumulation-order slack): |out - ref| <= u |ref| + 2 u max|v|. The LSE is f32 throughout; its
//! error is dominated by the f32 dot products (D terms of magnitude <= |s|max / D), so 2^-14 (1 + |s|max)
//! absolute is a loose bound that still catches any masking or scaling mistake (those move the LSE by
//! O(1)).

#[path = "common/mod.rs"]
mod common;
#[path = "common/kernels.rs"]
mod kernels;

use common::*;
use flash_attn::{fwd, fwd_into, fwd_kvcache, raw, varlen_fwd, varlen_fwd_into, AttnOptions, DType, Device, KernelChoice, KvCache, KvCacheOptions, Tensor, Varlen};
use kernels::{fwd_choices, fwd_family, fwd_family_keys, Tally};
use rand::rngs::StdRng;
use rand::Rng;

const GPU: Device = Device::Cuda(0);

macro_rules! require_gpu {
    () => {
        if !kernels::gpu_or_skip("gpu", false, line!()) {
            return;
        }
    };
}

/// A device tensor with `logical` values (common::make_tensor_on).
fn device_tensor(logical: &[f32], shape: &[usize], dtype: DType, strided: bool, rng: &mut StdRng) -> Tensor {
    make_tensor_on(logical, shape, dtype, strided, rng, GPU)
}

fn i32_tensor(v: &[usize], device: Device) -> Tensor {
    i32_tensor_on(v, device)
}

struct Case {
    dtype: DType,
    d: usize,
    hq: usize,
    hk: usize,
    causal: bool,
    window: (i64, i64),
    softcap: f32,
}

impl Case {
    fn opts(&self, kernels: KernelChoice) -> AttnOptions {
        AttnOptions { softmax_scale: None, causal: self.causal, window: self.window, softcap: self.softcap, kernels, ..Default::default() }
    }
    fn ref_opts(&self) -> RefOpts {
        RefOpts { scale: 1.0 / (self.d as f64).sqrt(), softcap: self.softcap as f64, causal: self.causal, window: self.window }
    }
    fn smax(&self) -> f64 {
        if self.softcap > 0.0 { self.softcap as f64 } else { (self.d as f64).sqrt() }
    }
}

/// One dense problem under every kernel choice (`fwd_choices`) against one reference; returns the worst
/// (out, lse) |diff| / tolerance over them.
fn dense_case(rng: &mut StdRng, c: &Case, b: usize, sq: usize, sk: usize, strided: bool, tally: &mut Tally) -> Result<(f64, f64), String> {
    let q = random_values(rng, b * sq * c.hq * c.d, 1.0, c.dtype);
    let k = random_values(rng, b * sk * c.hk * c.d, 1.0, c.dtype);
    let v = random_values(rng, b * sk * c.hk * c.d, 1.0, c.dtype);
    let qt = device_tensor(&q, &[b, sq, c.hq, c.d], c.dtype, strided, rng);
    let kt = device_tensor(&k, &[b, sk, c.hk, c.d], c.dtype, strided, rng);
    let vt = device_tensor(&v, &[b, sk, c.hk, c.d], c.dtype, strided, rng);
    let (ro, rl) = reference_fwd(&q, &k, &v, b, sq, sk, c.hq, c.hk, c.d, &c.ref_opts());
    let tol = gpu_tolerance(c.dtype, 1.0, c.smax());
    let mut worst = (0.0f64, 0.0f64);
    for (name, choice) in fwd_choices() {
        let family = fwd_family_keys(c.d, c.dtype, choice, sk);
        let o = fwd(&qt, &kt, &vt, &c.opts(choice)).map_err(|e| format!("[{name}: {family}] {e}"))?;
        let w = check_close(&o.out.to_f32_vec().unwrap(), &o.lse.to_f32_vec().unwrap(), &ro, &rl, &tol).map_err(|e| format!("[{name}: {family}] {e}"))?;
        worst = (worst.0.max(w.0), worst.1.max(w.1));
        tally.add(name, family, c.d);
    }
    Ok(worst)
}

#[test]
fn dense_every_head_dim_and_mask() {
    require_gpu!();
    let mut rng = rng(rand::random());
    let mut tally = Tally::new("gpu::dense_every_head_dim_and_mask");
    let masks: [(bool, (i64, i64), f32); 5] = [(false, (-1, -1), 0.0), (true, (-1, -1), 0.0), (false, (37, 5), 0.0), (true, (70, -1), 0.0), (false, (-1, -1), 15.0)];
    for dtype in [DType::BF16, DType::F16] {
        for d in HEAD_DIMS {
            for (i, &(causal, window, softcap)) in masks.iter().enumerate() {
                let (hq, hk) = [(2, 2), (4, 2), (3, 1)][i % 3];
                let c = Case { dtype, d, hq, hk, causal, window, softcap };
                // Sq < Sk, Sq > Sk, and lengths off the tile grid.
                for (b, sq, sk) in [(2, 77, 203), (1, 190, 61), (1, 128, 128)] {
                    let strided = rng.gen_bool(0.5);
                    dense_case(&mut rng, &c, b, sq, sk, strided, &mut tally).unwrap_or_else(|e| {
                        panic!("{dtype} d={d} hq={hq} hk={hk} causal={causal} window={window:?} softcap={softcap} b={b} sq={sq} sk={sk} strided={strided}: {e}")
                    });
                }
            }
        }
    }
    tally.report();
}

#[test]
fn dense_long_sequences() {
    require_gpu!();
    let mut rng = rng(rand::random());
    let mut tally = Tally::new("gpu::dense_long_sequences");
    for (d, causal) in [(64, true), (128, false), (128, true), (256, true)] {
        let c = Case { dtype: DType::BF16, d, hq: 2, hk: 1, causal, window: (-1, -1), softcap: 0.0 };
        let worst = dense_case(&mut rng, &c, 1, 1500, 1500, false, &mut tally).unwrap_or_else(|e| panic!("d={d} causal={causal}: {e}"));
        eprintln!("long d={d} causal={causal}: worst out/tol {:.3}, lse/tol {:.3}", worst.0, worst.1);
    }
    // Head dim 192 from `FWD_WS_WIDE_MIN_KEYS` keys on: the wide-tile ws kernel (112-key tiles), both
    // dtypes, every mask, a key count off its tile grid and one on the threshold.
    let masks: [(bool, (i64, i64), f32); 4] = [(false, (-1, -1), 0.0), (true, (-1, -1), 0.0), (false, (300, 90), 0.0), (false, (-1, -1), 15.0)];
    for dtype in [DType::BF16, DType::F16] {
        for (i, &(causal, window, softcap)) in masks.iter().enumerate() {
            let c = Case { dtype, d: 192, hq: 2, hk: 1, causal, window, softcap };
            let (sq, sk) = [(300, 2048), (700, 2161)][i % 2];
            let strided = i >= 2 && rng.gen_bool(0.5);
            let worst = dense_case(&mut rng, &c, 1, sq, sk, strided, &mut tally).unwrap_or_else(|e| panic!("{dtype} d=192 causal={causal} window={window:?} softcap={softcap} sq={sq} sk={sk} strided={strided}: {e}"));
            eprintln!("long {dtype} d=192 causal={causal} window={window:?} softcap={softcap} {sq}x{sk}: worst out/tol {:.3}, lse/tol {:.3}", worst.0, worst.1);
        }
        // Packed, max_seqlen_k 2150: seqused below the slots, a short sequence, an empty one, tail rows.
        let l = Layout { slot_q: vec![200, 0, 90, 30], slot_k: vec![2200, 40, 2100, 70], used_q: Some(vec![180, 0, 90, 30]), used_k: Some(vec![2150, 40, 1900, 0]), tail_q: 5, tail_k: 7 };
        for (causal, window) in [(true, (-1, -1)), (false, (250, 40))] {
            let c = Case { dtype, d: 192, hq: 4, hk: 2, causal, window, softcap: 0.0 };
            varlen_case(&mut rng, &c, &l, &mut tally).unwrap_or_else(|e| panic!("{dtype} d=192 packed causal={causal} window={window:?}: {e}"));
        }
    }
    tally.report();
}

/// A random varlen layout: lengths (zero-length sequences included), optional seqused, tail rows.
struct Layout {
    slot_q: Vec<usize>,
    slot_k: Vec<usize>,
    used_q: Option<Vec<usize>>,
    used_k: Option<Vec<usize>>,
    tail_q: usize,
    tail_k: usize,
}

impl Layout {
    fn random(rng: &mut StdRng, b: usize, maxlen: usize) -> Layout {
        let len = |rng: &mut StdRng| if rng.gen_bool(0.15) { 0 } else { rng.gen_range(1..=maxlen) };
        let slot_q: Vec<usize> = (0..b).map(|_| len(rng)).collect();
        let slot_k: Vec<usize> = (0..b).map(|_| len(rng)).collect();
        let used = |rng: &mut StdRng, slots: &[usize]| slots.iter().map(|&s| rng.gen_range(0..=s)).collect::<Vec<_>>();
        let used_q = if rng.gen_bool(0.4) { Some(used(rng, &slot_q)) } else { None };
        let used_k = if rng.gen_bool(0.4) { Some(used(rng, &slot_k)) } else { None };
        Layout { slot_q, slot_k, used_q, used_k, tail_q: rng.gen_range(0..20), tail_k: rng.gen_range(0..20) }
    }
    fn cu(slots: &[usize]) -> Vec<usize> {
        std::iter::once(0).chain(slots.iter().scan(0, |acc, &s| {
            *acc += s;
            Some(*acc)
        })).collect()
    }
    fn used_q(&self) -> Vec<usize> {
        self.used_q.clone().unwrap_or_else(|| self.slot_q.clone())
    }
    fn used_k(&self) -> Vec<usize> {
        self.used_k.clone().unwrap_or_else(|| self.slot_k.clone())
    }
}

/// One packed problem under every kernel choice against one reference.
fn varlen_case(rng: &mut StdRng, c: &Case, l: &Layout, tally: &mut Tally) -> Result<(), String> {
    let (cu_q, cu_k) = (Layout::cu(&l.slot_q), Layout::cu(&l.slot_k));
    let tq = cu_q.last().unwrap() + l.tail_q;
    let tk = cu_k.last().unwrap() + l.tail_k;
    let q = random_values(rng, tq * c.hq * c.d, 1.0, c.dtype);
    let k = random_values(rng, tk * c.hk * c.d, 1.0, c.dtype);
    let v = random_values(rng, tk * c.hk * c.d, 1.0, c.dtype);
    let strided = rng.gen_bool(0.5);
    let qt = device_tensor(&q, &[tq, c.hq, c.d], c.dtype, strided, rng);
    let kt = device_tensor(&k, &[tk, c.hk, c.d], c.dtype, strided, rng);
    let vt = device_tensor(&v, &[tk, c.hk, c.d], c.dtype, strided, rng);
    let (cqt, ckt) = (i32_tensor(&cu_q, GPU), i32_tensor(&cu_k, GPU));
    let uq = l.used_q.as_ref().map(|u| i32_tensor(u, GPU));
    let uk = l.used_k.as_ref().map(|u| i32_tensor(u, GPU));
    let (used_q, used_k) = (l.used_q(), l.used_k());
    // The max lengths: exact, a loose bound, or not given (the kernels schedule by the mean lengths and
    // stride over the longer sequences).
    let (max_q, max_k) = (used_q.iter().copied().max().unwrap_or(0), used_k.iter().copied().max().unwrap_or(0));
    let (max_q, max_k) = match rng.gen_range(0..3) {
        0 => (Some(max_q), Some(max_k)),
        1 => (Some(max_q + rng.gen_range(1..300)), Some(max_k + rng.gen_range(1..300))),
        _ => (None, None),
    };
    let varlen = Varlen { cu_seqlens_q: &cqt, cu_seqlens_k: &ckt, max_seqlen_q: max_q, max_seqlen_k: max_k, seqused_q: uq.as_ref(), seqused_k: uk.as_ref() };
    let sched_k = max_k.unwrap_or(tk.div_ceil(l.slot_q.len().max(1)));
    let (ro, rl) = reference_varlen_fwd(&q, &k, &v, &cu_q, &cu_k, &used_q, &used_k, tq, c.hq, c.hk, c.d, &c.ref_opts());
    for (name, choice) in fwd_choices() {
        let family = fwd_family_keys(c.d, c.dtype, choice, sched_k);
        let o = varlen_fwd(&qt, &kt, &vt, &varlen, &c.opts(choice)).map_err(|e| format!("[{name}: {family}] {e}"))?;
        check_close(&o.out.to_f32_vec().unwrap(), &o.lse.to_f32_vec().unwrap(), &ro, &rl, &gpu_tolerance(c.dtype, 1.0, c.smax())).map_err(|e| format!("[{name}: {family}] {e}"))?;
        tally.add(name, family, c.d);
    }
    Ok(())
}

#[test]
fn varlen_random_layouts() {
    require_gpu!();
    let seed: u64 = rand::random();
    let mut rng = rng(seed);
    let mut tally = Tally::new("gpu::varlen_random_layouts");
    for iter in 0..120 {
        let dtype = if rng.gen_bool(0.5) { DType::BF16 } else { DType::F16 };
        let d = HEAD_DIMS[rng.gen_range(0..HEAD_DIMS.len())];
        let (hq, hk) = [(1, 1), (2, 2), (4, 2), (4, 1), (6, 3)][rng.gen_range(0..5)];
        let side = |rng: &mut StdRng| if rng.gen_bool(0.5) { -1 } else { rng.gen_range(0..150) };
        let (causal, window) = (rng.gen_bool(0.4), (side(&mut rng), side(&mut rng)));
        let softcap = if rng.gen_bool(0.2) { 8.0 } else { 0.0 };
        let c = Case { dtype, d, hq, hk, causal, window, softcap };
        let b = rng.gen_range(1..6);
        let maxlen = if rng.gen_bool(0.3) { 400 } else { 90 };
        let l = Layout::random(&mut rng, b, maxlen);
        varlen_case(&mut rng, &c, &l, &mut tally).unwrap_or_else(|e| {
            panic!("seed {seed} iter {iter}: {dtype} d={d} hq={hq} hk={hk} causal={} window={:?} softcap={} slots q {:?} k {:?} used q {:?} k {:?} tails {} {}: {e}", c.causal, c.window, c.softcap, l.slot_q, l.slot_k, l.used_q, l.used_k, l.tail_q, l.tail_k)
        });
    }
    tally.report();
}

/// Packed sequences are independent: varlen on the packed batch equals per-sequence dense calls, bitwise
/// (where both run the same kernel: here every sequence has fewer keys than `FWD_WS_WIDE_MIN_KEYS`; a
/// packed call whose max_seqlen_k reaches it runs the wide-tile kernel at head dim 192, and its short
/// sequences then agree with their own calls to rounding).
#[test]
fn packing_is_bitwise_independent() {
    require_gpu!();
    let mut rng = rng(rand::random());
    let mut tally = Tally::new("gpu::packing_is_bitwise_independent");
    for (dtype, d, causal, window) in [(DType::BF16, 128, true, (-1, -1)), (DType::F16, 64, false, (40, 3)), (DType::BF16, 256, false, (-1, -1)), (DType::BF16, 96, true, (100, -1))] {
        let (hq, hk) = (4, 2);
        let lens: Vec<(usize, usize)> = (0..5).map(|_| (rng.gen_range(1..300), rng.gen_range(1..300))).collect();
        let cu_q = Layout::cu(&lens.iter().map(|l| l.0).collect::<Vec<_>>());
        let cu_k = Layout::cu(&lens.iter().map(|l| l.1).collect::<Vec<_>>());
        let (tq, tk) = (*cu_q.last().unwrap(), *cu_k.last().unwrap());
        let q = random_values(&mut rng, tq * hq * d, 1.0, dtype);
        let k = random_values(&mut rng, tk * hk * d, 1.0, dtype);
        let v = random_values(&mut rng, tk * hk * d, 1.0, dtype);
        let up = |x: &[f32], shape: &[usize]| Tensor::from_f32(x, shape, dtype).unwrap().to_device(GPU).unwrap();
        let (cqt, ckt) = (i32_tensor(&cu_q, GPU), i32_tensor(&cu_k, GPU));
        let max_q = lens.iter().map(|l| l.0).max().unwrap();
        let max_k = lens.iter().map(|l| l.1).max().unwrap();
        let varlen = Varlen { cu_seqlens_q: &cqt, cu_seqlens_k: &ckt, max_seqlen_q: Some(max_q), max_seqlen_k: Some(max_k), seqused_q: None, seqused_k: None };
        let (qp, kp, vp) = (up(&q, &[tq, hq, d]), up(&k, &[tk, hk, d]), up(&v, &[tk, hk, d]));
        let singles: Vec<[Tensor; 3]> = lens
            .iter()
            .enumerate()
            .map(|(b, &(sq, sk))| [up(&q[cu_q[b] * hq * d..][..sq * hq * d], &[1, sq, hq, d]), up(&k[cu_k[b] * hk * d..][..sk * hk * d], &[1, sk, hk, d]), up(&v[cu_k[b] * hk * d..][..sk * hk * d], &[1, sk, hk, d])])
            .collect();
        for (name, choice) in fwd_choices() {
            let family = fwd_family(d, dtype, choice);
            let opts = AttnOptions { causal, window, kernels: choice, ..Default::default() };
            let packed = varlen_fwd(&qp, &kp, &vp, &varlen, &opts).unwrap();
            let (pout, plse) = (packed.out.to_bytes().unwrap(), packed.lse.to_f32_vec().unwrap());
            for (b, &(sq, sk)) in lens.iter().enumerate() {
                let [qs, ks, vs] = &singles[b];
                // Decoding shapes through `fwd` run the KV cache's kernels (`raw::dense_fwd_decodes`): a
                // one-sequence varlen call runs the dense kernels on them.
                let one = if raw::dense_fwd_decodes(qs.shape(), ks.shape(), dtype, &opts, false) {
                    let (c1, c2) = (i32_tensor(&[0, sq], GPU), i32_tensor(&[0, sk], GPU));
                    let vl = Varlen { cu_seqlens_q: &c1, cu_seqlens_k: &c2, max_seqlen_q: Some(sq), max_seqlen_k: Some(sk), seqused_q: None, seqused_k: None };
                    let (qo, ko) = (cu_q[b] * hq * d, cu_k[b] * hk * d);
                    varlen_fwd(&up(&q[qo..][..sq * hq * d], &[sq, hq, d]), &up(&k[ko..][..sk * hk * d], &[sk, hk, d]), &up(&v[ko..][..sk * hk * d], &[sk, hk, d]), &vl, &opts).unwrap()
                } else {
                    fwd(qs, ks, vs, &opts).unwrap()
                };
                let row_bytes = hq * d * 2;
                assert_eq!(&pout[cu_q[b] * row_bytes..][..sq * row_bytes], &one.out.to_bytes().unwrap()[..], "[{name}: {family}] out of sequence {b} differs ({dtype} d={d})");
                let lse1 = one.lse.to_f32_vec().unwrap();
                for h in 0..hq {
                    for i in 0..sq {
                        assert_eq!(plse[h * tq + cu_q[b] + i].to_bits(), lse1[h * sq + i].to_bits(), "[{name}: {family}] lse of sequence {b} head {h} row {i}");
                    }
                }
            }
            tally.add(name, family, d);
        }
    }
    tally.report();
}

/// Bit pattern no computation produces (a NaN with a payload): marks memory outside the outputs.
const CANARY_F32: u32 = 0x7fc0_1234;
const CANARY_16: u16 = 0x7fa5;

/// Device tensor of `shape` whose view sits at an offset inside a canary-filled buffer, with a padded
/// row pitch when `pad` (so the gaps between rows are checked too).
fn canary_view(shape: &[usize], dtype: DType, pad: bool) -> Tensor {
    let rank = shape.len();
    let mut strides = vec![1usize; rank];
    let mut pitch = shape[rank - 1] + if pad { 8 } else { 0 };
    for dim in (0..rank - 1).rev() {
        strides[dim] = pitch;
        pitch *= shape[dim].max(1);
    }
    let offset = 64;
    let n = offset + pitch + 64;
    let bytes: Vec<u8> = match dtype {
        DType::F32 => (0..n).flat_map(|_| CANARY_F32.to_le_bytes()).collect(),
        _ => (0..n).flat_map(|_| CANARY_16.to_le_bytes()).collect(),
    };
    let flat = Tensor::from_bytes(&bytes, &[n], dtype).unwrap().to_device(GPU).unwrap();
    flat.as_strided(shape, &strides, offset).unwrap()
}

/// (elements outside the view that changed, elements inside still holding the canary).
fn canary_damage(t: &Tensor) -> (usize, usize) {
    let n = t.storage_len();
    let flat = t.as_strided(&[n], &[1], 0).unwrap().to_bytes().unwrap();
    let size = t.dtype().size();
    let is_canary = |i: usize| match size {
        4 => u32::from_le_bytes(flat[i * 4..i * 4 + 4].try_into().unwrap()) == CANARY_F32,
        _ => u16::from_le_bytes(flat[i * 2..i * 2 + 2].try_into().unwrap()) == CANARY_16,
    };
    let mut inside = vec![false; n];
    let shape = t.shape().to_vec();
    let total: usize = shape.iter().product();
    for lin in 0..total {
        let (mut rem, mut idx) = (lin, t.offset());
        for d in (0..shape.len()).rev() {
            idx += (rem % shape[d]) * t.strides()[d];
            rem /= shape[d];
        }
        inside[idx] = true;
    }
    let outside_changed = (0..n).filter(|&i| !inside[i] && !is_canary(i)).count();
    let inside_unwritten = (0..n).filter(|&i| inside[i] && is_canary(i)).count();
    (outside_changed, inside_unwritten)
}

#[test]
fn writes_exactly_the_outputs() {
    require_gpu!();
    let mut rng = rng(rand::random());
    let mut tally = Tally::new("gpu::writes_exactly_the_outputs");
    for d in HEAD_DIMS {
        let dtype = DType::BF16;
        let (b, sq, sk, hq, hk) = (2, 150, 70, 3, 1);
        let q = device_tensor(&random_values(&mut rng, b * sq * hq * d, 1.0, dtype), &[b, sq, hq, d], dtype, false, &mut rng);
        let k = device_tensor(&random_values(&mut rng, b * sk * hk * d, 1.0, dtype), &[b, sk, hk, d], dtype, false, &mut rng);
        let v = device_tensor(&random_values(&mut rng, b * sk * hk * d, 1.0, dtype), &[b, sk, hk, d], dtype, false, &mut rng);
        // Varlen with seqused, a zero-length slot and tail rows: padding must be written by the kernel.
        let slots_q = [70usize, 0, 133];
        let slots_k = [50usize, 10, 200];
        let (cu_q, cu_k) = (Layout::cu(&slots_q), Layout::cu(&slots_k));
        let (tq, tk) = (cu_q[3] + 37, cu_k[3] + 5);
        let pq = device_tensor(&random_values(&mut rng, tq * hq * d, 1.0, dtype), &[tq, hq, d], dtype, false, &mut rng);
        let pk = device_tensor(&random_values(&mut rng, tk * hk * d, 1.0, dtype), &[tk, hk, d], dtype, false, &mut rng);
        let pv = device_tensor(&random_values(&mut rng, tk * hk * d, 1.0, dtype), &[tk, hk, d], dtype, false, &mut rng);
        let (cqt, ckt) = (i32_tensor(&cu_q, GPU), i32_tensor(&cu_k, GPU));
        let (uq, uk) = (i32_tensor(&[33, 0, 133], GPU), i32_tensor(&[50, 3, 120], GPU));
        let varlen = Varlen { cu_seqlens_q: &cqt, cu_seqlens_k: &ckt, max_seqlen_q: Some(133), max_seqlen_k: Some(120), seqused_q: Some(&uq), seqused_k: Some(&uk) };
        // Bogus device-resident lengths (not checked on the host): no write outside the outputs, no fault.
        let bogus_q = i32_tensor(&[0, 900_000, 5], GPU);
        let bogus_k = Tensor::from_i32(vec![-7, 3, i32::MAX], &[3]).unwrap().to_device(GPU).unwrap();
        let bogus_used = Tensor::from_i32(vec![-1, 1 << 30], &[2]).unwrap().to_device(GPU).unwrap();
        let bogus = Varlen { cu_seqlens_q: &bogus_q, cu_seqlens_k: &bogus_k, max_seqlen_q: Some(64), max_seqlen_k: Some(64), seqused_q: Some(&bogus_used), seqused_k: Some(&bogus_used) };
        for (name, choice) in fwd_choices() {
            let family = fwd_family(d, dtype, choice);
            let at = format!("[{name}: {family}] d={d}");
            // Dense, padded output rows.
            let mut out = canary_view(&[b, sq, hq, d], dtype, true);
            let mut lse = canary_view(&[b, hq, sq], DType::F32, false);
            fwd_into(&q, &k, &v, &AttnOptions { causal: true, kernels: choice, ..Default::default() }, &mut out, &mut lse).unwrap();
            assert_eq!(canary_damage(&out), (0, 0), "{at}: dense out: (outside written, inside unwritten)");
            assert_eq!(canary_damage(&lse), (0, 0), "{at}: dense lse");

            let opts = AttnOptions { kernels: choice, ..Default::default() };
            let mut out = canary_view(&[tq, hq, d], dtype, true);
            let mut lse = canary_view(&[hq, tq], DType::F32, false);
            varlen_fwd_into(&pq, &pk, &pv, &varlen, &opts, &mut out, &mut lse).unwrap();
            assert_eq!(canary_damage(&out), (0, 0), "{at}: varlen out");
            assert_eq!(canary_damage(&lse), (0, 0), "{at}: varlen lse");
            // Padding rows are exactly 0 / -inf.
            let o = out.to_f32_vec().unwrap();
            let l = lse.to_f32_vec().unwrap();
            for row in (cu_q[0] + 33..cu_q[1]).chain(cu_q[3]..tq) {
                assert!(o[row * hq * d..][..hq * d].iter().all(|&x| x == 0.0), "{at}: padding row {row} not zero");
                assert!((0..hq).all(|h| l[h * tq + row] == f32::NEG_INFINITY), "{at}: padding row {row} lse not -inf");
            }

            let mut out = canary_view(&[tq, hq, d], dtype, true);
            let mut lse = canary_view(&[hq, tq], DType::F32, false);
            varlen_fwd_into(&pq, &pk, &pv, &bogus, &opts, &mut out, &mut lse).unwrap();
            assert_eq!(canary_damage(&out).0, 0, "{at}: bogus lengths wrote outside out");
            assert_eq!(canary_damage(&lse).0, 0, "{at}: bogus lengths wrote outside lse");
            assert!(out.to_f32_vec().unwrap().iter().all(|x| x.is_finite()), "{at}: bogus lengths produced NaN/inf in out");
            tally.add(name, family, d);
        }
    }
    tally.report();
}

#[test]
fn fully_masked_rows_are_zero_not_nan() {
    require_gpu!();
    let mut rng = rng(rand::random());
    let mut tally = Tally::new("gpu::fully_masked_rows_are_zero_not_nan");
    // Sq > Sk with causal: the first Sq - Sk rows see no key.
    let (sq, sk, h, d) = (100, 30, 2, 64);
    for dtype in [DType::BF16, DType::F16] {
        let q = device_tensor(&random_values(&mut rng, sq * h * d, 1.0, dtype), &[1, sq, h, d], dtype, false, &mut rng);
        let k = device_tensor(&random_values(&mut rng, sk * h * d, 1.0, dtype), &[1, sk, h, d], dtype, false, &mut rng);
        for (name, choice) in fwd_choices() {
            let family = fwd_family(d, dtype, choice);
            let o = fwd(&q, &k, &k, &AttnOptions { causal: true, kernels: choice, ..Default::default() }).unwrap();
            let out = o.out.to_f32_vec().unwrap();
            let lse = o.lse.to_f32_vec().unwrap();
            for i in 0..sq - sk {
                assert!(out[i * h * d..][..h * d].iter().all(|&x| x == 0.0), "[{name}: {family}] {dtype}: row {i} sees no key, out not 0");
                assert!((0..h).all(|hh| lse[hh * sq + i] == f32::NEG_INFINITY), "[{name}: {family}] {dtype}: row {i} sees no key, lse not -inf");
            }
            assert!(out.iter().all(|x| !x.is_nan()), "[{name}: {family}] {dtype}: NaN in out");
            tally.add(name, family, d);
        }
    }
    tally.report();
}

/// Decoding steps (at most `DENSE_DECODE_MAX_ROWS` query rows per kv head) through the `Tensor` API's dense
/// forward on CUDA run the KV cache's split-KV decode kernels over k and v in place
/// (`raw::dense_fwd_decodes`): out and lse are `fwd_kvcache`'s bits with k and v as full caches, within the
/// tolerance of the f64 reference, k and v unchanged, through `fwd` and `fwd_into` alike; a forced kernel
/// family keeps the dense kernels (within the tolerance too). GQA, causal, windows, softcap, strided
/// inputs, key counts from 1 to several splits' worth.
#[test]
fn decoding_steps_run_the_kv_cache_kernels() {
    require_gpu!();
    let (seed, mut rng) = seeded("decoding_steps_run_the_kv_cache_kernels");
    let (max_rows, dims) = raw::dense_decode_limits();
    if max_rows == 0 {
        eprintln!("decoding_steps_run_the_kv_cache_kernels: FLASH_ATTN_NO_DENSE_DECODE is set: the routing is off, the dense kernels checked only");
    }
    let mut tally = Tally::new("gpu::decoding_steps_run_the_kv_cache_kernels");
    let masks: [(bool, (i64, i64), f32); 4] = [(false, (-1, -1), 0.0), (true, (-1, -1), 0.0), (false, (90, 0), 0.0), (true, (-1, -1), 20.0)];
    let mut routed = 0;
    for dtype in [DType::BF16, DType::F16] {
        for &d in &dims {
            for (i, &(causal, window, softcap)) in masks.iter().enumerate() {
                let (hk, group) = [(1, 8), (2, 4), (4, 1), (8, 4)][rng.gen_range(0..4)];
                let hq = hk * group;
                let sq = rng.gen_range(1..=(64 / group).min(4));
                let b = rng.gen_range(1..=3);
                let sk = [1, rng.gen_range(2..300), rng.gen_range(300..5000)][i % 3];
                let c = Case { dtype, d, hq, hk, causal, window, softcap };
                let ctx = format!("seed {seed}: {dtype} d={d} b={b} sq={sq} sk={sk} hq={hq} hk={hk} causal={causal} window={window:?} softcap={softcap}");
                let q = random_values(&mut rng, b * sq * hq * d, 1.0, dtype);
                let k = random_values(&mut rng, b * sk * hk * d, 1.0, dtype);
                let v = random_values(&mut rng, b * sk * hk * d, 1.0, dtype);
                let strided = rng.gen_bool(0.5);
                let qt = device_tensor(&q, &[b, sq, hq, d], dtype, strided, &mut rng);
                let kt = device_tensor(&k, &[b, sk, hk, d], dtype, strided, &mut rng);
                let vt = device_tensor(&v, &[b, sk, hk, d], dtype, strided, &mut rng);
                let (ro, rl) = reference_fwd(&q, &k, &v, b, sq, sk, hq, hk, d, &c.ref_opts());
                let tol = gpu_tolerance(dtype, 1.0, c.smax());
                let opts = c.opts(KernelChoice::default());
                let routes = raw::dense_fwd_decodes(&[b, sq, hq, d], &[b, sk, hk, d], dtype, &opts, false);
                assert_eq!(routes, max_rows > 0, "{ctx}: a decoding step the routing should take");
                let o = fwd(&qt, &kt, &vt, &opts).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                let (out, lse) = (o.out.to_f32_vec().unwrap(), o.lse.to_f32_vec().unwrap());
                check_close(&out, &lse, &ro, &rl, &tol).unwrap_or_else(|e| panic!("{ctx}: fwd: {e}"));
                let mut out_into = Tensor::zeros(&[b, sq, hq, d], dtype, GPU).unwrap();
                let mut lse_into = Tensor::zeros(&[b, hq, sq], DType::F32, GPU).unwrap();
                fwd_into(&qt, &kt, &vt, &opts, &mut out_into, &mut lse_into).unwrap_or_else(|e| panic!("{ctx}: fwd_into: {e}"));
                let same = |a: &[f32], b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same(&out, &out_into.to_f32_vec().unwrap()) && same(&lse, &lse_into.to_f32_vec().unwrap()), "{ctx}: fwd_into differs from fwd");
                if routes {
                    let (mut kc, mut vc) = (kt.clone(), vt.clone());
                    let lens = i32_tensor(&vec![sk; b], GPU);
                    let kv = fwd_kvcache(&qt, &mut kc, &mut vc, &KvCache::new(&lens), &opts, &KvCacheOptions::default()).unwrap_or_else(|e| panic!("{ctx}: fwd_kvcache: {e}"));
                    assert!(same(&out, &kv.out.to_f32_vec().unwrap()) && same(&lse, &kv.lse.to_f32_vec().unwrap()), "{ctx}: not the KV cache's bits");
                    routed += 1;
                    tally.add("default", "decode (KV cache)", d);
                }
                assert!(same(&kt.to_f32_vec().unwrap(), &k) && same(&vt.to_f32_vec().unwrap(), &v), "{ctx}: k or v changed");
                for (name, choice) in fwd_choices().into_iter().filter(|(_, ch)| *ch != KernelChoice::default()) {
                    let o = fwd(&qt, &kt, &vt, &c.opts(choice)).unwrap_or_else(|e| panic!("{ctx} [{name}]: {e}"));
                    check_close(&o.out.to_f32_vec().unwrap(), &o.lse.to_f32_vec().unwrap(), &ro, &rl, &tol).unwrap_or_else(|e| panic!("{ctx} [{name}]: {e}"));
                    tally.add(name, fwd_family_keys(d, dtype, choice, sk), d);
                }
            }
        }
    }
    eprintln!("decoding_steps_run_the_kv_cache_kernels: {routed} calls routed to the KV cache's kernels");
    tally.report();
}

/// The `Tensor` API's memory pool: a dropped tensor's memory stays with the process (the next allocation
/// reuses it without mapping it again) until `cuda::release_cached_memory` gives it back, and tensors made
/// after a release hold what was written to them. 8 GiB dwarfs what the suite's other tests, running in
/// parallel, hold at once (2 GiB of slack for them).
#[test]
fn tensor_memory_is_cached_until_released() {
    require_gpu!();
    const BIG: usize = 8 << 30;
    const SLACK: usize = 2 << 30;
    let free = || {
        flash_attn::cuda::device_name(0).unwrap(); // makes the device's primary context current
        cudarc::driver::result::mem_get_info().unwrap().0
    };
    let pools = cudarc::driver::CudaContext::new(0).unwrap().has_async_alloc();
    let f0 = free();
    let big = Tensor::zeros(&[BIG / 2], DType::BF16, GPU).unwrap();
    let f1 = free();
    assert!(f0 >= f1 + BIG - SLACK, "an 8 GiB tensor took {} MiB of device memory", (f0 - f1.min(f0)) >> 20);
    drop(big);
    let f2 = free();
    if pools {
        assert!(f0 >= f2 + BIG - SLACK, "a dropped 8 GiB tensor's memory was unmapped at once ({} MiB still held)", (f0 - f2.min(f0)) >> 20);
    }
    flash_attn::cuda::release_cached_memory(0).unwrap();
    let f3 = free();
    assert!(f3 + SLACK >= f2 + BIG, "release_cached_memory gave back {} MiB of 8 GiB", (f3 - f3.min(f2)) >> 20);
    let mut rng = rng(rand::random());
    let vals: Vec<f32> = (0..(1 << 20) + 3).map(|_| rng.gen_range(-4.0f32..4.0)).collect();
    for _ in 0..3 {
        let t = Tensor::from_f32(&vals, &[vals.len()], DType::F32).unwrap().to_device(GPU).unwrap();
        let z = Tensor::zeros(&[vals.len()], DType::F32, GPU).unwrap();
        assert_eq!(t.to_f32_vec().unwrap(), vals, "a tensor made after release_cached_memory");
        assert!(z.to_f32_vec().unwrap().iter().all(|&x| x == 0.0), "Tensor::zeros after release_cached_memory");
        flash_attn::cuda::release_cached_memory(0).unwrap();
    }
}

#[test]
fn gpu_matches_cpu_path() {
    require_gpu!();
    let mut rng = rng(rand::random());
    let mut tally = Tally::new("gpu::gpu_matches_cpu_path");
    for d in HEAD_DIMS {
        let (b, sq, sk, hq, hk) = (2, 333, 257, 4, 2);
        let dtype = DType::BF16;
        let q = random_values(&mut rng, b * sq * hq * d, 2.0, dtype);
        let k = random_values(&mut rng, b * sk * hk * d, 2.0, dtype);
        let v = random_values(&mut rng, b * sk * hk * d, 2.0, dtype);
        let opts = AttnOptions { causal: true, window: (200, -1), softcap: 0.0, softmax_scale: Some(0.3), ..Default::default() };
        let t = |x: &[f32], s: &[usize]| Tensor::from_f32(x, s, dtype).unwrap();
        let (qc, kc, vc) = (t(&q, &[b, sq, hq, d]), t(&k, &[b, sk, hk, d]), t(&v, &[b, sk, hk, d]));
        let cpu = fwd(&qc, &kc, &vc, &opts).unwrap();
        let (a, la) = (cpu.out.to_f32_vec().unwrap(), cpu.lse.to_f32_vec().unwrap());
        let (qg, kg, vg) = (qc.to_device(GPU).unwrap(), kc.to_device(GPU).unwrap(), vc.to_device(GPU).unwrap());
        for (name, choice) in fwd_choices() {
            let family = fwd_family(d, dtype, choice);
            let gpu = fwd(&qg, &kg, &vg, &AttnOptions { kernels: choice, ..opts }).unwrap();
            let b2 = gpu.out.to_f32_vec().unwrap();
            let max_diff = a.iter().zip(&b2).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(max_diff <= 4.0 * 2f32.powi(-8) * 2.0, "[{name}: {family}] d={d}: cpu vs gpu max |diff| {max_diff}");
            for (x, y) in la.iter().zip(&gpu.lse.to_f32_vec().unwrap()) {
                assert!((x == y) || (x - y).abs() <= 1e-3, "[{name}: {family}] d={d}: lse {x} vs {y}");
            }
            tally.add(name, family, d);
        }
    }
    tally.report();
}

#[test]
fn unaligned_rows_are_an_error() {
    require_gpu!();
    let (s, h, d) = (16, 2, 64);
    let flat = Tensor::from_f32(&vec![0.5; s * h * d + 4], &[s * h * d + 4], DType::BF16).unwrap().to_device(GPU).unwrap();
    let q = flat.as_strided(&[1, s, h, d], &[s * h * d, h * d, d, 1], 4).unwrap();
    let k = flat.as_strided(&[1, s, h, d], &[s * h * d, h * d, d, 1], 0).unwrap();
    match fwd(&q, &k, &k, &AttnOptions::default()) {
        Err(flash_attn::Error::Value { arg: "q", .. }) => {}
        other => panic!("expected an alignment error naming q, got {other:?}"),
    }
}

/// Softmax scales the fast path could get wrong: negative (max of -s), zero (uniform), tiny, large.
#[test]
fn unusual_softmax_scales() {
    require_gpu!();
    let mut rng = rng(rand::random());
    let mut tally = Tally::new("gpu::unusual_softmax_scales");
    for scale in [-0.2f32, 0.0, 1e-30, 3.0] {
        for causal in [false, true] {
            let (b, sq, sk, h, d) = (1, 90, 150, 2, 64);
            let dtype = DType::BF16;
            let q = random_values(&mut rng, b * sq * h * d, 1.0, dtype);
            let k = random_values(&mut rng, b * sk * h * d, 1.0, dtype);
            let v = random_values(&mut rng, b * sk * h * d, 1.0, dtype);
            let t = |x: &[f32], s: &[usize]| Tensor::from_f32(x, s, dtype).unwrap().to_device(GPU).unwrap();
            let (qt, kt, vt) = (t(&q, &[b, sq, h, d]), t(&k, &[b, sk, h, d]), t(&v, &[b, sk, h, d]));
            let r = RefOpts { scale: scale as f64, softcap: 0.0, causal, window: (-1, -1) };
            let (ro, rl) = reference_fwd(&q, &k, &v, b, sq, sk, h, h, d, &r);
            let smax = (scale.abs() as f64) * d as f64;
            for (name, choice) in fwd_choices() {
                let family = fwd_family(d, dtype, choice);
                let opts = AttnOptions { softmax_scale: Some(scale), causal, kernels: choice, ..Default::default() };
                let o = fwd(&qt, &kt, &vt, &opts).unwrap();
                check_close(&o.out.to_f32_vec().unwrap(), &o.lse.to_f32_vec().unwrap(), &ro, &rl, &gpu_tolerance(dtype, 1.0, smax))
                    .unwrap_or_else(|e| panic!("[{name}: {family}] scale {scale} causal {causal}: {e}"));
                tally.add(name, family, d);
            }
        }
    }
    tally.report();
}
