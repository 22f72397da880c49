//! Open Inference Protocol benchmark (`make bench`): the same requests over REST with JSON
//! tensors, REST with binary tensors, and gRPC with raw tensors, at D = 11 (the bundled wine
//! RealNVP), 64 (the bundled digits Glow) and 784 (a small MAF trained here on 784 synthetic
//! features: the graph is not the point, the wire is). Closed loops of 64-row requests on
//! 8 connections, one server, rounds alternating the transports, medians.
//!
//! Usage: cargo bench --bench oip -- [--seconds S] [--rounds R] [--out BENCHMARKS.md]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use flowserve::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use flowserve::grpc::proto::model_infer_request::InferInputTensor;
use flowserve::grpc::proto::ModelInferRequest;
use serde_json::json;

const ROWS: usize = 64;
const CONNS: usize = 8;

/// A 784-feature package: a 2-MADE MAF trained briefly on synthetic rows.
fn wide_model(root: &Path) -> PathBuf {
    let dir = root.join("runs/oip");
    let repo = dir.join("models");
    if repo.join("wide/1/flow.json").exists() {
        return repo;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("wide.csv");
    let mut text: String = (0..784)
        .map(|i| format!("f{i}"))
        .collect::<Vec<_>>()
        .join(",");
    text.push('\n');
    for r in 0..1000u64 {
        let row: Vec<String> = (0..784u64)
            .map(|c| {
                format!(
                    "{:.4}",
                    (((r * 7919 + c * 104_729) % 1000) as f64 / 500.0 - 1.0)
                )
            })
            .collect();
        text.push_str(&row.join(","));
        text.push('\n');
    }
    std::fs::write(&csv, text).unwrap();
    let run = dir.join("wide-run");
    let ok = Command::new(root.join("target/release/flowtrain"))
        .args([
            "train", "--family", "maf", "--layers", "2", "--hidden", "64", "--steps", "20",
        ])
        .args(["--dequantize", "none", "--fresh", "--quiet", "--data"])
        .arg(&csv)
        .arg("--out")
        .arg(&run)
        .status()
        .expect("build flowtrain first: cargo build --release -p flowtrain");
    assert!(ok.success(), "training the 784-feature model failed");
    let dest = repo.join("wide/1");
    std::fs::create_dir_all(&dest).unwrap();
    for f in ["flow.json", "encode.onnx", "decode.onnx", "reference.bin"] {
        std::fs::copy(run.join(f), dest.join(f)).unwrap();
    }
    repo
}

/// Runs one closed loop per worker for `secs`: each calls its `send` back to back (true: a
/// success). Returns rows/s (at `ROWS` rows a request) and the failures.
async fn closed_loop<F, Fut>(workers: Vec<F>, secs: f64) -> (f64, usize)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = workers
        .into_iter()
        .map(|mut send| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut ok, mut errors) = (0usize, 0usize);
                while !stop.load(Ordering::Relaxed) {
                    if send().await {
                        ok += 1;
                    } else {
                        errors += 1;
                    }
                }
                (ok, errors)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut errors) = (0, 0);
    for t in tasks {
        let (o, e) = t.await.unwrap();
        ok += o;
        errors += e;
    }
    ((ok * ROWS) as f64 / secs, errors)
}

/// The load generator's own runtime (one thread).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// `CONNS` clients posting `body` (with `headers`) back to back: rows/s and failures.
fn rest(url: &str, body: Vec<u8>, headers: Vec<(&'static str, String)>, secs: f64) -> (f64, usize) {
    runtime().block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(CONNS)
            .build()
            .unwrap();
        let workers = (0..CONNS)
            .map(|_| {
                let (client, url, body, headers) = (
                    client.clone(),
                    url.to_string(),
                    body.clone(),
                    headers.clone(),
                );
                move || {
                    let mut req = client.post(&url).body(body.clone());
                    for (k, v) in &headers {
                        req = req.header(*k, v);
                    }
                    async move {
                        match req.send().await {
                            Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                            _ => false,
                        }
                    }
                }
            })
            .collect();
        closed_loop(workers, secs).await
    })
}

/// The same loop over gRPC, one HTTP/2 connection per client (connected before timing).
fn grpc(addr: &str, req: ModelInferRequest, secs: f64) -> (f64, usize) {
    runtime().block_on(async {
        let mut workers = Vec::new();
        for _ in 0..CONNS {
            let client = GrpcInferenceServiceClient::connect(addr.to_string())
                .await
                .unwrap()
                .max_decoding_message_size(usize::MAX);
            let req = req.clone();
            workers.push(move || {
                let (mut client, req) = (client.clone(), req.clone());
                async move { client.model_infer(req).await.is_ok() }
            });
        }
        closed_loop(workers, secs).await
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs: f64 = flag_value(&args, "--seconds", "3").parse().unwrap();
    let rounds: usize = flag_value(&args, "--rounds", "3").parse().unwrap();
    let out = flag_value(&args, "--out", "");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bundled = root.join("models");
    let wide = wide_model(root);
    let server = server_binary(root);
    let cases: [(&str, &Path, &str); 3] = [
        ("wine", &bundled, "11"),
        ("digits", &bundled, "64"),
        ("wide", &wide, "784"),
    ];
    let modes = [
        "REST, JSON tensors",
        "REST, binary tensors",
        "gRPC, raw tensors",
    ];
    let mut lines = vec![
        "## Open Inference Protocol: JSON vs binary tensors, REST vs gRPC".to_string(),
        String::new(),
        format!(
            "Machine: {}, {} cores. Command: `cargo bench --bench oip -- --seconds {secs} --rounds {rounds}` (part of `make bench`). \
             One server (`--grpc-port` on), {CONNS} closed-loop connections each sending {ROWS}-row encode requests \
             (`/v2/models/{{name}}/infer`, outputs z and log_prob; gRPC `ModelInfer` with `raw_input_contents`); \
             the load generator shares the machine with the server. Rounds alternate the three transports; medians of {rounds}. \
             D = 784 is a 2-MADE MAF on synthetic rows trained for the benchmark.",
            cpu_name(),
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
        String::new(),
        format!("| model (D) | {} | binary / JSON | gRPC / JSON |", modes.join(" rows/s | ") + " rows/s"),
        "|---|---:|---:|---:|---:|---:|".to_string(),
    ];
    for (name, repo, d) in cases {
        let dim: usize = d.parse().unwrap();
        let grpc_port = free_port();
        let (_guard, base) = start_server(
            &server,
            repo,
            &["--grpc-port", &grpc_port.to_string()],
            None,
        );
        let shape = match name {
            "digits" => vec![ROWS, 1, 8, 8],
            _ => vec![ROWS, dim],
        };
        let x: Vec<f32> = (0..ROWS * dim)
            .map(|i| ((i * 37 % 101) as f32) / 101.0)
            .collect();
        let url = format!("{base}/v2/models/{name}/infer");
        let outputs = json!([{"name": "z"}, {"name": "log_prob"}]);
        let json_body = serde_json::to_vec(&json!({
            "inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": x}],
            "outputs": outputs,
        }))
        .unwrap();
        let header = serde_json::to_vec(&json!({
            "inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "parameters": {"binary_data_size": 4 * x.len()}}],
            "outputs": [{"name": "z", "parameters": {"binary_data": true}}, {"name": "log_prob", "parameters": {"binary_data": true}}],
        }))
        .unwrap();
        let mut binary_body = header.clone();
        binary_body.extend(x.iter().flat_map(|v| v.to_le_bytes()));
        let request = ModelInferRequest {
            model_name: name.into(),
            inputs: vec![InferInputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: shape.iter().map(|&s| s as i64).collect(),
                ..Default::default()
            }],
            raw_input_contents: vec![x.iter().flat_map(|v| v.to_le_bytes()).collect()],
            ..Default::default()
        };
        let addr = format!("http://127.0.0.1:{grpc_port}");
        let mut results: [Vec<f64>; 3] = Default::default();
        let mut errors = 0;
        let started = Instant::now();
        for _ in 0..rounds {
            let (r, e) = rest(
                &url,
                json_body.clone(),
                vec![("content-type", "application/json".into())],
                secs,
            );
            results[0].push(r);
            errors += e;
            let (r, e) = rest(
                &url,
                binary_body.clone(),
                vec![
                    ("inference-header-content-length", header.len().to_string()),
                    ("content-type", "application/octet-stream".into()),
                ],
                secs,
            );
            results[1].push(r);
            errors += e;
            let (r, e) = grpc(&addr, request.clone(), secs);
            results[2].push(r);
            errors += e;
        }
        assert_eq!(errors, 0, "{name}: requests failed under load");
        let m: Vec<f64> = results.iter_mut().map(|v| median(v)).collect();
        eprintln!(
            "{name} (D = {d}): {:.0} / {:.0} / {:.0} rows/s in {:.0} s",
            m[0],
            m[1],
            m[2],
            started.elapsed().as_secs_f64()
        );
        lines.push(format!(
            "| {name} ({d}) | {:.0} | {:.0} | {:.0} | {:.2}× | {:.2}× |",
            m[0],
            m[1],
            m[2],
            m[1] / m[0],
            m[2] / m[0]
        ));
    }
    let section = lines.join("\n") + "\n";
    println!("{section}");
    if !out.is_empty() {
        write_section(Path::new(&out), "## Open Inference Protocol", &section);
    }
}
