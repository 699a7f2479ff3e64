//! SVG plots of the results: handshakes per second against concurrency, latency distributions,
//! and the slow token's probe latencies. Text is left to the SVG viewer's fonts, so rendering
//! needs no font files on this machine.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use crate::results::{Config, Results, SlowResults, Summary};
use crate::setup::KeyType;

const SIZE: (u32, u32) = (760, 460);

/// The colour of each configuration, the same in every plot.
fn colour(config: Config, default_pool: usize) -> RGBColor {
    match config {
        Config::RawSign => RGBColor(120, 120, 120),
        Config::InMemory => RGBColor(31, 119, 180),
        Config::Direct => RGBColor(44, 160, 44),
        Config::Hsm { verify: false, .. } => RGBColor(255, 127, 14),
        Config::Hsm { pool, .. } if pool == default_pool => RGBColor(214, 39, 40),
        Config::Hsm { pool: 1, .. } => RGBColor(148, 103, 189),
        Config::Hsm { .. } => RGBColor(140, 86, 75),
    }
}

/// The configurations drawn: the references, rustls-hsm at its default pool size with and
/// without verification, and at pool size 1.
pub(crate) fn drawn(results: &Results) -> Vec<Config> {
    let default_pool = results.meta.default_pool;
    let mut configs = vec![Config::InMemory, Config::Direct];
    for config in [
        Config::Hsm {
            pool: default_pool,
            verify: true,
        },
        Config::Hsm {
            pool: default_pool,
            verify: false,
        },
        Config::Hsm {
            pool: 1,
            verify: true,
        },
    ] {
        if results
            .summaries
            .iter()
            .any(|s| s.config == config)
            && !configs.contains(&config)
        {
            configs.push(config);
        }
    }
    configs
}

/// Handshakes per second against concurrency for one key type, with each point's spread over
/// the rounds as a whisker.
pub(crate) fn throughput(path: &Path, results: &Results, key: KeyType) -> anyhow::Result<()> {
    let levels = &results.meta.concurrency;
    let configs = drawn(results);
    let series: Vec<(Config, Vec<&Summary>)> = configs
        .iter()
        .map(|&config| {
            let points = levels
                .iter()
                .filter_map(|&c| results.get(key, c, config))
                .collect();
            (config, points)
        })
        .collect();
    let top = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|s| s.rate.max))
        .fold(1.0, f64::max)
        * 1.15;
    let index = |c: usize| {
        levels
            .iter()
            .position(|&l| l == c)
            .unwrap_or(0) as f64
    };

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{}: full TLS 1.3 handshakes per second", key.title()),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.3f64..(levels.len() as f64 - 0.7), 0f64..top)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_labels(levels.len())
        .x_label_formatter(&|x| {
            levels
                .get(x.round().max(0.0) as usize)
                .map_or_else(String::new, ToString::to_string)
        })
        .x_desc("concurrent connections")
        .y_desc("handshakes/s")
        .draw()
        .map_err(plot_error)?;
    let default_pool = results.meta.default_pool;
    for (config, points) in &series {
        let style = colour(*config, default_pool).stroke_width(2);
        let line: Vec<(f64, f64)> = points
            .iter()
            .map(|s| (index(s.concurrency), s.rate.median))
            .collect();
        chart
            .draw_series(LineSeries::new(line.clone(), style))
            .map_err(plot_error)?
            .label(config.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        chart
            .draw_series(
                line.iter()
                    .map(|&p| Circle::new(p, 3, style.filled())),
            )
            .map_err(plot_error)?;
        chart
            .draw_series(points.iter().map(|s| {
                let x = index(s.concurrency);
                PathElement::new(vec![(x, s.rate.min), (x, s.rate.max)], style)
            }))
            .map_err(plot_error)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

/// Latency distributions for one key type, one panel per concurrency.
pub(crate) fn latency(path: &Path, results: &Results, key: KeyType) -> anyhow::Result<()> {
    let levels = &results.meta.concurrency;
    let configs = drawn(results);
    let root = SVGBackend::new(path, (SIZE.0, SIZE.1 * 3 / 2)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let root = root
        .titled(
            &format!("{}: handshake latency distribution", key.title()),
            ("sans-serif", 20),
        )
        .map_err(plot_error)?;
    let columns = 2;
    let rows = levels.len().div_ceil(columns).max(1);
    let panels = root.split_evenly((rows, columns));
    for (panel, &concurrency) in panels.iter().zip(levels) {
        let curves: Vec<(Config, &Summary)> = configs
            .iter()
            .filter_map(|&config| {
                results
                    .get(key, concurrency, config)
                    .map(|s| (config, s))
            })
            .collect();
        let top = curves
            .iter()
            .map(|(_, s)| s.latency_us.p999 as f64 / 1000.0)
            .fold(0.1, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("concurrency {concurrency}"), ("sans-serif", 15))
            .margin(8)
            .margin_right(30)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..3f64, 0f64..top)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_labels(4)
            .x_label_formatter(&nines_label)
            .x_desc("percentile")
            .y_desc("ms")
            .draw()
            .map_err(plot_error)?;
        for (config, summary) in curves {
            let style = colour(config, results.meta.default_pool).stroke_width(2);
            let points = summary
                .curve
                .iter()
                .map(|&(q, us)| (nines(q), us as f64 / 1000.0));
            chart
                .draw_series(LineSeries::new(points, style))
                .map_err(plot_error)?
                .label(config.to_string())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 11))
            .draw()
            .map_err(plot_error)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

/// The probe's request latency on an open connection, idle (dashed) and during the storm, for
/// each server, on a logarithmic scale.
pub(crate) fn slow(path: &Path, slow: &SlowResults) -> anyhow::Result<()> {
    let palette = [
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(31, 119, 180),
    ];
    let top = slow
        .scenarios
        .iter()
        .flat_map(|s| [s.probe_storm_us.p999, s.probe_idle_us.p999])
        .max()
        .unwrap_or(1000) as f64
        / 1000.0
        // two decades of headroom keep the legend off the curves
        * 150.0;
    let bottom = slow
        .scenarios
        .iter()
        .flat_map(|s| [s.probe_storm_us.p50, s.probe_idle_us.p50])
        .filter(|&us| us > 0)
        .min()
        .unwrap_or(100) as f64
        / 1000.0
        / 2.0;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Slow token: requests on an open connection, idle and in a handshake storm",
            ("sans-serif", 17),
        )
        .margin(12)
        .margin_right(36)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..3f64, (bottom..top.max(bottom * 10.0)).log_scale())
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_labels(4)
        .x_label_formatter(&nines_label)
        .x_desc("percentile")
        .y_desc("request latency, ms (log)")
        .draw()
        .map_err(plot_error)?;
    for (scenario, colour) in slow
        .scenarios
        .iter()
        .zip(palette.iter().cycle())
    {
        let storm = colour.stroke_width(2);
        let idle = colour.mix(0.45).stroke_width(1);
        let points = |curve: &[(f64, u64)]| -> Vec<(f64, f64)> {
            curve
                .iter()
                .map(|&(q, us)| (nines(q), (us as f64 / 1000.0).max(bottom)))
                .collect()
        };
        chart
            .draw_series(LineSeries::new(points(&scenario.probe_curve_storm), storm))
            .map_err(plot_error)?
            .label(format!("{}, storm", scenario.server))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], storm));
        chart
            .draw_series(LineSeries::new(points(&scenario.probe_curve_idle), idle))
            .map_err(plot_error)?
            .label(format!("{}, idle", scenario.server))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], idle));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 11))
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

/// A quantile as "nines": 0.9 is 1, 0.99 is 2, 0.999 is 3.
fn nines(q: f64) -> f64 {
    -(1.0 - q).max(1e-9).log10()
}

fn nines_label(x: &f64) -> String {
    let percent = 100.0 * (1.0 - 10f64.powf(-x));
    if percent < 99.5 {
        format!("{percent:.0}%")
    } else {
        format!("{percent:.1}%")
    }
}

fn plot_error<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a plot: {e:?}")
}
