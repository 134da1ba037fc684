//! The live status page: `GET /` and `GET /status` serve one HTML file
//! (its style and script inline, nothing from elsewhere), which polls
//! `GET /status.json` every two seconds: the cluster as the database sees
//! it (what `meshbroker status` prints) and this node's own counters.
//!
//! The database part is read at most once a second, however many pages
//! are open.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::HttpResponse;
use serde_json::{json, Value};

use crate::actors::Shared;
use crate::status;

/// The page: markup, style and script in one file.
const PAGE: &str = include_str!("status_page.html");

/// How long one database read serves every page.
const DB_READ_EVERY: Duration = Duration::from_secs(1);

/// The last database read, and when it was made.
#[derive(Default)]
pub struct DbStatusCache(Mutex<Option<(Instant, Value)>>);

pub async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        // Everything the page loads is its own; nothing may come from
        // elsewhere, even if a value it shows were to carry markup.
        .insert_header((
            "Content-Security-Policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'",
        ))
        .insert_header(("Cache-Control", "no-cache"))
        .body(PAGE)
}

pub async fn json(shared: &Shared, cache: &DbStatusCache) -> HttpResponse {
    let cluster = &shared.cluster;
    HttpResponse::Ok()
        .insert_header(("Cache-Control", "no-store"))
        .json(json!({
            "node": {
                "id": shared.node_id,
                "version": env!("CARGO_PKG_VERSION"),
                "leader": cluster.is_leader(),
                "live_nodes": cluster.live_nodes(),
            },
            "live": shared.metrics.live(),
            "cluster": cluster_status(shared, cache).await,
        }))
}

/// The cluster as the database sees it, or `{"error": …}` when the
/// database cannot be read (the page says so and keeps the rest live).
async fn cluster_status(shared: &Shared, cache: &DbStatusCache) -> Value {
    if let Some((at, value)) = &*cache.0.lock().expect("status cache lock") {
        if at.elapsed() < DB_READ_EVERY {
            return value.clone();
        }
    }
    let read = match shared.pool.get().await {
        Ok(mut conn) => status::read(&mut conn)
            .await
            .map_err(|e| format!("database read failed: {e}")),
        Err(e) => Err(format!("database unreachable: {e}")),
    };
    let value = match read {
        Ok(s) => serde_json::to_value(s).expect("status serializes"),
        Err(error) => json!({ "error": error }),
    };
    *cache.0.lock().expect("status cache lock") = Some((Instant::now(), value.clone()));
    value
}
