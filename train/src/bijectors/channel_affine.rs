//! The per-channel affine map `z = x·a + c` (a > 0), written once for the four bijectors
//! that are one at evaluation: standardisation, NICE's diagonal scaling, actnorm and batch
//! norm. Channels are axis 1 of `[N, C]` rows or `[N, C, H, W]` images; log|det| =
//! (H·W)·Σ log a.

use candle_core::{Result, Tensor};

use super::{constant_rows, Bijector, Ctx, Dependence, LogDet};
use crate::onnx::{Graph, Value};

/// A bijector that is a per-channel affine map, at least at evaluation: it says what its
/// map is and this file does the rest (candle math, ONNX emission, log-det).
pub(crate) trait PerChannelAffine {
    /// Its name in logs and graph constants.
    const NAME: &'static str;
    /// The map's coefficients as they are now.
    fn affine(&self) -> Result<ChannelAffine>;
    /// Training behaviour: `Some` replaces the map (batch norm's batch statistics); `None`
    /// runs it (after, say, actnorm's initialisation).
    fn train(&self, _x: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }
}

impl<T: PerChannelAffine> Bijector for T {
    fn name(&self) -> &'static str {
        T::NAME
    }

    fn encode(&self, x: &Tensor, cx: &Ctx) -> Result<(Tensor, Tensor)> {
        if cx.training {
            if let Some(out) = self.train(x)? {
                return Ok(out);
            }
        }
        self.affine()?.encode(x)
    }

    fn decode(&self, z: &Tensor, _: &Ctx) -> Result<Tensor> {
        self.affine()?.decode(z)
    }

    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)> {
        self.affine()?.emit_encode(g, x, T::NAME)
    }

    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value> {
        self.affine()?.emit_decode(g, z, T::NAME)
    }

    fn dependence(&self) -> Dependence {
        Dependence::Elementwise
    }

    fn emit_encode_diagonal(&self, g: &mut Graph, x: &Value) -> Result<(Value, Value)> {
        let affine = self.affine()?;
        let (z, _) = affine.emit_encode(g, x, T::NAME)?;
        let log_a = affine.a.detach().log()?;
        Ok((
            z,
            affine.constant(g, &format!("{}_log_scale", T::NAME), &log_a)?,
        ))
    }
}

/// `z = x·a + c` per channel, with `spatial` elements per channel per example.
pub(crate) struct ChannelAffine {
    /// Per-channel scale `[C]` (may carry gradients).
    pub a: Tensor,
    /// Per-channel shift `[C]`; none for a pure scaling.
    pub c: Option<Tensor>,
    /// Elements per channel per example (H·W; 1 for rows).
    pub spatial: usize,
}

/// A `[C]` vector shaped to broadcast over `[N, C, ...]` of rank `rank`.
pub(crate) fn per_channel(t: &Tensor, rank: usize) -> Result<Tensor> {
    let mut shape = vec![1; rank];
    shape[1] = t.dim(0)?;
    t.reshape(shape)
}

impl ChannelAffine {
    /// log|det| of one example.
    fn log_det(&self) -> Result<Tensor> {
        self.a.log()?.sum_all()? * self.spatial as f64
    }

    /// data → latent, with the log-det per row.
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let r = x.rank();
        let mut z = x.broadcast_mul(&per_channel(&self.a, r)?)?;
        if let Some(c) = &self.c {
            z = z.broadcast_add(&per_channel(c, r)?)?;
        }
        Ok((z, constant_rows(x, &self.log_det()?)?))
    }

    /// latent → data: `(z − c) / a`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let r = z.rank();
        let centred = match &self.c {
            Some(c) => z.broadcast_sub(&per_channel(c, r)?)?,
            None => z.clone(),
        };
        centred.broadcast_div(&per_channel(&self.a, r)?)
    }

    /// A `[C]` vector as a graph constant shaped `[C]` (rows) or `[C, 1, 1]` (images).
    fn constant(&self, g: &mut Graph, hint: &str, t: &Tensor) -> Result<Value> {
        let t = t.detach();
        if self.spatial == 1 {
            g.tensor(hint, &t)
        } else {
            g.tensor(hint, &t.reshape((t.dim(0)?, 1, 1))?)
        }
    }

    /// [`ChannelAffine::encode`] as ONNX nodes; constants named after `hint`.
    pub fn emit_encode(&self, g: &mut Graph, x: &Value, hint: &str) -> Result<(Value, LogDet)> {
        let a = self.constant(g, &format!("{hint}_scale"), &self.a)?;
        let mut z = g.mul(x, &a);
        if let Some(c) = &self.c {
            let c = self.constant(g, &format!("{hint}_shift"), c)?;
            z = g.add(&z, &c);
        }
        let ld = self.log_det()?.to_scalar::<f32>()? as f64;
        Ok((z, LogDet::Const(ld)))
    }

    /// [`ChannelAffine::decode`] as ONNX nodes: `z·(1/a) + (−c/a)`.
    pub fn emit_decode(&self, g: &mut Graph, z: &Value, hint: &str) -> Result<Value> {
        let inv = self.a.detach().recip()?;
        let scale = self.constant(g, &format!("{hint}_inverse_scale"), &inv)?;
        let mut x = g.mul(z, &scale);
        if let Some(c) = &self.c {
            let shift = (c.detach() * &inv)?.neg()?;
            let shift = self.constant(g, &format!("{hint}_inverse_shift"), &shift)?;
            x = g.add(&x, &shift);
        }
        Ok(x)
    }
}
