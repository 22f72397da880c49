//! Serving benchmark (`make bench`): flowserve under load next to the in-process ONNX Runtime
//! ceiling and a bare-axum HTTP floor, measured in one run, alternating, medians of rounds.
//!
//! (a) single-row /log_prob at 64 connections; (a1) the same with batching off
//! (--max-batch-rows 1); (a2) with --max-queue-delay-us 100; (b) 1024-row requests at 4
//! connections; (c) the encode graph run by ONNX Runtime directly at batch 1024; (d) a bare
//! axum handler on the same runtime settings that parses the same single-row JSON and
//! answers without inference, at 64 connections. (a′) and (d′) repeat (a) and (d) with the
//! server on CPU 0 and the load generator on CPU 1 (with 2 or more CPUs). With
//! `--baseline BIN`, (a) and (b) also run against another flowserve build, in the same
//! rounds, for a before/after comparison.
//!
//! Usage: cargo bench --bench serve -- [--seconds S] [--rounds R] [--out BENCHMARKS.md]
//!                                     [--baseline path/to/flowserve [--baseline-label TEXT]]
//!        cargo bench --bench serve -- --load http://127.0.0.1:8080/log_prob
//!                                     [--rows N] [--conns C] [--seconds S]
//!        (only a load, against a server you started, e.g. to profile it)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use flowpack::runtime::{GraphSession, SessionOptions};
use serde_json::json;

const MODEL: &str = "wine";
const ROW: [f32; 11] = [
    7.4, 0.7, 0.0, 1.9, 0.076, 11.0, 34.0, 0.9978, 3.51, 0.56, 9.4,
];
/// Where pinned runs put the server, and the load generator.
const SERVER_CPU: &[usize] = &[0];
const LOAD_CPU: &[usize] = &[1];

/// The bare axum floor: parse the request, answer a constant, on `workers` runtime threads.
fn floor_server(port: u16, workers: usize) {
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Req {
        model: Option<String>,
        inputs: Vec<Vec<f32>>,
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let app = axum::Router::new().route(
            "/log_prob",
            axum::routing::post(|body: axum::body::Bytes| async move {
                let req: Req = serde_json::from_slice(&body).unwrap();
                let lp = vec![0f32; req.inputs.len()];
                axum::Json(json!({"model": "floor", "version": 1, "log_prob": lp}))
            }),
        );
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        axum::serve(l, app).await.unwrap();
    });
}

/// Rows/s of the encode graph run directly at batch 1024.
fn ceiling(dir: &Path, secs: f64) -> f64 {
    let p = flowpack::Package::open(dir).unwrap();
    let options = SessionOptions::default();
    let mut s = GraphSession::open(&p, flowpack::Direction::Encode, &options).unwrap();
    let x: Vec<f32> = ROW.iter().copied().cycle().take(1024 * 11).collect();
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed().as_secs_f64() < secs {
        s.run(&x).unwrap();
        n += 1024;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// The floor server on `cpus` (all when `None`); its `/log_prob` URL once it listens.
fn start_floor(workers: usize, cpus: Option<&'static [usize]>) -> (Guard, String) {
    let port = free_port();
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(["--floor-server", &port.to_string(), "--workers"])
        .arg(workers.to_string());
    if let Some(cpus) = cpus {
        on_cpus(&mut cmd, cpus);
    }
    let g = Guard(spawn(&mut cmd));
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        && start.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    (g, format!("http://127.0.0.1:{port}/log_prob"))
}

/// A load from this process, pinned to [`LOAD_CPU`] when `pinned`.
fn pinned_load(
    url: &str,
    body: &serde_json::Value,
    rows: usize,
    conns: usize,
    secs: f64,
    pinned: bool,
) -> Load {
    if pinned {
        pin_current_thread(Some(LOAD_CPU));
    }
    let l = load(url, body, rows, conns, secs);
    if pinned {
        pin_current_thread(None);
    }
    l
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str, default: &str| flag_value(&args, flag, default);
    if let Some(i) = args.iter().position(|a| a == "--floor-server") {
        let workers = get("--workers", "1").parse().unwrap();
        floor_server(args[i + 1].parse().unwrap(), workers);
        return;
    }
    let secs: f64 = get("--seconds", "5").parse().unwrap();
    // Ad-hoc load on a running server (for profiling it).
    if let Some(i) = args.iter().position(|a| a == "--load") {
        let rows: usize = get("--rows", "1").parse().unwrap();
        let conns: usize = get("--conns", "64").parse().unwrap();
        let body = json!({"model": MODEL, "inputs": vec![ROW; rows]});
        let l = load(&args[i + 1], &body, rows, conns, secs);
        println!(
            "{:.0} rows/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
            l.rows_per_s, l.p50_ms, l.p99_ms, l.errors
        );
        return;
    }
    let rounds: usize = get("--rounds", "3").parse().unwrap();
    let out = PathBuf::from(get("--out", "BENCHMARKS.md"));
    let baseline = args
        .iter()
        .position(|a| a == "--baseline")
        .map(|i| PathBuf::from(&args[i + 1]));
    let baseline_label = baseline.as_ref().map(|b| {
        let label = get("--baseline-label", "");
        if label.is_empty() {
            format!("`{}`", b.display())
        } else {
            label
        }
    });
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let server_bin = server_binary(root);
    let models = root.join("models");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    pin_current_thread(None); // remembers the CPUs to return to after pinned loads
                              // flowserve's default: one runtime thread per core but one; the floor gets the same.
    let workers = cores.saturating_sub(1).max(1);
    let pin = cores >= 2;

    let one = json!({"model": MODEL, "inputs": [ROW]});
    let big = json!({"model": MODEL, "inputs": vec![ROW; 1024]});
    let mut names = vec![
        "(a) flowserve, 1 row, 64 conns".to_string(),
        "(a1) as (a), batching off (--max-batch-rows 1)".into(),
        "(a2) as (a), with --max-queue-delay-us 100".into(),
        "(b) flowserve, 1024 rows, 4 conns".into(),
        "(c) ONNX Runtime in-process, batch 1024".into(),
        format!("(d) bare axum floor ({workers} runtime thread(s), as flowserve), 1 row, 64 conns"),
    ];
    if pin {
        names.push("(a′) as (a), server on CPU 0, load on CPU 1".into());
        names.push("(d′) as (d), floor on CPU 0, load on CPU 1".into());
    }
    if let Some(label) = &baseline_label {
        names.push(format!("(a°) as (a), baseline: {label}"));
        names.push(format!("(b°) as (b), baseline: {label}"));
    }
    let index = |prefix: &str| names.iter().position(|n| n.starts_with(prefix)).unwrap();
    let mut results: Vec<Vec<Load>> = (0..names.len()).map(|_| Vec::new()).collect();
    let serve = |bin: &Path, extra: &[&str], cpus, body, rows, conns, pinned| {
        let (_g, base) = start_server(bin, &models, extra, cpus);
        pinned_load(&format!("{base}/log_prob"), body, rows, conns, secs, pinned)
    };
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        let s = server_bin.as_path();
        results[0].push(serve(s, &[], None, &one, 1, 64, false));
        if let Some(b) = &baseline {
            results[index("(a°)")].push(serve(b, &[], None, &one, 1, 64, false));
        }
        results[1].push(serve(
            s,
            &["--max-batch-rows", "1"],
            None,
            &one,
            1,
            64,
            false,
        ));
        let delay = ["--max-queue-delay-us", "100"];
        results[2].push(serve(s, &delay, None, &one, 1, 64, false));
        let rows = ["--max-batch-rows", "1024"];
        results[3].push(serve(s, &rows, None, &big, 1024, 4, false));
        if let Some(b) = &baseline {
            results[index("(b°)")].push(serve(b, &rows, None, &big, 1024, 4, false));
        }
        results[4].push(Load {
            rows_per_s: ceiling(&models.join(MODEL).join("1"), secs),
            p50_ms: f64::NAN,
            p99_ms: f64::NAN,
            errors: 0,
        });
        {
            let (_g, url) = start_floor(workers, None);
            results[5].push(load(&url, &one, 1, 64, secs));
        }
        if pin {
            let cpus = Some(SERVER_CPU);
            results[6].push(serve(s, &[], cpus, &one, 1, 64, true));
            let (_g, url) = start_floor(workers, cpus);
            results[7].push(pinned_load(&url, &one, 1, 64, secs, true));
        }
    }
    let med: Vec<(f64, f64, f64, usize)> = results
        .iter_mut()
        .map(|r| {
            let mut a: Vec<f64> = r.iter().map(|l| l.rows_per_s).collect();
            let mut b: Vec<f64> = r.iter().map(|l| l.p50_ms).collect();
            let mut c: Vec<f64> = r.iter().map(|l| l.p99_ms).collect();
            (
                median(&mut a),
                median(&mut b),
                median(&mut c),
                r.iter().map(|l| l.errors).sum(),
            )
        })
        .collect();
    let mut table =
        String::from("| scenario | rows/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|\n");
    for (name, (rps, p50, p99, err)) in names.iter().zip(&med) {
        let f = |v: f64| {
            if v.is_nan() {
                "–".to_string()
            } else {
                format!("{v:.2}")
            }
        };
        table.push_str(&format!(
            "| {name} | {rps:.0} | {} | {} | {err} |\n",
            f(*p50),
            f(*p99)
        ));
    }
    let ratio = |a: &str, b: &str| med[index(a)].0 / med[index(b)].0;
    let p99 = |a: &str, b: &str| med[index(a)].2 / med[index(b)].2;
    let mut ratios = format!(
        "Ratios: (b) / (c) = **{:.2}** (target ≥ 0.9); (a) / (d) = **{:.2}** in rows/s (target ≥ 0.6), \
p99 (a) / (d) = **{:.2}** (target ≤ 2); (a) / (a1) batching on vs off = **{:.1}×**, (a2) / (a1) = **{:.1}×**.",
        ratio("(b)", "(c)"),
        ratio("(a)", "(d)"),
        p99("(a)", "(d)"),
        ratio("(a)", "(a1)"),
        ratio("(a2)", "(a1)"),
    );
    if pin {
        ratios.push_str(&format!(
            " Pinned: (a′) / (d′) = **{:.2}**, p99 (a′) / (d′) = **{:.2}**.",
            ratio("(a′)", "(d′)"),
            p99("(a′)", "(d′)"),
        ));
    }
    if baseline.is_some() {
        ratios.push_str(&format!(
            " Against the baseline: (a) / (a°) = **{:.2}**, (b) / (b°) = **{:.2}**; \
the baseline's (a°) / (d) = {:.2} and (b°) / (c) = {:.2}.",
            ratio("(a)", "(a°)"),
            ratio("(b)", "(b°)"),
            ratio("(a°)", "(d)"),
            ratio("(b°)", "(c)"),
        ));
    }
    let cpu = cpu_name();
    let section = format!(
        "## Serving: flowserve under load (bundled `{MODEL}` model, D = 11)\n\n\
Measured with `make bench` (`cargo bench --bench serve -- --seconds {secs} --rounds {rounds}{}`) on \
{cores} cores ({cpu}); every scenario runs for {secs} s per round, the scenarios alternate, and each \
number is the median of {rounds} rounds. The load generator (reqwest, closed loop, one worker thread) runs \
on the same {cores} cores as the server and steals from it, as it does from the floor; the pinned \
scenarios (a′) and (d′) give the server one core and the load generator the other.\n\n{table}\n{ratios}\n\n\
Unbatched, every request pays one ONNX Runtime call on the model's one engine thread, so (a1) is bounded by \
the graph's per-call cost; batched, (a) is bounded by HTTP and JSON, i.e. by (d), plus the engine's CPU time, \
which shares the same cores. The batching ratio can reach at most (d) / (a1) = **{:.1}×** here, even with zero \
server overhead.\n",
        if baseline.is_some() {
            " --baseline …"
        } else {
            ""
        },
        ratio("(d)", "(a1)"),
    );
    println!("{section}");
    write_section(&out, "## Serving:", &section);
}
