//! The kernels' parameter struct, from the one definition the device code compiles too.
#[path = "shared/params.rs"]
mod shared;
pub use shared::*;

// The kernel takes the struct by value: its bytes are the launch parameter.
unsafe impl cudarc::driver::DeviceRepr for FwdParams {}
unsafe impl cudarc::driver::DeviceRepr for BwdParams {}
unsafe impl cudarc::driver::DeviceRepr for ProbsParams {}
unsafe impl cudarc::driver::DeviceRepr for AppendParams {}
unsafe impl cudarc::driver::DeviceRepr for CombineParams {}
