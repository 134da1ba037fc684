//! Storing a send: the message and one delivery per recipient.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use serde_json::Value;
use uuid::Uuid;

use super::common::{database_now, Conn};
use crate::db::schema::mesh::{member, message, message_queue};
use crate::ids::Priority;

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = message)]
pub struct NewMessage {
    pub id: Uuid,
    pub mesh_id: Uuid,
    pub sender_member_id: Uuid,
    pub sender_session_pubkey: Option<String>,
    pub sender_name: String,
    pub target_spec: String,
    pub priority: Priority,
    pub nonce: String,
    pub ciphertext: String,
    pub reply_to_id: Option<String>,
    pub mentions: Option<Value>,
    pub client_message_id: Option<String>,
    pub request_fingerprint: Option<String>,
    pub dedupe_key: Option<String>,
    pub expires_at: DateTime<Utc>,
}

/// One recipient of a message: a member, or one of its connections by key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Recipient {
    pub member_id: Uuid,
    pub key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    Stored {
        message_id: Uuid,
        recipients: u32,
    },
    Duplicate {
        message_id: Uuid,
        recipients: u32,
    },
    KeyReused,
    /// The sender was revoked after its hello (its connections are closed
    /// by the next sweeper pass); nothing was stored.
    SenderRevoked,
}

/// Stores a message and one delivery per recipient, in one transaction,
/// honouring the sender's idempotency window.
pub async fn store_message(
    conn: &mut Conn,
    mut msg: NewMessage,
    recipients: Vec<Recipient>,
    dedupe_window: std::time::Duration,
) -> QueryResult<SendOutcome> {
    // The cutoff and the expiry on the database's clock, which every other
    // statement compares them with: the expiry was computed on this
    // broker's.
    let db_now = database_now(conn).await?;
    msg.expires_at += db_now - Utc::now();
    conn.transaction::<_, diesel::result::Error, _>(async move |conn| {
        {
            let revoked_at: Option<DateTime<Utc>> = member::table
                .find(msg.sender_member_id)
                .select(member::revoked_at)
                .first(conn)
                .await?;
            if revoked_at.is_some() {
                return Ok(SendOutcome::SenderRevoked);
            }
            if let Some(key) = &msg.dedupe_key {
                // A key whose window has closed is free again.
                let cutoff = db_now - chrono::Duration::from_std(dedupe_window).unwrap_or_default();
                diesel::update(
                    message::table
                        .filter(message::sender_member_id.eq(msg.sender_member_id))
                        .filter(message::dedupe_key.eq(key))
                        .filter(message::created_at.lt(cutoff)),
                )
                .set(message::dedupe_key.eq(None::<String>))
                .execute(conn)
                .await?;
            }
            let inserted: Option<(Uuid, DateTime<Utc>)> = diesel::insert_into(message::table)
                .values(&msg)
                .on_conflict((message::sender_member_id, message::dedupe_key))
                .do_nothing()
                .returning((message::id, message::created_at))
                .get_result(conn)
                .await
                .optional()?;
            let Some((message_id, created_at)) = inserted else {
                let (id, fingerprint): (Uuid, Option<String>) = message::table
                    .filter(message::sender_member_id.eq(msg.sender_member_id))
                    .filter(message::dedupe_key.eq(&msg.dedupe_key))
                    .select((message::id, message::request_fingerprint))
                    .first(conn)
                    .await?;
                if msg.request_fingerprint.is_some() && msg.request_fingerprint != fingerprint {
                    return Ok(SendOutcome::KeyReused);
                }
                let recipients: i64 = message_queue::table
                    .filter(message_queue::message_id.eq(id))
                    .count()
                    .get_result(conn)
                    .await?;
                return Ok(SendOutcome::Duplicate {
                    message_id: id,
                    recipients: recipients as u32,
                });
            };
            let rows: Vec<_> = recipients
                .iter()
                .map(|r| {
                    (
                        message_queue::message_id.eq(message_id),
                        message_queue::mesh_id.eq(msg.mesh_id),
                        message_queue::recipient_member_id.eq(r.member_id),
                        message_queue::recipient_key.eq(r.key.clone()),
                        message_queue::priority.eq(msg.priority),
                        message_queue::created_at.eq(created_at),
                        message_queue::expires_at.eq(msg.expires_at),
                    )
                })
                .collect();
            if !rows.is_empty() {
                diesel::insert_into(message_queue::table)
                    .values(rows)
                    .execute(conn)
                    .await?;
            }
            Ok(SendOutcome::Stored {
                message_id,
                recipients: recipients.len() as u32,
            })
        }
    })
    .await
}
