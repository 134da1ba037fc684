//! The statements behind the operator actions on meshes and members
//! ([`crate::admin`] validates input and turns database errors into its own).

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use uuid::Uuid;

use super::queries::MemberRow;
use super::schema::mesh::{member, mesh};
use crate::ids::{MemberId, MeshId};

type Conn = diesel_async::AsyncPgConnection;

pub async fn insert_mesh(conn: &mut Conn, id: MeshId, name: &str) -> QueryResult<()> {
    diesel::insert_into(mesh::table)
        .values((mesh::id.eq(id.0), mesh::name.eq(name)))
        .execute(conn)
        .await?;
    Ok(())
}

/// Fails with a unique violation when the pubkey is already a member of
/// the mesh, a foreign-key violation when the mesh is gone.
pub async fn insert_member(
    conn: &mut Conn,
    id: MemberId,
    mesh_id: MeshId,
    name: &str,
    pubkey: &str,
    admin: bool,
) -> QueryResult<()> {
    diesel::insert_into(member::table)
        .values((
            member::id.eq(id.0),
            member::mesh_id.eq(mesh_id.0),
            member::name.eq(name),
            member::pubkey.eq(pubkey),
            member::admin.eq(admin),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// Sets `revoked_at` unless already set (the first revocation's time
/// stays); `None` when no such member.
pub async fn set_member_revoked(
    conn: &mut Conn,
    mesh_id: MeshId,
    pubkey: &str,
) -> QueryResult<Option<MemberRow>> {
    diesel::update(
        member::table
            .filter(member::mesh_id.eq(mesh_id.0))
            .filter(member::pubkey.eq(pubkey)),
    )
    .set(member::revoked_at.eq(diesel::dsl::sql::<
        diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>,
    >("COALESCE(revoked_at, now())")))
    .returning(MemberRow::as_returning())
    .get_result(conn)
    .await
    .optional()
}

/// A mesh's members, oldest first, revoked ones included.
pub async fn members_of_mesh(conn: &mut Conn, mesh_id: MeshId) -> QueryResult<Vec<MemberRow>> {
    member::table
        .filter(member::mesh_id.eq(mesh_id.0))
        .order((member::created_at, member::id))
        .select(MemberRow::as_select())
        .load(conn)
        .await
}

/// Whether the mesh exists (the operator commands' first check).
pub async fn mesh_exists(conn: &mut Conn, mesh_id: MeshId) -> QueryResult<bool> {
    let found: Option<Uuid> = mesh::table
        .find(mesh_id.0)
        .select(mesh::id)
        .first(conn)
        .await
        .optional()?;
    Ok(found.is_some())
}
