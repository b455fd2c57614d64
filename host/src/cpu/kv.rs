//! Where K/V rows come from, behind one call: contiguous rows from a sequence's base, or pages through
//! the block table. Only the addresses differ, so a paged call's arithmetic is bitwise the contiguous one.

use super::seqlen::{Pages, SeqInfo};
use super::{load_rows, prefetch_rows, HostSlice};
use crate::problem::{Problem, Strides};

pub(crate) struct KeyRows<'a> {
    /// The host block table and page size of a paged problem.
    pages: Option<(&'a [i32], usize)>,
}

impl<'a> KeyRows<'a> {
    pub fn new(p: &'a Problem) -> KeyRows<'a> {
        let table = p.keys.as_ref().and_then(|k| k.block_table.as_deref());
        KeyRows { pages: table.zip(p.paged.map(|pg| pg.page_size)) }
    }

    /// `prefetch_rows` for the keys `load` would read.
    #[allow(clippy::too_many_arguments)]
    pub fn prefetch(&self, data: HostSlice<'_>, st: &Strides, s: &SeqInfo, base: usize, head: usize, j0: usize, n: usize, d: usize) {
        match (s.pages, self.pages) {
            (Some(pg), Some((table, page_size))) => {
                for r in 0..n {
                    prefetch_rows(data, paged_row(table, page_size, pg, st, head, j0 + r), 0, 1, d);
                }
            }
            _ => prefetch_rows(data, base + j0 * st.row + head, st.row, n, d),
        }
    }

    /// Keys `j0..j0 + n` of sequence `s` from `data` (k or v: strides `st`, the sequence's `base`, the
    /// head's offset `head`), each `d` wide, widened to f32 into `dst`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub fn load(&self, data: HostSlice<'_>, st: &Strides, s: &SeqInfo, base: usize, head: usize, j0: usize, n: usize, d: usize, dst: &mut [f32]) {
        match (s.pages, self.pages) {
            (Some(pg), Some((table, page_size))) => {
                for (r, row) in dst.chunks_exact_mut(d).take(n).enumerate() {
                    load_rows(data, paged_row(table, page_size, pg, st, head, j0 + r), 0, 1, d, row);
                }
            }
            _ => load_rows(data, base + j0 * st.row + head, st.row, n, d, dst),
        }
    }
}

/// Element offset of key j of a paged sequence (`pg`: its table row and first position) at head offset `head`.
#[inline(always)]
fn paged_row(table: &[i32], page_size: usize, pg: Pages, st: &Strides, head: usize, j: usize) -> usize {
    let t = pg.first + j;
    // validate.rs checked every entry a sequence reads: in 0..num_blocks.
    let block = table[pg.table_row + t / page_size] as usize;
    block * st.batch + (t % page_size) * st.row + head
}
