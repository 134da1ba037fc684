//! Keeps alive the embedded cluster `meshbroker serve` runs on.
//!
//! Without it a postmaster that dies (OOM killer, `kill -9`, a crash) stays
//! dead: the broker keeps serving, `/health/ready` stays 503 for good and
//! every send is refused. The broker started that cluster, so it watches the
//! postmaster and restarts it with backoff, by [`EmbeddedPostgres::revive`]
//! (which keeps the ownership rules of [`super::embedded`]: an adopted
//! cluster whose starter is alive is left to that starter). The pool's
//! probe sees the database back and traffic resumes by itself; what was
//! accepted was committed, and crash recovery keeps it.

use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::embedded::{EmbeddedPostgres, Revived};

/// How often the postmaster's pid is checked: a few syscalls.
const WATCH_EVERY: Duration = Duration::from_millis(200);
/// First pause before a restart; doubled after each attempt up to
/// [`MAX_BACKOFF`]. A postmaster killed a moment ago may leave backends
/// that still hold its shared memory, and postgres refuses to start until
/// they exit; a cluster that dies as soon as it starts must not spin.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Up this long, the cluster counts as healthy again: the backoff restarts
/// from [`FIRST_BACKOFF`] on its next death.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// Lines of `postgresql.log` copied into the broker's log when it dies.
const LOG_TAIL_LINES: usize = 20;
/// Lines of `postgresql.log` copied once it is back (its crash recovery).
const RECOVERY_TAIL_LINES: usize = 8;

/// A running supervisor; [`Supervisor::stop`] hands the cluster back.
pub struct Supervisor {
    stop: oneshot::Sender<()>,
    task: JoinHandle<EmbeddedPostgres>,
}

impl Supervisor {
    /// Watches `pg` on the current tokio runtime; `on_restart` runs after
    /// each restart this process made (for the metrics).
    pub fn start(pg: EmbeddedPostgres, on_restart: impl Fn() + Send + 'static) -> Supervisor {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(watch(pg, stopped, on_restart));
        Supervisor { stop, task }
    }

    /// Stops watching (waiting for a restart under way) and returns the
    /// cluster, for the caller to stop: a cluster stopped on purpose must not
    /// be restarted.
    pub async fn stop(self) -> EmbeddedPostgres {
        let _ = self.stop.send(());
        self.task
            .await
            .expect("embedded PostgreSQL supervisor panicked")
    }
}

async fn watch(
    mut pg: EmbeddedPostgres,
    mut stopped: oneshot::Receiver<()>,
    on_restart: impl Fn(),
) -> EmbeddedPostgres {
    let mut backoff = FIRST_BACKOFF;
    let mut up_since = Instant::now();
    loop {
        tokio::select! {
            _ = &mut stopped => return pg,
            () = tokio::time::sleep(WATCH_EVERY) => {}
        }
        if pg.postmaster_alive() {
            continue;
        }
        if up_since.elapsed() >= STABLE_AFTER {
            backoff = FIRST_BACKOFF;
        }
        tracing::warn!(
            log = %pg.log_path().display(),
            "embedded PostgreSQL is not running; restarting it. Its log ends:\n{}",
            pg.log_tail(LOG_TAIL_LINES)
        );
        let mut left_to = None;
        loop {
            tokio::select! {
                _ = &mut stopped => return pg,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            let (back, result) = tokio::task::spawn_blocking(move || {
                let result = pg.revive();
                (pg, result)
            })
            .await
            .expect("embedded PostgreSQL restart thread panicked");
            pg = back;
            match result {
                Ok(Revived::Restarted) => {
                    on_restart();
                    // Its recovery, for whoever reads why it was down so long.
                    tracing::warn!(
                        data_dir = %pg.data_dir().display(),
                        "embedded PostgreSQL restarted. Its log ends:\n{}",
                        pg.log_tail(RECOVERY_TAIL_LINES)
                    );
                    break;
                }
                Ok(Revived::AlreadyRunning) => {
                    tracing::info!(
                        owned = pg.is_owned(),
                        "embedded PostgreSQL is running again (another process restarted it)"
                    );
                    break;
                }
                Ok(Revived::LeftToOwner(pid)) => {
                    if left_to != Some(pid) {
                        tracing::warn!(
                            owner = pid,
                            "embedded PostgreSQL is down; the process that started it is alive and restarts it"
                        );
                        left_to = Some(pid);
                    }
                }
                Err(e) => tracing::warn!(
                    retry_in = ?backoff,
                    "embedded PostgreSQL did not restart: {e}"
                ),
            }
        }
        up_since = Instant::now();
    }
}
