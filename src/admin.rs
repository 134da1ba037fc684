//! Operator actions on meshes and members, shared by the CLI and the tests.
//!
//! They work on any connection to the broker's database, whether or not a
//! broker is running. Results are `Serialize` because the CLI prints them
//! as `--json`.

use chrono::{DateTime, Utc};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::AsyncPgConnection;
use serde::Serialize;

use crate::crypto;
use crate::db::admin as db;
use crate::db::queries::MemberRow;
use crate::ids::{MemberId, MeshId};

/// Names are 1 to this many characters (the schema's CHECK).
pub const MAX_NAME_CHARS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{what} name must be 1 to {MAX_NAME_CHARS} characters, got {len}")]
    InvalidName { what: &'static str, len: usize },
    #[error("public key {0:?} is not 64 hex characters (an ed25519 public key)")]
    InvalidPubkey(String),
    #[error("mesh {0} not found")]
    MeshNotFound(MeshId),
    #[error("member with pubkey {pubkey} already exists in mesh {mesh_id}")]
    AlreadyMember { mesh_id: MeshId, pubkey: String },
    #[error("no member with pubkey {pubkey} in mesh {mesh_id}")]
    MemberNotFound { mesh_id: MeshId, pubkey: String },
    #[error("database query failed: {0}")]
    Db(#[from] DieselError),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mesh {
    pub id: MeshId,
    pub name: String,
}

/// A member just added. `secret_key` is set only when the broker generated
/// the key pair, and is never stored: this is the one chance to keep it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewMember {
    pub id: MemberId,
    pub mesh_id: MeshId,
    pub name: String,
    pub pubkey: String,
    pub admin: bool,
    /// libsodium layout, 128 hex chars (seed then public key).
    pub secret_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub id: MemberId,
    pub mesh_id: MeshId,
    pub name: String,
    pub pubkey: String,
    pub admin: bool,
    pub created_at: DateTime<Utc>,
    /// Set once revoked; a revoked member can no longer say hello.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// The broker's own member row, as operators see it.
impl From<MemberRow> for Member {
    fn from(r: MemberRow) -> Self {
        Member {
            id: MemberId(r.id),
            mesh_id: MeshId(r.mesh_id),
            name: r.name,
            pubkey: r.pubkey,
            admin: r.admin,
            created_at: r.created_at,
            revoked_at: r.revoked_at,
        }
    }
}

pub async fn create_mesh(conn: &mut AsyncPgConnection, name: &str) -> Result<Mesh, AdminError> {
    check_name("mesh", name)?;
    let id = MeshId::new();
    db::insert_mesh(conn, id, name).await?;
    Ok(Mesh {
        id,
        name: name.to_owned(),
    })
}

/// Adds a member with `pubkey`, or with a fresh key pair when `pubkey` is
/// `None` (its secret key is returned once).
pub async fn add_member(
    conn: &mut AsyncPgConnection,
    mesh_id: MeshId,
    name: &str,
    pubkey: Option<&str>,
    admin: bool,
) -> Result<NewMember, AdminError> {
    check_name("member", name)?;
    let (pubkey, secret_key) = match pubkey {
        Some(given) => (normalize_pubkey(given)?, None),
        None => {
            let (public, secret) = crypto::generate_keypair();
            (public, Some(secret))
        }
    };
    ensure_mesh(conn, mesh_id).await?;
    let id = MemberId::new();
    let inserted = db::insert_member(conn, id, mesh_id, name, &pubkey, admin).await;
    match inserted {
        Ok(()) => Ok(NewMember {
            id,
            mesh_id,
            name: name.to_owned(),
            pubkey,
            admin,
            secret_key,
        }),
        Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => {
            Err(AdminError::AlreadyMember { mesh_id, pubkey })
        }
        // The mesh was deleted between the check and the insert.
        Err(DieselError::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, _)) => {
            Err(AdminError::MeshNotFound(mesh_id))
        }
        Err(e) => Err(e.into()),
    }
}

/// Marks a member revoked. Revoking again keeps the first `revoked_at`.
pub async fn revoke_member(
    conn: &mut AsyncPgConnection,
    mesh_id: MeshId,
    pubkey: &str,
) -> Result<Member, AdminError> {
    let pubkey = normalize_pubkey(pubkey)?;
    ensure_mesh(conn, mesh_id).await?;
    let row = db::set_member_revoked(conn, mesh_id, &pubkey).await?;
    row.map(Member::from)
        .ok_or(AdminError::MemberNotFound { mesh_id, pubkey })
}

/// A mesh's members, oldest first, revoked ones included.
pub async fn list_members(
    conn: &mut AsyncPgConnection,
    mesh_id: MeshId,
) -> Result<Vec<Member>, AdminError> {
    ensure_mesh(conn, mesh_id).await?;
    let rows = db::members_of_mesh(conn, mesh_id).await?;
    Ok(rows.into_iter().map(Member::from).collect())
}

async fn ensure_mesh(conn: &mut AsyncPgConnection, mesh_id: MeshId) -> Result<(), AdminError> {
    if db::mesh_exists(conn, mesh_id).await? {
        Ok(())
    } else {
        Err(AdminError::MeshNotFound(mesh_id))
    }
}

fn check_name(what: &'static str, name: &str) -> Result<(), AdminError> {
    let len = name.chars().count();
    if (1..=MAX_NAME_CHARS).contains(&len) {
        Ok(())
    } else {
        Err(AdminError::InvalidName { what, len })
    }
}

/// 64 hex chars of either case, returned lowercase as the schema stores it.
pub fn normalize_pubkey(given: &str) -> Result<String, AdminError> {
    let trimmed = given.trim();
    if crypto::is_hex(trimmed, 64) {
        Ok(trimmed.to_ascii_lowercase())
    } else {
        Err(AdminError::InvalidPubkey(given.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pubkeys_are_lowercased_and_checked() {
        let key = "AB".repeat(32);
        assert_eq!(normalize_pubkey(&key).unwrap(), "ab".repeat(32));
        assert!(matches!(
            normalize_pubkey("abc"),
            Err(AdminError::InvalidPubkey(_))
        ));
        assert!(normalize_pubkey(&"g".repeat(64)).is_err());
    }

    #[test]
    fn names_are_counted_in_characters() {
        assert!(check_name("mesh", "").is_err());
        assert!(check_name("mesh", &"é".repeat(256)).is_ok());
        let err = check_name("mesh", &"x".repeat(257)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "mesh name must be 1 to 256 characters, got 257"
        );
    }

    /// Every action against a real (embedded, throwaway) database.
    #[test]
    fn actions_against_a_real_database() {
        use diesel_async::AsyncConnection;

        let Some(cluster) = crate::db::embedded::Throwaway::start() else {
            return;
        };
        let pg = &cluster.pg;
        cluster.block_on(async {
            crate::db::migrate(&pg.url()).await.unwrap();
            let conn = &mut AsyncPgConnection::establish(&pg.url()).await.unwrap();

            assert!(matches!(
                create_mesh(conn, "").await,
                Err(AdminError::InvalidName { .. })
            ));
            let mesh = create_mesh(conn, "demo").await.unwrap();
            let generated = add_member(conn, mesh.id, "alice", None, true)
                .await
                .unwrap();
            let secret = generated.secret_key.clone().unwrap();
            let key = crypto::parse_secret_key(&secret).unwrap();
            assert_eq!(crypto::public_hex(&key), generated.pubkey);

            let (bob_pub, _) = crypto::generate_keypair();
            let bob = add_member(conn, mesh.id, "bob", Some(&bob_pub.to_uppercase()), false)
                .await
                .unwrap();
            assert_eq!(bob.pubkey, bob_pub);
            assert_eq!(bob.secret_key, None);
            let again = add_member(conn, mesh.id, "bob2", Some(&bob_pub), false).await;
            assert!(
                matches!(again, Err(AdminError::AlreadyMember { .. })),
                "{again:?}"
            );
            let nowhere = add_member(conn, MeshId::new(), "x", Some(&bob_pub), false).await;
            assert!(
                matches!(nowhere, Err(AdminError::MeshNotFound(_))),
                "{nowhere:?}"
            );

            let revoked = revoke_member(conn, mesh.id, &bob_pub).await.unwrap();
            let first_at = revoked.revoked_at.expect("revoked_at set");
            let twice = revoke_member(conn, mesh.id, &bob_pub).await.unwrap();
            assert_eq!(twice.revoked_at, Some(first_at));
            let (stranger, _) = crypto::generate_keypair();
            assert!(matches!(
                revoke_member(conn, mesh.id, &stranger).await,
                Err(AdminError::MemberNotFound { .. })
            ));

            let members = list_members(conn, mesh.id).await.unwrap();
            let names: Vec<_> = members
                .iter()
                .map(|m| (m.name.as_str(), m.admin, m.revoked_at.is_some()))
                .collect();
            assert_eq!(names, [("alice", true, false), ("bob", false, true)]);
            let json = serde_json::to_value(&generated).unwrap();
            for key in ["id", "mesh_id", "name", "pubkey", "admin", "secret_key"] {
                assert!(json.get(key).is_some(), "{key} missing from {json}");
            }
        });
    }
}
