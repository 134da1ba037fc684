//! Storing many sends at once (the writer's group commit): one statement
//! per batch whatever its size (two or three more when sends carry
//! idempotency keys), each taking arrays (`unnest`) instead of one row.
//!
//! Every send's outcome is what [`super::store_message`] would have given
//! it alone, in the batch's order: sends with one idempotency key inside
//! one batch are resolved as if the later came after the earlier's commit.

use std::collections::{HashMap, HashSet};

use diesel::prelude::*;
use diesel::sql_types::{
    Array, BigInt, Double, Int4, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid,
};
use diesel_async::{AsyncConnection, RunQueryDsl};
use uuid::Uuid;

use super::cached::cached;
use super::common::{secs, Conn};
use super::messages::{NewMessage, Recipient, SendOutcome};
use crate::ids::{MeshId, Role};

/// One send of a batch, its recipients already resolved.
#[derive(Debug, Clone)]
pub struct BatchSend {
    pub msg: NewMessage,
    pub recipients: Vec<Recipient>,
}

#[derive(QueryableByName)]
struct Existing {
    #[diesel(sql_type = Int4)]
    i: i32,
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = Nullable<Text>)]
    request_fingerprint: Option<String>,
    #[diesel(sql_type = BigInt)]
    recipients: i64,
}

/// What the first send with an idempotency key came to, for the later
/// sends of the batch with the same key.
#[derive(Clone)]
struct KeyHolder {
    message_id: Uuid,
    fingerprint: Option<String>,
    recipients: u32,
}

fn follow(holder: &KeyHolder, fingerprint: &Option<String>) -> SendOutcome {
    if fingerprint.is_some() && *fingerprint != holder.fingerprint {
        return SendOutcome::KeyReused;
    }
    SendOutcome::Duplicate {
        message_id: holder.message_id,
        recipients: holder.recipients,
    }
}

/// Stores a batch of sends atomically; one outcome per send, in order. An
/// `Err` means nothing of the batch was stored. A batch without
/// idempotency keys is one statement (atomic without a transaction: two
/// round trips fewer); with keys, its statements share a transaction.
pub async fn store_batch(
    conn: &mut Conn,
    sends: &[BatchSend],
    dedupe_window: std::time::Duration,
) -> QueryResult<Vec<SendOutcome>> {
    if sends.iter().all(|s| s.msg.dedupe_key.is_none()) {
        return store_in(conn, sends, dedupe_window).await;
    }
    conn.transaction::<_, diesel::result::Error, _>(async move |conn| {
        store_in(conn, sends, dedupe_window).await
    })
    .await
}

async fn store_in(
    conn: &mut Conn,
    sends: &[BatchSend],
    dedupe_window: std::time::Duration,
) -> QueryResult<Vec<SendOutcome>> {
    {
        let n = sends.len();
        let mut outcomes: Vec<Option<SendOutcome>> = vec![None; n];

        // The first send of each (sender, key) leads; later ones follow it.
        let mut leader_of: HashMap<(Uuid, &str), usize> = HashMap::new();
        let mut followers: Vec<(usize, usize)> = Vec::new();
        let mut insert: Vec<usize> = Vec::with_capacity(n);
        for (i, s) in sends.iter().enumerate() {
            if let Some(key) = s.msg.dedupe_key.as_deref() {
                match leader_of.entry((s.msg.sender_member_id, key)) {
                    std::collections::hash_map::Entry::Occupied(e) => {
                        followers.push((i, *e.get()));
                        continue;
                    }
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(i);
                    }
                }
            }
            insert.push(i);
        }

        // Keys whose window has closed are free again (by the database's
        // clock, which stamped `created_at`).
        let (key_senders, keys): (Vec<Uuid>, Vec<&str>) = leader_of.keys().copied().unzip();
        if !keys.is_empty() {
            cached(
                "UPDATE mesh.message m SET dedupe_key = NULL
                   FROM unnest($1::uuid[], $2::text[]) AS k(sender, key)
                  WHERE m.sender_member_id = k.sender AND m.dedupe_key = k.key
                    AND m.created_at < now() - make_interval(secs => $3)",
            )
            .bind::<Array<SqlUuid>, _>(&key_senders)
            .bind::<Array<Text>, _>(&keys)
            .bind::<Double, _>(secs(dedupe_window))
            .execute(conn)
            .await?;
        }

        let Written { stored, revoked } = write(conn, sends, &insert).await?;
        // Nothing of a revoked sender is stored, followers included.
        for (i, s) in sends.iter().enumerate() {
            if revoked.contains(&s.msg.sender_member_id) {
                outcomes[i] = Some(SendOutcome::SenderRevoked);
            }
        }
        let insert: Vec<usize> = insert
            .into_iter()
            .filter(|&i| outcomes[i].is_none())
            .collect();
        let followers: Vec<(usize, usize)> = followers
            .into_iter()
            .filter(|&(i, _)| outcomes[i].is_none())
            .collect();

        // Leads whose key was already taken by a stored message.
        let taken: Vec<usize> = insert
            .iter()
            .copied()
            .filter(|&i| !stored.contains(&sends[i].msg.id))
            .collect();
        let mut holders: HashMap<usize, KeyHolder> = HashMap::new();
        if !taken.is_empty() {
            let senders: Vec<Uuid> = taken
                .iter()
                .map(|&i| sends[i].msg.sender_member_id)
                .collect();
            let keys: Vec<&str> = taken
                .iter()
                .map(|&i| sends[i].msg.dedupe_key.as_deref().unwrap_or(""))
                .collect();
            let idx: Vec<i32> = taken.iter().map(|&i| i as i32).collect();
            let existing: Vec<Existing> = cached(
                "SELECT k.i, m.id, m.request_fingerprint,
                        (SELECT count(*) FROM mesh.message_queue q WHERE q.message_id = m.id) AS recipients
                   FROM unnest($1::uuid[], $2::text[], $3::int4[]) AS k(sender, key, i)
                   JOIN mesh.message m ON m.sender_member_id = k.sender AND m.dedupe_key = k.key",
            )
            .bind::<Array<SqlUuid>, _>(&senders)
            .bind::<Array<Text>, _>(&keys)
            .bind::<Array<Int4>, _>(&idx)
            .load(conn)
            .await?;
            for e in existing {
                let i = e.i as usize;
                let holder = KeyHolder {
                    message_id: e.id,
                    fingerprint: e.request_fingerprint,
                    recipients: e.recipients as u32,
                };
                outcomes[i] = Some(follow(&holder, &sends[i].msg.request_fingerprint));
                holders.insert(i, holder);
            }
        }

        for &i in &insert {
            let s = &sends[i];
            if !stored.contains(&s.msg.id) {
                continue;
            }
            let count = s.recipients.len() as u32;
            outcomes[i] = Some(SendOutcome::Stored {
                message_id: s.msg.id,
                recipients: count,
            });
            holders.insert(
                i,
                KeyHolder {
                    message_id: s.msg.id,
                    fingerprint: s.msg.request_fingerprint.clone(),
                    recipients: count,
                },
            );
        }
        for (i, lead) in followers {
            outcomes[i] = Some(match holders.get(&lead) {
                Some(holder) => follow(holder, &sends[i].msg.request_fingerprint),
                // The lead's key was reused for another request: the
                // follower compares with what holds the key, if anything.
                None => outcomes[lead].clone().unwrap_or(SendOutcome::KeyReused),
            });
        }
        // A key that conflicted but whose holder vanished before the lookup
        // (deleted meanwhile) leaves a send without an outcome: roll back,
        // and the caller stores the batch's sends one by one.
        outcomes
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or(diesel::result::Error::RollbackTransaction)
    }
}

#[derive(QueryableByName)]
struct WrittenRow {
    /// `s`: a message stored; `r`: a revoked sender.
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
}

/// What [`write`] did.
struct Written {
    /// Messages stored, with their deliveries. A send whose idempotency key
    /// is held by a stored message is not.
    stored: HashSet<Uuid>,
    /// Senders of the batch that are revoked: nothing of theirs is stored.
    revoked: HashSet<Uuid>,
}

/// Stores the messages at `which` and their deliveries in one statement,
/// skipping revoked senders.
async fn write(conn: &mut Conn, sends: &[BatchSend], which: &[usize]) -> QueryResult<Written> {
    if which.is_empty() {
        return Ok(Written {
            stored: HashSet::new(),
            revoked: HashSet::new(),
        });
    }
    let m = |i: &usize| &sends[*i].msg;
    let col = |f: fn(&NewMessage) -> Uuid| which.iter().map(|i| f(m(i))).collect::<Vec<_>>();
    let text = |f: fn(&NewMessage) -> &str| which.iter().map(|i| f(m(i))).collect::<Vec<_>>();
    let opt =
        |f: fn(&NewMessage) -> Option<&str>| which.iter().map(|i| f(m(i))).collect::<Vec<_>>();
    let mentions: Vec<Option<&serde_json::Value>> =
        which.iter().map(|i| m(i).mentions.as_ref()).collect();
    let expires: Vec<_> = which.iter().map(|i| m(i).expires_at).collect();
    let mut senders = col(|m| m.sender_member_id);
    senders.sort_unstable();
    senders.dedup();
    // One row per delivery, in the batch's order: the queue's `id` (the
    // claim's tie-break after `created_at`, equal within one statement)
    // keeps each connection's sends in the order sent.
    let mut q_msg = Vec::new();
    let mut q_mesh = Vec::new();
    let mut q_member = Vec::new();
    let mut q_key: Vec<Option<&str>> = Vec::new();
    let mut q_priority: Vec<&str> = Vec::new();
    let mut q_expires = Vec::new();
    for &i in which {
        let s = &sends[i];
        for r in &s.recipients {
            q_msg.push(s.msg.id);
            q_mesh.push(s.msg.mesh_id);
            q_member.push(r.member_id);
            q_key.push(r.key.as_deref());
            q_priority.push(s.msg.priority.as_str());
            q_expires.push(s.msg.expires_at);
        }
    }
    let rows: Vec<WrittenRow> = cached(
        "WITH revoked AS (
            SELECT id FROM mesh.member WHERE id = ANY($16) AND revoked_at IS NOT NULL
         ), stored AS (
            INSERT INTO mesh.message
                   (id, mesh_id, sender_member_id, sender_session_pubkey, sender_name, target_spec,
                    priority, nonce, ciphertext, reply_to_id, mentions, client_message_id,
                    request_fingerprint, dedupe_key, expires_at)
            SELECT u.id, u.mesh, u.sender, u.spk, u.name, u.target, u.priority, u.nonce, u.ct,
                   u.reply, u.mentions, u.cmid, u.fp, u.dk, u.exp + (now() - $23)
              FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                          $7::text[], $8::text[], $9::text[], $10::text[], $11::jsonb[], $12::text[],
                          $13::text[], $14::text[], $15::timestamptz[]) WITH ORDINALITY
                   AS u(id, mesh, sender, spk, name, target, priority, nonce, ct, reply, mentions,
                        cmid, fp, dk, exp, ord)
             WHERE u.sender NOT IN (SELECT id FROM revoked)
             ORDER BY u.ord
            ON CONFLICT (sender_member_id, dedupe_key) DO NOTHING
            RETURNING id
         ), queued AS (
            INSERT INTO mesh.message_queue
                   (message_id, mesh_id, recipient_member_id, recipient_key, priority,
                    created_at, expires_at)
            SELECT q.m, q.mesh, q.r, q.k, q.p, now(), q.e + (now() - $23)
              FROM unnest($17::uuid[], $18::uuid[], $19::uuid[], $20::text[], $21::text[],
                          $22::timestamptz[]) WITH ORDINALITY AS q(m, mesh, r, k, p, e, ord)
             WHERE q.m IN (SELECT id FROM stored)
             ORDER BY q.ord
         )
         SELECT 's' AS kind, id FROM stored
         UNION ALL SELECT 'r', id FROM revoked",
    )
    .bind::<Array<SqlUuid>, _>(col(|m| m.id))
    .bind::<Array<SqlUuid>, _>(col(|m| m.mesh_id))
    .bind::<Array<SqlUuid>, _>(col(|m| m.sender_member_id))
    .bind::<Array<Nullable<Text>>, _>(opt(|m| m.sender_session_pubkey.as_deref()))
    .bind::<Array<Text>, _>(text(|m| &m.sender_name))
    .bind::<Array<Text>, _>(text(|m| &m.target_spec))
    .bind::<Array<Text>, _>(text(|m| m.priority.as_str()))
    .bind::<Array<Text>, _>(text(|m| &m.nonce))
    .bind::<Array<Text>, _>(text(|m| &m.ciphertext))
    .bind::<Array<Nullable<Text>>, _>(opt(|m| m.reply_to_id.as_deref()))
    .bind::<Array<Nullable<Jsonb>>, _>(mentions)
    .bind::<Array<Nullable<Text>>, _>(opt(|m| m.client_message_id.as_deref()))
    .bind::<Array<Nullable<Text>>, _>(opt(|m| m.request_fingerprint.as_deref()))
    .bind::<Array<Nullable<Text>>, _>(opt(|m| m.dedupe_key.as_deref()))
    .bind::<Array<Timestamptz>, _>(expires)
    .bind::<Array<SqlUuid>, _>(senders)
    .bind::<Array<SqlUuid>, _>(q_msg)
    .bind::<Array<SqlUuid>, _>(q_mesh)
    .bind::<Array<SqlUuid>, _>(q_member)
    .bind::<Array<Nullable<Text>>, _>(q_key)
    .bind::<Array<Text>, _>(q_priority)
    .bind::<Array<Timestamptz>, _>(q_expires)
    // The expiries were computed on this broker's clock: $23 moves them
    // onto the database's, which every cutoff compares them with.
    .bind::<Timestamptz, _>(chrono::Utc::now())
    .load(conn)
    .await?;
    let mut written = Written {
        stored: HashSet::new(),
        revoked: HashSet::new(),
    };
    for r in rows {
        if r.kind == "r" {
            written.revoked.insert(r.id);
        } else {
            written.stored.insert(r.id);
        }
    }
    Ok(written)
}

#[derive(QueryableByName)]
struct Resolved {
    #[diesel(sql_type = BigInt)]
    i: i64,
    #[diesel(sql_type = SqlUuid)]
    member_id: Uuid,
}

/// Who a batch of pubkey targets names, in two statements: a member by
/// its pubkey (member-wide), else the member that ever connected in the
/// mesh with that session pubkey (keyed to it). A `session_hello` proves
/// the key (the session signs with it); a plain `hello` only names one, so
/// any member could name another's session key there: the proven owner (a
/// `session` row) therefore wins over every hello that named the key,
/// however recent, then the newest. `None` for a pubkey never known in its
/// mesh.
pub async fn resolve_pubkeys(
    conn: &mut Conn,
    targets: &[(MeshId, &str)],
) -> QueryResult<Vec<Option<Recipient>>> {
    let mut out: Vec<Option<Recipient>> = vec![None; targets.len()];
    if targets.is_empty() {
        return Ok(out);
    }
    let meshes: Vec<Uuid> = targets.iter().map(|t| t.0 .0).collect();
    let keys: Vec<&str> = targets.iter().map(|t| t.1).collect();
    let members: Vec<Resolved> = cached(
        "SELECT t.i, m.id AS member_id
           FROM unnest($1::uuid[], $2::text[]) WITH ORDINALITY AS t(mesh, pk, i)
           JOIN mesh.member m ON m.mesh_id = t.mesh AND m.pubkey = t.pk",
    )
    .bind::<Array<SqlUuid>, _>(&meshes)
    .bind::<Array<Text>, _>(&keys)
    .load(conn)
    .await?;
    for r in members {
        out[r.i as usize - 1] = Some(Recipient {
            member_id: r.member_id,
            key: None,
        });
    }
    let rest: Vec<usize> = (0..targets.len()).filter(|&i| out[i].is_none()).collect();
    if rest.is_empty() {
        return Ok(out);
    }
    let meshes: Vec<Uuid> = rest.iter().map(|&i| targets[i].0 .0).collect();
    let keys: Vec<&str> = rest.iter().map(|&i| targets[i].1).collect();
    let sessions: Vec<Resolved> = cached(
        "SELECT DISTINCT ON (t.i) t.i, p.member_id
           FROM unnest($1::uuid[], $2::text[]) WITH ORDINALITY AS t(mesh, pk, i)
           JOIN mesh.presence p ON p.mesh_id = t.mesh AND p.session_pubkey = t.pk
          ORDER BY t.i, (p.role = $3) DESC, p.connected_at DESC",
    )
    .bind::<Array<SqlUuid>, _>(&meshes)
    .bind::<Array<Text>, _>(&keys)
    .bind::<Text, _>(Role::Session.as_str())
    .load(conn)
    .await?;
    for r in sessions {
        let i = rest[r.i as usize - 1];
        out[i] = Some(Recipient {
            member_id: r.member_id,
            key: Some(targets[i].1.to_owned()),
        });
    }
    Ok(out)
}
