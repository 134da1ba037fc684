//! Every refusal the broker makes, as one typed vocabulary: the code on the
//! wire (at the start of an `ack`'s `error`, in an `error` frame's `code`),
//! the close code when the refusal ends the connection, the metric label,
//! and whether retrying the same request can succeed.
//!
//! `docs/protocol.md` lists the same codes for clients.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorCode {
    // -- any frame ---------------------------------------------------------
    /// Not JSON, not an object, no string `type`, a binary or fragmented frame.
    Malformed,
    /// An unknown `type` sent with a `_reqId` (without one it is ignored).
    Unsupported,
    /// An unknown `type` without `_reqId`: dropped unanswered, counted.
    Ignored,
    /// A frame other than hello before the hello.
    NoHello,
    /// A field out of bounds or of the wrong shape.
    Invalid,
    /// Not allowed to this member (kick without admin; a revoked sender).
    Forbidden,
    /// The database is unreachable: retry.
    Unavailable,
    /// A frame larger than `limits.max_frame_bytes` (close 1009).
    FrameTooLarge,
    /// A WebSocket protocol violation (close 1002).
    ProtocolError,
    /// Acks, nacks or `in_progress` beyond `delivery.max_in_flight` in
    /// flight on one connection: dropped, counted.
    SettleOverflow,
    // -- hello ---------------------------------------------------------------
    TimestampSkew,
    BadSessionPubkey,
    BadSignature,
    AttestationMismatch,
    Expired,
    TtlTooLong,
    Replayed,
    Unauthorized,
    /// The member was revoked (close 4002).
    Revoked,
    ParentMemberIdMismatch,
    /// The mesh has `limits.max_connections_per_mesh` connections.
    Capacity,
    /// No successful hello within `limits.hello_timeout`.
    HelloTimeout,
    // -- send ------------------------------------------------------------------
    PayloadTooLarge,
    RateLimit,
    NotFound,
    IdempotencyKeyReused,
}

impl ErrorCode {
    /// Every code, for documentation checks and metric pre-registration.
    pub const ALL: [ErrorCode; 26] = [
        ErrorCode::Malformed,
        ErrorCode::Unsupported,
        ErrorCode::Ignored,
        ErrorCode::NoHello,
        ErrorCode::Invalid,
        ErrorCode::Forbidden,
        ErrorCode::Unavailable,
        ErrorCode::FrameTooLarge,
        ErrorCode::ProtocolError,
        ErrorCode::SettleOverflow,
        ErrorCode::TimestampSkew,
        ErrorCode::BadSessionPubkey,
        ErrorCode::BadSignature,
        ErrorCode::AttestationMismatch,
        ErrorCode::Expired,
        ErrorCode::TtlTooLong,
        ErrorCode::Replayed,
        ErrorCode::Unauthorized,
        ErrorCode::Revoked,
        ErrorCode::ParentMemberIdMismatch,
        ErrorCode::Capacity,
        ErrorCode::HelloTimeout,
        ErrorCode::PayloadTooLarge,
        ErrorCode::RateLimit,
        ErrorCode::NotFound,
        ErrorCode::IdempotencyKeyReused,
    ];

    /// The code on the wire and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Ignored => "ignored",
            ErrorCode::NoHello => "no_hello",
            ErrorCode::Invalid => "invalid",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::ProtocolError => "protocol_error",
            ErrorCode::SettleOverflow => "settle_overflow",
            ErrorCode::TimestampSkew => "timestamp_skew",
            ErrorCode::BadSessionPubkey => "bad_session_pubkey",
            ErrorCode::BadSignature => "bad_signature",
            ErrorCode::AttestationMismatch => "attestation_mismatch",
            ErrorCode::Expired => "expired",
            ErrorCode::TtlTooLong => "ttl_too_long",
            ErrorCode::Replayed => "replayed",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Revoked => "revoked",
            ErrorCode::ParentMemberIdMismatch => "parent_member_id_mismatch",
            ErrorCode::Capacity => "capacity",
            ErrorCode::HelloTimeout => "hello_timeout",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::RateLimit => "rate_limit",
            ErrorCode::NotFound => "not_found",
            ErrorCode::IdempotencyKeyReused => "idempotency_key_reused",
        }
    }

    /// The WebSocket close code when this refusal ends the connection (a
    /// refused hello, an oversized frame, a protocol error). Refusals of
    /// other frames leave the connection open.
    pub fn close_code(self) -> u16 {
        match self {
            ErrorCode::Revoked => 4002,
            ErrorCode::FrameTooLarge => 1009,
            ErrorCode::ProtocolError => 1002,
            _ => 1008,
        }
    }

    /// Whether the same request can succeed later unchanged, because what
    /// refused it is a passing state of the broker: the database away, the
    /// rate bucket empty, the mesh full, a hello that came too late (the
    /// `retry?` column of `docs/protocol.md` §9 says `yes`, `later` or
    /// `reconnect`). Every other refusal needs a different request.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Unavailable
                | ErrorCode::RateLimit
                | ErrorCode::Capacity
                | ErrorCode::HelloTimeout
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_are_distinct_snake_case() {
        let names: HashSet<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), ErrorCode::ALL.len());
        for n in names {
            assert!(
                n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{n}"
            );
        }
    }

    /// `docs/protocol.md` §9 is the list clients read: every code is in it.
    #[test]
    fn every_code_is_documented_for_clients() {
        let doc = include_str!("../docs/protocol.md");
        let section = &doc[doc.find("## 9. Error codes").expect("§9 exists")..];
        let section = &section[..section.find("\n## 10.").expect("§10 follows")];
        let missing: Vec<&str> = ErrorCode::ALL
            .iter()
            .map(|c| c.as_str())
            .filter(|c| !section.contains(&format!("`{c}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "not in docs/protocol.md §9: {missing:?}"
        );
    }

    #[test]
    fn close_codes() {
        assert_eq!(ErrorCode::Revoked.close_code(), 4002);
        assert_eq!(ErrorCode::FrameTooLarge.close_code(), 1009);
        assert_eq!(ErrorCode::ProtocolError.close_code(), 1002);
        assert_eq!(ErrorCode::Unauthorized.close_code(), 1008);
    }

    #[test]
    fn only_transient_refusals_are_retryable() {
        assert!(ErrorCode::Unavailable.is_retryable());
        assert!(ErrorCode::RateLimit.is_retryable());
        assert!(!ErrorCode::Invalid.is_retryable());
        assert!(!ErrorCode::NotFound.is_retryable());
        assert!(!ErrorCode::IdempotencyKeyReused.is_retryable());
        assert!(!ErrorCode::Replayed.is_retryable(), "needs a fresh hello");
    }
}
