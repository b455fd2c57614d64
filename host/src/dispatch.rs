//! (head dim, dtype) -> kernel variant, tile shape, grid and shared memory, from the same table the
//! device code is generated from (kernels-gpu/src/variants.rs).

#[path = "../../kernels-gpu/src/variants.rs"]
#[macro_use]
mod variants;

pub use variants::{fwd_config, fwd_kernel_name, FwdConfig, KernelDType};

use crate::problem::Problem;
use crate::tensor::DType;

/// A launch: which kernel, its grid, block and dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FwdLaunch {
    pub kernel: &'static str,
    pub config: FwdConfig,
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub smem_bytes: usize,
}

/// Grid: x walks query-row blocks (blocks stride over sequences longer than `seqlen_q`, so a too-small
/// max_seqlen is slow but never wrong), y heads, z sequences, plus one z slice for varlen's tail rows.
pub fn fwd_launch(p: &Problem) -> Option<FwdLaunch> {
    let dtype = match p.dtype {
        DType::BF16 => KernelDType::BF16,
        DType::F16 => KernelDType::F16,
        _ => return None,
    };
    let kernel = fwd_kernel_name(p.head_dim, dtype)?;
    let config = fwd_config(p.head_dim);
    let m_blocks = p.seqlen_q.max(1).div_ceil(config.block_m());
    let z = p.batch + usize::from(p.varlen);
    Some(FwdLaunch { kernel, config, grid: (m_blocks as u32, p.hq as u32, z as u32), block: config.threads() as u32, smem_bytes: config.smem_bytes() })
}
