//! Another workspace member's binary, for a test that runs it as a user would.
//!
//! Cargo tells a test where its own package's binaries are (`CARGO_BIN_EXE_<name>`), but not
//! another package's: the load generator is the `loadtest` crate, and the tests that check it
//! against a real service live with the service (they need its harness). So the test asks cargo
//! itself to build the binary and to say where it put it. Cargo does nothing when it is up to
//! date, builds into the same target directory as the test (it inherits `CARGO_TARGET_DIR`), and
//! the test never runs a stale binary, whichever `cargo test` started it.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// The path of binary `bin` of any workspace member, built (dev profile) on the first call in
/// this process. Panics with cargo's own message if it does not build.
pub fn binary(bin: &str) -> PathBuf {
    static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    // Held while building: concurrent tests wait for the one build instead of racing cargo.
    let mut built = BUILT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, path)) = built.iter().find(|(name, _)| name == bin) {
        return path.clone();
    }
    let path = build(bin);
    built.push((bin.to_owned(), path.clone()));
    path
}

fn build(bin: &str) -> PathBuf {
    // `cargo test` sets CARGO to the cargo running it, so the same toolchain builds the binary.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(&cargo)
        .args([
            "build",
            "--quiet",
            "--message-format=json-render-diagnostics",
        ])
        .args(["--workspace", "--bin", bin])
        // Selecting the examples makes cargo resolve features with the dev-dependencies, as
        // `cargo test` of the workspace does; the binary then links the very dependency builds
        // the test run just made, instead of a second variant of each (minutes on two cores).
        // `cargo test` builds the examples anyway, so they cost nothing here.
        .arg("--examples")
        // Any directory of the workspace will do; this crate's is one.
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", cargo.to_string_lossy()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "`cargo build --workspace --bin {bin}` failed:\n{}{}",
        String::from_utf8_lossy(&output.stderr),
        stdout
    );
    executable(&stdout, bin)
        .unwrap_or_else(|| panic!("cargo reported no executable named {bin}:\n{stdout}"))
}

/// The `executable` of the compiler-artifact message for binary target `bin` in cargo's JSON
/// messages (one JSON object a line).
fn executable(messages: &str, bin: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == bin)
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.contains(&"bin".into()))
        })
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_binary_among_cargo_messages() {
        let messages = [
            r#"{"reason":"compiler-artifact","target":{"name":"loadtest","kind":["lib"]},"executable":null}"#,
            r#"{"reason":"compiler-artifact","target":{"name":"other","kind":["bin"]},"executable":"/t/debug/other"}"#,
            "not json",
            r#"{"reason":"compiler-artifact","target":{"name":"loadtest","kind":["bin"]},"executable":"/t/debug/loadtest"}"#,
            r#"{"reason":"build-finished","success":true}"#,
        ]
        .join("\n");
        assert_eq!(
            executable(&messages, "loadtest"),
            Some(PathBuf::from("/t/debug/loadtest"))
        );
        assert_eq!(executable(&messages, "absent"), None);
    }
}
