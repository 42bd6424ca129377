//! The tokio runtime of one server: a single-threaded scheduler, driven
//! either by the Python thread itself or by a thread of its own.
//!
//! Driven by Python (what `kumo_listener` does when it owns the asyncio
//! loop), a policy call needs no thread switch: asyncio's selector calls
//! [`Driver::drive`], which runs the sessions with the GIL released until
//! one of them queues a call for Python, asyncio's own file descriptors
//! are ready, or asyncio's next timer is due. Python then runs the handlers
//! and drives again. On a machine of few cores, the two context switches a
//! call between threads costs are most of what a policy hook costs.
//!
//! When Python's loop is not ours (`await Server.run()` on the caller's
//! loop), [`Driver::drive_in_background`] runs the same runtime on a thread
//! and calls reach Python through the bridge's wake-up socket instead.
//!
//! One process uses one core either way; `serve --workers N` uses N.

use crate::bridge::Bridge;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::runtime::{Builder, Handle, Runtime};
use tokio::sync::Notify;

pub struct Driver {
    runtime: Arc<Runtime>,
    /// Asyncio's selector, registered with the runtime once it is first watched.
    watched: Mutex<Option<Watched>>,
    background: Mutex<Option<Background>>,
}

/// A descriptor of Python's, watched for readability through a duplicate of
/// our own, so that Python closing its descriptor can't leave the runtime
/// watching whatever reuses the number.
struct Watched {
    number: RawFd,
    duplicate: AsyncFd<OwnedFd>,
}

impl Watched {
    fn new(number: RawFd) -> io::Result<Self> {
        // SAFETY: the caller passes a descriptor that is open during the call.
        let duplicate = unsafe { BorrowedFd::borrow_raw(number) }.try_clone_to_owned()?;
        // SAFETY: the duplicate is ours and stays open as long as the AsyncFd holds it.
        let duplicate = unsafe { AsyncFd::register_with_interest(duplicate, Interest::READABLE) }
            .map_err(|error| error.into_parts().1)?;
        Ok(Self { number, duplicate })
    }
}

struct Background {
    stop: Arc<Notify>,
    thread: JoinHandle<()>,
}

impl Driver {
    pub fn new() -> io::Result<Self> {
        let runtime = Builder::new_current_thread().enable_all().build()?;
        Ok(Self { runtime: Arc::new(runtime), watched: Mutex::default(), background: Mutex::default() })
    }

    pub fn handle(&self) -> &Handle {
        self.runtime.handle()
    }

    /// Run the sessions until `bridge` has work for Python, `watched`
    /// (asyncio's selector) is readable, or `timeout` has passed (`None`:
    /// no limit). Whatever is ready runs at least once, even with a zero
    /// timeout. Returns whether `watched` is readable. Call it from the
    /// Python thread, GIL released.
    pub fn drive(&self, bridge: &Bridge, watched: RawFd, timeout: Option<Duration>) -> io::Result<bool> {
        let mut registered = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        self.runtime.block_on(async {
            if registered.as_ref().is_none_or(|known| known.number != watched) {
                *registered = Some(Watched::new(watched)?);
            }
            let watched = &registered.as_ref().expect("registered above").duplicate;
            bridge.hand_over_finished();
            // Let the sessions that are ready run, and poll the sockets once.
            tokio::task::yield_now().await;
            let deadline = timeout.map(|timeout| tokio::time::Instant::now() + timeout);
            wait_for_python(bridge, watched, deadline).await
        })
    }

    /// Forget the descriptor [`Driver::drive`] watched, when it is closed.
    pub fn unwatch(&self) {
        let registered = self.watched.lock().unwrap_or_else(PoisonError::into_inner).take();
        if registered.is_some() {
            let _entered = self.runtime.enter();
            drop(registered);
        }
    }

    /// Drive the runtime on a thread of its own until [`Driver::stop_background`].
    pub fn drive_in_background(&self) -> io::Result<()> {
        let mut background = self.background.lock().unwrap_or_else(PoisonError::into_inner);
        if background.is_some() {
            return Ok(());
        }
        let stop = Arc::new(Notify::new());
        let (runtime, stopped) = (self.runtime.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("kumo-listener".into())
            .spawn(move || runtime.block_on(stopped.notified()))?;
        *background = Some(Background { stop, thread });
        Ok(())
    }

    pub fn stop_background(&self) {
        let background = self.background.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(Background { stop, thread }) = background {
            // A stored permit: the thread stops even if it is not waiting yet.
            stop.notify_one();
            let _ = thread.join();
        }
    }
}

/// Whether `watched` is readable when the wait ends.
async fn wait_for_python(
    bridge: &Bridge,
    watched: &AsyncFd<OwnedFd>,
    deadline: Option<tokio::time::Instant>,
) -> io::Result<bool> {
    let readable = || is_readable(watched.as_raw_fd());
    loop {
        let work = bridge.work_queued();
        tokio::pin!(work);
        // Registered before looking, so that no work queued after the look is missed.
        work.as_mut().enable();
        if bridge.has_work() || deadline.is_some_and(|deadline| deadline <= tokio::time::Instant::now()) {
            return Ok(readable());
        }
        tokio::select! {
            biased;
            () = &mut work => return Ok(readable()),
            ready = watched.readable() => {
                let mut guard = ready?;
                if readable() {
                    return Ok(true);
                }
                // A readiness tokio remembers from before Python's last select.
                guard.clear_ready();
            }
            () = sleep_until(deadline) => return Ok(readable()),
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn is_readable(fd: RawFd) -> bool {
    let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, no wait.
    unsafe { libc::poll(&mut poll, 1, 0) == 1 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Event;
    use crate::log::LOG_ERROR;
    use crate::meta::MetaStore;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    fn driver_and_bridge() -> (Driver, Arc<Bridge>) {
        (Driver::new().unwrap(), Arc::new(Bridge::new().unwrap()))
    }

    #[test]
    fn returns_when_a_session_queues_a_call() {
        let (driver, bridge) = driver_and_bridge();
        let (watched, _other) = UnixStream::pair().unwrap();
        let caller = bridge.clone();
        driver.handle().spawn(async move {
            let event = Event::ConnectionAccepted { meta: MetaStore::new() };
            caller.call(event, None, Duration::from_secs(5)).await
        });
        assert!(!driver.drive(&bridge, watched.as_raw_fd(), None).unwrap());
        assert_eq!(bridge.take().0.len(), 1);
    }

    #[test]
    fn returns_when_the_watched_descriptor_is_readable() {
        let (driver, bridge) = driver_and_bridge();
        let (watched, mut other) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            std::io::Write::write_all(&mut other, b"x").unwrap();
            std::thread::sleep(Duration::from_secs(1));
        });
        assert!(driver.drive(&bridge, watched.as_raw_fd(), None).unwrap());
    }

    #[test]
    fn returns_at_the_timeout_and_runs_ready_sessions_even_with_none() {
        let (driver, bridge) = driver_and_bridge();
        let (watched, _other) = UnixStream::pair().unwrap();
        let started = Instant::now();
        driver.drive(&bridge, watched.as_raw_fd(), Some(Duration::from_millis(30))).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(30));
        let task = driver.handle().spawn(async {});
        driver.drive(&bridge, watched.as_raw_fd(), Some(Duration::ZERO)).unwrap();
        assert!(task.is_finished());
    }

    #[test]
    fn a_log_record_wakes_python_from_another_thread() {
        let (driver, bridge) = driver_and_bridge();
        let (watched, _other) = UnixStream::pair().unwrap();
        let logger = bridge.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            logger.log(LOG_ERROR, || String::from("from a blocking thread"));
        });
        driver.drive(&bridge, watched.as_raw_fd(), None).unwrap();
        assert_eq!(bridge.take().1.len(), 1);
    }

    #[test]
    fn a_background_thread_drives_until_stopped() {
        let (driver, _bridge) = driver_and_bridge();
        driver.drive_in_background().unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        driver.handle().spawn(async move { sender.send(()).unwrap() });
        receiver.recv_timeout(Duration::from_secs(5)).unwrap();
        driver.stop_background();
    }
}
