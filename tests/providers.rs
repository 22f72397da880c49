//! Execution providers say what they are. With the CPU build of ONNX Runtime that `make test`
//! uses, `cuda` is never available, which is exactly the case a user must never have hidden:
//! without `cpu` in the list every model is refused with the reason; with `cpu` after `cuda`
//! the fallback is logged and shown per graph (`/v1/models`, the v2 metadata, the
//! `flowserve_model_info` labels).

mod common;

use std::time::{Duration, Instant};

use common::{bundled_models, Server};
use flowpack::runtime::{GraphSession, Placement, Provider, SessionOptions};
use flowpack::{Direction, Package};

const NOT_IN_BUILD: &str = "cuda is not in this ONNX Runtime build (libonnxruntime.so";

fn options(providers: &[Provider]) -> SessionOptions {
    SessionOptions {
        providers: providers.to_vec(),
        ..SessionOptions::default()
    }
}

#[test]
fn a_graph_is_refused_without_cpu_and_falls_back_with_it() {
    let package = Package::open(bundled_models().join("moons/1")).unwrap();

    let refused = GraphSession::open(&package, Direction::Encode, &options(&[Provider::Cuda]))
        .err()
        .expect("cuda alone must not load on the CPU build")
        .to_string();
    assert!(refused.contains(NOT_IN_BUILD), "{refused}");
    assert!(refused.contains("cpu is not listed"), "{refused}");

    let s = GraphSession::open(
        &package,
        Direction::Encode,
        &options(&[Provider::Cuda, Provider::Cpu]),
    )
    .unwrap();
    assert_eq!(s.placement, Placement::CPU);
    assert_eq!(s.placement.label(), "cpu");
    assert_eq!(s.passed_over.len(), 1, "{:?}", s.passed_over);
    assert!(
        s.passed_over[0].contains(NOT_IN_BUILD),
        "{:?}",
        s.passed_over
    );

    // The CPU alone: nothing passed over. An empty list is refused, not defaulted.
    let s = GraphSession::open(&package, Direction::Decode, &options(&[Provider::Cpu])).unwrap();
    assert_eq!(
        (s.placement.label(), s.passed_over.len()),
        ("cpu".into(), 0)
    );
    let empty = GraphSession::open(&package, Direction::Decode, &options(&[]))
        .err()
        .unwrap()
        .to_string();
    assert!(empty.contains("no execution provider is listed"), "{empty}");
}

/// A server on the bundled models with `providers`, logging JSON to a file.
fn serve(providers: &str) -> (Server, tempfile::NamedTempFile) {
    Server::start_logged(&bundled_models(), &["--execution-providers", providers])
}

/// The repository index once every bundled package has been loaded or refused.
async fn settled_index(s: &Server) -> Vec<serde_json::Value> {
    let packages = std::fs::read_dir(bundled_models()).unwrap().count();
    let start = Instant::now();
    loop {
        if let Ok(r) = s
            .client
            .post(s.url("/v2/repository/index"))
            .json(&serde_json::json!({}))
            .send()
            .await
        {
            if r.status() == 200 {
                let index: Vec<serde_json::Value> = r.json().await.unwrap();
                if index.len() == packages {
                    return index;
                }
            }
        }
        assert!(start.elapsed() < Duration::from_secs(60), "never settled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn cuda_alone_refuses_every_model_with_the_reason() {
    let (s, log) = serve("cuda");
    let index = settled_index(&s).await;
    for e in &index {
        assert_eq!(e["state"], "UNAVAILABLE", "{e}");
        let reason = e["reason"].as_str().unwrap();
        assert!(reason.contains(NOT_IN_BUILD), "{reason}");
        assert!(reason.contains("cpu is not listed"), "{reason}");
    }
    let r = s.client.get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503, "nothing is served, so not ready");
    let (status, body) = s
        .post(
            "/log_prob",
            serde_json::json!({"model": "moons", "inputs": [[0.5, 0.25]]}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    let metrics = s.metrics().await;
    assert!(
        metrics.contains(&format!(
            "flowserve_model_load_failures_total {}",
            index.len()
        )),
        "{metrics}"
    );
    assert!(!metrics.contains("flowserve_model_info{"), "{metrics}");
    let text = std::fs::read_to_string(log.path()).unwrap();
    assert!(text.contains(NOT_IN_BUILD), "{text}");
}

#[tokio::test]
async fn cuda_then_cpu_falls_back_visibly() {
    let (s, log) = serve("cuda,cpu");
    s.ready().await;
    let index = settled_index(&s).await;
    assert!(index.iter().all(|e| e["state"] == "READY"), "{index:?}");

    let m = s.get_json("/v1/models/moons").await;
    let eps = &m["execution_providers"];
    assert_eq!(
        (&eps["encode"], &eps["decode"]),
        (&"cpu".into(), &"cpu".into())
    );
    for graph in ["encode", "decode"] {
        let why = eps["fallbacks"][graph].as_array().unwrap();
        assert_eq!(why.len(), 1, "{eps}");
        assert!(why[0].as_str().unwrap().contains(NOT_IN_BUILD), "{eps}");
    }
    // It still serves, on the CPU.
    let (status, body) = s
        .post(
            "/log_prob",
            serde_json::json!({"model": "moons", "inputs": [[0.5, 0.25]]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    let meta = s.get_json("/v2/models/moons.decode").await;
    assert_eq!(meta["execution_provider"], "cpu", "{meta}");
    let metrics = s.metrics().await;
    assert!(
        metrics.contains(
            "flowserve_model_info{decode_provider=\"cpu\",encode_provider=\"cpu\",family=\"realnvp\",model=\"moons\",requested=\"cuda,cpu\",version=\"1\"} 1"
        ),
        "{metrics}"
    );
    // One warning per graph of every model, with the reason and where it runs now.
    let text = std::fs::read_to_string(log.path()).unwrap();
    let warnings: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["level"] == "WARN" && l["provider"] == "cpu")
        .collect();
    assert_eq!(warnings.len(), 2 * index.len(), "{text}");
    assert!(warnings
        .iter()
        .all(|w| w["message"].as_str().unwrap().contains(NOT_IN_BUILD)));
}

#[tokio::test]
async fn the_cpu_alone_shows_no_fallback() {
    let (s, _log) = serve("cpu");
    s.ready().await;
    let m = s.get_json("/v1/models/wine").await;
    assert_eq!(
        m["execution_providers"],
        serde_json::json!({"encode": "cpu", "decode": "cpu"})
    );
    let meta = s.get_json("/v2/models/wine").await;
    assert_eq!(meta["execution_provider"], "cpu", "{meta}");
}
