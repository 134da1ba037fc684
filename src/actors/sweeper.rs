//! The sweeper: on a timer, makes expired leases claimable again (and tells
//! the drains), dead-letters deliveries past `max_attempts`, ends presence
//! grace windows (`peer_left`), closes the live connections of members
//! revoked since their hello (4002), reaps presence rows of dead brokers,
//! and forgets old hello signatures and idempotency keys.
//!
//! In a cluster every step but the revocation check (which looks at this
//! node's connections) runs on the leader only (the oldest live node, see
//! [`super::bus`]): one node ends grace windows and frees idempotency keys,
//! so those statements never wait on each other, and the leader's registry
//! tells every node what they ended. The leases and dead letters would be
//! safe anywhere (`SKIP LOCKED`); they run there too so that one node's
//! counters show the cluster's. Handover: when the leader dies, the next
//! oldest leads from the heartbeat that declares it dead.
//!
//! It runs under `actix::Supervisor`: a pass that fails (the database went
//! away, or an injected fault) stops it, and the supervisor restarts it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix::prelude::*;

use super::registry::{self, Registry};
use super::{PassError, Shared};
use crate::db::queries;
use crate::ids::MemberId;
use crate::metrics::{ActorKind, Metrics};

/// Rows one pass touches per step at most, so no statement grows huge.
const BATCH: i64 = 1000;

pub struct Sweeper {
    shared: Arc<Shared>,
    registry: Addr<Registry>,
    /// Set by tests and operators to make the next pass fail.
    fail_next: Arc<AtomicBool>,
    /// A pass is running; a tick during it is skipped.
    running: bool,
}

impl Sweeper {
    pub fn new(shared: Arc<Shared>, registry: Addr<Registry>, fail_next: Arc<AtomicBool>) -> Self {
        Sweeper {
            shared,
            registry,
            fail_next,
            running: false,
        }
    }

    fn sweep(&mut self, ctx: &mut Context<Self>) {
        if self.running {
            return;
        }
        self.running = true;
        let shared = self.shared.clone();
        let registry = self.registry.clone();
        let fail = self.fail_next.swap(false, Ordering::SeqCst);
        let fut = async move {
            if fail {
                return Err(PassError::Injected);
            }
            // Asked first: no pooled connection is held across it.
            let live = registry.send(registry::LiveMembers).await?;
            let cfg = shared.config();
            let mut conn = shared.pool.get().await?;
            let (mut dead, mut expired, mut grace) = Default::default();
            if shared.cluster.is_leader() {
                let max_attempts = cfg.delivery.max_attempts as i32;
                dead = queries::dead_letter(&mut conn, max_attempts, BATCH).await?;
                expired = queries::expire_leases(&mut conn, BATCH).await?;
                grace = queries::end_grace(&mut conn).await?;
                let presence = &cfg.presence;
                let silent_for =
                    (presence.pong_timeout.get() * 2).max(presence.ping_interval.get() * 3);
                queries::reap_stale_presence(&mut conn, silent_for).await?;
                queries::forget_hellos(&mut conn, cfg.limits.hello_skew.get() * 2).await?;
                queries::close_dedupe_windows(&mut conn, cfg.delivery.dedupe_window.get(), BATCH)
                    .await?;
            }
            let live: Vec<uuid::Uuid> = live.iter().map(|m| m.0).collect();
            let revoked = queries::revoked_among(&mut conn, &live, BATCH).await?;
            Ok::<
                (
                    Vec<queries::Swept>,
                    Vec<queries::Swept>,
                    Vec<queries::Subject>,
                    _,
                ),
                PassError,
            >((dead, expired, grace, revoked))
        };
        ctx.spawn(fut.into_actor(self).map(|result, act, ctx| {
            act.running = false;
            match result {
                Ok((dead, expired, grace, revoked)) => {
                    let m = &act.shared.metrics;
                    Metrics::add(&m.sweeper_runs, 1);
                    Metrics::add(&m.leases_expired, expired.len() as u64);
                    Metrics::add(&m.dead_lettered, dead.len() as u64);
                    if !dead.is_empty() {
                        tracing::warn!(
                            count = dead.len(),
                            "dead-lettered deliveries past delivery.max_attempts"
                        );
                    }
                    let reclaimed: Vec<_> = expired.into_iter().chain(dead).collect();
                    if !reclaimed.is_empty() {
                        act.registry.do_send(registry::Reclaimed(reclaimed));
                    }
                    if !grace.is_empty() {
                        act.registry.do_send(registry::GraceEnded(grace));
                    }
                    if !revoked.is_empty() {
                        act.registry.do_send(registry::Revoked(
                            revoked.into_iter().map(MemberId).collect(),
                        ));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "sweeper pass failed; restarting the sweeper");
                    ctx.stop();
                }
            }
        }));
    }
}

impl Actor for Sweeper {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.running = false;
        self.shared.metrics.actor_started(ActorKind::Sweeper);
        ctx.run_interval(self.shared.config().sweeper.interval.get(), |act, ctx| {
            act.shared.metrics.actor_message(ActorKind::Sweeper);
            act.sweep(ctx);
        });
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.shared.metrics.actor_stopped(ActorKind::Sweeper);
    }
}

impl Supervised for Sweeper {
    fn restarting(&mut self, _: &mut Self::Context) {
        self.shared.metrics.actor_restarted(ActorKind::Sweeper);
        tracing::info!("sweeper restarted by its supervisor");
    }
}
