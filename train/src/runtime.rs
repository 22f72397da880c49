//! A package's two graphs on CPU sessions (for `eval`, `sample` and parity tests), through
//! [`flowpack::runtime::GraphSession`].

use std::path::Path;

use anyhow::Result;
use flowpack::runtime::{GraphSession, SessionOptions};
use flowpack::{Direction, Package};

/// A checked package with a CPU session per direction.
pub struct PackageRunner {
    /// The package.
    pub package: Package,
    encode: GraphSession,
    decode: GraphSession,
}

impl PackageRunner {
    /// Opens and checks a package folder, then starts both sessions.
    pub fn open(dir: &Path) -> Result<Self> {
        let package = Package::open(dir)?;
        let options = SessionOptions::default();
        Ok(PackageRunner {
            encode: GraphSession::open(&package, Direction::Encode, &options)?,
            decode: GraphSession::open(&package, Direction::Decode, &options)?,
            package,
        })
    }

    /// `(z, log_prob)` for row-major `x`.
    pub fn encode(&mut self, x: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut out = self.encode.run(x)?;
        let lp = out.pop().expect("two outputs");
        Ok((out.pop().expect("two outputs"), lp))
    }

    /// `x` for row-major `z`.
    pub fn decode(&mut self, z: &[f32]) -> Result<Vec<f32>> {
        Ok(self.decode.run(z)?.remove(0))
    }
}
