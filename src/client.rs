//! The orchestrator's HTTP API as the agent uses it: typed requests, typed
//! errors (clients branch on the error `code`), and the evidence about the
//! server's clock that every response carries.

use std::time::{Duration, SystemTime};

use peaqos_protocol::{
    Challenge, CreateChallengeRequest, CreateMachineRequest, ErrorCode, ErrorResponse, IdentityRef,
    ItemResponse, ListResponse, Machine, UpdateMachineRequest, paths,
};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::config::OrchestratorConfig;
use crate::local_code::{Code, LocalCode};
use crate::secrets::{self, SecretError};
use crate::tls_failure::TlsFailure;

/// Responses larger than this are refused: the agent's answers are a few
/// kilobytes, and a small board must not be made to buffer a flood.
const MAX_BODY: usize = 1024 * 1024;
/// Server messages are reported to operators; long ones are cut.
const MAX_MESSAGE: usize = 300;
/// The SDK's readiness route (the contract's "observability calls").
const API_READINESS: &str = "/api/v1/readiness";

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The orchestrator answered with an error envelope.
    #[error("orchestrator answered HTTP {status} {code}: {message}")]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
        details: Option<serde_json::Value>,
        retry_after: Option<Duration>,
    },
    #[error("cannot reach the orchestrator at {url}")]
    Network {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// A TLS check failed: which one, and what to fix, in the message.
    #[error("TLS with the orchestrator at {url} failed (local clock {local}): {}", failure.advice())]
    Tls {
        url: String,
        failure: TlsFailure,
        /// This machine's wall clock when it failed.
        local: peaqos_protocol::Timestamp,
        #[source]
        source: reqwest::Error,
    },
    #[error("request to {url} timed out")]
    Timeout { url: String },
    /// An answer that is not the contract's (a proxy's error page, garbage).
    #[error("unexpected answer from {url} (HTTP {status}): {reason}")]
    BadResponse {
        url: String,
        status: u16,
        reason: String,
        retry_after: Option<Duration>,
    },
    #[error("machine id {id:?} is not URL-safe; refusing to use it")]
    InvalidMachineId { id: String },
}

impl ClientError {
    /// The error `code` to report: the server's, or a local one.
    pub fn code(&self) -> Code {
        match self {
            Self::Api { code, .. } => Code::Server(code.clone()),
            Self::Network { .. } => LocalCode::Network.into(),
            Self::Tls { failure, .. } if failure.is_clock() => LocalCode::Clock.into(),
            Self::Tls { .. } => LocalCode::Tls.into(),
            Self::Timeout { .. } => LocalCode::Timeout.into(),
            Self::BadResponse { .. } | Self::InvalidMachineId { .. } => {
                LocalCode::BadResponse.into()
            }
        }
    }

    /// Worth retrying unchanged after a backoff: the server or the path to
    /// it is having trouble, not our request.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Network { .. } | Self::Timeout { .. } => true,
            Self::Api { status, code, .. } => {
                code.is_transient() || *status == 429 || *status >= 500
            }
            // A success (or redirect) whose body is not the contract's is a
            // server we cannot talk to, not a blip: retrying it at backoff
            // speed only asks it the same question every few seconds.
            Self::BadResponse { status, .. } => *status == 429 || *status >= 500,
            // Nothing changes until the clock or a file does: see
            // `registration::failure` for how soon each is tried again.
            Self::Tls { .. } | Self::InvalidMachineId { .. } => false,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Api { retry_after, .. } | Self::BadResponse { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } | Self::BadResponse { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether this is an envelope with `code`.
    pub fn is(&self, want: &ErrorCode) -> bool {
        matches!(self, Self::Api { code, .. } if code == want)
    }
}

/// When and how a response arrived: the evidence for [`crate::clock`].
#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub at: Instant,
    pub local: SystemTime,
    /// The `Date` header, when present and valid.
    pub date: Option<SystemTime>,
}

/// A decoded answer and when it arrived.
#[derive(Debug)]
pub struct Response<T> {
    pub value: T,
    pub received: Received,
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    #[error("cannot read the orchestrator API key")]
    ApiKey(#[source] SecretError),
    #[error("the orchestrator API key file holds characters not allowed in an HTTP header")]
    ApiKeyFormat,
    #[cfg(feature = "tls")]
    #[error("cannot set up TLS to the orchestrator")]
    Tls(#[source] crate::tls::TlsError),
    #[error("cannot set up the HTTP client")]
    Http(#[source] reqwest::Error),
}

/// An orchestrator client.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
}

/// Installs rustls' ring provider once per process (reqwest is built
/// without a provider of its own, which would pull in aws-lc).
pub fn install_tls_provider() {
    #[cfg(feature = "tls")]
    {
        // Already installed (by us or the MQTT client) is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

impl Client {
    /// Builds a client, reading the API key file if one is configured.
    pub fn new(config: &OrchestratorConfig) -> Result<Self, ClientBuildError> {
        install_tls_provider();
        let mut headers = HeaderMap::new();
        if let Some(location) = &config.api_key_file {
            let key = secrets::resolve(location)
                .and_then(|path| secrets::read(&path))
                .map_err(ClientBuildError::ApiKey)?;
            let mut value =
                HeaderValue::from_str(key.trim()).map_err(|_| ClientBuildError::ApiKeyFormat)?;
            // Keeps the key out of reqwest's Debug output.
            value.set_sensitive(true);
            headers.insert(paths::API_KEY_HEADER, value);
        }
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let builder = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(concat!("peaqos-agent/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            // One orchestrator, a request every few minutes: no pool to keep.
            .pool_max_idle_per_host(1)
            .redirect(reqwest::redirect::Policy::none());
        #[cfg(feature = "tls")]
        let builder = match &config.ca_file {
            // A plain-HTTP orchestrator needs no trust store. Loading the
            // system's anyway costs about 5 ms and 330 KiB at start, and on
            // a board without ca-certificates it would stop the agent for
            // nothing.
            _ if config.url.scheme() == "http" => builder.tls_certs_only(Vec::new()),
            // The same PEM loading as the broker's TLS; the CA file replaces
            // the system's roots (see `OrchestratorConfig::ca_file`).
            Some(ca_file) => {
                let client_auth = config
                    .client_cert_file
                    .as_deref()
                    .zip(config.client_key_file.as_deref());
                let tls = crate::tls::client_config(ca_file, client_auth)
                    .map_err(ClientBuildError::Tls)?;
                builder.tls_backend_preconfigured(tls)
            }
            // The system's roots, checked at the clock's floor too.
            None => builder.tls_backend_preconfigured(
                crate::tls::system_roots_config().map_err(ClientBuildError::Tls)?,
            ),
        };
        let http = builder.build().map_err(ClientBuildError::Http)?;
        Ok(Self {
            http,
            base: config.url.as_str().trim_end_matches('/').to_owned(),
        })
    }

    /// The base URL requests go to.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET /api/v1/health`, where the SDK looks. Informational only: the
    /// contract does not promise it, so nothing may depend on it.
    pub async fn health(&self) -> Result<Response<serde_json::Value>, ClientError> {
        self.call(Method::GET, paths::API_HEALTH, None::<&()>).await
    }

    /// `GET /api/v1/readiness`, the SDK's readiness (`{"status": "ready" |
    /// "not_ready", ...}`). Only a hint, as [`Client::health`]: see
    /// `registration::probe` for how its answer is read.
    pub async fn readiness(&self) -> Result<Response<serde_json::Value>, ClientError> {
        self.call(Method::GET, API_READINESS, None::<&()>).await
    }

    /// `POST /machine-identity/challenges`.
    pub async fn create_challenge(
        &self,
        identity: &IdentityRef,
    ) -> Result<Response<Challenge>, ClientError> {
        let body = CreateChallengeRequest {
            identity_ref: identity.clone(),
        };
        self.item(Method::POST, paths::CHALLENGES, Some(&body))
            .await
    }

    /// `POST /machines`.
    pub async fn create_machine(
        &self,
        request: &CreateMachineRequest,
    ) -> Result<Response<Machine>, ClientError> {
        self.item(Method::POST, paths::MACHINES, Some(request))
            .await
    }

    /// `GET /machines/:id`.
    pub async fn get_machine(&self, id: &str) -> Result<Response<Machine>, ClientError> {
        self.item(Method::GET, &machine_path(id)?, None::<&()>)
            .await
    }

    /// `PATCH /machines/:id`.
    pub async fn update_machine(
        &self,
        id: &str,
        request: &UpdateMachineRequest,
    ) -> Result<Response<Machine>, ClientError> {
        self.item(Method::PATCH, &machine_path(id)?, Some(request))
            .await
    }

    /// `GET /machines?cursor=...`: one page, its items as JSON (a record
    /// this version cannot read must not make the whole page unreadable).
    pub async fn list_machines(
        &self,
        cursor: Option<&str>,
    ) -> Result<Response<ListResponse<serde_json::Value>>, ClientError> {
        let mut path = format!("{}?limit=500", paths::MACHINES);
        if let Some(c) = cursor {
            let mut url = Url::parse("http://x/").expect("static URL");
            url.query_pairs_mut().append_pair("cursor", c);
            path.push('&');
            path.push_str(url.query().unwrap_or_default());
        }
        self.call(Method::GET, &path, None::<&()>).await
    }

    async fn item<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<Response<T>, ClientError> {
        let r: Response<ItemResponse<T>> = self.call(method, path, body).await?;
        Ok(Response {
            value: r.value.item,
            received: r.received,
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<Response<T>, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url);
        if let Some(body) = body {
            request = request.json(body);
        }
        let mut response = request.send().await.map_err(|e| transport(&url, e))?;
        let received = Received {
            at: Instant::now(),
            local: SystemTime::now(),
            date: response
                .headers()
                .get(header::DATE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| httpdate::parse_http_date(v).ok()),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, received.date.unwrap_or(received.local)));
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| transport(&url, e))? {
            if bytes.len() + chunk.len() > MAX_BODY {
                return Err(ClientError::BadResponse {
                    url,
                    status: status.as_u16(),
                    reason: format!("body larger than {MAX_BODY} bytes"),
                    retry_after,
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        if status.is_success() {
            let value = serde_json::from_slice(&bytes).map_err(|e| ClientError::BadResponse {
                url,
                status: status.as_u16(),
                reason: format!("body does not match the contract: {e}"),
                retry_after,
            })?;
            return Ok(Response { value, received });
        }
        Err(error_from(url, status, &bytes, retry_after))
    }
}

/// Machine ids are opaque, but the contract makes them URL-safe. One that
/// is not (a hostile or broken server) is refused rather than escaped, so an
/// id can never change which path the agent asks for.
pub fn is_valid_machine_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'~'))
}

fn machine_path(id: &str) -> Result<String, ClientError> {
    if is_valid_machine_id(id) {
        Ok(paths::machine(id))
    } else {
        Err(ClientError::InvalidMachineId {
            id: id.chars().take(40).collect(),
        })
    }
}

fn transport(url: &str, e: reqwest::Error) -> ClientError {
    if e.is_timeout() {
        ClientError::Timeout {
            url: url.to_owned(),
        }
    } else if let Some(failure) = TlsFailure::of(&e) {
        ClientError::Tls {
            url: url.to_owned(),
            failure,
            local: peaqos_protocol::Timestamp::now(),
            source: e.without_url(),
        }
    } else {
        ClientError::Network {
            url: url.to_owned(),
            source: e.without_url(),
        }
    }
}

fn error_from(
    url: String,
    status: StatusCode,
    bytes: &[u8],
    retry_after: Option<Duration>,
) -> ClientError {
    match serde_json::from_slice::<ErrorResponse>(bytes) {
        Ok(envelope) => ClientError::Api {
            status: status.as_u16(),
            code: envelope.error.code,
            message: truncate(&envelope.error.message),
            details: envelope.error.details,
            retry_after,
        },
        Err(_) => ClientError::BadResponse {
            url,
            status: status.as_u16(),
            reason: "no error envelope in the body".into(),
            retry_after,
        },
    }
}

fn truncate(text: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_MESSAGE)
        .collect();
    if text.chars().count() > MAX_MESSAGE {
        format!("{clean}...")
    } else {
        clean
    }
}

/// `Retry-After`: delta seconds, or an HTTP date (taken relative to the
/// server's own `Date`, so that our wall clock does not matter).
fn parse_retry_after(value: &str, server_now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(server_now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = httpdate::parse_http_date("Tue, 25 Nov 2025 16:00:00 GMT").unwrap();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Tue, 25 Nov 2025 16:01:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_retry_after("Tue, 25 Nov 2025 15:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn machine_ids_cannot_escape_their_path() {
        assert_eq!(
            machine_path("mach_abc").unwrap(),
            "/api/v1/machines/mach_abc"
        );
        for bad in [
            "",
            ".",
            "..",
            "../health",
            "a/b",
            "a?b",
            "a#b",
            "a%2Fb",
            "a b",
        ] {
            assert!(
                matches!(machine_path(bad), Err(ClientError::InvalidMachineId { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn errors_classify_and_keep_the_code() {
        let api = |status, code: &str| ClientError::Api {
            status,
            code: ErrorCode::from_wire(code),
            message: String::new(),
            details: None,
            retry_after: None,
        };
        assert!(api(503, "PEAQOS_IDENTITY_UNAVAILABLE").is_transient());
        assert!(api(429, "RATE_LIMITED").is_transient());
        assert!(api(502, "SOMETHING_ELSE").is_transient());
        assert!(!api(403, "MACHINE_IDENTITY_PROOF_INVALID").is_transient());
        assert!(!api(409, "MACHINE_IDENTITY_EXISTS").is_transient());
        assert!(api(404, "NOT_FOUND").is(&ErrorCode::NotFound));
        let bad = error_from("u".into(), StatusCode::BAD_GATEWAY, b"<html>", None);
        assert!(bad.is_transient());
        assert_eq!(bad.code().as_str(), "BAD_RESPONSE");
        let foreign = ClientError::BadResponse {
            url: "u".into(),
            status: 201,
            reason: "body does not match the contract".into(),
            retry_after: None,
        };
        assert!(
            !foreign.is_transient(),
            "an unreadable success is not a blip"
        );
    }

    #[test]
    fn long_or_control_laden_messages_are_cut() {
        let t = truncate(&format!("a\u{1b}[31m{}", "x".repeat(1000)));
        assert!(t.len() < 320 && !t.contains('\u{1b}'), "{t}");
    }
}
