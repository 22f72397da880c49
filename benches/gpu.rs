//! The GPU check, run on a CUDA machine by `scripts/gpu-check.sh`:
//!
//! 1. where each bundled model's graphs run with `cuda` alone (or why they are refused);
//! 2. parity of encode (z, log_prob and every other output) and decode on CUDA against the
//!    CPU, in process and through a server started with `--execution-providers cuda`
//!    (`/log_prob`, `/encode`, `/decode`), max abs error, tolerance 1e-4 (relative to
//!    max(1, |value|));
//! 3. rows/s of `/log_prob` with 1, 1024 and 16384-row requests on a tabular MAF (shuttle) and
//!    the digits Glow, the GPU server against a CPU server on all of the machine's cores, beside
//!    the in-process ceilings of both.
//!
//! `cargo bench --bench gpu -- --models models --seconds 3 --out BENCHMARKS.md`
//! (ORT_DYLIB_PATH must name ONNX Runtime's CUDA build; the CPU side uses the same library).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    cpu_name, flag_value, load_with, post_json, server_binary, start_server, write_section,
};
use flowpack::runtime::{GraphSession, Provider, SessionOptions};
use flowpack::{Direction, Package};
use serde_json::{json, Value};

const TOL: f32 = 1e-4;
const SIZES: [usize; 3] = [1, 1024, 16_384];
const THROUGHPUT_MODELS: [&str; 2] = ["shuttle", "digits"];

fn options(providers: &[Provider], threads: usize) -> SessionOptions {
    SessionOptions {
        intra_threads: threads,
        providers: providers.to_vec(),
        ..SessionOptions::default()
    }
}

/// The newest version folder of each model in `models`.
fn packages(models: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(models).unwrap() {
        let dir = e.unwrap().path();
        let newest = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|v| v.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .max();
        if let Some(v) = newest {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            out.push((name, dir.join(v.to_string())));
        }
    }
    out.sort();
    out
}

/// `n` rows spread over each feature's observed range (a fixed LCG: the same rows on every run).
fn rows(package: &Package, n: usize) -> Vec<f32> {
    let d = package.event_size();
    let range = package.manifest.domain.observed_range.clone();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(n * d);
    for _ in 0..n {
        for j in 0..d {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let u = (state >> 11) as f64 / (1u64 << 53) as f64;
            let (lo, hi) = range.as_ref().map_or((-2.0, 2.0), |r| (r[j][0], r[j][1]));
            out.push((lo + u * (hi - lo)) as f32);
        }
    }
    out
}

/// Largest |a - b| / max(1, |b|).
fn error(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f32::max)
}

fn nest(v: &[f32], shape: &[usize]) -> Value {
    if shape.len() <= 1 {
        return json!(v);
    }
    let d: usize = shape[1..].iter().product();
    Value::Array(v.chunks(d).map(|r| nest(r, &shape[1..])).collect())
}

fn rows_json(x: &[f32], shape: &[usize]) -> Value {
    let d: usize = shape.iter().product();
    Value::Array(x.chunks(d).map(|r| nest(r, shape)).collect())
}

fn floats(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap() as f32],
        _ => panic!("not numbers: {v}"),
    }
}

/// Rows per second of `session` on `n`-row batches, over about `secs`.
fn ceiling(session: &mut GraphSession, x: &[f32], n: usize, secs: f64) -> f64 {
    let d = session.input_width();
    let batch: Vec<f32> = x.iter().copied().cycle().take(n * d).collect();
    session.run(&batch).unwrap();
    let start = Instant::now();
    let mut done = 0;
    while start.elapsed().as_secs_f64() < secs {
        session.run(&batch).unwrap();
        done += n;
    }
    done as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // The repository root: where the check runs (scripts/gpu-check.sh passes it), else the
    // one it was built in.
    let root = PathBuf::from(flag_value(&args, "--root", env!("CARGO_MANIFEST_DIR")));
    let models = root.join(flag_value(&args, "--models", "models"));
    let secs: f64 = flag_value(&args, "--seconds", "3").parse().unwrap();
    let out = root.join(flag_value(&args, "--out", "BENCHMARKS.md"));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The provider under test: `cuda`; `--device cpu` dry-runs every step on a CPU machine.
    let device: Provider = flag_value(&args, "--device", "cuda").parse().unwrap();
    let device_name = device.as_str();
    let gpu_name = Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,driver_version,memory.total",
            "--format=csv,noheader",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("nvidia-smi: {e}"));
    let library = flowpack::runtime::library_path().unwrap();
    eprintln!(
        "GPU: {gpu_name}; CPU: {} ({cores} cores); ONNX Runtime: {}",
        cpu_name(),
        library.display()
    );

    // 1 and 2: placement and in-process parity, per model and graph.
    let mut placement = String::from(
        "| model | graph | with `cuda` alone | max error vs CPU (in process) |\n|---|---|---|---:|\n",
    );
    let mut all_ok = true;
    let mut inputs = Vec::new();
    for (name, dir) in packages(&models) {
        let package = Package::open(&dir).unwrap();
        let x = rows(&package, 256);
        for graph in Direction::BOTH {
            let mut cpu =
                GraphSession::open(&package, graph, &options(&[Provider::Cpu], cores)).unwrap();
            let input = match graph {
                Direction::Encode => x.clone(),
                // Latents of the rows, so decode sees realistic z.
                Direction::Decode => {
                    let mut enc = GraphSession::open(
                        &package,
                        Direction::Encode,
                        &options(&[Provider::Cpu], cores),
                    )
                    .unwrap();
                    enc.run(&x).unwrap().swap_remove(0)
                }
            };
            let (where_, err) = match GraphSession::open(&package, graph, &options(&[device], 1)) {
                Ok(mut gpu) => {
                    let want = cpu.run(&input).unwrap();
                    let got = gpu.run(&input).unwrap();
                    let err = want
                        .iter()
                        .zip(&got)
                        .map(|(w, g)| error(g, w))
                        .fold(0.0, f32::max);
                    all_ok &= err <= TOL;
                    (gpu.placement.label(), format!("{err:.2e}"))
                }
                Err(e) => {
                    all_ok = false;
                    let partly =
                        GraphSession::open(&package, graph, &options(&[device, Provider::Cpu], 1))
                            .map(|s| s.placement.label())
                            .unwrap_or_else(|e| format!("refused: {e}"));
                    (
                        format!(
                            "refused ({}); with `cuda,cpu`: {partly}",
                            e.to_string().replace('|', "/")
                        ),
                        "-".into(),
                    )
                }
            };
            placement.push_str(&format!(
                "| {name} | {} | {where_} | {err} |\n",
                graph.as_str()
            ));
        }
        inputs.push((name, dir, package, x));
    }
    eprintln!("{placement}");

    // 2, through the servers: every endpoint on the GPU server against the CPU in process.
    let server = server_binary(&root);
    let max_rows = [
        "--max-request-rows",
        "65536",
        "--max-body-bytes",
        "67108864",
    ];
    let (gpu_guard, gpu) = start_server(
        &server,
        &models,
        &[&["--execution-providers", device_name][..], &max_rows].concat(),
        None,
    );
    let mut served =
        String::from("| model | /log_prob | /encode z | /decode x |\n|---|---:|---:|---:|\n");
    for (name, _dir, package, x) in &inputs {
        let shape = package.manifest.event_shape.clone();
        let mut enc = GraphSession::open(
            package,
            Direction::Encode,
            &options(&[Provider::Cpu], cores),
        )
        .unwrap();
        let mut dec = GraphSession::open(
            package,
            Direction::Decode,
            &options(&[Provider::Cpu], cores),
        )
        .unwrap();
        let want = enc.run(x).unwrap();
        let lp = post_json(
            &format!("{gpu}/log_prob"),
            &json!({"model": name, "inputs": rows_json(x, &shape)}),
        );
        let e_lp = error(&floats(&lp["log_prob"]), &want[1]);
        let z = post_json(
            &format!("{gpu}/encode"),
            &json!({"model": name, "inputs": rows_json(x, &shape)}),
        );
        let e_z = error(&floats(&z["latents"]), &want[0]);
        let want_x = dec.run(&want[0]).unwrap();
        let d = post_json(
            &format!("{gpu}/decode"),
            &json!({"model": name, "latents": rows_json(&want[0], &shape)}),
        );
        let e_x = error(&floats(&d["samples"]), &want_x[0]);
        all_ok &= e_lp <= TOL && e_z <= TOL && e_x <= TOL;
        served.push_str(&format!(
            "| {name} | {e_lp:.2e} | {e_z:.2e} | {e_x:.2e} |\n"
        ));
    }
    eprintln!("{served}");

    // 3: rows/s, the GPU server against a CPU server on every core, and both ceilings.
    let intra = cores.to_string();
    let (_cpu_guard, cpu) = start_server(
        &server,
        &models,
        &[
            &["--execution-providers", "cpu", "--intra-op-threads", &intra][..],
            &max_rows,
        ]
        .concat(),
        None,
    );
    let mut speed = String::from(
        "| model | rows/request | GPU server | CPU server | GPU in process | CPU in process |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for name in THROUGHPUT_MODELS {
        let Some((_, _, package, x)) = inputs.iter().find(|i| i.0 == name) else {
            continue;
        };
        let shape = package.manifest.event_shape.clone();
        let mut g = GraphSession::open(package, Direction::Encode, &options(&[device], 1)).ok();
        let mut c = GraphSession::open(
            package,
            Direction::Encode,
            &options(&[Provider::Cpu], cores),
        )
        .unwrap();
        for n in SIZES {
            let d = package.event_size();
            let batch: Vec<f32> = x.iter().copied().cycle().take(n * d).collect();
            let body = json!({"model": name, "inputs": rows_json(&batch, &shape)});
            let conns = if n == 1 { 64 } else { 4 };
            let threads = cores.min(8);
            // Whole requests are counted: give the largest ones longer, so the count is not
            // a handful of them.
            let s = if n >= 16_384 { 2.0 * secs } else { secs };
            let on_gpu = load_with(&format!("{gpu}/log_prob"), &body, n, conns, s, threads);
            let on_cpu = load_with(&format!("{cpu}/log_prob"), &body, n, conns, s, threads);
            let gc = g.as_mut().map_or(f64::NAN, |s| ceiling(s, x, n, secs));
            let cc = ceiling(&mut c, x, n, secs);
            speed.push_str(&format!(
                "| {name} | {n} | {:.0} | {:.0} | {gc:.0} | {cc:.0} |\n",
                on_gpu.rows_per_s, on_cpu.rows_per_s
            ));
            eprintln!(
                "{name} {n}: GPU {:.0} rows/s ({} errors), CPU {:.0} rows/s",
                on_gpu.rows_per_s, on_gpu.errors, on_cpu.rows_per_s
            );
        }
    }
    drop(gpu_guard);
    eprintln!("{speed}");

    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let section = format!(
        "## GPU: CUDA execution provider against the CPU ({date})\n\n\
         Machine: {gpu_name}; {} ({cores} cores). ONNX Runtime: `{}`. Command: `scripts/gpu-check.sh run` \
         (`cargo bench --bench gpu -- --seconds {secs}`). Parity {}: every error below is at most {TOL:e} \
         (|GPU − CPU| / max(1, |CPU|), 256 rows spread over each feature's observed range).\n\n\
         ### Where each graph runs, and in-process parity\n\n{placement}\n\
         ### Through the server started with `--execution-providers cuda` (vs the CPU in process)\n\n{served}\n\
         ### Rows per second of `/log_prob` (JSON; closed loop, 64 connections for 1-row requests, 4 otherwise; \
         the load generator runs on the same machine) and the in-process ceilings (the CPU on all {cores} cores)\n\n{speed}",
        cpu_name(),
        library.display(),
        if all_ok { "holds" } else { "FAILS" },
    );
    write_section(&out, "## GPU: CUDA execution provider", &section);
    std::thread::sleep(Duration::from_millis(10));
    if !all_ok {
        std::process::exit(1);
    }
}
