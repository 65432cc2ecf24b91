//! Start-up refuses invalid configuration with a message that names the variable.

use std::process::Command;

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
