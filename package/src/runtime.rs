//! Running package graphs with ONNX Runtime (feature `runtime`), shared by `flowtrain`
//! (eval, sample, parity tests) and `flowserve` (serving).
//!
//! The library is loaded at run time (`ort`'s `load-dynamic`): from `ORT_DYLIB_PATH`, or from
//! `.ort/` in the working directory or one of its parents, where the Makefile unpacks the
//! pinned PyPI wheel. A missing library is a clear error, never `ort`'s panic.

use std::path::PathBuf;
use std::sync::OnceLock;

use ort::ep;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;
use ort::value::TensorRef;

use crate::{Direction, Package, TensorSpec};

/// What went wrong loading or running a graph.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    /// The ONNX Runtime library could not be found or loaded.
    #[error("{0}")]
    Library(String),
    /// A graph file could not be read.
    #[error("{path}: {message}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// No execution provider accepted the graph.
    #[error("ONNX Runtime refused the graph: {0}")]
    Refused(String),
    /// A run failed, or returned something other than the signature promised.
    #[error("ONNX Runtime: {0}")]
    Run(String),
}

/// An ONNX Runtime execution provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    /// The default CPU provider.
    Cpu,
    /// NVIDIA CUDA.
    Cuda,
    /// NVIDIA TensorRT.
    Tensorrt,
}

impl Provider {
    /// The lower-case name used in configuration and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::Tensorrt => "tensorrt",
        }
    }
}

impl std::str::FromStr for Provider {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Provider::Cpu),
            "cuda" => Ok(Provider::Cuda),
            "tensorrt" | "trt" => Ok(Provider::Tensorrt),
            other => Err(format!(
                "unknown execution provider {other:?} (expected cpu, cuda or tensorrt)"
            )),
        }
    }
}

/// Options of the CUDA execution provider (used when `cuda` is listed); the default is GPU 0,
/// no memory limit, no TF32.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CudaOptions {
    /// The GPU's index.
    pub device_id: i32,
    /// Most bytes the provider's memory arena may hold on the GPU (`None`: no limit).
    pub memory_limit: Option<usize>,
    /// TF32 matmuls and convolutions: faster on Ampere and later, but they round inputs to a
    /// 10-bit mantissa, so scores would differ from the CPU's in the third decimal. Off unless
    /// asked for.
    pub tf32: bool,
}

/// How sessions are built.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Threads ONNX Runtime may use inside one operator.
    pub intra_threads: usize,
    /// Execution providers in order of preference. The CPU is used only where it is listed:
    /// without `cpu`, a graph that cannot run wholly on a listed GPU provider is refused;
    /// with `cpu` after a GPU provider, such a graph falls back (partly, node by node, or
    /// wholly), and [`GraphSession::passed_over`] says why.
    pub providers: Vec<Provider>,
    /// CUDA's options.
    pub cuda: CudaOptions,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            intra_threads: 1,
            providers: vec![Provider::Cpu],
            cuda: CudaOptions::default(),
        }
    }
}

/// Where a graph's session runs: the GPU providers registered on it, in order (none for a
/// CPU session), and whether ONNX Runtime placed some of its nodes on the CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// GPU providers, in the order they were registered.
    pub gpu: Vec<Provider>,
    /// Whether some (or, with no GPU provider, all) nodes run on the CPU.
    pub cpu: bool,
}

impl Placement {
    /// Wholly on the CPU.
    pub const CPU: Placement = Placement {
        gpu: Vec::new(),
        cpu: true,
    };

    /// As logs, `/v1/models` and metric labels show it: `cpu`, `cuda`, `cuda+cpu` (some
    /// nodes on the CPU), `tensorrt+cuda`.
    pub fn label(&self) -> String {
        let mut parts: Vec<&str> = self.gpu.iter().map(|p| p.as_str()).collect();
        if self.cpu {
            parts.push("cpu");
        }
        parts.join("+")
    }
}

/// Finds the ONNX Runtime shared library.
pub fn library_path() -> Result<PathBuf, RuntimeError> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        return Err(RuntimeError::Library(format!(
            "ORT_DYLIB_PATH={} does not exist; run `make ort` or unset it",
            p.display()
        )));
    }
    let cwd = std::env::current_dir()
        .map_err(|e| RuntimeError::Library(format!("cannot read the working directory: {e}")))?;
    for dir in cwd.ancestors() {
        if let Ok(entries) = std::fs::read_dir(dir.join(".ort")) {
            let mut libs: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libonnxruntime.so"))
                })
                .collect();
            libs.sort();
            if let Some(lib) = libs.pop() {
                return Ok(lib);
            }
        }
    }
    Err(RuntimeError::Library("the ONNX Runtime library was not found: run `make ort` (it unpacks the pinned PyPI wheel into .ort/) or set ORT_DYLIB_PATH".into()))
}

/// The process's ONNX Runtime environment, created on first use.
pub fn environment() -> Result<&'static ort::environment::Environment, RuntimeError> {
    static ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let path = library_path().map_err(|e| e.to_string())?;
        let builder =
            ort::init_from(&path).map_err(|e| format!("cannot load {}: {e}", path.display()))?;
        builder
            .with_name("flowserve")
            .build()
            .map_err(|e| format!("cannot start ONNX Runtime from {}: {e}", path.display()))
    })
    .as_ref()
    .map_err(|e| RuntimeError::Library(e.clone()))
}

/// Whether the loaded library offers `provider`.
pub fn provider_available(provider: Provider) -> bool {
    use ep::ExecutionProvider;
    if environment().is_err() {
        return false;
    }
    match provider {
        Provider::Cpu => true,
        Provider::Cuda => ep::CUDA::is_available().unwrap_or(false),
        Provider::Tensorrt => ep::TensorRT::is_available().unwrap_or(false),
    }
}

/// The file name of the loaded library, for messages.
fn library_name() -> String {
    library_path()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "the ONNX Runtime library".into())
}

/// A GPU provider's error, with what to do where the cause is a common one.
fn with_hint(error: String) -> String {
    let hint = if error.contains("libcuda.so") {
        " (no NVIDIA driver here: libcuda.so.1 comes with the driver, or into a container with \
         the NVIDIA container toolkit or the Kubernetes device plugin)"
    } else if error.contains("cannot open shared object file") {
        " (a CUDA runtime library is missing: `make ort-gpu CUDA_RUNTIME=1` unpacks them into \
         .ort-gpu/cuda/, then put that folder on LD_LIBRARY_PATH)"
    } else if error.contains("no CUDA-capable device") || error.contains("driver") {
        " (no usable GPU: check nvidia-smi, and that the container was given the GPU)"
    } else {
        ""
    };
    format!("{}{hint}", error.trim_end())
}

/// A session builder with `gpu` registered in order (errors on failure, never ignored);
/// `cpu_nodes: false` makes committing fail if ONNX Runtime would put any node on the CPU.
fn builder(
    options: &SessionOptions,
    gpu: &[Provider],
    cpu_nodes: bool,
) -> ort::Result<SessionBuilder> {
    let env = environment().map_err(|e| ort::Error::new(e.to_string()))?;
    let mut b = Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::All)?
        .with_intra_threads(options.intra_threads.max(1))?;
    let mut eps = Vec::new();
    for p in gpu {
        eps.push(match p {
            Provider::Cuda => {
                let c = &options.cuda;
                let mut cuda = ep::CUDA::default()
                    .with_device_id(c.device_id)
                    .with_tf32(c.tf32);
                if let Some(limit) = c.memory_limit {
                    cuda = cuda.with_memory_limit(limit);
                }
                cuda.build().error_on_failure()
            }
            Provider::Tensorrt => ep::TensorRT::default()
                .with_device_id(options.cuda.device_id)
                .build()
                .error_on_failure(),
            Provider::Cpu => continue,
        });
    }
    if !eps.is_empty() {
        b = b.with_execution_providers(eps)?;
        if !cpu_nodes {
            b = b.with_disable_cpu_fallback()?;
        }
    }
    Ok(b)
}

/// A session over a serialised model on the first of `options.providers` that the library
/// offers and that accepts the graph; the CPU only where it is listed. Returns where it runs
/// and, for each provider (or placement) passed over, why.
fn session_with(
    bytes: &[u8],
    options: &SessionOptions,
) -> Result<(Session, Placement, Vec<String>), RuntimeError> {
    environment()?;
    let order = &options.providers;
    let cpu_listed = order.contains(&Provider::Cpu);
    let mut passed_over = Vec::new();
    for (i, &provider) in order.iter().enumerate() {
        if provider == Provider::Cpu {
            return match builder(options, &[], true).and_then(|mut b| b.commit_from_memory(bytes)) {
                Ok(s) => Ok((s, Placement::CPU, passed_over)),
                Err(e) => Err(RuntimeError::Refused(e.to_string())),
            };
        }
        if !provider_available(provider) {
            passed_over.push(format!(
                "{} is not in this ONNX Runtime build ({}); `make ort-gpu` fetches the CUDA build",
                provider.as_str(),
                library_name()
            ));
            continue;
        }
        // The GPU providers from here on, as ONNX Runtime chains them (TensorRT hands what it
        // cannot take to CUDA).
        let gpu: Vec<Provider> = order[i..]
            .iter()
            .copied()
            .filter(|p| *p != Provider::Cpu && provider_available(*p))
            .collect();
        let whole = builder(options, &gpu, false).and_then(|mut b| b.commit_from_memory(bytes));
        let why = match whole {
            Ok(s) => {
                let placement = Placement { gpu, cpu: false };
                return Ok((s, placement, passed_over));
            }
            Err(e) => with_hint(e.to_string()),
        };
        if !cpu_listed {
            passed_over.push(format!("{}: {why}", provider.as_str()));
            continue;
        }
        // The CPU is listed: let ONNX Runtime keep the nodes the GPU cannot run on the CPU.
        match builder(options, &gpu, true).and_then(|mut b| b.commit_from_memory(bytes)) {
            Ok(s) => {
                passed_over.push(format!(
                    "{}: not every node runs on it ({why}); the rest run on the CPU",
                    provider.as_str()
                ));
                return Ok((s, Placement { gpu, cpu: true }, passed_over));
            }
            Err(e) => passed_over.push(format!(
                "{}: {}",
                provider.as_str(),
                with_hint(e.to_string())
            )),
        }
    }
    let listed: Vec<&str> = order.iter().map(|p| p.as_str()).collect();
    Err(RuntimeError::Refused(if passed_over.is_empty() {
        "no execution provider is listed".into()
    } else {
        format!(
            "no listed execution provider ({}) can run the graph{}: {}",
            listed.join(","),
            if cpu_listed {
                ""
            } else {
                " (cpu is not listed, so there is no fallback)"
            },
            passed_over.join("; ")
        )
    }))
}

/// One graph in an ONNX Runtime session, run on row-major float32 rows: the one way every
/// program here runs a graph (the server's engine threads, flowtrain's checks, the tests'
/// direct runs, the benchmarks' in-process ceiling).
pub struct GraphSession {
    session: Session,
    /// Input names and their `[N, ...event]` shapes, `N` rewritten per run.
    inputs: Vec<(String, Vec<usize>)>,
    outputs: Vec<String>,
    widths: Vec<usize>,
    /// Where the session runs.
    pub placement: Placement,
    /// Providers (or placements) tried before it, and why each was passed over: empty
    /// unless the graph fell back.
    pub passed_over: Vec<String>,
}

impl GraphSession {
    /// The `direction` graph of a checked package, with the input and output names its
    /// manifest states.
    pub fn open(
        package: &Package,
        direction: Direction,
        options: &SessionOptions,
    ) -> Result<GraphSession, RuntimeError> {
        let graph = package.manifest.graphs.get(direction);
        let path = package.path(&graph.file);
        let bytes = std::fs::read(&path).map_err(|e| RuntimeError::Read {
            path: path.clone(),
            message: e.to_string(),
        })?;
        GraphSession::new(&bytes, &graph.inputs, &graph.outputs, options)
    }

    /// A serialised graph with float32 inputs and outputs, each `[N, ...]`.
    pub fn new(
        bytes: &[u8],
        inputs: &[TensorSpec],
        outputs: &[TensorSpec],
        options: &SessionOptions,
    ) -> Result<GraphSession, RuntimeError> {
        if inputs.is_empty() {
            return Err(RuntimeError::Refused("the graph has no inputs".into()));
        }
        let mut shapes = Vec::new();
        for input in inputs {
            let mut shape = vec![0];
            shape.extend(input.event());
            if shape[1..].contains(&0) {
                return Err(RuntimeError::Refused(format!(
                    "input {} has an empty row shape {:?}",
                    input.name,
                    &shape[1..]
                )));
            }
            shapes.push((input.name.clone(), shape));
        }
        let (session, placement, passed_over) = session_with(bytes, options)?;
        Ok(GraphSession {
            session,
            inputs: shapes,
            outputs: outputs.iter().map(|o| o.name.clone()).collect(),
            widths: outputs.iter().map(|o| o.event().iter().product()).collect(),
            placement,
            passed_over,
        })
    }

    /// Scalars per row of the first input (the data or the latent).
    pub fn input_width(&self) -> usize {
        self.input_widths()[0]
    }

    /// Scalars per row of each input, in signature order (a conditional flow's second is
    /// its context).
    pub fn input_widths(&self) -> Vec<usize> {
        self.inputs
            .iter()
            .map(|(_, s)| s[1..].iter().product())
            .collect()
    }

    /// Scalars per output row, per output in signature order.
    pub fn output_widths(&self) -> &[usize] {
        &self.widths
    }

    /// Runs `rows` (row-major, [`GraphSession::input_width`] values per row) through a
    /// graph of one input and returns each output, row-major.
    pub fn run(&mut self, rows: &[f32]) -> Result<Vec<Vec<f32>>, RuntimeError> {
        self.run_inputs(&[rows])
    }

    /// Runs one row-major array per input (the same number of rows each) and returns each
    /// output, row-major.
    pub fn run_inputs(&mut self, inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>, RuntimeError> {
        if inputs.len() != self.inputs.len() {
            return Err(RuntimeError::Run(format!(
                "the graph takes {} inputs, {} were given",
                self.inputs.len(),
                inputs.len()
            )));
        }
        let widths = self.input_widths();
        let n = inputs[0].len() / widths[0];
        for ((rows, &width), (name, _)) in inputs.iter().zip(&widths).zip(&self.inputs) {
            if rows.len() != n * width {
                return Err(RuntimeError::Run(format!(
                    "{name}: {} values are not {n} rows of {width}",
                    rows.len()
                )));
            }
        }
        let mut feeds = Vec::with_capacity(inputs.len());
        for (rows, (name, shape)) in inputs.iter().zip(&mut self.inputs) {
            shape[0] = n;
            let tensor = TensorRef::from_array_view((shape.clone(), *rows))
                .map_err(|e| RuntimeError::Run(e.to_string()))?;
            feeds.push((name.as_str(), tensor));
        }
        let result = self
            .session
            .run(feeds)
            .map_err(|e| RuntimeError::Run(e.to_string()))?;
        self.outputs
            .iter()
            .zip(&self.widths)
            .map(|(name, &w)| {
                let value = result.get(name.as_str()).ok_or_else(|| {
                    RuntimeError::Run(format!("the graph has no output {name:?}"))
                })?;
                let (_, v) = value
                    .try_extract_tensor::<f32>()
                    .map_err(|e| RuntimeError::Run(format!("{name}: {e}")))?;
                if v.len() != n * w {
                    return Err(RuntimeError::Run(format!(
                        "{name} has {} values for {n} rows of {w}",
                        v.len()
                    )));
                }
                Ok(v.to_vec())
            })
            .collect()
    }
}
