//! The broker's live dashboard in a real browser: Debian's Chromium, headless, driven over WebDriver
//! (chromedriver, `MQRPC_CHROMEDRIVER`; `bash .ci/brokers` installs both). The test signs in with the broker's
//! token, watches a queue's depth rise while calls wait and fall as a worker takes them, inspects a dead letter
//! and replays it with a click, and saves a screenshot as `target/dashboard/dashboard.png`.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use mqrpc_tests::service::{Events, ProbeClient, ProbeServer, Worker};
use rpc_broker::dashboard::Dashboard;
use rpc_broker::server::{BrokerServer, ServerConfig};
use rpc_broker::{Remote, RemoteOptions};
use rpc_core::transport::Confirm;
use rpc_core::{ConsumeOptions, Envelope, Kind, QueueOptions, Server, Transport};

/// How long the test waits for what it expects to see.
const WAIT: Duration = Duration::from_secs(20);
const TOKEN: &str = "dash-s3cret";

/// The chromedriver process, killed when dropped.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts chromedriver on a free port and waits until it listens.
async fn chromedriver() -> (Driver, String) {
    let path = std::env::var("MQRPC_CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("bound").port();
    let child = Command::new(path)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let driver = Driver(child);
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "chromedriver did not listen on port {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (driver, format!("http://127.0.0.1:{port}"))
}

/// A headless Chromium session.
async fn browser(webdriver: &str, profile: &std::path::Path) -> Client {
    let chromium = std::env::var("MQRPC_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,900", format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector).capabilities(capabilities).connect(webdriver).await.expect("a browser session")
}

/// The text of the cell `class` in the row of `queue`, if the row is on the page. Rows are redrawn every
/// update, so the cell is looked up afresh each time.
async fn cell(browser: &Client, queue: &str, class: &str) -> Option<String> {
    let selector = format!("tr[data-queue=\"{queue}\"] td.{class}");
    let element = browser.find(Locator::Css(&selector)).await.ok()?;
    element.text().await.ok()
}

/// Waits until the cell `class` of `queue` reads `expected`.
async fn until_cell(browser: &Client, queue: &str, class: &str, expected: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let seen = cell(browser, queue, class).await;
        if seen.as_deref() == Some(expected) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{queue} {class}: {seen:?}, not {expected}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_chromedriver), ignore = "needs Chromium and ChromeDriver: MQRPC_CHROMEDRIVER (bash .ci/brokers)")]
async fn the_dashboard_shows_queues_live_and_replays_a_dead_letter_with_a_click() {
    let mut config = ServerConfig::default();
    config.token = Some(TOKEN.into());
    let broker = BrokerServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), config).await.expect("the broker starts");
    let dashboard = Dashboard::new(broker.monitor(), broker.url(), RemoteOptions::new(), Some(TOKEN.into()))
        .interval(Duration::from_millis(200));
    let address = dashboard.spawn(SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("the dashboard serves");
    let page = format!("http://{address}/");

    let (_driver, webdriver) = chromedriver().await;
    let profile = tempfile::tempdir().expect("a profile directory");
    let browser = browser(&webdriver, profile.path()).await;

    // Without the token: the sign-in form. With it: the dashboard, live.
    browser.goto(&page).await.expect("opens the page");
    let field = browser.find(Locator::Css("input[name=token]")).await.expect("the sign-in form");
    field.send_keys(TOKEN).await.expect("types the token");
    browser.find(Locator::Css("button[type=submit]")).await.expect("a button").click().await.expect("signs in");
    browser.wait().at_most(WAIT).for_element(Locator::Css("#status.live")).await.expect("the page goes live");

    // Calls wait in the queue while no worker serves it: its depth rises, then falls as a worker takes them.
    let namespace = "dash";
    let queue = rpc_core::naming::service_queue(Some(namespace), "suite.Probe");
    let caller = rpc_core::Client::builder(Remote::connect(&broker.url()).await.expect("connects"))
        .namespace(namespace)
        .connect()
        .await
        .expect("a client");
    let transport = Remote::connect(&broker.url()).await.expect("connects");
    transport.declare_queue(&queue, &QueueOptions::new()).await.expect("declares");
    let probe = ProbeClient::new(&caller);
    let calls: Vec<_> = (0..5).map(|n| tokio::spawn(probe.add(n, 1).timeout(WAIT).into_future())).collect();
    until_cell(&browser, &queue, "depth", "5").await;
    let worker = Worker { name: "w".into(), events: Arc::new(Events::default()), client: None };
    let server = Server::new(Remote::connect(&broker.url()).await.expect("connects"))
        .namespace(namespace)
        .serve(ProbeServer::new(worker))
        .await
        .expect("serves");
    until_cell(&browser, &queue, "depth", "0").await;
    until_cell(&browser, &queue, "consumers", "1").await;
    for call in calls {
        call.await.expect("joins").expect("answered");
    }

    // A dead letter: listed with its key, then replayed with a click, and gone from the dead-letter queue.
    transport.declare_queue("jobs", &QueueOptions::new().max_deliveries(1)).await.expect("declares");
    let mut job = Envelope::new(Kind::Oneway);
    job.service = "Jobs".into();
    job.method = "run".into();
    job.idempotency_key = Some("job-7".into());
    job.body = rpc_core::codec::encode(&std::collections::BTreeMap::from([("id", 7)])).expect("encodes");
    transport.publish("jobs", job, Confirm::Broker).await.expect("publishes");
    let mut consumer = transport.consume("jobs", ConsumeOptions::new()).await.expect("consumes");
    let delivery = tokio::time::timeout(WAIT, consumer.next()).await.expect("a job").expect("open");
    delivery.handle.dead_letter().await.expect("dead-letters");
    drop(consumer);
    until_cell(&browser, "jobs", "dlq", "1").await;
    browser
        .find(Locator::Css("button[data-action=inspect][data-queue=jobs]"))
        .await
        .expect("an inspect button")
        .click()
        .await
        .expect("inspects");
    let listed = browser.wait().at_most(WAIT).for_element(Locator::Css("#dlq tbody tr")).await.expect("a listing");
    let row = listed.text().await.expect("the row's text");
    assert!(row.contains("Jobs.run") && row.contains("job-7") && row.contains(r#"{"id":7}"#), "{row}");

    // Rates move while calls flow.
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let traffic = tokio::spawn({
        let (caller, running) = (caller.clone(), Arc::clone(&running));
        async move {
            let probe = ProbeClient::new(&caller);
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                probe.add(1, 1).timeout(WAIT).await.expect("answered");
            }
        }
    });
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let rate = cell(&browser, &queue, "publish").await.and_then(|rate| rate.parse::<f64>().ok());
        if rate.is_some_and(|rate| rate > 0.0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no publish rate shown for {queue}: {rate:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    save_screenshot(&browser).await;
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    traffic.await.expect("the calls went on");
    // The rows are redrawn at every update: a button found just before one is gone when clicked, and is
    // looked up again.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let button =
            browser.find(Locator::Css("button[data-action=replay][data-queue=jobs]")).await.expect("a replay button");
        match button.click().await {
            Ok(()) => break,
            Err(error) if error.is_stale_element_reference() && tokio::time::Instant::now() < deadline => {}
            Err(error) => panic!("replays: {error}"),
        }
    }
    until_cell(&browser, "jobs", "dlq", "0").await;
    until_cell(&browser, "jobs", "depth", "1").await;
    let notice = browser.find(Locator::Id("notice")).await.expect("the notice").text().await.expect("its text");
    assert_eq!(notice, "replayed 1 dead letter(s) onto jobs");
    assert_eq!(transport.queue_stats("jobs.dlq").await.expect("stats").ready, 0);
    assert_eq!(transport.queue_stats("jobs").await.expect("stats").ready, 1);

    // Every connection is listed: the dashboard's own, the caller's, the worker's and this test's.
    let peers = browser.find_all(Locator::Css("#peers tbody tr")).await.expect("the connections");
    assert!(peers.len() >= 4, "{} connections listed", peers.len());

    browser.close().await.expect("closes the browser");
    server.shutdown(Duration::from_secs(5)).await;
}

/// Saves what the browser shows as `target/dashboard/dashboard.png`, kept by CI as an artifact.
async fn save_screenshot(browser: &Client) {
    let png = browser.screenshot().await.expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard");
    std::fs::create_dir_all(&dir).expect("makes the directory");
    std::fs::write(dir.join("dashboard.png"), png).expect("writes the screenshot");
}

/// A request without the token gets 401 and no figures; with it as a bearer token, the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_refuses_callers_without_the_token() {
    let mut config = ServerConfig::default();
    config.token = Some(TOKEN.into());
    let broker = BrokerServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), config).await.expect("the broker starts");
    let dashboard = Dashboard::new(broker.monitor(), broker.url(), RemoteOptions::new(), Some(TOKEN.into()));
    let address = dashboard.spawn(SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("the dashboard serves");
    for (path, authorization) in [
        ("/api/snapshot", None),
        ("/api/snapshot", Some("Bearer wrong")),
        ("/api/dlq/jobs", None),
        ("/api/events", Some("Bearer dash-s3cre")),
    ] {
        let (status, body) = http(address, "GET", path, authorization, &[]).await;
        assert_eq!(status, 401, "{path} with {authorization:?}: {body}");
        assert!(!body.contains("queues"), "{body}");
    }
    let (status, body) = http(address, "GET", "/", None, &[]).await;
    assert_eq!(status, 401);
    assert!(body.contains("name=\"token\""), "the sign-in form: {body}");
    let bearer = format!("Bearer {TOKEN}");
    let (status, body) = http(address, "GET", "/api/snapshot", Some(&bearer), &[]).await;
    assert_eq!(status, 200, "{body}");
    let snapshot: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert!(snapshot["queues"].is_array() && snapshot["broker"]["connections"].is_number(), "{snapshot}");
    // A replay needs the dashboard's header, which a form on another site cannot send.
    let (status, _) = http(address, "POST", "/api/dlq/jobs/replay", Some(&bearer), &[]).await;
    assert_eq!(status, 403);
}

/// One HTTP/1.1 request over a plain socket; the status and body.
async fn http(
    address: SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    extra: &[(&str, &str)],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connects");
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: 0\r\n");
    if let Some(authorization) = authorization {
        request.push_str(&format!("Authorization: {authorization}\r\n"));
    }
    for (name, value) in extra {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.expect("writes");
    let mut response = Vec::new();
    // An event stream does not end: a refusal does, and a snapshot is whole once the server closes.
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|code| code.parse().ok()).expect("a status line");
    let body = text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    (status, body)
}

/// On a broker with users and no shared token, the dashboard lets in an admin user's token only: no token and a
/// tenant's token get 401, and an admin's is refused from the request after a users reload takes its right away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_users_the_dashboard_takes_admin_users_only() {
    let users = |ops_rights: &str| {
        let hash = |token: &str| {
            rpc_broker::access::sha256(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect::<String>()
        };
        let json = format!(
            r#"{{"users": [
                {{"name": "ops", "token_sha256": "{}", "grants": [{{"names": "*", "rights": [{ops_rights}]}}]}},
                {{"name": "billing", "token_sha256": "{}",
                  "grants": [{{"names": "billing.*", "rights": ["publish", "consume", "admin"]}}]}}
            ]}}"#,
            hash("ops-token"),
            hash("billing-token")
        );
        rpc_broker::access::Users::parse(&json).expect("a users file")
    };
    let mut config = ServerConfig::default();
    config.users = Some(Arc::new(users(r#""admin""#)));
    let broker = BrokerServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), config).await.expect("the broker starts");
    let dashboard = Dashboard::new(broker.monitor(), broker.url(), RemoteOptions::new(), None);
    let address = dashboard.spawn(SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("the dashboard serves");
    for authorization in [None, Some("Bearer billing-token"), Some("Bearer wrong")] {
        let (status, body) = http(address, "GET", "/api/snapshot", authorization, &[]).await;
        assert_eq!(status, 401, "{authorization:?}: {body}");
        assert!(!body.contains("queues"), "{body}");
    }
    let (status, body) = http(address, "GET", "/api/snapshot", Some("Bearer ops-token"), &[]).await;
    assert_eq!(status, 200, "{body}");
    broker.monitor().replace_users(users(r#""publish""#));
    let (status, _) = http(address, "GET", "/api/snapshot", Some("Bearer ops-token"), &[]).await;
    assert_eq!(status, 401, "the admin right was taken away");
}
