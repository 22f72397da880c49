//! Every Prometheus metric, registered at start-up so that a scrape before the first request
//! already shows each family (with zero-valued series for every loaded model).

use prometheus::{
    exponential_buckets, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Endpoints, as the `endpoint` label spells them.
pub const ENDPOINTS: [&str; 4] = ["log_prob", "encode", "sample", "decode"];
/// Graphs, as the `graph` label spells them.
pub const GRAPHS: [&str; 2] = ["encode", "decode"];
/// Reasons a request or row is rejected, as the `reason` label spells them.
pub const REASONS: [&str; 5] = [
    "overloaded",
    "timeout",
    "cancelled",
    "invalid",
    "engine_error",
];

/// Per-(model, endpoint) series of successful requests.
#[derive(Clone)]
pub struct EndpointSeries {
    /// Requests answered 200.
    pub ok: IntCounter,
    /// Rows answered.
    pub rows: IntCounter,
    /// Request latency.
    pub duration: Histogram,
}

/// The service's metrics.
pub struct Metrics {
    registry: Registry,
    /// Requests by endpoint and HTTP status.
    pub requests: IntCounterVec,
    /// Rows by endpoint and outcome (ok, error).
    pub rows: IntCounterVec,
    /// Whole-request latency.
    pub request_duration: HistogramVec,
    /// Time a request waited for its (last) batch to start.
    pub queue_duration: HistogramVec,
    /// ONNX Runtime time per batch.
    pub inference_duration: HistogramVec,
    /// Rows per batch.
    pub batch_rows: HistogramVec,
    /// Requests per batch.
    pub batch_requests: HistogramVec,
    /// Rows waiting per queue (the autoscaling signal).
    pub queue_rows: IntGaugeVec,
    /// Requests being served.
    pub in_flight: IntGauge,
    /// Rejected requests by reason.
    pub rejections: IntCounterVec,
    /// Seconds it took to load, check and warm a model.
    pub model_load_duration: GaugeVec,
    /// 1 per loaded model, with its family and execution provider.
    pub model_info: IntGaugeVec,
    /// Packages that failed to load.
    pub model_load_failures: IntCounter,
    /// Served log_prob values (score drift for anomaly dashboards).
    pub log_prob: HistogramVec,
    /// 1, labelled with the build's version.
    pub build_info: IntGaugeVec,
}

fn latency(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    // 50 µs … ~13 s in ×2 steps.
    let buckets = exponential_buckets(50e-6, 2.0, 19).expect("valid buckets");
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid histogram")
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mv = ["model", "version"];
        let sizes = exponential_buckets(1.0, 2.0, 14).expect("valid buckets");
        let lp_buckets = vec![
            -1e4, -3e3, -1e3, -300.0, -100.0, -50.0, -30.0, -20.0, -15.0, -10.0, -7.5, -5.0, -4.0,
            -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0,
        ];
        let m = Metrics {
            registry: Registry::new_custom(Some("flowserve".into()), None).expect("valid registry"),
            requests: IntCounterVec::new(
                Opts::new(
                    "requests_total",
                    "Inference requests by endpoint and HTTP status",
                ),
                &["model", "version", "endpoint", "code"],
            )
            .expect("valid"),
            rows: IntCounterVec::new(
                Opts::new("rows_total", "Rows by endpoint and outcome"),
                &["model", "version", "endpoint", "outcome"],
            )
            .expect("valid"),
            request_duration: latency(
                "request_duration_seconds",
                "Inference request latency, parse to response",
                &["model", "version", "endpoint"],
            ),
            queue_duration: latency(
                "queue_duration_seconds",
                "Time a request waited in its queue",
                &["model", "version", "graph"],
            ),
            inference_duration: latency(
                "inference_duration_seconds",
                "ONNX Runtime time per batch",
                &["model", "version", "graph"],
            ),
            batch_rows: HistogramVec::new(
                HistogramOpts::new("batch_rows", "Rows per batch").buckets(sizes.clone()),
                &["model", "version", "graph"],
            )
            .expect("valid"),
            batch_requests: HistogramVec::new(
                HistogramOpts::new("batch_requests", "Requests per batch").buckets(sizes),
                &["model", "version", "graph"],
            )
            .expect("valid"),
            queue_rows: IntGaugeVec::new(
                Opts::new("queue_rows", "Rows waiting per queue"),
                &["model", "version", "graph"],
            )
            .expect("valid"),
            in_flight: IntGauge::new("in_flight_requests", "Inference requests being served")
                .expect("valid"),
            rejections: IntCounterVec::new(
                Opts::new("rejections_total", "Rejected requests by reason"),
                &["model", "reason"],
            )
            .expect("valid"),
            model_load_duration: GaugeVec::new(
                Opts::new(
                    "model_load_duration_seconds",
                    "Time to load, check and warm a model",
                ),
                &mv,
            )
            .expect("valid"),
            model_info: IntGaugeVec::new(
                Opts::new("model_info", "Loaded models"),
                &["model", "version", "family", "provider"],
            )
            .expect("valid"),
            model_load_failures: IntCounter::new(
                "model_load_failures_total",
                "Packages refused at load",
            )
            .expect("valid"),
            log_prob: HistogramVec::new(
                HistogramOpts::new("log_prob", "Served log_prob values").buckets(lp_buckets),
                &mv,
            )
            .expect("valid"),
            build_info: IntGaugeVec::new(Opts::new("build_info", "flowserve build"), &["version"])
                .expect("valid"),
        };
        let r = &m.registry;
        r.register(Box::new(m.requests.clone())).expect("unique");
        r.register(Box::new(m.rows.clone())).expect("unique");
        r.register(Box::new(m.request_duration.clone()))
            .expect("unique");
        r.register(Box::new(m.queue_duration.clone()))
            .expect("unique");
        r.register(Box::new(m.inference_duration.clone()))
            .expect("unique");
        r.register(Box::new(m.batch_rows.clone())).expect("unique");
        r.register(Box::new(m.batch_requests.clone()))
            .expect("unique");
        r.register(Box::new(m.queue_rows.clone())).expect("unique");
        r.register(Box::new(m.in_flight.clone())).expect("unique");
        r.register(Box::new(m.rejections.clone())).expect("unique");
        r.register(Box::new(m.model_load_duration.clone()))
            .expect("unique");
        r.register(Box::new(m.model_info.clone())).expect("unique");
        r.register(Box::new(m.model_load_failures.clone()))
            .expect("unique");
        r.register(Box::new(m.log_prob.clone())).expect("unique");
        r.register(Box::new(m.build_info.clone())).expect("unique");
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    /// Creates the zero-valued series of a loaded model, so dashboards see it at once.
    pub fn register_model(&self, model: &str, version: &str) {
        for e in ENDPOINTS {
            self.requests.with_label_values(&[model, version, e, "200"]);
            self.rows.with_label_values(&[model, version, e, "ok"]);
            self.request_duration
                .with_label_values(&[model, version, e]);
        }
        for g in GRAPHS {
            self.queue_duration.with_label_values(&[model, version, g]);
            self.inference_duration
                .with_label_values(&[model, version, g]);
            self.batch_rows.with_label_values(&[model, version, g]);
            self.batch_requests.with_label_values(&[model, version, g]);
            self.queue_rows.with_label_values(&[model, version, g]);
        }
        for r in REASONS {
            self.rejections.with_label_values(&[model, r]);
        }
        self.log_prob.with_label_values(&[model, version]);
    }

    /// The series one endpoint of one model updates on every successful request, looked up
    /// once at load so the hot path does no label hashing.
    pub fn endpoint_series(&self, model: &str, version: &str, endpoint: &str) -> EndpointSeries {
        EndpointSeries {
            ok: self
                .requests
                .with_label_values(&[model, version, endpoint, "200"]),
            rows: self
                .rows
                .with_label_values(&[model, version, endpoint, "ok"]),
            duration: self
                .request_duration
                .with_label_values(&[model, version, endpoint]),
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
