//! This node in the cluster: every broker on one database is a node, and
//! the bus is how it meets the others (docs/cluster.md).
//!
//! It runs on two database connections of its own, never pooled ones
//! (LISTEN belongs to a session, and a pool exhausted by traffic must not
//! starve the heartbeat):
//! - the heartbeat (`cluster.heartbeat_interval`): refreshes this node's
//!   row in `mesh.node`, learns how many nodes live and which leads (the
//!   oldest: it runs the cluster-wide housekeeping), and declares dead any
//!   node silent for `cluster.dead_after` — releasing its leases, closing
//!   its connections with the takeover grace window, waking the members
//!   whose leases came free. A node that finds itself declared dead (a
//!   long pause, a partition) closes every socket before it serves on.
//! - notices out, on a second connection of its own: what the registry
//!   publishes (wake-ups after a commit, system events, closes) is queued
//!   while a flush runs and sent in the next one, one NOTIFY per node that
//!   has a recipient connected, ids only ([`crate::actors::wake::Notice`]).
//! - notices in: LISTEN on this node's channel; events are resolved to
//!   their connections with one read, then handed to the registry.
//!
//! When the connection fails the bus reconnects with backoff (polling at
//! each attempt), and after every (re)connect wakes every local drain:
//! whatever was sent while it was away is claimed then. Behind it, every `cluster.poll_interval`, a
//! poll (on the pool) wakes the local members that have claimable
//! deliveries, so a lost notice costs at most one poll interval.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::registry::{self, FromPeers, Registry};
use super::wake::{decode_payload, Notice, Publish, WakeMembers};
use super::Shared;
use crate::db::{self, lifecycle, queries};
use crate::ids::{MemberId, NodeId, PresenceId};
use crate::metrics::{ActorKind, Metrics};

/// First pause after the bus's connection failed; doubled up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A statement of the bus that takes longer than this counts as a lost
/// connection (the heartbeat must not hang behind it).
const OP_TIMEOUT: Duration = Duration::from_secs(5);

type Items = Vec<(queries::Route, Notice)>;
/// Notices queued for the sender, with when they were published (unix µs).
type Queued = (i64, Items);

/// Why the bus dropped its connection.
#[derive(Debug, thiserror::Error)]
enum BusError {
    #[error("cannot connect: {0}")]
    Connect(#[from] diesel::ConnectionError),
    #[error(transparent)]
    Query(#[from] diesel::result::Error),
    #[error("no answer within {OP_TIMEOUT:?}")]
    Timeout,
    #[error("the connection ended")]
    Lost,
}

/// Runs `fut` (one statement or a few) within [`OP_TIMEOUT`].
async fn timed<T, E: Into<BusError>>(
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, BusError> {
    match tokio::time::timeout(OP_TIMEOUT, fut).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(BusError::Timeout),
    }
}

pub struct Bus {
    shared: Arc<Shared>,
    registry: Addr<Registry>,
    node: queries::NodeInfo,
    out: mpsc::UnboundedSender<Queued>,
    rx: Option<mpsc::UnboundedReceiver<Queued>>,
}

impl Bus {
    pub fn new(shared: Arc<Shared>, registry: Addr<Registry>, node: queries::NodeInfo) -> Self {
        let (out, rx) = mpsc::unbounded_channel();
        Bus {
            shared,
            registry,
            node,
            out,
            rx: Some(rx),
        }
    }
}

impl Actor for Bus {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.shared.metrics.actor_started(ActorKind::Bus);
        let Some(rx) = self.rx.take() else { return };
        let link = Link {
            shared: self.shared.clone(),
            registry: self.registry.clone(),
            node: self.node.clone(),
            polling: Arc::new(AtomicBool::new(false)),
        };
        ctx.spawn(link.clone().send_loop(rx).into_actor(self));
        ctx.spawn(link.run().into_actor(self));
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.shared.metrics.actor_stopped(ActorKind::Bus);
    }
}

impl Handler<Publish> for Bus {
    type Result = ();

    fn handle(&mut self, msg: Publish, _: &mut Self::Context) {
        self.shared.metrics.actor_message(ActorKind::Bus);
        Metrics::add(&self.shared.metrics.cluster.notices, msg.0.len() as u64);
        let _ = self
            .out
            .send((chrono::Utc::now().timestamp_micros(), msg.0));
    }
}

/// What the bus's loops work with.
#[derive(Clone)]
struct Link {
    shared: Arc<Shared>,
    registry: Addr<Registry>,
    node: queries::NodeInfo,
    /// A poll is running (they do not overlap).
    polling: Arc<AtomicBool>,
}

/// What woke the loop.
enum Woke {
    Notification(Option<diesel::QueryResult<diesel::pg::PgNotification>>),
    Beat,
    Poll,
}

impl Link {
    fn me(&self) -> uuid::Uuid {
        self.shared.node_id.0
    }

    /// The listening loop: heartbeat, notices in, the poll.
    async fn run(self) {
        let cluster = &self.shared.config().cluster;
        let mut backoff = MIN_BACKOFF;
        let mut registered = false;
        let mut first = true;
        let mut poll = tokio::time::interval(cluster.poll_interval.get());
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let mut conn = match self.connect(&mut registered).await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cluster bus: no connection");
                    // What was notified meanwhile is found by the poll, and
                    // by the wake after the reconnect.
                    self.poll();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            backoff = MIN_BACKOFF;
            if !first {
                Metrics::add(&self.shared.metrics.cluster.reconnects, 1);
                tracing::info!("cluster bus: reconnected; waking every local drain");
            }
            first = false;
            self.registry.do_send(FromPeers::wake_all());
            let mut beat = tokio::time::interval(cluster.heartbeat_interval.get());
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut healthy_since: Option<Instant> = None;
            let error = loop {
                let woke = {
                    let mut stream = std::pin::pin!(conn.notifications_stream());
                    tokio::select! {
                        n = stream.next() => Woke::Notification(n),
                        _ = beat.tick() => Woke::Beat,
                        _ = poll.tick() => Woke::Poll,
                    }
                };
                let step = match woke {
                    Woke::Notification(Some(Ok(n))) => self.receive(&mut conn, &n.payload).await,
                    Woke::Notification(Some(Err(e))) => Err(BusError::Query(e)),
                    Woke::Notification(None) => Err(BusError::Lost),
                    Woke::Beat => self.heartbeat(&mut conn, &mut healthy_since).await,
                    Woke::Poll => {
                        self.poll();
                        Ok(())
                    }
                };
                if let Err(e) = step {
                    break e;
                }
            };
            // Leadership stays as last seen: a node alone whose bus cannot
            // connect must go on expiring leases, and two leaders for a
            // while are safe (see the sweeper).
            tracing::warn!(error = %error, "cluster bus: connection lost; reconnecting");
        }
    }

    /// The sending loop, on a connection of its own so that notices out
    /// never wait behind a heartbeat or a notice being read: takes every
    /// queued notice at once (they coalesce while a flush runs) and sends
    /// them. A flush that fails is tried once more on a new connection;
    /// then its notices are dropped (counted), for the poll to cover.
    async fn send_loop(self, mut rx: mpsc::UnboundedReceiver<Queued>) {
        let mut conn: Option<AsyncPgConnection> = None;
        let mut backoff = MIN_BACKOFF;
        // Ends when the actor is gone: the broker stopped.
        while let Some((mut since, mut items)) = rx.recv().await {
            while let Ok((at, more)) = rx.try_recv() {
                since = since.min(at);
                items.extend(more);
            }
            if self.shared.cluster.live_nodes() <= 1 {
                // Alone: nobody to tell.
                continue;
            }
            let mut sent = false;
            for _attempt in 0..2 {
                if conn.is_none() {
                    match self.connect_sender().await {
                        Ok(c) => conn = Some(c),
                        Err(e) => {
                            tracing::warn!(error = %e, retry_in = ?backoff, "cluster bus: cannot connect to send notices");
                            break;
                        }
                    }
                }
                let Some(c) = conn.as_mut() else { break };
                match self.flush(c, since, &items).await {
                    Ok(()) => {
                        sent = true;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster bus: sending notices failed; reconnecting");
                        conn = None;
                    }
                }
            }
            if sent {
                backoff = MIN_BACKOFF;
            } else {
                Metrics::add(&self.shared.metrics.cluster.dropped, items.len() as u64);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    async fn connect_sender(&self) -> Result<AsyncPgConnection, BusError> {
        let mut conn = timed(db::establish(self.shared.pool.url())).await?;
        timed(conn.batch_execute("SET application_name = 'meshbroker bus send'")).await?;
        Ok(conn)
    }

    /// Opens the bus's listening connection, listens on this node's
    /// channel, and (the first time) adds this node to `mesh.node`.
    async fn connect(&self, registered: &mut bool) -> Result<AsyncPgConnection, BusError> {
        let mut conn = timed(db::establish(self.shared.pool.url())).await?;
        let channel = format!("mb_{}", self.me().simple());
        // Named, so an operator (and a test) can tell it in pg_stat_activity.
        timed(conn.batch_execute(&format!(
            "SET application_name = 'meshbroker bus'; LISTEN {channel}"
        )))
        .await?;
        if !*registered {
            timed(queries::register_node(&mut conn, &self.node)).await?;
            *registered = true;
            tracing::info!(node = %self.shared.node_id, "joined the cluster");
        }
        Ok(conn)
    }

    /// One heartbeat: see the module documentation.
    async fn heartbeat(
        &self,
        conn: &mut AsyncPgConnection,
        healthy_since: &mut Option<Instant>,
    ) -> Result<(), BusError> {
        let me = self.me();
        if self.shared.cluster.is_leaving() {
            // Shutdown marked this node gone; it only winds down now.
            return Ok(());
        }
        let beat = timed(queries::heartbeat(conn, me)).await?;
        if !beat.alive && self.shared.cluster.is_leaving() {
            // The shutdown's own mark, seen by a heartbeat already on its way.
            return Ok(());
        }
        if !beat.alive {
            Metrics::add(&self.shared.metrics.cluster.fenced, 1);
            tracing::error!(
                node = %self.shared.node_id,
                "this node was declared dead by another (a pause or a partition longer than \
                 cluster.dead_after): its leases and connections were taken over; closing its \
                 sockets and joining again"
            );
            self.shared.cluster.set(false, beat.live_nodes);
            let _ = self.registry.send(registry::Fence).await;
            timed(queries::register_node(conn, &self.node)).await?;
            // Judge no one before this node's own heartbeats are steady.
            *healthy_since = None;
            return Ok(());
        }
        self.shared
            .cluster
            .set(beat.leader == Some(me), beat.live_nodes);
        // After an outage every node's heartbeat is old: a node judges
        // others only once its own have run for `dead_after`, by when
        // every live node has had the time to beat again.
        let dead_after = self.shared.config().cluster.dead_after.get();
        if healthy_since.get_or_insert_with(Instant::now).elapsed() < dead_after {
            return Ok(());
        }
        for dead in timed(queries::declare_dead(conn, me, dead_after)).await? {
            self.take_over(conn, NodeId(dead)).await?;
        }
        Ok(())
    }

    /// Takes over what dead node `dead` held: its leases are released at
    /// once (their members are woken wherever they are connected) and its
    /// connections closed with the takeover grace window, whose end the
    /// leader announces as `peer_left` to every node.
    async fn take_over(&self, conn: &mut AsyncPgConnection, dead: NodeId) -> Result<(), BusError> {
        let members = timed(queries::release_node_claims(conn, dead)).await?;
        let grace = self.shared.config().presence.grace.get();
        let closed = timed(queries::close_node_presence(conn, dead, grace)).await?;
        Metrics::add(&self.shared.metrics.cluster.nodes_declared_dead, 1);
        tracing::warn!(
            node = %dead,
            members = members.len(),
            connections = closed,
            "declared a silent node dead: released its leases, closed its connections with the grace window"
        );
        if !members.is_empty() {
            self.registry
                .do_send(WakeMembers(members.into_iter().map(MemberId).collect()));
        }
        Ok(())
    }

    /// Sends queued notices: one NOTIFY per node, only to nodes with a
    /// recipient connected. The header is when the oldest was published,
    /// so the receiver's latency counts the wait here too.
    async fn flush(
        &self,
        conn: &mut AsyncPgConnection,
        since: i64,
        items: &Items,
    ) -> Result<(), BusError> {
        let cluster = &self.shared.metrics.cluster;
        let asked = items.len();
        let mut seen = HashSet::with_capacity(asked);
        let items: Vec<(queries::Route, String)> = items
            .iter()
            .filter(|i| seen.insert(**i))
            .map(|(route, notice)| (*route, notice.encode()))
            .collect();
        let header = format!("t{since}");
        let sent = timed(queries::notify_nodes(
            conn,
            Some(self.me()),
            &header,
            &items,
        ))
        .await?;
        Metrics::add(&cluster.notifications_sent, sent);
        Metrics::add(&cluster.coalesced, (asked as u64).saturating_sub(sent));
        Ok(())
    }

    /// One notification from another node: events are resolved to their
    /// connections (one read), then all of it goes to the registry.
    async fn receive(&self, conn: &mut AsyncPgConnection, payload: &str) -> Result<(), BusError> {
        let cluster = &self.shared.metrics.cluster;
        Metrics::add(&cluster.notifications_received, 1);
        let (sent, notices) = decode_payload(payload);
        if let Some(sent) = sent {
            let micros = chrono::Utc::now().timestamp_micros() - sent;
            cluster.notice_latency(micros as f64 / 1e6);
        }
        let mut peers = FromPeers::default();
        let mut events: Vec<(super::wake::Event, PresenceId)> = Vec::new();
        for notice in notices {
            match notice {
                Notice::Wake(m) => peers.wakes.push(m),
                Notice::Status(p) => peers.statuses.push(p),
                Notice::Reclaimed(m, d, until) => peers.reclaimed.push((m, d, until)),
                Notice::Event(e, p) => events.push((e, p)),
                Notice::Close(why, p) => peers.closes.push((why, p)),
                Notice::NodeJoined => {
                    let view = &self.shared.cluster;
                    view.set(view.is_leader(), view.live_nodes().max(2));
                }
            }
        }
        if !events.is_empty() {
            let ids: Vec<uuid::Uuid> = events.iter().map(|(_, p)| p.0).collect();
            let subjects = timed(queries::subjects(conn, &ids)).await?;
            for (event, presence) in events {
                if let Some(s) = subjects.iter().find(|s| s.id == presence.0) {
                    peers.events.push((event, s.clone()));
                }
            }
        }
        self.registry.do_send(peers);
        Ok(())
    }

    /// The safety net: wakes the local members with claimable deliveries
    /// (on the pool, so the bus goes on meanwhile; one poll at a time).
    fn poll(&self) {
        if self.polling.swap(true, Ordering::SeqCst) {
            return;
        }
        let shared = self.shared.clone();
        let registry = self.registry.clone();
        let polling = self.polling.clone();
        actix::spawn(async move {
            let every = shared.config().cluster.poll_interval.get();
            let max_attempts = shared.config().delivery.max_attempts as i32;
            if let Ok(mut conn) = shared.pool.get().await {
                if let Ok(rows) =
                    lifecycle::members_to_wake(&mut conn, shared.node_id.0, max_attempts, every)
                        .await
                {
                    let late = rows.iter().filter(|(_, late)| *late).count();
                    Metrics::add(&shared.metrics.cluster.polled, late as u64);
                    if !rows.is_empty() {
                        registry.do_send(FromPeers {
                            wakes: rows.into_iter().map(|(m, _)| MemberId(m)).collect(),
                            ..FromPeers::default()
                        });
                    }
                }
            }
            polling.store(false, Ordering::SeqCst);
        });
    }
}
