//! The `flowserve` binary: configuration, logging, the async runtime, and [`flowserve::run`].

use std::process::ExitCode;

use clap::Parser;
use flowserve::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

// Every request allocates its body, rows and response. Under single-row load glibc's
// allocator took about 10 % of the server's samples (and its arena locks were contended by
// the engine threads); mimalloc takes about 4 %. Throughput moved within the noise.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn main() -> ExitCode {
    let config = Config::parse();
    init_tracing(config.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers())
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(flowserve::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
