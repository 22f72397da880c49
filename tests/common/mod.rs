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

/// Writes `repo/<name>/1`: the bundled `moons` package with a trap in its encode graph. A
/// batch holding a row whose first value is `marker` makes ONNX Runtime fail at run time
/// (the graph reshapes x to a width that only the marker produces); every other batch runs
/// exactly as moons. The fault tests inject engine errors with it.
pub fn trapped_moons(repo: &Path, name: &str, marker: f32) {
    use flowpack::onnx::{
        attribute_proto::AttributeType, AttributeProto, ModelProto, NodeProto, TensorProto,
    };
    use prost::Message;
    let dir = repo.join(name).join("1");
    copy_dir(&bundled_models().join("moons/1"), &dir);
    let bytes = std::fs::read(dir.join("encode.onnx")).unwrap();
    let mut model = ModelProto::decode(bytes.as_slice()).unwrap();
    let graph = model.graph.as_mut().unwrap();
    // Everything that read x now reads the trapped x.
    for node in &mut graph.node {
        for input in &mut node.input {
            if input == "x" {
                *input = "x_trapped".into();
            }
        }
    }
    let int64 = |n: &str, v: Vec<i64>| TensorProto {
        name: Some(n.into()),
        dims: vec![v.len() as i64],
        data_type: Some(flowpack::onnx::INT64),
        int64_data: v,
        ..Default::default()
    };
    graph.initializer.push(TensorProto {
        name: Some("trap_marker".into()),
        dims: vec![],
        data_type: Some(flowpack::onnx::FLOAT),
        float_data: vec![marker],
        ..Default::default()
    });
    graph.initializer.push(int64("trap_width", vec![2]));
    graph.initializer.push(int64("trap_step", vec![5]));
    graph.initializer.push(int64("trap_one", vec![1]));
    graph.initializer.push(int64("trap_rows", vec![-1]));
    let node = |op: &str, inputs: &[&str], output: &str, attrs: Vec<AttributeProto>| NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: Some(format!("trap_{output}")),
        op_type: Some(op.into()),
        attribute: attrs,
        ..Default::default()
    };
    let int_attr = |n: &str, i: i64| AttributeProto {
        name: Some(n.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(i),
        ..Default::default()
    };
    let trap = vec![
        node("Equal", &["x", "trap_marker"], "trap_hit", vec![]),
        node(
            "Cast",
            &["trap_hit"],
            "trap_hit_i",
            vec![int_attr("to", flowpack::onnx::INT64 as i64)],
        ),
        node(
            "ReduceMax",
            &["trap_hit_i"],
            "trap_any",
            vec![int_attr("keepdims", 0)],
        ),
        node("Reshape", &["trap_any", "trap_one"], "trap_any1", vec![]),
        node("Mul", &["trap_any1", "trap_step"], "trap_extra", vec![]),
        node("Add", &["trap_width", "trap_extra"], "trap_cols", vec![]),
        node(
            "Concat",
            &["trap_rows", "trap_cols"],
            "trap_shape",
            vec![int_attr("axis", 0)],
        ),
        node("Reshape", &["x", "trap_shape"], "x_trapped", vec![]),
    ];
    graph.node.splice(0..0, trap);
    let out = model.encode_to_vec();
    std::fs::write(dir.join("encode.onnx"), &out).unwrap();
    let path = dir.join("flow.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    manifest["name"] = serde_json::json!(name);
    manifest["graphs"]["encode"]["sha256"] = serde_json::json!(flowpack::sha256_hex(&out));
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
}

/// One HTTP/1.1 exchange on a fresh connection, written by hand (`Connection: close`):
/// status, lower-cased headers and body. For tests that must control the socket.
pub fn raw_http(port: u16, method: &str, path: &str, body: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase(), rest.to_string())
}

/// The port of a server's base URL.
pub fn port_of(server: &Server) -> u16 {
    server.base.rsplit(':').next().unwrap().parse().unwrap()
}

/// The value of the series `name{labels}` (labels in Prometheus' sorted order) in a metrics
/// exposition, 0 if absent.
pub fn metric_value(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The sum of every series of `family` whose labels contain all of `having`.
pub fn metric_sum(metrics: &str, family: &str, having: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .filter(|l| having.iter().all(|h| l.contains(h)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
