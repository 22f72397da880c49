//! What flowtrain's custom CPU ops (convolutions, fused couplings) share: their inputs as
//! slices, and splitting a batch over the threads candle is given, on its persistent pool,
//! one chunk of examples per thread.

use std::sync::Mutex;

use candle_core::{CpuStorage, Layout, Result};

/// The float32 values of a contiguous op argument (`op` names the op in the error).
pub(crate) fn values<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let all = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("{op}: a non-contiguous argument"),
    }
}

/// How a call splits its batch: `chunks` runs of `per` examples (the last one shorter), one
/// per thread of candle's count.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Split {
    /// Examples per chunk.
    pub per: usize,
    /// Chunks.
    pub chunks: usize,
}

impl Split {
    /// The split of `n` examples.
    pub fn of(n: usize) -> Split {
        let threads = candle_core::utils::get_num_threads().clamp(1, n.max(1));
        let per = n.div_ceil(threads).max(1);
        Split {
            per,
            chunks: n.div_ceil(per),
        }
    }

    /// The examples of chunk `t`.
    pub fn range(&self, t: usize, n: usize) -> std::ops::Range<usize> {
        (t * self.per).min(n)..((t + 1) * self.per).min(n)
    }
}

/// Runs `f(t, item t)` for every item on candle's persistent thread pool (its workers and
/// this thread, each taking the next item until none is left): no threads are started per
/// call, and one item runs on this thread alone.
pub(crate) fn on_pool<T: Send, F: Fn(usize, T) + Sync>(items: Vec<T>, f: F) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    if items.len() <= 1 {
        items
            .into_iter()
            .enumerate()
            .for_each(|(t, item)| f(t, item));
        return;
    }
    let items: Vec<Mutex<Option<T>>> = items.into_iter().map(|i| Mutex::new(Some(i))).collect();
    let next = AtomicUsize::new(0);
    candle_core::utils::barrier_pool().execute(|_| loop {
        let t = next.fetch_add(1, Ordering::Relaxed);
        let Some(item) = items.get(t) else { break };
        // Each item is taken once: the lock is never contended.
        let item = item.lock().expect("never poisoned").take();
        f(t, item.expect("taken once"));
    });
}

/// Splits `v` into consecutive pieces of `len` elements each (the last shorter).
pub(crate) fn pieces(v: &mut [f32], len: usize) -> Vec<&mut [f32]> {
    if len == 0 {
        return Vec::new();
    }
    v.chunks_mut(len).collect()
}
