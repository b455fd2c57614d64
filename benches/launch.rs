//! Host cost of the raw layer on CUDA: the cold start (first module load of a process: the shipped cubin),
//! the same load through the driver's PTX JIT, and, with criterion, the host time of one `raw::fwd` / `raw::bwd` call (validation and
//! launch; the GPU is not waited for) on a small problem, on a caller's non-blocking stream. Each call
//! batch is followed by an untimed synchronize so the launch queue never fills. Prints
//! `COLD_START <ms>`, `PTX_JIT <ms>` and `LAUNCH fwd|bwd <median us>`. Skips with a notice when there is no GPU.

use criterion::Criterion;
use cudarc::driver::{CudaContext, DevicePtr};
use flash_attn::raw::{self, BwdViews, FwdViews, Workspace};
use flash_attn::{cuda, AttnOptions, DType, Target, View};
use std::time::{Duration, Instant};

const BATCH: u64 = 256;

fn main() {
    if !cuda::available() {
        println!("SKIPPED launch benches: no CUDA GPU on this machine");
        return;
    }
    let ctx = CudaContext::new(0).unwrap();
    let t0 = Instant::now();
    raw::preload(0).unwrap();
    println!("COLD_START {:.1} ms (first load of the kernels: the shipped cubin, {})", t0.elapsed().as_secs_f64() * 1e3, cuda::device_name(0).unwrap());
    // What the load costs without the cubin: the driver JIT-compiles the PTX (run with CUDA_CACHE_DISABLE=1
    // to keep its disk cache out of it).
    let ptx = std::ffi::CString::new(flash_attn::ptx::ptx_sm80().unwrap()).unwrap();
    let t0 = Instant::now();
    let jit = unsafe { cudarc::driver::result::module::load_data(ptx.as_ptr() as *const _) };
    println!("PTX_JIT {:.1} ms (the sm_80 PTX module through the driver's JIT; ok: {})", t0.elapsed().as_secs_f64() * 1e3, jit.is_ok());

    let stream = ctx.new_stream().unwrap();
    let (b, s, h, d) = (1, 128, 4, 64);
    let n = b * s * h * d;
    let buf = |len: usize| stream.alloc_zeros::<u16>(len).unwrap();
    let (q, k, v, dout, out, dq, dk, dv) = (buf(n), buf(n), buf(n), buf(n), buf(n), buf(n), buf(n), buf(n));
    let lse = stream.alloc_zeros::<f32>(b * h * s).unwrap();
    let ws = stream.alloc_zeros::<u8>(raw::bwd_workspace_bytes(&[b, s, h, d], false).unwrap()).unwrap();
    let p = |x: &cudarc::driver::CudaSlice<u16>| x.device_ptr(&stream).0;
    let (shape, strides) = ([b, s, h, d], [s * h * d, h * d, d, 1]);
    let (lshape, lstrides) = ([b, h, s], [h * s, s, 1]);
    let view = |addr| View { addr, dtype: DType::BF16, shape: &shape, strides: &strides };
    let lse_v = View { addr: lse.device_ptr(&stream).0, dtype: DType::F32, shape: &lshape, strides: &lstrides };
    let fv = FwdViews { q: view(p(&q)), k: view(p(&k)), v: view(p(&v)), out: view(p(&out)), lse: lse_v, alibi_slopes: None, s_dmask: None };
    let bv = BwdViews { dout: view(p(&dout)), q: fv.q, k: fv.k, v: fv.v, out: fv.out, lse: lse_v, dq: view(p(&dq)), dk: view(p(&dk)), dv: view(p(&dv)), alibi_slopes: None };
    let wsv = Workspace { addr: ws.device_ptr(&stream).0, bytes: ws.len() };
    let target = Target::Cuda { ordinal: 0, stream: stream.cu_stream() as usize };
    let opts = AttnOptions { causal: true, ..Default::default() };

    let mut c = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3)).sample_size(30);
    let mut time = |name: &str, call: &dyn Fn()| {
        let mut per_call = Vec::new();
        c.bench_function(&format!("launch {name}"), |bch| {
            bch.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let chunk = left.min(BATCH);
                    let t = Instant::now();
                    for _ in 0..chunk {
                        call();
                    }
                    total += t.elapsed();
                    stream.synchronize().unwrap();
                    left -= chunk;
                }
                per_call.push(total.as_secs_f64() / iters as f64);
                total
            })
        });
        per_call.sort_by(f64::total_cmp);
        println!("LAUNCH {name} {:.2} us per call (median of {} samples)", per_call[per_call.len() / 2] * 1e6, per_call.len());
    };
    time("fwd", &|| unsafe { raw::fwd(&fv, &opts, target) }.unwrap());
    time("bwd", &|| unsafe { raw::bwd(&bv, &opts, false, wsv, target) }.unwrap());
}
