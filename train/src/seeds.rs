//! Every seed flowtrain derives from the run's seed, named and written once. Each is a pure
//! function of (seed, index), which is what makes a resumed run take the same steps as one
//! never stopped and an exported model reproducible from its config.
//!
//! The constants are arbitrary but fixed: changing one changes every model trained since.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The parameter store's initial values.
pub fn params(seed: u64) -> u64 {
    seed ^ 0x1d1e_5eed
}

/// The order in which a table's rows are dealt into splits.
pub fn split(seed: u64) -> u64 {
    seed ^ 0x5_9117
}

/// A toy density's sample for split `stream` (1 train, 2 validation, 3 test).
pub fn toy_split(seed: u64, stream: u64) -> ChaCha8Rng {
    stream_of(seed, stream)
}

/// The shuffle of the training rows in `epoch`.
pub fn epoch(seed: u64, epoch: u64) -> u64 {
    seed ^ epoch.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// The dequantisation noise of training step `step`.
pub fn batch_noise(seed: u64, step: u64) -> ChaCha8Rng {
    stream_of(seed, step + 1)
}

/// The base draws of distillation step `step`.
pub fn distill_step(seed: u64, step: u64) -> u64 {
    seed ^ (step + 1).wrapping_mul(GOLDEN)
}

/// The fixed noise of validation (dequantisation, or distillation's base draws).
pub fn validation(seed: u64) -> u64 {
    seed ^ 0x7a1
}

/// The dequantisation noise of the sample a power transform is fitted on.
pub fn power_transform(seed: u64) -> u64 {
    seed ^ 0x9e0_4a11
}

/// The fixed dequantisation noise of the test split (independent of the run's seed, so
/// runs compare on the same noise).
pub const TEST_NOISE: u64 = 0x7e57;

/// The samples drawn for a 2-D run's density plot.
pub fn plot_samples(seed: u64) -> u64 {
    seed ^ 0x5a
}

/// The random permutation before coupling `i` (RealNVP, NICE).
pub fn permutation(seed: u64, i: usize) -> u64 {
    seed.wrapping_mul(GOLDEN) ^ i as u64
}

/// MADE `i` of a stack: its hidden degrees and, with random orders, its input order.
pub fn made(seed: u64, i: usize) -> u64 {
    seed.wrapping_mul(GOLDEN) ^ (i as u64 + 1)
}

/// MADE mask set `k ≥ 1` of a MADE seeded `seed`: its input order.
pub fn mask_set(seed: u64, k: u64) -> u64 {
    seed ^ k.wrapping_mul(0xd1b5_4a32_d192_ed03)
}

/// The hidden degrees of the mask set whose order came from `mask_set` seed `mix`.
pub fn mask_set_degrees(mix: u64) -> u64 {
    mix.rotate_left(17)
}

/// The initial rotation of Glow's 1×1 convolution in step `i` of level `level`.
pub fn invconv(seed: u64, level: usize, i: usize) -> u64 {
    seed ^ (0x1c0f + 131 * level as u64 + i as u64)
}

/// A ChaCha stream `stream` of `seed`.
fn stream_of(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}
