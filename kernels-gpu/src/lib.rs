//! Device code of flash-attn: FlashAttention kernels in Rust, compiled to one PTX module by
//! xtask/src/ptx.rs. `params`, `variants`, `seqlen`, `mask` and `block` are pure and also compiled for the
//! host (and tested there); `arch` holds every piece of inline PTX.
#![no_std]
#![feature(abi_ptx, stdarch_nvptx, asm_experimental_arch)]

pub mod arch;
pub mod block;
pub mod bwd;
pub mod fwd;
pub mod mask;
pub mod params;
pub mod seqlen;
pub mod softmax;
pub mod variants;
