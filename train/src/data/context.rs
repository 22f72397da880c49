//! Context columns of a conditional flow p(x | c): read raw beside the features, typed
//! (numeric or categorical), turned into the floats the graphs' `context` input takes
//! (a number, or a category index), and — numeric columns — standardised with the
//! training split's statistics.

use anyhow::{bail, Result};
use flowpack::{ContextColumn, ContextKind, ContextSpec};

use super::Table;

/// What a `--context` entry asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextRequest {
    /// The column's name.
    pub name: String,
    /// Forced kind (`name:numeric`, `name:categorical`); `None`: by the values.
    pub categorical: Option<bool>,
}

impl ContextRequest {
    /// Parses `name`, `name:numeric` or `name:categorical`.
    pub fn parse(entry: &str) -> Result<ContextRequest> {
        let (name, kind) = match entry.rsplit_once(':') {
            Some((n, "numeric")) => (n, Some(false)),
            Some((n, "categorical")) => (n, Some(true)),
            Some((_, k)) => bail!(
                "--context {entry:?}: the kind after ':' must be numeric or categorical, not {k:?}"
            ),
            None => (entry, None),
        };
        if name.is_empty() {
            bail!("--context {entry:?} names no column");
        }
        Ok(ContextRequest {
            name: name.to_string(),
            categorical: kind,
        })
    }

    /// All entries of a `--context` list; a column named twice is an error.
    pub fn parse_all(entries: &[String]) -> Result<Vec<ContextRequest>> {
        let reqs = entries
            .iter()
            .map(|e| ContextRequest::parse(e))
            .collect::<Result<Vec<_>>>()?;
        for (i, r) in reqs.iter().enumerate() {
            if reqs[..i].iter().any(|o| o.name == r.name) {
                bail!("--context names column {:?} twice", r.name);
            }
        }
        Ok(reqs)
    }
}

/// One column's cells as read.
#[derive(Debug, Clone, PartialEq)]
pub enum Cells {
    /// Every cell a finite number.
    Numbers(Vec<f64>),
    /// At least one cell is not a number.
    Text(Vec<String>),
}

impl Cells {
    /// Numbers if every cell parses as a finite number, else text.
    pub fn from_text(cells: Vec<String>) -> Cells {
        let numbers: Option<Vec<f64>> = cells
            .iter()
            .map(|c| c.parse::<f64>().ok().filter(|v| v.is_finite()))
            .collect();
        match numbers {
            Some(n) => Cells::Numbers(n),
            None => Cells::Text(cells),
        }
    }

    fn len(&self) -> usize {
        match self {
            Cells::Numbers(v) => v.len(),
            Cells::Text(v) => v.len(),
        }
    }
}

/// How a number is spelled as a category name ("3" for 3.0).
pub fn category_name(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// The context columns typed and turned into graph values: the spec (numeric statistics
/// still unset: [`fit_numeric`] fits them on the training split) and the values,
/// row-major, one per column.
pub fn build(requests: &[ContextRequest], columns: Vec<Cells>) -> Result<(ContextSpec, Vec<f32>)> {
    let rows = columns.first().map_or(0, Cells::len);
    let mut spec = Vec::new();
    let mut per_column = Vec::new();
    for (req, cells) in requests.iter().zip(columns) {
        let categorical = req.categorical.unwrap_or(matches!(cells, Cells::Text(_)));
        let (kind, values) = match (categorical, cells) {
            (false, Cells::Numbers(v)) => {
                if let Some(bad) = v.iter().find(|x| x.abs() > f32::MAX as f64) {
                    bail!(
                        "context column {:?}: {bad} does not fit a float32",
                        req.name
                    );
                }
                let values = v.iter().map(|&x| x as f32).collect();
                (
                    ContextKind::Numeric {
                        mean: 0.0,
                        std: 1.0,
                    },
                    values,
                )
            }
            (false, Cells::Text(t)) => {
                let bad = t.iter().find(|c| c.parse::<f64>().is_err()).cloned();
                bail!(
                    "context column {:?} is numeric but holds {:?}; use {}:categorical",
                    req.name,
                    bad.unwrap_or_default(),
                    req.name
                )
            }
            (true, cells) => {
                let (names, order): (Vec<String>, Vec<String>) = match cells {
                    Cells::Numbers(v) => {
                        let mut distinct = v.clone();
                        distinct.sort_by(f64::total_cmp);
                        distinct.dedup();
                        (
                            v.iter().map(|&x| category_name(x)).collect(),
                            distinct.into_iter().map(category_name).collect(),
                        )
                    }
                    Cells::Text(t) => {
                        let mut distinct = t.clone();
                        distinct.sort();
                        distinct.dedup();
                        (t, distinct)
                    }
                };
                let values = names
                    .iter()
                    .map(|n| order.iter().position(|o| o == n).expect("listed") as f32)
                    .collect();
                (ContextKind::Categorical { categories: order }, values)
            }
        };
        spec.push(ContextColumn {
            name: req.name.clone(),
            kind,
        });
        per_column.push(values);
    }
    let mut values = Vec::with_capacity(rows * per_column.len());
    for r in 0..rows {
        values.extend(per_column.iter().map(|c: &Vec<f32>| c[r]));
    }
    Ok((
        ContextSpec {
            columns: spec,
            embedding: None,
        },
        values,
    ))
}

/// Sets each numeric column's mean and standard deviation from `train`'s context (a
/// constant column keeps std 1).
pub fn fit_numeric(spec: &mut ContextSpec, train: &Table) {
    let w = train.context_dim;
    let n = train.rows() as f64;
    for (j, col) in spec.columns.iter_mut().enumerate() {
        if let ContextKind::Numeric { mean, std } = &mut col.kind {
            let vals = train.context.iter().skip(j).step_by(w).map(|&v| v as f64);
            let m = vals.clone().sum::<f64>() / n;
            let var = vals.map(|v| (v - m) * (v - m)).sum::<f64>() / n;
            *mean = m;
            *std = if var.sqrt() > 1e-6 { var.sqrt() } else { 1.0 };
        }
    }
}

/// The graph values of context cells given as text (one vector per column of `spec`, in
/// its order; a CSV's cells, a `--context name=value` list), row-major: numbers for numeric
/// columns, category indices for categorical ones; a cell the package does not know is an
/// error naming its column and row.
pub fn graph_values(spec: &ContextSpec, columns: &[Vec<String>]) -> Result<Vec<f32>> {
    let rows = columns.first().map_or(0, Vec::len);
    let mut out = Vec::with_capacity(rows * spec.width());
    for r in 0..rows {
        for (col, cells) in spec.columns.iter().zip(columns) {
            let cell = cells[r].as_str();
            let value = match cell.parse::<f64>() {
                Ok(v) => flowpack::ContextValue::Number(v),
                Err(_) => flowpack::ContextValue::Text(cell),
            };
            let v = col
                .graph_value(value)
                .map_err(|e| anyhow::anyhow!("row {}: {e}", r + 1))?;
            out.push(v);
        }
    }
    Ok(out)
}
