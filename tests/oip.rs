//! The Open Inference Protocol (KServe v2) end to end: a real server on the bundled packages,
//! real HTTP (JSON and binary tensors, gzip bodies), and the real client — `tritonclient`
//! from PyPI, which `make test` installs — with results equal to the graphs run directly.

mod common;

use std::io::Write;
use std::path::Path;

use common::*;
use flowpack::Direction::{Decode, Encode};
use flowpack::Manifest;
use serde_json::{json, Value};

/// The bundled unconditional models (the conditional ones' context tensor is tested in
/// tests/conditional.rs).
const MODELS: [&str; 5] = ["digits", "moons", "shuttle", "wine", "wine_maf"];

/// `n` deterministic rows inside each feature's observed range.
fn rows(m: &Manifest, n: usize, seed: u64) -> Vec<f32> {
    let d: usize = m.event_shape.iter().product();
    let range = m.domain.observed_range.clone().unwrap();
    (0..n * d)
        .map(|i| {
            let u = ((i as u64 * 7919 + seed * 104_729) % 1000) as f64 / 1000.0;
            let [lo, hi] = range[i % d];
            (lo + u * (hi - lo)) as f32
        })
        .collect()
}

fn shape_of(m: &Manifest, n: usize) -> Vec<usize> {
    std::iter::once(n)
        .chain(m.event_shape.iter().copied())
        .collect()
}

/// The named output of a JSON v2 response.
fn output<'a>(body: &'a Value, name: &str) -> &'a Value {
    body["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == name)
        .unwrap_or_else(|| panic!("no output {name} in {body}"))
}

/// A binary v2 request body: the JSON part, then the tensors' bytes; and its JSON length.
fn binary_body(header: &Value, tensors: &[Vec<u8>]) -> (Vec<u8>, usize) {
    let mut body = serde_json::to_vec(header).unwrap();
    let n = body.len();
    for t in tensors {
        body.extend_from_slice(t);
    }
    (body, n)
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

async fn post_binary(
    server: &Server,
    path: &str,
    body: Vec<u8>,
    json_length: usize,
) -> reqwest::Response {
    server
        .client
        .post(server.url(path))
        .header("inference-header-content-length", json_length)
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Splits a binary v2 response into its JSON part and each binary output's float32 values.
async fn read_binary(r: reqwest::Response) -> (Value, Vec<(String, Vec<u8>)>) {
    assert_eq!(r.status(), 200);
    let n: usize = r.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bytes = r.bytes().await.unwrap();
    let header: Value = serde_json::from_slice(&bytes[..n]).unwrap();
    let mut at = n;
    let mut tensors = Vec::new();
    for o in header["outputs"].as_array().unwrap() {
        if let Some(size) = o["parameters"]["binary_data_size"].as_u64() {
            tensors.push((
                o["name"].as_str().unwrap().to_string(),
                bytes[at..at + size as usize].to_vec(),
            ));
            at += size as usize;
        }
    }
    assert_eq!(at, bytes.len(), "every byte belongs to an output");
    (header, tensors)
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn f64s(b: &[u8]) -> Vec<f64> {
    b.chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn v2_metadata_health_and_inference_match_the_graphs() {
    let repo = bundled_models();
    let server = Server::start(&repo, &[]);
    server.ready().await;
    let meta = server.get_json("/v2").await;
    assert_eq!(meta["name"], "flowserve");
    assert_eq!(meta["extensions"], json!(["binary_tensor_data"]));
    assert_eq!(
        server.get_json("/v2/health/live").await,
        json!({"live": true})
    );
    assert_eq!(
        server.get_json("/v2/health/ready").await,
        json!({"ready": true})
    );

    for name in MODELS {
        let dir = repo.join(name).join("1");
        let package = flowpack::Package::open(&dir).unwrap();
        let m = &package.manifest;
        let d: usize = m.event_shape.iter().product();
        let batched: Vec<i64> = std::iter::once(-1)
            .chain(m.event_shape.iter().map(|&v| v as i64))
            .collect();
        let terms = m.scoring.contributions.order().is_some();

        let md = server.get_json(&format!("/v2/models/{name}")).await;
        assert_eq!(md["platform"], "onnx_onnxv1");
        assert_eq!(md["versions"], json!(["1"]));
        assert_eq!(
            md["inputs"],
            json!([{"name": "x", "datatype": "FP32", "shape": batched}])
        );
        let outs: Vec<&str> = md["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["name"].as_str().unwrap())
            .collect();
        let mut want = vec!["z", "log_prob"];
        if terms {
            want.push("log_prob_terms");
        }
        want.push("tail_probability");
        assert_eq!(outs, want, "{name}");
        assert_eq!(
            server
                .get_json(&format!("/v2/models/{name}/versions/1/ready"))
                .await,
            json!({"name": name, "ready": true})
        );
        let dm = server.get_json(&format!("/v2/models/{name}.decode")).await;
        assert_eq!(dm["inputs"][0]["name"], "z");
        assert_eq!(dm["outputs"][0]["name"], "x");

        // JSON tensors, nested for images (the spec allows both), on the versioned route.
        let x = rows(m, 9, 3);
        let direct_enc = direct(&dir, Encode, &x);
        let shape = shape_of(m, 9);
        let req = json!({
            "id": "r1",
            "inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": x}],
        });
        let (s, body) = server
            .post(&format!("/v2/models/{name}/versions/1/infer"), req)
            .await;
        assert_eq!(s, 200, "{body}");
        assert_eq!(
            (
                body["model_name"].as_str(),
                body["model_version"].as_str(),
                body["id"].as_str()
            ),
            (Some(name), Some("1"), Some("r1"))
        );
        assert_eq!(output(&body, "z")["shape"], json!(shape));
        close(
            &floats(&output(&body, "z")["data"]),
            &direct_enc[0],
            1e-5,
            "z",
        );
        let lp = floats(&output(&body, "log_prob")["data"]);
        close(&lp, &direct_enc[1], 1e-5, "log_prob");
        if terms {
            close(
                &floats(&output(&body, "log_prob_terms")["data"]),
                &direct_enc[2],
                1e-5,
                "terms",
            );
        }
        let reference = package.reference.as_ref().unwrap();
        let tails: Vec<f64> = output(&body, "tail_probability")["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let want_tails: Vec<f64> = lp.iter().map(|&v| reference.tail_probability(v)).collect();
        assert_eq!(
            tails, want_tails,
            "{name}: tail probabilities of the served log_prob"
        );

        // Binary tensors in and out: the same numbers, bit for bit.
        let header = json!({
            "inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "parameters": {"binary_data_size": 4 * x.len()}}],
            "outputs": [{"name": "log_prob", "parameters": {"binary_data": true}}, {"name": "tail_probability", "parameters": {"binary_data": true}}, {"name": "z", "parameters": {"binary_data": false}}],
        });
        let (b, n) = binary_body(&header, &[le_bytes(&x)]);
        let (head, tensors) =
            read_binary(post_binary(&server, &format!("/v2/models/{name}/infer"), b, n).await)
                .await;
        assert_eq!(tensors.len(), 2);
        assert_eq!(
            (tensors[0].0.as_str(), tensors[1].0.as_str()),
            ("log_prob", "tail_probability")
        );
        assert_eq!(f32s(&tensors[0].1), lp, "{name}: binary log_prob");
        assert_eq!(
            f64s(&tensors[1].1),
            tails,
            "{name}: binary tail_probability"
        );
        assert_eq!(
            output(&head, "z")["data"],
            output(&body, "z")["data"],
            "JSON beside binary"
        );

        // decode and sample views.
        let z: Vec<f32> = direct_enc[0].clone();
        let req = json!({"inputs": [{"name": "z", "shape": shape, "datatype": "FP32", "data": z}]});
        let (s, dec) = server
            .post(&format!("/v2/models/{name}.decode/infer"), req)
            .await;
        assert_eq!(s, 200, "{dec}");
        close(
            &floats(&output(&dec, "x")["data"]),
            &direct(&dir, Decode, &z)[0],
            1e-5,
            "decode",
        );
        let req = json!({"inputs": [
            {"name": "num_samples", "shape": [1], "datatype": "INT64", "data": [3]},
            {"name": "temperature", "shape": [1], "datatype": "FP32", "data": [0.7]},
            {"name": "seed", "shape": [1], "datatype": "UINT64", "data": [42]},
        ]});
        let (s, smp) = server
            .post(&format!("/v2/models/{name}.sample/infer"), req)
            .await;
        assert_eq!(s, 200, "{smp}");
        assert_eq!(smp["parameters"]["seed"], 42);
        let noise = flowpack::sampling::latent_noise(3, d, 0.7, 42);
        close(
            &floats(&output(&smp, "x")["data"]),
            &direct(&dir, Decode, &noise)[0],
            1e-5,
            "samples",
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn v2_bad_tensors_get_protocol_errors_and_the_server_keeps_serving() {
    let server = Server::start(&bundled_models(), &[]);
    server.ready().await;
    let x = |shape: Value, data: Value| json!({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": data}]});
    let cases = [
        (
            "moons",
            json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP64", "data": [1, 2]}]}),
            422,
            "datatype FP64; the model takes FP32",
        ),
        (
            "moons",
            json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "BYTES", "data": [1, 2]}]}),
            400,
            "datatype \"BYTES\"",
        ),
        (
            "moons",
            x(json!([1, 3]), json!([1, 2, 3])),
            422,
            "x: each row of model \"moons\" must have 2 numbers",
        ),
        (
            "moons",
            x(json!([2, 2]), json!([1, 2, 3])),
            422,
            "shape [2, 2] has 4 elements but data has 3",
        ),
        (
            "moons",
            x(json!([2]), json!([1, 2])),
            422,
            "input \"x\": shape [2]; the model takes [N, 2]",
        ),
        (
            "moons",
            json!({"inputs": [{"name": "y", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}),
            422,
            "unknown input \"y\"",
        ),
        (
            "moons",
            json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}], "outputs": [{"name": "q"}]}),
            422,
            "unknown output \"q\"",
        ),
        ("moons", json!({"inputs": []}), 422, "moons takes one input"),
        (
            "moons",
            json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 1e39]}]}),
            422,
            "outside the float32 range",
        ),
        ("moons", json!({"inputs": "x"}), 422, "inputs: invalid type"),
        (
            "moons.sample",
            json!({"inputs": [{"name": "num_samples", "shape": [1], "datatype": "INT64", "data": [0]}]}),
            422,
            "between 1 and",
        ),
        (
            "moons.sample",
            json!({"inputs": [{"name": "num_samples", "shape": [1], "datatype": "FP32", "data": [2]}]}),
            422,
            "send an integer type",
        ),
        ("nope", x(json!([1, 2]), json!([1, 2])), 404, "nope"),
    ];
    for (model, body, status, needle) in cases {
        let (s, b) = server
            .post(&format!("/v2/models/{model}/infer"), body.clone())
            .await;
        assert_eq!(s, status, "{body} → {b}");
        let msg = b["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{{\"error\": string}} expected, got {b}"));
        assert_eq!(b.as_object().unwrap().len(), 1, "{b}");
        assert!(msg.contains(needle), "{body}: {msg:?} lacks {needle:?}");
    }
    // Binary bodies whose byte counts disagree, and a NaN.
    let head = |size: usize| json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": size}}]});
    for (header, bytes, json_len_delta, status, needle) in [
        (
            head(4),
            le_bytes(&[1.0]),
            0i64,
            422,
            "binary_data_size is 4 bytes but shape [1, 2] of FP32 needs 8",
        ),
        (
            head(8),
            le_bytes(&[1.0]),
            0,
            422,
            "this input needs bytes 0..8",
        ),
        (
            head(8),
            le_bytes(&[1.0, 2.0, 3.0]),
            0,
            400,
            "binary_data_size add up to 8",
        ),
        (
            head(8),
            le_bytes(&[1.0, f32::NAN]),
            0,
            422,
            "element 1 is not a finite number",
        ),
        (
            head(8),
            le_bytes(&[1.0, 2.0]),
            1000,
            400,
            "Inference-Header-Content-Length is",
        ),
    ] {
        let (body, n) = binary_body(&header, &[bytes]);
        let r = post_binary(
            &server,
            "/v2/models/moons/infer",
            body,
            (n as i64 + json_len_delta) as usize,
        )
        .await;
        assert_eq!(r.status().as_u16(), status);
        let b: Value = r.json().await.unwrap();
        assert!(
            b["error"].as_str().unwrap().contains(needle),
            "{b} lacks {needle:?}"
        );
    }
    let (s, b) = server
        .post(
            "/v2/models/moons/versions/7/infer",
            x(json!([1, 2]), json!([1, 2])),
        )
        .await;
    assert_eq!(s, 404);
    assert!(
        b["error"].as_str().unwrap().contains("no version \"7\""),
        "{b}"
    );

    // A gzip body is read after decompression; the server still answers good requests.
    let good = x(json!([1, 2]), json!([0.5, 0.2]));
    let (s, plain) = server.post("/v2/models/moons/infer", good.clone()).await;
    assert_eq!(s, 200, "{plain}");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&serde_json::to_vec(&good).unwrap()).unwrap();
    let r = server
        .client
        .post(server.url("/v2/models/moons/infer"))
        .header("content-encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let zipped: Value = r.json().await.unwrap();
    assert_eq!(zipped["outputs"], plain["outputs"]);
    let m = server.metrics().await;
    assert!(
        m.contains("endpoint=\"infer\""),
        "v2 requests are counted as infer"
    );
}

/// The Python interpreter with `tritonclient` that `make test` installs (`.test-venv`).
fn python() -> std::path::PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".test-venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run `make test` (or scripts/test-venv.sh) to install tritonclient",
        venv.display()
    );
    venv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tritonclient_gets_the_graphs_results_over_http_and_grpc() {
    let python = python();
    let repo = bundled_models();
    let grpc_port = free_port().to_string();
    let server = Server::start(&repo, &["--grpc-port", &grpc_port]);
    server.ready().await;
    // The cases: rows of each bundled model and what its graphs compute for them.
    let mut cases = Vec::new();
    for name in MODELS {
        let dir = repo.join(name).join("1");
        let package = flowpack::Package::open(&dir).unwrap();
        let m = &package.manifest;
        let x = rows(m, 5, 11);
        let enc = direct(&dir, Encode, &x);
        let dec = direct(&dir, Decode, &enc[0]);
        let mut expected = json!({"z": enc[0], "log_prob": enc[1]});
        if m.scoring.contributions.order().is_some() {
            expected["log_prob_terms"] = json!(enc[2]);
        }
        cases.push(json!({
            "model": name,
            "shape": shape_of(m, 5),
            "x": x,
            "expected": expected,
            "decoded": dec[0],
            "features": m.event_shape.iter().product::<usize>(),
        }));
    }
    // The conditional models, with their context as a second tensor (category indices).
    for (name, context) in [
        ("wine_by_quality", [0.0f32, 1.0, 2.0, 4.0, 5.0]),
        ("digits_by_label", [0.0, 3.0, 5.0, 7.0, 9.0]),
    ] {
        let dir = repo.join(name).join("1");
        let m = flowpack::Package::open(&dir).unwrap().manifest;
        let x = rows(&m, 5, 13);
        let enc = direct_given(&dir, Encode, &x, &context);
        let dec = direct_given(&dir, Decode, &enc[0], &context);
        cases.push(json!({
            "model": name,
            "shape": shape_of(&m, 5),
            "x": x,
            "context": context,
            "expected": {"z": enc[0], "log_prob": enc[1]},
            "decoded": dec[0],
            "features": m.event_shape.iter().product::<usize>(),
        }));
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("cases.json");
    std::fs::write(&file, serde_json::to_vec(&cases).unwrap()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oip_client.py");
    let host = server.base.trim_start_matches("http://").to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .arg(&host)
            .arg(&file)
            .arg(format!("127.0.0.1:{grpc_port}"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "tritonclient checks failed:\n{text}");
    assert!(text.contains("tritonclient: all checks passed"), "{text}");
}
