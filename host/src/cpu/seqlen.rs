//! Where each sequence lives: its rows in q/k/v storage and in the out/lse buffers, and its (used) lengths.
//! Dense batches are the varlen case with sequence b starting `b * batch_stride` into storage. Where the
//! call resolved its keys on the host (`Problem::keys`: paged and KV-cache calls), they come from there.

use crate::error::{Error, Result};
use crate::problem::Problem;

#[derive(Clone, Copy, Debug)]
pub(crate) struct SeqInfo {
    /// Storage index of row 0, head 0 of this sequence in q, k and v.
    pub q_base: usize,
    pub k_base: usize,
    pub v_base: usize,
    /// Row of `out` (`[rows, Hq, D]` flattened) that holds query 0.
    pub out_row0: usize,
    /// Index of query 0, head 0 in `lse`; heads are `lse_head_stride` apart.
    pub lse_base: usize,
    /// Used lengths: the rows that are attended with (queries) and to (keys).
    pub seqlen_q: usize,
    pub seqlen_k: usize,
    /// Paged keys (then `k_base`, `v_base` are 0): key j is at position `first + j` of the pages listed
    /// from entry `table_row` of the host block table on.
    pub pages: Option<Pages>,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Pages {
    pub table_row: usize,
    pub first: usize,
}

/// One `SeqInfo` per sequence, and the distance between heads in `lse`.
pub(crate) fn sequences(p: &Problem) -> Result<(Vec<SeqInfo>, usize)> {
    // A dense batch of empty tensors passes validation at any size (up to i32::MAX sequences). With no
    // query and no key rows there is nothing to attend (every output is empty too): no table. Otherwise
    // the batch is bounded by the tensors' bytes, and the table is asked for, not assumed, so that one
    // past the host's memory is an error, not an abort.
    if !p.varlen && p.keys.is_none() && p.seqlen_q * p.hq == 0 && p.seqlen_k * p.hk == 0 {
        return Ok((Vec::new(), p.seqlen_q));
    }
    let mut table = Vec::new();
    table.try_reserve_exact(p.batch).map_err(|_| Error::TooLarge { arg: "q", msg: format!("the CPU path's table of {} sequences cannot be allocated", p.batch) })?;
    if !p.varlen {
        table.extend((0..p.batch).map(|b| SeqInfo {
            q_base: b * p.q.batch,
            k_base: b * p.k.batch,
            v_base: b * p.v.batch,
            out_row0: b * p.seqlen_q,
            lse_base: b * p.hq * p.seqlen_q,
            seqlen_q: p.seqlen_q,
            seqlen_k: p.seqlen_k,
            pages: None,
        }));
        return Ok((with_keys(p, table)?, p.seqlen_q));
    }
    let s = p.seqlens.as_ref().ok_or_else(|| Error::Value { arg: "cu_seqlens_q", msg: "the CPU path needs host cu_seqlens".into() })?;
    // validate.rs guarantees 0 <= cu[b] <= cu[b+1] <= total and 0 <= seqused[b] <= cu[b+1] - cu[b].
    let len = |cu: &[i32], used: &Option<Vec<i32>>, b: usize| match used {
        Some(u) => u[b] as usize,
        None => (cu[b + 1] - cu[b]) as usize,
    };
    // Keys resolved on the host replace cu_seqlens_k (which a paged call may not have).
    let keys_here = p.keys.is_none();
    table.extend((0..p.batch).map(|b| {
        let row_q = s.cu_seqlens_q[b] as usize;
        let row_k = if keys_here { s.cu_seqlens_k[b] as usize } else { 0 };
        SeqInfo {
            q_base: row_q * p.q.row,
            k_base: row_k * p.k.row,
            v_base: row_k * p.v.row,
            out_row0: row_q,
            lse_base: row_q,
            seqlen_q: len(&s.cu_seqlens_q, &s.seqused_q, b),
            seqlen_k: if keys_here { len(&s.cu_seqlens_k, &s.seqused_k, b) } else { 0 },
            pages: None,
        }
    }));
    Ok((with_keys(p, table)?, p.total_q))
}

/// The sequences with their keys where `Problem::keys` puts them: rows `first..` of entry `batch[b]` of
/// k and v, or of the pages block table row `b` lists.
fn with_keys(p: &Problem, mut seqs: Vec<SeqInfo>) -> Result<Vec<SeqInfo>> {
    let Some(keys) = &p.keys else { return Ok(seqs) };
    if [keys.seqlen_k.len(), keys.batch.len(), keys.first.len()] != [seqs.len(); 3] {
        return Err(Error::Value { arg: "keys", msg: "the resolved keys do not cover every sequence".into() });
    }
    for (b, s) in seqs.iter_mut().enumerate() {
        s.seqlen_k = keys.seqlen_k[b];
        match p.paged {
            Some(paged) => {
                (s.k_base, s.v_base) = (0, 0);
                s.pages = Some(Pages { table_row: keys.batch[b] * paged.max_blocks, first: keys.first[b] });
            }
            None => {
                s.k_base = keys.batch[b] * p.k.batch + keys.first[b] * p.k.row;
                s.v_base = keys.batch[b] * p.v.batch + keys.first[b] * p.v.row;
            }
        }
    }
    Ok(seqs)
}
