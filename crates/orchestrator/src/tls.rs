//! The process's TLS crypto provider.

/// Makes ring the process's rustls crypto provider, once. reqwest is built
/// without a bundled provider (its default would add aws-lc); anything in
/// this process that builds a reqwest client (tests, benchmarks) calls this
/// first.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means another provider is installed already, which serves too.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
