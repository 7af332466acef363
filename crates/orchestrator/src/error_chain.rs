//! One line from an error and its causes, for logs and start-up failures.

/// `a: b: c` from an error and its sources. A source whose text the
/// message before already ends with is left out (sqlx's errors repeat their
/// cause in their own message).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut last = out.clone();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !last.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        last = text;
        source = s.source();
    }
    out
}
