//! The zero-copy layer every adapter sits on (our `Tensor` API, candle, Python): the caller's memory as
//! pointers with shapes and element strides, caller-provided outputs and workspace, the caller's stream.
//!
//! On CUDA a call validates everything that needs no device memory, then queues its kernels on the
//! caller's stream in the device's primary context (the one candle, cubecl and PyTorch use) and returns:
//! no allocation, no synchronization, no copy to or from the device (cu_seqlens / seqused are read only by
//! the kernels, which clamp every index), so a call can be captured into a CUDA graph. The first call on
//! a device loads the kernels (see `preload`: do it before capturing). Calls from several threads and
//! on several streams at once are fine: the only shared state is the loaded module (with the Hopper
//! forward's tile counters: an entry of its own for each stream, the first 1024 streams a process
//! launches on, and for each launch captured into a graph, the first 64512; past those, its tiles in a
//! fixed order, as fast where every tile is as much work; two graph execs instantiated from one
//! captured graph, a graph cloned or embedded twice as a child graph, share its entries, as they share
//! every address captured in it, so they must not run at once). The first call on a device (or
//! `preload`) initializes the driver, the device's primary context and the module, which allocates:
//! not while another thread captures in global mode. Each call makes the device's primary context
//! current on the calling thread (as cudarc, candle and PyTorch do) and leaves it so. The `Tensor` API
//! (not this layer) works on the legacy default stream: not while another thread captures in global
//! mode either.
//!
//! Layouts are flash-attn 2's: q `[B, Sq, Hq, D]` (varlen `[Tq, Hq, D]`), k and v `[B, Sk, Hk, D]`
//! (`[Tk, Hk, D]`), out and dout like q, lse contiguous f32 `[B, Hq, Sq]` (`[Hq, Tq]`), dq like q, dk and
//! dv like k; any strides with the head dim contiguous (on CUDA every row 16-byte aligned).
//!
//! Inference (issue 13): `varlen_fwd_paged` (k and v in pages through a block table), `fwd_kvcache`
//! (flash-attn's `flash_attn_with_kvcache`: append to the cache in place, rotary, split-KV) and
//! `combine` (merge partial results) run on both. On CUDA the KV cache takes a workspace
//! (`kvcache_workspace_bytes`: q rotated, split-KV's partial results).
//!
//! ALiBi (`alibi_slopes` in the views), dropout (`AttnOptions::dropout`) and the probabilities
//! (`FwdViews::s_dmask`, flash-attn's `return_attn_probs`) run on both targets, forward and backward
//! (the paged forward too), with the same dropout mask bit for bit (`crate::dropout`). On CUDA the
//! slopes are device memory like cu_seqlens: their layout is checked, their values are not (the CPU
//! path checks that they are finite, where it reads them); `s_dmask` is written by a kernel queued after
//! the forward's, on the same stream.

use crate::error::Result;
pub use crate::types::{BwdViews, CombineViews, FwdViews, KvCacheOptions, KvCacheViews, PagedVarlenViews, Workspace};
use crate::types::{AttnOptions, Target, VarlenViews};
use crate::validate;

/// Bytes of workspace a CUDA backward with q of shape `q_shape` (`[B, Sq, Hq, D]` or `[Tq, Hq, D]`)
/// needs at least. The CPU path needs none (`Workspace::default()` will do). In deterministic mode this
/// smallest workspace runs the slower mma.sync path on Hopper; `bwd_workspace_bytes_fast` gives the
/// size at which the call runs at full speed.
pub fn bwd_workspace_bytes(q_shape: &[usize], deterministic: bool) -> Result<usize> {
    Ok(crate::launch::BwdWorkspace::for_q_shape(q_shape, deterministic)?.bytes)
}

/// Bytes of workspace at which a CUDA backward runs at full speed, for q of shape `q_shape` over
/// `sequences` sequences (dense: `q_shape[0]`; packed: `cu_seqlens_q`'s length - 1) and `kv_heads` kv
/// heads. The default mode: `bwd_workspace_bytes`. The deterministic mode on Hopper keeps the wgmma
/// kernels by giving CTAs that share a (sequence, kv head) pair's key blocks their own f32 dq
/// accumulator, summed in a fixed order: up to `ceil(132 / (sequences * kv_heads))` copies (at most 16)
/// of `4 * q.len()` bytes each. Any size from `bwd_workspace_bytes` up works; larger ones use more copies.
pub fn bwd_workspace_bytes_fast(q_shape: &[usize], sequences: usize, kv_heads: usize, deterministic: bool) -> Result<usize> {
    let copies = if deterministic { crate::dispatch::dq_copies_for(sequences.saturating_mul(kv_heads)) } else { 1 };
    Ok(crate::launch::BwdWorkspace::with_copies(q_shape, deterministic, copies)?.bytes)
}

/// Load the kernels of CUDA device `ordinal` now (the shipped cubin, or the PTX through the driver's JIT
/// where no cubin runs), so that no later call pays for it, e.g. before capturing a CUDA graph.
pub fn preload(ordinal: usize) -> Result<()> {
    crate::module::gpu(ordinal)?.module().map(|_| ())
}

/// Dense forward: q `[B, Sq, Hq, D]`, k and v `[B, Sk, Hk, D]` into out `[B, Sq, Hq, D]` and lse
/// `[B, Hq, Sq]`.
///
/// # Safety
/// Every view must describe memory of `target` that is valid for its whole extent (reads for q, k, v;
/// writes for out and lse) until the call has completed: on the CPU when it returns, on CUDA when the
/// stream reaches it. On CUDA, `stream` must be a stream of device `ordinal`'s primary context (or 0 / 2).
pub unsafe fn fwd(t: &FwdViews<'_>, opts: &AttnOptions, target: Target) -> Result<()> {
    unsafe { run_fwd(t, None, opts, target) }
}

/// Packed forward: q `[Tq, Hq, D]`, k and v `[Tk, Hk, D]`, sequences given by `varlen` (int32 views in
/// the call's memory), into out `[Tq, Hq, D]` and lse `[Hq, Tq]`. Rows of no sequence (seqused padding,
/// rows past `cu_seqlens_q[B]`) are written as out 0, lse -inf.
///
/// # Safety
/// As for `fwd`; the varlen views too must be valid for reads.
pub unsafe fn varlen_fwd(t: &FwdViews<'_>, varlen: &VarlenViews<'_>, opts: &AttnOptions, target: Target) -> Result<()> {
    unsafe { run_fwd(t, Some(varlen), opts, target) }
}

/// Dense backward: dq, dk, dv from dout and the forward's out and lse (as `fwd` wrote them, for the same
/// `opts`). `deterministic` asks for bitwise-reproducible gradients (the CPU path always is).
///
/// # Safety
/// As for `fwd`, with dq, dk, dv and the workspace valid for writes.
pub unsafe fn bwd(t: &BwdViews<'_>, opts: &AttnOptions, deterministic: bool, workspace: Workspace, target: Target) -> Result<()> {
    unsafe { run_bwd(t, None, opts, deterministic, workspace, target) }
}

/// Packed backward: as `bwd` over `varlen_fwd`'s layouts. Rows of no sequence get dq = 0, and keys past a
/// sequence's used length get dk = dv = 0.
///
/// # Safety
/// As for `bwd`; the varlen views too must be valid for reads.
pub unsafe fn varlen_bwd(t: &BwdViews<'_>, varlen: &VarlenViews<'_>, opts: &AttnOptions, deterministic: bool, workspace: Workspace, target: Target) -> Result<()> {
    unsafe { run_bwd(t, Some(varlen), opts, deterministic, workspace, target) }
}

/// Packed forward over a paged K/V cache: q `[Tq, Hq, D]`; k and v `[num_blocks, page_size, Hk, D]`
/// (any page size >= 1), key t of sequence b in row `t % page_size` of block
/// `block_table[b][t / page_size]`; key counts from `cu_seqlens_k` (and `seqused_k` where given) or, with
/// no `cu_seqlens_k`, from `seqused_k`. Out and lse as `varlen_fwd`; on the CPU bitwise what
/// `varlen_fwd` gives with the same keys in contiguous rows. On CUDA the contents of the index tensors
/// are not checked (the kernels clamp every block-table entry into `[0, num_blocks)` and every key count
/// to the keys a table row addresses, so a bogus table reads only inside k and v); every row of q, k, v
/// and out must be 16-byte aligned. Page sizes that are multiples of 8 run on Hopper's warp-specialized
/// kernel (bulk tensor copies of whole pages or 8-row parts of them), others on the cp.async kernels.
///
/// # Safety
/// As for `varlen_fwd`; the block table too must be valid for reads.
pub unsafe fn varlen_fwd_paged(t: &FwdViews<'_>, varlen: &PagedVarlenViews<'_>, opts: &AttnOptions, target: Target) -> Result<()> {
    let mut p = validate::validate_varlen_paged(&t.q, &t.k, &t.v, varlen, opts)?;
    validate::check_alibi(&mut p, t.alibi_slopes.as_ref())?;
    validate::check_paged_fwd_outputs(&p, t, varlen)?;
    match target {
        Target::Cpu => unsafe {
            let host = crate::cpu::host_paged_seqlens(varlen);
            let (seqlens, keys) = validate::check_paged_varlen_contents(&p, host, varlen.max_seqlen_q, varlen.max_seqlen_k)?;
            (p.seqlens, p.keys) = (Some(seqlens), Some(keys));
            crate::cpu::fwd_into(&p, t)
        },
        Target::Cuda { ordinal, stream } => {
            validate::check_cuda_rows(&[("q", &t.q), ("k", &t.k), ("v", &t.v), ("out", &t.out)])?;
            unsafe { crate::launch::fwd_paged(&p, t, varlen, opts.kernels, ordinal, stream) }
        }
    }
}

/// KV-cache forward, flash-attn's `flash_attn_with_kvcache` (see `KvCacheViews`): appends k_new and v_new
/// (k_new rotated) to the caches in place at positions `cache_seqlens[b]..`, then attends q (rotated)
/// over each row's `cache_seqlens[b] - cache_leftpad[b] + S_new` cache entries into out `[B, Sq, Hq, D]`
/// and lse `[B, Hq, Sq]`. `kv.num_splits` splits each row's keys (0 = `problem::num_splits_heuristic`
/// over the processors: this machine's threads on the CPU); the results of any split count agree up to
/// rounding. On CUDA the workspace (`kvcache_workspace_bytes`, 256-byte aligned, overlapping no
/// tensor of the call) holds q rotated and the splits' partial results; the CPU needs none. On CUDA the
/// index tensors' contents are not checked (device memory): the kernels clamp every cache row, block
/// and key count, and skip appended rows past a cache row's capacity.
///
/// # Safety
/// As for `fwd`, with the caches valid for writes when k_new is given (for reads otherwise), and every
/// other view valid for reads.
pub unsafe fn fwd_kvcache(t: &KvCacheViews<'_>, opts: &AttnOptions, kv: &KvCacheOptions, workspace: Workspace, target: Target) -> Result<()> {
    let mut kp = validate::validate_kvcache(t, opts, kv)?;
    match target {
        Target::Cpu => unsafe {
            let keys = validate::check_kvcache_contents(&kp, crate::cpu::host_kvcache(t))?;
            kp.fwd.keys = Some(keys);
            crate::cpu::kvcache::fwd_kvcache_into(&kp, t)
        },
        Target::Cuda { ordinal, stream } => {
            // The caches and q are read by 16-byte copies; out is written 4 bytes at a time.
            validate::check_cuda_rows(&[("q", &t.q), ("k_cache", &t.k_cache), ("v_cache", &t.v_cache), ("out", &t.out)])?;
            let ws = crate::launch::KvWorkspace::new(&kp, ordinal)?;
            validate::check_workspace_of(&workspace, ws.bytes, "kvcache_workspace_bytes", t.named())?;
            unsafe { crate::launch::fwd_kvcache(&kp, t, &ws, workspace.addr, ordinal, stream) }
        }
    }
}

/// Whether a dense forward (`fwd`: q `[B, Sq, Hq, D]`, k and v `[B, Sk, Hk, D]`) on CUDA runs faster as
/// a KV-cache call over k and v in place: `fwd_kvcache` with k and v as the caches, `cache_seqlens` Sk
/// for every row, nothing appended, the same options (same result up to rounding: the keys may be split
/// and merged). True for decoding steps: at most `DECODE_MAX_ROWS` (64) query rows per kv head
/// (`Sq * Hq / Hk`), a head dim and dtype with decode kernels, no ALiBi, no dropout, no kernel family forced
/// (`opts.kernels` the default). There `fwd` runs a
/// row tile per (sequence, q head) over all the keys, which leaves most of a GPU idle (a tile per head
/// at batch 1) and reads each kv head's keys once per q head; the KV cache's decode kernels pack a kv
/// head's query rows into one tile and split the keys over the multiprocessors. The candle adapter
/// routes such calls (it has an allocator for `cache_seqlens` and the workspace); so do the `Tensor` API's
/// dense forward (`fwd`, `fwd_into`) and the Python package's `scaled_dot_product_attention` and
/// `flash_attn_func` (eager calls there only from enough keys, where the Python KV cache path's host time
/// pays). `FLASH_ATTN_NO_DENSE_DECODE` (any value, read once) makes it false everywhere, for A/B runs.
pub fn dense_fwd_decodes(q_shape: &[usize], k_shape: &[usize], dtype: crate::types::DType, opts: &AttnOptions, alibi: bool) -> bool {
    if dense_decode_off() {
        return false;
    }
    let (&[b, sq, hq, d], &[kb, sk, hk, kd]) = (q_shape, k_shape) else { return false };
    let sizes_ok = b > 0 && sq > 0 && sk > 0 && hk > 0 && kb == b && kd == d && hq % hk == 0;
    sizes_ok && opts.dropout.p == 0.0 && opts.kernels == crate::types::KernelChoice::default() && crate::dispatch::decodes(sq, hq, hk, d, dtype, alibi)
}

/// A dense forward (as `fwd`), run where `dense_fwd_decodes` says it is a decoding step on CUDA (no ALiBi, no
/// `s_dmask`) on the KV cache's decode kernels over k and v in place, every row's cache full (its Sk keys):
/// the same result as `fwd` up to the rounding of the split keys' merge; elsewhere `fwd` itself. Unlike
/// `fwd_kvcache` over `KvCacheViews::of_dense`, it needs no `cache_seqlens` tensor (the kernels take a row's
/// whole cache) and, where the launch's blocks merge their splits themselves, no workspace:
/// `decode_workspace_bytes` (0 then, and wherever `fwd` runs). Errors name the dense forward's arguments.
///
/// # Safety
/// As for `fwd`, with the workspace valid for writes.
pub unsafe fn fwd_decode(t: &FwdViews<'_>, opts: &AttnOptions, workspace: Workspace, target: Target) -> Result<()> {
    let ran = decode_call(t, opts, target, |kp, kv, ordinal, stream| {
        let ws = crate::launch::KvWorkspace::new(kp, ordinal)?;
        // Against the dense call's own tensors, under their names (not the KV cache's, nor its absent lengths).
        let views = [("q", t.q), ("k", t.k), ("v", t.v), ("out", t.out), ("lse", t.lse)];
        validate::check_workspace_of(&workspace, ws.bytes, "decode_workspace_bytes", views)?;
        unsafe { crate::launch::fwd_kvcache(kp, kv, &ws, workspace.addr, ordinal, stream) }
    })?;
    match ran {
        Some(()) => Ok(()),
        None => unsafe { fwd(t, opts, target) },
    }
}

/// Bytes of workspace `fwd_decode` needs for these views and options on `target` (0: none, as on the CPU).
pub fn decode_workspace_bytes(t: &FwdViews<'_>, opts: &AttnOptions, target: Target) -> Result<usize> {
    Ok(decode_call(t, opts, target, |kp, _, ordinal, _| Ok(crate::launch::KvWorkspace::new(kp, ordinal)?.bytes))?.unwrap_or(0))
}

/// `f` over `t` as a validated KV-cache call (`fwd_decode`) on CUDA device `ordinal` and `stream`, or None
/// where `fwd` runs the call. The cache lengths are no tensor: `cache_seqlens` is a view at address 0,
/// which the launch passes on as no lengths (the kernels then take each row's capacity, Sk keys) and which
/// nothing reads, since nothing is appended or rotated.
fn decode_call<R>(t: &FwdViews<'_>, opts: &AttnOptions, target: Target, f: impl FnOnce(&crate::problem::KvCacheProblem, &KvCacheViews<'_>, usize, usize) -> Result<R>) -> Result<Option<R>> {
    let Target::Cuda { ordinal, stream } = target else { return Ok(None) };
    if t.alibi_slopes.is_some() || t.s_dmask.is_some() || !dense_fwd_decodes(t.q.shape, t.k.shape, t.q.dtype, opts, false) {
        return Ok(None);
    }
    // Checked as the dense forward first, so that errors name its arguments (k, not k_cache).
    let p = validate::validate_fwd(&t.q, &t.k, &t.v, None, opts)?;
    validate::check_fwd_outputs(&p, t, None)?;
    validate::check_cuda_rows(&[("q", &t.q), ("k", &t.k), ("v", &t.v), ("out", &t.out)])?;
    if i32::try_from(p.seqlen_k).is_err() {
        return Ok(None);
    }
    let (shape, strides) = ([p.batch], [1usize]);
    let lens = crate::types::View { addr: 0, dtype: crate::types::DType::I32, shape: &shape, strides: &strides };
    let kv = KvCacheViews::of_dense(t, lens);
    let kp = validate::validate_kvcache(&kv, opts, &KvCacheOptions::default())?;
    f(&kp, &kv, ordinal, stream).map(Some)
}

/// `dense_fwd_decodes`'s limits, for an adapter that decides without calling it (a Python call being traced
/// by torch.compile): the most query rows per kv head (0 with `FLASH_ATTN_NO_DENSE_DECODE`), and the head
/// dims with decode kernels in both f16 and bf16. With q and k of those layouts, no ALiBi or dropout, and
/// every size above 0, `dense_fwd_decodes` is `Sq * Hq / Hk <= rows && D in head_dims`.
pub fn dense_decode_limits() -> (usize, Vec<usize>) {
    let dims = crate::HEAD_DIMS.iter().copied().filter(|&d| [crate::types::DType::F16, crate::types::DType::BF16].iter().all(|&dt| crate::dispatch::decodes(1, 1, 1, d, dt, false))).collect();
    (if dense_decode_off() { 0 } else { crate::dispatch::DECODE_MAX_ROWS }, dims)
}

/// `FLASH_ATTN_NO_DENSE_DECODE` (any value, read once).
fn dense_decode_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var_os("FLASH_ATTN_NO_DENSE_DECODE").is_some())
}

/// Bytes of workspace `fwd_kvcache` needs for these views and options on `target`: 0 on the CPU.
pub fn kvcache_workspace_bytes(t: &KvCacheViews<'_>, opts: &AttnOptions, kv: &KvCacheOptions, target: Target) -> Result<usize> {
    let kp = validate::validate_kvcache(t, opts, kv)?;
    match target {
        Target::Cpu => Ok(0),
        Target::Cuda { ordinal, .. } => Ok(crate::launch::KvWorkspace::new(&kp, ordinal)?.bytes),
    }
}

/// Merges partial attention results over disjoint key sets of the same queries (see `CombineViews`):
/// out = sum_i exp(lse_i - lse) out_i with lse = log sum_i exp(lse_i), the exact log-sum-exp merge (in
/// f64 on the CPU, rounded once). Rows no partial saw a key for are out 0, lse -inf.
///
/// # Safety
/// Every view must be valid memory of `target` (reads for the partials, writes for out and lse).
pub unsafe fn combine(t: &CombineViews<'_>, target: Target) -> Result<()> {
    let cp = validate::validate_combine(t)?;
    match target {
        Target::Cpu => unsafe { crate::cpu::combine::combine_into(&cp, t) },
        Target::Cuda { ordinal, stream } => unsafe { crate::launch::combine(&cp, t, ordinal, stream) },
    }
}

/// On the CPU the varlen lengths are host memory: read and check them (the kernels never need this).
///
/// # Safety
/// The varlen views must be valid host memory.
unsafe fn host_seqlens(varlen: Option<&VarlenViews<'_>>, p: &crate::problem::Problem) -> Result<Option<crate::problem::HostSeqlens>> {
    let Some(vl) = varlen else { return Ok(None) };
    let host = unsafe { crate::cpu::host_seqlens(vl) };
    validate::check_varlen_contents(host, vl.max_seqlen_q, vl.max_seqlen_k, p.total_q, p.total_k).map(Some)
}

unsafe fn run_fwd(t: &FwdViews<'_>, varlen: Option<&VarlenViews<'_>>, opts: &AttnOptions, target: Target) -> Result<()> {
    let mut p = validate::validate_fwd(&t.q, &t.k, &t.v, varlen, opts)?;
    validate::check_alibi(&mut p, t.alibi_slopes.as_ref())?;
    validate::check_fwd_outputs(&p, t, varlen)?;
    match target {
        Target::Cpu => unsafe {
            p.seqlens = host_seqlens(varlen, &p)?;
            crate::cpu::fwd_into(&p, t)
        },
        Target::Cuda { ordinal, stream } => {
            validate::check_cuda_rows(&[("q", &t.q), ("k", &t.k), ("v", &t.v), ("out", &t.out)])?;
            unsafe { crate::launch::fwd(&p, t, varlen, opts.kernels, ordinal, stream) }
        }
    }
}

unsafe fn run_bwd(t: &BwdViews<'_>, varlen: Option<&VarlenViews<'_>>, opts: &AttnOptions, deterministic: bool, workspace: Workspace, target: Target) -> Result<()> {
    let mut bp = validate::validate_bwd(&t.dout, &t.q, &t.k, &t.v, &t.out, &t.lse, varlen, opts)?;
    validate::check_alibi(&mut bp.fwd, t.alibi_slopes.as_ref())?;
    validate::check_bwd_outputs(&bp, t, varlen)?;
    match target {
        Target::Cpu => unsafe {
            bp.fwd.seqlens = host_seqlens(varlen, &bp.fwd)?;
            crate::cpu::bwd_into(&bp, t)
        },
        Target::Cuda { ordinal, stream } => {
            // The LSE is read and written one f32 at a time: element alignment (checked for every view) is enough.
            let rows = [("dout", &t.dout), ("q", &t.q), ("k", &t.k), ("v", &t.v), ("out", &t.out), ("dq", &t.dq), ("dk", &t.dk), ("dv", &t.dv)];
            validate::check_cuda_rows(&rows)?;
            let ws = crate::launch::BwdWorkspace::for_q_shape(t.q.shape, deterministic)?;
            validate::check_workspace(&workspace, ws.bytes, t)?;
            let ws = crate::launch::BwdWorkspace::fitting(t.q.shape, deterministic, workspace.bytes)?;
            unsafe { crate::launch::bwd(&bp, t, varlen, opts.kernels, deterministic, &ws, workspace.addr, ordinal, stream) }
        }
    }
}
