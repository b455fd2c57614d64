//! The single argument of every forward kernel: pointers, 64-bit strides in elements, lengths, and the
//! mask and softmax constants in their canonical form. This file is compiled for the device (kernels-gpu)
//! and for the host (host/src/params.rs includes it by path), so there is one definition of the layout.
//!
//! Varlen is the general case: with `cu_seqlens_q == 0` the batch is dense, sequence `b` starts at row
//! `b * seqlen_q` of a `[B*S]`-row view through `*_batch_stride`, and every sequence has `seqlen_q` rows.

/// ALiBi and dropout (the `_mods` kernels and the paged forward read these; every other kernel ignores
/// them). Shared by both parameter structs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScoreMods {
    /// f32 ALiBi slopes, element `b * alibi_batch_stride + h * alibi_head_stride` for sequence b, query
    /// head h; 0 = no ALiBi.
    pub alibi_slopes: u64,
    pub alibi_batch_stride: i64,
    pub alibi_head_stride: i64,
    /// Dropout's Philox key (the seed) and subsequence offset (`shared/dropout.rs`).
    pub dropout_seed: u64,
    pub dropout_offset: u64,
    /// Keep a score iff its 8-bit draw is below this; `DROPOUT_OFF` (256) = no dropout.
    pub dropout_threshold: u32,
    /// `1 / (1 - p)` (f32), the factor of every kept probability; 1 without dropout.
    pub dropout_scale: f32,
}

/// `ScoreMods::dropout_threshold` of a call without dropout: every 8-bit draw is below it.
pub const DROPOUT_OFF: u32 = 1 << 8;
/// `BwdParams::dq_rotate`'s bits: the rotated walk, its spread starts, the ws helper's turn passed on
/// without a fence.
pub const DQ_ROTATE: i32 = 1;
pub const DQ_ROTATE_SPREAD: i32 = 2;
pub const DQ_PASS_NO_FENCE: i32 = 4;
pub const SCORE_MODS_SIZE: usize = 5 * 8 + 2 * 4;
const _: () = assert!(core::mem::size_of::<ScoreMods>() == SCORE_MODS_SIZE);

impl Default for ScoreMods {
    fn default() -> ScoreMods {
        ScoreMods::NONE
    }
}

impl ScoreMods {
    /// No ALiBi, no dropout.
    pub const NONE: ScoreMods = ScoreMods { alibi_slopes: 0, alibi_batch_stride: 0, alibi_head_stride: 0, dropout_seed: 0, dropout_offset: 0, dropout_threshold: DROPOUT_OFF, dropout_scale: 1.0 };

    /// These modifiers with dropout off (`NONE`'s threshold and scale). The `_alibi` kernel copies call it
    /// at entry, so the compiler drops their dropout code.
    pub const fn without_dropout(self) -> ScoreMods {
        ScoreMods { dropout_threshold: Self::NONE.dropout_threshold, dropout_scale: Self::NONE.dropout_scale, ..self }
    }

    /// These modifiers without ALiBi (`NONE`'s slopes). The `_dropout` kernel copies call it at entry, so
    /// the compiler drops their ALiBi code.
    pub const fn without_alibi(self) -> ScoreMods {
        ScoreMods { alibi_slopes: Self::NONE.alibi_slopes, ..self }
    }
}

/// Forward-pass parameters. All pointers are device addresses; `0` means absent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FwdParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    /// f32 log-sum-exp (natural log), indexed `batch*lse_batch_stride + head*lse_head_stride + row`.
    pub lse: u64,
    /// int32 `[batch + 1]`, or 0 for a dense batch.
    pub cu_seqlens_q: u64,
    pub cu_seqlens_k: u64,
    /// int32 `[batch]`: rows of each slot that are real; the rest are padding (out 0, LSE -inf). 0 = all.
    pub seqused_q: u64,
    pub seqused_k: u64,

    pub q_batch_stride: i64,
    pub q_row_stride: i64,
    pub q_head_stride: i64,
    pub k_batch_stride: i64,
    pub k_row_stride: i64,
    pub k_head_stride: i64,
    pub v_batch_stride: i64,
    pub v_row_stride: i64,
    pub v_head_stride: i64,
    pub o_batch_stride: i64,
    pub o_row_stride: i64,
    pub o_head_stride: i64,
    pub lse_batch_stride: i64,
    pub lse_head_stride: i64,

    /// Number of sequences.
    pub batch: i32,
    /// Query heads and key/value heads; `h % h_k == 0`.
    pub h: i32,
    pub h_k: i32,
    /// Dense: rows per sequence. Varlen: `max_seqlen_q`/`max_seqlen_k` (they only size the grid).
    pub seqlen_q: i32,
    pub seqlen_k: i32,
    /// Rows in the q/o buffers and in the k/v buffers: every index the kernel forms is clamped below these.
    pub total_q: i32,
    pub total_k: i32,
    /// Inclusive window around the bottom-right-aligned diagonal; -1 = unbounded. Causal is (-1, 0).
    pub window_left: i32,
    pub window_right: i32,
    /// Number of query-row blocks the grid's x dimension has (blocks stride over longer sequences).
    pub m_blocks: i32,
    /// Scores are `qk * scale_log2` (base 2), or with softcap `tanh(qk * softcap_pre) * scale_log2`.
    /// Never 0; negative for a negative softmax scale without softcap.
    pub scale_log2: f32,
    /// `softmax_scale / softcap`, or 0 when there is no softcap.
    pub softcap_pre: f32,

    /// Paged K/V: int32 `[batch, max_blocks]`, 0 = contiguous K/V. Key t of sequence b is row
    /// `t % page_size` of block `block_table[b][t / page_size]` of k and v, whose `*_batch_stride` are
    /// then the block strides; `cu_seqlens_k` (0 = absent: `seqused_k` alone) and `seqused_k` only count
    /// keys. Entries are clamped into `[0, num_blocks)` and key counts to `max_blocks * page_size`.
    pub block_table: u64,
    /// Elements between rows of the block table.
    pub block_table_stride: i64,
    /// Keys per block (>= 1), entries per block-table row, and blocks in k / v (both >= 1 when paged).
    pub page_size: i32,
    pub max_blocks: i32,
    pub num_blocks: i32,
    /// Split-KV (paged kernels only; 1 elsewhere): grid z is `batch * num_splits`, slice z attends the
    /// `z % num_splits`-th of each row block's key tiles and writes f32 partial results: out at
    /// `o + split * batch * o_batch_stride` (the o strides then count 2-byte units: twice the f32
    /// buffer's element strides), lse at `lse + split * batch * lse_batch_stride`.
    pub num_splits: i32,
    /// ALiBi and dropout.
    pub mods: ScoreMods,
    /// KV cache (paged kernels only; 0 elsewhere): int32 `[batch]`, the position of each sequence's key 0
    /// in its block-table row (flash-attn's `cache_leftpad`); its keys are counted `seqused_k[b] +
    /// seqused_k_add - cache_leftpad[b]` (seqused_k is then the cache's lengths before the append, and
    /// seqused_k_add the rows appended).
    pub cache_leftpad: u64,
    pub seqused_k_add: i32,
    /// Packed GQA (the `_decode` kernels; 1 elsewhere): q rows per query position. The kernel's heads
    /// are then the kv heads and row `r` of a head is query `r / q_pack` (of `seqlen_q / q_pack`) of
    /// q head `h * q_pack + r % q_pack`: with q_pack > 1 the kernel reads that row of q at
    /// `(r / q_pack) * q_row_stride + (r % q_pack) * q_pack_head_stride` past its head's first row
    /// (`q_head_stride` is then q_pack times q's head stride, which `q_pack_head_stride` is).
    pub q_pack: i32,
    pub q_pack_head_stride: i64,
    /// Slot scheduling (varlen without the max lengths; 0 = off): grid x (the warp-specialized kernel:
    /// `m_blocks`) walks `slots` virtual row blocks of the packed q (`seqlen::Lengths::slot_block`), the
    /// grid one slice; a block strides by `slots`, past any sequence.
    pub slots: i32,
    /// Dynamic tile scheduling (the warp-specialized forward; -1 = static): the entry of the module's
    /// tile counters this launch draws its tiles from (`FWD_WS_TILE_SLOTS` entries; see fwd/ws.rs).
    pub tile_slot: i32,
    /// The warp-specialized forward with an O stage (`variants::fwd_ws_o_staged`): 1 where `TmaMaps::o`
    /// addresses the output of a dense problem without seqused_q, so that each consumer warpgroup hands
    /// its stage to the copy engine (bulk tensor stores; rows past Sq cut at the map's end); 0: the
    /// threads store the real rows.
    pub o_tma: i32,
    pub _o_pad: i32,
}

/// Size the host's launch code relies on; both sides assert it.
pub const FWD_PARAMS_SIZE: usize = 9 * 8 + 14 * 8 + 12 * 4 + 2 * 8 + 4 * 4 + SCORE_MODS_SIZE + 8 + 2 * 4 + 8 + 2 * 4 + 2 * 4;
const _: () = assert!(core::mem::size_of::<FwdParams>() == FWD_PARAMS_SIZE);
const _: () = assert!(core::mem::align_of::<FwdParams>() == 8);
const _: () = assert!(core::mem::offset_of!(FwdParams, q_batch_stride) == 72);
const _: () = assert!(core::mem::offset_of!(FwdParams, batch) == 184);
const _: () = assert!(core::mem::offset_of!(FwdParams, block_table) == 232);
const _: () = assert!(core::mem::offset_of!(FwdParams, page_size) == 248);

/// The Hopper warp-specialized forward's second parameter: the tensor maps (`cuTensorMapEncodeTiled`,
/// 128 opaque bytes each) of q, k, v and out (`FwdParams::o_tma`; boxes of 64 rows) as 4-d tensors
/// `[batch][rows][heads][head dim]` (varlen: one batch of all packed rows; paged K/V:
/// `[num_blocks][page_size][heads][head dim]` in boxes of `variants::tma_page_box_rows` rows), boxes of
/// 64 columns in the 128-byte swizzle. Passed by value: the copy engine reads a map where it lies, in
/// kernel parameter space, 64-byte aligned. Rust's kernel ABI takes alignments up to 16, so xtask raises
/// this parameter's to 64 in the emitted PTX.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TmaMaps {
    pub q: [u64; 16],
    pub k: [u64; 16],
    pub v: [u64; 16],
    pub o: [u64; 16],
}

const _: () = assert!(core::mem::size_of::<TmaMaps>() == 512);

/// The warp-specialized backward's tensor maps (as `TmaMaps`): q, k, v and dout, boxes of 64 columns x
/// 64 query rows (q, dout) / 128 keys (k, v).
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BwdTmaMaps {
    pub q: [u64; 16],
    pub k: [u64; 16],
    pub v: [u64; 16],
    pub dout: [u64; 16],
    /// The f32 dq accumulator (`BwdParams::dq_accum`) in boxes of 64 rows x 32 columns, which the dQ
    /// helpers reduce into (`cp.reduce.async.bulk.tensor ... add`); zeros where nothing accumulates dq.
    pub dq_accum: [u64; 16],
}

const _: () = assert!(core::mem::size_of::<BwdTmaMaps>() == 640);

/// Backward-pass parameters, shared by its four kernels (prep, dk/dv with atomic dq, deterministic dq,
/// dq conversion). Same conventions as `FwdParams`; dq/dk/dv/dq_accum strides are in elements too.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BwdParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub dout: u64,
    /// The forward's LSE (natural log), indexed like `FwdParams::lse`.
    pub lse: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    /// f32 `[total_q, h, head_dim]` dq accumulator (atomic path), 0 when unused.
    pub dq_accum: u64,
    /// f32 workspace indexed like the LSE: `lse * log2(e)` (+inf for an empty row), and
    /// `D_i = dout_i . out_i` at the same index.
    pub lse_log2: u64,
    pub delta: u64,
    pub cu_seqlens_q: u64,
    pub cu_seqlens_k: u64,
    pub seqused_q: u64,
    pub seqused_k: u64,

    pub q_batch_stride: i64,
    pub q_row_stride: i64,
    pub q_head_stride: i64,
    pub k_batch_stride: i64,
    pub k_row_stride: i64,
    pub k_head_stride: i64,
    pub v_batch_stride: i64,
    pub v_row_stride: i64,
    pub v_head_stride: i64,
    pub o_batch_stride: i64,
    pub o_row_stride: i64,
    pub o_head_stride: i64,
    pub do_batch_stride: i64,
    pub do_row_stride: i64,
    pub do_head_stride: i64,
    pub dq_batch_stride: i64,
    pub dq_row_stride: i64,
    pub dq_head_stride: i64,
    pub dk_batch_stride: i64,
    pub dk_row_stride: i64,
    pub dk_head_stride: i64,
    pub dv_batch_stride: i64,
    pub dv_row_stride: i64,
    pub dv_head_stride: i64,
    pub dqa_batch_stride: i64,
    pub dqa_row_stride: i64,
    pub dqa_head_stride: i64,
    pub lse_batch_stride: i64,
    pub lse_head_stride: i64,

    pub batch: i32,
    pub h: i32,
    pub h_k: i32,
    pub head_dim: i32,
    pub seqlen_q: i32,
    pub seqlen_k: i32,
    pub total_q: i32,
    pub total_k: i32,
    pub window_left: i32,
    pub window_right: i32,
    /// P = exp2(s * scale_log2 - lse_log2) with s = q.k, or with softcap s = tanh(q.k * softcap_pre);
    /// signed (a negative softmax scale needs no special case here).
    pub scale_log2: f32,
    pub softcap_pre: f32,
    /// The softmax scale, which dq and dk carry.
    pub scale: f32,
    /// Slot scheduling (varlen without the max lengths, not deterministic; 0 = off): each kernel's grid x
    /// is the slot count of its side and block size (`seqlen::Lengths::slot_block`), its grid z one slice.
    pub slots: i32,
    /// ALiBi and dropout, as the forward had them.
    pub mods: ScoreMods,
    /// The deterministic backward on Hopper: `dq_splits` f32 dq accumulators `dqa_split_stride` elements
    /// apart, the wgmma dK/dV kernel's CTA x adding into copy x (its key blocks in a fixed order), the
    /// convert summing the copies in order 0, 1, ... Otherwise 1 and 0: one accumulator all CTAs add to.
    pub dqa_split_stride: i64,
    pub dq_splits: i32,
    /// The ordered mode's turns, bits (`DQ_ROTATE`, `DQ_ROTATE_SPREAD`, `DQ_PASS_NO_FENCE`). Bit 0, the
    /// rotated walk (the host sets it where every CTA of a grid can be resident at once: grid x <= the
    /// multiprocessors): on a sequence where every key block sees every query block (no causal mask, no
    /// window) and there are no more key blocks than query blocks, the CTA of key block kb walks the query
    /// blocks from kb on (wrapping), and the turn order of query block m is the order the CTAs reach it in
    /// (`bwd::DqTurn`), so no CTA waits on another's walk. Bit 1 (with bit 0), spread starts: from query
    /// block floor(kb M / n) (M query blocks, n key blocks), so that where M >= 2 n the CTAs reach each
    /// query block at least two steps apart and the ws kernel's dQ helper passes each turn on after its
    /// next step's reductions are issued. Bit 2: the ws helper passes turns on by `st.release` alone (no
    /// `fence.acq_rel.gpu` before it).
    pub dq_rotate: i32,
    /// The deterministic backward in order (0: off): one f32 dq accumulator and a u32 turn counter per
    /// (accumulator row, q head, column half) here, zeroed by prep, `[rows][Hq][2]` like the accumulator
    /// (`sem_batch_stride` counters between dense batches, 0 for varlen). The dK/dV kernels' CTA x takes
    /// key block `gx - 1 - x` and adds a step's dq after CTA x - 1 did (it wrote x; CTA x writes x + 1).
    pub dq_sem: u64,
    pub sem_batch_stride: i64,
}

pub const BWD_PARAMS_SIZE: usize = 16 * 8 + 29 * 8 + 14 * 4 + SCORE_MODS_SIZE + 32;
const _: () = assert!(core::mem::size_of::<BwdParams>() == BWD_PARAMS_SIZE);
const _: () = assert!(core::mem::align_of::<BwdParams>() == 8);
const _: () = assert!(core::mem::offset_of!(BwdParams, q_batch_stride) == 128);
const _: () = assert!(core::mem::offset_of!(BwdParams, batch) == 360);

/// The probabilities kernel's parameter (`variants::probs_kernel_name`): the forward's parameters (its
/// q, k, lengths, mask, scale, softcap and `mods`; its `lse` as the forward wrote it) and where P goes:
/// `s_dmask[b][h][i][j]` at `b * s_batch_stride + h * s_head_stride + i * s_row_stride + j` for every
/// i < `s_rows`, j < `s_cols` (each sequence's scores at the top left; the rest 0). Grid: x over key
/// blocks of `PROBS_THREADS`, y strides over the rows, z = batch * h.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProbsParams {
    pub fwd: FwdParams,
    pub s_dmask: u64,
    pub s_batch_stride: i64,
    pub s_head_stride: i64,
    pub s_row_stride: i64,
    pub s_rows: i32,
    pub s_cols: i32,
    pub head_dim: i32,
    pub _pad: i32,
}

pub const PROBS_PARAMS_SIZE: usize = FWD_PARAMS_SIZE + 4 * 8 + 4 * 4;
const _: () = assert!(core::mem::size_of::<ProbsParams>() == PROBS_PARAMS_SIZE);
const _: () = assert!(core::mem::align_of::<ProbsParams>() == 8);
const _: () = assert!(core::mem::offset_of!(ProbsParams, s_dmask) == FWD_PARAMS_SIZE);
const _: () = assert!(core::mem::offset_of!(FwdParams, mods) == 264 && core::mem::offset_of!(BwdParams, mods) == 416);

/// The KV-cache append kernel's parameter (`kvcache::append`): grid x over `items` = `B * S_new * Hk *
/// D/2` feature pairs of k_new and v_new (the first `append_items`), then `B * Sq * Hq * D/2` pairs of q
/// (rotated into `q_rot`, contiguous `[B, Sq, Hq, D]`) when rotary is on. Strides in elements
/// (batch, row, head); device indices are clamped: an entry past a cache row's capacity is not written.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AppendParams {
    pub k_new: u64,
    pub v_new: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub q: u64,
    pub q_rot: u64,
    pub cache_seqlens: u64,
    /// int32 `[batch]` rows of a contiguous cache (0 = row b), or 0.
    pub cache_batch_idx: u64,
    /// int32 `[batch, max_blocks]` (0 = contiguous).
    pub block_table: u64,
    pub rotary_cos: u64,
    pub rotary_sin: u64,
    pub k_new_strides: [i64; 3],
    pub v_new_strides: [i64; 3],
    pub k_strides: [i64; 3],
    pub v_strides: [i64; 3],
    pub q_strides: [i64; 3],
    pub block_table_stride: i64,
    pub cos_row: i64,
    pub sin_row: i64,
    pub append_items: i64,
    pub items: i64,
    pub batch: i32,
    pub seqlen_new: i32,
    pub seqlen_q: i32,
    pub h: i32,
    pub h_k: i32,
    pub head_dim: i32,
    /// Contiguous: the cache's rows (`B_cache`) and keys per row; paged: blocks and the page size.
    pub cache_batch: i32,
    pub cache_rows: i32,
    pub max_blocks: i32,
    /// Features rotated (0 = no rotary) and the positions the tables hold.
    pub rotary_dim: i32,
    pub rotary_len: i32,
    /// Pairs (2i, 2i+1); the tables are f32 (else q's dtype); q row i at `cache_seqlens[b] + i` (else
    /// every row at `cache_seqlens[b]`).
    pub interleaved: i32,
    pub rotary_f32: i32,
    pub q_per_row: i32,
}

pub const APPEND_PARAMS_SIZE: usize = 11 * 8 + 15 * 8 + 5 * 8 + 14 * 4;
const _: () = assert!(core::mem::size_of::<AppendParams>() == APPEND_PARAMS_SIZE);

/// The combine kernel's parameter (`kvcache::combine`): the warps of a (batch, row, head), one per 32
/// columns, merge `splits` partial (out, lse) pairs. Element strides: partial_out (split, batch, row, head), partial_lse (split,
/// batch, head, row), out (batch, row, head), lse (batch, head, row). Dtypes: 0 f32, 1 bf16, 2 f16.
/// Also the `_decode_fin` kernels' second parameter: they write out (q's dtype) and lse themselves at
/// these strides, merging a row block's `splits` blocks in their cluster (the partial fields unused;
/// with `out` 0 they would write partials through `FwdParams`' o and lse, as `_decode` does).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CombineParams {
    pub partial_out: u64,
    pub partial_lse: u64,
    pub out: u64,
    pub lse: u64,
    pub po_strides: [i64; 4],
    pub pl_strides: [i64; 4],
    pub out_strides: [i64; 3],
    pub lse_strides: [i64; 3],
    pub rows: i64,
    pub splits: i32,
    pub batch: i32,
    pub seqlen: i32,
    pub heads: i32,
    pub head_dim: i32,
    pub in_dtype: i32,
    pub out_dtype: i32,
    /// Packed partials (`FwdParams::q_pack`, the `_decode` kernels): out row (b, i, h) is partial row
    /// `i * pack + h % pack` of head `h / pack`; 1 = the same (b, i, h).
    pub pack: i32,
}

pub const COMBINE_PARAMS_SIZE: usize = 4 * 8 + 14 * 8 + 8 + 8 * 4;
const _: () = assert!(core::mem::size_of::<CombineParams>() == COMBINE_PARAMS_SIZE);

/// `CombineParams`' dtype codes.
pub const DTYPE_F32: i32 = 0;
pub const DTYPE_BF16: i32 = 1;
pub const DTYPE_F16: i32 = 2;
