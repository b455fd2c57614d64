//! The GPU suite for the score modifiers (issue 14): ALiBi (slopes `[Hq]` and `[B, Hq]`), dropout and
//! the probabilities (`s_dmask`, return_attn_probs) on CUDA against the CPU path (the oracle: checked
//! against an f64 reference of the definitions and against the documented dropout mask by
//! tests/alibi_dropout.rs), on fresh random inputs: dense and varlen (seqused padding, empty slots, tail
//! rows), causal / window / softcap, GQA, every head dim, bf16 and f16, several dropout probabilities,
//! seeds and offsets (wrapping past 2^64 too); the forward (out, lse, s_dmask) under every forward kernel
//! choice, the backward (dq, dk, dv; default and deterministic) under every backward choice, and the
//! paged forward against the CPU paged path. Every test prints its seed (FA_TEST_SEED=<seed> replays a
//! run). Without a CUDA GPU every test prints a notice and passes vacuously; FA_GPU_MODS_ON_CPU=1 runs
//! the suite on the CPU path instead (the CPU against itself: a dry run of this file's own logic, which
//! says nothing about the kernels).
//!
//! The dropout mask. CUDA must drop exactly the scores the CPU drops, bit for bit, in every kernel that
//! applies it:
//! - the probabilities kernel: the signs of `s_dmask` (negative where dropped, -0.0 included) are the
//!   CPU's, bitwise, wherever a key is visible;
//! - the forward kernels: with v_j the unit vector e_j (key j of a sequence, Sk <= D), out_i[j] =
//!   P_ij Z_ij, exactly zero iff (i, j) is dropped or hidden; the zero set of out is the CPU's (past
//!   8192 keys at head dim 192, the wide kernel: v_j = e_(j mod D) under a window of D keys per row);
//! - the dK/dV kernels: with dout_i = e_i (Sq <= D; there e_(i mod D)), dv_j[i] sums P_ij Z_ij over the
//!   kv head's query heads: its zero set is the CPU's;
//! - dq (atomic and deterministic kernels): compared within the tolerance below, where a wrong keep bit
//!   moves dq_i by |scale| P_ij |dP_ij| / (1 - p) |k_j|, far past it.
//!
//! Scores there are kept small, so that no kept probability underflows on either side.
//!
//! Tolerances (tests/common's, with the modifiers' bounds). Scores are bounded by smax = |scale| D qmax
//! kmax (or the softcap) plus the largest ALiBi bias (max slope * longest distance); values by vmax =
//! max|v| / (1 - p). Forward: each side within `gpu_tolerance` of the exact result (the CPU within far
//! less), so CUDA and CPU agree within twice it, and rows that see no key are out 0 / lse -inf on both.
//! s_dmask: P = exp(s - lse) with s and lse each off by at most atol_lse = 2^-14 (1 + smax), so
//! |dP| <= |P| (4 atol_lse + u_s) + 4 u_s min_normal_s + 2^-30 (u_s, min_normal_s: s_dmask's dtype's;
//! softcap adds tanh.approx's 2^-10 * 2 * softcap). Backward: per element (tests/gpu_bwd.rs's model, with the CPU's P and keep mask from its
//! `s_dmask`), |g - cpu| <= u |cpu| + tiny + (1 + 2u) (k u + c) mag, mag the sum of the magnitudes of
//! every term entering the element (dv: sum_i P |Z| |dout_i|; dq, dk: |scale| sum P (|Z| |dout|.|v_j| +
//! |dout|.|out_i|) tanh' |k_j| or |q_i|), k = 3 for dq and dk (dS and the P it is made from rounded to
//! the dtype, with slack), 2 for dv, c = 2 (2^-15 (1 + smax) + 2^-23 (D + n)) (+ softcap's tanh.approx),
//! tiny = (u min_normal + 2 min_f32) (1 + n max(|scale|, 1) amax) vmax: the dtype's rounding among its
//! subnormals, and the kernels' f32 arithmetic flushing subnormal products and partial sums to zero (up
//! to f32's smallest normal, min_f32, each; steep ALiBi slopes over long distances give such P; bf16
//! gradients can be that small). Elements no term enters are exactly 0 on both.
//! Both backwards are handed the CUDA forward's out and LSE.

#[path = "common/mod.rs"]
mod common;
#[path = "common/kernels.rs"]
mod kernels;

use common::*;
use flash_attn::raw::{self, FwdViews};
use flash_attn::{
    bwd_with, fwd_with, varlen_bwd_with, varlen_fwd_paged_with, varlen_fwd_with, AttnOptions, BwdOutput, DType, Device, Dropout, Extras, FwdOutput, KernelChoice, PagedVarlen, Target, Tensor, Varlen,
};
use kernels::{bwd_choices, bwd_family, fwd_choices, fwd_family, fwd_family_keys, bwd_mods_family, Tally, FWD_WS_WIDE_DROPOUT_MIN_KEYS, FWD_WS_WIDE_MIN_KEYS};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

/// The device under test: CUDA 0, or the CPU path with FA_GPU_MODS_ON_CPU=1 (see the header).
fn dev() -> Device {
    if dry_run() { Device::Cpu } else { Device::Cuda(0) }
}

fn dry_run() -> bool {
    std::env::var_os("FA_GPU_MODS_ON_CPU").is_some_and(|v| v == "1")
}

macro_rules! require_gpu {
    () => {
        if !kernels::gpu_or_skip("gpu_mods", dry_run(), line!()) {
            return;
        }
    };
}


// ---------------------------------------------------------------------------------------------------
// Cases and inputs

/// ALiBi slopes: none, `[Hq]` shared by the sequences, or `[B, Hq]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slopes {
    None,
    Heads,
    PerSequence,
}

/// One problem's options.
#[derive(Clone, Copy, Debug)]
struct Case {
    dtype: DType,
    d: usize,
    hq: usize,
    hk: usize,
    causal: bool,
    window: (i64, i64),
    softcap: f32,
    slopes: Slopes,
    /// Largest slope: slopes are drawn from [this / 20, this] (a negative one: negative slopes, whose
    /// bias grows with the distance).
    slope_max: f32,
    dropout: Dropout,
    /// Amplitudes of q, k (uniform in [-amp, amp]) and v.
    amp: f32,
}

impl Case {
    fn opts(&self, kernels: KernelChoice) -> AttnOptions {
        AttnOptions { causal: self.causal, window: self.window, softcap: self.softcap, dropout: self.dropout, kernels, ..Default::default() }
    }
    fn scale(&self) -> f64 {
        1.0 / (self.d as f64).sqrt()
    }
    /// Bound on |score|, the ALiBi bias over distances up to `dist` included.
    fn smax(&self, dist: usize) -> f64 {
        let qk = if self.softcap > 0.0 { self.softcap as f64 } else { self.scale() * self.d as f64 * (self.amp as f64).powi(2) };
        let bias = if self.slopes == Slopes::None { 0.0 } else { self.slope_max.abs() as f64 * dist as f64 };
        qk + bias
    }
    /// Bound on |Z v|: dropout scales kept values by 1 / (1 - p).
    fn vmax(&self) -> f64 {
        1.0 / (1.0 - self.dropout.p as f64)
    }
    /// softcap's tanh.approx share of a score's error (relative 2^-11, taken as 2^-10), on both sides.
    fn tanh_slack(&self) -> f64 {
        if self.softcap > 0.0 { 2f64.powi(-10) * 2.0 * self.softcap as f64 } else { 0.0 }
    }
}

/// Where each sequence's rows are: q rows `cu_q[b]..cu_q[b] + used_q[b]`, k / v rows likewise; `dense`
/// for a `[B, S, H, D]` batch (every slot full, no tail).
#[derive(Clone, Debug)]
struct Layout {
    dense: bool,
    slots_q: Vec<usize>,
    slots_k: Vec<usize>,
    used_q: Option<Vec<usize>>,
    used_k: Option<Vec<usize>>,
    tail: (usize, usize),
}

impl Layout {
    fn dense(b: usize, sq: usize, sk: usize) -> Layout {
        Layout { dense: true, slots_q: vec![sq; b], slots_k: vec![sk; b], used_q: None, used_k: None, tail: (0, 0) }
    }
    /// A random packed layout: empty slots, seqused below the slots, tail rows.
    fn random(rng: &mut StdRng, b: usize, maxlen: usize) -> Layout {
        let len = |rng: &mut StdRng| if rng.gen_bool(0.15) { 0 } else { rng.gen_range(1..=maxlen) };
        let slots_q: Vec<usize> = (0..b).map(|_| len(rng)).collect();
        let slots_k: Vec<usize> = (0..b).map(|_| len(rng)).collect();
        let used = |rng: &mut StdRng, slots: &[usize]| slots.iter().map(|&s| rng.gen_range(0..=s)).collect::<Vec<_>>();
        let used_q = rng.gen_bool(0.5).then(|| used(rng, &slots_q));
        let used_k = rng.gen_bool(0.5).then(|| used(rng, &slots_k));
        Layout { dense: false, slots_q, slots_k, used_q, used_k, tail: (rng.gen_range(0..12), rng.gen_range(0..12)) }
    }
    fn batch(&self) -> usize {
        self.slots_q.len()
    }
    fn cu(slots: &[usize]) -> Vec<usize> {
        std::iter::once(0).chain(slots.iter().scan(0, |a, &s| {
            *a += s;
            Some(*a)
        })).collect()
    }
    fn cu_q(&self) -> Vec<usize> {
        Layout::cu(&self.slots_q)
    }
    fn cu_k(&self) -> Vec<usize> {
        Layout::cu(&self.slots_k)
    }
    fn used_q(&self) -> Vec<usize> {
        self.used_q.clone().unwrap_or_else(|| self.slots_q.clone())
    }
    fn used_k(&self) -> Vec<usize> {
        self.used_k.clone().unwrap_or_else(|| self.slots_k.clone())
    }
    /// Rows of q and of k / v.
    fn rows(&self) -> (usize, usize) {
        (self.cu_q()[self.batch()] + self.tail.0, self.cu_k()[self.batch()] + self.tail.1)
    }
    /// max_seqlen_q, max_seqlen_k (dense: Sq, Sk): the s_dmask's rows and columns.
    fn max(&self) -> (usize, usize) {
        if self.dense {
            return (self.slots_q[0], self.slots_k[0]);
        }
        (self.used_q().into_iter().max().unwrap_or(0), self.used_k().into_iter().max().unwrap_or(0))
    }
    /// The longest query-key distance |i + Sk - Sq - j| of any sequence.
    fn max_dist(&self) -> usize {
        self.used_q().iter().zip(self.used_k()).map(|(&q, k)| q.max(k)).max().unwrap_or(0)
    }
    fn q_shape(&self, c: &Case) -> Vec<usize> {
        let (tq, _) = self.rows();
        if self.dense { vec![self.batch(), self.slots_q[0], c.hq, c.d] } else { vec![tq, c.hq, c.d] }
    }
    fn kv_shape(&self, c: &Case) -> Vec<usize> {
        let (_, tk) = self.rows();
        if self.dense { vec![self.batch(), self.slots_k[0], c.hk, c.d] } else { vec![tk, c.hk, c.d] }
    }
}

/// A problem's host values (row-major logical, rounded to the dtype) and its layout.
struct Host {
    c: Case,
    l: Layout,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
    slopes: Vec<f32>,
}

impl Host {
    fn new(rng: &mut StdRng, c: Case, l: Layout) -> Host {
        let (tq, tk) = l.rows();
        let q = random_values(rng, tq * c.hq * c.d, c.amp, c.dtype);
        let k = random_values(rng, tk * c.hk * c.d, c.amp, c.dtype);
        let v = random_values(rng, tk * c.hk * c.d, 1.0, c.dtype);
        let dout = random_values(rng, tq * c.hq * c.d, 1.0, c.dtype);
        let n = match c.slopes {
            Slopes::None => 0,
            Slopes::Heads => c.hq,
            Slopes::PerSequence => l.batch() * c.hq,
        };
        let (a, b) = (c.slope_max * 0.05, c.slope_max);
        let slopes = (0..n).map(|_| rng.gen_range(a.min(b)..=a.max(b))).collect();
        Host { c, l, q, k, v, dout, slopes }
    }
    fn slopes_shape(&self) -> Vec<usize> {
        if self.c.slopes == Slopes::PerSequence { vec![self.l.batch(), self.c.hq] } else { vec![self.c.hq] }
    }
    fn smax(&self) -> f64 {
        self.c.smax(self.l.max_dist())
    }
    fn describe(&self) -> String {
        let c = &self.c;
        let l = &self.l;
        let layout = if l.dense { format!("dense b{} sq{} sk{}", l.batch(), l.slots_q[0], l.slots_k[0]) } else { format!("slots q {:?} k {:?} used q {:?} k {:?} tail {:?}", l.slots_q, l.slots_k, l.used_q, l.used_k, l.tail) };
        format!(
            "{} d{} hq{} hk{} causal {} window {:?} softcap {} slopes {:?} (max {}) dropout p {} seed {} offset {} amp {}; {layout}",
            c.dtype, c.d, c.hq, c.hk, c.causal, c.window, c.softcap, c.slopes, c.slope_max, c.dropout.p, c.dropout.seed, c.dropout.offset, c.amp
        )
    }
}

/// A tensor of `logical` values on `device` (common::make_tensor_on).
fn upload(logical: &[f32], shape: &[usize], dtype: DType, strided: bool, rng: &mut StdRng, device: Device) -> Tensor {
    make_tensor_on(logical, shape, dtype, strided, rng, device)
}

/// The problem's tensors on one device.
struct On {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    slopes: Option<Tensor>,
    cu_q: Tensor,
    cu_k: Tensor,
    used_q: Option<Tensor>,
    used_k: Option<Tensor>,
}

impl On {
    fn new(h: &Host, device: Device, strided: bool, rng: &mut StdRng) -> On {
        let (c, l) = (&h.c, &h.l);
        let (qs, ks) = (l.q_shape(c), l.kv_shape(c));
        let slopes = (c.slopes != Slopes::None).then(|| Tensor::from_f32(&h.slopes, &h.slopes_shape(), DType::F32).unwrap().to_device(device).unwrap());
        On {
            q: upload(&h.q, &qs, c.dtype, strided, rng, device),
            k: upload(&h.k, &ks, c.dtype, strided, rng, device),
            v: upload(&h.v, &ks, c.dtype, strided, rng, device),
            dout: upload(&h.dout, &qs, c.dtype, strided, rng, device),
            slopes,
            cu_q: i32_tensor_on(&l.cu_q(), device),
            cu_k: i32_tensor_on(&l.cu_k(), device),
            used_q: l.used_q.as_ref().map(|u| i32_tensor_on(u, device)),
            used_k: l.used_k.as_ref().map(|u| i32_tensor_on(u, device)),
        }
    }
    fn varlen(&self, l: &Layout) -> Option<Varlen<'_>> {
        self.varlen_as(l, true)
    }
    /// Varlen views with the max lengths (`maxima`) or without (None: the kernels schedule from
    /// cu_seqlens; s_dmask then cannot be asked for).
    fn varlen_as(&self, l: &Layout, maxima: bool) -> Option<Varlen<'_>> {
        let (max_q, max_k) = l.max();
        let (max_seqlen_q, max_seqlen_k) = if maxima { (Some(max_q), Some(max_k)) } else { (None, None) };
        (!l.dense).then_some(Varlen { cu_seqlens_q: &self.cu_q, cu_seqlens_k: &self.cu_k, max_seqlen_q, max_seqlen_k, seqused_q: self.used_q.as_ref(), seqused_k: self.used_k.as_ref() })
    }
    fn extras(&self, probs: bool) -> Extras<'_> {
        Extras { alibi_slopes: self.slopes.as_ref(), return_attn_probs: probs }
    }
    fn fwd(&self, h: &Host, kernels: KernelChoice) -> flash_attn::Result<FwdOutput> {
        self.fwd_as(h, kernels, true)
    }
    /// The forward, varlen with or without the max lengths (`varlen_as`; s_dmask only with them).
    fn fwd_as(&self, h: &Host, kernels: KernelChoice, maxima: bool) -> flash_attn::Result<FwdOutput> {
        let o = h.c.opts(kernels);
        match self.varlen_as(&h.l, maxima) {
            None => fwd_with(&self.q, &self.k, &self.v, &self.extras(true), &o),
            Some(vl) => varlen_fwd_with(&self.q, &self.k, &self.v, &vl, &self.extras(maxima), &o),
        }
    }
    fn bwd(&self, h: &Host, out: &Tensor, lse: &Tensor, deterministic: bool, kernels: KernelChoice) -> flash_attn::Result<BwdOutput> {
        self.bwd_as(h, out, lse, deterministic, kernels, true)
    }
    #[allow(clippy::too_many_arguments)]
    fn bwd_as(&self, h: &Host, out: &Tensor, lse: &Tensor, deterministic: bool, kernels: KernelChoice, maxima: bool) -> flash_attn::Result<BwdOutput> {
        let o = h.c.opts(kernels);
        match self.varlen_as(&h.l, maxima) {
            None => bwd_with(&self.dout, &self.q, &self.k, &self.v, out, lse, &self.extras(false), &o, deterministic),
            Some(vl) => varlen_bwd_with(&self.dout, &self.q, &self.k, &self.v, out, lse, &vl, &self.extras(false), &o, deterministic),
        }
    }
    /// The forward through the raw layer with `s_dmask` in `dtype` (the Tensor API's is f32), on the
    /// Tensor API's stream (the legacy one).
    fn fwd_raw(&self, h: &Host, s_dtype: DType, kernels: KernelChoice, device: Device) -> flash_attn::Result<(Tensor, Tensor, Tensor)> {
        let (c, l) = (&h.c, &h.l);
        let (tq, _) = l.rows();
        let lse_shape = if l.dense { vec![l.batch(), c.hq, l.slots_q[0]] } else { vec![c.hq, tq] };
        let (max_q, max_k) = l.max();
        let mut out = Tensor::zeros(&l.q_shape(c), c.dtype, device)?;
        let mut lse = Tensor::zeros(&lse_shape, DType::F32, device)?;
        let mut s = Tensor::zeros(&[l.batch(), c.hq, max_q, max_k], s_dtype, device)?;
        let target = match device {
            Device::Cpu => Target::Cpu,
            Device::Cuda(ordinal) => Target::Cuda { ordinal, stream: 0 },
        };
        {
            let t = FwdViews { q: self.q.view(), k: self.k.view(), v: self.v.view(), out: out.view_mut(), lse: lse.view_mut(), alibi_slopes: self.slopes.as_ref().map(Tensor::view), s_dmask: Some(s.view_mut()) };
            let o = c.opts(kernels);
            // Safety: every view is of a live tensor on `device`; the legacy stream orders the copies back.
            match self.varlen(l) {
                None => unsafe { raw::fwd(&t, &o, target) }?,
                Some(vl) => unsafe { raw::varlen_fwd(&t, &vl.views(), &o, target) }?,
            }
        }
        Ok((out, lse, s))
    }
}

// ---------------------------------------------------------------------------------------------------
// Checks

fn host_f32(t: &Tensor) -> Vec<f32> {
    t.to_f32_vec().unwrap()
}

/// CUDA's out and lse against the CPU's: within twice `gpu_tolerance` (each within it of the exact
/// result); exact zeros and -inf where the CPU has them.
fn check_fwd(h: &Host, got: &FwdOutput, cpu: &FwdOutput) -> Result<(f64, f64), String> {
    let t = gpu_tolerance(h.c.dtype, h.c.vmax(), h.smax());
    let slack = h.c.tanh_slack();
    let tol = Tolerance { u: 2.0 * t.u, atol_out: 2.0 * t.atol_out, rtol_lse: 0.0, atol_lse: 2.0 * t.atol_lse + slack };
    let (ro, rl) = (host_f32(&cpu.out).iter().map(|&x| x as f64).collect::<Vec<_>>(), host_f32(&cpu.lse).iter().map(|&x| x as f64).collect::<Vec<_>>());
    // check_close wants an exact 0 wherever the CPU has one (a row that saw no key). With dropout a
    // row that saw keys can come out 0 on the CPU by rounding (kept terms cancelling or below the
    // dtype's smallest subnormal): there CUDA need only be within the bound. (Empty rows are still
    // caught: their LSE must be -inf on both sides, and gpu.rs checks their out is exactly 0.)
    let mut go = host_f32(&got.out);
    for (g, &r) in go.iter_mut().zip(&ro) {
        if r == 0.0 && (*g as f64).abs() <= tol.atol_out {
            *g = 0.0;
        }
    }
    check_close(&go, &host_f32(&got.lse), &ro, &rl, &tol)
}

/// s_dmask against the CPU's: the sign bits (the dropped set, -0.0 included) bitwise, the values within
/// the header's bound. Returns the worst |diff| / bound.
fn check_probs(h: &Host, got: &Tensor, cpu: &Tensor) -> Result<f64, String> {
    let (g, r) = (host_f32(got), host_f32(cpu));
    if g.len() != r.len() {
        return Err(format!("s_dmask sizes {} vs {}", g.len(), r.len()));
    }
    let atol_lse = gpu_tolerance(h.c.dtype, 1.0, h.smax()).atol_lse;
    let u_s = unit_roundoff(got.dtype());
    let rel = 4.0 * atol_lse + u_s + h.c.tanh_slack();
    // Below the dtype's smallest normal (f16: 2^-14) the rounding is absolute: a spacing of 2 u_s
    // min_normal, from either side.
    let tiny = 4.0 * u_s * min_normal(got.dtype()) + 2f64.powi(-30);
    let mut worst = 0.0f64;
    let (max_q, max_k) = h.l.max();
    let at = |i: usize| {
        let (j, i) = (i % max_k.max(1), i / max_k.max(1));
        let (row, bh) = (i % max_q.max(1), i / max_q.max(1));
        format!("[b {} h {} i {row} j {j}]", bh / h.c.hq, bh % h.c.hq)
    };
    let flips = g.iter().zip(&r).filter(|(a, b)| a.is_sign_negative() != b.is_sign_negative()).count();
    for (i, (&a, &b)) in g.iter().zip(&r).enumerate() {
        if a.is_sign_negative() != b.is_sign_negative() {
            return Err(format!("s_dmask{} = {a:e}, CPU {b:e}: the dropped sets differ ({flips} of {} signs)", at(i), g.len()));
        }
        let bound = (b as f64).abs() * rel + tiny;
        let diff = (a as f64 - b as f64).abs();
        worst = worst.max(diff / bound);
        if !(a.is_finite() && diff <= bound) {
            return Err(format!("s_dmask{} = {a:e}, CPU {b:e} (|diff| {diff:.3e} > {bound:.3e})", at(i)));
        }
    }
    Ok(worst)
}

/// The smallest normal number of `dtype`.
fn min_normal(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 2f64.powi(-14),
        _ => 2f64.powi(-126),
    }
}

/// Per-element magnitudes of the backward's terms (the header's `mag`), from the CPU's probabilities
/// and keep mask (its `s_dmask`), the inputs and the `out` both backwards are given: [dq, dk, dv], each in
/// q's / k's logical layout.
fn magnitudes(h: &Host, s_dmask: &[f32], out: &[f32]) -> [Vec<f64>; 3] {
    let (c, l) = (&h.c, &h.l);
    let (d, hq, hk) = (c.d, c.hq, c.hk);
    let group = hq / hk;
    let (max_q, max_k) = l.max();
    let (cu_q, cu_k, used_q, used_k) = (l.cu_q(), l.cu_k(), l.used_q(), l.used_k());
    let z_keep = 1.0 / (1.0 - c.dropout.p as f64);
    let scale = c.scale();
    let mut mag = [vec![0.0f64; h.q.len()], vec![0.0f64; h.k.len()], vec![0.0f64; h.k.len()]];
    let abs = |x: &[f32]| x.iter().map(|v| (*v as f64).abs()).collect::<Vec<_>>();
    let (aq, ak, av, ad, ao) = (abs(&h.q), abs(&h.k), abs(&h.v), abs(&h.dout), abs(out));
    for b in 0..l.batch() {
        for head in 0..hq {
            let kvh = head / group;
            for i in 0..used_q[b] {
                let qa = ((cu_q[b] + i) * hq + head) * d;
                let d_abs: f64 = (0..d).map(|x| ad[qa + x] * ao[qa + x]).sum();
                for j in 0..used_k[b] {
                    let pv = s_dmask[((b * hq + head) * max_q + i) * max_k + j];
                    let p = (pv as f64).abs();
                    if p == 0.0 {
                        continue;
                    }
                    let z = if pv.is_sign_negative() { 0.0 } else { z_keep };
                    let ka = ((cu_k[b] + j) * hk + kvh) * d;
                    let tanh_d = if c.softcap > 0.0 {
                        let x: f64 = scale * (0..d).map(|x| h.q[qa + x] as f64 * h.k[ka + x] as f64).sum::<f64>();
                        let t = (x / c.softcap as f64).tanh();
                        1.0 - t * t
                    } else {
                        1.0
                    };
                    let dp_abs: f64 = (0..d).map(|x| ad[qa + x] * av[ka + x]).sum();
                    let m = scale.abs() * p * (z * dp_abs + d_abs) * tanh_d;
                    for x in 0..d {
                        mag[0][qa + x] += m * ak[ka + x];
                        mag[1][ka + x] += m * aq[qa + x];
                        mag[2][ka + x] += p * z * ad[qa + x];
                    }
                }
            }
        }
    }
    mag
}

/// CUDA's gradients against the CPU's (both from the same out and LSE) within the header's bound.
/// Returns the worst |diff| / bound of dq, dk, dv.
fn check_grads(h: &Host, got: &BwdOutput, cpu: &BwdOutput, mag: &[Vec<f64>; 3]) -> Result<[f64; 3], String> {
    let c = &h.c;
    let u = unit_roundoff(c.dtype);
    let n = h.l.max().0.max(h.l.max().1) as f64;
    let min_normal = min_normal(c.dtype);
    let amax = (c.amp as f64).max(1.0);
    // f32 arithmetic that flushes subnormals (ex2.approx.ftz, and sums of such terms) loses up to f32's
    // smallest normal per product and per partial sum: ALiBi's large biases make such probabilities.
    let ftz = 2.0 * f64::from(f32::MIN_POSITIVE);
    let tiny = (u * min_normal + ftz) * (1.0 + n * c.scale().abs().max(1.0) * amax) * c.vmax();
    let cf = 2.0 * (2f64.powi(-15) * (1.0 + h.smax()) + 2f64.powi(-23) * (c.d as f64 + n)) + c.tanh_slack();
    let mut worst = [0.0f64; 3];
    for (x, (name, g, r, k)) in [("dq", &got.dq, &cpu.dq, 3.0), ("dk", &got.dk, &cpu.dk, 3.0), ("dv", &got.dv, &cpu.dv, 2.0)].into_iter().enumerate() {
        let (g, r) = (host_f32(g), host_f32(r));
        for (i, (&a, &b)) in g.iter().zip(&r).enumerate() {
            let m = mag[x][i];
            if m == 0.0 {
                if a != 0.0 || b != 0.0 {
                    return Err(format!("{name}[{i}] = {a:e}, CPU {b:e}: no term enters it, both must be exactly 0"));
                }
                continue;
            }
            let bound = u * (b as f64).abs() + tiny + (1.0 + 2.0 * u) * (k * u + cf) * m;
            let diff = (a as f64 - b as f64).abs();
            worst[x] = worst[x].max(diff / bound);
            if !(a.is_finite() && diff <= bound) {
                return Err(format!("{name}[{i}] = {a:e}, CPU {b:e} (|diff| {diff:.3e} > bound {bound:.3e}, magnitude {m:.3e})"));
            }
        }
    }
    Ok(worst)
}

/// The forward family a call with modifiers runs: the warp-specialized `_mods` kernel where the plain
/// call would run the warp-specialized one (the suite's operands are ones the copy engine can address
/// unless strided), else mma.sync `_mods` (the cp.async wgmma forward has no such twin).
fn mods_family(h: &Host, choice: KernelChoice) -> &'static str {
    if dry_run() {
        return "cpu path";
    }
    // From `FWD_WS_WIDE_MIN_KEYS` keys at head dim 192 the wide-tile kernel's copies (one modifier alone).
    let wide = fwd_family_keys(h.c.d, h.c.dtype, choice, h.l.max().1) == "wgmma ws wide";
    match (fwd_family(h.c.d, h.c.dtype, choice), h.c.slopes, h.c.dropout.p > 0.0) {
        (_, Slopes::None, false) => fwd_family(h.c.d, h.c.dtype, choice),
        // ALiBi without dropout: the `_mods` kernel's `_alibi` copy, its dropout compiled out.
        ("wgmma ws", _, false) if wide => "wgmma ws wide _alibi",
        ("wgmma ws", _, false) => "wgmma ws _alibi",
        // Dropout without ALiBi: its `_dropout` copy, the ALiBi code compiled out (none at head dim 96,
        // which runs `_mods`).
        ("wgmma ws", Slopes::None, true) if wide && h.l.max().1 >= FWD_WS_WIDE_DROPOUT_MIN_KEYS => "wgmma ws wide _dropout",
        ("wgmma ws", Slopes::None, true) if h.c.d != 96 => "wgmma ws _dropout",
        ("wgmma ws", _, true) => "wgmma ws _mods",
        _ => "mma.sync _mods",
    }
}

fn fwd_kernel_choices() -> Vec<(&'static str, KernelChoice)> {
    if dry_run() { vec![("default", KernelChoice::default())] } else { fwd_choices() }
}

/// One problem: the CPU forward and backward (the oracle), then CUDA's under every kernel choice. The
/// backward runs when `backward`; both modes (default, deterministic) under their choices.
fn run_case(rng: &mut StdRng, h: &Host, backward: bool, tally: &mut Tally) -> Result<(), String> {
    let d = h.c.d;
    let cpu_on = On::new(h, Device::Cpu, false, rng);
    let cpu = cpu_on.fwd(h, KernelChoice::default()).map_err(|e| format!("CPU forward: {e}"))?;
    let strided = rng.gen_bool(0.3);
    let gpu_on = On::new(h, dev(), strided, rng);
    let mut first: Option<FwdOutput> = None;
    for (name, choice) in fwd_kernel_choices() {
        let fam = mods_family(h, choice);
        let at = |e: String| format!("[{name}: {fam}{}] {e}", if strided { ", strided inputs" } else { "" });
        let got = gpu_on.fwd(h, choice).map_err(|e| at(e.to_string()))?;
        check_fwd(h, &got, &cpu).map_err(|e| at(format!("forward vs CPU: {e}")))?;
        check_probs(h, got.s_dmask.as_ref().unwrap(), cpu.s_dmask.as_ref().unwrap()).map_err(|e| at(format!("f32 s_dmask vs CPU: {e}")))?;
        tally.add(name, fam, d);
        first.get_or_insert(got);
    }
    // Varlen without the max lengths (the grids from cu_seqlens or the mean lengths; no s_dmask).
    if !h.l.dense {
        let got = gpu_on.fwd_as(h, KernelChoice::default(), false).map_err(|e| format!("forward without max lengths: {e}"))?;
        check_fwd(h, &got, &cpu).map_err(|e| format!("forward without max lengths vs CPU: {e}"))?;
        tally.add("forward, no max lengths", mods_family(h, KernelChoice::default()), d);
    }
    // s_dmask in q's dtype, through the raw layer.
    let (_, _, s) = gpu_on.fwd_raw(h, h.c.dtype, KernelChoice::default(), dev()).map_err(|e| format!("raw forward, s_dmask in {}: {e}", h.c.dtype))?;
    check_probs(h, &s, cpu.s_dmask.as_ref().unwrap()).map_err(|e| format!("s_dmask in {} vs CPU: {e}", h.c.dtype))?;
    if !backward {
        return Ok(());
    }
    let f = first.expect("one forward choice at least");
    let (out_host, lse_host) = (f.out.to_device(Device::Cpu).unwrap(), f.lse.to_device(Device::Cpu).unwrap());
    let cpu_g = cpu_on.bwd(h, &out_host, &lse_host, false, KernelChoice::default()).map_err(|e| format!("CPU backward: {e}"))?;
    let mag = magnitudes(h, &host_f32(cpu.s_dmask.as_ref().unwrap()), &host_f32(&out_host));
    let max_k = h.l.max().1;
    for deterministic in [false, true] {
        let choices = if dry_run() { vec![("default", KernelChoice::default())] } else { bwd_choices(d, h.c.dtype, deterministic, max_k) };
        for (name, choice) in choices {
            let fam = if dry_run() { "cpu path" } else { bwd_mods_family(bwd_family(d, h.c.dtype, deterministic, choice, max_k), d) };
            let at = |e: String| format!("[backward {name}: {fam} _mods] {e}");
            let g = gpu_on.bwd(h, &f.out, &f.lse, deterministic, choice).map_err(|e| at(e.to_string()))?;
            check_grads(h, &g, &cpu_g, &mag).map_err(|e| at(format!("vs CPU: {e}")))?;
            tally.add(name, fam, d);
        }
        if !h.l.dense {
            let g = gpu_on.bwd_as(h, &f.out, &f.lse, deterministic, KernelChoice::default(), false).map_err(|e| format!("backward (deterministic {deterministic}) without max lengths: {e}"))?;
            check_grads(h, &g, &cpu_g, &mag).map_err(|e| format!("backward (deterministic {deterministic}) without max lengths vs CPU: {e}"))?;
            tally.add("backward, no max lengths", if deterministic { "deterministic" } else { "default" }, d);
        }
    }
    Ok(())
}

/// A random dropout: p from a few values (0 = off), a seed and an offset of any size (an offset near
/// 2^64 makes the subsequences wrap).
fn random_dropout(rng: &mut StdRng) -> Dropout {
    let p = [0.0f32, 0.1, 0.17, 0.5, 0.9][rng.gen_range(0..5)];
    let seed = match rng.gen_range(0..4) {
        0 => 0,
        1 => u64::MAX,
        _ => rng.r#gen(),
    };
    let offset = match rng.gen_range(0..4) {
        0 => 0,
        1 => u64::MAX - rng.gen_range(0..8),
        _ => rng.gen_range(0..1u64 << 40),
    };
    Dropout { p, seed, offset }
}

fn random_slopes(rng: &mut StdRng) -> Slopes {
    [Slopes::None, Slopes::Heads, Slopes::PerSequence][rng.gen_range(0..3)]
}

const MASKS: [(bool, (i64, i64), f32); 5] = [(false, (-1, -1), 0.0), (true, (-1, -1), 0.0), (false, (37, 5), 0.0), (true, (70, -1), 0.0), (false, (-1, -1), 15.0)];
const HEADS: [(usize, usize); 3] = [(2, 2), (4, 2), (3, 1)];

// ---------------------------------------------------------------------------------------------------
// 1. Forward and backward, dense.

#[test]
fn dense_every_head_dim_dtype_and_mask() {
    require_gpu!();
    let (seed, mut rng) = seeded("dense_every_head_dim_dtype_and_mask");
    let mut tally = Tally::new("gpu_mods::dense_every_head_dim_dtype_and_mask");
    for dtype in [DType::BF16, DType::F16] {
        for d in HEAD_DIMS {
            for (i, &(causal, window, softcap)) in MASKS.iter().enumerate() {
                let (hq, hk) = HEADS[i % 3];
                // Every combination of slopes and dropout turns up over the masks; dropout always on here
                // but for one mask (ALiBi alone).
                let slopes = [Slopes::Heads, Slopes::PerSequence, Slopes::None, Slopes::Heads, Slopes::PerSequence][i];
                let mut dropout = random_dropout(&mut rng);
                if i == 0 {
                    dropout.p = 0.0;
                } else if dropout.p == 0.0 {
                    dropout.p = 0.25;
                }
                let c = Case { dtype, d, hq, hk, causal, window, softcap, slopes, slope_max: [0.05, 0.5][i % 2], dropout, amp: 1.0 };
                for (b, sq, sk) in [(2, 77, 203), (1, 150, 61)] {
                    let h = Host::new(&mut rng, c, Layout::dense(b, sq, sk));
                    run_case(&mut rng, &h, true, &mut tally).unwrap_or_else(|e| panic!("seed {seed}: {}: {e}", h.describe()));
                }
            }
        }
    }
    tally.report();
}

/// Longer sequences (several key blocks per CTA, and chained Hopper grids). With dropout (also at head dim
/// 192 past 2048 keys), and ALiBi alone
/// (on Hopper the ws forward's `_alibi` copy, whose linear form takes the tiles beside the diagonal: both
/// sides of it, windows, every head dim, both dtypes, and softcap's general form).
#[test]
fn dense_long_sequences() {
    require_gpu!();
    let (seed, mut rng) = seeded("dense_long_sequences");
    let mut tally = Tally::new("gpu_mods::dense_long_sequences");
    for (d, causal, dtype) in [(64, true, DType::BF16), (128, false, DType::F16), (128, true, DType::BF16), (256, true, DType::F16)] {
        let dropout = Dropout { p: 0.1, seed: rng.r#gen(), offset: rng.gen_range(0..1 << 20) };
        let c = Case { dtype, d, hq: 4, hk: 2, causal, window: (-1, -1), softcap: 0.0, slopes: Slopes::Heads, slope_max: 0.02, dropout, amp: 1.0 };
        let h = Host::new(&mut rng, c, Layout::dense(1, 700, 900));
        run_case(&mut rng, &h, true, &mut tally).unwrap_or_else(|e| panic!("seed {seed}: {}: {e}", h.describe()));
    }
    // Head dim 192 from `FWD_WS_WIDE_DROPOUT_MIN_KEYS` keys: the wide ws forward's `_dropout` copy
    // (112-key tiles), seven 16-key blocks of dropout's calls (three traded pairs and one block drawn
    // alone), with the tiles' block parity alternating; both dtypes.
    for (dtype, causal) in [(DType::BF16, false), (DType::F16, true)] {
        let dropout = Dropout { p: 0.2, seed: rng.r#gen(), offset: rng.gen_range(0..1 << 20) };
        let c = Case { dtype, d: 192, hq: 2, hk: 1, causal, window: (-1, -1), softcap: 0.0, slopes: Slopes::None, slope_max: 0.02, dropout, amp: 1.0 };
        let h = Host::new(&mut rng, c, Layout::dense(1, 130, FWD_WS_WIDE_DROPOUT_MIN_KEYS + 52));
        run_case(&mut rng, &h, true, &mut tally).unwrap_or_else(|e| panic!("seed {seed}: {}: {e}", h.describe()));
    }
    let no_dropout = Dropout { p: 0.0, seed: 0, offset: 0 };
    for (i, d) in HEAD_DIMS.into_iter().enumerate() {
        for (j, dtype) in [DType::BF16, DType::F16].into_iter().enumerate() {
            let (causal, window, softcap) = [(false, (-1, -1), 0.0), (true, (-1, -1), 0.0), (false, (300, 200), 0.0), (false, (-1, -1), 8.0)][(i + j) % 4];
            let slopes = [Slopes::Heads, Slopes::PerSequence][(i + j) % 2];
            let c = Case { dtype, d, hq: 4, hk: 2, causal, window, softcap, slopes, slope_max: [0.02, 0.1][i % 2], dropout: no_dropout, amp: 1.0 };
            let (sq, sk) = [(700, 900), (900, 700)][j];
            let h = Host::new(&mut rng, c, Layout::dense(2, sq, sk));
            run_case(&mut rng, &h, i % 2 == 0, &mut tally).unwrap_or_else(|e| panic!("seed {seed}: {}: {e}", h.describe()));
        }
    }
    // ALiBi alone with steep slopes, no causal mask: the `_alibi` copies at head dims 96-192 visit a row
    // block's key tiles from its diagonal outwards, with the lazy max (ws.rs `first_tile`, `lazy_max`);
    // the steep bias moves a row's max by far more than the lazy bound where its diagonal is not in the
    // first tile. More keys than queries and fewer (the first tile clamped to the block's first).
    for (i, d) in HEAD_DIMS.into_iter().filter(|&d| d > 64).enumerate() {
        let c = Case { dtype: [DType::BF16, DType::F16][i % 2], d, hq: 4, hk: 2, causal: false, window: (-1, -1), softcap: 0.0, slopes: Slopes::Heads, slope_max: 1.0, dropout: no_dropout, amp: 1.0 };
        for (sq, sk) in [(333, 1000), (1000, 333)] {
            let h = Host::new(&mut rng, c, Layout::dense(1, sq, sk));
            run_case(&mut rng, &h, false, &mut tally).unwrap_or_else(|e| panic!("seed {seed}: {}: {e}", h.describe()));
        }
    }
    // ALiBi alone at head dims 192 and 256 with slopes of both signs (a negative slope's bias grows with
    // the distance): past `FWD_WS_WIDE_MIN_KEYS` keys at head dim 192 the wide-tile kernel's `_alibi`
    // copy (112-key tiles; `mods::alibi_qk_fast`, a loop for each sign), causal or not, both dtypes.
    for (i, (d, sk)) in [(192, FWD_WS_WIDE_MIN_KEYS + 52), (192, 900), (256, 900)].into_iter().enumerate() {
        for (j, slope_max) in [0.1f32, -0.02].into_iter().enumerate() {
            let (dtype, causal) = ([DType::BF16, DType::F16][(i + j) % 2], j == i % 2);
            let c = Case { dtype, d, hq: 4, hk: 2, causal, window: (-1, -1), softcap: 0.0, slopes: [Slopes::Heads, Slopes::PerSequence][j], slope_max, dropout: no_dropout, amp: 1.0 };
            let h = Host::new(&mut rng, c, Layout::dense(2, 150, sk));
            run_case(&mut rng, &h, false, &mut tally).unwrap_or_else(|e| panic!("seed {seed}: {}: {e}", h.describe()));
        }
    }
    tally.report();
}

// ---------------------------------------------------------------------------------------------------
// 2. Varlen: random packed layouts with seqused padding, empty slots and tail rows.

#[test]
fn varlen_random_layouts() {
    require_gpu!();
    let (seed, mut rng) = seeded("varlen_random_layouts");
    let mut tally = Tally::new("gpu_mods::varlen_random_layouts");
    let iters = if dry_run() { 12 } else { 60 };
    for iter in 0..iters {
        let dtype = if rng.gen_bool(0.5) { DType::BF16 } else { DType::F16 };
        let d = HEAD_DIMS[rng.gen_range(0..HEAD_DIMS.len())];
        let (hq, hk) = [(1, 1), (2, 2), (4, 2), (4, 1), (6, 3)][rng.gen_range(0..5)];
        let side = |rng: &mut StdRng| if rng.gen_bool(0.5) { -1 } else { rng.gen_range(0..150) };
        let (causal, window) = (rng.gen_bool(0.4), (side(&mut rng), side(&mut rng)));
        let softcap = if rng.gen_bool(0.2) { 8.0 } else { 0.0 };
        let mut slopes = random_slopes(&mut rng);
        let dropout = random_dropout(&mut rng);
        if slopes == Slopes::None && dropout.p == 0.0 {
            slopes = Slopes::PerSequence;
        }
        let c = Case { dtype, d, hq, hk, causal, window, softcap, slopes, slope_max: [0.01, 0.1, 1.0][rng.gen_range(0..3)], dropout, amp: [0.5, 1.0][rng.gen_range(0..2)] };
        let b = rng.gen_range(1..5);
        let maxlen = if rng.gen_bool(0.3) { 300 } else { 90 };
        let l = Layout::random(&mut rng, b, maxlen);
        let h = Host::new(&mut rng, c, l);
        let backward = rng.gen_bool(0.6);
        run_case(&mut rng, &h, backward, &mut tally).unwrap_or_else(|e| panic!("seed {seed} iter {iter}: {}: {e}", h.describe()));
    }
    tally.report();
}

// ---------------------------------------------------------------------------------------------------
// 3. The dropout mask, bit for bit, in the forward and dK/dV kernels (the header).

/// Rows of `[rows, heads, d]` with row r of every head the unit vector e_((r - first(r)) mod d) (r counted
/// within its sequence, `cu` and `used` giving the sequences); rows of no sequence 0.
fn unit_rows(cu: &[usize], used: &[usize], rows: usize, heads: usize, d: usize) -> Vec<f32> {
    let mut x = vec![0.0f32; rows * heads * d];
    for b in 0..used.len() {
        for r in 0..used[b] {
            for hh in 0..heads {
                x[((cu[b] + r) * heads + hh) * d + r % d] = 1.0;
            }
        }
    }
    x
}

/// The zero set of `x` (as bits, bitwise comparable).
fn zeros(x: &[f32]) -> Vec<bool> {
    x.iter().map(|&v| v == 0.0).collect()
}

#[test]
fn dropout_mask_is_the_cpu_mask_bit_for_bit() {
    require_gpu!();
    let (seed, mut rng) = seeded("dropout_mask_is_the_cpu_mask_bit_for_bit");
    let mut tally = Tally::new("gpu_mods::dropout_mask_is_the_cpu_mask_bit_for_bit");
    let mut case = 0;
    // `wide`: head dim 192 past `FWD_WS_WIDE_DROPOUT_MIN_KEYS` keys (the wide ws forward's `_dropout`
    // copy; 700 queries, so the last ~900 keys), a window of D keys per row: every key a row sees in a
    // column of its own (`unit_rows`: key j in column j mod D).
    for (d, wide) in [(64, false), (128, false), (256, false), (192, true)] {
        for dtype in [DType::BF16, DType::F16] {
            for p in if wide { &[0.5f32][..] } else { &[0.1f32, 0.5, 0.9][..] } {
                let p = *p;
                case += 1;
                let (hq, hk) = if case % 3 == 0 { (4, 2) } else { (2, 2) };
                let dropout = Dropout { p, seed: if case % 4 == 1 { u64::MAX - case as u64 } else { rng.r#gen() }, offset: if case % 5 == 2 { u64::MAX - 1 } else { rng.gen_range(0..1 << 30) } };
                // Small scores (no kept probability underflows), every key of a sequence below D.
                let (causal, window, slopes) = if wide { (false, (d as i64 / 2 - 1, d as i64 / 2), Slopes::None) } else { (case % 2 == 0, (-1, -1), [Slopes::None, Slopes::Heads, Slopes::PerSequence][case % 3]) };
                let c = Case { dtype, d, hq, hk, causal, window, softcap: 0.0, slopes, slope_max: 0.005, dropout, amp: 0.25 };
                let l = if wide {
                    Layout::dense(1, 700, FWD_WS_WIDE_DROPOUT_MIN_KEYS + 52)
                } else if case % 2 == 0 {
                    Layout::dense(2, d.min(100), d)
                } else {
                    let len = |rng: &mut StdRng| rng.gen_range(0..=d);
                    let b = 3;
                    let slots_q: Vec<usize> = (0..b).map(|_| len(&mut rng)).collect();
                    let slots_k: Vec<usize> = (0..b).map(|_| len(&mut rng)).collect();
                    let used_k = slots_k.iter().map(|&s| rng.gen_range(0..=s)).collect();
                    Layout { dense: false, slots_q, slots_k, used_q: None, used_k: Some(used_k), tail: (3, 5) }
                };
                let mut h = Host::new(&mut rng, c, l);
                let (tq, tk) = h.l.rows();
                h.v = unit_rows(&h.l.cu_k(), &h.l.used_k(), tk, hk, d);
                h.dout = unit_rows(&h.l.cu_q(), &h.l.used_q(), tq, hq, d);
                let ctx = format!("seed {seed}: {}", h.describe());
                let cpu_on = On::new(&h, Device::Cpu, false, &mut rng);
                let cpu = cpu_on.fwd(&h, KernelChoice::default()).unwrap_or_else(|e| panic!("{ctx}: CPU: {e}"));
                let gpu_on = On::new(&h, dev(), false, &mut rng);
                let cpu_out = host_f32(&cpu.out);
                // The oracle's own consistency: out_i[j] = 0 iff s_dmask drops or hides (i, j).
                let cpu_probs = host_f32(cpu.s_dmask.as_ref().unwrap());
                let dropped = cpu_probs.iter().filter(|v| v.is_sign_negative()).count();
                let visible = cpu_probs.iter().filter(|v| **v != 0.0 || v.is_sign_negative()).count();
                assert!(dropped > 0 || visible < 50, "{ctx}: the CPU dropped none of {visible} scores at p {p}");
                for (name, choice) in fwd_kernel_choices() {
                    let fam = mods_family(&h, choice);
                    let got = gpu_on.fwd(&h, choice).unwrap_or_else(|e| panic!("{ctx} [{name}: {fam}]: {e}"));
                    let gout = host_f32(&got.out);
                    if zeros(&gout) != zeros(&cpu_out) {
                        let i = gout.iter().zip(&cpu_out).position(|(a, b)| (*a == 0.0) != (*b == 0.0)).unwrap();
                        panic!("{ctx} [{name}: {fam}]: forward: out[{i}] = {:e}, CPU {:e}: the kernel's dropout mask differs from the CPU's", gout[i], cpu_out[i]);
                    }
                    check_probs(&h, got.s_dmask.as_ref().unwrap(), cpu.s_dmask.as_ref().unwrap()).unwrap_or_else(|e| panic!("{ctx} [{name}: {fam}]: {e}"));
                    tally.add(name, fam, d);
                    if name != "default" {
                        continue;
                    }
                    // dv: the dK/dV kernels' mask.
                    let (oh, lh) = (got.out.to_device(Device::Cpu).unwrap(), got.lse.to_device(Device::Cpu).unwrap());
                    let cpu_g = cpu_on.bwd(&h, &oh, &lh, false, KernelChoice::default()).unwrap_or_else(|e| panic!("{ctx}: CPU backward: {e}"));
                    let cpu_dv = host_f32(&cpu_g.dv);
                    let max_k = h.l.max().1;
                    for deterministic in [false, true] {
                        let choices = if dry_run() { vec![("default", KernelChoice::default())] } else { bwd_choices(d, dtype, deterministic, max_k) };
                        for (bname, bchoice) in choices {
                            let bfam = if dry_run() { "cpu path" } else { bwd_mods_family(bwd_family(d, dtype, deterministic, bchoice, max_k), d) };
                            let g = gpu_on.bwd(&h, &got.out, &got.lse, deterministic, bchoice).unwrap_or_else(|e| panic!("{ctx} [backward {bname}: {bfam}]: {e}"));
                            let gdv = host_f32(&g.dv);
                            if zeros(&gdv) != zeros(&cpu_dv) {
                                let i = gdv.iter().zip(&cpu_dv).position(|(a, b)| (*a == 0.0) != (*b == 0.0)).unwrap();
                                panic!("{ctx} [backward {bname}: {bfam}]: dv[{i}] = {:e}, CPU {:e}: the kernel's dropout mask differs from the CPU's", gdv[i], cpu_dv[i]);
                            }
                            tally.add(bname, bfam, d);
                        }
                    }
                }
            }
        }
    }
    tally.report();
}

// ---------------------------------------------------------------------------------------------------
// 4. Bitwise reproducibility: the same call twice (forward, deterministic backward) gives the same bits.

#[test]
fn deterministic_runs_are_bitwise_identical() {
    require_gpu!();
    let (seed, mut rng) = seeded("deterministic_runs_are_bitwise_identical");
    let mut tally = Tally::new("gpu_mods::deterministic_runs_are_bitwise_identical");
    // 192 and 256: the ordered `_mods_det` twins on Hopper (one accumulator, the adds in turn).
    for (d, dtype) in [(64, DType::BF16), (128, DType::F16), (96, DType::BF16), (192, DType::F16), (256, DType::BF16)] {
        let dropout = Dropout { p: 0.3, seed: rng.r#gen(), offset: rng.r#gen() };
        let c = Case { dtype, d, hq: 4, hk: 1, causal: true, window: (-1, -1), softcap: 0.0, slopes: Slopes::PerSequence, slope_max: 0.1, dropout, amp: 1.0 };
        // A layout where the masks matter: at least 256 (query, key) pairs that see each other (causal,
        // bottom-right: a sequence with sq <= sk rows sees at least sq * sk / 2), so that another mask
        // changing no output is out of reach (random layouts have all-empty batches a few % of the time).
        let l = loop {
            let l = Layout::random(&mut rng, 3, 200);
            let seen: usize = l.used_q().iter().zip(l.used_k()).map(|(&q, k)| if q <= k { q * k / 2 } else { k * (k + 1) / 2 }).sum();
            if seen >= 256 {
                break l;
            }
        };
        let h = Host::new(&mut rng, c, l);
        let ctx = format!("seed {seed}: {}", h.describe());
        let on = On::new(&h, dev(), false, &mut rng);
        let bits = |t: &Tensor| t.to_bytes().unwrap();
        let f1 = on.fwd(&h, KernelChoice::default()).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        let f2 = on.fwd(&h, KernelChoice::default()).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert!(bits(&f1.out) == bits(&f2.out) && bits(&f1.lse) == bits(&f2.lse), "{ctx}: forward not reproducible");
        assert!(bits(f1.s_dmask.as_ref().unwrap()) == bits(f2.s_dmask.as_ref().unwrap()), "{ctx}: s_dmask not reproducible");
        let g1 = on.bwd(&h, &f1.out, &f1.lse, true, KernelChoice::default()).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        let g2 = on.bwd(&h, &f1.out, &f1.lse, true, KernelChoice::default()).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        for (name, a, b) in [("dq", &g1.dq, &g2.dq), ("dk", &g1.dk, &g2.dk), ("dv", &g1.dv, &g2.dv)] {
            assert!(bits(a) == bits(b), "{ctx}: deterministic {name} not reproducible");
        }
        // Another offset draws another mask.
        let other = Host { c: Case { dropout: Dropout { offset: dropout.offset.wrapping_add(h.l.batch() as u64 * 4), ..dropout }, ..c }, l: h.l.clone(), q: h.q.clone(), k: h.k.clone(), v: h.v.clone(), dout: h.dout.clone(), slopes: h.slopes.clone() };
        let f3 = on.fwd(&other, KernelChoice::default()).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert!(bits(&f3.out) != bits(&f1.out), "{ctx}: offset + B * Hq drew the same mask");
        tally.add("default", if dry_run() { "cpu path" } else { bwd_mods_family(bwd_family(d, dtype, true, KernelChoice::default(), h.l.max().1), d) }, d);
    }
    tally.report();
}

// ---------------------------------------------------------------------------------------------------
// 5. The paged forward with the modifiers (the `_paged_mods` kernels) against the CPU paged path.

/// The paged family: the warp-specialized paged kernel takes page sizes that are multiples of 8
/// (dispatch.rs `fwd_ws_launch`), the cp.async wgmma paged kernel the others on Hopper.
fn paged_family(d: usize, dtype: DType, choice: KernelChoice, page: usize) -> &'static str {
    if dry_run() {
        return "cpu path";
    }
    match fwd_family(d, dtype, choice) {
        "wgmma ws" if !page.is_multiple_of(8) => "wgmma paged",
        "wgmma ws" => "wgmma ws paged",
        "wgmma" => "wgmma paged",
        _ => "mma.sync paged",
    }
}

#[test]
fn paged_forward_matches_cpu_paged_path() {
    require_gpu!();
    let (seed, mut rng) = seeded("paged_forward_matches_cpu_paged_path");
    let mut tally = Tally::new("gpu_mods::paged_forward_matches_cpu_paged_path");
    for (n, &page) in [1usize, 3, 16, 64, 256].iter().enumerate() {
        for d in [64, 128, 256, 32] {
            let (causal, window, softcap) = MASKS[(n + d / 32) % MASKS.len()];
            let (hq, hk) = HEADS[n % 3];
            let dtype = if (n + d) % 2 == 0 { DType::BF16 } else { DType::F16 };
            let mut dropout = random_dropout(&mut rng);
            if dropout.p == 0.0 {
                dropout.p = 0.2;
            }
            let c = Case { dtype, d, hq, hk, causal, window, softcap, slopes: [Slopes::Heads, Slopes::PerSequence][n % 2], slope_max: 0.1, dropout, amp: 1.0 };
            // Sequences (q rows, keys); key counts from seqused_k.
            let seqs: Vec<(usize, usize)> = (0..3).map(|_| (rng.gen_range(1..=120), rng.gen_range(0..=300))).collect();
            let l = Layout { dense: false, slots_q: seqs.iter().map(|s| s.0).collect(), slots_k: seqs.iter().map(|s| s.1).collect(), used_q: None, used_k: None, tail: (2, 0) };
            let h = Host::new(&mut rng, c, l);
            let ctx = format!("seed {seed}: page {page}: {}", h.describe());
            // Pages: each sequence's keys in pages scattered over a pool with spare blocks.
            let max_blocks = seqs.iter().map(|s| s.1.div_ceil(page)).max().unwrap().max(1);
            let blocks = seqs.len() * max_blocks + 5;
            let mut order: Vec<usize> = (0..blocks).collect();
            order.shuffle(&mut rng);
            let row = hk * d;
            let mut kp = random_values(&mut rng, blocks * page * row, 1.0, dtype);
            let mut vp = random_values(&mut rng, blocks * page * row, 1.0, dtype);
            let mut table = vec![0i32; seqs.len() * max_blocks];
            let cu_k = h.l.cu_k();
            for (b, &(_, lk)) in seqs.iter().enumerate() {
                for blk in 0..max_blocks {
                    let phys = order[b * max_blocks + blk];
                    table[b * max_blocks + blk] = phys as i32;
                    for r in 0..page {
                        let t = blk * page + r;
                        if t < lk {
                            let (src, dst) = ((cu_k[b] + t) * row, (phys * page + r) * row);
                            kp[dst..dst + row].copy_from_slice(&h.k[src..src + row]);
                            vp[dst..dst + row].copy_from_slice(&h.v[src..src + row]);
                        }
                    }
                }
            }
            let (tq, _) = h.l.rows();
            let keys: Vec<usize> = seqs.iter().map(|s| s.1).collect();
            let run = |device: Device, kernels: KernelChoice| -> flash_attn::Result<FwdOutput> {
                let t = |x: &[f32], shape: &[usize], dt: DType| Tensor::from_f32(x, shape, dt).unwrap().to_device(device).unwrap();
                let shape = [blocks, page, hk, d];
                let (q, kpt, vpt) = (t(&h.q, &[tq, hq, d], dtype), t(&kp, &shape, dtype), t(&vp, &shape, dtype));
                let slopes = t(&h.slopes, &h.slopes_shape(), DType::F32);
                let (cu_q, used_k) = (i32_tensor_on(&h.l.cu_q(), device), i32_tensor_on(&keys, device));
                let table_t = Tensor::from_i32(table.clone(), &[seqs.len(), max_blocks]).unwrap().to_device(device).unwrap();
                let paged = PagedVarlen { cu_seqlens_q: &cu_q, cu_seqlens_k: None, max_seqlen_q: Some(h.l.max().0), max_seqlen_k: Some(h.l.max().1), seqused_q: None, seqused_k: Some(&used_k), block_table: &table_t };
                varlen_fwd_paged_with(&q, &kpt, &vpt, &paged, &Extras { alibi_slopes: Some(&slopes), return_attn_probs: true }, &c.opts(kernels))
            };
            let cpu = run(Device::Cpu, KernelChoice::default()).unwrap_or_else(|e| panic!("{ctx}: CPU paged path: {e}"));
            for (name, choice) in fwd_kernel_choices() {
                let fam = paged_family(d, dtype, choice, page);
                let got = run(dev(), choice).unwrap_or_else(|e| panic!("{ctx} [{name}: {fam}]: {e}"));
                check_fwd(&h, &got, &cpu).unwrap_or_else(|e| panic!("{ctx} [{name}: {fam}]: vs the CPU paged path: {e}"));
                check_probs(&h, got.s_dmask.as_ref().unwrap(), cpu.s_dmask.as_ref().unwrap()).unwrap_or_else(|e| panic!("{ctx} [{name}: {fam}]: {e}"));
                tally.add(name, fam, d);
            }
        }
    }
    tally.report();
}

// ---------------------------------------------------------------------------------------------------
// 6. s_dmask: every element written (padding, hidden keys) and nothing outside it.

/// Bit pattern no computation produces (a NaN with a payload).
const CANARY: u32 = 0x7fc0_1234;

#[test]
fn probs_write_exactly_s_dmask() {
    require_gpu!();
    let (seed, mut rng) = seeded("probs_write_exactly_s_dmask");
    let mut tally = Tally::new("gpu_mods::probs_write_exactly_s_dmask");
    for (d, dtype) in [(64, DType::BF16), (128, DType::F16)] {
        let dropout = Dropout { p: 0.2, seed: rng.r#gen(), offset: 0 };
        let c = Case { dtype, d, hq: 3, hk: 1, causal: true, window: (-1, -1), softcap: 0.0, slopes: Slopes::Heads, slope_max: 0.1, dropout, amp: 1.0 };
        // An empty slot, seqused padding, a sequence with no key, tail rows.
        let l = Layout { dense: false, slots_q: vec![70, 0, 140, 30], slots_k: vec![60, 40, 200, 20], used_q: Some(vec![50, 0, 140, 30]), used_k: Some(vec![40, 33, 170, 0]), tail: (7, 5) };
        let h = Host::new(&mut rng, c, l);
        let ctx = format!("seed {seed}: {}", h.describe());
        let on = On::new(&h, dev(), false, &mut rng);
        let (max_q, max_k) = h.l.max();
        let (b, hq) = (h.l.batch(), c.hq);
        // s_dmask as a view with padded rows inside a canary-filled buffer.
        let pitch = max_k + 3;
        let n = 16 + b * hq * max_q * pitch + 16;
        let bytes: Vec<u8> = (0..n).flat_map(|_| CANARY.to_le_bytes()).collect();
        let flat = Tensor::from_bytes(&bytes, &[n], DType::F32).unwrap().to_device(dev()).unwrap();
        let mut s = flat.as_strided(&[b, hq, max_q, max_k], &[hq * max_q * pitch, max_q * pitch, pitch, 1], 16).unwrap();
        let (tq, _) = h.l.rows();
        let mut out = Tensor::zeros(&h.l.q_shape(&c), dtype, dev()).unwrap();
        let mut lse = Tensor::zeros(&[hq, tq], DType::F32, dev()).unwrap();
        let target = match dev() {
            Device::Cpu => Target::Cpu,
            Device::Cuda(ordinal) => Target::Cuda { ordinal, stream: 0 },
        };
        {
            let t = FwdViews { q: on.q.view(), k: on.k.view(), v: on.v.view(), out: out.view_mut(), lse: lse.view_mut(), alibi_slopes: on.slopes.as_ref().map(Tensor::view), s_dmask: Some(s.view_mut()) };
            // Safety: every view is of a live tensor on the device.
            unsafe { raw::varlen_fwd(&t, &on.varlen(&h.l).unwrap().views(), &c.opts(KernelChoice::default()), target) }.unwrap_or_else(|e| panic!("{ctx}: {e}"));
        }
        // (Read through `s`: on the CPU a view owns its copy of the storage.)
        let all = s.as_strided(&[n], &[1], 0).unwrap().to_bytes().unwrap();
        let word = |i: usize| u32::from_le_bytes(all[i * 4..i * 4 + 4].try_into().unwrap());
        let (used_q, used_k) = (h.l.used_q(), h.l.used_k());
        for i in 0..n {
            let inside = i >= 16 && i < n - 16 && (i - 16) % pitch < max_k;
            if !inside {
                assert_eq!(word(i), CANARY, "{ctx}: element {i} outside s_dmask written");
                continue;
            }
            let e = i - 16;
            let (j, row, bh) = (e % pitch, (e / pitch) % max_q, e / pitch / max_q);
            let x = f32::from_bits(word(i));
            assert!(word(i) != CANARY && x.is_finite(), "{ctx}: s_dmask[b {} h {} i {row} j {j}] not written", bh / hq, bh % hq);
            if row >= used_q[bh / hq] || j >= used_k[bh / hq] {
                assert_eq!(word(i), 0, "{ctx}: s_dmask[b {} h {} i {row} j {j}] outside the sequence must be +0, got {x:e}", bh / hq, bh % hq);
            }
        }
        // The values of that view: the CPU's.
        let cpu = On::new(&h, Device::Cpu, false, &mut rng).fwd(&h, KernelChoice::default()).unwrap_or_else(|e| panic!("{ctx}: CPU: {e}"));
        check_probs(&h, &s, cpu.s_dmask.as_ref().unwrap()).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        tally.add("default", mods_family(&h, KernelChoice::default()), d);
    }
    tally.report();
}
