//! The reference set: the log-density distribution of normal rows, stored in the package so
//! that a score becomes a tail probability — "only 0.3 % of normal rows are this unlikely".
//!
//! The file (`reference.bin`, covered by the manifest's sha256) holds points `(rank, value)`
//! of the sorted log-densities of the `n` reference rows: `rank` rows score at or below
//! `value`. A set of up to [`ReferenceSet::MAX_POINTS`] rows is stored whole (every rank: the
//! tail probability is exact); a larger one keeps ranks on a geometric grid from 1 to `n`,
//! so the relative error of a tail probability stays below `(n^(1/MAX_POINTS) − 1)` — 0.03 %
//! for ten million rows — down to `1/n`.
//!
//! Layout, little-endian: the 8 bytes `FLOWREF1`, `n` (u64), the number of points `m`
//! (u64), 1 if every row is stored and 0 for a sketch (u64), `m` ranks (u64, strictly
//! increasing, the last equal to `n`), `m` values (f32, increasing, finite).

use std::path::Path;

use crate::PackageError;

const MAGIC: &[u8; 8] = b"FLOWREF1";
/// Magic, n, m and the exactness flag.
const HEADER: usize = 32;

/// The probability levels [`ReferenceSet::quantile`] is usually asked for (summaries).
pub const SUMMARY_LEVELS: [f64; 13] = [
    0.0001, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99,
];

/// The sorted log-densities of a reference set of normal rows (or a geometric sketch of
/// them), answering tail probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceSet {
    n: u64,
    exact: bool,
    ranks: Vec<u64>,
    values: Vec<f32>,
}

impl ReferenceSet {
    /// Sets up to this many rows are stored whole; larger ones as a sketch of this many
    /// points.
    pub const MAX_POINTS: usize = 1 << 16;

    /// The reference set of these log-densities; `None` when there are none, or one is not
    /// finite (a reference row the model cannot score is a bug upstream, not data).
    pub fn from_log_probs(log_probs: &[f32]) -> Option<ReferenceSet> {
        Self::with_max_points(log_probs, Self::MAX_POINTS)
    }

    /// [`ReferenceSet::from_log_probs`] keeping at most `max_points` points (at least 2).
    pub fn with_max_points(log_probs: &[f32], max_points: usize) -> Option<ReferenceSet> {
        if log_probs.is_empty() || log_probs.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let mut sorted = log_probs.to_vec();
        sorted.sort_by(f32::total_cmp);
        let n = sorted.len();
        let exact = n <= max_points.max(2);
        let wanted: Vec<usize> = if exact {
            (1..=n).collect()
        } else {
            // Ranks on a geometric grid 1 = r₀ < … < r_{m−1} = n.
            let m = max_points.max(2);
            let ratio = (n as f64).ln() / (m - 1) as f64;
            let mut r: Vec<usize> = (0..m)
                .map(|j| ((j as f64 * ratio).exp().round() as usize).clamp(1, n))
                .collect();
            r.dedup();
            r
        };
        // Each kept rank moves to the last of its ties, so "rank rows are ≤ value" holds.
        let mut ranks: Vec<u64> = Vec::with_capacity(wanted.len());
        let mut values = Vec::with_capacity(wanted.len());
        for r in wanted {
            let v = sorted[r - 1];
            let last = sorted.partition_point(|&x| x <= v) as u64;
            if ranks.last() != Some(&last) {
                ranks.push(last);
                values.push(v);
            }
        }
        Some(ReferenceSet {
            n: n as u64,
            exact,
            ranks,
            values,
        })
    }

    /// How many reference rows there were.
    pub fn len(&self) -> u64 {
        self.n
    }

    /// Never true: a reference set has at least one row.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Whether every row is stored (tail probabilities exact; tied rows share a point)
    /// rather than a sketch.
    pub fn is_exact(&self) -> bool {
        self.exact
    }

    /// The number of reference rows scoring at or below `log_prob` (exact for a whole set;
    /// for a sketch, the largest stored rank at or below it).
    pub fn count_at_or_below(&self, log_prob: f32) -> u64 {
        let j = self.values.partition_point(|&v| v <= log_prob);
        if j == 0 {
            0
        } else {
            self.ranks[j - 1]
        }
    }

    /// The smoothed fraction of reference rows at or below `log_prob`: `(k + 1) / (n + 1)`.
    /// Never 0, at most 1, and no smaller than the set can tell: `1 / (n + 1)`. NaN scores
    /// get 1/(n+1) too (nothing in the reference is as unlikely as a row the model cannot
    /// score), but the server refuses non-finite inputs before they get here.
    pub fn tail_probability(&self, log_prob: f32) -> f64 {
        let k = if log_prob.is_nan() {
            0
        } else {
            self.count_at_or_below(log_prob)
        };
        (k + 1) as f64 / (self.n + 1) as f64
    }

    /// The log-density below which a fraction `q` of the reference rows lie (the smallest
    /// stored value whose rank reaches `q·n`).
    pub fn quantile(&self, q: f64) -> f32 {
        let want = (q.clamp(0.0, 1.0) * self.n as f64).ceil().max(1.0) as u64;
        let j = self.ranks.partition_point(|&r| r < want);
        self.values[j.min(self.values.len() - 1)]
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.ranks.len() * 12);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.n.to_le_bytes());
        out.extend_from_slice(&(self.ranks.len() as u64).to_le_bytes());
        out.extend_from_slice(&u64::from(self.exact).to_le_bytes());
        for r in &self.ranks {
            out.extend_from_slice(&r.to_le_bytes());
        }
        for v in &self.values {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Parses and checks a file's bytes; `path` names it in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<ReferenceSet, PackageError> {
        let bad = |m: &str| PackageError::invalid(path, format!("not a reference set: {m}"));
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(bad("it does not start with FLOWREF1"));
        }
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let (n, m, exact) = (u64_at(8), u64_at(16), u64_at(24));
        if exact > 1 {
            return Err(bad("the exactness flag must be 0 or 1"));
        }
        if m == 0 || m > n || (bytes.len() - HEADER) as u64 != m.saturating_mul(12) {
            return Err(bad(&format!(
                "{} bytes do not hold {m} points of a {n}-row set",
                bytes.len()
            )));
        }
        let m = m as usize;
        let ranks: Vec<u64> = (0..m).map(|j| u64_at(HEADER + 8 * j)).collect();
        let base = HEADER + 8 * m;
        let values: Vec<f32> = (0..m)
            .map(|j| f32::from_le_bytes(bytes[base + 4 * j..base + 4 * j + 4].try_into().unwrap()))
            .collect();
        if ranks[0] == 0 || ranks.windows(2).any(|w| w[0] >= w[1]) || ranks[m - 1] != n {
            return Err(bad(
                "ranks must increase strictly from ≥ 1 to the row count",
            ));
        }
        if values.iter().any(|v| !v.is_finite()) || values.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad("values must be finite and increasing"));
        }
        Ok(ReferenceSet {
            n,
            exact: exact == 1,
            ranks,
            values,
        })
    }
}
