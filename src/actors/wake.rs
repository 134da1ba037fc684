//! The one way to say "these members may have something to claim": after
//! a batch of sends commits, a status change, a reclaimed lease, a
//! requeue. The registry routes it to the members' drains; one message per
//! batch, not per delivery, so whoever else subscribes later (other broker
//! processes, through the database) sees one notice per commit.

use actix::prelude::*;

use crate::ids::MemberId;

/// Something happened that may let these members' drains push more.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct WakeMembers(pub Vec<MemberId>);
