//! [`GpuTensor`]: a device buffer with a row-major shape.

use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, PinnedHostSlice, ValidAsZeroBits};

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

/// A host buffer that downloads land in, kept from one download to the next: page-locked
/// (the copy runs at the bus's rate, and nothing is allocated or faulted in again per step)
/// where the driver grants it, an ordinary `Vec` otherwise. A batched step's logits are
/// `[sequences, vocab]` (78 MB at 128 sequences of a 151,936-token vocabulary): a fresh
/// pageable `Vec` per step costs more host time than the step's kernels.
pub struct HostStage<T> {
    pinned: Option<PinnedHostSlice<T>>,
    fallback: Vec<T>,
}

impl<T> Default for HostStage<T> {
    fn default() -> Self {
        HostStage {
            pinned: None,
            fallback: Vec::new(),
        }
    }
}

impl<T> std::fmt::Debug for HostStage<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostStage")
            .field("pinned", &self.pinned.as_ref().map_or(0, |p| p.len()))
            .field("fallback", &self.fallback.len())
            .finish()
    }
}

impl<T: DeviceRepr + ValidAsZeroBits + Clone + Default> HostStage<T> {
    /// An empty stage (nothing is allocated until the first download).
    pub fn new() -> Self {
        Self::default()
    }

    /// Downloads all of `t` (waits for queued work) and returns it, borrowed from the stage
    /// until the next download.
    pub fn download(&mut self, t: &GpuTensor<T>) -> Result<&[T]> {
        let n = t.len();
        let stream = t.data.stream().clone();
        if self.pinned.as_ref().is_none_or(|p| p.len() < n) && self.fallback.len() < n {
            self.pinned = None;
            // Page-locked with no flags: write-combined memory reads slowly on the host.
            // SAFETY: the stage never hands out elements a download has not written.
            let grown = n + n / 4;
            self.pinned = unsafe { stream.context().alloc_pinned_with_flags::<T>(grown, 0) }.ok();
            if self.pinned.is_none() {
                self.fallback.resize(grown, T::default());
            }
        }
        let dst: &mut [T] = match &mut self.pinned {
            Some(p) if p.len() >= n => &mut p.as_mut_slice()?[..n],
            _ => &mut self.fallback[..n],
        };
        {
            // The raw copy below needs the context current on this thread, as cudarc's own
            // copies make it.
            stream.context().bind_to_thread()?;
            let (src, _read) = t.data.device_ptr(&stream);
            // SAFETY: `dst` holds exactly `n` elements and `src` is the tensor's `n`; the
            // stream is synchronized below before `dst` is read or dropped.
            unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, src, stream.cu_stream()) }?;
        }
        stream.synchronize()?;
        self.last(n)
    }

    /// The first `n` elements of the stage (those of the last download, if it held `n`).
    pub fn last(&self, n: usize) -> Result<&[T]> {
        let held = match &self.pinned {
            Some(p) if p.len() >= n => p.as_slice()?,
            _ => &self.fallback[..],
        };
        held.get(..n).ok_or_else(|| {
            Error::invalid(
                "HostStage::last",
                format!("{n} elements asked of a stage holding {}", held.len()),
            )
        })
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
