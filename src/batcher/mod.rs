//! Dynamic batching: one queue per (model version, graph), owned by a task and driven by
//! messages, feeding one engine thread.
//!
//! A request is validated before it gets here and arrives as rows. Admission is decided at
//! once: if the queue's waiting rows would exceed `max_queue_rows` the caller gets
//! [`BatchError::Overloaded`]. The queue task packs waiting rows into batches of at most
//! `max_batch_rows` (a larger request is split across batches and reassembled in order) and
//! hands each to the engine through a channel of capacity one, so one batch waits while
//! another runs. Entries whose client has gone, or whose deadline has passed, are skipped.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{Histogram, IntCounter, IntGauge};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Why a submitted request produced no result.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BatchError {
    /// The queue is full.
    #[error("the queue is full ({queued} rows waiting, limit {limit})")]
    Overloaded {
        /// Rows waiting when the request came.
        queued: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The deadline passed before the rows were run.
    #[error("the request's deadline passed while it waited in the queue")]
    Timeout,
    /// ONNX Runtime failed on the batch holding these rows.
    #[error("inference failed: {0}")]
    Engine(String),
    /// The server is shutting down and the queue is gone.
    #[error("the model is shutting down")]
    Closed,
}

/// Sizes of the queue.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most rows per engine call.
    pub max_batch_rows: usize,
    /// Most rows waiting.
    pub max_queue_rows: usize,
    /// How long the oldest entry may wait for a batch to fill (zero: no timer).
    pub max_delay: Duration,
}

/// The metric series of one queue.
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
    /// Requests whose deadline passed in the queue.
    pub expired: IntCounter,
}

/// A request's results: one row-major buffer per graph output, and where its time went.
#[derive(Debug)]
pub struct Outputs {
    /// Per output, `rows × width` values.
    pub values: Vec<Vec<f32>>,
    /// Longest wait of any of its rows before running.
    pub queue_time: Duration,
    /// Engine time of the batches that ran its rows.
    pub inference_time: Duration,
}

type Reply = oneshot::Sender<Result<Outputs, BatchError>>;

/// State one request shares between the queue task and the engine thread.
struct Shared {
    reply: Mutex<Option<Reply>>,
    out: Mutex<Vec<Vec<f32>>>,
    remaining: AtomicUsize,
    queue_us: AtomicU64,
    inference_us: AtomicU64,
}

impl Shared {
    fn answer(&self, result: Result<Outputs, BatchError>) {
        if let Some(tx) = self.reply.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(result);
        }
    }

    fn gone(&self) -> bool {
        self.reply
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_none_or(|tx| tx.is_closed())
    }
}

struct Pending {
    input: Vec<f32>,
    rows: usize,
    taken: usize,
    enqueued: Instant,
    deadline: Instant,
    shared: Arc<Shared>,
}

struct Part {
    shared: Arc<Shared>,
    entry_row: usize,
    batch_row: usize,
    rows: usize,
}

/// Rows from one or more requests, run in one engine call.
pub struct Batch {
    /// `rows × event_size` input values.
    pub input: Vec<f32>,
    /// Rows in the batch.
    pub rows: usize,
    parts: Vec<Part>,
    widths: Arc<[usize]>,
    metrics: QueueMetrics,
}

impl Batch {
    /// Hands each request its slice of the engine's outputs (or the engine's error) and
    /// answers the requests whose last rows these were.
    pub fn complete(self, result: Result<Vec<Vec<f32>>, String>, took: Duration) {
        self.metrics.inference_duration.observe(took.as_secs_f64());
        self.metrics.batch_rows.observe(self.rows as f64);
        self.metrics.batch_requests.observe(self.parts.len() as f64);
        let outs = match result {
            Ok(outs) => outs,
            Err(e) => {
                for p in &self.parts {
                    p.shared.answer(Err(BatchError::Engine(e.clone())));
                }
                return;
            }
        };
        let us = took.as_micros() as u64;
        for p in self.parts {
            {
                let mut out = p.shared.out.lock().unwrap_or_else(|e| e.into_inner());
                for (k, &w) in self.widths.iter().enumerate() {
                    let src = &outs[k][p.batch_row * w..(p.batch_row + p.rows) * w];
                    out[k][p.entry_row * w..(p.entry_row + p.rows) * w].copy_from_slice(src);
                }
            }
            p.shared.inference_us.fetch_add(us, Ordering::Relaxed);
            if p.shared.remaining.fetch_sub(p.rows, Ordering::AcqRel) == p.rows {
                let values =
                    std::mem::take(&mut *p.shared.out.lock().unwrap_or_else(|e| e.into_inner()));
                p.shared.answer(Ok(Outputs {
                    values,
                    queue_time: Duration::from_micros(p.shared.queue_us.load(Ordering::Relaxed)),
                    inference_time: Duration::from_micros(
                        p.shared.inference_us.load(Ordering::Relaxed),
                    ),
                }));
            }
        }
    }
}

/// The submitting side of one queue.
pub struct Batcher {
    tx: mpsc::UnboundedSender<Pending>,
    queued: Arc<AtomicUsize>,
    config: BatchConfig,
    widths: Arc<[usize]>,
    event_size: usize,
    metrics: QueueMetrics,
}

impl Batcher {
    /// Starts the queue task feeding `engine`. `widths` are the per-row sizes of the graph's
    /// outputs, `event_size` that of its input.
    pub fn start(
        engine: mpsc::Sender<Batch>,
        config: BatchConfig,
        event_size: usize,
        widths: Vec<usize>,
        metrics: QueueMetrics,
    ) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let widths: Arc<[usize]> = widths.into();
        let task = QueueTask {
            rx,
            engine,
            queue: VecDeque::new(),
            queued: queued.clone(),
            config,
            event_size,
            widths: widths.clone(),
            metrics: metrics.clone(),
        };
        tokio::spawn(task.run());
        Batcher {
            tx,
            queued,
            config,
            widths,
            event_size,
            metrics,
        }
    }

    /// Queues `rows` rows (`input` is row-major) and waits for their outputs. Fails at once
    /// with [`BatchError::Overloaded`] when the queue has no room.
    pub async fn submit(
        &self,
        input: Vec<f32>,
        rows: usize,
        deadline: Instant,
    ) -> Result<Outputs, BatchError> {
        debug_assert_eq!(input.len(), rows * self.event_size);
        let limit = self.config.max_queue_rows;
        let before = self.queued.fetch_add(rows, Ordering::AcqRel);
        if before + rows > limit {
            self.queued.fetch_sub(rows, Ordering::AcqRel);
            return Err(BatchError::Overloaded {
                queued: before,
                limit,
            });
        }
        self.metrics.queue_rows.add(rows as i64);
        let (reply, rx) = oneshot::channel();
        let shared = Arc::new(Shared {
            reply: Mutex::new(Some(reply)),
            out: Mutex::new(self.widths.iter().map(|w| vec![0f32; rows * w]).collect()),
            remaining: AtomicUsize::new(rows),
            queue_us: AtomicU64::new(0),
            inference_us: AtomicU64::new(0),
        });
        let pending = Pending {
            input,
            rows,
            taken: 0,
            enqueued: Instant::now(),
            deadline,
            shared,
        };
        if self.tx.send(pending).is_err() {
            self.queued.fetch_sub(rows, Ordering::AcqRel);
            self.metrics.queue_rows.sub(rows as i64);
            return Err(BatchError::Closed);
        }
        rx.await.unwrap_or(Err(BatchError::Closed))
    }
}

struct QueueTask {
    rx: mpsc::UnboundedReceiver<Pending>,
    engine: mpsc::Sender<Batch>,
    queue: VecDeque<Pending>,
    queued: Arc<AtomicUsize>,
    config: BatchConfig,
    event_size: usize,
    widths: Arc<[usize]>,
    metrics: QueueMetrics,
}

impl QueueTask {
    fn drain(&mut self) {
        while let Ok(p) = self.rx.try_recv() {
            self.queue.push_back(p);
        }
    }

    fn waiting_rows(&self) -> usize {
        self.queue.iter().map(|p| p.rows - p.taken).sum()
    }

    fn release(&self, rows: usize) {
        self.queued.fetch_sub(rows, Ordering::AcqRel);
        self.metrics.queue_rows.sub(rows as i64);
    }

    async fn run(mut self) {
        let engine = self.engine.clone();
        loop {
            if self.queue.is_empty() {
                match self.rx.recv().await {
                    Some(p) => self.queue.push_back(p),
                    None => return,
                }
            }
            self.drain();
            if !self.config.max_delay.is_zero() {
                let until = self
                    .queue
                    .front()
                    .map(|p| p.enqueued)
                    .unwrap_or_else(Instant::now)
                    + self.config.max_delay;
                while self.waiting_rows() < self.config.max_batch_rows {
                    tokio::select! {
                        p = self.rx.recv() => match p {
                            Some(p) => self.queue.push_back(p),
                            None => break,
                        },
                        _ = tokio::time::sleep_until(until) => break,
                    }
                }
            }
            let permit = match engine.reserve().await {
                Ok(permit) => permit,
                Err(_) => {
                    for p in self.queue.drain(..) {
                        p.shared.answer(Err(BatchError::Closed));
                    }
                    return;
                }
            };
            self.drain();
            if let Some(batch) = self.form_batch() {
                permit.send(batch);
            }
        }
    }

    fn form_batch(&mut self) -> Option<Batch> {
        let max = self.config.max_batch_rows;
        let es = self.event_size;
        let now = Instant::now();
        let mut input = Vec::with_capacity(max.min(self.waiting_rows()) * es);
        let mut parts = Vec::new();
        let mut rows = 0;
        while rows < max {
            let Some(front) = self.queue.front_mut() else {
                break;
            };
            let left = front.rows - front.taken;
            let expired = now >= front.deadline;
            if expired || front.shared.gone() {
                let p = self.queue.pop_front().expect("front exists");
                self.release(left);
                if expired {
                    self.metrics.expired.inc();
                    p.shared.answer(Err(BatchError::Timeout));
                } else {
                    self.metrics.cancelled.inc();
                }
                continue;
            }
            let take = left.min(max - rows);
            input.extend_from_slice(&front.input[front.taken * es..(front.taken + take) * es]);
            parts.push(Part {
                shared: front.shared.clone(),
                entry_row: front.taken,
                batch_row: rows,
                rows: take,
            });
            front.taken += take;
            rows += take;
            let waited = now - front.enqueued;
            front
                .shared
                .queue_us
                .fetch_max(waited.as_micros() as u64, Ordering::Relaxed);
            let done = front.taken == front.rows;
            self.release(take);
            if done {
                self.metrics.queue_duration.observe(waited.as_secs_f64());
                self.queue.pop_front();
            }
        }
        (rows > 0).then(|| Batch {
            input,
            rows,
            parts,
            widths: self.widths.clone(),
            metrics: self.metrics.clone(),
        })
    }
}
