//! Presence rows: one per connection, opened at hello, closed at the end,
//! and what a connection or the status hook sets on it.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::Uuid as SqlUuid;
use diesel_async::{AsyncConnection, RunQueryDsl};
use serde_json::Value;
use uuid::Uuid;

use super::common::Conn;
use crate::db::schema::mesh::{member, presence};
use crate::ids::{NodeId, PresenceId, Role, Status};

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = presence)]
pub struct NewPresence {
    pub id: Uuid,
    pub mesh_id: Uuid,
    pub member_id: Uuid,
    pub session_id: String,
    pub session_pubkey: Option<String>,
    pub role: Role,
    pub display_name: String,
    pub groups: Value,
    pub pid: Option<i64>,
    pub cwd: Option<String>,
    pub hostname: Option<String>,
    pub peer_type: Option<String>,
    pub channel: Option<String>,
    pub model: Option<String>,
    pub broker_node_id: Uuid,
}

/// What [`open_presence`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// The mesh already has `max_live` live connections: nothing inserted.
    MeshFull,
    /// Inserted; `silent` when it took over a connection in its grace window.
    Opened { silent: bool },
}

/// Inserts a new connection's presence row, unless the mesh already has
/// `max_live` live connections. If a closed connection with the same
/// identity is inside its grace window, that window ends here and the new
/// connection takes it over silently.
///
/// The count and the insert run under a per-mesh transaction lock, so
/// simultaneous hellos cannot take the mesh past its cap.
pub async fn open_presence(
    conn: &mut Conn,
    row: &NewPresence,
    max_live: i64,
) -> QueryResult<Opened> {
    let row = row.clone();
    conn.transaction::<_, diesel::result::Error, _>(async move |conn| {
        diesel::sql_query("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 0))")
            .bind::<SqlUuid, _>(row.mesh_id)
            .execute(conn)
            .await?;
        let live: i64 = presence::table
            .filter(presence::mesh_id.eq(row.mesh_id))
            .filter(presence::disconnected_at.is_null())
            .count()
            .get_result(conn)
            .await?;
        if live >= max_live {
            return Ok(Opened::MeshFull);
        }
        let in_grace = presence::table
            .filter(presence::mesh_id.eq(row.mesh_id))
            .filter(presence::grace_until.gt(diesel::dsl::now));
        let taken: Vec<Uuid> = if row.role == Role::Session {
            diesel::update(in_grace.filter(presence::role.eq(Role::Session)).filter(
                presence::session_pubkey.eq(row.session_pubkey.clone().unwrap_or_default()),
            ))
            .set(presence::grace_until.eq(None::<DateTime<Utc>>))
            .returning(presence::id)
            .get_results(conn)
            .await?
        } else {
            diesel::update(
                in_grace
                    .filter(presence::role.ne(Role::Session))
                    .filter(presence::member_id.eq(row.member_id))
                    .filter(presence::session_id.eq(&row.session_id))
                    // The replacement rule (`routing::replaces`): the same
                    // session key too, both absent or equal.
                    .filter(
                        presence::session_pubkey.is_not_distinct_from(row.session_pubkey.clone()),
                    ),
            )
            .set(presence::grace_until.eq(None::<DateTime<Utc>>))
            .returning(presence::id)
            .get_results(conn)
            .await?
        };
        diesel::insert_into(presence::table)
            .values(&row)
            .execute(conn)
            .await?;
        Ok(Opened::Opened {
            silent: !taken.is_empty(),
        })
    })
    .await
}

/// Marks a connection closed; with `grace` it stays listed (and can be
/// taken over) until then.
pub async fn close_presence(
    conn: &mut Conn,
    id: PresenceId,
    grace: Option<std::time::Duration>,
) -> QueryResult<()> {
    let grace_until = grace.map(|g| Utc::now() + chrono::Duration::from_std(g).unwrap_or_default());
    diesel::update(presence::table.find(id.0))
        .set((
            presence::disconnected_at.eq(diesel::dsl::now),
            presence::grace_until.eq(grace_until),
        ))
        .execute(conn)
        .await?;
    Ok(())
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

/// The member that ever connected in this mesh with session pubkey `key`.
///
/// A `session_hello` proves the key (the session signs with it); a plain
/// `hello` only names one, so any member could name another's session key
/// there. The proven owner therefore wins over every hello that named the
/// key, however recent.
pub async fn member_of_session(
    conn: &mut Conn,
    mesh_id: Uuid,
    key: &str,
) -> QueryResult<Option<Uuid>> {
    presence::table
        .filter(presence::mesh_id.eq(mesh_id))
        .filter(presence::session_pubkey.eq(key))
        .order((
            presence::role.eq(Role::Session).desc(),
            presence::connected_at.desc(),
        ))
        .select(presence::member_id)
        .first(conn)
        .await
        .optional()
}

/// Whether a member other than `member_id` proved session key `key` in
/// this mesh (a `session` row: only `session_hello` makes those).
pub async fn session_key_proven_by_other(
    conn: &mut Conn,
    mesh_id: Uuid,
    key: &str,
    member_id: Uuid,
) -> QueryResult<bool> {
    diesel::select(diesel::dsl::exists(
        presence::table
            .filter(presence::mesh_id.eq(mesh_id))
            .filter(presence::session_pubkey.eq(key))
            .filter(presence::role.eq(Role::Session))
            .filter(presence::member_id.ne(member_id)),
    ))
    .get_result(conn)
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

/// Marks every presence row of this broker process disconnected (shutdown).
pub async fn close_node_presence(
    conn: &mut Conn,
    node_id: NodeId,
    grace: std::time::Duration,
) -> QueryResult<usize> {
    let grace_until = Utc::now() + chrono::Duration::from_std(grace).unwrap_or_default();
    diesel::update(
        presence::table
            .filter(presence::broker_node_id.eq(node_id.0))
            .filter(presence::disconnected_at.is_null()),
    )
    .set((
        presence::disconnected_at.eq(diesel::dsl::now),
        presence::grace_until.eq(grace_until),
    ))
    .execute(conn)
    .await
}
