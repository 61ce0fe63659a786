//! STUN codec (RFC 8489): message header, attributes, integrity and
//! fingerprint. Parsing borrows from the datagram; encoding writes into a
//! caller buffer.

pub mod attr;
pub mod integrity;
pub mod message;

pub use attr::{AttrError, AttrType, Attribute, Family};
pub use message::{
    AttrList, Class, EncodeError, HEADER_LEN, MAGIC_COOKIE, Message, MessageEncoder, Method,
    ParseError, RawAttribute, TransactionId,
};

#[cfg(test)]
mod rfc_vectors {
    //! RFC 5769 test vectors (all of §2.1-§2.4) and RFC 8489 Appendix B.1
    //! (with erratum 6268, which adds PASSWORD-ALGORITHM and fixes the MAC).
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::credentials::{PasswordAlgorithm, long_term_key, opaque_string, user_hash};

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// RFC 5769 §2.1 Sample Request (short-term, key = password).
    const SAMPLE_REQUEST: &str = "
        00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
        00 24 00 04 6e 00 01 ff
        80 29 00 08 93 2f f9 b1 51 26 3b 36
        00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
        00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
        80 28 00 04 e5 7a 3b cf";

    /// RFC 5769 §2.2 Sample IPv4 Response.
    const SAMPLE_IPV4_RESPONSE: &str = "
        01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
        00 20 00 08 00 01 a1 47 e1 12 a6 43
        00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
        80 28 00 04 c0 7d 4c 96";

    /// RFC 5769 §2.3 Sample IPv6 Response.
    const SAMPLE_IPV6_RESPONSE: &str = "
        01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
        00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
        00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
        80 28 00 04 c8 fb 0b 4c";

    /// RFC 5769 §2.4 Sample Request with Long-Term Authentication.
    const SAMPLE_LONG_TERM_REQUEST: &str = "
        00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
        00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
        00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46
                    53 54 76 79 36 34 73 41
        00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
        00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66";

    /// RFC 8489 Appendix B.1 as corrected by erratum 6268.
    const RFC8489_B1: &str = "
        00 01 00 90 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
        00 1e 00 20 4a 3c f3 8f ef 69 92 bd a9 52 c6 78 04 17 da 0f
                    24 81 94 15 56 9e 60 b2 05 c4 6e 41 40 7f 17 04
        00 15 00 29 6f 62 4d 61 74 4a 6f 73 32 41 41 41 43 66 2f 2f
                    34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39
                    46 53 54 76 79 36 34 73 41 00 00 00
        00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
        00 1d 00 04 00 02 00 00
        00 1c 00 20 b5 c7 bf 00 5b 6c 52 a2 1c 51 c5 e8 92 f8 19 24
                    13 62 96 cb 92 7c 43 14 93 09 27 8c c6 51 8e 65";

    const SHORT_TERM_PASSWORD: &[u8] = b"VOkJxbRl1RmTxUk/WvJxBt";
    const MATRIX_USER: &str = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
    const MATRIX_PASSWORD_RAW: &str = "The\u{00AD}M\u{00AA}tr\u{2168}";

    fn decode_all(m: &Message<'_>) -> Vec<Attribute<'static>> {
        let tid = m.transaction_id();
        m.attributes()
            .map(|a| {
                let owned: &'static [u8] = Box::leak(a.value.to_vec().into_boxed_slice());
                Attribute::decode(a.typ, owned, &tid).unwrap()
            })
            .collect()
    }

    #[test]
    fn rfc5769_sample_request() {
        let bytes = hex(SAMPLE_REQUEST);
        let m = Message::parse(&bytes).unwrap();
        assert_eq!(m.class(), Class::Request);
        assert_eq!(m.method(), Method::BINDING);
        assert!(m.has_fingerprint());
        assert!(m.verify_message_integrity(SHORT_TERM_PASSWORD));
        assert!(!m.verify_message_integrity(b"wrong"));
        let attrs = decode_all(&m);
        assert_eq!(attrs[0], Attribute::Software("STUN test client"));
        assert_eq!(attrs[1], Attribute::Priority(0x6e0001ff));
        assert_eq!(attrs[2], Attribute::IceControlled(0x932ff9b151263b36));
        assert_eq!(attrs[3], Attribute::Username("evtj:h6vY"));
        assert!(m.unknown_comprehension_required::<4>().is_empty());
        // Byte-exact re-encoding (the RFC pads USERNAME with spaces).
        let mut out = [0u8; 128];
        let mut enc =
            MessageEncoder::new(&mut out, m.method(), m.class(), &m.transaction_id()).unwrap();
        for a in &attrs {
            a.encode(&mut enc).unwrap();
        }
        enc.written_mut()[73..76].fill(0x20);
        enc.message_integrity(SHORT_TERM_PASSWORD).unwrap();
        enc.fingerprint().unwrap();
        let n = enc.finish();
        assert_eq!(&out[..n], &bytes[..]);
    }

    fn check_response(vector: &str, expected: &str) {
        let bytes = hex(vector);
        let m = Message::parse(&bytes).unwrap();
        assert_eq!(m.class(), Class::SuccessResponse);
        assert!(m.has_fingerprint());
        assert!(m.verify_message_integrity(SHORT_TERM_PASSWORD));
        let attrs = decode_all(&m);
        assert_eq!(attrs[0], Attribute::Software("test vector"));
        assert_eq!(attrs[1], Attribute::XorMappedAddress(expected.parse().unwrap()));
        // Byte-exact re-encoding. The RFC pads SOFTWARE with a space where
        // we write a zero; patch that byte before the MAC and CRC.
        let mut out = [0u8; 128];
        let mut enc =
            MessageEncoder::new(&mut out, m.method(), m.class(), &m.transaction_id()).unwrap();
        for a in &attrs {
            a.encode(&mut enc).unwrap();
        }
        enc.written_mut()[20 + 4 + 11] = 0x20;
        enc.message_integrity(SHORT_TERM_PASSWORD).unwrap();
        enc.fingerprint().unwrap();
        let n = enc.finish();
        assert_eq!(&out[..n], &bytes[..]);
    }

    #[test]
    fn rfc5769_sample_ipv4_response() {
        check_response(SAMPLE_IPV4_RESPONSE, "192.0.2.1:32853");
    }

    #[test]
    fn rfc5769_sample_ipv6_response() {
        check_response(SAMPLE_IPV6_RESPONSE, "[2001:db8:1234:5678:11:2233:4455:6677]:32853");
    }

    #[test]
    fn rfc5769_long_term_request() {
        let bytes = hex(SAMPLE_LONG_TERM_REQUEST);
        let m = Message::parse(&bytes).unwrap();
        let attrs = decode_all(&m);
        assert_eq!(attrs[0], Attribute::Username(MATRIX_USER));
        assert_eq!(attrs[1], Attribute::Nonce("f//499k954d6OL34oL9FSTvy64sA"));
        assert_eq!(attrs[2], Attribute::Realm("example.org"));
        // SASLprep maps the raw password to "TheMatrIX".
        let prepped = opaque_string(MATRIX_PASSWORD_RAW).unwrap();
        assert_eq!(prepped, "TheMatrIX");
        let key = long_term_key(PasswordAlgorithm::Md5, MATRIX_USER, "example.org", &prepped);
        assert!(m.verify_message_integrity(key.as_bytes()));
        let bad = long_term_key(PasswordAlgorithm::Md5, MATRIX_USER, "example.org", "thematrix");
        assert!(!m.verify_message_integrity(bad.as_bytes()));

        // Byte-exact re-encoding.
        let mut out = [0u8; 128];
        let mut enc =
            MessageEncoder::new(&mut out, m.method(), m.class(), &m.transaction_id()).unwrap();
        for a in &attrs {
            a.encode(&mut enc).unwrap();
        }
        enc.message_integrity(key.as_bytes()).unwrap();
        let n = enc.finish();
        assert_eq!(&out[..n], &bytes[..]);
    }

    #[test]
    fn rfc8489_b1_sha256_and_userhash() {
        let bytes = hex(RFC8489_B1);
        let m = Message::parse(&bytes).unwrap();
        let attrs = decode_all(&m);
        let hash = user_hash(MATRIX_USER, "example.org");
        assert_eq!(attrs[0], Attribute::UserHash(Box::leak(Box::new(hash))));
        assert_eq!(attrs[1], Attribute::Nonce("obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA"));
        assert_eq!(attrs[2], Attribute::Realm("example.org"));
        assert_eq!(attrs[3], Attribute::PasswordAlgorithm(0x0002, &[]));
        let password = opaque_string(MATRIX_PASSWORD_RAW).unwrap();
        let key = long_term_key(PasswordAlgorithm::Sha256, MATRIX_USER, "example.org", &password);
        assert_eq!(key.as_bytes().len(), 32);
        assert!(m.verify_message_integrity_sha256(key.as_bytes()));
        let md5 = long_term_key(PasswordAlgorithm::Md5, MATRIX_USER, "example.org", &password);
        assert!(!m.verify_message_integrity_sha256(md5.as_bytes()));

        let mut out = [0u8; 200];
        let mut enc =
            MessageEncoder::new(&mut out, m.method(), m.class(), &m.transaction_id()).unwrap();
        for a in &attrs {
            a.encode(&mut enc).unwrap();
        }
        enc.message_integrity_sha256(key.as_bytes()).unwrap();
        let n = enc.finish();
        assert_eq!(&out[..n], &bytes[..]);
    }
}
