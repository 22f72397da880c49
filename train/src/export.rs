//! Writing a trained flow as a model package: `encode.onnx`, `decode.onnx` and `flow.json`.

use std::path::Path;

use anyhow::{Context, Result};
use flowpack::{
    sha256_hex, Calibration, Domain, Graphs, Manifest, Metrics, Quantile, Quantized, Training,
    DECODE_FILE, ENCODE_FILE, FORMAT_VERSION,
};
use prost::Message;

use crate::data::Table;
use crate::flows::Flow;

/// The probability levels stored in a manifest's calibration.
pub const CALIBRATION_LEVELS: [f64; 13] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999,
];

/// What goes into the manifest besides the graphs.
pub struct ExportInfo<'a> {
    /// Model name.
    pub name: &'a str,
    /// Feature names.
    pub features: Vec<String>,
    /// Dequantisation step per feature (0: none).
    pub dequantized: &'a [f32],
    /// Training rows (for the observed range).
    pub train: &'a Table,
    /// Held-out rows for calibration.
    pub calibration: &'a Table,
    /// Held-out quality.
    pub metrics: Metrics,
    /// Provenance.
    pub training: Training,
}

/// Quantiles of `values` at `levels` (linear interpolation between order statistics).
pub fn quantiles(values: &[f64], levels: &[f64]) -> Vec<Quantile> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Vec::new();
    }
    v.sort_by(f64::total_cmp);
    levels
        .iter()
        .map(|&q| {
            let pos = q * (v.len() - 1) as f64;
            let (i, frac) = (pos.floor() as usize, pos.fract());
            let hi = v[(i + 1).min(v.len() - 1)];
            Quantile {
                q,
                log_prob: v[i] + (hi - v[i]) * frac,
            }
        })
        .collect()
}

fn write_graph(dir: &Path, file: &str, model: &flowpack::onnx::ModelProto) -> Result<String> {
    let bytes = model.encode_to_vec();
    let path = dir.join(file);
    std::fs::write(&path, &bytes).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(sha256_hex(&bytes))
}

/// Writes the package files into `dir` (the flow's evaluation behaviour) and returns the
/// manifest.
pub fn export(flow: &Flow, info: ExportInfo, dir: &Path) -> Result<Manifest> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let event = flow.event.clone();
    let encode_sha = write_graph(dir, ENCODE_FILE, &flow.encode_graph(info.name)?)?;
    let decode_sha = write_graph(dir, DECODE_FILE, &flow.decode_graph(info.name)?)?;

    let cal = info.calibration;
    let lp: Vec<f64> = crate::eval::log_prob_rows(flow, &cal.values, 1)?
        .into_iter()
        .map(f64::from)
        .collect();
    let t = info.train;
    let observed_range = (0..t.dim)
        .map(|c| {
            let col = (0..t.rows()).map(|r| t.values[r * t.dim + c] as f64);
            [
                col.clone().fold(f64::INFINITY, f64::min),
                col.fold(f64::NEG_INFINITY, f64::max),
            ]
        })
        .collect();
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        name: info.name.to_string(),
        version: 1,
        family: flow.family.as_str().to_string(),
        event_shape: event.clone(),
        dtype: "float32".into(),
        base: flow.base.clone(),
        graphs: Graphs::standard(&event, encode_sha, decode_sha, flow.costs()),
        domain: Domain {
            quantized: info
                .features
                .iter()
                .zip(info.dequantized)
                .filter(|(_, &q)| q > 0.0)
                .map(|(n, &q)| Quantized {
                    feature: n.clone(),
                    step: q as f64,
                })
                .collect(),
            features: Some(info.features),
            observed_range: Some(observed_range),
            // Image models: the range samples are drawn in when turned into pictures.
            pixel_range: (flow.event.len() == 3).then(|| flowpack::image::value_range(&t.values)),
        },
        metrics: info.metrics,
        calibration: Calibration {
            split: "test".into(),
            count: lp.len(),
            quantiles: quantiles(&lp, &CALIBRATION_LEVELS),
        },
        training: info.training,
    };
    manifest.check(&dir.join(flowpack::MANIFEST_FILE))?;
    manifest.write(dir)?;
    Ok(manifest)
}
