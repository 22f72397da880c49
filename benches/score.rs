//! `flowserve score` against the in-process ONNX Runtime ceiling (`make bench`): a table of
//! `--rows` rows drawn from the bundled shuttle model, as Parquet and as CSV; the ceiling is
//! the same encode graph run in-process on the same rows already in memory as f32, in the
//! same 4096-row batches on one thread; ours is the whole command (start, load, read,
//! score, tail probabilities, write). Rounds alternate; medians.
//!
//! Usage: cargo bench --bench score -- [--rows N] [--rounds R] [--model DIR] [--out BENCHMARKS.md]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::{ArrayRef, Float32Array, RecordBatch, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use common::*;
use flowpack::runtime::{GraphSession, SessionOptions};
use flowpack::{Direction, Package};

const BATCH: usize = 4096;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `rows` samples of the model (decoded from seeded noise), row-major, rounded to the grid
/// of the features the model was trained on as recorded on one (shuttle's are integers), so
/// they look like the data.
fn draw(package: &Package, rows: usize) -> Vec<f32> {
    let d = package.event_size();
    let m = &package.manifest;
    let names = m.domain.features.clone().unwrap_or_default();
    let steps: Vec<f64> = names
        .iter()
        .map(|n| {
            m.domain
                .quantized
                .iter()
                .find(|q| &q.feature == n)
                .map_or(0.0, |q| q.step)
        })
        .collect();
    let mut decode =
        GraphSession::open(package, Direction::Decode, &SessionOptions::default()).unwrap();
    let mut out = Vec::with_capacity(rows * d);
    let z = flowpack::sampling::latent_noise(rows, d, 1.0, 7);
    for chunk in z.chunks(BATCH * d) {
        out.extend(decode.run(chunk).unwrap().remove(0));
    }
    for (i, v) in out.iter_mut().enumerate() {
        let q = steps.get(i % d).copied().unwrap_or(0.0);
        if q > 0.0 {
            *v = ((*v as f64 / q).round() * q) as f32;
        }
    }
    out
}

fn write_parquet(path: &Path, names: &[String], x: &[f32]) {
    let d = names.len();
    let n = x.len() / d;
    let mut fields = vec![Field::new("id", DataType::UInt64, false)];
    fields.extend(
        names
            .iter()
            .map(|f| Field::new(f, DataType::Float32, false)),
    );
    let schema = Arc::new(Schema::new(fields));
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), None).unwrap();
    for start in (0..n).step_by(65_536) {
        let end = (start + 65_536).min(n);
        let mut cols: Vec<ArrayRef> = vec![Arc::new(UInt64Array::from_iter_values(
            start as u64..end as u64,
        ))];
        for j in 0..d {
            cols.push(Arc::new(Float32Array::from_iter_values(
                (start..end).map(|i| x[i * d + j]),
            )));
        }
        w.write(&RecordBatch::try_new(schema.clone(), cols).unwrap())
            .unwrap();
    }
    w.close().unwrap();
}

fn write_csv(path: &Path, names: &[String], x: &[f32]) {
    use std::io::Write;
    let d = names.len();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(f, "id,{}", names.join(",")).unwrap();
    for (i, row) in x.chunks(d).enumerate() {
        let cells: Vec<String> = row.iter().map(|v| v.to_string()).collect();
        writeln!(f, "{i},{}", cells.join(",")).unwrap();
    }
}

/// Rows per second of the encode graph alone, in-process, on rows already in memory.
fn ceiling(package: &Package, x: &[f32]) -> f64 {
    let d = package.event_size();
    let mut s = GraphSession::open(package, Direction::Encode, &SessionOptions::default()).unwrap();
    let t = Instant::now();
    for chunk in x.chunks(BATCH * d) {
        std::hint::black_box(s.run(chunk).unwrap());
    }
    (x.len() / d) as f64 / t.elapsed().as_secs_f64()
}

/// Rows per second of the whole `flowserve score` command.
fn command(model: &Path, input: &Path, output: &Path, rows: usize) -> f64 {
    let t = Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_flowserve"))
        .arg("score")
        .arg("--model")
        .arg(model)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(["--quiet", "--keep", "id"])
        .status()
        .unwrap();
    assert!(status.success());
    rows as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str, default: &str| flag_value(&args, flag, default);
    let rows: usize = get("--rows", "1000000").parse().unwrap();
    let rounds: usize = get("--rounds", "3").parse().unwrap();
    let model = PathBuf::from(get("--model", "models/shuttle/1"));
    let out = get("--out", "");
    let package = Package::open(&model).unwrap();
    let names = package.manifest.domain.features.clone().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let x = draw(&package, rows);
    let pq = tmp.path().join("table.parquet");
    let csv = tmp.path().join("table.csv");
    write_parquet(&pq, &names, &x);
    write_csv(&csv, &names, &x);
    let mb = |p: &Path| std::fs::metadata(p).unwrap().len() as f64 / 1e6;
    eprintln!(
        "{rows} rows: {:.0} MB Parquet, {:.0} MB CSV",
        mb(&pq),
        mb(&csv)
    );
    let (mut c, mut p, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        c.push(ceiling(&package, &x));
        p.push(command(&model, &pq, &tmp.path().join("out.parquet"), rows));
        v.push(command(&model, &csv, &tmp.path().join("out.csv"), rows));
        eprintln!(
            "round {r}: ceiling {:.0}, parquet {:.0}, csv {:.0} rows/s",
            c[r], p[r], v[r]
        );
    }
    let (c, p, v) = (median(c), median(p), median(v));
    let m = &package.manifest;
    let section = format!(
        "## Batch scoring: `flowserve score` against the in-process ceiling\n\n\
Machine: {cpu}, {cores} cores. Command: `cargo bench --bench score -- --rows {rows} --rounds {rounds}` \
(part of `make bench`). Model: `{model}` ({family}, {d} features, contributions {contrib}). \
{rows} rows drawn from the model (rounded to the data's integer grid), written once as Parquet ({pq_mb:.0} MB, an `id` column and \
the features as float32) and as CSV ({csv_mb:.0} MB). The ceiling runs the encode graph in \
this process on the same rows already in memory, in the same {BATCH}-row batches on one \
ONNX Runtime thread; `flowserve score` is the whole command: start, load and check the \
package, read, score, tail probabilities, contributions, write (with `--keep id`). \
Rounds alternate; medians of {rounds}.\n\n\
| path | rows/s | × ceiling |\n|---|---:|---:|\n\
| in-process ONNX Runtime (encode graph only) | {c:.0} | 1.00 |\n\
| `flowserve score` Parquet → Parquet | {p:.0} | {pr:.2} |\n\
| `flowserve score` CSV → CSV | {v:.0} | {vr:.2} |\n\n\
The scorer reads, scores and writes on three threads, so on two cores the reading and \
writing overlap the graph runs; what is left is the process start and package load, and \
the parse/format work that competes for the second core.\n",
        cpu = cpu_name(),
        cores = std::thread::available_parallelism().map_or(0, |n| n.get()),
        model = model.display(),
        family = m.family,
        d = names.len(),
        contrib = if m.scoring.contributions.order().is_some() { "exact" } else { "none" },
        pq_mb = mb(&pq),
        csv_mb = mb(&csv),
        pr = p / c,
        vr = v / c,
    );
    print!("{section}");
    if !out.is_empty() {
        write_section(Path::new(&out), "## Batch scoring:", &section);
    }
}
