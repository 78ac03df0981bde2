//! Reading the log back on start.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};

use super::record::{self, Damage, Published, Record};
use super::{LogConfig, LogError, QueueLog, io_error, segment_name, sync_dir, write_atomically};
use crate::engine::{self, QueueConfig};

/// What [`Log::open`](super::Log::open) read back.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Recovery {
    /// Every durable queue, with the messages it held that were not acked.
    pub queues: Vec<RecoveredQueue>,
    /// Messages read back (not acked when the broker stopped).
    pub messages: usize,
    /// Records read.
    pub records: u64,
    /// Bytes cut from the end of segments: records a crash interrupted, never confirmed.
    pub truncated: u64,
    /// Damaged records set aside under `quarantine`: the file and offset of each.
    pub quarantined: Vec<(PathBuf, u64, &'static str)>,
    /// How long reading took.
    pub elapsed: Duration,
}

/// A durable queue read back from the log.
#[derive(Debug)]
#[non_exhaustive]
pub struct RecoveredQueue {
    /// Its name.
    pub name: String,
    /// Its configuration.
    pub config: QueueConfig,
    /// Its messages not acked, in the order they were published.
    pub messages: Vec<RecoveredMessage>,
    /// The ids of messages it took and that were acked since, as far as the log still holds them: a publisher
    /// may send one of them again after the crash, and the queue must take it once.
    pub acked_ids: Vec<engine::MessageId>,
}

/// A message read back from the log.
#[derive(Debug)]
#[non_exhaustive]
pub struct RecoveredMessage {
    /// Its number in the queue.
    pub seq: u64,
    /// Its bytes.
    pub payload: Bytes,
    /// Its properties, with its times as instants of this process.
    pub record: engine::Record,
}

/// Reads every queue directory back.
pub(super) fn recover(config: &LogConfig) -> Result<(Recovery, HashMap<Arc<str>, QueueLog>), LogError> {
    let started = Instant::now();
    let root = config.dir.join("queues");
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(&root).map_err(io_error(&root))? {
        let entry = entry.map_err(io_error(&root))?;
        // A queue being deleted when the broker stopped: renamed in one step, its files not all gone yet.
        if entry.file_name().to_str().is_some_and(|name| name.ends_with(".deleted")) {
            let path = entry.path();
            std::fs::remove_dir_all(&path).map_err(io_error(&path))?;
            continue;
        }
        let number: Option<u64> = entry.file_name().to_str().and_then(|name| name.parse().ok());
        if let Some(number) = number
            && entry.path().is_dir()
        {
            dirs.push((number, entry.path()));
        }
    }
    dirs.sort();
    let mut recovery = Recovery::default();
    let mut logs = HashMap::new();
    for (_, dir) in dirs {
        if let Some((queue, log)) = recover_queue(config, &dir, &mut recovery)? {
            recovery.messages += queue.messages.len();
            logs.insert(Arc::from(queue.name.as_str()), log);
            recovery.queues.push(queue);
        }
    }
    recovery.elapsed = started.elapsed();
    Ok((recovery, logs))
}

/// A message read back, and the segment it is in.
struct Live {
    message: Published,
    segment: usize,
}

fn recover_queue(
    config: &LogConfig,
    dir: &Path,
    recovery: &mut Recovery,
) -> Result<Option<(RecoveredQueue, QueueLog)>, LogError> {
    let meta_path = dir.join("meta");
    let segments = segment_files(dir)?;
    let meta = match std::fs::read(&meta_path) {
        Ok(meta) => Bytes::from(meta),
        // Created and not yet described when the broker stopped: it holds nothing (a queue's meta file is
        // written before any of its records).
        Err(error) if error.kind() == std::io::ErrorKind::NotFound && segments.is_empty() => {
            std::fs::remove_dir_all(dir).map_err(io_error(dir))?;
            return Ok(None);
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(LogError::Corrupt {
                file: meta_path,
                offset: 0,
                reason: "a queue's directory holds segments and no meta file",
            });
        }
        Err(error) => return Err(LogError::Io { path: meta_path, error }),
    };
    let (name, queue_config) = record::parse_meta(&meta).map_err(|bad| LogError::Corrupt {
        file: meta_path.clone(),
        offset: 0,
        reason: bad.reason(),
    })?;

    let mut live: BTreeMap<u64, Live> = BTreeMap::new();
    let mut published = vec![0u64; segments.len()];
    let mut acked_ids = VecDeque::new();
    let mut damaged = false;
    for (index, (_, path)) in segments.iter().enumerate() {
        let bytes = Bytes::from(std::fs::read(path).map_err(io_error(path))?);
        let last = index + 1 == segments.len();
        let mut pos = 0;
        while pos < bytes.len() {
            match record::parse(&bytes.slice(pos..)) {
                Ok((record, len)) => {
                    recovery.records += 1;
                    match record {
                        Record::Publish(mut message) => {
                            published[index] += 1;
                            // A copy, so that the segment read is not held for one message.
                            message.payload = Bytes::copy_from_slice(&message.payload);
                            live.insert(message.seq, Live { message, segment: index });
                        }
                        Record::Ack(seq) => {
                            if let Some(id) = live.remove(&seq).and_then(|gone| gone.message.id) {
                                // The most recent ones, as many as a queue remembers.
                                if acked_ids.len() == engine::DEDUP_CAPACITY {
                                    acked_ids.pop_front();
                                }
                                acked_ids.push_back(id);
                            }
                        }
                    }
                    pos += len;
                }
                Err(bad) => {
                    let damage = record::damage(&bytes[pos..]);
                    // Only the last segment can end in records a crash cut short (a segment is synced before the
                    // next one is started): damage there with nothing intact after it is that tail, never
                    // confirmed. Intact records after damage mean the damage is not a tail.
                    let torn = last
                        && match damage {
                            Damage::Truncated => true,
                            Damage::Extent(len) => {
                                pos + len == bytes.len() || !record::all_records(&bytes.slice(pos + len..))
                            }
                            Damage::Unframed => {
                                bytes[pos..].iter().all(|byte| *byte == 0) || next_record(&bytes, pos + 1).is_none()
                            }
                        };
                    if torn {
                        truncate(path, pos as u64)?;
                        recovery.truncated += (bytes.len() - pos) as u64;
                        tracing::warn!(file = %path.display(), offset = pos, "truncated a record cut short by a crash");
                        break;
                    }
                    if !config.quarantine {
                        return Err(LogError::Corrupt { file: path.clone(), offset: pos as u64, reason: bad.reason() });
                    }
                    quarantine(config, dir, path)?;
                    damaged = true;
                    tracing::error!(
                        file = %path.display(),
                        offset = pos,
                        reason = bad.reason(),
                        "quarantined a corrupt record: the segment is copied to the quarantine directory and the \
                         queue rewritten without the damaged bytes"
                    );
                    recovery.quarantined.push((path.clone(), pos as u64, bad.reason()));
                    // Past the damaged record where its extent is known; otherwise to the next intact record.
                    let next = match damage {
                        Damage::Extent(len) => Some(pos + len),
                        Damage::Truncated => None,
                        Damage::Unframed => next_record(&bytes, pos + 1),
                    };
                    match next {
                        Some(next) => pos = next,
                        None => break,
                    }
                }
            }
        }
    }

    let wall_now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let now = Instant::now();
    let mut kept = Vec::with_capacity(segments.len());
    let mut messages = Vec::with_capacity(live.len());
    if damaged {
        // What is left goes into one new segment; the damaged ones go once it is synced.
        let number = match segments.last() {
            Some((number, path)) => number.checked_add(1).ok_or_else(|| LogError::Corrupt {
                file: path.clone(),
                offset: 0,
                reason: "a segment numbered past the last number",
            })?,
            None => 1,
        };
        let path = dir.join(segment_name(number));
        let mut buffer = BytesMut::new();
        for entry in live.values() {
            record::put_publish(&mut buffer, &entry.message);
        }
        write_atomically(&path, &buffer)?;
        for (_, old) in &segments {
            std::fs::remove_file(old).map_err(io_error(old))?;
        }
        sync_dir(dir)?;
        kept.push((number, path, live.keys().copied().collect(), live.len() as u64));
    } else {
        let mut sets = vec![HashSet::new(); segments.len()];
        for (seq, entry) in &live {
            sets[entry.segment].insert(*seq);
        }
        for (((number, path), set), count) in segments.into_iter().zip(sets).zip(published) {
            kept.push((number, path, set, count));
        }
    }
    for (seq, entry) in live {
        let message = entry.message;
        let record = engine::Record {
            priority: message.priority,
            expires_at: message.expires_ms.map(|ms| super::instant_of(ms, now, wall_now)),
            due: message.due_ms.map(|ms| super::instant_of(ms, now, wall_now)),
            key: message.key,
            id: message.id,
        };
        messages.push(RecoveredMessage { seq, payload: message.payload, record });
    }
    let queue = RecoveredQueue { name, config: queue_config.clone(), messages, acked_ids: acked_ids.into() };
    Ok(Some((queue, QueueLog::recovered(dir.to_owned(), queue_config, kept))))
}

/// The offset of the next intact record after `from`, if one is found within a bounded amount of checking (a
/// crafted payload could otherwise make the scan quadratic).
fn next_record(bytes: &Bytes, from: usize) -> Option<usize> {
    let mut budget: usize = 256 * 1024 * 1024;
    for at in from..bytes.len() {
        if bytes[at] != record::MAGIC {
            continue;
        }
        if let Damage::Extent(len) = record::damage(&bytes[at..]) {
            budget = budget.checked_sub(len)?;
        }
        if record::is_record(&bytes.slice(at..)) {
            return Some(at);
        }
    }
    None
}

/// A queue directory's segment files, in order.
fn segment_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogError> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let file_name = entry.file_name();
        let Some(stem) = file_name.to_str().and_then(|name| name.strip_suffix(".log")) else { continue };
        if let Ok(number) = u64::from_str_radix(stem, 16) {
            segments.push((number, entry.path()));
        }
    }
    segments.sort();
    Ok(segments)
}

fn truncate(path: &Path, len: u64) -> Result<(), LogError> {
    let file = std::fs::OpenOptions::new().write(true).open(path).map_err(io_error(path))?;
    file.set_len(len).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))
}

/// Copies a damaged segment to the quarantine directory, for inspection.
fn quarantine(config: &LogConfig, dir: &Path, path: &Path) -> Result<(), LogError> {
    let target_dir = config.dir.join("quarantine");
    std::fs::create_dir_all(&target_dir).map_err(io_error(&target_dir))?;
    let queue = dir.file_name().and_then(|name| name.to_str()).unwrap_or("queue");
    let file = path.file_name().and_then(|name| name.to_str()).unwrap_or("segment");
    let target = target_dir.join(format!("{queue}-{file}"));
    if !target.exists() {
        std::fs::copy(path, &target).map_err(io_error(&target))?;
    }
    Ok(())
}
