//! Global-memory accesses the compiler would not emit as wanted on its own: 16-byte vectors and
//! read-only loads of small metadata.
use core::arch::asm;

/// Store 16 bytes to global memory (`addr` 16-byte aligned).
#[inline(always)]
pub unsafe fn st_global_v4(addr: u64, v: [u32; 4]) {
    unsafe {
        asm!("st.global.v4.b32 [{a}], {{{x}, {y}, {z}, {w}}};", a = in(reg64) addr,
            x = in(reg32) v[0], y = in(reg32) v[1], z = in(reg32) v[2], w = in(reg32) v[3], options(nostack))
    }
}

/// Load 16 bytes from global memory through the read-only (non-coherent) path (`addr` 16-byte aligned).
#[inline(always)]
pub unsafe fn ld_global_nc_v4(addr: u64) -> [u32; 4] {
    let (x, y, z, w): (u32, u32, u32, u32);
    unsafe {
        asm!("ld.global.nc.v4.b32 {{{x}, {y}, {z}, {w}}}, [{a}];", a = in(reg64) addr,
            x = out(reg32) x, y = out(reg32) y, z = out(reg32) z, w = out(reg32) w, options(nostack, readonly))
    }
    [x, y, z, w]
}

/// Store 4 bytes to global memory.
#[inline(always)]
pub unsafe fn st_global_u32(addr: u64, v: u32) {
    unsafe { asm!("st.global.b32 [{a}], {v};", a = in(reg64) addr, v = in(reg32) v, options(nostack)) }
}

/// Store the low 2 bytes of `v` to global memory.
#[inline(always)]
pub unsafe fn st_global_u16(addr: u64, v: u32) {
    unsafe { asm!("{{ .reg .b16 h; cvt.u16.u32 h, {v}; st.global.b16 [{a}], h; }}", a = in(reg64) addr, v = in(reg32) v, options(nostack)) }
}

/// Store one f32 to global memory.
#[inline(always)]
pub unsafe fn st_global_f32(addr: u64, v: f32) {
    unsafe { asm!("st.global.f32 [{a}], {v};", a = in(reg64) addr, v = in(reg32) v, options(nostack)) }
}

/// Load one i32 through the read-only path (lengths, offsets).
#[inline(always)]
pub unsafe fn ld_global_nc_i32(addr: u64) -> i32 {
    let v: i32;
    unsafe { asm!("ld.global.nc.b32 {v}, [{a}];", v = out(reg32) v, a = in(reg64) addr, options(nostack, readonly)) }
    v
}

/// Element `i` of the int32 device array at `ptr` (`ld_global_nc_i32`): the reader `seqlen::Lengths`
/// takes, over the length arrays the kernel parameters address.
#[inline(always)]
pub fn ld_i32_at(ptr: u64, i: i32) -> i32 {
    unsafe { ld_global_nc_i32(ptr + (i as u64) * 4) }
}

/// Load one f32 through the read-only path.
#[inline(always)]
pub unsafe fn ld_global_nc_f32(addr: u64) -> f32 {
    let v: f32;
    unsafe { asm!("ld.global.nc.f32 {v}, [{a}];", v = out(reg32) v, a = in(reg64) addr, options(nostack, readonly)) }
    v
}

/// Load 16 bytes from global memory through L2 only (`.cg`): data that reductions of this kernel (made
/// visible by a barrier) or of an earlier one left there.
#[inline(always)]
pub unsafe fn ld_global_v4(addr: u64) -> [u32; 4] {
    let (x, y, z, w): (u32, u32, u32, u32);
    unsafe {
        asm!("ld.global.cg.v4.b32 {{{x}, {y}, {z}, {w}}}, [{a}];", a = in(reg64) addr,
            x = out(reg32) x, y = out(reg32) y, z = out(reg32) z, w = out(reg32) w, options(nostack, readonly))
    }
    [x, y, z, w]
}

/// `*addr += v` in global memory, atomically, without returning the old value.
#[inline(always)]
pub unsafe fn red_add_f32(addr: u64, v: f32) {
    unsafe { asm!("red.global.add.f32 [{a}], {v};", a = in(reg64) addr, v = in(reg32) v, options(nostack)) }
}

/// `addr[0..2] += v` in global memory, atomically per element, one request (`addr` 8-byte aligned;
/// sm_90, PTX 8.1).
#[cfg(fa_sm90)]
#[inline(always)]
pub unsafe fn red_add_v2_f32(addr: u64, v: [f32; 2]) {
    unsafe {
        asm!("red.global.add.v2.f32 [{a}], {{{x}, {y}}};", a = in(reg64) addr, x = in(reg32) v[0], y = in(reg32) v[1], options(nostack))
    }
}

/// Store two f32 to global memory (`addr` 8-byte aligned).
#[inline(always)]
pub unsafe fn st_global_v2_f32(addr: u64, v: [f32; 2]) {
    unsafe { asm!("st.global.v2.f32 [{a}], {{{x}, {y}}};", a = in(reg64) addr, x = in(reg32) v[0], y = in(reg32) v[1], options(nostack)) }
}

/// Load 2 bytes through the read-only path, zero-extended.
#[inline(always)]
pub unsafe fn ld_global_nc_u16(addr: u64) -> u32 {
    let v: u32;
    unsafe { asm!("{{ .reg .b16 h; ld.global.nc.b16 h, [{a}]; cvt.u32.u16 {v}, h; }}", v = out(reg32) v, a = in(reg64) addr, options(nostack, readonly)) }
    v
}

/// `ld.acquire.gpu.global.u32`: a turn counter's value; later accesses of this thread stay after it.
#[inline(always)]
pub unsafe fn ld_acquire_gpu_u32(addr: u64) -> u32 {
    let v: u32;
    unsafe { asm!("ld.acquire.gpu.global.u32 {v}, [{a}];", v = out(reg32) v, a = in(reg64) addr, options(nostack)) };
    v
}

/// `st.release.gpu.global.u32`: publish a turn counter after this thread's earlier accesses (and, after a
/// barrier, its block's: the release is cumulative).
#[inline(always)]
pub unsafe fn st_release_gpu_u32(addr: u64, v: u32) {
    unsafe { asm!("st.release.gpu.global.u32 [{a}], {v};", a = in(reg64) addr, v = in(reg32) v, options(nostack)) }
}

/// `atom.relaxed.gpu.add.u32` on a generic address: add `v`, return the old value (a work counter's
/// next index; no ordering with this thread's other accesses).
#[inline(always)]
pub unsafe fn atom_add_relaxed_gpu_u32(addr: u64, v: u32) -> u32 {
    let old: u32;
    unsafe { asm!("atom.relaxed.gpu.add.u32 {o}, [{a}], {v};", o = out(reg32) old, a = in(reg64) addr, v = in(reg32) v, options(nostack)) };
    old
}

/// `atom.acq_rel.gpu.add.u32` on a generic address: add `v`, return the old value; this thread's earlier
/// accesses stay before it and its later ones after it (a count of finished blocks).
#[inline(always)]
pub unsafe fn atom_add_acq_rel_gpu_u32(addr: u64, v: u32) -> u32 {
    let old: u32;
    unsafe { asm!("atom.acq_rel.gpu.add.u32 {o}, [{a}], {v};", o = out(reg32) old, a = in(reg64) addr, v = in(reg32) v, options(nostack)) };
    old
}

/// `st.relaxed.gpu.u32` on a generic address.
#[inline(always)]
pub unsafe fn st_relaxed_gpu_u32(addr: u64, v: u32) {
    unsafe { asm!("st.relaxed.gpu.u32 [{a}], {v};", a = in(reg64) addr, v = in(reg32) v, options(nostack)) }
}
