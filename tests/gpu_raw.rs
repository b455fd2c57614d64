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

/// A view of `addr` (the forward tests' argument order).
fn view<'a>(addr: u64, shape: &'a [usize], strides: &'a [usize], dtype: DType) -> View<'a> {
    View { addr, dtype, shape, strides }
}

/// The `Tensor` API's dense bf16 forward of q, k, v = `x[0..3]` (q of shape `q_shape`, k and v of
/// `kv_shape`): out's bits and lse.
fn tensor_api_fwd(x: &[Vec<f32>], q_shape: &[usize], kv_shape: &[usize], o: &AttnOptions) -> (Vec<u16>, Vec<f32>) {
    let t = |v: &[f32], shape: &[usize]| Tensor::from_f32(v, shape, DType::BF16).unwrap().to_device(Device::Cuda(0)).unwrap();
    let f = flash_attn::fwd(&t(&x[0], q_shape), &t(&x[1], kv_shape), &t(&x[2], kv_shape), o).unwrap();
    (bits(&f.out.to_f32_vec().unwrap()), f.lse.to_f32_vec().unwrap())
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

/// The warp-specialized forward's dynamic tile scheduling (a counter entry per launch in flight, reset
/// by each launch's last block) with more tiles than multiprocessors: four host threads with their own
/// streams run a causal forward of 288 row-block tiles at once, eight times each, over outputs first set
/// to NaN, and a graph of two such launches is replayed three times. Every result equals the `Tensor`
/// API's bitwise (a tile drawn twice or never would leave a difference or a NaN), and every row's lse is
/// finite (each has keys).
#[test]
fn many_tiles_on_several_streams_at_once() {
    require_gpu!();
    let (seed, mut rng) = seeded("many_tiles_on_several_streams_at_once");
    let (b, s, h, d) = (3usize, 1536usize, 8usize, 128usize);
    let (shape, lse_shape) = ([b, s, h, d], [b, h, s]);
    let (strides, lse_strides) = (contiguous(&shape), contiguous(&lse_shape));
    let r = |rng: &mut _| random_values(rng, b * s * h * d, 1.0, DType::BF16);
    let x = Arc::new([r(&mut rng), r(&mut rng), r(&mut rng)]);
    let o = AttnOptions { causal: true, ..Default::default() };
    let want = Arc::new(tensor_api_fwd(&x[..], &shape, &shape, &o));
    assert!(want.1.iter().all(|l| l.is_finite()), "seed {seed}: the Tensor API gave a non-finite lse");
    let run = move |t: usize, calls: usize, graph: bool| {
        let (_ctx, stream) = caller_stream();
        let up = |v: &[f32]| stream.clone_htod(&bits(v)).unwrap();
        let (q, k, v) = (up(&x[0]), up(&x[1]), up(&x[2]));
        let mut out = stream.alloc_zeros::<u16>(b * s * h * d).unwrap();
        let mut lse = stream.alloc_zeros::<f32>(b * h * s).unwrap();
        let (sh, st, lsh, lst) = (&shape[..], &strides[..], &lse_shape[..], &lse_strides[..]);
        let fv = FwdViews {
            q: view(ptr(&q, &stream), sh, st, DType::BF16),
            k: view(ptr(&k, &stream), sh, st, DType::BF16),
            v: view(ptr(&v, &stream), sh, st, DType::BF16),
            out: view(ptr(&out, &stream), sh, st, DType::BF16),
            lse: view(ptr(&lse, &stream), lsh, lst, DType::F32),
            alibi_slopes: None,
            s_dmask: None,
        };
        let target = Target::Cuda { ordinal: 0, stream: stream.cu_stream() as usize };
        let check = |out: &CudaSlice<u16>, lse: &CudaSlice<f32>, what: String| {
            let (got_o, got_l) = (stream.clone_dtoh(out).unwrap(), stream.clone_dtoh(lse).unwrap());
            assert!(got_o == want.0, "seed {seed}: {what}: out differs from the Tensor API");
            assert!(got_l.iter().zip(&want.1).all(|(a, b)| a.to_bits() == b.to_bits()), "seed {seed}: {what}: lse differs from the Tensor API");
        };
        let nan = |out: &mut CudaSlice<u16>, lse: &mut CudaSlice<f32>| {
            stream.memcpy_htod(&vec![0x7fc0u16; b * s * h * d], out).unwrap();
            stream.memcpy_htod(&vec![f32::NAN; b * h * s], lse).unwrap();
        };
        if graph {
            stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
            let queued = unsafe { raw::fwd(&fv, &o, target).and_then(|()| raw::fwd(&fv, &o, target)) };
            let g = stream.end_capture(sys::CUgraphInstantiate_flags(0)).unwrap().expect("a captured graph");
            queued.unwrap();
            for i in 0..calls {
                nan(&mut out, &mut lse);
                g.launch().unwrap();
                check(&out, &lse, format!("graph replay {i}"));
            }
        } else {
            for i in 0..calls {
                nan(&mut out, &mut lse);
                unsafe { raw::fwd(&fv, &o, target) }.unwrap();
                check(&out, &lse, format!("thread {t} call {i}"));
            }
        }
    };
    raw::preload(0).unwrap();
    let handles: Vec<_> = (0..4).map(|t| { let run = run.clone(); std::thread::spawn(move || run(t, 8, false)) }).collect();
    for h in handles {
        h.join().expect("a thread failed");
    }
    run(0, 3, true);
}

/// One dense bf16 problem of `launches_in_flight_at_once_never_share_a_tile_counter` on the caller's
/// memory: inputs, outputs (set to NaN before each run) and the `Tensor` API's result.
struct Held {
    q_shape: [usize; 4],
    kv_shape: [usize; 4],
    lse_shape: [usize; 3],
    strides: [Vec<usize>; 3],
    bufs: [CudaSlice<u16>; 4],
    lse: CudaSlice<f32>,
    opts: AttnOptions,
    want: (Vec<u16>, Vec<f32>),
}

impl Held {
    /// Unmasked (every row has keys: its lse is finite).
    fn new(rng: &mut rand::rngs::StdRng, stream: &Arc<CudaStream>, (b, sq, sk, hq, hk, d): (usize, usize, usize, usize, usize, usize)) -> Held {
        let (q_shape, kv_shape, lse_shape) = ([b, sq, hq, d], [b, sk, hk, d], [b, hq, sq]);
        let x = [random_values(rng, b * sq * hq * d, 1.0, DType::BF16), random_values(rng, b * sk * hk * d, 1.0, DType::BF16), random_values(rng, b * sk * hk * d, 1.0, DType::BF16)];
        let opts = AttnOptions::default();
        let want = tensor_api_fwd(&x, &q_shape, &kv_shape, &opts);
        assert!(want.1.iter().all(|l| l.is_finite()), "the Tensor API gave a non-finite lse");
        let up = |v: &[f32]| stream.clone_htod(&bits(v)).unwrap();
        let bufs = [up(&x[0]), up(&x[1]), up(&x[2]), stream.alloc_zeros::<u16>(x[0].len()).unwrap()];
        let lse = stream.alloc_zeros::<f32>(b * hq * sq).unwrap();
        Held { q_shape, kv_shape, lse_shape, strides: [contiguous(&q_shape), contiguous(&kv_shape), contiguous(&lse_shape)], bufs, lse, opts, want }
    }

    fn views<'a>(&'a self, stream: &Arc<CudaStream>) -> FwdViews<'a> {
        let v = |i: usize, shape: &'a [usize], st: &'a [usize]| view(ptr(&self.bufs[i], stream), shape, st, DType::BF16);
        let (q, kv) = (&self.q_shape[..], &self.kv_shape[..]);
        FwdViews {
            q: v(0, q, &self.strides[0]),
            k: v(1, kv, &self.strides[1]),
            v: v(2, kv, &self.strides[1]),
            out: v(3, q, &self.strides[0]),
            lse: view(ptr(&self.lse, stream), &self.lse_shape, &self.strides[2], DType::F32),
            alibi_slopes: None,
            s_dmask: None,
        }
    }

    fn set_nan(&mut self, stream: &Arc<CudaStream>) {
        let (n, m) = (self.bufs[3].len(), self.lse.len());
        stream.memcpy_htod(&vec![0x7fc0u16; n], &mut self.bufs[3]).unwrap();
        stream.memcpy_htod(&vec![f32::NAN; m], &mut self.lse).unwrap();
        stream.synchronize().unwrap();
    }

    fn check(&self, stream: &Arc<CudaStream>, seed: u64, what: &str) {
        let (got_o, got_l) = (stream.clone_dtoh(&self.bufs[3]).unwrap(), stream.clone_dtoh(&self.lse).unwrap());
        let wrong = got_o.iter().zip(&self.want.0).filter(|(a, b)| a != b).count();
        let wrong_l = got_l.iter().zip(&self.want.1).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert!(wrong == 0 && wrong_l == 0, "seed {seed}: {what}: out differs from the Tensor API in {wrong} of {} elements, lse in {wrong_l} of {}", got_o.len(), got_l.len());
    }
}

/// Holds a stream at a host function until `GATE_OPEN` (`launches_in_flight_at_once_never_share_a_tile_counter`).
static GATE_OPEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

unsafe extern "C" fn gate(_: *mut std::ffi::c_void) {
    while !GATE_OPEN.load(Ordering::Acquire) {
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// The warp-specialized forward's launches in flight at once each draw their tiles from a counter entry
/// no other one uses. Launch A (1024 tiles of 128 queries against 16384 keys) on a stream of the lowest
/// priority and launch C (2048 short tiles) on one of the highest are held behind one gate, 1023 small
/// launches queued on a third stream between them (with the entries dealt in turn, 1024 of them, as
/// before, A and C met on one entry); a launch D of SMs / 2 one-millisecond tiles goes out just before
/// the gate opens, so that A starts on the SMs D leaves and C takes D's when they free up, while A's
/// blocks are still drawing: A and C draw at once (on one entry each would skip the tiles the other
/// drew). All three equal the `Tensor` API bitwise over outputs first set to NaN. Then two graphs,
/// captured 1024 launches apart on two streams, replayed at once.
#[test]
fn launches_in_flight_at_once_never_share_a_tile_counter() {
    require_gpu!();
    let (seed, mut rng) = seeded("launches_in_flight_at_once_never_share_a_tile_counter");
    let ctx = CudaContext::new(0).unwrap();
    unsafe { ctx.disable_event_tracking() };
    let sms = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).unwrap() as usize;
    let (sa, sb, sc) = (ctx.new_stream().unwrap(), ctx.new_stream().unwrap(), ctx.new_stream().unwrap());
    let mut held = [Held::new(&mut rng, &sa, (1, 128, 16384, 1024, 1, 128)), Held::new(&mut rng, &sa, (1, 16384, 128, 16, 16, 128))];
    let mut blocker = Held::new(&mut rng, &sa, (1, 128, 65536, sms / 2, 1, 128));
    let small = Held::new(&mut rng, &sb, (1, 128, 128, 1, 1, 128));
    sa.synchronize().unwrap();
    sb.synchronize().unwrap();
    let target = |s: &Arc<CudaStream>| Target::Cuda { ordinal: 0, stream: s.cu_stream() as usize };
    let smalls = || {
        let v = small.views(&sb);
        for _ in 0..1023 {
            unsafe { raw::fwd(&v, &small.opts, target(&sb)) }.unwrap();
        }
    };
    raw::preload(0).unwrap();
    // A host function holds A's stream; `waiting` waits for A's to pass it.
    let hold = |waiting: sys::CUstream| {
        GATE_OPEN.store(false, Ordering::Release);
        unsafe { sys::cuLaunchHostFunc(sa.cu_stream(), Some(gate), std::ptr::null_mut()) }.result().unwrap();
        let passed = sa.record_event(None).unwrap();
        unsafe { sys::cuStreamWaitEvent(waiting, passed.cu_event(), 0) }.result().unwrap();
    };
    // Eager launches, C on a stream of the highest priority.
    ctx.bind_to_thread().unwrap();
    let (mut least, mut greatest) = (0, 0);
    unsafe { sys::cuCtxGetStreamPriorityRange(&mut least, &mut greatest) }.result().unwrap();
    let mut high: sys::CUstream = std::ptr::null_mut();
    unsafe { sys::cuStreamCreateWithPriority(&mut high, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32, greatest) }.result().unwrap();
    for h in held.iter_mut().chain([&mut blocker]) {
        h.set_nan(&sa);
    }
    hold(high);
    let queued = unsafe { raw::fwd(&held[0].views(&sa), &held[0].opts, target(&sa)) };
    smalls();
    let high_target = Target::Cuda { ordinal: 0, stream: high as usize };
    let queued = queued.and_then(|()| unsafe { raw::fwd(&held[1].views(&sa), &held[1].opts, high_target) });
    sb.synchronize().unwrap();
    let queued = queued.and_then(|()| unsafe { raw::fwd(&blocker.views(&sb), &blocker.opts, target(&sb)) });
    GATE_OPEN.store(true, Ordering::Release);
    queued.unwrap();
    for st in [&sa, &sb] {
        st.synchronize().unwrap();
    }
    unsafe { sys::cuStreamSynchronize(high) }.result().unwrap();
    unsafe { sys::cuStreamDestroy_v2(high) }.result().unwrap();
    held[0].check(&sa, seed, "eager launch A");
    held[1].check(&sa, seed, "eager launch C (high priority)");
    blocker.check(&sa, seed, "eager launch D");
    // Graphs captured 1024 launches apart, replayed at once.
    let capture = |stream: &Arc<CudaStream>, h: &Held| {
        stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
        let queued = unsafe { raw::fwd(&h.views(stream), &h.opts, target(stream)) };
        let g = stream.end_capture(sys::CUgraphInstantiate_flags(0)).unwrap().expect("a captured graph");
        queued.unwrap();
        g
    };
    let ga = capture(&sa, &held[0]);
    smalls();
    sb.synchronize().unwrap();
    let gc = capture(&sc, &held[1]);
    for h in held.iter_mut() {
        h.set_nan(&sa);
    }
    hold(sc.cu_stream());
    let replayed = ga.launch().and_then(|()| gc.launch());
    GATE_OPEN.store(true, Ordering::Release);
    replayed.unwrap();
    for st in [&sa, &sc] {
        st.synchronize().unwrap();
    }
    held[0].check(&sa, seed, "graph A");
    held[1].check(&sa, seed, "graph C");
}

/// The first call on a device (the module's load, which allocates) while another thread captures a graph in
/// global mode: the load succeeds and the other thread's capture stays valid. Run in a child process of this
/// test binary (`FA_FIRST_LOAD_CHILD`), where nothing has loaded the module yet.
#[test]
fn first_load_during_another_threads_global_capture() {
    require_gpu!();
    if std::env::var_os("FA_FIRST_LOAD_CHILD").is_none() {
        let exe = std::env::current_exe().expect("the test binary's path");
        let o = std::process::Command::new(exe)
            .env("FA_FIRST_LOAD_CHILD", "1")
            .args(["--exact", "first_load_during_another_threads_global_capture", "--test-threads", "1", "--nocapture"])
            .output()
            .expect("the test binary runs");
        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success() && text.contains("1 passed"), "in a fresh process:\n{text}");
        return;
    }
    let ctx = CudaContext::new(0).unwrap();
    let capturing = ctx.new_stream().unwrap();
    let (begun_tx, begun_rx) = std::sync::mpsc::channel();
    let (loaded_tx, loaded_rx) = std::sync::mpsc::channel::<()>();
    let capturer = std::thread::spawn(move || {
        capturing.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL).unwrap();
        begun_tx.send(()).unwrap();
        loaded_rx.recv().unwrap();
        capturing.end_capture(sys::CUgraphInstantiate_flags(0)).map(|g| g.is_some())
    });
    begun_rx.recv().unwrap();
    let loaded = raw::preload(0);
    loaded_tx.send(()).unwrap();
    let captured = capturer.join().expect("the capturing thread");
    loaded.expect("the module's load during another thread's global capture");
    assert!(matches!(captured, Ok(_)), "the other thread's capture was invalidated: {captured:?}");
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

/// One serving step through the raw layer on the caller's non-blocking stream: append one new key and
/// value per row with rotary (q turned too), decode over the cache with split-KV (the append, decode and
/// combine kernels, chained by programmatic launches on Hopper), over a contiguous and a paged cache.
/// A direct call and a CUDA graph of the step (captured once, replayed over new q / new keys written
/// into the same buffers, the caches reset) each give bitwise what the `Tensor` API gives on the same
/// inputs: out, lse and both updated caches.
#[test]
fn kvcache_step_on_a_caller_stream_and_in_a_graph() {
    require_gpu!();
    let (seed, mut rng) = seeded("kvcache_step_on_a_caller_stream_and_in_a_graph");
    use flash_attn::raw::KvCacheViews;
    use flash_attn::{KvCache, KvCacheOptions};
    let (b, cap, hq, hk, d, rot, page) = (3usize, 384usize, 8usize, 2usize, 128usize, 64usize, 64usize);
    let lens = [300i32, 17, 200];
    let opts = AttnOptions { causal: true, ..Default::default() };
    let kv = KvCacheOptions { rotary_interleaved: false, num_splits: 3 };
    // Rotary tables [cap, rot / 2] (f32), the usual inverse-frequency angles.
    let (cos, sin): (Vec<f32>, Vec<f32>) = (0..cap * rot / 2).map(|i| {
        let (pos, j) = (i / (rot / 2), i % (rot / 2));
        let a = pos as f64 / 10000f64.powf(2.0 * j as f64 / rot as f64);
        (a.cos() as f32, a.sin() as f32)
    }).unzip();
    let (_ctx, stream) = caller_stream();
    raw::preload(0).unwrap();
    let target = Target::Cuda { ordinal: 0, stream: stream.cu_stream() as usize };
    let gpu = Device::Cuda(0);
    for paged in [false, true] {
        let (cache_shape, table): ([usize; 4], Option<Vec<i32>>) = if paged {
            // Row r's i-th page: a fixed scatter over the pool.
            let blocks = b * cap / page;
            ([blocks, page, hk, d], Some((0..blocks).map(|i| ((i * 7 + 3) % blocks) as i32).collect()))
        } else {
            ([b, cap, hk, d], None)
        };
        let n_cache: usize = cache_shape.iter().product();
        let (k0, v0) = (random_values(&mut rng, n_cache, 1.0, DType::BF16), random_values(&mut rng, n_cache, 1.0, DType::BF16));
        let step = |rng: &mut rand::rngs::StdRng| [b * hq * d, b * hk * d, b * hk * d].map(|n| random_values(rng, n, 1.0, DType::BF16));
        // The Tensor API on the legacy stream: out, lse, k_cache, v_cache.
        let reference = |x: &[Vec<f32>; 3]| -> [Vec<f32>; 4] {
            let t = |v: &[f32], shape: &[usize]| Tensor::from_f32(v, shape, DType::BF16).unwrap().to_device(gpu).unwrap();
            let (q, k_new, v_new) = (t(&x[0], &[b, 1, hq, d]), t(&x[1], &[b, 1, hk, d]), t(&x[2], &[b, 1, hk, d]));
            let (mut kc, mut vc) = (t(&k0, &cache_shape), t(&v0, &cache_shape));
            let seqlens = Tensor::from_i32(lens.to_vec(), &[b]).unwrap().to_device(gpu).unwrap();
            let table_t = table.as_ref().map(|e| Tensor::from_i32(e.clone(), &[b, cap / page]).unwrap().to_device(gpu).unwrap());
            let f32t = |v: &[f32]| Tensor::from_f32(v, &[cap, rot / 2], DType::F32).unwrap().to_device(gpu).unwrap();
            let (cos_t, sin_t) = (f32t(&cos), f32t(&sin));
            let cache = KvCache { block_table: table_t.as_ref(), k_new: Some(&k_new), v_new: Some(&v_new), rotary_cos: Some(&cos_t), rotary_sin: Some(&sin_t), ..KvCache::new(&seqlens) };
            let o = flash_attn::fwd_kvcache(&q, &mut kc, &mut vc, &cache, &opts, &kv).unwrap();
            [o.out.to_f32_vec().unwrap(), o.lse.to_f32_vec().unwrap(), kc.to_f32_vec().unwrap(), vc.to_f32_vec().unwrap()]
        };
        // The caller's buffers.
        let x0 = step(&mut rng);
        let (mut q_buf, mut kn_buf, mut vn_buf) = (stream.clone_htod(&bits(&x0[0])).unwrap(), stream.clone_htod(&bits(&x0[1])).unwrap(), stream.clone_htod(&bits(&x0[2])).unwrap());
        let (mut kc_buf, mut vc_buf) = (stream.clone_htod(&bits(&k0)).unwrap(), stream.clone_htod(&bits(&v0)).unwrap());
        let lens_buf = stream.clone_htod(&lens).unwrap();
        let table_buf = table.as_ref().map(|e| stream.clone_htod(e).unwrap());
        let (cos_buf, sin_buf) = (stream.clone_htod(&cos).unwrap(), stream.clone_htod(&sin).unwrap());
        let out_buf = stream.alloc_zeros::<u16>(b * hq * d).unwrap();
        let lse_buf = stream.alloc_zeros::<f32>(b * hq).unwrap();
        let (q_shape, new_shape, lse_shape, rot_shape, b_shape, t_shape) = ([b, 1, hq, d], [b, 1, hk, d], [b, hq, 1], [cap, rot / 2], [b], [b, cap / page]);
        let (sq, snew, scache, slse, srot, sb, st) = (contiguous(&q_shape), contiguous(&new_shape), contiguous(&cache_shape), contiguous(&lse_shape), contiguous(&rot_shape), vec![1usize], contiguous(&t_shape));
        fn view<'a>(addr: u64, dtype: DType, shape: &'a [usize], strides: &'a [usize]) -> View<'a> {
            View { addr, dtype, shape, strides }
        }
        let bf = DType::BF16;
        let views = KvCacheViews {
            q: view(ptr(&q_buf, &stream), bf, &q_shape, &sq),
            k_cache: view(ptr(&kc_buf, &stream), bf, &cache_shape, &scache),
            v_cache: view(ptr(&vc_buf, &stream), bf, &cache_shape, &scache),
            cache_seqlens: view(ptr(&lens_buf, &stream), DType::I32, &b_shape, &sb),
            block_table: table_buf.as_ref().map(|t| view(ptr(t, &stream), DType::I32, &t_shape, &st)),
            k_new: Some(view(ptr(&kn_buf, &stream), bf, &new_shape, &snew)),
            v_new: Some(view(ptr(&vn_buf, &stream), bf, &new_shape, &snew)),
            rotary_cos: Some(view(ptr(&cos_buf, &stream), DType::F32, &rot_shape, &srot)),
            rotary_sin: Some(view(ptr(&sin_buf, &stream), DType::F32, &rot_shape, &srot)),
            cache_batch_idx: None,
            cache_leftpad: None,
            alibi_slopes: None,
            out: view(ptr(&out_buf, &stream), bf, &q_shape, &sq),
            lse: view(ptr(&lse_buf, &stream), DType::F32, &lse_shape, &slse),
        };
        let ws_bytes = raw::kvcache_workspace_bytes(&views, &opts, &kv, target).unwrap();
        let ws_buf = stream.alloc_zeros::<u8>(ws_bytes.max(1)).unwrap();
        let ws = Workspace { addr: ptr(&ws_buf, &stream), bytes: ws_bytes };
        let results = |kc: &CudaSlice<u16>, vc: &CudaSlice<u16>| -> [Vec<f32>; 4] {
            [floats(&stream.clone_dtoh(&out_buf).unwrap()), stream.clone_dtoh(&lse_buf).unwrap(), floats(&stream.clone_dtoh(kc).unwrap()), floats(&stream.clone_dtoh(vc).unwrap())]
        };
        let check = |got: &[Vec<f32>; 4], want: &[Vec<f32>; 4], what: &str| {
            for (i, name) in ["out", "lse", "k_cache", "v_cache"].iter().enumerate() {
                assert_eq!(got[i].len(), want[i].len(), "{what}: {name} length");
                assert!(got[i].iter().zip(&want[i]).all(|(a, b)| a.to_bits() == b.to_bits()), "seed {seed}: paged {paged}: {what}: {name} differs from the Tensor API");
            }
        };
        // A direct call on the caller's stream.
        unsafe { raw::fwd_kvcache(&views, &opts, &kv, ws, target) }.unwrap();
        check(&results(&kc_buf, &vc_buf), &reference(&x0), "direct call");
        // The step captured once, then replayed over new inputs.
        stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
        let queued = unsafe { raw::fwd_kvcache(&views, &opts, &kv, ws, target) };
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0)).unwrap().expect("a captured graph");
        queued.unwrap();
        for replay in 0..2 {
            let x = step(&mut rng);
            stream.memcpy_htod(&bits(&x[0]), &mut q_buf).unwrap();
            stream.memcpy_htod(&bits(&x[1]), &mut kn_buf).unwrap();
            stream.memcpy_htod(&bits(&x[2]), &mut vn_buf).unwrap();
            stream.memcpy_htod(&bits(&k0), &mut kc_buf).unwrap();
            stream.memcpy_htod(&bits(&v0), &mut vc_buf).unwrap();
            graph.launch().unwrap();
            check(&results(&kc_buf, &vc_buf), &reference(&x), &format!("graph replay {replay}"));
        }
    }
}

/// `raw::fwd_decode` (a dense forward's decoding step on the KV cache's decode kernels, no cache lengths
/// tensor) on a caller's stream: out and lse against the f64 reference at shapes whose blocks merge their
/// splits themselves and at ones that take a workspace and the combine kernel; a workspace one byte short, or
/// over k, is an error naming it (and k); the call captured into a graph and replayed over new inputs equals a direct call bit
/// for bit; and it allocates nothing on the host.
#[test]
fn dense_decode_on_a_caller_stream_and_in_a_graph() {
    require_gpu!();
    let (seed, mut rng) = seeded("dense_decode_on_a_caller_stream_and_in_a_graph");
    let (_ctx, stream) = caller_stream();
    raw::preload(0).unwrap();
    let target = Target::Cuda { ordinal: 0, stream: stream.cu_stream() as usize };
    // (b, sq, sk, hq, hk, d, causal, window, softcap, num_splits)
    let cases = [
        (1, 1, 1024, 32, 8, 128, false, (-1, -1), 0.0),
        (1, 1, 8192, 32, 8, 128, false, (-1, -1), 0.0),
        (3, 2, 777, 8, 2, 64, true, (-1, -1), 0.0),
        (2, 4, 3000, 16, 4, 128, false, (100, 0), 0.0),
        (4, 1, 5000, 8, 1, 256, false, (-1, -1), 6.0),
    ];
    let mut saw_workspace = false;
    for (b, sq, sk, hq, hk, d, causal, window, softcap) in cases {
        let what = format!("b {b} sq {sq} sk {sk} hq {hq} hk {hk} d {d} causal {causal} window {window:?} softcap {softcap}");
        let opts = AttnOptions { causal, window, softcap, ..Default::default() };
        let (qs, ks, ls) = ([b, sq, hq, d], [b, sk, hk, d], [b, hq, sq]);
        assert!(raw::dense_fwd_decodes(&qs, &ks, DType::BF16, &opts, false), "{what}: must be a decoding step");
        let (sqs, sks, sls) = (contiguous(&qs), contiguous(&ks), contiguous(&ls));
        let inputs = |rng: &mut rand::rngs::StdRng| [b * sq * hq * d, b * sk * hk * d, b * sk * hk * d].map(|n| random_values(rng, n, 1.0, DType::BF16));
        let x = inputs(&mut rng);
        let mut bufs = x.clone().map(|v| stream.clone_htod(&bits(&v)).unwrap());
        let out = stream.alloc_zeros::<u16>(b * sq * hq * d).unwrap();
        let lse = stream.alloc_zeros::<f32>(b * hq * sq).unwrap();
        let views = |bufs: &[CudaSlice<u16>; 3]| FwdViews {
            q: View { addr: ptr(&bufs[0], &stream), dtype: DType::BF16, shape: &qs, strides: &sqs },
            k: View { addr: ptr(&bufs[1], &stream), dtype: DType::BF16, shape: &ks, strides: &sks },
            v: View { addr: ptr(&bufs[2], &stream), dtype: DType::BF16, shape: &ks, strides: &sks },
            out: View { addr: ptr(&out, &stream), dtype: DType::BF16, shape: &qs, strides: &sqs },
            lse: View { addr: ptr(&lse, &stream), dtype: DType::F32, shape: &ls, strides: &sls },
            alibi_slopes: None,
            s_dmask: None,
        };
        let need = raw::decode_workspace_bytes(&views(&bufs), &opts, target).unwrap();
        saw_workspace |= need > 0;
        let ws_buf = stream.alloc_zeros::<u8>(need.max(1)).unwrap();
        let ws = Workspace { addr: if need > 0 { ptr(&ws_buf, &stream) } else { 0 }, bytes: need };
        if need > 0 {
            let short = Workspace { bytes: need - 1, ..ws };
            let e = unsafe { raw::fwd_decode(&views(&bufs), &opts, short, target) }.expect_err("a short workspace must fail");
            assert!(e.to_string().contains("workspace"), "{what}: {e}");
            // Over k (a 256-byte aligned allocation): named as the dense call's argument.
            let over_k = Workspace { addr: ptr(&bufs[1], &stream), bytes: need };
            let e = unsafe { raw::fwd_decode(&views(&bufs), &opts, over_k, target) }.expect_err("a workspace over k must fail");
            assert!(e.to_string().contains("overlaps k") && !e.to_string().contains("k_cache"), "{what}: {e}");
        }
        let results = || (floats(&stream.clone_dtoh(&out).unwrap()), stream.clone_dtoh(&lse).unwrap());
        // The first call loads its kernels; the second is counted.
        unsafe { raw::fwd_decode(&views(&bufs), &opts, ws, target) }.unwrap();
        ALLOCS.store(0, Ordering::Relaxed);
        COUNT.with(|c| c.set(true));
        let ran = unsafe { raw::fwd_decode(&views(&bufs), &opts, ws, target) };
        COUNT.with(|c| c.set(false));
        ran.unwrap();
        assert_eq!(ALLOCS.load(Ordering::Relaxed), 0, "{what}: fwd_decode allocated on the host");
        let (got_o, got_l) = results();
        let r = RefOpts { scale: 1.0 / (d as f64).sqrt(), softcap: softcap as f64, causal, window };
        let (ro, rl) = reference_fwd(&x[0], &x[1], &x[2], b, sq, sk, hq, hk, d, &r);
        let smax = if softcap > 0.0 { softcap as f64 } else { d as f64 * r.scale };
        let worst = check_close(&got_o, &got_l, &ro, &rl, &gpu_tolerance(DType::BF16, 1.0, smax)).unwrap_or_else(|e| panic!("seed {seed}: {what}: {e}"));
        eprintln!("fwd_decode {what}: workspace {need} bytes, worst |diff|/tol out {:.3} lse {:.3}", worst.0, worst.1);
        // Captured once, replayed over new inputs: each replay equals a direct call.
        stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
        let queued = unsafe { raw::fwd_decode(&views(&bufs), &opts, ws, target) };
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0)).unwrap().expect("a captured graph");
        queued.unwrap();
        for replay in 0..2 {
            let x = inputs(&mut rng);
            for (buf, v) in bufs.iter_mut().zip(&x) {
                stream.memcpy_htod(&bits(v), buf).unwrap();
            }
            graph.launch().unwrap();
            let replayed = results();
            unsafe { raw::fwd_decode(&views(&bufs), &opts, ws, target) }.unwrap();
            let direct = results();
            let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same(&replayed.0, &direct.0) && same(&replayed.1, &direct.1), "seed {seed}: {what}: replay {replay} differs from a direct call");
        }
    }
    // On the H200 / H100 the 8k-key batch-1 row takes 16 splits and the combine: a workspace.
    assert!(saw_workspace, "no case needed a workspace: the short-workspace check never ran");
}
