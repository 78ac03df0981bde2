//! Redis Streams: feature `redis` (redis 1.8 with `streams`; Redis 6.2 or later).
//!
//! # The mapping
//!
//! - **A service queue** is the stream `<prefix>q:<queue>` (prefix `mqrpc:` by default) read by the consumer
//!   group `mqrpc`: workers compete with `XREADGROUP ... COUNT <prefetch room>`. Its options live in the hash
//!   `<prefix>meta:<queue>` (`max_len`, `max_deliveries`), so that every process sees them; a queue without it
//!   was never declared, and a publish there is [`Error::NoRoute`].
//! - **An entry** written by mqrpc is the envelope whole (docs/wire-format.md) in the field [`ENVELOPE`]
//!   beside `mqrpc-sent-at-ms`. Readers also take, and replies to an address that is not an mqrpc inbox are
//!   written as, the envelope as `mqrpc-*` text fields (as Kafka's record headers: `mqrpc-kind`,
//!   `mqrpc-method`, `mqrpc-correlation-id`, `mqrpc-reply-to`, `mqrpc-deadline-ms`, `mqrpc-sent-at-ms`, ...)
//!   and the field `body`, the MessagePack of the arguments or the result. A plain Redis client calls a service
//!   with `XADD mqrpc:q:Calculator * mqrpc-method add mqrpc-reply-to <its stream> mqrpc-reply-inbox true
//!   mqrpc-correlation-id <id> body <msgpack>`, and reads the reply from its stream, which must exist first
//!   (`XADD` then `XDEL` makes an empty one): a worker answers an inbox only while it exists.
//! - **Acks** are `XACK` then `XDEL` (the group is the stream's only reader), sent with the reply in one
//!   transaction. An answer that finds none out goes at once; those that come while one is out go together
//!   in the next (one `MULTI`/`EXEC`, one `XACK` and one `XDEL` for the batch). An answer whose lease is older
//!   than half the visibility timeout (below) goes instead through a script that first checks with `XPENDING`
//!   that this consumer still holds the entry: a worker whose entry another worker claimed cannot answer for it
//!   ([`Error::DeliveryLost`]). Every process on a queue must use the same visibility timeout for that to hold.
//! - **A worker that died** leaves its entries pending; once idle past [`RedisStreamsOptions::visibility`]
//!   (30 s by default) another consumer claims them (`XPENDING IDLE` then `XCLAIM`), the delivery count being
//!   Redis's own. A consumer renews the lease of the entries it holds every third of it, so that a long
//!   handler keeps its entry. Consumers that hold nothing and have been given nothing for twice the
//!   visibility timeout are deleted from the group (`XGROUP DELCONSUMER`), so that the names of processes
//!   that went away do not pile up; Redis lists a live one again with its next entry.
//! - **A requeue** adds a copy at the end of the stream (its `mqrpc-delivery-count` raised) and acks and
//!   deletes the entry in one script: a copy is never lost nor doubled. A release is the same without the
//!   count; both join the back of the queue, not the front. **Dead letters** go to `<queue>.dlq` the same way;
//!   an entry delivered more than `max_deliveries` times goes there unrun.
//! - **A maximum length** is checked by the publish script before `XADD`: ready entries (the stream's length
//!   less those handed out) at `max_len` give [`Error::QueueFull`]. Nothing is trimmed. A queue the script
//!   found declared without one is published to with a plain `XADD ... NOMKSTREAM` for the next second (a
//!   queue deleted meanwhile is still [`Error::NoRoute`]; a maximum length another process declares holds
//!   within that second).
//! - **Replies** go to the caller's inbox, a stream `<prefix>i:<uuid>` that expires
//!   ([`RedisStreamsOptions::inbox_ttl`]) unless its client, which reads it with `XREAD` and deletes what it
//!   read, keeps renewing it: a reply to an inbox that is gone is dropped (`XADD ... NOMKSTREAM`), so a
//!   dead caller leaves nothing. Streams rather than Pub/Sub: a reply written while the caller reconnects waits
//!   for it.
//! - **Broadcast**: a topic is the stream `<prefix>t:<topic>`, trimmed to about
//!   [`RedisStreamsOptions::topic_max_len`] entries; each subscriber group is a consumer group on it. A private
//!   subscription reads it with `XREAD` from its end.
//!
//! - **Delayed delivery**: a request published with a delay waits in the sorted set `<prefix>d:<queue>`,
//!   scored by its due time on Redis's clock, its fields in the hash `<prefix>dm:<queue>`; the queue's consumers
//!   move due entries to the stream with a script, at the due time of those their process delayed (a worker's
//!   retry backoff) and at least every 200 ms for the others, so a delayed call comes at most about 250 ms late.
//!   Delayed entries count against a maximum length. Nothing moves them while the queue has no consumer.
//! - **Cancelling** ([`Transport::cancel`]) removes the call's delayed entries, else its request if it waits in
//!   the stream among the first 10,000 ready entries, counting it in the meta hash's `cancelled`; otherwise the
//!   correlation id goes on the stream `<prefix>x:<queue>`, which the queue's consumers read every 100 to 300 ms: one
//!   holding the request signals its handler ([`Acker::cancelled`](rpc_core::transport::Acker::cancelled)),
//!   one that takes it later (claimed from a consumer that died) drops it unrun.
//!
//! Refused with [`Error::Unsupported`]: priorities; delayed broadcasts and replies.
//!
//! **Credentials and TLS**: the URL's password or ACL user (`redis://user:password@host:port`); `rediss://`
//! for TLS, trusting the system's roots or, instead, those of [`RedisTls::roots_pem`], and presenting the client
//! certificate of [`RedisTls::client_pem`] to a Redis that verifies clients (`tls-auth-clients yes`). Refusals
//! are [`Error::Unauthorized`] and [`Error::Forbidden`]; no error or `Debug` output shows a password or key.
//!
//! **Durability** is Redis's: without persistence a restart loses every stream. With `appendonly yes` and
//! `appendfsync always`, what a publish returned for is on disk; `appendfsync everysec` may lose the last
//! second on a crash of the machine (not of Redis alone).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use rpc_core::codec::Limits;
use rpc_core::transport::{AckHandle, BoxFuture, Confirm, Consumer, ConsumerControl, Delivery, Inbox};
use rpc_core::{Capabilities, ConsumeOptions, Envelope, Error, Kind, QueueOptions, QueueStats, Transport};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::adapter::{self, CounterMap, Counters, fields, headers};

mod consumer;
mod scripts;

/// How often an inbox's reader renews its expiry and checks that it is still there.
const RENEW_INBOX: Duration = Duration::from_secs(1);

/// The entry field that holds the body.
pub const BODY: &str = "body";

/// Reads a stream entry's fields (names and values as Redis returns them) as a worker and an inbox's reader do:
/// the envelope whole from [`ENVELOPE`], or from the `mqrpc-*` fields and [`BODY`]; checked against `limits`
/// before anything is decoded. Returns the envelope and the delivery count the entry carries (1 when none).
///
/// # Errors
/// Why the entry is not a call: it is past the limits, or its envelope does not decode.
pub fn read_entry(fields: Vec<(Vec<u8>, Vec<u8>)>, limits: &Limits) -> Result<(Envelope, u32), String> {
    let (envelope, delivery_count, _) = consumer::decode(fields, limits);
    envelope.map(|envelope| (envelope, delivery_count)).map_err(|(_, why)| why)
}

/// The entry field that holds the whole envelope (docs/wire-format.md), in entries written by mqrpc (see
/// [`RedisStreamsOptions::compact`]).
pub const ENVELOPE: &str = "mqrpc-envelope";

/// How a [`RedisStreams`] transport names its keys and how long it waits.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RedisStreamsOptions {
    /// The prefix of every key (default `mqrpc:`).
    pub prefix: String,
    /// How long an entry handed out stays with its consumer without the consumer renewing it; past it, another
    /// consumer claims it (the consumer died).
    pub visibility: Duration,
    /// How long an inbox lives without its client renewing it.
    pub inbox_ttl: Duration,
    /// About how many entries a topic's stream keeps (`XADD MAXLEN ~`): a subscriber group further behind loses
    /// the oldest.
    pub topic_max_len: usize,
    /// Limits on what entries hold.
    pub limits: Limits,
    /// Write requests, broadcasts and replies to mqrpc inboxes as one field, [`ENVELOPE`], the envelope whole,
    /// rather than one field per envelope field and `body` (default true). Readers read both; a reply to an
    /// address that is not an mqrpc inbox always goes as fields. Fields are readable with `redis-cli`; one field
    /// costs both ends and Redis less to write and parse.
    pub compact: bool,
    /// The TLS settings of a `rediss://` URL.
    pub tls: RedisTls,
}

/// The TLS settings of a `rediss://` connection, for [`RedisStreamsOptions::tls`] and
/// [`RedisDedup::connect_with_tls`](super::redis_dedup::RedisDedup::connect_with_tls). Without any, a
/// `rediss://` connection trusts the system's roots. Its `Debug` shows no key.
#[derive(Clone, Default)]
pub struct RedisTls {
    /// PEM certificates trusted as roots, instead of the system's.
    roots: Option<Vec<u8>>,
    /// The client's certificate chain and private key, both PEM.
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("roots", &self.roots.is_some())
            .field("client", &self.client.as_ref().map(|_| "***"))
            .finish()
    }
}

impl RedisTls {
    /// No settings: the system's roots, no client certificate.
    pub fn new() -> RedisTls {
        RedisTls::default()
    }

    /// Trusts the certificates in `pem` (PEM text, one or more) as roots, instead of the system's: a Redis
    /// whose certificate a private authority issued.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `pem` holds no certificate.
    pub fn roots_pem(mut self, pem: &[u8]) -> Result<RedisTls, Error> {
        adapter::check_certificates(pem)?;
        let roots = self.roots.get_or_insert_with(Vec::new);
        roots.extend_from_slice(pem);
        roots.push(b'\n');
        Ok(self)
    }

    /// Presents the certificate chain in `cert_pem` and the private key in `key_pem` (PEM text) when Redis
    /// verifies clients (`tls-auth-clients yes`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the PEM holds no certificate or no key.
    pub fn client_pem(mut self, cert_pem: &[u8], key_pem: &[u8]) -> Result<RedisTls, Error> {
        adapter::check_client_pem(cert_pem, key_pem)?;
        self.client = Some((cert_pem.to_vec(), key_pem.to_vec()));
        Ok(self)
    }

    /// A client of the Redis at `url` with these settings.
    pub(crate) fn client(&self, url: &str) -> Result<redis::Client, Error> {
        let invalid =
            |error: redis::RedisError| Error::InvalidArgument(format!("{}: {error}", adapter::redact_url(url)));
        if self.roots.is_none() && self.client.is_none() {
            return redis::Client::open(url).map_err(invalid);
        }
        if !url.starts_with("rediss://") {
            return Err(Error::InvalidArgument(format!(
                "{}: TLS settings need a `rediss://` URL",
                adapter::redact_url(url)
            )));
        }
        let certificates = redis::TlsCertificates {
            client_tls: self
                .client
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig { client_cert: cert.clone(), client_key: key.clone() }),
            root_cert: self.roots.clone(),
        };
        redis::Client::build_with_tls(url, certificates).map_err(invalid)
    }
}

impl Default for RedisStreamsOptions {
    fn default() -> RedisStreamsOptions {
        RedisStreamsOptions {
            prefix: "mqrpc:".into(),
            visibility: Duration::from_secs(30),
            inbox_ttl: Duration::from_secs(60),
            topic_max_len: 10_000,
            limits: Limits::default(),
            compact: true,
            tls: RedisTls::default(),
        }
    }
}

impl RedisStreamsOptions {
    /// The defaults.
    pub fn new() -> RedisStreamsOptions {
        RedisStreamsOptions::default()
    }

    /// Sets [`RedisStreamsOptions::prefix`].
    pub fn prefix(mut self, prefix: impl Into<String>) -> RedisStreamsOptions {
        self.prefix = prefix.into();
        self
    }

    /// Sets [`RedisStreamsOptions::visibility`] (at least 100 ms).
    pub fn visibility(mut self, visibility: Duration) -> RedisStreamsOptions {
        self.visibility = visibility.max(Duration::from_millis(100));
        self
    }

    /// Sets [`RedisStreamsOptions::compact`].
    pub fn compact(mut self, compact: bool) -> RedisStreamsOptions {
        self.compact = compact;
        self
    }

    /// Sets [`RedisStreamsOptions::tls`].
    pub fn tls(mut self, tls: RedisTls) -> RedisStreamsOptions {
        self.tls = tls;
        self
    }

    /// Sets [`RedisStreamsOptions::inbox_ttl`] (at least a second).
    pub fn inbox_ttl(mut self, ttl: Duration) -> RedisStreamsOptions {
        self.inbox_ttl = ttl.max(Duration::from_secs(1));
        self
    }
}

/// The Redis Streams transport. Clones share the connections.
#[derive(Clone)]
pub struct RedisStreams {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    client: redis::Client,
    /// For everything but blocking reads.
    commands: ConnectionManager,
    options: RedisStreamsOptions,
    /// This process's part of consumer names.
    node: Uuid,
    next_consumer: AtomicU64,
    counters: CounterMap,
    closing: CancellationToken,
    publish: Script,
    /// Queues known to be declared without a maximum length, and since when: a publish to one is a plain
    /// `XADD NOMKSTREAM` for [`DECLARATION_CACHE`], without the script that checks the length.
    unbounded: dashmap::DashMap<String, std::time::Instant>,
    delay: Script,
    cancel: Script,
}

/// How long a queue's declaration without a maximum length is taken as known: a maximum length given to the
/// queue by another process's declaration holds within it.
const DECLARATION_CACHE: Duration = Duration::from_secs(1);
/// Queues remembered at most in [`Inner::unbounded`].
const DECLARATION_CACHE_SIZE: usize = 4096;
/// Ready entries a cancel looks through at most for its call's request.
const CANCEL_LOOK: usize = 10_000;
/// About how many cancels a queue's stream of cancels keeps, and how long it lives after the last.
const CANCELS_KEPT: usize = 1_000;
const CANCELS_TTL: Duration = Duration::from_secs(60);
/// How late a delayed entry may reach its queue: a consumer looks for due ones at least this often (and at
/// its due time, for those it knows of).
const DELAY_SLACK: Duration = Duration::from_millis(250);

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreams").field("options", &self.options).field("node", &self.node).finish()
    }
}

impl std::fmt::Debug for RedisStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.closing.cancel();
    }
}

/// A refused credential as [`Error::Unauthorized`], a command or key the user's ACL does not allow as
/// [`Error::Forbidden`] (Redis's own text, which names neither password nor token); `None` for any other error.
pub(crate) fn refusal(error: &redis::RedisError) -> Option<Error> {
    if error.kind() == redis::ErrorKind::AuthenticationFailed {
        return Some(Error::Unauthorized(format!("Redis: {error}")));
    }
    // A refused command inside a transaction or pipeline aborts it: its own error is among the aborted ones.
    let no_perm = error
        .clone()
        .into_server_errors()
        .is_some_and(|errors| errors.iter().any(|(_, error)| error.kind() == Some(redis::ServerErrorKind::NoPerm)));
    no_perm.then(|| Error::Forbidden(format!("Redis: {error}")))
}

/// One plain connection to Redis before the supervised ones, whose manager retries any failure with backoff for
/// seconds: a refused credential is [`Error::Unauthorized`] or [`Error::Forbidden`] at once, and any other
/// failure (nothing listening, a TLS handshake refused either way) an [`Error::Transport`] naming the address
/// and the cause.
pub(crate) async fn first_connection(client: &redis::Client, url: &str) -> Result<(), Error> {
    match client.get_multiplexed_async_connection().await {
        Ok(_) => Ok(()),
        Err(error) => Err(refusal(&error).unwrap_or_else(|| {
            Error::Transport(format!("cannot connect to Redis at {}: {error}", adapter::redact_url(url)).into())
        })),
    }
}

pub(crate) fn redis_error(error: redis::RedisError) -> Error {
    if let Some(refused) = refusal(&error) {
        return refused;
    }
    if error.is_io_error() || error.is_connection_dropped() || error.is_timeout() {
        Error::Disconnected
    } else {
        Error::Transport(Box::new(error))
    }
}

/// An entry's fields: the envelope whole in [`ENVELOPE`] when `compact`, else its fields and its body; and when
/// it was sent.
fn entry_fields(envelope: &Envelope, compact: bool) -> Result<Vec<(String, bytes::Bytes)>, Error> {
    if compact {
        return Ok(vec![
            (ENVELOPE.to_owned(), rpc_core::codec::encode_envelope(envelope)?),
            (headers::SENT_AT_MS.to_owned(), bytes::Bytes::from(adapter::now_ms().to_string())),
        ]);
    }
    let mut out: Vec<(String, bytes::Bytes)> = fields::to_pairs(envelope, 1)
        .into_iter()
        .map(|(name, value)| (name.to_owned(), bytes::Bytes::from(value)))
        .collect();
    out.push((headers::SENT_AT_MS.to_owned(), bytes::Bytes::from(adapter::now_ms().to_string())));
    out.push((BODY.to_owned(), envelope.body.clone()));
    Ok(out)
}

impl Inner {
    /// Whether `address` is an mqrpc inbox (`<prefix>i:<32 hex digits>`), whose reader is mqrpc's.
    fn is_inbox(&self, address: &str) -> bool {
        address.strip_prefix(self.options.prefix.as_str()).and_then(|rest| rest.strip_prefix("i:")).is_some_and(|id| {
            id.len() == 32 && id.bytes().all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
        })
    }

    fn queue_key(&self, queue: &str) -> String {
        format!("{}q:{queue}", self.options.prefix)
    }

    fn meta_key(&self, queue: &str) -> String {
        format!("{}meta:{queue}", self.options.prefix)
    }

    /// The sorted set of `queue`'s delayed entries, by due time.
    fn delayed_key(&self, queue: &str) -> String {
        format!("{}d:{queue}", self.options.prefix)
    }

    /// The hash of `queue`'s delayed entries' fields, by member of [`Inner::delayed_key`].
    fn delayed_entries_key(&self, queue: &str) -> String {
        format!("{}dm:{queue}", self.options.prefix)
    }

    /// The stream on which `queue`'s consumers hear of cancelled calls.
    fn cancels_key(&self, queue: &str) -> String {
        format!("{}x:{queue}", self.options.prefix)
    }

    fn topic_key(&self, topic: &str) -> String {
        format!("{}t:{topic}", self.options.prefix)
    }

    /// A connection of its own, for a reader that blocks.
    async fn dedicated(&self) -> Result<ConnectionManager, Error> {
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        ConnectionManager::new_with_config(self.client.clone(), config).await.map_err(redis_error)
    }

    /// Creates consumer group `group` on `stream` (and the stream), starting at `start`; one that exists is
    /// left as it is.
    async fn create_group(&self, stream: &str, group: &str, start: &str) -> Result<(), Error> {
        let mut connection = self.commands.clone();
        let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg(start)
            .arg("MKSTREAM")
            .query_async(&mut connection)
            .await;
        match created {
            Err(error) if error.code() == Some("BUSYGROUP") => Ok(()),
            other => other.map_err(redis_error),
        }
    }

    /// Writes the declaration of `queue` with `options` (`name`, value) pairs: its meta hash.
    async fn declare_meta(&self, queue: &str, options: &[(&str, u64)]) -> Result<(), Error> {
        let mut set = redis::cmd("HSET");
        set.arg(self.meta_key(queue)).arg("declared").arg(1);
        for (name, value) in options {
            set.arg(*name).arg(*value);
        }
        let mut connection = self.commands.clone();
        let _: i64 = set.query_async(&mut connection).await.map_err(redis_error)?;
        Ok(())
    }

    /// An empty stream at `key` if there is none; returns the id to read after (its last).
    async fn open_stream(&self, key: &str) -> Result<String, Error> {
        let mut connection = self.commands.clone();
        let (id,): (String,) = redis::pipe()
            .atomic()
            .cmd("XADD")
            .arg(key)
            .arg("*")
            .arg("mqrpc-open")
            .arg("1")
            .query_async(&mut connection)
            .await
            .map_err(redis_error)?;
        let _: i64 = redis::cmd("XDEL").arg(key).arg(&id).query_async(&mut connection).await.map_err(redis_error)?;
        Ok(id)
    }

    /// Adds `envelope` to `queue`'s stream, or, for `inbox`, to the stream `queue` names (a caller's reply
    /// address, used as it is) if it exists.
    async fn publish_entry(&self, queue: &str, mut envelope: Envelope, inbox: bool) -> Result<(), Error> {
        if envelope.priority.is_some_and(|priority| priority > 0) {
            return Err(Error::Unsupported("priorities on Redis Streams"));
        }
        if inbox {
            adapter::refuse_delay(&envelope)?;
        }
        if let Some(delay) = envelope.delay_ms.take().filter(|delay| *delay > 0) {
            return self.publish_delayed(queue, &envelope, delay).await;
        }
        let envelope = &envelope;
        let compact = self.options.compact && (!inbox || self.is_inbox(queue));
        let fields = entry_fields(envelope, compact)?;
        let mut connection = self.commands.clone();
        let known = !inbox && self.unbounded.get(queue).is_some_and(|since| since.elapsed() < DECLARATION_CACHE);
        if inbox || known {
            // An inbox, or a queue without a maximum length: exists when its stream does.
            let key = if inbox { queue.to_owned() } else { self.queue_key(queue) };
            let mut add = redis::cmd("XADD");
            add.arg(&key).arg("NOMKSTREAM").arg("*");
            for (name, value) in &fields {
                add.arg(name.as_bytes()).arg(value.as_ref());
            }
            let added: Option<String> = add.query_async(&mut connection).await.map_err(redis_error)?;
            if added.is_none() {
                self.unbounded.remove(queue);
                return Err(Error::NoRoute(queue.to_owned()));
            }
            if !inbox {
                Counters::bump(&self.counters.of(queue).published);
            }
            return Ok(());
        }
        let mut invocation = self.publish.key(self.queue_key(queue));
        invocation.key(self.meta_key(queue)).key(self.delayed_key(queue));
        for (name, value) in &fields {
            invocation.arg(name.as_bytes()).arg(value.as_ref());
        }
        let added: i64 = invocation.invoke_async(&mut connection).await.map_err(redis_error)?;
        match added {
            2 => {
                if self.unbounded.len() >= DECLARATION_CACHE_SIZE {
                    self.unbounded.clear();
                }
                self.unbounded.insert(queue.to_owned(), std::time::Instant::now());
            }
            1 => {
                self.unbounded.remove(queue);
            }
            _ => {}
        }
        self.counted(queue, added)
    }

    /// What a publish script's answer means, counted: 1 or 2 published, 0 the queue is full, -1 not declared.
    fn counted(&self, queue: &str, answer: i64) -> Result<(), Error> {
        let counters = self.counters.of(queue);
        match answer {
            1 | 2 => {
                Counters::bump(&counters.published);
                Ok(())
            }
            0 => {
                Counters::bump(&counters.rejected);
                Err(Error::QueueFull(queue.to_owned()))
            }
            _ => Err(Error::NoRoute(queue.to_owned())),
        }
    }

    /// Holds `envelope` in `queue`'s delayed set for `delay` milliseconds (by Redis's clock); the queue's
    /// consumers move it to the stream when it is due.
    async fn publish_delayed(&self, queue: &str, envelope: &Envelope, delay: u64) -> Result<(), Error> {
        let fields = entry_fields(envelope, self.options.compact)?;
        let mut invocation = self.delay.key(self.delayed_key(queue));
        invocation
            .key(self.delayed_entries_key(queue))
            .key(self.queue_key(queue))
            .key(self.meta_key(queue))
            .arg(delay)
            .arg(delayed_member(envelope));
        for (name, value) in &fields {
            invocation.arg(name.as_bytes()).arg(value.as_ref());
        }
        let mut connection = self.commands.clone();
        let held: i64 = invocation.invoke_async(&mut connection).await.map_err(redis_error)?;
        self.counted(queue, held)
    }

    /// See [`Transport::cancel`] on [`RedisStreams`].
    async fn cancel(&self, queue: &str, correlation_id: Uuid) -> Result<(), Error> {
        let mut invocation = self.cancel.key(self.queue_key(queue));
        invocation
            .key(self.meta_key(queue))
            .key(self.delayed_key(queue))
            .key(self.delayed_entries_key(queue))
            .key(self.cancels_key(queue))
            .arg(correlation_id.simple().to_string())
            .arg(correlation_id.as_bytes().as_slice())
            .arg(correlation_id.hyphenated().to_string())
            .arg(CANCEL_LOOK)
            .arg(CANCELS_KEPT)
            .arg(u64::try_from(CANCELS_TTL.as_millis()).unwrap_or(u64::MAX));
        let mut connection = self.commands.clone();
        let removed: i64 = invocation.invoke_async(&mut connection).await.map_err(redis_error)?;
        tracing::debug!(%correlation_id, queue, removed, "cancelled a call");
        Ok(())
    }
}

/// A delayed entry's member in its queue's sorted set: its call's correlation id (32 hex digits, `-` for none),
/// for a cancel to find it, and a unique part.
pub(super) fn delayed_member(envelope: &Envelope) -> String {
    let unique = Uuid::new_v4().simple();
    match envelope.correlation_id {
        Some(correlation_id) => format!("{}:{unique}", correlation_id.simple()),
        None => format!("-:{unique}"),
    }
}

impl RedisStreams {
    /// Connects to the Redis at `url` (`redis://host:port/db`; `redis://:password@host:port` for a password,
    /// `redis://user:password@host:port` for an ACL user, `rediss://` for TLS) with the default options. An ACL
    /// user limited to some keys works under a [`RedisStreamsOptions::prefix`] its key patterns allow.
    ///
    /// # Errors
    /// [`Error::Transport`] naming the address and the cause when Redis cannot be reached or the TLS handshake
    /// fails; [`Error::InvalidArgument`] for a bad URL, or TLS settings with a `redis://` one;
    /// [`Error::Unauthorized`] for a refused password. A command or key the user may not use fails with
    /// [`Error::Forbidden`].
    pub async fn connect(url: &str) -> Result<RedisStreams, Error> {
        RedisStreams::connect_with(url, RedisStreamsOptions::new()).await
    }

    /// Connects to the Redis at `url` with `options`.
    ///
    /// # Errors
    /// As [`RedisStreams::connect`].
    pub async fn connect_with(url: &str, options: RedisStreamsOptions) -> Result<RedisStreams, Error> {
        let client = options.tls.client(url)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        first_connection(&client, url).await?;
        let commands = ConnectionManager::new_with_config(client.clone(), config).await.map_err(redis_error)?;
        Ok(RedisStreams {
            inner: Arc::new(Inner {
                client,
                commands,
                options,
                node: Uuid::new_v4(),
                next_consumer: AtomicU64::new(1),
                counters: CounterMap::default(),
                closing: CancellationToken::new(),
                publish: scripts::publish(),
                unbounded: dashmap::DashMap::new(),
                delay: scripts::delay(),
                cancel: scripts::cancel(),
            }),
        })
    }

    async fn group_consumer(
        &self,
        name: &str,
        stream: String,
        group: &str,
        queue: bool,
        max_deliveries: Option<u32>,
        options: ConsumeOptions,
    ) -> Result<Consumer, Error> {
        let target = consumer::Target { name: name.to_owned(), stream, group: group.to_owned(), queue, max_deliveries };
        consumer::start(&self.inner, target, options).await
    }

    /// A reader of `key` without a group, from after `after`, auto-acked, ending with its consumer. An inbox's
    /// reader (`losses` given) deletes what it read, renews the inbox's expiry, and makes it again if it is gone
    /// (Redis restarted without persistence, or the client was away past the expiry), bumping `losses`: replies
    /// sent meanwhile were dropped.
    fn reader(
        &self,
        key: String,
        after: String,
        losses: Option<tokio::sync::watch::Sender<u64>>,
        kind: Option<Kind>,
    ) -> Result<Consumer, Error> {
        let delete = losses.is_some();
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        let cancel = self.inner.closing.child_token();
        let inner = Arc::clone(&self.inner);
        let stop = cancel.clone();
        tokio::spawn(async move {
            let mut connection = match inner.dedicated().await {
                Ok(connection) => connection,
                Err(error) => {
                    tracing::warn!(%error, %key, "a Redis stream reader could not connect");
                    return;
                }
            };
            let mut last = after;
            // Entries read and not yet deleted (an inbox's).
            let mut read: Vec<String> = Vec::new();
            let mut renewed = std::time::Instant::now();
            let ttl = u64::try_from(inner.options.inbox_ttl.as_millis()).unwrap_or(u64::MAX);
            while !stop.is_cancelled() && !sender.is_closed() {
                if let Some(losses) = &losses
                    && renewed.elapsed() >= RENEW_INBOX.min(inner.options.inbox_ttl / 3)
                {
                    renewed = std::time::Instant::now();
                    let mut commands = inner.commands.clone();
                    let kept: Result<i64, _> =
                        redis::cmd("PEXPIRE").arg(&key).arg(ttl).query_async(&mut commands).await;
                    if kept == Ok(0) {
                        tracing::warn!(%key, "the inbox was gone; replies sent to it meanwhile were lost");
                        if let Ok(id) = inner.open_stream(&key).await {
                            last = id;
                            let _: Result<i64, _> =
                                redis::cmd("PEXPIRE").arg(&key).arg(ttl).query_async(&mut commands).await;
                        }
                        losses.send_modify(|lost| *lost += 1);
                    }
                }
                // What the last read took leaves the inbox with the next read, in one round trip.
                let mut pipeline = redis::pipe();
                if !read.is_empty() {
                    pipeline.cmd("XDEL").arg(&key).arg(&read).ignore();
                }
                pipeline.cmd("XREAD").arg("COUNT").arg(256).arg("BLOCK").arg(200).arg("STREAMS").arg(&key).arg(&last);
                let reply = tokio::select! {
                    () = stop.cancelled() => break,
                    reply = pipeline.query_async::<(Value,)>(&mut connection) => reply,
                };
                let entries = match reply {
                    Ok((reply,)) => {
                        read.clear();
                        consumer::read_reply(reply)
                    }
                    Err(error) => {
                        tracing::debug!(%error, %key, "reading a Redis stream failed; trying again");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                for entry in entries {
                    last.clone_from(&entry.id);
                    if delete {
                        read.push(entry.id);
                    }
                    let (envelope, delivery_count, sent_at) = consumer::decode(entry.fields, &inner.options.limits);
                    let Ok(mut envelope) = envelope else {
                        tracing::warn!(%key, "an entry that is not an envelope; dropped");
                        continue;
                    };
                    if let Some(kind) = kind {
                        envelope.kind = kind;
                    }
                    let queued = match envelope.deadline_ms {
                        Some(_) => adapter::queued_since(sent_at, adapter::now_ms()),
                        None => Duration::ZERO,
                    };
                    let delivery = Delivery {
                        envelope: Arc::new(envelope),
                        delivery_count,
                        queued,
                        received_at: std::time::Instant::now(),
                        handle: AckHandle::auto(),
                    };
                    let _ = sender.send(delivery);
                }
            }
            if delete {
                let mut commands = inner.commands.clone();
                let _: Result<i64, _> = redis::cmd("DEL").arg(&key).query_async(&mut commands).await;
            }
        });
        Ok(Consumer::from_channel(receiver, Some(Box::new(StopReader(cancel)))))
    }
}

/// Stops a reader without a group when its consumer drops.
struct StopReader(CancellationToken);

impl ConsumerControl for StopReader {
    fn pause(&self) {
        self.0.cancel();
    }
}

impl Drop for StopReader {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl Transport for RedisStreams {
    fn system(&self) -> &'static str {
        "redis"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::none()
            .acks(true)
            .requeue(true)
            .dead_letter(true)
            .max_length(true)
            .subscriber_groups(true)
            .queue_stats(true)
            .delayed_delivery(true)
            .delay_slack(DELAY_SLACK)
            .cancel(true)
    }

    fn declare_queue<'a>(&'a self, queue: &'a str, options: &'a QueueOptions) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if queue.is_empty() {
                return Err(Error::InvalidArgument("an empty queue name".into()));
            }
            self.inner.unbounded.remove(queue);
            self.inner.create_group(&self.inner.queue_key(queue), scripts::QUEUE_GROUP, "0").await?;
            // Every queue but an inbox has a dead-letter queue, declared with it.
            if !queue.ends_with(".dlq") {
                let dead_letters = rpc_core::naming::dead_letter_queue(queue);
                self.inner.create_group(&self.inner.queue_key(&dead_letters), scripts::QUEUE_GROUP, "0").await?;
                self.inner.declare_meta(&dead_letters, &[]).await?;
            }
            let mut limits = Vec::new();
            if let Some(max_len) = options.max_len {
                limits.push(("max_len", u64::try_from(max_len).unwrap_or(u64::MAX)));
            }
            if let Some(max) = options.max_deliveries {
                limits.push(("max_deliveries", u64::from(max)));
            }
            self.inner.declare_meta(queue, &limits).await
        })
    }

    fn publish<'a>(&'a self, queue: &'a str, envelope: Envelope, confirm: Confirm) -> BoxFuture<'a, Result<(), Error>> {
        // A reply to an inbox is sent unconfirmed (`Confirm::for_reply`): its address is the stream itself.
        Box::pin(async move { self.inner.publish_entry(queue, envelope, confirm == Confirm::Sent).await })
    }

    fn publish_topic<'a>(&'a self, topic: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            adapter::refuse_delay(&envelope)?;
            let fields = entry_fields(&envelope, self.inner.options.compact)?;
            let mut add = redis::cmd("XADD");
            add.arg(self.inner.topic_key(topic)).arg("MAXLEN").arg("~").arg(self.inner.options.topic_max_len).arg("*");
            for (name, value) in &fields {
                add.arg(name.as_bytes()).arg(value.as_ref());
            }
            let mut connection = self.inner.commands.clone();
            let _: String = add.query_async(&mut connection).await.map_err(redis_error)?;
            Ok(())
        })
    }

    fn consume<'a>(&'a self, queue: &'a str, options: ConsumeOptions) -> BoxFuture<'a, Result<Consumer, Error>> {
        Box::pin(async move {
            let mut connection = self.inner.commands.clone();
            let meta: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
                .arg(self.inner.meta_key(queue))
                .query_async(&mut connection)
                .await
                .map_err(redis_error)?;
            if meta.is_empty() {
                return Err(Error::NoRoute(queue.to_owned()));
            }
            let max_deliveries = meta.get("max_deliveries").and_then(|max| max.parse().ok());
            let stream = self.inner.queue_key(queue);
            self.inner.create_group(&stream, scripts::QUEUE_GROUP, "0").await?;
            self.group_consumer(queue, stream, scripts::QUEUE_GROUP, true, max_deliveries, options).await
        })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
        options: ConsumeOptions,
    ) -> BoxFuture<'a, Result<Consumer, Error>> {
        Box::pin(async move {
            let stream = self.inner.topic_key(topic);
            self.inner.create_group(&stream, group, "$").await?;
            let name = format!("{topic}@{group}");
            self.group_consumer(&name, stream, group, false, None, options).await
        })
    }

    fn subscribe_private<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Consumer, Error>> {
        Box::pin(async move {
            let key = self.inner.topic_key(topic);
            let after = self.inner.open_stream(&key).await?;
            self.reader(key, after, None, None)
        })
    }

    fn open_inbox(&self) -> BoxFuture<'_, Result<Inbox, Error>> {
        Box::pin(async move {
            let address = format!("{}i:{}", self.inner.options.prefix, Uuid::new_v4().simple());
            let after = self.inner.open_stream(&address).await?;
            let ttl = u64::try_from(self.inner.options.inbox_ttl.as_millis()).unwrap_or(u64::MAX);
            let mut connection = self.inner.commands.clone();
            let _: i64 =
                redis::cmd("PEXPIRE").arg(&address).arg(ttl).query_async(&mut connection).await.map_err(redis_error)?;
            let (losses, lost) = tokio::sync::watch::channel(0);
            let consumer = self.reader(address.clone(), after, Some(losses), Some(Kind::Reply))?;
            Ok(Inbox { address, consumer, losses: Some(lost) })
        })
    }

    fn queue_stats<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueStats, Error>> {
        Box::pin(async move {
            let mut connection = self.inner.commands.clone();
            let exists: i64 = redis::cmd("EXISTS")
                .arg(self.inner.meta_key(queue))
                .query_async(&mut connection)
                .await
                .map_err(redis_error)?;
            if exists == 0 {
                return Err(Error::NoRoute(queue.to_owned()));
            }
            let stream = self.inner.queue_key(queue);
            let length: usize =
                redis::cmd("XLEN").arg(&stream).query_async(&mut connection).await.map_err(redis_error)?;
            let pending: Value = redis::cmd("XPENDING")
                .arg(&stream)
                .arg(scripts::QUEUE_GROUP)
                .query_async(&mut connection)
                .await
                .unwrap_or(Value::Nil);
            let held = match &pending {
                Value::Array(summary) => {
                    summary.first().and_then(|count| redis::from_redis_value::<usize>(count.clone()).ok()).unwrap_or(0)
                }
                _ => 0,
            };
            let consumers: Value = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(&stream)
                .arg(scripts::QUEUE_GROUP)
                .query_async(&mut connection)
                .await
                .unwrap_or(Value::Nil);
            let live = live_consumers(&consumers, self.inner.options.visibility.max(Duration::from_secs(2)));
            let (delayed, cancelled): (usize, Option<u64>) = redis::pipe()
                .cmd("ZCARD")
                .arg(self.inner.delayed_key(queue))
                .cmd("HGET")
                .arg(self.inner.meta_key(queue))
                .arg("cancelled")
                .query_async(&mut connection)
                .await
                .map_err(redis_error)?;
            let counters = self.inner.counters.of(queue);
            let mut stats = counters.stats(length.saturating_sub(held), live);
            stats.unacked = held;
            stats.delayed = delayed;
            stats.cancelled = cancelled.unwrap_or(0);
            Ok(stats)
        })
    }

    /// Removes the call's request if it is delayed or waits in the queue (looking through the first
    /// 10,000 ready entries), counted in the queue's `cancelled`; otherwise tells the queue's consumers, on the
    /// stream `<prefix>x:<queue>`: one running the call stops its handler, one that reads it later drops it
    /// unrun.
    fn cancel<'a>(&'a self, queue: &'a str, correlation_id: Uuid) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.inner.cancel(queue, correlation_id))
    }

    fn delete_queue<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if queue.starts_with(&format!("{}i:", self.inner.options.prefix)) {
                return Err(Error::InvalidArgument(format!("`{queue}` is an inbox; it goes with its client")));
            }
            self.inner.unbounded.remove(queue);
            let mut connection = self.inner.commands.clone();
            let _: i64 = redis::cmd("DEL")
                .arg(self.inner.queue_key(queue))
                .arg(self.inner.meta_key(queue))
                .arg(self.inner.delayed_key(queue))
                .arg(self.inner.delayed_entries_key(queue))
                .arg(self.inner.cancels_key(queue))
                .query_async(&mut connection)
                .await
                .map_err(redis_error)?;
            Ok(())
        })
    }
}

/// How many consumers in an `XINFO CONSUMERS` reply were active within `window`: a consumer that died stays
/// listed until it is deleted.
fn live_consumers(reply: &Value, window: Duration) -> usize {
    let window = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    let Value::Array(consumers) = reply else { return 0 };
    consumers
        .iter()
        .filter(|consumer| {
            let pairs: Vec<(String, Value)> = match consumer {
                Value::Array(items) => items
                    .chunks(2)
                    .filter_map(|pair| {
                        Some((redis::from_redis_value::<String>(pair.first()?.clone()).ok()?, pair.get(1)?.clone()))
                    })
                    .collect(),
                Value::Map(items) => items
                    .iter()
                    .filter_map(|(name, value)| {
                        Some((redis::from_redis_value::<String>(name.clone()).ok()?, value.clone()))
                    })
                    .collect(),
                _ => Vec::new(),
            };
            pairs
                .iter()
                .find(|(name, _)| name == "idle")
                .and_then(|(_, idle)| redis::from_redis_value::<u64>(idle.clone()).ok())
                .is_some_and(|idle| idle < window)
        })
        .count()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proptest::prelude::*;
    use rpc_core::{Envelope, Kind, ReplyTo};

    use super::{Limits, entry_fields, read_entry};

    fn owned(fields: Vec<(String, Bytes)>) -> Vec<(Vec<u8>, Vec<u8>)> {
        fields.into_iter().map(|(name, value)| (name.into_bytes(), value.to_vec())).collect()
    }

    fn request() -> Envelope {
        let mut envelope = Envelope::new(Kind::Request);
        envelope.service = "Calculator".into();
        envelope.method = "add".into();
        envelope.correlation_id = Some(uuid::Uuid::new_v4());
        envelope.reply_to = Some(ReplyTo::Inbox("mqrpc:i:0123456789abcdef0123456789abcdef".into()));
        envelope.deadline_ms = Some(5_000);
        envelope.idempotency_key = Some("k1".into());
        envelope.headers.insert("tenant".into(), "blue".into());
        envelope.body = Bytes::from_static(b"\x92\x01\x02");
        envelope
    }

    #[test]
    fn both_forms_read_back_as_the_envelope_written() {
        let envelope = request();
        let (compact, count) = read_entry(owned(entry_fields(&envelope, true).expect("encodes")), &Limits::default())
            .expect("the compact form reads");
        assert_eq!((compact, count), (envelope.clone(), 1));
        let (fields, count) = read_entry(owned(entry_fields(&envelope, false).expect("encodes")), &Limits::default())
            .expect("the fields read");
        assert_eq!(count, 1);
        assert_eq!(fields.id, envelope.id);
        assert_eq!(fields.correlation_id, envelope.correlation_id);
        assert_eq!((fields.service.as_str(), fields.method.as_str()), ("Calculator", "add"));
        assert_eq!(fields.reply_to, envelope.reply_to);
        assert_eq!((fields.deadline_ms, fields.idempotency_key.as_deref()), (Some(5_000), Some("k1")));
        assert_eq!(fields.headers.get("tenant").map(String::as_str), Some("blue"));
        assert_eq!(fields.body, envelope.body);
    }

    #[test]
    fn entries_past_the_limits_or_not_envelopes_are_refused_with_the_reason() {
        let envelope = request();
        let small = Limits { max_frame: 64, ..Limits::default() };
        for compact in [true, false] {
            let why = read_entry(owned(entry_fields(&envelope, compact).expect("encodes")), &small)
                .expect_err("past the limit");
            assert!(why.contains("past the limit"), "{why}");
        }
        let why = read_entry(vec![(b"mqrpc-envelope".to_vec(), b"\x81\xa1v\x07".to_vec())], &Limits::default())
            .expect_err("another version");
        assert!(!why.is_empty());
    }

    proptest! {
        /// Any names and values: an envelope or the reason it is not one, never a panic.
        #[test]
        fn any_fields_read_or_are_refused(
            fields in proptest::collection::vec(
                (
                    prop_oneof![
                        Just(b"mqrpc-envelope".to_vec()),
                        Just(b"body".to_vec()),
                        Just(b"mqrpc-delivery-count".to_vec()),
                        Just(b"mqrpc-reply-to".to_vec()),
                        Just(b"mqrpc-correlation-id".to_vec()),
                        proptest::collection::vec(any::<u8>(), 0..24),
                    ],
                    proptest::collection::vec(any::<u8>(), 0..64),
                ),
                0..12,
            )
        ) {
            let small = Limits { max_frame: 256, ..Limits::default() };
            let _ = read_entry(fields, &small);
        }
    }
}
