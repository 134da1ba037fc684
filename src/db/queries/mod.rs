//! Every query the broker runs while serving, one small function each.
//!
//! The queue queries are written in SQL (claim, ack, sweep): they are the
//! heart of the broker, and `UPDATE … FROM (SELECT … FOR UPDATE SKIP LOCKED)`
//! reads best as the SQL it is. Everything else uses the diesel DSL.
//!
//! One file per section; everything is re-exported here, so callers write
//! `crate::db::queries::x` whichever file `x` lives in.

mod cached;
mod cluster;
mod common;
mod messages;
mod presence;
mod queue;
mod store;
mod sweep;

pub use cluster::*;
pub use common::MemberRow;
pub use messages::*;
pub use presence::*;
pub use queue::*;
pub use store::*;
pub use sweep::*;
