//! Users and their rights on the broker: two tenants, each with its own service, on one broker. Every operation
//! one tenant tries on the other's queues, topics, dead letters and inboxes is refused with `Forbidden`, counted,
//! and leaves the connection open; each tenant's own calls go on; a token nobody holds is refused at the handshake.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rpc_broker::Remote;
use rpc_broker::access::{Users, sha256};
use rpc_broker::server::{BrokerServer, ServerConfig};
use rpc_core::transport::Confirm;
use rpc_core::{Client, ConsumeOptions, Envelope, Error, Kind, QueueOptions, Server, Transport};

#[rpc_core::service]
trait Echo {
    async fn echo(&self, n: u64) -> u64;
}

struct EchoImpl;

impl Echo for EchoImpl {
    async fn echo(&self, n: u64) -> u64 {
        n
    }
}

const WAIT: Duration = Duration::from_secs(10);
const BLUE: &str = "blue-token-0123456789abcdef0123456789abcdef";
const RED: &str = "red-token-0123456789abcdef0123456789abcdef";
const OPERATOR: &str = "operator-token-0123456789abcdef0123456789";

fn hex(token: &str) -> String {
    sha256(token.as_bytes()).iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A broker with the users `blue` and `red`, each with every right on its own names, and the shared token.
async fn broker() -> BrokerServer {
    let json = format!(
        r#"{{"users": [
            {{"name": "blue", "token_sha256": "{}", "grants": [{{"names": "blue.*", "rights": ["publish", "consume", "admin"]}}]}},
            {{"name": "red", "token_sha256": "{}", "grants": [{{"names": "red.*", "rights": ["publish", "consume", "admin"]}}]}}
        ]}}"#,
        hex(BLUE),
        hex(RED),
    );
    let mut config = ServerConfig::default();
    config.users = Some(Arc::new(Users::parse(&json).expect("a valid users file")));
    config.token = Some(OPERATOR.into());
    BrokerServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), config).await.expect("the broker starts")
}

async fn connect(server: &BrokerServer, token: &str) -> Result<Remote, Error> {
    Remote::connect(&format!("mqrpc://{token}@{}", server.local_addr())).await
}

fn oneway() -> Envelope {
    let mut envelope = Envelope::new(Kind::Oneway);
    envelope.method = "echo".into();
    envelope
}

/// A reply, as a worker would send one.
fn reply() -> Envelope {
    let mut envelope = Envelope::new(Kind::Reply);
    envelope.correlation_id = Some(uuid::Uuid::new_v4());
    envelope
}

/// A request to `Echo` whose reply is to go to `inbox`.
fn request_answered_at(inbox: &str) -> Envelope {
    let mut envelope = Envelope::new(Kind::Request);
    envelope.service = "Echo".into();
    envelope.method = "echo".into();
    envelope.correlation_id = Some(uuid::Uuid::new_v4());
    envelope.reply_to = Some(rpc_core::ReplyTo::Inbox(inbox.into()));
    envelope.body = rpc_core::codec::encode(&(1u64,)).expect("encodes");
    envelope
}

/// `Ok` when `result` is the `Forbidden` refusal naming `name`.
fn forbidden<T: std::fmt::Debug>(what: &str, name: &str, result: Result<T, Error>) -> Result<(), String> {
    match result {
        Err(Error::Forbidden(message)) if message.contains(name) => Ok(()),
        other => Err(format!("{what}: expected Forbidden naming `{name}`, got {other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_can_do_nothing_with_another_tenants_queues_topics_dead_letters_or_inboxes() {
    let server = broker().await;
    let blue = Arc::new(connect(&server, BLUE).await.expect("blue connects"));
    let red = Arc::new(connect(&server, RED).await.expect("red connects"));

    // Each tenant serves and calls its own service.
    let mut servers = Vec::new();
    for (tenant, transport) in [("blue", &blue), ("red", &red)] {
        let serving = Server::new(Arc::clone(transport))
            .namespace(tenant)
            .serve(EchoServer::new(EchoImpl))
            .await
            .unwrap_or_else(|error| panic!("{tenant} serves: {error}"));
        servers.push(serving);
    }
    let blue_client = Client::builder(Arc::clone(&blue)).namespace("blue").connect().await.expect("client");
    assert_eq!(EchoClient::new(&blue_client).echo(7).timeout(WAIT).await.expect("blue calls its own"), 7);
    let blue_inbox = blue.open_inbox().await.expect("blue opens an inbox");
    blue.publish("blue.Echo.dlq", oneway(), Confirm::Broker).await.expect("a dead letter of blue's");
    let before = server.stats().denied;

    // Every operation red tries on blue's names.
    let queue = "blue.Echo";
    let red_client = Client::builder(Arc::clone(&red)).namespace("blue").connect().await.expect("client");
    let mut refusals = vec![
        forbidden("call", queue, EchoClient::new(&red_client).echo(1).timeout(WAIT).await),
        forbidden("publish", queue, red.publish(queue, oneway(), Confirm::Broker).await),
        forbidden("consume", queue, red.consume(queue, ConsumeOptions::default()).await.map(drop)),
        forbidden("declare", "blue.Other", red.declare_queue("blue.Other", &QueueOptions::default()).await),
        forbidden("stats", queue, red.queue_stats(queue).await),
        forbidden("delete", queue, red.delete_queue(queue).await),
        forbidden(
            "read dead letters",
            "blue.Echo.dlq",
            red.consume("blue.Echo.dlq", ConsumeOptions::default()).await.map(drop),
        ),
        forbidden("replay a dead letter", queue, red.publish(queue, oneway(), Confirm::Broker).await),
        forbidden("broadcast", "blue.Echo.broadcast", red.publish_topic("blue.Echo.broadcast", oneway()).await),
        forbidden(
            "subscribe",
            "blue.Echo.broadcast",
            red.subscribe("blue.Echo.broadcast", "spy", ConsumeOptions::default()).await.map(drop),
        ),
        forbidden("ping's topic", "blue.Echo.ping", red.subscribe_private("blue.Echo.ping").await.map(drop)),
        forbidden(
            "read an inbox",
            &blue_inbox.address,
            red.consume(&blue_inbox.address, ConsumeOptions::default()).await.map(drop),
        ),
        forbidden(
            "answer on an inbox no request it holds names",
            &blue_inbox.address,
            red.publish(&blue_inbox.address, reply(), Confirm::Broker).await,
        ),
    ];
    let tried = refusals.len();
    // Blue's own queue listing shows its queues; red's shows none of blue's.
    let listed = red.list_queues().await.expect("red lists");
    refusals.push(if listed.iter().any(|(name, _)| name.starts_with("blue.")) {
        Err(format!("red's listing shows blue's queues: {listed:?}"))
    } else {
        Ok(())
    });
    let failures: Vec<String> = refusals.into_iter().filter_map(Result::err).collect();
    assert!(
        failures.is_empty(),
        "{} of {} cross-tenant operations were not refused:\n{}",
        failures.len(),
        tried + 1,
        failures.join("\n")
    );
    // The inbox refusal is not a right anybody could hold: every other one is counted as denied.
    assert_eq!(server.stats().denied - before, u64::try_from(tried - 1).expect("small"));
    assert!(blue.list_queues().await.expect("blue lists").iter().any(|(name, _)| name == queue));

    // Red's connection is still open and serves red; blue's queue and dead letters are untouched.
    let own = Client::builder(Arc::clone(&red)).namespace("red").connect().await.expect("client");
    assert_eq!(EchoClient::new(&own).echo(3).timeout(WAIT).await.expect("red calls its own"), 3);
    assert_eq!(blue.queue_stats("blue.Echo.dlq").await.expect("stats").ready, 1);
    assert_eq!(EchoClient::new(&blue_client).echo(8).timeout(WAIT).await.expect("blue still calls"), 8);
    drop(servers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tokens_are_refused_and_the_shared_token_may_do_everything() {
    let server = broker().await;
    for token in ["", "nobody", &BLUE[..BLUE.len() - 1], &format!("{BLUE}x")] {
        match connect(&server, token).await {
            Err(Error::Unauthorized(_)) => {}
            other => panic!("token `{token}`: expected Unauthorized, got {other:?}"),
        }
    }
    let operator = connect(&server, OPERATOR).await.expect("the shared token connects");
    for queue in ["blue.Jobs", "red.Jobs", "anything"] {
        operator.declare_queue(queue, &QueueOptions::default()).await.expect("declares anything");
        operator.publish(queue, oneway(), Confirm::Broker).await.expect("publishes anywhere");
        assert_eq!(operator.queue_stats(queue).await.expect("reads any stats").ready, 1);
        operator.delete_queue(queue).await.expect("deletes anything");
    }
    // A user's rights stop at its names, on the same connection that holds them.
    let blue = connect(&server, BLUE).await.expect("blue connects");
    blue.declare_queue("blue.Jobs", &QueueOptions::default()).await.expect("declared");
    blue.publish("blue.Jobs", oneway(), Confirm::Broker).await.expect("published");
    assert!(matches!(blue.publish("anything", oneway(), Confirm::Broker).await, Err(Error::Forbidden(_))));
    assert_eq!(blue.queue_stats("blue.Jobs").await.expect("stats").ready, 1);
}

/// A certificate authority for the mutual-TLS test, and certificates it signs.
struct Authority {
    certificate: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Authority {
    fn new(name: &str) -> Authority {
        let mut params = rcgen::CertificateParams::new(Vec::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().expect("a key");
        Authority { certificate: params.self_signed(&key).expect("a CA"), key }
    }

    /// A certificate for `name` (PEM), its key (PEM) and its DER bytes.
    fn sign(&self, name: &str, client: bool) -> (String, String, Vec<u8>) {
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().expect("a key");
        let certificate = params.signed_by(&key, &self.certificate, &self.key).expect("signed");
        (certificate.pem(), key.serialize_pem(), certificate.der().to_vec())
    }
}

/// With mutual TLS, a client's certificate is its user: `blue`'s certificate serves and calls `blue.*` and may
/// not touch `red.*`, whatever token it sends; a certificate the CA signed that no user has is refused at the
/// handshake, and a client without a certificate, or with one from another CA, does not get through TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mutual_tls_a_client_certificate_is_its_user() {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let authority = Authority::new("mqrpc test CA");
    let (server_pem, server_key, _) = authority.sign("localhost", false);
    let (blue_pem, blue_key, blue_der) = authority.sign("blue", true);
    let (stray_pem, stray_key, _) = authority.sign("stray", true);
    let (foreign_pem, foreign_key, foreign_der) = Authority::new("another CA").sign("blue", true);

    let json = format!(
        r#"{{"users": [
            {{"name": "blue", "cert_sha256": "{}", "grants": [{{"names": "blue.*", "rights": ["publish", "consume"]}}]}},
            {{"name": "foreign", "cert_sha256": "{}", "grants": [{{"names": "*", "rights": ["publish", "consume", "admin"]}}]}}
        ]}}"#,
        sha256(&blue_der).iter().map(|byte| format!("{byte:02x}")).collect::<String>(),
        sha256(&foreign_der).iter().map(|byte| format!("{byte:02x}")).collect::<String>(),
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(authority.certificate.der().to_vec())).expect("a root");
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build().expect("a verifier");
    let chain = vec![CertificateDer::from_pem_slice(server_pem.as_bytes()).expect("parses")];
    let key = PrivateKeyDer::from_pem_slice(server_key.as_bytes()).expect("parses");
    let tls = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("a TLS configuration");
    let mut config = ServerConfig::default();
    config.tls = Some(Arc::new(tls));
    config.users = Some(Arc::new(Users::parse(&json).expect("a valid users file")));
    let server = BrokerServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), config).await.expect("the broker starts");
    let url = format!("mqrpcs://localhost:{}", server.local_addr().port());
    let trusting =
        rpc_broker::RemoteOptions::new().tls_roots_pem(authority.certificate.pem().as_bytes()).expect("trusts the CA");
    let as_identity = |cert: &str, key: &str| trusting.clone().tls_client_pem(cert.as_bytes(), key.as_bytes());

    let blue = Arc::new(
        Remote::connect_with(&url, as_identity(&blue_pem, &blue_key).expect("an identity"))
            .await
            .expect("blue's certificate connects"),
    );
    let _serving =
        Server::new(Arc::clone(&blue)).namespace("blue").serve(EchoServer::new(EchoImpl)).await.expect("serves");
    let client = Client::builder(Arc::clone(&blue)).namespace("blue").connect().await.expect("client");
    assert_eq!(EchoClient::new(&client).echo(5).timeout(WAIT).await.expect("blue calls over mutual TLS"), 5);
    assert!(matches!(blue.publish("red.Echo", oneway(), Confirm::Broker).await, Err(Error::Forbidden(_))));
    assert!(matches!(blue.queue_stats("blue.Echo").await, Err(Error::Forbidden(_))), "blue has no admin right");

    // A certificate the CA signed that no user has: refused at the handshake.
    let stray = Remote::connect_with(&url, as_identity(&stray_pem, &stray_key).expect("an identity")).await;
    assert!(matches!(stray, Err(Error::Unauthorized(_))), "{stray:?}");
    // No certificate, or one from another CA (even one listed in the users file): TLS itself refuses.
    assert!(Remote::connect_with(&url, trusting.clone()).await.is_err());
    let foreign = Remote::connect_with(&url, as_identity(&foreign_pem, &foreign_key).expect("an identity")).await;
    assert!(foreign.is_err(), "a certificate from another CA got through: {foreign:?}");
}

/// The users file of a broker process is read again on SIGHUP: an open connection takes its user's new grants
/// with its next frame, a user taken out of the file can do nothing more, and a file that does not read leaves
/// the users as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_users_file_for_open_connections() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().expect("a directory");
    let path = dir.path().join("users.json");
    let file = |names: &[&str]| {
        let grants: Vec<String> = names
            .iter()
            .map(|names| format!(r#"{{"names": "{names}", "rights": ["publish", "consume", "admin"]}}"#))
            .collect();
        format!(
            r#"{{"users": [{{"name": "blue", "token_sha256": "{}", "grants": [{}]}}]}}"#,
            hex(BLUE),
            grants.join(", ")
        )
    };
    std::fs::write(&path, file(&["blue.*"])).expect("written");
    let mut process = tokio::process::Command::new(env!("CARGO_BIN_EXE_rpc-broker"))
        .args(["serve", "--listen", "127.0.0.1:0", "--users"])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary runs");
    let pid = process.id().expect("running");
    let mut lines = tokio::io::BufReader::new(process.stdout.take().expect("stdout")).lines();
    let mut next = async || tokio::time::timeout(WAIT, lines.next_line()).await.expect("prints").expect("reads");
    let listening = next().await.expect("a line");
    let broker = listening.strip_prefix("listening on ").expect("the broker's address first").to_owned();
    let blue = Remote::connect(&format!("mqrpc://{BLUE}@{broker}")).await.expect("blue connects");
    blue.declare_queue("blue.Jobs", &QueueOptions::default()).await.expect("its own queue");
    let green = blue.declare_queue("green.Jobs", &QueueOptions::default()).await;
    assert!(matches!(green, Err(Error::Forbidden(_))), "{green:?}");

    let hangup = |file: String| {
        std::fs::write(&path, file).expect("written");
        let sent = std::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status().expect("kill runs");
        assert!(sent.success());
    };
    // Granted `green.*` too: the same connection may use it once the broker has read the file.
    hangup(file(&["blue.*", "green.*"]));
    let reloaded = format!("users reloaded from {}: 1", path.display());
    assert_eq!(next().await, Some(reloaded));
    blue.declare_queue("green.Jobs", &QueueOptions::default()).await.expect("granted by the reloaded file");

    // A file that does not read: nothing changes.
    hangup("{ not json".to_owned());
    assert!(next().await.is_some_and(|line| line.starts_with("users not reloaded")));
    blue.publish("green.Jobs", oneway(), Confirm::Broker).await.expect("still granted");

    // Blue taken out of the file: its open connection can do nothing more, and its token no longer connects.
    hangup(r#"{"users": []}"#.to_owned());
    assert!(next().await.is_some_and(|line| line.ends_with(": 0")));
    let refused = blue.publish("blue.Jobs", oneway(), Confirm::Broker).await;
    assert!(matches!(refused, Err(Error::Forbidden(_))), "{refused:?}");
    let again = Remote::connect(&format!("mqrpc://{BLUE}@{broker}")).await;
    assert!(matches!(again, Err(Error::Unauthorized(_))), "{again:?}");
    process.kill().await.expect("stops");
}

/// A little generator of pseudo-random numbers (xorshift), seeded, so that a failure can be run again.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).expect("small")).expect("small")
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next().to_le_bytes()[0]).collect()
    }
}

/// What a raw connection gets back: `true` when the broker welcomed it.
async fn welcomed(address: SocketAddr, bytes: &[u8]) -> bool {
    use futures::StreamExt;
    use rpc_broker::protocol::{FrameCodec, ServerFrame};
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connects");
    // The broker may close before it has read everything: a failed write is a refusal too.
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
    let mut frames = tokio_util::codec::FramedRead::new(stream, FrameCodec::new(1024 * 1024));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        match tokio::time::timeout_at(deadline, frames.next()).await {
            Ok(Some(Ok(frame))) => {
                if matches!(ServerFrame::parse(frame), Ok(ServerFrame::Welcome { .. })) {
                    return true;
                }
            }
            // Closed, broken, or silent: not welcomed.
            _ => return false,
        }
    }
}

/// The handshake against random credentials, truncated and garbled handshakes: none gets in, and the broker
/// goes on serving its users. Seeded; the seed is in the failure message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_credentials_and_broken_handshakes_never_get_in() {
    use bytes::BytesMut;
    use rpc_broker::protocol::{ClientFrame, Frame, PROTOCOL_VERSION};
    let server = broker().await;
    let address = server.local_addr();
    let seed = 0x5eed_0a11_u64 ^ u64::from(std::process::id());
    let mut random = Random(seed | 1);
    let hello = |token: String| {
        let mut buf = BytesMut::new();
        ClientFrame::Hello { version: PROTOCOL_VERSION, token, name: "fuzz".into() }.encode(&mut buf);
        buf.to_vec()
    };
    let mut tried = 0;
    for round in 0..300 {
        let bytes = match round % 4 {
            // A random token: printable, or cut from a real one, or a real one with a byte changed.
            0 => hello(
                (0..random.below(80))
                    .map(|_| char::from(b' ' + u8::try_from(random.below(95)).expect("small")))
                    .collect(),
            ),
            1 => hello(BLUE[..random.below(BLUE.len())].to_owned()),
            2 => {
                let mut token = BLUE.as_bytes().to_vec();
                let at = random.below(token.len());
                token[at] = if token[at] == b'x' { b'y' } else { b'x' };
                hello(String::from_utf8(token).expect("ascii"))
            }
            // A real handshake cut short, or random bytes.
            _ if round % 8 == 3 => {
                let whole = hello(BLUE.to_owned());
                whole[..random.below(whole.len())].to_vec()
            }
            _ => {
                let n = random.below(64);
                random.bytes(n)
            }
        };
        tried += 1;
        assert!(!welcomed(address, &bytes).await, "seed {seed}, round {round}: welcomed {bytes:?}");
    }
    assert_eq!(tried, 300);
    // The broker goes on: blue still connects and works.
    let blue = connect(&server, BLUE).await.expect("blue connects");
    blue.declare_queue("blue.After", &QueueOptions::default()).await.expect("declares");
    assert!(server.stats().rejected >= 250, "{:?}", server.stats());
}

/// A worker that may only serve a queue retries the deliveries it holds there (a `Republish`), but cannot
/// publish a call of its own to it; a caller that may only publish cannot serve it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_a_queue_lets_a_worker_retry_what_it_holds_but_not_call() {
    const WORKER: &str = "worker-token-0123456789abcdef0123456789abcdef";
    const CALLER: &str = "caller-token-0123456789abcdef0123456789abcdef";
    let json = format!(
        r#"{{"users": [
            {{"name": "worker", "token_sha256": "{}", "grants": [{{"names": "jobs.*", "rights": ["consume"]}}]}},
            {{"name": "caller", "token_sha256": "{}", "grants": [{{"names": "jobs.*", "rights": ["publish"]}}]}}
        ]}}"#,
        hex(WORKER),
        hex(CALLER),
    );
    let mut config = ServerConfig::default();
    config.users = Some(Arc::new(Users::parse(&json).expect("a valid users file")));
    let server = BrokerServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), config).await.expect("the broker starts");
    let (worker, caller) =
        (connect(&server, WORKER).await.expect("connects"), connect(&server, CALLER).await.expect("connects"));
    worker.declare_queue("jobs.Q", &QueueOptions::default()).await.expect("the worker declares its queue");
    assert!(matches!(caller.consume("jobs.Q", ConsumeOptions::default()).await.map(drop), Err(Error::Forbidden(_))));
    assert!(matches!(worker.publish("jobs.Q", oneway(), Confirm::Broker).await, Err(Error::Forbidden(_))));
    caller.publish("jobs.Q", oneway(), Confirm::Broker).await.expect("the caller calls");
    let mut consumer = worker.consume("jobs.Q", ConsumeOptions::default()).await.expect("the worker serves");
    let first = tokio::time::timeout(WAIT, consumer.next()).await.expect("delivered").expect("open");
    let mut copy = rpc_core::Envelope::clone(&first.envelope);
    copy.attempt = 2;
    first.handle.republish("jobs.Q", copy).await.map_err(|(error, _)| error).expect("the retry goes back");
    let second = tokio::time::timeout(WAIT, consumer.next()).await.expect("delivered again").expect("open");
    assert_eq!(second.envelope.attempt, 2);
    second.handle.ack().await.expect("acked");
}

/// A worker's `Answer` goes only to the inbox its request names: a worker of red's that holds a request of
/// red's and answers it into blue's inbox has its reply dropped and counted as denied, and the request acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_goes_only_to_the_inbox_its_request_names() {
    use bytes::BytesMut;
    use futures::StreamExt;
    use rpc_broker::protocol::{ClientFrame, DEFAULT_MAX_FRAME, Frame, FrameCodec, PROTOCOL_VERSION, ServerFrame};
    use tokio::io::AsyncWriteExt;

    let server = broker().await;
    let blue = connect(&server, BLUE).await.expect("blue connects");
    let red = connect(&server, RED).await.expect("red connects");
    let blue_inbox = blue.open_inbox().await.expect("blue opens an inbox");
    let red_inbox = red.open_inbox().await.expect("red opens an inbox");

    // Red's worker, frame by frame.
    let stream = tokio::net::TcpStream::connect(server.local_addr()).await.expect("connects");
    let (read, mut write) = stream.into_split();
    let mut frames = tokio_util::codec::FramedRead::new(read, FrameCodec::new(DEFAULT_MAX_FRAME));
    let mut send = async |frame: ClientFrame| {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf);
        write.write_all(&buf).await.expect("sends");
    };
    let mut next = async || loop {
        let frame = tokio::time::timeout(WAIT, frames.next()).await.expect("in time").expect("open").expect("whole");
        match ServerFrame::parse(frame).expect("a frame") {
            ServerFrame::Ping => {}
            frame => return frame,
        }
    };
    send(ClientFrame::Hello { version: PROTOCOL_VERSION, token: RED.into(), name: "forger".into() }).await;
    assert!(matches!(next().await, ServerFrame::Welcome { .. }));
    send(ClientFrame::Declare {
        req: 1,
        queue: "red.Jobs".into(),
        max_len: None,
        max_deliveries: None,
        durable: false,
    })
    .await;
    assert!(matches!(next().await, ServerFrame::Ok { req: 1, .. }));
    send(ClientFrame::Consume { req: 2, queue: "red.Jobs".into(), prefetch: 1, auto_ack: false }).await;
    assert!(matches!(next().await, ServerFrame::Ok { req: 2, .. }));

    red.publish("red.Jobs", request_answered_at(&red_inbox.address), Confirm::Broker).await.expect("red calls");
    let ServerFrame::Deliver { consumer, tag, .. } = next().await else { panic!("a delivery") };
    let before = server.stats().denied;
    let payload = rpc_core::codec::encode_envelope(&reply()).expect("encodes");
    send(ClientFrame::Answer { consumer, tag, reply_to: blue_inbox.address.clone().into(), ttl_ms: None, payload })
        .await;
    // Frames are handled in order: once `Sync` is answered, the answer was.
    send(ClientFrame::Sync { req: 3 }).await;
    assert!(matches!(next().await, ServerFrame::Ok { req: 3, .. }));
    assert_eq!(server.stats().denied - before, 1, "the forged answer is counted");
    let stats = red.queue_stats("red.Jobs").await.expect("red reads its stats");
    assert_eq!((stats.ready, stats.unacked), (0, 0), "the request was acked");
    let queues = server.queues();
    let inbox = queues.iter().find(|(name, _)| *name == blue_inbox.address).map(|(_, stats)| stats.published);
    assert_eq!(inbox, Some(0), "blue's inbox got the forged reply");
}

/// A request may name as its reply address only an inbox its own connection opened: a caller without `admin`
/// on the queue that names another connection's inbox is refused, so no worker answers into it; with `admin`
/// (a replay of dead letters, whose callers' inboxes are not the replayer's) it goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_names_only_its_own_connections_inbox_unless_its_sender_is_an_admin() {
    const CALLER: &str = "caller-token-0123456789abcdef0123456789abc";
    let json = format!(
        r#"{{"users": [
            {{"name": "caller", "token_sha256": "{}", "grants": [{{"names": "jobs.*", "rights": ["publish", "consume"]}}]}},
            {{"name": "blue", "token_sha256": "{}", "grants": [{{"names": "jobs.*", "rights": ["publish", "consume", "admin"]}}]}}
        ]}}"#,
        hex(CALLER),
        hex(BLUE),
    );
    let mut config = ServerConfig::default();
    config.users = Some(Arc::new(Users::parse(&json).expect("a valid users file")));
    let server = BrokerServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), config).await.expect("the broker starts");
    let caller = connect(&server, CALLER).await.expect("the caller connects");
    let admin = connect(&server, BLUE).await.expect("the admin connects");
    caller.declare_queue("jobs.Echo", &QueueOptions::default()).await.expect("declares");
    let own = caller.open_inbox().await.expect("an inbox");
    let others = admin.open_inbox().await.expect("another connection's inbox");

    caller.publish("jobs.Echo", request_answered_at(&own.address), Confirm::Broker).await.expect("its own inbox");
    let before = server.stats().denied;
    let forged = caller.publish("jobs.Echo", request_answered_at(&others.address), Confirm::Broker).await;
    forbidden("name another's inbox", &others.address, forged).expect("refused");
    assert_eq!(server.stats().denied - before, 1);
    admin.publish("jobs.Echo", request_answered_at(&own.address), Confirm::Broker).await.expect("an admin replays");
    let stats = admin.queue_stats("jobs.Echo").await.expect("stats");
    assert_eq!(stats.ready, 2, "the caller's own request and the replay");
}
