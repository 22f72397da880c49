//! The validators a platform team runs before adopting a service, over deploy/, the alert
//! rules, openapi.yaml and the Dockerfile: kubernetes-validate --strict, promtool (check and
//! unit-test the rules), openapi-spec-validator and hadolint. `make test` installs them
//! (PyPI pins in tests/requirements.txt; promtool from Debian's prometheus package).

use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{YamlEmitter, YamlLoader};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A validator `make test` installs, or a clear failure saying how to get it.
fn tool(relative: &str) -> PathBuf {
    let p = root().join(relative);
    assert!(
        p.exists(),
        "{} is missing: run `make test` (scripts/test-venv.sh, scripts/fetch-promtool.sh)",
        p.display()
    );
    p
}

/// Runs `cmd`; panics with its output unless it exits 0. Returns stdout and stderr.
fn passes(cmd: &mut Command) -> String {
    let out = cmd.current_dir(root()).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn kubernetes_manifests_are_valid_strictly() {
    let files = [
        "deploy/base/namespace.yaml",
        "deploy/base/serviceaccount.yaml",
        "deploy/base/pvc.yaml",
        "deploy/base/deployment.yaml",
        "deploy/base/service.yaml",
        "deploy/base/pdb.yaml",
        "deploy/base/networkpolicy.yaml",
        "deploy/autoscaling/hpa.yaml",
        "deploy/score-job.yaml",
    ];
    let text = passes(
        Command::new(tool(".test-venv/bin/kubernetes-validate"))
            .args(["--strict", "-k", "1.33.0"])
            .args(files),
    );
    assert_eq!(
        text.matches(" passed for resource ").count(),
        files.len(),
        "{text}"
    );
    // The overlays render and validate too, where kubectl is on the machine (CI has no
    // kubectl; the raw files above are what the overlays are made of).
    if Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_ok()
    {
        for overlay in ["cpu", "gpu"] {
            let out = Command::new("kubectl")
                .args(["kustomize", &format!("deploy/overlays/{overlay}")])
                .current_dir(root())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let dir = tempfile::tempdir().unwrap();
            let rendered = dir.path().join("rendered.yaml");
            std::fs::write(&rendered, &out.stdout).unwrap();
            let text = passes(
                Command::new(tool(".test-venv/bin/kubernetes-validate"))
                    .args(["--strict", "-k", "1.33.0"])
                    .arg(&rendered),
            );
            assert!(!text.contains("ERROR"), "{overlay}: {text}");
        }
    }
}

#[test]
fn prometheus_rules_check_and_pass_their_unit_tests() {
    let promtool = tool(".tools/promtool");
    let rule = YamlLoader::load_from_str(
        &std::fs::read_to_string(root().join("deploy/base/prometheus-rules.yaml")).unwrap(),
    )
    .unwrap()
    .remove(0);
    let mut spec = String::new();
    YamlEmitter::new(&mut spec).dump(&rule["spec"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), spec).unwrap();
    std::fs::copy(
        root().join("deploy/base/prometheus-rules.test.yaml"),
        dir.path().join("rules.test.yaml"),
    )
    .unwrap();
    let text = passes(
        Command::new(&promtool)
            .args(["check", "rules", "--lint=all", "--lint-fatal"])
            .arg(dir.path().join("rules.yaml")),
    );
    assert!(text.contains("SUCCESS"), "{text}");
    let text = passes(
        Command::new(&promtool)
            .args(["test", "rules"])
            .arg(dir.path().join("rules.test.yaml")),
    );
    assert!(text.contains("SUCCESS"), "{text}");
}

#[test]
fn every_dashboard_query_parses() {
    // Each panel's PromQL, with the dashboard's variables filled in, as a recording rule.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/base/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut n = 0;
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "2m")
                .replace("$namespace", ".*")
                .replace("$instance", ".*")
                .replace("$model", ".*");
            n += 1;
            rules.push_str(&format!(
                "      - record: dashboard:panel{n}\n        expr: {}\n",
                serde_json::to_string(&expr).unwrap()
            ));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard.yaml"), rules).unwrap();
    let text = passes(
        Command::new(tool(".tools/promtool"))
            .args(["check", "rules"])
            .arg(dir.path().join("dashboard.yaml")),
    );
    assert!(
        text.contains(&format!("SUCCESS: {n} rules found")),
        "{text}"
    );
}

#[test]
fn openapi_is_valid() {
    let text = passes(
        Command::new(tool(".test-venv/bin/openapi-spec-validator")).arg(Path::new("openapi.yaml")),
    );
    assert!(text.contains("OK"), "{text}");
}

#[test]
fn the_dockerfile_lints_clean() {
    passes(Command::new(tool(".test-venv/bin/hadolint")).arg("Dockerfile"));
}
