//! Redis as a dedup store shared by every worker (feature `redis`): a key executed by one worker process is
//! answered from the store by all of them, including workers started after that process died.
//!
//! ```no_run
//! # async fn run() -> Result<(), rpc_core::Error> {
//! use std::time::Duration;
//!
//! use rpc_broker::adapter::redis_dedup::RedisDedup;
//!
//! let store = RedisDedup::connect("redis://127.0.0.1:6379").await?.window(Duration::from_secs(3_600));
//! let server = rpc_core::Server::new(rpc_broker::Embedded::new()).dedup(store);
//! # let _ = server;
//! # Ok(())
//! # }
//! ```
//!
//! # How keys are kept
//!
//! Key `<prefix><idempotency key>` (prefix `mqrpc:dedup:` by default) holds one of:
//! - `R<token>` while a worker executes it: set with `SET NX PX <lease>`, so exactly one worker claims a key.
//!   The claiming worker renews the lease every third of it while the handler runs; a worker that dies stops
//!   renewing, and once the lease runs out (10 s by default) another delivery of the key may execute it.
//! - `D<outcome>` once executed, for the window (10 minutes by default): the reply body, or the status the
//!   handler failed with. Outcomes are written, and claims given up, only by the worker that holds the claim
//!   (a Lua script compares the token), so a worker whose lease ran out cannot overwrite another's outcome.
//!
//! Memory is bounded by Redis itself: every key expires, and the server's `maxmemory` policy applies.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::redis_streams::RedisTls;
use ::redis::aio::ConnectionManager;
use ::redis::{AsyncCommands, Script, SetExpiry, SetOptions};
use bytes::{BufMut, Bytes, BytesMut};
use dashmap::DashMap;
use rpc_core::transport::BoxFuture;
use rpc_core::{Begin, Code, DedupStore, Error, Status, StoredReply};
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Extends a claim's lease if this worker still holds it.
const RENEW: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

/// Replaces a claim with its outcome if this worker still holds it.
const COMPLETE: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
    return 1
end
return 0";

/// Drops a claim if this worker still holds it.
const ABANDON: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0";

/// A [`DedupStore`] in Redis, shared by every worker that connects to the same Redis.
#[derive(Clone)]
pub struct RedisDedup {
    connection: ConnectionManager,
    prefix: String,
    window: Duration,
    lease: Duration,
    /// This process's claims: the token each was taken with, and the task renewing its lease.
    claims: Arc<Claims>,
}

struct Claim {
    token: Vec<u8>,
    renewing: JoinHandle<()>,
}

/// The claims of one store and its clones. Dropped with the last clone, it stops renewing them, as a worker
/// process that dies does: they run out after the lease.
#[derive(Default)]
struct Claims(DashMap<String, Claim>);

impl Drop for Claims {
    fn drop(&mut self) {
        for claim in self.0.iter() {
            claim.renewing.abort();
        }
    }
}

impl fmt::Debug for RedisDedup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisDedup")
            .field("prefix", &self.prefix)
            .field("window", &self.window)
            .field("lease", &self.lease)
            .field("claims", &self.claims.0.len())
            .finish_non_exhaustive()
    }
}

/// `error` as the framework's: a refusal as the transport's ([`Error::Unauthorized`], [`Error::Forbidden`]),
/// any other failure [`Error::Transport`] (the store reconnects by itself).
fn redis_error(error: ::redis::RedisError) -> Error {
    super::redis_streams::refusal(&error).unwrap_or_else(|| Error::Transport(Box::new(error)))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisDedup {
    /// Connects to the Redis at `url` (`redis://host:port/db`, `redis://user:password@host:port/db`, `rediss://`
    /// for TLS trusting the system's roots); the connection reconnects by itself.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad URL, [`Error::Transport`] naming the address and the cause when Redis
    /// cannot be reached, [`Error::Unauthorized`] for a refused password.
    pub async fn connect(url: &str) -> Result<RedisDedup, Error> {
        RedisDedup::connect_with_tls(url, &RedisTls::new()).await
    }

    /// Connects to the Redis at a `rediss://` `url` with the TLS settings `tls`.
    ///
    /// # Errors
    /// As [`RedisDedup::connect`]; [`Error::InvalidArgument`] also for TLS settings with a `redis://` URL.
    pub async fn connect_with_tls(url: &str, tls: &RedisTls) -> Result<RedisDedup, Error> {
        let client = tls.client(url)?;
        super::redis_streams::first_connection(&client, url).await?;
        let connection = ConnectionManager::new(client).await.map_err(redis_error)?;
        Ok(RedisDedup {
            connection,
            prefix: "mqrpc:dedup:".to_owned(),
            window: Duration::from_secs(600),
            lease: Duration::from_secs(10),
            claims: Arc::new(Claims::default()),
        })
    }

    /// Prefixes every key (default `mqrpc:dedup:`), to keep services or environments apart in one Redis.
    pub fn prefix(mut self, prefix: impl Into<String>) -> RedisDedup {
        self.prefix = prefix.into();
        self
    }

    /// How long an outcome is remembered (default 10 minutes): a duplicate arriving later runs again.
    pub fn window(mut self, window: Duration) -> RedisDedup {
        self.window = window;
        self
    }

    /// How long a claim outlives a worker that stopped renewing it (default 10 s): a worker that dies while
    /// executing a key holds it back from other deliveries this long. Renewed every third of it.
    pub fn lease(mut self, lease: Duration) -> RedisDedup {
        self.lease = lease;
        self
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Claims `key`: `Some(token)` if this call took it.
    async fn claim(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        let mut token = b"R".to_vec();
        token.extend_from_slice(Uuid::new_v4().simple().to_string().as_bytes());
        let options = SetOptions::default()
            .conditional_set(::redis::ExistenceCheck::NX)
            .with_expiration(SetExpiry::PX(millis(self.lease)));
        let mut connection = self.connection.clone();
        let taken: Option<String> =
            connection.set_options(self.key(key), token.as_slice(), options).await.map_err(redis_error)?;
        Ok(taken.map(|_| token))
    }

    /// Keeps renewing the lease of `key` while this worker holds it.
    fn renew(&self, key: &str, token: Vec<u8>) -> JoinHandle<()> {
        let mut connection = self.connection.clone();
        let (redis_key, lease) = (self.key(key), self.lease);
        tokio::spawn(async move {
            let script = Script::new(RENEW);
            loop {
                tokio::time::sleep(lease / 3).await;
                let renewed: Result<i64, _> =
                    script.key(&redis_key).arg(token.as_slice()).arg(millis(lease)).invoke_async(&mut connection).await;
                match renewed {
                    Ok(1) => {}
                    Ok(_) => {
                        tracing::warn!(key = redis_key, "a dedup claim ran out before its handler finished");
                        return;
                    }
                    // Redis is unreachable for now: try again at the next tick.
                    Err(error) => tracing::warn!(%error, "could not renew a dedup claim"),
                }
            }
        })
    }

    /// Gives up this process's hold on `key`: the token it was claimed with.
    fn release(&self, key: &str) -> Option<Vec<u8>> {
        let (_, claim) = self.claims.0.remove(key)?;
        claim.renewing.abort();
        Some(claim.token)
    }
}

/// `D`, then `O` and the body, or `E`, the status code (`u16`), the message's length (`u32`), the message and the
/// details.
fn encode_outcome(reply: &StoredReply) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_u8(b'D');
    match reply {
        Ok(body) => {
            buf.put_u8(b'O');
            buf.put_slice(body);
        }
        Err(status) => {
            buf.put_u8(b'E');
            buf.put_u16(status.code().as_u16());
            let message = status.message().as_bytes();
            buf.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
            buf.put_slice(message);
            buf.put_slice(status.details());
        }
    }
    buf.freeze()
}

fn decode_outcome(value: &[u8]) -> Option<StoredReply> {
    match value {
        [b'D', b'O', body @ ..] => Some(Ok(Bytes::copy_from_slice(body))),
        [b'D', b'E', c0, c1, l0, l1, l2, l3, rest @ ..] => {
            let code = Code::from_u16(u16::from_be_bytes([*c0, *c1]));
            let len = usize::try_from(u32::from_be_bytes([*l0, *l1, *l2, *l3])).ok()?;
            let message = std::str::from_utf8(rest.get(..len)?).ok()?;
            let details = Bytes::copy_from_slice(rest.get(len..)?);
            Some(Err(Status::new(code, message).with_details(details)))
        }
        _ => None,
    }
}

impl DedupStore for RedisDedup {
    fn begin<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Begin, Error>> {
        Box::pin(async move {
            if let Some(token) = self.claim(key).await? {
                let renewing = self.renew(key, token.clone());
                if let Some(earlier) = self.claims.0.insert(key.to_owned(), Claim { token, renewing }) {
                    earlier.renewing.abort();
                }
                return Ok(Begin::Execute);
            }
            let mut connection = self.connection.clone();
            let value: Option<Vec<u8>> = connection.get(self.key(key)).await.map_err(redis_error)?;
            match value {
                Some(value) if value.first() == Some(&b'D') => match decode_outcome(&value) {
                    Some(reply) => Ok(Begin::Done(reply)),
                    None => Err(Error::InvalidArgument(format!("the dedup entry of `{key}` is not an outcome"))),
                },
                // Running elsewhere, or its claim just ran out: ask again shortly.
                _ => Ok(Begin::InProgress(None)),
            }
        })
    }

    fn complete<'a>(&'a self, key: &'a str, reply: StoredReply) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let Some(token) = self.release(key) else { return Ok(()) };
            let mut connection = self.connection.clone();
            let stored: i64 = Script::new(COMPLETE)
                .key(self.key(key))
                .arg(token)
                .arg(encode_outcome(&reply).as_ref())
                .arg(millis(self.window))
                .invoke_async(&mut connection)
                .await
                .map_err(redis_error)?;
            if stored != 1 {
                tracing::warn!(key, "the dedup claim ran out before the outcome was stored");
            }
            Ok(())
        })
    }

    fn abandon<'a>(&'a self, key: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Some(token) = self.release(key) else { return };
            let mut connection = self.connection.clone();
            let dropped: Result<i64, _> =
                Script::new(ABANDON).key(self.key(key)).arg(token).invoke_async(&mut connection).await;
            if let Err(error) = dropped {
                // The claim runs out by itself after the lease.
                tracing::warn!(%error, key, "could not give up a dedup claim");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_round_trip_and_garbage_is_refused() {
        let ok: StoredReply = Ok(Bytes::from_static(b"\x05"));
        let failed: StoredReply =
            Err(Status::new(Code::Application, "not exact").with_details(Bytes::from_static(b"\x81\xa1r\x01")));
        for reply in [ok, failed] {
            assert_eq!(decode_outcome(&encode_outcome(&reply)), Some(reply));
        }
        assert_eq!(decode_outcome(b"Rtoken"), None);
        assert_eq!(decode_outcome(b"DE\x00\x01\xff\xff\xff\xffshort"), None);
        assert_eq!(decode_outcome(b"DX"), None);
    }
}
