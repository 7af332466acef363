//! Opaque identifiers: `mach_` and `chl_` followed by 26 characters of
//! lowercase base32 (128 random bits), safe in URLs and in challenge
//! messages without escaping.

const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
const RANDOM_CHARS: usize = 26;
pub const MACHINE_PREFIX: &str = "mach_";
pub const CHALLENGE_PREFIX: &str = "chl_";
/// Longest id we ever issue; longer input cannot be ours.
pub const MAX_ID_LEN: usize = 5 + RANDOM_CHARS;

/// Why no id could be made.
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random source failed")]
pub struct RandomError;

pub fn machine_id() -> Result<String, RandomError> {
    with_prefix(MACHINE_PREFIX)
}

pub fn challenge_id() -> Result<String, RandomError> {
    with_prefix(CHALLENGE_PREFIX)
}

/// 32 random bytes as 64 hex digits.
pub fn nonce() -> Result<String, RandomError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|_| RandomError)?;
    Ok(hex::encode(bytes))
}

/// Whether `text` could be an id we issued with `prefix` (so that anything
/// else is refused before it reaches the database).
pub fn looks_like(prefix: &str, text: &str) -> bool {
    text.strip_prefix(prefix).is_some_and(|rest| {
        rest.len() == RANDOM_CHARS && rest.bytes().all(|b| ALPHABET.contains(&b))
    })
}

fn with_prefix(prefix: &str) -> Result<String, RandomError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|_| RandomError)?;
    Ok(with_prefix_bytes(prefix, &bytes))
}

/// `prefix` and `bytes` in lowercase base32 without padding characters
/// (the last character's unused bits are zero).
pub fn with_prefix_bytes(prefix: &str, bytes: &[u8]) -> String {
    let mut out = String::with_capacity(prefix.len() + (bytes.len() * 8).div_ceil(5));
    out.push_str(prefix);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for &byte in bytes {
        acc = (acc << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((acc >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((acc << (5 - bits)) & 31) as usize]));
    }
    out
}

/// The bytes of [`with_prefix_bytes`]'s text (after the prefix), only in
/// its one spelling: a character outside the alphabet, a length no byte
/// count gives, or unused bits that are not zero make it `None`.
pub fn decode_base32(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 5 / 8);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for b in text.bytes() {
        let value = ALPHABET.iter().position(|&a| a == b)?;
        acc = (acc << 5) | u32::try_from(value).ok()?;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).ok()?);
        }
    }
    // Leftover bits: fewer than five, and all zero.
    (bits < 5 && acc & ((1 << bits) - 1) == 0).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_documented_shape_and_differ() {
        let a = machine_id().unwrap();
        let b = machine_id().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), MAX_ID_LEN);
        assert!(looks_like(MACHINE_PREFIX, &a), "{a}");
        assert!(!looks_like(CHALLENGE_PREFIX, &a));
        let c = challenge_id().unwrap();
        assert!(looks_like(CHALLENGE_PREFIX, &c), "{c}");
        assert!(!looks_like(MACHINE_PREFIX, "mach_../../etc/passwd"));
        assert_eq!(nonce().unwrap().len(), 64);
    }

    #[test]
    fn base32_round_trips_in_one_spelling_only() {
        for len in 0..12 {
            let bytes: Vec<u8> = (0..len)
                .map(|i: u8| i.wrapping_mul(37).wrapping_add(11))
                .collect();
            let text = with_prefix_bytes("", &bytes);
            assert_eq!(decode_base32(&text), Some(bytes), "{text}");
        }
        // One byte is two characters, the second with two unused bits.
        assert_eq!(decode_base32("ae"), Some(vec![1]));
        assert_eq!(decode_base32("af"), None, "unused bits set");
        assert_eq!(decode_base32("a"), None, "no whole byte");
        assert_eq!(decode_base32("A1"), None);
    }
}
