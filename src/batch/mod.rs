//! `flowserve score`: scores a table (CSV or Parquet) offline with the same package, graph
//! and tail-probability code as `POST /score`, in bounded memory.
//!
//! Three threads, each bounded by two chunks in flight: the reader parses and checks rows,
//! the scorer runs the encode graph and [`crate::scoring`], the writer writes the results
//! to `<output>.part`, renamed to `<output>` only when everything succeeded. A malformed
//! row stops the run with its row number (or is skipped and counted with `--skip-bad`);
//! no row ever gets a made-up score.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use flowpack::runtime::{GraphSession, SessionOptions};
use flowpack::{Direction, Package};
use indicatif::{ProgressBar, ProgressStyle};

use crate::scoring::{check_threshold, is_outlier, Scorer};

mod csv;
mod parquet;

/// `flowserve score`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ScoreArgs {
    /// Package folder (a version folder: models/shuttle/1).
    #[arg(long, env = "FLOWSERVE_SCORE_MODEL")]
    pub model: PathBuf,
    /// Table to score: .csv (a header row) or .parquet, with a column per model feature
    /// (others are ignored unless kept).
    #[arg(long, env = "FLOWSERVE_SCORE_INPUT")]
    pub input: PathBuf,
    /// Where to write the scores: .csv or .parquet (written as <output>.part, renamed when
    /// done).
    #[arg(long, env = "FLOWSERVE_SCORE_OUTPUT")]
    pub output: PathBuf,
    /// Score only shard i of N (0-based): Parquet row groups g with g mod N = i, or CSV rows
    /// r with r mod N = i. One Kubernetes Indexed Job pod per shard.
    #[arg(long, env = "FLOWSERVE_SCORE_SHARD", default_value = "0/1", value_parser = Shard::parse)]
    pub shard: Shard,
    /// Skip malformed rows (missing, non-numeric or non-finite features) and count them,
    /// instead of stopping at the first one.
    #[arg(long, env = "FLOWSERVE_SCORE_SKIP_BAD")]
    pub skip_bad: bool,
    /// Flag rows whose tail probability is at or below this (default: the model's).
    #[arg(long, env = "FLOWSERVE_SCORE_THRESHOLD")]
    pub threshold: Option<f64>,
    /// Input columns copied to the output beside the scores (ids, amounts), comma-separated;
    /// the output must then have the input's format.
    #[arg(long, env = "FLOWSERVE_SCORE_KEEP", value_delimiter = ',')]
    pub keep: Vec<String>,
    /// Rows per ONNX Runtime call.
    #[arg(long, env = "FLOWSERVE_SCORE_BATCH_ROWS", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub batch_rows: u64,
    /// ONNX Runtime threads inside one call.
    #[arg(long, env = "FLOWSERVE_SCORE_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub threads: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Shard `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// 0-based.
    pub index: u64,
    /// At least 1.
    pub count: u64,
}

impl Shard {
    /// `i/N` with `0 ≤ i < N`.
    pub fn parse(s: &str) -> Result<Shard, String> {
        let bad = || format!("--shard must be i/N with 0 ≤ i < N (e.g. 2/8), got {s:?}");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse::<u64>().map_err(|_| bad())?,
            n.trim().parse::<u64>().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    /// Whether item `k` (a row or a row group) belongs to this shard.
    pub fn owns(&self, k: u64) -> bool {
        k % self.count == self.index
    }
}

/// A row that cannot be scored.
#[derive(Debug, Clone)]
pub struct BadRow {
    /// 0-based data row number in the input file.
    pub row: u64,
    /// What is wrong with it, naming the column.
    pub why: String,
}

/// Pass-through columns of a chunk's good rows.
pub enum Kept {
    /// None asked for.
    None,
    /// CSV fields, row-major (`keep.len()` per row).
    Text(Vec<String>),
    /// Parquet/Arrow columns.
    Arrow(Vec<arrow_array::ArrayRef>),
}

/// Rows read from the input, checked, ready for the graph.
pub struct Chunk {
    /// Input row number of each good row.
    pub rows: Vec<u64>,
    /// Their features, row-major.
    pub values: Vec<f32>,
    /// Their pass-through columns.
    pub kept: Kept,
    /// Rows refused in this chunk.
    pub bad: Vec<BadRow>,
    /// Progress made (bytes for CSV, rows for Parquet).
    pub progress: u64,
}

/// A chunk with its scores.
pub struct Scored {
    /// The rows.
    pub chunk: Chunk,
    /// log p(x) per row.
    pub log_prob: Vec<f32>,
    /// Tail probability per row.
    pub tail_probability: Vec<f64>,
    /// Whether each row is at or below the threshold.
    pub outlier: Vec<bool>,
    /// Row-major `[N, D]` per-feature terms (models with exact contributions).
    pub terms: Option<Vec<f32>>,
}

/// What the output holds besides `row` and the kept columns.
pub struct Layout {
    /// Feature names (for the contribution columns).
    pub features: Vec<String>,
    /// Kept input columns.
    pub keep: Vec<String>,
    /// Whether there are contribution columns.
    pub contributions: bool,
}

impl Layout {
    /// Output column names in order: `row`, the kept columns, `log_prob`,
    /// `tail_probability`, `outlier`, then `most_surprising` and `contribution_<feature>`
    /// per feature for models with exact contributions.
    pub fn columns(&self) -> Vec<String> {
        let mut c = vec!["row".to_string()];
        c.extend(self.keep.iter().cloned());
        c.extend(["log_prob", "tail_probability", "outlier"].map(String::from));
        if self.contributions {
            c.push("most_surprising".into());
            c.extend(self.features.iter().map(|f| format!("contribution_{f}")));
        }
        c
    }
}

/// A table source.
pub trait Reader: Send {
    /// The next chunk of at most `rows` good rows; `None` at the end.
    fn next_chunk(&mut self, rows: usize) -> Result<Option<Chunk>>;
    /// Total progress units (for the bar).
    fn total(&self) -> u64;
    /// The Arrow schema of the kept columns (Parquet input).
    fn kept_schema(&self) -> Option<arrow_schema::SchemaRef> {
        None
    }
}

/// A table sink.
pub trait Writer: Send {
    /// Writes one scored chunk.
    fn write(&mut self, s: Scored) -> Result<()>;
    /// Flushes and closes the file.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Rows scored and written.
    pub scored: u64,
    /// Rows skipped as malformed (`--skip-bad`).
    pub skipped: u64,
    /// Rows flagged as outliers.
    pub outliers: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Seconds inside ONNX Runtime (the rest is start-up, reading, scoring and writing not
    /// hidden behind it).
    pub graph_seconds: f64,
}

enum Format {
    Csv,
    Parquet,
}

fn format_of(path: &Path, flag: &str) -> Result<Format> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => Ok(Format::Csv),
        Some("parquet") | Some("pq") => Ok(Format::Parquet),
        _ => bail!("{flag} {} must end in .csv or .parquet", path.display()),
    }
}

/// Scores `args.input` into `args.output`.
pub fn run(args: &ScoreArgs) -> Result<Summary> {
    let started = Instant::now();
    let package = Package::open(&args.model)?;
    if let Some(c) = &package.manifest.context {
        let names: Vec<&str> = c.columns.iter().map(|c| c.name.as_str()).collect();
        bail!(
            "{} is a conditional model (context: {}); offline scoring does not read context columns yet: score it through the server's /score with a context per row",
            args.model.display(),
            names.join(", ")
        );
    }
    let scorer = Scorer::new(&package).map_err(anyhow::Error::msg)?;
    let threshold = match args.threshold {
        Some(t) => check_threshold(t).map_err(|e| anyhow::anyhow!("--{e}"))?,
        None => scorer.default_threshold,
    };
    let (input_format, output_format) = (
        format_of(&args.input, "--input")?,
        format_of(&args.output, "--output")?,
    );
    if !args.keep.is_empty()
        && std::mem::discriminant(&input_format) != std::mem::discriminant(&output_format)
    {
        bail!("--keep copies columns as they are: write the output in the input's format");
    }
    let layout = Layout {
        features: scorer.features.to_vec(),
        keep: args.keep.clone(),
        contributions: scorer.has_terms,
    };
    let mut reader: Box<dyn Reader> = match input_format {
        Format::Csv => Box::new(csv::CsvReader::open(&args.input, &layout, args.shard)?),
        Format::Parquet => Box::new(parquet::ParquetReader::open(
            &args.input,
            &layout,
            args.shard,
        )?),
    };
    let part = PathBuf::from(format!("{}.part", args.output.display()));
    let writer: Box<dyn Writer> = match output_format {
        Format::Csv => Box::new(csv::CsvWriter::create(&part, &layout)?),
        Format::Parquet => Box::new(parquet::ParquetWriter::create(
            &part,
            &layout,
            reader.kept_schema(),
        )?),
    };
    let options = SessionOptions {
        intra_threads: args.threads as usize,
        ..SessionOptions::default()
    };
    let mut session = GraphSession::open(&package, Direction::Encode, &options)
        .with_context(|| format!("cannot load {}", args.model.display()))?;
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(reader.total());
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:40} {percent:>3}% {msg} ({elapsed} elapsed, {eta} left)",
            )
            .expect("valid template"),
        );
        bar
    };
    let batch = args.batch_rows as usize;
    let (to_score, chunks) = sync_channel::<Chunk>(2);
    let (to_write, results) = sync_channel::<Scored>(2);
    let summary = std::thread::scope(|s| -> Result<Summary> {
        let read = s.spawn(move || read_all(&mut *reader, batch, to_score));
        let write = s.spawn(move || write_all(writer, results));
        let scored = score_all(
            &mut session,
            &scorer,
            threshold,
            args.skip_bad,
            chunks,
            to_write,
            &bar,
        );
        // A failed stage closes its channels, so the others stop too; report the first cause.
        let read = read
            .join()
            .map_err(|_| anyhow::anyhow!("the reader panicked"))?;
        let write = write
            .join()
            .map_err(|_| anyhow::anyhow!("the writer panicked"))?;
        let summary = scored?;
        read?;
        write?;
        Ok(summary)
    });
    let mut summary = match summary {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
    };
    std::fs::rename(&part, &args.output).with_context(|| {
        format!(
            "cannot move {} to {}",
            part.display(),
            args.output.display()
        )
    })?;
    bar.finish_and_clear();
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

fn read_all(reader: &mut dyn Reader, rows: usize, out: SyncSender<Chunk>) -> Result<()> {
    while let Some(chunk) = reader.next_chunk(rows)? {
        if out.send(chunk).is_err() {
            // The scorer stopped; its error is the one to report.
            return Ok(());
        }
    }
    Ok(())
}

fn write_all(mut writer: Box<dyn Writer>, results: Receiver<Scored>) -> Result<()> {
    for scored in results {
        writer.write(scored)?;
    }
    writer.finish()
}

fn refuse(bad: &BadRow) -> anyhow::Error {
    anyhow::anyhow!(
        "row {} of the input: {}; nothing was written (pass --skip-bad to skip and count such rows)",
        bad.row,
        bad.why
    )
}

fn score_all(
    session: &mut GraphSession,
    scorer: &Scorer,
    threshold: f64,
    skip_bad: bool,
    chunks: Receiver<Chunk>,
    out: SyncSender<Scored>,
    bar: &ProgressBar,
) -> Result<Summary> {
    let mut summary = Summary::default();
    let d = session.input_width();
    for mut chunk in chunks {
        if let Some(bad) = chunk.bad.first() {
            if !skip_bad {
                return Err(refuse(bad));
            }
            summary.skipped += chunk.bad.len() as u64;
        }
        if !chunk.rows.is_empty() {
            let started = Instant::now();
            let mut outputs = session.run(&chunk.values)?.into_iter();
            summary.graph_seconds += started.elapsed().as_secs_f64();
            let mut log_prob = outputs.nth(1).expect("log_prob");
            let mut terms = outputs.next().filter(|_| scorer.has_terms);
            // A row the model scores as non-finite lies far outside its data: malformed for
            // scoring purposes, never written with a made-up number.
            let broken: Vec<usize> = (0..log_prob.len())
                .filter(|&i| {
                    !log_prob[i].is_finite()
                        || terms
                            .as_ref()
                            .is_some_and(|t| t[i * d..(i + 1) * d].iter().any(|v| !v.is_finite()))
                })
                .collect();
            if let Some(&first) = broken.first() {
                let bad = BadRow {
                    row: chunk.rows[first],
                    why: "log_prob is not a finite float32: the row lies far outside the data the model was trained on".into(),
                };
                if !skip_bad {
                    return Err(refuse(&bad));
                }
                summary.skipped += broken.len() as u64;
                drop_rows(&mut chunk, &mut log_prob, &mut terms, &broken, d)?;
            }
            let tail_probability = scorer.tail_probabilities(&log_prob);
            let outlier: Vec<bool> = tail_probability
                .iter()
                .map(|&p| is_outlier(p, threshold))
                .collect();
            summary.scored += log_prob.len() as u64;
            summary.outliers += outlier.iter().filter(|&&o| o).count() as u64;
            let progress = chunk.progress;
            let scored = Scored {
                chunk,
                log_prob,
                tail_probability,
                outlier,
                terms,
            };
            if out.send(scored).is_err() {
                // The writer failed; its error is reported by the caller.
                break;
            }
            bar.inc(progress);
        } else {
            bar.inc(chunk.progress);
        }
        bar.set_message(format!(
            "{} rows scored, {} outliers, {} skipped",
            summary.scored, summary.outliers, summary.skipped
        ));
    }
    Ok(summary)
}

/// Removes rows at the (ascending) positions `drop` from a chunk and its outputs.
fn drop_rows(
    chunk: &mut Chunk,
    log_prob: &mut Vec<f32>,
    terms: &mut Option<Vec<f32>>,
    drop: &[usize],
    d: usize,
) -> Result<()> {
    let keep: Vec<bool> = {
        let mut k = vec![true; chunk.rows.len()];
        drop.iter().for_each(|&i| k[i] = false);
        k
    };
    let retain = |v: &mut Vec<f32>, width: usize| {
        let mut out = Vec::with_capacity(v.len());
        for (i, row) in v.chunks(width).enumerate() {
            if keep[i] {
                out.extend_from_slice(row);
            }
        }
        *v = out;
    };
    retain(log_prob, 1);
    retain(&mut chunk.values, d);
    if let Some(t) = terms.as_mut() {
        retain(t, d);
    }
    let mut i = 0;
    chunk.rows.retain(|_| {
        i += 1;
        keep[i - 1]
    });
    match &mut chunk.kept {
        Kept::None => {}
        Kept::Text(fields) => {
            let width = fields.len() / keep.len().max(1);
            let mut out = Vec::with_capacity(fields.len());
            for (r, row) in fields.chunks(width.max(1)).enumerate() {
                if keep[r] {
                    out.extend_from_slice(row);
                }
            }
            *fields = out;
        }
        Kept::Arrow(columns) => {
            let mask = arrow_array::BooleanArray::from(keep.clone());
            for c in columns.iter_mut() {
                *c = arrow_select::filter::filter(c.as_ref(), &mask)?;
            }
        }
    }
    Ok(())
}

/// The name of a row's most surprising feature (the first of
/// [`crate::scoring::most_surprising`]: the lowest term, the first of ties).
pub fn top_feature<'a>(terms: &[f32], features: &'a [String]) -> &'a str {
    let mut best = 0;
    for (i, t) in terms.iter().enumerate().skip(1) {
        if t.total_cmp(&terms[best]).is_lt() {
            best = i;
        }
    }
    features.get(best).map_or("", String::as_str)
}
