//! Engine threads: each graph runs on a dedicated OS thread (never on the async runtime's
//! workers) that takes batches from a channel of capacity one, says when it is free again,
//! and hands each batch's outputs back through [`Batch::complete`].

use std::panic::AssertUnwindSafe;
use std::thread::JoinHandle;
use std::time::Instant;

use flowpack::runtime::GraphSession;
use tokio::sync::{mpsc, watch};

use crate::batcher::Batch;

/// How a queue talks to its engine thread.
pub struct Feed {
    /// Batches to run (capacity one); the thread ends when every sender is dropped.
    pub batches: mpsc::Sender<Batch>,
    /// How many batches the engine has finished running (its outputs may still be being
    /// handed back).
    pub finished: watch::Receiver<u64>,
}

/// A running engine thread: its feed and its handle, joined at shutdown.
pub struct Engine {
    /// The channels to and from the thread.
    pub feed: Feed,
    /// The thread.
    pub thread: JoinHandle<()>,
}

impl Engine {
    /// Starts a thread named `name` that runs every batch through `run` (row-major input →
    /// one row-major buffer per output). A panic in `run` fails that batch only.
    pub fn spawn<F>(name: &str, mut run: F) -> std::io::Result<Engine>
    where
        F: FnMut(&[f32]) -> Result<Vec<Vec<f32>>, String> + Send + 'static,
    {
        let (batches, mut rx) = mpsc::channel::<Batch>(1);
        let (done, finished) = watch::channel(0u64);
        let thread = std::thread::Builder::new()
            .name(format!("engine-{name}"))
            .spawn(move || {
                let mut count = 0;
                while let Some(batch) = rx.blocking_recv() {
                    let started = Instant::now();
                    // ONNX Runtime should never panic, but an engine thread must outlive any
                    // one batch.
                    let result = std::panic::catch_unwind(AssertUnwindSafe(|| run(&batch.input)))
                        .unwrap_or_else(|_| Err("the engine panicked on this batch".into()));
                    let took = started.elapsed();
                    count += 1;
                    done.send_replace(count);
                    batch.complete(result, took);
                }
            })?;
        Ok(Engine {
            feed: Feed { batches, finished },
            thread,
        })
    }

    /// An engine over a graph session. A conditional graph's batch rows carry each row's
    /// context after its values; they are split into the graph's two inputs here.
    pub fn start(mut session: GraphSession, name: &str) -> std::io::Result<Engine> {
        let widths = session.input_widths();
        Engine::spawn(name, move |rows| {
            match widths[..] {
                [_] => session.run(rows),
                [d, k] => {
                    let (x, c) = split_rows(rows, d, k);
                    session.run_inputs(&[&x, &c])
                }
                _ => return Err(format!("a graph of {} inputs is not served", widths.len())),
            }
            .map_err(|e| e.to_string())
        })
    }
}

/// Rows of `d + k` values split into `d` and `k` values per row.
fn split_rows(rows: &[f32], d: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
    let n = rows.len() / (d + k);
    let (mut x, mut c) = (Vec::with_capacity(n * d), Vec::with_capacity(n * k));
    for row in rows.chunks_exact(d + k) {
        x.extend_from_slice(&row[..d]);
        c.extend_from_slice(&row[d..]);
    }
    (x, c)
}

/// Runs zeros through `session` at batch sizes 1 and `max_rows`, so the first client does
/// not pay for allocation and kernel selection. Fails if the graph does not run or returns
/// non-finite values.
pub fn warm_up(session: &mut GraphSession, max_rows: usize) -> Result<(), String> {
    let widths = session.input_widths();
    for rows in [1, max_rows.max(1)] {
        // Zeros are a valid context too: numeric values, or each column's first category.
        let zeros: Vec<Vec<f32>> = widths.iter().map(|w| vec![0f32; rows * w]).collect();
        let inputs: Vec<&[f32]> = zeros.iter().map(Vec::as_slice).collect();
        let out = session.run_inputs(&inputs).map_err(|e| e.to_string())?;
        if out.iter().flatten().any(|v| !v.is_finite()) {
            return Err("warm-up on zeros returned non-finite values".into());
        }
    }
    Ok(())
}
