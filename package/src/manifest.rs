//! The `flow.json` schema.

use serde::{Deserialize, Serialize};

/// File name of the manifest inside a package folder.
pub const MANIFEST_FILE: &str = "flow.json";
/// File name of the data → latent graph.
pub const ENCODE_FILE: &str = "encode.onnx";
/// File name of the latent → data graph.
pub const DECODE_FILE: &str = "decode.onnx";

/// The graph signature's value names, written once: every exporter, loader and runner
/// takes them from here.
pub mod signature {
    /// Data: the input of `encode.onnx` and the output of `decode.onnx`.
    pub const DATA: &str = "x";
    /// The latent: the first output of `encode.onnx` and the input of `decode.onnx`.
    pub const LATENT: &str = "z";
    /// The exact log-density of each row: the second output of `encode.onnx`.
    pub const LOG_PROB: &str = "log_prob";
}

/// One of a package's two graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// data → latent and log_prob (`encode.onnx`).
    Encode,
    /// latent → data (`decode.onnx`).
    Decode,
}

impl Direction {
    /// Both, encode first.
    pub const BOTH: [Direction; 2] = [Direction::Encode, Direction::Decode];

    /// `encode` or `decode`, as file stems, logs and metric labels spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Encode => "encode",
            Direction::Decode => "decode",
        }
    }

    /// The position in [`Direction::BOTH`] (for per-graph arrays).
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Everything a server or a person needs to know about an exported flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format; [`crate::FORMAT_VERSION`] for packages this crate writes.
    pub format_version: u32,
    /// Informational model name (in a repository the folder name is what clients use).
    pub name: String,
    /// Informational version (in a repository the folder name is what counts).
    pub version: u64,
    /// Flow family: `nice`, `realnvp`, `glow`, `made`, `maf` or `iaf`.
    pub family: String,
    /// Shape of one example: `[D]` for tabular data, `[C, H, W]` for images.
    pub event_shape: Vec<usize>,
    /// Element type of every graph input and output; always `float32`.
    pub dtype: String,
    /// The base distribution of the latent.
    pub base: Base,
    /// The two graphs.
    pub graphs: Graphs,
    /// What a client must send.
    pub domain: Domain,
    /// Held-out quality.
    pub metrics: Metrics,
    /// Quantiles of held-out log-likelihoods, to turn a score into a percentile.
    pub calibration: Calibration,
    /// How the model was made.
    pub training: Training,
}

/// The base density of the latent space.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Base {
    /// N(0, I) over the whole event.
    StandardNormal,
}

/// The package's two directions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Graphs {
    /// data → latent and log_prob: input `x`, outputs `z`, `log_prob` ([`signature`]).
    pub encode: Graph,
    /// latent → data: input `z`, output `x` ([`signature`]).
    pub decode: Graph,
}

impl Graphs {
    /// The graph of one direction.
    pub fn get(&self, d: Direction) -> &Graph {
        match d {
            Direction::Encode => &self.encode,
            Direction::Decode => &self.decode,
        }
    }

    /// The package signatures for `event`: `encode.onnx` maps `x[N, ...event]` to
    /// `z[N, ...event], log_prob[N]`, `decode.onnx` maps `z` to `x`.
    pub fn standard(
        event: &[usize],
        encode_sha256: String,
        decode_sha256: String,
        cost: [Cost; 2],
    ) -> Graphs {
        Graphs {
            encode: Graph {
                file: ENCODE_FILE.into(),
                sha256: encode_sha256,
                inputs: vec![TensorSpec::batched(signature::DATA, event)],
                outputs: vec![
                    TensorSpec::batched(signature::LATENT, event),
                    TensorSpec::batched(signature::LOG_PROB, &[]),
                ],
                cost: cost[0],
            },
            decode: Graph {
                file: DECODE_FILE.into(),
                sha256: decode_sha256,
                inputs: vec![TensorSpec::batched(signature::LATENT, event)],
                outputs: vec![TensorSpec::batched(signature::DATA, event)],
                cost: cost[1],
            },
        }
    }
}

/// One ONNX graph file and its signature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Graph {
    /// File name relative to the package folder.
    pub file: String,
    /// Lower-case hex sha256 of the file's bytes.
    pub sha256: String,
    /// Graph inputs in order.
    pub inputs: Vec<TensorSpec>,
    /// Graph outputs in order.
    pub outputs: Vec<TensorSpec>,
    /// How the graph's run time grows with the event size.
    pub cost: Cost,
}

/// How expensive a direction is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cost {
    /// One pass through the network, whatever the dimension.
    OnePass,
    /// One pass per dimension (autoregressive inversion).
    Sequential,
}

/// Name and shape of a graph input or output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    /// The ONNX value name.
    pub name: String,
    /// Dimensions; the first is the dynamic batch axis.
    pub shape: Vec<Dim>,
}

/// A dimension: the dynamic batch axis (`"N"` in JSON) or a fixed size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    /// A fixed size.
    Fixed(usize),
    /// A named dynamic size; the batch axis is `"N"`.
    Dynamic(String),
}

impl TensorSpec {
    /// The dimensions after the batch axis (dynamic ones count as 1).
    pub fn event(&self) -> Vec<usize> {
        self.shape
            .iter()
            .skip(1)
            .map(|d| match d {
                Dim::Fixed(n) => *n,
                Dim::Dynamic(_) => 1,
            })
            .collect()
    }

    /// A tensor of shape `[N, ...event]`.
    pub fn batched(name: &str, event: &[usize]) -> Self {
        let mut shape = vec![Dim::Dynamic("N".into())];
        shape.extend(event.iter().map(|&d| Dim::Fixed(d)));
        TensorSpec {
            name: name.into(),
            shape,
        }
    }
}

/// What a client sends: named features for tabular models, a pixel range for images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Domain {
    /// Feature names, in row order (tabular models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<Vec<String>>,
    /// Features recorded on a grid (integers, or a fixed number of decimals), which were
    /// dequantised in training with uniform noise of one grid step centred on each value:
    /// log_prob of a grid value is the density at the centre of its cell.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quantized: Vec<Quantized>,
    /// Smallest and largest value seen per feature in training, as a hint for clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_range: Option<Vec<[f64; 2]>>,
    /// Inclusive pixel range (image models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixel_range: Option<[f64; 2]>,
}

/// A feature recorded on a grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quantized {
    /// Feature name.
    pub feature: String,
    /// Grid step (1 for integers, 0.01 for two decimals).
    pub step: f64,
}

/// Held-out negative log-likelihoods, in nats per example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Mean NLL on the validation split.
    pub validation_nll: Option<f64>,
    /// Mean NLL on the test split.
    pub test_nll: Option<f64>,
    /// Test NLL in bits per dimension, for integer-valued (dequantised) data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_bits_per_dim: Option<f64>,
}

/// Quantiles of log_prob on held-out data (the test split), as served by `encode.onnx`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Which data the quantiles come from.
    pub split: String,
    /// How many examples.
    pub count: usize,
    /// Ascending quantiles.
    pub quantiles: Vec<Quantile>,
}

/// One point of the held-out log_prob distribution.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quantile {
    /// Probability level in [0, 1].
    pub q: f64,
    /// log_prob at that level.
    pub log_prob: f64,
}

impl Calibration {
    /// The fraction of held-out examples scoring at or below `log_prob`, interpolated
    /// linearly between the stored quantiles (0 below the first, 1 above the last).
    pub fn percentile(&self, log_prob: f64) -> Option<f64> {
        let qs = &self.quantiles;
        let first = qs.first()?;
        let last = qs.last()?;
        if log_prob <= first.log_prob {
            return Some(if log_prob < first.log_prob {
                0.0
            } else {
                first.q
            });
        }
        if log_prob >= last.log_prob {
            return Some(if log_prob > last.log_prob {
                1.0
            } else {
                last.q
            });
        }
        qs.windows(2).find_map(|w| {
            let (a, b) = (w[0], w[1]);
            (log_prob >= a.log_prob && log_prob <= b.log_prob).then(|| {
                let span = b.log_prob - a.log_prob;
                if span <= 0.0 {
                    b.q
                } else {
                    a.q + (b.q - a.q) * (log_prob - a.log_prob) / span
                }
            })
        })
    }
}

/// Provenance of the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Training {
    /// Dataset name or path.
    pub dataset: String,
    /// The seed every random choice came from.
    pub seed: u64,
    /// Optimiser steps taken.
    pub steps: u64,
    /// The step whose parameters were kept (early stopping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_step: Option<u64>,
    /// The full training configuration.
    pub config: serde_json::Value,
    /// Version of flowtrain that trained and exported it.
    pub flowtrain_version: String,
}
