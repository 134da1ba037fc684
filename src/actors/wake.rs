//! The one way to say "these members may have something to claim": after
//! a batch of sends commits, a status change, a reclaimed lease, a
//! requeue. The registry routes it to the members' drains; one message per
//! batch, not per delivery, so the other nodes of a cluster hear of it in
//! one notice per commit.
//!
//! Also what crosses to other nodes ([`Publish`]): [`Notice`]s, ids only,
//! in the text form the bus sends them as (docs/cluster.md, "Notices").

use actix::prelude::*;

pub use crate::db::notice::{decode_payload, CloseFor, Event, Notice};
use crate::db::queries::Route;
use crate::ids::MemberId;

/// Something happened that may let these members' drains push more.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct WakeMembers(pub Vec<MemberId>);

/// Send these notices to the other nodes their routes name.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Publish(pub Vec<(Route, Notice)>);
