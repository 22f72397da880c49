//! ONNX Runtime for serving: one session per graph on a dedicated engine thread (never on
//! the async runtime's workers), the execution provider it really uses, and warm-up.

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use flowpack::runtime::{self as rt, Provider, Session, SessionOptions};
use tokio::sync::mpsc;

use crate::batcher::Batch;

/// A loaded graph, ready to be warmed and started.
pub struct Engine {
    session: Session,
    /// The provider the session runs on.
    pub provider: Provider,
    /// Providers tried before it, and why each was passed over.
    pub skipped: Vec<String>,
    input: String,
    outputs: Vec<String>,
    event_shape: Vec<usize>,
}

impl Engine {
    /// Builds a session over `bytes` on the first usable provider of `options`.
    pub fn load(
        bytes: &[u8],
        options: &SessionOptions,
        input: &str,
        outputs: &[&str],
        event_shape: &[usize],
    ) -> Result<Engine, String> {
        let (session, provider, skipped) = rt::session_with(bytes, options).map_err(|e| e.0)?;
        Ok(Engine {
            session,
            provider,
            skipped,
            input: input.into(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            event_shape: event_shape.to_vec(),
        })
    }

    fn run(&mut self, input: &[f32], rows: usize) -> Result<Vec<Vec<f32>>, String> {
        let shape: Vec<usize> = std::iter::once(rows)
            .chain(self.event_shape.iter().copied())
            .collect();
        let outputs: Vec<&str> = self.outputs.iter().map(String::as_str).collect();
        // ONNX Runtime should never panic, but an engine thread must outlive any one batch.
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            rt::run(&mut self.session, &self.input, input, &shape, &outputs).map_err(|e| e.0)
        }))
        .unwrap_or_else(|_| Err("the engine panicked on this batch".into()))
    }

    /// Runs zeros through the graph at batch sizes 1 and `max_rows`, so the first client
    /// does not pay for allocation and kernel selection. Fails if the graph does not run
    /// or returns non-finite values.
    pub fn warm_up(&mut self, max_rows: usize) -> Result<(), String> {
        let size: usize = self.event_shape.iter().product();
        for rows in [1, max_rows.max(1)] {
            let out = self.run(&vec![0f32; rows * size], rows)?;
            if out.iter().flatten().any(|v| !v.is_finite()) {
                return Err("warm-up on zeros returned non-finite values".into());
            }
        }
        Ok(())
    }

    /// Moves the session onto its own thread, which runs every batch sent on the returned
    /// channel (capacity one: one batch waits while another runs).
    pub fn start(mut self, name: &str) -> std::io::Result<mpsc::Sender<Batch>> {
        let (tx, mut rx) = mpsc::channel::<Batch>(1);
        std::thread::Builder::new()
            .name(format!("engine-{name}"))
            .spawn(move || {
                while let Some(batch) = rx.blocking_recv() {
                    let started = Instant::now();
                    let result = self.run(&batch.input, batch.rows);
                    batch.complete(result, started.elapsed());
                }
            })?;
        Ok(tx)
    }
}
