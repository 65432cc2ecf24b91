//! Log lines: env_logger writes them, as `RUST_LOG` filters them, each naming the request it was
//! written for.
//!
//! A `request` span carries its request's id as the field `request_id`; [`RequestIds`] keeps it
//! with the span, and a line written while any span under it is entered (a flight, one of its
//! stages, the database actor's batch) ends its prefix with `request_id=…`. Lines written outside
//! any request (start-up, the change listener, probes) have none. While spans are exported, each
//! line is also an event of the span it was written in, so a trace shows its warnings.
//!
//! Some dependencies (actix-web, actix-http, actix-server) write through `tracing` rather than
//! `log`: [`ToLog`] hands their events to the same logger, and [`Wanted`] lets through only
//! this service's spans and what `RUST_LOG` would print, decided once per call site, so that a
//! dependency's per-request `trace!` costs nothing (as it did before any subscriber was set).

use std::cell::Cell;
use std::fmt::Write as _;
use std::io::Write;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
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

/// The crate whose spans are always made (see [`Wanted`]).
const OURS: &str = "singleflight";

/// What reaches the span subscriber: this service's spans and events, and a dependency's only
/// when `RUST_LOG` would print it (a global filter: everything else is never built).
pub struct Wanted;

impl Wanted {
    fn wants(metadata: &Metadata<'_>) -> bool {
        let target = metadata.target();
        target.starts_with(OURS) || from_log(metadata) || {
            let as_log = log::Metadata::builder()
                .level(log_level(*metadata.level()))
                .target(target)
                .build();
            log::logger().enabled(&as_log)
        }
    }
}

impl<S: Subscriber> Layer<S> for Wanted {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        // Decided once per call site: RUST_LOG does not change while the service runs.
        if Self::wants(metadata) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        Self::wants(metadata)
    }
}

/// Whether an event was made from a log line (by [`Logger`], for the span it was written in).
fn from_log(metadata: &Metadata<'_>) -> bool {
    metadata.fields().field("log.target").is_some()
}

fn log_level(level: tracing::Level) -> log::Level {
    match level {
        tracing::Level::ERROR => log::Level::Error,
        tracing::Level::WARN => log::Level::Warn,
        tracing::Level::INFO => log::Level::Info,
        tracing::Level::DEBUG => log::Level::Debug,
        tracing::Level::TRACE => log::Level::Trace,
    }
}

thread_local! {
    /// Set while [`ToLog`] writes an event: the line is not made into an event again.
    static FROM_TRACING: Cell<bool> = const { Cell::new(false) };
}

/// Writes a dependency's `tracing` events as log lines, as `tracing` itself does while no
/// subscriber is set.
pub struct ToLog;

impl<S: Subscriber> Layer<S> for ToLog {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let metadata = event.metadata();
        if from_log(metadata) {
            return;
        }
        let mut text = Text::default();
        event.record(&mut text);
        FROM_TRACING.with(|from| from.set(true));
        log::logger().log(
            &log::Record::builder()
                .level(log_level(*metadata.level()))
                .target(metadata.target())
                .module_path(metadata.module_path())
                .file(metadata.file())
                .line(metadata.line())
                .args(format_args!("{}", text.0))
                .build(),
        );
        FROM_TRACING.with(|from| from.set(false));
    }
}

/// An event's message and then its other fields, `name=value`.
#[derive(Default)]
struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = &mut self.0;
        let gap = if text.is_empty() { "" } else { " " };
        let _ = match field.name() {
            "message" => write!(text, "{gap}{value:?}"),
            name => write!(text, "{gap}{name}={value:?}"),
        };
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
        if super::exporting() && !FROM_TRACING.with(Cell::get) {
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
