//! flowserve end to end: a real process, real HTTP, real ONNX Runtime, the bundled packages.

mod common;

use std::time::Duration;

use common::*;
use flowpack::Direction::{Decode, Encode};
use serde_json::{json, Value};

fn test_rows(d: usize, n: usize, seed: u64) -> Vec<f32> {
    // Deterministic rows around the data (standardised features are O(1); wine's are not,
    // so scale by the observed range in the manifest instead where it matters).
    (0..n * d)
        .map(|i| ((i as u64 * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn endpoints_match_the_graphs_run_directly() {
    let repo = bundled_models();
    let server = Server::start(&repo, &[]);
    server.ready().await;
    for name in [
        "digits",
        "moons",
        "shuttle",
        "wine",
        "wine_maf",
        "wine_maf_spline",
        "wine_nsf",
    ] {
        let dir = repo.join(name).join("1");
        let manifest = flowpack::Package::open(&dir).unwrap().manifest;
        let shape = manifest.event_shape.clone();
        let d: usize = shape.iter().product();
        // Points inside the observed range of each feature.
        let range = manifest.domain.observed_range.clone().unwrap();
        let x: Vec<f32> = test_rows(d, 37, 1)
            .chunks(d)
            .flat_map(|r| {
                r.iter()
                    .zip(&range)
                    .map(|(u, [lo, hi])| (*lo + (*u as f64 + 1.0) / 2.0 * (hi - lo)) as f32)
                    .collect::<Vec<_>>()
            })
            .collect();
        let want = direct(&dir, Encode, &x);

        let (s, lp) = server
            .post(
                "/log_prob",
                json!({"model": name, "inputs": rows_json(&x, &shape)}),
            )
            .await;
        assert_eq!(s, 200, "{lp}");
        assert_eq!(lp["model"], name);
        assert_eq!(lp["version"], 1);
        close(&floats(&lp["log_prob"]), &want[1], 1e-5, "log_prob");

        let (s, enc) = server
            .post(
                &format!("/v1/models/{name}/encode"),
                json!({"inputs": rows_json(&x, &shape)}),
            )
            .await;
        assert_eq!(s, 200);
        let z = floats(&enc["latents"]);
        close(&z, &want[0], 1e-5, "latents");
        close(&floats(&enc["log_prob"]), &want[1], 1e-5, "encode log_prob");
        assert_eq!(enc["latents"].as_array().unwrap().len(), 37);

        let (s, dec) = server
            .post(
                "/decode",
                json!({"model": name, "latents": rows_json(&z, &shape)}),
            )
            .await;
        assert_eq!(s, 200);
        let back = floats(&dec["samples"]);
        close(
            &back,
            &direct(&dir, Decode, &z)[0],
            1e-5,
            "decode as the graph computes it",
        );
        // decode(encode(x)) = x; for sequential (autoregressive) decodes, on the rows the
        // model finds plausible (|z| ≤ 6): rows spread over shuttle's whole observed box lie
        // far from its data, and inverting D affine steps in float32 at |z| in the hundreds
        // loses digits.
        // Spline flows map the far corners of that box through nearly flat stretches of
        // their splines, where float32 cannot invert to 1e-3 in x (1e-7 in y becomes 1e-7/f′):
        // for them, and for every model, the round trip is checked on the latent side, where
        // it is well-conditioned: encode(decode(z)) = z.
        let sequential = manifest.graphs.decode.cost == flowpack::Cost::Sequential;
        let config = &manifest.training.config["model"];
        let spline = config["family"] == "nsf" || config["transform"] == "spline";
        for ((zr, br), xr) in z.chunks(d).zip(back.chunks(d)).zip(x.chunks(d)) {
            if !spline && (!sequential || zr.iter().all(|v| v.abs() <= 6.0)) {
                close(br, xr, 1e-3, &format!("{name}: decode(encode(x))"));
            }
        }
        let again = direct(&dir, Encode, &back);
        for (ar, zr) in again[0].chunks(d).zip(z.chunks(d)) {
            if !sequential || zr.iter().all(|v| v.abs() <= 6.0) {
                close(ar, zr, 1e-3, &format!("{name}: encode(decode(z))"));
            }
        }

        let body = json!({"model": name, "num_samples": 5, "seed": 42, "temperature": 0.7});
        let (s1, a) = server.post("/sample", body.clone()).await;
        let (s2, b) = server
            .post(&format!("/v1/models/{name}/sample"), body)
            .await;
        assert_eq!((s1, s2), (200, 200));
        assert_eq!(a["samples"], b["samples"], "same seed, same samples");
        assert_eq!(a["seed"], 42);
        let samples = a["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 5);
        assert!(samples.iter().all(|r| floats(r).len() == d));
        assert!(
            samples
                .iter()
                .all(|r| r.as_array().unwrap().len() == shape[0]),
            "rows shaped by event_shape {shape:?}"
        );
        assert!(floats(&a["samples"]).iter().all(|v| v.is_finite()));
        // The samples are decode(z) for z from the shared seeded noise.
        let z = flowpack::sampling::latent_noise(5, d, 0.7, 42);
        close(
            &floats(&a["samples"]),
            &direct(&dir, Decode, &z)[0],
            1e-5,
            "samples",
        );
        // On rows the model itself finds plausible (its samples) the round trip holds in x
        // too, spline flows included.
        let drawn = floats(&a["samples"]);
        let zs = direct(&dir, Encode, &drawn);
        close(
            &direct(&dir, Decode, &zs[0])[0],
            &drawn,
            1e-3,
            &format!("{name}: decode(encode(sample))"),
        );
        let (_, c) = server
            .post("/sample", json!({"model": name, "num_samples": 5}))
            .await;
        assert_ne!(c["samples"], a["samples"], "no seed, fresh entropy");
    }
    let models = server.get_json("/v1/models").await;
    let names: Vec<&str> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec![
            "digits",
            "digits_by_label",
            "moons",
            "shuttle",
            "wine",
            "wine_by_quality",
            "wine_maf",
            "wine_maf_spline",
            "wine_nsf"
        ]
    );
    let maf = server.get_json("/v1/models/wine_maf").await;
    assert_eq!(maf["family"], "maf");
    assert_eq!(
        maf["cost"],
        json!({"encode": "one_pass", "decode": "sequential"}),
        "MAF samples sequentially"
    );
    // Spline flows: the autoregressive one samples sequentially, the coupling one does not.
    for (name, family, decode) in [
        ("wine_maf_spline", "maf", "sequential"),
        ("wine_nsf", "nsf", "one_pass"),
    ] {
        let m = server.get_json(&format!("/v1/models/{name}")).await;
        assert_eq!(m["family"], family);
        assert_eq!(
            m["cost"],
            json!({"encode": "one_pass", "decode": decode}),
            "{name}"
        );
    }
    let wine = server.get_json("/v1/models/wine").await;
    assert_eq!(wine["family"], "realnvp");
    assert_eq!(wine["event_shape"], json!([11]));
    assert_eq!(wine["cost"]["encode"], "one_pass");
    assert_eq!(wine["domain"]["features"].as_array().unwrap().len(), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_single_rows_are_batched_and_answered_to_the_right_client() {
    let repo = bundled_models();
    let server = std::sync::Arc::new(Server::start(&repo, &[]));
    server.ready().await;
    let dir = repo.join("moons").join("1");
    let clients = 48;
    let per_client = 20;
    let x: Vec<f32> = (0..clients * per_client * 2)
        .map(|i| ((i * 37 % 401) as f32 / 200.0) - 1.0)
        .collect();
    let want = direct(&dir, Encode, &x).remove(1);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let server = server.clone();
        let x = x.clone();
        let want = want.clone();
        tasks.push(tokio::spawn(async move {
            for k in 0..per_client {
                let i = c * per_client + k;
                let row = &x[2 * i..2 * i + 2];
                let (s, body) = server
                    .post("/log_prob", json!({"model": "moons", "inputs": [row]}))
                    .await;
                assert_eq!(s, 200, "{body}");
                let got = floats(&body["log_prob"]);
                assert!(
                    (got[0] - want[i]).abs() <= 1e-5 * (1.0 + want[i].abs()),
                    "client {c} got another client's answer"
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let text = server.metrics().await;
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let (mut count, mut single) = (0.0, 0.0);
    for s in &scrape.samples {
        if s.metric == "flowserve_batch_requests"
            && s.labels.get("model") == Some("moons")
            && s.labels.get("graph") == Some("encode")
        {
            if let prometheus_parse::Value::Histogram(h) = &s.value {
                for b in h {
                    if b.less_than == 1.0 {
                        single = b.count;
                    }
                    if b.less_than.is_infinite() {
                        count = b.count;
                    }
                }
            }
        }
    }
    assert!(count > 0.0, "batches were counted");
    assert!(
        single < count,
        "some batches held more than one request ({single} of {count} held one)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_4xx_json_error_naming_the_problem() {
    let server = Server::start(
        &bundled_models(),
        &[
            "--max-body-bytes",
            "4096",
            "--max-samples-per-request",
            "100",
        ],
    );
    server.ready().await;
    let deep = format!(
        "{{\"model\":\"moons\",\"inputs\":{}1{}}}",
        "[".repeat(200),
        "]".repeat(200)
    );
    // (path, content type, body, status, error type, a phrase the message must hold)
    type Case<'a> = (&'a str, Option<&'a str>, String, u16, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            "/log_prob",
            Some("application/json"),
            "{\"model\": \"moons\", \"inputs\": [[1, 2]".into(),
            400,
            "malformed_request",
            "malformed JSON",
        ),
        (
            "/log_prob",
            Some("application/json"),
            "".into(),
            400,
            "malformed_request",
            "empty",
        ),
        (
            "/log_prob",
            Some("text/plain"),
            "{}".into(),
            415,
            "unsupported_media_type",
            "application/json",
        ),
        (
            "/log_prob",
            None,
            "{}".into(),
            415,
            "unsupported_media_type",
            "application/json",
        ),
        (
            "/log_prob",
            Some("application/json"),
            r#"{"model": "moons"}"#.into(),
            422,
            "invalid_input",
            "inputs",
        ),
        (
            "/log_prob",
            Some("application/json"),
            r#"{"model": "moons", "inputs": []}"#.into(),
            422,
            "invalid_input",
            "inputs: the array is empty",
        ),
        (
            "/log_prob",
            Some("application/json"),
            r#"{"model": "moons", "inputs": [[1, 2], [3]]}"#.into(),
            422,
            "invalid_input",
            "row 1 has shape [1]",
        ),
        (
            "/log_prob",
            Some("application/json"),
            r#"{"model": "moons", "inputs": [[1, 2, 3]]}"#.into(),
            422,
            "invalid_input",
            "must have 2 numbers (x, y)",
        ),
        (
            "/log_prob",
            Some("application/json"),
            r#"{"model": "moons", "inputs": [1, 2]}"#.into(),
            422,
            "invalid_input",
            "bare number",
        ),
        (
            "/log_prob",
            Some("application/json"),
            r#"{"model": "moons", "inputs": [[1, NaN]]}"#.into(),
            400,
            "malformed_request",
            "NaN",
        ),
        (
            "/log_prob",
            Some("application/json"),
            r#"{"model": "moons", "inputs": [[1, Infinity]]}"#.into(),
            400,
            "malformed_request",
            "Infinity",
        ),
        (
            "/log_prob",
            Some("application/json"),
            r#"{"model": "moons", "inputs": [[1, 1e999]]}"#.into(),
            422,
            "invalid_input",
            "inputs[0][1]",
        ),
        (
            "/log_prob",
            Some("application/json"),
            r#"{"model": "moons", "inputs": [[1, 1e300]]}"#.into(),
            422,
            "invalid_input",
            "float32 range",
        ),
        (
            "/log_prob",
            Some("application/json"),
            r#"{"model": "moons", "inputs": [[1, "2"]]}"#.into(),
            422,
            "invalid_input",
            "inputs[0][1]: invalid type: string",
        ),
        (
            "/log_prob",
            Some("application/json"),
            r#"{"model": "moons", "inputs": [[1, null]]}"#.into(),
            422,
            "invalid_input",
            "inputs[0][1]: invalid type: null",
        ),
        (
            "/log_prob",
            Some("application/json"),
            r#"{"model": "moons", "inputs": [[[[[[1]]]]]]}"#.into(),
            422,
            "invalid_input",
            "nested deeper",
        ),
        (
            "/log_prob",
            Some("application/json"),
            deep,
            422,
            "invalid_input",
            "nested deeper",
        ),
        (
            "/log_prob",
            Some("application/json"),
            format!(
                "{{\"model\": \"moons\", \"inputs\": [{}[1, 2]]}}",
                "[1, 2], ".repeat(1000)
            ),
            413,
            "payload_too_large",
            "limit is 4096",
        ),
        (
            "/log_prob",
            Some("application/json"),
            r#"{"model": "nope", "inputs": [[1, 2]]}"#.into(),
            404,
            "model_not_found",
            "\"nope\"",
        ),
        (
            "/v1/models/..%2F..%2Fetc/log_prob",
            Some("application/json"),
            r#"{"inputs": [[1, 2]]}"#.into(),
            404,
            "model_not_found",
            "../../etc",
        ),
        (
            "/log_prob",
            Some("application/json"),
            r#"{"model": "../moons", "inputs": [[1, 2]]}"#.into(),
            404,
            "model_not_found",
            "../moons",
        ),
        (
            "/log_prob",
            Some("application/json"),
            r#"{"inputs": [[1, 2]]}"#.into(),
            422,
            "invalid_input",
            "digits, digits_by_label, moons, shuttle, wine, wine_by_quality, wine_maf, wine_maf_spline, wine_nsf",
        ),
        (
            "/log_prob",
            Some("application/json"),
            r#"{"model": "moons", "inputs": [[1, 2]], "extra": 1}"#.into(),
            422,
            "invalid_input",
            "unknown field `extra`",
        ),
        (
            "/v1/models/wine/log_prob",
            Some("application/json"),
            r#"{"model": "moons", "inputs": [[1, 2]]}"#.into(),
            422,
            "invalid_input",
            "URL names",
        ),
        (
            "/sample",
            Some("application/json"),
            r#"{"model": "moons", "num_samples": 0}"#.into(),
            422,
            "invalid_input",
            "num_samples must be between 1 and 100, got 0",
        ),
        (
            "/sample",
            Some("application/json"),
            r#"{"model": "moons", "num_samples": -3}"#.into(),
            422,
            "invalid_input",
            "num_samples",
        ),
        (
            "/sample",
            Some("application/json"),
            r#"{"model": "moons", "num_samples": 101}"#.into(),
            422,
            "invalid_input",
            "got 101",
        ),
        (
            "/sample",
            Some("application/json"),
            r#"{"model": "moons", "num_samples": 2, "temperature": -1}"#.into(),
            422,
            "invalid_input",
            "temperature",
        ),
        (
            "/sample",
            Some("application/json"),
            r#"{"model": "moons", "num_samples": 2, "temperature": "NaN"}"#.into(),
            422,
            "invalid_input",
            "temperature",
        ),
        (
            "/sample",
            Some("application/json"),
            r#"{"model": "moons", "num_samples": 2.5}"#.into(),
            422,
            "invalid_input",
            "num_samples",
        ),
        (
            "/decode",
            Some("application/json"),
            r#"{"model": "moons", "latents": [[1]]}"#.into(),
            422,
            "invalid_input",
            "latents",
        ),
        (
            "/nowhere",
            Some("application/json"),
            "{}".into(),
            404,
            "not_found",
            "/nowhere",
        ),
    ];
    for (path, ct, body, status, kind, needle) in cases {
        let (s, headers, v) = server.post_raw(path, ct, body.into_bytes()).await;
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert_eq!(s, status, "{path} {ct:?}: {v}");
        assert_eq!(v["error"]["type"], kind, "{path}: {v}");
        assert!(
            msg.contains(needle),
            "{path}: {msg:?} should mention {needle:?}"
        );
        assert!(headers
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("application/json"));
    }
    let r = server
        .client
        .get(server.url("/log_prob"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    // Still serving, and the bad requests were counted.
    let (s, _) = server
        .post(
            "/log_prob",
            json!({"model": "moons", "inputs": [[0.5, 0.25]]}),
        )
        .await;
    assert_eq!(s, 200);
    assert!(server
        .metrics()
        .await
        .contains("flowserve_rejections_total{model=\"moons\",reason=\"invalid\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_is_answered_with_429_at_once_and_admitted_requests_succeed() {
    let server = std::sync::Arc::new(Server::start(
        &bundled_models(),
        &["--max-queue-rows", "8", "--max-batch-rows", "8"],
    ));
    server.ready().await;
    let row = [
        7.4f32, 0.7, 0.0, 1.9, 0.076, 11.0, 34.0, 0.9978, 3.51, 0.56, 9.4,
    ];
    let rows: Vec<[f32; 11]> = vec![row; 8];
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let server = server.clone();
        let rows = rows.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for _ in 0..10 {
                let started = std::time::Instant::now();
                let body = json!({"model": "wine", "inputs": rows});
                let r = server
                    .client
                    .post(server.url("/log_prob"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let retry = r.headers().get("retry-after").is_some();
                let body: Value = r.json().await.unwrap();
                out.push((status, retry, started.elapsed(), body));
            }
            out
        }));
    }
    let (mut ok, mut rejected) = (0, 0);
    for t in tasks {
        for (status, retry, took, body) in t.await.unwrap() {
            match status {
                200 => {
                    ok += 1;
                    assert_eq!(body["log_prob"].as_array().unwrap().len(), 8);
                }
                429 => {
                    rejected += 1;
                    assert!(retry, "429 carries Retry-After");
                    assert_eq!(body["error"]["type"], "overloaded");
                    assert!(took < Duration::from_secs(2), "rejected quickly ({took:?})");
                }
                other => panic!("unexpected {other}: {body}"),
            }
        }
    }
    assert!(ok > 0 && rejected > 0, "{ok} admitted, {rejected} rejected");
    assert!(server
        .metrics()
        .await
        .contains("flowserve_rejections_total{model=\"wine\",reason=\"overloaded\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_package_is_refused_while_the_valid_ones_serve() {
    let tmp = repo_copy();
    let root = tmp.path().to_path_buf();
    // wine v2: a changed graph (sha256 mismatch); moons-bad: a manifest whose shapes lie.
    copy_dir(&root.join("wine/1"), &root.join("wine/2"));
    let mut g = std::fs::read(root.join("wine/2/encode.onnx")).unwrap();
    g.push(0);
    std::fs::write(root.join("wine/2/encode.onnx"), g).unwrap();
    copy_dir(&root.join("moons/1"), &root.join("moons_bad/1"));
    let path = root.join("moons_bad/1/flow.json");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "\"event_shape\": [\n    2\n  ]",
        "\"event_shape\": [\n    3\n  ]",
    );
    std::fs::write(&path, text).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();

    let server = Server::start_owned(&root, &[], Some(tmp));
    server.ready().await;
    let models = server.get_json("/v1/models").await;
    let served: Vec<(String, u64)> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["version"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        served,
        vec![
            ("digits".to_string(), 1),
            ("digits_by_label".to_string(), 1),
            ("moons".to_string(), 1),
            ("shuttle".to_string(), 1),
            ("wine".to_string(), 1),
            ("wine_by_quality".to_string(), 1),
            ("wine_maf".to_string(), 1),
            ("wine_maf_spline".to_string(), 1),
            ("wine_nsf".to_string(), 1)
        ],
        "wine falls back to version 1"
    );
    let failures = models["unavailable"].as_array().unwrap();
    let reason = |m: &str| {
        failures
            .iter()
            .find(|f| f["model"] == m)
            .map(|f| f["reason"].as_str().unwrap().to_string())
            .unwrap_or_default()
    };
    assert!(reason("wine").contains("sha256"), "{}", reason("wine"));
    assert!(
        reason("moons_bad").contains("event_shape"),
        "{}",
        reason("moons_bad")
    );
    assert!(
        reason("empty").contains("no version folders"),
        "{}",
        reason("empty")
    );
    let (s, _) = server.post("/log_prob", json!({"model": "wine", "inputs": [[7.4,0.7,0.0,1.9,0.076,11.0,34.0,0.9978,3.51,0.56,9.4]]})).await;
    assert_eq!(s, 200);
    let (s, v) = server
        .post(
            "/log_prob",
            json!({"model": "moons_bad", "inputs": [[1, 2, 3]]}),
        )
        .await;
    assert_eq!(s, 404, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_family_is_there_before_the_first_request_and_parses() {
    let server = Server::start(&bundled_models(), &[]);
    server.ready().await;
    let text = server.metrics().await;
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let families: std::collections::BTreeSet<&str> =
        scrape.docs.keys().map(String::as_str).collect();
    for f in [
        "flowserve_requests_total",
        "flowserve_rows_total",
        "flowserve_request_duration_seconds",
        "flowserve_queue_duration_seconds",
        "flowserve_inference_duration_seconds",
        "flowserve_batch_rows",
        "flowserve_batch_requests",
        "flowserve_queue_rows",
        "flowserve_in_flight_requests",
        "flowserve_rejections_total",
        "flowserve_model_load_duration_seconds",
        "flowserve_model_info",
        "flowserve_model_load_failures_total",
        "flowserve_log_prob",
        "flowserve_build_info",
    ] {
        assert!(
            families.contains(f),
            "{f} missing from a scrape before any request:\n{text}"
        );
    }
    assert!(text.contains("flowserve_request_duration_seconds_bucket{endpoint=\"log_prob\",model=\"moons\",version=\"1\",le=\"0.00005\"} 0"));
    assert!(text.contains(
        "flowserve_model_info{decode_provider=\"cpu\",encode_provider=\"cpu\",family=\"realnvp\",model=\"wine\",requested=\"cpu\",version=\"1\"} 1"
    ));
    let (s, _) = server
        .post(
            "/log_prob",
            json!({"model": "moons", "inputs": [[0.1, 0.2], [0.3, 0.4]]}),
        )
        .await;
    assert_eq!(s, 200);
    let text = server.metrics().await;
    assert!(text.contains("flowserve_rows_total{endpoint=\"log_prob\",model=\"moons\",outcome=\"ok\",version=\"1\"} 2"), "{text}");
    assert!(text.contains("flowserve_log_prob_count{model=\"moons\",version=\"1\"} 2"));
    let h = server
        .client
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_flips_readiness_drains_admitted_requests_and_exits_zero() {
    let mut server = Server::start(
        &bundled_models(),
        &[
            "--max-queue-delay-us",
            "300000",
            "--max-batch-rows",
            "100000",
            "--drain-delay-ms",
            "2500",
        ],
    );
    server.ready().await;
    // Each request waits 300 ms for its batch to fill, so these are in flight at SIGTERM.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let client = server.client.clone();
        let url = server.url("/log_prob");
        tasks.push(tokio::spawn(async move {
            client
                .post(url)
                .json(&json!({"model": "moons", "inputs": [[i as f32 / 16.0, 0.5]]}))
                .send()
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.terminate();
    // Readiness turns 503 as soon as the signal is handled; the listener stays open for the
    // drain delay, so poll within it.
    let polled = std::time::Instant::now();
    let r = loop {
        let r = server
            .client
            .get(server.url("/readyz"))
            .send()
            .await
            .unwrap();
        if r.status() != 200 || polled.elapsed() > Duration::from_secs(2) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(r.status(), 503, "not ready while draining");
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("draining"));
    let h = server
        .client
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 200, "still alive while draining");
    for t in tasks {
        let r = t
            .await
            .unwrap()
            .expect("an admitted request gets its answer");
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert!(v["log_prob"][0].as_f64().unwrap().is_finite());
    }
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_requests_are_split_across_batches_and_reassembled_in_order() {
    let repo = bundled_models();
    let server = Server::start(&repo, &["--max-batch-rows", "3"]);
    server.ready().await;
    let dir = repo.join("moons").join("1");
    let x: Vec<f32> = (0..2 * 50).map(|i| (i as f32 * 0.37).sin() * 1.5).collect();
    let want = direct(&dir, Encode, &x);
    let (s, v) = server
        .post(
            "/encode",
            json!({"model": "moons", "inputs": rows_json(&x, &[2])}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    close(&floats(&v["latents"]), &want[0], 1e-5, "latents in order");
    close(&floats(&v["log_prob"]), &want[1], 1e-5, "log_prob in order");
    let text = server.metrics().await;
    assert!(
        text.contains(
            "flowserve_batch_rows_count{graph=\"encode\",model=\"moons\",version=\"1\"} 17"
        ),
        "50 rows in batches of 3: 17 batches"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_gets_504_and_is_counted() {
    let server = Server::start(&bundled_models(), &["--max-queue-delay-us", "2000000"]);
    server.ready().await;
    let started = std::time::Instant::now();
    let r = server
        .client
        .post(server.url("/log_prob"))
        .header("x-request-timeout-ms", "150")
        .json(&json!({"model": "moons", "inputs": [[0.1, 0.2]]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "answered at the deadline, not after the batch"
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "deadline_exceeded");
    let r = server
        .client
        .post(server.url("/log_prob"))
        .header("x-request-timeout-ms", "soon")
        .json(&json!({"model": "moons", "inputs": [[0.1, 0.2]]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // The expired entry is skipped when the queue next forms a batch, and counted.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let text = server.metrics().await;
    assert!(
        text.contains("flowserve_rejections_total{model=\"moons\",reason=\"timeout\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_models_and_liveness_does_not() {
    let empty = tempfile::tempdir().unwrap();
    let server = Server::start(empty.path(), &[]);
    let h = server
        .client
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = server
        .client
        .get(server.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "no model loaded: not ready");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "unavailable");
}

/// Image models: `/sample` with `"format": "png"` returns a picture of the requested grid
/// (base64 in JSON, or the PNG itself for `Accept: image/png`); temperature 0 gives the
/// decoded zero latent; asking a tabular model for a picture is a 422 naming `format`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_png_is_a_picture_of_the_grid() {
    use base64::Engine as _;
    let repo = bundled_models();
    let server = Server::start(&repo, &[]);
    server.ready().await;
    let decode_png = |bytes: &[u8]| {
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .expect("a valid PNG");
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).expect("a PNG frame");
        (info.width, info.height, buf)
    };
    // 10 samples of 8×8: a 4 × 3 grid of 58-px cells (8 px × 7, 2-px gutters).
    let body = json!({"model": "digits", "num_samples": 10, "seed": 3, "format": "png"});
    let (s, v) = server.post("/sample", body.clone()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["format"], "png");
    assert_eq!(v["columns"], 4);
    assert_eq!(v["seed"], 3);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v["png"].as_str().unwrap())
        .unwrap();
    let (w, h, pixels) = decode_png(&bytes);
    assert_eq!((w, h), (4 * 58 + 2, 3 * 58 + 2));
    assert!(
        pixels.iter().any(|&p| p < 128) && pixels.iter().any(|&p| p > 128),
        "a picture, not a blank"
    );

    let r = server
        .client
        .post(server.url("/v1/models/digits/sample"))
        .header("accept", "image/png")
        .json(&json!({"num_samples": 10, "seed": 3, "format": "png"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert!(r.headers().contains_key("x-inference-time-us"));
    let raw = r.bytes().await.unwrap();
    assert_eq!(
        raw.as_ref(),
        bytes.as_slice(),
        "the same picture either way"
    );

    // Temperature 0: every sample is the decoded zero latent.
    let (s, cold) = server
        .post(
            "/sample",
            json!({"model": "digits", "num_samples": 3, "temperature": 0.0}),
        )
        .await;
    assert_eq!(s, 200);
    let (s, zero) = server
        .post(
            "/decode",
            json!({"model": "digits", "latents": rows_json(&[0.0; 64], &[1, 8, 8])}),
        )
        .await;
    assert_eq!(s, 200);
    let zero = floats(&zero["samples"]);
    let cold = floats(&cold["samples"]);
    for k in 0..3 {
        close(&cold[k * 64..(k + 1) * 64], &zero, 1e-6, "T = 0 sample");
    }
    let direct_zero = direct(&repo.join("digits/1"), Decode, &[0.0; 64]);
    close(&zero, &direct_zero[0], 1e-5, "decode(0) vs the graph");

    let (s, e) = server
        .post(
            "/sample",
            json!({"model": "moons", "num_samples": 4, "format": "png"}),
        )
        .await;
    assert_eq!(s, 422, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("format"));
    let (s, e) = server
        .post(
            "/sample",
            json!({"model": "digits", "num_samples": 4, "format": "gif"}),
        )
        .await;
    assert!((400..500).contains(&s), "{s} {e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("format"),
        "{e}"
    );
}

/// A response never carries a non-finite number (JSON would say `null`): a temperature or
/// an input that overflows float32 is a 422 naming the field and the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflowing_values_are_a_422_never_nulls() {
    let server = Server::start(&bundled_models(), &[]);
    server.ready().await;
    let cases = [
        (
            "/sample",
            json!({"model": "moons", "num_samples": 2, "temperature": 1e308}),
            "temperature: 1e308 makes the latent noise overflow",
        ),
        (
            "/log_prob",
            json!({"model": "moons", "inputs": [[0.5, 0.5], [3e38, 1.0]]}),
            "inputs[1]: log_prob is not a finite float32",
        ),
        (
            "/encode",
            json!({"model": "wine", "inputs": [vec![3e38f32; 11]]}),
            "inputs[0]",
        ),
        (
            "/decode",
            json!({"model": "moons", "latents": [[0.1, 0.2], [3e38, 3e38]]}),
            "latents[1]: the decoded sample overflowed float32",
        ),
    ];
    for (path, body, needle) in cases {
        let (s, v) = server.post(path, body).await;
        assert_eq!(s, 422, "{path}: {v}");
        assert_eq!(v["error"]["type"], "invalid_input");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(needle),
            "{path}: {msg:?} should say {needle:?}"
        );
    }
    // A large but representable temperature still answers with finite numbers.
    let (s, v) = server
        .post(
            "/sample",
            json!({"model": "moons", "num_samples": 3, "temperature": 1e6}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert!(floats(&v["samples"]).iter().all(|x| x.is_finite()));
}

/// `--max-request-rows` bounds rows and samples per request, apart from the queue's size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_row_limit_is_its_own_flag() {
    let server = Server::start(&bundled_models(), &["--max-request-rows", "4"]);
    server.ready().await;
    let (s, _) = server
        .post(
            "/log_prob",
            json!({"model": "moons", "inputs": vec![[0.1, 0.2]; 4]}),
        )
        .await;
    assert_eq!(s, 200);
    let (s, v) = server
        .post(
            "/log_prob",
            json!({"model": "moons", "inputs": vec![[0.1, 0.2]; 5]}),
        )
        .await;
    assert_eq!(s, 413, "{v}");
    assert_eq!(v["error"]["type"], "payload_too_large");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("5 rows in one request; the limit is 4"));
    let (s, v) = server
        .post("/sample", json!({"model": "moons", "num_samples": 5}))
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("between 1 and 4"));
}

/// Failed requests are measured too: their status, the rows they brought, their latency
/// and why they failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_requests_are_counted_with_rows_latency_and_reason() {
    let server = Server::start(&bundled_models(), &["--max-queue-delay-us", "2000000"]);
    server.ready().await;
    let r = server
        .client
        .post(server.url("/v1/models/moons/log_prob"))
        .header("x-request-timeout-ms", "100")
        .json(&json!({"inputs": [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert!(r.headers().contains_key("x-total-time-us"));
    let (s, _) = server
        .post("/log_prob", json!({"model": "moons", "inputs": []}))
        .await;
    assert_eq!(s, 422);
    let (s, _) = server
        .post("/log_prob", json!({"model": "nope", "inputs": [[1, 2]]}))
        .await;
    assert_eq!(s, 404);
    let text = server.metrics().await;
    for line in [
        "flowserve_requests_total{code=\"504\",endpoint=\"log_prob\",model=\"moons\",version=\"1\"} 1",
        "flowserve_requests_total{code=\"422\",endpoint=\"log_prob\",model=\"moons\",version=\"1\"} 1",
        "flowserve_requests_total{code=\"404\",endpoint=\"log_prob\",model=\"\",version=\"\"} 1",
        "flowserve_rows_total{endpoint=\"log_prob\",model=\"moons\",outcome=\"error\",version=\"1\"} 3",
        "flowserve_rows_total{endpoint=\"log_prob\",model=\"moons\",outcome=\"ok\",version=\"1\"} 0",
        "flowserve_request_duration_seconds_count{endpoint=\"log_prob\",model=\"moons\",version=\"1\"} 2",
        "flowserve_rejections_total{model=\"moons\",reason=\"timeout\"} 1",
        "flowserve_rejections_total{model=\"moons\",reason=\"invalid\"} 1",
        "flowserve_rejections_total{model=\"\",reason=\"invalid\"} 1",
        "flowserve_in_flight_requests 0",
    ] {
        assert!(text.contains(line), "missing {line}:\n{text}");
    }
}

/// A drain that runs out of time exits non-zero, so an orchestrator can tell that requests
/// were cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_cut_short_exits_non_zero() {
    let mut server = Server::start(
        &bundled_models(),
        &[
            "--max-queue-delay-us",
            "5000000",
            "--max-batch-rows",
            "1000",
            "--shutdown-timeout-ms",
            "300",
        ],
    );
    server.ready().await;
    let client = server.client.clone();
    let url = server.url("/log_prob");
    let pending = tokio::spawn(async move {
        client
            .post(url)
            .json(&json!({"model": "moons", "inputs": [[0.1, 0.2]]}))
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    server.terminate();
    let status = server.child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "exited at the timeout, not after the batch ({:?})",
        started.elapsed()
    );
    assert!(
        pending.await.unwrap().is_err(),
        "the cut-off request got no answer"
    );
}
