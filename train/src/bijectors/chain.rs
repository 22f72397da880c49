//! A chain of bijectors applied in order (data → latent): the one place where layers are
//! folded and their log-dets summed, used by flows and by multi-scale levels alike.

use candle_core::{Result, Tensor};
use flowpack::Cost;

use super::{zero_rows, Bijector, Ctx, Dependence, LogDet, LogDetSum};
use crate::onnx::{Graph, Value};

/// Bijectors applied in order by `encode`, in reverse by `decode`.
#[derive(Default)]
pub struct Chain(Vec<Box<dyn Bijector>>);

impl Chain {
    /// An empty chain (the identity).
    pub fn new() -> Self {
        Chain(Vec::new())
    }

    /// Appends `b` (applied after the layers already there when encoding).
    pub fn push(&mut self, b: impl Bijector + 'static) {
        self.0.push(Box::new(b));
    }

    /// Appends a boxed bijector.
    pub fn push_boxed(&mut self, b: Box<dyn Bijector>) {
        self.0.push(b);
    }

    /// Appends every layer of `other`.
    pub fn append(&mut self, other: Chain) {
        self.0.extend(other.0);
    }

    /// The layers, data → latent.
    pub fn layers(&self) -> &[Box<dyn Bijector>] {
        &self.0
    }

    /// The emitted encode graph's nodes with the log-dets summed but not finished, so a
    /// caller can add its own constant (the base density's) before the per-row parts.
    pub fn emit_encode_sum(&self, g: &mut Graph, x: &Value, sum: &mut LogDetSum) -> Result<Value> {
        let mut z = x.clone();
        for l in &self.0 {
            let (next, ld) = l.emit_encode(g, &z)?;
            z = next;
            sum.add(g, ld);
        }
        Ok(z)
    }
}

impl Bijector for Chain {
    fn name(&self) -> &'static str {
        "chain"
    }

    fn encode(&self, x: &Tensor, cx: &Ctx) -> Result<(Tensor, Tensor)> {
        let mut z = x.clone();
        let mut total: Option<Tensor> = None;
        for l in &self.0 {
            let (next, ld) = l.encode(&z, cx)?;
            z = next;
            total = Some(match total {
                Some(t) => (t + ld)?,
                None => ld,
            });
        }
        let total = match total {
            Some(t) => t,
            None => zero_rows(x)?,
        };
        Ok((z, total))
    }

    fn decode(&self, z: &Tensor, cx: &Ctx) -> Result<Tensor> {
        let mut x = z.clone();
        for l in self.0.iter().rev() {
            x = l.decode(&x, cx)?;
        }
        Ok(x)
    }

    fn decode_with_log_det(&self, z: &Tensor, cx: &Ctx) -> Result<(Tensor, Tensor)> {
        let mut x = z.clone();
        let mut total = zero_rows(z)?;
        for l in self.0.iter().rev() {
            let (next, ld) = l.decode_with_log_det(&x, cx)?;
            x = next;
            total = (total + ld)?;
        }
        Ok((x, total))
    }

    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)> {
        let mut sum = LogDetSum::new(0.0);
        let z = self.emit_encode_sum(g, x, &mut sum)?;
        Ok((z, sum.finish(g)))
    }

    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value> {
        let mut x = z.clone();
        for l in self.0.iter().rev() {
            x = l.emit_decode(g, &x)?;
        }
        Ok(x)
    }

    /// Elementwise layers keep an order; two different orders, or any mixing layer, mix.
    fn dependence(&self) -> Dependence {
        self.0
            .iter()
            .fold(Dependence::Elementwise, |d, l| d.then(l.dependence()))
    }

    /// The layers' diagonals added up (each `[N, D]` or `[D]`).
    fn emit_encode_diagonal(&self, g: &mut Graph, x: &Value) -> Result<(Value, Value)> {
        let mut z = x.clone();
        let mut total: Option<Value> = None;
        for l in &self.0 {
            let (next, diag) = l.emit_encode_diagonal(g, &z)?;
            z = next;
            total = Some(match total {
                Some(t) => g.add(&t, &diag),
                None => diag,
            });
        }
        let total = match total {
            Some(t) => t,
            None => {
                let zero = g.scalar("zero", 0.0);
                g.mul(x, &zero)
            }
        };
        Ok((z, total))
    }

    /// Sequential in a direction if any layer is.
    fn cost(&self) -> [Cost; 2] {
        let seq = |k: usize| {
            if self.0.iter().any(|l| l.cost()[k] == Cost::Sequential) {
                Cost::Sequential
            } else {
                Cost::OnePass
            }
        };
        [seq(0), seq(1)]
    }
}
