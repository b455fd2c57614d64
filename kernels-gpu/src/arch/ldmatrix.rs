//! `ldmatrix` (sm_75+): four 8x8 16-bit matrices from shared memory into the fragment layout of
//! `mma.m16n8k16`. Lane `l` supplies the row address of row `l % 8` of matrix `l / 8`.
use core::arch::asm;

/// Four 8x8 matrices; lane `4r + c` receives row `r`, columns `2c, 2c+1` of each.
#[inline(always)]
pub unsafe fn ldmatrix_x4(addr: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    unsafe {
        asm!("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{a}, {b}, {c}, {d}}}, [{p}];", p = in(reg32) addr,
            a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d, options(nostack, readonly))
    }
    [a, b, c, d]
}

/// Four 8x8 matrices, transposed: lane `4r + c` receives rows `2c, 2c+1` of column `r` of each.
#[inline(always)]
pub unsafe fn ldmatrix_x4_trans(addr: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    unsafe {
        asm!("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {{{a}, {b}, {c}, {d}}}, [{p}];", p = in(reg32) addr,
            a = out(reg32) a, b = out(reg32) b, c = out(reg32) c, d = out(reg32) d, options(nostack, readonly))
    }
    [a, b, c, d]
}
