//! The one way a bitexact kernel is launched: [`Device::launch_builder`] and [`Launch`].
//!
//! Every launch goes through `cuLaunchKernelEx`. On devices of compute capability 9.0 and up
//! a launch may allow *programmatic dependent launch* (`CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_
//! SERIALIZATION`): the driver may then start a kernel's blocks while the kernel before it on
//! the stream is still finishing, and the blocks wait in `bx_grid_begin()` (`cuda/common.cuh`,
//! the first statement of every kernel, checked by a unit test on the PTX:
//! `griddepcontrol.wait`, which returns once the previous kernel has completed and its writes
//! are visible) before they read or write anything. It is scheduling only: every kernel still
//! runs after the one before it has finished, so no output bit can depend on it.
//!
//! It is off by default: measured on the H200 (decode of the 30B preset, graphs on) it was no
//! faster (4.37 against 4.34 ms a token at context 512, 5.44 against 5.30 at 8192: the waiting
//! blocks hold SM slots and gain nothing while no kernel does work before its wait). It is
//! kept for kernels that will (a matrix product may fetch its weights, which no earlier kernel
//! writes, before it waits). `BITEXACT_PDL=1` or `Device::set_launch_overlap(true)` turns it
//! on; the oracle's speed report times both.

use std::ffi::c_void;
use std::marker::PhantomData;

use cudarc::driver::sys;
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
    DriverError, LaunchConfig,
};

use crate::device::Device;

/// A kernel argument as the launch passes it: a device address, or a host value the driver
/// copies at launch.
pub(crate) enum Param<'a> {
    Addr(sys::CUdeviceptr),
    Value(*const c_void, PhantomData<&'a ()>),
}

/// What [`Launch::arg`] takes: device buffers (by address) and plain scalars (by value).
pub(crate) trait KernelParam<'a> {
    fn param(self, stream: &CudaStream) -> Param<'a>;
}

macro_rules! scalar_params {
    ($($t:ty),*) => {$(
        impl<'a> KernelParam<'a> for &'a $t {
            fn param(self, _: &CudaStream) -> Param<'a> {
                Param::Value((self as *const $t).cast(), PhantomData)
            }
        }
    )*};
}
scalar_params!(u8, i8, u16, i16, u32, i32, u64, i64, f32, f64);

// The device-pointer accessors record events only when the context tracks them, which
// `Device::new` turns off (one stream), so the guards they return are dropped at once.
impl<'a, T> KernelParam<'a> for &'a CudaSlice<T> {
    fn param(self, stream: &CudaStream) -> Param<'a> {
        Param::Addr(self.device_ptr(stream).0)
    }
}
impl<'a, T> KernelParam<'a> for &'a mut CudaSlice<T> {
    fn param(self, stream: &CudaStream) -> Param<'a> {
        Param::Addr(self.device_ptr_mut(stream).0)
    }
}
impl<'a, 'b, T> KernelParam<'a> for &'a CudaView<'b, T> {
    fn param(self, stream: &CudaStream) -> Param<'a> {
        Param::Addr(self.device_ptr(stream).0)
    }
}
impl<'a, 'b, T> KernelParam<'a> for &'a mut CudaViewMut<'b, T> {
    fn param(self, stream: &CudaStream) -> Param<'a> {
        Param::Addr(self.device_ptr_mut(stream).0)
    }
}

/// A device buffer a kernel reads (`const T*`), by address, borrowed for the launch; or null
/// (an optional buffer the kernel does not read).
#[derive(Clone, Copy)]
pub(crate) struct In<'a, T> {
    addr: sys::CUdeviceptr,
    _borrow: PhantomData<&'a T>,
}

impl<'a, T> In<'a, T> {
    /// `buf` (a slice or a view of one) on `dev`'s stream.
    pub(crate) fn of(dev: &Device, buf: &'a impl DevicePtr<T>) -> Self {
        In {
            addr: buf.device_ptr(dev.stream()).0,
            _borrow: PhantomData,
        }
    }

    /// The null pointer.
    pub(crate) fn null() -> Self {
        In {
            addr: 0,
            _borrow: PhantomData,
        }
    }

    /// `buf`'s elements (of any type `U`) read as `T`s (an F32 matrix kept as raw bytes): the
    /// caller states that they hold `T`s at `T`'s alignment.
    pub(crate) fn of_cast<U>(dev: &Device, buf: &'a impl DevicePtr<U>) -> Self {
        In {
            addr: buf.device_ptr(dev.stream()).0,
            _borrow: PhantomData,
        }
    }
}

/// A device buffer a kernel writes (`T*`), by address, borrowed mutably for the launch.
pub(crate) struct Out<'a, T> {
    addr: sys::CUdeviceptr,
    _borrow: PhantomData<&'a mut T>,
}

impl<'a, T> Out<'a, T> {
    /// `buf` on `dev`'s stream.
    pub(crate) fn of(dev: &Device, buf: &'a mut impl DevicePtrMut<T>) -> Self {
        Out {
            addr: buf.device_ptr_mut(dev.stream()).0,
            _borrow: PhantomData,
        }
    }

    /// The null pointer (an optional output the kernel does not write).
    pub(crate) fn null() -> Self {
        Out {
            addr: 0,
            _borrow: PhantomData,
        }
    }
}

impl<'a, T> KernelParam<'a> for &'a In<'_, T> {
    fn param(self, _: &CudaStream) -> Param<'a> {
        Param::Value((&self.addr as *const sys::CUdeviceptr).cast(), PhantomData)
    }
}
impl<'a, T> KernelParam<'a> for &'a Out<'_, T> {
    fn param(self, _: &CudaStream) -> Param<'a> {
        Param::Value((&self.addr as *const sys::CUdeviceptr).cast(), PhantomData)
    }
}

/// A kernel's whole parameter list as one value (the structs of [`args`]).
pub(crate) trait KernelArgs<'a> {
    fn push(self, launch: &mut Launch<'a>);
}

/// The typed parameter list of every kernel, generated by `build.rs` from the CUDA sources:
/// `args::<family>::<Name>Args`, one struct per list (`build.rs`'s table names them), its fields
/// the kernel's parameters in order ([`In`], [`Out`] or scalars), pushed in that order by
/// [`Launch::args`]. A kernel's parameters are declared once, in its `.cu` file.
pub(crate) mod args {
    include!(concat!(env!("OUT_DIR"), "/kernel_args.rs"));
}

/// A launch being assembled: the kernel, then its arguments in order, then
/// [`Launch::launch`].
pub(crate) struct Launch<'a> {
    dev: &'a Device,
    func: &'a CudaFunction,
    params: Vec<Param<'a>>,
}

impl Device {
    /// Starts a launch of `func` on this device's stream.
    pub(crate) fn launch_builder<'a>(&'a self, func: &'a CudaFunction) -> Launch<'a> {
        Launch {
            dev: self,
            func,
            params: Vec::with_capacity(24),
        }
    }
}

impl<'a> Launch<'a> {
    /// Appends the next kernel argument.
    pub(crate) fn arg(&mut self, p: impl KernelParam<'a>) -> &mut Self {
        let p = p.param(self.dev.stream());
        self.params.push(p);
        self
    }

    /// Appends a kernel's whole parameter list (a struct of [`args`]).
    pub(crate) fn args(&mut self, a: impl KernelArgs<'a>) -> &mut Self {
        a.push(self);
        self
    }

    /// Queues the kernel with `cfg`.
    ///
    /// # Safety
    /// The arguments must be the kernel's parameters, in order and of their types, and the
    /// kernel must stay inside the buffers it is given for `cfg`'s grid: the caller's
    /// `// SAFETY:` line says why it does.
    pub(crate) unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), DriverError> {
        // Device addresses live here until the call returns; scalars are borrowed for 'a.
        let addrs: Vec<sys::CUdeviceptr> = self
            .params
            .iter()
            .map(|p| match p {
                Param::Addr(a) => *a,
                Param::Value(..) => 0,
            })
            .collect();
        let mut ptrs: Vec<*mut c_void> = self
            .params
            .iter()
            .zip(&addrs)
            .map(|(p, a)| match p {
                Param::Addr(_) => (a as *const sys::CUdeviceptr).cast_mut().cast(),
                Param::Value(v, _) => v.cast_mut(),
            })
            .collect();
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            // SAFETY: a zeroed union is a valid value of every member (plain integers).
            value: unsafe { std::mem::zeroed() },
        };
        attr.value.programmaticStreamSerializationAllowed = 1;
        let pdl = self.dev.launch_overlap();
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.dev.stream().cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(pdl),
        };
        self.dev.context().bind_to_thread()?;
        // SAFETY: `config` and its one attribute outlive the call; `ptrs` holds one pointer per
        // kernel parameter, each to a live value of the parameter's type (the caller's
        // contract above).
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                self.func.cu_function(),
                ptrs.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
    }
}
