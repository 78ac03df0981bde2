//! Who may do what on the broker: users and their rights on queues and topics, read from a users file.
//!
//! Without a users file, every connection that passes the handshake (the shared token, if one is set) may do
//! everything. With one ([`ServerConfig::users`](crate::server::ServerConfig::users)), a connection presents a
//! user's token in its handshake and may then do what that user's grants allow, and nothing else; the shared
//! token, if one is set too, stays a credential with every right (an operator's).
//!
//! The file is JSON:
//!
//! ```json
//! {
//!   "users": [
//!     {
//!       "name": "billing",
//!       "token_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
//!       "grants": [
//!         { "names": "billing.*", "rights": ["publish", "consume", "admin"] },
//!         { "names": "shipping.Tracker", "rights": ["publish"] }
//!       ]
//!     }
//!   ]
//! }
//! ```
//!
//! - `token_sha256` is the SHA-256 of the user's token, in hex (`printf %s "$TOKEN" | sha256sum`): the file
//!   holds no token. Tokens must be random and long (32 bytes from a good generator, say): a hash of a short or
//!   guessable one is no protection.
//! - `cert_sha256`, instead or as well, is the SHA-256 of the user's TLS client certificate (its DER bytes:
//!   `openssl x509 -in client.pem -outform der | sha256sum`), for a broker that verifies client certificates
//!   (mutual TLS, `serve --tls-client-ca FILE`): a client presenting that certificate is that user, whatever
//!   token it sends. The certificate itself is pinned, not its subject: a new certificate for the same subject
//!   is a new entry.
//! - `names` is a queue or topic name, a prefix ending in `*` (`billing.*` matches `billing.Invoices`), or `*`
//!   for every name. A queue's dead-letter queue (`<queue>.dlq`) is covered by its queue's grants.
//! - The rights:
//!
//! | right | lets the user |
//! |---|---|
//! | `publish` | call a service (publish to its queue), broadcast to a topic, cancel a call on the queue |
//! | `consume` | serve a queue (declare and consume it), subscribe to a topic; answer the requests it holds |
//! | `admin` | read a queue's stats, read and replay its dead letters, delete it, see it listed |
//!
//! Every user may open inboxes, which are private to the connection that opened them: nobody consumes another
//! connection's inbox. A worker answers only on the deliveries it holds. A denied operation fails with
//! `Forbidden`, naming the queue or topic; the connection stays open. `rpc-broker serve` reads the file again on
//! SIGHUP ([`Monitor::replace_users`](crate::server::Monitor::replace_users)).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

/// What an operation needs on a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Right {
    /// Call, broadcast, cancel.
    Publish,
    /// Serve, subscribe.
    Consume,
    /// Stats, dead letters, delete, list.
    Admin,
}

impl Right {
    fn parse(name: &str) -> Option<Right> {
        match name {
            "publish" => Some(Right::Publish),
            "consume" => Some(Right::Consume),
            "admin" => Some(Right::Admin),
            _ => None,
        }
    }

    /// The right's name in the users file.
    pub fn name(self) -> &'static str {
        match self {
            Right::Publish => "publish",
            Right::Consume => "consume",
            Right::Admin => "admin",
        }
    }
}

/// The names a grant covers.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Names {
    Exact(String),
    Prefix(String),
    Any,
}

impl Names {
    fn parse(pattern: &str) -> Result<Names, String> {
        if pattern == "*" {
            return Ok(Names::Any);
        }
        match pattern.strip_suffix('*') {
            Some(prefix) if prefix.contains('*') => Err(format!("`{pattern}`: `*` only at the end")),
            Some(prefix) => Ok(Names::Prefix(prefix.to_owned())),
            None if pattern.contains('*') => Err(format!("`{pattern}`: `*` only at the end")),
            None if pattern.is_empty() => Err("an empty name".to_owned()),
            None => Ok(Names::Exact(pattern.to_owned())),
        }
    }

    fn covers(&self, name: &str) -> bool {
        match self {
            Names::Any => true,
            Names::Prefix(prefix) => name.starts_with(prefix.as_str()),
            Names::Exact(exact) => name == exact,
        }
    }
}

/// One user: a name and grants.
#[derive(Debug)]
pub struct User {
    name: String,
    grants: Vec<(Names, [bool; 3])>,
}

impl User {
    /// A user named `name` who may do nothing: what a connection's user becomes once the users file no longer
    /// has it.
    pub fn without_grants(name: &str) -> User {
        User { name: name.to_owned(), grants: Vec::new() }
    }

    /// The user's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the user has `right` on the queue or topic `name` (a dead-letter queue's are its queue's).
    pub fn may(&self, right: Right, name: &str) -> bool {
        let name = name.strip_suffix(".dlq").unwrap_or(name);
        self.grants.iter().any(|(names, rights)| rights[right as usize] && names.covers(name))
    }
}

/// The users of a broker, by the SHA-256 of their tokens and of their client certificates.
#[derive(Debug, Default)]
pub struct Users {
    by_hash: HashMap<[u8; 32], Arc<User>>,
    by_cert: HashMap<[u8; 32], Arc<User>>,
    by_name: HashMap<String, Arc<User>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    users: Vec<UserEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    name: String,
    #[serde(default)]
    token_sha256: Option<String>,
    #[serde(default)]
    cert_sha256: Option<String>,
    #[serde(default)]
    grants: Vec<GrantEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantEntry {
    names: String,
    rights: Vec<String>,
}

impl Users {
    /// Reads a users file (see the module docs).
    ///
    /// # Errors
    /// The file cannot be read, or what is wrong with it, with the user it is about.
    pub fn load(path: &Path) -> Result<Users, String> {
        let text = std::fs::read_to_string(path).map_err(|error| format!("{}: {error}", path.display()))?;
        Users::parse(&text).map_err(|error| format!("{}: {error}", path.display()))
    }

    /// Reads the JSON of a users file.
    ///
    /// # Errors
    /// What is wrong with it, with the user it is about.
    pub fn parse(json: &str) -> Result<Users, String> {
        let file: File = serde_json::from_str(json).map_err(|error| error.to_string())?;
        let mut users = Users::default();
        let mut names = std::collections::HashSet::new();
        for entry in file.users {
            let name = entry.name;
            if name.is_empty() || !names.insert(name.clone()) {
                return Err(format!("user `{name}`: names are unique and not empty"));
            }
            let digest = |field: &Option<String>, what: &str| {
                field
                    .as_deref()
                    .map(|text| hex32(text).ok_or_else(|| format!("user `{name}`: {what} is 64 hex digits, a SHA-256")))
                    .transpose()
            };
            let token = digest(&entry.token_sha256, "token_sha256")?;
            let cert = digest(&entry.cert_sha256, "cert_sha256")?;
            if token.is_none() && cert.is_none() {
                return Err(format!("user `{name}`: give token_sha256, cert_sha256 or both"));
            }
            let mut grants = Vec::with_capacity(entry.grants.len());
            for grant in entry.grants {
                let covered = Names::parse(&grant.names).map_err(|why| format!("user `{name}`: {why}"))?;
                let mut rights = [false; 3];
                for right in &grant.rights {
                    let right = Right::parse(right)
                        .ok_or_else(|| format!("user `{name}`: unknown right `{right}` (publish, consume or admin)"))?;
                    rights[right as usize] = true;
                }
                grants.push((covered, rights));
            }
            let user = Arc::new(User { name: name.clone(), grants });
            users.by_name.insert(name.clone(), Arc::clone(&user));
            if let Some(hash) = token
                && users.by_hash.insert(hash, Arc::clone(&user)).is_some()
            {
                return Err(format!("user `{name}`: another user has the same token"));
            }
            if let Some(hash) = cert
                && users.by_cert.insert(hash, user).is_some()
            {
                return Err(format!("user `{name}`: another user has the same certificate"));
            }
        }
        Ok(users)
    }

    /// The user whose token is `token`, if any.
    pub fn find(&self, token: &str) -> Option<Arc<User>> {
        self.by_hash.get(&sha256(token.as_bytes())).cloned()
    }

    /// The user whose client certificate (DER) has the SHA-256 `fingerprint`, if any.
    pub fn find_certificate(&self, fingerprint: &[u8; 32]) -> Option<Arc<User>> {
        self.by_cert.get(fingerprint).cloned()
    }

    /// The user named `name`, if any.
    pub fn by_name(&self, name: &str) -> Option<Arc<User>> {
        self.by_name.get(name).cloned()
    }

    /// How many users there are.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// The SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// 64 hex digits as 32 bytes.
fn hex32(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0; 32];
    for (byte, pair) in out.iter_mut().zip(text.as_bytes().chunks(2)) {
        let pair = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// What a connection may do: everything (no users file, or the shared token), or what its user may.
#[derive(Clone, Debug)]
pub enum Access {
    /// Every right on every name.
    Everything,
    /// The rights of this user.
    User(Arc<User>),
}

impl Access {
    /// Whether `right` on `name` is allowed.
    pub fn may(&self, right: Right, name: &str) -> bool {
        match self {
            Access::Everything => true,
            Access::User(user) => user.may(right, name),
        }
    }

    /// Who, for logs.
    pub fn who(&self) -> &str {
        match self {
            Access::Everything => "(every right)",
            Access::User(user) => user.name(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash_hex(token: &str) -> String {
        sha256(token.as_bytes()).iter().map(|byte| format!("{byte:02x}")).collect()
    }

    #[test]
    fn the_sha256_of_a_known_text() {
        assert_eq!(hash_hex("test"), "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08");
    }

    #[test]
    fn grants_cover_their_names_and_dead_letter_queues_only() {
        let json = format!(
            r#"{{"users": [{{"name": "billing", "token_sha256": "{}", "grants": [
                {{"names": "billing.*", "rights": ["publish", "consume"]}},
                {{"names": "shipping.Tracker", "rights": ["publish"]}}
            ]}}, {{"name": "ops", "token_sha256": "{}", "grants": [{{"names": "*", "rights": ["admin"]}}]}}]}}"#,
            hash_hex("b-token"),
            hash_hex("o-token"),
        );
        let users = Users::parse(&json).expect("parses");
        assert_eq!(users.len(), 2);
        let billing = users.find("b-token").expect("billing");
        assert_eq!(billing.name(), "billing");
        assert!(billing.may(Right::Consume, "billing.Invoices"));
        assert!(billing.may(Right::Consume, "billing.Invoices.dlq"));
        assert!(!billing.may(Right::Admin, "billing.Invoices"));
        assert!(billing.may(Right::Publish, "shipping.Tracker"));
        assert!(!billing.may(Right::Consume, "shipping.Tracker"));
        assert!(!billing.may(Right::Publish, "shipping.TrackerX"));
        assert!(!billing.may(Right::Publish, "billin"));
        let ops = users.find("o-token").expect("ops");
        assert!(ops.may(Right::Admin, "anything"));
        assert!(!ops.may(Right::Publish, "anything"));
        assert!(users.find("b-token ").is_none());
        assert!(users.find("").is_none());
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let good = hash_hex("t");
        for (json, expected) in [
            (r#"{"users": [{"name": "a", "token_sha256": "00"}]}"#.to_owned(), "64 hex digits"),
            (r#"{"users": [{"name": "a"}]}"#.to_owned(), "token_sha256, cert_sha256 or both"),
            (
                format!(
                    r#"{{"users": [{{"name": "a", "cert_sha256": "{good}"}}, {{"name": "b", "cert_sha256": "{good}"}}]}}"#
                ),
                "same certificate",
            ),
            (
                format!(
                    r#"{{"users": [{{"name": "a", "token_sha256": "{good}", "grants": [{{"names": "a*b", "rights": []}}]}}]}}"#
                ),
                "only at the end",
            ),
            (
                format!(
                    r#"{{"users": [{{"name": "a", "token_sha256": "{good}", "grants": [{{"names": "a", "rights": ["read"]}}]}}]}}"#
                ),
                "unknown right",
            ),
            (
                format!(
                    r#"{{"users": [{{"name": "a", "token_sha256": "{good}"}}, {{"name": "a", "token_sha256": "{good}"}}]}}"#
                ),
                "unique",
            ),
            (
                format!(
                    r#"{{"users": [{{"name": "a", "token_sha256": "{good}"}}, {{"name": "b", "token_sha256": "{good}"}}]}}"#
                ),
                "same token",
            ),
            (r#"{"users": [{"name": "a", "token": "plain"}]}"#.to_owned(), "unknown field"),
        ] {
            let why = Users::parse(&json).expect_err(expected);
            assert!(why.contains(expected), "{why}");
        }
    }
}
