//! The CUDA path: a validated problem's kernels queued on the caller's stream over the caller's memory.
//! Nothing here allocates, synchronizes or copies; dispatch.rs picks the kernels, validate.rs has
//! checked every argument (and checks the grids here before anything is queued).

use crate::dispatch::{bwd_launches, fwd_launch, fwd_ws_launch_with, probs_launch, Launch};
use crate::error::{Error, Result};
use crate::module::{gpu, Function, Gpu};
use crate::params::{AppendParams, BwdParams, BwdTmaMaps, CombineParams, FwdParams, ProbsParams, ScoreMods, TmaMaps, DQ_PASS_NO_FENCE, DQ_ROTATE, DQ_ROTATE_SPREAD, DROPOUT_OFF, DTYPE_BF16, DTYPE_F16, DTYPE_F32};
use crate::problem::{BwdProblem, CombineProblem, KvCacheProblem, Problem, Strides};
use crate::types::{BwdViews, CombineViews, DType, FwdViews, KernelChoice, KvCacheViews, PagedVarlenViews, VarlenViews, View};
use crate::dispatch::{combine_warps_per_row, kvcache_append_kernel_name, KernelDType, APPEND_THREADS, COMBINE_KERNEL_NAME, COMBINE_WARPS, MAX_DECODE_CLUSTER};
use crate::validate::check_grid;
use cudarc::driver::{result, sys};
use std::sync::OnceLock;

/// Whether environment variable `name` is set (any value), read once into `cell`: a call must not
/// allocate.
fn env_set(cell: &'static OnceLock<bool>, name: &str) -> bool {
    *cell.get_or_init(|| std::env::var_os(name).is_some())
}

/// The environment's process-wide kernel overrides (read once: a call must not allocate).
fn env_choice() -> KernelChoice {
    static ENV: OnceLock<KernelChoice> = OnceLock::new();
    let set = |name| std::env::var_os(name).is_some();
    *ENV.get_or_init(|| KernelChoice { no_wgmma: set("FLASH_ATTN_NO_WGMMA"), bwd_chain_all: set("FLASH_ATTN_BWD_CHAIN_ALL"), fwd_no_ws: set("FLASH_ATTN_FWD_NO_WS"), bwd_no_ws: set("FLASH_ATTN_BWD_NO_WS"), bwd_ordered_all: set("FLASH_ATTN_BWD_ORDERED_ALL") })
}

/// The warp-specialized forward's tile counter entry for a launch on `stream` of device `ordinal`
/// (`FwdParams::tile_slot`), or -1: static scheduling. A launch's blocks draw tiles from one entry, which
/// its last block sets back to zero, so two launches in flight at once must never share one (they would
/// each skip the tiles the other drew: silently wrong output). Hence:
/// - an eager launch takes its stream's own entry, one of the first `FWD_WS_STREAM_SLOTS`, given to each
///   (device, stream) the first time it launches and kept for the process (launches on one stream run
///   in turn; the per-thread default stream counts once per host thread); past that many streams, static;
/// - a launch being captured into a CUDA graph takes an entry no other launch ever gets (the rest, each
///   given once), since its graph may be replayed on any stream at any time; once those are spent,
///   static. (One graph exec's replays run in turn; two execs instantiated from one captured graph, or a
///   graph cloned or embedded twice as a child graph, share its entries, as they share every address
///   captured in it.)
/// - `FLASH_ATTN_FWD_STATIC_TILES`: static always.
fn fwd_tile_slot(ordinal: usize, stream: usize) -> i32 {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    static STATIC: OnceLock<bool> = OnceLock::new();
    static STREAMS: Mutex<Vec<(usize, usize, Option<std::thread::ThreadId>)>> = Mutex::new(Vec::new());
    static CAPTURED: AtomicUsize = AtomicUsize::new(FWD_WS_STREAM_SLOTS);
    if env_set(&STATIC, "FLASH_ATTN_FWD_STATIC_TILES") {
        return -1;
    }
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    // (A query that fails, e.g. the legacy stream while another stream captures globally: static; the
    // launch itself reports the error.)
    if unsafe { sys::cuStreamIsCapturing(stream as sys::CUstream, &mut status) } != sys::CUresult::CUDA_SUCCESS {
        return -1;
    }
    if status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
        let e = CAPTURED.fetch_add(1, Ordering::Relaxed);
        return if e < crate::dispatch::FWD_WS_TILE_SLOTS { e as i32 } else { -1 };
    }
    // CU_STREAM_PER_THREAD: each host thread's own stream under one handle.
    let key = (ordinal, stream, (stream == 2).then(|| std::thread::current().id()));
    let mut streams = STREAMS.lock().unwrap_or_else(|e| e.into_inner());
    // Room for every entry at the first launch, so that a stream's first launch later allocates nothing.
    if streams.capacity() == 0 {
        streams.reserve_exact(FWD_WS_STREAM_SLOTS);
    }
    if let Some(i) = streams.iter().position(|k| *k == key) {
        return i as i32;
    }
    if streams.len() < FWD_WS_STREAM_SLOTS {
        streams.push(key);
        return (streams.len() - 1) as i32;
    }
    -1
}

/// Tile counter entries given to streams (`fwd_tile_slot`); the rest go to captured launches.
const FWD_WS_STREAM_SLOTS: usize = 1024;

/// The kernel choice in force: the call's, or the environment's where it forces one.
fn choice(call: KernelChoice) -> KernelChoice {
    let env = env_choice();
    KernelChoice { no_wgmma: call.no_wgmma || env.no_wgmma, bwd_chain_all: call.bwd_chain_all || env.bwd_chain_all, fwd_no_ws: call.fwd_no_ws || env.fwd_no_ws, bwd_no_ws: call.bwd_no_ws || env.bwd_no_ws, bwd_ordered_all: call.bwd_ordered_all || env.bwd_ordered_all }
}

/// Whether a kernel that depends on the previous launch of the same call goes out as a programmatic
/// dependent launch on `gpu` (the Hopper module's kernels wait for their predecessor with
/// `griddepcontrol.wait`): not where `FLASH_ATTN_NO_PDL` is set (any value, read once; for A/B runs).
fn pdl(gpu: &Gpu) -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    gpu.is_hopper() && !env_set(&OFF, "FLASH_ATTN_NO_PDL")
}

/// Multiprocessors for the sm_90a module's wgmma kernels: a Hopper GPU unless `no_wgmma`.
fn hopper_sms(gpu: &Gpu, k: KernelChoice) -> Option<usize> {
    (gpu.is_hopper() && !k.no_wgmma).then_some(gpu.sm_count)
}

/// The softmax constants both passes use: (scale_log2, softcap_pre); see `FwdParams`.
fn score_constants(p: &Problem) -> (f32, f32) {
    if p.softcap > 0.0 {
        (p.softcap * std::f32::consts::LOG2_E, p.softcap_pre())
    } else {
        (p.scale * std::f32::consts::LOG2_E, 0.0)
    }
}

/// ALiBi's slopes (device memory, the layout validated into `p.alibi`) and the dropout of `p`, as the
/// kernels read them (`ScoreMods::NONE` without either).
fn score_mods(p: &Problem, slopes: Option<&View<'_>>) -> ScoreMods {
    let mut m = ScoreMods::NONE;
    if let (Some(a), Some(v)) = (p.alibi, slopes) {
        (m.alibi_slopes, m.alibi_batch_stride, m.alibi_head_stride) = (v.addr, a.batch_stride as i64, a.head_stride as i64);
    }
    if let Some(d) = p.dropout {
        (m.dropout_seed, m.dropout_offset, m.dropout_threshold, m.dropout_scale) = (d.seed, d.offset, d.threshold, d.scale);
        debug_assert!(m.dropout_threshold < DROPOUT_OFF);
    }
    m
}

fn i32_of(x: i64) -> i32 {
    x.clamp(i32::MIN as i64, i32::MAX as i64) as i32
}

/// (batch, row, head) strides of a `[B, S, H, D]` (varlen `[T, H, D]`) view.
fn bsh(v: &View<'_>, varlen: bool) -> (i64, i64, i64) {
    let s = |i: usize| v.strides[i] as i64;
    if varlen { (0, s(0), s(1)) } else { (s(0), s(1), s(2)) }
}

/// (batch, row, head) strides of a validated operand, as the kernels take them.
fn strides(st: &Strides) -> (i64, i64, i64) {
    (st.batch as i64, st.row as i64, st.head as i64)
}

/// Device addresses of the varlen lengths, 0 where absent: cu_seqlens_q, cu_seqlens_k, seqused_q,
/// seqused_k.
fn length_addrs(varlen: Option<&VarlenViews<'_>>) -> [u64; 4] {
    let opt = |t: Option<View<'_>>| t.map_or(0, |t| t.addr);
    varlen.map_or([0; 4], |vl| [vl.cu_seqlens_q.addr, vl.cu_seqlens_k.addr, opt(vl.seqused_q), opt(vl.seqused_k)])
}

/// Queue `launch` of `f` with `params` (passed by value) on `stream`.
unsafe fn queue<P>(f: Function, l: &Launch, params: &P, stream: usize) -> Result<()> {
    let mut args = [params as *const P as *mut std::ffi::c_void];
    unsafe { result::launch_kernel(f.0, l.grid, (l.block, 1, 1), l.smem_bytes as u32, stream as sys::CUstream, &mut args) }?;
    Ok(())
}

/// `queue`, or where `dependent` as a programmatic dependent launch: `f`'s blocks may start once every
/// block of the previous kernel on `stream` has started (or triggered `launch_dependents`), and `f` waits
/// for that kernel's completion at its `griddepcontrol.wait` before reading what it wrote.
unsafe fn queue_after<P>(f: Function, l: &Launch, params: &P, dependent: bool, stream: usize) -> Result<()> {
    if !dependent {
        return unsafe { queue(f, l, params, stream) };
    }
    let mut args = [params as *const P as *mut std::ffi::c_void];
    unsafe { queue_ex(f, l, &mut args, dependent, 1, stream) }
}

/// Queue `launch` of `f` with the parameters `args` points to on `stream`: where `dependent` as a
/// programmatic dependent launch (`queue_after`), and in clusters of `cluster_z` blocks along grid z
/// (1: no cluster).
unsafe fn queue_ex(f: Function, l: &Launch, args: &mut [*mut std::ffi::c_void], dependent: bool, cluster_z: u32, stream: usize) -> Result<()> {
    // SAFETY (zeroed): plain C structs and unions of integers.
    let mut attrs: [sys::CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
    let mut n = 0;
    if dependent {
        attrs[n].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attrs[n].value.programmaticStreamSerializationAllowed = 1;
        n += 1;
    }
    if cluster_z > 1 {
        attrs[n].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
        (attrs[n].value.clusterDim.x, attrs[n].value.clusterDim.y, attrs[n].value.clusterDim.z) = (1, 1, cluster_z);
        n += 1;
    }
    let config = sys::CUlaunchConfig {
        gridDimX: l.grid.0,
        gridDimY: l.grid.1,
        gridDimZ: l.grid.2,
        blockDimX: l.block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: l.smem_bytes as u32,
        hStream: stream as sys::CUstream,
        attrs: attrs.as_mut_ptr(),
        numAttrs: n as u32,
    };
    unsafe { sys::cuLaunchKernelEx(&config, f.0, args.as_mut_ptr(), std::ptr::null_mut()) }.result()?;
    Ok(())
}

/// The forward's kernel on `stream`.
///
/// # Safety
/// As `raw::fwd` on CUDA.
pub(crate) unsafe fn fwd(p: &Problem, t: &FwdViews<'_>, varlen: Option<&VarlenViews<'_>>, kernels: KernelChoice, ordinal: usize, stream: usize) -> Result<()> {
    unsafe { fwd_any(p, t, length_addrs(varlen), None, kernels, ordinal, stream) }
}

/// The paged forward's kernel on `stream`: the paged twin of the kernel `fwd` would run (see
/// `fwd_ws_launch` for the page sizes the warp-specialized kernel leaves to the cp.async ones).
///
/// # Safety
/// As `raw::varlen_fwd_paged` on CUDA.
pub(crate) unsafe fn fwd_paged(p: &Problem, t: &FwdViews<'_>, pv: &PagedVarlenViews<'_>, kernels: KernelChoice, ordinal: usize, stream: usize) -> Result<()> {
    let opt = |t: Option<View<'_>>| t.map_or(0, |t| t.addr);
    let lengths = [pv.cu_seqlens_q.addr, opt(pv.cu_seqlens_k), opt(pv.seqused_q), opt(pv.seqused_k)];
    let table = &pv.block_table;
    unsafe { fwd_any(p, t, lengths, Some((table.addr, table.strides[0] as i64)), kernels, ordinal, stream) }
}

/// `fwd` and `fwd_paged`: `lengths` as `length_addrs`, `block_table` (address, row stride in elements)
/// for a paged problem.
#[allow(clippy::too_many_arguments)]
unsafe fn fwd_any(p: &Problem, t: &FwdViews<'_>, lengths: [u64; 4], block_table: Option<(u64, i64)>, kernels: KernelChoice, ordinal: usize, stream: usize) -> Result<()> {
    // (An empty s_dmask has nothing to write: no launch, whose grid would be empty.)
    let probs = t.s_dmask.as_ref().filter(|m| m.numel() > 0).map(|m| probs(p, m)).transpose()?;
    let gpu = gpu(ordinal)?;
    // The warp-specialized kernel where it takes the problem (its persistent grid walks `m_blocks` row
    // blocks per sequence), else `fwd_launch`'s (one row block per grid x index).
    let ws = ws_forward(p, t, &gpu, kernels);
    let (launch, m_blocks) = match ws {
        Some(ws) => ws,
        None => {
            let l = fwd_launch(p, hopper_sms(&gpu, choice(kernels))).ok_or(Error::HeadDim { got: p.head_dim })?;
            (l, l.grid.0 as i32)
        }
    };
    check_grid(launch.grid)?;
    // No query row, or no key: every probability is 0 (the kernel has no row or key to clamp to).
    let zero_probs = p.total_q == 0 || p.total_k == 0;
    if p.total_q == 0 || p.hq == 0 {
        return match &t.s_dmask {
            Some(m) => unsafe { zero_s_dmask(m, stream) },
            None => Ok(()),
        };
    }
    let f = gpu.function(launch.kernel, launch.smem_bytes)?;
    let probs_f = match probs {
        Some(l) if !zero_probs => Some(gpu.function(l.kernel, l.smem_bytes)?),
        _ => None,
    };
    let mut params = fwd_params(p, t, lengths, block_table, m_blocks);
    // Slot scheduling, as the dispatch sized the grid (or the ws kernel's `m_blocks`) for it.
    params.slots = p.fwd_slots(launch.config.block_m()).map_or(0, |s| s as i32);
    let l = Launch { kernel: launch.kernel, grid: launch.grid, block: launch.block, smem_bytes: launch.smem_bytes };
    if ws.is_none() {
        unsafe { queue(f, &l, &params, stream) }?;
    } else {
        params.tile_slot = fwd_tile_slot(ordinal, stream);
        // The tensor maps travel as the kernel's second parameter.
        // The bulk O stores write whole 64-row boxes: dense problems without seqused_q only, where the
        // rows past a block's real ones are past the map's (varlen: the next sequence's; seqused_q:
        // padding, which the kernel writes as zeros).
        let o_bulk = params.cu_seqlens_q == 0 && params.seqused_q == 0 && params.slots == 0;
        let maps = tma_maps(p, t, &launch.config, o_bulk)?;
        params.o_tma = i32::from(maps.o != [0; 16]);
        let mut args = [&params as *const FwdParams as *mut std::ffi::c_void, &maps as *const TmaMaps as *mut std::ffi::c_void];
        unsafe { result::launch_kernel(f.0, l.grid, (l.block, 1, 1), l.smem_bytes as u32, stream as sys::CUstream, &mut args) }?;
    }
    let (Some(m), Some(l)) = (&t.s_dmask, probs) else { return Ok(()) };
    let Some(pf) = probs_f else { return unsafe { zero_s_dmask(m, stream) } };
    // After the forward on the same stream: P from the LSE it wrote, with the same parameters.
    let s = |i: usize| m.strides[i] as i64;
    let probs_params = ProbsParams { fwd: params, s_dmask: m.addr, s_batch_stride: s(0), s_head_stride: s(1), s_row_stride: s(2), s_rows: m.shape[2] as i32, s_cols: m.shape[3] as i32, head_dim: p.head_dim as i32, _pad: 0 };
    unsafe { queue(pf, &l, &probs_params, stream) }
}

/// The forward kernels' parameter for problem `p` over the views `t`: `lengths` as `length_addrs`,
/// `block_table` (address, row stride in elements) for a paged problem, `m_blocks` row blocks per
/// sequence. One sequence's keys in one row, no split (the KV cache sets those fields).
fn fwd_params(p: &Problem, t: &FwdViews<'_>, lengths: [u64; 4], block_table: Option<(u64, i64)>, m_blocks: i32) -> FwdParams {
    let (o_batch, o_row, o_head) = bsh(&t.out, p.varlen);
    let (lse_batch, lse_head) = p.lse_strides();
    let (scale_log2, softcap_pre) = score_constants(p);
    // Masked scores are -inf times scale_log2 in the kernel: a zero scale (uniform attention) must stay
    // nonzero there. The smallest normal float makes every finite score flush to exactly 0.
    let scale_log2 = if scale_log2 == 0.0 { f32::MIN_POSITIVE } else { scale_log2 };
    let [cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k] = lengths;
    // Paged: k / v batch strides are the block strides. A cache without blocks (or a table without
    // entries) holds no keys: max_blocks 0 clamps every key count to 0, so nothing is read.
    let [(q_b, q_r, q_h), (k_b, k_r, k_h), (v_b, v_r, v_h)] = [p.q, p.k, p.v].map(|st| strides(&st));
    let (table, table_stride) = block_table.unwrap_or((0, 0));
    let (page_size, max_blocks, num_blocks) = match p.paged {
        Some(pg) if pg.num_blocks > 0 => (pg.page_size, pg.max_blocks, pg.num_blocks),
        Some(pg) => (pg.page_size, 0, 1),
        None => (1, 0, 0),
    };
    let s = |x: usize| x as i64;
    FwdParams {
        q: t.q.addr,
        k: t.k.addr,
        v: t.v.addr,
        o: t.out.addr,
        lse: t.lse.addr,
        cu_seqlens_q,
        cu_seqlens_k,
        seqused_q,
        seqused_k,
        q_batch_stride: q_b,
        q_row_stride: q_r,
        q_head_stride: q_h,
        k_batch_stride: k_b,
        k_row_stride: k_r,
        k_head_stride: k_h,
        v_batch_stride: v_b,
        v_row_stride: v_r,
        v_head_stride: v_h,
        o_batch_stride: o_batch,
        o_row_stride: o_row,
        o_head_stride: o_head,
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
        m_blocks,
        scale_log2,
        softcap_pre,
        block_table: table,
        block_table_stride: table_stride,
        page_size: page_size as i32,
        max_blocks: max_blocks as i32,
        num_blocks: num_blocks as i32,
        num_splits: 1,
        mods: score_mods(p, t.alibi_slopes.as_ref()),
        cache_leftpad: 0,
        seqused_k_add: 0,
        q_pack: 1,
        q_pack_head_stride: 0,
        slots: 0,
        tile_slot: -1,
        o_tma: 0,
        _o_pad: 0,
    }
}

/// The probabilities kernel's launch for the validated `s_dmask` view (`[B, Hq, Sq, Sk]`, last dimension
/// contiguous, element aligned: `validate::check_s_dmask`), checked before anything is queued: its grid
/// has a z index per (sequence, head) pair.
fn probs(p: &Problem, s_dmask: &View<'_>) -> Result<Launch> {
    let l = probs_launch(p, s_dmask.dtype == DType::F32).ok_or(Error::HeadDim { got: p.head_dim })?;
    if p.batch.saturating_mul(p.hq) > 65535 {
        let msg = format!("{} sequences x {} heads exceed the CUDA grid limit of 65535 (sequence, head) pairs of the probabilities kernel", p.batch, p.hq);
        return Err(Error::TooLarge { arg: "s_dmask", msg });
    }
    Ok(l)
}

/// Zero `s_dmask` (`[B, Hq, Sq, Sk]`, last dimension contiguous) on `stream`: one pitched memset per
/// (sequence, head).
unsafe fn zero_s_dmask(v: &View<'_>, stream: usize) -> Result<()> {
    if v.numel() == 0 {
        return Ok(());
    }
    let size = v.dtype.size();
    for b in 0..v.shape[0] {
        for h in 0..v.shape[1] {
            let at = v.addr + ((b * v.strides[0] + h * v.strides[1]) * size) as u64;
            unsafe { zero_rows(at, v.shape[2], v.strides[2] * size, v.shape[3] * size, stream) }?;
        }
    }
    Ok(())
}

/// Zero `rows` rows of `width` bytes, `pitch` bytes apart, from device address `at` on `stream`.
unsafe fn zero_rows(at: u64, rows: usize, pitch: usize, width: usize, stream: usize) -> Result<()> {
    // With one row the pitch is unused; it must still be at least the width.
    let pitch = if rows > 1 { pitch } else { width };
    unsafe { sys::cuMemsetD2D8Async(at, pitch, 0, width, rows, stream as sys::CUstream) }.result()?;
    Ok(())
}

/// Whether the warp-specialized forward takes this problem: a Hopper GPU (unless `no_wgmma` or
/// `fwd_no_ws`), a head dim it has, and operands the copy engine can address (see `tma_maps`).
fn ws_forward(p: &Problem, t: &FwdViews<'_>, gpu: &Gpu, kernels: KernelChoice) -> Option<(crate::dispatch::FwdLaunch, i32)> {
    let kernels = choice(kernels);
    if kernels.fwd_no_ws {
        return None;
    }
    let sms = hopper_sms(gpu, kernels)?;
    // Paged k / v are addressed per block: their batch strides are the block strides.
    let addressable = [(&t.q, &p.q, false), (&t.k, &p.k, true), (&t.v, &p.v, true)].iter().all(|(v, st, kv)| copy_addressable(v, st, !p.varlen || (*kv && p.paged.is_some())));
    if !addressable {
        return None;
    }
    fwd_ws_launch_with(p, sms, fwd_tall())
}

/// `FLASH_ATTN_FWD_TALL`: `1` runs the tall-tile forward wherever it has a kernel, `0` nowhere; unset,
/// `dispatch::fwd_ws_tall` decides (read once: a call must not allocate).
fn fwd_tall() -> Option<bool> {
    static TALL: OnceLock<Option<bool>> = OnceLock::new();
    *TALL.get_or_init(|| std::env::var("FLASH_ATTN_FWD_TALL").ok().map(|v| v.trim() != "0"))
}

/// Whether the copy engine can address view `v` (strides `st`; `batched`: through its batch stride too):
/// a 16-byte aligned start and positive strides that are multiples of 16 bytes below 2^40.
fn copy_addressable(v: &View<'_>, st: &Strides, batched: bool) -> bool {
    let ok = |x: usize| (x * 2).is_multiple_of(16) && ((x * 2) as u64) < (1u64 << 40);
    v.addr.is_multiple_of(16) && st.row > 0 && st.head > 0 && ok(st.row) && ok(st.head) && (!batched || (st.batch > 0 && ok(st.batch)))
}

/// The warp-specialized backward's tensor maps (`BwdTmaMaps`): q and dout in boxes of 64 rows, k and v
/// of 128 keys (`tma_maps`' layout); the f32 dq accumulator at `dq_accum` (0: none, a zeroed map) as
/// `[batches][rows][Hq][head dim]` like q (its layout: `launch`'s `acc_*` strides) in boxes of 64 rows x
/// 32 columns (128 bytes: the 128-byte swizzle's row), for the dQ helpers' reductions. Rows past a
/// sequence's end (exact zeros) are cut at the map's end: dense, at Sq; varlen, at the packed rows' end.
fn bwd_tma_maps(bp: &BwdProblem, t: &BwdViews<'_>, dq_accum: u64) -> Result<BwdTmaMaps> {
    let p = &bp.fwd;
    let (rows_q, rows_k) = if p.varlen { (p.total_q, p.total_k) } else { (p.seqlen_q, p.seqlen_k) };
    let dense = (!p.varlen).then_some(p.batch);
    let (bm, bn) = (crate::dispatch::BWD_WG_BLOCK_M, crate::dispatch::BWD_WG_BLOCK_N);
    Ok(BwdTmaMaps {
        q: tensor_map(p, &t.q, &p.q, rows_q, p.hq, bm, dense)?,
        k: tensor_map(p, &t.k, &p.k, rows_k, p.hk, bn, dense)?,
        v: tensor_map(p, &t.v, &p.v, rows_k, p.hk, bn, dense)?,
        dout: tensor_map(p, &t.dout, &bp.dout, rows_q, p.hq, bm, dense)?,
        dq_accum: dq_accum_map(p, dq_accum)?,
    })
}

/// The f32 dq accumulator at `dq_accum` as a tensor map (`[batches][rows][Hq][D]`, varlen one batch of
/// the packed rows; boxes of 32 columns x 64 rows): the warp-specialized kernels' and the wide wgmma
/// kernels' bulk reductions. Zeros where there is no accumulator (`dq_accum` 0).
fn dq_accum_map(p: &Problem, dq_accum: u64) -> Result<[u64; 16]> {
    if dq_accum == 0 {
        return Ok([0; 16]);
    }
    let rows_q = if p.varlen { p.total_q } else { p.seqlen_q };
    let batches = if p.varlen { 1 } else { p.batch.max(1) };
    let row = (p.hq * p.head_dim * 4) as u64;
    let rows = rows_q.max(1) as u64;
    let dims = [p.head_dim as u64, rows, p.hq as u64, batches as u64];
    let strides = [row, (p.head_dim * 4) as u64, (rows * row).next_multiple_of(16)];
    encode_map(sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32, dq_accum, dims, strides, [32, crate::dispatch::BWD_WG_BLOCK_M as u32, 1, 1])
}

/// One tensor map of `tma_maps`: `v` (strides `st`) as `[batches][rows][heads][head dim]` (`batches`
/// None: one batch of `rows` rows, varlen's packed rows), boxes of 64 columns x `box_rows` rows.
#[allow(clippy::too_many_arguments)]
fn tensor_map(p: &Problem, v: &View<'_>, st: &Strides, rows: usize, heads: usize, box_rows: usize, batches: Option<usize>) -> Result<[u64; 16]> {
    let dtype = match p.dtype {
        crate::types::DType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        _ => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    };
    let (batches, batch_bytes) = match batches {
        Some(n) => (n, (st.batch * 2) as u64),
        None => (1, (st.row * 2 * rows.max(1)) as u64),
    };
    let dims = [p.head_dim as u64, rows.max(1) as u64, heads as u64, batches.max(1) as u64];
    let strides = [(st.row * 2) as u64, (st.head * 2) as u64, batch_bytes.next_multiple_of(16)];
    encode_map(dtype, v.addr, dims, strides, [64, box_rows as u32, 1, 1])
}

/// A 4-d tensor map (dims innermost first, the three outer strides in bytes) in boxes `boxes`, with the
/// 128-byte swizzle the wgmma tiles use; rows past the tensor's end read as zeros (and are not written).
fn encode_map(dtype: sys::CUtensorMapDataType, addr: u64, dims: [u64; 4], strides: [u64; 3], boxes: [u32; 4]) -> Result<[u64; 16]> {
    let elem = [1u32; 4];
    let mut m = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            m.as_mut_ptr(),
            dtype,
            4,
            addr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    r.result()?;
    Ok(unsafe { m.assume_init() }.opaque)
}

/// `FLASH_ATTN_FWD_NO_TMA_O` (any value, read once): the O stage stored by the threads only.
fn no_tma_o() -> bool {
    static NO: OnceLock<bool> = OnceLock::new();
    env_set(&NO, "FLASH_ATTN_FWD_NO_TMA_O")
}

/// The copy engine's view of q, k and v (`TmaMaps`): 4-d tensors `[batch][rows][heads][head dim]`
/// (varlen: one batch of every packed row; paged k / v: `[num_blocks][page_size]`), boxes of 64 columns x
/// 128 query rows / `block_n` keys (paged: `tma_page_box_rows`), in the 128-byte swizzle the wgmma tiles
/// use; rows past a tensor's end read as zeros. Out's map where `o_bulk` allows the bulk O stores (below).
fn tma_maps(p: &Problem, t: &FwdViews<'_>, config: &crate::dispatch::FwdConfig, o_bulk: bool) -> Result<TmaMaps> {
    let map = |v: &View<'_>, st: &Strides, rows: usize, heads: usize, box_rows: usize, batches: Option<usize>| tensor_map(p, v, st, rows, heads, box_rows, batches);
    let (rows_q, rows_k) = if p.varlen { (p.total_q, p.total_k) } else { (p.seqlen_q, p.seqlen_k) };
    let dense = (!p.varlen).then_some(p.batch);
    let (rows_k, box_k, batches_k) = match p.paged {
        Some(pg) => (pg.page_size, crate::dispatch::tma_page_box_rows(pg.page_size, config.block_n), Some(pg.num_blocks)),
        None => (rows_k, config.block_n, dense),
    };
    // Out in boxes of 64 rows (a consumer warpgroup's) where the bulk stores may write it (`o_bulk`), the
    // kernel has an O stage and the copy engine can address out; else no map (`FwdParams::o_tma` 0).
    let (o_batch, o_row, o_head) = bsh(&t.out, p.varlen);
    let o_st = Strides { batch: o_batch as usize, row: o_row as usize, head: o_head as usize };
    let o = if o_bulk && crate::dispatch::fwd_ws_o_staged(p.head_dim, config.block_n) && !no_tma_o() && copy_addressable(&t.out, &o_st, !p.varlen) {
        map(&t.out, &o_st, rows_q, p.hq, 64, dense)?
    } else {
        [0; 16]
    };
    Ok(TmaMaps {
        q: map(&t.q, &p.q, rows_q, p.hq, config.block_m(), dense)?,
        k: map(&t.k, &p.k, rows_k, p.hk, box_k, batches_k)?,
        v: map(&t.v, &p.v, rows_k, p.hk, box_k, batches_k)?,
        o,
    })
}

/// Where the backward's scratch lives in the caller's workspace, each section 256-byte aligned: the f32
/// dq accumulator then lse_log2 and D (each shaped like the LSE); in deterministic mode lse_log2 and D
/// first, then as many copies of the accumulator as the workspace holds (`dq_copies`, `accum_bytes`
/// apart: the Hopper kernels' split accumulators, `dispatch::bwd_det_splits`; none: the mma.sync path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BwdWorkspace {
    pub dq_accum: Option<usize>,
    /// The ordered deterministic mode's turn counters (`BwdParams::dq_sem`: u32 `[rows][Hq][2]`), after
    /// the accumulator copies: in deterministic mode with at least one copy.
    pub dq_sem: Option<usize>,
    pub lse_log2: usize,
    pub delta: usize,
    pub bytes: usize,
    pub dq_copies: usize,
    pub accum_bytes: usize,
}

impl BwdWorkspace {
    /// The smallest layout for q of shape `[B, Sq, Hq, D]` or `[Tq, Hq, D]` (deterministic: no
    /// accumulator).
    pub fn for_q_shape(q_shape: &[usize], deterministic: bool) -> Result<BwdWorkspace> {
        Self::with_copies(q_shape, deterministic, usize::from(!deterministic))
    }

    /// The layout with `copies` accumulators (default mode: always 1).
    pub fn with_copies(q_shape: &[usize], deterministic: bool, copies: usize) -> Result<BwdWorkspace> {
        if !matches!(q_shape.len(), 3 | 4) {
            return Err(Error::Rank { arg: "q", got: q_shape.len(), expected: 4 });
        }
        let (hq, d) = (q_shape[q_shape.len() - 2], q_shape[q_shape.len() - 1]);
        if !crate::HEAD_DIMS.contains(&d) {
            return Err(Error::HeadDim { got: d });
        }
        let too_large = || Error::TooLarge { arg: "q", msg: format!("shape {q_shape:?} needs a workspace larger than usize") };
        let elems = q_shape.iter().try_fold(1usize, |a, &x| a.checked_mul(x)).ok_or_else(too_large)?;
        let lse_len = elems / d;
        let align = |x: usize| x.checked_next_multiple_of(256).ok_or_else(too_large);
        // The dk/dv kernels add whole query blocks to the accumulator without a row check (rows past a
        // sequence add exact zeros, to rows prep zeroed): `DQ_ACCUM_BLOCK_M` rows of slack keep the last
        // block's adds and prep's zeroing inside it.
        let slack = crate::dispatch::DQ_ACCUM_BLOCK_M * hq * d * 4;
        let accum = align(elems.checked_mul(4).and_then(|x| x.checked_add(slack)).ok_or_else(too_large)?)?;
        let lse_bytes = align(lse_len.checked_mul(4).ok_or_else(too_large)?)?;
        let copies = if deterministic { copies } else { 1 };
        let accums = accum.checked_mul(copies).ok_or_else(too_large)?;
        let bytes = accums.checked_add(2 * lse_bytes).ok_or_else(too_large)?;
        Ok(if deterministic {
            // Two u32 counters per row and head: twice the LSE's 4 bytes.
            let sems = if copies > 0 { 2 * lse_bytes } else { 0 };
            let total = bytes.checked_add(sems).ok_or_else(too_large)?;
            BwdWorkspace { dq_accum: (copies > 0).then_some(2 * lse_bytes), dq_sem: (copies > 0).then_some(bytes), lse_log2: 0, delta: lse_bytes, bytes: total, dq_copies: copies, accum_bytes: accum }
        } else {
            BwdWorkspace { dq_accum: Some(0), dq_sem: None, lse_log2: accum, delta: accum + lse_bytes, bytes, dq_copies: 1, accum_bytes: accum }
        })
    }

    /// The layout a caller's workspace of `bytes` (at least `for_q_shape`'s) holds: in deterministic
    /// mode as many accumulator copies as fit, at most `dispatch::DQ_COPIES_MAX`.
    pub fn fitting(q_shape: &[usize], deterministic: bool, bytes: usize) -> Result<BwdWorkspace> {
        let min = Self::for_q_shape(q_shape, deterministic)?;
        if !deterministic || bytes <= min.bytes {
            return Ok(min);
        }
        // With copies come the turn counters (as large as lse_log2 and D together: `min.delta` each).
        let copies = ((bytes - min.bytes).saturating_sub(2 * min.delta) / min.accum_bytes).min(crate::dispatch::DQ_COPIES_MAX);
        Self::with_copies(q_shape, deterministic, copies)
    }
}

/// `FLASH_ATTN_BWD_NO_ROTATE` (any value, read once): the ordered deterministic mode without the rotated
/// walk (`BwdParams::dq_rotate`).
fn no_rotate() -> bool {
    static NO: OnceLock<bool> = OnceLock::new();
    env_set(&NO, "FLASH_ATTN_BWD_NO_ROTATE")
}

/// `FLASH_ATTN_BWD_NO_SPREAD` (any value, read once): the rotated walk's starts not spread (`BwdParams::dq_rotate`
/// bit 1 off: each key block starts at its own index, and the ws helper passes each turn on right away).
fn no_spread() -> bool {
    static NO: OnceLock<bool> = OnceLock::new();
    env_set(&NO, "FLASH_ATTN_BWD_NO_SPREAD")
}

/// `FLASH_ATTN_BWD_PASS_FENCE` (any value, read once): the ws helper's `fence.acq_rel.gpu` before each turn's
/// `st.release` (`BwdParams::dq_rotate` bit 2 off), as before session 25.
fn pass_fence() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    env_set(&ON, "FLASH_ATTN_BWD_PASS_FENCE")
}

/// The backward's kernels on `stream`: prep, dk/dv, and dq (bwd_launches). Every element of dq, dk, dv
/// is written.
///
/// # Safety
/// As `raw::bwd` on CUDA; `ws_addr` holds at least `ws.bytes`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn bwd(bp: &BwdProblem, t: &BwdViews<'_>, varlen: Option<&VarlenViews<'_>>, kernels: KernelChoice, deterministic: bool, ws: &BwdWorkspace, ws_addr: u64, ordinal: usize, stream: usize) -> Result<()> {
    let p = &bp.fwd;
    let gpu = gpu(ordinal)?;
    let k = choice(kernels);
    // The warp-specialized dK/dV kernel where the copy engine can address q, k, v and dout.
    let ws_ok = !k.bwd_no_ws && [(&t.q, &p.q), (&t.k, &p.k), (&t.v, &p.v), (&t.dout, &bp.dout)].iter().all(|(v, st)| copy_addressable(v, st, !p.varlen));
    let launches = bwd_launches(p, deterministic, hopper_sms(&gpu, k), k.bwd_chain_all, ws.dq_copies, ws_ok, k.bwd_ordered_all).ok_or(Error::HeadDim { got: p.head_dim })?;
    for l in launches.iter() {
        check_grid(l.grid)?;
    }
    if p.total_q == 0 || p.hq == 0 {
        // No query attends to anything: every gradient is 0 (dq is empty).
        for v in [&t.dk, &t.dv] {
            unsafe { zero(v, p.varlen, stream) }?;
        }
        return Ok(());
    }
    let mut funcs = [None; 3];
    for (f, l) in funcs.iter_mut().zip(launches.iter()) {
        *f = Some(gpu.function(l.kernel, l.smem_bytes)?);
    }

    let [cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k] = length_addrs(varlen);
    let [(q_b, q_r, q_h), (k_b, k_r, k_h), (v_b, v_r, v_h)] = [p.q, p.k, p.v].map(|st| strides(&st));
    let s = |x: usize| x as i64;
    let (scale_log2, softcap_pre) = score_constants(p);
    let (lse_batch, lse_head) = p.lse_strides();
    let [(o_b, o_r, o_h), (do_b, do_r, do_h)] = [bp.out, bp.dout].map(|st| strides(&st));
    let (dq_b, dq_r, dq_h) = bsh(&t.dq, p.varlen);
    let (dk_b, dk_r, dk_h) = bsh(&t.dk, p.varlen);
    let (dv_b, dv_r, dv_h) = bsh(&t.dv, p.varlen);
    // The accumulator is contiguous like q.
    let acc_row = (p.hq * p.head_dim) as i64;
    let (acc_b, acc_r, acc_h) = (if p.varlen { 0 } else { p.seqlen_q as i64 * acc_row }, acc_row, p.head_dim as i64);
    let params = BwdParams {
        q: t.q.addr,
        k: t.k.addr,
        v: t.v.addr,
        o: t.out.addr,
        dout: t.dout.addr,
        lse: t.lse.addr,
        dq: t.dq.addr,
        dk: t.dk.addr,
        dv: t.dv.addr,
        // 0 where nothing accumulates dq (`dq_splits` 0: the mma.sync deterministic path, whose dK/dV
        // kernel would otherwise add to copies prep did not zero).
        dq_accum: if launches.dq_splits > 0 { ws.dq_accum.map_or(0, |o| ws_addr + o as u64) } else { 0 },
        lse_log2: ws_addr + ws.lse_log2 as u64,
        delta: ws_addr + ws.delta as u64,
        cu_seqlens_q,
        cu_seqlens_k,
        seqused_q,
        seqused_k,
        q_batch_stride: q_b,
        q_row_stride: q_r,
        q_head_stride: q_h,
        k_batch_stride: k_b,
        k_row_stride: k_r,
        k_head_stride: k_h,
        v_batch_stride: v_b,
        v_row_stride: v_r,
        v_head_stride: v_h,
        o_batch_stride: o_b,
        o_row_stride: o_r,
        o_head_stride: o_h,
        do_batch_stride: do_b,
        do_row_stride: do_r,
        do_head_stride: do_h,
        dq_batch_stride: dq_b,
        dq_row_stride: dq_r,
        dq_head_stride: dq_h,
        dk_batch_stride: dk_b,
        dk_row_stride: dk_r,
        dk_head_stride: dk_h,
        dv_batch_stride: dv_b,
        dv_row_stride: dv_r,
        dv_head_stride: dv_h,
        dqa_batch_stride: acc_b,
        dqa_row_stride: acc_r,
        dqa_head_stride: acc_h,
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
        slots: i32::from(launches.slots),
        mods: score_mods(p, t.alibi_slopes.as_ref()),
        // Copies past the first only where the Hopper kernel splits (`bwd_det_splits`): CTA x adds to copy
        // x, prep zeroes and the convert sums `dq_splits` of them. Otherwise every CTA adds to the one
        // accumulator (stride 0).
        dqa_split_stride: if launches.dq_splits > 1 { (ws.accum_bytes / 4) as i64 } else { 0 },
        dq_splits: launches.dq_splits as i32,
        // Only where grid x fits the multiprocessors (one CTA each): CTAs start in x-fastest order, so the
        // lowest unfinished (kv head, sequence) always has all its CTAs running, and a rotated turn (which
        // waits on lower and higher CTAs of its pair alike) never waits on one not yet started.
        // FLASH_ATTN_BWD_NO_ROTATE: off.
        // Spread starts only in the warp-specialized kernel at head dims 64 / 96, whose helper then passes
        // turns on a step later (RESULTS.md, Deterministic backward: 0.92x the time at 64, 0.98 at 96; at 128
        // 1.03x, and the wg kernel's turns ran 5% slower on spread walks). Bit 2: the helper's turns passed
        // on by `st.release` alone.
        dq_rotate: {
            let rotate = launches.ordered && launches.get(1).is_some_and(|l| l.grid.0 as usize <= gpu.sm_count) && !no_rotate();
            let spread = rotate && launches.ws && p.head_dim <= 96 && !no_spread();
            (if rotate { DQ_ROTATE } else { 0 }) | (if spread { DQ_ROTATE_SPREAD } else { 0 }) | (if pass_fence() { 0 } else { DQ_PASS_NO_FENCE })
        },
        // The ordered deterministic mode: counters `[rows][Hq][2]` like the accumulator's rows.
        dq_sem: match (launches.ordered, ws.dq_sem) {
            (true, Some(o)) => ws_addr + o as u64,
            _ => 0,
        },
        sem_batch_stride: if p.varlen { 0 } else { 2 * (p.seqlen_q * p.hq) as i64 },
    };
    // The tensor maps travel as the warp-specialized kernel's second parameter (built before any launch).
    // The wgmma kernels read only the accumulator's map (the others zeros: their operands need not suit
    // the copy engine).
    let maps = if launches.ws {
        Some(bwd_tma_maps(bp, t, params.dq_accum)?)
    } else if launches.maps {
        Some(BwdTmaMaps { q: [0; 16], k: [0; 16], v: [0; 16], dout: [0; 16], dq_accum: dq_accum_map(&bp.fwd, params.dq_accum)? })
    } else {
        None
    };
    for (i, (l, f)) in launches.iter().zip(funcs).enumerate() {
        if l.grid.2 == 0 {
            continue;
        }
        let f = f.expect("a function per launch");
        match (&maps, i) {
            (Some(maps), 1) => {
                let mut args = [&params as *const BwdParams as *mut std::ffi::c_void, maps as *const BwdTmaMaps as *mut std::ffi::c_void];
                unsafe { result::launch_kernel(f.0, l.grid, (l.block, 1, 1), l.smem_bytes as u32, stream as sys::CUstream, &mut args) }?;
            }
            _ => unsafe { queue(f, l, &params, stream) }?,
        }
    }
    Ok(())
}

/// Zero a `[B, S, H, D]` (varlen `[T, H, D]`) view of 2-byte elements on `stream`: one pitched memset
/// per (batch, head) over its rows.
unsafe fn zero(v: &View<'_>, varlen: bool, stream: usize) -> Result<()> {
    if v.numel() == 0 {
        return Ok(());
    }
    let size = v.dtype.size();
    let (b, r, h) = bsh(v, varlen);
    let (batches, rows, heads, d) = if varlen { (1, v.shape[0], v.shape[1], v.shape[2]) } else { (v.shape[0], v.shape[1], v.shape[2], v.shape[3]) };
    for bi in 0..batches {
        for hi in 0..heads {
            let at = v.addr + ((bi as i64 * b + hi as i64 * h) as usize * size) as u64;
            unsafe { zero_rows(at, rows, r as usize * size, d * size, stream) }?;
        }
    }
    Ok(())
}

/// Where a CUDA KV-cache call's scratch lives in the caller's workspace (each section 256-byte
/// aligned): q rotated (`[B, Sq, Hq, D]` in q's dtype, with rotary), and with split-KV (and always for
/// the decode kernels) the f32 partial results
/// (`[splits, B, Sq, Hq, D]`, packed `[splits, B, Hk, Sq * G, D]`) and their LSEs (`[splits, B, Hq, Sq]`,
/// packed `[splits, B, Hk, Sq * G]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvWorkspace {
    pub splits: usize,
    /// The decode kernels run (`dispatch::kvcache_decodes`): q packed.
    pub decode: bool,
    /// The decode kernels write out and lse themselves (`_decode_fin`: `splits` 1, or on Hopper the
    /// splits' blocks merged in a cluster of up to `MAX_DECODE_CLUSTER`): no partials (`partials` None,
    /// so a call without rotary needs no workspace) and no combine kernel. Else the decode kernels'
    /// partials are merged by the combine (`FLASH_ATTN_DECODE_COMBINE` forces that, for A/B runs).
    pub fused: bool,
    pub q_rot: Option<usize>,
    pub partials: Option<(usize, usize)>,
    pub bytes: usize,
}

impl KvWorkspace {
    /// The layout for `kp` on device `ordinal` (whose multiprocessor count the split heuristic reads).
    pub fn new(kp: &KvCacheProblem, ordinal: usize) -> Result<KvWorkspace> {
        let p = &kp.fwd;
        let decode = crate::dispatch::kvcache_decodes(p);
        let c = crate::dispatch::kvcache_config(p);
        // Looked up once (a lock and a context bind): the heuristic needs it, the fused choice asks it.
        let gpu = gpu(ordinal);
        // Work tiles: row blocks of each head (decode: packed rows of each kv head).
        let tiles = if decode { p.batch * p.hk * (p.seqlen_q * (p.hq / p.hk)).div_ceil(c.block_m()) } else { p.batch * p.hq * p.seqlen_q.div_ceil(c.block_m()) };
        let splits = match kp.num_splits {
            0 => {
                // A decode kernel's two blocks per multiprocessor count as one processor where its tiles
                // are copied whole (a contiguous cache, pages of a tile or more): the second block shares
                // its multiprocessor's bandwidth rather than adding its own (H200, batch 1 at 8k-128k
                // keys: 16 splits, 0.90-0.97x the time of the 32 that counting both picked). Tiles over
                // several pages, whose copies wait on more latency, count both (pages of 16 at batch 8:
                // 2 splits took 1.29x the time of 4; benches/RESULTS.md).
                let gpu = gpu.clone()?;
                let processors = if decode {
                    let small_pages = p.paged.as_ref().is_some_and(|g| g.page_size < c.block_n);
                    let fit = (gpu.max_smem_optin + 1024) / (c.smem_bytes() + 1024);
                    gpu.sm_count * if small_pages { fit.clamp(1, crate::dispatch::DECODE_BLOCKS_PER_SM) } else { 1 }
                } else {
                    gpu.sm_count
                };
                let key_blocks = p.seqlen_k.div_ceil(c.block_n);
                if decode { crate::problem::num_splits_waves(tiles, key_blocks, processors) } else { crate::problem::num_splits_heuristic(tiles, key_blocks, processors) }
            }
            n => n,
        };
        // Grid z holds batch * splits slices.
        let splits = splits.min((65535 / p.batch.max(1)).max(1));
        // The decode kernels finish their rows themselves (`_decode_fin`) with one split, and on Hopper
        // with up to MAX_DECODE_CLUSTER splits (a cluster each) where the grid has a multiprocessor per
        // block (H200: batch 1 from 8k keys in clusters of 16 took 1.08-1.35x the combine path's time,
        // one block per multiprocessor forced or not; 64 clusters of 4 at batch 8 over pages of 16 do
        // not fit at once: 1.52x; benches/RESULTS.md). Where no GPU answers (a size query), the
        // combine's path: the workspace below does not depend on it.
        let fused = decode && !decode_combine() && gpu.is_ok_and(|gpu| splits == 1 || (gpu.is_hopper() && splits <= MAX_DECODE_CLUSTER && tiles * splits <= gpu.sm_count));
        let too_large = || Error::TooLarge { arg: "q", msg: "the KV-cache workspace exceeds the address space".into() };
        let q_elems = p.batch.checked_mul(p.seqlen_q).and_then(|x| x.checked_mul(p.hq)).and_then(|x| x.checked_mul(p.head_dim)).ok_or_else(too_large)?;
        let lse_elems = p.batch * p.hq * p.seqlen_q;
        let align = |x: usize| x.checked_next_multiple_of(256).ok_or_else(too_large);
        let mut bytes = 0usize;
        let q_rot = if kp.rotary.is_some() {
            let at = bytes;
            bytes = align(q_elems.checked_mul(2).ok_or_else(too_large)?)?;
            Some(at)
        } else {
            None
        };
        // Split-KV's partials (the decode kernels': always, unless `fused`, which writes none). Where no
        // GPU answers, `fused` is false: a size asked for then covers the call's on any device.
        let partials = if (splits > 1 || decode) && !fused {
            let o = bytes;
            let l = align(o.checked_add(q_elems.checked_mul(4 * splits).ok_or_else(too_large)?).ok_or_else(too_large)?)?;
            bytes = align(l + lse_elems * 4 * splits)?;
            Some((o, l))
        } else {
            None
        };
        Ok(KvWorkspace { splits, decode, fused, q_rot, partials, bytes })
    }
}

/// The KV-cache forward on `stream`: the append (k_new / v_new into the caches, k turned; q turned into
/// the workspace) where there is one, then the paged forward's mma.sync kernel over the caches (a
/// contiguous cache read as one page per row, through cache_batch_idx or row b), keys counted from
/// cache_seqlens + S_new - cache_leftpad on the device (decode: the `_decode` kernels); with split-KV
/// its partial results go to the workspace and the combine kernel merges them into out and lse, except
/// where the decode kernels finish the rows themselves (`KvWorkspace::fused`).
///
/// # Safety
/// As `raw::fwd_kvcache` on CUDA, with `ws_addr` the caller's workspace of at least `ws.bytes` bytes.
pub(crate) unsafe fn fwd_kvcache(kp: &KvCacheProblem, t: &KvCacheViews<'_>, ws: &KvWorkspace, ws_addr: u64, ordinal: usize, stream: usize) -> Result<()> {
    let p = &kp.fwd;
    let gpu = gpu(ordinal)?;
    let dtype = match p.dtype {
        DType::BF16 => KernelDType::BF16,
        _ => KernelDType::F16,
    };
    // The cache as pages: a contiguous one is B_cache pages of S_cache keys, one per row.
    let mut fp = p.clone();
    fp.paged = Some(cache_pages(kp, t));
    let table = match (&t.block_table, &t.cache_batch_idx) {
        (Some(bt), _) => Some((bt.addr, bt.strides[0] as i64)),
        (None, Some(idx)) => Some((idx.addr, 1)),
        (None, None) => Some((0, 0)),
    };
    let launch = crate::dispatch::kvcache_launch(&fp, ws.splits, ws.fused).ok_or(Error::HeadDim { got: p.head_dim })?;
    check_grid(launch.grid)?;
    if p.batch == 0 || p.seqlen_q == 0 || p.hq == 0 {
        return unsafe { kvcache_append(kp, t, dtype, ws, ws_addr, &gpu, stream) }.map(|_| ());
    }
    let f = gpu.function(launch.kernel, launch.smem_bytes)?;
    // The combine merges split-KV's partials unless the decode kernel finishes its rows itself.
    let combine_f = if ws.partials.is_some() && !ws.fused { Some(gpu.function(COMBINE_KERNEL_NAME, 0)?) } else { None };
    let appended = unsafe { kvcache_append(kp, t, dtype, ws, ws_addr, &gpu, stream) }?;
    // The decode kernels wait for the append at their start (`griddepcontrol.wait`), so on Hopper they go
    // out as its programmatic dependents; the other kernels do not wait, so they follow it plainly.
    let after_append = appended && ws.decode && pdl(&gpu);

    let q_shape = [p.batch, p.seqlen_q, p.hq, p.head_dim];
    let q_rot_strides = [p.seqlen_q * p.hq * p.head_dim, p.hq * p.head_dim, p.head_dim, 1];
    let q = match ws.q_rot {
        Some(at) => View { addr: ws_addr + at as u64, dtype: p.dtype, shape: &q_shape, strides: &q_rot_strides },
        None => t.q,
    };
    if ws.q_rot.is_some() {
        fp.q = Strides { batch: q_rot_strides[0], row: q_rot_strides[1], head: q_rot_strides[2] };
    }
    let views = FwdViews { q, k: t.k_cache, v: t.v_cache, out: t.out, lse: t.lse, alibi_slopes: t.alibi_slopes, s_dmask: None };
    let opt = |v: &Option<View<'_>>| v.as_ref().map_or(0, |v| v.addr);
    let mut params = fwd_params(&fp, &views, [0, 0, 0, t.cache_seqlens.addr], table, launch.grid.0 as i32);
    (params.cache_leftpad, params.seqused_k_add) = (opt(&t.cache_leftpad), kp.seqlen_new as i32);
    let l = Launch { kernel: launch.kernel, grid: launch.grid, block: launch.block, smem_bytes: launch.smem_bytes };
    let (d, hq, sq) = (p.head_dim as i64, p.hq as i64, p.seqlen_q as i64);
    let b = p.batch as i64;
    params.num_splits = ws.splits as i32;
    let pack = if ws.decode { (p.hq / p.hk) as i64 } else { 1 };
    let (hk, rows) = (p.hk as i64, sq * pack);
    if ws.decode {
        // Packed: each kv head's `rows` rows (query i of q head hk * pack + g at row i * pack + g). q (or
        // its rotated copy) read in place: packed row i * pack + g of kv head hk is query i of q head
        // hk * pack + g.
        (params.q_head_stride, params.q_pack_head_stride) = (pack * params.q_head_stride, params.q_head_stride);
        (params.h, params.h_k, params.seqlen_q, params.total_q, params.q_pack) = (p.hk as i32, p.hk as i32, rows as i32, (b * rows) as i32, pack as i32);
    }
    let out = |i: usize| t.out.strides[i] as i64;
    let mut cp = CombineParams {
        out: t.out.addr,
        lse: t.lse.addr,
        out_strides: [out(0), out(1), out(2)],
        lse_strides: [hq * sq, sq, 1],
        rows: b * sq * hq,
        splits: ws.splits as i32,
        batch: p.batch as i32,
        seqlen: p.seqlen_q as i32,
        heads: p.hq as i32,
        head_dim: p.head_dim as i32,
        in_dtype: DTYPE_F32,
        out_dtype: dtype_code(p.dtype),
        pack: pack as i32,
        ..CombineParams::default()
    };
    if let Some((o_at, lse_at)) = ws.partials {
        // Split-KV: f32 partials, the o strides in 2-byte units (FwdParams::num_splits).
        let (po_strides, pl_strides) = if ws.decode {
            // The packed rows' partial out and lse.
            (params.o, params.o_batch_stride, params.o_row_stride, params.o_head_stride) = (ws_addr + o_at as u64, 2 * hk * rows * d, 2 * d, 2 * rows * d);
            (params.lse, params.lse_batch_stride, params.lse_head_stride) = (ws_addr + lse_at as u64, hk * rows, rows);
            ([b * hk * rows * d, hk * rows * d, d, rows * d], [b * hk * rows, hk * rows, rows, 1])
        } else {
            (params.o, params.o_batch_stride, params.o_row_stride, params.o_head_stride) = (ws_addr + o_at as u64, 2 * sq * hq * d, 2 * hq * d, 2 * d);
            (params.lse, params.lse_batch_stride, params.lse_head_stride) = (ws_addr + lse_at as u64, hq * sq, sq);
            ([b * sq * hq * d, sq * hq * d, hq * d, d], [b * hq * sq, hq * sq, sq, 1])
        };
        (cp.partial_out, cp.partial_lse, cp.po_strides, cp.pl_strides) = (params.o, params.lse, po_strides, pl_strides);
    }
    if ws.fused {
        // The `_decode_fin` kernel's second parameter: where it writes out and lse itself (a cluster of
        // the row block's splits merges them, `finish_decode`). Nothing is written through params' o, lse.
        (params.o, params.lse) = (0, 0);
        let mut args = [&params as *const FwdParams as *mut std::ffi::c_void, &cp as *const CombineParams as *mut std::ffi::c_void];
        unsafe { queue_ex(f, &l, &mut args, after_append, ws.splits as u32, stream) }?;
    } else {
        unsafe { queue_after(f, &l, &params, after_append, stream) }?;
    }
    let Some(combine_f) = combine_f else {
        return Ok(());
    };
    // The decode kernels let the combine start early (`launch_dependents`); measured in RESULTS.md.
    unsafe { queue_combine(combine_f, &cp, ws.decode && pdl(&gpu), stream) }
}

/// Whether `FLASH_ATTN_DECODE_COMBINE` is set (any value, read once): the decode kernels then always
/// write partials for the combine kernel, as before they merged their splits themselves (A/B runs).
fn decode_combine() -> bool {
    static SET: OnceLock<bool> = OnceLock::new();
    env_set(&SET, "FLASH_ATTN_DECODE_COMBINE")
}

/// The caches as pages: a paged cache's, or a contiguous one's B_cache rows as pages of S_cache keys.
fn cache_pages(kp: &KvCacheProblem, t: &KvCacheViews<'_>) -> crate::problem::Paged {
    kp.fwd.paged.unwrap_or(crate::problem::Paged { page_size: t.k_cache.shape[1], num_blocks: kp.cache_batch, max_blocks: 1 })
}

/// The append kernel (k_new / v_new into the caches, q turned into the workspace), where there is
/// anything to append or turn: whether it was queued.
unsafe fn kvcache_append(kp: &KvCacheProblem, t: &KvCacheViews<'_>, dtype: KernelDType, ws: &KvWorkspace, ws_addr: u64, gpu: &Gpu, stream: usize) -> Result<bool> {
    let p = &kp.fwd;
    let pairs = p.head_dim / 2;
    // A cache of no rows (or no blocks) has nowhere to put the new keys: the kernel clamps indices into
    // the cache, so it must not run on an empty one.
    let append_items = if kp.k_new.is_some() && kp.cache_batch > 0 { p.batch * kp.seqlen_new * p.hk * pairs } else { 0 };
    // q into the workspace, rotated (the decode kernels read q, or this copy, in place).
    let q_items = if ws.q_rot.is_some() { p.batch * p.seqlen_q * p.hq * pairs } else { 0 };
    let items = append_items + q_items;
    if items == 0 {
        return Ok(false);
    }
    let blocks = items.div_ceil(APPEND_THREADS);
    check_grid((blocks as u32, 1, 1))?;
    if blocks > i32::MAX as usize {
        return Err(Error::TooLarge { arg: "q", msg: format!("{items} feature pairs exceed the append kernel's grid") });
    }
    let f = gpu.function(kvcache_append_kernel_name(dtype), 0)?;
    let st = |s: Option<Strides>| s.map_or([0; 3], |s| [s.batch as i64, s.row as i64, s.head as i64]);
    let opt = |v: &Option<View<'_>>| v.as_ref().map_or(0, |v| v.addr);
    let pages = cache_pages(kp, t);
    let rot = kp.rotary;
    let ap = AppendParams {
        k_new: opt(&t.k_new),
        v_new: opt(&t.v_new),
        k_cache: t.k_cache.addr,
        v_cache: t.v_cache.addr,
        q: t.q.addr,
        q_rot: ws.q_rot.map_or(0, |at| ws_addr + at as u64),
        cache_seqlens: t.cache_seqlens.addr,
        cache_batch_idx: opt(&t.cache_batch_idx),
        block_table: opt(&t.block_table),
        rotary_cos: opt(&t.rotary_cos),
        rotary_sin: opt(&t.rotary_sin),
        k_new_strides: st(kp.k_new),
        v_new_strides: st(kp.v_new),
        k_strides: st(Some(p.k)),
        v_strides: st(Some(p.v)),
        q_strides: st(Some(p.q)),
        block_table_stride: t.block_table.as_ref().map_or(0, |bt| bt.strides[0] as i64),
        cos_row: rot.map_or(0, |r| r.cos_row as i64),
        sin_row: rot.map_or(0, |r| r.sin_row as i64),
        append_items: append_items as i64,
        items: items as i64,
        batch: p.batch as i32,
        seqlen_new: kp.seqlen_new as i32,
        seqlen_q: p.seqlen_q as i32,
        h: p.hq as i32,
        h_k: p.hk as i32,
        head_dim: p.head_dim as i32,
        cache_batch: pages.num_blocks as i32,
        cache_rows: pages.page_size as i32,
        max_blocks: pages.max_blocks as i32,
        rotary_dim: rot.map_or(0, |r| r.dim as i32),
        rotary_len: rot.map_or(0, |r| r.seqlen as i32),
        interleaved: rot.is_some_and(|r| r.interleaved) as i32,
        rotary_f32: rot.is_some_and(|r| r.dtype == DType::F32) as i32,
        q_per_row: rot.is_some_and(|r| r.q_per_row) as i32,
    };
    let l = Launch { kernel: "", grid: (blocks as u32, 1, 1), block: APPEND_THREADS as u32, smem_bytes: 0 };
    unsafe { queue(f, &l, &ap, stream) }.map(|()| true)
}

fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => DTYPE_F32,
        DType::BF16 => DTYPE_BF16,
        _ => DTYPE_F16,
    }
}

/// The combine kernel with `cp` on `stream`: one warp per 32 columns of each output row; `dependent`:
/// as a programmatic dependent launch (`queue_after`) of the kernel before it.
unsafe fn queue_combine(f: Function, cp: &CombineParams, dependent: bool, stream: usize) -> Result<()> {
    if cp.rows == 0 {
        return Ok(());
    }
    let warps = (cp.rows as usize).checked_mul(combine_warps_per_row(cp.head_dim as usize));
    let blocks = warps.map_or(usize::MAX, |w| w.div_ceil(COMBINE_WARPS));
    if blocks > i32::MAX as usize {
        return Err(Error::TooLarge { arg: "partial_out", msg: format!("{} rows exceed the combine kernel's grid", cp.rows) });
    }
    let l = Launch { kernel: COMBINE_KERNEL_NAME, grid: (blocks as u32, 1, 1), block: (COMBINE_WARPS * 32) as u32, smem_bytes: 0 };
    unsafe { queue_after(f, &l, cp, dependent, stream) }
}

/// The public combine on `stream`.
///
/// # Safety
/// As `raw::combine` on CUDA.
pub(crate) unsafe fn combine(cp: &CombineProblem, t: &CombineViews<'_>, ordinal: usize, stream: usize) -> Result<()> {
    let gpu = gpu(ordinal)?;
    let f = gpu.function(COMBINE_KERNEL_NAME, 0)?;
    let s = |x: usize| x as i64;
    let [so, bo, ro, ho] = cp.partial_out.map(s);
    let [sl, bl, hl, rl] = cp.partial_lse.map(s);
    let (lb, lh, lr) = if t.partial_out.rank() == 4 { (0, s(cp.seqlen), 1) } else { (s(cp.heads * cp.seqlen), s(cp.seqlen), 1) };
    let rows = cp.batch.checked_mul(cp.seqlen).and_then(|x| x.checked_mul(cp.heads)).ok_or_else(|| Error::TooLarge { arg: "partial_out", msg: "too many rows".into() })?;
    for (arg, x) in [("partial_out", cp.splits), ("partial_out", cp.batch), ("partial_out", cp.seqlen), ("partial_out", cp.heads), ("partial_out", cp.head_dim)] {
        if x > i32::MAX as usize {
            return Err(Error::TooLarge { arg, msg: format!("dimension {x} exceeds i32") });
        }
    }
    let cpar = CombineParams {
        partial_out: t.partial_out.addr,
        partial_lse: t.partial_lse.addr,
        out: t.out.addr,
        lse: t.lse.addr,
        po_strides: [so, bo, ro, ho],
        pl_strides: [sl, bl, hl, rl],
        out_strides: [s(cp.out.batch), s(cp.out.row), s(cp.out.head)],
        lse_strides: [lb, lh, lr],
        rows: rows as i64,
        splits: cp.splits as i32,
        batch: cp.batch as i32,
        seqlen: cp.seqlen as i32,
        heads: cp.heads as i32,
        head_dim: cp.head_dim as i32,
        in_dtype: dtype_code(t.partial_out.dtype),
        out_dtype: dtype_code(t.out.dtype),
        pack: 1,
    };
    unsafe { queue_combine(f, &cpar, false, stream) }
}

#[cfg(test)]
mod tests {
    use super::BwdWorkspace;

    /// Workspace layouts: sections 256-byte aligned and disjoint inside `bytes`; the deterministic mode's
    /// smallest one has no accumulator, and a caller's larger workspace holds as many copies as fit.
    #[test]
    fn bwd_workspace_sections_fit_and_copies_follow_the_bytes() {
        for shape in [vec![2, 300, 4, 64], vec![1000, 3, 128], vec![1, 1, 1, 256]] {
            let plain = BwdWorkspace::for_q_shape(&shape, false).unwrap();
            assert_eq!((plain.dq_accum, plain.dq_copies), (Some(0), 1));
            let min = BwdWorkspace::for_q_shape(&shape, true).unwrap();
            assert_eq!((min.dq_accum, min.dq_copies, min.dq_sem), (None, 0, None));
            assert!(min.bytes < plain.bytes);
            for copies in [1, 3, 16] {
                let w = BwdWorkspace::with_copies(&shape, true, copies).unwrap();
                let lse = w.delta - w.lse_log2;
                assert_eq!(w.dq_accum, Some(2 * lse));
                // The turn counters after the copies: two u32 per row and head.
                assert_eq!(w.dq_sem, Some(2 * lse + copies * w.accum_bytes));
                assert_eq!(w.bytes, 4 * lse + copies * w.accum_bytes);
                assert!(2 * lse >= shape.iter().product::<usize>() / shape[shape.len() - 1] * 8);
                assert!([w.lse_log2, w.delta, w.accum_bytes].iter().all(|x| x % 256 == 0));
                assert!(w.accum_bytes >= shape.iter().product::<usize>() * 4);
                for extra in [0, 255, w.accum_bytes - 1] {
                    let f = BwdWorkspace::fitting(&shape, true, w.bytes + extra).unwrap();
                    assert_eq!(f, w, "{shape:?} copies {copies} extra {extra}");
                }
                assert_eq!(BwdWorkspace::fitting(&shape, false, w.bytes).unwrap(), plain);
            }
            assert_eq!(BwdWorkspace::fitting(&shape, true, min.bytes).unwrap(), min);
            assert_eq!(BwdWorkspace::fitting(&shape, true, usize::MAX / 2).unwrap().dq_copies, crate::dispatch::DQ_COPIES_MAX);
        }
    }
}
