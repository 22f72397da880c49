//! A package's two graphs on CPU sessions (for `eval`, `sample` and parity tests), through
//! [`flowpack::runtime::GraphSession`].
//!
//! Every method takes the rows' raw context beside them: row-major, the manifest's context
//! width per row, and empty for an unconditional package.

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

/// Runs `session` on `rows` and, for a conditional package, their `context`.
fn run(session: &mut GraphSession, rows: &[f32], context: &[f32]) -> Result<Vec<Vec<f32>>> {
    Ok(if context.is_empty() {
        session.run(rows)?
    } else {
        session.run_inputs(&[rows, context])?
    })
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

    /// Raw context values per row (0: an unconditional package).
    pub fn context_width(&self) -> usize {
        self.package
            .manifest
            .context
            .as_ref()
            .map_or(0, |c| c.width())
    }

    /// `(z, log_prob)` for row-major `x` given `context`.
    pub fn encode(&mut self, x: &[f32], context: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut out = run(&mut self.encode, x, context)?.into_iter();
        let z = out.next().expect("z");
        Ok((z, out.next().expect("log_prob")))
    }

    /// `(log_prob, log_prob_terms)` for row-major `x` given `context`; the terms (row-major
    /// `[N, D]`) only for packages with exact contributions.
    pub fn log_prob_terms(
        &mut self,
        x: &[f32],
        context: &[f32],
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let mut out = run(&mut self.encode, x, context)?.into_iter().skip(1);
        let lp = out.next().expect("log_prob");
        Ok((lp, out.next()))
    }

    /// log_prob of row-major `x` given `context`, run in chunks.
    pub fn log_prob(&mut self, x: &[f32], context: &[f32]) -> Result<Vec<f32>> {
        self.chunked(x, context, |r, x, c| Ok(r.encode(x, c)?.1))
    }

    /// `f(self, rows, their context)` over chunks of the rows (row-major, one event each)
    /// of [`crate::eval::CHUNK_ELEMENTS`] values at most (4096 rows at most), the results
    /// joined: image flows' coupling networks hold `hidden` values per pixel, so whole
    /// sets at once would take gigabytes.
    fn chunked(
        &mut self,
        rows: &[f32],
        context: &[f32],
        f: impl Fn(&mut Self, &[f32], &[f32]) -> Result<Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let (d, cw) = (self.package.event_size(), self.context_width());
        let n = rows.len() / d;
        anyhow::ensure!(
            context.len() == n * cw,
            "{} context values for {n} rows of a package taking {cw} per row",
            context.len()
        );
        let per = (crate::eval::CHUNK_ELEMENTS / d).clamp(1, 4096);
        let mut out = Vec::with_capacity(rows.len());
        for (i, chunk) in rows.chunks(per * d).enumerate() {
            let m = chunk.len() / d;
            out.extend(f(self, chunk, &context[i * per * cw..(i * per + m) * cw])?);
        }
        Ok(out)
    }

    /// `x` for row-major `z` given `context`, run in chunks.
    pub fn decode(&mut self, z: &[f32], context: &[f32]) -> Result<Vec<f32>> {
        self.chunked(
            z,
            context,
            |r, z, c| Ok(run(&mut r.decode, z, c)?.remove(0)),
        )
    }
}
