//! The validated, canonical description of one attention call: what `validate` produces and both the CPU
//! and CUDA paths consume. Nothing downstream re-checks arguments.

pub use crate::dropout::DropoutParams;
use crate::types::DType;

/// Row/head/batch strides of one `[.., S, H, D]` operand in elements (the head dim is contiguous).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Strides {
    pub batch: usize,
    pub row: usize,
    pub head: usize,
}

/// Host copies of the varlen length tensors (present whenever they were host tensors, or when the caller
/// asked for device copies to be checked).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct HostSeqlens {
    pub cu_seqlens_q: Vec<i32>,
    /// Empty for a paged call without it (`Problem::keys` has the key counts then).
    pub cu_seqlens_k: Vec<i32>,
    pub seqused_q: Option<Vec<i32>>,
    pub seqused_k: Option<Vec<i32>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub dtype: DType,
    /// Number of sequences.
    pub batch: usize,
    pub hq: usize,
    pub hk: usize,
    pub head_dim: usize,
    pub varlen: bool,
    /// Dense: rows per sequence. Varlen: max_seqlen_q / max_seqlen_k, or where the caller gave none the
    /// mean lengths (`max_given` false: an estimate for the heuristics and the grids that are not
    /// slot-scheduled, whose blocks stride over longer sequences). KV cache: Sq / the keys a cache row
    /// holds.
    pub seqlen_q: usize,
    pub seqlen_k: usize,
    /// Varlen: seqlen_q and seqlen_k are the caller's max_seqlen_q and max_seqlen_k (bounds, not
    /// estimates). Always true for dense and KV-cache problems.
    pub max_given: bool,
    /// Rows of the q (and out) buffer and of the k/v buffers: B*S dense, T varlen.
    pub total_q: usize,
    pub total_k: usize,
    /// Canonical mask: inclusive window around the bottom-right diagonal, -1 = unbounded; causal is (-1, 0).
    pub window_left: i64,
    pub window_right: i64,
    /// Softmax scale applied to q.k (default 1/sqrt(D)).
    pub scale: f32,
    /// 0 = off; else scores are softcap * tanh(scale * q.k / softcap).
    pub softcap: f32,
    pub q: Strides,
    pub k: Strides,
    pub v: Strides,
    pub has_seqused_q: bool,
    pub has_seqused_k: bool,
    /// Varlen lengths on the host: filled in (and checked) on the CPU path, never on CUDA.
    pub seqlens: Option<HostSeqlens>,
    /// k and v are pages of a paged cache (`[num_blocks, page_size, Hk, D]`; `k.batch`, `v.batch` are
    /// the block strides).
    pub paged: Option<Paged>,
    /// Where each sequence's keys are, when not where `cu_seqlens_k` (varlen) or the batch index (dense)
    /// puts them: filled in (and checked) on the CPU path for paged and KV-cache calls.
    pub keys: Option<HostKeys>,
    /// ALiBi: where the slope of (sequence b, head h) is in the call's `alibi_slopes`.
    pub alibi: Option<Alibi>,
    /// Dropout with p > 0 (p = 0 is `None`: nothing drawn, nothing scaled).
    pub dropout: Option<DropoutParams>,
}

/// The layout of ALiBi's slopes (f32): the slope of sequence b, head h is element
/// `b * batch_stride + h * head_stride` (`batch_stride` 0 for slopes `[Hq]` shared by every sequence).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Alibi {
    pub batch_stride: usize,
    pub head_stride: usize,
}

/// A paged K/V layout: key position t of sequence b is row `t % page_size` of block
/// `block_table[b][t / page_size]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paged {
    pub page_size: usize,
    pub num_blocks: usize,
    /// Entries per row of the block table: a sequence holds at most `max_blocks * page_size` keys.
    pub max_blocks: usize,
}

impl Paged {
    /// Keys one sequence can hold.
    pub fn capacity(&self) -> usize {
        self.max_blocks.saturating_mul(self.page_size)
    }
}

/// Each sequence's keys, resolved on the host from the call's index tensors (cu_seqlens_k or seqused_k,
/// cache_seqlens, cache_batch_idx, cache_leftpad) after their contents were checked.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct HostKeys {
    /// Keys sequence b attends to.
    pub seqlen_k: Vec<usize>,
    /// The entry of k/v's first dimension that holds sequence b's keys (a cache row), or with a paged
    /// layout the row of the block table that lists its pages.
    pub batch: Vec<usize>,
    /// Position of sequence b's key 0 in that entry (its cache_leftpad, else 0).
    pub first: Vec<usize>,
    /// A paged layout's block table, row-major `[B, max_blocks]`.
    pub block_table: Option<Vec<i32>>,
}

/// A shape of rank <= 4 without allocating (the CUDA path allocates nothing per call).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    dims: [usize; 4],
    rank: usize,
}

impl Dims {
    pub fn new(d: &[usize]) -> Dims {
        let mut dims = [0; 4];
        dims[..d.len()].copy_from_slice(d);
        Dims { dims, rank: d.len() }
    }
}

impl std::ops::Deref for Dims {
    type Target = [usize];
    fn deref(&self) -> &[usize] {
        &self.dims[..self.rank]
    }
}

impl Problem {
    /// scale / softcap, the multiplier of q.k inside the softcap's tanh (0 without a softcap), held within
    /// f32's range: a softcap so small that the quotient overflows would make 0 * inf = NaN of a zero
    /// score. Every score then lies within softcap of 0 whatever the multiplier, so the clamp changes
    /// nothing the softmax can see.
    pub fn softcap_pre(&self) -> f32 {
        if self.softcap > 0.0 { (self.scale / self.softcap).clamp(-f32::MAX, f32::MAX) } else { 0.0 }
    }
    /// The forward's slot count (`slot_count`) with row blocks of `block_m`: varlen without the max
    /// lengths only (the caller gave none, so the grid cannot be sized by them), where it fits, and
    /// without ALiBi or dropout (the ws forward's modifier copies take no slots: kernels-gpu fwd/ws.rs
    /// `Tiles::new`; those problems schedule by the mean lengths).
    pub fn fwd_slots(&self, block_m: usize) -> Option<usize> {
        if !self.varlen || self.max_given || self.alibi.is_some() || self.dropout.is_some() {
            return None;
        }
        slot_count(self.total_q, self.batch, block_m)
    }
    /// Output shape: `[B, Sq, Hq, D]`, or `[Tq, Hq, D]` for varlen.
    pub fn out_shape(&self) -> Dims {
        if self.varlen { Dims::new(&[self.total_q, self.hq, self.head_dim]) } else { Dims::new(&[self.batch, self.seqlen_q, self.hq, self.head_dim]) }
    }
    /// LSE shape: `[B, Hq, Sq]`, or `[Hq, Tq]` for varlen.
    pub fn lse_shape(&self) -> Dims {
        if self.varlen { Dims::new(&[self.hq, self.total_q]) } else { Dims::new(&[self.batch, self.hq, self.seqlen_q]) }
    }
    /// Shape of k and v (and of dk, dv): `[B, Sk, Hk, D]`, or `[Tk, Hk, D]` for varlen.
    pub fn kv_shape(&self) -> Dims {
        if self.varlen { Dims::new(&[self.total_k, self.hk, self.head_dim]) } else { Dims::new(&[self.batch, self.seqlen_k, self.hk, self.head_dim]) }
    }
    /// Shape of the probabilities (`s_dmask`): `[B, Hq, Sq, Sk]`, for varlen `[B, Hq, max_seqlen_q,
    /// max_seqlen_k]` (an error when the caller gave no max_seqlen).
    pub fn s_dmask_shape(&self) -> crate::error::Result<Dims> {
        if !self.max_given {
            let msg = "is required with s_dmask (return_attn_probs), whose shape it sets".into();
            return Err(crate::error::Error::Value { arg: "max_seqlen_q", msg });
        }
        Ok(Dims::new(&[self.batch, self.hq, self.seqlen_q, self.seqlen_k]))
    }
    /// (batch, head) strides of the contiguous LSE.
    pub fn lse_strides(&self) -> (usize, usize) {
        if self.varlen { (0, self.total_q) } else { (self.hq * self.seqlen_q, self.seqlen_q) }
    }
}

/// Host copies of a paged varlen call's index tensors, read before their contents are checked.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct HostPagedSeqlens {
    pub cu_seqlens_q: Vec<i32>,
    pub cu_seqlens_k: Option<Vec<i32>>,
    pub seqused_q: Option<Vec<i32>>,
    pub seqused_k: Option<Vec<i32>>,
    /// Row-major `[B, max_blocks]`.
    pub block_table: Vec<i32>,
}

/// Host copies of a KV-cache call's index tensors, read before their contents are checked.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct HostKvCache {
    pub cache_seqlens: Vec<i32>,
    pub cache_batch_idx: Option<Vec<i32>>,
    pub cache_leftpad: Option<Vec<i32>>,
    /// Row-major `[B, max_blocks]`.
    pub block_table: Option<Vec<i32>>,
}

/// A validated KV-cache call (`KvCacheViews`): the attention after the append as a `Problem` (q dense
/// `[B, Sq, Hq, D]`, k and v the caches, `seqlen_k` the keys a cache row can hold), and the append.
#[derive(Clone, Debug, PartialEq)]
pub struct KvCacheProblem {
    pub fwd: Problem,
    /// Entries of the cache's first dimension: rows of a contiguous cache, or blocks of a paged one.
    pub cache_batch: usize,
    /// Rows of k_new / v_new per sequence (0 without them).
    pub seqlen_new: usize,
    pub k_new: Option<Strides>,
    pub v_new: Option<Strides>,
    pub rotary: Option<Rotary>,
    pub has_cache_batch_idx: bool,
    pub has_cache_leftpad: bool,
    /// As asked for (0 = the heuristic, resolved by the path that runs it).
    pub num_splits: usize,
}

/// Rotary embedding of a KV-cache call's q and k_new.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotary {
    /// Features rotated (the first `dim` of each head): twice the width of cos / sin.
    pub dim: usize,
    /// Positions cos / sin hold (S_ro).
    pub seqlen: usize,
    /// Pairs (2i, 2i+1) instead of (i, i + dim/2).
    pub interleaved: bool,
    /// cos / sin element type: q's or f32.
    pub dtype: DType,
    /// Row strides of cos and sin.
    pub cos_row: usize,
    pub sin_row: usize,
    /// Query row i of batch entry b is at position `cache_seqlens[b] + i` (causal or windowed
    /// attention); otherwise every row is at `cache_seqlens[b]`.
    pub q_per_row: bool,
}

/// A validated combine (`CombineViews`), packed layouts as a batch of one: partial results
/// `[n, B, S, H, D]` with LSE `[n, B, H, S]` merged into `[B, S, H, D]` and `[B, H, S]`.
#[derive(Clone, Debug, PartialEq)]
pub struct CombineProblem {
    pub splits: usize,
    pub batch: usize,
    pub seqlen: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Element strides of partial_out: split, batch, row, head.
    pub partial_out: [usize; 4],
    /// Element strides of partial_lse: split, batch, head, row.
    pub partial_lse: [usize; 4],
    pub out: Strides,
}

/// The most splits of a key range a split-KV call makes.
pub const MAX_SPLITS: usize = 128;

/// How many splits of the key range keep `processors` busy when attention has `tiles` independent work
/// tiles (query tiles times heads times batch) and each row sees up to `key_blocks` blocks of keys.
///
/// Splitting only pays when the tiles leave processors idle: from 80% of a wave on, one split. Otherwise
/// each candidate count s (every split keeps at least one key block, at most `MAX_SPLITS`) fills its
/// last wave of `tiles * s` units to some fraction; the smallest s within 85% of the best fill wins,
/// since every split adds a partial result to write and merge.
pub fn num_splits_heuristic(tiles: usize, key_blocks: usize, processors: usize) -> usize {
    let most = key_blocks.min(MAX_SPLITS);
    if tiles == 0 || processors == 0 || most <= 1 || tiles.saturating_mul(5) >= processors.saturating_mul(4) {
        return 1;
    }
    // s splits of key_blocks must each get a block of their own, or a smaller s does the same work.
    let distinct = |s: usize| key_blocks.div_ceil(key_blocks.div_ceil(s)) == s;
    let fill = |s: usize| {
        let units = tiles * s;
        units as f64 / (units.div_ceil(processors) * processors) as f64
    };
    let best = (1..=most).filter(|&s| distinct(s)).map(fill).fold(0.0, f64::max);
    (1..=most).find(|&s| distinct(s) && fill(s) >= 0.85 * best).unwrap_or(1)
}

/// Splits for the decode kernels (split-KV over `key_blocks` blocks of keys per row, `tiles` units of
/// work, `processors` blocks running at once): with the cost of a count the waves times the key blocks
/// per split plus one (a block's start and its partial result cost about a key block: measured, H200,
/// batch 64 at 1k keys, 2 splits 0.092 ms against the 0.109 of 8, which the count without it picked),
/// the smallest count (up to `MAX_SPLITS`, each split keeping a key block) within 5% of the cheapest.
/// Unlike `num_splits_heuristic` it also splits work that fills more than a wave, to even out the last
/// one (b = 64, 8 kv heads on 396 decode blocks, 32k keys: 3 splits, 2.11 ms against 2.87 unsplit).
pub fn num_splits_waves(tiles: usize, key_blocks: usize, processors: usize) -> usize {
    if tiles == 0 || processors == 0 || key_blocks <= 1 {
        return 1;
    }
    let cost = |s: usize| tiles.saturating_mul(s).div_ceil(processors).saturating_mul(key_blocks.div_ceil(s) + 1);
    let most = key_blocks.min(MAX_SPLITS);
    let best = (1..=most).map(cost).min().unwrap_or(0);
    (1..=most).find(|&s| cost(s) as f64 <= best as f64 * 1.05).unwrap_or(1)
}

/// A validated backward call: the forward's problem, plus where `dout` and `out` (both of the output's
/// shape) live. The LSE is contiguous f32 of `fwd.lse_shape()`.
#[derive(Clone, Debug, PartialEq)]
pub struct BwdProblem {
    pub fwd: Problem,
    pub dout: Strides,
    pub out: Strides,
}

/// Slot scheduling (a varlen grid sized without the max lengths): the virtual row blocks of `bm` rows
/// over `total` rows of `batch` sequences that the kernels' `seqlen::Lengths::slot_block` maps to
/// (sequence, row block), `total / bm + batch + 1`; None where twice their rows would not fit i32 (the
/// kernels form `(block + slots) * bm`).
pub fn slot_count(total: usize, batch: usize, bm: usize) -> Option<usize> {
    let slots = (total / bm.max(1)).checked_add(batch)?.checked_add(1)?;
    let rows = slots.checked_mul(bm)?.checked_mul(2)?;
    (rows <= i32::MAX as usize).then_some(slots)
}
