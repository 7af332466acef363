//! Property tests: every parser answers arbitrary input with a value or a
//! typed error, never a panic, and accepted values round-trip canonically.

use peaqos_protocol::{Address, ChallengeMessage, IdentityRef, Signature};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn identity_parser_total(s in ".{0,200}") {
        if let Ok(id) = IdentityRef::parse(&s) {
            // Canonical text re-parses to the same identity and is a fixed point.
            let canon = id.canonical();
            prop_assert_eq!(IdentityRef::parse(&canon).unwrap(), id.clone());
            prop_assert_eq!(IdentityRef::parse(&canon).unwrap().canonical(), canon);
        }
    }

    #[test]
    fn identity_parser_on_near_misses(
        prefix in prop::sample::select(vec!["did:peaq:", "peaqos:machine:", "did:peaq:0x", ""]),
        body in "[0-9a-fA-F+\\- .x٠-٩０-９]{0,90}",
    ) {
        let input = format!("{prefix}{body}");
        if let Ok(id) = IdentityRef::parse(&input) {
            prop_assert!(id.canonical().starts_with("did:peaq:"));
            prop_assert!(id.canonical().bytes().all(|b| b.is_ascii_graphic()));
        }
    }

    #[test]
    fn decimal_ids_keep_their_digits(n in any::<u128>()) {
        let id = IdentityRef::parse(&format!("peaqos:machine:{n}")).unwrap();
        prop_assert_eq!(id.canonical(), format!("did:peaq:{n}"));
    }

    #[test]
    fn signature_decoder_total(s in "(0x)?[0-9a-fA-Fg ]{0,140}") {
        if let Ok(sig) = Signature::parse(&s) {
            prop_assert!(matches!(sig.as_bytes()[64], 27 | 28));
            let _ = sig.recover_personal(b"anything");
        }
    }

    #[test]
    fn signature_bytes_total(bytes in prop::collection::vec(any::<u8>(), 65)) {
        let arr: [u8; 65] = bytes.try_into().unwrap();
        if let Ok(sig) = Signature::from_bytes(arr) {
            prop_assert_eq!(Signature::parse(&sig.to_hex()).unwrap(), sig);
            let _ = sig.recover_personal(b"message");
        }
    }

    #[test]
    fn address_parser_total(s in "(0x)?[0-9a-fA-Fz]{0,44}") {
        if let Ok(a) = Address::parse(&s) {
            prop_assert_eq!(Address::parse(&a.checksummed()).unwrap(), a);
        }
    }

    #[test]
    fn challenge_parser_total(s in "(peaqOS machine identity challenge\n)?[A-Za-z:0-9 \n\\-.]{0,300}") {
        let _ = ChallengeMessage::parse(&s);
    }
}
