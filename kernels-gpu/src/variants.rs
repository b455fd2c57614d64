//! The table of forward kernel variants: tile shapes per head dim, and the export name of each
//! (head dim, dtype) entry point. Pure data, compiled for the host too (dispatch.rs reads the same
//! shapes to size grids and shared memory), so the two sides cannot disagree.

/// Tile shape of one variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FwdConfig {
    pub head_dim: usize,
    /// m16 tiles per warp.
    pub m_tiles: usize,
    /// Warps per block; each owns `16 * m_tiles` query rows.
    pub warps: usize,
    /// Keys per K/V tile.
    pub block_n: usize,
    /// Keep the warp's Q fragments in registers across K/V tiles.
    pub q_in_regs: bool,
}

impl FwdConfig {
    pub const fn block_m(&self) -> usize {
        16 * self.m_tiles * self.warps
    }
    pub const fn threads(&self) -> usize {
        32 * self.warps
    }
    /// Shared-memory row pitch in bytes: one 16-byte chunk of padding per row, so the 8 rows an
    /// `ldmatrix` reads fall in 8 different bank groups (the pitch is an odd number of chunks).
    pub const fn row_bytes(&self) -> usize {
        row_pitch_bytes(self.head_dim)
    }
    /// Dynamic shared memory: the Q tile and two stages of K and V tiles.
    pub const fn smem_bytes(&self) -> usize {
        (self.block_m() + 4 * self.block_n) * self.row_bytes()
    }
}

/// Shared-memory pitch of a row of `head_dim` 16-bit values: one 16-byte chunk of padding (see
/// `FwdConfig::row_bytes`).
pub const fn row_pitch_bytes(head_dim: usize) -> usize {
    (head_dim + 8) * 2
}

/// The shape used for each supported head dim, chosen by measurement on an H200 (benches/RESULTS.md):
/// two m16 tiles per warp halve the K/V shared-memory reads per tensor-core op where the registers allow
/// it; the large head dims trade that for eight warps instead.
pub const fn fwd_config(head_dim: usize) -> FwdConfig {
    match head_dim {
        32 | 64 => FwdConfig { head_dim, m_tiles: 2, warps: 4, block_n: 64, q_in_regs: true },
        96 | 128 => FwdConfig { head_dim, m_tiles: 2, warps: 4, block_n: 64, q_in_regs: false },
        _ => FwdConfig { head_dim, m_tiles: 1, warps: 8, block_n: 64, q_in_regs: false },
    }
}

/// Element types with a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelDType {
    F16,
    BF16,
}

/// The variant table: `(head_dim, dtype, export name)`, written once. `fwd/mod.rs` expands it into the
/// kernel entry points and `fwd_kernel_name` into the host's lookup, so a name is never typed twice.
#[macro_export]
macro_rules! for_each_fwd_variant {
    ($m:ident) => {
        $m! {
            (32, BF16, "flash_fwd_hdim32_bf16"),
            (64, BF16, "flash_fwd_hdim64_bf16"),
            (96, BF16, "flash_fwd_hdim96_bf16"),
            (128, BF16, "flash_fwd_hdim128_bf16"),
            (192, BF16, "flash_fwd_hdim192_bf16"),
            (256, BF16, "flash_fwd_hdim256_bf16"),
            (32, F16, "flash_fwd_hdim32_f16"),
            (64, F16, "flash_fwd_hdim64_f16"),
            (96, F16, "flash_fwd_hdim96_f16"),
            (128, F16, "flash_fwd_hdim128_f16"),
            (192, F16, "flash_fwd_hdim192_f16"),
            (256, F16, "flash_fwd_hdim256_f16"),
        }
    };
}

macro_rules! name_lookup {
    ($(($d:literal, $dt:ident, $name:literal)),* $(,)?) => {
        /// Export name of the forward kernel for `(head_dim, dtype)`, if there is one.
        pub fn fwd_kernel_name(head_dim: usize, dtype: KernelDType) -> Option<&'static str> {
            $(if head_dim == $d && dtype == KernelDType::$dt { return Some($name); })*
            None
        }
    };
}
for_each_fwd_variant!(name_lookup);
