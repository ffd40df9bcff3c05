//! The device layer: one CUDA context and stream, and the kernel families compiled by NVRTC
//! under pinned options.
//!
//! Every kernel family (`cuda/<family>.cu`, with `cuda/common.cuh` pasted in front) is compiled
//! at most once per process and per architecture; each [`Device`] loads the resulting PTX into
//! its context the first time one of the family's kernels is launched. The options are fixed:
//!
//! | option | value | why |
//! |---|---|---|
//! | `--fmad` | `false` | the compiler may never fuse `a * b + c`; every fma is written as `fmaf` |
//! | `--prec-div` | `true` | `/` is the correctly rounded IEEE division |
//! | `--prec-sqrt` | `true` | `sqrtf` is the correctly rounded IEEE square root |
//! | `--ftz` | `false` | subnormals are kept, as on the CPU |
//! | `--gpu-architecture` | `compute_XY` of the device | PTX for the device's own compute capability |
//!
//! No fast-math option is ever passed. The PTX carries explicit `.rn` rounding on every float
//! operation, so the driver's PTX JIT cannot contract or reorder them either.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use crate::error::{Error, Result};

/// Declares [`Family`] from one table: variant and file stem. The enum, [`Family::ALL`], the
/// names and the embedded sources all come from it, so adding a `cuda/*.cu` file is one line
/// here (a unit test checks that every file under `cuda/` has its line).
macro_rules! families {
    ($($variant:ident => $stem:literal),* $(,)?) => {
        /// A kernel family: one `cuda/<name>.cu` file, compiled as one NVRTC program.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Family {
            $(
                #[doc = concat!("`cuda/", $stem, ".cu`")]
                $variant,
            )*
        }

        impl Family {
            /// Every family, in a fixed order.
            pub const ALL: &'static [Family] = &[$(Family::$variant),*];

            /// The file stem under `cuda/`.
            pub fn name(self) -> &'static str {
                match self {
                    $(Family::$variant => $stem,)*
                }
            }

            fn source(self) -> &'static str {
                match self {
                    $(Family::$variant => include_str!(concat!("../cuda/", $stem, ".cu")),)*
                }
            }
        }
    };
}

families! {
    RowScale => "row_scale",
    MoeReduce => "moe_reduce",
    Gemm => "gemm",
    Route => "route",
    Router => "router",
    Activation => "activation",
    Quantize => "quantize",
    Norm => "norm",
    Rope => "rope",
    Attention => "attention",
    Elementwise => "elementwise",
    FastScan => "fastscan",
    DeltaNet => "delta_net",
}

const COMMON: &str = include_str!("../cuda/common.cuh");

impl Family {
    /// The program text handed to NVRTC: `common.cuh` in place of its `#include`.
    pub(crate) fn program(self) -> String {
        self.source().replace("#include \"common.cuh\"", COMMON)
    }
}

/// Environment variable naming kernel families to compile *broken on purpose* (comma-separated
/// family names). Each family's `.cu` file has one `#ifdef BITEXACT_MUTANT` site that changes
/// its arithmetic; the GPU test script runs the parity tests under each mutant and requires
/// them to fail, so a test that cannot fail is caught. Never set it otherwise.
pub const MUTANT_ENV: &str = "BITEXACT_MUTANT";

fn is_mutant(family: Family) -> bool {
    std::env::var(MUTANT_ENV)
        .map(|v| v.split(',').any(|f| f.trim() == family.name()))
        .unwrap_or(false)
}

/// Environment variable naming kernel variants under trial (comma-separated names from
/// [`TRIALS`]). A trial is an `#ifdef BITEXACT_TRIAL_<NAME>` in a `.cu` file that changes how
/// a kernel computes, never what it computes (the same bits), written where no GPU was at
/// hand: off by default, so what runs is unchanged (the PTX digests say so) until a lent GPU
/// has run the tests and benches with and without it; then its `#ifdef` goes, in the commit
/// that gives the figures.
pub const TRIAL_ENV: &str = "BITEXACT_CUDA_TRIAL";

/// The trials the `.cu` files know: (name, family, what it changes).
pub const TRIALS: &[(&str, &str, &str)] = &[(
    "kvalue_perm",
    "gemm",
    "the IQ4_NL/IQ4_XS and MXFP4 code grids by byte permutes of four constant words, not a \
     16-byte array that ptxas puts in local memory",
)];

/// The `-D` options of the trials [`TRIAL_ENV`] names (read once per process).
fn trial_defines() -> Result<&'static [String]> {
    static DEFINES: OnceLock<std::result::Result<Vec<String>, String>> = OnceLock::new();
    DEFINES
        .get_or_init(|| {
            let Ok(v) = std::env::var(TRIAL_ENV) else {
                return Ok(Vec::new());
            };
            v.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|t| match TRIALS.iter().find(|(n, ..)| *n == t) {
                    Some((n, ..)) => Ok(format!("-DBITEXACT_TRIAL_{}", n.to_uppercase())),
                    None => Err(format!(
                        "unknown trial `{t}` in {TRIAL_ENV} (known: {})",
                        TRIALS
                            .iter()
                            .map(|(n, ..)| *n)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                })
                .collect()
        })
        .as_deref()
        .map_err(|e| Error::invalid("compile", e.clone()))
}

/// The pinned NVRTC options for one architecture (`compute_90` for an H100).
pub fn compile_options(arch: &str, mutant: bool) -> Vec<String> {
    let mut opts = vec![
        "--fmad=false".to_string(),
        "--prec-div=true".to_string(),
        "--prec-sqrt=true".to_string(),
        "--ftz=false".to_string(),
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
    ];
    if mutant {
        opts.push("-DBITEXACT_MUTANT".to_string());
    }
    opts
}

type PtxCache = Mutex<HashMap<(Family, String), Ptx>>;

/// PTX per (family, architecture), shared by every [`Device`] in the process.
fn ptx_cache() -> &'static PtxCache {
    static CACHE: OnceLock<PtxCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn compile(family: Family, arch: &str) -> Result<Ptx> {
    let key = (family, arch.to_string());
    // Held across the compile on purpose: two threads asking for one family compile it once.
    let mut cache = ptx_cache().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(ptx) = cache.get(&key) {
        return Ok(ptx.clone());
    }
    // SAFETY: only probes whether the shared library can be opened.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::NvrtcMissing);
    }
    let mut options = compile_options(arch, is_mutant(family));
    options.extend(trial_defines()?.iter().cloned());
    let opts = CompileOptions {
        options: options.clone(),
        name: Some(format!("{}.cu", family.name())),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(family.program(), opts).map_err(|e| {
        let log = match &e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => format!("{other:?}"),
        };
        Error::Compile {
            kernel: family.name(),
            options,
            log,
        }
    })?;
    cache.insert(key, ptx.clone());
    Ok(ptx)
}

/// One CUDA device: its context, the stream every bitexact launch goes to, and the loaded
/// kernel modules.
///
/// All work is queued on one stream, so launches are ordered; functions that return host data
/// synchronize. `Device` is `Send + Sync`: threads may share one (the stream serializes them).
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    cc: (i32, i32),
    modules: Mutex<HashMap<Family, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    act_scratch: Mutex<Option<ActScratch>>,
    /// Launches left before an injected failure (0: none armed); see
    /// [`Device::inject_launch_failure`].
    fault_in: AtomicU64,
    /// Kernel lookups so far: one per launch site ([`Device::launches`]).
    launches: AtomicU64,
    /// While profiling ([`Device::set_profiling`]): an event recorded on the stream at each
    /// kernel lookup, with the kernel's name and the host's clock then.
    marks: Mutex<Option<Vec<Mark>>>,
    /// Device allocations so far ([`Device::allocations`]).
    allocs: AtomicU64,
    /// Whether launches allow programmatic dependent launch (`src/launch.rs`).
    overlap: AtomicBool,
    /// Allocations left before an injected out-of-memory (0: none armed).
    alloc_fault_in: AtomicU64,
    /// A family whose next compile fails ([`Device::inject_compile_failure`]).
    compile_fault: Mutex<Option<Family>>,
}

/// Lets the stream-ordered allocation pool keep what is freed, instead of returning it to the
/// driver at every synchronization (its default): a step that frees and allocates the same
/// sizes every time (a batched decode step at every token) then maps no new memory.
/// [`Device::free_memory`] hands the kept memory back before reading what is free. The
/// threshold is the device's default pool's, for the whole process: memory kept there is not
/// available to allocations outside the pool (cuBLAS, plain `cuMemAlloc`) until then. Off
/// unless `BITEXACT_POOL_KEEP=1` (read once per process) until it is measured on a GPU.
fn keep_freed_memory(ctx: &CudaContext) -> Result<()> {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("BITEXACT_POOL_KEEP").is_ok_and(|v| v == "1"));
    if !on || !ctx.has_async_alloc() {
        return Ok(());
    }
    let mut threshold = u64::MAX;
    // SAFETY: the default pool of a live context's device; the release threshold attribute
    // takes a u64, which `threshold` is.
    unsafe {
        let pool = cudarc::driver::result::device::get_default_mem_pool(ctx.cu_device())?;
        cudarc::driver::result::mem_pool::set_attribute(
            pool,
            cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )?;
    }
    Ok(())
}

/// Whether the device can overlap launches (compute capability 9.0 and up).
pub(crate) fn pdl_supported(cc: (i32, i32)) -> bool {
    cc.0 >= 9
}

/// The default of [`Device::launch_overlap`]: supported and `BITEXACT_PDL=1`; read once per
/// process.
pub(crate) fn pdl_default(cc: (i32, i32)) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    pdl_supported(cc) && *ON.get_or_init(|| std::env::var("BITEXACT_PDL").is_ok_and(|v| v == "1"))
}

/// Launches captured by [`Device::capture`], replayed as one ([`Graph::replay`]).
pub(crate) struct Graph {
    kernels: u64,
    /// The device it was captured for (a replay on another would run another GPU's pointers).
    ordinal: usize,
    graph: cudarc::driver::CudaGraph,
    /// The handle the work was captured on: its modules and scratch are what the graph's
    /// kernel nodes point at, so it lives as long as the graph (and is dropped after it).
    _twin: Device,
}

impl Graph {
    /// Kernel launches the graph holds.
    pub(crate) fn kernels(&self) -> u64 {
        self.kernels
    }

    /// Fails unless `dev` is the device the graph was captured for.
    pub(crate) fn check_device(&self, dev: &Device, op: &'static str) -> Result<()> {
        if self.ordinal != dev.ctx.ordinal() {
            return Err(Error::invalid(
                op,
                "the graph was captured on another device: use one device per session",
            ));
        }
        Ok(())
    }

    /// Queues the whole graph on `dev`'s stream. Fails, queuing nothing, when `dev` is not the
    /// device the graph was captured for.
    ///
    /// # Safety
    /// Every buffer the captured launches read or write must still be alive and not in use
    /// by other work, as when they were captured.
    pub(crate) unsafe fn replay(&self, dev: &Device, op: &'static str) -> Result<()> {
        self.check_device(dev, op)?;
        // SAFETY: the caller keeps the captured buffers alive; the executable graph is this
        // one's, launched on a stream of the device it was captured for.
        unsafe {
            cudarc::driver::result::graph::launch(
                self.graph.cu_graph_exec(),
                dev.stream.cu_stream(),
            )
        }?;
        Ok(())
    }
}

/// A profiled launch: the kernel's name, the event before it and the host's clock then.
type Mark = (&'static str, CudaEvent, std::time::Instant);

/// Time spent in one kernel over a profiled stretch ([`Device::take_profile`]).
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    /// The kernel's name in its `.cu` file.
    pub name: &'static str,
    /// Launches of it.
    pub launches: u64,
    /// Summed time from the event before each of its launches to the event before the next
    /// launch (or the end of the stretch), milliseconds.
    pub ms: f64,
    /// Summed host time from each of its launches' lookup to the next kernel's lookup (or the
    /// end of the stretch), milliseconds: the launch itself and whatever host work follows it
    /// (uploads, allocations, synchronizations). Where `ms` exceeds the kernel's own time and
    /// this is close to it, the device was waiting for the host.
    pub host_ms: f64,
}

/// Reused device buffers for the quantized activations of a matrix product: allocating them on
/// every call would cost more than a decode-sized product itself. All work is on one stream,
/// so a buffer may be reused as soon as the launches that read it are queued.
pub(crate) struct ActScratch {
    pub codes: CudaSlice<i8>,
    pub d: CudaSlice<f32>,
    pub a: CudaSlice<f32>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("ordinal", &self.ctx.ordinal())
            .field("name", &self.name)
            .field("compute_capability", &self.cc)
            .finish()
    }
}

impl Device {
    /// Opens device `ordinal`. Fails with [`Error::NoDevice`] when the driver library is
    /// missing, no device is present, or `ordinal` is out of range; never panics.
    pub fn new(ordinal: usize) -> Result<Self> {
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::NoDevice {
                reason: "the CUDA driver library (libcuda) is not installed".into(),
            });
        }
        let count = CudaContext::device_count().map_err(|e| Error::NoDevice {
            reason: format!("the driver found no usable device ({e})"),
        })?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::NoDevice {
                reason: format!("device {ordinal} requested, {count} present"),
            });
        }
        let ctx = CudaContext::new(ordinal)?;
        // SAFETY: bitexact queues all its work on the one stream below, so the per-buffer
        // events cudarc would create to order several streams are never needed; without them
        // an allocation is one driver call instead of three.
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory(&ctx)?;
        let name = ctx.name()?;
        let cc = ctx.compute_capability()?;
        // A stream of our own, not the legacy default stream: only such a stream can be
        // captured into a CUDA graph (the session's decode step).
        let stream = ctx.new_stream()?;
        Ok(Device::with_stream(ctx, stream, name, cc))
    }

    /// A device handle on `stream` with nothing loaded, counted or armed yet.
    fn with_stream(
        ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
        name: String,
        cc: (i32, i32),
    ) -> Self {
        Device {
            ctx,
            stream,
            name,
            cc,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            act_scratch: Mutex::new(None),
            fault_in: AtomicU64::new(0),
            launches: AtomicU64::new(0),
            marks: Mutex::new(None),
            allocs: AtomicU64::new(0),
            overlap: AtomicBool::new(pdl_default(cc)),
            alloc_fault_in: AtomicU64::new(0),
            compile_fault: Mutex::new(None),
        }
    }

    /// A second handle on the same device and context with a stream, kernel modules and
    /// scratch of its own: a session captures its decode step on one, so that other threads'
    /// work on this device's stream never lands in the graph, and the graph's scratch is
    /// never reallocated under it.
    pub(crate) fn twin(&self) -> Result<Device> {
        let stream = self.ctx.new_stream()?;
        let twin = Device::with_stream(self.ctx.clone(), stream, self.name.clone(), self.cc);
        twin.set_launch_overlap(self.launch_overlap());
        Ok(twin)
    }

    /// Captures the launches `body` queues on a twin of this device ([`Device::twin`], its
    /// kernel modules loaded and `prepare` run first, outside the capture) into a graph;
    /// nothing runs. The capture ends whatever `body` returns, so the stream stays usable; a
    /// `body` error is returned as it is. The graph's temporary allocations are freed at each
    /// replay's end.
    pub(crate) fn capture(
        &self,
        prepare: impl FnOnce(&Device) -> Result<()>,
        body: impl FnOnce(&Device) -> Result<()>,
    ) -> Result<Graph> {
        let twin = self.twin()?;
        twin.warm_up()?;
        prepare(&twin)?;
        self.synchronize()?;
        let launches0 = twin.launches();
        twin.stream.begin_capture(
            cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        )?;
        let ran = body(&twin);
        let graph = twin.stream.end_capture(
            cudarc::driver::sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
        );
        ran?;
        let graph = graph?.ok_or_else(|| {
            Error::invalid("Device::capture", "the captured work holds no launch")
        })?;
        Ok(Graph {
            kernels: twin.launches() - launches0,
            ordinal: self.ctx.ordinal(),
            graph,
            _twin: twin,
        })
    }

    /// Lets each kernel's launch overlap the end of the kernel before it (programmatic
    /// dependent launch, compute capability 9.0 and up; off by default, on with
    /// `BITEXACT_PDL=1`), or turns that off. Scheduling only: no output bit depends on it (`src/launch.rs`). A
    /// decode graph keeps the setting it was captured with.
    pub fn set_launch_overlap(&self, on: bool) {
        self.overlap
            .store(on && pdl_supported(self.cc), Ordering::Relaxed);
    }

    /// Whether launches overlap the kernel before them ([`Device::set_launch_overlap`]).
    pub fn launch_overlap(&self) -> bool {
        self.overlap.load(Ordering::Relaxed)
    }

    /// The device's name as the driver reports it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compute capability `(major, minor)`.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }

    /// The NVRTC virtual architecture the kernels are compiled for, e.g. `compute_90`.
    pub fn arch(&self) -> String {
        format!("compute_{}{}", self.cc.0, self.cc.1)
    }

    /// The stream every bitexact launch is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Free device memory in bytes, as the driver reports it once the stream has drained and
    /// the allocation pool has returned what it keeps for reuse ([`keep_freed_memory`]): what
    /// a new allocation of this process or another can have.
    pub fn free_memory(&self) -> Result<usize> {
        self.stream.synchronize()?;
        if self.ctx.has_async_alloc() {
            // SAFETY: the default pool of this context's device; nothing of it is in use by
            // queued work (the stream has drained).
            unsafe {
                let pool =
                    cudarc::driver::result::device::get_default_mem_pool(self.ctx.cu_device())?;
                cudarc::driver::result::mem_pool::trim_to(pool, 0)?;
            }
        }
        Ok(self.ctx.mem_get_info()?.0)
    }

    /// Blocks until all queued work has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize()?;
        Ok(())
    }

    /// Compiles and loads every kernel family now, so that later timings exclude compilation.
    pub fn warm_up(&self) -> Result<()> {
        for &f in Family::ALL {
            self.module(f)?;
        }
        Ok(())
    }

    /// The activation scratch, grown to hold at least `codes` codes (and `codes / 32` block
    /// scalars). Held while the caller queues the launches that use it.
    pub(crate) fn act_scratch(
        &self,
        codes: usize,
    ) -> Result<std::sync::MutexGuard<'_, Option<ActScratch>>> {
        let mut guard = self.act_scratch.lock().unwrap_or_else(|e| e.into_inner());
        if guard.as_ref().is_none_or(|s| s.codes.len() < codes) {
            let codes = codes.max(1).next_power_of_two();
            let blocks = codes.div_ceil(32);
            let alloc_err =
                |e| crate::error::Error::from_alloc(e, codes + 8 * blocks, "activation scratch");
            self.alloc_gate(codes + 8 * blocks, "activation scratch")?;
            // SAFETY: scratch contents are always written by the quantize kernel before the
            // product that reads them.
            let fresh = unsafe {
                ActScratch {
                    codes: self.stream.alloc::<i8>(codes).map_err(alloc_err)?,
                    d: self.stream.alloc::<f32>(blocks).map_err(alloc_err)?,
                    a: self.stream.alloc::<f32>(blocks).map_err(alloc_err)?,
                }
            };
            *guard = Some(fresh);
        }
        Ok(guard)
    }

    fn module(&self, family: Family) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(&family) {
            return Ok(m.clone());
        }
        let injected = {
            let mut fault = self.compile_fault.lock().unwrap_or_else(|e| e.into_inner());
            if *fault == Some(family) {
                fault.take()
            } else {
                None
            }
        };
        if injected.is_some() {
            return Err(Error::Compile {
                kernel: family.name(),
                options: compile_options(&self.arch(), is_mutant(family)),
                log: "compile failure injected by Device::inject_compile_failure".into(),
            });
        }
        let ptx = compile(family, &self.arch())?;
        let module = self.ctx.load_module(ptx)?;
        modules.insert(family, module.clone());
        Ok(module)
    }

    /// Fault injection for tests: the `k`-th kernel lookup from now (each launch looks its
    /// kernel up first, before it queues anything) fails with [`Error::InjectedFault`], then
    /// the switch disarms itself. `None` disarms it. Lets a test fail a forward part-way,
    /// after some launches have run, and check what the caller sees.
    pub fn inject_launch_failure(&self, k: Option<u64>) {
        self.fault_in.store(k.unwrap_or(0), Ordering::SeqCst);
    }

    /// Fault injection for tests: the `k`-th device allocation from now (buffers, tensors,
    /// routing tables, scratch) fails with [`Error::OutOfMemory`], exactly as a real one would
    /// reach the caller, then the switch disarms itself. `None` disarms it.
    pub fn inject_alloc_failure(&self, k: Option<u64>) {
        self.alloc_fault_in.store(k.unwrap_or(0), Ordering::SeqCst);
    }

    /// Fault injection for tests: the next compile of `family` for this device (its first use
    /// here: a device loads each family once) fails with [`Error::Compile`], then the switch
    /// disarms itself. `None` disarms it.
    pub fn inject_compile_failure(&self, family: Option<Family>) {
        *self.compile_fault.lock().unwrap_or_else(|e| e.into_inner()) = family;
    }

    /// Device allocations made so far through this device (each checked by
    /// [`Device::inject_alloc_failure`]).
    pub fn allocations(&self) -> u64 {
        self.allocs.load(Ordering::Relaxed)
    }

    /// Counts an allocation of `bytes` for `what` and fails it when a failure is armed. Every
    /// allocation in the crate goes through here first.
    pub(crate) fn alloc_gate(&self, bytes: usize, what: &'static str) -> Result<()> {
        self.allocs.fetch_add(1, Ordering::Relaxed);
        let armed = self
            .alloc_fault_in
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |k| k.checked_sub(1));
        if armed == Ok(1) {
            return Err(Error::OutOfMemory { bytes, what });
        }
        Ok(())
    }

    /// Kernels launched so far by this device's wrappers (each launch site looks its kernel up
    /// once; the rare row-chunked launches past 65,535 rows count once). `oracle speed` reads
    /// it for launches per step.
    pub fn launches(&self) -> u64 {
        self.launches.load(Ordering::Relaxed)
    }

    /// Starts (or, with `false`, stops and forgets) a per-kernel profile: from now on every
    /// launch first records a timing event on the stream. The events cost a little time each
    /// and cannot be captured into a graph, so profile eager work (a session with graphs off)
    /// and read the totals as an attribution, not as the unprofiled time.
    pub fn set_profiling(&self, on: bool) {
        *self.marks.lock().unwrap_or_else(|e| e.into_inner()) = on.then(Vec::new);
    }

    /// While profiling, starts an entry named `what` for work queued next that is not a
    /// kernel launch (a copy to the host): the time until the next mark is put on it.
    pub(crate) fn profile_mark(&self, what: &'static str) -> Result<()> {
        if let Some(marks) = self
            .marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            let ev = self
                .stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
            marks.push((what, ev, std::time::Instant::now()));
        }
        Ok(())
    }

    /// Ends the profile started by [`Device::set_profiling`]: waits for the stream and returns
    /// each kernel's launches and time, longest first. Empty when profiling was off.
    pub fn take_profile(&self) -> Result<Vec<KernelTime>> {
        let Some(marks) = self.marks.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return Ok(Vec::new());
        };
        let host_end = std::time::Instant::now();
        let end = self
            .stream
            .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        end.synchronize()?;
        let mut total: Vec<KernelTime> = Vec::new();
        for (i, (name, ev, at)) in marks.iter().enumerate() {
            let (next, next_at) = marks.get(i + 1).map_or((&end, host_end), |m| (&m.1, m.2));
            let ms = f64::from(ev.elapsed_ms(next)?);
            let host_ms = next_at.duration_since(*at).as_secs_f64() * 1e3;
            match total.iter_mut().find(|t| t.name == *name) {
                Some(t) => {
                    t.launches += 1;
                    t.ms += ms;
                    t.host_ms += host_ms;
                }
                None => total.push(KernelTime {
                    name,
                    launches: 1,
                    ms,
                    host_ms,
                }),
            }
        }
        total.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(total)
    }

    /// The kernel `name` of `family`, compiling and loading the family on first use.
    pub(crate) fn function(&self, family: Family, name: &'static str) -> Result<CudaFunction> {
        self.function_with(family, name, |_| Ok(()))
    }

    /// [`Device::function`], running `init` (attributes such as the shared-memory carveout)
    /// once, when the kernel is first loaded, instead of a driver call per launch.
    pub(crate) fn function_with(
        &self,
        family: Family,
        name: &'static str,
        init: impl FnOnce(&CudaFunction) -> Result<()>,
    ) -> Result<CudaFunction> {
        self.launches.fetch_add(1, Ordering::Relaxed);
        let armed = self
            .fault_in
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |k| k.checked_sub(1));
        if armed == Ok(1) {
            return Err(Error::InjectedFault { kernel: name });
        }
        // The launch that looked its kernel up is queued right after this event.
        self.profile_mark(name)?;
        if let Some(f) = self
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Ok(f.clone());
        }
        let f = self.module(family)?.load_function(name)?;
        init(&f)?;
        self.functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, f.clone());
        Ok(f)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::Family;

    /// Every `cuda/*.cu` file is a family (and every family a file): a new kernel file cannot
    /// be left out of the table, nor the mutant list of `ci/gpu-run`, which reads `cuda/`.
    #[test]
    fn every_cuda_file_is_a_family() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/cuda");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                name.strip_suffix(".cu").map(str::to_owned)
            })
            .collect();
        files.sort();
        let mut names: Vec<String> = Family::ALL.iter().map(|f| f.name().to_owned()).collect();
        names.sort();
        assert_eq!(files, names);
    }

    /// Every family has its five faces under one name (STYLE.md): the kernel file, the launch
    /// wrapper, the CPU reference, the parity test module, a criterion bench registered in
    /// Cargo.toml, and a row of README's layout table that names the kernel file.
    #[test]
    fn every_family_has_five_faces() {
        let root = env!("CARGO_MANIFEST_DIR");
        let read = |p: &str| std::fs::read_to_string(format!("{root}/{p}")).unwrap();
        let (cargo, readme, parity) = (
            read("Cargo.toml"),
            read("README.md"),
            read("tests/parity/main.rs"),
        );
        let mut missing = Vec::new();
        for f in Family::ALL {
            let n = f.name();
            for face in [
                format!("src/kernels/{n}.rs"),
                format!("src/reference/{n}.rs"),
                format!("tests/parity/{n}.rs"),
                format!("benches/{n}.rs"),
            ] {
                if !std::path::Path::new(&format!("{root}/{face}")).is_file() {
                    missing.push(face);
                }
            }
            if !parity.contains(&format!("mod {n};")) {
                missing.push(format!("`mod {n};` in tests/parity/main.rs"));
            }
            if !cargo.contains(&format!("[[bench]]\nname = \"{n}\"")) {
                missing.push(format!("[[bench]] {n} in Cargo.toml"));
            }
            let row = format!("| `cuda/{n}.cu` | `src/kernels/{n}.rs` | `src/reference/{n}.rs`");
            let bench = format!("`benches/{n}.rs` |");
            if !readme
                .lines()
                .any(|l| l.contains(&row) && l.trim_end().ends_with(&bench))
            {
                missing.push(format!("README row for cuda/{n}.cu with its bench"));
            }
        }
        assert!(missing.is_empty(), "faces missing: {missing:?}");
    }

    /// Whether libnvrtc can be opened; if not, says that `what` was skipped, or panics under
    /// `BITEXACT_REQUIRE_NVRTC=1` (CI sets it).
    pub(crate) fn nvrtc_present(what: &str) -> bool {
        // SAFETY: only probes whether the shared library can be opened.
        if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return true;
        }
        let why = format!("libnvrtc not found (LD_LIBRARY_PATH): {what}");
        if std::env::var("BITEXACT_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
            panic!("BITEXACT_REQUIRE_NVRTC=1 but {why}");
        }
        println!("SKIP {why}");
        false
    }

    /// `family`'s PTX for `compute_90` with the pinned options (plain or as its mutant), or the
    /// compiler's log; each compiled once per test process (two tests read the gemm family's).
    pub(crate) fn family_ptx(family: Family, mutant: bool) -> Result<String, String> {
        type Slot = std::sync::OnceLock<Result<String, String>>;
        static SLOTS: std::sync::OnceLock<Vec<Slot>> = std::sync::OnceLock::new();
        let slots = SLOTS.get_or_init(|| (0..2 * Family::ALL.len()).map(|_| Slot::new()).collect());
        let at = Family::ALL
            .iter()
            .position(|&f| f == family)
            .expect("ALL lists it");
        slots[2 * at + usize::from(mutant)]
            .get_or_init(|| {
                let opts = cudarc::nvrtc::CompileOptions {
                    options: super::compile_options("compute_90", mutant),
                    name: Some(format!("{}.cu", family.name())),
                    ..Default::default()
                };
                cudarc::nvrtc::compile_ptx_with_opts(family.program(), opts)
                    .map(|p| p.to_src())
                    .map_err(|e| match &e {
                        cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                            log.to_string_lossy().into_owned()
                        }
                        other => format!("{other:?}"),
                    })
            })
            .clone()
    }

    /// Every family compiles under NVRTC with the pinned options, plain and as its mutant, for
    /// the H200's `compute_90`: a kernel that does not compile fails here, on a machine without
    /// a GPU, instead of at its first launch. Needs only libnvrtc (CI installs the
    /// `nvidia-cuda-nvrtc` wheel and sets `BITEXACT_REQUIRE_NVRTC=1`); skips, saying why,
    /// without it.
    #[test]
    fn every_family_compiles_under_nvrtc() {
        if !nvrtc_present("the CUDA sources were not compiled") {
            return;
        }
        // The compiles spread over the cores (the gemm family alone is most of the time).
        let jobs: Vec<(Family, bool)> = Family::ALL
            .iter()
            .flat_map(|&f| [(f, false), (f, true)])
            .collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let failed: Vec<String> = std::thread::scope(|sc| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    sc.spawn(|| {
                        let mut failed = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(&(family, mutant)) = jobs.get(i) else {
                                return failed;
                            };
                            match family_ptx(family, mutant) {
                                Ok(ptx) => failed.extend(
                                    entries_touching_memory_before_the_grid_wait(&ptx)
                                        .into_iter()
                                        .map(|k| {
                                            format!(
                                                "{}: kernel {k} does not start with \
                                                 bx_grid_begin()",
                                                family.name()
                                            )
                                        }),
                                ),
                                Err(log) => failed
                                    .push(format!("{} (mutant {mutant}):\n{log}", family.name())),
                            }
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        assert!(failed.is_empty(), "{}", failed.join("\n"));
    }

    /// The NVRTC whose PTX [`PTX_DIGESTS`] hold (CI installs it; its PTX names it).
    const PTX_NVRTC: &str = "V13.0.88";

    /// FNV-1a of each family's PTX (`compute_90`, the pinned options, NVRTC [`PTX_NVRTC`]), as
    /// committed. NVRTC is deterministic, so a change of a `.cu` file that
    /// leaves its family's digest alone (a comment, a refactor into shared device functions, a
    /// macro) provably changed no instruction of any kernel: no GPU needed to show that it moved
    /// no bit. A kernel change updates its line here in the same commit.
    const PTX_DIGESTS: [(&str, Option<u64>); 13] = [
        ("activation", Some(0x7434c9cacdcae9a8)),
        // Varies from process to process under this NVRTC (which shared-memory loads of the
        // tile and split kernels are merged, the register count): no digest to hold.
        ("attention", None),
        ("delta_net", Some(0xf12c7b4a37d49bb6)),
        ("elementwise", Some(0x641c3f55621193d9)),
        ("fastscan", Some(0x9893e9006d8b49b8)),
        ("gemm", Some(0x4d26f9810a8929bc)),
        ("moe_reduce", Some(0x3f5bacc3f2b4f450)),
        ("norm", Some(0x645796164f80a98a)),
        ("quantize", Some(0x995fd13f9d4bbc0e)),
        ("rope", Some(0x634d8a3451a5fbb8)),
        ("route", Some(0xa6a87836f9a7d978)),
        ("router", Some(0x988e64e99003c55b)),
        ("row_scale", Some(0x6af17be68f6f4378)),
    ];

    /// Each trial's family compiles with its define (plain: a trial runs beside the default,
    /// not under the mutants; each gemm compile is a good part of this binary's CI time), and
    /// `kvalue_perm` keeps its promise: the default gemm PTX has a local array in its IQ4 and
    /// MXFP4 kernels (the reason for the trial), the trial's has none anywhere.
    #[test]
    fn trials_compile_and_keep_their_promise() {
        if !nvrtc_present("the trials were not compiled") {
            return;
        }
        for &(name, family, _) in super::TRIALS {
            let family = *Family::ALL
                .iter()
                .find(|f| f.name() == family)
                .expect("a family");
            let mut options = super::compile_options("compute_90", false);
            options.push(format!("-DBITEXACT_TRIAL_{}", name.to_uppercase()));
            let opts = cudarc::nvrtc::CompileOptions {
                options,
                name: Some(format!("{}.cu", family.name())),
                ..Default::default()
            };
            let ptx = cudarc::nvrtc::compile_ptx_with_opts(family.program(), opts)
                .unwrap_or_else(|e| panic!("trial {name}: {e:?}"))
                .to_src();
            assert!(
                entries_touching_memory_before_the_grid_wait(&ptx).is_empty(),
                "trial {name}: a kernel that does not start with bx_grid_begin()"
            );
            if name == "kvalue_perm" {
                let default = family_ptx(family, false).expect("compiles");
                assert!(
                    default.contains("__local_depot"),
                    "the default has no local array"
                );
                assert!(
                    !ptx.contains("__local_depot"),
                    "kvalue_perm left a local array"
                );
            }
        }
    }

    /// Every family's PTX against [`PTX_DIGESTS`]; `BITEXACT_PTX_DUMP=DIR` also writes each
    /// family's PTX to `DIR/<family>.ptx` and its mutant's to `DIR/<family>.mutant.ptx`, to diff
    /// what moved.
    #[test]
    fn every_family_ptx_matches_its_digest() {
        if !nvrtc_present("the PTX was not compiled") {
            return;
        }
        let dump = std::env::var("BITEXACT_PTX_DUMP").ok();
        let mut moved = Vec::new();
        for &family in Family::ALL {
            let ptx = family_ptx(family, false).expect("compiles (every_family_compiles...)");
            if !ptx.contains(PTX_NVRTC) {
                let why = format!("the PTX digests are {PTX_NVRTC}'s, this NVRTC is another");
                assert!(
                    !std::env::var("BITEXACT_REQUIRE_NVRTC").is_ok_and(|v| v == "1"),
                    "BITEXACT_REQUIRE_NVRTC=1 but {why}"
                );
                println!("SKIP {why}");
                return;
            }
            if let Some(dir) = &dump {
                // The mutant's PTX too: a refactor that moves no instruction of the plain
                // program should move none of the mutant's either (compare the two dumps).
                let mutant = family_ptx(family, true).expect("compiles");
                std::fs::write(format!("{dir}/{}.ptx", family.name()), &ptx).unwrap();
                std::fs::write(format!("{dir}/{}.mutant.ptx", family.name()), mutant).unwrap();
            }
            let got = fnv1a(&ptx);
            let want = PTX_DIGESTS.iter().find(|(n, _)| *n == family.name());
            if want.is_some_and(|w| w.1.is_some_and(|d| d != got)) || want.is_none() {
                // NVRTC's PTX now and then differs from one process to the next (the attention
                // family's every time; gemm's once in a clean-clone CI run, as none of its
                // plain, mutant, trial or mutant+trial programs): a second opinion from two
                // processes of their own before calling it moved.
                let held = want.and_then(|w| w.1);
                let again: Vec<Option<u64>> = (0..2).map(|_| child_digest(family)).collect();
                if held.is_some() && again.contains(&held) {
                    println!(
                        "NOTE {}: this process's NVRTC gave {got:#018x}, a process of its own \
                         the committed digest ({again:x?})",
                        family.name()
                    );
                    continue;
                }
                moved.push(format!("(\"{}\", Some({got:#018x})),", family.name()));
            }
        }
        assert!(
            moved.is_empty(),
            "PTX that differs from PTX_DIGESTS (the new lines):\n{}",
            moved.join("\n")
        );
    }

    /// FNV-1a of a PTX text, [`PTX_DIGESTS`]' hash.
    fn fnv1a(ptx: &str) -> u64 {
        ptx.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }

    /// Env var naming the family [`family_digest_child`] compiles.
    const DIGEST_FAMILY_ENV: &str = "BITEXACT_DIGEST_FAMILY";

    /// `family`'s PTX digest from a process of its own (this test binary running
    /// [`family_digest_child`]); `None` if that run fails.
    fn child_digest(family: Family) -> Option<u64> {
        let out = std::process::Command::new(std::env::current_exe().ok()?)
            .args([
                "--exact",
                "device::tests::family_digest_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIGEST_FAMILY_ENV, family.name())
            .output()
            .ok()?;
        // (The harness prints the test's name on the same line.)
        let text = String::from_utf8_lossy(&out.stdout);
        let hex = text.split("digest 0x").nth(1)?;
        let end = hex
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(hex.len());
        u64::from_str_radix(&hex[..end], 16).ok()
    }

    /// Prints `digest 0x..` of the family [`DIGEST_FAMILY_ENV`] names: the digest test's second
    /// opinion, run by it in a child process.
    #[test]
    #[ignore = "run by every_family_ptx_matches_its_digest in a process of its own"]
    fn family_digest_child() {
        let Ok(name) = std::env::var(DIGEST_FAMILY_ENV) else {
            return;
        };
        let family = *Family::ALL
            .iter()
            .find(|f| f.name() == name)
            .expect("a family");
        let ptx = family_ptx(family, false).expect("compiles");
        println!("digest {:#018x}", fnv1a(&ptx));
    }

    /// The `.entry` kernels of `ptx` in which a memory instruction (global, shared or async
    /// copy, atomics) comes before `griddepcontrol.wait`, or that have no wait at all: with
    /// programmatic dependent launch such a kernel could read its input before the kernel that
    /// writes it has finished (see `src/launch.rs`).
    fn entries_touching_memory_before_the_grid_wait(ptx: &str) -> Vec<String> {
        const MEMORY: [&str; 7] = [
            "ld.global",
            "st.global",
            "ld.shared",
            "st.shared",
            "atom.",
            "red.",
            "cp.async",
        ];
        // An opcode starts a word ("red." also ends "cp.async.cg.shared.global").
        let find_op = |entry: &str, op: &str| {
            entry.match_indices(op).map(|(i, _)| i).find(|&i| {
                i == 0
                    || !entry.as_bytes()[i - 1].is_ascii_alphanumeric()
                        && entry.as_bytes()[i - 1] != b'.'
            })
        };
        let mut bad = Vec::new();
        for entry in ptx.split(".entry ").skip(1) {
            let name: String = entry.chars().take_while(|c| *c != '(').collect();
            let wait = entry.find("griddepcontrol.wait");
            // Kernels that copy constant weights into shared memory before the wait (and touch
            // nothing else there): only their cp.async may come first.
            let memory = match PREFETCH_BEFORE_WAIT.contains(&name.as_str()) {
                true => &MEMORY[..6],
                false => &MEMORY[..],
            };
            let first_memory = memory.iter().filter_map(|m| find_op(entry, m)).min();
            match (wait, first_memory) {
                (Some(w), Some(m)) if m < w => bad.push(name),
                (None, _) => bad.push(name),
                _ => {}
            }
        }
        bad
    }

    /// Kernels allowed to copy weights (never written by any kernel) into their own shared
    /// memory by `cp.async` before `griddepcontrol.wait`, so that with programmatic dependent
    /// launch the copies run under the previous kernel's tail.
    const PREFETCH_BEFORE_WAIT: [&str; 1] = ["gemv_q8_0_rows"];

    /// The check above fails on a kernel that reads before it waits, or never waits.
    #[test]
    fn the_grid_wait_check_can_fail() {
        let ok = ".entry a(\n) {\n ld.param.u64 %rd1, [p];\n griddepcontrol.wait;\n ld.global.f32 %f1, [%rd1];\n}";
        let early = ".entry b(\n) {\n ld.global.f32 %f1, [%rd1];\n griddepcontrol.wait;\n}";
        let never = ".entry c(\n) {\n st.global.f32 [%rd1], %f1;\n}";
        let found =
            entries_touching_memory_before_the_grid_wait(&format!("{ok}\n{early}\n{never}"));
        assert_eq!(found, ["b", "c"]);
        // An allowed prefetcher may copy before the wait, and nothing else.
        let copy = ".entry gemv_q8_0_rows(\n) {\n cp.async.cg.shared.global [%r1], [%rd1], 16;\n griddepcontrol.wait;\n}";
        let load =
            ".entry gemv_q8_0_rows(\n) {\n ld.global.f32 %f1, [%rd1];\n griddepcontrol.wait;\n}";
        assert!(entries_touching_memory_before_the_grid_wait(copy).is_empty());
        assert_eq!(
            entries_touching_memory_before_the_grid_wait(load),
            ["gemv_q8_0_rows"]
        );
    }
}
