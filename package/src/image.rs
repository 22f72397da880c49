//! Sample grids as PNG: the pictures `/sample` (`"format": "png"`) and `flowtrain sample
//! --out grid.png` return for image models, from one implementation.

/// `[min, max]` of `values` (`[+∞, −∞]` when empty).
pub fn value_range(values: &[f32]) -> [f64; 2] {
    values
        .iter()
        .fold([f64::INFINITY, f64::NEG_INFINITY], |[lo, hi], &v| {
            [lo.min(v as f64), hi.max(v as f64)]
        })
}

/// Encodes `values` (row-major `[N, C, H, W]`, C = 1 grey or 3 RGB) as one PNG: the images in
/// a grid of `columns` (default: a near-square grid), each pixel value mapped linearly from
/// `range` (default: the values' own range; a manifest's `domain.pixel_range`) to 0–255 and
/// clamped, each image scaled up by whole pixels to at least 56 px, with a 2-px white gutter.
pub fn grid_png(
    values: &[f32],
    event_shape: &[usize],
    range: Option<[f64; 2]>,
    columns: Option<usize>,
) -> Result<Vec<u8>, String> {
    let range = range.unwrap_or_else(|| value_range(values));
    let [c, h, w] = event_shape else {
        return Err(format!(
            "a picture needs [C, H, W] images, not {event_shape:?}"
        ));
    };
    let (c, h, w) = (*c, *h, *w);
    if c != 1 && c != 3 {
        return Err(format!("a picture needs 1 or 3 channels, not {c}"));
    }
    let size = c * h * w;
    if size == 0 || values.is_empty() || !values.len().is_multiple_of(size) {
        return Err("no whole images to draw".into());
    }
    let n = values.len() / size;
    let cols = columns
        .unwrap_or_else(|| (n as f64).sqrt().ceil() as usize)
        .clamp(1, n);
    let rows = n.div_ceil(cols);
    let scale = 56usize.div_ceil(h.max(w)).max(1);
    let gutter = 2;
    let cell_h = h * scale + gutter;
    let cell_w = w * scale + gutter;
    let (img_h, img_w) = (rows * cell_h + gutter, cols * cell_w + gutter);
    let mut rgb = vec![255u8; img_h * img_w * 3];
    let span = (range[1] - range[0]).max(f64::MIN_POSITIVE);
    let to_byte = |v: f32| (((v as f64 - range[0]) / span).clamp(0.0, 1.0) * 255.0).round() as u8;
    for k in 0..n {
        let (top, left) = (gutter + (k / cols) * cell_h, gutter + (k % cols) * cell_w);
        let img = &values[k * size..(k + 1) * size];
        for y in 0..h * scale {
            for x in 0..w * scale {
                let (sy, sx) = (y / scale, x / scale);
                let at = ((top + y) * img_w + left + x) * 3;
                for ch in 0..3 {
                    let src = if c == 1 { 0 } else { ch };
                    rgb[at + ch] = to_byte(img[(src * h + sy) * w + sx]);
                }
            }
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, img_w as u32, img_h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(|e| e.to_string())?;
        writer.write_image_data(&rgb).map_err(|e| e.to_string())?;
    }
    Ok(out)
}
