//! `flowtrain`: normalizing flows trained with reverse-mode autodiff (candle) and exported
//! as ONNX model packages that `flowserve` loads.
//!
//! Data flows one way: [`data`] → [`flows::Flow`] (a chain of [`bijectors`] over a standard
//! normal base) → [`train`] (the loop; [`objective`], [`eval`], [`checkpoint`], [`optim`]
//! around it) → [`export`]. Each bijector holds its math and its ONNX twin side by side, so
//! parity is local; [`seeds`] names every seed derived from a run's.

#![warn(missing_docs)]

pub mod bijectors;
pub mod checkpoint;
pub mod config;
pub mod context;
pub mod conv;
pub mod data;
pub mod eval;
pub mod export;
pub mod flows;
pub mod fused;
pub mod linalg;
pub mod nn;
pub mod objective;
pub mod onnx;
pub mod optim;
pub(crate) mod parallel;
pub mod params;
pub mod pipeline;
pub mod plot;
pub mod runtime;
pub mod seeds;
pub mod threads;
pub mod train;
