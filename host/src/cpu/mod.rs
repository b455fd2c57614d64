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

use crate::error::{Error, Result};
use crate::problem::{BwdProblem, HostSeqlens, Problem};
use crate::types::{BwdViews, DType, FwdViews, VarlenViews, View};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;
use seqlen::SeqInfo;

/// Query rows per work item and keys per tile.
pub(crate) const BLOCK_M: usize = 64;
pub(crate) const BLOCK_N: usize = 64;

/// Host memory of one input, typed so reads need no casts: its elements from the view's first one to
/// its last (indices are strides from there).
#[derive(Clone, Copy, Debug)]
pub(crate) enum HostSlice<'a> {
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    F32(&'a [f32]),
}

/// The view's elements as a host slice.
///
/// # Safety
/// The view must be valid host memory for reads over its whole span, unchanged while the slice lives.
unsafe fn host_slice<'a>(arg: &'static str, t: &View<'_>) -> Result<HostSlice<'a>> {
    let span = t.span().ok_or_else(|| Error::TooLarge { arg, msg: "the view's span exceeds usize".into() })?;
    // A dangling but aligned pointer for empty views, which from_raw_parts requires to be non-null.
    let ptr = |align: usize| if span == 0 { align as *const u8 } else { t.addr as *const u8 };
    unsafe {
        Ok(match t.dtype {
            DType::F16 => HostSlice::F16(std::slice::from_raw_parts(ptr(2) as *const f16, span)),
            DType::BF16 => HostSlice::BF16(std::slice::from_raw_parts(ptr(2) as *const bf16, span)),
            DType::F32 => HostSlice::F32(std::slice::from_raw_parts(ptr(4) as *const f32, span)),
            DType::I32 => return Err(Error::DType { arg, got: "i32".into(), expected: "f16, bf16 or f32" }),
        })
    }
}

/// Host copies of the varlen lengths (checked by the caller).
///
/// # Safety
/// The views must be valid host memory (their structure already validated: contiguous int32 vectors).
pub(crate) unsafe fn host_seqlens(vl: &VarlenViews<'_>) -> HostSeqlens {
    let read = |t: &View<'_>| -> Vec<i32> { if t.shape[0] == 0 { Vec::new() } else { unsafe { std::slice::from_raw_parts(t.addr as *const i32, t.shape[0]).to_vec() } } };
    HostSeqlens { cu_seqlens_q: read(&vl.cu_seqlens_q), cu_seqlens_k: read(&vl.cu_seqlens_k), seqused_q: vl.seqused_q.as_ref().map(read), seqused_k: vl.seqused_k.as_ref().map(read) }
}

/// Write `values` (row-major over the view's shape) into a view whose last dimension is contiguous,
/// rounding to its dtype once.
///
/// # Safety
/// The view must be valid host memory for writes over its whole span, aliasing nothing being read.
unsafe fn scatter(t: &View<'_>, values: &[f32]) {
    let rank = t.rank();
    let n = t.numel();
    if n == 0 {
        return;
    }
    let last = t.shape[rank - 1];
    for (r, src) in values.chunks_exact(last).enumerate() {
        let (mut lin, mut off) = (r, 0usize);
        for d in (0..rank - 1).rev() {
            off += (lin % t.shape[d]) * t.strides[d];
            lin /= t.shape[d];
        }
        let at = t.addr as usize + off * t.dtype.size();
        unsafe {
            match t.dtype {
                DType::F16 => std::slice::from_raw_parts_mut(at as *mut f16, last).convert_from_f32_slice(src),
                DType::BF16 => std::slice::from_raw_parts_mut(at as *mut bf16, last).convert_from_f32_slice(src),
                DType::F32 => std::slice::from_raw_parts_mut(at as *mut f32, last).copy_from_slice(src),
                DType::I32 => unreachable!("validated outputs are f16, bf16 or f32"),
            }
        }
    }
}

/// The forward on host memory, into the caller's out and lse.
///
/// # Safety
/// As `raw::fwd` on `Target::Cpu`; `p.seqlens` is filled in for varlen.
pub(crate) unsafe fn fwd_into(p: &Problem, t: &FwdViews<'_>) -> Result<()> {
    let (q, k, v) = unsafe { (host_slice("q", &t.q)?, host_slice("k", &t.k)?, host_slice("v", &t.v)?) };
    let (out, lse) = fwd(p, q, k, v)?;
    unsafe {
        scatter(&t.out, &out);
        scatter(&t.lse, &lse);
    }
    Ok(())
}

/// The backward on host memory, into the caller's dq, dk, dv.
///
/// # Safety
/// As `raw::bwd` on `Target::Cpu`; `bp.fwd.seqlens` is filled in for varlen.
pub(crate) unsafe fn bwd_into(bp: &BwdProblem, t: &BwdViews<'_>) -> Result<()> {
    let [dout, q, k, v, out] = unsafe { [host_slice("dout", &t.dout)?, host_slice("q", &t.q)?, host_slice("k", &t.k)?, host_slice("v", &t.v)?, host_slice("out", &t.out)?] };
    let HostSlice::F32(lse) = (unsafe { host_slice("lse", &t.lse)? }) else { unreachable!("validated lse is f32") };
    let [dq, dk, dv] = bwd::bwd(bp, dout, q, k, v, out, lse)?;
    unsafe {
        scatter(&t.dq, &dq);
        scatter(&t.dk, &dk);
        scatter(&t.dv, &dv);
    }
    Ok(())
}

/// Forward pass on host memory described by a validated `Problem`: out (f32, contiguous `out_shape`)
/// and lse (contiguous `lse_shape`).
fn fwd(p: &Problem, qd: HostSlice<'_>, kd: HostSlice<'_>, vd: HostSlice<'_>) -> Result<(Vec<f32>, Vec<f32>)> {
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
    Ok((out, lse))
}

/// Rows `first, first + stride, ..` (n of them, each `d` contiguous elements) of `data`, widened to f32
/// into `dst` (`n * d` long).
fn load_rows(data: HostSlice<'_>, first: usize, stride: usize, n: usize, d: usize, dst: &mut [f32]) {
    for (r, row) in dst.chunks_exact_mut(d).take(n).enumerate() {
        let at = first + r * stride;
        match data {
            HostSlice::F16(x) => x[at..at + d].convert_to_f32_slice(row),
            HostSlice::BF16(x) => x[at..at + d].convert_to_f32_slice(row),
            HostSlice::F32(x) => row.copy_from_slice(&x[at..at + d]),
        }
    }
}
