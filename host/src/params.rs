//! The kernels' parameter struct, from the one definition the device code compiles too.
#[path = "../../kernels-gpu/src/params.rs"]
mod shared;
pub use shared::*;
