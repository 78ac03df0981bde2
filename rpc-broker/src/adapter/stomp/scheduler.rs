//! ActiveMQ's scheduler (delayed delivery) and the cancelling of calls, on STOMP.
//!
//! A SEND with `AMQ_SCHEDULED_DELAY: <ms>` is held by the scheduler (the broker's `schedulerSupport="true"`)
//! and queued when due. The scheduler is managed by SENDs to the topic `ActiveMQ.Scheduler.Management`: action
//! `BROWSE` with a `reply-to` sends a copy of every job held there (`scheduledJobId`, and the destination it is
//! due at as `original-destination`), and `REMOVE` with a `scheduledJobId` drops one. A browse has no end marker;
//! the server handles a connection's frames in order and sends the copies while it handles the BROWSE, so a
//! message this connection sends to the same temporary queue right after it arrives after the last copy.
//!
//! A cancelled call is told to the consumers of its queue on the topic `mqrpc.cancel.<queue>`: one that holds
//! the request stops its handler, one that gets it later drops it unrun. Each request removed before a worker
//! ran it leaves a marker on the queue `<queue>.cancelled` (not persistent, expiring after a minute), whose count
//! of messages taken is the queue's [`QueueStats::cancelled`](rpc_core::QueueStats::cancelled).

use std::time::Duration;

use rpc_core::Error;
use uuid::Uuid;

use super::codec::{Command, Frame};
use super::connection::{Connection, Subscription};
use super::mapping::{SCHEDULED_DELAY, SCHEDULED_JOB};

/// The scheduler's management destination.
const MANAGEMENT: &str = "/topic/ActiveMQ.Scheduler.Management";
/// Where the scheduler's browses answer, on the main connection.
pub(super) const ANSWERS: &str = "/temp-queue/mqrpc.scheduler";
/// The header of the message that ends a browse's answers: the browse's id.
const END: &str = "mqrpc-browse-end";
/// The header of the message that tells whether the scheduler is on.
const PROBE: &str = "mqrpc-scheduler-probe";
/// How long the probe would wait in the scheduler if it were not removed at once.
const PROBE_DELAY: Duration = Duration::from_secs(600);
/// How long a marker of a cancelled request stays on `<queue>.cancelled`.
const MARKER_LIFETIME: Duration = Duration::from_secs(60);

/// One job the scheduler holds, as a browse reads it.
#[derive(Debug)]
pub(super) struct Job {
    /// `scheduledJobId`.
    pub(super) id: String,
    /// The destination it is due at.
    pub(super) destination: Option<String>,
    /// Its `correlation-id`.
    pub(super) correlation_id: Option<String>,
}

/// What a browse read: the jobs, and the probes that arrived as themselves (sent while the scheduler is off).
#[derive(Debug, Default)]
struct Browsed {
    jobs: Vec<(Job, Option<String>)>,
    unscheduled_probes: Vec<String>,
}

/// Browses the scheduler over `connection`, whose temporary queue [`ANSWERS`] `answers` reads, within `timeout`.
async fn browse(connection: &Connection, answers: &mut Subscription, timeout: Duration) -> Result<Browsed, Error> {
    let query = Uuid::new_v4().to_string();
    connection.send_unconfirmed(
        Frame::new(Command::Send)
            .header("destination", MANAGEMENT)
            .header("AMQ_SCHEDULER_ACTION", "BROWSE")
            .header("reply-to", ANSWERS),
    )?;
    connection.send_unconfirmed(Frame::new(Command::Send).header("destination", ANSWERS).header(END, &query))?;
    let read = async {
        let mut browsed = Browsed::default();
        loop {
            let frame = answers.next().await.ok_or(Error::Disconnected)?;
            match frame.get(END) {
                Some(end) if end == query => return Ok(browsed),
                // The end of a browse that gave up waiting: what came before it was its.
                Some(_) => browsed = Browsed::default(),
                None => {}
            }
            let probe = frame.get(PROBE).map(str::to_owned);
            match frame.get(SCHEDULED_JOB) {
                Some(id) => {
                    let job = Job {
                        id: id.to_owned(),
                        destination: frame.get("original-destination").map(str::to_owned),
                        correlation_id: frame.get("correlation-id").map(str::to_owned),
                    };
                    browsed.jobs.push((job, probe));
                }
                None => browsed.unscheduled_probes.extend(probe),
            }
        }
    };
    tokio::time::timeout(timeout, read).await.map_err(|_| Error::Timeout(timeout))?
}

/// The jobs the scheduler holds.
pub(super) async fn jobs(
    connection: &Connection,
    answers: &mut Subscription,
    timeout: Duration,
) -> Result<Vec<Job>, Error> {
    Ok(browse(connection, answers, timeout).await?.jobs.into_iter().map(|(job, _)| job).collect())
}

/// Drops the job `id` from the scheduler.
pub(super) fn remove(connection: &Connection, id: &str) -> Result<(), Error> {
    connection.send_unconfirmed(
        Frame::new(Command::Send)
            .header("destination", MANAGEMENT)
            .header("AMQ_SCHEDULER_ACTION", "REMOVE")
            .header(SCHEDULED_JOB, id),
    )
}

/// Whether the server holds a delayed message: a probe is sent delayed to this connection's own temporary queue
/// and looked for in a browse, where it is a job when the scheduler is on (and is removed at once), and arrives
/// as itself when it is off. Returns the subscription to [`ANSWERS`] for later browses.
pub(super) async fn probe(connection: &Connection, timeout: Duration) -> Result<(bool, Subscription), Error> {
    let mut answers = connection.subscribe(ANSWERS, "auto", &[]).await?;
    let probe = Uuid::new_v4().to_string();
    connection.send_unconfirmed(
        Frame::new(Command::Send)
            .header("destination", ANSWERS)
            .header(SCHEDULED_DELAY, &PROBE_DELAY.as_millis().to_string())
            .header(PROBE, &probe),
    )?;
    let browsed = browse(connection, &mut answers, timeout).await?;
    let mut scheduled = false;
    for (job, _) in browsed.jobs.iter().filter(|(_, of)| of.as_deref() == Some(probe.as_str())) {
        scheduled = true;
        remove(connection, &job.id)?;
    }
    if !scheduled && !browsed.unscheduled_probes.contains(&probe) {
        return Err(Error::Transport("ActiveMQ's scheduler answered a browse without the probe sent before it".into()));
    }
    Ok((scheduled, answers))
}

/// The topic on which the consumers of `queue` hear of cancelled calls.
pub(super) fn notices(queue: &str) -> String {
    format!("/topic/mqrpc.cancel.{queue}")
}

/// The notice that the call `correlation_id` on `queue` was cancelled.
pub(super) fn notice(queue: &str, correlation_id: &str) -> Frame {
    Frame::new(Command::Send).header("destination", &notices(queue)).header("correlation-id", correlation_id)
}

/// The queue whose count of messages taken is `queue`'s count of requests cancelled before they ran.
pub(super) fn cancelled_queue(queue: &str) -> String {
    format!("{queue}.cancelled")
}

/// The marker of a request of `queue` removed because its call `correlation_id` was cancelled.
pub(super) fn marker(queue: &str, correlation_id: &str) -> Frame {
    let expires = crate::adapter::now_ms().saturating_add(u64::try_from(MARKER_LIFETIME.as_millis()).unwrap_or(0));
    Frame::new(Command::Send)
        .header("destination", &format!("/queue/{}", cancelled_queue(queue)))
        .header("correlation-id", correlation_id)
        .header("expires", &expires.to_string())
}
