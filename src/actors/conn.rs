//! A connection's outward face: what the drain and the registry may send
//! to a connection, and the [`ConnHandle`] they hold to send it.
//!
//! The handle keeps `Recipient`s, not the session actor's address, so the
//! drain and the registry depend on this module alone and never on the
//! session (which depends on them). Every push goes through the
//! connection's [`Backlog`], which cuts off a client that stopped reading.

use std::sync::Arc;

use actix::prelude::*;

use super::backlog::{Backlog, Reservation};
use crate::metrics::Metrics;

/// Text frames for the connection to write.
#[derive(Message)]
#[rtype(result = "()")]
pub enum Outbound {
    /// Pushes of claimed deliveries (counted as pushed when written).
    Deliveries(Vec<String>),
    /// A system event (`peer_joined`, `peer_left`, …).
    System(String),
}

impl Outbound {
    /// Bytes of payload these frames put on the wire.
    pub fn bytes(&self) -> usize {
        match self {
            Outbound::Deliveries(frames) => frames.iter().map(String::len).sum(),
            Outbound::System(frame) => frame.len(),
        }
    }
}

/// Why the broker closes a connection from outside it, with the
/// WebSocket close code and reason each is sent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// A newer hello took its place.
    Replaced,
    /// An admin's `kick`.
    Kicked,
    /// An admin's `disconnect`.
    Disconnected,
    /// Its member was revoked.
    Revoked,
    /// Its client stopped reading.
    SlowConsumer,
    /// The broker is stopping.
    Shutdown,
    /// Another node declared this one dead and took its connections over.
    Fenced,
}

impl CloseReason {
    pub fn code(self) -> u16 {
        match self {
            CloseReason::Replaced | CloseReason::Disconnected => 1000,
            CloseReason::Shutdown => 1001,
            CloseReason::Fenced => 1012,
            CloseReason::SlowConsumer => 1013,
            CloseReason::Kicked => 4001,
            CloseReason::Revoked => 4002,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            CloseReason::Replaced => "session_replaced",
            CloseReason::Kicked => "kicked",
            CloseReason::Disconnected => "disconnected",
            CloseReason::Revoked => "revoked",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Shutdown => "broker shutting down",
            CloseReason::Fenced => "node_fenced",
        }
    }
}

/// Close the connection.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseConn(pub CloseReason);

/// What the drain and the registry hold of one connection.
#[derive(Clone)]
pub struct ConnHandle {
    outbound: Recipient<Outbound>,
    close: Recipient<CloseConn>,
    /// What the connection has not yet taken; every push goes through it.
    backlog: Arc<Backlog>,
}

impl ConnHandle {
    pub fn new<A>(addr: &Addr<A>, backlog: Arc<Backlog>) -> ConnHandle
    where
        A: Actor + Handler<Outbound> + Handler<CloseConn>,
        A::Context: actix::dev::ToEnvelope<A, Outbound> + actix::dev::ToEnvelope<A, CloseConn>,
    {
        ConnHandle {
            outbound: addr.clone().recipient(),
            close: addr.clone().recipient(),
            backlog,
        }
    }

    /// Hands `msg` to the connection, unless that would put its backlog
    /// over the limit: then the connection is cut off (once: counted,
    /// logged, told to close 1013) and `msg` dropped. Returns whether it
    /// was handed over. Dropped deliveries are not lost: the cut-off
    /// connection's stop releases their claims.
    pub fn offer(&self, msg: Outbound, metrics: &Metrics) -> bool {
        match self.backlog.reserve(msg.bytes()) {
            Reservation::Reserved => {
                self.outbound.do_send(msg);
                true
            }
            Reservation::Refused { newly_cut } => {
                if let Some(waiting_bytes) = newly_cut {
                    Metrics::add(&metrics.slow_consumers, 1);
                    tracing::warn!(
                        waiting_bytes,
                        "closing a slow consumer: its client stopped reading"
                    );
                    // Heard only if the session still runs; the socket's
                    // shutdown ends it either way.
                    self.close(CloseReason::SlowConsumer);
                }
                false
            }
        }
    }

    pub fn close(&self, reason: CloseReason) {
        self.close.do_send(CloseConn(reason));
    }

    /// Cut off as a slow consumer: it takes nothing more.
    pub fn is_cut(&self) -> bool {
        self.backlog.is_cut()
    }
}
