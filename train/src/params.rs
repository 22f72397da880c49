//! Parameters and buffers, created from our own seeded RNG (candle's CPU RNG cannot be
//! seeded), named by path like candle's `VarBuilder`, and saved as safetensors.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Entry {
    name: String,
    var: Var,
    trainable: bool,
}

struct Store {
    seed: u64,
    entries: Vec<Entry>,
    rng: ChaCha8Rng,
}

/// A handle on the model's parameter store, positioned at a name prefix.
#[derive(Clone)]
pub struct Params {
    prefix: String,
    store: Arc<Mutex<Store>>,
}

impl Params {
    /// An empty store whose initial values are drawn from `seed`.
    pub fn new(seed: u64) -> Self {
        Params {
            prefix: String::new(),
            store: Arc::new(Mutex::new(Store {
                seed,
                entries: Vec::new(),
                rng: ChaCha8Rng::seed_from_u64(crate::seeds::params(seed)),
            })),
        }
    }

    /// The same store, with `name` appended to the prefix.
    pub fn pp(&self, name: impl std::fmt::Display) -> Params {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Params {
            prefix,
            store: self.store.clone(),
        }
    }

    /// The seed the store was created with (for other seeded choices, e.g. permutations).
    pub fn seed(&self) -> u64 {
        self.lock().seed
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, name: &str, t: Tensor, trainable: bool) -> Result<Var> {
        let full = self.pp(name).prefix;
        let mut store = self.lock();
        if store.entries.iter().any(|e| e.name == full) {
            candle_core::bail!("parameter {full} defined twice");
        }
        let var = Var::from_tensor(&t)?;
        store.entries.push(Entry {
            name: full,
            var: var.clone(),
            trainable,
        });
        Ok(var)
    }

    /// A trainable parameter drawn uniformly from [-bound, bound].
    pub fn uniform(&self, name: &str, shape: impl Into<Shape>, bound: f64) -> Result<Var> {
        let shape: Shape = shape.into();
        let data: Vec<f32> = {
            let mut store = self.lock();
            (0..shape.elem_count())
                .map(|_| store.rng.random_range(-bound..=bound) as f32)
                .collect()
        };
        self.register(name, Tensor::from_vec(data, shape, &Device::Cpu)?, true)
    }

    /// A trainable parameter holding `t` initially.
    pub fn init(&self, name: &str, t: Tensor) -> Result<Var> {
        self.register(name, t, true)
    }

    /// A trainable parameter of zeros.
    pub fn zeros(&self, name: &str, shape: impl Into<Shape>) -> Result<Var> {
        self.register(name, Tensor::zeros(shape, DType::F32, &Device::Cpu)?, true)
    }

    /// A non-trainable buffer (running statistics, fixed preprocessing) holding `t`.
    pub fn buffer(&self, name: &str, t: Tensor) -> Result<Var> {
        self.register(name, t, false)
    }

    /// Every trainable parameter, in creation order.
    pub fn trainable(&self) -> Vec<Var> {
        self.lock()
            .entries
            .iter()
            .filter(|e| e.trainable)
            .map(|e| e.var.clone())
            .collect()
    }

    /// The number of trainable scalars.
    pub fn count(&self) -> usize {
        self.trainable().iter().map(|v| v.elem_count()).sum()
    }

    /// A copy of every parameter and buffer's current value, by name.
    pub fn snapshot(&self) -> HashMap<String, Tensor> {
        self.lock()
            .entries
            .iter()
            .map(|e| (e.name.clone(), e.var.as_tensor().copy().expect("CPU copy")))
            .collect()
    }

    /// Sets every parameter and buffer from `values`; each must be present with its shape.
    pub fn restore(&self, values: &HashMap<String, Tensor>) -> Result<()> {
        for e in self.lock().entries.iter() {
            let t = values.get(&e.name).ok_or_else(|| {
                candle_core::Error::Msg(format!("checkpoint has no tensor {}", e.name))
            })?;
            if t.dims() != e.var.dims() {
                candle_core::bail!(
                    "checkpoint tensor {} has shape {:?}, the model expects {:?}",
                    e.name,
                    t.dims(),
                    e.var.dims()
                );
            }
            e.var.set(&t.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }

    /// Writes every parameter and buffer (plus `extra` tensors) to a safetensors file.
    pub fn save(&self, path: &Path, extra: HashMap<String, Tensor>) -> Result<()> {
        let mut all = self.snapshot();
        all.extend(extra);
        candle_core::safetensors::save(&all, path)
    }
}
