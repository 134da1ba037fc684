//! Identifier newtypes, so a member id is never passed where a mesh id
//! belongs, and the closed vocabularies stored as text: [`Role`],
//! [`Status`], [`Priority`], and the connection-key rule.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_id!(
    /// A mesh: the unit of isolation.
    MeshId
);
uuid_id!(
    /// A member of a mesh, owner of one ed25519 key.
    MemberId
);
uuid_id!(
    /// One accepted message (shared by all its deliveries).
    MessageId
);
uuid_id!(
    /// One connection's presence row.
    PresenceId
);
uuid_id!(
    /// One claim of a delivery: changes on every claim, so a stale claim
    /// holder can be told apart from the current one.
    ClaimId
);
uuid_id!(
    /// One broker process; recorded on presence rows and claims.
    NodeId
);

/// One recipient delivery row (`mesh.message_queue.id`).
pub type DeliveryId = i64;

/// A closed set of wire words: the enum, its strings (serde uses the same
/// ones) and the diesel mapping to `text` (the `ToSql`/`FromSql` impls are
/// in `db::text_enums`, where an unknown word read back is an error).
macro_rules! wire_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $s:literal,)+ }) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize,
            diesel::expression::AsExpression, diesel::deserialize::FromSqlRow,
        )]
        #[diesel(sql_type = diesel::sql_types::Text)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $s)] $variant,)+
        }

        impl $name {
            pub const ALL: [$name; [$($s),+].len()] = [$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $s,)+
                }
            }

            pub fn parse(s: &str) -> Option<$name> {
                Self::ALL.into_iter().find(|v| v.as_str() == s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_enum!(
    /// What a connection is, fixed at hello.
    Role {
        /// A host's long-lived daemon: `hello` without a role.
        ControlPlane = "control-plane",
        /// One agent session: always `session_hello`.
        Session = "session",
        /// A bot: `hello` with `"role":"service"`.
        Service = "service",
    }
);

wire_enum!(
    /// A connection's presence status (`set_status`, the status hook).
    /// Only `idle` connections take `next` and `low` deliveries.
    Status {
        Idle = "idle",
        Working = "working",
        /// Do not disturb: the status hook leaves it alone.
        Dnd = "dnd",
    }
);

wire_enum!(
    /// A message's priority: `now` is pushed whatever the recipient's
    /// status, the others wait for `idle`.
    Priority {
        Now = "now",
        Next = "next",
        Low = "low",
    }
);

/// Prefix of a connection key made from a session id: the key of a
/// connection without a session pubkey. The SQL form of the rule
/// (`db::rules::connection_key`) is built from it.
pub const SESSION_ID_KEY_PREFIX: &str = "sid:";

/// The key under which a connection receives deliveries addressed to it
/// alone: its session pubkey, else its session id.
pub fn connection_key(session_pubkey: Option<&str>, session_id: &str) -> String {
    match session_pubkey {
        Some(pk) if !pk.is_empty() => pk.to_owned(),
        _ => format!("{SESSION_ID_KEY_PREFIX}{session_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trips<T>(all: &[T], as_str: fn(T) -> &'static str, parse: fn(&str) -> Option<T>)
    where
        T: Copy + PartialEq + fmt::Debug + Serialize + serde::de::DeserializeOwned,
    {
        for &v in all {
            let s = as_str(v);
            assert_eq!(parse(s), Some(v));
            assert_eq!(serde_json::to_value(v).unwrap(), serde_json::json!(s));
            assert_eq!(
                serde_json::from_value::<T>(serde_json::json!(s)).unwrap(),
                v
            );
            assert_eq!(
                parse(&s.to_uppercase()),
                None,
                "wire words are case-sensitive"
            );
        }
        assert_eq!(parse(""), None);
        assert_eq!(parse("unknown"), None);
    }

    #[test]
    fn wire_words_round_trip() {
        round_trips(&Role::ALL, Role::as_str, Role::parse);
        round_trips(&Status::ALL, Status::as_str, Status::parse);
        round_trips(&Priority::ALL, Priority::as_str, Priority::parse);
        let words = |all: &[&str]| all.join(",");
        assert_eq!(
            words(&Role::ALL.map(Role::as_str)),
            "control-plane,session,service"
        );
        assert_eq!(words(&Status::ALL.map(Status::as_str)), "idle,working,dnd");
        assert_eq!(words(&Priority::ALL.map(Priority::as_str)), "now,next,low");
    }

    #[test]
    fn connection_key_is_the_session_pubkey_else_the_session_id() {
        assert_eq!(connection_key(Some("ab12"), "s1"), "ab12");
        assert_eq!(connection_key(None, "s1"), "sid:s1");
        // An empty pubkey is no key (the SQL form's NULLIF agrees).
        assert_eq!(connection_key(Some(""), "s1"), "sid:s1");
        assert_eq!(connection_key(None, ""), "sid:");
    }
}
