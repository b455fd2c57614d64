//! Per CUDA device: its primary context (shared with candle, cubecl and PyTorch), the shipped kernel module
//! (cubin or PTX) loaded into it once, and a cache of kernel handles. Created lazily and kept for the process; everything
//! here is safe to use from many threads at once.

use crate::error::{Error, Result};
use cudarc::driver::{result, sys, CudaContext};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// A loaded kernel. Driver handles may be used from any thread.
#[derive(Clone, Copy, Debug)]
pub struct Function(pub sys::CUfunction);
unsafe impl Send for Function {}
unsafe impl Sync for Function {}

/// A loaded module, and whether it is the sm_90a one (its Hopper kernels exist).
#[derive(Debug)]
struct Module(sys::CUmodule, bool);
unsafe impl Send for Module {}
unsafe impl Sync for Module {}

/// The memory pool the `Tensor` API's buffers come from (`cuda::DeviceBuffer`). Its release threshold is
/// unbounded: memory freed back to it stays mapped across synchronizations (as PyTorch's caching allocator
/// keeps it), where the device's default pool would unmap it at every synchronization and map it again on
/// the next allocation. `cuda::release_cached_memory` trims it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MemPool(pub sys::CUmemoryPool);
unsafe impl Send for MemPool {}
unsafe impl Sync for MemPool {}

/// One CUDA device as the library uses it.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    module: OnceLock<Module>,
    /// Held while a thread loads the module (a failed load is not kept: the next call tries again).
    module_loading: Mutex<()>,
    functions: Mutex<HashMap<&'static str, Function>>,
    /// The `Tensor` API's memory pool, created on first use; None where the device has no memory pools
    /// (its buffers then use cuMemAlloc / cuMemFree).
    pool: OnceLock<Option<MemPool>>,
    /// Largest dynamic shared memory a block may opt in to.
    pub max_smem_optin: usize,
    /// Compute capability: picks the module (`module`).
    pub cc_major: usize,
    pub cc_minor: usize,
    /// Multiprocessors, for sizing grids.
    pub sm_count: usize,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu(cuda:{})", self.ctx.ordinal())
    }
}

/// Whether a CUDA driver library can be loaded and reports at least one device. Checked once.
pub fn cuda_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        // cudarc panics on first use when libcuda is missing: ask first. (cudarc's own probe exists only
        // under its dynamic-loading feature, which candle's dynamic-linking turns off.)
        if !libcuda_loadable() {
            return false;
        }
        std::panic::catch_unwind(|| CudaContext::device_count().map(|n| n > 0).unwrap_or(false)).unwrap_or(false)
    })
}

/// Whether the driver library can be opened (the names the NVIDIA driver installs).
fn libcuda_loadable() -> bool {
    let names: &[&str] = if cfg!(windows) { &["nvcuda.dll"] } else { &["libcuda.so.1", "libcuda.so"] };
    names.iter().any(|&name| unsafe { libloading::Library::new(name) }.is_ok())
}

/// The device `ordinal`, created on first use, with its primary context current on the calling thread.
pub fn gpu(ordinal: usize) -> Result<Arc<Gpu>> {
    static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
    let g = {
        let mut map = GPUS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&ordinal) {
            Some(g) => g.clone(),
            None => {
                let g = Arc::new(Gpu::new(ordinal)?);
                map.insert(ordinal, g.clone());
                g
            }
        }
    };
    g.ctx.bind_to_thread()?;
    Ok(g)
}

impl Gpu {
    fn new(ordinal: usize) -> Result<Gpu> {
        if !cuda_available() {
            return Err(Error::Cuda(format!("cuda:{ordinal} requested but no CUDA driver or device is present")));
        }
        let count = CudaContext::device_count()? as usize;
        if ordinal >= count {
            return Err(Error::Cuda(format!("cuda:{ordinal} does not exist ({count} device(s))")));
        }
        let ctx = CudaContext::new(ordinal)?;
        // Our own buffers (the Tensor API) are ordered on one stream; cudarc's per-buffer events would
        // only add synchronization.
        unsafe { ctx.disable_event_tracking() };
        let attr = |a| ctx.attribute(a).map(|x| x as usize);
        let max_smem_optin = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let sm_count = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let cc_major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let cc_minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        Ok(Gpu { ctx, module: OnceLock::new(), module_loading: Mutex::new(()), functions: Mutex::new(HashMap::new()), pool: OnceLock::new(), max_smem_optin, cc_major, cc_minor, sm_count })
    }

    /// The kernels for this device, loaded on first use: the shipped cubin where it runs natively
    /// (compute capability 9.0: sm_90a; 8.x: sm_80), else, or if the driver refuses it, the sm_80 PTX for
    /// the driver to JIT-compile (on 9.0 that module has no Hopper kernels: `is_hopper` is then false).
    pub(crate) fn module(&self) -> Result<sys::CUmodule> {
        self.loaded().map(|m| m.0)
    }

    fn loaded(&self) -> Result<&Module> {
        if let Some(m) = self.module.get() {
            return Ok(m);
        }
        let _loading = self.module_loading.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = self.module.get() {
            return Ok(m);
        }
        self.ctx.bind_to_thread()?;
        // Relaxed capture mode on this thread for the load (which allocates), so that another thread's
        // global-mode capture neither fails it nor is invalidated by it; restored after.
        let mut mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
        let relaxed = unsafe { sys::cuThreadExchangeStreamCaptureMode(&mut mode) } == sys::CUresult::CUDA_SUCCESS;
        let m = self.load();
        if relaxed {
            unsafe { sys::cuThreadExchangeStreamCaptureMode(&mut mode) };
        }
        let m = m.map_err(|e| Error::Cuda(format!("loading the kernel module: {e}")))?;
        Ok(self.module.get_or_init(|| m))
    }

    /// Load the shipped cubin where it runs natively, else (or where the driver refuses it for a reason
    /// that will not pass: not for out-of-memory or a capture in the way, which are returned, and the
    /// next call tries again) the sm_80 PTX.
    fn load(&self) -> std::result::Result<Module, String> {
        use sys::CUresult as R;
        let cubin = match (self.cc_major, self.cc_minor) {
            (9, 0) => Some((crate::ptx::cubin_sm90()?, true)),
            (8, _) => Some((crate::ptx::cubin_sm80()?, false)),
            _ => None,
        };
        if let Some((image, sm90)) = cubin {
            match unsafe { result::module::load_data(image.as_ptr() as *const _) } {
                Ok(m) => return Ok(Module(m, sm90)),
                Err(e) if matches!(e.0, R::CUDA_ERROR_OUT_OF_MEMORY | R::CUDA_ERROR_NOT_PERMITTED | R::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED | R::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED | R::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT | R::CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD) => return Err(e.to_string()),
                Err(_) => {}
            }
        }
        let image = std::ffi::CString::new(crate::ptx::ptx_sm80()?).map_err(|e| e.to_string())?;
        unsafe { result::module::load_data(image.as_ptr() as *const _) }.map(|m| Module(m, false)).map_err(|e| e.to_string())
    }

    /// The `Tensor` API's memory pool (see `MemPool`), or None where the device has none or creating it
    /// failed (allocations then fall back to cuMemAlloc).
    pub(crate) fn tensor_pool(&self) -> Option<MemPool> {
        *self.pool.get_or_init(|| {
            if !self.ctx.has_async_alloc() || self.ctx.bind_to_thread().is_err() {
                return None;
            }
            // SAFETY: props is zeroed (every field's valid value) and then given the three fields that
            // matter; the pool handle is checked before use and destroyed if configuring it fails.
            unsafe {
                let mut props: sys::CUmemPoolProps = std::mem::zeroed();
                props.allocType = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
                props.handleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE;
                props.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
                // The device ordinal: `id`, the int after `type_` (a plain field before CUDA 13.2, a
                // one-member union since, depending on the cudarc version feature a build selects).
                const { assert!(std::mem::size_of::<sys::CUmemLocation>() == 8) };
                std::ptr::addr_of_mut!(props.location).cast::<i32>().add(1).write(self.ctx.ordinal() as i32);
                let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
                if sys::cuMemPoolCreate(&mut pool, &props) != sys::CUresult::CUDA_SUCCESS || pool.is_null() {
                    return None;
                }
                let mut threshold = u64::MAX;
                let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
                if sys::cuMemPoolSetAttribute(pool, attr, (&raw mut threshold).cast()) != sys::CUresult::CUDA_SUCCESS {
                    sys::cuMemPoolDestroy(pool);
                    return None;
                }
                Some(MemPool(pool))
            }
        })
    }

    /// Compute capability 9.0 (H100, H200) with the sm_90a module loaded: its wgmma kernels run here.
    pub(crate) fn is_hopper(&self) -> bool {
        (self.cc_major, self.cc_minor) == (9, 0) && self.loaded().is_ok_and(|m| m.1)
    }

    /// The kernel `name` with its dynamic shared-memory limit raised to `smem_bytes`.
    pub fn function(&self, name: &'static str, smem_bytes: usize) -> Result<Function> {
        let mut funcs = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = funcs.get(name) {
            return Ok(*f);
        }
        if smem_bytes > self.max_smem_optin {
            return Err(Error::Cuda(format!("{name} needs {smem_bytes} bytes of shared memory; this GPU allows {}", self.max_smem_optin)));
        }
        let module = self.module()?;
        let cname = std::ffi::CString::new(name).map_err(|e| Error::Cuda(e.to_string()))?;
        let f = unsafe { result::module::get_function(module, cname) }?;
        unsafe { result::function::set_function_attribute(f, sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem_bytes as i32) }?;
        funcs.insert(name, Function(f));
        Ok(Function(f))
    }
}
