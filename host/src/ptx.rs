//! The two kernel modules, shipped in the package (`host/ptx/`): a dependent crate builds on stable with no
//! nightly and no CUDA. Inside this repository `cargo xtask ptx` rebuilds them from kernels-gpu into
//! `target/ptx/`; the test `shipped_ptx_is_fresh` (tests/ptx_fresh.rs) fails until `cargo xtask ship-ptx`
//! copies a changed build here, so the shipped modules are never stale.

/// PTX for sm_80 and newer (JIT-compiled by the driver for the GPU at hand).
pub const PTX_SM80: &str = include_str!("../ptx/kernels_sm80.ptx");
/// The sm_80 module assembled for sm_80 (runs on compute capability 8.x without a JIT).
pub const CUBIN_SM80: &[u8] = include_bytes!("../ptx/kernels_sm80.cubin");
/// The sm_90a module (the same kernels plus the Hopper ones: wgmma, bulk tensor copies) assembled for
/// sm_90a (compute capability 9.0 only). Its PTX is not shipped: it would run nowhere else.
pub const CUBIN_SM90: &[u8] = include_bytes!("../ptx/kernels_sm90.cubin");
