//! Dynamic shared memory: one extern array whose size is set at launch; addresses are 32-bit offsets in
//! the shared window (what ldmatrix, cp.async and ld/st.shared take).
use core::arch::{asm, global_asm};

// 1024-byte alignment: wgmma's 128-byte-swizzled tiles repeat every 1024 bytes from an aligned base.
global_asm!(".extern .shared .align 1024 .b8 smem[];");

/// Shared-window address of the first byte of dynamic shared memory.
#[inline(always)]
pub fn base() -> u32 {
    let p: u32;
    unsafe { asm!("mov.u32 {p}, smem;", p = out(reg32) p, options(pure, nomem, nostack)) }
    p
}

/// Store 16 bytes to shared memory.
#[inline(always)]
pub unsafe fn st_v4(addr: u32, v: [u32; 4]) {
    unsafe {
        asm!("st.shared.v4.b32 [{a}], {{{x}, {y}, {z}, {w}}};", a = in(reg32) addr,
            x = in(reg32) v[0], y = in(reg32) v[1], z = in(reg32) v[2], w = in(reg32) v[3], options(nostack))
    }
}

/// Load 16 bytes from shared memory.
#[inline(always)]
pub unsafe fn ld_v4(addr: u32) -> [u32; 4] {
    let (x, y, z, w): (u32, u32, u32, u32);
    unsafe {
        asm!("ld.shared.v4.b32 {{{x}, {y}, {z}, {w}}}, [{a}];", a = in(reg32) addr,
            x = out(reg32) x, y = out(reg32) y, z = out(reg32) z, w = out(reg32) w, options(nostack, readonly))
    }
    [x, y, z, w]
}

/// Store 4 bytes to shared memory.
#[inline(always)]
pub unsafe fn st_u32(addr: u32, v: u32) {
    unsafe { asm!("st.shared.b32 [{a}], {v};", a = in(reg32) addr, v = in(reg32) v, options(nostack)) }
}

/// Load 4 bytes from shared memory.
#[inline(always)]
pub unsafe fn ld_u32(addr: u32) -> u32 {
    let v: u32;
    unsafe { asm!("ld.shared.b32 {v}, [{a}];", v = out(reg32) v, a = in(reg32) addr, options(nostack, readonly)) };
    v
}

/// Load two f32 from shared memory (`addr` 8-byte aligned).
#[inline(always)]
pub unsafe fn ld_v2_f32(addr: u32) -> [f32; 2] {
    let (x, y): (f32, f32);
    unsafe {
        asm!("ld.shared.v2.f32 {{{x}, {y}}}, [{a}];", a = in(reg32) addr, x = out(reg32) x, y = out(reg32) y,
            options(nostack, readonly))
    }
    [x, y]
}

/// Load an f32 from the shared memory of block `rank` of this block's cluster at the offset `addr` has in
/// this block's (sm_90: `mapa` then `ld.shared::cluster`; `rank` below the cluster's size). Before sm_90,
/// where every block is its own cluster, `rank` must be 0: this block's own.
#[inline(always)]
pub unsafe fn ld_cluster_f32(addr: u32, rank: u32) -> f32 {
    let x: f32;
    #[cfg(fa_sm90)]
    unsafe {
        asm!("mapa.shared::cluster.u32 {r}, {a}, {k};", "ld.shared::cluster.f32 {x}, [{r}];", a = in(reg32) addr, k = in(reg32) rank,
            r = out(reg32) _, x = out(reg32) x, options(nostack, readonly))
    }
    #[cfg(not(fa_sm90))]
    unsafe {
        let _ = rank;
        asm!("ld.shared.f32 {x}, [{a}];", a = in(reg32) addr, x = out(reg32) x, options(nostack, readonly))
    }
    x
}

/// Store two f32 to shared memory (`addr` 8-byte aligned).
#[inline(always)]
pub unsafe fn st_v2_f32(addr: u32, v: [f32; 2]) {
    unsafe { asm!("st.shared.v2.f32 [{a}], {{{x}, {y}}};", a = in(reg32) addr, x = in(reg32) v[0], y = in(reg32) v[1], options(nostack)) }
}
