//! Sign and recover cost per operation, ours (k256) beside libsecp256k1
//! (through the `secp256k1` crate, used only here) in the same run.
//!
//! cargo bench -p peaqos-protocol --bench eip191

use criterion::{Criterion, criterion_group, criterion_main};
use peaqos_protocol::{SecretKey, Signature, personal_message_hash};
use secp256k1::ecdsa::{RecoverableSignature, RecoveryId};
use secp256k1::{Message, SecretKey as LibSecretKey};
use std::hint::black_box;

const KEY: &str = "b25c7db31feed9122727bf0939dc769a96564b2de4c4726d035b36ecf1e5b364";
const MESSAGE: &str = "peaqOS machine identity challenge\nOrchestrator: http://127.0.0.1:8080\n\
Identity: did:peaq:4242\nChallenge ID: chl_5v2m3q7k4z\n\
Nonce: 8b0e1f9a7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f\n\
Issued At: 2026-11-25T16:54:19.123Z\nExpires At: 2026-11-25T16:59:19.123Z";

fn bench(c: &mut Criterion) {
    let key = SecretKey::from_hex(KEY).unwrap();
    let sig = key.sign_personal(MESSAGE.as_bytes());
    let sig_hex = sig.to_hex();
    let prehash = personal_message_hash(MESSAGE.as_bytes());

    let mut g = c.benchmark_group("eip191");
    g.bench_function("hash/personal_message", |b| {
        b.iter(|| personal_message_hash(black_box(MESSAGE.as_bytes())));
    });
    g.bench_function("sign/k256", |b| {
        b.iter(|| key.sign_personal(black_box(MESSAGE.as_bytes())));
    });
    g.bench_function("recover/k256", |b| {
        b.iter(|| black_box(sig).recover_prehash(black_box(&prehash)).unwrap());
    });
    g.bench_function("decode+recover/k256", |b| {
        b.iter(|| {
            Signature::parse(black_box(&sig_hex))
                .unwrap()
                .recover_personal(black_box(MESSAGE.as_bytes()))
                .unwrap()
        });
    });

    let lib_key =
        LibSecretKey::from_secret_bytes(hex::decode(KEY).unwrap().try_into().unwrap()).unwrap();
    let msg = Message::from_digest(prehash);
    let bytes = sig.as_bytes();
    let recid = RecoveryId::try_from(i32::from(bytes[64] - 27)).unwrap();
    let lib_sig = RecoverableSignature::from_compact(&bytes[..64], recid).unwrap();
    g.bench_function("sign/libsecp256k1", |b| {
        b.iter(|| {
            RecoverableSignature::sign_ecdsa_recoverable(black_box(msg), black_box(&lib_key))
        });
    });
    g.bench_function("recover/libsecp256k1", |b| {
        b.iter(|| black_box(&lib_sig).recover_ecdsa(black_box(msg)).unwrap());
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
