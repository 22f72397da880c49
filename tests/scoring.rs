//! Anomaly scoring end to end: `POST /score` against a real process, and `flowserve score`
//! on CSV and Parquet files, both over the bundled packages and real ONNX Runtime.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::*;
use flowpack::Direction::{Decode, Encode};
use flowpack::{Package, ReferenceSet};
use serde_json::{json, Value};

/// A shuttle row labelled as an anomaly in the data (the README's example) and a normal one.
const SHUTTLE_OUTLIER: [f32; 9] = [50.0, 21.0, 77.0, 0.0, 28.0, 0.0, 27.0, 48.0, 22.0];
const SHUTTLE_NORMAL: [f32; 9] = [53.0, 0.0, 82.0, 0.0, 52.0, -5.0, 29.0, 30.0, 2.0];

/// A repository holding copies of the named bundled models.
fn repo_with(names: &[&str]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for n in names {
        copy_dir(&bundled_models().join(n), &tmp.path().join(n));
    }
    tmp
}

/// Kolmogorov–Smirnov distance between the sample `p` and U(0, 1).
fn ks_uniform(p: &[f64]) -> f64 {
    let mut p = p.to_vec();
    p.sort_by(f64::total_cmp);
    let m = p.len() as f64;
    p.iter()
        .enumerate()
        .map(|(i, &v)| ((i + 1) as f64 / m - v).max(v - i as f64 / m))
        .fold(0.0, f64::max)
}

/// `n` draws of the model in `dir` at temperature `t`.
fn draws(dir: &Path, n: usize, t: f64, seed: u64) -> Vec<f32> {
    let z = flowpack::sampling::latent_noise(n, 2, t, seed);
    direct(dir, Decode, &z).remove(0)
}

async fn tail_probabilities(server: &Server, rows: &[f32], d: usize) -> Vec<f64> {
    let mut out = Vec::new();
    for chunk in rows.chunks(500 * d) {
        let inputs: Vec<&[f32]> = chunk.chunks(d).collect();
        let (status, body) = server
            .post("/v1/models/moons/score", json!({"inputs": inputs}))
            .await;
        assert_eq!(status, 200, "{body}");
        for s in body["scores"].as_array().unwrap() {
            out.push(s["tail_probability"].as_f64().unwrap());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_probabilities_of_fresh_draws_are_uniform_and_thresholds_flag_their_share() {
    // The reference set: 4000 draws from the model itself, scored by its own graph.
    let repo = repo_with(&["moons"]);
    let dir = repo.path().join("moons/1");
    let reference = draws(&dir, 4000, 1.0, 1);
    let lp = direct(&dir, Encode, &reference).remove(1);
    let mut package = Package::open(&dir).unwrap();
    package
        .set_reference(
            ReferenceSet::from_log_probs(&lp).unwrap(),
            "4000 draws of the model",
        )
        .unwrap();

    let server = Server::start(repo.path(), &[]);
    server.ready().await;
    // Fresh draws: their tail probabilities are uniform. KS at the 0.1 % level for 2000
    // draws: D < 1.95/√2000 = 0.0436, plus the reference set's own resolution 1/4001.
    let m = 2000;
    let p = tail_probabilities(&server, &draws(&dir, m, 1.0, 2), 2).await;
    let d = ks_uniform(&p);
    assert!(d < 0.0436 + 1.0 / 4001.0, "KS distance {d} to U(0, 1)");
    assert!(p.iter().all(|&v| v > 0.0 && v <= 1.0));

    // A threshold of 0.05 flags 5 % of them: within 0.025 (four standard deviations of the
    // draws' and the reference set's binomial noise together).
    let flagged = p.iter().filter(|&&v| v <= 0.05).count() as f64 / m as f64;
    assert!((flagged - 0.05).abs() < 0.025, "flagged {flagged}");
    let (status, body) = server
        .post(
            "/v1/models/moons/score",
            json!({"inputs": draws(&dir, m, 1.0, 3).chunks(2).take(500).collect::<Vec<_>>(), "threshold": 0.05}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["threshold"], 0.05);
    assert_eq!(body["reference_size"], 4000);
    let scores = body["scores"].as_array().unwrap();
    for s in scores {
        let p = s["tail_probability"].as_f64().unwrap();
        assert_eq!(s["outlier"].as_bool().unwrap(), p <= 0.05, "{s}");
    }

    // The check has power: draws from a wider distribution (T = 1.4) are not uniform.
    let wide = tail_probabilities(&server, &draws(&dir, m, 1.4, 4), 2).await;
    let d_wide = ks_uniform(&wide);
    assert!(d_wide > 0.1, "KS distance {d_wide} of T = 1.4 draws");

    // Every scored row fed the drift histogram.
    let text = server.metrics().await;
    let count = metric_sum(
        &text,
        "flowserve_tail_probability_count",
        &["model=\"moons\""],
    );
    assert_eq!(count, (2 * m + 500) as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contributions_explain_the_outlier_and_sum_to_its_log_prob() {
    let server = Server::start(&bundled_models(), &[]);
    server.ready().await;
    let (status, body) = server
        .post(
            "/v1/models/shuttle/score",
            json!({"inputs": [SHUTTLE_OUTLIER, SHUTTLE_NORMAL]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let info = server.get_json("/v1/models/shuttle").await;
    let features: Vec<String> = serde_json::from_value(info["domain"]["features"].clone()).unwrap();
    assert_eq!(info["scoring"]["contributions"], true);
    assert_eq!(info["reference"]["count"], body["reference_size"], "{info}");

    let direct = direct(
        &bundled_models().join("shuttle/1"),
        Encode,
        &[SHUTTLE_OUTLIER, SHUTTLE_NORMAL].concat(),
    );
    let scores = body["scores"].as_array().unwrap();
    for (i, s) in scores.iter().enumerate() {
        let lp = s["log_prob"].as_f64().unwrap();
        assert_eq!(lp as f32, direct[1][i], "log_prob as the graph computes it");
        let c = s["contributions"].as_array().unwrap();
        assert_eq!(c.len(), features.len());
        let terms: Vec<f64> = c.iter().map(|t| t["log_prob"].as_f64().unwrap()).collect();
        let sum: f64 = terms.iter().sum();
        let scale: f64 = terms.iter().map(|t| t.abs()).sum::<f64>().max(1.0);
        assert!(
            (sum - lp).abs() <= 1e-5 * scale,
            "row {i}: terms sum to {sum}, log_prob {lp}"
        );
        assert!(
            terms.windows(2).all(|w| w[0] <= w[1]),
            "most surprising first: {terms:?}"
        );
        // Each named feature's term is the graph's term for that feature.
        for t in c {
            let f = features
                .iter()
                .position(|f| f == t["feature"].as_str().unwrap())
                .unwrap();
            assert_eq!(t["log_prob"].as_f64().unwrap() as f32, direct[2][i * 9 + f]);
        }
    }
    assert_eq!(scores[0]["outlier"], true, "{}", scores[0]);
    assert_eq!(scores[1]["outlier"], false, "{}", scores[1]);
    let p0 = scores[0]["tail_probability"].as_f64().unwrap();
    assert!(p0 < 0.005, "the labelled anomaly's tail probability {p0}");

    // `top` keeps the most surprising; `contributions: false` leaves them out.
    let (_, top) = server
        .post(
            "/v1/models/shuttle/score",
            json!({"inputs": [SHUTTLE_OUTLIER], "top": 2}),
        )
        .await;
    assert_eq!(
        top["scores"][0]["contributions"].as_array().unwrap().len(),
        2
    );
    assert_eq!(
        top["scores"][0]["contributions"][0],
        scores[0]["contributions"][0]
    );
    let (_, none) = server
        .post(
            "/score",
            json!({"model": "shuttle", "inputs": [SHUTTLE_OUTLIER], "contributions": false}),
        )
        .await;
    assert!(none["scores"][0].get("contributions").is_none(), "{none}");

    // A coupling flow answers without contributions, and /v1/models says why.
    let (status, wine) = server
        .post(
            "/v1/models/wine/score",
            json!({"inputs": [[7.4, 0.7, 0.0, 1.9, 0.076, 11.0, 34.0, 0.9978, 3.51, 0.56, 9.4]]}),
        )
        .await;
    assert_eq!(status, 200, "{wine}");
    assert!(wine["scores"][0].get("contributions").is_none());
    let info = server.get_json("/v1/models/wine").await;
    assert_eq!(info["scoring"]["contributions"], false);
    let why = info["scoring"]["why_not"].as_str().unwrap();
    assert!(why.contains("coupling"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_score_requests_get_a_4xx_naming_the_field() {
    // A copy of wine without its reference set, beside the bundled shuttle.
    let repo = repo_with(&["shuttle", "wine"]);
    let dir = repo.path().join("wine/1");
    let mut m = Package::open(&dir).unwrap().manifest;
    m.reference = None;
    m.write(&dir).unwrap();
    let server = Server::start(repo.path(), &[]);
    server.ready().await;
    let row = json!(SHUTTLE_NORMAL);
    let zeros11 = vec![0.0f32; 11];
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "/v1/models/shuttle/score",
            json!({"inputs": [row], "threshold": 0}),
            422,
            "threshold",
        ),
        (
            "/v1/models/shuttle/score",
            json!({"inputs": [row], "threshold": 1.5}),
            422,
            "threshold",
        ),
        (
            "/v1/models/shuttle/score",
            json!({"inputs": [row], "threshold": -0.1}),
            422,
            "threshold",
        ),
        (
            "/v1/models/shuttle/score",
            json!({"inputs": [row], "threshold": "low"}),
            422,
            "threshold",
        ),
        (
            "/v1/models/shuttle/score",
            json!({"inputs": [row], "top": 0}),
            422,
            "top",
        ),
        (
            "/v1/models/shuttle/score",
            json!({"inputs": [[1.0, 2.0]]}),
            422,
            "inputs",
        ),
        (
            "/v1/models/shuttle/score",
            json!({"inputs": [row], "extra": 1}),
            422,
            "extra",
        ),
        (
            "/v1/models/nope/score",
            json!({"inputs": [row]}),
            404,
            "nope",
        ),
        (
            "/v1/models/wine/score",
            json!({"inputs": [zeros11]}),
            422,
            "reference set",
        ),
    ];
    for (path, body, status, phrase) in cases {
        let (got, answer) = server.post(path, body.clone()).await;
        assert_eq!(got, status, "{path} {body}: {answer}");
        let msg = answer["error"]["message"].as_str().unwrap();
        assert!(msg.contains(phrase), "{path} {body}: {msg}");
    }
    // NaN cannot be written in JSON; a literal is a malformed body naming the position.
    let (status, _, answer) = server
        .post_raw(
            "/v1/models/shuttle/score",
            Some("application/json"),
            b"{\"inputs\": [[NaN, 0, 0, 0, 0, 0, 0, 0, 0]]}".to_vec(),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    // A value past float32 names the element.
    let (status, answer) = server
        .post(
            "/v1/models/shuttle/score",
            json!({"inputs": [[1e39, 0, 0, 0, 0, 0, 0, 0, 0]]}),
        )
        .await;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("inputs[0][0]"),
        "{answer}"
    );
    // The server is still well.
    let (status, _) = server
        .post("/v1/models/shuttle/score", json!({"inputs": [row]}))
        .await;
    assert_eq!(status, 200);
}

fn flowserve_score(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flowserve"))
        .arg("score")
        .args(args)
        .output()
        .unwrap()
}

/// The rows of the bundled shuttle test file: normal rows, the outlier, and two malformed
/// rows (1 and 4), as CSV with an id column.
fn mixed_csv(path: &Path) {
    let mut text = String::from("id,f1,f2,f3,f4,f5,f6,f7,f8,f9,note\n");
    let rows: Vec<String> = vec![
        SHUTTLE_NORMAL
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(","),
        "37,0,76,0,28,18,40,48,x".into(),
        SHUTTLE_OUTLIER
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(","),
        "37,0,76,0,28,18,40,48,8".into(),
        "37,0,76,0,,18,40,48,8".into(),
        "55,0,81,0,-6,11,25,88,64".into(),
    ];
    for (i, r) in rows.iter().enumerate() {
        text.push_str(&format!("id{i},{r},n{i}\n"));
    }
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_scorer_writes_what_score_answers_row_for_row() {
    let tmp = tempfile::tempdir().unwrap();
    let model = bundled_models().join("shuttle/1");
    let model = model.to_str().unwrap();
    let input = tmp.path().join("mixed.csv");
    mixed_csv(&input);
    let out = tmp.path().join("scores.csv");
    let (i, o) = (input.to_str().unwrap(), out.to_str().unwrap());

    // A malformed row stops it, naming the row and column; nothing is written.
    let run = flowserve_score(&["--model", model, "--input", i, "--output", o, "--quiet"]);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("row 1") && err.contains("\"f9\""), "{err}");
    assert!(!out.exists() && !tmp.path().join("scores.csv.part").exists());

    // With --skip-bad the two bad rows are counted and the others scored.
    let run = flowserve_score(&[
        "--model",
        model,
        "--input",
        i,
        "--output",
        o,
        "--quiet",
        "--skip-bad",
        "--keep",
        "id",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("scored 4 rows") && err.contains("2 malformed rows skipped"),
        "{err}"
    );
    let mut reader = csv::Reader::from_path(&out).unwrap();
    let headers = reader.headers().unwrap().clone();
    let written: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
    let rows: Vec<u64> = written.iter().map(|r| r[0].parse().unwrap()).collect();
    assert_eq!(rows, [0, 2, 3, 5]);
    assert_eq!(&written[1][1], "id2");

    // The same rows through POST /score: the same numbers.
    let server = Server::start(&bundled_models(), &[]);
    server.ready().await;
    let good: Vec<Vec<f32>> = [0usize, 2, 3, 5]
        .iter()
        .map(|&r| {
            let text = std::fs::read_to_string(&input).unwrap();
            let line = text.lines().nth(r + 1).unwrap().to_string();
            line.split(',')
                .skip(1)
                .take(9)
                .map(|v| v.parse().unwrap())
                .collect()
        })
        .collect();
    let (status, body) = server
        .post("/v1/models/shuttle/score", json!({"inputs": good}))
        .await;
    assert_eq!(status, 200);
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    for (k, s) in body["scores"].as_array().unwrap().iter().enumerate() {
        let w = &written[k];
        assert_eq!(
            w[col("log_prob")].parse::<f32>().unwrap(),
            s["log_prob"].as_f64().unwrap() as f32
        );
        // The same (k + 1)/(n + 1): serde_json's default float parsing may land one ulp off
        // the shortest round-trip text both sides wrote, so compare the counts k.
        let n = body["reference_size"].as_f64().unwrap() + 1.0;
        let written_p: f64 = w[col("tail_probability")].parse().unwrap();
        let served_p = s["tail_probability"].as_f64().unwrap();
        assert_eq!((written_p * n).round(), (served_p * n).round());
        assert!((written_p - served_p).abs() <= 1e-15 * served_p);
        assert_eq!(
            w[col("outlier")].parse::<bool>().unwrap(),
            s["outlier"].as_bool().unwrap()
        );
        let top = &s["contributions"][0];
        assert_eq!(&w[col("most_surprising")], top["feature"].as_str().unwrap());
        for c in s["contributions"].as_array().unwrap() {
            let name = format!("contribution_{}", c["feature"].as_str().unwrap());
            assert_eq!(
                w[col(&name)].parse::<f32>().unwrap(),
                c["log_prob"].as_f64().unwrap() as f32
            );
        }
    }
    assert_eq!(&written[1][col("outlier")], "true");

    // Parquet, in two shards of row groups: together they are the CSV's scores.
    let pq = tmp.path().join("mixed.parquet");
    write_parquet(&pq, &good);
    let mut by_row = std::collections::BTreeMap::new();
    for shard in ["0/2", "1/2"] {
        let o = tmp.path().join(format!("part-{}.parquet", &shard[..1]));
        let run = flowserve_score(&[
            "--model",
            model,
            "--input",
            pq.to_str().unwrap(),
            "--output",
            o.to_str().unwrap(),
            "--quiet",
            "--shard",
            shard,
            "--skip-bad",
        ]);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        for (row, lp) in read_parquet_scores(&o) {
            by_row.insert(row, lp);
        }
    }
    // Row groups of 2 rows: [good0, good1], [null row, good2], [good3]; the null is skipped.
    let want: Vec<(u64, f32)> = [0u64, 1, 3, 4]
        .iter()
        .zip(body["scores"].as_array().unwrap())
        .map(|(&r, s)| (r, s["log_prob"].as_f64().unwrap() as f32))
        .collect();
    // ONNX Runtime's kernels round differently for different batch sizes (the shards run 2-
    // and 1-row batches, the request one of 4): the last float32 bit may differ.
    let got: Vec<(u64, f32)> = by_row.into_iter().collect();
    assert_eq!(got.len(), want.len());
    for ((r, a), (w, b)) in got.iter().zip(&want) {
        assert_eq!(r, w);
        assert!((a - b).abs() <= 1e-6 * b.abs(), "row {r}: {a} vs {b}");
    }
}

/// `rows` (9 features) as a Parquet file in row groups of two, with a row of nulls third.
fn write_parquet(path: &Path, rows: &[Vec<f32>]) {
    use arrow_array::{ArrayRef, Float64Array, RecordBatch};
    let mut all: Vec<Option<Vec<f32>>> = rows.iter().cloned().map(Some).collect();
    all.insert(2, None);
    let fields: Vec<arrow_schema::Field> = (1..=9)
        .map(|j| arrow_schema::Field::new(format!("f{j}"), arrow_schema::DataType::Float64, true))
        .collect();
    let schema = Arc::new(arrow_schema::Schema::new(fields));
    let columns: Vec<ArrayRef> = (0..9)
        .map(|j| {
            Arc::new(Float64Array::from(
                all.iter()
                    .map(|r| r.as_ref().map(|r| r[j] as f64))
                    .collect::<Vec<_>>(),
            )) as ArrayRef
        })
        .collect();
    let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(2))
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, schema, Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn read_parquet_scores(path: &Path) -> Vec<(u64, f32)> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float32Type, UInt64Type};
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut out = Vec::new();
    for b in reader {
        let b = b.unwrap();
        let rows = b
            .column_by_name("row")
            .unwrap()
            .as_primitive::<UInt64Type>();
        let lp = b
            .column_by_name("log_prob")
            .unwrap()
            .as_primitive::<Float32Type>();
        out.extend(
            rows.values()
                .iter()
                .copied()
                .zip(lp.values().iter().copied()),
        );
    }
    out
}
