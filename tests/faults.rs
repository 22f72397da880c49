//! Faults injected into a real server: an engine that fails on one batch (a test-only model
//! whose graph rejects a marked row at run time), a client that trickles its body or its
//! headers, and a flood of connections past `--max-connections`. Each must cost only what it
//! touches: that batch's requests, that connection.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use flowpack::Direction;
use serde_json::json;

const MARKER: f32 = -12345.0;

/// Rows of moons-like inputs, the `i`-th one distinct.
fn row(i: usize) -> [f32; 2] {
    [(i % 17) as f32 / 10.0 - 0.6, (i % 5) as f32 / 8.0 - 0.2]
}

/// log p of `x` under moons, through its graph run directly.
fn moons_log_prob(x: &[f32]) -> f32 {
    direct(&bundled_models().join("moons/1"), Direction::Encode, x)[1][0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_engine_error_fails_only_its_batch_and_the_next_batch_serves() {
    let repo = tempfile::tempdir().unwrap();
    trapped_moons(repo.path(), "faulty", MARKER);
    copy_dir(&bundled_models().join("moons"), &repo.path().join("moons"));
    // One row per batch: a batch is exactly one request, so exactly the marked requests fail.
    let server = Server::start(repo.path(), &["--max-batch-rows", "1"]);
    server.ready().await;

    // The trap is armed only by the marker: unmarked rows are moons exactly.
    let (s, b) = server
        .post("/log_prob", json!({"model": "faulty", "inputs": [row(1)]}))
        .await;
    assert_eq!(s, 200, "{b}");
    close(
        &floats(&b["log_prob"]),
        &[moons_log_prob(&row(1))],
        1e-5,
        "faulty = moons",
    );

    // 60 good requests on both models and 6 marked ones, all at once.
    let mut tasks = Vec::new();
    for i in 0..66 {
        let client = server.client.clone();
        let url = server.url("/log_prob");
        let marked = i % 11 == 5;
        let model = if i % 2 == 0 { "faulty" } else { "moons" };
        let x = if marked { [MARKER, 0.0] } else { row(i) };
        let model = if marked { "faulty" } else { model };
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .json(&json!({"model": model, "inputs": [x]}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (
                i,
                marked,
                x,
                status,
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }));
    }
    let (mut failed, mut served) = (0, 0);
    for t in tasks {
        let (i, marked, x, status, body) = t.await.unwrap();
        if marked {
            assert_eq!(status, 500, "request {i}: {body}");
            assert_eq!(body["error"]["type"], "engine_error", "{body}");
            let msg = body["error"]["message"].as_str().unwrap();
            assert!(
                msg.contains("model \"faulty\"") && msg.contains("encode"),
                "{msg}"
            );
            failed += 1;
        } else {
            assert_eq!(
                status, 200,
                "request {i} shared nothing with a failed batch: {body}"
            );
            close(
                &floats(&body["log_prob"]),
                &[moons_log_prob(&x)],
                1e-5,
                "good row",
            );
            served += 1;
        }
    }
    assert_eq!((failed, served), (6, 60));
    eprintln!("faults: engine error on 6 marked batches: 6 requests failed (500 naming the model), 60 concurrent requests served exactly");

    // The next batch serves, and the metrics count the failures once each.
    let (s, b) = server
        .post("/log_prob", json!({"model": "faulty", "inputs": [row(3)]}))
        .await;
    assert_eq!(s, 200, "{b}");
    let metrics = server.metrics().await;
    let count = |series: &str| metric_value(&metrics, series);
    assert_eq!(
        count("flowserve_rejections_total{model=\"faulty\",reason=\"engine_error\"}"),
        6.0,
        "{metrics}"
    );
    assert_eq!(
        count("flowserve_requests_total{code=\"500\",endpoint=\"log_prob\",model=\"faulty\",version=\"1\"}"),
        6.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_batch_fails_the_requests_in_it_and_nothing_else() {
    let repo = tempfile::tempdir().unwrap();
    trapped_moons(repo.path(), "faulty", MARKER);
    copy_dir(&bundled_models().join("moons"), &repo.path().join("moons"));
    // Batches of many rows, held 30 ms to fill: requests arriving together share one.
    let server = Server::start(
        repo.path(),
        &["--max-batch-rows", "256", "--max-queue-delay-us", "30000"],
    );
    server.ready().await;
    let decoded =
        |z: [f32; 2]| direct(&bundled_models().join("moons/1"), Direction::Decode, &z)[0].clone();
    for round in 0..5 {
        // Together: 12 encodes on the faulty model (one marked), 12 decodes on its other
        // graph, and 12 encodes on another model.
        let mut tasks = Vec::new();
        for i in 0..36 {
            let client = server.client.clone();
            let (path, body) = match i / 12 {
                0 if i == 7 => (
                    "/log_prob",
                    json!({"model": "faulty", "inputs": [[MARKER, 0.0], row(i)]}),
                ),
                0 => (
                    "/log_prob",
                    json!({"model": "faulty", "inputs": [row(i + round), row(i)]}),
                ),
                1 => ("/decode", json!({"model": "faulty", "latents": [row(i)]})),
                _ => (
                    "/log_prob",
                    json!({"model": "moons", "inputs": [row(i + round)]}),
                ),
            };
            let url = server.url(path);
            tasks.push(tokio::spawn(async move {
                let r = client.post(url).json(&body).send().await.unwrap();
                (
                    i,
                    body,
                    r.status().as_u16(),
                    r.json::<serde_json::Value>().await.unwrap(),
                )
            }));
        }
        let mut shared = 0;
        for t in tasks {
            let (i, sent, status, body) = t.await.unwrap();
            match (i / 12, status) {
                // Only a request in the marked batch may fail, and it says why.
                (0, 500) => {
                    let msg = body["error"]["message"].as_str().unwrap();
                    assert!(
                        msg.contains("model \"faulty\"") && msg.contains("encode"),
                        "{msg}"
                    );
                    shared += 1;
                }
                (0, 200) => {
                    assert_ne!(i, 7, "the marked request cannot succeed");
                    let x: Vec<f32> = floats(&sent["inputs"]);
                    let want = [moons_log_prob(&x[..2]), moons_log_prob(&x[2..])];
                    close(&floats(&body["log_prob"]), &want, 1e-5, "served row");
                }
                (1, 200) => close(&floats(&body["samples"]), &decoded(row(i)), 1e-5, "decode"),
                (2, 200) => {
                    let x = floats(&sent["inputs"]);
                    close(
                        &floats(&body["log_prob"]),
                        &[moons_log_prob(&x)],
                        1e-5,
                        "moons",
                    );
                }
                _ => panic!("request {i} ({sent}): {status} {body}"),
            }
        }
        assert!(shared >= 1, "the marked request failed");
        // The next batch, on its own, serves.
        let (s, b) = server
            .post(
                "/log_prob",
                json!({"model": "faulty", "inputs": [row(round)]}),
            )
            .await;
        assert_eq!(s, 200, "round {round}: {b}");
        eprintln!("faults: round {round}: the marked batch held {shared} of the 12 encode requests; the 24 others were served");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trickled_body_or_trickled_headers_are_cut_off_without_holding_the_server() {
    // One async worker thread: if a slow client held it, nothing else would be answered.
    let server = Server::start(
        &bundled_models(),
        &[
            "--worker-threads",
            "1",
            "--body-read-timeout-ms",
            "700",
            "--header-read-timeout-ms",
            "700",
        ],
    );
    server.ready().await;
    let port = port_of(&server);

    // A body promised as 1000 bytes, sent a byte every 50 ms.
    let trickle = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let started = Instant::now();
        write!(
            s,
            "POST /log_prob HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
        )
        .unwrap();
        let mut reader = s.try_clone().unwrap();
        let answer = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = reader.read_to_string(&mut text);
            text
        });
        for _ in 0..60 {
            if s.write_all(b" ").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (answer.join().unwrap(), started.elapsed())
    });
    // Headers that never end.
    let slow_headers = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let started = Instant::now();
        let _ = s.write_all(b"POST /log_prob HTTP/1.1\r\nHost: x\r\n");
        for _ in 0..40 {
            if s.write_all(b"X-Slow: 1\r\n").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        (text, started.elapsed())
    });

    // Meanwhile everyone else is served at once.
    let started = Instant::now();
    for i in 0..40 {
        let (s, b) = server
            .post("/log_prob", json!({"model": "moons", "inputs": [row(i)]}))
            .await;
        assert_eq!(s, 200, "{b}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    let (text, took) = trickle.join().unwrap();
    let head = text.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 408"), "{text}");
    assert!(head.contains("connection: close"), "{text}");
    assert!(
        text.contains("\"request_timeout\"") && text.contains("--body-read-timeout-ms"),
        "{text}"
    );
    assert!(took < Duration::from_millis(2500), "cut off after {took:?}");

    let (_, took_headers) = slow_headers.join().unwrap();
    assert!(
        took_headers < Duration::from_millis(2500),
        "slow headers held {took_headers:?}"
    );
    eprintln!("faults: trickled body answered 408 after {took:.1?}, trickled headers cut off after {took_headers:.1?} (limits 700 ms); 40 requests served meanwhile on one async worker");

    let metrics = server.metrics().await;
    assert!(
        metrics.contains("flowserve_body_read_timeouts_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_flood_is_refused_cleanly_and_the_probes_still_answer() {
    let server = Server::start(
        &bundled_models(),
        &[
            "--max-connections",
            "8",
            "--header-read-timeout-ms",
            "30000",
        ],
    );
    server.ready().await;
    let port = port_of(&server);
    // 64 connections that send nothing: with the test client's pooled one, 8 hold the
    // slots and the rest are past the limit.
    let flood: Vec<TcpStream> = (0..64)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let port2 = port;
    let (refused, health, ready, v2) = tokio::task::spawn_blocking(move || {
        (
            raw_http(
                port2,
                "POST",
                "/log_prob",
                r#"{"model":"moons","inputs":[[0.5,0.25]]}"#,
            ),
            raw_http(port2, "GET", "/healthz", ""),
            raw_http(port2, "GET", "/readyz", ""),
            raw_http(port2, "GET", "/v2/health/ready", ""),
        )
    })
    .await
    .unwrap();
    assert_eq!(refused.0, 503, "{refused:?}");
    assert!(
        refused.1.contains("retry-after: 1") && refused.1.contains("connection: close"),
        "{refused:?}"
    );
    assert!(refused.2.contains("--max-connections"), "{refused:?}");
    assert_eq!(health.0, 200, "{health:?}");
    assert_eq!(ready.0, 200, "{ready:?}");
    assert_eq!(v2.0, 200, "{v2:?}");

    // The flood goes away; the server serves again, and counted what it refused.
    drop(flood);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _, body) = tokio::task::spawn_blocking(move || {
        raw_http(
            port,
            "POST",
            "/log_prob",
            r#"{"model":"moons","inputs":[[0.5,0.25]]}"#,
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let metrics = server.metrics().await;
    let refused = metric_value(&metrics, "flowserve_connections_refused_total");
    // 56 of the flood, and the 4 probes above.
    assert!(refused >= 60.0, "{refused}");
    eprintln!("faults: 64 idle connections against --max-connections 8: {refused} past the limit, inference refused 503 with Retry-After, /healthz, /readyz and /v2/health/ready answered 200, served again once the flood left");
}
