//! Message bodies under a memory budget: a body stays in memory while it is
//! small and the listener's budget has room; past `body_spill_threshold`, or
//! once `body_memory_limit` is used up, it goes to a file in the spool
//! directory as it arrives (the Maildir's `tmp/`, so that the sink can
//! deliver it by a rename). Envelopes (senders, recipients and their
//! parameters) are held against the same budget ([`Reservation`]).
//!
//! A spill file is written only while the spool's file system keeps a
//! reserve free (room for the bodies that stay in memory to be delivered)
//! and while its client's spilled bytes stay under their cap
//! ([`SpillQuota`]); a body that cannot be stored is lost ([`SpillError`]),
//! and the rest of it read and discarded by the session.

use crate::metrics::ListenerMetrics;
use bytes::Bytes;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a measure of the spool's free space is trusted.
const ROOM_TTL_MS: u64 = 1000;

/// The in-memory budget counts as used up once less than this is left: a
/// new session's body could not even start in memory.
const BUDGET_MARGIN: usize = 64 * 1024;

/// Maildir's rule for `tmp/`: a file this old is left over from a crash.
const STALE_AFTER: Duration = Duration::from_secs(36 * 3600);

/// Where a listener's spilled bodies go, and what its bodies hold now.
pub struct BodyStore {
    dir: PathBuf,
    memory_limit: usize,
    /// Its gauges of the bytes in memory and in spill files are the spool's counts.
    metrics: Arc<ListenerMetrics>,
    /// Free bytes of the spool's file system, as last measured.
    free: AtomicU64,
    /// When `free` was measured, in ms since `epoch`; `u64::MAX`: never.
    measured_at: AtomicU64,
    epoch: Instant,
}

impl BodyStore {
    /// Spill files left over from a crash (older than Maildir's 36 hours,
    /// so never another live process's) are removed first.
    pub fn new(dir: PathBuf, memory_limit: usize, metrics: Arc<ListenerMetrics>) -> Arc<Self> {
        remove_stale_spill_files(&dir, SystemTime::now());
        Arc::new(Self {
            dir,
            memory_limit,
            metrics,
            free: AtomicU64::new(0),
            measured_at: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn in_memory_bytes(&self) -> usize {
        self.metrics.body_memory_bytes.load(Ordering::Relaxed) as usize
    }

    pub fn spilled_bytes(&self) -> u64 {
        self.metrics.body_spilled_bytes.load(Ordering::Relaxed)
    }

    fn release(&self, bytes: usize) {
        self.metrics.body_memory_bytes.fetch_sub(bytes as u64, Ordering::Relaxed);
    }

    /// The in-memory budget is (all but [`BUDGET_MARGIN`]) used up.
    pub fn memory_exhausted(&self) -> bool {
        self.in_memory_bytes() + BUDGET_MARGIN >= self.memory_limit
    }

    /// What is left of the in-memory budget.
    pub fn memory_left(&self) -> usize {
        self.memory_limit.saturating_sub(self.in_memory_bytes())
    }

    /// Whether the spool's file system has `needed` bytes free, measured at
    /// most once a second (a `statvfs`), and taken as full for a second
    /// after a write to it failed.
    pub fn has_room(&self, needed: u64) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        let measured_at = self.measured_at.load(Ordering::Acquire);
        if measured_at == u64::MAX || now.saturating_sub(measured_at) >= ROOM_TTL_MS {
            self.free.store(free_space(&self.dir).unwrap_or(0), Ordering::Relaxed);
            self.measured_at.store(now, Ordering::Release);
        }
        self.free.load(Ordering::Relaxed) >= needed
    }

    /// `bytes` were written to a spill file: less is free than last measured.
    fn room_taken(&self, bytes: u64) {
        let _ = self.free.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |free| Some(free.saturating_sub(bytes)));
    }

    fn write_failed(&self) {
        self.free.store(0, Ordering::Relaxed);
        self.measured_at.store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
    }

    /// Reserve `bytes` more of the in-memory budget, or nothing if it has not that much left.
    fn try_reserve(&self, bytes: usize) -> bool {
        let before = self.metrics.body_memory_bytes.fetch_add(bytes as u64, Ordering::Relaxed) as usize;
        if before + bytes <= self.memory_limit {
            return true;
        }
        self.release(bytes);
        false
    }
}

impl std::fmt::Debug for BodyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyStore").field("dir", &self.dir).field("memory_limit", &self.memory_limit).finish()
    }
}

fn free_space(dir: &Path) -> io::Result<u64> {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer statvfs fills on success.
    if unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the buffer.
    let stats = unsafe { stats.assume_init() };
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

/// Bytes of a spool's in-memory budget, given back when dropped: a body's
/// buffer, or a transaction's envelope.
#[derive(Debug)]
pub struct Reservation {
    spool: Arc<BodyStore>,
    bytes: usize,
}

impl Reservation {
    /// Nothing reserved yet.
    pub fn new(spool: &Arc<BodyStore>) -> Self {
        Self { spool: spool.clone(), bytes: 0 }
    }

    /// Reserve `bytes` more, or nothing if the budget has not that much left.
    pub fn add(&mut self, bytes: usize) -> bool {
        let granted = self.spool.try_reserve(bytes);
        if granted {
            self.bytes += bytes;
        }
        granted
    }

    /// Move what `other` (of the same spool) holds into this one.
    pub fn take(&mut self, mut other: Reservation) {
        debug_assert!(Arc::ptr_eq(&self.spool, &other.spool));
        self.bytes += std::mem::take(&mut other.bytes);
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn grow_to(&mut self, bytes: usize) -> bool {
        if bytes <= self.bytes {
            return true;
        }
        let granted = self.spool.try_reserve(bytes - self.bytes);
        if granted {
            self.bytes = bytes;
        }
        granted
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.spool.release(self.bytes);
    }
}

/// Why a body could not be stored: it is lost, and its sender gets a 4xx.
#[derive(Debug)]
pub enum SpillError {
    /// The spool's file system would keep less than its reserve free, or a
    /// write found it full (`ENOSPC`, `EDQUOT`).
    NoRoom,
    /// The client's spilled bytes would pass its cap.
    ClientCap,
    /// Another failure to create or write the file.
    Io(io::Error),
}

impl SpillError {
    /// The same error (an `io::Error` is not `Clone`).
    fn duplicate(&self) -> Self {
        match self {
            SpillError::NoRoom => SpillError::NoRoom,
            SpillError::ClientCap => SpillError::ClientCap,
            SpillError::Io(error) => SpillError::Io(io::Error::new(error.kind(), error.to_string())),
        }
    }
}

impl From<io::Error> for SpillError {
    fn from(error: io::Error) -> Self {
        match error.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => SpillError::NoRoom,
            _ => SpillError::Io(error),
        }
    }
}

impl fmt::Display for SpillError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpillError::NoRoom => f.write_str("the spool is short of room"),
            SpillError::ClientCap => f.write_str("the client's spilled bytes reached their cap"),
            SpillError::Io(error) => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for SpillError {}

/// The bytes one client address has in spill files now (shared by its
/// sessions), and the most it may have.
#[derive(Clone, Debug)]
pub struct SpillQuota {
    pub spilled: Arc<AtomicU64>,
    pub cap: u64,
}

impl SpillQuota {
    /// Whether `more` bytes would still be under the cap.
    pub fn allows(&self, more: u64) -> bool {
        self.spilled.load(Ordering::Relaxed).saturating_add(more) <= self.cap
    }

    /// Count `bytes` more, or nothing if that would pass the cap.
    fn charge(&self, bytes: u64) -> bool {
        let before = self.spilled.fetch_add(bytes, Ordering::Relaxed);
        if before.saturating_add(bytes) <= self.cap {
            return true;
        }
        self.spilled.fetch_sub(bytes, Ordering::Relaxed);
        false
    }
}

/// How a body may use memory and the spool.
#[derive(Clone, Debug, Default)]
pub struct BodyLimits {
    /// Past this many bytes in memory the body goes to a file.
    pub spill_threshold: usize,
    /// What the spool's file system must keep free after each write to a
    /// spill file.
    pub spool_reserve: u64,
    /// Its client's spilled bytes and their cap; None: exempt.
    pub quota: Option<SpillQuota>,
}

impl BodyLimits {
    /// A threshold only: no reserve, no cap.
    pub fn threshold(spill_threshold: usize) -> Self {
        Self { spill_threshold, ..Self::default() }
    }
}

/// A body's bytes kept with their reservation, for [`Bytes::from_owner`].
struct ReservedBytes {
    bytes: Vec<u8>,
    _reservation: Reservation,
}

impl AsRef<[u8]> for ReservedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Whether `name` is one [`SpillFile::create`] gives: `{secs}.P{pid}Q{n}.body`.
fn is_spill_file_name(name: &str) -> bool {
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|byte| byte.is_ascii_digit());
    let Some((secs, rest)) = name.strip_suffix(".body").and_then(|stem| stem.split_once(".P")) else {
        return false;
    };
    rest.split_once('Q').is_some_and(|(pid, sequence)| digits(secs) && digits(pid) && digits(sequence))
}

/// Best effort: what can't be read or removed stays.
fn remove_stale_spill_files(dir: &Path, now: SystemTime) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let stale = entry
            .metadata()
            .and_then(|meta| meta.modified())
            .is_ok_and(|modified| now.duration_since(modified).is_ok_and(|age| age > STALE_AFTER));
        if stale && entry.file_name().to_str().is_some_and(is_spill_file_name) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// A spill file, removed when dropped unless the sink renamed it away first.
#[derive(Debug)]
pub struct SpillFile {
    file: File,
    path: PathBuf,
    spool: Arc<BodyStore>,
    /// Bytes written so far.
    written: u64,
    /// What the file system must keep free.
    reserve: u64,
    /// The client's count, which `written` is part of.
    quota: Option<SpillQuota>,
}

impl SpillFile {
    /// A new file, named as Maildir's `tmp/` wants: unique to this host
    /// (several processes may share the directory).
    fn create(spool: &Arc<BodyStore>, limits: &BodyLimits) -> Result<Self, SpillError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        if !spool.has_room(limits.spool_reserve) {
            return Err(SpillError::NoRoom);
        }
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
        let sequence = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = spool.dir.join(format!("{secs}.P{}Q{sequence}.body", std::process::id()));
        let opened = OpenOptions::new().read(true).write(true).create_new(true).open(&path);
        // Taken as full for a second after a failure: the other bodies need not try.
        let file = opened.inspect_err(|_| spool.write_failed())?;
        let (reserve, quota) = (limits.spool_reserve, limits.quota.clone());
        Ok(Self { file, path, spool: spool.clone(), written: 0, reserve, quota })
    }

    /// Write `bytes` if the spool keeps its reserve and the client stays
    /// under its cap.
    fn write(&mut self, bytes: &[u8]) -> Result<(), SpillError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let len = bytes.len() as u64;
        if !self.spool.has_room(self.reserve.saturating_add(len)) {
            return Err(SpillError::NoRoom);
        }
        if self.quota.as_ref().is_some_and(|quota| !quota.charge(len)) {
            return Err(SpillError::ClientCap);
        }
        if let Err(error) = self.file.write_all(bytes) {
            self.spool.write_failed();
            // The body is lost and its file removed: the charge is given back.
            if let Some(quota) = &self.quota {
                quota.spilled.fetch_sub(len, Ordering::Relaxed);
            }
            return Err(error.into());
        }
        self.written += len;
        self.spool.room_taken(len);
        self.spool.metrics.body_spilled_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        self.spool.metrics.body_spilled_bytes.fetch_sub(self.written, Ordering::Relaxed);
        if let Some(quota) = &self.quota {
            quota.spilled.fetch_sub(self.written, Ordering::Relaxed);
        }
        // Gone already when the sink renamed it into the Maildir.
        let _ = fs::remove_file(&self.path);
    }
}

/// A finished body in a file, after `prefix_len` bytes that are not its own
/// (the Maildir envelope of its one recipient).
#[derive(Debug)]
pub struct SpilledBody {
    file: SpillFile,
    prefix: Vec<u8>,
    len: usize,
}

impl SpilledBody {
    /// Where it is now, while the sink has not moved it.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    pub fn file(&self) -> &File {
        &self.file.file
    }

    /// The file's start, before the body: the sink's envelope when it can
    /// deliver the file by renaming it.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// Where the body starts in the file.
    pub fn offset(&self) -> u64 {
        self.prefix.len() as u64
    }
}

/// A received body: in memory, or in a file.
#[derive(Clone, Debug)]
pub enum Body {
    Memory(Bytes),
    File(Arc<SpilledBody>),
}

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Self {
        Body::Memory(bytes)
    }
}

impl Body {
    pub fn len(&self) -> usize {
        match self {
            Body::Memory(bytes) => bytes.len(),
            Body::File(spilled) => spilled.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Read the whole body into `out`, of [`Self::len`] bytes.
    pub fn read_into(&self, out: &mut [u8]) -> io::Result<()> {
        match self {
            Body::Memory(bytes) => {
                out.copy_from_slice(bytes);
                Ok(())
            }
            Body::File(spilled) => spilled.file().read_exact_at(out, spilled.offset()),
        }
    }

    /// Up to `max` bytes from `offset`: a share of the bytes in memory, or
    /// read from the file.
    pub fn slice(&self, offset: usize, max: usize) -> io::Result<Bytes> {
        let end = self.len().min(offset.saturating_add(max));
        let start = offset.min(end);
        match self {
            Body::Memory(bytes) => Ok(bytes.slice(start..end)),
            Body::File(spilled) => {
                let mut out = vec![0; end - start];
                spilled.file().read_exact_at(&mut out, spilled.offset() + start as u64)?;
                Ok(out.into())
            }
        }
    }

    /// The whole body, read from its file if it is there.
    pub fn to_vec(&self) -> io::Result<Vec<u8>> {
        let mut out = vec![0; self.len()];
        self.read_into(&mut out)?;
        Ok(out)
    }

    /// Append the body to `out`: a write, or a copy in the kernel
    /// (`copy_file_range`) for a spilled body.
    pub fn write_to(&self, out: &mut File) -> io::Result<()> {
        match self {
            Body::Memory(bytes) => out.write_all(bytes),
            Body::File(spilled) => copy_range(spilled.file(), spilled.offset(), spilled.len, out),
        }
    }
}

/// Copy `len` bytes of `from` at `offset` to the end of `to`, in the kernel
/// when the file systems allow it, by reading and writing otherwise.
fn copy_range(from: &File, mut offset: u64, mut len: usize, to: &mut File) -> io::Result<()> {
    while len > 0 {
        let mut off_in = offset as libc::loff_t;
        // SAFETY: two open descriptors; the kernel writes only `off_in`.
        let copied = unsafe {
            libc::copy_file_range(from.as_raw_fd(), &mut off_in, to.as_raw_fd(), std::ptr::null_mut(), len, 0)
        };
        match copied {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => {
                offset += n as u64;
                len -= n as usize;
            }
            _ => {
                let error = io::Error::last_os_error();
                let unsupported = [libc::EXDEV, libc::EINVAL, libc::ENOSYS, libc::EOPNOTSUPP];
                if !unsupported.contains(&error.raw_os_error().unwrap_or(0)) {
                    return Err(error);
                }
                return copy_by_reading(from, offset, len, to);
            }
        }
    }
    Ok(())
}

fn copy_by_reading(from: &File, mut offset: u64, mut len: usize, to: &mut File) -> io::Result<()> {
    let mut buffer = vec![0; len.min(1 << 20)];
    while len > 0 {
        let chunk = &mut buffer[..len.min(1 << 20)];
        from.read_exact_at(chunk, offset)?;
        to.write_all(chunk)?;
        offset += chunk.len() as u64;
        len -= chunk.len();
    }
    Ok(())
}

/// A body being received. Bytes go into [`Self::pending`] (or through
/// [`Self::append`]); [`Self::settle`] then keeps them in memory, or writes
/// them out once the body is spilled.
#[derive(Debug)]
pub struct BodyBuffer {
    spool: Arc<BodyStore>,
    limits: BodyLimits,
    /// The body so far while in memory; once spilled, bytes not yet written.
    memory: Vec<u8>,
    reservation: Reservation,
    /// Written at the start of the spill file, before the body.
    prefix: Vec<u8>,
    file: Option<SpillFile>,
    /// Why the body could not be stored, from the first failure on: the body is lost.
    failure: Option<SpillError>,
}

impl BodyBuffer {
    /// `capacity`: the room first made in memory (kept under the spill
    /// threshold); `prefix`: what the spill file starts with.
    pub fn new(spool: &Arc<BodyStore>, limits: BodyLimits, capacity: usize, prefix: Vec<u8>) -> Self {
        let memory = Vec::with_capacity(capacity.min(limits.spill_threshold));
        let mut reservation = Reservation::new(spool);
        let fits = reservation.grow_to(memory.capacity());
        let mut buffer = Self { spool: spool.clone(), limits, memory, reservation, prefix, file: None, failure: None };
        if !fits {
            buffer.spill();
        }
        buffer
    }

    /// Where to put the next bytes of the body; call [`Self::settle`] after.
    pub fn pending(&mut self) -> &mut Vec<u8> {
        &mut self.memory
    }

    /// Take in what was put into [`Self::pending`]: spill the body if it
    /// outgrew its threshold or the memory budget, write it out if spilled.
    /// The failure comes once; the body is then lost (see [`Self::finish`]).
    pub fn settle(&mut self) -> Result<(), SpillError> {
        if self.failure.is_some() {
            self.memory.clear();
            return Ok(());
        }
        match &mut self.file {
            Some(file) => {
                let written = file.write(&self.memory);
                self.memory.clear();
                self.failed(written)
            }
            None if self.memory.len() > self.limits.spill_threshold
                || !self.reservation.grow_to(self.memory.capacity()) =>
            {
                self.spill();
                self.failure.as_ref().map_or(Ok(()), |error| Err(error.duplicate()))
            }
            None => Ok(()),
        }
    }

    /// Add raw bytes (a BDAT chunk) to the body.
    pub fn append(&mut self, bytes: &[u8]) -> Result<(), SpillError> {
        self.memory.extend_from_slice(bytes);
        self.settle()
    }

    pub fn is_spilled(&self) -> bool {
        self.file.is_some()
    }

    /// Bytes of the body so far (none once it is lost).
    pub fn len(&self) -> usize {
        let in_file = self.file.as_ref().map_or(0, |file| file.written as usize - self.prefix.len());
        in_file + self.memory.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn failed(&mut self, result: Result<(), SpillError>) -> Result<(), SpillError> {
        let error = match result {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        self.failure = Some(error.duplicate());
        self.file = None;
        Err(error)
    }

    /// Move the body so far into a new spill file.
    fn spill(&mut self) {
        let spilled = SpillFile::create(&self.spool, &self.limits).and_then(|mut file| {
            file.write(&self.prefix)?;
            file.write(&self.memory)?;
            Ok(file)
        });
        // From now on it holds what one read brings, not the whole body.
        self.memory = Vec::new();
        self.spool.release(std::mem::take(&mut self.reservation.bytes));
        let opened = spilled.map(|file| self.file = Some(file));
        let _ = self.failed(opened);
    }

    /// The body, or the error that lost it.
    pub fn finish(mut self) -> Result<Body, SpillError> {
        if let Some(error) = self.failure.take() {
            return Err(error);
        }
        let memory = std::mem::take(&mut self.memory);
        match self.file.take() {
            None => {
                let bytes = std::mem::take(&mut self.reservation.bytes);
                let reservation = Reservation { spool: self.spool.clone(), bytes };
                Ok(Body::Memory(Bytes::from_owner(ReservedBytes { bytes: memory, _reservation: reservation })))
            }
            Some(mut file) => {
                file.write(&memory)?;
                let len = file.written as usize - self.prefix.len();
                let prefix = std::mem::take(&mut self.prefix);
                Ok(Body::File(Arc::new(SpilledBody { file, prefix, len })))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kumo-body-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn receive(buffer: &mut BodyBuffer, chunks: &[&[u8]]) {
        for chunk in chunks {
            buffer.pending().extend_from_slice(chunk);
            buffer.settle().unwrap();
        }
    }

    #[test]
    fn spill_files_left_from_a_crash_are_removed_and_nothing_else() {
        let dir = scratch_dir("stale");
        let old = SystemTime::now() - STALE_AFTER - Duration::from_secs(60);
        for name in ["1700000000.P12Q3.body", "1700000000.P12Q4.body", "other.body", "1700000000.P12Q5.txt"] {
            fs::write(dir.join(name), b"x").unwrap();
        }
        for name in ["1700000000.P12Q3.body", "other.body", "1700000000.P12Q5.txt"] {
            File::options().write(true).open(dir.join(name)).unwrap().set_modified(old).unwrap();
        }
        let spool = BodyStore::new(dir.clone(), 1 << 20, Arc::default());
        let mut buffer = BodyBuffer::new(&spool, BodyLimits::threshold(1), 1, Vec::new());
        buffer.append(b"spilled").unwrap();
        let Body::File(spilled) = buffer.finish().unwrap() else { panic!("not spilled") };
        assert!(is_spill_file_name(spilled.path().file_name().unwrap().to_str().unwrap()), "{spilled:?}");
        drop(spilled);
        let mut left: Vec<String> =
            fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["1700000000.P12Q4.body", "1700000000.P12Q5.txt", "other.body"]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_small_body_stays_in_memory_and_gives_its_reservation_back() {
        let dir = scratch_dir("small");
        let spool = BodyStore::new(dir.clone(), 1 << 20, Arc::default());
        let mut buffer = BodyBuffer::new(&spool, BodyLimits::threshold(1024), 100, b"ENV\r\n".to_vec());
        receive(&mut buffer, &[b"Subject: x\r\n", b"\r\nhi\r\n"]);
        let body = buffer.finish().unwrap();
        assert!(matches!(&body, Body::Memory(bytes) if bytes.as_ref() == b"Subject: x\r\n\r\nhi\r\n"));
        assert!(spool.in_memory_bytes() >= 100, "a body in memory holds its reservation");
        let shared = body.clone();
        drop(body);
        assert!(spool.in_memory_bytes() >= 100, "held while any clone lives");
        drop(shared);
        assert_eq!(spool.in_memory_bytes(), 0);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
    }

    #[test]
    fn a_body_past_its_threshold_goes_to_a_file_after_the_prefix() {
        let dir = scratch_dir("spill");
        let spool = BodyStore::new(dir.clone(), 1 << 20, Arc::default());
        let mut buffer = BodyBuffer::new(&spool, BodyLimits::threshold(8), 4, b"ENV\r\n".to_vec());
        receive(&mut buffer, &[b"0123", b"4567", b"89ab", b"cdef"]);
        assert!(buffer.is_spilled());
        assert_eq!(buffer.len(), 16);
        buffer.append(b"!").unwrap();
        let body = buffer.finish().unwrap();
        let Body::File(spilled) = &body else { panic!("not spilled") };
        assert_eq!(fs::read(spilled.path()).unwrap(), b"ENV\r\n0123456789abcdef!");
        assert_eq!((body.len(), spilled.offset()), (17, 5));
        assert_eq!(body.to_vec().unwrap(), b"0123456789abcdef!");
        assert_eq!((spool.in_memory_bytes(), spool.spilled_bytes()), (0, 22));
        let path = spilled.path().to_path_buf();
        drop(body);
        assert!(!path.exists(), "removed with the last reference");
        assert_eq!(spool.spilled_bytes(), 0);
    }

    #[test]
    fn with_the_budget_used_up_even_a_small_body_is_spilled() {
        let dir = scratch_dir("budget");
        let spool = BodyStore::new(dir, BUDGET_MARGIN + 64, Arc::default());
        assert!(!spool.memory_exhausted());
        let first = BodyBuffer::new(&spool, BodyLimits::threshold(1024), 64, Vec::new());
        assert!(!first.is_spilled());
        assert!(spool.memory_exhausted());
        let filler = BodyBuffer::new(&spool, BodyLimits::threshold(BUDGET_MARGIN), BUDGET_MARGIN, Vec::new());
        let mut second = BodyBuffer::new(&spool, BodyLimits::threshold(1024), 64, Vec::new());
        assert!(second.is_spilled());
        second.append(b"tiny\r\n").unwrap();
        assert!(matches!(second.finish().unwrap(), Body::File(_)));
        drop((first, filler));
        assert!(!spool.memory_exhausted());
    }

    #[test]
    fn a_failed_spill_loses_the_body_and_marks_the_spool_full() {
        let dir = scratch_dir("fails").join("missing");
        let spool = BodyStore::new(dir, 1 << 20, Arc::default());
        assert!(!spool.has_room(1), "no file system behind a missing directory");
        let mut buffer = BodyBuffer::new(&spool, BodyLimits::threshold(4), 4, Vec::new());
        assert!(buffer.append(b"more than four").is_err());
        assert!(buffer.append(b"the rest is taken and dropped").is_ok());
        assert!(buffer.finish().is_err());
        assert_eq!(spool.in_memory_bytes(), 0);
    }

    #[test]
    fn a_spill_file_that_cannot_be_made_marks_the_spool_full_for_a_second() {
        let dir = scratch_dir("vanished");
        let spool = BodyStore::new(dir.clone(), 1 << 20, Arc::default());
        assert!(spool.has_room(1));
        fs::remove_dir_all(&dir).unwrap();
        let mut buffer = BodyBuffer::new(&spool, BodyLimits::threshold(1), 1, Vec::new());
        assert!(matches!(buffer.append(b"lost"), Err(SpillError::Io(_))));
        assert!(!spool.has_room(1), "taken as full until measured again");
    }

    /// As if the spool's file system had just been measured with `free` bytes free.
    fn pretend_free(spool: &BodyStore, free: u64) {
        spool.free.store(free, Ordering::Relaxed);
        spool.measured_at.store(spool.epoch.elapsed().as_millis() as u64, Ordering::Release);
    }

    #[test]
    fn a_spilled_body_keeps_the_spool_reserve_free_or_is_lost() {
        let dir = scratch_dir("reserve");
        let spool = BodyStore::new(dir.clone(), 1 << 20, Arc::default());
        let limits = BodyLimits { spool_reserve: 1000, ..BodyLimits::threshold(8) };
        pretend_free(&spool, 1099);
        assert!(matches!(
            BodyBuffer::new(&spool, limits.clone(), 4, Vec::new()).append(&[b'x'; 100]),
            Err(SpillError::NoRoom)
        ));
        pretend_free(&spool, 1300);
        let mut buffer = BodyBuffer::new(&spool, limits.clone(), 4, Vec::new());
        buffer.append(&[b'x'; 200]).unwrap();
        assert!(buffer.is_spilled());
        // 1,100 left by our count: 100 more would leave less than 1,000.
        assert!(matches!(buffer.append(&[b'y'; 101]), Err(SpillError::NoRoom)));
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "the file is removed at once");
        buffer.append(b"the rest is read and dropped").unwrap();
        assert!(matches!(buffer.finish(), Err(SpillError::NoRoom)));
        assert_eq!(spool.spilled_bytes(), 0);
        // A body that stays in memory needs no room.
        pretend_free(&spool, 0);
        let mut small = BodyBuffer::new(&spool, limits, 4, Vec::new());
        small.append(b"fits").unwrap();
        assert!(matches!(small.finish().unwrap(), Body::Memory(_)));
    }

    #[test]
    fn a_clients_spilled_bytes_are_counted_across_its_bodies_up_to_the_cap() {
        let spool = BodyStore::new(scratch_dir("cap"), 1 << 20, Arc::default());
        let quota = SpillQuota { spilled: Arc::default(), cap: 100 };
        let limits = BodyLimits { quota: Some(quota.clone()), ..BodyLimits::threshold(8) };
        let mut first = BodyBuffer::new(&spool, limits.clone(), 4, b"ENV".to_vec());
        first.append(&[b'a'; 57]).unwrap();
        assert_eq!(quota.spilled.load(Ordering::Relaxed), 60, "the prefix counts");
        assert!(quota.allows(40) && !quota.allows(41));
        let mut second = BodyBuffer::new(&spool, limits.clone(), 4, Vec::new());
        assert!(matches!(second.append(&[b'b'; 41]), Err(SpillError::ClientCap)));
        assert_eq!(quota.spilled.load(Ordering::Relaxed), 60, "a refused write is not counted");
        let first = first.finish().unwrap();
        assert_eq!(quota.spilled.load(Ordering::Relaxed), 60, "held while the message lives");
        drop(first);
        assert_eq!(quota.spilled.load(Ordering::Relaxed), 0);
        assert!(second.finish().is_err(), "a lost body stays lost");
        let mut third = BodyBuffer::new(&spool, limits, 4, Vec::new());
        third.append(&[b'c'; 100]).unwrap();
        drop(third);
        assert_eq!(quota.spilled.load(Ordering::Relaxed), 0, "an unfinished body gives its count back");
    }

    #[test]
    fn an_envelope_reservation_holds_budget_until_dropped() {
        let spool = BodyStore::new(scratch_dir("envelope"), 1000, Arc::default());
        let mut envelope = Reservation::new(&spool);
        assert!(envelope.add(600));
        let mut recipient = Reservation::new(&spool);
        assert!(!recipient.add(401), "past the budget: nothing reserved");
        assert_eq!((recipient.bytes(), spool.in_memory_bytes()), (0, 600));
        assert!(recipient.add(400));
        envelope.take(recipient);
        assert_eq!((envelope.bytes(), spool.in_memory_bytes(), spool.memory_left()), (1000, 1000, 0));
        let body = BodyBuffer::new(&spool, BodyLimits::threshold(1024), 64, Vec::new());
        assert!(body.is_spilled(), "a body finds no room in memory");
        drop(body);
        drop(envelope);
        assert_eq!(spool.in_memory_bytes(), 0);
    }

    #[test]
    fn the_spool_room_is_measured() {
        let spool = BodyStore::new(scratch_dir("room"), 1 << 20, Arc::default());
        assert!(spool.has_room(1));
        assert!(!BodyStore::new(scratch_dir("room2"), 1, Arc::default()).has_room(u64::MAX));
    }

    #[test]
    fn a_spilled_body_is_copied_into_another_file_without_its_prefix() {
        let dir = scratch_dir("copy");
        let spool = BodyStore::new(dir.clone(), 1 << 20, Arc::default());
        let mut buffer = BodyBuffer::new(&spool, BodyLimits::threshold(1), 1, b"PREFIX".to_vec());
        let text: Vec<u8> = (0..200_000u32).flat_map(|n| n.to_le_bytes()).collect();
        buffer.append(&text).unwrap();
        let body = buffer.finish().unwrap();
        let mut out = OpenOptions::new().read(true).write(true).create_new(true).open(dir.join("out")).unwrap();
        out.write_all(b"HEAD").unwrap();
        body.write_to(&mut out).unwrap();
        assert_eq!(fs::read(dir.join("out")).unwrap(), [b"HEAD".as_slice(), &text].concat());
    }
}
