//! Warpgroup matrix multiply (sm_90a): operands in shared memory described by 64-bit descriptors, laid
//! out in the 128-byte swizzle (a tile is `[cols / 64][rows][64]` 16-bit values; in each 8-row x 128-byte
//! atom, 16-byte chunk `c` of row `r` sits at chunk `c ^ (r % 8)`; atoms 1024-byte aligned).
use core::arch::asm;

pub use super::wgmma_ops::*;

/// Byte offset of 16-byte chunk `chunk` (8 values) of row `row` in a 128-byte-swizzled tile of `rows` rows.
#[inline(always)]
pub const fn sw128_offset(rows: u32, row: u32, chunk: u32) -> u32 {
    (chunk / 8) * rows * 128 + row * 128 + (((chunk % 8) ^ (row % 8)) * 16)
}

/// Descriptor of a 128-byte-swizzled operand at shared address `addr`: `lbo` bytes between 64-column
/// groups along the leading (contiguous) dimension where an instruction spans several (N-major B),
/// `sbo` bytes between 8-row groups.
#[inline(always)]
pub const fn desc_sw128(addr: u32, lbo: u32, sbo: u32) -> u64 {
    (((addr & 0x3ffff) >> 4) as u64) | (((lbo >> 4) as u64) << 16) | (((sbo >> 4) as u64) << 32) | (1u64 << 62)
}

/// Make this thread's shared-memory writes (cp.async included, once complete) visible to wgmma's reads.
#[inline(always)]
pub fn fence_proxy_async_shared() {
    unsafe { asm!("fence.proxy.async.shared::cta;", options(nostack)) }
}
