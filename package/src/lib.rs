//! `flowpack`: the model package shared by `flowtrain` (which writes it) and `flowserve`
//! (which loads it).
//!
//! A package is a folder holding `flow.json` (the [`Manifest`]), `encode.onnx`
//! (`x[N, ...event] → z[N, ...event], log_prob[N]`, and `log_prob_terms[N, D]` for models
//! with exact per-feature contributions), `decode.onnx` (`z → x`) and, usually,
//! `reference.bin` (the [`ReferenceSet`] of normal rows' log-densities).
//! [`Package::open`] reads a folder and refuses it, with a message a person can act on,
//! unless the checksums, names and shapes all agree.

#![warn(missing_docs)]

mod context;
mod error;
pub mod image;
mod manifest;
pub mod onnx;
mod package;
mod reference;
#[cfg(feature = "runtime")]
pub mod runtime;
pub mod sampling;

pub use context::{ContextColumn, ContextKind, ContextSpec, ContextValue};
pub use error::PackageError;
pub use manifest::{
    signature, Base, Contributions, Cost, Dim, Direction, Domain, Graph, Graphs, Manifest, Metrics,
    Quantized, Reference, Scoring, TensorSpec, Training, DECODE_FILE, DEFAULT_THRESHOLD,
    ENCODE_FILE, MANIFEST_FILE, REFERENCE_FILE,
};
pub use package::{sha256_hex, Package};
pub use reference::{ReferenceSet, SUMMARY_LEVELS};

/// The manifest format this crate reads and writes.
pub const FORMAT_VERSION: u32 = 2;
