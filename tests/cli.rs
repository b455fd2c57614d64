//! The `flash-attn` binary end to end: `run` on safetensors files gives exactly what the library gives
//! (dense, packed, packed over paged K/V, and the KV-cache forward with its updated caches), its options
//! take effect, every bad input exits with code 2 and a message, and `demo` finds no difference between
//! packed and separate sequences. Everything runs on the CPU.

#[path = "common/mod.rs"]
mod common;

use flash_attn::{
    bwd, bwd_with, fwd, fwd_kvcache, fwd_with, varlen_bwd, varlen_bwd_with, varlen_fwd, varlen_fwd_paged, varlen_fwd_with, AttnOptions, DType, Dropout, Extras, KvCache, KvCacheOptions, PagedVarlen,
    Tensor, Varlen,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

const BIN: &str = env!("CARGO_BIN_EXE_flash-attn");

/// A scratch directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!("flash-attn-cli-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Named tensors for an input file, kept as the library's host tensors.
type Inputs = Vec<(&'static str, Tensor)>;

fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F32 => Dtype::F32,
        DType::I32 => Dtype::I32,
    }
}

fn write(path: &Path, tensors: &Inputs) {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, t)| t.to_bytes().unwrap()).collect();
    let views: Vec<(&str, TensorView<'_>)> =
        tensors.iter().zip(&bytes).map(|((name, t), b)| (*name, TensorView::new(st_dtype(t.dtype()), t.shape().to_vec(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, &None, path).unwrap();
}

/// out and lse from a file the CLI wrote, as (dtype, shape, raw bytes).
fn read_outputs(path: &Path) -> HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(name, v)| (name, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect()
}

fn random(rng: &mut StdRng, shape: &[usize], dtype: DType, amp: f32) -> Tensor {
    let n = shape.iter().product();
    let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-amp..amp)).collect();
    Tensor::from_f32(&x, shape, dtype).unwrap()
}

fn i32s(x: &[i32]) -> Tensor {
    Tensor::from_i32(x.to_vec(), &[x.len()]).unwrap()
}

/// The CLI binary: FLASH_ATTN_CLI if set, else cargo's where it exists, else a `flash-attn` beside this test
/// binary (the bundle's copy on the GPU machine, where cargo's build path does not exist).
fn cli<S: AsRef<OsStr>>(args: &[S]) -> Output {
    static BIN_PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let bin = BIN_PATH.get_or_init(|| {
        if let Some(b) = std::env::var_os("FLASH_ATTN_CLI") {
            return b.into();
        }
        let beside = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("flash-attn")));
        match beside {
            Some(b) if !Path::new(BIN).exists() && b.exists() => b,
            _ => BIN.into(),
        }
    });
    Command::new(bin).args(args).output().unwrap_or_else(|e| panic!("the flash-attn binary {} runs: {e}", bin.display()))
}

/// Runs `flash-attn run --device cpu` on `inputs` with `extra` options; returns out and lse as written.
fn run_cli(dir: &TempDir, inputs: &Inputs, extra: &[&str]) -> HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    run_cli_on(dir, inputs, extra, "cpu")
}

/// `run_cli` with `--device device`.
fn run_cli_on(dir: &TempDir, inputs: &Inputs, extra: &[&str], device: &str) -> HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let (input, output) = (dir.path("in.safetensors"), dir.path("out.safetensors"));
    write(&input, inputs);
    let mut args = vec!["run", "--input", input.to_str().unwrap(), "--output", output.to_str().unwrap(), "--device", device];
    args.extend_from_slice(extra);
    let o = cli(&args);
    assert!(o.status.success(), "flash-attn {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    read_outputs(&output)
}

/// Asserts the CLI's outputs are bit-identical to the library's.
#[track_caller]
fn assert_same(got: &HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>, want: &flash_attn::FwdOutput) {
    assert_eq!(got.len(), 2, "the output file holds out and lse only");
    for (name, t) in [("out", &want.out), ("lse", &want.lse)] {
        let (dtype, shape, bytes) = &got[name];
        assert_eq!(*dtype, st_dtype(t.dtype()), "{name} dtype");
        assert_eq!(shape, t.shape(), "{name} shape");
        assert!(*bytes == t.to_bytes().unwrap(), "{name} differs from the library's");
    }
}

fn dense_inputs(dtype: DType, seed: u64) -> Inputs {
    let mut rng = StdRng::seed_from_u64(seed);
    let (b, sq, sk, hq, hk, d) = (2, 9, 13, 4, 2, 32);
    vec![("q", random(&mut rng, &[b, sq, hq, d], dtype, 2.0)), ("k", random(&mut rng, &[b, sk, hk, d], dtype, 2.0)), ("v", random(&mut rng, &[b, sk, hk, d], dtype, 1.0))]
}

/// Three sequences (one empty on the query side) packed; with `seqused`, only a prefix of each slot is used.
fn varlen_inputs(dtype: DType, seqused: bool) -> Inputs {
    let mut rng = StdRng::seed_from_u64(7);
    let (hq, hk, d) = (4, 1, 64);
    let (cu_q, cu_k) = ([0, 5, 5, 17], [0, 8, 11, 20]);
    let mut t: Inputs = vec![
        ("q", random(&mut rng, &[17, hq, d], dtype, 2.0)),
        ("k", random(&mut rng, &[20, hk, d], dtype, 2.0)),
        ("v", random(&mut rng, &[20, hk, d], dtype, 1.0)),
        ("cu_seqlens_q", i32s(&cu_q)),
        ("cu_seqlens_k", i32s(&cu_k)),
    ];
    if seqused {
        t.push(("seqused_q", i32s(&[3, 0, 12])));
        t.push(("seqused_k", i32s(&[8, 2, 4])));
    }
    t
}

fn get<'a>(inputs: &'a Inputs, name: &str) -> Option<&'a Tensor> {
    inputs.iter().find(|(n, _)| *n == name).map(|(_, t)| t)
}

/// The varlen layout of packed inputs, with max_seqlen from the lengths as the CLI computes it.
fn varlen_of(inputs: &Inputs) -> Option<Varlen<'_>> {
    let cu_q = get(inputs, "cu_seqlens_q")?;
    let cu_k = get(inputs, "cu_seqlens_k").unwrap();
    let (used_q, used_k) = (get(inputs, "seqused_q"), get(inputs, "seqused_k"));
    let max = |cu: &Tensor, used: Option<&Tensor>| -> usize {
        match used {
            Some(u) => u.to_i32_vec().unwrap().into_iter().max().unwrap_or(0) as usize,
            None => cu.to_i32_vec().unwrap().windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0) as usize,
        }
    };
    Some(Varlen { cu_seqlens_q: cu_q, cu_seqlens_k: cu_k, max_seqlen_q: Some(max(cu_q, used_q)), max_seqlen_k: Some(max(cu_k, used_k)), seqused_q: used_q, seqused_k: used_k })
}

/// The library's forward called directly.
fn library(inputs: &Inputs, opts: &AttnOptions) -> flash_attn::FwdOutput {
    let (q, k, v) = (get(inputs, "q").unwrap(), get(inputs, "k").unwrap(), get(inputs, "v").unwrap());
    match varlen_of(inputs) {
        None => fwd(q, k, v, opts).unwrap(),
        Some(varlen) => varlen_fwd(q, k, v, &varlen, opts).unwrap(),
    }
}

/// The library's forward then backward called directly, with `dout` from the inputs.
fn library_bwd(inputs: &Inputs, opts: &AttnOptions, deterministic: bool) -> (flash_attn::FwdOutput, flash_attn::BwdOutput) {
    let (q, k, v) = (get(inputs, "q").unwrap(), get(inputs, "k").unwrap(), get(inputs, "v").unwrap());
    let dout = get(inputs, "dout").unwrap();
    let f = library(inputs, opts);
    let g = match varlen_of(inputs) {
        None => bwd(dout, q, k, v, &f.out, &f.lse, opts, deterministic).unwrap(),
        Some(varlen) => varlen_bwd(dout, q, k, v, &f.out, &f.lse, &varlen, opts, deterministic).unwrap(),
    };
    (f, g)
}

/// `inputs` with a random `dout` of q's dtype and shape added.
fn with_dout(mut inputs: Inputs, seed: u64) -> Inputs {
    let q = get(&inputs, "q").unwrap();
    let (shape, dtype) = (q.shape().to_vec(), q.dtype());
    let dout = random(&mut StdRng::seed_from_u64(seed), &shape, dtype, 1.0);
    inputs.push(("dout", dout));
    inputs
}

/// Asserts the CLI's `--backward` outputs are bit-identical to the library's forward and backward.
#[track_caller]
fn assert_same_bwd(got: &HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>, want: &(flash_attn::FwdOutput, flash_attn::BwdOutput)) {
    assert_eq!(got.len(), 5, "the output file holds out, lse, dq, dk and dv only");
    let (f, g) = want;
    for (name, t) in [("out", &f.out), ("lse", &f.lse), ("dq", &g.dq), ("dk", &g.dk), ("dv", &g.dv)] {
        let (dtype, shape, bytes) = &got[name];
        assert_eq!(*dtype, st_dtype(t.dtype()), "{name} dtype");
        assert_eq!(shape, t.shape(), "{name} shape");
        assert!(*bytes == t.to_bytes().unwrap(), "{name} differs from the library's");
    }
}

#[test]
fn dense_matches_library() {
    let dir = TempDir::new();
    for (dtype, seed) in [(DType::BF16, 1), (DType::F16, 2)] {
        let inputs = dense_inputs(dtype, seed);
        assert_same(&run_cli(&dir, &inputs, &[]), &library(&inputs, &AttnOptions::default()));
    }
}

#[test]
fn varlen_matches_library() {
    let dir = TempDir::new();
    for (dtype, seqused) in [(DType::BF16, false), (DType::F16, false), (DType::BF16, true)] {
        let inputs = varlen_inputs(dtype, seqused);
        assert_same(&run_cli(&dir, &inputs, &[]), &library(&inputs, &AttnOptions::default()));
        let causal = AttnOptions { causal: true, ..Default::default() };
        assert_same(&run_cli(&dir, &inputs, &["--causal"]), &library(&inputs, &causal));
    }
}

#[test]
fn backward_matches_library() {
    let dir = TempDir::new();
    let causal = AttnOptions { causal: true, ..Default::default() };
    let mut cases: Vec<Inputs> = vec![with_dout(dense_inputs(DType::BF16, 11), 12), with_dout(dense_inputs(DType::F16, 13), 14)];
    for (dtype, seqused) in [(DType::BF16, false), (DType::F16, false), (DType::BF16, true)] {
        cases.push(with_dout(varlen_inputs(dtype, seqused), 15));
    }
    for inputs in &cases {
        let plain = run_cli(&dir, inputs, &["--backward"]);
        assert_same_bwd(&plain, &library_bwd(inputs, &AttnOptions::default(), false));
        // --deterministic is accepted and, on the CPU, changes no byte.
        let det = run_cli(&dir, inputs, &["--backward", "--deterministic"]);
        assert_same_bwd(&det, &library_bwd(inputs, &AttnOptions::default(), true));
        assert!(det == plain, "--deterministic changed the output");
        // Options reach the backward pass too.
        let got = run_cli(&dir, inputs, &["--backward", "--causal", "--softcap", "2", "--scale", "0.2"]);
        let opts = AttnOptions { softcap: 2.0, softmax_scale: Some(0.2), ..causal };
        assert_same_bwd(&got, &library_bwd(inputs, &opts, false));
        assert!(got["dq"] != plain["dq"], "options left dq unchanged");
        // dout without --backward is an error (the run would write no gradients), naming dout.
        let (input, output) = (dir.path("in.safetensors"), dir.path("out.safetensors"));
        expect_failure(&[OsStr::new("run"), OsStr::new("--input"), input.as_os_str(), OsStr::new("--output"), output.as_os_str(), OsStr::new("--device"), OsStr::new("cpu")], "dout is given but --backward is not");
    }
}

#[test]
fn options_take_effect() {
    let dir = TempDir::new();
    let base = AttnOptions::default();
    let cases: [(&[&str], AttnOptions); 6] = [
        (&["--causal"], AttnOptions { causal: true, ..base }),
        (&["--window", "2,1"], AttnOptions { window: (2, 1), ..base }),
        (&["--window", "-1,0"], AttnOptions { window: (-1, 0), ..base }),
        (&["--window=3,-1"], AttnOptions { window: (3, -1), ..base }),
        (&["--softcap", "0.5"], AttnOptions { softcap: 0.5, ..base }),
        (&["--scale", "0.02"], AttnOptions { softmax_scale: Some(0.02), ..base }),
    ];
    for inputs in [dense_inputs(DType::BF16, 3), varlen_inputs(DType::BF16, false)] {
        let default = run_cli(&dir, &inputs, &[]);
        for (args, opts) in &cases {
            let got = run_cli(&dir, &inputs, args);
            assert_same(&got, &library(&inputs, opts));
            assert!(got["out"] != default["out"], "{args:?} left out unchanged");
            assert!(got["lse"] != default["lse"], "{args:?} left lse unchanged");
        }
        // The canonical form: causal is the window (-1, 0).
        assert!(run_cli(&dir, &inputs, &["--causal"]) == run_cli(&dir, &inputs, &["--window", "-1,0"]));
        // Options combine.
        let opts = AttnOptions { causal: true, window: (4, -1), softcap: 1.5, softmax_scale: Some(0.3), ..Default::default() };
        assert_same(&run_cli(&dir, &inputs, &["--causal", "--window", "4,-1", "--softcap", "1.5", "--scale", "0.3"]), &library(&inputs, &opts));
    }
}

/// Runs the CLI with `args` and asserts it fails with code 2 and a `flash-attn:` message containing `needle`.
#[track_caller]
fn expect_failure<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S], needle: &str) {
    let o = cli(args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "flash-attn {args:?}: stderr {stderr:?}");
    assert!(stderr.starts_with("flash-attn: "), "flash-attn {args:?}: stderr {stderr:?}");
    assert!(stderr.contains(needle), "flash-attn {args:?}: stderr {stderr:?} does not mention {needle:?}");
}

#[test]
fn errors_exit_2_with_a_message() {
    let dir = TempDir::new();
    let (input, output) = (dir.path("in.safetensors"), dir.path("out.safetensors"));
    let (inp, out) = (input.to_str().unwrap(), output.to_str().unwrap());
    let run = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["run", "--input", inp, "--output", out, "--device", "cpu"].map(String::from).to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };

    // Missing input file.
    expect_failure(&run(&[]), "cannot read");

    // Missing tensor k.
    let mut inputs = dense_inputs(DType::BF16, 4);
    inputs.retain(|(n, _)| *n != "k");
    write(&input, &inputs);
    expect_failure(&run(&[]), "'k'");

    // q in f32.
    let mut rng = StdRng::seed_from_u64(5);
    let mut inputs = dense_inputs(DType::BF16, 4);
    inputs[0].1 = random(&mut rng, &[2, 9, 4, 32], DType::F32, 1.0);
    write(&input, &inputs);
    expect_failure(&run(&[]), "'q'");

    // A library error: head dim 264, past the largest (head dims below 256 are padded).
    let inputs: Inputs = ["q", "k", "v"].map(|n| (n, random(&mut rng, &[1, 4, 2, 264], DType::BF16, 1.0))).to_vec();
    write(&input, &inputs);
    expect_failure(&run(&[]), "head dim 264");
    // The message gives the head dims the CLI runs (it pads those between the library's).
    expect_failure(&run(&[]), "supported: 1 to 256");
    // k's head dim differing from q's (no padding then): the library names k.
    let inputs: Inputs = vec![
        ("q", random(&mut rng, &[1, 4, 2, 80], DType::BF16, 1.0)),
        ("k", random(&mut rng, &[1, 4, 2, 96], DType::BF16, 1.0)),
        ("v", random(&mut rng, &[1, 4, 2, 96], DType::BF16, 1.0)),
    ];
    write(&input, &inputs);
    expect_failure(&run(&[]), "k: head dim 96 must equal q's head dim 80");

    // Rank 3 without cu_seqlens, and bad lengths.
    let mut inputs = varlen_inputs(DType::BF16, false);
    inputs.retain(|(n, _)| *n != "cu_seqlens_k");
    write(&input, &inputs);
    expect_failure(&run(&[]), "cu_seqlens_k");
    let mut inputs = varlen_inputs(DType::BF16, false);
    inputs[3].1 = i32s(&[0, 5, 3, 17]);
    write(&input, &inputs);
    expect_failure(&run(&[]), "cu_seqlens_q");
    // A packed q with k of rank 0 (it panicked once, indexing k's rows).
    let mut inputs = varlen_inputs(DType::BF16, false);
    let k_at = inputs.iter().position(|(n, _)| *n == "k").unwrap();
    inputs[k_at].1 = Tensor::from_f32(&[0.5], &[], DType::BF16).unwrap();
    write(&input, &inputs);
    expect_failure(&run(&[]), "k: expected 3 dimensions");

    // --backward without dout, and dout of the wrong dtype or shape.
    write(&input, &dense_inputs(DType::BF16, 4));
    expect_failure(&run(&["--backward"]), "'dout'");
    expect_failure(&run(&["--backward", "--deterministic"]), "dout");
    let mut inputs = with_dout(dense_inputs(DType::F16, 4), 6);
    inputs[0].1 = random(&mut rng, &[2, 9, 4, 32], DType::BF16, 1.0);
    inputs[1].1 = random(&mut rng, &[2, 13, 2, 32], DType::BF16, 1.0);
    inputs[2].1 = random(&mut rng, &[2, 13, 2, 32], DType::BF16, 1.0);
    write(&input, &inputs);
    expect_failure(&run(&["--backward"]), "dout");
    let mut inputs = dense_inputs(DType::BF16, 4);
    inputs.push(("dout", random(&mut rng, &[2, 8, 4, 32], DType::BF16, 1.0)));
    write(&input, &inputs);
    expect_failure(&run(&["--backward"]), "dout");
    expect_failure(&run(&["--backward=1"]), "--backward");

    // Arguments, checked before the input is read.
    write(&input, &dense_inputs(DType::BF16, 4));
    expect_failure(&run(&["--bogus"]), "--bogus");
    for bad in ["1", "a,b", "1,2,3", "", "1.5,0"] {
        expect_failure(&run(&["--window", bad]), "--window");
    }
    expect_failure(&run(&["--window"]), "--window");
    expect_failure(&run(&["--scale", "x"]), "--scale");
    expect_failure(&run(&["--softcap", "inf"]), "--softcap");
    // Values float32 cannot hold fail rather than round: a softcap or dropout rounded to 0 would be off.
    for (flag, bad) in [("--softcap", "1e-300"), ("--softcap", "1e39"), ("--scale", "1e-50"), ("--dropout", "1e-46"), ("--dropout", "0.9999999999")] {
        expect_failure(&run(&[flag, bad, "--seed", "1"]), flag);
    }
    expect_failure(&run(&["--device", "tpu"]), "--device");
    expect_failure(&["run", "--output", out], "--input");
    expect_failure(&["frobnicate"], "frobnicate");
    expect_failure(&["demo", "--causal"], "--causal");

    // No subcommand: usage on stderr, code 2.
    let o = cli::<&str>(&[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Usage"));
    // --help: usage on stdout, code 0.
    for args in [&["--help"][..], &["run", "--help"]] {
        let o = cli(args);
        assert!(o.status.success());
        assert!(String::from_utf8_lossy(&o.stdout).contains("Usage"));
    }
    assert!(!output.exists(), "no output file is written on failure");
}

/// `--output` naming the input file (the same path, another spelling of it, a hard link) is refused before
/// anything is written: the input is left as it was.
#[test]
fn output_naming_the_input_is_refused() {
    let dir = TempDir::new();
    let input = dir.path("in.safetensors");
    write(&input, &dense_inputs(DType::BF16, 4));
    let before = std::fs::read(&input).unwrap();
    let inp = input.to_str().unwrap().to_string();
    let respelt = format!("{}/./in.safetensors", input.parent().unwrap().to_str().unwrap());
    let mut outputs = vec![inp.clone(), respelt];
    #[cfg(unix)]
    {
        let link = dir.path("link.safetensors");
        std::fs::hard_link(&input, &link).unwrap();
        outputs.push(link.to_str().unwrap().to_string());
    }
    for out in &outputs {
        expect_failure(&["run", "--input", inp.as_str(), "--output", out.as_str(), "--device", "cpu"], "--output");
        assert!(std::fs::read(&input).unwrap() == before, "--output {out}: the input file changed");
    }
}

/// A dense batch of empty tensors (no query and no key rows) at the largest batch validation admits runs in
/// no time and memory (the CPU path's per-sequence table was allocated for it: 172 GB, an abort), forward and
/// backward, and writes empty outputs of the right shapes.
#[test]
fn empty_tensors_in_a_huge_batch_run() {
    let dir = TempDir::new();
    let b = i32::MAX as usize - 1;
    let empty = |shape: &[usize]| Tensor::from_f32(&[], shape, DType::F16).unwrap();
    let inputs: Inputs = vec![("q", empty(&[b, 0, 2, 64])), ("k", empty(&[b, 0, 2, 64])), ("v", empty(&[b, 0, 2, 64]))];
    let got = run_cli(&dir, &inputs, &[]);
    assert_eq!(got["out"].1, [b, 0, 2, 64]);
    assert_eq!(got["lse"].1, [b, 2, 0]);
    let mut inputs = inputs;
    inputs.push(("dout", empty(&[b, 0, 2, 64])));
    let got = run_cli(&dir, &inputs, &["--backward"]);
    for name in ["dq", "dk", "dv"] {
        assert_eq!(got[name].1, [b, 0, 2, 64], "{name}");
    }
    // Heads instead of rows: q [B, 1, 0, D] (no query heads), k and v [B, 0, 1, D].
    let inputs: Inputs = vec![("q", empty(&[b, 1, 0, 64])), ("k", empty(&[b, 0, 1, 64])), ("v", empty(&[b, 0, 1, 64]))];
    assert_eq!(run_cli(&dir, &inputs, &[])["out"].1, [b, 1, 0, 64]);
}

/// A KV-cache input file: B = 3, Sq = 2, S_new = 3, Hq = 4, Hk = 2, D = 64, caches of 40 entries per row
/// (contiguous, 5 rows picked by cache_batch_idx; or paged, 8 blocks of 5 per row from a pool of 30),
/// rotary over half the head dim in f32, leftpad on the first row.
fn kvcache_inputs(dtype: DType, paged: bool, seed: u64) -> Inputs {
    let mut rng = StdRng::seed_from_u64(seed);
    let (b, sq, s_new, hq, hk, d, cap) = (3, 2, 3, 4, 2, 64, 40);
    let cache_shape = if paged { [30, 5, hk, d] } else { [5, cap, hk, d] };
    let mut t: Inputs = vec![
        ("q", random(&mut rng, &[b, sq, hq, d], dtype, 2.0)),
        ("k_cache", random(&mut rng, &cache_shape, dtype, 2.0)),
        ("v_cache", random(&mut rng, &cache_shape, dtype, 1.0)),
        ("cache_seqlens", i32s(&[10, 0, 37])),
        ("k_new", random(&mut rng, &[b, s_new, hk, d], dtype, 2.0)),
        ("v_new", random(&mut rng, &[b, s_new, hk, d], dtype, 1.0)),
        ("rotary_cos", random(&mut rng, &[cap + sq, 16], DType::F32, 1.0)),
        ("rotary_sin", random(&mut rng, &[cap + sq, 16], DType::F32, 1.0)),
        ("cache_leftpad", i32s(&[4, 0, 0])),
    ];
    if paged {
        let mut blocks: Vec<i32> = (0..30).collect();
        blocks.reverse();
        t.push(("block_table", Tensor::from_i32(blocks[..24].to_vec(), &[3, 8]).unwrap()));
    } else {
        t.push(("cache_batch_idx", i32s(&[3, 0, 1])));
    }
    t
}

/// The library's KV-cache forward on copies of the caches: out, lse and the updated caches.
fn library_kvcache(inputs: &Inputs, opts: &AttnOptions, kv: &KvCacheOptions) -> Vec<(&'static str, Tensor)> {
    library_kvcache_on(inputs, opts, kv, flash_attn::Device::Cpu)
}

/// `library_kvcache` on `device` (the results back on the host).
fn library_kvcache_on(inputs: &Inputs, opts: &AttnOptions, kv: &KvCacheOptions, device: flash_attn::Device) -> Vec<(&'static str, Tensor)> {
    let on: Vec<(&str, Tensor)> = inputs.iter().map(|(n, t)| (*n, t.to_device(device).unwrap())).collect();
    let inputs = &on;
    let (mut k_cache, mut v_cache) = (get(inputs, "k_cache").unwrap().clone(), get(inputs, "v_cache").unwrap().clone());
    let cache = KvCache {
        cache_seqlens: get(inputs, "cache_seqlens").unwrap(),
        block_table: get(inputs, "block_table"),
        k_new: get(inputs, "k_new"),
        v_new: get(inputs, "v_new"),
        rotary_cos: get(inputs, "rotary_cos"),
        rotary_sin: get(inputs, "rotary_sin"),
        cache_batch_idx: get(inputs, "cache_batch_idx"),
        cache_leftpad: get(inputs, "cache_leftpad"),
        alibi_slopes: get(inputs, "alibi_slopes"),
    };
    let o = fwd_kvcache(get(inputs, "q").unwrap(), &mut k_cache, &mut v_cache, &cache, opts, kv).unwrap();
    let host = |t: Tensor| t.to_device(flash_attn::Device::Cpu).unwrap();
    vec![("out", host(o.out)), ("lse", host(o.lse)), ("k_cache", host(k_cache)), ("v_cache", host(v_cache))]
}

/// Asserts the CLI wrote exactly `want`, bit for bit.
#[track_caller]
fn assert_same_tensors(got: &HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>, want: &[(&str, Tensor)]) {
    assert_eq!(got.len(), want.len(), "the output file holds {:?}", want.iter().map(|w| w.0).collect::<Vec<_>>());
    for (name, t) in want {
        let (dtype, shape, bytes) = &got[*name];
        assert_eq!(*dtype, st_dtype(t.dtype()), "{name} dtype");
        assert_eq!(shape, t.shape(), "{name} shape");
        assert!(*bytes == t.to_bytes().unwrap(), "{name} differs from the library's");
    }
}

#[test]
fn kvcache_matches_library() {
    let dir = TempDir::new();
    let base = AttnOptions::default();
    let cases: [(&[&str], AttnOptions, KvCacheOptions); 5] = [
        (&[], base, KvCacheOptions::default()),
        (&["--causal"], AttnOptions { causal: true, ..base }, KvCacheOptions::default()),
        (&["--causal", "--rotary-interleaved", "--num-splits", "3"], AttnOptions { causal: true, ..base }, KvCacheOptions { rotary_interleaved: true, num_splits: 3 }),
        (&["--window", "6,-1", "--softcap", "2", "--num-splits=2"], AttnOptions { window: (6, -1), softcap: 2.0, ..base }, KvCacheOptions { num_splits: 2, ..Default::default() }),
        (&["--scale", "0.1", "--num-splits", "0"], AttnOptions { softmax_scale: Some(0.1), ..base }, KvCacheOptions::default()),
    ];
    for (dtype, paged) in [(DType::BF16, false), (DType::F16, true), (DType::BF16, true)] {
        let inputs = kvcache_inputs(dtype, paged, 21);
        let default = run_cli(&dir, &inputs, &[]);
        for (args, opts, kv) in &cases {
            let got = run_cli(&dir, &inputs, args);
            assert_same_tensors(&got, &library_kvcache(&inputs, opts, kv));
            if !args.is_empty() {
                assert!(got["out"] != default["out"], "{args:?} left out unchanged");
            }
        }
        // The appended rows changed the caches; without k_new / v_new they come back as they went in.
        assert!(default["k_cache"].2 != get(&inputs, "k_cache").unwrap().to_bytes().unwrap());
        let mut read_only = inputs.clone();
        read_only.retain(|(n, _)| !["k_new", "v_new"].contains(n));
        let got = run_cli(&dir, &read_only, &["--causal"]);
        assert_same_tensors(&got, &library_kvcache(&read_only, &AttnOptions { causal: true, ..base }, &KvCacheOptions::default()));
        assert!(got["k_cache"].2 == get(&inputs, "k_cache").unwrap().to_bytes().unwrap(), "k_cache changed without k_new");
        // Only the required inputs.
        let mut minimal = read_only.clone();
        minimal.retain(|(n, _)| ["q", "k_cache", "v_cache", "cache_seqlens", "block_table"].contains(n));
        assert_same_tensors(&run_cli(&dir, &minimal, &[]), &library_kvcache(&minimal, &base, &KvCacheOptions::default()));
    }
}

/// Host tensor `t` with its last dim zero-padded to `dp` (the test's own copy of what the CLI does).
fn padded(t: &Tensor, dp: usize) -> Tensor {
    let (bytes, es, d) = (t.to_bytes().unwrap(), t.dtype().size(), *t.shape().last().unwrap());
    let mut out = vec![0u8; bytes.len() / d * dp];
    for (r, row) in bytes.chunks(d * es).enumerate() {
        out[r * dp * es..][..d * es].copy_from_slice(row);
    }
    let mut shape = t.shape().to_vec();
    *shape.last_mut().unwrap() = dp;
    Tensor::from_bytes(&out, &shape, t.dtype()).unwrap()
}

/// `t` with its last dim cut to `d`; asserts the columns cut off are all zero (what makes padding exact).
fn cut(t: &Tensor, d: usize) -> Tensor {
    let (bytes, es, dp) = (t.to_bytes().unwrap(), t.dtype().size(), *t.shape().last().unwrap());
    let mut out = Vec::new();
    for row in bytes.chunks(dp * es) {
        out.extend_from_slice(&row[..d * es]);
        assert!(row[d * es..].iter().all(|&b| b == 0), "a padded column came out nonzero");
    }
    let mut shape = t.shape().to_vec();
    *shape.last_mut().unwrap() = d;
    Tensor::from_bytes(&out, &shape, t.dtype()).unwrap()
}

/// Head dims without kernels of their own (80 -> 96, 48 -> 64): the CLI pads the file's tensors, scales
/// by 1/sqrt(d) of the file's head dim and writes outputs of that head dim, bitwise what the library
/// gives on the same inputs padded by hand; out also against the f64 reference (dense); the KV cache
/// (appended rows, rotary) too.
#[test]
fn head_dims_without_kernels_are_padded() {
    let dir = TempDir::new();
    let mut rng = StdRng::seed_from_u64(31);
    // Dense with the backward, d 80.
    let (b, sq, sk, hq, hk, d, dp) = (2, 7, 11, 4, 2, 80, 96);
    let inputs: Inputs = vec![
        ("q", random(&mut rng, &[b, sq, hq, d], DType::BF16, 2.0)),
        ("k", random(&mut rng, &[b, sk, hk, d], DType::BF16, 2.0)),
        ("v", random(&mut rng, &[b, sk, hk, d], DType::BF16, 1.0)),
        ("dout", random(&mut rng, &[b, sq, hq, d], DType::BF16, 1.0)),
    ];
    let got = run_cli(&dir, &inputs, &["--causal", "--backward"]);
    let pad: Inputs = inputs.iter().map(|(n, t)| (*n, padded(t, dp))).collect();
    let opts = AttnOptions { causal: true, softmax_scale: Some(AttnOptions::default_scale(d)), ..Default::default() };
    let (f, g) = library_bwd(&pad, &opts, false);
    let want = [("out", cut(&f.out, d)), ("lse", f.lse.clone()), ("dq", cut(&g.dq, d)), ("dk", cut(&g.dk, d)), ("dv", cut(&g.dv, d))];
    assert_same_tensors(&got, &want);
    let f32s = |n: &str| get(&inputs, n).unwrap().to_f32_vec().unwrap();
    let o = common::RefOpts { scale: 1.0 / (d as f64).sqrt(), softcap: 0.0, causal: true, window: (-1, -1) };
    let (ro, _) = common::reference_fwd(&f32s("q"), &f32s("k"), &f32s("v"), b, sq, sk, hq, hk, d, &o);
    let out = want[0].1.to_f32_vec().unwrap();
    let err = out.iter().zip(&ro).map(|(a, r)| (*a as f64 - r).abs()).fold(0.0, f64::max);
    assert!(err < 2e-2, "out against the f64 reference: max |diff| {err}");
    // Packed, d 48.
    let (d, dp) = (48, 64);
    let inputs: Inputs = vec![
        ("q", random(&mut rng, &[9, 2, d], DType::F16, 2.0)),
        ("k", random(&mut rng, &[12, 1, d], DType::F16, 2.0)),
        ("v", random(&mut rng, &[12, 1, d], DType::F16, 1.0)),
        ("cu_seqlens_q", i32s(&[0, 4, 9])),
        ("cu_seqlens_k", i32s(&[0, 5, 12])),
    ];
    let got = run_cli(&dir, &inputs, &[]);
    let pad: Inputs = inputs.iter().map(|(n, t)| (*n, if n.starts_with("cu_") { t.clone() } else { padded(t, dp) })).collect();
    let f = library(&pad, &AttnOptions { softmax_scale: Some(AttnOptions::default_scale(d)), ..Default::default() });
    assert_same_tensors(&got, &[("out", cut(&f.out, d)), ("lse", f.lse.clone())]);
    // KV cache with appended rows and rotary, d 80.
    let (d, dp, cap) = (80, 96, 20);
    let inputs: Inputs = vec![
        ("q", random(&mut rng, &[2, 1, 4, d], DType::BF16, 2.0)),
        ("k_cache", random(&mut rng, &[2, cap, 2, d], DType::BF16, 2.0)),
        ("v_cache", random(&mut rng, &[2, cap, 2, d], DType::BF16, 1.0)),
        ("cache_seqlens", i32s(&[3, 15])),
        ("k_new", random(&mut rng, &[2, 2, 2, d], DType::BF16, 2.0)),
        ("v_new", random(&mut rng, &[2, 2, 2, d], DType::BF16, 1.0)),
        ("rotary_cos", random(&mut rng, &[cap, 16], DType::F32, 1.0)),
        ("rotary_sin", random(&mut rng, &[cap, 16], DType::F32, 1.0)),
    ];
    let got = run_cli(&dir, &inputs, &["--causal"]);
    let pad: Inputs = inputs
        .iter()
        .map(|(n, t)| (*n, if ["q", "k_cache", "v_cache", "k_new", "v_new"].contains(n) { padded(t, dp) } else { t.clone() }))
        .collect();
    let opts = AttnOptions { causal: true, softmax_scale: Some(AttnOptions::default_scale(d)), ..Default::default() };
    let want: Vec<(&str, Tensor)> =
        library_kvcache(&pad, &opts, &KvCacheOptions::default()).into_iter().map(|(n, t)| (n, if n == "lse" { t } else { cut(&t, d) })).collect();
    assert_same_tensors(&got, &want);
    assert!(got["k_cache"].2 != get(&inputs, "k_cache").unwrap().to_bytes().unwrap(), "the appended rows changed k_cache");
    // A rotary dim past the file's head dim (but within the padded one) is the caller's error.
    let mut wide = inputs.clone();
    for (n, t) in wide.iter_mut() {
        if n.starts_with("rotary_") {
            *t = random(&mut rng, &[cap, 44], DType::F32, 1.0);
        }
    }
    let input = dir.path("wide.safetensors");
    write(&input, &wide);
    let fails = |input: &Path, needle: &str| expect_failure(&[OsStr::new("run"), OsStr::new("--input"), input.as_os_str(), OsStr::new("--output"), dir.path("o.safetensors").as_os_str()], needle);
    fails(&input, "rotary_cos");
    // New keys already at the padded width would pass the library's checks and lose their extra
    // columns: an error naming them.
    for name in ["k_new", "v_new"] {
        let mut wide = inputs.clone();
        for (n, t) in wide.iter_mut() {
            if *n == name {
                *t = random(&mut rng, &[2, 2, 2, dp], DType::BF16, 1.0);
            }
        }
        write(&input, &wide);
        fails(&input, &format!("{name}: head dim {dp} must be q's head dim {d}"));
    }
    // The same for dout, and a shape error the library finds on padded inputs says so.
    let (b, s, d, dp) = (1, 5, 40, 64);
    let dense = |dout_d: usize, v_len: usize, rng: &mut StdRng| -> Inputs {
        vec![
            ("q", random(rng, &[b, s, 2, d], DType::F16, 1.0)),
            ("k", random(rng, &[b, s, 1, d], DType::F16, 1.0)),
            ("v", random(rng, &[b, v_len, 1, d], DType::F16, 1.0)),
            ("dout", random(rng, &[b, s, 2, dout_d], DType::F16, 1.0)),
        ]
    };
    let input = dir.path("dense.safetensors");
    let fails_bwd = |input: &Path, needle: &str| expect_failure(&[OsStr::new("run"), OsStr::new("--backward"), OsStr::new("--input"), input.as_os_str(), OsStr::new("--output"), dir.path("o.safetensors").as_os_str()], needle);
    write(&input, &dense(dp, s, &mut rng));
    fails_bwd(&input, &format!("dout: head dim {dp} must be q's head dim {d}"));
    write(&input, &dense(d, s + 1, &mut rng));
    fails_bwd(&input, &format!("head dim {d} runs zero-padded to {dp}"));
}

/// A tensor the mode does not read is an error naming it (a misspelt `alibi_slopes` would otherwise
/// run without ALiBi), in each mode.
#[test]
fn unknown_tensors_exit_2() {
    let dir = TempDir::new();
    let mut rng = StdRng::seed_from_u64(44);
    let input = dir.path("in.safetensors");
    for (mut inputs, extra) in [(dense_inputs(DType::BF16, 41), "alibi_slope"), (varlen_inputs(DType::F16, true), "seqused_K"), (kvcache_inputs(DType::BF16, false, 42), "rotary_coss")] {
        inputs.push((extra, random(&mut rng, &[4], DType::F32, 1.0)));
        write(&input, &inputs);
        expect_failure(&[OsStr::new("run"), OsStr::new("--input"), input.as_os_str(), OsStr::new("--output"), dir.path("o.safetensors").as_os_str()], &format!("unknown tensor '{extra}'"));
    }
    // An earlier run's outputs in the file are not read: the same results as without them.
    let inputs = with_dout(dense_inputs(DType::BF16, 45), 46);
    let plain = run_cli(&dir, &inputs, &["--causal", "--backward"]);
    let mut with_outputs = inputs.clone();
    for name in ["out", "lse", "dq", "dk", "dv", "s_dmask"] {
        with_outputs.push((name, random(&mut rng, &[4], DType::F32, 1.0)));
    }
    assert_eq!(run_cli(&dir, &with_outputs, &["--causal", "--backward"]), plain);
}

/// On a GPU (skipped with a notice elsewhere): `--device cuda` writes bitwise what the library's CUDA
/// path returns for the same call (the caches too), contiguous and paged, split or not.
#[test]
fn kvcache_on_cuda_matches_library() {
    if !flash_attn::cuda::available() {
        eprintln!("SKIPPED kvcache_on_cuda_matches_library: no CUDA GPU on this machine");
        return;
    }
    let dir = TempDir::new();
    let base = AttnOptions::default();
    for (dtype, paged) in [(DType::BF16, false), (DType::F16, true)] {
        let inputs = kvcache_inputs(dtype, paged, 21);
        for (args, opts, kv) in [
            (&["--causal"][..], AttnOptions { causal: true, ..base }, KvCacheOptions::default()),
            (&["--window", "6,-1", "--softcap", "2", "--num-splits=2", "--rotary-interleaved"][..], AttnOptions { window: (6, -1), softcap: 2.0, ..base }, KvCacheOptions { num_splits: 2, rotary_interleaved: true }),
        ] {
            assert_same_tensors(&run_cli_on(&dir, &inputs, args, "cuda"), &library_kvcache_on(&inputs, &opts, &kv, flash_attn::Device::Cuda(0)));
        }
    }
}

/// Packed q over paged k, v: key counts from cu_seqlens_k, from seqused_k alone, or both.
fn paged_inputs(dtype: DType, counts: u8) -> Inputs {
    let mut rng = StdRng::seed_from_u64(8);
    let (hq, hk, d) = (4, 2, 32);
    let mut t: Inputs = vec![
        ("q", random(&mut rng, &[17, hq, d], dtype, 2.0)),
        ("k", random(&mut rng, &[7, 4, hk, d], dtype, 2.0)),
        ("v", random(&mut rng, &[7, 4, hk, d], dtype, 1.0)),
        ("cu_seqlens_q", i32s(&[0, 5, 5, 17])),
        ("block_table", Tensor::from_i32(vec![6, 2, 0, 5, 1, 3, 4, 0, 0], &[3, 3]).unwrap()),
    ];
    if counts != 2 {
        t.push(("cu_seqlens_k", i32s(&[0, 9, 12, 23])));
    }
    if counts != 0 {
        t.push(("seqused_k", i32s(&[7, 3, 4])));
    }
    t
}

#[test]
fn paged_varlen_matches_library() {
    let dir = TempDir::new();
    for (dtype, counts) in [(DType::BF16, 0), (DType::F16, 1), (DType::BF16, 2)] {
        let inputs = paged_inputs(dtype, counts);
        for (args, opts) in [(&[][..], AttnOptions::default()), (&["--causal", "--softcap", "3"][..], AttnOptions { causal: true, softcap: 3.0, ..Default::default() })] {
            let (cu_k, used_k) = (get(&inputs, "cu_seqlens_k"), get(&inputs, "seqused_k"));
            let max_k = match used_k {
                Some(u) => u.to_i32_vec().unwrap().into_iter().max().unwrap() as usize,
                None => cu_k.unwrap().to_i32_vec().unwrap().windows(2).map(|w| w[1] - w[0]).max().unwrap() as usize,
            };
            let varlen = PagedVarlen {
                cu_seqlens_q: get(&inputs, "cu_seqlens_q").unwrap(),
                cu_seqlens_k: cu_k,
                max_seqlen_q: Some(12),
                max_seqlen_k: Some(max_k),
                seqused_q: None,
                seqused_k: used_k,
                block_table: get(&inputs, "block_table").unwrap(),
            };
            let (q, k, v) = (get(&inputs, "q").unwrap(), get(&inputs, "k").unwrap(), get(&inputs, "v").unwrap());
            let want = varlen_fwd_paged(q, k, v, &varlen, &opts).unwrap();
            assert_same(&run_cli(&dir, &inputs, args), &want);
        }
    }
}

#[test]
fn kvcache_and_paged_errors_exit_2() {
    let dir = TempDir::new();
    let (input, output) = (dir.path("in.safetensors"), dir.path("out.safetensors"));
    let (inp, out) = (input.to_str().unwrap(), output.to_str().unwrap());
    // On a GPU too: the CLI checks the index tensors' host copies (the library's CUDA path clamps them).
    let devices: &[&str] = if flash_attn::cuda::available() { &["cpu", "cuda"] } else { &["cpu"] };
    for &device in devices {
        let run = |extra: &[&str]| -> Vec<String> {
            let mut a: Vec<String> = ["run", "--input", inp, "--output", out, "--device", device].map(String::from).to_vec();
            a.extend(extra.iter().map(|s| s.to_string()));
            a
        };
        // KV-cache flags and inputs without k_cache.
        write(&input, &dense_inputs(DType::BF16, 4));
        expect_failure(&run(&["--num-splits", "2"]), "--num-splits");
        expect_failure(&run(&["--rotary-interleaved"]), "--rotary-interleaved");
        expect_failure(&run(&["--num-splits", "x"]), "--num-splits");
        expect_failure(&run(&["--num-splits", "-1"]), "--num-splits");
        expect_failure(&run(&["--rotary-interleaved=1"]), "--rotary-interleaved");
        let mut inputs = dense_inputs(DType::BF16, 4);
        inputs.push(("cache_seqlens", i32s(&[1, 1])));
        write(&input, &inputs);
        expect_failure(&run(&[]), "cache_seqlens");

        // KV-cache mode: what it refuses, what it misses, and the library's own checks.
        let mut inputs = kvcache_inputs(DType::BF16, false, 5);
        write(&input, &inputs);
        expect_failure(&run(&["--backward"]), "--backward");
        inputs.push(("k", random(&mut StdRng::seed_from_u64(1), &[3, 2, 2, 64], DType::BF16, 1.0)));
        write(&input, &inputs);
        expect_failure(&run(&[]), "k is given");
        let mut inputs = kvcache_inputs(DType::BF16, false, 5);
        inputs.retain(|(n, _)| *n != "cache_seqlens");
        write(&input, &inputs);
        expect_failure(&run(&[]), "'cache_seqlens'");
        let mut inputs = kvcache_inputs(DType::BF16, false, 5);
        inputs.retain(|(n, _)| *n != "v_new");
        write(&input, &inputs);
        expect_failure(&run(&[]), "v_new");
        let mut inputs = kvcache_inputs(DType::BF16, false, 5);
        inputs.iter_mut().find(|(n, _)| *n == "cache_seqlens").unwrap().1 = i32s(&[10, 0, 38]);
        write(&input, &inputs);
        expect_failure(&run(&[]), "cache_seqlens");
        let mut inputs = kvcache_inputs(DType::BF16, true, 5);
        inputs.iter_mut().find(|(n, _)| *n == "block_table").unwrap().1 = Tensor::from_i32((0..24).map(|i| if i == 16 { 30 } else { i }).collect(), &[3, 8]).unwrap();
        write(&input, &inputs);
        expect_failure(&run(&[]), "block_table");
        let mut inputs = kvcache_inputs(DType::BF16, true, 5);
        inputs.push(("cache_batch_idx", i32s(&[0, 1, 2])));
        write(&input, &inputs);
        expect_failure(&run(&[]), "cache_batch_idx");
        let mut inputs = kvcache_inputs(DType::BF16, false, 5);
        inputs.iter_mut().find(|(n, _)| *n == "rotary_cos").unwrap().1 = random(&mut StdRng::seed_from_u64(2), &[42, 16], DType::F16, 1.0);
        write(&input, &inputs);
        expect_failure(&run(&[]), "rotary_cos");
        let mut inputs = kvcache_inputs(DType::BF16, false, 5);
        inputs.iter_mut().find(|(n, _)| *n == "cache_leftpad").unwrap().1 = i32s(&[11, 0, 0]);
        write(&input, &inputs);
        expect_failure(&run(&[]), "cache_leftpad");
        write(&input, &kvcache_inputs(DType::BF16, false, 5));
        expect_failure(&run(&["--num-splits", "500"]), "num_splits");

        // Paged varlen: no key counts, a dense q, --backward, a block outside k.
        let mut inputs = paged_inputs(DType::BF16, 1);
        inputs.retain(|(n, _)| !["cu_seqlens_k", "seqused_k"].contains(n));
        write(&input, &inputs);
        expect_failure(&run(&[]), "seqused_k");
        write(&input, &paged_inputs(DType::BF16, 0));
        expect_failure(&run(&["--backward"]), "--backward");
        let mut inputs = dense_inputs(DType::BF16, 4);
        inputs.push(("block_table", Tensor::from_i32(vec![0, 1], &[2, 1]).unwrap()));
        write(&input, &inputs);
        expect_failure(&run(&[]), "block_table");
        let mut inputs = paged_inputs(DType::BF16, 0);
        inputs.iter_mut().find(|(n, _)| *n == "block_table").unwrap().1 = Tensor::from_i32(vec![6, 2, 7, 5, 1, 3, 4, 0, 0], &[3, 3]).unwrap();
        write(&input, &inputs);
        expect_failure(&run(&[]), "block_table");
    }
    assert!(!output.exists(), "no output file is written on failure");
}

/// ALiBi (an `alibi_slopes` tensor in the file), dropout (`--dropout P --seed S [--offset O]`) and
/// `--return-probs`, dense and packed, forward and with `--backward` (the same mask): exactly the
/// library's `*_with` calls.
#[test]
fn alibi_dropout_and_probs_match_library() {
    let dir = TempDir::new();
    let slopes = |shape: &[usize]| Tensor::from_f32(&(0..shape.iter().product::<usize>()).map(|i| 0.5f32.powi(i as i32 % 5)).collect::<Vec<_>>(), shape, DType::F32).unwrap();
    let cases: [(Inputs, &[&str], AttnOptions, bool); 4] = [
        (dense_inputs(DType::BF16, 3), &["--causal", "--dropout", "0.3", "--seed", "42"], AttnOptions { causal: true, dropout: Dropout { p: 0.3, seed: 42, offset: 0 }, ..Default::default() }, true),
        (varlen_inputs(DType::F16, true), &["--dropout=0.5", "--seed", "7", "--offset", "18446744073709551615", "--return-probs"], AttnOptions { dropout: Dropout { p: 0.5, seed: 7, offset: u64::MAX }, ..Default::default() }, false),
        (dense_inputs(DType::F16, 4), &["--window", "3,2", "--return-probs"], AttnOptions { window: (3, 2), ..Default::default() }, true),
        (varlen_inputs(DType::BF16, false), &["--softcap", "2", "--return-probs", "--dropout", "0.1", "--seed", "5", "--offset", "9"], AttnOptions { softcap: 2.0, dropout: Dropout { p: 0.1, seed: 5, offset: 9 }, ..Default::default() }, true),
    ];
    for (i, (mut inputs, args, opts, alibi)) in cases.into_iter().enumerate() {
        let hq = get(&inputs, "q").unwrap().shape()[get(&inputs, "q").unwrap().rank() - 2];
        if alibi {
            inputs.push(("alibi_slopes", if i % 2 == 0 { slopes(&[hq]) } else { slopes(&[3, hq]) }));
        }
        let probs = args.contains(&"--return-probs");
        let inputs = with_dout(inputs, 11 + i as u64);
        let extras = Extras { alibi_slopes: get(&inputs, "alibi_slopes"), return_attn_probs: probs };
        let (q, k, v) = (get(&inputs, "q").unwrap(), get(&inputs, "k").unwrap(), get(&inputs, "v").unwrap());
        let f = match varlen_of(&inputs) {
            None => fwd_with(q, k, v, &extras, &opts).unwrap(),
            Some(vl) => varlen_fwd_with(q, k, v, &vl, &extras, &opts).unwrap(),
        };
        let mut want = vec![("out", f.out.clone()), ("lse", f.lse.clone())];
        want.extend(f.s_dmask.clone().map(|m| ("s_dmask", m)));
        let forward_only: Inputs = inputs.iter().filter(|(name, _)| *name != "dout").cloned().collect();
        assert_same_tensors(&run_cli(&dir, &forward_only, args), &want);

        // --backward: the gradients of the same mask.
        let dout = get(&inputs, "dout").unwrap();
        let g = match varlen_of(&inputs) {
            None => bwd_with(dout, q, k, v, &f.out, &f.lse, &extras, &opts, false).unwrap(),
            Some(vl) => varlen_bwd_with(dout, q, k, v, &f.out, &f.lse, &vl, &extras, &opts, false).unwrap(),
        };
        want.extend([("dq", g.dq), ("dk", g.dk), ("dv", g.dv)]);
        let args: Vec<&str> = args.iter().copied().chain(["--backward"]).collect();
        assert_same_tensors(&run_cli(&dir, &inputs, &args), &want);
    }
    // ALiBi in the KV-cache forward.
    let mut inputs = kvcache_inputs(DType::BF16, false, 5);
    let hq = get(&inputs, "q").unwrap().shape()[2];
    inputs.push(("alibi_slopes", slopes(&[hq])));
    let opts = AttnOptions { causal: true, ..Default::default() };
    let want = library_kvcache(&inputs, &opts, &KvCacheOptions::default());
    assert_same_tensors(&run_cli(&dir, &inputs, &["--causal"]), &want);
}

#[test]
fn alibi_dropout_errors_exit_2() {
    let dir = TempDir::new();
    let (input, output) = (dir.path("in.safetensors"), dir.path("out.safetensors"));
    let (inp, out) = (input.to_str().unwrap(), output.to_str().unwrap());
    let run = |extra: &[&str]| -> Vec<String> { ["run", "--input", inp, "--output", out, "--device", "cpu"].iter().chain(extra).map(|s| s.to_string()).collect() };
    let mut inputs = dense_inputs(DType::BF16, 1);
    write(&input, &inputs);
    expect_failure(&run(&["--dropout", "0.2"]), "--seed");
    expect_failure(&run(&["--seed", "3"]), "--dropout");
    expect_failure(&run(&["--offset", "3"]), "--dropout");
    expect_failure(&run(&["--dropout", "1", "--seed", "3"]), "dropout_p");
    expect_failure(&run(&["--dropout", "-0.5", "--seed", "3"]), "dropout_p");
    expect_failure(&run(&["--dropout", "x", "--seed", "3"]), "--dropout");
    expect_failure(&run(&["--dropout", "0.1", "--seed", "-3"]), "--seed");
    expect_failure(&run(&["--return-probs=1"]), "--return-probs");
    inputs.push(("alibi_slopes", Tensor::from_f32(&[0.5; 3], &[3], DType::F32).unwrap()));
    write(&input, &inputs);
    expect_failure(&run(&[]), "alibi_slopes");
    inputs.pop();
    inputs.push(("alibi_slopes", i32s(&[1, 2, 3, 4])));
    write(&input, &inputs);
    expect_failure(&run(&[]), "alibi_slopes");
    let kv = kvcache_inputs(DType::BF16, false, 2);
    write(&input, &kv);
    expect_failure(&run(&["--return-probs"]), "--return-probs");
    expect_failure(&run(&["--dropout", "0.1", "--seed", "1"]), "dropout_p");
}

/// One random input file for `malformed_inputs_exit_0_or_2`: the tensor names of one mode (dense, packed,
/// paged, KV cache) in their expected dtypes and shapes, index tensors counting up within range, then a
/// few of them broken at random (another dtype, also ones the CLI never takes; another rank or dim;
/// index values at the edges of i32; a tensor left out), float bytes at random (NaN and infinities too).
fn malformed_file(rng: &mut StdRng, path: &Path) {
    let pick = |rng: &mut StdRng, xs: &[usize]| xs[rng.gen_range(0..xs.len())];
    let (b, s, sk, h, d) = (pick(rng, &[0, 1, 2, 3]), pick(rng, &[0, 1, 3, 9]), pick(rng, &[0, 1, 5, 17]), pick(rng, &[1, 2, 4]), pick(rng, &[0, 32, 48, 64, 64, 128, 300]));
    let hk = pick(rng, &[1, h, 3]);
    let (t, blocks, page, bc) = (b * s, pick(rng, &[1, 3, 8]), pick(rng, &[1, 2, 16]), b + pick(rng, &[0, 0, 1]));
    let mode = rng.gen_range(0..4);
    // (name, dtype, shape, largest index value); the ones the mode needs always, the rest now and then.
    let tensors: Vec<(&str, Dtype, Vec<usize>, i32)> = match mode {
        0 => vec![("q", Dtype::BF16, vec![b, s, h, d], 0), ("k", Dtype::BF16, vec![b, sk, hk, d], 0), ("v", Dtype::BF16, vec![b, sk, hk, d], 0), ("dout", Dtype::BF16, vec![b, s, h, d], 0), ("alibi_slopes", Dtype::F32, vec![h], 0)],
        1 => vec![("q", Dtype::BF16, vec![t, h, d], 0), ("k", Dtype::BF16, vec![t, hk, d], 0), ("v", Dtype::BF16, vec![t, hk, d], 0), ("cu_seqlens_q", Dtype::I32, vec![b + 1], t as i32), ("cu_seqlens_k", Dtype::I32, vec![b + 1], t as i32), ("seqused_q", Dtype::I32, vec![b], s as i32), ("seqused_k", Dtype::I32, vec![b], s as i32), ("alibi_slopes", Dtype::F32, vec![h], 0)],
        2 => vec![("q", Dtype::BF16, vec![t, h, d], 0), ("k", Dtype::BF16, vec![blocks, page, hk, d], 0), ("v", Dtype::BF16, vec![blocks, page, hk, d], 0), ("cu_seqlens_q", Dtype::I32, vec![b + 1], t as i32), ("block_table", Dtype::I32, vec![b, 2], blocks as i32 - 1), ("cu_seqlens_k", Dtype::I32, vec![b + 1], (2 * page * b) as i32), ("seqused_k", Dtype::I32, vec![b], (2 * page) as i32)],
        _ => vec![("q", Dtype::BF16, vec![b, s, h, d], 0), ("k_cache", Dtype::BF16, vec![bc, sk, hk, d], 0), ("v_cache", Dtype::BF16, vec![bc, sk, hk, d], 0), ("cache_seqlens", Dtype::I32, vec![b], sk as i32), ("k_new", Dtype::BF16, vec![b, 1, hk, d], 0), ("v_new", Dtype::BF16, vec![b, 1, hk, d], 0), ("rotary_cos", Dtype::BF16, vec![sk + 2, d / 2], 0), ("rotary_sin", Dtype::BF16, vec![sk + 2, d / 2], 0), ("cache_batch_idx", Dtype::I32, vec![b], bc as i32 - 1), ("cache_leftpad", Dtype::I32, vec![b], 1), ("alibi_slopes", Dtype::F32, vec![h], 0)],
    };
    let needed = [3, 5, 5, 4][mode];
    let dtypes = [Dtype::F16, Dtype::BF16, Dtype::F32, Dtype::I32, Dtype::I64, Dtype::U8, Dtype::F64];
    let edges = [-1i32, 0, 1, 100, i32::MAX, i32::MIN];
    let mut owned: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, (name, mut dtype, mut shape, top)) in tensors.into_iter().enumerate() {
        if i >= needed && rng.gen_bool(0.6) {
            continue;
        }
        let broken = rng.gen_bool(0.1);
        if broken {
            match rng.gen_range(0..3) {
                0 => dtype = dtypes[rng.gen_range(0..dtypes.len())],
                1 => shape = (0..rng.gen_range(0..6)).map(|_| pick(rng, &[0, 1, 2, 3, 9])).collect(),
                _ => {
                    let at = rng.gen_range(0..shape.len());
                    shape[at] = pick(rng, &[0, 1, 2, 5, 300]);
                }
            }
        }
        let n: usize = shape.iter().product();
        let data: Vec<u8> = if dtype == Dtype::I32 && !(broken && rng.gen_bool(0.5)) {
            // Counting up within range (cumulative lengths), as a valid input would.
            let mut x = 0i32;
            (0..n).flat_map(|_| { let v = x.min(top.max(0)); x = x.saturating_add(rng.gen_range(0..=2)); v.to_le_bytes() }).collect()
        } else if dtype == Dtype::I32 {
            (0..n).flat_map(|_| edges[rng.gen_range(0..edges.len())].to_le_bytes()).collect()
        } else if matches!(dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32) && !broken {
            // Small finite values: [-1, 1) at the dtype's top bits (bf16 / f16 / f32 from an f32's high half).
            (0..n).flat_map(|_| { let x: f32 = rng.gen_range(-1.0..1.0); let w = x.to_bits(); match dtype { Dtype::F32 => w.to_le_bytes().to_vec(), Dtype::BF16 => ((w >> 16) as u16).to_le_bytes().to_vec(), _ => half::f16::from_f32(x).to_bits().to_le_bytes().to_vec() } }).collect()
        } else {
            (0..n * dtype.size()).map(|_| rng.gen_range(0..=255u8)).collect()
        };
        owned.push((name, dtype, shape, data));
    }
    let views: Vec<(&str, TensorView<'_>)> = owned.iter().map(|(name, dtype, shape, data)| (*name, TensorView::new(*dtype, shape.clone(), data).unwrap())).collect();
    safetensors::serialize_to_file(views, &None, path).unwrap();
}

/// Random, mostly malformed inputs and option sets: the CLI exits 0, or 2 with a `flash-attn:` message,
/// never anything else (a panic exits 101, a crash by signal) and never prints a panic (CPU, and CUDA
/// where present). Seeded (`FA_TEST_SEED`).
#[test]
fn malformed_inputs_exit_0_or_2() {
    let (seed, mut rng) = common::seeded("malformed_inputs_exit_0_or_2");
    let dir = TempDir::new();
    let (input, output) = (dir.path("in.safetensors"), dir.path("out.safetensors"));
    // (flag, good values, bad values): a flag now and then, mostly with a good value.
    let flags: [(&str, &[&str], &[&str]); 9] = [
        ("--causal", &[], &[]),
        ("--window", &["-1,0", "3,-1", "2,1"], &["a,b", "99999999999,0", "-2,1"]),
        ("--softcap", &["0", "5"], &["-1", "nan", "1e-300"]),
        ("--scale", &["0.1", "-0.5"], &["nan", "inf"]),
        ("--dropout", &["0.1", "0.5"], &["1", "-0.1", "nan", "1e-46"]),
        ("--num-splits", &["0", "3", "100000"], &["-1"]),
        ("--backward", &[], &[]),
        ("--return-probs", &[], &[]),
        ("--deterministic", &[], &[]),
    ];
    let devices: &[&str] = if flash_attn::cuda::available() { &["cpu", "cuda"] } else { &["cpu"] };
    let mut ok = 0;
    const CASES: usize = 400;
    for case in 0..CASES {
        malformed_file(&mut rng, &input);
        let device = devices[case % devices.len()];
        let mut args: Vec<String> = ["run", "--input", input.to_str().unwrap(), "--output", output.to_str().unwrap(), "--device", device].map(String::from).to_vec();
        for (flag, good, bad) in flags {
            if rng.gen_bool(0.15) {
                args.push(flag.into());
                let values = if bad.is_empty() || rng.gen_bool(0.85) { good } else { bad };
                if !values.is_empty() {
                    args.push(values[rng.gen_range(0..values.len())].into());
                }
            }
        }
        // --seed with --dropout nearly always, alone now and then.
        if rng.gen_bool(if args.iter().any(|a| a == "--dropout") { 0.9 } else { 0.05 }) {
            args.extend(["--seed".into(), if rng.gen_bool(0.9) { "7" } else { "x" }.into()]);
        }
        let o = cli(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        let code = o.status.code();
        assert!(code == Some(0) || code == Some(2), "case {case} (seed {seed}): flash-attn {args:?} exited {:?}: {stderr}", o.status);
        assert!(!stderr.contains("panicked"), "case {case} (seed {seed}): flash-attn {args:?} panicked: {stderr}");
        if code == Some(2) {
            assert!(stderr.starts_with("flash-attn: "), "case {case} (seed {seed}): flash-attn {args:?}: {stderr}");
        } else {
            ok += 1;
        }
    }
    eprintln!("malformed_inputs_exit_0_or_2: {ok} of {CASES} ran, the rest exited 2 with a message");
}

#[test]
fn demo_finds_no_difference() {
    let o = cli(&["demo", "--device", "cpu"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "demo failed: {stdout}{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("device: cpu"), "{stdout}");
    assert!(stdout.lines().any(|l| l == "overall max abs diff: 0"), "{stdout}");
}

/// `cli` with standard input from `stdin` and standard output to `stdout` (Linux: /dev/full, a pipe).
#[cfg(target_os = "linux")]
fn cli_with<S: AsRef<OsStr>>(args: &[S], stdin: std::process::Stdio, stdout: std::process::Stdio) -> Output {
    let bin = std::env::var_os("FLASH_ATTN_CLI").map(PathBuf::from).unwrap_or_else(|| {
        let beside = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("flash-attn")));
        match beside {
            Some(b) if !Path::new(BIN).exists() && b.exists() => b,
            _ => BIN.into(),
        }
    });
    Command::new(bin).args(args).stdin(stdin).stdout(stdout).stderr(std::process::Stdio::piped()).output().expect("the flash-attn binary runs")
}

/// Paths are taken as the OS gives them (not UTF-8 on Linux here), streams as far as their header says
/// (an endless one is refused, not read until memory runs out), a standard output that fails is an
/// error, and inputs or flags the run would ignore are errors: exit 2 with a message, never a panic.
#[test]
#[cfg(target_os = "linux")]
fn paths_streams_and_outputs_fail_cleanly() {
    use std::os::unix::ffi::OsStrExt;
    use std::process::Stdio;
    let dir = TempDir::new();
    let inputs = dense_inputs(DType::BF16, 47);
    let want = library(&inputs, &AttnOptions { causal: true, ..Default::default() });
    // A non-UTF-8 input and output path.
    let (input, output) = (dir.0.join(OsStr::from_bytes(b"in\xff.safetensors")), dir.0.join(OsStr::from_bytes(b"out\xfe.safetensors")));
    write(&input, &inputs);
    let args = [OsStr::new("run"), OsStr::new("--input"), input.as_os_str(), OsStr::new("--output"), output.as_os_str(), OsStr::new("--device=cpu"), OsStr::new("--causal")];
    let o = cli(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same(&read_outputs(&output), &want);
    // The same file as a stream on standard input.
    let streamed = dir.path("streamed.safetensors");
    let stdin = std::fs::File::open(&input).unwrap();
    let o = cli_with(&[OsStr::new("run"), OsStr::new("--input"), OsStr::new("/dev/stdin"), OsStr::new("--output"), streamed.as_os_str(), OsStr::new("--device"), OsStr::new("cpu"), OsStr::new("--causal")], stdin.into(), Stdio::null());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same(&read_outputs(&streamed), &want);
    // A stream cut short inside its tensors, and an endless one.
    let bytes = std::fs::read(&input).unwrap();
    let cut = dir.path("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 3]).unwrap();
    let o = cli_with(&["run", "--input", "/dev/stdin", "--output", dir.path("o.safetensors").to_str().unwrap()], std::fs::File::open(&cut).unwrap().into(), Stdio::null());
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a safetensors file"));
    expect_failure(&["run", "--input", "/dev/zero", "--output", dir.path("o.safetensors").to_str().unwrap()], "not a safetensors file");
    // A directory is the read's failure, named as such.
    expect_failure(&[OsStr::new("run"), OsStr::new("--input"), dir.0.as_os_str(), OsStr::new("--output"), dir.path("o.safetensors").as_os_str()], "cannot read");
    // Standard output that cannot be written.
    for args in [&["--help"][..], &["demo", "--device", "cpu"][..]] {
        let o = cli_with(args, Stdio::null(), std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap().into());
        assert_eq!(o.status.code(), Some(2), "flash-attn {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stderr).contains("cannot write to standard output"));
    }
    // A non-UTF-8 command and flag value.
    expect_failure(&[OsStr::from_bytes(b"r\xffn")], "unknown command");
    expect_failure(&[OsStr::new("run"), OsStr::new("--input"), input.as_os_str(), OsStr::new("--output"), output.as_os_str(), OsStr::new("--softcap"), OsStr::from_bytes(b"1\xff")], "--softcap: the value is not valid UTF-8");
    // dout without --backward (dense and paged), --deterministic without --backward (also KV cache).
    let plain = dir.path("plain.safetensors");
    write(&plain, &with_dout(dense_inputs(DType::F16, 48), 49));
    let p = plain.to_str().unwrap();
    expect_failure(&["run", "--input", p, "--output", dir.path("o.safetensors").to_str().unwrap()], "dout is given but --backward is not");
    write(&plain, &with_dout(paged_inputs(DType::BF16, 0), 50));
    expect_failure(&["run", "--input", p, "--output", dir.path("o.safetensors").to_str().unwrap()], "dout is given but --backward is not");
    write(&plain, &kvcache_inputs(DType::BF16, false, 51));
    expect_failure(&["run", "--input", p, "--output", dir.path("o.safetensors").to_str().unwrap(), "--deterministic"], "--deterministic applies only with --backward");
}
