//! (head dim, dtype) -> kernel variant, tile shape, grid and shared memory, from the same table the
//! device code is generated from (shared/variants.rs, also compiled into kernels-gpu).

#[path = "shared/variants.rs"]
#[macro_use]
mod variants;

pub use variants::{
    bwd_config, bwd_convert_kernel_name, bwd_ordered_by_default, bwd_kernel_names, bwd_mods_kernel_names, bwd_prep_kernel_name, bwd_wg_alibi_kernel_name, bwd_wg_block_n, bwd_wg_kernel_name, bwd_wg_mods_kernel_name, bwd_wg_smem_bytes, bwd_wg_det_kernel_name, bwd_wg_mods_det_kernel_name, bwd_ws_alibi_kernel_name, bwd_ws_det_kernel_name, bwd_ws_kernel_name, bwd_ws_mods_kernel_name, bwd_ws_smem_bytes, dq_config, dq_smem_bytes, fwd_config, fwd_kernel_name, fwd_mods_kernel_name, fwd_paged_kernel_name, fwd_paged_mods_kernel_name,
    fwd_wg_config, fwd_wg_kernel_name, fwd_wg_paged_kernel_name, fwd_wg_smem_bytes, fwd_ws_alibi_kernel_name, fwd_ws_dropout_kernel_name, fwd_ws_kernel_name, fwd_ws_mods_kernel_name, fwd_ws_paged_kernel_name, fwd_ws_paged_mods_kernel_name, fwd_ws_o_staged, fwd_ws_smem_bytes, fwd_ws_tall_alibi_kernel, fwd_ws_tall_dropout_kernel, fwd_ws_tall_kernel, fwd_ws_threads, fwd_ws_wide_alibi_kernel, fwd_ws_wide_dropout_kernel, fwd_ws_wide_kernel, probs_kernel_name, tma_page_box_rows, decode_config, fwd_decode_fin_kernel_name, fwd_decode_kernel_name, kvcache_append_kernel_name, APPEND_THREADS, COMBINE_KERNEL_NAME, COMBINE_WARPS, combine_warps_per_row, FWD_WS_TILE_SLOTS, FwdConfig, KernelDType,
    TMA_PAGE_BOX_MIN, DECODE_BLOCKS_PER_SM, MAX_DECODE_CLUSTER, FWD_WS_WIDE_DROPOUT_MIN_KEYS, FWD_WS_WIDE_MIN_KEYS, BWD_ROWS_PER_BLOCK, BWD_WG_BLOCK_M, BWD_WG_BLOCK_N, BWD_WG_THREADS, BWD_WS_THREADS, DQ_ACCUM_BLOCK_M, PROBS_THREADS,
};

use crate::problem::Problem;
use crate::types::DType;

/// A launch: which kernel, its grid, block and dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FwdLaunch {
    pub kernel: &'static str,
    pub config: FwdConfig,
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub smem_bytes: usize,
}

/// Grid: x walks query-row blocks (blocks stride over sequences longer than `seqlen_q`, so a too-small
/// max_seqlen is slow but never wrong), y heads, z sequences, plus one z slice for varlen's tail rows.
fn kernel_dtype(dtype: DType) -> Option<KernelDType> {
    match dtype {
        DType::BF16 => Some(KernelDType::BF16),
        DType::F16 => Some(KernelDType::F16),
        _ => None,
    }
}

/// What chained CTAs (one per multiprocessor) may stream through L2 at once: half of Hopper's 50 MB.
const CHAIN_L2_BYTES: usize = 24 << 20;

/// Which twin of each kernel a problem runs: the decision "score modifiers or not" is made here only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Twin {
    /// Contiguous K/V, no ALiBi, no dropout: the plain kernels.
    Plain,
    /// Contiguous K/V with ALiBi and / or dropout (`FwdParams::mods`, `BwdParams::mods`): the `_mods`
    /// twins. The cp.async wgmma forward has none: such a problem runs the mma.sync `_mods` forward there.
    Mods,
    /// Paged K/V (forward only): the `_paged` twins.
    Paged,
    /// Paged K/V with ALiBi and / or dropout: the `_paged_mods` twins (mma.sync and warp-specialized; the
    /// cp.async wgmma forward has none: the mma.sync one runs there).
    PagedMods,
}

impl Twin {
    fn of(p: &Problem) -> Twin {
        match () {
            _ if p.paged.is_some() && (p.alibi.is_some() || p.dropout.is_some()) => Twin::PagedMods,
            _ if p.paged.is_some() => Twin::Paged,
            _ if p.alibi.is_some() || p.dropout.is_some() => Twin::Mods,
            _ => Twin::Plain,
        }
    }
}

/// `hopper_sms`: the sm_90a module runs on this many multiprocessors; its wgmma kernels take the head dims
/// they have. A paged problem (`Problem::paged`) runs the paged twin of the same kernel; one with ALiBi or
/// dropout over contiguous K/V the `_mods` twin, on the mma.sync kernel (the wgmma one has no such twin).
pub fn fwd_launch(p: &Problem, hopper_sms: Option<usize>) -> Option<FwdLaunch> {
    let dtype = kernel_dtype(p.dtype)?;
    let twin = Twin::of(p);
    let z = p.batch + usize::from(p.varlen);
    // With slot scheduling (`Problem::fwd_slots`) grid x walks the slots, z one slice.
    let grid = |c: &FwdConfig| match p.fwd_slots(c.block_m()) {
        Some(slots) => (slots as u32, p.hq as u32, 1),
        None => (p.seqlen_q.max(1).div_ceil(c.block_m()) as u32, p.hq as u32, z as u32),
    };
    let wg_name = match twin {
        Twin::Plain => fwd_wg_kernel_name(p.head_dim, dtype),
        Twin::Paged => fwd_wg_paged_kernel_name(p.head_dim, dtype),
        Twin::Mods | Twin::PagedMods => None,
    };
    if let (Some(sms), Some(config), Some(kernel)) = (hopper_sms, fwd_wg_config(p.head_dim), wg_name) {
        let (m, heads, seqs) = grid(&config);
        // One block chains all row blocks of a (head, sequence) (each row block's first copies start
        // under the previous one's last product; masked problems' unequal row blocks add up to the same
        // total per block) when the sequences are equally long (not varlen), there are at least as many
        // pairs as multiprocessors, and either the problem is masked or the K/V the concurrent blocks
        // stream fits in half of Hopper's 50 MB L2. Else one row block per block. Measured (H200):
        // unmasked hdim 128 S=2048 chained past L2 381 TFLOP/s vs 423 not; hdim 64 S=512 (within L2)
        // 1.02 of flash chained vs 0.94 not; causal hdim 64 S=512 / 2048 1.08-1.12 / 1.05-1.07 chained
        // vs 0.99 / 0.98 not.
        // Measured since (hdim 96, 21 heads): 168 pairs chained on 132 multiprocessors (a second wave
        // 27% full) ran causal S=2048 at 152 TFLOP/s, 0.56 of flash: chaining also needs whole waves.
        let masked = p.window_left >= 0 || p.window_right >= 0;
        let units = heads as usize * seqs as usize;
        let fits_l2 = sms * p.seqlen_k * p.head_dim * 4 <= CHAIN_L2_BYTES;
        let gx = if !p.varlen && units >= sms && fills_waves(units, sms) && (masked || fits_l2) { 1 } else { m };
        return Some(FwdLaunch { kernel, config, grid: (gx, heads, seqs), block: config.threads() as u32, smem_bytes: fwd_wg_smem_bytes(&config) });
    }
    let kernel = match twin {
        Twin::Plain => fwd_kernel_name(p.head_dim, dtype),
        Twin::Mods => fwd_mods_kernel_name(p.head_dim, dtype),
        Twin::Paged => fwd_paged_kernel_name(p.head_dim, dtype),
        Twin::PagedMods => fwd_paged_mods_kernel_name(p.head_dim, dtype),
    }?;
    let config = fwd_config(p.head_dim);
    Some(FwdLaunch { kernel, config, grid: grid(&config), block: config.threads() as u32, smem_bytes: config.smem_bytes() })
}

/// Packed rows (q heads per kv head times queries) up to which a KV-cache call runs the `_decode`
/// kernels; more rows (prefill-like calls) run the paged forward. `raw::dense_fwd_decodes` (the adapters'
/// routing of dense decoding steps to the KV cache) follows it too.
pub const DECODE_MAX_ROWS: usize = 64;

/// Whether a KV-cache call over `p` runs the `_decode` kernels (q packed per kv head): no ALiBi (their
/// rows are of several heads), a head dim they have, at most `DECODE_MAX_ROWS` packed rows.
pub fn kvcache_decodes(p: &Problem) -> bool {
    decodes(p.seqlen_q, p.hq, p.hk, p.head_dim, p.dtype, p.alibi.is_some())
}

/// `kvcache_decodes` from the sizes: `seqlen_q * hq / hk` packed rows, no ALiBi, decode kernels for
/// (head_dim, dtype).
pub fn decodes(seqlen_q: usize, hq: usize, hk: usize, head_dim: usize, dtype: DType, alibi: bool) -> bool {
    let rows = seqlen_q.saturating_mul(hq / hk.max(1));
    !alibi && kernel_dtype(dtype).is_some_and(|dt| fwd_decode_kernel_name(head_dim, dt).is_some()) && rows <= DECODE_MAX_ROWS
}

/// The KV-cache forward's tile shape: the decode kernels' (`kvcache_decodes`), else the mma.sync
/// forward's.
pub fn kvcache_config(p: &Problem) -> FwdConfig {
    if kvcache_decodes(p) { decode_config(p.head_dim) } else { fwd_config(p.head_dim) }
}

/// The KV-cache forward over `p` (its cache as pages: `p.paged`), grid z over `batch * splits`
/// (split-KV's slices): the `_decode` kernel over `seqlen_q * Hq / Hk` packed rows of each kv head
/// where `kvcache_decodes` (`_decode_fin` where it finishes its rows itself: `fused`), else the paged
/// twin of the mma.sync forward (`_paged_mods` with ALiBi).
pub fn kvcache_launch(p: &Problem, splits: usize, fused: bool) -> Option<FwdLaunch> {
    debug_assert!(p.paged.is_some() && !p.varlen);
    let z = u32::try_from(p.batch.checked_mul(splits)?).ok()?;
    if kvcache_decodes(p) {
        let config = decode_config(p.head_dim);
        let rows = p.seqlen_q * (p.hq / p.hk);
        let dt = kernel_dtype(p.dtype)?;
        let kernel = if fused { fwd_decode_fin_kernel_name(p.head_dim, dt)? } else { fwd_decode_kernel_name(p.head_dim, dt)? };
        let grid = (rows.max(1).div_ceil(config.block_m()) as u32, p.hk as u32, z);
        return Some(FwdLaunch { kernel, config, grid, block: config.threads() as u32, smem_bytes: config.smem_bytes() });
    }
    let mut l = fwd_launch(p, None)?;
    l.grid.2 = z;
    Some(l)
}

/// `fwd_ws_launch_with` with the tall tiles' default choice.
#[cfg(test)]
pub fn fwd_ws_launch(p: &Problem, sms: usize) -> Option<(FwdLaunch, i32)> {
    fwd_ws_launch_with(p, sms, None)
}

/// Whether a problem runs a tall-tile kernel (`fwd_ws_tall_kernel` and its `_alibi` / `_dropout`
/// copies) where it has one: `tall` where given (`FLASH_ATTN_FWD_TALL`), else by what measured faster
/// than the 128-row tiles (H100, hdim 64, benches/RESULTS.md): plain problems unmasked (0.80-0.87x the
/// time from 2048 rows, 0.93x at 512) and masked (causal, window) from `FWD_WS_TALL_MASKED_MIN_ROWS`
/// query rows (0.85-0.92x; 1.09x at 512, where a causal row block's masked tiles are a larger share);
/// ALiBi alone unmasked (0.91-0.96x; causal 0.97-1.03x); dropout never (0.98-1.12x: its tall copy
/// spills in the tile loop).
pub fn fwd_ws_tall(p: &Problem, tall: Option<bool>) -> bool {
    let masked = p.window_left >= 0 || p.window_right >= 0;
    let measured = match (p.alibi.is_some(), p.dropout.is_some()) {
        (false, false) => !masked || p.seqlen_q >= FWD_WS_TALL_MASKED_MIN_ROWS,
        (true, false) => !masked,
        _ => false,
    };
    tall.unwrap_or(measured)
}

/// Query rows (`seqlen_q`; varlen: `max_seqlen_q`) from which a causal or windowed problem runs the
/// tall tiles (`fwd_ws_tall`).
pub const FWD_WS_TALL_MASKED_MIN_ROWS: usize = 2048;

/// The warp-specialized Hopper forward (fwd/ws.rs) on `sms` multiprocessors: a persistent grid of at
/// most one block per multiprocessor over the (row block, head, sequence) tiles; `m_blocks` row blocks
/// per sequence slot. None where it has no kernel, or for paged K/V whose pages the copy engine would
/// copy in boxes of fewer than `TMA_PAGE_BOX_MIN` rows (page sizes not a multiple of 8, which the
/// cp.async kernels take; see `tma_page_box_rows`) or that has no pages at all. ALiBi / dropout run on
/// its `_mods` twin (ALiBi alone: that twin's `_alibi` copy, dropout alone its `_dropout` copy, each the
/// wide kernel's where a plain problem runs the wide one; paged: the `_paged` one). At head dim 64 the plain
/// kernel and those two copies may run tall tiles (`fwd_ws_tall`, with `tall` the environment's choice,
/// `FLASH_ATTN_FWD_TALL`).
pub fn fwd_ws_launch_with(p: &Problem, sms: usize, tall: Option<bool>) -> Option<(FwdLaunch, i32)> {
    let dtype = kernel_dtype(p.dtype)?;
    let config = fwd_wg_config(p.head_dim)?;
    let (kernel, config) = match (Twin::of(p), p.paged) {
        (Twin::Plain, _) => match (fwd_ws_wide_kernel(p.head_dim, dtype), fwd_ws_tall_kernel(p.head_dim, dtype)) {
            (Some(wide), _) if p.seqlen_k >= FWD_WS_WIDE_MIN_KEYS => wide,
            (_, Some(tall_kernel)) if fwd_ws_tall(p, tall) => tall_kernel,
            _ => (fwd_ws_kernel_name(p.head_dim, dtype)?, config),
        },
        (Twin::Mods, _) if p.dropout.is_none() => match (fwd_ws_wide_alibi_kernel(p.head_dim, dtype), fwd_ws_tall_alibi_kernel(p.head_dim, dtype)) {
            (Some(wide), _) if p.seqlen_k >= FWD_WS_WIDE_MIN_KEYS => wide,
            (_, Some(tall_kernel)) if fwd_ws_tall(p, tall) => tall_kernel,
            _ => (fwd_ws_alibi_kernel_name(p.head_dim, dtype)?, config),
        },
        (Twin::Mods, _) => match (fwd_ws_wide_dropout_kernel(p.head_dim, dtype), fwd_ws_tall_dropout_kernel(p.head_dim, dtype), fwd_ws_dropout_kernel_name(p.head_dim, dtype)) {
            (Some(wide), _, _) if p.alibi.is_none() && p.seqlen_k >= FWD_WS_WIDE_DROPOUT_MIN_KEYS => wide,
            (_, Some(tall_kernel), _) if p.alibi.is_none() && fwd_ws_tall(p, tall) => tall_kernel,
            (_, _, Some(name)) if p.alibi.is_none() => (name, config),
            _ => (fwd_ws_mods_kernel_name(p.head_dim, dtype)?, config),
        },
        (twin @ (Twin::Paged | Twin::PagedMods), Some(pg)) if pg.num_blocks > 0 && pg.max_blocks > 0 && tma_page_box_rows(pg.page_size, config.block_n) >= TMA_PAGE_BOX_MIN => {
            (if twin == Twin::Paged { fwd_ws_paged_kernel_name(p.head_dim, dtype)? } else { fwd_ws_paged_mods_kernel_name(p.head_dim, dtype)? }, config)
        }
        (Twin::Paged | Twin::PagedMods, _) => return None,
    };
    // With slot scheduling (`Problem::fwd_slots`): the slots of one slice.
    let (m_blocks, slices) = match p.fwd_slots(config.block_m()) {
        Some(slots) => (slots, 1),
        None => (p.seqlen_q.max(1).div_ceil(config.block_m()), p.batch + usize::from(p.varlen)),
    };
    let tiles = m_blocks.checked_mul(p.hq)?.checked_mul(slices)?;
    if tiles > i32::MAX as usize {
        return None;
    }
    let grid = (tiles.min(sms).max(1) as u32, 1, 1);
    Some((FwdLaunch { kernel, config, grid, block: fwd_ws_threads(config.block_m()) as u32, smem_bytes: fwd_ws_smem_bytes(&config) }, m_blocks as i32))
}

/// One kernel launch: export name, grid, threads per block, dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub kernel: &'static str,
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub smem_bytes: usize,
}

/// Two or three launches in order, without allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launches {
    items: [Launch; 3],
    len: usize,
    /// The backward's copies of the f32 dq accumulator (`BwdParams::dq_splits`): more than one only in
    /// the deterministic mode on Hopper; 0 where nothing accumulates dq (the mma.sync deterministic path).
    pub dq_splits: usize,
    /// The dK/dV launch (the second) is the warp-specialized kernel, which reads every tensor map of its
    /// second parameter (`params::BwdTmaMaps`).
    pub ws: bool,
    /// The dK/dV launch is a Hopper kernel (warp-specialized or wgmma): its second parameter is the tensor
    /// maps; outside `ws` only the dq accumulator's is read (the wide kernels' bulk reductions).
    pub maps: bool,
    /// The deterministic mode in order (`BwdParams::dq_sem`): one accumulator and the turn counters.
    pub ordered: bool,
    /// Slot scheduling (`BwdParams::slots`): every grid x is its side's slot count, grid z one slice.
    pub slots: bool,
}

impl Launches {
    fn new(l: &[Launch], dq_splits: usize) -> Launches {
        let mut items = [l[0]; 3];
        items[..l.len()].copy_from_slice(l);
        Launches { items, len: l.len(), dq_splits, ws: false, maps: false, ordered: false, slots: false }
    }
}

impl std::ops::Deref for Launches {
    type Target = [Launch];
    fn deref(&self) -> &[Launch] {
        &self.items[..self.len]
    }
}

/// The backward's launches, in order: prep (D and lse_log2; zeroes the dq accumulator), dk/dv (with atomic
/// dq unless deterministic), then dq: the deterministic dq kernel, or the conversion of the f32
/// accumulator, unless the Hopper dK/dV kernel converts it itself (`bwd_wg_grid_x` of 1).
/// Grids walk blocks of rows or keys in x (striding past `seqlen_*`), heads in y, sequences in z plus
/// varlen's tail slice (whose rows and keys get zero gradients).
/// `hopper_sms`: the sm_90a module runs on this many multiprocessors; its wgmma dK/dV kernel takes head
/// dims 64 to 256, in deterministic mode too where the workspace holds `dq_copies >= 1` copies of the dq
/// accumulator (`bwd_det_splits`; else the mma.sync kernels and the deterministic dq kernel).
/// `chain_all` forces a grid x of 1 on the Hopper kernel (`KernelChoice::bwd_chain_all`).
/// ALiBi / dropout run the `_mods` twins of the dK/dV and dq kernels, in the same launch shapes (ALiBi
/// alone: the wgmma or warp-specialized dK/dV kernel's `_alibi` copy, its dropout compiled out).
/// `ws`: the default mode runs the warp-specialized dK/dV kernel (head dims 64, 96, 128; its `_mods` and
/// `_alibi` twins as the wgmma kernel's) in the wgmma kernel's grid (the caller checked that the copy
/// engine can address the operands).
pub fn bwd_launches(p: &Problem, deterministic: bool, hopper_sms: Option<usize>, chain_all: bool, dq_copies: usize, ws: bool, ordered_all: bool) -> Option<Launches> {
    let dtype = kernel_dtype(p.dtype)?;
    let mods = Twin::of(p) == Twin::Mods;
    let (dkdv, dq) = if mods { bwd_mods_kernel_names(p.head_dim, dtype)? } else { bwd_kernel_names(p.head_dim, dtype)? };
    let (wg_kernel, ws_kernel) = match (mods, p.dropout.is_some()) {
        (true, false) => (bwd_wg_alibi_kernel_name(p.head_dim, dtype), bwd_ws_alibi_kernel_name(p.head_dim, dtype)),
        (true, true) => (bwd_wg_mods_kernel_name(p.head_dim, dtype), bwd_ws_mods_kernel_name(p.head_dim, dtype)),
        _ => (bwd_wg_kernel_name(p.head_dim, dtype), bwd_ws_kernel_name(p.head_dim, dtype)),
    };
    let c = bwd_config(p.head_dim);
    // Slot scheduling (varlen without the max lengths, default mode): each grid x walks the slots of its
    // side (queries or keys) for its block size (`problem::slot_count`), grid z one slice.
    let slotted = bwd_slotted(p, deterministic, chain_all);
    let z = if slotted { 1 } else { (p.batch + usize::from(p.varlen)) as u32 };
    let rows = BWD_ROWS_PER_BLOCK;
    let blocks = |n: usize, per: usize| n.max(1).div_ceil(per) as u32;
    let slots = |total: usize, per: usize| crate::problem::slot_count(total, p.batch, per).unwrap_or(0) as u32;
    let q_blocks = |per: usize| if slotted { slots(p.total_q, per) } else { blocks(p.seqlen_q, per) };
    let k_blocks = |per: usize| if slotted { slots(p.total_k, per) } else { blocks(p.seqlen_k, per) };
    let prep = Launch { kernel: bwd_prep_kernel_name(dtype), grid: (q_blocks(rows), p.hq as u32, if slotted { 1 } else { p.batch as u32 }), block: rows as u32, smem_bytes: 0 };
    let convert = Launch { kernel: bwd_convert_kernel_name(dtype), grid: (q_blocks(rows), p.hq as u32, z), block: rows as u32, smem_bytes: 0 };
    // The deterministic mode in order: the `_det` twin of the warp-specialized kernel (where allowed) or
    // of the wgmma one, one CTA per key block (CTA x on block gx - 1 - x), each step's dq added after the
    // CTA before it added its own, into one accumulator (the workspace holds one and the turn counters:
    // `dq_copies >= 1`). Only with the max lengths: its turns need every key block in a CTA of its own
    // (a CTA striding over two would wait for a turn its own later block holds), and without them the
    // grid comes from the mean key count.
    // With score modifiers only the wide head dims have an ordered twin (`_mods_det`); elsewhere the
    // split copies run.
    if deterministic && !chain_all && dq_copies >= 1 && hopper_sms.is_some() && p.max_given && (ordered_all || bwd_ordered_by_default(p.head_dim)) {
        let ws_det = if ws && !mods { bwd_ws_det_kernel_name(p.head_dim, dtype) } else { None };
        let wg_det = if mods { bwd_wg_mods_det_kernel_name(p.head_dim, dtype) } else { bwd_wg_det_kernel_name(p.head_dim, dtype) };
        let main = match (ws_det, wg_det) {
            (Some(kernel), _) => Some(Launch { kernel, grid: (0, 0, 0), block: BWD_WS_THREADS as u32, smem_bytes: bwd_ws_smem_bytes(p.head_dim) }),
            (None, Some(kernel)) => Some(Launch { kernel, grid: (0, 0, 0), block: BWD_WG_THREADS as u32, smem_bytes: bwd_wg_smem_bytes(p.head_dim) }),
            (None, None) => None,
        };
        if let Some(mut main) = main {
            let gx = bwd_wg_key_blocks(p) as u32;
            main.grid = (gx, p.hk as u32, z);
            let mut l = if gx == 1 { Launches::new(&[prep, main], 1) } else { Launches::new(&[prep, main, convert], 1) };
            (l.ws, l.maps, l.ordered) = (ws_det.is_some(), true, true);
            return Some(l);
        }
    }
    if let (Some(sms), Some(kernel)) = (hopper_sms, wg_kernel) {
        let (gx, splits) = match deterministic {
            false if slotted => (k_blocks(bwd_wg_block_n(p.head_dim)), 1),
            false => (if chain_all { 1 } else { bwd_wg_grid_x(p, sms) }, 1),
            true => {
                let s = bwd_det_splits(p, sms, dq_copies, chain_all);
                (s as u32, s)
            }
        };
        if gx > 0 {
            let ws_kernel = if ws && !deterministic { ws_kernel } else { None };
            let main = match ws_kernel {
                Some(kernel) => Launch { kernel, grid: (gx, p.hk as u32, z), block: BWD_WS_THREADS as u32, smem_bytes: bwd_ws_smem_bytes(p.head_dim) },
                None => Launch { kernel, grid: (gx, p.hk as u32, z), block: BWD_WG_THREADS as u32, smem_bytes: bwd_wg_smem_bytes(p.head_dim) },
            };
            let mut l = if gx == 1 { Launches::new(&[prep, main], splits) } else { Launches::new(&[prep, main, convert], splits) };
            (l.ws, l.maps, l.slots) = (ws_kernel.is_some(), true, slotted);
            return Some(l);
        }
    }
    let main = Launch { kernel: dkdv, grid: (k_blocks(c.block_n), p.hk as u32, z), block: c.threads() as u32, smem_bytes: c.smem_bytes() };
    let last = if deterministic {
        let q = dq_config(p.head_dim);
        Launch { kernel: dq, grid: (blocks(p.seqlen_q, q.block_m()), p.hq as u32, z), block: q.threads() as u32, smem_bytes: dq_smem_bytes(&q) }
    } else {
        convert
    };
    let mut l = Launches::new(&[prep, main, last], usize::from(!deterministic));
    l.slots = slotted;
    Some(l)
}

/// Whether the backward of `p` runs slot-scheduled (`BwdParams::slots`): varlen without the max lengths
/// (`Problem::max_given`), with at least one sequence, in the default mode (the deterministic one's dq
/// copies and turns follow grid x; `chain_all` asks for one CTA per pair), where every side's slots fit
/// (`problem::slot_count` for the smallest block, 1 row).
pub fn bwd_slotted(p: &Problem, deterministic: bool, chain_all: bool) -> bool {
    let fits = |total| crate::problem::slot_count(total, p.batch, 1).is_some();
    p.varlen && !p.max_given && p.batch >= 1 && !deterministic && !chain_all && fits(p.total_q) && fits(p.total_k)
}

/// The deterministic backward on Hopper: how many CTAs (grid x) share each (kv head, sequence) pair's key
/// blocks, CTA x walking blocks x, x + s, ... in order and adding its dq contributions to copy x of the
/// f32 accumulator; the convert sums the copies in order, so every dq sum has one fixed order. (Within a
/// CTA each dq element gets one add per key block, from one thread, and the block-wide barriers between
/// key blocks order those adds.) 0 when the workspace holds no copy (`dq_copies`): the mma.sync path.
/// 1 where the default mode chains every key block in one CTA anyway (or `chain_all`); else the smallest
/// count, up to the copies and the key blocks, whose CTAs (one per multiprocessor) fill at least 90% of
/// the waves they take, or failing that the one filling them best.
pub fn bwd_det_splits(p: &Problem, sms: usize, dq_copies: usize, chain_all: bool) -> usize {
    if dq_copies == 0 {
        return 0;
    }
    if chain_all || bwd_wg_grid_x(p, sms) == 1 {
        return 1;
    }
    let pairs = (p.hk * p.batch).max(1);
    let fill = |units: usize| units as f64 / (units.div_ceil(sms.max(1)) * sms.max(1)) as f64;
    let mut best = (1, fill(pairs));
    for s in 1..=dq_copies.min(bwd_wg_key_blocks(p)).max(1) {
        if fills_waves(pairs * s, sms) {
            return s;
        }
        if fill(pairs * s) > best.1 + 1e-9 {
            best = (s, fill(pairs * s));
        }
    }
    best.0
}

/// The Hopper dK/dV kernel's key blocks per (kv head, sequence).
fn bwd_wg_key_blocks(p: &Problem) -> usize {
    p.seqlen_k.max(1).div_ceil(bwd_wg_block_n(p.head_dim))
}

/// The most copies of the dq accumulator the deterministic backward uses (`bwd_det_splits`), whatever
/// the workspace holds.
pub const DQ_COPIES_MAX: usize = 16;

/// The copies of the dq accumulator a workspace sized for full speed holds (`raw::bwd_workspace_bytes_fast`):
/// enough for `bwd_det_splits` on a 132-multiprocessor GPU (H100 / H200) when `pairs` (kv heads times
/// sequences) CTAs would leave it idle, at most `DQ_COPIES_MAX`.
pub fn dq_copies_for(pairs: usize) -> usize {
    132usize.div_ceil(pairs.max(1)).clamp(1, DQ_COPIES_MAX)
}

/// The probabilities kernel (`s_dmask`, flash-attn's return_attn_probs) after the forward of `p`, writing
/// f32 (`out_f32`) or q's dtype: one thread per key, x over blocks of `PROBS_THREADS` keys, y over the
/// rows (at most 65535: the kernel strides over the rest), z over the (sequence, head) pairs (the caller
/// checks this against CUDA's 65535). Rows and keys are `Problem::s_dmask_shape`'s (the output check
/// made sure there is one).
pub fn probs_launch(p: &Problem, out_f32: bool) -> Option<Launch> {
    let dtype = kernel_dtype(p.dtype)?;
    let (rows, cols) = (p.seqlen_q, p.seqlen_k);
    let pairs = p.batch.saturating_mul(p.hq).min(u32::MAX as usize);
    let grid = (cols.div_ceil(PROBS_THREADS) as u32, rows.min(65535) as u32, pairs as u32);
    Some(Launch { kernel: probs_kernel_name(dtype, out_f32), grid, block: PROBS_THREADS as u32, smem_bytes: 0 })
}

/// Key-block grid (x) of the Hopper dK/dV kernel on `sms` multiprocessors. 1 when the sequences are
/// equally long (not varlen), the (kv head, sequence) pairs fill at least 4 waves of CTAs (one CTA fills
/// a multiprocessor, the last wave at least 90% full) and the Q and dO the concurrent CTAs stream fit in
/// half of Hopper's 50 MB L2: a CTA then walks every key block of its pair (each block's K/V and first
/// step load during the previous block's last step; uniform masks give every CTA the same work) and,
/// having added every dq contribution of its rows itself, converts them (no convert pass). Else one key
/// block per CTA.
/// Measured (H200, bwd alone, before the in-kernel convert): hdim 64 S=512 B=32 133 vs 130 TFLOP/s
/// causal, 219 vs 214 not; chaining two or four strided blocks at S=8192 (unequal causal blocks) lost
/// 3-4%. With the convert in the kernel: 141 and 222 (benches/RESULTS.md).
/// (`KernelChoice::bwd_chain_all` forces 1, for tests of that path on small problems.)
pub fn bwd_wg_grid_x(p: &Problem, sms: usize) -> u32 {
    let n = bwd_wg_key_blocks(p);
    let pairs = p.hk * p.batch;
    let group = p.hq / p.hk.max(1);
    let fits_l2 = sms * p.seqlen_q * group * p.head_dim * 4 <= CHAIN_L2_BYTES;
    if !p.varlen && pairs >= 4 * sms && fills_waves(pairs, sms) && fits_l2 { 1 } else { n as u32 }
}

/// Whether `units` equal CTAs, one per multiprocessor at a time, keep at least 90% of `sms` busy over
/// the waves they take (the last wave nearly full).
fn fills_waves(units: usize, sms: usize) -> bool {
    units * 10 >= units.div_ceil(sms.max(1)) * sms * 9
}

// Every backward shape in the table is one the kernels support (also asserted at PTX build time).
const _: () = {
    let dims = [32, 64, 96, 128, 192, 256];
    let mut i = 0;
    while i < dims.len() {
        assert!(bwd_config(dims[i]).is_valid());
        i += 1;
    }
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::Strides;

    fn problem(head_dim: usize, seqlen: usize, batch: usize, heads: usize, causal: bool, varlen: bool) -> Problem {
        let s = Strides { batch: seqlen * heads * head_dim, row: heads * head_dim, head: head_dim };
        Problem {
            dtype: DType::BF16,
            batch,
            hq: heads,
            hk: heads,
            head_dim,
            varlen,
            seqlen_q: seqlen,
            seqlen_k: seqlen,
            max_given: true,
            total_q: batch * seqlen,
            total_k: batch * seqlen,
            window_left: -1,
            window_right: if causal { 0 } else { -1 },
            scale: 1.0,
            softcap: 0.0,
            q: s,
            k: s,
            v: s,
            has_seqused_q: false,
            has_seqused_k: false,
            seqlens: None,
            paged: None,
            keys: None,
            alibi: None,
            dropout: None,
        }
    }

    /// Hopper takes the wgmma kernels where they exist (forward and backward all but 32, the backward outside
    /// deterministic mode), each within the 227 KiB of shared memory; elsewhere the mma.sync ones.
    #[test]
    fn hopper_dispatch_picks_wgmma_kernels_where_they_exist() {
        for d in [32, 64, 96, 128, 192, 256] {
            let p = problem(d, 1024, 2, 4, false, false);
            let f = fwd_launch(&p, Some(132)).unwrap();
            assert_eq!(f.kernel.contains("_wg_"), d != 32, "fwd d{d}: {}", f.kernel);
            assert!(f.smem_bytes <= 227 * 1024);
            assert!(!fwd_launch(&p, None).unwrap().kernel.contains("_wg_"));
            for det in [false, true] {
                let b = bwd_launches(&p, det, Some(132), false, 0, false, false).unwrap();
                assert_eq!(b[1].kernel.contains("_wg_"), !det && d != 32, "bwd d{d} det {det}: {}", b[1].kernel);
                // Every Hopper dK/dV kernel takes the tensor maps second; the mma.sync ones do not.
                assert_eq!(b.maps, b[1].kernel.contains("_wg_"), "bwd d{d} det {det}: {}", b[1].kernel);
                assert!(b[1].smem_bytes <= 227 * 1024);
                let ampere = bwd_launches(&p, det, None, false, 0, false, false).unwrap();
                assert!(!ampere[1].kernel.contains("_wg_") && !ampere.maps);
            }
        }
    }

    /// The warp-specialized dK/dV kernel: where allowed, in the default mode at head dims 64, 96 and 128,
    /// in the wgmma kernel's grid with 384 threads (with modifiers its `_mods` / `_alibi` twins:
    /// `score_mods_run_the_mods_twins`), and its ordered twin in
    /// deterministic mode without modifiers; never at other head dims or without sm_90a.
    #[test]
    fn hopper_backward_takes_the_warp_specialized_kernel_where_it_exists() {
        for d in [32, 64, 96, 128, 192, 256] {
            for (s, b, h, causal, varlen) in [(1024, 2, 4, false, false), (512, 32, 32, true, false), (300, 3, 2, true, true)] {
                let p = problem(d, s, b, h, causal, varlen);
                let wg = bwd_launches(&p, false, Some(132), false, 1, false, false).unwrap();
                let ws = bwd_launches(&p, false, Some(132), false, 1, true, false).unwrap();
                let at = format!("d{d} s{s} b{b} h{h} causal {causal} varlen {varlen}");
                assert!(!wg.ws && wg.maps == (d != 32) && ws.maps == (d != 32), "{at}");
                assert_eq!(ws.ws, matches!(d, 64 | 96 | 128), "{at}");
                if ws.ws {
                    assert!(ws[1].kernel.starts_with("flash_bwd_ws_hdim"), "{at}: {}", ws[1].kernel);
                    assert_eq!((ws[1].grid, ws.len(), ws.dq_splits), (wg[1].grid, wg.len(), wg.dq_splits), "{at}");
                    assert_eq!(ws[1].block as usize, BWD_WS_THREADS);
                    assert!(ws[1].smem_bytes <= 227 * 1024, "{at}: {}", ws[1].smem_bytes);
                } else {
                    assert_eq!(ws, wg, "{at}");
                }
                // Deterministic where the workspace holds an accumulator: the ordered `_det` twin of the
                // ws kernel where it exists and is allowed, else of the wgmma kernel; one CTA per key block.
                let n = s.div_ceil(bwd_wg_block_n(d));
                // By default only at the head dims where it measured faster (bwd_ordered_by_default);
                // `ordered_all` everywhere.
                for (allow_ws, all) in [(true, true), (false, true), (true, false), (false, false)] {
                    let det = bwd_launches(&p, true, Some(132), false, 1, allow_ws, all).unwrap();
                    let at = format!("{at} ws allowed {allow_ws} ordered_all {all}");
                    if d == 32 || !(all || bwd_ordered_by_default(d)) {
                        assert!(!det.ordered && !det.ws, "{at}");
                        continue;
                    }
                    assert!(det.ordered, "{at}");
                    assert_eq!(det.ws, allow_ws && ws.ws, "{at}");
                    let twin = if det.ws { &ws[1] } else { &wg[1] };
                    assert_eq!(det[1].kernel, format!("{}_det", twin.kernel), "{at}");
                    assert_eq!((det[1].block, det[1].smem_bytes), (twin.block, twin.smem_bytes), "{at}");
                    assert_eq!((det[1].grid.0 as usize, det.dq_splits), (n, 1), "{at}");
                    assert_eq!(det.len(), if n == 1 { 2 } else { 3 }, "{at}");
                }
                assert!(!bwd_launches(&p, true, Some(132), false, 0, true, false).unwrap().ordered, "{at}");
                assert!(!bwd_launches(&p, true, Some(132), true, 1, true, false).unwrap().ordered, "{at}");
                assert!(!bwd_launches(&p, true, None, false, 1, true, false).unwrap().ordered, "{at}");
                assert!(!bwd_launches(&p, false, None, false, 1, true, false).unwrap().ws, "{at}");
            }
        }
    }

    /// The deterministic backward on Hopper with score modifiers: at the wide head dims (192, 256) the
    /// ordered `_mods_det` twin (one CTA per key block) wherever the workspace holds the accumulator and
    /// the max lengths are given; at 64-128 (no ordered twin with modifiers, `ordered_all` or not), and
    /// under `chain_all`, the wgmma kernel wherever the workspace holds a dq copy, its grid x the split
    /// count (each split its own copy, never more than the copies or the key blocks), two launches when
    /// one CTA walks every key block (it converts dq itself); the mma.sync kernels and the dq kernel
    /// without copies or without sm_90a.
    #[test]
    fn deterministic_hopper_backward_splits_key_blocks_over_dq_copies() {
        let alibi = Some(crate::problem::Alibi { batch_stride: 0, head_stride: 1 });
        let dropout = crate::dropout::DropoutParams::new(0.1, 7, 0);
        for d in [64, 96, 128, 192, 256] {
            for (s, b, h, causal) in [(1024, 2, 4, false), (8192, 2, 16, true), (512, 32, 32, false), (300, 1, 1, true), (16384, 1, 8, false)] {
                let p = Problem { alibi, ..problem(d, s, b, h, causal, false) };
                let n = s.div_ceil(bwd_wg_block_n(d));
                for copies in [0, 1, 2, 5, DQ_COPIES_MAX] {
                    let at = format!("d{d} s{s} b{b} h{h} copies {copies}");
                    if d > 128 && copies >= 1 {
                        for p in [p.clone(), Problem { dropout, ..p.clone() }, Problem { alibi: None, dropout, ..p.clone() }] {
                            let l = bwd_launches(&p, true, Some(132), false, copies, false, false).unwrap();
                            assert!(l.ordered && l[1].kernel.ends_with("_mods_det"), "{at}: {}", l[1].kernel);
                            assert_eq!((l[1].grid.0 as usize, l.dq_splits), (n, 1), "{at}");
                            assert_eq!(l.len(), if n == 1 { 2 } else { 3 }, "{at}");
                            // Without the max lengths, or chained: the split copies.
                            let no_max = Problem { max_given: false, ..p.clone() };
                            assert!(!bwd_launches(&no_max, true, Some(132), false, copies, false, false).unwrap().ordered, "{at}");
                        }
                        assert_eq!(bwd_launches(&p, true, Some(132), true, copies, false, false).unwrap()[1].grid.0, 1, "{at} chain_all");
                        continue;
                    }
                    let l = bwd_launches(&p, true, Some(132), false, copies, false, false).unwrap();
                    assert!(!l.ordered && !bwd_launches(&p, true, Some(132), false, copies, true, true).unwrap().ordered, "{at}");
                    if copies == 0 {
                        assert!(!l[1].kernel.contains("_wg_"), "{at}");
                        assert_eq!(l.dq_splits, 0, "{at}");
                        continue;
                    }
                    assert!(l[1].kernel.contains("_wg_") && !l[1].kernel.ends_with("_det"), "{at}: {}", l[1].kernel);
                    let splits = l[1].grid.0 as usize;
                    assert_eq!(splits, l.dq_splits, "{at}");
                    assert!(splits >= 1 && splits <= copies.min(n), "{at}: {splits}");
                    assert_eq!(l.len(), if splits == 1 { 2 } else { 3 }, "{at}");
                    // Chained in the default mode -> one split; `chain_all` too.
                    if bwd_wg_grid_x(&p, 132) == 1 {
                        assert_eq!(splits, 1, "{at}");
                    }
                    assert_eq!(bwd_launches(&p, true, Some(132), true, copies, false, false).unwrap()[1].grid.0, 1, "{at} chain_all");
                    assert!(!bwd_launches(&p, true, None, false, copies, false, false).unwrap()[1].kernel.contains("_wg_"), "{at}");
                }
            }
        }
        // Splits fill the machine where copies allow: 32 pairs -> 4 (128 CTAs), 8 pairs -> 15 (120).
        assert_eq!(bwd_det_splits(&problem(128, 8192, 2, 16, false, false), 132, DQ_COPIES_MAX, false), 4);
        assert_eq!(bwd_det_splits(&problem(256, 16384, 1, 8, true, false), 132, DQ_COPIES_MAX, false), 15);
        assert_eq!(dq_copies_for(32), 5);
        assert_eq!(dq_copies_for(8), 16);
        assert_eq!(dq_copies_for(1000), 1);
    }

    /// The Hopper dK/dV grid: one CTA per (kv head, sequence), converting dq itself (two launches), only
    /// for equal-length problems with at least 4 waves of pairs whose Q/dO fit L2; else one key block
    /// per CTA and the convert pass.
    #[test]
    fn hopper_backward_grid_chains_only_where_measured_to_help() {
        let launches = |d, s, b, h, causal, varlen| bwd_launches(&problem(d, s, b, h, causal, varlen), false, Some(132), false, 1, false, false).unwrap();
        let gx = |d, s, b, h, causal, varlen| launches(d, s, b, h, causal, varlen)[1].grid.0;
        assert_eq!(gx(64, 512, 32, 32, true, false), 1); // 1024 pairs, Q/dO 17 MB
        assert_eq!(launches(64, 512, 32, 32, false, false).len(), 2);
        assert_eq!(gx(128, 512, 32, 16, true, false), 4); // 512 pairs: under 4 waves
        assert_eq!(gx(64, 2048, 64, 32, false, false), 16); // Q/dO 69 MB: past L2
        assert_eq!(gx(128, 8192, 2, 16, true, false), 64);
        assert_eq!(gx(64, 512, 32, 32, true, true), 4); // varlen
        assert_eq!(gx(64, 512, 35, 16, true, false), 4); // 560 pairs: a fifth wave 24% full
        assert_eq!(launches(128, 8192, 2, 16, true, false).len(), 3);
        // One key block per sequence: grid x is 1 either way, and the kernel converts.
        assert_eq!(gx(64, 100, 1, 2, false, true), 1);
        assert_eq!(launches(64, 100, 1, 2, false, true).len(), 2);
    }

    /// A paged problem runs the paged twin of each kernel; the warp-specialized one only for page sizes
    /// whose copies are whole 8-row boxes (multiples of 8), with `tma_page_box_rows` rows per copy.
    #[test]
    fn paged_problems_run_the_paged_twins() {
        use crate::problem::Paged;
        for d in [32, 64, 96, 128, 192, 256] {
            for page in [1, 3, 8, 16, 24, 64, 100, 256] {
                let mut p = problem(d, 300, 2, 4, true, true);
                p.paged = Some(Paged { page_size: page, num_blocks: 40, max_blocks: 10 });
                for sms in [None, Some(132)] {
                    let f = fwd_launch(&p, sms).unwrap();
                    assert!(f.kernel.ends_with("_paged"), "d{d} page {page}: {}", f.kernel);
                    assert_eq!(fwd_launch(&problem(d, 300, 2, 4, true, true), sms).unwrap().kernel, f.kernel.strip_suffix("_paged").unwrap());
                }
                let ws = fwd_ws_launch(&p, 132);
                assert_eq!(ws.is_some(), d != 32 && page % 8 == 0, "d{d} page {page}");
                if let Some((l, _)) = ws {
                    assert!(l.kernel.contains("_ws_") && l.kernel.ends_with("_paged"));
                }
            }
        }
        assert_eq!(tma_page_box_rows(16, 128), 16);
        assert_eq!(tma_page_box_rows(24, 128), 8);
        assert_eq!(tma_page_box_rows(256, 128), 128);
        assert_eq!(tma_page_box_rows(256, 64), 64);
        assert_eq!(tma_page_box_rows(3, 64), 1);
        let mut p = problem(128, 300, 2, 4, true, true);
        p.paged = Some(Paged { page_size: 16, num_blocks: 0, max_blocks: 10 });
        assert!(fwd_ws_launch(&p, 132).is_none(), "no blocks: the cp.async kernel (it reads nothing)");
    }

    /// The tall tiles (`fwd_ws_tall_kernel`): head dim 64 only, plain problems and ALiBi or dropout alone
    /// (their `_alibi` / `_dropout` copies; both modifiers and paged K/V keep the 128-row kernels), by
    /// default plain problems unmasked or from `FWD_WS_TALL_MASKED_MIN_ROWS` rows, ALiBi unmasked,
    /// dropout never; 192-row blocks, 512 threads, shared
    /// memory for Q's 192 rows and the O stage's; `Some(false)` never takes them, `Some(true)` always.
    #[test]
    fn tall_tiles_run_hdim64_problems() {
        use super::variants::FWD_WS_TALL_ROWS;
        use crate::problem::{Alibi, Paged};
        let alibi = Some(Alibi { batch_stride: 0, head_stride: 1 });
        for d in [32, 64, 96, 128, 192, 256] {
            for dtype in [DType::BF16, DType::F16] {
                let kd = kernel_dtype(dtype).unwrap();
                for (varlen, causal, s) in [false, true].into_iter().flat_map(|v| [(v, false, 500), (v, true, 500), (v, true, FWD_WS_TALL_MASKED_MIN_ROWS - 1), (v, true, FWD_WS_TALL_MASKED_MIN_ROWS)]) {
                    let p = Problem { dtype, ..problem(d, s, 2, 4, causal, varlen) };
                    let Some(off) = fwd_ws_launch_with(&p, 132, Some(false)) else { continue };
                    let on = fwd_ws_launch_with(&p, 132, Some(true)).unwrap();
                    let default = fwd_ws_launch_with(&p, 132, None).unwrap();
                    assert!(!off.0.kernel.starts_with("flash_fwd_ws3_") && off.0.config.block_m() == 128, "{}", off.0.kernel);
                    let by_default = !causal || s >= FWD_WS_TALL_MASKED_MIN_ROWS;
                    assert_eq!(fwd_ws_tall(&p, None), by_default);
                    assert_eq!(default, if by_default { on } else { off }, "d{d} causal {causal} s {s}");
                    let Some((name, c)) = fwd_ws_tall_kernel(d, kd) else {
                        assert_eq!(on, off, "d{d}");
                        continue;
                    };
                    assert_eq!(d, 64);
                    let (t, m_blocks) = on;
                    assert_eq!((t.kernel, t.config, c.block_m(), t.block), (name, c, FWD_WS_TALL_ROWS, 512));
                    assert!(name.starts_with("flash_fwd_ws3_"), "{name}: xtask's launch bounds");
                    assert_eq!(t.smem_bytes, fwd_ws_smem_bytes(&c));
                    assert_eq!(t.smem_bytes, off.0.smem_bytes + 64 * 64 * 2 + 64 * 64 * 2, "Q and the O stage 64 rows more");
                    assert_eq!(m_blocks as usize, p.fwd_slots(FWD_WS_TALL_ROWS).unwrap_or(s.div_ceil(FWD_WS_TALL_ROWS)));
                    // One modifier alone: its tall copy, on the same tiles.
                    let ap = Problem { alibi, ..p.clone() };
                    let a = fwd_ws_launch_with(&ap, 132, Some(true)).unwrap().0;
                    assert_eq!((a.kernel, a.config, a.block), (format!("{name}_alibi").as_str(), c, 512));
                    assert_eq!(fwd_ws_launch_with(&ap, 132, None).unwrap().0.kernel == a.kernel, !causal, "ALiBi: tall unmasked only");
                    let dr = Problem { dropout: crate::dropout::DropoutParams::new(0.1, 1, 2), ..p.clone() };
                    let dr_on = fwd_ws_launch_with(&dr, 132, Some(true)).unwrap().0;
                    assert_eq!((dr_on.kernel, dr_on.config, dr_on.smem_bytes), (format!("{name}_dropout").as_str(), c, t.smem_bytes));
                    for dr_tall in [Some(false), None] {
                        assert_eq!(fwd_ws_launch_with(&dr, 132, dr_tall).unwrap().0.kernel, fwd_ws_dropout_kernel_name(d, kd).unwrap(), "dropout: tall only when asked");
                    }
                    for other in [Problem { alibi, ..dr.clone() }, Problem { paged: Some(Paged { page_size: 64, num_blocks: 100, max_blocks: 50 }), ..p.clone() }] {
                        if let Some((o, _)) = fwd_ws_launch_with(&other, 132, Some(true)) {
                            assert!(!o.kernel.starts_with("flash_fwd_ws3_") && o.config.block_m() == 128, "{}", o.kernel);
                        }
                    }
                }
            }
        }
    }

    /// A plain problem with `FWD_WS_WIDE_MIN_KEYS` keys or more runs the wide-tile ws kernel where there
    /// is one (head dim 192: 112 keys, its shared memory and the same grid), and with ALiBi alone its
    /// `_alibi` copy, with dropout alone from `FWD_WS_WIDE_DROPOUT_MIN_KEYS` keys its `_dropout` copy; fewer
    /// keys, both modifiers or paged K/V run the 64-key kernels.
    #[test]
    fn long_plain_problems_run_the_wide_kernel() {
        use crate::problem::{Alibi, Paged};
        for d in [32, 64, 96, 128, 192, 256] {
            for dtype in [DType::BF16, DType::F16] {
                let kd = kernel_dtype(dtype).unwrap();
                for varlen in [false, true] {
                    for sk in [FWD_WS_WIDE_MIN_KEYS - 1, FWD_WS_WIDE_MIN_KEYS, 3 * FWD_WS_WIDE_MIN_KEYS, FWD_WS_WIDE_DROPOUT_MIN_KEYS] {
                        let p = Problem { dtype, seqlen_k: sk, ..problem(d, 300, 2, 4, true, varlen) };
                        let (Some(w), Some(short)) = (fwd_ws_launch(&p, 132), fwd_ws_launch(&Problem { seqlen_k: 300, ..p.clone() }, 132)) else {
                            assert!(fwd_ws_kernel_name(d, kd).is_none(), "d{d}");
                            continue;
                        };
                        assert_eq!(short.0.kernel, fwd_ws_kernel_name(d, kd).unwrap());
                        assert_eq!((w.0.grid, w.0.block, w.1), (short.0.grid, short.0.block, short.1), "d{d} sk {sk}");
                        match fwd_ws_wide_kernel(d, kd) {
                            Some((name, c)) if sk >= FWD_WS_WIDE_MIN_KEYS => {
                                assert_eq!((d, c.block_n), (192, 112));
                                assert_eq!((w.0.kernel, w.0.config, w.0.smem_bytes), (name, c, fwd_ws_smem_bytes(&c)));
                                assert!(w.0.smem_bytes <= 227 * 1024, "d{d}: {} bytes", w.0.smem_bytes);
                                assert_eq!(name, format!("{}_wide", short.0.kernel));
                            }
                            _ => assert_eq!(w.0, short.0, "d{d} sk {sk}"),
                        }
                        // ALiBi alone: the wide kernel's `_alibi` copy where the plain problem runs the wide one.
                        let alibi = Problem { alibi: Some(Alibi { batch_stride: 0, head_stride: 1 }), ..p.clone() };
                        let a = fwd_ws_launch(&alibi, 132).unwrap().0;
                        // Dropout alone: likewise its `_dropout` copy (none at head dim 96: `_mods`).
                        let dropout = Problem { dropout: crate::dropout::DropoutParams::new(0.1, 1, 2), ..p.clone() };
                        let dr = fwd_ws_launch(&dropout, 132).unwrap().0;
                        if w.0.kernel == short.0.kernel {
                            assert_eq!(a.kernel, fwd_ws_alibi_kernel_name(d, kd).unwrap());
                        } else {
                            assert_eq!((a.kernel, a.config, a.smem_bytes, a.grid), (format!("{}_alibi", w.0.kernel).as_str(), w.0.config, w.0.smem_bytes, w.0.grid));
                        }
                        if w.0.kernel == short.0.kernel || sk < FWD_WS_WIDE_DROPOUT_MIN_KEYS {
                            assert_eq!(dr.kernel, fwd_ws_dropout_kernel_name(d, kd).or(fwd_ws_mods_kernel_name(d, kd)).unwrap());
                        } else {
                            assert_eq!((dr.kernel, dr.config, dr.smem_bytes, dr.grid), (format!("{}_dropout", w.0.kernel).as_str(), w.0.config, w.0.smem_bytes, w.0.grid));
                        }
                        let paged = Problem { paged: Some(Paged { page_size: 64, num_blocks: 100, max_blocks: 50 }), ..p.clone() };
                        if let Some(pw) = fwd_ws_launch(&paged, 132) {
                            assert_eq!((pw.0.kernel, pw.0.config), (fwd_ws_paged_kernel_name(d, kd).unwrap(), fwd_wg_config(d).unwrap()));
                        }
                    }
                }
            }
        }
    }

    /// ALiBi or dropout over contiguous K/V run the `_mods` twins (ALiBi alone the warp-specialized one's
    /// `_alibi` copy, dropout alone its `_dropout` copy): the warp-specialized one on Hopper, the
    /// mma.sync one wherever the cp.async wgmma forward would run (it has no twin: `fwd_no_ws`, operands
    /// the copy engine cannot address, or no Hopper); paged K/V the `_paged_mods` twins likewise.
    /// The backward's dK/dV and deterministic dq kernels (mma.sync, wgmma and warp-specialized) run their
    /// `_mods` twins in the plain launch shapes; prep and convert are shared.
    #[test]
    fn score_mods_run_the_mods_twins() {
        use crate::dropout::DropoutParams;
        use crate::problem::{Alibi, Paged};
        let alibi = Some(Alibi { batch_stride: 0, head_stride: 1 });
        let dropout = DropoutParams::new(0.1, 1, 2);
        for d in [32, 64, 96, 128, 192, 256] {
            for dtype in [DType::BF16, DType::F16] {
                let kd = kernel_dtype(dtype).unwrap();
                for (a, dr) in [(alibi, None), (None, dropout), (alibi, dropout)] {
                    let plain = Problem { dtype, ..problem(d, 300, 2, 4, true, false) };
                    let p = Problem { alibi: a, dropout: dr, ..plain.clone() };
                    let at = format!("d{d} {dtype} alibi {} dropout {}", a.is_some(), dr.is_some());
                    // Forward: mma.sync `_mods` with its plain launch shape, on any GPU but the ws path.
                    for sms in [None, Some(132)] {
                        let (f, f0) = (fwd_launch(&p, sms).unwrap(), fwd_launch(&plain, None).unwrap());
                        assert_eq!(f.kernel, fwd_mods_kernel_name(d, kd).unwrap(), "{at} sms {sms:?}");
                        assert_eq!(f.kernel, format!("{}_mods", f0.kernel));
                        assert_eq!((f.config, f.grid, f.block, f.smem_bytes), (f0.config, f0.grid, f0.block, f0.smem_bytes), "{at}");
                    }
                    let ws = fwd_ws_launch(&p, 132);
                    let (twin, copy) = match (a, dr) {
                        (_, None) => (fwd_ws_alibi_kernel_name(d, kd), "alibi"),
                        (None, _) if d != 96 => (fwd_ws_dropout_kernel_name(d, kd), "dropout"),
                        _ => (fwd_ws_mods_kernel_name(d, kd), "mods"),
                    };
                    assert_eq!(ws.map(|w| w.0.kernel), twin, "{at}");
                    if let (Some(w), Some(w0)) = (ws, fwd_ws_launch(&plain, 132)) {
                        assert_eq!(w.0.kernel, format!("{}_{copy}", w0.0.kernel));
                        assert_eq!((w.0.grid, w.0.block, w.0.smem_bytes, w.1), (w0.0.grid, w0.0.block, w0.0.smem_bytes, w0.1));
                    }
                    // Paged: the `_paged_mods` twins, in the launch shapes of the mma.sync / ws `_paged` ones.
                    for page in [16, 3] {
                        let pg = Some(Paged { page_size: page, num_blocks: 40, max_blocks: 10 });
                        let (pp, pp0) = (Problem { paged: pg, varlen: true, ..p.clone() }, Problem { paged: pg, varlen: true, ..plain.clone() });
                        for sms in [None, Some(132)] {
                            let (f, f0) = (fwd_launch(&pp, sms).unwrap(), fwd_launch(&pp0, None).unwrap());
                            assert_eq!(f.kernel, fwd_paged_mods_kernel_name(d, kd).unwrap(), "{at} paged {page} sms {sms:?}");
                            assert_eq!(f.kernel, format!("{}_mods", f0.kernel));
                            assert_eq!((f.grid, f.block, f.smem_bytes), (f0.grid, f0.block, f0.smem_bytes), "{at} paged");
                        }
                        match (fwd_ws_launch(&pp, 132), fwd_ws_launch(&pp0, 132)) {
                            (Some(w), Some(w0)) => {
                                assert_eq!(w.0.kernel, format!("{}_mods", w0.0.kernel), "{at} paged ws");
                                assert_eq!((w.0.grid, w.0.block, w.0.smem_bytes, w.1), (w0.0.grid, w0.0.block, w0.0.smem_bytes, w0.1));
                            }
                            (w, w0) => assert!(w.is_none() && w0.is_none(), "{at} paged {page} ws"),
                        }
                    }
                    // Backward: every launch as the plain one's, the dK/dV / dq kernels renamed.
                    let (dkdv, dq) = bwd_mods_kernel_names(d, kd).unwrap();
                    for (det, sms, chain, ws) in [(false, None, false, false), (true, None, false, false), (false, Some(132), false, false), (true, Some(132), false, false), (false, Some(132), true, false), (false, Some(132), false, true), (true, Some(132), false, true)] {
                        let (b, b0) = (bwd_launches(&p, det, sms, chain, 0, ws, false).unwrap(), bwd_launches(&plain, det, sms, chain, 0, ws, false).unwrap());
                        assert_eq!(b.len(), b0.len(), "{at} det {det}");
                        assert_eq!(b.ws, b0.ws, "{at} det {det} ws {ws}");
                        let wg = sms.is_some() && !det && bwd_wg_kernel_name(d, kd).is_some();
                        let on_ws = wg && ws && bwd_ws_kernel_name(d, kd).is_some();
                        assert_eq!(b.ws, on_ws, "{at} det {det} ws {ws}");
                        for (i, (l, l0)) in b.iter().zip(b0.iter()).enumerate() {
                            assert_eq!((l.grid, l.block, l.smem_bytes), (l0.grid, l0.block, l0.smem_bytes), "{at} det {det} launch {i}");
                            let want = match i {
                                1 if on_ws && dr.is_none() => bwd_ws_alibi_kernel_name(d, kd).unwrap(),
                                1 if on_ws => bwd_ws_mods_kernel_name(d, kd).unwrap(),
                                1 if wg && dr.is_none() => bwd_wg_alibi_kernel_name(d, kd).unwrap(),
                                1 if wg => bwd_wg_mods_kernel_name(d, kd).unwrap(),
                                1 => dkdv,
                                2 if det => dq,
                                _ => l0.kernel,
                            };
                            assert_eq!(l.kernel, want, "{at} det {det} sms {sms:?} launch {i}");
                        }
                    }
                }
            }
        }
    }

    /// Varlen without the max lengths: every forward and default-mode backward grid walks the slots of
    /// its side and block size in x (the ws forward: `m_blocks` slots of one slice), z one slice; the
    /// deterministic backward and dense problems keep their grids.
    #[test]
    fn slot_scheduled_grids_without_max_lengths() {
        use crate::problem::slot_count;
        for d in [64, 128, 256] {
            let (batch, total_q, total_k) = (5, 1000, 1300);
            let p = Problem { total_q, total_k, seqlen_q: total_q / batch, seqlen_k: total_k / batch, max_given: false, ..problem(d, 7, batch, 4, true, true) };
            let slots = |total, per| slot_count(total, batch, per).unwrap() as u32;
            for sms in [None, Some(132)] {
                let f = fwd_launch(&p, sms).unwrap();
                assert_eq!(f.grid, (slots(total_q, f.config.block_m()), 4, 1), "d{d} {sms:?}");
                let l = bwd_launches(&p, false, sms, false, 1, false, false).unwrap();
                assert!(l.slots, "d{d} {sms:?}");
                let bn = if sms.is_some() { bwd_wg_block_n(d) } else { bwd_config(d).block_n };
                assert_eq!(l[0].grid, (slots(total_q, BWD_ROWS_PER_BLOCK), 4, 1));
                assert_eq!(l[1].grid, (slots(total_k, bn), 4, 1), "d{d} {sms:?}");
                assert_eq!(l[2].grid, (slots(total_q, BWD_ROWS_PER_BLOCK), 4, 1));
                let det = bwd_launches(&p, true, sms, false, 1, false, false).unwrap();
                assert!(!det.slots && det[1].grid.2 == batch as u32 + 1, "d{d} {sms:?}");
                // Never the ordered deterministic mode: its CTAs must not stride over key blocks.
                assert!(!bwd_launches(&p, true, sms, false, 1, true, true).unwrap().ordered, "d{d} {sms:?}");
                let given = Problem { max_given: true, ..p.clone() };
                assert_eq!(fwd_launch(&given, sms).unwrap().grid.2, batch as u32 + 1);
                assert!(!bwd_launches(&given, false, sms, false, 1, false, false).unwrap().slots);
            }
            let (ws, m_blocks) = fwd_ws_launch(&p, 132).unwrap();
            assert_eq!((m_blocks as u32, ws.grid), (slots(total_q, ws.config.block_m()), ((m_blocks as u32 * 4).min(132), 1, 1)), "d{d}");
            // With a score modifier the forward is not slot-scheduled (the ws kernels' modifier copies
            // take no slots): mean-based grids, one slice per sequence and the tail.
            let dropout = Problem { dropout: crate::dropout::DropoutParams::new(0.1, 1, 0), ..p.clone() };
            assert_eq!(fwd_launch(&dropout, Some(132)).unwrap().grid.2, batch as u32 + 1, "d{d}");
            assert_eq!(fwd_ws_launch(&dropout, 132).unwrap().1 as usize, (total_q / batch).div_ceil(128), "d{d}");
        }
    }

    /// The probabilities kernel: one thread per key in blocks of `PROBS_THREADS`, y over the rows capped
    /// at 65535, z over (sequence, head) pairs; its name by q's dtype and whether s_dmask is f32.
    #[test]
    fn probs_launch_covers_every_score() {
        let p = problem(64, 300, 3, 5, true, false);
        let l = probs_launch(&Problem { seqlen_k: 129, ..p.clone() }, true).unwrap();
        assert_eq!((l.kernel, l.grid, l.block, l.smem_bytes), ("flash_probs_bf16_f32", (2, 300, 15), PROBS_THREADS as u32, 0));
        let l = probs_launch(&Problem { dtype: DType::F16, seqlen_q: 100_000, seqlen_k: 128, ..p.clone() }, false).unwrap();
        assert_eq!((l.kernel, l.grid), ("flash_probs_f16", (1, 65535, 15)));
        assert_eq!(probs_launch(&Problem { seqlen_q: 0, seqlen_k: 0, ..p.clone() }, false).unwrap().grid, (0, 0, 15));
        assert_eq!(probs_launch(&p, false).unwrap().kernel, "flash_probs_bf16");
        assert!(probs_launch(&Problem { dtype: DType::F32, ..p }, true).is_none());
    }

    /// The Hopper forward grid covers every row block of every (head, sequence): chained (x = 1) only
    /// for equal-length problems with enough pairs that are masked or whose K/V fits L2; else one row
    /// block per block.
    #[test]
    fn hopper_forward_grid_chains_only_where_measured_to_help() {
        let gx = |d, s, b, h, causal, varlen| fwd_launch(&problem(d, s, b, h, causal, varlen), Some(132)).unwrap().grid.0;
        assert_eq!(gx(64, 512, 32, 32, false, false), 1); // K/V per pair 128 KiB: fits L2
        assert_eq!(gx(128, 2048, 8, 16, false, false), 16); // 1 MiB per pair: past L2
        assert_eq!(gx(128, 2048, 16, 16, true, false), 1); // masked, 256 pairs: balanced when chained
        assert_eq!(gx(128, 2048, 8, 16, true, false), 16); // masked, 128 pairs < 132 multiprocessors
        assert_eq!(gx(128, 8192, 2, 16, true, false), 64); // 32 pairs < 132 multiprocessors
        assert_eq!(gx(128, 4096, 64, 16, true, true), 32); // varlen: ragged lengths
        assert_eq!(gx(96, 2048, 8, 21, true, false), 16); // 168 pairs: a second wave 27% full
        assert_eq!(gx(64, 2048, 8, 32, true, false), 1); // 256 pairs: two waves, 97% full
    }

    /// The kernels in a shipped cubin: its `.text.<name>` sections (64-bit little-endian ELF).
    fn cubin_kernels(elf: &[u8]) -> std::collections::BTreeSet<String> {
        let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
        let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
        let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
        assert_eq!(&elf[..5], b"\x7fELF\x02", "a 64-bit ELF");
        let (shoff, shentsize, shnum, shstrndx) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
        let header = |i: usize| shoff + i * shentsize;
        let strtab = u64_at(header(shstrndx) + 0x18);
        (0..shnum)
            .filter_map(|i| {
                let name = &elf[strtab + u32_at(header(i))..];
                let name = std::str::from_utf8(&name[..name.iter().position(|&c| c == 0).unwrap()]).unwrap();
                name.strip_prefix(".text.").map(str::to_string)
            })
            .collect()
    }

    /// The shipped sm_90a cubin holds exactly the kernels the lookups name: none missing (a launch would
    /// fail), none that no dispatch can reach (dead code in the package; e.g. a `_dropout` copy at head
    /// dim 96, which `fwd_ws_dropout_kernel_name` leaves out); the sm_80 cubin holds a subset of them.
    #[test]
    fn shipped_kernels_are_the_named_ones() {
        let mut named = std::collections::BTreeSet::new();
        for d in 0..=512 {
            for kd in [KernelDType::F16, KernelDType::BF16] {
                let singles = [
                    fwd_kernel_name, fwd_mods_kernel_name, fwd_paged_kernel_name, fwd_paged_mods_kernel_name, fwd_decode_kernel_name, fwd_decode_fin_kernel_name, fwd_wg_kernel_name, fwd_wg_paged_kernel_name,
                    fwd_ws_kernel_name, fwd_ws_mods_kernel_name, fwd_ws_alibi_kernel_name, fwd_ws_dropout_kernel_name, fwd_ws_paged_kernel_name, fwd_ws_paged_mods_kernel_name,
                    bwd_ws_kernel_name, bwd_ws_mods_kernel_name, bwd_ws_alibi_kernel_name, bwd_ws_det_kernel_name, bwd_wg_kernel_name, bwd_wg_mods_kernel_name, bwd_wg_alibi_kernel_name, bwd_wg_det_kernel_name, bwd_wg_mods_det_kernel_name,
                ];
                named.extend(singles.iter().filter_map(|f| f(d, kd)));
                named.extend(fwd_ws_wide_kernel(d, kd).map(|w| w.0));
                named.extend(fwd_ws_wide_alibi_kernel(d, kd).map(|w| w.0));
                named.extend(fwd_ws_wide_dropout_kernel(d, kd).map(|w| w.0));
                named.extend(fwd_ws_tall_kernel(d, kd).map(|w| w.0));
                named.extend(fwd_ws_tall_alibi_kernel(d, kd).map(|w| w.0));
                named.extend(fwd_ws_tall_dropout_kernel(d, kd).map(|w| w.0));
                for pair in [bwd_kernel_names(d, kd), bwd_mods_kernel_names(d, kd)].into_iter().flatten() {
                    named.extend([pair.0, pair.1]);
                }
            }
        }
        for kd in [KernelDType::F16, KernelDType::BF16] {
            named.extend([bwd_prep_kernel_name(kd), bwd_convert_kernel_name(kd), probs_kernel_name(kd, false), probs_kernel_name(kd, true), kvcache_append_kernel_name(kd)]);
        }
        named.insert(COMBINE_KERNEL_NAME);
        let named: std::collections::BTreeSet<String> = named.into_iter().map(str::to_string).collect();
        let sm90 = cubin_kernels(crate::ptx::cubin_sm90().unwrap());
        assert_eq!(named.difference(&sm90).collect::<Vec<_>>(), Vec::<&String>::new(), "named but not in the sm_90a cubin");
        assert_eq!(sm90.difference(&named).collect::<Vec<_>>(), Vec::<&String>::new(), "in the sm_90a cubin but named by no lookup");
        let sm80 = cubin_kernels(crate::ptx::cubin_sm80().unwrap());
        assert!(!sm80.is_empty());
        assert_eq!(sm80.difference(&named).collect::<Vec<_>>(), Vec::<&String>::new(), "in the sm_80 cubin but named by no lookup");
    }
}
