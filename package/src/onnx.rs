//! Prost messages for the subset of ONNX's schema in `proto/onnx.proto` (official field
//! numbers). `flowtrain` writes models with them; [`crate::Package`] reads the graph
//! signature back to check it against the manifest.

#![allow(missing_docs, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/onnx.rs"));

/// `TensorProto.DataType.FLOAT`.
pub const FLOAT: i32 = tensor_proto::DataType::Float as i32;
/// `TensorProto.DataType.INT64`.
pub const INT64: i32 = tensor_proto::DataType::Int64 as i32;
