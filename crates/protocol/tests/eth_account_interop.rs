//! EIP-191 agreement with `eth-account`, byte for byte: the vectors in
//! `fixtures/eip191_vectors.json` were made by eth-account (see the script
//! beside them), not by this crate.

use peaqos_protocol::{Address, SecretKey, Signature, personal_message_hash};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Vector {
    name: String,
    private_key: String,
    address: String,
    message: String,
    message_hash: String,
    signature: String,
}

#[derive(Deserialize)]
struct Fixture {
    generator: String,
    vectors: Vec<Vector>,
}

fn fixture() -> Fixture {
    serde_json::from_str(include_str!("fixtures/eip191_vectors.json")).unwrap()
}

#[test]
fn fixture_comes_from_eth_account_and_covers_the_hard_cases() {
    let f = fixture();
    assert!(f.generator.starts_with("eth-account "), "{}", f.generator);
    let names: Vec<_> = f.vectors.iter().map(|v| v.name.as_str()).collect();
    for required in ["empty", "newlines", "unicode", "long-10000", "challenge"] {
        assert!(names.contains(&required), "missing vector {required}");
    }
}

#[test]
fn message_hashes_match() {
    for v in fixture().vectors {
        let ours = format!(
            "0x{}",
            hex::encode(personal_message_hash(v.message.as_bytes()))
        );
        assert_eq!(ours, v.message_hash, "vector {}", v.name);
    }
}

#[test]
fn their_signatures_verify_here() {
    for v in fixture().vectors {
        let sig = Signature::parse(&v.signature).unwrap_or_else(|e| panic!("{}: {e}", v.name));
        let signer = sig.recover_personal(v.message.as_bytes()).unwrap();
        assert_eq!(signer.checksummed(), v.address, "vector {}", v.name);
        assert_eq!(signer, Address::parse(&v.address).unwrap());
    }
}

#[test]
fn our_signatures_equal_theirs() {
    for v in fixture().vectors {
        let key = SecretKey::from_hex(&v.private_key).unwrap();
        assert_eq!(key.address().checksummed(), v.address, "vector {}", v.name);
        let ours = key.sign_personal(v.message.as_bytes());
        assert_eq!(ours.to_hex(), v.signature, "vector {}", v.name);
    }
}

/// The example in eth-account's own documentation of `Account.sign_message`.
#[test]
fn eth_account_documentation_vector() {
    let key =
        SecretKey::from_hex("0xb25c7db31feed9122727bf0939dc769a96564b2de4c4726d035b36ecf1e5b364")
            .unwrap();
    let message = "I\u{2665}SF".as_bytes();
    assert_eq!(
        hex::encode(personal_message_hash(message)),
        "1476abb745d423bf09273f1afd887d951181d25adc66c4834a70491911b7f750"
    );
    let sig = key.sign_personal(message);
    assert_eq!(
        sig.to_hex(),
        "0xe6ca9bba58c88611fad66a6ce8f996908195593807c4b38bd528d2cff09d4eb3\
         3e5bfbbf4d3e39b1a2fd816a7680c19ebebaf3a141b239934ad43cb33fcec8ce1c"
    );
    assert_eq!(sig.recover_personal(message).unwrap(), key.address());
}

/// A signature over one message never recovers to the signer for another.
#[test]
fn signatures_do_not_transfer_between_messages() {
    let f = fixture();
    let a = &f.vectors[0];
    let b = &f.vectors[1];
    let sig = Signature::parse(&a.signature).unwrap();
    if let Ok(addr) = sig.recover_personal(b.message.as_bytes()) {
        assert_ne!(addr.checksummed(), a.address);
    }
}
