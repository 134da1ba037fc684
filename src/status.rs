//! `meshbroker status`: what a running cluster looks like, read from the
//! database alone, so it answers with no broker running (then every node
//! shows as dead or silent): nodes, live connections by mesh and role, the
//! queue by state, the oldest undelivered delivery, dead letters by mesh.

use diesel::sql_types::{
    BigInt, Bool, Double, Integer, Nullable, Text, Timestamptz, Uuid as SqlUuid,
};
use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::Serialize;

use crate::db::queries;

/// One broker process of the cluster (`mesh.node`).
#[derive(Debug, Serialize, QueryableByName)]
pub struct Node {
    #[diesel(sql_type = SqlUuid)]
    pub id: uuid::Uuid,
    #[diesel(sql_type = Text)]
    pub listen: String,
    #[diesel(sql_type = Text)]
    pub hostname: String,
    #[diesel(sql_type = Integer)]
    pub pid: i32,
    #[diesel(sql_type = Text)]
    pub version: String,
    #[diesel(sql_type = Timestamptz)]
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// Seconds since its last heartbeat.
    #[diesel(sql_type = Double)]
    pub heartbeat_age_s: f64,
    #[diesel(sql_type = Bool)]
    pub alive: bool,
    #[diesel(sql_type = Bool)]
    pub leader: bool,
}

/// Live connections of one mesh with one role.
#[derive(Debug, Serialize, QueryableByName)]
pub struct Connections {
    #[diesel(sql_type = SqlUuid)]
    pub mesh_id: uuid::Uuid,
    #[diesel(sql_type = Text)]
    pub mesh: String,
    #[diesel(sql_type = Text)]
    pub role: String,
    #[diesel(sql_type = BigInt)]
    pub connections: i64,
}

/// Dead letters of one mesh.
#[derive(Debug, Serialize, QueryableByName)]
pub struct DeadLetters {
    #[diesel(sql_type = SqlUuid)]
    pub mesh_id: uuid::Uuid,
    #[diesel(sql_type = Text)]
    pub mesh: String,
    #[diesel(sql_type = BigInt)]
    pub dead_letters: i64,
}

/// The undelivered queue.
#[derive(Debug, Serialize)]
pub struct Queue {
    pub pending: i64,
    pub claimed: i64,
    pub dead: i64,
    /// Age of the oldest delivery neither delivered nor dead, in seconds.
    pub oldest_undelivered_s: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub nodes: Vec<Node>,
    pub connections: Vec<Connections>,
    pub queue: Queue,
    pub dead_letters: Vec<DeadLetters>,
}

/// Reads the status (a handful of small statements).
pub async fn read(conn: &mut AsyncPgConnection) -> diesel::QueryResult<Status> {
    #[derive(QueryableByName)]
    struct Oldest {
        #[diesel(sql_type = Nullable<Double>)]
        age: Option<f64>,
    }
    let nodes = diesel::sql_query(
        "WITH leader AS (SELECT id FROM mesh.node WHERE dead_at IS NULL
                          ORDER BY started_at, id LIMIT 1)
         SELECT n.id, n.listen, n.hostname, n.pid, n.version, n.started_at,
                extract(epoch FROM now() - n.heartbeat_at)::float8 AS heartbeat_age_s,
                n.dead_at IS NULL AS alive,
                n.id IN (SELECT id FROM leader) AS leader
           FROM mesh.node n ORDER BY n.dead_at IS NOT NULL, n.started_at, n.id",
    )
    .load(conn)
    .await?;
    let connections = diesel::sql_query(
        "SELECT m.id AS mesh_id, m.name AS mesh, p.role, count(*) AS connections
           FROM mesh.presence p JOIN mesh.mesh m ON m.id = p.mesh_id
          WHERE p.disconnected_at IS NULL
          GROUP BY m.id, m.name, p.role ORDER BY m.name, m.id, p.role",
    )
    .load(conn)
    .await?;
    let dead_letters = diesel::sql_query(
        "SELECT m.id AS mesh_id, m.name AS mesh, count(*) AS dead_letters
           FROM mesh.message_queue q JOIN mesh.mesh m ON m.id = q.mesh_id
          WHERE q.dead_at IS NOT NULL AND q.delivered_at IS NULL
          GROUP BY m.id, m.name ORDER BY m.name, m.id",
    )
    .load(conn)
    .await?;
    let depth = queries::queue_depth(conn).await?;
    let oldest: Oldest = diesel::sql_query(
        "SELECT extract(epoch FROM now() - min(created_at))::float8 AS age
           FROM mesh.message_queue WHERE delivered_at IS NULL AND dead_at IS NULL",
    )
    .get_result(conn)
    .await?;
    Ok(Status {
        nodes,
        connections,
        queue: Queue {
            pending: depth.pending,
            claimed: depth.claimed,
            dead: depth.dead,
            oldest_undelivered_s: oldest.age,
        },
        dead_letters,
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let live = self.nodes.iter().filter(|n| n.alive).count();
        writeln!(
            f,
            "nodes         {live} live, {} dead",
            self.nodes.len() - live
        )?;
        for n in &self.nodes {
            writeln!(
                f,
                "  {}  {:<21}  {}  pid {}  v{}  {}{}",
                n.id,
                n.listen,
                n.hostname,
                n.pid,
                n.version,
                if n.alive {
                    format!("heartbeat {:.1} s ago", n.heartbeat_age_s)
                } else {
                    "dead".to_owned()
                },
                if n.leader { "  leader" } else { "" }
            )?;
        }
        let total: i64 = self.connections.iter().map(|c| c.connections).sum();
        writeln!(f, "connections   {total} live")?;
        for c in &self.connections {
            writeln!(f, "  {:<20}  {:<14}  {}", c.mesh, c.role, c.connections)?;
        }
        let q = &self.queue;
        writeln!(
            f,
            "queue         {} pending, {} claimed, {} dead",
            q.pending, q.claimed, q.dead
        )?;
        match q.oldest_undelivered_s {
            Some(age) => writeln!(f, "oldest        {age:.1} s undelivered")?,
            None => writeln!(f, "oldest        nothing undelivered")?,
        }
        let dead: i64 = self.dead_letters.iter().map(|d| d.dead_letters).sum();
        write!(f, "dead letters  {dead}")?;
        for d in &self.dead_letters {
            write!(f, "\n  {:<20}  {}", d.mesh, d.dead_letters)?;
        }
        Ok(())
    }
}
