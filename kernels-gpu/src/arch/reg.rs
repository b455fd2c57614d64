//! Register-level helpers for the compiler, not the GPU.
use core::arch::asm;

/// `x`, through a `mov` the optimizer can neither see through nor hoist out of a loop. Inline-asm
/// operands cannot take `[reg + imm]` addresses, so LLVM hoists every loop-invariant per-thread offset
/// (e.g. each cp.async chunk's `row * stride + col`) out of the main loop and keeps them all live, which
/// spilled registers (seen in SASS as STL.64 of those offsets). Laundering the inputs of that arithmetic
/// inside the loop turns it back into a few cheap in-loop integer ops.
#[inline(always)]
pub fn opaque_u32(x: u32) -> u32 {
    let r: u32;
    unsafe { asm!("mov.b32 {r}, {x};", r = out(reg32) r, x = in(reg32) x, options(nomem, nostack, preserves_flags)) }
    r
}

/// 64-bit `opaque_u32`.
#[inline(always)]
pub fn opaque_i64(x: i64) -> i64 {
    let r: i64;
    unsafe { asm!("mov.b64 {r}, {x};", r = out(reg64) r, x = in(reg64) x, options(nomem, nostack, preserves_flags)) }
    r
}

/// `prmt.b32` in its default mode: byte k of the result is the byte of {`b`:`a`} (a bytes 0-3, b 4-7)
/// that nibble k of `sel` names by its bits 0-2, or, where that nibble's bit 3 is set, that byte's top
/// bit replicated over all eight bits.
#[inline(always)]
pub fn prmt(a: u32, b: u32, sel: u32) -> u32 {
    let r: u32;
    unsafe { asm!("prmt.b32 {r}, {a}, {b}, {s};", r = out(reg32) r, a = in(reg32) a, b = in(reg32) b, s = in(reg32) sel, options(pure, nomem, nostack, preserves_flags)) }
    r
}
