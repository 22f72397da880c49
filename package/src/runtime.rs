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

/// How sessions are built.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Threads ONNX Runtime may use inside one operator.
    pub intra_threads: usize,
    /// Execution providers in order of preference; CPU is always the last resort.
    pub providers: Vec<Provider>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            intra_threads: 1,
            providers: vec![Provider::Cpu],
        }
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

fn builder(options: &SessionOptions, provider: Provider) -> ort::Result<SessionBuilder> {
    let env = environment().map_err(|e| ort::Error::new(e.to_string()))?;
    let b = Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::All)?
        .with_intra_threads(options.intra_threads.max(1))?;
    Ok(match provider {
        Provider::Cpu => b,
        Provider::Cuda => {
            b.with_execution_providers([ep::CUDA::default().build().error_on_failure()])?
        }
        Provider::Tensorrt => {
            b.with_execution_providers([ep::TensorRT::default().build().error_on_failure()])?
        }
    })
}

/// A session over a serialised model, on the first of `options.providers` that the library
/// offers and that accepts the graph (CPU last); returns the provider used and, for each one
/// skipped, why.
fn session_with(
    bytes: &[u8],
    options: &SessionOptions,
) -> Result<(Session, Provider, Vec<String>), RuntimeError> {
    environment()?;
    let mut skipped = Vec::new();
    let mut order = options.providers.clone();
    if !order.contains(&Provider::Cpu) {
        order.push(Provider::Cpu);
    }
    for provider in order {
        if !provider_available(provider) && provider != Provider::Cpu {
            skipped.push(format!(
                "{} is not available in this ONNX Runtime build",
                provider.as_str()
            ));
            continue;
        }
        match builder(options, provider).and_then(|mut b| b.commit_from_memory(bytes)) {
            Ok(s) => return Ok((s, provider, skipped)),
            Err(e) if provider != Provider::Cpu => {
                skipped.push(format!("{}: {e}", provider.as_str()))
            }
            Err(e) => return Err(RuntimeError::Refused(e.to_string())),
        }
    }
    Err(RuntimeError::Refused(
        "no execution provider could load the graph".into(),
    ))
}

/// One graph in an ONNX Runtime session, run on row-major float32 rows: the one way every
/// program here runs a graph (the server's engine threads, flowtrain's checks, the tests'
/// direct runs, the benchmarks' in-process ceiling).
pub struct GraphSession {
    session: Session,
    input: String,
    /// `[N, ...event]` of the input, `N` rewritten per run.
    shape: Vec<usize>,
    outputs: Vec<String>,
    widths: Vec<usize>,
    /// The provider the session runs on.
    pub provider: Provider,
    /// Providers tried before it, and why each was passed over.
    pub skipped: Vec<String>,
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
        GraphSession::new(&bytes, &graph.inputs[0], &graph.outputs, options)
    }

    /// A serialised graph with one float32 input and float32 outputs, each `[N, ...]`.
    pub fn new(
        bytes: &[u8],
        input: &TensorSpec,
        outputs: &[TensorSpec],
        options: &SessionOptions,
    ) -> Result<GraphSession, RuntimeError> {
        let mut shape = vec![0];
        shape.extend(input.event());
        if shape[1..].contains(&0) {
            return Err(RuntimeError::Refused(format!(
                "input {} has an empty row shape {:?}",
                input.name,
                &shape[1..]
            )));
        }
        let (session, provider, skipped) = session_with(bytes, options)?;
        Ok(GraphSession {
            session,
            input: input.name.clone(),
            shape,
            outputs: outputs.iter().map(|o| o.name.clone()).collect(),
            widths: outputs.iter().map(|o| o.event().iter().product()).collect(),
            provider,
            skipped,
        })
    }

    /// Scalars per input row.
    pub fn input_width(&self) -> usize {
        self.shape[1..].iter().product()
    }

    /// Scalars per output row, per output in signature order.
    pub fn output_widths(&self) -> &[usize] {
        &self.widths
    }

    /// Runs `rows` (row-major, [`GraphSession::input_width`] values per row) and returns each
    /// output, row-major.
    pub fn run(&mut self, rows: &[f32]) -> Result<Vec<Vec<f32>>, RuntimeError> {
        let width = self.input_width();
        if !rows.len().is_multiple_of(width) {
            return Err(RuntimeError::Run(format!(
                "{} values are not whole rows of {width}",
                rows.len()
            )));
        }
        self.shape[0] = rows.len() / width;
        let n = self.shape[0];
        let tensor = TensorRef::from_array_view((self.shape.clone(), rows))
            .map_err(|e| RuntimeError::Run(e.to_string()))?;
        let result = self
            .session
            .run(ort::inputs![self.input.as_str() => tensor])
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
