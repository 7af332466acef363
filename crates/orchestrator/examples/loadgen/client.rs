//! A lean HTTP/1.1 client (hyper directly, so that it takes little of the
//! CPU it measures), and the agent's requests made with it.

use std::net::SocketAddr;

use anyhow::bail;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use peaqos_protocol::{Challenge, ItemResponse, Machine, SecretKey};
use serde_json::json;

/// One keep-alive connection.
pub(crate) struct Conn {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

/// An answer that was not the one expected.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {status}: {body}")]
pub(crate) struct Unexpected {
    pub(crate) path: String,
    pub(crate) status: StatusCode,
    pub(crate) body: String,
    /// The answer's `Retry-After` in seconds, if it had one.
    pub(crate) retry_after: Option<u64>,
}

impl Conn {
    pub(crate) async fn open(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Self {
            sender,
            host: addr.to_string(),
        })
    }

    pub(crate) async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let (status, _, bytes) = self.send_full(method, path, body).await?;
        Ok((status, bytes))
    }

    /// [`Conn::send`], with the answer's `Retry-After` (seconds).
    async fn send_full(
        &mut self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<(StatusCode, Option<u64>, Bytes)> {
        self.sender.ready().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.host);
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, retry_after, bytes))
    }

    /// Sends and decodes the answer, which must have status `want`.
    pub(crate) async fn expect<T: serde::de::DeserializeOwned>(
        &mut self,
        method: Method,
        path: &str,
        body: Option<String>,
        want: StatusCode,
    ) -> anyhow::Result<T> {
        let (status, retry_after, bytes) = self.send_full(method, path, body).await?;
        if status != want {
            bail!(Unexpected {
                path: path.to_owned(),
                status,
                retry_after,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            });
        }
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// A challenge for `identity`, signed with `key`: `{challengeId, signature}`.
    pub(crate) async fn proof(
        &mut self,
        key: &SecretKey,
        identity: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let challenge: ItemResponse<Challenge> = self
            .expect(
                Method::POST,
                "/api/v1/machine-identity/challenges",
                Some(json!({ "identityRef": identity }).to_string()),
                StatusCode::CREATED,
            )
            .await?;
        let c = challenge.item;
        let signature = key.sign_personal(c.message.as_bytes()).to_hex();
        Ok(json!({"challengeId": c.challenge_id, "signature": signature}))
    }

    /// A whole registration, as the agent does it: challenge, EIP-191
    /// signature, create (a draft), activate.
    pub(crate) async fn register(&mut self, key: &SecretKey, id: u64) -> anyhow::Result<Machine> {
        let identity = format!("did:peaq:{id}");
        let proof = self.proof(key, &identity).await?;
        let body = json!({
            "displayName": format!("Robot {id}"),
            "ownerId": "fleet-1",
            "machineType": "amr",
            "runtimeProfile": "ros2",
            "identityRef": identity,
            "identityProof": proof,
            "capabilities": ["lidar", "camera"],
            "labels": {"site": "berlin"},
        });
        let created: ItemResponse<Machine> = self
            .expect(
                Method::POST,
                "/api/v1/machines",
                Some(body.to_string()),
                StatusCode::CREATED,
            )
            .await?;
        let active: ItemResponse<Machine> = self
            .expect(
                Method::PATCH,
                &format!("/api/v1/machines/{}", created.item.id),
                Some(json!({"status": "active"}).to_string()),
                StatusCode::OK,
            )
            .await?;
        Ok(active.item)
    }

    /// What an agent does when it comes back after a power cut: read its
    /// record, then prove control again (challenge, signature, `PATCH`
    /// with the proof and `status: active`).
    pub(crate) async fn reprove(
        &mut self,
        key: &SecretKey,
        id: u64,
        machine_id: &str,
    ) -> anyhow::Result<()> {
        let path = format!("/api/v1/machines/{machine_id}");
        let _: ItemResponse<Machine> = self
            .expect(Method::GET, &path, None, StatusCode::OK)
            .await?;
        let proof = self.proof(key, &format!("did:peaq:{id}")).await?;
        let _: ItemResponse<Machine> = self
            .expect(
                Method::PATCH,
                &path,
                Some(json!({"identityProof": proof, "status": "active"}).to_string()),
                StatusCode::OK,
            )
            .await?;
        Ok(())
    }
}
