//! What the benchmarks share: a closed-loop HTTP load generator, server processes that
//! stop when dropped, medians, and writing one section of BENCHMARKS.md.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rows per second and latency quantiles of one closed-loop load.
pub struct Load {
    pub rows_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: usize,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_ready(url: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let ok = rt.block_on(async {
            reqwest::get(url)
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false)
        });
        if ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{url} never became ready");
}

/// `POST url` with a JSON body; panics with the status and body unless it succeeds.
pub fn post_json(url: &str, body: &serde_json::Value) -> serde_json::Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = reqwest::Client::new()
            .post(url)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(status.is_success(), "{url}: {status} {text}");
        serde_json::from_str(&text).unwrap()
    })
}

/// A closed-loop load: `conns` clients each sending `body` back to back for `secs`, on one
/// client thread.
pub fn load(url: &str, body: &serde_json::Value, rows: usize, conns: usize, secs: f64) -> Load {
    load_with(url, body, rows, conns, secs, 1)
}

/// [`load`] on `threads` client threads (where the machine has cores to spare).
pub fn load_with(
    url: &str,
    body: &serde_json::Value,
    rows: usize,
    conns: usize,
    secs: f64,
    threads: usize,
) -> Load {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(conns)
            .build()
            .unwrap();
        let bytes = serde_json::to_vec(body).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        // Warm the connections, then measure.
        for _ in 0..conns {
            let (client, url, bytes, stop) =
                (client.clone(), url.to_string(), bytes.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let r = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(bytes.clone())
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.bytes().await;
                            lat.push(t.elapsed().as_secs_f64());
                        }
                        _ => errors += 1,
                    }
                }
                (lat, errors)
            }));
        }
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        stop.store(true, Ordering::Relaxed);
        let mut lat = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let (l, e) = t.await.unwrap();
            lat.extend(l);
            errors += e;
        }
        lat.sort_by(f64::total_cmp);
        let q = |p: f64| {
            lat.get(((lat.len() as f64 - 1.0) * p) as usize)
                .copied()
                .unwrap_or(f64::NAN)
                * 1e3
        };
        Load {
            rows_per_s: (lat.len() * rows) as f64 / secs,
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            errors,
        }
    })
}

/// Restricts the calling thread (and threads it starts afterwards) to `cpus`; `None`: back
/// to the CPUs the process started with.
pub fn pin_current_thread(cpus: Option<&[usize]>) {
    static START: std::sync::OnceLock<libc::cpu_set_t> = std::sync::OnceLock::new();
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: cpu_set_t is plain data; the calls read or write only these sets and change
    // only this thread's affinity.
    unsafe {
        let start = START.get_or_init(|| {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::sched_getaffinity(0, size, &mut set);
            set
        });
        let set = match cpus {
            None => *start,
            Some(cpus) => {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                for &c in cpus {
                    libc::CPU_SET(c, &mut set);
                }
                set
            }
        };
        libc::sched_setaffinity(0, size, &set);
    }
}

/// `cmd` started on `cpus` only (its affinity is set before it runs).
pub fn on_cpus<'a>(cmd: &'a mut Command, cpus: &'static [usize]) -> &'a mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: sched_setaffinity is async-signal-safe; nothing else runs in the child hook.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &c in cpus {
                libc::CPU_SET(c, &mut set);
            }
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            Ok(())
        })
    }
}

pub fn spawn(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A child process killed when dropped.
pub struct Guard(pub Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The median (sorts `v`).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The release build of the server under the workspace `root` (the benchmarks measure it).
pub fn server_binary(root: &Path) -> std::path::PathBuf {
    let bin = root.join("target/release/flowserve");
    assert!(
        bin.exists(),
        "build the server first: cargo build --release -p flowserve"
    );
    bin
}

/// Starts `flowserve` on a free port serving `models` (on `cpus` only, if given); returns it
/// and its base URL once ready.
pub fn start_server(
    server: &Path,
    models: &Path,
    extra: &[&str],
    cpus: Option<&'static [usize]>,
) -> (Guard, String) {
    let port = free_port();
    let mut cmd = Command::new(server);
    cmd.arg("--models")
        .arg(models)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(extra)
        .env("RUST_LOG", "error");
    if let Some(cpus) = cpus {
        on_cpus(&mut cmd, cpus);
    }
    let g = Guard(spawn(&mut cmd));
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&format!("{base}/readyz"));
    (g, base)
}

/// The value after `flag` in `args`, or `default`.
pub fn flag_value(args: &[String], flag: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.into())
}

/// The CPU model, for the report.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default()
}

/// Replaces the section of `out` whose heading starts with `heading` by `section` (or
/// appends it).
pub fn write_section(out: &Path, heading: &str, section: &str) {
    let text = std::fs::read_to_string(out).unwrap_or_else(|_| "# Benchmarks\n\n".into());
    let text = match text.find(heading) {
        Some(start) => {
            let end = text[start + 1..].find("\n## ").map(|e| start + 1 + e + 1);
            format!(
                "{}{}{}",
                &text[..start],
                section,
                end.map(|e| &text[e..]).unwrap_or("")
            )
        }
        None => format!("{}\n\n{}", text.trim_end(), section),
    };
    std::fs::write(out, text).unwrap();
    eprintln!("wrote {}", out.display());
}
