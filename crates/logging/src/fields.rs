//! Collecting the fields of tracing events and spans as text, for the
//! journal, where every field becomes a `KEY=value` journal field.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};

/// Name of the field that holds an event's message.
const MESSAGE: &str = "message";

/// Fields bridged from the `log` crate by `tracing-log`: their contents
/// already go into the record's target, module, file and line.
const LOG_BRIDGE_PREFIX: &str = "log.";

/// The fields of one event or span, in the order they were recorded, with
/// the message (if any) kept apart.
#[derive(Debug, Default, Clone)]
pub(crate) struct Fields {
    pub(crate) message: Option<String>,
    pub(crate) pairs: Vec<(&'static str, String)>,
}

impl Fields {
    /// Sets `name` to `value`, replacing an earlier value of the same name
    /// (a span field recorded twice, or an event field shadowing a span's).
    pub(crate) fn set(&mut self, name: &'static str, value: String) {
        if let Some(slot) = self.pairs.iter_mut().find(|(n, _)| *n == name) {
            slot.1 = value;
        } else {
            self.pairs.push((name, value));
        }
    }

    pub(crate) fn extend_from(&mut self, other: &Fields) {
        for (name, value) in &other.pairs {
            self.set(name, value.clone());
        }
    }

    /// The human-readable text: the message followed by ` key=value` for
    /// each field, as the stderr formatter writes it, so that plain
    /// `journalctl` output (which shows only MESSAGE) stays informative.
    pub(crate) fn message_text(&self) -> String {
        let mut text = self.message.clone().unwrap_or_default();
        for (name, value) in &self.pairs {
            if !text.is_empty() {
                text.push(' ');
            }
            // Writing to a String cannot fail.
            let _ = write!(text, "{name}={value}");
        }
        text
    }

    fn record(&mut self, field: &Field, value: String) {
        let name = field.name();
        if name == MESSAGE {
            self.message = Some(value);
        } else if !name.starts_with(LOG_BRIDGE_PREFIX) {
            self.set(name, value);
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, value.to_owned());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record(field, value.to_string());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.record(field, value.to_string());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.record(field, value.to_string());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.record(field, error_chain(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record(field, format!("{value:?}"));
    }
}

/// `outer: cause: root cause`: our errors' `Display` never repeats the
/// cause, so the whole chain has to be walked to tell the full story. A
/// cause whose text the previous message already ends with is left out
/// (some foreign errors repeat their cause in their own message).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut last = text.clone();
    let mut source = error.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !last.ends_with(&next) {
            let _ = write!(text, ": {next}");
        }
        last = next;
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read key file /etc/k")]
    struct Outer {
        source: std::io::Error,
    }

    #[test]
    fn error_chain_names_every_cause_once() {
        let error = Outer {
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        };
        assert_eq!(
            error_chain(&error),
            "cannot read key file /etc/k: no such file"
        );
    }

    #[test]
    fn later_values_replace_earlier_ones_in_place() {
        let mut fields = Fields::default();
        fields.set("state", "starting".into());
        fields.set("machine_id", "m-1".into());
        fields.set("state", "active".into());
        assert_eq!(
            fields.pairs,
            vec![
                ("state", "active".to_owned()),
                ("machine_id", "m-1".to_owned())
            ]
        );
    }

    #[test]
    fn message_text_reads_like_the_stderr_format() {
        let fields = Fields {
            message: Some("registered".into()),
            pairs: vec![("state", "active".into()), ("attempt", "2".into())],
        };
        assert_eq!(fields.message_text(), "registered state=active attempt=2");
        assert_eq!(Fields::default().message_text(), "");
    }
}
