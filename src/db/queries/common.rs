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
