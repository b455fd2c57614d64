//! Where the forward kernels' K/V rows come from, behind one interface (the cp.async loads of the mma.sync
//! and wg kernels, the bulk tensor copies of the ws kernel): contiguous rows from the sequence's first
//! key, or pages through a block table (key t is row `t % page_size` of block
//! `block_table[t / page_size]`). Only addresses differ, so a paged call's arithmetic is the contiguous one.
//! Every index read from device memory is clamped: a bogus block table never reads outside k / v.

use crate::arch::math::div_rem_u32;
use crate::arch::mem::ld_global_nc_i32;
use crate::params::FwdParams;

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
        Pages { paged: PAGED, table, ident, first: 0, page_size: p.page_size, max_blocks: p.max_blocks, num_blocks: p.num_blocks }
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
        let (page, off) = div_rem_u32((self.first + t) as u32, self.page_size as u32);
        let page = clamp(page as i32, 0, self.max_blocks - 1);
        let block = if self.table != 0 { unsafe { ld_global_nc_i32(self.table.wrapping_add(page as u64 * 4)) } } else { self.ident + page };
        (clamp(block, 0, self.num_blocks - 1), off as i32)
    }
}

/// Clamp into `[lo, hi]` (lo where hi < lo).
#[inline(always)]
fn clamp(x: i32, lo: i32, hi: i32) -> i32 {
    let x = if x > hi { hi } else { x };
    if x < lo { lo } else { x }
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

    /// Paged K/V: (block, row in it) of key `n0` when keys `n0..n0 + n` share its page (so they follow
    /// at the row stride), else None (rows one by one: `Pages::locate`).
    #[inline(always)]
    pub(crate) unsafe fn page_run(&self, n0: i32, n: i32) -> Option<(i32, i32)> {
        let (block, off) = unsafe { self.pages.locate(n0) };
        if off + n <= self.pages.page_size { Some((block, off)) } else { None }
    }
}
