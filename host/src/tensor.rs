//! A small strided tensor: typed host memory or a device allocation, a shape, strides in elements and an
//! offset. Enough to hand attention its inputs without copies; not a general array library.

use crate::error::{Error, Result};
use crate::types::View;
use half::{bf16, f16};

pub use crate::types::{DType, Device};

/// Host storage, typed so reads need no casts.
#[derive(Clone, Debug)]
pub enum CpuData {
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    F32(Vec<f32>),
    I32(Vec<i32>),
}

/// `n` copies of `zero`; a size past the address space, an allocation the system refuses, or (on Linux) one
/// larger than the memory available is an error rather than a panic, an abort or the kernel's OOM killer (a
/// broadcast input can describe an output far larger than its storage; `s_dmask` is O(S^2)).
pub(crate) fn filled<T: Clone>(n: usize, zero: T) -> Result<Vec<T>> {
    let mut v = Vec::new();
    let bytes = n.checked_mul(std::mem::size_of::<T>());
    let too_large = |msg: String| Err(Error::TooLarge { arg: "output", msg });
    if bytes.is_none_or(|b| b > isize::MAX as usize) || v.try_reserve_exact(n).is_err() {
        return too_large(format!("{n} elements of {} bytes cannot be allocated", std::mem::size_of::<T>()));
    }
    let bytes = bytes.unwrap_or(0);
    // Overcommit lets the reservation above succeed whatever its size; filling it would then be killed.
    if bytes >= 1 << 28
        && let Some(available) = available_memory()
        && bytes > available
    {
        return too_large(format!("{bytes} bytes exceed the {available} bytes of memory available"));
    }
    v.resize(n, zero);
    Ok(v)
}

/// The memory the system can still hand out (Linux's MemAvailable), where known.
fn available_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

impl CpuData {
    pub fn len(&self) -> usize {
        match self {
            CpuData::F16(v) => v.len(),
            CpuData::BF16(v) => v.len(),
            CpuData::F32(v) => v.len(),
            CpuData::I32(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> DType {
        match self {
            CpuData::F16(_) => DType::F16,
            CpuData::BF16(_) => DType::BF16,
            CpuData::F32(_) => DType::F32,
            CpuData::I32(_) => DType::I32,
        }
    }
    /// Element `i` widened to f32 (i32 converted by value).
    #[inline]
    pub fn get_f32(&self, i: usize) -> f32 {
        match self {
            CpuData::F16(v) => v[i].to_f32(),
            CpuData::BF16(v) => v[i].to_f32(),
            CpuData::F32(v) => v[i],
            CpuData::I32(v) => v[i] as f32,
        }
    }
    /// `n` zeros (`filled`).
    fn zeros(dtype: DType, n: usize) -> Result<CpuData> {
        Ok(match dtype {
            DType::F16 => CpuData::F16(filled(n, f16::ZERO)?),
            DType::BF16 => CpuData::BF16(filled(n, bf16::ZERO)?),
            DType::F32 => CpuData::F32(filled(n, 0.0)?),
            DType::I32 => CpuData::I32(filled(n, 0)?),
        })
    }
    fn from_f32(dtype: DType, data: &[f32]) -> Result<CpuData> {
        Ok(match dtype {
            DType::F16 => CpuData::F16(data.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => CpuData::BF16(data.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F32 => CpuData::F32(data.to_vec()),
            DType::I32 => return Err(Error::Data { msg: "from_f32 cannot make an i32 tensor; use from_i32".into() }),
        })
    }
    /// Raw little-endian bytes of the whole storage.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            CpuData::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            CpuData::BF16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            CpuData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            CpuData::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
    /// Storage from raw little-endian bytes (`bytes.len()` must be a multiple of the element size).
    pub fn from_bytes(dtype: DType, bytes: &[u8]) -> Result<CpuData> {
        if !bytes.len().is_multiple_of(dtype.size()) {
            return Err(Error::Data { msg: format!("{} bytes is not a whole number of {dtype} elements", bytes.len()) });
        }
        let c2 = || bytes.chunks_exact(2).map(|c| [c[0], c[1]]);
        let c4 = || bytes.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]);
        Ok(match dtype {
            DType::F16 => CpuData::F16(c2().map(f16::from_le_bytes).collect()),
            DType::BF16 => CpuData::BF16(c2().map(bf16::from_le_bytes).collect()),
            DType::F32 => CpuData::F32(c4().map(f32::from_le_bytes).collect()),
            DType::I32 => CpuData::I32(c4().map(i32::from_le_bytes).collect()),
        })
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Storage {
    Cpu(CpuData),
    Cuda(crate::cuda::DeviceBuffer),
}

/// A strided view of typed storage on one device.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub(crate) storage: Storage,
    dtype: DType,
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

pub(crate) fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1].max(1);
    }
    strides
}

fn numel(shape: &[usize]) -> Result<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| Error::Data { msg: format!("shape {shape:?} overflows usize") })
}

impl Tensor {
    fn from_cpu(data: CpuData, shape: &[usize]) -> Result<Tensor> {
        let n = numel(shape)?;
        if data.len() != n {
            return Err(Error::Data { msg: format!("{} elements do not fill shape {shape:?} ({n})", data.len()) });
        }
        Ok(Tensor { dtype: data.dtype(), storage: Storage::Cpu(data), shape: shape.to_vec(), strides: contiguous_strides(shape), offset: 0 })
    }

    /// A contiguous host tensor of `dtype` (f16, bf16 or f32) from f32 values, rounded to nearest.
    pub fn from_f32(data: &[f32], shape: &[usize], dtype: DType) -> Result<Tensor> {
        Tensor::from_cpu(CpuData::from_f32(dtype, data)?, shape)
    }
    pub fn from_f16(data: Vec<f16>, shape: &[usize]) -> Result<Tensor> {
        Tensor::from_cpu(CpuData::F16(data), shape)
    }
    pub fn from_bf16(data: Vec<bf16>, shape: &[usize]) -> Result<Tensor> {
        Tensor::from_cpu(CpuData::BF16(data), shape)
    }
    pub fn from_i32(data: Vec<i32>, shape: &[usize]) -> Result<Tensor> {
        Tensor::from_cpu(CpuData::I32(data), shape)
    }
    /// A contiguous host tensor from raw little-endian bytes.
    pub fn from_bytes(bytes: &[u8], shape: &[usize], dtype: DType) -> Result<Tensor> {
        Tensor::from_cpu(CpuData::from_bytes(dtype, bytes)?, shape)
    }

    /// A contiguous zero tensor on `device`.
    pub fn zeros(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        let n = numel(shape)?;
        let storage = match device {
            Device::Cpu => Storage::Cpu(CpuData::zeros(dtype, n)?),
            Device::Cuda(ordinal) => {
                let bytes = n.checked_mul(dtype.size()).ok_or_else(|| Error::Data { msg: format!("shape {shape:?} overflows usize") })?;
                Storage::Cuda(crate::cuda::DeviceBuffer::zeros(ordinal, bytes)?)
            }
        };
        Ok(Tensor { storage, dtype, shape: shape.to_vec(), strides: contiguous_strides(shape), offset: 0 })
    }

    /// The same storage seen through other shape, strides (in elements) and offset. Fails if any element
    /// of the view would fall outside the storage.
    pub fn as_strided(&self, shape: &[usize], strides: &[usize], offset: usize) -> Result<Tensor> {
        if shape.len() != strides.len() {
            return Err(Error::Data { msg: format!("shape {shape:?} and strides {strides:?} differ in rank") });
        }
        let capacity = self.storage_len();
        if offset > capacity {
            return Err(Error::Data { msg: format!("offset {offset} exceeds storage of {capacity} elements") });
        }
        if numel(shape)? > 0 {
            let last = shape.iter().zip(strides).try_fold(offset, |acc, (&d, &s)| (d - 1).checked_mul(s).and_then(|x| x.checked_add(acc)));
            match last {
                Some(l) if l < capacity => {}
                _ => return Err(Error::Data { msg: format!("view {shape:?} strides {strides:?} offset {offset} exceeds storage of {capacity} elements") }),
            }
        }
        Ok(Tensor { storage: self.storage.clone(), dtype: self.dtype, shape: shape.to_vec(), strides: strides.to_vec(), offset })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(b) => Device::Cuda(b.ordinal()),
        }
    }
    /// Elements in the underlying storage (not the view).
    pub fn storage_len(&self) -> usize {
        match &self.storage {
            Storage::Cpu(d) => d.len(),
            Storage::Cuda(b) => b.len_bytes() / self.dtype.size(),
        }
    }
    pub fn is_contiguous(&self) -> bool {
        self.strides == contiguous_strides(&self.shape)
    }
    /// Host storage, when on the CPU.
    pub fn cpu_data(&self) -> Option<&CpuData> {
        match &self.storage {
            Storage::Cpu(d) => Some(d),
            Storage::Cuda(_) => None,
        }
    }

    /// Storage index of each element of the view, in row-major logical order.
    fn storage_indices(&self) -> impl Iterator<Item = usize> + '_ {
        let n = self.numel();
        (0..n).map(move |mut lin| {
            let mut idx = self.offset;
            for d in (0..self.shape.len()).rev() {
                let extent = self.shape[d];
                idx += (lin % extent) * self.strides[d];
                lin /= extent;
            }
            idx
        })
    }

    /// A contiguous host copy of this tensor.
    pub fn to_cpu(&self) -> Result<Tensor> {
        let data = match &self.storage {
            Storage::Cpu(d) => d.clone(),
            Storage::Cuda(b) => CpuData::from_bytes(self.dtype, &b.to_host()?)?,
        };
        if self.offset == 0 && self.is_contiguous() && data.len() == self.numel() {
            return Tensor::from_cpu(data, &self.shape);
        }
        let gathered = match &data {
            CpuData::F16(v) => CpuData::F16(self.storage_indices().map(|i| v[i]).collect()),
            CpuData::BF16(v) => CpuData::BF16(self.storage_indices().map(|i| v[i]).collect()),
            CpuData::F32(v) => CpuData::F32(self.storage_indices().map(|i| v[i]).collect()),
            CpuData::I32(v) => CpuData::I32(self.storage_indices().map(|i| v[i]).collect()),
        };
        Tensor::from_cpu(gathered, &self.shape)
    }

    /// A contiguous copy on `device` (the view's layout is kept only for same-device no-op copies).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device() {
            return Ok(self.clone());
        }
        let host = self.to_cpu()?;
        match device {
            Device::Cpu => Ok(host),
            Device::Cuda(ordinal) => {
                let bytes = host.cpu_data().expect("to_cpu returns host storage").to_bytes();
                let buf = crate::cuda::DeviceBuffer::from_host(ordinal, &bytes)?;
                Ok(Tensor { storage: Storage::Cuda(buf), dtype: self.dtype, shape: self.shape.clone(), strides: contiguous_strides(&self.shape), offset: 0 })
            }
        }
    }

    /// The values in row-major logical order, widened to f32 (copied from the device if needed).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let host = self.to_cpu()?;
        let d = host.cpu_data().expect("to_cpu returns host storage");
        Ok((0..d.len()).map(|i| d.get_f32(i)).collect())
    }

    /// The values of an i32 tensor in row-major logical order.
    pub fn to_i32_vec(&self) -> Result<Vec<i32>> {
        if self.dtype != DType::I32 {
            return Err(Error::DType { arg: "tensor", got: self.dtype.to_string(), expected: "i32" });
        }
        match self.to_cpu()?.storage {
            Storage::Cpu(CpuData::I32(v)) => Ok(v),
            _ => unreachable!("to_cpu of an i32 tensor is i32 host storage"),
        }
    }

    /// Raw little-endian bytes in row-major logical order.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        if let Some(b) = self.host_bytes() {
            return Ok(b.to_vec());
        }
        Ok(self.to_cpu()?.cpu_data().expect("to_cpu returns host storage").to_bytes())
    }

    /// The raw little-endian bytes of a host tensor whose storage it covers in row-major order (contiguous,
    /// offset 0), borrowed; None for any other tensor (`to_bytes` copies those) and on big-endian targets.
    pub fn host_bytes(&self) -> Option<&[u8]> {
        let Storage::Cpu(d) = &self.storage else { return None };
        if cfg!(target_endian = "big") || self.offset != 0 || !self.is_contiguous() || d.len() != self.numel() {
            return None;
        }
        let (ptr, len) = match d {
            CpuData::F16(v) => (v.as_ptr() as *const u8, std::mem::size_of_val(v.as_slice())),
            CpuData::BF16(v) => (v.as_ptr() as *const u8, std::mem::size_of_val(v.as_slice())),
            CpuData::F32(v) => (v.as_ptr() as *const u8, std::mem::size_of_val(v.as_slice())),
            CpuData::I32(v) => (v.as_ptr() as *const u8, std::mem::size_of_val(v.as_slice())),
        };
        // Safety: plain-old-data elements (f16 / bf16 are transparent u16s) viewed as the bytes they occupy,
        // borrowed from `self`.
        Some(unsafe { std::slice::from_raw_parts(ptr, len) })
    }
}

impl Tensor {
    /// A contiguous tensor whose contents the caller overwrites entirely (zeros on the host).
    pub(crate) fn uninit(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        match device {
            Device::Cpu => Tensor::zeros(shape, dtype, device),
            Device::Cuda(ordinal) => {
                let n = numel(shape)?.checked_mul(dtype.size()).ok_or_else(|| Error::Data { msg: format!("shape {shape:?} overflows usize") })?;
                let buf = crate::cuda::DeviceBuffer::uninit(ordinal, n)?;
                Ok(Tensor { storage: Storage::Cuda(buf), dtype, shape: shape.to_vec(), strides: contiguous_strides(shape), offset: 0 })
            }
        }
    }

    /// Address of the view's first element (host or device).
    fn addr(&self) -> u64 {
        let base = match &self.storage {
            Storage::Cpu(d) => match d {
                CpuData::F16(v) => v.as_ptr() as u64,
                CpuData::BF16(v) => v.as_ptr() as u64,
                CpuData::F32(v) => v.as_ptr() as u64,
                CpuData::I32(v) => v.as_ptr() as u64,
            },
            Storage::Cuda(b) => b.ptr(),
        };
        base + (self.offset * self.dtype.size()) as u64
    }

    /// The tensor as the raw layer sees it, for reading.
    pub fn view(&self) -> View<'_> {
        View { addr: self.addr(), dtype: self.dtype, shape: &self.shape, strides: &self.strides }
    }

    /// The tensor as the raw layer sees it, for writing (the pointer comes from unique access).
    pub fn view_mut(&mut self) -> View<'_> {
        let base = match &mut self.storage {
            Storage::Cpu(d) => match d {
                CpuData::F16(v) => v.as_mut_ptr() as u64,
                CpuData::BF16(v) => v.as_mut_ptr() as u64,
                CpuData::F32(v) => v.as_mut_ptr() as u64,
                CpuData::I32(v) => v.as_mut_ptr() as u64,
            },
            Storage::Cuda(b) => b.ptr(),
        };
        View { addr: base + (self.offset * self.dtype.size()) as u64, dtype: self.dtype, shape: &self.shape, strides: &self.strides }
    }
}

impl Tensor {
    /// Copy `src` (same dtype and shape, any layout) into this host tensor's view, in place.
    pub fn copy_from(&mut self, src: &Tensor) -> Result<()> {
        if src.dtype != self.dtype || src.shape != self.shape {
            return Err(Error::Data { msg: format!("copy_from: {} {:?} into {} {:?}", src.dtype, src.shape, self.dtype, self.shape) });
        }
        let src = src.to_cpu()?;
        let dst_idx: Vec<usize> = self.storage_indices().collect();
        match (&mut self.storage, &src.storage) {
            (Storage::Cpu(CpuData::F16(d)), Storage::Cpu(CpuData::F16(s))) => dst_idx.iter().zip(s).for_each(|(&i, &x)| d[i] = x),
            (Storage::Cpu(CpuData::BF16(d)), Storage::Cpu(CpuData::BF16(s))) => dst_idx.iter().zip(s).for_each(|(&i, &x)| d[i] = x),
            (Storage::Cpu(CpuData::F32(d)), Storage::Cpu(CpuData::F32(s))) => dst_idx.iter().zip(s).for_each(|(&i, &x)| d[i] = x),
            (Storage::Cpu(CpuData::I32(d)), Storage::Cpu(CpuData::I32(s))) => dst_idx.iter().zip(s).for_each(|(&i, &x)| d[i] = x),
            _ => return Err(Error::Data { msg: "copy_from writes host tensors only".into() }),
        }
        Ok(())
    }
}
