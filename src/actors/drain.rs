//! The per-member drain: claims the member's queued deliveries with a lease,
//! pushes them through the member's connections, and takes their acks.
//!
//! It runs only when woken (a message accepted, a connection joined or
//! changed status, an ack freed room, the sweeper reclaimed a lease, a
//! nack's delay passed) — never a busy poll. One claim pass runs at a time;
//! a wake-up during a pass reruns it once the pass ends. The pooled
//! connection is returned before any push is written.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};

use super::batch::{BatchFailed, Submit};
use super::claims::{Acker, ClaimPass, Claimer};
use super::conn::{ConnHandle, Outbound};
use super::Shared;
use crate::db::queries::{self, AckSpec, Claimed};
use crate::db::QueryError;
use crate::error_code::ErrorCode;
use crate::ids::{ClaimId, DeliveryId, MemberId, MessageId, PresenceId, Role};
use crate::metrics::{ActorKind, Metrics};
use crate::protocol::{self, Push};
use crate::routing::{self, Candidate, ClaimPlan};

/// Pause before retrying a pass that failed on the database.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// One of the member's live connections.
struct Conn {
    /// Pushes go through it: it cuts off a client that stopped reading.
    handle: ConnHandle,
    key: String,
    role: Role,
    has_session_pubkey: bool,
    /// Order of arrival, to prefer the oldest among equals.
    seq: u64,
    /// Unacked pushes on this connection: delivery id → lease expiry.
    in_flight: HashMap<DeliveryId, DateTime<Utc>>,
}

impl Conn {
    fn room(&mut self, max_in_flight: u32) -> i64 {
        // Entries whose lease ran out no longer hold room, even if the
        // sweeper's notice was lost.
        let now = Utc::now();
        self.in_flight.retain(|_, expires| *expires > now);
        i64::from(max_in_flight) - self.in_flight.len() as i64
    }
}

/// Where drains start: the batchers they share, and the arbiters they are
/// spread over (round robin), so pushes are encoded on every core.
#[derive(Clone)]
pub struct DrainHome {
    pub claimer: Addr<Claimer>,
    pub acker: Addr<Acker>,
    pub arbiters: Arc<[ArbiterHandle]>,
    next: Arc<std::sync::atomic::AtomicUsize>,
}

impl DrainHome {
    pub fn new(claimer: Addr<Claimer>, acker: Addr<Acker>, arbiters: Vec<ArbiterHandle>) -> Self {
        assert!(!arbiters.is_empty(), "drains need an arbiter to run on");
        DrainHome {
            claimer,
            acker,
            arbiters: arbiters.into(),
            next: Default::default(),
        }
    }

    /// Batchers and drains on the current arbiter (unit tests).
    #[cfg(test)]
    pub(crate) fn here(shared: &Arc<Shared>) -> Self {
        use super::batch::Batcher;
        use super::claims::{AckJob, ClaimJob};
        DrainHome::new(
            Batcher::new(shared.clone(), ClaimJob).start(),
            Batcher::new(shared.clone(), AckJob).start(),
            vec![Arbiter::current()],
        )
    }

    /// Starts the drain of `member_id` on the next arbiter.
    pub fn start(&self, shared: Arc<Shared>, member_id: MemberId) -> Addr<Drain> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.arbiters.len();
        let (claimer, acker) = (self.claimer.clone(), self.acker.clone());
        Drain::start_in_arbiter(&self.arbiters[i], move |_| {
            Drain::new(shared, member_id, claimer, acker)
        })
    }
}

pub struct Drain {
    shared: Arc<Shared>,
    member_id: MemberId,
    claimer: Addr<Claimer>,
    acker: Addr<Acker>,
    conns: HashMap<PresenceId, Conn>,
    next_seq: u64,
    /// A claim pass is running.
    running: bool,
    /// Woken during a pass: run again after it.
    dirty: bool,
    /// Database futures in flight (claims, acks, releases). Stopping the
    /// actor would cancel them mid-way: an ack never recorded, rows
    /// claimed and never pushed. So the drain stops only when none is left.
    pending: usize,
    /// The member's last connection left: stop once `pending` is zero.
    retiring: bool,
    /// Acks of a connection not yet recorded. A closed connection's claims
    /// are released only after them: released first, what it had acked
    /// would be claimed and pushed again (an attempt spent for nothing).
    acks_in_flight: HashMap<PresenceId, usize>,
    /// Connections that closed while their acks were in flight, and
    /// whether each was the member's last.
    release_after_acks: HashMap<PresenceId, Leaving>,
    /// nack / in_progress queries in flight, per connection.
    settles_in_flight: HashMap<PresenceId, usize>,
}

/// Whether a connection that closed was the member's last on this broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaving {
    /// Others remain: drain on.
    OneOfSeveral,
    /// The last: the drain stops once its database work is done.
    Last,
}

impl Drain {
    pub fn new(
        shared: Arc<Shared>,
        member_id: MemberId,
        claimer: Addr<Claimer>,
        acker: Addr<Acker>,
    ) -> Self {
        Drain {
            shared,
            member_id,
            claimer,
            acker,
            conns: HashMap::new(),
            next_seq: 0,
            running: false,
            dirty: false,
            pending: 0,
            retiring: false,
            acks_in_flight: HashMap::new(),
            release_after_acks: HashMap::new(),
            settles_in_flight: HashMap::new(),
        }
    }

    /// Whether one more ack / nack / in_progress query of this connection
    /// may run. A client has at most `max_in_flight` unacked pushes on a
    /// connection, so more settling queries than that at once are repeats
    /// or made up: dropped (and counted), so one connection's flood cannot
    /// queue unbounded work on the shared pool. A dropped genuine ack costs
    /// at most a repeated push.
    fn admit(&self, presence_id: PresenceId) -> bool {
        let n = |m: &HashMap<PresenceId, usize>| m.get(&presence_id).copied().unwrap_or(0);
        let busy = n(&self.acks_in_flight) + n(&self.settles_in_flight);
        if busy < self.shared.config().delivery.max_in_flight as usize {
            return true;
        }
        self.shared
            .metrics
            .frame_rejected(ErrorCode::SettleOverflow);
        false
    }

    /// Spawns a future that uses the database, counted in `pending`.
    fn spawn_db<F>(&mut self, ctx: &mut Context<Self>, fut: F)
    where
        F: ActorFuture<Self, Output = ()> + 'static,
    {
        self.pending += 1;
        ctx.spawn(fut.map(|(), act, ctx| {
            act.pending -= 1;
            if act.retiring && act.conns.is_empty() && act.pending == 0 {
                ctx.stop();
            }
        }));
    }

    fn count(&self) {
        self.shared.metrics.actor_message(ActorKind::Drain);
    }

    /// What each connection may claim now (the rule is
    /// [`routing::plan_claims`]).
    fn plan(&mut self) -> Vec<ClaimPlan> {
        let max_in_flight = self.shared.config().delivery.max_in_flight;
        let candidates: Vec<Candidate> = self
            .conns
            .iter_mut()
            .map(|(id, c)| Candidate {
                presence_id: *id,
                key: c.key.clone(),
                role: c.role,
                has_session_pubkey: c.has_session_pubkey,
                seq: c.seq,
                room: c.room(max_in_flight),
                cut: c.handle.is_cut(),
            })
            .collect();
        routing::plan_claims(&candidates, self.shared.config().delivery.claim_batch)
    }

    /// Runs one claim pass (or marks one due if a pass is running).
    fn drain(&mut self, ctx: &mut Context<Self>) {
        if self.running {
            self.dirty = true;
            return;
        }
        let plans = self.plan();
        if plans.is_empty() {
            return;
        }
        self.running = true;
        self.dirty = false;
        let asked: Vec<(PresenceId, i64)> =
            plans.iter().map(|p| (p.presence_id, p.limit)).collect();
        let pass = ClaimPass {
            member_id: self.member_id,
            plans,
        };
        let fut = self.claimer.send(Submit(pass));
        let fut = fut.into_actor(self).map(move |result, act, ctx| {
            act.running = false;
            match answered(result) {
                Ok(batches) => {
                    let mut again = act.dirty;
                    for ((presence_id, limit), rows) in asked.into_iter().zip(batches) {
                        again |= rows.len() as i64 == limit;
                        act.push(ctx, presence_id, rows);
                    }
                    if again {
                        act.drain(ctx);
                    }
                }
                Err(e) => {
                    tracing::warn!(member = %act.member_id, error = %e, "claim failed; retrying");
                    ctx.run_later(RETRY_AFTER, |act, ctx| act.drain(ctx));
                }
            }
        });
        self.spawn_db(ctx, fut);
    }

    /// Writes claimed deliveries to their connection. Claims that never
    /// reach it (it left while the claim ran, or is being cut off) are
    /// given back without using up an attempt.
    fn push(&mut self, ctx: &mut Context<Self>, presence_id: PresenceId, rows: Vec<Claimed>) {
        if rows.is_empty() {
            return;
        }
        let metrics = self.shared.metrics.clone();
        Metrics::add(&metrics.deliveries_claimed, rows.len() as u64);
        let Some(conn) = self.conns.get_mut(&presence_id) else {
            let claims = rows.iter().map(|r| ClaimId(r.claim_id)).collect();
            self.give_back_unpushed(ctx, claims);
            return;
        };
        let ids: Vec<DeliveryId> = rows.iter().map(|r| r.id).collect();
        let claims: Vec<ClaimId> = rows.iter().map(|r| ClaimId(r.claim_id)).collect();
        let attempts: Vec<(i32, DateTime<Utc>)> =
            rows.iter().map(|r| (r.attempts, r.created_at)).collect();
        let frames = rows
            .into_iter()
            .map(|row| {
                conn.in_flight.insert(row.id, row.claim_expires_at);
                serde_json::to_string(&push_frame(row)).expect("push serializes")
            })
            .collect();
        if !conn.handle.offer(Outbound::Deliveries(frames), &metrics) {
            // The connection is being cut off: these never reach it.
            self.forget(&ids);
            self.give_back_unpushed(ctx, claims);
            return;
        }
        let now = Utc::now();
        for (attempt, created_at) in attempts {
            if attempt > 1 {
                Metrics::add(&metrics.deliveries_redelivered, 1);
            } else {
                metrics.observe_first_push((now - created_at).as_seconds_f64());
            }
        }
    }

    /// Gives back claims that were never written to a connection: their
    /// attempt is not counted (an attempt is a push the socket accepted).
    fn give_back_unpushed(&mut self, ctx: &mut Context<Self>, claims: Vec<ClaimId>) {
        let member = self.member_id;
        self.spawn_release(ctx, "unpushed claims", async move |conn| {
            queries::release_unpushed(conn, member, &claims).await
        });
    }

    /// Releases a closed connection's claims; then drains again, or stops
    /// if it was the member's last connection.
    fn release(&mut self, ctx: &mut Context<Self>, presence_id: PresenceId, leaving: Leaving) {
        if leaving == Leaving::Last {
            self.retiring = true;
        }
        let member = self.member_id;
        self.spawn_release(ctx, "a closed connection's claims", async move |conn| {
            queries::release_presence_claims(conn, member, presence_id).await
        });
    }

    /// Runs one release of claims, then drains again. A release that fails
    /// costs nothing but time: the leases expire instead.
    ///
    /// Spawned, not `ctx.wait`ed: a wait pauses this actor's other futures,
    /// and a claim or ack future paused while holding a pooled connection,
    /// with this one waiting for another, starves the whole pool until its
    /// timeout (every hello and send meanwhile refused `unavailable`).
    fn spawn_release<F>(&mut self, ctx: &mut Context<Self>, what: &'static str, release: F)
    where
        F: AsyncFnOnce(&mut crate::db::PgConn) -> diesel::QueryResult<usize> + 'static,
    {
        let pool = self.shared.pool.clone();
        let member = self.member_id;
        self.spawn_db(
            ctx,
            async move {
                let result = match pool.get().await {
                    Ok(mut conn) => release(&mut conn).await.map_err(QueryError::from),
                    Err(e) => Err(e.into()),
                };
                if let Err(e) = result {
                    tracing::warn!(%member, error = %e, "could not release {what}; their leases expire instead");
                }
            }
            .into_actor(self)
            .map(|_, act, ctx| act.drain(ctx)),
        );
    }

    /// One ack of `presence_id` was recorded (or failed): if it was the
    /// last in flight of a connection that has closed, release its claims.
    fn ack_done(&mut self, ctx: &mut Context<Self>, presence_id: PresenceId) {
        if let Some(n) = self.acks_in_flight.get_mut(&presence_id) {
            *n -= 1;
            if *n == 0 {
                self.acks_in_flight.remove(&presence_id);
                if let Some(leaving) = self.release_after_acks.remove(&presence_id) {
                    self.release(ctx, presence_id, leaving);
                }
            }
        }
    }

    /// Forgets delivery ids on whichever connection holds them.
    fn forget(&mut self, ids: &[DeliveryId]) {
        for c in self.conns.values_mut() {
            for id in ids {
                c.in_flight.remove(id);
            }
        }
    }
}

/// A batcher's answer, or why there is none.
fn answered<T>(result: Result<Result<T, BatchFailed>, MailboxError>) -> Result<T, BatchFailed> {
    result.unwrap_or(Err(BatchFailed::Stopped))
}

/// The push frame for one claimed delivery.
fn push_frame(row: Claimed) -> Push {
    Push {
        ty: "push",
        message_id: row.message_id.to_string(),
        mesh_id: row.mesh_id.to_string(),
        sender_pubkey: row
            .sender_session_pubkey
            .unwrap_or_else(|| row.sender_member_pubkey.clone()),
        sender_member_pubkey: Some(row.sender_member_pubkey),
        sender_member_id: Some(row.sender_member_id.to_string()),
        sender_name: Some(row.sender_name),
        priority: row.priority.to_string(),
        nonce: row.nonce,
        ciphertext: row.ciphertext,
        created_at: protocol::iso(row.created_at),
        target_spec: Some(row.target_spec),
        client_message_id: row.client_message_id,
        request_fingerprint: row.request_fingerprint,
        reply_to_id: row.reply_to_id,
        mentions: row.mentions,
        attempt: Some(row.attempts),
        subtype: None,
        event: None,
        event_data: None,
    }
}

impl Actor for Drain {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        self.shared.metrics.actor_started(ActorKind::Drain);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.shared.metrics.actor_stopped(ActorKind::Drain);
    }
}

/// A connection of this member passed its hello.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AddConn {
    pub presence_id: PresenceId,
    pub handle: ConnHandle,
    pub key: String,
    pub role: Role,
    pub has_session_pubkey: bool,
}

impl Handler<AddConn> for Drain {
    type Result = ();
    fn handle(&mut self, msg: AddConn, ctx: &mut Self::Context) {
        self.count();
        self.next_seq += 1;
        self.conns.insert(
            msg.presence_id,
            Conn {
                handle: msg.handle,
                key: msg.key,
                role: msg.role,
                has_session_pubkey: msg.has_session_pubkey,
                seq: self.next_seq,
                in_flight: HashMap::new(),
            },
        );
        self.drain(ctx);
    }
}

/// A connection of this member closed: its claims are released at once.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoveConn {
    pub presence_id: PresenceId,
    pub leaving: Leaving,
}

impl Handler<RemoveConn> for Drain {
    type Result = ();
    fn handle(&mut self, msg: RemoveConn, ctx: &mut Self::Context) {
        self.count();
        self.conns.remove(&msg.presence_id);
        if self.acks_in_flight.contains_key(&msg.presence_id) {
            self.retiring |= msg.leaving == Leaving::Last;
            self.release_after_acks.insert(msg.presence_id, msg.leaving);
        } else {
            self.release(ctx, msg.presence_id, msg.leaving);
        }
    }
}

/// Something may be claimable: run a pass.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Wake;

impl Handler<Wake> for Drain {
    type Result = ();
    fn handle(&mut self, _: Wake, ctx: &mut Self::Context) {
        self.count();
        self.drain(ctx);
    }
}

/// The sweeper cleared these deliveries' leases, each with when the
/// cleared lease ran out (`None`: dead-lettered).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reclaimed(pub Vec<(DeliveryId, Option<DateTime<Utc>>)>);

impl Handler<Reclaimed> for Drain {
    type Result = ();
    fn handle(&mut self, msg: Reclaimed, ctx: &mut Self::Context) {
        self.count();
        // A delivery claimed again since holds a newer lease: forgetting
        // it would free room it still takes (and let the connection hold
        // more than max_in_flight).
        for c in self.conns.values_mut() {
            for (id, until) in &msg.0 {
                if let Some(held) = c.in_flight.get(id) {
                    if until.is_none_or(|until| *held <= until) {
                        c.in_flight.remove(id);
                    }
                }
            }
        }
        self.drain(ctx);
    }
}

/// A `client_ack` from one of this member's connections.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Ack {
    pub presence_id: PresenceId,
    pub message: AckedMessage,
}

/// Which message a `client_ack` names.
#[derive(Debug, Clone)]
pub enum AckedMessage {
    /// By broker message id (wins when both are given).
    Broker(MessageId),
    /// By the sender's client message id (or a broker id as text).
    Client(String),
}

impl Handler<Ack> for Drain {
    type Result = ();
    fn handle(&mut self, msg: Ack, ctx: &mut Self::Context) {
        self.count();
        let Some(key) = self.conns.get(&msg.presence_id).map(|c| c.key.clone()) else {
            return;
        };
        if !self.admit(msg.presence_id) {
            return;
        }
        let presence_id = msg.presence_id;
        *self.acks_in_flight.entry(presence_id).or_default() += 1;
        let (broker_message_id, client_message_id) = match msg.message {
            AckedMessage::Broker(id) => (Some(id), None),
            AckedMessage::Client(id) => (None, Some(id)),
        };
        let spec = AckSpec {
            member_id: self.member_id,
            key,
            broker_message_id,
            client_message_id,
        };
        self.spawn_db(
            ctx,
            self.acker
                .send(Submit(spec))
            .into_actor(self)
            .map(move |result, act, ctx| {
                act.ack_done(ctx, presence_id);
                match answered(result) {
                    Ok(acked) if !acked.is_empty() => {
                        let metrics = &act.shared.metrics;
                        let now = Utc::now();
                        Metrics::add(&metrics.deliveries_acked, acked.len() as u64);
                        for a in &acked {
                            metrics.observe_delivery((now - a.created_at).as_seconds_f64());
                        }
                        let ids: Vec<DeliveryId> = acked.iter().map(|a| a.id).collect();
                        act.forget(&ids);
                        act.drain(ctx);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "ack not recorded; the delivery will be pushed again"),
                }
            }),
        );
    }
}

/// `nack` (give back, after `delay`) or `in_progress` (extend the lease).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Settle {
    pub presence_id: PresenceId,
    pub message_id: MessageId,
    pub how: Settlement,
}

/// What a `nack` or `in_progress` asks of a pushed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Give it back, eligible again after this delay.
    Nack(Duration),
    /// Extend its lease by another lease.
    InProgress,
}

impl Handler<Settle> for Drain {
    type Result = ();
    fn handle(&mut self, msg: Settle, ctx: &mut Self::Context) {
        self.count();
        let shared = self.shared.clone();
        let lease = shared.config().delivery.lease.get();
        let presence_id = msg.presence_id;
        if !self.conns.contains_key(&presence_id) || !self.admit(presence_id) {
            return;
        }
        *self.settles_in_flight.entry(presence_id).or_default() += 1;
        self.spawn_db(
            ctx,
            async move {
                let mut conn = shared.pool.get().await?;
                let (presence, message) = (msg.presence_id, msg.message_id);
                match msg.how {
                    Settlement::Nack(delay) => {
                        queries::nack(&mut conn, presence, message, delay).await
                    }
                    Settlement::InProgress => {
                        queries::extend_lease(&mut conn, presence, message, lease).await
                    }
                }
                .map_err(QueryError::from)
            }
            .into_actor(self)
            .map(move |result, act, ctx| {
                if let Some(n) = act.settles_in_flight.get_mut(&presence_id) {
                    *n -= 1;
                    if *n == 0 {
                        act.settles_in_flight.remove(&presence_id);
                    }
                }
                match result {
                    Ok(rows) if !rows.is_empty() => {
                        let ids: Vec<DeliveryId> = rows.iter().map(|r| r.id).collect();
                        act.settled(ctx, presence_id, msg.how, &ids, lease)
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "nack/in_progress not recorded"),
                }
            }),
        );
    }
}

impl Drain {
    /// A nack or in_progress was recorded for these deliveries: forget
    /// them (and drain again, now and after the delay), or extend their
    /// slots' leases.
    fn settled(
        &mut self,
        ctx: &mut Context<Self>,
        presence_id: PresenceId,
        how: Settlement,
        ids: &[DeliveryId],
        lease: Duration,
    ) {
        match how {
            Settlement::Nack(delay) => {
                self.forget(ids);
                self.drain(ctx);
                if !delay.is_zero() {
                    ctx.run_later(delay, |act, ctx| act.drain(ctx));
                }
            }
            Settlement::InProgress => {
                let Some(c) = self.conns.get_mut(&presence_id) else {
                    return;
                };
                let until = Utc::now() + chrono::Duration::from_std(lease).unwrap_or_default();
                for id in ids {
                    if let Some(e) = c.in_flight.get_mut(id) {
                        *e = until;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::actors::backlog::Backlog;
    use crate::actors::conn::CloseConn;

    /// Stands in for a session: counts the pushes it is handed.
    struct Probe(Arc<Mutex<usize>>);

    impl Actor for Probe {
        type Context = Context<Self>;
    }

    impl Handler<Outbound> for Probe {
        type Result = ();
        fn handle(&mut self, _: Outbound, _: &mut Self::Context) {
            *self.0.lock().unwrap() += 1;
        }
    }

    impl Handler<CloseConn> for Probe {
        type Result = ();
        fn handle(&mut self, _: CloseConn, _: &mut Self::Context) {}
    }

    /// With the database away, a drain claims nothing and pushes nothing;
    /// after its member's last connection leaves it stops, but only once
    /// its database work (the failed claim, the release) has finished.
    #[actix_web::test]
    async fn without_a_database_nothing_is_pushed_and_the_last_leave_stops_the_drain() {
        let pushed = Arc::new(Mutex::new(0));
        let probe = Probe(pushed.clone()).start();
        let shared = Arc::new(crate::actors::test_shared());
        let drain = DrainHome::here(&shared).start(shared, MemberId(uuid::Uuid::from_u128(1)));
        let presence_id = PresenceId::new();
        drain.do_send(AddConn {
            presence_id,
            handle: ConnHandle::new(&probe, Arc::new(Backlog::new(1 << 20, None))),
            key: "sid:s".into(),
            role: Role::ControlPlane,
            has_session_pubkey: false,
        });
        drain.do_send(Wake);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(drain.connected(), "a drain with a connection keeps running");
        drain.do_send(RemoveConn {
            presence_id,
            leaving: Leaving::Last,
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while drain.connected() {
            assert!(
                std::time::Instant::now() < deadline,
                "the drain never stopped"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(*pushed.lock().unwrap(), 0);
    }
}
