//! Hello verification, in the order `protocol.md` §2 gives: first the checks
//! that need nothing but the frame and the clock ([`verify_offline`]), then
//! those that need the database ([`verify_online`]: replay, member,
//! revocation, member id, capacity).

use crate::config::Config;
use crate::crypto;
use crate::db::queries::{self, MemberRow};
use crate::db::PgConn;
use crate::ids::Role;
use crate::protocol::{ConnectionInfo, Hello, SessionHello};

/// The longest a session attestation may reach into the future.
const MAX_ATTESTATION_MS: i64 = 24 * 3600 * 1000;

pub enum HelloKind {
    Member(Box<Hello>),
    Session(Box<SessionHello>),
}

/// A refused hello: the error code, a message, and the close code.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
    pub close_code: u16,
}

impl Refusal {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
            close_code: 1008,
        }
    }
}

/// What a hello proved offline; the database checks follow.
pub struct Claims {
    pub role: Role,
    pub mesh_id: String,
    /// The member key that signed (hello) or attested (session_hello).
    pub member_pubkey: String,
    /// The member id the client named, checked against the member's.
    pub member_id: Option<String>,
    /// True for session_hello, whose member id mismatch has its own code.
    pub attested: bool,
    pub session_pubkey: Option<String>,
    /// The signature, for replay detection.
    pub signature: String,
    pub info: ConnectionInfo,
}

/// Checks everything that needs no database.
pub fn verify_offline(kind: &HelloKind, now_ms: i64, config: &Config) -> Result<Claims, Refusal> {
    let skew_ms = config.limits.hello_skew.get().as_millis() as i64;
    let check_skew = |ts: i64| {
        if (now_ms - ts).abs() > skew_ms {
            Err(Refusal::new(
                "timestamp_skew",
                format!(
                    "timestamp is more than {} from the broker's clock",
                    config.limits.hello_skew
                ),
            ))
        } else {
            Ok(())
        }
    };
    let claims = match kind {
        HelloKind::Member(h) => {
            let session_pubkey = h.session_pubkey.clone().filter(|s| !s.is_empty());
            if session_pubkey
                .as_deref()
                .is_some_and(|s| !crypto::is_lower_hex(s, 64))
            {
                return Err(Refusal::new(
                    "bad_session_pubkey",
                    "sessionPubkey must be 64 lowercase hex chars",
                ));
            }
            check_skew(h.timestamp)?;
            if !crypto::is_hex(&h.pubkey, 64) || !crypto::is_hex(&h.signature, 128) {
                return Err(Refusal::new(
                    "malformed",
                    "pubkey must be 64 hex chars and signature 128 hex chars",
                ));
            }
            let signed = crypto::hello_message(&h.mesh_id, &h.member_id, &h.pubkey, h.timestamp);
            if !crypto::verify_hex(&h.pubkey, &signed, &h.signature) {
                return Err(Refusal::new(
                    "bad_signature",
                    "hello signature does not verify",
                ));
            }
            let role = match h.role.as_deref() {
                Some("service") => Role::Service,
                _ => Role::ControlPlane,
            };
            Claims {
                role,
                mesh_id: h.mesh_id.clone(),
                member_pubkey: h.pubkey.to_ascii_lowercase(),
                member_id: Some(h.member_id.clone()),
                attested: false,
                session_pubkey,
                signature: h.signature.to_ascii_lowercase(),
                info: h.info.clone(),
            }
        }
        HelloKind::Session(h) => {
            if !crypto::is_lower_hex(&h.session_pubkey, 64) {
                return Err(Refusal::new(
                    "bad_session_pubkey",
                    "sessionPubkey must be 64 lowercase hex chars",
                ));
            }
            check_skew(h.timestamp)?;
            let att = &h.parent_attestation;
            if !crypto::is_hex(&h.parent_member_pubkey, 64)
                || !crypto::is_hex(&h.signature, 128)
                || !crypto::is_hex(&att.signature, 128)
            {
                return Err(Refusal::new(
                    "malformed",
                    "pubkeys must be 64 hex chars and signatures 128 hex chars",
                ));
            }
            if att.session_pubkey != h.session_pubkey
                || att.parent_member_pubkey != h.parent_member_pubkey
            {
                return Err(Refusal::new(
                    "attestation_mismatch",
                    "the attestation is for another session or member",
                ));
            }
            if att.expires_at <= now_ms {
                return Err(Refusal::new(
                    "expired",
                    "the session attestation has expired",
                ));
            }
            if att.expires_at > now_ms + MAX_ATTESTATION_MS {
                return Err(Refusal::new(
                    "ttl_too_long",
                    "the session attestation reaches more than 24 h ahead",
                ));
            }
            let attested = crypto::attestation_message(
                &att.parent_member_pubkey,
                &att.session_pubkey,
                att.expires_at,
            );
            if !crypto::verify_hex(&h.parent_member_pubkey, &attested, &att.signature) {
                return Err(Refusal::new(
                    "bad_signature",
                    "attestation signature does not verify",
                ));
            }
            let signed = crypto::session_hello_message(
                &h.mesh_id,
                &h.parent_member_pubkey,
                &h.session_pubkey,
                h.timestamp,
            );
            if !crypto::verify_hex(&h.session_pubkey, &signed, &h.signature) {
                return Err(Refusal::new(
                    "bad_signature",
                    "session_hello signature does not verify",
                ));
            }
            Claims {
                role: Role::Session,
                mesh_id: h.mesh_id.clone(),
                member_pubkey: h.parent_member_pubkey.to_ascii_lowercase(),
                member_id: h.parent_member_id.clone().filter(|s| !s.is_empty()),
                attested: true,
                session_pubkey: Some(h.session_pubkey.clone()),
                signature: h.signature.to_ascii_lowercase(),
                info: h.info.clone(),
            }
        }
    };
    claims
        .info
        .check_bounds()
        .map_err(|e| Refusal::new("invalid", e))?;
    Ok(claims)
}

/// The database checks: replay, member, revocation, member id, capacity.
pub async fn verify_online(
    conn: &mut PgConn,
    claims: &Claims,
    config: &Config,
) -> Result<MemberRow, Refusal> {
    let unavailable = |e: diesel::result::Error| {
        tracing::warn!(error = %e, "hello refused: database check failed");
        Refusal::new("unavailable", "database unavailable, retry")
    };
    if !queries::record_hello(conn, &claims.signature)
        .await
        .map_err(unavailable)?
    {
        return Err(Refusal::new("replayed", "this hello was already used"));
    }
    let unknown = || Refusal::new("unauthorized", "no such member in this mesh");
    let mesh_id: uuid::Uuid = claims.mesh_id.parse().map_err(|_| unknown())?;
    let member = queries::member_by_pubkey(conn, mesh_id, &claims.member_pubkey)
        .await
        .map_err(unavailable)?
        .ok_or_else(unknown)?;
    if member.revoked_at.is_some() {
        return Err(Refusal {
            code: "revoked",
            message: "this member was revoked".into(),
            close_code: 4002,
        });
    }
    if let Some(claimed) = &claims.member_id {
        if !claimed.eq_ignore_ascii_case(&member.id.to_string()) {
            return Err(if claims.attested {
                Refusal::new(
                    "parent_member_id_mismatch",
                    "parentMemberId is not this member's id",
                )
            } else {
                Refusal::new("unauthorized", "memberId is not this member's id")
            });
        }
    }
    let live = queries::live_connections(conn, mesh_id)
        .await
        .map_err(unavailable)?;
    if live >= i64::from(config.limits.max_connections_per_mesh) {
        return Err(Refusal::new(
            "capacity",
            "this mesh has as many connections as it may",
        ));
    }
    Ok(member)
}
