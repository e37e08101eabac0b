//! What a run leaves behind: the table on stdout, a JSON report and an SVG chart (written here,
//! no external service): throughput and p99 latency over time, one line per series (a region
//! of a scenario, or a system of a comparison).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::load::{RunFigures, Second};

/// One line of a chart.
pub struct Series<'a> {
    pub name: String,
    pub timeline: &'a [Second],
}

const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];
const WIDTH: f64 = 960.0;
const PANEL_HEIGHT: f64 = 260.0;
const MARGIN_LEFT: f64 = 80.0;
const MARGIN_RIGHT: f64 = 200.0;
const MARGIN_TOP: f64 = 50.0;
const PANEL_GAP: f64 = 70.0;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" upper bound for an axis (1, 2 or 5 times a power of ten).
fn nice_ceiling(value: f64) -> f64 {
    if value <= 0.0 {
        return 1.0;
    }
    let power = 10f64.powf(value.log10().floor());
    for step in [1.0, 2.0, 5.0, 10.0] {
        if value <= step * power {
            return step * power;
        }
    }
    10.0 * power
}

fn panel(
    svg: &mut String,
    top: f64,
    title: &str,
    unit: &str,
    series: &[Series<'_>],
    value: impl Fn(&Second) -> f64,
) {
    let plot_width = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let seconds = series
        .iter()
        .map(|s| s.timeline.len())
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let highest = series
        .iter()
        .flat_map(|s| s.timeline.iter().map(&value))
        .fold(0.0, f64::max);
    let ceiling = nice_ceiling(highest);
    let x = |t: f64| MARGIN_LEFT + plot_width * (t / seconds);
    let y = |v: f64| top + PANEL_HEIGHT * (1.0 - v / ceiling);
    let _ = writeln!(
        svg,
        r#"<text x="{MARGIN_LEFT}" y="{}" font-size="14" font-weight="bold">{}</text>"#,
        top - 12.0,
        escape(title)
    );
    let _ = writeln!(
        svg,
        "<rect x=\"{MARGIN_LEFT}\" y=\"{top}\" width=\"{plot_width}\" height=\"{PANEL_HEIGHT}\" fill=\"none\" stroke=\"#888\"/>"
    );
    for tick in 0..=4 {
        let v = ceiling * tick as f64 / 4.0;
        let _ = writeln!(
            svg,
            "<line x1=\"{MARGIN_LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{} {unit}</text>",
            MARGIN_LEFT + plot_width,
            MARGIN_LEFT - 6.0,
            y(v) + 4.0,
            if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") },
            y = y(v),
        );
    }
    let ticks = (seconds as u64).clamp(1, 10);
    for tick in 0..=ticks {
        let t = seconds * tick as f64 / ticks as f64;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{t:.0} s</text>"#,
            x(t),
            top + PANEL_HEIGHT + 16.0
        );
    }
    for (index, series) in series.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let points: Vec<String> = series
            .timeline
            .iter()
            .map(|s| format!("{:.1},{:.1}", x(s.t_s as f64 - 0.5), y(value(s))))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        let legend_y = top + 16.0 + 18.0 * index as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{:.1}" x2="{:.1}" y1="{legend_y:.1}" y2="{legend_y:.1}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}" font-size="12">{}</text>"#,
            WIDTH - MARGIN_RIGHT + 10.0,
            WIDTH - MARGIN_RIGHT + 30.0,
            WIDTH - MARGIN_RIGHT + 36.0,
            legend_y + 4.0,
            escape(&series.name)
        );
    }
}

/// An SVG of throughput (answers per second) and p99 latency per second, one line per series.
pub fn chart(title: &str, series: &[Series<'_>]) -> String {
    let height = MARGIN_TOP + 2.0 * PANEL_HEIGHT + PANEL_GAP + 40.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{MARGIN_LEFT}" y="20" font-size="16">{}</text>"#,
        escape(title)
    );
    panel(
        &mut svg,
        MARGIN_TOP,
        "throughput (allowed + refused answers per second)",
        "/s",
        series,
        |s| (s.ok + s.refused) as f64,
    );
    panel(
        &mut svg,
        MARGIN_TOP + PANEL_HEIGHT + PANEL_GAP,
        "p99 latency from the intended send time (per second)",
        "ms",
        series,
        |s| s.p99_us as f64 / 1000.0,
    );
    svg.push_str("</svg>\n");
    svg
}

pub fn write_json<T: Serialize>(path: &Path, report: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    std::fs::write(path, text + "\n")
        .with_context(|| format!("--report: writing {}", path.display()))?;
    eprintln!("report written to {}", path.display());
    Ok(())
}

pub fn write_chart(path: &Path, svg: &str) -> anyhow::Result<()> {
    std::fs::write(path, svg).with_context(|| format!("--chart: writing {}", path.display()))?;
    eprintln!("chart written to {}", path.display());
    Ok(())
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// The per-region table of one run.
pub fn print_regions(figures: &RunFigures) {
    println!(
        "{:<14} {:>9} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "region", "ok", "refused", "errors", "ok/s", "p50 ms", "p99 ms", "p999 ms"
    );
    for region in &figures.regions {
        println!(
            "{:<14} {:>9} {:>9} {:>7} {:>9.0} {:>9} {:>9} {:>9}",
            region.region,
            region.ok,
            region.refused,
            region.errors,
            region.ops_per_s,
            ms(region.latency.p50_us),
            ms(region.latency.p99_us),
            ms(region.latency.p999_us)
        );
        for (code, count) in &region.refusals {
            println!("{:<14}   refused {code}: {count}", "");
        }
        for (code, count) in &region.errors_by_code {
            println!("{:<14}   error {code}: {count}", "");
        }
    }
    if figures.unsent > 0 {
        println!(
            "{} of {} scheduled requests could not be sent in time (in-flight limit reached): the system did not keep up with the offered rate",
            figures.unsent, figures.scheduled
        );
    }
}

/// One row of the comparison table.
#[derive(Clone, Debug, Serialize)]
pub struct CompareRow {
    pub system: String,
    pub offered_per_s: f64,
    pub ops_per_s: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub refused: u64,
    pub errors: u64,
    pub unsent: u64,
    /// Throughput relative to the edge in cached mode.
    pub throughput_vs_cached: f64,
    /// p99 latency relative to the edge in cached mode.
    pub p99_vs_cached: f64,
    pub audit: String,
}

pub fn print_compare(rows: &[CompareRow]) {
    println!(
        "{:<34} {:>9} {:>9} {:>8} {:>8} {:>8} {:>7} {:>7} {:>9} {:>9}  audit",
        "system",
        "offered/s",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "errors",
        "unsent",
        "ops ratio",
        "p99 ratio"
    );
    for row in rows {
        println!(
            "{:<34} {:>9.0} {:>9.0} {:>8} {:>8} {:>8} {:>7} {:>7} {:>9.3} {:>9.2}  {}",
            row.system,
            row.offered_per_s,
            row.ops_per_s,
            ms(row.p50_us),
            ms(row.p99_us),
            ms(row.p999_us),
            row.errors,
            row.unsent,
            row.throughput_vs_cached,
            row.p99_vs_cached,
            row.audit
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_is_svg_with_one_line_per_series() {
        let timeline = vec![
            Second {
                t_s: 1,
                ok: 10,
                refused: 1,
                errors: 0,
                p50_us: 100,
                p99_us: 900,
            },
            Second {
                t_s: 2,
                ok: 12,
                refused: 0,
                errors: 0,
                p50_us: 110,
                p99_us: 1_200,
            },
        ];
        let svg = chart(
            "a <run>",
            &[
                Series {
                    name: "eu".into(),
                    timeline: &timeline,
                },
                Series {
                    name: "us".into(),
                    timeline: &timeline,
                },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(
            svg.matches("<polyline").count(),
            4,
            "two panels, two series"
        );
        assert!(svg.contains("a &lt;run&gt;"));
        assert_eq!(nice_ceiling(730.0), 1000.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(1.5), 2.0);
    }
}
