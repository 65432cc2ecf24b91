//! Charts as inline SVG, drawn here: no script, no stylesheet or font from the network, so the
//! page opens offline and looks the same in every browser.
//!
//! Every chart is [`WIDTH`] × [`HEIGHT`] user units with the time of the run (seconds) along x.

use std::fmt::Write as _;

use super::escape;

pub const WIDTH: f64 = 1000.0;
pub const HEIGHT: f64 = 260.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 30.0;

/// One line of a line chart: `(seconds, value)` points in time order.
pub struct Line<'a> {
    pub name: &'a str,
    pub color: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// One band of a stacked bar chart: its value in each second.
pub struct Band<'a> {
    pub name: &'a str,
    pub color: &'a str,
    pub per_second: Vec<f64>,
}

/// 1, 2, 2.5 or 5 times a power of ten, at least `v`: a round top for the y axis whose
/// quarters (the grid lines) are round too.
pub fn nice_ceiling(v: f64) -> f64 {
    if !(v.is_finite() && v > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|top| *top >= v * (1.0 - 1e-9))
        .unwrap_or(10.0 * magnitude)
}

fn label(v: f64) -> String {
    if v >= 1000.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

struct Frame {
    seconds: f64,
    top: f64,
}

impl Frame {
    fn x(&self, t: f64) -> f64 {
        LEFT + (t / self.seconds).clamp(0.0, 1.0) * (WIDTH - LEFT - RIGHT)
    }
    fn y(&self, v: f64) -> f64 {
        HEIGHT - BOTTOM - (v / self.top).clamp(0.0, 1.0) * (HEIGHT - TOP - BOTTOM)
    }
}

/// The opening tag, title, axes, grid and legend shared by every chart.
fn open(
    out: &mut String,
    id: &str,
    title: &str,
    unit: &str,
    frame: &Frame,
    legend: &[(&str, &str)],
) {
    let _ = write!(
        out,
        r##"<svg class="chart" id="{id}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{t}"><title>{t}</title><rect width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/><text x="{LEFT}" y="20" class="title">{t}</text><text x="8" y="{mid}" class="unit" transform="rotate(-90 8 {mid})">{u}</text>"##,
        t = escape(title),
        u = escape(unit),
        mid = HEIGHT / 2.0,
    );
    for i in 0..=4 {
        let v = frame.top * f64::from(i) / 4.0;
        let y = frame.y(v);
        let _ = write!(
            out,
            r##"<line x1="{LEFT}" x2="{x2}" y1="{y:.1}" y2="{y:.1}" stroke="#dddddd"/><text x="{lx}" y="{ty:.1}" class="tick" text-anchor="end">{l}</text>"##,
            x2 = WIDTH - RIGHT,
            lx = LEFT - 6.0,
            ty = y + 4.0,
            l = label(v),
        );
    }
    let step = nice_ceiling(frame.seconds / 10.0);
    let mut t = 0.0;
    while t <= frame.seconds + 1e-9 {
        let _ = write!(
            out,
            r##"<text x="{x:.1}" y="{y}" class="tick" text-anchor="middle">{l}s</text>"##,
            x = frame.x(t),
            y = HEIGHT - 10.0,
            l = label(t),
        );
        t += step;
    }
    let mut x = WIDTH - RIGHT;
    for (name, color) in legend.iter().rev() {
        x -= 14.0 + 7.5 * name.chars().count() as f64 + 16.0;
        let _ = write!(
            out,
            r##"<rect x="{x:.1}" y="10" width="12" height="12" fill="{color}"/><text x="{tx:.1}" y="20" class="legend">{n}</text>"##,
            tx = x + 16.0,
            n = escape(name),
        );
    }
}

/// A line chart of `lines` over `seconds` of run.
pub fn lines(id: &str, title: &str, unit: &str, seconds: f64, lines: &[Line]) -> String {
    let highest = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    let frame = Frame {
        seconds: seconds.max(1.0),
        top: nice_ceiling(highest),
    };
    let mut out = String::new();
    let legend: Vec<(&str, &str)> = lines.iter().map(|l| (l.name, l.color)).collect();
    open(&mut out, id, title, unit, &frame, &legend);
    for line in lines {
        let points: Vec<String> = line
            .points
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", frame.x(*t), frame.y(*v)))
            .collect();
        let _ = write!(
            out,
            r##"<polyline class="series" data-series="{n}" fill="none" stroke="{c}" stroke-width="3" stroke-linejoin="round" points="{p}"/>"##,
            n = escape(line.name),
            c = line.color,
            p = points.join(" "),
        );
    }
    out.push_str("</svg>");
    out
}

/// Bars of one second each, `bands` stacked bottom to top.
pub fn stacked(id: &str, title: &str, unit: &str, bands: &[Band]) -> String {
    let seconds = bands.iter().map(|b| b.per_second.len()).max().unwrap_or(0);
    let totals: Vec<f64> = (0..seconds)
        .map(|s| {
            bands
                .iter()
                .map(|b| b.per_second.get(s).copied().unwrap_or(0.0))
                .sum()
        })
        .collect();
    let frame = Frame {
        seconds: (seconds as f64).max(1.0),
        top: nice_ceiling(totals.iter().copied().fold(0.0, f64::max)),
    };
    let mut out = String::new();
    let legend: Vec<(&str, &str)> = bands.iter().map(|b| (b.name, b.color)).collect();
    open(&mut out, id, title, unit, &frame, &legend);
    let width = (frame.x(1.0) - frame.x(0.0)).max(0.5);
    for second in 0..seconds {
        let mut below = 0.0;
        for band in bands {
            let v = band.per_second.get(second).copied().unwrap_or(0.0);
            if v <= 0.0 {
                continue;
            }
            let (y_top, y_bottom) = (frame.y(below + v), frame.y(below));
            let _ = write!(
                out,
                r##"<rect class="series" data-series="{n}" x="{x:.1}" y="{y_top:.1}" width="{w:.1}" height="{h:.1}" fill="{c}"/>"##,
                n = escape(band.name),
                x = frame.x(second as f64),
                w = width * 0.9,
                h = (y_bottom - y_top).max(0.0),
                c = band.color,
            );
            below += v;
        }
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_y_axis_tops_are_round() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(0.7), 1.0);
        assert_eq!(nice_ceiling(1.0), 1.0);
        assert_eq!(nice_ceiling(1.2), 2.0);
        assert_eq!(nice_ceiling(430.0), 500.0);
        assert_eq!(nice_ceiling(2007.0), 2500.0);
        assert_eq!(nice_ceiling(5001.0), 10_000.0);
        assert_eq!(nice_ceiling(f64::NAN), 1.0);
    }

    #[test]
    fn a_line_chart_draws_each_line_within_its_frame() {
        let svg = lines(
            "c",
            "Latency <ms>",
            "ms",
            10.0,
            &[Line {
                name: "p99",
                color: "#d62728",
                points: vec![(0.0, 0.0), (10.0, 10.0)],
            }],
        );
        assert!(svg.starts_with("<svg class=\"chart\" id=\"c\""));
        assert!(svg.contains("Latency &lt;ms&gt;"), "titles are escaped");
        // (0 s, 0) is the bottom-left corner of the plot, (10 s, top) its top-right.
        assert!(
            svg.contains(&format!(
                "points=\"{LEFT:.1},{:.1} {:.1},{TOP:.1}\"",
                HEIGHT - BOTTOM,
                WIDTH - RIGHT
            )),
            "{svg}"
        );
        assert!(svg.ends_with("</svg>"));
    }

    #[test]
    fn stacked_bars_add_up_per_second() {
        let svg = stacked(
            "x",
            "X-Cache",
            "answers",
            &[
                Band {
                    name: "HIT",
                    color: "#2ca02c",
                    per_second: vec![6.0, 0.0],
                },
                Band {
                    name: "MISS",
                    color: "#d62728",
                    per_second: vec![4.0, 1.0],
                },
            ],
        );
        assert_eq!(
            svg.matches("<rect class=\"series\"").count(),
            3,
            "no bar for a zero"
        );
        // Second 0 totals 10, the axis top: MISS sits on HIT and reaches the top.
        assert!(
            svg.contains(&format!(
                "data-series=\"MISS\" x=\"{LEFT:.1}\" y=\"{TOP:.1}\""
            )),
            "{svg}"
        );
    }
}
