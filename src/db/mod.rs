//! PostgreSQL: the pool (which fails fast while the database is known to be
//! down), migrations, and (in [`embedded`], kept alive by [`supervisor`])
//! the private cluster used when no `database.url` is configured.
//!
//! Error policy: query functions return diesel's `QueryResult`; callers map
//! any database error to the protocol's `unavailable` (the database is the
//! only thing that can make a well-formed request fail that way).

pub mod admin;
pub mod dead_letters;
pub mod embedded;
pub mod lifecycle;
pub mod notice;
mod pool;
pub mod queries;
pub mod rules;
pub mod schema;
pub mod supervisor;
mod text_enums;

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

pub use diesel_async::AsyncPgConnection as PgConn;
pub use pool::{connect, establish, Pool, PoolError, PooledConn};

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Key of the advisory lock held while migrations run, so two brokers
/// starting at once do not both apply them.
const MIGRATION_LOCK_KEY: i64 = 0x6d65_7368_6272_6b72; // "meshbrkr"

/// Why a step that needs the database failed while serving: no connection
/// (the database is down, or the pool stayed exhausted), or the query
/// itself. Either way the client is told `unavailable`.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("database query failed: {0}")]
    Query(#[from] diesel::result::Error),
}

/// Why the database could not be set up (connect, migrate).
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to the database: {0}")]
    Connect(String),
    #[error("database migrations failed: {0}")]
    Migrate(String),
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

/// A round trip to the server (`/health`'s check).
pub async fn ping(conn: &mut AsyncPgConnection) -> QueryResult<()> {
    diesel::sql_query("SELECT 1").execute(conn).await?;
    Ok(())
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
