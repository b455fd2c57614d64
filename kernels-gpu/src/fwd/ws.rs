//! Hopper forward, warp-specialized (sm_90a): the wg kernel's tiles and products fed by the bulk tensor
//! copy engine. Warpgroup 0 produces: one thread walks the work tiles and copies Q, K and V into a Q stage
//! and two K and V stages, completing on barriers; warpgroups 1 and 2 consume (64 query rows each): they
//! wait for a stage, run S = Q K^T and O += P V on wgmma with the online softmax in registers, release it.
//! The consumers take turns at the tensor cores (one's products run under the other's softmax), and the
//! grid is persistent: the blocks walk (row block, head, sequence) tiles, heaviest row blocks first, each
//! drawing its next tile from a counter once its producer has issued the last one's copies (`Tiles`).
//! At head dim 128 each consumer warpgroup hands O to global memory through a shared-memory stage of its
//! own (`store_out_staged`). The tall kernels (head dim 64, `fwd_ws_tall_kernels`) have three consumer
//! warpgroups over 192-row tiles (`QM`), taking turns in a ring.

use super::wg::{block_plan, issue_pv, issue_s, keep_p, kept_of, pack_p, rescale_o, sized, softmax, softmax_in_place, wait_acc, Tile, WgElem};
use super::{store_out, BlockArgs, HeadSlice, BF16, F16};
use crate::arch::math::div_rem_u32;
use crate::arch::mem::{atom_add_acq_rel_gpu_u32, atom_add_relaxed_gpu_u32, ld_i32_at, st_global_f32, st_global_v4, st_relaxed_gpu_u32};
use crate::arch::reg::opaque_u32;
use crate::arch::shfl::{any_lane, shfl_idx_u32};
use crate::arch::smem;
use crate::arch::sreg::{block_idx_x, grid_dim_x, thread_idx_x};
use crate::arch::sync::{named_arrive, named_sync, sync_threads, sync_warp};
use crate::arch::wgmma::{self, fence_proxy_async_shared, sw128_offset};
use crate::arch::{mbarrier, tma};
use crate::mods::{AlibiCode, KeptP};
use crate::params::{FwdParams, TmaMaps};
use crate::pipeline::{Pipeline, Stage};
use crate::softmax::{finalize_row, RowState};
use crate::variants::{fwd_wg_config, fwd_ws_o_stage_cols, fwd_ws_o_staged, fwd_ws_threads, tma_page_box_rows, FWD_WS_BARRIER_BYTES, FWD_WS_L2_SECTION_BYTES, FWD_WS_O_STAGE_AT, FWD_WS_TALL_ROWS, FWD_WS_THREADS, FWD_WS_TILE_SLOTS};
use core::sync::atomic::AtomicU32;

/// Query rows per tile: 64 per consumer warpgroup, two of them (`QM` 128), or three in the tall kernels
/// (`QM` = `FWD_WS_TALL_ROWS`, 192, at head dim 64; `fwd_ws_threads`).
const BM: usize = 128;
/// Consumer threads of a tile of `qm` rows.
const fn consumers(qm: usize) -> usize {
    2 * qm
}
const CONSUMERS: usize = consumers(BM);
/// Threads at a turn barrier: the warpgroup waiting for its turn and the one passing it.
const TURN_THREADS: u32 = 256;
/// K and V stages (the wg kernel's two slots each: `Tile` lays them out).
const KV_STAGES: u32 = 2;
/// Named barriers (0 is the block's): 1 + w, consumer warpgroup w's turn at the tensor cores; 3, both
/// consumer warpgroups.
const BAR_TURN: u32 = 1;
/// Whether the consumer warpgroups take turns at the tensor cores (measured, H200 hdim 128 bf16: S=8192
/// 541 vs 517 TFLOP/s without, S=16384 569 vs 540; causal within 1%).
const PINGPONG: bool = true;
const BAR_CONSUMERS: u32 = 3;
/// All consumer warpgroups of a tall kernel (whose turns take barriers 1..=3).
const BAR_CONSUMERS_TALL: u32 = 7;
/// 4 + w: consumer warpgroup w alone (its O stage, `store_out_staged`).
const BAR_WG: u32 = 4;
/// Registers per thread after the split (the block starts at 168: 384 threads in 64K registers).
const PRODUCER_REGS: u32 = 24;
const CONSUMER_REGS: u32 = 240;
const _: () = assert!(FWD_WS_THREADS == 128 + CONSUMERS && 128 * PRODUCER_REGS + CONSUMERS as u32 * CONSUMER_REGS <= 168 * 384);
/// The tall kernels' split: 512 threads start at 128 registers; three consumer warpgroups at 160.
const TALL_PRODUCER_REGS: u32 = 24;
const TALL_CONSUMER_REGS: u32 = 160;
const _: () = assert!(fwd_ws_threads(FWD_WS_TALL_ROWS) == 128 + consumers(FWD_WS_TALL_ROWS) && 128 * TALL_PRODUCER_REGS + consumers(FWD_WS_TALL_ROWS) as u32 * TALL_CONSUMER_REGS <= 65536);
/// The other split, 40 / 232: the producers (which issue the page boxes in `_paged`) spill none in their
/// tile loop (9 spill loads per key tile at 24 in the hdim 128 `_paged` copy), the consumers' loop none
/// either where it is taken (`ws_regs`). A pair of `ws_entry` parameters, so that the kernels that keep
/// 24 / 240 keep their PTX (a branch on it in `ws_entry`, though folded, changed every kernel's PTX).
const SPLIT_PRODUCER_REGS: u32 = 40;
const SPLIT_CONSUMER_REGS: u32 = 232;
const _: () = assert!(128 * SPLIT_PRODUCER_REGS + CONSUMERS as u32 * SPLIT_CONSUMER_REGS <= 168 * 384);

/// Which copy of the ws forward a kernel is (`ws_regs`).
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
enum WsCopy {
    PLAIN,
    MODS,
    ALIBI,
    DROPOUT,
    PAGED,
    PAGED_MODS,
    WIDE,
    WIDE_ALIBI,
    WIDE_DROPOUT,
}

/// A kernel's (producer, consumer) registers: 40 / 232 where the H200 measured it faster than 24 / 240
/// (benches/RESULTS.md): hdim 128 plain (1-3%) and `_paged` (2-4%), hdim 96 `_alibi` and `_mods` (the
/// latter also runs dropout alone there; 7-13%). Measured slower and so not split: hdim 64 plain,
/// `_alibi` (1-2%), hdim 128 `_alibi` (4-7%), the hdim 192 wide `_alibi` (1-2%); no faster: the
/// `_dropout` copies, hdim 256; more spills (ptxas): `_paged_mods`.
const fn ws_regs(d: usize, copy: WsCopy) -> (u32, u32) {
    let split = match copy {
        WsCopy::PLAIN | WsCopy::PAGED => d == 128,
        WsCopy::MODS | WsCopy::ALIBI => d == 96,
        WsCopy::DROPOUT | WsCopy::PAGED_MODS | WsCopy::WIDE | WsCopy::WIDE_ALIBI | WsCopy::WIDE_DROPOUT => false,
    };
    if split { (SPLIT_PRODUCER_REGS, SPLIT_CONSUMER_REGS) } else { (PRODUCER_REGS, CONSUMER_REGS) }
}

/// Stages of the tile ring (`Tiles`: the producer's tile numbers for the consumers).
const TILE_STAGES: u32 = 2;

/// Producer warps that issue a paged tile's boxes.
const SPREAD_WARPS: u32 = 4;

/// Whether a `PAGED` kernel's paged tiles take at least `SPREAD_WARPS` boxes per 64-column group, so
/// that the whole producer warpgroup issues them (`produce`): warps 1..3 then take the tile numbers from
/// the tile ring as the consumers do. Every spread warp must have a box of every tile: a warp without
/// one still waits for each stage, but no stage waits for it, so it could fall two phases behind on a
/// stage's barrier, read the parity as not yet flipped and hold up the tile ring (H200: pages of 64,
/// two boxes per group, hung the ragged batch). Fewer boxes stay with warp 0. (A cp.async gather of
/// such tiles by the whole warpgroup instead ran 1.14x the one-warp boxes' time at pages of 8-64, hdim
/// 128.)
#[inline(always)]
fn spreads<const BN: usize, const PAGED: bool>(p: &FwdParams) -> bool {
    PAGED && tma_page_box_rows(p.page_size as usize, BN) * SPREAD_WARPS as usize <= BN
}

/// The three pipelines and the tile ring (its barriers, then its stages' tile numbers), after the tiles.
struct Pipes {
    q: Pipeline<1>,
    k: Pipeline<KV_STAGES>,
    v: Pipeline<KV_STAGES>,
    tiles: Pipeline<TILE_STAGES>,
    tile_ids: u32,
}

impl Pipes {
    #[inline(always)]
    fn at<const D: usize, const BN: usize, const QM: usize>(base: u32) -> Pipes {
        let bars = base + Tile::<D, BN, QM>::BYTES;
        const KV: u32 = Pipeline::<1>::BYTES;
        const TILES: u32 = KV + 2 * Pipeline::<KV_STAGES>::BYTES;
        const IDS: u32 = TILES + Pipeline::<TILE_STAGES>::BYTES;
        const { assert!(IDS + 12 * TILE_STAGES <= FWD_WS_BARRIER_BYTES as u32) };
        Pipes {
            q: Pipeline::at(bars),
            k: Pipeline::at(bars + KV),
            v: Pipeline::at(bars + KV + Pipeline::<KV_STAGES>::BYTES),
            tiles: Pipeline::at(bars + TILES),
            tile_ids: bars + IDS,
        }
    }
}

/// Dynamic tile scheduling's counters (`FwdParams::tile_slot`): entry e is words 2e (tiles handed out
/// past each block's first) and 2e + 1 (blocks done). Zero at module load; a launch's last block to
/// finish sets its entry back to zero, so the next launch on that entry finds it so (launches on one
/// stream run in turn; the host deals entries out in turn, so launches on other streams use others).
#[unsafe(no_mangle)]
static FA_FWD_WS_TILE_COUNTERS: [AtomicU32; 2 * FWD_WS_TILE_SLOTS] = [const { AtomicU32::new(0) }; 2 * FWD_WS_TILE_SLOTS];

/// Waves of tiles per section at least, for statically scheduled causal and windowed problems (`Tiles::new`).
const WS_MASKED_WAVES: u32 = 4;

/// The tile scheduler. The (sequence slice, head) pairs are cut into sections whose K and V fit a share
/// of L2 together (`FWD_WS_L2_SECTION_BYTES`; GQA's q heads of one kv head count once, they are
/// neighbours); a section's tiles come before the next section's, and inside a section tile `r` is row
/// block `m_blocks - 1 - r / n` of its pair `r % n` (n pairs in the section), so the first tiles of a
/// section are its last (for causal: heaviest) row blocks. Block `b` takes tiles `b, b + grid, ..`, so
/// the blocks in flight share a few heads' keys and values in L2 instead of streaming every head's from
/// DRAM (one section of all pairs, as before: H200 hdim 128 S=8192, 2.5 GB of DRAM reads for 256 MB of
/// q, k, v, o, nsight compute). The producer walks it; the consumers take its tiles. A tile also covers
/// row blocks `m_blocks` apart past the first (a varlen sequence longer than `max_seqlen_q`). With slot
/// scheduling (`FwdParams::slots`) the tiles are (slot, head) pairs, each slot a row block of some slice.
/// Which block takes which tile: static, block `b` takes tiles `b, b + grid, ..`; dynamic
/// (`FwdParams::tile_slot` >= 0), block `b` takes tile `b` first, then its producer draws the next tile
/// from a counter in global memory each time it has issued a tile's copies, so that the blocks stay
/// within a wave of tiles of each other: a ragged varlen batch's tiles differ in work, and statically
/// the blocks drifted apart, each streaming other sections' keys (H200, hdim 128 ragged batch: 10.7 GB
/// of DRAM reads for 1.6 GB of q, k and v), and causal blocks ended unevenly. Either way the producer
/// passes each tile, decoded, (and the end) to the consumers through the tile ring (`next`).
struct Tiles<const QM: usize> {
    m_blocks: i32,
    heads: i32,
    pairs: i32,
    /// Pairs per section (>= 1, at most `pairs`).
    section: i32,
    count: i32,
    /// Static: this block's next tile. Dynamic: its first tile, then -1 (the counter's turn).
    next: i32,
    /// Slot scheduling (`Tiles::new`).
    slotted: bool,
    /// Dynamic: the counter entry's generic address (0: static).
    counter: u64,
    ring: Pipeline<TILE_STAGES>,
    ids: u32,
    stage: Stage<TILE_STAGES>,
}

impl<const QM: usize> Tiles<QM> {
    #[inline(always)]
    /// Slot scheduling (`FwdParams::slots`) in the kernels without score modifiers (`MODS`) only: in the
    /// modifiers' copies the walk's slot path cost the tile loop spills (hdim 128 `_dropout`: 9 -> 58
    /// spill loads per tile), so the host gives them no slots. Producer and consumers pass the same.
    fn new<const D: usize, const MODS: bool>(p: &FwdParams, pipes: &Pipes) -> Tiles<QM> {
        // Slot scheduling: one slice whose `m_blocks` row blocks are the slots.
        let slotted = !MODS && p.slots > 0;
        let slices = if slotted { 1 } else { p.batch + (p.cu_seqlens_q != 0) as i32 };
        let pairs = p.h * slices;
        // Unchecked divisions (see `next`): h_k >= 1, and the key count is made >= 1.
        let group = div_rem_u32(p.h as u32, p.h_k as u32).0 as i32;
        let keys = if p.seqlen_k > 1 { p.seqlen_k } else { 1 };
        let kv_heads = div_rem_u32((FWD_WS_L2_SECTION_BYTES / (4 * D)) as u32, keys as u32).0 as i32;
        let mut section = if kv_heads > 1 { kv_heads } else { 1 }.saturating_mul(group);
        if (p.window_left >= 0 || p.window_right >= 0) && p.tile_slot < 0 {
            // Causal / windowed row blocks differ in work: statically scheduled, a section of at least
            // `WS_MASKED_WAVES` waves of tiles, so that walking each section heaviest first still
            // balances the blocks (H200, sections of one or two waves: causal hdim 256 S >= 2048
            // 0.73-0.83x one section). Drawn from the counter, the blocks balance themselves and the
            // sections keep the L2's share.
            let waves = div_rem_u32(WS_MASKED_WAVES * grid_dim_x() + p.m_blocks as u32 - 1, p.m_blocks as u32).0 as i32;
            if section < waves {
                section = waves;
            }
        }
        let section = if section < pairs { section } else { pairs };
        let counter = if p.tile_slot >= 0 {
            let e = if (p.tile_slot as usize) < FWD_WS_TILE_SLOTS { p.tile_slot as usize } else { FWD_WS_TILE_SLOTS - 1 };
            FA_FWD_WS_TILE_COUNTERS.as_ptr() as u64 + 8 * e as u64
        } else {
            0
        };
        let count = p.m_blocks * pairs;
        Tiles { m_blocks: p.m_blocks, heads: p.h, pairs, section, count, next: block_idx_x() as i32, slotted, counter, ring: pipes.tiles, ids: pipes.tile_ids, stage: Stage::START }
    }

    /// This block's next tile number (past `count`: none left), drawn by the producer (`PRODUCER`, lane 0
    /// of its warp; `warp` when the whole warp walks). Static: `b, b + grid, ..`; dynamic: the first, then
    /// from the counter; the producer's last draw also counts the block done, and the launch's last block
    /// resets the counter entry.
    #[inline(always)]
    fn draw(&mut self, lane: u32, warp: bool) -> i32 {
        if self.counter == 0 {
            let t = self.next;
            self.next += grid_dim_x() as i32;
            return t;
        }
        let mut t = self.next;
        self.next = -1;
        if t < 0 && lane == 0 {
            t = grid_dim_x() as i32 + unsafe { atom_add_relaxed_gpu_u32(self.counter, 1) } as i32;
        }
        if warp {
            t = shfl_idx_u32(t as u32, 0) as i32;
        }
        if lane == 0 && t >= self.count && unsafe { atom_add_acq_rel_gpu_u32(self.counter + 4, 1) } == grid_dim_x() - 1 {
            // Every block has drawn its last tile (each counted itself done after it).
            unsafe {
                st_relaxed_gpu_u32(self.counter, 0);
                st_relaxed_gpu_u32(self.counter + 4, 0);
            }
        }
        t
    }

    /// Tile `t`'s (first row block, head, sequence slice), slot scheduling's mapping applied.
    #[inline(always)]
    fn decode(&self, p: &FwdParams, t: i32) -> (i32, i32, i32) {
        // Unchecked divisions: a trap path here would cost the producer its register budget (see
        // div_rem_u32); every divisor is positive (the host launches only with tiles to do). The last
        // section may hold fewer pairs; the ones before it are whole.
        let (sec, r) = div_rem_u32(t as u32, (self.m_blocks * self.section) as u32);
        let first = sec as i32 * self.section;
        let n = if self.pairs - first < self.section { self.pairs - first } else { self.section };
        let (m, j) = div_rem_u32(r, n as u32);
        let (bidb, bidh) = div_rem_u32((first + j as i32) as u32, self.heads as u32);
        let m_block = self.m_blocks - 1 - m as i32;
        let (bidb, m_block) = if self.slotted { p.lengths().slot_block(m_block, QM as i32, false, p.slots, ld_i32_at) } else { (bidb as i32, m_block) };
        (m_block, bidh as i32, bidb)
    }

    /// The next (first row block, head, sequence slice). The producer draws and decodes it and puts it in
    /// the tile ring (-1 for the end); the consumers (and a spread producer's warps 1..3, `lane` >= 32)
    /// take it from there, so that they hold no scheduler state across a tile but the ring's stage (held
    /// over the tile loop, the state had spilled: the consumers' tile header waited on its reloads for
    /// about 3.4% of their samples at hdim 128 S=512, nsight compute).
    #[inline(always)]
    fn next<const PRODUCER: bool>(&mut self, p: &FwdParams, lane: u32, warp: bool) -> Option<(i32, i32, i32)> {
        let s = self.stage;
        self.stage.advance();
        let id = self.ids + 12 * s.index;
        if PRODUCER && lane < 32 {
            let t = self.draw(lane, warp);
            let tile = if t >= self.count { None } else { Some(self.decode(p, t)) };
            if lane == 0 {
                let (m_block, bidh, bidb) = tile.unwrap_or((-1, 0, 0));
                unsafe {
                    self.ring.producer_acquire(s);
                    smem::st_u32(id, m_block as u32);
                    smem::st_u32(id + 4, bidh as u32);
                    smem::st_u32(id + 8, bidb as u32);
                    mbarrier::arrive(self.ring.full_barrier(s));
                }
            }
            tile
        } else {
            unsafe {
                self.ring.consumer_wait(s);
                let (m_block, bidh, bidb) = (smem::ld_u32(id), smem::ld_u32(id + 4), smem::ld_u32(id + 8));
                self.ring.consumer_release(s);
                if (m_block as i32) < 0 { None } else { Some((m_block as i32, bidh as i32, bidb as i32)) }
            }
        }
    }

    /// Walk every row block of every tile of this block: `f(head, m0)` (with the score modifiers where
    /// `MODS`).
    #[inline(always)]
    fn for_each<const PAGED: bool, const MODS: bool, const PRODUCER: bool>(mut self, p: &FwdParams, lane: u32, mut f: impl FnMut(&HeadSlice, i32)) {
        // The paged producer's whole warp walks (`produce`); the contiguous one is lane 0 alone.
        while let Some((m_block, bidh, bidb)) = self.next::<PRODUCER>(p, lane, PAGED && PRODUCER) {
            let mut head = HeadSlice::new::<PAGED, MODS>(p, bidb, bidh);
            // Varlen pages only (the KV cache runs the mma.sync kernels): no identity table, no leftpad.
            head.kv.pages.kv_cache = false;
            let mut mb = m_block;
            while mb * (QM as i32) < head.sq.slot_len {
                f(&head, mb * QM as i32);
                mb += p.m_blocks;
            }
        }
    }
}

/// The first key tile a row block visits: `n_max - 1` (then leftwards), or with `DIAG` (the `_alibi`
/// copies where `lazy_max`) this one: the tile holding the diagonal of the block's last row, clamped into
/// the block's tiles, then rightwards to `n_max - 1`, then leftwards from it. ALiBi's bias is largest on
/// the diagonal and falls away from it both ways, so a row's max is found in its first tiles and the lazy
/// max rarely moves after them (from the right end the max rose tile after tile without a causal mask).
/// With a causal mask both orders are the same.
#[inline(always)]
fn first_tile<const BN: usize>(a: &BlockArgs, rows: i32, n_min: i32, n_max: i32) -> i32 {
    let key = a.m0 + rows - 1 + a.seqlen_k - a.seqlen_q;
    let d = if key < 0 { -1 } else { key / BN as i32 };
    if d >= n_max { n_max - 1 } else if d < n_min { n_min } else { d }
}

/// Tile number `i` of a row block's visit order with `DIAG` (`first_tile`); without it tile `i` is
/// `n_max - 1 - i`, which the callers write out (`pick`: the kernels without `DIAG` keep their code as
/// it was; a shared form raised the plain hdim 256 kernel's spills 188 -> 348 bytes).
#[inline(always)]
fn tile_at(i: i32, first: i32, n_max: i32) -> i32 {
    let right = n_max - first;
    if i < right { first + i } else { first - 1 - (i - right) }
}

/// Where the copy engine reads a head's rows: (first row, batch coordinate) of the 4-d tensor maps
/// (varlen: rows of the packed buffer, one batch; dense: rows of sequence `bidb`).
#[inline(always)]
fn row_coords(p: &FwdParams, head: &HeadSlice) -> (i32, i32, i32) {
    if p.cu_seqlens_q != 0 { (head.sq.start, head.sk.start, 0) } else { (0, 0, head.bidb) }
}

/// The producer: for every row block with keys to see, Q, then K_0, and (K_{i+1}, V_i) in the order the
/// consumers use them; lane 0 waits for the stages and announces their bytes. Contiguous K/V: lane 0
/// alone (the kernel runs only it). Paged K/V: a tile is `BN / box` copies of `box` rows
/// (`tma_page_box_rows`, at least 8: at most 16 boxes), each from the block holding its rows (the maps
/// are `[num_blocks][page_size][heads][head dim]`); the boxes of whole 8-row swizzle atoms land where one
/// whole-tile box would put their rows. There the whole warp produces: lane j looks up box j's block one
/// K tile ahead (the lookups of a tile in flight together, under the wait for a free stage) and issues
/// box j's copies (a lookup per box by one thread: pages of 16 at 0.66x contiguous). Where a tile takes
/// four or more boxes per 64-column group (`spreads`), the whole warpgroup does: lane j of warp w has box
/// w + 4j, and lane 0 of each warp waits for the stage before its warp's copies (the copies of one warp,
/// issued lane by lane, held pages of 16 at 0.85x contiguous; spread 0.94x).
#[inline(always)]
unsafe fn produce<const D: usize, const BN: usize, const QM: usize, const PAGED: bool, const MODS: bool, const DIAG: bool>(p: &FwdParams, maps: u64, pipes: &Pipes, lane: u32) {
    let base = smem::base();
    let (q_map, k_map, v_map) = (maps, maps + 128, maps + 256);
    if lane == 0 {
        unsafe {
            tma::prefetch_map(q_map);
            tma::prefetch_map(k_map);
            tma::prefetch_map(v_map);
        }
    }
    let groups = D.div_ceil(64);
    let mut qs = Stage::<1>::START;
    let mut ks = Stage::<KV_STAGES>::START;
    let mut vs = Stage::<KV_STAGES>::START;
    let spread = spreads::<BN, PAGED>(p);
    let box_rows = if PAGED { tma_page_box_rows(p.page_size as usize, BN) as i32 } else { BN as i32 };
    // This lane's box of a paged tile: its first row in the tile, and whether the tile has it. Spread
    // over the warpgroup, lane j of warp w has box w + 4j.
    let (warp, wl) = (lane / 32, lane % 32);
    let box_r = if spread { (warp + SPREAD_WARPS * wl) as i32 * box_rows } else { lane as i32 * box_rows };
    let has_box = box_r < BN as i32;
    Tiles::<QM>::new::<D, MODS>(p, pipes).for_each::<PAGED, false, true>(p, lane, #[inline(always)] |head, m0| {
        if m0 >= head.sq.used {
            return;
        }
        let (rows, n_min, n_max) = block_plan::<BN, QM>(&head.args_at(p, m0));
        if n_max <= n_min {
            return;
        }
        let first = if DIAG { first_tile::<BN>(&head.args_at(p, m0), rows, n_min, n_max) } else { 0 };
        // Tile number `i`, given as `n_max - 1 - i` (`tile_at`).
        let pick = #[inline(always)] |i: i32, from_last: i32| if DIAG { tile_at(i, first, n_max) } else { from_last };
        let (q_row, k_row, b) = row_coords(p, head);
        if lane == 0 {
            unsafe {
                pipes.q.producer_acquire(qs);
                let bar = pipes.q.producer_expect(qs, Tile::<D, BN, QM>::Q_BYTES);
                for c in 0..groups {
                    tma::load_4d(base + (c * QM * 128) as u32, q_map, [(c * 64) as i32, q_row + m0, head.bidh, b], bar);
                }
            }
        }
        qs.advance();
        // (block, row in it) of this lane's box of tile `n_block` (boxes past the sequence's keys copy
        // clamped blocks: masked (K) or zeroed (V)).
        let lookup = #[inline(always)] |n_block: i32| if PAGED && has_box { unsafe { head.kv.pages.locate(n_block * BN as i32 + box_r) } } else { (0, 0) };
        let load = #[inline(always)]
        |pipe: &Pipeline<KV_STAGES>, s: &mut Stage<KV_STAGES>, map: u64, v: bool, n_block: i32, (block, off): (i32, i32)| {
            let dst = if v { Tile::<D, BN, QM>::v_slot(base, s.index as usize) } else { Tile::<D, BN, QM>::k_slot(base, s.index as usize) };
            unsafe {
                if lane == 0 {
                    pipe.producer_acquire(*s);
                    pipe.producer_expect(*s, Tile::<D, BN, QM>::KV_BYTES);
                } else if spread && wl == 0 {
                    // Warps 1..3: the stage is free before their boxes go in (their bytes may land
                    // before lane 0 announces them; its pending arrival holds the phase open).
                    pipe.producer_acquire(*s);
                }
                let bar = pipe.full_barrier(*s);
                if PAGED {
                    // The stage is free and its bytes announced before any lane copies into it.
                    sync_warp();
                    if has_box {
                        for c in 0..groups {
                            tma::load_4d(dst + (c * BN * 128) as u32 + box_r as u32 * 128, map, [(c * 64) as i32, off, head.bidh_kv, block], bar);
                        }
                    }
                } else {
                    for c in 0..groups {
                        tma::load_4d(dst + (c * BN * 128) as u32, map, [(c * 64) as i32, k_row + n_block * BN as i32, head.bidh_kv, b], bar);
                    }
                }
            }
            s.advance();
        };
        // K runs a tile ahead of V; each K tile's boxes are looked up before the previous one's copies.
        let mut k_at = lookup(pick(0, n_max - 1));
        load(&pipes.k, &mut ks, k_map, false, pick(0, n_max - 1), k_at);
        let n_tiles = n_max - n_min;
        let mut v_at = k_at;
        if n_tiles > 1 {
            k_at = lookup(pick(1, n_max - 2));
        }
        let mut i = 0;
        while i < n_tiles {
            if i + 1 < n_tiles {
                load(&pipes.k, &mut ks, k_map, false, pick(i + 1, n_max - 2 - i), k_at);
                let next_v = k_at;
                if i + 2 < n_tiles {
                    k_at = lookup(pick(i + 2, n_max - 3 - i));
                }
                load(&pipes.v, &mut vs, v_map, true, pick(i, n_max - 1 - i), v_at);
                v_at = next_v;
            } else {
                load(&pipes.v, &mut vs, v_map, true, pick(i, n_max - 1 - i), v_at);
            }
            i += 1;
        }
    });
}

/// Zero rows `[valid, BN)` of V stage `slot` (keys past the sequence, which the copy engine read from
/// whatever follows it in the buffer), by all consumer warpgroups, before any multiplies by them.
#[inline(always)]
unsafe fn clear_v_tail<const D: usize, const BN: usize, const QM: usize>(base: u32, slot: u32, valid: i32, ctid: usize) {
    if valid >= BN as i32 {
        return;
    }
    let v_s = Tile::<D, BN, QM>::v_slot(base, slot as usize);
    let chunks = D / 8;
    let n = (BN - valid as usize) * chunks;
    let mut idx = ctid;
    while idx < n {
        let (r, c) = (valid as usize + idx / chunks, idx % chunks);
        unsafe { smem::st_v4(v_s + sw128_offset(BN as u32, r as u32, c as u32), [0; 4]) };
        idx += consumers(QM);
    }
    fence_proxy_async_shared();
    named_sync(if QM == BM { BAR_CONSUMERS } else { BAR_CONSUMERS_TALL }, consumers(QM) as u32);
}

/// Wait for this consumer warpgroup's turn at the tensor cores / hand the turn to the next one (of
/// `QM / 64`, in a ring).
#[inline(always)]
fn take_turn(wg: u32) {
    if PINGPONG {
        named_sync(BAR_TURN + wg, TURN_THREADS);
    }
}
#[inline(always)]
fn pass_turn<const QM: usize>(wg: u32) {
    if PINGPONG {
        let next = if QM == BM { 1 - wg } else if wg + 1 == (QM / 64) as u32 { 0 } else { wg + 1 };
        named_arrive(BAR_TURN + next, TURN_THREADS);
    }
}

/// The stages a consumer has reached.
struct ConsumerStages {
    q: Stage<1>,
    k: Stage<KV_STAGES>,
    v: Stage<KV_STAGES>,
}

/// One consumer warpgroup's rows of one row block (the wg kernel's `attend` on pipeline stages); `leader`
/// releases the stages for its warpgroup. `PAGED`: a `_paged` copy; `o_tma`: O by bulk tensor stores
/// (both `store_out_staged`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn attend<E: WgElem, const D: usize, const DN: usize, const BN: usize, const QM: usize, const NN: usize, const KP: usize, const LINEAR: bool, const LAZY: bool, const DIAG: bool, const FAST: bool, const LO: bool, const PAGED: bool>(a: &BlockArgs, pipes: &Pipes, st: &mut ConsumerStages, ctid: usize, leader: bool, o_tma: bool) {
    let base = smem::base();
    let warp = ctid / 32;
    let wg = (warp / 4) as u32;
    let lane = ctid % 32;
    let (g, t) = ((lane / 4) as i32, (lane % 4) as i32);
    let scale_log2 = a.softmax_scale();
    // The lazy max (`softmax::RESCALE_LOG2`, `LAZY`: see `lazy_max`).
    let lazy = LAZY;
    let (rows, n_min, n_max) = block_plan::<BN, QM>(a);
    let mut acc_o = [[0f32; 4]; DN];
    let mut row_state = [RowState::EMPTY; 2];

    if n_max > n_min {
        let n_tiles = n_max - n_min;
        let tail_valid = a.seqlen_k - (n_max - 1) * BN as i32;
        let first = if DIAG { first_tile::<BN>(a, rows, n_min, n_max) } else { 0 };
        // Tile number `i`, given as `n_max - 1 - i` (`tile_at`).
        let pick = #[inline(always)] |i: i32, from_last: i32| if DIAG { tile_at(i, first, n_max) } else { from_last };
        let release = |pipe: &Pipeline<KV_STAGES>, s: &mut Stage<KV_STAGES>| {
            if leader {
                unsafe { pipe.consumer_release(*s) };
            }
            s.advance();
        };
        let release_q = |s: Stage<1>| {
            if leader {
                unsafe { pipes.q.consumer_release(s) };
            }
        };
        let mut acc_s = [[0f32; 4]; NN];
        let mut pa = [[0u32; 4]; KP];
        unsafe {
            pipes.q.consumer_wait(st.q);
            pipes.k.consumer_wait(st.k);
        }
        take_turn(wg);
        unsafe { issue_s::<E, D, BN, QM, NN, LO>(&mut acc_s, base, wg, st.k.index as usize) };
        pass_turn::<QM>(wg);
        let early = kept_early::<D, BN, KP>(a, pick(0, n_max - 1), warp);
        wait_s::<0, NN>(&mut acc_s);
        release(&pipes.k, &mut st.k);
        if n_tiles == 1 {
            release_q(st.q);
        }
        let kept = if kept_under_s(D) { early } else { kept_of::<BN, KP>(a, pick(0, n_max - 1), warp) };
        softmax::<E, BN, NN, KP>(a, &mut acc_s, &mut row_state, &mut pa, &kept, &mut [1f32; 2], pick(0, n_max - 1), rows, warp, scale_log2, AlibiCode { linear: LINEAR, fast: FAST }, lazy);

        // As the wg kernel: S of tile i+1 and O += P_i V_i back to back, the softmax of tile i+1 under
        // the second product, O rescaled once it lands.
        let mut i = 0;
        while i + 1 < n_tiles {
            unsafe {
                pipes.k.consumer_wait(st.k);
                pipes.v.consumer_wait(st.v);
            }
            // The tail tile's V (the first tile's, unless `DIAG`).
            if DIAG {
                if tile_at(i, first, n_max) == n_max - 1 {
                    unsafe { clear_v_tail::<D, BN, QM>(base, st.v.index, tail_valid, ctid) };
                }
            } else if i == 0 {
                unsafe { clear_v_tail::<D, BN, QM>(base, st.v.index, tail_valid, ctid) };
            }
            take_turn(wg);
            unsafe {
                issue_s::<E, D, BN, QM, NN, LO>(&mut acc_s, base, wg, st.k.index as usize);
                issue_pv::<E, D, DN, BN, QM, KP, LO>(&mut acc_o, &pa, base, st.v.index as usize);
            }
            pass_turn::<QM>(wg);
            let early = kept_early::<D, BN, KP>(a, pick(i + 1, n_max - 2 - i), warp);
            wait_s::<1, NN>(&mut acc_s);
            release(&pipes.k, &mut st.k);
            if i + 2 == n_tiles {
                release_q(st.q);
            }
            // P stays in acc_s until the product reading the previous P has landed: one P's registers.
            let mut factor = [1f32; 2];
            softmax_in_place::<BN, NN>(a, &mut acc_s, &mut row_state, &mut factor, pick(i + 1, n_max - 2 - i), rows, warp, scale_log2, AlibiCode { linear: LINEAR, fast: FAST }, lazy);
            // Otherwise dropout's verdicts under the P V product.
            let kept = if kept_under_s(D) { early } else { kept_of::<BN, KP>(a, pick(i + 1, n_max - 2 - i), warp) };
            wait_acc::<0, DN>(&mut acc_o);
            keep_p::<KP>(&mut pa);
            release(&pipes.v, &mut st.v);
            // With `lazy`, O is rescaled only when a row of the warp moved its max, which after a row's
            // first tiles is rare.
            if !lazy || any_lane(factor[0] != 1.0 || factor[1] != 1.0) {
                rescale_o(&mut acc_o, &factor);
            }
            pack_p::<E, NN, KP>(a, &acc_s, &mut pa, &kept);
            i += 1;
        }
        unsafe { pipes.v.consumer_wait(st.v) };
        if DIAG {
            if tile_at(n_tiles - 1, first, n_max) == n_max - 1 {
                unsafe { clear_v_tail::<D, BN, QM>(base, st.v.index, tail_valid, ctid) };
            }
        } else if n_tiles == 1 {
            unsafe { clear_v_tail::<D, BN, QM>(base, st.v.index, tail_valid, ctid) };
        }
        unsafe { issue_pv::<E, D, DN, BN, QM, KP, LO>(&mut acc_o, &pa, base, st.v.index as usize) };
        wait_acc::<0, DN>(&mut acc_o);
        keep_p::<KP>(&mut pa);
        release(&pipes.v, &mut st.v);
        st.q.advance();
    }
    if fwd_ws_o_staged(D, BN) {
        unsafe { store_out_staged::<E, D, DN, BN, QM, PAGED>(a, &acc_o, &row_state, ctid, leader, rows, scale_log2, o_tma) };
    } else {
        store_out::<E, 1, DN>(a, core::array::from_ref(&acc_o), core::array::from_ref(&row_state), D, (warp * 16) as i32 + g, rows, t, scale_log2);
    }
}

/// Where chunk `k` (8 columns, 16 bytes) of a row whose index is `r8` modulo 8 lies in its 128-byte row of
/// the O stage: `k ^ r8`, the 128-byte swizzle of out's tensor map (the 8 rows of a warp's store of one
/// chunk column then take 8 different chunk slots).
#[inline(always)]
fn o_chunk(k: usize, r8: usize) -> usize {
    k ^ r8
}

/// Where consumer warpgroup `wg`'s leader keeps out's tensor map's address (two words) and its tile's
/// coordinates there (first row, head, batch) for the O stage's bulk stores: between the barriers and
/// the O stage (`FWD_WS_O_STAGE_AT`), in the kernels that have it.
#[inline(always)]
fn o_bulk_at<const D: usize, const BN: usize, const QM: usize>(wg: usize) -> u32 {
    const { assert!(FWD_WS_BARRIER_BYTES + (QM / 64) * 32 <= FWD_WS_O_STAGE_AT) };
    smem::base() + Tile::<D, BN, QM>::BYTES + FWD_WS_BARRIER_BYTES as u32 + 32 * wg as u32
}

/// Bytes of one 64-column group of a consumer warpgroup's O stage: 64 rows of 128 bytes, the box of out's
/// tensor map.
const O_GROUP_BYTES: u32 = 64 * 128;

/// The epilogue through the O stage (`fwd_ws_o_staged`: from `FWD_WS_O_STAGE_AT` past the tiles, 64 rows
/// of `fwd_ws_o_stage_cols` elements per consumer warpgroup, laid out as out's tensor map's boxes: 64-column
/// groups of 64 rows x 128 bytes in the 128-byte swizzle), in `D / cols` rounds of that many columns (two at
/// head dim 256, else one). Each round: the warpgroup syncs (its leader first waits until its last bulk
/// store has read the stage), each thread writes its fragments of O / rowsum for the round's columns (4
/// bytes per row and 8-column chunk, at the chunk `o_chunk` gives, so that a warp's stores of one chunk
/// column meet no bank twice), the warpgroup syncs again, then: where out has a map (`o_tma`: dense, no
/// seqused_q; its address and the tile's first row there from `o_bulk_at`), its leader hands the stage to
/// the copy engine (one bulk tensor store per group, rows past the sequence cut at the map's end; nothing
/// for the threads to copy); else each thread copies 16-byte chunks to global memory (a warp's 32 chunks
/// run along its rows: 512 contiguous bytes where the rows are), rows past `rows` not written. The LSE by
/// the quad's first thread, as `store_out`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn store_out_staged<E: WgElem, const D: usize, const DN: usize, const BN: usize, const QM: usize, const PAGED: bool>(a: &BlockArgs, acc_o: &[[f32; 4]; DN], row_state: &[RowState; 2], ctid: usize, leader: bool, rows: i32, scale_log2: f32, o_tma: bool) {
    // Chunks (8 columns) of a round, and rounds.
    const { assert!(!fwd_ws_o_staged(D, BN) || (fwd_ws_o_stage_cols(D) % 64 == 0 && D % fwd_ws_o_stage_cols(D) == 0)) };
    let chunks = fwd_ws_o_stage_cols(D) / 8;
    let rounds = D / fwd_ws_o_stage_cols(D);
    let wg = ctid / 128;
    let (warp, lane) = ((ctid % 128) / 32, ctid % 32);
    let (g, t) = (lane / 4, lane % 4);
    const { assert!(Tile::<D, BN, QM>::BYTES % 1024 == 0) };
    let stage = smem::base() + Tile::<D, BN, QM>::BYTES + FWD_WS_O_STAGE_AT as u32 + wg as u32 * (chunks / 8) as u32 * O_GROUP_BYTES;
    // Outside the `_paged` copies (`ox`): this thread's offset in the stage for chunk j of its row of half h
    // as `(y_h ^ 16 (j % 8)) + (j / 8) O_GROUP_BYTES`, with y_h = 128 r + 4 t + 16 g (disjoint bits, so the
    // XOR makes chunk `o_chunk(j % 8, g)`), from one offset laundered per call. Without it ptxas hoisted the
    // offsets (the same every tile) out of the tile loop into 13 registers held for the whole kernel and
    // spilled the tile scheduler's state around them. H100 (benches/RESULTS.md): plain 0.98-1.00x the time,
    // dropout 0.93-0.94x; the `_paged` copy, where ptxas then spilled more (27 / 30 -> 47 / 58 STL / LDL),
    // 1.04-1.05x.
    let ox = !PAGED;
    let y0 = if ox { opaque_u32(((warp * 16 + g) as u32) * 128 + (4 * t) as u32 + ((g as u32) << 4)) } else { 0 };
    // Every row of the stage, even past `rows`: those are past out's map's rows (`FwdParams::o_tma`).
    // (A per-warpgroup choice between the two paths, bulk where its 64 rows were all real, also varlen,
    // spilled 300 bytes in the hdim 128 plain kernel against 148 with this one.) Not in the `_paged`
    // copies: varlen, never `o_tma`.
    let bulk = !PAGED && o_tma;
    for round in 0..rounds {
        if leader {
            unsafe { tma::bulk_wait_read::<0>() };
        }
        // Also, from the second round on, keeps the stage until every thread has copied the last round out.
        named_sync(BAR_WG + wg as u32, 128);
        for h in 0..2 {
            let (inv_sum, lse) = finalize_row(&row_state[h], scale_log2);
            let inv_sum = inv_sum * a.mods.scale;
            // This warpgroup's row (0..64); its low 3 bits are g.
            let r = (warp * 16 + 8 * h + g) as u32;
            for jj in 0..chunks {
                let j = round * chunks + jj;
                let w = E::pack(acc_o[j][2 * h] * inv_sum, acc_o[j][2 * h + 1] * inv_sum);
                let group = (jj / 8) as u32 * O_GROUP_BYTES;
                let at = if ox { ((y0 + (8 * h) as u32 * 128) ^ (((jj % 8) as u32) << 4)) + group } else { group + r * 128 + (o_chunk(jj % 8, g) * 16) as u32 + (4 * t) as u32 };
                unsafe { smem::st_u32(stage + at, w) };
            }
            let r_block = (wg * 64) as i32 + r as i32;
            if round == 0 && t == 0 && r_block < rows {
                unsafe { st_global_f32(a.lse + (r_block * 4) as u64, lse) };
            }
        }
        if bulk {
            fence_proxy_async_shared();
        }
        named_sync(BAR_WG + wg as u32, 128);
        if bulk {
            if leader {
                unsafe {
                    let at = o_bulk_at::<D, BN, QM>(wg);
                    let o_map = smem::ld_u32(at) as u64 | (smem::ld_u32(at + 4) as u64) << 32;
                    let (row, head, b) = (smem::ld_u32(at + 8) as i32, smem::ld_u32(at + 12) as i32, smem::ld_u32(at + 16) as i32);
                    for c in 0..chunks / 8 {
                        tma::store_4d(stage + c as u32 * O_GROUP_BYTES, o_map, [(round * chunks * 8 + c * 64) as i32, row + (wg * 64) as i32, head, b]);
                    }
                    tma::bulk_commit();
                }
            }
            continue;
        }
        // The next round's or call's first sync keeps the stage until every thread has read it.
        let mut c = if ox { opaque_u32((ctid % 128) as u32) as usize } else { ctid % 128 };
        while c < 64 * chunks {
            let (r, k) = (c / chunks, c % chunks);
            let r_block = (wg * 64 + r) as i32;
            if r_block < rows {
                let v = unsafe { smem::ld_v4(stage + (k / 8) as u32 * O_GROUP_BYTES + (r as u32) * 128 + (o_chunk(k % 8, r % 8) * 16) as u32) };
                unsafe { st_global_v4(a.o + (r_block as i64 * a.o_row_stride * 2) as u64 + ((round * chunks + k) * 16) as u64, v) };
            }
            c += 128;
        }
    }
}

/// Whether a kernel at head dim `d` keeps the lazy max (`softmax::RESCALE_LOG2`): the plain kernels
/// above head dim 64 (H200, S=8192: hdim 256 1.05-1.07x, 192 1.03x, 128 1.01-1.02x; at 64, where O is 32
/// registers, the vote cost more than it saved, 0.98x), and the `_alibi` copies (`alibi`) at 96, 128 and
/// 192, which also visit the key tiles from the diagonal outwards (`first_tile`). H200, ALiBi's forward
/// against the eager max from the right end (benches/RESULTS.md): 0.93-0.96x at hdim 96, 0.96-0.98 at
/// 128, 0.97-0.98 non-causal and 0.99-1.00 causal at 192. Not at 256: there the diagonal order raised the
/// spills (180 -> 336 bytes) and ran 1.03-1.05x slower, and the lazy max alone 0.985 causal but 1.01-1.02
/// non-causal; with both, again after the decoded tiles (no spill), 1.04-1.05x at 256 and 1.02-1.04x at 64
/// (H100, branch `flips`). Not the `_mods` copies; the `_dropout` ones: `dropout_lazy`.
const fn lazy_max(d: usize, alibi: bool) -> bool {
    if alibi { d > 64 && d < 256 } else { d > 64 }
}

/// Whether the `_dropout` copy (64-key tiles) at head dim `d` keeps the lazy max: at 128 only. H100, one
/// call against the eager max (benches/RESULTS.md, ALiBi and dropout): hdim 128 0.96x the time at S=8192
/// non-causal, 1.01 at S=2048 causal; 1.02-1.08x at 96 (a `_dropout` copy there, against `_mods`), 1.02 at 256,
/// and 1.04 in the wide copy at 192 (not lazy: `fwd_ws_wide_kernels`).
const fn dropout_lazy(d: usize) -> bool {
    d == 128
}

/// Whether dropout's verdicts for a tile (`kept_of`) are drawn between its S = Q K^T issue and wait at
/// head dim `d`, rather than after its softmax, under the P V product. Measured on the H200
/// (benches/RESULTS.md): after the softmax ran 0.92-0.98 of the time at hdim 64 and 0.96-1.02 at 128
/// (drawing under S kept 16 more registers live across the softmax, and ptxas spilled more), but
/// 1.04-1.09 at 256, where drawing under S spilled less.
const fn kept_under_s(d: usize) -> bool {
    d > 128
}

/// `kept_of` where `kept_under_s(D)`, else `KeptP::ALL` (not used).
#[inline(always)]
fn kept_early<const D: usize, const BN: usize, const KP: usize>(a: &BlockArgs, n_block: i32, warp: usize) -> KeptP {
    if kept_under_s(D) { kept_of::<BN, KP>(a, n_block, warp) } else { KeptP::ALL }
}

/// `wait_acc` for S, which also takes the wide kernel's 112-key tile at head dim 192. Kept out of
/// `wait_acc`: with the n112 arms there, LLVM laid out every ws forward kernel differently and the hdim
/// 256 one spilled 340 bytes instead of 184 and ran 7-8% slower (benches/RESULTS.md).
#[inline(always)]
fn wait_s<const PENDING: u32, const NN: usize>(acc_s: &mut [[f32; 4]; NN]) {
    if NN == 14 {
        unsafe { if PENDING == 0 { wgmma::wait0_n112(sized(acc_s)) } else { wgmma::wait1_n112(sized(acc_s)) } }
    } else {
        wait_acc::<PENDING, NN>(acc_s)
    }
}

/// Kernel body: barriers set up by thread 0, then the roles, the producer warpgroup with `PREGS` registers
/// per thread and the consumers with `CREGS` (`PRODUCER_REGS` / `CONSUMER_REGS`, or `ws_regs`).
#[inline(always)]
unsafe fn ws_entry<E: WgElem, const D: usize, const DN: usize, const BN: usize, const QM: usize, const NN: usize, const KP: usize, const PAGED: bool, const MODS: bool, const LINEAR: bool, const LAZY: bool, const DIAG: bool, const FAST: bool, const PREGS: u32, const CREGS: u32>(p: &FwdParams, maps: u64) {
    let () = Tile::<D, BN, QM>::CHECK;
    // Consumer warpgroups (each one's leader releases the stages) and threads.
    let (wgs, consumer_threads) = ((QM / 64) as u32, consumers(QM));
    let tid = thread_idx_x() as usize;
    let pipes = Pipes::at::<D, BN, QM>(smem::base());
    let spread = spreads::<BN, PAGED>(p);
    if tid == 0 {
        unsafe {
            pipes.q.init(wgs);
            pipes.k.init(wgs);
            pipes.v.init(wgs);
            // Every consumer thread takes each tile number (and warps 1..3 of a spread producer).
            pipes.tiles.init(consumer_threads as u32 + if spread { 32 * (SPREAD_WARPS - 1) } else { 0 });
        }
        mbarrier::fence_init();
    }
    sync_threads();
    if tid < 128 {
        tma::regs_dec::<PREGS>();
        if tid == 0 || (PAGED && (tid < 32 || (spread && tid < 32 * SPREAD_WARPS as usize))) {
            // Contiguous: thread 0 alone (its lane folds to a constant).
            unsafe { produce::<D, BN, QM, PAGED, MODS, DIAG>(p, maps, &pipes, if PAGED { tid as u32 } else { 0 }) };
        }
    } else {
        tma::regs_inc::<CREGS>();
        let ctid = tid - 128;
        let leader = ctid % 128 == 0;
        // Warpgroup 0 takes the first turn.
        if if QM == BM { ctid >= 128 } else { ctid / 128 == QM / 64 - 1 } {
            pass_turn::<QM>((QM / 64 - 1) as u32);
        }
        let mut st = ConsumerStages { q: Stage::START, k: Stage::START, v: Stage::START };
        let staged = fwd_ws_o_staged(D, BN);
        // Out's tensor map (`FwdParams::o_tma`, after q's, k's and v's) and each tile's coordinates in it
        // wait for the epilogue in shared memory (`o_bulk_at`), written and read by the warpgroup's leader,
        // so that no register holds them over the tile loop.
        let o_bulk = o_bulk_at::<D, BN, QM>(ctid / 128);
        if staged && leader {
            let o_map = maps + 384;
            unsafe {
                smem::st_u32(o_bulk, o_map as u32);
                smem::st_u32(o_bulk + 4, (o_map >> 32) as u32);
            }
        }
        Tiles::<QM>::new::<D, MODS>(p, &pipes).for_each::<PAGED, MODS, false>(p, 0, #[inline(always)] |head, m0| {
            if m0 < head.sq.used {
                if staged && !PAGED && leader && p.o_tma != 0 {
                    // The block's first row in out's map.
                    let (q_row, _, b) = row_coords(p, head);
                    unsafe {
                        smem::st_u32(o_bulk + 8, (q_row + m0) as u32);
                        smem::st_u32(o_bulk + 12, head.bidh as u32);
                        smem::st_u32(o_bulk + 16, b as u32);
                    }
                }
                // The products' descriptors from their low words (`issue_s`'s `INC`), but for the score-modifier
                // and paged copies at head dims 96 / 128: there ptxas spilled more with them (hdim 128 `_alibi`
                // 232/220 -> 376/412 bytes, `_paged` 204/216 -> 332/396), and on the H200 (2026-12-05) the ALiBi
                // forward at 128 ran about 1.07x, dropout's at 96 / 128 1.01-1.10x the time.
                if (MODS || PAGED) && (D == 96 || D == 128) {
                    unsafe { attend::<E, D, DN, BN, QM, NN, KP, LINEAR, LAZY, DIAG, FAST, false, PAGED>(&head.args_at(p, m0), &pipes, &mut st, ctid, leader, p.o_tma != 0) };
                } else {
                    unsafe { attend::<E, D, DN, BN, QM, NN, KP, LINEAR, LAZY, DIAG, FAST, true, PAGED>(&head.args_at(p, m0), &pipes, &mut st, ctid, leader, p.o_tma != 0) };
                }
            }
            unsafe { head.pad_block::<D>(p, m0, QM as i32, ctid, consumer_threads) };
        });
        if staged && leader {
            // The last bulk store has read its stage before the block's shared memory goes.
            unsafe { tma::bulk_wait_read::<0>() };
        }
    }
}

/// The `_mods` kernel for dropout without ALiBi: the parameters' slopes are set off at entry, so the
/// compiler drops the ALiBi code from this copy. None at head dim 96 (`fwd_ws_dropout_kernel_name` sends
/// dropout to `_mods`): the copy first spilled in its tile loop (7 spill loads); since the decoded tiles it
/// does not, but ran 1.02-1.08x `_mods`' time (H100, benches/RESULTS.md, branch `flips`).
macro_rules! fwd_ws_dropout_kernel {
    (96, $dt:ident, $name:expr, $bn:ident) => {};
    ($d:tt, $dt:ident, $name:expr, $bn:ident) => {
        #[unsafe(export_name = concat!($name, "_dropout"))]
        pub unsafe extern "ptx-kernel" fn kernel_dropout(p: FwdParams, _maps: TmaMaps) {
            let maps = crate::param_address!(concat!($name, "_dropout_param_1"));
            let p = FwdParams { mods: p.mods.without_alibi(), ..p };
            unsafe { ws_entry::<$dt, $d, { ($d + 63) / 64 * 8 }, $bn, 128, { $bn / 8 }, { $bn / 16 }, false, true, { $d <= 64 }, { dropout_lazy($d) }, false, false, { ws_regs($d, WsCopy::DROPOUT).0 }, { ws_regs($d, WsCopy::DROPOUT).1 }>(&p, maps) }
        }
    };
}

macro_rules! fwd_ws_kernels {
    // `$d` a token tree, so `fwd_ws_dropout_kernel!` can match the literal 96.
    ($(($d:tt, $dt:ident, $name:expr)),* $(,)?) => {$(
        const _: () = {
            const BN: usize = match fwd_wg_config($d) { Some(c) => c.block_n, None => 0 };
            #[unsafe(export_name = $name)]
            pub unsafe extern "ptx-kernel" fn kernel(p: FwdParams, _maps: TmaMaps) {
                let maps = crate::param_address!(concat!($name, "_param_1"));
                unsafe { ws_entry::<$dt, $d, { ($d + 63) / 64 * 8 }, BN, 128, { BN / 8 }, { BN / 16 }, false, false, { $d <= 64 }, { lazy_max($d, false) }, false, false, { ws_regs($d, WsCopy::PLAIN).0 }, { ws_regs($d, WsCopy::PLAIN).1 }>(&p, maps) }
            }
            #[unsafe(export_name = concat!($name, "_mods"))]
            pub unsafe extern "ptx-kernel" fn kernel_mods(p: FwdParams, _maps: TmaMaps) {
                let maps = crate::param_address!(concat!($name, "_mods_param_1"));
                unsafe { ws_entry::<$dt, $d, { ($d + 63) / 64 * 8 }, BN, 128, { BN / 8 }, { BN / 16 }, false, true, { $d <= 64 }, false, false, false, { ws_regs($d, WsCopy::MODS).0 }, { ws_regs($d, WsCopy::MODS).1 }>(&p, maps) }
            }
            /// The `_mods` kernel for ALiBi without dropout: the parameters' dropout is set off here, so
            /// the compiler drops the dropout code (and its registers) from this copy. Without them
            /// ALiBi's linear form beside the diagonal fits at head dims 64 and 96 (no spill in the tile
            /// loop; at 256 it spills). At 128 the two-instruction general form (`mods::alibi_qk_fast`)
            /// on every tile: spills 192 -> 152 bytes, 0.97-0.98x the linear form's time (H200,
            /// benches/RESULTS.md). Not the general fast form at 256:
            /// the slope's sign branch there raised the spills (180/176 -> 324/416 bytes, 3 spill loads in
            /// the tile loop; in two copies of the consumer, 428/680 and 1.03-1.08x the time).
            #[unsafe(export_name = concat!($name, "_alibi"))]
            pub unsafe extern "ptx-kernel" fn kernel_alibi(p: FwdParams, _maps: TmaMaps) {
                let maps = crate::param_address!(concat!($name, "_alibi_param_1"));
                let p = FwdParams { mods: p.mods.without_dropout(), ..p };
                unsafe { ws_entry::<$dt, $d, { ($d + 63) / 64 * 8 }, BN, 128, { BN / 8 }, { BN / 16 }, false, true, { $d <= 96 }, { lazy_max($d, true) }, { lazy_max($d, true) }, { $d == 128 }, { ws_regs($d, WsCopy::ALIBI).0 }, { ws_regs($d, WsCopy::ALIBI).1 }>(&p, maps) }
            }
            fwd_ws_dropout_kernel!($d, $dt, $name, BN);
            #[unsafe(export_name = concat!($name, "_paged"))]
            pub unsafe extern "ptx-kernel" fn kernel_paged(p: FwdParams, _maps: TmaMaps) {
                let maps = crate::param_address!(concat!($name, "_paged_param_1"));
                unsafe { ws_entry::<$dt, $d, { ($d + 63) / 64 * 8 }, BN, 128, { BN / 8 }, { BN / 16 }, true, false, { $d <= 64 }, { lazy_max($d, false) }, false, false, { ws_regs($d, WsCopy::PAGED).0 }, { ws_regs($d, WsCopy::PAGED).1 }>(&p, maps) }
            }
            #[unsafe(export_name = concat!($name, "_paged_mods"))]
            pub unsafe extern "ptx-kernel" fn kernel_paged_mods(p: FwdParams, _maps: TmaMaps) {
                let maps = crate::param_address!(concat!($name, "_paged_mods_param_1"));
                unsafe { ws_entry::<$dt, $d, { ($d + 63) / 64 * 8 }, BN, 128, { BN / 8 }, { BN / 16 }, true, true, { $d <= 64 }, false, false, false, { ws_regs($d, WsCopy::PAGED_MODS).0 }, { ws_regs($d, WsCopy::PAGED_MODS).1 }>(&p, maps) }
            }
        };
    )*};
}
crate::for_each_fwd_ws_variant!(fwd_ws_kernels);

/// The wide-tile kernels (`for_each_fwd_ws_wide_variant`): plain; `_alibi` (ALiBi without dropout, as
/// the 64-key `_alibi` copy at head dim 192: the lazy max, the diagonal-first order, and the general form
/// everywhere, in two instructions per score (`mods::alibi_qk_fast`); the linear form spilled in its tile
/// loop); `_dropout` (dropout without ALiBi, as `fwd_ws_dropout_kernel!`'s copy).
macro_rules! fwd_ws_wide_kernels {
    ($(($d:literal, $bn:literal, $dt:ident, $name:expr)),* $(,)?) => {$(
        const _: () = {
            #[unsafe(export_name = $name)]
            pub unsafe extern "ptx-kernel" fn kernel(p: FwdParams, _maps: TmaMaps) {
                let maps = crate::param_address!(concat!($name, "_param_1"));
                unsafe { ws_entry::<$dt, $d, { ($d + 63) / 64 * 8 }, $bn, 128, { $bn / 8 }, { $bn / 16 }, false, false, { $d <= 64 }, { lazy_max($d, false) }, false, false, { ws_regs($d, WsCopy::WIDE).0 }, { ws_regs($d, WsCopy::WIDE).1 }>(&p, maps) }
            }
            #[unsafe(export_name = concat!($name, "_alibi"))]
            pub unsafe extern "ptx-kernel" fn kernel_alibi(p: FwdParams, _maps: TmaMaps) {
                let maps = crate::param_address!(concat!($name, "_alibi_param_1"));
                let p = FwdParams { mods: p.mods.without_dropout(), ..p };
                unsafe { ws_entry::<$dt, $d, { ($d + 63) / 64 * 8 }, $bn, 128, { $bn / 8 }, { $bn / 16 }, false, true, false, { lazy_max($d, true) }, { lazy_max($d, true) }, true, { ws_regs($d, WsCopy::WIDE_ALIBI).0 }, { ws_regs($d, WsCopy::WIDE_ALIBI).1 }>(&p, maps) }
            }
            #[unsafe(export_name = concat!($name, "_dropout"))]
            pub unsafe extern "ptx-kernel" fn kernel_dropout(p: FwdParams, _maps: TmaMaps) {
                let maps = crate::param_address!(concat!($name, "_dropout_param_1"));
                let p = FwdParams { mods: p.mods.without_alibi(), ..p };
                unsafe { ws_entry::<$dt, $d, { ($d + 63) / 64 * 8 }, $bn, 128, { $bn / 8 }, { $bn / 16 }, false, true, { $d <= 64 }, false, false, false, { ws_regs($d, WsCopy::WIDE_DROPOUT).0 }, { ws_regs($d, WsCopy::WIDE_DROPOUT).1 }>(&p, maps) }
            }
        };
    )*};
}
crate::for_each_fwd_ws_wide_variant!(fwd_ws_wide_kernels);

/// The tall kernels (`for_each_fwd_ws_tall_variant`): the plain, `_alibi` and `_dropout` copies over
/// tiles of `FWD_WS_TALL_ROWS` (192) query rows, three consumer warpgroups taking turns in a ring, 512
/// threads (`fwd_ws_threads`).
macro_rules! fwd_ws_tall_kernels {
    ($(($d:literal, $dt:ident, $name:expr)),* $(,)?) => {$(
        const _: () = {
            const BN: usize = match fwd_wg_config($d) { Some(c) => c.block_n, None => 0 };
            #[unsafe(export_name = $name)]
            pub unsafe extern "ptx-kernel" fn kernel(p: FwdParams, _maps: TmaMaps) {
                let maps = crate::param_address!(concat!($name, "_param_1"));
                unsafe { ws_entry::<$dt, $d, { ($d + 63) / 64 * 8 }, BN, FWD_WS_TALL_ROWS, { BN / 8 }, { BN / 16 }, false, false, { $d <= 64 }, { lazy_max($d, false) }, false, false, TALL_PRODUCER_REGS, TALL_CONSUMER_REGS>(&p, maps) }
            }
            /// ALiBi without dropout, as the 128-row `_alibi` copy.
            #[unsafe(export_name = concat!($name, "_alibi"))]
            pub unsafe extern "ptx-kernel" fn kernel_alibi(p: FwdParams, _maps: TmaMaps) {
                let maps = crate::param_address!(concat!($name, "_alibi_param_1"));
                let p = FwdParams { mods: p.mods.without_dropout(), ..p };
                unsafe { ws_entry::<$dt, $d, { ($d + 63) / 64 * 8 }, BN, FWD_WS_TALL_ROWS, { BN / 8 }, { BN / 16 }, false, true, { $d <= 96 }, { lazy_max($d, true) }, { lazy_max($d, true) }, { $d == 128 }, TALL_PRODUCER_REGS, TALL_CONSUMER_REGS>(&p, maps) }
            }
            /// Dropout without ALiBi, as the 128-row `_dropout` copy.
            #[unsafe(export_name = concat!($name, "_dropout"))]
            pub unsafe extern "ptx-kernel" fn kernel_dropout(p: FwdParams, _maps: TmaMaps) {
                let maps = crate::param_address!(concat!($name, "_dropout_param_1"));
                let p = FwdParams { mods: p.mods.without_alibi(), ..p };
                unsafe { ws_entry::<$dt, $d, { ($d + 63) / 64 * 8 }, BN, FWD_WS_TALL_ROWS, { BN / 8 }, { BN / 16 }, false, true, { $d <= 64 }, { dropout_lazy($d) }, false, false, TALL_PRODUCER_REGS, TALL_CONSUMER_REGS>(&p, maps) }
            }
        };
    )*};
}
crate::for_each_fwd_ws_tall_variant!(fwd_ws_tall_kernels);
