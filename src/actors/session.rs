//! The session actor: one per WebSocket connection.
//!
//! It decodes frames into [`ClientFrame`]s, answers bad ones with error
//! frames, verifies the hello (and so learns its [`Role`]), runs the
//! heartbeat, accepts sends (stored before they are acknowledged), and
//! forwards acks to its member's drain. It registers with the registry after
//! its hello and always deregisters when it stops, whatever stopped it.

use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web_actors::ws;
use serde::Serialize;
use uuid::Uuid;

use super::backlog::Backlog;
use super::drain::{self, Drain};
use super::registry::{self, ConnEntry, KickSelector, Registry};
use super::{connection_key, Shared};
use crate::db::queries::{
    self, MemberRow, NewMessage, NewPresence, Opened, Recipient, SendOutcome,
};
use crate::ids::{Priority, Role, Status};
use crate::metrics::ActorKind;
use crate::protocol::{
    self, bounds, ClientFrame, DecodeError, ErrorFrame, Group, HelloAck, KickAck, MemberProfile,
    Peer, PeersList, SendAck, SendFrame,
};
use crate::{crypto, handshake};

/// Text frames to write, from the drain (deliveries) or the registry
/// (system events).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Outbound {
    frames: Vec<String>,
    deliveries: bool,
}

impl Outbound {
    pub fn deliveries(frames: Vec<String>) -> Self {
        Outbound {
            frames,
            deliveries: true,
        }
    }
    pub fn system(frame: String) -> Self {
        Outbound {
            frames: vec![frame],
            deliveries: false,
        }
    }
    /// Bytes of payload these frames put on the wire.
    pub(super) fn bytes(&self) -> usize {
        self.frames.iter().map(String::len).sum()
    }
}

/// Close this connection with a code and reason.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseConn {
    pub code: u16,
    pub reason: String,
}

/// What the connection is once its hello was accepted.
struct Ready {
    presence_id: Uuid,
    mesh_id: Uuid,
    member: MemberRow,
    role: Role,
    session_pubkey: Option<String>,
    display_name: String,
    groups: Vec<Group>,
    drain: Addr<Drain>,
}

pub struct WsSession {
    shared: Arc<Shared>,
    registry: Addr<Registry>,
    ready: Option<Ready>,
    /// The presence id of a hello being verified: if the connection stops
    /// before the answer, the registry may still have registered it.
    pending_presence: Option<Uuid>,
    /// Last frame or pong from the client.
    last_heard: Instant,
    /// The same, as unix millis, for the registry's `kick stale`.
    last_seen: Arc<AtomicI64>,
    /// Pushes handed to this session and not yet on their way out.
    backlog: Arc<Backlog>,
}

impl WsSession {
    pub fn new(shared: Arc<Shared>, registry: Addr<Registry>, backlog: Arc<Backlog>) -> Self {
        WsSession {
            backlog,
            shared,
            registry,
            ready: None,
            pending_presence: None,
            last_heard: Instant::now(),
            last_seen: Arc::new(AtomicI64::new(chrono::Utc::now().timestamp_millis())),
        }
    }

    fn heard(&mut self) {
        self.last_heard = Instant::now();
        self.last_seen
            .store(chrono::Utc::now().timestamp_millis(), Relaxed);
    }

    fn send_json<T: Serialize>(ctx: &mut ws::WebsocketContext<Self>, frame: &T) {
        ctx.text(serde_json::to_string(frame).expect("frames serialize"));
    }

    fn error(
        ctx: &mut ws::WebsocketContext<Self>,
        code: &str,
        message: impl Into<String>,
        req_id: Option<String>,
    ) {
        Self::send_json(ctx, &ErrorFrame::new(code, message, req_id));
    }

    /// Refuses one frame with an error frame (the connection stays open),
    /// counted in `meshbroker_frames_rejected_total{reason=code}`.
    fn reject(
        metrics: &crate::metrics::Metrics,
        ctx: &mut ws::WebsocketContext<Self>,
        code: &'static str,
        message: impl Into<String>,
        req_id: Option<String>,
    ) {
        metrics.frame_rejected(code);
        Self::error(ctx, code, message, req_id);
    }

    fn close(ctx: &mut ws::WebsocketContext<Self>, code: u16, reason: &str) {
        ctx.close(Some(ws::CloseReason {
            code: ws::CloseCode::from(code),
            description: Some(reason.to_owned()),
        }));
        ctx.stop();
    }

    /// Refuses a hello: error frame, then close (1008 unless `code` says).
    fn refuse(&self, ctx: &mut ws::WebsocketContext<Self>, refusal: handshake::Refusal) {
        self.shared.metrics.connection_rejected(refusal.code);
        Self::error(ctx, refusal.code, refusal.message, None);
        Self::close(ctx, refusal.close_code, refusal.code);
    }

    fn on_text(&mut self, text: &str, ctx: &mut ws::WebsocketContext<Self>) {
        let request = match protocol::decode(text) {
            Ok(r) => r,
            Err(DecodeError::Malformed(m)) => {
                return Self::reject(&self.shared.metrics, ctx, "malformed", m, None)
            }
            Err(DecodeError::Unsupported { ty, req_id }) => {
                return Self::reject(
                    &self.shared.metrics,
                    ctx,
                    "unsupported",
                    format!("unsupported frame type {ty:?}"),
                    req_id,
                )
            }
            Err(DecodeError::Invalid {
                ty,
                req_id,
                id,
                message,
            }) => {
                if self.ready.is_none() && !(ty == "hello" || ty == "session_hello") {
                    return Self::reject(
                        &self.shared.metrics,
                        ctx,
                        "no_hello",
                        "must send hello first",
                        req_id,
                    );
                }
                return match ty.as_str() {
                    "hello" | "session_hello" if self.ready.is_none() => {
                        self.refuse(ctx, handshake::Refusal::new("malformed", message))
                    }
                    "send" => {
                        self.shared.metrics.message_rejected("invalid");
                        Self::send_json(
                            ctx,
                            &SendAck::refused(id.unwrap_or_default(), "invalid", &message),
                        )
                    }
                    _ => Self::reject(&self.shared.metrics, ctx, "invalid", message, req_id),
                };
            }
        };
        let req_id = request.req_id;
        match (request.frame, self.ready.is_some()) {
            (ClientFrame::Hello(h), false) => self.hello(handshake::HelloKind::Member(h), ctx),
            (ClientFrame::SessionHello(h), false) => {
                self.hello(handshake::HelloKind::Session(h), ctx)
            }
            (ClientFrame::Hello(_) | ClientFrame::SessionHello(_), true) => Self::reject(
                &self.shared.metrics,
                ctx,
                "invalid",
                "this connection already said hello",
                req_id,
            ),
            (ClientFrame::Ping, _) => ctx.text(r#"{"type":"pong"}"#),
            (_, false) => Self::reject(
                &self.shared.metrics,
                ctx,
                "no_hello",
                "must send hello first",
                req_id,
            ),
            (frame, true) => self.on_frame(frame, req_id, ctx),
        }
    }

    // -- hello ----------------------------------------------------------

    fn hello(&mut self, kind: handshake::HelloKind, ctx: &mut ws::WebsocketContext<Self>) {
        let cfg = &self.shared.config;
        let claims =
            match handshake::verify_offline(&kind, chrono::Utc::now().timestamp_millis(), cfg) {
                Ok(c) => c,
                Err(refusal) => return self.refuse(ctx, refusal),
            };
        let presence_id = Uuid::new_v4();
        self.pending_presence = Some(presence_id);
        let shared = self.shared.clone();
        let registry = self.registry.clone();
        let addr = ctx.address();
        let last_seen = self.last_seen.clone();
        let backlog = self.backlog.clone();
        let fut = async move {
            let mut conn = shared.pool.get().await.map_err(|e| {
                tracing::warn!(error = %e, "hello refused: no database connection");
                handshake::Refusal::new("unavailable", "database unavailable, retry")
            })?;
            let member = handshake::verify_online(&mut conn, &claims).await?;
            let info = &claims.info;
            let session_id = info
                .session_id
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| Uuid::new_v4().to_string());
            let display_name = info
                .display_name
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| member.name.clone());
            let row = NewPresence {
                id: presence_id,
                mesh_id: member.mesh_id,
                member_id: member.id,
                session_id: session_id.clone(),
                session_pubkey: claims.session_pubkey.clone(),
                role: claims.role,
                display_name: display_name.clone(),
                groups: serde_json::to_value(&info.groups).expect("groups serialize"),
                pid: info.pid,
                cwd: info.cwd.clone(),
                hostname: info.hostname.clone(),
                peer_type: info.peer_type.clone(),
                channel: info.channel.clone(),
                model: info.model.clone(),
                broker_node_id: shared.node_id.0,
            };
            let cap = i64::from(shared.config.limits.max_connections_per_mesh);
            let silent = match queries::open_presence(&mut conn, &row, cap).await {
                Ok(Opened::Opened { silent }) => silent,
                Ok(Opened::MeshFull) => {
                    return Err(handshake::Refusal::new(
                        "capacity",
                        "this mesh has as many connections as it may",
                    ))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "hello refused: presence row not written");
                    return Err(handshake::Refusal::new(
                        "unavailable",
                        "database unavailable, retry",
                    ));
                }
            };
            drop(conn);
            let entry = ConnEntry {
                presence_id,
                mesh_id: member.mesh_id,
                member_id: member.id,
                member_pubkey: member.pubkey.clone(),
                role: claims.role,
                session_id,
                session_pubkey: claims.session_pubkey.clone(),
                key: connection_key(claims.session_pubkey.as_deref(), &row.session_id),
                display_name: display_name.clone(),
                groups: info.groups.clone(),
                visible: true,
                addr,
                last_seen,
                backlog,
            };
            let drain = registry
                .send(registry::Connect { entry, silent })
                .await
                .map_err(|_| handshake::Refusal::new("unavailable", "broker is shutting down"))?;
            Ok::<_, handshake::Refusal>((member, presence_id, display_name, claims, drain))
        };
        ctx.wait(fut.into_actor(self).map(|result, act, ctx| {
            act.pending_presence = None;
            match result {
                Err(refusal) => act.refuse(ctx, refusal),
                Ok((member, presence_id, display_name, claims, drain)) => {
                    let role = claims.role;
                    Self::send_json(
                        ctx,
                        &HelloAck {
                            ty: "hello_ack",
                            presence_id: presence_id.to_string(),
                            member_display_name: display_name.clone(),
                            member_profile: MemberProfile {
                                role_tag: None,
                                groups: claims.info.groups.clone(),
                                message_mode: "push",
                            },
                            peer_role: role,
                            protocol_version: 1,
                            req_id: None,
                        },
                    );
                    act.shared.metrics.connection_opened(role);
                    act.ready = Some(Ready {
                        presence_id,
                        mesh_id: member.mesh_id,
                        member,
                        role,
                        session_pubkey: claims.session_pubkey,
                        display_name,
                        groups: claims.info.groups,
                        drain,
                    });
                }
            }
        }));
    }

    // -- frames after hello ----------------------------------------------

    fn on_frame(
        &mut self,
        frame: ClientFrame,
        req_id: Option<String>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let ready = self.ready.as_mut().expect("called after hello");
        match frame {
            ClientFrame::Send(send) => self.send(*send, ctx),
            ClientFrame::ClientAck(a) => {
                let broker_message_id = a.broker_message_id.as_deref().and_then(|s| s.parse().ok());
                // An id no send could have stored matches nothing; one with
                // U+0000 would fail in the database and log a warning each
                // time, so it is dropped here.
                let client_message_id = a.client_message_id.filter(|c| {
                    protocol::check_text("clientMessageId", c, bounds::CLIENT_ID).is_ok()
                });
                if broker_message_id.is_none() && client_message_id.is_none() {
                    return;
                }
                ready.drain.do_send(drain::Ack {
                    presence_id: ready.presence_id,
                    broker_message_id,
                    client_message_id,
                });
            }
            ClientFrame::Nack(n) => {
                let delay = match n.delay.as_deref().map(str::parse::<crate::config::Dur>) {
                    None => Duration::ZERO,
                    Some(Ok(d)) if d <= self.shared.config.delivery.message_ttl => d.get(),
                    // Longer than the message lives: it could never be
                    // pushed again, and the database cannot hold the time.
                    Some(Ok(d)) => {
                        return Self::reject(
                            &self.shared.metrics,
                            ctx,
                            "invalid",
                            format!("delay {d} is longer than delivery.message_ttl"),
                            req_id,
                        )
                    }
                    Some(Err(e)) => {
                        return Self::reject(&self.shared.metrics, ctx, "invalid", e, req_id)
                    }
                };
                if let Ok(message_id) = n.broker_message_id.parse() {
                    ready.drain.do_send(drain::Settle::Nack {
                        presence_id: ready.presence_id,
                        message_id,
                        delay,
                    });
                }
            }
            ClientFrame::InProgress(p) => {
                if let Ok(message_id) = p.broker_message_id.parse() {
                    ready.drain.do_send(drain::Settle::InProgress {
                        presence_id: ready.presence_id,
                        message_id,
                    });
                }
            }
            ClientFrame::ListPeers(l) => self.list_peers(l.roles, req_id, ctx),
            ClientFrame::SetStatus { status } => {
                let Some(status) = Status::parse(&status) else {
                    return Self::reject(
                        &self.shared.metrics,
                        ctx,
                        "invalid",
                        "status must be idle, working or dnd",
                        req_id,
                    );
                };
                let presence_id = ready.presence_id;
                let registry = self.registry.clone();
                self.write_presence(
                    ctx,
                    async move |conn| queries::set_status(conn, presence_id, status).await,
                    move |_| {
                        registry.do_send(registry::Changed::Status { presence_id });
                    },
                );
            }
            ClientFrame::SetSummary { summary } => {
                if let Some(Err(e)) = summary
                    .as_deref()
                    .map(|s| protocol::check_text("summary", s, bounds::SUMMARY))
                {
                    return Self::reject(&self.shared.metrics, ctx, "invalid", e, req_id);
                }
                let presence_id = ready.presence_id;
                self.write_presence(
                    ctx,
                    async move |conn| {
                        queries::set_summary(conn, presence_id, summary.as_deref()).await
                    },
                    |_| {},
                );
            }
            ClientFrame::SetVisible { visible } => {
                let presence_id = ready.presence_id;
                let registry = self.registry.clone();
                let ack = SendAck {
                    ty: "ack",
                    id: req_id.clone().unwrap_or_default(),
                    message_id: String::new(),
                    queued: false,
                    duplicate: None,
                    recipients: None,
                    error: None,
                    req_id,
                };
                self.write_presence(
                    ctx,
                    async move |conn| queries::set_visible(conn, presence_id, visible).await,
                    move |ctx| {
                        registry.do_send(registry::Changed::Visible {
                            presence_id,
                            visible,
                        });
                        Self::send_json(ctx, &ack);
                    },
                );
            }
            ClientFrame::JoinGroup(group) => {
                if let Err(e) = protocol::check_group_name(&group.name) {
                    return Self::reject(&self.shared.metrics, ctx, "invalid", e, req_id);
                }
                ready.groups.retain(|g| g.name != group.name);
                ready.groups.push(group);
                if let Err(e) = protocol::check_groups(&ready.groups) {
                    ready.groups.pop();
                    return Self::reject(&self.shared.metrics, ctx, "invalid", e, req_id);
                }
                self.save_groups(ctx);
            }
            ClientFrame::LeaveGroup { name } => {
                ready.groups.retain(|g| g.name != name);
                self.save_groups(ctx);
            }
            ClientFrame::Kick(k) => self.kick(k, true, req_id, ctx),
            ClientFrame::Disconnect(k) => self.kick(k, false, req_id, ctx),
            ClientFrame::Hello(_) | ClientFrame::SessionHello(_) | ClientFrame::Ping => {}
        }
    }

    /// Runs one presence write, in order with this connection's frames.
    fn write_presence<F>(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        write: F,
        then: impl FnOnce(&mut ws::WebsocketContext<Self>) + 'static,
    ) where
        F: AsyncFnOnce(&mut crate::db::PgConn) -> diesel::QueryResult<()> + 'static,
    {
        let pool = self.shared.pool.clone();
        ctx.wait(
            async move {
                let mut conn = pool.get().await.map_err(|e| e.to_string())?;
                write(&mut conn).await.map_err(|e| e.to_string())
            }
            .into_actor(self)
            .map(move |result, _, ctx| match result {
                Ok(()) => then(ctx),
                Err(e) => Self::error(
                    ctx,
                    "unavailable",
                    format!("database unavailable: {e}"),
                    None,
                ),
            }),
        );
    }

    fn save_groups(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let ready = self.ready.as_ref().expect("after hello");
        let presence_id = ready.presence_id;
        let groups = ready.groups.clone();
        let json = serde_json::to_value(&groups).expect("groups serialize");
        let registry = self.registry.clone();
        self.write_presence(
            ctx,
            async move |conn| queries::set_groups(conn, presence_id, &json).await,
            move |_| {
                registry.do_send(registry::Changed::Groups {
                    presence_id,
                    groups,
                });
            },
        );
    }

    fn list_peers(
        &mut self,
        roles: Option<Vec<String>>,
        req_id: Option<String>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let ready = self.ready.as_ref().expect("after hello");
        let (mesh_id, own_member) = (ready.mesh_id, ready.member.id);
        let pool = self.shared.pool.clone();
        // `wait`, like every other database step of a session: a spawned
        // future holding a pooled connection would be paused by the next
        // `ctx.wait` while that one waits for a pooled connection, and one
        // connection's list_peers flood cannot queue more than one query.
        ctx.wait(
            async move {
                let mut conn = pool.get().await.map_err(|e| e.to_string())?;
                queries::listed_presence(&mut conn, mesh_id)
                    .await
                    .map_err(|e| e.to_string())
            }
            .into_actor(self)
            .map(move |result, _, ctx| match result {
                Err(e) => Self::error(
                    ctx,
                    "unavailable",
                    format!("database unavailable: {e}"),
                    req_id,
                ),
                Ok(rows) => {
                    let peers = rows
                        .into_iter()
                        .filter(|r| r.visible || r.member_id == own_member)
                        .filter(|r| {
                            roles
                                .as_ref()
                                .is_none_or(|roles| roles.iter().any(|x| x == r.role.as_str()))
                        })
                        .map(|r| Peer {
                            pubkey: r
                                .session_pubkey
                                .clone()
                                .unwrap_or_else(|| r.member_pubkey.clone()),
                            member_pubkey: r.member_pubkey,
                            display_name: r.display_name,
                            status: r.status.to_string(),
                            summary: r.summary,
                            groups: serde_json::from_value(r.groups).unwrap_or_default(),
                            session_id: r.session_id,
                            connected_at: protocol::iso(r.connected_at),
                            cwd: r.cwd,
                            peer_role: r.role,
                            hostname: r.hostname,
                            peer_type: r.peer_type,
                            channel: r.channel,
                            model: r.model,
                        })
                        .collect();
                    Self::send_json(
                        ctx,
                        &PeersList {
                            ty: "peers_list",
                            req_id,
                            peers,
                        },
                    );
                }
            }),
        );
    }

    fn kick(
        &mut self,
        k: protocol::KickFrame,
        skip_control_plane: bool,
        req_id: Option<String>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let ready = self.ready.as_ref().expect("after hello");
        if !ready.member.admin {
            return Self::reject(
                &self.shared.metrics,
                ctx,
                "forbidden",
                "kick and disconnect need an admin member",
                req_id,
            );
        }
        let selector = if k.all == Some(true) {
            KickSelector::All
        } else if let Some(ms) = k.stale {
            KickSelector::Stale(ms)
        } else if let Some(t) = k.target.filter(|t| !t.is_empty()) {
            KickSelector::Target(t)
        } else {
            return Self::reject(
                &self.shared.metrics,
                ctx,
                "invalid",
                "give target, all or stale",
                req_id,
            );
        };
        let msg = registry::Kick {
            mesh_id: ready.mesh_id,
            asker: ready.presence_id,
            selector,
            skip_control_plane,
        };
        ctx.wait(
            self.registry
                .send(msg)
                .into_actor(self)
                .map(move |result, _, ctx| {
                    let out = result.unwrap_or_default();
                    Self::send_json(
                        ctx,
                        &KickAck {
                            ty: if skip_control_plane {
                                "kick_ack"
                            } else {
                                "disconnect_ack"
                            },
                            kicked: out.kicked,
                            affected: out.affected,
                            skipped_control_plane: out.skipped_control_plane,
                            req_id,
                        },
                    );
                }),
        );
    }

    // -- send -------------------------------------------------------------

    /// Refusal texts after the code use the words the claudemesh daemon
    /// reads as permanent ("invalid", "unknown"): it retries any other
    /// refusal for minutes.
    fn send(&mut self, send: SendFrame, ctx: &mut ws::WebsocketContext<Self>) {
        let ready = self.ready.as_ref().expect("after hello");
        let id = send.id.clone().unwrap_or_default();
        let refuse = |ctx: &mut ws::WebsocketContext<Self>,
                      metrics: &crate::metrics::Metrics,
                      code: &'static str,
                      text: &str| {
            metrics.message_rejected(code);
            Self::send_json(ctx, &SendAck::refused(id.clone(), code, text));
        };
        let metrics = &self.shared.metrics;
        let limits = &self.shared.config.limits;
        if send.nonce.len() + send.ciphertext.len() + send.target_spec.len()
            > limits.max_message_bytes
        {
            return refuse(
                ctx,
                metrics,
                "payload_too_large",
                &format!(
                    "invalid message: larger than {} bytes",
                    limits.max_message_bytes
                ),
            );
        }
        if !self.shared.send_limits.allow(&ready.member.id) {
            return refuse(ctx, metrics, "rate_limit", "too many sends, slow down");
        }
        let Some(priority) = send
            .priority
            .as_deref()
            .map_or(Some(Priority::Next), Priority::parse)
        else {
            return refuse(ctx, metrics, "invalid", "priority must be now, next or low");
        };
        let target = match Target::parse(&send.target_spec) {
            Ok(t) => t,
            Err(e) => return refuse(ctx, metrics, "invalid", &e),
        };
        if target == Target::Pubkey(ready.member.pubkey.clone()) {
            return refuse(
                ctx,
                metrics,
                "invalid",
                "cannot send to your own member pubkey",
            );
        }
        // Clients drop pushes from their own session key without an ack;
        // accepted, such a message would be pushed until dead-lettered.
        if let Some(own) = &ready.session_pubkey {
            if target == Target::Pubkey(own.clone()) {
                return refuse(
                    ctx,
                    metrics,
                    "invalid",
                    "cannot send to your own session pubkey",
                );
            }
        }
        if let Err(e) = send.check_bounds() {
            return refuse(ctx, metrics, "invalid", &e);
        }
        let cfg = self.shared.config.clone();
        let msg = NewMessage {
            id: Uuid::new_v4(),
            mesh_id: ready.mesh_id,
            sender_member_id: ready.member.id,
            sender_session_pubkey: ready.session_pubkey.clone(),
            sender_name: ready.display_name.clone(),
            target_spec: send.target_spec.clone(),
            priority,
            nonce: send.nonce,
            ciphertext: send.ciphertext,
            reply_to_id: send.reply_to_id,
            mentions: send.mentions,
            dedupe_key: send.client_message_id.clone(),
            client_message_id: send.client_message_id,
            request_fingerprint: send.request_fingerprint,
            expires_at: chrono::Utc::now() + cfg.delivery.message_ttl.chrono(),
        };
        let pool = self.shared.pool.clone();
        let sender_member = ready.member.id;
        let fut = async move {
            let mut conn = pool
                .get()
                .await
                .map_err(|_| ("unavailable", "database unavailable, retry".to_owned()))?;
            let db = |_| ("unavailable", "database unavailable, retry".to_owned());
            let recipients = target
                .recipients(&mut conn, msg.mesh_id, sender_member)
                .await
                .map_err(db)?;
            let Some(recipients) = recipients else {
                return Err((
                    "not_found",
                    format!(
                        "unknown target: no member or session {} in this mesh",
                        msg.target_spec
                    ),
                ));
            };
            let members: Vec<Uuid> = recipients.iter().map(|r| r.member_id).collect();
            let outcome = queries::store_message(
                &mut conn,
                msg,
                recipients,
                cfg.delivery.dedupe_window.get(),
            )
            .await
            .map_err(db)?;
            Ok((outcome, members))
        };
        // `wait`: this connection's sends are stored in the order sent.
        ctx.wait(fut.into_actor(self).map(move |result, act, ctx| {
            let metrics = &act.shared.metrics;
            match result {
                Ok((
                    SendOutcome::Stored {
                        message_id,
                        recipients,
                    },
                    members,
                )) => {
                    metrics.message_accepted(priority.as_str());
                    Self::send_json(
                        ctx,
                        &SendAck::queued(id, message_id.to_string(), false, recipients),
                    );
                    act.registry.do_send(registry::WakeMembers(members));
                }
                Ok((
                    SendOutcome::Duplicate {
                        message_id,
                        recipients,
                    },
                    _,
                )) => {
                    Self::send_json(
                        ctx,
                        &SendAck::queued(id, message_id.to_string(), true, recipients),
                    );
                }
                Ok((SendOutcome::KeyReused, _)) => {
                    metrics.message_rejected("idempotency_key_reused");
                    Self::send_json(
                        ctx,
                        &SendAck::refused(
                            id,
                            "idempotency_key_reused",
                            "invalid reuse: client_message_id was used for a different request",
                        ),
                    );
                }
                Ok((SendOutcome::SenderRevoked, _)) => {
                    metrics.message_rejected("forbidden");
                    Self::send_json(
                        ctx,
                        &SendAck::refused(id, "forbidden", "this member was revoked"),
                    );
                }
                Err((code, text)) => {
                    metrics.message_rejected(code);
                    Self::send_json(ctx, &SendAck::refused(id, code, &text));
                }
            }
        }));
    }
}

/// A parsed `targetSpec`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// A member's or a session's pubkey.
    Pubkey(String),
    All,
    /// `@name`: a group and its subgroups.
    Group(String),
}

impl Target {
    fn parse(spec: &str) -> Result<Target, String> {
        if spec.len() > bounds::TARGET_SPEC {
            return Err(format!(
                "targetSpec is longer than {} bytes",
                bounds::TARGET_SPEC
            ));
        }
        match spec {
            "*" | "@all" => Ok(Target::All),
            s if s.starts_with('#') => Err("#topic targets are not supported".into()),
            s if s.starts_with('@') && s.len() > 1 => Ok(Target::Group(s[1..].to_owned())),
            s if crypto::is_hex(s, 64) => Ok(Target::Pubkey(s.to_ascii_lowercase())),
            _ => Err("targetSpec must be a pubkey, *, @all or @group".into()),
        }
    }

    /// Who receives it; `None` when a pubkey target was never known here.
    async fn recipients(
        &self,
        conn: &mut crate::db::PgConn,
        mesh_id: Uuid,
        sender: Uuid,
    ) -> diesel::QueryResult<Option<Vec<Recipient>>> {
        match self {
            Target::Pubkey(pk) => {
                if let Some(m) = queries::member_by_pubkey(conn, mesh_id, pk).await? {
                    return Ok(Some(vec![Recipient {
                        member_id: m.id,
                        key: None,
                    }]));
                }
                Ok(queries::member_of_session(conn, mesh_id, pk)
                    .await?
                    .map(|member_id| {
                        vec![Recipient {
                            member_id,
                            key: Some(pk.clone()),
                        }]
                    }))
            }
            Target::All | Target::Group(_) => {
                let mut seen = std::collections::HashSet::new();
                let rows = queries::listed_presence(conn, mesh_id).await?;
                Ok(Some(
                    rows.into_iter()
                        .filter(|r| r.member_id != sender)
                        // A control-plane connection with a session key is a
                        // CLI command's throwaway connection: nothing would
                        // ever collect a delivery keyed to it.
                        .filter(|r| !(r.role == Role::ControlPlane && r.session_pubkey.is_some()))
                        .filter(|r| match self {
                            Target::Group(g) => {
                                let groups: Vec<Group> =
                                    serde_json::from_value(r.groups.clone()).unwrap_or_default();
                                groups.iter().any(|have| in_group(&have.name, g))
                            }
                            _ => true,
                        })
                        .map(|r| Recipient {
                            member_id: r.member_id,
                            key: Some(connection_key(r.session_pubkey.as_deref(), &r.session_id)),
                        })
                        .filter(|r| seen.insert(r.clone()))
                        .collect(),
                ))
            }
        }
    }
}

/// Group names are hierarchical: `a/b/c` is in `a/b` and in `a`.
fn in_group(have: &str, wanted: &str) -> bool {
    have == wanted
        || (have.len() > wanted.len()
            && have.starts_with(wanted)
            && have.as_bytes()[wanted.len()] == b'/')
}

impl Actor for WsSession {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.shared.metrics.actor_started(ActorKind::Session);
        let presence = &self.shared.config.presence;
        let (every, timeout) = (presence.ping_interval.get(), presence.pong_timeout.get());
        ctx.run_interval(every, move |act, ctx| {
            if act.last_heard.elapsed() > timeout {
                tracing::info!("closing a connection silent for longer than presence.pong_timeout");
                Self::close(ctx, 1000, "pong_timeout");
                return;
            }
            ctx.ping(b"");
        });
        // Pings answer keepalive, not identity: a socket that never says
        // hello (or whose hello is still being verified, which `ctx.wait`
        // finishes first) is closed, so unauthenticated connections cannot
        // pile up.
        ctx.run_later(self.shared.config.limits.hello_timeout.get(), |act, ctx| {
            if act.ready.is_none() && act.pending_presence.is_none() {
                act.refuse(
                    ctx,
                    handshake::Refusal::new("hello_timeout", "no hello in time"),
                );
            }
        });
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        let metrics = &self.shared.metrics;
        metrics.actor_stopped(ActorKind::Session);
        if let Some(ready) = &self.ready {
            metrics.connection_closed(ready.role);
            self.registry.do_send(registry::Disconnect {
                presence_id: ready.presence_id,
            });
        } else if let Some(presence_id) = self.pending_presence {
            self.registry.do_send(registry::Disconnect { presence_id });
        }
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for WsSession {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        self.shared.metrics.actor_message(ActorKind::Session);
        let msg = match item {
            Ok(m) => m,
            Err(ws::ProtocolError::Overflow) => {
                self.shared.metrics.frame_rejected("frame_too_large");
                return Self::close(ctx, 1009, "frame too large");
            }
            Err(e) => {
                tracing::debug!(error = %e, "websocket protocol error");
                self.shared.metrics.frame_rejected("protocol_error");
                return Self::close(ctx, 1002, "protocol error");
            }
        };
        self.heard();
        match msg {
            ws::Message::Text(text) => self.on_text(&text, ctx),
            ws::Message::Ping(p) => ctx.pong(&p),
            ws::Message::Pong(_) => {}
            ws::Message::Binary(_) => Self::reject(
                &self.shared.metrics,
                ctx,
                "malformed",
                "binary frames are not supported; send JSON text frames",
                None,
            ),
            ws::Message::Continuation(_) => Self::reject(
                &self.shared.metrics,
                ctx,
                "malformed",
                "fragmented frames are not supported",
                None,
            ),
            // RFC 6455 §5.5.1: answer a close with a close. Without it the
            // client waits for the TCP connection to end instead (~1 s).
            ws::Message::Close(reason) => {
                ctx.close(reason);
                ctx.stop();
            }
            ws::Message::Nop => {}
        }
    }
}

impl Handler<Outbound> for WsSession {
    type Result = ();
    fn handle(&mut self, msg: Outbound, ctx: &mut Self::Context) {
        self.shared.metrics.actor_message(ActorKind::Session);
        if msg.deliveries {
            crate::metrics::Metrics::add(
                &self.shared.metrics.deliveries_pushed,
                msg.frames.len() as u64,
            );
        }
        let bytes = msg.bytes();
        for frame in msg.frames {
            ctx.text(frame);
        }
        self.backlog.wrote(bytes);
    }
}

impl Handler<CloseConn> for WsSession {
    type Result = ();
    fn handle(&mut self, msg: CloseConn, ctx: &mut Self::Context) {
        self.shared.metrics.actor_message(ActorKind::Session);
        Self::close(ctx, msg.code, &msg.reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_hierarchical() {
        assert!(in_group("a/b/c", "a/b"));
        assert!(in_group("a/b/c", "a"));
        assert!(in_group("a", "a"));
        assert!(!in_group("ab", "a"));
        assert!(!in_group("a", "a/b"));
        assert!(!in_group("x%", "x"));
    }

    #[test]
    fn targets_parse() {
        assert_eq!(Target::parse("*"), Ok(Target::All));
        assert_eq!(Target::parse("@all"), Ok(Target::All));
        assert_eq!(Target::parse("@a/b"), Ok(Target::Group("a/b".into())));
        assert!(Target::parse("#topic").is_err());
        assert!(Target::parse("bob").is_err());
        assert!(Target::parse(&"A".repeat(64)).is_ok());
    }
}
