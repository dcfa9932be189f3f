//! The storm's plot: nodes under recovery over time against the budget line (PNG, plotters'
//! bitmap backend; text drawn with a TrueType font from the system, DejaVu Sans by default or
//! `BENCH_FONT`).

use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

const FONT_CANDIDATES: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn load_font() -> anyhow::Result<()> {
    let path = std::env::var("BENCH_FONT").ok().or_else(|| {
        FONT_CANDIDATES
            .iter()
            .find(|p| Path::new(p).exists())
            .map(|p| p.to_string())
    });
    let path = path.context(
        "no TrueType font for the plot's text: install fonts-dejavu-core or set BENCH_FONT",
    )?;
    let bytes: &'static [u8] = Box::leak(
        std::fs::read(&path)
            .with_context(|| format!("read {path}"))?
            .into_boxed_slice(),
    );
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{path} is not a usable font"))?;
    Ok(())
}

/// Draws `points` (seconds since the storm began, nodes under recovery; a step function) and
/// the budget line into `out`.
pub fn nodes_under_recovery(
    out: &Path,
    points: &[(f64, usize)],
    budget: usize,
    wedges: usize,
    total_s: f64,
) -> anyhow::Result<()> {
    load_font()?;
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d)?;
    }
    let x_max = total_s.max(points.last().map(|p| p.0).unwrap_or(1.0)) * 1.03 + 0.1;
    let y_max = (points.iter().map(|p| p.1).max().unwrap_or(0).max(budget) as f64 * 1.25).ceil();
    let root = BitMapBackend::new(out, (1000, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("unwedge storm: {wedges} simultaneous wedges, maxUnavailable {budget}"),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the first uevent")
        .y_desc("nodes under recovery")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut steps: Vec<(f64, f64)> = vec![];
    let mut prev = 0.0;
    for (t, c) in points {
        steps.push((*t, prev));
        steps.push((*t, *c as f64));
        prev = *c as f64;
    }
    steps.push((x_max, prev));
    chart
        .draw_series(LineSeries::new(steps, BLUE.stroke_width(2)))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .label("nodes under recovery (watch of every GpuWedge and Node)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, budget as f64), (x_max, budget as f64)],
            RED.stroke_width(2),
        ))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .label(format!("budget (maxUnavailable {budget})"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png() {
        if !FONT_CANDIDATES.iter().any(|p| Path::new(p).exists()) {
            eprintln!("no font on this machine; skipping");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("p.png");
        nodes_under_recovery(&out, &[(0.1, 3), (0.5, 5), (2.0, 2), (3.0, 0)], 5, 20, 3.0).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 5_000, "a plot with text and lines");
    }
}
