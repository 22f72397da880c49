//! CSV tables: a header row, then one row per line. Features are found by name; a cell
//! that is empty, not a number or not finite makes its row bad. Shards take rows
//! `r mod N = i` (every pod reads the whole file; Parquet shards by row group instead).

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::{top_feature, BadRow, Chunk, Kept, Layout, Reader, Scored, Shard, Writer};

/// Reads a CSV file in chunks.
pub struct CsvReader {
    reader: csv::Reader<File>,
    features: Vec<(usize, String)>,
    keep: Vec<usize>,
    shard: Shard,
    row: u64,
    record: csv::ByteRecord,
    bytes: u64,
    total: u64,
}

/// The position of each of `names` among `headers`, or an error naming the missing one.
fn find(
    headers: &csv::StringRecord,
    names: &[String],
    path: &Path,
    what: &str,
) -> Result<Vec<usize>> {
    names
        .iter()
        .map(|n| {
            headers.iter().position(|h| h == n).with_context(|| {
                format!(
                    "{}: no column {n:?} ({what}); its columns are {}",
                    path.display(),
                    headers.iter().collect::<Vec<_>>().join(", ")
                )
            })
        })
        .collect()
}

impl CsvReader {
    /// Opens `path` and finds the model's feature columns and the kept ones.
    pub fn open(path: &Path, layout: &Layout, shard: Shard) -> Result<CsvReader> {
        let file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let total = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .trim(csv::Trim::All)
            .flexible(true)
            .from_reader(file);
        let headers = reader
            .headers()
            .with_context(|| format!("{}: cannot read the header row", path.display()))?
            .clone();
        let at = find(&headers, &layout.features, path, "a model feature")?;
        let keep = find(&headers, &layout.keep, path, "named by --keep")?;
        Ok(CsvReader {
            features: at
                .into_iter()
                .zip(layout.features.iter().cloned())
                .collect(),
            keep,
            shard,
            row: 0,
            record: csv::ByteRecord::new(),
            bytes: reader.position().byte(),
            total,
            reader,
        })
    }
}

impl Reader for CsvReader {
    fn next_chunk(&mut self, rows: usize) -> Result<Option<Chunk>> {
        let d = self.features.len();
        let mut chunk = Chunk {
            rows: Vec::with_capacity(rows),
            values: Vec::with_capacity(rows * d),
            kept: Kept::Text(Vec::new()),
            bad: Vec::new(),
            progress: 0,
        };
        let mut kept = Vec::new();
        let mut any = false;
        while chunk.rows.len() < rows {
            match self.reader.read_byte_record(&mut self.record) {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => bail!("row {} of the input: {e}", self.row),
            }
            any = true;
            let row = self.row;
            self.row += 1;
            if !self.shard.owns(row) {
                continue;
            }
            let start = chunk.values.len();
            let mut why = None;
            for (at, name) in &self.features {
                let cell =
                    std::str::from_utf8(self.record.get(*at).unwrap_or(b"")).unwrap_or("\u{fffd}");
                match cell.parse::<f32>() {
                    Ok(v) if v.is_finite() => chunk.values.push(v),
                    Ok(_) => {
                        why = Some(format!("column {name:?} is {cell:?}, not a finite number"))
                    }
                    Err(_) if cell.is_empty() => why = Some(format!("column {name:?} is empty")),
                    Err(_) => why = Some(format!("column {name:?} is {cell:?}, not a number")),
                }
                if why.is_some() {
                    break;
                }
            }
            if let Some(why) = why {
                chunk.values.truncate(start);
                chunk.bad.push(BadRow { row, why });
                continue;
            }
            chunk.rows.push(row);
            kept.extend(
                self.keep.iter().map(|&k| {
                    String::from_utf8_lossy(self.record.get(k).unwrap_or(b"")).into_owned()
                }),
            );
        }
        if !any {
            return Ok(None);
        }
        let now = self.reader.position().byte();
        chunk.progress = now - self.bytes;
        self.bytes = now;
        if !self.keep.is_empty() {
            chunk.kept = Kept::Text(kept);
        } else {
            chunk.kept = Kept::None;
        }
        Ok(Some(chunk))
    }

    fn total(&self) -> u64 {
        self.total
    }
}

/// Writes scores as CSV.
pub struct CsvWriter {
    writer: csv::Writer<BufWriter<File>>,
    features: Vec<String>,
    keep: usize,
    contributions: bool,
}

impl CsvWriter {
    /// Creates `path` and writes the header.
    pub fn create(path: &Path, layout: &Layout) -> Result<CsvWriter> {
        let file =
            File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
        let mut writer = csv::Writer::from_writer(BufWriter::with_capacity(1 << 20, file));
        writer.write_record(layout.columns())?;
        Ok(CsvWriter {
            writer,
            features: layout.features.clone(),
            keep: layout.keep.len(),
            contributions: layout.contributions,
        })
    }
}

impl Writer for CsvWriter {
    fn write(&mut self, s: Scored) -> Result<()> {
        // Numbers in the shortest form that parses back to the same float (ryu, as
        // serde_json writes them), without an allocation per field.
        let d = self.features.len();
        let mut f32s = ryu::Buffer::new();
        let mut f64s = ryu::Buffer::new();
        let mut ints = itoa::Buffer::new();
        let w = &mut self.writer;
        for (i, &row) in s.chunk.rows.iter().enumerate() {
            w.write_field(ints.format(row))?;
            if let Kept::Text(k) = &s.chunk.kept {
                for f in &k[i * self.keep..(i + 1) * self.keep] {
                    w.write_field(f)?;
                }
            }
            w.write_field(f32s.format(s.log_prob[i]))?;
            w.write_field(f64s.format(s.tail_probability[i]))?;
            w.write_field(if s.outlier[i] { "true" } else { "false" })?;
            if let (true, Some(t)) = (self.contributions, &s.terms) {
                let t = &t[i * d..(i + 1) * d];
                w.write_field(top_feature(t, &self.features))?;
                for v in t {
                    w.write_field(f32s.format(*v))?;
                }
            }
            w.write_record(None::<&[u8]>)?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.writer.flush()?;
        Ok(())
    }
}
