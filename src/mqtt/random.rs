//! Unique-enough suffixes for client ids and reply topics. Nothing here
//! protects a secret: who may read or write reply topics is the broker
//! ACL's business.

/// 16 hex digits from the OS random source (falling back to the clock,
/// which is unique enough for a client id if the source ever fails).
pub(crate) fn nonce() -> String {
    let n = getrandom::u64().unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| {
                u64::from(d.subsec_nanos()) ^ d.as_secs().rotate_left(32)
            })
    });
    format!("{n:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_differ() {
        let a = nonce();
        assert_eq!(a.len(), 16);
        assert!((0..100).all(|_| nonce() != a));
    }
}
