//! Start-up refuses invalid configuration with a message that names the variable; `--help`
//! lists every variable of the README and answers, like `--version`, without any backend.

use std::collections::BTreeSet;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::ports;

#[test]
fn an_invalid_variable_stops_start_up_with_a_clear_message() {
    for (var, value, expected) in [
        ("CACHE_TTL_SECS", "thirty", "whole number"),
        ("COALESCE", "sometimes", "on or off"),
        ("KEY_OWNER_SHARDS", "0", "from 1"),
        ("REDIS_URL", "localhost:6379", "redis://"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_singleflight"))
            .env(var, value)
            .env("HTTP_ADDR", "127.0.0.1:0")
            .output()
            .expect("run the service binary");
        assert_eq!(
            output.status.code(),
            Some(2),
            "{var}={value} must stop start-up"
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(var) && stderr.contains(value) && stderr.contains(expected),
            "{var}: {stderr}"
        );
    }
}

/// Runs the binary with `args`, every backend pointing at a closed port, and returns its output
/// once it exits; the test fails if it is still running after 20 s (it would be waiting for a
/// database).
fn run_without_backends(args: &[&str]) -> Output {
    let closed = ports::free_port().expect("a free port");
    let mut child = Command::new(env!("CARGO_BIN_EXE_singleflight"))
        .args(args)
        .env(
            "DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:{closed}/none"),
        )
        .env("REDIS_URL", format!("redis://127.0.0.1:{closed}/"))
        .env("HTTP_ADDR", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the service binary");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait for the binary").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`singleflight {}` still running after 20 s", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("the binary's output")
}

/// The variables of the README's configuration table (its first column).
fn readme_variables() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("read README.md");
    let section = readme
        .split_once("\n## Configuration\n")
        .expect("README has a Configuration section")
        .1;
    let section = section.split("\n## ").next().unwrap_or(section);
    section
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once('`'))
        .map(|(var, _)| var.to_owned())
        .collect()
}

#[test]
fn help_lists_the_readme_variables_and_answers_without_a_backend() {
    let output = run_without_backends(&["--help"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "--help: {output:?}");
    let listed: BTreeSet<String> = stdout
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split_once(']'))
        .map(|(var, _)| var.to_owned())
        .collect();
    let documented = readme_variables();
    assert!(
        documented.len() > 30,
        "README table not found: {documented:?}"
    );
    assert_eq!(
        listed.difference(&documented).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "in --help, not in the README"
    );
    assert_eq!(
        documented.difference(&listed).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "in the README, not in --help"
    );
    assert!(
        stdout.contains("--http-addr <HTTP_ADDR>") && stdout.contains("[default: 0.0.0.0:8080]"),
        "{stdout}"
    );
}

#[test]
fn version_answers_without_a_backend() {
    let output = run_without_backends(&["--version"]);
    assert!(output.status.success(), "--version: {output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("singleflight {}\n", env!("CARGO_PKG_VERSION"))
    );
}
