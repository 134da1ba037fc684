//! Starting and stopping one broker: the singleton actors (registry,
//! supervised sweeper and janitor) are started once, here, before the HTTP server whose
//! workers share them through `web::Data`.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, Arbiter, Supervisor};
use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpServer};

use crate::actors::backlog::SocketOf;
use crate::actors::batch::Batcher;
use crate::actors::bus::Bus;
use crate::actors::claims::{AckJob, ClaimJob};
use crate::actors::drain::DrainHome;
use crate::actors::janitor::Janitor;
use crate::actors::registry::{self, Registry};
use crate::actors::sweeper::Sweeper;
use crate::actors::writer::WriteJob;
use crate::actors::Shared;
use crate::config::Config;
use crate::db::{queries, Pool};
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::tls::{Certificates, TlsError};

type TcpStream = actix_web::rt::net::TcpStream;
type TlsStream = actix_tls::accept::rustls_0_23::TlsStream<TcpStream>;

/// How long shutdown waits for sockets to close before it stops the server.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

/// Why a broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The listener given to [`start`] has no address to report (it is not
    /// bound, or its socket failed).
    #[error("cannot read the listener's address: {0}")]
    ListenerAddress(#[source] std::io::Error),
    /// The HTTP server would not take the listener.
    #[error("cannot serve on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// `[server.tls]` names files that are not a usable certificate and key.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A running broker.
pub struct Broker {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    registry: Addr<Registry>,
    /// What TLS handshakes present, when `[server.tls]` is set.
    certs: Option<Arc<Certificates>>,
    _sweeper: Addr<Sweeper>,
    sweeper_fail_next: Arc<AtomicBool>,
    _janitor: Addr<Janitor>,
    janitor_fail_next: Arc<AtomicBool>,
    server: ServerHandle,
    server_task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The threads of the drains and batchers, stopped with the broker.
    arbiters: Vec<Arbiter>,
}

/// Starts a broker on `listener`; must run inside an actix `System`.
pub async fn start(
    config: Arc<Config>,
    pool: Pool,
    listener: TcpListener,
) -> Result<Broker, BrokerError> {
    let local_addr = listener
        .local_addr()
        .map_err(BrokerError::ListenerAddress)?;
    // Before any actor starts: a bad certificate is a start-up error.
    let certs = config
        .server
        .tls
        .as_ref()
        .map(Certificates::open)
        .transpose()?;
    let shared = Arc::new(Shared::new(config.clone(), pool, Arc::new(Metrics::new())));
    // Claims, acks and sends are batched on a thread of their own; drains
    // are spread over one thread per core.
    let batching = Arbiter::new();
    let claimer = Batcher::start_supervised(&batching.handle(), shared.clone(), ClaimJob);
    let acker = Batcher::start_supervised(&batching.handle(), shared.clone(), AckJob);
    let drain_threads: Vec<Arbiter> = (0..std::thread::available_parallelism()
        .map_or(2, |n| n.get()))
        .map(|_| Arbiter::new())
        .collect();
    let home = DrainHome::new(
        claimer,
        acker,
        drain_threads.iter().map(Arbiter::handle).collect(),
    );
    let registry = Registry::new(shared.clone(), home).start();
    let writer = Batcher::start_supervised(
        &batching.handle(),
        shared.clone(),
        WriteJob::new(registry.clone().recipient()),
    );
    // The bus on a thread of its own: its heartbeat must not queue behind
    // a busy batcher or drain.
    let bus_thread = Arbiter::new();
    let node = queries::NodeInfo {
        id: shared.node_id.0,
        listen: local_addr.to_string(),
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default(),
        pid: std::process::id() as i32,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let bus = {
        let (shared, registry) = (shared.clone(), registry.clone());
        Bus::start_in_arbiter(&bus_thread.handle(), move |_| {
            Bus::new(shared, registry, node)
        })
    };
    registry.do_send(registry::AttachBus(bus.recipient()));
    let mut arbiters = drain_threads;
    arbiters.push(batching);
    arbiters.push(bus_thread);
    let fail_next = Arc::new(AtomicBool::new(false));
    let sweeper = {
        let (shared, registry, fail_next) = (shared.clone(), registry.clone(), fail_next.clone());
        Supervisor::start(move |_| Sweeper::new(shared, registry, fail_next))
    };
    let janitor_fail_next = Arc::new(AtomicBool::new(false));
    let janitor = {
        let (shared, registry) = (shared.clone(), registry.clone());
        let fail_next = janitor_fail_next.clone();
        Supervisor::start(move |_| Janitor::new(shared, registry, fail_next))
    };
    let state = web::Data::new(AppState::new(shared.clone(), registry.clone(), writer));
    let server =
        HttpServer::new(move || App::new().app_data(state.clone()).configure(http::routes))
            // Each connection keeps where its socket is, so a WebSocket
            // whose client stopped reading can be cut off (`Backlog`).
            .on_connect(|conn, data| {
                let tcp = conn
                    .downcast_ref::<TcpStream>()
                    .or_else(|| conn.downcast_ref::<TlsStream>().map(|tls| tls.get_ref().0));
                if let Some(handle) = tcp.and_then(SocketOf::current) {
                    data.insert(handle);
                }
            });
    let server = match &certs {
        Some(certs) => server.listen_rustls_0_23(listener, certs.server_config()?),
        None => server.listen(listener),
    };
    let server = server
        .map_err(|source| BrokerError::Serve {
            addr: local_addr,
            source,
        })?
        .disable_signals()
        .shutdown_timeout(2)
        .run();
    let handle = server.handle();
    let server_task = actix_web::rt::spawn(server);
    let scheme = if certs.is_some() { "wss" } else { "ws" };
    tracing::info!(listen = %local_addr, node = %shared.node_id, url = %format!("{scheme}://{local_addr}/ws"), "meshbroker is serving");
    Ok(Broker {
        local_addr,
        shared,
        registry,
        certs,
        _sweeper: sweeper,
        sweeper_fail_next: fail_next,
        _janitor: janitor,
        janitor_fail_next,
        server: handle,
        server_task,
        arbiters,
    })
}

impl Broker {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// Runs with `config` from now on (what [`crate::reload::plan`] made
    /// of the running one and a new file). The certificate files are read
    /// first, even when their names did not change (a renewed certificate
    /// keeps its name); if they do not load, nothing changes. Connections
    /// already open keep the TLS session they have.
    pub fn reconfigure(&self, config: Config) -> Result<(), TlsError> {
        if let (Some(certs), Some(tls)) = (&self.certs, &config.server.tls) {
            certs.reload(tls)?;
        }
        self.shared.reconfigure(Arc::new(config));
        Ok(())
    }

    /// Makes the sweeper's next pass fail, as a database error would: the
    /// supervisor restarts it.
    pub fn inject_sweeper_failure(&self) {
        self.sweeper_fail_next.store(true, Ordering::SeqCst);
    }

    /// Makes the janitor's next pass fail: the supervisor restarts it.
    pub fn inject_janitor_failure(&self) {
        self.janitor_fail_next.store(true, Ordering::SeqCst);
    }

    /// What SIGTERM does: stop accepting, release this broker's unacked
    /// leases (so redelivery does not wait for them to expire), mark its
    /// presence rows disconnected, close sockets with 1001, stop the server.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        self.server.pause().await;
        if self.registry.send(registry::Shutdown).await.is_err() {
            tracing::warn!("registry already stopped");
        }
        // Sessions release their own claims as they stop; wait for them,
        // then release whatever a drain claimed in between.
        let deadline = tokio::time::Instant::now() + CLOSE_WAIT;
        while self.shared.metrics.live_sessions() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Ok(mut conn) = self.shared.pool.get().await {
            let _ = queries::release_node_claims(&mut conn, self.shared.node_id).await;
            // Leaving: the next oldest node leads from its next heartbeat
            // (and this one's bus must not take it for a fence and join
            // again).
            self.shared.cluster.leave();
            let _ = queries::leave(&mut conn, self.shared.node_id.0).await;
        }
        self.server.stop(true).await;
        let _ = self.server_task.await;
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
        tracing::info!("stopped");
    }
}
