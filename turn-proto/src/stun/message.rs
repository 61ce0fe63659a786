//! STUN message header, zero-copy parsing and encoding into a caller buffer
//! (RFC 8489 §5, §6, §14).

use super::attr::{self, AttrType};
use super::integrity;

/// The fixed magic cookie of RFC 8489 §5.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Length of the STUN header in bytes.
pub const HEADER_LEN: usize = 20;
/// Largest STUN message (header + 16-bit length).
pub const MAX_MESSAGE_LEN: usize = HEADER_LEN + 0xFFFC;

/// The class of a STUN message (RFC 8489 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// A request (C1 C0 = 0b00).
    Request,
    /// An indication (0b01).
    Indication,
    /// A success response (0b10).
    SuccessResponse,
    /// An error response (0b11).
    ErrorResponse,
}

impl Class {
    const fn bits(self) -> u16 {
        match self {
            Class::Request => 0b00,
            Class::Indication => 0b01,
            Class::SuccessResponse => 0b10,
            Class::ErrorResponse => 0b11,
        }
    }

    const fn from_bits(bits: u16) -> Class {
        match bits & 0b11 {
            0b00 => Class::Request,
            0b01 => Class::Indication,
            0b10 => Class::SuccessResponse,
            _ => Class::ErrorResponse,
        }
    }
}

/// A STUN method (12 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Method(pub u16);

impl Method {
    /// Binding (RFC 8489).
    pub const BINDING: Method = Method(0x001);
    /// Allocate (RFC 8656 §7).
    pub const ALLOCATE: Method = Method(0x003);
    /// Refresh (RFC 8656 §7).
    pub const REFRESH: Method = Method(0x004);
    /// Send (indication only, RFC 8656 §11).
    pub const SEND: Method = Method(0x006);
    /// Data (indication only, RFC 8656 §11).
    pub const DATA: Method = Method(0x007);
    /// CreatePermission (RFC 8656 §9).
    pub const CREATE_PERMISSION: Method = Method(0x008);
    /// ChannelBind (RFC 8656 §12).
    pub const CHANNEL_BIND: Method = Method(0x009);
}

/// Encode a method and class into the 14-bit STUN message type (RFC 8489 §5).
pub const fn message_type(method: Method, class: Class) -> u16 {
    let m = method.0 & 0x0FFF;
    let c = class.bits();
    (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | ((c & 0b01) << 4) | ((c & 0b10) << 7)
}

/// Split a message type into method and class.
pub const fn split_message_type(t: u16) -> (Method, Class) {
    let method = (t & 0x000F) | ((t >> 1) & 0x0070) | ((t >> 2) & 0x0F80);
    let class = ((t >> 4) & 0b01) | ((t >> 7) & 0b10);
    (Method(method), Class::from_bits(class))
}

/// The 96-bit transaction ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TransactionId(pub [u8; 12]);

/// Why a datagram is not a valid STUN message. Such messages are dropped
/// silently (RFC 8489 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Fewer than 20 bytes.
    #[error("shorter than a STUN header")]
    TooShort,
    /// The two leading bits are not zero.
    #[error("leading bits are not 0b00")]
    NotStun,
    /// The magic cookie is wrong.
    #[error("bad magic cookie")]
    BadMagicCookie,
    /// The length field is not a multiple of 4.
    #[error("message length is not a multiple of 4")]
    UnalignedLength,
    /// The length field does not match the datagram size.
    #[error("message length does not match the datagram")]
    LengthMismatch,
    /// An attribute header or value runs past the end of the message.
    #[error("truncated attribute")]
    TruncatedAttribute,
    /// An attribute follows FINGERPRINT.
    #[error("attribute after FINGERPRINT")]
    AttributeAfterFingerprint,
    /// MESSAGE-INTEGRITY(-SHA256) or FINGERPRINT has an impossible length.
    #[error("bad MESSAGE-INTEGRITY or FINGERPRINT length")]
    BadIntegrityLength,
    /// The FINGERPRINT value is wrong.
    #[error("bad FINGERPRINT")]
    BadFingerprint,
}

/// Errors when encoding into a caller buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The output buffer is too small.
    #[error("output buffer too small")]
    BufferTooSmall,
    /// A value cannot be encoded (error code outside 300..=699).
    #[error("value out of range")]
    InvalidValue,
    /// An attribute value or the message is longer than the 16-bit length field allows.
    #[error("value too long")]
    TooLong,
}

/// An attribute as found on the wire: type and value, borrowed from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawAttribute<'a> {
    /// Attribute type.
    pub typ: AttrType,
    /// Value without padding.
    pub value: &'a [u8],
}

/// A parsed STUN message borrowing the datagram.
///
/// Parsing validates the header (leading bits, length, alignment, cookie),
/// the attribute framing, the position rules of MESSAGE-INTEGRITY,
/// MESSAGE-INTEGRITY-SHA256 and FINGERPRINT (RFC 8489 §14.5-§14.7) and the
/// FINGERPRINT value. Attribute values are decoded lazily (see
/// [`attr`](super::attr)); attributes that follow MESSAGE-INTEGRITY (other
/// than MESSAGE-INTEGRITY-SHA256 and FINGERPRINT) are ignored as the RFC
/// requires.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    buf: &'a [u8],
    method: Method,
    class: Class,
    /// End of the attributes that count (before the first of MI, MI-SHA256, FP).
    attrs_end: usize,
    mi: Option<usize>,
    mi256: Option<usize>,
    fp: Option<usize>,
}

#[inline]
fn be16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at + 2) {
        Some(s) => u16::from_be_bytes([s[0], s[1]]),
        None => 0,
    }
}

/// Round up to a multiple of four.
#[inline]
pub const fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

/// True if the first bytes of `buf` look like a STUN header (leading bits
/// zero and the magic cookie), without checking anything else.
#[inline]
pub fn looks_like_stun(buf: &[u8]) -> bool {
    buf.len() >= HEADER_LEN && buf[0] & 0xC0 == 0 && buf[4..8] == MAGIC_COOKIE.to_be_bytes()
}

impl<'a> Message<'a> {
    /// Parse a datagram that must contain exactly one STUN message.
    pub fn parse(buf: &'a [u8]) -> Result<Message<'a>, ParseError> {
        if buf.len() < HEADER_LEN {
            return Err(ParseError::TooShort);
        }
        if buf[0] & 0xC0 != 0 {
            return Err(ParseError::NotStun);
        }
        if buf[4..8] != MAGIC_COOKIE.to_be_bytes() {
            return Err(ParseError::BadMagicCookie);
        }
        let len = usize::from(be16(buf, 2));
        if len % 4 != 0 {
            return Err(ParseError::UnalignedLength);
        }
        if HEADER_LEN + len != buf.len() {
            return Err(ParseError::LengthMismatch);
        }
        let (method, class) = split_message_type(be16(buf, 0));

        #[derive(PartialEq)]
        enum State {
            Normal,
            AfterMi,
            AfterMi256,
            AfterFp,
        }
        let mut state = State::Normal;
        let mut attrs_end = buf.len();
        let (mut mi, mut mi256, mut fp) = (None, None, None);
        let mut pos = HEADER_LEN;
        while pos < buf.len() {
            if pos + 4 > buf.len() {
                return Err(ParseError::TruncatedAttribute);
            }
            let typ = be16(buf, pos);
            let vlen = usize::from(be16(buf, pos + 2));
            let next = pos + 4 + pad4(vlen);
            if next > buf.len() {
                return Err(ParseError::TruncatedAttribute);
            }
            if state == State::AfterFp {
                return Err(ParseError::AttributeAfterFingerprint);
            }
            match typ {
                attr::MESSAGE_INTEGRITY if state == State::Normal => {
                    if vlen != 20 {
                        return Err(ParseError::BadIntegrityLength);
                    }
                    attrs_end = pos;
                    mi = Some(pos);
                    state = State::AfterMi;
                }
                attr::MESSAGE_INTEGRITY_SHA256
                    if state == State::Normal || state == State::AfterMi =>
                {
                    if !(16..=32).contains(&vlen) || vlen % 4 != 0 {
                        return Err(ParseError::BadIntegrityLength);
                    }
                    attrs_end = attrs_end.min(pos);
                    mi256 = Some(pos);
                    state = State::AfterMi256;
                }
                attr::FINGERPRINT => {
                    if vlen != 4 {
                        return Err(ParseError::BadIntegrityLength);
                    }
                    attrs_end = attrs_end.min(pos);
                    fp = Some(pos);
                    state = State::AfterFp;
                }
                _ => {
                    // RFC 8489 §14.5/§14.6: other attributes after an
                    // integrity attribute are ignored.
                }
            }
            pos = next;
        }
        if let Some(at) = fp {
            let stored = u32::from_be_bytes([buf[at + 4], buf[at + 5], buf[at + 6], buf[at + 7]]);
            if integrity::fingerprint(&buf[..at]) != stored {
                return Err(ParseError::BadFingerprint);
            }
        }
        Ok(Message { buf, method, class, attrs_end, mi, mi256, fp })
    }

    /// The whole message bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buf
    }

    /// The method.
    pub fn method(&self) -> Method {
        self.method
    }

    /// The class.
    pub fn class(&self) -> Class {
        self.class
    }

    /// The transaction ID.
    pub fn transaction_id(&self) -> TransactionId {
        let mut t = [0u8; 12];
        t.copy_from_slice(&self.buf[8..20]);
        TransactionId(t)
    }

    /// Iterate the attributes that count: those before MESSAGE-INTEGRITY,
    /// MESSAGE-INTEGRITY-SHA256 and FINGERPRINT (which are reachable through
    /// [`get`](Self::get)).
    pub fn attributes(&self) -> Attributes<'a> {
        Attributes { buf: &self.buf[..self.attrs_end], pos: HEADER_LEN }
    }

    /// Value of the first attribute of type `typ`, if any.
    pub fn get(&self, typ: AttrType) -> Option<&'a [u8]> {
        let at = match typ {
            attr::MESSAGE_INTEGRITY => self.mi,
            attr::MESSAGE_INTEGRITY_SHA256 => self.mi256,
            attr::FINGERPRINT => self.fp,
            _ => return self.attributes().find(|a| a.typ == typ).map(|a| a.value),
        }?;
        let vlen = usize::from(be16(self.buf, at + 2));
        self.buf.get(at + 4..at + 4 + vlen)
    }

    /// Values of every attribute of type `typ` (for repeated attributes such
    /// as XOR-PEER-ADDRESS in CreatePermission).
    pub fn get_all(&self, typ: AttrType) -> impl Iterator<Item = &'a [u8]> + use<'a> {
        self.attributes().filter(move |a| a.typ == typ).map(|a| a.value)
    }

    /// True if the attribute is present.
    pub fn has(&self, typ: AttrType) -> bool {
        self.get(typ).is_some()
    }

    /// True if the message carries MESSAGE-INTEGRITY.
    pub fn has_message_integrity(&self) -> bool {
        self.mi.is_some()
    }

    /// True if the message carries MESSAGE-INTEGRITY-SHA256.
    pub fn has_message_integrity_sha256(&self) -> bool {
        self.mi256.is_some()
    }

    /// True if the message carries a (verified) FINGERPRINT.
    pub fn has_fingerprint(&self) -> bool {
        self.fp.is_some()
    }

    /// Verify MESSAGE-INTEGRITY (HMAC-SHA1, RFC 8489 §14.5) with `key`, in
    /// constant time. False if the attribute is absent.
    pub fn verify_message_integrity(&self, key: &[u8]) -> bool {
        match self.mi {
            Some(at) => integrity::verify_sha1(self.buf, at, key, &self.buf[at + 4..at + 24]),
            None => false,
        }
    }

    /// Verify MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6, possibly truncated)
    /// with `key`, in constant time. False if the attribute is absent.
    pub fn verify_message_integrity_sha256(&self, key: &[u8]) -> bool {
        match self.mi256 {
            Some(at) => {
                let vlen = usize::from(be16(self.buf, at + 2));
                integrity::verify_sha256(self.buf, at, key, &self.buf[at + 4..at + 4 + vlen])
            }
            None => false,
        }
    }

    /// Unknown comprehension-required attributes (type < 0x8000 not known
    /// to this implementation), in order of appearance, at most `N`
    /// (duplicates removed). Used for 420 responses (RFC 8489 §6.3.1).
    pub fn unknown_comprehension_required<const N: usize>(&self) -> AttrList<N> {
        let mut list = AttrList::new();
        for a in self.attributes() {
            if a.typ < 0x8000 && !attr::is_known(a.typ) {
                list.push(a.typ);
            }
        }
        list
    }
}

/// A small, bounded, stack-allocated list of attribute types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttrList<const N: usize> {
    items: [u16; N],
    len: usize,
}

impl<const N: usize> Default for AttrList<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> AttrList<N> {
    /// Empty list.
    pub const fn new() -> Self {
        AttrList { items: [0; N], len: 0 }
    }

    /// Add a type unless already present or full.
    pub fn push(&mut self, t: u16) {
        if self.len < N && !self.as_slice().contains(&t) {
            self.items[self.len] = t;
            self.len += 1;
        }
    }

    /// The types.
    pub fn as_slice(&self) -> &[u16] {
        &self.items[..self.len]
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Iterator over raw attributes.
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Iterator for Attributes<'a> {
    type Item = RawAttribute<'a>;

    fn next(&mut self) -> Option<RawAttribute<'a>> {
        let head = self.buf.get(self.pos..self.pos + 4)?;
        let typ = u16::from_be_bytes([head[0], head[1]]);
        let vlen = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let value = self.buf.get(self.pos + 4..self.pos + 4 + vlen)?;
        self.pos += 4 + pad4(vlen);
        Some(RawAttribute { typ, value })
    }
}

/// Builds a STUN message directly in a caller-provided buffer.
///
/// The header length is kept up to date after each attribute, so
/// [`message_integrity`](Self::message_integrity),
/// [`message_integrity_sha256`](Self::message_integrity_sha256) and
/// [`fingerprint`](Self::fingerprint) can be appended in that order last.
#[derive(Debug)]
pub struct MessageEncoder<'b> {
    buf: &'b mut [u8],
    len: usize,
}

impl<'b> MessageEncoder<'b> {
    /// Start a message with the given type and transaction ID.
    pub fn new(
        buf: &'b mut [u8],
        method: Method,
        class: Class,
        transaction_id: &TransactionId,
    ) -> Result<Self, EncodeError> {
        if buf.len() < HEADER_LEN {
            return Err(EncodeError::BufferTooSmall);
        }
        buf[0..2].copy_from_slice(&message_type(method, class).to_be_bytes());
        buf[2..4].copy_from_slice(&[0, 0]);
        buf[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf[8..20].copy_from_slice(&transaction_id.0);
        Ok(MessageEncoder { buf, len: HEADER_LEN })
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if only the header was written.
    pub fn is_empty(&self) -> bool {
        self.len == HEADER_LEN
    }

    fn set_length(&mut self, body: usize) {
        // body <= MAX_MESSAGE_LEN - HEADER_LEN is checked by callers.
        let b = (body as u16).to_be_bytes();
        self.buf[2] = b[0];
        self.buf[3] = b[1];
    }

    /// Reserve an attribute with a `vlen`-byte value (padding zeroed) and
    /// return the value slice to fill.
    pub fn reserve(&mut self, typ: AttrType, vlen: usize) -> Result<&mut [u8], EncodeError> {
        if vlen > 0xFFFF {
            return Err(EncodeError::TooLong);
        }
        let end = self.len + 4 + pad4(vlen);
        if end > MAX_MESSAGE_LEN {
            return Err(EncodeError::TooLong);
        }
        if end > self.buf.len() {
            return Err(EncodeError::BufferTooSmall);
        }
        let start = self.len;
        self.buf[start..start + 2].copy_from_slice(&typ.to_be_bytes());
        self.buf[start + 2..start + 4].copy_from_slice(&(vlen as u16).to_be_bytes());
        self.buf[start + 4 + vlen..end].fill(0);
        self.len = end;
        self.set_length(end - HEADER_LEN);
        Ok(&mut self.buf[start + 4..start + 4 + vlen])
    }

    /// Append an attribute with the given value.
    pub fn raw(&mut self, typ: AttrType, value: &[u8]) -> Result<(), EncodeError> {
        self.reserve(typ, value.len())?.copy_from_slice(value);
        Ok(())
    }

    /// Append already-encoded attributes verbatim (e.g. copied from another
    /// message), zero-padded to a multiple of four bytes.
    pub fn append_encoded(&mut self, attrs: &[u8]) -> Result<(), EncodeError> {
        let end = self.len + pad4(attrs.len());
        if end > MAX_MESSAGE_LEN {
            return Err(EncodeError::TooLong);
        }
        if end > self.buf.len() {
            return Err(EncodeError::BufferTooSmall);
        }
        self.buf[self.len..self.len + attrs.len()].copy_from_slice(attrs);
        self.buf[self.len + attrs.len()..end].fill(0);
        self.len = end;
        self.set_length(end - HEADER_LEN);
        Ok(())
    }

    /// Append a 32-bit attribute (LIFETIME, ...).
    pub fn u32(&mut self, typ: AttrType, v: u32) -> Result<(), EncodeError> {
        self.raw(typ, &v.to_be_bytes())
    }

    /// Append an XOR-encoded address (XOR-MAPPED-ADDRESS, XOR-PEER-ADDRESS,
    /// XOR-RELAYED-ADDRESS).
    pub fn xor_address(
        &mut self,
        typ: AttrType,
        addr: std::net::SocketAddr,
    ) -> Result<(), EncodeError> {
        let mut txid = [0u8; 12];
        txid.copy_from_slice(&self.buf[8..20]);
        let vlen = attr::address_len(&addr);
        let v = self.reserve(typ, vlen)?;
        attr::write_xor_address(v, addr, &TransactionId(txid));
        Ok(())
    }

    /// Append a plain address (MAPPED-ADDRESS, ALTERNATE-SERVER).
    pub fn address(
        &mut self,
        typ: AttrType,
        addr: std::net::SocketAddr,
    ) -> Result<(), EncodeError> {
        let vlen = attr::address_len(&addr);
        let v = self.reserve(typ, vlen)?;
        attr::write_address(v, addr);
        Ok(())
    }

    /// Append ERROR-CODE (RFC 8489 §14.8).
    pub fn error_code(&mut self, code: u16, reason: &str) -> Result<(), EncodeError> {
        if !(300..=699).contains(&code) {
            return Err(EncodeError::InvalidValue);
        }
        let v = self.reserve(attr::ERROR_CODE, 4 + reason.len())?;
        v[0] = 0;
        v[1] = 0;
        v[2] = ((code / 100) & 0x7) as u8;
        v[3] = (code % 100) as u8;
        v[4..].copy_from_slice(reason.as_bytes());
        Ok(())
    }

    /// Append ADDRESS-ERROR-CODE (RFC 8656 §18.12).
    pub fn address_error_code(
        &mut self,
        family: attr::Family,
        code: u16,
        reason: &str,
    ) -> Result<(), EncodeError> {
        if !(300..=699).contains(&code) {
            return Err(EncodeError::InvalidValue);
        }
        let v = self.reserve(attr::ADDRESS_ERROR_CODE, 4 + reason.len())?;
        v[0] = family.code();
        v[1] = 0;
        v[2] = ((code / 100) & 0x7) as u8;
        v[3] = (code % 100) as u8;
        v[4..].copy_from_slice(reason.as_bytes());
        Ok(())
    }

    /// Append UNKNOWN-ATTRIBUTES (RFC 8489 §14.9).
    pub fn unknown_attributes(&mut self, types: &[u16]) -> Result<(), EncodeError> {
        let v = self.reserve(attr::UNKNOWN_ATTRIBUTES, types.len() * 2)?;
        for (chunk, t) in v.chunks_exact_mut(2).zip(types) {
            chunk.copy_from_slice(&t.to_be_bytes());
        }
        Ok(())
    }

    /// Append MESSAGE-INTEGRITY (HMAC-SHA1 with `key`, RFC 8489 §14.5).
    pub fn message_integrity(&mut self, key: &[u8]) -> Result<(), EncodeError> {
        let at = self.len;
        // Reserve first so the header length covers the attribute.
        self.reserve(attr::MESSAGE_INTEGRITY, 20)?;
        let mac = integrity::hmac_sha1(key, &self.buf[..at]);
        self.buf[at + 4..at + 24].copy_from_slice(&mac);
        Ok(())
    }

    /// Append MESSAGE-INTEGRITY-SHA256 (full 32 bytes, RFC 8489 §14.6).
    pub fn message_integrity_sha256(&mut self, key: &[u8]) -> Result<(), EncodeError> {
        let at = self.len;
        self.reserve(attr::MESSAGE_INTEGRITY_SHA256, 32)?;
        let mac = integrity::hmac_sha256(key, &self.buf[..at]);
        self.buf[at + 4..at + 36].copy_from_slice(&mac);
        Ok(())
    }

    /// Append FINGERPRINT (RFC 8489 §14.7). Must be last.
    pub fn fingerprint(&mut self) -> Result<(), EncodeError> {
        let at = self.len;
        self.reserve(attr::FINGERPRINT, 4)?;
        let crc = integrity::fingerprint(&self.buf[..at]);
        self.buf[at + 4..at + 8].copy_from_slice(&crc.to_be_bytes());
        Ok(())
    }

    /// The bytes written so far, mutable (for in-place patching, e.g. to
    /// reproduce non-zero padding of a test vector).
    pub fn written_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }

    /// Finish and return the message length.
    pub fn finish(self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn message_type_round_trip() {
        for m in 0..0x1000u16 {
            for c in
                [Class::Request, Class::Indication, Class::SuccessResponse, Class::ErrorResponse]
            {
                let t = message_type(Method(m), c);
                assert_eq!(t & 0xC000, 0);
                assert_eq!(split_message_type(t), (Method(m), c));
            }
        }
        assert_eq!(message_type(Method::BINDING, Class::Request), 0x0001);
        assert_eq!(message_type(Method::BINDING, Class::SuccessResponse), 0x0101);
        assert_eq!(message_type(Method::ALLOCATE, Class::ErrorResponse), 0x0113);
        assert_eq!(message_type(Method::SEND, Class::Indication), 0x0016);
        assert_eq!(message_type(Method::DATA, Class::Indication), 0x0017);
    }

    fn header(len: u16) -> Vec<u8> {
        let mut v = vec![0x00, 0x01];
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        v.extend_from_slice(&[7u8; 12]);
        v
    }

    #[test]
    fn header_checks() {
        assert_eq!(Message::parse(&[0u8; 19]).unwrap_err(), ParseError::TooShort);
        let mut h = header(0);
        assert!(Message::parse(&h).is_ok());
        h[0] = 0x40;
        assert_eq!(Message::parse(&h).unwrap_err(), ParseError::NotStun);
        let mut h = header(0);
        h[5] = 0;
        assert_eq!(Message::parse(&h).unwrap_err(), ParseError::BadMagicCookie);
        let h = header(2);
        assert_eq!(Message::parse(&h).unwrap_err(), ParseError::UnalignedLength);
        let h = header(4);
        assert_eq!(Message::parse(&h).unwrap_err(), ParseError::LengthMismatch);
        let mut h = header(4);
        h.extend_from_slice(&[0x80, 0x22, 0x00, 0x08]);
        assert_eq!(Message::parse(&h).unwrap_err(), ParseError::TruncatedAttribute);
        let mut h = header(8);
        h.extend_from_slice(&[0x80, 0x22, 0x00, 0x05, 1, 2, 3, 4]);
        assert_eq!(Message::parse(&h).unwrap_err(), ParseError::TruncatedAttribute);
    }

    #[test]
    fn attributes_after_integrity_are_ignored() {
        let mut buf = [0u8; 256];
        let tid = TransactionId([1; 12]);
        let mut enc = MessageEncoder::new(&mut buf, Method::BINDING, Class::Request, &tid).unwrap();
        enc.raw(attr::SOFTWARE, b"abc").unwrap();
        enc.message_integrity(b"key").unwrap();
        enc.raw(attr::USERNAME, b"ignored").unwrap();
        enc.message_integrity_sha256(b"key").unwrap();
        enc.fingerprint().unwrap();
        let n = enc.finish();
        let m = Message::parse(&buf[..n]).unwrap();
        assert_eq!(m.get(attr::SOFTWARE), Some(&b"abc"[..]));
        assert_eq!(m.get(attr::USERNAME), None);
        assert!(m.has_fingerprint());
        // MI covers up to itself; the USERNAME after it changes nothing.
        assert!(m.verify_message_integrity(b"key"));
        assert!(!m.verify_message_integrity(b"other"));
        // MI-SHA256 covers the ignored USERNAME too.
        assert!(m.verify_message_integrity_sha256(b"key"));
        assert_eq!(m.attributes().count(), 1);
    }

    #[test]
    fn fingerprint_must_be_last_and_correct() {
        let mut buf = [0u8; 64];
        let tid = TransactionId([1; 12]);
        let mut enc = MessageEncoder::new(&mut buf, Method::BINDING, Class::Request, &tid).unwrap();
        enc.fingerprint().unwrap();
        enc.raw(attr::SOFTWARE, b"x").unwrap();
        let n = enc.finish();
        assert_eq!(Message::parse(&buf[..n]).unwrap_err(), ParseError::AttributeAfterFingerprint);
        let mut enc = MessageEncoder::new(&mut buf, Method::BINDING, Class::Request, &tid).unwrap();
        enc.fingerprint().unwrap();
        let n = enc.finish();
        buf[n - 1] ^= 1;
        assert_eq!(Message::parse(&buf[..n]).unwrap_err(), ParseError::BadFingerprint);
    }

    #[test]
    fn encoder_reports_small_buffers() {
        let tid = TransactionId([1; 12]);
        let mut small = [0u8; 10];
        assert_eq!(
            MessageEncoder::new(&mut small, Method::BINDING, Class::Request, &tid).unwrap_err(),
            EncodeError::BufferTooSmall
        );
        let mut buf = [0u8; 24];
        let mut enc = MessageEncoder::new(&mut buf, Method::BINDING, Class::Request, &tid).unwrap();
        assert_eq!(enc.raw(attr::SOFTWARE, b"hello").unwrap_err(), EncodeError::BufferTooSmall);
        assert_eq!(enc.len(), HEADER_LEN);
    }
}
