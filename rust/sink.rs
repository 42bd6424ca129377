//! Where accepted messages go: a durable Maildir, or nowhere (benchmarks).

use crate::body::{Body, SpilledBody};
use crate::message::Message;
use crate::parser::Mailbox;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
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

    /// Where spilled bodies go by default: the Maildir's `tmp/`, whence
    /// delivering one is a rename.
    pub fn spool_dir(&self) -> PathBuf {
        match self {
            Sink::Discard => std::env::temp_dir(),
            Sink::Maildir(maildir) => maildir.tmp_dir(),
        }
    }

    /// What a body spilled into `dir` should start with so that the sink
    /// can deliver its file by renaming it: the envelope of its one
    /// recipient, when `dir` is the Maildir's `tmp/`; nothing otherwise.
    pub fn envelope_for(&self, dir: &Path, sender: &Mailbox, recipient: &Mailbox) -> Vec<u8> {
        match self {
            Sink::Maildir(maildir) if dir == maildir.tmp_dir() => envelope(sender, std::slice::from_ref(recipient), 0),
            _ => Vec::new(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Sink::Discard => "discard".into(),
            Sink::Maildir(maildir) => format!("Maildir {}", maildir.root.display()),
        }
    }
}

/// A Maildir (`tmp/`, `new/`, `cur/`). A message is written to `tmp/` and
/// its data synced, renamed into `new/`, and the directory synced, so
/// whatever is in `new/` is complete and survives a crash. Deliveries that
/// finish at the same time share one sync of `new/` (group commit).
#[derive(Debug)]
pub struct Maildir {
    root: PathBuf,
    host: String,
    new_dir: GroupSync,
}

/// Syncs of one directory shared by the threads that need one at the same
/// time: a sync that starts after a thread's rename covers it, so while one
/// runs, the threads that arrive meanwhile wait for the next, which one of
/// them runs for all.
#[derive(Debug)]
struct GroupSync {
    path: PathBuf,
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
    fn new(path: PathBuf) -> Self {
        Self { path, state: Mutex::default(), done: Condvar::new() }
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
                        Err(io::Error::new(kind, "syncing the Maildir failed"))
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
            let result = File::open(&self.path).and_then(|dir| dir.sync_all());
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
        Ok(Self { new_dir: GroupSync::new(root.join("new")), root, host })
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn deliver(&self, messages: &[Arc<Message>]) -> io::Result<()> {
        let names: Vec<String> = messages.iter().map(|m| self.file_name(m)).collect();
        let mut staged = Vec::with_capacity(messages.len());
        for (message, name) in messages.iter().zip(&names) {
            let (path, written) = match self.ready_as_it_is(message, messages.len()) {
                Some(spilled) => (spilled.path().to_path_buf(), spilled.file().sync_data()),
                None => {
                    let path = self.tmp_dir().join(name);
                    let written = write_durably(&path, message);
                    (path, written)
                }
            };
            staged.push(path);
            if let Err(err) = written {
                remove_all(&staged);
                return Err(err);
            }
        }
        let published = self.publish(&staged, &names);
        remove_all(&staged);
        published
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

    /// Move staged files into `new/` under `names`, all or none.
    fn publish(&self, staged: &[PathBuf], names: &[String]) -> io::Result<()> {
        let mut moved = Vec::with_capacity(names.len());
        let result = staged
            .iter()
            .zip(names)
            .try_for_each(|(path, name)| {
                let target = self.root.join("new").join(name);
                fs::rename(path, &target)?;
                moved.push(target);
                Ok(())
            })
            .and_then(|()| self.new_dir.sync());
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
    let mut out = envelope(&message.sender, &message.recipients, message.head.len());
    out.extend_from_slice(&message.head);
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

fn write_durably(path: &Path, message: &Message) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.write_all(&envelope_and_head(message))?;
    message.data.write_to(&mut file)?;
    // The data and what reading it needs (its size); the name comes with
    // the sync of `new/` after the rename.
    file.sync_data()
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
    fn concurrent_deliveries_share_the_syncs_of_new() {
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
        let state = maildir.new_dir.lock();
        assert_eq!((state.requested, state.synced, state.running), (160, 160, false));
        assert!(state.runs < 160, "16 threads delivering at once shared no sync");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_failed_sync_fails_the_deliveries_it_covers() {
        let root = scratch_dir("sync-fails");
        let sync = GroupSync::new(root.join("missing"));
        assert!(sync.sync().is_err());
        fs::create_dir_all(root.join("missing")).unwrap();
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

    fn spilled(spool: &Arc<crate::body::Spool>, prefix: Vec<u8>, text: &[u8]) -> Body {
        let mut buffer = crate::body::BodyBuffer::new(spool, 1, 1, prefix);
        buffer.append(text).unwrap();
        buffer.finish().unwrap()
    }

    #[test]
    fn a_spilled_body_with_its_envelope_is_delivered_by_renaming_it() {
        use std::os::unix::fs::MetadataExt;
        let root = scratch_dir("rename");
        let sink = Sink::Maildir(Arc::new(Maildir::open(&root).unwrap()));
        let Sink::Maildir(maildir) = &sink else { unreachable!() };
        let spool = crate::body::Spool::new(sink.spool_dir(), 1 << 20, Arc::default());
        let who = Mailbox::new("a", "b.example");
        let body = spilled(&spool, sink.envelope_for(spool.dir(), &who, &who), b"Subject: big\r\n\r\nbody\r\n");
        let Body::File(file) = &body else { panic!("not spilled") };
        let inode = fs::metadata(file.path()).unwrap().ino();
        maildir.deliver(&[Message::new("id".into(), who.clone(), vec![who], body)]).unwrap();
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
        let spool = crate::body::Spool::new(maildir.tmp_dir(), 1 << 20, Arc::default());
        let body = spilled(&spool, Vec::new(), b"\r\nshared\r\n");
        let parts: Vec<Arc<Message>> = ["x", "y"]
            .iter()
            .map(|user| {
                let to = Mailbox::new(*user, "d.example");
                Message::new(crate::message::new_message_id(), Mailbox::default(), vec![to], body.clone())
            })
            .collect();
        maildir.deliver(&parts).unwrap();
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
        assert!(entries(&root.join("tmp")).is_empty(), "the spill file goes with its last part");
        fs::remove_dir_all(root).unwrap();
    }
}
