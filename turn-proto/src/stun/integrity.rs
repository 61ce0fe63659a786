//! MESSAGE-INTEGRITY (HMAC-SHA1), MESSAGE-INTEGRITY-SHA256 and FINGERPRINT
//! (RFC 8489 §14.5-§14.7).
//!
//! The MACs are computed over the message up to the integrity attribute
//! with the header length field adjusted to end right after that
//! attribute. On the receive side the datagram is immutable, so the header
//! is fed to the MAC in pieces (no copy). Comparisons are constant time
//! (`hmac`'s `verify_slice` / `verify_truncated_left`).

use hmac::{Mac, SimpleHmac};
use sha1::Sha1;
use sha2::Sha256;

type HmacSha1 = SimpleHmac<Sha1>;
type HmacSha256 = SimpleHmac<Sha256>;

/// XOR constant of the FINGERPRINT attribute.
pub const FINGERPRINT_XOR: u32 = 0x5354_554e;

/// CRC-32 of `data` XOR 0x5354554e. `data` must already carry the header
/// length that includes the FINGERPRINT attribute.
pub fn fingerprint(data: &[u8]) -> u32 {
    crc32fast::hash(data) ^ FINGERPRINT_XOR
}

/// HMAC-SHA1 over `data` (whose header length must already be adjusted).
pub fn hmac_sha1(key: &[u8], data: &[u8]) -> [u8; 20] {
    // `SimpleHmac::new_from_slice` accepts keys of any length.
    let mut mac = match HmacSha1::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0; 20],
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// HMAC-SHA256 over `data` (whose header length must already be adjusted).
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0; 32],
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Feed `msg[..at]` into `mac` with the header length replaced so that the
/// message ends after an attribute of `attr_total` bytes starting at `at`.
fn feed<M: Mac>(mac: &mut M, msg: &[u8], at: usize, attr_total: usize) {
    let adjusted = (at + attr_total - super::message::HEADER_LEN) as u16;
    mac.update(&msg[0..2]);
    mac.update(&adjusted.to_be_bytes());
    mac.update(&msg[4..at]);
}

/// Verify a MESSAGE-INTEGRITY attribute found at offset `at` of `msg`.
pub fn verify_sha1(msg: &[u8], at: usize, key: &[u8], tag: &[u8]) -> bool {
    let Ok(mut mac) = HmacSha1::new_from_slice(key) else {
        return false;
    };
    feed(&mut mac, msg, at, 24);
    mac.verify_slice(tag).is_ok()
}

/// Verify a (possibly truncated) MESSAGE-INTEGRITY-SHA256 attribute at `at`.
pub fn verify_sha256(msg: &[u8], at: usize, key: &[u8], tag: &[u8]) -> bool {
    if !(16..=32).contains(&tag.len()) {
        return false;
    }
    let Ok(mut mac) = HmacSha256::new_from_slice(key) else {
        return false;
    };
    feed(&mut mac, msg, at, 4 + tag.len());
    mac.verify_truncated_left(tag).is_ok()
}
