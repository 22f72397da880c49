//! 2-D toy densities for visual checks: two moons, eight Gaussians, checkerboard, rings,
//! pinwheel (the FFJORD/nflows set), drawn from a seeded RNG.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Names of the toy densities.
pub const TOY: [&str; 5] = [
    "moons",
    "eight_gaussians",
    "checkerboard",
    "rings",
    "pinwheel",
];

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    StandardNormal.sample(rng)
}

/// `n` points of the named density, row-major `[n, 2]`; `None` for an unknown name.
pub fn sample(name: &str, n: usize, rng: &mut ChaCha8Rng) -> Option<Vec<f32>> {
    use std::f64::consts::PI;
    let mut out = Vec::with_capacity(2 * n);
    for i in 0..n {
        let (x, y) = match name {
            "moons" => {
                let t = rng.random_range(0.0..PI);
                let (x, y) = if i % 2 == 0 {
                    (t.cos(), t.sin())
                } else {
                    (1.0 - t.cos(), 0.5 - t.sin())
                };
                (x + 0.08 * normal(rng), y + 0.08 * normal(rng))
            }
            "eight_gaussians" => {
                let k = rng.random_range(0..8) as f64 * PI / 4.0;
                (
                    2.0 * k.cos() + 0.2 * normal(rng),
                    2.0 * k.sin() + 0.2 * normal(rng),
                )
            }
            "checkerboard" => {
                let x: f64 = rng.random_range(-2.0..2.0);
                let y0 = rng.random_range(0.0..1.0) - 2.0 * rng.random_range(0..2) as f64;
                let y = y0 + (x.floor().rem_euclid(2.0));
                (x, y)
            }
            "rings" => {
                let r = [0.5, 1.0, 1.5, 2.0][rng.random_range(0..4)];
                let t = rng.random_range(0.0..2.0 * PI);
                (
                    r * t.cos() + 0.05 * normal(rng),
                    r * t.sin() + 0.05 * normal(rng),
                )
            }
            "pinwheel" => {
                let (classes, radial, tangential, rate) = (5usize, 0.3, 0.1, 0.25);
                let c = rng.random_range(0..classes) as f64;
                let a = 1.0 + radial * normal(rng);
                let b = tangential * normal(rng);
                let angle = c * 2.0 * PI / classes as f64 + rate * a.exp();
                let (s, co) = angle.sin_cos();
                (2.0 * (a * co - b * s), 2.0 * (a * s + b * co))
            }
            _ => return None,
        };
        out.push(x as f32);
        out.push(y as f32);
    }
    Some(out)
}
