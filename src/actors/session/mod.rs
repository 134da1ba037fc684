//! The session actor: one per WebSocket connection, tagged with its
//! [`Role`] once its hello is accepted.
//!
//! This file holds the transport: the actor's life (heartbeat, hello
//! timeout, deregistration whatever stopped it), WebSocket messages, and
//! what other actors send it ([`Outbound`], [`CloseConn`]). The frames are
//! handled by concern:
//! - [`dispatch`]: decoding, refusals, and routing each frame to its handler;
//! - [`hello`]: verifying the hello, writing the presence row, registering;
//! - [`send`]: storing a `send` before it is acknowledged;
//! - [`presence`]: status, summary, visibility, groups and `list_peers`;
//! - [`kick`]: an admin's `kick` / `disconnect`.

mod dispatch;
mod hello;
mod kick;
mod pipeline;
mod presence;
mod send;

use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use actix_web_actors::ws;

use super::backlog::Backlog;
use super::conn::{CloseConn, Outbound};
use super::drain::Drain;
use super::registry::{self, Registry};
use super::writer::Writer;
use super::Shared;
use crate::db::queries::MemberRow;
use crate::error_code::ErrorCode;
use crate::ids::{MeshId, PresenceId, Role};
use crate::metrics::{ActorKind, Metrics};
use crate::protocol::{ErrorFrame, Group, ServerFrame};

/// Where a connection is in its life.
enum State {
    /// No hello accepted yet. `verifying` holds the presence id of a hello
    /// whose database checks are running: if the connection stops before
    /// the answer, the registry may still have registered it.
    AwaitingHello { verifying: Option<PresenceId> },
    /// The hello was accepted.
    Ready(Box<Ready>),
}

/// What the connection is once its hello was accepted.
struct Ready {
    presence_id: PresenceId,
    mesh_id: MeshId,
    member: MemberRow,
    role: Role,
    session_pubkey: Option<String>,
    display_name: String,
    /// Its groups, as last written to its presence row.
    groups: Vec<Group>,
    drain: Addr<Drain>,
    /// Its sends waiting for the writer.
    pipeline: pipeline::Pipeline,
}

/// What every handler of the connection uses, whatever its state.
struct Io {
    shared: Arc<Shared>,
    registry: Addr<Registry>,
    writer: Addr<Writer>,
    /// Last frame or pong from the client.
    last_heard: Instant,
    /// The same, as unix millis, for the registry's `kick stale`.
    last_seen: Arc<AtomicI64>,
    /// Pushes handed to this session and not yet on their way out.
    backlog: Arc<Backlog>,
    /// The client's address, as the source rules see it.
    client: Option<IpAddr>,
}

type Ctx = ws::WebsocketContext<WsSession>;

pub struct WsSession {
    io: Io,
    state: State,
}

impl WsSession {
    pub fn new(
        shared: Arc<Shared>,
        registry: Addr<Registry>,
        writer: Addr<Writer>,
        backlog: Arc<Backlog>,
        client: Option<IpAddr>,
    ) -> Self {
        WsSession {
            io: Io {
                shared,
                registry,
                writer,
                last_heard: Instant::now(),
                last_seen: Arc::new(AtomicI64::new(chrono::Utc::now().timestamp_millis())),
                backlog,
                client,
            },
            state: State::AwaitingHello { verifying: None },
        }
    }

    fn heard(&mut self) {
        self.io.last_heard = Instant::now();
        self.io
            .last_seen
            .store(chrono::Utc::now().timestamp_millis(), Relaxed);
    }
}

impl Io {
    fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }
}

/// Writes one frame.
fn reply(ctx: &mut Ctx, frame: impl Into<ServerFrame>) {
    ctx.text(frame_text(frame));
}

/// One frame as the text written.
fn frame_text(frame: impl Into<ServerFrame>) -> String {
    frame.into().to_text()
}

/// Writes an `error` frame.
fn error(ctx: &mut Ctx, code: ErrorCode, message: impl Into<String>, req_id: Option<String>) {
    reply(ctx, ErrorFrame::new(code, message, req_id));
}

/// Refuses one frame with an error frame (the connection stays open),
/// counted in `meshbroker_frames_rejected_total{reason=code}`.
fn reject(
    metrics: &Metrics,
    ctx: &mut Ctx,
    code: ErrorCode,
    message: impl Into<String>,
    req_id: Option<String>,
) {
    metrics.frame_rejected(code);
    error(ctx, code, message, req_id);
}

/// Closes the connection with a close code and reason.
fn close(ctx: &mut Ctx, code: u16, reason: &str) {
    ctx.close(Some(ws::CloseReason {
        code: ws::CloseCode::from(code),
        description: Some(reason.to_owned()),
    }));
    ctx.stop();
}

/// Refuses a hello: error frame, then close with the code's close code;
/// counted, and kept among the status page's recent refusals.
fn refuse(io: &Io, ctx: &mut Ctx, refusal: crate::handshake::Refusal) {
    io.metrics()
        .hello_refused(refusal.code, &refusal.message, io.client);
    error(ctx, refusal.code, refusal.message, None);
    close(ctx, refusal.code.close_code(), refusal.code.as_str());
}

impl Actor for WsSession {
    type Context = Ctx;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.io.metrics().actor_started(ActorKind::Session);
        let presence = &self.io.shared.config().presence;
        let (every, timeout) = (presence.ping_interval.get(), presence.pong_timeout.get());
        ctx.run_interval(every, move |act, ctx| {
            if act.io.last_heard.elapsed() > timeout {
                tracing::info!("closing a connection silent for longer than presence.pong_timeout");
                close(ctx, 1000, "pong_timeout");
                return;
            }
            ctx.ping(b"");
        });
        // Pings answer keepalive, not identity: a socket that never says
        // hello (or whose hello is still being verified, which `ctx.wait`
        // finishes first) is closed, so unauthenticated connections cannot
        // pile up.
        let hello_timeout = self.io.shared.config().limits.hello_timeout.get();
        ctx.run_later(hello_timeout, |act, ctx| {
            if let State::AwaitingHello { verifying: None } = act.state {
                refuse(
                    &act.io,
                    ctx,
                    crate::handshake::Refusal::new(ErrorCode::HelloTimeout, "no hello in time"),
                );
            }
        });
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        let metrics = self.io.metrics();
        metrics.actor_stopped(ActorKind::Session);
        let presence_id = match &self.state {
            State::Ready(ready) => {
                metrics.connection_closed(ready.role);
                ready.presence_id
            }
            State::AwaitingHello {
                verifying: Some(presence_id),
            } => *presence_id,
            State::AwaitingHello { verifying: None } => return,
        };
        self.io
            .registry
            .do_send(registry::Disconnect { presence_id });
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for WsSession {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        self.io.metrics().actor_message(ActorKind::Session);
        let msg = match item {
            Ok(m) => m,
            Err(ws::ProtocolError::Overflow) => {
                let code = ErrorCode::FrameTooLarge;
                self.io.metrics().frame_rejected(code);
                return close(ctx, code.close_code(), "frame too large");
            }
            Err(e) => {
                tracing::debug!(error = %e, "websocket protocol error");
                let code = ErrorCode::ProtocolError;
                self.io.metrics().frame_rejected(code);
                return close(ctx, code.close_code(), "protocol error");
            }
        };
        self.heard();
        match msg {
            ws::Message::Text(text) => self.on_text(&text, ctx),
            ws::Message::Ping(p) => ctx.pong(&p),
            ws::Message::Pong(_) => {}
            ws::Message::Binary(_) => reject(
                self.io.metrics(),
                ctx,
                ErrorCode::Malformed,
                "binary frames are not supported; send JSON text frames",
                None,
            ),
            ws::Message::Continuation(_) => reject(
                self.io.metrics(),
                ctx,
                ErrorCode::Malformed,
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
        let metrics = self.io.metrics();
        metrics.actor_message(ActorKind::Session);
        let bytes = msg.bytes();
        match msg {
            Outbound::Deliveries(frames) => {
                Metrics::add(&metrics.deliveries_pushed, frames.len() as u64);
                for frame in frames {
                    ctx.text(frame);
                }
            }
            Outbound::System(frame) => ctx.text(frame),
        }
        self.io.backlog.wrote(bytes);
    }
}

impl Handler<CloseConn> for WsSession {
    type Result = ();
    fn handle(&mut self, CloseConn(reason): CloseConn, ctx: &mut Self::Context) {
        self.io.metrics().actor_message(ActorKind::Session);
        close(ctx, reason.code(), reason.reason());
    }
}
