//! Every Prometheus metric and its label vocabulary. Families are registered at start-up and
//! each loaded model gets one [`ModelMetrics`] handle whose series are resolved once, so a
//! scrape before the first request already shows every series and the hot path does no
//! label hashing.

use std::time::Duration;

use flowpack::runtime::{Placement, Provider};
use flowpack::Direction;
use prometheus::core::Collector;
use prometheus::{
    exponential_buckets, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// An inference endpoint, as the `endpoint` label spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /log_prob`
    LogProb,
    /// `POST /encode`
    Encode,
    /// `POST /sample`
    Sample,
    /// `POST /decode`
    Decode,
    /// `POST /score`
    Score,
    /// `POST /v2/models/{name}/infer` (Open Inference Protocol)
    Infer,
}

impl Endpoint {
    /// Every endpoint.
    pub const ALL: [Endpoint; 6] = [
        Endpoint::LogProb,
        Endpoint::Encode,
        Endpoint::Sample,
        Endpoint::Decode,
        Endpoint::Score,
        Endpoint::Infer,
    ];

    /// The label value (and the route's last segment).
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::LogProb => "log_prob",
            Endpoint::Encode => "encode",
            Endpoint::Sample => "sample",
            Endpoint::Decode => "decode",
            Endpoint::Score => "score",
            Endpoint::Infer => "infer",
        }
    }
}

/// Why a request got no answer, as the `reason` label spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The queue was full (429).
    Overloaded,
    /// The deadline passed (504).
    Timeout,
    /// The client went away while its rows waited; they were skipped.
    Cancelled,
    /// The request was invalid (4xx).
    Invalid,
    /// ONNX Runtime failed on its batch (500).
    EngineError,
}

impl Rejection {
    /// Every reason.
    pub const ALL: [Rejection; 5] = [
        Rejection::Overloaded,
        Rejection::Timeout,
        Rejection::Cancelled,
        Rejection::Invalid,
        Rejection::EngineError,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Overloaded => "overloaded",
            Rejection::Timeout => "timeout",
            Rejection::Cancelled => "cancelled",
            Rejection::Invalid => "invalid",
            Rejection::EngineError => "engine_error",
        }
    }
}

/// The service's metric families.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    rows: IntCounterVec,
    request_duration: HistogramVec,
    queue_duration: HistogramVec,
    inference_duration: HistogramVec,
    batch_rows: HistogramVec,
    batch_requests: HistogramVec,
    queue_rows: IntGaugeVec,
    /// Inference requests being served.
    pub in_flight: IntGauge,
    rejections: IntCounterVec,
    model_load_duration: GaugeVec,
    model_info: IntGaugeVec,
    /// Packages refused at load.
    pub model_load_failures: IntCounter,
    /// Open HTTP connections.
    pub open_connections: IntGauge,
    /// Connections past `--max-connections` (answered on the probes only).
    pub connections_refused: IntCounter,
    /// Requests whose body did not arrive within `--body-read-timeout-ms` (408).
    pub body_read_timeouts: IntCounter,
    log_prob: HistogramVec,
    tail_probability: HistogramVec,
}

/// Upper bounds of the tail-probability histogram: fine in the tail, where alerts look.
pub const TAIL_BUCKETS: [f64; 10] = [1e-4, 1e-3, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0];

/// The series one queue (one graph of one model) updates.
#[derive(Clone)]
pub struct QueueMetrics {
    /// Rows waiting.
    pub queue_rows: IntGauge,
    /// Wait before a request's last rows started running.
    pub queue_duration: Histogram,
    /// Engine time per batch.
    pub inference_duration: Histogram,
    /// Rows per batch.
    pub batch_rows: Histogram,
    /// Requests per batch.
    pub batch_requests: Histogram,
    /// Requests skipped because the client went away.
    pub cancelled: IntCounter,
}

#[derive(Clone)]
struct EndpointSeries {
    ok: IntCounter,
    rows_ok: IntCounter,
    rows_error: IntCounter,
    duration: Histogram,
}

/// Every series of one served model version, resolved at load.
#[derive(Clone)]
pub struct ModelMetrics {
    name: String,
    version: String,
    requests: IntCounterVec,
    endpoints: [EndpointSeries; 6],
    queues: [QueueMetrics; 2],
    rejections: [IntCounter; 5],
    log_prob: Histogram,
    tail_probability: Histogram,
    /// The series that say the version is loaded, and their labels: removed when it is
    /// retired, so a swapped-out version no longer shows as loaded.
    loaded: (IntGaugeVec, GaugeVec, [String; 6]),
}

impl ModelMetrics {
    /// The version was retired: it no longer shows as loaded (`model_info`, the load time)
    /// and its queues read empty. Its counters stay, as Prometheus counters do.
    pub fn unloaded(&self) {
        let (info, load, labels) = &self.loaded;
        let l: Vec<&str> = labels.iter().map(String::as_str).collect();
        let _ = info.remove_label_values(&l);
        let _ = load.remove_label_values(&l[..2]);
        for q in &self.queues {
            q.queue_rows.set(0);
        }
    }

    /// A request answered 200 with `rows` rows.
    pub fn served(&self, endpoint: Endpoint, rows: usize, took: Duration) {
        let s = &self.endpoints[endpoint as usize];
        s.ok.inc();
        s.rows_ok.inc_by(rows as u64);
        s.duration.observe(took.as_secs_f64());
    }

    /// A request that failed with HTTP `code` after `rows` rows were admitted (0 if none).
    pub fn failed(
        &self,
        endpoint: Endpoint,
        code: &str,
        rows: usize,
        took: Duration,
        why: Option<Rejection>,
    ) {
        let s = &self.endpoints[endpoint as usize];
        self.requests
            .with_label_values(&[&self.name, &self.version, endpoint.label(), code])
            .inc();
        s.rows_error.inc_by(rows as u64);
        s.duration.observe(took.as_secs_f64());
        if let Some(r) = why {
            self.reject(r);
        }
    }

    /// Counts one rejection.
    pub fn reject(&self, why: Rejection) {
        self.rejections[why as usize].inc();
    }

    /// The series of one graph's queue.
    pub fn queue(&self, graph: Direction) -> QueueMetrics {
        self.queues[graph.index()].clone()
    }

    /// Adds served log_prob values to the score-drift histogram.
    pub fn observe_log_prob(&self, values: &[f32]) {
        observe(
            &self.log_prob,
            values.iter().map(|&v| v as f64),
            values.len(),
        );
    }

    /// Adds the tail probabilities of served rows (against the model's reference set) to
    /// the drift histogram: about 1 % of traffic below 0.01 while it looks like the
    /// reference.
    pub fn observe_tail_probabilities(&self, values: &[f64]) {
        observe(&self.tail_probability, values.iter().copied(), values.len());
    }
}

fn observe(h: &Histogram, values: impl Iterator<Item = f64>, n: usize) {
    if n < 8 {
        values.for_each(|v| h.observe(v));
        return;
    }
    // Many values: count locally, then one atomic update per bucket.
    let local = h.local();
    values.for_each(|v| local.observe(v));
    local.flush();
}

/// Registers `c` and hands it back.
fn reg<C: Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

fn latency(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    // 50 µs … ~13 s in ×2 steps.
    let buckets = exponential_buckets(50e-6, 2.0, 19).expect("valid buckets");
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid histogram")
}

fn sizes(name: &str, help: &str) -> HistogramVec {
    let buckets = exponential_buckets(1.0, 2.0, 14).expect("valid buckets");
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets),
        &["model", "version", "graph"],
    )
    .expect("valid histogram")
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter")
}

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> Self {
        let r = Registry::new_custom(Some("flowserve".into()), None).expect("valid registry");
        let mvg = ["model", "version", "graph"];
        let lp_buckets = vec![
            -1e4, -3e3, -1e3, -300.0, -100.0, -50.0, -30.0, -20.0, -15.0, -10.0, -7.5, -5.0, -4.0,
            -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0,
        ];
        let build_info = reg(
            &r,
            IntGaugeVec::new(Opts::new("build_info", "flowserve build"), &["version"])
                .expect("valid gauge"),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Metrics {
            requests: reg(
                &r,
                counter(
                    "requests_total",
                    "Inference requests by endpoint and HTTP status",
                    &["model", "version", "endpoint", "code"],
                ),
            ),
            rows: reg(
                &r,
                counter(
                    "rows_total",
                    "Rows by endpoint and outcome (ok: answered; error: admitted, then failed)",
                    &["model", "version", "endpoint", "outcome"],
                ),
            ),
            request_duration: reg(
                &r,
                latency(
                    "request_duration_seconds",
                    "Inference request latency, parse to response, every outcome",
                    &["model", "version", "endpoint"],
                ),
            ),
            queue_duration: reg(
                &r,
                latency(
                    "queue_duration_seconds",
                    "Time a request waited in its queue",
                    &mvg,
                ),
            ),
            inference_duration: reg(
                &r,
                latency(
                    "inference_duration_seconds",
                    "ONNX Runtime time per batch",
                    &mvg,
                ),
            ),
            batch_rows: reg(&r, sizes("batch_rows", "Rows per batch")),
            batch_requests: reg(&r, sizes("batch_requests", "Requests per batch")),
            queue_rows: reg(
                &r,
                IntGaugeVec::new(Opts::new("queue_rows", "Rows waiting per queue"), &mvg)
                    .expect("valid gauge"),
            ),
            in_flight: reg(
                &r,
                IntGauge::new("in_flight_requests", "Inference requests being served")
                    .expect("valid gauge"),
            ),
            open_connections: reg(
                &r,
                IntGauge::new("open_connections", "Open HTTP connections").expect("valid gauge"),
            ),
            connections_refused: reg(
                &r,
                IntCounter::new(
                    "connections_refused_total",
                    "Connections past --max-connections, answered on the health probes only",
                )
                .expect("valid counter"),
            ),
            body_read_timeouts: reg(
                &r,
                IntCounter::new(
                    "body_read_timeouts_total",
                    "Requests whose body did not arrive within --body-read-timeout-ms (408)",
                )
                .expect("valid counter"),
            ),
            rejections: reg(
                &r,
                counter(
                    "rejections_total",
                    "Rejected requests by reason",
                    &["model", "reason"],
                ),
            ),
            model_load_duration: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "model_load_duration_seconds",
                        "Time to load, check and warm a model",
                    ),
                    &["model", "version"],
                )
                .expect("valid gauge"),
            ),
            model_info: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new("model_info", "Loaded models"),
                    &[
                        "model",
                        "version",
                        "family",
                        "encode_provider",
                        "decode_provider",
                        "requested",
                    ],
                )
                .expect("valid gauge"),
            ),
            model_load_failures: reg(
                &r,
                IntCounter::new("model_load_failures_total", "Packages refused at load")
                    .expect("valid counter"),
            ),
            log_prob: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new("log_prob", "Served log_prob values").buckets(lp_buckets),
                    &["model", "version"],
                )
                .expect("valid histogram"),
            ),
            tail_probability: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "tail_probability",
                        "Tail probabilities of served rows against the model's reference set (drift: the share below 0.01 is 1 % when traffic looks like the reference)",
                    )
                    .buckets(TAIL_BUCKETS.to_vec()),
                    &["model", "version"],
                )
                .expect("valid histogram"),
            ),
            registry: r,
        }
    }

    /// The series of a model version that finished loading in `load`, its graphs placed
    /// as `placements` (by [`Direction::index`]) of the `requested` providers, created at
    /// zero so dashboards see the model at once.
    pub fn for_model(
        &self,
        name: &str,
        version: u64,
        family: &str,
        placements: [&Placement; 2],
        requested: &[Provider],
        load: Duration,
    ) -> ModelMetrics {
        let v = version.to_string();
        let endpoint = |e: Endpoint| EndpointSeries {
            ok: self
                .requests
                .with_label_values(&[name, &v, e.label(), "200"]),
            rows_ok: self.rows.with_label_values(&[name, &v, e.label(), "ok"]),
            rows_error: self.rows.with_label_values(&[name, &v, e.label(), "error"]),
            duration: self
                .request_duration
                .with_label_values(&[name, &v, e.label()]),
        };
        let queue = |g: Direction| {
            let l = [name, v.as_str(), g.as_str()];
            QueueMetrics {
                queue_rows: self.queue_rows.with_label_values(&l),
                queue_duration: self.queue_duration.with_label_values(&l),
                inference_duration: self.inference_duration.with_label_values(&l),
                batch_rows: self.batch_rows.with_label_values(&l),
                batch_requests: self.batch_requests.with_label_values(&l),
                cancelled: self
                    .rejections
                    .with_label_values(&[name, Rejection::Cancelled.label()]),
            }
        };
        let requested: Vec<&str> = requested.iter().map(|p| p.as_str()).collect();
        let info = [
            name.to_string(),
            v.clone(),
            family.to_string(),
            placements[Direction::Encode.index()].label(),
            placements[Direction::Decode.index()].label(),
            requested.join(","),
        ];
        let labels: Vec<&str> = info.iter().map(String::as_str).collect();
        self.model_info.with_label_values(&labels).set(1);
        self.model_load_duration
            .with_label_values(&[name, &v])
            .set(load.as_secs_f64());
        ModelMetrics {
            endpoints: Endpoint::ALL.map(endpoint),
            queues: Direction::BOTH.map(queue),
            rejections: Rejection::ALL
                .map(|r| self.rejections.with_label_values(&[name, r.label()])),
            log_prob: self.log_prob.with_label_values(&[name, &v]),
            tail_probability: self.tail_probability.with_label_values(&[name, &v]),
            requests: self.requests.clone(),
            loaded: (
                self.model_info.clone(),
                self.model_load_duration.clone(),
                info,
            ),
            name: name.to_string(),
            version: v,
        }
    }

    /// A request that failed before any model was resolved (labelled with an empty model).
    pub fn failed_unresolved(&self, endpoint: Endpoint, code: &str, why: Option<Rejection>) {
        self.requests
            .with_label_values(&["", "", endpoint.label(), code])
            .inc();
        if let Some(r) = why {
            self.rejections.with_label_values(&["", r.label()]).inc();
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("the exposition is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
