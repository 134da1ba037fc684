//! Presence rows: one per connection, opened at hello, closed at the end,
//! and what a connection or the status hook sets on it.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{
    Array, BigInt, Bool, Double, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid,
};
use diesel_async::RunQueryDsl;
use serde_json::Value;
use uuid::Uuid;

use super::common::{Conn, MemberRow};
use crate::db::schema::mesh::{member, presence};
use crate::ids::{NodeId, PresenceId, Role, Status};

/// A new connection's presence row, as its hello asks for it.
#[derive(Debug, Clone)]
pub struct HelloPresence {
    pub id: Uuid,
    pub session_id: String,
    pub session_pubkey: Option<String>,
    pub role: Role,
    /// `None`: the member's name.
    pub display_name: Option<String>,
    pub groups: Value,
    pub pid: Option<i64>,
    pub cwd: Option<String>,
    pub hostname: Option<String>,
    pub peer_type: Option<String>,
    pub channel: Option<String>,
    pub model: Option<String>,
    pub broker_node_id: Uuid,
}

/// What the database is asked about one hello (docs/protocol.md §2.4,
/// steps 5 to 8).
#[derive(Debug, Clone)]
pub struct HelloCheck<'a> {
    /// Recorded for replay detection; `None` when it already was.
    pub signature: Option<&'a str>,
    /// `None`: the hello's meshId is not a uuid (so no member matches).
    pub mesh_id: Option<Uuid>,
    pub member_pubkey: &'a str,
    /// The member id the hello named, lowercased.
    pub claimed_member_id: Option<String>,
    /// A plain hello naming a session key: it may not be one another
    /// member's session proved.
    pub check_session_key: bool,
    pub max_live: i64,
    /// Take the mesh's lock exclusive at once (after [`HelloOutcome::NearCap`]).
    pub exclusive: bool,
}

/// What [`open_hello`] decided.
#[derive(Debug, Clone)]
pub enum HelloOutcome {
    Replayed,
    UnknownMember,
    Revoked,
    MemberIdMismatch,
    /// The hello's session key was proven by another member's session.
    SessionKeyTaken,
    /// The mesh already has `max_live` live connections: nothing inserted.
    MeshFull,
    /// Too close to the cap to decide without the mesh's exclusive lock:
    /// ask again with `exclusive` (the signature is recorded already).
    NearCap,
    /// Inserted; `silent` when it took over a connection in its grace window.
    Opened {
        member: MemberRow,
        display_name: String,
        silent: bool,
    },
}

#[derive(QueryableByName)]
struct HelloRow {
    #[diesel(sql_type = Text)]
    outcome: String,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    member_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    member_mesh_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<Text>)]
    member_name: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    member_pubkey: Option<String>,
    #[diesel(sql_type = Nullable<Bool>)]
    member_admin: Option<bool>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    member_created_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    member_revoked_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Text>)]
    display_name: Option<String>,
}

/// Runs a hello's database checks and, when they pass, inserts its presence
/// row: one call of `mesh.open_hello` (see its migration for how the mesh's
/// connection cap holds without queuing the mesh's hellos behind one lock).
/// One round trip and one commit, instead of seven round trips and two.
pub async fn open_hello(
    conn: &mut Conn,
    check: &HelloCheck<'_>,
    row: &HelloPresence,
) -> QueryResult<HelloOutcome> {
    let r: HelloRow = diesel::sql_query(
        "SELECT * FROM mesh.open_hello($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, \
                                       $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)",
    )
    .bind::<Nullable<Text>, _>(check.signature)
    .bind::<Nullable<SqlUuid>, _>(check.mesh_id)
    .bind::<Text, _>(check.member_pubkey)
    .bind::<Nullable<Text>, _>(check.claimed_member_id.as_deref())
    .bind::<Bool, _>(check.check_session_key)
    .bind::<BigInt, _>(check.max_live)
    .bind::<Bool, _>(check.exclusive)
    .bind::<SqlUuid, _>(row.id)
    .bind::<Text, _>(&row.session_id)
    .bind::<Nullable<Text>, _>(row.session_pubkey.as_deref())
    .bind::<Text, _>(row.role)
    .bind::<Nullable<Text>, _>(row.display_name.as_deref())
    .bind::<Jsonb, _>(&row.groups)
    .bind::<Nullable<BigInt>, _>(row.pid)
    .bind::<Nullable<Text>, _>(row.cwd.as_deref())
    .bind::<Nullable<Text>, _>(row.hostname.as_deref())
    .bind::<Nullable<Text>, _>(row.peer_type.as_deref())
    .bind::<Nullable<Text>, _>(row.channel.as_deref())
    .bind::<Nullable<Text>, _>(row.model.as_deref())
    .bind::<SqlUuid, _>(row.broker_node_id)
    .get_result(conn)
    .await?;
    let silent = match r.outcome.as_str() {
        "replayed" => return Ok(HelloOutcome::Replayed),
        "unknown" => return Ok(HelloOutcome::UnknownMember),
        "revoked" => return Ok(HelloOutcome::Revoked),
        "member_id_mismatch" => return Ok(HelloOutcome::MemberIdMismatch),
        "key_taken" => return Ok(HelloOutcome::SessionKeyTaken),
        "full" => return Ok(HelloOutcome::MeshFull),
        "near_cap" => return Ok(HelloOutcome::NearCap),
        "opened" => false,
        "took_over" => true,
        other => {
            return Err(diesel::result::Error::DeserializationError(
                format!("mesh.open_hello answered {other:?}").into(),
            ))
        }
    };
    let missing =
        || diesel::result::Error::DeserializationError("mesh.open_hello: no member".into());
    let member = MemberRow {
        id: r.member_id.ok_or_else(missing)?,
        mesh_id: r.member_mesh_id.ok_or_else(missing)?,
        name: r.member_name.ok_or_else(missing)?,
        pubkey: r.member_pubkey.ok_or_else(missing)?,
        admin: r.member_admin.ok_or_else(missing)?,
        created_at: r.member_created_at.ok_or_else(missing)?,
        revoked_at: r.member_revoked_at,
    };
    Ok(HelloOutcome::Opened {
        member,
        display_name: r.display_name.ok_or_else(missing)?,
        silent,
    })
}

/// Marks many connections closed in one statement, all with the same
/// grace (`None`: none): a broker whose clients all go at once (a network
/// blip, a deploy on their side) closes thousands of rows together, and one
/// checkout and one UPDATE per row queued past the pool's checkout timeout.
pub async fn close_presences(
    conn: &mut Conn,
    ids: &[PresenceId],
    grace: Option<std::time::Duration>,
) -> QueryResult<usize> {
    let ids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
    diesel::sql_query(
        "UPDATE mesh.presence
            SET disconnected_at = now(),
                grace_until = now() + make_interval(secs => $2)
          WHERE id = ANY($1)",
    )
    .bind::<Array<SqlUuid>, _>(ids)
    .bind::<Nullable<Double>, _>(grace.map(|g| g.as_secs_f64()))
    .execute(conn)
    .await
}

pub async fn set_status(conn: &mut Conn, id: PresenceId, status: Status) -> QueryResult<()> {
    diesel::update(presence::table.find(id.0))
        .set(presence::status.eq(status))
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn set_summary(
    conn: &mut Conn,
    id: PresenceId,
    summary: Option<&str>,
) -> QueryResult<()> {
    diesel::update(presence::table.find(id.0))
        .set(presence::summary.eq(summary))
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn set_visible(conn: &mut Conn, id: PresenceId, visible: bool) -> QueryResult<()> {
    diesel::update(presence::table.find(id.0))
        .set(presence::visible.eq(visible))
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn set_groups(conn: &mut Conn, id: PresenceId, groups: &Value) -> QueryResult<()> {
    diesel::update(presence::table.find(id.0))
        .set(presence::groups.eq(groups))
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn touch_presence(conn: &mut Conn, ids: &[PresenceId]) -> QueryResult<()> {
    let ids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
    diesel::update(presence::table.filter(presence::id.eq_any(ids)))
        .set(presence::last_seen_at.eq(diesel::dsl::now))
        .execute(conn)
        .await?;
    Ok(())
}

#[derive(Debug, Clone, Queryable)]
pub struct PeerRow {
    pub id: Uuid,
    pub member_id: Uuid,
    pub member_pubkey: String,
    pub session_id: String,
    pub session_pubkey: Option<String>,
    pub role: Role,
    pub display_name: String,
    pub status: Status,
    pub summary: Option<String>,
    pub groups: Value,
    pub visible: bool,
    pub cwd: Option<String>,
    pub hostname: Option<String>,
    pub peer_type: Option<String>,
    pub channel: Option<String>,
    pub model: Option<String>,
    pub connected_at: DateTime<Utc>,
}

/// Connections of a mesh that are live or inside their grace window.
pub async fn listed_presence(conn: &mut Conn, mesh_id: Uuid) -> QueryResult<Vec<PeerRow>> {
    presence::table
        .inner_join(member::table)
        .filter(presence::mesh_id.eq(mesh_id))
        .filter(
            presence::disconnected_at
                .is_null()
                .or(presence::grace_until.gt(diesel::dsl::now)),
        )
        .order(presence::connected_at)
        .select((
            presence::id,
            presence::member_id,
            member::pubkey,
            presence::session_id,
            presence::session_pubkey,
            presence::role,
            presence::display_name,
            presence::status,
            presence::summary,
            presence::groups,
            presence::visible,
            presence::cwd,
            presence::hostname,
            presence::peer_type,
            presence::channel,
            presence::model,
            presence::connected_at,
        ))
        .load(conn)
        .await
}

/// Live `session` connections whose session id is `session_id` (the hook).
pub async fn live_sessions_by_session_id(
    conn: &mut Conn,
    session_id: &str,
) -> QueryResult<Vec<(Uuid, Status)>> {
    presence::table
        .filter(presence::session_id.eq(session_id))
        .filter(presence::role.eq(Role::Session))
        .filter(presence::disconnected_at.is_null())
        .select((presence::id, presence::status))
        .load(conn)
        .await
}

/// Live `session` connections matching a pid and/or cwd (loopback hooks only).
pub async fn live_sessions_by_process(
    conn: &mut Conn,
    pid: Option<i64>,
    cwd: Option<&str>,
) -> QueryResult<Vec<(Uuid, Status)>> {
    let mut q = presence::table
        .filter(presence::role.eq(Role::Session))
        .filter(presence::disconnected_at.is_null())
        .select((presence::id, presence::status))
        .into_boxed();
    if let Some(pid) = pid {
        q = q.filter(presence::pid.eq(pid));
    }
    if let Some(cwd) = cwd {
        q = q.filter(presence::cwd.eq(cwd));
    }
    q.load(conn).await
}

/// Marks every live presence row of broker process `node_id` closed, with
/// the takeover grace window (its shutdown, or its death seen by another).
pub async fn close_node_presence(
    conn: &mut Conn,
    node_id: NodeId,
    grace: std::time::Duration,
) -> QueryResult<usize> {
    diesel::sql_query(
        "UPDATE mesh.presence
            SET disconnected_at = now(),
                grace_until = now() + make_interval(secs => $2)
          WHERE broker_node_id = $1 AND disconnected_at IS NULL",
    )
    .bind::<SqlUuid, _>(node_id.0)
    .bind::<Double, _>(grace.as_secs_f64())
    .execute(conn)
    .await
}
