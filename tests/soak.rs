//! Soak: mixed valid and invalid requests on every bundled model and endpoint from many
//! clients at once, some of whom disconnect mid-request, for `SOAK_SECONDS` (15 in
//! `make test`; `make soak` runs minutes). Checked, not just counted: every valid answer
//! equals the answer its rows got one at a time on the idle server; every invalid request
//! gets its documented status; the server's RSS stops growing after warm-up; the queues and
//! the in-flight gauge return to 0; and the metrics' counters add up to what the clients saw.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// RSS growth allowed after warm-up (the allocator's caches and the histograms' buckets fill
/// early; a leak of one buffer per request would pass this within seconds).
const RSS_MARGIN_MIB: f64 = 24.0;

/// A small deterministic generator (each client has its own).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// One served model as the soak uses it: rows, latents and contexts, and what the idle
/// server answered for each one alone.
struct Subject {
    name: String,
    shape: Vec<usize>,
    /// Context categories (conditional models).
    categories: Vec<String>,
    rows: Vec<Vec<f32>>,
    latents: Vec<Vec<f32>>,
    contexts: Vec<Option<String>>,
    /// Per row: log_prob, z, tail probability; per latent: x.
    log_prob: Vec<f32>,
    z: Vec<Vec<f32>>,
    tail: Vec<f64>,
    x: Vec<Vec<f32>>,
    /// Per seed (1..=3): the samples of 3 draws.
    samples: Vec<Vec<f32>>,
}

const POOL: usize = 12;

fn nested(flat: &[Vec<f32>], shape: &[usize]) -> Value {
    let all: Vec<f32> = flat.iter().flatten().copied().collect();
    rows_json(&all, shape)
}

impl Subject {
    async fn new(server: &Server, summary: &Value, rng: &mut Rng) -> Subject {
        let name = summary["name"].as_str().unwrap().to_string();
        let shape: Vec<usize> = summary["event_shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let size: usize = shape.iter().product();
        let categories: Vec<String> = summary["context"]["columns"][0]["categories"]
            .as_array()
            .map(|c| c.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        let ranges = summary["domain"]["observed_range"].as_array().cloned();
        let pixels = summary["domain"]["pixel_range"].as_array().cloned();
        let mut rows = Vec::new();
        let mut latents = Vec::new();
        let mut contexts = Vec::new();
        for _ in 0..POOL {
            let row: Vec<f32> = (0..size)
                .map(|j| match (&ranges, &pixels) {
                    (_, Some(p)) => {
                        let hi = p[1].as_f64().unwrap() as f32;
                        (rng.unit() * hi).floor()
                    }
                    (Some(r), None) => {
                        let lo = r[j][0].as_f64().unwrap() as f32;
                        let hi = r[j][1].as_f64().unwrap() as f32;
                        lo + rng.unit() * (hi - lo)
                    }
                    _ => rng.unit() * 2.0 - 1.0,
                })
                .collect();
            rows.push(row);
            latents.push((0..size).map(|_| rng.unit() * 3.0 - 1.5).collect());
            contexts.push(
                (!categories.is_empty()).then(|| categories[rng.below(categories.len())].clone()),
            );
        }
        let mut s = Subject {
            name,
            shape,
            categories,
            rows,
            latents,
            contexts,
            log_prob: vec![],
            z: vec![],
            tail: vec![],
            x: vec![],
            samples: vec![],
        };
        // One at a time, on the idle server: the answers the soak holds every batch to.
        for i in 0..POOL {
            let (st, b) = server.post("/encode", s.body("inputs", &[i])).await;
            assert_eq!(st, 200, "{}: {b}", s.name);
            s.log_prob.push(floats(&b["log_prob"])[0]);
            s.z.push(floats(&b["latents"]));
            let (st, b) = server.post("/score", s.body("inputs", &[i])).await;
            assert_eq!(st, 200, "{}: {b}", s.name);
            s.tail
                .push(b["scores"][0]["tail_probability"].as_f64().unwrap());
            let (st, b) = server.post("/decode", s.body("latents", &[i])).await;
            assert_eq!(st, 200, "{}: {b}", s.name);
            s.x.push(floats(&b["samples"]));
        }
        for seed in 1..=3 {
            let (st, b) = server.post("/sample", s.sample_body(seed)).await;
            assert_eq!(st, 200, "{}: {b}", s.name);
            s.samples.push(floats(&b["samples"]));
        }
        s
    }

    /// A body of pool rows `idx` (`inputs`) or latents (`latents`), with their contexts.
    fn body(&self, field: &str, idx: &[usize]) -> Value {
        let pool = if field == "inputs" {
            &self.rows
        } else {
            &self.latents
        };
        let rows: Vec<Vec<f32>> = idx.iter().map(|&i| pool[i].clone()).collect();
        let mut b = json!({"model": self.name, field: nested(&rows, &self.shape)});
        if !self.categories.is_empty() {
            b["context"] = Value::Array(
                idx.iter()
                    .map(|&i| json!([self.contexts[i].as_deref().unwrap()]))
                    .collect(),
            );
        }
        b
    }

    fn sample_body(&self, seed: u64) -> Value {
        let mut b = json!({"model": self.name, "num_samples": 3, "seed": seed, "temperature": 0.8});
        if !self.categories.is_empty() {
            b["context"] = json!([self.categories[0]]);
        }
        b
    }

    /// The Open Inference Protocol request for rows `idx`.
    fn v2_body(&self, idx: &[usize]) -> Value {
        let size: usize = self.shape.iter().product();
        let data: Vec<f32> = idx.iter().flat_map(|&i| self.rows[i].clone()).collect();
        let mut shape = vec![idx.len()];
        shape.extend(&self.shape);
        let mut inputs =
            vec![json!({"name": "x", "shape": shape, "datatype": "FP32", "data": data})];
        if !self.categories.is_empty() {
            let c: Vec<f32> = idx
                .iter()
                .map(|&i| {
                    let want = self.contexts[i].as_deref().unwrap();
                    self.categories.iter().position(|c| c == want).unwrap() as f32
                })
                .collect();
            inputs.push(
                json!({"name": "context", "shape": [idx.len(), 1], "datatype": "FP32", "data": c}),
            );
        }
        assert!(size > 0);
        json!({"inputs": inputs, "outputs": [{"name": "log_prob"}]})
    }
}

fn near(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-3 * (1.0 + w.abs()),
            "{what}[{k}]: {g} under load, {w} alone"
        );
    }
}

/// What the clients saw, for comparison with the metrics.
#[derive(Default)]
struct Tally {
    /// (endpoint, code) → responses.
    codes: BTreeMap<(String, u16), u64>,
    /// (model, endpoint) → (200 responses, rows in them).
    served: BTreeMap<(String, String), (u64, u64)>,
    checked: u64,
    invalid: u64,
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap();
    kb / 1024.0
}

/// Sends a body partly, then closes the connection.
fn hang_up(port: u16, rng_byte: u8) {
    use std::io::Write;
    if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
        let _ = write!(
            s,
            "POST /log_prob HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{{\"model\": \"moons\", \"inputs\": [[{rng_byte}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_soak_of_mixed_traffic_loses_nothing_and_holds_its_memory() {
    let seconds: f64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15.0);
    let clients: usize = std::env::var("SOAK_CLIENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let server = Server::start(&bundled_models(), &["--max-queue-delay-us", "500"]);
    server.ready().await;
    let pid = server.child.id();
    let port = port_of(&server);

    let list = server.get_json("/v1/models").await;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut subjects = Vec::new();
    for m in list["models"].as_array().unwrap() {
        subjects.push(Subject::new(&server, m, &mut rng).await);
    }
    let subjects = Arc::new(subjects);
    // The warm-up requests are in the metrics too: count from here.
    let before = server.metrics().await;

    let tally = Arc::new(Mutex::new(Tally::default()));
    let hangups = Arc::new(AtomicU64::new(0));
    let aborted = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let subjects = subjects.clone();
        let tally = tally.clone();
        let (hangups, aborted) = (hangups.clone(), aborted.clone());
        let client = server.client.clone();
        let base = server.base.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ ((c as u64 + 1) * 0x1000_0001));
            while Instant::now() < stop {
                let s = &subjects[rng.below(subjects.len())];
                let k = 1 + rng.below(6);
                let idx: Vec<usize> = (0..k).map(|_| rng.below(POOL)).collect();
                let kind = rng.below(20);
                // (path, endpoint label, body, expected status, content type)
                let (path, endpoint, body, want, ct): (String, &str, String, u16, &str) = match kind {
                    0..=2 => ("/log_prob".into(), "log_prob", s.body("inputs", &idx).to_string(), 200, "application/json"),
                    3..=4 => (format!("/v1/models/{}/encode", s.name), "encode", s.body("inputs", &idx).to_string(), 200, "application/json"),
                    5..=6 => ("/decode".into(), "decode", s.body("latents", &idx).to_string(), 200, "application/json"),
                    7..=8 => ("/score".into(), "score", s.body("inputs", &idx).to_string(), 200, "application/json"),
                    9 => ("/sample".into(), "sample", s.sample_body(1 + rng.below(3) as u64).to_string(), 200, "application/json"),
                    10..=11 => (format!("/v2/models/{}/infer", s.name), "infer", s.v2_body(&idx).to_string(), 200, "application/json"),
                    // Invalid, each with its documented answer.
                    12 => ("/log_prob".into(), "log_prob", r#"{"model": "moons", "inputs": [[1, 2"#.into(), 400, "application/json"),
                    13 => ("/log_prob".into(), "log_prob", r#"{"model": "moons", "inputs": [[1, 2, 3]]}"#.into(), 422, "application/json"),
                    14 => ("/encode".into(), "encode", r#"{"model": "wine", "inputs": [[1, null]]}"#.into(), 422, "application/json"),
                    15 => ("/score".into(), "score", r#"{"model": "no_such_model", "inputs": [[1, 2]]}"#.into(), 404, "application/json"),
                    16 => ("/decode".into(), "decode", r#"{"model": "moons", "latents": [[1, 2]]}"#.into(), 415, "text/plain"),
                    17 => ("/sample".into(), "sample", r#"{"model": "digits_by_label", "num_samples": 2}"#.into(), 422, "application/json"),
                    18 => ("/v2/models/moons/infer".into(), "infer", r#"{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 1e39]}]}"#.into(), 422, "application/json"),
                    // A client that hangs up mid-request: a body cut off, or a large draw
                    // abandoned after a millisecond.
                    _ => {
                        if rng.below(2) == 0 {
                            let b = rng.below(9) as u8;
                            tokio::task::spawn_blocking(move || hang_up(port, b)).await.unwrap();
                            hangups.fetch_add(1, Ordering::Relaxed);
                        } else {
                            let r = client
                                .post(format!("{base}/sample"))
                                .json(&json!({"model": "digits", "num_samples": 400, "seed": 9}))
                                .timeout(Duration::from_millis(1))
                                .send()
                                .await;
                            match r {
                                Ok(r) => {
                                    let st = r.status().as_u16();
                                    assert_eq!(st, 200);
                                    let mut t = tally.lock().unwrap();
                                    *t.codes.entry(("sample".into(), st)).or_default() += 1;
                                    let e = t.served.entry(("digits".into(), "sample".into())).or_default();
                                    e.0 += 1;
                                    e.1 += 400;
                                }
                                Err(_) => {
                                    aborted.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        continue;
                    }
                };
                let r = client
                    .post(format!("{base}{path}"))
                    .header("content-type", ct)
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let answer: Value = r.json().await.unwrap();
                assert_eq!(status, want, "{path} {body} → {answer}");
                let mut rows = 0;
                if status == 200 {
                    match endpoint {
                        "log_prob" => {
                            let want: Vec<f32> = idx.iter().map(|&i| s.log_prob[i]).collect();
                            near(&floats(&answer["log_prob"]), &want, &s.name);
                            rows = k;
                        }
                        "encode" => {
                            let want: Vec<f32> = idx.iter().flat_map(|&i| s.z[i].clone()).collect();
                            near(&floats(&answer["latents"]), &want, &s.name);
                            let want: Vec<f32> = idx.iter().map(|&i| s.log_prob[i]).collect();
                            near(&floats(&answer["log_prob"]), &want, &s.name);
                            rows = k;
                        }
                        "decode" => {
                            let want: Vec<f32> = idx.iter().flat_map(|&i| s.x[i].clone()).collect();
                            near(&floats(&answer["samples"]), &want, &s.name);
                            rows = k;
                        }
                        "score" => {
                            for (j, &i) in idx.iter().enumerate() {
                                let got = &answer["scores"][j];
                                near(&[got["log_prob"].as_f64().unwrap() as f32], &[s.log_prob[i]], &s.name);
                                let tail = got["tail_probability"].as_f64().unwrap();
                                assert!((tail - s.tail[i]).abs() < 5e-3, "{}: tail {tail} vs {}", s.name, s.tail[i]);
                            }
                            rows = k;
                        }
                        "sample" => {
                            let seed = serde_json::from_str::<Value>(&body).unwrap()["seed"].as_u64().unwrap();
                            near(&floats(&answer["samples"]), &s.samples[seed as usize - 1], &s.name);
                            rows = 3;
                        }
                        _ => {
                            let out = answer["outputs"].as_array().unwrap();
                            let lp = out.iter().find(|o| o["name"] == "log_prob").unwrap();
                            let want: Vec<f32> = idx.iter().map(|&i| s.log_prob[i]).collect();
                            near(&floats(&lp["data"]), &want, &s.name);
                            rows = k;
                        }
                    }
                }
                let mut t = tally.lock().unwrap();
                *t.codes.entry((endpoint.to_string(), status)).or_default() += 1;
                if status == 200 {
                    t.checked += 1;
                    let e = t.served.entry((s.name.clone(), endpoint.to_string())).or_default();
                    e.0 += 1;
                    e.1 += rows as u64;
                } else {
                    t.invalid += 1;
                }
            }
        }));
    }

    // RSS every 250 ms while the load runs.
    let mut rss = Vec::new();
    while Instant::now() < stop {
        rss.push(rss_mib(pid));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }

    // The queues and the in-flight gauge return to 0.
    let settle = Instant::now();
    let metrics = loop {
        let m = server.metrics().await;
        let queued = metric_sum(&m, "flowserve_queue_rows", &[]);
        let in_flight = metric_value(&m, "flowserve_in_flight_requests");
        if queued == 0.0 && in_flight == 0.0 {
            break m;
        }
        assert!(
            settle.elapsed() < Duration::from_secs(10),
            "queues {queued} rows, {in_flight} requests in flight, 10 s after the load stopped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let t = std::mem::take(&mut *tally.lock().unwrap());
    let (hangups, aborted) = (
        hangups.load(Ordering::Relaxed),
        aborted.load(Ordering::Relaxed),
    );
    let answered: u64 = t.codes.values().sum();
    eprintln!(
        "soak: {seconds} s, {clients} clients: {answered} requests answered ({} valid, each checked; {} invalid, each its documented status), {hangups} bodies cut off, {aborted} draws abandoned",
        t.checked, t.invalid
    );

    // Memory: after the first 30 % of the run, RSS grows by less than the margin.
    let warm = rss.len() * 3 / 10;
    let at_warm = rss[..warm.max(1)].iter().cloned().fold(0.0, f64::max);
    let peak = rss.iter().cloned().fold(0.0, f64::max);
    eprintln!(
        "soak: RSS {:.1} MiB at start, {at_warm:.1} MiB after warm-up, peak {peak:.1} MiB, {:.1} MiB at the end",
        rss[0],
        rss[rss.len() - 1]
    );
    assert!(
        peak - at_warm < RSS_MARGIN_MIB,
        "RSS grew {:.1} MiB after warm-up",
        peak - at_warm
    );

    // The metrics add up to what the clients saw. Served requests and rows, per model and
    // endpoint, exactly (the abandoned draws may or may not have been served).
    let delta = |name: &str| metric_value(&metrics, name) - metric_value(&before, name);
    for ((model, endpoint), (n, rows)) in &t.served {
        let code = format!("flowserve_requests_total{{code=\"200\",endpoint=\"{endpoint}\",model=\"{model}\",version=\"1\"}}");
        let ok_rows = format!("flowserve_rows_total{{endpoint=\"{endpoint}\",model=\"{model}\",outcome=\"ok\",version=\"1\"}}");
        let (got, got_rows) = (delta(&code), delta(&ok_rows));
        if (model.as_str(), endpoint.as_str()) == ("digits", "sample") {
            assert!(
                got >= *n as f64 && got <= (*n + aborted) as f64,
                "{model} {endpoint}: {got} vs {n}"
            );
        } else {
            assert_eq!(got, *n as f64, "{model} {endpoint}: served");
            assert_eq!(got_rows, *rows as f64, "{model} {endpoint}: rows");
        }
    }
    // Every status, per endpoint, over all models (refusals before a model is known count
    // under model ""): exactly, but for the bodies cut off (400 on /log_prob, if the server
    // got far enough to answer).
    for ((endpoint, code), n) in &t.codes {
        let have = [
            format!("endpoint=\"{endpoint}\""),
            format!("code=\"{code}\""),
        ];
        let have: Vec<&str> = have.iter().map(String::as_str).collect();
        let got = metric_sum(&metrics, "flowserve_requests_total", &have)
            - metric_sum(&before, "flowserve_requests_total", &have);
        let slack = match (endpoint.as_str(), code) {
            ("log_prob", 400) => hangups,
            ("sample", 200) => aborted,
            _ => 0,
        };
        assert!(
            got >= *n as f64 && got <= (*n + slack) as f64,
            "{endpoint} {code}: the metrics say {got}, the clients saw {n}"
        );
    }
    let total = metric_sum(&metrics, "flowserve_requests_total", &[])
        - metric_sum(&before, "flowserve_requests_total", &[]);
    assert!(
        total >= answered as f64 && total <= (answered + hangups + aborted) as f64,
        "{total} counted, {answered} answered"
    );
    assert!(
        t.checked > 100 && t.invalid > 10,
        "too little traffic to mean anything"
    );
    // And the server still answers.
    assert_eq!(server.get_json("/healthz").await["status"], "alive");
}
