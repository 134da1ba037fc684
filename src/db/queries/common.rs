//! What the query files share, in a child of its own so that `queries`
//! (which re-exports them) and they never use each other.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use crate::db::schema::mesh::member;

pub(super) type Conn = diesel_async::AsyncPgConnection;

pub(super) fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

/// The database's clock: cutoffs compared with its timestamps are taken
/// from it, so brokers whose clocks differ agree.
pub(super) async fn database_now(conn: &mut Conn) -> QueryResult<DateTime<Utc>> {
    #[derive(QueryableByName)]
    struct Now {
        #[diesel(sql_type = diesel::sql_types::Timestamptz)]
        now: DateTime<Utc>,
    }
    let row: Now =
        diesel_async::RunQueryDsl::get_result(diesel::sql_query("SELECT now() AS now"), conn)
            .await?;
    Ok(row.now)
}

/// A member, as the member lookups and the hello (`presence::open_hello`) read it.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = member)]
pub struct MemberRow {
    pub id: Uuid,
    pub mesh_id: Uuid,
    pub name: String,
    pub pubkey: String,
    pub admin: bool,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}
