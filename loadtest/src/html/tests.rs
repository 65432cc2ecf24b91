//! The page as a browser shows it: every chart present in the markup, nothing fetched, and
//! (where Chromium is installed, as CI installs it) a screenshot whose chart areas carry the
//! charts' colours.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

use super::*;
use crate::prom::{Deltas, FleetDeltas, ReplicaDeltas};
use crate::run::RunResult;
use crate::tally::{Outcome, Sample, Tally, XCache};
use crate::timeline::{DbScrapes, Timeline};

const CHROMIUM: &str = "/usr/bin/chromium";

/// A 30-second spread run over two replicas, with a threshold that passed and one that failed.
fn report() -> Report {
    let plan = crate::cli::Args::try_parse_from([
        "loadtest",
        "spread",
        "--url",
        "http://127.0.0.1:8081",
        "--url",
        "http://127.0.0.1:8082",
        "--threshold",
        "p99<20ms",
        "--threshold",
        "db_queries<=10",
        "--seed",
        "7",
    ])
    .expect("valid options")
    .plan()
    .expect("a valid plan");
    let mut tally = Tally::new();
    let mut timeline = Timeline::default();
    for k in 0..30_000u64 {
        let second = k / 1000;
        let x = match k % 10 {
            0 => "MISS",
            1 => "SHARED",
            _ => "HIT",
        };
        let sample = Sample {
            id: (k % 100) as i64,
            latency: Duration::from_micros(500 + (k % 1000) * (4 + second % 5)),
            outcome: Outcome::Response {
                status: 200,
                x_cache: XCache::Known(x),
            },
        };
        tally.record(&sample);
        timeline.record(Duration::from_millis(k), &sample);
    }
    let each = |db| Deltas {
        http_request_total: 15_000,
        cache_hits_total: 12_000,
        cache_misses_total: 3_000,
        db_hits_total: db,
        singleflight_shared_total: 1_500,
    };
    let mut deltas = FleetDeltas::default();
    for (url, db) in [
        ("http://127.0.0.1:8081", 600),
        ("http://127.0.0.1:8082", 300),
    ] {
        deltas.total += each(db);
        deltas.replicas.push(ReplicaDeltas {
            url: url.to_owned(),
            metrics: each(db),
        });
    }
    let mut run = RunResult::new(
        tally,
        deltas,
        Duration::from_secs(30),
        Duration::from_secs(30),
    );
    run.timeline = timeline.finish(Duration::from_secs(30));
    run.db = DbScrapes {
        replicas: plan.metrics.clone(),
        scrapes: (0..=30)
            .map(|s| (f64::from(s), vec![f64::from(s * 20), f64::from(s * s)]))
            .collect(),
    };
    Report::new(&plan, run)
}

#[test]
fn the_page_has_every_chart_and_fetches_nothing() {
    let page = render(&report());
    for id in ["chart-rps", "chart-latency", "chart-x-cache", "chart-db"] {
        assert!(
            page.contains(&format!("<svg class=\"chart\" id=\"{id}\"")),
            "{id}"
        );
    }
    for (series, n) in [("HIT", 30), ("MISS", 30), ("SHARED", 30)] {
        let bars = page
            .matches(&format!("<rect class=\"series\" data-series=\"{series}\""))
            .count();
        assert_eq!(bars, n, "one {series} bar a second");
    }
    for replica in ["http://127.0.0.1:8081", "http://127.0.0.1:8082"] {
        assert!(
            page.contains(&format!("data-series=\"{replica}\"")),
            "{replica}'s DB line"
        );
    }
    assert!(
        page.contains("<td class=\"passed\">passed</td>")
            && page.contains("<td class=\"failed\">failed</td>")
    );
    assert!(
        page.contains("Singleflight shared</th><td class=\"n\">3,000"),
        "the seed's table"
    );
    for fetch in ["<script", "<link", "src=", "url(", "@import"] {
        assert!(!page.contains(fetch), "the page loads nothing ({fetch})");
    }
}

/// Runs Chromium headless on `page` with `args`, giving up after a minute; `None` when it is
/// not installed.
fn chromium(page: &Path, args: &[&str]) -> Option<std::process::Output> {
    if !Path::new(CHROMIUM).exists() {
        eprintln!(
            "SKIPPED: {CHROMIUM} is not installed (Debian package `chromium`; .ci/run installs it)"
        );
        return None;
    }
    let profile = page.with_extension("profile");
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--hide-scrollbars",
        ])
        .args([
            "--force-color-profile=srgb",
            "--force-device-scale-factor=1",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child
        .try_wait()
        .expect("chromium can be waited for")
        .is_none()
    {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within a minute");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("chromium's output");
    let _ = std::fs::remove_dir_all(profile);
    Some(output)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loadtest-html-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}

fn rgb(hex: &str) -> [u8; 3] {
    let byte = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16).expect("a hex colour");
    [byte(1), byte(3), byte(5)]
}

#[test]
fn chromium_renders_the_charts_in_their_colours() {
    let dir = scratch("screenshot");
    let page = dir.join("report.html");
    std::fs::write(&page, render(&report())).expect("write the page");
    let shot = dir.join("shot.png");
    let Some(output) = chromium(
        &page,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,2200",
        ],
    ) else {
        return;
    };
    assert!(output.status.success(), "chromium failed: {output:?}");

    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&shot).expect("a screenshot"),
    ));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut pixels = vec![0; reader.output_buffer_size().expect("a sane size")];
    let frame = reader.next_frame(&mut pixels).expect("one frame");
    let channels = frame.color_type.samples();
    assert!(channels >= 3, "{:?}", frame.color_type);
    let colours: Vec<[u8; 3]> = pixels[..frame.buffer_size()]
        .chunks_exact(channels)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    let total = colours.len();
    let white = colours.iter().filter(|c| **c == [255, 255, 255]).count();
    assert!(
        white < total * 95 / 100,
        "the page is not blank: {white} of {total} pixels white"
    );
    // A legend's swatch is 144 pixels; a chart's line or bars are thousands.
    for (what, hex, at_least) in [
        ("the requests-per-second line", RPS, 1500),
        ("the p50 line", P50, 1500),
        ("the p99 line", P99, 1500),
        ("the HIT bars", X_CACHE_COLORS[0], 20_000),
        ("the MISS bars", X_CACHE_COLORS[1], 2_000),
        ("the first replica's DB line", REPLICA_COLORS[0], 1500),
        ("the second replica's DB line", REPLICA_COLORS[1], 1500),
    ] {
        let want = rgb(hex);
        let n = colours.iter().filter(|c| **c == want).count();
        assert!(
            n >= at_least,
            "{what} ({hex}): {n} pixels, expected at least {at_least}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn chromium_sees_the_chart_elements_in_the_dom() {
    let dir = scratch("dom");
    let page = dir.join("report.html");
    std::fs::write(&page, render(&report())).expect("write the page");
    let Some(output) = chromium(&page, &["--dump-dom"]) else {
        return;
    };
    assert!(output.status.success(), "chromium failed: {output:?}");
    let dom = String::from_utf8_lossy(&output.stdout);
    for id in ["chart-rps", "chart-latency", "chart-x-cache", "chart-db"] {
        assert!(dom.contains(&format!("id=\"{id}\"")), "{id} in the DOM");
    }
    assert!(
        dom.matches("<polyline").count() >= 5,
        "rps, p50, p99 and two replicas' lines"
    );
    let _ = std::fs::remove_dir_all(dir);
}
