//! PostgreSQL: the pool (which fails fast while the database is known to be
//! down), migrations, and (in [`embedded`], kept alive by [`supervisor`])
//! the private cluster used when no `database.url` is configured.
//!
//! Error policy: query functions return diesel's `QueryResult`; callers map
//! any database error to the protocol's `unavailable` (the database is the
//! only thing that can make a well-formed request fail that way).

pub mod embedded;
pub mod lifecycle;
mod pool;
pub mod queries;
pub mod schema;
pub mod supervisor;

use std::time::Duration;

use diesel::prelude::*;
use diesel_async::pooled_connection::bb8;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use futures_util::FutureExt;

pub use diesel_async::AsyncPgConnection as PgConn;
pub use pool::{Pool, PoolError, PooledConn};

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Key of the advisory lock held while migrations run, so two brokers
/// starting at once do not both apply them.
const MIGRATION_LOCK_KEY: i64 = 0x6d65_7368_6272_6b72; // "meshbrkr"

/// A statement that takes longer than this is cancelled by the server; no
/// broker query should come near it.
const STATEMENT_TIMEOUT_MS: u32 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to the database: {0}")]
    Connect(String),
    #[error("database migrations failed: {0}")]
    Migrate(String),
}

/// Opens one connection with the broker's session settings.
pub async fn establish(url: &str) -> ConnectionResult<AsyncPgConnection> {
    use diesel_async::SimpleAsyncConnection;
    let mut conn = AsyncPgConnection::establish(url).await?;
    conn.batch_execute(&format!(
        "SET application_name = 'meshbroker'; SET statement_timeout = {STATEMENT_TIMEOUT_MS}"
    ))
    .await
    .map_err(|e| ConnectionError::BadConnection(e.to_string()))?;
    Ok(conn)
}

/// Builds the pool and starts its probe (on the current tokio runtime);
/// fails if the first connection cannot be made.
pub async fn connect(url: &str, size: u32) -> Result<Pool, DbError> {
    // Opened directly, not through the pool: bb8 would report only a
    // timeout, not the reason. It becomes the probe's connection.
    let first = establish(url)
        .await
        .map_err(|e| DbError::Connect(e.to_string()))?;
    let mut manager_config = ManagerConfig::default();
    manager_config.custom_setup = Box::new(|url| establish(url).boxed());
    let manager =
        AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(url, manager_config);
    let builder = bb8::Pool::builder()
        .max_size(size)
        .connection_timeout(Duration::from_secs(3))
        .retry_connection(false);
    Ok(Pool::build(builder, manager, url.to_owned(), first))
}

/// Runs pending migrations under an advisory lock; returns how many ran.
pub async fn migrate(url: &str) -> Result<usize, DbError> {
    let url = url.to_owned();
    // diesel's migration harness is synchronous; run it on a plain thread
    // with its own runtime so it never blocks an actix worker.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(migrate_blocking(&url));
    });
    rx.await
        .map_err(|_| DbError::Migrate("migration thread panicked".into()))?
}

fn migrate_blocking(url: &str) -> Result<usize, DbError> {
    use diesel::connection::SimpleConnection;
    use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
    let mut conn: AsyncConnectionWrapper<AsyncPgConnection> =
        diesel::Connection::establish(url).map_err(|e| DbError::Connect(e.to_string()))?;
    conn.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))
        .map_err(|e| DbError::Migrate(e.to_string()))?;
    let result = conn
        .run_pending_migrations(MIGRATIONS)
        .map(|done| done.len())
        .map_err(|e| DbError::Migrate(e.to_string()));
    let _ = conn.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"));
    result
}

/// True when every embedded migration has been applied.
pub async fn migrations_current(conn: &mut AsyncPgConnection) -> QueryResult<bool> {
    #[derive(QueryableByName)]
    struct Version {
        #[diesel(sql_type = diesel::sql_types::Text)]
        version: String,
    }
    let applied: Vec<Version> = diesel::sql_query("SELECT version FROM __diesel_schema_migrations")
        .load(conn)
        .await?;
    let applied: std::collections::HashSet<String> =
        applied.into_iter().map(|v| v.version).collect();
    let wanted = diesel::migration::MigrationSource::<diesel::pg::Pg>::migrations(&MIGRATIONS)
        .map_err(diesel::result::Error::QueryBuilderError)?;
    Ok(wanted
        .iter()
        .all(|m| applied.contains(&m.name().version().to_string())))
}
