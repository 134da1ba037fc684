//! Hello verification, in the order `docs/protocol.md` §2.4 gives: first the checks
//! that need nothing but the frame and the clock ([`verify_offline`]), then
//! those that need the database, run with the presence row's insert in one
//! call ([`open`]: replay, member, revocation, member id, session key, the
//! mesh's connection cap).

use crate::config::Config;
use crate::crypto;
use crate::db::queries::{self, HelloCheck, HelloOutcome, HelloPresence, MemberRow};
use crate::db::PgConn;
use crate::error_code::ErrorCode;
use crate::ids::Role;
use crate::protocol::{ConnectionInfo, Hello, SessionHello};

/// The longest a session attestation may reach into the future.
const MAX_ATTESTATION_MS: i64 = 24 * 3600 * 1000;

pub enum HelloKind {
    Member(Box<Hello>),
    Session(Box<SessionHello>),
}

/// A refused hello: the error code (which gives the close code) and a
/// message.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
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
        // i128: a hostile timestamp such as i64::MIN must not overflow.
        if (i128::from(now_ms) - i128::from(ts)).abs() > i128::from(skew_ms) {
            Err(Refusal::new(
                ErrorCode::TimestampSkew,
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
                    ErrorCode::BadSessionPubkey,
                    "sessionPubkey must be 64 lowercase hex chars",
                ));
            }
            check_skew(h.timestamp)?;
            if !crypto::is_hex(&h.pubkey, 64) || !crypto::is_hex(&h.signature, 128) {
                return Err(Refusal::new(
                    ErrorCode::Malformed,
                    "pubkey must be 64 hex chars and signature 128 hex chars",
                ));
            }
            let signed = crypto::hello_message(&h.mesh_id, &h.member_id, &h.pubkey, h.timestamp);
            if !crypto::verify_hex(&h.pubkey, &signed, &h.signature) {
                return Err(Refusal::new(
                    ErrorCode::BadSignature,
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
                    ErrorCode::BadSessionPubkey,
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
                    ErrorCode::Malformed,
                    "pubkeys must be 64 hex chars and signatures 128 hex chars",
                ));
            }
            if att.session_pubkey != h.session_pubkey
                || att.parent_member_pubkey != h.parent_member_pubkey
            {
                return Err(Refusal::new(
                    ErrorCode::AttestationMismatch,
                    "the attestation is for another session or member",
                ));
            }
            if att.expires_at <= now_ms {
                return Err(Refusal::new(
                    ErrorCode::Expired,
                    "the session attestation has expired",
                ));
            }
            if att.expires_at > now_ms.saturating_add(MAX_ATTESTATION_MS) {
                return Err(Refusal::new(
                    ErrorCode::TtlTooLong,
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
                    ErrorCode::BadSignature,
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
                    ErrorCode::BadSignature,
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
        .map_err(|e| Refusal::new(ErrorCode::Invalid, e))?;
    Ok(claims)
}

/// A hello that passed every check: its presence row is written.
pub struct Opened {
    pub member: MemberRow,
    /// The hello's display name, else the member's name.
    pub display_name: String,
    /// It took over a closed connection inside its grace window.
    pub silent: bool,
}

/// The database checks (replay, member, revocation, member id, a plain
/// hello's session key, the mesh's connection cap) and the presence row,
/// in one call (`queries::open_hello`); a second one only when the mesh is
/// too close to its cap to decide without its exclusive lock.
pub async fn open(
    conn: &mut PgConn,
    claims: &Claims,
    row: &HelloPresence,
    max_live: i64,
) -> Result<Opened, Refusal> {
    let unavailable = |e: diesel::result::Error| {
        tracing::warn!(error = %e, "hello refused: database check failed");
        Refusal::new(ErrorCode::Unavailable, "database unavailable, retry")
    };
    let mut check = HelloCheck {
        signature: Some(&claims.signature),
        // Not a uuid: no member matches, so `unauthorized` (after the
        // signature is recorded, as for any other step-6 refusal).
        mesh_id: claims.mesh_id.parse().ok(),
        member_pubkey: &claims.member_pubkey,
        // Compared as the member's id in its canonical lowercase form: the
        // same as a case-insensitive comparison.
        claimed_member_id: claims.member_id.as_deref().map(str::to_ascii_lowercase),
        // A plain hello's sessionPubkey is unproven (nothing signs with it):
        // it may not name a key another member's session proved with
        // session_hello, or it would be listed, and send, as that session.
        check_session_key: !claims.attested && claims.session_pubkey.is_some(),
        max_live,
        exclusive: false,
    };
    loop {
        let outcome = queries::open_hello(conn, &check, row)
            .await
            .map_err(unavailable)?;
        let refusal = match outcome {
            HelloOutcome::Opened {
                member,
                display_name,
                silent,
            } => {
                return Ok(Opened {
                    member,
                    display_name,
                    silent,
                })
            }
            HelloOutcome::NearCap => {
                check.signature = None;
                check.exclusive = true;
                continue;
            }
            HelloOutcome::Replayed => {
                Refusal::new(ErrorCode::Replayed, "this hello was already used")
            }
            HelloOutcome::UnknownMember => {
                Refusal::new(ErrorCode::Unauthorized, "no such member in this mesh")
            }
            HelloOutcome::Revoked => Refusal::new(ErrorCode::Revoked, "this member was revoked"),
            HelloOutcome::MemberIdMismatch if claims.attested => Refusal::new(
                ErrorCode::ParentMemberIdMismatch,
                "parentMemberId is not this member's id",
            ),
            HelloOutcome::MemberIdMismatch => {
                Refusal::new(ErrorCode::Unauthorized, "memberId is not this member's id")
            }
            HelloOutcome::SessionKeyTaken => Refusal::new(
                ErrorCode::Unauthorized,
                "sessionPubkey belongs to another member's session",
            ),
            HelloOutcome::MeshFull => Refusal::new(
                ErrorCode::Capacity,
                "this mesh has as many connections as it may",
            ),
        };
        return Err(refusal);
    }
}

/// Hostile hellos: any tampering is refused with the contract's code, in the
/// contract's order, and nothing panics (hostile timestamps included).
#[cfg(test)]
mod hostile {
    use super::*;
    use crate::crypto;
    use crate::protocol::{decode, ClientFrame};
    use proptest::prelude::*;
    use serde_json::{json, Value};

    const NOW: i64 = 1_764_240_000_000;

    fn key(seed: u8) -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
    }

    fn hello(member: &ed25519_dalek::SigningKey, ts: i64) -> Value {
        let pubkey = crypto::public_hex(member);
        let msg = crypto::hello_message("mesh-1", "member-1", &pubkey, ts);
        json!({"type":"hello","meshId":"mesh-1","memberId":"member-1","pubkey":pubkey,
               "timestamp":ts,"signature":crypto::sign_hex(member, &msg)})
    }

    fn session_hello(
        member: &ed25519_dalek::SigningKey,
        session: &ed25519_dalek::SigningKey,
        ts: i64,
        expires: i64,
    ) -> Value {
        let parent = crypto::public_hex(member);
        let spk = crypto::public_hex(session);
        let att = crypto::attestation_message(&parent, &spk, expires);
        let msg = crypto::session_hello_message("mesh-1", &parent, &spk, ts);
        json!({"type":"session_hello","meshId":"mesh-1","parentMemberPubkey":parent,
               "sessionPubkey":spk,"parentAttestation":{"sessionPubkey":spk,
               "parentMemberPubkey":parent,"expiresAt":expires,
               "signature":crypto::sign_hex(member, &att)},
               "timestamp":ts,"signature":crypto::sign_hex(session, &msg)})
    }

    /// The refusal code of `frame` at `NOW` (`"ok"` when accepted offline;
    /// `"malformed"` when it does not even decode as a hello).
    fn verdict(frame: &Value) -> &'static str {
        let kind = match decode(&frame.to_string()) {
            Ok(r) => match r.frame {
                ClientFrame::Hello(h) => HelloKind::Member(h),
                ClientFrame::SessionHello(h) => HelloKind::Session(h),
                other => panic!("not a hello: {other:?}"),
            },
            Err(_) => return "malformed",
        };
        match verify_offline(&kind, NOW, &Config::default()) {
            Ok(_) => "ok",
            Err(r) => r.code.as_str(),
        }
    }

    /// Changes one hex digit of a string field (at a dotted path).
    fn flip(frame: &mut Value, path: &[&str], at: usize) {
        let mut v = &mut *frame;
        for p in path {
            v = &mut v[*p];
        }
        let s = v.as_str().expect("a string field").to_owned();
        let i = at % s.len();
        let c = s.as_bytes()[i];
        let swapped = if c == b'0' { '1' } else { '0' };
        let mut out = s.clone();
        out.replace_range(i..=i, &swapped.to_string());
        *v = json!(out);
    }

    #[test]
    fn genuine_hellos_pass() {
        assert_eq!(verdict(&hello(&key(1), NOW)), "ok");
        assert_eq!(
            verdict(&session_hello(&key(1), &key(2), NOW, NOW + 3_600_000)),
            "ok"
        );
    }

    #[test]
    fn extreme_timestamps_are_skew_not_a_panic() {
        for ts in [i64::MIN, i64::MIN + 1, i64::MAX, -1, 0] {
            assert_eq!(verdict(&hello(&key(1), ts)), "timestamp_skew", "{ts}");
            let frame = session_hello(&key(1), &key(2), ts, NOW + 1000);
            assert_eq!(verdict(&frame), "timestamp_skew", "{ts}");
        }
        for expires in [i64::MAX, i64::MIN] {
            let frame = session_hello(&key(1), &key(2), NOW, expires);
            let want = if expires > 0 {
                "ttl_too_long"
            } else {
                "expired"
            };
            assert_eq!(verdict(&frame), want, "{expires}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_timestamp_is_judged_by_skew_alone(ts in any::<i64>()) {
            let skew = Config::default().limits.hello_skew.get().as_millis() as i64;
            let want = if (i128::from(NOW) - i128::from(ts)).abs() <= i128::from(skew) {
                "ok"
            } else {
                "timestamp_skew"
            };
            prop_assert_eq!(verdict(&hello(&key(1), ts)), want);
        }

        #[test]
        fn a_tampered_hello_never_passes(
            field in 0usize..5,
            at in any::<usize>(),
            delta in 1i64..50_000,
        ) {
            let mut frame = hello(&key(1), NOW);
            match field {
                0 => flip(&mut frame, &["signature"], at),
                1 => flip(&mut frame, &["pubkey"], at),
                2 => frame["timestamp"] = json!(NOW - delta),
                3 => frame["meshId"] = json!(format!("mesh-{delta}")),
                _ => frame["memberId"] = json!(format!("member-{delta}")),
            }
            let v = verdict(&frame);
            // A flipped pubkey digit may leave no valid curve point: that
            // is still "does not verify".
            prop_assert_eq!(v, "bad_signature", "field {}", field);
        }

        #[test]
        fn a_tampered_session_hello_never_passes(
            field in 0usize..9,
            at in any::<usize>(),
            delta in 1i64..50_000,
        ) {
            let mut frame = session_hello(&key(1), &key(2), NOW, NOW + 3_600_000);
            let other = crypto::public_hex(&key(3));
            let want = match field {
                0 => { flip(&mut frame, &["signature"], at); "bad_signature" }
                1 => { flip(&mut frame, &["parentAttestation", "signature"], at); "bad_signature" }
                2 => { frame["parentAttestation"]["expiresAt"] = json!(NOW + 3_600_000 - delta); "bad_signature" }
                3 => { frame["parentAttestation"]["sessionPubkey"] = json!(other); "attestation_mismatch" }
                4 => { frame["parentAttestation"]["parentMemberPubkey"] = json!(other); "attestation_mismatch" }
                // Both outer and attested keys swapped consistently: the
                // attestation's signature no longer covers them.
                5 => {
                    frame["sessionPubkey"] = json!(other);
                    frame["parentAttestation"]["sessionPubkey"] = json!(other);
                    "bad_signature"
                }
                6 => { frame["timestamp"] = json!(NOW - delta); "bad_signature" }
                7 => { frame["meshId"] = json!(format!("mesh-{delta}")); "bad_signature" }
                _ => { frame["parentAttestation"]["expiresAt"] = json!(NOW - delta); "expired" }
            };
            prop_assert_eq!(verdict(&frame), want, "field {}", field);
        }

        /// The contract's order: a bad sessionPubkey is reported before a
        /// skewed timestamp, which is reported before bad hex, before a bad
        /// signature.
        #[test]
        fn refusals_come_in_the_contracts_order(
            bad_spk in any::<bool>(),
            skewed in any::<bool>(),
            bad_hex in any::<bool>(),
            bad_sig in any::<bool>(),
        ) {
            let mut frame = hello(&key(1), NOW);
            if bad_spk { frame["sessionPubkey"] = json!("ZZ"); }
            if skewed { frame["timestamp"] = json!(NOW - 3_600_000); }
            if bad_hex { frame["signature"] = json!("abc"); }
            if bad_sig { flip(&mut frame, &["memberId"], 0); }
            let want = if bad_spk { "bad_session_pubkey" }
                else if skewed { "timestamp_skew" }
                else if bad_hex { "malformed" }
                else if bad_sig { "bad_signature" }
                else { "ok" };
            prop_assert_eq!(verdict(&frame), want);
        }

        /// Random strings in every field of a hello: refused, never a panic,
        /// never accepted.
        #[test]
        fn random_hellos_are_refused(
            mesh in ".{0,80}", member in ".{0,80}", pubkey in "[0-9a-fA-F]{0,70}|.{0,70}",
            sig in "[0-9a-fA-F]{120,130}|.{0,70}", ts in any::<i64>(), spk in proptest::option::of(".{0,70}"),
        ) {
            let mut frame = json!({"type":"hello","meshId":mesh,"memberId":member,"pubkey":pubkey,
                                   "timestamp":ts,"signature":sig});
            if let Some(spk) = spk { frame["sessionPubkey"] = json!(spk); }
            let v = verdict(&frame);
            prop_assert!(
                ["bad_session_pubkey", "timestamp_skew", "malformed", "bad_signature"].contains(&v),
                "{v}"
            );
        }
    }
}
