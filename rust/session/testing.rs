//! Sessions over an in-memory pipe against a scripted policy, with no
//! socket and no Python: for the session's own tests and the whole-session
//! fuzz target.

use super::{run, SessionContext, Shutdown};
use crate::body::BodyStore;
use crate::bridge::Bridge;
use crate::client_limits::{ClientTable, CLIENT_TABLE_CAPACITY};
use crate::events::{Event, EventKind, Outcome};
use crate::log::LogRecord;
use crate::metrics::ListenerMetrics;
use crate::params::{parse_listener_config, ParamErrors};
use crate::sink::Sink;
use crate::tls::{self, TlsCache};
use serde_json::Value;
use std::sync::{Arc, Mutex};
use tokio::io::DuplexStream;
use tokio::sync::watch;

/// How the scripted policy answers each call.
pub type Script = dyn Fn(&Event) -> Outcome + Send + Sync;

/// A listener without a socket: each [`Harness::connect`] runs a session
/// on the current tokio runtime and returns the client's end of its pipe.
pub struct Harness {
    pub(super) context: Arc<SessionContext>,
    shutdown: watch::Sender<Option<tokio::time::Instant>>,
    logs: Arc<Mutex<Vec<LogRecord>>>,
}

impl Harness {
    /// A listener with `params` (as given to `start_esmtp_listener`) whose
    /// handlers for `registered` events answer as `script` says. Call it
    /// inside a tokio runtime: the policy's answering task runs there.
    pub fn new(
        params: Value,
        registered: &[EventKind],
        script: impl Fn(&Event) -> Outcome + Send + Sync + 'static,
        sink: Sink,
    ) -> Result<Self, ParamErrors> {
        let config = parse_listener_config(&params)?;
        let bridge = Arc::new(Bridge::new().expect("a socket pair"));
        bridge.set_registered(registered.iter().copied());
        let shutdown = watch::Sender::new(None);
        let logs = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(answer(bridge.clone(), Arc::new(script), logs.clone()));
        let spool_dir = config.body_spool_path.clone().unwrap_or_else(|| sink.spool_dir());
        let metrics: Arc<ListenerMetrics> = Arc::default();
        let spool = BodyStore::new(spool_dir, config.body_memory_limit, metrics.clone());
        let context = Arc::new(SessionContext {
            listener: Arc::from(config.listen.as_str()),
            config,
            policy: bridge,
            spool,
            sink,
            tls: Arc::new(TlsCache::new(tls::CACHE_TTL, tls::CACHE_CAPACITY)),
            clients: ClientTable::new(CLIENT_TABLE_CAPACITY),
            shared_limits: None,
            metrics,
            forwarder: Arc::default(),
            shutdown: Shutdown::new(shutdown.subscribe()),
        });
        Ok(Self { context, shutdown, logs })
    }

    /// A client connecting from `remote` to our `local` address.
    pub fn connect(&self, remote: &str, local: &str) -> DuplexStream {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (remote, local) = (remote.parse().expect("an address"), local.parse().expect("an address"));
        tokio::spawn(run(server, remote, local, self.context.clone()));
        client
    }

    /// Shut down, with no grace for messages being received.
    pub fn shut_down(&self) {
        self.shut_down_with_grace(std::time::Duration::ZERO);
    }

    /// Shut down, giving sessions `grace` as the server does.
    pub fn shut_down_with_grace(&self, grace: std::time::Duration) {
        self.shutdown.send_replace(Some(super::message_grace_ends(tokio::time::Instant::now(), grace)));
    }

    /// The log messages so far.
    pub fn logs(&self) -> Vec<String> {
        self.records().into_iter().map(|record| record.message).collect()
    }

    /// The log records so far, with their levels and fields.
    pub fn records(&self) -> Vec<LogRecord> {
        self.logs.lock().expect("not poisoned").clone()
    }
}

/// Answer every queued call as `script` says, and keep the log records.
async fn answer(bridge: Arc<Bridge>, script: Arc<Script>, logs: Arc<Mutex<Vec<LogRecord>>>) {
    loop {
        let work = bridge.work_queued();
        tokio::pin!(work);
        // Registered before taking, so that no call queued after the take is missed.
        work.as_mut().enable();
        let (calls, records) = bridge.take();
        logs.lock().expect("not poisoned").extend(records);
        if calls.is_empty() {
            work.await;
            continue;
        }
        for call in calls {
            let outcome = script(&call.event);
            call.finish(outcome);
        }
    }
}
