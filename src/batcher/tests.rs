//! The queue actor with a stand-in engine: the real engine thread ([`Engine::spawn`])
//! running a closure that computes a known function of each row, so every answer can be
//! checked row by row.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use flowpack::runtime::{Placement, Provider};
use flowpack::Direction;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::*;
use crate::engine::Engine;
use crate::metrics::Metrics;

/// Rows of 2 values; outputs: `2·row` (2 values) and `row[0] + 10·row[1]` (1 value).
const WIDTH: usize = 2;

fn expected(rows: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let doubled = rows.iter().map(|v| 2.0 * v).collect();
    let mixed = rows.chunks(WIDTH).map(|r| r[0] + 10.0 * r[1]).collect();
    (doubled, mixed)
}

/// Stops the stand-in engine before its next batch while shut.
#[derive(Default)]
struct Gate {
    shut: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn pass(&self) {
        let mut shut = self.shut.lock().unwrap_or_else(|e| e.into_inner());
        while *shut {
            shut = self.opened.wait(shut).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Shuts the gate until the returned guard is dropped.
    fn shut(self: &Arc<Self>) -> Shut {
        *self.shut.lock().unwrap() = true;
        Shut(self.clone())
    }
}

/// Opens the gate when dropped (also when a test fails).
struct Shut(Arc<Gate>);

impl Drop for Shut {
    fn drop(&mut self) {
        *self.0.shut.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.0.opened.notify_all();
    }
}

/// A stand-in engine and what the test controls of it.
struct StandIn {
    batcher: Arc<Batcher>,
    engine: Option<std::thread::JoinHandle<()>>,
    max_batch_rows: usize,
    metrics: QueueMetrics,
    /// Every batch's input, in the order the engine took them.
    seen: mpsc::UnboundedReceiver<Vec<f32>>,
    gate: Arc<Gate>,
}

impl StandIn {
    fn start(max_batch_rows: usize, max_queue_rows: usize, fail_on: Option<f32>) -> StandIn {
        let metrics = Metrics::new()
            .for_model(
                "stand_in",
                1,
                "test",
                [&Placement::CPU; 2],
                &[Provider::Cpu],
                Duration::ZERO,
            )
            .queue(Direction::Encode);
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let gate = Arc::new(Gate::default());
        let g = gate.clone();
        let run = move |rows: &[f32]| {
            let _ = seen_tx.send(rows.to_vec());
            g.pass();
            match fail_on {
                Some(bad) if rows.contains(&bad) => Err(format!("poisoned by {bad}")),
                _ => {
                    let (a, b) = expected(rows);
                    Ok(vec![a, b])
                }
            }
        };
        let config = BatchConfig {
            max_batch_rows,
            max_queue_rows,
            max_delay: Duration::ZERO,
        };
        let engine = Engine::spawn("stand-in", run).unwrap();
        let batcher = Batcher::start(engine.feed, config, WIDTH, &[WIDTH, 1], metrics.clone());
        StandIn {
            batcher: Arc::new(batcher),
            engine: Some(engine.thread),
            max_batch_rows,
            metrics,
            seen,
            gate,
        }
    }

    fn submit(&self, rows: Vec<f32>, deadline: Instant) -> Request {
        let b = self.batcher.clone();
        tokio::spawn(async move { b.submit(rows, deadline).await })
    }

    /// The next batch the engine takes (waits for it).
    async fn next_batch(&mut self) -> Vec<f32> {
        tokio::time::timeout(Duration::from_secs(5), self.seen.recv())
            .await
            .expect("the engine takes a batch")
            .expect("the engine is running")
    }

    /// Waits until exactly `n` rows wait in the queue.
    async fn waiting(&self, n: i64) {
        let start = std::time::Instant::now();
        while self.metrics.queue_rows.get() != n {
            let now = self.metrics.queue_rows.get();
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{now} rows wait, not {n}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Stops the engine at its next batch: a request of one full batch is running (held),
    /// and everything submitted afterwards waits in the queue.
    async fn hold(&mut self) -> (Shut, Request) {
        let guard = self.gate.shut();
        let held = self.submit(tagged(101, self.max_batch_rows), later());
        assert_eq!(self.next_batch().await, tagged(101, self.max_batch_rows));
        (guard, held)
    }
}

type Request = tokio::task::JoinHandle<Result<Outputs, BatchError>>;

/// Answers the request of [`StandIn::hold`].
async fn release(held: Request, rows: usize) {
    assert_answer(&held.await.unwrap().unwrap(), &tagged(101, rows));
}

fn later() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

/// Rows whose values say which client and row they are: `[c, r]`.
fn tagged(client: usize, rows: usize) -> Vec<f32> {
    (0..rows).flat_map(|r| [client as f32, r as f32]).collect()
}

fn assert_answer(out: &Outputs, rows: &[f32]) {
    let (a, b) = expected(rows);
    assert_eq!(out.values, vec![a, b]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_a_batch_is_split_and_reassembled_in_order() {
    let mut s = StandIn::start(3, 1000, None);
    let rows = tagged(7, 10);
    let out = s.submit(rows.clone(), later()).await.unwrap().unwrap();
    assert_answer(&out, &rows);
    let mut sizes = Vec::new();
    for _ in 0..4 {
        sizes.push(s.next_batch().await.len() / WIDTH);
    }
    assert_eq!(sizes, vec![3, 3, 3, 1], "10 rows in batches of at most 3");
    assert!(s.seen.try_recv().is_err(), "no fifth batch");
    assert_eq!(s.metrics.batch_rows.get_sample_count(), 4);
    assert_eq!(s.metrics.queue_rows.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_clients_each_get_their_own_rows_back() {
    let mut s = StandIn::start(4, 10_000, None);
    // Hold the engine so that requests pile up, share batches and are split across them.
    let (guard, held) = s.hold().await;
    let mut clients = Vec::new();
    for c in 0..40 {
        let rows = tagged(c, 1 + c % 5);
        clients.push((rows.clone(), s.submit(rows, later())));
    }
    let total: usize = (0..40).map(|c| 1 + c % 5).sum();
    s.waiting(total as i64).await;
    drop(guard);
    release(held, 4).await;
    for (rows, task) in clients {
        assert_answer(&task.await.unwrap().unwrap(), &rows);
    }
    let batches = s.metrics.batch_requests.get_sample_count() as f64;
    let parts = s.metrics.batch_requests.get_sample_sum();
    assert!(
        parts > batches,
        "batches held several requests ({parts} parts in {batches} batches)"
    );
    assert_eq!(s.metrics.batch_rows.get_sample_sum(), (4 + total) as f64);
    // Every batch but the last is full: the engine takes all it can when it is free.
    assert_eq!(batches, (1 + total.div_ceil(4)) as f64);
    assert_eq!(s.metrics.queue_rows.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_stops_at_the_row_limit_and_answers_at_once() {
    let mut s = StandIn::start(4, 10, None);
    let (guard, held) = s.hold().await;
    // Rows of a running batch no longer count; 10 waiting rows are the limit exactly.
    let full = s.submit(tagged(3, 10), later());
    s.waiting(10).await;
    let started = std::time::Instant::now();
    let over = s.batcher.submit(tagged(5, 1), later()).await;
    assert_eq!(
        over.unwrap_err(),
        BatchError::Overloaded {
            queued: 10,
            limit: 10
        }
    );
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "answered at once"
    );
    drop(guard);
    release(held, 4).await;
    assert_answer(&full.await.unwrap().unwrap(), &tagged(3, 10));
    // After the rush, room again.
    let again = s.batcher.submit(tagged(6, 10), later()).await.unwrap();
    assert_answer(&again, &tagged(6, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_cancelled_entries_are_skipped_and_counted() {
    let mut s = StandIn::start(4, 1000, None);
    let (guard, held) = s.hold().await;
    // Waiting behind the held engine: one that expires, one whose client leaves, one fine.
    let expiring = s.submit(tagged(3, 2), Instant::now() + Duration::from_millis(30));
    let leaving = s.submit(tagged(4, 2), later());
    let fine = s.submit(tagged(5, 2), later());
    s.waiting(6).await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    leaving.abort();
    assert!(leaving.await.unwrap_err().is_cancelled());
    drop(guard);
    release(held, 4).await;
    assert_eq!(expiring.await.unwrap().unwrap_err(), BatchError::Timeout);
    assert_answer(&fine.await.unwrap().unwrap(), &tagged(5, 2));
    let mut ran = Vec::new();
    while let Ok(batch) = s.seen.try_recv() {
        ran.extend(batch);
    }
    assert_eq!(
        ran,
        tagged(5, 2),
        "only the fine rows ran after the held batch"
    );
    assert_eq!(s.metrics.cancelled.get(), 1, "the client that left");
    assert_eq!(s.metrics.queue_rows.get(), 0, "skipped rows are released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_error_fails_its_batch_only() {
    let mut s = StandIn::start(2, 1000, Some(666.0));
    let (guard, held) = s.hold().await;
    // These two share a batch; the poison fails both. The request after them runs in
    // batches of its own and succeeds.
    let poisoned = s.submit(vec![666.0, 0.0], later());
    let neighbour = s.submit(tagged(2, 1), later());
    s.waiting(2).await;
    let after = s.submit(tagged(3, 4), later());
    s.waiting(6).await;
    drop(guard);
    release(held, 2).await;
    let e = poisoned.await.unwrap().unwrap_err();
    assert!(
        matches!(&e, BatchError::Engine(m) if m.contains("poisoned")),
        "{e:?}"
    );
    assert!(matches!(
        neighbour.await.unwrap(),
        Err(BatchError::Engine(_))
    ));
    assert_answer(&after.await.unwrap().unwrap(), &tagged(3, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_engine_fails_the_batch_and_keeps_serving() {
    let metrics = Metrics::new()
        .for_model(
            "panics",
            1,
            "test",
            [&Placement::CPU; 2],
            &[Provider::Cpu],
            Duration::ZERO,
        )
        .queue(Direction::Encode);
    let armed = Arc::new(AtomicBool::new(true));
    let run = move |rows: &[f32]| {
        if armed.swap(false, Ordering::SeqCst) {
            panic!("stand-in panic");
        }
        let (a, b) = expected(rows);
        Ok(vec![a, b])
    };
    let config = BatchConfig {
        max_batch_rows: 8,
        max_queue_rows: 100,
        max_delay: Duration::ZERO,
    };
    let engine = Engine::spawn("panics", run).unwrap();
    let batcher = Batcher::start(engine.feed, config, WIDTH, &[WIDTH, 1], metrics);
    let e = batcher.submit(tagged(1, 2), later()).await.unwrap_err();
    assert!(
        matches!(e, BatchError::Engine(ref m) if m.contains("panicked")),
        "{e:?}"
    );
    let again = batcher.submit(tagged(2, 2), later()).await.unwrap();
    assert_answer(&again, &tagged(2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_fills_the_batch_and_a_full_batch_does_not_wait() {
    let metrics = Metrics::new()
        .for_model(
            "delay",
            1,
            "test",
            [&Placement::CPU; 2],
            &[Provider::Cpu],
            Duration::ZERO,
        )
        .queue(Direction::Encode);
    let run = |rows: &[f32]| {
        let (a, b) = expected(rows);
        Ok(vec![a, b])
    };
    let config = BatchConfig {
        max_batch_rows: 4,
        max_queue_rows: 100,
        max_delay: Duration::from_millis(300),
    };
    let engine = Engine::spawn("delay", run).unwrap();
    let batcher = Arc::new(Batcher::start(
        engine.feed,
        config,
        WIDTH,
        &[WIDTH, 1],
        metrics.clone(),
    ));
    // Two single rows 50 ms apart share one batch, which runs about 300 ms after the first.
    let started = std::time::Instant::now();
    let b = batcher.clone();
    let first = tokio::spawn(async move { b.submit(tagged(1, 1), later()).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = batcher.submit(tagged(2, 1), later()).await.unwrap();
    assert_answer(&first.await.unwrap().unwrap(), &tagged(1, 1));
    assert_answer(&second, &tagged(2, 1));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(290),
        "waited for the batch to fill ({took:?})"
    );
    assert_eq!(metrics.batch_rows.get_sample_count(), 1);
    // A request that fills a batch runs at once.
    let started = std::time::Instant::now();
    batcher.submit(tagged(3, 4), later()).await.unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(200),
        "a full batch does not wait ({took:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_answers_what_waits_and_refuses_what_comes() {
    let mut s = StandIn::start(4, 1000, None);
    let (guard, held) = s.hold().await;
    let waiting = s.submit(tagged(3, 2), later());
    s.waiting(2).await;
    s.batcher.close();
    assert_eq!(waiting.await.unwrap().unwrap_err(), BatchError::Closed);
    assert_eq!(
        s.batcher.submit(tagged(4, 1), later()).await.unwrap_err(),
        BatchError::Closed
    );
    drop(guard);
    // The batch the engine was running completes; then the thread ends.
    release(held, 4).await;
    let engine = s.engine.take().unwrap();
    tokio::task::spawn_blocking(move || engine.join().unwrap())
        .await
        .unwrap();
    assert_eq!(s.metrics.queue_rows.get(), 0);
}
