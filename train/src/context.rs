//! The context path of a conditional flow p(x | c): raw context values (a numeric column's
//! value, a categorical column's category index — what the graphs' `context` input takes)
//! → standardised numbers and one-hot categories → an optional learned embedding → what
//! every conditioner sees ([`crate::bijectors::Ctx::context`]). The candle pass and its ONNX
//! emission sit side by side, so the exported graphs encode a client's context exactly as
//! training did.

use candle_core::{DType, Result, Tensor};
use flowpack::{ContextKind, ContextSpec};

use crate::nn::{Activation, Net};
use crate::onnx::{Attr, Graph, Value};
use crate::params::Params;

/// ONNX's FLOAT element type, for `Cast`.
const ONNX_FLOAT: i64 = 1;

/// A conditional flow's context encoder (and embedding network, if configured).
pub struct ContextNet {
    /// The columns, as the manifest records them.
    pub spec: ContextSpec,
    embed: Option<Net>,
}

impl ContextNet {
    /// The encoder for `spec`; with `spec.embedding = Some(e)`, followed by a two-layer MLP
    /// (`encoded → e → e`, `activation` between) trained with the flow.
    pub fn new(p: &Params, spec: ContextSpec, activation: Activation) -> Result<Self> {
        if let Some(problem) = spec.problem() {
            candle_core::bail!("{problem}");
        }
        let embed = match spec.embedding {
            Some(e) => Some(Net::mlp(
                &p.pp("embedding"),
                &[spec.encoded_width(), e, e],
                activation,
                false,
            )?),
            None => None,
        };
        Ok(ContextNet { spec, embed })
    }

    /// Raw context values per row (the graphs' `context` input width).
    pub fn raw_width(&self) -> usize {
        self.spec.width()
    }

    /// Values per row the conditioners see.
    pub fn width(&self) -> usize {
        self.spec.embedding.unwrap_or(self.spec.encoded_width())
    }

    /// What the conditioners see for raw context rows `raw` (`[N, columns]`).
    pub fn forward(&self, raw: &Tensor) -> Result<Tensor> {
        let (_, w) = raw.dims2()?;
        if w != self.raw_width() {
            candle_core::bail!(
                "the context has {w} columns, the flow takes {}",
                self.raw_width()
            );
        }
        let mut parts = Vec::with_capacity(w);
        for (j, col) in self.spec.columns.iter().enumerate() {
            let v = raw.narrow(1, j, 1)?;
            parts.push(match &col.kind {
                ContextKind::Numeric { mean, std } => ((v - *mean)? / *std)?,
                ContextKind::Categorical { categories } => {
                    let k = categories.len();
                    let index = Tensor::arange(0u32, k as u32, raw.device())?
                        .to_dtype(DType::F32)?
                        .unsqueeze(0)?;
                    v.broadcast_eq(&index)?.to_dtype(DType::F32)?
                }
            });
        }
        let encoded = Tensor::cat(&parts, 1)?;
        match &self.embed {
            Some(net) => net.forward(&encoded),
            None => Ok(encoded),
        }
    }

    /// [`ContextNet::forward`] as ONNX nodes on the graph input `raw`.
    pub fn emit(&self, g: &mut Graph, raw: &Value) -> Result<Value> {
        let mut parts = Vec::with_capacity(self.raw_width());
        for (j, col) in self.spec.columns.iter().enumerate() {
            let v = g.slice(raw, 1, j, j + 1);
            parts.push(match &col.kind {
                ContextKind::Numeric { mean, std } => {
                    let m = g.scalar("context_mean", *mean as f32);
                    let s = g.scalar("context_inv_std", (1.0 / *std) as f32);
                    let centred = g.sub(&v, &m);
                    g.mul(&centred, &s)
                }
                ContextKind::Categorical { categories } => {
                    let index: Vec<f32> = (0..categories.len()).map(|i| i as f32).collect();
                    let index = g.constant("category_index", &index, &[categories.len()]);
                    let hit = g.op("Equal", &[&v, &index], vec![]);
                    g.op("Cast", &[&hit], vec![("to", Attr::Int(ONNX_FLOAT))])
                }
            });
        }
        let refs: Vec<&Value> = parts.iter().collect();
        let encoded = if refs.len() == 1 {
            parts[0].clone()
        } else {
            g.concat(&refs, 1)
        };
        match &self.embed {
            Some(net) => net.emit(g, &encoded, None),
            None => Ok(encoded),
        }
    }
}
