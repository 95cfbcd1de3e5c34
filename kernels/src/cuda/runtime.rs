//! A CUDA device's kernels: its context (the primary one, shared with
//! libtorch), the modules compiled for its architecture (loaded on first
//! use), and launches on libtorch's stream.
//!
//! libtorch enqueues its work on the device's default (null) stream unless a
//! caller sets another, and the worker never does: kernels launched there
//! are ordered with libtorch's ops without a synchronisation, and a tensor
//! freed by libtorch after a launch is reused only by later work on the same
//! stream.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
};
use tch::Device;

use crate::cuda::compile::{compile, default_cache_dir};
use crate::cuda::Module;
use crate::{KernelError, Result};

/// One kernel parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

/// A checked kernel launch: what a wrapper's validation produces.
#[derive(Debug, Clone)]
pub struct Launch {
    pub op: &'static str,
    pub module: Module,
    pub function: String,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub args: Vec<Arg>,
    /// Every tensor the kernel reads or writes, with its device.
    pub tensors: Vec<(&'static str, Device)>,
}

impl Launch {
    /// Every tensor is on `device`.
    pub fn check_device(&self, device: Device) -> Result<()> {
        for &(arg, found) in &self.tensors {
            if found != device {
                return Err(KernelError::WrongDevice {
                    op: self.op,
                    arg,
                    found: device_name(found),
                    expected: device_name(device),
                });
            }
        }
        Ok(())
    }
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn driver(during: impl Into<String>) -> impl FnOnce(cudarc::driver::DriverError) -> KernelError {
    let during = during.into();
    move |e| KernelError::Driver {
        during,
        error: e.to_string(),
    }
}

/// Loads libtorch's CUDA backend. Nothing in a Rust binary references a
/// symbol of `libtorch_cuda.so`, so the linker drops it and libtorch reports
/// no GPU; opening it with `RTLD_GLOBAL` registers the backend. Found
/// through the binary's run path (the venv's `torch/lib`) or
/// `LD_LIBRARY_PATH`. Idempotent.
pub fn load_torch_cuda() -> std::result::Result<(), String> {
    static LOADED: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            let name = c"libtorch_cuda.so";
            // SAFETY: dlopen with a valid C string; the handle is kept for
            // the life of the process on purpose.
            let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if !handle.is_null() {
                return Ok(());
            }
            // SAFETY: dlerror returns a thread-local C string or null.
            let err = unsafe { libc::dlerror() };
            Err(if err.is_null() {
                "unknown error".to_string()
            } else {
                // SAFETY: non-null, NUL-terminated, valid until the next dl call.
                unsafe { std::ffi::CStr::from_ptr(err) }
                    .to_string_lossy()
                    .into_owned()
            })
        })
        .clone()
}

/// Whether the CUDA driver is present and sees at least one device (never
/// panics where libcuda is absent).
pub fn cuda_available() -> bool {
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return false;
    }
    matches!(CudaContext::device_count(), Ok(n) if n > 0)
}

/// The primary context of `cuda:ordinal`, checking first that the driver
/// is installed (cudarc panics where it is absent) and sees that device.
fn open_device(ordinal: usize) -> Result<Arc<CudaContext>> {
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(KernelError::Unavailable(
            "libcuda (the NVIDIA driver) is not installed".into(),
        ));
    }
    let count = CudaContext::device_count().map_err(driver("counting devices"))?;
    if ordinal >= count.max(0) as usize {
        return Err(KernelError::Unavailable(format!(
            "cuda:{ordinal} asked for, the driver sees {count} device(s)"
        )));
    }
    CudaContext::new(ordinal).map_err(driver(format!("opening cuda:{ordinal}")))
}

/// `(total, free)` bytes of memory of CUDA device `ordinal`, as the driver
/// reports them (`cuMemGetInfo` on the device's primary context, the one
/// libtorch uses).
pub fn device_memory(ordinal: usize) -> Result<(u64, u64)> {
    let ctx = open_device(ordinal)?;
    let (free, total) = ctx
        .mem_get_info()
        .map_err(driver(format!("memory of cuda:{ordinal}")))?;
    Ok((total as u64, free as u64))
}

/// The kernels of one CUDA device.
pub struct Kernels {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    ordinal: usize,
    arch: String,
    cache: PathBuf,
    modules: Mutex<HashMap<Module, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

impl Kernels {
    /// The kernels of `cuda:ordinal`, PTX cached in the default directory.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_cache(ordinal, default_cache_dir())
    }

    pub fn with_cache(ordinal: usize, cache: PathBuf) -> Result<Self> {
        let ctx = open_device(ordinal)?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver("reading the compute capability"))?;
        let stream = ctx.default_stream();
        Ok(Kernels {
            ctx,
            stream,
            ordinal,
            arch: format!("sm_{major}{minor}"),
            cache,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        })
    }

    /// The GPU architecture the kernels are compiled for, e.g. `sm_90`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    pub fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    /// Compiles (or reads from the cache) and loads every module now rather
    /// than on first use.
    pub fn preload(&self) -> Result<()> {
        for m in Module::ALL {
            self.module(m)?;
        }
        Ok(())
    }

    fn module(&self, module: Module) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().expect("kernel modules");
        if let Some(m) = modules.get(&module) {
            return Ok(m.clone());
        }
        let compiled = compile(module, &self.arch, &self.cache)?;
        let loaded = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(compiled.ptx))
            .map_err(driver(format!("loading {}", module.name())))?;
        modules.insert(module, loaded.clone());
        Ok(loaded)
    }

    fn function(&self, module: Module, name: &str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().expect("kernel functions").get(name) {
            return Ok(f.clone());
        }
        let f = self
            .module(module)?
            .load_function(name)
            .map_err(driver(format!("finding {name}")))?;
        self.functions
            .lock()
            .expect("kernel functions")
            .insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// Runs a checked launch on libtorch's stream (asynchronously, like a
    /// libtorch op).
    pub fn launch(&self, launch: &Launch) -> Result<()> {
        launch.check_device(self.device())?;
        let f = self.function(launch.module, &launch.function)?;
        let mut builder = self.stream.launch_builder(&f);
        for a in &launch.args {
            match a {
                Arg::Ptr(p) => builder.arg(p),
                Arg::I32(v) => builder.arg(v),
                Arg::I64(v) => builder.arg(v),
                Arg::F32(v) => builder.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: launch.grid,
            block_dim: launch.block,
            shared_mem_bytes: 0,
        };
        // SAFETY: the wrapper checked every tensor's dtype, shape, strides
        // and device against the kernel's parameters; the tensors outlive
        // the enqueue and their memory is reused only by later work on this
        // (libtorch's) stream.
        unsafe { builder.launch(cfg) }.map_err(driver(format!("launching {}", launch.function)))?;
        Ok(())
    }

    /// Waits for the device (tests and benchmarks).
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver("synchronizing"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_gpu_kernels_are_an_error_not_a_panic() {
        if cuda_available() {
            eprintln!("a GPU is present: nothing to check here");
            return;
        }
        let err = Kernels::new(0).err().expect("no GPU, no kernels");
        assert!(matches!(err, KernelError::Unavailable(_)), "{err}");
    }

    #[test]
    fn a_launch_names_a_tensor_on_the_wrong_device() {
        let launch = Launch {
            op: "rms_norm",
            module: Module::RmsNorm,
            function: "rms_norm_bf16".into(),
            grid: (1, 1, 1),
            block: (32, 1, 1),
            args: vec![],
            tensors: vec![("x", Device::Cuda(0)), ("weight", Device::Cpu)],
        };
        let err = launch
            .check_device(Device::Cuda(0))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "rms_norm: weight is on cpu, the kernels run on cuda:0");
        let err = launch
            .check_device(Device::Cuda(1))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x is on cuda:0") && err.contains("cuda:1"),
            "{err}"
        );
    }
}
