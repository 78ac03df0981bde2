//! The NATS service API (`$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`, as `nats micro` and async-nats's `service`
//! module define it): each server answers for its service, so the standard NATS tools list mqrpc workers.
//!
//! The service's name there is its queue's name with every character other than ASCII letters, digits, `-` and
//! `_` made `_` (the API allows no others): `Calculator`, or `staging_Calculator` in namespace `staging`. Its id
//! is the worker's id, its version the one the server was given (`0.0.0` without one), and it has one
//! endpoint, its queue, with the methods in the endpoint's metadata.

use futures::StreamExt;
use futures::stream::BoxStream;
use rpc_core::Error;
use rpc_core::health::{Announced, Announcement, WorkerInfo};
use serde_json::json;

/// The API's three verbs.
const VERBS: [&str; 3] = ["PING", "INFO", "STATS"];

/// Subscribes to the service API's subjects for `announcement` and answers them until the returned guard drops.
pub(super) async fn announce(
    client: &async_nats::Client,
    announcement: Announcement,
    queue_group: Option<String>,
) -> Result<Announced, Error> {
    let name = service_name(&announcement.queue);
    let id = (announcement.info)().id;
    let mut subscriptions: Vec<BoxStream<'static, (&'static str, async_nats::Message)>> = Vec::new();
    for verb in VERBS {
        for subject in [format!("$SRV.{verb}"), format!("$SRV.{verb}.{name}"), format!("$SRV.{verb}.{name}.{id}")] {
            let subscriber = client.subscribe(subject).await.map_err(|_| Error::Disconnected)?;
            subscriptions.push(subscriber.map(move |message| (verb, message)).boxed());
        }
    }
    client.flush().await.map_err(|_| Error::Disconnected)?;
    let mut requests = futures::stream::select_all(subscriptions);
    let client = client.clone();
    let task = tokio::spawn(async move {
        while let Some((verb, message)) = requests.next().await {
            let Some(reply) = message.reply else { continue };
            let info = (announcement.info)();
            let answer = match verb {
                "PING" => ping(&name, &info),
                "INFO" => describe(&name, &info, &announcement, queue_group.as_deref()),
                _ => stats(&name, &info, &announcement, queue_group.as_deref()),
            };
            if let Err(error) = client.publish(reply, answer.to_string().into()).await {
                tracing::debug!(%error, verb, "an answer to the NATS service API was not sent");
            }
        }
    });
    Ok(Announced::new(AbortOnDrop(task.abort_handle())))
}

/// Stops the answering task with the announcement; its subscriptions end with it.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The service's name in the API: `queue` with each character it does not allow made `_`.
pub(super) fn service_name(queue: &str) -> String {
    queue.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

fn version(info: &WorkerInfo) -> &str {
    info.version.as_deref().unwrap_or("0.0.0")
}

fn metadata(info: &WorkerInfo) -> serde_json::Value {
    json!({
        "mqrpc.service": info.service,
        "mqrpc.version": info.mqrpc,
        "mqrpc.host": info.host,
        "mqrpc.pid": info.pid.to_string(),
        "mqrpc.in_flight": info.in_flight.to_string(),
    })
}

fn ping(name: &str, info: &WorkerInfo) -> serde_json::Value {
    json!({
        "type": "io.nats.micro.v1.ping_response",
        "name": name,
        "id": info.id,
        "version": version(info),
        "metadata": metadata(info),
    })
}

fn describe(
    name: &str,
    info: &WorkerInfo,
    announcement: &Announcement,
    queue_group: Option<&str>,
) -> serde_json::Value {
    json!({
        "type": "io.nats.micro.v1.info_response",
        "name": name,
        "id": info.id,
        "version": version(info),
        "description": format!("mqrpc service {} on queue {}", announcement.service, announcement.queue),
        "metadata": metadata(info),
        "endpoints": [{
            "name": name,
            "subject": announcement.queue,
            "queue_group": queue_group.unwrap_or_default(),
            "metadata": { "mqrpc.methods": announcement.methods.join(",") },
        }],
    })
}

fn stats(name: &str, info: &WorkerInfo, announcement: &Announcement, queue_group: Option<&str>) -> serde_json::Value {
    let average = info.processing_ns.checked_div(info.handled).unwrap_or(0);
    json!({
        "type": "io.nats.micro.v1.stats_response",
        "name": name,
        "id": info.id,
        "version": version(info),
        "metadata": metadata(info),
        "started": rfc3339(info.started_ms),
        "endpoints": [{
            "name": name,
            "subject": announcement.queue,
            "queue_group": queue_group.unwrap_or_default(),
            "num_requests": info.handled,
            "num_errors": info.failed,
            "last_error": info.last_error.as_deref().unwrap_or_default(),
            "processing_time": info.processing_ns,
            "average_processing_time": average,
        }],
    })
}

/// `millis` since the Unix epoch as an RFC 3339 UTC time with milliseconds: `2026-12-05T01:30:00.000Z`.
pub(super) fn rfc3339(millis: u64) -> String {
    let days = millis / 86_400_000;
    let of_day = millis % 86_400_000;
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm, for dates from 1970 on).
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    let (hours, minutes) = (of_day / 3_600_000, of_day / 60_000 % 60);
    let (seconds, millis) = (of_day / 1_000 % 60, of_day % 1_000);
    format!("{year:04}-{month:02}-{day:02}T{hours:02}:{minutes:02}:{seconds:02}.{millis:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_times_are_written_as_the_api_reads_them() {
        assert_eq!(service_name("Calculator"), "Calculator");
        assert_eq!(service_name("staging.suite.Probe-1"), "staging_suite_Probe-1");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_796_434_200_123), "2026-12-05T01:30:00.123Z");
        assert_eq!(rfc3339(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }
}
