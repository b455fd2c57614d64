//! Device code of flash-attn: FlashAttention kernels in Rust, compiled to one PTX module by
//! xtask/src/ptx.rs. `params`, `variants`, `seqlen`, `mask` and `block` are pure and also compiled for the
//! host (and tested there); `arch` holds every piece of inline PTX.
#![no_std]
#![feature(abi_ptx, stdarch_nvptx, asm_experimental_arch, stmt_expr_attributes)]

pub mod arch;
pub mod block;
pub mod bwd;
// Dropout's keep-mask, shared with the host (host/src/shared/).
#[path = "../../host/src/shared/dropout.rs"]
pub mod dropout;
pub mod fwd;
pub mod kvcache;
pub mod mask;
pub mod mods;
// Shared with the host, which ships them in its package (host/src/shared/).
#[path = "../../host/src/shared/params.rs"]
pub mod params;
#[cfg(fa_sm90)]
pub mod pipeline;
pub mod seqlen;
pub mod softmax;
pub mod tile;
#[path = "../../host/src/shared/variants.rs"]
pub mod variants;

// Device-only (params.rs is also compiled by the host, which has no `seqlen`): the length fields of both
// parameter structs as one `seqlen::Lengths`.
macro_rules! lengths_of {
    ($t:ident) => {
        impl params::$t {
            /// The fields `seqlen::Lengths::slice` needs.
            #[inline(always)]
            pub fn lengths(&self) -> seqlen::Lengths {
                seqlen::Lengths {
                    cu_seqlens_q: self.cu_seqlens_q,
                    cu_seqlens_k: self.cu_seqlens_k,
                    seqused_q: self.seqused_q,
                    seqused_k: self.seqused_k,
                    batch: self.batch,
                    seqlen_q: self.seqlen_q,
                    seqlen_k: self.seqlen_k,
                    total_q: self.total_q,
                    total_k: self.total_k,
                    paged_keys: None,
                    k_first: 0,
                    seqused_k_add: 0,
                }
            }
        }
    };
}
lengths_of!(FwdParams);
lengths_of!(BwdParams);
