//! What the query files share, in a child of its own so that `queries`
//! (which re-exports them) and they never use each other.

pub(super) type Conn = diesel_async::AsyncPgConnection;

pub(super) fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}
