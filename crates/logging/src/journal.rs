//! The journald path: a tracing [`Layer`] that turns every event into a
//! `log::Record` whose key-values are the event's fields (and those of the
//! spans it happens in), and hands it to a `log::Log` sink, in production
//! `systemd_journal_logger::JournalLog`. That logger sends each key-value
//! as its own journal field, upper-cased: an event's `state`,
//! `machine_id` and `error_code` become `STATE=`, `MACHINE_ID=` and
//! `ERROR_CODE=`, which `journalctl -u peaqos-agent STATE=backoff` and
//! log shippers can select on without parsing message text.
//!
//! Kept rather than replaced by `tracing-journald` (tokio-rs), on a
//! measurement (2026-12-02, `cargo build --profile minsize -p peaqos-agent`):
//! with `tracing_journald::layer()` in its place the stripped agent was 672 B
//! larger (3,661,280 B against 3,660,608 B), and that layer sends other
//! fields: a span's field next to an event's of the same name twice (no
//! "innermost wins"), `SPAN_NAME=` for every enclosing span, and records
//! from the `log` crate under the target `log` rather than their own. The
//! `log` crate is linked anyway (rustls and rumqttc log through it), so
//! this path adds only `systemd-journal-logger` (one small crate, no
//! dependencies of its own beyond `log` and `rustix`).

use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::fields::Fields;

/// A tracing layer that writes events to a `log::Log` sink with their
/// fields as structured key-values.
#[derive(Debug)]
pub struct JournalLayer<L> {
    sink: L,
}

impl<L: log::Log> JournalLayer<L> {
    /// A layer writing to `sink` (`JournalLog` in production; any
    /// `log::Log` in tests).
    pub fn new(sink: L) -> Self {
        Self { sink }
    }
}

/// A span's fields, kept in the span's extensions so that events inside it
/// carry them (e.g. a `machine_id` recorded once on the loop's span).
#[derive(Debug)]
struct SpanFields(Fields);

impl<S, L> Layer<S> for JournalLayer<L>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    L: log::Log + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        span.extensions_mut().insert(SpanFields(fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(SpanFields(fields)) = extensions.get_mut::<SpanFields>() {
            values.record(fields);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        // Fields of the enclosing spans, outermost first, so that an inner
        // span's or the event's own value of the same name wins.
        let mut fields = Fields::default();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(SpanFields(span_fields)) = span.extensions().get::<SpanFields>() {
                    fields.extend_from(span_fields);
                }
            }
        }
        let mut own = Fields::default();
        event.record(&mut own);
        let message = own.message_text();
        fields.extend_from(&own);

        // Records bridged from the `log` crate carry their real target,
        // file and line in `log.*` fields; tracing-log puts them back.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let key_values: Vec<(&str, &str)> = fields
            .pairs
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        self.sink.log(
            &log::Record::builder()
                .args(format_args!("{message}"))
                .level(log_level(*meta.level()))
                .target(meta.target())
                .module_path(meta.module_path())
                .file(meta.file())
                .line(meta.line())
                .key_values(&key_values)
                .build(),
        );
    }
}

fn log_level(level: Level) -> log::Level {
    match level {
        Level::ERROR => log::Level::Error,
        Level::WARN => log::Level::Warn,
        Level::INFO => log::Level::Info,
        Level::DEBUG => log::Level::Debug,
        Level::TRACE => log::Level::Trace,
    }
}
