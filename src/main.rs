//! The `flowserve` binary: configuration, logging, the async runtime, and [`flowserve::run`].

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flowserve::batch::ScoreArgs;
use flowserve::config::{Config, LogFormat};
use flowserve::healthcheck::HealthcheckArgs;
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

/// `flowserve [FLAGS]` serves; `flowserve score ...` scores a table offline;
/// `flowserve healthcheck` probes a running server.
#[derive(Parser)]
#[command(
    name = "flowserve",
    version,
    about = "Serve normalizing flows (flowtrain model packages) over HTTP with ONNX Runtime",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Config,
}

#[derive(Subcommand)]
enum Command {
    /// Score a CSV or Parquet table with a package (log_prob, tail probability, outlier
    /// flag and per-feature contributions, as POST /score computes them) into a CSV or
    /// Parquet file.
    Score(ScoreArgs),
    /// Probe a running server's readiness (for a container HEALTHCHECK): exit 0 when
    /// GET /readyz answers 200, else 1.
    Healthcheck(HealthcheckArgs),
}

fn score(args: &ScoreArgs) -> ExitCode {
    match flowserve::batch::run(args) {
        Ok(s) => {
            eprintln!(
                "scored {} rows ({} outliers, {} malformed rows skipped) in {:.1} s, {:.0} rows/s ({:.0} % of it in ONNX Runtime), into {}",
                s.scored,
                s.outliers,
                s.skipped,
                s.seconds,
                s.scored as f64 / s.seconds.max(1e-9),
                100.0 * s.graph_seconds / s.seconds.max(1e-9),
                args.output.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Score(args)) => return score(args),
        Some(Command::Healthcheck(args)) => {
            return match flowserve::healthcheck::probe(args) {
                Ok(200) => ExitCode::SUCCESS,
                Ok(status) => {
                    eprintln!("not ready: GET {} answered {status}", args.path);
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("not ready: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        None => {}
    }
    let config = cli.serve;
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
