//! The cluster's queries: this node's row and heartbeat, finding and
//! taking over dead nodes, notices to other nodes, and what a notice's ids
//! stand for. Every time comparison is the database's (`now()`), so brokers
//! with different clocks agree.

use diesel::prelude::*;
use diesel::sql_types::{Array, Bool, Double, Int4, Int8, Nullable, Text, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use uuid::Uuid;

use super::common::{secs, Conn};
use super::sweep::Subject;
use crate::db::notice::Notice;
use crate::ids::{MemberId, Role};

/// What this node says about itself in `mesh.node`.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: Uuid,
    pub listen: String,
    pub hostname: String,
    pub pid: i32,
    pub version: String,
}

/// Adds this node to the cluster, alive (again, after it was declared
/// dead and closed its sockets), and tells the live nodes at once (they
/// send notices only while they know of another node).
pub async fn register_node(conn: &mut Conn, node: &NodeInfo) -> QueryResult<()> {
    diesel::sql_query(
        "WITH me AS (
            INSERT INTO mesh.node (id, listen, hostname, pid, version) VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (id) DO UPDATE
               SET dead_at = NULL, heartbeat_at = now(), started_at = now()
            RETURNING id)
         SELECT pg_notify(mesh.node_channel(n.id), 'n')::text
           FROM mesh.node n, me WHERE n.dead_at IS NULL AND n.id <> me.id",
    )
    .bind::<SqlUuid, _>(node.id)
    .bind::<Text, _>(&node.listen)
    .bind::<Text, _>(&node.hostname)
    .bind::<Int4, _>(node.pid)
    .bind::<Text, _>(&node.version)
    .execute(conn)
    .await?;
    Ok(())
}

/// What one heartbeat learned.
#[derive(Debug, Clone, QueryableByName)]
pub struct Heartbeat {
    /// False: another node declared this one dead.
    #[diesel(sql_type = Bool)]
    pub alive: bool,
    #[diesel(sql_type = Int8)]
    pub live_nodes: i64,
    /// The oldest live node: it runs the cluster-wide housekeeping.
    #[diesel(sql_type = Nullable<SqlUuid>)]
    pub leader: Option<Uuid>,
}

/// Refreshes this node's heartbeat, unless it was declared dead.
pub async fn heartbeat(conn: &mut Conn, node: Uuid) -> QueryResult<Heartbeat> {
    diesel::sql_query(
        "WITH me AS (
            UPDATE mesh.node SET heartbeat_at = now() WHERE id = $1 AND dead_at IS NULL
            RETURNING id)
         SELECT EXISTS (SELECT 1 FROM me) AS alive,
                (SELECT count(*) FROM mesh.node WHERE dead_at IS NULL) AS live_nodes,
                (SELECT id FROM mesh.node WHERE dead_at IS NULL
                  ORDER BY started_at, id LIMIT 1) AS leader",
    )
    .bind::<SqlUuid, _>(node)
    .get_result(conn)
    .await
}

/// Declares dead every other node whose heartbeat is older than
/// `silent_for`; returns them. A row is declared once: a second node
/// running this at the same moment waits on the row lock and then finds it
/// declared.
pub async fn declare_dead(
    conn: &mut Conn,
    me: Uuid,
    silent_for: std::time::Duration,
) -> QueryResult<Vec<Uuid>> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = SqlUuid)]
        id: Uuid,
    }
    let rows: Vec<Row> = diesel::sql_query(
        "UPDATE mesh.node SET dead_at = now()
          WHERE dead_at IS NULL AND id <> $1
            AND heartbeat_at < now() - make_interval(secs => $2)
         RETURNING id",
    )
    .bind::<SqlUuid, _>(me)
    .bind::<Double, _>(secs(silent_for))
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.id).collect())
}

/// Marks this node gone (graceful shutdown): leadership passes at once.
pub async fn leave(conn: &mut Conn, node: Uuid) -> QueryResult<()> {
    diesel::sql_query("UPDATE mesh.node SET dead_at = now() WHERE id = $1")
        .bind::<SqlUuid, _>(node)
        .execute(conn)
        .await?;
    Ok(())
}

/// Deletes the rows of nodes dead for longer than `older_than`.
pub async fn forget_dead_nodes(
    conn: &mut Conn,
    older_than: std::time::Duration,
) -> QueryResult<usize> {
    diesel::sql_query("DELETE FROM mesh.node WHERE dead_at < now() - make_interval(secs => $1)")
        .bind::<Double, _>(secs(older_than))
        .execute(conn)
        .await
}

/// Where one notice item goes (see `mesh.notify_nodes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// Nodes where this member has a live connection.
    Member(Uuid),
    /// Nodes where this mesh has a live connection.
    Mesh(Uuid),
    /// The node holding this live connection.
    Presence(Uuid),
    /// This node.
    Node(Uuid),
}

impl Route {
    fn parts(self) -> (&'static str, Uuid) {
        match self {
            Route::Member(id) => ("member", id),
            Route::Mesh(id) => ("mesh", id),
            Route::Presence(id) => ("presence", id),
            Route::Node(id) => ("node", id),
        }
    }
}

/// Bytes of notice items per NOTIFY, under PostgreSQL's 8000-byte payload.
const PAYLOAD_BUDGET: usize = 7000;

/// Sends `items` to the live nodes their routes name, other than `me`
/// (`None`: any, e.g. from the command line): one notification per node
/// (per [`PAYLOAD_BUDGET`] of items), `header` first. Returns how many
/// notifications went out.
pub async fn notify_nodes(
    conn: &mut Conn,
    me: Option<Uuid>,
    header: &str,
    items: &[(Route, String)],
) -> QueryResult<u64> {
    #[derive(QueryableByName)]
    struct Sent {
        #[diesel(sql_type = Int4)]
        sent: i32,
    }
    let mut sent = 0;
    let mut start = 0;
    while start < items.len() {
        let mut end = start;
        let mut bytes = header.len();
        while end < items.len() && bytes + items[end].1.len() < PAYLOAD_BUDGET {
            bytes += items[end].1.len() + 1;
            end += 1;
        }
        let chunk = &items[start..end];
        let (routes, ids): (Vec<&str>, Vec<Uuid>) = chunk.iter().map(|(r, _)| r.parts()).unzip();
        let texts: Vec<&str> = chunk.iter().map(|(_, t)| t.as_str()).collect();
        let row: Sent = diesel::sql_query("SELECT mesh.notify_nodes($1, $2, $3, $4, $5) AS sent")
            .bind::<Nullable<SqlUuid>, _>(me)
            .bind::<Text, _>(header)
            .bind::<Array<Text>, _>(&routes)
            .bind::<Array<SqlUuid>, _>(&ids)
            .bind::<Array<Text>, _>(&texts)
            .get_result(conn)
            .await?;
        sent += row.sent.max(0) as u64;
        start = end;
    }
    Ok(sent)
}

/// Wakes these members' drains on every node where they are connected
/// (after a change no broker made, such as a requeue from the command line).
pub async fn wake_everywhere(conn: &mut Conn, members: &[Uuid]) -> QueryResult<u64> {
    let items: Vec<(Route, String)> = members
        .iter()
        .map(|&m| (Route::Member(m), Notice::Wake(MemberId(m)).encode()))
        .collect();
    notify_nodes(conn, None, "", &items).await
}

/// The members these deliveries are for.
pub async fn recipients_of(conn: &mut Conn, deliveries: &[i64]) -> QueryResult<Vec<Uuid>> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = SqlUuid)]
        recipient_member_id: Uuid,
    }
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT DISTINCT recipient_member_id FROM mesh.message_queue WHERE id = ANY($1)",
    )
    .bind::<Array<Int8>, _>(deliveries)
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.recipient_member_id).collect())
}

/// The connections `ids` as system events describe them (a notice carries
/// only their ids).
pub async fn subjects(conn: &mut Conn, ids: &[Uuid]) -> QueryResult<Vec<Subject>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    diesel::sql_query(
        "SELECT p.id, p.mesh_id, p.member_id, p.display_name,
                COALESCE(p.session_pubkey, m.pubkey) AS pubkey, p.role
           FROM mesh.presence p JOIN mesh.member m ON m.id = p.member_id
          WHERE p.id = ANY($1)",
    )
    .bind::<Array<SqlUuid>, _>(ids)
    .load(conn)
    .await
}

/// A live connection of a mesh on another node, as a kick compares it.
#[derive(Debug, Clone, QueryableByName)]
pub struct RemoteConn {
    #[diesel(sql_type = SqlUuid)]
    pub id: Uuid,
    #[diesel(sql_type = Text)]
    pub display_name: String,
    #[diesel(sql_type = Text)]
    pub member_pubkey: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub session_pubkey: Option<String>,
    #[diesel(sql_type = Text)]
    pub role: Role,
    /// Milliseconds since its node last saw a frame or pong from it, as
    /// far as its presence row tells (refreshed every ping interval).
    #[diesel(sql_type = Int8)]
    pub silent_ms: i64,
}

/// The mesh's live connections on other live nodes than `me`.
pub async fn remote_conns(
    conn: &mut Conn,
    mesh_id: Uuid,
    me: Uuid,
) -> QueryResult<Vec<RemoteConn>> {
    diesel::sql_query(
        "SELECT p.id, p.display_name, m.pubkey AS member_pubkey, p.session_pubkey, p.role,
                (extract(epoch FROM now() - p.last_seen_at) * 1000)::int8 AS silent_ms
           FROM mesh.presence p
           JOIN mesh.member m ON m.id = p.member_id
           JOIN mesh.node n ON n.id = p.broker_node_id AND n.dead_at IS NULL
          WHERE p.mesh_id = $1 AND p.disconnected_at IS NULL AND p.broker_node_id <> $2",
    )
    .bind::<SqlUuid, _>(mesh_id)
    .bind::<SqlUuid, _>(me)
    .load(conn)
    .await
}
