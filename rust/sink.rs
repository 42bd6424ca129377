//! Where accepted messages go: a durable Maildir, or nowhere (benchmarks).

use crate::body::{Body, SpilledBody};
use crate::message::Message;
use crate::protocol::parser::Mailbox;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

#[derive(Debug, Clone)]
pub enum Sink {
    Maildir(Arc<Maildir>),
    Discard,
}

impl Sink {
    /// Store every message durably, or none of them.
    pub async fn deliver(&self, messages: Vec<Arc<Message>>) -> io::Result<()> {
        match self {
            Sink::Discard => Ok(()),
            Sink::Maildir(maildir) => maildir.submit(messages).await.map_err(io::Error::other)?,
        }
    }

    /// Where spilled bodies go by default: the Maildir's `tmp/`, whence
    /// delivering one is a rename.
    pub fn spool_dir(&self) -> PathBuf {
        match self {
            Sink::Discard => std::env::temp_dir(),
            Sink::Maildir(maildir) => maildir.files.tmp_dir(),
        }
    }

    /// What a body spilled into `dir` should start with so that the sink
    /// can deliver its file by renaming it: the envelope of its one
    /// recipient, when `dir` is the Maildir's `tmp/`; nothing otherwise.
    pub fn envelope_for(&self, dir: &Path, sender: &Mailbox, recipient: &Mailbox) -> Vec<u8> {
        match self {
            Sink::Maildir(maildir) if dir == maildir.files.tmp_dir() => {
                envelope(sender, std::slice::from_ref(recipient), 0)
            }
            _ => Vec::new(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Sink::Discard => "discard".into(),
            Sink::Maildir(maildir) => format!("Maildir {}", maildir.files.root.display()),
        }
    }
}

/// A Maildir (`tmp/`, `new/`, `cur/`). A message is written to `tmp/`, its
/// file system synced, renamed into `new/`, and the file system synced
/// again, so whatever is in `new/` is complete and survives a crash.
///
/// A committer thread does this for every delivery (group commit): each
/// round, a committer writes the deliveries that arrived, renames those whose
/// data its last round's sync made durable, and syncs once for both, so a
/// round costs one sync however many deliveries it carries, and no delivery
/// needs a thread of its own.
#[derive(Debug)]
pub struct Maildir {
    files: Arc<Files>,
    queue: Arc<Queue>,
}

/// Committer threads, each running its own rounds (its renames wait for its
/// own syncs). One: on this project's machine (ext4 without a journal, a
/// virtio disk whose cache flush takes about 70 µs) more committers only
/// contend: their `syncfs` calls serialize in the kernel and their creates and
/// renames spin on the same directories' locks. Reused connections, 50
/// sessions, medians of 5: 1 committer 63 µs of server CPU per message and
/// 14,100 msgs/s, 2: 75 µs and 11,500, 4: 88 µs and 10,300 (see
/// docs/operations/delivery.md). A disk whose flushes take milliseconds may
/// want more: then the flushes of several committers overlap.
const COMMITTERS: usize = 1;

/// Where and how the committers write.
#[derive(Debug)]
struct Files {
    root: PathBuf,
    host: String,
    sync: fn(&File) -> io::Result<()>,
}

type Answer = oneshot::Sender<io::Result<()>>;

/// The messages of one transaction, stored all or none, and who waits.
#[derive(Debug)]
struct Delivery {
    messages: Vec<Arc<Message>>,
    answer: Answer,
}

/// The deliveries waiting for the committer.
#[derive(Debug, Default)]
struct Queue {
    state: Mutex<QueueState>,
    arrived: Condvar,
}

#[derive(Debug, Default)]
struct QueueState {
    waiting: Vec<Delivery>,
    closed: bool,
}

/// A delivery whose files are staged (in `tmp/`) or in `new/`.
struct Staged {
    /// Where each file was staged: in `tmp/` under its name, or a spilled
    /// body's own file.
    paths: Vec<PathBuf>,
    /// Its name in `new/`.
    names: Vec<String>,
    answer: Answer,
    /// Held until answered: a spilled body's file goes with its message.
    _messages: Vec<Arc<Message>>,
}

impl Maildir {
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        Self::with_sync(root.into(), sync_file_system)
    }

    fn with_sync(root: PathBuf, sync: fn(&File) -> io::Result<()>) -> io::Result<Self> {
        for sub in ["tmp", "new", "cur"] {
            fs::create_dir_all(root.join(sub))?;
        }
        let host = gethostname::gethostname().to_string_lossy().replace(['/', ':'], "_");
        let files = Arc::new(Files { sync, root, host });
        let queue = Arc::new(Queue::default());
        for _ in 0..COMMITTERS {
            // Its own, held open from the start: `syncfs` reports to each open
            // file the write-back errors (of the background flusher too) that
            // happened since it was opened or last reported.
            let new_dir = File::open(files.root.join("new"))?;
            let (committer_files, committer_queue) = (files.clone(), queue.clone());
            std::thread::Builder::new()
                .name("maildir-commit".into())
                .spawn(move || commit_until_closed(&committer_files, &committer_queue, &new_dir))?;
        }
        Ok(Self { files, queue })
    }

    /// Hand messages to the committer; the answer comes once they are durable.
    fn submit(&self, messages: Vec<Arc<Message>>) -> oneshot::Receiver<io::Result<()>> {
        let (answer, receiver) = oneshot::channel();
        self.queue.lock().waiting.push(Delivery { messages, answer });
        self.queue.arrived.notify_one();
        receiver
    }
}

impl Drop for Maildir {
    /// The committer finishes what it holds, then ends.
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.arrived.notify_all();
    }
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What arrived since the last call; waits for something unless `in_flight`.
    /// None once the Maildir is dropped and nothing is left.
    fn take(&self, in_flight: bool) -> Option<Vec<Delivery>> {
        let mut state = self.lock();
        while state.waiting.is_empty() && !in_flight && !state.closed {
            state = self.arrived.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        if state.waiting.is_empty() && !in_flight && state.closed {
            return None;
        }
        Some(std::mem::take(&mut state.waiting))
    }
}

fn commit_until_closed(files: &Files, queue: &Queue, new_dir: &File) {
    let mut written: Vec<Staged> = Vec::new();
    while let Some(arrived) = queue.take(!written.is_empty()) {
        written = files.round(arrived, written, new_dir);
    }
}

impl Files {
    /// One round: write what arrived, publish what the last sync made
    /// durable, sync once. Returns the deliveries written in this round.
    fn round(&self, arrived: Vec<Delivery>, data_synced: Vec<Staged>, new_dir: &File) -> Vec<Staged> {
        let written: Vec<Staged> = arrived.into_iter().filter_map(|delivery| self.stage(delivery)).collect();
        let published: Vec<Staged> = data_synced.into_iter().filter_map(|staged| self.publish(staged)).collect();
        match (self.sync)(new_dir) {
            Ok(()) => {
                published.into_iter().for_each(|staged| answer(staged.answer, Ok(())));
                written
            }
            Err(error) => {
                let failed = || io::Error::new(error.kind(), format!("syncing the Maildir's file system: {error}"));
                for staged in published {
                    remove_all(&self.paths("new", &staged.names));
                    answer(staged.answer, Err(failed()));
                }
                for staged in written {
                    remove_all(&staged.paths);
                    answer(staged.answer, Err(failed()));
                }
                Vec::new()
            }
        }
    }

    /// Stage a delivery's files in `tmp/`, all or none (None: it has been
    /// answered).
    fn stage(&self, delivery: Delivery) -> Option<Staged> {
        let count = delivery.messages.len();
        let names: Vec<String> = delivery.messages.iter().map(|m| self.file_name(m)).collect();
        let mut paths = Vec::with_capacity(count);
        for (message, name) in delivery.messages.iter().zip(&names) {
            let (path, written) = match self.ready_as_it_is(message, count) {
                Some(spilled) => (spilled.path().to_path_buf(), Ok(())),
                None => {
                    let path = self.tmp_dir().join(name);
                    let written = write_with_envelope(&path, message);
                    (path, written)
                }
            };
            paths.push(path);
            if let Err(err) = written {
                remove_all(&paths);
                answer(delivery.answer, Err(err));
                return None;
            }
        }
        Some(Staged { paths, names, answer: delivery.answer, _messages: delivery.messages })
    }

    /// The spilled body of the only message of a delivery, when its file
    /// in `tmp/` already starts with the envelope and trace headers it
    /// needs: then syncing and renaming it delivers it.
    fn ready_as_it_is<'a>(&self, message: &'a Message, messages: usize) -> Option<&'a SpilledBody> {
        let Body::File(spilled) = &message.data else {
            return None;
        };
        let in_tmp = spilled.path().parent() == Some(self.tmp_dir().as_path());
        let ready = messages == 1 && in_tmp && spilled.prefix() == envelope_and_head(message).as_slice();
        ready.then_some(spilled)
    }

    /// Move staged files into `new/`, all or none (None: it has been answered).
    fn publish(&self, staged: Staged) -> Option<Staged> {
        let mut moved = Vec::with_capacity(staged.names.len());
        let result = staged.paths.iter().zip(&staged.names).try_for_each(|(path, name)| {
            let target = self.root.join("new").join(name);
            fs::rename(path, &target)?;
            moved.push(target);
            Ok(())
        });
        if let Err(err) = result {
            remove_all(&moved);
            remove_all(&staged.paths);
            answer(staged.answer, Err(err));
            return None;
        }
        Some(staged)
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn paths(&self, sub: &str, names: &[String]) -> Vec<PathBuf> {
        names.iter().map(|name| self.root.join(sub).join(name)).collect()
    }

    fn file_name(&self, message: &Message) -> String {
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
        format!("{secs}.{}.{}", message.id, self.host)
    }
}

/// The session may be gone (its client hung up): then nobody listens.
fn answer(to: Answer, result: io::Result<()>) {
    let _ = to.send(result);
}

/// The envelope, as Postfix's local delivery writes it at the top of a
/// mailbox file: `Return-Path: <sender>` (`<>` for the null sender), then a
/// `Delivered-To:` for each recipient of this file; then the message's own
/// trace headers.
fn envelope_and_head(message: &Message) -> Vec<u8> {
    let head = message.full_head();
    let mut out = envelope(&message.sender, &message.recipients, head.len());
    out.extend_from_slice(&head);
    out
}

/// `Return-Path:` and the `Delivered-To:` lines, with room for `more` bytes.
fn envelope(sender: &Mailbox, recipients: &[Mailbox], more: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + 48 * recipients.len() + more);
    // Display writes no CR or LF: the parser refuses control characters.
    let _ = write!(out, "Return-Path: <{sender}>\r\n");
    for recipient in recipients {
        let _ = write!(out, "Delivered-To: {recipient}\r\n");
    }
    out
}

fn write_with_envelope(path: &Path, message: &Message) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.write_all(&envelope_and_head(message))?;
    message.data.write_to(&mut file)
}

/// `syncfs(2)`: every file's data and metadata on the Maildir's file system,
/// one cache flush of the device for all of them. Unlike an `fdatasync` per
/// file and an `fsync` of `new/`, it writes the inode and directory blocks
/// that the files of a round share once. It also flushes whatever else is
/// dirty on that file system: a busy Maildir wants its own.
///
/// Then an `fsync` of `new/`: on a file system without a journal (ext4
/// without one, as on this project's machine, or ext2) syncfs issues the
/// cache flush before it waits for the inode and directory blocks it has
/// written; this second flush covers them. With a journal, syncfs committed
/// them already, and the fsync is a flush with little left to write.
fn sync_file_system(new_dir: &File) -> io::Result<()> {
    // SAFETY: syncfs takes any open descriptor and touches no memory of ours.
    if unsafe { libc::syncfs(new_dir.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    new_dir.sync_all()
}

fn remove_all(paths: &[PathBuf]) {
    for path in paths {
        // Already gone (renamed away) is the normal case here.
        let _ = fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    fn message(body: &'static [u8]) -> Arc<Message> {
        let who = Mailbox::new("a", "b.example");
        Message::new(crate::message::new_message_id(), who.clone(), vec![who], Bytes::from_static(body))
    }

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kumo-sink-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn entries(dir: &Path) -> Vec<PathBuf> {
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect()
    }

    fn deliver(maildir: &Maildir, messages: &[Arc<Message>]) -> io::Result<()> {
        maildir.submit(messages.to_vec()).blocking_recv().unwrap()
    }

    #[test]
    fn delivered_messages_are_complete_in_new_and_tmp_is_empty() {
        let root = scratch_dir("ok");
        let maildir = Maildir::open(&root).unwrap();
        deliver(&maildir, &[message(b"one\r\n"), message(b"two\r\n")]).unwrap();
        let mut bodies: Vec<Vec<u8>> = entries(&root.join("new")).iter().map(|p| fs::read(p).unwrap()).collect();
        bodies.sort();
        let envelope = b"Return-Path: <a@b.example>\r\nDelivered-To: a@b.example\r\n";
        assert_eq!(
            bodies,
            vec![[envelope, b"one\r\n".as_slice()].concat(), [envelope, b"two\r\n".as_slice()].concat()]
        );
        assert!(entries(&root.join("tmp")).is_empty());
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn concurrent_deliveries_share_the_syncs() {
        static SYNCS: AtomicU64 = AtomicU64::new(0);
        fn counted(target: &File) -> io::Result<()> {
            SYNCS.fetch_add(1, Ordering::Relaxed);
            sync_file_system(target)
        }
        let root = scratch_dir("group");
        let maildir = Arc::new(Maildir::with_sync(root.clone(), counted).unwrap());
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let maildir = maildir.clone();
                std::thread::spawn(move || (0..10).for_each(|_| deliver(&maildir, &[message(b"x\r\n")]).unwrap()))
            })
            .collect();
        threads.into_iter().for_each(|thread| thread.join().unwrap());
        assert_eq!(entries(&root.join("new")).len(), 160);
        assert!(entries(&root.join("tmp")).is_empty());
        // Alone, each delivery would take two rounds.
        assert!(SYNCS.load(Ordering::Relaxed) < 160, "16 threads delivering at once shared no sync");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_failed_sync_fails_the_deliveries_it_covers_and_leaves_nothing() {
        static FAIL: AtomicBool = AtomicBool::new(true);
        fn fails_when_told(target: &File) -> io::Result<()> {
            if FAIL.load(Ordering::Relaxed) {
                Err(io::Error::other("told to fail"))
            } else {
                sync_file_system(target)
            }
        }
        let root = scratch_dir("sync-fails");
        let maildir = Maildir::with_sync(root.clone(), fails_when_told).unwrap();
        assert!(deliver(&maildir, &[message(b"one\r\n"), message(b"two\r\n")]).is_err());
        assert!(entries(&root.join("tmp")).is_empty() && entries(&root.join("new")).is_empty());
        FAIL.store(false, Ordering::Relaxed);
        deliver(&maildir, &[message(b"three\r\n")]).expect("a later round is judged on its own");
        assert_eq!(entries(&root.join("new")).len(), 1);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_failed_delivery_leaves_nothing_behind() {
        let root = scratch_dir("fail");
        let maildir = Maildir::open(&root).unwrap();
        fs::remove_dir_all(root.join("new")).unwrap();
        assert!(deliver(&maildir, &[message(b"one\r\n")]).is_err());
        assert!(entries(&root.join("tmp")).is_empty());
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn the_envelope_goes_first_one_delivered_to_per_recipient() {
        let root = scratch_dir("envelope");
        let maildir = Maildir::open(&root).unwrap();
        let recipients = vec![Mailbox::new("x", "d.example"), Mailbox::new("y", "d.example")];
        let head = Bytes::from_static(b"Received: by test\r\n");
        let message =
            Message::with_head("id".into(), Mailbox::default(), recipients, head, Bytes::from_static(b"\r\nhi\r\n"));
        deliver(&maildir, &[message]).unwrap();
        let stored = fs::read(&entries(&root.join("new"))[0]).unwrap();
        assert_eq!(
            stored,
            b"Return-Path: <>\r\nDelivered-To: x@d.example\r\nDelivered-To: y@d.example\r\nReceived: by test\r\n\r\nhi\r\n"
        );
        fs::remove_dir_all(root).unwrap();
    }

    fn spilled(spool: &Arc<crate::body::BodyStore>, prefix: Vec<u8>, text: &[u8]) -> Body {
        let mut buffer = crate::body::BodyBuffer::new(spool, crate::body::BodyLimits::threshold(1), 1, prefix);
        buffer.append(text).unwrap();
        buffer.finish().unwrap()
    }

    #[test]
    fn a_spilled_body_with_its_envelope_is_delivered_by_renaming_it() {
        use std::os::unix::fs::MetadataExt;
        let root = scratch_dir("rename");
        let sink = Sink::Maildir(Arc::new(Maildir::open(&root).unwrap()));
        let Sink::Maildir(maildir) = &sink else { unreachable!() };
        let spool = crate::body::BodyStore::new(sink.spool_dir(), 1 << 20, Arc::default());
        let who = Mailbox::new("a", "b.example");
        let body = spilled(&spool, sink.envelope_for(spool.dir(), &who, &who), b"Subject: big\r\n\r\nbody\r\n");
        let Body::File(file) = &body else { panic!("not spilled") };
        let inode = fs::metadata(file.path()).unwrap().ino();
        deliver(maildir, &[Message::new("id".into(), who.clone(), vec![who], body)]).unwrap();
        let stored = &entries(&root.join("new"))[0];
        assert_eq!(fs::metadata(stored).unwrap().ino(), inode, "renamed, not copied");
        let text = b"Return-Path: <a@b.example>\r\nDelivered-To: a@b.example\r\nSubject: big\r\n\r\nbody\r\n";
        assert_eq!(fs::read(stored).unwrap(), text);
        assert!(entries(&root.join("tmp")).is_empty());
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_spilled_body_shared_by_parts_is_copied_into_each() {
        let root = scratch_dir("shared-spill");
        let maildir = Maildir::open(&root).unwrap();
        let spool = crate::body::BodyStore::new(maildir.files.tmp_dir(), 1 << 20, Arc::default());
        let body = spilled(&spool, Vec::new(), b"\r\nshared\r\n");
        let parts: Vec<Arc<Message>> = ["x", "y"]
            .iter()
            .map(|user| {
                let to = Mailbox::new(*user, "d.example");
                Message::new(crate::message::new_message_id(), Mailbox::default(), vec![to], body.clone())
            })
            .collect();
        deliver(&maildir, &parts).unwrap();
        let mut stored: Vec<Vec<u8>> = entries(&root.join("new")).iter().map(|p| fs::read(p).unwrap()).collect();
        stored.sort();
        assert_eq!(
            stored,
            vec![
                b"Return-Path: <>\r\nDelivered-To: x@d.example\r\n\r\nshared\r\n".to_vec(),
                b"Return-Path: <>\r\nDelivered-To: y@d.example\r\n\r\nshared\r\n".to_vec(),
            ]
        );
        drop((parts, body));
        // A committer thread may still be dropping its copy of the last part.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !entries(&root.join("tmp")).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(entries(&root.join("tmp")).is_empty(), "the spill file goes with its last part");
        fs::remove_dir_all(root).unwrap();
    }
}
