//! Small dense linear algebra in f64 for the invertible 1×1 convolution: LU decomposition
//! with partial pivoting, log|det|, inverse, and seeded random rotations. Matrices are
//! row-major `n × n` slices; sizes are channel counts (tens), so plain loops are enough.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// `A = P · L · U`: `perm[i]` is the row of `A` that row `i` of `L·U` comes from, `L` is
/// unit lower triangular, `U` upper triangular.
pub struct Lu {
    /// Row permutation: `(P·M)[perm[i]] = M[i]`.
    pub perm: Vec<usize>,
    /// Unit lower triangular factor.
    pub l: Vec<f64>,
    /// Upper triangular factor.
    pub u: Vec<f64>,
}

/// LU decomposition with partial pivoting; `None` when `a` is singular.
pub fn lu(a: &[f64], n: usize) -> Option<Lu> {
    assert_eq!(a.len(), n * n, "an n × n matrix");
    let mut m = a.to_vec();
    let mut perm: Vec<usize> = (0..n).collect();
    for c in 0..n {
        let p = (c..n).max_by(|&i, &j| m[i * n + c].abs().total_cmp(&m[j * n + c].abs()))?;
        if m[p * n + c] == 0.0 {
            return None;
        }
        if p != c {
            for k in 0..n {
                m.swap(c * n + k, p * n + k);
            }
            perm.swap(c, p);
        }
        for r in c + 1..n {
            let f = m[r * n + c] / m[c * n + c];
            m[r * n + c] = f;
            for k in c + 1..n {
                m[r * n + k] -= f * m[c * n + k];
            }
        }
    }
    let mut l = vec![0.0; n * n];
    let mut u = vec![0.0; n * n];
    for r in 0..n {
        for c in 0..n {
            match r.cmp(&c) {
                std::cmp::Ordering::Greater => l[r * n + c] = m[r * n + c],
                std::cmp::Ordering::Equal => {
                    l[r * n + c] = 1.0;
                    u[r * n + c] = m[r * n + c];
                }
                std::cmp::Ordering::Less => u[r * n + c] = m[r * n + c],
            }
        }
    }
    Some(Lu { perm, l, u })
}

/// The permutation matrix `P` of an [`Lu`] (row-major).
pub fn permutation_matrix(perm: &[usize]) -> Vec<f64> {
    let n = perm.len();
    let mut p = vec![0.0; n * n];
    for (i, &r) in perm.iter().enumerate() {
        p[r * n + i] = 1.0;
    }
    p
}

/// log|det a|; −∞ when singular.
pub fn log_abs_det(a: &[f64], n: usize) -> f64 {
    match lu(a, n) {
        Some(f) => (0..n).map(|i| f.u[i * n + i].abs().ln()).sum(),
        None => f64::NEG_INFINITY,
    }
}

/// `a⁻¹`; `None` when singular.
pub fn inverse(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let f = lu(a, n)?;
    // Column j of a⁻¹ solves a·x = e_j, i.e. L·U·x = Pᵀ·e_j, whose row i is 1 where
    // perm[i] == j: forward substitution through L, then back substitution through U.
    let mut inv = vec![0.0; n * n];
    for j in 0..n {
        let mut y: Vec<f64> = (0..n)
            .map(|i| if f.perm[i] == j { 1.0 } else { 0.0 })
            .collect();
        for i in 0..n {
            for k in 0..i {
                y[i] -= f.l[i * n + k] * y[k];
            }
        }
        for i in (0..n).rev() {
            for k in i + 1..n {
                y[i] -= f.u[i * n + k] * y[k];
            }
            y[i] /= f.u[i * n + i];
        }
        for i in 0..n {
            inv[i * n + j] = y[i];
        }
    }
    Some(inv)
}

/// `a · b` for row-major n × n matrices.
pub fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * n];
    for i in 0..n {
        for k in 0..n {
            let aik = a[i * n + k];
            for j in 0..n {
                out[i * n + j] += aik * b[k * n + j];
            }
        }
    }
    out
}

/// A seeded random orthogonal matrix (Gram–Schmidt on Gaussian columns): Glow's
/// initialisation of the 1×1 convolution, |det| = 1.
pub fn random_rotation(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    loop {
        let mut q: Vec<Vec<f64>> = Vec::with_capacity(n);
        for _ in 0..n {
            let mut v: Vec<f64> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
            for u in &q {
                let d: f64 = v.iter().zip(u).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(u).for_each(|(a, b)| *a -= d * b);
            }
            let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
            if norm < 1e-6 {
                break;
            }
            v.iter_mut().for_each(|a| *a /= norm);
            q.push(v);
        }
        if q.len() == n {
            return (0..n * n).map(|i| q[i / n][i % n]).collect();
        }
    }
}
