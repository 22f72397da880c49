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
