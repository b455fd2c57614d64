//! The `flash-attn` command line: `run` applies the forward pass (and with `--backward` the backward
//! pass) to tensors in a safetensors file, packed ones over a paged K/V cache too, or with a `k_cache` the
//! KV-cache forward (writing the updated caches back); `demo`
//! repeats the packed-versus-separate experiment (a packed varlen batch must give each sequence exactly
//! what a batch of one gives it). Every failure prints `flash-attn: <message>` and exits with code 2.

use flash_attn::{
    bwd_with, fwd, fwd_kvcache, fwd_with, varlen_bwd_with, varlen_fwd, varlen_fwd_paged_with, varlen_fwd_with, AttnOptions, DType, Device, Dropout, Extras, KvCache, KvCacheOptions,
    PagedVarlen, Tensor, Varlen,
};
use half::bf16;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "\
Usage:
  flash-attn run --input IN.safetensors --output OUT.safetensors [--backward] [options]
  flash-attn demo [--device cpu|cuda]
  flash-attn --help

run: reads q, k, v (f16 or bf16): rank 4 [B, S, H, D] for a dense batch, or rank 3 [T, H, D] packed, with
int32 cu_seqlens_q and cu_seqlens_k [B+1] and optionally int32 seqused_q, seqused_k [B]. Writes out (the
input dtype) and lse (f32) to OUT. Head dims D up to 256: 32, 64, 96, 128, 192, 256 run as they are, any
other is zero-padded to the next of these on the host (outputs, gradients and caches cut back). A tensor
in IN that the mode neither reads nor writes (a misspelt name) is an error; out, lse, s_dmask, dq, dk, dv
(an earlier run's outputs) are ignored.
  Paged K/V: a packed q with k, v of rank 4 [num_blocks, page_size, H, D] and an int32 block_table
  [B, max_blocks]; the key counts come from cu_seqlens_k, or from seqused_k when cu_seqlens_k is absent.
  KV cache (flash_attn_with_kvcache), when the file holds k_cache: q [B, Sq, H, D], k_cache and v_cache
  [B_cache, S_cache, H, D] (paged with block_table), int32 cache_seqlens [B]; optionally k_new and v_new
  [B, S_new, H, D] (appended at cache_seqlens), rotary_cos and rotary_sin [S_ro, rotary_dim / 2] (q's
  dtype or f32), int32 cache_batch_idx and cache_leftpad [B]. Writes out, lse and the updated k_cache,
  v_cache.
  ALiBi, in every mode: an f32 tensor alibi_slopes [H] or [B, H] (H the query heads) in IN switches it on;
  the score of query i and key j becomes softcap(scale q.k) - slope |i + Sk - Sq - j|.
  --backward        also read dout (q's dtype and shape), run the backward pass and write dq, dk, dv
                    (the input dtype) as well
  --deterministic   ask the backward pass for bitwise-reproducible gradients (the CPU always is)
  --causal          causal mask, aligned to the bottom-right corner
  --window L,R      sliding window, inclusive; -1 = unbounded (e.g. --window -1,0 is causal)
  --softcap X       soft-cap the scores at X (0 = off)
  --scale X         softmax scale (default 1/sqrt(head_dim))
  --dropout P --seed S [--offset O]
                    dropout of the attention probabilities with probability P in [0, 1), the mask drawn
                    by Philox4x32-10 keyed by S (u64) at subsequence offset O (u64, default 0); the
                    backward (--backward) regenerates the same mask. Not for the KV-cache forward.
  --return-probs    also write s_dmask (f32 [B, H, Sq, Sk], packed [B, H, max_seqlen_q, max_seqlen_k]):
                    the softmax probabilities, negated where dropped. O(S^2): for testing
  --rotary-interleaved  KV cache: rotary pairs are features (2i, 2i+1), not (i, i + rotary_dim/2)
  --num-splits N    KV cache: split each row's keys into N ranges (default 0: a heuristic)
  --device D        cpu, cuda or cuda:N (default: the GPU if one is present, else the CPU)

demo: runs a few causal bf16 sequences of different lengths packed (varlen_fwd) and one by one (fwd) and
prints the largest difference of out and lse between the two; it exits with code 1 if any is not 0.

Exit codes: 0 success, 1 demo found a difference, 2 error.
";

/// A failure, already phrased for the user.
struct Fail(String);

impl From<flash_attn::Error> for Fail {
    fn from(e: flash_attn::Error) -> Self {
        Fail(e.to_string())
    }
}

type Result<T> = std::result::Result<T, Fail>;

macro_rules! fail {
    ($($arg:tt)*) => { return Err(Fail(format!($($arg)*))) };
}

fn main() -> ExitCode {
    // As the OS gives them: a path need not be UTF-8 (`Flags` checks the other values).
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") || args.first().is_some_and(|a| a == "help") {
        return match std::io::stdout().lock().write_all(USAGE.as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => report(&stdout_failed(e)),
        };
    }
    let Some((command, rest)) = args.split_first() else {
        // Nothing to do if standard error is gone too.
        let _ = std::io::stderr().lock().write_all(USAGE.as_bytes());
        return ExitCode::from(2);
    };
    let result = match command.to_str() {
        Some("run") => RunArgs::parse(rest).and_then(|a| run(&a)).map(|()| ExitCode::SUCCESS),
        Some("demo") => DemoArgs::parse(rest).and_then(|a| demo(&a)),
        _ => Err(Fail(format!("unknown command '{}' (expected run or demo; see --help)", command.to_string_lossy()))),
    };
    result.unwrap_or_else(|e| report(&e))
}

/// Print `flash-attn: <message>` on standard error (if it can) and give exit code 2.
fn report(Fail(msg): &Fail) -> ExitCode {
    let _ = writeln!(std::io::stderr().lock(), "flash-attn: {msg}");
    ExitCode::from(2)
}

/// `println!` to standard output whose failure (a closed pipe, a full disk) is a `Fail`, not a panic.
macro_rules! say {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout().lock(), $($arg)*).map_err(stdout_failed)?
    };
}

/// A failed write to standard output.
fn stdout_failed(e: std::io::Error) -> Fail {
    Fail(format!("cannot write to standard output: {e}"))
}

// ---------------------------------------------------------------------------------------------------------
// Arguments

/// Walks `--flag` / `--flag value` / `--flag=value` arguments. A value is taken verbatim, so negative
/// numbers such as `--window -1,0` need no quoting; paths as the OS gave them (`path`), every other
/// value as UTF-8 (`value`).
struct Flags<'a> {
    args: std::slice::Iter<'a, OsString>,
}

impl<'a> Flags<'a> {
    fn new(args: &'a [OsString]) -> Self {
        Flags { args: args.iter() }
    }

    /// The next flag's name and its inline `=value`, if any.
    fn next_flag(&mut self) -> Result<Option<(&'a str, Option<&'a OsStr>)>> {
        let Some(arg) = self.args.next() else { return Ok(None) };
        let bytes = arg.as_encoded_bytes();
        let (name, inline) = match bytes.iter().position(|&c| c == b'=') {
            // SAFETY: split at an ASCII byte, so both halves are encoded OS strings (`OsStr` docs).
            Some(i) => (&bytes[..i], Some(unsafe { OsStr::from_encoded_bytes_unchecked(&bytes[i + 1..]) })),
            None => (bytes, None),
        };
        match std::str::from_utf8(name) {
            Ok(name) if name.starts_with("--") => Ok(Some((name, inline))),
            _ => fail!("unexpected argument '{}' (see --help)", arg.to_string_lossy()),
        }
    }

    /// The flag's value as the OS gave it.
    fn raw(&mut self, name: &str, inline: Option<&'a OsStr>) -> Result<&'a OsStr> {
        match inline {
            Some(v) => Ok(v),
            None => self.args.next().map(OsString::as_os_str).ok_or_else(|| Fail(format!("{name} needs a value"))),
        }
    }

    /// The flag's value, which must be UTF-8.
    fn value(&mut self, name: &str, inline: Option<&'a OsStr>) -> Result<&'a str> {
        let v = self.raw(name, inline)?;
        v.to_str().ok_or_else(|| Fail(format!("{name}: the value is not valid UTF-8 ('{}')", v.to_string_lossy())))
    }

    /// The flag's value as a path (any bytes the OS allows).
    fn path(&mut self, name: &str, inline: Option<&'a OsStr>) -> Result<PathBuf> {
        Ok(PathBuf::from(self.raw(name, inline)?))
    }
}

fn no_value(name: &str, inline: Option<&OsStr>) -> Result<()> {
    match inline {
        Some(_) => fail!("{name} takes no value"),
        None => Ok(()),
    }
}

/// A finite number as the kernels' f32. One that float32 cannot hold fails rather than round: to 0 (below
/// 2^-149, where 0 would turn --softcap or --dropout off) or past its range.
fn parse_f32(name: &str, s: &str) -> Result<f32> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() => {
            let f = x as f32;
            if f.is_infinite() || (f == 0.0 && x != 0.0) {
                fail!("{name}: '{s}' cannot be held by a float32, which the kernels compute in (0 or past its range)");
            }
            Ok(f)
        }
        _ => fail!("{name}: expected a finite number, got '{s}'"),
    }
}

fn parse_u64(name: &str, s: &str) -> Result<u64> {
    match s.trim().parse::<u64>() {
        Ok(x) => Ok(x),
        Err(_) => fail!("{name}: expected an integer in 0..2^64, got '{s}'"),
    }
}

fn parse_window(s: &str) -> Result<(i64, i64)> {
    let parsed = s.split_once(',').and_then(|(l, r)| Some((l.trim().parse().ok()?, r.trim().parse().ok()?)));
    match parsed {
        Some(w) => Ok(w),
        None => fail!("--window: expected L,R (two integers, -1 = unbounded), got '{s}'"),
    }
}

fn parse_device(s: &str) -> Result<Device> {
    let device = match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::Cuda(n),
            None => fail!("--device: expected cpu, cuda or cuda:N, got '{s}'"),
        },
    };
    if matches!(device, Device::Cuda(_)) && !flash_attn::cuda::available() {
        fail!("--device {s}: no CUDA driver or GPU is available");
    }
    Ok(device)
}

struct RunArgs {
    input: PathBuf,
    output: PathBuf,
    opts: AttnOptions,
    device: Device,
    backward: bool,
    deterministic: bool,
    /// The KV-cache flags, if given (they make sense only for a file with k_cache).
    rotary_interleaved: bool,
    num_splits: Option<usize>,
    /// Write s_dmask too.
    return_probs: bool,
}

impl RunArgs {
    fn parse(args: &[OsString]) -> Result<RunArgs> {
        let (mut input, mut output, mut device) = (None, None, None);
        let mut opts = AttnOptions::default();
        let (mut backward, mut deterministic, mut rotary_interleaved, mut num_splits) = (false, false, false, None);
        let (mut dropout, mut seed, mut offset, mut return_probs) = (None, None, None, false);
        let mut flags = Flags::new(args);
        while let Some((name, inline)) = flags.next_flag()? {
            match name {
                "--input" => input = Some(flags.path(name, inline)?),
                "--output" => output = Some(flags.path(name, inline)?),
                "--causal" => {
                    no_value(name, inline)?;
                    opts.causal = true;
                }
                "--backward" => {
                    no_value(name, inline)?;
                    backward = true;
                }
                "--deterministic" => {
                    no_value(name, inline)?;
                    deterministic = true;
                }
                "--rotary-interleaved" => {
                    no_value(name, inline)?;
                    rotary_interleaved = true;
                }
                "--num-splits" => {
                    let v = flags.value(name, inline)?;
                    match v.trim().parse::<usize>() {
                        Ok(n) => num_splits = Some(n),
                        Err(_) => fail!("--num-splits: expected a count >= 0 (0 = a heuristic), got '{v}'"),
                    }
                }
                "--return-probs" => {
                    no_value(name, inline)?;
                    return_probs = true;
                }
                "--dropout" => {
                    let v = flags.value(name, inline)?;
                    let p = parse_f32(name, v)?;
                    // Below 1 but 1 in float32 (from 1 - 2^-25): the library would report "got 1".
                    if p == 1.0 && v.trim().parse::<f64>().is_ok_and(|x| x < 1.0) {
                        fail!("--dropout: must be in [0, 1), got '{v}' (1 in float32)");
                    }
                    dropout = Some(p);
                }
                "--seed" => seed = Some(parse_u64(name, flags.value(name, inline)?)?),
                "--offset" => offset = Some(parse_u64(name, flags.value(name, inline)?)?),
                "--window" => opts.window = parse_window(flags.value(name, inline)?)?,
                "--softcap" => opts.softcap = parse_f32(name, flags.value(name, inline)?)?,
                "--scale" => opts.softmax_scale = Some(parse_f32(name, flags.value(name, inline)?)?),
                "--device" => device = Some(parse_device(flags.value(name, inline)?)?),
                _ => fail!("run: unknown option '{name}' (see --help)"),
            }
        }
        let Some(input) = input else { fail!("run: --input is required") };
        let Some(output) = output else { fail!("run: --output is required") };
        if deterministic && !backward {
            fail!("--deterministic applies only with --backward (it asks the backward pass for reproducible gradients)");
        }
        match (dropout, seed) {
            (Some(p), Some(seed)) => opts.dropout = Dropout { p, seed, offset: offset.unwrap_or(0) },
            (Some(_), None) => fail!("--dropout needs --seed S (the mask's Philox key)"),
            (None, _) if seed.is_some() || offset.is_some() => fail!("--{} applies only with --dropout P", if seed.is_some() { "seed" } else { "offset" }),
            (None, _) => {}
        }
        Ok(RunArgs { input, output, opts, device: device.unwrap_or_else(Device::best), backward, deterministic, rotary_interleaved, num_splits, return_probs })
    }
}

struct DemoArgs {
    device: Device,
}

impl DemoArgs {
    fn parse(args: &[OsString]) -> Result<DemoArgs> {
        let mut device = None;
        let mut flags = Flags::new(args);
        while let Some((name, inline)) = flags.next_flag()? {
            match name {
                "--device" => device = Some(parse_device(flags.value(name, inline)?)?),
                _ => fail!("demo: unknown option '{name}' (see --help)"),
            }
        }
        Ok(DemoArgs { device: device.unwrap_or_else(Device::best) })
    }
}

// ---------------------------------------------------------------------------------------------------------
// run

/// Names only a KV-cache input file holds (beside k_cache).
const KVCACHE_ONLY: [&str; 7] = ["cache_seqlens", "k_new", "v_new", "rotary_cos", "rotary_sin", "cache_batch_idx", "cache_leftpad"];

/// A head dim without kernels of its own (1 to 255: flash-attn runs any up to 256): `(d, dp)`, the file's
/// head dim and the next one with kernels, when q's last dim is such a `d` and every tensor in `same` has
/// it too (else None: the library's checks report whatever is wrong). The inputs are then zero-padded on
/// the host (`pad_head_dim`), the scale defaults to 1/sqrt(d), and out, the gradients and the caches are
/// cut back before writing: the zero columns add nothing to q.k, and those of v only to output columns
/// that are cut off.
fn head_dim_padding(q: &Tensor, same: &[&Tensor]) -> Option<(usize, usize)> {
    let d = *q.shape().last()?;
    let dp = flash_attn::padded_head_dim(d)?;
    (dp != d && same.iter().all(|t| t.shape().last() == Some(&d))).then_some((d, dp))
}

/// Host tensor `t` with its last dim zero-padded from `d` to `dp`.
fn pad_head_dim(t: &Tensor, d: usize, dp: usize) -> Result<Tensor> {
    let (bytes, es) = (t.to_bytes()?, t.dtype().size());
    let rows = bytes.len() / (d * es);
    let mut out = vec![0u8; rows * dp * es];
    for r in 0..rows {
        out[r * dp * es..(r * dp + d) * es].copy_from_slice(&bytes[r * d * es..(r + 1) * d * es]);
    }
    let mut shape = t.shape().to_vec();
    *shape.last_mut().expect("a padded tensor has a head dim") = dp;
    Ok(Tensor::from_bytes(&out, &shape, t.dtype())?)
}

/// `t` (on any device) with its last dim cut from `dp` back to `d`, on the host.
fn cut_head_dim(t: &Tensor, d: usize) -> Result<Tensor> {
    let (bytes, es) = (t.to_bytes()?, t.dtype().size());
    let dp = *t.shape().last().expect("a cut tensor has a head dim");
    let rows = bytes.len() / (dp * es);
    let mut out = Vec::with_capacity(rows * d * es);
    for r in 0..rows {
        out.extend_from_slice(&bytes[r * dp * es..(r * dp + d) * es]);
    }
    let mut shape = t.shape().to_vec();
    *shape.last_mut().expect("a cut tensor has a head dim") = d;
    Ok(Tensor::from_bytes(&out, &shape, t.dtype())?)
}

/// `t` cut back to the file's head dim where `head_dim_padding` padded the inputs, else `t` itself.
fn cut_back(t: &Tensor, padding: Option<(usize, usize)>) -> Result<Tensor> {
    padding.map_or_else(|| Ok(t.clone()), |(d, _)| cut_head_dim(t, d))
}

/// `t` padded as q was: its last dim must be the file's head dim `d` (a tensor of the padded width would
/// otherwise pass the library's checks and have its extra columns dropped).
fn pad_as_q(t: &Tensor, name: &'static str, d: usize, dp: usize) -> Result<Tensor> {
    match t.shape().last() {
        Some(&x) if x == d => pad_head_dim(t, d, dp),
        x => Err(flash_attn::Error::Shape { arg: name, msg: format!("head dim {} must be q's head dim {d}", x.map_or("none".into(), |x| x.to_string())) }.into()),
    }
}

/// A library error, with a word on the head dim where the inputs were padded and the error shows shapes
/// (which then end in `dp`).
fn lib_error(padding: Option<(usize, usize)>) -> impl Fn(flash_attn::Error) -> Fail {
    move |e| match (padding, &e) {
        (Some((d, dp)), flash_attn::Error::Shape { .. }) => Fail(format!("{e} (head dim {d} runs zero-padded to {dp}: shapes above show {dp})")),
        // The CLI pads the head dims between the library's: any from 1 to 256 runs.
        (None, flash_attn::Error::HeadDim { got }) => Fail(format!("q: head dim {got} is not supported; supported: 1 to 256 (32, 64, 96, 128, 192 and 256 natively, the others zero-padded to the next)")),
        _ => Fail(e.to_string()),
    }
}

/// What `run` writes: a file may carry these from an earlier run (a backward's input made of the
/// forward's files), and they are not read.
const OUTPUT_NAMES: [&str; 6] = ["out", "lse", "s_dmask", "dq", "dk", "dv"];

/// Fails on a tensor of the input file that this mode neither reads nor writes (a misspelt
/// `alibi_slopes` would otherwise run without ALiBi).
fn check_names(file: &SafeTensors<'_>, path: &Path, known: &[&str]) -> Result<()> {
    let mut names = file.names();
    names.sort();
    match names.into_iter().find(|n| !known.contains(&n.as_str()) && !OUTPUT_NAMES.contains(&n.as_str())) {
        Some(name) => fail!("{}: unknown tensor '{name}' (this mode reads {}; {} are outputs, not read)", path.display(), known.join(", "), OUTPUT_NAMES.join(", ")),
        None => Ok(()),
    }
}

/// `opts` with the scale the caller's head dim `d` gives by default (the library would take the padded one's).
fn options_for(opts: &flash_attn::AttnOptions, d: usize) -> flash_attn::AttnOptions {
    flash_attn::AttnOptions { softmax_scale: Some(opts.scale_for(d)), ..*opts }
}

/// The bytes of the input file. A regular file is read whole (the safetensors parser checks it); anything
/// else (a pipe, a device) only as far as its header says the tensors reach, so that an endless stream is
/// refused after its header instead of read until memory runs out.
fn read_input(input: &Path) -> Result<Vec<u8>> {
    let cannot = |e: std::io::Error| Fail(format!("cannot read {}: {e}", input.display()));
    let not_safetensors = |why: &str| Fail(format!("{}: not a safetensors file: {why}", input.display()));
    let mut f = std::fs::File::open(input).map_err(cannot)?;
    if f.metadata().map_err(cannot)?.is_file() {
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).map_err(cannot)?;
        return Ok(bytes);
    }
    // safetensors' own bound on the header (its MAX_HEADER_SIZE).
    const MAX_HEADER: u64 = 100_000_000;
    // A short read is not a safetensors file; any other failure (a directory, say) is the read's.
    let short = |e: std::io::Error, why: &str| if e.kind() == std::io::ErrorKind::UnexpectedEof { not_safetensors(why) } else { cannot(e) };
    let mut bytes = vec![0u8; 8];
    f.read_exact(&mut bytes).map_err(|e| short(e, "shorter than its 8-byte header length"))?;
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER {
        return Err(not_safetensors(&format!("a header of {n} bytes (at most {MAX_HEADER})")));
    }
    let header_end = 8 + n as usize;
    bytes.resize(header_end, 0);
    f.read_exact(&mut bytes[8..]).map_err(|e| short(e, &format!("shorter than its {n}-byte header")))?;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..]).map_err(|e| not_safetensors(&format!("its header is not JSON: {e}")))?;
    let Some(entries) = header.as_object() else { return Err(not_safetensors("its header is not a JSON object")) };
    // Where the last tensor's data ends (the parser checks the entries themselves).
    let data_end = entries.iter().filter(|(name, _)| *name != "__metadata__").filter_map(|(_, e)| e.get("data_offsets")?.get(1)?.as_u64()).max().unwrap_or(0);
    let total = (header_end as u64).checked_add(data_end).ok_or_else(|| not_safetensors("data offsets past 2^64"))?;
    let rest = f.take(total - header_end as u64).read_to_end(&mut bytes).map_err(cannot)?;
    if (rest as u64) < data_end {
        return Err(not_safetensors(&format!("its tensors reach byte {total} but it ends at byte {}", header_end + rest)));
    }
    Ok(bytes)
}

fn run(args: &RunArgs) -> Result<()> {
    let input = &args.input;
    if same_file(input, &args.output) {
        fail!("--output {} is the input file, which writing the outputs would destroy: name another file", args.output.display());
    }
    let bytes = read_input(input)?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| Fail(format!("{}: not a safetensors file: {e:?}", input.display())))?;
    if file.tensor("k_cache").is_ok() {
        return run_kvcache(args, &file);
    }
    if let Some(name) = KVCACHE_ONLY.iter().find(|n| file.tensor(n).is_ok()) {
        fail!("{name} is given but {} holds no k_cache (KV-cache inputs need k_cache and v_cache)", input.display());
    }
    check_names(&file, input, &["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k", "block_table", "alibi_slopes", "dout"])?;
    if !args.backward && file.tensor("dout").is_ok() {
        fail!("dout is given but --backward is not: only the backward pass reads it (pass --backward, or leave dout out)");
    }
    for (flag, given) in [("--rotary-interleaved", args.rotary_interleaved), ("--num-splits", args.num_splits.is_some())] {
        if given {
            fail!("{flag} applies to the KV-cache forward only, but {} holds no k_cache", input.display());
        }
    }
    let get = |name: &str, accepted: &[DType]| load(&file, input, name, accepted);

    let float = [DType::F16, DType::BF16];
    let missing = |name: &str| Fail(format!("{}: has no tensor '{name}'", input.display()));
    let q = get("q", &float)?.ok_or_else(|| missing("q"))?;
    let k = get("k", &float)?.ok_or_else(|| missing("k"))?;
    let v = get("v", &float)?.ok_or_else(|| missing("v"))?;
    let cu_seqlens_q = get("cu_seqlens_q", &[DType::I32])?;
    let cu_seqlens_k = get("cu_seqlens_k", &[DType::I32])?;
    let seqused_q = get("seqused_q", &[DType::I32])?;
    let seqused_k = get("seqused_k", &[DType::I32])?;
    let block_table = get("block_table", &[DType::I32])?;
    let alibi_slopes = get("alibi_slopes", &[DType::F32])?;
    let dout = match args.backward {
        true => Some(get("dout", &float)?.ok_or_else(|| Fail(format!("{}: has no tensor 'dout' (needed by --backward)", input.display())))?),
        false => None,
    };
    let padding = head_dim_padding(&q, &[&k, &v]);
    let (q, k, v, dout, opts) = match padding {
        None => (q, k, v, dout, args.opts),
        Some((d, dp)) => {
            let pad = |t: &Tensor| pad_head_dim(t, d, dp);
            let dout = dout.map(|t| pad_as_q(&t, "dout", d, dp)).transpose()?;
            (pad(&q)?, pad(&k)?, pad(&v)?, dout, options_for(&args.opts, d))
        }
    };
    let cut = |t: &Tensor| cut_back(t, padding);
    let lib = lib_error(padding);

    let dev = |t: &Tensor| t.to_device(args.device);
    let (q_d, k_d, v_d) = (dev(&q)?, dev(&k)?, dev(&v)?);
    let slopes_d = alibi_slopes.as_ref().map(dev).transpose()?;
    let extras = Extras { alibi_slopes: slopes_d.as_ref(), return_attn_probs: args.return_probs };
    if let Some(table) = &block_table {
        if q.rank() != 3 {
            fail!("block_table is given but q is rank {} (paged K/V takes a packed q [T, H, D])", q.rank());
        }
        if args.backward {
            fail!("--backward: paged K/V (block_table) has no backward pass");
        }
        let Some(cu_q) = &cu_seqlens_q else { fail!("q is rank 3 (packed [T, H, D]) but {} has no tensor 'cu_seqlens_q'", input.display()) };
        // Key counts: seqused_k where given, else the slots of cu_seqlens_k.
        let max_k = seqused_k.as_ref().or(cu_seqlens_k.as_ref()).map_or(Ok(0), |t| max_seqlen(t, seqused_k.as_ref()))?;
        let max_q = max_seqlen(cu_q, seqused_q.as_ref())?;
        // The library reads device lengths and tables without checking them (the kernels clamp): check
        // the host copies here, where a bad one can still be reported.
        if args.device != Device::Cpu {
            let host = PagedVarlen { cu_seqlens_q: cu_q, cu_seqlens_k: cu_seqlens_k.as_ref(), max_seqlen_q: Some(max_q), max_seqlen_k: Some(max_k), seqused_q: seqused_q.as_ref(), seqused_k: seqused_k.as_ref(), block_table: table };
            flash_attn::check_paged_varlen_contents(&q, &k, &v, &host, &opts).map_err(&lib)?;
        }
        let opt = |t: &Option<Tensor>| t.as_ref().map(dev).transpose();
        let (cu_q_d, cu_k_d, used_q_d, used_k_d, table_d) = (dev(cu_q)?, opt(&cu_seqlens_k)?, opt(&seqused_q)?, opt(&seqused_k)?, dev(table)?);
        let varlen = PagedVarlen {
            cu_seqlens_q: &cu_q_d,
            cu_seqlens_k: cu_k_d.as_ref(),
            max_seqlen_q: Some(max_q),
            max_seqlen_k: Some(max_k),
            seqused_q: used_q_d.as_ref(),
            seqused_k: used_k_d.as_ref(),
            block_table: &table_d,
        };
        let mut result = varlen_fwd_paged_with(&q_d, &k_d, &v_d, &varlen, &extras, &opts).map_err(&lib)?;
        result.out = cut(&result.out)?;
        return write_outputs(&args.output, &fwd_outputs(&result));
    }
    // Device copies of the varlen lengths, for packed inputs.
    let packed = match q.rank() {
        4 => {
            if let Some(name) = [("cu_seqlens_q", &cu_seqlens_q), ("cu_seqlens_k", &cu_seqlens_k), ("seqused_q", &seqused_q), ("seqused_k", &seqused_k)]
                .into_iter()
                .find_map(|(name, t)| t.is_some().then_some(name))
            {
                fail!("{name} is given but q is rank 4 (dense [B, S, H, D]); packed inputs are rank 3 [T, H, D]");
            }
            None
        }
        3 => {
            let (Some(cu_q), Some(cu_k)) = (&cu_seqlens_q, &cu_seqlens_k) else {
                let name = if cu_seqlens_q.is_none() { "cu_seqlens_q" } else { "cu_seqlens_k" };
                fail!("q is rank 3 (packed [T, H, D]) but {} has no tensor '{name}'", input.display());
            };
            let host = Varlen {
                cu_seqlens_q: cu_q,
                cu_seqlens_k: cu_k,
                max_seqlen_q: Some(max_seqlen(cu_q, seqused_q.as_ref())?),
                max_seqlen_k: Some(max_seqlen(cu_k, seqused_k.as_ref())?),
                seqused_q: seqused_q.as_ref(),
                seqused_k: seqused_k.as_ref(),
            };
            // The library reads lengths on device tensors without checking them; check them here, on the
            // host, where bad ones can still be reported (against k's rows: its rank first).
            if k.rank() != 3 {
                return Err(flash_attn::Error::Rank { arg: "k", got: k.rank(), expected: 3 }.into());
            }
            flash_attn::check_varlen_contents(&host, q.shape()[0], k.shape()[0]).map_err(&lib)?;
            let used_q_d = seqused_q.as_ref().map(dev).transpose()?;
            let used_k_d = seqused_k.as_ref().map(dev).transpose()?;
            Some((dev(cu_q)?, dev(cu_k)?, used_q_d, used_k_d, host.max_seqlen_q, host.max_seqlen_k))
        }
        r => fail!("q: expected rank 4 (dense [B, S, H, D]) or rank 3 (packed [T, H, D]), got rank {r}"),
    };
    let varlen = packed.as_ref().map(|(cu_q, cu_k, used_q, used_k, max_q, max_k)| Varlen {
        cu_seqlens_q: cu_q,
        cu_seqlens_k: cu_k,
        max_seqlen_q: *max_q,
        max_seqlen_k: *max_k,
        seqused_q: used_q.as_ref(),
        seqused_k: used_k.as_ref(),
    });

    let result = match &varlen {
        None => fwd_with(&q_d, &k_d, &v_d, &extras, &opts).map_err(&lib)?,
        Some(varlen) => varlen_fwd_with(&q_d, &k_d, &v_d, varlen, &extras, &opts).map_err(&lib)?,
    };
    let grads = match &dout {
        None => None,
        Some(dout) => {
            let (dout, out, lse) = (dev(dout)?, &result.out, &result.lse);
            Some(match &varlen {
                None => bwd_with(&dout, &q_d, &k_d, &v_d, out, lse, &extras, &opts, args.deterministic).map_err(&lib)?,
                Some(varlen) => varlen_bwd_with(&dout, &q_d, &k_d, &v_d, out, lse, varlen, &extras, &opts, args.deterministic).map_err(&lib)?,
            })
        }
    };
    let out = cut(&result.out)?;
    let mut outputs = fwd_outputs(&result);
    outputs[0].1 = &out;
    let grads = grads.map(|g| Ok::<_, Fail>([cut(&g.dq)?, cut(&g.dk)?, cut(&g.dv)?])).transpose()?;
    if let Some([dq, dk, dv]) = &grads {
        outputs.extend([("dq", dq), ("dk", dk), ("dv", dv)]);
    }
    write_outputs(&args.output, &outputs)
}

/// out, lse and, where returned, s_dmask.
fn fwd_outputs(result: &flash_attn::FwdOutput) -> Vec<(&'static str, &Tensor)> {
    let mut outputs = vec![("out", &result.out), ("lse", &result.lse)];
    outputs.extend(result.s_dmask.as_ref().map(|m| ("s_dmask", m)));
    outputs
}

/// KV-cache mode (the file holds k_cache): `fwd_kvcache`, then out, lse and the updated caches.
fn run_kvcache(args: &RunArgs, file: &SafeTensors<'_>) -> Result<()> {
    let input = &args.input;
    for name in ["k", "v", "cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k", "dout"] {
        if file.tensor(name).is_ok() {
            fail!("{name} is given but {} holds k_cache: the KV-cache forward reads q, k_cache, v_cache, cache_seqlens and its optional inputs", input.display());
        }
    }
    if args.backward {
        fail!("--backward: the KV-cache forward has no backward pass");
    }
    if args.return_probs {
        fail!("--return-probs: the KV-cache forward does not return the probabilities");
    }
    check_names(file, input, &["q", "k_cache", "v_cache", "cache_seqlens", "block_table", "k_new", "v_new", "rotary_cos", "rotary_sin", "cache_batch_idx", "cache_leftpad", "alibi_slopes"])?;
    let get = |name: &str, accepted: &[DType]| load(file, input, name, accepted);
    let missing = |name: &str| Fail(format!("{}: has no tensor '{name}' (KV-cache inputs need q, k_cache, v_cache and cache_seqlens)", input.display()));
    let (float, int) = ([DType::F16, DType::BF16], [DType::I32]);
    let required = |name: &str, accepted: &[DType]| get(name, accepted)?.ok_or_else(|| missing(name));
    let rotary = [DType::F16, DType::BF16, DType::F32];
    let (q_h, kc_h, vc_h, seqlens_h) = (required("q", &float)?, required("k_cache", &float)?, required("v_cache", &float)?, required("cache_seqlens", &int)?);
    let optional_h = [
        get("block_table", &int)?,
        get("k_new", &float)?,
        get("v_new", &float)?,
        get("rotary_cos", &rotary)?,
        get("rotary_sin", &rotary)?,
        get("cache_batch_idx", &int)?,
        get("cache_leftpad", &int)?,
        get("alibi_slopes", &[DType::F32])?,
    ];
    fn cache_of<'a>(cache_seqlens: &'a Tensor, t: &'a [Option<Tensor>; 8]) -> KvCache<'a> {
        let [block_table, k_new, v_new, rotary_cos, rotary_sin, cache_batch_idx, cache_leftpad, alibi_slopes] = t.each_ref().map(Option::as_ref);
        KvCache { cache_seqlens, block_table, k_new, v_new, rotary_cos, rotary_sin, cache_batch_idx, cache_leftpad, alibi_slopes }
    }
    // Head dims without kernels of their own: q, the caches and the new keys padded (as in `run`).
    let (mut q_h, mut kc_h, mut vc_h, mut optional_h) = (q_h, kc_h, vc_h, optional_h);
    let padding = head_dim_padding(&q_h, &[&kc_h, &vc_h]);
    let mut opts = args.opts;
    if let Some((d, dp)) = padding {
        if let Some(cos) = &optional_h[3]
            && cos.rank() == 2
            && 2 * cos.shape()[1] > d
        {
            return Err(flash_attn::Error::Value { arg: "rotary_cos", msg: format!("rotary_dim {} (twice its {} columns) exceeds the head dim {d}", 2 * cos.shape()[1], cos.shape()[1]) }.into());
        }
        (q_h, kc_h, vc_h) = (pad_head_dim(&q_h, d, dp)?, pad_head_dim(&kc_h, d, dp)?, pad_head_dim(&vc_h, d, dp)?);
        for (t, name) in optional_h[1..3].iter_mut().zip(["k_new", "v_new"]) {
            if let Some(t) = t {
                *t = pad_as_q(t, name, d, dp)?;
            }
        }
        opts = options_for(&args.opts, d);
    }
    let cut = |t: &Tensor| cut_back(t, padding);
    let lib = lib_error(padding);
    let kv = KvCacheOptions { rotary_interleaved: args.rotary_interleaved, num_splits: args.num_splits.unwrap_or(0) };
    // On a GPU the library reads the index tensors without checking them (the kernels clamp): their host
    // copies are checked here, where a bad one can still be reported.
    if args.device != Device::Cpu {
        flash_attn::check_kvcache_contents(&q_h, &kc_h, &vc_h, &cache_of(&seqlens_h, &optional_h), &opts, &kv).map_err(&lib)?;
    }
    let to = |t: &Tensor| t.to_device(args.device);
    let (q, mut k_cache, mut v_cache, cache_seqlens) = (to(&q_h)?, to(&kc_h)?, to(&vc_h)?, to(&seqlens_h)?);
    let mut optional: [Option<Tensor>; 8] = Default::default();
    for (d, h) in optional.iter_mut().zip(&optional_h) {
        *d = h.as_ref().map(to).transpose()?;
    }
    let cache = cache_of(&cache_seqlens, &optional);
    let result = fwd_kvcache(&q, &mut k_cache, &mut v_cache, &cache, &opts, &kv).map_err(&lib)?;
    let (out, k_cache, v_cache) = (cut(&result.out)?, cut(&k_cache)?, cut(&v_cache)?);
    write_outputs(&args.output, &[("out", &out), ("lse", &result.lse), ("k_cache", &k_cache), ("v_cache", &v_cache)])
}

/// Whether `output` names the file `input` does (through another spelling, a link, or a hard link). An
/// output that does not exist yet is no input.
fn same_file(input: &Path, output: &Path) -> bool {
    match (std::fs::metadata(input), std::fs::metadata(output)) {
        (Ok(a), Ok(b)) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::MetadataExt;
                (a.dev(), a.ino()) == (b.dev(), b.ino())
            }
            #[cfg(not(unix))]
            {
                let _ = (a, b);
                matches!((std::fs::canonicalize(input), std::fs::canonicalize(output)), (Ok(x), Ok(y)) if x == y)
            }
        }
        _ => false,
    }
}

/// Writes the named tensors to a safetensors file.
fn write_outputs(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    // Host tensors lend their bytes (s_dmask is O(S^2): no copy of it).
    let bytes = tensors
        .iter()
        .map(|(_, t)| Ok(match t.host_bytes() {
            Some(b) => std::borrow::Cow::Borrowed(b),
            None => std::borrow::Cow::Owned(t.to_bytes()?),
        }))
        .collect::<flash_attn::Result<Vec<_>>>()?;
    let views = tensors.iter().zip(&bytes).map(|((name, t), b)| Ok((*name, st_view(t, b)?))).collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, &None, path).map_err(|e| Fail(format!("cannot write {}: {e:?}", path.display())))
}

/// Tensor `name` from the file as a host tensor, if present; its dtype must be one of `accepted`.
fn load(file: &SafeTensors<'_>, path: &Path, name: &str, accepted: &[DType]) -> Result<Option<Tensor>> {
    let Ok(view) = file.tensor(name) else { return Ok(None) };
    let dtype = match view.dtype() {
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F32 => Some(DType::F32),
        Dtype::I32 => Some(DType::I32),
        _ => None,
    };
    match dtype {
        Some(d) if accepted.contains(&d) => Ok(Some(Tensor::from_bytes(view.data(), view.shape(), d)?)),
        _ => {
            let names: Vec<&str> = accepted.iter().map(|d| d.name()).collect();
            fail!("{}: tensor '{name}' has dtype {:?}, expected {}", path.display(), view.dtype(), names.join(" or "))
        }
    }
}

/// A safetensors view of `data`, the little-endian bytes of `t`.
fn st_view<'a>(t: &Tensor, data: &'a [u8]) -> Result<TensorView<'a>> {
    let dtype = match t.dtype() {
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F32 => Dtype::F32,
        DType::I32 => Dtype::I32,
    };
    TensorView::new(dtype, t.shape().to_vec(), data).map_err(|e| Fail(format!("{e:?}")))
}

/// The longest sequence: `seqused[b]` where given, else the slot length `cu[b+1] - cu[b]`. Malformed
/// lengths count as 0 here and are reported by the library's checks, which name the argument.
fn max_seqlen(cu_seqlens: &Tensor, seqused: Option<&Tensor>) -> Result<usize> {
    let lens: Vec<i64> = match seqused {
        Some(u) => u.to_i32_vec()?.into_iter().map(i64::from).collect(),
        None => cu_seqlens.to_i32_vec()?.windows(2).map(|w| i64::from(w[1]) - i64::from(w[0])).collect(),
    };
    Ok(lens.into_iter().max().unwrap_or(0).max(0) as usize)
}

// ---------------------------------------------------------------------------------------------------------
// demo

fn demo(args: &DemoArgs) -> Result<ExitCode> {
    const SEQLENS: [usize; 5] = [1, 37, 128, 211, 300];
    let (hq, hk, d) = (8, 2, 128);
    let opts = AttnOptions { causal: true, ..Default::default() };
    let device = args.device;
    say!("device: {device}");
    let total: usize = SEQLENS.iter().sum();
    say!("{} causal bf16 sequences of lengths {SEQLENS:?} ({total} tokens), Hq={hq}, Hk={hk}, D={d}", SEQLENS.len());

    let mut rng = SplitMix64(0x5eed);
    let mut random = |rows: usize, heads: usize| -> Vec<bf16> { (0..rows * heads * d).map(|_| bf16::from_f32(rng.uniform())).collect() };
    let (q, k, v) = (random(total, hq), random(total, hk), random(total, hk));
    let mut cu_seqlens = vec![0i32];
    for &s in &SEQLENS {
        cu_seqlens.push(cu_seqlens.last().unwrap() + s as i32);
    }

    let cu = Tensor::from_i32(cu_seqlens.clone(), &[cu_seqlens.len()])?.to_device(device)?;
    let max_seqlen = *SEQLENS.iter().max().unwrap();
    let varlen = Varlen { cu_seqlens_q: &cu, cu_seqlens_k: &cu, max_seqlen_q: Some(max_seqlen), max_seqlen_k: Some(max_seqlen), seqused_q: None, seqused_k: None };
    let packed = |x: &[bf16], heads: usize| Tensor::from_bf16(x.to_vec(), &[total, heads, d])?.to_device(device);
    let p = varlen_fwd(&packed(&q, hq)?, &packed(&k, hk)?, &packed(&v, hk)?, &varlen, &opts)?;
    let (p_out, p_lse) = (p.out.to_f32_vec()?, p.lse.to_f32_vec()?);

    let mut overall = 0.0f32;
    for (b, &s) in SEQLENS.iter().enumerate() {
        let start = cu_seqlens[b] as usize;
        let single = |x: &[bf16], heads: usize| Tensor::from_bf16(x[start * heads * d..(start + s) * heads * d].to_vec(), &[1, s, heads, d])?.to_device(device);
        let one = fwd(&single(&q, hq)?, &single(&k, hk)?, &single(&v, hk)?, &opts)?;
        let out = one.out.to_f32_vec()?;
        let lse = one.lse.to_f32_vec()?;
        // Rows of this sequence: out [T, Hq, D] is row-major by token; lse [Hq, T] is by head, then token.
        let out_diff = max_abs_diff(&p_out[start * hq * d..(start + s) * hq * d], &out);
        let lse_diff = (0..hq).map(|h| max_abs_diff(&p_lse[h * total + start..h * total + start + s], &lse[h * s..(h + 1) * s])).fold(0.0, f32::max);
        say!("seq {b}: len {s:>3}  max |out diff| = {out_diff}  max |lse diff| = {lse_diff}");
        overall = overall.max(out_diff).max(lse_diff);
    }
    say!("overall max abs diff: {overall}");
    if overall == 0.0 {
        say!("packed and separate results are identical");
        Ok(ExitCode::SUCCESS)
    } else {
        say!("packed and separate results differ (expected exactly 0)");
        Ok(ExitCode::from(1))
    }
}

/// Largest |a - b|, with equal values (-inf lse of empty rows included) counting as 0 and NaN as infinite.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(&x, &y)| if x == y { 0.0 } else if (x - y).is_nan() { f32::INFINITY } else { (x - y).abs() }).fold(0.0, f32::max)
}

/// A small seeded generator, so the demo is reproducible without a dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}
