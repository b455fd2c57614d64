//! CUDA path (placeholder while the driver layer is written).
use crate::error::{Error, Result};
use crate::problem::Problem;
use crate::tensor::Tensor;
use crate::api::{FwdOutput, Varlen};

pub fn available() -> bool { false }

#[derive(Clone, Debug)]
pub struct DeviceBuffer;
impl DeviceBuffer {
    pub fn zeros(_o: usize, _n: usize) -> Result<Self> { Err(Error::Cuda("not built".into())) }
    pub fn from_host(_o: usize, _b: &[u8]) -> Result<Self> { Err(Error::Cuda("not built".into())) }
    pub fn ordinal(&self) -> usize { 0 }
    pub fn len_bytes(&self) -> usize { 0 }
    pub fn to_host(&self) -> Result<Vec<u8>> { Err(Error::Cuda("not built".into())) }
}
pub fn fwd(_p: &Problem, _q: &Tensor, _k: &Tensor, _v: &Tensor, _vl: Option<&Varlen<'_>>) -> Result<FwdOutput> { Err(Error::Cuda("not built".into())) }
