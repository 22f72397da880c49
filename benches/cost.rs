//! The MAF/IAF cost table (`make bench`): every model in `--models` served by flowserve, and
//! for each, rows/s of `/log_prob` (the encode graph) and of `/sample` (the decode graph),
//! 256-row requests at 4 connections, alternating models, medians of rounds. MAF's density is
//! one pass and its sampling D passes; IAF's the other way round, so the columns should swap.
//!
//! Usage: cargo bench --bench cost -- --models DIR [--seconds S] [--rounds R] [--out BENCHMARKS.md]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::{json, Value};

const ROWS: usize = 256;
const CONNS: usize = 4;

struct Model {
    name: String,
    family: String,
    dim: usize,
    cost: [String; 2],
    graph_kb: [u64; 2],
    inputs: Value,
}

fn get_json(url: &str) -> Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async { reqwest::get(url).await.unwrap().json().await.unwrap() })
}

fn graph_kb(models: &Path, name: &str, version: u64, file: &str) -> u64 {
    let path = models.join(name).join(version.to_string()).join(file);
    std::fs::metadata(path).map(|m| m.len() / 1024).unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str, default: &str| flag_value(&args, flag, default);
    let secs: f64 = get("--seconds", "3").parse().unwrap();
    let rounds: usize = get("--rounds", "3").parse().unwrap();
    let out = PathBuf::from(get("--out", "BENCHMARKS.md"));
    let models_dir = PathBuf::from(get("--models", "runs/cost/models"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let server_bin = server_binary(root);
    let (_server, base) = start_server(
        &server_bin,
        &models_dir,
        &[
            "--max-batch-rows",
            "1024",
            "--max-samples-per-request",
            "4096",
        ],
        None,
    );

    let listed = get_json(&format!("{base}/v1/models"));
    let mut models: Vec<Model> = listed["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let name = m["name"].as_str().unwrap().to_string();
            let version = m["version"].as_u64().unwrap();
            let sampled = post_json(
                &format!("{base}/sample"),
                &json!({"model": name, "num_samples": ROWS, "seed": 1}),
            );
            Model {
                family: m["family"].as_str().unwrap().into(),
                dim: m["event_shape"][0].as_u64().unwrap() as usize,
                cost: [
                    m["cost"]["encode"].as_str().unwrap().into(),
                    m["cost"]["decode"].as_str().unwrap().into(),
                ],
                graph_kb: [
                    graph_kb(&models_dir, &name, version, "encode.onnx"),
                    graph_kb(&models_dir, &name, version, "decode.onnx"),
                ],
                inputs: sampled["samples"].clone(),
                name,
            }
        })
        .collect();
    models.sort_by(|a, b| (a.dim, &a.family).cmp(&(b.dim, &b.family)));

    // [model][0: log_prob, 1: sample] → rows/s per round.
    let mut results = vec![[Vec::new(), Vec::new()]; models.len()];
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        for (m, r) in models.iter().zip(results.iter_mut()) {
            let lp = load(
                &format!("{base}/log_prob"),
                &json!({"model": m.name, "inputs": m.inputs}),
                ROWS,
                CONNS,
                secs,
            );
            let s = load(
                &format!("{base}/sample"),
                &json!({"model": m.name, "num_samples": ROWS}),
                ROWS,
                CONNS,
                secs,
            );
            assert_eq!(lp.errors + s.errors, 0, "{}: failed requests", m.name);
            r[0].push(lp.rows_per_s);
            r[1].push(s.rows_per_s);
        }
    }
    let mut table = String::from(
        "| D | model | family | /log_prob rows/s | /sample rows/s | log_prob ÷ sample | encode graph | decode graph |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for (m, r) in models.iter().zip(results.iter_mut()) {
        let (lp, s) = (median(&mut r[0]), median(&mut r[1]));
        table.push_str(&format!(
            "| {} | `{}` | {} | {lp:.0} | {s:.0} | {:.2} | {}, {} KB | {}, {} KB |\n",
            m.dim,
            m.name,
            m.family.to_uppercase(),
            lp / s,
            m.cost[0].replace('_', " "),
            m.graph_kb[0],
            m.cost[1].replace('_', " "),
            m.graph_kb[1],
        ));
    }
    let section = format!(
        "## Serving: the MAF / IAF cost table\n\n\
Measured with `make bench` (`scripts/bench-cost.sh`, then `cargo bench --bench cost -- --seconds {secs} --rounds {rounds}`) \
on {} cores ({}). One flowserve process serves every model; each cell is the median of {rounds} rounds of {secs} s \
of {ROWS}-row requests at {CONNS} connections (`--max-batch-rows 1024`), the models alternating. \
/log_prob runs the encode graph (data → latent, density), /sample the decode graph (latent → data).\n\n{table}\n\
The models (trained by `scripts/bench-cost.sh` on real data: wine quality without 3 columns for D = 8, the top half \
of the 8×8 digits for D = 32) are 5 MADEs with 2 hidden layers of 100 units and batch norm between them. \
The MAF is fitted by maximum likelihood; the IAF is distilled from it (`flowtrain train --family iaf --teacher`). \
Both are exported with the sequential direction unrolled: D passes through the same shared weights, so graph files \
grow with the number of nodes, not weights.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_name(),
    );
    println!("{section}");
    write_section(&out, "## Serving: the MAF / IAF cost table", &section);
}
