//! Member lookups. (A hello's replay protection and member checks run in
//! one call with its presence row: `presence::open_hello`.)

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use uuid::Uuid;

use super::common::{Conn, MemberRow};
use crate::db::schema::mesh::member;

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
