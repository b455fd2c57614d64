//! CUDA memory for the `Tensor` API, and helpers for tests and benchmarks. The `Tensor` API orders all
//! its work (allocations, copies, kernels) on the legacy default stream of the device's primary context.

use crate::error::Result;
use crate::module::{gpu, Gpu};
use crate::types::Device;
use cudarc::driver::{result, sys};
use std::sync::Arc;

/// The most splits (`KvCacheOptions::num_splits`) whose blocks a Hopper decode merges in one cluster,
/// writing out and lse itself; more splits go through partial results and the combine kernel.
pub use crate::dispatch::MAX_DECODE_CLUSTER;

/// Whether a CUDA driver and at least one GPU are present (never panics without libcuda).
pub fn available() -> bool {
    crate::module::cuda_available()
}

impl Device {
    /// CUDA device 0 when a driver and a GPU are present, else the CPU.
    pub fn best() -> Device {
        if available() { Device::Cuda(0) } else { Device::Cpu }
    }
}

/// The legacy default stream of the device's primary context: where the `Tensor` API orders all its work.
fn legacy_stream() -> sys::CUstream {
    std::ptr::null_mut()
}

/// One allocation of the `Tensor` API: from the device's `Tensor` pool (stream-ordered on the legacy
/// default stream, so freeing it waits for no one and its memory is reused by the next allocation without
/// being mapped again), or from cuMemAlloc where the device has no memory pools.
struct Allocation {
    ptr: sys::CUdeviceptr,
    pooled: bool,
    gpu: Arc<Gpu>,
}

impl Allocation {
    fn new(gpu: Arc<Gpu>, n: usize) -> Result<Self> {
        let n = n.max(16);
        let pool = gpu.tensor_pool();
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: ptr is written by the call; the context is current (`gpu` binds it).
        unsafe {
            match pool {
                Some(p) => sys::cuMemAllocFromPoolAsync(&mut ptr, n, p.0, legacy_stream()).result()?,
                None => ptr = result::malloc_sync(n)?,
            }
        }
        Ok(Allocation { ptr, pooled: pool.is_some(), gpu })
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        // Errors here cannot be reported (a failed free leaks the bytes, nothing more).
        if self.gpu.ctx.bind_to_thread().is_err() {
            return;
        }
        // SAFETY: ptr came from `Allocation::new` and is freed once. Every use of it was queued on the
        // legacy default stream, so the stream-ordered free comes after them; cuMemFree synchronizes.
        unsafe {
            let _ = if self.pooled { result::free_async(self.ptr, legacy_stream()) } else { result::free_sync(self.ptr) };
        }
    }
}

/// Device memory shared by the tensors viewing it. All work is ordered on the legacy default stream.
#[derive(Clone)]
pub struct DeviceBuffer {
    alloc: Arc<Allocation>,
    len: usize,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer(cuda:{}, {} bytes)", self.ordinal(), self.len)
    }
}

impl DeviceBuffer {
    /// `n` zero bytes on device `ordinal`.
    pub fn zeros(ordinal: usize, n: usize) -> Result<Self> {
        let b = Self::uninit(ordinal, n)?;
        // SAFETY: the allocation holds at least max(n, 16) bytes.
        unsafe { result::memset_d8_async(b.alloc.ptr, 0, n.max(16), legacy_stream())? };
        Ok(b)
    }
    /// `n` bytes whose contents the caller will overwrite entirely (kernel outputs, workspace).
    pub(crate) fn uninit(ordinal: usize, n: usize) -> Result<Self> {
        Ok(DeviceBuffer { alloc: Arc::new(Allocation::new(gpu(ordinal)?, n)?), len: n })
    }
    /// A device copy of `bytes`.
    pub fn from_host(ordinal: usize, bytes: &[u8]) -> Result<Self> {
        let b = Self::zeros(ordinal, bytes.len())?;
        if !bytes.is_empty() {
            // SAFETY: the allocation holds bytes.len() bytes; the synchronous copy (ordered after the
            // memset on the legacy stream) returns once `bytes` has been read.
            unsafe { result::memcpy_htod_sync(b.alloc.ptr, bytes)? };
        }
        Ok(b)
    }
    pub fn ordinal(&self) -> usize {
        self.alloc.gpu.ctx.ordinal()
    }
    pub fn len_bytes(&self) -> usize {
        self.len
    }
    /// The bytes, copied to the host (waits for all work queued before).
    pub fn to_host(&self) -> Result<Vec<u8>> {
        self.alloc.gpu.ctx.bind_to_thread()?;
        let mut v = vec![0u8; self.len];
        if !v.is_empty() {
            // SAFETY: the allocation holds self.len bytes; the synchronous copy on the legacy stream waits
            // for the work queued before it.
            unsafe { result::memcpy_dtoh_sync(&mut v, self.alloc.ptr)? };
        }
        Ok(v)
    }
    /// Device address of byte 0.
    pub(crate) fn ptr(&self) -> u64 {
        self.alloc.ptr
    }
}

/// Gives the memory cached by the `Tensor` API's pool on device `ordinal` back to the driver (after the
/// work queued so far): buffers freed by dropped tensors stay mapped for the next allocation until then
/// (as PyTorch's `torch.cuda.empty_cache()` releases its cache). A no-op where the device has no pools.
pub fn release_cached_memory(ordinal: usize) -> Result<()> {
    let gpu = gpu(ordinal)?;
    if let Some(pool) = gpu.tensor_pool() {
        // SAFETY: the context is current; the pool is the device's live `Tensor` pool.
        unsafe {
            result::stream::synchronize(legacy_stream())?;
            sys::cuMemPoolTrimTo(pool.0, 0).result()?;
        }
    }
    Ok(())
}

/// Milliseconds the work queued by `f` takes on device `ordinal`, measured with CUDA events around it
/// (for benchmarks: warm up first, take the median of many).
pub fn time_ms(ordinal: usize, mut f: impl FnMut() -> Result<()>) -> Result<f32> {
    let gpu = gpu(ordinal)?;
    let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let start = gpu.ctx.new_event(timing)?;
    let end = gpu.ctx.new_event(timing)?;
    let stream = gpu.ctx.default_stream();
    start.record(&stream)?;
    f()?;
    end.record(&stream)?;
    end.synchronize()?;
    Ok(start.elapsed_ms(&end)?)
}

/// Name of device `ordinal` as the driver reports it.
pub fn device_name(ordinal: usize) -> Result<String> {
    Ok(gpu(ordinal)?.ctx.name()?)
}
