//! `--plot FILE.svg`: each client's progress over time (requests answered,
//! or counter values echoed), a run with Shepherd beside the same run with
//! CRIU alone, the freeze shaded. The back-off of CRIU alone shows as a
//! flat line that goes on well past the shaded freeze.
use crate::scenario::Outcome;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

/// One panel: a label and the run it draws.
pub struct Panel<'a> {
    pub label: String,
    pub outcome: &'a Outcome,
}

/// Seconds shown before the freeze starts.
const BEFORE: f64 = 0.5;
/// Seconds shown after the freeze ends.
const AFTER: f64 = 1.5;

/// Writes an SVG of `rows` of panels (each row shares its time axis: the
/// seconds since its freeze started), titled `title`; `unit` names the
/// y axis.
pub fn write_svg(path: &Path, title: &str, unit: &str, rows: &[Vec<Panel<'_>>]) -> Result<()> {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let size = (520 * cols as u32, 60 + 300 * rows.len().max(1) as u32);
    let root = SVGBackend::new(path, size).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| anyhow!("drawing {}: {e:?}", path.display());
    root.fill(&WHITE).map_err(e)?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|x| anyhow!("drawing {}: {x:?}", path.display()))?;
    let areas = root.split_evenly((rows.len().max(1), cols));
    for (r, row) in rows.iter().enumerate() {
        // One time axis per row: long enough for its slowest run.
        let span = row
            .iter()
            .map(|p| {
                let (f0, f1) = p.outcome.freeze_window;
                (f1 - f0) + p.outcome.longest_pause.as_secs_f64().max(f1 - f0)
            })
            .fold(0.0, f64::max)
            + AFTER;
        for (c, panel) in row.iter().enumerate() {
            draw_panel(&areas[r * cols + c], panel, unit, span)
                .map_err(|x| anyhow!("drawing {}: {x}", path.display()))?;
        }
    }
    root.present()
        .map_err(|x| anyhow!("writing {}: {x:?}", path.display()))?;
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    panel: &Panel<'_>,
    unit: &str,
    span: f64,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let o = panel.outcome;
    let (f0, f1) = o.freeze_window;
    // Each client's cumulative count, from the first answer shown.
    let lines: Vec<Vec<(f64, f64)>> = o
        .progress
        .iter()
        .map(|times| {
            times
                .iter()
                .map(|t| t - f0)
                .filter(|t| (-BEFORE..=span).contains(t))
                .enumerate()
                .map(|(i, t)| (t, (i + 1) as f64))
                .collect()
        })
        .collect();
    let y_max = lines
        .iter()
        .filter_map(|l| l.last().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.label, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(-BEFORE..span, 0.0..y_max)
        .map_err(|e| format!("{e:?}"))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the freeze began")
        .y_desc(unit)
        .light_line_style(WHITE)
        .draw()
        .map_err(|e| format!("{e:?}"))?;
    chart
        .draw_series(std::iter::once(Rectangle::new(
            [(0.0, 0.0), (f1 - f0, y_max)],
            RGBColor(200, 200, 230).mix(0.6).filled(),
        )))
        .map_err(|e| format!("{e:?}"))?
        .label("freeze (checkpoint → restore)")
        .legend(|(x, y)| {
            Rectangle::new(
                [(x, y - 5), (x + 12, y + 5)],
                RGBColor(200, 200, 230).filled(),
            )
        });
    for (i, l) in lines.into_iter().enumerate() {
        let color = Palette99::pick(i).stroke_width(2);
        chart
            .draw_series(LineSeries::new(l, color))
            .map_err(|e| format!("{e:?}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| format!("{e:?}"))?;
    Ok(())
}
