//! Serving benchmark (`make bench`): flowserve under load next to the in-process ONNX Runtime
//! ceiling and a bare-axum HTTP floor, measured in one run, alternating, medians of rounds.
//!
//! (a) single-row /log_prob at 64 connections; (a1) the same with batching off
//! (--max-batch-rows 1); (b) 1024-row requests at 4 connections; (c) the encode graph run by
//! ONNX Runtime directly at batch 1024; (d) a bare axum handler that parses the same
//! single-row JSON and answers without inference, at 64 connections.
//! Usage: cargo bench --bench serve -- [--seconds S] [--rounds R] [--out BENCHMARKS.md]
//!        cargo bench --bench serve -- --load http://127.0.0.1:8080/log_prob [--seconds S]
//!        (only scenario (a)'s load, against a server you started, e.g. to profile it)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const MODEL: &str = "wine";
const ROW: [f32; 11] = [
    7.4, 0.7, 0.0, 1.9, 0.076, 11.0, 34.0, 0.9978, 3.51, 0.56, 9.4,
];

/// The bare axum floor: parse the request, answer a constant.
fn floor_server(port: u16) {
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Req {
        model: Option<String>,
        inputs: Vec<Vec<f32>>,
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
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

fn ceiling(dir: &Path, secs: f64) -> f64 {
    let p = flowpack::Package::open(dir).unwrap();
    let options = flowpack::runtime::SessionOptions::default();
    let mut s =
        flowpack::runtime::GraphSession::open(&p, flowpack::Direction::Encode, &options).unwrap();
    let x: Vec<f32> = ROW.iter().copied().cycle().take(1024 * 11).collect();
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed().as_secs_f64() < secs {
        s.run(&x).unwrap();
        n += 1024;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--floor-server") {
        floor_server(args[i + 1].parse().unwrap());
        return;
    }
    let get = |flag: &str, default: &str| flag_value(&args, flag, default);
    let secs: f64 = get("--seconds", "5").parse().unwrap();
    // Ad-hoc load on a running server (for profiling it): scenario (a)'s requests.
    if let Some(i) = args.iter().position(|a| a == "--load") {
        let one = json!({"model": MODEL, "inputs": [ROW]});
        let l = load(&args[i + 1], &one, 1, 64, secs);
        println!(
            "{:.0} rows/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
            l.rows_per_s, l.p50_ms, l.p99_ms, l.errors
        );
        return;
    }
    let rounds: usize = get("--rounds", "3").parse().unwrap();
    let out = PathBuf::from(get("--out", "BENCHMARKS.md"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let server_bin = server_binary(root);
    let models = root.join("models");

    let start_server = |extra: &[&str]| {
        let (g, base) = common::start_server(&server_bin, &models, extra);
        (g, format!("{base}/log_prob"))
    };
    let one = json!({"model": MODEL, "inputs": [ROW]});
    let big = json!({"model": MODEL, "inputs": vec![ROW; 1024]});

    let names = [
        "(a) flowserve, 1 row, 64 conns",
        "(a1) as (a), batching off (--max-batch-rows 1)",
        "(b) flowserve, 1024 rows, 4 conns",
        "(c) ONNX Runtime in-process, batch 1024",
        "(d) bare axum floor, 1 row, 64 conns",
        "(a2) as (a), with --max-queue-delay-us 100",
    ];
    let mut results: Vec<Vec<Load>> = (0..names.len()).map(|_| Vec::new()).collect();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        {
            let (_g, url) = start_server(&[]);
            results[0].push(load(&url, &one, 1, 64, secs));
        }
        {
            let (_g, url) = start_server(&["--max-batch-rows", "1"]);
            results[1].push(load(&url, &one, 1, 64, secs));
        }
        {
            let (_g, url) = start_server(&["--max-batch-rows", "1024"]);
            results[2].push(load(&url, &big, 1024, 4, secs));
        }
        results[3].push(Load {
            rows_per_s: ceiling(&models.join(MODEL).join("1"), secs),
            p50_ms: f64::NAN,
            p99_ms: f64::NAN,
            errors: 0,
        });
        {
            let port = free_port();
            let exe = std::env::current_exe().unwrap();
            let _g = Guard(spawn(
                Command::new(exe).args(["--floor-server", &port.to_string()]),
            ));
            let url = format!("http://127.0.0.1:{port}/log_prob");
            let start = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
                && start.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            results[4].push(load(&url, &one, 1, 64, secs));
        }
        {
            let (_g, url) = start_server(&["--max-queue-delay-us", "100"]);
            results[5].push(load(&url, &one, 1, 64, secs));
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
    let ratio = |a: usize, b: usize| med[a].0 / med[b].0;
    let cpu = cpu_name();
    let section = format!(
        "## Serving: flowserve under load (bundled `{MODEL}` model, D = 11)\n\n\
Measured with `make bench` (`cargo bench --bench serve -- --seconds {secs} --rounds {rounds}`) on {} cores ({cpu}); \
every scenario runs for {secs} s per round, the scenarios alternate, and each number is the median of {rounds} rounds. \
The load generator (reqwest, closed loop, one worker thread) runs on the same 2 cores as the server, as does the floor.\n\n{table}\n\
Ratios: (b) / (c) = **{:.2}** (target ≥ 0.9); (a) / (d) = **{:.2}** in rows/s (target ≥ 0.5), p99 (a) / (d) = **{:.2}** (target ≤ 2); \
(a) / (a1) batching on vs off = **{:.1}×** (target ≥ 5), (a2) / (a1) = **{:.1}×**.\n\n\
Unbatched, every request pays one ONNX Runtime call on the model's one engine thread, so (a1) is bounded by \
the graph's per-call cost; batched, (a) is bounded by HTTP and JSON, i.e. by (d). The batching ratio can therefore \
reach at most (d) / (a1) = **{:.1}×** here, even with zero server overhead.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        ratio(2, 3),
        ratio(0, 4),
        med[0].2 / med[4].2,
        ratio(0, 1),
        ratio(5, 1),
        ratio(4, 1),
    );
    println!("{section}");
    write_section(&out, "## Serving:", &section);
}
