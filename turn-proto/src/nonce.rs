//! Stateless nonces (RFC 8489 §9.2) and the "nonce cookie" (§9.2.1).
//!
//! A nonce is `[cookie] base64url(issued_unix_secs (8 bytes) || MAC (12 bytes))`
//! where MAC = HMAC-SHA256(nonce_secret, tag || features || issued ||
//! client IP || client port), truncated to 96 bits. Nothing is stored per
//! client: a nonce is valid if its MAC verifies for the client's address
//! and it is younger than the configured lifetime, so a nonce minted by
//! one worker validates on any other worker sharing `nonce_secret`.
//! Distinct client addresses (IP and port) always get distinct nonces
//! (RFC 8489 §9.2.4). Expired or forged nonces yield 438 (Stale Nonce)
//! with a fresh nonce.
//!
//! The optional cookie is `obMatJos2` followed by the 24-bit STUN Security
//! Feature set in base64 (4 characters). Bit 0 (the most significant) is
//! "Password algorithms", bit 1 "Username anonymity" (RFC 8489 §18.1).

use std::net::{IpAddr, SocketAddr};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The nonce cookie prefix.
pub const NONCE_COOKIE: &str = "obMatJos2";
const TAG: &[u8] = b"turn-proto nonce v1";
const MAC_LEN: usize = 12;
const BODY_B64_LEN: usize = 27; // base64url of 20 bytes without padding
/// Tolerated clock skew between workers for nonces "from the future".
const FUTURE_SKEW_SECS: u64 = 5;

/// STUN Security Feature bits carried in the nonce cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SecurityFeatures {
    /// "Password algorithms" (bit 0).
    pub password_algorithms: bool,
    /// "Username anonymity" (bit 1).
    pub username_anonymity: bool,
}

impl SecurityFeatures {
    fn bits(self) -> [u8; 3] {
        let mut b0 = 0u8;
        if self.password_algorithms {
            b0 |= 0x80;
        }
        if self.username_anonymity {
            b0 |= 0x40;
        }
        [b0, 0, 0]
    }

    /// The cookie: `obMatJos2` + 4 base64 characters.
    pub fn cookie(self) -> [u8; 13] {
        let mut out = [0u8; 13];
        out[..9].copy_from_slice(NONCE_COOKIE.as_bytes());
        let mut enc = [0u8; 4];
        // 3 bytes always encode to exactly 4 base64 characters.
        let _ = STANDARD.encode_slice(self.bits(), &mut enc);
        out[9..].copy_from_slice(&enc);
        out
    }

    /// Read the features of a nonce that starts with the cookie.
    pub fn from_nonce(nonce: &[u8]) -> Option<SecurityFeatures> {
        let rest = nonce.strip_prefix(NONCE_COOKIE.as_bytes())?;
        let enc = rest.get(..4)?;
        let mut bits = [0u8; 3];
        let n = STANDARD.decode_slice(enc, &mut bits).ok()?;
        if n != 3 {
            return None;
        }
        Some(SecurityFeatures {
            password_algorithms: bits[0] & 0x80 != 0,
            username_anonymity: bits[0] & 0x40 != 0,
        })
    }
}

/// A nonce value (at most 40 ASCII bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Nonce {
    bytes: [u8; 40],
    len: u8,
}

impl std::fmt::Debug for Nonce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nonce({:?})", String::from_utf8_lossy(self.as_bytes()))
    }
}

impl Nonce {
    /// The nonce bytes (ASCII).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// Result of checking a nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    /// Valid and fresh, issued at this wall time (UNIX seconds).
    Valid { issued: u64 },
    /// Expired, forged, or for another client: answer 438.
    Stale,
}

/// Mints and checks stateless nonces.
#[derive(Clone)]
pub struct NonceMinter {
    /// HMAC keyed with the secret (ipad/opad precomputed, cloned per use).
    base: Hmac<Sha256>,
    lifetime_secs: u64,
    features: Option<SecurityFeatures>,
}

impl std::fmt::Debug for NonceMinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceMinter")
            .field("lifetime_secs", &self.lifetime_secs)
            .field("features", &self.features)
            .finish_non_exhaustive()
    }
}

impl NonceMinter {
    /// `features = None` produces nonces without the cookie.
    pub fn new(secret: [u8; 32], lifetime_secs: u64, features: Option<SecurityFeatures>) -> Self {
        // HMAC zero-pads keys shorter than the 64-byte block, so the padded
        // array is the same key and `KeyInit::new` is infallible.
        let mut block = [0u8; 64];
        block[..32].copy_from_slice(&secret);
        NonceMinter { base: <Hmac<Sha256> as KeyInit>::new(&block.into()), lifetime_secs, features }
    }

    /// The feature set advertised in the cookie, if any.
    pub fn features(&self) -> Option<SecurityFeatures> {
        self.features
    }

    fn mac(&self, issued: u64, client: SocketAddr) -> Hmac<Sha256> {
        let mut m = self.base.clone();
        m.update(TAG);
        m.update(&self.features.map_or([0xff, 0, 0], |f| f.bits()));
        m.update(&issued.to_be_bytes());
        let ip = match client.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        m.update(&ip);
        m.update(&client.port().to_be_bytes());
        m
    }

    /// Mint a nonce for `client` at wall time `unix_secs`.
    pub fn issue(&self, unix_secs: u64, client: SocketAddr) -> Nonce {
        let tag = self.mac(unix_secs, client).finalize().into_bytes();
        let mut body = [0u8; 8 + MAC_LEN];
        body[..8].copy_from_slice(&unix_secs.to_be_bytes());
        body[8..].copy_from_slice(&tag[..MAC_LEN]);
        let mut out = Nonce { bytes: [0; 40], len: 0 };
        let mut pos = 0;
        if let Some(f) = self.features {
            out.bytes[..13].copy_from_slice(&f.cookie());
            pos = 13;
        }
        let n = URL_SAFE_NO_PAD.encode_slice(body, &mut out.bytes[pos..]).unwrap_or(0);
        out.len = (pos + n) as u8;
        out
    }

    /// Check a nonce received from `client`.
    pub fn check(&self, nonce: &[u8], unix_secs: u64, client: SocketAddr) -> NonceCheck {
        let body = match self.features {
            Some(f) => match nonce.strip_prefix(&f.cookie()[..]) {
                Some(b) => b,
                None => return NonceCheck::Stale,
            },
            None => nonce,
        };
        if body.len() != BODY_B64_LEN {
            return NonceCheck::Stale;
        }
        let mut raw = [0u8; 21];
        match URL_SAFE_NO_PAD.decode_slice(body, &mut raw) {
            Ok(20) => {}
            _ => return NonceCheck::Stale,
        }
        let mut issued_b = [0u8; 8];
        issued_b.copy_from_slice(&raw[..8]);
        let issued = u64::from_be_bytes(issued_b);
        if self.mac(issued, client).verify_truncated_left(&raw[8..20]).is_err() {
            return NonceCheck::Stale;
        }
        if issued > unix_secs.saturating_add(FUTURE_SKEW_SECS)
            || unix_secs.saturating_sub(issued) >= self.lifetime_secs
        {
            return NonceCheck::Stale;
        }
        NonceCheck::Valid { issued }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn client() -> SocketAddr {
        "198.51.100.7:4000".parse().unwrap()
    }

    #[test]
    fn cookie_encoding() {
        let f = SecurityFeatures { password_algorithms: true, username_anonymity: false };
        assert_eq!(&f.cookie(), b"obMatJos2gAAA");
        let both = SecurityFeatures { password_algorithms: true, username_anonymity: true };
        assert_eq!(&both.cookie(), b"obMatJos2wAAA");
        assert_eq!(SecurityFeatures::from_nonce(b"obMatJos2gAAAxyz"), Some(f));
        assert_eq!(SecurityFeatures::from_nonce(b"abc"), None);
        assert_eq!(SecurityFeatures::from_nonce(b"obMatJos2"), None);
    }

    #[test]
    fn nonce_lifecycle() {
        for features in [None, Some(SecurityFeatures::default())] {
            let m = NonceMinter::new([9; 32], 600, features);
            let n = m.issue(1000, client());
            assert!(n.as_bytes().len() <= 40);
            assert!(n.as_bytes().iter().all(|b| b.is_ascii_graphic()));
            assert_eq!(m.check(n.as_bytes(), 1000, client()), NonceCheck::Valid { issued: 1000 });
            assert_eq!(m.check(n.as_bytes(), 1599, client()), NonceCheck::Valid { issued: 1000 });
            assert_eq!(m.check(n.as_bytes(), 1600, client()), NonceCheck::Stale);
            // Bound to the client's address and port.
            let other: SocketAddr = "198.51.100.7:4001".parse().unwrap();
            assert_eq!(m.check(n.as_bytes(), 1000, other), NonceCheck::Stale);
            assert_ne!(m.issue(1000, other), n);
            // Another secret (another deployment) rejects it.
            let m2 = NonceMinter::new([8; 32], 600, features);
            assert_eq!(m2.check(n.as_bytes(), 1000, client()), NonceCheck::Stale);
            // From the future.
            assert_eq!(m.check(n.as_bytes(), 900, client()), NonceCheck::Stale);
            // Tampered.
            let mut t = n.as_bytes().to_vec();
            let last = t.len() - 1;
            t[last] = if t[last] == b'A' { b'B' } else { b'A' };
            assert_eq!(m.check(&t, 1000, client()), NonceCheck::Stale);
            assert_eq!(m.check(b"", 1000, client()), NonceCheck::Stale);
        }
    }
}
