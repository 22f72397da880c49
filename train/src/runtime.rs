//! Running exported graphs with ONNX Runtime (for `eval`, `sample` and parity tests).
//!
//! The library is loaded at run time (`ort`'s `load-dynamic`): from `ORT_DYLIB_PATH`, or
//! from `.ort/` in the working directory or one of its parents, where the Makefile unpacks
//! the pinned PyPI wheel. A missing library is a clear error, never `ort`'s panic.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use flowpack::Package;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::TensorRef;

/// Finds the ONNX Runtime shared library.
pub fn library_path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!(
            "ORT_DYLIB_PATH={} does not exist; run `make ort` or unset it",
            p.display()
        );
    }
    let cwd = std::env::current_dir()?;
    for dir in cwd.ancestors() {
        let ort_dir = dir.join(".ort");
        if let Ok(entries) = std::fs::read_dir(&ort_dir) {
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
    bail!("the ONNX Runtime library was not found: run `make ort` (it unpacks the pinned PyPI wheel into .ort/) or set ORT_DYLIB_PATH")
}

/// The process's ONNX Runtime environment, created on first use.
pub fn environment() -> Result<&'static ort::environment::Environment> {
    static ENV: OnceLock<std::result::Result<ort::environment::Environment, String>> =
        OnceLock::new();
    ENV.get_or_init(|| {
        let path = library_path().map_err(|e| e.to_string())?;
        let builder =
            ort::init_from(&path).map_err(|e| format!("cannot load {}: {e}", path.display()))?;
        builder
            .with_name("flowtrain")
            .build()
            .map_err(|e| format!("cannot start ONNX Runtime from {}: {e}", path.display()))
    })
    .as_ref()
    .map_err(|e| anyhow!("{e}"))
}

fn builder_session(bytes: &[u8]) -> ort::Result<Session> {
    Session::builder(environment().map_err(|e| ort::Error::new(e.to_string()))?)?
        .with_optimization_level(GraphOptimizationLevel::All)?
        .with_intra_threads(1)?
        .commit_from_memory(bytes)
}

/// An ONNX Runtime session over a serialised model.
pub fn session(bytes: &[u8]) -> Result<Session> {
    builder_session(bytes).map_err(|e| anyhow!("ONNX Runtime refused the graph: {e}"))
}

/// Runs `session` on one float32 input `[rows, ...event]` and returns the named outputs.
pub fn run(
    session: &mut Session,
    input: &str,
    data: &[f32],
    shape: &[usize],
    outputs: &[&str],
) -> Result<Vec<Vec<f32>>> {
    let tensor = TensorRef::from_array_view((shape.to_vec(), data)).map_err(|e| anyhow!("{e}"))?;
    let result = session
        .run(ort::inputs![input => tensor])
        .map_err(|e| anyhow!("ONNX Runtime: {e}"))?;
    outputs
        .iter()
        .map(|name| {
            let value = result
                .get(*name)
                .ok_or_else(|| anyhow!("the graph has no output {name:?}"))?;
            let (_, v) = value
                .try_extract_tensor::<f32>()
                .map_err(|e| anyhow!("{e}"))?;
            Ok(v.to_vec())
        })
        .collect()
}

/// A checked package with a session per direction.
pub struct PackageRunner {
    /// The package.
    pub package: Package,
    encode: Session,
    decode: Session,
}

impl PackageRunner {
    /// Opens and checks a package folder, then starts both sessions.
    pub fn open(dir: &Path) -> Result<Self> {
        let package = Package::open(dir)?;
        let load = |file: &str| -> Result<Session> {
            let path = package.path(file);
            let bytes =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            session(&bytes).with_context(|| path.display().to_string())
        };
        let encode = load(&package.manifest.graphs.encode.file)?;
        let decode = load(&package.manifest.graphs.decode.file)?;
        Ok(PackageRunner {
            package,
            encode,
            decode,
        })
    }

    fn shape(&self, rows: usize) -> Vec<usize> {
        std::iter::once(rows)
            .chain(self.package.manifest.event_shape.iter().copied())
            .collect()
    }

    /// `(z, log_prob)` for row-major `x`.
    pub fn encode(&mut self, x: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let shape = self.shape(x.len() / self.package.event_size());
        let mut out = run(&mut self.encode, "x", x, &shape, &["z", "log_prob"])?;
        let lp = out.pop().expect("two outputs");
        Ok((out.pop().expect("two outputs"), lp))
    }

    /// `x` for row-major `z`.
    pub fn decode(&mut self, z: &[f32]) -> Result<Vec<f32>> {
        let shape = self.shape(z.len() / self.package.event_size());
        Ok(run(&mut self.decode, "z", z, &shape, &["x"])?.remove(0))
    }
}
