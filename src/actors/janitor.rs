//! The janitor: on a timer (`janitor.interval`), deletes what can no longer
//! matter so the tables stop growing under steady traffic. In a cluster
//! only the leader runs it (see [`super::bus`]): the walk over all messages
//! then runs once, not once per node. (Waking drains whose members have
//! claimable deliveries, its first step once, is the bus's poll now.)
//!
//! One pass, in this order (queries in [`crate::db::lifecycle`]):
//! 1. rows of nodes dead for longer than `delivery.retention`;
//! 2. deliveries past `expires_at` (`message_ttl`), in any state;
//! 3. delivered deliveries older than `delivery.retention`;
//! 4. the messages of 2 and 3 that no delivery refers to any more, whose
//!    idempotency key is released and that are older than the retention;
//! 5. expired messages left without deliveries;
//! 6. one step of a resumable walk over all messages for the orphans 4
//!    cannot see (sent to nobody, or key still held when the last delivery
//!    went);
//! 7. presence rows closed more than `message_ttl` ago with nothing queued
//!    to their key.
//!
//! Every statement deletes at most [`BATCH`] rows and each step runs at
//! most [`MAX_STATEMENTS`] of them; a pass that stopped with work left runs
//! the next one after [`CATCH_UP`] instead of a whole interval later.
//!
//! Like the sweeper it runs under `actix::Supervisor`: a pass that fails
//! stops it, and the supervisor restarts it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use uuid::Uuid;

use super::registry::Registry;
use super::{PassError, Shared};
use crate::db::lifecycle::{self, WalkCursor};
use crate::db::queries;
use crate::metrics::{ActorKind, Metrics, RetentionTable};

/// Rows one statement deletes at most.
pub const BATCH: i64 = 1000;
/// Statements one step of a pass runs at most.
pub const MAX_STATEMENTS: usize = 10;
/// Pause before the next pass when a pass left work behind.
const CATCH_UP: Duration = Duration::from_millis(200);

pub struct Janitor {
    shared: Arc<Shared>,
    /// Kept for the supervisor's factory; the janitor tells it nothing now.
    _registry: Addr<Registry>,
    /// Set by tests and operators to make the next pass fail.
    fail_next: Arc<AtomicBool>,
    /// A pass is running; a tick during it is skipped.
    running: bool,
    /// Where the walk over all messages resumes (kept across restarts).
    walk: Option<WalkCursor>,
}

/// What one pass did.
#[derive(Debug, Default)]
struct Pass {
    deliveries: u64,
    messages: u64,
    presence: u64,
    /// Some step stopped at `MAX_STATEMENTS` with rows left.
    behind: bool,
    walk: Option<WalkCursor>,
}

/// Runs `step` (one bounded statement, returning how many rows it handled)
/// until a statement handles less than a full batch or `MAX_STATEMENTS`
/// ran; true when it stopped with work left.
macro_rules! batches {
    ($count:expr, $step:expr) => {{
        let mut behind = true;
        for _ in 0..MAX_STATEMENTS {
            let n = $step;
            $count += n as u64;
            if (n as i64) < BATCH {
                behind = false;
                break;
            }
        }
        behind
    }};
}

impl Janitor {
    pub fn new(shared: Arc<Shared>, registry: Addr<Registry>, fail_next: Arc<AtomicBool>) -> Self {
        Janitor {
            shared,
            _registry: registry,
            fail_next,
            running: false,
            walk: None,
        }
    }

    fn pass(&mut self, ctx: &mut Context<Self>) {
        if self.running {
            return;
        }
        let fail = self.fail_next.swap(false, Ordering::SeqCst);
        if !fail && !self.shared.cluster.is_leader() {
            return;
        }
        self.running = true;
        let shared = self.shared.clone();
        let walk = self.walk;
        let fut = async move {
            if fail {
                return Err(PassError::Injected);
            }
            run_pass(&shared, walk).await
        };
        ctx.spawn(fut.into_actor(self).map(|result, act, ctx| {
            act.running = false;
            match result {
                Ok(pass) => {
                    let m = &act.shared.metrics;
                    Metrics::add(&m.janitor_runs, 1);
                    m.retention_deleted(RetentionTable::MessageQueue, pass.deliveries);
                    m.retention_deleted(RetentionTable::Message, pass.messages);
                    m.retention_deleted(RetentionTable::Presence, pass.presence);
                    if pass.deliveries + pass.messages + pass.presence > 0 {
                        tracing::debug!(
                            deliveries = pass.deliveries,
                            messages = pass.messages,
                            presence = pass.presence,
                            behind = pass.behind,
                            "janitor deleted rows"
                        );
                    }
                    act.walk = pass.walk;
                    if pass.behind {
                        ctx.run_later(CATCH_UP, |act, ctx| act.pass(ctx));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "janitor pass failed; restarting the janitor");
                    ctx.stop();
                }
            }
        }));
    }
}

/// One pass; see the module documentation for its steps.
async fn run_pass(shared: &Shared, walk: Option<WalkCursor>) -> Result<Pass, PassError> {
    let delivery = &shared.config().delivery;
    let retention = delivery.retention.get();
    let mut conn = shared.pool.get().await?;
    let mut pass = Pass::default();
    queries::forget_dead_nodes(&mut conn, retention).await?;

    let mut freed: HashSet<Uuid> = HashSet::new();
    pass.behind |= batches!(pass.deliveries, {
        let ids = lifecycle::delete_expired_deliveries(&mut conn, BATCH).await?;
        let n = ids.len();
        freed.extend(ids);
        n
    });
    pass.behind |= batches!(pass.deliveries, {
        let ids = lifecycle::delete_delivered(&mut conn, retention, BATCH).await?;
        let n = ids.len();
        freed.extend(ids);
        n
    });
    let freed: Vec<Uuid> = freed.into_iter().collect();
    for chunk in freed.chunks(BATCH as usize) {
        pass.messages +=
            lifecycle::delete_orphan_messages(&mut conn, chunk, Some(retention)).await? as u64;
    }
    pass.behind |= batches!(
        pass.messages,
        lifecycle::delete_expired_messages(&mut conn, BATCH).await?
    );
    let (walked, next) = lifecycle::walk_orphan_messages(&mut conn, walk, retention, BATCH).await?;
    pass.messages += walked as u64;
    pass.walk = next;
    pass.behind |= batches!(
        pass.presence,
        lifecycle::delete_closed_presence(&mut conn, delivery.message_ttl.get(), BATCH).await?
    );
    Ok(pass)
}

impl Actor for Janitor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.running = false;
        self.shared.metrics.actor_started(ActorKind::Janitor);
        ctx.run_interval(self.shared.config().janitor.interval.get(), |act, ctx| {
            act.shared.metrics.actor_message(ActorKind::Janitor);
            act.pass(ctx);
        });
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.shared.metrics.actor_stopped(ActorKind::Janitor);
    }
}

impl Supervised for Janitor {
    fn restarting(&mut self, _: &mut Self::Context) {
        self.shared.metrics.actor_restarted(ActorKind::Janitor);
        tracing::info!("janitor restarted by its supervisor");
    }
}
