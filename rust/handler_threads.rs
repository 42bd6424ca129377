//! The queue that `def` handlers' calls wait in for a handler thread.
//!
//! As in FastAPI, a plain `def` handler runs on a thread of a pool, so one
//! that blocks (a synchronous database client, an HTTP call) does not hold
//! up the sessions. The threads are Python's (`kumo_listener.server` starts
//! them); each waits here, GIL released, and a session's call reaches it
//! without passing through the Python loop: one hand-off each way.
//!
//! The pool is shared fairly between clients (as the per-client limits count
//! them): one client runs handlers on at most [`fair_share`] of the threads
//! at once, and clients with calls waiting take turns, one call each. A call
//! whose session stopped waiting before a thread took it is dropped unrun.
//!
//! Handlers hold the GIL while they run, so two threads running quick ones
//! only take turns at it, at the price of two thread switches per call. So
//! a thread that finishes a call takes the next one waiting, and a new call
//! wakes a thread only when none is running one; a call that has waited
//! [`PATIENCE`] without a thread (those running may be blocked: a slow
//! database, a lock) wakes another with [`HandlerThreads::nudge`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Condvar, Mutex, MutexGuard};

/// How long a call waits for a busy thread before it wakes an idle one.
pub const PATIENCE: std::time::Duration = std::time::Duration::from_millis(1);

/// Threads started by default: AnyIO's (and so FastAPI's), enough for
/// handlers that wait on I/O.
pub const DEFAULT_HANDLER_THREADS: usize = 40;

/// The most threads one client's handlers run on at once, of `size`.
pub fn fair_share(size: usize) -> usize {
    (size / 4).max(1)
}

/// Calls waiting per client, served in turn, with a cap on each client's
/// calls running at once. `None` is a client exempt from the per-client
/// limits: it shares no cap. Pure logic: no threads, no clock.
pub struct FairQueue<K, T> {
    per_client: usize,
    waiting: HashMap<Option<K>, VecDeque<T>>,
    running: HashMap<K, usize>,
    /// The clients with a call waiting that may start now, in turn order.
    turns: VecDeque<Option<K>>,
    in_turn: HashSet<Option<K>>,
}

impl<K: Copy + Eq + Hash, T> FairQueue<K, T> {
    pub fn new(per_client: usize) -> Self {
        Self {
            per_client: per_client.max(1),
            waiting: HashMap::new(),
            running: HashMap::new(),
            turns: VecDeque::new(),
            in_turn: HashSet::new(),
        }
    }

    pub fn push(&mut self, client: Option<K>, item: T) {
        self.waiting.entry(client).or_default().push_back(item);
        self.take_turn(client);
    }

    /// Whether a call may start now.
    pub fn has_startable(&self) -> bool {
        !self.turns.is_empty()
    }

    /// The next call to run, counted as running until [`FairQueue::done`];
    /// the calls `abandoned` says nobody waits for are dropped on the way,
    /// and counted in the second value.
    pub fn next(&mut self, abandoned: impl Fn(&T) -> bool) -> (Option<(Option<K>, T)>, usize) {
        let mut dropped = 0;
        while let Some(client) = self.turns.pop_front() {
            self.in_turn.remove(&client);
            let queue = self.waiting.get_mut(&client).expect("a client in turn has calls waiting");
            let item = queue.pop_front().expect("a client's queue is never left empty");
            if queue.is_empty() {
                self.waiting.remove(&client);
            }
            if abandoned(&item) {
                dropped += 1;
                self.take_turn(client);
                continue;
            }
            if let Some(client) = client {
                *self.running.entry(client).or_default() += 1;
            }
            self.take_turn(client);
            return (Some((client, item)), dropped);
        }
        (None, dropped)
    }

    /// A call of `client`'s that [`FairQueue::next`] gave has finished.
    pub fn done(&mut self, client: Option<K>) {
        if let Some(key) = client {
            if let Some(running) = self.running.get_mut(&key) {
                *running -= 1;
                if *running == 0 {
                    self.running.remove(&key);
                }
            }
        }
        self.take_turn(client);
    }

    /// Put `client` in line, at the end, if it has a call that may start.
    fn take_turn(&mut self, client: Option<K>) {
        let may_start = client.is_none_or(|key| self.running.get(&key).copied().unwrap_or(0) < self.per_client);
        if may_start && self.waiting.contains_key(&client) && self.in_turn.insert(client) {
            self.turns.push_back(client);
        }
    }
}

/// What a handler thread takes: a call, and whether it should start one
/// more thread first (none is idle to take the next call, and the pool may
/// grow: one thread is kept spare so a new call never waits for a start).
pub struct Taken<K, T> {
    pub client: Option<K>,
    pub item: T,
    pub start_another: bool,
}

/// [`FairQueue`] shared by the sessions and at most `size` handler threads.
pub struct HandlerThreads<K, T> {
    size: usize,
    state: Mutex<Pool<K, T>>,
    wake: Condvar,
}

struct Pool<K, T> {
    queue: FairQueue<K, T>,
    /// Threads started or asked to start.
    threads: usize,
    idle: usize,
    /// Threads running a call.
    running: usize,
    /// Idle threads woken that have not taken a call yet.
    waking: usize,
    closing: bool,
    dropped: u64,
}

impl<K: Copy + Eq + Hash, T> HandlerThreads<K, T> {
    pub fn new(size: usize) -> Self {
        let size = size.max(1);
        let queue = FairQueue::new(fair_share(size));
        let pool = Pool { queue, threads: 0, idle: 0, running: 0, waking: 0, closing: false, dropped: 0 };
        Self { size, state: Mutex::new(pool), wake: Condvar::new() }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Count a thread the caller starts (the first; the others are asked for by [`Taken`]).
    pub fn thread_started(&self) {
        self.lock().threads += 1;
    }

    /// Queue a call; it wakes a thread only if none is running one (a
    /// running thread takes it when done, or [`HandlerThreads::nudge`] helps).
    pub fn push(&self, client: Option<K>, item: T) {
        let mut pool = self.lock();
        pool.queue.push(client, item);
        if pool.running == 0 {
            self.wake_one(&mut pool);
        }
    }

    /// A call has waited [`PATIENCE`] and no thread took it: wake an idle
    /// one, unless one is on its way already.
    pub fn nudge(&self) {
        let mut pool = self.lock();
        if pool.waking == 0 && pool.queue.has_startable() {
            self.wake_one(&mut pool);
        }
    }

    fn wake_one(&self, pool: &mut Pool<K, T>) {
        if pool.idle > pool.waking {
            pool.waking += 1;
            self.wake.notify_one();
        }
    }

    /// Wait for the next call; `None` once [`HandlerThreads::close`] was
    /// called and nothing is left to run (the thread is counted off then).
    /// `finished` is the client of the call this thread ran last.
    pub fn take(&self, finished: Option<Option<K>>, abandoned: impl Fn(&T) -> bool) -> Option<Taken<K, T>> {
        let mut pool = self.lock();
        if let Some(client) = finished {
            pool.queue.done(client);
            pool.running -= 1;
        }
        loop {
            let (next, dropped) = pool.queue.next(&abandoned);
            pool.dropped += dropped as u64;
            if let Some((client, item)) = next {
                pool.running += 1;
                let start_another = pool.idle == 0 && pool.threads < self.size;
                if start_another {
                    pool.threads += 1;
                }
                return Some(Taken { client, item, start_another });
            }
            if pool.closing {
                pool.threads -= 1;
                return None;
            }
            pool.idle += 1;
            pool = self.wake.wait(pool).unwrap_or_else(|poisoned| poisoned.into_inner());
            pool.idle -= 1;
            pool.waking = pool.waking.saturating_sub(1);
        }
    }

    /// Serve again after [`HandlerThreads::close`] (a server run again).
    pub fn reopen(&self) {
        self.lock().closing = false;
    }

    /// Let every thread end once the calls queued before are done.
    pub fn close(&self) {
        self.lock().closing = true;
        self.wake.notify_all();
    }

    /// Calls dropped unrun because nobody waited for them any more.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    pub fn threads(&self) -> usize {
        self.lock().threads
    }

    fn lock(&self) -> MutexGuard<'_, Pool<K, T>> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take_all(queue: &mut FairQueue<u8, &'static str>) -> Vec<&'static str> {
        std::iter::from_fn(|| queue.next(|_| false).0.map(|(_, item)| item)).collect()
    }

    #[test]
    fn one_client_runs_at_most_its_share_and_others_go_ahead() {
        let mut queue = FairQueue::new(2);
        for name in ["a0", "a1", "a2", "a3"] {
            queue.push(Some(1), name);
        }
        queue.push(Some(2), "b0");
        for name in ["x0", "x1", "x2"] {
            queue.push(None, name);
        }
        assert_eq!(take_all(&mut queue), ["a0", "b0", "x0", "a1", "x1", "x2"]);
        queue.done(Some(1));
        assert_eq!(take_all(&mut queue), ["a2"]);
    }

    #[test]
    fn clients_with_calls_waiting_take_turns() {
        let mut queue = FairQueue::new(10);
        for name in ["a0", "a1", "a2"] {
            queue.push(Some(1), name);
        }
        queue.push(Some(2), "b0");
        queue.push(Some(3), "c0");
        assert_eq!(take_all(&mut queue), ["a0", "b0", "c0", "a1", "a2"]);
    }

    #[test]
    fn a_call_nobody_waits_for_is_dropped_before_it_starts() {
        let mut queue = FairQueue::new(1);
        queue.push(Some(1), "gone");
        queue.push(Some(1), "waited");
        let (next, dropped) = queue.next(|item| *item == "gone");
        assert_eq!((next.map(|(_, item)| item), dropped), (Some("waited"), 1));
        // The dropped call never ran: it takes none of the client's share.
        queue.push(Some(1), "later");
        assert!(queue.next(|_| false).0.is_none(), "waits for the running one");
        queue.done(Some(1));
        assert_eq!(queue.next(|_| false).0.map(|(_, item)| item), Some("later"));
    }

    #[test]
    fn the_pool_asks_for_a_thread_while_none_is_idle_up_to_its_size() {
        let pool = HandlerThreads::<u8, u32>::new(2);
        pool.thread_started();
        for call in 0..3 {
            pool.push(None, call);
        }
        let first = pool.take(None, |_| false).unwrap();
        assert!(first.start_another, "no thread idle, room for one more");
        let second = pool.take(None, |_| false).unwrap();
        assert!(!second.start_another, "the pool is at its size");
        pool.close();
        assert_eq!(pool.take(Some(None), |_| false).map(|taken| taken.item), Some(2));
        assert!(pool.take(Some(None), |_| false).is_none());
        assert_eq!(pool.threads(), 1);
    }

    #[test]
    fn a_waiting_thread_is_woken_by_a_call() {
        let pool = std::sync::Arc::new(HandlerThreads::<u8, u32>::new(4));
        pool.thread_started();
        let waiter = pool.clone();
        let thread = std::thread::spawn(move || waiter.take(None, |_| false).map(|taken| taken.item));
        std::thread::sleep(std::time::Duration::from_millis(20));
        pool.push(Some(7), 42);
        assert_eq!(thread.join().unwrap(), Some(42));
    }

    #[test]
    fn a_call_wakes_an_idle_thread_only_when_none_runs_or_it_waited_too_long() {
        let pool = std::sync::Arc::new(HandlerThreads::<u8, u32>::new(4));
        pool.thread_started();
        pool.thread_started();
        pool.push(None, 1);
        let running = pool.take(None, |_| false).unwrap();
        let idle = pool.clone();
        let thread = std::thread::spawn(move || idle.take(None, |_| false).map(|taken| taken.item));
        std::thread::sleep(std::time::Duration::from_millis(20));
        pool.push(None, 2);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!thread.is_finished(), "the running thread takes it when done");
        pool.nudge();
        assert_eq!(thread.join().unwrap(), Some(2));
        assert_eq!(running.item, 1);
    }
}
