//! Training configuration: defaults, then a TOML file, then command-line flags.

use serde::{Deserialize, Serialize};

use crate::bijectors::Mask;
use crate::nn::Activation;

/// A flow family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// Additive coupling layers and a final diagonal scaling (Dinh et al., 2014).
    Nice,
    /// Affine coupling layers with alternating masks, optionally batch norm (Dinh et al., 2016).
    Realnvp,
    /// One masked autoregressive Gaussian layer (Germain et al., 2015).
    Made,
    /// A stack of MADEs with alternating orders (Papamakarios et al., 2017).
    Maf,
    /// MAF's masked transform used inverted: one-pass sampling, sequential density (Kingma et al., 2016).
    Iaf,
    /// Multi-scale actnorm → invertible 1×1 convolution → coupling on images (Kingma & Dhariwal, 2018).
    Glow,
    /// Multi-scale RealNVP on images: checkerboard then channel-mask couplings (Dinh et al., 2016).
    #[value(name = "realnvp_image")]
    RealnvpImage,
    /// Neural spline flow: coupling layers whose map is a rational-quadratic spline
    /// (Durkan et al., 2019).
    Nsf,
}

impl Family {
    /// The name used in manifests and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Nice => "nice",
            Family::Realnvp => "realnvp",
            Family::Made => "made",
            Family::Maf => "maf",
            Family::Iaf => "iaf",
            Family::Glow => "glow",
            Family::RealnvpImage => "realnvp_image",
            Family::Nsf => "nsf",
        }
    }

    /// Whether the family works on `[C, H, W]` images.
    pub fn is_image(self) -> bool {
        matches!(self, Family::Glow | Family::RealnvpImage)
    }
}

/// How each MADE of made/maf/iaf transforms a feature given the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "snake_case")]
pub enum TransformKind {
    /// Gaussian: a shift and a (clamped) log-scale per feature (MAF).
    #[default]
    Affine,
    /// A rational-quadratic spline per feature (`bins`, `tail_bound`): the autoregressive
    /// neural spline flow.
    Spline,
}

/// Fixed feature permutations inserted between coupling layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum PermutationKind {
    /// None: masks flip on alternate layers instead.
    None,
    /// Reverse the feature order between layers.
    Reverse,
    /// A seeded random permutation between layers.
    Random,
    /// A learned linear map between layers, LU-parameterised (`W = P·L·(U + diag(s))`,
    /// log|det| = Σ log|s|, initialised as a random rotation): the NSF paper's choice, Glow's
    /// 1×1 convolution on rows. Autoregressive stacks keep one shared order around it.
    Lu,
}

/// A starting configuration for a task; flags and config files override its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// Anomaly scoring of tabular data: a MAF whose MADEs share one feature order (exact
    /// per-feature contributions), sized by the number of training rows, with weight
    /// averaging and early stopping on the validation split.
    Anomaly,
}

impl Preset {
    /// Sets the preset's values in `c` for a table of `rows` rows.
    pub fn apply(self, c: &mut Config, rows: usize) {
        match self {
            Preset::Anomaly => {
                let m = &mut c.model;
                m.family = Family::Maf;
                m.permutation = PermutationKind::None;
                // Between MADEs of one order batch norm adds no expressiveness (it is affine
                // per feature, like the MADEs given the past), and on small sets its running
                // statistics are noise: without it mean AUROC went from 0.876 to 0.881.
                m.batch_norm = false;
                // A MAF in one order has Gaussian conditionals; a Yeo–Johnson transform per
                // feature takes the skew out of the marginals first: mean AUROC 0.876 → 0.879,
                // above LOF on every seed (BENCHMARKS.md).
                c.data.power_transform = true;
                let m = &mut c.model;
                m.layers = 5;
                m.hidden_layers = 1;
                // Small sets overfit a wide network within a few hundred steps.
                m.hidden = match rows {
                    0..=2_000 => 32,
                    2_001..=20_000 => 64,
                    _ => 128,
                };
                // Measured on four one-class setups (BENCHMARKS.md): weight averaging and a
                // slower, more patient schedule each added AUROC; weight decay, 2 hidden
                // layers, connectivity-agnostic training, smaller batches or a wider network
                // did not.
                let t = &mut c.train;
                t.lr = 3e-4;
                t.average_decay = 0.995;
                t.steps = 6000;
                t.batch_size = 256.min((rows / 4).max(16));
                t.eval_every = 100;
                t.patience = 20;
            }
        }
    }
}

/// Which columns get uniform dequantisation noise in training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Dequantize {
    /// Columns recorded on a grid (integers, fixed decimals), each with its own step.
    Auto,
    /// No column.
    None,
    /// Every column, with step 1 (integer data such as pixels).
    Integer,
}

/// The architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Flow family.
    pub family: Family,
    /// Number of coupling layers (NICE, RealNVP), MADEs (MAF), or steps per level (Glow:
    /// actnorm → 1×1 conv → coupling; image RealNVP: couplings per mask type).
    pub layers: usize,
    /// Units per hidden layer of each conditioner (channels of the image networks).
    pub hidden: usize,
    /// Hidden layers per conditioner.
    pub hidden_layers: usize,
    /// Hidden nonlinearity.
    pub activation: Activation,
    /// Batch norm after each coupling layer.
    pub batch_norm: bool,
    /// Running-average momentum of batch norm.
    pub batch_norm_momentum: f64,
    /// How couplings divide the features.
    pub mask: Mask,
    /// Permutations between coupling layers.
    pub permutation: PermutationKind,
    /// Bound c of the affine coupling's log-scale, s = c·tanh(h/c).
    pub scale_clamp: f64,
    /// MADE/MAF/IAF: a new input order per minibatch (order-agnostic training).
    pub order_agnostic: bool,
    /// MADE/MAF/IAF: new hidden degrees per minibatch (connectivity-agnostic training).
    pub connectivity_agnostic: bool,
    /// Agnostic training cycles through this many mask sets (set 0 is the exported one);
    /// 0 draws a fresh set every minibatch.
    pub masks: usize,
    /// Evaluate (validation, `ensemble_test_nll`) as the average density over mask sets
    /// 0..ensemble, by log-sum-exp; 1 evaluates the exported mask set alone.
    pub ensemble: usize,
    /// Image families: scales (squeeze, steps, factor out half the channels) — L in Glow.
    pub levels: usize,
    /// Image families: additive instead of affine coupling.
    pub additive: bool,
    /// Glow: the LU-parameterised 1×1 convolution (else the plain matrix).
    pub lu: bool,
    /// Image families: the factored-out channels' Gaussian is learned from the remaining half.
    pub learned_prior: bool,
    /// Conditional flows: units of a learned context embedding (a two-layer MLP over the
    /// encoded context) that the conditioners see instead of the encoded context; 0: none.
    pub context_embedding: usize,
    /// made/maf/iaf: the per-feature transform (affine, or a spline).
    pub transform: TransformKind,
    /// Spline flows: bins of each rational-quadratic spline.
    pub bins: usize,
    /// Spline flows: the splines act on [−B, B] (standardised data), the identity outside.
    pub tail_bound: f64,
}

impl ModelConfig {
    /// Whether training draws mask sets (order- or connectivity-agnostic MADE).
    pub fn mask_agnostic(&self) -> bool {
        self.order_agnostic || self.connectivity_agnostic
    }

    /// The mask set of training step `step`.
    pub fn mask_set(&self, step: u64) -> u64 {
        match (self.mask_agnostic(), self.masks) {
            (false, _) => 0,
            (true, 0) => step,
            (true, n) => step % n as u64,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            family: Family::Realnvp,
            layers: 5,
            hidden: 100,
            hidden_layers: 2,
            activation: Activation::Relu,
            batch_norm: false,
            batch_norm_momentum: 0.05,
            mask: Mask::Alternate,
            permutation: PermutationKind::None,
            scale_clamp: 3.0,
            order_agnostic: false,
            connectivity_agnostic: false,
            masks: 0,
            ensemble: 1,
            levels: 2,
            additive: false,
            lu: true,
            learned_prior: false,
            context_embedding: 0,
            transform: TransformKind::Affine,
            bins: 8,
            tail_bound: 3.0,
        }
    }
}

/// The optimisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Maximum optimiser steps.
    pub steps: u64,
    /// Rows per minibatch.
    pub batch_size: usize,
    /// Peak learning rate (Adam).
    pub lr: f64,
    /// Linear warm-up steps before the cosine decay.
    pub warmup_steps: u64,
    /// The cosine schedule ends at lr · min_lr_ratio.
    pub min_lr_ratio: f64,
    /// Decoupled weight decay (AdamW); 0 for plain Adam.
    pub weight_decay: f64,
    /// Decay of an exponential moving average of the weights (Polyak averaging), which is
    /// what validation sees and what is kept; 0 turns it off.
    pub average_decay: f64,
    /// Global gradient-norm clip; 0 disables it.
    pub grad_clip: f64,
    /// Steps between validation passes.
    pub eval_every: u64,
    /// Stop after this many validation passes without improvement; 0 never stops early.
    pub patience: u64,
    /// Steps between checkpoints.
    pub checkpoint_every: u64,
    /// Steps between metric log lines.
    pub log_every: u64,
    /// Seed for initialisation, splits, batches and noise.
    pub seed: u64,
    /// A trained run folder (MAF, RealNVP…) to distil into this flow: minimise the reverse
    /// KL(this ‖ teacher) on this flow's own samples instead of the NLL of data.
    pub teacher: Option<String>,
    /// Base draws per distillation validation pass (reverse-KL estimate).
    pub distill_val_samples: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 5000,
            batch_size: 256,
            lr: 1e-3,
            warmup_steps: 100,
            min_lr_ratio: 0.01,
            weight_decay: 0.0,
            average_decay: 0.0,
            grad_clip: 10.0,
            eval_every: 250,
            patience: 10,
            checkpoint_every: 500,
            log_every: 25,
            seed: 0,
            teacher: None,
            distill_val_samples: 4096,
        }
    }
}

/// The data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// A built-in name (moons, eight_gaussians, checkerboard, rings, pinwheel, wine,
    /// digits) or a path to a .csv or .npy file.
    pub dataset: String,
    /// CSV columns to leave out (labels, ids).
    pub drop_columns: Vec<String>,
    /// Context columns of a conditional flow p(x | c), taken out of the features:
    /// `name`, `name:numeric` or `name:categorical` (a bare name is numeric if every value
    /// is a number, categorical otherwise). Built-in tables also offer their label
    /// (`quality` for wine, `label` for the digit and garment sets).
    pub context: Vec<String>,
    /// Uniform dequantisation of integer-valued columns (training only).
    pub dequantize: Dequantize,
    /// Fit a standardisation on the training split and export it with the flow.
    pub standardize: bool,
    /// After standardising, a Yeo–Johnson power transform per feature (λ fitted by maximum
    /// likelihood on the dequantised training split), exported with the flow and its log-det
    /// counted, so that densities are still of the raw data.
    pub power_transform: bool,
    /// Fraction of rows held out for validation (file and built-in tables).
    pub val_fraction: f64,
    /// Fraction of rows held out for testing (file and built-in tables).
    pub test_fraction: f64,
    /// Training points drawn from a 2-D toy density (validation and test get a fifth each).
    pub toy_samples: usize,
    /// Seed of the split into training, validation and test rows and of the validation
    /// rows' fixed dequantisation noise (default: the training seed). Fix it to compare
    /// training seeds on the same rows.
    pub split_seed: Option<u64>,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dataset: "moons".into(),
            drop_columns: Vec::new(),
            context: Vec::new(),
            dequantize: Dequantize::Auto,
            standardize: true,
            power_transform: false,
            val_fraction: 0.1,
            test_fraction: 0.1,
            toy_samples: 20_000,
            split_seed: None,
        }
    }
}

/// Everything a training run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The architecture.
    pub model: ModelConfig,
    /// The optimisation.
    pub train: TrainConfig,
    /// The data.
    pub data: DataConfig,
}

impl Config {
    /// The seed of the data split and the validation noise: `data.split_seed`, else the
    /// training seed.
    pub fn split_seed(&self) -> u64 {
        self.data.split_seed.unwrap_or(self.train.seed)
    }

    /// Reads a TOML file; unknown keys are errors.
    pub fn from_toml_file(path: &std::path::Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            let msg = e.message().to_string();
            anyhow::anyhow!("config {}: {msg}", path.display())
        })
    }

    /// Checks ranges a person could get wrong.
    pub fn validate(&self) -> anyhow::Result<()> {
        let (m, t, d) = (&self.model, &self.train, &self.data);
        anyhow::ensure!(m.layers >= 1, "model.layers must be at least 1");
        anyhow::ensure!(m.hidden >= 1, "model.hidden must be at least 1");
        let autoregressive = matches!(m.family, Family::Made | Family::Maf | Family::Iaf);
        anyhow::ensure!(
            autoregressive || !m.mask_agnostic(),
            "model.order_agnostic and connectivity_agnostic apply to made, maf and iaf only"
        );
        anyhow::ensure!(m.levels >= 1, "model.levels must be at least 1");
        anyhow::ensure!(m.ensemble >= 1, "model.ensemble must be at least 1");
        anyhow::ensure!(
            m.ensemble == 1 || m.mask_agnostic(),
            "model.ensemble > 1 needs order_agnostic or connectivity_agnostic training"
        );
        anyhow::ensure!(t.batch_size >= 2, "train.batch_size must be at least 2");
        anyhow::ensure!(t.lr > 0.0 && t.lr.is_finite(), "train.lr must be positive");
        anyhow::ensure!(
            (0.0..1.0).contains(&t.average_decay),
            "train.average_decay must be in [0, 1) (0: no weight averaging)"
        );
        anyhow::ensure!(
            !d.power_transform || (d.standardize && !m.family.is_image()),
            "data.power_transform applies to standardised tabular data (not to image families)"
        );
        anyhow::ensure!(
            t.eval_every >= 1 && t.checkpoint_every >= 1 && t.log_every >= 1,
            "train.eval_every, checkpoint_every and log_every must be at least 1"
        );
        anyhow::ensure!(
            (0.0..1.0).contains(&d.val_fraction)
                && (0.0..1.0).contains(&d.test_fraction)
                && d.val_fraction + d.test_fraction < 0.9,
            "data.val_fraction and data.test_fraction must leave most rows for training"
        );
        anyhow::ensure!(
            d.toy_samples >= 100,
            "data.toy_samples must be at least 100"
        );
        anyhow::ensure!(
            d.context.is_empty() || t.teacher.is_none(),
            "distillation (train.teacher) of conditional flows is not supported yet"
        );
        anyhow::ensure!(
            autoregressive || m.family.is_image() || m.transform == TransformKind::Affine,
            "model.transform = spline applies to made, maf, iaf, glow and realnvp_image (the coupling spline flow on rows is family nsf)"
        );
        anyhow::ensure!(
            !(m.additive && m.transform == TransformKind::Spline),
            "model.additive and model.transform = spline exclude each other: a spline coupling is not volume-preserving"
        );
        crate::bijectors::RqSpline::new(m.bins, m.tail_bound)
            .map_err(|e| anyhow::anyhow!("model.bins / model.tail_bound: {e}"))?;
        anyhow::ensure!(
            m.context_embedding == 0 || !d.context.is_empty(),
            "model.context_embedding needs context columns (data.context)"
        );
        Ok(())
    }
}
