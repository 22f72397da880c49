//! Base-distribution noise: z ~ N(0, T²·I) from a seeded ChaCha stream (Glow's temperature
//! convention: T scales the standard deviation). flowtrain and flowserve draw through this one
//! function, so a seed gives the same samples offline and over HTTP.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// `n × dim` row-major draws from N(0, T²·I); the same seed gives the same draws.
pub fn latent_noise(n: usize, dim: usize, temperature: f64, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n * dim)
        .map(|_| {
            let e: f64 = StandardNormal.sample(&mut rng);
            (e * temperature) as f32
        })
        .collect()
}
