//! flash-attn: FlashAttention forward with flash-attn 2's semantics, on CUDA GPUs through kernels written
//! in Rust and compiled to PTX, and on the CPU where no GPU is present; so does the backward (`bwd`,
//! `varlen_bwd`), with ALiBi, dropout and the attention probabilities (`fwd_with`, `bwd_with`,
//! `AttnOptions::dropout`; the mask's definition is in `dropout`). For inference, `varlen_fwd_paged`
//! (paged K/V), `fwd_kvcache` (append to a KV cache, rotary, split-KV) and `combine` (merge partial
//! results) run on both too.
//!
//! ```no_run
//! use flash_attn::{fwd, AttnOptions, DType, Device, Tensor};
//! let (b, s, h, d) = (1, 128, 4, 64);
//! let x: Vec<f32> = (0..b * s * h * d).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
//! let q = Tensor::from_f32(&x, &[b, s, h, d], DType::BF16)?.to_device(Device::best())?;
//! let o = fwd(&q, &q, &q, &AttnOptions { causal: true, ..Default::default() })?;
//! assert_eq!(o.lse.shape(), &[b, h, s]);
//! # Ok::<(), flash_attn::Error>(())
//! ```

pub mod alias;
pub mod api;
#[cfg(feature = "candle")]
pub mod candle;
pub mod cpu;
pub mod cuda;
mod dispatch;
pub mod dropout;
pub mod error;
mod launch;
mod module;
pub mod params;
pub mod problem;
pub mod ptx;
pub mod raw;
pub mod tensor;
pub mod types;
pub mod validate;

pub use api::{
    bwd, bwd_with, check_kvcache_contents, check_paged_varlen_contents, check_varlen_contents, combine, fwd, fwd_into, fwd_kvcache, fwd_with, varlen_bwd, varlen_bwd_with, varlen_fwd, varlen_fwd_into, varlen_fwd_paged, varlen_fwd_paged_with, varlen_fwd_with, BwdOutput, Extras,
    FwdOutput, KvCache, PagedVarlen, Varlen,
};
pub use error::{Error, Result};
pub use tensor::{CpuData, Tensor};
pub use types::{AttnOptions, CombineViews, DType, Device, Dropout, KernelChoice, KvCacheOptions, KvCacheViews, PagedVarlenViews, Target, VarlenViews, View};

/// Head dimensions with a kernel variant (and accepted by the CPU path).
pub const HEAD_DIMS: [usize; 6] = [32, 64, 96, 128, 192, 256];

/// The head dim of `HEAD_DIMS` a head dim `d` runs at when zero-padded (as the adapters pad the others):
/// `d` itself or the next one up; None for 0 and above 256.
pub fn padded_head_dim(d: usize) -> Option<usize> {
    if d == 0 { None } else { HEAD_DIMS.iter().copied().find(|&h| h >= d) }
}
