//! Frame dispatch: decodes each text frame, refuses what cannot be
//! decoded (in the form `docs/protocol.md` gives for each frame), and
//! hands the rest to its handler by the connection's state.

use std::time::Duration;

use super::{refuse, reject, reply, Ctx, Ready, State, WsSession};
use crate::actors::drain::{self, AckedMessage, Settlement};
use crate::error_code::ErrorCode;
use crate::handshake::{HelloKind, Refusal};
use crate::ids::MessageId;
use crate::protocol::{self, bounds, ClientFrame, DecodeError, SendAck, ServerFrame};

impl WsSession {
    pub(super) fn on_text(&mut self, text: &str, ctx: &mut Ctx) {
        let awaiting_hello = matches!(self.state, State::AwaitingHello { .. });
        let metrics = self.io.metrics();
        let request = match protocol::decode(text) {
            Ok(r) => r,
            Err(DecodeError::Malformed(m)) => {
                return reject(metrics, ctx, ErrorCode::Malformed, m, None)
            }
            // The claudemesh CLI sends frames this broker does not speak
            // (`set_stats`, `set_profile`, …) without `_reqId`; an `error`
            // without an id would resolve its oldest pending request with
            // an empty result. So those are dropped, and counted.
            Err(DecodeError::Unsupported { req_id: None, .. }) => {
                return metrics.frame_rejected(ErrorCode::Ignored)
            }
            Err(DecodeError::Unsupported {
                ty,
                req_id: Some(req_id),
            }) => {
                return reject(
                    metrics,
                    ctx,
                    ErrorCode::Unsupported,
                    format!("unsupported frame type {ty:?}"),
                    Some(req_id),
                )
            }
            Err(DecodeError::Invalid {
                ty,
                req_id,
                id,
                message,
            }) => {
                let is_hello = ty == "hello" || ty == "session_hello";
                return match ty.as_str() {
                    _ if awaiting_hello && !is_hello => reject(
                        metrics,
                        ctx,
                        ErrorCode::NoHello,
                        "must send hello first",
                        req_id,
                    ),
                    _ if awaiting_hello => {
                        refuse(&self.io, ctx, Refusal::new(ErrorCode::Malformed, message))
                    }
                    "send" => {
                        metrics.message_rejected(ErrorCode::Invalid);
                        reply(
                            ctx,
                            SendAck::refused(id.unwrap_or_default(), ErrorCode::Invalid, &message),
                        )
                    }
                    _ => reject(metrics, ctx, ErrorCode::Invalid, message, req_id),
                };
            }
        };
        let req_id = request.req_id;
        match request.frame {
            ClientFrame::Hello(h) if awaiting_hello => self.hello(HelloKind::Member(h), ctx),
            ClientFrame::SessionHello(h) if awaiting_hello => {
                self.hello(HelloKind::Session(h), ctx)
            }
            ClientFrame::Hello(_) | ClientFrame::SessionHello(_) => reject(
                metrics,
                ctx,
                ErrorCode::Invalid,
                "this connection already said hello",
                req_id,
            ),
            ClientFrame::Ping => reply(ctx, ServerFrame::pong()),
            frame => match &mut self.state {
                State::Ready(ready) => self.io.on_frame(ready, frame, req_id, ctx),
                State::AwaitingHello { .. } => reject(
                    metrics,
                    ctx,
                    ErrorCode::NoHello,
                    "must send hello first",
                    req_id,
                ),
            },
        }
    }
}

impl super::Io {
    /// A frame of a connection whose hello was accepted.
    fn on_frame(
        &self,
        ready: &mut Ready,
        frame: ClientFrame,
        req_id: Option<String>,
        ctx: &mut Ctx,
    ) {
        let metrics = self.metrics();
        match frame {
            ClientFrame::Send(send) => self.send(ready, *send, ctx),
            ClientFrame::ClientAck(a) => {
                let broker_message_id = a.broker_message_id.as_deref().and_then(|s| s.parse().ok());
                // An id no send could have stored matches nothing; one with
                // U+0000 would fail in the database and log a warning each
                // time, so it is dropped here.
                let client_message_id = a.client_message_id.filter(|c| {
                    protocol::check_text("clientMessageId", c, bounds::CLIENT_ID).is_ok()
                });
                let message = match (broker_message_id, client_message_id) {
                    (Some(id), _) => AckedMessage::Broker(MessageId(id)),
                    (None, Some(id)) => AckedMessage::Client(id),
                    (None, None) => return,
                };
                ready.drain.do_send(drain::Ack {
                    presence_id: ready.presence_id,
                    message,
                });
            }
            ClientFrame::Nack(n) => {
                let delay = match n.delay.as_deref().map(str::parse::<crate::config::Dur>) {
                    None => Duration::ZERO,
                    Some(Ok(d)) if d <= self.shared.config().delivery.message_ttl => d.get(),
                    // Longer than the message lives: it could never be
                    // pushed again, and the database cannot hold the time.
                    Some(Ok(d)) => {
                        return reject(
                            metrics,
                            ctx,
                            ErrorCode::Invalid,
                            format!("delay {d} is longer than delivery.message_ttl"),
                            req_id,
                        )
                    }
                    Some(Err(e)) => return reject(metrics, ctx, ErrorCode::Invalid, e, req_id),
                };
                self.settle(ready, &n.broker_message_id, Settlement::Nack(delay));
            }
            ClientFrame::InProgress(p) => {
                self.settle(ready, &p.broker_message_id, Settlement::InProgress)
            }
            ClientFrame::ListPeers(l) => self.list_peers(ready, l.roles, req_id, ctx),
            ClientFrame::SetStatus { status } => self.set_status(ready, &status, req_id, ctx),
            ClientFrame::SetSummary { summary } => self.set_summary(ready, summary, req_id, ctx),
            ClientFrame::SetVisible { visible } => self.set_visible(ready, visible, req_id, ctx),
            ClientFrame::JoinGroup(group) => self.join_group(ready, group, req_id, ctx),
            ClientFrame::LeaveGroup { name } => {
                ready.groups.retain(|g| g.name != name);
                self.save_groups(ready, ctx);
            }
            ClientFrame::Kick(k) => self.kick(ready, k, super::kick::KickKind::Kick, req_id, ctx),
            ClientFrame::Disconnect(k) => {
                self.kick(ready, k, super::kick::KickKind::Disconnect, req_id, ctx)
            }
            // Answered before the state is looked at.
            ClientFrame::Hello(_) | ClientFrame::SessionHello(_) | ClientFrame::Ping => {}
        }
    }

    /// A `nack` or `in_progress` naming a message by broker id; an id that
    /// is not one names nothing.
    fn settle(&self, ready: &Ready, broker_message_id: &str, how: Settlement) {
        if let Ok(message_id) = broker_message_id.parse() {
            ready.drain.do_send(drain::Settle {
                presence_id: ready.presence_id,
                message_id,
                how,
            });
        }
    }
}
