//! openapi.yaml is the contract: it lists exactly the router's routes, and the server accepts
//! every example body it shows.

mod common;

use std::collections::BTreeSet;

use common::*;
use yaml_rust2::{Yaml, YamlLoader};

fn spec() -> Yaml {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    YamlLoader::load_from_str(&text).unwrap().remove(0)
}

fn to_json(y: &Yaml) -> serde_json::Value {
    match y {
        Yaml::Real(s) => serde_json::json!(s.parse::<f64>().unwrap()),
        Yaml::Integer(i) => serde_json::json!(i),
        Yaml::String(s) => serde_json::json!(s),
        Yaml::Boolean(b) => serde_json::json!(b),
        Yaml::Array(a) => serde_json::Value::Array(a.iter().map(to_json).collect()),
        Yaml::Hash(h) => serde_json::Value::Object(
            h.iter()
                .map(|(k, v)| (k.as_str().unwrap().to_string(), to_json(v)))
                .collect(),
        ),
        _ => serde_json::Value::Null,
    }
}

/// Follows a local `$ref`.
fn resolve<'a>(root: &'a Yaml, y: &'a Yaml) -> &'a Yaml {
    match y["$ref"].as_str() {
        Some(r) => r
            .trim_start_matches("#/")
            .split('/')
            .fold(root, |node, key| &node[key]),
        None => y,
    }
}

fn operations(spec: &Yaml) -> Vec<(String, String, Option<serde_json::Value>)> {
    let mut out = Vec::new();
    for (path, item) in spec["paths"].as_hash().unwrap() {
        for (method, op) in item.as_hash().unwrap() {
            let body = resolve(spec, &op["requestBody"]);
            let example = body["content"]["application/json"]["example"].clone();
            let example = (!example.is_badvalue()).then(|| to_json(&example));
            out.push((
                method.as_str().unwrap().to_uppercase(),
                path.as_str().unwrap().to_string(),
                example,
            ));
        }
    }
    out
}

#[test]
fn the_spec_lists_exactly_the_routes_of_the_router() {
    let spec = spec();
    assert_eq!(spec["openapi"].as_str(), Some("3.1.0"));
    let documented: BTreeSet<(String, String)> = operations(&spec)
        .into_iter()
        .map(|(m, p, _)| (m, p))
        .collect();
    let served: BTreeSet<(String, String)> = flowserve::api::routes()
        .into_iter()
        .map(|(m, p, _)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served, "openapi.yaml and the router disagree");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_in_the_spec_is_accepted() {
    let spec = spec();
    let server = Server::start(&bundled_models(), &[]);
    server.ready().await;
    let mut posted = 0;
    for (method, path, example) in operations(&spec) {
        // Loading and unloading need --model-control explicit; tests/lifecycle.rs covers them.
        if path.starts_with("/v2/repository/models/") {
            continue;
        }
        let url = server.url(&path.replace("{name}", "moons").replace("{version}", "1"));
        let r = match method.as_str() {
            "GET" => server.client.get(&url).send().await.unwrap(),
            "POST" => {
                let body = example.unwrap_or_else(|| panic!("POST {path} has no example body"));
                posted += 1;
                server.client.post(&url).json(&body).send().await.unwrap()
            }
            other => panic!("unexpected method {other}"),
        };
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(status, 200, "{method} {path}: {text}");
        let documented =
            &spec["paths"][path.as_str()][method.to_lowercase().as_str()]["responses"]["200"];
        assert!(
            !documented.is_badvalue(),
            "{method} {path} documents its 200 response"
        );
    }
    assert_eq!(posted, 13);
}

/// The Python of `.test-venv` (schemathesis, jsonschema), which `make test` installs.
fn venv_tool(name: &str) -> std::path::PathBuf {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".test-venv/bin")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: run `make test-venv` (scripts/test-venv.sh)",
        p.display()
    );
    p
}

/// openapi.yaml's verdict on each `(method, spec path, body)`: `None` when the body is valid.
fn spec_verdicts(bodies: &[(&str, &str, serde_json::Value)]) -> Vec<Option<String>> {
    use std::io::Write;
    let root = env!("CARGO_MANIFEST_DIR");
    let mut child = std::process::Command::new(venv_tool("python"))
        .arg(format!("{root}/tests/spec_verdict.py"))
        .arg(format!("{root}/openapi.yaml"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let input = serde_json::to_vec(
        &bodies
            .iter()
            .map(|(m, p, b)| serde_json::json!([m, p, b]))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "spec_verdict.py failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// (spec path, URL, extra header, body, valid by the spec, status, what the answer holds)
type Case = (
    &'static str,
    &'static str,
    Option<(&'static str, &'static str)>,
    serde_json::Value,
    bool,
    u16,
    &'static str,
);

/// The cases where a property-based run over the spec found the spec and the server
/// disagreeing, each settled on one side: the spec's verdict on the body and the server's
/// answer must agree (valid: served, or 422 only where validity depends on the model and
/// the spec says so; invalid: a 4xx naming the field).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spec_and_the_server_agree_on_what_the_fuzzer_found() {
    use serde_json::json;
    let server = Server::start(&bundled_models(), &[]);
    server.ready().await;
    let x = json!([{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]);
    let cases: Vec<Case> = vec![
        // Rows: numbers only (null is refused on both sides), at most [C][H][W], never empty.
        (
            "/log_prob",
            "/log_prob",
            None,
            json!({"model": "moons", "inputs": [[[null, null]]]}),
            false,
            422,
            "inputs[0][0][0]: invalid type: null",
        ),
        (
            "/encode",
            "/encode",
            None,
            json!({"model": "moons", "inputs": [[null, 1]]}),
            false,
            422,
            "inputs[0][0]: invalid type: null",
        ),
        (
            "/decode",
            "/decode",
            None,
            json!({"model": "moons", "latents": [[[[[0]]]]]}),
            false,
            422,
            "nested deeper than [C][H][W]",
        ),
        (
            "/decode",
            "/decode",
            None,
            json!({"model": "digits", "latents": [[]]}),
            false,
            422,
            "must have shape [1, 8, 8]",
        ),
        (
            "/log_prob",
            "/log_prob",
            None,
            json!({"model": "moons", "inputs": [[1e39, 0]]}),
            false,
            422,
            "outside the float32 range",
        ),
        // JSON Schema integers: 312.0 is one.
        (
            "/sample",
            "/sample",
            None,
            json!({"model": "moons", "num_samples": 312.0, "seed": 7.0}),
            true,
            200,
            "\"seed\":7",
        ),
        (
            "/score",
            "/score",
            None,
            json!({"model": "shuttle", "inputs": [[50, 21, 77, 0, 28, 0, 27, 48, 22]], "top": 2.0}),
            true,
            200,
            "\"contributions\":[{",
        ),
        (
            "/sample",
            "/sample",
            None,
            json!({"model": "moons", "num_samples": 3.5}),
            false,
            422,
            "num_samples: invalid type: floating point `3.5`",
        ),
        // null is "not sent" (the default), for every optional field.
        (
            "/v1/models/{name}/log_prob",
            "/v1/models/moons/log_prob",
            None,
            json!({"model": null, "inputs": [[1, 2]], "context": null}),
            true,
            200,
            "\"log_prob\":[",
        ),
        (
            "/sample",
            "/sample",
            None,
            json!({"model": "moons", "num_samples": 2, "format": null, "temperature": null, "seed": null, "context": null}),
            true,
            200,
            "\"samples\":[[",
        ),
        (
            "/score",
            "/score",
            None,
            json!({"model": "shuttle", "inputs": [[50, 21, 77, 0, 28, 0, 27, 48, 22]], "threshold": null, "contributions": null, "top": null}),
            true,
            200,
            "\"scores\":[{",
        ),
        // No model named with several served and no --default-model: the 422 the spec now describes.
        (
            "/sample",
            "/sample",
            None,
            json!({"num_samples": 1}),
            true,
            422,
            "model: name one of the served models",
        ),
        (
            "/log_prob",
            "/log_prob",
            None,
            json!({"model": null, "inputs": [[1, 2]]}),
            true,
            422,
            "model: name one of the served models",
        ),
        // The Open Inference Protocol: integral shapes, boolean flags, one input at least, the
        // header only with a binary body.
        (
            "/v2/models/{name}/infer",
            "/v2/models/moons/infer",
            None,
            json!({"inputs": [{"name": "x", "shape": [1.0, 2], "datatype": "FP32", "data": [1, 2]}]}),
            true,
            200,
            "\"model_name\":\"moons\"",
        ),
        (
            "/v2/models/{name}/infer",
            "/v2/models/moons/infer",
            None,
            json!({"inputs": x, "outputs": [{"name": "z", "parameters": {"binary_data": {}}}]}),
            false,
            422,
            "outputs[0].parameters.binary_data must be true or false",
        ),
        (
            "/v2/models/{name}/infer",
            "/v2/models/moons/infer",
            None,
            json!({"inputs": []}),
            false,
            422,
            "moons takes one input",
        ),
        (
            "/v2/models/{name}/infer",
            "/v2/models/moons/infer",
            Some(("inference-header-content-length", "1")),
            json!({"inputs": x}),
            true,
            400,
            "first 1 bytes (Inference-Header-Content-Length)",
        ),
        (
            "/v2/repository/index",
            "/v2/repository/index",
            None,
            json!([null, null]),
            false,
            400,
            "must be a JSON object",
        ),
        (
            "/v2/repository/index",
            "/v2/repository/index",
            None,
            json!({"ready": true}),
            true,
            200,
            "\"state\":\"READY\"",
        ),
        (
            "/v2/repository/models/{name}/load",
            "/v2/repository/models/moons/load",
            None,
            json!({}),
            true,
            409,
            "needs --model-control explicit (this server runs with none)",
        ),
        (
            "/v2/repository/models/{name}/unload",
            "/v2/repository/models/moons/unload",
            None,
            json!([1]),
            false,
            400,
            "must be a JSON object",
        ),
    ];
    let verdicts = spec_verdicts(
        &cases
            .iter()
            .map(|(path, _, _, body, ..)| ("POST", *path, body.clone()))
            .collect::<Vec<_>>(),
    );
    for ((_, url, header, body, valid, status, needle), verdict) in cases.iter().zip(verdicts) {
        assert_eq!(
            verdict.is_none(),
            *valid,
            "openapi.yaml on {url} {body}: {verdict:?}"
        );
        let mut req = server.client.post(server.url(url)).json(body);
        if let Some((k, v)) = header {
            req = req.header(*k, *v);
        }
        let r = req.send().await.unwrap();
        let got = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert_eq!(got, *status, "{url} {body} → {text}");
        assert!(
            text.contains(needle),
            "{url} {body}: {text} lacks {needle:?}"
        );
        // A 422 for a body the spec calls valid is one the spec must describe: only the
        // model-dependent answers of the inference routes.
        if *valid && got == 422 {
            assert!(!url.starts_with("/v2/repository"), "{url}");
        }
    }
    // The server refused nothing it should not have, and still serves.
    let (s, _) = server
        .post(
            "/log_prob",
            json!({"model": "moons", "inputs": [[0.5, 0.25]]}),
        )
        .await;
    assert_eq!(s, 200);
}

/// schemathesis over openapi.yaml against a real server: every route, every check, a fixed
/// seed and a bounded number of examples per operation (`CONTRACT_EXAMPLES`, default 40;
/// `make fuzz` runs more). Zero failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contract_holds_under_property_based_fuzzing() {
    let server = Server::start(&bundled_models(), &[]);
    server.ready().await;
    let root = env!("CARGO_MANIFEST_DIR");
    let examples = std::env::var("CONTRACT_EXAMPLES").unwrap_or_else(|_| "40".into());
    let seed = std::env::var("CONTRACT_SEED").unwrap_or_else(|_| "1".into());
    let report = tempfile::tempdir().unwrap();
    // The server is another process: blocking this test's runtime while the fuzzer runs is fine.
    let out = std::process::Command::new(venv_tool("st"))
        .current_dir(report.path())
        .args(["--config-file", &format!("{root}/tests/schemathesis.toml")])
        .arg("run")
        .arg(format!("{root}/openapi.yaml"))
        .args(["--url", &server.base])
        .args(["--seed", &seed, "--max-examples", &examples])
        .args(["--checks", "all", "--workers", "1", "--no-color"])
        .args(["--request-timeout", "30"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let summary: String = text
        .lines()
        .filter(|l| l.contains("generated") || l.contains("Operations:") || l.contains("Tested:"))
        .collect::<Vec<_>>()
        .join("; ");
    eprintln!("schemathesis (seed {seed}, {examples} examples per operation): {summary}");
    assert!(
        out.status.success(),
        "schemathesis found contract failures:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every operation ran, and the cases all passed.
    assert!(text.contains("Tested: 27"), "{text}");
    let line = text.lines().find(|l| l.contains(" generated, ")).unwrap();
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(
        nums.len() == 2 && nums[0] == nums[1] && nums[0] > 1000,
        "{line}"
    );
    // The server is still up and answering.
    assert_eq!(
        server.get_json("/healthz").await["status"],
        serde_json::json!("alive")
    );
}
