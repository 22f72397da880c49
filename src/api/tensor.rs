//! Tensors of the Open Inference Protocol (KServe v2) on the wire. A request is a JSON header
//! whose inputs carry their data inline (flat or nested, row-major) or — the binary tensor
//! extension that `tritonclient` uses by default — as raw little-endian bytes after the
//! header, whose length the `Inference-Header-Content-Length` header gives. Responses are
//! written either way, per output.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::ApiError;

/// The header naming the length of the JSON part of a binary body.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// An inference request's JSON part.
#[derive(Debug, Deserialize)]
pub struct InferHeader {
    /// Echoed in the response.
    #[serde(default)]
    pub id: Option<String>,
    /// Request parameters (`binary_data_output`).
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// The input tensors.
    pub inputs: Vec<InputHeader>,
    /// The outputs wanted (all when absent).
    #[serde(default)]
    pub outputs: Option<Vec<OutputRequest>>,
}

/// One input as the JSON part describes it.
#[derive(Debug, Deserialize)]
pub struct InputHeader {
    /// Its name.
    pub name: String,
    /// Its shape, batch dimension first.
    #[serde(deserialize_with = "super::wire::whole_list")]
    pub shape: Vec<u64>,
    /// Its element type (`FP32`, `INT64`, ...).
    pub datatype: String,
    /// Tensor parameters (`binary_data_size`).
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// Inline data, flat or nested (absent when the data is binary).
    #[serde(default)]
    pub data: Option<Numbers>,
}

/// An output the client asks for.
#[derive(Debug, Deserialize)]
pub struct OutputRequest {
    /// Its name.
    pub name: String,
    /// Output parameters (`binary_data`).
    #[serde(default)]
    pub parameters: Map<String, Value>,
}

/// A JSON number of a tensor, as written.
#[derive(Debug, Clone, Copy)]
pub enum Number {
    /// A non-negative integer.
    U(u64),
    /// A negative integer.
    I(i64),
    /// Anything else.
    F(f64),
    /// `true` or `false`.
    B(bool),
}

/// Inline tensor data flattened row-major; nested arrays must be rectangular only in count
/// (the shape says how to read them).
#[derive(Debug, Default)]
pub struct Numbers(pub Vec<Number>);

impl<'de> Deserialize<'de> for Numbers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Numbers, D::Error> {
        let mut out = Vec::new();
        d.deserialize_any(Flatten {
            out: &mut out,
            depth: 0,
        })?;
        Ok(Numbers(out))
    }
}

struct Flatten<'a> {
    out: &'a mut Vec<Number>,
    depth: usize,
}

impl<'de> de::DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("numbers, or arrays of numbers")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.out.push(Number::U(v));
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.out.push(if v >= 0 {
            Number::U(v as u64)
        } else {
            Number::I(v)
        });
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.out.push(Number::F(v));
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.out.push(Number::B(v));
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth >= 8 {
            return Err(de::Error::custom("arrays nested deeper than 8 levels"));
        }
        while seq
            .next_element_seed(Flatten {
                out: &mut *self.out,
                depth: self.depth + 1,
            })?
            .is_some()
        {}
        Ok(())
    }
}

/// The element types a request may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    /// float32.
    Fp32,
    /// float64.
    Fp64,
    /// int32.
    Int32,
    /// int64.
    Int64,
    /// uint32.
    Uint32,
    /// uint64.
    Uint64,
}

impl DataType {
    /// From the protocol's name.
    pub fn parse(s: &str) -> Option<DataType> {
        Some(match s {
            "FP32" => DataType::Fp32,
            "FP64" => DataType::Fp64,
            "INT32" => DataType::Int32,
            "INT64" => DataType::Int64,
            "UINT32" => DataType::Uint32,
            "UINT64" => DataType::Uint64,
            _ => return None,
        })
    }

    /// The protocol's name.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DataType::Fp32 | DataType::Int32 | DataType::Uint32 => 4,
            DataType::Fp64 | DataType::Int64 | DataType::Uint64 => 8,
        }
    }

    /// Whether it holds integers.
    pub fn is_integer(self) -> bool {
        !matches!(self, DataType::Fp32 | DataType::Fp64)
    }
}

/// One decoded input tensor.
#[derive(Debug)]
pub struct Input {
    /// Its name.
    pub name: String,
    /// Its shape, batch dimension first.
    pub shape: Vec<usize>,
    /// Its element type.
    pub datatype: DataType,
    /// Its values.
    pub data: Data,
}

/// A tensor's values in the widest type of its kind.
#[derive(Debug)]
pub enum Data {
    /// FP32 values.
    F32(Vec<f32>),
    /// FP64 values.
    F64(Vec<f64>),
    /// Integer values.
    Int(Vec<i128>),
}

/// The request's inputs: each decoded from its inline data or its slice of `binary` (the
/// bytes after the JSON part, in input order). Errors name the input.
pub fn decode_inputs(header: &mut InferHeader, binary: &[u8]) -> Result<Vec<Input>, ApiError> {
    let mut offset = 0;
    let mut out = Vec::with_capacity(header.inputs.len());
    for input in &mut header.inputs {
        let name = &input.name;
        // A tensor whose parts disagree is 422, like /v1's values; a datatype or byte count that
        // is not one at all is 400, as is a body whose binary part does not add up (below).
        let bad = |msg: String| ApiError::Invalid(format!("input {name:?}: {msg}"));
        let framing = |msg: String| ApiError::Malformed(format!("input {name:?}: {msg}"));
        let datatype = DataType::parse(&input.datatype).ok_or_else(|| {
            framing(format!(
                "datatype {:?} is not one this server reads (FP32, FP64, INT32, INT64, UINT32, UINT64)",
                input.datatype
            ))
        })?;
        let shape: Vec<usize> = input
            .shape
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| bad(format!("dimension {d} is too large"))))
            .collect::<Result<_, _>>()?;
        let count = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
        let binary_size = match input.parameters.get("binary_data_size") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .or_else(|| {
                        v.as_f64()
                            .filter(|f| f.fract() == 0.0 && (0.0..1e19).contains(f))
                            .map(|f| f as u64)
                    })
                    .ok_or_else(|| {
                        framing("binary_data_size must be a whole number of bytes".into())
                    })? as usize,
            ),
        };
        let data = match (binary_size, input.data.take()) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "has both inline data and binary_data_size; send one".into()
                ))
            }
            (None, None) => return Err(bad("has no data".into())),
            (Some(size), None) => {
                let want = count.saturating_mul(datatype.size());
                if size != want {
                    return Err(bad(format!(
                        "binary_data_size is {size} bytes but shape {shape:?} of {} needs {want}",
                        datatype.as_str()
                    )));
                }
                let end = offset + size;
                let bytes = binary.get(offset..end).ok_or_else(|| {
                    bad(format!(
                        "the body has {} binary bytes; this input needs bytes {offset}..{end}",
                        binary.len()
                    ))
                })?;
                offset = end;
                from_bytes(bytes, datatype)
            }
            (None, Some(numbers)) => {
                if numbers.0.len() != count {
                    return Err(bad(format!(
                        "shape {shape:?} has {count} elements but data has {}",
                        numbers.0.len()
                    )));
                }
                from_numbers(&numbers.0, datatype).map_err(bad)?
            }
        };
        out.push(checked(Input {
            name: input.name.clone(),
            shape,
            datatype,
            data,
        })?);
    }
    if offset != binary.len() {
        return Err(ApiError::Malformed(format!(
            "the body carries {} binary bytes but the inputs' binary_data_size add up to {offset}",
            binary.len()
        )));
    }
    Ok(out)
}

/// `input` if its element count matches its shape and its floats are finite (422 if not).
pub fn checked(input: Input) -> Result<Input, ApiError> {
    let name = &input.name;
    let count: Option<usize> = input
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d));
    let len = match &input.data {
        Data::F32(v) => v.len(),
        Data::F64(v) => v.len(),
        Data::Int(v) => v.len(),
    };
    if count != Some(len) {
        return Err(ApiError::Invalid(format!(
            "input {name:?}: shape {:?} does not hold the {len} elements sent",
            input.shape
        )));
    }
    if let Data::F32(v) = &input.data {
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(ApiError::Invalid(format!(
                "input {name:?}: element {i} is not a finite number"
            )));
        }
    }
    Ok(input)
}

/// Little-endian bytes of `t` as values; `b`'s length is a whole number of elements.
pub fn from_bytes(b: &[u8], t: DataType) -> Data {
    fn chunks<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        b.chunks_exact(N)
            .map(|c| c.try_into().expect("exact chunk"))
    }
    match t {
        DataType::Fp32 => Data::F32(chunks(b).map(f32::from_le_bytes).collect()),
        DataType::Fp64 => Data::F64(chunks(b).map(f64::from_le_bytes).collect()),
        DataType::Int32 => Data::Int(chunks(b).map(|c| i32::from_le_bytes(c) as i128).collect()),
        DataType::Int64 => Data::Int(chunks(b).map(|c| i64::from_le_bytes(c) as i128).collect()),
        DataType::Uint32 => Data::Int(chunks(b).map(|c| u32::from_le_bytes(c) as i128).collect()),
        DataType::Uint64 => Data::Int(chunks(b).map(|c| u64::from_le_bytes(c) as i128).collect()),
    }
}

fn from_numbers(n: &[Number], t: DataType) -> Result<Data, String> {
    let float = |x: &Number| match *x {
        Number::U(u) => Ok(u as f64),
        Number::I(i) => Ok(i as f64),
        Number::F(f) => Ok(f),
        Number::B(_) => Err(format!("a boolean in {} data", t.as_str())),
    };
    Ok(match t {
        DataType::Fp32 => Data::F32(
            n.iter()
                .map(|x| {
                    let v = float(x)?;
                    if v.is_finite() && !(v as f32).is_finite() {
                        return Err(format!("{v} is outside the float32 range"));
                    }
                    Ok(v as f32)
                })
                .collect::<Result<_, _>>()?,
        ),
        DataType::Fp64 => Data::F64(n.iter().map(float).collect::<Result<_, _>>()?),
        _ => {
            let (lo, hi): (i128, i128) = match t {
                DataType::Int32 => (i32::MIN as i128, i32::MAX as i128),
                DataType::Int64 => (i64::MIN as i128, i64::MAX as i128),
                DataType::Uint32 => (0, u32::MAX as i128),
                _ => (0, u64::MAX as i128),
            };
            Data::Int(
                n.iter()
                    .map(|x| {
                        let v = match *x {
                            Number::U(u) => u as i128,
                            Number::I(i) => i as i128,
                            _ => return Err(format!("{x:?} is not an integer")),
                        };
                        if !(lo..=hi).contains(&v) {
                            return Err(format!("{v} is outside the {} range", t.as_str()));
                        }
                        Ok(v)
                    })
                    .collect::<Result<_, _>>()?,
            )
        }
    })
}

/// Splits a request body into its JSON part and binary part, by the
/// `Inference-Header-Content-Length` header (absent: all JSON).
pub fn split_body<'a>(
    body: &'a [u8],
    header_length: Option<&str>,
) -> Result<(&'a [u8], &'a [u8]), ApiError> {
    let Some(h) = header_length else {
        return Ok((body, &[]));
    };
    let n: usize = h.trim().parse().map_err(|_| {
        ApiError::Malformed(format!(
            "Inference-Header-Content-Length must be a byte count, got {h:?}"
        ))
    })?;
    if n > body.len() {
        return Err(ApiError::Malformed(format!(
            "Inference-Header-Content-Length is {n} but the body has {} bytes",
            body.len()
        )));
    }
    Ok(body.split_at(n))
}

/// An output tensor's values.
pub enum OutData<'a> {
    /// float32, borrowed from the engine's outputs.
    F32(&'a [f32]),
    /// float64.
    F64(&'a [f64]),
}

/// One output of a response.
pub struct Output<'a> {
    /// Its name.
    pub name: &'static str,
    /// Its shape, batch dimension first.
    pub shape: Vec<usize>,
    /// Its values.
    pub data: OutData<'a>,
    /// Sent as raw bytes after the JSON part.
    pub binary: bool,
}

#[derive(Serialize)]
struct OutputHeader<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [usize],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinarySize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData<'a>>,
}

#[derive(Serialize)]
struct BinarySize {
    binary_data_size: usize,
}

#[derive(Serialize)]
#[serde(untagged)]
enum JsonData<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

#[derive(Serialize)]
struct ResponseHeader<'a> {
    model_name: &'a str,
    model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
    outputs: Vec<OutputHeader<'a>>,
}

/// A response body (with response `parameters`, if any), and the length of its JSON part
/// when binary outputs follow it.
pub fn encode_response(
    model_name: &str,
    version: u64,
    id: Option<&str>,
    outputs: &[Output],
    parameters: Option<Value>,
) -> (Vec<u8>, Option<usize>) {
    let headers = outputs
        .iter()
        .map(|o| {
            let (datatype, size, data) = match &o.data {
                OutData::F32(v) => ("FP32", v.len() * 4, JsonData::F32(v)),
                OutData::F64(v) => ("FP64", v.len() * 8, JsonData::F64(v)),
            };
            OutputHeader {
                name: o.name,
                datatype,
                shape: &o.shape,
                parameters: o.binary.then_some(BinarySize {
                    binary_data_size: size,
                }),
                data: (!o.binary).then_some(data),
            }
        })
        .collect();
    let header = ResponseHeader {
        model_name,
        model_version: version.to_string(),
        id,
        parameters,
        outputs: headers,
    };
    let numbers: usize = outputs
        .iter()
        .map(|o| o.shape.iter().product::<usize>())
        .sum();
    let mut body = Vec::with_capacity(256 + 12 * numbers);
    serde_json::to_writer(&mut body, &header).expect("responses serialise");
    if !outputs.iter().any(|o| o.binary) {
        return (body, None);
    }
    let json_len = body.len();
    for o in outputs.iter().filter(|o| o.binary) {
        match &o.data {
            OutData::F32(v) => v
                .iter()
                .for_each(|x| body.extend_from_slice(&x.to_le_bytes())),
            OutData::F64(v) => v
                .iter()
                .for_each(|x| body.extend_from_slice(&x.to_le_bytes())),
        }
    }
    (body, Some(json_len))
}

/// 422 unless `binary_data_output` and each output's `binary_data` are booleans (or null,
/// or absent): a flag the server would otherwise read as false.
pub fn check_binary_flags(header: &InferHeader) -> Result<(), ApiError> {
    let bad = |v: &Value| !(v.is_boolean() || v.is_null());
    if let Some(v) = header
        .parameters
        .get("binary_data_output")
        .filter(|v| bad(v))
    {
        return Err(ApiError::Invalid(format!(
            "parameters.binary_data_output must be true or false, got {v}"
        )));
    }
    for (i, o) in header.outputs.iter().flatten().enumerate() {
        if let Some(v) = o.parameters.get("binary_data").filter(|v| bad(v)) {
            return Err(ApiError::Invalid(format!(
                "outputs[{i}].parameters.binary_data must be true or false, got {v}"
            )));
        }
    }
    Ok(())
}

/// Whether the request asks for output `name` as binary: its own `binary_data` parameter, else
/// the request's `binary_data_output`.
pub fn wants_binary(header: &InferHeader, name: &str) -> bool {
    let own = header
        .outputs
        .iter()
        .flatten()
        .find(|o| o.name == name)
        .and_then(|o| o.parameters.get("binary_data"))
        .and_then(Value::as_bool);
    own.unwrap_or_else(|| {
        header
            .parameters
            .get("binary_data_output")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    })
}
