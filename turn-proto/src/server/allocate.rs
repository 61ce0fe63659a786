//! Allocations: RFC 8656 §7.2 (Receiving an Allocate Request) and §7.3 (Receiving a
//! Refresh Request), and the lookup every other request starts with (RFC 8656 §5).

use std::time::Instant;

use super::auth::Auth;
use super::responses::{BAD_REQUEST, Reply, TurnError, code};
use super::table;
use super::table::family_index;
use super::{
    Ctx, DeleteReason, Event, FiveTuple, Host, Quota, RelayAllocator, RelayError, RelayRequest,
    RelaySocket, Server, secs,
};
use crate::stun::attr;
use crate::stun::attr::Attribute;
use crate::stun::{AttrList, Family, Message};

pub(super) fn remaining_secs(expires_at: Instant, now: Instant) -> u32 {
    let d = expires_at.saturating_duration_since(now);
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

impl Server {
    /// Lifetime rule of RFC 8656 §7.2 / §7.3: min(requested, max), but at
    /// least the default.
    pub(super) fn granted_lifetime(&self, requested: Option<u32>) -> u32 {
        let default = self.cfg.default_allocation_lifetime_secs;
        match requested {
            Some(r) => r.min(self.cfg.max_allocation_lifetime_secs).max(default),
            None => default,
        }
    }

    pub(super) fn family_enabled(&self, f: Family) -> bool {
        match f {
            Family::V4 => self.cfg.relay_ipv4,
            Family::V6 => self.cfg.relay_ipv6,
        }
    }

    /// Find the allocation of an authenticated non-Allocate request:
    /// 437 if none (RFC 8656 §5), 441 if another user created it.
    pub(super) fn owned_allocation(
        &self,
        ft: &FiveTuple,
        now: Instant,
        auth: &Auth<'_>,
    ) -> Result<u32, TurnError> {
        let idx = self.table.index_of(ft).ok_or(TurnError::Code(code::ALLOCATION_MISMATCH))?;
        let a = self.table.get(idx).ok_or(TurnError::Code(code::ALLOCATION_MISMATCH))?;
        if a.expires_at <= now {
            return Err(TurnError::Code(code::ALLOCATION_MISMATCH));
        }
        if *a.username != *self.creds.name(auth.identity) {
            return Err(TurnError::Code(code::WRONG_CREDENTIALS));
        }
        Ok(idx)
    }

    /// RFC 8656 §7.2, Receiving an Allocate Request.
    pub(super) fn allocate<R, Q>(
        &mut self,
        cx: &Ctx,
        msg: &Message<'_>,
        auth: &Auth<'_>,
        host: &mut Host<'_, R, Q>,
    ) -> Result<Reply, TurnError>
    where
        R: RelayAllocator + ?Sized,
        Q: Quota + ?Sized,
    {
        let (now, ft) = (cx.now, cx.ft);
        let txid = msg.transaction_id();
        // An allocation whose lifetime ran out but whose timer has not
        // fired yet is gone for every purpose.
        if let Some(idx) = self.table.index_of(&ft)
            && self.table.get(idx).is_some_and(|a| a.expires_at <= now)
        {
            self.delete_allocation(idx, DeleteReason::Expired, Some(now), host);
        }
        let username = self.creds.name(auth.identity);
        // Step 2: "checks if the 5-tuple is currently in use by an existing
        // allocation. If yes, the server rejects the request with a 437".
        // A retransmission of the request that created it gets the same
        // success back (the cache normally answers it first).
        if let Some(idx) = self.table.index_of(&ft) {
            return match self.table.get(idx) {
                Some(a)
                    if a.allocate_txid == txid
                        && *a.username == *username
                        && a.expires_at > now =>
                {
                    Ok(Reply::Allocate {
                        relayed: [a.relays[0].map(|r| r.addr), a.relays[1].map(|r| r.addr)],
                        lifetime_secs: remaining_secs(a.expires_at, now),
                        mapped: ft.client,
                        address_error: a.address_error,
                    })
                }
                _ => Err(TurnError::Code(code::ALLOCATION_MISMATCH)),
            };
        }
        let tid = msg.transaction_id();
        let decode = |t| msg.get(t).map(|v| Attribute::decode(t, v, &tid));
        // Step 3: REQUESTED-TRANSPORT missing or malformed -> 400; not UDP -> 442.
        match decode(attr::REQUESTED_TRANSPORT) {
            Some(Ok(Attribute::RequestedTransport(attr::PROTOCOL_UDP))) => {}
            Some(Ok(Attribute::RequestedTransport(_))) => {
                return Err(TurnError::Code(code::UNSUPPORTED_TRANSPORT_PROTOCOL));
            }
            _ => return Err(BAD_REQUEST),
        }
        // Step 4: DONT-FRAGMENT unsupported -> as an unknown
        // comprehension-required attribute (420).
        let dont_fragment = msg.has(attr::DONT_FRAGMENT);
        if dont_fragment && !self.cfg.dont_fragment {
            let mut l = AttrList::new();
            l.push(attr::DONT_FRAGMENT);
            return Err(TurnError::Unknown(l));
        }
        let even_port = match decode(attr::EVEN_PORT) {
            None => None,
            Some(Ok(Attribute::EvenPort(r))) => Some(r),
            Some(_) => return Err(BAD_REQUEST),
        };
        let requested_family = match decode(attr::REQUESTED_ADDRESS_FAMILY) {
            None => None,
            Some(Ok(Attribute::RequestedAddressFamily(f))) => Some(f),
            Some(_) => return Err(BAD_REQUEST),
        };
        let additional_family = match decode(attr::ADDITIONAL_ADDRESS_FAMILY) {
            None => None,
            Some(Ok(Attribute::AdditionalAddressFamily(f))) => Some(f),
            Some(_) => return Err(BAD_REQUEST),
        };
        // Step 5: RESERVATION-TOKEN with EVEN-PORT, REQUESTED- or
        // ADDITIONAL-ADDRESS-FAMILY -> 400; otherwise the token must be
        // valid, and since this server never hands out reservations no
        // token is: 508.
        if msg.has(attr::RESERVATION_TOKEN) {
            if even_port.is_some() || requested_family.is_some() || additional_family.is_some() {
                return Err(BAD_REQUEST);
            }
            return Err(TurnError::Code(code::INSUFFICIENT_CAPACITY));
        }
        // Step 6: both REQUESTED- and ADDITIONAL-ADDRESS-FAMILY -> 400.
        if requested_family.is_some() && additional_family.is_some() {
            return Err(BAD_REQUEST);
        }
        // Step 7: unsupported or disabled family -> 440; absent -> IPv4.
        let primary = requested_family.unwrap_or(Family::V4);
        if additional_family.is_none() && !self.family_enabled(primary) {
            return Err(TurnError::Code(code::ADDRESS_FAMILY_NOT_SUPPORTED));
        }
        // Step 8: EVEN-PORT with R=1 and ADDITIONAL-ADDRESS-FAMILY -> 400;
        // otherwise "if the server cannot satisfy the request" -> 508. This
        // server does not reserve the next port (R=1).
        if even_port == Some(true) {
            if additional_family.is_some() {
                return Err(BAD_REQUEST);
            }
            return Err(TurnError::Code(code::INSUFFICIENT_CAPACITY));
        }
        let requested_lifetime = match decode(attr::LIFETIME) {
            None => None,
            Some(Ok(Attribute::Lifetime(l))) => Some(l),
            Some(_) => return Err(BAD_REQUEST),
        };
        // Step 9: ADDITIONAL-ADDRESS-FAMILY must be IPv6 (0x02) -> else 400.
        let dual = match additional_family {
            Some(Family::V4) => return Err(BAD_REQUEST),
            Some(Family::V6) => true,
            None => false,
        };
        if self.table.len() >= self.cfg.max_allocations {
            return Err(TurnError::Code(code::INSUFFICIENT_CAPACITY));
        }
        // Step 10: "the server MAY choose to reject the request with a 486
        // (Allocation Quota Reached) error".
        let username: Box<str> = username.into();
        let quota_key: Box<str> = self.creds.quota_key(auth.identity).into();
        if host.quota.try_acquire(&quota_key, ft.client.ip()).is_err() {
            self.counters.quota_rejections += 1;
            return Err(TurnError::Code(code::ALLOCATION_QUOTA_REACHED));
        }
        let mut request = RelayRequest {
            family: primary,
            even_port: even_port == Some(false),
            dont_fragment,
            five_tuple: ft,
            username: &username,
        };
        let families: &[Family] =
            if dual { &[Family::V4, Family::V6] } else { std::slice::from_ref(&primary) };
        let mut granted: [Option<RelaySocket>; 2] = [None, None];
        let mut failures: [Option<u16>; 2] = [None, None];
        for &family in families {
            let i = family_index(family);
            if !self.family_enabled(family) {
                failures[i] = Some(code::ADDRESS_FAMILY_NOT_SUPPORTED);
                continue;
            }
            request.family = family;
            match host.relays.allocate(&request) {
                Ok((id, addr)) => {
                    let clash = self.table.relay_in_use(&id)
                        || granted.iter().flatten().any(|r| r.id == id);
                    if clash {
                        // A daemon bug: never release an id we did not get.
                        self.counters.relay_id_collisions += 1;
                        failures[i] = Some(code::INSUFFICIENT_CAPACITY);
                    } else {
                        granted[i] = Some(RelaySocket { id, addr });
                    }
                }
                Err(e) => {
                    self.counters.relay_failures += 1;
                    failures[i] = Some(match e {
                        RelayError::FamilyNotSupported => code::ADDRESS_FAMILY_NOT_SUPPORTED,
                        RelayError::InsufficientCapacity => code::INSUFFICIENT_CAPACITY,
                    });
                }
            }
        }
        if granted.iter().all(Option::is_none) {
            host.quota.release(&quota_key, ft.client.ip());
            // Both failed: 440 only if every family was unsupported.
            let code =
                if failures.iter().flatten().all(|&c| c == code::ADDRESS_FAMILY_NOT_SUPPORTED) {
                    code::ADDRESS_FAMILY_NOT_SUPPORTED
                } else {
                    code::INSUFFICIENT_CAPACITY
                };
            return Err(TurnError::Code(code));
        }
        // Step 9 (partial success): "it includes ADDRESS-ERROR-CODE
        // attribute in the success response".
        let address_error = if dual {
            [Family::V4, Family::V6]
                .into_iter()
                .find_map(|f| failures[family_index(f)].map(|c| (f, c)))
        } else {
            None
        };
        let lifetime_secs = self.granted_lifetime(requested_lifetime);
        let mut alloc = table::Allocation::new(
            ft,
            username.clone(),
            quota_key,
            granted,
            now,
            now + secs(lifetime_secs),
            txid,
        );
        alloc.conn = cx.conn;
        alloc.address_error = address_error;
        alloc.dont_fragment = dont_fragment;
        self.table.insert(alloc);
        self.counters.allocations_created += 1;
        self.push_event(Event::AllocationCreated {
            five_tuple: ft,
            conn: cx.conn,
            username,
            relays: granted,
            lifetime_secs,
        });
        Ok(Reply::Allocate {
            relayed: [granted[0].map(|r| r.addr), granted[1].map(|r| r.addr)],
            lifetime_secs,
            mapped: ft.client,
            address_error,
        })
    }

    /// RFC 8656 §7.3, Receiving a Refresh Request.
    pub(super) fn refresh<R, Q>(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        msg: &Message<'_>,
        auth: &Auth<'_>,
        host: &mut Host<'_, R, Q>,
    ) -> Result<Reply, TurnError>
    where
        R: RelayAllocator + ?Sized,
        Q: Quota + ?Sized,
    {
        let idx = self.owned_allocation(&ft, now, auth)?;
        let tid = msg.transaction_id();
        let requested_family = match msg.get(attr::REQUESTED_ADDRESS_FAMILY) {
            None => None,
            Some(v) => match Attribute::decode(attr::REQUESTED_ADDRESS_FAMILY, v, &tid) {
                Ok(Attribute::RequestedAddressFamily(f)) => Some(f),
                _ => return Err(BAD_REQUEST),
            },
        };
        let requested = match msg.get(attr::LIFETIME) {
            None => None,
            Some(v) => Some(attr::decode_u32(v).map_err(|_| BAD_REQUEST)?),
        };
        let Some(a) = self.table.get(idx) else {
            return Err(TurnError::Code(code::ALLOCATION_MISMATCH));
        };
        // "If the server receives a Refresh Request with a
        // REQUESTED-ADDRESS-FAMILY attribute and the attribute value does
        // not match the address family of the allocation, the server MUST
        // reply with a 443".
        if let Some(f) = requested_family
            && a.relay_for(f).is_none()
        {
            return Err(TurnError::Code(code::PEER_ADDRESS_FAMILY_MISMATCH));
        }
        // "If the request contains a LIFETIME attribute and the attribute
        // value is zero, then the 'desired lifetime' is zero. Otherwise ...
        // min(requested, max) ... if greater than the default ... else the
        // default."
        let desired = match requested {
            Some(0) => 0,
            r => self.granted_lifetime(r),
        };
        if desired == 0 {
            // "If the 'desired lifetime' is zero, then the request succeeds
            // and the allocation is deleted." With REQUESTED-ADDRESS-FAMILY
            // on a dual allocation only that family's relay goes.
            let other_remains = requested_family
                .is_some_and(|f| a.relays.iter().flatten().any(|r| Family::of(&r.addr.ip()) != f));
            match requested_family {
                Some(f) if other_remains => {
                    if let Some(r) = self.table.remove_relay(idx, f) {
                        host.relays.release(r.id);
                    }
                    self.sync_fast_path(idx, Some(now));
                }
                _ => self.delete_allocation(idx, DeleteReason::ClientRequest, Some(now), host),
            }
            return Ok(Reply::Refresh { lifetime_secs: 0 });
        }
        // "If the 'desired lifetime' is non-zero, then the request succeeds
        // and the allocation's time-to-expiry is set to the 'desired
        // lifetime'."
        let username = a.username.clone();
        if let Some(a) = self.table.get_mut(idx) {
            a.expires_at = now + secs(desired);
        }
        self.sync_fast_path(idx, Some(now));
        self.table.reschedule(idx);
        self.counters.allocations_refreshed += 1;
        self.push_event(Event::AllocationRefreshed {
            five_tuple: ft,
            username,
            lifetime_secs: desired,
        });
        Ok(Reply::Refresh { lifetime_secs: desired })
    }
}
