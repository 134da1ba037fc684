//! Output bounds for one WebSocket connection: a client that stops reading
//! must not make the broker buffer pushes without limit.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Weak};

use actix::{Arbiter, ArbiterHandle};

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

/// The TCP socket under one HTTP connection, so a connection whose client
/// stopped reading can be cut off from outside (from the drain's or the
/// registry's thread), in one of two forms:
/// - [`SocketHandle::of`]: a duplicate descriptor, kept for exactly as long
///   as the handle lives;
/// - [`SocketOf::handle`]: no descriptor of its own, for the broker's
///   WebSockets. A duplicate per connection doubles the descriptors a
///   broker holds, and under a hard limit of 20,000 that stopped it short
///   of 10,000 connections. Instead the shutdown is sent to the worker
///   thread that owns the socket, and done there only if the handle still
///   lives: the handle lives in the connection's response stream, which the
///   HTTP dispatcher on that thread owns together with the socket, so on
///   that thread "the handle lives" means "the descriptor is still this
///   connection's" (nothing else on it runs between the two being dropped).
#[derive(Clone)]
pub struct SocketHandle(Handle);

#[derive(Clone)]
enum Handle {
    Dup(Arc<std::net::TcpStream>),
    OnWorker {
        fd: RawFd,
        worker: ArbiterHandle,
        /// The liveness token; only the owning thread ever holds it.
        alive: Arc<()>,
    },
}

impl SocketHandle {
    pub fn of(tcp: &impl std::os::fd::AsFd) -> Option<SocketHandle> {
        let fd = tcp.as_fd().try_clone_to_owned().ok()?;
        Some(SocketHandle(Handle::Dup(Arc::new(
            std::net::TcpStream::from(fd),
        ))))
    }
}

/// What a connection's `on_connect` keeps of its socket: the descriptor's
/// number and the worker thread that owns it, not the descriptor.
#[derive(Clone)]
pub struct SocketOf {
    fd: RawFd,
    worker: ArbiterHandle,
}

impl SocketOf {
    /// `None` off an actix worker thread (nothing to send the shutdown to).
    pub fn current(tcp: &impl AsRawFd) -> Option<SocketOf> {
        Some(SocketOf {
            fd: tcp.as_raw_fd(),
            worker: Arbiter::try_current()?,
        })
    }

    /// A handle for one response stream of this connection. It must be kept
    /// in that stream (see [`SocketHandle`]), and made on the worker thread.
    pub fn handle(&self) -> SocketHandle {
        SocketHandle(Handle::OnWorker {
            fd: self.fd,
            worker: self.worker.clone(),
            alive: Arc::new(()),
        })
    }
}

/// What the backlog keeps of its connection's [`SocketHandle`]: nothing
/// that keeps the socket open or the handle alive.
enum SocketRef {
    None,
    Dup(Weak<std::net::TcpStream>),
    OnWorker {
        fd: RawFd,
        worker: ArbiterHandle,
        alive: Weak<()>,
    },
}

impl SocketRef {
    fn shutdown(&self) {
        match self {
            SocketRef::None => {}
            SocketRef::Dup(socket) => {
                if let Some(socket) = socket.upgrade() {
                    let _ = socket.shutdown(std::net::Shutdown::Both);
                }
            }
            SocketRef::OnWorker { fd, worker, alive } => {
                // Not upgraded here: a strong reference held on this thread
                // could outlive the connection while the worker looks.
                let (fd, alive) = (*fd, alive.clone());
                // A stopped worker has closed its sockets already.
                worker.spawn_fn(move || {
                    if alive.upgrade().is_some() {
                        let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
                    }
                });
            }
        }
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
    socket: SocketRef,
    /// Cut off already: later frames are dropped at once.
    cut: AtomicBool,
}

impl Backlog {
    pub fn new(limit: usize, socket: Option<&SocketHandle>) -> Backlog {
        Backlog {
            queued: AtomicUsize::new(0),
            written: AtomicUsize::new(0),
            limit,
            socket: match socket.map(|s| &s.0) {
                None => SocketRef::None,
                Some(Handle::Dup(s)) => SocketRef::Dup(Arc::downgrade(s)),
                Some(Handle::OnWorker { fd, worker, alive }) => SocketRef::OnWorker {
                    fd: *fd,
                    worker: worker.clone(),
                    alive: Arc::downgrade(alive),
                },
            },
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
        self.socket.shutdown();
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
