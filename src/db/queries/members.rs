//! Member lookups and hello replay protection (the handshake).

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use uuid::Uuid;

use super::common::Conn;
use crate::db::schema::mesh::{hello_seen, member};

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

pub async fn member_by_pubkey(
    conn: &mut Conn,
    mesh_id: Uuid,
    pubkey: &str,
) -> QueryResult<Option<MemberRow>> {
    member::table
        .filter(member::mesh_id.eq(mesh_id))
        .filter(member::pubkey.eq(pubkey))
        .select(MemberRow::as_select())
        .first(conn)
        .await
        .optional()
}

/// Records an accepted hello signature; false when it was already seen
/// (a replay).
pub async fn record_hello(conn: &mut Conn, signature: &str) -> QueryResult<bool> {
    let inserted = diesel::insert_into(hello_seen::table)
        .values(hello_seen::signature.eq(signature))
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    Ok(inserted == 1)
}
