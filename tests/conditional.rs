//! Conditional models served end to end: the bundled `wine_by_quality` (a MAF of wine's
//! features given its quality, categories 3–8) and `digits_by_label` (a class-conditional
//! Glow). Every route takes `context` beside its rows and answers what the graphs compute
//! run directly with that context; the Open Inference Protocol takes it as a second
//! tensor; bad context gets a 422 naming the element.

mod common;

use common::*;
use flowpack::Direction::{Decode, Encode};
use flowpack::Manifest;
use serde_json::{json, Value};

/// `n` deterministic rows inside each feature's observed range.
fn rows(m: &Manifest, n: usize) -> Vec<f32> {
    let d: usize = m.event_shape.iter().product();
    let range = m.domain.observed_range.clone().unwrap();
    (0..n * d)
        .map(|i| {
            let u = ((i as u64 * 7919 + 17) % 1000) as f64 / 1000.0;
            let [lo, hi] = range[i % d];
            (lo + (0.25 + 0.5 * u) * (hi - lo)) as f32
        })
        .collect()
}

fn manifest(name: &str) -> Manifest {
    flowpack::Package::open(bundled_models().join(name).join("1"))
        .unwrap()
        .manifest
}

const QUALITIES: [&str; 6] = ["3", "4", "5", "6", "7", "8"];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_route_takes_a_context_and_answers_as_the_graphs_do() {
    let repo = bundled_models();
    let server = Server::start(&repo, &[]);
    server.ready().await;
    let name = "wine_by_quality";
    let dir = repo.join(name).join("1");
    let m = manifest(name);
    let spec = m.context.clone().expect("a conditional package");
    assert_eq!(spec.columns[0].name, "quality");
    let d = m.event_shape[0];
    let n = 12;
    let x = rows(&m, n);
    // Qualities cycle through the categories; as objects, arrays, names and numbers.
    let index: Vec<f32> = (0..n).map(|i| (i % 6) as f32).collect();
    let context: Vec<Value> = (0..n)
        .map(|i| match i % 3 {
            0 => json!({"quality": QUALITIES[i % 6]}),
            1 => json!([QUALITIES[i % 6]]),
            _ => json!({"quality": QUALITIES[i % 6].parse::<i64>().unwrap()}),
        })
        .collect();
    let want = direct_given(&dir, Encode, &x, &index);
    let inputs = rows_json(&x, &[d]);

    let (s, lp) = server
        .post(
            "/log_prob",
            json!({"model": name, "inputs": inputs, "context": context}),
        )
        .await;
    assert_eq!(s, 200, "{lp}");
    close(
        &floats(&lp["log_prob"]),
        &want[1],
        1e-5,
        "log p(x | quality)",
    );
    // The context matters: every row at quality 5 scores differently.
    let all5 = vec![json!({"quality": "5"}); n];
    let (_, lp5) = server
        .post(
            "/log_prob",
            json!({"model": name, "inputs": inputs, "context": all5}),
        )
        .await;
    let moved = floats(&lp5["log_prob"])
        .iter()
        .zip(&want[1])
        .filter(|(a, b)| (*a - *b).abs() > 1e-3)
        .count();
    assert!(
        moved >= n / 2,
        "the context changes the scores ({moved} of {n})"
    );

    let (s, enc) = server
        .post(
            &format!("/v1/models/{name}/encode"),
            json!({"inputs": inputs, "context": context}),
        )
        .await;
    assert_eq!(s, 200, "{enc}");
    let z = floats(&enc["latents"]);
    close(&z, &want[0], 1e-5, "latents");

    let (s, dec) = server
        .post(
            "/decode",
            json!({"model": name, "latents": rows_json(&z, &[d]), "context": context}),
        )
        .await;
    assert_eq!(s, 200, "{dec}");
    close(
        &floats(&dec["samples"]),
        &direct_given(&dir, Decode, &z, &index)[0],
        1e-5,
        "decode given the context",
    );

    let (s, score) = server
        .post(
            "/score",
            json!({"model": name, "inputs": inputs, "context": context}),
        )
        .await;
    assert_eq!(s, 200, "{score}");
    let scores = score["scores"].as_array().unwrap();
    assert_eq!(scores.len(), n);
    for (r, want) in scores.iter().zip(&want[1]) {
        close(
            &[r["log_prob"].as_f64().unwrap() as f32],
            &[*want],
            1e-5,
            "score",
        );
        let p = r["tail_probability"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&p));
    }

    // One context for all samples, or one per sample; seeded, reproducible, and what the
    // decode graph gives for the seed's latents.
    let body = json!({"model": name, "num_samples": 6, "seed": 9, "context": {"quality": "7"}});
    let (s, a) = server.post("/sample", body.clone()).await;
    assert_eq!(s, 200, "{a}");
    let (_, b) = server.post("/sample", body).await;
    assert_eq!(a["samples"], b["samples"]);
    let zs = flowpack::sampling::latent_noise(6, d, 1.0, 9);
    close(
        &floats(&a["samples"]),
        &direct_given(&dir, Decode, &zs, &[4.0; 6])[0],
        1e-5,
        "samples at quality 7",
    );
    let per: Vec<Value> = (0..6).map(|i| json!([QUALITIES[i]])).collect();
    let (s, c) = server
        .post(
            "/sample",
            json!({"model": name, "num_samples": 6, "seed": 9, "context": per}),
        )
        .await;
    assert_eq!(s, 200, "{c}");
    let idx: Vec<f32> = (0..6).map(|i| i as f32).collect();
    close(
        &floats(&c["samples"]),
        &direct_given(&dir, Decode, &zs, &idx)[0],
        1e-5,
        "one context per sample",
    );

    // The model list says what the context is.
    let info = server.get_json(&format!("/v1/models/{name}")).await;
    assert_eq!(info["context"]["columns"][0]["name"], "quality");
    assert_eq!(info["context"]["columns"][0]["kind"], "categorical");
    assert_eq!(
        info["context"]["columns"][0]["categories"],
        json!(QUALITIES)
    );
    let moons = server.get_json("/v1/models/moons").await;
    assert!(moons.get("context").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_context_is_a_422_naming_the_element() {
    let repo = bundled_models();
    let server = Server::start(&repo, &[]);
    server.ready().await;
    let m = manifest("wine_by_quality");
    let inputs = rows_json(&rows(&m, 2), &[m.event_shape[0]]);
    let cases = [
        (
            json!(null),
            "model \"wine_by_quality\" is conditional on (quality)",
        ),
        (json!([{"quality": "5"}]), "1 context rows for 2 input rows"),
        (
            json!([{"quality": "5"}, {"quality": "9"}]),
            "context[1].quality: context column \"quality\" has no category \"9\"",
        ),
        (
            json!([{"quality": "5"}, {"qualty": "5"}]),
            "context[1].qualty: the model has no context column",
        ),
        (json!([{"quality": "5"}, {}]), "context[1].quality: missing"),
        (
            json!([["5"], ["5", "6"]]),
            "context[1]: 2 values; the model's context has 1 (quality)",
        ),
        (
            json!([["5"], [true]]),
            "context[1][0]: a context value is a number or a string, not a boolean",
        ),
        (json!([["5"], 5]), "context[1]: a context row is an object"),
        (json!({"quality": "5"}), "an array of context rows"),
    ];
    for (context, says) in cases {
        let mut body = json!({"model": "wine_by_quality", "inputs": inputs});
        if !context.is_null() {
            body["context"] = context;
        }
        for path in ["/log_prob", "/score", "/encode"] {
            let (s, e) = server.post(path, body.clone()).await;
            assert_eq!(s, 422, "{path} {body}: {e}");
            let msg = e["error"]["message"].as_str().unwrap_or_default();
            assert!(msg.contains(says), "{path}: {says:?} not in {msg:?}");
        }
    }
    // A context sent to an unconditional model is refused, not ignored.
    let (s, e) = server
        .post(
            "/log_prob",
            json!({"model": "moons", "inputs": [[0.0, 0.0]], "context": [["5"]]}),
        )
        .await;
    assert_eq!(s, 422);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unconditional"),
        "{e}"
    );
    let (s, e) = server
        .post(
            "/sample",
            json!({"model": "digits_by_label", "num_samples": 3, "context": [["1"], ["2"]]}),
        )
        .await;
    assert_eq!(s, 422);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2 context rows for 3"),
        "{e}"
    );
    let (s, e) = server
        .post(
            "/sample",
            json!({"model": "digits_by_label", "num_samples": 3}),
        )
        .await;
    assert_eq!(s, 422);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("conditional on (label)"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_open_inference_protocol_takes_the_context_as_a_second_tensor() {
    let repo = bundled_models();
    let server = Server::start(&repo, &[]);
    server.ready().await;
    let name = "wine_by_quality";
    let dir = repo.join(name).join("1");
    let m = manifest(name);
    let d = m.event_shape[0];
    let n = 4;
    let x = rows(&m, n);
    let index = [0.0f32, 2.0, 3.0, 5.0];
    let meta = server.get_json(&format!("/v2/models/{name}")).await;
    let inputs: Vec<&str> = meta["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(inputs, ["x", "context"], "{meta}");
    assert_eq!(meta["inputs"][1]["shape"], json!([-1, 1]));

    let body = |context: Vec<f32>| {
        json!({"inputs": [
            {"name": "x", "datatype": "FP32", "shape": [n, d], "data": x},
            {"name": "context", "datatype": "FP32", "shape": [n, 1], "data": context},
        ], "outputs": [{"name": "log_prob"}]})
    };
    let (s, r) = server
        .post(&format!("/v2/models/{name}/infer"), body(index.to_vec()))
        .await;
    assert_eq!(s, 200, "{r}");
    let want = direct_given(&dir, Encode, &x, &index);
    close(
        &floats(&r["outputs"][0]["data"]),
        &want[1],
        1e-5,
        "v2 log_prob",
    );

    let (s, e) = server
        .post(
            &format!("/v2/models/{name}/infer"),
            body(vec![0.0, 2.0, 6.0, 1.5]),
        )
        .await;
    assert_eq!(s, 422, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("context[2][0]"),
        "{e}"
    );
    let (s, e) = server
        .post(
            &format!("/v2/models/{name}/infer"),
            json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [n, d], "data": x}]}),
        )
        .await;
    assert_eq!(s, 422, "{e}");
    assert!(e["error"].as_str().unwrap().contains("conditional"), "{e}");

    // .sample: one context row for every sample.
    let (s, r) = server
        .post(
            "/v2/models/digits_by_label.sample/infer",
            json!({"inputs": [
                {"name": "num_samples", "datatype": "INT64", "shape": [1], "data": [3]},
                {"name": "seed", "datatype": "UINT64", "shape": [1], "data": [5]},
                {"name": "context", "datatype": "FP32", "shape": [1, 1], "data": [7.0]},
            ]}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    let zs = flowpack::sampling::latent_noise(3, 64, 1.0, 5);
    let dir = repo.join("digits_by_label").join("1");
    close(
        &floats(&r["outputs"][0]["data"]),
        &direct_given(&dir, Decode, &zs, &[7.0; 3])[0],
        1e-4,
        "v2 samples of 7s",
    );
}
