//! Where the forward kernels' K/V rows come from, behind one interface (the cp.async loads of the mma.sync
//! and wg kernels, the bulk tensor copies of the ws kernel): contiguous rows from the sequence's first
//! key, or pages through a block table (key t is row `t % page_size` of block
//! `block_table[t / page_size]`). Only addresses differ, so a paged call's arithmetic is the contiguous one.
//! Every index read from device memory is clamped: a bogus block table never reads outside k / v.

use crate::arch::cp_async::cp_async_16;
use crate::arch::math::div_rem_u32;
use crate::arch::mem::ld_global_nc_i32;
use crate::arch::reg::opaque_u32;
use crate::arch::shfl::shfl_idx_u32;
use crate::params::FwdParams;
use crate::variants::row_pitch_bytes;

/// One operand's rows: key 0 of the sequence (contiguous), or row 0 of block 0 (paged), of this kv head.
#[derive(Clone, Copy)]
pub(crate) struct Rows {
    pub(crate) base: u64,
    pub(crate) row_bytes: i64,
    /// Paged: bytes between blocks.
    pub(crate) block_bytes: i64,
}

impl Rows {
    /// Address of row `off` of block `block`.
    #[inline(always)]
    pub(crate) fn at(&self, block: i32, off: i32) -> u64 {
        self.base.wrapping_add((block as i64 * self.block_bytes + off as i64 * self.row_bytes) as u64)
    }
}

/// The block table row of one sequence, in a paged kernel (`paged`, a compile-time constant after
/// inlining, so each kernel keeps only its own paths).
#[derive(Clone, Copy)]
pub(crate) struct Pages {
    pub(crate) paged: bool,
    /// The sequence's block-table row; 0 = the identity table (a contiguous KV cache as one page per
    /// row: entry `page` of row b is block `ident + page`).
    pub(crate) table: u64,
    pub(crate) ident: i32,
    /// Position of the sequence's key 0 in its row (a KV cache's left padding; else 0).
    pub(crate) first: i32,
    /// The table may be the identity and `first` nonzero (a KV cache; false in kernels that never run
    /// one, where the paths for them fold away).
    pub(crate) kv_cache: bool,
    pub(crate) page_size: i32,
    pub(crate) max_blocks: i32,
    pub(crate) num_blocks: i32,
}

impl Pages {
    /// Sequence `bidb`'s pages in a `PAGED` kernel (the host launches those with a block table); none
    /// in the others, whose paged paths then fold away.
    #[inline(always)]
    pub(crate) fn new<const PAGED: bool>(p: &FwdParams, bidb: i32) -> Pages {
        let table = if PAGED && p.block_table != 0 { p.block_table.wrapping_add((bidb as i64 * p.block_table_stride * 4) as u64) } else { 0 };
        let ident = (bidb as i64 * p.max_blocks as i64) as i32;
        Pages { paged: PAGED, table, ident, first: 0, kv_cache: PAGED, page_size: p.page_size, max_blocks: p.max_blocks, num_blocks: p.num_blocks }
    }

    #[inline(always)]
    pub(crate) fn paged(&self) -> bool {
        self.paged
    }

    /// Keys a block-table row addresses (the clamp of every paged key count).
    #[inline(always)]
    pub(crate) fn capacity(p: &FwdParams) -> i32 {
        p.max_blocks.saturating_mul(p.page_size)
    }

    /// (block, row in it) of key `t >= 0` of a paged sequence (at position `first + t` of its row). The
    /// table index is clamped into the row and the entry into `[0, num_blocks)` (keys a sequence attends
    /// to are below `max_blocks * page_size`, so only copies past its end, which are masked or zeroed,
    /// ever clamp).
    #[inline(always)]
    pub(crate) unsafe fn locate(&self, t: i32) -> (i32, i32) {
        // Unchecked division: the page size is at least 1 (validation); see div_rem_u32.
        let (page, off) = div_rem_u32((self.first() + t) as u32, self.page_size as u32);
        (unsafe { self.block(page as i32) }, off as i32)
    }

    /// `first`, or 0 where no KV cache runs.
    #[inline(always)]
    pub(crate) fn first(&self) -> i32 {
        if self.kv_cache { self.first } else { 0 }
    }

    /// The block of entry `page` of the row: the index clamped into the row, the entry into `[0,
    /// num_blocks)`.
    #[inline(always)]
    pub(crate) unsafe fn block(&self, page: i32) -> i32 {
        let page = clamp(page, 0, self.max_blocks - 1);
        let block = if self.kv_cache && self.table == 0 { self.ident + page } else { unsafe { ld_global_nc_i32(self.table.wrapping_add(page as u64 * 4)) } };
        clamp(block, 0, self.num_blocks - 1)
    }
}

/// Clamp into `[lo, hi]` (lo where hi < lo).
#[inline(always)]
fn clamp(x: i32, lo: i32, hi: i32) -> i32 {
    let x = if x > hi { hi } else { x };
    if x < lo { lo } else { x }
}

/// `KvRows::load_pages`'s `PART`: which of K and V a call copies.
pub(crate) const K_AND_V: u8 = 0;
pub(crate) const K_ONLY: u8 = 1;
pub(crate) const V_ONLY: u8 = 2;

/// A tile's block-table entries, read ahead (`KvRows::tile_pages`): the first key's row in its first
/// page, the pages it spans, and this lane's raw entry (of the lane-th page).
#[derive(Clone, Copy)]
pub(crate) struct TilePages {
    pub(crate) off0: u32,
    pub(crate) span: u32,
    pub(crate) raw: i32,
}

impl TilePages {
    /// No entries (kernels over contiguous K/V).
    pub(crate) const NONE: TilePages = TilePages { off0: 0, span: 0, raw: 0 };
}

/// A sequence's K and V rows of one kv head.
#[derive(Clone, Copy)]
pub(crate) struct KvRows {
    pub(crate) k: Rows,
    pub(crate) v: Rows,
    pub(crate) pages: Pages,
}

impl KvRows {
    /// K (`V == false`) or V.
    #[inline(always)]
    pub(crate) fn rows<const V: bool>(&self) -> &Rows {
        if V { &self.v } else { &self.k }
    }

    /// Contiguous K/V: the address of the first row of tile `n_block` of `bn` keys (rows follow at the
    /// row stride).
    #[inline(always)]
    pub(crate) fn tile<const V: bool>(&self, n_block: i32, bn: usize) -> u64 {
        let rows = self.rows::<V>();
        rows.base.wrapping_add((n_block as i64 * bn as i64 * rows.row_bytes) as u64)
    }

    /// The block-table entries of the tile of `bn` keys from `n0`, read ahead of their use: lane l holds
    /// the raw entry of page `p0 + l` (clamped where used). A tile over more than 32 pages gets none
    /// (`span` > 32: its rows go one by one). The load is issued here and waited for only where the tile
    /// is copied, so reading the entries of the tile after next hides their latency.
    #[inline(always)]
    pub(crate) unsafe fn tile_pages(&self, n0: i32, bn: usize, tid: usize) -> TilePages {
        let page_size = self.pages.page_size as u32;
        // Unchecked divisions: the page size is at least 1.
        let (p0, off0) = div_rem_u32((self.pages.first() + n0) as u32, page_size);
        let span = div_rem_u32(off0 + bn as u32 - 1, page_size).0 + 1;
        let lane = (tid % 32) as u32;
        let pages = &self.pages;
        let page = p0 as i32 + lane as i32;
        let raw = if lane >= span || lane >= 32 {
            0
        } else if pages.kv_cache && pages.table == 0 {
            pages.ident + clamp(page, 0, pages.max_blocks - 1)
        } else {
            unsafe { ld_global_nc_i32(pages.table.wrapping_add(clamp(page, 0, pages.max_blocks - 1) as u64 * 4)) }
        };
        TilePages { off0, span, raw }
    }

    /// The block of a tile's first page (`tile_pages`'s entry in lane 0), clamped into `[0, num_blocks)`.
    #[inline(always)]
    pub(crate) fn page0_block(&self, tp: TilePages) -> i32 {
        let block = shfl_idx_u32(tp.raw as u32, 0) as i32;
        if block < 0 { 0 } else if block >= self.pages.num_blocks { self.pages.num_blocks - 1 } else { block }
    }

    /// Paged K/V: copy `bn` keys from `n0` (the first `valid` of them real; the rest zero-filled) into
    /// K and V tiles (`D` columns, padded rows) with `threads` threads, their pages' entries `tp` (from
    /// `tile_pages`, for the same tile): each page's block from the lane holding it (a shuffle), its
    /// rows walked without divisions. Called by whole warps, outside divergent code, for tiles of at
    /// most 32 pages. `PART`: `K_AND_V`, `K_ONLY` or `V_ONLY`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn load_pages<const D: usize, const PART: u8>(&self, k_dst: u32, v_dst: u32, tp: TilePages, valid: i32, tid: usize, bn: usize, threads: usize) {
        let page_size = self.pages.page_size as u32;
        let chunks = D / 8;
        let row_bytes = row_pitch_bytes(D) as u32;
        let block_of = |slot: u32| clamp(shfl_idx_u32(tp.raw as u32, if slot < 32 { slot } else { 0 }) as i32, 0, self.pages.num_blocks - 1);
        let tid = opaque_u32(tid as u32) as usize;
        if threads % chunks == 0 {
            // Each pass covers `threads / chunks` whole rows, a thread keeping its column. The warp walks
            // the tile's pages together (one shuffle each); in a page a thread's rows follow at `pass`
            // rows, its addresses advanced by a fixed step, no lookup per row.
            let pass = (threads / chunks) as u32;
            let (r0, c) = ((tid / chunks) as u32, (tid % chunks) as u64);
            let (k_step, v_step) = ((pass as i64 * self.k.row_bytes) as u64, (pass as i64 * self.v.row_bytes) as u64);
            // Tile rows [lo, hi) lie in page slot `slot`, from its row `first_off`.
            let mut lo = 0u32;
            let mut first_off = tp.off0;
            let mut slot = 0u32;
            while slot < tp.span {
                let block = block_of(slot);
                let in_page = page_size - first_off;
                let hi = if in_page < bn as u32 - lo { lo + in_page } else { bn as u32 };
                // This thread's first row at or after lo.
                let mut r = lo + (r0 + pass - lo % pass) % pass;
                let off = first_off + (r - lo);
                let mut k = self.k.at(block, off as i32).wrapping_add(c * 16);
                let mut v = self.v.at(block, off as i32).wrapping_add(c * 16);
                let mut at = r * row_bytes + c as u32 * 16;
                while r < hi {
                    let ok = (r as i32) < valid;
                    unsafe {
                        if PART != V_ONLY {
                            cp_async_16(k_dst + at, if ok { k } else { self.k.base }, ok);
                        }
                        if PART != K_ONLY {
                            cp_async_16(v_dst + at, if ok { v } else { self.v.base }, ok);
                        }
                    }
                    k = k.wrapping_add(k_step);
                    v = v.wrapping_add(v_step);
                    at += pass * row_bytes;
                    r += pass;
                }
                lo = hi;
                first_off = 0;
                slot += 1;
            }
            return;
        }
        let n = opaque_u32((bn * chunks / threads) as u32) as usize;
        let mut i = 0;
        while i < n {
            let idx = tid + i * threads;
            let (r, c) = (idx / chunks, idx % chunks);
            let (slot, off) = div_rem_u32(tp.off0 + r as u32, page_size);
            let block = block_of(slot);
            let ok = (r as i32) < valid;
            let (k, v) = (self.k.at(block, off as i32), self.v.at(block, off as i32));
            let at = r as u32 * row_bytes + c as u32 * 16;
            unsafe {
                if PART != V_ONLY {
                    cp_async_16(k_dst + at, if ok { k.wrapping_add(c as u64 * 16) } else { self.k.base }, ok);
                }
                if PART != K_ONLY {
                    cp_async_16(v_dst + at, if ok { v.wrapping_add(c as u64 * 16) } else { self.v.base }, ok);
                }
            }
            i += 1;
        }
    }

    /// Paged K (`V` false) or V alone, as `load_pages`, with the tile's pages dealt out to the warps
    /// (warp w copies pages w, w + warps, ...): each warp walks only its own pages, so a tile over many
    /// small pages costs each thread a few page steps rather than all of them (the decode kernels' 128-key
    /// tiles over pages of 16: eight steps of two copies each). A page's rows go `32 / (D / 8)` at a time,
    /// a lane keeping its column. Needs `D / 8` to divide 32 (else `load_pages`); called by whole warps,
    /// for tiles of at most 32 pages.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn load_pages_by_warp<const D: usize, const V: bool>(&self, dst: u32, tp: TilePages, valid: i32, tid: usize, bn: usize, threads: usize) {
        let chunks = (D / 8) as u32;
        let page_size = self.pages.page_size as u32;
        let rows = self.rows::<V>();
        let row_bytes = row_pitch_bytes(D) as u32;
        let tid = opaque_u32(tid as u32);
        let (warp, lane) = (tid / 32, tid % 32);
        let warps = (threads / 32) as u32;
        // The lane's first row of a page's rows and its column; its rows follow `pass` apart.
        let pass = 32 / chunks;
        let (r0, c) = (lane / chunks, (lane % chunks) as u64);
        let step = (pass as i64 * rows.row_bytes) as u64;
        let mut slot = warp;
        while slot < tp.span {
            let block = clamp(shfl_idx_u32(tp.raw as u32, slot) as i32, 0, self.pages.num_blocks - 1);
            // Tile rows [lo, hi) lie in this page, from its row `first_off`.
            let (lo, first_off) = if slot == 0 { (0, tp.off0) } else { (slot * page_size - tp.off0, 0) };
            let hi = if page_size - first_off < bn as u32 - lo { lo + page_size - first_off } else { bn as u32 };
            let mut r = lo + r0;
            let mut src = rows.at(block, (first_off + r0) as i32).wrapping_add(c * 16);
            let mut at = r * row_bytes + c as u32 * 16;
            while r < hi {
                let ok = (r as i32) < valid;
                unsafe { cp_async_16(dst + at, if ok { src } else { rows.base }, ok) };
                src = src.wrapping_add(step);
                at += pass * row_bytes;
                r += pass;
            }
            slot += warps;
        }
    }

    /// Paged K/V: (block, row in it) of key `n0` when keys `n0..n0 + n` share its page (so they follow
    /// at the row stride), else None (rows one by one: `Pages::locate`).
    #[inline(always)]
    pub(crate) unsafe fn page_run(&self, n0: i32, n: i32) -> Option<(i32, i32)> {
        // Which page first (arithmetic), so that a tile over several pages reads no table entry here.
        let (page, off) = div_rem_u32((self.pages.first() + n0) as u32, self.pages.page_size as u32);
        if off as i32 + n <= self.pages.page_size { Some((unsafe { self.pages.block(page as i32) }, off as i32)) } else { None }
    }
}
