//! The durable log of the broker server: durable queues survive a crash.
//!
//! Each durable queue has a directory of append-only segment files and a meta file with its configuration:
//!
//! ```text
//! DATA_DIR/LOCK                       held while a broker uses the directory
//! DATA_DIR/queues/<n>/meta            the queue's name and configuration
//! DATA_DIR/queues/<n>/<segment>.log   records: a publish per message that entered the queue, an ack per one
//!                                     that left it for good (the format: `record`)
//! DATA_DIR/quarantine/                segments set aside by `--quarantine`
//! ```
//!
//! One writer thread takes the engine's journal in order and appends it; a publish to a durable queue is
//! confirmed only after the fsync that covers its record (group commit: one fsync for everything that arrived
//! meanwhile, [`FsyncPolicy::Always`]). Records that no confirm waits for are written to the system within
//! about a millisecond and synced within [`SYNC_INTERVAL`], so that a busy broker whose publishes are calls
//! (answered by their replies, not by the broker) does not sync thousands of times a second for nobody.
//!
//! A segment is deleted once every message it holds is acked and every segment before it is gone (acks always
//! follow their publishes, so this never loses an ack that matters). An oldest segment that holds few live
//! messages while many segments follow it is compacted: its live messages are written again at the end of the
//! log, and it is deleted.
//!
//! On start, [`Log::open`] reads every queue back (see `recovery`): messages not acked come back ready (those
//! unacked at the crash included); a record cut short at the end of the last segment (a write the crash
//! interrupted, never confirmed) is truncated away; any other record that does not check out stops the start
//! with [`LogError::Corrupt`] naming the file and offset, unless `quarantine` is set: then the segment is copied
//! to `DATA_DIR/quarantine/`, the bad bytes are skipped to the next good record, the queue is rewritten from
//! what is left, and the report says so. A corrupt record is never delivered and never skipped silently.

mod record;
mod recovery;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};

use crate::engine::{Journal, QueueConfig};
pub use recovery::{RecoveredMessage, RecoveredQueue, Recovery};

/// The largest message (a frame's payload) a log record holds; a broker with a data directory accepts no
/// larger frame.
pub const MAX_MESSAGE: usize = record::MAX_BODY - 64;

/// When the log calls fsync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Before every confirm: a confirmed publish survives a crash of the machine. Group commit: one fsync
    /// covers every record written since the last. A record no confirm waits for (a call's quiet request, an
    /// ack) is synced within [`SYNC_INTERVAL`].
    #[default]
    Always,
    /// Never: a publish is confirmed once written to the operating system. It survives a crash of the broker
    /// process (kill -9 included) but not of the machine: a power loss or kernel crash loses what the system
    /// had not written back yet (up to about 30 s with Linux's defaults).
    Never,
}

impl std::str::FromStr for FsyncPolicy {
    type Err = String;

    fn from_str(value: &str) -> Result<FsyncPolicy, String> {
        match value {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            other => Err(format!("`{other}` is not an fsync policy; use always or never")),
        }
    }
}

/// How the log is kept.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct LogConfig {
    /// The data directory.
    pub dir: PathBuf,
    /// When to fsync (default: before every confirm).
    pub fsync: FsyncPolicy,
    /// A segment file is closed and a new one started past this size (default 64 MiB).
    pub segment_size: u64,
    /// Set a corrupt segment aside and keep the records around the corruption, instead of refusing to start.
    pub quarantine: bool,
}

impl LogConfig {
    /// A log in `dir` with the defaults.
    pub fn new(dir: impl Into<PathBuf>) -> LogConfig {
        LogConfig { dir: dir.into(), fsync: FsyncPolicy::Always, segment_size: 64 * 1024 * 1024, quarantine: false }
    }
}

/// Why the log cannot be opened or written.
#[derive(Debug)]
#[non_exhaustive]
pub enum LogError {
    /// A file operation failed.
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        error: std::io::Error,
    },
    /// A record that is not intact where one must be.
    Corrupt {
        /// The file.
        file: PathBuf,
        /// The offset of the record in it.
        offset: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Another process holds the data directory.
    Locked(PathBuf),
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            LogError::Corrupt { file, offset, reason } => write!(
                f,
                "corrupt record in {} at offset {offset}: {reason}; restore the file from a backup, or start with \
                 --quarantine to set the segment aside and keep the records around the damage",
                file.display()
            ),
            LogError::Locked(dir) => {
                write!(f, "{} is in use by another broker (its LOCK file is held)", dir.display())
            }
        }
    }
}

impl std::error::Error for LogError {}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |error| LogError::Io { path: path.to_owned(), error }
}

/// Called once the records before it are durable, or with why they may not be.
pub(crate) type Barrier = Box<dyn FnOnce(Result<(), String>) + Send>;

/// How long the writer waits after a round before it writes entries that no barrier waits for: a busy broker's
/// appends are written together rather than each waking the writer.
const PACE: Duration = Duration::from_millis(1);

/// How soon after it is written a record that no barrier waits for is synced (under [`FsyncPolicy::Always`]).
pub const SYNC_INTERVAL: Duration = Duration::from_millis(25);

/// What waits for the writer: taken whole at the start of each of its rounds.
#[derive(Default)]
struct Pending {
    entries: Vec<Journal<Bytes>>,
    barriers: Vec<Barrier>,
    /// What wakes the writer (a busy writer takes what arrived when its round ends, without a system call on
    /// the appending thread).
    wake_on: Wake,
    /// Appends are refused; the writer finishes what it took and stops.
    closed: bool,
}

/// What wakes a waiting writer.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum Wake {
    /// Nothing: it is not waiting.
    #[default]
    Busy,
    /// An append, a barrier or the close.
    Anything,
    /// A barrier or the close: it waits for its pace to end before it writes the entries it has.
    Barrier,
}

/// The writer's queue, shared with the [`Log`] that fills it.
#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    work: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes the writer once `pending` is let go, if it waits for `what` (an append: `Wake::Anything`).
    fn woken(&self, mut pending: MutexGuard<'_, Pending>, what: Wake) {
        let wake = match pending.wake_on {
            Wake::Busy => false,
            Wake::Anything => true,
            Wake::Barrier => what == Wake::Barrier,
        };
        if wake {
            pending.wake_on = Wake::Busy;
        }
        drop(pending);
        if wake {
            self.work.notify_one();
        }
    }
}

/// The log of a running broker: hands the engine's journal to the writer thread.
///
/// The journal goes to the writer through one buffer that it takes whole at each round (its group commit),
/// not as a message per operation: the broker's thread allocates nothing per append, and of what it allocated
/// the writer frees only the entries (and a confirm's barrier), so the two threads seldom meet in the allocator.
pub struct Log {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Log").finish_non_exhaustive()
    }
}

impl Log {
    /// Opens (or creates) the log in `config.dir`, reads back every durable queue, and starts the writer.
    ///
    /// # Errors
    /// [`LogError::Locked`] when another broker uses the directory, [`LogError::Corrupt`] for a damaged
    /// record (without `quarantine`), [`LogError::Io`] when a file cannot be read or written.
    pub fn open(config: LogConfig) -> Result<(Log, Recovery), LogError> {
        std::fs::create_dir_all(config.dir.join("queues")).map_err(io_error(&config.dir))?;
        let lock_path = config.dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(LogError::Locked(config.dir.clone())),
            Err(std::fs::TryLockError::Error(error)) => return Err(LogError::Io { path: lock_path, error }),
        }
        let (recovery, queues) = recovery::recover(&config)?;
        let shared = Arc::new(Shared::default());
        let writer = Writer {
            config,
            queues,
            next_dir: 0,
            failed: None,
            _lock: lock,
            dirs: Vec::new(),
            deferred_acks: Vec::new(),
        };
        let taken = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("mqrpc-log".into())
            .spawn(move || writer.run(&taken))
            .map_err(|error| LogError::Io { path: PathBuf::from("mqrpc-log thread"), error })?;
        let log = Log { shared, thread: Mutex::new(Some(thread)) };
        Ok((log, recovery))
    }

    /// Moves `entries` to the log, in order after everything appended before; `entries` is left empty, with
    /// its room. Once the log is closed they are dropped.
    pub(crate) fn append(&self, entries: &mut Vec<Journal<Bytes>>) {
        if entries.is_empty() {
            return;
        }
        let mut pending = self.shared.lock();
        if pending.closed {
            entries.clear();
            return;
        }
        pending.entries.append(entries);
        self.shared.woken(pending, Wake::Anything);
    }

    /// Calls `done` once everything appended before is durable (written, and fsynced under
    /// [`FsyncPolicy::Always`]), or with the error that prevents it.
    pub(crate) fn barrier(&self, done: Barrier) {
        let mut pending = self.shared.lock();
        if pending.closed {
            drop(pending);
            done(Err("the log is closed".into()));
            return;
        }
        pending.barriers.push(done);
        self.shared.woken(pending, Wake::Barrier);
    }

    /// Writes and syncs what is pending and stops the writer; appends after it are refused.
    pub fn close(&self) {
        let mut pending = self.shared.lock();
        pending.closed = true;
        self.shared.woken(pending, Wake::Barrier);
        if let Some(thread) = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        self.close();
    }
}

/// A segment file of a queue.
struct Segment {
    number: u64,
    path: PathBuf,
    /// The numbers of the messages whose last publish record is in it and that were not acked yet.
    live: HashSet<u64>,
    /// Publish records written in it.
    published: u64,
}

/// What the writer keeps of one durable queue.
pub(crate) struct QueueLog {
    dir: PathBuf,
    config: QueueConfig,
    /// Oldest first; the last is the one appended to.
    segments: VecDeque<Segment>,
    /// The last segment, open for appending, and its size.
    active: Option<(File, u64)>,
    /// Records encoded and not written yet.
    buffer: BytesMut,
    /// Records were written to the active segment since it was last synced.
    unsynced: bool,
}

impl QueueLog {
    pub(crate) fn recovered(
        dir: PathBuf,
        config: QueueConfig,
        segments: Vec<(u64, PathBuf, HashSet<u64>, u64)>,
    ) -> QueueLog {
        let segments = segments
            .into_iter()
            .map(|(number, path, live, published)| Segment { number, path, live, published })
            .collect();
        QueueLog { dir, config, segments, active: None, buffer: BytesMut::new(), unsynced: false }
    }

    /// The file of the segment appended to.
    fn active_path(&self) -> PathBuf {
        self.segments.back().map(|segment| segment.path.clone()).unwrap_or_default()
    }

    /// Message `seq` was acked.
    fn acked(&mut self, seq: u64) {
        for segment in self.segments.iter_mut().rev() {
            if segment.live.remove(&seq) {
                return;
            }
        }
    }
}

/// A queue's oldest segment still holding live messages is compacted ([`Writer::compact`]) once this many
/// segments follow it and at most a quarter of the messages published in it are live, so that a message left
/// unacked does not keep every segment after it on disk (a backlog nobody consumes is not rewritten).
const COMPACT_BEHIND: usize = 8;

/// What a record appended to a queue's log is.
#[derive(Clone, Copy)]
enum Appended {
    /// A message published as `seq`.
    Publish(u64),
    /// Message `seq` written again by compaction.
    Copy(u64),
    /// An ack.
    Ack,
}

pub(crate) fn segment_name(number: u64) -> String {
    format!("{number:016x}.log")
}

struct Writer {
    config: LogConfig,
    /// By queue name.
    queues: HashMap<Arc<str>, QueueLog>,
    next_dir: u64,
    failed: Option<String>,
    _lock: File,
    /// Directories written since the last sync (the segments written are each queue's `unsynced`).
    dirs: Vec<PathBuf>,
    /// Acks taken since the last sync, written only after it: the publish a dead-lettering or a `Republish`
    /// makes in another queue's file must be on disk before the ack that goes with it, whatever order the
    /// system writes files back in.
    deferred_acks: Vec<(Arc<str>, u64)>,
}

impl Writer {
    /// Takes the journal and the barriers in rounds. A round with a barrier to answer (a confirm waits) syncs
    /// at once (group commit: one sync for everything taken); entries alone are written to the system after a
    /// pace of [`PACE`] (so that a busy broker's appends do not wake the writer one by one), and synced within
    /// [`SYNC_INTERVAL`] of being written, whether or not a barrier comes.
    fn run(mut self, shared: &Shared) {
        self.next_dir = self.queues.values().filter_map(|queue| dir_number(&queue.dir)).max().map_or(0, |n| n + 1);
        let always = self.config.fsync == FsyncPolicy::Always;
        // Swapped with the shared ones at each round: their room goes back and forth, nothing is allocated.
        let mut entries = Vec::new();
        let mut barriers = Vec::new();
        // When the last round ended, and when what was written since the last sync must be synced by.
        let mut paced_until = Instant::now();
        let mut sync_by: Option<Instant> = None;
        loop {
            let closed = {
                let mut pending = shared.lock();
                loop {
                    let now = Instant::now();
                    let due = sync_by.is_some_and(|by| by <= now);
                    let has_entries = !pending.entries.is_empty();
                    if pending.closed || !pending.barriers.is_empty() || due || (has_entries && paced_until <= now) {
                        break;
                    }
                    let deadline = [sync_by, has_entries.then_some(paced_until)].into_iter().flatten().min();
                    pending.wake_on = if has_entries { Wake::Barrier } else { Wake::Anything };
                    pending = match deadline {
                        Some(deadline) => {
                            shared.work.wait_timeout(pending, deadline - now).unwrap_or_else(PoisonError::into_inner).0
                        }
                        None => shared.work.wait(pending).unwrap_or_else(PoisonError::into_inner),
                    };
                }
                pending.wake_on = Wake::Busy;
                if pending.closed && pending.entries.is_empty() && pending.barriers.is_empty() {
                    break;
                }
                std::mem::swap(&mut entries, &mut pending.entries);
                std::mem::swap(&mut barriers, &mut pending.barriers);
                pending.closed
            };
            for entry in entries.drain(..) {
                self.apply(entry);
            }
            let due = sync_by.is_some_and(|by| by <= Instant::now());
            if !always || closed || due || !barriers.is_empty() {
                let result = self.sync();
                for barrier in barriers.drain(..) {
                    barrier(result.clone());
                }
                sync_by = None;
                if result.is_ok() {
                    self.write_deferred_acks();
                    self.delete_acked();
                }
            } else if let Err(error) = self.queues.values_mut().try_for_each(flush) {
                self.fail(&error);
            }
            // Deferred acks appended after the sync, or entries written without one.
            if always && sync_by.is_none() && self.has_unsynced() {
                sync_by = Some(Instant::now() + SYNC_INTERVAL);
            }
            paced_until = Instant::now() + PACE;
        }
        // Stopping: the deferred acks go out too, after the sync that covers what they follow.
        if self.sync().is_ok() {
            self.write_deferred_acks();
            let _ = self.sync();
        }
    }

    /// Whether records were encoded or written since the last sync.
    fn has_unsynced(&self) -> bool {
        !self.deferred_acks.is_empty()
            || !self.dirs.is_empty()
            || self.queues.values().any(|log| log.unsynced || !log.buffer.is_empty())
    }

    /// Appends the acks deferred past the last sync; the next sync writes them.
    fn write_deferred_acks(&mut self) {
        let mut acks = std::mem::take(&mut self.deferred_acks);
        for (queue, seq) in acks.drain(..) {
            if let Err(error) = self.append(&queue, Appended::Ack, |buffer| record::put_ack(buffer, seq)) {
                self.fail(&error);
                return;
            }
        }
        // Its room, for the next round's.
        self.deferred_acks = acks;
    }

    fn fail(&mut self, error: &LogError) {
        if self.failed.is_none() {
            tracing::error!(%error, "the log cannot be written: durable publishes are refused from now on");
            self.failed = Some(format!("the broker cannot write its log: {error}"));
        }
    }

    fn apply(&mut self, entry: Journal<Bytes>) {
        if self.failed.is_some() {
            return;
        }
        let result = match entry {
            Journal::Declared { queue, config } => self.declare(queue, config),
            Journal::Deleted { queue } => self.delete(&queue),
            Journal::Stored { queue, seq, message, record } => {
                let (expires_ms, due_ms) = (record.expires_at.map(unix_ms), record.due.map(unix_ms));
                let published = record::Published {
                    seq,
                    priority: record.priority,
                    expires_ms,
                    due_ms,
                    key: record.key,
                    id: record.id,
                    payload: message,
                };
                self.append(&queue, Appended::Publish(seq), |buffer| record::put_publish(buffer, &published))
            }
            Journal::Removed { queue, seq } => {
                if let Some(log) = self.queues.get_mut(&queue) {
                    log.acked(seq);
                    self.deferred_acks.push((queue, seq));
                }
                Ok(())
            }
        };
        if let Err(error) = result {
            self.fail(&error);
        }
    }

    fn declare(&mut self, queue: Arc<str>, config: QueueConfig) -> Result<(), LogError> {
        if let Some(existing) = self.queues.get_mut(&queue) {
            if existing.config != config {
                write_atomically(&existing.dir.join("meta"), &record::meta(&queue, &config))?;
                existing.config = config;
            }
            return Ok(());
        }
        let dir = self.config.dir.join("queues").join(self.next_dir.to_string());
        self.next_dir += 1;
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        write_atomically(&dir.join("meta"), &record::meta(&queue, &config))?;
        sync_dir(&self.config.dir.join("queues"))?;
        self.queues.insert(queue, QueueLog::recovered(dir, config, Vec::new()));
        Ok(())
    }

    fn delete(&mut self, queue: &str) -> Result<(), LogError> {
        let Some(log) = self.queues.remove(queue) else { return Ok(()) };
        self.dirs.retain(|path| !path.starts_with(&log.dir));
        self.deferred_acks.retain(|(name, _)| &**name != queue);
        // Renamed first, in one step: a crash while its files go never brings back half a queue.
        let gone = log.dir.with_extension("deleted");
        std::fs::rename(&log.dir, &gone).map_err(io_error(&log.dir))?;
        sync_dir(&self.config.dir.join("queues"))?;
        std::fs::remove_dir_all(&gone).map_err(io_error(&gone))
    }

    /// Encodes a record of `queue` with `put`.
    fn append(&mut self, queue: &str, what: Appended, put: impl FnOnce(&mut BytesMut)) -> Result<(), LogError> {
        let segment_size = self.config.segment_size;
        let fsync = self.config.fsync;
        let Some(log) = self.queues.get_mut(queue) else {
            return Err(LogError::Io {
                path: self.config.dir.join("queues"),
                error: std::io::Error::other(format!("a record for queue `{queue}`, which the log does not hold")),
            });
        };
        let before = log.buffer.len();
        put(&mut log.buffer);
        let len = (log.buffer.len() - before) as u64;
        if len > (record::HEADER + record::MAX_BODY) as u64 {
            log.buffer.truncate(before);
            let path = log.dir.clone();
            return Err(LogError::Io { path, error: std::io::Error::other("a record over the log's largest") });
        }
        let written = log.active.as_ref().map_or(0, |(_, size)| *size) + before as u64;
        if log.active.is_none() || (written > 0 && written + len > segment_size) {
            // The records before this one go to the segment they were meant for, synced now: only the last
            // segment can end in a record cut short. This one starts a new segment.
            let record = log.buffer.split_off(before);
            flush(log)?;
            if let (Some((file, _)), true, FsyncPolicy::Always) = (&log.active, log.unsynced, fsync) {
                file.sync_data().map_err(|error| LogError::Io { path: log.active_path(), error })?;
            }
            log.unsynced = false;
            let number = match log.segments.back() {
                Some(last) => last.number.checked_add(1).ok_or_else(|| LogError::Io {
                    path: last.path.clone(),
                    error: std::io::Error::other("no segment number after this one"),
                })?,
                None => 1,
            };
            let path = log.dir.join(segment_name(number));
            let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io_error(&path))?;
            log.segments.push_back(Segment { number, path, live: HashSet::new(), published: 0 });
            log.active = Some((file, 0));
            log.buffer = record;
            self.dirs.push(log.dir.clone());
        }
        // A copy made by compaction counts in the segment it goes to; the original's segment lets go of it
        // once the copy is synced.
        let seq = match what {
            Appended::Ack => return Ok(()),
            Appended::Publish(seq) | Appended::Copy(seq) => seq,
        };
        if let Some(segment) = log.segments.back_mut() {
            segment.live.insert(seq);
            segment.published += 1;
        }
        Ok(())
    }

    /// Writes every buffer, then syncs every file and directory written to.
    fn sync(&mut self) -> Result<(), String> {
        if let Some(failed) = &self.failed {
            return Err(failed.clone());
        }
        let written = self.queues.values_mut().try_for_each(flush);
        #[cfg(feature = "monitoring")]
        let started = std::time::Instant::now();
        match written.and_then(|()| self.sync_written()) {
            Ok(_synced) => {
                #[cfg(feature = "monitoring")]
                if _synced > 0 {
                    metrics::histogram!("mqrpc_broker_log_fsync_seconds").record(started.elapsed());
                }
                Ok(())
            }
            Err(error) => {
                self.fail(&error);
                Err(self.failed.clone().unwrap_or_default())
            }
        }
    }

    /// Syncs the segments written to since the last sync, then the directories; says how many it synced.
    fn sync_written(&mut self) -> Result<usize, LogError> {
        let always = self.config.fsync == FsyncPolicy::Always;
        let mut synced = 0;
        for log in self.queues.values_mut().filter(|log| log.unsynced) {
            if let (Some((file, _)), true) = (&log.active, always) {
                file.sync_data().map_err(|error| LogError::Io { path: log.active_path(), error })?;
                synced += 1;
            }
            log.unsynced = false;
        }
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_unstable();
        dirs.dedup();
        if always {
            dirs.iter().try_for_each(|dir| sync_dir(dir))?;
            synced += dirs.len();
        }
        dirs.clear();
        self.dirs = dirs;
        Ok(synced)
    }

    /// Deletes, per queue, the oldest segments whose messages were all acked (never the one appended to); then
    /// compacts the oldest left if [`COMPACT_BEHIND`] segments follow it.
    fn delete_acked(&mut self) {
        if self.failed.is_some() {
            return;
        }
        let mut compact = Vec::new();
        for (name, log) in &mut self.queues {
            let mut deleted = false;
            while log.segments.len() > 1 && log.segments.front().is_some_and(|segment| segment.live.is_empty()) {
                let Some(segment) = log.segments.front() else { break };
                // A segment that stays keeps those after it: they may hold its acks.
                if let Err(error) = std::fs::remove_file(&segment.path) {
                    tracing::warn!(path = %segment.path.display(), %error, "could not delete an acked segment");
                    break;
                }
                log.segments.pop_front();
                deleted = true;
            }
            if deleted && let Err(error) = sync_dir(&log.dir) {
                tracing::warn!(%error, "could not sync a queue's directory after deleting segments");
            }
            let sparse = log.segments.front().is_some_and(|oldest| oldest.live.len() as u64 * 4 <= oldest.published);
            if log.segments.len() > COMPACT_BEHIND && sparse {
                compact.push(Arc::clone(name));
            }
        }
        for queue in compact {
            if let Err(error) = self.compact(&queue) {
                self.fail(&error);
            }
        }
    }

    /// Writes the live messages of `queue`'s oldest segment again at the end of its log, syncs, and deletes the
    /// segment: what a crash leaves in between holds each message twice, and recovery keeps one.
    fn compact(&mut self, queue: &Arc<str>) -> Result<(), LogError> {
        let Some(log) = self.queues.get_mut(queue) else { return Ok(()) };
        let Some(oldest) = log.segments.front() else { return Ok(()) };
        let (path, live) = (oldest.path.clone(), oldest.live.clone());
        let bytes = Bytes::from(std::fs::read(&path).map_err(io_error(&path))?);
        let mut pos = 0;
        let mut moved = Vec::new();
        while pos < bytes.len() {
            let (parsed, len) = record::parse(&bytes.slice(pos..)).map_err(|bad| LogError::Corrupt {
                file: path.clone(),
                offset: pos as u64,
                reason: bad.reason(),
            })?;
            if let record::Record::Publish(message) = parsed
                && live.contains(&message.seq)
            {
                moved.push((message.seq, bytes.slice(pos..pos + len)));
            }
            pos += len;
        }
        let copied: Vec<u64> = moved.iter().map(|(seq, _)| *seq).collect();
        for (seq, raw) in moved {
            self.append(queue, Appended::Copy(seq), |buffer| buffer.extend_from_slice(&raw))?;
        }
        if let Err(error) = self.sync() {
            tracing::warn!(%error, "compaction could not sync; the old segment stays");
            return Ok(());
        }
        let Some(log) = self.queues.get_mut(queue) else { return Ok(()) };
        let Some(oldest) = log.segments.front_mut().filter(|segment| segment.path == path) else { return Ok(()) };
        for seq in copied {
            oldest.live.remove(&seq);
        }
        if oldest.live.is_empty() {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    log.segments.pop_front();
                    if let Err(error) = sync_dir(&log.dir) {
                        tracing::warn!(%error, "could not sync a queue's directory after compacting");
                    }
                    tracing::debug!(queue = %queue, path = %path.display(), "compacted the oldest segment");
                }
                Err(error) => tracing::warn!(path = %path.display(), %error, "could not delete a compacted segment"),
            }
        }
        Ok(())
    }
}

/// Writes a queue's buffered records to its active segment, which is then `unsynced`.
fn flush(log: &mut QueueLog) -> Result<(), LogError> {
    if log.buffer.is_empty() {
        return Ok(());
    }
    let Some((file, size)) = log.active.as_mut() else { return Ok(()) };
    if let Err(error) = file.write_all(&log.buffer) {
        return Err(LogError::Io { path: log.active_path(), error });
    }
    *size += log.buffer.len() as u64;
    log.buffer.clear();
    log.unsynced = true;
    Ok(())
}

fn dir_number(dir: &Path) -> Option<u64> {
    dir.file_name()?.to_str()?.parse().ok()
}

/// Replaces `path` with `bytes`: a temporary file, synced, renamed over it, and the directory synced.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), LogError> {
    let temporary = path.with_extension("tmp");
    let mut file = File::create(&temporary).map_err(io_error(&temporary))?;
    file.write_all(bytes).map_err(io_error(&temporary))?;
    file.sync_all().map_err(io_error(&temporary))?;
    std::fs::rename(&temporary, path).map_err(io_error(path))?;
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|dir| dir.sync_all()).map_err(io_error(dir))
}

/// Milliseconds since the Unix epoch at `instant`.
fn unix_ms(instant: Instant) -> u64 {
    let now = Instant::now();
    let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let at = if instant >= now { wall + (instant - now) } else { wall.saturating_sub(now - instant) };
    u64::try_from(at.as_millis()).unwrap_or(u64::MAX)
}

/// The instant at `ms` milliseconds since the Unix epoch, given `now` (as an instant and as wall time).
pub(crate) fn instant_of(ms: u64, now: Instant, wall_now: Duration) -> Instant {
    let at = Duration::from_millis(ms);
    if at >= wall_now { now + (at - wall_now) } else { now.checked_sub(wall_now - at).unwrap_or(now) }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::mpsc as std_mpsc;

    use proptest::prelude::*;

    use super::record::{self as format, Record};
    use super::*;
    use crate::engine;

    fn durable() -> QueueConfig {
        QueueConfig { durable: true, dead_letter: Some("q.dlq".into()), ..QueueConfig::default() }
    }

    fn stored(seq: u64, payload: &[u8]) -> Journal<Bytes> {
        let record = engine::Record { priority: 0, expires_at: None, due: None, key: None, id: Some([seq as u8; 16]) };
        Journal::Stored { queue: Arc::from("q"), seq, message: Bytes::copy_from_slice(payload), record }
    }

    fn removed(seq: u64) -> Journal<Bytes> {
        Journal::Removed { queue: Arc::from("q"), seq }
    }

    fn declared() -> Journal<Bytes> {
        Journal::Declared { queue: Arc::from("q"), config: durable() }
    }

    /// Waits for everything appended so far to be durable.
    fn settle(log: &Log) -> Result<(), String> {
        let (done, result) = std_mpsc::channel();
        log.barrier(Box::new(move |outcome| drop(done.send(outcome))));
        result.recv().unwrap_or_else(|_| Err("the writer stopped".into()))
    }

    fn messages(recovery: &Recovery) -> Vec<(u64, Vec<u8>)> {
        recovery
            .queues
            .iter()
            .filter(|queue| queue.name == "q")
            .flat_map(|queue| queue.messages.iter().map(|message| (message.seq, message.payload.to_vec())))
            .collect()
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let queue = dir.join("queues").join("0");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&queue)
            .expect("the queue's directory")
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.extension().is_some_and(|extension| extension == "log"))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn a_log_reads_back_what_was_not_acked() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        {
            let (log, recovery) = Log::open(LogConfig::new(dir.path())).expect("opens");
            assert!(recovery.queues.is_empty());
            let mut entries = vec![declared()];
            entries.extend((1..=10).map(|seq| stored(seq, format!("m{seq}").as_bytes())));
            entries.extend([removed(2), removed(4)]);
            log.append(&mut entries);
            settle(&log).expect("durable");
        }
        let (log, recovery) = Log::open(LogConfig::new(dir.path())).expect("opens again");
        let seqs: Vec<u64> = messages(&recovery).iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, [1, 3, 5, 6, 7, 8, 9, 10]);
        assert_eq!(messages(&recovery)[1].1, b"m3");
        assert_eq!(recovery.queues[0].config, durable());
        // A second broker cannot take the same directory.
        assert!(matches!(Log::open(LogConfig::new(dir.path())), Err(LogError::Locked(_))));
        drop(log);
        assert!(Log::open(LogConfig::new(dir.path())).is_ok());
    }

    /// What no barrier waits for is written, and synced, all the same: an ack is written only after the sync
    /// that covers the publish before it, so its record in the file shows that sync.
    #[test]
    fn records_no_barrier_waits_for_are_written_and_synced_without_one() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (log, _) = Log::open(LogConfig::new(dir.path())).expect("opens");
        log.append(&mut vec![declared(), stored(1, b"one"), stored(2, b"two"), removed(1)]);
        let segment = dir.path().join("queues").join("0").join(segment_name(1));
        let deadline = Instant::now() + Duration::from_secs(10);
        let found = loop {
            let bytes = std::fs::read(&segment).map(Bytes::from).unwrap_or_default();
            let found: Vec<Record> = records(&bytes).into_iter().map(|(_, record)| record).collect();
            if found.len() == 3 || Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(
            matches!(found.as_slice(), [Record::Publish(one), Record::Publish(two), Record::Ack(1)]
                if one.seq == 1 && two.seq == 2),
            "{found:?}"
        );
        drop(log);
        let (_, recovery) = Log::open(LogConfig::new(dir.path())).expect("opens again");
        assert_eq!(messages(&recovery), [(2, b"two".to_vec())]);
    }

    #[test]
    fn acked_segments_are_deleted_and_a_deleted_queue_leaves_nothing() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut config = LogConfig::new(dir.path());
        config.segment_size = 256;
        let (log, _) = Log::open(config.clone()).expect("opens");
        log.append(&mut vec![declared()]);
        for seq in 1..=200u64 {
            log.append(&mut vec![stored(seq, &[7; 40])]);
        }
        settle(&log).expect("durable");
        let written = segments(dir.path()).len();
        assert!(written > 20, "{written} segments");
        let holding = |seq: u64| {
            segments(dir.path()).into_iter().find(|file| {
                let bytes = Bytes::from(std::fs::read(file).expect("reads"));
                records(&bytes)
                    .iter()
                    .any(|(_, record)| matches!(record, Record::Publish(message) if message.seq == seq))
            })
        };
        let first_live = holding(199).expect("a segment holds message 199");
        log.append(&mut (1..=198).map(removed).collect());
        settle(&log).expect("durable");
        // Segments are deleted after the sync that answers a barrier: the next barrier comes after that.
        settle(&log).expect("durable");
        // Every segment before the one that holds a live message is gone; the acks after it stay with it.
        let left = segments(dir.path());
        assert_eq!(left.first(), Some(&first_live), "{} of {written} segments left", left.len());
        drop(log);
        let (log, recovery) = Log::open(config).expect("opens again");
        assert_eq!(messages(&recovery).iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), [199, 200]);
        log.append(&mut vec![Journal::Deleted { queue: Arc::from("q") }]);
        settle(&log).expect("durable");
        assert!(!dir.path().join("queues").join("0").exists());
    }

    #[test]
    fn a_message_left_unacked_does_not_keep_the_segments_after_it() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut config = LogConfig::new(dir.path());
        config.segment_size = 1024;
        let (log, _) = Log::open(config.clone()).expect("opens");
        log.append(&mut vec![declared()]);
        // Message 1 is never acked; every other one is, soon after it was published.
        log.append(&mut vec![stored(1, &[1; 40])]);
        for seq in 2..=1_000u64 {
            log.append(&mut vec![stored(seq, &[2; 40]), removed(seq)]);
        }
        // The sync that answers a barrier comes before the deletions and compaction that follow it: after the
        // first, the oldest segment is compacted; after the second, what it kept on disk is deleted.
        for _ in 0..3 {
            settle(&log).expect("durable");
        }
        let left = segments(dir.path()).len();
        assert!(left <= COMPACT_BEHIND + 2, "{left} segments kept behind one unacked message");
        drop(log);
        let (_, recovery) = Log::open(config.clone()).expect("opens again");
        assert_eq!(messages(&recovery), [(1, vec![1; 40])]);
        // A backlog nobody consumes is left where it is.
        let backlog = tempfile::tempdir().expect("a temporary directory");
        let mut backlog_config = LogConfig::new(backlog.path());
        backlog_config.segment_size = 256;
        let (log, _) = Log::open(backlog_config.clone()).expect("opens");
        log.append(&mut vec![declared()]);
        for seq in 1..=100u64 {
            log.append(&mut vec![stored(seq, &[3; 40])]);
        }
        settle(&log).expect("durable");
        let before: Vec<PathBuf> = segments(backlog.path());
        log.append(&mut vec![stored(101, &[3; 40])]);
        settle(&log).expect("durable");
        settle(&log).expect("durable");
        assert_eq!(segments(backlog.path())[..before.len() - 1], before[..before.len() - 1], "a backlog was rewritten");
        drop(log);
        let (_, recovery) = Log::open(backlog_config).expect("opens again");
        assert_eq!(messages(&recovery).len(), 101);
    }

    /// Each record of a segment file and the offset where it ends.
    fn records(bytes: &Bytes) -> Vec<(usize, Record)> {
        let mut pos = 0;
        let mut out = Vec::new();
        while pos < bytes.len() {
            let (record, len) = format::parse(&bytes.slice(pos..)).expect("an intact record");
            pos += len;
            out.push((pos, record));
        }
        out
    }

    /// What replaying `records` leaves: seq -> payload.
    fn replay<'a>(records: impl Iterator<Item = &'a Record>) -> BTreeMap<u64, Vec<u8>> {
        let mut live = BTreeMap::new();
        for record in records {
            match record {
                Record::Publish(message) => {
                    live.insert(message.seq, message.payload.to_vec());
                }
                Record::Ack(seq) => {
                    live.remove(seq);
                }
            }
        }
        live
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        /// A crash may leave any prefix of what was written. Whatever prefix, recovery yields exactly the complete
        /// records in it, drops the cut one, and every record confirmed before the cut is among them.
        #[test]
        fn recovery_after_a_cut_at_every_offset_keeps_exactly_the_whole_records(
            batches in proptest::collection::vec(
                proptest::collection::vec((0usize..24, any::<bool>()), 1..4),
                1..5,
            ),
        ) {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let confirmed = Arc::new(Mutex::new(Vec::new()));
            let segment;
            {
                let (log, _) = Log::open(LogConfig::new(dir.path())).expect("opens");
                log.append(&mut vec![declared()]);
                let mut seq = 0;
                for batch in &batches {
                    let mut entries = Vec::new();
                    for (size, ack) in batch {
                        seq += 1;
                        entries.push(stored(seq, &vec![seq as u8; *size]));
                        if *ack {
                            entries.push(removed(seq));
                        }
                    }
                    log.append(&mut entries);
                    // The confirm of this batch: the size the segment had when it was synced.
                    let confirmed = Arc::clone(&confirmed);
                    let path = dir.path().join("queues").join("0").join(segment_name(1));
                    let (done, result) = std_mpsc::channel();
                    log.barrier(Box::new(move |outcome| {
                        let len = std::fs::metadata(&path).map(|meta| meta.len()).unwrap_or(0);
                        confirmed.lock().unwrap_or_else(PoisonError::into_inner).push(len);
                        drop(done.send(outcome));
                    }));
                    prop_assert!(result.recv().expect("answered").is_ok());
                }
                segment = segments(dir.path()).remove(0);
            }
            let bytes = Bytes::from(std::fs::read(&segment).expect("reads the segment"));
            let all = records(&bytes);
            let meta = std::fs::read(dir.path().join("queues").join("0").join("meta")).expect("reads the meta");
            let confirmed = confirmed.lock().unwrap_or_else(PoisonError::into_inner).clone();
            // Acks are written after the sync that confirms what they follow: the file may go on past the last
            // confirm, never stop short of it.
            prop_assert!(confirmed.last().is_some_and(|last| *last <= bytes.len() as u64));
            for cut in 0..=bytes.len() {
                let copy = tempfile::tempdir().expect("a temporary directory");
                let queue = copy.path().join("queues").join("0");
                std::fs::create_dir_all(&queue).expect("creates");
                std::fs::write(queue.join("meta"), &meta).expect("writes");
                std::fs::write(queue.join(segment_name(1)), &bytes[..cut]).expect("writes");
                let (recovery, _) = recovery::recover(&LogConfig::new(copy.path())).expect("recovers");
                let whole: Vec<&Record> = all.iter().filter(|(end, _)| *end <= cut).map(|(_, record)| record).collect();
                let expected: Vec<(u64, Vec<u8>)> = replay(whole.iter().copied()).into_iter().collect();
                prop_assert_eq!(messages(&recovery), expected);
                let kept = all.iter().map(|(end, _)| *end).filter(|end| *end <= cut).max().unwrap_or(0);
                prop_assert_eq!(recovery.truncated as usize, cut - kept);
                let left = std::fs::metadata(queue.join(segment_name(1))).expect("the segment").len();
                prop_assert_eq!(left as usize, kept, "the cut record is truncated away");
                for confirm in &confirmed {
                    if *confirm as usize <= cut {
                        prop_assert!(kept >= *confirm as usize, "a record confirmed at {} is gone after a cut at {}", confirm, cut);
                    }
                }
            }
        }
    }

    /// A log of three segments with every message live; returns the segment files and each record's offset.
    fn three_segments(dir: &Path, config: &LogConfig) -> (Vec<PathBuf>, Vec<Vec<usize>>) {
        let (log, _) = Log::open(config.clone()).expect("opens");
        log.append(&mut vec![declared()]);
        for seq in 1..=9u64 {
            log.append(&mut vec![stored(seq, &[seq as u8; 60])]);
        }
        settle(&log).expect("durable");
        drop(log);
        let files = segments(dir);
        assert_eq!(files.len(), 3, "{files:?}");
        let offsets = files
            .iter()
            .map(|file| {
                let bytes = Bytes::from(std::fs::read(file).expect("reads"));
                let mut starts = vec![0];
                starts.extend(records(&bytes).iter().map(|(end, _)| *end));
                starts.pop();
                starts
            })
            .collect();
        (files, offsets)
    }

    fn flip(file: &Path, at: usize) {
        let mut bytes = std::fs::read(file).expect("reads");
        bytes[at] ^= 0x10;
        std::fs::write(file, bytes).expect("writes");
    }

    #[test]
    fn a_bit_flipped_in_the_tail_is_truncated_and_never_delivered() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut config = LogConfig::new(dir.path());
        config.segment_size = 300;
        let (files, offsets) = three_segments(dir.path(), &config);
        let last = offsets[2].last().copied().expect("a record");
        flip(&files[2], last + format::HEADER + 12);
        let (_, recovery) = Log::open(config).expect("opens");
        let seqs: Vec<u64> = messages(&recovery).iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(recovery.truncated > 0);
    }

    #[test]
    fn a_bit_flipped_in_a_middle_segment_stops_the_start_or_is_quarantined() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut config = LogConfig::new(dir.path());
        config.segment_size = 300;
        let (files, offsets) = three_segments(dir.path(), &config);
        let damaged = offsets[1][1];
        flip(&files[1], damaged + format::HEADER + 20);
        match Log::open(config.clone()) {
            Err(LogError::Corrupt { file, offset, reason }) => {
                assert_eq!((file, offset), (files[1].clone(), damaged as u64));
                assert!(reason.contains("checksum"), "{reason}");
            }
            other => panic!("expected the corrupt record to stop the start, got {other:?}"),
        }
        // Damage in the middle of the last segment, with intact records after it, is not a torn tail either.
        let other = tempfile::tempdir().expect("a temporary directory");
        let mut other_config = LogConfig::new(other.path());
        other_config.segment_size = 300;
        let (other_files, other_offsets) = three_segments(other.path(), &other_config);
        flip(&other_files[2], other_offsets[2][0] + format::HEADER + 20);
        assert!(matches!(Log::open(other_config), Err(LogError::Corrupt { .. })));

        config.quarantine = true;
        let (log, recovery) = Log::open(config.clone()).expect("opens with quarantine");
        let seqs: Vec<u64> = messages(&recovery).iter().map(|(seq, _)| *seq).collect();
        let lost = seqs.len();
        assert_eq!(lost, 8, "only the damaged record is set aside: {seqs:?}");
        assert!(!seqs.contains(&5));
        assert_eq!(recovery.quarantined, vec![(files[1].clone(), damaged as u64, recovery.quarantined[0].2)]);
        assert!(dir.path().join("quarantine").join(format!("0-{}", segment_name(2))).exists());
        drop(log);
        // Rewritten: the next start needs no quarantine.
        config.quarantine = false;
        let (_, again) = Log::open(config).expect("opens cleanly");
        assert_eq!(messages(&again).iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), seqs);
        assert!(again.quarantined.is_empty());
    }

    #[test]
    fn a_tail_of_several_damaged_records_is_truncated_and_a_record_inside_a_payload_is_never_read() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = LogConfig::new(dir.path());
        // Message 3's payload holds the bytes of an intact record: an ack of message 1.
        let mut forged = BytesMut::new();
        format::put_ack(&mut forged, 1);
        let mut payload = vec![9; 30];
        payload.extend_from_slice(&forged);
        payload.extend_from_slice(&[9; 30]);
        {
            let (log, _) = Log::open(config.clone()).expect("opens");
            log.append(&mut vec![
                declared(),
                stored(1, b"one"),
                stored(2, b"two"),
                stored(3, &payload),
                stored(4, b"four"),
            ]);
            settle(&log).expect("durable");
        }
        let file = segments(dir.path()).remove(0);
        let bytes = Bytes::from(std::fs::read(&file).expect("reads"));
        let ends: Vec<usize> = records(&bytes).iter().map(|(end, _)| *end).collect();
        // A crash cut message 3 inside its payload, past the forged record: a write cut short, never confirmed.
        std::fs::write(&file, &bytes[..ends[1] + 60]).expect("writes");
        let (log, recovery) = Log::open(config.clone()).expect("opens");
        assert_eq!(messages(&recovery).iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(std::fs::metadata(&file).expect("the segment").len() as usize, ends[1]);
        drop(log);
        // Two damaged records at the end of the last segment (one flipped, one cut short): both are the tail.
        std::fs::write(&file, &bytes[..ends[3] - 2]).expect("writes");
        flip(&file, ends[1] + format::HEADER + 3);
        let (_, recovery) = Log::open(config).expect("opens");
        assert_eq!(messages(&recovery).iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn segments_without_a_meta_file_stop_the_start() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        {
            let (log, _) = Log::open(LogConfig::new(dir.path())).expect("opens");
            log.append(&mut vec![declared(), stored(1, b"one")]);
            settle(&log).expect("durable");
        }
        let meta = dir.path().join("queues").join("0").join("meta");
        std::fs::remove_file(&meta).expect("removes");
        match Log::open(LogConfig::new(dir.path())) {
            Err(LogError::Corrupt { file, .. }) => assert_eq!(file, meta),
            other => panic!("expected the missing meta file to stop the start, got {other:?}"),
        }
    }

    #[test]
    fn restart_with_100_000_records() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        {
            let (log, _) = Log::open(LogConfig::new(dir.path())).expect("opens");
            log.append(&mut vec![declared()]);
            for chunk in 0..100u64 {
                log.append(&mut (1..=1_000).map(|n| stored(chunk * 1_000 + n, &[1; 100])).collect());
            }
            settle(&log).expect("durable");
        }
        let started = Instant::now();
        let (_, recovery) = Log::open(LogConfig::new(dir.path())).expect("opens");
        let elapsed = started.elapsed();
        assert_eq!(recovery.queues[0].messages.len(), 100_000);
        assert_eq!(recovery.records, 100_000);
        println!("read back 100,000 records in {elapsed:?}");
    }
}
