//! How many threads training uses. candle splits its CPU ops (and flowtrain's convolutions
//! split their batch) over `RAYON_NUM_THREADS` threads, read at every op, on a persistent
//! pool sized once by `CANDLE_NUM_THREADS`; its elementwise ops on 64 Ki elements or more
//! use the whole pool whatever the count. On small tensors a second thread mostly waits
//! (rows flows train fastest on one), while image flows' convolutions and wide elementwise
//! ops gain from every core. So the count is either given (`flowtrain train --threads`, or
//! `RAYON_NUM_THREADS` set by the user), and then sizes the pool too, so that one thread is
//! one thread; or chosen by [`Trial`]: image flows time their first steps on 1 thread and on
//! all the cores, alternating, and keep the faster (on a pool of all the cores, so that the
//! 1-thread candidate is "convolutions and GEMMs on one thread").

use std::sync::atomic::{AtomicBool, Ordering};

/// Whether [`Trial`] may choose (nobody gave a count).
static CHOOSE: AtomicBool = AtomicBool::new(false);

/// Sets up the process's threads before any tensor op: `given` (or `RAYON_NUM_THREADS` if
/// the user set it) fixes the count and sizes the pool; otherwise training starts on 1 and
/// image flows may choose, on a pool of all the cores. `CANDLE_NUM_THREADS`, if the user set
/// it, sizes the pool in both cases. Call it from `main` while the process has one thread
/// (it sets environment variables).
pub fn init(given: Option<usize>) {
    let from_env = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0);
    let count = given.filter(|&n| n > 0).or(from_env);
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", count.unwrap_or(cores()).to_string());
    }
    std::env::set_var("RAYON_NUM_THREADS", count.unwrap_or(1).to_string());
    CHOOSE.store(count.is_none(), Ordering::Relaxed);
}

/// The cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The count ops use now.
pub fn current() -> usize {
    candle_core::utils::get_num_threads()
}

/// Sets the count ops use from now on. Between training steps only: the pool's workers are
/// parked then and nothing else reads the environment.
fn set(n: usize) {
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
}

/// Steps at the start of a run left out of the timing (initialisation, warm caches).
const WARM_UP: u64 = 3;
/// Timed steps per candidate.
const TIMED: usize = 6;

/// The choice of a thread count from timed training steps: after [`WARM_UP`] steps,
/// alternate the candidates (1 and all the cores) step by step, [`TIMED`] steps each, and keep
/// the one with the lower median step time. Training itself is unchanged: the steps are
/// real ones, and every count computes the same step (up to the order of a few sums).
pub struct Trial {
    candidates: Vec<usize>,
    times: Vec<Vec<f64>>,
    step: u64,
    chosen: Option<usize>,
}

impl Trial {
    /// A trial for a run of `steps` steps; `image` flows only (rows flows keep 1 thread),
    /// when no count was given and there is more than one core.
    pub fn new(image: bool, steps: u64) -> Trial {
        let cores = cores().min(
            std::env::var("CANDLE_NUM_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(usize::MAX),
        );
        let worth = steps >= 4 * (WARM_UP + 2 * TIMED as u64);
        let candidates = if image && worth && cores > 1 && CHOOSE.load(Ordering::Relaxed) {
            vec![1, cores]
        } else {
            vec![]
        };
        Trial::between(candidates)
    }

    /// A trial between `candidates` (none: nothing to choose).
    fn between(candidates: Vec<usize>) -> Trial {
        Trial {
            times: vec![Vec::new(); candidates.len()],
            candidates,
            step: 0,
            chosen: None,
        }
    }

    /// Sets the count for the next step.
    pub fn before_step(&self) {
        if let Some(c) = self.timing() {
            set(self.candidates[c]);
        }
    }

    /// The candidate the next step times, if it is a timed one.
    fn timing(&self) -> Option<usize> {
        if self.chosen.is_some() || self.candidates.is_empty() || self.step < WARM_UP {
            return None;
        }
        Some(((self.step - WARM_UP) as usize) % self.candidates.len())
    }

    /// Records the step's time; returns the count once it is chosen.
    pub fn after_step(&mut self, seconds: f64) -> Option<usize> {
        let timed = self.timing();
        self.step += 1;
        let c = timed?;
        self.times[c].push(seconds);
        if self.times.iter().any(|t| t.len() < TIMED) {
            return None;
        }
        let medians = self.medians();
        let best = (0..medians.len())
            .min_by(|&a, &b| medians[a].1.total_cmp(&medians[b].1))
            .expect("candidates");
        let n = self.candidates[best];
        set(n);
        self.chosen = Some(n);
        Some(n)
    }

    /// The median step times of the candidates, for the log: `(threads, seconds)`.
    pub fn medians(&self) -> Vec<(usize, f64)> {
        self.candidates
            .iter()
            .zip(&self.times)
            .map(|(&n, t)| {
                let mut t = t.clone();
                t.sort_by(f64::total_cmp);
                (n, t.get(t.len() / 2).copied().unwrap_or(f64::NAN))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a trial whose steps take `ms[candidate]` (1 s while not timed); returns the step
    /// at which it chose and what.
    fn choice(candidates: Vec<usize>, ms: [f64; 2]) -> Option<(u64, usize)> {
        let mut t = Trial::between(candidates);
        let mut chosen = None;
        for step in 0..100 {
            t.before_step();
            let seconds = t.timing().map_or(1.0, |c| ms[c] * 1e-3);
            if let Some(n) = t.after_step(seconds) {
                assert!(chosen.is_none(), "chose twice");
                chosen = Some((step, n));
            }
        }
        chosen
    }

    #[test]
    fn the_faster_count_is_kept_after_the_timed_steps() {
        let last_timed = WARM_UP + 2 * TIMED as u64 - 1;
        assert_eq!(choice(vec![1, 2], [30.0, 20.0]), Some((last_timed, 2)));
        assert_eq!(choice(vec![1, 2], [20.0, 30.0]), Some((last_timed, 1)));
        assert_eq!(choice(vec![], [20.0, 30.0]), None);
    }
}
