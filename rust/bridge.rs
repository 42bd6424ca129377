//! The queue between tokio sessions and the Python thread.
//!
//! Sessions never touch Python: they push a [`Call`] and await its outcome.
//! Python learns of it from the [`crate::driver::Driver`] it is driving
//! ([`Bridge::work_queued`]), or, when its loop runs apart from the
//! sessions, from [`Bridge::watch_wake_fd`]; it takes every queued call in
//! one go and completes each (possibly later, for `async def` handlers).
//! Log records ([`crate::log`]) travel the same way so that Rust events
//! reach Python's `logging`. What a call carries is in [`crate::events`].

use crate::events::{Event, EventKind, Outcome};
use crate::handler_threads::{HandlerThreads, Taken, PATIENCE};
use crate::log::{self, LogEntry, LogFormat, LogLevel, LogRecord, LogRecords, LOG_ERROR};
use crate::policy_latency::PolicyLatency;
use ipnet::IpNet;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::futures::Notified;
use tokio::sync::{oneshot, Notify};

thread_local! {
    /// Whether this thread drives the runtime (see [`Bridge::finish`]).
    static DRIVES_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// One queued policy call, completed exactly once by the Python side.
#[derive(Debug)]
pub struct Call {
    pub event: Event,
    /// The client whose session waits, as the per-client limits count it
    /// (`None`: exempt from them), so that Python can share its handler
    /// threads fairly between clients.
    pub client: Option<IpNet>,
    reply: oneshot::Sender<Outcome>,
    /// Set when a handler thread takes the call (calls for the loop have none).
    taken: Option<Arc<AtomicBool>>,
}

impl Call {
    /// Whether the session stopped waiting (it timed out, or its client
    /// went away): a call not yet started need not run.
    pub fn is_abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    pub fn finish(self, outcome: Outcome) {
        // The session may have gone away (timeout, disconnect); nothing to do then.
        let _ = self.reply.send(outcome);
    }
}

#[derive(Default)]
struct Queue {
    calls: Vec<Call>,
    logs: LogRecords,
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
    /// The events whose handlers run on the handler threads (plain `def`).
    threaded: AtomicU32,
    /// Where their calls wait; set once, by the Python side.
    handler_threads: std::sync::OnceLock<HandlerThreads<IpNet, Call>>,
    log_level: LogLevel,
    /// Whether records need their fields: not when the core writes them as text.
    log_fields_wanted: AtomicBool,
    /// Calls queued or running in Python whose sessions still wait.
    waiting: AtomicUsize,
    busy_at: AtomicUsize,
    latency: PolicyLatency,
}

/// The default of [`Bridge::set_busy_at`]: far beyond what a healthy policy
/// keeps waiting, well below what would take minutes to drain.
pub const DEFAULT_BUSY_AT: usize = 1000;

/// Counts one waiting call for as long as it lives (a session dropped
/// while waiting stops counting too).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn count(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, Ordering::Relaxed);
        Self(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
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
            threaded: AtomicU32::new(0),
            handler_threads: std::sync::OnceLock::new(),
            log_level: LogLevel::default(),
            log_fields_wanted: AtomicBool::new(true),
            waiting: AtomicUsize::new(0),
            busy_at: AtomicUsize::new(DEFAULT_BUSY_AT),
            latency: PolicyLatency::default(),
        })
    }

    /// From how many calls waiting for Python on the server is busy (see [`Bridge::is_busy`]).
    pub fn set_busy_at(&self, calls: usize) {
        self.busy_at.store(calls.max(1), Ordering::Relaxed);
    }

    /// How long policy calls took, per event.
    pub fn latency(&self) -> &PolicyLatency {
        &self.latency
    }

    /// Whether so many calls wait for Python that new connections should be
    /// turned away (load shedding) rather than queue up behind them.
    pub fn is_busy(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) >= self.busy_at.load(Ordering::Relaxed)
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

    /// Give the calls of `kinds` to the handler threads rather than to the
    /// Python loop (once [`Bridge::start_handler_threads`] made them).
    pub fn set_threaded(&self, kinds: impl IntoIterator<Item = EventKind>) {
        let mask = kinds.into_iter().fold(0, |mask, kind| mask | kind.bit());
        self.threaded.store(mask, Ordering::Release);
    }

    /// The queue of at most `size` handler threads (made the first time;
    /// after that, open again with the size it was made with).
    pub fn start_handler_threads(&self, size: usize) -> &HandlerThreads<IpNet, Call> {
        let threads = self.handler_threads.get_or_init(|| HandlerThreads::new(size));
        threads.reopen();
        threads
    }

    pub fn handler_threads(&self) -> Option<&HandlerThreads<IpNet, Call>> {
        self.handler_threads.get()
    }

    /// Queue `call` for a handler thread (see [`crate::handler_threads`]);
    /// given back when there are none.
    pub fn run_on_handler_thread(&self, call: Call) -> Option<Call> {
        match self.handler_threads.get() {
            Some(threads) => {
                threads.push(call.client, call);
                None
            }
            None => Some(call),
        }
    }

    /// `outcome`, having woken an idle handler thread if no thread took
    /// the call (`taken`) within [`PATIENCE`]: those running may be blocked.
    async fn nudging(
        &self,
        outcome: oneshot::Receiver<Outcome>,
        taken: Option<Arc<AtomicBool>>,
    ) -> Result<Outcome, oneshot::error::RecvError> {
        let Some(taken) = taken else { return outcome.await };
        tokio::pin!(outcome);
        tokio::select! {
            biased;
            answer = &mut outcome => return answer,
            () = tokio::time::sleep(PATIENCE) => {}
        }
        if !taken.load(Ordering::Acquire) {
            if let Some(threads) = self.handler_threads.get() {
                threads.nudge();
            }
        }
        outcome.await
    }

    /// Wait (blocking) for a call for a handler thread, having finished one
    /// of `finished`'s, if any; `None` once the threads are closed.
    pub fn take_for_handler_thread(&self, finished: Option<Option<IpNet>>) -> Option<Taken<IpNet, Call>> {
        let taken = self.handler_threads.get()?.take(finished, Call::is_abandoned)?;
        if let Some(flag) = &taken.item.taken {
            flag.store(true, Ordering::Release);
        }
        Some(taken)
    }

    /// Queue `event` for Python and wait up to `timeout` for its outcome.
    /// Dropping the future abandons the call (see [`Call::is_abandoned`]).
    pub async fn call(&self, event: Event, client: Option<IpNet>, timeout: Duration) -> Outcome {
        let kind = event.kind();
        let _waiting = Waiting::count(&self.waiting);
        let (reply, outcome) = oneshot::channel();
        let threaded = self.threaded.load(Ordering::Acquire) & kind.bit() != 0 && self.handler_threads.get().is_some();
        let taken = threaded.then(|| Arc::new(AtomicBool::new(false)));
        let call = Call { event, client, reply, taken: taken.clone() };
        let left = if threaded { self.run_on_handler_thread(call) } else { Some(call) };
        if let Some(call) = left {
            self.push(|queue| queue.calls.push(call));
        }
        let started = std::time::Instant::now();
        let answered = tokio::time::timeout(timeout, self.nudging(outcome, taken)).await;
        self.latency.observe(kind, started.elapsed());
        match answered {
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
    /// second), where the logger's level at that moment decides (see
    /// [`LogRecords::push`] for the bound).
    pub fn log<E: Into<LogEntry>>(&self, level: u8, message: impl FnOnce() -> E) {
        let wanted = self.log_level.wants(level);
        let mut queue = self.lock();
        if queue.logs.push(wanted, level, || message().into()) {
            self.notify(&mut queue);
        }
    }

    /// Write the records Python's logger wants to standard error ourselves,
    /// in `format`, instead of handing them to Python (see [`crate::log`]).
    pub fn write_logs_directly(&self, format: LogFormat) {
        self.log_fields_wanted.store(format == LogFormat::Json, Ordering::Relaxed);
        self.lock().logs.write_directly(format);
    }

    /// Whether a record's fields will be read (see [`Bridge::write_logs_directly`]).
    pub fn log_fields_wanted(&self) -> bool {
        self.log_fields_wanted.load(Ordering::Relaxed)
    }

    /// Write out the lines that [`Bridge::write_logs_directly`] has kept.
    pub fn flush_logs(&self) {
        log::write_to_stderr(&self.take_log_output());
    }

    /// The lines that [`Bridge::write_logs_directly`] has kept, for the caller to write.
    pub fn take_log_output(&self) -> Vec<u8> {
        self.lock().logs.take_direct_output()
    }

    /// Take the effective level of Python's `kumo_listener` logger, and
    /// return the records queued below the previous one that it lets through.
    pub fn refresh_log_level(&self, level: u8) -> Vec<LogRecord> {
        self.log_level.set(level);
        self.lock().logs.take_quiet(level)
    }

    /// Complete a call. On the thread that drives the runtime, the outcome
    /// waits for the next drive, which hands it over from inside the
    /// runtime: there, waking the session costs no system call. From any
    /// other thread (a handler thread's), it goes at once: the session's
    /// wake-up wakes the runtime, and the driving thread need not.
    pub fn finish(&self, call: Call, outcome: Outcome) {
        if self.wake_socket_watched.load(Ordering::Acquire) || !DRIVES_HERE.get() {
            call.finish(outcome);
        } else {
            self.lock().finished.push((call, outcome));
        }
    }

    /// Called by the thread that drives the runtime, before it runs the sessions.
    pub fn hand_over_finished(&self) {
        DRIVES_HERE.set(true);
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
        (std::mem::take(&mut queue.calls), queue.logs.take())
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
    use crate::log::{LOG_DEBUG, LOG_INFO, LOG_WARNING};
    use crate::meta::MetaStore;
    use std::sync::Arc;

    fn readable(bridge: &Bridge) -> bool {
        let mut fds = libc::pollfd { fd: bridge.watch_wake_fd(), events: libc::POLLIN, revents: 0 };
        unsafe { libc::poll(&mut fds, 1, 0) == 1 }
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
                bridge.call(event, None, Duration::from_secs(5)).await
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

    #[tokio::test]
    async fn a_call_whose_caller_is_gone_is_abandoned() {
        let bridge = Bridge::new().unwrap();
        let event = Event::ConnectionAccepted { meta: MetaStore::new() };
        let client = Some("2001:db8::/84".parse().unwrap());
        let waiting = bridge.call(event, client, Duration::from_secs(5));
        // Polled once: queued, then dropped (the session went away).
        assert!(tokio::time::timeout(Duration::from_millis(1), waiting).await.is_err());
        let (calls, _) = bridge.take();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].client, client);
        assert!(calls[0].is_abandoned());
        assert!(!bridge.is_busy() && bridge.waiting.load(Ordering::Relaxed) == 0);
    }

    #[test]
    fn a_record_below_the_level_waits_without_waking() {
        let bridge = Bridge::new().unwrap();
        bridge.refresh_log_level(LOG_WARNING);
        bridge.log(LOG_DEBUG, || String::from("quieter"));
        bridge.log(LOG_INFO, || String::from("quiet"));
        assert!(!readable(&bridge));
        bridge.log(LOG_WARNING, || String::from("loud"));
        assert!(readable(&bridge));
        let messages = |logs: Vec<LogRecord>| logs.into_iter().map(|record| record.message).collect::<Vec<_>>();
        assert_eq!(messages(bridge.take().1), ["loud"]);
        // The level lowered to INFO meanwhile: the INFO record is Python's now.
        assert_eq!(messages(bridge.refresh_log_level(LOG_INFO)), ["quiet"]);
        assert!(bridge.refresh_log_level(LOG_DEBUG).is_empty());
    }

    #[tokio::test]
    async fn an_unanswered_call_times_out() {
        let bridge = Bridge::new().unwrap();
        let event = Event::ConnectionAccepted { meta: MetaStore::new() };
        let outcome = bridge.call(event, None, Duration::from_millis(10)).await;
        assert!(matches!(outcome, Outcome::Failed(m) if m.contains("did not finish")));
        let (_, logs) = bridge.take();
        assert_eq!(logs.len(), 1);
    }
}
