//! `cargo xtask gen-wgmma`: writes kernels-gpu/src/arch/wgmma_ops.rs, the wgmma wrappers. One
//! instruction names every accumulator register (32 to 128 of them), which no hand-written asm! should.

use std::fmt::Write;

/// (type name in PTX, suffix of the Rust function).
const TYPES: [(&str, &str); 2] = [("bf16", "bf16"), ("f16", "f16")];

fn regs(n_acc: usize) -> String {
    (0..n_acc).map(|i| format!("{{{i}}}")).collect::<Vec<_>>().join(", ")
}

fn acc_operands(out: &mut String, n_acc: usize) {
    for i in 0..n_acc {
        writeln!(out, "            inout(reg32) d[{}][{}],", i / 4, i % 4).unwrap();
    }
}

/// (N, k16 steps) of the smem x smem products (S = Q K^T: N = keys per tile, K = head dim / 16).
const SS: [(usize, usize); 10] = [(128, 4), (128, 8), (64, 16), (64, 4), (64, 8), (64, 12), (128, 6), (64, 6), (32, 12), (32, 16)];
/// (N, k16 steps) of the register x smem products (O += P V: N = head dim, K = keys per tile / 16).
const RS: [(usize, usize); 7] = [(64, 8), (128, 8), (256, 4), (64, 4), (128, 4), (192, 4), (192, 7)];
/// (N, k16 steps) of the smem x smem products with both operands transposed on read (backward dQ = dS K:
/// A = dS^T stored keys x queries, B = K stored keys x head dim).
const TT: [(usize, usize); 2] = [(64, 8), (64, 4)];
/// (N, k16 steps) of the smem x smem products with only B transposed on read (the wide backward's dV +=
/// P^T dO and dK += dS^T Q: A = P^T / dS^T stored keys x queries, B = dO / Q stored queries x head dim).
const ST: [(usize, usize); 2] = [(192, 4), (256, 4)];

/// One smem x smem batch: `{prefix}_n{n}_k{k}_{suf}`, k products of m64n{n}k16 with descriptors for both
/// operands (`trans`: the imm-trans-a, imm-trans-b pair), the first one ignoring `d`'s values in unless
/// `keep_d` (then every product adds to `d`).
#[allow(clippy::too_many_arguments)]
fn smem_x_smem(o: &mut String, doc: &str, prefix: &str, ty: &str, suf: &str, n: usize, k: usize, trans: &str, keep_d: bool) {
    let acc = n / 2;
    writeln!(o, "/// {doc}").unwrap();
    writeln!(o, "#[inline(always)]\npub unsafe fn {prefix}_n{n}_k{k}_{suf}(d: &mut [[f32; 4]; {}], a: &[u64; {k}], b: &[u64; {k}]) {{", n / 8).unwrap();
    writeln!(o, "    unsafe {{\n        asm!(").unwrap();
    let zero = acc + 2 * k;
    writeln!(o, "            \"{{{{ .reg .pred p0, p1; setp.ne.u32 p0, {{{zero}}}, 0; setp.eq.u32 p1, {{{zero}}}, 0;\",").unwrap();
    writeln!(o, "            \"wgmma.fence.sync.aligned;\",").unwrap();
    for i in 0..k {
        let p = if i == 0 && !keep_d { "p0" } else { "p1" };
        writeln!(o, "            \"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ty}.{ty} {{{{{}}}}}, {{{}}}, {{{}}}, {p}, 1, 1, {trans};\",", regs(acc), acc + i, acc + k + i).unwrap();
    }
    writeln!(o, "            \"wgmma.commit_group.sync.aligned; }}}}\",").unwrap();
    acc_operands(o, acc);
    for i in 0..k {
        writeln!(o, "            in(reg64) a[{i}],").unwrap();
    }
    for i in 0..k {
        writeln!(o, "            in(reg64) b[{i}],").unwrap();
    }
    writeln!(o, "            in(reg32) 0u32,\n            options(nostack)\n        )\n    }}\n}}\n").unwrap();
}

/// `smem_x_smem` for K-major operands whose k16 steps are 32 bytes apart inside a 64-column group and
/// `group` descriptor units apart between groups: `{prefix}_n{n}_k{k}_{suf}_inc` takes the first step's
/// descriptors and the two group strides, and forms each step's descriptors inside the asm block (two
/// 64-bit registers live instead of 2k: the descriptors of 16 steps took 64 registers at head dim 256).
fn smem_x_smem_inc(o: &mut String, prefix: &str, ty: &str, suf: &str, n: usize, k: usize) {
    let acc = n / 2;
    writeln!(o, "/// `{prefix}_n{n}_k{k}_{suf}` with step i's descriptors `a0 + (i / 4) a_group + 2 (i % 4)` (and `b0`, `b_group` alike):\n/// K-major tiles, k16 steps 32 bytes apart inside each 64-column group.").unwrap();
    writeln!(o, "#[inline(always)]\npub unsafe fn {prefix}_n{n}_k{k}_{suf}_inc(d: &mut [[f32; 4]; {}], a0: u64, b0: u64, a_group: u64, b_group: u64) {{", n / 8).unwrap();
    writeln!(o, "    unsafe {{\n        asm!(").unwrap();
    let (a0, b0, ag, bg, zero) = (acc, acc + 1, acc + 2, acc + 3, acc + 4);
    writeln!(o, "            \"{{{{ .reg .pred p0, p1; .reg .b64 ga, gb, ra, rb; setp.ne.u32 p0, {{{zero}}}, 0; setp.eq.u32 p1, {{{zero}}}, 0;\",").unwrap();
    writeln!(o, "            \"mov.b64 ga, {{{a0}}}; mov.b64 gb, {{{b0}}};\",").unwrap();
    writeln!(o, "            \"wgmma.fence.sync.aligned;\",").unwrap();
    for i in 0..k {
        let p = if i == 0 { "p0" } else { "p1" };
        if i > 0 && i % 4 == 0 {
            writeln!(o, "            \"add.s64 ga, ga, {{{ag}}}; add.s64 gb, gb, {{{bg}}};\",").unwrap();
        }
        let (ra, rb) = if i % 4 == 0 {
            ("ga", "gb")
        } else {
            writeln!(o, "            \"add.s64 ra, ga, {}; add.s64 rb, gb, {};\",", 2 * (i % 4), 2 * (i % 4)).unwrap();
            ("ra", "rb")
        };
        writeln!(o, "            \"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ty}.{ty} {{{{{}}}}}, {ra}, {rb}, {p}, 1, 1, 0, 0;\",", regs(acc)).unwrap();
    }
    // (Named in a comment too: at 4 steps or fewer they go unused.)
    writeln!(o, "            \"wgmma.commit_group.sync.aligned; }}}} // {{{ag}}} {{{bg}}}\",").unwrap();
    acc_operands(o, acc);
    writeln!(o, "            in(reg64) a0,\n            in(reg64) b0,\n            in(reg64) a_group,\n            in(reg64) b_group,").unwrap();
    writeln!(o, "            in(reg32) 0u32,\n            options(nostack)\n        )\n    }}\n}}\n").unwrap();
}

/// (N, k16 steps) of the forward's S = Q K^T that also get an `_inc` form (`smem_x_smem_inc`).
const SS_INC: [(usize, usize); 2] = [(64, 16), (112, 12)];

pub fn generate() -> String {
    let mut o = String::new();
    o.push_str("//! Generated by `cargo xtask gen-wgmma` (xtask/src/wgmma.rs); do not edit.\n");
    o.push_str("//! wgmma.mma_async m64nNk16 with f32 accumulators, one warpgroup (4 warps) per call. Accumulator\n");
    o.push_str("//! layout per warp w: `d[j]` holds rows 16w+g, 16w+g+8 of columns 8j+2t, 8j+2t+1, as mma.sync's C.\n");
    o.push_str("//! Each function is one asm block: wgmma.fence, the K steps, commit_group. Nothing between the fence\n");
    o.push_str("//! and the products defines their input registers, so ptxas keeps them asynchronous (it serializes\n");
    o.push_str("//! them otherwise). The registers stay in flight until `wait*`: touch them only after it.\n");
    o.push_str("use core::arch::asm;\n\n");
    for (ty, suf) in TYPES {
        for (n, k) in SS {
            let doc = format!("`d = sum over {k} k16 steps of A_i B_i^T`: A_i 64x16 and B_i {n}x16, K-major 128-byte-swizzled in shared\n/// memory (descriptors `a[i]`, `b[i]`); `d`'s values in are ignored.");
            smem_x_smem(&mut o, &doc, "ss", ty, suf, n, k, "0, 0", false);
        }
        for (n, k) in SS_INC {
            smem_x_smem_inc(&mut o, "ss", ty, suf, n, k);
        }
        for (n, k) in ST {
            let doc = format!("`d += sum over {k} k16 steps of A_i B_i`: A_i 64x16 K-major and B_i 16x{n} N-major, 128-byte-swizzled in\n/// shared memory (descriptors `a[i]`, `b[i]`; B transposed on read); `d`'s values in are kept.");
            smem_x_smem(&mut o, &doc, "st", ty, suf, n, k, "0, 1", true);
        }
        for (n, k) in TT {
            let doc = format!("`d = sum over {k} k16 steps of A_i B_i`: A_i 64x16 M-major and B_i 16x{n} N-major, 128-byte-swizzled in\n/// shared memory (descriptors `a[i]`, `b[i]`; both transposed on read); `d`'s values in are ignored.");
            smem_x_smem(&mut o, &doc, "tt", ty, suf, n, k, "1, 1", false);
        }
        for (n, k) in RS {
            let acc = n / 2;
            writeln!(o, "/// `d += sum over {k} k16 steps of A_i B_i`: A_i 64x16 from registers (mma.sync's A fragment per warp), B_i\n/// 16x{n} N-major 128-byte-swizzled in shared memory (descriptor `b[i]`, transposed on read).").unwrap();
            writeln!(o, "#[inline(always)]\npub unsafe fn rs_n{n}_k{k}_{suf}(d: &mut [[f32; 4]; {}], a: &[[u32; 4]; {k}], b: &[u64; {k}]) {{", n / 8).unwrap();
            writeln!(o, "    unsafe {{\n        asm!(").unwrap();
            let zero = acc + 5 * k;
            writeln!(o, "            \"{{{{ .reg .pred p1; setp.eq.u32 p1, {{{zero}}}, 0;\",").unwrap();
            writeln!(o, "            \"wgmma.fence.sync.aligned;\",").unwrap();
            for i in 0..k {
                let r = acc + 4 * i;
                writeln!(o, "            \"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ty}.{ty} {{{{{}}}}}, {{{{{{{}}}, {{{}}}, {{{}}}, {{{}}}}}}}, {{{}}}, p1, 1, 1, 1;\",", regs(acc), r, r + 1, r + 2, r + 3, acc + 4 * k + i).unwrap();
            }
            writeln!(o, "            \"wgmma.commit_group.sync.aligned; }}}}\",").unwrap();
            acc_operands(&mut o, acc);
            for i in 0..k {
                writeln!(o, "            in(reg32) a[{i}][0], in(reg32) a[{i}][1], in(reg32) a[{i}][2], in(reg32) a[{i}][3],").unwrap();
            }
            for i in 0..k {
                writeln!(o, "            in(reg64) b[{i}],").unwrap();
            }
            writeln!(o, "            in(reg32) 0u32,\n            options(nostack)\n        )\n    }}\n}}\n").unwrap();
        }
    }
    for n in SS.iter().chain(SS_INC.iter()).chain(RS.iter()).chain(TT.iter()).map(|&(n, _)| n).collect::<std::collections::BTreeSet<_>>() {
        let acc = n / 2;
        for pending in [0, 1] {
            writeln!(o, "/// Wait until at most {pending} wgmma group(s) of this warpgroup are in flight; `d` (the accumulators of the\n/// groups that completed) is read only after.").unwrap();
            writeln!(o, "#[inline(always)]\npub fn wait{pending}_n{n}(d: &mut [[f32; 4]; {}]) {{", n / 8).unwrap();
            writeln!(o, "    unsafe {{\n        asm!(").unwrap();
            writeln!(o, "            \"wgmma.wait_group.sync.aligned {pending}; // {}\",", regs(acc)).unwrap();
            acc_operands(&mut o, acc);
            writeln!(o, "            options(nostack)\n        )\n    }}\n}}\n").unwrap();
        }
    }
    for k in [4, 7, 8] {
        writeln!(o, "/// Names the A fragments of an `rs_*_k{k}` product as live up to here: call it after that product's wait, so\n/// the compiler cannot reuse their registers (e.g. for the next tile's P) while the product still reads them.").unwrap();
        writeln!(o, "#[inline(always)]\npub fn keep_a{k}(a: &mut [[u32; 4]; {k}]) {{\n    unsafe {{\n        asm!(").unwrap();
        writeln!(o, "            \"// {}\",", regs(4 * k)).unwrap();
        for i in 0..4 * k {
            writeln!(o, "            inout(reg32) a[{}][{}],", i / 4, i % 4).unwrap();
        }
        writeln!(o, "            options(nostack, nomem, preserves_flags)\n        )\n    }}\n}}\n").unwrap();
    }
    o
}
