//! Dynamic batching: one queue per (model version, graph), owned by a task and driven by
//! messages, feeding one engine thread.
//!
//! A request is validated before it gets here and arrives as rows. Admission is decided at
//! once: if the queue's waiting rows would exceed `max_queue_rows` the caller gets
//! [`BatchError::Overloaded`]. The queue task packs waiting rows into batches of at most
//! `max_batch_rows` (a larger request is split across batches and reassembled in order) and
//! hands each to the engine through a channel of capacity one. Entries whose client has
//! gone, or whose deadline has passed, are skipped.
//!
//! When a batch is formed matters. While fewer rows wait than make a full batch, the task
//! forms the next batch only once the engine has finished the one it runs, so the batch
//! holds everything that arrived meanwhile; when a full batch waits, it is formed at once
//! and waits in the channel, so the engine never idles between large batches. Measured on
//! single-row load, forming each batch as soon as the channel had room (from whatever had
//! arrived by then) gave smaller batches, more ONNX Runtime calls and about 7 % fewer rows
//! per second; a pull model (the engine thread locking the queue and forming its own batch)
//! was slower still, since it formed batches greedily and serialised forming with answering.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

use crate::engine::Feed;
use crate::metrics::QueueMetrics;

#[cfg(test)]
mod tests;

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
    /// The engine failed on the batch holding these rows.
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

/// What one request's batches have produced so far.
struct Progress {
    /// Taken when the request is answered.
    reply: Option<Reply>,
    /// Per output, filled part by part (allocated by the first part of a split request).
    out: Vec<Vec<f32>>,
    remaining: usize,
    queue_time: Duration,
    inference_time: Duration,
}

/// A request as the queue task and the engine thread share it.
struct Shared {
    rows: usize,
    progress: Mutex<Progress>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Progress {
    fn answer(&mut self, result: Result<Outputs, BatchError>) {
        if let Some(tx) = self.reply.take() {
            let _ = tx.send(result);
        }
    }

    /// Whether nobody waits for the answer any more.
    fn gone(&self) -> bool {
        self.reply.as_ref().is_none_or(|tx| tx.is_closed())
    }
}

struct Pending {
    input: Vec<f32>,
    taken: usize,
    enqueued: Instant,
    deadline: Instant,
    shared: Arc<Shared>,
}

/// Rows `entry_row..entry_row + rows` of one request, at `batch_row` of a batch.
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
    /// Hands each request its rows of the engine's outputs (or the engine's error) and
    /// answers the requests whose last rows these were. A request that is the whole batch
    /// takes the output buffers as they are.
    pub fn complete(self, result: Result<Vec<Vec<f32>>, String>, took: Duration) {
        let m = &self.metrics;
        m.inference_duration.observe(took.as_secs_f64());
        m.batch_rows.observe(self.rows as f64);
        m.batch_requests.observe(self.parts.len() as f64);
        let mut outs = match result {
            Ok(outs) if outs.len() == self.widths.len() => outs,
            Ok(outs) => {
                let e = format!(
                    "the graph gave {} outputs, not {}",
                    outs.len(),
                    self.widths.len()
                );
                return self.fail(e);
            }
            Err(e) => return self.fail(e),
        };
        let whole = self.parts.len() == 1 && self.parts[0].shared.rows == self.rows;
        for p in &self.parts {
            let mut g = p.shared.lock();
            if g.reply.is_none() {
                continue;
            }
            g.inference_time += took;
            if whole {
                let values = std::mem::take(&mut outs);
                answer_ok(&mut g, values);
                continue;
            }
            if g.out.is_empty() {
                g.out = self
                    .widths
                    .iter()
                    .map(|w| vec![0f32; p.shared.rows * w])
                    .collect();
            }
            for (k, &w) in self.widths.iter().enumerate() {
                let src = &outs[k][p.batch_row * w..(p.batch_row + p.rows) * w];
                g.out[k][p.entry_row * w..(p.entry_row + p.rows) * w].copy_from_slice(src);
            }
            g.remaining -= p.rows;
            if g.remaining == 0 {
                let values = std::mem::take(&mut g.out);
                answer_ok(&mut g, values);
            }
        }
    }

    fn fail(self, e: String) {
        for p in &self.parts {
            p.shared.lock().answer(Err(BatchError::Engine(e.clone())));
        }
    }
}

fn answer_ok(g: &mut Progress, values: Vec<Vec<f32>>) {
    let (queue_time, inference_time) = (g.queue_time, g.inference_time);
    g.answer(Ok(Outputs {
        values,
        queue_time,
        inference_time,
    }));
}

/// The submitting side of one queue.
pub struct Batcher {
    tx: mpsc::UnboundedSender<Pending>,
    closed: Arc<Notify>,
    queued: Arc<AtomicUsize>,
    config: BatchConfig,
    event_size: usize,
    metrics: QueueMetrics,
}

impl Batcher {
    /// Starts the queue task feeding `engine`. `widths` are the per-row sizes of the graph's
    /// outputs, `event_size` that of its input.
    pub fn start(
        engine: Feed,
        config: BatchConfig,
        event_size: usize,
        widths: &[usize],
        metrics: QueueMetrics,
    ) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(Notify::new());
        let task = QueueTask {
            rx,
            closed: closed.clone(),
            engine: engine.batches,
            finished: engine.finished,
            queue: VecDeque::new(),
            waiting: 0,
            queued: queued.clone(),
            config,
            event_size,
            widths: widths.into(),
            metrics: metrics.clone(),
        };
        tokio::spawn(task.run());
        Batcher {
            tx,
            closed,
            queued,
            config,
            event_size,
            metrics,
        }
    }

    /// Queues `input` (row-major, whole rows) and waits for the outputs. Fails at once with
    /// [`BatchError::Overloaded`] when the queue has no room.
    pub async fn submit(&self, input: Vec<f32>, deadline: Instant) -> Result<Outputs, BatchError> {
        let rows = input.len() / self.event_size;
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
            rows,
            progress: Mutex::new(Progress {
                reply: Some(reply),
                out: Vec::new(),
                remaining: rows,
                queue_time: Duration::ZERO,
                inference_time: Duration::ZERO,
            }),
        });
        let pending = Pending {
            input,
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

    /// Stops the queue: what still waits is answered [`BatchError::Closed`], the engine's
    /// channel is dropped (its thread ends after the batch it runs), later submissions fail.
    pub fn close(&self) {
        self.closed.notify_one();
    }
}

struct QueueTask {
    rx: mpsc::UnboundedReceiver<Pending>,
    /// Notified once by [`Batcher::close`].
    closed: Arc<Notify>,
    engine: mpsc::Sender<Batch>,
    finished: watch::Receiver<u64>,
    queue: VecDeque<Pending>,
    /// Rows in `queue` not yet handed to a batch.
    waiting: usize,
    queued: Arc<AtomicUsize>,
    config: BatchConfig,
    event_size: usize,
    widths: Arc<[usize]>,
    metrics: QueueMetrics,
}

/// What the queue task does next.
enum Next {
    Batch,
    Stop,
}

impl QueueTask {
    /// Takes a submission; false when the channel is closed.
    fn accept(&mut self, p: Option<Pending>) -> bool {
        match p {
            Some(p) => {
                self.waiting += p.shared.rows;
                self.queue.push_back(p);
                true
            }
            None => false,
        }
    }

    /// Takes every submission already sent.
    fn drain(&mut self) {
        while let Ok(p) = self.rx.try_recv() {
            self.accept(Some(p));
        }
    }

    fn release(&mut self, rows: usize) {
        self.waiting -= rows;
        self.queued.fetch_sub(rows, Ordering::AcqRel);
        self.metrics.queue_rows.sub(rows as i64);
    }

    /// Waits until there is something to run (and, with a delay, until the batch is full
    /// or the oldest entry has waited long enough).
    async fn wait(&mut self) -> Next {
        if self.queue.is_empty() {
            tokio::select! {
                p = self.rx.recv() => if !self.accept(p) { return Next::Stop },
                _ = self.closed.notified() => return Next::Stop,
            }
        }
        self.drain();
        if !self.config.max_delay.is_zero() {
            let until = self.queue.front().map_or_else(Instant::now, |p| p.enqueued)
                + self.config.max_delay;
            while self.waiting < self.config.max_batch_rows {
                tokio::select! {
                    p = self.rx.recv() => if !self.accept(p) { return Next::Stop },
                    _ = tokio::time::sleep_until(until) => break,
                    _ = self.closed.notified() => return Next::Stop,
                }
            }
        }
        Next::Batch
    }

    async fn run(mut self) {
        let engine = self.engine.clone();
        let mut sent = 0;
        loop {
            if let Next::Stop = self.wait().await {
                break;
            }
            // The engine's permit first (late binding): submissions meanwhile stay in the
            // channel, without waking this task, until the batch is formed.
            let permit = tokio::select! {
                p = engine.reserve() => p.ok(),
                _ = self.closed.notified() => None,
            };
            let Some(permit) = permit else {
                break;
            };
            self.drain();
            let Some(batch) = self.form_batch() else {
                continue;
            };
            permit.send(batch);
            sent += 1;
            if self.waiting < self.config.max_batch_rows {
                // Let the next batch gather while the engine runs this one.
                tokio::select! {
                    f = self.finished.wait_for(|&f| f >= sent) => if f.is_err() { break },
                    _ = self.closed.notified() => break,
                }
            }
        }
        // Closed: refuse what comes, answer what waits.
        self.rx.close();
        self.drain();
        for p in self.queue.drain(..) {
            p.shared.lock().answer(Err(BatchError::Closed));
        }
        let left = self.waiting;
        self.release(left);
    }

    fn form_batch(&mut self) -> Option<Batch> {
        let max = self.config.max_batch_rows;
        let es = self.event_size;
        let now = Instant::now();
        let mut input: Vec<f32> = Vec::new();
        let mut parts = Vec::new();
        let mut rows = 0;
        while rows < max {
            let Some(front) = self.queue.front_mut() else {
                break;
            };
            let left = front.shared.rows - front.taken;
            let waited = now - front.enqueued;
            let skip = {
                let mut g = front.shared.lock();
                if now >= front.deadline {
                    // Answered here (the handler's own timer may have answered first).
                    g.answer(Err(BatchError::Timeout));
                    Some(false)
                } else if g.gone() {
                    Some(true)
                } else {
                    g.queue_time = g.queue_time.max(waited);
                    None
                }
            };
            if let Some(cancelled) = skip {
                self.queue.pop_front();
                self.release(left);
                if cancelled {
                    self.metrics.cancelled.inc();
                }
                continue;
            }
            let take = left.min(max - rows);
            if rows == 0 && take == front.input.len() / es {
                // A whole request opens the batch: its rows become the batch's buffer.
                input = std::mem::take(&mut front.input);
            } else {
                if input.capacity() == 0 {
                    input.reserve(max.min(self.waiting) * es);
                }
                input.extend_from_slice(&front.input[front.taken * es..(front.taken + take) * es]);
            }
            parts.push(Part {
                shared: front.shared.clone(),
                entry_row: front.taken,
                batch_row: rows,
                rows: take,
            });
            front.taken += take;
            rows += take;
            let done = front.taken == front.shared.rows;
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
