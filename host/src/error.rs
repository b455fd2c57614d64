//! Every way a call can fail. Each variant names the argument at fault, so a message alone tells the user
//! what to fix.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// An argument has the wrong element type (`expected` lists what is accepted).
    DType { arg: &'static str, got: String, expected: &'static str },
    /// Two tensors that must share a dtype do not.
    DTypeMismatch { arg: &'static str, got: String, expected: String },
    /// Two tensors that must live on one device do not.
    DeviceMismatch { arg: &'static str, got: String, expected: String },
    /// Wrong number of dimensions.
    Rank { arg: &'static str, got: usize, expected: usize },
    /// A dimension does not match.
    Shape { arg: &'static str, msg: String },
    /// The last dimension must have stride 1.
    NotContiguous { arg: &'static str },
    /// Head dimension (q's; k and v must match it) outside the supported set.
    HeadDim { got: usize },
    /// `num_heads % num_heads_k != 0`.
    Heads { hq: usize, hk: usize },
    /// A value (option, length, window) is out of range.
    Value { arg: &'static str, msg: String },
    /// A cu_seqlens / seqused content error, found on the host.
    SeqLens { arg: &'static str, msg: String },
    /// A size that does not fit the kernels' 32-bit row indices.
    TooLarge { arg: &'static str, msg: String },
    /// A tensor constructor was given data that does not fill its shape.
    Data { msg: String },
    /// The CUDA driver reported an error, or CUDA was asked for where none is present.
    Cuda(String),
    /// Reading or writing a file (CLI).
    Io(String),
    /// A feature that exists on another target but not (yet) on this one: `feature` names it.
    Unsupported { feature: &'static str, msg: String },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::DType { arg, got, expected } => write!(f, "{arg}: dtype {got} is not supported here, expected {expected}"),
            Error::DTypeMismatch { arg, got, expected } => write!(f, "{arg}: dtype {got} does not match {expected}"),
            Error::DeviceMismatch { arg, got, expected } => write!(f, "{arg}: is on {got} but q is on {expected}"),
            Error::Rank { arg, got, expected } => write!(f, "{arg}: expected {expected} dimensions, got {got}"),
            Error::Shape { arg, msg } => write!(f, "{arg}: {msg}"),
            Error::NotContiguous { arg } => write!(f, "{arg}: the last dimension must be contiguous (stride 1)"),
            Error::HeadDim { got } => write!(f, "q: head dim {got} is not supported; supported: 32, 64, 96, 128, 192, 256"),
            Error::Heads { hq, hk: 0 } => write!(f, "num_heads_k (k/v): must be at least 1, got 0 (q has {hq} heads)"),
            Error::Heads { hq, hk } => write!(f, "num_heads (q: {hq}) must be a multiple of num_heads_k (k/v: {hk})"),
            Error::Value { arg, msg } => write!(f, "{arg}: {msg}"),
            Error::SeqLens { arg, msg } => write!(f, "{arg}: {msg}"),
            Error::TooLarge { arg, msg } => write!(f, "{arg}: {msg}"),
            Error::Data { msg } => write!(f, "{msg}"),
            Error::Cuda(msg) => write!(f, "cuda: {msg}"),
            Error::Io(msg) => write!(f, "io: {msg}"),
            Error::Unsupported { feature, msg } => write!(f, "{feature}: {msg}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Cuda(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;
