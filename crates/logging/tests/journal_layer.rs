//! The tracing -> `log::Record` conversion of the journal path: every
//! event field and every field of the enclosing spans arrives as a
//! structured key-value (which `JournalLog` sends as a journal field), not
//! only inside the message text.

use std::sync::{Arc, Mutex};

use peaqos_logging::JournalLayer;
use tracing_subscriber::prelude::*;

#[derive(Debug, Clone)]
struct Captured {
    level: log::Level,
    target: String,
    message: String,
    fields: Vec<(String, String)>,
}

#[derive(Debug, Clone, Default)]
struct Capture(Arc<Mutex<Vec<Captured>>>);

struct CollectKv<'a>(&'a mut Vec<(String, String)>);

impl<'kvs> log::kv::VisitSource<'kvs> for CollectKv<'_> {
    fn visit_pair(
        &mut self,
        key: log::kv::Key<'kvs>,
        value: log::kv::Value<'kvs>,
    ) -> Result<(), log::kv::Error> {
        self.0.push((key.to_string(), value.to_string()));
        Ok(())
    }
}

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let mut fields = Vec::new();
        record
            .key_values()
            .visit(&mut CollectKv(&mut fields))
            .unwrap();
        self.0.lock().unwrap().push(Captured {
            level: record.level(),
            target: record.target().to_owned(),
            message: record.args().to_string(),
            fields,
        });
    }

    fn flush(&self) {}
}

fn field<'a>(record: &'a Captured, name: &str) -> Option<&'a str> {
    record
        .fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[derive(Debug, thiserror::Error)]
#[error("cannot reach the orchestrator")]
struct Unreachable {
    source: std::io::Error,
}

#[test]
fn event_and_span_fields_become_key_values() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(JournalLayer::new(capture.clone()));
    tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!("registration", machine_id = "m-42", state = "starting");
        let _entered = span.enter();
        let error = Unreachable {
            source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"),
        };
        tracing::warn!(
            state = "backoff",
            error_code = "RATE_LIMITED",
            attempt = 3_u64,
            error = &error as &(dyn std::error::Error + 'static),
            "retrying later"
        );
    });

    let records = capture.0.lock().unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert_eq!(record.level, log::Level::Warn);
    assert_eq!(record.target, module_path!());
    // From the span.
    assert_eq!(field(record, "machine_id"), Some("m-42"));
    // The event's own value shadows the span's, and appears once.
    assert_eq!(field(record, "state"), Some("backoff"));
    assert_eq!(
        record.fields.iter().filter(|(k, _)| k == "state").count(),
        1
    );
    assert_eq!(field(record, "error_code"), Some("RATE_LIMITED"));
    assert_eq!(field(record, "attempt"), Some("3"));
    // Errors carry their whole chain.
    assert_eq!(
        field(record, "error"),
        Some("cannot reach the orchestrator: refused")
    );
    // The message keeps the event's fields readable for plain journalctl.
    assert!(
        record
            .message
            .starts_with("retrying later state=backoff error_code=RATE_LIMITED attempt=3"),
        "{}",
        record.message
    );
    assert!(
        field(record, "message").is_none(),
        "the message is MESSAGE, not a field"
    );
}

#[test]
fn fields_recorded_on_a_span_later_are_carried() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(JournalLayer::new(capture.clone()));
    tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!("loop", machine_id = tracing::field::Empty);
        let _entered = span.enter();
        tracing::info!("before");
        span.record("machine_id", "m-9");
        tracing::info!("after");
    });
    let records = capture.0.lock().unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(field(&records[0], "machine_id"), None);
    assert_eq!(field(&records[1], "machine_id"), Some("m-9"));
    assert_eq!(records[1].message, "after");
}

#[test]
fn log_crate_records_keep_their_target() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(JournalLayer::new(capture.clone()));
    tracing::subscriber::with_default(subscriber, || {
        // What tracing-log's bridge produces for `log::warn!` in a
        // dependency such as rustls.
        let record = log::Record::builder()
            .args(format_args!("handshake failed"))
            .level(log::Level::Warn)
            .target("rustls::conn")
            .module_path_static(Some("rustls::conn"))
            .file_static(Some("src/conn.rs"))
            .line(Some(7))
            .build();
        tracing_log::format_trace(&record).unwrap();
    });
    let records = capture.0.lock().unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].target, "rustls::conn");
    assert_eq!(records[0].message, "handshake failed");
    assert!(
        records[0]
            .fields
            .iter()
            .all(|(k, _)| !k.starts_with("log.")),
        "{:?}",
        records[0].fields
    );
}
