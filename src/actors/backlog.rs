//! Output bounds for one WebSocket connection: a client that stops reading
//! must not make the broker buffer pushes without limit.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use actix::Addr;

use super::session::{CloseConn, Outbound, WsSession};

/// Room for system events and replies on top of a full window of pushes.
const BACKLOG_SLACK: usize = 1 << 20;

/// How many bytes of pushes one connection may have waiting for its
/// socket: a full `max_in_flight` window of the largest frames, plus
/// [`BACKLOG_SLACK`]. A client that reads keeps far below it; one that
/// stops reading passes it when its leases expire and the deliveries are
/// pushed again on top of the copies it never read.
pub fn backlog_limit(config: &crate::config::Config) -> usize {
    (config.delivery.max_in_flight as usize)
        .saturating_mul(config.limits.max_frame_bytes)
        .saturating_add(BACKLOG_SLACK)
}

/// The TCP socket under one HTTP connection (a duplicate descriptor, kept
/// in the connection's data for exactly the connection's life), so a
/// connection whose client stopped reading can be cut off from outside.
#[derive(Clone)]
pub struct SocketHandle(Arc<std::net::TcpStream>);

impl SocketHandle {
    pub fn of(tcp: &impl std::os::fd::AsFd) -> Option<SocketHandle> {
        let fd = tcp.as_fd().try_clone_to_owned().ok()?;
        Some(SocketHandle(Arc::new(std::net::TcpStream::from(fd))))
    }
}

/// Bytes of pushes (deliveries and system events) handed to one session
/// and not yet taken by the HTTP layer for its socket.
///
/// When a client stops reading, the socket's buffers fill, the HTTP layer
/// stops taking bytes, and with them it stops running the session itself:
/// pushes then pile up in the session's mailbox, where the session cannot
/// see them. So the senders (drain, registry) count what they hand over,
/// the session counts what it wrote, the HTTP side ([`Backlog::taken`])
/// counts what left, and past [`backlog_limit`] a sender drops the frames
/// and shuts the socket down instead: the session then stops, and its
/// claims are released as for any closed connection.
pub struct Backlog {
    /// Handed to the session (mailbox or context) and not yet taken.
    queued: AtomicUsize,
    /// Of those, already written into the session's context.
    written: AtomicUsize,
    limit: usize,
    /// The socket, while its HTTP connection lives.
    socket: std::sync::Weak<std::net::TcpStream>,
    /// Cut off already: later frames are dropped at once.
    cut: AtomicBool,
}

impl Backlog {
    pub fn new(limit: usize, socket: Option<&SocketHandle>) -> Backlog {
        Backlog {
            queued: AtomicUsize::new(0),
            written: AtomicUsize::new(0),
            limit,
            socket: socket.map_or_else(std::sync::Weak::new, |s| Arc::downgrade(&s.0)),
            cut: AtomicBool::new(false),
        }
    }

    /// Hands `msg` to the session, unless that would put its backlog over
    /// the limit: then the connection is cut off (once) and `msg` dropped.
    /// Returns whether `msg` was handed over.
    pub fn offer(
        &self,
        addr: &Addr<WsSession>,
        msg: Outbound,
        metrics: &crate::metrics::Metrics,
    ) -> bool {
        if self.cut.load(SeqCst) {
            return false;
        }
        let n = msg.bytes();
        let before = self.queued.fetch_add(n, SeqCst);
        if before.saturating_add(n) > self.limit {
            self.queued.fetch_sub(n, SeqCst);
            if !self.cut.swap(true, SeqCst) {
                crate::metrics::Metrics::add(&metrics.slow_consumers, 1);
                tracing::warn!(
                    waiting_bytes = before,
                    limit = self.limit,
                    "closing a slow consumer: its client stopped reading"
                );
                // Heard only if the session still runs; the shutdown below
                // ends it either way.
                addr.do_send(CloseConn {
                    code: 1013,
                    reason: "slow_consumer".into(),
                });
                if let Some(socket) = self.socket.upgrade() {
                    let _ = socket.shutdown(std::net::Shutdown::Both);
                }
            }
            return false;
        }
        addr.do_send(msg);
        true
    }

    /// Cut off: nothing more is handed to this connection.
    pub fn is_cut(&self) -> bool {
        self.cut.load(SeqCst)
    }

    /// The session wrote `bytes` of handed-over frames into its context.
    pub fn wrote(&self, bytes: usize) {
        self.written.fetch_add(bytes, SeqCst);
    }

    /// The HTTP layer took everything the session had written so far
    /// (the WebSocket context hands over all its frames at once).
    pub fn taken(&self) {
        // `queued` was raised before `written`, for the same frames.
        let written = self.written.swap(0, SeqCst);
        self.queued.fetch_sub(written, SeqCst);
    }
}
