//! Kernel launches through `cuLaunchKernelEx`, so that on sm_90+ each launch may carry the
//! programmatic-dependent-launch (PDL) attribute: the next kernel's blocks are scheduled while the
//! previous kernel finishes, and each kernel waits (`pdl_wait()` in kernels/common.cuh) before it
//! touches anything an earlier kernel wrote. A decode step is ~200 short kernels, so overlapping
//! their launch latency and letting the matrix kernels start streaming weights early is worth a
//! sizeable share of the step. Inside CUDA-graph capture the attribute becomes a programmatic
//! edge. `THINKSTEER_PDL=0` turns it off (for A/B timing).
//!
//! The builder mirrors cudarc's `launch_builder`: `Launch::new(gpu, f).arg(..)...launch(cfg)`.
//! Each argument is stored in its own 8-byte slot (device pointers, or a 4-byte int/float in the
//! low half): the driver copies exactly the parameter's size from each slot.

use super::{Gpu, LaunchKind};
use cudarc::driver::sys;
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, CudaViewMut, DevicePtr, DriverError, LaunchConfig,
};
use std::ffi::c_void;

/// A value passed to a kernel parameter.
pub(crate) trait Arg {
    fn slot(&self, gpu: &Gpu) -> u64;
}

impl<T> Arg for CudaSlice<T> {
    fn slot(&self, gpu: &Gpu) -> u64 {
        self.device_ptr(&gpu.stream).0
    }
}

impl<T> Arg for CudaView<'_, T> {
    fn slot(&self, gpu: &Gpu) -> u64 {
        self.device_ptr(&gpu.stream).0
    }
}

impl<T> Arg for CudaViewMut<'_, T> {
    fn slot(&self, gpu: &Gpu) -> u64 {
        self.device_ptr(&gpu.stream).0
    }
}

impl Arg for i32 {
    fn slot(&self, _: &Gpu) -> u64 {
        *self as u32 as u64
    }
}

impl Arg for u32 {
    fn slot(&self, _: &Gpu) -> u64 {
        *self as u64
    }
}

impl Arg for f32 {
    fn slot(&self, _: &Gpu) -> u64 {
        self.to_bits() as u64
    }
}

/// A raw device address (0 for an absent optional pointer).
impl Arg for u64 {
    fn slot(&self, _: &Gpu) -> u64 {
        *self
    }
}

/// An optional pointer: the address, or 0 (null) when absent.
impl<A: Arg> Arg for Option<&A> {
    fn slot(&self, gpu: &Gpu) -> u64 {
        self.map_or(0, |a| a.slot(gpu))
    }
}

pub(crate) struct Launch<'a> {
    gpu: &'a Gpu,
    func: &'a CudaFunction,
    slots: Vec<u64>,
    tag: u32,
}

impl<'a> Launch<'a> {
    pub fn new(gpu: &'a Gpu, func: &'a CudaFunction) -> Self {
        Launch {
            gpu,
            func,
            slots: Vec::with_capacity(24),
            tag: 0,
        }
    }

    /// Tells launches of one kernel and grid apart in `bench --marginal` (a product's K: the o
    /// and down products share kernel and grid).
    pub fn tag(&mut self, tag: usize) -> &mut Self {
        self.tag = tag as u32;
        self
    }

    pub fn arg<A: Arg + ?Sized>(&mut self, a: &A) -> &mut Self {
        self.slots.push(a.slot(self.gpu));
        self
    }

    /// Launches on the GPU's stream.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameter list in number, order and type, and every
    /// buffer must be large enough for what the kernel reads and writes at this launch shape.
    pub unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), DriverError> {
        let kind = LaunchKind {
            func: self.func.cu_function() as usize,
            grid: cfg.grid_dim,
            tag: self.tag,
        };
        if !self.gpu.ablation.admits(kind) {
            return Ok(()); // left out (`bench --marginal`)
        }
        self.gpu.ctx.bind_to_thread()?;
        let mut params: Vec<*mut c_void> = self
            .slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        // SAFETY: an all-zero attribute value is valid (it is a plain C union of integers).
        let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
        value.programmaticStreamSerializationAllowed = 1;
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.gpu.stream.cu_stream(),
            attrs: if self.gpu.pdl {
                &mut attr
            } else {
                std::ptr::null_mut()
            },
            numAttrs: self.gpu.pdl as u32,
        };
        // SAFETY: `params` points at one live slot per kernel parameter (the caller guarantees
        // they match the kernel), `config` and `attr` outlive the call, and the stream and
        // function belong to the context bound above.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                self.func.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
    }
}
