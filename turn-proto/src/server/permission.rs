//! Permissions: RFC 8656 §9.2 (Receiving a CreatePermission Request).

use std::time::Instant;

use super::auth::Auth;
use super::responses::{BAD_REQUEST, Reply, TurnError, code};
use super::{FiveTuple, Server, secs};
use crate::stun::attr;
use crate::stun::{Family, Message};

impl Server {
    /// RFC 8656 §9.2, Receiving a CreatePermission Request.
    pub(super) fn create_permission(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        msg: &Message<'_>,
        auth: &Auth<'_>,
    ) -> Result<Reply, TurnError> {
        let idx = self.owned_allocation(&ft, now, auth)?;
        let tid = msg.transaction_id();
        let cap = self.cfg.max_permissions_per_allocation;
        let Some(a) = self.table.get(idx) else {
            return Err(TurnError::Code(code::ALLOCATION_MISMATCH));
        };
        // "The CreatePermission request MUST contain at least one
        // XOR-PEER-ADDRESS attribute ... If no such attribute exists, or if
        // any of these attributes are invalid, then a 400".
        let mut count = 0usize;
        let mut new_ips = 0usize;
        for v in msg.get_all(attr::XOR_PEER_ADDRESS) {
            let peer = attr::decode_xor_address(v, &tid).map_err(|_| BAD_REQUEST)?;
            count += 1;
            // "If an XOR-PEER-ADDRESS attribute contains an address of an
            // address family that is not the same as that of a relayed
            // transport address for the allocation, ... 443".
            if a.relay_for(Family::of(&peer.ip())).is_none() {
                return Err(TurnError::Code(code::PEER_ADDRESS_FAMILY_MISMATCH));
            }
            // "The server MAY impose restrictions on the IP address ... if a
            // value is not allowed, the server rejects the request with a
            // 403".
            if self.cfg.peer_policy.check_ip(&peer.ip()).is_err() {
                return Err(TurnError::Code(code::FORBIDDEN));
            }
            if !a.permissions.iter().any(|p| p.ip == peer.ip()) {
                new_ips += 1;
            }
        }
        if count == 0 {
            return Err(BAD_REQUEST);
        }
        // "If the request is valid, but the server is unable to satisfy the
        // request due to some capacity limit or similar, then a 508". The
        // check is conservative (duplicates in one request count twice), so
        // nothing is installed unless everything fits.
        if a.permissions.len() + new_ips > cap {
            return Err(TurnError::Code(code::INSUFFICIENT_CAPACITY));
        }
        let expires_at = now + secs(self.cfg.permission_lifetime_secs);
        if let Some(a) = self.table.get_mut(idx) {
            for v in msg.get_all(attr::XOR_PEER_ADDRESS) {
                if let Ok(peer) = attr::decode_xor_address(v, &tid) {
                    // "installs or refreshes a permission for the IP address
                    // ... The port portion of each attribute is ignored".
                    a.install_permission(peer.ip(), expires_at, cap);
                }
            }
        }
        self.sync_fast_path(idx, Some(now));
        self.table.reschedule(idx);
        Ok(Reply::Empty)
    }
}
