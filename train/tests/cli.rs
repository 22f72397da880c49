//! The `flowtrain` binary: resuming a killed run, and bad input ending in a one-line error.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn flowtrain() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flowtrain"))
}

// Weight averaging on: its running average must survive the kill too.
const TRAIN: [&str; 16] = [
    "train",
    "--family",
    "realnvp",
    "--data",
    "moons",
    "--steps",
    "300",
    "--hidden",
    "24",
    "--checkpoint-every",
    "20",
    "--eval-every",
    "50",
    "--average-decay",
    "0.99",
    "--quiet",
];

fn manifest(dir: &Path) -> flowpack::Manifest {
    flowpack::Package::open(dir).unwrap().manifest
}

fn checkpoint_step(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("checkpoint/state.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["step"].as_u64()
}

#[test]
fn a_killed_run_resumes_and_ends_where_an_uninterrupted_one_does() {
    let tmp = tempfile::tempdir().unwrap();
    let (whole, killed) = (tmp.path().join("whole"), tmp.path().join("killed"));

    let status = flowtrain()
        .args(TRAIN)
        .arg("--out")
        .arg(&whole)
        .status()
        .unwrap();
    assert!(status.success());

    let mut child = flowtrain()
        .args(TRAIN)
        .arg("--out")
        .arg(&killed)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while checkpoint_step(&killed).unwrap_or(0) < 60 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let at_kill = checkpoint_step(&killed).unwrap();
    assert!(at_kill < 300, "killed mid-run (checkpoint at {at_kill})");
    assert!(
        !killed.join("flow.json").exists(),
        "no package before the run finished"
    );

    let out = flowtrain()
        .args(TRAIN)
        .arg("--out")
        .arg(&killed)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("resuming"),
        "says it resumes"
    );

    let (a, b) = (manifest(&whole), manifest(&killed));
    assert_eq!(
        b.training.steps, 300,
        "the resumed run ends at the same step count"
    );
    assert_eq!(a.training.best_step, b.training.best_step);
    let (va, vb) = (
        a.metrics.validation_nll.unwrap(),
        b.metrics.validation_nll.unwrap(),
    );
    assert!(
        (va - vb).abs() < 1e-5,
        "same result as the uninterrupted run: {va} vs {vb}"
    );

    // The metrics log holds each step once, in order.
    let log = std::fs::read_to_string(killed.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert!(
        steps.windows(2).all(|w| w[0] < w[1]),
        "no duplicated log lines after resuming"
    );
    assert_eq!(steps.last(), Some(&300));
    assert!(killed.join("loss.png").exists() && killed.join("density.png").exists());
}

fn assert_one_line_error(out: Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit status is non-zero");
    assert!(!err.contains("panicked"), "no panic: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    assert!(err.contains(needle), "{err:?} mentions {needle:?}");
}

fn train_on(data: &str, dir: &Path) -> Output {
    flowtrain()
        .args([
            "train", "--family", "nice", "--data", data, "--steps", "5", "--quiet", "--out",
        ])
        .arg(dir)
        .output()
        .unwrap()
}

#[test]
fn bad_input_ends_in_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");

    assert_one_line_error(train_on("/nonexistent/data.csv", &out), "data.csv");

    let csv = tmp.path().join("text.csv");
    std::fs::write(&csv, "a,b\n1,2\n3,abc\n").unwrap();
    assert_one_line_error(
        train_on(csv.to_str().unwrap(), &out),
        "line 3, column \"b\": \"abc\" is not a number",
    );

    let nan = tmp.path().join("nan.csv");
    std::fs::write(&nan, "a,b\n1,2\nNaN,4\n").unwrap();
    assert_one_line_error(train_on(nan.to_str().unwrap(), &out), "not a finite value");

    let res = flowtrain()
        .args(["train", "--family", "glowish", "--data", "moons", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_one_line_error(res, "glowish");

    assert_one_line_error(train_on("no_such_dataset", &out), "unknown dataset");

    let res = flowtrain()
        .args(["eval", "--model"])
        .arg(tmp.path().join("missing"))
        .output()
        .unwrap();
    assert_one_line_error(res, "flow.json");

    let bad_cfg = tmp.path().join("bad.toml");
    std::fs::write(&bad_cfg, "[model]\nlayerz = 3\n").unwrap();
    let res = flowtrain()
        .args(["train", "--config"])
        .arg(&bad_cfg)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_one_line_error(res, "layerz");

    let res = flowtrain()
        .args(["train", "--family", "iaf", "--data", "moons", "--teacher"])
        .arg(tmp.path().join("no_teacher"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_one_line_error(res, "cannot load the teacher");

    let res = flowtrain()
        .args(["train", "--family", "realnvp", "--data", "moons"])
        .args(["--order-agnostic", "true", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_one_line_error(res, "made, maf and iaf only");
}

#[test]
fn eval_and_sample_on_a_trained_package() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let csv = tmp.path().join("data.csv");
    let mut text = String::from("id,u,v\n");
    for i in 0..400 {
        let t = i as f32 / 40.0;
        text.push_str(&format!("{i},{},{}\n", t.sin() * 2.0, t.cos() + 0.1 * t));
    }
    std::fs::write(&csv, text).unwrap();
    let out = flowtrain()
        .args([
            "train",
            "--family",
            "realnvp",
            "--steps",
            "60",
            "--quiet",
            "--drop-columns",
            "id",
            "--data",
        ])
        .arg(&csv)
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = manifest(&dir);
    assert_eq!(
        m.domain.features,
        Some(vec!["u".to_string(), "v".to_string()])
    );

    // eval on the whole CSV: columns are picked by name, the id column is ignored.
    let out = flowtrain()
        .args(["eval", "--model"])
        .arg(&dir)
        .arg("--data")
        .arg(&csv)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("400 rows") && text.contains("nats/example"),
        "{text}"
    );

    let samples = tmp.path().join("s.csv");
    for _ in 0..2 {
        let out = flowtrain()
            .args([
                "sample",
                "-n",
                "7",
                "--seed",
                "5",
                "--temperature",
                "0.5",
                "--model",
            ])
            .arg(&dir)
            .arg("--out")
            .arg(&samples)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = std::fs::read_to_string(&samples).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "u,v");
    assert_eq!(lines.len(), 8);
    assert!(lines[1..]
        .iter()
        .all(|l| l.split(',').all(|v| v.parse::<f32>().unwrap().is_finite())));

    let png = tmp.path().join("s.png");
    let out = flowtrain()
        .args(["sample", "-n", "100", "--seed", "1", "--model"])
        .arg(&dir)
        .arg("--out")
        .arg(&png)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");

    let out = flowtrain()
        .args(["sample", "-n", "3", "--temperature", "-1", "--model"])
        .arg(&dir)
        .arg("--out")
        .arg(&samples)
        .output()
        .unwrap();
    assert_one_line_error(out, "temperature");
}

#[test]
fn the_anomaly_preset_trains_an_explainable_maf_and_calibrate_replaces_its_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let csv = tmp.path().join("normal.csv");
    let mut text = String::from("id,a,b,c\n");
    for i in 0..600 {
        let t = i as f32 / 37.0;
        text.push_str(&format!(
            "{i},{},{},{}\n",
            t.sin(),
            t.cos() * 2.0,
            (t * 0.3).sin() + t.cos()
        ));
    }
    std::fs::write(&csv, text).unwrap();
    let out = flowtrain()
        .args([
            "train",
            "--preset",
            "anomaly",
            "--steps",
            "50",
            "--quiet",
            "--drop-columns",
            "id",
            "--data",
        ])
        .arg(&csv)
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = manifest(&dir);
    assert_eq!(m.family, "maf");
    assert_eq!(m.scoring.contributions.order(), Some(&[0usize, 1, 2][..]));
    let r = m.reference.clone().unwrap();
    assert_eq!(
        (r.count, r.exact),
        (120, true),
        "validation and test splits: {r:?}"
    );
    assert!(r.source.contains("validation and test"), "{}", r.source);
    // The preset's values are in the saved configuration; flags still override them.
    let config = &m.training.config;
    assert_eq!(config["model"]["permutation"], "none");
    assert_eq!(config["model"]["hidden"], 32);
    assert_eq!(config["data"]["power_transform"], true);
    assert_eq!(config["train"]["steps"], 50);

    // A reference set from another file: all its rows, scored by the package's graph.
    let out = flowtrain()
        .args(["calibrate", "--model"])
        .arg(&dir)
        .arg("--data")
        .arg(&csv)
        .args(["--source", "600 normal rows"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = flowpack::Package::open(&dir).unwrap();
    let r = p.manifest.reference.unwrap();
    assert_eq!((r.count, r.source.as_str()), (600, "600 normal rows"));
    assert_eq!(p.reference.unwrap().len(), 600);

    // A file without the model's features is refused in one line.
    let bad = tmp.path().join("bad.csv");
    std::fs::write(&bad, "a,b\n1,2\n").unwrap();
    let out = flowtrain()
        .args(["calibrate", "--model"])
        .arg(&dir)
        .arg("--data")
        .arg(&bad)
        .output()
        .unwrap();
    assert_one_line_error(out, "\"c\"");
}

/// Runs flowtrain with `args`; `(success, stdout, stderr)`.
fn run(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let out = flowtrain().args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_conditional_model_evaluates_and_samples_given_its_context() {
    use std::ffi::OsStr;
    let tmp = tempfile::tempdir().unwrap();
    let (dir, csv) = (tmp.path().join("m"), tmp.path().join("data.csv"));
    let mut text = String::from("u,shop,v\n");
    for i in 0..400 {
        let t = i as f32 / 40.0;
        let shop = ["north", "south"][i % 2];
        text.push_str(&format!(
            "{},{shop},{}\n",
            t.sin() + (i % 2) as f32 * 3.0,
            t.cos()
        ));
    }
    std::fs::write(&csv, text).unwrap();
    let o = |s: &'static str| OsStr::new(s);
    let (ok, _, err) = run(&[
        o("train"),
        o("--family"),
        o("maf"),
        o("--steps"),
        o("60"),
        o("--quiet"),
        o("--context"),
        o("shop"),
        o("--data"),
        csv.as_os_str(),
        o("--out"),
        dir.as_os_str(),
    ]);
    assert!(ok, "{err}");
    let m = manifest(&dir);
    assert_eq!(
        m.domain.features,
        Some(vec!["u".to_string(), "v".to_string()])
    );
    assert_eq!(m.context.as_ref().unwrap().columns[0].name, "shop");

    // eval reads the context column of the CSV by name.
    let (ok, out, err) = run(&[
        o("eval"),
        o("--model"),
        dir.as_os_str(),
        o("--data"),
        csv.as_os_str(),
    ]);
    assert!(
        ok && out.contains("400 rows") && out.contains("nats/example"),
        "{out}{err}"
    );

    // Samples need the context, by name, with a known category.
    let samples = tmp.path().join("s.csv");
    let sample = |extra: &[&OsStr]| {
        let mut args = vec![
            o("sample"),
            o("-n"),
            o("50"),
            o("--seed"),
            o("3"),
            o("--model"),
            dir.as_os_str(),
            o("--out"),
            samples.as_os_str(),
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let (ok, out, err) = sample(&[o("--context"), o("shop=south")]);
    assert!(ok && out.contains("wrote 50 samples"), "{out}{err}");
    let south = std::fs::read_to_string(&samples).unwrap();
    let (ok, _, _) = sample(&[o("--context"), o("shop=north")]);
    assert!(ok);
    assert_ne!(
        south,
        std::fs::read_to_string(&samples).unwrap(),
        "the context changes the samples"
    );
    for (extra, says) in [
        (vec![], "give shop=..."),
        (
            vec![o("--context"), o("shop=east")],
            "no category \"east\" (categories: north, south)",
        ),
        (
            vec![o("--context"), o("city=x")],
            "no context column \"city\"",
        ),
        (
            vec![o("--rows-by"), o("shop")],
            "--rows-by draws a PNG grid",
        ),
    ] {
        let (ok, _, err) = sample(&extra);
        assert!(!ok && err.contains(says), "{says}: {err}");
    }
}

#[test]
fn a_class_conditional_image_model_draws_one_row_per_class() {
    use std::ffi::OsStr;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("g");
    let o = |s: &'static str| OsStr::new(s);
    let (ok, _, err) = run(&[
        o("train"),
        o("--family"),
        o("glow"),
        o("--data"),
        o("digits"),
        o("--context"),
        o("label:categorical"),
        o("--layers"),
        o("1"),
        o("--hidden"),
        o("4"),
        o("--steps"),
        o("3"),
        o("--quiet"),
        o("--out"),
        dir.as_os_str(),
    ]);
    assert!(ok, "{err}");
    let png = tmp.path().join("grid.png");
    let (ok, out, err) = run(&[
        o("sample"),
        o("--model"),
        dir.as_os_str(),
        o("--rows-by"),
        o("label"),
        o("-n"),
        o("4"),
        o("--seed"),
        o("1"),
        o("--out"),
        png.as_os_str(),
    ]);
    assert!(ok && out.contains("wrote 40 samples"), "{out}{err}");
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let info = decoder.read_info().unwrap().info().clone();
    // 10 rows of 4 images, each image scaled to the same square size.
    let ratio = info.height as f64 / info.width as f64;
    assert!((ratio - 2.5).abs() < 0.05, "{}×{}", info.width, info.height);
}
