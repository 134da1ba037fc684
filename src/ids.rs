//! Identifier newtypes and the connection [`Role`], so a member id is never
//! passed where a mesh id belongs.

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

/// What a connection is, fixed at hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// A host's long-lived daemon: `hello` without a role.
    #[serde(rename = "control-plane")]
    ControlPlane,
    /// One agent session: always `session_hello`.
    #[serde(rename = "session")]
    Session,
    /// A bot: `hello` with `"role":"service"`.
    #[serde(rename = "service")]
    Service,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::ControlPlane, Role::Session, Role::Service];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::ControlPlane => "control-plane",
            Role::Session => "session",
            Role::Service => "service",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
