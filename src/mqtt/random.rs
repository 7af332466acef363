//! Non-cryptographic randomness for jitter and request nonces.
//!
//! `RandomState` is seeded from the OS once per thread and advanced on every
//! call, which is all jitter and unique-enough reply topics need, without
//! another dependency. Nothing here protects a secret: who may read or write
//! reply topics is the broker ACL's business.

use std::hash::{BuildHasher, Hasher};

fn random_u64() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// A number in `[0, 1)`.
pub(crate) fn unit() -> f64 {
    // The top 53 bits convert to f64 exactly.
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// 16 hex digits, for reply topics, correlation ids and client ids.
pub(crate) fn nonce() -> String {
    format!("{:016x}", random_u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_in_range_and_vary() {
        let samples: Vec<f64> = (0..64).map(|_| unit()).collect();
        assert!(samples.iter().all(|u| (0.0..1.0).contains(u)));
        assert!(
            samples
                .iter()
                .any(|u| (u - samples[0]).abs() > f64::EPSILON)
        );
    }

    #[test]
    fn nonces_differ() {
        let a = nonce();
        assert_eq!(a.len(), 16);
        assert!((0..100).all(|_| nonce() != a));
    }
}
