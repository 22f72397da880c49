//! PNG plots of a run: training and validation NLL curves, and for 2-D data the learned
//! density as a heatmap beside the data and the model's samples.
//!
//! Text uses DejaVu Sans from the system fonts when present; without it the plots are
//! drawn without labels rather than not at all.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::train::Record;

const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers a font once; false when none is available.
fn have_font() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        FONT_PATHS.iter().any(|p| match std::fs::read(p) {
            Ok(bytes) => {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
            }
            Err(_) => false,
        })
    })
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("plot: {e}")
}

/// `loss.png`: the training loss (per logged step) and the validation loss against steps;
/// `what` names the loss (`NLL`, `reverse KL`).
pub fn loss_curves(history: &[Record], what: &str, path: &Path) -> Result<()> {
    let train: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|r| match r {
            Record::Train { step, loss, .. } => Some((*step as f64, *loss)),
            _ => None,
        })
        .collect();
    let val: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|r| match r {
            Record::Val { step, loss, .. } => Some((*step as f64, *loss)),
            _ => None,
        })
        .collect();
    let all: Vec<f64> = train
        .iter()
        .chain(&val)
        .map(|p| p.1)
        .filter(|v| v.is_finite())
        .collect();
    if all.is_empty() {
        return Ok(());
    }
    let x_max = train.iter().chain(&val).map(|p| p.0).fold(1.0, f64::max);
    // Ignore the first steps' very large losses when choosing the y range.
    let mut sorted = all.clone();
    sorted.sort_by(f64::total_cmp);
    let lo = sorted[0];
    let hi = sorted[((sorted.len() - 1) as f64 * 0.95) as usize];
    let pad = ((hi - lo) * 0.1).max(1e-3);
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let text = have_font();
    let mut builder = ChartBuilder::on(&root);
    builder
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60);
    if text {
        builder.caption(format!("{what} (nats per example)"), ("sans-serif", 22));
    }
    let mut chart = builder
        .build_cartesian_2d(0.0..x_max, (lo - pad)..(hi + pad))
        .map_err(err)?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("step").y_desc(what);
    } else {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.draw().map_err(err)?;
    let train_series = chart
        .draw_series(LineSeries::new(train, BLUE.mix(0.6)))
        .map_err(err)?;
    if text {
        train_series
            .label("train (minibatch)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    }
    let val_series = chart
        .draw_series(LineSeries::new(val.clone(), RED.stroke_width(2)).point_size(3))
        .map_err(err)?;
    if text {
        val_series
            .label("validation")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// The window shown for 2-D data: the data's 0.5–99.5 % range per axis, padded.
pub fn window(points: &[f32]) -> [(f64, f64); 2] {
    let mut out = [(0.0, 0.0); 2];
    for (axis, o) in out.iter_mut().enumerate() {
        let mut v: Vec<f64> = points
            .iter()
            .skip(axis)
            .step_by(2)
            .map(|&x| x as f64)
            .collect();
        v.sort_by(f64::total_cmp);
        let lo = v[(v.len() as f64 * 0.005) as usize];
        let hi = v[((v.len() - 1) as f64 * 0.995) as usize];
        let pad = (hi - lo) * 0.15 + 1e-3;
        *o = (lo - pad, hi + pad);
    }
    out
}

/// `density.png`: data | exp(log p) on a `res × res` grid | model samples.
/// `density` holds the grid row by row, y from top to bottom.
pub fn density_panels(
    data: &[f32],
    density: &[f32],
    res: usize,
    samples: &[f32],
    win: [(f64, f64); 2],
    path: &Path,
) -> Result<()> {
    let root = BitMapBackend::new(path, (1200, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((1, 3));
    let text = have_font();
    let titles = ["data", "model density", "model samples"];
    let (xr, yr) = (win[0].0..win[0].1, win[1].0..win[1].1);
    for (i, area) in panels.iter().enumerate() {
        let mut b = ChartBuilder::on(area);
        b.margin(10);
        if text {
            b.caption(titles[i], ("sans-serif", 20));
        }
        let mut chart = b.build_cartesian_2d(xr.clone(), yr.clone()).map_err(err)?;
        match i {
            1 => {
                let max = density.iter().cloned().fold(0f32, f32::max).max(1e-12);
                let (dx, dy) = (
                    (win[0].1 - win[0].0) / res as f64,
                    (win[1].1 - win[1].0) / res as f64,
                );
                chart
                    .draw_series((0..res * res).map(|k| {
                        let (r, c) = (k / res, k % res);
                        let x0 = win[0].0 + c as f64 * dx;
                        let y0 = win[1].1 - (r + 1) as f64 * dy;
                        let v = (density[k] / max).clamp(0.0, 1.0) as f64;
                        let color = ViridisRGB::get_color(v);
                        Rectangle::new([(x0, y0), (x0 + dx, y0 + dy)], color.filled())
                    }))
                    .map_err(err)?;
            }
            _ => {
                let pts = if i == 0 { data } else { samples };
                let color = if i == 0 {
                    BLACK.mix(0.25)
                } else {
                    BLUE.mix(0.25)
                };
                chart
                    .draw_series(
                        pts.chunks(2)
                            .take(5000)
                            .map(|p| Circle::new((p[0] as f64, p[1] as f64), 1, color.filled())),
                    )
                    .map_err(err)?;
            }
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

/// A scatter plot of 2-D points (`flowtrain sample --out samples.png`).
pub fn scatter(points: &[f32], title: &str, path: &Path) -> Result<()> {
    let win = window(points);
    let root = BitMapBackend::new(path, (600, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut b = ChartBuilder::on(&root);
    b.margin(15).x_label_area_size(30).y_label_area_size(40);
    if have_font() {
        b.caption(title, ("sans-serif", 20));
    }
    let mut chart = b
        .build_cartesian_2d(win[0].0..win[0].1, win[1].0..win[1].1)
        .map_err(err)?;
    if have_font() {
        chart.configure_mesh().draw().map_err(err)?;
    }
    chart
        .draw_series(
            points
                .chunks(2)
                .map(|p| Circle::new((p[0] as f64, p[1] as f64), 1, BLUE.mix(0.3).filled())),
        )
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
