//! Usage charts as inline SVG, drawn on the server: stacked bars, one per time bucket, one
//! colour per series (a feature or an actor). Amounts are plotted as `f64`; only the picture
//! uses them, every number shown as text is the exact decimal.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::html::{esc, millis};

/// Series drawn at most; the smallest of the rest are summed into "other".
pub const SERIES_MAX: usize = 8;
/// Buckets drawn at most (a 31-day month of hours is 744).
pub const BUCKETS_MAX: usize = 800;

const WIDTH: f64 = 560.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 56.0;
const BOTTOM: f64 = 24.0;
const TOP: f64 = 10.0;
const COLOURS: [&str; SERIES_MAX + 1] = [
    "#2f6fe0", "#e0782f", "#3aa55c", "#c43d3d", "#8a5cd6", "#1a9fb0", "#d6a21a", "#d65ca8",
    "#8d99ae",
];

/// Usage per series and bucket start (milliseconds).
#[derive(Default)]
pub struct Usage {
    pub series: BTreeMap<String, BTreeMap<i64, f64>>,
}

impl Usage {
    pub fn add(&mut self, series: &str, bucket_ms: i64, credits: f64) {
        *self
            .series
            .entry(series.to_owned())
            .or_default()
            .entry(bucket_ms)
            .or_default() += credits;
    }

    /// The biggest series by total, the rest folded into "other".
    fn top(&self) -> Vec<(String, BTreeMap<i64, f64>)> {
        let mut all: Vec<(String, BTreeMap<i64, f64>)> = self
            .series
            .iter()
            .map(|(name, points)| (name.clone(), points.clone()))
            .collect();
        all.sort_by(|a, b| total(&b.1).total_cmp(&total(&a.1)).then(a.0.cmp(&b.0)));
        if all.len() > SERIES_MAX {
            let rest = all.split_off(SERIES_MAX - 1);
            let mut other = BTreeMap::new();
            for (_, points) in rest {
                for (bucket, credits) in points {
                    *other.entry(bucket).or_insert(0.0) += credits;
                }
            }
            all.push(("other".to_owned(), other));
        }
        all
    }
}

fn total(points: &BTreeMap<i64, f64>) -> f64 {
    points.values().sum()
}

/// The chart of `usage` over `buckets` (their start instants, oldest first), with a legend.
pub fn stacked_bars(id: &str, title: &str, buckets: &[i64], usage: &Usage) -> String {
    let buckets = &buckets[..buckets.len().min(BUCKETS_MAX)];
    let series = usage.top();
    let peak = buckets
        .iter()
        .map(|b| series.iter().filter_map(|(_, p)| p.get(b)).sum::<f64>())
        .fold(0.0_f64, f64::max);
    let scale = if peak > 0.0 {
        (HEIGHT - TOP - BOTTOM) / peak
    } else {
        0.0
    };
    let slot = (WIDTH - LEFT - 8.0) / buckets.len().max(1) as f64;
    let bar = (slot * 0.8).max(1.0);
    let mut svg = format!(
        "<figure><figcaption><b>{}</b></figcaption><svg id=\"{}\" role=\"img\" \
         aria-label=\"{}\" width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" \
         xmlns=\"http://www.w3.org/2000/svg\" font-size=\"10\" font-family=\"sans-serif\">",
        esc(title),
        esc(id),
        esc(title)
    );
    let base = HEIGHT - BOTTOM;
    let _ = write!(
        svg,
        "<line x1=\"{LEFT}\" y1=\"{base}\" x2=\"{WIDTH}\" y2=\"{base}\" stroke=\"#999\"/>\
         <line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{base}\" stroke=\"#999\"/>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\
         <text x=\"{}\" y=\"{base}\" text-anchor=\"end\">0</text>",
        LEFT - 4.0,
        TOP + 8.0,
        esc(&format_peak(peak)),
        LEFT - 4.0,
    );
    for (index, bucket) in buckets.iter().enumerate() {
        let x = LEFT + 4.0 + index as f64 * slot;
        let mut y = base;
        for (colour, (name, points)) in COLOURS.iter().zip(&series) {
            let Some(credits) = points.get(bucket) else {
                continue;
            };
            let h = credits * scale;
            y -= h;
            let _ = write!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar:.1}\" height=\"{h:.1}\" fill=\"{colour}\">\
                 <title>{} · {} · {}</title></rect>",
                esc(name),
                esc(&millis(*bucket)),
                esc(&format_peak(*credits))
            );
        }
    }
    if let (Some(first), Some(last)) = (buckets.first(), buckets.last()) {
        let _ = write!(
            svg,
            "<text x=\"{LEFT}\" y=\"{}\">{}</text><text x=\"{WIDTH}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            HEIGHT - 6.0,
            esc(&millis(*first)),
            HEIGHT - 6.0,
            esc(&millis(*last))
        );
    }
    if series.is_empty() {
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#667085\">no usage in this window</text>",
            (LEFT + WIDTH) / 2.0,
            HEIGHT / 2.0
        );
    }
    svg.push_str("</svg><div class=\"muted\">");
    for (colour, (name, points)) in COLOURS.iter().zip(&series) {
        let _ = write!(
            svg,
            "<span style=\"color:{colour}\">■</span> {} ({}) &nbsp; ",
            esc(name),
            esc(&format_peak(total(points)))
        );
    }
    svg.push_str("</div></figure>");
    svg
}

fn format_peak(value: f64) -> String {
    let text = format!("{value:.6}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    text.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_beyond_the_limit_fold_into_other_and_names_are_escaped() {
        let mut usage = Usage::default();
        for index in 0..12 {
            usage.add(&format!("f{index}<"), 0, f64::from(index + 1));
        }
        let top = usage.top();
        assert_eq!(top.len(), SERIES_MAX);
        assert_eq!(top[0].0, "f11<");
        assert_eq!(top.last().unwrap().0, "other");
        let svg = stacked_bars("c", "t", &[0, 3_600_000], &usage);
        assert!(svg.contains("f11&lt;") && !svg.contains("f11<"));
        assert_eq!(svg.matches("<rect").count(), SERIES_MAX);
    }
}
