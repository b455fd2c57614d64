//! The public entry points. Each validates everything first (validate.rs), then runs on the device the
//! inputs live on: the CPU path (cpu/) or the fused CUDA kernels (cuda.rs).

use crate::error::Result;
use crate::tensor::{Device, Tensor};

/// Options shared by every entry point, with flash-attn 2's meaning.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnOptions {
    /// Multiplies q.k; `None` = 1/sqrt(head_dim).
    pub softmax_scale: Option<f32>,
    /// Causal mask aligned to the bottom-right corner: query i sees key j iff j <= i + Sk - Sq.
    pub causal: bool,
    /// Sliding window `(left, right)`, inclusive, around the same diagonal; -1 = unbounded.
    pub window: (i64, i64),
    /// Soft-capping of the scores: `softcap * tanh(s / softcap)`; 0 = off.
    pub softcap: f32,
}

impl Default for AttnOptions {
    fn default() -> Self {
        AttnOptions { softmax_scale: None, causal: false, window: (-1, -1), softcap: 0.0 }
    }
}

/// Packed-sequence layout for the varlen entry points.
#[derive(Clone, Copy, Debug)]
pub struct Varlen<'a> {
    /// int32 `[B+1]`: sequence b's queries are rows `cu_seqlens_q[b]..cu_seqlens_q[b+1]` of q.
    pub cu_seqlens_q: &'a Tensor,
    /// int32 `[B+1]`: sequence b's keys are rows `cu_seqlens_k[b]..cu_seqlens_k[b+1]` of k and v.
    pub cu_seqlens_k: &'a Tensor,
    /// At least every (used) query length.
    pub max_seqlen_q: usize,
    /// At least every (used) key length.
    pub max_seqlen_k: usize,
    /// int32 `[B]`: only the first `seqused_q[b]` rows of slot b are real; the rest are written as 0.
    pub seqused_q: Option<&'a Tensor>,
    /// int32 `[B]`: only the first `seqused_k[b]` keys of slot b are attended to.
    pub seqused_k: Option<&'a Tensor>,
}

/// Attention output in the input dtype and the f32 row log-sum-exp (natural log; -inf for empty rows).
#[derive(Clone, Debug)]
pub struct FwdOutput {
    /// `[B, Sq, Hq, D]`, or `[Tq, Hq, D]` for varlen.
    pub out: Tensor,
    /// `[B, Hq, Sq]`, or `[Hq, Tq]` for varlen.
    pub lse: Tensor,
}

/// Dense forward: q `[B, Sq, Hq, D]`, k and v `[B, Sk, Hk, D]`.
pub fn fwd(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttnOptions) -> Result<FwdOutput> {
    let problem = crate::validate::validate_fwd(q, k, v, None, opts)?;
    run(&problem, q, k, v, None)
}

/// Packed forward: q `[Tq, Hq, D]`, k and v `[Tk, Hk, D]`, sequences given by `varlen`.
pub fn varlen_fwd(q: &Tensor, k: &Tensor, v: &Tensor, varlen: &Varlen<'_>, opts: &AttnOptions) -> Result<FwdOutput> {
    let problem = crate::validate::validate_fwd(q, k, v, Some(varlen), opts)?;
    run(&problem, q, k, v, Some(varlen))
}

/// Dense forward into caller-provided outputs: `out` `[B, Sq, Hq, D]` in q's dtype (any row/head/batch
/// strides, last dim contiguous) and `lse` contiguous f32 `[B, Hq, Sq]`, on q's device. Nothing outside
/// the two views is written.
pub fn fwd_into(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttnOptions, out: &mut Tensor, lse: &mut Tensor) -> Result<()> {
    let problem = crate::validate::validate_fwd(q, k, v, None, opts)?;
    run_into(&problem, q, k, v, None, out, lse)
}

/// Packed forward into caller-provided outputs: `out` `[Tq, Hq, D]`, `lse` contiguous f32 `[Hq, Tq]`.
/// With static shapes (graph capture), every row of both is written, padding included.
pub fn varlen_fwd_into(q: &Tensor, k: &Tensor, v: &Tensor, varlen: &Varlen<'_>, opts: &AttnOptions, out: &mut Tensor, lse: &mut Tensor) -> Result<()> {
    let problem = crate::validate::validate_fwd(q, k, v, Some(varlen), opts)?;
    run_into(&problem, q, k, v, Some(varlen), out, lse)
}

fn run_into(problem: &crate::problem::Problem, q: &Tensor, k: &Tensor, v: &Tensor, varlen: Option<&Varlen<'_>>, out: &mut Tensor, lse: &mut Tensor) -> Result<()> {
    crate::validate::check_like("out", out, problem.device, problem.dtype, &problem.out_shape(), false)?;
    crate::validate::check_like("lse", lse, problem.device, crate::DType::F32, &problem.lse_shape(), true)?;
    match problem.device {
        Device::Cpu => {
            let r = crate::cpu::fwd(problem, q, k, v)?;
            out.copy_from(&r.out)?;
            lse.copy_from(&r.lse)
        }
        Device::Cuda(_) => crate::cuda::fwd_into(problem, q, k, v, varlen, out, lse),
    }
}

fn run(problem: &crate::problem::Problem, q: &Tensor, k: &Tensor, v: &Tensor, varlen: Option<&Varlen<'_>>) -> Result<FwdOutput> {
    match problem.device {
        Device::Cpu => crate::cpu::fwd(problem, q, k, v),
        Device::Cuda(_) => crate::cuda::fwd(problem, q, k, v, varlen),
    }
}

/// Gradients of the loss with respect to q, k and v: contiguous, in the input dtype, with q's, k's and
/// v's shapes.
#[derive(Clone, Debug)]
pub struct BwdOutput {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
}

/// Dense backward: the gradients of q, k, v given `dout` (the gradient of `out`) and the forward's `out`
/// and `lse` (both as `fwd` returned them, for the same `opts`). dout and out are `[B, Sq, Hq, D]` in q's
/// dtype (head dim contiguous); lse is contiguous f32 `[B, Hq, Sq]`.
///
/// `deterministic` asks for bitwise-reproducible gradients. The CPU path always is: every gradient
/// element is one sequential f32 sum in a fixed order, whatever the number of threads.
#[allow(clippy::too_many_arguments)]
pub fn bwd(dout: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, lse: &Tensor, opts: &AttnOptions, deterministic: bool) -> Result<BwdOutput> {
    let problem = crate::validate::validate_bwd(dout, q, k, v, out, lse, None, opts)?;
    run_bwd(&problem, dout, q, k, v, out, lse, None, deterministic)
}

/// Packed backward: dout and out `[Tq, Hq, D]`, lse `[Hq, Tq]`, sequences given by `varlen` as in
/// `varlen_fwd`. Rows of no sequence (seqused padding, tail rows) get dq = 0, and keys past a sequence's
/// used length get dk = dv = 0.
#[allow(clippy::too_many_arguments)]
pub fn varlen_bwd(dout: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, lse: &Tensor, varlen: &Varlen<'_>, opts: &AttnOptions, deterministic: bool) -> Result<BwdOutput> {
    let problem = crate::validate::validate_bwd(dout, q, k, v, out, lse, Some(varlen), opts)?;
    run_bwd(&problem, dout, q, k, v, out, lse, Some(varlen), deterministic)
}

#[allow(clippy::too_many_arguments)]
fn run_bwd(problem: &crate::problem::BwdProblem, dout: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, lse: &Tensor, varlen: Option<&Varlen<'_>>, deterministic: bool) -> Result<BwdOutput> {
    match problem.fwd.device {
        // Deterministic by construction (see cpu/bwd.rs), so the flag changes nothing here.
        Device::Cpu => crate::cpu::bwd(problem, dout, q, k, v, out, lse),
        Device::Cuda(_) => crate::cuda::bwd(problem, dout, q, k, v, out, lse, varlen, deterministic),
    }
}
