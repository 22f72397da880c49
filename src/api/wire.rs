//! Wire types: request bodies (parsed straight into flat f32 rows, with the path of any bad
//! element) and response bodies (rows nested back into the event shape).

use std::fmt;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap};
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

use super::error::ApiError;

/// Deepest nesting a row may have ([C][H][W] is 3).
const MAX_ROW_DEPTH: usize = 4;

/// Rows sent by a client: values flattened row-major, and the shape of one row.
#[derive(Debug, Default)]
pub struct Rows {
    /// `count × row size` values.
    pub values: Vec<f32>,
    /// Number of rows.
    pub count: usize,
    /// Shape of each row (`[D]` or `[C, H, W]`).
    pub row_shape: Vec<usize>,
}

struct Element<'a> {
    out: &'a mut Vec<f32>,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Element<'_> {
    /// The shape of the element.
    type Value = Vec<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<usize>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Element<'_> {
    type Value = Vec<usize>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number or an array of numbers")
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Vec<usize>, E> {
        if !v.is_finite() || v.abs() > f32::MAX as f64 {
            return Err(E::custom(format!("{v} is outside the float32 range")));
        }
        self.out.push(v as f32);
        Ok(Vec::new())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Vec<usize>, E> {
        self.visit_f64(v as f64)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Vec<usize>, E> {
        self.visit_f64(v as f64)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<usize>, A::Error> {
        if self.depth >= MAX_ROW_DEPTH {
            return Err(de::Error::custom(format!(
                "arrays nested deeper than {MAX_ROW_DEPTH} levels"
            )));
        }
        let mut first: Option<Vec<usize>> = None;
        let mut n = 0;
        while let Some(shape) = seq.next_element_seed(Element {
            out: &mut *self.out,
            depth: self.depth + 1,
        })? {
            match &first {
                None => first = Some(shape),
                Some(f) if *f != shape => {
                    return Err(de::Error::custom(format!(
                        "ragged array: this element has shape {shape:?}, the first one {f:?}"
                    )))
                }
                Some(_) => {}
            }
            n += 1;
        }
        let mut shape = vec![n];
        shape.extend(first.unwrap_or_default());
        Ok(shape)
    }
}

impl<'de> Deserialize<'de> for Rows {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Rows, D::Error> {
        struct RowsVisitor;
        impl<'de> Visitor<'de> for RowsVisitor {
            type Value = Rows;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of rows")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Rows, A::Error> {
                let mut rows = Rows::default();
                let mut first: Option<Vec<usize>> = None;
                while let Some(shape) = seq.next_element_seed(Element {
                    out: &mut rows.values,
                    depth: 1,
                })? {
                    match &first {
                        None => first = Some(shape),
                        Some(f) if *f != shape => {
                            return Err(de::Error::custom(format!(
                                "row {} has shape {shape:?} but row 0 has {f:?}",
                                rows.count
                            )))
                        }
                        Some(_) => {}
                    }
                    rows.count += 1;
                }
                rows.row_shape = first.unwrap_or_default();
                Ok(rows)
            }
        }
        d.deserialize_seq(RowsVisitor)
    }
}

/// `/log_prob` and `/encode`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputsRequest {
    /// Model name (default model when absent).
    pub model: Option<String>,
    /// Data rows.
    pub inputs: Rows,
}

/// `/decode`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatentsRequest {
    /// Model name.
    pub model: Option<String>,
    /// Latent rows.
    pub latents: Rows,
}

/// `/sample`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleRequest {
    /// Model name.
    pub model: Option<String>,
    /// How many samples.
    pub num_samples: i64,
    /// Standard deviation multiplier of the base distribution (default 1).
    pub temperature: Option<f64>,
    /// Seed of the latent noise (default: fresh entropy, returned).
    pub seed: Option<u64>,
    /// `json` (the samples as numbers, default) or `png` (image models: a picture of the
    /// samples in a grid, base64 in JSON, or the PNG itself with `Accept: image/png`).
    pub format: Option<SampleFormat>,
}

/// How `/sample` returns its samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SampleFormat {
    /// Nested arrays of numbers.
    Json,
    /// A PNG grid of the images.
    Png,
}

/// A request body that may name its model.
pub trait NamesModel {
    /// The `model` field.
    fn model(&self) -> Option<&str>;
}

macro_rules! names_model {
    ($($t:ty),*) => {$(impl NamesModel for $t {
        fn model(&self) -> Option<&str> {
            self.model.as_deref()
        }
    })*};
}
names_model!(InputsRequest, LatentsRequest, SampleRequest);

/// Reads and parses a JSON body: 415 unless it is JSON, 413 past `limit` bytes, 400 for
/// malformed JSON, 422 (naming the field) for values of the wrong type or shape.
pub async fn parse_json<T: for<'de> Deserialize<'de>>(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<T, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if !(mime.eq_ignore_ascii_case("application/json")
        || mime.to_ascii_lowercase().ends_with("+json"))
    {
        let got = if ct.is_empty() {
            "none".to_string()
        } else {
            format!("{ct:?}")
        };
        return Err(ApiError::unsupported_media_type(format!(
            "send the body as JSON with Content-Type: application/json (got {got})"
        )));
    }
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
    {
        if len > limit {
            return Err(ApiError::too_large(format!(
                "the body has {len} bytes; the limit is {limit}"
            )));
        }
    }
    let bytes: Bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::too_large(format!(
            "the body is larger than the limit of {limit} bytes"
        ))
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::malformed("the body is empty; send a JSON object"));
    }
    // The fast path parses directly; only a failed parse is repeated with path tracking,
    // so the error can name the element (`inputs[3][1]`).
    match serde_json::from_slice::<T>(&bytes) {
        Ok(value) => Ok(value),
        Err(_) => Err(explain::<T>(&bytes)),
    }
}

/// Re-parses a body that failed, to say where and why.
fn explain<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> ApiError {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let e = match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(_) => {
            return match de.end() {
                Ok(()) => ApiError::malformed("malformed JSON"),
                Err(e) => ApiError::malformed(format!("malformed JSON: {e}")),
            }
        }
        Err(e) => e,
    };
    let path = e.path().to_string();
    let inner = e.into_inner();
    let msg = inner.to_string();
    let at = if path == "." || path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    };
    use serde_json::error::Category;
    match inner.classify() {
        _ if msg.starts_with("number out of range") => ApiError::invalid(format!(
            "{at}a number is outside the float64 range ({msg}); values must be finite float32"
        )),
        _ if msg.starts_with("recursion limit exceeded") => {
            ApiError::invalid(format!("{at}arrays are nested too deeply"))
        }
        Category::Data => ApiError::invalid(format!("{at}{msg}")),
        Category::Syntax | Category::Eof | Category::Io => ApiError::malformed(format!(
            "malformed JSON: {msg} (JSON has no NaN or Infinity; send finite numbers)"
        )),
    }
}

/// Rows of `data` nested by `event_shape`, for responses.
pub struct RowsOut<'a> {
    /// Row-major values.
    pub data: &'a [f32],
    /// Shape of one row.
    pub event_shape: &'a [usize],
}

struct Nested<'a> {
    data: &'a [f32],
    shape: &'a [usize],
}

impl Serialize for Nested<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (n, rest) = self.shape.split_first().expect("non-empty shape");
        let mut seq = s.serialize_seq(Some(*n))?;
        if rest.is_empty() {
            for v in self.data {
                seq.serialize_element(v)?;
            }
        } else {
            let step: usize = rest.iter().product();
            for chunk in self.data.chunks(step) {
                seq.serialize_element(&Nested {
                    data: chunk,
                    shape: rest,
                })?;
            }
        }
        seq.end()
    }
}

impl Serialize for RowsOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let size: usize = self.event_shape.iter().product();
        let rows = self.data.len() / size.max(1);
        let mut seq = s.serialize_seq(Some(rows))?;
        for chunk in self.data.chunks(size.max(1)) {
            seq.serialize_element(&Nested {
                data: chunk,
                shape: self.event_shape,
            })?;
        }
        seq.end()
    }
}
