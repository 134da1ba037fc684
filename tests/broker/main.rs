//! meshbroker integration tests: one binary, a real broker in-process per
//! test (and the real executable in `process`), checked against the wire
//! contract in docs/protocol.md.

mod broker_process;
mod support;

mod admin_frames;
mod bench_cmd;
mod cluster;
mod delivery;
mod deploy_files;
mod durability;
mod faults;
mod faults_live;
mod frames;
mod handshake;
mod hostile;
mod http;
mod interop;
mod isolation;
mod lifecycle;
mod pipeline;
mod presence;
mod process;
mod reload;
mod status_page;
mod tls;
