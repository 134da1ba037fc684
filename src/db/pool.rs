//! The shared pool, and what it knows about the database being down.
//!
//! bb8 never hands a failed connect to the caller of `get()`: the error goes
//! to the pool's error sink and the caller waits out the checkout timeout
//! (3 s). During an outage every hello, send, `/health` and `/health/ready`
//! would then hang that long, and a readiness probe with a shorter timeout
//! would see a hung broker rather than a 503. So the broker keeps a shared
//! "database down" state, set and cleared by one probe only: a query on a
//! connection of its own, outside the pool (so a pool exhausted by traffic
//! cannot starve it), every [`PROBE_EVERY`] and at once whenever a pooled
//! connect fails (reported by the pool's error sink). While the state is
//! set, `get()` fails at once. One failed connect alone (the server's
//! connection limit reached, a backend killed) does not set it: with the
//! probe's connection answering, the database is up, and the connections
//! the pool already holds go on serving.

use std::sync::{Arc, Weak};
use std::time::Duration;

use diesel::{ConnectionError, ConnectionResult};
use diesel_async::pooled_connection::{
    bb8, AsyncDieselConnectionManager, ManagerConfig, PoolError as ManagerError,
    PoolableConnection, RecyclingMethod,
};
use diesel_async::AsyncConnection;
use futures_util::FutureExt;

use super::DbError;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use tokio::sync::watch;

/// A statement that takes longer than this is cancelled by the server; no
/// broker query should come near it.
const STATEMENT_TIMEOUT_MS: u32 = 10_000;

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
    // No `SELECT 1` on every checkout: a round trip per query, on the
    // hottest paths. A connection that died fails its first query, and
    // the probe, not the checkout, tells the broker the database is down.
    // Only a connection whose socket is known closed is dropped at checkout.
    manager_config.recycling_method = RecyclingMethod::CustomFunction(Box::new(|conn| {
        let broken = PoolableConnection::is_broken(conn);
        async move {
            if broken {
                Err(diesel::result::Error::BrokenTransactionManager)
            } else {
                Ok(())
            }
        }
        .boxed()
    }));
    let manager =
        AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(url, manager_config);
    let builder = bb8::Pool::builder()
        .max_size(size)
        .connection_timeout(Duration::from_secs(3))
        .retry_connection(false);
    Ok(Pool::build(builder, manager, url.to_owned(), first))
}

/// How often the probe checks the database, up or down. It bounds how long
/// the broker keeps refusing once the database is back.
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// A probe that gets no answer in this long counts as a failure: the server
/// is up to nothing a broker could use.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// One connection checked out of the pool.
pub type PooledConn<'a> = bb8::PooledConnection<'a, AsyncPgConnection>;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Refused without waiting: the probe or a failed connect found the
    /// database down, and the probe has not seen it back yet.
    #[error("the database is down")]
    Down,
    #[error("database pool: {0}")]
    Checkout(#[from] bb8::RunError),
}

/// The "database down" state every pool clone shares.
#[derive(Debug)]
struct Health {
    down: watch::Sender<bool>,
    /// Asks the probe to check now, not at its next tick.
    check_now: tokio::sync::Notify,
}

impl Health {
    fn mark_down(&self, why: &dyn std::fmt::Display) {
        if !self.down.send_replace(true) {
            tracing::warn!(
                error = %why,
                "database down: refusing requests at once until it answers again"
            );
        }
    }

    fn mark_up(&self) {
        if self.down.send_replace(false) {
            tracing::warn!("database is back: serving again");
        }
    }
}

/// The broker's connection pool: bb8 with fail-fast checkouts while the
/// database is known to be down. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Pool {
    inner: bb8::Pool<AsyncPgConnection>,
    health: Arc<Health>,
    /// Where it connects: the cluster bus opens its own connection there.
    url: Arc<str>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("state", &self.inner.state())
            .field("down", &self.is_down())
            .finish()
    }
}

impl Pool {
    /// Wraps `builder`'s pool on `url` and starts its probe on the current
    /// tokio runtime, handing it `probe_conn` (already open) to begin with.
    /// The probe ends when the last clone of the pool is dropped.
    pub(super) fn build(
        builder: ::bb8::Builder<
            diesel_async::pooled_connection::AsyncDieselConnectionManager<AsyncPgConnection>,
        >,
        manager: diesel_async::pooled_connection::AsyncDieselConnectionManager<AsyncPgConnection>,
        url: String,
        probe_conn: AsyncPgConnection,
    ) -> Pool {
        let health = Arc::new(Health {
            down: watch::Sender::new(false),
            check_now: tokio::sync::Notify::new(),
        });
        let inner = builder
            .error_sink(Box::new(CheckNow(Arc::downgrade(&health))))
            .build_unchecked(manager);
        let shared_url: Arc<str> = url.as_str().into();
        tokio::spawn(probe(url, Arc::downgrade(&health), Some(probe_conn)));
        Pool {
            inner,
            health,
            url: shared_url,
        }
    }

    /// A pooled connection; fails at once while the database is known to be
    /// down, and gives up waiting as soon as it is found down.
    pub async fn get(&self) -> Result<PooledConn<'_>, PoolError> {
        let mut down = self.health.down.subscribe();
        if *down.borrow_and_update() {
            return Err(PoolError::Down);
        }
        tokio::select! {
            got = self.inner.get() => got.map_err(PoolError::Checkout),
            // A caller already waiting when the database goes would wait
            // out the checkout timeout: the connect that failed is not its.
            _ = down.wait_for(|down| *down) => Err(PoolError::Down),
        }
    }

    /// A pool on a server that is not there, with no probe, for unit tests
    /// of code that holds a pool but whose tested paths never get a
    /// connection (a checkout fails after 100 ms).
    #[cfg(test)]
    pub(crate) fn unreachable() -> Pool {
        let manager = diesel_async::pooled_connection::AsyncDieselConnectionManager::<
            AsyncPgConnection,
        >::new("postgres://nobody@127.0.0.1:1/none");
        let health = Arc::new(Health {
            down: watch::Sender::new(false),
            check_now: tokio::sync::Notify::new(),
        });
        let inner = ::bb8::Pool::builder()
            .connection_timeout(Duration::from_millis(100))
            .build_unchecked(manager);
        Pool {
            inner,
            health,
            url: "postgres://nobody@127.0.0.1:1/none".into(),
        }
    }

    /// The URL the pool connects to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// bb8's counts (connections, idle) for the metrics.
    pub fn state(&self) -> ::bb8::State {
        self.inner.state()
    }

    /// True while the database is known to be down.
    pub fn is_down(&self) -> bool {
        *self.health.down.borrow()
    }
}

/// The pool's error sink: a failed connect makes the probe check at once.
#[derive(Debug, Clone)]
struct CheckNow(Weak<Health>);

impl ::bb8::ErrorSink<ManagerError> for CheckNow {
    fn sink(&self, error: ManagerError) {
        // A pooled connection found broken at checkout (`QueryError`) says
        // nothing about the server: one backend may have been terminated.
        // bb8 drops it and takes or opens another.
        if let ManagerError::ConnectionError(e) = &error {
            if let Some(health) = self.0.upgrade() {
                tracing::debug!(error = %e, "a pooled connect failed; probing the database");
                health.check_now.notify_one();
            }
        }
    }

    fn boxed_clone(&self) -> Box<dyn ::bb8::ErrorSink<ManagerError>> {
        Box::new(self.clone())
    }
}

async fn probe(url: String, health: Weak<Health>, mut conn: Option<AsyncPgConnection>) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let Some(strong) = health.upgrade() else {
            return;
        };
        tokio::select! {
            _ = tick.tick() => {}
            _ = strong.check_now.notified() => {}
        }
        drop(strong);
        let Some(health) = health.upgrade() else {
            return;
        };
        match check(&url, &mut conn).await {
            Ok(()) => health.mark_up(),
            Err(why) => health.mark_down(&why),
        }
    }
}

/// `SELECT 1` on the probe's connection; if that fails, the connection may
/// be all that broke, so a fresh connect decides.
async fn check(url: &str, conn: &mut Option<AsyncPgConnection>) -> Result<(), String> {
    if let Some(c) = conn.as_mut() {
        let ping = diesel::sql_query("SELECT 1").execute(c);
        if let Ok(Ok(_)) = tokio::time::timeout(PROBE_TIMEOUT, ping).await {
            return Ok(());
        }
        *conn = None;
    }
    match tokio::time::timeout(PROBE_TIMEOUT, establish(url)).await {
        Ok(Ok(c)) => {
            *conn = Some(c);
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::embedded::{EmbeddedOptions, EmbeddedPostgres, Throwaway};
    use std::time::Instant;

    /// Really stops the database under a pool: once the probe has seen it
    /// (within a probe interval; a connection handed out before that fails
    /// its first query at once), checkouts are refused at once (not after
    /// the 3 s checkout timeout) and work again once the probe sees it back.
    #[test]
    fn checkouts_fail_at_once_while_the_database_is_down() {
        let Some(mut cluster) = Throwaway::start() else {
            return;
        };
        let dir = cluster.root.path().join("data");
        let pg = &mut cluster.pg;
        let url = pg.url_for("postgres");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let pool = crate::db::connect(&url, 2).await.unwrap();
            drop(pool.get().await.expect("a connection while it is up"));
            assert!(!pool.is_down());

            pg.stop();
            let stopped = Instant::now();
            while !pool.is_down() {
                if let Ok(mut conn) = pool.get().await {
                    assert!(
                        crate::db::ping(&mut conn).await.is_err(),
                        "a query after the stop"
                    );
                }
                assert!(
                    stopped.elapsed() < Duration::from_secs(3),
                    "never seen down"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            for attempt in 0..3 {
                let began = Instant::now();
                let refused = pool.get().await.map(drop);
                let took = began.elapsed();
                assert!(matches!(refused, Err(PoolError::Down)), "{refused:?}");
                assert!(
                    took < Duration::from_secs(1),
                    "checkout {attempt} took {took:?}"
                );
            }
            assert!(pool.is_down());

            let fast = EmbeddedOptions { fsync: false };
            let pg = EmbeddedPostgres::start(&dir, &fast).unwrap();
            let back = Instant::now();
            while pool.get().await.is_err() {
                assert!(back.elapsed() < Duration::from_secs(10), "never seen back");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(!pool.is_down());
            drop(pg);
        });
    }
}
