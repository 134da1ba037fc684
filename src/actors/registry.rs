//! The presence registry: every live connection on this broker, and the
//! drain of every member that has one.
//!
//! Sessions register here after their hello and deregister when they stop;
//! the registry starts a member's drain with its first connection and stops
//! it after its last, routes wake-ups (a message accepted, a status change,
//! a lease reclaimed) to drains, and sends the system pushes
//! (`peer_joined`, `peer_left`, `peer_visible`, `peer_hidden`).
//!
//! In a cluster it publishes what other nodes must hear (wake-ups, events,
//! closes) to the bus, and acts on what the bus brings from them
//! ([`FromPeers`]) for its own connections only.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::Arc;

use actix::prelude::*;
use serde_json::json;
use uuid::Uuid;

use super::conn::{CloseReason, ConnHandle, Outbound};
use super::drain::{self, Drain, DrainHome, Leaving};
use super::wake::{CloseFor, Event, Notice, Publish};
use super::Shared;
use crate::db::queries::{self, Route};
use crate::ids::{DeliveryId, MemberId, MeshId, PresenceId, Role};
use crate::metrics::ActorKind;
use crate::protocol::{self, Push};
use crate::routing::{self, Identity, KickSelector, Kickable};

/// One live connection, as the registry knows it.
#[derive(Clone)]
pub struct ConnEntry {
    pub presence_id: PresenceId,
    pub mesh_id: MeshId,
    pub member_id: MemberId,
    pub member_pubkey: String,
    pub role: Role,
    pub session_id: String,
    pub session_pubkey: Option<String>,
    /// Deliveries keyed to this connection carry this key.
    pub key: String,
    pub display_name: String,
    /// Listed to peers: system events about it are sent only while true.
    pub visible: bool,
    /// What the registry and the drain may send it.
    pub handle: ConnHandle,
    /// Unix millis of the last frame or pong, written by the session.
    pub last_seen: Arc<AtomicI64>,
}

impl ConnEntry {
    /// The pubkey peers know this connection by.
    fn pubkey(&self) -> &str {
        self.session_pubkey
            .as_deref()
            .unwrap_or(&self.member_pubkey)
    }

    fn identity(&self) -> Identity<'_> {
        Identity {
            mesh_id: self.mesh_id,
            member_id: self.member_id,
            role: self.role,
            session_id: &self.session_id,
            session_pubkey: self.session_pubkey.as_deref(),
        }
    }
}

/// A system push (`peer_joined`, `peer_left`, …) about one connection.
fn system_event(
    mesh_id: MeshId,
    event: &'static str,
    display_name: &str,
    pubkey: &str,
    role: Role,
) -> String {
    let push = Push {
        ty: "push",
        message_id: Uuid::new_v4().to_string(),
        mesh_id: mesh_id.to_string(),
        sender_pubkey: "system".into(),
        sender_member_pubkey: None,
        sender_member_id: None,
        sender_name: None,
        priority: "low".into(),
        nonce: String::new(),
        ciphertext: String::new(),
        created_at: protocol::iso(chrono::Utc::now()),
        target_spec: None,
        client_message_id: None,
        request_fingerprint: None,
        reply_to_id: None,
        mentions: None,
        attempt: None,
        subtype: Some("system"),
        event: Some(event),
        event_data: Some(json!({
            "name": display_name,
            "displayName": display_name,
            "pubkey": pubkey,
            "peerRole": role,
        })),
    };
    serde_json::to_string(&push).expect("push serializes")
}

/// Who is connected where, so that a hello and a close look at the
/// connections that can matter to them instead of at every connection of
/// this broker: in a mesh of thousands, each hello's `peer_joined` pass and
/// replacement check, and each close's "was it the member's last" check,
/// were a scan (and a map lookup) of them all. Changed only together with
/// `Registry::conns`.
#[derive(Default)]
struct ConnIndex {
    /// The members with a connection here, by mesh: system events go to
    /// the other members, and a member's connections are not even visited.
    members_by_mesh: HashMap<MeshId, HashSet<MemberId>>,
    by_member: HashMap<MemberId, HashSet<PresenceId>>,
    /// `session` connections by mesh and session pubkey (which they
    /// always have).
    sessions: HashMap<(MeshId, String), HashSet<PresenceId>>,
}

impl ConnIndex {
    fn session_key(c: &ConnEntry) -> Option<(MeshId, String)> {
        match (c.role, &c.session_pubkey) {
            (Role::Session, Some(k)) => Some((c.mesh_id, k.clone())),
            _ => None,
        }
    }

    fn insert(&mut self, c: &ConnEntry) {
        let id = c.presence_id;
        self.members_by_mesh
            .entry(c.mesh_id)
            .or_default()
            .insert(c.member_id);
        self.by_member.entry(c.member_id).or_default().insert(id);
        if let Some(key) = Self::session_key(c) {
            self.sessions.entry(key).or_default().insert(id);
        }
    }

    fn remove(&mut self, c: &ConnEntry) {
        /// Removes `item` from the set at `key`, and the set once empty;
        /// true when it was emptied.
        fn take<K: std::hash::Hash + Eq, T: std::hash::Hash + Eq>(
            map: &mut HashMap<K, HashSet<T>>,
            key: K,
            item: &T,
        ) -> bool {
            if let std::collections::hash_map::Entry::Occupied(mut e) = map.entry(key) {
                e.get_mut().remove(item);
                if e.get().is_empty() {
                    e.remove();
                    return true;
                }
            }
            false
        }
        if take(&mut self.by_member, c.member_id, &c.presence_id) {
            take(&mut self.members_by_mesh, c.mesh_id, &c.member_id);
        }
        if let Some(key) = Self::session_key(c) {
            take(&mut self.sessions, key, &c.presence_id);
        }
    }

    /// The connections of the mesh's members other than `except`.
    fn others_in_mesh(
        &self,
        mesh_id: MeshId,
        except: MemberId,
    ) -> impl Iterator<Item = &PresenceId> {
        self.members_by_mesh
            .get(&mesh_id)
            .into_iter()
            .flatten()
            .filter(move |m| **m != except)
            .filter_map(|m| self.by_member.get(m))
            .flatten()
    }

    fn has_member(&self, member_id: MemberId) -> bool {
        self.by_member.contains_key(&member_id)
    }

    /// The only connections `new` could replace (`routing::replaces`
    /// decides): a session one with its session pubkey, or a hello one of
    /// its member.
    fn replacement_candidates(&self, new: &ConnEntry) -> impl Iterator<Item = &PresenceId> {
        let set = match Self::session_key(new) {
            Some(key) => self.sessions.get(&key),
            None => self.by_member.get(&new.member_id),
        };
        set.into_iter().flatten()
    }
}

/// A closed connection whose grace window is being written.
struct Closing {
    entry: ConnEntry,
    waiters: Vec<tokio::sync::oneshot::Sender<()>>,
}

pub struct Registry {
    shared: Arc<Shared>,
    conns: HashMap<PresenceId, ConnEntry>,
    index: ConnIndex,
    /// Connections replaced by a newer hello: they close without a grace
    /// window (the replacement took their place).
    replaced: HashSet<PresenceId>,
    /// Connections closed because their member was revoked: they close
    /// without a grace window (no hello of theirs can take it over).
    revoked: HashSet<PresenceId>,
    drains: HashMap<MemberId, Addr<Drain>>,
    /// Where new drains start.
    home: DrainHome,
    /// Connections closed with a grace window whose presence row is not yet
    /// marked closed, with the hellos waiting for that ([`SettleCloses`]).
    closing: HashMap<PresenceId, Closing>,
    /// Closed connections whose rows are to be marked closed (with a grace
    /// window or not), and whether a write of such rows is running.
    to_close: Vec<(PresenceId, bool)>,
    closing_rows: bool,
    /// Graceful shutdown began: closing connections leave their rows to it.
    shutting_down: bool,
    /// Connections closed because another node declared this one dead:
    /// their rows are the takeover's, not theirs to write.
    fenced: HashSet<PresenceId>,
    /// Where notices for other nodes go (none in unit tests).
    bus: Option<Recipient<Publish>>,
}

impl Registry {
    pub fn new(shared: Arc<Shared>, home: DrainHome) -> Self {
        Registry {
            shared,
            home,
            conns: HashMap::new(),
            index: ConnIndex::default(),
            replaced: Default::default(),
            revoked: Default::default(),
            drains: HashMap::new(),
            closing: HashMap::new(),
            to_close: Vec::new(),
            closing_rows: false,
            shutting_down: false,
            fenced: HashSet::new(),
            bus: None,
        }
    }

    /// Hands notices to the bus, for the other nodes their routes name.
    fn publish(&self, items: Vec<(Route, Notice)>) {
        if let (Some(bus), false) = (&self.bus, items.is_empty()) {
            bus.do_send(Publish(items));
        }
    }

    fn count(&self) {
        self.shared.metrics.actor_message(ActorKind::Registry);
    }

    /// Sends a system event about `subject` to the mesh's other members,
    /// here and on every other node.
    fn announce(&self, subject: &ConnEntry, event: Event) {
        let text = system_event(
            subject.mesh_id,
            event.name(),
            &subject.display_name,
            subject.pubkey(),
            subject.role,
        );
        self.broadcast_system(subject.mesh_id, subject.member_id, &text);
        self.publish(vec![(
            Route::Mesh(subject.mesh_id.0),
            Notice::Event(event, subject.presence_id),
        )]);
    }

    /// A system event about a connection that is not (or no longer) here,
    /// for this node's connections only.
    fn announce_subject(&self, event: Event, s: &queries::Subject) {
        let mesh_id = MeshId(s.mesh_id);
        let text = system_event(mesh_id, event.name(), &s.display_name, &s.pubkey, s.role);
        self.broadcast_system(mesh_id, MemberId(s.member_id), &text);
    }

    fn broadcast_system(&self, mesh_id: MeshId, except_member: MemberId, text: &str) {
        for c in self
            .index
            .others_in_mesh(mesh_id, except_member)
            .filter_map(|id| self.conns.get(id))
        {
            c.handle
                .offer(Outbound::System(text.to_owned()), &self.shared.metrics);
        }
    }
}

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.shared.metrics.actor_started(ActorKind::Registry);
        // Keep this broker's presence rows fresh, so a broker that dies
        // can be told apart from a quiet one (the sweeper reaps stale rows).
        let every = self.shared.config().presence.ping_interval.get();
        ctx.run_interval(every, |act, ctx| {
            let ids: Vec<PresenceId> = act.conns.keys().copied().collect();
            if ids.is_empty() {
                return;
            }
            let pool = act.shared.pool.clone();
            ctx.spawn(
                async move {
                    if let Ok(mut conn) = pool.get().await {
                        let _ = queries::touch_presence(&mut conn, &ids).await;
                    }
                }
                .into_actor(act),
            );
        });
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.shared.metrics.actor_stopped(ActorKind::Registry);
    }
}

/// A connection passed its hello. Answers with its member's drain.
#[derive(Message)]
#[rtype(result = "Addr<Drain>")]
pub struct Connect {
    pub entry: ConnEntry,
    pub arrival: Arrival,
}

/// Whether peers hear of a connection that passed its hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// `peer_joined` (unless it replaced a live connection).
    New,
    /// It took over a closed connection inside its grace window: silent.
    TakeOver,
}

impl Handler<Connect> for Registry {
    type Result = MessageResult<Connect>;

    fn handle(&mut self, msg: Connect, _: &mut Self::Context) -> Self::Result {
        self.count();
        let entry = msg.entry;
        let replaced: Vec<PresenceId> = self
            .index
            .replacement_candidates(&entry)
            .filter_map(|id| self.conns.get(id))
            .filter(|c| routing::replaces(&entry.identity(), &c.identity()))
            .map(|c| c.presence_id)
            .collect();
        for id in &replaced {
            if let Some(old) = self.conns.get(id) {
                self.replaced.insert(*id);
                old.handle.close(CloseReason::Replaced);
            }
        }
        let drain = self
            .drains
            .entry(entry.member_id)
            .or_insert_with(|| self.home.start(self.shared.clone(), entry.member_id))
            .clone();
        drain.do_send(drain::AddConn {
            presence_id: entry.presence_id,
            handle: entry.handle.clone(),
            key: entry.key.clone(),
            role: entry.role,
            has_session_pubkey: entry.session_pubkey.is_some(),
        });
        if msg.arrival == Arrival::New && replaced.is_empty() && entry.visible {
            self.announce(&entry, Event::Joined);
        }
        self.index.insert(&entry);
        self.conns.insert(entry.presence_id, entry);
        MessageResult(drain)
    }
}

/// A session actor stopped.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    pub presence_id: PresenceId,
}

impl Handler<Disconnect> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, ctx: &mut Self::Context) {
        self.count();
        let Some(entry) = self.conns.remove(&msg.presence_id) else {
            return;
        };
        self.index.remove(&entry);
        let replaced = self.replaced.remove(&msg.presence_id);
        let revoked = self.revoked.remove(&msg.presence_id);
        let fenced = self.fenced.remove(&msg.presence_id);
        let last = !self.index.has_member(entry.member_id);
        if let Some(drain) = self.drains.get(&entry.member_id) {
            drain.do_send(drain::RemoveConn {
                presence_id: entry.presence_id,
                leaving: if last {
                    Leaving::Last
                } else {
                    Leaving::OneOfSeveral
                },
            });
        }
        if last {
            self.drains.remove(&entry.member_id);
        }
        if self.shutting_down || fenced {
            return;
        }
        let grace = self.shared.config().presence.grace.get();
        let with_grace = !replaced && !revoked && !grace.is_zero();
        if !replaced && !with_grace && entry.visible {
            self.announce(&entry, Event::Left);
        }
        let presence_id = entry.presence_id;
        if with_grace {
            self.closing.insert(
                presence_id,
                Closing {
                    entry,
                    waiters: Vec::new(),
                },
            );
        }
        self.to_close.push((presence_id, with_grace));
        self.close_pending(ctx);
    }
}

impl Registry {
    /// Writes the closes that queued up while the previous write ran, in
    /// one statement per grace (self-clocking: one write in flight, the
    /// next takes everything that arrived meanwhile), then lets the hellos
    /// waiting on them go on ([`SettleCloses`]).
    fn close_pending(&mut self, ctx: &mut Context<Self>) {
        if self.closing_rows || self.to_close.is_empty() {
            return;
        }
        self.closing_rows = true;
        let batch = std::mem::take(&mut self.to_close);
        let grace = self.shared.config().presence.grace.get();
        let pool = self.shared.pool.clone();
        let ids = batch.clone();
        ctx.spawn(
            async move {
                let Ok(mut conn) = pool.get().await else {
                    tracing::warn!(rows = ids.len(), "database unavailable: presence rows left open; the sweeper reaps them");
                    return;
                };
                for with_grace in [true, false] {
                    let group: Vec<PresenceId> =
                        ids.iter().filter(|c| c.1 == with_grace).map(|c| c.0).collect();
                    if group.is_empty() {
                        continue;
                    }
                    let grace = with_grace.then_some(grace);
                    if let Err(e) = queries::close_presences(&mut conn, &group, grace).await {
                        tracing::warn!(rows = group.len(), error = %e, "could not close presence rows");
                    }
                }
            }
            .into_actor(self)
            .map(move |(), act, ctx| {
                for (presence_id, _) in batch {
                    if let Some(closing) = act.closing.remove(&presence_id) {
                        for waiter in closing.waiters {
                            let _ = waiter.send(());
                        }
                    }
                }
                act.closing_rows = false;
                act.close_pending(ctx);
            }),
        );
    }
}

pub use super::wake::WakeMembers;

/// A hello is about to take over whatever closed connection of its
/// identity is inside its grace window: answers once every such connection
/// of this broker has its row marked closed. A connection that just closed
/// here has its row written asynchronously; without the wait, a client
/// that reconnects at once (its hello is a single database call) could look
/// before that write and be announced `peer_joined` instead of taking over.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SettleCloses {
    pub mesh_id: MeshId,
    /// The member the hello names, by key (the member id is not known yet).
    pub member_pubkey: String,
    pub role: Role,
    pub session_id: String,
    pub session_pubkey: Option<String>,
}

impl Handler<SettleCloses> for Registry {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: SettleCloses, _: &mut Self::Context) -> Self::Result {
        self.count();
        let mut waits = Vec::new();
        for closing in self.closing.values_mut() {
            let old = &closing.entry;
            // A mesh's members have distinct keys, so the key names the
            // member for the takeover rule (`routing::replaces`).
            let new = Identity {
                mesh_id: msg.mesh_id,
                member_id: if old.member_pubkey == msg.member_pubkey {
                    old.member_id
                } else {
                    MemberId(Uuid::nil())
                },
                role: msg.role,
                session_id: &msg.session_id,
                session_pubkey: msg.session_pubkey.as_deref(),
            };
            if routing::replaces(&new, &old.identity()) {
                let (tx, rx) = tokio::sync::oneshot::channel();
                closing.waiters.push(tx);
                waits.push(rx);
            }
        }
        Box::pin(async move {
            for rx in waits {
                // Dropped unanswered only if the registry stopped.
                let _ = rx.await;
            }
        })
    }
}

impl Handler<WakeMembers> for Registry {
    type Result = ();

    fn handle(&mut self, msg: WakeMembers, _: &mut Self::Context) {
        self.count();
        for member in &msg.0 {
            if let Some(drain) = self.drains.get(member) {
                drain.do_send(drain::Wake);
            }
        }
        // The member may be connected to other nodes too.
        self.publish(
            msg.0
                .into_iter()
                .map(|m| (Route::Member(m.0), Notice::Wake(m)))
                .collect(),
        );
    }
}

/// The sweeper cleared leases or dead-lettered deliveries.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reclaimed(pub Vec<queries::Swept>);

impl Handler<Reclaimed> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Reclaimed, _: &mut Self::Context) {
        self.count();
        let rows: Vec<Lease> = msg
            .0
            .into_iter()
            .map(|row| {
                let until = row.lease_until.map(|t| t.timestamp_micros());
                (MemberId(row.recipient_member_id), row.id, until)
            })
            .collect();
        self.publish(
            rows.iter()
                .map(|&(m, id, until)| (Route::Member(m.0), Notice::Reclaimed(m, id, until)))
                .collect(),
        );
        self.reclaimed_here(rows);
    }
}

/// A lease the sweeper cleared: whose, which delivery, and when it ran
/// out (unix µs; `None`: dead-lettered).
pub type Lease = (MemberId, DeliveryId, Option<i64>);

impl Registry {
    /// Tells the local drains of these members which of their leases the
    /// sweeper cleared.
    fn reclaimed_here(&self, rows: Vec<Lease>) {
        type Cleared = Vec<(DeliveryId, Option<chrono::DateTime<chrono::Utc>>)>;
        let mut by_member: HashMap<MemberId, Cleared> = HashMap::new();
        for (member, id, until) in rows {
            let until = until.and_then(chrono::DateTime::from_timestamp_micros);
            by_member.entry(member).or_default().push((id, until));
        }
        for (member, cleared) in by_member {
            if let Some(drain) = self.drains.get(&member) {
                drain.do_send(drain::Reclaimed(cleared));
            }
        }
    }

    fn wake_here(&self, member: MemberId) {
        if let Some(drain) = self.drains.get(&member) {
            drain.do_send(drain::Wake);
        }
    }
}

/// The members with a live connection on this broker (the sweeper checks
/// them for revocation).
#[derive(Message)]
#[rtype(result = "Vec<MemberId>")]
pub struct LiveMembers;

impl Handler<LiveMembers> for Registry {
    type Result = MessageResult<LiveMembers>;

    fn handle(&mut self, _: LiveMembers, _: &mut Self::Context) -> Self::Result {
        self.count();
        let members: HashSet<MemberId> = self.conns.values().map(|c| c.member_id).collect();
        MessageResult(members.into_iter().collect())
    }
}

/// These members were revoked: close every connection they have here with
/// 4002. Their deliveries stay queued (no claim is made for a revoked
/// member) until they expire.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Revoked(pub Vec<MemberId>);

impl Handler<Revoked> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Revoked, _: &mut Self::Context) {
        self.count();
        for c in self.conns.values() {
            if !msg.0.contains(&c.member_id) || !self.revoked.insert(c.presence_id) {
                continue;
            }
            tracing::info!(member = %c.member_id, presence = %c.presence_id, "member revoked: closing its connection");
            c.handle.close(CloseReason::Revoked);
        }
    }
}

/// Closed connections whose grace windows the sweeper ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct GraceEnded(pub Vec<queries::Subject>);

impl Handler<GraceEnded> for Registry {
    type Result = ();

    fn handle(&mut self, msg: GraceEnded, _: &mut Self::Context) {
        self.count();
        // The sweeper (the leader's) ends every node's windows: each node
        // tells its own connections.
        let mut items = Vec::with_capacity(msg.0.len());
        for gone in &msg.0 {
            self.announce_subject(Event::Left, gone);
            items.push((
                Route::Mesh(gone.mesh_id),
                Notice::Event(Event::Left, PresenceId(gone.id)),
            ));
        }
        self.publish(items);
    }
}

/// A connection changed something peers or its drain care about.
#[derive(Message)]
#[rtype(result = "()")]
pub enum Changed {
    /// Its status (already written to the database): the gate may open.
    Status { presence_id: PresenceId },
    /// Shown to or hidden from peers (already written).
    Visible {
        presence_id: PresenceId,
        visible: bool,
    },
}

impl Handler<Changed> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Changed, _: &mut Self::Context) {
        self.count();
        match msg {
            Changed::Status { presence_id } => match self.conns.get(&presence_id) {
                Some(c) => self.wake_here(c.member_id),
                // The hook set the status of a connection on another node.
                None => self.publish(vec![(
                    Route::Presence(presence_id.0),
                    Notice::Status(presence_id),
                )]),
            },
            Changed::Visible {
                presence_id,
                visible,
            } => {
                let Some(c) = self.conns.get_mut(&presence_id) else {
                    return;
                };
                if c.visible == visible {
                    return;
                }
                c.visible = visible;
                let c = c.clone();
                self.announce(
                    &c,
                    if visible {
                        Event::Visible
                    } else {
                        Event::Hidden
                    },
                );
            }
        }
    }
}

/// An admin's `kick` (skips control-plane, 4001) or `disconnect` (1000).
#[derive(Message)]
#[rtype(result = "KickOutcome")]
pub struct Kick {
    pub mesh_id: MeshId,
    pub asker: PresenceId,
    pub selector: KickSelector,
    pub kind: KickKind,
}

/// `kick` or `disconnect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickKind {
    /// Closes 4001 and leaves control-plane connections alone (listed in
    /// `skipped_control_plane`): a kicked daemon would reconnect at once.
    Kick,
    /// Closes 1000, every role.
    Disconnect,
}

#[derive(Debug, Default, MessageResponse)]
pub struct KickOutcome {
    pub kicked: Vec<String>,
    pub affected: Vec<String>,
    pub skipped_control_plane: Vec<String>,
}

impl Handler<Kick> for Registry {
    type Result = ResponseActFuture<Self, KickOutcome>;

    /// This node's connections are matched on what the registry knows;
    /// other nodes' on their presence rows (silence as of their last
    /// refresh, every ping interval), and their nodes are told to close
    /// them. The answer covers every node.
    fn handle(&mut self, msg: Kick, _: &mut Self::Context) -> Self::Result {
        self.count();
        let now = chrono::Utc::now().timestamp_millis();
        let mut out = KickOutcome::default();
        for c in self.conns.values() {
            if c.mesh_id != msg.mesh_id || c.presence_id == msg.asker {
                continue;
            }
            let kickable = Kickable {
                display_name: &c.display_name,
                member_pubkey: &c.member_pubkey,
                session_pubkey: c.session_pubkey.as_deref(),
                silent_ms: now - c.last_seen.load(Relaxed),
            };
            if let Some(close) = kick_one(&msg, &kickable, c.role, &mut out) {
                c.handle.close(close);
            }
        }
        let shared = self.shared.clone();
        let alone = shared.cluster.live_nodes() <= 1;
        let remote = async move {
            if alone {
                return Vec::new();
            }
            let Ok(mut conn) = shared.pool.get().await else {
                return Vec::new();
            };
            queries::remote_conns(&mut conn, msg.mesh_id.0, shared.node_id.0)
                .await
                .unwrap_or_default()
        };
        Box::pin(remote.into_actor(self).map(move |rows, act, _| {
            let mut items = Vec::new();
            for r in &rows {
                let kickable = Kickable {
                    display_name: &r.display_name,
                    member_pubkey: &r.member_pubkey,
                    session_pubkey: r.session_pubkey.as_deref(),
                    silent_ms: r.silent_ms,
                };
                if let Some(close) = kick_one(&msg, &kickable, r.role, &mut out) {
                    let why = match close {
                        CloseReason::Kicked => CloseFor::Kicked,
                        _ => CloseFor::Disconnected,
                    };
                    items.push((Route::Presence(r.id), Notice::Close(why, PresenceId(r.id))));
                }
            }
            act.publish(items);
            out
        }))
    }
}

/// Whether `kick` names connection `c` (of `role`); records it in `out`
/// and answers how to close it (`None`: left open).
fn kick_one(
    kick: &Kick,
    c: &Kickable<'_>,
    role: Role,
    out: &mut KickOutcome,
) -> Option<CloseReason> {
    if !routing::kick_matches(&kick.selector, c) {
        return None;
    }
    out.affected.push(c.display_name.to_owned());
    if kick.kind == KickKind::Kick && role == Role::ControlPlane {
        out.skipped_control_plane.push(c.display_name.to_owned());
        return None;
    }
    out.kicked.push(c.display_name.to_owned());
    Some(match kick.kind {
        KickKind::Kick => CloseReason::Kicked,
        KickKind::Disconnect => CloseReason::Disconnected,
    })
}

/// Attaches the bus: from now on what other nodes must hear is published.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachBus(pub Recipient<Publish>);

impl Handler<AttachBus> for Registry {
    type Result = ();

    fn handle(&mut self, msg: AttachBus, _: &mut Self::Context) {
        self.bus = Some(msg.0);
    }
}

/// What other nodes' notices ask of this node's connections and drains
/// (and, from the bus itself, the wake-ups after a reconnect and the poll).
#[derive(Message, Debug, Default)]
#[rtype(result = "()")]
pub struct FromPeers {
    /// Wake every local drain (the bus reconnected: notices may be lost).
    pub wake_all: bool,
    pub wakes: Vec<MemberId>,
    pub statuses: Vec<PresenceId>,
    pub reclaimed: Vec<Lease>,
    pub events: Vec<(Event, queries::Subject)>,
    pub closes: Vec<(CloseFor, PresenceId)>,
}

impl FromPeers {
    pub fn wake_all() -> Self {
        FromPeers {
            wake_all: true,
            ..FromPeers::default()
        }
    }
}

impl Handler<FromPeers> for Registry {
    type Result = ();

    fn handle(&mut self, msg: FromPeers, _: &mut Self::Context) {
        self.count();
        if msg.wake_all {
            for drain in self.drains.values() {
                drain.do_send(drain::Wake);
            }
        }
        for member in msg.wakes {
            self.wake_here(member);
        }
        for presence_id in msg.statuses {
            if let Some(c) = self.conns.get(&presence_id) {
                self.wake_here(c.member_id);
            }
        }
        self.reclaimed_here(msg.reclaimed);
        for (event, subject) in &msg.events {
            self.announce_subject(*event, subject);
        }
        for (why, presence_id) in msg.closes {
            let Some(c) = self.conns.get(&presence_id) else {
                continue;
            };
            let reason = match why {
                CloseFor::Replaced => {
                    self.replaced.insert(presence_id);
                    CloseReason::Replaced
                }
                CloseFor::Kicked => CloseReason::Kicked,
                CloseFor::Disconnected => CloseReason::Disconnected,
            };
            tracing::info!(presence = %presence_id, reason = reason.reason(), "closing a connection at another node's request");
            c.handle.close(reason);
        }
    }
}

/// Another node declared this one dead and took over its leases and
/// connections: close every socket (1012: reconnect), leaving the rows to
/// the takeover.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Fence;

impl Handler<Fence> for Registry {
    type Result = ();

    fn handle(&mut self, _: Fence, _: &mut Self::Context) {
        self.count();
        for c in self.conns.values() {
            self.fenced.insert(c.presence_id);
            c.handle.close(CloseReason::Fenced);
        }
    }
}

/// Graceful shutdown: release this broker's leases, close its presence
/// rows, and close every socket with 1001.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Shutdown> for Registry {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Shutdown, _: &mut Self::Context) -> Self::Result {
        self.count();
        self.shutting_down = true;
        let shared = self.shared.clone();
        let node = shared.node_id;
        let grace = shared.config().presence.grace.get();
        Box::pin(
            async move {
                let mut released = Vec::new();
                match shared.pool.get().await {
                    Ok(mut conn) => {
                        match queries::release_node_claims(&mut conn, node).await {
                            Ok(members) => {
                                tracing::info!(members = members.len(), "released this broker's unacked leases");
                                released = members;
                            }
                            Err(e) => tracing::warn!(error = %e, "could not release leases; they expire instead"),
                        }
                        if let Err(e) = queries::close_node_presence(&mut conn, node, grace).await {
                            tracing::warn!(error = %e, "could not close presence rows");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "database unavailable at shutdown; leases expire instead"),
                }
                released
            }
            .into_actor(self)
            .map(|released, act, _| {
                // Members connected to other nodes may claim them there now.
                act.publish(
                    released
                        .into_iter()
                        .map(|m| (Route::Member(m), Notice::Wake(MemberId(m))))
                        .collect(),
                );
                for c in act.conns.values() {
                    c.handle.close(CloseReason::Shutdown);
                }
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::actors::backlog::Backlog;
    use crate::actors::conn::CloseConn;

    /// What a probe connection was sent.
    #[derive(Debug, Clone, PartialEq)]
    enum Heard {
        System(String),
        Closed(CloseReason),
    }

    /// Stands in for a session: records what the registry sends it.
    struct Probe(Arc<Mutex<Vec<Heard>>>);

    impl Actor for Probe {
        type Context = Context<Self>;
    }

    impl Handler<Outbound> for Probe {
        type Result = ();
        fn handle(&mut self, msg: Outbound, _: &mut Self::Context) {
            if let Outbound::System(text) = msg {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                let event = v["event"].as_str().unwrap().to_owned();
                self.0.lock().unwrap().push(Heard::System(event));
            }
        }
    }

    impl Handler<CloseConn> for Probe {
        type Result = ();
        fn handle(&mut self, CloseConn(reason): CloseConn, _: &mut Self::Context) {
            self.0.lock().unwrap().push(Heard::Closed(reason));
        }
    }

    fn registry() -> Addr<Registry> {
        let shared = Arc::new(crate::actors::test_shared());
        Registry::new(shared.clone(), DrainHome::here(&shared)).start()
    }

    /// Registers a probe connection; returns what it hears.
    async fn connect(
        registry: &Addr<Registry>,
        member: u128,
        role: Role,
        session_id: &str,
        session_pubkey: Option<&str>,
    ) -> (PresenceId, Arc<Mutex<Vec<Heard>>>) {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let probe = Probe(heard.clone()).start();
        let presence_id = PresenceId::new();
        let entry = ConnEntry {
            presence_id,
            mesh_id: MeshId(Uuid::from_u128(1)),
            member_id: MemberId(Uuid::from_u128(member)),
            member_pubkey: format!("{member:064x}"),
            role,
            session_id: session_id.into(),
            session_pubkey: session_pubkey.map(str::to_owned),
            key: routing::connection_key(session_pubkey, session_id),
            display_name: format!("m{member}"),
            visible: true,
            handle: ConnHandle::new(&probe, Arc::new(Backlog::new(1 << 20, None))),
            last_seen: Arc::new(AtomicI64::new(chrono::Utc::now().timestamp_millis())),
        };
        registry
            .send(Connect {
                entry,
                arrival: Arrival::New,
            })
            .await
            .unwrap();
        (presence_id, heard)
    }

    async fn settle() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    fn heard(h: &Arc<Mutex<Vec<Heard>>>) -> Vec<Heard> {
        h.lock().unwrap().clone()
    }

    #[actix_web::test]
    async fn a_hello_replaces_its_own_identity_and_peers_hear_one_join() {
        let reg = registry();
        let (_, other) = connect(&reg, 2, Role::Session, "s2", Some("k2")).await;
        let (_, daemon) = connect(&reg, 1, Role::ControlPlane, "d", None).await;
        let (_, cli) = connect(&reg, 1, Role::ControlPlane, "d", Some("cli")).await;
        let (_, again) = connect(&reg, 1, Role::ControlPlane, "d", None).await;
        settle().await;
        assert_eq!(heard(&daemon), vec![Heard::Closed(CloseReason::Replaced)]);
        assert!(heard(&cli).is_empty(), "a CLI key is another identity");
        assert!(heard(&again).is_empty());
        let joined = |h: &[Heard]| {
            h.iter()
                .filter(|e| **e == Heard::System("peer_joined".into()))
                .count()
        };
        assert_eq!(
            joined(&heard(&other)),
            2,
            "the daemon and the CLI joined; the replacement was silent"
        );
    }

    #[actix_web::test]
    async fn kick_spares_the_daemon_and_the_asker_and_disconnect_does_not() {
        let reg = registry();
        let (asker, asker_heard) = connect(&reg, 1, Role::Session, "a", Some("ka")).await;
        let (_, daemon) = connect(&reg, 2, Role::ControlPlane, "d", None).await;
        let (_, session) = connect(&reg, 2, Role::Session, "s", Some("ks")).await;
        let kick = |kind| Kick {
            mesh_id: MeshId(Uuid::from_u128(1)),
            asker,
            selector: KickSelector::All,
            kind,
        };
        let out = reg.send(kick(KickKind::Kick)).await.unwrap();
        assert_eq!(out.kicked, vec!["m2".to_owned()]);
        assert_eq!(out.skipped_control_plane, vec!["m2".to_owned()]);
        assert_eq!(out.affected.len(), 2);
        settle().await;
        assert!(heard(&session).contains(&Heard::Closed(CloseReason::Kicked)));
        assert!(!heard(&daemon).iter().any(|h| matches!(h, Heard::Closed(_))));
        let out = reg.send(kick(KickKind::Disconnect)).await.unwrap();
        assert_eq!(out.kicked.len(), 2, "disconnect closes every role");
        settle().await;
        assert!(heard(&daemon).contains(&Heard::Closed(CloseReason::Disconnected)));
        assert!(!heard(&asker_heard)
            .iter()
            .any(|h| matches!(h, Heard::Closed(_))));
    }
}
