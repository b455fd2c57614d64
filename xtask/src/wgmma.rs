//! `cargo xtask gen-wgmma`: writes kernels-gpu/src/arch/wgmma_ops.rs, the wgmma wrappers (one instruction
//! names every accumulator register, 32 to 128 of them, which no hand-written asm! should), and
//! kernels-gpu/src/fwd/wg_elem.rs, the `WgElem` trait that picks a product's bf16 or f16 wrapper (one
//! method per wrapper, from the same tables).

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
const SS: [(usize, usize); 5] = [(128, 4), (128, 8), (64, 16), (64, 12), (128, 6)];
/// (N, k16 steps) of the register x smem products (O += P V: N = head dim, K = keys per tile / 16).
const RS: [(usize, usize); 4] = [(64, 8), (128, 8), (256, 4), (192, 4)];

/// One smem x smem batch: `ss_n{n}_k{k}_{suf}`, k products of m64n{n}k16 with descriptors for both K-major
/// operands, the first one ignoring `d`'s values in.
fn smem_x_smem(o: &mut String, doc: &str, ty: &str, suf: &str, n: usize, k: usize) {
    let acc = n / 2;
    writeln!(o, "/// {doc}").unwrap();
    writeln!(o, "#[inline(always)]\npub unsafe fn ss_n{n}_k{k}_{suf}(d: &mut [[f32; 4]; {}], a: &[u64; {k}], b: &[u64; {k}]) {{", n / 8).unwrap();
    writeln!(o, "    unsafe {{\n        asm!(").unwrap();
    let zero = acc + 2 * k;
    writeln!(o, "            \"{{{{ .reg .pred p0, p1; setp.ne.u32 p0, {{{zero}}}, 0; setp.eq.u32 p1, {{{zero}}}, 0;\",").unwrap();
    writeln!(o, "            \"wgmma.fence.sync.aligned;\",").unwrap();
    for i in 0..k {
        let p = if i == 0 { "p0" } else { "p1" };
        writeln!(o, "            \"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ty}.{ty} {{{{{}}}}}, {{{}}}, {{{}}}, {p}, 1, 1, 0, 0;\",", regs(acc), acc + i, acc + k + i).unwrap();
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

/// The high 32 bits of every 128-byte-swizzled descriptor the `_lo` forms build: 1024 bytes between 8-row
/// groups (`sbo`), the 128-byte swizzle mode (`arch::wgmma::desc_sw128`).
const DESC_HI: u32 = (1024 >> 4) | (1 << 30);

/// One smem x smem batch with descriptors given as their low words: `{prefix}_n{n}_k{k}_{suf}_lo`, k products
/// of m64n{n}k16 (`trans`: the imm-trans-a, imm-trans-b pair), the first one ignoring `d`'s values in unless
/// `keep_d`. One 32-bit register per operand goes in; step i's low words are those plus `a_off(i)` and
/// `b_off(i)` (constants of the function), the high word `DESC_HI`. Each step costs an add and a move, not a
/// descriptor's construction (about six instructions per product in ptxas's code).
#[allow(clippy::too_many_arguments)]
fn smem_x_smem_lo(o: &mut String, doc: &str, prefix: &str, ty: &str, suf: &str, n: usize, k: usize, trans: &str, keep_d: bool, a_off: impl Fn(usize) -> usize, b_off: impl Fn(usize) -> usize) {
    let acc = n / 2;
    writeln!(o, "/// {doc}").unwrap();
    writeln!(o, "#[inline(always)]\npub unsafe fn {prefix}_n{n}_k{k}_{suf}_lo(d: &mut [[f32; 4]; {}], a: u32, b: u32) {{", n / 8).unwrap();
    writeln!(o, "    unsafe {{\n        asm!(").unwrap();
    let (a0, b0, zero) = (acc, acc + 1, acc + 2);
    writeln!(o, "            \"{{{{ .reg .pred p0, p1; .reg .b32 hi, la, lb; .reg .b64 da, db; setp.ne.u32 p0, {{{zero}}}, 0; setp.eq.u32 p1, {{{zero}}}, 0; mov.b32 hi, {DESC_HI};\",").unwrap();
    writeln!(o, "            \"wgmma.fence.sync.aligned;\",").unwrap();
    for i in 0..k {
        let p = if i == 0 && !keep_d { "p0" } else { "p1" };
        writeln!(o, "            \"add.u32 la, {{{a0}}}, {}; add.u32 lb, {{{b0}}}, {}; mov.b64 da, {{{{la, hi}}}}; mov.b64 db, {{{{lb, hi}}}};\",", a_off(i), b_off(i)).unwrap();
        writeln!(o, "            \"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ty}.{ty} {{{{{}}}}}, da, db, {p}, 1, 1, {trans};\",", regs(acc)).unwrap();
    }
    writeln!(o, "            \"wgmma.commit_group.sync.aligned; }}}}\",").unwrap();
    acc_operands(o, acc);
    writeln!(o, "            in(reg32) a,\n            in(reg32) b,").unwrap();
    writeln!(o, "            in(reg32) 0u32,\n            options(nostack)\n        )\n    }}\n}}\n").unwrap();
}

/// (N, k16 steps, A's and B's group strides in descriptor units) of the K-major S = Q K^T products that
/// also get a `_lo` form (`smem_x_smem_lo`; k16 steps 32 bytes apart inside a 64-column group, groups
/// rows x 128 bytes apart): the forward's at 128-row Q and 128-key K tiles, the backward's S^T = K Q^T and
/// dP^T = V dO^T at 128-key and 64-query tiles (n64) and at 64-key and 64-query tiles (n32, head dims 192
/// and 256). The forward's at 64 keys (n64, head dims 192 and 256) and 112 keys (n112, the wide 192) too.
const SS_LO: [(usize, usize, usize, usize); 11] = [
    (128, 4, 1024, 1024),
    (128, 6, 1024, 1024),
    (128, 8, 1024, 1024),
    (64, 4, 1024, 512),
    (64, 6, 1024, 512),
    (64, 8, 1024, 512),
    (64, 12, 1024, 512),
    (64, 16, 1024, 512),
    (112, 12, 1024, 896),
    (32, 12, 512, 512),
    (32, 16, 512, 512),
];
/// (N, k16 steps) of the register x smem products that also get a `_lo` form (the forward's O += P V, the
/// backward's dV and dK): B's steps 16 rows (2048 bytes, 128 descriptor units) apart.
const RS_LO: [(usize, usize); 7] = [(64, 8), (128, 8), (256, 4), (192, 4), (192, 7), (64, 4), (128, 4)];
/// (N, k16 steps) of the both-transposed products that also get a `_lo` form (the backward's dQ = dS K):
/// both operands' steps 16 rows (128 descriptor units) apart.
const TT_LO: [(usize, usize); 2] = [(64, 8), (64, 4)];
/// (N, k16 steps) of the B-transposed products that also get a `_lo` form (the wide backward's dV and dK):
/// A's steps 32 bytes apart in one 64-column group, B's 16 rows (128 descriptor units).
const ST_LO: [(usize, usize); 2] = [(192, 4), (256, 4)];

/// One register x smem batch with B's descriptors from its low word: `rs_n{n}_k{k}_{suf}_lo`, step i's B
/// descriptor from `b + 128 i` (high word `DESC_HI`): one 32-bit register in for B, not k 64-bit descriptors.
fn register_x_smem_lo(o: &mut String, ty: &str, suf: &str, n: usize, k: usize) {
    let acc = n / 2;
    writeln!(o, "/// `d += sum over {k} k16 steps of A_i B_i`: A_i 64x16 from registers (mma.sync's A fragment per warp), B_i\n/// 16x{n} N-major 128-byte-swizzled in shared memory (transposed on read), step i's descriptor from the low word\n/// `b + 128 i` (high word {DESC_HI:#x}): B's k16 steps 16 rows (2048 bytes) apart.").unwrap();
    writeln!(o, "#[inline(always)]\npub unsafe fn rs_n{n}_k{k}_{suf}_lo(d: &mut [[f32; 4]; {}], a: &[[u32; 4]; {k}], b: u32) {{", n / 8).unwrap();
    writeln!(o, "    unsafe {{\n        asm!(").unwrap();
    let (b0, zero) = (acc + 4 * k, acc + 4 * k + 1);
    writeln!(o, "            \"{{{{ .reg .pred p1; .reg .b32 hi, lb; .reg .b64 db; setp.eq.u32 p1, {{{zero}}}, 0; mov.b32 hi, {DESC_HI};\",").unwrap();
    writeln!(o, "            \"wgmma.fence.sync.aligned;\",").unwrap();
    for i in 0..k {
        let r = acc + 4 * i;
        writeln!(o, "            \"add.u32 lb, {{{b0}}}, {}; mov.b64 db, {{{{lb, hi}}}};\",", 128 * i).unwrap();
        writeln!(o, "            \"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ty}.{ty} {{{{{}}}}}, {{{{{{{}}}, {{{}}}, {{{}}}, {{{}}}}}}}, db, p1, 1, 1, 1;\",", regs(acc), r, r + 1, r + 2, r + 3).unwrap();
    }
    writeln!(o, "            \"wgmma.commit_group.sync.aligned; }}}}\",").unwrap();
    acc_operands(o, acc);
    for i in 0..k {
        writeln!(o, "            in(reg32) a[{i}][0], in(reg32) a[{i}][1], in(reg32) a[{i}][2], in(reg32) a[{i}][3],").unwrap();
    }
    writeln!(o, "            in(reg32) b,\n            in(reg32) 0u32,\n            options(nostack)\n        )\n    }}\n}}\n").unwrap();
}

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
            smem_x_smem(&mut o, &doc, ty, suf, n, k);
        }
        for (n, k, ag, bg) in SS_LO {
            let doc = format!("`d = sum over {k} k16 steps of A_i B_i^T`: A_i 64x16 and B_i {n}x16, K-major 128-byte-swizzled in shared memory,\n/// step i's descriptors from low words `a + (i / 4) {ag} + 2 (i % 4)` and `b + (i / 4) {bg} + 2 (i % 4)` (high word\n/// {DESC_HI:#x}): k16 steps 32 bytes apart in each 64-column group; `d`'s values in are ignored.");
            smem_x_smem_lo(&mut o, &doc, "ss", ty, suf, n, k, "0, 0", false, |i| (i / 4) * ag + 2 * (i % 4), |i| (i / 4) * bg + 2 * (i % 4));
        }
        for (n, k) in TT_LO {
            let doc = format!("`d = sum over {k} k16 steps of A_i B_i`: A_i 64x16 M-major and B_i 16x{n} N-major, 128-byte-swizzled in shared\n/// memory (both transposed on read), step i's descriptors from low words `a + 128 i` and `b + 128 i` (high word\n/// {DESC_HI:#x}): both operands' k16 steps 16 rows (2048 bytes) apart; `d`'s values in are ignored.");
            smem_x_smem_lo(&mut o, &doc, "tt", ty, suf, n, k, "1, 1", false, |i| 128 * i, |i| 128 * i);
        }
        for (n, k) in ST_LO {
            let doc = format!("`d += sum over {k} k16 steps of A_i B_i`: A_i 64x16 K-major and B_i 16x{n} N-major, 128-byte-swizzled in shared\n/// memory (B transposed on read), step i's descriptors from low words `a + 2 i` and `b + 128 i` (high word\n/// {DESC_HI:#x}): A's k16 steps 32 bytes apart, B's 16 rows (2048 bytes); `d`'s values in are kept.");
            smem_x_smem_lo(&mut o, &doc, "st", ty, suf, n, k, "0, 1", true, |i| 2 * i, |i| 128 * i);
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
        for (n, k) in RS_LO {
            register_x_smem_lo(&mut o, ty, suf, n, k);
        }
    }
    // A wait for every product's N.
    for n in elem_methods().into_iter().map(|(_, n8, _)| 8 * n8).collect::<std::collections::BTreeSet<_>>() {
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

/// The `WgElem` trait's methods, one per generated product (its name without the type suffix) with the
/// argument types after `d`, in the order `generate` writes the wrappers.
fn elem_methods() -> Vec<(String, usize, String)> {
    let mut m = Vec::new();
    for (n, k) in SS {
        m.push((format!("ss_n{n}_k{k}"), n / 8, format!("a: &[u64; {k}], b: &[u64; {k}]")));
    }
    let lo = SS_LO.iter().map(|&(n, k, _, _)| ("ss", n, k)).chain(TT_LO.iter().map(|&(n, k)| ("tt", n, k))).chain(ST_LO.iter().map(|&(n, k)| ("st", n, k)));
    for (prefix, n, k) in lo {
        m.push((format!("{prefix}_n{n}_k{k}_lo"), n / 8, "a: u32, b: u32".to_string()));
    }
    for (n, k) in RS {
        m.push((format!("rs_n{n}_k{k}"), n / 8, format!("a: &[[u32; 4]; {k}], b: &[u64; {k}]")));
    }
    for (n, k) in RS_LO {
        m.push((format!("rs_n{n}_k{k}_lo"), n / 8, format!("a: &[[u32; 4]; {k}], b: u32")));
    }
    m
}

/// The files `cargo xtask gen-wgmma` writes (paths from the repository root) and their text now.
pub fn generated_files() -> [(&'static str, String); 2] {
    [("kernels-gpu/src/arch/wgmma_ops.rs", generate()), ("kernels-gpu/src/fwd/wg_elem.rs", generate_elem())]
}

/// kernels-gpu/src/fwd/wg_elem.rs: the `WgElem` trait and its bf16 and f16 implementations.
pub fn generate_elem() -> String {
    let methods = elem_methods();
    let mut o = String::new();
    o.push_str("//! Generated by `cargo xtask gen-wgmma` (xtask/src/wgmma.rs); do not edit.\n");
    o.push_str("//! `WgElem`: the 16-bit input type's wgmma products (arch/wgmma_ops.rs), one method per generated\n");
    o.push_str("//! wrapper, each the wrapper of its type (`E::rs_n64_k8_lo` is `rs_n64_k8_bf16_lo` for bf16).\n");
    o.push_str("use crate::arch::wgmma;\nuse crate::tile::{Elem, BF16, F16};\n\n");
    o.push_str("/// The input type's wgmma products at the shapes the Hopper kernels use (each one fenced, issued and\n");
    o.push_str("/// committed as one group). Forward (fwd/wg.rs, fwd/ws.rs): S at 128 keys (head dim 64, 96, 128), 112\n");
    o.push_str("/// keys (the wide 192) or 64 keys (192, 256), O at the head dim. Backward (bwd/wg.rs, bwd/wide.rs; `_lo`\n");
    o.push_str("/// forms only): S^T and dP^T at 64 queries, dV and dK at the head dim over 64 queries, dQ (both operands\n");
    o.push_str("/// transposed). `_lo`: the shared operands' descriptors from their 32-bit low words.\n");
    o.push_str("pub trait WgElem: Elem {\n");
    for (name, n8, args) in &methods {
        writeln!(o, "    unsafe fn {name}(d: &mut [[f32; 4]; {n8}], {args});").unwrap();
    }
    o.push_str("}\n");
    for (ty, suf) in [("BF16", "bf16"), ("F16", "f16")] {
        writeln!(o, "\nimpl WgElem for {ty} {{").unwrap();
        for (i, (name, n8, args)) in methods.iter().enumerate() {
            let f = match name.strip_suffix("_lo") {
                Some(base) => format!("{base}_{suf}_lo"),
                None => format!("{name}_{suf}"),
            };
            if i > 0 {
                o.push('\n');
            }
            writeln!(o, "    #[inline(always)]\n    unsafe fn {name}(d: &mut [[f32; 4]; {n8}], {args}) {{\n        unsafe {{ wgmma::{f}(d, a, b) }}\n    }}").unwrap();
        }
        o.push_str("}\n");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 128-byte-swizzled descriptor as the kernels build it (`arch::wgmma::desc_sw128`), written out
    /// again here from the PTX ISA's layout: address / 16 in bits 0-13, `lbo` / 16 from bit 16, `sbo` / 16
    /// from bit 32, the swizzle mode in bits 62-63.
    fn desc(addr: u32, lbo: u32, sbo: u32) -> u64 {
        (((addr & 0x3ffff) >> 4) as u64) | (((lbo >> 4) as u64) << 16) | (((sbo >> 4) as u64) << 32) | (1u64 << 62)
    }

    /// wgmma_ops.rs and wg_elem.rs are what `generate` and `generate_elem` write now.
    #[test]
    fn generated_wrappers_are_current() {
        for (file, text) in generated_files() {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(file);
            let on_disk = std::fs::read_to_string(&path).unwrap();
            assert!(on_disk == text, "{} is stale: run `cargo xtask gen-wgmma`", path.display());
        }
    }

    /// The `_lo` forms' constants against each step's descriptor built whole: the high word, and the low
    /// word's offset for a K-major step (32 bytes per k16 step, a 64-column group every four) and for a
    /// 16-row step (2048 bytes), at every shared address a tile can start at.
    #[test]
    fn low_word_steps_match_whole_descriptors() {
        for base in (0..228 * 1024u32).step_by(1024) {
            for lbo in [16, 64 * 128, 112 * 128, 128 * 128] {
                assert_eq!((desc(base, lbo, 1024) >> 32) as u32, DESC_HI);
                for &(_, k, ag, bg) in &SS_LO {
                    for (group, rows) in [(ag, ag / 8), (bg, bg / 8)] {
                        for i in 0..k {
                            let step = base + (i / 4) as u32 * rows as u32 * 128 + (i % 4) as u32 * 32;
                            if step >= 232448 {
                                continue;
                            }
                            let lo = desc(base, lbo, 1024) as u32 + ((i / 4) * group + 2 * (i % 4)) as u32;
                            assert_eq!(lo, desc(step, lbo, 1024) as u32, "base {base} step {i} group {group}");
                        }
                    }
                }
                for i in 0..16u32 {
                    let step = base + 2048 * i;
                    if step < 232448 {
                        assert_eq!(desc(base, lbo, 1024) as u32 + 128 * i, desc(step, lbo, 1024) as u32);
                    }
                }
            }
        }
    }
}
