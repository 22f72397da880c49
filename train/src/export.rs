//! Writing a trained flow as a model package: `encode.onnx`, `decode.onnx` and `flow.json`.

use std::path::Path;

use anyhow::{Context, Result};
use flowpack::{
    sha256_hex, Domain, Graphs, Manifest, Metrics, Package, Quantized, ReferenceSet, Scoring,
    Training, DECODE_FILE, DEFAULT_THRESHOLD, ENCODE_FILE, FORMAT_VERSION,
};
use prost::Message;

use crate::data::Table;
use crate::flows::Flow;

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
    /// Held-out normal rows whose served log-densities become the reference set.
    pub reference: &'a Table,
    /// What those rows are, for the manifest.
    pub reference_source: String,
    /// Held-out quality.
    pub metrics: Metrics,
    /// Provenance.
    pub training: Training,
}

fn write_graph(dir: &Path, file: &str, model: &flowpack::onnx::ModelProto) -> Result<String> {
    let bytes = model.encode_to_vec();
    let path = dir.join(file);
    std::fs::write(&path, &bytes).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(sha256_hex(&bytes))
}

/// Writes the package files into `dir` (the flow's evaluation behaviour), scores the
/// reference rows with the exported graph (what a server will compute) and returns the
/// manifest.
pub fn export(flow: &Flow, info: ExportInfo, dir: &Path) -> Result<Manifest> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let event = flow.event.clone();
    let contributions = flow.contributions();
    let encode_sha = write_graph(dir, ENCODE_FILE, &flow.encode_graph(info.name)?)?;
    let decode_sha = write_graph(dir, DECODE_FILE, &flow.decode_graph(info.name)?)?;
    let terms = contributions.order().is_some();
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
        graphs: Graphs::standard(
            &event,
            encode_sha,
            decode_sha,
            flow.costs(),
            terms,
            flow.context_width(),
        ),
        context: flow.context.as_ref().map(|c| c.spec.clone()),
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
        reference: None,
        scoring: Scoring {
            threshold: DEFAULT_THRESHOLD,
            contributions,
        },
        training: info.training,
    };
    manifest.check(&dir.join(flowpack::MANIFEST_FILE))?;
    // A package left by an earlier export must not keep a stale reference set.
    let _ = std::fs::remove_file(dir.join(flowpack::REFERENCE_FILE));
    manifest.write(dir)?;
    calibrate(
        dir,
        &info.reference.values,
        &info.reference.context,
        &info.reference_source,
    )
}

/// Scores `rows` (row-major, the package's features, with their raw `context` for a
/// conditional package) with the package's encode graph and stores their log-densities as
/// its reference set; returns the updated manifest.
pub fn calibrate(dir: &Path, rows: &[f32], context: &[f32], source: &str) -> Result<Manifest> {
    let mut runner = crate::runtime::PackageRunner::open(dir)?;
    let lp = runner.log_prob(rows, context)?;
    let bad = lp.iter().filter(|v| !v.is_finite()).count();
    anyhow::ensure!(
        bad == 0,
        "{bad} of {} reference rows have a non-finite log-density under this model",
        lp.len()
    );
    let set = ReferenceSet::from_log_probs(&lp).context("the reference set has no rows")?;
    let mut package = Package::open(dir)?;
    package.set_reference(set, source)?;
    Ok(package.manifest)
}
