//! Everything but completions: the model list, health, metrics, run traces (the caller's
//! runs only: another tenant's run id answers 404 as an unknown one does), and the admin
//! endpoints (status and a forced reload, behind the API key when one is set).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::ServerState;
use super::error::ApiError;

fn pipeline_entry(version: &crate::app::PipelineVersion) -> Value {
    let pipeline = &version.pipeline;
    json!({
        "id": version.name,
        "object": "model",
        "created": 0,
        "owned_by": "staircase-pipeline",
        "description": pipeline.description,
        "version": version.label(),
        "nodes": pipeline.nodes.iter().map(|n| json!({
            "id": n.id,
            "kind": n.kind.name(),
            "plugin": n.plugin,
            "model": n.model,
        })).collect::<Vec<_>>(),
    })
}

fn model_entry(name: &str) -> Value {
    json!({ "id": name, "object": "model", "created": 0, "owned_by": "staircase-local" })
}

fn all_models(state: &ServerState) -> Vec<Value> {
    let pipelines = state.app.pipelines().list();
    let mut data: Vec<Value> = pipelines.iter().map(|v| pipeline_entry(v)).collect();
    data.extend(
        state
            .app
            .model_names()
            .iter()
            .filter(|m| !pipelines.iter().any(|v| &v.name == *m))
            .map(|m| model_entry(m)),
    );
    data
}

pub(crate) async fn models(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    state.authorize(&headers)?;
    Ok(Json(
        json!({ "object": "list", "data": all_models(&state) }),
    ))
}

pub(crate) async fn model(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.authorize(&headers)?;
    all_models(&state)
        .into_iter()
        .find(|m| m["id"] == id.as_str())
        .map(Json)
        .ok_or_else(|| ApiError::model_not_found(&id, &state.app.model_names()))
}

/// 200 while every local engine serves; 503 naming the models whose engine thread crashed
/// (`engine::local::liveness`): the signal for the operator's supervisor to restart the
/// server. Open without a key, as probes are.
pub(crate) async fn health(State(state): State<Arc<ServerState>>) -> Response {
    let crashed: Vec<String> = state
        .app
        .models()
        .iter()
        .filter(|m| m.local().is_some_and(|engine| engine.crashed()))
        .map(|m| m.name.clone())
        .collect();
    let (status, body) = health_of(&crashed);
    (status, Json(body)).into_response()
}

/// The answer of `/health` when the engines of `crashed` models have stopped.
fn health_of(crashed: &[String]) -> (StatusCode, Value) {
    if crashed.is_empty() {
        return (StatusCode::OK, json!({ "status": "ok" }));
    }
    let names = crashed
        .iter()
        .map(|m| format!("`{m}`"))
        .collect::<Vec<_>>()
        .join(", ");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        json!({
            "status": "error",
            "crashed_models": crashed,
            "message": format!(
                "the engine of model {names} stopped after an internal failure and serves \
                 nothing until the server restarts (the server log has the panic)"
            ),
        }),
    )
}

pub(crate) async fn metrics(State(state): State<Arc<ServerState>>, headers: HeaderMap) -> Response {
    if state.options.access.metrics_require_key
        && let Err(error) = state.authorize(&headers)
    {
        return error.into_response();
    }
    let (running, waiting) = state.admission.depth();
    let text = state.metrics.render(&state.app, running, waiting);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

fn report_of(
    state: &ServerState,
    headers: &HeaderMap,
    id: &str,
) -> Result<Arc<crate::pipeline::RunReport>, ApiError> {
    let tenant = state.authorize(headers)?;
    state
        .run(id, &tenant)
        .ok_or_else(|| super::runs::unknown(state, id))
}

pub(crate) async fn trace_json(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let report = report_of(&state, &headers, &id)?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        report.trace().to_json(),
    )
        .into_response())
}

pub(crate) async fn trace_svg(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let report = report_of(&state, &headers, &id)?;
    let svg = crate::trace::svg::render(&report.trace())
        .map_err(|e| ApiError::run_failed(e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response())
}

fn status_value(state: &ServerState) -> Value {
    let plugins: Vec<Value> = state
        .app
        .registry()
        .list()
        .into_iter()
        .map(|p| {
            json!({
                "name": p.name,
                "version": p.version,
                "kind": p.kind.name(),
                "path": p.path,
                "sha256": p.sha256,
            })
        })
        .collect();
    let table = state.app.pipelines();
    let (accepted, rejected) = table.counts();
    let pipelines: Vec<Value> = table.list().iter().map(|v| json!(**v)).collect();
    let (running, waiting) = state.admission.depth();
    json!({
        "plugins": plugins,
        "pipelines": pipelines,
        "pipeline_reloads": { "accepted": accepted, "rejected": rejected },
        "last_pipeline_rejection": table.last_rejection(),
        "plugin_reloads": super::lock(&state.plugin_log).clone(),
        "runs": { "running": running, "waiting": waiting },
        "models": state.app.model_names(),
    })
}

pub(crate) async fn status(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    state.authorize(&headers)?;
    Ok(Json(status_value(&state)))
}

pub(crate) async fn reload(
    State(state): State<Arc<ServerState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    state.authorize(&headers)?;
    // Compiling plugins blocks: off the async threads, one rescan at a time.
    let summary = state
        .app
        .clone()
        .reload_queued()
        .await
        .map_err(ApiError::run_failed)?;
    let mut value = status_value(&state);
    value["reload"] = json!(summary);
    Ok(Json(value))
}

pub(crate) async fn no_route() -> ApiError {
    ApiError::not_found("No such endpoint")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_is_ok_while_engines_serve_and_503_naming_a_crashed_one() {
        let (status, body) = health_of(&[]);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "ok");
        let (status, body) = health_of(&["default".to_string()]);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "error");
        assert_eq!(body["crashed_models"], json!(["default"]));
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("`default`") && m.contains("restarts")),
            "{body}"
        );
    }
}
