//! The broker's actors and the state they share.
//!
//! Listed in the order they depend on each other (each uses only those
//! before it):
//! - [`wake`]: the one message that wakes members' drains.
//! - [`batch`]: self-clocking batching actors; [`claims`] the claimer and
//!   acker built on it (every drain's claims and acks share statements).
//! - [`backlog`] / [`conn`]: a connection's outward face — what the drain
//!   and registry may send it, through a handle of `Recipient`s, bounded by
//!   its backlog.
//! - [`drain::Drain`]: one per member with a live connection; claims, pushes, acks.
//! - [`registry::Registry`]: the presence registry; routes between sessions and drains.
//! - [`writer`]: supervised; stores every session's sends, one transaction per batch.
//! - [`session::WsSession`]: one per WebSocket connection, tagged with its role.
//! - [`sweeper::Sweeper`]: supervised; leases, dead letters, grace windows.
//! - [`janitor::Janitor`]: supervised; retention and expiry deletes.
//! - [`bus::Bus`]: this node in the cluster: heartbeat, dead nodes, notices
//!   to and from other nodes (LISTEN/NOTIFY), the safety-net poll.

pub mod backlog;
pub mod batch;
pub mod bus;
pub mod claims;
pub mod conn;
pub mod drain;
pub mod janitor;
pub mod registry;
pub mod session;
pub mod sweeper;
pub mod wake;
pub mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use crate::config::Config;
use crate::db::Pool;
use crate::ids::NodeId;
use crate::metrics::Metrics;

/// What every actor of one broker process shares. Cheap to clone (`Arc`).
pub struct Shared {
    /// Read through [`Shared::config`]: SIGHUP swaps it ([`Shared::reconfigure`]).
    config: RwLock<Arc<Config>>,
    pub pool: Pool,
    pub metrics: Arc<Metrics>,
    /// This process; recorded on presence rows and claims.
    pub node_id: NodeId,
    /// Per-member send token buckets (`limits.send_burst` / `send_per_sec`).
    pub send_limits: RateLimiter<uuid::Uuid>,
    /// What this node's last heartbeat learned of the cluster.
    pub cluster: ClusterView,
}

impl Shared {
    pub fn new(config: Arc<Config>, pool: Pool, metrics: Arc<Metrics>) -> Shared {
        Shared {
            send_limits: RateLimiter::new(config.limits.send_burst, config.limits.send_per_sec),
            config: RwLock::new(config),
            pool,
            metrics,
            node_id: NodeId::new(),
            cluster: ClusterView::default(),
        }
    }

    /// The configuration in force. Take it once per decision: a reload
    /// between two reads would mix two configurations.
    pub fn config(&self) -> Arc<Config> {
        self.config.read().expect("config lock").clone()
    }

    /// Runs with `config` from now on (a reload; see `reload::plan` for
    /// what may differ from the running one).
    pub fn reconfigure(&self, config: Arc<Config>) {
        self.send_limits
            .set_rate(config.limits.send_burst, config.limits.send_per_sec);
        *self.config.write().expect("config lock") = config;
    }
}

/// This node's view of the cluster, written by the bus at each heartbeat.
#[derive(Debug, Default)]
pub struct ClusterView {
    leader: AtomicBool,
    live_nodes: AtomicI64,
    /// Shutdown marked this node gone: its heartbeat must not join again.
    leaving: AtomicBool,
}

impl ClusterView {
    /// Whether this node runs the cluster-wide housekeeping now (the
    /// oldest live node, as its last heartbeat saw it).
    pub fn is_leader(&self) -> bool {
        self.leader.load(Relaxed)
    }

    /// Live nodes, this one included (0 before the first heartbeat).
    pub fn live_nodes(&self) -> i64 {
        self.live_nodes.load(Relaxed)
    }

    pub fn leave(&self) {
        self.leaving.store(true, Relaxed);
        self.leader.store(false, Relaxed);
    }

    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Relaxed)
    }

    pub fn set(&self, leader: bool, live_nodes: i64) {
        self.leader.store(leader, Relaxed);
        self.live_nodes.store(live_nodes, Relaxed);
    }
}

/// Why a pass of a supervised timer actor (sweeper, janitor) failed: the
/// pass stops the actor and its supervisor restarts it.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// A fault drill (`SIGUSR1`) asked for this failure.
    #[error("injected failure (fault drill)")]
    Injected,
    #[error(transparent)]
    Db(#[from] crate::db::QueryError),
    #[error("the registry did not answer: {0}")]
    Registry(#[from] actix::MailboxError),
}

impl From<diesel::result::Error> for PassError {
    fn from(e: diesel::result::Error) -> Self {
        PassError::Db(e.into())
    }
}

impl From<crate::db::PoolError> for PassError {
    fn from(e: crate::db::PoolError) -> Self {
        PassError::Db(e.into())
    }
}

/// Token buckets keyed by `K`: `burst` tokens, refilled at `per_sec`.
pub struct RateLimiter<K> {
    state: Mutex<Buckets<K>>,
}

struct Buckets<K> {
    burst: f64,
    per_sec: f64,
    tokens: HashMap<K, (f64, Instant)>,
}

impl<K: std::hash::Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(burst: u32, per_sec: u32) -> Self {
        RateLimiter {
            state: Mutex::new(Buckets {
                burst: burst.into(),
                per_sec: per_sec.into(),
                tokens: HashMap::new(),
            }),
        }
    }

    /// New limits for every key; a bucket keeps its tokens, up to the new
    /// burst.
    pub fn set_rate(&self, burst: u32, per_sec: u32) {
        let mut state = self.state.lock().expect("rate limiter lock");
        state.burst = burst.into();
        state.per_sec = per_sec.into();
    }

    /// Takes one token for `key`; false when the bucket is empty.
    pub fn allow(&self, key: &K) -> bool {
        let now = Instant::now();
        let mut state = self.state.lock().expect("rate limiter lock");
        let Buckets {
            burst,
            per_sec,
            tokens: buckets,
        } = &mut *state;
        let (burst, per_sec) = (*burst, *per_sec);
        if buckets.len() > 100_000 {
            // Full buckets carry no information: forget them.
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * per_sec < burst
            });
        }
        let (tokens, at) = buckets.entry(key.clone()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * per_sec).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A `Shared` for actor unit tests: default config, and a pool that is
/// never connected (a checkout fails after its timeout), so what is tested
/// is the actors' own logic.
#[cfg(test)]
pub(crate) fn test_shared() -> Shared {
    Shared::new(
        Arc::new(Config::default()),
        Pool::unreachable(),
        Arc::new(Metrics::default()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_refuses() {
        let rl = RateLimiter::new(3, 1);
        assert!((0..3).all(|_| rl.allow(&1)));
        assert!(!rl.allow(&1));
        assert!(rl.allow(&2), "buckets are per key");
    }

    #[test]
    fn a_new_rate_applies_to_existing_buckets() {
        let rl = RateLimiter::new(1, 1);
        assert!(rl.allow(&1));
        assert!(!rl.allow(&1));
        rl.set_rate(1, 1_000_000);
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(rl.allow(&1), "refilled at the new rate");
        rl.set_rate(0, 0);
        assert!(!rl.allow(&3), "a new bucket starts at the new burst");
    }
}
