//! The GPU suite for the backward pass (`bwd`, `varlen_bwd` on CUDA): gradients against the f64 reference
//! (common/) on every head dim, dtype and mask, with softcap, GQA/MQA, Sq != Sk and odd lengths; varlen
//! over random packed layouts with NaN in every padding row; packing independence; bitwise determinism;
//! the CUDA path against the CPU path; fully masked rows; alignment errors. Every test prints its seed
//! (FA_TEST_SEED=<seed> reproduces a run). Without a CUDA GPU every test prints a notice and passes
//! vacuously; FA_GPU_BWD_ON_CPU=1 runs the suite on the CPU path instead, a dry run of this file's own
//! logic (layouts, reference bookkeeping, tolerances) that says nothing about the kernels.
//!
//! Kernel families. On a Hopper GPU the kernel tests run each backward on the same inputs, out, LSE and
//! reference under several `KernelChoice`s: the default (the wgmma dK/dV kernel at head dims 64 to 256,
//! in deterministic mode with key blocks split over copies of the dq accumulator; mma.sync at 32),
//! `no_wgmma` (the mma.sync kernels at every head dim, which no other test reaches there) and, where a
//! wgmma backward has several key blocks, `bwd_chain_all` (one CTA walks them all and converts dq itself).
//! The forward stays the default's (gpu.rs covers the forward's families). Each passing test prints
//! `KERNELS <test> passed on <GPU>:` and a line per (choice -> family) with its runs and head dims
//! (tests/common/kernels.rs). `deterministic_runs_are_bitwise_identical` runs under each choice.
//!
//! Tolerances. The kernel recomputes the scores in f32 (tensor-core products of dtype inputs, exact,
//! summed in f32) and P = exp(S - LSE) from the forward's LSE; rounds P to the input dtype for
//! dV = P^T dO; forms dS = P (dP - D) tanh' in f32, with dP = dO V^T and D = rowsum(dO * out); rounds dS
//! to the dtype for dQ = scale dS K and dK = scale dS^T Q; accumulates in f32; and rounds each gradient
//! to the dtype once. With u the dtype's unit roundoff (2^-8 bf16, 2^-11 f16), every element obeys
//!   |g - ref| <= u |ref| + tiny + (1 + 2u) (k u rmag + c mag + derr + slack)
//! (u |ref|: the final rounding; 1 + 2u: the magnitudes are of exact values, the kernel's are perturbed).
//! Each term is a sum over the (query i, key j) pairs entering the element:
//! - k u rmag, the in-kernel roundings, each relative to the term it rounds. dv: each P_ij is rounded
//!   once (k = 1), rmag = sum_i P |dO_i| (common/'s dv_mag). dq, dk: each dS_ij is rounded, and the P it
//!   is formed from may be too (k = 2); rmag = |scale| sum P |dP - D| tanh' |k_j| or |q_i|
//!   (`kernel_terms`).
//! - c mag, the f32 arithmetic, against common/'s `mag` (dq, dk: |scale| sum P (|dO|.|v_j| + |dO|.|out|)
//!   tanh' |k_j| or |q_i|, every product's magnitude, inside the dot products too; dv: as rmag).
//!   c = 2^-15 (1 + smax) + 2^-23 (D + n). The first term is P's relative error from the recomputed score
//!   and the forward's LSE: worst case for f32 dot products of D <= 256 terms of total magnitude <= smax
//!   (smax bounds |score|: |scale| D qmax kmax, or the softcap) at 2 ulp per addition, plus ex2's 2 ulp.
//!   The second covers sums of D terms (dP, D) and of n, the longest sequence (dq, dk, dv, the LSE).
//! - derr is not the kernel's error: D is formed from the `out` handed in, rounded to the dtype and off by
//!   the forward's own error, and common/'s reference bounds exactly how far that moves dq and dk.
//! - slack, tanh.approx's share with softcap (relative error 2^-11, taken as e_t = 2^-10): per pair, P's
//!   relative error grows by e_t (|s_j| + max_l |s_l|) (the score, and the LSE made of the same
//!   approximate scores) and tanh' = 1 - t^2 is off by up to 2 e_t t^2; carried through dS and dV.
//! - tiny = h (1 + n |scale|' amax): f16 P and dS below the smallest normal round with an absolute error
//!   h = u min_normal; at most n such terms, times the largest |k|, |q| or |dO| (|scale|' = max(|scale|,
//!   1): the scale may be applied before or after the rounding).
//!
//! Elements no term enters (padding rows, keys past seqused or seen by no query, rows that see no key)
//! must be exactly 0, and every element finite. Two results of the kernel for the same inputs (packed vs
//! per sequence) may differ by both budgets without derr (common to both: the same `out`); the kernel and
//! the CPU path by the kernel's budget plus cpu_backward.rs's.
//!
//! Sensitivity: a wrong mask, a missing scale or tanh', or a GQA sum over the wrong heads moves gradients
//! by O(1) relative, while the bound allows O(u) of sums of magnitudes. `tolerance_admits_the_modelled_kernel`
//! runs an f32 emulation of the model above (tanh off by 2^-11) against the bound, and
//! `tolerance_rejects_kernel_mistakes` checks that six such mistakes fail it.

#[path = "common/mod.rs"]
mod common;
#[path = "common/kernels.rs"]
mod kernels;

use common::*;
use flash_attn::{bwd, fwd, varlen_bwd, varlen_fwd, AttnOptions, BwdOutput, DType, Device, Error, FwdOutput, KernelChoice, Tensor, Varlen};
use kernels::Tally;
use rand::rngs::StdRng;
use rand::Rng;

/// The device under test: CUDA 0, or the CPU path with FA_GPU_BWD_ON_CPU=1 (see the header).
fn dev() -> Device {
    if dry_run() { Device::Cpu } else { Device::Cuda(0) }
}

fn dry_run() -> bool {
    std::env::var_os("FA_GPU_BWD_ON_CPU").is_some_and(|v| v == "1")
}

macro_rules! require_gpu {
    () => {
        if !kernels::gpu_or_skip("gpu_bwd", dry_run(), line!()) {
            return;
        }
    };
}


/// tanh.approx.f32's relative error (2^-11 documented), with a factor 2 to spare.
const TANH_EPS: f64 = 1.0 / 1024.0;
const NAMES: [&str; 3] = ["dq", "dk", "dv"];
/// In-kernel roundings to the dtype, in units of u: dS and the P it is made from (dq, dk); P (dv).
const ROUNDINGS: [f64; 3] = [2.0, 2.0, 1.0];

fn min_normal(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 2f64.powi(-14),
        DType::BF16 => 2f64.powi(-126),
        _ => f64::from(f32::MIN_POSITIVE),
    }
}

fn dtype_of(rng: &mut StdRng) -> DType {
    if rng.gen_bool(0.5) { DType::BF16 } else { DType::F16 }
}

fn amp_of(rng: &mut StdRng) -> Amp {
    let a = [0.5f32, 1.0, 2.0];
    Amp { q: a[rng.gen_range(0..3)], k: a[rng.gen_range(0..3)], v: [1.0f32, 3.0][rng.gen_range(0..2)] }
}

fn plain(causal: bool, window: (i64, i64), softcap: f32) -> Opts {
    Opts { causal, window, softcap, scale: None, kernels: Default::default() }
}

// ---------------------------------------------------------------------------------------------------
// Problems: host values, device tensors, the reference and its bound.

#[derive(Clone, Copy, Debug)]
struct Case {
    dtype: DType,
    d: usize,
    hq: usize,
    hk: usize,
    opts: Opts,
    amp: Amp,
}

/// A problem on the host: logical values (already rounded to the dtype) and where each sequence lives. A
/// dense batch is the packed layout with cu = [0, s, 2s, ..], which is how the reference sees it.
#[derive(Clone, Debug)]
struct Host {
    c: Case,
    /// `(b, sq, sk)` of a dense batch; None for varlen.
    dense: Option<(usize, usize, usize)>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
    /// Sequence b is rows cu_q[b].. (used_q[b] of them) of q, and cu_k[b].. (used_k[b]) of k and v.
    cu_q: Vec<usize>,
    cu_k: Vec<usize>,
    used_q: Vec<usize>,
    used_k: Vec<usize>,
    /// Varlen: whether seqused_q/k are passed (else the slots are the lengths), and slack in max_seqlen.
    pass_used: (bool, bool),
    extra_max: Option<(usize, usize)>,
}

fn prefix(lens: &[usize]) -> Vec<usize> {
    std::iter::once(0).chain(lens.iter().scan(0, |acc, &l| {
        *acc += l;
        Some(*acc)
    })).collect()
}

/// A packed layout: slot lengths, optional seqused, tail rows after the last slot, slack in max_seqlen.
#[derive(Clone, Debug)]
struct Packing {
    slots_q: Vec<usize>,
    slots_k: Vec<usize>,
    used_q: Option<Vec<usize>>,
    used_k: Option<Vec<usize>>,
    tail: (usize, usize),
    extra_max: Option<(usize, usize)>,
}

impl Packing {
    fn plain(lens: &[(usize, usize)]) -> Packing {
        Packing { slots_q: lens.iter().map(|l| l.0).collect(), slots_k: lens.iter().map(|l| l.1).collect(), used_q: None, used_k: None, tail: (0, 0), extra_max: Some((0, 0)) }
    }
    /// `b` sequences up to `maxlen` long, some empty, sometimes with seqused (padding), tail rows, slack.
    fn random(rng: &mut StdRng, b: usize, maxlen: usize) -> Packing {
        let len = |rng: &mut StdRng| if rng.gen_bool(0.15) { 0 } else { rng.gen_range(1..=maxlen) };
        let slots_q: Vec<usize> = (0..b).map(|_| len(rng)).collect();
        let slots_k: Vec<usize> = (0..b).map(|_| len(rng)).collect();
        let used = |rng: &mut StdRng, slots: &[usize]| slots.iter().map(|&s| if rng.gen_bool(0.3) { s } else { rng.gen_range(0..=s) }).collect::<Vec<_>>();
        let used_q = rng.gen_bool(0.5).then(|| used(rng, &slots_q));
        let used_k = rng.gen_bool(0.5).then(|| used(rng, &slots_k));
        let tail = (if rng.gen_bool(0.5) { rng.gen_range(1..20) } else { 0 }, if rng.gen_bool(0.5) { rng.gen_range(1..20) } else { 0 });
        // The max lengths passed: exact, a loose bound, or none (scheduled by the mean lengths).
        let extra_max = match rng.gen_range(0..10) {
            0..3 => Some((rng.gen_range(0..4), rng.gen_range(0..4))),
            3..5 => None,
            _ => Some((0, 0)),
        };
        Packing { slots_q, slots_k, used_q, used_k, tail, extra_max }
    }
}

impl Host {
    fn values(rng: &mut StdRng, c: &Case, tq: usize, tk: usize) -> [Vec<f32>; 4] {
        [
            random_values(rng, tq * c.hq * c.d, c.amp.q, c.dtype),
            random_values(rng, tk * c.hk * c.d, c.amp.k, c.dtype),
            random_values(rng, tk * c.hk * c.d, c.amp.v, c.dtype),
            random_values(rng, tq * c.hq * c.d, 1.0, c.dtype),
        ]
    }

    fn dense(rng: &mut StdRng, c: &Case, b: usize, sq: usize, sk: usize) -> Host {
        let [q, k, v, dout] = Host::values(rng, c, b * sq, b * sk);
        let (cu_q, cu_k) = (prefix(&vec![sq; b]), prefix(&vec![sk; b]));
        Host { c: *c, dense: Some((b, sq, sk)), q, k, v, dout, cu_q, cu_k, used_q: vec![sq; b], used_k: vec![sk; b], pass_used: (false, false), extra_max: Some((0, 0)) }
    }

    fn packed(rng: &mut StdRng, c: &Case, p: &Packing) -> Host {
        let (cu_q, cu_k) = (prefix(&p.slots_q), prefix(&p.slots_k));
        let tq = cu_q.last().unwrap() + p.tail.0;
        let tk = cu_k.last().unwrap() + p.tail.1;
        let [q, k, v, dout] = Host::values(rng, c, tq, tk);
        let used_q = p.used_q.clone().unwrap_or_else(|| p.slots_q.clone());
        let used_k = p.used_k.clone().unwrap_or_else(|| p.slots_k.clone());
        Host { c: *c, dense: None, q, k, v, dout, cu_q, cu_k, used_q, used_k, pass_used: (p.used_q.is_some(), p.used_k.is_some()), extra_max: p.extra_max }
    }

    fn tq(&self) -> usize {
        self.q.len() / (self.c.hq * self.c.d)
    }
    fn q_shape(&self) -> Vec<usize> {
        match self.dense {
            Some((b, sq, _)) => vec![b, sq, self.c.hq, self.c.d],
            None => vec![self.tq(), self.c.hq, self.c.d],
        }
    }
    fn k_shape(&self) -> Vec<usize> {
        match self.dense {
            Some((b, _, sk)) => vec![b, sk, self.c.hk, self.c.d],
            None => vec![self.k.len() / (self.c.hk * self.c.d), self.c.hk, self.c.d],
        }
    }
    fn real_q(&self) -> Vec<(usize, usize)> {
        self.cu_q.iter().zip(&self.used_q).map(|(&s, &n)| (s, n)).collect()
    }
    fn real_k(&self) -> Vec<(usize, usize)> {
        self.cu_k.iter().zip(&self.used_k).map(|(&s, &n)| (s, n)).collect()
    }
    fn longest(&self) -> (usize, usize) {
        (self.used_q.iter().copied().max().unwrap_or(0), self.used_k.iter().copied().max().unwrap_or(0))
    }
    /// The seqlen_k the dispatch sees: sk, varlen's max_seqlen_k, or without one the mean key rows.
    fn max_k(&self) -> usize {
        match (self.dense, self.extra_max) {
            (Some((_, _, sk)), _) => sk,
            (None, Some(extra)) => self.longest().1 + extra.1,
            (None, None) => (self.k.len() / (self.c.hk * self.c.d)).div_ceil(self.used_k.len().max(1)),
        }
    }

    /// NaN in every row of `x` (rows of `row_elems` values) that belongs to no sequence.
    fn poison(x: &mut [f32], row_elems: usize, real: &[(usize, usize)]) {
        for row in 0..x.len() / row_elems {
            if !real.iter().any(|&(s, n)| row >= s && row < s + n) {
                x[row * row_elems..][..row_elems].fill(f32::NAN);
            }
        }
    }
    fn poison_q_rows(&self, x: &mut [f32]) {
        Host::poison(x, self.c.hq * self.c.d, &self.real_q());
    }
    /// The same problem with NaN in every padding row of q, k, v and dout.
    fn poisoned(&self) -> Host {
        let mut h = self.clone();
        let (qr, kr) = (self.c.hq * self.c.d, self.c.hk * self.c.d);
        let (real_q, real_k) = (self.real_q(), self.real_k());
        Host::poison(&mut h.q, qr, &real_q);
        Host::poison(&mut h.dout, qr, &real_q);
        Host::poison(&mut h.k, kr, &real_k);
        Host::poison(&mut h.v, kr, &real_k);
        h
    }

    /// Device tensors (`strided`: q, k, v, dout laid out at random inside NaN-filled storage).
    fn upload(&self, rng: &mut StdRng, strided: [bool; 4]) -> Dev {
        let dt = self.c.dtype;
        let (qs, ks) = (self.q_shape(), self.k_shape());
        let lengths = self.dense.is_none().then(|| {
            let (lq, lk) = self.longest();
            Lengths {
                cu_q: i32_tensor(&self.cu_q),
                cu_k: i32_tensor(&self.cu_k),
                used_q: self.pass_used.0.then(|| i32_tensor(&self.used_q)),
                used_k: self.pass_used.1.then(|| i32_tensor(&self.used_k)),
                max_q: self.extra_max.map(|e| lq + e.0),
                max_k: self.extra_max.map(|e| lk + e.1),
            }
        });
        Dev {
            q: device_tensor(&self.q, &qs, dt, strided[0], rng),
            k: device_tensor(&self.k, &ks, dt, strided[1], rng),
            v: device_tensor(&self.v, &ks, dt, strided[2], rng),
            dout: device_tensor(&self.dout, &qs, dt, strided[3], rng),
            lengths,
            opts: self.c.opts.attn(),
        }
    }

    /// The forward's out (logical values, as handed to the backward) and LSE from the f64 reference.
    fn reference_fwd(&self) -> (Vec<f32>, Tensor) {
        let c = &self.c;
        let tq = self.tq();
        let (ro, rl) = reference_varlen_fwd(&self.q, &self.k, &self.v, &self.cu_q, &self.cu_k, &self.used_q, &self.used_k, tq, c.hq, c.hk, c.d, &c.opts.reference(c.d));
        let out: Vec<f32> = ro.iter().map(|&x| round(x as f32, c.dtype)).collect();
        let lse = match self.dense {
            // The reference's packed [Hq, Tq] as the dense [B, Hq, Sq].
            Some((b, sq, _)) => {
                let lse: Vec<f32> = (0..b * c.hq * sq).map(|e| rl[(e / sq % c.hq) * tq + (e / (c.hq * sq)) * sq + e % sq] as f32).collect();
                Tensor::from_f32(&lse, &[b, c.hq, sq], DType::F32).unwrap()
            }
            None => Tensor::from_f32(&rl.iter().map(|&x| x as f32).collect::<Vec<_>>(), &[c.hq, tq], DType::F32).unwrap(),
        };
        (out, lse.to_device(dev()).unwrap())
    }

    /// The reference gradients and their bound, for the backward handed `given_out`.
    fn expected(&self, given_out: &[f32]) -> Expected {
        let c = &self.c;
        let o = c.opts.reference(c.d);
        let r = reference_varlen_bwd(&self.q, &self.k, &self.v, &self.dout, given_out, &self.cu_q, &self.cu_k, &self.used_q, &self.used_k, c.hq, c.hk, c.d, &o);
        let KernelTerms { rmag, slack } = kernel_terms(self, &o, given_out);
        let mut smax = o.scale.abs() * c.d as f64 * f64::from(c.amp.q) * f64::from(c.amp.k);
        if o.softcap > 0.0 {
            smax = smax.min(o.softcap);
        }
        let (nq, nk) = self.longest();
        let u = unit_roundoff(c.dtype);
        let h = u * min_normal(c.dtype);
        let s = o.scale.abs().max(1.0);
        Expected {
            r,
            rmag,
            slack,
            u,
            c: 2f64.powi(-15) * (1.0 + smax) + 2f64.powi(-23) * (c.d + nq.max(nk)) as f64,
            c_cpu: 2f64.powi(-19) * (1.0 + smax) + 2f64.powi(-16),
            tiny: [h * (1.0 + (nk as f64) * s * f64::from(c.amp.k)), h * (1.0 + (nq as f64) * s * f64::from(c.amp.q)), h * (1.0 + nq as f64)],
            h,
            row_elems: [c.hq * c.d, c.hk * c.d, c.hk * c.d],
            real_q: self.real_q(),
            real_k: self.real_k(),
        }
    }
}

fn i32_tensor(v: &[usize]) -> Tensor {
    i32_tensor_on(v, dev())
}

/// A tensor of `logical` values on the device under test (common::make_tensor_on).
fn device_tensor(logical: &[f32], shape: &[usize], dtype: DType, strided: bool, rng: &mut StdRng) -> Tensor {
    make_tensor_on(logical, shape, dtype, strided, rng, dev())
}

struct Lengths {
    cu_q: Tensor,
    cu_k: Tensor,
    used_q: Option<Tensor>,
    used_k: Option<Tensor>,
    max_q: Option<usize>,
    max_k: Option<usize>,
}

impl Lengths {
    fn get(&self) -> Varlen<'_> {
        Varlen { cu_seqlens_q: &self.cu_q, cu_seqlens_k: &self.cu_k, max_seqlen_q: self.max_q, max_seqlen_k: self.max_k, seqused_q: self.used_q.as_ref(), seqused_k: self.used_k.as_ref() }
    }
}

/// A problem's tensors on the device under test.
struct Dev {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    lengths: Option<Lengths>,
    opts: AttnOptions,
}

impl Dev {
    fn fwd(&self) -> Result<FwdOutput, String> {
        match &self.lengths {
            None => fwd(&self.q, &self.k, &self.v, &self.opts),
            Some(l) => varlen_fwd(&self.q, &self.k, &self.v, &l.get(), &self.opts),
        }
        .map_err(|e| format!("forward: {e}"))
    }
    fn bwd(&self, out: &Tensor, lse: &Tensor, deterministic: bool) -> Result<BwdOutput, String> {
        self.bwd_with(out, lse, deterministic, self.opts.kernels)
    }
    /// The backward under kernel choice `kernels`.
    fn bwd_with(&self, out: &Tensor, lse: &Tensor, deterministic: bool, kernels: KernelChoice) -> Result<BwdOutput, String> {
        let opts = AttnOptions { kernels, ..self.opts };
        match &self.lengths {
            None => bwd(&self.dout, &self.q, &self.k, &self.v, out, lse, &opts, deterministic),
            Some(l) => varlen_bwd(&self.dout, &self.q, &self.k, &self.v, out, lse, &l.get(), &opts, deterministic),
        }
        .map_err(|e| format!("backward (deterministic {deterministic}): {e}"))
    }
}

/// Which kernel choices a case's backward runs under.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kernels {
    /// The default, and on Hopper `no_wgmma` and (where it differs) `bwd_chain_all` (see the header).
    Every,
    /// Only the case's own `opts.kernels`.
    AsGiven,
}

/// (name, choice) pairs for `h`'s backward; one on the CPU path.
fn choices(h: &Host, deterministic: bool, k: Kernels) -> Vec<(&'static str, KernelChoice)> {
    if dry_run() || k == Kernels::AsGiven {
        let own = h.c.opts.kernels;
        let name = match (own.no_wgmma, own.bwd_chain_all) {
            (false, false) => "default",
            (true, false) => "no_wgmma",
            (false, true) => "bwd_chain_all",
            (true, true) => "no_wgmma+chain",
        };
        return vec![(name, own)];
    }
    kernels::bwd_choices(h.c.d, h.c.dtype, deterministic, h.max_k())
}

/// The family `choice` runs `h`'s backward on (tests/common/kernels.rs).
fn family(h: &Host, deterministic: bool, choice: KernelChoice) -> &'static str {
    if dry_run() { "cpu path" } else { kernels::bwd_family(h.c.d, h.c.dtype, deterministic, choice, h.max_k()) }
}

/// The backward of `dv` under each of `choices(h, ..)`, checked against `exp`; the worst |diff| / tolerance
/// over them.
#[allow(clippy::too_many_arguments)]
fn check_choices(h: &Host, dv: &Dev, out: &Tensor, lse: &Tensor, exp: &Expected, deterministic: bool, k: Kernels, tally: &mut Tally) -> Result<[f64; 3], String> {
    let mut worst = [0.0f64; 3];
    for (name, choice) in choices(h, deterministic, k) {
        let fam = family(h, deterministic, choice);
        let at = |e: String| format!("[{name}: {fam}] {e}");
        let g = dv.bwd_with(out, lse, deterministic, choice).map_err(at)?;
        check_layout(&g, h).map_err(at)?;
        let w = exp.check(&grads(&g)).map_err(at)?;
        (0..3).for_each(|i| worst[i] = worst[i].max(w[i]));
        tally.add(name, fam, h.c.d);
    }
    Ok(worst)
}

/// dq, dk, dv as f32 values in logical order.
fn grads(g: &BwdOutput) -> [Vec<f32>; 3] {
    [g.dq.to_f32_vec().unwrap(), g.dk.to_f32_vec().unwrap(), g.dv.to_f32_vec().unwrap()]
}

/// dq, dk, dv bit patterns.
fn bits(g: &BwdOutput) -> [Vec<u8>; 3] {
    [g.dq.to_bytes().unwrap(), g.dk.to_bytes().unwrap(), g.dv.to_bytes().unwrap()]
}

/// The gradients are contiguous, in the input dtype, on the device, with q's, k's and v's shapes.
fn check_layout(g: &BwdOutput, h: &Host) -> Result<(), String> {
    let (qs, ks) = (h.q_shape(), h.k_shape());
    for (name, t, want) in [("dq", &g.dq, &qs), ("dk", &g.dk, &ks), ("dv", &g.dv, &ks)] {
        if t.shape() != &want[..] || t.dtype() != h.c.dtype || !t.is_contiguous() || t.device() != dev() {
            return Err(format!("{name}: {:?} {} on {} (contiguous {}), expected {want:?} {} on {}", t.shape(), t.dtype(), t.device(), t.is_contiguous(), h.c.dtype, dev()));
        }
    }
    Ok(())
}

/// The per-element terms of the bound that the reference does not carry (see the header), for the
/// backward handed `given_out`: `rmag` [dq, dk], the magnitudes of the rounded dS terms,
/// |scale| sum P |dP - D| tanh' |k_j| or |q_i|; `slack` [dq, dk, dv], tanh.approx's share (zero without
/// softcap).
struct KernelTerms {
    rmag: [Vec<f64>; 2],
    slack: [Vec<f64>; 3],
}

fn kernel_terms(h: &Host, o: &RefOpts, given_out: &[f32]) -> KernelTerms {
    let (hq, hk, d) = (h.c.hq, h.c.hk, h.c.d);
    let mut t = KernelTerms { rmag: [vec![0.0f64; h.q.len()], vec![0.0f64; h.k.len()]], slack: [vec![0.0f64; h.q.len()], vec![0.0f64; h.k.len()], vec![0.0f64; h.k.len()]] };
    let (eps, cap) = (TANH_EPS, o.softcap);
    for b in 0..h.used_q.len() {
        let (sq, sk, q0, k0) = (h.used_q[b], h.used_k[b], h.cu_q[b], h.cu_k[b]);
        for head in 0..hq {
            let hkv = head / (hq / hk);
            for i in 0..sq {
                let keys: Vec<usize> = (0..sk).filter(|&j| visible(o, i, j, sq, sk)).collect();
                if keys.is_empty() {
                    continue;
                }
                let qa = ((q0 + i) * hq + head) * d;
                let ka = |j: usize| ((k0 + j) * hk + hkv) * d;
                let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum::<f64>();
                // Scores and tanh values (t = 0 without softcap).
                let (sc, th): (Vec<f64>, Vec<f64>) = keys
                    .iter()
                    .map(|&j| {
                        let x = o.scale * dot(&h.q[qa..][..d], &h.k[ka(j)..][..d]);
                        if cap > 0.0 {
                            let t = (x / cap).tanh();
                            (cap * t, t)
                        } else {
                            (x, 0.0)
                        }
                    })
                    .unzip();
                let max = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = sc.iter().map(|s| (s - max).exp()).sum();
                let row_sum = dot(&h.dout[qa..][..d], &given_out[qa..][..d]);
                let m = sc.iter().fold(0.0f64, |a, s| a.max(s.abs()));
                for (n, &j) in keys.iter().enumerate() {
                    let p = (sc[n] - max).exp() / sum;
                    let ds = p * (dot(&h.dout[qa..][..d], &h.v[ka(j)..][..d]) - row_sum).abs();
                    let dsc = 1.0 - th[n] * th[n];
                    let (ep, e_dsc) = if cap > 0.0 { ((eps * (sc[n].abs() + m)).exp_m1(), (2.0 * eps + eps * eps) * th[n] * th[n]) } else { (0.0, 0.0) };
                    let (r, sl) = (o.scale.abs() * ds * dsc, o.scale.abs() * ds * (ep * dsc + (1.0 + ep) * e_dsc));
                    for y in 0..d {
                        let (kv, qv, g) = (f64::from(h.k[ka(j) + y]).abs(), f64::from(h.q[qa + y]).abs(), f64::from(h.dout[qa + y]).abs());
                        t.rmag[0][qa + y] += r * kv;
                        t.rmag[1][ka(j) + y] += r * qv;
                        t.slack[0][qa + y] += sl * kv;
                        t.slack[1][ka(j) + y] += sl * qv;
                        t.slack[2][ka(j) + y] += p * ep * g;
                    }
                }
            }
        }
    }
    t
}

/// What a result is compared with in `Expected::check_pair`.
#[derive(Clone, Copy, PartialEq)]
enum Other {
    /// Another run of the kernel (another packing, the other mode): its own budget again.
    Kernel,
    /// The CPU path: cpu_backward.rs's budget.
    Cpu,
}

/// The reference gradients of one problem and their error bound (see the header).
struct Expected {
    r: RefGrads,
    rmag: [Vec<f64>; 2],
    slack: [Vec<f64>; 3],
    u: f64,
    c: f64,
    c_cpu: f64,
    tiny: [f64; 3],
    /// u * the dtype's smallest normal: the output rounding's absolute error among the subnormals.
    h: f64,
    row_elems: [usize; 3],
    real_q: Vec<(usize, usize)>,
    real_k: Vec<(usize, usize)>,
}

impl Expected {
    /// (reference, magnitude, derr) of gradient `w` (0 dq, 1 dk, 2 dv).
    fn parts(&self, w: usize) -> (&[f64], &[f64], Option<&[f64]>) {
        match w {
            0 => (&self.r.dq, &self.r.dq_mag, Some(&self.r.dq_derr)),
            1 => (&self.r.dk, &self.r.dk_mag, Some(&self.r.dk_derr)),
            _ => (&self.r.dv, &self.r.dv_mag, None),
        }
    }
    /// The kernel's budget for element e of gradient w beyond the final rounding.
    fn budget(&self, w: usize, e: usize, with_derr: bool) -> f64 {
        let (_, mag, derr) = self.parts(w);
        let derr = if with_derr { derr.map_or(0.0, |x| x[e]) } else { 0.0 };
        // What the in-kernel roundings are relative to: dS terms (dq, dk), P terms (dv: exactly its mag).
        let rounded = if w < 2 { self.rmag[w][e] } else { mag[e] };
        (1.0 + 2.0 * self.u) * (ROUNDINGS[w] * self.u * rounded + self.c * mag[e] + derr + self.slack[w][e]) + self.tiny[w]
    }
    /// No term enters this element: it must be exactly 0.
    fn is_structural_zero(&self, w: usize, e: usize) -> bool {
        let (r, mag, derr) = self.parts(w);
        r[e] == 0.0 && mag[e] == 0.0 && derr.is_none_or(|x| x[e] == 0.0) && self.slack[w][e] == 0.0
    }
    /// Where element e of gradient w sits: its row, and the sequence it belongs to (or padding).
    fn label(&self, w: usize, e: usize) -> String {
        let row = e / self.row_elems[w];
        let seqs = if w == 0 { &self.real_q } else { &self.real_k };
        match seqs.iter().position(|&(s, n)| row >= s && row < s + n) {
            Some(b) => format!("row {row} = sequence {b} row {}", row - seqs[b].0),
            None => format!("row {row}, padding"),
        }
    }
    fn sizes(&self, g: &[Vec<f32>; 3]) -> Result<(), String> {
        for w in 0..3 {
            if g[w].len() != self.parts(w).0.len() {
                return Err(format!("{}: {} elements, reference {}", NAMES[w], g[w].len(), self.parts(w).0.len()));
            }
        }
        Ok(())
    }

    /// The kernel's gradients against the reference; returns the worst |diff| / tolerance of each.
    fn check(&self, g: &[Vec<f32>; 3]) -> Result<[f64; 3], String> {
        self.sizes(g)?;
        let mut worst = [0.0f64; 3];
        for w in 0..3 {
            let r = self.parts(w).0;
            for (e, &x) in g[w].iter().enumerate() {
                let x = f64::from(x);
                if self.is_structural_zero(w, e) {
                    if x != 0.0 {
                        return Err(format!("{}[{e}] ({}) = {x}, must be exactly 0", NAMES[w], self.label(w, e)));
                    }
                    continue;
                }
                let bound = self.u * r[e].abs() + self.budget(w, e, true);
                worst[w] = worst[w].max((x - r[e]).abs() / bound);
                if !(x.is_finite() && (x - r[e]).abs() <= bound) {
                    let mag = self.parts(w).1[e];
                    return Err(format!("{}[{e}] ({}) = {x}, reference {} (|diff| {:.3e}, tolerance {bound:.3e}, magnitude {mag:.3e})", NAMES[w], self.label(w, e), r[e], (x - r[e]).abs()));
                }
            }
        }
        Ok(worst)
    }

    /// Two results for the same inputs against each other (see the header); `a` is the kernel's.
    fn check_pair(&self, a: &[Vec<f32>; 3], b: &[Vec<f32>; 3], other: Other) -> Result<[f64; 3], String> {
        self.sizes(a)?;
        self.sizes(b)?;
        let mut worst = [0.0f64; 3];
        for w in 0..3 {
            let (r, mag, _) = self.parts(w);
            for e in 0..r.len() {
                let (x, y) = (f64::from(a[w][e]), f64::from(b[w][e]));
                if self.is_structural_zero(w, e) {
                    if x != 0.0 || y != 0.0 {
                        return Err(format!("{}[{e}] ({}) = {x} and {y}, must be exactly 0", NAMES[w], self.label(w, e)));
                    }
                    continue;
                }
                let second = match other {
                    Other::Kernel => self.budget(w, e, false),
                    Other::Cpu => (1.0 + 2.0 * self.u) * self.c_cpu * mag[e] + self.h,
                };
                let bound = 2.0 * self.u * r[e].abs() + self.budget(w, e, false) + second;
                worst[w] = worst[w].max((x - y).abs() / bound);
                if !(x.is_finite() && y.is_finite() && (x - y).abs() <= bound) {
                    return Err(format!("{}[{e}] ({}) = {x} vs {y} (|diff| {:.3e}, tolerance {bound:.3e}, reference {})", NAMES[w], self.label(w, e), (x - y).abs(), r[e]));
                }
            }
        }
        Ok(worst)
    }
}

fn report(what: &str, worst: [f64; 3]) {
    if std::env::var_os("FA_TEST_VERBOSE").is_some() {
        eprintln!("{what}: worst |diff|/tol dq {:.3} dk {:.3} dv {:.3}", worst[0], worst[1], worst[2]);
    }
}

/// Where the backward's `out` and `lse` come from.
#[derive(Clone, Copy, Debug)]
enum FwdFrom {
    /// The kernel's forward (the real use).
    Kernel,
    /// The f64 reference, rounded as the forward would store it.
    Reference,
}

/// One problem end to end: forward, backward (q, k, v, dout, out laid out per `strided`) under each kernel
/// choice of `k`, checked against the reference.
#[allow(clippy::too_many_arguments)]
fn run_case(rng: &mut StdRng, h: &Host, from: FwdFrom, strided: [bool; 5], deterministic: bool, k: Kernels, tally: &mut Tally) -> Result<[f64; 3], String> {
    let dv = h.upload(rng, [strided[0], strided[1], strided[2], strided[3]]);
    let (out_vals, out, lse) = match from {
        FwdFrom::Kernel => {
            let f = dv.fwd()?;
            let vals = f.out.to_f32_vec().unwrap();
            let out = if strided[4] { device_tensor(&vals, &h.q_shape(), h.c.dtype, true, rng) } else { f.out };
            (vals, out, f.lse)
        }
        FwdFrom::Reference => {
            let (vals, lse) = h.reference_fwd();
            let out = device_tensor(&vals, &h.q_shape(), h.c.dtype, strided[4], rng);
            (vals, out, lse)
        }
    };
    check_choices(h, &dv, &out, &lse, &h.expected(&out_vals), deterministic, k, tally)
}

fn random_strides(rng: &mut StdRng) -> [bool; 5] {
    if rng.gen_bool(0.5) { [false; 5] } else { std::array::from_fn(|_| rng.gen_bool(0.6)) }
}

// ---------------------------------------------------------------------------------------------------
// 1. Dense backward against the reference.

/// (b, sq, sk, hq, hk): GQA and MQA, Sq < Sk and Sq > Sk (causal: the first rows see nothing), odd
/// lengths off the tile grid, a single query, a single key, whole tiles.
const SHAPES: [(usize, usize, usize, usize, usize); 6] = [(2, 65, 130, 4, 2), (1, 130, 63, 3, 1), (3, 17, 17, 2, 2), (1, 1, 65, 4, 1), (1, 63, 1, 2, 1), (1, 128, 128, 2, 2)];

#[test]
fn dense_every_head_dim_dtype_and_mask() {
    require_gpu!();
    let (seed, mut rng) = seeded("dense_every_head_dim_dtype_and_mask");
    let mut tally = Tally::new("gpu_bwd::dense_every_head_dim_dtype_and_mask");
    // None, causal, a window bounded on both sides, causal with a left window.
    let masks = [plain(false, (-1, -1), 0.0), plain(true, (-1, -1), 0.0), plain(false, (37, 5), 0.0), plain(true, (40, -1), 0.0)];
    for dtype in [DType::BF16, DType::F16] {
        for d in HEAD_DIMS {
            for opts in masks {
                for (b, sq, sk, hq, hk) in SHAPES {
                    let c = Case { dtype, d, hq, hk, opts, amp: amp_of(&mut rng) };
                    let strided = random_strides(&mut rng);
                    let h = Host::dense(&mut rng, &c, b, sq, sk);
                    let worst = run_case(&mut rng, &h, FwdFrom::Kernel, strided, false, Kernels::Every, &mut tally)
                        .unwrap_or_else(|e| panic!("seed {seed}: {c:?} b={b} sq={sq} sk={sk} strided={strided:?}: {e}"));
                    report(&format!("{dtype} d={d} {opts:?} {b}x{sq}x{sk}"), worst);
                }
            }
        }
    }
    tally.report();
}

#[test]
fn dense_softcap_every_head_dim() {
    require_gpu!();
    let (seed, mut rng) = seeded("dense_softcap_every_head_dim");
    let mut tally = Tally::new("gpu_bwd::dense_softcap_every_head_dim");
    // Sharp scores (q, k up to 2) against small caps, so tanh' is far from 1 and its absence shows.
    let caps = [plain(false, (-1, -1), 1.5), plain(true, (-1, -1), 5.0), plain(false, (30, 30), 0.7)];
    for dtype in [DType::BF16, DType::F16] {
        for d in HEAD_DIMS {
            for opts in caps {
                for (b, sq, sk, hq, hk) in [(1, 70, 97, 4, 2), (2, 33, 40, 2, 1)] {
                    let c = Case { dtype, d, hq, hk, opts, amp: Amp { q: 2.0, k: 2.0, v: 1.0 } };
                    let strided = random_strides(&mut rng);
                    let h = Host::dense(&mut rng, &c, b, sq, sk);
                    let worst = run_case(&mut rng, &h, FwdFrom::Kernel, strided, false, Kernels::Every, &mut tally)
                        .unwrap_or_else(|e| panic!("seed {seed}: {c:?} b={b} sq={sq} sk={sk} strided={strided:?}: {e}"));
                    report(&format!("softcap {dtype} d={d} {opts:?}"), worst);
                }
            }
        }
    }
    tally.report();
}

/// out and LSE from the f64 reference instead of the kernel's forward; custom (negative) scales.
#[test]
fn dense_with_reference_forward_inputs() {
    require_gpu!();
    let (seed, mut rng) = seeded("dense_with_reference_forward_inputs");
    let mut tally = Tally::new("gpu_bwd::dense_with_reference_forward_inputs");
    let variants = [
        Opts { causal: true, window: (50, -1), softcap: 0.0, scale: Some(-0.25), kernels: Default::default() },
        Opts { causal: false, window: (-1, -1), softcap: 3.0, scale: Some(0.3), kernels: Default::default() },
        Opts { causal: false, window: (20, 60), softcap: 0.0, scale: None, kernels: Default::default() },
    ];
    for dtype in [DType::BF16, DType::F16] {
        for d in [64, 128, 256] {
            for opts in variants {
                for (b, sq, sk, hq, hk) in [(2, 77, 101, 4, 2), (1, 120, 50, 2, 1)] {
                    let c = Case { dtype, d, hq, hk, opts, amp: amp_of(&mut rng) };
                    let h = Host::dense(&mut rng, &c, b, sq, sk);
                    let strided = random_strides(&mut rng);
                    for deterministic in [false, true] {
                        run_case(&mut rng, &h, FwdFrom::Reference, strided, deterministic, Kernels::Every, &mut tally)
                            .unwrap_or_else(|e| panic!("seed {seed}: {c:?} b={b} sq={sq} sk={sk} strided={strided:?} deterministic={deterministic}: {e}"));
                    }
                }
            }
        }
    }
    tally.report();
}

// ---------------------------------------------------------------------------------------------------
// 2. Varlen: random packed layouts with NaN padding; packing independence.

/// A packed problem with every padding row of q, k, v, dout and out NaN (the forward ran on a clean
/// copy: this suite checks the backward), random layouts, checked against the reference per sequence
/// (padding gradients exactly 0).
fn varlen_case(rng: &mut StdRng, c: &Case, p: &Packing, deterministic: bool, k: Kernels, tally: &mut Tally) -> Result<[f64; 3], String> {
    let clean = Host::packed(rng, c, p);
    let f = clean.upload(rng, [false; 4]).fwd()?;
    let mut out = f.out.to_f32_vec().unwrap();
    clean.poison_q_rows(&mut out);
    let h = clean.poisoned();
    let strided: [bool; 5] = std::array::from_fn(|_| rng.gen_bool(0.4));
    let dv = h.upload(rng, [strided[0], strided[1], strided[2], strided[3]]);
    let out_t = device_tensor(&out, &h.q_shape(), c.dtype, strided[4], rng);
    check_choices(&h, &dv, &out_t, &f.lse, &h.expected(&out), deterministic, k, tally)
}

#[test]
fn varlen_random_layouts() {
    require_gpu!();
    let (seed, mut rng) = seeded("varlen_random_layouts");
    let mut tally = Tally::new("gpu_bwd::varlen_random_layouts");
    for iter in 0..60 {
        let side = |rng: &mut StdRng| if rng.gen_bool(0.5) { -1 } else { rng.gen_range(0..120) };
        let opts = Opts { causal: rng.gen_bool(0.4), window: (side(&mut rng), side(&mut rng)), softcap: if rng.gen_bool(0.2) { 4.0 } else { 0.0 }, scale: None, kernels: Default::default() };
        let (hq, hk) = [(1, 1), (2, 2), (4, 2), (4, 1), (6, 3)][rng.gen_range(0..5)];
        let c = Case { dtype: dtype_of(&mut rng), d: HEAD_DIMS[rng.gen_range(0..HEAD_DIMS.len())], hq, hk, opts, amp: amp_of(&mut rng) };
        let b = rng.gen_range(1..6);
        let maxlen = if rng.gen_bool(0.25) { 200 } else { 80 };
        let p = Packing::random(&mut rng, b, maxlen);
        let deterministic = rng.gen_bool(0.3);
        let worst = varlen_case(&mut rng, &c, &p, deterministic, Kernels::Every, &mut tally).unwrap_or_else(|e| panic!("seed {seed} iter {iter}: {c:?} {p:?} deterministic={deterministic}: {e}"));
        report(&format!("varlen iter {iter}"), worst);
    }
    tally.report();
}

/// Varlen over a packed batch equals one dense B=1 backward per sequence (given the same out and LSE
/// rows): bitwise with deterministic = true, to tolerance in the default mode; both modes match the
/// reference.
#[test]
fn packing_independence() {
    require_gpu!();
    let (seed, mut rng) = seeded("packing_independence");
    let mut tally = Tally::new("gpu_bwd::packing_independence");
    let configs = [
        (DType::BF16, 128, plain(true, (-1, -1), 0.0)),
        (DType::F16, 64, plain(false, (40, 3), 0.0)),
        (DType::BF16, 256, plain(false, (-1, -1), 6.0)),
        (DType::F16, 96, plain(true, (100, -1), 0.0)),
    ];
    for (dtype, d, opts) in configs {
        let c = Case { dtype, d, hq: 4, hk: 2, opts, amp: amp_of(&mut rng) };
        let lens: Vec<(usize, usize)> = (0..5).map(|_| (rng.gen_range(1..200), rng.gen_range(1..200))).collect();
        let h = Host::packed(&mut rng, &c, &Packing::plain(&lens));
        let ctx = format!("seed {seed}: {c:?} lens {lens:?}");
        let dv = h.upload(&mut rng, [false; 4]);
        let f = dv.fwd().unwrap();
        let out = f.out.to_f32_vec().unwrap();
        let lse = f.lse.to_f32_vec().unwrap();
        let exp = h.expected(&out);
        // Per sequence: dense B=1 tensors of its rows.
        let (hq, hk, tq) = (c.hq, c.hk, h.tq());
        let rows = |x: &[f32], row0: usize, n: usize, heads: usize| x[row0 * heads * d..][..n * heads * d].to_vec();
        let one = |x: Vec<f32>, n: usize, heads: usize| Tensor::from_f32(&x, &[1, n, heads, d], dtype).unwrap().to_device(dev()).unwrap();
        let seqs: Vec<[Tensor; 6]> = lens
            .iter()
            .enumerate()
            .map(|(b, &(sq, sk))| {
                let lse1: Vec<f32> = (0..hq).flat_map(|hh| lse[hh * tq + h.cu_q[b]..][..sq].to_vec()).collect();
                let lse1 = Tensor::from_f32(&lse1, &[1, hq, sq], DType::F32).unwrap().to_device(dev()).unwrap();
                let (qb, kb) = (h.cu_q[b], h.cu_k[b]);
                [one(rows(&h.dout, qb, sq, hq), sq, hq), one(rows(&h.q, qb, sq, hq), sq, hq), one(rows(&h.k, kb, sk, hk), sk, hk), one(rows(&h.v, kb, sk, hk), sk, hk), one(rows(&out, qb, sq, hq), sq, hq), lse1]
            })
            .collect();
        for (name, choice) in choices(&h, false, Kernels::Every) {
            let fams = [false, true].map(|det| family(&h, det, choice));
            let ctx = format!("{ctx} [{name}: {} / {}]", fams[0], fams[1]);
            let packed = [false, true].map(|det| dv.bwd_with(&f.out, &f.lse, det, choice).unwrap_or_else(|e| panic!("{ctx}: {e}")));
            for (g, det) in packed.iter().zip([false, true]) {
                exp.check(&grads(g)).unwrap_or_else(|e| panic!("{ctx}: packed, deterministic {det}: {e}"));
            }
            // Per sequence, assembled into packed order.
            let mut singles = [[vec![], vec![], vec![]], [vec![], vec![], vec![]]];
            let mut single_bits: [[Vec<u8>; 3]; 2] = Default::default();
            for (b, [dout1, q1, k1, v1, out1, lse1]) in seqs.iter().enumerate() {
                for (m, det) in [false, true].into_iter().enumerate() {
                    let g = bwd(dout1, q1, k1, v1, out1, lse1, &AttnOptions { kernels: choice, ..c.opts.attn() }, det).unwrap_or_else(|e| panic!("{ctx}: sequence {b}: {e}"));
                    for (w, x) in grads(&g).into_iter().enumerate() {
                        singles[m][w].extend(x);
                    }
                    for (w, x) in bits(&g).into_iter().enumerate() {
                        single_bits[m][w].extend(x);
                    }
                }
            }
            let packed_bits = bits(&packed[1]);
            for w in 0..3 {
                assert!(packed_bits[w] == single_bits[1][w], "{ctx}: deterministic {} of the packed batch differs from the per-sequence calls (first differing byte {:?})", NAMES[w], packed_bits[w].iter().zip(&single_bits[1][w]).position(|(a, b)| a != b));
            }
            exp.check_pair(&grads(&packed[0]), &singles[0], Other::Kernel).unwrap_or_else(|e| panic!("{ctx}: default mode, packed vs per sequence: {e}"));
            for fam in fams {
                tally.add(name, fam, d);
            }
        }
    }
    tally.report();
}

// ---------------------------------------------------------------------------------------------------
// 3. Determinism, and long sequences against the reference.

/// deterministic = true: repeated runs on the same inputs are bitwise identical, with sequences long
/// enough (Sk >= 1024) that many thread blocks add into each dq row.
#[test]
fn deterministic_runs_are_bitwise_identical() {
    require_gpu!();
    let (seed, mut rng) = seeded("deterministic_runs_are_bitwise_identical");
    let dense = [
        (Case { dtype: DType::BF16, d: 128, hq: 4, hk: 2, opts: plain(true, (-1, -1), 0.0), amp: Amp { q: 1.0, k: 1.0, v: 1.0 } }, (1, 1101, 1536), false),
        (Case { dtype: DType::F16, d: 64, hq: 2, hk: 1, opts: plain(false, (300, 50), 0.0), amp: Amp { q: 1.0, k: 1.0, v: 1.0 } }, (2, 600, 1300), true),
    ];
    let packed = [
        (
            Case { dtype: DType::BF16, d: 96, hq: 6, hk: 2, opts: plain(true, (-1, -1), 0.0), amp: Amp { q: 1.0, k: 1.0, v: 1.0 } },
            Packing { slots_q: vec![1200, 0, 333, 1, 64], slots_k: vec![1500, 7, 1100, 1024, 0], used_q: Some(vec![1100, 0, 333, 1, 60]), used_k: Some(vec![1500, 5, 1000, 1024, 0]), tail: (9, 4), extra_max: Some((0, 0)) },
        ),
        // No max lengths: grids from the mean lengths, the long sequences walked in more steps.
        (
            Case { dtype: DType::F16, d: 128, hq: 4, hk: 2, opts: plain(true, (-1, -1), 0.0), amp: Amp { q: 1.0, k: 1.0, v: 1.0 } },
            Packing { slots_q: vec![1500, 3, 40, 0, 700], slots_k: vec![1700, 9, 64, 1, 700], used_q: None, used_k: Some(vec![1600, 9, 60, 1, 650]), tail: (5, 0), extra_max: None },
        ),
        (Case { dtype: DType::F16, d: 256, hq: 4, hk: 1, opts: plain(false, (-1, -1), 8.0), amp: Amp { q: 1.0, k: 1.0, v: 1.0 } }, Packing::plain(&[(700, 1030), (1030, 700)])),
    ];
    let mut problems: Vec<(String, Host, bool)> = dense.iter().map(|(c, (b, sq, sk), strided)| (format!("dense {c:?} {b}x{sq}x{sk}"), Host::dense(&mut rng, c, *b, *sq, *sk), *strided)).collect();
    problems.extend(packed.iter().map(|(c, p)| (format!("varlen {c:?} {p:?}"), Host::packed(&mut rng, c, p), false)));
    let mut tally = Tally::new("gpu_bwd::deterministic_runs_are_bitwise_identical");
    for (what, h, strided) in &problems {
        let dv = h.upload(&mut rng, [*strided; 4]);
        let f = dv.fwd().unwrap_or_else(|e| panic!("seed {seed}: {what}: {e}"));
        for (name, choice) in choices(h, true, Kernels::Every) {
            let first = bits(&dv.bwd_with(&f.out, &f.lse, true, choice).unwrap_or_else(|e| panic!("seed {seed}: {what} {name}: {e}")));
            for run in 1..4 {
                let again = bits(&dv.bwd_with(&f.out, &f.lse, true, choice).unwrap());
                for w in 0..3 {
                    assert!(again[w] == first[w], "seed {seed}: {what} {name}: run {run}: deterministic {} differs from run 0", NAMES[w]);
                }
            }
            tally.add(name, family(h, true, choice), h.c.d);
        }
    }
    tally.report();
}

/// Long sequences (many key tiles per dq row, many query tiles per dk row) against the reference, in
/// both modes.
#[test]
fn long_sequences_match_reference() {
    require_gpu!();
    let (seed, mut rng) = seeded("long_sequences_match_reference");
    let mut tally = Tally::new("gpu_bwd::long_sequences_match_reference");
    let amp = Amp { q: 1.0, k: 1.0, v: 1.0 };
    let dense = Host::dense(&mut rng, &Case { dtype: DType::F16, d: 64, hq: 2, hk: 1, opts: plain(false, (-1, -1), 0.0), amp }, 1, 1100, 1300);
    let packed = Host::packed(&mut rng, &Case { dtype: DType::BF16, d: 128, hq: 2, hk: 1, opts: plain(true, (-1, -1), 0.0), amp }, &Packing::plain(&[(700, 1030), (1030, 300)]));
    for h in [dense, packed] {
        for deterministic in [false, true] {
            let worst = run_case(&mut rng, &h, FwdFrom::Kernel, [false; 5], deterministic, Kernels::Every, &mut tally)
                .unwrap_or_else(|e| panic!("seed {seed}: {:?} {:?} deterministic={deterministic}: {e}", h.c, h.dense));
            report(&format!("long {:?} deterministic {deterministic}", h.dense), worst);
        }
    }
    tally.report();
}

/// The Hopper dK/dV kernel with one CTA per (sequence, kv head) (`KernelChoice::bwd_chain_all`, which the
/// dispatch otherwise picks only for many short sequences): each key block's copies start during its
/// predecessor's last step, and the kernel converts dq itself. Several key blocks per CTA, partial ones,
/// masks that skip blocks, GQA, seqused and a tail; elsewhere the option changes nothing.
#[test]
fn chained_key_blocks_match_reference() {
    require_gpu!();
    let (seed, mut rng) = seeded("chained_key_blocks_match_reference");
    let mut tally = Tally::new("gpu_bwd::chained_key_blocks_match_reference");
    let chained = |causal, window, softcap| Opts { kernels: flash_attn::KernelChoice { bwd_chain_all: true, ..Default::default() }, ..plain(causal, window, softcap) };
    let amp = Amp { q: 1.0, k: 1.0, v: 1.0 };
    let dense = [
        (Case { dtype: DType::BF16, d: 64, hq: 4, hk: 2, opts: chained(true, (-1, -1), 0.0), amp }, (2, 300, 520)),
        (Case { dtype: DType::F16, d: 128, hq: 2, hk: 1, opts: chained(false, (100, 20), 0.0), amp }, (1, 450, 390)),
        (Case { dtype: DType::F16, d: 64, hq: 1, hk: 1, opts: chained(false, (-1, -1), 3.0), amp: Amp { q: 2.0, k: 2.0, v: 1.0 } }, (1, 130, 700)),
        (Case { dtype: DType::BF16, d: 128, hq: 3, hk: 1, opts: chained(true, (-1, -1), 0.0), amp }, (2, 400, 260)),
    ];
    for (c, (b, sq, sk)) in dense {
        let h = Host::dense(&mut rng, &c, b, sq, sk);
        let strided = random_strides(&mut rng);
        let worst = run_case(&mut rng, &h, FwdFrom::Kernel, strided, false, Kernels::AsGiven, &mut tally).unwrap_or_else(|e| panic!("seed {seed}: {c:?} b={b} sq={sq} sk={sk} strided={strided:?}: {e}"));
        report(&format!("chained {c:?} {b}x{sq}x{sk}"), worst);
    }
    let packed = [
        (
            Case { dtype: DType::BF16, d: 128, hq: 4, hk: 2, opts: chained(true, (-1, -1), 0.0), amp },
            Packing { slots_q: vec![300, 0, 129], slots_k: vec![400, 50, 260], used_q: Some(vec![280, 0, 129]), used_k: Some(vec![390, 33, 200]), tail: (7, 5), extra_max: Some((3, 0)) },
        ),
        (Case { dtype: DType::F16, d: 64, hq: 2, hk: 1, opts: chained(false, (60, 60), 0.0), amp }, Packing::plain(&[(257, 513), (513, 129)])),
    ];
    for (c, p) in &packed {
        let worst = varlen_case(&mut rng, c, p, false, Kernels::AsGiven, &mut tally).unwrap_or_else(|e| panic!("seed {seed}: {c:?} {p:?}: {e}"));
        report(&format!("chained varlen {c:?}"), worst);
    }
    tally.report();
}

// ---------------------------------------------------------------------------------------------------
// 4. The CUDA path against the CPU path.

#[test]
fn gpu_matches_cpu_path() {
    require_gpu!();
    let (seed, mut rng) = seeded("gpu_matches_cpu_path");
    let mut tally = Tally::new("gpu_bwd::gpu_matches_cpu_path");
    let mut problems = Vec::new();
    for (n, d) in HEAD_DIMS.into_iter().enumerate() {
        let opts = [
            Opts { causal: true, window: (200, -1), softcap: 0.0, scale: Some(0.3), kernels: Default::default() },
            Opts { causal: false, window: (-1, -1), softcap: 2.0, scale: None, kernels: Default::default() },
            Opts { causal: false, window: (40, 9), softcap: 0.0, scale: None, kernels: Default::default() },
        ][n % 3];
        let c = Case { dtype: [DType::BF16, DType::F16][n % 2], d, hq: 4, hk: 2, opts, amp: Amp { q: 2.0, k: 2.0, v: 2.0 } };
        problems.push(Host::dense(&mut rng, &c, 2, 133, 97));
    }
    let c = Case { dtype: DType::BF16, d: 128, hq: 3, hk: 1, opts: plain(true, (-1, -1), 0.0), amp: Amp { q: 1.0, k: 1.0, v: 1.0 } };
    let p = Packing { slots_q: vec![90, 0, 150], slots_k: vec![60, 20, 150], used_q: Some(vec![70, 0, 150]), used_k: Some(vec![60, 13, 99]), tail: (5, 3), extra_max: Some((1, 0)) };
    problems.push(Host::packed(&mut rng, &c, &p));
    for h in &problems {
        let ctx = format!("seed {seed}: {:?} {:?}", h.c, h.dense);
        let strided = random_strides(&mut rng);
        let dv = h.upload(&mut rng, [strided[0], strided[1], strided[2], strided[3]]);
        let f = dv.fwd().unwrap_or_else(|e| panic!("{ctx}: {e}"));
        // The CPU path, handed the same out and LSE.
        let host = |t: &Tensor| t.to_device(Device::Cpu).unwrap();
        let lengths = dv.lengths.as_ref().map(|l| Lengths { cu_q: host(&l.cu_q), cu_k: host(&l.cu_k), used_q: l.used_q.as_ref().map(host), used_k: l.used_k.as_ref().map(host), max_q: l.max_q, max_k: l.max_k });
        let on_cpu = Dev { q: host(&dv.q), k: host(&dv.k), v: host(&dv.v), dout: host(&dv.dout), lengths, opts: dv.opts };
        let cpu = on_cpu.bwd(&host(&f.out), &host(&f.lse), false).unwrap_or_else(|e| panic!("{ctx}: CPU path: {e}"));
        let out = f.out.to_f32_vec().unwrap();
        let exp = h.expected(&out);
        for (name, choice) in choices(h, false, Kernels::Every) {
            let fam = family(h, false, choice);
            let gpu = dv.bwd_with(&f.out, &f.lse, false, choice).unwrap_or_else(|e| panic!("{ctx} [{name}: {fam}]: {e}"));
            exp.check(&grads(&gpu)).unwrap_or_else(|e| panic!("{ctx} [{name}: {fam}]: against the reference: {e}"));
            let worst = exp.check_pair(&grads(&gpu), &grads(&cpu), Other::Cpu).unwrap_or_else(|e| panic!("{ctx} [{name}: {fam}]: CUDA vs CPU: {e}"));
            report("cuda vs cpu", worst);
            tally.add(name, fam, h.c.d);
        }
    }
    tally.report();
}

// ---------------------------------------------------------------------------------------------------
// 5. Rows that see no key.

#[test]
fn fully_masked_rows_have_zero_dq() {
    require_gpu!();
    let (seed, mut rng) = seeded("fully_masked_rows_have_zero_dq");
    let mut tally = Tally::new("gpu_bwd::fully_masked_rows_have_zero_dq");
    // (b, sq, sk, opts, rows of each sequence that see no key)
    let dense: [(usize, usize, usize, Opts, usize); 5] = [
        (1, 100, 30, plain(true, (-1, -1), 0.0), 70),
        (2, 90, 40, plain(false, (0, 0), 0.0), 50),
        (1, 40, 90, plain(false, (0, 0), 0.0), 0),
        (1, 77, 20, plain(true, (3, -1), 2.0), 57),
        (1, 4, 0, plain(false, (-1, -1), 0.0), 4),
    ];
    for dtype in [DType::BF16, DType::F16] {
        for (b, sq, sk, opts, empty) in dense {
            let c = Case { dtype, d: 64, hq: 4, hk: 2, opts, amp: Amp { q: 1.0, k: 1.0, v: 1.0 } };
            let h = Host::dense(&mut rng, &c, b, sq, sk);
            let ctx = format!("seed {seed}: {c:?} b={b} sq={sq} sk={sk}");
            let dv = h.upload(&mut rng, [false; 4]);
            let f = dv.fwd().unwrap_or_else(|e| panic!("{ctx}: {e}"));
            let exp = h.expected(&f.out.to_f32_vec().unwrap());
            for det in [false, true] {
                for (name, choice) in choices(&h, det, Kernels::Every) {
                    let fam = family(&h, det, choice);
                    let ctx = format!("{ctx} deterministic={det} [{name}: {fam}]");
                    let g = grads(&dv.bwd_with(&f.out, &f.lse, det, choice).unwrap_or_else(|e| panic!("{ctx}: {e}")));
                    let row = c.hq * c.d;
                    for bi in 0..b {
                        assert!(g[0][bi * sq * row..][..empty * row].iter().all(|&x| x == 0.0), "{ctx}: dq of a row that sees no key is not 0");
                    }
                    assert!(g.iter().flatten().all(|x| x.is_finite()), "{ctx}: NaN or inf in a gradient");
                    exp.check(&g).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                    tally.add(name, fam, c.d);
                }
            }
        }
    }
    // Varlen: a sequence with queries but no keys, one whose early rows see nothing (causal, Sq > Sk).
    let c = Case { dtype: DType::BF16, d: 128, hq: 2, hk: 2, opts: plain(true, (-1, -1), 0.0), amp: Amp { q: 1.0, k: 1.0, v: 1.0 } };
    let p = Packing { slots_q: vec![30, 80, 5], slots_k: vec![0, 20, 5], used_q: None, used_k: None, tail: (0, 0), extra_max: Some((0, 0)) };
    for det in [false, true] {
        varlen_case(&mut rng, &c, &p, det, Kernels::Every, &mut tally).unwrap_or_else(|e| panic!("seed {seed}: {p:?} deterministic={det}: {e}"));
    }
    tally.report();
}

/// Zero-size problems are legal and give empty or all-zero gradients.
#[test]
fn zero_sizes() {
    require_gpu!();
    let bf = DType::BF16;
    for (b, sq, sk) in [(0, 3, 3), (1, 0, 4), (2, 0, 0)] {
        let t = |shape: &[usize], dtype: DType| Tensor::zeros(shape, dtype, dev()).unwrap();
        let (q, k) = (t(&[b, sq, 2, 32], bf), t(&[b, sk, 2, 32], bf));
        for det in [false, true] {
            let g = bwd(&q, &q, &k, &k, &q, &t(&[b, 2, sq], DType::F32), &AttnOptions::default(), det).unwrap_or_else(|e| panic!("b={b} sq={sq} sk={sk}: {e}"));
            assert_eq!((g.dq.shape(), g.dk.shape(), g.dv.shape()), (q.shape(), k.shape(), k.shape()));
            assert!(grads(&g).iter().flatten().all(|&x| x == 0.0), "b={b} sq={sq} sk={sk}: nonzero gradient");
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// 6. Errors on CUDA.

/// Every row of q, k, v, dout and out must start 16-byte aligned on CUDA: an offset or a row stride that
/// is not a multiple of 8 elements is an `Error::Value` naming the tensor, not a panic or a fault.
#[test]
fn unaligned_rows_are_an_error() {
    require_gpu!();
    if dry_run() {
        // The CPU path has no alignment contract.
        return;
    }
    let (b, s, h, d) = (1, 16, 2, 64);
    let n = b * s * h * d;
    let flat = Tensor::from_f32(&vec![0.5; 2 * n + 64], &[2 * n + 64], DType::BF16).unwrap().to_device(dev()).unwrap();
    let aligned = flat.as_strided(&[b, s, h, d], &[s * h * d, h * d, d, 1], 0).unwrap();
    let shifted = flat.as_strided(&[b, s, h, d], &[s * h * d, h * d, d, 1], 4).unwrap();
    let odd_rows = flat.as_strided(&[b, s, h, d], &[s * (h * d + 4), h * d + 4, d, 1], 0).unwrap();
    let lse = Tensor::zeros(&[b, h, s], DType::F32, dev()).unwrap();
    for (name, bad) in [("offset", &shifted), ("row stride", &odd_rows)] {
        for arg in ["q", "k", "v", "dout", "out"] {
            let pick = |a: &str| if a == arg { bad } else { &aligned };
            let r = bwd(pick("dout"), pick("q"), pick("k"), pick("v"), pick("out"), &lse, &AttnOptions::default(), false);
            match r {
                Err(Error::Value { arg: a, .. }) if a == arg => {}
                other => panic!("{arg} with an unaligned {name}: expected Error::Value naming {arg}, got {other:?}"),
            }
        }
    }
    // Varlen too.
    let (q3, bad3) = (aligned.as_strided(&[s, h, d], &[h * d, d, 1], 0).unwrap(), shifted.as_strided(&[s, h, d], &[h * d, d, 1], 4).unwrap());
    let cu = i32_tensor(&[0, s]);
    let vl = Varlen { cu_seqlens_q: &cu, cu_seqlens_k: &cu, max_seqlen_q: Some(s), max_seqlen_k: Some(s), seqused_q: None, seqused_k: None };
    let lse3 = Tensor::zeros(&[h, s], DType::F32, dev()).unwrap();
    match varlen_bwd(&bad3, &q3, &q3, &q3, &q3, &lse3, &vl, &AttnOptions::default(), true) {
        Err(Error::Value { arg: "dout", .. }) => {}
        other => panic!("varlen dout with an unaligned offset: expected Error::Value naming dout, got {other:?}"),
    }
    // A dout on the host beside a q on the device is refused by name.
    match bwd(&aligned.to_device(Device::Cpu).unwrap(), &aligned, &aligned, &aligned, &aligned, &lse, &AttnOptions::default(), false) {
        Err(Error::DeviceMismatch { arg: "dout", .. }) => {}
        other => panic!("dout on the host: expected DeviceMismatch naming dout, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------------
// The tolerance itself: it admits the modelled kernel and rejects the mistakes it must catch.

/// A kernel bug `emulate` can make.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mistake {
    None,
    /// The backward's mask diagonal shifted by one key.
    DiagonalOffByOne,
    /// Causal aligned top-left (query i sees keys <= i) instead of bottom-right.
    TopLeft,
    NoScale,
    /// dS without the softcap's tanh'.
    NoTanhDerivative,
    /// dS = P dP, without D = rowsum(dO * out).
    NoRowSum,
    /// dk and dv from the first q head of each group only.
    OneHeadPerGroup,
}

/// The header's model of the kernel, in f32: scores from f32 dot products, tanh with a relative error of
/// +-2^-11, the forward's out (rounded) and LSE from those same scores, P rounded to the dtype for dV and
/// for dS, dS rounded, f32 accumulation, the scale applied at the end and each gradient rounded once.
/// Returns the gradients and the out the backward was handed.
fn emulate(h: &Host, mistake: Mistake) -> ([Vec<f32>; 3], Vec<f32>) {
    let (hq, hk, d, dt) = (h.c.hq, h.c.hk, h.c.d, h.c.dtype);
    let o = h.c.opts.reference(d);
    let (scale, cap) = (o.scale as f32, o.softcap as f32);
    let mut acc = [vec![0f32; h.q.len()], vec![0f32; h.k.len()], vec![0f32; h.k.len()]];
    let mut out = vec![0f32; h.q.len()];
    for b in 0..h.used_q.len() {
        let (sq, sk, q0, k0) = (h.used_q[b], h.used_k[b], h.cu_q[b], h.cu_k[b]);
        for head in 0..hq {
            let hkv = head / (hq / hk);
            for i in 0..sq {
                let qa = ((q0 + i) * hq + head) * d;
                let ka = |j: usize| ((k0 + j) * hk + hkv) * d;
                // (score, tanh'), the same approximate tanh in both passes.
                let score = |j: usize| -> (f32, f32) {
                    let x = (0..d).fold(0f32, |acc, y| acc + h.q[qa + y] * h.k[ka(j) + y]) * scale;
                    if cap > 0.0 {
                        let hash = (qa as u64 ^ (ka(j) as u64) << 32).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                        let t = (x / cap).tanh() * (1.0 + if hash >> 63 == 1 { 2f32.powi(-11) } else { -(2f32.powi(-11)) });
                        (cap * t, 1.0 - t * t)
                    } else {
                        (x, 1.0)
                    }
                };
                let keys: Vec<usize> = (0..sk).filter(|&j| visible(&o, i, j, sq, sk)).collect();
                if keys.is_empty() {
                    continue;
                }
                let s: Vec<f32> = keys.iter().map(|&j| score(j).0).collect();
                let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = max + s.iter().fold(0f32, |acc, x| acc + (x - max).exp()).ln();
                for y in 0..d {
                    out[qa + y] = round(keys.iter().zip(&s).fold(0f32, |acc, (&j, x)| acc + (x - lse).exp() * h.v[ka(j) + y]), dt);
                }
                let row_sum = if mistake == Mistake::NoRowSum { 0.0 } else { (0..d).fold(0f32, |acc, y| acc + h.dout[qa + y] * out[qa + y]) };
                let sees = |j: usize| match mistake {
                    Mistake::DiagonalOffByOne => visible(&o, i, j, sq, sk + 1),
                    Mistake::TopLeft => visible(&o, i, j, sk, sk),
                    _ => visible(&o, i, j, sq, sk),
                };
                let to_kv = mistake != Mistake::OneHeadPerGroup || head % (hq / hk) == 0;
                for j in (0..sk).filter(|&j| sees(j)) {
                    let (x, dsc) = score(j);
                    let p = round((x - lse).exp(), dt);
                    let dp = (0..d).fold(0f32, |acc, y| acc + h.dout[qa + y] * h.v[ka(j) + y]);
                    let ds = round(p * (dp - row_sum) * if mistake == Mistake::NoTanhDerivative { 1.0 } else { dsc }, dt);
                    for y in 0..d {
                        acc[0][qa + y] += ds * h.k[ka(j) + y];
                        if to_kv {
                            acc[1][ka(j) + y] += ds * h.q[qa + y];
                            acc[2][ka(j) + y] += p * h.dout[qa + y];
                        }
                    }
                }
            }
        }
    }
    let s = if mistake == Mistake::NoScale { 1.0 } else { scale };
    let [dq, dk, dv] = acc;
    ([dq.iter().map(|x| round(x * s, dt)).collect(), dk.iter().map(|x| round(x * s, dt)).collect(), dv.iter().map(|&x| round(x, dt)).collect()], out)
}

#[test]
fn tolerance_admits_the_modelled_kernel() {
    // Needs no GPU (a modelled kernel on the host): runs in CI too.
    let (seed, mut rng) = seeded("tolerance_admits_the_modelled_kernel");
    let masks = [plain(false, (-1, -1), 0.0), plain(true, (-1, -1), 0.0), plain(false, (9, 4), 1.5), plain(true, (30, -1), 4.0)];
    for dtype in [DType::BF16, DType::F16] {
        for d in HEAD_DIMS {
            for opts in masks {
                let (b, sq, sk, hq, hk) = SHAPES[rng.gen_range(0..3)];
                let c = Case { dtype, d, hq, hk, opts, amp: amp_of(&mut rng) };
                let h = Host::dense(&mut rng, &c, b, sq, sk);
                let (g, out) = emulate(&h, Mistake::None);
                let worst = h.expected(&out).check(&g).unwrap_or_else(|e| panic!("seed {seed}: {c:?} {b}x{sq}x{sk}: {e}"));
                report(&format!("model {dtype} d={d} {opts:?}"), worst);
            }
        }
    }
}

#[test]
fn tolerance_rejects_kernel_mistakes() {
    // Needs no GPU (a modelled kernel on the host): runs in CI too.
    let (seed, mut rng) = seeded("tolerance_rejects_kernel_mistakes");
    let mistakes = [Mistake::DiagonalOffByOne, Mistake::TopLeft, Mistake::NoScale, Mistake::NoTanhDerivative, Mistake::NoRowSum, Mistake::OneHeadPerGroup];
    for dtype in [DType::BF16, DType::F16] {
        for d in [64, 256] {
            let c = Case { dtype, d, hq: 4, hk: 2, opts: plain(true, (40, -1), 2.0), amp: Amp { q: 2.0, k: 2.0, v: 1.0 } };
            let h = Host::dense(&mut rng, &c, 1, 70, 90);
            for m in mistakes {
                let (g, out) = emulate(&h, m);
                assert!(h.expected(&out).check(&g).is_err(), "seed {seed}: {dtype} d={d}: the tolerance admits {m:?}");
            }
        }
    }
}

/// The ordered deterministic mode's turns hold one key block per CTA. A max_seqlen_k below a sequence's
/// key count (invalid input the device cannot report) gives a grid short of its key blocks: the call must
/// still return, with finite gradients and dk = dv = 0 on the keys past the grid, never wait for a turn
/// that has passed. Every head dim, the ordered mode forced (`bwd_ordered_all`).
#[test]
fn ordered_mode_with_a_short_max_seqlen_k_returns() {
    require_gpu!();
    let (seed, mut rng) = seeded("ordered_mode_with_a_short_max_seqlen_k_returns");
    let ordered = KernelChoice { bwd_ordered_all: true, ..Default::default() };
    for d in [64, 96, 128, 192, 256] {
        let c = Case { dtype: DType::BF16, d, hq: 2, hk: 1, opts: plain(true, (-1, -1), 0.0), amp: Amp { q: 1.0, k: 1.0, v: 1.0 } };
        let p = Packing { slots_q: vec![300, 40], slots_k: vec![700, 60], used_q: None, used_k: None, tail: (0, 0), extra_max: Some((0, 0)) };
        let h = Host::packed(&mut rng, &c, &p);
        let mut dv = h.upload(&mut rng, [false; 4]);
        let f = dv.fwd().unwrap_or_else(|e| panic!("seed {seed}: d{d}: {e}"));
        // 130 of the 700 keys: a grid of one or two key blocks.
        dv.lengths.as_mut().unwrap().max_k = Some(130);
        let g = grads(&dv.bwd_with(&f.out, &f.lse, true, ordered).unwrap_or_else(|e| panic!("seed {seed}: d{d}: {e}")));
        assert!(g.iter().flatten().all(|x| x.is_finite()), "seed {seed}: d{d}: NaN or inf in a gradient");
        // Keys 256.. of sequence 0 lie past any grid of at most two 128-key blocks.
        let row = c.hk * d;
        for w in [1, 2] {
            assert!(g[w][256 * row..700 * row].iter().all(|&x| x == 0.0), "seed {seed}: d{d}: {} past the grid is not 0", NAMES[w]);
        }
    }
}
