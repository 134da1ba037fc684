//! The queue's invariants as SQL, each written once. Every statement that
//! needs one is built from here, so the claim, the janitor's wake-up, the
//! sweeper and the operator's requeue cannot drift apart.

use crate::ids::SESSION_ID_KEY_PREFIX;

/// The `SET` list that clears a claim: every release, lease expiry, nack,
/// dead-lettering and requeue uses it, so no claim column is left behind
/// (a stale `claim_presence_id` would let a closed connection's nack or
/// in_progress touch a delivery claimed since by another).
pub const CLAIM_RESET: &str = "claimed_at = NULL, claim_id = NULL, claim_expires_at = NULL, \
     claim_presence_id = NULL, claim_node_id = NULL";

/// Whether delivery row `q` may be claimed now, by anyone: undelivered,
/// alive, unleased (or its lease ran out), not delayed, not expired, and
/// with attempts left (`max_attempts`: the placeholder bound to
/// `delivery.max_attempts`, e.g. `"$8"`). Who may claim it (key, status
/// gate, revocation) is the caller's part.
pub fn claimable(q: &str, max_attempts: &str) -> String {
    format!(
        "{q}.delivered_at IS NULL AND {q}.dead_at IS NULL \
         AND ({q}.claim_expires_at IS NULL OR {q}.claim_expires_at <= now()) \
         AND {q}.not_before <= now() AND {q}.expires_at > now() \
         AND {q}.attempts < {max_attempts}"
    )
}

/// [`crate::routing::member_wide_rank`]'s class of presence row `p`, in
/// SQL: which of a member's connections on different nodes takes its
/// member-wide deliveries (lower first; ties go to the oldest).
pub fn member_wide_rank(p: &str) -> String {
    format!(
        "CASE WHEN {p}.role = 'control-plane' AND {p}.session_pubkey IS NULL THEN 0 \
              WHEN {p}.role = 'service' THEN 1 WHEN {p}.role = 'session' THEN 2 ELSE 3 END"
    )
}

/// [`crate::ids::connection_key`] of presence row `p`, in SQL: its session
/// pubkey, else `sid:` and its session id.
pub fn connection_key(p: &str) -> String {
    format!("COALESCE(NULLIF({p}.session_pubkey, ''), '{SESSION_ID_KEY_PREFIX}' || {p}.session_id)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_name_their_alias_everywhere() {
        assert_eq!(
            connection_key("x"),
            "COALESCE(NULLIF(x.session_pubkey, ''), 'sid:' || x.session_id)"
        );
        let c = claimable("q", "$2");
        assert!(c.ends_with("q.attempts < $2"), "{c}");
        // No column left unqualified, so the fragment is safe in a join.
        let words: Vec<&str> = c
            .split(|ch: char| !(ch.is_alphanumeric() || ch == '_' || ch == '.'))
            .collect();
        for col in [
            "delivered_at",
            "dead_at",
            "claim_expires_at",
            "not_before",
            "expires_at",
        ] {
            assert!(words.contains(&format!("q.{col}").as_str()), "{col} in {c}");
            assert!(!words.contains(&col), "{col} unqualified in {c}");
        }
        for col in [
            "claimed_at",
            "claim_id",
            "claim_expires_at",
            "claim_presence_id",
            "claim_node_id",
        ] {
            assert!(CLAIM_RESET.contains(&format!("{col} = NULL")), "{col}");
        }
    }
}
