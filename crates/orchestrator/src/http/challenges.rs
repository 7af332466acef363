//! `POST /api/v1/machine-identity/challenges`: a single-use, expiring
//! challenge bound to one identity, naming its current controllers.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::routing::post;
use peaqos_protocol::{
    Challenge, ChallengeMessage, CreateChallengeRequest, ErrorCode, ItemResponse, ProofMethod,
    paths,
};

use super::{ApiError, ApiJson, AppState};
use crate::ids;
use crate::store::{ChallengeInsert, ChallengeRecord};

pub fn router() -> Router<AppState> {
    Router::new().route(paths::CHALLENGES, post(create))
}

async fn create(
    State(app): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    ApiJson(request): ApiJson<CreateChallengeRequest>,
) -> Result<(StatusCode, axum::Json<ItemResponse<Challenge>>), ApiError> {
    if let Err(wait) = app.limiter.check(client.ip()) {
        app.metrics.rate_limited.inc();
        return Err(ApiError::new(
            ErrorCode::RateLimited,
            "too many challenge requests from this address; retry later",
        )
        .retry_after(wait.as_secs() + 1));
    }
    let identity = request.identity_ref;
    let controllers = app.controllers(&identity).await?;
    if !controllers.is_active() {
        return Err(ApiError::new(
            ErrorCode::NotActivated,
            format!("{identity} does not resolve to any controller (not activated on peaqOS)"),
        ));
    }
    let random_failed = |e: ids::RandomError| ApiError::internal(&e);
    let issued_at = app.now();
    let expires_at = issued_at.saturating_add(app.config.challenge_ttl);
    let challenge_id = ids::challenge_id().map_err(random_failed)?;
    let message = ChallengeMessage {
        orchestrator: app.config.orchestrator_name.clone(),
        identity: identity.clone(),
        challenge_id: challenge_id.clone(),
        nonce: ids::nonce().map_err(random_failed)?,
        issued_at,
        expires_at,
    }
    .render();
    let record = ChallengeRecord {
        id: challenge_id,
        identity,
        message,
        issued_at,
        expires_at,
    };
    match app
        .store
        .insert_challenge(&record, app.config.max_pending_challenges)
        .await?
    {
        ChallengeInsert::Stored => {}
        ChallengeInsert::Full => {
            app.metrics.rate_limited.inc();
            return Err(ApiError::new(
                ErrorCode::RateLimited,
                "too many challenges are pending; retry later",
            )
            .retry_after(5));
        }
    }
    app.metrics.challenges_issued.inc();
    Ok((
        StatusCode::CREATED,
        axum::Json(ItemResponse {
            item: Challenge {
                challenge_id: record.id,
                identity_ref: record.identity,
                message: record.message,
                expires_at: record.expires_at,
                verification_method: ProofMethod::Eip191,
                controller_addresses: controllers.controllers().to_vec(),
            },
        }),
    ))
}
