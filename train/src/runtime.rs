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
        let mut out = self.encode.run(x)?.into_iter();
        let z = out.next().expect("z");
        Ok((z, out.next().expect("log_prob")))
    }

    /// `(log_prob, log_prob_terms)` for row-major `x`; the terms (row-major `[N, D]`) only
    /// for packages with exact contributions.
    pub fn log_prob_terms(&mut self, x: &[f32]) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let mut out = self.encode.run(x)?.into_iter().skip(1);
        let lp = out.next().expect("log_prob");
        Ok((lp, out.next()))
    }

    /// log_prob of row-major `x`, run in chunks of 4096 rows.
    pub fn log_prob(&mut self, x: &[f32]) -> Result<Vec<f32>> {
        let width = self.package.event_size() * 4096;
        let mut lp = Vec::with_capacity(x.len() / self.package.event_size());
        for chunk in x.chunks(width) {
            lp.extend(self.encode(chunk)?.1);
        }
        Ok(lp)
    }

    /// `x` for row-major `z`.
    pub fn decode(&mut self, z: &[f32]) -> Result<Vec<f32>> {
        Ok(self.decode.run(z)?.remove(0))
    }
}
