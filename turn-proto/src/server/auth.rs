//! Long-term credential authentication of requests (RFC 8489 §9.2.4) and the answers to
//! requests that fail it (401, 400, 438), limited per source address.
//!
//! Who pays for a failure: a request whose NONCE is not one this server gave to the
//! request's own source (address and port) is answered 438 and counts against nobody, so
//! a spoofed source, which never sees the answers sent to its owner, cannot make a single
//! failure count in its owner's name. A failure with a valid nonce counts against the
//! source address (password guessing from many ports is one guesser), shared by every
//! worker; once an address used its share, its signed requests are dropped unverified,
//! except those of a 5-tuple that holds an allocation: that 5-tuple counts its own
//! failures only, so that nobody else, from its address or behind the same NAT, can keep
//! a live allocation from refreshing. Answers to unauthenticated requests are limited per
//! source address too (reflection), again except to a 5-tuple that holds an allocation.
//!
//! This checks the nonce before the message integrity, where RFC 8489 §9.2.4 lists it
//! after: a request that has both a stale nonce and a wrong integrity is answered 438
//! instead of 401 (the client retries with the fresh nonce and then gets the 401).

use super::responses::{IntegrityKind, Signer, code};
use super::{AuthFailure, Ctx, DropReason, FiveTuple, Output, Server};
use crate::credentials::{Identity, Key, PasswordAlgorithm};
use crate::nonce::{NonceCheck, SecurityFeatures};
use crate::stun::attr;
use crate::stun::attr::Attribute;
use crate::stun::{Class, EncodeError, Message};

/// A successfully authenticated request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Auth<'a> {
    pub(super) identity: Identity<'a>,
    pub(super) key: Key,
    pub(super) kind: IntegrityKind,
    /// When the request's nonce was issued (UNIX seconds).
    pub(super) nonce_issued: u64,
}

/// Why authentication failed (RFC 8489 §9.2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rejection {
    /// 401 with REALM, NONCE, PASSWORD-ALGORITHMS.
    Unauthenticated,
    /// 400 without credentials attributes.
    BadRequest,
    /// 438 with a fresh NONCE.
    StaleNonce,
    /// Not verified: the source failed too often lately (dropped, no answer).
    Throttled,
}

impl Server {
    /// Long-term credential checks, in the order of RFC 8489 §9.2.4 but for the nonce
    /// (see the module docs). `held`: the 5-tuple's live allocation.
    pub(super) fn authenticate<'a>(
        &mut self,
        msg: &Message<'a>,
        cx: &Ctx,
        held: Option<u32>,
    ) -> Result<Auth<'a>, Rejection> {
        let client = cx.ft.client;
        let has_mi = msg.has_message_integrity();
        let has_mi256 = msg.has_message_integrity_sha256();
        // §9.2.4: "If the message does not contain a MESSAGE-INTEGRITY or
        // MESSAGE-INTEGRITY-SHA256 attribute, the server MUST generate an
        // error response with an error code of 401".
        if !has_mi && !has_mi256 {
            self.counters.auth_challenges += 1;
            return Err(Rejection::Unauthenticated);
        }
        // "... but is missing either the USERNAME or USERHASH, REALM, or
        // NONCE attribute, the server MUST generate ... 400".
        let username = msg.get(attr::USERNAME);
        let userhash = msg.get(attr::USERHASH);
        let (Some(realm), Some(nonce)) = (msg.get(attr::REALM), msg.get(attr::NONCE)) else {
            return Err(Rejection::BadRequest);
        };
        if username.is_none() && userhash.is_none() {
            return Err(Rejection::BadRequest);
        }
        // "If the NONCE attribute starts with the 'nonce cookie' with the
        // STUN Security Feature 'Password algorithms' bit set to 1 ..."
        let mut algorithm = PasswordAlgorithm::Md5;
        let mut negotiated = false;
        if SecurityFeatures::from_nonce(nonce).is_some_and(|f| f.password_algorithms) {
            match (msg.get(attr::PASSWORD_ALGORITHMS), msg.get(attr::PASSWORD_ALGORITHM)) {
                // "... neither ... then the request is processed as though
                // PASSWORD-ALGORITHM were MD5."
                (None, None) => {}
                // "Otherwise, unless (1) both are present, (2)
                // PASSWORD-ALGORITHMS matches the value sent [by us], and (3)
                // PASSWORD-ALGORITHM matches one of the entries ... 400."
                (Some(list), Some(chosen)) => {
                    if list != self.password_algorithms.as_slice() {
                        return Err(Rejection::BadRequest);
                    }
                    let Ok(Attribute::PasswordAlgorithm(code, _)) =
                        Attribute::decode(attr::PASSWORD_ALGORITHM, chosen, &msg.transaction_id())
                    else {
                        return Err(Rejection::BadRequest);
                    };
                    let offered = self.cfg.password_algorithms.iter().any(|a| a.code() == code);
                    match PasswordAlgorithm::from_code(code) {
                        Some(a) if offered => algorithm = a,
                        _ => return Err(Rejection::BadRequest),
                    }
                    negotiated = true;
                }
                _ => return Err(Rejection::BadRequest),
            }
        }
        // "If the NONCE is no longer valid, ... 438 (Stale Nonce)." Checked first: a
        // nonce minted for this very source proves the request comes from where the
        // answers go, and only then may a failure count against that source.
        let NonceCheck::Valid { issued: nonce_issued } =
            self.nonces.check(nonce, cx.unix_secs, client)
        else {
            self.counters.stale_nonces += 1;
            return Err(Rejection::StaleNonce);
        };
        // A source that keeps failing authentication is not even verified for a while.
        if self.throttled(held, cx) {
            return Err(Rejection::Throttled);
        }
        // A request for another realm cannot be verified: challenge again.
        if realm != self.cfg.realm.as_bytes() {
            self.auth_failed(held, cx, AuthFailure::WrongRealm);
            return Err(Rejection::Unauthenticated);
        }
        // "If the value of the USERNAME or USERHASH attribute is not valid,
        // ... 401".
        let identity = match (username, userhash) {
            (Some(u), _) => std::str::from_utf8(u)
                .ok()
                .filter(|u| u.len() <= attr::MAX_USERNAME_LEN)
                .and_then(|u| self.creds.by_username(u, cx.unix_secs)),
            (None, Some(h)) => self.creds.by_userhash(h),
            (None, None) => None,
        };
        // "If the MESSAGE-INTEGRITY-SHA256 attribute is present, compute
        // [it] ... Otherwise ... MESSAGE-INTEGRITY ... [mismatch:] 401".
        let integrity_checks = &mut self.counters.integrity_checks;
        let mut verify = |k: &[u8]| {
            *integrity_checks += 1;
            if has_mi256 {
                msg.verify_message_integrity_sha256(k)
            } else {
                msg.verify_message_integrity(k)
            }
        };
        let Some(identity) = identity else {
            // An unknown user costs what a known one with a wrong password costs (one
            // key derivation and one integrity check), so that response times do not
            // tell which usernames exist.
            let _ = verify(self.decoy_key.as_bytes());
            self.auth_failed(held, cx, AuthFailure::UnknownUser);
            return Err(Rejection::Unauthenticated);
        };
        let key = self.creds.find_key(identity, algorithm, verify);
        let Some(key) = key else {
            self.auth_failed(held, cx, AuthFailure::BadIntegrity);
            return Err(Rejection::Unauthenticated);
        };
        // "Any response generated by the server MUST include the
        // MESSAGE-INTEGRITY-SHA256 attribute ... unless the request was
        // processed as though PASSWORD-ALGORITHM was MD5 [legacy], [then]
        // MESSAGE-INTEGRITY". A legacy request that only carries
        // MESSAGE-INTEGRITY-SHA256 gets that back (mirroring the client).
        let kind = if negotiated || !has_mi { IntegrityKind::Sha256 } else { IntegrityKind::Sha1 };
        Ok(Auth { identity, key, kind, nonce_issued })
    }

    /// True when the failures that count against this request's sender used their share:
    /// its allocation's own when the 5-tuple holds one, else its address's.
    fn throttled(&mut self, held: Option<u32>, cx: &Ctx) -> bool {
        let (per_sec, burst) = (self.cfg.failed_auth_per_sec, self.cfg.failed_auth_burst);
        match held {
            Some(idx) => {
                let now_ms = self.millis(cx.now);
                per_sec > 0
                    && self
                        .table
                        .get(idx)
                        .is_some_and(|a| a.strikes.exhausted(now_ms, per_sec, burst))
            }
            None => self.limits.failed_auth.exhausted(&cx.ft.client.ip(), cx.now),
        }
    }

    /// Counts a failed authentication (password guessing) against its sender: the
    /// 5-tuple's allocation when it holds one, else the source address.
    fn auth_failed(&mut self, held: Option<u32>, cx: &Ctx, why: AuthFailure) {
        self.counters.auth_failures += 1;
        self.counters.auth_failures_by[why as usize] += 1;
        let (per_sec, burst) = (self.cfg.failed_auth_per_sec, self.cfg.failed_auth_burst);
        match held {
            Some(idx) => {
                let now_ms = self.millis(cx.now);
                if per_sec > 0
                    && let Some(a) = self.table.get_mut(idx)
                {
                    let _ = a.strikes.take(now_ms, per_sec, burst);
                }
            }
            None => {
                let _ = self.limits.failed_auth.allow(&cx.ft.client.ip(), cx.now);
            }
        }
    }

    /// Answers an unauthenticated or failed request (401, 400, 438), unless its source
    /// address already drew its share of such answers. A 5-tuple that holds an allocation
    /// (`held`) is always answered: it is a client of ours, not a reflection victim, and a
    /// Refresh with a stale nonce must get its 438 whatever others sent from its address.
    /// So is a TCP or TLS client: its address is proven by its handshake (nothing to
    /// reflect), and it does not retransmit (RFC 8489 §6.2.2), so an answer dropped would
    /// leave it waiting 39.5 s; connection limits bound what one address may open.
    pub(super) fn reject<'a>(
        &mut self,
        cx: &Ctx,
        signer: &Signer,
        rej: Rejection,
        held: Option<u32>,
        out: &'a mut [u8],
    ) -> Output<'a> {
        if held.is_none()
            && !cx.ft.transport.is_stream()
            && !self.limits.unauthenticated.allow(&cx.ft.client.ip(), cx.now)
        {
            self.counters.rate_limited_responses += 1;
            return self.dropped(DropReason::RateLimited);
        }
        let r = self.write_rejection(out, signer, rej, cx.ft, cx.unix_secs);
        self.respond(cx, out, r)
    }

    pub(super) fn write_rejection(
        &self,
        out: &mut [u8],
        signer: &Signer,
        rej: Rejection,
        ft: FiveTuple,
        unix_secs: u64,
    ) -> Result<usize, EncodeError> {
        // No more than the client needs (an unauthenticated answer may go to a spoofed
        // source): no reason phrase (RFC 8489 §14.8 allows an empty one), no SOFTWARE, a
        // FINGERPRINT only if the request had one.
        let code = match rej {
            Rejection::BadRequest | Rejection::Throttled => {
                return self.write_response(out, signer, Class::ErrorResponse, |enc| {
                    enc.error_code(code::BAD_REQUEST, "")
                });
            }
            Rejection::Unauthenticated => code::UNAUTHENTICATED,
            Rejection::StaleNonce => code::STALE_NONCE,
        };
        // After the 5-tuple's tombstone, if any, so that a real client's retry is taken.
        let nonce = self.nonces.issue(self.tombstones.nonce_time(&ft, unix_secs), ft.client);
        self.write_response(out, signer, Class::ErrorResponse, |enc| {
            enc.error_code(code, "")?;
            enc.raw(attr::REALM, self.cfg.realm.as_bytes())?;
            enc.raw(attr::NONCE, nonce.as_bytes())?;
            if !self.password_algorithms.is_empty() {
                enc.raw(attr::PASSWORD_ALGORITHMS, &self.password_algorithms)?;
            }
            Ok(())
        })
    }
}
