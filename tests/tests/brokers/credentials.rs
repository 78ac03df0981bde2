//! Credentials and TLS on the brokers users run, given through each adapter's own options: a RabbitMQ user of
//! its own virtual host (over AMQP and over STOMP) and `amqps://` with client certificates on a RabbitMQ node of
//! the test's own; NATS users with passwords and NKeys, a least-privilege user (only its own subjects), tokens,
//! and TLS with client certificates, each on a private nats-server with a configuration of its own; a Redis with
//! a password and an ACL user limited to its own keys, and one that takes only TLS with client certificates; an ActiveMQ of the test's own that requires a STOMP
//! login; a Kafka (tansu) behind a TLS terminator that verifies client certificates. The right credential serves and answers calls; a wrong
//! or missing one is refused with `Unauthorized` (or, for TLS, a connection error), and no secret appears in an
//! error or a `Debug`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rpc_broker::adapter::amqp::{Amqp, AmqpOptions};
use rpc_broker::adapter::kafka::{Kafka, KafkaOptions};
use rpc_broker::adapter::nats::{Nats, NatsAuth, NatsOptions, NatsTls};
use rpc_broker::adapter::redis_dedup::RedisDedup;
use rpc_broker::adapter::redis_streams::{RedisStreams, RedisStreamsOptions, RedisTls};
use rpc_broker::adapter::stomp::Stomp;
use rpc_core::transport::Transport;
use rpc_core::{Client, Error, Server};
use uuid::Uuid;

use crate::WAIT;

#[rpc_core::service]
trait Adder {
    /// `a + b`.
    async fn add(&self, a: i64, b: i64) -> i64;
}

struct Add;

impl Adder for Add {
    async fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }
}

/// Serves `Adder` in `namespace` on `worker` and calls it through `caller`.
async fn call_through(worker: Arc<dyn Transport>, caller: Arc<dyn Transport>, namespace: &str) -> i64 {
    let server = Server::new(worker).namespace(namespace).serve(AdderServer::new(Add)).await.expect("serves");
    let client = Client::builder(caller).namespace(namespace).connect().await.expect("client");
    let sum = AdderClient::new(&client).add(2, 3).timeout(WAIT).await.expect("answered");
    server.shutdown(Duration::from_secs(5)).await;
    sum
}

/// Asserts that `result` is a refusal that names none of `secrets`.
fn refused<T>(result: Result<T, Error>, secrets: &[&str]) -> Error {
    let Err(error) = result else { panic!("connected with a wrong credential") };
    let text = format!("{error} {error:?}");
    for secret in secrets {
        assert!(!text.contains(secret), "the error shows a secret: {text}");
    }
    error
}

/// A server process of the test's own on a port of its own, with the directory it keeps its files in; killed
/// when dropped.
struct PrivateServer {
    child: Child,
    port: u16,
    _directory: tempfile::TempDir,
}

impl PrivateServer {
    /// Spawns `command` (named `what`), its output dropped, and waits up to 20 s for it to listen on `port`;
    /// fails if it exits first.
    fn spawn(mut command: Command, port: u16, directory: tempfile::TempDir, what: &str) -> PrivateServer {
        let child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("the server runs");
        let mut server = PrivateServer { child, port, _directory: directory };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(server.child.try_wait().expect("polls").is_none(), "{what} exited: is its configuration right?");
            assert!(Instant::now() < deadline, "{what} did not listen within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- RabbitMQ --------------------------------------------------------------------------------------------------

/// `rabbitmqctl` with `args`, which must succeed.
fn rabbitmqctl(args: &[&str]) -> String {
    let command = mqrpc_tests::required_url("MQRPC_AMQP_CTL");
    let output = Command::new(&command).args(args).output().expect("rabbitmqctl runs");
    assert!(output.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `host:port` of a URL such as `amqp://user:password@host:port/vhost`.
fn address_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    authority.rsplit_once('@').map_or(authority, |(_, address)| address).to_owned()
}

/// A virtual host and users made for one test, deleted when it ends.
struct RabbitTenant {
    vhost: String,
    users: Vec<String>,
}

impl Drop for RabbitTenant {
    fn drop(&mut self) {
        let command = std::env::var("MQRPC_AMQP_CTL").unwrap_or_default();
        let _ = Command::new(&command).args(["delete_vhost", &self.vhost]).output();
        for user in &self.users {
            let _ = Command::new(&command).args(["delete_user", user]).output();
        }
    }
}

/// A RabbitMQ user with every right on a virtual host of its own serves and calls there, over AMQP and over
/// STOMP, and its queues are made in that virtual host only; a wrong password, a user without rights on the
/// virtual host and a user that may only read are refused, typed, without the password in the error.
#[tokio::test]
#[cfg_attr(
    not(all(mqrpc_amqp, mqrpc_amqp_ctl, mqrpc_stomp_rabbit)),
    ignore = "needs RabbitMQ and its control command: MQRPC_AMQP_URL, MQRPC_AMQP_CTL, MQRPC_STOMP_RABBIT_URL \
              (bash .ci/brokers)"
)]
async fn rabbitmq_user_of_its_own_vhost() {
    let amqp = address_of(&mqrpc_tests::required_url("MQRPC_AMQP_URL"));
    let stomp = address_of(&mqrpc_tests::required_url("MQRPC_STOMP_RABBIT_URL"));
    let id = Uuid::new_v4().simple().to_string();
    let tenant = RabbitTenant {
        vhost: format!("mqrpc-tenant-{}", &id[..8]),
        users: vec![format!("mqrpc-owner-{}", &id[..8]), format!("mqrpc-reader-{}", &id[..8])],
    };
    let (owner, reader) = (&tenant.users[0], &tenant.users[1]);
    let (password, reader_password) = (format!("pw-{id}"), format!("rpw-{id}"));
    rabbitmqctl(&["add_vhost", &tenant.vhost]);
    rabbitmqctl(&["add_user", owner, &password]);
    rabbitmqctl(&["add_user", reader, &reader_password]);
    rabbitmqctl(&["set_permissions", "-p", &tenant.vhost, owner, ".*", ".*", ".*"]);
    rabbitmqctl(&["set_permissions", "-p", &tenant.vhost, reader, "^$", "^$", ".*"]);

    let url = format!("amqp://{owner}:{password}@{amqp}/{}", tenant.vhost);
    let worker = Amqp::connect(&url).await.expect("the owner connects");
    assert!(!format!("{worker:?}").contains(&password), "Debug shows the password: {worker:?}");
    let worker: Arc<dyn Transport> = Arc::new(worker);
    let caller: Arc<dyn Transport> = Arc::new(Amqp::connect(&url).await.expect("the owner connects"));
    assert_eq!(call_through(worker, caller, "tenant").await, 5);
    let queues = rabbitmqctl(&["list_queues", "-q", "-p", &tenant.vhost, "name"]);
    assert!(queues.lines().any(|queue| queue.trim() == "tenant.Adder"), "the tenant's queues: {queues}");
    let elsewhere = rabbitmqctl(&["list_queues", "-q", "-p", "/", "name"]);
    assert!(!elsewhere.lines().any(|queue| queue.trim() == "tenant.Adder"), "made in `/` too: {elsewhere}");

    // Over STOMP, the virtual host is the URL's path.
    let stomp_url = format!("stomp://{owner}:{password}@{stomp}/{}", tenant.vhost);
    let worker: Arc<dyn Transport> = Arc::new(Stomp::connect(&stomp_url).await.expect("the owner connects"));
    let caller: Arc<dyn Transport> = Arc::new(Stomp::connect(&stomp_url).await.expect("the owner connects"));
    assert_eq!(call_through(worker, caller, "stomptenant").await, 5);
    let wrong = Stomp::connect(&format!("stomp://{owner}:not-{password}@{stomp}/{}", tenant.vhost)).await;
    let error = refused(wrong, &[&password]);
    assert!(matches!(error, Error::Unauthorized(_)), "{error:?}");

    let wrong = Amqp::connect(&format!("amqp://{owner}:not-{password}@{amqp}/{}", tenant.vhost)).await;
    let error = refused(wrong, &[&password]);
    assert!(matches!(error, Error::Unauthorized(_)), "{error:?}");
    // The owner has no rights on `/`.
    let elsewhere = Amqp::connect(&format!("amqp://{owner}:{password}@{amqp}/%2f")).await;
    let error = refused(elsewhere, &[&password]);
    assert!(matches!(error, Error::Unauthorized(_)), "{error:?}");
    // The reader connects but may not declare (serve) or publish (call).
    let reader_url = format!("amqp://{reader}:{reader_password}@{amqp}/{}", tenant.vhost);
    let transport: Arc<dyn Transport> = Arc::new(Amqp::connect(&reader_url).await.expect("the reader connects"));
    let serving = Server::new(Arc::clone(&transport)).namespace("readonly").serve(AdderServer::new(Add)).await;
    let error = refused(serving, &[&reader_password]);
    assert!(matches!(error, Error::Unauthorized(_) | Error::Forbidden(_)), "{error:?}");
}

/// A RabbitMQ node of the test's own with a TLS listener that verifies client certificates: a client that
/// trusts the node's authority and presents a certificate it signed serves and calls over `amqps://`; one
/// without a client certificate, one that does not trust the node's authority and one with a wrong password are
/// refused, and neither an error nor the options' `Debug` shows the key or the password.
#[tokio::test]
#[cfg_attr(not(mqrpc_rabbitmq_bin), ignore = "needs RabbitMQ's own scripts: MQRPC_RABBITMQ_BIN (bash .ci/brokers)")]
async fn rabbitmq_amqps_with_client_certificates() {
    let certificates = tempfile::tempdir().expect("a directory");
    let Issued { ca_file, server: (server_certificate, server_key), client: (client_certificate, client_key) } =
        Issued::in_directory(certificates.path());
    let tls_port = mqrpc_tests::free_port();
    let configuration = format!(
        "listeners.ssl.default = 127.0.0.1:{tls_port}\nssl_options.cacertfile = {}\nssl_options.certfile = {}\n\
         ssl_options.keyfile = {}\nssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true",
        ca_file.display(),
        server_certificate.display(),
        server_key.display()
    );
    let _node =
        mqrpc_tests::rabbit::RabbitNodes::start(&mqrpc_tests::required_url("MQRPC_RABBITMQ_BIN"), 1, &configuration);
    let url = format!("amqps://guest:guest@127.0.0.1:{tls_port}/%2f");
    let read = |path: &Path| std::fs::read(path).expect("reads");
    let (ca, certificate, key) = (read(&ca_file), read(&client_certificate), read(&client_key));
    let trusted = AmqpOptions::new().tls_roots_pem(&ca).expect("a certificate");
    let with_certificate = trusted.clone().tls_client_pem(&certificate, &key).expect("a certificate and a key");
    let key_text = String::from_utf8_lossy(&key).into_owned();
    let body = key_text.lines().nth(1).expect("the key's first line");
    assert!(!format!("{with_certificate:?}").contains(body), "Debug shows the key: {with_certificate:?}");

    let worker: Arc<dyn Transport> =
        Arc::new(Amqp::connect_with(&url, with_certificate.clone()).await.expect("connects with its certificate"));
    let caller: Arc<dyn Transport> =
        Arc::new(Amqp::connect_with(&url, with_certificate.clone()).await.expect("connects with its certificate"));
    assert_eq!(call_through(worker, caller, "amqps").await, 5);

    let other = Authority::new();
    let refusals = [
        ("no client certificate", url.clone(), trusted),
        (
            "a node it does not trust",
            url.clone(),
            AmqpOptions::new()
                .tls_roots_pem(other.certificate.pem().as_bytes())
                .and_then(|options| options.tls_client_pem(&certificate, &key))
                .expect("a certificate and a key"),
        ),
        ("a wrong password", url.replace("guest:guest", "guest:not-guest"), with_certificate),
    ];
    for (case, url, options) in refusals {
        let attempt = tokio::time::timeout(WAIT, Amqp::connect_with(&url, options)).await.expect("refused in time");
        let error = refused(attempt, &["not-guest", body]);
        if case == "a wrong password" {
            assert!(matches!(error, Error::Unauthorized(_)), "{case}: {error:?}");
        }
    }
    let no_certificate = AmqpOptions::new().tls_roots_pem(b"not a certificate");
    assert!(matches!(no_certificate, Err(Error::InvalidArgument(_))), "{no_certificate:?}");
    let no_key = AmqpOptions::new().tls_client_pem(&certificate, b"not a key");
    assert!(matches!(no_key, Err(Error::InvalidArgument(_))), "{no_key:?}");
}

/// An ActiveMQ that requires a login (its simple authentication plugin, anonymous access off): the STOMP login
/// and passcode in the URL serve and call; a wrong passcode and no login at all are refused with
/// `Unauthorized`, and no error shows the passcode.
#[tokio::test]
#[cfg_attr(not(mqrpc_activemq), ignore = "needs the activemq command: MQRPC_ACTIVEMQ (bash .ci/brokers)")]
async fn activemq_stomp_login() {
    let passcode = format!("pc-{}", Uuid::new_v4().simple());
    let plugins = format!(
        "<simpleAuthenticationPlugin anonymousAccessAllowed=\"false\"><users><authenticationUser \
         username=\"tenant\" password=\"{passcode}\" groups=\"tenants\"/></users></simpleAuthenticationPlugin>"
    );
    let server = mqrpc_tests::activemq::PrivateActiveMq::start_with(&plugins, Some(("tenant", &passcode)));
    let address = address_of(&server.url());
    let url = format!("stomp://tenant:{passcode}@{address}/");
    let worker: Arc<dyn Transport> = Arc::new(Stomp::connect(&url).await.expect("the tenant connects"));
    let caller: Arc<dyn Transport> = Arc::new(Stomp::connect(&url).await.expect("the tenant connects"));
    assert_eq!(call_through(worker, caller, "amqlogin").await, 5);

    let wrong = Stomp::connect(&format!("stomp://tenant:not-{passcode}@{address}/")).await;
    let error = refused(wrong, &[&passcode]);
    assert!(matches!(error, Error::Unauthorized(_)), "{error:?}");
    let anonymous = Stomp::connect(&format!("stomp://{address}/")).await;
    let error = refused(anonymous, &[&passcode]);
    assert!(matches!(error, Error::Unauthorized(_)), "{error:?}");
}

// ---- NATS ------------------------------------------------------------------------------------------------------

/// Starts a nats-server of the test's own with `configuration` (which has `PORT` where its port goes).
fn private_nats(configuration: &str, directory: tempfile::TempDir) -> PrivateServer {
    let port = mqrpc_tests::free_port();
    let file = directory.path().join("nats.conf");
    std::fs::write(&file, configuration.replace("PORT", &port.to_string())).expect("writes the configuration");
    let mut command = Command::new(mqrpc_tests::required_url("MQRPC_NATS_SERVER"));
    command.arg("-c").arg(&file);
    PrivateServer::spawn(command, port, directory, "nats-server")
}

fn nats_url(server: &PrivateServer) -> String {
    format!("nats://127.0.0.1:{}", server.port)
}

async fn nats(url: &str, options: NatsOptions) -> Result<Arc<dyn Transport>, Error> {
    Ok(Arc::new(Nats::connect_with(url, options).await?))
}

/// Users with passwords and an NKey user: each serves or calls with its own credential; a least-privilege
/// user allowed only its namespace's subjects, the inboxes and the service API serves and calls there; a wrong
/// password, a missing credential and an NKey the server does not know are refused with `Unauthorized`.
#[tokio::test]
#[cfg_attr(not(mqrpc_nats_server), ignore = "needs a nats-server binary: MQRPC_NATS_SERVER (bash .ci/brokers)")]
async fn nats_users_passwords_and_nkeys() {
    let key = nkeys::KeyPair::new_user();
    let seed = key.seed().expect("a seed");
    let stranger = nkeys::KeyPair::new_user().seed().expect("a seed");
    let configuration = format!(
        r#"listen: "127.0.0.1:PORT"
authorization {{
  users = [
    {{ user: "operator", password: "operator-secret" }}
    {{ user: "alpha", password: "alpha-secret",
       permissions: {{
         publish: ["alpha.>", "_INBOX.>", "$SRV.>"]
         subscribe: ["alpha.>", "_INBOX.>", "$SRV.>"]
       }} }}
    {{ nkey: "{}" }}
  ]
}}
"#,
        key.public_key()
    );
    let server = private_nats(&configuration, tempfile::tempdir().expect("a directory"));
    let url = nats_url(&server);
    let password = |user: &str, password: &str| {
        NatsOptions::new().auth(NatsAuth::UserPassword { user: user.into(), password: password.into() })
    };

    // An NKey user calls a service an operator serves.
    let worker = nats(&url, password("operator", "operator-secret")).await.expect("the operator connects");
    let with_key = NatsOptions::new().auth(NatsAuth::NKey(seed.clone()));
    assert!(!format!("{with_key:?}").contains(&seed), "Debug shows the seed: {with_key:?}");
    let caller = nats(&url, with_key).await.expect("the NKey user connects");
    assert_eq!(call_through(worker, caller, "beta").await, 5);

    // The least-privilege user serves and calls in its own namespace.
    let alpha = password("alpha", "alpha-secret");
    assert!(!format!("{alpha:?}").contains("alpha-secret"), "Debug shows the password: {alpha:?}");
    let worker = nats(&url, alpha.clone()).await.expect("alpha connects");
    let caller = nats(&url, alpha).await.expect("alpha connects");
    assert_eq!(call_through(worker, caller, "alpha").await, 5);

    for (options, secret) in [
        (password("alpha", "not-alpha-secret"), "not-alpha-secret"),
        (NatsOptions::new(), "-"),
        (NatsOptions::new().auth(NatsAuth::NKey(stranger.clone())), stranger.as_str()),
    ] {
        let error = refused(nats(&url, options).await, &[secret]);
        assert!(matches!(error, Error::Unauthorized(_)), "{error:?}");
    }
}

/// A server that takes a token: the token serves and calls, a wrong one is refused with `Unauthorized`.
#[tokio::test]
#[cfg_attr(not(mqrpc_nats_server), ignore = "needs a nats-server binary: MQRPC_NATS_SERVER (bash .ci/brokers)")]
async fn nats_token() {
    let token = format!("token-{}", Uuid::new_v4().simple());
    let configuration = format!("listen: \"127.0.0.1:PORT\"\nauthorization {{ token: \"{token}\" }}\n");
    let server = private_nats(&configuration, tempfile::tempdir().expect("a directory"));
    let with_token = NatsOptions::new().auth(NatsAuth::Token(token.clone()));
    assert!(!format!("{with_token:?}").contains(&token), "Debug shows the token: {with_token:?}");
    let worker = nats(&nats_url(&server), with_token.clone()).await.expect("connects");
    let caller = nats(&nats_url(&server), with_token).await.expect("connects");
    assert_eq!(call_through(worker, caller, "tokens").await, 5);
    let wrong = nats(&nats_url(&server), NatsOptions::new().auth(NatsAuth::Token(format!("not-{token}")))).await;
    let error = refused(wrong, &[&token]);
    assert!(matches!(error, Error::Unauthorized(_)), "{error:?}");
}

/// A certificate authority of the test's own, which signs the server's and the clients' certificates.
struct Authority {
    certificate: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Authority {
    fn new() -> Authority {
        let mut params = rcgen::CertificateParams::new(Vec::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "mqrpc test authority");
        let key = rcgen::KeyPair::generate().expect("a key");
        Authority { certificate: params.self_signed(&key).expect("a CA"), key }
    }

    /// Writes a certificate for `name` signed by this authority, and its key, as `<stem>.pem` and
    /// `<stem>.key` in `directory`.
    fn issue(&self, directory: &Path, stem: &str, name: &str, client: bool) -> (PathBuf, PathBuf) {
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().expect("a key");
        let certificate = params.signed_by(&key, &self.certificate, &self.key).expect("signed");
        let (certificate_file, key_file) =
            (directory.join(format!("{stem}.pem")), directory.join(format!("{stem}.key")));
        std::fs::write(&certificate_file, certificate.pem()).expect("writes");
        std::fs::write(&key_file, key.serialize_pem()).expect("writes");
        (certificate_file, key_file)
    }
}

/// An authority's certificate (`ca.pem`), a server certificate for 127.0.0.1 and a client certificate it signed,
/// with their keys, written into a directory.
struct Issued {
    ca_file: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
}

impl Issued {
    fn in_directory(directory: &Path) -> Issued {
        let authority = Authority::new();
        let ca_file = directory.join("ca.pem");
        std::fs::write(&ca_file, authority.certificate.pem()).expect("writes");
        let server = authority.issue(directory, "server", "127.0.0.1", false);
        let client = authority.issue(directory, "client", "worker-1", true);
        Issued { ca_file, server, client }
    }
}

/// A server that requires TLS and verifies client certificates: a client that trusts the server's authority
/// and presents a certificate it signed serves and calls; one without a client certificate, one that does not
/// trust the server's authority, and one without TLS are refused.
#[tokio::test]
#[cfg_attr(not(mqrpc_nats_server), ignore = "needs a nats-server binary: MQRPC_NATS_SERVER (bash .ci/brokers)")]
async fn nats_tls_with_client_certificates() {
    let directory = tempfile::tempdir().expect("a directory");
    let Issued { ca_file, server: (server_certificate, server_key), client: (client_certificate, client_key) } =
        Issued::in_directory(directory.path());
    let other = Authority::new();
    let other_ca = directory.path().join("other-ca.pem");
    std::fs::write(&other_ca, other.certificate.pem()).expect("writes");
    let configuration = format!(
        "listen: \"127.0.0.1:PORT\"\ntls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: \
         true\n  timeout: 2\n}}\n",
        server_certificate.display(),
        server_key.display(),
        ca_file.display()
    );
    let server = private_nats(&configuration, directory);
    let url = nats_url(&server);
    let tls = NatsTls::new().root_certificates(&ca_file);

    let with_certificate = NatsOptions::new().tls(tls.clone().client_certificate(&client_certificate, &client_key));
    let worker = nats(&url, with_certificate.clone()).await.expect("connects with its certificate");
    let caller = nats(&url, with_certificate).await.expect("connects with its certificate");
    assert_eq!(call_through(worker, caller, "tls").await, 5);

    let refusals = [
        ("no client certificate", NatsOptions::new().tls(tls)),
        (
            "a server it does not trust",
            NatsOptions::new()
                .tls(NatsTls::new().root_certificates(&other_ca).client_certificate(&client_certificate, &client_key)),
        ),
        ("no TLS", NatsOptions::new()),
    ];
    for (case, options) in refusals {
        let attempt = tokio::time::timeout(WAIT, nats(&url, options)).await.expect("refused in time");
        assert!(attempt.is_err(), "{case}: connected");
    }
}

// ---- Redis -----------------------------------------------------------------------------------------------------

/// Starts a redis-server of the test's own, without persistence, with `arguments` (configuration directives).
fn private_redis(arguments: &[&str]) -> PrivateServer {
    let port = mqrpc_tests::free_port();
    let mut all = vec!["--port".to_owned(), port.to_string()];
    all.extend(arguments.iter().map(|argument| (*argument).to_owned()));
    private_redis_on(port, &all)
}

/// Starts a redis-server of the test's own, without persistence, with `arguments`, which make it listen on
/// `port`.
fn private_redis_on(port: u16, arguments: &[String]) -> PrivateServer {
    let directory = tempfile::tempdir().expect("a directory");
    let mut command = Command::new(mqrpc_tests::required_url("MQRPC_REDIS_SERVER"));
    command.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]).arg("--dir").arg(directory.path());
    command.args(arguments);
    PrivateServer::spawn(command, port, directory, "redis-server")
}

/// The URL of `server` with `user` and `password` (an empty user is Redis's `default`).
fn redis_url(server: &PrivateServer, user: &str, password: &str) -> String {
    format!("redis://{user}:{password}@127.0.0.1:{}", server.port)
}

async fn redis(url: &str, options: RedisStreamsOptions) -> Result<Arc<dyn Transport>, Error> {
    Ok(Arc::new(RedisStreams::connect_with(url, options).await?))
}

/// A Redis with a password for its default user and an ACL user allowed only the keys under `tenant:`: the
/// password serves and calls; the ACL user serves and calls with its keys under its prefix, and is refused with
/// `Forbidden` under the default prefix; a wrong password is `Unauthorized`, for the transport and for the
/// dedup store; no error shows a password.
#[tokio::test]
#[cfg_attr(not(mqrpc_redis_server), ignore = "needs a redis-server binary: MQRPC_REDIS_SERVER (bash .ci/brokers)")]
async fn redis_password_and_an_acl_user_of_its_own_keys() {
    let server = private_redis(&[
        "--requirepass",
        "default-secret",
        "--user",
        "tenant",
        "on",
        ">tenant-secret",
        "~tenant:*",
        "&*",
        "+@all",
    ]);
    let operator = redis_url(&server, "", "default-secret");
    let worker = redis(&operator, RedisStreamsOptions::new()).await.expect("the default user connects");
    let caller = redis(&operator, RedisStreamsOptions::new()).await.expect("the default user connects");
    assert_eq!(call_through(worker, caller, "redis").await, 5);

    let tenant = redis_url(&server, "tenant", "tenant-secret");
    let own_keys = || RedisStreamsOptions::new().prefix("tenant:");
    let worker = redis(&tenant, own_keys()).await.expect("the tenant connects");
    let caller = redis(&tenant, own_keys()).await.expect("the tenant connects");
    assert_eq!(call_through(worker, caller, "tenant").await, 5);

    // Under the default prefix every key is another's: the client's inbox is refused.
    let elsewhere = redis(&tenant, RedisStreamsOptions::new()).await.expect("the tenant connects");
    let error = refused(Client::builder(elsewhere).connect().await, &["tenant-secret"]);
    assert!(matches!(error, Error::Forbidden(_)), "{error:?}");

    for url in [redis_url(&server, "", "not-the-secret"), redis_url(&server, "tenant", "default-secret")] {
        let error = refused(redis(&url, RedisStreamsOptions::new()).await, &["not-the-secret", "default-secret"]);
        assert!(matches!(error, Error::Unauthorized(_)), "{error:?}");
        let error = refused(RedisDedup::connect(&url).await, &["not-the-secret", "default-secret"]);
        assert!(matches!(error, Error::Unauthorized(_)), "{error:?}");
    }
}

/// A Redis that takes only TLS and verifies client certificates (`tls-auth-clients yes`), with a password: a
/// client that trusts its authority and presents a certificate it signed serves and calls, and so does the dedup
/// store; one without a client certificate, one that does not trust the server's authority and one without TLS
/// are refused at once with the address and the cause; TLS settings with a `redis://` URL are an `InvalidArgument`; no error or `Debug` shows the key or
/// the password.
#[tokio::test]
#[cfg_attr(not(mqrpc_redis_server), ignore = "needs a redis-server binary: MQRPC_REDIS_SERVER (bash .ci/brokers)")]
async fn redis_tls_with_client_certificates() {
    let certificates = tempfile::tempdir().expect("a directory");
    let Issued { ca_file, server: (server_certificate, server_key), client: (client_certificate, client_key) } =
        Issued::in_directory(certificates.path());
    let port = mqrpc_tests::free_port();
    let path = |path: &Path| path.display().to_string();
    let arguments = [
        "--port".to_owned(),
        "0".to_owned(),
        "--tls-port".to_owned(),
        port.to_string(),
        "--tls-cert-file".to_owned(),
        path(&server_certificate),
        "--tls-key-file".to_owned(),
        path(&server_key),
        "--tls-ca-cert-file".to_owned(),
        path(&ca_file),
        "--tls-auth-clients".to_owned(),
        "yes".to_owned(),
        "--requirepass".to_owned(),
        "tls-secret".to_owned(),
    ];
    let _server = private_redis_on(port, &arguments);
    let url = format!("rediss://:tls-secret@127.0.0.1:{port}");
    let read = |path: &Path| std::fs::read(path).expect("reads");
    let (ca, certificate, key) = (read(&ca_file), read(&client_certificate), read(&client_key));
    let trusted = RedisTls::new().roots_pem(&ca).expect("a certificate");
    let with_certificate = trusted.clone().client_pem(&certificate, &key).expect("a certificate and a key");
    let key_text = String::from_utf8_lossy(&key).into_owned();
    let body = key_text.lines().nth(1).expect("the key's first line");
    assert!(!format!("{with_certificate:?}").contains(body), "Debug shows the key: {with_certificate:?}");

    let options = || RedisStreamsOptions::new().tls(with_certificate.clone());
    let worker = redis(&url, options()).await.expect("connects with its certificate");
    let caller = redis(&url, options()).await.expect("connects with its certificate");
    assert_eq!(call_through(worker, caller, "redis-tls").await, 5);
    RedisDedup::connect_with_tls(&url, &with_certificate).await.expect("the dedup store connects with its certificate");

    let other = Authority::new();
    let untrusting = RedisTls::new()
        .roots_pem(other.certificate.pem().as_bytes())
        .and_then(|tls| tls.client_pem(&certificate, &key))
        .expect("a certificate and a key");
    let plain = format!("redis://:tls-secret@127.0.0.1:{port}");
    let refusals = [
        ("no client certificate", url.clone(), trusted),
        ("a server it does not trust", url.clone(), untrusting),
        ("no TLS", plain.clone(), RedisTls::new()),
    ];
    for (case, url, tls) in refusals {
        let attempt = tokio::time::timeout(WAIT, redis(&url, RedisStreamsOptions::new().tls(tls.clone())))
            .await
            .unwrap_or_else(|_| panic!("{case}: not refused in time"));
        let transport = refused(attempt, &["tls-secret", body]);
        let attempt = tokio::time::timeout(WAIT, RedisDedup::connect_with_tls(&url, &tls))
            .await
            .unwrap_or_else(|_| panic!("{case}: the dedup store not refused in time"));
        let dedup = refused(attempt, &["tls-secret", body]);
        for error in [transport, dedup] {
            let named =
                matches!(&error, Error::Transport(cause) if cause.to_string().contains(&format!("127.0.0.1:{port}")));
            assert!(named, "{case}: not a transport error naming the address: {error:?}");
        }
    }
    let mismatched = redis(&plain, options()).await;
    assert!(matches!(refused(mismatched, &["tls-secret"]), Error::InvalidArgument(_)), "TLS settings with redis://");
    let no_certificate = RedisTls::new().roots_pem(b"not a certificate");
    assert!(matches!(no_certificate, Err(Error::InvalidArgument(_))), "{no_certificate:?}");
    let no_key = RedisTls::new().client_pem(&certificate, b"not a key");
    assert!(matches!(no_key, Err(Error::InvalidArgument(_))), "{no_key:?}");
}

// ---- Kafka -----------------------------------------------------------------------------------------------------

/// A TLS terminator in front of a broker that speaks plain TCP on loopback: it takes TLS on its own port,
/// requires a client certificate its authority signed, and relays the bytes to the broker's port. What a
/// Kafka with an `SSL` listener is to its clients, for a broker (tansu 0.6) that has none.
struct TlsTerminator {
    task: tokio::task::JoinHandle<()>,
}

impl TlsTerminator {
    /// Serves `listener` with the certificate and key in `certificate` and `key`, verifying clients against the
    /// authority in `client_ca`, relaying to 127.0.0.1:`target`.
    fn start(listener: tokio::net::TcpListener, certificate: &Path, key: &Path, client_ca: &Path, target: u16) -> Self {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for authority in CertificateDer::pem_file_iter(client_ca).expect("reads") {
            roots.add(authority.expect("a certificate")).expect("a root");
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .expect("a verifier");
        let chain = CertificateDer::pem_file_iter(certificate).expect("reads").map(|c| c.expect("a certificate"));
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.collect(), PrivateKeyDer::from_pem_file(key).expect("a key"))
            .expect("a server configuration");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A refused handshake ends the connection, as the broker's own TLS listener would.
                    let Ok(mut tls) = acceptor.accept(socket).await else { return };
                    if let Ok(mut broker) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
                    }
                });
            }
        });
        TlsTerminator { task }
    }
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Kafka over TLS with client certificates, through librdkafka's own properties (`security.protocol=SSL`, the
/// authority and the client's certificate and key as PEM): a worker and a client that present a certificate
/// the listener's authority signed serve and call; one without a client certificate and one that does not
/// trust the listener's authority are refused; `Debug` shows no key. tansu 0.6 has no TLS listener of its own
/// (its `--cert` is read and never used), so the listener is a TLS terminator in front of a private tansu that
/// advertises the terminator's port, as a Kafka's `SSL` listener is in front of its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mqrpc_tansu), ignore = "needs a tansu binary: MQRPC_TANSU (bash .ci/brokers)")]
async fn kafka_tls_with_client_certificates() {
    let certificates = tempfile::tempdir().expect("a directory");
    let Issued { ca_file, server: (server_certificate, server_key), client: (client_certificate, client_key) } =
        Issued::in_directory(certificates.path());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let port = listener.local_addr().expect("an address").port();
    let tansu = mqrpc_tests::kafka::PrivateTansu::start(&mqrpc_tests::required_url("MQRPC_TANSU"), port);
    let _terminator = TlsTerminator::start(listener, &server_certificate, &server_key, &ca_file, tansu.port);
    let brokers = format!("127.0.0.1:{port}");
    let read = |path: &Path| std::fs::read_to_string(path).expect("reads");
    let (ca, certificate, key) = (read(&ca_file), read(&client_certificate), read(&client_key));
    let tls = |ca: &str| KafkaOptions::new().property("security.protocol", "SSL").property("ssl.ca.pem", ca);
    let with_certificate =
        tls(&ca).property("ssl.certificate.pem", certificate.as_str()).property("ssl.key.pem", key.as_str());
    let body = key.lines().nth(1).expect("the key's first line");
    assert!(!format!("{with_certificate:?}").contains(body), "Debug shows the key: {with_certificate:?}");

    let worker: Arc<dyn Transport> =
        Arc::new(Kafka::connect_with(&brokers, with_certificate.clone()).await.expect("connects with its certificate"));
    let caller: Arc<dyn Transport> =
        Arc::new(Kafka::connect_with(&brokers, with_certificate).await.expect("connects with its certificate"));
    assert_eq!(call_through(worker, caller, "kafka-tls").await, 5);

    let other = Authority::new().certificate.pem();
    let refusals = [
        ("no client certificate", tls(&ca)),
        (
            "a listener it does not trust",
            tls(&other).property("ssl.certificate.pem", certificate.as_str()).property("ssl.key.pem", key.as_str()),
        ),
    ];
    for (case, options) in refusals {
        let attempt = tokio::time::timeout(WAIT, Kafka::connect_with(&brokers, options))
            .await
            .unwrap_or_else(|_| panic!("{case}: not refused in time"));
        let error = refused(attempt, &[body]);
        let named = matches!(&error, Error::Transport(cause) if cause.to_string().contains(&brokers));
        assert!(named, "{case}: not a transport error naming the brokers: {error:?}");
    }
}
