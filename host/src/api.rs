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

fn run(problem: &crate::problem::Problem, q: &Tensor, k: &Tensor, v: &Tensor, varlen: Option<&Varlen<'_>>) -> Result<FwdOutput> {
    match problem.device {
        Device::Cpu => crate::cpu::fwd(problem, q, k, v),
        Device::Cuda(_) => crate::cuda::fwd(problem, q, k, v, varlen),
    }
}
