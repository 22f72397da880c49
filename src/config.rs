//! Command-line configuration; every flag has an environment twin (`FLOWSERVE_*`).

use std::path::PathBuf;

use clap::Parser;
use flowpack::runtime::Provider;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// flowserve's settings.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "flowserve",
    version,
    about = "Serve normalizing flows (flowtrain model packages) over HTTP with ONNX Runtime"
)]
pub struct Config {
    /// Model repository: <models>/<name>/<version>/flow.json; the highest valid version of each
    /// model is served.
    #[arg(long, env = "FLOWSERVE_MODELS", default_value = "models")]
    pub models: PathBuf,
    /// Address to bind.
    #[arg(long, env = "FLOWSERVE_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// Port to bind.
    #[arg(long, env = "FLOWSERVE_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Port of the Open Inference Protocol's gRPC API (off unless set).
    #[arg(long, env = "FLOWSERVE_GRPC_PORT")]
    pub grpc_port: Option<u16>,
    /// How the served models may change while running: `none` (loaded at start), `poll`
    /// (the repository is rescanned; new versions swap in, removed models unload) or
    /// `explicit` (the /v2/repository routes load and unload them).
    #[arg(
        long,
        env = "FLOWSERVE_MODEL_CONTROL",
        value_enum,
        default_value = "none"
    )]
    pub model_control: crate::lifecycle::ModelControl,
    /// Which versions of each model to serve: `latest:N` (the N newest that load),
    /// `specific:V[,V...]` or `all`. Requests that name no version get the newest served.
    #[arg(long, env = "FLOWSERVE_VERSION_POLICY", default_value = "latest:1")]
    pub version_policy: crate::repository::VersionPolicy,
    /// Seconds between repository scans with `--model-control poll`.
    #[arg(long, env = "FLOWSERVE_POLL_INTERVAL_S", default_value_t = 5.0, value_parser = positive_seconds)]
    pub poll_interval_s: f64,
    /// Model used when a request names none (default: the only model, if there is one).
    #[arg(long, env = "FLOWSERVE_DEFAULT_MODEL")]
    pub default_model: Option<String>,
    /// Most rows in one ONNX Runtime call; larger requests are split across batches.
    #[arg(long, env = "FLOWSERVE_MAX_BATCH_ROWS", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_batch_rows: u64,
    /// Wait up to this long for a batch to fill (0: run as soon as the engine is free).
    #[arg(long, env = "FLOWSERVE_MAX_QUEUE_DELAY_US", default_value_t = 0)]
    pub max_queue_delay_us: u64,
    /// Rows allowed to wait per queue; beyond it requests get 429 at once.
    #[arg(long, env = "FLOWSERVE_MAX_QUEUE_ROWS", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_queue_rows: u64,
    /// Most rows (or samples) in one request (413 beyond); never more than
    /// --max-queue-rows, since a larger request could never be admitted.
    #[arg(long, env = "FLOWSERVE_MAX_REQUEST_ROWS", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_request_rows: u64,
    /// Deadline of a request; a client may shorten it with the `x-request-timeout-ms` header.
    #[arg(long, env = "FLOWSERVE_REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_timeout_ms: u64,
    /// Largest request body accepted (413 beyond).
    #[arg(long, env = "FLOWSERVE_MAX_BODY_BYTES", default_value_t = 16 << 20)]
    pub max_body_bytes: usize,
    /// Most open HTTP connections. A connection past it is answered on the health probes
    /// only; other requests get 503 with Retry-After and the connection closes.
    #[arg(long, env = "FLOWSERVE_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,
    /// A connection must send a request's headers within this long (slow headers: cut off).
    /// The clock also runs while a keep-alive connection waits for its next request, so this
    /// is its idle timeout as well.
    #[arg(long, env = "FLOWSERVE_HEADER_READ_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_ms: u64,
    /// A request's body must arrive within this long (a trickled body: 408, and the
    /// connection closes).
    #[arg(long, env = "FLOWSERVE_BODY_READ_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub body_read_timeout_ms: u64,
    /// Most samples one /sample request may ask for.
    #[arg(
        long,
        env = "FLOWSERVE_MAX_SAMPLES_PER_REQUEST",
        default_value_t = 10_000
    )]
    pub max_samples_per_request: usize,
    /// Execution providers in order of preference (cpu, cuda, tensorrt). The CPU is used
    /// only where listed: `cuda` alone refuses a model whose graphs cannot run wholly on the
    /// GPU, with the reason; `cuda,cpu` falls back, logged and shown per graph in
    /// /v1/models and the `flowserve_model_info` labels.
    #[arg(
        long,
        env = "FLOWSERVE_EXECUTION_PROVIDERS",
        value_delimiter = ',',
        default_value = "cpu"
    )]
    pub execution_providers: Vec<Provider>,
    /// The GPU the CUDA (and TensorRT) provider runs on.
    #[arg(long, env = "FLOWSERVE_CUDA_DEVICE_ID", default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..))]
    pub cuda_device_id: i32,
    /// Most bytes CUDA's memory arena may hold per session (default: no limit).
    #[arg(long, env = "FLOWSERVE_CUDA_MEMORY_LIMIT_BYTES")]
    pub cuda_memory_limit_bytes: Option<usize>,
    /// Allow TF32 matmuls on the GPU: faster on Ampere and later, but scores then differ
    /// from the CPU's in the third decimal. Off: scores match the CPU to float32 rounding.
    #[arg(long, env = "FLOWSERVE_CUDA_TF32")]
    pub cuda_tf32: bool,
    /// Threads of the async runtime (HTTP, JSON, queues); default: one per core but one,
    /// which is left to the engine threads that run inference.
    #[arg(long, env = "FLOWSERVE_WORKER_THREADS", value_parser = clap::value_parser!(u64).range(1..))]
    pub worker_threads: Option<u64>,
    /// Threads ONNX Runtime may use inside one operator, per session.
    #[arg(long, env = "FLOWSERVE_INTRA_OP_THREADS", default_value_t = 1)]
    pub intra_op_threads: usize,
    /// Log format.
    #[arg(long, env = "FLOWSERVE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// On SIGTERM, keep serving this long with /readyz answering 503, so load balancers stop
    /// sending traffic before the listener closes.
    #[arg(long, env = "FLOWSERVE_DRAIN_DELAY_MS", default_value_t = 0)]
    pub drain_delay_ms: u64,
    /// After the listener closes, wait this long for in-flight requests before exiting.
    #[arg(long, env = "FLOWSERVE_SHUTDOWN_TIMEOUT_MS", default_value_t = 30_000)]
    pub shutdown_timeout_ms: u64,
}

impl Config {
    /// The async runtime's worker threads: `--worker-threads`, or one per core but one.
    pub fn workers(&self) -> usize {
        self.worker_threads.map_or_else(
            || {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                cores.saturating_sub(1).max(1)
            },
            |n| n as usize,
        )
    }
}

/// A finite number of seconds above zero.
fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in (0, 86400]")),
    }
}
