//! Output bounds for one WebSocket connection: a client that stops reading
//! must not make the broker buffer pushes without limit.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

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

/// What [`Backlog::reserve`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Hand the frames over.
    Reserved,
    /// Drop them. `newly_cut` holds the bytes already waiting when this
    /// reservation cut the connection off (its socket is shut down now);
    /// `None` when it was cut off before.
    Refused { newly_cut: Option<usize> },
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
///
/// Pure accounting: what is handed over, and how, is
/// [`super::conn::ConnHandle`]'s business.
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

    /// Reserves room for `bytes` more of frames about to be handed to the
    /// session, unless that would put the backlog over the limit: then the
    /// connection is cut off (the socket shut down, once) and nothing is
    /// reserved.
    pub fn reserve(&self, bytes: usize) -> Reservation {
        if self.cut.load(SeqCst) {
            return Reservation::Refused { newly_cut: None };
        }
        let before = self.queued.fetch_add(bytes, SeqCst);
        if before.saturating_add(bytes) <= self.limit {
            return Reservation::Reserved;
        }
        self.queued.fetch_sub(bytes, SeqCst);
        if self.cut.swap(true, SeqCst) {
            return Reservation::Refused { newly_cut: None };
        }
        if let Some(socket) = self.socket.upgrade() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
        Reservation::Refused {
            newly_cut: Some(before),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserves_up_to_the_limit_then_cuts_off_once() {
        let b = Backlog::new(100, None);
        assert_eq!(b.reserve(60), Reservation::Reserved);
        assert_eq!(b.reserve(40), Reservation::Reserved);
        assert!(!b.is_cut());
        assert_eq!(
            b.reserve(1),
            Reservation::Refused {
                newly_cut: Some(100)
            }
        );
        assert!(b.is_cut());
        assert_eq!(b.reserve(0), Reservation::Refused { newly_cut: None });
    }

    #[test]
    fn what_left_for_the_socket_frees_room() {
        let b = Backlog::new(100, None);
        assert_eq!(b.reserve(80), Reservation::Reserved);
        // Written into the context and taken by the HTTP layer.
        b.wrote(80);
        b.taken();
        assert_eq!(b.reserve(100), Reservation::Reserved);
        // Written but not yet taken still counts.
        b.wrote(100);
        assert!(matches!(b.reserve(1), Reservation::Refused { .. }));
    }

    #[test]
    fn a_cut_connection_shuts_its_socket_down() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let handle = SocketHandle::of(&server).unwrap();
        let b = Backlog::new(10, Some(&handle));
        assert!(matches!(
            b.reserve(11),
            Reservation::Refused { newly_cut: Some(0) }
        ));
        use std::io::Read as _;
        let mut buf = [0u8; 1];
        let mut client = client;
        assert_eq!(
            client.read(&mut buf).unwrap(),
            0,
            "the peer sees end of stream"
        );
    }
}
