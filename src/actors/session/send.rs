//! `send`: checked, routed, stored with its deliveries in one transaction,
//! and only then answered `queued:true` — after which the recipients'
//! drains are woken.

use actix::prelude::*;
use uuid::Uuid;

use super::{reply, Ctx, Io, Ready, WsSession};
use crate::actors::registry;
use crate::db::queries::{self, NewMessage, Recipient, SendOutcome};
use crate::error_code::ErrorCode;
use crate::ids::{MemberId, MeshId, Priority};
use crate::protocol::{Group, SendAck, SendFrame};
use crate::routing::{self, Listed, Target};

/// A refusal found while storing: its code and the text after it.
type Refused = (ErrorCode, String);

fn unavailable<E>(_: E) -> Refused {
    (ErrorCode::Unavailable, "database unavailable, retry".into())
}

impl Io {
    /// Refusal texts after the code use the words the claudemesh daemon
    /// reads as permanent ("invalid", "unknown"): it retries any other
    /// refusal for minutes.
    pub(super) fn send(&self, ready: &Ready, send: SendFrame, ctx: &mut Ctx) {
        let id = send.id.clone().unwrap_or_default();
        let metrics = self.metrics();
        let refuse = |ctx: &mut Ctx, code: ErrorCode, text: &str| {
            metrics.message_rejected(code);
            reply(ctx, SendAck::refused(id.clone(), code, text));
        };
        let limits = &self.shared.config.limits;
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
        let cfg = self.shared.config.clone();
        let msg = NewMessage {
            id: Uuid::new_v4(),
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
        let pool = self.shared.pool.clone();
        let sender = MemberId(ready.member.id);
        let mesh_id = ready.mesh_id;
        let fut = async move {
            let mut conn = pool.get().await.map_err(unavailable)?;
            let recipients = recipients(&mut conn, &target, mesh_id, sender)
                .await
                .map_err(unavailable)?;
            let Some(recipients) = recipients else {
                return Err((
                    ErrorCode::NotFound,
                    format!(
                        "unknown target: no member or session {} in this mesh",
                        msg.target_spec
                    ),
                ));
            };
            let members: Vec<MemberId> = recipients.iter().map(|r| MemberId(r.member_id)).collect();
            let outcome = queries::store_message(
                &mut conn,
                msg,
                recipients,
                cfg.delivery.dedupe_window.get(),
            )
            .await
            .map_err(unavailable)?;
            Ok((outcome, members))
        };
        // `wait`: this connection's sends are stored in the order sent.
        ctx.wait(
            actix::fut::wrap_future::<_, WsSession>(fut).map(move |result, act, ctx| {
                let metrics = act.io.metrics();
                let ack = match result {
                    Ok((
                        SendOutcome::Stored {
                            message_id,
                            recipients,
                        },
                        members,
                    )) => {
                        metrics.message_accepted(priority.as_str());
                        act.io.registry.do_send(registry::WakeMembers(members));
                        SendAck::stored(id, message_id.to_string(), recipients)
                    }
                    Ok((
                        SendOutcome::Duplicate {
                            message_id,
                            recipients,
                        },
                        _,
                    )) => SendAck::duplicate(id, message_id.to_string(), recipients),
                    Ok((SendOutcome::KeyReused, _)) => {
                        let code = ErrorCode::IdempotencyKeyReused;
                        metrics.message_rejected(code);
                        SendAck::refused(
                            id,
                            code,
                            "invalid reuse: client_message_id was used for a different request",
                        )
                    }
                    Ok((SendOutcome::SenderRevoked, _)) => {
                        metrics.message_rejected(ErrorCode::Forbidden);
                        SendAck::refused(id, ErrorCode::Forbidden, "this member was revoked")
                    }
                    Err((code, text)) => {
                        metrics.message_rejected(code);
                        SendAck::refused(id, code, &text)
                    }
                };
                reply(ctx, ack);
            }),
        );
    }
}

/// Who receives a send to `target`; `None` when a pubkey target was never
/// known in this mesh.
async fn recipients(
    conn: &mut crate::db::PgConn,
    target: &Target,
    mesh_id: MeshId,
    sender: MemberId,
) -> diesel::QueryResult<Option<Vec<Recipient>>> {
    let direct = |member_id: Uuid, key: Option<String>| Some(vec![Recipient { member_id, key }]);
    match target {
        Target::Pubkey(pk) => {
            if let Some(m) = queries::member_by_pubkey(conn, mesh_id.0, pk).await? {
                return Ok(direct(m.id, None));
            }
            Ok(queries::member_of_session(conn, mesh_id.0, pk)
                .await?
                .and_then(|member_id| direct(member_id, Some(pk.clone()))))
        }
        Target::All | Target::Group(_) => {
            let rows = queries::listed_presence(conn, mesh_id.0).await?;
            let groups: Vec<Vec<Group>> = rows
                .iter()
                .map(|r| serde_json::from_value(r.groups.clone()).unwrap_or_default())
                .collect();
            let listed: Vec<Listed<'_>> = rows
                .iter()
                .zip(&groups)
                .map(|(r, groups)| Listed {
                    member_id: MemberId(r.member_id),
                    role: r.role,
                    session_pubkey: r.session_pubkey.as_deref(),
                    session_id: &r.session_id,
                    groups,
                })
                .collect();
            Ok(Some(
                routing::broadcast_recipients(&listed, sender, target)
                    .into_iter()
                    .map(|r| Recipient {
                        member_id: r.member_id.0,
                        key: r.key,
                    })
                    .collect(),
            ))
        }
    }
}
