//! Test support: one private PostgreSQL cluster per test-binary run (or
//! `TEST_DATABASE_URL`), a migrated template database, a fresh database and
//! an in-process broker per test, and helpers for members and clients.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use diesel::QueryableByName;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use ed25519_dalek::SigningKey;
use serde_json::Value;

use meshbroker::broker::{self, Broker};
use meshbroker::client::{self, Connection, Credentials, HelloOptions};
use meshbroker::config::{Config, Dur};
use meshbroker::db::embedded::{EmbeddedOptions, EmbeddedPostgres};
use meshbroker::{admin, crypto, db};

pub use serde_json::json;

/// Generous wait for something that must happen.
pub const WAIT: Duration = Duration::from_secs(5);
/// Short bounded wait used to check that something does NOT happen.
pub const QUIET: Duration = Duration::from_millis(400);

/// The migrated template each test database is copied from; per process,
/// so two test runs sharing one `TEST_DATABASE_URL` server do not collide.
fn template() -> String {
    format!("mb_template_{}", std::process::id())
}

/// Where test databases live: a URL with `__DB__` where the database name goes.
struct Cluster {
    url_pattern: String,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("database URL has a scheme");
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let authority = before_query
        .split_once('/')
        .map_or(before_query, |(a, _)| a);
    match query {
        Some(q) => format!("{scheme}://{authority}/{name}?{q}"),
        None => format!("{scheme}://{authority}/{name}"),
    }
}

fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        // Runs on its own thread with its own runtime: the caller is inside
        // a test's actix System and this must block until done.
        std::thread::spawn(|| {
            let url_pattern = match std::env::var("TEST_DATABASE_URL") {
                Ok(url) if !url.is_empty() => with_database(&url, "__DB__"),
                _ => {
                    remove_stale_clusters();
                    let dir = tempfile::Builder::new()
                        .prefix(CLUSTER_DIR_PREFIX)
                        .tempdir_in(std::env::temp_dir())
                        .expect("temp dir")
                        .keep();
                    std::fs::write(dir.join(OWNER_MARKER), std::process::id().to_string())
                        .expect("write owner marker");
                    // The cluster runs as `postgres` when we are root: it must
                    // be able to reach its data dir.
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
                        .expect("chmod temp dir");
                    let pg =
                        EmbeddedPostgres::start(&dir.join("d"), &EmbeddedOptions { fsync: false })
                            .expect("embedded PostgreSQL starts");
                    pg.stop_when_process_exits().expect("cluster watcher");
                    let pattern = pg.url_for("__DB__");
                    // Statics are never dropped; keep the cluster running
                    // until the watcher stops it after this process exits.
                    std::mem::forget(pg);
                    pattern
                }
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let admin_url = url_pattern.replace("__DB__", "postgres");
                let mut conn = plain_connection(&admin_url).await;
                let template = template();
                let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {template}"))
                    .execute(&mut conn)
                    .await;
                diesel::sql_query(format!("CREATE DATABASE {template}"))
                    .execute(&mut conn)
                    .await
                    .expect("create template database");
                db::migrate(&url_pattern.replace("__DB__", &template))
                    .await
                    .expect("migrate template database");
            });
            Cluster { url_pattern }
        })
        .join()
        .expect("cluster setup thread")
    })
}

const CLUSTER_DIR_PREFIX: &str = "meshbroker-test-";
/// Holds the pid of the test process that made the cluster dir.
const OWNER_MARKER: &str = "test-owner.pid";

/// Removes cluster dirs left by earlier test runs: the process that made
/// them is gone and their cluster is stopped (the watcher stops it after
/// the process exits; nothing removes the files).
fn remove_stale_clusters() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_ours = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(CLUSTER_DIR_PREFIX));
        if !is_ours {
            continue;
        }
        let Ok(pid) = std::fs::read_to_string(path.join(OWNER_MARKER)) else {
            continue;
        };
        let owner_alive = std::path::Path::new("/proc").join(pid.trim()).exists();
        let cluster_running = path.join("d/pg/postmaster.pid").exists();
        if !owner_alive && !cluster_running {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// A fresh database copied from the migrated template; returns its URL.
pub async fn fresh_database() -> (String, String) {
    let cluster = cluster();
    let name = format!(
        "t_{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::Relaxed)
    );
    let admin_url = cluster.url_pattern.replace("__DB__", "postgres");
    let mut conn = plain_connection(&admin_url).await;
    let template = template();
    let mut last_err = None;
    for _ in 0..20 {
        match diesel::sql_query(format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .execute(&mut conn)
            .await
        {
            Ok(_) => return (cluster.url_pattern.replace("__DB__", &name), name),
            // "source database is being accessed by other users" is transient.
            Err(e) => last_err = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot create test database {name}: {last_err:?}");
}

fn drop_database(name: String) {
    let Some(cluster) = CLUSTER.get() else { return };
    let admin_url = cluster.url_pattern.replace("__DB__", "postgres");
    // Detached: the broker's pool may still hold connections (FORCE ends them).
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            if let Ok(mut conn) = AsyncPgConnection::establish(&admin_url).await {
                let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await;
            }
        });
    });
}

async fn plain_connection(url: &str) -> AsyncPgConnection {
    AsyncPgConnection::establish(url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// The broker's own pool constructor, so the tests exercise its setup.
pub async fn make_pool(url: &str, size: u32) -> db::Pool {
    db::connect(url, size)
        .await
        .unwrap_or_else(|e| panic!("db::connect: {e}"))
}

/// The configuration every test starts from: short timings.
pub fn test_config(db_url: &str) -> Config {
    let mut config = Config::default();
    config.database.url = Some(db_url.to_owned());
    config.database.pool_size = 6;
    config.delivery.lease = Dur::secs(1);
    config.sweeper.interval = Dur::millis(200);
    config.presence.grace = Dur::secs(1);
    config
}

/// A temp dir (named `prefix…`) that a cluster running as `postgres`
/// (when the tests run as root) can reach.
pub fn cluster_tempdir(prefix: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod temp dir");
    dir
}

/// A member of the test mesh with its key.
#[derive(Clone, Debug)]
pub struct Member {
    pub name: String,
    pub id: String,
    pub creds: Credentials,
}

impl Member {
    pub fn pubkey(&self) -> String {
        self.creds.pubkey()
    }
}

/// A broker in-process on its own database, with one mesh.
pub struct TestEnv {
    pub broker: Option<Broker>,
    /// The tests' own pool (the broker has its own).
    pub pool: db::Pool,
    pub db_url: String,
    db_name: String,
    /// `ws://127.0.0.1:port/ws`
    pub ws_url: String,
    /// `http://127.0.0.1:port`
    pub http_url: String,
    pub mesh_id: meshbroker::ids::MeshId,
    pub config: Arc<Config>,
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        drop_database(std::mem::take(&mut self.db_name));
    }
}

#[derive(QueryableByName)]
struct JsonRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    j: String,
}

impl TestEnv {
    pub async fn start() -> TestEnv {
        Self::start_with(|_| {}).await
    }

    /// Starts with the test config changed by `tweak`.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestEnv {
        Self::setup(tweak, true).await
    }

    /// A fresh database with a mesh, and no broker (for the process tests).
    pub async fn without_broker() -> TestEnv {
        Self::setup(|_| {}, false).await
    }

    async fn setup(tweak: impl FnOnce(&mut Config), with_broker: bool) -> TestEnv {
        let (db_url, db_name) = fresh_database().await;
        let mut config = test_config(&db_url);
        tweak(&mut config);
        let config = Arc::new(config);
        let pool = make_pool(&db_url, 3).await;
        let (broker, addr) = if with_broker {
            let broker_pool = make_pool(&db_url, config.database.pool_size).await;
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
            let broker = broker::start(config.clone(), broker_pool, listener)
                .await
                .expect("broker starts");
            let addr = broker.local_addr().to_string();
            (Some(broker), addr)
        } else {
            (None, "0.0.0.0:0".to_owned())
        };
        let mesh = {
            let mut conn = pool.get().await.expect("db conn");
            admin::create_mesh(&mut conn, "test-mesh")
                .await
                .expect("create mesh")
        };
        TestEnv {
            broker,
            pool,
            db_url,
            db_name,
            ws_url: format!("ws://{addr}/ws"),
            http_url: format!("http://{addr}"),
            mesh_id: mesh.id,
            config,
        }
    }

    pub fn broker(&self) -> &Broker {
        self.broker.as_ref().expect("broker running")
    }

    async fn add_member(&self, name: &str, is_admin: bool) -> Member {
        self.member_in(self.mesh_id, name, is_admin).await
    }

    /// A member with a fresh key in `mesh` (another mesh than the test's own).
    pub async fn member_in(
        &self,
        mesh: meshbroker::ids::MeshId,
        name: &str,
        is_admin: bool,
    ) -> Member {
        new_member(&self.pool, mesh, name, is_admin).await
    }

    pub async fn member(&self, name: &str) -> Member {
        self.add_member(name, false).await
    }

    pub async fn admin(&self, name: &str) -> Member {
        self.add_member(name, true).await
    }

    pub async fn revoke(&self, m: &Member) {
        let mut conn = self.pool.get().await.expect("db conn");
        admin::revoke_member(&mut conn, self.mesh_id, &m.pubkey())
            .await
            .expect("revoke member");
    }

    /// A `hello` (control-plane) connection with displayName = the member's name.
    pub async fn connect(&self, m: &Member) -> Connection {
        self.connect_opts(
            m,
            HelloOptions {
                display_name: Some(m.name.clone()),
                ..Default::default()
            },
        )
        .await
        .0
    }

    /// A `hello` (control-plane) connection under another display name.
    pub async fn connect_as(&self, m: &Member, display_name: &str) -> Connection {
        let opts = HelloOptions {
            display_name: Some(display_name.to_owned()),
            ..Default::default()
        };
        self.connect_opts(m, opts).await.0
    }

    pub async fn connect_opts(&self, m: &Member, opts: HelloOptions) -> (Connection, Value) {
        client::hello(&self.ws_url, &m.creds, &opts)
            .await
            .unwrap_or_else(|e| panic!("hello of {} failed: {e:#}", m.name))
    }

    /// A `session_hello` connection with a fresh session key.
    pub async fn session(&self, m: &Member, name: &str) -> (Connection, SigningKey) {
        let key = client::generate_session_key();
        let opts = HelloOptions {
            display_name: Some(name.to_owned()),
            ..Default::default()
        };
        let (conn, _) = self.session_opts(m, &key, opts).await;
        (conn, key)
    }

    pub async fn session_opts(
        &self,
        m: &Member,
        key: &SigningKey,
        opts: HelloOptions,
    ) -> (Connection, Value) {
        client::session_hello(&self.ws_url, &m.creds, key, &opts)
            .await
            .unwrap_or_else(|e| panic!("session_hello of {} failed: {e:#}", m.name))
    }

    /// Rows of `sql` as JSON objects.
    pub async fn rows(&self, sql: &str) -> Vec<Value> {
        let mut conn = self.pool.get().await.expect("db conn");
        let q = format!("SELECT row_to_json(t)::text AS j FROM ({sql}) t");
        let rows: Vec<JsonRow> = diesel::sql_query(q)
            .load(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("query {sql}: {e}"));
        rows.into_iter()
            .map(|r| serde_json::from_str(&r.j).expect("row_to_json gives JSON"))
            .collect()
    }

    /// Polls `sql` until `pred` holds for its rows (or panics after `WAIT`).
    pub async fn wait_rows(
        &self,
        sql: &str,
        what: &str,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let rows = self.rows(sql).await;
            if pred(&rows) {
                return rows;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}; rows of {sql}: {rows:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The text of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        metrics_at(&self.http_url).await
    }

    /// Polls `/metrics` until the sum of `name{labels}` satisfies `pred`.
    pub async fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        pred: impl Fn(f64) -> bool,
    ) -> f64 {
        wait_metric_at(&self.http_url, name, labels, WAIT, pred, |text| {
            format!("metrics:\n{text}")
        })
        .await
    }
}

/// The text of `GET <http_url>/metrics` (an in-process broker or a process).
pub async fn metrics_at(http_url: &str) -> String {
    let (status, body) = http_get(&format!("{http_url}/metrics")).await;
    assert_eq!(status, 200, "GET /metrics: {body}");
    body
}

/// Polls `<http_url>/metrics` until the sum of `name{labels}` satisfies
/// `pred`; after `timeout` panics with `explain(last metrics text)`.
pub async fn wait_metric_at(
    http_url: &str,
    name: &str,
    labels: &[(&str, &str)],
    timeout: Duration,
    pred: impl Fn(f64) -> bool,
    explain: impl Fn(&str) -> String,
) -> f64 {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let text = metrics_at(http_url).await;
        let v = metric(&text, name, labels);
        if pred(v) {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting on metric {name}{labels:?} (now {v}); {}",
                explain(&text)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A member with a fresh key in `mesh`, made through the admin API.
pub async fn new_member(
    pool: &db::Pool,
    mesh: meshbroker::ids::MeshId,
    name: &str,
    is_admin: bool,
) -> Member {
    let mut conn = pool.get().await.expect("db conn");
    let m = admin::add_member(&mut conn, mesh, name, None, is_admin)
        .await
        .expect("add member");
    let secret = m.secret_key.expect("generated secret key");
    Member {
        name: name.to_owned(),
        id: m.id.to_string(),
        creds: Credentials::from_secret_hex(&mesh.to_string(), &m.id.to_string(), &secret)
            .expect("secret key parses"),
    }
}

/// Sum of the samples of `name` whose labels include every `labels` pair
/// (0 when there are none).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_opt(text, name, labels).unwrap_or(0.0)
}

/// As [`metric`], `None` when no sample matches.
pub fn metric_opt(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let all = labels.iter().all(|(k, v)| {
            series_labels
                .split(',')
                .any(|kv| kv == format!("{k}=\"{v}\""))
        });
        if all {
            let v: f64 = value.parse().unwrap_or(f64::NAN);
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// GET `url`; `https://` trusts what `meshbroker::client::trust` named.
pub async fn http_get(url: &str) -> (u16, String) {
    let mut res = meshbroker::client::http_client(url)
        .expect("HTTP client")
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let body = res.body().limit(4 << 20).await.expect("body");
    (
        res.status().as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

pub async fn http_post_json(url: &str, body: &Value) -> (u16, String) {
    http_post_json_with(url, &[], body).await
}

/// [`http_post_json`] with extra request headers (`X-Forwarded-For`, …).
pub async fn http_post_json_with(
    url: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (u16, String) {
    let mut req = awc::Client::new().post(url);
    for &(name, value) in headers {
        req = req.append_header((name, value));
    }
    let mut res = req
        .send_json(body)
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let body = res.body().limit(4 << 20).await.expect("body");
    (
        res.status().as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

pub async fn http_post_raw(url: &str, content_type: &str, body: String) -> (u16, String) {
    let mut res = awc::Client::new()
        .post(url)
        .insert_header(("content-type", content_type))
        .send_body(body)
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let body = res.body().limit(4 << 20).await.expect("body");
    (
        res.status().as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// The pubkey of a session key.
pub fn spub(key: &SigningKey) -> String {
    crypto::public_hex(key)
}

/// Unwraps a client error with its full chain in the panic text.
pub trait Must<T> {
    fn must(self) -> T;
}

impl<T> Must<T> for anyhow::Result<T> {
    #[track_caller]
    fn must(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => panic!("{e:#}"),
        }
    }
}

/// Sends `frame` on a fresh connection and expects the refusal `code`: an
/// `error` frame with that code, then a close with `close_code` and the
/// code as reason.
pub async fn expect_refusal(ws_url: &str, frame: &Value, code: &str, close_code: u16) {
    let mut conn = Connection::connect(ws_url).await.must();
    conn.send_json(frame).await.must();
    let err = conn
        .expect_where("an error frame", WAIT, |f| {
            f["type"] == "error" || f["type"] == "hello_ack"
        })
        .await
        .must();
    assert_eq!(err["type"], "error", "expected refusal {code}, got {err}");
    assert_eq!(err["code"], code, "refusal code: {err}");
    let (close, reason) = conn.expect_close(WAIT).await.must();
    assert_eq!(
        close,
        Some(close_code),
        "close code after {code} (reason {reason:?})"
    );
    assert_eq!(reason, code, "close reason after {code}");
}

/// Every non-system push received within `window`.
pub async fn pushes_within(conn: &mut Connection, window: Duration) -> Vec<Value> {
    conn.drain_for(window)
        .await
        .must()
        .into_iter()
        .filter(|f| f["type"] == "push" && !client::is_system_push(f))
        .collect()
}

/// Asserts no non-system push arrives within `QUIET`.
pub async fn assert_no_push(conn: &mut Connection, who: &str) {
    let got = pushes_within(conn, QUIET).await;
    assert!(got.is_empty(), "{who} should get no push, got {got:?}");
}

/// Asserts a send's `ack` is a refusal with `code` (`"<code>: <text>"`).
pub fn assert_refused(ack: &Value, code: &str) {
    assert_eq!(ack["queued"], false, "{ack}");
    let error = ack["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with(&format!("{code}: ")),
        "expected {code}: {ack}"
    );
}
