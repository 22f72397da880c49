//! Building ONNX graphs: a small builder over the prost messages of `proto/onnx.proto`.
//!
//! Every bijector emits its two maps through [`Graph`]; names are made unique by the
//! builder, constants become initializers, and [`Graph::finish`] writes a model for
//! opset 17 with a dynamic batch axis `N`.

use std::collections::HashMap;

use candle_core::Tensor;
use flowpack::onnx::{
    attribute_proto::AttributeType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto, FLOAT, INT64,
};

/// The ONNX opset the exporter targets.
pub const OPSET: i64 = 17;
/// IR version matching opset 17 (ONNX 1.12).
pub const IR_VERSION: i64 = 8;

/// A named value in a graph under construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value(pub String);

/// A node attribute.
pub enum Attr {
    /// A single integer.
    Int(i64),
    /// A list of integers.
    Ints(Vec<i64>),
    /// A single float.
    Float(f32),
    /// A subgraph (for `Loop`).
    Graph(GraphProto),
}

/// An ONNX graph under construction.
#[derive(Default)]
pub struct Graph {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    used: HashMap<String, usize>,
    consts: HashMap<(Vec<i64>, Vec<u32>), Value>,
    context: Option<Value>,
}

fn value_info(name: &str, elem_type: i32, shape: &[Option<usize>]) -> ValueInfoProto {
    let dim = shape
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Some(n) => tensor_shape_proto::dimension::Value::DimValue(*n as i64),
                None => tensor_shape_proto::dimension::Value::DimParam("N".into()),
            }),
            denotation: None,
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem_type),
                shape: Some(TensorShapeProto { dim }),
            })),
            denotation: None,
        }),
        doc_string: None,
    }
}

/// `[N, ...event]` as a value-info shape.
fn batched(event: &[usize]) -> Vec<Option<usize>> {
    std::iter::once(None)
        .chain(event.iter().map(|&d| Some(d)))
        .collect()
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// A name not used before, built from `hint`.
    pub fn fresh(&mut self, hint: &str) -> String {
        let n = self.used.entry(hint.to_string()).or_insert(0);
        *n += 1;
        if *n == 1 {
            hint.to_string()
        } else {
            format!("{hint}_{}", *n - 1)
        }
    }

    /// Makes `v` (`[N, K]`) the conditioners' context input: the ONNX twin of
    /// `Ctx::context`.
    pub fn set_context(&mut self, v: Value) {
        self.context = Some(v);
    }

    /// The conditioners' context input, checked as [`crate::bijectors::Ctx::context_for`]
    /// checks the candle one: `None` for a conditioner of width 0, an error when a
    /// conditional layer is emitted into a graph without one.
    pub fn context_for(&self, width: usize) -> candle_core::Result<Option<Value>> {
        match (width, &self.context) {
            (0, _) => Ok(None),
            (_, Some(v)) => Ok(Some(v.clone())),
            (_, None) => candle_core::bail!(
                "a conditional layer ({width} context values) emitted into a graph without a context input"
            ),
        }
    }

    /// Declares a float32 graph input of shape `[N, ...event]`.
    pub fn input(&mut self, name: &str, event: &[usize]) -> Value {
        let name = self.fresh(name);
        self.inputs.push(value_info(&name, FLOAT, &batched(event)));
        Value(name)
    }

    /// Declares `v` as a float32 graph output named `name` with shape `[N, ...event]`.
    pub fn output(&mut self, v: &Value, name: &str, event: &[usize]) {
        let out = self.fresh(name);
        self.nodes.push(NodeProto {
            input: vec![v.0.clone()],
            output: vec![out.clone()],
            name: Some(format!("{out}/identity")),
            op_type: Some("Identity".into()),
            ..Default::default()
        });
        self.outputs.push(value_info(&out, FLOAT, &batched(event)));
    }

    /// A float32 initializer; equal constants are stored once.
    pub fn constant(&mut self, hint: &str, data: &[f32], dims: &[usize]) -> Value {
        let key = (
            dims.iter().map(|&d| d as i64).collect::<Vec<_>>(),
            data.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        );
        // Equal constants are stored once (a weight emitted by two passes, IAF's inverse).
        if let Some(v) = self.consts.get(&key) {
            return v.clone();
        }
        let name = self.fresh(hint);
        let raw = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.initializers.push(TensorProto {
            dims: key.0.clone(),
            data_type: Some(FLOAT),
            name: Some(name.clone()),
            raw_data: Some(raw),
            ..Default::default()
        });
        let v = Value(name);
        self.consts.insert(key, v.clone());
        v
    }

    /// A float32 scalar initializer.
    pub fn scalar(&mut self, hint: &str, x: f32) -> Value {
        self.constant(hint, &[x], &[])
    }

    /// An int64 initializer (indices, axes, shapes).
    pub fn constant_i64(&mut self, hint: &str, data: &[i64], dims: &[usize]) -> Value {
        let name = self.fresh(hint);
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(INT64),
            name: Some(name.clone()),
            int64_data: data.to_vec(),
            ..Default::default()
        });
        Value(name)
    }

    /// A float32 initializer holding a candle tensor's values.
    pub fn tensor(&mut self, hint: &str, t: &Tensor) -> candle_core::Result<Value> {
        let data = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        Ok(self.constant(hint, &data, t.dims()))
    }

    /// Adds a node with `n_out` outputs.
    pub fn node(
        &mut self,
        op: &str,
        inputs: &[&Value],
        attrs: Vec<(&str, Attr)>,
        n_out: usize,
    ) -> Vec<Value> {
        let base = self.fresh(&op.to_lowercase());
        let outputs: Vec<String> = (0..n_out)
            .map(|i| {
                if n_out == 1 {
                    base.clone()
                } else {
                    format!("{base}_out{i}")
                }
            })
            .collect();
        let attribute = attrs
            .into_iter()
            .map(|(name, a)| {
                let mut p = AttributeProto {
                    name: Some(name.into()),
                    ..Default::default()
                };
                match a {
                    Attr::Int(i) => {
                        p.i = Some(i);
                        p.set_type(AttributeType::Int);
                    }
                    Attr::Ints(v) => {
                        p.ints = v;
                        p.set_type(AttributeType::Ints);
                    }
                    Attr::Float(f) => {
                        p.f = Some(f);
                        p.set_type(AttributeType::Float);
                    }
                    Attr::Graph(g) => {
                        p.g = Some(g);
                        p.set_type(AttributeType::Graph);
                    }
                }
                p
            })
            .collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|v| v.0.clone()).collect(),
            output: outputs.clone(),
            name: Some(base),
            op_type: Some(op.into()),
            attribute,
            ..Default::default()
        });
        outputs.into_iter().map(Value).collect()
    }

    /// Adds a single-output node.
    pub fn op(&mut self, op: &str, inputs: &[&Value], attrs: Vec<(&str, Attr)>) -> Value {
        self.node(op, inputs, attrs, 1).remove(0)
    }

    /// `a + b` (broadcasting).
    pub fn add(&mut self, a: &Value, b: &Value) -> Value {
        self.op("Add", &[a, b], vec![])
    }
    /// `a - b` (broadcasting).
    pub fn sub(&mut self, a: &Value, b: &Value) -> Value {
        self.op("Sub", &[a, b], vec![])
    }
    /// `a * b` (broadcasting).
    pub fn mul(&mut self, a: &Value, b: &Value) -> Value {
        self.op("Mul", &[a, b], vec![])
    }
    /// `a / b` (broadcasting).
    pub fn div(&mut self, a: &Value, b: &Value) -> Value {
        self.op("Div", &[a, b], vec![])
    }
    /// Matrix product over the last two axes.
    pub fn matmul(&mut self, a: &Value, b: &Value) -> Value {
        self.op("MatMul", &[a, b], vec![])
    }
    /// Elementwise `exp`.
    pub fn exp(&mut self, a: &Value) -> Value {
        self.op("Exp", &[a], vec![])
    }
    /// Elementwise `-a`.
    pub fn neg(&mut self, a: &Value) -> Value {
        self.op("Neg", &[a], vec![])
    }
    /// Elementwise `tanh`.
    pub fn tanh(&mut self, a: &Value) -> Value {
        self.op("Tanh", &[a], vec![])
    }
    /// `x[:, indices]` along `axis`.
    pub fn gather(&mut self, x: &Value, indices: &[usize], axis: i64) -> Value {
        let idx: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
        let idx = self.constant_i64("indices", &idx, &[indices.len()]);
        self.op("Gather", &[x, &idx], vec![("axis", Attr::Int(axis))])
    }
    /// Concatenation along `axis`.
    pub fn concat(&mut self, parts: &[&Value], axis: i64) -> Value {
        self.op("Concat", parts, vec![("axis", Attr::Int(axis))])
    }
    /// `x[:, start..end]` along `axis`.
    pub fn slice(&mut self, x: &Value, axis: i64, start: usize, end: usize) -> Value {
        let s = self.constant_i64("starts", &[start as i64], &[1]);
        let e = self.constant_i64("ends", &[end as i64], &[1]);
        let a = self.constant_i64("axes", &[axis], &[1]);
        self.op("Slice", &[x, &s, &e, &a], vec![])
    }
    /// `x` reshaped to `dims` (`-1` for the batch axis).
    pub fn reshape(&mut self, x: &Value, dims: &[i64]) -> Value {
        let shape = self.constant_i64("shape", dims, &[dims.len()]);
        self.op("Reshape", &[x, &shape], vec![])
    }
    /// Axes of `x` permuted by `perm`.
    pub fn transpose(&mut self, x: &Value, perm: &[usize]) -> Value {
        let perm = perm.iter().map(|&p| p as i64).collect();
        self.op("Transpose", &[x], vec![("perm", Attr::Ints(perm))])
    }
    /// A 2-D convolution of `[N, C, H, W]` with weight `[O, C, k, k]`, stride 1, `pad` zero
    /// padding on every side, and an optional bias `[O]`.
    pub fn conv(&mut self, x: &Value, w: &Value, b: Option<&Value>, pad: usize) -> Value {
        let p = pad as i64;
        let mut inputs = vec![x, w];
        inputs.extend(b);
        self.op(
            "Conv",
            &inputs,
            vec![("pads", Attr::Ints(vec![p, p, p, p]))],
        )
    }
    /// Sum over all axes but the first: `[N, ...] → [N]`, for a value of rank `rank` (one
    /// node), or of any rank (`None`: flattened first).
    pub fn sum_per_row(&mut self, x: &Value, rank: Option<usize>) -> Value {
        let (x, rank) = match rank {
            Some(r) => (x.clone(), r),
            None => (self.op("Flatten", &[x], vec![("axis", Attr::Int(1))]), 2),
        };
        let axes: Vec<i64> = (1..rank as i64).collect();
        let axes = self.constant_i64("axes", &axes, &[axes.len()]);
        self.op("ReduceSum", &[&x, &axes], vec![("keepdims", Attr::Int(0))])
    }

    /// The two halves of `x` along `axis`.
    pub fn halves(&mut self, x: &Value, axis: i64) -> (Value, Value) {
        let mut out = self.node("Split", &[x], vec![("axis", Attr::Int(axis))], 2);
        let second = out.pop().expect("two outputs");
        (out.pop().expect("two outputs"), second)
    }

    /// Turns the graph into an opset-17 model.
    pub fn finish(self, name: &str, doc: &str) -> ModelProto {
        ModelProto {
            ir_version: Some(IR_VERSION),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(OPSET),
            }],
            producer_name: Some("flowtrain".into()),
            producer_version: Some(env!("CARGO_PKG_VERSION").into()),
            doc_string: Some(doc.into()),
            graph: Some(GraphProto {
                node: self.nodes,
                name: Some(name.into()),
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}
