//! The queue between tokio sessions and the Python thread.
//!
//! Sessions never touch Python: they push a [`Call`] and await its outcome.
//! Python learns of it from the [`crate::driver::Driver`] it is driving
//! ([`Bridge::work_queued`]), or, when its loop runs apart from the
//! sessions, from [`Bridge::watch_wake_fd`]; it takes every queued call in
//! one go and completes each (possibly later, for `async def` handlers).
//! Log records travel the same way so that Rust events reach Python's
//! `logging`.

use crate::message::Message;
use crate::meta::MetaStore;
use crate::params::GenericParams;
use crate::params::ListenerDomain;
use crate::parser::Mailbox;
use crate::sasl::PlainCredentials;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::futures::Notified;
use tokio::sync::{oneshot, Notify};

/// The policy events a session can raise, by their registration names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    GetDynamicParameters,
    ConnectionAccepted,
    Ehlo,
    MailFrom,
    RcptTo,
    GetListenerDomain,
    Data,
    MessageReceived,
    AuthPlain,
}

impl EventKind {
    pub const ALL: [EventKind; 9] = [
        EventKind::GetDynamicParameters,
        EventKind::ConnectionAccepted,
        EventKind::Ehlo,
        EventKind::MailFrom,
        EventKind::RcptTo,
        EventKind::GetListenerDomain,
        EventKind::Data,
        EventKind::MessageReceived,
        EventKind::AuthPlain,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EventKind::GetDynamicParameters => "smtp_server_get_dynamic_parameters",
            EventKind::ConnectionAccepted => "smtp_server_connection_accepted",
            EventKind::Ehlo => "smtp_server_ehlo",
            EventKind::MailFrom => "smtp_server_mail_from",
            EventKind::RcptTo => "smtp_server_rcpt_to",
            EventKind::GetListenerDomain => "get_listener_domain",
            EventKind::Data => "smtp_server_data",
            EventKind::MessageReceived => "smtp_server_message_received",
            EventKind::AuthPlain => "smtp_server_auth_plain",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// An event with its arguments.
#[derive(Debug)]
pub enum Event {
    GetDynamicParameters { listener: Arc<str>, meta: MetaStore },
    ConnectionAccepted { meta: MetaStore },
    Ehlo { domain: String, meta: MetaStore, extensions: Vec<String> },
    MailFrom { sender: Mailbox, meta: MetaStore },
    RcptTo { recipient: Mailbox, meta: MetaStore },
    GetListenerDomain { domain: String, listener: Arc<str>, meta: MetaStore },
    Data { message: Arc<Message>, meta: MetaStore },
    MessageReceived { message: Arc<Message>, meta: MetaStore },
    AuthPlain { credentials: PlainCredentials, meta: MetaStore },
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self {
            Event::GetDynamicParameters { .. } => EventKind::GetDynamicParameters,
            Event::ConnectionAccepted { .. } => EventKind::ConnectionAccepted,
            Event::Ehlo { .. } => EventKind::Ehlo,
            Event::MailFrom { .. } => EventKind::MailFrom,
            Event::RcptTo { .. } => EventKind::RcptTo,
            Event::GetListenerDomain { .. } => EventKind::GetListenerDomain,
            Event::Data { .. } => EventKind::Data,
            Event::MessageReceived { .. } => EventKind::MessageReceived,
            Event::AuthPlain { .. } => EventKind::AuthPlain,
        }
    }
}

/// A handler's successful result, already converted to native types.
#[derive(Debug)]
pub enum Response {
    Nothing,
    /// Shared: a `ListenerParams` returned again and again is not copied.
    Params(Arc<GenericParams>),
    Extensions(Vec<String>),
    ListenerDomain(ListenerDomain),
    /// What `smtp_server_auth_plain` decided.
    Authenticated(bool),
}

/// How a policy call ended.
#[derive(Debug)]
pub enum Outcome {
    Done(Response),
    /// The handler raised `Reject(code, text)`.
    Reject {
        code: u16,
        text: String,
    },
    /// The handler raised, returned something unusable, or timed out. Already logged.
    Failed(String),
}

/// One queued policy call, completed exactly once by the Python side.
#[derive(Debug)]
pub struct Call {
    pub event: Event,
    reply: oneshot::Sender<Outcome>,
}

impl Call {
    pub fn finish(self, outcome: Outcome) {
        // The session may have gone away (timeout, disconnect); nothing to do then.
        let _ = self.reply.send(outcome);
    }
}

/// A log record for Python's `kumo_listener` logger; levels are Python's.
#[derive(Debug)]
pub struct LogRecord {
    pub level: u8,
    pub message: String,
}

pub const LOG_DEBUG: u8 = 10;
pub const LOG_INFO: u8 = 20;
pub const LOG_WARNING: u8 = 30;
pub const LOG_ERROR: u8 = 40;

/// How many records below the logger's last known level may wait for
/// Python (see [`Bridge::log`]).
pub const MAX_QUIET_RECORDS: usize = 10_000;

#[derive(Default)]
struct Queue {
    calls: Vec<Call>,
    logs: Vec<LogRecord>,
    /// Records below the logger's level as last known, kept for
    /// [`Bridge::refresh_log_level`].
    quiet: Vec<LogRecord>,
    /// Outcomes waiting for the next [`Bridge::hand_over_finished`].
    finished: Vec<(Call, Outcome)>,
    /// A wake-up byte is in the pipe and not yet drained.
    notified: bool,
}

pub struct Bridge {
    queue: Mutex<Queue>,
    /// Wakes a [`crate::driver::Driver`] run by the Python thread.
    work: Notify,
    /// Whether Python waits for the wake-up socket (its loop runs apart from the sessions).
    wake_socket_watched: AtomicBool,
    wake_writer: UnixStream,
    wake_reader: UnixStream,
    registered: AtomicU32,
    log_level: AtomicU8,
}

impl Bridge {
    pub fn new() -> std::io::Result<Self> {
        let (wake_writer, wake_reader) = UnixStream::pair()?;
        wake_writer.set_nonblocking(true)?;
        wake_reader.set_nonblocking(true)?;
        Ok(Self {
            queue: Mutex::default(),
            work: Notify::new(),
            wake_socket_watched: AtomicBool::new(false),
            wake_writer,
            wake_reader,
            registered: AtomicU32::new(0),
            log_level: AtomicU8::new(LOG_DEBUG),
        })
    }

    /// The descriptor the Python loop watches for readability when it runs
    /// apart from the sessions; from now on every queued call writes to it.
    pub fn watch_wake_fd(&self) -> RawFd {
        self.wake_socket_watched.store(true, Ordering::Release);
        self.wake_reader.as_raw_fd()
    }

    /// Resolves when work for Python is queued after it was enabled (see [`Notify::notified`]).
    pub fn work_queued(&self) -> Notified<'_> {
        self.work.notified()
    }

    /// Calls or records that Python should take now.
    pub fn has_work(&self) -> bool {
        self.lock().notified
    }

    pub fn set_registered(&self, kinds: impl IntoIterator<Item = EventKind>) {
        let mask = kinds.into_iter().fold(0, |mask, kind| mask | kind.bit());
        self.registered.store(mask, Ordering::Release);
    }

    pub fn is_registered(&self, kind: EventKind) -> bool {
        self.registered.load(Ordering::Acquire) & kind.bit() != 0
    }

    /// Queue `event` for Python and wait up to `timeout` for its outcome.
    pub async fn call(&self, event: Event, timeout: Duration) -> Outcome {
        let kind = event.kind();
        let (reply, outcome) = oneshot::channel();
        self.push(|queue| queue.calls.push(Call { event, reply }));
        match tokio::time::timeout(timeout, outcome).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Outcome::Failed(format!("{} handler was dropped without an answer", kind.name())),
            Err(_) => {
                let message = format!("{} handler did not finish within {timeout:?}", kind.name());
                self.log(LOG_ERROR, || message.clone());
                Outcome::Failed(message)
            }
        }
    }

    /// Queue a record for Python's logger. One below the level the logger
    /// had when Python last said neither wakes Python nor reaches it with
    /// the calls: it waits for [`Bridge::refresh_log_level`] (once a
    /// second), where the logger's level at that moment decides. At most
    /// [`MAX_QUIET_RECORDS`] of those wait; more are dropped unformatted.
    pub fn log(&self, level: u8, message: impl FnOnce() -> String) {
        let wanted = level >= self.log_level.load(Ordering::Relaxed);
        let mut queue = self.lock();
        if wanted {
            queue.logs.push(LogRecord { level, message: message() });
            self.notify(&mut queue);
        } else if queue.quiet.len() < MAX_QUIET_RECORDS {
            queue.quiet.push(LogRecord { level, message: message() });
        }
    }

    /// Take the effective level of Python's `kumo_listener` logger, and
    /// return the records queued below the previous one that it lets through.
    pub fn refresh_log_level(&self, level: u8) -> Vec<LogRecord> {
        self.log_level.store(level, Ordering::Relaxed);
        let quiet = std::mem::take(&mut self.lock().quiet);
        quiet.into_iter().filter(|record| record.level >= level).collect()
    }

    /// Complete a call. While Python drives the runtime, the outcome waits
    /// for the next drive, which hands it over from inside the runtime:
    /// there, waking the session costs no system call.
    pub fn finish(&self, call: Call, outcome: Outcome) {
        if self.wake_socket_watched.load(Ordering::Acquire) {
            call.finish(outcome);
        } else {
            self.lock().finished.push((call, outcome));
        }
    }

    pub fn hand_over_finished(&self) {
        let finished = std::mem::take(&mut self.lock().finished);
        for (call, outcome) in finished {
            call.finish(outcome);
        }
    }

    /// Everything queued so far. Drains the wake-up socket first, so a call
    /// queued after this returns always writes a fresh wake-up byte.
    pub fn take(&self) -> (Vec<Call>, Vec<LogRecord>) {
        let mut queue = self.lock();
        if queue.notified {
            // One byte at most is ever in flight: `notified` gates the writes.
            let _ = (&self.wake_reader).read(&mut [0u8; 1]);
            queue.notified = false;
        }
        (std::mem::take(&mut queue.calls), std::mem::take(&mut queue.logs))
    }

    fn push(&self, add: impl FnOnce(&mut Queue)) {
        let mut queue = self.lock();
        add(&mut queue);
        self.notify(&mut queue);
    }

    fn notify(&self, queue: &mut Queue) {
        if !queue.notified {
            queue.notified = true;
            self.work.notify_waiters();
            if self.wake_socket_watched.load(Ordering::Acquire) {
                // An error means the reader is gone: nobody is left to wake.
                let _ = (&self.wake_writer).write(&[1]);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(bridge: &Bridge) -> bool {
        let mut fds = libc::pollfd { fd: bridge.watch_wake_fd(), events: libc::POLLIN, revents: 0 };
        unsafe { libc::poll(&mut fds, 1, 0) == 1 }
    }

    #[test]
    fn event_names_round_trip() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(EventKind::from_name("init"), None);
    }

    #[test]
    fn registration_mask() {
        let bridge = Bridge::new().unwrap();
        bridge.set_registered([EventKind::Ehlo, EventKind::Data]);
        assert!(bridge.is_registered(EventKind::Ehlo));
        assert!(!bridge.is_registered(EventKind::RcptTo));
    }

    #[tokio::test]
    async fn a_call_wakes_the_reader_and_gets_its_outcome() {
        let bridge = Arc::new(Bridge::new().unwrap());
        assert!(!readable(&bridge));
        let caller = {
            let bridge = bridge.clone();
            tokio::spawn(async move {
                let event = Event::ConnectionAccepted { meta: MetaStore::new() };
                bridge.call(event, Duration::from_secs(5)).await
            })
        };
        while !readable(&bridge) {
            tokio::task::yield_now().await;
        }
        let (calls, _) = bridge.take();
        assert!(!readable(&bridge));
        assert_eq!(calls.len(), 1);
        calls.into_iter().for_each(|c| c.finish(Outcome::Reject { code: 550, text: "no".into() }));
        assert!(matches!(caller.await.unwrap(), Outcome::Reject { code: 550, .. }));
    }

    #[test]
    fn a_record_below_the_level_waits_without_waking() {
        let bridge = Bridge::new().unwrap();
        bridge.refresh_log_level(LOG_WARNING);
        bridge.log(LOG_DEBUG, || "quieter".into());
        bridge.log(LOG_INFO, || "quiet".into());
        assert!(!readable(&bridge));
        bridge.log(LOG_WARNING, || "loud".into());
        assert!(readable(&bridge));
        let messages = |logs: Vec<LogRecord>| logs.into_iter().map(|record| record.message).collect::<Vec<_>>();
        assert_eq!(messages(bridge.take().1), ["loud"]);
        // The level lowered to INFO meanwhile: the INFO record is Python's now.
        assert_eq!(messages(bridge.refresh_log_level(LOG_INFO)), ["quiet"]);
        assert!(bridge.refresh_log_level(LOG_DEBUG).is_empty());
    }

    #[test]
    fn records_below_the_level_are_bounded() {
        let bridge = Bridge::new().unwrap();
        bridge.refresh_log_level(LOG_ERROR);
        for _ in 0..MAX_QUIET_RECORDS + 5 {
            bridge.log(LOG_DEBUG, String::new);
        }
        assert_eq!(bridge.refresh_log_level(LOG_DEBUG).len(), MAX_QUIET_RECORDS);
    }

    #[tokio::test]
    async fn an_unanswered_call_times_out() {
        let bridge = Bridge::new().unwrap();
        let event = Event::ConnectionAccepted { meta: MetaStore::new() };
        let outcome = bridge.call(event, Duration::from_millis(10)).await;
        assert!(matches!(outcome, Outcome::Failed(m) if m.contains("did not finish")));
        let (_, logs) = bridge.take();
        assert_eq!(logs.len(), 1);
    }
}
