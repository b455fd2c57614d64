//! Every piece of inline PTX in the crate, one file per instruction family. Each wrapper is a thin
//! `#[inline(always)]` function; nothing outside `arch/` writes PTX strings.

pub mod cp_async;
pub mod ldmatrix;
pub mod math;
#[cfg(fa_sm90)]
pub mod mbarrier;
pub mod mem;
pub mod mma;
pub mod shfl;
pub mod smem;
pub mod sreg;
pub mod sync;
#[cfg(fa_sm90)]
pub mod tma;
#[cfg(fa_sm90)]
pub mod wgmma;
#[cfg(fa_sm90)]
mod wgmma_ops;
pub mod reg;
