//! A real flowserve process on a free loopback port, and a real HTTP client.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    pub base: String,
    pub client: reqwest::Client,
    _repo: Option<tempfile::TempDir>,
}

pub fn bundled_models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

/// Copies the bundled models into a fresh repository folder.
pub fn repo_copy() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&bundled_models(), tmp.path());
    tmp
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    /// Starts flowserve on `repo` with extra flags and waits until /healthz answers.
    pub fn start(repo: &Path, args: &[&str]) -> Server {
        Self::start_owned(repo, args, None)
    }

    pub fn start_owned(repo: &Path, args: &[&str], keep: Option<tempfile::TempDir>) -> Server {
        Self::spawn(repo, args, keep, Stdio::null(), "warn")
    }

    /// Starts flowserve with JSON logs at `info` into the returned file.
    pub fn start_logged(repo: &Path, args: &[&str]) -> (Server, tempfile::NamedTempFile) {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut all = vec!["--log-format", "json"];
        all.extend_from_slice(args);
        let server = Self::spawn(repo, &all, None, log.reopen().unwrap().into(), "info");
        (server, log)
    }

    fn spawn(
        repo: &Path,
        args: &[&str],
        keep: Option<tempfile::TempDir>,
        stderr: Stdio,
        log_level: &str,
    ) -> Server {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_flowserve"))
            .arg("--models")
            .arg(repo)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(args)
            .env("RUST_LOG", log_level)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let server = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()
                .unwrap(),
            _repo: keep,
        };
        let start = Instant::now();
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "flowserve did not start listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Waits until /readyz says 200.
    pub async fn ready(&self) {
        let start = Instant::now();
        loop {
            if let Ok(r) = self.client.get(self.url("/readyz")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "flowserve never became ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let r = self
            .client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    pub async fn post_raw(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
        let mut req = self.client.post(self.url(path)).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let json =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
        (status, headers, json)
    }

    /// `GET path` as JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.client
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a package graph directly through ONNX Runtime: every output, row-major.
pub fn direct(dir: &Path, graph: flowpack::Direction, data: &[f32]) -> Vec<Vec<f32>> {
    direct_given(dir, graph, data, &[])
}

/// [`direct`] for a conditional package: `context` holds each row's graph values (numbers,
/// category indices).
pub fn direct_given(
    dir: &Path,
    graph: flowpack::Direction,
    data: &[f32],
    context: &[f32],
) -> Vec<Vec<f32>> {
    let p = flowpack::Package::open(dir).unwrap();
    let options = flowpack::runtime::SessionOptions::default();
    let mut s = flowpack::runtime::GraphSession::open(&p, graph, &options).unwrap();
    if context.is_empty() {
        s.run(data).unwrap()
    } else {
        s.run_inputs(&[data, context]).unwrap()
    }
}

/// Rows as the wire wants them: flat arrays for `[D]` events, nested `[C][H][W]` for images.
pub fn rows_json(v: &[f32], shape: &[usize]) -> serde_json::Value {
    fn nest(v: &[f32], shape: &[usize]) -> serde_json::Value {
        match shape {
            [_] => serde_json::json!(v),
            [_, rest @ ..] => {
                let inner: usize = rest.iter().product();
                serde_json::Value::Array(v.chunks(inner).map(|c| nest(c, rest)).collect())
            }
            [] => unreachable!("events have a shape"),
        }
    }
    let d: usize = shape.iter().product();
    serde_json::Value::Array(v.chunks(d).map(|r| nest(r, shape)).collect())
}

pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    match v {
        serde_json::Value::Array(a) => a.iter().flat_map(floats).collect(),
        serde_json::Value::Number(n) => vec![n.as_f64().unwrap() as f32],
        other => panic!("not numeric: {other}"),
    }
}

/// Elementwise |a − b| ≤ tol·(1 + |b|), naming the first element that is not.
pub fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

/// The router's GET routes.
pub fn get_routes() -> std::collections::BTreeSet<String> {
    flowserve::api::routes()
        .into_iter()
        .filter(|(m, _, _)| *m == "GET")
        .map(|(_, p, _)| p.to_string())
        .collect()
}
