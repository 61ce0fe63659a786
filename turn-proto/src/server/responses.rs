//! Responses: how a request's outcome is encoded and signed (RFC 8489 §6.3, §14.5,
//! §14.6, §14.7; error codes of RFC 8489 §14.8 and RFC 8656 §19).

use std::net::SocketAddr;

use super::counters::ERROR_CODES;
use super::{Ctx, DropReason, Output, Server};
use crate::credentials::Key;
use crate::stun::attr;
use crate::stun::{
    AttrList, Class, EncodeError, Family, Message, MessageEncoder, Method, TransactionId,
};

/// Error codes (RFC 8489 §14.8, RFC 8656 §19), by name.
pub mod code {
    /// 300.
    pub const TRY_ALTERNATE: u16 = 300;
    /// 400.
    pub const BAD_REQUEST: u16 = 400;
    /// 401.
    pub const UNAUTHENTICATED: u16 = 401;
    /// 403.
    pub const FORBIDDEN: u16 = 403;
    /// 420.
    pub const UNKNOWN_ATTRIBUTE: u16 = 420;
    /// 437.
    pub const ALLOCATION_MISMATCH: u16 = 437;
    /// 438.
    pub const STALE_NONCE: u16 = 438;
    /// 440.
    pub const ADDRESS_FAMILY_NOT_SUPPORTED: u16 = 440;
    /// 441.
    pub const WRONG_CREDENTIALS: u16 = 441;
    /// 442.
    pub const UNSUPPORTED_TRANSPORT_PROTOCOL: u16 = 442;
    /// 443.
    pub const PEER_ADDRESS_FAMILY_MISMATCH: u16 = 443;
    /// 486.
    pub const ALLOCATION_QUOTA_REACHED: u16 = 486;
    /// 500.
    pub const SERVER_ERROR: u16 = 500;
    /// 508.
    pub const INSUFFICIENT_CAPACITY: u16 = 508;
}

/// Which integrity attribute signs a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IntegrityKind {
    Sha1,
    Sha256,
}

/// Successful TURN request outcomes, encoded by `write_reply`.
#[derive(Debug, Clone, Copy)]
pub(super) enum Reply {
    Allocate {
        relayed: [Option<SocketAddr>; 2],
        lifetime_secs: u32,
        mapped: SocketAddr,
        address_error: Option<(Family, u16)>,
    },
    Refresh {
        lifetime_secs: u32,
    },
    Empty,
}

/// A TURN request failure: an error code, or 420 with the unknown types.
#[derive(Debug, Clone, Copy)]
pub(super) enum TurnError {
    Code(u16),
    Unknown(AttrList<16>),
}

pub(super) const BAD_REQUEST: TurnError = TurnError::Code(code::BAD_REQUEST);

/// Standard reason phrases.
pub fn reason_phrase(code: u16) -> &'static str {
    match code {
        code::TRY_ALTERNATE => "Try Alternate",
        code::BAD_REQUEST => "Bad Request",
        code::UNAUTHENTICATED => "Unauthenticated",
        code::FORBIDDEN => "Forbidden",
        code::UNKNOWN_ATTRIBUTE => "Unknown Attribute",
        code::ALLOCATION_MISMATCH => "Allocation Mismatch",
        code::STALE_NONCE => "Stale Nonce",
        code::ADDRESS_FAMILY_NOT_SUPPORTED => "Address Family not Supported",
        code::WRONG_CREDENTIALS => "Wrong Credentials",
        code::UNSUPPORTED_TRANSPORT_PROTOCOL => "Unsupported Transport Protocol",
        code::PEER_ADDRESS_FAMILY_MISMATCH => "Peer Address Family Mismatch",
        code::ALLOCATION_QUOTA_REACHED => "Allocation Quota Reached",
        code::SERVER_ERROR => "Server Error",
        code::INSUFFICIENT_CAPACITY => "Insufficient Capacity",
        _ => "Error",
    }
}

/// How a response is signed.
#[derive(Debug, Clone, Copy)]
pub(super) struct Signer {
    pub(super) method: Method,
    pub(super) txid: TransactionId,
    pub(super) integrity: Option<(Key, IntegrityKind)>,
    pub(super) fingerprint: bool,
}

impl Server {
    pub(super) fn unsigned(&self, msg: &Message<'_>) -> Signer {
        Signer {
            method: msg.method(),
            txid: msg.transaction_id(),
            integrity: None,
            fingerprint: msg.has_fingerprint(),
        }
    }

    pub(super) fn respond<'a>(
        &mut self,
        cx: &Ctx,
        out: &'a mut [u8],
        r: Result<usize, EncodeError>,
    ) -> Output<'a> {
        match r {
            Ok(n) => {
                let out: &'a [u8] = out;
                // Count error responses by their class bits, and by their code: ERROR-CODE
                // is always the first attribute (see `write_error`).
                if out.len() >= 2 && out[0] & 0x01 == 0x01 && out[1] & 0x10 == 0x10 {
                    self.counters.error_responses += 1;
                    let code = match out.get(20..28) {
                        Some(a) if u16::from_be_bytes([a[0], a[1]]) == attr::ERROR_CODE => {
                            u16::from(a[6] & 0x07) * 100 + u16::from(a[7])
                        }
                        _ => 0,
                    };
                    let slot =
                        ERROR_CODES.iter().position(|&c| c == code).unwrap_or(ERROR_CODES.len());
                    self.counters.errors_by_code[slot] += 1;
                }
                match out.get(..n) {
                    Some(data) => Output::ToClient { five_tuple: cx.ft, conn: cx.conn, data },
                    None => self.dropped(DropReason::BufferTooSmall),
                }
            }
            Err(_) => self.dropped(DropReason::BufferTooSmall),
        }
    }

    /// Encode a response: `body`, then SOFTWARE (authenticated responses only: an
    /// unauthenticated request must not draw a response several times its size, and
    /// strangers need not learn the version), integrity and FINGERPRINT.
    pub(super) fn write_response(
        &self,
        out: &mut [u8],
        signer: &Signer,
        class: Class,
        body: impl FnOnce(&mut MessageEncoder<'_>) -> Result<(), EncodeError>,
    ) -> Result<usize, EncodeError> {
        let mut enc = MessageEncoder::new(out, signer.method, class, &signer.txid)?;
        body(&mut enc)?;
        if let Some(sw) = &self.cfg.software
            && signer.integrity.is_some()
        {
            enc.raw(attr::SOFTWARE, sw.as_bytes())?;
        }
        match signer.integrity {
            Some((key, IntegrityKind::Sha1)) => enc.message_integrity(key.as_bytes())?,
            Some((key, IntegrityKind::Sha256)) => enc.message_integrity_sha256(key.as_bytes())?,
            None => {}
        }
        if signer.fingerprint {
            enc.fingerprint()?;
        }
        Ok(enc.finish())
    }

    pub(super) fn write_error(
        &self,
        out: &mut [u8],
        signer: &Signer,
        code: u16,
        extra: impl FnOnce(&mut MessageEncoder<'_>) -> Result<(), EncodeError>,
    ) -> Result<usize, EncodeError> {
        self.write_response(out, signer, Class::ErrorResponse, |enc| {
            enc.error_code(code, reason_phrase(code))?;
            extra(enc)
        })
    }

    pub(super) fn write_reply(
        &mut self,
        out: &mut [u8],
        signer: &Signer,
        result: Result<Reply, TurnError>,
    ) -> Result<usize, EncodeError> {
        match result {
            Ok(Reply::Allocate { relayed, lifetime_secs, mapped, address_error }) => self
                .write_response(out, signer, Class::SuccessResponse, |enc| {
                    for r in relayed.iter().flatten() {
                        enc.xor_address(attr::XOR_RELAYED_ADDRESS, *r)?;
                    }
                    enc.u32(attr::LIFETIME, lifetime_secs)?;
                    if let Some((family, code)) = address_error {
                        enc.address_error_code(family, code, reason_phrase(code))?;
                    }
                    enc.xor_address(attr::XOR_MAPPED_ADDRESS, mapped)
                }),
            Ok(Reply::Refresh { lifetime_secs }) => {
                self.write_response(out, signer, Class::SuccessResponse, |enc| {
                    enc.u32(attr::LIFETIME, lifetime_secs)
                })
            }
            Ok(Reply::Empty) => {
                self.write_response(out, signer, Class::SuccessResponse, |_| Ok(()))
            }
            Err(TurnError::Code(code)) => self.write_error(out, signer, code, |_| Ok(())),
            Err(TurnError::Unknown(list)) => {
                self.write_error(out, signer, code::UNKNOWN_ATTRIBUTE, |enc| {
                    enc.unknown_attributes(list.as_slice())
                })
            }
        }
    }
}
