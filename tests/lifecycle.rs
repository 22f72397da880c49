//! Models that change without a restart, end to end: a real server watching a real
//! repository folder while clients keep sending requests.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// A repository holding copies of the bundled `names`.
fn repo_of(names: &[&str]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for n in names {
        copy_dir(&bundled_models().join(n), &tmp.path().join(n));
    }
    tmp
}

/// Puts a copy of bundled `moons/1` at `repo/moons/{version}` in one rename, so the watcher
/// never sees half a folder.
fn publish(repo: &Path, version: u64, corrupt: bool) {
    let staging = repo.join(format!(".staging-{version}"));
    copy_dir(&bundled_models().join("moons/1"), &staging);
    if corrupt {
        let graph = staging.join("encode.onnx");
        let mut bytes = std::fs::read(&graph).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&graph, bytes).unwrap();
    }
    std::fs::rename(&staging, repo.join("moons").join(version.to_string())).unwrap();
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !done().await {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn served_version(server: &Server, name: &str) -> Option<u64> {
    server.get_json(&format!("/v1/models/{name}")).await["version"].as_u64()
}

/// Clients posting to moons until `stop`: every (status, version) they got.
fn load_clients(
    server: &Arc<Server>,
    stop: &Arc<AtomicBool>,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Vec<(u16, Value)>>> {
    (0..n)
        .map(|_| {
            let (server, stop) = (server.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let (s, b) = server
                        .post(
                            "/v1/models/moons/log_prob",
                            json!({"inputs": [[0.5, 0.25], [1.0, -0.5]]}),
                        )
                        .await;
                    seen.push((s, b["version"].clone()));
                }
                seen
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_versions_swap_in_under_load_and_a_broken_one_leaves_the_old_serving() {
    let repo = repo_of(&["moons"]);
    let server = Arc::new(Server::start(
        repo.path(),
        &["--model-control", "poll", "--poll-interval-s", "0.1"],
    ));
    server.ready().await;
    assert_eq!(served_version(&server, "moons").await, Some(1));
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load_clients(&server, &stop, 8);
    tokio::time::sleep(Duration::from_millis(300)).await;

    publish(repo.path(), 2, false);
    wait_for("version 2", async || {
        served_version(&server, "moons").await == Some(2)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A corrupt version 3 is refused with its reason; version 2 keeps serving.
    publish(repo.path(), 3, true);
    wait_for("the refusal of version 3", async || {
        let list = server.get_json("/v1/models").await;
        list["unavailable"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["version"] == 3)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);

    let mut seen = Vec::new();
    for c in clients {
        seen.extend(c.await.unwrap());
    }
    assert!(
        seen.len() > 50,
        "the clients kept sending ({} requests)",
        seen.len()
    );
    let failed: Vec<_> = seen.iter().filter(|(s, _)| *s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the swaps: {:?}",
        failed.len(),
        seen.len(),
        &failed[..failed.len().min(3)]
    );
    let versions: std::collections::BTreeSet<u64> =
        seen.iter().filter_map(|(_, v)| v.as_u64()).collect();
    assert_eq!(
        versions,
        [1, 2].into(),
        "answered by version 1, then 2; never by the broken 3"
    );

    assert_eq!(served_version(&server, "moons").await, Some(2));
    let list = server.get_json("/v1/models").await;
    let refusal = list["unavailable"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["version"] == 3)
        .unwrap()
        .clone();
    assert_eq!(refusal["model"], "moons");
    assert!(
        refusal["reason"].as_str().unwrap().contains("encode.onnx"),
        "{refusal}"
    );
    let metrics = server.metrics().await;
    let info: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("flowserve_model_info{"))
        .collect();
    assert!(
        info.len() == 1 && info[0].contains("version=\"2\""),
        "only the serving version shows as loaded: {info:?}"
    );
    assert!(
        metrics.contains("flowserve_model_load_failures_total 1"),
        "one refusal counted"
    );
    // The refusal is not retried while the files stay the same.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(server
        .metrics()
        .await
        .contains("flowserve_model_load_failures_total 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_model_unloads_and_a_new_one_loads() {
    let repo = repo_of(&["moons", "wine"]);
    let server = Server::start(
        repo.path(),
        &["--model-control", "poll", "--poll-interval-s", "0.1"],
    );
    server.ready().await;
    std::fs::remove_dir_all(repo.path().join("moons")).unwrap();
    wait_for("moons to unload", async || {
        server
            .client
            .get(server.url("/v1/models/moons"))
            .send()
            .await
            .unwrap()
            .status()
            == 404
    })
    .await;
    let (s, b) = server
        .post(
            "/v1/models/moons/log_prob",
            json!({"inputs": [[0.5, 0.25]]}),
        )
        .await;
    assert_eq!(s, 404, "{b}");
    let (s, _) = server.post("/v2/models/wine/infer", json!({"inputs": [{"name": "x", "shape": [1, 11], "datatype": "FP32", "data": [7.4, 0.7, 0.0, 1.9, 0.076, 11.0, 34.0, 0.9978, 3.51, 0.56, 9.4]}]})).await;
    assert_eq!(s, 200, "wine keeps serving");
    copy_dir(&bundled_models().join("moons"), &repo.path().join(".moons"));
    std::fs::rename(repo.path().join(".moons"), repo.path().join("moons")).unwrap();
    wait_for("moons to load again", async || {
        served_version(&server, "moons").await == Some(1)
    })
    .await;
    let (s, _) = server
        .post(
            "/v1/models/moons/log_prob",
            json!({"inputs": [[0.5, 0.25]]}),
        )
        .await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn explicit_model_control_loads_and_unloads_through_the_repository_routes() {
    let repo = repo_of(&["moons", "wine"]);
    let server = Server::start(repo.path(), &["--model-control", "explicit"]);
    server.ready().await;
    let (s, index) = server.post("/v2/repository/index", json!({})).await;
    assert_eq!(s, 200);
    assert_eq!(
        index,
        json!([
            {"name": "moons", "version": "1", "state": "READY"},
            {"name": "wine", "version": "1", "state": "READY"},
        ])
    );
    let (s, b) = server
        .post("/v2/repository/models/moons/unload", json!({}))
        .await;
    assert_eq!((s, b["state"].as_str()), (200, Some("UNAVAILABLE")));
    let (s, b) = server.post("/v2/models/moons/infer", json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [0.5, 0.25]}]})).await;
    assert_eq!(s, 404, "{b}");
    let (s, b) = server
        .post("/v2/repository/models/moons/unload", json!({}))
        .await;
    assert_eq!(s, 404, "{b}");

    publish(repo.path(), 2, false);
    let (s, b) = server
        .post("/v2/repository/models/moons/load", json!({}))
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["version"], "2");
    assert_eq!(served_version(&server, "moons").await, Some(2));
    publish(repo.path(), 3, true);
    let (s, b) = server
        .post("/v2/repository/models/moons/load", json!({}))
        .await;
    assert_eq!(s, 422, "{b}");
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .contains("version 3 was refused"),
        "{b}"
    );
    assert_eq!(
        served_version(&server, "moons").await,
        Some(2),
        "the old version keeps serving"
    );
    let (s, b) = server
        .post("/v2/repository/models/nope/load", json!({}))
        .await;
    assert_eq!(s, 404, "{b}");
    // A good version 4: it serves, and version 2 goes (latest:1).
    publish(repo.path(), 4, false);
    let (s, b) = server
        .post("/v2/repository/models/moons/load", json!({}))
        .await;
    assert_eq!((s, b["versions"].clone()), (200, json!(["4"])), "{b}");
    let (_, index) = server.post("/v2/repository/index", json!({})).await;
    let moons: Vec<&Value> = index
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == "moons" && e["state"] == "READY")
        .collect();
    assert_eq!(moons.len(), 1, "{index}");
    assert_eq!(moons[0]["version"], "4");

    // Without explicit control the routes say what they need.
    let other = Server::start(repo.path(), &[]);
    other.ready().await;
    let (s, b) = other
        .post("/v2/repository/models/moons/unload", json!({}))
        .await;
    assert_eq!(s, 409, "a conflict with how the server runs");
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .contains("--model-control explicit"),
        "{b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn version_policies_serve_the_newest_n_or_pinned_versions() {
    let repo = repo_of(&["moons"]);
    publish(repo.path(), 2, false);
    let infer = json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [0.5, 0.25]}]});

    // latest:2 serves both; a request without a version gets the newest.
    let server = Server::start(
        repo.path(),
        &[
            "--version-policy",
            "latest:2",
            "--model-control",
            "poll",
            "--poll-interval-s",
            "0.1",
        ],
    );
    server.ready().await;
    let md = server.get_json("/v2/models/moons").await;
    assert_eq!(md["versions"], json!(["1", "2"]));
    for (path, version) in [
        ("/v2/models/moons/infer", "2"),
        ("/v2/models/moons/versions/1/infer", "1"),
        ("/v2/models/moons/versions/2/infer", "2"),
    ] {
        let (s, b) = server.post(path, infer.clone()).await;
        assert_eq!(
            (s, b["model_version"].as_str()),
            (200, Some(version)),
            "{path}: {b}"
        );
    }
    // A third version pushes the oldest out.
    publish(repo.path(), 3, false);
    wait_for("versions 2 and 3", async || {
        server.get_json("/v2/models/moons").await["versions"] == json!(["2", "3"])
    })
    .await;
    let (s, b) = server
        .post("/v2/models/moons/versions/1/infer", infer.clone())
        .await;
    assert_eq!(s, 404, "{b}");
    assert!(b["error"].as_str().unwrap().contains("served: 2, 3"), "{b}");
    drop(server);

    // specific:1 pins version 1 although newer ones exist.
    let pinned = Server::start(repo.path(), &["--version-policy", "specific:1"]);
    pinned.ready().await;
    assert_eq!(
        pinned.get_json("/v2/models/moons").await["versions"],
        json!(["1"])
    );
    assert_eq!(served_version(&pinned, "moons").await, Some(1));

    // A policy that does not parse is refused at start, naming the flag.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flowserve"))
        .args(["--version-policy", "newest"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--version-policy"));
}
