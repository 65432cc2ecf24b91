//! Prometheus: the scrape config made from the project's `prometheus.yaml`, its check with
//! `promtool`, the server's command line and readiness, and what it says about its targets.
//!
//! # One scrape config
//!
//! The project's `prometheus.yaml` is written for docker-compose: it finds every replica of the
//! compose service `app` through Docker's DNS, on one line ([`COMPOSE_DISCOVERY`]). Natively there
//! is no Docker DNS, so the stack (which scrapes the service or each replica) and the dashboard
//! test (which scrapes a test instance, every second) run a copy with that line replaced by static
//! targets ([`render`]); everything else is the project's, so a change to the file reaches all
//! three. A copy is checked with `promtool` ([`check`]) before a server is started or reloaded
//! with it, so that a broken `prometheus.yaml` is reported as such.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::probe;
use crate::process::{self, Error, Server, StopStep, SIGTERM};

/// The line of the project's `prometheus.yaml` that finds the compose replicas.
pub const COMPOSE_DISCOVERY: &str = r#"dns_sd_configs: [{names: ["app"], type: A, port: 8080}]"#;

/// The project's scrape interval, as its `prometheus.yaml` writes it.
pub const SCRAPE_INTERVAL: &str = "scrape_interval: 5s";

/// The steps of a stop: SIGTERM, then up to 20 s.
pub const STOP: [StopStep; 1] = [(Some(SIGTERM), Duration::from_secs(20))];

/// What a copy of the project's scrape config is made of.
pub struct Scrape<'a> {
    /// The project's `prometheus.yaml`.
    pub source: &'a Path,
    /// `host:port` of every instance to scrape.
    pub targets: &'a [String],
    /// Another scrape interval than the project's (`"1s"`), for a test that cannot wait 5 s.
    pub interval: Option<&'a str>,
    /// Who writes the copy, for its header (the copy is rewritten on every start).
    pub written_by: &'a str,
}

/// Why the project's file could not be made into a copy.
#[derive(Debug)]
pub enum ConfigError {
    /// The file cannot be read.
    Unreadable(io::Error),
    /// It lacks [`COMPOSE_DISCOVERY`], so the copy could not point at the service.
    NoDiscovery,
    /// An interval was asked for, but it lacks [`SCRAPE_INTERVAL`].
    NoInterval,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Unreadable(e) => write!(f, "cannot read it: {e}"),
            ConfigError::NoDiscovery => write!(f, "it lacks the line {COMPOSE_DISCOVERY}"),
            ConfigError::NoInterval => write!(f, "it lacks the line {SCRAPE_INTERVAL}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// `static_configs: [{targets: ["a", "b"]}]`: what replaces the compose discovery.
pub fn static_targets(targets: &[String]) -> String {
    let quoted: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    format!("static_configs: [{{targets: [{}]}}]", quoted.join(", "))
}

/// The copy of the project's scrape config that scrapes `scrape.targets`.
pub fn render(scrape: &Scrape) -> Result<String, ConfigError> {
    let source = std::fs::read_to_string(scrape.source).map_err(ConfigError::Unreadable)?;
    if !source.contains(COMPOSE_DISCOVERY) {
        return Err(ConfigError::NoDiscovery);
    }
    let statics = static_targets(scrape.targets);
    let mut body = source
        .trim_end_matches('\n')
        .replace(COMPOSE_DISCOVERY, &statics);
    let mut replaced = format!("# replaced by: {statics}\n");
    if let Some(interval) = scrape.interval {
        if !body.contains(SCRAPE_INTERVAL) {
            return Err(ConfigError::NoInterval);
        }
        let line = format!("scrape_interval: {interval}");
        body = body.replace(SCRAPE_INTERVAL, &line);
        replaced.push_str(&format!("# and its {SCRAPE_INTERVAL} by: {line}\n"));
    }
    Ok(format!(
        "# Written by {} from {}, with its compose service discovery\n{replaced}\
         # Edit that file, not this copy (it is rewritten on every start).\n{body}\n",
        scrape.written_by,
        scrape.source.display()
    ))
}

/// `promtool check config file`: its output as an [`Error::Rejected`] if it fails.
pub fn check(file: &Path) -> Result<(), Error> {
    process::check(
        "promtool",
        Command::new("promtool").args(["check", "config"]).arg(file),
    )
}

/// A Prometheus server on `127.0.0.1:port`.
pub struct Prometheus {
    /// The rendered copy (see [`render`]).
    pub config: PathBuf,
    /// Its TSDB (kept 7 days).
    pub data: PathBuf,
    pub port: u16,
}

impl Server for Prometheus {
    fn name(&self) -> String {
        "prometheus".to_owned()
    }

    fn command(&self) -> Command {
        let mut command = Command::new("prometheus");
        command
            .arg(format!("--config.file={}", self.config.display()))
            .arg(format!("--storage.tsdb.path={}", self.data.display()))
            .arg("--storage.tsdb.retention.time=7d")
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port));
        command
    }

    fn probe(&self) -> Result<(), String> {
        probe::http_ok(self.port, "/-/ready").map(drop)
    }
}

/// Whether the Prometheus on `port` keeps its data in `data` (its `storage.tsdb.path` flag): tells
/// this project's server from another one on the same port.
pub fn keeps_data_in(port: u16, data: &str) -> bool {
    probe::http_ok(port, "/api/v1/status/flags")
        .is_ok_and(|flags| flags.contains(&format!("\"storage.tsdb.path\":\"{data}\"")))
}

/// The targets' health as the Prometheus on `port` last saw it: "target up", or "target down:
/// <last scrape error>"; for several targets, how many are up (and the first error).
pub fn target_health(port: u16) -> String {
    let Ok(body) = probe::http_ok(port, "/api/v1/targets") else {
        return "target unknown (the targets API did not answer)".to_owned();
    };
    let healths = string_values(&body, "health");
    let error = string_values(&body, "lastError")
        .into_iter()
        .find(|e| !e.is_empty());
    if healths.len() > 1 {
        let up = healths.iter().filter(|h| *h == "up").count();
        return if up == healths.len() {
            format!("all {up} targets up")
        } else {
            let first = error
                .map(|e| format!(" (first error: {e})"))
                .unwrap_or_default();
            format!("{up} of {} targets up{first}", healths.len())
        };
    }
    match healths.first().map(String::as_str) {
        Some("up") => "target up".to_owned(),
        None | Some("") => {
            "target not listed yet (Prometheus lists it within a few seconds of starting)"
                .to_owned()
        }
        Some("unknown") => "target not scraped yet".to_owned(),
        Some(health) => match error {
            Some(error) => format!("target {health}: {error}"),
            None => format!("target {health}"),
        },
    }
}

/// Every value of `"key":"value"` in `json`, in order, up to the next quote (no JSON parser: the
/// API's answer is flat enough for this, and the launcher has no dependencies to parse it with).
/// A `health` value is letters only.
fn string_values(json: &str, key: &str) -> Vec<String> {
    let needle = format!("\"{key}\":\"");
    json.match_indices(&needle)
        .map(|(at, _)| {
            let rest = &json[at + needle.len()..];
            let value = &rest[..rest.find('"').unwrap_or(rest.len())];
            if key == "health" {
                value
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase())
                    .collect()
            } else {
                value.to_owned()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_discovery_line_is_replaced_by_the_targets() {
        let dir = std::env::temp_dir().join(format!("launcher-prom-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory");
        let source = dir.join("prometheus.yaml");
        std::fs::write(
            &source,
            format!("global:\n  {SCRAPE_INTERVAL}\nx:\n  {COMPOSE_DISCOVERY}\n\n"),
        )
        .expect("write");
        let targets = ["127.0.0.1:1".to_owned(), "127.0.0.1:2".to_owned()];
        let scrape = Scrape {
            source: &source,
            targets: &targets,
            interval: None,
            written_by: "a test",
        };
        let config = render(&scrape).expect("rendered");
        assert!(config.starts_with("# Written by a test from "), "{config}");
        assert!(
            config.ends_with(
                "  scrape_interval: 5s\nx:\n  static_configs: [{targets: [\"127.0.0.1:1\", \"127.0.0.1:2\"]}]\n"
            ),
            "{config}"
        );
        let faster = render(&Scrape {
            interval: Some("1s"),
            ..scrape
        })
        .expect("rendered");
        assert!(faster.contains("\n  scrape_interval: 1s\n"), "{faster}");
        std::fs::write(&source, "nothing").expect("write");
        assert!(matches!(render(&scrape), Err(ConfigError::NoDiscovery)));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn values_are_read_as_grep_read_them() {
        let body =
            r#"{"a":[{"health":"up","lastError":""},{"health":"down","lastError":"refused"}]}"#;
        assert_eq!(string_values(body, "health"), ["up", "down"]);
        assert_eq!(string_values(body, "lastError"), ["", "refused"]);
    }
}
