//! Spans to an OpenTelemetry collector over OTLP/HTTP, with the SDK's batch processor (its own
//! thread: exporting never runs on an HTTP worker or an actor).
//!
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (a setting, so also `--otel-exporter-otlp-endpoint`) is the
//! collector's base URL; spans go to its `/v1/traces`. The SDK reads the other standard variables
//! itself: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as it is, and enough on its own),
//! `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, the default, or `http/json`), `…_HEADERS`,
//! `…_TIMEOUT`, `…_COMPRESSION`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER` and its `_ARG`, and `OTEL_BSP_*`. `OTEL_SDK_DISABLED=true` or
//! `OTEL_TRACES_EXPORTER=none` turn export off.

use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::resource::{
    EnvResourceDetector, ResourceDetector, TelemetryResourceDetector,
};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;

/// Why spans cannot be exported as configured: start-up stops with it.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("OTLP/HTTP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("a tracing subscriber is already installed in this process")]
    Installed,
    #[error(
        "invalid {var}={value:?}: spans are exported over OTLP/HTTP, so expected http/protobuf \
         (the default) or http/json, with the endpoint on the collector's HTTP port (4318)"
    )]
    Protocol { var: &'static str, value: String },
}

const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";

fn env(var: &str) -> Option<String> {
    std::env::var(var)
        .ok()
        .filter(|value| !value.trim().is_empty())
}

/// Whether the standard variables turn export off.
fn disabled() -> bool {
    let sdk_disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let no_exporter = env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    sdk_disabled || no_exporter
}

/// Where spans go for the base URL `endpoint`, as the specification joins them.
pub(super) fn traces_url(endpoint: &str) -> String {
    format!("{}/v1/traces", endpoint.trim_end_matches('/'))
}

/// The tracer provider that exports spans, or `None` when nothing asks for export.
pub(super) fn provider(
    endpoint: Option<&str>,
) -> Result<Option<(SdkTracerProvider, String)>, ExportError> {
    let signal_endpoint = env(TRACES_ENDPOINT);
    if disabled() || (endpoint.is_none() && signal_endpoint.is_none()) {
        return Ok(None);
    }
    // An https collector is reached with rustls on the provider every TLS connection here uses.
    crate::tls::install_provider();
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
    // The SDK would use OTEL_EXPORTER_OTLP_TRACES_ENDPOINT before the generic variable, but a
    // URL given here wins over both: so it is given only when the signal's own is not set.
    let url = match (signal_endpoint, endpoint) {
        (Some(url), _) => url,
        (None, Some(endpoint)) => {
            let url = traces_url(endpoint);
            exporter = exporter.with_endpoint(url.clone());
            url
        }
        (None, None) => unreachable!("checked above"),
    };
    exporter = exporter.with_protocol(protocol()?);
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter.build()?)
        .with_resource(resource())
        .build();
    Ok(Some((provider, url)))
}

/// The protocol the standard variables ask for: `http/protobuf` unless they say `http/json`
/// (the SDK would prefer JSON when both are built in, and take a `grpc` it was not built with
/// for its default). Anything else stops start-up.
fn protocol() -> Result<Protocol, ExportError> {
    let asked = [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]
    .into_iter()
    .find_map(|var| env(var).map(|value| (var, value)));
    match asked {
        None => Ok(Protocol::HttpBinary),
        Some((_, value)) if value.trim() == "http/protobuf" => Ok(Protocol::HttpBinary),
        Some((_, value)) if value.trim() == "http/json" => Ok(Protocol::HttpJson),
        Some((var, value)) => Err(ExportError::Protocol { var, value }),
    }
}

/// `service.name` is `singleflight` unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES`
/// name it otherwise; `service.version` is this build's.
fn resource() -> Resource {
    let detectors: [Box<dyn ResourceDetector>; 2] = [
        Box::new(TelemetryResourceDetector),
        Box::new(EnvResourceDetector::new()),
    ];
    let mut resource = Resource::builder_empty()
        .with_service_name("singleflight")
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .with_detectors(&detectors);
    if let Some(name) = env("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(name);
    }
    resource.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_go_to_the_collectors_v1_traces() {
        assert_eq!(
            traces_url("http://collector:4318"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://collector:4318/otlp/"),
            "https://collector:4318/otlp/v1/traces"
        );
    }
}
