//! Property-based fuzzing of everything that reads what a client sends: the JSON bodies of
//! `/log_prob`, `/encode`, `/decode`, `/score` and `/sample` (rows parsed straight into f32,
//! integers, the error explanation), the Open Inference Protocol's JSON and binary tensors,
//! and the headers. For any input: no panic; every refusal is a 4xx with a message; and
//! whenever a body parses, its rows equal a reference parse through `serde_json::Value`
//! (and whenever the reference accepts, the parser does too).
//!
//! `make test` runs each property over proptest's default number of cases (256);
//! `make fuzz` sets `PROPTEST_CASES` much higher.

use axum::http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{check_json_type, explain, timeout_ms};
use super::tensor::{self, InferHeader};
use super::wire::{InputsRequest, LatentsRequest, Rows, SampleRequest, ScoreRequest};

/// What the server answers for a body that `T` cannot take: the fast parse, then the
/// explaining one, exactly as the `ApiJson` extractor does.
fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice::<T>(bytes).map_err(|_| explain::<T>(bytes))
}

/// A refusal a client can act on: 400 or 422, with a sentence.
fn assert_client_error(e: &ApiError) {
    let status = e.status().as_u16();
    assert!(status == 400 || status == 422, "{status} for {e}");
    assert!(e.to_string().len() > 10, "no message: {e:?}");
}

/// The reference: rows read through `serde_json::Value` by the rules the wire documents
/// (finite float32 numbers, rectangular, at most [C][H][W] inside a row). `Err` names why.
fn reference(v: &Value) -> Result<Rows, String> {
    fn walk(v: &Value, depth: usize, out: &mut Vec<f32>) -> Result<Vec<usize>, String> {
        match v {
            Value::Number(n) if depth > 0 => {
                let x = n.as_f64().ok_or("not a float")?;
                if !(x as f32).is_finite() {
                    return Err("outside float32".into());
                }
                out.push(x as f32);
                Ok(vec![])
            }
            Value::Array(items) => {
                if depth >= 4 {
                    return Err("too deep".into());
                }
                let mut first: Option<Vec<usize>> = None;
                for item in items {
                    let shape = walk(item, depth + 1, out)?;
                    match &first {
                        None => first = Some(shape),
                        Some(f) if *f != shape => return Err("ragged".into()),
                        Some(_) => {}
                    }
                }
                let mut shape = vec![items.len()];
                shape.extend(first.unwrap_or_default());
                Ok(shape)
            }
            _ => Err("not a number or array".into()),
        }
    }
    let mut values = Vec::new();
    let shape = walk(v, 0, &mut values)?;
    Ok(Rows {
        values,
        count: shape[0],
        row_shape: shape[1..].to_vec(),
    })
}

/// A number as clients send them: small integers, floats, the float32 edge, past it.
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (-1000i64..1000).prop_map(Value::from),
        4 => (-1e6f64..1e6).prop_map(Value::from),
        1 => prop_oneof![
            Just(json!(f32::MAX as f64)),
            Just(json!(-(f32::MAX as f64))),
            Just(json!(3.5e38)),
            Just(json!(1e300)),
            Just(json!(5e-324)),
            Just(json!(u64::MAX)),
            Just(json!(i64::MIN)),
        ],
    ]
}

/// Any JSON value, a few levels deep.
fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        number(),
        "[a-z0-9 ]{0,6}".prop_map(Value::from),
    ];
    leaf.prop_recursive(6, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Rows as a client would send them: a rectangular array of numbers of 1 to 5 levels, then
/// perhaps one element replaced (by null, a string, an array, a huge number) or dropped.
fn rows_value() -> impl Strategy<Value = Value> {
    let dims = prop::collection::vec(0usize..4, 1..6);
    (dims, any::<u64>(), 0u8..8, any_value()).prop_map(|(dims, seed, damage_kind, junk)| {
        fn build(dims: &[usize], seed: &mut u64) -> Value {
            match dims.split_first() {
                None => {
                    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    json!(((*seed >> 40) as f64 / 1e3) - 8000.0)
                }
                Some((&n, rest)) => Value::Array((0..n).map(|_| build(rest, seed)).collect()),
            }
        }
        let mut s = seed;
        let mut v = build(&dims, &mut s);
        damage(&mut v, seed, seed as usize % 4, damage_kind, junk);
        v
    })
}

/// Replaces, nulls, shortens or over-fills the element `levels` arrays down (by `seed`).
fn damage(v: &mut Value, seed: u64, levels: usize, kind: u8, junk: Value) {
    if levels > 0 {
        if let Value::Array(a) = v {
            if !a.is_empty() {
                let i = seed as usize % a.len();
                return damage(&mut a[i], seed >> 8, levels - 1, kind, junk);
            }
        }
    }
    match (kind, v) {
        (0, x) => *x = junk,
        (1, x) => *x = Value::Null,
        (2, Value::Array(a)) => {
            a.pop();
        }
        (3, Value::Array(a)) => a.push(json!(1e39)),
        _ => {}
    }
}

fn rows_equal(a: &Rows, b: &Rows) -> bool {
    a.count == b.count
        && a.row_shape == b.row_shape
        && a.values.len() == b.values.len()
        && a.values
            .iter()
            .zip(&b.values)
            .all(|(x, y)| x.to_bits() == y.to_bits())
}

/// The body field that holds rows in each request type, and its parse.
fn rows_of(field: &str, body: &[u8]) -> Result<Rows, ApiError> {
    match field {
        "inputs" => parse::<InputsRequest>(body).map(|r| r.inputs),
        "latents" => parse::<LatentsRequest>(body).map(|r| r.latents),
        _ => parse::<ScoreRequest>(body).map(|r| r.inputs),
    }
}

proptest! {
    /// Rows: the parser agrees with the reference both ways, value for value, and its
    /// refusals are 422s naming the field.
    #[test]
    fn rows_parse_like_the_reference(
        v in prop_oneof![4 => rows_value(), 1 => any_value()],
        field in prop_oneof![Just("inputs"), Just("latents"), Just("score")],
    ) {
        let key = if field == "latents" { "latents" } else { "inputs" };
        let body = serde_json::to_vec(&json!({"model": "m", key: v})).unwrap();
        let got = rows_of(field, &body);
        // The reference reads the same bytes through serde_json::Value.
        let parsed: Value = serde_json::from_slice(&body).unwrap();
        match (reference(&parsed[key]), got) {
            (Ok(want), Ok(got)) => prop_assert!(rows_equal(&want, &got), "{v}: {got:?} vs {want:?}"),
            (Ok(want), Err(e)) => prop_assert!(false, "{v}: refused ({e}) but the reference reads {want:?}"),
            (Err(why), Ok(got)) => prop_assert!(false, "{v}: accepted as {got:?} but the reference refuses ({why})"),
            (Err(_), Err(e)) => {
                assert_client_error(&e);
                prop_assert_eq!(e.status().as_u16(), 422);
                prop_assert!(e.to_string().starts_with(key), "{e} does not name {key}");
            }
        }
    }

    /// Bytes: any body (a valid one cut short or with bytes changed, or noise) is parsed or
    /// refused with a 4xx; never a panic.
    #[test]
    fn any_bytes_are_parsed_or_refused(
        v in rows_value(),
        cut in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        noise in prop::collection::vec(any::<u8>(), 0..64),
        use_noise in any::<bool>(),
    ) {
        let mut body = if use_noise {
            noise
        } else {
            serde_json::to_vec(&json!({"model": "m", "inputs": v, "context": null})).unwrap()
        };
        if !body.is_empty() {
            for (i, b) in flips {
                let i = i.index(body.len());
                body[i] = b;
            }
            body.truncate(cut.index(body.len() + 1));
        }
        for r in [
            parse::<InputsRequest>(&body).err(),
            parse::<LatentsRequest>(&body).err(),
            parse::<ScoreRequest>(&body).err(),
            parse::<SampleRequest>(&body).err(),
        ].into_iter().flatten() {
            assert_client_error(&r);
        }
    }

    /// `/sample`: num_samples, seed and top are JSON Schema integers (3.0 is 3; 3.5, strings
    /// and out-of-range values are 422s naming the field).
    #[test]
    fn integers_are_whole_numbers_of_any_spelling(
        n in prop_oneof![number(), any_value()],
        seed in prop_oneof![Just(Value::Null), number()],
    ) {
        let body = serde_json::to_vec(&json!({"num_samples": n, "seed": seed})).unwrap();
        let whole = |v: &Value, lo: f64, hi: f64| -> Option<i128> {
            let x = v.as_f64()?;
            if let Some(i) = v.as_i64() { return ((i as f64) >= lo && (i as f64) <= hi).then_some(i as i128); }
            if let Some(u) = v.as_u64() { return ((u as f64) <= hi).then_some(u as i128); }
            (x.fract() == 0.0 && x >= lo && x <= hi).then_some(x as i128)
        };
        let want_n = whole(&n, i64::MIN as f64, i64::MAX as f64);
        let want_seed = if seed.is_null() { Some(None) } else { whole(&seed, 0.0, u64::MAX as f64).map(Some) };
        match parse::<SampleRequest>(&body) {
            Ok(r) => {
                prop_assert_eq!(Some(r.num_samples as i128), want_n, "{}", n);
                prop_assert_eq!(Some(r.seed.map(i128::from)), want_seed, "{}", seed);
            }
            Err(e) => {
                assert_client_error(&e);
                prop_assert!(want_n.is_none() || want_seed.is_none(), "{n} {seed}: refused ({e})");
                let msg = e.to_string();
                prop_assert!(msg.starts_with("num_samples") || msg.starts_with("seed"), "{msg}");
            }
        }
    }

    /// The Open Inference Protocol: any JSON part, any binary tail, any header length, through
    /// the same steps as the handler; every refusal is a 4xx, and inline FP32 data that
    /// decodes equals the reference flattening of `data`.
    #[test]
    fn v2_requests_decode_or_are_refused(
        shape in prop::collection::vec(prop_oneof![(0u64..4).prop_map(Value::from), number()], 0..4),
        datatype in prop_oneof![6 => Just("FP32"), 1 => Just("FP64"), 1 => Just("INT64"), 1 => Just("UINT32"), 1 => Just("BYTES")],
        data in prop_oneof![6 => rows_value(), 1 => any_value(), 1 => Just(Value::Null)],
        binary_size in prop_oneof![4 => Just(None), 1 => (0u64..64).prop_map(Some)],
        tail in prop::collection::vec(any::<u8>(), 0..48),
        header_delta in prop_oneof![3 => Just(None), 2 => Just(Some(0)), 1 => (-3i64..3).prop_map(Some)],
        flags in prop_oneof![3 => any::<bool>().prop_map(Value::from), 1 => any_value()],
        own_shape in prop::bool::weighted(0.85),
    ) {
        // Mostly the shape the data has, so that most requests decode.
        let shape = match reference(&data) {
            Ok(r) if own_shape => json!([r.count].iter().chain(&r.row_shape).collect::<Vec<_>>()),
            _ => Value::from(shape),
        };
        let mut input = json!({"name": "x", "shape": shape, "datatype": datatype, "data": data});
        if let Some(n) = binary_size {
            input["parameters"] = json!({"binary_data_size": n});
        }
        let head = serde_json::to_vec(&json!({
            "inputs": [input],
            "outputs": [{"name": "z", "parameters": {"binary_data": flags}}],
        })).unwrap();
        let mut body = head.clone();
        if header_delta.is_some() || tail.len() == 1 {
            body.extend_from_slice(&tail);
        }
        let length = header_delta.map(|d| (head.len() as i64 + d).to_string());
        let outcome = (|| -> Result<Vec<tensor::Input>, ApiError> {
            let (json_part, binary) = tensor::split_body(&body, length.as_deref())?;
            let mut req: InferHeader = parse(json_part)?;
            tensor::check_binary_flags(&req)?;
            tensor::decode_inputs(&mut req, binary)
        })();
        match outcome {
            Ok(inputs) => {
                prop_assert_eq!(inputs.len(), 1);
                let i = &inputs[0];
                let count: usize = i.shape.iter().product();
                if let (tensor::Data::F32(v), None) = (&i.data, binary_size) {
                    // Inline FP32: the flattened numbers, each as f32.
                    let mut flat = Vec::new();
                    fn flatten(v: &Value, out: &mut Vec<f64>) {
                        match v {
                            Value::Array(a) => a.iter().for_each(|x| flatten(x, out)),
                            Value::Number(n) => out.push(n.as_f64().unwrap()),
                            Value::Bool(b) => out.push(f64::from(u8::from(*b))),
                            _ => {}
                        }
                    }
                    flatten(&data, &mut flat);
                    prop_assert_eq!(v.len(), count);
                    prop_assert!(flat.iter().map(|&x| x as f32).eq(v.iter().copied()), "{data} vs {v:?}");
                }
            }
            Err(e) => {
                let s = e.status().as_u16();
                prop_assert!(s == 400 || s == 422 || s == 413, "{s}: {e}");
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }

    /// Headers: any Content-Type is JSON or a 415 naming what was sent; any
    /// x-request-timeout-ms is a whole number of milliseconds or a 400.
    #[test]
    fn headers_are_read_or_refused(ct in "[ -~]{0,40}", t in "[ -~]{0,24}") {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&ct) {
            headers.insert("content-type", v);
            let mime = ct.split(';').next().unwrap().trim().to_ascii_lowercase();
            let json = mime == "application/json" || mime.ends_with("+json");
            match check_json_type(&headers) {
                Ok(()) => prop_assert!(json, "{ct:?} taken as JSON"),
                Err(e) => {
                    prop_assert!(!json, "{ct:?} refused");
                    prop_assert_eq!(e.status().as_u16(), 415);
                }
            }
        }
        if let Ok(v) = HeaderValue::from_str(&t) {
            match timeout_ms(&v) {
                Ok(ms) => prop_assert_eq!(Some(ms), t.trim().parse::<u64>().ok()),
                Err(e) => {
                    prop_assert!(t.trim().parse::<u64>().is_err());
                    prop_assert_eq!(e.status().as_u16(), 400);
                }
            }
        }
    }
}

/// The reference itself can fail: a few bodies whose answers are known.
#[test]
fn the_reference_reads_what_the_wire_documents() {
    assert!(reference(&json!([[1, 2], [3, 4]])).is_ok());
    assert!(reference(&json!([[[[1]]]])).is_ok());
    assert!(reference(&json!([[[[[1]]]]])).is_err());
    assert!(reference(&json!([[1, 2], [3]])).is_err());
    assert!(reference(&json!([[1, null]])).is_err());
    assert!(reference(&json!([[1e39]])).is_err());
    assert!(reference(&json!(1)).is_err());
    let r = reference(&json!([[1.5, 2], [3, 4]])).unwrap();
    assert_eq!(
        (r.count, r.row_shape.clone(), r.values),
        (2, vec![2], vec![1.5, 2.0, 3.0, 4.0])
    );
}
