//! Real tables shipped inside crates: wine quality (`linfa-datasets`, 1599 × 11) and
//! 8×8 handwritten digits (`smartcore`, 1797 × 64, pixel values 0–16); and the fetched
//! image sets (see [`super::images`]).

use anyhow::Result;

use super::Table;

/// The built-in table with this name, if there is one. Labels are left out: flows model
/// the features.
pub fn load(name: &str) -> Result<Option<Table>> {
    Ok(Some(match name {
        "wine" => {
            let ds = linfa_datasets::winequality();
            let records = ds.records();
            let names = ds.feature_names().to_vec();
            Table::new(names, records.iter().map(|&v| v as f32).collect())?
        }
        "digits" => {
            let ds = smartcore::dataset::digits::load_dataset();
            let names = (0..ds.num_features)
                .map(|i| format!("pixel_{}_{}", i / 8, i % 8))
                .collect();
            Table::new(names, ds.data)?
        }
        "mnist" => super::images::mnist()?,
        "fashion_mnist" => {
            let (mut train, test) = super::images::fashion_mnist()?;
            train.values.extend(test.values);
            train
        }
        _ => return Ok(None),
    }))
}

/// The label of a built-in table, row for row with [`load`] (a context column for
/// conditional flows): its name and values.
pub fn label(name: &str) -> Result<Option<(&'static str, Vec<f64>)>> {
    Ok(match name {
        "wine" => {
            let ds = linfa_datasets::winequality();
            Some(("quality", ds.targets().iter().map(|&v| v as f64).collect()))
        }
        "digits" => {
            let ds = smartcore::dataset::digits::load_dataset();
            Some(("label", ds.target.iter().map(|&v| v as f64).collect()))
        }
        "mnist" => Some(("label", super::images::mnist_labels()?)),
        "fashion_mnist" => {
            let (mut train, test) = super::images::fashion_mnist_labels()?;
            train.extend(test);
            Some(("label", train))
        }
        _ => None,
    })
}
