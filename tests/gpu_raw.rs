//! The raw layer on CUDA, as a framework calls it: memory allocated by the caller (cudarc here, as candle
//! does), a non-blocking stream of the primary context, CUDA graph capture and replay, several host
//! threads with their own streams at once, packed qkv views, and no allocation inside a call. Results
//! are checked against the f64 reference and, bitwise, against the `Tensor` API (same kernels, legacy
//! stream), whose own suites check it against the reference.

#[path = "common/mod.rs"]
mod common;

use common::*;
use cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream, DevicePtr};
use flash_attn::raw::{self, BwdViews, FwdViews, Workspace};
use flash_attn::{AttnOptions, DType, Device, Target, Tensor, View};
use half::bf16;
use rand::Rng;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Counts the allocations of threads that ask to be counted.
struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
thread_local!(static COUNT: Cell<bool> = const { Cell::new(false) });
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNT.try_with(|c| c.get()).unwrap_or(false) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
}
#[global_allocator]
static GLOBAL: Counting = Counting;

macro_rules! require_gpu {
    () => {
        if !flash_attn::cuda::available() {
            let _ = writeln!(std::io::stderr(), "SKIPPED gpu_raw test at line {}: no CUDA GPU on this machine (the GPU suite runs on the GPU machine)", line!());
            return;
        }
    };
}

fn seeded(test: &str) -> (u64, rand::rngs::StdRng) {
    let seed: u64 = rand::thread_rng().r#gen();
    eprintln!("{test}: seed {seed}");
    (seed, rng(seed))
}

/// Dense problem sizes: (b, sq, sk, hq, hk, d).
const DIMS: (usize, usize, usize, usize, usize, usize) = (2, 200, 300, 4, 2, 128);

fn contiguous(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len() - 1).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn bits(x: &[f32]) -> Vec<u16> {
    x.iter().map(|&v| bf16::from_f32(v).to_bits()).collect()
}

fn floats(x: &[u16]) -> Vec<f32> {
    x.iter().map(|&b| bf16::from_bits(b).to_f32()).collect()
}

/// Host inputs of one dense problem (bf16 values as f32, already rounded).
struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}

impl Inputs {
    fn random(rng: &mut rand::rngs::StdRng) -> Inputs {
        let (b, sq, sk, hq, hk, d) = DIMS;
        let r = |rng: &mut _, n| random_values(rng, n, 1.0, DType::BF16);
        Inputs { q: r(rng, b * sq * hq * d), k: r(rng, b * sk * hk * d), v: r(rng, b * sk * hk * d), dout: r(rng, b * sq * hq * d) }
    }
}

/// Device buffers of one problem, allocated by the caller on `stream`.
struct Buffers {
    q: CudaSlice<u16>,
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
    dout: CudaSlice<u16>,
    out: CudaSlice<u16>,
    lse: CudaSlice<f32>,
    dq: CudaSlice<u16>,
    dk: CudaSlice<u16>,
    dv: CudaSlice<u16>,
    ws: CudaSlice<u8>,
}

struct Shapes {
    q: [usize; 4],
    kv: [usize; 4],
    lse: [usize; 3],
    sq: Vec<usize>,
    skv: Vec<usize>,
    slse: Vec<usize>,
}

fn shapes() -> &'static Shapes {
    static S: std::sync::OnceLock<Shapes> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        let (b, sq, sk, hq, hk, d) = DIMS;
        let (q, kv, lse) = ([b, sq, hq, d], [b, sk, hk, d], [b, hq, sq]);
        Shapes { sq: contiguous(&q), skv: contiguous(&kv), slse: contiguous(&lse), q, kv, lse }
    })
}

fn ptr<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    let (p, _sync) = s.device_ptr(stream);
    p
}

impl Buffers {
    fn new(stream: &Arc<CudaStream>, x: &Inputs, deterministic: bool) -> Buffers {
        let (b, sq, sk, hq, hk, d) = DIMS;
        let up = |v: &[f32]| stream.clone_htod(&bits(v)).unwrap();
        // The size the Tensor API allocates: the same dq copies in deterministic mode, so the same bits.
        let ws_bytes = raw::bwd_workspace_bytes_fast(&[b, sq, hq, d], b, hk, deterministic).unwrap();
        Buffers {
            q: up(&x.q),
            k: up(&x.k),
            v: up(&x.v),
            dout: up(&x.dout),
            out: stream.alloc_zeros(b * sq * hq * d).unwrap(),
            lse: stream.alloc_zeros(b * hq * sq).unwrap(),
            dq: stream.alloc_zeros(b * sq * hq * d).unwrap(),
            dk: stream.alloc_zeros(b * sk * hk * d).unwrap(),
            dv: stream.alloc_zeros(b * sk * hk * d).unwrap(),
            ws: stream.alloc_zeros(ws_bytes.max(1)).unwrap(),
        }
    }

    /// The raw layer's views of these buffers.
    fn views(&self, stream: &Arc<CudaStream>) -> (FwdViews<'static>, BwdViews<'static>, Workspace) {
        let st = shapes();
        let view = |addr, shape: &'static [usize], strides: &'static [usize], dtype| View { addr, dtype, shape, strides };
        let (bf, f32_) = (DType::BF16, DType::F32);
        let fv = FwdViews {
            q: view(ptr(&self.q, stream), &st.q, &st.sq, bf),
            k: view(ptr(&self.k, stream), &st.kv, &st.skv, bf),
            v: view(ptr(&self.v, stream), &st.kv, &st.skv, bf),
            out: view(ptr(&self.out, stream), &st.q, &st.sq, bf),
            lse: view(ptr(&self.lse, stream), &st.lse, &st.slse, f32_),
            alibi_slopes: None,
            s_dmask: None,
        };
        let bv = BwdViews {
            dout: view(ptr(&self.dout, stream), &st.q, &st.sq, bf),
            q: fv.q,
            k: fv.k,
            v: fv.v,
            out: fv.out,
            lse: fv.lse,
            dq: view(ptr(&self.dq, stream), &st.q, &st.sq, bf),
            dk: view(ptr(&self.dk, stream), &st.kv, &st.skv, bf),
            dv: view(ptr(&self.dv, stream), &st.kv, &st.skv, bf),
            alibi_slopes: None,
        };
        (fv, bv, Workspace { addr: ptr(&self.ws, stream), bytes: self.ws.len() })
    }

    /// fwd then bwd on `stream`, through the raw layer.
    fn run(&self, stream: &Arc<CudaStream>, opts: &AttnOptions, deterministic: bool) -> flash_attn::Result<()> {
        let (fv, bv, ws) = self.views(stream);
        unsafe { fwd_bwd(&fv, &bv, ws, stream, opts, deterministic) }
    }

    fn results(&self, stream: &Arc<CudaStream>) -> [Vec<f32>; 5] {
        let h = |s: &CudaSlice<u16>| floats(&stream.clone_dtoh(s).unwrap());
        [h(&self.out), stream.clone_dtoh(&self.lse).unwrap(), h(&self.dq), h(&self.dk), h(&self.dv)]
    }
}

unsafe fn fwd_bwd(fv: &FwdViews<'_>, bv: &BwdViews<'_>, ws: Workspace, stream: &Arc<CudaStream>, opts: &AttnOptions, deterministic: bool) -> flash_attn::Result<()> {
    let target = Target::Cuda { ordinal: 0, stream: stream.cu_stream() as usize };
    unsafe {
        raw::fwd(fv, opts, target)?;
        raw::bwd(bv, opts, deterministic, ws, target)
    }
}

/// The `Tensor` API's results for the same inputs (out, lse, dq, dk, dv).
fn tensor_api(x: &Inputs, opts: &AttnOptions, deterministic: bool) -> [Vec<f32>; 5] {
    let s = shapes();
    let t = |v: &[f32], shape: &[usize]| Tensor::from_f32(v, shape, DType::BF16).unwrap().to_device(Device::Cuda(0)).unwrap();
    let (q, k, v, dout) = (t(&x.q, &s.q), t(&x.k, &s.kv), t(&x.v, &s.kv), t(&x.dout, &s.q));
    let f = flash_attn::fwd(&q, &k, &v, opts).unwrap();
    let g = flash_attn::bwd(&dout, &q, &k, &v, &f.out, &f.lse, opts, deterministic).unwrap();
    [f.out.to_f32_vec().unwrap(), f.lse.to_f32_vec().unwrap(), g.dq.to_f32_vec().unwrap(), g.dk.to_f32_vec().unwrap(), g.dv.to_f32_vec().unwrap()]
}

fn opts() -> AttnOptions {
    AttnOptions { causal: true, softcap: 0.0, ..Default::default() }
}

/// The primary context and a new non-blocking stream in it. cudarc's per-buffer events are off: they
/// would add waits on events recorded outside a graph capture (as candle turns them off too).
fn caller_stream() -> (Arc<CudaContext>, Arc<CudaStream>) {
    let ctx = CudaContext::new(0).unwrap();
    unsafe { ctx.disable_event_tracking() };
    (ctx.clone(), ctx.new_stream().unwrap())
}

/// Forward and backward on the caller's non-blocking stream over the caller's memory: out and lse agree
/// with the f64 reference, and everything bitwise with the `Tensor` API.
#[test]
fn raw_on_a_caller_stream_matches_reference_and_tensor_api() {
    require_gpu!();
    let (seed, mut rng) = seeded("raw_on_a_caller_stream");
    let x = Inputs::random(&mut rng);
    let (_ctx, stream) = caller_stream();
    let bufs = Buffers::new(&stream, &x, true);
    bufs.run(&stream, &opts(), true).unwrap();
    let got = bufs.results(&stream);
    let (b, sq, sk, hq, hk, d) = DIMS;
    let r = RefOpts { scale: 1.0 / (d as f64).sqrt(), softcap: 0.0, causal: true, window: (-1, -1) };
    let (ro, rl) = reference_fwd(&x.q, &x.k, &x.v, b, sq, sk, hq, hk, d, &r);
    let worst = check_close(&got[0], &got[1], &ro, &rl, &gpu_tolerance(DType::BF16, 1.0, d as f64 * r.scale)).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    eprintln!("raw fwd vs f64 reference: worst |diff|/tol out {:.3} lse {:.3}", worst.0, worst.1);
    let want = tensor_api(&x, &opts(), true);
    for (i, name) in ["out", "lse", "dq", "dk", "dv"].iter().enumerate() {
        assert!(got[i].iter().zip(&want[i]).all(|(a, b)| a.to_bits() == b.to_bits()), "seed {seed}: {name} differs from the Tensor API");
    }
}

/// fwd + bwd captured into a CUDA graph on the caller's stream, replayed twice over new inputs written
/// into the same buffers: each replay equals a direct call on those inputs.
#[test]
fn graph_capture_and_replay() {
    require_gpu!();
    let (seed, mut rng) = seeded("graph_capture_and_replay");
    let (_ctx, stream) = caller_stream();
    let first = Inputs::random(&mut rng);
    let mut bufs = Buffers::new(&stream, &first, true);
    raw::preload(0).unwrap();
    let (fv, bv, ws) = bufs.views(&stream);
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    let queued = unsafe { fwd_bwd(&fv, &bv, ws, &stream, &opts(), true) };
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0)).unwrap().expect("a captured graph");
    queued.unwrap();
    for replay in 0..2 {
        let x = Inputs::random(&mut rng);
        stream.memcpy_htod(&bits(&x.q), &mut bufs.q).unwrap();
        stream.memcpy_htod(&bits(&x.k), &mut bufs.k).unwrap();
        stream.memcpy_htod(&bits(&x.v), &mut bufs.v).unwrap();
        stream.memcpy_htod(&bits(&x.dout), &mut bufs.dout).unwrap();
        graph.launch().unwrap();
        let got = bufs.results(&stream);
        let want = tensor_api(&x, &opts(), true);
        for (i, name) in ["out", "lse", "dq", "dk", "dv"].iter().enumerate() {
            assert!(got[i].iter().zip(&want[i]).all(|(a, b)| a.to_bits() == b.to_bits()), "seed {seed}: replay {replay}: {name} differs from a direct call");
        }
    }
}

/// Four host threads, each with its own stream and outputs, run fwd + bwd over shared inputs at once,
/// ten times each: every result equals the single-threaded one bitwise. The calls allocate nothing.
#[test]
fn threads_with_their_own_streams_and_no_allocation() {
    require_gpu!();
    let (seed, mut rng) = seeded("threads_with_their_own_streams");
    let x = Arc::new(Inputs::random(&mut rng));
    let want = Arc::new(tensor_api(&x, &opts(), true));
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let (x, want) = (x.clone(), want.clone());
            std::thread::spawn(move || {
                let (_ctx, stream) = caller_stream();
                let bufs = Buffers::new(&stream, &x, true);
                bufs.run(&stream, &opts(), true).unwrap(); // warm: module and kernels loaded
                for i in 0..10 {
                    ALLOCS.store(0, Ordering::Relaxed);
                    let (fv, bv, ws) = bufs.views(&stream);
                    COUNT.with(|c| c.set(true));
                    let fwd_bwd = unsafe { fwd_bwd(&fv, &bv, ws, &stream, &opts(), true) };
                    COUNT.with(|c| c.set(false));
                    fwd_bwd.unwrap();
                    let allocs = ALLOCS.load(Ordering::Relaxed);
                    let got = bufs.results(&stream);
                    for (j, name) in ["out", "lse", "dq", "dk", "dv"].iter().enumerate() {
                        assert!(got[j].iter().zip(&want[j]).all(|(a, b)| a.to_bits() == b.to_bits()), "seed {seed}: thread {t} iteration {i}: {name} differs");
                    }
                    // Other threads may count into the shared counter too: any allocation is a failure.
                    assert_eq!(allocs, 0, "thread {t} iteration {i}: the raw calls allocated");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a thread failed");
    }
}

/// q, k, v as interleaved slices of one packed `[B, S, 3, H, D]` buffer and dq, dk, dv written into one
/// packed gradient buffer (flash-attn's qkvpacked layout): accepted (no false alias), and bitwise equal
/// to contiguous inputs; the gradient buffer's every element is written.
#[test]
fn packed_qkv_views() {
    require_gpu!();
    let (seed, mut rng) = seeded("packed_qkv_views");
    let (b, s_, h, d) = (2, 160, 3, 64);
    let n = b * s_ * 3 * h * d;
    let qkv = random_values(&mut rng, n, 1.0, DType::BF16);
    let dout = random_values(&mut rng, b * s_ * h * d, 1.0, DType::BF16);
    let (_ctx, stream) = caller_stream();
    let dq_buf = stream.clone_htod(&vec![bf16::from_f32(f32::NAN).to_bits(); n]).unwrap();
    let qkv_buf = stream.clone_htod(&bits(&qkv)).unwrap();
    let dout_buf = stream.clone_htod(&bits(&dout)).unwrap();
    let out_buf = stream.alloc_zeros::<u16>(b * s_ * h * d).unwrap();
    let lse_buf = stream.alloc_zeros::<f32>(b * h * s_).unwrap();
    // The size the Tensor API allocates (the same dq copies, so the same bits).
    let ws_buf = stream.alloc_zeros::<u8>(raw::bwd_workspace_bytes_fast(&[b, s_, h, d], b, h, true).unwrap()).unwrap();
    let shape = [b, s_, h, d];
    let strides = [s_ * 3 * h * d, 3 * h * d, d, 1];
    let cont = contiguous(&shape);
    let (lse_shape, lse_strides) = ([b, h, s_], contiguous(&[b, h, s_]));
    let at = |buf: &CudaSlice<u16>, i: usize| ptr(buf, &stream) + (i * h * d * 2) as u64;
    let v = |addr, strides| View { addr, dtype: DType::BF16, shape: &shape, strides };
    let fv = FwdViews { q: v(at(&qkv_buf, 0), &strides), k: v(at(&qkv_buf, 1), &strides), v: v(at(&qkv_buf, 2), &strides), out: v(ptr(&out_buf, &stream), &cont), lse: View { addr: ptr(&lse_buf, &stream), dtype: DType::F32, shape: &lse_shape, strides: &lse_strides }, alibi_slopes: None, s_dmask: None };
    let bv = BwdViews { dout: v(ptr(&dout_buf, &stream), &cont), q: fv.q, k: fv.k, v: fv.v, out: fv.out, lse: fv.lse, dq: v(at(&dq_buf, 0), &strides), dk: v(at(&dq_buf, 1), &strides), dv: v(at(&dq_buf, 2), &strides), alibi_slopes: None };
    let target = Target::Cuda { ordinal: 0, stream: stream.cu_stream() as usize };
    let o = AttnOptions::default();
    unsafe {
        raw::fwd(&fv, &o, target).unwrap();
        raw::bwd(&bv, &o, true, Workspace { addr: ptr(&ws_buf, &stream), bytes: ws_buf.len() }, target).unwrap();
    }
    let grads = floats(&stream.clone_dtoh(&dq_buf).unwrap());
    let out = floats(&stream.clone_dtoh(&out_buf).unwrap());
    // The same problem through the Tensor API on contiguous copies.
    let pick = |i: usize| -> Vec<f32> { (0..b * s_).flat_map(|r| qkv[(r * 3 + i) * h * d..][..h * d].to_vec()).collect() };
    let t = |x: &[f32]| Tensor::from_f32(x, &shape, DType::BF16).unwrap().to_device(Device::Cuda(0)).unwrap();
    let (q, k, vv, g) = (t(&pick(0)), t(&pick(1)), t(&pick(2)), t(&dout));
    let f = flash_attn::fwd(&q, &k, &vv, &o).unwrap();
    let w = flash_attn::bwd(&g, &q, &k, &vv, &f.out, &f.lse, &o, true).unwrap();
    assert!(out.iter().zip(f.out.to_f32_vec().unwrap()).all(|(a, b)| a.to_bits() == b.to_bits()), "seed {seed}: out");
    for (i, (name, want)) in [("dq", w.dq.to_f32_vec().unwrap()), ("dk", w.dk.to_f32_vec().unwrap()), ("dv", w.dv.to_f32_vec().unwrap())].into_iter().enumerate() {
        let got: Vec<f32> = (0..b * s_).flat_map(|r| grads[(r * 3 + i) * h * d..][..h * d].to_vec()).collect();
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "seed {seed}: {name} in the packed buffer");
    }
}
