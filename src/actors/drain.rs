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
use uuid::Uuid;

use super::backlog::Backlog;
use super::session::{Outbound, WsSession};
use super::Shared;
use crate::db::queries::{self, ClaimSpec, Claimed};
use crate::ids::Role;
use crate::metrics::{ActorKind, Metrics};
use crate::protocol::{self, Push};

/// Pause before retrying a pass that failed on the database.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// One of the member's live connections.
struct Conn {
    addr: Addr<WsSession>,
    key: String,
    role: Role,
    has_session_pubkey: bool,
    /// Pushes go through it: it cuts off a client that stopped reading.
    backlog: Arc<Backlog>,
    /// Order of arrival, to prefer the oldest among equals.
    seq: u64,
    /// Unacked pushes on this connection: delivery id → lease expiry.
    in_flight: HashMap<i64, DateTime<Utc>>,
}

impl Conn {
    /// Lower is preferred for deliveries any connection could take: the
    /// host daemon (control-plane without a session key) first, the
    /// CLI's short command connections last.
    fn rank(&self) -> (u8, u64) {
        let class = match (self.role, self.has_session_pubkey) {
            (Role::ControlPlane, false) => 0,
            (Role::Service, _) => 1,
            (Role::Session, _) => 2,
            (Role::ControlPlane, true) => 3,
        };
        (class, self.seq)
    }

    /// Lower is preferred for deliveries keyed to this connection's key
    /// (a session and a CLI connection may share a session pubkey). Among
    /// equals the newest wins: an older session with the same key is one
    /// its new hello is replacing, and what it is pushed now is only
    /// released again when it closes (one attempt spent for nothing).
    fn key_rank(&self) -> (u8, std::cmp::Reverse<u64>) {
        let class = match self.role {
            Role::Session => 0,
            Role::Service => 1,
            Role::ControlPlane => 2,
        };
        (class, std::cmp::Reverse(self.seq))
    }

    fn room(&mut self, max_in_flight: u32) -> i64 {
        // Entries whose lease ran out no longer hold room, even if the
        // sweeper's notice was lost.
        let now = Utc::now();
        self.in_flight.retain(|_, expires| *expires > now);
        i64::from(max_in_flight) - self.in_flight.len() as i64
    }
}

pub struct Drain {
    shared: Arc<Shared>,
    member_id: Uuid,
    conns: HashMap<Uuid, Conn>,
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
    acks_in_flight: HashMap<Uuid, usize>,
    /// Connections that closed while their acks were in flight → `last`.
    release_after_acks: HashMap<Uuid, bool>,
    /// nack / in_progress queries in flight, per connection.
    settles_in_flight: HashMap<Uuid, usize>,
}

impl Drain {
    pub fn new(shared: Arc<Shared>, member_id: Uuid) -> Self {
        Drain {
            shared,
            member_id,
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
    fn admit(&self, presence_id: Uuid) -> bool {
        let n = |m: &HashMap<Uuid, usize>| m.get(&presence_id).copied().unwrap_or(0);
        let busy = n(&self.acks_in_flight) + n(&self.settles_in_flight);
        if busy < self.shared.config.delivery.max_in_flight as usize {
            return true;
        }
        self.shared.metrics.frame_rejected("settle_overflow");
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

    /// What each connection may claim now.
    fn plan(&mut self) -> Vec<(Uuid, String, bool, i64)> {
        let cfg = &self.shared.config.delivery;
        // A connection cut off as a slow consumer takes nothing more, even
        // while its session has not stopped yet.
        let member_wide = self
            .conns
            .iter()
            .filter(|(_, c)| !c.backlog.is_cut())
            .min_by_key(|(_, c)| c.rank())
            .map(|(id, _)| *id);
        let mut best_for_key: HashMap<&str, (Uuid, (u8, std::cmp::Reverse<u64>))> = HashMap::new();
        for (id, c) in self.conns.iter().filter(|(_, c)| !c.backlog.is_cut()) {
            let rank = c.key_rank();
            let e = best_for_key.entry(c.key.as_str()).or_insert((*id, rank));
            if rank < e.1 {
                *e = (*id, rank);
            }
        }
        let keyed: std::collections::HashSet<Uuid> =
            best_for_key.values().map(|(id, _)| *id).collect();
        let mut plans = Vec::new();
        for (id, c) in self.conns.iter_mut() {
            let wide = Some(*id) == member_wide;
            if !wide && !keyed.contains(id) {
                continue;
            }
            let limit = c.room(cfg.max_in_flight).min(i64::from(cfg.claim_batch));
            if limit > 0 {
                let key = if keyed.contains(id) {
                    c.key.clone()
                } else {
                    String::new()
                };
                plans.push((*id, key, wide, limit));
            }
        }
        plans
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
        let shared = self.shared.clone();
        let member_id = self.member_id;
        let fut = async move {
            let cfg = &shared.config.delivery;
            let mut conn = shared.pool.get().await.map_err(|e| e.to_string())?;
            let mut batches = Vec::with_capacity(plans.len());
            for (presence_id, key, member_wide, limit) in plans {
                let spec = ClaimSpec {
                    member_id,
                    presence_id,
                    key: &key,
                    member_wide,
                    limit,
                    lease: cfg.lease.get(),
                    node_id: shared.node_id.0,
                    max_attempts: cfg.max_attempts as i32,
                };
                let rows = queries::claim(&mut conn, &spec)
                    .await
                    .map_err(|e| e.to_string())?;
                batches.push((presence_id, limit, rows));
            }
            Ok::<_, String>(batches)
        };
        let fut = fut.into_actor(self).map(|result, act, ctx| {
            act.running = false;
            match result {
                Ok(batches) => {
                    let mut again = act.dirty;
                    for (presence_id, limit, rows) in batches {
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

    /// Writes claimed deliveries to their connection.
    fn push(&mut self, ctx: &mut Context<Self>, presence_id: Uuid, rows: Vec<Claimed>) {
        if rows.is_empty() {
            return;
        }
        let metrics = &self.shared.metrics;
        Metrics::add(&metrics.deliveries_claimed, rows.len() as u64);
        let Some(conn) = self.conns.get_mut(&presence_id) else {
            // The connection left while the claim ran: give the rows back.
            self.release(ctx, presence_id, false);
            return;
        };
        let now = Utc::now();
        let mut frames = Vec::with_capacity(rows.len());
        for row in rows {
            if row.attempts > 1 {
                Metrics::add(&metrics.deliveries_redelivered, 1);
            } else {
                metrics.observe_first_push((now - row.created_at).as_seconds_f64());
            }
            conn.in_flight.insert(row.id, row.claim_expires_at);
            frames.push(serde_json::to_string(&push_frame(row)).expect("push serializes"));
        }
        // Dropped frames are not lost: the connection is being cut off,
        // and its stop releases these claims.
        conn.backlog
            .offer(&conn.addr, Outbound::deliveries(frames), metrics);
    }

    /// Releases a closed connection's claims; then drains again, or stops
    /// if it was the member's last connection.
    ///
    /// Spawned, not `ctx.wait`ed: a wait pauses this actor's other futures,
    /// and a claim or ack future paused while holding a pooled connection,
    /// with this one waiting for another, starves the whole pool until its
    /// timeout (every hello and send meanwhile refused `unavailable`).
    fn release(&mut self, ctx: &mut Context<Self>, presence_id: Uuid, last: bool) {
        if last {
            self.retiring = true;
        }
        let pool = self.shared.pool.clone();
        self.spawn_db(
            ctx,
            async move {
                match pool.get().await {
                    Ok(mut conn) => {
                        if let Err(e) = queries::release_presence_claims(&mut conn, presence_id).await {
                            tracing::warn!(presence = %presence_id, error = %e, "could not release claims; they expire instead");
                        }
                    }
                    Err(e) => tracing::warn!(presence = %presence_id, error = %e, "database unavailable; claims expire instead"),
                }
            }
            .into_actor(self)
            .map(|_, act, ctx| act.drain(ctx)),
        );
    }

    /// One ack of `presence_id` was recorded (or failed): if it was the
    /// last in flight of a connection that has closed, release its claims.
    fn ack_done(&mut self, ctx: &mut Context<Self>, presence_id: Uuid) {
        if let Some(n) = self.acks_in_flight.get_mut(&presence_id) {
            *n -= 1;
            if *n == 0 {
                self.acks_in_flight.remove(&presence_id);
                if let Some(last) = self.release_after_acks.remove(&presence_id) {
                    self.release(ctx, presence_id, last);
                }
            }
        }
    }

    /// Forgets delivery ids on whichever connection holds them.
    fn forget(&mut self, ids: &[i64]) {
        for c in self.conns.values_mut() {
            for id in ids {
                c.in_flight.remove(id);
            }
        }
    }
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
    pub presence_id: Uuid,
    pub addr: Addr<WsSession>,
    pub key: String,
    pub role: Role,
    pub has_session_pubkey: bool,
    pub backlog: Arc<Backlog>,
}

impl Handler<AddConn> for Drain {
    type Result = ();
    fn handle(&mut self, msg: AddConn, ctx: &mut Self::Context) {
        self.count();
        self.next_seq += 1;
        self.conns.insert(
            msg.presence_id,
            Conn {
                addr: msg.addr,
                key: msg.key,
                role: msg.role,
                has_session_pubkey: msg.has_session_pubkey,
                backlog: msg.backlog,
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
    pub presence_id: Uuid,
    /// It was the member's last connection on this broker.
    pub last: bool,
}

impl Handler<RemoveConn> for Drain {
    type Result = ();
    fn handle(&mut self, msg: RemoveConn, ctx: &mut Self::Context) {
        self.count();
        self.conns.remove(&msg.presence_id);
        if self.acks_in_flight.contains_key(&msg.presence_id) {
            self.retiring |= msg.last;
            self.release_after_acks.insert(msg.presence_id, msg.last);
        } else {
            self.release(ctx, msg.presence_id, msg.last);
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

/// The sweeper cleared these deliveries' leases (or dead-lettered them).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reclaimed(pub Vec<i64>);

impl Handler<Reclaimed> for Drain {
    type Result = ();
    fn handle(&mut self, msg: Reclaimed, ctx: &mut Self::Context) {
        self.count();
        self.forget(&msg.0);
        self.drain(ctx);
    }
}

/// A `client_ack` from one of this member's connections.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Ack {
    pub presence_id: Uuid,
    pub broker_message_id: Option<Uuid>,
    pub client_message_id: Option<String>,
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
        let shared = self.shared.clone();
        let member_id = self.member_id;
        let presence_id = msg.presence_id;
        *self.acks_in_flight.entry(presence_id).or_default() += 1;
        self.spawn_db(
            ctx,
            async move {
                let mut conn = shared.pool.get().await.map_err(|e| e.to_string())?;
                queries::ack(&mut conn, member_id, &key, msg.broker_message_id, msg.client_message_id.as_deref())
                    .await
                    .map_err(|e| e.to_string())
            }
            .into_actor(self)
            .map(move |result, act, ctx| {
                act.ack_done(ctx, presence_id);
                match result {
                    Ok(acked) if !acked.is_empty() => {
                        let metrics = &act.shared.metrics;
                        let now = Utc::now();
                        Metrics::add(&metrics.deliveries_acked, acked.len() as u64);
                        for a in &acked {
                            metrics.observe_delivery((now - a.created_at).as_seconds_f64());
                        }
                        let ids: Vec<i64> = acked.iter().map(|a| a.id).collect();
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
pub enum Settle {
    Nack {
        presence_id: Uuid,
        message_id: Uuid,
        delay: Duration,
    },
    InProgress {
        presence_id: Uuid,
        message_id: Uuid,
    },
}

impl Handler<Settle> for Drain {
    type Result = ();
    fn handle(&mut self, msg: Settle, ctx: &mut Self::Context) {
        self.count();
        let shared = self.shared.clone();
        let lease = shared.config.delivery.lease.get();
        let (presence_id, is_nack, delay) = match &msg {
            Settle::Nack {
                presence_id, delay, ..
            } => (*presence_id, true, *delay),
            Settle::InProgress { presence_id, .. } => (*presence_id, false, Duration::ZERO),
        };
        if !self.conns.contains_key(&presence_id) || !self.admit(presence_id) {
            return;
        }
        *self.settles_in_flight.entry(presence_id).or_default() += 1;
        self.spawn_db(
            ctx,
            async move {
                let mut conn = shared.pool.get().await.map_err(|e| e.to_string())?;
                match msg {
                    Settle::Nack {
                        presence_id,
                        message_id,
                        delay,
                    } => queries::nack(&mut conn, presence_id, message_id, delay).await,
                    Settle::InProgress {
                        presence_id,
                        message_id,
                    } => queries::extend_lease(&mut conn, presence_id, message_id, lease).await,
                }
                .map_err(|e| e.to_string())
            }
            .into_actor(self)
            .map(move |result, act, ctx| {
                if let Some(n) = act.settles_in_flight.get_mut(&presence_id) {
                    *n -= 1;
                    if *n == 0 {
                        act.settles_in_flight.remove(&presence_id);
                    }
                }
                act.settled(ctx, result, presence_id, is_nack, delay, lease)
            }),
        );
    }
}

impl Drain {
    /// A nack or in_progress was recorded: forget or extend the slots.
    fn settled(
        &mut self,
        ctx: &mut Context<Self>,
        result: Result<Vec<queries::Touched>, String>,
        presence_id: Uuid,
        is_nack: bool,
        delay: Duration,
        lease: Duration,
    ) {
        match result {
            Ok(rows) if !rows.is_empty() => {
                let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
                if is_nack {
                    self.forget(&ids);
                    self.drain(ctx);
                    if !delay.is_zero() {
                        ctx.run_later(delay, |act, ctx| act.drain(ctx));
                    }
                } else if let Some(c) = self.conns.get_mut(&presence_id) {
                    let until = Utc::now() + chrono::Duration::from_std(lease).unwrap_or_default();
                    for id in ids {
                        if let Some(e) = c.in_flight.get_mut(&id) {
                            *e = until;
                        }
                    }
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "nack/in_progress not recorded"),
        }
    }
}
