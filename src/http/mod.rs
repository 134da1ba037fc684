//! The listener's routes: `/ws` (the protocol), `/health`, `/health/ready`,
//! `/metrics`, `/hook/set-status`, and the status page (`/`, `/status`,
//! `/status.json`, in [`status_page`]). Anything else is 404.

mod status_page;

use std::net::IpAddr;
use std::sync::Arc;

use actix::Addr;
use actix_web::http::header::X_FORWARDED_FOR;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use serde::Deserialize;
use serde_json::json;

use crate::actors::backlog::{backlog_limit, Backlog, SocketHandle, SocketOf};
use crate::actors::registry::{self, Registry};
use crate::actors::session::WsSession;
use crate::actors::writer::Writer;
use crate::actors::{RateLimiter, Shared};
use crate::client_addr::client_ip;
use crate::db::{self, queries};
use crate::ids::{PresenceId, Status};
use crate::metrics::PoolState;
use crate::protocol::{bounds, check_text};

/// Hook requests one client address may make: burst, then per second.
const HOOK_BURST: u32 = 50;
const HOOK_PER_SEC: u32 = 20;

/// What every route handler gets.
pub struct AppState {
    pub shared: Arc<Shared>,
    pub registry: Addr<Registry>,
    pub writer: Addr<Writer>,
    pub hook_limits: RateLimiter<IpAddr>,
    db_status: status_page::DbStatusCache,
}

impl AppState {
    pub fn new(shared: Arc<Shared>, registry: Addr<Registry>, writer: Addr<Writer>) -> Self {
        AppState {
            shared,
            registry,
            writer,
            hook_limits: RateLimiter::new(HOOK_BURST, HOOK_PER_SEC),
            db_status: Default::default(),
        }
    }
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/ws", web::get().to(websocket))
        .route("/health", web::get().to(health))
        .route("/health/ready", web::get().to(ready))
        .route("/metrics", web::get().to(metrics))
        .route("/hook/set-status", web::post().to(hook_set_status))
        .route("/", web::get().to(status_page::page))
        .route("/status", web::get().to(status_page::page))
        .route("/status.json", web::get().to(status_json));
}

/// Upgrades to the protocol. permessage-deflate is never negotiated: the
/// handshake answers without a `Sec-WebSocket-Extensions` header.
async fn websocket(
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<AppState>,
) -> actix_web::Result<HttpResponse> {
    let config = state.shared.config();
    // Kept in the response stream, the only place where it proves the
    // socket is still this connection's (`SocketHandle`).
    let socket = req.conn_data::<SocketOf>().map(SocketOf::handle);
    let backlog = Arc::new(Backlog::new(backlog_limit(&config), socket.as_ref()));
    let session = WsSession::new(
        state.shared.clone(),
        state.registry.clone(),
        state.writer.clone(),
        backlog.clone(),
        client_of(&req, &state),
    );
    let mut response = ws::handshake(&req)?;
    let codec = actix_http::ws::Codec::new().max_size(config.limits.max_frame_bytes);
    let output = ws::WebsocketContext::with_codec(session, stream, codec);
    Ok(response.streaming(Taken {
        output: Box::pin(output),
        backlog,
        _socket: socket,
    }))
}

/// A session's output as the HTTP layer takes it: each chunk is all the
/// session wrote so far, which tells its [`Backlog`] what has left.
struct Taken<S> {
    output: std::pin::Pin<Box<S>>,
    backlog: Arc<Backlog>,
    _socket: Option<SocketHandle>,
}

impl<S> futures_util::Stream for Taken<S>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, actix_web::Error>>,
{
    type Item = S::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        let next = self.output.as_mut().poll_next(cx);
        if let std::task::Poll::Ready(Some(Ok(_))) = &next {
            self.backlog.taken();
        }
        next
    }
}

async fn status_json(state: web::Data<AppState>) -> HttpResponse {
    status_page::json(&state.shared, &state.db_status).await
}

async fn health(state: web::Data<AppState>) -> HttpResponse {
    let db_up = match state.shared.pool.get().await {
        Ok(mut conn) => db::ping(&mut conn).await.is_ok(),
        Err(_) => false,
    };
    HttpResponse::Ok().json(json!({
        "status": "ok",
        "db": if db_up { "up" } else { "down" },
        "version": env!("CARGO_PKG_VERSION"),
        "node": state.shared.node_id,
    }))
}

async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let reason = match state.shared.pool.get().await {
        Err(_) => Some("database unreachable"),
        Ok(mut conn) => match db::migrations_current(&mut conn).await {
            Ok(true) => None,
            Ok(false) => Some("migrations missing"),
            Err(_) => Some("database unreachable"),
        },
    };
    match reason {
        None => HttpResponse::Ok().json(json!({"ready": true})),
        Some(why) => {
            HttpResponse::ServiceUnavailable().json(json!({"ready": false, "reason": why}))
        }
    }
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let shared = &state.shared;
    // A cluster-wide gauge, reported by one node: the leader (or a node
    // alone, before its first heartbeat).
    let cluster = &shared.cluster;
    let (queue, backlog) = if cluster.is_leader() || cluster.live_nodes() <= 1 {
        match shared.pool.get().await {
            Ok(mut conn) => (
                queries::queue_depth(&mut conn).await.ok(),
                queries::mesh_backlog(&mut conn, crate::metrics::BACKLOG_MESHES)
                    .await
                    .ok(),
            ),
            Err(_) => (None, None),
        }
    } else {
        (None, None)
    };
    let s = shared.pool.state();
    let pool = PoolState {
        idle: s.idle_connections,
        in_use: s.connections - s.idle_connections,
        max: shared.config().database.pool_size,
    };
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(
            shared.metrics.render(queue, pool)
                + &backlog
                    .map(|rows| crate::metrics::Metrics::render_backlog(&rows))
                    .unwrap_or_default()
                + &shared.metrics.render_cluster(
                    &shared.node_id.to_string(),
                    cluster.live_nodes(),
                    cluster.is_leader(),
                ),
        )
}

#[derive(Deserialize)]
struct HookBody {
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    pid: Option<i64>,
    status: String,
    #[serde(default)]
    session_id: Option<String>,
}

/// The address a request's source rules apply to: its peer's, or the client
/// a trusted proxy names (`client_addr`). None only for a request without a
/// socket, as in handler unit tests.
fn client_of(req: &HttpRequest, state: &AppState) -> Option<IpAddr> {
    let peer = req.peer_addr()?.ip();
    // A line that is not text is as unreadable as any other garbage entry.
    let forwarded: Vec<&str> = req
        .headers()
        .get_all(X_FORWARDED_FOR)
        .map(|line| line.to_str().unwrap_or(""))
        .collect();
    let trusted = &state.shared.config().server.trusted_proxies;
    Some(client_ip(peer, &forwarded, trusted))
}

/// claudemesh's Claude Code hooks: set a session's status by `session_id`
/// (or, from a loopback client only, by pid/cwd). A `dnd` status is left
/// alone.
async fn hook_set_status(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> HttpResponse {
    let fail = |status: actix_web::http::StatusCode, error: &str| {
        HttpResponse::build(status).json(json!({"ok": false, "error": error}))
    };
    use actix_web::http::StatusCode;
    let client = client_of(&req, &state);
    if let Some(ip) = client {
        if !state.hook_limits.allow(&ip) {
            return fail(StatusCode::TOO_MANY_REQUESTS, "rate_limit");
        }
    }
    if body.len() > state.shared.config().limits.max_message_bytes {
        return fail(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    }
    let Ok(hook) = serde_json::from_slice::<HookBody>(&body) else {
        return fail(
            StatusCode::BAD_REQUEST,
            "invalid: expected {\"status\",\"session_id\"}",
        );
    };
    let Some(status) = Status::parse(&hook.status) else {
        return fail(
            StatusCode::BAD_REQUEST,
            "invalid: status must be idle, working or dnd",
        );
    };
    // Text the database cannot hold (U+0000) or longer than any hello may
    // set matches nothing; refusing it here keeps it from reading as a
    // database failure.
    let bounded = [
        ("session_id", &hook.session_id, bounds::SESSION_ID),
        ("cwd", &hook.cwd, bounds::CWD),
    ]
    .into_iter()
    .try_for_each(|(name, v, max)| match v {
        Some(v) => check_text(name, v, max),
        None => Ok(()),
    });
    if let Err(e) = bounded {
        return fail(StatusCode::BAD_REQUEST, &format!("invalid: {e}"));
    }
    let loopback = client.is_some_and(|ip| ip.is_loopback());
    let Ok(mut conn) = state.shared.pool.get().await else {
        return fail(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    };
    let session_id = hook.session_id.as_deref().filter(|s| !s.is_empty());
    let by_process = loopback && (hook.pid.is_some() || hook.cwd.is_some());
    if session_id.is_none() && !by_process {
        return if loopback {
            fail(StatusCode::BAD_REQUEST, "invalid: session_id required")
        } else {
            fail(
                StatusCode::FORBIDDEN,
                "forbidden: session_id required from a non-loopback peer",
            )
        };
    }
    let mut found = Vec::new();
    if let Some(sid) = session_id {
        match queries::live_sessions_by_session_id(&mut conn, sid).await {
            Ok(rows) => found = rows,
            Err(_) => return fail(StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        }
    }
    // A session's connection may carry another id than Claude Code's
    // session_id (a resumed session): from loopback, pid/cwd still match.
    if found.is_empty() && by_process {
        match queries::live_sessions_by_process(&mut conn, hook.pid, hook.cwd.as_deref()).await {
            Ok(rows) => found = rows,
            Err(_) => return fail(StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        }
    }
    if found.is_empty() {
        return fail(
            StatusCode::NOT_FOUND,
            "not_found: no live session with that session_id",
        );
    }
    let mut changed = Vec::new();
    for (presence_id, current) in &found {
        if *current == Status::Dnd {
            continue;
        }
        if queries::set_status(&mut conn, PresenceId(*presence_id), status)
            .await
            .is_err()
        {
            return fail(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
        }
        changed.push(*presence_id);
    }
    drop(conn);
    for presence_id in &changed {
        state.registry.do_send(registry::Changed::Status {
            presence_id: PresenceId(*presence_id),
        });
    }
    let presence_id = found[0].0;
    if changed.is_empty() {
        return HttpResponse::Ok()
            .json(json!({"ok": true, "presence_id": presence_id, "unchanged": "dnd"}));
    }
    HttpResponse::Ok()
        .json(json!({"ok": true, "presence_id": presence_id, "updated": changed.len()}))
}
