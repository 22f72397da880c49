//! Squeeze (space-to-depth, RealNVP §3.6 / Glow): `[C, H, W] → [4C, H/2, W/2]`, each 2×2
//! patch of a channel becoming four channels. A permutation of the pixels: log-det 0.
//!
//! Channel `4c + 2i + j` of the output holds pixel `(2y + i, 2x + j)` of input channel `c`.

use candle_core::{Result, Tensor};

use super::{zero_rows, Bijector, Ctx, LogDet};
use crate::onnx::{Graph, Value};

/// Space-to-depth over events of shape `[C, H, W]` (H and W even).
pub struct Squeeze {
    c: usize,
    h: usize,
    w: usize,
}

impl Squeeze {
    /// A squeeze of `[c, h, w]` events.
    pub fn new(c: usize, h: usize, w: usize) -> Result<Self> {
        if !h.is_multiple_of(2) || !w.is_multiple_of(2) || c == 0 {
            candle_core::bail!("squeeze needs an even height and width, got {c}×{h}×{w}");
        }
        Ok(Squeeze { c, h, w })
    }

    /// The event shape after the squeeze.
    pub fn output_shape(&self) -> [usize; 3] {
        [4 * self.c, self.h / 2, self.w / 2]
    }
}

impl Bijector for Squeeze {
    fn name(&self) -> &'static str {
        "squeeze"
    }

    fn encode(&self, x: &Tensor, _: &Ctx) -> Result<(Tensor, Tensor)> {
        let n = x.dim(0)?;
        let (c, h, w) = (self.c, self.h / 2, self.w / 2);
        let z = x
            .reshape((n, c, h, 2, w, 2))?
            .permute([0, 1, 3, 5, 2, 4])?
            .reshape((n, 4 * c, h, w))?;
        Ok((z, zero_rows(x)?))
    }

    fn decode(&self, z: &Tensor, _: &Ctx) -> Result<Tensor> {
        let n = z.dim(0)?;
        let (c, h, w) = (self.c, self.h / 2, self.w / 2);
        z.reshape((n, c, 2, 2, h, w))?
            .permute([0, 1, 4, 2, 5, 3])?
            .reshape((n, c, self.h, self.w))
    }

    fn emit_encode(&self, g: &mut Graph, x: &Value) -> Result<(Value, LogDet)> {
        let (c, h, w) = (self.c as i64, self.h as i64 / 2, self.w as i64 / 2);
        let split = g.reshape(x, &[-1, c, h, 2, w, 2]);
        let moved = g.transpose(&split, &[0, 1, 3, 5, 2, 4]);
        Ok((g.reshape(&moved, &[-1, 4 * c, h, w]), LogDet::Const(0.0)))
    }

    fn emit_decode(&self, g: &mut Graph, z: &Value) -> Result<Value> {
        let (c, h, w) = (self.c as i64, self.h as i64 / 2, self.w as i64 / 2);
        let split = g.reshape(z, &[-1, c, 2, 2, h, w]);
        let moved = g.transpose(&split, &[0, 1, 4, 2, 5, 3]);
        Ok(g.reshape(&moved, &[-1, c, 2 * h, 2 * w]))
    }
}
