//! [`GpuTensor`]: a device buffer with a row-major shape.

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use crate::device::Device;
use crate::error::{Error, Result};

/// A dense, row-major tensor in device memory: `dims = [d0, d1, ..]`, element
/// `[i0, i1, ..]` at offset `((i0 * d1 + i1) * d2 + ..)`.
///
/// The shape is checked by every operation that takes the tensor; the buffer is owned, so an
/// operation that writes it has exclusive access.
pub struct GpuTensor<T> {
    data: CudaSlice<T>,
    dims: Vec<usize>,
}

impl<T> std::fmt::Debug for GpuTensor<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuTensor")
            .field("dims", &self.dims)
            .finish_non_exhaustive()
    }
}

fn numel(op: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::invalid(op, format!("shape {dims:?} overflows usize")))
}

impl<T: DeviceRepr + ValidAsZeroBits + Clone + Default> GpuTensor<T> {
    /// A zero-filled tensor of shape `dims`.
    pub fn zeros(dev: &Device, dims: &[usize]) -> Result<Self> {
        let n = numel("GpuTensor::zeros", dims)?;
        let bytes = n.saturating_mul(std::mem::size_of::<T>());
        dev.alloc_gate(bytes, "GpuTensor::zeros")?;
        let data = dev
            .stream()
            .alloc_zeros::<T>(n)
            .map_err(|e| Error::from_alloc(e, bytes, "GpuTensor::zeros"))?;
        Ok(GpuTensor {
            data,
            dims: dims.to_vec(),
        })
    }

    /// A tensor of shape `dims` whose contents are unspecified until written.
    ///
    /// # Safety
    /// The caller must write every element before it is read (a kernel that overwrites the
    /// whole tensor).
    pub(crate) unsafe fn uninit(dev: &Device, dims: &[usize]) -> Result<Self> {
        let n = numel("GpuTensor::uninit", dims)?;
        let bytes = n.saturating_mul(std::mem::size_of::<T>());
        dev.alloc_gate(bytes, "GpuTensor::uninit")?;
        // SAFETY: the caller writes every element before reading it.
        let data = unsafe { dev.stream().alloc::<T>(n) }
            .map_err(|e| Error::from_alloc(e, bytes, "GpuTensor::uninit"))?;
        Ok(GpuTensor {
            data,
            dims: dims.to_vec(),
        })
    }

    /// An output buffer for a kernel that writes every element: [`GpuTensor::uninit`] in
    /// release builds (no memset on the hot paths of the model), zero-filled in debug builds.
    /// The per-kernel parity tests poison their outputs themselves.
    pub(crate) fn output(dev: &Device, dims: &[usize]) -> Result<Self> {
        if cfg!(debug_assertions) {
            return Self::zeros(dev, dims);
        }
        // SAFETY: by this function's contract the tensor goes to a kernel that writes all of
        // it before anything reads it.
        unsafe { Self::uninit(dev, dims) }
    }

    /// Uploads `host` (row-major, `dims.product()` elements).
    pub fn from_host(dev: &Device, host: &[T], dims: &[usize]) -> Result<Self> {
        let n = numel("GpuTensor::from_host", dims)?;
        if n != host.len() {
            return Err(Error::invalid(
                "GpuTensor::from_host",
                format!("shape {dims:?} holds {n} elements, data has {}", host.len()),
            ));
        }
        let bytes = std::mem::size_of_val(host);
        dev.alloc_gate(bytes, "GpuTensor::from_host")?;
        let data = dev
            .stream()
            .clone_htod(host)
            .map_err(|e| Error::from_alloc(e, bytes, "GpuTensor::from_host"))?;
        Ok(GpuTensor {
            data,
            dims: dims.to_vec(),
        })
    }

    /// Overwrites the whole tensor with `host` (same element count).
    pub fn copy_from_host(&mut self, host: &[T]) -> Result<()> {
        if host.len() != self.len() {
            return Err(Error::invalid(
                "GpuTensor::copy_from_host",
                format!(
                    "tensor has {} elements, data has {}",
                    self.len(),
                    host.len()
                ),
            ));
        }
        let stream = self.data.stream().clone();
        stream.memcpy_htod(host, &mut self.data)?;
        Ok(())
    }

    /// Downloads the tensor (waits for queued work).
    pub fn to_host(&self) -> Result<Vec<T>> {
        Ok(self.data.stream().clone_dtoh(&self.data)?)
    }
}

impl<T> GpuTensor<T> {
    /// The shape.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when the tensor holds no element.
    pub fn is_empty(&self) -> bool {
        self.data.len() == 0
    }

    /// Size in bytes.
    pub fn num_bytes(&self) -> usize {
        self.data.num_bytes()
    }

    /// Changes the shape; the element count must stay the same.
    pub fn reshape(&mut self, dims: &[usize]) -> Result<()> {
        let n = numel("GpuTensor::reshape", dims)?;
        if n != self.data.len() {
            return Err(Error::shape("GpuTensor::reshape", "dims", &self.dims, dims));
        }
        self.dims = dims.to_vec();
        Ok(())
    }

    /// The underlying cudarc buffer.
    pub fn slice(&self) -> &CudaSlice<T> {
        &self.data
    }

    /// The underlying cudarc buffer, mutably.
    pub fn slice_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.data
    }
}
