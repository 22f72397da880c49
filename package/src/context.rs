//! The context of a conditional flow p(x | c): what each context column is, and how a
//! client's value becomes the float the graphs take.
//!
//! A conditional package's graphs take a second input, `context[N, K]` with one float per
//! context column: a numeric column's raw value, or a categorical column's category index
//! (0-based, in [`ContextKind::Categorical::categories`] order). The graphs themselves
//! standardise the numeric values and one-hot the indices, so the manifest's statistics
//! are for people and clients; the graphs are the definition.

use serde::{Deserialize, Serialize};

/// The context columns of a conditional flow, in the order the `context` input takes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextSpec {
    /// One per context value of a row.
    pub columns: Vec<ContextColumn>,
    /// Units of the learned embedding the conditioners see instead of the encoded context
    /// (absent: they see the encoded context itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<usize>,
}

/// One context column. (Its kind's fields sit beside its name, so unknown fields cannot be
/// refused here: serde's `flatten` and `deny_unknown_fields` do not combine.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextColumn {
    /// The column's name (what clients may key a context object by).
    pub name: String,
    /// What its values are.
    #[serde(flatten)]
    pub kind: ContextKind,
}

/// A numeric or a categorical context column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ContextKind {
    /// A number, standardised in the graph with the training split's mean and standard
    /// deviation.
    Numeric {
        /// Training-split mean.
        mean: f64,
        /// Training-split standard deviation (positive).
        std: f64,
    },
    /// One of a fixed list of categories, one-hot encoded in the graph.
    Categorical {
        /// The categories; a value's index in this list is what the graph takes.
        categories: Vec<String>,
    },
}

/// One context value as a client sent it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ContextValue<'a> {
    /// A JSON number.
    Number(f64),
    /// A JSON string.
    Text(&'a str),
}

impl ContextColumn {
    /// Values this column contributes to the encoded context: 1, or the categories.
    pub fn encoded_width(&self) -> usize {
        match &self.kind {
            ContextKind::Numeric { .. } => 1,
            ContextKind::Categorical { categories } => categories.len(),
        }
    }

    /// The float the graphs take for `value`, or why it is refused (a sentence naming the
    /// column). A categorical column takes a category's name, as a string or as the number
    /// spelled that way.
    pub fn graph_value(&self, value: ContextValue) -> Result<f32, String> {
        let name = &self.name;
        match (&self.kind, value) {
            (ContextKind::Numeric { .. }, ContextValue::Number(v)) => {
                if v.is_finite() && v.abs() <= f32::MAX as f64 {
                    Ok(v as f32)
                } else {
                    Err(format!(
                        "context column {name:?} must be a finite float32 number"
                    ))
                }
            }
            (ContextKind::Numeric { .. }, ContextValue::Text(t)) => Err(format!(
                "context column {name:?} is numeric; got the string {t:?}"
            )),
            (ContextKind::Categorical { categories }, ContextValue::Text(t)) => categories
                .iter()
                .position(|c| c == t)
                .map(|i| i as f32)
                .ok_or_else(|| {
                    format!(
                        "context column {name:?} has no category {t:?} (categories: {})",
                        categories.join(", ")
                    )
                }),
            (ContextKind::Categorical { categories }, ContextValue::Number(v)) => {
                // A number names the category spelled the same ("3" for 3): labels are
                // often integers, and an index would be ambiguous with them.
                let spelled = if v.fract() == 0.0 && v.abs() < 1e15 {
                    format!("{}", v as i64)
                } else {
                    format!("{v}")
                };
                categories
                    .iter()
                    .position(|c| *c == spelled)
                    .map(|i| i as f32)
                    .ok_or_else(|| {
                        format!(
                            "context column {name:?} has no category {spelled:?} (categories: {})",
                            categories.join(", ")
                        )
                    })
            }
        }
    }
}

impl ContextColumn {
    /// Whether `v` is a value the graphs take for this column as it stands (tensor clients
    /// send graph values): a finite number, or a category index.
    pub fn check_graph_value(&self, v: f32) -> Result<(), String> {
        let name = &self.name;
        match &self.kind {
            ContextKind::Numeric { .. } if v.is_finite() => Ok(()),
            ContextKind::Numeric { .. } => Err(format!(
                "context column {name:?} must be a finite number, got {v}"
            )),
            ContextKind::Categorical { categories } => {
                if v.fract() == 0.0 && v >= 0.0 && (v as usize) < categories.len() {
                    Ok(())
                } else {
                    Err(format!(
                        "context column {name:?} takes a category index 0..{} ({}), got {v}",
                        categories.len() - 1,
                        categories.join(", ")
                    ))
                }
            }
        }
    }
}

impl ContextSpec {
    /// Context values per row: the width of the graphs' `context` input.
    pub fn width(&self) -> usize {
        self.columns.len()
    }

    /// Values of the encoded context (numeric columns one each, categorical columns one per
    /// category).
    pub fn encoded_width(&self) -> usize {
        self.columns.iter().map(ContextColumn::encoded_width).sum()
    }

    /// The column named `name`.
    pub fn column(&self, name: &str) -> Option<(usize, &ContextColumn)> {
        self.columns
            .iter()
            .enumerate()
            .find(|(_, c)| c.name == name)
    }

    /// What is wrong with the spec, if anything: no columns, repeated names, a numeric
    /// column without a positive finite scale, a categorical one without distinct
    /// categories, an empty embedding.
    pub fn problem(&self) -> Option<String> {
        if self.columns.is_empty() {
            return Some(
                "context.columns is empty (leave context out for an unconditional model)".into(),
            );
        }
        for (i, c) in self.columns.iter().enumerate() {
            if self.columns[..i].iter().any(|o| o.name == c.name) {
                return Some(format!("context column {:?} appears twice", c.name));
            }
            match &c.kind {
                ContextKind::Numeric { mean, std } => {
                    if !(mean.is_finite() && std.is_finite() && *std > 0.0) {
                        return Some(format!(
                            "context column {:?} needs a finite mean and a positive std",
                            c.name
                        ));
                    }
                }
                ContextKind::Categorical { categories } => {
                    if categories.is_empty() {
                        return Some(format!("context column {:?} has no categories", c.name));
                    }
                    for (j, k) in categories.iter().enumerate() {
                        if categories[..j].contains(k) {
                            return Some(format!(
                                "context column {:?} lists category {k:?} twice",
                                c.name
                            ));
                        }
                    }
                }
            }
        }
        if self.embedding == Some(0) {
            return Some("context.embedding must be positive when present".into());
        }
        None
    }
}
