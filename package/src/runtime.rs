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
pub use ort::session::Session;
use ort::value::TensorRef;

/// What went wrong loading or running a graph.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RuntimeError(pub String);

fn err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError(e.to_string())
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
        return Err(err(format!(
            "ORT_DYLIB_PATH={} does not exist; run `make ort` or unset it",
            p.display()
        )));
    }
    let cwd = std::env::current_dir().map_err(err)?;
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
    Err(err("the ONNX Runtime library was not found: run `make ort` (it unpacks the pinned PyPI wheel into .ort/) or set ORT_DYLIB_PATH"))
}

/// The process's ONNX Runtime environment, created on first use.
pub fn environment() -> Result<&'static ort::environment::Environment, RuntimeError> {
    static ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let path = library_path().map_err(|e| e.0)?;
        let builder =
            ort::init_from(&path).map_err(|e| format!("cannot load {}: {e}", path.display()))?;
        builder
            .with_name("flowserve")
            .build()
            .map_err(|e| format!("cannot start ONNX Runtime from {}: {e}", path.display()))
    })
    .as_ref()
    .map_err(|e| err(e.clone()))
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
    let env = environment().map_err(|e| ort::Error::new(e.0))?;
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
pub fn session_with(
    bytes: &[u8],
    options: &SessionOptions,
) -> Result<(Session, Provider, Vec<String>), RuntimeError> {
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
            Err(e) => return Err(err(format!("ONNX Runtime refused the graph: {e}"))),
        }
    }
    Err(err("no execution provider could load the graph"))
}

/// A CPU session with one intra-op thread over a serialised model.
pub fn session(bytes: &[u8]) -> Result<Session, RuntimeError> {
    session_with(bytes, &SessionOptions::default()).map(|(s, _, _)| s)
}

/// Runs `session` on one float32 input of `shape` and returns the named outputs.
pub fn run(
    session: &mut Session,
    input: &str,
    data: &[f32],
    shape: &[usize],
    outputs: &[&str],
) -> Result<Vec<Vec<f32>>, RuntimeError> {
    let tensor = TensorRef::from_array_view((shape.to_vec(), data)).map_err(err)?;
    let result = session
        .run(ort::inputs![input => tensor])
        .map_err(|e| err(format!("ONNX Runtime: {e}")))?;
    outputs
        .iter()
        .map(|name| {
            let value = result
                .get(*name)
                .ok_or_else(|| err(format!("the graph has no output {name:?}")))?;
            let (_, v) = value.try_extract_tensor::<f32>().map_err(err)?;
            Ok(v.to_vec())
        })
        .collect()
}
