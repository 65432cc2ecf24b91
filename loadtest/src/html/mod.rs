//! `--report FILE.html`: the run on one self-contained page, charts over time (requests per
//! second, p50/p99 latency, the `X-Cache` mix, each replica's DB queries per second) above the
//! seed's table, the thresholds and the client's figures. The charts are inline SVG drawn by
//! [`svg`]; the page loads nothing, so it opens offline and can be attached to a CI run.

mod svg;

use std::fmt::Write as _;

use crate::report::{describe, figure, ms, percent, thousands, Report};
use crate::tally::X_CACHE_VALUES;

/// The colour of each series. Tests look for these in a screenshot of the page, so each is
/// used by one series only.
pub const RPS: &str = "#1f77b4";
pub const FAILED: &str = "#444444";
pub const P50: &str = "#2ca02c";
pub const P99: &str = "#d62728";
/// `X-Cache` values in the order of [`X_CACHE_VALUES`], then `other` and `none`.
pub const X_CACHE_COLORS: [&str; 6] = [
    "#17becf", "#ff7f0e", "#9467bd", "#8c564b", "#bcbd22", "#7f7f7f",
];
/// One per replica, in the order of `metrics_from` (repeated past the sixth).
pub const REPLICA_COLORS: [&str; 6] = [
    "#e377c2", "#008080", "#b8860b", "#4b0082", "#ff1493", "#556b2f",
];

/// Escapes text for HTML and SVG (element content and quoted attributes).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str =
    "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fff}\
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:20px 0 6px}\
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 10px;text-align:left}\
td.n{text-align:right}.passed{color:#176117}.failed{color:#a00;font-weight:bold}\
.chart{display:block;margin:8px 0}.chart .title{font-weight:bold;font-size:15px}\
.chart .tick,.chart .legend,.chart .unit{font-size:12px;fill:#444}.muted{color:#666}\
pre{background:#f6f6f6;padding:10px;overflow:auto;font-size:12px}";

/// The whole page.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>loadtest {s}</title><style>{STYLE}</style></head><body>\
         <h1>loadtest {s} against {u}</h1><p class=\"muted\">{d}; seed {seed}; service figures from {m}</p>",
        s = escape(report.scenario),
        u = escape(&report.urls.join(", ")),
        d = escape(&describe(&report.settings, report.scenario)),
        seed = report.rng_seed,
        m = escape(&report.metrics_from.join(", ")),
    );
    summary(&mut out, report);
    out.push_str("<h2>Over time</h2>");
    charts(&mut out, report);
    let _ = writeln!(
        out,
        "<h2>The text report</h2><pre>{}</pre></body></html>",
        escape(&report.to_text())
    );
    out
}

fn row(out: &mut String, name: &str, value: &str) {
    let _ = write!(
        out,
        "<tr><th>{}</th><td class=\"n\">{}</td></tr>",
        escape(name),
        escape(value)
    );
}

/// The seed's table, the thresholds and the client's headline figures.
fn summary(out: &mut String, r: &Report) {
    let m = &r.metrics;
    out.push_str(
        "<h2>The seed's table</h2><table id=\"seed-table\"><tr><th>Metric</th><th>Value</th></tr>",
    );
    row(out, "Total requests", &thousands(m.http_request_total));
    row(out, "Cache hit rate", &percent(r.cache_hit_rate));
    row(out, "DB queries", &thousands(m.db_hits_total));
    row(
        out,
        "Singleflight shared",
        &thousands(m.singleflight_shared_total),
    );
    out.push_str("</table>");
    if !r.thresholds.is_empty() {
        out.push_str("<h2>Thresholds</h2><table id=\"thresholds\"><tr><th>Threshold</th><th>Actual</th><th>Result</th></tr>");
        for v in &r.thresholds {
            let _ = write!(
                out,
                "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"{c}\">{c}</td></tr>",
                escape(&v.threshold),
                v.actual.map_or("n/a".to_owned(), figure),
                c = if v.passed { "passed" } else { "failed" },
            );
        }
        out.push_str("</table>");
    }
    out.push_str("<h2>Measured by the client</h2><table id=\"client\">");
    row(
        out,
        "Requests",
        &format!(
            "{} sent, {} answered, {} failed",
            thousands(r.requests),
            thousands(r.responses),
            thousands(r.failures)
        ),
    );
    row(
        out,
        "Throughput",
        &format!("{} req/s", thousands(r.throughput_rps.round() as u64)),
    );
    let l = &r.latency_ms;
    row(
        out,
        "Latency",
        &format!(
            "p50 {}  p95 {}  p99 {}  max {}",
            ms(l.p50),
            ms(l.p95),
            ms(l.p99),
            ms(l.max)
        ),
    );
    if let Some(rate) = &r.rate {
        row(
            out,
            "Constant rate",
            &format!(
                "{} req/s: {} scheduled, {} sent, {} dropped",
                thousands(rate.target_rps),
                thousands(rate.scheduled),
                thousands(rate.sent),
                thousands(rate.dropped)
            ),
        );
    }
    row(
        out,
        "Time",
        &format!(
            "{:.2} s in the air, {:.2} s in all",
            r.active_seconds, r.elapsed_seconds
        ),
    );
    out.push_str("</table>");
}

fn charts(out: &mut String, r: &Report) {
    let seconds = r.timeline.len() as f64;
    // Each second's figures drawn at its middle.
    let at = |s: usize| s as f64 + 0.5;
    let mut throughput = vec![svg::Line {
        name: "answers/s",
        color: RPS,
        points: r
            .timeline
            .iter()
            .enumerate()
            .map(|(s, b)| (at(s), b.responses as f64))
            .collect(),
    }];
    if r.timeline.iter().any(|b| b.failures > 0) {
        throughput.push(svg::Line {
            name: "failed/s",
            color: FAILED,
            points: r
                .timeline
                .iter()
                .enumerate()
                .map(|(s, b)| (at(s), b.failures as f64))
                .collect(),
        });
    }
    out.push_str(&svg::lines(
        "chart-rps",
        "Requests per second",
        "per second",
        seconds,
        &throughput,
    ));

    let answered = || {
        r.timeline
            .iter()
            .enumerate()
            .filter(|(_, b)| b.responses > 0)
    };
    let latency = [
        svg::Line {
            name: "p50",
            color: P50,
            points: answered().map(|(s, b)| (at(s), b.p50_ms)).collect(),
        },
        svg::Line {
            name: "p99",
            color: P99,
            points: answered().map(|(s, b)| (at(s), b.p99_ms)).collect(),
        },
    ];
    out.push_str(&svg::lines(
        "chart-latency",
        "Latency of each second's answers",
        "ms",
        seconds,
        &latency,
    ));

    let names: Vec<&str> = X_CACHE_VALUES
        .iter()
        .copied()
        .chain(["other", "none"])
        .collect();
    let bands: Vec<svg::Band> = names
        .iter()
        .zip(X_CACHE_COLORS)
        .filter(|(name, _)| {
            X_CACHE_VALUES.contains(name)
                || r.timeline.iter().any(|b| b.x_cache.contains_key(*name))
        })
        .map(|(name, color)| svg::Band {
            name,
            color,
            per_second: r
                .timeline
                .iter()
                .map(|b| b.x_cache.get(name).copied().unwrap_or(0) as f64)
                .collect(),
        })
        .collect();
    out.push_str(&svg::stacked(
        "chart-x-cache",
        "X-Cache of each second's answers",
        "answers",
        &bands,
    ));

    let rates = r.db.rates();
    let db: Vec<svg::Line> =
        r.db.replicas
            .iter()
            .zip(rates)
            .enumerate()
            .map(|(i, (url, points))| svg::Line {
                name: url,
                color: REPLICA_COLORS[i % REPLICA_COLORS.len()],
                points,
            })
            .collect();
    out.push_str(&svg::lines(
        "chart-db",
        "DB queries per second (each replica's db_hits_total)",
        "per second",
        seconds,
        &db,
    ));
    if r.db.scrapes.len() < 2 {
        out.push_str("<p class=\"muted\">The run was too short for two scrapes of /metrics a second apart: no DB rate to draw.</p>");
    }
}

#[cfg(test)]
mod tests;
