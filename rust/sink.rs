//! Where accepted messages go: a durable Maildir, or nowhere (benchmarks).

use crate::message::Message;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

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
            Sink::Maildir(maildir) => {
                let maildir = maildir.clone();
                tokio::task::spawn_blocking(move || maildir.deliver(&messages)).await.map_err(io::Error::other)?
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Sink::Discard => "discard".into(),
            Sink::Maildir(maildir) => format!("Maildir {}", maildir.root.display()),
        }
    }
}

/// A Maildir (`tmp/`, `new/`, `cur/`). A message is written to `tmp/`, its
/// file system synced, renamed into `new/`, and the file system synced
/// again, so whatever is in `new/` is complete and survives a crash.
/// Deliveries that are at the same step at the same time share its sync
/// (group commit), and one sync serves one delivery's first step and
/// another's second.
#[derive(Debug)]
pub struct Maildir {
    root: PathBuf,
    host: String,
    file_system: GroupSync,
}

/// Syncs shared by the threads that need one at the same time: a sync that
/// starts after a thread's write covers it, so while one runs, the threads
/// that arrive meanwhile wait for the next, which one of them runs for all.
#[derive(Debug)]
struct GroupSync {
    /// Held open from the start: `syncfs` reports the write-back errors
    /// (of the background flusher too) that happened since it was opened.
    target: File,
    run: fn(&File) -> io::Result<()>,
    state: Mutex<SyncState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct SyncState {
    /// Tickets given out: one per rename that needs a sync.
    requested: u64,
    /// Every ticket up to this one is covered by a finished sync.
    synced: u64,
    running: bool,
    /// Syncs run so far.
    runs: u64,
    /// The error of the last sync, for the tickets it was to cover.
    failed: Option<(u64, io::ErrorKind)>,
}

impl GroupSync {
    fn new(target: File, run: fn(&File) -> io::Result<()>) -> Self {
        Self { target, run, state: Mutex::default(), done: Condvar::new() }
    }

    /// Return once a sync that began after this call has finished.
    fn sync(&self) -> io::Result<()> {
        let mut state = self.lock();
        state.requested += 1;
        let ticket = state.requested;
        loop {
            if state.synced >= ticket {
                return match state.failed {
                    Some((covered, kind)) if covered >= ticket => {
                        Err(io::Error::new(kind, "syncing the Maildir's file system failed"))
                    }
                    _ => Ok(()),
                };
            }
            if state.running {
                state = self.done.wait(state).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            state.running = true;
            let covers = state.requested;
            drop(state);
            let result = (self.run)(&self.target);
            state = self.lock();
            state.running = false;
            state.runs += 1;
            state.synced = covers;
            state.failed = result.as_ref().err().map(|error| (covers, error.kind()));
            self.done.notify_all();
            result?;
        }
    }

    fn lock(&self) -> MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Maildir {
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        for sub in ["tmp", "new", "cur"] {
            fs::create_dir_all(root.join(sub))?;
        }
        let host = gethostname::gethostname().to_string_lossy().replace(['/', ':'], "_");
        let file_system = GroupSync::new(File::open(&root)?, sync_file_system);
        Ok(Self { file_system, root, host })
    }

    pub fn deliver(&self, messages: &[Arc<Message>]) -> io::Result<()> {
        let names: Vec<String> = messages.iter().map(|m| self.file_name(m)).collect();
        let mut staged = Vec::with_capacity(messages.len());
        for (message, name) in messages.iter().zip(&names) {
            let path = self.root.join("tmp").join(name);
            let written = write_durably(&path, message);
            staged.push(path);
            if let Err(err) = written {
                remove_all(&staged);
                return Err(err);
            }
        }
        if let Err(err) = self.file_system.sync() {
            remove_all(&staged);
            return Err(err);
        }
        let published = self.publish(&names);
        remove_all(&staged);
        published
    }

    /// Move staged files into `new/`, all or none.
    fn publish(&self, names: &[String]) -> io::Result<()> {
        let mut moved = Vec::with_capacity(names.len());
        let result = names
            .iter()
            .try_for_each(|name| {
                let target = self.root.join("new").join(name);
                fs::rename(self.root.join("tmp").join(name), &target)?;
                moved.push(target);
                Ok(())
            })
            .and_then(|()| self.file_system.sync());
        if result.is_err() {
            remove_all(&moved);
        }
        result
    }

    fn file_name(&self, message: &Message) -> String {
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
        format!("{secs}.{}.{}", message.id, self.host)
    }
}

/// The envelope, as Postfix's local delivery writes it at the top of a
/// mailbox file: `Return-Path: <sender>` (`<>` for the null sender), then a
/// `Delivered-To:` for each recipient of this file; then the message's own
/// trace headers.
fn envelope_and_head(message: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + 48 * message.recipients.len() + message.head.len());
    // Display writes no CR or LF: the parser refuses control characters.
    let _ = write!(out, "Return-Path: <{}>\r\n", message.sender);
    for recipient in &message.recipients {
        let _ = write!(out, "Delivered-To: {recipient}\r\n");
    }
    out.extend_from_slice(&message.head);
    out
}

fn write_durably(path: &Path, message: &Message) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.write_all(&envelope_and_head(message))?;
    file.write_all(&message.data)
}

/// `syncfs(2)`: every file's data and metadata on the Maildir's file system,
/// one cache flush of the device for all of them. Unlike an `fdatasync` per
/// file and an `fsync` of `new/`, it writes the inode and directory blocks
/// that the files of a batch share once. It also flushes whatever else is
/// dirty on that file system: a busy Maildir wants its own.
fn sync_file_system(target: &File) -> io::Result<()> {
    // SAFETY: syncfs takes any open descriptor and touches no memory of ours.
    if unsafe { libc::syncfs(target.as_raw_fd()) } == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
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
    use crate::parser::Mailbox;
    use bytes::Bytes;

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

    #[test]
    fn delivered_messages_are_complete_in_new_and_tmp_is_empty() {
        let root = scratch_dir("ok");
        let maildir = Maildir::open(&root).unwrap();
        maildir.deliver(&[message(b"one\r\n"), message(b"two\r\n")]).unwrap();
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
        let root = scratch_dir("group");
        let maildir = Arc::new(Maildir::open(&root).unwrap());
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let maildir = maildir.clone();
                std::thread::spawn(move || (0..10).for_each(|_| maildir.deliver(&[message(b"x\r\n")]).unwrap()))
            })
            .collect();
        threads.into_iter().for_each(|thread| thread.join().unwrap());
        assert_eq!(entries(&root.join("new")).len(), 160);
        let state = maildir.file_system.lock();
        assert_eq!((state.requested, state.synced, state.running), (320, 320, false));
        assert!(state.runs < 320, "16 threads delivering at once shared no sync");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_failed_sync_fails_the_deliveries_it_covers() {
        fn fails_while_the_file_is_empty(target: &File) -> io::Result<()> {
            match target.metadata()?.len() {
                0 => Err(io::Error::other("empty")),
                _ => Ok(()),
            }
        }
        let root = scratch_dir("sync-fails");
        fs::create_dir_all(&root).unwrap();
        let path = root.join("target");
        let sync = GroupSync::new(File::create(&path).unwrap(), fails_while_the_file_is_empty);
        assert!(sync.sync().is_err());
        fs::write(&path, b"x").unwrap();
        assert!(sync.sync().is_ok(), "a later sync is judged on its own");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_failed_delivery_leaves_nothing_behind() {
        let root = scratch_dir("fail");
        let maildir = Maildir::open(&root).unwrap();
        fs::remove_dir_all(root.join("new")).unwrap();
        assert!(maildir.deliver(&[message(b"one\r\n")]).is_err());
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
        maildir.deliver(&[message]).unwrap();
        let stored = fs::read(&entries(&root.join("new"))[0]).unwrap();
        assert_eq!(
            stored,
            b"Return-Path: <>\r\nDelivered-To: x@d.example\r\nDelivered-To: y@d.example\r\nReceived: by test\r\n\r\nhi\r\n"
        );
        fs::remove_dir_all(root).unwrap();
    }
}
