//! The CPU path: flash-attention's tiled forward in plain Rust (the backward is in bwd.rs). Each work
//! item is one query tile of one (sequence, head); it walks the key tiles its rows can see, keeping a
//! running row max, sum and f32 accumulator (online softmax), and writes out = acc / sum and
//! lse = max + ln(sum).
//!
//! Tiles start at each sequence's row 0 and every row's arithmetic depends only on its own sequence, so a
//! packed varlen batch gives bitwise the same result as one call per sequence.

mod bwd;
mod mask;
mod seqlen;
mod tile;

pub use bwd::bwd;

use crate::api::FwdOutput;
use crate::error::{Error, Result};
use crate::problem::Problem;
use crate::tensor::{CpuData, DType, Tensor};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use seqlen::SeqInfo;

/// Query rows per work item and keys per tile.
pub(crate) const BLOCK_M: usize = 64;
pub(crate) const BLOCK_N: usize = 64;

/// Forward pass on host tensors described by a validated `Problem`.
pub fn fwd(p: &Problem, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<FwdOutput> {
    let (qd, kd, vd) = (host("q", q)?, host("k", k)?, host("v", v)?);
    let (seqs, lse_head_stride) = seqlen::sequences(p)?;
    let d = p.head_dim;
    let group = p.hq / p.hk;

    let items: Vec<(usize, usize, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(b, s)| (0..p.hq).flat_map(move |h| (0..s.seqlen_q.div_ceil(BLOCK_M)).map(move |m| (b, h, m))))
        .collect();
    let tiles: Vec<tile::TileOut> = items
        .par_iter()
        .map(|&(b, h, m_block)| {
            let operands = tile::Operands { q: qd, k: kd, v: vd, q_head: h * p.q.head, k_head: (h / group) * p.k.head, v_head: (h / group) * p.v.head };
            tile::attend(p, &operands, &seqs[b], m_block)
        })
        .collect();

    // Rows no tile covers (varlen padding past seqused_q or cu_seqlens_q[B]) stay out 0, LSE -inf.
    let mut out = vec![0.0f32; p.total_q * p.hq * d];
    let mut lse = vec![f32::NEG_INFINITY; p.hq * p.total_q];
    for (&(b, h, m_block), t) in items.iter().zip(&tiles) {
        let s: &SeqInfo = &seqs[b];
        let i0 = m_block * BLOCK_M;
        for (r, (o_row, &l)) in t.out.chunks_exact(d).zip(&t.lse).enumerate() {
            let row = s.out_row0 + i0 + r;
            out[(row * p.hq + h) * d..][..d].copy_from_slice(o_row);
            lse[s.lse_base + h * lse_head_stride + i0 + r] = l;
        }
    }

    let out = to_dtype(&out, &p.out_shape(), p.dtype)?;
    Ok(FwdOutput { out, lse: Tensor::from_f32(&lse, &p.lse_shape(), DType::F32)? })
}

/// A contiguous f16/bf16 tensor from f32 values, rounded to nearest once.
fn to_dtype(x: &[f32], shape: &[usize], dtype: DType) -> Result<Tensor> {
    match dtype {
        DType::F16 => {
            let mut o = vec![half::f16::ZERO; x.len()];
            o.convert_from_f32_slice(x);
            Tensor::from_f16(o, shape)
        }
        DType::BF16 => {
            let mut o = vec![half::bf16::ZERO; x.len()];
            o.convert_from_f32_slice(x);
            Tensor::from_bf16(o, shape)
        }
        other => Err(Error::DType { arg: "q", got: other.to_string(), expected: "f16 or bf16" }),
    }
}

fn host<'a>(arg: &'static str, t: &'a Tensor) -> Result<&'a CpuData> {
    t.cpu_data().ok_or_else(|| Error::DeviceMismatch { arg, got: t.device().to_string(), expected: "cpu".into() })
}

/// Rows `first, first + stride, ..` (n of them, each `d` contiguous elements) of `data`, widened to f32
/// into `dst` (`n * d` long).
fn load_rows(data: &CpuData, first: usize, stride: usize, n: usize, d: usize, dst: &mut [f32]) {
    for (r, row) in dst.chunks_exact_mut(d).take(n).enumerate() {
        let at = first + r * stride;
        match data {
            CpuData::F16(x) => x[at..at + d].convert_to_f32_slice(row),
            CpuData::BF16(x) => x[at..at + d].convert_to_f32_slice(row),
            CpuData::F32(x) => row.copy_from_slice(&x[at..at + d]),
            CpuData::I32(x) => row.iter_mut().zip(&x[at..at + d]).for_each(|(o, &i)| *o = i as f32),
        }
    }
}
