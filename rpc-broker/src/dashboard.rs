//! The live dashboard of a broker server (`rpc-broker serve --dashboard ADDR`): a plain page, no build step,
//! that shows the queues (depth, delayed, unacked, consumers, publish/deliver/ack rates, dead letters), the
//! connections and the broker's figures, updated every second over server-sent events; dead letters are
//! inspected and replayed with a click.
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the page (`/app.js`, `/app.css` beside it) |
//! | `GET /api/snapshot` | the figures as JSON, once |
//! | `GET /api/events` | the same, as a server-sent event every [`Dashboard::interval`] |
//! | `GET /api/dlq/{queue}` | the dead letters of `queue` (at most [`MAX_LISTED`]), left where they are |
//! | `POST /api/dlq/{queue}/replay` | moves them back onto `queue` with their idempotency keys (header `X-Mqrpc: replay` required) |
//!
//! With a token set on the broker, the dashboard asks for the same token: as `Authorization: Bearer <token>`, or
//! once as `/?token=<token>`, which sets a cookie (`HttpOnly`, `SameSite=Strict`) for the rest. A broker with
//! users (`--users`) also lets in the token of a user with the `admin` right on every name (`"names": "*"`),
//! and nobody else: the dashboard shows and replays every queue's. The figures are
//! read from the server's [`Monitor`]; dead letters go through a connection of the dashboard's own to the broker
//! ([`Remote`]), under the broker's own rules. Everything a page shows from the broker (queue names, arguments)
//! is set as text, never as markup, and the page's content security policy admits only its own script.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::Stream;
use rpc_core::dead_letters::DeadLetters;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::OnceCell;

use crate::remote::{Remote, RemoteOptions};
use crate::server::Monitor;

/// Dead letters one listing shows at most.
pub const MAX_LISTED: usize = 100;
/// Dead letters one replay moves at most.
const MAX_REPLAYED: usize = 10_000;
/// The cookie that carries the token once given.
const COOKIE: &str = "mqrpc_dashboard";

const PAGE: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/app.css");
const LOGIN: &str = include_str!("dashboard/login.html");

/// The dashboard of one broker server.
#[derive(Clone)]
pub struct Dashboard {
    monitor: Monitor,
    broker: String,
    options: RemoteOptions,
    token: Option<String>,
    interval: Duration,
}

/// What the routes share: the dashboard and its connection to the broker, made at the first use.
type Shared = Arc<(Dashboard, OnceCell<Remote>)>;

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl Dashboard {
    /// The dashboard of the server `monitor` reads, reaching the broker at `broker` (its URL, token included)
    /// with `options` for dead letters, and asking its visitors for `token` when there is one.
    pub fn new(
        monitor: Monitor,
        broker: impl Into<String>,
        options: RemoteOptions,
        token: Option<String>,
    ) -> Dashboard {
        Dashboard { monitor, broker: broker.into(), options, token, interval: Duration::from_secs(1) }
    }

    /// Whether the dashboard lets in a visitor presenting `token`: the dashboard's token, or the token of a user
    /// of the broker with the `admin` right on every name (checked against the users as they are now, so a
    /// reloaded users file applies to the next request).
    fn admits(&self, token: &str) -> bool {
        self.token.as_deref().is_some_and(|expected| same(token, expected)) || self.monitor.is_admin_token(token)
    }

    /// How often the page is sent new figures (default one second, at least 50 ms).
    pub fn interval(mut self, interval: Duration) -> Dashboard {
        self.interval = interval.max(Duration::from_millis(50));
        self
    }

    /// The dashboard's routes.
    pub fn router(self) -> Router {
        let shared: Shared = Arc::new((self, OnceCell::new()));
        let api = Router::new()
            .route("/", get(page))
            .route("/api/snapshot", get(snapshot))
            .route("/api/events", get(events))
            .route("/api/dlq/{queue}", get(dead_letters))
            .route("/api/dlq/{queue}/replay", post(replay))
            .route_layer(middleware::from_fn_with_state(Arc::clone(&shared), authorize));
        Router::new()
            .route("/app.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
            .route("/app.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
            .merge(api)
            .with_state(shared)
    }

    /// Serves the dashboard on `listener` until it fails.
    ///
    /// # Errors
    /// The listener's.
    pub async fn serve(self, listener: TcpListener) -> std::io::Result<()> {
        axum::serve(listener, self.router()).await
    }

    /// Binds `address` and serves the dashboard there in a task of its own; returns the address bound (port 0
    /// picks a free one).
    ///
    /// # Errors
    /// When `address` cannot be bound.
    pub async fn spawn(self, address: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(address).await?;
        let bound = listener.local_addr()?;
        tokio::spawn(async move {
            if let Err(error) = self.serve(listener).await {
                tracing::error!(%error, "the dashboard stopped");
            }
        });
        Ok(bound)
    }

    /// The figures the page shows, as JSON.
    pub fn snapshot(&self) -> serde_json::Value {
        let monitor = &self.monitor;
        let stats = monitor.stats();
        let all = monitor.queues();
        let find = |name: &str| all.iter().find(|(queue, _)| queue == name).map(|(_, stats)| stats);
        let depth_of = |name: &str| find(name).map(|stats| stats.ready);
        // A dead letter being listed or replayed is handed out, not gone: it counts.
        let dead_letters_of = |name: &str| find(name).map(|stats| stats.ready + stats.unacked);
        let queues: Vec<serde_json::Value> = all
            .iter()
            .filter(|(name, _)| !name.starts_with(crate::protocol::INBOX_PREFIX) && !name.contains("@inbox."))
            .filter(|(name, _)| name.strip_suffix(".dlq").is_none_or(|queue| depth_of(queue).is_none()))
            .map(|(name, stats)| {
                json!({
                    "name": name,
                    "ready": stats.ready,
                    "delayed": stats.delayed,
                    "unacked": stats.unacked,
                    "consumers": stats.consumers,
                    "published": stats.published,
                    "delivered": stats.delivered,
                    "acked": stats.acked,
                    "dead_lettered": stats.dead_lettered,
                    "expired": stats.expired,
                    "dlq": dead_letters_of(&rpc_core::naming::dead_letter_queue(name)),
                })
            })
            .collect();
        let inboxes = all.iter().filter(|(name, _)| name.starts_with(crate::protocol::INBOX_PREFIX)).count();
        let connections: Vec<serde_json::Value> = monitor
            .connections()
            .into_iter()
            .map(|connection| {
                json!({
                    "id": connection.id,
                    "peer": connection.peer.to_string(),
                    "name": connection.name,
                    "version": connection.version,
                    "connected_ms": connection.connected_ms,
                    "outbound_bytes": connection.outbound_bytes,
                })
            })
            .collect();
        json!({
            "at_ms": unix_ms(),
            "broker": {
                "connections": stats.connections,
                "accepted": stats.accepted,
                "rejected": stats.rejected,
                "frames_in": stats.frames_in,
                "bytes_held": stats.bytes_held,
                "inboxes": inboxes,
            },
            "queues": queues,
            "connections": connections,
        })
    }
}

/// The dashboard's connection to its broker, made at the first use.
async fn remote(shared: &Shared) -> Result<Remote, rpc_core::Error> {
    let (dashboard, remote) = &**shared;
    let connected = remote.get_or_try_init(|| Remote::connect_with(&dashboard.broker, dashboard.options.clone()));
    connected.await.cloned()
}

/// Lets a request through with a token the dashboard takes (a bearer header or the cookie), turns `/?token=`
/// into the cookie, and answers the rest 401 (the sign-in page for `/`).
async fn authorize(State(shared): State<Shared>, request: Request, next: Next) -> Response {
    let dashboard = &shared.0;
    if dashboard.token.is_none() && !dashboard.monitor.has_users() {
        return next.run(request).await;
    }
    let headers = request.headers();
    let bearer = headers.get(header::AUTHORIZATION).and_then(|value| value.to_str().ok());
    let presented =
        bearer.and_then(|value| value.strip_prefix("Bearer ")).map(str::to_owned).or_else(|| cookie(headers));
    if presented.is_some_and(|token| dashboard.admits(&token)) {
        return next.run(request).await;
    }
    let is_page = request.uri().path() == "/";
    let offered = request.uri().query().and_then(|query| query_value(query, "token"));
    if is_page
        && request.method() == Method::GET
        && let Some(offered) = offered.filter(|token| dashboard.admits(token))
    {
        let cookie = format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", hex(&offered));
        return Response::builder()
            .status(StatusCode::SEE_OTHER)
            .header(header::LOCATION, "/")
            .header(header::SET_COOKIE, cookie)
            .body(Body::empty())
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    if is_page {
        let mut response = (StatusCode::UNAUTHORIZED, LOGIN).into_response();
        secure(response.headers_mut(), "text/html; charset=utf-8");
        return response;
    }
    (StatusCode::UNAUTHORIZED, "the dashboard needs the broker's token, or an admin user's").into_response()
}

/// The token in the dashboard's cookie, if any.
fn cookie(headers: &HeaderMap) -> Option<String> {
    let cookies = headers.get(header::COOKIE)?.to_str().ok()?;
    let value = cookies.split(';').find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))?;
    unhex(value)
}

/// The value of `key` in a query string, percent-decoded.
fn query_value(query: &str, key: &str) -> Option<String> {
    let raw = query.split('&').find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))?;
    percent_decode(raw)
}

fn percent_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = raw.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn hex(text: &str) -> String {
    text.bytes().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> =
        (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect();
    String::from_utf8(bytes?).ok()
}

/// Compares in time that does not depend on where the strings differ.
fn same(given: &str, expected: &str) -> bool {
    let (given, expected) = (given.as_bytes(), expected.as_bytes());
    given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Sets the content type and the headers every page and asset carries.
fn secure(headers: &mut HeaderMap, content_type: &'static str) {
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    secure(response.headers_mut(), content_type);
    response
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    let mut response = (status, value.to_string()).into_response();
    secure(response.headers_mut(), "application/json");
    response
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

async fn snapshot(State(shared): State<Shared>) -> Response {
    json_response(StatusCode::OK, &shared.0.snapshot())
}

async fn events(State(shared): State<Shared>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let interval = shared.0.interval;
    let stream = futures::stream::unfold((shared, true), move |(shared, first)| async move {
        if !first {
            tokio::time::sleep(interval).await;
        }
        let event = Event::default().data(shared.0.snapshot().to_string());
        Some((Ok(event), (shared, false)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn dead_letters(State(shared): State<Shared>, Path(queue): Path<String>) -> Response {
    let remote = match remote(&shared).await {
        Ok(remote) => remote,
        Err(error) => return failure(StatusCode::BAD_GATEWAY, &error),
    };
    let listed = match DeadLetters::of_queue(remote, &queue).list(MAX_LISTED).await {
        Ok(listed) => listed,
        Err(error) => return failure(StatusCode::BAD_GATEWAY, &error),
    };
    let limits = rpc_core::codec::Limits::default();
    let letters: Vec<serde_json::Value> = listed
        .iter()
        .map(|envelope| {
            let args = rpc_core::codec::decode::<serde_json::Value>(&envelope.body, &limits)
                .map_or_else(|_| format!("<{} bytes>", envelope.body.len()), |value| value.to_string());
            json!({
                "id": envelope.id.to_string(),
                "service": envelope.service,
                "method": envelope.method,
                "attempt": envelope.attempt,
                "key": envelope.idempotency_key,
                "last_status": envelope.last_status,
                "args": args,
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "queue": queue, "dead_letters": letters }))
}

async fn replay(State(shared): State<Shared>, Path(queue): Path<String>, headers: HeaderMap) -> Response {
    // A custom header: a form on another site cannot send it without the browser asking this one first.
    if headers.get("x-mqrpc").and_then(|value| value.to_str().ok()) != Some("replay") {
        return json_response(StatusCode::FORBIDDEN, &json!({ "error": "a replay needs the header X-Mqrpc: replay" }));
    }
    let remote = match remote(&shared).await {
        Ok(remote) => remote,
        Err(error) => return failure(StatusCode::BAD_GATEWAY, &error),
    };
    match DeadLetters::of_queue(remote, &queue).replay(MAX_REPLAYED).await {
        Ok(replayed) => {
            tracing::info!(%queue, replayed, "dead letters replayed from the dashboard");
            json_response(StatusCode::OK, &json!({ "queue": queue, "replayed": replayed }))
        }
        Err(error) => failure(StatusCode::BAD_GATEWAY, &error),
    }
}

fn failure(status: StatusCode, error: &rpc_core::Error) -> Response {
    json_response(status, &json!({ "error": error.to_string() }))
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_travel_in_cookies_and_queries_unchanged() {
        for token in ["s3cret", "a b;c=d", "ünï"] {
            assert_eq!(unhex(&hex(token)).as_deref(), Some(token));
        }
        assert_eq!(query_value("x=1&token=a%20b%3Bc", "token").as_deref(), Some("a b;c"));
        assert_eq!(query_value("tokens=1", "token"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("ab", "abc"));
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("other=1; mqrpc_dashboard=733363726574"));
        assert_eq!(cookie(&headers).as_deref(), Some("s3cret"));
    }
}
