//! Log lines: env_logger writes them, as `RUST_LOG` filters them, each naming the request it was
//! written for.
//!
//! A `request` span carries its request's id as the field `request_id`; [`RequestIds`] keeps it
//! with the span, and a line written while any span under it is entered (a flight, one of its
//! stages, the database actor's batch) ends its prefix with `request_id=…`. Lines written outside
//! any request (start-up, the change listener, probes) have none. While spans are exported, each
//! line is also an event of the span it was written in, so a trace shows its warnings.

use std::io::Write;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The field of a `request` span that holds its id.
pub const REQUEST_ID: &str = "request_id";

/// A request's id, kept with its span.
#[derive(Debug, Clone)]
struct RequestIdOf(String);

/// Keeps the `request_id` of each span that has one, for [`current_request_id`].
pub struct RequestIds;

impl<S> Layer<S> for RequestIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().fields().field(REQUEST_ID).is_none() {
            return;
        }
        let mut found = Found(None);
        attrs.record(&mut found);
        if let (Some(request_id), Some(span)) = (found.0, ctx.span(id)) {
            span.extensions_mut().insert(RequestIdOf(request_id));
        }
    }
}

struct Found(Option<String>);

impl Visit for Found {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == REQUEST_ID {
            self.0 = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == REQUEST_ID {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

/// The id of the request whose span (or a span under it) this thread is in, if any.
pub fn current_request_id() -> Option<String> {
    tracing::dispatcher::get_default(|dispatch| {
        let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
        let current = dispatch.current_span();
        let id = current.id()?;
        let span = registry.span(id)?;
        span.scope()
            .find_map(|span| span.extensions().get::<RequestIdOf>().map(|r| r.0.clone()))
    })
}

/// The process's logger: env_logger, with [`write_line`]'s format; while spans are exported, a
/// line that passes the filter is also an event of the current span.
struct Logger {
    lines: env_logger::Logger,
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.lines.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.lines.matches(record) {
            return;
        }
        self.lines.log(record);
        if super::exporting() {
            let _ = tracing_log::format_trace(record);
        }
    }

    fn flush(&self) {
        self.lines.flush();
    }
}

/// Installs the logger with `filter` (env_logger's syntax); `RUST_LOG_STYLE` sets colours as
/// env_logger has it. A second call (tests) leaves the first logger.
pub fn install(filter: &str) {
    let lines = env_logger::Builder::new()
        .parse_filters(filter)
        .parse_write_style(&std::env::var("RUST_LOG_STYLE").unwrap_or_default())
        .format(|buf, record| {
            let style = buf.default_level_style(record.level());
            let level = format!("{style}{:<5}{style:#}", record.level());
            let time = buf.timestamp();
            write_line(buf, time, &level, record, current_request_id().as_deref())
        })
        .build();
    let max_level = lines.filter();
    if log::set_boxed_logger(Box::new(Logger { lines })).is_ok() {
        log::set_max_level(max_level);
    }
}

/// One line: env_logger's own prefix (time, level, module), the request's id when there is one,
/// and the message.
pub fn write_line(
    out: &mut impl Write,
    time: impl std::fmt::Display,
    level: &str,
    record: &log::Record<'_>,
    request_id: Option<&str>,
) -> std::io::Result<()> {
    write!(out, "[{time} {level} {}", record.target())?;
    if let Some(id) = request_id {
        write!(out, " {REQUEST_ID}={id}")?;
    }
    writeln!(out, "] {}", record.args())
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    fn line(request_id: Option<&str>) -> String {
        let mut out = Vec::new();
        let record = log::Record::builder()
            .args(format_args!("loading template 7 failed"))
            .level(log::Level::Warn)
            .target("singleflight::actors::db")
            .build();
        write_line(
            &mut out,
            "2026-12-06T04:00:00Z",
            "WARN ",
            &record,
            request_id,
        )
        .expect("written");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn a_line_names_its_request_when_it_has_one() {
        assert_eq!(
            line(Some("abc-123")),
            "[2026-12-06T04:00:00Z WARN  singleflight::actors::db request_id=abc-123] loading \
             template 7 failed\n"
        );
        assert_eq!(
            line(None),
            "[2026-12-06T04:00:00Z WARN  singleflight::actors::db] loading template 7 failed\n"
        );
    }

    #[test]
    fn spans_under_a_request_find_its_id_and_others_find_none() {
        let subscriber = tracing_subscriber::registry().with(RequestIds);
        tracing::subscriber::with_default(subscriber, || {
            assert_eq!(current_request_id(), None, "outside any span");
            let request = tracing::info_span!("request", request_id = %"req-1");
            let flight = tracing::info_span!(parent: &request, "flight");
            let stage = tracing::info_span!(parent: &flight, "db.load");
            stage.in_scope(|| assert_eq!(current_request_id().as_deref(), Some("req-1")));
            let other = tracing::info_span!("renewal");
            other.in_scope(|| assert_eq!(current_request_id(), None, "not a request's"));
            // A flight outlives the request that started it: its id stays with the flight.
            drop(request);
            flight.in_scope(|| assert_eq!(current_request_id().as_deref(), Some("req-1")));
        });
    }
}
