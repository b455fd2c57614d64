//! Decode benchmarks on the GPU (issue 13): `raw::fwd_kvcache` with one or four query rows per sequence
//! (Hq 32, Hk 8, D 128, bf16, no new keys, not causal: each row sees the whole cache) over caches of 1k to
//! 128k keys, batch 1, 8 and 64 (caches above `MAX_CACHE_BYTES` skipped), contiguous and paged (pages of
//! 16, 64 and 256 rows scattered over the pool: the same bytes as the contiguous cache), num_splits
//! from the heuristic. Out, lse and the workspace are allocated once, so a timed call is the kernels
//! alone plus the host's validation and launches (which bound the small shapes: about 25 us). Each shape
//! prints `RESULT ours <shape> <median ms> <GB/s>` with the bytes a decode must move: K and V of every
//! row (B * ctx * Hk * D * 2 * 2) plus q and out; benches/decode_table.py sets them against PyTorch's
//! SDPA and the copy bandwidth torch_decode.py measures in the same run. FA_BENCH_FILTER selects shapes;
//! FA_DECODE_SPLITS=n fixes num_splits (default 0, the heuristic); FA_DECODE_APPEND=1 appends one new
//! key per row in every call (the serving step: append, then decode and combine). FA_DECODE_GRAPH=1
//! times the same calls as a serving engine runs them, captured into a CUDA graph (`GRAPH_STEPS` calls
//! on a stream of the caller's, the graph replayed on the legacy stream): the device's time per call
//! without the host's validation and launches; rows named `.../graph`, whose RESULT ms cover the
//! `GRAPH_STEPS` calls of one replay (GB/s: all their bytes). FA_DECODE_HEAD_MAJOR=1 lays each
//! contiguous cache out with each kv head's keys contiguous (`[b, Hk, ctx, D]` seen as `[b, ctx, Hk, D]`).

mod common;

use common::{bench, device_tensor, selected};
use flash_attn::raw::{self, Workspace};
use flash_attn::{cuda, AttnOptions, DType, Device, KvCacheOptions, KvCacheViews, Target, Tensor};

pub const HQ: usize = 32;
pub const HK: usize = 8;
pub const D: usize = 128;
const MAX_CACHE_BYTES: usize = 17 << 30;
/// Calls per captured graph (FA_DECODE_GRAPH=1).
const GRAPH_STEPS: usize = 16;

fn main() {
    if !cuda::available() {
        println!("SKIPPED decode benches: no CUDA GPU on this machine");
        return;
    }
    println!("device: {}", cuda::device_name(0).unwrap());
    let mut c = common::criterion();
    let gpu = Device::Cuda(0);
    let target = Target::Cuda { ordinal: 0, stream: flash_attn::types::STREAM_LEGACY };
    // FA_DECODE_APPEND=1: each call also appends one new key and value per row (`k_new`, `v_new`; the
    // cache holds ctx - 1 keys before it, the same slot rewritten every call), rows named `.../new1`.
    let append = std::env::var_os("FA_DECODE_APPEND").is_some();
    let graph = std::env::var_os("FA_DECODE_GRAPH").is_some();
    let head_major = std::env::var_os("FA_DECODE_HEAD_MAJOR").is_some();
    let suffix = match (append, graph) {
        (false, false) => "",
        (true, false) => "/new1",
        (false, true) => "/graph",
        (true, true) => "/new1/graph",
    };
    for ctx in [1024usize, 8192, 32768, 131072] {
        for b in [1usize, 8, 64] {
            let kv_bytes = 2 * b * ctx * HK * D * 2;
            let names: Vec<(usize, usize, String)> = [1usize, 4].iter().flat_map(|&sq| [0usize, 16, 64, 256].map(move |page| (sq, page, format!("decode/sq{sq}/ctx{ctx}/b{b}/page{page}{suffix}")))).filter(|n| selected(&n.2)).collect();
            if kv_bytes > MAX_CACHE_BYTES || names.is_empty() {
                continue;
            }
            // One cache per (context, batch), contiguous `[b, ctx, Hk, D]` or the same bytes as pages.
            let (k, v) = (filled(b * ctx * HK * D, 2), filled(b * ctx * HK * D, 3));
            let seqlens = Tensor::from_i32(vec![(ctx - usize::from(append)) as i32; b], &[b]).unwrap().to_device(gpu).unwrap();
            let new = append.then(|| (device_tensor(&[b, 1, HK, D], 4), device_tensor(&[b, 1, HK, D], 5)));
            for (sq, page, name) in names {
                let q = device_tensor(&[b, sq, HQ, D], 1);
                let (shape, table) = if page == 0 {
                    ([b, ctx, HK, D], None)
                } else {
                    let per_row = ctx / page;
                    let blocks = b * per_row;
                    // Row r's i-th page: a fixed scatter over the pool (an odd stride coprime with it).
                    let stride = (1..).map(|s| 2 * s + 1).find(|s| gcd(*s, blocks) == 1).unwrap();
                    let entries: Vec<i32> = (0..blocks).map(|i| ((i * stride) % blocks) as i32).collect();
                    ([blocks, page, HK, D], Some(Tensor::from_i32(entries, &[b, per_row]).unwrap().to_device(gpu).unwrap()))
                };
                // FA_DECODE_HEAD_MAJOR=1 (contiguous caches): each kv head's keys contiguous, the cache
                // `[b, Hk, ctx, D]` in memory seen as `[b, ctx, Hk, D]` (DRAM locality of one head's reads).
                let strides = if page == 0 && head_major { [ctx * HK * D, D, ctx * D, 1] } else { [shape[1] * HK * D, HK * D, D, 1] };
                let (mut kc, mut vc) = (k.as_strided(&shape, &strides, 0).unwrap(), v.as_strided(&shape, &strides, 0).unwrap());
                let mut out = Tensor::zeros(&[b, sq, HQ, D], DType::BF16, gpu).unwrap();
                let mut lse = Tensor::zeros(&[b, HQ, sq], DType::F32, gpu).unwrap();
                let opts = AttnOptions::default();
                // FA_DECODE_SPLITS=n fixes num_splits (0: the heuristic), for sweeps of the split count.
                let kv = KvCacheOptions { num_splits: std::env::var("FA_DECODE_SPLITS").ok().and_then(|s| s.parse().ok()).unwrap_or(0), ..KvCacheOptions::default() };
                let t = KvCacheViews {
                    q: q.view(),
                    k_cache: kc.view_mut(),
                    v_cache: vc.view_mut(),
                    cache_seqlens: seqlens.view(),
                    block_table: table.as_ref().map(Tensor::view),
                    k_new: new.as_ref().map(|n| n.0.view()),
                    v_new: new.as_ref().map(|n| n.1.view()),
                    rotary_cos: None,
                    rotary_sin: None,
                    cache_batch_idx: None,
                    cache_leftpad: None,
                    alibi_slopes: None,
                    out: out.view_mut(),
                    lse: lse.view_mut(),
                };
                let bytes = raw::kvcache_workspace_bytes(&t, &opts, &kv, target).unwrap();
                let ws = Tensor::zeros(&[bytes.div_ceil(4).max(64)], DType::F32, gpu).unwrap();
                let workspace = Workspace { addr: ws.view().addr, bytes };
                let moved = (kv_bytes + 2 * b * sq * HQ * D * 2) as f64;
                // bench's last column is `flops / s / 1e12`: moved bytes * 1e3 make it GB/s.
                if graph {
                    // GRAPH_STEPS calls captured on a stream of our own (the legacy stream cannot be
                    // captured), the graph then launched on the legacy stream that `bench` times.
                    let ctx = cudarc::driver::CudaContext::new(0).unwrap();
                    unsafe { ctx.disable_event_tracking() };
                    let stream = ctx.new_stream().unwrap();
                    let on = Target::Cuda { ordinal: 0, stream: stream.cu_stream() as usize };
                    unsafe { raw::fwd_kvcache(&t, &opts, &kv, workspace, on) }.unwrap();
                    stream.synchronize().unwrap();
                    stream.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
                    let queued: flash_attn::Result<()> = (0..GRAPH_STEPS).try_for_each(|_| unsafe { raw::fwd_kvcache(&t, &opts, &kv, workspace, on) });
                    let g = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0)).unwrap().expect("a captured graph");
                    queued.unwrap();
                    let exec = g.cu_graph_exec();
                    // `bench` prints ms per closure call: GRAPH_STEPS calls, so its GB/s counts them all.
                    bench(&mut c, "ours", &name, moved * 1e3 * GRAPH_STEPS as f64, || {
                        let r = unsafe { cudarc::driver::sys::cuGraphLaunch(exec, std::ptr::null_mut()) };
                        if r == cudarc::driver::sys::CUresult::CUDA_SUCCESS { Ok(()) } else { Err(flash_attn::Error::Cuda(format!("cuGraphLaunch: {r:?}"))) }
                    });
                    continue;
                }
                bench(&mut c, "ours", &name, moved * 1e3, || unsafe { raw::fwd_kvcache(&t, &opts, &kv, workspace, target) });
            }
        }
    }
}

/// `n` bf16 values on GPU 0, uniform in [-0.5, 0.5): one 32 MiB random chunk copied over the buffer
/// (device to device; random values for every byte would take minutes on the host at 16 GiB).
fn filled(n: usize, seed: u64) -> Tensor {
    let chunk_elems = (16usize << 20).min(n);
    let chunk = device_tensor(&[chunk_elems], seed);
    let big = Tensor::zeros(&[n], DType::BF16, Device::Cuda(0)).unwrap();
    let (dst, src) = (big.view().addr, chunk.view().addr);
    let mut at = 0;
    while at < n {
        let len = chunk_elems.min(n - at);
        unsafe { cudarc::driver::result::memcpy_dtod_sync(dst + (at * 2) as u64, src, len * 2) }.unwrap();
        at += len;
    }
    big
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}
