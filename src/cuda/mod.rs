//! The CUDA backend's device handle: `Gpu` (context, the one stream every kernel runs on, and the
//! loaded kernel functions) and `available()`, which says why CUDA cannot be used before anything
//! touches cudarc (cudarc panics when a dynamic library is missing; we return `Error::Cuda`).
//!
//! Kernels come from `sources`: nvcc-built PTX or NVRTC-built cubins embedded by build.rs, else
//! the embedded `.cu` sources compiled once with NVRTC for the device's compute capability.
//! `THINKSTEER_CUDA_SYNC=1` synchronises after every launch so an error names its kernel.

pub mod blaslt;
pub mod frozen;
mod grad_kernels;
pub mod hybrid;
mod hybrid_kernels;
pub mod kernels;
mod launch;
pub mod model;
pub mod sources;
pub mod vector_grad;

use crate::{Error, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream};
use std::collections::HashMap;
use std::sync::Arc;

/// Why CUDA cannot be used here, or Ok.
pub fn available() -> std::result::Result<(), String> {
    // SAFETY: only tries to dlopen the driver library names and closes them again.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(
            "no CUDA driver found (libcuda.so.1): this machine has no NVIDIA driver, or it is not \
                    on the library path"
                .into(),
        );
    }
    match CudaContext::device_count() {
        Ok(0) => return Err("the CUDA driver reports no devices".into()),
        Ok(_) => {}
        Err(e) => return Err(format!("the CUDA driver failed to initialise: {e}")),
    }
    let cc = device0_cc();
    if !cc.is_some_and(sources::embedded_for)
        && !sources::cache_dir()
            .zip(cc)
            .is_some_and(|(d, cc)| sources::cache_complete(&d, cc))
    {
        sources::nvrtc_available()?;
    }
    Ok(())
}

/// The CUDA devices this process sees (after CUDA_VISIBLE_DEVICES).
pub fn device_count() -> Result<usize> {
    available().map_err(Error::Cuda)?;
    CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .map_err(cuda_err("counting the CUDA devices"))
}

/// Device 0's compute capability ×10 (e.g. 90), read without creating a context.
fn device0_cc() -> Option<u32> {
    use cudarc::driver::{result::device, sys::CUdevice_attribute as A};
    let dev = device::get(0).ok()?;
    // SAFETY: `dev` is a device handle the driver just returned; the attributes are plain ints.
    let major =
        unsafe { device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR) };
    // SAFETY: as above.
    let minor =
        unsafe { device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR) };
    Some((major.ok()? * 10 + minor.ok()?) as u32)
}

/// Loadable code of one kernel module.
enum ModuleCode {
    /// Built by nvcc at build time.
    Ptx(&'static str),
    /// From this process, the kernel cache or NVRTC.
    Cubin(Arc<Vec<u8>>, sources::Origin),
}

/// The cubins this process has loaded, by (module, compute capability): every later `Gpu` of
/// the process takes them from here.
type Cubins = std::sync::Mutex<HashMap<(&'static str, u32), Arc<Vec<u8>>>>;
fn cubins() -> &'static Cubins {
    static CUBINS: std::sync::OnceLock<Cubins> = std::sync::OnceLock::new();
    CUBINS.get_or_init(Default::default)
}

/// The code of `kernels/<stem>.cu` for compute capability `cc`: nvcc's PTX when embedded, else
/// the cubin this process loaded before, else the kernel cache's, else NVRTC's (then cached).
fn module_code(stem: &'static str, cc: u32) -> Result<ModuleCode> {
    if let Some(p) = sources::embedded_ptx(stem, cc) {
        return Ok(ModuleCode::Ptx(p));
    }
    if let Some(b) = sources::embedded_cubin(stem, cc) {
        return Ok(ModuleCode::Cubin(
            Arc::new(b.to_vec()),
            sources::Origin::Embedded,
        ));
    }
    if let Some(b) = cubins()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&(stem, cc))
    {
        // Loaded by an earlier `Gpu` of the process: the driver took it, as if freshly compiled.
        return Ok(ModuleCode::Cubin(b.clone(), sources::Origin::Compiled));
    }
    let (bin, origin) =
        sources::cubin(stem, cc, sources::cache_dir().as_deref()).map_err(Error::Cuda)?;
    Ok(ModuleCode::Cubin(Arc::new(bin), origin))
}

/// Maps a driver error to ours, saying what was being done.
pub(crate) fn cuda_err(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    /// Every kernel and copy of this handle runs on this one stream (so CUDA-graph capture sees
    /// all of it); a `sibling` has its own.
    pub stream: Arc<CudaStream>,
    /// (major, minor), e.g. (9, 0) on an H100.
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors (132 on an H100 SXM): sizes split-K grids.
    pub sms: usize,
    funcs: HashMap<&'static str, CudaFunction>,
    sync_each: bool,
    /// Launch with programmatic dependent launch (sm_90+, unless THINKSTEER_PDL=0).
    pub(crate) pdl: bool,
    /// Whether gemm_wgmma.cu's warpgroup products can run: compute capability 9.0 and a cubin
    /// NVRTC built for sm_90a (elsewhere they trap, and `GemmTile` falls back).
    pub(crate) wgmma: bool,
    /// Device scratch shared by the kernels that finish a reduction in their last block.
    pub(crate) scratch: Scratch,
    /// Per-kernel wall time while enabled (`set_profile`); None: launches are not timed.
    profile: std::sync::Mutex<Option<Profile>>,
    /// Whether `profile` is Some, read without the lock by every launch.
    profiling: std::sync::atomic::AtomicBool,
    /// cuBLASLt, made at its first use (THINKSTEER_GEMM=lt), or why it could not be.
    blaslt: std::sync::OnceLock<std::result::Result<blaslt::BlasLt, String>>,
    /// `bench --marginal`: launches to record and a kind of launch to leave out.
    pub(crate) ablation: Ablation,
}

/// A kind of launch: one kernel at one grid shape and tag (e.g. the down product of every
/// block: the products are tagged with their K).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LaunchKind {
    func: usize,
    pub grid: (u32, u32, u32),
    pub tag: u32,
}

/// For measuring what each kind of launch costs inside a replayed step (`bench --marginal`):
/// while `recording`, launches are listed; a launch of the `left_out` kind is not made at all (its
/// outputs keep their old values: timings only). `active` is read without the locks by every
/// launch.
#[derive(Default)]
pub(crate) struct Ablation {
    active: std::sync::atomic::AtomicBool,
    left_out: std::sync::Mutex<Option<LaunchKind>>,
    recorded: std::sync::Mutex<Option<Vec<LaunchKind>>>,
}

impl Ablation {
    /// Whether a launch of `kind` is to be made (and notes it while recording).
    pub(crate) fn admits(&self, kind: LaunchKind) -> bool {
        if !self.active.load(std::sync::atomic::Ordering::Relaxed) {
            return true;
        }
        if let Some(list) = self
            .recorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            list.push(kind);
        }
        *self.left_out.lock().unwrap_or_else(|e| e.into_inner()) != Some(kind)
    }

    fn update(&self) {
        let on = self.left_out.lock().is_ok_and(|g| g.is_some())
            || self.recorded.lock().is_ok_and(|g| g.is_some());
        self.active.store(on, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Wall time per kernel name: each launch is followed by a stream synchronisation and charged
/// the time since the previous one, so host work and copies just before a launch count to it.
struct Profile {
    last: std::time::Instant,
    by_kernel: std::collections::BTreeMap<String, (usize, f64)>,
}

/// Entries of `Scratch::counters`: one per (row, head) of decode attention, or per argmax row
/// (1 MB: a steering window's run of 8,192 rows at 32 heads).
pub(crate) const SCRATCH_COUNTERS: usize = 1 << 18;
/// Entries of the argmax partial buffers: rows × blocks per row.
pub(crate) const SCRATCH_PARTIALS: usize = 1 << 18;
/// Floats of split-K partial sums of `gemm` (32 MB): e.g. 16 splits of a 64-row × 8192 output,
/// or 8 of the hybrid step's 640 candidate rows × 1536.
pub(crate) const SCRATCH_GEMM_PART: usize = 1 << 23;

/// Completion counters (all zero between launches: the kernel that uses them leaves them zero)
/// and per-block partial results, one set per `Gpu` handle. A handle's launches are all on its
/// stream, so launches never share them at the same time.
pub(crate) struct Scratch {
    pub counters: CudaSlice<u32>,
    pub arg_v: CudaSlice<f32>,
    pub arg_i: CudaSlice<i32>,
    pub gemm_part: CudaSlice<f32>,
}

impl Gpu {
    /// Opens device `ordinal` and loads every kernel (compiling them with NVRTC when build.rs
    /// embedded no PTX: ~1–3 s once).
    pub fn new(ordinal: usize) -> Result<Gpu> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::Input(format!(
                "CUDA device {ordinal}: expected an ordinal below {count}, the number of devices this process sees (CUDA_VISIBLE_DEVICES)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("opening the CUDA device"))?;
        // One stream for everything: cudarc's per-buffer event tracking only serves multi-stream
        // use, and its event waits get in the way of CUDA-graph capture.
        // SAFETY: no CudaSlice exists yet, and this crate issues all work on `stream`.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(cuda_err("creating a stream"))?;
        let cc = ctx
            .compute_capability()
            .map_err(cuda_err("reading the compute capability"))?;
        let cc10 = (cc.0 * 10 + cc.1) as u32;
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(cuda_err("reading the multiprocessor count"))?
            .max(1) as usize;
        if cc10 < 80 {
            return Err(Error::Cuda(format!(
                "device {ordinal} has compute capability {}.{}; the kernels need 8.0 or newer (bf16 tensor cores)",
                cc.0, cc.1
            )));
        }
        let mut funcs = HashMap::new();
        let mut wgmma = false;
        // The modules' code, compiled side by side where it must be compiled.
        let codes = sources::per_module(|stem| module_code(stem, cc10));
        for ((stem, names), code) in sources::MODULES.iter().zip(codes) {
            let load = |code: &ModuleCode| {
                ctx.load_module(match code {
                    ModuleCode::Ptx(p) => cudarc::nvrtc::Ptx::from_src(*p),
                    ModuleCode::Cubin(b, _) => cudarc::nvrtc::Ptx::from_binary(b.to_vec()),
                })
            };
            let mut code = code?;
            let module = match (load(&code), &code) {
                (Ok(m), _) => m,
                // A cached or built-in cubin the driver refuses (e.g. from an NVRTC newer than
                // the driver): compiled afresh, replacing the cached file.
                (
                    Err(refused),
                    ModuleCode::Cubin(_, sources::Origin::Cache | sources::Origin::Embedded),
                ) => {
                    let fresh = sources::compile_cubin(stem, cc10, sources::cache_dir().as_deref())
                        .map_err(|e| {
                            Error::Cuda(format!(
                                "loading kernels/{stem}.cu: the driver refused the cached or built-in cubin ({refused}), and compiling it again failed: {e}"
                            ))
                        })?;
                    code = ModuleCode::Cubin(Arc::new(fresh), sources::Origin::Compiled);
                    load(&code)
                        .map_err(|e| Error::Cuda(format!("loading kernels/{stem}.cu: {e}")))?
                }
                (Err(e), _) => {
                    return Err(Error::Cuda(format!("loading kernels/{stem}.cu: {e}")));
                }
            };
            if let ModuleCode::Cubin(b, _) = &code {
                cubins()
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((*stem, cc10), b.clone());
                // NVRTC builds compute capability 9.0 for sm_90a (sources::nvrtc_arch), where
                // gemm_wgmma.cu's kernels are real; nvcc's PTX is plain compute_90.
                wgmma |= *stem == "gemm_wgmma" && cc10 == 90;
            }
            for name in names.iter() {
                let f = module
                    .load_function(name)
                    .map_err(|e| Error::Cuda(format!("kernel {name} in kernels/{stem}.cu: {e}")))?;
                funcs.insert(*name, f);
            }
        }
        // Dynamic shared memory above the 48 KB a kernel gets unasked: prefill attention's ring
        // (68 KB at Dh = 128), and the warpgroup products'.
        let raise = |name: &str, bytes: u32| {
            funcs[name]
                .set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
                .map_err(cuda_err(&format!("raising the shared memory limit of {name}")))
        };
        for name in ["attention_prefill_bf16", "attention_runs_bf16"] {
            raise(name, kernels::prefill_attention_smem(128))?;
        }
        if wgmma {
            for tile in [kernels::GemmTile::Wg, kernels::GemmTile::Wg256] {
                for glu in [false, true] {
                    let Some(k) = tile.kernel(glu) else { continue };
                    raise(k.name, k.smem)?;
                }
            }
        }
        if !wgmma
            && matches!(
                kernels::GemmTile::from_env(),
                kernels::GemmTile::Wg | kernels::GemmTile::Wg256
            )
        {
            // A fallback, not an error, but an A/B timing must not take it for the wgmma kernels.
            eprintln!(
                "THINKSTEER_GEMM: no wgmma here (it needs compute capability 9.0 and kernels built by NVRTC for sm_90a; \
                 this is {}.{}): the 64-row tile runs instead",
                cc.0, cc.1
            );
        }
        let sync_each = std::env::var("THINKSTEER_CUDA_SYNC").is_ok_and(|v| v == "1");
        let pdl = cc.0 >= 9 && std::env::var("THINKSTEER_PDL").map_or(true, |v| v != "0");
        Gpu::on_stream(ctx, stream, cc, sms, funcs, (sync_each, pdl, wgmma))
    }

    /// A handle with its own stream and scratch on the same device and context, sharing the
    /// loaded kernels: its work runs concurrently with this handle's (the hybrid step runs the
    /// thinking model on a sibling). Work that crosses the two must be ordered with events.
    pub fn sibling(&self) -> Result<Gpu> {
        let stream = self
            .ctx
            .new_stream()
            .map_err(cuda_err("creating a stream"))?;
        Gpu::on_stream(
            self.ctx.clone(),
            stream,
            self.compute_capability,
            self.sms,
            self.funcs.clone(),
            (self.sync_each, self.pdl, self.wgmma),
        )
    }

    fn on_stream(
        ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
        compute_capability: (i32, i32),
        sms: usize,
        funcs: HashMap<&'static str, CudaFunction>,
        (sync_each, pdl, wgmma): (bool, bool, bool),
    ) -> Result<Gpu> {
        let scratch = Scratch {
            counters: stream
                .alloc_zeros(SCRATCH_COUNTERS)
                .map_err(cuda_err("allocating scratch counters"))?,
            arg_v: stream
                .alloc_zeros(SCRATCH_PARTIALS)
                .map_err(cuda_err("allocating argmax partials"))?,
            arg_i: stream
                .alloc_zeros(SCRATCH_PARTIALS)
                .map_err(cuda_err("allocating argmax partials"))?,
            gemm_part: stream
                .alloc_zeros(SCRATCH_GEMM_PART)
                .map_err(cuda_err("allocating gemm partials"))?,
        };
        stream.synchronize().map_err(cuda_err("zeroing scratch"))?;
        Ok(Gpu {
            ctx,
            stream,
            compute_capability,
            sms,
            funcs,
            sync_each,
            pdl,
            wgmma,
            scratch,
            profile: std::sync::Mutex::new(None),
            profiling: std::sync::atomic::AtomicBool::new(false),
            blaslt: std::sync::OnceLock::new(),
            ablation: Ablation::default(),
        })
    }

    /// Whether gemm_wgmma.cu's warpgroup products run here (`GemmTile::Wg`, `Wg256`); where they
    /// do not, those tiles fall back to the 64-row one.
    pub fn has_wgmma(&self) -> bool {
        self.wgmma
    }

    /// cuBLASLt on this device (loaded and set up at the first call).
    pub(crate) fn blaslt(&self) -> Result<&blaslt::BlasLt> {
        self.blaslt
            .get_or_init(|| blaslt::BlasLt::new(self).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|why| Error::Cuda(why.clone()))
    }

    fn profile_lock(&self) -> std::sync::MutexGuard<'_, Option<Profile>> {
        self.profile.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// With `on`, from now on every launch waits for its kernel and is timed (eager launches
    /// only: a synchronisation inside CUDA-graph capture fails); the times start from zero.
    /// For breakdowns, not for speed. With `!on`, timing stops and the times are dropped.
    pub fn set_profile(&self, on: bool) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(cuda_err("synchronising for the profile"))?;
        self.profiling
            .store(on, std::sync::atomic::Ordering::Relaxed);
        *self.profile_lock() = on.then(|| Profile {
            last: std::time::Instant::now(),
            by_kernel: Default::default(),
        });
        Ok(())
    }

    /// (kernel, launches, seconds) since `set_profile(true)`, slowest first.
    pub fn profile_report(&self) -> Vec<(String, usize, f64)> {
        let g = self.profile_lock();
        let Some(p) = g.as_ref() else {
            return vec![];
        };
        let mut v: Vec<_> = p
            .by_kernel
            .iter()
            .map(|(k, &(n, s))| (k.clone(), n, s))
            .collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        v
    }

    /// The kernel name of a launch kind.
    pub fn kernel_name(&self, kind: LaunchKind) -> &str {
        self.funcs
            .iter()
            .find(|(_, f)| f.cu_function() as usize == kind.func)
            .map_or("?", |(name, _)| name)
    }

    /// Whether every launch is followed by a synchronisation (THINKSTEER_CUDA_SYNC=1): the
    /// engines then launch eagerly, without graphs, so a fault names its kernel.
    pub fn syncs_each_launch(&self) -> bool {
        self.sync_each
    }

    /// Starts (`true`) or stops listing the launches made; stopping returns them in order.
    pub fn record_launches(&self, on: bool) -> Vec<LaunchKind> {
        let was = std::mem::replace(
            &mut *self
                .ablation
                .recorded
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
            on.then(Vec::new),
        );
        self.ablation.update();
        was.unwrap_or_default()
    }

    /// Leaves every launch of `kind` out from now on (None: makes them all again). For timing
    /// what a kind of launch costs: the outputs of a left-out launch keep their old values.
    pub fn leave_out(&self, kind: Option<LaunchKind>) {
        *self
            .ablation
            .left_out
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = kind;
        self.ablation.update();
    }

    /// A loaded kernel by its exported name.
    pub(crate) fn func(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs
            .get(name)
            .ok_or_else(|| Error::Cuda(format!("kernel {name} is not loaded")))
    }

    /// Registers per thread of a loaded kernel, as the driver reports them: a block of T threads
    /// takes ⌈T/32⌉ warps × (32·regs rounded up to 256) of the 65,536 a block may have.
    pub fn kernel_registers(&self, name: &str) -> Result<i32> {
        self.func(name)?
            .num_regs()
            .map_err(cuda_err("reading a kernel's register count"))
    }

    /// Maps a launch result to ours, naming the kernel; with THINKSTEER_CUDA_SYNC=1 also waits
    /// for the kernel so an asynchronous fault is reported against it.
    pub(crate) fn launched<T>(
        &self,
        name: &str,
        r: std::result::Result<T, cudarc::driver::DriverError>,
    ) -> Result<()> {
        r.map_err(|e| Error::Cuda(format!("launching {name}: {e}")))?;
        let profiling = self.profiling.load(std::sync::atomic::Ordering::Relaxed);
        if (profiling || self.sync_each) && self.capturing() {
            return Ok(()); // a capturing stream cannot be synchronised; the graph's replay can
        }
        if let Some(p) = profiling
            .then(|| self.profile_lock())
            .as_mut()
            .and_then(|g| g.as_mut())
        {
            self.stream
                .synchronize()
                .map_err(|e| Error::Cuda(format!("{name} failed: {e}")))?;
            let now = std::time::Instant::now();
            let dt = (now - p.last).as_secs_f64();
            p.last = now;
            let e = p.by_kernel.entry(name.to_string()).or_default();
            e.0 += 1;
            e.1 += dt;
        } else if self.sync_each {
            self.stream
                .synchronize()
                .map_err(|e| Error::Cuda(format!("{name} failed: {e}")))?;
        }
        Ok(())
    }

    /// Records the launches `f` makes on the stream into a replayable CUDA graph (nothing runs
    /// during capture; `f` must not synchronise or allocate).
    pub fn capture(&self, f: impl FnOnce() -> Result<()>) -> Result<cudarc::driver::CudaGraph> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags_enum, CUstreamCaptureMode};
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(cuda_err("starting graph capture"))?;
        let launched = f();
        let graph = self.stream.end_capture(CUgraphInstantiate_flags_enum(0));
        launched?; // a failed launch invalidates the capture: its error is the one to report
        let graph = graph.map_err(cuda_err("ending graph capture"))?;
        graph.ok_or_else(|| Error::Cuda("graph capture produced no graph".into()))
    }

    /// Whether the stream is being captured into a graph (where it must not be synchronised).
    fn capturing(&self) -> bool {
        use cudarc::driver::sys::CUstreamCaptureStatus;
        matches!(
            self.stream.capture_status(),
            Ok(CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE)
        )
    }

    /// Waits for all queued work.
    pub fn sync(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(cuda_err("synchronising the stream"))
    }

    /// Makes this device's context the current one, as raw driver and cuBLASLt calls need
    /// (cudarc's own calls bind it themselves): another device's may be current, the hybrid
    /// loop can hold the thinking model on a second card.
    pub fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(cuda_err("binding the CUDA context"))
    }

    /// (free, total) bytes of this device's memory.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        cudarc::driver::result::mem_get_info().map_err(cuda_err("reading free GPU memory"))
    }
}
