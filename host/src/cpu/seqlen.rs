//! Where each sequence lives: its rows in q/k/v storage and in the out/lse buffers, and its (used) lengths.
//! Dense batches are the varlen case with sequence b starting `b * batch_stride` into storage.

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
}

/// One `SeqInfo` per sequence, and the distance between heads in `lse`.
pub(crate) fn sequences(p: &Problem) -> Result<(Vec<SeqInfo>, usize)> {
    if !p.varlen {
        let seqs = (0..p.batch)
            .map(|b| SeqInfo {
                q_base: b * p.q.batch,
                k_base: b * p.k.batch,
                v_base: b * p.v.batch,
                out_row0: b * p.seqlen_q,
                lse_base: b * p.hq * p.seqlen_q,
                seqlen_q: p.seqlen_q,
                seqlen_k: p.seqlen_k,
            })
            .collect();
        return Ok((seqs, p.seqlen_q));
    }
    let s = p.seqlens.as_ref().ok_or_else(|| Error::Value { arg: "cu_seqlens_q", msg: "the CPU path needs host cu_seqlens".into() })?;
    // validate.rs guarantees 0 <= cu[b] <= cu[b+1] <= total and 0 <= seqused[b] <= cu[b+1] - cu[b].
    let len = |cu: &[i32], used: &Option<Vec<i32>>, b: usize| match used {
        Some(u) => u[b] as usize,
        None => (cu[b + 1] - cu[b]) as usize,
    };
    let seqs = (0..p.batch)
        .map(|b| {
            let (row_q, row_k) = (s.cu_seqlens_q[b] as usize, s.cu_seqlens_k[b] as usize);
            SeqInfo {
                q_base: row_q * p.q.row,
                k_base: row_k * p.k.row,
                v_base: row_k * p.v.row,
                out_row0: row_q,
                lse_base: row_q,
                seqlen_q: len(&s.cu_seqlens_q, &s.seqused_q, b),
                seqlen_k: len(&s.cu_seqlens_k, &s.seqused_k, b),
            }
        })
        .collect();
    Ok((seqs, p.total_q))
}
