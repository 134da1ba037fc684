//! systemd's readiness protocol (`Type=notify`): one datagram to the socket
//! named by `NOTIFY_SOCKET`, if set. A path, or an abstract socket written
//! `@name`. Anything else (no variable, no systemd) does nothing.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `READY=1`); errors are logged, never fatal.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|sock| {
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)
        } else {
            sock.send_to(state.as_bytes(), &path)
        }
    });
    if let Err(e) = sent {
        tracing::warn!(error = %e, state, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}
