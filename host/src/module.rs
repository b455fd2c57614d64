//! The embedded PTX (built from kernels-gpu by build.rs) and, per device, its lazily created context,
//! stream, loaded module and function cache. Everything here is created once per device and reused.

use crate::error::{Error, Result};
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule, CudaStream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// PTX for sm_80 and newer (JIT-compiled by the driver for the GPU at hand).
pub const PTX_SM80: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels_sm80.ptx"));
/// The same kernels for sm_90 and newer, with Hopper-only instructions; loaded on compute capability >= 9.
pub const PTX_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels_sm90.ptx"));

/// One CUDA device as the library uses it.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    module: OnceLock<std::result::Result<Arc<CudaModule>, String>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    /// Largest dynamic shared memory a block may opt in to.
    pub max_smem_optin: usize,
    /// Compute capability major version: picks the PTX module.
    pub cc_major: usize,
    /// Multiprocessors, for sizing persistent grids and benchmarks.
    #[allow(dead_code)]
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
        // cudarc panics on first use when libcuda is missing: ask first.
        if !unsafe { sys::is_culib_present() } {
            return false;
        }
        std::panic::catch_unwind(|| CudaContext::device_count().map(|n| n > 0).unwrap_or(false)).unwrap_or(false)
    })
}

/// The device `ordinal`, created on first use.
pub fn gpu(ordinal: usize) -> Result<Arc<Gpu>> {
    static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
    if !cuda_available() {
        return Err(Error::Cuda(format!("cuda:{ordinal} requested but no CUDA driver or device is present")));
    }
    let mut map = GPUS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(g) = map.get(&ordinal) {
        return Ok(g.clone());
    }
    let count = CudaContext::device_count()? as usize;
    if ordinal >= count {
        return Err(Error::Cuda(format!("cuda:{ordinal} does not exist ({count} device(s))")));
    }
    let ctx = CudaContext::new(ordinal)?;
    // One stream orders every operation of the library, so cudarc's per-buffer events are not needed.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.default_stream();
    let max_smem_optin = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize;
    let sm_count = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
    let cc_major = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? as usize;
    let g = Arc::new(Gpu { ctx, stream, module: OnceLock::new(), functions: Mutex::new(HashMap::new()), max_smem_optin, cc_major, sm_count });
    map.insert(ordinal, g.clone());
    Ok(g)
}

impl Gpu {
    /// The kernel `name` with its dynamic shared-memory limit raised to `smem_bytes`.
    pub fn function(&self, name: &'static str, smem_bytes: usize) -> Result<CudaFunction> {
        let mut funcs = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = funcs.get(name) {
            return Ok(f.clone());
        }
        let module = self
            .module
            .get_or_init(|| {
                let ptx = if self.cc_major >= 9 { PTX_SM90 } else { PTX_SM80 };
                self.ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(|e| e.to_string())
            })
            .clone()
            .map_err(|e| Error::Cuda(format!("loading the PTX module: {e}")))?;
        let f = module.load_function(name)?;
        if smem_bytes > self.max_smem_optin {
            return Err(Error::Cuda(format!("{name} needs {smem_bytes} bytes of shared memory; this GPU allows {}", self.max_smem_optin)));
        }
        f.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem_bytes as i32)?;
        funcs.insert(name, f.clone());
        Ok(f)
    }
}
