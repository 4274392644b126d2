//! Browser safety: what keeps a web page the user happens to open from using a server on
//! their machine. A page can send a "simple" cross-origin POST (`text/plain`, no preflight)
//! and can point a name it controls at 127.0.0.1 (DNS rebinding) to read answers. So JSON
//! endpoints take only `application/json` (415), state-changing requests with a foreign
//! `Origin` are refused (403), and a server without a key answers only addresses, loopback
//! names and the names on its allow-list (403). This room decides from headers alone; it must not read bodies or check
//! keys (`ServerState::authorize` does).

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ServerState;
use super::error::ApiError;

/// POST endpoints whose body is JSON: anything else is refused before the body is read.
const JSON_POSTS: &[&str] = &["/v1/chat/completions", "/v1/completions"];

/// Host names every key-less server answers: the loopback names.
const LOOPBACK_NAMES: &[&str] = &["localhost", "localhost.localdomain"];

pub(crate) async fn browser_safety(
    State(state): State<Arc<ServerState>>,
    request: Request,
    next: Next,
) -> Response {
    match check(
        &state,
        request.method(),
        request.uri().path(),
        request.headers(),
    ) {
        Ok(()) => next.run(request).await,
        Err(error) => {
            tracing::info!(message = %error.message, "request refused");
            error.into_response()
        }
    }
}

fn check(
    state: &ServerState,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if !state.requires_key()
        && let Some(host) = host
        && !host_allowed(state, host)
    {
        return Err(ApiError::forbidden(format!(
            "Host `{host}` is not one this server answers without an API key (add it with \
             --allowed-host or [server] allowed_hosts)"
        )));
    }
    let changes_state = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if changes_state
        && let Some(origin) = headers.get(header::ORIGIN)
        && !same_origin(origin.to_str().unwrap_or("null"), host)
    {
        return Err(ApiError::forbidden(
            "Cross-origin requests are refused: the `Origin` is not this server",
        ));
    }
    if *method == Method::POST && JSON_POSTS.contains(&path) {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let essence = content_type.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::unsupported_media_type(content_type));
        }
    }
    Ok(())
}

/// The host part of a `Host` header (`name:port`, `[v6]:port`), lower-cased.
fn host_name(host: &str) -> String {
    if host.parse::<IpAddr>().is_ok() {
        return host.to_ascii_lowercase();
    }
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// A key-less server answers any address (DNS rebinding needs a name the attacker owns),
/// the loopback names and the names on its allow-list.
fn host_allowed(state: &ServerState, host: &str) -> bool {
    let name = host_name(host);
    name.parse::<IpAddr>().is_ok()
        || LOOPBACK_NAMES.contains(&name.as_str())
        || state
            .options
            .access
            .allowed_hosts
            .iter()
            .any(|allowed| allowed == "*" || host_name(allowed) == name)
}

/// Whether `origin` (`scheme://host[:port]`) names the server the request was sent to.
fn same_origin(origin: &str, host: Option<&str>) -> bool {
    let Some(host) = host else {
        return false;
    };
    origin
        .split_once("://")
        .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_drop_the_port_and_brackets() {
        assert_eq!(host_name("LocalHost:8080"), "localhost");
        assert_eq!(host_name("[::1]:80"), "::1");
        assert_eq!(host_name("127.0.0.1"), "127.0.0.1");
        assert_eq!(host_name("evil.example."), "evil.example");
    }

    #[test]
    fn only_the_servers_own_origin_is_same_origin() {
        assert!(same_origin("http://127.0.0.1:8080", Some("127.0.0.1:8080")));
        assert!(!same_origin("http://evil.example", Some("127.0.0.1:8080")));
        assert!(!same_origin("null", Some("127.0.0.1:8080")));
        assert!(!same_origin(
            "http://127.0.0.1:8081",
            Some("127.0.0.1:8080")
        ));
    }
}
