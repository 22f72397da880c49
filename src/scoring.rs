//! Anomaly scores, written once for `POST /score` and `flowserve score`: each row's tail
//! probability against the model's reference set, the outlier decision, and its exact
//! per-feature terms, most surprising first.

use std::borrow::Cow;

use flowpack::{Package, ReferenceSet};

/// What a package needs to score rows: its reference set, threshold and feature names.
pub struct Scorer<'a> {
    /// The reference set of normal rows' log-densities.
    pub reference: &'a ReferenceSet,
    /// The threshold used when a caller gives none.
    pub default_threshold: f64,
    /// Feature names, in row order (borrowed from the manifest: no copy per request).
    pub features: Cow<'a, [String]>,
    /// Whether the encode graph gives exact per-feature terms.
    pub has_terms: bool,
}

impl<'a> Scorer<'a> {
    /// The scorer of a package, or why it cannot score.
    pub fn new(package: &'a Package) -> Result<Scorer<'a>, String> {
        let m = &package.manifest;
        let reference = package.reference.as_ref().ok_or_else(|| {
            format!(
                "model {:?} has no reference set to turn scores into tail probabilities; add one with `flowtrain calibrate --model DIR --data normal.csv`",
                m.name
            )
        })?;
        let d = package.event_size();
        Ok(Scorer {
            reference,
            default_threshold: m.scoring.threshold,
            features: match &m.domain.features {
                Some(f) => Cow::Borrowed(f.as_slice()),
                None => Cow::Owned((0..d).map(|i| format!("x{i}")).collect()),
            },
            has_terms: m.scoring.contributions.order().is_some(),
        })
    }

    /// The tail probability of each log-density.
    pub fn tail_probabilities(&self, log_prob: &[f32]) -> Vec<f64> {
        log_prob
            .iter()
            .map(|&v| self.reference.tail_probability(v))
            .collect()
    }
}

/// A threshold as a client gives it: a tail probability in (0, 1].
pub fn check_threshold(t: f64) -> Result<f64, String> {
    if t.is_finite() && t > 0.0 && t <= 1.0 {
        Ok(t)
    } else {
        Err(format!(
            "threshold must be a tail probability in (0, 1] (0.01 flags the 1 % least likely normal rows), got {t}"
        ))
    }
}

/// Whether a row with tail probability `p` is an outlier at `threshold`.
pub fn is_outlier(p: f64, threshold: f64) -> bool {
    p <= threshold
}

/// The feature indices of one row's terms, most surprising (lowest log-density) first;
/// ties keep feature order.
pub fn most_surprising(terms: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..terms.len()).collect();
    idx.sort_by(|&a, &b| terms[a].total_cmp(&terms[b]));
    idx
}
