//! Evaluating a flow (evaluation behaviour): log p of rows in chunks, mean NLL of a table,
//! reverse KL against a teacher.

use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use flowpack::sampling::latent_noise;

use crate::bijectors::Ctx;
use crate::data::{dequantize, Table};
use crate::flows::Flow;

/// Rows (row-major, `dim` per row) as a `[N, dim]` tensor, without a copy.
pub fn to_tensor(values: Vec<f32>, dim: usize) -> candle_core::Result<Tensor> {
    let n = values.len() / dim;
    Tensor::from_vec(values, (n, dim), &Device::Cpu)
}

/// Values per evaluation or sampling chunk: image flows hold `hidden` channels per pixel in
/// every coupling network, so whole test sets at once would take gigabytes.
pub const CHUNK_ELEMENTS: usize = 1 << 18;

/// log p of every row of `values` (row-major, `flow.dim` per row), in chunks, averaged over
/// `ensemble` mask sets; a conditional flow's rows are conditioned on `context`
/// (row-major, [`Flow::context_width`] per row; empty for an unconditional flow).
pub fn log_prob_rows(
    flow: &Flow,
    values: &[f32],
    context: &[f32],
    ensemble: usize,
) -> Result<Vec<f32>> {
    let rows = (CHUNK_ELEMENTS / flow.dim).clamp(1, 4096);
    let cw = flow.context_width();
    let n = values.len() / flow.dim;
    anyhow::ensure!(
        context.len() == n * cw,
        "{} context values for {n} rows of a flow taking {cw} per row",
        context.len()
    );
    let mut out = Vec::with_capacity(n);
    for (i, chunk) in values.chunks(rows * flow.dim).enumerate() {
        let c = match cw {
            0 => None,
            _ => {
                let m = chunk.len() / flow.dim;
                let part = &context[i * rows * cw..(i * rows + m) * cw];
                Some(to_tensor(part.to_vec(), cw)?)
            }
        };
        let x = to_tensor(chunk.to_vec(), flow.dim)?;
        let lp = flow.ensemble_log_prob(&x, c.as_ref(), ensemble)?;
        out.extend(lp.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Mean NLL (nats per example) of `table` under `flow`, averaging densities over mask sets
/// `0..ensemble` (1: the exported flow alone); quantized columns get the fixed
/// dequantisation noise of `noise_seed` where `dequantized` marks them.
pub fn mean_nll(
    flow: &Flow,
    table: &Table,
    dequantized: &[f32],
    noise_seed: u64,
    ensemble: usize,
) -> Result<f64> {
    let mut values = table.values.clone();
    dequantize(
        &mut values,
        table.dim,
        dequantized,
        &mut ChaCha8Rng::seed_from_u64(noise_seed),
    );
    let lp = log_prob_rows(flow, &values, &table.context, ensemble)?;
    let total: f64 = lp.iter().map(|&v| v as f64).sum();
    Ok(-total / table.rows() as f64)
}

/// Reverse KL(flow ‖ teacher) in nats, estimated on `n` fixed base draws of `seed`.
pub fn reverse_kl(flow: &Flow, teacher: &Flow, n: usize, seed: u64) -> Result<f64> {
    let dim = flow.dim;
    let z = latent_noise(n, dim, 1.0, seed);
    let mut total = 0f64;
    for chunk in z.chunks(4096 * dim) {
        let rows = chunk.len() / dim;
        let z = to_tensor(chunk.to_vec(), dim)?;
        let kl = flow.reverse_kl(teacher, &z, None, &Ctx::EVAL)?;
        total += kl.to_scalar::<f32>()? as f64 * rows as f64;
    }
    Ok(total / n as f64)
}
