//! Every argument check, before anything runs: each failure is a typed `Error` naming the argument. The
//! result is a `Problem` in canonical form (causal folded into the window, default scale filled in,
//! strides copied out), so neither the CPU path nor the kernels re-check anything.
//!
//! Sizes are checked in u128 so that no combination of shapes and strides can overflow (or panic) here.

use crate::error::{Error, Result};
use crate::problem::{BwdProblem, HostSeqlens, Problem, Strides};
use crate::types::{AttnOptions, BwdViews, DType, FwdViews, VarlenViews, View, Workspace};
use crate::HEAD_DIMS;

const I32_MAX: u128 = i32::MAX as u128;
const I64_MAX: u128 = i64::MAX as u128;

/// Checks q, k, v (and the varlen lengths) against each other and `opts`, and returns the canonical problem.
pub fn validate_fwd(q: &View<'_>, k: &View<'_>, v: &View<'_>, varlen: Option<&VarlenViews<'_>>, opts: &AttnOptions) -> Result<Problem> {
    check_dtypes(q, k, v)?;
    for (arg, t) in [("q", q), ("k", k), ("v", v)] {
        check_strides_len(arg, t)?;
    }

    let rank = if varlen.is_some() { 3 } else { 4 };
    for (arg, t) in [("q", q), ("k", k), ("v", v)] {
        if t.rank() != rank {
            return Err(Error::Rank { arg, got: t.rank(), expected: rank });
        }
    }
    if k.shape != v.shape {
        return Err(Error::Shape { arg: "v", msg: format!("shape {:?} must equal k's shape {:?}", v.shape, k.shape) });
    }
    // Trailing dims are [.., S, H, D] in both layouts.
    let (qs, ks) = (q.shape, k.shape);
    let (hq, d) = (qs[rank - 2], qs[rank - 1]);
    let hk = ks[rank - 2];
    if ks[rank - 1] != d {
        return Err(Error::Shape { arg: "k", msg: format!("head dim {} must equal q's head dim {d}", ks[rank - 1]) });
    }
    if varlen.is_none() && ks[0] != qs[0] {
        return Err(Error::Shape { arg: "k", msg: format!("batch size {} must equal q's batch size {}", ks[0], qs[0]) });
    }
    if !HEAD_DIMS.contains(&d) {
        return Err(Error::HeadDim { got: d });
    }
    if hk == 0 || hq % hk != 0 {
        return Err(Error::Heads { hq, hk });
    }
    for (arg, t) in [("q", q), ("k", k), ("v", v)] {
        if t.strides[rank - 1] != 1 {
            return Err(Error::NotContiguous { arg });
        }
    }

    // Varlen structure: B comes from cu_seqlens; lengths must be int32 vectors of matching size.
    let (batch, seqlen_q, seqlen_k, total_q, total_k) = match varlen {
        None => {
            let total_q = checked_rows("q", qs[0], qs[1])?;
            let total_k = checked_rows("k", ks[0], ks[1])?;
            (qs[0], qs[1], ks[1], total_q, total_k)
        }
        Some(vl) => {
            let batch = check_varlen_structure(vl)?;
            (batch, vl.max_seqlen_q, vl.max_seqlen_k, qs[0], ks[0])
        }
    };
    check_options(opts)?;

    // Everything the kernels index with i32 (rows, heads, sequences) and i64 (element offsets).
    fits_i32("q", "batch size", batch)?;
    fits_i32("q", "num_heads", hq)?;
    fits_i32("k", "num_heads_k", hk)?;
    fits_i32(if varlen.is_some() { "max_seqlen_q" } else { "q" }, "seqlen_q", seqlen_q)?;
    fits_i32(if varlen.is_some() { "max_seqlen_k" } else { "k" }, "seqlen_k", seqlen_k)?;
    fits_i32("q", "total query rows", total_q)?;
    fits_i32("k", "total key rows", total_k)?;
    for (arg, t) in [("q", q), ("k", k), ("v", v)] {
        check_extent(arg, t)?;
    }
    let out_elems = total_q as u128 * hq as u128 * d as u128;
    if out_elems > I64_MAX || out_elems > usize::MAX as u128 {
        return Err(Error::TooLarge { arg: "q", msg: format!("the output would have {out_elems} elements, more than i64 can index") });
    }

    // Canonical mask: causal is window (left, 0); a bound that can never bind becomes -1 (unbounded).
    // Row i of a (sq, sk) sequence sees j >= i + sk - sq - left for all i iff left >= sk - 1, and
    // j <= i + sk - sq + right for all j < sk iff right >= sq - 1; the totals bound every varlen length.
    let (bound_q, bound_k) = if varlen.is_some() { (total_q, total_k) } else { (seqlen_q, seqlen_k) };
    let (mut window_left, mut window_right) = opts.window;
    if opts.causal {
        window_right = 0;
    }
    if window_left >= 0 && window_left as u64 >= bound_k as u64 {
        window_left = -1;
    }
    if window_right >= 0 && window_right as u64 >= bound_q as u64 {
        window_right = -1;
    }

    let strides = |t: &View<'_>| operand_strides(t, varlen.is_some());
    Ok(Problem {
        dtype: q.dtype,
        batch,
        hq,
        hk,
        head_dim: d,
        varlen: varlen.is_some(),
        seqlen_q,
        seqlen_k,
        total_q,
        total_k,
        window_left,
        window_right,
        scale: opts.softmax_scale.unwrap_or(1.0 / (d as f32).sqrt()),
        softcap: opts.softcap,
        q: strides(q),
        k: strides(k),
        v: strides(v),
        has_seqused_q: varlen.is_some_and(|vl| vl.seqused_q.is_some()),
        has_seqused_k: varlen.is_some_and(|vl| vl.seqused_k.is_some()),
        seqlens: None,
    })
}

/// Checks the backward's arguments: q, k, v and the varlen lengths exactly as `validate_fwd` does, then
/// `dout` and `out` (q's dtype and device, the forward output's shape, head dim contiguous) and `lse`
/// (f32 on q's device, the forward's LSE shape `[B, Hq, Sq]` or `[Hq, Tq]`, contiguous as the forward
/// writes it).
#[allow(clippy::too_many_arguments)]
pub fn validate_bwd(dout: &View<'_>, q: &View<'_>, k: &View<'_>, v: &View<'_>, out: &View<'_>, lse: &View<'_>, varlen: Option<&VarlenViews<'_>>, opts: &AttnOptions) -> Result<BwdProblem> {
    let fwd = validate_fwd(q, k, v, varlen, opts)?;
    let out_shape = fwd.out_shape();
    check_like("dout", dout, q.dtype, &out_shape, false)?;
    check_like("out", out, q.dtype, &out_shape, false)?;
    check_like("lse", lse, DType::F32, &fwd.lse_shape(), true)?;
    let varlen = varlen.is_some();
    Ok(BwdProblem { dout: operand_strides(dout, varlen), out: operand_strides(out, varlen), fwd })
}

/// A tensor handed in beside q (dout, out, lse, or an output to write into): of `dtype`, of exactly
/// `shape`, head dim contiguous, or wholly contiguous with `contiguous`, and addressable with i64 offsets.
pub fn check_like(arg: &'static str, t: &View<'_>, dtype: DType, shape: &[usize], contiguous: bool) -> Result<()> {
    check_strides_len(arg, t)?;
    if t.dtype != dtype {
        return Err(match dtype {
            DType::F32 => Error::DType { arg, got: t.dtype.to_string(), expected: "f32" },
            _ => Error::DTypeMismatch { arg, got: t.dtype.to_string(), expected: format!("q's dtype {dtype}") },
        });
    }
    if t.rank() != shape.len() {
        return Err(Error::Rank { arg, got: t.rank(), expected: shape.len() });
    }
    if t.shape != shape {
        return Err(Error::Shape { arg, msg: format!("shape {:?} must be {shape:?} (from q's shape)", t.shape) });
    }
    if contiguous && !is_contiguous(t) {
        return Err(Error::Shape { arg, msg: "must be contiguous".into() });
    }
    if !shape.is_empty() && t.strides[shape.len() - 1] != 1 {
        return Err(Error::NotContiguous { arg });
    }
    check_extent(arg, t)
}

/// Whether the view is row-major contiguous (dimensions of extent 1, and empty views, may have any
/// strides).
pub fn is_contiguous(t: &View<'_>) -> bool {
    if t.numel() == 0 {
        return true;
    }
    let mut expected = 1usize;
    for (&n, &s) in t.shape.iter().zip(t.strides).rev() {
        if n != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(n);
    }
    true
}

/// One stride per dimension, and the address aligned to the element size (on every target: host slices
/// need it too).
fn check_strides_len(arg: &'static str, t: &View<'_>) -> Result<()> {
    if t.strides.len() != t.shape.len() {
        return Err(Error::Shape { arg, msg: format!("{} strides for {} dimensions", t.strides.len(), t.shape.len()) });
    }
    if !t.addr.is_multiple_of(t.dtype.size() as u64) {
        return Err(Error::Value { arg, msg: format!("address {:#x} is not aligned to its {}-byte elements", t.addr, t.dtype.size()) });
    }
    Ok(())
}

/// Strides of a `[B, S, H, D]` (or varlen `[T, H, D]`) operand, head dim contiguous.
fn operand_strides(t: &View<'_>, varlen: bool) -> Strides {
    let s = t.strides;
    if varlen { Strides { batch: 0, row: s[0], head: s[1] } } else { Strides { batch: s[0], row: s[1], head: s[2] } }
}

/// The forward's outputs: out like q's output shape in q's dtype, lse contiguous f32; neither may
/// overlap an input or the other.
pub fn check_fwd_outputs(p: &Problem, t: &FwdViews<'_>, varlen: Option<&VarlenViews<'_>>) -> Result<()> {
    check_like("out", &t.out, p.dtype, &p.out_shape(), false)?;
    check_like("lse", &t.lse, DType::F32, &p.lse_shape(), true)?;
    let inputs = [("q", &t.q), ("k", &t.k), ("v", &t.v)];
    check_no_alias(&[("out", &t.out), ("lse", &t.lse)], &inputs, varlen)
}

/// The backward's outputs: dq like q, dk and dv like k, in q's dtype; none may overlap an input or
/// another output.
pub fn check_bwd_outputs(bp: &BwdProblem, t: &BwdViews<'_>, varlen: Option<&VarlenViews<'_>>) -> Result<()> {
    let p = &bp.fwd;
    check_like("dq", &t.dq, p.dtype, &p.out_shape(), false)?;
    check_like("dk", &t.dk, p.dtype, &p.kv_shape(), false)?;
    check_like("dv", &t.dv, p.dtype, &p.kv_shape(), false)?;
    let inputs = [("dout", &t.dout), ("q", &t.q), ("k", &t.k), ("v", &t.v), ("out", &t.out), ("lse", &t.lse)];
    check_no_alias(&[("dq", &t.dq), ("dk", &t.dk), ("dv", &t.dv)], &inputs, varlen)
}

/// No output shares an element with an input (varlen lengths included) or with another output.
fn check_no_alias(outputs: &[(&'static str, &View<'_>)], inputs: &[(&'static str, &View<'_>)], varlen: Option<&VarlenViews<'_>>) -> Result<()> {
    let lens = varlen.map(|vl| [Some(("cu_seqlens_q", vl.cu_seqlens_q)), Some(("cu_seqlens_k", vl.cu_seqlens_k)), vl.seqused_q.map(|t| ("seqused_q", t)), vl.seqused_k.map(|t| ("seqused_k", t))]);
    for (i, &(arg, o)) in outputs.iter().enumerate() {
        let others = inputs.iter().copied().chain(outputs[i + 1..].iter().copied());
        let lens = lens.iter().flatten().flatten().map(|(a, t)| (*a, t));
        for (other, t) in others.chain(lens) {
            if crate::alias::overlap(o, t) {
                return Err(Error::Value { arg, msg: format!("overlaps {other}: an output may not alias an input or another output") });
            }
        }
    }
    Ok(())
}

/// The backward's workspace: at least `needed` bytes, 256-byte aligned, overlapping no tensor.
pub fn check_workspace(ws: &Workspace, needed: usize, t: &BwdViews<'_>) -> Result<()> {
    if ws.bytes < needed {
        return Err(Error::Value { arg: "workspace", msg: format!("{} bytes is less than the {needed} bytes needed (bwd_workspace_bytes)", ws.bytes) });
    }
    if !ws.addr.is_multiple_of(256) {
        return Err(Error::Value { arg: "workspace", msg: format!("address {:#x} must be 256-byte aligned", ws.addr) });
    }
    // The workspace as 4-byte words (all its sections are f32).
    let shape = [ws.bytes.div_ceil(4)];
    let w = View { addr: ws.addr, dtype: DType::I32, shape: &shape, strides: &[1] };
    for (arg, v) in [("dout", &t.dout), ("q", &t.q), ("k", &t.k), ("v", &t.v), ("out", &t.out), ("lse", &t.lse), ("dq", &t.dq), ("dk", &t.dk), ("dv", &t.dv)] {
        if crate::alias::overlap(&w, v) {
            return Err(Error::Value { arg: "workspace", msg: format!("overlaps {arg}") });
        }
    }
    Ok(())
}

/// The kernels copy rows with 16-byte `cp.async`: on CUDA every view starts 16-byte aligned and every
/// stride but the last (of a dimension longer than 1) is a multiple of 16 bytes.
pub fn check_cuda_rows(views: &[(&'static str, &View<'_>)]) -> Result<()> {
    for &(arg, t) in views {
        let size = t.dtype.size() as u64;
        let rank = t.rank();
        let bad = !t.addr.is_multiple_of(16) || t.strides[..rank.saturating_sub(1)].iter().zip(t.shape).any(|(&s, &n)| n > 1 && !(s as u64 * size).is_multiple_of(16));
        if bad {
            return Err(Error::Value { arg, msg: "on CUDA every row must be 16-byte aligned: the address and strides must be multiples of 16 bytes (8 elements of f16/bf16)".into() });
        }
    }
    Ok(())
}

/// Grid y walks heads and z sequences: both are limited to 65535 by CUDA.
pub fn check_grid(grid: (u32, u32, u32)) -> Result<()> {
    for (arg, n) in [("num_heads", grid.1), ("batch", grid.2)] {
        if n > 65535 {
            return Err(Error::TooLarge { arg, msg: format!("{n} exceeds the CUDA grid limit of 65535") });
        }
    }
    Ok(())
}

/// Checks the contents of the varlen lengths (host copies): the check `validate_fwd` cannot make for
/// device memory. `total_q`/`total_k` are the row counts of q and k.
pub fn check_varlen_contents(seqlens: HostSeqlens, max_seqlen_q: usize, max_seqlen_k: usize, total_q: usize, total_k: usize) -> Result<HostSeqlens> {
    let len_q = seqlens.cu_seqlens_q.len();
    if len_q == 0 {
        return Err(Error::Shape { arg: "cu_seqlens_q", msg: "must have B+1 >= 1 entries, got 0".into() });
    }
    let batch = len_q - 1;
    if seqlens.cu_seqlens_k.len() != len_q {
        return Err(Error::Shape { arg: "cu_seqlens_k", msg: format!("has {} entries but cu_seqlens_q has {len_q}", seqlens.cu_seqlens_k.len()) });
    }
    for (arg, used) in [("seqused_q", &seqlens.seqused_q), ("seqused_k", &seqlens.seqused_k)] {
        if let Some(u) = used
            && u.len() != batch
        {
            return Err(Error::Shape { arg, msg: format!("has {} entries, expected B = {batch} (cu_seqlens has {len_q})", u.len()) });
        }
    }
    let side = |cu_arg, cu: &[i32], used_arg, used: Option<&[i32]>, max_arg, max_seqlen: usize, total: usize| -> Result<()> {
        check_cu_seqlens(cu_arg, cu, total)?;
        for b in 0..batch {
            let slot = i64::from(cu[b + 1]) - i64::from(cu[b]);
            let len = match used {
                Some(u) if u[b] < 0 || i64::from(u[b]) > slot => {
                    return Err(Error::SeqLens { arg: used_arg, msg: format!("entry {b} is {}, outside 0..={slot} (the length of slot {b} in {cu_arg})", u[b]) });
                }
                Some(u) => i64::from(u[b]),
                None => slot,
            };
            if len as u64 > max_seqlen as u64 {
                return Err(Error::SeqLens { arg: max_arg, msg: format!("{max_seqlen} is below the length {len} of sequence {b}") });
            }
        }
        Ok(())
    };
    side("cu_seqlens_q", &seqlens.cu_seqlens_q, "seqused_q", seqlens.seqused_q.as_deref(), "max_seqlen_q", max_seqlen_q, total_q)?;
    side("cu_seqlens_k", &seqlens.cu_seqlens_k, "seqused_k", seqlens.seqused_k.as_deref(), "max_seqlen_k", max_seqlen_k, total_k)?;
    Ok(seqlens)
}

fn check_dtypes(q: &View<'_>, k: &View<'_>, v: &View<'_>) -> Result<()> {
    if !matches!(q.dtype, DType::F16 | DType::BF16) {
        return Err(Error::DType { arg: "q", got: q.dtype.to_string(), expected: "f16 or bf16" });
    }
    for (arg, t) in [("k", k), ("v", v)] {
        if t.dtype != q.dtype {
            return Err(Error::DTypeMismatch { arg, got: t.dtype.to_string(), expected: format!("q's dtype {}", q.dtype) });
        }
    }
    Ok(())
}

/// Dtype, rank and length of the varlen tensors; returns the number of sequences B.
fn check_varlen_structure(vl: &VarlenViews<'_>) -> Result<usize> {
    let vector = |arg: &'static str, t: &View<'_>| -> Result<usize> {
        check_strides_len(arg, t)?;
        if t.dtype != DType::I32 {
            return Err(Error::DType { arg, got: t.dtype.to_string(), expected: "i32" });
        }
        if t.rank() != 1 {
            return Err(Error::Rank { arg, got: t.rank(), expected: 1 });
        }
        // The kernels read these as plain int32 arrays.
        if t.shape[0] > 1 && t.strides[0] != 1 {
            return Err(Error::NotContiguous { arg });
        }
        if !t.addr.is_multiple_of(4) {
            return Err(Error::Value { arg, msg: "must be 4-byte aligned".into() });
        }
        Ok(t.shape[0])
    };
    let len_q = vector("cu_seqlens_q", &vl.cu_seqlens_q)?;
    let len_k = vector("cu_seqlens_k", &vl.cu_seqlens_k)?;
    if len_q == 0 {
        return Err(Error::Shape { arg: "cu_seqlens_q", msg: "must have B+1 >= 1 entries, got 0".into() });
    }
    if len_k != len_q {
        return Err(Error::Shape { arg: "cu_seqlens_k", msg: format!("has {len_k} entries but cu_seqlens_q has {len_q}") });
    }
    let batch = len_q - 1;
    for (arg, t) in [("seqused_q", vl.seqused_q), ("seqused_k", vl.seqused_k)] {
        if let Some(t) = t {
            let n = vector(arg, &t)?;
            if n != batch {
                return Err(Error::Shape { arg, msg: format!("has {n} entries, expected B = {batch} (cu_seqlens has {len_q})") });
            }
        }
    }
    Ok(batch)
}

fn check_cu_seqlens(arg: &'static str, cu: &[i32], total: usize) -> Result<()> {
    if cu[0] != 0 {
        return Err(Error::SeqLens { arg, msg: format!("must start at 0, starts at {}", cu[0]) });
    }
    if let Some(b) = (1..cu.len()).find(|&b| cu[b] < cu[b - 1]) {
        return Err(Error::SeqLens { arg, msg: format!("must be non-decreasing, but entry {b} ({}) < entry {} ({})", cu[b], b - 1, cu[b - 1]) });
    }
    let last = cu[cu.len() - 1];
    if last as u64 > total as u64 {
        let of = if arg.ends_with('q') { "q" } else { "k" };
        return Err(Error::SeqLens { arg, msg: format!("last entry {last} exceeds the {total} rows of {of}") });
    }
    Ok(())
}

fn check_options(opts: &AttnOptions) -> Result<()> {
    if let Some(s) = opts.softmax_scale
        && !s.is_finite()
    {
        return Err(Error::Value { arg: "softmax_scale", msg: format!("must be finite, got {s}") });
    }
    if !(opts.softcap.is_finite() && opts.softcap >= 0.0) {
        return Err(Error::Value { arg: "softcap", msg: format!("must be finite and >= 0 (0 = off), got {}", opts.softcap) });
    }
    let (left, right) = opts.window;
    for (side, w) in [("left", left), ("right", right)] {
        if w < -1 {
            return Err(Error::Value { arg: "window", msg: format!("{side} value {w} must be >= -1 (-1 = unbounded)") });
        }
    }
    Ok(())
}

fn checked_rows(arg: &'static str, batch: usize, seqlen: usize) -> Result<usize> {
    let rows = batch as u128 * seqlen as u128;
    if rows > I32_MAX {
        return Err(Error::TooLarge { arg, msg: format!("{batch} x {seqlen} rows exceed the i32 row index") });
    }
    Ok(rows as usize)
}

fn fits_i32(arg: &'static str, what: &str, n: usize) -> Result<()> {
    if n as u128 > I32_MAX {
        return Err(Error::TooLarge { arg, msg: format!("{what} {n} exceeds the i32 range") });
    }
    Ok(())
}

/// The largest element offset the view reaches, and every stride, must fit i64.
fn check_extent(arg: &'static str, t: &View<'_>) -> Result<()> {
    if let Some(s) = t.strides.iter().find(|&&s| s as u128 > I64_MAX) {
        return Err(Error::TooLarge { arg, msg: format!("stride {s} exceeds the i64 range") });
    }
    if t.shape.contains(&0) {
        return Ok(());
    }
    let last = t.shape.iter().zip(t.strides).fold(0u128, |acc, (&n, &s)| acc.saturating_add((n as u128 - 1).saturating_mul(s as u128)));
    // Byte addresses of the whole view must not wrap either.
    if last > I64_MAX || (t.addr as u128).saturating_add(last.saturating_mul(t.dtype.size() as u128)) > u64::MAX as u128 {
        return Err(Error::TooLarge { arg, msg: format!("element offset {last} exceeds the i64 range") });
    }
    Ok(())
}
