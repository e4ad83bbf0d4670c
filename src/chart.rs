//! Bar and line charts as standalone SVG files (no fonts or rendering libraries needed, so they
//! are written the same way on every machine): the evaluation report's accuracy per mode, the
//! taxonomy report's share per category, and training loss curves.

use std::fmt::Write;

/// One bar: label, value, and an optional (low, high) interval drawn as an error bar.
pub struct Bar {
    pub label: String,
    pub value: f64,
    pub interval: Option<(f64, f64)>,
}

/// A vertical bar chart with values in [0, y_max], a y axis with 5 ticks, the value above each
/// bar, and the labels below.
pub fn bar_chart_svg(
    title: &str,
    y_label: &str,
    bars: &[Bar],
    y_max: f64,
    percent: bool,
) -> String {
    let (w, h) = (120.0 + 90.0 * bars.len().max(1) as f64, 360.0);
    let (left, right, top, bottom) = (70.0, 20.0, 40.0, 70.0);
    let plot_h = h - top - bottom;
    let y = |v: f64| top + plot_h * (1.0 - (v / y_max).clamp(0.0, 1.0));
    let fmt = |v: f64| {
        if percent {
            format!("{:.1}%", 100.0 * v)
        } else {
            format!("{v:.3}")
        }
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        w / 2.0,
        escape(title)
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
        top + plot_h / 2.0,
        top + plot_h / 2.0,
        escape(y_label)
    );
    for i in 0..=4 {
        let v = y_max * i as f64 / 4.0;
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy}" x2="{}" y2="{yy}" stroke="#ddd"/>"##,
            w - right
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            left - 6.0,
            yy + 4.0,
            fmt(v)
        );
    }
    let slot = (w - left - right) / bars.len().max(1) as f64;
    for (i, b) in bars.iter().enumerate() {
        let x = left + slot * i as f64 + slot * 0.2;
        let bw = slot * 0.6;
        let yy = y(b.value);
        let _ = writeln!(
            s,
            r##"<rect x="{x}" y="{yy}" width="{bw}" height="{}" fill="#4a78b5"/>"##,
            top + plot_h - yy
        );
        if let Some((lo, hi)) = b.interval {
            let cx = x + bw / 2.0;
            let (ylo, yhi) = (y(lo), y(hi));
            let _ = writeln!(
                s,
                r##"<line x1="{cx}" y1="{ylo}" x2="{cx}" y2="{yhi}" stroke="#222"/>"##
            );
            for yv in [ylo, yhi] {
                let _ = writeln!(
                    s,
                    r##"<line x1="{}" y1="{yv}" x2="{}" y2="{yv}" stroke="#222"/>"##,
                    cx - 6.0,
                    cx + 6.0
                );
            }
        }
        let label_y = b.interval.map_or(yy, |(_, hi)| y(hi).min(yy)) - 6.0;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{label_y}" text-anchor="middle">{}</text>"#,
            x + bw / 2.0,
            fmt(b.value)
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            x + bw / 2.0,
            top + plot_h + 18.0,
            escape(&b.label)
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="#222"/>"##,
        top + plot_h,
        w - right,
        top + plot_h
    );
    s.push_str("</svg>\n");
    s
}

/// One line of a line chart: (x, y) points in order, a palette index and a dash style.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub colour: usize,
    pub dashed: bool,
}

/// Ten distinguishable colours, reused cyclically.
const PALETTE: [&str; 10] = [
    "#4a78b5", "#d9822b", "#3a9a5b", "#c44e52", "#8172b2", "#937860", "#da8bc3", "#8c8c8c",
    "#ccb974", "#64b5cd",
];

/// A line chart with both axes fitted to the data (y from its minimum to its maximum, padded by
/// 5%), 5 ticks per axis and a legend on the right.
pub fn line_chart_svg(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts.filter(|p| p.0.is_finite() && p.1.is_finite()) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 == x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let (w, h) = (720.0, 400.0);
    let (left, right, top, bottom) = (70.0, 170.0, 40.0, 50.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let sx = |x: f64| left + pw * (x - x0) / (x1 - x0);
    let sy = |y: f64| top + ph * (1.0 - (y - y0) / (y1 - y0));
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        left + pw / 2.0,
        escape(title)
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
        top + ph / 2.0,
        top + ph / 2.0,
        escape(y_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        h - 10.0,
        escape(x_label)
    );
    for i in 0..=4 {
        let (yv, xv) = (
            y0 + (y1 - y0) * i as f64 / 4.0,
            x0 + (x1 - x0) * i as f64 / 4.0,
        );
        let (yy, xx) = (sy(yv), sx(xv));
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy}" x2="{}" y2="{yy}" stroke="#ddd"/>"##,
            left + pw
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{yv:.3}</text>"#,
            left - 6.0,
            yy + 4.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{xx}" y="{}" text-anchor="middle">{xv:.4}</text>"#,
            top + ph + 16.0
        );
    }
    for (i, se) in series.iter().enumerate() {
        let colour = PALETTE[se.colour % PALETTE.len()];
        let dash = if se.dashed {
            r#" stroke-dasharray="5,3""#
        } else {
            ""
        };
        let path: Vec<String> = se
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|&(x, y)| format!("{:.2},{:.2}", sx(x), sy(y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5"{dash} points="{}"/>"#,
            path.join(" ")
        );
        let ly = top + 14.0 * i as f64 + 6.0;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="1.5"{dash}/>"#,
            left + pw + 10.0,
            left + pw + 34.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">{}</text>"#,
            left + pw + 40.0,
            ly + 4.0,
            escape(&se.label)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_the_axis_and_labels_are_escaped() {
        let bars = vec![
            Bar {
                label: "base".into(),
                value: 0.25,
                interval: Some((0.2, 0.3)),
            },
            Bar {
                label: "a<b".into(),
                value: 1.0,
                interval: None,
            },
        ];
        let svg = bar_chart_svg("Accuracy", "accuracy", &bars, 1.0, true);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("25.0%") && svg.contains("100.0%"));
        assert!(svg.contains("a&lt;b") && !svg.contains("a<b"));
        // Plot height 250 from y = 40: a value of 1.0 reaches the top, 0.25 a quarter of the way up.
        assert!(svg.contains(r#"y="40" width="#), "{svg}");
        assert!(svg.contains(r#"y="227.5" width="#), "{svg}");
    }

    #[test]
    fn lines_span_the_plot_and_labels_are_escaped() {
        let series = vec![
            Series {
                label: "a<b".into(),
                points: vec![(0.0, 2.0), (1.0, 1.0), (2.0, 0.5)],
                colour: 0,
                dashed: false,
            },
            Series {
                label: "t".into(),
                points: vec![(0.0, 1.5)],
                colour: 1,
                dashed: true,
            },
        ];
        let svg = line_chart_svg("Loss", "epoch", "loss", &series);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a&lt;b") && svg.contains("stroke-dasharray"));
        // Plot x from 70 to 550 over epochs 0..2: the first point at 70, the last at 550.
        assert!(
            svg.contains(r#"points="70.00,"#) && svg.contains("550.00,"),
            "{svg}"
        );
    }
}
