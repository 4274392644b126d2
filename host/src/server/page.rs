//! The live view at `/`: a page, a style sheet and a script, embedded in the binary (no CDN,
//! nothing fetched at build or run time). The page reads only the server's own API
//! (`/v1/models`, `/v1/chat/completions`, `/v1/runs`, `/v1/runs/{id}/events`, the traces).

use axum::extract::Path;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};

use super::error::ApiError;

const INDEX: &str = include_str!("page/index.html");

/// The files under `/live/`, by name, with their content type.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "live.js",
        "text/javascript; charset=utf-8",
        include_str!("page/live.js"),
    ),
    (
        "live.css",
        "text/css; charset=utf-8",
        include_str!("page/live.css"),
    ),
];

pub(crate) async fn index() -> Html<&'static str> {
    Html(INDEX)
}

pub(crate) async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    let (_, kind, body) = ASSETS
        .iter()
        .find(|(name, _, _)| *name == file)
        .ok_or_else(|| ApiError::not_found(format!("No file `{file}` in the live view")))?;
    Ok(([(header::CONTENT_TYPE, *kind)], *body).into_response())
}
