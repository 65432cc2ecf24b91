//! Unit tests of reading the settings.
use super::*;

fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_when_nothing_is_set() {
    let s = Settings::from_vars(&HashMap::new()).expect("defaults are valid");
    assert_eq!(s.http_addr.port(), 8080);
    assert_eq!(s.cache_ttl, Duration::from_secs(30));
    assert_eq!(s.request_timeout, Duration::from_millis(2000));
    assert!(s.coalesce);
    assert!(s.key_owner_shards >= 1);
    assert_eq!(
        s.db_pool_min_idle, s.db_pool_size,
        "every connection kept open"
    );
}

#[test]
fn min_idle_follows_the_pool_size_unless_set() {
    let s = Settings::from_vars(&vars(&[("DB_POOL_SIZE", "4")])).expect("valid");
    assert_eq!((s.db_pool_size, s.db_pool_min_idle), (4, 4));
    let s = Settings::from_vars(&vars(&[("DB_POOL_SIZE", "4"), ("DB_POOL_MIN_IDLE", "0")]))
        .expect("valid");
    assert_eq!(s.db_pool_min_idle, 0);
    let err = Settings::from_vars(&vars(&[("DB_POOL_SIZE", "4"), ("DB_POOL_MIN_IDLE", "5")]))
        .expect_err("more idle connections than the pool holds");
    assert_eq!(
        (err.var.as_str(), err.value.as_str()),
        ("DB_POOL_MIN_IDLE", "5")
    );
}

#[test]
fn values_are_read() {
    let s = Settings::from_vars(&vars(&[
        ("HTTP_ADDR", "127.0.0.1:9000"),
        ("CACHE_TTL_SECS", "5"),
        ("KEY_OWNER_SHARDS", "4"),
        ("COALESCE", "OFF"),
        ("REDIS_TIMEOUT_MS", "20"),
    ]))
    .expect("valid");
    assert_eq!(s.http_addr, "127.0.0.1:9000".parse().unwrap());
    assert_eq!(s.cache_ttl, Duration::from_secs(5));
    assert_eq!(s.key_owner_shards, 4);
    assert!(!s.coalesce);
    assert_eq!(s.redis_timeout, Duration::from_millis(20));

    let off = Settings::from_vars(&vars(&[
        ("NEAR_CACHE_TTL_MS", "0"),
        ("CACHE_GRACE_SECS", "0"),
    ]))
    .expect("zero turns these off");
    assert!(off.near_cache_ttl.is_zero() && off.cache_grace.is_zero());
}

#[test]
fn tls_files_are_read_and_a_client_certificate_needs_its_key() {
    let certs = testkit::certs::generate().expect("test certificates");
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    };
    let (ca, cert, key) = (
        write("ca.pem", &certs.ca),
        write("client.pem", &certs.client_cert),
        write("client.key", &certs.client_key),
    );
    let s = Settings::from_vars(&vars(&[
        ("DATABASE_URL", "postgres://u:p@db/x?sslmode=verify-full"),
        ("DATABASE_CA_FILE", &ca),
        ("REDIS_URL", "rediss://:p@cache:6380/"),
        ("REDIS_CA_FILE", &ca),
        ("REDIS_CLIENT_CERT_FILE", &cert),
        ("REDIS_CLIENT_KEY_FILE", &key),
    ]))
    .expect("valid");
    assert_eq!(s.database_ca.map(|f| f.pem), Some(certs.ca.into_bytes()));
    assert!(s.redis_client_cert.is_some());
    assert!(
        !format!("{:?}", s.redis_client_cert).contains("PRIVATE KEY"),
        "a key is never printed"
    );

    let err = Settings::from_vars(&vars(&[("REDIS_CLIENT_CERT_FILE", &cert)]))
        .expect_err("a certificate without its key");
    assert_eq!(err.var, "REDIS_CLIENT_KEY_FILE");
    let err = Settings::from_vars(&vars(&[("DATABASE_CA_FILE", &key)]))
        .expect_err("a key is not a CA certificate");
    assert!(err.to_string().contains("DATABASE_CA_FILE"), "{err}");
}

#[test]
fn invalid_values_name_the_variable_and_what_is_accepted() {
    for (var, value, expected) in [
        ("CACHE_TTL_SECS", "thirty", "whole number"),
        ("KEY_OWNER_SHARDS", "0", "from 1"),
        ("COALESCE", "maybe", "on or off"),
        ("HTTP_ADDR", "localhost", "address"),
        ("REDIS_URL", "127.0.0.1:6379", "redis://"),
        ("DATABASE_URL", "mysql://x/y", "postgres://"),
        (
            "DATABASE_URL",
            "postgres://h/db?sslmode=verify",
            "verify-full",
        ),
        ("DATABASE_CA_FILE", "/nonexistent/ca.pem", "cannot read it"),
        (
            "REDIS_CA_FILE",
            "/nonexistent/ca.pem",
            "PEM file of certificates",
        ),
        (
            "REDIS_CLIENT_KEY_FILE",
            "/nonexistent/key.pem",
            "private key",
        ),
        ("REQUEST_TIMEOUT_MS", "-5", "milliseconds"),
        ("REQUEST_TIMEOUT_MS", "0", "from 1"),
        ("TTL_JITTER_PCT", "60", "percentage"),
        ("CACHE_GRACE_SECS", "1.5", "seconds"),
        ("NEAR_CACHE_TTL_MS", "soon", "0 (off)"),
        ("DB_POOL_MIN_IDLE", "11", "to DB_POOL_SIZE"),
        ("DB_CONNECT_TIMEOUT_MS", "0", "from 1"),
        ("DB_ACQUIRE_TIMEOUT_MS", "500", "retired"),
    ] {
        let err = Settings::from_vars(&vars(&[(var, value)])).expect_err(var);
        let msg = err.to_string();
        assert!(
            msg.contains(var) && msg.contains(value) && msg.contains(expected),
            "{msg}"
        );
    }
}

#[test]
fn blank_values_mean_the_default() {
    let s = Settings::from_vars(&vars(&[
        ("HTTP_ADDR", "  "),
        ("ADMIN_ADDR", ""),
        ("DATABASE_READ_URL", ""),
        ("DB_POOL_MIN_IDLE", " "),
        ("COALESCE", ""),
        ("DB_ACQUIRE_TIMEOUT_MS", ""),
    ]))
    .expect("blank is unset");
    assert_eq!(s.http_addr.port(), 8080);
    assert_eq!(s.admin_addr, None);
    assert!(s.database_read_urls.is_empty());
    assert_eq!(s.db_pool_min_idle, s.db_pool_size);
    assert!(s.coalesce);
}

#[test]
fn the_command_line_sets_the_same_settings_and_names_the_variable_when_wrong() {
    let invocation = Invocation::parse([
        "singleflight",
        "--cache-ttl-secs=7",
        "--admin-addr",
        "127.0.0.1:9090",
        "--coalesce=off",
        "seed-demo",
    ])
    .expect("valid");
    assert_eq!(invocation.settings.cache_ttl, Duration::from_secs(7));
    assert_eq!(
        invocation.settings.admin_addr,
        Some("127.0.0.1:9090".parse().unwrap())
    );
    assert!(!invocation.settings.coalesce);
    assert_eq!(invocation.action, Some(Action::SeedDemo));

    match Invocation::parse(["singleflight", "--request-timeout-ms=-5"]) {
        Err(Rejected::Config(e)) => {
            assert_eq!(
                (e.var.as_str(), e.value.as_str()),
                ("REQUEST_TIMEOUT_MS", "-5")
            );
            assert!(e.expected.contains("milliseconds"), "{e}");
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }
    for (args, kind) in [
        (
            ["singleflight", "--help"],
            clap::error::ErrorKind::DisplayHelp,
        ),
        (
            ["singleflight", "--version"],
            clap::error::ErrorKind::DisplayVersion,
        ),
        (
            ["singleflight", "--no-such-option"],
            clap::error::ErrorKind::UnknownArgument,
        ),
    ] {
        match Invocation::parse(args) {
            Err(Rejected::Clap(e)) => assert_eq!(e.kind(), kind, "{args:?}"),
            other => panic!("{args:?}: expected clap to answer, got {other:?}"),
        }
    }
}

#[test]
fn every_option_is_a_documented_variable() {
    let command = command();
    command.clone().debug_assert();
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        if matches!(id, "help" | "version") {
            continue;
        }
        let var = arg.get_env().and_then(|v| v.to_str());
        assert_eq!(var, Some(id.to_ascii_uppercase().as_str()), "{id}");
        assert!(
            arg.is_hide_set() || arg.get_help().is_some_and(|h| !h.to_string().is_empty()),
            "{id} has no help"
        );
    }
}
