//! A conditional model's `context` in request bodies, checked against the manifest and
//! turned into the floats its graphs take (a numeric column's value, a categorical
//! column's category index), one row per data row. Every refusal is a 422 naming the
//! element (`context[3].merchant`).
//!
//! A context row is an object keyed by column name (`{"merchant": "grocery", "hour": 13}`)
//! or an array in column order (`["grocery", 13]`). `/sample` also takes one row for all
//! samples.

use flowpack::{ContextSpec, ContextValue};
use serde_json::Value;

use super::error::ApiError;
use super::tensor::{Data, DataType, Input};
use crate::repository::Model;

const FIELD: &str = "context";

fn invalid(msg: String) -> ApiError {
    ApiError::Invalid(msg)
}

/// The model's context columns, or the refusal of a context sent to an unconditional
/// model; `Ok(None)` when neither has one.
fn spec<'a>(model: &'a Model, sent: Option<&Value>) -> Result<Option<&'a ContextSpec>, ApiError> {
    match (&model.package.manifest.context, sent) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(invalid(format!(
            "{FIELD}: model {:?} is unconditional; leave context out",
            model.name
        ))),
        (Some(spec), None) => Err(invalid(format!(
            "{FIELD}: model {:?} is conditional on ({}); send one context per row",
            model.name,
            names(spec)
        ))),
        (Some(spec), Some(_)) => Ok(Some(spec)),
    }
}

fn names(spec: &ContextSpec) -> String {
    spec.columns
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// One context value as the client sent it, at `at`.
fn value<'a>(v: &'a Value, at: &str) -> Result<ContextValue<'a>, ApiError> {
    match v {
        Value::Number(n) => Ok(ContextValue::Number(n.as_f64().unwrap_or(f64::NAN))),
        Value::String(s) => Ok(ContextValue::Text(s)),
        other => Err(invalid(format!(
            "{at}: a context value is a number or a string, not {}",
            kind(other)
        ))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One context row (`at` names it in errors), appended to `out`.
fn row(spec: &ContextSpec, v: &Value, at: &str, out: &mut Vec<f32>) -> Result<(), ApiError> {
    let k = spec.width();
    match v {
        Value::Object(map) => {
            if let Some(extra) = map.keys().find(|n| spec.column(n).is_none()) {
                return Err(invalid(format!(
                    "{at}.{extra}: the model has no context column {extra:?} (columns: {})",
                    names(spec)
                )));
            }
            for col in &spec.columns {
                let at = format!("{at}.{}", col.name);
                let v = map
                    .get(&col.name)
                    .ok_or_else(|| invalid(format!("{at}: missing")))?;
                let g = col.graph_value(value(v, &at)?);
                out.push(g.map_err(|e| invalid(format!("{at}: {e}")))?);
            }
        }
        Value::Array(cells) if cells.len() == k => {
            for (j, (col, v)) in spec.columns.iter().zip(cells).enumerate() {
                let at = format!("{at}[{j}]");
                let g = col.graph_value(value(v, &at)?);
                out.push(g.map_err(|e| invalid(format!("{at}: {e}")))?);
            }
        }
        Value::Array(cells) => {
            return Err(invalid(format!(
                "{at}: {} values; the model's context has {k} ({})",
                cells.len(),
                names(spec)
            )))
        }
        other => {
            return Err(invalid(format!(
                "{at}: a context row is an object keyed by column ({}) or an array of {k} values, not {}",
                names(spec),
                kind(other)
            )))
        }
    }
    Ok(())
}

/// The graph values of `sent` (one context row per data row, `rows` of them) for `model`;
/// empty for an unconditional model.
pub fn per_row(model: &Model, sent: Option<&Value>, rows: usize) -> Result<Vec<f32>, ApiError> {
    let Some(spec) = spec(model, sent)? else {
        return Ok(Vec::new());
    };
    let Some(Value::Array(list)) = sent else {
        return Err(invalid(format!(
            "{FIELD}: an array of context rows, one per input row ({rows})"
        )));
    };
    if list.len() != rows {
        return Err(invalid(format!(
            "{FIELD}: {} context rows for {rows} input rows; send one per row",
            list.len()
        )));
    }
    let mut out = Vec::with_capacity(rows * spec.width());
    for (i, v) in list.iter().enumerate() {
        row(spec, v, &format!("{FIELD}[{i}]"), &mut out)?;
    }
    Ok(out)
}

/// The graph values of a tensor `context` input (FP32 `[rows, K]`: numbers, category
/// indices) for `model`, checked; empty for an unconditional model.
pub fn from_tensor(model: &Model, sent: Option<Input>, rows: usize) -> Result<Vec<f32>, ApiError> {
    let probe = sent.as_ref().map(|_| &Value::Null);
    let Some(spec) = spec(model, probe)? else {
        return Ok(Vec::new());
    };
    let input = sent.expect("checked by spec");
    let k = spec.width();
    if input.datatype != DataType::Fp32 || input.shape != [rows, k] {
        return Err(ApiError::Malformed(format!(
            "input {FIELD:?}: {} {:?}; the model takes FP32 [{rows}, {k}] ({}: numbers, and category indices in the order GET /v1/models/{} lists)",
            input.datatype.as_str(),
            input.shape,
            names(spec),
            model.name
        )));
    }
    let Data::F32(values) = input.data else {
        unreachable!("FP32 inputs decode to F32")
    };
    for (i, row) in values.chunks_exact(k).enumerate() {
        for (j, (col, &v)) in spec.columns.iter().zip(row).enumerate() {
            col.check_graph_value(v)
                .map_err(|e| invalid(format!("{FIELD}[{i}][{j}]: {e}")))?;
        }
    }
    Ok(values)
}

/// The graph values of `/sample`'s context for `n` samples: one context row for all of
/// them, or a list of `n`; empty for an unconditional model.
pub fn for_samples(model: &Model, sent: Option<&Value>, n: usize) -> Result<Vec<f32>, ApiError> {
    let Some(spec) = spec(model, sent)? else {
        return Ok(Vec::new());
    };
    let sent = sent.expect("checked by spec");
    let one = match sent {
        Value::Object(_) => true,
        Value::Array(cells) => !cells.iter().any(|c| c.is_object() || c.is_array()),
        _ => true,
    };
    if !one {
        return per_row(model, Some(sent), n);
    }
    let mut first = Vec::with_capacity(spec.width());
    row(spec, sent, FIELD, &mut first)?;
    Ok(first.repeat(n))
}
