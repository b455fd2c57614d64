//! The CUDA path: device buffers, and the launch of the fused forward kernel for a validated problem.

use crate::api::Varlen;
use crate::dispatch::{bwd_launches, fwd_launch};
use crate::error::{Error, Result};
use crate::module::{gpu, Gpu};
use crate::params::{BwdParams, FwdParams};
use crate::problem::{BwdProblem, Problem};
use crate::tensor::{Storage, Tensor};
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Whether a CUDA driver and at least one GPU are present (never panics without libcuda).
pub fn available() -> bool {
    crate::module::cuda_available()
}

/// Device memory shared by the tensors viewing it. All work is ordered on the device's one stream.
#[derive(Clone)]
pub struct DeviceBuffer {
    slice: Arc<CudaSlice<u8>>,
    len: usize,
    gpu: Arc<Gpu>,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer(cuda:{}, {} bytes)", self.ordinal(), self.len)
    }
}

impl DeviceBuffer {
    /// `n` zero bytes on device `ordinal`.
    pub fn zeros(ordinal: usize, n: usize) -> Result<Self> {
        let gpu = gpu(ordinal)?;
        let slice = gpu.stream.alloc_zeros::<u8>(n.max(16))?;
        Ok(DeviceBuffer { slice: Arc::new(slice), len: n, gpu })
    }
    /// `n` bytes whose contents the caller will overwrite entirely (kernel outputs).
    pub(crate) fn uninit(ordinal: usize, n: usize) -> Result<Self> {
        let gpu = gpu(ordinal)?;
        let slice = unsafe { gpu.stream.alloc::<u8>(n.max(16))? };
        Ok(DeviceBuffer { slice: Arc::new(slice), len: n, gpu })
    }
    /// A device copy of `bytes`.
    pub fn from_host(ordinal: usize, bytes: &[u8]) -> Result<Self> {
        let gpu = gpu(ordinal)?;
        let mut slice = gpu.stream.alloc_zeros::<u8>(bytes.len().max(16))?;
        if !bytes.is_empty() {
            gpu.stream.memcpy_htod(bytes, &mut slice.slice_mut(..bytes.len()))?;
        }
        Ok(DeviceBuffer { slice: Arc::new(slice), len: bytes.len(), gpu })
    }
    pub fn ordinal(&self) -> usize {
        self.gpu.ctx.ordinal()
    }
    pub fn len_bytes(&self) -> usize {
        self.len
    }
    /// The bytes, copied to the host (waits for all work queued before).
    pub fn to_host(&self) -> Result<Vec<u8>> {
        let mut v = self.gpu.stream.clone_dtoh(&*self.slice)?;
        v.truncate(self.len);
        Ok(v)
    }
    /// Device address of byte 0.
    pub(crate) fn ptr(&self) -> u64 {
        let (p, _sync) = self.slice.device_ptr(&self.gpu.stream);
        p
    }
}

/// Device address of a tensor's first element.
fn addr(t: &Tensor) -> Result<u64> {
    match &t.storage {
        Storage::Cuda(b) => Ok(b.ptr() + (t.offset() * t.dtype().size()) as u64),
        Storage::Cpu(_) => Err(Error::Cuda("internal: host tensor on the CUDA path".into())),
    }
}

/// The CUDA device a tensor lives on.
fn cuda_ordinal(t: &Tensor) -> Result<usize> {
    match t.device() {
        crate::Device::Cuda(o) => Ok(o),
        crate::Device::Cpu => Err(Error::Cuda("internal: host tensor on the CUDA path".into())),
    }
}

/// Optional tensor -> address or 0.
fn opt_addr(t: Option<&Tensor>) -> Result<u64> {
    t.map(addr).transpose().map(|a| a.unwrap_or(0))
}

/// The kernels copy rows with 16-byte `cp.async`: every row of q/k/v/out must start 16-byte aligned.
fn check_aligned(arg: &'static str, t: &Tensor) -> Result<()> {
    let rank = t.rank();
    let bad = !t.offset().is_multiple_of(8) || t.strides()[..rank.saturating_sub(1)].iter().zip(t.shape()).any(|(&s, &n)| n > 1 && !s.is_multiple_of(8));
    if bad {
        return Err(Error::Value { arg, msg: "on CUDA every row must be 16-byte aligned: offset and strides must be multiples of 8 elements".into() });
    }
    Ok(())
}

/// Grid y walks heads and z sequences: both are limited to 65535 by CUDA.
fn check_grid(grid: (u32, u32, u32)) -> Result<()> {
    for (arg, n) in [("num_heads", grid.1), ("batch", grid.2)] {
        if n > 65535 {
            return Err(Error::TooLarge { arg, msg: format!("{n} exceeds the CUDA grid limit of 65535") });
        }
    }
    Ok(())
}

/// (batch, head) strides of the contiguous LSE: `[B, Hq, Sq]`, or `[Hq, Tq]` for varlen.
fn lse_strides(p: &Problem) -> (usize, usize) {
    if p.varlen { (0, p.total_q) } else { (p.hq * p.seqlen_q, p.seqlen_q) }
}

/// Allocate the outputs on q's device and run the kernel into them.
pub fn fwd(p: &Problem, q: &Tensor, k: &Tensor, v: &Tensor, varlen: Option<&Varlen<'_>>) -> Result<crate::api::FwdOutput> {
    let ordinal = cuda_ordinal(q)?;
    let out_shape = p.out_shape();
    let lse_shape = p.lse_shape();
    let out = Tensor::on_device_buffer(DeviceBuffer::uninit(ordinal, out_shape.iter().product::<usize>() * p.dtype.size())?, &out_shape, p.dtype);
    let lse = Tensor::on_device_buffer(DeviceBuffer::uninit(ordinal, lse_shape.iter().product::<usize>() * 4)?, &lse_shape, crate::DType::F32);
    fwd_into(p, q, k, v, varlen, &out, &lse)?;
    Ok(crate::api::FwdOutput { out, lse })
}

/// Run the forward kernel writing into `out` (shape `p.out_shape()`, any row/head strides) and `lse`
/// (contiguous `p.lse_shape()`); both already checked against the problem.
pub fn fwd_into(p: &Problem, q: &Tensor, k: &Tensor, v: &Tensor, varlen: Option<&Varlen<'_>>, out: &Tensor, lse: &Tensor) -> Result<()> {
    for (arg, t) in [("q", q), ("k", k), ("v", v), ("out", out)] {
        check_aligned(arg, t)?;
    }
    if p.total_q == 0 || p.hq == 0 {
        return Ok(());
    }
    let gpu = gpu(cuda_ordinal(q)?)?;
    let hopper = wgmma_kernels(&gpu);
    let launch = fwd_launch(p, hopper.then_some(gpu.sm_count)).ok_or(Error::HeadDim { got: p.head_dim })?;
    check_grid(launch.grid)?;
    let func = gpu.function(launch.kernel, launch.smem_bytes)?;

    let s = |x: usize| x as i64;
    let os = out.strides();
    let (o_batch, o_row, o_head) = if p.varlen { (0, os[0], os[1]) } else { (os[0], os[1], os[2]) };
    let (lse_batch, lse_head) = lse_strides(p);
    let (scale_log2, softcap_pre) = score_constants(p);
    // Masked scores are -inf times scale_log2 in the kernel: a zero scale (uniform attention) must stay
    // nonzero there. The smallest normal float makes every finite score flush to exactly 0.
    let scale_log2 = if scale_log2 == 0.0 { f32::MIN_POSITIVE } else { scale_log2 };
    let i32_of = |x: i64| x.clamp(i32::MIN as i64, i32::MAX as i64) as i32;
    let params = FwdParams {
        q: addr(q)?,
        k: addr(k)?,
        v: addr(v)?,
        o: addr(out)?,
        lse: addr(lse)?,
        cu_seqlens_q: opt_addr(varlen.map(|vl| vl.cu_seqlens_q))?,
        cu_seqlens_k: opt_addr(varlen.map(|vl| vl.cu_seqlens_k))?,
        seqused_q: opt_addr(varlen.and_then(|vl| vl.seqused_q))?,
        seqused_k: opt_addr(varlen.and_then(|vl| vl.seqused_k))?,
        q_batch_stride: s(p.q.batch),
        q_row_stride: s(p.q.row),
        q_head_stride: s(p.q.head),
        k_batch_stride: s(p.k.batch),
        k_row_stride: s(p.k.row),
        k_head_stride: s(p.k.head),
        v_batch_stride: s(p.v.batch),
        v_row_stride: s(p.v.row),
        v_head_stride: s(p.v.head),
        o_batch_stride: s(o_batch),
        o_row_stride: s(o_row),
        o_head_stride: s(o_head),
        lse_batch_stride: s(lse_batch),
        lse_head_stride: s(lse_head),
        batch: p.batch as i32,
        h: p.hq as i32,
        h_k: p.hk as i32,
        seqlen_q: p.seqlen_q as i32,
        seqlen_k: p.seqlen_k as i32,
        total_q: p.total_q as i32,
        total_k: p.total_k as i32,
        window_left: i32_of(p.window_left),
        window_right: i32_of(p.window_right),
        m_blocks: launch.grid.0 as i32,
        scale_log2,
        softcap_pre,
    };
    let cfg = LaunchConfig { grid_dim: launch.grid, block_dim: (launch.block, 1, 1), shared_mem_bytes: launch.smem_bytes as u32 };
    unsafe { gpu.stream.launch_builder(&func).arg(&params).launch(cfg)? };
    Ok(())
}

/// Whether the sm_90a module's wgmma kernels run: a Hopper GPU, unless `FLASH_ATTN_NO_WGMMA` (any value)
/// keeps it on the mma.sync kernels (a diagnostic for A/B runs; read per call).
fn wgmma_kernels(gpu: &crate::module::Gpu) -> bool {
    gpu.cc_major >= 9 && std::env::var_os("FLASH_ATTN_NO_WGMMA").is_none()
}

/// The softmax constants both passes use: (scale_log2, softcap_pre); see `FwdParams`.
fn score_constants(p: &Problem) -> (f32, f32) {
    if p.softcap > 0.0 {
        (p.softcap * std::f32::consts::LOG2_E, p.scale / p.softcap)
    } else {
        (p.scale * std::f32::consts::LOG2_E, 0.0)
    }
}

/// Strides (batch, row, head) of a contiguous `[B, S, H, D]` (or varlen `[T, H, D]`) tensor.
fn contiguous_bsh(varlen: bool, seqlen: usize, heads: usize, d: usize) -> (i64, i64, i64) {
    let row = (heads * d) as i64;
    (if varlen { 0 } else { seqlen as i64 * row }, row, d as i64)
}

/// The backward on CUDA: allocate dq/dk/dv (contiguous, input dtype), the f32 workspace (lse_log2 and
/// D, shaped like the LSE) and, unless `deterministic`, the f32 dq accumulator; then run prep,
/// dk/dv and dq (bwd_launches). Every element of dq/dk/dv is written by the kernels.
#[allow(clippy::too_many_arguments)]
pub fn bwd(bp: &BwdProblem, dout: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, lse: &Tensor, varlen: Option<&Varlen<'_>>, deterministic: bool) -> Result<crate::api::BwdOutput> {
    let p = &bp.fwd;
    for (arg, t) in [("q", q), ("k", k), ("v", v), ("out", out), ("dout", dout)] {
        check_aligned(arg, t)?;
    }
    let ordinal = cuda_ordinal(q)?;
    let (q_shape, kv_shape) = (p.out_shape(), p.kv_shape());
    let bytes = |shape: &[usize], size: usize| shape.iter().product::<usize>() * size;
    if p.total_q == 0 || p.hq == 0 {
        // No query attends to anything: every gradient is 0.
        let zeros = |shape: &[usize]| -> Result<Tensor> { Ok(Tensor::on_device_buffer(DeviceBuffer::zeros(ordinal, bytes(shape, p.dtype.size()))?, shape, p.dtype)) };
        return Ok(crate::api::BwdOutput { dq: zeros(&q_shape)?, dk: zeros(&kv_shape)?, dv: zeros(&kv_shape)? });
    }
    let gpu = gpu(ordinal)?;
    let hopper = wgmma_kernels(&gpu);
    let launches = bwd_launches(p, deterministic, hopper.then_some(gpu.sm_count)).ok_or(Error::HeadDim { got: p.head_dim })?;
    for l in &launches {
        check_grid(l.grid)?;
    }
    let funcs = launches.iter().map(|l| gpu.function(l.kernel, l.smem_bytes)).collect::<Result<Vec<_>>>()?;

    let dq = Tensor::on_device_buffer(DeviceBuffer::uninit(ordinal, bytes(&q_shape, p.dtype.size()))?, &q_shape, p.dtype);
    let dk = Tensor::on_device_buffer(DeviceBuffer::uninit(ordinal, bytes(&kv_shape, p.dtype.size()))?, &kv_shape, p.dtype);
    let dv = Tensor::on_device_buffer(DeviceBuffer::uninit(ordinal, bytes(&kv_shape, p.dtype.size()))?, &kv_shape, p.dtype);
    let lse_len = p.lse_shape().iter().product::<usize>();
    let ws = DeviceBuffer::uninit(ordinal, 2 * lse_len * 4)?;
    // The dk/dv kernel adds whole query blocks to the accumulator without a row check (rows past a
    // sequence add exact zeros): `block_m` rows of slack keep the last block's adds inside it. The prep
    // kernel zeroes the rows that are read back (every real row), in the pass that reads dout and out.
    let slack = crate::dispatch::bwd_config(p.head_dim).block_m * p.hq * p.head_dim * 4;
    let dq_accum = if deterministic { None } else { Some(DeviceBuffer::uninit(ordinal, bytes(&q_shape, 4) + slack)?) };

    let s = |x: usize| x as i64;
    let (scale_log2, softcap_pre) = score_constants(p);
    let (lse_batch, lse_head) = lse_strides(p);
    let (dq_b, dq_r, dq_h) = contiguous_bsh(p.varlen, p.seqlen_q, p.hq, p.head_dim);
    let (dk_b, dk_r, dk_h) = contiguous_bsh(p.varlen, p.seqlen_k, p.hk, p.head_dim);
    let i32_of = |x: i64| x.clamp(i32::MIN as i64, i32::MAX as i64) as i32;
    let params = BwdParams {
        q: addr(q)?,
        k: addr(k)?,
        v: addr(v)?,
        o: addr(out)?,
        dout: addr(dout)?,
        lse: addr(lse)?,
        dq: addr(&dq)?,
        dk: addr(&dk)?,
        dv: addr(&dv)?,
        dq_accum: dq_accum.as_ref().map_or(0, |b| b.ptr()),
        lse_log2: ws.ptr(),
        delta: ws.ptr() + (lse_len * 4) as u64,
        cu_seqlens_q: opt_addr(varlen.map(|vl| vl.cu_seqlens_q))?,
        cu_seqlens_k: opt_addr(varlen.map(|vl| vl.cu_seqlens_k))?,
        seqused_q: opt_addr(varlen.and_then(|vl| vl.seqused_q))?,
        seqused_k: opt_addr(varlen.and_then(|vl| vl.seqused_k))?,
        q_batch_stride: s(p.q.batch),
        q_row_stride: s(p.q.row),
        q_head_stride: s(p.q.head),
        k_batch_stride: s(p.k.batch),
        k_row_stride: s(p.k.row),
        k_head_stride: s(p.k.head),
        v_batch_stride: s(p.v.batch),
        v_row_stride: s(p.v.row),
        v_head_stride: s(p.v.head),
        o_batch_stride: s(bp.out.batch),
        o_row_stride: s(bp.out.row),
        o_head_stride: s(bp.out.head),
        do_batch_stride: s(bp.dout.batch),
        do_row_stride: s(bp.dout.row),
        do_head_stride: s(bp.dout.head),
        dq_batch_stride: dq_b,
        dq_row_stride: dq_r,
        dq_head_stride: dq_h,
        dk_batch_stride: dk_b,
        dk_row_stride: dk_r,
        dk_head_stride: dk_h,
        dv_batch_stride: dk_b,
        dv_row_stride: dk_r,
        dv_head_stride: dk_h,
        dqa_batch_stride: dq_b,
        dqa_row_stride: dq_r,
        dqa_head_stride: dq_h,
        lse_batch_stride: s(lse_batch),
        lse_head_stride: s(lse_head),
        batch: p.batch as i32,
        h: p.hq as i32,
        h_k: p.hk as i32,
        head_dim: p.head_dim as i32,
        seqlen_q: p.seqlen_q as i32,
        seqlen_k: p.seqlen_k as i32,
        total_q: p.total_q as i32,
        total_k: p.total_k as i32,
        window_left: i32_of(p.window_left),
        window_right: i32_of(p.window_right),
        scale_log2,
        softcap_pre,
        scale: p.scale,
        _pad: 0,
    };
    for (l, f) in launches.iter().zip(&funcs) {
        if l.grid.2 == 0 {
            continue;
        }
        let cfg = LaunchConfig { grid_dim: l.grid, block_dim: (l.block, 1, 1), shared_mem_bytes: l.smem_bytes as u32 };
        unsafe { gpu.stream.launch_builder(f).arg(&params).launch(cfg)? };
    }
    // The workspace and accumulator must outlive the kernels: the stream orders the frees after them.
    drop((ws, dq_accum));
    Ok(crate::api::BwdOutput { dq, dk, dv })
}

/// Milliseconds the work queued by `f` takes on device `ordinal`, measured with CUDA events around it
/// (for benchmarks: warm up first, take the median of many).
pub fn time_ms(ordinal: usize, mut f: impl FnMut() -> Result<()>) -> Result<f32> {
    let gpu = gpu(ordinal)?;
    let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let start = gpu.ctx.new_event(timing)?;
    let end = gpu.ctx.new_event(timing)?;
    start.record(&gpu.stream)?;
    f()?;
    end.record(&gpu.stream)?;
    end.synchronize()?;
    Ok(start.elapsed_ms(&end)?)
}

/// Name of device `ordinal` as the driver reports it.
pub fn device_name(ordinal: usize) -> Result<String> {
    Ok(gpu(ordinal)?.ctx.name()?)
}
