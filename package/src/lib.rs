//! `flowpack`: the model package shared by `flowtrain` (which writes it) and `flowserve`
//! (which loads it).
//!
//! A package is a folder holding `flow.json` (the [`Manifest`]), `encode.onnx`
//! (`x[N, ...event] → z[N, ...event], log_prob[N]`) and `decode.onnx` (`z → x`).
//! [`Package::open`] reads a folder and refuses it, with a message a person can act on,
//! unless the checksums, names and shapes all agree.

#![warn(missing_docs)]

mod error;
pub mod image;
mod manifest;
pub mod onnx;
mod package;
#[cfg(feature = "runtime")]
pub mod runtime;
pub mod sampling;

pub use error::PackageError;
pub use manifest::{
    signature, Base, Calibration, Cost, Dim, Direction, Domain, Graph, Graphs, Manifest, Metrics,
    Quantile, Quantized, TensorSpec, Training, DECODE_FILE, ENCODE_FILE, MANIFEST_FILE,
};
pub use package::{sha256_hex, Package};

/// The manifest format this crate reads and writes.
pub const FORMAT_VERSION: u32 = 1;
