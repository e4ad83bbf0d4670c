//! Bar charts as standalone SVG files (no fonts or rendering libraries needed, so they are
//! written the same way on every machine): the evaluation report's accuracy per mode and the
//! taxonomy report's share per category.

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
}
