//! Wire types: request bodies (parsed straight into flat f32 rows, with the path of any bad
//! element) and response bodies (rows nested back into the event shape).

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

/// Deepest nesting a row may have ([C][H][W] is 3).
const MAX_ROW_DEPTH: usize = 4;

/// Rows sent by a client: values flattened row-major, and the shape of one row.
#[derive(Debug, Default)]
pub struct Rows {
    /// `count × row size` values.
    pub values: Vec<f32>,
    /// Number of rows.
    pub count: usize,
    /// Shape of each row (`[D]` or `[C, H, W]`; empty for bare numbers).
    pub row_shape: Vec<usize>,
}

/// The shape of a parsed element, without allocating: `dims[..len]`.
#[derive(Debug, Clone, Copy, Default)]
struct Shape {
    dims: [usize; MAX_ROW_DEPTH + 1],
    len: usize,
}

impl PartialEq for Shape {
    /// Compares `dims[..len]` only (a number's shape is empty: nothing to compare).
    fn eq(&self, other: &Shape) -> bool {
        self.len == other.len && self.as_slice() == other.as_slice()
    }
}

impl Shape {
    fn as_slice(&self) -> &[usize] {
        &self.dims[..self.len]
    }

    /// `[n, ...inner]`.
    fn outer(n: usize, inner: Shape) -> Shape {
        let mut s = Shape {
            len: inner.len + 1,
            ..Shape::default()
        };
        s.dims[0] = n;
        s.dims[1..=inner.len].copy_from_slice(inner.as_slice());
        s
    }
}

/// One element of a request's array at `depth` (0: the array of rows itself): numbers go
/// straight into `out`; the value is the element's shape.
struct Element<'a> {
    out: &'a mut Vec<f32>,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Element<'_> {
    type Value = Shape;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Shape, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Element<'_> {
    type Value = Shape;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(if self.depth == 0 {
            "an array of rows"
        } else {
            "a number or an array of numbers"
        })
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Shape, E> {
        if self.depth == 0 {
            return Err(E::invalid_type(de::Unexpected::Float(v), &self));
        }
        // Whether it rounds to a finite float32: f32::MAX as printed by a shortest-round-trip
        // printer may parse a hair above it.
        if !(v as f32).is_finite() {
            return Err(E::custom(format!("{v} is outside the float32 range")));
        }
        self.out.push(v as f32);
        Ok(Shape::default())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Shape, E> {
        self.visit_f64(v as f64)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Shape, E> {
        self.visit_f64(v as f64)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        if self.depth >= MAX_ROW_DEPTH {
            return Err(de::Error::custom(format!(
                "a row has arrays nested deeper than [C][H][W] ({} levels)",
                MAX_ROW_DEPTH - 1
            )));
        }
        let mut first: Option<Shape> = None;
        let mut n = 0;
        while let Some(shape) = seq.next_element_seed(Element {
            out: &mut *self.out,
            depth: self.depth + 1,
        })? {
            match first {
                None => first = Some(shape),
                Some(f) if f != shape => {
                    let (got, want) = (shape.as_slice(), f.as_slice());
                    return Err(de::Error::custom(if self.depth == 0 {
                        format!("row {n} has shape {got:?} but row 0 has {want:?}")
                    } else {
                        format!(
                            "ragged array: this element has shape {got:?}, the first one {want:?}"
                        )
                    }));
                }
                Some(_) => {}
            }
            n += 1;
        }
        Ok(Shape::outer(n, first.unwrap_or_default()))
    }
}

impl<'de> Deserialize<'de> for Rows {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Rows, D::Error> {
        let mut values = Vec::new();
        let shape = d.deserialize_seq(Element {
            out: &mut values,
            depth: 0,
        })?;
        let (count, row) = shape
            .as_slice()
            .split_first()
            .expect("an array has a length");
        Ok(Rows {
            values,
            count: *count,
            row_shape: row.to_vec(),
        })
    }
}

/// A JSON Schema `integer`: `3` or `3.0` (JSON does not tell them apart, and clients in
/// languages with one number type send either), never `3.5`; out of `T`'s range is refused
/// with the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Whole<T>(pub T);

impl<'de, T: TryFrom<i128>> Deserialize<'de> for Whole<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Whole<T>, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = i128;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a whole number")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<i128, E> {
                Ok(v.into())
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<i128, E> {
                Ok(v.into())
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<i128, E> {
                if v.fract() == 0.0 && v.abs() < 1e38 {
                    Ok(v as i128)
                } else {
                    Err(E::invalid_type(de::Unexpected::Float(v), &self))
                }
            }
        }
        let v = d.deserialize_any(V)?;
        T::try_from(v).map(Whole).map_err(|_| {
            de::Error::custom(format!(
                "{v} is out of range (a whole number that fits {})",
                std::any::type_name::<T>()
            ))
        })
    }
}

/// `#[serde(deserialize_with)]` for an integer field (see [`Whole`]).
pub fn whole<'de, D: Deserializer<'de>, T: TryFrom<i128>>(d: D) -> Result<T, D::Error> {
    Whole::deserialize(d).map(|Whole(v)| v)
}

/// `#[serde(default, deserialize_with)]` for an optional integer field (`null`: absent).
pub fn optional_whole<'de, D: Deserializer<'de>, T: TryFrom<i128>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Option::<Whole<T>>::deserialize(d).map(|o| o.map(|Whole(v)| v))
}

/// `#[serde(deserialize_with)]` for an array of integers (see [`Whole`]).
pub fn whole_list<'de, D: Deserializer<'de>, T: TryFrom<i128>>(d: D) -> Result<Vec<T>, D::Error> {
    Vec::<Whole<T>>::deserialize(d).map(|v| v.into_iter().map(|Whole(x)| x).collect())
}

/// `/log_prob` and `/encode`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputsRequest {
    /// Model name (default model when absent).
    pub model: Option<String>,
    /// Data rows.
    pub inputs: Rows,
    /// A conditional model's context, one row per input row.
    pub context: Option<serde_json::Value>,
}

/// `/decode`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatentsRequest {
    /// Model name.
    pub model: Option<String>,
    /// Latent rows.
    pub latents: Rows,
    /// A conditional model's context, one row per latent row.
    pub context: Option<serde_json::Value>,
}

/// `/sample`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleRequest {
    /// Model name.
    pub model: Option<String>,
    /// How many samples.
    #[serde(deserialize_with = "whole")]
    pub num_samples: i64,
    /// Standard deviation multiplier of the base distribution (default 1).
    pub temperature: Option<f64>,
    /// Seed of the latent noise (default: fresh entropy, returned).
    #[serde(default, deserialize_with = "optional_whole")]
    pub seed: Option<u64>,
    /// `json` (the samples as numbers, default) or `png` (image models: a picture of the
    /// samples in a grid, base64 in JSON, or the PNG itself with `Accept: image/png`).
    pub format: Option<SampleFormat>,
    /// A conditional model's context: one row for every sample, or one per sample.
    pub context: Option<serde_json::Value>,
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

/// `/log_prob`'s answer.
#[derive(Serialize)]
pub struct LogProbOut<'a> {
    /// The model that answered.
    pub model: &'a str,
    /// Its version.
    pub version: u64,
    /// log p(x) per row, in nats.
    pub log_prob: &'a [f32],
}

/// `/encode`'s answer.
#[derive(Serialize)]
pub struct EncodeOut<'a> {
    /// The model that answered.
    pub model: &'a str,
    /// Its version.
    pub version: u64,
    /// z per row, shaped like the inputs.
    pub latents: RowsOut<'a>,
    /// log p(x) per row, in nats.
    pub log_prob: &'a [f32],
}

/// `/decode`'s and `/sample`'s answer as numbers.
#[derive(Serialize)]
pub struct SamplesOut<'a> {
    /// The model that answered.
    pub model: &'a str,
    /// Its version.
    pub version: u64,
    /// x per row, shaped by the event shape.
    pub samples: RowsOut<'a>,
    /// The seed of the latent noise (`/sample`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// The temperature it was drawn at (`/sample`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
}

/// `/sample`'s answer as a picture, inside JSON.
#[derive(Serialize)]
pub struct PictureOut<'a> {
    /// The model that answered.
    pub model: &'a str,
    /// Its version.
    pub version: u64,
    /// Always `png`.
    pub format: &'static str,
    /// The PNG file, base64.
    pub png: String,
    /// Samples per grid row.
    pub columns: usize,
    /// The seed of the latent noise.
    pub seed: u64,
    /// The temperature it was drawn at.
    pub temperature: f64,
}

/// `/score`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreRequest {
    /// Model name (default model when absent).
    pub model: Option<String>,
    /// Data rows.
    pub inputs: Rows,
    /// A conditional model's context, one row per input row.
    pub context: Option<serde_json::Value>,
    /// Flag rows whose tail probability is at or below this (default: the model's).
    pub threshold: Option<f64>,
    /// Include per-feature terms when the model has them (default true).
    pub contributions: Option<bool>,
    /// Only the `top` most surprising features per row (default: all).
    #[serde(default, deserialize_with = "optional_whole")]
    pub top: Option<usize>,
}

/// `/score`'s answer: one object per row.
pub struct ScoreOut<'a> {
    /// The model that answered.
    pub model: &'a str,
    /// Its version.
    pub version: u64,
    /// Rows in the model's reference set: tail probabilities resolve down to 1/(n+1).
    pub reference_size: u64,
    /// The threshold applied.
    pub threshold: f64,
    /// log p(x) per row.
    pub log_prob: &'a [f32],
    /// Tail probability per row.
    pub tail_probability: &'a [f64],
    /// Row-major `[N, D]` terms, when asked for and available, with the feature names and
    /// how many to show per row.
    pub contributions: Option<(&'a [f32], &'a [String], usize)>,
}

struct RowScoreOut<'a> {
    log_prob: f32,
    tail_probability: f64,
    outlier: bool,
    contributions: Option<(&'a [f32], &'a [String], usize)>,
}

struct Contributions<'a>(&'a [f32], &'a [String], usize);

impl Serialize for Contributions<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let Contributions(terms, names, top) = *self;
        let order = crate::scoring::most_surprising(terms);
        let mut seq = s.serialize_seq(Some(order.len().min(top)))?;
        for i in order.into_iter().take(top) {
            struct Term<'a>(&'a str, f32);
            impl Serialize for Term<'_> {
                fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                    let mut m = s.serialize_map(Some(2))?;
                    m.serialize_entry("feature", self.0)?;
                    m.serialize_entry("log_prob", &self.1)?;
                    m.end()
                }
            }
            seq.serialize_element(&Term(&names[i], terms[i]))?;
        }
        seq.end()
    }
}

impl Serialize for RowScoreOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("log_prob", &self.log_prob)?;
        m.serialize_entry("tail_probability", &self.tail_probability)?;
        m.serialize_entry("outlier", &self.outlier)?;
        if let Some((terms, names, top)) = self.contributions {
            m.serialize_entry("contributions", &Contributions(terms, names, top))?;
        }
        m.end()
    }
}

struct RowScores<'a>(&'a ScoreOut<'a>);

impl Serialize for RowScores<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let o = self.0;
        let mut seq = s.serialize_seq(Some(o.log_prob.len()))?;
        for (i, (&lp, &p)) in o.log_prob.iter().zip(o.tail_probability).enumerate() {
            let contributions = o.contributions.map(|(terms, names, top)| {
                let d = names.len();
                (&terms[i * d..(i + 1) * d], names, top)
            });
            seq.serialize_element(&RowScoreOut {
                log_prob: lp,
                tail_probability: p,
                outlier: crate::scoring::is_outlier(p, o.threshold),
                contributions,
            })?;
        }
        seq.end()
    }
}

impl Serialize for ScoreOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(5))?;
        m.serialize_entry("model", self.model)?;
        m.serialize_entry("version", &self.version)?;
        m.serialize_entry("reference_size", &self.reference_size)?;
        m.serialize_entry("threshold", &self.threshold)?;
        m.serialize_entry("scores", &RowScores(self))?;
        m.end()
    }
}
