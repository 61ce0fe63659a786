//! Long-term credentials (RFC 8489 §9.2): key derivation for the MD5 and
//! SHA-256 password algorithms, USERHASH, password preparation, and the
//! REST ephemeral-credential scheme operators use with coturn
//! (`use-auth-secret`).
//!
//! # Password preparation
//! RFC 8489 asks for OpaqueString (RFC 8265) on realm and password. This
//! crate implements it as SASLprep (RFC 4013, through the `stringprep`
//! crate) for non-ASCII input and as the identity for printable ASCII
//! (the common case, and the only case for REST passwords, which are
//! base64). SASLprep maps "The\u{AD}M\u{AA}tr\u{2168}" to "TheMatrIX" as
//! both RFC 5769 §2.4 and RFC 8489 Appendix B.1 expect; the two profiles
//! differ on exotic input (SASLprep uses NFKC, OpaqueString NFC), which is
//! a documented limitation. Usernames are used as received, as the RFC
//! requires of servers.
//!
//! # REST credentials (coturn compatible)
//! With a shared secret `s`, a username is `expiry` or `expiry:user`
//! (`expiry` = UNIX seconds; coturn's legacy `user:expiry` order is also
//! accepted) and its password is `base64(HMAC-SHA1(s, username))`. The
//! long-term key is then derived from that password as for any user.
//! Several secrets may be configured at once for rotation; a request is
//! accepted if its MESSAGE-INTEGRITY verifies with any of them. Expired
//! usernames (`expiry < now`) are rejected with 401.

use std::borrow::Cow;

use base64::Engine;
use hmac::{Mac, SimpleHmac};
use md5::{Digest, Md5};
use rustc_hash::FxHashMap;
use sha1::Sha1;
use sha2::Sha256;

/// Password algorithms of RFC 8489 §18.5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PasswordAlgorithm {
    /// 0x0001: key = MD5(username ":" realm ":" password), 16 bytes.
    Md5,
    /// 0x0002: key = SHA-256(username ":" realm ":" password), 32 bytes.
    Sha256,
}

impl PasswordAlgorithm {
    /// Wire code.
    pub const fn code(self) -> u16 {
        match self {
            PasswordAlgorithm::Md5 => 0x0001,
            PasswordAlgorithm::Sha256 => 0x0002,
        }
    }

    /// From a wire code.
    pub const fn from_code(c: u16) -> Option<Self> {
        match c {
            0x0001 => Some(PasswordAlgorithm::Md5),
            0x0002 => Some(PasswordAlgorithm::Sha256),
            _ => None,
        }
    }
}

/// A message-integrity key (16 bytes for MD5, 32 for SHA-256).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Key {
    bytes: [u8; 32],
    len: u8,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// Wrap raw key bytes (at most 32 are kept).
    pub fn from_slice(b: &[u8]) -> Key {
        let mut bytes = [0u8; 32];
        let n = b.len().min(32);
        bytes[..n].copy_from_slice(&b[..n]);
        Key { bytes, len: n as u8 }
    }

    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// Derive the long-term key (RFC 8489 §9.2.2). `realm` and `password`
/// must already be prepared (see [`opaque_string`]).
pub fn long_term_key(alg: PasswordAlgorithm, username: &str, realm: &str, password: &str) -> Key {
    match alg {
        PasswordAlgorithm::Md5 => {
            let mut h = Md5::new();
            h.update(username.as_bytes());
            h.update(b":");
            h.update(realm.as_bytes());
            h.update(b":");
            h.update(password.as_bytes());
            Key::from_slice(&h.finalize())
        }
        PasswordAlgorithm::Sha256 => {
            let mut h = Sha256::new();
            h.update(username.as_bytes());
            h.update(b":");
            h.update(realm.as_bytes());
            h.update(b":");
            h.update(password.as_bytes());
            Key::from_slice(&h.finalize())
        }
    }
}

/// USERHASH = SHA-256(username ":" realm) (RFC 8489 §14.4).
pub fn user_hash(username: &str, realm: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.finalize().into()
}

/// A string that cannot be prepared (prohibited or unassigned characters,
/// bidi violations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("string contains characters prohibited by SASLprep/OpaqueString")]
pub struct PrepError;

/// Prepare a realm or password (see the module docs).
pub fn opaque_string(s: &str) -> Result<Cow<'_, str>, PrepError> {
    if s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Ok(Cow::Borrowed(s));
    }
    stringprep::saslprep(s).map_err(|_| PrepError)
}

/// The REST password for `username`: base64(HMAC-SHA1(secret, username)).
pub fn rest_password(secret: &[u8], username: &str) -> String {
    let mut out = [0u8; 28];
    let n = rest_password_into(secret, username, &mut out);
    String::from_utf8_lossy(&out[..n]).into_owned()
}

/// As [`rest_password`] without allocating; returns the length (28).
fn rest_password_into(secret: &[u8], username: &str, out: &mut [u8; 28]) -> usize {
    let Ok(mut mac) = SimpleHmac::<Sha1>::new_from_slice(secret) else {
        return 0;
    };
    mac.update(username.as_bytes());
    let tag = mac.finalize().into_bytes();
    base64::engine::general_purpose::STANDARD.encode_slice(tag, out).unwrap_or(0)
}

/// The expiry (UNIX seconds) carried by a REST username: `expiry`,
/// `expiry:user`, or coturn's legacy `user:expiry`.
pub fn rest_expiry(username: &str) -> Option<u64> {
    fn num(s: &str) -> Option<u64> {
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    }
    match username.split_once(':') {
        None => num(username),
        Some((a, b)) => num(a).or_else(|| num(b)),
    }
}

/// The user part of a REST username (`expiry:user` or the legacy
/// `user:expiry`), or `None` for a bare `expiry` or a name that is not a
/// REST username.
pub fn rest_user(username: &str) -> Option<&str> {
    rest_expiry(username)?;
    let (a, b) = username.split_once(':')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    let user = if digits(a) { b } else { a };
    (!user.is_empty()).then_some(user)
}

/// How a configured static user authenticates.
#[derive(Clone, PartialEq, Eq)]
pub enum UserSecret {
    /// The plain password (enables both MD5 and SHA-256 keys).
    Password(String),
    /// A pre-hashed MD5 long-term key, MD5(user:realm:password), as in
    /// coturn's `turnadmin -k`. Only the MD5 password algorithm works.
    Md5Key([u8; 16]),
}

impl std::fmt::Debug for UserSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserSecret::Password(_) => f.write_str("Password(..)"),
            UserSecret::Md5Key(_) => f.write_str("Md5Key(..)"),
        }
    }
}

/// A static user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticUser {
    /// Username as the client sends it.
    pub name: String,
    /// Password or key.
    pub secret: UserSecret,
}

/// Credential configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CredentialsConfig {
    /// Static users.
    pub users: Vec<StaticUser>,
    /// REST shared secrets (coturn `static-auth-secret`); empty disables
    /// REST credentials. Several may be listed for rotation.
    pub rest_secrets: Vec<Vec<u8>>,
    /// Longest accepted REST credential lifetime: a username whose expiry
    /// lies further in the future is refused (0 = no limit).
    pub rest_max_ttl_secs: u64,
}

/// Configuration errors for credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    /// A realm or password could not be prepared.
    #[error("user {0:?}: password or realm rejected by SASLprep")]
    Prep(String),
    /// A username is empty or too long.
    #[error("user {0:?}: invalid username")]
    BadUsername(String),
    /// A REST secret is empty.
    #[error("empty REST secret")]
    EmptySecret,
}

#[derive(Debug)]
struct UserEntry {
    name: Box<str>,
    md5: Key,
    sha256: Option<Key>,
}

/// Who a request claims to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Identity<'a> {
    /// A static user (index into the store).
    Static(usize),
    /// A REST username, not yet expired.
    Rest(&'a str),
}

/// Resolved credentials, built once from [`CredentialsConfig`].
#[derive(Debug)]
pub(crate) struct CredentialStore {
    realm: Box<str>,
    users: Vec<UserEntry>,
    by_name: FxHashMap<Box<str>, usize>,
    by_hash: FxHashMap<[u8; 32], usize>,
    rest_secrets: Vec<Vec<u8>>,
    rest_max_ttl_secs: u64,
}

impl CredentialStore {
    pub(crate) fn new(realm: &str, cfg: &CredentialsConfig) -> Result<Self, CredentialsError> {
        let prepped_realm =
            opaque_string(realm).map_err(|_| CredentialsError::Prep(String::new()))?.into_owned();
        let mut store = CredentialStore {
            realm: prepped_realm.into(),
            users: Vec::new(),
            by_name: FxHashMap::default(),
            by_hash: FxHashMap::default(),
            rest_secrets: Vec::new(),
            rest_max_ttl_secs: cfg.rest_max_ttl_secs,
        };
        for u in &cfg.users {
            if u.name.is_empty() || u.name.len() > crate::stun::attr::MAX_USERNAME_LEN {
                return Err(CredentialsError::BadUsername(u.name.clone()));
            }
            let (md5, sha256) = match &u.secret {
                UserSecret::Password(p) => {
                    let p = opaque_string(p).map_err(|_| CredentialsError::Prep(u.name.clone()))?;
                    (
                        long_term_key(PasswordAlgorithm::Md5, &u.name, &store.realm, &p),
                        Some(long_term_key(PasswordAlgorithm::Sha256, &u.name, &store.realm, &p)),
                    )
                }
                UserSecret::Md5Key(k) => (Key::from_slice(k), None),
            };
            let idx = store.users.len();
            store.by_name.insert(u.name.as_str().into(), idx);
            store.by_hash.insert(user_hash(&u.name, &store.realm), idx);
            store.users.push(UserEntry { name: u.name.as_str().into(), md5, sha256 });
        }
        for s in &cfg.rest_secrets {
            if s.is_empty() {
                return Err(CredentialsError::EmptySecret);
            }
            store.rest_secrets.push(s.clone());
        }
        Ok(store)
    }

    /// Resolve a USERNAME. Static users win over REST names.
    pub(crate) fn by_username<'a>(&self, name: &'a str, unix_secs: u64) -> Option<Identity<'a>> {
        if let Some(&i) = self.by_name.get(name) {
            return Some(Identity::Static(i));
        }
        if self.rest_secrets.is_empty() {
            return None;
        }
        match rest_expiry(name) {
            Some(expiry)
                if expiry >= unix_secs
                    && (self.rest_max_ttl_secs == 0
                        || expiry - unix_secs <= self.rest_max_ttl_secs) =>
            {
                Some(Identity::Rest(name))
            }
            _ => None,
        }
    }

    /// The key quotas count an identity under: the static user's name, or
    /// the user part of a REST username (the whole name when it has none).
    pub(crate) fn quota_key<'s, 'a: 's>(&'s self, id: Identity<'a>) -> &'s str {
        match id {
            Identity::Static(_) => self.name(id),
            Identity::Rest(n) => rest_user(n).unwrap_or(n),
        }
    }

    /// Resolve a USERHASH (static users only: a REST username cannot be
    /// recovered from its hash).
    pub(crate) fn by_userhash(&self, hash: &[u8]) -> Option<Identity<'static>> {
        let h: [u8; 32] = hash.try_into().ok()?;
        self.by_hash.get(&h).map(|&i| Identity::Static(i))
    }

    /// The username of an identity.
    pub(crate) fn name<'s, 'a: 's>(&'s self, id: Identity<'a>) -> &'s str {
        match id {
            Identity::Static(i) => self.users.get(i).map_or("", |u| &u.name),
            Identity::Rest(n) => n,
        }
    }

    /// Find the key of `id` for `alg` that satisfies `verify` (the message
    /// integrity check). REST identities try every configured secret.
    pub(crate) fn find_key(
        &self,
        id: Identity<'_>,
        alg: PasswordAlgorithm,
        mut verify: impl FnMut(&[u8]) -> bool,
    ) -> Option<Key> {
        match id {
            Identity::Static(i) => {
                let u = self.users.get(i)?;
                let key = match alg {
                    PasswordAlgorithm::Md5 => u.md5,
                    PasswordAlgorithm::Sha256 => u.sha256?,
                };
                verify(key.as_bytes()).then_some(key)
            }
            Identity::Rest(name) => {
                let mut pw = [0u8; 28];
                for secret in &self.rest_secrets {
                    let n = rest_password_into(secret, name, &mut pw);
                    let pw = std::str::from_utf8(&pw[..n]).ok()?;
                    let key = long_term_key(alg, name, &self.realm, pw);
                    if verify(key.as_bytes()) {
                        return Some(key);
                    }
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn rfc5389_style_md5_key() {
        // MD5("user:realm:pass") computed independently:
        // printf 'user:realm:pass' | md5sum
        let k = long_term_key(PasswordAlgorithm::Md5, "user", "realm", "pass");
        assert_eq!(hex(k.as_bytes()), "8493fbc53ba582fb4c044c456bdc40eb");
    }

    #[test]
    fn rest_password_matches_coturn_scheme() {
        // Computed by hand as coturn documents it:
        //   echo -n "1700000000:alice" | openssl dgst -binary -sha1 -hmac "north" | base64
        let pw = rest_password(b"north", "1700000000:alice");
        assert_eq!(pw, "Cd/49soE35ICqcJF/bCTn8Z4OyE=");
        assert_eq!(pw.len(), 28);
    }

    #[test]
    fn rest_username_forms() {
        assert_eq!(rest_expiry("1700000000"), Some(1_700_000_000));
        assert_eq!(rest_expiry("1700000000:alice"), Some(1_700_000_000));
        assert_eq!(rest_expiry("alice:1700000000"), Some(1_700_000_000));
        assert_eq!(rest_expiry("alice"), None);
        assert_eq!(rest_expiry("alice:bob"), None);
        assert_eq!(rest_expiry(""), None);
        assert_eq!(rest_expiry("99999999999999999999999"), None);
    }

    #[test]
    fn rest_user_parts() {
        assert_eq!(rest_user("1700000000:alice"), Some("alice"));
        assert_eq!(rest_user("alice:1700000000"), Some("alice"));
        assert_eq!(rest_user("1700000000"), None);
        assert_eq!(rest_user("alice"), None);
        assert_eq!(rest_user("1700000000:"), None);
    }

    #[test]
    fn rest_credentials_beyond_the_longest_lifetime_are_refused() {
        let cfg = CredentialsConfig {
            rest_secrets: vec![b"s".to_vec()],
            rest_max_ttl_secs: 3600,
            ..CredentialsConfig::default()
        };
        let store = CredentialStore::new("r", &cfg).unwrap();
        let now = 1_700_000_000u64;
        assert!(store.by_username(&format!("{}:bob", now + 3600), now).is_some());
        assert!(store.by_username(&format!("{}:bob", now + 3601), now).is_none());
        assert!(store.by_username(&format!("{}:bob", now - 1), now).is_none(), "expired");
        let name = format!("{}:bob", now + 60);
        let id = store.by_username(&name, now).unwrap();
        assert_eq!(store.quota_key(id), "bob");
        let bare = format!("{}", now + 60);
        let id = store.by_username(&bare, now).unwrap();
        assert_eq!(store.quota_key(id), bare);
        let unlimited =
            CredentialStore::new("r", &CredentialsConfig { rest_max_ttl_secs: 0, ..cfg }).unwrap();
        assert!(unlimited.by_username(&format!("{}:bob", now + 10 * 365 * 86400), now).is_some());
    }

    #[test]
    fn store_lookups() {
        let cfg = CredentialsConfig {
            users: vec![
                StaticUser { name: "alice".into(), secret: UserSecret::Password("pw".into()) },
                StaticUser { name: "bob".into(), secret: UserSecret::Md5Key([7; 16]) },
            ],
            rest_secrets: vec![b"old".to_vec(), b"new".to_vec()],
            ..CredentialsConfig::default()
        };
        let s = CredentialStore::new("example.org", &cfg).unwrap();
        let alice = s.by_username("alice", 0).unwrap();
        assert_eq!(s.name(alice), "alice");
        let k = long_term_key(PasswordAlgorithm::Md5, "alice", "example.org", "pw");
        assert_eq!(s.find_key(alice, PasswordAlgorithm::Md5, |c| c == k.as_bytes()), Some(k));
        let bob = s.by_username("bob", 0).unwrap();
        assert!(s.find_key(bob, PasswordAlgorithm::Sha256, |_| true).is_none());
        assert_eq!(s.by_userhash(&user_hash("alice", "example.org")), Some(Identity::Static(0)));
        // REST: expiry in the future, both secrets accepted.
        let name = "2000:carol";
        let id = s.by_username(name, 1999).unwrap();
        for secret in [&b"old"[..], b"new"] {
            let k = long_term_key(
                PasswordAlgorithm::Md5,
                name,
                "example.org",
                &rest_password(secret, name),
            );
            assert_eq!(s.find_key(id, PasswordAlgorithm::Md5, |c| c == k.as_bytes()), Some(k));
        }
        let k = long_term_key(
            PasswordAlgorithm::Md5,
            name,
            "example.org",
            &rest_password(b"other", name),
        );
        assert!(s.find_key(id, PasswordAlgorithm::Md5, |c| c == k.as_bytes()).is_none());
        // Expired.
        assert!(s.by_username(name, 2001).is_none());
        assert!(s.by_username("nobody", 0).is_none());
    }

    #[test]
    fn prep() {
        assert_eq!(opaque_string("plain").unwrap(), "plain");
        assert_eq!(opaque_string("The\u{00AD}M\u{00AA}tr\u{2168}").unwrap(), "TheMatrIX");
        assert!(opaque_string("bad\u{0007}").is_err());
    }
}
