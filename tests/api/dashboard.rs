//! The Grafana dashboard (`grafana/dashboards/singleflight.json`), proven against a real
//! Prometheus: Debian's `prometheus` binary scrapes a running service every second with the
//! project's own `prometheus.yaml` (its compose discovery replaced by the test service), the test
//! sends traffic that makes misses, hits and shared loads, and then every PromQL expression in the
//! dashboard is evaluated through Prometheus's HTTP API. An expression that returns no series — a
//! misspelt metric or label, a metric the service does not export — fails the test, listing each
//! one. Grafana itself cannot run here; what it would send to Prometheus can.
//!
//! Also here: the provisioning wiring (datasource uid, time range, refresh) and `promtool check
//! metrics` on a live `/metrics` scrape.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::launcher::attached::{self, Attached};
use testkit::launcher::{process, prometheus};

use crate::support::{ports, spawn_app, sum_metric, TestApp};

/// How often the test's Prometheus scrapes (the project's file says 5 s; a test cannot wait that).
const SCRAPE_INTERVAL: &str = "1s";
/// Grafana's interval variables, replaced by what Grafana would send for "Last 5 minutes".
const GRAFANA_VARIABLES: [(&str, &str); 8] = [
    ("${__rate_interval}", "1m"),
    ("$__rate_interval", "1m"),
    ("${__interval_ms}", "15000"),
    ("$__interval_ms", "15000"),
    ("${__interval}", "15s"),
    ("$__interval", "15s"),
    ("${__range}", "5m"),
    ("$__range", "5m"),
];
/// The seed dashboard's six panels, which the seed's users know by these titles.
const SEED_PANELS: [&str; 6] = [
    "HTTP Requests Per Second",
    "HTTP Latency (95th pctl)",
    "Cache Hits vs Misses",
    "Database Hits",
    "Singleflight Shared Calls",
    "In-Flight Requests",
];

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn dashboard() -> Value {
    let path = repo_file("grafana/dashboards/singleflight.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every panel, including those nested in collapsed rows.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in panels.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// (panel title, expression) for every Prometheus query anywhere in the dashboard JSON: panel
/// targets, and anything else that carries an `expr` (template variables, annotations).
fn expressions(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(value: &Value, title: &str, out: &mut Vec<(String, String)>) {
        match value {
            Value::Object(map) => {
                let title = map.get("title").and_then(Value::as_str).unwrap_or(title);
                if let Some(expr) = map.get("expr").and_then(Value::as_str) {
                    out.push((title.to_owned(), expr.to_owned()));
                }
                for child in map.values() {
                    walk(child, title, out);
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, title, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, "(dashboard)", &mut out);
    out
}

/// The expression Prometheus receives once Grafana has filled in its variables.
fn as_grafana_sends(expr: &str) -> String {
    GRAFANA_VARIABLES
        .iter()
        .fold(expr.to_owned(), |e, (variable, value)| {
            e.replace(variable, value)
        })
}

/// The `uid:` of the provisioned datasource in grafana/provisioning/datasources/*.yaml.
fn provisioned_datasource_uids() -> Vec<String> {
    let dir = repo_file("grafana/provisioning/datasources");
    let mut uids = Vec::new();
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = fs::read_to_string(&path).expect("datasource file");
        uids.extend(text.lines().filter_map(|line| {
            let value = line.trim().strip_prefix("uid:")?;
            Some(value.trim().trim_matches(['"', '\'']).to_owned())
        }));
    }
    uids
}

#[test]
fn dashboard_is_provisioned_as_the_seed_users_expect() {
    let dashboard = dashboard();
    assert_eq!(
        dashboard["uid"], "singleflight",
        "stable uid, so links survive re-provisioning"
    );
    assert_eq!(
        dashboard["time"]["from"], "now-5m",
        "default range: Last 5 minutes"
    );
    assert_eq!(dashboard["time"]["to"], "now");
    assert_eq!(dashboard["refresh"], "5s");

    let panels = panels(&dashboard);
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for seed in SEED_PANELS {
        assert!(
            titles.contains(&seed),
            "the seed's panel {seed:?} is missing: {titles:?}"
        );
    }

    let uids = provisioned_datasource_uids();
    assert_eq!(
        uids.len(),
        1,
        "one provisioned datasource with a uid: {uids:?}"
    );
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for source in
            std::iter::once(&panel["datasource"]).chain(targets.iter().map(|t| &t["datasource"]))
        {
            assert_eq!(
                source["uid"].as_str(),
                Some(uids[0].as_str()),
                "panel {title:?} must use the provisioned datasource"
            );
        }
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(
                !expr.trim().is_empty(),
                "panel {title:?} has an empty query"
            );
            assert!(
                !as_grafana_sends(expr).contains('$'),
                "panel {title:?} uses a variable this test cannot fill in: {expr}"
            );
        }
    }
}

/// Debian's Prometheus on a free loopback port, with its storage in the test process's directory,
/// run by the launcher (as `scripts/stack.sh` runs its own). Dropping it stops the process, and it
/// dies with the test process, so a failing test leaves nothing running.
struct Prometheus {
    server: Attached,
    url: String,
    log: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (host:port) every [`SCRAPE_INTERVAL`], with the
    /// project's `prometheus.yaml` as the configuration.
    fn start(target: &str) -> Prometheus {
        let source = repo_file("prometheus.yaml");
        let project_config = fs::read_to_string(&source).expect("prometheus.yaml");
        // The launcher replaces the compose discovery line with the target (as it does for
        // scripts/stack.sh) and the project's interval with SCRAPE_INTERVAL.
        let discovery = prometheus::COMPOSE_DISCOVERY;
        assert!(
            project_config.contains(discovery)
                && project_config.contains(prometheus::SCRAPE_INTERVAL),
            "prometheus.yaml must find the compose replicas with the line {discovery} and \
             scrape every 5s (the seed's interval):\n{project_config}"
        );
        assert!(
            process::find_in_path("prometheus").is_some(),
            "the `prometheus` binary is not installed; this test runs the real one: \
             apt-get install prometheus"
        );
        let dir = attached::dir("prometheus").expect("a directory for prometheus");
        let config = dir.join("prometheus.yaml");
        let scrape = prometheus::Scrape {
            source: &source,
            targets: &[target.to_owned()],
            interval: Some(SCRAPE_INTERVAL),
            written_by: "tests/api/dashboard.rs",
        };
        let text = prometheus::render(&scrape).unwrap_or_else(|e| panic!("prometheus.yaml: {e}"));
        fs::write(&config, text).expect("write the test's prometheus.yaml");
        prometheus::check(&config).unwrap_or_else(|e| panic!("the test's prometheus.yaml: {e}"));
        let log = dir.join("prometheus.log");
        let (server, running) = attached::start_on_free_port(ports::free_port, &log, |port| {
            Ok(prometheus::Prometheus {
                config: config.clone(),
                data: dir.join("data"),
                port,
            })
        })
        .unwrap_or_else(|e| {
            panic!(
                "cannot start prometheus: {e}\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            )
        });
        Prometheus {
            server: running,
            url: format!("http://127.0.0.1:{}", server.port),
            log,
        }
    }

    /// Fails the test, with Prometheus's log, if the process has exited.
    fn assert_alive(&mut self) {
        if let Some(status) = self.server.exited() {
            panic!(
                "prometheus exited ({status}):\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }

    /// Waits until Prometheus reports `target` as up (its first scrape succeeded).
    async fn wait_until_up(&mut self, client: &reqwest::Client, target: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            self.assert_alive();
            if let Ok(response) = client
                .get(format!("{}/api/v1/targets", self.url))
                .send()
                .await
            {
                if let Ok(body) = response.json::<Value>().await {
                    let up = body["data"]["activeTargets"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|t| t["labels"]["instance"] == target && t["health"] == "up");
                    if up {
                        return;
                    }
                    last = body.to_string();
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "prometheus did not report {target} up within 30 s; last /api/v1/targets: {last}\n{}",
            fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// Evaluates `expr` now: the series it returns, or Prometheus's error.
    async fn query(&self, client: &reqwest::Client, expr: &str) -> Result<Vec<Value>, String> {
        let response = client
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let body: Value = response
            .json()
            .await
            .map_err(|e| format!("answer is not JSON: {e}"))?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The value of a query that returns one series, if it does.
    async fn scalar(&self, client: &reqwest::Client, expr: &str) -> Option<f64> {
        let series = self.query(client, expr).await.ok()?;
        series.first()?["value"][1].as_str()?.parse().ok()
    }
}

/// Misses (cold ids), shared loads (concurrent requests for them), hits (repeats), a 404 and a
/// 400, so that every metric the dashboard reads has moved.
async fn send_traffic(app: &TestApp) {
    app.warm_connections(30).await;
    for id in [11, 12, 13] {
        for (status, _, body) in app.burst(id, 30).await {
            assert_eq!(status, 200, "{body}");
        }
        for _ in 0..5 {
            assert_eq!(app.template(id).await.status(), 200);
        }
    }
    assert_eq!(app.template(999_999).await.status(), 404);
    assert_eq!(app.get("/template-details?id=abc").await.status(), 400);
}

#[actix_rt::test]
async fn every_dashboard_query_returns_series_from_a_real_prometheus() {
    let app = spawn_app().await;
    let target = app
        .address
        .strip_prefix("http://")
        .expect("the test app's address is http://host:port")
        .to_owned();
    let mut prometheus = Prometheus::start(&target);
    let client = &app.client;
    prometheus.wait_until_up(client, &target).await;

    send_traffic(&app).await;
    let text = app.metrics_text().await;
    for name in ["cache_misses_total", "cache_hits_total", "db_hits_total"] {
        assert!(sum_metric(&text, name) > 0.0, "the traffic moved {name}");
    }

    // Wait for a scrape taken after the traffic, then a few more so that every rate() window
    // holds samples from before and after it.
    let requests = sum_metric(&text, "http_request_total");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        prometheus.assert_alive();
        let seen = prometheus.scalar(client, "sum(http_request_total)").await;
        if seen == Some(requests) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never saw the traffic: sum(http_request_total) is {seen:?}, the service \
             says {requests}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    let expressions = expressions(&dashboard());
    assert!(
        expressions.len() >= 12,
        "the dashboard has its panels' queries: {expressions:?}"
    );
    let mut failures = Vec::new();
    for (panel, expr) in &expressions {
        let sent = as_grafana_sends(expr);
        match prometheus.query(client, &sent).await {
            Ok(series) if series.is_empty() => {
                failures.push(format!("  {panel:?}: no series from {sent}"));
            }
            Ok(_) => {}
            Err(error) => failures.push(format!("  {panel:?}: {error} in {sent}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} dashboard queries return nothing from a Prometheus scraping the service:\n{}",
        failures.len(),
        expressions.len(),
        failures.join("\n")
    );
}

#[actix_rt::test]
async fn promtool_accepts_a_live_metrics_scrape() {
    let app = spawn_app().await;
    send_traffic(&app).await;
    let text = app.metrics_text().await;
    assert!(
        text.contains("# TYPE http_request_duration_seconds histogram")
            && text.contains("db_hits_total"),
        "a real scrape, with the service's metrics in it:\n{text}"
    );

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                panic!("`promtool` is not installed: apt-get install prometheus")
            }
            _ => panic!("cannot run promtool: {e}"),
        });
    promtool
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(text.as_bytes())
        .expect("send the scrape to promtool");
    let output = promtool.wait_with_output().expect("promtool finishes");
    assert!(
        output.status.success(),
        "promtool check metrics rejects /metrics ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
