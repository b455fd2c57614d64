//! Placeholder: the helper writes this.
use crate::{api::{AttnOptions, Varlen}, error::Result, problem::Problem, tensor::Tensor};
pub fn validate_fwd(_q: &Tensor, _k: &Tensor, _v: &Tensor, _varlen: Option<&Varlen<'_>>, _opts: &AttnOptions) -> Result<Problem> { todo!() }
