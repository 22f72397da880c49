//! Helpers shared by flowtrain's integration tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, Var};
use flowpack::runtime::{GraphSession, SessionOptions};
use flowpack::signature::{CONTEXT, DATA, LATENT};
use flowpack::TensorSpec;
use flowtrain::bijectors::{Agnostic, Bijector, Ctx, LogDet, Made, Transform};
use flowtrain::nn::Activation;
use flowtrain::onnx::{Graph, Value};
use flowtrain::params::Params;
use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Row-major `[n, d]` standard-normal-ish values, seeded.
pub fn random_rows(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n * d).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

pub fn tensor(v: &[f32], d: usize) -> Tensor {
    tensor_shaped(v, &[d])
}

/// Rows of events shaped `event`: `[N, ...event]`.
pub fn tensor_shaped(v: &[f32], event: &[usize]) -> Tensor {
    let size: usize = event.iter().product();
    let mut shape = vec![v.len() / size];
    shape.extend_from_slice(event);
    Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
}

/// Moves every trainable parameter away from its (often identity) initial value.
pub fn randomize(params: &Params, seed: u64, scale: f32) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for v in params.trainable() {
        let data: Vec<f32> = (0..v.elem_count())
            .map(|_| rng.random_range(-scale..scale))
            .collect();
        v.set(&Tensor::from_vec(data, v.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
}

pub fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// `n` values uniform in `[-scale, scale)`, seeded.
pub fn uniform(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// A tensor of any float type, flattened to float32 values.
pub fn flat(t: &Tensor) -> Vec<f32> {
    to_vec(&t.to_dtype(DType::F32).unwrap())
}

/// max |a − b| over the elements.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// max |a - b| / (abs + rel·|b|); ≤ 1 means within tolerance.
pub fn assert_close(a: &[f32], b: &[f32], abs: f32, rel: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let tol = abs + rel * y.abs();
        assert!(
            (x - y).abs() <= tol,
            "{what}: element {i}: {x} vs {y} (tolerance {tol})"
        );
    }
}

/// A context for conditional bijectors in tests: `k` values per row (0: none), row-major.
#[derive(Clone, Copy)]
pub struct TestContext<'a> {
    /// Values per row.
    pub k: usize,
    /// `rows × k` values.
    pub values: &'a [f32],
}

impl<'a> TestContext<'a> {
    /// No context: an unconditional bijector.
    pub const NONE: TestContext<'static> = TestContext { k: 0, values: &[] };

    /// The context of rows `range` as a tensor, if any.
    fn rows(&self, from: usize, n: usize) -> Option<Tensor> {
        (self.k > 0).then(|| tensor(&self.values[from * self.k..(from + n) * self.k], self.k))
    }
}

/// log|det J| per row, with J from candle's autodiff (one backward pass per output
/// feature) and the determinant from an f64 LU decomposition.
pub fn brute_force_log_det(b: &dyn Bijector, x: &[f32], event: &[usize]) -> Vec<f64> {
    brute_force_log_det_given(b, x, event, TestContext::NONE)
}

/// [`brute_force_log_det`] of a conditional bijector given the context of the rows `x`.
pub fn brute_force_log_det_given(
    b: &dyn Bijector,
    x: &[f32],
    event: &[usize],
    c: TestContext,
) -> Vec<f64> {
    let d: usize = event.iter().product();
    let n = x.len() / d;
    let xv = Var::from_tensor(&tensor_shaped(x, event)).unwrap();
    let ct = c.rows(0, n);
    let (z, _) = b
        .encode(xv.as_tensor(), &Ctx::EVAL.with_context(ct.as_ref()))
        .unwrap();
    let z = z.flatten_from(1).unwrap();
    let mut jac = vec![vec![vec![0f64; d]; d]; n]; // [row][out i][in j]
    #[allow(clippy::needless_range_loop)]
    for i in 0..d {
        let zi = z.narrow(1, i, 1).unwrap().sum_all().unwrap();
        let grads = zi.backward().unwrap();
        let g = grads
            .get(xv.as_tensor())
            .map(to_vec)
            .unwrap_or_else(|| vec![0.0; n * d]);
        for r in 0..n {
            for j in 0..d {
                jac[r][i][j] = g[r * d + j] as f64;
            }
        }
    }
    jac.into_iter().map(log_abs_det).collect()
}

/// log|det m| by Gaussian elimination with partial pivoting, in f64.
pub fn log_abs_det(mut m: Vec<Vec<f64>>) -> f64 {
    let d = m.len();
    let mut total = 0.0;
    for c in 0..d {
        let p = (c..d)
            .max_by(|&a, &b| m[a][c].abs().total_cmp(&m[b][c].abs()))
            .unwrap();
        m.swap(c, p);
        let pivot = m[c][c];
        assert!(pivot != 0.0, "singular Jacobian");
        total += pivot.abs().ln();
        let (top, rest) = m.split_at_mut(c + 1);
        for row in rest {
            let f = row[c] / pivot;
            for (k, v) in row.iter_mut().enumerate().skip(c) {
                *v -= f * top[c][k];
            }
        }
    }
    total
}

/// Runs a bijector's emitted encode graph: `(z, log_det per row)`.
pub fn onnx_encode(b: &dyn Bijector, x: &[f32], event: &[usize]) -> (Vec<f32>, Vec<f32>) {
    onnx_encode_to(b, x, event, event)
}

/// A graph with `first` as its first input and, given a context, `context[N, k]` as the
/// conditioners' second.
fn graph_with_inputs(
    first: &str,
    event: &[usize],
    c: TestContext,
) -> (Graph, Value, Vec<TensorSpec>) {
    let mut g = Graph::new();
    let input = g.input(first, event);
    let mut specs = vec![TensorSpec::batched(first, event)];
    if c.k > 0 {
        let ctx = g.input(CONTEXT, &[c.k]);
        g.set_context(ctx);
        specs.push(TensorSpec::batched(CONTEXT, &[c.k]));
    }
    (g, input, specs)
}

/// Runs a graph built here on CPU with its inputs.
fn run_graph(
    g: Graph,
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
    rows: &[f32],
    c: TestContext,
) -> Vec<Vec<f32>> {
    let bytes = g.finish("test", "").encode_to_vec();
    let mut session =
        GraphSession::new(&bytes, inputs, outputs, &SessionOptions::default()).unwrap();
    if c.k > 0 {
        session.run_inputs(&[rows, c.values]).unwrap()
    } else {
        session.run(rows).unwrap()
    }
}

/// [`onnx_encode`] for a bijector that changes the event shape (squeeze).
pub fn onnx_encode_to(
    b: &dyn Bijector,
    x: &[f32],
    event: &[usize],
    out_event: &[usize],
) -> (Vec<f32>, Vec<f32>) {
    onnx_encode_given(b, x, event, out_event, TestContext::NONE)
}

/// [`onnx_encode_to`] of a conditional bijector given the context of the rows `x`.
pub fn onnx_encode_given(
    b: &dyn Bijector,
    x: &[f32],
    event: &[usize],
    out_event: &[usize],
    c: TestContext,
) -> (Vec<f32>, Vec<f32>) {
    let d: usize = event.iter().product();
    let (mut g, input, inputs) = graph_with_inputs(DATA, event, c);
    let (z, ld) = b.emit_encode(&mut g, &input).unwrap();
    g.output(&z, LATENT, out_event);
    let mut outputs = vec![TensorSpec::batched(LATENT, out_event)];
    let constant = match ld {
        LogDet::Const(c) => Some(c),
        LogDet::Rows(v) => {
            g.output(&v, "log_det", &[]);
            outputs.push(TensorSpec::batched("log_det", &[]));
            None
        }
    };
    let mut out = run_graph(g, &inputs, &outputs, x, c);
    let n = x.len() / d;
    let ld = match constant {
        Some(c) => vec![c as f32; n],
        None => out.pop().unwrap(),
    };
    (out.pop().unwrap(), ld)
}

/// Runs a bijector's emitted decode graph.
pub fn onnx_decode(b: &dyn Bijector, z: &[f32], event: &[usize]) -> Vec<f32> {
    onnx_decode_from(b, z, event, event)
}

/// [`onnx_decode`] from latents shaped `z_event` to data shaped `event`.
pub fn onnx_decode_from(
    b: &dyn Bijector,
    z: &[f32],
    z_event: &[usize],
    event: &[usize],
) -> Vec<f32> {
    onnx_decode_given(b, z, z_event, event, TestContext::NONE)
}

/// [`onnx_decode_from`] of a conditional bijector given the context of the rows `z`.
pub fn onnx_decode_given(
    b: &dyn Bijector,
    z: &[f32],
    z_event: &[usize],
    event: &[usize],
    c: TestContext,
) -> Vec<f32> {
    let (mut g, input, inputs) = graph_with_inputs(LATENT, z_event, c);
    let x = b.emit_decode(&mut g, &input).unwrap();
    g.output(&x, DATA, event);
    let outputs = [TensorSpec::batched(DATA, event)];
    run_graph(g, &inputs, &outputs, z, c).remove(0)
}

/// The four properties every bijector must have: invertibility, log-det against the
/// brute-force Jacobian, and ONNX parity in both directions.
pub fn check_bijector(b: &dyn Bijector, d: usize, seed: u64) {
    check_bijector_shaped(b, &[d], &[d], seed);
}

/// [`check_bijector`] on events shaped `event` that encode to latents shaped `z_event`.
pub fn check_bijector_shaped(b: &dyn Bijector, event: &[usize], z_event: &[usize], seed: u64) {
    check_conditional_bijector(b, event, z_event, 0, seed);
}

/// [`check_bijector_shaped`] for a bijector conditioned on `k` context values per row
/// (0: unconditional), with random contexts drawn from `seed`.
pub fn check_conditional_bijector(
    b: &dyn Bijector,
    event: &[usize],
    z_event: &[usize],
    k: usize,
    seed: u64,
) {
    let d: usize = event.iter().product();
    let context = random_rows(64, k, seed + 7);
    let c = TestContext {
        k,
        values: &context,
    };
    let ct = c.rows(0, 64);
    let cx = Ctx::EVAL.with_context(ct.as_ref());
    let x = random_rows(64, d, seed);
    let (z, ld) = b.encode(&tensor_shaped(&x, event), &cx).unwrap();
    assert_eq!(&z.dims()[1..], z_event, "{}: latent shape", b.name());
    let (z, ld) = (to_vec(&z), to_vec(&ld));
    assert!(
        z.iter().chain(&ld).all(|v| v.is_finite()),
        "{}: non-finite output",
        b.name()
    );
    let back = to_vec(&b.decode(&tensor_shaped(&z, z_event), &cx).unwrap());
    assert_close(
        &back,
        &x,
        1e-5,
        1e-5,
        &format!("{}: decode(encode(x))", b.name()),
    );
    assert_eq!(ld.len(), 64, "{}: one log-det per row", b.name());

    let brute = brute_force_log_det_given(
        b,
        &x[..8 * d],
        event,
        TestContext {
            k,
            values: &context[..8 * k],
        },
    );
    for (r, want) in brute.iter().enumerate() {
        assert!(
            (ld[r] as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
            "{}: row {r}: log-det {} vs brute force {want}",
            b.name(),
            ld[r]
        );
    }

    let (oz, old) = onnx_encode_given(b, &x, event, z_event, c);
    assert_close(&oz, &z, 1e-5, 1e-4, &format!("{}: ONNX encode z", b.name()));
    assert_close(
        &old,
        &ld,
        1e-5,
        1e-4,
        &format!("{}: ONNX encode log-det", b.name()),
    );
    let zs = random_rows(64, d, seed + 1);
    let want = to_vec(&b.decode(&tensor_shaped(&zs, z_event), &cx).unwrap());
    let ox = onnx_decode_given(b, &zs, z_event, event, c);
    assert_close(
        &ox,
        &want,
        1e-5,
        1e-4,
        &format!("{}: ONNX decode", b.name()),
    );
}

pub fn zeros(d: usize) -> Tensor {
    Tensor::zeros(d, DType::F32, &Device::Cpu).unwrap()
}

/// A MADE over `order.len()` features for bijector tests: two ReLU hidden layers of `width`,
/// `transform` per feature, `context` context values per row, order- and
/// connectivity-agnostic (so mask sets k ≥ 1 resample), with its parameters randomised by
/// `randomize(params, noise.0, noise.1)` so that no layer starts at the identity.
pub fn test_made(
    order: Vec<usize>,
    seed: u64,
    width: usize,
    transform: Transform,
    context: usize,
    noise: (u64, f32),
) -> (Params, Made) {
    let p = Params::new(seed);
    let d = order.len();
    let m = Made::new(
        &p,
        d,
        &[width, width],
        Activation::Relu,
        order,
        transform,
        seed,
        context,
    )
    .unwrap()
    .agnostic(Agnostic {
        order: true,
        connectivity: true,
    });
    randomize(&p, noise.0, noise.1);
    (p, m)
}
