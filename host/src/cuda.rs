//! CUDA memory for the `Tensor` API, and helpers for tests and benchmarks. The `Tensor` API orders all
//! its work (allocations, copies, kernels) on the legacy default stream of the device's primary context.

use crate::error::Result;
use crate::module::{gpu, Gpu};
use crate::types::Device;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
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

/// The stream the `Tensor` API uses on device `ordinal`: the legacy default stream.
fn stream(gpu: &Gpu) -> Arc<CudaStream> {
    gpu.ctx.default_stream()
}

/// Device memory shared by the tensors viewing it. All work is ordered on the legacy default stream.
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
        let slice = stream(&gpu).alloc_zeros::<u8>(n.max(16))?;
        Ok(DeviceBuffer { slice: Arc::new(slice), len: n, gpu })
    }
    /// `n` bytes whose contents the caller will overwrite entirely (kernel outputs, workspace).
    pub(crate) fn uninit(ordinal: usize, n: usize) -> Result<Self> {
        let gpu = gpu(ordinal)?;
        let slice = unsafe { stream(&gpu).alloc::<u8>(n.max(16))? };
        Ok(DeviceBuffer { slice: Arc::new(slice), len: n, gpu })
    }
    /// A device copy of `bytes`.
    pub fn from_host(ordinal: usize, bytes: &[u8]) -> Result<Self> {
        let gpu = gpu(ordinal)?;
        let stream = stream(&gpu);
        let mut slice = stream.alloc_zeros::<u8>(bytes.len().max(16))?;
        if !bytes.is_empty() {
            stream.memcpy_htod(bytes, &mut slice.slice_mut(..bytes.len()))?;
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
        let mut v = stream(&self.gpu).clone_dtoh(&*self.slice)?;
        v.truncate(self.len);
        Ok(v)
    }
    /// Device address of byte 0.
    pub(crate) fn ptr(&self) -> u64 {
        let stream = stream(&self.gpu);
        let (p, _sync) = self.slice.device_ptr(&stream);
        p
    }
}

/// Milliseconds the work queued by `f` takes on device `ordinal`, measured with CUDA events around it
/// (for benchmarks: warm up first, take the median of many).
pub fn time_ms(ordinal: usize, mut f: impl FnMut() -> Result<()>) -> Result<f32> {
    let gpu = gpu(ordinal)?;
    let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let start = gpu.ctx.new_event(timing)?;
    let end = gpu.ctx.new_event(timing)?;
    let stream = stream(&gpu);
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
