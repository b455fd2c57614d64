//! The bulk tensor copy engine (TMA, sm_90) and the warpgroup register reallocation (sm_90a).
//! A tensor map is the opaque 128-byte descriptor the host builds (`cuTensorMapEncodeTiled`); the copy
//! takes its generic address, which must point into kernel parameter, constant or global space.
use core::arch::asm;

/// Generic address of kernel parameter `$param` (its PTX name, `<export name>_param_<i>`), for a tensor
/// map passed by value. Only inside the kernel that declares it.
#[macro_export]
macro_rules! param_address {
    ($param:expr) => {{
        let a: u64;
        unsafe { core::arch::asm!(concat!("mov.b64 {a}, ", $param, ";\n\tcvta.param.u64 {a}, {a};"), a = out(reg64) a, options(pure, nomem, nostack)) }
        a
    }};
}

/// Copy the box at coordinates `c` (innermost first) of the 4-d tensor `map` into shared memory at
/// `dst`, completing `bytes` of the transaction count of the barrier at `bar`. Out-of-bounds elements
/// are zero-filled.
#[inline(always)]
pub unsafe fn load_4d(dst: u32, map: u64, c: [i32; 4], bar: u32) {
    unsafe {
        asm!(
            "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [{d}], [{m}, {{{c0}, {c1}, {c2}, {c3}}}], [{b}];",
            d = in(reg32) dst, m = in(reg64) map, c0 = in(reg32) c[0], c1 = in(reg32) c[1], c2 = in(reg32) c[2], c3 = in(reg32) c[3],
            b = in(reg32) bar, options(nostack)
        )
    }
}

/// Add the f32 box in shared memory at `src` (the map's box, in its swizzle) to the 4-d tensor `map` at
/// coordinates `c` (innermost first), element by element (atomic at each element; out-of-bounds elements
/// are skipped). Completes with this thread's bulk group (`bulk_commit`, `bulk_wait_read`, `bulk_wait`);
/// the shared memory must be made visible to the async proxy first (`fence.proxy.async.shared::cta` by
/// its writers, before the barrier the issuing thread waits on).
#[inline(always)]
pub unsafe fn reduce_add_4d(src: u32, map: u64, c: [i32; 4]) {
    unsafe {
        asm!(
            "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group [{m}, {{{c0}, {c1}, {c2}, {c3}}}], [{s}];",
            s = in(reg32) src, m = in(reg64) map, c0 = in(reg32) c[0], c1 = in(reg32) c[1], c2 = in(reg32) c[2], c3 = in(reg32) c[3],
            options(nostack)
        )
    }
}

/// Store the box at coordinates `c` (innermost first) of the 4-d tensor `map` from shared memory at `src`
/// (the map's box, in its swizzle); out-of-bounds elements are not written. Completes with this thread's
/// bulk group, and the shared memory must be made visible to the async proxy first, as `reduce_add_4d`.
#[inline(always)]
pub unsafe fn store_4d(src: u32, map: u64, c: [i32; 4]) {
    unsafe {
        asm!(
            "cp.async.bulk.tensor.4d.global.shared::cta.tile.bulk_group [{m}, {{{c0}, {c1}, {c2}, {c3}}}], [{s}];",
            s = in(reg32) src, m = in(reg64) map, c0 = in(reg32) c[0], c1 = in(reg32) c[1], c2 = in(reg32) c[2], c3 = in(reg32) c[3],
            options(nostack)
        )
    }
}

/// Close this thread's bulk group of the operations issued since the last one.
#[inline(always)]
pub unsafe fn bulk_commit() {
    unsafe { asm!("cp.async.bulk.commit_group;", options(nostack)) }
}

/// Wait until at most `N` of this thread's bulk groups still read their shared memory sources.
#[inline(always)]
pub unsafe fn bulk_wait_read<const N: u32>() {
    unsafe { asm!("cp.async.bulk.wait_group.read {n};", n = const N, options(nostack)) }
}

/// Wait until at most `N` of this thread's bulk groups are incomplete (their writes performed), then make
/// those writes of the async proxy visible to the generic proxy (`fence.proxy.async.global`).
#[inline(always)]
pub unsafe fn bulk_wait<const N: u32>() {
    unsafe { asm!("cp.async.bulk.wait_group {n};", "fence.proxy.async.global;", n = const N, options(nostack)) }
}

/// Fetch the tensor map at `map` into the copy engine's descriptor cache.
#[inline(always)]
pub unsafe fn prefetch_map(map: u64) {
    unsafe { asm!("prefetch.tensormap [{m}];", m = in(reg64) map, options(nostack)) }
}

/// Raise this warpgroup's registers per thread to `N` (all its threads, warp-uniform).
#[inline(always)]
pub fn regs_inc<const N: u32>() {
    unsafe { asm!("setmaxnreg.inc.sync.aligned.u32 {n};", n = const N, options(nostack)) }
}

/// Lower this warpgroup's registers per thread to `N`.
#[inline(always)]
pub fn regs_dec<const N: u32>() {
    unsafe { asm!("setmaxnreg.dec.sync.aligned.u32 {n};", n = const N, options(nostack)) }
}
