//! The table of forward kernel variants: tile shapes per head dim, and the export name of each
//! (head dim, dtype) entry point. Pure data, compiled for the host too (dispatch.rs reads the same
//! shapes to size grids and shared memory), so the two sides cannot disagree.

/// Tile shape of one variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FwdConfig {
    pub head_dim: usize,
    /// m16 tiles per warp.
    pub m_tiles: usize,
    /// Warps per block; each group of `key_warps` owns `16 * m_tiles` query rows.
    pub warps: usize,
    /// Warps that share rows and split each K/V tile's keys between them (their online softmax states
    /// merged at the end; the `_decode` kernels), 1 elsewhere.
    pub key_warps: usize,
    /// Keys per K/V tile.
    pub block_n: usize,
    /// Keep the warp's Q fragments in registers across K/V tiles.
    pub q_in_regs: bool,
}

impl FwdConfig {
    pub const fn block_m(&self) -> usize {
        16 * self.m_tiles * (self.warps / self.key_warps)
    }
    pub const fn threads(&self) -> usize {
        32 * self.warps
    }
    /// Shared-memory row pitch in bytes: one 16-byte chunk of padding per row, so the 8 rows an
    /// `ldmatrix` reads fall in 8 different bank groups (the pitch is an odd number of chunks).
    pub const fn row_bytes(&self) -> usize {
        row_pitch_bytes(self.head_dim)
    }
    /// Dynamic shared memory: the Q tile and two stages of K and V tiles; with key warps (the decode
    /// kernels) one K and one V buffer, loaded in turns (the merge's scratch reuses them).
    pub const fn smem_bytes(&self) -> usize {
        let stages = if self.key_warps > 1 { 1 } else { 2 };
        (self.block_m() + 2 * stages * self.block_n) * self.row_bytes()
    }
}

/// Shared-memory pitch of a row of `head_dim` 16-bit values: one 16-byte chunk of padding (see
/// `FwdConfig::row_bytes`).
pub const fn row_pitch_bytes(head_dim: usize) -> usize {
    (head_dim + 8) * 2
}


/// Element types with a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelDType {
    F16,
    BF16,
}

/// Every head dim the kernels take, one line each, with all of its tile shapes:
///
/// ```text
/// (head dim,
///  [mma.sync forward: m16 tiles per warp, warps, keys per tile, Q fragments in registers (q_regs) or -],
///  [backward dK/dV: keys per block, queries per step, warps, key tiles per warp, dq tiles per warp],
///  keys per tile of the deterministic dq kernel,
///  Hopper forward (wgmma and warp-specialized kernels): keys per tile, or - (none),
///  Hopper dK/dV kernel: hopper_bwd, or - (none))
/// ```
///
/// Every head dim has the mma.sync forward and backward. The shapes (`fwd_config`, `fwd_wg_config`,
/// `bwd_config`, `dq_config`), the `for_each_*_variant` lists and so every kernel entry point and host
/// lookup come from here: a new head dim is a line here (plus, on Hopper, the wgmma shapes it needs).
#[macro_export]
macro_rules! head_dim_table {
    ($expand:ident!($($args:tt)*)) => {
        $crate::$expand! { $($args)*;
            (32, [2, 4, 64, q_regs], [128, 64, 8, 2, 1], 64, -, -),
            (64, [2, 4, 64, q_regs], [128, 64, 8, 2, 2], 64, 128, hopper_bwd),
            (96, [2, 4, 64, -], [128, 64, 8, 2, 1], 64, 128, hopper_bwd),
            (128, [2, 4, 64, -], [128, 64, 8, 2, 2], 64, 128, hopper_bwd),
            (192, [1, 8, 64, -], [64, 64, 8, 2, 2], 32, 64, hopper_bwd),
            (256, [1, 8, 64, -], [64, 64, 8, 2, 2], 32, 64, hopper_bwd),
        }
    };
}

/// The tile-shape functions from the table's lines (one `match` arm per head dim; head dims outside
/// the table get the largest head dims' shapes, and no Hopper forward).
#[doc(hidden)]
#[macro_export]
macro_rules! __variants_shapes {
    (; $(($d:literal, [$mt:literal, $w:literal, $bn:literal, $qr:tt], [$bbn:literal, $bbm:literal, $bw:literal, $kt:literal, $dqt:literal], $dqn:literal, $hf:tt, $hb:tt)),* $(,)?) => {
        /// The mma.sync forward's shape for each head dim, chosen by measurement on an H200
        /// (benches/RESULTS.md): two m16 tiles per warp halve the K/V shared-memory reads per tensor-core
        /// op where the registers allow it; the large head dims trade that for eight warps instead.
        pub const fn fwd_config(head_dim: usize) -> FwdConfig {
            match head_dim {
                $($d => FwdConfig { head_dim, m_tiles: $mt, warps: $w, key_warps: 1, block_n: $bn, q_in_regs: $crate::__variants_flag!($qr) },)*
                _ => FwdConfig { head_dim, m_tiles: 1, warps: 8, key_warps: 1, block_n: 64, q_in_regs: false },
            }
        }

        /// Hopper (sm_90a module) forward: two warpgroups own 128 query rows (16 per warp, as `m_tiles:
        /// 1, warps: 8`), wgmma products over 128-key tiles (64 at head dims 192 and 256) in
        /// 128-byte-swizzled shared memory.
        pub const fn fwd_wg_config(head_dim: usize) -> Option<FwdConfig> {
            match head_dim {
                $($d => $crate::__variants_wg!(head_dim, $hf),)*
                _ => None,
            }
        }

        /// Backward tile shapes per head dim (dQ columns per warp must be a multiple of 16: head dims 32
        /// and 96 keep one query tile per warp there).
        pub const fn bwd_config(head_dim: usize) -> BwdConfig {
            match head_dim {
                $($d => BwdConfig { head_dim, block_n: $bbn, block_m: $bbm, warps: $bw, key_tiles: $kt, dq_tiles: $dqt },)*
                _ => BwdConfig { head_dim, block_n: 64, block_m: 64, warps: 8, key_tiles: 2, dq_tiles: 2 },
            }
        }

        /// Tile shape of the deterministic dq kernel: one m16 tile per warp, like a forward variant
        /// walking K/V tiles, with Q and dO resident.
        pub const fn dq_config(head_dim: usize) -> FwdConfig {
            let block_n = match head_dim {
                $($d => $dqn,)*
                _ => 32,
            };
            FwdConfig { head_dim, m_tiles: 1, warps: 4, key_warps: 1, block_n, q_in_regs: false }
        }
    };
}

/// `q_regs` -> true, `-` -> false.
#[doc(hidden)]
#[macro_export]
macro_rules! __variants_flag {
    (q_regs) => {
        true
    };
    (-) => {
        false
    };
}

/// A Hopper forward column: `-` -> None, N -> the wgmma shape over N-key tiles.
#[doc(hidden)]
#[macro_export]
macro_rules! __variants_wg {
    ($h:ident, -) => {
        None
    };
    ($h:ident, $n:literal) => {
        Some(FwdConfig { head_dim: $h, m_tiles: 1, warps: 8, key_warps: 1, block_n: $n, q_in_regs: false })
    };
}

head_dim_table!(__variants_shapes!());

/// `$m!` over `(head_dim, dtype, export name)` for head dims `$d`: every bf16 entry, then every f16 one,
/// named `<stem><head dim>_<dtype>`.
#[doc(hidden)]
#[macro_export]
macro_rules! __variants_emit {
    // Head dims as token trees (not `literal` fragments, which later macros could not match against a
    // number: kernels-gpu/src/fwd/ws.rs's `fwd_ws_dropout_kernel!` leaves out 96).
    ($m:ident, $stem:literal; $($d:tt)*) => {
        $m! {
            $(($d, BF16, concat!($stem, stringify!($d), "_bf16")),)*
            $(($d, F16, concat!($stem, stringify!($d), "_f16")),)*
        }
    };
}

/// Every head dim of the table.
#[doc(hidden)]
#[macro_export]
macro_rules! __variants_all {
    ($m:ident, $stem:literal; $(($d:literal, $($shapes:tt)*)),* $(,)?) => {
        $crate::__variants_emit!($m, $stem; $($d)*);
    };
}

/// The head dims with a Hopper forward.
#[doc(hidden)]
#[macro_export]
macro_rules! __variants_hopper_fwd {
    ($m:ident, $stem:literal; $($rows:tt)*) => { $crate::__variants_hopper_fwd!(@ $m, $stem, []; $($rows)*); };
    (@ $m:ident, $stem:literal, [$($acc:tt)*]; ($d:tt, $f:tt, $b:tt, $q:tt, -, $hb:tt), $($rest:tt)*) => {
        $crate::__variants_hopper_fwd!(@ $m, $stem, [$($acc)*]; $($rest)*);
    };
    (@ $m:ident, $stem:literal, [$($acc:tt)*]; ($d:tt, $f:tt, $b:tt, $q:tt, $n:literal, $hb:tt), $($rest:tt)*) => {
        $crate::__variants_hopper_fwd!(@ $m, $stem, [$($acc)* $d]; $($rest)*);
    };
    (@ $m:ident, $stem:literal, [$($acc:tt)*];) => { $crate::__variants_emit!($m, $stem; $($acc)*); };
}

/// The head dims marked `hopper_bwd`.
#[doc(hidden)]
#[macro_export]
macro_rules! __variants_hopper_bwd {
    ($m:ident, $stem:literal; $($rows:tt)*) => { $crate::__variants_hopper_bwd!(@ $m, $stem, []; $($rows)*); };
    // Head dims as token trees (kernels-gpu/src/bwd/wg.rs's `mods_det!` matches 64, 96, 128).
    (@ $m:ident, $stem:literal, [$($acc:tt)*]; ($d:tt, $f:tt, $b:tt, $q:tt, $hf:tt, hopper_bwd), $($rest:tt)*) => {
        $crate::__variants_hopper_bwd!(@ $m, $stem, [$($acc)* $d]; $($rest)*);
    };
    (@ $m:ident, $stem:literal, [$($acc:tt)*]; ($d:tt, $f:tt, $b:tt, $q:tt, $hf:tt, -), $($rest:tt)*) => {
        $crate::__variants_hopper_bwd!(@ $m, $stem, [$($acc)*]; $($rest)*);
    };
    (@ $m:ident, $stem:literal, [$($acc:tt)*];) => { $crate::__variants_emit!($m, $stem; $($acc)*); };
}

/// The backward's `(head_dim, dtype, dk/dv kernel, deterministic dq kernel)` over every head dim.
#[doc(hidden)]
#[macro_export]
macro_rules! __variants_bwd {
    ($m:ident; $(($d:literal, $($shapes:tt)*)),* $(,)?) => {
        $m! {
            $(($d, BF16, concat!("flash_bwd_hdim", stringify!($d), "_bf16"), concat!("flash_bwd_dq_hdim", stringify!($d), "_bf16")),)*
            $(($d, F16, concat!("flash_bwd_hdim", stringify!($d), "_f16"), concat!("flash_bwd_dq_hdim", stringify!($d), "_f16")),)*
        }
    };
}

/// The variant table: `(head_dim, dtype, export name)`, written once. `fwd/mod.rs` expands it into the
/// kernel entry points and `fwd_kernel_name` into the host's lookup, so a name is never typed twice.
/// Every forward entry point has a twin over paged K/V, its name with `_paged` (`fwd_paged_kernel_name`,
/// and likewise for the wg and ws tables).
#[macro_export]
macro_rules! for_each_fwd_variant {
    ($m:ident) => {
        $crate::head_dim_table!(__variants_all!($m, "flash_fwd_hdim"));
    };
}

macro_rules! name_lookup {
    ($(($d:literal, $dt:ident, $name:expr)),* $(,)?) => {
        /// Export name of the forward kernel for `(head_dim, dtype)`, if there is one.
        pub fn fwd_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some($name); })*
            None
        }
        /// Its twin over paged K/V (`FwdParams::block_table`): the export name with `_paged`.
        pub fn fwd_paged_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some(concat!($name, "_paged")); })*
            None
        }
        /// Paged K/V with score modifiers: the export name with `_paged_mods`.
        pub fn fwd_paged_mods_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some(concat!($name, "_paged_mods")); })*
            None
        }
        /// Decode over a KV cache with q packed (`FwdParams::q_pack`): the export name with `_decode`.
        pub fn fwd_decode_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some(concat!($name, "_decode")); })*
            None
        }
        /// The decode kernel that writes out and lse itself (`CombineParams` its second parameter; one
        /// split, or a cluster of them): the export name with `_decode_fin`.
        pub fn fwd_decode_fin_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some(concat!($name, "_decode_fin")); })*
            None
        }
        /// Its twin with score modifiers (`FwdParams::mods`: ALiBi, dropout): the export name with `_mods`.
        pub fn fwd_mods_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some(concat!($name, "_mods")); })*
            None
        }
    };
}
for_each_fwd_variant!(name_lookup);


/// Dynamic shared memory of the Hopper forward: Q, then two slots of K and of V (swizzled), each row
/// in whole 64-column groups (head dim 96: the second group half used).
pub const fn fwd_wg_smem_bytes(c: &FwdConfig) -> usize {
    (c.block_m() + 4 * c.block_n) * c.head_dim.div_ceil(64) * 64 * 2
}

/// The Hopper forward's entry points (sm_90a module only), like `for_each_fwd_variant`.
#[macro_export]
macro_rules! for_each_fwd_wg_variant {
    ($m:ident) => {
        $crate::head_dim_table!(__variants_hopper_fwd!($m, "flash_fwd_wg_hdim"));
    };
}

macro_rules! wg_name_lookup {
    ($(($d:literal, $dt:ident, $name:expr)),* $(,)?) => {
        /// Export name of the Hopper forward kernel for `(head_dim, dtype)`, if there is one.
        pub fn fwd_wg_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some($name); })*
            None
        }
        /// Its twin over paged K/V (`FwdParams::block_table`): the export name with `_paged`. (The wg
        /// kernel has no twins with score modifiers: those run on the warp-specialized kernel, or the
        /// mma.sync one.)
        pub fn fwd_wg_paged_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some(concat!($name, "_paged")); })*
            None
        }
    };
}
for_each_fwd_wg_variant!(wg_name_lookup);

/// The Hopper warp-specialized forward (fwd/ws.rs): a producer warpgroup (one thread issues the bulk
/// tensor copies) and two consumer warpgroups of 64 query rows each over the tiles of `fwd_wg_config`,
/// on a persistent grid.
pub const FWD_WS_THREADS: usize = 384;
/// Threads of a warp-specialized forward over tiles of `block_m` query rows: the producer warpgroup and
/// a consumer warpgroup per 64 rows (384 for the 128-row tiles, 512 for the tall ones).
pub const fn fwd_ws_threads(block_m: usize) -> usize {
    128 + 2 * block_m
}
const _: () = assert!(fwd_ws_threads(128) == FWD_WS_THREADS);
/// Query rows of the tall tiles (`for_each_fwd_ws_tall_variant`): three consumer warpgroups.
pub const FWD_WS_TALL_ROWS: usize = 192;
/// Bytes after the tiles for the pipeline's barriers (Q full / empty, two stages each of K and V full /
/// empty: 10 barriers of 8 bytes) and the tile ring (two stages' full / empty barriers and decoded tiles
/// of 12 bytes: 56 bytes), rounded up (the O stage, where there is one, from `FWD_WS_O_STAGE_AT`).
pub const FWD_WS_BARRIER_BYTES: usize = 256;
/// The warp-specialized forward's tile scheduler walks the (sequence, head) pairs in sections whose K
/// and V take at most this many bytes (a third of the H100 / H200 L2, so that the section being
/// finished and the next one both stay in it).
/// (Read by the device code only.)
#[cfg_attr(not(target_os = "cuda"), allow(dead_code))]
pub const FWD_WS_L2_SECTION_BYTES: usize = 16 << 20;
/// Entries of the warp-specialized forward's tile counters (a module global, 512 KB: each launch draws
/// its tiles from entry `FwdParams::tile_slot`, and its last block to finish sets the entry back to
/// zero). The host gives each stream an entry of its own and each captured launch one no other launch
/// gets (`fwd_tile_slot` in launch.rs), so that no two launches in flight at once share one.
pub const FWD_WS_TILE_SLOTS: usize = 65536;

/// Rows per bulk tensor copy of a paged K/V tile in the warp-specialized forward: the largest power of
/// two dividing both the page size and `block_n` (rows of one box lie in one page, and the boxes of a
/// tile start at page offsets that are multiples of it): page 16 -> 16-row boxes, 8 per 128-key tile;
/// page >= 128 (a multiple of 128) -> one box per tile. The host takes paged problems to the
/// warp-specialized kernel only where this is at least `TMA_PAGE_BOX_MIN` (boxes of whole 8-row swizzle
/// atoms, 1024-byte aligned in the tile, the layout one whole-tile box gives); other page sizes run on
/// the cp.async kernels.
pub const fn tma_page_box_rows(page_size: usize, block_n: usize) -> usize {
    if page_size == 0 {
        return block_n;
    }
    let low = page_size & page_size.wrapping_neg();
    if low < block_n { low } else { block_n }
}
pub const TMA_PAGE_BOX_MIN: usize = 8;

/// Whether the warp-specialized forward at `head_dim` over `block_n`-key tiles stages O through shared
/// memory of its own (`fwd_ws_o_stage_bytes`): each consumer warpgroup writes its 64 rows there, then its
/// leader hands them to the copy engine (bulk tensor stores, `FwdParams::o_tma`), or the threads store
/// them 16 bytes a thread, whole rows per warp, instead of 4 bytes a thread straight from the
/// accumulator's fragments. Head dims 64 and 128 over 128-key tiles (benches/RESULTS.md, against the
/// direct stores: the threads' stores at 128 S=512 0.95x the time, S=2048 0.98-0.99x, S=8192 1.00x, at 64
/// 1.005-1.008x; the bulk stores another 0.96x at 128 S=512 and 0.975x at 64; at 96 the threads' 1.10-1.13x
/// at S=512, so not there), 192 and 256 over 64-key tiles (at 256 in two rounds of 128 columns,
/// `fwd_ws_o_stage_cols`: the whole 64 KiB has no room beside the tiles); not the 112-key wide tiles.
pub const fn fwd_ws_o_staged(head_dim: usize, block_n: usize) -> bool {
    match head_dim {
        64 | 128 => block_n >= 128,
        192 | 256 => block_n == 64,
        _ => false,
    }
}

/// Columns of the O stage (`fwd_ws_o_staged`): the head dim, but 128 at 256, whose epilogue stages and
/// stores O in two rounds of 128 columns.
pub const fn fwd_ws_o_stage_cols(head_dim: usize) -> usize {
    if head_dim > 128 && head_dim % 128 == 0 { 128 } else { head_dim }
}

/// Bytes of the O stage (`fwd_ws_o_staged`): `block_m` rows of `fwd_ws_o_stage_cols` elements, or none.
pub const fn fwd_ws_o_stage_bytes(head_dim: usize, block_n: usize, block_m: usize) -> usize {
    if fwd_ws_o_staged(head_dim, block_n) { block_m * fwd_ws_o_stage_cols(head_dim) * 2 } else { 0 }
}

/// Where the O stage starts past the tiles: after the barriers (`FWD_WS_BARRIER_BYTES`), 1024-byte
/// aligned, as the 128-byte swizzle of its bulk tensor stores (`FwdParams::o_tma`) needs.
pub const FWD_WS_O_STAGE_AT: usize = 1024;
const _: () = assert!(FWD_WS_BARRIER_BYTES <= FWD_WS_O_STAGE_AT);

/// Dynamic shared memory of the warp-specialized forward: the tiles of `fwd_wg_smem_bytes`, then the
/// barriers, then (from `FWD_WS_O_STAGE_AT`) the O stage (`fwd_ws_o_stage_bytes`).
pub const fn fwd_ws_smem_bytes(c: &FwdConfig) -> usize {
    let o = fwd_ws_o_stage_bytes(c.head_dim, c.block_n, c.block_m());
    fwd_wg_smem_bytes(c) + if o > 0 { FWD_WS_O_STAGE_AT + o } else { FWD_WS_BARRIER_BYTES }
}

/// The warp-specialized forward's entry points (sm_90a module only), like `for_each_fwd_variant`.
#[macro_export]
macro_rules! for_each_fwd_ws_variant {
    ($m:ident) => {
        $crate::head_dim_table!(__variants_hopper_fwd!($m, "flash_fwd_ws_hdim"));
    };
}

macro_rules! ws_name_lookup {
    ($(($d:literal, $dt:ident, $name:expr)),* $(,)?) => {
        /// Export name of the warp-specialized forward kernel for `(head_dim, dtype)`, if there is one.
        pub fn fwd_ws_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some($name); })*
            None
        }
        /// Its twin over paged K/V (`FwdParams::block_table`): the export name with `_paged`.
        pub fn fwd_ws_paged_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some(concat!($name, "_paged")); })*
            None
        }
        /// Paged K/V with score modifiers: the export name with `_paged_mods`.
        pub fn fwd_ws_paged_mods_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some(concat!($name, "_paged_mods")); })*
            None
        }
        /// Its twin with score modifiers (`FwdParams::mods`): the export name with `_mods`.
        pub fn fwd_ws_mods_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some(concat!($name, "_mods")); })*
            None
        }
        /// The `_mods` twin for ALiBi without dropout, its dropout compiled out: the export name with
        /// `_alibi`.
        pub fn fwd_ws_alibi_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some(concat!($name, "_alibi")); })*
            None
        }
        /// The `_mods` twin for dropout without ALiBi, its ALiBi code compiled out: the export name with
        /// `_dropout`. None at head dim 96, which has no such copy (kernels-gpu/src/fwd/ws.rs: it spilled).
        pub fn fwd_ws_dropout_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && head_dim != 96 && dtype == KernelDType::$dt { return Some(concat!($name, "_dropout")); })*
            None
        }
    };
}
for_each_fwd_ws_variant!(ws_name_lookup);

/// The warp-specialized forward's wide-tile kernels (contiguous K/V; export name `_wide`, `_wide_alibi`
/// for ALiBi without dropout, `_wide_dropout` for dropout without ALiBi): (head dim, keys per tile, dtype, name). At head dim 192, two stages of 112-key K and V
/// tiles beside Q fill 216 KB of shared memory, and every per-tile cost (barriers, row reductions, the
/// products' issue) comes 43% less often than over 64 keys. Below `FWD_WS_WIDE_MIN_KEYS` keys the
/// partly filled last tile costs more than that saves, and the 64-key kernel runs (benches/RESULTS.md;
/// measured there and not kept: 80 keys at head dim 256, 176 at 128).
#[macro_export]
macro_rules! for_each_fwd_ws_wide_variant {
    ($m:ident) => {
        $m! {
            (192, 112, BF16, "flash_fwd_ws_hdim192_bf16_wide"),
            (192, 112, F16, "flash_fwd_ws_hdim192_f16_wide"),
        }
    };
}

/// The warp-specialized forward's tall-tile kernels (contiguous K/V; plain, and `_alibi` / `_dropout`
/// copies for one modifier alone; export names `flash_fwd_ws3_*`): (head dim, dtype, name). Tiles of `FWD_WS_TALL_ROWS` query rows, three consumer
/// warpgroups of 64 rows taking turns at the tensor cores, 512 threads (160 registers per consumer
/// thread): at head dim 64, where a consumer warp's tile waits on its own dependencies more than on the
/// issue slots, a third warpgroup's warps fill the gaps, and K / V tiles serve 1.5x the rows.
#[macro_export]
macro_rules! for_each_fwd_ws_tall_variant {
    ($m:ident) => {
        $m! {
            (64, BF16, "flash_fwd_ws3_hdim64_bf16"),
            (64, F16, "flash_fwd_ws3_hdim64_f16"),
        }
    };
}

macro_rules! ws_tall_lookup {
    ($(($d:literal, $dt:ident, $name:expr)),* $(,)?) => {
        /// Export name and tiles of the tall-tile ws forward for `(head_dim, dtype)`, if there is one.
        pub fn fwd_ws_tall_kernel(head_dim: usize, dtype: KernelDType) -> Option<(&'static str, FwdConfig)> {
            let config = FwdConfig { warps: FWD_WS_TALL_ROWS / 16, m_tiles: 1, key_warps: 1, ..fwd_wg_config(head_dim)? };
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some(($name, config)); })*
            None
        }
        /// Its `_alibi` copy (ALiBi without dropout), with the same tiles.
        pub fn fwd_ws_tall_alibi_kernel(head_dim: usize, dtype: KernelDType) -> Option<(&'static str, FwdConfig)> {
            let config = FwdConfig { warps: FWD_WS_TALL_ROWS / 16, m_tiles: 1, key_warps: 1, ..fwd_wg_config(head_dim)? };
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some((concat!($name, "_alibi"), config)); })*
            None
        }
        /// Its `_dropout` copy (dropout without ALiBi), with the same tiles.
        pub fn fwd_ws_tall_dropout_kernel(head_dim: usize, dtype: KernelDType) -> Option<(&'static str, FwdConfig)> {
            let config = FwdConfig { warps: FWD_WS_TALL_ROWS / 16, m_tiles: 1, key_warps: 1, ..fwd_wg_config(head_dim)? };
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some((concat!($name, "_dropout"), config)); })*
            None
        }
    };
}
for_each_fwd_ws_tall_variant!(ws_tall_lookup);

/// Keys (`seqlen_k`; varlen: `max_seqlen_k`) from which a plain problem runs the wide-tile kernel.
pub const FWD_WS_WIDE_MIN_KEYS: usize = 2048;

/// Keys from which dropout alone runs the wide-tile kernel's `_dropout` copy (H200, hdim 192, against the
/// 64-key copy: 0.94-0.96x the time at 8192 keys, 1.00-1.05 at 2048; benches/RESULTS.md).
pub const FWD_WS_WIDE_DROPOUT_MIN_KEYS: usize = 8192;

macro_rules! ws_wide_lookup {
    ($(($d:literal, $bn:literal, $dt:ident, $name:expr)),* $(,)?) => {
        /// Keys per tile of the wide-tile ws forward at `head_dim`, if there is one.
        pub const fn fwd_ws_wide_block_n(head_dim: usize) -> Option<usize> {
            $(if head_dim == $d { return Some($bn); })*
            None
        }
        /// Export name and tiles of the wide-tile ws forward for `(head_dim, dtype)`, if there is one.
        pub fn fwd_ws_wide_kernel(head_dim: usize, dtype: KernelDType) -> Option<(&'static str, FwdConfig)> {
            let config = FwdConfig { block_n: fwd_ws_wide_block_n(head_dim)?, ..fwd_wg_config(head_dim)? };
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some(($name, config)); })*
            None
        }
        /// Its `_alibi` copy (ALiBi without dropout), with the same tiles.
        pub fn fwd_ws_wide_alibi_kernel(head_dim: usize, dtype: KernelDType) -> Option<(&'static str, FwdConfig)> {
            let config = FwdConfig { block_n: fwd_ws_wide_block_n(head_dim)?, ..fwd_wg_config(head_dim)? };
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some((concat!($name, "_alibi"), config)); })*
            None
        }
        /// Its `_dropout` copy (dropout without ALiBi), with the same tiles.
        pub fn fwd_ws_wide_dropout_kernel(head_dim: usize, dtype: KernelDType) -> Option<(&'static str, FwdConfig)> {
            let config = FwdConfig { block_n: fwd_ws_wide_block_n(head_dim)?, ..fwd_wg_config(head_dim)? };
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some((concat!($name, "_dropout"), config)); })*
            None
        }
    };
}
for_each_fwd_ws_wide_variant!(ws_wide_lookup);

/// Tile shape of one backward variant. A block owns `block_n` keys of one kv head and walks the query
/// blocks (`block_m` rows) of every q head of its group that see them. Warps are laid out `wn = block_n /
/// 16` along the keys times `wm` along the queries (S^T, dP^T) or along the head dim (dK, dV); for
/// dQ = dS K they are `block_m / 16` along the queries times the rest along the head dim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BwdConfig {
    pub head_dim: usize,
    pub block_n: usize,
    pub block_m: usize,
    pub warps: usize,
    /// m16 tiles of keys per warp: two halve the shared-memory reads per tensor-core op.
    pub key_tiles: usize,
    /// m16 tiles of queries per warp in dQ = dS K (likewise).
    pub dq_tiles: usize,
}

impl BwdConfig {
    pub const fn threads(&self) -> usize {
        32 * self.warps
    }
    /// Warps along the keys (`16 * key_tiles` keys each).
    pub const fn wn(&self) -> usize {
        self.block_n / (16 * self.key_tiles)
    }
    /// Warps along the queries in S^T (and along the head dim in dK/dV).
    pub const fn wm(&self) -> usize {
        self.warps / self.wn()
    }
    /// Head-dim columns of dQ per warp.
    pub const fn dq_cols(&self) -> usize {
        self.head_dim / (self.warps / (self.block_m / (16 * self.dq_tiles)))
    }
    /// Pitch of the P^T / dS^T tiles (`block_n` rows of `block_m` 16-bit values plus one 16-byte chunk).
    pub const fn p_row_bytes(&self) -> usize {
        (self.block_m + 8) * 2
    }
    /// Dynamic shared memory: K and V, two stages of Q and dO, two stages of the rows' LSE and D, dS^T,
    /// and P^T when warps split the queries (else P^T stays in registers).
    pub const fn smem_bytes(&self) -> usize {
        let rb = row_pitch_bytes(self.head_dim);
        let p = if self.wm() > 1 { 2 } else { 1 };
        2 * self.block_n * rb + 4 * self.block_m * rb + 4 * self.block_m * 4 + p * self.block_n * self.p_row_bytes()
    }
    /// Whether the shape is one the kernel supports (checked at compile time for every variant).
    pub const fn is_valid(&self) -> bool {
        let wn = self.block_n / (16 * self.key_tiles);
        let rm = self.block_m / (16 * self.dq_tiles);
        self.block_n.is_multiple_of(16 * self.key_tiles)
            && self.block_m.is_multiple_of(16)
            && self.warps.is_multiple_of(wn)
            && self.block_m.is_multiple_of(16 * self.dq_tiles)
            && self.dq_tiles <= 2
            && self.warps.is_multiple_of(rm)
            && (self.block_m / (self.warps / wn)).is_multiple_of(16)
            && (self.head_dim / (self.warps / wn)).is_multiple_of(16)
            && self.dq_cols().is_multiple_of(16)
            && self.head_dim.is_multiple_of(self.warps / rm)
            && self.block_m <= self.threads()
            && DQ_ACCUM_BLOCK_M.is_multiple_of(self.block_m)
    }
}

/// The dq accumulator's row granularity: both dk/dv kernels add whole query blocks (of a `block_m`
/// dividing this) to it, rows past a sequence getting exact zeros, so the prep kernel zeroes each
/// sequence's rows up to a multiple of this (`block::dq_accum_rows`) and the host allocates this many
/// rows of slack past the last one.
pub const DQ_ACCUM_BLOCK_M: usize = 64;

/// Hopper (sm_90a module) backward dK/dV kernel: 128 keys per block (64 per warpgroup), 64-row query
/// steps, head dims 64, 96 and 128 (bwd/wg.rs).
pub const BWD_WG_BLOCK_N: usize = 128;
pub const BWD_WG_BLOCK_M: usize = 64;
pub const BWD_WG_THREADS: usize = 256;

/// Whether the wide Hopper dK/dV kernel (bwd/wide.rs) at `head_dim` adds dQ by the copy engine's bulk
/// reductions through shared memory (two 64-column f32 buffers per warpgroup, 64 KB): at 192, where they
/// fit beside the tiles (230,400 bytes in all); at 256 the tiles leave 18 KB, and the threads add dQ
/// themselves. Its default mode only (the deterministic modes keep the threads' adds).
pub const fn bwd_wide_dq_bulk(head_dim: usize) -> bool {
    head_dim == 192
}

/// Its dynamic shared memory: two buffers of K and V (the next key block's are loaded during the last
/// step of this one), two stages of Q and dO, dS^T, two stages of lse_log2 and D.
pub const fn bwd_wg_smem_bytes(head_dim: usize) -> usize {
    // Tiles of whole 64-column groups (head dim 96: two).
    let padded = head_dim.div_ceil(64) * 64;
    if head_dim > 128 {
        // The wide kernel (bwd/wide.rs): one K/V buffer, P^T beside dS^T; with `bwd_wide_dq_bulk` four dQ
        // buffers of 64 f32 columns.
        let n = bwd_wg_block_n(head_dim);
        let dq = if bwd_wide_dq_bulk(head_dim) { 4 * BWD_WG_BLOCK_M * 64 * 4 } else { 0 };
        return (2 * n + 4 * BWD_WG_BLOCK_M) * padded * 2 + 2 * n * BWD_WG_BLOCK_M * 2 + 4 * BWD_WG_BLOCK_M * 4 + dq;
    }
    (4 * BWD_WG_BLOCK_N + 4 * BWD_WG_BLOCK_M) * padded * 2 + BWD_WG_BLOCK_N * BWD_WG_BLOCK_M * 2 + 4 * BWD_WG_BLOCK_M * 4
}

/// The Hopper warp-specialized dK/dV kernel (bwd/ws.rs), head dims 64, 96 and 128: the wg kernel's
/// 128-key blocks and 64-row steps, fed by a producer warpgroup (bulk tensor copies of K, V, Q and dO;
/// cp.async of lse_log2 and D) to two consumer warpgroups.
pub const BWD_WS_THREADS: usize = 384;
/// Step stages (Q, dO, lse_log2 and D of one 64-row step each).
pub const BWD_WS_STAGES: usize = 2;
/// Bytes after the tiles for the barriers (K/V full / empty, each step stage's full / empty).
pub const BWD_WS_BARRIER_BYTES: usize = 128;

/// Its dynamic shared memory: K and V, the step stages' Q and dO, two dS^T buffers, the stages' lse_log2
/// and D, at the head dims of `bwd_ws_dq_helpers` a step's dQ (f32), the barriers.
pub const fn bwd_ws_smem_bytes(head_dim: usize) -> usize {
    let padded = head_dim.div_ceil(64) * 64;
    let dq = if bwd_ws_dq_helpers(head_dim) { BWD_WG_BLOCK_M * padded * 4 } else { 0 };
    (2 * BWD_WG_BLOCK_N + 2 * BWD_WS_STAGES * BWD_WG_BLOCK_M) * padded * 2 + 2 * BWD_WG_BLOCK_N * BWD_WG_BLOCK_M * 2 + 2 * BWD_WS_STAGES * BWD_WG_BLOCK_M * 4 + dq + BWD_WS_BARRIER_BYTES
}

/// Whether the warp-specialized backward's kernels hand each step's dQ to the producer warpgroup through
/// shared memory (one thread reduces it into the accumulator with bulk tensor reductions, in turn in the
/// ordered deterministic twins) instead of adding it themselves: every head dim it has (default mode,
/// H100: backward 0.83-0.86x the time at 128, 0.86-0.90 at 64, 0.90-0.92 at 96; benches/RESULTS.md,
/// Backward).
pub const fn bwd_ws_dq_helpers(head_dim: usize) -> bool {
    head_dim == 64 || head_dim == 96 || head_dim == 128
}

/// The warp-specialized backward's entry points (sm_90a module only): head dims 64, 96 and 128.
#[macro_export]
macro_rules! for_each_bwd_ws_variant {
    ($m:ident) => {
        $crate::__variants_emit!($m, "flash_bwd_ws_hdim"; 64 96 128);
    };
}

macro_rules! bwd_ws_name_lookup {
    ($(($d:literal, $dt:ident, $name:expr)),* $(,)?) => {
        /// Export name of the warp-specialized Hopper dK/dV kernel for `(head_dim, dtype)`, if there is one.
        pub fn bwd_ws_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some($name); })*
            None
        }
        /// Its twin with score modifiers (`BwdParams::mods`): the export name with `_mods`.
        pub fn bwd_ws_mods_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some(concat!($name, "_mods")); })*
            None
        }
        /// The `_mods` twin for ALiBi without dropout, its dropout compiled out: the export name with
        /// `_alibi`.
        pub fn bwd_ws_alibi_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some(concat!($name, "_alibi")); })*
            None
        }
        /// Its ordered deterministic twin (`BwdParams::dq_sem`): the export name with `_det`.
        pub fn bwd_ws_det_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some(concat!($name, "_det")); })*
            None
        }
    };
}
for_each_bwd_ws_variant!(bwd_ws_name_lookup);

/// Keys per block of the Hopper dK/dV kernel: 128, or 64 past head dim 128 (bwd/wide.rs), where the
/// accumulators of 128 keys would not fit the registers.
pub const fn bwd_wg_block_n(head_dim: usize) -> usize {
    if head_dim > 128 { 64 } else { BWD_WG_BLOCK_N }
}

/// The Hopper backward's entry points (sm_90a module only).
#[macro_export]
macro_rules! for_each_bwd_wg_variant {
    ($m:ident) => {
        $crate::head_dim_table!(__variants_hopper_bwd!($m, "flash_bwd_wg_hdim"));
    };
}

macro_rules! bwd_wg_name_lookup {
    ($(($d:literal, $dt:ident, $name:expr)),* $(,)?) => {
        /// Export name of the Hopper dK/dV kernel for `(head_dim, dtype)`, if there is one.
        pub fn bwd_wg_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some($name); })*
            None
        }
        /// Its twin with score modifiers (`BwdParams::mods`): the export name with `_mods`.
        pub fn bwd_wg_mods_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some(concat!($name, "_mods")); })*
            None
        }
        /// The `_mods` twin for ALiBi without dropout, its dropout compiled out: the export name with
        /// `_alibi`.
        pub fn bwd_wg_alibi_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some(concat!($name, "_alibi")); })*
            None
        }
        /// The ordered deterministic twin of the `_mods` kernel, at the wide head dims (above 128) only:
        /// the export name with `_mods_det`.
        pub fn bwd_wg_mods_det_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && $d > 128 && dtype == KernelDType::$dt { return Some(concat!($name, "_mods_det")); })*
            None
        }
        /// Its ordered deterministic twin (`BwdParams::dq_sem`): the export name with `_det`.
        pub fn bwd_wg_det_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some(concat!($name, "_det")); })*
            None
        }
    };
}
for_each_bwd_wg_variant!(bwd_wg_name_lookup);

/// Whether the deterministic Hopper backward runs in order (the `_det` twins: one dq accumulator, each key
/// block's reductions after the next block's) rather than over split accumulator copies, unless the
/// caller asks for it everywhere (`KernelChoice::bwd_ordered_all`): at every head dim since the ordered
/// ws twin's dQ goes through the helper's bulk reductions in turn (H100, RESULTS.md, Deterministic
/// backward: 0.45-0.52x the split copies' time at 96, 0.76-0.80 at 64; at 128 0.73-0.78x the ordered
/// mode before). Before that, on the H200: faster at head dim 256 (the wide kernels, which 192 shares:
/// 1.16-1.37x the split copies) and at 128 (1.03-1.07x); slower at 64 (0.93-0.94x, the wg kernel's turns,
/// which the fallback without the copy engine still takes).
pub fn bwd_ordered_by_default(head_dim: usize) -> bool {
    head_dim >= 64
}



/// Dynamic shared memory of the dq kernel: Q and dO, two stages of K and V.
pub const fn dq_smem_bytes(c: &FwdConfig) -> usize {
    (2 * c.block_m() + 4 * c.block_n) * c.row_bytes()
}

/// The backward variant table: `(head_dim, dtype, dk/dv kernel, deterministic dq kernel)`.
#[macro_export]
macro_rules! for_each_bwd_variant {
    ($m:ident) => {
        $crate::head_dim_table!(__variants_bwd!($m));
    };
}

macro_rules! bwd_name_lookup {
    ($(($d:literal, $dt:ident, $name:expr, $dq:expr)),* $(,)?) => {
        /// Export names of the backward kernels for `(head_dim, dtype)`: (dk/dv + atomic dq, deterministic dq).
        pub fn bwd_kernel_names(head_dim: usize, dtype: KernelDType) -> Option<(&'static str, &'static str)> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some(($name, $dq)); })*
            None
        }
        /// Their twins with score modifiers (`BwdParams::mods`): the export names with `_mods`.
        pub fn bwd_mods_kernel_names(head_dim: usize, dtype: KernelDType) -> Option<(&'static str, &'static str)> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some((concat!($name, "_mods"), concat!($dq, "_mods"))); })*
            None
        }
    };
}
for_each_bwd_variant!(bwd_name_lookup);

/// Element-wise backward kernels (head dim at run time): D_i and the LSE in base 2; dq from its f32
/// accumulator. Per dtype.
pub fn bwd_prep_kernel_name(dtype: KernelDType) -> &'static str {
    match dtype {
        KernelDType::BF16 => "flash_bwd_prep_bf16",
        KernelDType::F16 => "flash_bwd_prep_f16",
    }
}
pub fn bwd_convert_kernel_name(dtype: KernelDType) -> &'static str {
    match dtype {
        KernelDType::BF16 => "flash_bwd_dq_convert_bf16",
        KernelDType::F16 => "flash_bwd_dq_convert_f16",
    }
}
/// The probabilities kernel (flash-attn's `return_attn_probs`, `s_dmask`; head dim at run time, one
/// thread per score): per input dtype, writing f32 (`out_f32`) or the input dtype. Its parameter is
/// `ProbsParams`.
pub fn probs_kernel_name(dtype: KernelDType, out_f32: bool) -> &'static str {
    match (dtype, out_f32) {
        (KernelDType::BF16, true) => "flash_probs_bf16_f32",
        (KernelDType::BF16, false) => "flash_probs_bf16",
        (KernelDType::F16, true) => "flash_probs_f16_f32",
        (KernelDType::F16, false) => "flash_probs_f16",
    }
}
/// Blocks of a decode kernel per multiprocessor: its registers leave room for that many (the PTX's
/// `.minnctapersm`, added by xtask), which the host's split heuristic counts where tiles span pages.
pub const DECODE_BLOCKS_PER_SM: usize = 2;

/// The most splits whose blocks the decode kernels merge in one cluster (sm_90; the portable cluster
/// size): more splits write partial results for the combine kernel.
pub const MAX_DECODE_CLUSTER: usize = 8;

/// The decode kernels' shape (`_decode`, the KV cache with q packed), cuDNN's decode shape: 16 packed
/// rows (the q heads of a kv head times the queries) per block, 128-key tiles (64 past head dim 128)
/// whose keys are split over four key warps (two where the head dim is not a multiple of 64; their
/// softmax states merged at the end), one K and one V buffer loaded in turns (`FwdConfig::smem_bytes`), two
/// blocks per multiprocessor. A tile's products, softmax and copies spread over the block's schedulers
/// (one warp doing all of them for its 16 rows was issue-bound: nsight compute, 4.7 cycles per
/// instruction). H200: 0.95-0.99x the time of one warp over 64-key tiles in two stages on nine of eleven
/// decode rows (benches/RESULTS.md).
pub const fn decode_config(head_dim: usize) -> FwdConfig {
    let block_n = if head_dim > 128 { 64 } else { 128 };
    let key_warps = if head_dim % 64 == 0 { 4 } else { 2 };
    FwdConfig { head_dim, m_tiles: 1, warps: key_warps, key_warps, block_n, q_in_regs: false }
}

/// Threads per block of the probabilities kernel (keys of one query row).
pub const PROBS_THREADS: usize = 128;

/// The KV cache's kernels (kernels-gpu/src/kvcache.rs): threads per block of the append (one feature
/// pair each), warps per block of the combine (each 32 columns of one output row).
pub const APPEND_THREADS: usize = 256;
pub const COMBINE_WARPS: usize = 8;

/// The combine's warps per output row: one per 32 columns of the head dim.
pub const fn combine_warps_per_row(head_dim: usize) -> usize {
    let w = head_dim.div_ceil(32);
    if w == 0 { 1 } else { w }
}
pub fn kvcache_append_kernel_name(dtype: KernelDType) -> &'static str {
    match dtype {
        KernelDType::BF16 => "flash_kvcache_append_bf16",
        KernelDType::F16 => "flash_kvcache_append_f16",
    }
}
pub const COMBINE_KERNEL_NAME: &str = "flash_combine";

/// Rows per block of the element-wise backward kernels (and threads per block). A multiple of
/// `DQ_ACCUM_BLOCK_M`: prep's blocks that hold a sequence's real rows hold all the accumulator rows it
/// zeroes.
pub const BWD_ROWS_PER_BLOCK: usize = 128;
const _: () = assert!(BWD_ROWS_PER_BLOCK.is_multiple_of(DQ_ACCUM_BLOCK_M));
