//! The real binary stops gracefully on SIGTERM and SIGINT: it stops accepting, finishes what is
//! in flight and exits 0.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::servers;

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

#[actix_rt::test]
async fn the_binary_exits_cleanly_on_sigterm_and_sigint() {
    let servers = servers::servers();
    for signal in ["TERM", "INT"] {
        let port = free_port();
        // Reuses the shared `postgres` database: migrations are idempotent.
        let mut child = Command::new(env!("CARGO_BIN_EXE_singleflight"))
            .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("DATABASE_URL", servers.pg_url("postgres"))
            .env("REDIS_URL", servers.redis_url(servers::next_redis_db()))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the service binary");

        let client = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        loop {
            if let Ok(r) = client
                .get(format!("{url}/template-details?id=3"))
                .send()
                .await
            {
                assert_eq!(r.status(), 200);
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the service did not come up"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let status = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        let exit = loop {
            if let Some(exit) = child.try_wait().expect("wait for the service") {
                break exit;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("SIG{signal}: the service did not stop within 15 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(exit.success(), "SIG{signal}: exit status {exit}");
        assert!(
            client.get(format!("{url}/healthz")).send().await.is_err(),
            "no longer listening"
        );
    }
}
