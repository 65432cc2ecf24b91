//! The one test harness: [`spawn_app`] starts the real service (the same
//! [`Application::build`] that `main` uses) on a free port, against a fresh database and a fresh
//! Redis keyspace of the shared test servers.

// The servers and the fault proxy live in the testkit crate (shared with benches); re-exported
// here so that test files keep writing `support::servers`, `support::fault_proxy`.
pub use testkit::prom::sum_metric;
pub use testkit::{fault_proxy, ports, servers};

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use actix_web::dev::ServerHandle;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use singleflight::config::Settings;
use singleflight::startup::Application;

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub database_url: String,
    pub redis_url: String,
    /// `http://127.0.0.1:<port>` of `ADMIN_ADDR`'s server, when the test set it.
    pub admin_address: Option<String>,
    handle: ServerHandle,
}

/// Starts the service with test defaults.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts the service after `customize` adjusted its settings (a short TTL, Redis elsewhere, …).
pub async fn spawn_app_with(customize: impl FnOnce(&mut Settings)) -> TestApp {
    let servers = servers::servers();
    let database = create_database(servers).await;
    let mut settings = Settings {
        http_addr: "127.0.0.1:0".parse().expect("loopback address"),
        http_workers: 2,
        database_url: servers.pg_url(&database),
        redis_url: servers.redis_url(servers::next_redis_db()),
        // Two owners, so that tests cross shards as in a real deployment.
        key_owner_shards: 2,
        // A loaded CI machine may take longer than production's tight bound to answer.
        redis_timeout: Duration::from_millis(500),
        ..Settings::default()
    };
    // The schema and the demo templates, as `singleflight seed-demo` loads them, straight into
    // this test's database (not through whatever `customize` puts in between).
    seed_demo(&settings.database_url).await;
    customize(&mut settings);
    let (database_url, redis_url) = (settings.database_url.clone(), settings.redis_url.clone());
    let app = Application::build(settings)
        .await
        .expect("the service starts");
    let address = format!("http://127.0.0.1:{}", app.port());
    let admin_address = app
        .admin_port()
        .map(|port| format!("http://127.0.0.1:{port}"));
    let handle = app.handle();
    actix_rt::spawn(app.run_until_stopped());
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("http client");
    TestApp {
        address,
        client,
        database_url,
        redis_url,
        admin_address,
        handle,
    }
}

/// Migrates the database at `database_url` and loads the demo templates into it, as its owner
/// does with `singleflight seed-demo`.
pub async fn seed_demo(database_url: &str) {
    let settings = Settings {
        database_url: database_url.to_owned(),
        ..Settings::default()
    };
    singleflight::demo::seed(&settings)
        .await
        .expect("the demo templates load");
}

/// A process a test started (the service binary), killed if the test ends before it exits: a
/// failed assertion must not leave it running.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A loopback port nothing listens on, so connecting to it is refused. No other test in this
/// process is handed the same port, and no outgoing connection takes it as its source.
pub fn closed_port() -> u16 {
    ports::free_port().expect("a free port")
}

/// The URL of a new, empty database (no migration applied) on the shared test PostgreSQL.
pub async fn empty_database_url() -> String {
    let servers = servers::servers();
    servers.pg_url(&create_database(servers).await)
}

/// The URL of a new database with the schema and the demo templates (as `seed-demo` loads
/// them), for services started by a test itself (their binaries, replicas of a fleet).
pub async fn demo_database_url() -> String {
    let url = empty_database_url().await;
    seed_demo(&url).await;
    url
}

/// A database of its own for one test.
async fn create_database(servers: &servers::Servers) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    );
    let mut admin = AsyncPgConnection::establish(&servers.pg_admin_url())
        .await
        .expect("connect to the test PostgreSQL");
    diesel::sql_query(format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create the test database");
    name
}

impl TestApp {
    /// Drops this test's database (terminating the service's connections to it), to play a
    /// PostgreSQL that stopped answering for this service.
    pub async fn drop_database(&self) {
        let servers = servers::servers();
        let name = self
            .database_url
            .rsplit('/')
            .next()
            .expect("database name")
            .to_owned();
        let mut admin = AsyncPgConnection::establish(&servers.pg_admin_url())
            .await
            .expect("connect to the test PostgreSQL");
        diesel::sql_query(format!("DROP DATABASE {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await
            .expect("drop the test database");
    }

    /// Runs one SQL statement against this test's database (as another client of PostgreSQL
    /// would: the service learns of it only through notifications).
    pub async fn execute_sql(&self, sql: &str) -> usize {
        let mut conn = AsyncPgConnection::establish(&self.database_url)
            .await
            .expect("connect to the test database");
        diesel::sql_query(sql)
            .execute(&mut conn)
            .await
            .expect("run the statement")
    }

    pub async fn get(&self, path_and_query: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{}", self.address, path_and_query))
            .send()
            .await
            .expect("the request is answered")
    }

    /// `GET /readyz`: its status and JSON body.
    pub async fn readiness(&self) -> (u16, serde_json::Value) {
        let ready = self.get("/readyz").await;
        let status = ready.status().as_u16();
        (status, ready.json().await.expect("readyz JSON"))
    }

    pub async fn template(&self, id: i64) -> reqwest::Response {
        self.get(&format!("/template-details?id={id}")).await
    }

    pub async fn metrics_text(&self) -> String {
        self.get("/metrics")
            .await
            .text()
            .await
            .expect("metrics body")
    }

    /// The sum of every series of metric `name` in a fresh scrape (0 if absent).
    pub async fn metric(&self, name: &str) -> f64 {
        sum_metric(&self.metrics_text().await, name)
    }

    /// One `/metrics` scrape taken once no flight is in the air (asked again for up to 10 s), so
    /// that counts a flight moves at different moments (a refresh when it starts, its query once
    /// it has a connection) are read together.
    pub async fn metrics_when_idle(&self) -> String {
        let idle = testkit::poll::until(
            Duration::from_secs(10),
            Duration::from_millis(20),
            || self.metrics_text(),
            |text| sum_metric(text, "key_owner_inflight_keys") == 0.0,
        )
        .await;
        assert!(idle.done, "flights still in the air: {}", idle.last);
        idle.last
    }

    /// Opens `n` keep-alive connections, so that a following burst of `n` requests is sent at
    /// once rather than paced by TCP handshakes.
    pub async fn warm_connections(&self, n: usize) {
        let requests = (0..n).map(|_| self.get("/healthz"));
        for response in futures_util::future::join_all(requests).await {
            assert_eq!(response.status(), 200);
        }
    }

    /// `n` concurrent requests for one template: (status, X-Cache, body) of each.
    pub async fn burst(&self, id: i64, n: usize) -> Vec<(u16, String, String)> {
        let requests = (0..n).map(|_| async move {
            let response = self.template(id).await;
            let status = response.status().as_u16();
            let x_cache = header(&response, "x-cache");
            (status, x_cache, response.text().await.expect("body"))
        });
        futures_util::future::join_all(requests).await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Sends the stop command now; the server winds down on its own threads.
        drop(self.handle.stop(false));
    }
}

pub fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Waits (bounded) until the service at `base_url` has `n` idle pooled PostgreSQL connections,
/// read from its `/metrics` — as a service that has been running finds them.
pub async fn wait_for_warm_pool(client: &reqwest::Client, base_url: &str, n: f64) {
    let idle = || async {
        let Ok(response) = client.get(format!("{base_url}/metrics")).send().await else {
            return 0.0;
        };
        let text = response.text().await.unwrap_or_default();
        testkit::prom::series(&text, "db_pool_connections")
            .into_iter()
            .find(|(labels, _)| labels == r#"{server="primary",state="idle"}"#)
            .map_or(0.0, |(_, idle)| idle)
    };
    let (limit, every) = (Duration::from_secs(15), Duration::from_millis(50));
    let polled = testkit::poll::until(limit, every, idle, |v| *v >= n).await;
    assert!(
        polled.done,
        "the pool never opened its {n} connections ({} idle)",
        polled.last
    );
}
