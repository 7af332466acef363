//! `POST /api/v1/machine-identity/challenges`: a single-use, expiring
//! challenge bound to one identity, naming its current controllers.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::routing::post;
use peaqos_protocol::{Challenge, CreateChallengeRequest, ItemResponse, paths};

use super::{ApiError, ApiJson, AppState};

pub fn router() -> Router<AppState> {
    Router::new().route(paths::CHALLENGES, post(create))
}

async fn create(
    State(app): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    ApiJson(request): ApiJson<CreateChallengeRequest>,
) -> Result<(StatusCode, axum::Json<ItemResponse<Challenge>>), ApiError> {
    let challenge = app
        .issue_challenge(client.ip(), request.identity_ref)
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(ItemResponse { item: challenge }),
    ))
}
