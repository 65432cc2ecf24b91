//! The ceiling of the hot path, for BENCHMARKS.md: a bare actix-web handler that answers
//! `GET /template-details` with the same bytes and headers a cached `/template-details?id=1` of
//! the real service returns, with no middleware, no id parsing, no actor and no Redis behind it.
//! Whatever the service serves below this figure is what its own work costs.
//!
//! ```text
//! cargo run --release --example bare -- --from http://127.0.0.1:18081 --addr 127.0.0.1:18090
//! wrk -t2 -c200 -d10s 'http://127.0.0.1:18090/template-details?id=1'
//! ```
//!
//! `--from URL` fetches `URL/template-details?id=1` once at start (the body, `Content-Type` and
//! `X-Cache`); `--body FILE` reads the body from a file instead (sent as `application/json`
//! with `X-Cache: HIT`). Workers default to the number of cores, as the service's do.
//! `--prom` wraps the handler in actix-web-prom's middleware, configured as the service
//! configures it for its other routes: what that middleware would cost on the hot route.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::web::{self, Bytes};
use actix_web::{App, HttpResponse, HttpServer};
use actix_web_prom::{ActixMetricsConfiguration, PrometheusMetrics, PrometheusMetricsBuilder};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "A bare actix-web handler serving a cached template's exact response")]
struct Args {
    /// Base URL of a running service to copy the response of `/template-details?id=N` from.
    #[arg(long, conflicts_with = "body", required_unless_present = "body")]
    from: Option<String>,
    /// Which template to copy with --from.
    #[arg(long, default_value_t = 1)]
    id: i64,
    /// A file holding the body to serve (instead of --from).
    #[arg(long)]
    body: Option<PathBuf>,
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:18090")]
    addr: SocketAddr,
    /// HTTP worker threads [default: number of cores, like the service's HTTP_WORKERS]
    #[arg(long)]
    workers: Option<usize>,
    /// Count every request with actix-web-prom's middleware (and serve /metrics), as the
    /// service's routes other than /template-details are counted.
    #[arg(long)]
    prom: bool,
}

/// The response to replay: body and the headers that describe it.
#[derive(Clone)]
struct Canned {
    body: Bytes,
    headers: Vec<(HeaderName, HeaderValue)>,
}

#[actix_web::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let canned = match load(&args).await {
        Ok(canned) => canned,
        Err(e) => {
            eprintln!("bare: {e}");
            return ExitCode::FAILURE;
        }
    };
    let workers = args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let shown: Vec<String> = canned
        .headers
        .iter()
        .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
        .collect();
    eprintln!(
        "bare: serving {} bytes ({}) on http://{}/template-details with {workers} workers",
        canned.body.len(),
        shown.join(", "),
        args.addr
    );
    let prom = match args.prom.then(middleware).transpose() {
        Ok(prom) => prom,
        Err(e) => {
            eprintln!("bare: actix-web-prom: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Two servers rather than one with a switchable middleware: the bare handler's figure must
    // not include even a disabled middleware's branch.
    let server = match prom {
        None => HttpServer::new(move || App::new().configure(canned_route(canned.clone())))
            .workers(workers)
            .bind(args.addr)
            .map(HttpServer::run),
        Some(prom) => HttpServer::new(move || {
            App::new()
                .wrap(prom.clone())
                .configure(canned_route(canned.clone()))
        })
        .workers(workers)
        .bind(args.addr)
        .map(HttpServer::run),
    };
    let server = match server {
        Ok(server) => server,
        Err(e) => {
            eprintln!("bare: cannot listen on {}: {e}", args.addr);
            return ExitCode::FAILURE;
        }
    };
    match server.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bare: server error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `GET /template-details`, answered with the canned response.
fn canned_route(canned: Canned) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.route(
            "/template-details",
            web::get().to(move || {
                let canned = canned.clone();
                async move {
                    let mut response = HttpResponse::Ok();
                    for header in &canned.headers {
                        response.insert_header(header.clone());
                    }
                    response.body(canned.body)
                }
            }),
        );
    }
}

/// actix-web-prom's middleware with the seed's metric names and buckets, as the service has it.
fn middleware() -> Result<PrometheusMetrics, Box<dyn std::error::Error + Send + Sync>> {
    PrometheusMetricsBuilder::new("")
        .endpoint("/metrics")
        .exclude("/metrics")
        .mask_unmatched_patterns("UNMATCHED")
        .buckets(&singleflight::metrics::DURATION_BUCKETS)
        .metrics_configuration(
            ActixMetricsConfiguration::default()
                .http_requests_total_name("http_request_total")
                .http_requests_duration_seconds_name("http_request_duration_seconds"),
        )
        .build()
}

async fn load(args: &Args) -> Result<Canned, String> {
    if let Some(path) = &args.body {
        let body =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        return Ok(Canned {
            body: Bytes::from(body),
            headers: vec![
                (
                    HeaderName::from_static("content-type"),
                    HeaderValue::from_static("application/json"),
                ),
                (
                    HeaderName::from_static("x-cache"),
                    HeaderValue::from_static("HIT"),
                ),
            ],
        });
    }
    let base = args
        .from
        .as_deref()
        .unwrap_or_default()
        .trim_end_matches('/');
    let url = format!("{base}/template-details?id={}", args.id);
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    // The first request may load the template into the cache; the second is the cached answer.
    let mut last = None;
    for _ in 0..2 {
        let response = client.get(&url).send().await.map_err(|e| {
            format!(
                "cannot fetch {url}: {} (is the service running?)",
                chain(&e)
            )
        })?;
        if !response.status().is_success() {
            return Err(format!(
                "{url} answered {}; expected 200",
                response.status()
            ));
        }
        last = Some(response);
    }
    let response = last.ok_or_else(|| format!("no response from {url}"))?;
    // Copy what describes the body; Date, Content-Length and connection headers are the
    // server's own and actix-web writes them itself.
    let headers = ["content-type", "x-cache"]
        .iter()
        .filter_map(|name| {
            let value = response.headers().get(*name)?.to_str().ok()?;
            Some((
                HeaderName::from_static(name),
                HeaderValue::from_str(value).ok()?,
            ))
        })
        .collect();
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("cannot read the body of {url}: {e}"))?;
    Ok(Canned {
        body: Bytes::from(body.to_vec()),
        headers,
    })
}

/// An error with its causes ("... : tcp connect error: Connection refused (os error 111)").
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
