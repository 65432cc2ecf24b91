//! The load generator's verdicts and views against a real test instance: `--threshold` (a pass,
//! a fail and its exit code), `--rate` (a constant-rate run counts every scheduled request as
//! sent or dropped) and `--report` (the page of a real run, read back by headless Chromium).

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::{loadtest, number, report_of, stderr};
use crate::support::spawn_app;

#[actix_rt::test]
async fn thresholds_that_hold_pass_and_one_that_does_not_fails_the_run_with_exit_3() {
    let app = spawn_app().await;
    let run = |json: bool| {
        let mut args = vec![
            "seed",
            "--url",
            &app.address,
            "--waves",
            "2",
            "--concurrency",
            "30",
            "--ids",
            "10",
            "--pause",
            "0s",
            "--threshold",
            "failed==0",
            "--threshold",
            "requests==80",
            "--threshold",
            "p99<10min",
            // 2 × (30 + 10) requests exactly: more is impossible.
            "--threshold",
            "requests>80",
        ];
        if json {
            // The first run, on a fresh keyspace: its ids had to come from PostgreSQL.
            args.extend(["--threshold", "db_queries>=1", "--json"]);
        }
        loadtest(args.into_iter().map(str::to_owned).collect::<Vec<_>>())
    };

    let output = run(true).await;
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    let report: Value =
        serde_json::from_slice(&output.stdout).expect("the report is still printed");
    let verdicts = report["thresholds"].as_array().expect("a thresholds array");
    let outcome: Vec<(&str, bool)> = verdicts
        .iter()
        .map(|v| {
            (
                v["threshold"].as_str().expect("named"),
                v["passed"].as_bool().expect("a verdict"),
            )
        })
        .collect();
    assert_eq!(
        outcome,
        [
            ("failed==0", true),
            ("requests==80", true),
            ("p99<10min", true),
            ("requests>80", false),
            ("db_queries>=1", true)
        ]
    );
    assert_eq!(
        number(&verdicts[3], &["actual"]),
        80.0,
        "the report's figure"
    );
    assert_eq!(
        number(&verdicts[4], &["actual"]),
        number(&report, &["metrics", "db_hits_total"]),
        "the service's figure"
    );
    assert!(
        stderr(&output).contains("threshold requests>80 failed"),
        "{}",
        stderr(&output)
    );

    let text = run(false).await;
    assert_eq!(text.status.code(), Some(3));
    let table = String::from_utf8_lossy(&text.stdout);
    assert!(table.contains("passed failed==0"), "{table}");
    assert!(table.contains("FAILED requests>80"), "{table}");
}

#[actix_rt::test]
async fn a_constant_rate_run_accounts_for_every_scheduled_request() {
    let app = spawn_app().await;
    let output = loadtest(
        [
            "spread",
            "--url",
            &app.address,
            "--ids",
            "50",
            "--rate",
            "150",
            "--duration",
            "2s",
            "--concurrency",
            "20",
            "--seed",
            "9",
            "--json",
        ]
        .map(str::to_owned)
        .to_vec(),
    )
    .await;
    let report = report_of(&output);
    let rate = &report["rate"];
    assert_eq!(number(rate, &["target_rps"]), 150.0, "{rate}");
    assert_eq!(
        number(rate, &["scheduled"]),
        300.0,
        "150/s for 2 s, from 0 s: {rate}"
    );
    let (sent, dropped) = (number(rate, &["sent"]), number(rate, &["dropped"]));
    assert_eq!(
        sent + dropped,
        300.0,
        "each scheduled request was sent or dropped: {rate}"
    );
    assert_eq!(
        number(&report, &["requests"]),
        sent,
        "the client sent exactly those"
    );
    assert_eq!(
        number(&report, &["metrics", "http_request_total"]),
        number(&report, &["responses"]),
        "the service counted every answer"
    );
    assert_eq!(report["settings"]["rate_rps"], 150);
    // stdout held only the report (parsed above); the live view went to stderr, a line a second.
    let err = stderr(&output);
    assert!(
        err.contains("loadtest:") && err.contains("p99") && err.contains("s left"),
        "{err}"
    );
}

/// Headless Chromium's `--dump-dom` of `page`; `None` (with the reason) when it is not installed.
async fn dom_of(page: &Path) -> Option<String> {
    const CHROMIUM: &str = "/usr/bin/chromium";
    if !Path::new(CHROMIUM).exists() {
        eprintln!(
            "SKIPPED: {CHROMIUM} is not installed (Debian package `chromium`; .ci/run installs it)"
        );
        return None;
    }
    let profile = tempfile::tempdir().expect("a profile directory");
    let run = tokio::process::Command::new(CHROMIUM)
        .args(["--headless", "--disable-gpu", "--no-sandbox", "--dump-dom"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("file://{}", page.display()))
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("chromium finishes within a minute")
        .expect("chromium starts");
    assert!(output.status.success(), "chromium failed: {output:?}");
    Some(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[actix_rt::test]
async fn the_report_page_of_a_real_run_has_its_charts_and_the_seed_table() {
    let app = spawn_app().await;
    let dir = tempfile::tempdir().expect("a directory for the page");
    let page = dir.path().join("run.html");
    let output = loadtest(
        [
            "spread",
            "--url",
            &app.address,
            "--ids",
            "100",
            "--dist",
            "zipf",
            "--duration",
            "3s",
            "--concurrency",
            "10",
            "--json",
            "--report",
            &page.display().to_string(),
        ]
        .map(str::to_owned)
        .to_vec(),
    )
    .await;
    let report = report_of(&output);
    let html = std::fs::read_to_string(&page).expect("--report wrote the page");
    let total = (number(&report, &["metrics", "http_request_total"]) as u64).to_string();
    let grouped: String = total
        .chars()
        .enumerate()
        .flat_map(|(i, c)| {
            let comma = i > 0 && (total.len() - i).is_multiple_of(3);
            comma.then_some(',').into_iter().chain([c])
        })
        .collect();
    assert!(
        html.contains(&format!("Total requests</th><td class=\"n\">{grouped}<")),
        "the seed's table, with the run's figure ({grouped})"
    );

    let Some(dom) = dom_of(&page).await else {
        return;
    };
    for id in ["chart-rps", "chart-latency", "chart-x-cache", "chart-db"] {
        assert!(dom.contains(&format!("id=\"{id}\"")), "{id} in the DOM");
    }
    assert!(
        dom.contains("data-series=\"answers/s\""),
        "the requests-per-second line"
    );
    assert!(dom.contains("data-series=\"p99\""), "the p99 line");
    assert!(
        dom.matches("<rect class=\"series\" data-series=\"HIT\"")
            .count()
            >= 2,
        "HIT bars, one a second"
    );
    // Scraped once a second for 3 s: at least two scrapes, so the replica's line is drawn.
    assert!(
        dom.contains(&format!(
            "<polyline class=\"series\" data-series=\"{}\"",
            app.address
        )),
        "the replica's DB-queries line"
    );
}
