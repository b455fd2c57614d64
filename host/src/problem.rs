//! The validated, canonical description of one attention call: what `validate` produces and both the CPU
//! and CUDA paths consume. Nothing downstream re-checks arguments.

use crate::types::DType;

/// Row/head/batch strides of one `[.., S, H, D]` operand in elements (the head dim is contiguous).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Strides {
    pub batch: usize,
    pub row: usize,
    pub head: usize,
}

/// Host copies of the varlen length tensors (present whenever they were host tensors, or when the caller
/// asked for device copies to be checked).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct HostSeqlens {
    pub cu_seqlens_q: Vec<i32>,
    pub cu_seqlens_k: Vec<i32>,
    pub seqused_q: Option<Vec<i32>>,
    pub seqused_k: Option<Vec<i32>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub dtype: DType,
    /// Number of sequences.
    pub batch: usize,
    pub hq: usize,
    pub hk: usize,
    pub head_dim: usize,
    pub varlen: bool,
    /// Dense: rows per sequence. Varlen: max_seqlen_q / max_seqlen_k.
    pub seqlen_q: usize,
    pub seqlen_k: usize,
    /// Rows of the q (and out) buffer and of the k/v buffers: B*S dense, T varlen.
    pub total_q: usize,
    pub total_k: usize,
    /// Canonical mask: inclusive window around the bottom-right diagonal, -1 = unbounded; causal is (-1, 0).
    pub window_left: i64,
    pub window_right: i64,
    /// Softmax scale applied to q.k (default 1/sqrt(D)).
    pub scale: f32,
    /// 0 = off; else scores are softcap * tanh(scale * q.k / softcap).
    pub softcap: f32,
    pub q: Strides,
    pub k: Strides,
    pub v: Strides,
    pub has_seqused_q: bool,
    pub has_seqused_k: bool,
    /// Varlen lengths on the host: filled in (and checked) on the CPU path, never on CUDA.
    pub seqlens: Option<HostSeqlens>,
}

/// A shape of rank <= 4 without allocating (the CUDA path allocates nothing per call).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    dims: [usize; 4],
    rank: usize,
}

impl Dims {
    pub fn new(d: &[usize]) -> Dims {
        let mut dims = [0; 4];
        dims[..d.len()].copy_from_slice(d);
        Dims { dims, rank: d.len() }
    }
}

impl std::ops::Deref for Dims {
    type Target = [usize];
    fn deref(&self) -> &[usize] {
        &self.dims[..self.rank]
    }
}

impl Problem {
    /// Output shape: `[B, Sq, Hq, D]`, or `[Tq, Hq, D]` for varlen.
    pub fn out_shape(&self) -> Dims {
        if self.varlen { Dims::new(&[self.total_q, self.hq, self.head_dim]) } else { Dims::new(&[self.batch, self.seqlen_q, self.hq, self.head_dim]) }
    }
    /// LSE shape: `[B, Hq, Sq]`, or `[Hq, Tq]` for varlen.
    pub fn lse_shape(&self) -> Dims {
        if self.varlen { Dims::new(&[self.hq, self.total_q]) } else { Dims::new(&[self.batch, self.hq, self.seqlen_q]) }
    }
    /// Shape of k and v (and of dk, dv): `[B, Sk, Hk, D]`, or `[Tk, Hk, D]` for varlen.
    pub fn kv_shape(&self) -> Dims {
        if self.varlen { Dims::new(&[self.total_k, self.hk, self.head_dim]) } else { Dims::new(&[self.batch, self.seqlen_k, self.hk, self.head_dim]) }
    }
    /// (batch, head) strides of the contiguous LSE.
    pub fn lse_strides(&self) -> (usize, usize) {
        if self.varlen { (0, self.total_q) } else { (self.hq * self.seqlen_q, self.seqlen_q) }
    }
}

/// A validated backward call: the forward's problem, plus where `dout` and `out` (both of the output's
/// shape) live. The LSE is contiguous f32 of `fwd.lse_shape()`.
#[derive(Clone, Debug, PartialEq)]
pub struct BwdProblem {
    pub fwd: Problem,
    pub dout: Strides,
    pub out: Strides,
}
