//! The Dockerfile and the Kubernetes, Prometheus and Grafana files under deploy/ agree with
//! the server they deploy: ports, probe routes, environment variables, shutdown timing, the
//! ONNX Runtime version, and every metric they query.

mod common;

use std::collections::BTreeSet;

use clap::CommandFactory;
use common::*;
use yaml_rust2::{Yaml, YamlLoader};

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Yaml {
    YamlLoader::load_from_str(&read(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .remove(0)
}

/// The environment twins of every flag (`FLOWSERVE_*`).
fn flag_envs() -> BTreeSet<String> {
    flowserve::config::Config::command()
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect()
}

fn container(deployment: &Yaml) -> &Yaml {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

fn env_value(c: &Yaml, name: &str) -> Option<i64> {
    c["env"]
        .as_vec()?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))?["value"]
        .as_str()?
        .parse()
        .ok()
}

#[test]
fn the_deployment_matches_the_server() {
    let d = yaml("deploy/base/deployment.yaml");
    let c = container(&d);
    let defaults = <flowserve::config::Config as clap::Parser>::try_parse_from(["flowserve"])
        .expect("defaults parse");
    let port = &c["ports"][0];
    assert_eq!(port["containerPort"].as_i64(), Some(defaults.port as i64));
    assert_eq!(
        d["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"],
        "the selector picks the pods"
    );

    // Probes hit real routes: readiness and startup on /readyz, liveness on /healthz.
    let routes = get_routes();
    for (probe, path) in [
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ] {
        let got = c[probe]["httpGet"]["path"].as_str().unwrap();
        assert_eq!(got, path, "{probe}");
        assert!(routes.contains(got), "{probe}: {got} is not a route");
        assert_eq!(c[probe]["httpGet"]["port"].as_str(), port["name"].as_str());
    }
    assert!(routes.contains("/metrics"));
    assert_eq!(
        d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"].as_str(),
        Some("/metrics")
    );

    // Every environment variable is a real flag's twin.
    let envs = flag_envs();
    for e in c["env"].as_vec().unwrap() {
        let name = e["name"].as_str().unwrap();
        assert!(envs.contains(name), "{name} is not a flowserve setting");
    }

    // Kubernetes waits longer than the drain delay plus the shutdown timeout.
    let drain = env_value(c, "FLOWSERVE_DRAIN_DELAY_MS").unwrap();
    let shutdown = env_value(c, "FLOWSERVE_SHUTDOWN_TIMEOUT_MS").unwrap();
    let grace = d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_i64()
        .unwrap();
    assert!(
        grace * 1000 > drain + shutdown,
        "terminationGracePeriodSeconds {grace} s must exceed drain {drain} ms + shutdown {shutdown} ms"
    );

    let s = yaml("deploy/base/service.yaml");
    assert_eq!(s["spec"]["ports"][0]["targetPort"], port["name"]);
    assert_eq!(s["spec"]["selector"], d["spec"]["selector"]["matchLabels"]);

    // The gRPC port is the one the server is told to open, and the Service routes to it.
    let grpc = &c["ports"][1];
    assert_eq!(grpc["name"].as_str(), Some("grpc"));
    assert_eq!(
        env_value(c, "FLOWSERVE_GRPC_PORT"),
        grpc["containerPort"].as_i64()
    );
    assert_eq!(s["spec"]["ports"][1]["targetPort"], grpc["name"]);

    // Hardening: its own account without a token, seccomp, no root, read-only root with a
    // writable /tmp, CPU and memory limits, and the models on a volume outside the image.
    let pod = &d["spec"]["template"]["spec"];
    let sa = yaml("deploy/base/serviceaccount.yaml");
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(sa["automountServiceAccountToken"].as_bool(), Some(false));
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(
        c["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );
    assert!(c["resources"]["limits"]["cpu"].as_str().is_some());
    let mounts = c["volumeMounts"].as_vec().unwrap();
    let models_at = mounts
        .iter()
        .find(|m| m["name"].as_str() == Some("models"))
        .unwrap()["mountPath"]
        .clone();
    assert_eq!(
        models_at.as_str(),
        c["env"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|e| e["name"].as_str() == Some("FLOWSERVE_MODELS"))
            .unwrap()["value"]
            .as_str()
    );
    assert!(mounts
        .iter()
        .any(|m| m["mountPath"].as_str() == Some("/tmp")));
    let pvc = yaml("deploy/base/pvc.yaml");
    assert_eq!(
        pod["volumes"][0]["persistentVolumeClaim"]["claimName"],
        pvc["metadata"]["name"]
    );
    assert_eq!(
        env_value_str(c, "FLOWSERVE_MODEL_CONTROL").as_deref(),
        Some("poll")
    );
    assert!(pod["topologySpreadConstraints"]
        .as_vec()
        .is_some_and(|t| !t.is_empty()));

    // The disruption budget, network policy and ServiceMonitor select these pods and ports.
    let labels = &d["spec"]["selector"]["matchLabels"];
    assert_eq!(
        &yaml("deploy/base/pdb.yaml")["spec"]["selector"]["matchLabels"],
        labels
    );
    let np = yaml("deploy/base/networkpolicy.yaml");
    assert_eq!(&np["spec"]["podSelector"]["matchLabels"], labels);
    let open: BTreeSet<i64> = np["spec"]["ingress"][0]["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_i64().unwrap())
        .collect();
    let served: BTreeSet<i64> = c["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_i64().unwrap())
        .collect();
    assert_eq!(
        open, served,
        "the network policy opens exactly the serving ports"
    );
    let sm = yaml("deploy/base/servicemonitor.yaml");
    assert_eq!(&sm["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(
        sm["spec"]["endpoints"][0]["port"],
        s["spec"]["ports"][0]["name"]
    );
    assert!(routes.contains(sm["spec"]["endpoints"][0]["path"].as_str().unwrap()));

    // The base lists files that exist; each overlay builds on it and sets the image by
    // `images:` (nothing anywhere runs `:latest`).
    let k = yaml("deploy/base/kustomization.yaml");
    assert_eq!(k["namespace"].as_str(), Some("flowserve"));
    for r in k["resources"].as_vec().unwrap() {
        let f = r.as_str().unwrap();
        assert!(
            root().join("deploy/base").join(f).exists(),
            "kustomization lists {f}"
        );
    }
    for overlay in ["cpu", "gpu"] {
        let o = yaml(&format!("deploy/overlays/{overlay}/kustomization.yaml"));
        assert_eq!(o["resources"][0].as_str(), Some("../../base"), "{overlay}");
        let image = &o["images"][0];
        assert_eq!(
            image["name"].as_str(),
            c["image"].as_str(),
            "{overlay}: images: names the base image"
        );
        assert!(
            image["newTag"].as_str().is_some_and(|t| t != "latest"),
            "{overlay}"
        );
        for p in o["patches"].as_vec().into_iter().flatten() {
            let f = p["path"].as_str().unwrap();
            assert!(
                root()
                    .join(format!("deploy/overlays/{overlay}"))
                    .join(f)
                    .exists(),
                "{overlay} patches {f}"
            );
        }
    }
    for f in deploy_files() {
        assert!(!read(&f).contains(":latest"), "{f} runs :latest");
    }
    let gpu = yaml("deploy/overlays/gpu/gpu.yaml");
    let gc = container(&gpu);
    assert_eq!(
        gc["resources"]["limits"]["nvidia.com/gpu"].as_i64(),
        Some(1)
    );
    let providers = env_value_str(gc, "FLOWSERVE_EXECUTION_PROVIDERS").unwrap();
    let parsed = <flowserve::config::Config as clap::Parser>::try_parse_from([
        "flowserve",
        "--execution-providers",
        &providers,
    ])
    .unwrap();
    assert_eq!(parsed.execution_providers[0].as_str(), "cuda");
    for e in gc["env"].as_vec().unwrap() {
        assert!(envs.contains(e["name"].as_str().unwrap()));
    }
}

/// Every file under deploy/, relative to the repository.
fn deploy_files() -> Vec<String> {
    fn walk(dir: &std::path::Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.path().is_dir() {
                walk(&e.path(), out);
            } else {
                out.push(
                    e.path()
                        .strip_prefix(root())
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join("deploy"), &mut out);
    out
}

fn env_value_str(c: &Yaml, name: &str) -> Option<String> {
    c["env"]
        .as_vec()?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))?["value"]
        .as_str()
        .map(str::to_string)
}

/// The KServe ServingRuntime speaks what the server serves: Open Inference Protocol probes on
/// real routes, the default port, real settings; the InferenceService uses it.
#[test]
fn the_kserve_runtime_matches_the_server() {
    let rt = yaml("deploy/kserve/servingruntime.yaml");
    assert_eq!(rt["kind"].as_str(), Some("ServingRuntime"));
    let spec = &rt["spec"];
    let protocols: Vec<&str> = spec["protocolVersions"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(protocols, ["v2", "grpc-v2"]);
    assert_eq!(
        spec["supportedModelFormats"][0]["name"].as_str(),
        Some("flowpack")
    );
    let c = &spec["containers"][0];
    assert_eq!(c["name"].as_str(), Some("kserve-container"));
    let routes = get_routes();
    for (probe, path) in [
        ("readinessProbe", "/v2/health/ready"),
        ("livenessProbe", "/v2/health/live"),
    ] {
        let got = c[probe]["httpGet"]["path"].as_str().unwrap();
        assert_eq!(got, path);
        assert!(routes.contains(got), "{probe}: {got} is not a route");
    }
    let envs = flag_envs();
    for e in c["env"].as_vec().unwrap() {
        assert!(
            envs.contains(e["name"].as_str().unwrap()),
            "{:?}",
            e["name"]
        );
    }
    assert_eq!(
        env_value_str(c, "FLOWSERVE_MODELS").as_deref(),
        Some("/mnt/models"),
        "where KServe puts the storageUri"
    );
    assert_eq!(
        c["ports"][0]["containerPort"].as_i64(),
        env_value(c, "FLOWSERVE_PORT")
    );
    let isvc = yaml("deploy/kserve/inferenceservice.yaml");
    let m = &isvc["spec"]["predictor"]["model"];
    assert_eq!(m["runtime"], rt["metadata"]["name"]);
    assert_eq!(
        m["modelFormat"]["name"],
        spec["supportedModelFormats"][0]["name"]
    );
    assert_eq!(m["protocolVersion"].as_str(), Some("v2"));
}

#[test]
fn the_dockerfile_matches_the_server_and_the_pinned_runtime() {
    let docker = read("Dockerfile");
    let fetch = read("scripts/fetch-ort.sh");
    let version = fetch
        .lines()
        .find_map(|l| l.strip_prefix("VERSION="))
        .expect("fetch-ort.sh pins a version");
    assert!(
        docker.contains(&format!("libonnxruntime.so.{version}")),
        "the image points ORT_DYLIB_PATH at the pinned ONNX Runtime {version}"
    );
    assert!(docker.contains("scripts/fetch-ort.sh"));
    assert!(docker.contains("EXPOSE 8080"));
    let envs = flag_envs();
    let mut seen = 0;
    for word in docker.split_whitespace() {
        if let Some(name) = word.strip_prefix("FLOWSERVE_").map(|_| word) {
            let name = name.split('=').next().unwrap();
            assert!(envs.contains(name), "Dockerfile sets {name}, not a setting");
            seen += 1;
        }
    }
    assert!(
        seen >= 3,
        "the image configures the server through its env twins"
    );
}

/// The image's HEALTHCHECK runs `flowserve healthcheck`, which exits 0 against a ready
/// server and 1 (saying why) against a port nobody serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_healthcheck_probes_readiness() {
    let docker = read("Dockerfile");
    let line = docker
        .lines()
        .skip_while(|l| !l.starts_with("HEALTHCHECK"))
        .nth(1)
        .expect("a HEALTHCHECK instruction");
    assert!(
        line.contains(r#"["/usr/local/bin/flowserve", "healthcheck"]"#),
        "{line}"
    );
    let server = Server::start(&bundled_models(), &[]);
    server.ready().await;
    let port = server.base.rsplit(':').next().unwrap().to_string();
    let run = |port: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_flowserve"))
            .args(["healthcheck", "--port", port])
            .output()
            .unwrap()
    };
    let ok = run(&port);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let down = run(&free_port().to_string());
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("not ready"));
}

/// Every `flowserve_*` series the alert rules and the dashboard query exists in a real
/// server's scrape (histograms through their `_bucket`, `_sum` and `_count` series).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_and_dashboard_query_metrics_that_exist() {
    let server = Server::start(&bundled_models(), &[]);
    server.ready().await;
    let scrape = server.metrics().await;
    let exposed: BTreeSet<&str> = scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();
    let rules = read("deploy/base/prometheus-rules.yaml");
    let dashboard = read("deploy/base/grafana-dashboard.json");
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is JSON");
    let r = yaml("deploy/base/prometheus-rules.yaml");
    assert!(!r["spec"]["groups"][0]["rules"].as_vec().unwrap().is_empty());
    let mut checked = 0;
    let keda = read("deploy/autoscaling/keda-scaledobject.yaml");
    let hpa = read("deploy/autoscaling/hpa.yaml");
    for text in [&rules, &dashboard, &keda, &hpa] {
        let mut rest = text.as_str();
        while let Some(i) = rest.find("flowserve_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            // Recording-rule names (flowserve:…) are not series; `flowserve_` inside a longer
            // word is not a metric either.
            if name.len() <= "flowserve_".len() {
                continue;
            }
            assert!(
                exposed.contains(name.as_str()),
                "{name} is queried but not exposed"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 10,
        "the rules and the dashboard query the metrics ({checked})"
    );
}

/// The batch-scoring Job runs `flowserve score` with arguments the binary accepts, one
/// shard per completion index, on the serving image.
#[test]
fn the_scoring_job_shards_the_table_by_completion_index() {
    use clap::Args;
    let job = yaml("deploy/score-job.yaml");
    assert_eq!(job["kind"].as_str(), Some("Job"));
    let spec = &job["spec"];
    assert_eq!(spec["completionMode"].as_str(), Some("Indexed"));
    let n = spec["completions"].as_i64().unwrap();
    let c = &spec["template"]["spec"]["containers"][0];
    let cpu = yaml("deploy/overlays/cpu/kustomization.yaml");
    let image = format!(
        "{}:{}",
        cpu["images"][0]["newName"].as_str().unwrap(),
        cpu["images"][0]["newTag"].as_str().unwrap()
    );
    assert_eq!(
        c["image"].as_str(),
        Some(image.as_str()),
        "the serving image"
    );
    let index_from = c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"]
        .as_str()
        .unwrap();
    assert!(index_from.contains("batch.kubernetes.io/job-completion-index"));
    let args: Vec<&str> = c["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "score");
    let mut outputs = BTreeSet::new();
    for i in 0..n {
        // What Kubernetes passes pod i once $(JOB_COMPLETION_INDEX) is expanded.
        let expanded: Vec<String> = args[1..]
            .iter()
            .map(|a| a.replace("$(JOB_COMPLETION_INDEX)", &i.to_string()))
            .collect();
        let cmd = flowserve::batch::ScoreArgs::augment_args(clap::Command::new("score"));
        let m = cmd
            .try_get_matches_from(std::iter::once("score".to_string()).chain(expanded))
            .unwrap_or_else(|e| panic!("pod {i}: {e}"));
        let shard = m.get_one::<flowserve::batch::Shard>("shard").unwrap();
        assert_eq!((shard.index, shard.count), (i as u64, n as u64));
        outputs.insert(m.get_one::<std::path::PathBuf>("output").unwrap().clone());
    }
    assert_eq!(outputs.len() as i64, n, "each pod writes its own part");
}

/// The dashboard filters every panel by namespace, instance and model, uses Grafana's rate
/// interval, and gives every panel an id and a unit; a provisioning file finds it.
#[test]
fn the_dashboard_filters_every_panel_and_is_provisioned() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/base/grafana-dashboard.json")).unwrap();
    let vars: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "namespace", "instance", "model"]);
    let mut ids = BTreeSet::new();
    for p in dashboard["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap();
        assert!(
            ids.insert(p["id"].as_i64().unwrap()),
            "{title}: a unique id"
        );
        assert!(
            p["fieldConfig"]["defaults"]["unit"].as_str().is_some(),
            "{title}: a unit"
        );
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("flowserve_") {
                let rest = &expr[i..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let selector = &rest[name.len()..];
                assert!(
                    selector.starts_with("{namespace=~\"$namespace\", instance=~\"$instance\""),
                    "{title}: {expr}"
                );
                if name != "flowserve_in_flight_requests" {
                    assert!(
                        selector
                            .split('}')
                            .next()
                            .unwrap()
                            .contains("model=~\"$model\""),
                        "{title}: {expr}"
                    );
                }
            }
            assert!(
                !expr.contains("[1m]") && !expr.contains("[5m]"),
                "{title}: $__rate_interval, not a fixed window: {expr}"
            );
        }
    }
    let provider = yaml("deploy/grafana/dashboards.yaml");
    assert_eq!(provider["providers"][0]["type"].as_str(), Some("file"));
}

/// Drift: the dashboard has a panel on the share of scored rows below the reference 1 %
/// tail, and the rules record it and alert when it stays several times higher.
#[test]
fn drift_has_a_panel_a_recording_rule_and_an_alert() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/base/grafana-dashboard.json")).unwrap();
    let panel = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| {
            p["title"]
                .as_str()
                .unwrap_or("")
                .contains("reference 1% tail")
        })
        .expect("a drift panel");
    let expr = panel["targets"][0]["expr"].as_str().unwrap();
    assert!(
        expr.contains("flowserve_tail_probability_bucket") && expr.contains("le=\"0.01\""),
        "{expr}"
    );
    assert!(expr.contains("flowserve_tail_probability_count"), "{expr}");
    // The bucket the panel and the rule read is one the server exposes.
    assert!(flowserve::metrics::TAIL_BUCKETS.contains(&0.01));
    let rules = yaml("deploy/base/prometheus-rules.yaml");
    let rules = rules["spec"]["groups"][0]["rules"].as_vec().unwrap();
    let record = rules
        .iter()
        .find(|r| r["record"].as_str() == Some("flowserve:tail_below_1pct:ratio15m"))
        .expect("a recording rule");
    assert!(record["expr"].as_str().unwrap().contains("le=\"0.01\""));
    let alert = rules
        .iter()
        .find(|r| r["alert"].as_str() == Some("FlowserveScoreDrift"))
        .expect("a drift alert");
    let expr = alert["expr"].as_str().unwrap();
    let limit: f64 = expr
        .split('>')
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        expr.starts_with("flowserve:tail_below_1pct:ratio15m") && limit >= 0.03,
        "alerts when the share stays several times the expected 1 %: {expr}"
    );
    assert!(alert["for"].as_str().is_some());
}
