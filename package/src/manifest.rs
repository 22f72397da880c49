//! The `flow.json` schema.

use serde::{Deserialize, Serialize};

/// File name of the manifest inside a package folder.
pub const MANIFEST_FILE: &str = "flow.json";
/// File name of the data → latent graph.
pub const ENCODE_FILE: &str = "encode.onnx";
/// File name of the latent → data graph.
pub const DECODE_FILE: &str = "decode.onnx";
/// File name of the reference set ([`crate::ReferenceSet`]).
pub const REFERENCE_FILE: &str = "reference.bin";

/// The graph signature's value names, written once: every exporter, loader and runner
/// takes them from here.
pub mod signature {
    /// Data: the input of `encode.onnx` and the output of `decode.onnx`.
    pub const DATA: &str = "x";
    /// The latent: the first output of `encode.onnx` and the input of `decode.onnx`.
    pub const LATENT: &str = "z";
    /// The exact log-density of each row: the second output of `encode.onnx`.
    pub const LOG_PROB: &str = "log_prob";
    /// Per-feature terms summing to `log_prob`: the third output of `encode.onnx` for models
    /// with exact contributions ([`crate::Contributions::Exact`]).
    pub const LOG_PROB_TERMS: &str = "log_prob_terms";
    /// The context of a conditional flow: the second input of both graphs
    /// ([`crate::ContextSpec`]).
    pub const CONTEXT: &str = "context";
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
    /// The context of a conditional flow p(x | c): both graphs then take it as a second
    /// input. Absent for unconditional flows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<crate::ContextSpec>,
    /// What a client must send.
    pub domain: Domain,
    /// Held-out quality.
    pub metrics: Metrics,
    /// The log-densities of normal rows, to turn a score into a tail probability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<Reference>,
    /// Outlier threshold and per-feature explanations.
    #[serde(default)]
    pub scoring: Scoring,
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
    /// `z[N, ...event], log_prob[N]` (and `log_prob_terms[N, D]` when `terms`),
    /// `decode.onnx` maps `z` to `x`; with `context` values per row (a conditional flow),
    /// both also take `context[N, context]` as their second input.
    pub fn standard(
        event: &[usize],
        encode_sha256: String,
        decode_sha256: String,
        cost: [Cost; 2],
        terms: bool,
        context: usize,
    ) -> Graphs {
        let inputs = |first: &str| {
            let mut v = vec![TensorSpec::batched(first, event)];
            if context > 0 {
                v.push(TensorSpec::batched(signature::CONTEXT, &[context]));
            }
            v
        };
        let mut outputs = vec![
            TensorSpec::batched(signature::LATENT, event),
            TensorSpec::batched(signature::LOG_PROB, &[]),
        ];
        if terms {
            let d: usize = event.iter().product();
            outputs.push(TensorSpec::batched(signature::LOG_PROB_TERMS, &[d]));
        }
        Graphs {
            encode: Graph {
                file: ENCODE_FILE.into(),
                sha256: encode_sha256,
                inputs: inputs(signature::DATA),
                outputs,
                cost: cost[0],
            },
            decode: Graph {
                file: DECODE_FILE.into(),
                sha256: decode_sha256,
                inputs: inputs(signature::LATENT),
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

/// The reference set of normal rows whose log-densities turn a score into a tail
/// probability (see [`crate::ReferenceSet`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    /// File name relative to the package folder ([`REFERENCE_FILE`]).
    pub file: String,
    /// Lower-case hex sha256 of the file's bytes.
    pub sha256: String,
    /// How many rows were scored.
    pub count: u64,
    /// Whether every row's log-density is stored (else a geometric sketch of the ranks).
    pub exact: bool,
    /// What the rows were: a split of the training data or a file given to `calibrate`.
    pub source: String,
}

/// How `/score` decides and explains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scoring {
    /// The tail probability at or below which a row is an outlier when a request gives none.
    pub threshold: f64,
    /// Whether the encode graph gives exact per-feature log-density terms.
    pub contributions: Contributions,
}

impl Default for Scoring {
    fn default() -> Self {
        Scoring {
            threshold: DEFAULT_THRESHOLD,
            contributions: Contributions::Unavailable {
                reason: "not exported".into(),
            },
        }
    }
}

/// The default outlier threshold: a tail probability of 1 %.
pub const DEFAULT_THRESHOLD: f64 = 0.01;

/// Per-feature terms of log p(x), or why a model has none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Contributions {
    /// `encode.onnx` has a third output, `log_prob_terms[N, D]`: term i is
    /// log p(xᵢ | the features before i in `order`), and the terms sum to `log_prob`.
    Exact {
        /// Feature indices in the order the model conditions on them.
        order: Vec<usize>,
    },
    /// No exact decomposition (couplings mix features both ways, or autoregressive layers
    /// use different orders); the sentence says which.
    Unavailable {
        /// Why, for a person.
        reason: String,
    },
}

impl Contributions {
    /// The conditioning order when the terms are exact.
    pub fn order(&self) -> Option<&[usize]> {
        match self {
            Contributions::Exact { order } => Some(order),
            Contributions::Unavailable { .. } => None,
        }
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
