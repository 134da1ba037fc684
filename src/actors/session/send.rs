//! `send`: checked, routed and handed to the writer, which stores it with
//! its deliveries and answers after its batch commits; only then is it
//! answered `queued:true`. Sends are pipelined (see [`super::pipeline`]).

use actix::prelude::*;
use uuid::Uuid;

use super::{Ctx, Io, Ready, WsSession};
use crate::actors::batch::{BatchFailed, Submit};
use crate::actors::writer::{Store, Stored};
use crate::db::queries::{NewMessage, SendOutcome};
use crate::error_code::ErrorCode;
use crate::ids::{MemberId, Priority};
use crate::metrics::Metrics;
use crate::protocol::{SendAck, SendFrame};
use crate::routing::{self, Target};

impl Io {
    /// Refusal texts after the code use the words the claudemesh daemon
    /// reads as permanent ("invalid", "unknown"): it retries any other
    /// refusal for minutes.
    pub(super) fn send(&self, ready: &mut Ready, send: SendFrame, ctx: &mut Ctx) {
        let id = send.id.clone().unwrap_or_default();
        let metrics = self.metrics();
        let mut refuse = |ctx: &mut Ctx, code: ErrorCode, text: &str| {
            metrics.message_rejected(code);
            let seq = ready.pipeline.open();
            let ack = SendAck::refused(id.clone(), code, text);
            for text in ready.pipeline.fill(seq, super::frame_text(ack)) {
                ctx.text(text);
            }
        };
        let limits = &self.shared.config().limits;
        if send.nonce.len() + send.ciphertext.len() + send.target_spec.len()
            > limits.max_message_bytes
        {
            return refuse(
                ctx,
                ErrorCode::PayloadTooLarge,
                &format!(
                    "invalid message: larger than {} bytes",
                    limits.max_message_bytes
                ),
            );
        }
        if !self.shared.send_limits.allow(&ready.member.id) {
            return refuse(ctx, ErrorCode::RateLimit, "too many sends, slow down");
        }
        let Some(priority) = send
            .priority
            .as_deref()
            .map_or(Some(Priority::Next), Priority::parse)
        else {
            return refuse(ctx, ErrorCode::Invalid, "priority must be now, next or low");
        };
        let target = match Target::parse(&send.target_spec) {
            Ok(t) => t,
            Err(e) => return refuse(ctx, ErrorCode::Invalid, &e),
        };
        if let Some(why) = routing::self_target_refusal(
            &target,
            &ready.member.pubkey,
            ready.session_pubkey.as_deref(),
        ) {
            return refuse(ctx, ErrorCode::Invalid, why);
        }
        if let Err(e) = send.check_bounds() {
            return refuse(ctx, ErrorCode::Invalid, &e);
        }
        let cfg = self.shared.config();
        let msg = NewMessage {
            // Time-ordered: new rows land at the right edge of the
            // primary key's index instead of on random pages.
            id: Uuid::now_v7(),
            mesh_id: ready.mesh_id.0,
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
        let target_spec = msg.target_spec.clone();
        let store = Store {
            msg,
            target,
            sender: MemberId(ready.member.id),
        };
        let seq = ready.pipeline.open();
        let full = ready.pipeline.in_flight() >= limits.send_window as usize;
        let fut = actix::fut::wrap_future::<_, WsSession>(self.writer.send(Submit(store))).map(
            move |result, act, ctx| {
                let ack = ack_for(act.io.metrics(), id, priority, &target_spec, result);
                act.answered(seq, ack, ctx);
            },
        );
        // A full window stops this connection's reading until the newest
        // store is answered (the writer answers in order, so the others
        // are too): back-pressure through TCP instead of a refusal.
        if full {
            ctx.wait(fut);
        } else {
            ctx.spawn(fut);
        }
    }
}

/// The answer to a send, from what the writer made of it.
fn ack_for(
    metrics: &Metrics,
    id: String,
    priority: Priority,
    target_spec: &str,
    result: Result<Result<Stored, BatchFailed>, MailboxError>,
) -> SendAck {
    let refused = |code: ErrorCode, text: &str| {
        metrics.message_rejected(code);
        SendAck::refused(id.clone(), code, text)
    };
    match result {
        Ok(Ok(Stored::Outcome(SendOutcome::Stored {
            message_id,
            recipients,
        }))) => {
            metrics.message_accepted(priority.as_str());
            SendAck::stored(id, message_id.to_string(), recipients)
        }
        Ok(Ok(Stored::Outcome(SendOutcome::Duplicate {
            message_id,
            recipients,
        }))) => SendAck::duplicate(id, message_id.to_string(), recipients),
        Ok(Ok(Stored::Outcome(SendOutcome::KeyReused))) => refused(
            ErrorCode::IdempotencyKeyReused,
            "invalid reuse: client_message_id was used for a different request",
        ),
        Ok(Ok(Stored::Outcome(SendOutcome::SenderRevoked))) => {
            refused(ErrorCode::Forbidden, "this member was revoked")
        }
        Ok(Ok(Stored::UnknownTarget)) => refused(
            ErrorCode::NotFound,
            &format!("unknown target: no member or session {target_spec} in this mesh"),
        ),
        Ok(Err(_)) | Err(_) => refused(ErrorCode::Unavailable, "database unavailable, retry"),
    }
}

impl WsSession {
    /// Send `seq` was answered: write every answer now due, in order.
    fn answered(&mut self, seq: u64, ack: SendAck, ctx: &mut Ctx) {
        if let super::State::Ready(ready) = &mut self.state {
            for text in ready.pipeline.fill(seq, super::frame_text(ack)) {
                ctx.text(text);
            }
        }
    }
}
