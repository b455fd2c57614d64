//! The two PTX modules, shipped in the package (`host/ptx/`): a dependent crate builds on stable with no
//! nightly and no CUDA. Inside this repository `cargo xtask ptx` rebuilds them from kernels-gpu into
//! `target/ptx/`; the test `shipped_ptx_is_fresh` (tests/ptx_fresh.rs) fails until `cargo xtask ship-ptx`
//! copies a changed build here, so the shipped modules are never stale.

/// PTX for sm_80 and newer (JIT-compiled by the driver for the GPU at hand).
pub const PTX_SM80: &str = include_str!("../ptx/kernels_sm80.ptx");
/// The same kernels for sm_90a, with Hopper-only instructions; loaded on compute capability 9.x.
pub const PTX_SM90: &str = include_str!("../ptx/kernels_sm90.ptx");
