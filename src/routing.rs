//! Routing decisions as pure functions: who receives a send, which of a
//! member's connections claims a delivery, which connection a hello
//! replaces, and which connections a kick names.
//!
//! Nothing here touches the database, an actor or the clock: the actors
//! gather the facts (presence rows, live connections, the time) and ask.
//! The rules are the ones `docs/protocol.md` states; each has unit tests
//! below.

use std::collections::{HashMap, HashSet};

use crate::crypto;
use crate::ids::{MemberId, MeshId, PresenceId, Role};
use crate::protocol::{bounds, Group};

// -- who receives a send --------------------------------------------------

/// A parsed `targetSpec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A member's or a session's pubkey (lowercase hex).
    Pubkey(String),
    /// `*` or `@all`: every other member's listed connections.
    All,
    /// `@name`: the connections in group `name` or one of its subgroups.
    Group(String),
}

impl Target {
    pub fn parse(spec: &str) -> Result<Target, String> {
        if spec.len() > bounds::TARGET_SPEC {
            return Err(format!(
                "targetSpec is longer than {} bytes",
                bounds::TARGET_SPEC
            ));
        }
        match spec {
            "*" | "@all" => Ok(Target::All),
            s if s.starts_with('#') => Err("#topic targets are not supported".into()),
            s if s.starts_with('@') && s.len() > 1 => Ok(Target::Group(s[1..].to_owned())),
            s if crypto::is_hex(s, 64) => Ok(Target::Pubkey(s.to_ascii_lowercase())),
            _ => Err("targetSpec must be a pubkey, *, @all or @group".into()),
        }
    }
}

/// Group names are hierarchical: `a/b/c` is in `a/b` and in `a`. Names are
/// compared as data, never as patterns.
pub fn in_group(have: &str, wanted: &str) -> bool {
    have == wanted
        || (have.len() > wanted.len()
            && have.starts_with(wanted)
            && have.as_bytes()[wanted.len()] == b'/')
}

/// One listed connection of the mesh, as a broadcast sees it.
#[derive(Debug, Clone)]
pub struct Listed<'a> {
    pub member_id: MemberId,
    pub role: Role,
    pub session_pubkey: Option<&'a str>,
    pub session_id: &'a str,
    pub groups: &'a [Group],
}

/// One delivery a send makes: to a member, and for a keyed delivery only
/// the connection with that key may take it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Recipient {
    pub member_id: MemberId,
    /// A connection key (see [`connection_key`]); `None` for a delivery
    /// any of the member's connections may take.
    pub key: Option<String>,
}

/// The deliveries a `*` / `@all` / `@group` send makes from the mesh's
/// listed connections: one per connection key of every other member, so
/// each session gets its own copy.
///
/// A control-plane connection carrying a session key is a CLI command's
/// throwaway connection: nothing would ever collect a delivery keyed to
/// it, so broadcasts leave it out.
pub fn broadcast_recipients(
    listed: &[Listed<'_>],
    sender: MemberId,
    target: &Target,
) -> Vec<Recipient> {
    let mut seen = HashSet::new();
    listed
        .iter()
        .filter(|c| c.member_id != sender)
        .filter(|c| !(c.role == Role::ControlPlane && c.session_pubkey.is_some()))
        .filter(|c| match target {
            Target::Group(wanted) => c.groups.iter().any(|g| in_group(&g.name, wanted)),
            Target::All => true,
            Target::Pubkey(_) => false,
        })
        .map(|c| Recipient {
            member_id: c.member_id,
            key: Some(connection_key(c.session_pubkey, c.session_id)),
        })
        .filter(|r| seen.insert(r.clone()))
        .collect()
}

/// What a send to this connection's own keys means: a member cannot send
/// to its own member pubkey, and a connection not to its own session key
/// (clients drop pushes from their own session without an ack: accepted,
/// such a message would be pushed until dead-lettered).
pub fn self_target_refusal(
    target: &Target,
    own_member_pubkey: &str,
    own_session_pubkey: Option<&str>,
) -> Option<&'static str> {
    let Target::Pubkey(pk) = target else {
        return None;
    };
    if pk == own_member_pubkey {
        return Some("cannot send to your own member pubkey");
    }
    if own_session_pubkey == Some(pk.as_str()) {
        return Some("cannot send to your own session pubkey");
    }
    None
}

// -- the connection key -----------------------------------------------------

// Defined in `ids`, below `db`, whose SQL form of the rule
// (`db::rules::connection_key`) is built from the same prefix.
pub use crate::ids::{connection_key, SESSION_ID_KEY_PREFIX};

// -- which connection claims a delivery -----------------------------------

/// One of a member's live connections, as its drain plans claims.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub presence_id: PresenceId,
    pub key: String,
    pub role: Role,
    pub has_session_pubkey: bool,
    /// Order of arrival at the drain: among equals the oldest takes
    /// member-wide deliveries, the newest keyed ones.
    pub seq: u64,
    /// Pushes it may still take (`max_in_flight` less its unacked pushes).
    pub room: i64,
    /// Cut off as a slow consumer: it takes nothing more.
    pub cut: bool,
}

/// What one connection should claim in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPlan {
    pub presence_id: PresenceId,
    /// Claim deliveries keyed to this connection key.
    pub key: Option<String>,
    /// Also claim deliveries any of the member's connections may take.
    pub member_wide: bool,
    /// At most this many rows.
    pub limit: i64,
}

/// Preference for member-wide deliveries, lower first: the host daemon
/// (control-plane without a session key), then services, then sessions,
/// the CLI's short command connections last; among equals the oldest.
pub fn member_wide_rank(role: Role, has_session_pubkey: bool, seq: u64) -> (u8, u64) {
    let class = match (role, has_session_pubkey) {
        (Role::ControlPlane, false) => 0,
        (Role::Service, _) => 1,
        (Role::Session, _) => 2,
        (Role::ControlPlane, true) => 3,
    };
    (class, seq)
}

/// Preference for deliveries keyed to a key several connections share (a
/// session and a CLI connection may share a session pubkey), lower first:
/// the session, then a service, then a control-plane connection; among
/// equals the newest, since an older session with the same key is one its
/// new hello is replacing, and what it is pushed now is only released
/// again when it closes (an attempt spent for nothing).
pub fn keyed_rank(role: Role, seq: u64) -> (u8, std::cmp::Reverse<u64>) {
    let class = match role {
        Role::Session => 0,
        Role::Service => 1,
        Role::ControlPlane => 2,
    };
    (class, std::cmp::Reverse(seq))
}

/// Plans one claim pass of a member's drain: the best connection for
/// member-wide deliveries, and for each connection key the best
/// connection with it; each takes at most its room and `claim_batch`.
pub fn plan_claims(candidates: &[Candidate], claim_batch: u32) -> Vec<ClaimPlan> {
    let live = || candidates.iter().filter(|c| !c.cut);
    let member_wide = live()
        .min_by_key(|c| member_wide_rank(c.role, c.has_session_pubkey, c.seq))
        .map(|c| c.presence_id);
    let mut best_for_key: HashMap<&str, &Candidate> = HashMap::new();
    for c in live() {
        let best = best_for_key.entry(c.key.as_str()).or_insert(c);
        if keyed_rank(c.role, c.seq) < keyed_rank(best.role, best.seq) {
            *best = c;
        }
    }
    let keyed: HashSet<PresenceId> = best_for_key.values().map(|c| c.presence_id).collect();
    let mut plans: Vec<ClaimPlan> = candidates
        .iter()
        .filter_map(|c| {
            let wide = Some(c.presence_id) == member_wide;
            let has_key = keyed.contains(&c.presence_id);
            let limit = c.room.min(i64::from(claim_batch));
            ((wide || has_key) && limit > 0).then(|| ClaimPlan {
                presence_id: c.presence_id,
                key: has_key.then(|| c.key.clone()),
                member_wide: wide,
                limit,
            })
        })
        .collect();
    plans.sort_by_key(|p| p.presence_id);
    plans
}

// -- which connection a hello replaces ------------------------------------

/// What replacement compares of a connection.
#[derive(Debug, Clone)]
pub struct Identity<'a> {
    pub mesh_id: MeshId,
    pub member_id: MemberId,
    pub role: Role,
    pub session_id: &'a str,
    pub session_pubkey: Option<&'a str>,
}

/// Whether a new connection's hello replaces `old` (closed 1000
/// `session_replaced`).
///
/// - A `session_hello` replaces the session connection with its
///   `sessionPubkey`.
/// - A `hello` replaces the member's hello connection (control-plane or
///   service) with the same `sessionId` and the same `sessionPubkey`
///   (both absent, or equal). The claudemesh CLI opens one `hello` per
///   command with the session's `sessionId` and a fresh `sessionPubkey`,
///   so parallel commands of one session do not knock each other off.
/// - Neither kind ever replaces the other.
pub fn replaces(new: &Identity<'_>, old: &Identity<'_>) -> bool {
    if new.mesh_id != old.mesh_id {
        return false;
    }
    match (new.role, old.role) {
        (Role::Session, Role::Session) => new.session_pubkey == old.session_pubkey,
        (Role::Session, _) | (_, Role::Session) => false,
        _ => {
            new.member_id == old.member_id
                && new.session_id == old.session_id
                && new.session_pubkey == old.session_pubkey
        }
    }
}

// -- which connections a kick names ---------------------------------------

/// Which connections an admin's `kick` / `disconnect` names.
#[derive(Debug, Clone)]
pub enum KickSelector {
    /// A display name, a member pubkey, or a prefix (4 or more characters)
    /// of a member or session pubkey.
    Target(String),
    All,
    /// Silent for longer than this many milliseconds.
    Stale(i64),
}

/// What a kick compares of a connection.
#[derive(Debug, Clone)]
pub struct Kickable<'a> {
    pub display_name: &'a str,
    pub member_pubkey: &'a str,
    pub session_pubkey: Option<&'a str>,
    /// Milliseconds since its last frame or pong.
    pub silent_ms: i64,
}

pub fn kick_matches(selector: &KickSelector, c: &Kickable<'_>) -> bool {
    match selector {
        KickSelector::All => true,
        KickSelector::Stale(ms) => c.silent_ms > *ms,
        KickSelector::Target(t) => {
            c.display_name == t
                || c.member_pubkey == t
                || (t.len() >= 4
                    && (c.member_pubkey.starts_with(t.as_str())
                        || c.session_pubkey.is_some_and(|p| p.starts_with(t.as_str()))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn group(name: &str) -> Group {
        Group {
            name: name.into(),
            role: None,
        }
    }

    #[test]
    fn groups_are_hierarchical() {
        assert!(in_group("a/b/c", "a/b"));
        assert!(in_group("a/b/c", "a"));
        assert!(in_group("a", "a"));
        assert!(!in_group("ab", "a"));
        assert!(!in_group("a", "a/b"));
        assert!(!in_group("x%", "x"));
    }

    #[test]
    fn targets_parse() {
        assert_eq!(Target::parse("*"), Ok(Target::All));
        assert_eq!(Target::parse("@all"), Ok(Target::All));
        assert_eq!(Target::parse("@a/b"), Ok(Target::Group("a/b".into())));
        assert!(Target::parse("#topic").is_err());
        assert!(Target::parse("bob").is_err());
        assert!(Target::parse("@").is_err());
        assert_eq!(
            Target::parse(&"A".repeat(64)),
            Ok(Target::Pubkey("a".repeat(64)))
        );
        assert!(Target::parse(&"@".repeat(bounds::TARGET_SPEC + 1)).is_err());
    }

    #[test]
    fn connection_keys() {
        assert_eq!(connection_key(Some("abc"), "s1"), "abc");
        assert_eq!(connection_key(None, "s1"), "sid:s1");
        assert_eq!(connection_key(Some(""), "s1"), "sid:s1");
    }

    #[test]
    fn own_keys_are_refused_as_targets() {
        let me = "a".repeat(64);
        let session = "b".repeat(64);
        let other = Target::Pubkey("c".repeat(64));
        assert!(self_target_refusal(&Target::Pubkey(me.clone()), &me, None).is_some());
        assert!(
            self_target_refusal(&Target::Pubkey(session.clone()), &me, Some(&session)).is_some()
        );
        assert!(self_target_refusal(&Target::Pubkey(session), &me, None).is_none());
        assert!(self_target_refusal(&other, &me, Some("x")).is_none());
        assert!(self_target_refusal(&Target::All, &me, None).is_none());
    }

    fn member(n: u128) -> MemberId {
        MemberId(Uuid::from_u128(n))
    }

    #[test]
    fn broadcasts_skip_the_sender_and_cli_connections_and_dedupe_keys() {
        let ops = [group("ops/db")];
        let none: [Group; 0] = [];
        let listed = [
            // The sender's own other session: never.
            Listed {
                member_id: member(1),
                role: Role::Session,
                session_pubkey: Some("p1"),
                session_id: "s1",
                groups: &ops,
            },
            // A daemon without a session key, in no group.
            Listed {
                member_id: member(2),
                role: Role::ControlPlane,
                session_pubkey: None,
                session_id: "d2",
                groups: &none,
            },
            // A CLI command's connection: left out.
            Listed {
                member_id: member(2),
                role: Role::ControlPlane,
                session_pubkey: Some("cli"),
                session_id: "s2",
                groups: &ops,
            },
            // A session in ops/db, listed twice (two rows, one key).
            Listed {
                member_id: member(3),
                role: Role::Session,
                session_pubkey: Some("p3"),
                session_id: "s3",
                groups: &ops,
            },
            Listed {
                member_id: member(3),
                role: Role::Session,
                session_pubkey: Some("p3"),
                session_id: "s3",
                groups: &ops,
            },
        ];
        let all = broadcast_recipients(&listed, member(1), &Target::All);
        assert_eq!(
            all,
            vec![
                Recipient {
                    member_id: member(2),
                    key: Some("sid:d2".into())
                },
                Recipient {
                    member_id: member(3),
                    key: Some("p3".into())
                },
            ]
        );
        let ops_only = broadcast_recipients(&listed, member(1), &Target::Group("ops".into()));
        assert_eq!(ops_only.len(), 1);
        assert_eq!(ops_only[0].member_id, member(3));
        assert!(broadcast_recipients(&listed, member(1), &Target::Group("op".into())).is_empty());
    }

    fn candidate(n: u128, role: Role, key: &str, has_pk: bool, seq: u64) -> Candidate {
        Candidate {
            presence_id: PresenceId(Uuid::from_u128(n)),
            key: key.into(),
            role,
            has_session_pubkey: has_pk,
            seq,
            room: 100,
            cut: false,
        }
    }

    #[test]
    fn the_daemon_takes_member_wide_deliveries_and_each_key_its_best_connection() {
        let daemon = candidate(1, Role::ControlPlane, "sid:d", false, 2);
        let session = candidate(2, Role::Session, "pk", true, 1);
        let cli = candidate(3, Role::ControlPlane, "pk", true, 3);
        let plans = plan_claims(&[cli.clone(), session.clone(), daemon.clone()], 64);
        assert_eq!(
            plans,
            vec![
                ClaimPlan {
                    presence_id: daemon.presence_id,
                    key: Some("sid:d".into()),
                    member_wide: true,
                    limit: 64
                },
                ClaimPlan {
                    presence_id: session.presence_id,
                    key: Some("pk".into()),
                    member_wide: false,
                    limit: 64
                },
            ],
            "the CLI connection shares the session's key and loses to it"
        );
    }

    #[test]
    fn without_a_daemon_the_oldest_session_takes_member_wide_and_newest_takes_its_key() {
        let old = candidate(1, Role::Session, "pk", true, 1);
        let new = candidate(2, Role::Session, "pk", true, 2);
        let plans = plan_claims(&[old.clone(), new.clone()], 64);
        assert_eq!(plans.len(), 2);
        assert_eq!(plans[0].presence_id, old.presence_id);
        assert!(plans[0].member_wide && plans[0].key.is_none());
        assert_eq!(plans[1].presence_id, new.presence_id);
        assert!(!plans[1].member_wide && plans[1].key.as_deref() == Some("pk"));
    }

    #[test]
    fn room_bounds_the_claim_and_cut_connections_take_nothing() {
        let mut full = candidate(1, Role::ControlPlane, "sid:a", false, 1);
        full.room = 0;
        let mut some = candidate(2, Role::Service, "sid:b", false, 2);
        some.room = 5;
        let mut cut = candidate(3, Role::ControlPlane, "sid:c", false, 0);
        cut.cut = true;
        let plans = plan_claims(&[full, some.clone(), cut], 64);
        assert_eq!(
            plans,
            vec![ClaimPlan {
                presence_id: some.presence_id,
                key: Some("sid:b".into()),
                member_wide: false,
                limit: 5
            }],
            "the full daemon still wins member-wide deliveries, and claims none of them"
        );
        let mut big = candidate(4, Role::Session, "k", true, 1);
        big.room = 1000;
        assert_eq!(plan_claims(&[big], 64)[0].limit, 64);
    }

    fn id<'a>(
        member: u128,
        role: Role,
        session_id: &'a str,
        session_pubkey: Option<&'a str>,
    ) -> Identity<'a> {
        Identity {
            mesh_id: MeshId(Uuid::from_u128(9)),
            member_id: MemberId(Uuid::from_u128(member)),
            role,
            session_id,
            session_pubkey,
        }
    }

    #[test]
    fn replacement_rules() {
        let daemon = id(1, Role::ControlPlane, "s", None);
        assert!(replaces(&daemon, &daemon.clone()), "a daemon's reconnect");
        assert!(!replaces(&daemon, &id(2, Role::ControlPlane, "s", None)));
        assert!(!replaces(&daemon, &id(1, Role::ControlPlane, "t", None)));
        let cli_a = id(1, Role::ControlPlane, "s", Some("a"));
        let cli_b = id(1, Role::ControlPlane, "s", Some("b"));
        assert!(!replaces(&cli_a, &cli_b), "parallel CLI commands coexist");
        assert!(
            !replaces(&cli_a, &daemon),
            "a CLI command leaves the daemon"
        );
        assert!(!replaces(&daemon, &cli_a));
        assert!(replaces(&cli_a, &cli_a.clone()));
        let session = id(1, Role::Session, "s", Some("a"));
        assert!(
            !replaces(&cli_a, &session),
            "a hello never replaces a session"
        );
        assert!(!replaces(&session, &cli_a));
        assert!(replaces(
            &session,
            &id(1, Role::Session, "other", Some("a"))
        ));
        assert!(!replaces(&session, &id(1, Role::Session, "s", Some("b"))));
        let mut elsewhere = session.clone();
        elsewhere.mesh_id = MeshId(Uuid::from_u128(8));
        assert!(!replaces(&elsewhere, &session));
    }

    #[test]
    fn kick_selectors() {
        let c = Kickable {
            display_name: "alice",
            member_pubkey: "abcdef01",
            session_pubkey: Some("9876aa"),
            silent_ms: 5_000,
        };
        let t = |s: &str| KickSelector::Target(s.into());
        assert!(kick_matches(&t("alice"), &c));
        assert!(kick_matches(&t("abcdef01"), &c));
        assert!(kick_matches(&t("abcd"), &c));
        assert!(kick_matches(&t("9876"), &c));
        assert!(!kick_matches(&t("abc"), &c), "prefixes need 4 characters");
        assert!(!kick_matches(&t("bob"), &c));
        assert!(kick_matches(&KickSelector::All, &c));
        assert!(kick_matches(&KickSelector::Stale(4_000), &c));
        assert!(!kick_matches(&KickSelector::Stale(5_000), &c));
    }
}
