//! The options' checks, one rule a test.

use super::*;

fn plan(args: &[&str]) -> Result<Plan, String> {
    let mut argv = vec!["loadtest"];
    argv.extend_from_slice(args);
    Args::try_parse_from(argv)
        .map_err(|e| e.to_string())?
        .plan()
}

#[test]
fn durations_parse_with_units() {
    assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
    assert!(parse_duration("ten").is_err());
    assert!(parse_duration("5 fortnights").is_err());
}

#[test]
fn the_default_is_the_seed_test() {
    let p = plan(&[]).expect("defaults are valid");
    assert_eq!(p.targets, ["http://localhost:8080"]);
    assert_eq!(p.metrics, p.targets, "metrics are read from the --url");
    assert!(p.metrics_from_targets);
    match p.kind {
        Kind::Seed {
            waves,
            concurrency,
            ids,
            pause,
        } => assert_eq!(
            (waves, concurrency, ids, pause),
            (25, 200, 100, Duration::from_secs(1))
        ),
        other => panic!("expected the seed scenario, got {other:?}"),
    }
}

#[test]
fn options_of_another_scenario_are_rejected() {
    let e = plan(&["hot", "--waves", "3"]).expect_err("--waves is for seed");
    assert!(e.contains("--waves") && e.contains("hot"), "{e}");
    let e = plan(&["seed", "--rounds", "3", "--duration", "1s"]).expect_err("two unused");
    assert!(e.contains("--rounds, --duration are"), "{e}");
    assert!(plan(&["spread", "--zipf-exponent", "1.2"]).is_err());
    assert!(plan(&["spread", "--dist", "zipf", "--zipf-exponent", "1.2"]).is_ok());
}

#[test]
fn counts_and_durations_are_bounded() {
    assert!(plan(&["--waves", "0"]).is_err());
    assert!(plan(&["--concurrency", "100000"]).is_err());
    assert!(plan(&["hot", "--duration", "2h"]).is_err());
    assert!(plan(&["stampede", "--rounds", "20", "--ids", "10"]).is_err());
    assert!(plan(&["hot", "--id", "0"]).is_err());
}

#[test]
fn urls_are_reduced_to_scheme_host_and_port() {
    let base = |raw| base_url("--url", raw);
    assert_eq!(
        base("http://127.0.0.1:18081/"),
        Ok("http://127.0.0.1:18081".into())
    );
    assert_eq!(base("http://localhost"), Ok("http://localhost".into()));
    assert!(base("https://127.0.0.1").is_err());
    assert!(base("127.0.0.1:8080").is_err());
    assert!(base("http://127.0.0.1:8080/template-details?id=1").is_err());
}

#[test]
fn several_urls_are_a_fleet_whose_metrics_default_to_the_urls() {
    let p = plan(&["--url", "http://a:1", "--url", "http://b:2/"]).expect("two replicas");
    assert_eq!(p.targets, ["http://a:1", "http://b:2"]);
    assert_eq!(p.metrics, p.targets);
    assert!(p.metrics_from_targets);

    let p = plan(&[
        "--url",
        "http://lb:8080",
        "--metrics-url",
        "http://a:8081",
        "--metrics-url",
        "http://b:8082",
    ])
    .expect("a load balancer and its replicas");
    assert_eq!(p.targets, ["http://lb:8080"]);
    assert_eq!(p.metrics, ["http://a:8081", "http://b:8082"]);
    assert!(!p.metrics_from_targets);
}

#[test]
fn a_replica_named_twice_or_badly_is_rejected_by_option() {
    let e = plan(&["--url", "http://a:1", "--url", "http://a:1/"]).expect_err("twice");
    assert!(e.contains("--url http://a:1 is given twice"), "{e}");
    let e =
        plan(&["--metrics-url", "http://a:1", "--metrics-url", "http://a:1"]).expect_err("twice");
    assert!(e.contains("--metrics-url http://a:1 is given twice"), "{e}");
    let e = plan(&["--metrics-url", "https://a:1"]).expect_err("not http");
    assert!(
        e.starts_with("--metrics-url \"https://a:1\": only http://"),
        "{e}"
    );
}

#[test]
fn rate_is_for_the_duration_scenarios_and_bounded() {
    let p = plan(&["spread", "--rate", "500"]).expect("spread at a rate");
    assert_eq!(p.rate, Some(500));
    let e = plan(&["seed", "--rate", "5"]).expect_err("seed has no rate");
    assert!(e.contains("--rate is not used by the seed scenario"), "{e}");
    assert!(plan(&["hot", "--rate", "0"]).is_err());
    assert!(plan(&["hot", "--rate", "2000000"]).is_err());
}

#[test]
fn thresholds_are_parsed_with_the_options() {
    let p = plan(&["--threshold", "p99<20ms", "--threshold", "failed==0"]).expect("two");
    let exprs: Vec<&str> = p.thresholds.iter().map(|t| t.expr.as_str()).collect();
    assert_eq!(exprs, ["p99<20ms", "failed==0"]);
    let e = plan(&["--threshold", "p99<<5"]).expect_err("a bad one");
    assert!(e.contains("threshold \"p99<<5\""), "{e}");
}

#[test]
fn a_report_needs_a_writable_place() {
    let e = plan(&["--report", "/no/such/dir/r.html"]).expect_err("no directory");
    assert!(e.contains("/no/such/dir does not exist"), "{e}");
    let e = plan(&["--report", "/tmp"]).expect_err("a directory");
    assert!(e.contains("is a directory"), "{e}");
    assert!(
        plan(&["--report", "r.html"]).is_ok(),
        "the current directory"
    );
}
