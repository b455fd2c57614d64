//! The vocabulary every layer shares (element types, devices, options, views of caller memory), with no
//! behaviour beyond describing them. Everything else imports from here; this imports nothing of ours but
//! the error type.

/// Element types the library reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    BF16,
    F32,
    I32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            DType::I32 => "i32",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Options shared by every entry point, with flash-attn 2's meaning.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnOptions {
    /// Multiplies q.k; `None` = 1/sqrt(head_dim) (`AttnOptions::default_scale`).
    pub softmax_scale: Option<f32>,
    /// Causal mask aligned to the bottom-right corner: query i sees key j iff j <= i + Sk - Sq.
    pub causal: bool,
    /// Sliding window `(left, right)`, inclusive, around the same diagonal; -1 = unbounded.
    pub window: (i64, i64),
    /// Soft-capping of the scores: `softcap * tanh(s / softcap)`; 0 = off.
    pub softcap: f32,
    /// Which CUDA kernels run (results are the same up to rounding); the default picks the fastest.
    pub kernels: KernelChoice,
    /// Dropout on the attention probabilities (training); the default, p = 0, is off and costs nothing.
    /// The backward must be given the same options: it regenerates the forward's mask.
    pub dropout: Dropout,
}

impl AttnOptions {
    /// The scale `softmax_scale: None` means for head dim `d`: 1/sqrt(d) rounded once to f32, as flash-attn's
    /// `d ** -0.5` (a Python float) reaches its kernels, so that every entry point (the library, the CLI,
    /// Python, whose head dims without kernels pad d and pass this scale) gives the same bits.
    pub fn default_scale(d: usize) -> f32 {
        (1.0 / (d as f64).sqrt()) as f32
    }

    /// `softmax_scale`, or the default for head dim `d`.
    pub fn scale_for(&self, d: usize) -> f32 {
        self.softmax_scale.unwrap_or_else(|| AttnOptions::default_scale(d))
    }
}

impl Default for AttnOptions {
    fn default() -> Self {
        AttnOptions { softmax_scale: None, causal: false, window: (-1, -1), softcap: 0.0, kernels: KernelChoice::default(), dropout: Dropout::default() }
    }
}

/// Dropout of the attention probabilities, flash-attn's `dropout_p`: each score is dropped with
/// probability `p` (its probability set to 0), the kept ones are scaled by `1 / (1 - p)`, and the LSE is
/// that of the scores before dropout. The mask is a function of (`seed`, `offset`) and each score's
/// position only (counter-based Philox4x32-10; `crate::dropout` defines it exactly), so the forward and
/// the backward, on the CPU and on CUDA, draw the same mask bit for bit; nothing is stored.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Dropout {
    /// In [0, 1); 0 = off.
    pub p: f32,
    /// The Philox key.
    pub seed: u64,
    /// Added to each head's Philox subsequence: a call uses `offset .. offset + B * Hq`, so independent
    /// masks for consecutive calls advance it by at least that (torch style).
    pub offset: u64,
}

/// Kernel selection for A/B comparisons and tests of paths small problems would not take. The
/// environment can force each for a whole process (`FLASH_ATTN_NO_WGMMA`, `FLASH_ATTN_BWD_CHAIN_ALL`,
/// `FLASH_ATTN_FWD_NO_WS`, `FLASH_ATTN_BWD_NO_WS`, `FLASH_ATTN_BWD_ORDERED_ALL`, any value, read once).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KernelChoice {
    /// Keep Hopper on the mma.sync kernels instead of the wgmma ones.
    pub no_wgmma: bool,
    /// The Hopper backward walks every key block of a (sequence, kv head) in one CTA, which it otherwise
    /// does only where that measured faster.
    pub bwd_chain_all: bool,
    /// Keep the Hopper forward on the wgmma kernel without warp specialization (cp.async copies by every
    /// thread, one CTA per row block) instead of the warp-specialized one (bulk tensor copies, a producer
    /// warpgroup, two consumer warpgroups, persistent grid), which is the default where the copy engine
    /// can address the operands.
    pub fwd_no_ws: bool,
    /// Keep the Hopper backward (head dims 64, 96, 128) on the wgmma dK/dV kernel without warp
    /// specialization (cp.async copies by every thread) instead of the warp-specialized one (bulk tensor
    /// copies by a producer warpgroup), the default mode's kernel where the copy engine can address the
    /// operands.
    pub bwd_no_ws: bool,
    /// Run the deterministic Hopper backward in order (one dq accumulator and turn counters) at every
    /// head dim where `dispatch::bwd_ordered_by_default` would not (since the ordered ws twin's bulk
    /// reductions it does at every head dim: kept for A/B runs and the suites); the split copies still run
    /// where the ordered mode has no kernel (ALiBi or dropout at 64-128) or no lengths (varlen without
    /// max_seqlen).
    pub bwd_ordered_all: bool,
}

/// A strided view of caller memory: what the raw layer takes for every tensor argument.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    /// Address of the view's first element: device memory for `Target::Cuda`, host memory for
    /// `Target::Cpu`.
    pub addr: u64,
    pub dtype: DType,
    pub shape: &'a [usize],
    /// Strides in elements, one per dimension.
    pub strides: &'a [usize],
}

impl View<'_> {
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Elements from the first to one past the last element the view reaches (0 when empty), or `None`
    /// when that does not fit usize.
    pub fn span(&self) -> Option<usize> {
        if self.shape.contains(&0) {
            return Some(0);
        }
        self.shape.iter().zip(self.strides).try_fold(1usize, |acc, (&n, &s)| (n - 1).checked_mul(s).and_then(|x| x.checked_add(acc)))
    }
}

/// The packed-sequence lengths of a raw varlen call, in the call's memory (never read back from a
/// device).
#[derive(Clone, Copy, Debug)]
pub struct VarlenViews<'a> {
    /// int32 `[B+1]`: sequence b's queries are rows `cu_seqlens_q[b]..cu_seqlens_q[b+1]` of q.
    pub cu_seqlens_q: View<'a>,
    /// int32 `[B+1]`: sequence b's keys are rows `cu_seqlens_k[b]..cu_seqlens_k[b+1]` of k and v.
    pub cu_seqlens_k: View<'a>,
    /// At least every (used) query length; `None`: not known (see `max_seqlen_k`).
    pub max_seqlen_q: Option<usize>,
    /// At least every (used) key length. `None` (either): nothing needs the lengths on the host, and no
    /// call synchronizes. The forward and the default backward then size their grids from the row counts
    /// (slot scheduling: each block finds its sequence and row block in cu_seqlens on the device); a
    /// forward with ALiBi or dropout and the deterministic backward schedule by the mean lengths (total
    /// rows / B), their blocks striding over longer sequences. Only `s_dmask`, whose shape they set,
    /// needs both.
    pub max_seqlen_k: Option<usize>,
    /// int32 `[B]`: only the first `seqused_q[b]` rows of slot b are real; the rest are written as 0.
    pub seqused_q: Option<View<'a>>,
    /// int32 `[B]`: only the first `seqused_k[b]` keys of slot b are attended to.
    pub seqused_k: Option<View<'a>>,
}

/// The packed-sequence lengths of a varlen call over a paged K/V cache, in the call's memory: k and v
/// are `[num_blocks, page_size, Hk, D]`, and key t of sequence b is row `t % page_size` of block
/// `block_table[b][t / page_size]`.
#[derive(Clone, Copy, Debug)]
pub struct PagedVarlenViews<'a> {
    /// int32 `[B+1]`: sequence b's queries are rows `cu_seqlens_q[b]..cu_seqlens_q[b+1]` of q.
    pub cu_seqlens_q: View<'a>,
    /// int32 `[B+1]`: sequence b has `cu_seqlens_k[b+1] - cu_seqlens_k[b]` keys (where they are is the
    /// block table's business). `None`: `seqused_k` gives the key counts and is required.
    pub cu_seqlens_k: Option<View<'a>>,
    /// At least every (used) query length; `None`: not known (as in `VarlenViews`).
    pub max_seqlen_q: Option<usize>,
    /// At least every key count; `None`: not known (as in `VarlenViews`).
    pub max_seqlen_k: Option<usize>,
    /// int32 `[B]`: only the first `seqused_q[b]` rows of slot b are real; the rest are written as 0.
    pub seqused_q: Option<View<'a>>,
    /// int32 `[B]`: sequence b attends to its first `seqused_k[b]` keys.
    pub seqused_k: Option<View<'a>>,
    /// int32 `[B, max_blocks]` (last dim contiguous): the pages of each sequence, in order.
    pub block_table: View<'a>,
}

/// The tensors of a KV-cache forward (flash-attn's `flash_attn_with_kvcache`): attention of q over the
/// cache after appending the new keys and values to it in place.
///
/// Row b of the batch sees the cache entries at positions `cache_leftpad[b]..cache_seqlens[b] + S_new`:
/// first `k_new[b]`, `v_new[b]` are written at positions `cache_seqlens[b]..` (k_new rotated first when
/// rotary is given), then q (rotated too) attends to the `cache_seqlens[b] - cache_leftpad[b] + S_new`
/// keys, bottom-right aligned as everywhere else.
#[derive(Clone, Copy, Debug)]
pub struct KvCacheViews<'a> {
    /// `[B, Sq, Hq, D]`.
    pub q: View<'a>,
    /// `[B_cache, S_cache, Hk, D]`, or `[num_blocks, page_size, Hk, D]` with `block_table`. Written (the
    /// appended rows only) when `k_new` is given.
    pub k_cache: View<'a>,
    pub v_cache: View<'a>,
    /// int32 `[B]`: the end of row b's valid cache entries before the append.
    pub cache_seqlens: View<'a>,
    /// int32 `[B, max_blocks]`: a paged cache, as in `PagedVarlenViews`.
    pub block_table: Option<View<'a>>,
    /// `[B, S_new, Hk, D]`, q's dtype: keys and values to append (both or neither).
    pub k_new: Option<View<'a>>,
    pub v_new: Option<View<'a>>,
    /// `[S_ro, rotary_dim / 2]`, q's dtype or f32 (both the same): rotary embedding of the first
    /// `rotary_dim` features of q and k_new (both or neither). The cached keys are taken as already
    /// rotated.
    pub rotary_cos: Option<View<'a>>,
    pub rotary_sin: Option<View<'a>>,
    /// int32 `[B]`: the cache row batch entry b uses (contiguous caches only; default b).
    pub cache_batch_idx: Option<View<'a>>,
    /// int32 `[B]`: the first valid cache entry of each row (default 0).
    pub cache_leftpad: Option<View<'a>>,
    /// f32 `[Hq]` or `[B, Hq]`: ALiBi as in `FwdViews`, over each row's `Sk = cache_seqlens[b] -
    /// cache_leftpad[b] + S_new` keys.
    pub alibi_slopes: Option<View<'a>>,
    /// `[B, Sq, Hq, D]` in q's dtype.
    pub out: View<'a>,
    /// Contiguous f32 `[B, Hq, Sq]`.
    pub lse: View<'a>,
}

impl<'a> KvCacheViews<'a> {
    /// A dense forward (`FwdViews`: q `[B, Sq, Hq, D]`, k and v `[B, Sk, Hk, D]`) as a KV-cache call over k
    /// and v in place: the same result up to the rounding of split keys' merge, nothing appended (k and v
    /// are read only), `cache_seqlens` int32 `[B]` holding Sk for every row. `raw::fwd_decode` runs the same
    /// without a lengths tensor (what the adapters run where `raw::dense_fwd_decodes`: decoding steps on CUDA).
    pub fn of_dense(t: &FwdViews<'a>, cache_seqlens: View<'a>) -> KvCacheViews<'a> {
        KvCacheViews {
            q: t.q,
            k_cache: t.k,
            v_cache: t.v,
            cache_seqlens,
            block_table: None,
            k_new: None,
            v_new: None,
            rotary_cos: None,
            rotary_sin: None,
            cache_batch_idx: None,
            cache_leftpad: None,
            alibi_slopes: t.alibi_slopes,
            out: t.out,
            lse: t.lse,
        }
    }

    /// Every view of the call, named as its argument.
    pub(crate) fn named(&self) -> impl Iterator<Item = (&'static str, View<'a>)> {
        let given = [("q", self.q), ("k_cache", self.k_cache), ("v_cache", self.v_cache), ("cache_seqlens", self.cache_seqlens), ("out", self.out), ("lse", self.lse)];
        let optional = [
            ("block_table", self.block_table),
            ("k_new", self.k_new),
            ("v_new", self.v_new),
            ("rotary_cos", self.rotary_cos),
            ("rotary_sin", self.rotary_sin),
            ("cache_batch_idx", self.cache_batch_idx),
            ("cache_leftpad", self.cache_leftpad),
            ("alibi_slopes", self.alibi_slopes),
        ];
        given.into_iter().chain(optional.into_iter().filter_map(|(n, v)| v.map(|v| (n, v))))
    }
}

/// The KV-cache forward's options beyond `AttnOptions`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvCacheOptions {
    /// Rotary pairs are features (2i, 2i+1) (GPT-J style) instead of (i, i + rotary_dim/2) (GPT-NeoX).
    pub rotary_interleaved: bool,
    /// Split each row's keys into this many ranges, attend to each separately and merge the partial
    /// results (`combine`): more parallel work for few long rows (decode). 0 = a heuristic from the
    /// problem's size and the processor count (`problem::num_splits_heuristic`).
    pub num_splits: usize,
}

/// The tensors of a combine: `n` partial attention results over disjoint key sets of the same queries
/// (splits of the key range, or the shards of context parallelism), merged into the result over all of
/// them.
#[derive(Clone, Copy, Debug)]
pub struct CombineViews<'a> {
    /// `[n, B, Sq, H, D]` (or packed `[n, T, H, D]`), f16, bf16 or f32.
    pub partial_out: View<'a>,
    /// f32 `[n, B, H, Sq]` (or `[n, H, T]`), natural-log LSE; -inf marks a partial that saw no key.
    pub partial_lse: View<'a>,
    /// `[B, Sq, H, D]` (`[T, H, D]`), f16, bf16 or f32.
    pub out: View<'a>,
    /// Contiguous f32 `[B, H, Sq]` (`[H, T]`).
    pub lse: View<'a>,
}

/// The tensors of a forward call: inputs q, k, v (and ALiBi's slopes) and the outputs it writes, out
/// and lse (and the probabilities).
#[derive(Clone, Copy, Debug)]
pub struct FwdViews<'a> {
    pub q: View<'a>,
    pub k: View<'a>,
    pub v: View<'a>,
    pub out: View<'a>,
    pub lse: View<'a>,
    /// f32 `[Hq]` or `[B, Hq]` (last dimension contiguous): ALiBi. The score of query i and key j of a
    /// (Sq, Sk) sequence becomes `softcap(scale * q_i . k_j) - slope * |i + Sk - Sq - j|` (flash-attn 2's
    /// definition; the bias after scale and softcap), in every mask mode, and the LSE is that of these
    /// scores. Varlen: each sequence's own (used) lengths. The CPU path checks that the slopes are
    /// finite; on CUDA (device memory, like cu_seqlens) their values are not checked.
    pub alibi_slopes: Option<View<'a>>,
    /// flash-attn's `return_attn_probs`: written with the softmax probabilities P = exp(s - lse)
    /// (normalized, before dropout's 1 / (1 - p)), negated where dropout dropped them; +0 where the mask
    /// hides a key and in padding. `[B, Hq, Sq, Sk]`, varlen `[B, Hq, max_seqlen_q, max_seqlen_k]` (each
    /// sequence at the top left of its block, the rest 0); f32 or q's dtype, last dimension contiguous.
    /// O(S^2) memory and time: for testing and debugging.
    pub s_dmask: Option<View<'a>>,
}

/// The tensors of a backward call: the forward's inputs, its out and lse, the gradient of out (dout), and
/// the gradients it writes, dq, dk, dv (every element written; padding rows and unseen keys get 0).
#[derive(Clone, Copy, Debug)]
pub struct BwdViews<'a> {
    pub dout: View<'a>,
    pub q: View<'a>,
    pub k: View<'a>,
    pub v: View<'a>,
    pub out: View<'a>,
    pub lse: View<'a>,
    pub dq: View<'a>,
    pub dk: View<'a>,
    pub dv: View<'a>,
    /// The forward's ALiBi slopes (`FwdViews::alibi_slopes`). The bias depends on neither q nor k: it
    /// shifts P only, and adds nothing to their gradients.
    pub alibi_slopes: Option<View<'a>>,
}

/// Caller-provided scratch memory for the backward, in the call's memory, 256-byte aligned, at least
/// `bwd_workspace_bytes` long. Its contents need no initialization and are garbage afterwards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Workspace {
    pub addr: u64,
    pub bytes: usize,
}

/// Where a raw call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Every view is host memory; the CPU path runs and the call returns when it is done.
    Cpu,
    /// Every view is device memory of CUDA device `ordinal`, in its primary context. The kernels are
    /// queued on `stream`, a raw `CUstream` of that context (0 = the legacy default stream, 2 = the
    /// per-thread default stream), and the call returns without waiting.
    Cuda { ordinal: usize, stream: usize },
}

impl Target {
    pub fn device(self) -> Device {
        match self {
            Target::Cpu => Device::Cpu,
            Target::Cuda { ordinal, .. } => Device::Cuda(ordinal),
        }
    }
}

/// The NULL stream: the legacy default stream (`CU_STREAM_LEGACY`, 1, is the same stream).
pub const STREAM_LEGACY: usize = 0;
/// The calling thread's per-thread default stream (`CU_STREAM_PER_THREAD`).
pub const STREAM_PER_THREAD: usize = 2;
