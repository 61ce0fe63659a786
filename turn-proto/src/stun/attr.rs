//! STUN and TURN attributes: type codes, typed zero-copy decoding and
//! encoding (RFC 8489 §14, RFC 8656 §18).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::message::{EncodeError, MAGIC_COOKIE, MessageEncoder, TransactionId};

/// An attribute type code.
pub type AttrType = u16;

// RFC 8489 comprehension-required.
/// MAPPED-ADDRESS.
pub const MAPPED_ADDRESS: AttrType = 0x0001;
/// USERNAME.
pub const USERNAME: AttrType = 0x0006;
/// MESSAGE-INTEGRITY.
pub const MESSAGE_INTEGRITY: AttrType = 0x0008;
/// ERROR-CODE.
pub const ERROR_CODE: AttrType = 0x0009;
/// UNKNOWN-ATTRIBUTES.
pub const UNKNOWN_ATTRIBUTES: AttrType = 0x000A;
/// REALM.
pub const REALM: AttrType = 0x0014;
/// NONCE.
pub const NONCE: AttrType = 0x0015;
/// MESSAGE-INTEGRITY-SHA256.
pub const MESSAGE_INTEGRITY_SHA256: AttrType = 0x001C;
/// PASSWORD-ALGORITHM.
pub const PASSWORD_ALGORITHM: AttrType = 0x001D;
/// USERHASH.
pub const USERHASH: AttrType = 0x001E;
/// XOR-MAPPED-ADDRESS.
pub const XOR_MAPPED_ADDRESS: AttrType = 0x0020;
// RFC 8489 comprehension-optional.
/// PASSWORD-ALGORITHMS.
pub const PASSWORD_ALGORITHMS: AttrType = 0x8002;
/// ALTERNATE-DOMAIN.
pub const ALTERNATE_DOMAIN: AttrType = 0x8003;
/// SOFTWARE.
pub const SOFTWARE: AttrType = 0x8022;
/// ALTERNATE-SERVER.
pub const ALTERNATE_SERVER: AttrType = 0x8023;
/// FINGERPRINT.
pub const FINGERPRINT: AttrType = 0x8028;
// RFC 8656 (TURN).
/// CHANNEL-NUMBER.
pub const CHANNEL_NUMBER: AttrType = 0x000C;
/// LIFETIME.
pub const LIFETIME: AttrType = 0x000D;
/// XOR-PEER-ADDRESS.
pub const XOR_PEER_ADDRESS: AttrType = 0x0012;
/// DATA.
pub const DATA: AttrType = 0x0013;
/// XOR-RELAYED-ADDRESS.
pub const XOR_RELAYED_ADDRESS: AttrType = 0x0016;
/// REQUESTED-ADDRESS-FAMILY.
pub const REQUESTED_ADDRESS_FAMILY: AttrType = 0x0017;
/// EVEN-PORT.
pub const EVEN_PORT: AttrType = 0x0018;
/// REQUESTED-TRANSPORT.
pub const REQUESTED_TRANSPORT: AttrType = 0x0019;
/// DONT-FRAGMENT.
pub const DONT_FRAGMENT: AttrType = 0x001A;
/// RESERVATION-TOKEN.
pub const RESERVATION_TOKEN: AttrType = 0x0022;
/// ADDITIONAL-ADDRESS-FAMILY.
pub const ADDITIONAL_ADDRESS_FAMILY: AttrType = 0x8000;
/// ADDRESS-ERROR-CODE.
pub const ADDRESS_ERROR_CODE: AttrType = 0x8001;
/// ICMP.
pub const ICMP: AttrType = 0x8004;
// ICE (RFC 8445), known so that ICE-style Binding requests are not refused.
/// PRIORITY.
pub const PRIORITY: AttrType = 0x0024;
/// USE-CANDIDATE.
pub const USE_CANDIDATE: AttrType = 0x0025;
/// ICE-CONTROLLED.
pub const ICE_CONTROLLED: AttrType = 0x8029;
/// ICE-CONTROLLING.
pub const ICE_CONTROLLING: AttrType = 0x802A;

/// REQUESTED-TRANSPORT protocol number for UDP.
pub const PROTOCOL_UDP: u8 = 17;

/// Maximum lengths (bytes) from RFC 8489 §14.
pub const MAX_USERNAME_LEN: usize = 513;
/// Maximum REALM / NONCE / SOFTWARE / reason phrase length in bytes.
pub const MAX_TEXT_LEN: usize = 763;

/// True for attribute types this implementation understands (used to find
/// unknown comprehension-required attributes).
pub const fn is_known(t: AttrType) -> bool {
    matches!(
        t,
        MAPPED_ADDRESS
            | USERNAME
            | MESSAGE_INTEGRITY
            | ERROR_CODE
            | UNKNOWN_ATTRIBUTES
            | REALM
            | NONCE
            | MESSAGE_INTEGRITY_SHA256
            | PASSWORD_ALGORITHM
            | USERHASH
            | XOR_MAPPED_ADDRESS
            | PASSWORD_ALGORITHMS
            | ALTERNATE_DOMAIN
            | SOFTWARE
            | ALTERNATE_SERVER
            | FINGERPRINT
            | CHANNEL_NUMBER
            | LIFETIME
            | XOR_PEER_ADDRESS
            | DATA
            | XOR_RELAYED_ADDRESS
            | REQUESTED_ADDRESS_FAMILY
            | EVEN_PORT
            | REQUESTED_TRANSPORT
            | DONT_FRAGMENT
            | RESERVATION_TOKEN
            | ADDITIONAL_ADDRESS_FAMILY
            | ADDRESS_ERROR_CODE
            | ICMP
            | PRIORITY
            | USE_CANDIDATE
            | ICE_CONTROLLED
            | ICE_CONTROLLING
    )
}

/// Address family as encoded in address attributes and
/// REQUESTED-ADDRESS-FAMILY (RFC 8656 §18.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// 0x01.
    V4,
    /// 0x02.
    V6,
}

impl Family {
    /// Wire code.
    pub const fn code(self) -> u8 {
        match self {
            Family::V4 => 0x01,
            Family::V6 => 0x02,
        }
    }

    /// From a wire code.
    pub const fn from_code(c: u8) -> Option<Family> {
        match c {
            0x01 => Some(Family::V4),
            0x02 => Some(Family::V6),
            _ => None,
        }
    }

    /// Family of an IP address.
    pub const fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// A malformed attribute value. A request carrying one is answered with
/// 400 (Bad Request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AttrError {
    /// Wrong value length for this attribute.
    #[error("bad attribute length")]
    BadLength,
    /// Unknown address family.
    #[error("bad address family")]
    BadFamily,
    /// Text attribute is not UTF-8.
    #[error("attribute is not UTF-8")]
    InvalidUtf8,
    /// Text attribute longer than the RFC maximum.
    #[error("attribute too long")]
    TooLong,
    /// A field outside its allowed range (e.g. error code class/number).
    #[error("attribute value out of range")]
    BadValue,
}

/// Wire length of an address value.
pub const fn address_len(addr: &SocketAddr) -> usize {
    match addr {
        SocketAddr::V4(_) => 8,
        SocketAddr::V6(_) => 20,
    }
}

/// Write a plain address value (MAPPED-ADDRESS layout). `v` has `address_len` bytes.
pub fn write_address(v: &mut [u8], addr: SocketAddr) {
    v[0] = 0;
    v[1] = Family::of(&addr.ip()).code();
    v[2..4].copy_from_slice(&addr.port().to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => v[4..8].copy_from_slice(&ip.octets()),
        IpAddr::V6(ip) => v[4..20].copy_from_slice(&ip.octets()),
    }
}

/// Write an XOR address value (RFC 8489 §14.2).
pub fn write_xor_address(v: &mut [u8], addr: SocketAddr, tid: &TransactionId) {
    write_address(v, addr);
    xor_in_place(v, tid);
}

fn xor_in_place(v: &mut [u8], tid: &TransactionId) {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    v[2] ^= cookie[0];
    v[3] ^= cookie[1];
    for (i, b) in v[4..].iter_mut().enumerate() {
        *b ^= if i < 4 { cookie[i] } else { tid.0[i - 4] };
    }
}

/// Decode a plain address value.
pub fn decode_address(v: &[u8]) -> Result<SocketAddr, AttrError> {
    if v.len() < 4 {
        return Err(AttrError::BadLength);
    }
    let port = u16::from_be_bytes([v[2], v[3]]);
    match Family::from_code(v[1]) {
        Some(Family::V4) => {
            let o: [u8; 4] = v[4..].try_into().map_err(|_| AttrError::BadLength)?;
            Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(o)), port))
        }
        Some(Family::V6) => {
            let o: [u8; 16] = v[4..].try_into().map_err(|_| AttrError::BadLength)?;
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port))
        }
        None => Err(AttrError::BadFamily),
    }
}

/// Decode an XOR address value (XOR-MAPPED/PEER/RELAYED-ADDRESS).
pub fn decode_xor_address(v: &[u8], tid: &TransactionId) -> Result<SocketAddr, AttrError> {
    let mut tmp = [0u8; 20];
    if v.len() != 8 && v.len() != 20 {
        return Err(AttrError::BadLength);
    }
    tmp[..v.len()].copy_from_slice(v);
    xor_in_place(&mut tmp[..v.len()], tid);
    decode_address(&tmp[..v.len()])
}

/// Decode a 32-bit attribute value.
pub fn decode_u32(v: &[u8]) -> Result<u32, AttrError> {
    let b: [u8; 4] = v.try_into().map_err(|_| AttrError::BadLength)?;
    Ok(u32::from_be_bytes(b))
}

fn text(v: &[u8], max: usize) -> Result<&str, AttrError> {
    if v.len() > max {
        return Err(AttrError::TooLong);
    }
    std::str::from_utf8(v).map_err(|_| AttrError::InvalidUtf8)
}

/// Decode ERROR-CODE into (code, reason).
pub fn decode_error_code(v: &[u8]) -> Result<(u16, &str), AttrError> {
    if v.len() < 4 {
        return Err(AttrError::BadLength);
    }
    // RFC 8489 §14.8: class 3..=6, number 0..=99.
    let class = v[2] & 0x7;
    if !(3..=6).contains(&class) || v[3] > 99 {
        return Err(AttrError::BadValue);
    }
    let code = u16::from(class) * 100 + u16::from(v[3]);
    Ok((code, text(&v[4..], MAX_TEXT_LEN)?))
}

/// A list of 16-bit values borrowed from the wire (UNKNOWN-ATTRIBUTES).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct U16List<'a>(&'a [u8]);

impl<'a> U16List<'a> {
    /// Wrap raw bytes (length must be even).
    pub fn new(raw: &'a [u8]) -> Result<Self, AttrError> {
        if !raw.len().is_multiple_of(2) {
            return Err(AttrError::BadLength);
        }
        Ok(U16List(raw))
    }

    /// Raw bytes.
    pub fn raw(&self) -> &'a [u8] {
        self.0
    }

    /// Iterate values.
    pub fn iter(&self) -> impl Iterator<Item = u16> + 'a {
        self.0.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]]))
    }
}

/// PASSWORD-ALGORITHMS value (RFC 8489 §14.11) borrowed from the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlgorithmList<'a>(&'a [u8]);

impl<'a> AlgorithmList<'a> {
    /// Validate the framing of a PASSWORD-ALGORITHMS value.
    pub fn new(raw: &'a [u8]) -> Result<Self, AttrError> {
        let mut pos = 0;
        while pos < raw.len() {
            let head = raw.get(pos..pos + 4).ok_or(AttrError::BadLength)?;
            let plen = usize::from(u16::from_be_bytes([head[2], head[3]]));
            pos += 4 + super::message::pad4(plen);
            if pos > raw.len() {
                return Err(AttrError::BadLength);
            }
        }
        Ok(AlgorithmList(raw))
    }

    /// Raw bytes.
    pub fn raw(&self) -> &'a [u8] {
        self.0
    }

    /// Iterate (algorithm, parameters).
    pub fn iter(&self) -> impl Iterator<Item = (u16, &'a [u8])> + 'a {
        let raw = self.0;
        let mut pos = 0;
        std::iter::from_fn(move || {
            let head = raw.get(pos..pos + 4)?;
            let alg = u16::from_be_bytes([head[0], head[1]]);
            let plen = usize::from(u16::from_be_bytes([head[2], head[3]]));
            let params = raw.get(pos + 4..pos + 4 + plen)?;
            pos += 4 + super::message::pad4(plen);
            Some((alg, params))
        })
    }
}

/// A decoded attribute, borrowing from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attribute<'a> {
    /// MAPPED-ADDRESS.
    MappedAddress(SocketAddr),
    /// XOR-MAPPED-ADDRESS.
    XorMappedAddress(SocketAddr),
    /// USERNAME.
    Username(&'a str),
    /// USERHASH (32 bytes).
    UserHash(&'a [u8; 32]),
    /// REALM.
    Realm(&'a str),
    /// NONCE.
    Nonce(&'a str),
    /// PASSWORD-ALGORITHMS.
    PasswordAlgorithms(AlgorithmList<'a>),
    /// PASSWORD-ALGORITHM (algorithm, parameters).
    PasswordAlgorithm(u16, &'a [u8]),
    /// MESSAGE-INTEGRITY (20 bytes).
    MessageIntegrity(&'a [u8]),
    /// MESSAGE-INTEGRITY-SHA256 (16..=32 bytes).
    MessageIntegritySha256(&'a [u8]),
    /// FINGERPRINT.
    Fingerprint(u32),
    /// ERROR-CODE.
    ErrorCode {
        /// 300..=699.
        code: u16,
        /// Reason phrase.
        reason: &'a str,
    },
    /// UNKNOWN-ATTRIBUTES.
    UnknownAttributes(U16List<'a>),
    /// SOFTWARE.
    Software(&'a str),
    /// ALTERNATE-SERVER.
    AlternateServer(SocketAddr),
    /// ALTERNATE-DOMAIN.
    AlternateDomain(&'a str),
    /// CHANNEL-NUMBER.
    ChannelNumber(u16),
    /// LIFETIME (seconds).
    Lifetime(u32),
    /// XOR-PEER-ADDRESS.
    XorPeerAddress(SocketAddr),
    /// DATA.
    Data(&'a [u8]),
    /// XOR-RELAYED-ADDRESS.
    XorRelayedAddress(SocketAddr),
    /// REQUESTED-ADDRESS-FAMILY.
    RequestedAddressFamily(Family),
    /// EVEN-PORT (the R bit).
    EvenPort(bool),
    /// REQUESTED-TRANSPORT (protocol number).
    RequestedTransport(u8),
    /// DONT-FRAGMENT.
    DontFragment,
    /// RESERVATION-TOKEN.
    ReservationToken([u8; 8]),
    /// ADDITIONAL-ADDRESS-FAMILY.
    AdditionalAddressFamily(Family),
    /// ADDRESS-ERROR-CODE.
    AddressErrorCode {
        /// Family the error is about.
        family: Family,
        /// Error code.
        code: u16,
        /// Reason phrase.
        reason: &'a str,
    },
    /// ICMP (RFC 8656 §18.13).
    Icmp {
        /// ICMP type.
        typ: u8,
        /// ICMP code.
        code: u8,
        /// Error data.
        data: u32,
    },
    /// PRIORITY (ICE).
    Priority(u32),
    /// USE-CANDIDATE (ICE).
    UseCandidate,
    /// ICE-CONTROLLED tie breaker.
    IceControlled(u64),
    /// ICE-CONTROLLING tie breaker.
    IceControlling(u64),
    /// Anything else.
    Other {
        /// Type code.
        typ: AttrType,
        /// Raw value.
        value: &'a [u8],
    },
}

fn family_attr(v: &[u8]) -> Result<Family, AttrError> {
    if v.len() != 4 {
        return Err(AttrError::BadLength);
    }
    Family::from_code(v[0]).ok_or(AttrError::BadFamily)
}

fn u64_attr(v: &[u8]) -> Result<u64, AttrError> {
    let b: [u8; 8] = v.try_into().map_err(|_| AttrError::BadLength)?;
    Ok(u64::from_be_bytes(b))
}

impl<'a> Attribute<'a> {
    /// Decode a raw attribute. `tid` is needed for the XOR addresses.
    pub fn decode(
        typ: AttrType,
        v: &'a [u8],
        tid: &TransactionId,
    ) -> Result<Attribute<'a>, AttrError> {
        Ok(match typ {
            MAPPED_ADDRESS => Attribute::MappedAddress(decode_address(v)?),
            XOR_MAPPED_ADDRESS => Attribute::XorMappedAddress(decode_xor_address(v, tid)?),
            USERNAME => Attribute::Username(text(v, MAX_USERNAME_LEN)?),
            USERHASH => Attribute::UserHash(v.try_into().map_err(|_| AttrError::BadLength)?),
            REALM => Attribute::Realm(text(v, MAX_TEXT_LEN)?),
            NONCE => Attribute::Nonce(text(v, MAX_TEXT_LEN)?),
            PASSWORD_ALGORITHMS => Attribute::PasswordAlgorithms(AlgorithmList::new(v)?),
            PASSWORD_ALGORITHM => {
                if v.len() < 4 {
                    return Err(AttrError::BadLength);
                }
                let alg = u16::from_be_bytes([v[0], v[1]]);
                let plen = usize::from(u16::from_be_bytes([v[2], v[3]]));
                let params = v.get(4..4 + plen).ok_or(AttrError::BadLength)?;
                if super::message::pad4(4 + plen) != super::message::pad4(v.len()) {
                    return Err(AttrError::BadLength);
                }
                Attribute::PasswordAlgorithm(alg, params)
            }
            MESSAGE_INTEGRITY => {
                if v.len() != 20 {
                    return Err(AttrError::BadLength);
                }
                Attribute::MessageIntegrity(v)
            }
            MESSAGE_INTEGRITY_SHA256 => {
                if !(16..=32).contains(&v.len()) || !v.len().is_multiple_of(4) {
                    return Err(AttrError::BadLength);
                }
                Attribute::MessageIntegritySha256(v)
            }
            FINGERPRINT => Attribute::Fingerprint(decode_u32(v)?),
            ERROR_CODE => {
                let (code, reason) = decode_error_code(v)?;
                Attribute::ErrorCode { code, reason }
            }
            UNKNOWN_ATTRIBUTES => Attribute::UnknownAttributes(U16List::new(v)?),
            SOFTWARE => Attribute::Software(text(v, MAX_TEXT_LEN)?),
            ALTERNATE_SERVER => Attribute::AlternateServer(decode_address(v)?),
            ALTERNATE_DOMAIN => Attribute::AlternateDomain(text(v, 255)?),
            CHANNEL_NUMBER => {
                if v.len() != 4 {
                    return Err(AttrError::BadLength);
                }
                Attribute::ChannelNumber(u16::from_be_bytes([v[0], v[1]]))
            }
            LIFETIME => Attribute::Lifetime(decode_u32(v)?),
            XOR_PEER_ADDRESS => Attribute::XorPeerAddress(decode_xor_address(v, tid)?),
            DATA => Attribute::Data(v),
            XOR_RELAYED_ADDRESS => Attribute::XorRelayedAddress(decode_xor_address(v, tid)?),
            REQUESTED_ADDRESS_FAMILY => Attribute::RequestedAddressFamily(family_attr(v)?),
            EVEN_PORT => {
                if v.len() != 1 {
                    return Err(AttrError::BadLength);
                }
                Attribute::EvenPort(v[0] & 0x80 != 0)
            }
            REQUESTED_TRANSPORT => {
                if v.len() != 4 {
                    return Err(AttrError::BadLength);
                }
                Attribute::RequestedTransport(v[0])
            }
            DONT_FRAGMENT => {
                if !v.is_empty() {
                    return Err(AttrError::BadLength);
                }
                Attribute::DontFragment
            }
            RESERVATION_TOKEN => {
                Attribute::ReservationToken(v.try_into().map_err(|_| AttrError::BadLength)?)
            }
            ADDITIONAL_ADDRESS_FAMILY => Attribute::AdditionalAddressFamily(family_attr(v)?),
            ADDRESS_ERROR_CODE => {
                if v.len() < 4 {
                    return Err(AttrError::BadLength);
                }
                let family = Family::from_code(v[0]).ok_or(AttrError::BadFamily)?;
                let (code, reason) = decode_error_code(v)?;
                Attribute::AddressErrorCode { family, code, reason }
            }
            ICMP => {
                if v.len() != 8 {
                    return Err(AttrError::BadLength);
                }
                Attribute::Icmp {
                    typ: v[2],
                    code: v[3],
                    data: u32::from_be_bytes([v[4], v[5], v[6], v[7]]),
                }
            }
            PRIORITY => Attribute::Priority(decode_u32(v)?),
            USE_CANDIDATE => {
                if !v.is_empty() {
                    return Err(AttrError::BadLength);
                }
                Attribute::UseCandidate
            }
            ICE_CONTROLLED => Attribute::IceControlled(u64_attr(v)?),
            ICE_CONTROLLING => Attribute::IceControlling(u64_attr(v)?),
            _ => Attribute::Other { typ, value: v },
        })
    }

    /// The type code.
    pub fn typ(&self) -> AttrType {
        match self {
            Attribute::MappedAddress(_) => MAPPED_ADDRESS,
            Attribute::XorMappedAddress(_) => XOR_MAPPED_ADDRESS,
            Attribute::Username(_) => USERNAME,
            Attribute::UserHash(_) => USERHASH,
            Attribute::Realm(_) => REALM,
            Attribute::Nonce(_) => NONCE,
            Attribute::PasswordAlgorithms(_) => PASSWORD_ALGORITHMS,
            Attribute::PasswordAlgorithm(..) => PASSWORD_ALGORITHM,
            Attribute::MessageIntegrity(_) => MESSAGE_INTEGRITY,
            Attribute::MessageIntegritySha256(_) => MESSAGE_INTEGRITY_SHA256,
            Attribute::Fingerprint(_) => FINGERPRINT,
            Attribute::ErrorCode { .. } => ERROR_CODE,
            Attribute::UnknownAttributes(_) => UNKNOWN_ATTRIBUTES,
            Attribute::Software(_) => SOFTWARE,
            Attribute::AlternateServer(_) => ALTERNATE_SERVER,
            Attribute::AlternateDomain(_) => ALTERNATE_DOMAIN,
            Attribute::ChannelNumber(_) => CHANNEL_NUMBER,
            Attribute::Lifetime(_) => LIFETIME,
            Attribute::XorPeerAddress(_) => XOR_PEER_ADDRESS,
            Attribute::Data(_) => DATA,
            Attribute::XorRelayedAddress(_) => XOR_RELAYED_ADDRESS,
            Attribute::RequestedAddressFamily(_) => REQUESTED_ADDRESS_FAMILY,
            Attribute::EvenPort(_) => EVEN_PORT,
            Attribute::RequestedTransport(_) => REQUESTED_TRANSPORT,
            Attribute::DontFragment => DONT_FRAGMENT,
            Attribute::ReservationToken(_) => RESERVATION_TOKEN,
            Attribute::AdditionalAddressFamily(_) => ADDITIONAL_ADDRESS_FAMILY,
            Attribute::AddressErrorCode { .. } => ADDRESS_ERROR_CODE,
            Attribute::Icmp { .. } => ICMP,
            Attribute::Priority(_) => PRIORITY,
            Attribute::UseCandidate => USE_CANDIDATE,
            Attribute::IceControlled(_) => ICE_CONTROLLED,
            Attribute::IceControlling(_) => ICE_CONTROLLING,
            Attribute::Other { typ, .. } => *typ,
        }
    }

    /// Append this attribute to a message being encoded. Integrity and
    /// fingerprint attributes are written verbatim (use the encoder's
    /// dedicated methods to compute them).
    pub fn encode(&self, enc: &mut MessageEncoder<'_>) -> Result<(), EncodeError> {
        let t = self.typ();
        match *self {
            Attribute::MappedAddress(a) | Attribute::AlternateServer(a) => enc.address(t, a),
            Attribute::XorMappedAddress(a)
            | Attribute::XorPeerAddress(a)
            | Attribute::XorRelayedAddress(a) => enc.xor_address(t, a),
            Attribute::Username(s)
            | Attribute::Realm(s)
            | Attribute::Nonce(s)
            | Attribute::Software(s)
            | Attribute::AlternateDomain(s) => enc.raw(t, s.as_bytes()),
            Attribute::UserHash(h) => enc.raw(t, h),
            Attribute::PasswordAlgorithms(l) => enc.raw(t, l.raw()),
            Attribute::PasswordAlgorithm(alg, params) => {
                let v = enc.reserve(t, 4 + params.len())?;
                v[0..2].copy_from_slice(&alg.to_be_bytes());
                v[2..4].copy_from_slice(&(params.len() as u16).to_be_bytes());
                v[4..].copy_from_slice(params);
                Ok(())
            }
            Attribute::MessageIntegrity(v) | Attribute::MessageIntegritySha256(v) => enc.raw(t, v),
            Attribute::Fingerprint(v) => enc.u32(t, v),
            Attribute::ErrorCode { code, reason } => enc.error_code(code, reason),
            Attribute::UnknownAttributes(l) => enc.raw(t, l.raw()),
            Attribute::ChannelNumber(n) => {
                let b = n.to_be_bytes();
                enc.raw(t, &[b[0], b[1], 0, 0])
            }
            Attribute::Lifetime(v) | Attribute::Priority(v) => enc.u32(t, v),
            Attribute::Data(d) => enc.raw(t, d),
            Attribute::RequestedAddressFamily(f) | Attribute::AdditionalAddressFamily(f) => {
                enc.raw(t, &[f.code(), 0, 0, 0])
            }
            Attribute::EvenPort(r) => enc.raw(t, &[if r { 0x80 } else { 0 }]),
            Attribute::RequestedTransport(p) => enc.raw(t, &[p, 0, 0, 0]),
            Attribute::DontFragment | Attribute::UseCandidate => enc.raw(t, &[]),
            Attribute::ReservationToken(tok) => enc.raw(t, &tok),
            Attribute::AddressErrorCode { family, code, reason } => {
                enc.address_error_code(family, code, reason)
            }
            Attribute::Icmp { typ, code, data } => {
                let d = data.to_be_bytes();
                enc.raw(t, &[0, 0, typ, code, d[0], d[1], d[2], d[3]])
            }
            Attribute::IceControlled(v) | Attribute::IceControlling(v) => {
                enc.raw(t, &v.to_be_bytes())
            }
            Attribute::Other { value, .. } => enc.raw(t, value),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn xor_address_round_trip() {
        let tid = TransactionId([0xAB; 12]);
        for addr in [
            "192.0.2.1:32853".parse::<SocketAddr>().unwrap(),
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853".parse().unwrap(),
        ] {
            let mut v = [0u8; 20];
            let n = address_len(&addr);
            write_xor_address(&mut v[..n], addr, &tid);
            assert_eq!(decode_xor_address(&v[..n], &tid).unwrap(), addr);
        }
    }

    #[test]
    fn bad_values() {
        let tid = TransactionId([0; 12]);
        assert_eq!(
            decode_xor_address(&[0, 1, 0, 0, 1, 2, 3], &tid).unwrap_err(),
            AttrError::BadLength
        );
        assert_eq!(
            decode_xor_address(&[0, 3, 0, 0, 1, 2, 3, 4], &tid).unwrap_err(),
            AttrError::BadFamily
        );
        // IPv4 family with an IPv6-sized value.
        assert_eq!(
            decode_xor_address(&[0, 1, 0, 0, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &tid)
                .unwrap_err(),
            AttrError::BadLength
        );
        assert_eq!(
            Attribute::decode(USERNAME, &[0xff, 0xfe], &tid).unwrap_err(),
            AttrError::InvalidUtf8
        );
        assert_eq!(
            Attribute::decode(REQUESTED_ADDRESS_FAMILY, &[3, 0, 0, 0], &tid).unwrap_err(),
            AttrError::BadFamily
        );
        assert_eq!(
            Attribute::decode(PASSWORD_ALGORITHMS, &[0, 1, 0, 8, 0, 0], &tid).unwrap_err(),
            AttrError::BadLength
        );
        assert!(Attribute::decode(UNKNOWN_ATTRIBUTES, &[0, 1, 0], &tid).is_err());
        // Found by fuzzing: error numbers >= 100 do not round-trip.
        assert_eq!(
            Attribute::decode(ERROR_CODE, &[0, 0, 4, 155], &tid).unwrap_err(),
            AttrError::BadValue
        );
        assert_eq!(
            Attribute::decode(ADDRESS_ERROR_CODE, &[1, 0, 9, 55], &tid).unwrap_err(),
            AttrError::BadValue
        );
        assert_eq!(
            Attribute::decode(ERROR_CODE, &[0, 0, 4, 1, b'x'], &tid).unwrap(),
            Attribute::ErrorCode { code: 401, reason: "x" }
        );
    }

    #[test]
    fn comprehension_ranges() {
        assert!(is_known(XOR_PEER_ADDRESS));
        assert!(!is_known(0x0003)); // CHANGE-REQUEST (RFC 5780) is not supported
        assert!(!is_known(0x7FFF));
    }
}
