//! What the service tells operators besides `/metrics`: log lines, spans, and request ids.
//!
//! - **Log lines** are env_logger's, filtered by `RUST_LOG`. A line written on behalf of a
//!   request — in the key owner or the database actor, and while spans are exported in the HTTP
//!   worker too — names the request's id (`request_id=…`): the id of the request itself, or,
//!   in a flight that several requests share, of the request that started it ([`logs`]).
//! - **Spans** ([`tracing`]): `request`; `flight`, under the request that started it (the
//!   requests that join it link to it); and one per stage of the flight: `near_cache`,
//!   `redis.read`, `lease.wait`, `db.load` with the database actor's `pool.checkout` and
//!   `db.query`, and `redis.write`.
//! - **Export**: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, the spans go to that collector over
//!   OTLP/HTTP ([`export`]), and every request has a span. Unset, a request that its worker's
//!   cache answers makes no span at all: the hot path pays for its request id and nothing more.

mod export;
pub mod logs;

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;

pub use export::ExportError;

/// What [`init`] needs: `RUST_LOG`'s filter and `OTEL_EXPORTER_OTLP_ENDPOINT`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TelemetrySettings {
    /// env_logger's filter (`RUST_LOG`).
    pub log_filter: String,
    /// The collector's base URL (`OTEL_EXPORTER_OTLP_ENDPOINT`): spans go to its `/v1/traces`.
    pub otlp_endpoint: Option<String>,
}

/// On once spans are exported: every request then has a span of its own.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are being exported (see [`init`]).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The process's logger and span subscriber, once installed; [`Telemetry::shutdown`] sends the
/// spans not yet exported.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Installs the logger (env_logger, with request ids) and the span subscriber, exporting over
/// OTLP/HTTP when the settings (or the standard `OTEL_*` variables) ask for it. Once per process.
pub fn init(settings: &TelemetrySettings) -> Result<Telemetry, ExportError> {
    logs::install(&settings.log_filter);
    let (provider, url) = export::provider(settings.otlp_endpoint.as_deref())?.unzip();
    let exporter = provider.as_ref().map(|provider| {
        use opentelemetry::trace::TracerProvider;
        // What a span says is in its fields: no source location, thread, target or busy/idle
        // timings, each of which costs every span (and timings every poll of a request).
        tracing_opentelemetry::layer()
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_tracer(provider.tracer("singleflight"))
    });
    let subscriber = tracing_subscriber::registry()
        .with(logs::Wanted)
        .with(logs::ToLog)
        .with(logs::RequestIds)
        .with(exporter);
    tracing::subscriber::set_global_default(subscriber).map_err(|_| ExportError::Installed)?;
    if let Some(url) = url {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        EXPORTING.store(true, Ordering::Relaxed);
        log::info!("exporting spans over OTLP/HTTP to {url}");
    }
    Ok(Telemetry { provider })
}

impl Telemetry {
    /// Sends the spans still queued (within the exporter's timeout) and stops exporting.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            EXPORTING.store(false, Ordering::Relaxed);
            if let Err(e) = provider.shutdown() {
                log::warn!("the last spans could not be exported: {e}");
            }
        }
    }
}
