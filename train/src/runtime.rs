//! Running a package's graphs with ONNX Runtime (for `eval`, `sample` and parity tests),
//! through [`flowpack::runtime`].

use std::path::Path;

use anyhow::{Context, Result};
use flowpack::runtime::{self as rt, Session};
use flowpack::Package;

pub use flowpack::runtime::{run, session};

/// A checked package with a CPU session per direction.
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
            rt::session(&bytes).with_context(|| path.display().to_string())
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
