//! Parquet tables through Arrow record batches. Only the feature and kept columns are
//! read; shards take row groups `g mod N = i`, so each pod reads only its part. Feature
//! columns may be any integer or float type; a null or non-finite value makes its row bad.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{
    Array, ArrayRef, BooleanArray, Float32Array, Float64Array, RecordBatch, StringArray,
    UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use super::{top_feature, BadRow, Chunk, Kept, Layout, Reader, Scored, Writer};

/// Reads the selected row groups of a Parquet file.
pub struct ParquetReader {
    batches: ParquetRecordBatchReader,
    features: Vec<String>,
    keep: Vec<String>,
    kept_schema: SchemaRef,
    /// (first input row, rows) of each selected row group, in reading order.
    groups: Vec<(u64, u64)>,
    /// Rows read so far from the selected groups.
    consumed: u64,
    total: u64,
    /// Rows of the current record batch not yet handed out.
    pending: Option<(RecordBatch, usize)>,
}

fn numeric(t: &DataType) -> bool {
    t.is_integer() || matches!(t, DataType::Float16 | DataType::Float32 | DataType::Float64)
}

impl ParquetReader {
    /// Opens `path`, checks the feature columns are numeric and selects this shard's row
    /// groups.
    pub fn open(path: &Path, layout: &Layout, shard: super::Shard) -> Result<ParquetReader> {
        let file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .with_context(|| format!("{} is not a Parquet file", path.display()))?;
        let schema = builder.schema().clone();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let mut roots = Vec::new();
        for (name, what) in layout
            .features
            .iter()
            .map(|f| (f, "a model feature"))
            .chain(layout.keep.iter().map(|k| (k, "named by --keep")))
        {
            let Some(i) = names.iter().position(|n| n == name) else {
                bail!(
                    "{}: no column {name:?} ({what}); its columns are {}",
                    path.display(),
                    names.join(", ")
                );
            };
            roots.push(i);
        }
        for f in &layout.features {
            let t = schema.field_with_name(f)?.data_type();
            if !numeric(t) {
                bail!(
                    "{}: column {f:?} is {t}, but model features must be numbers",
                    path.display()
                );
            }
        }
        let kept_schema = Arc::new(Schema::new(
            layout
                .keep
                .iter()
                .map(|k| schema.field_with_name(k).cloned())
                .collect::<Result<Vec<Field>, _>>()?,
        ));
        let meta = builder.metadata().clone();
        let mut start = 0u64;
        let mut groups = Vec::new();
        let mut selected = Vec::new();
        for (g, rg) in meta.row_groups().iter().enumerate() {
            let n = rg.num_rows() as u64;
            if shard.owns(g as u64) {
                selected.push(g);
                groups.push((start, n));
            }
            start += n;
        }
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
        let batches = builder
            .with_row_groups(selected)
            .with_projection(mask)
            .with_batch_size(8192)
            .build()?;
        Ok(ParquetReader {
            batches,
            features: layout.features.clone(),
            keep: layout.keep.clone(),
            kept_schema,
            total: groups.iter().map(|g| g.1).sum(),
            groups,
            consumed: 0,
            pending: None,
        })
    }

    /// The input row number of the `k`-th row read from the selected groups.
    fn input_row(&self, k: u64) -> u64 {
        let mut k = k;
        for &(start, n) in &self.groups {
            if k < n {
                return start + k;
            }
            k -= n;
        }
        unreachable!("row {k} is past the selected row groups")
    }
}

/// Column `c` as f32 values with a validity flag per row (null or non-finite: invalid).
fn as_f32(c: &dyn Array) -> Result<Vec<Option<f32>>> {
    // The common case without nulls: no per-value branching on validity.
    if c.null_count() == 0 {
        if let DataType::Float32 = c.data_type() {
            return Ok(c
                .as_primitive::<Float32Type>()
                .values()
                .iter()
                .map(|&v| v.is_finite().then_some(v))
                .collect());
        }
    }
    macro_rules! prim {
        ($t:ty) => {
            c.as_primitive::<$t>()
                .iter()
                .map(|v| v.map(|v| v as f32).filter(|v| v.is_finite()))
                .collect()
        };
    }
    Ok(match c.data_type() {
        DataType::Float32 => prim!(Float32Type),
        DataType::Float64 => prim!(Float64Type),
        DataType::Float16 => c
            .as_primitive::<Float16Type>()
            .iter()
            .map(|v| v.map(f32::from).filter(|v| v.is_finite()))
            .collect(),
        DataType::Int8 => prim!(Int8Type),
        DataType::Int16 => prim!(Int16Type),
        DataType::Int32 => prim!(Int32Type),
        DataType::Int64 => prim!(Int64Type),
        DataType::UInt8 => prim!(UInt8Type),
        DataType::UInt16 => prim!(UInt16Type),
        DataType::UInt32 => prim!(UInt32Type),
        DataType::UInt64 => prim!(UInt64Type),
        t => bail!("a column of type {t} cannot hold model features"),
    })
}

impl Reader for ParquetReader {
    fn next_chunk(&mut self, rows: usize) -> Result<Option<Chunk>> {
        let (batch, offset) = match self.pending.take() {
            Some(p) => p,
            None => match self.batches.next() {
                None => return Ok(None),
                Some(b) => (b?, 0),
            },
        };
        let take = rows.min(batch.num_rows() - offset);
        let part = batch.slice(offset, take);
        if offset + take < batch.num_rows() {
            self.pending = Some((batch, offset + take));
        }
        let columns = self
            .features
            .iter()
            .map(|f| {
                let c = part.column_by_name(f).expect("projected");
                as_f32(c.as_ref()).with_context(|| format!("column {f:?}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let d = columns.len();
        let first = self.input_row(self.consumed);
        let contiguous = self.input_row(self.consumed + take as u64 - 1) == first + take as u64 - 1;
        let mut chunk = Chunk {
            rows: Vec::with_capacity(take),
            values: Vec::with_capacity(take * d),
            kept: Kept::None,
            bad: Vec::new(),
            progress: take as u64,
        };
        let mut good = Vec::with_capacity(take);
        for r in 0..take {
            let row = if contiguous {
                first + r as u64
            } else {
                self.input_row(self.consumed + r as u64)
            };
            match columns.iter().position(|c| c[r].is_none()) {
                Some(j) => {
                    let c = part.column_by_name(&self.features[j]).expect("projected");
                    let what = if c.is_null(r) {
                        "null"
                    } else {
                        "not a finite number"
                    };
                    chunk.bad.push(BadRow {
                        row,
                        why: format!("column {:?} is {what}", self.features[j]),
                    });
                    good.push(false);
                }
                None => {
                    chunk.rows.push(row);
                    chunk
                        .values
                        .extend(columns.iter().map(|c| c[r].expect("valid")));
                    good.push(true);
                }
            }
        }
        self.consumed += take as u64;
        if !self.keep.is_empty() {
            let mask = BooleanArray::from(good);
            let kept = self
                .keep
                .iter()
                .map(|k| {
                    let c = part.column_by_name(k).expect("projected");
                    Ok(arrow_select::filter::filter(c.as_ref(), &mask)?)
                })
                .collect::<Result<Vec<ArrayRef>>>()?;
            chunk.kept = Kept::Arrow(kept);
        }
        Ok(Some(chunk))
    }

    fn total(&self) -> u64 {
        self.total
    }

    fn kept_schema(&self) -> Option<SchemaRef> {
        Some(self.kept_schema.clone())
    }
}

/// Writes scores as Parquet (snappy pages, one row group per 128k rows or so).
pub struct ParquetWriter {
    writer: ArrowWriter<File>,
    schema: SchemaRef,
    features: Vec<String>,
    contributions: bool,
}

impl ParquetWriter {
    /// Creates `path` with the output schema (`kept`: the kept columns' types).
    pub fn create(path: &Path, layout: &Layout, kept: Option<SchemaRef>) -> Result<ParquetWriter> {
        let mut fields = vec![Field::new("row", DataType::UInt64, false)];
        match &kept {
            Some(k) => fields.extend(k.fields().iter().map(|f| f.as_ref().clone())),
            None => fields.extend(
                layout
                    .keep
                    .iter()
                    .map(|k| Field::new(k, DataType::Utf8, true)),
            ),
        }
        fields.push(Field::new("log_prob", DataType::Float32, false));
        fields.push(Field::new("tail_probability", DataType::Float64, false));
        fields.push(Field::new("outlier", DataType::Boolean, false));
        if layout.contributions {
            fields.push(Field::new("most_surprising", DataType::Utf8, false));
            for f in &layout.features {
                fields.push(Field::new(
                    format!("contribution_{f}"),
                    DataType::Float32,
                    false,
                ));
            }
        }
        let schema = Arc::new(Schema::new(fields));
        let file =
            File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
        // Dictionaries pay for the feature names only; for scores they cost time and fall
        // back to plain encoding anyway.
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(131_072))
            .set_dictionary_enabled(false)
            .set_column_dictionary_enabled(ColumnPath::from("most_surprising"), true)
            .build();
        Ok(ParquetWriter {
            writer: ArrowWriter::try_new(file, schema.clone(), Some(props))?,
            schema,
            features: layout.features.clone(),
            contributions: layout.contributions,
        })
    }
}

impl Writer for ParquetWriter {
    fn write(&mut self, s: Scored) -> Result<()> {
        let n = s.chunk.rows.len();
        let d = self.features.len();
        let mut columns: Vec<ArrayRef> = vec![Arc::new(UInt64Array::from(s.chunk.rows))];
        match s.chunk.kept {
            Kept::Arrow(k) => columns.extend(k),
            Kept::Text(t) => {
                let width = t.len() / n.max(1);
                for j in 0..width {
                    columns.push(Arc::new(StringArray::from_iter_values(
                        (0..n).map(|i| t[i * width + j].as_str()),
                    )));
                }
            }
            Kept::None => {}
        }
        columns.push(Arc::new(Float32Array::from(s.log_prob)));
        columns.push(Arc::new(Float64Array::from(s.tail_probability)));
        columns.push(Arc::new(BooleanArray::from(s.outlier)));
        if let (true, Some(t)) = (self.contributions, &s.terms) {
            columns.push(Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| top_feature(&t[i * d..(i + 1) * d], &self.features)),
            )));
            for j in 0..d {
                columns.push(Arc::new(Float32Array::from_iter_values(
                    (0..n).map(|i| t[i * d + j]),
                )));
            }
        }
        let batch = RecordBatch::try_new(self.schema.clone(), columns)?;
        self.writer.write(&batch)?;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        self.writer.close()?;
        Ok(())
    }
}
