//! `flash_attn_rs._native`: the raw layer (`flash_attn::raw`) as Python functions of plain ints, strings
//! and tuples. The Python package (python/flash_attn_rs/) turns PyTorch tensors and numpy arrays into
//! these arguments; nothing here knows either library.
//!
//! A tensor argument is a tuple `(address, dtype, shape, strides)`: the address of its first element (host
//! memory for the CPU, device memory for CUDA), a dtype name (`"f16"`, `"bf16"`, `"f32"`, `"i32"`, or
//! `"float16"`, `"bfloat16"`, `"float32"`, `"int32"`), and the shape and strides in elements. The device is
//! `"cpu"` or `("cuda", ordinal, stream)` with `stream` a raw `CUstream` (e.g.
//! `torch.cuda.current_stream().cuda_stream`; 0 = the legacy default stream).
//!
//! Every argument is checked here or by the raw layer before anything runs; a bad one raises TypeError
//! (wrong Python type, wrong dtype), ValueError (shape, value, lengths, head dim, heads, size, layout),
//! NotImplementedError (a feature this target has no kernels for yet: `Error::Unsupported`) or
//! RuntimeError (CUDA), with a message naming the argument. The library call runs with the GIL released;
//! a panic inside it, should one ever happen, comes back as RuntimeError. What cannot be checked is that
//! an address really points at that much memory of the named device: these functions are as unsafe as the
//! raw layer, and the Python package is the safe way in.

use flash_attn::raw::{self, BwdViews, FwdViews, KvCacheOptions, KvCacheViews, PagedVarlenViews, Workspace};
use flash_attn::{AttnOptions, DType, Dropout, Error, Target, VarlenViews, View};
use pyo3::exceptions::{PyNotImplementedError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyInt, PyString, PyTuple};

/// A library error as the Python exception its kind calls for, with the library's message (which names
/// the argument).
fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::DType { .. } | Error::DTypeMismatch { .. } => PyTypeError::new_err(msg),
        Error::Cuda(_) => PyRuntimeError::new_err(msg),
        Error::Io(_) => PyOSError::new_err(msg),
        // A feature this target lacks (e.g. no CUDA kernels yet): the message names it.
        Error::Unsupported { .. } => PyNotImplementedError::new_err(msg),
        // DeviceMismatch, Rank, Shape, NotContiguous, HeadDim, Heads, Value, SeqLens, TooLarge, Data, and
        // any kind added later.
        _ => PyValueError::new_err(msg),
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

/// A Python int (not a bool) in `0..=max`.
fn uint(obj: &Bound<'_, PyAny>, arg: &str, what: &str, max: u64) -> PyResult<u64> {
    if !obj.is_instance_of::<PyInt>() || obj.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err(format!("{arg}: {what} must be an int, got {}", type_name(obj))));
    }
    match obj.extract::<u64>() {
        Ok(v) if v <= max => Ok(v),
        _ => Err(PyValueError::new_err(format!("{arg}: {what} {} is out of range 0..={max}", obj.repr().map(|r| r.to_string()).unwrap_or_default()))),
    }
}

/// None (not known) or a Python int (not a bool) in `0..=max`: a `max_seqlen_q` / `max_seqlen_k`.
fn opt_uint(obj: &Bound<'_, PyAny>, arg: &str, what: &str, max: u64) -> PyResult<Option<usize>> {
    if obj.is_none() {
        return Ok(None);
    }
    uint(obj, arg, what, max).map(|v| Some(v as usize))
}

/// A Python int (not a bool) that fits i64.
fn int(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<i64> {
    if !obj.is_instance_of::<PyInt>() || obj.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err(format!("{arg}: must be an int, got {}", type_name(obj))));
    }
    obj.extract::<i64>().map_err(|_| PyValueError::new_err(format!("{arg}: {} does not fit a 64-bit integer", obj.repr().map(|r| r.to_string()).unwrap_or_default())))
}

/// A Python float or int as f32 (range and finiteness are the library's to check).
fn float(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<f32> {
    if !(obj.is_instance_of::<PyFloat>() || obj.is_instance_of::<PyInt>()) || obj.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err(format!("{arg}: must be a float, got {}", type_name(obj))));
    }
    let v: f64 = obj.extract().map_err(|_| PyValueError::new_err(format!("{arg}: does not fit a float")))?;
    f32_of(v, arg)
}

/// `v` as the kernels' f32. A finite value that float32 cannot hold is a ValueError naming `arg`: one that
/// rounds to 0 (below 2^-149: for softcap and dropout_p, 0 would silently mean "off") or past its range.
fn f32_of(v: f64, arg: &str) -> PyResult<f32> {
    let f = v as f32;
    if v.is_finite() && (f.is_infinite() || (f == 0.0 && v != 0.0)) {
        return Err(PyValueError::new_err(format!("{arg}: {v:e} cannot be held by a float32, which the kernels compute in (0 or past its range)")));
    }
    Ok(f)
}

fn flag(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<bool> {
    obj.cast::<PyBool>().map(|b| b.is_true()).map_err(|_| PyTypeError::new_err(format!("{arg}: must be a bool, got {}", type_name(obj))))
}

/// A tuple (or list) of ints, each in `0..=max`.
fn uints(obj: &Bound<'_, PyAny>, arg: &str, what: &str, max: u64) -> PyResult<Vec<usize>> {
    if obj.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(format!("{arg}: {what} must be a tuple of ints, got str")));
    }
    let seq = obj.try_iter().map_err(|_| PyTypeError::new_err(format!("{arg}: {what} must be a tuple of ints, got {}", type_name(obj))))?;
    let mut v = Vec::new();
    for item in seq {
        let item = item?;
        v.push(uint(&item, arg, what, max)? as usize);
        if v.len() > 64 {
            return Err(PyValueError::new_err(format!("{arg}: {what} has more than 64 entries")));
        }
    }
    Ok(v)
}

fn dtype(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<DType> {
    let s = obj.cast::<PyString>().map_err(|_| PyTypeError::new_err(format!("{arg}: dtype must be a str, got {}", type_name(obj))))?;
    Ok(match &*s.to_cow()? {
        "f16" | "float16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        "f32" | "float32" => DType::F32,
        "i32" | "int32" => DType::I32,
        other => return Err(PyTypeError::new_err(format!("{arg}: dtype {other} is not supported here, expected f16, bf16, f32 or i32"))),
    })
}

/// One tensor argument, owned, so that views of it can cross into the GIL-free call.
struct Arg {
    addr: u64,
    dtype: DType,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

impl Arg {
    fn parse(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<Arg> {
        let t = obj.cast::<PyTuple>().map_err(|_| PyTypeError::new_err(format!("{arg}: expected a tuple (address, dtype, shape, strides), got {}", type_name(obj))))?;
        if t.len() != 4 {
            return Err(PyTypeError::new_err(format!("{arg}: expected a tuple (address, dtype, shape, strides), got {} items", t.len())));
        }
        let addr = uint(&t.get_item(0)?, arg, "address", u64::MAX)?;
        let dtype = dtype(&t.get_item(1)?, arg)?;
        // Every size and stride below 2^62 elements: the library's checks (in u128) then see no overflow.
        let shape = uints(&t.get_item(2)?, arg, "shape", 1 << 62)?;
        let strides = uints(&t.get_item(3)?, arg, "strides", 1 << 62)?;
        if shape.len() != strides.len() {
            return Err(PyValueError::new_err(format!("{arg}: {} strides for {} dimensions", strides.len(), shape.len())));
        }
        Ok(Arg { addr, dtype, shape, strides })
    }

    fn optional(obj: Option<&Bound<'_, PyAny>>, arg: &str) -> PyResult<Option<Arg>> {
        match obj {
            Some(o) if !o.is_none() => Arg::parse(o, arg).map(Some),
            _ => Ok(None),
        }
    }

    fn view(&self) -> View<'_> {
        View { addr: self.addr, dtype: self.dtype, shape: &self.shape, strides: &self.strides }
    }
}

/// `"cpu"` or `("cuda", ordinal, stream)`.
fn target(obj: &Bound<'_, PyAny>) -> PyResult<Target> {
    const EXPECTED: &str = "device: expected \"cpu\" or (\"cuda\", ordinal, stream)";
    if let Ok(s) = obj.cast::<PyString>() {
        return match &*s.to_cow()? {
            "cpu" => Ok(Target::Cpu),
            other => Err(PyValueError::new_err(format!("{EXPECTED}, got {other:?}"))),
        };
    }
    let t = obj.cast::<PyTuple>().map_err(|_| PyTypeError::new_err(format!("{EXPECTED}, got {}", type_name(obj))))?;
    if t.len() != 3 {
        return Err(PyTypeError::new_err(format!("{EXPECTED}, got a tuple of {}", t.len())));
    }
    let kind = t.get_item(0)?;
    if kind.cast::<PyString>().map(|s| s.to_cow().map(|s| s != "cuda").unwrap_or(true)).unwrap_or(true) {
        return Err(PyValueError::new_err(format!("{EXPECTED}, got device type {}", kind.repr()?)));
    }
    let ordinal = uint(&t.get_item(1)?, "device", "ordinal", i32::MAX as u64)? as usize;
    let stream = uint(&t.get_item(2)?, "device", "stream", usize::MAX as u64)? as usize;
    Ok(Target::Cuda { ordinal, stream })
}

fn options(softmax_scale: &Bound<'_, PyAny>, causal: &Bound<'_, PyAny>, window_left: &Bound<'_, PyAny>, window_right: &Bound<'_, PyAny>, softcap: &Bound<'_, PyAny>) -> PyResult<AttnOptions> {
    let softmax_scale = if softmax_scale.is_none() { None } else { Some(float(softmax_scale, "softmax_scale")?) };
    Ok(AttnOptions {
        softmax_scale,
        causal: flag(causal, "causal")?,
        window: (int(window_left, "window_size_left")?, int(window_right, "window_size_right")?),
        softcap: float(softcap, "softcap")?,
        ..Default::default()
    })
}

/// `opts` with the dropout of `obj`: None (off) or a tuple `(p, seed, offset)` (seed and offset in
/// `0..2^64`).
fn with_dropout(mut opts: AttnOptions, obj: Option<&Bound<'_, PyAny>>) -> PyResult<AttnOptions> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else { return Ok(opts) };
    let t = obj.cast::<PyTuple>().map_err(|_| PyTypeError::new_err(format!("dropout: expected a tuple (p, seed, offset) or None, got {}", type_name(obj))))?;
    if t.len() != 3 {
        return Err(PyTypeError::new_err(format!("dropout: expected a tuple (p, seed, offset), got {} items", t.len())));
    }
    let p_obj = t.get_item(0)?;
    let p = float(&p_obj, "dropout_p")?;
    // Below 1 in float64 but 1 in float32 (from 1 - 2^-25): the library would report "got 1".
    if p == 1.0 {
        let v: f64 = p_obj.extract()?;
        if v < 1.0 {
            return Err(PyValueError::new_err(format!("dropout_p: must be in [0, 1), got {v} (1 in float32)")));
        }
    }
    opts.dropout = Dropout { p, seed: uint(&t.get_item(1)?, "dropout", "seed", u64::MAX)?, offset: uint(&t.get_item(2)?, "dropout", "offset", u64::MAX)? };
    Ok(opts)
}

fn workspace(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Workspace> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else { return Ok(Workspace::default()) };
    let t = obj.cast::<PyTuple>().map_err(|_| PyTypeError::new_err(format!("workspace: expected a tuple (address, bytes) or None, got {}", type_name(obj))))?;
    if t.len() != 2 {
        return Err(PyTypeError::new_err(format!("workspace: expected a tuple (address, bytes), got {} items", t.len())));
    }
    Ok(Workspace { addr: uint(&t.get_item(0)?, "workspace", "address", u64::MAX)?, bytes: uint(&t.get_item(1)?, "workspace", "bytes", 1 << 62)? as usize })
}

/// The varlen arguments, owned.
struct Lens {
    cu_q: Arg,
    cu_k: Arg,
    max_q: Option<usize>,
    max_k: Option<usize>,
    used_q: Option<Arg>,
    used_k: Option<Arg>,
}

impl Lens {
    fn parse(cu_q: &Bound<'_, PyAny>, cu_k: &Bound<'_, PyAny>, max_q: &Bound<'_, PyAny>, max_k: &Bound<'_, PyAny>, used_q: Option<&Bound<'_, PyAny>>, used_k: Option<&Bound<'_, PyAny>>) -> PyResult<Lens> {
        Ok(Lens {
            cu_q: Arg::parse(cu_q, "cu_seqlens_q")?,
            cu_k: Arg::parse(cu_k, "cu_seqlens_k")?,
            max_q: opt_uint(max_q, "max_seqlen_q", "value", 1 << 62)?,
            max_k: opt_uint(max_k, "max_seqlen_k", "value", 1 << 62)?,
            used_q: Arg::optional(used_q, "seqused_q")?,
            used_k: Arg::optional(used_k, "seqused_k")?,
        })
    }

    fn views(&self) -> VarlenViews<'_> {
        VarlenViews {
            cu_seqlens_q: self.cu_q.view(),
            cu_seqlens_k: self.cu_k.view(),
            max_seqlen_q: self.max_q,
            max_seqlen_k: self.max_k,
            seqused_q: self.used_q.as_ref().map(Arg::view),
            seqused_k: self.used_k.as_ref().map(Arg::view),
        }
    }
}

/// overlaps(a, b) -> bool
///
/// Whether two views (address, dtype, shape, strides) share an element, or with b None whether two
/// elements of a do, by the rules the raw layer refuses aliased outputs with (`flash_attn::alias`): for
/// the padded head dims, whose outputs the package writes itself.
#[pyfunction]
fn overlaps(a: &Bound<'_, PyAny>, b: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
    let a = Arg::parse(a, "a")?;
    Ok(match Arg::optional(b, "b")? {
        Some(b) => flash_attn::alias::overlap(&a.view(), &b.view()),
        None => flash_attn::alias::self_overlap(&a.view()),
    })
}

/// Runs `f` (a raw call) without the GIL; a panic comes back as RuntimeError rather than unwinding into
/// Python.
fn call<T: Send, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    F: FnOnce() -> flash_attn::Result<T> + Send,
{
    match py.detach(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))) {
        Ok(r) => r.map_err(to_py),
        Err(p) => {
            let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "unknown panic".into());
            Err(PyRuntimeError::new_err(format!("flash_attn_rs: internal error: {msg}")))
        }
    }
}

/// fwd(q, k, v, out, lse, softmax_scale, causal, window_size_left, window_size_right, softcap, device,
///     alibi_slopes=None, s_dmask=None, dropout=None)
///
/// Dense forward: q `[B, Sq, Hq, D]`, k and v `[B, Sk, Hk, D]` into out `[B, Sq, Hq, D]` and lse
/// (contiguous f32 `[B, Hq, Sq]`). `softmax_scale` None = 1/sqrt(D). On CUDA the kernels are queued on
/// the stream and the call returns. Optional: ALiBi slopes (f32 `[Hq]` or `[B, Hq]`; on CUDA device
/// memory, their values unchecked), the probabilities into `s_dmask` (`[B, Hq, Sq, Sk]`, f32 or q's
/// dtype; on CUDA written by a kernel queued after the forward's), dropout `(p, seed, offset)` (the same
/// mask on both targets).
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, softmax_scale, causal, window_size_left, window_size_right, softcap, device, alibi_slopes=None, s_dmask=None, dropout=None))]
#[allow(clippy::too_many_arguments)]
fn fwd(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    softmax_scale: &Bound<'_, PyAny>,
    causal: &Bound<'_, PyAny>,
    window_size_left: &Bound<'_, PyAny>,
    window_size_right: &Bound<'_, PyAny>,
    softcap: &Bound<'_, PyAny>,
    device: &Bound<'_, PyAny>,
    alibi_slopes: Option<&Bound<'_, PyAny>>,
    s_dmask: Option<&Bound<'_, PyAny>>,
    dropout: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let (q, k, v) = (Arg::parse(q, "q")?, Arg::parse(k, "k")?, Arg::parse(v, "v")?);
    let (out, lse) = (Arg::parse(out, "out")?, Arg::parse(lse, "lse")?);
    let ext = FwdExtras::parse(alibi_slopes, s_dmask)?;
    let opts = with_dropout(options(softmax_scale, causal, window_size_left, window_size_right, softcap)?, dropout)?;
    let target = target(device)?;
    call(py, || {
        let t = FwdViews { q: q.view(), k: k.view(), v: v.view(), out: out.view(), lse: lse.view(), alibi_slopes: ext.alibi(), s_dmask: ext.s_dmask() };
        unsafe { raw::fwd(&t, &opts, target) }
    })
}

/// The optional tensors of a forward: ALiBi slopes and the probabilities' output.
struct FwdExtras {
    alibi: Option<Arg>,
    s_dmask: Option<Arg>,
}

impl FwdExtras {
    fn parse(alibi_slopes: Option<&Bound<'_, PyAny>>, s_dmask: Option<&Bound<'_, PyAny>>) -> PyResult<FwdExtras> {
        Ok(FwdExtras { alibi: Arg::optional(alibi_slopes, "alibi_slopes")?, s_dmask: Arg::optional(s_dmask, "s_dmask")? })
    }
    fn alibi(&self) -> Option<View<'_>> {
        self.alibi.as_ref().map(Arg::view)
    }
    fn s_dmask(&self) -> Option<View<'_>> {
        self.s_dmask.as_ref().map(Arg::view)
    }
}

/// Whether `a`'s rows are what the CUDA kernels need: head dim contiguous, the first element and every
/// stride of a dimension longer than 1 a multiple of 16 bytes.
fn rows_aligned(a: &Arg) -> bool {
    let es = a.dtype.size();
    let n = a.shape.len();
    if n == 0 || (a.strides[n - 1] != 1 && a.shape[n - 1] > 1) || !a.addr.is_multiple_of(16) {
        return false;
    }
    a.shape[..n - 1].iter().zip(&a.strides[..n - 1]).all(|(&d, &s)| d <= 1 || (s * es).is_multiple_of(16))
}

/// fwd_dense(dtype, q, q_shape, q_strides, k, k_shape, k_strides, v, v_shape, v_strides, out, lse,
///           softmax_scale, causal, window_size_left, window_size_right, softcap, ordinal, stream,
///           decode=None) -> int
///
/// `fwd` in the form the Python package's fast path calls it (fewer Python objects to build): q, k and v
/// are addresses with their shapes and element strides, all of dtype `dtype`; out and lse are the
/// addresses of new contiguous buffers of q's shape (dtype `dtype`) and of `[B, Hq, Sq]` (f32). `ordinal`
/// -1 is the CPU, else CUDA device `ordinal` with `stream` a raw `CUstream`. `decode`, a workspace
/// `(address, bytes)` (`(0, 0)`: none), runs `raw::fwd_decode` instead (a decoding step on CUDA: the KV
/// cache's decode kernels over k and v in place where `raw::dense_fwd_decodes` says so). Returns 0 once
/// the forward is queued (run); on CUDA, where a row of q, k or v is not 16-byte aligned, minus a mask of
/// them (1 q, 2 k, 4 v), launching nothing, for the caller to copy them; with `decode`, where the
/// workspace is smaller than the call needs, those bytes, launching nothing.
#[pyfunction]
#[pyo3(signature = (dtype, q, q_shape, q_strides, k, k_shape, k_strides, v, v_shape, v_strides, out, lse, softmax_scale, causal, window_size_left, window_size_right, softcap, ordinal, stream, decode=None))]
#[allow(clippy::too_many_arguments)]
fn fwd_dense(
    py: Python<'_>,
    dtype: &Bound<'_, PyAny>,
    q: &Bound<'_, PyAny>,
    q_shape: &Bound<'_, PyAny>,
    q_strides: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    k_shape: &Bound<'_, PyAny>,
    k_strides: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    v_shape: &Bound<'_, PyAny>,
    v_strides: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    softmax_scale: &Bound<'_, PyAny>,
    causal: &Bound<'_, PyAny>,
    window_size_left: &Bound<'_, PyAny>,
    window_size_right: &Bound<'_, PyAny>,
    softcap: &Bound<'_, PyAny>,
    ordinal: &Bound<'_, PyAny>,
    stream: &Bound<'_, PyAny>,
    decode: Option<&Bound<'_, PyAny>>,
) -> PyResult<i64> {
    let dtype = self::dtype(dtype, "dtype")?;
    let arg = |addr: &Bound<'_, PyAny>, shape: &Bound<'_, PyAny>, strides: &Bound<'_, PyAny>, name: &str| -> PyResult<Arg> {
        let a = Arg {
            addr: uint(addr, name, "address", u64::MAX)?,
            dtype,
            shape: uints(shape, name, "shape", 1 << 62)?,
            strides: uints(strides, name, "strides", 1 << 62)?,
        };
        if a.shape.len() != a.strides.len() {
            return Err(PyValueError::new_err(format!("{name}: {} strides for {} dimensions", a.strides.len(), a.shape.len())));
        }
        Ok(a)
    };
    let (q, k, v) = (arg(q, q_shape, q_strides, "q")?, arg(k, k_shape, k_strides, "k")?, arg(v, v_shape, v_strides, "v")?);
    if q.shape.len() != 4 {
        return Err(PyValueError::new_err(format!("q: expected 4 dimensions, got {}", q.shape.len())));
    }
    let (b, s, h, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let out = Arg { addr: uint(out, "out", "address", u64::MAX)?, dtype, shape: q.shape.clone(), strides: vec![s * h * d, h * d, d, 1] };
    let lse = Arg { addr: uint(lse, "lse", "address", u64::MAX)?, dtype: DType::F32, shape: vec![b, h, s], strides: vec![h * s, s, 1] };
    let opts = options(softmax_scale, causal, window_size_left, window_size_right, softcap)?;
    let target = if int(ordinal, "ordinal")? < 0 {
        Target::Cpu
    } else {
        Target::Cuda { ordinal: uint(ordinal, "device", "ordinal", i32::MAX as u64)? as usize, stream: uint(stream, "device", "stream", usize::MAX as u64)? as usize }
    };
    let decode = decode.filter(|o| !o.is_none());
    let (decoding, ws) = (decode.is_some(), workspace(decode)?);
    if matches!(target, Target::Cuda { .. }) {
        let mask = [&q, &k, &v].iter().enumerate().filter(|(_, a)| !rows_aligned(a)).fold(0u32, |m, (i, _)| m | 1 << i);
        if mask != 0 {
            return Ok(-(mask as i64));
        }
    }
    call(py, || {
        let t = FwdViews { q: q.view(), k: k.view(), v: v.view(), out: out.view(), lse: lse.view(), alibi_slopes: None, s_dmask: None };
        if !decoding {
            return unsafe { raw::fwd(&t, &opts, target) }.map(|()| 0);
        }
        // Validated once where the workspace suffices (the usual call); sized only where it did not.
        let r = unsafe { raw::fwd_decode(&t, &opts, ws, target) };
        if let Err(flash_attn::Error::Value { arg: "workspace", .. }) = &r {
            let need = raw::decode_workspace_bytes(&t, &opts, target)?;
            if need > ws.bytes {
                return Ok(need as i64);
            }
        }
        r.map(|()| 0)
    })
}

/// varlen_fwd(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q,
///            seqused_k, softmax_scale, causal, window_size_left, window_size_right, softcap, device,
///            alibi_slopes=None, s_dmask=None, dropout=None)
///
/// Packed forward: q `[Tq, Hq, D]`, k and v `[Tk, Hk, D]`, int32 cu_seqlens `[B+1]` (and optional
/// seqused `[B]`, or None) into out `[Tq, Hq, D]` and lse (contiguous f32 `[Hq, Tq]`). `max_seqlen_q` /
/// `max_seqlen_k`: an int at least every (used) length, or None (not known: the CUDA kernels then
/// find each sequence in cu_seqlens on the device, so nothing reads it on the host); both are required with
/// s_dmask. The optional arguments as for `fwd` (s_dmask `[B, Hq, max_seqlen_q, max_seqlen_k]`).
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k, softmax_scale, causal, window_size_left, window_size_right, softcap, device, alibi_slopes=None, s_dmask=None, dropout=None))]
#[allow(clippy::too_many_arguments)]
fn varlen_fwd(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    cu_seqlens_q: &Bound<'_, PyAny>,
    cu_seqlens_k: &Bound<'_, PyAny>,
    max_seqlen_q: &Bound<'_, PyAny>,
    max_seqlen_k: &Bound<'_, PyAny>,
    seqused_q: &Bound<'_, PyAny>,
    seqused_k: &Bound<'_, PyAny>,
    softmax_scale: &Bound<'_, PyAny>,
    causal: &Bound<'_, PyAny>,
    window_size_left: &Bound<'_, PyAny>,
    window_size_right: &Bound<'_, PyAny>,
    softcap: &Bound<'_, PyAny>,
    device: &Bound<'_, PyAny>,
    alibi_slopes: Option<&Bound<'_, PyAny>>,
    s_dmask: Option<&Bound<'_, PyAny>>,
    dropout: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let (q, k, v) = (Arg::parse(q, "q")?, Arg::parse(k, "k")?, Arg::parse(v, "v")?);
    let (out, lse) = (Arg::parse(out, "out")?, Arg::parse(lse, "lse")?);
    let lens = Lens::parse(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, Some(seqused_q), Some(seqused_k))?;
    let ext = FwdExtras::parse(alibi_slopes, s_dmask)?;
    let opts = with_dropout(options(softmax_scale, causal, window_size_left, window_size_right, softcap)?, dropout)?;
    let target = target(device)?;
    call(py, || {
        let t = FwdViews { q: q.view(), k: k.view(), v: v.view(), out: out.view(), lse: lse.view(), alibi_slopes: ext.alibi(), s_dmask: ext.s_dmask() };
        unsafe { raw::varlen_fwd(&t, &lens.views(), &opts, target) }
    })
}

/// varlen_fwd_paged(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q,
///                  seqused_k, block_table, softmax_scale, causal, window_size_left, window_size_right,
///                  softcap, device, alibi_slopes=None, s_dmask=None, dropout=None)
///
/// Packed forward over paged K/V: q `[Tq, Hq, D]`, k and v `[num_blocks, page_size, Hk, D]`, int32
/// block_table `[B, max_blocks]`; key counts from cu_seqlens_k `[B+1]` (cut to seqused_k where given) or,
/// with cu_seqlens_k None, from seqused_k `[B]`. Out, lse and the max lengths (int or None) as
/// `varlen_fwd`.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k, block_table, softmax_scale, causal, window_size_left, window_size_right, softcap, device, alibi_slopes=None, s_dmask=None, dropout=None))]
#[allow(clippy::too_many_arguments)]
fn varlen_fwd_paged(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    cu_seqlens_q: &Bound<'_, PyAny>,
    cu_seqlens_k: &Bound<'_, PyAny>,
    max_seqlen_q: &Bound<'_, PyAny>,
    max_seqlen_k: &Bound<'_, PyAny>,
    seqused_q: &Bound<'_, PyAny>,
    seqused_k: &Bound<'_, PyAny>,
    block_table: &Bound<'_, PyAny>,
    softmax_scale: &Bound<'_, PyAny>,
    causal: &Bound<'_, PyAny>,
    window_size_left: &Bound<'_, PyAny>,
    window_size_right: &Bound<'_, PyAny>,
    softcap: &Bound<'_, PyAny>,
    device: &Bound<'_, PyAny>,
    alibi_slopes: Option<&Bound<'_, PyAny>>,
    s_dmask: Option<&Bound<'_, PyAny>>,
    dropout: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let (q, k, v) = (Arg::parse(q, "q")?, Arg::parse(k, "k")?, Arg::parse(v, "v")?);
    let (out, lse) = (Arg::parse(out, "out")?, Arg::parse(lse, "lse")?);
    let cu_q = Arg::parse(cu_seqlens_q, "cu_seqlens_q")?;
    let cu_k = Arg::optional(Some(cu_seqlens_k), "cu_seqlens_k")?;
    let max_q = opt_uint(max_seqlen_q, "max_seqlen_q", "value", 1 << 62)?;
    let max_k = opt_uint(max_seqlen_k, "max_seqlen_k", "value", 1 << 62)?;
    let used_q = Arg::optional(Some(seqused_q), "seqused_q")?;
    let used_k = Arg::optional(Some(seqused_k), "seqused_k")?;
    let table = Arg::parse(block_table, "block_table")?;
    let ext = FwdExtras::parse(alibi_slopes, s_dmask)?;
    let opts = with_dropout(options(softmax_scale, causal, window_size_left, window_size_right, softcap)?, dropout)?;
    let target = target(device)?;
    call(py, || {
        let t = FwdViews { q: q.view(), k: k.view(), v: v.view(), out: out.view(), lse: lse.view(), alibi_slopes: ext.alibi(), s_dmask: ext.s_dmask() };
        let paged = PagedVarlenViews {
            cu_seqlens_q: cu_q.view(),
            cu_seqlens_k: cu_k.as_ref().map(Arg::view),
            max_seqlen_q: max_q,
            max_seqlen_k: max_k,
            seqused_q: used_q.as_ref().map(Arg::view),
            seqused_k: used_k.as_ref().map(Arg::view),
            block_table: table.view(),
        };
        unsafe { raw::varlen_fwd_paged(&t, &paged, &opts, target) }
    })
}

/// fwd_kvcache(q, k_cache, v_cache, cache_seqlens, out, lse, softmax_scale, causal, window_size_left,
///             window_size_right, softcap, rotary_interleaved, num_splits, device, block_table=None,
///             k_new=None, v_new=None, rotary_cos=None, rotary_sin=None, cache_batch_idx=None,
///             cache_leftpad=None, alibi_slopes=None, workspace=None) -> int
///
/// flash-attn's `flash_attn_with_kvcache`: appends k_new / v_new (`[B, S_new, Hk, D]`) to the caches
/// (`[B_cache, S_cache, Hk, D]`, or pages `[num_blocks, page_size, Hk, D]` with block_table) in place at
/// `cache_seqlens[b]..` (int32 `[B]`), rotary on q and k_new, then attends q `[B, Sq, Hq, D]` over the
/// cache into out (like q) and lse (contiguous f32 `[B, Hq, Sq]`). `num_splits` 0 = heuristic. CUDA
/// needs a workspace `(address, bytes)` of the device's memory, 256-byte aligned, for q rotated and
/// split-KV's partials: a call whose workspace (None = 0 bytes) is smaller than it needs validates,
/// runs nothing and returns the bytes it needs; a call that runs returns 0.
#[pyfunction]
#[pyo3(signature = (q, k_cache, v_cache, cache_seqlens, out, lse, softmax_scale, causal, window_size_left, window_size_right, softcap, rotary_interleaved, num_splits, device, block_table=None, k_new=None, v_new=None, rotary_cos=None, rotary_sin=None, cache_batch_idx=None, cache_leftpad=None, alibi_slopes=None, workspace=None))]
#[allow(clippy::too_many_arguments)]
fn fwd_kvcache(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k_cache: &Bound<'_, PyAny>,
    v_cache: &Bound<'_, PyAny>,
    cache_seqlens: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    softmax_scale: &Bound<'_, PyAny>,
    causal: &Bound<'_, PyAny>,
    window_size_left: &Bound<'_, PyAny>,
    window_size_right: &Bound<'_, PyAny>,
    softcap: &Bound<'_, PyAny>,
    rotary_interleaved: &Bound<'_, PyAny>,
    num_splits: &Bound<'_, PyAny>,
    device: &Bound<'_, PyAny>,
    block_table: Option<&Bound<'_, PyAny>>,
    k_new: Option<&Bound<'_, PyAny>>,
    v_new: Option<&Bound<'_, PyAny>>,
    rotary_cos: Option<&Bound<'_, PyAny>>,
    rotary_sin: Option<&Bound<'_, PyAny>>,
    cache_batch_idx: Option<&Bound<'_, PyAny>>,
    cache_leftpad: Option<&Bound<'_, PyAny>>,
    alibi_slopes: Option<&Bound<'_, PyAny>>,
    workspace: Option<&Bound<'_, PyAny>>,
) -> PyResult<usize> {
    let ws = self::workspace(workspace)?;
    let q = Arg::parse(q, "q")?;
    let (k_cache, v_cache) = (Arg::parse(k_cache, "k_cache")?, Arg::parse(v_cache, "v_cache")?);
    let seqlens = Arg::parse(cache_seqlens, "cache_seqlens")?;
    let (out, lse) = (Arg::parse(out, "out")?, Arg::parse(lse, "lse")?);
    let table = Arg::optional(block_table, "block_table")?;
    let (k_new, v_new) = (Arg::optional(k_new, "k")?, Arg::optional(v_new, "v")?);
    let (cos, sin) = (Arg::optional(rotary_cos, "rotary_cos")?, Arg::optional(rotary_sin, "rotary_sin")?);
    let batch_idx = Arg::optional(cache_batch_idx, "cache_batch_idx")?;
    let leftpad = Arg::optional(cache_leftpad, "cache_leftpad")?;
    let alibi = Arg::optional(alibi_slopes, "alibi_slopes")?;
    let opts = options(softmax_scale, causal, window_size_left, window_size_right, softcap)?;
    let kv = KvCacheOptions { rotary_interleaved: flag(rotary_interleaved, "rotary_interleaved")?, num_splits: uint(num_splits, "num_splits", "value", 1 << 20)? as usize };
    let target = target(device)?;
    call(py, || {
        let t = KvCacheViews {
            q: q.view(),
            k_cache: k_cache.view(),
            v_cache: v_cache.view(),
            cache_seqlens: seqlens.view(),
            block_table: table.as_ref().map(Arg::view),
            k_new: k_new.as_ref().map(Arg::view),
            v_new: v_new.as_ref().map(Arg::view),
            rotary_cos: cos.as_ref().map(Arg::view),
            rotary_sin: sin.as_ref().map(Arg::view),
            cache_batch_idx: batch_idx.as_ref().map(Arg::view),
            cache_leftpad: leftpad.as_ref().map(Arg::view),
            alibi_slopes: alibi.as_ref().map(Arg::view),
            out: out.view(),
            lse: lse.view(),
        };
        let need = raw::kvcache_workspace_bytes(&t, &opts, &kv, target)?;
        if need > ws.bytes {
            return Ok(need);
        }
        unsafe { raw::fwd_kvcache(&t, &opts, &kv, ws, target) }.map(|()| 0)
    })
}

/// bwd(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale, causal, window_size_left, window_size_right,
///     softcap, deterministic, workspace, device)
///
/// Dense backward into dq (like q), dk and dv (like k). `workspace` is `(address, bytes)` of at least
/// `bwd_workspace_bytes(q_shape, deterministic)` bytes of the device's memory, 256-byte aligned (None on
/// the CPU). Optional: the forward's ALiBi slopes and dropout `(p, seed, offset)` (the same mask is
/// regenerated).
#[pyfunction]
#[pyo3(signature = (dout, q, k, v, out, lse, dq, dk, dv, softmax_scale, causal, window_size_left, window_size_right, softcap, deterministic, workspace, device, alibi_slopes=None, dropout=None))]
#[allow(clippy::too_many_arguments)]
fn bwd(
    py: Python<'_>,
    dout: &Bound<'_, PyAny>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    dq: &Bound<'_, PyAny>,
    dk: &Bound<'_, PyAny>,
    dv: &Bound<'_, PyAny>,
    softmax_scale: &Bound<'_, PyAny>,
    causal: &Bound<'_, PyAny>,
    window_size_left: &Bound<'_, PyAny>,
    window_size_right: &Bound<'_, PyAny>,
    softcap: &Bound<'_, PyAny>,
    deterministic: &Bound<'_, PyAny>,
    workspace: &Bound<'_, PyAny>,
    device: &Bound<'_, PyAny>,
    alibi_slopes: Option<&Bound<'_, PyAny>>,
    dropout: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let dout = Arg::parse(dout, "dout")?;
    let (q, k, v) = (Arg::parse(q, "q")?, Arg::parse(k, "k")?, Arg::parse(v, "v")?);
    let (out, lse) = (Arg::parse(out, "out")?, Arg::parse(lse, "lse")?);
    let (dq, dk, dv) = (Arg::parse(dq, "dq")?, Arg::parse(dk, "dk")?, Arg::parse(dv, "dv")?);
    let alibi = Arg::optional(alibi_slopes, "alibi_slopes")?;
    let opts = with_dropout(options(softmax_scale, causal, window_size_left, window_size_right, softcap)?, dropout)?;
    let deterministic = flag(deterministic, "deterministic")?;
    let ws = self::workspace(Some(workspace))?;
    let target = target(device)?;
    call(py, || {
        let t = BwdViews { dout: dout.view(), q: q.view(), k: k.view(), v: v.view(), out: out.view(), lse: lse.view(), dq: dq.view(), dk: dk.view(), dv: dv.view(), alibi_slopes: alibi.as_ref().map(Arg::view) };
        unsafe { raw::bwd(&t, &opts, deterministic, ws, target) }
    })
}

/// varlen_bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
///            max_seqlen_k, seqused_q, seqused_k, softmax_scale, causal, window_size_left,
///            window_size_right, softcap, deterministic, workspace, device)
///
/// Packed backward, over `varlen_fwd`'s layouts (max lengths int or None as there; optional arguments
/// as for `bwd`).
#[pyfunction]
#[pyo3(signature = (dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k, softmax_scale, causal, window_size_left, window_size_right, softcap, deterministic, workspace, device, alibi_slopes=None, dropout=None))]
#[allow(clippy::too_many_arguments)]
fn varlen_bwd(
    py: Python<'_>,
    dout: &Bound<'_, PyAny>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    dq: &Bound<'_, PyAny>,
    dk: &Bound<'_, PyAny>,
    dv: &Bound<'_, PyAny>,
    cu_seqlens_q: &Bound<'_, PyAny>,
    cu_seqlens_k: &Bound<'_, PyAny>,
    max_seqlen_q: &Bound<'_, PyAny>,
    max_seqlen_k: &Bound<'_, PyAny>,
    seqused_q: &Bound<'_, PyAny>,
    seqused_k: &Bound<'_, PyAny>,
    softmax_scale: &Bound<'_, PyAny>,
    causal: &Bound<'_, PyAny>,
    window_size_left: &Bound<'_, PyAny>,
    window_size_right: &Bound<'_, PyAny>,
    softcap: &Bound<'_, PyAny>,
    deterministic: &Bound<'_, PyAny>,
    workspace: &Bound<'_, PyAny>,
    device: &Bound<'_, PyAny>,
    alibi_slopes: Option<&Bound<'_, PyAny>>,
    dropout: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let dout = Arg::parse(dout, "dout")?;
    let (q, k, v) = (Arg::parse(q, "q")?, Arg::parse(k, "k")?, Arg::parse(v, "v")?);
    let (out, lse) = (Arg::parse(out, "out")?, Arg::parse(lse, "lse")?);
    let (dq, dk, dv) = (Arg::parse(dq, "dq")?, Arg::parse(dk, "dk")?, Arg::parse(dv, "dv")?);
    let lens = Lens::parse(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, Some(seqused_q), Some(seqused_k))?;
    let alibi = Arg::optional(alibi_slopes, "alibi_slopes")?;
    let opts = with_dropout(options(softmax_scale, causal, window_size_left, window_size_right, softcap)?, dropout)?;
    let deterministic = flag(deterministic, "deterministic")?;
    let ws = self::workspace(Some(workspace))?;
    let target = target(device)?;
    call(py, || {
        let t = BwdViews { dout: dout.view(), q: q.view(), k: k.view(), v: v.view(), out: out.view(), lse: lse.view(), dq: dq.view(), dk: dk.view(), dv: dv.view(), alibi_slopes: alibi.as_ref().map(Arg::view) };
        unsafe { raw::varlen_bwd(&t, &lens.views(), &opts, deterministic, ws, target) }
    })
}

/// bwd_workspace_bytes(q_shape, deterministic, sequences=None, kv_heads=None) -> int
///
/// Bytes of workspace a CUDA backward with q of shape `q_shape` (`[B, Sq, Hq, D]` or `[Tq, Hq, D]`)
/// needs (the CPU needs none). With `sequences` (the batch, or len(cu_seqlens_q) - 1) and `kv_heads`:
/// the size at which it runs at full speed (the deterministic mode on Hopper needs more).
#[pyfunction]
#[pyo3(signature = (q_shape, deterministic, sequences=None, kv_heads=None))]
fn bwd_workspace_bytes(q_shape: &Bound<'_, PyAny>, deterministic: &Bound<'_, PyAny>, sequences: Option<&Bound<'_, PyAny>>, kv_heads: Option<&Bound<'_, PyAny>>) -> PyResult<usize> {
    let shape = uints(q_shape, "q_shape", "shape", 1 << 62)?;
    let deterministic = flag(deterministic, "deterministic")?;
    match (sequences, kv_heads) {
        (None, None) => raw::bwd_workspace_bytes(&shape, deterministic).map_err(to_py),
        (Some(b), Some(h)) => {
            let b = uint(b, "sequences", "count", 1 << 31)? as usize;
            let h = uint(h, "kv_heads", "count", 1 << 31)? as usize;
            raw::bwd_workspace_bytes_fast(&shape, b, h, deterministic).map_err(to_py)
        }
        _ => Err(PyValueError::new_err("bwd_workspace_bytes: give both sequences and kv_heads, or neither")),
    }
}

/// preload(ordinal)
///
/// Loads the kernels of CUDA device `ordinal` now (e.g. before capturing a CUDA graph) so that no later
/// call pays for it. RuntimeError without CUDA.
#[pyfunction]
fn preload(py: Python<'_>, ordinal: &Bound<'_, PyAny>) -> PyResult<()> {
    let ordinal = uint(ordinal, "ordinal", "value", i32::MAX as u64)? as usize;
    call(py, || raw::preload(ordinal))
}

/// cuda_available() -> bool
///
/// Whether a CUDA driver loads and reports at least one device (never fails without one).
#[pyfunction]
fn cuda_available(py: Python<'_>) -> bool {
    py.detach(|| std::panic::catch_unwind(flash_attn::cuda::available).unwrap_or(false))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(fwd, m)?)?;
    m.add_function(wrap_pyfunction!(fwd_dense, m)?)?;
    m.add_function(wrap_pyfunction!(varlen_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(varlen_fwd_paged, m)?)?;
    m.add_function(wrap_pyfunction!(fwd_kvcache, m)?)?;
    m.add_function(wrap_pyfunction!(bwd, m)?)?;
    m.add_function(wrap_pyfunction!(varlen_bwd, m)?)?;
    m.add_function(wrap_pyfunction!(bwd_workspace_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(overlaps, m)?)?;
    m.add_function(wrap_pyfunction!(preload, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add("HEAD_DIMS", PyTuple::new(m.py(), flash_attn::HEAD_DIMS)?)?;
    // raw::dense_fwd_decodes's limits (scaled_dot_product_attention's decode routing decides in Python,
    // which torch.compile traces).
    let (rows, dims) = raw::dense_decode_limits();
    m.add("DENSE_DECODE_MAX_ROWS", rows)?;
    m.add("DENSE_DECODE_HEAD_DIMS", PyTuple::new(m.py(), dims)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
