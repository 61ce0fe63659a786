//! Channels: RFC 8656 §12.2 (Receiving a ChannelBind Request) and §12.4 (Receiving a
//! ChannelData Message from the client).

use std::time::Instant;

use super::auth::Auth;
use super::responses::{BAD_REQUEST, Reply, TurnError, code};
use super::{ChannelBinding, DropReason, FiveTuple, Output, RelayAllocator, Server, secs};
use crate::channel_data;
use crate::channel_data::ChannelData;
use crate::stun::attr;
use crate::stun::attr::Attribute;
use crate::stun::{Family, Message};

impl Server {
    /// RFC 8656 §12.4 (server receiving ChannelData from the client).
    #[inline]
    pub(super) fn client_channel_data<'a>(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        datagram: &'a [u8],
        relays: &(impl RelayAllocator + ?Sized),
    ) -> Output<'a> {
        let Ok(cd) = ChannelData::parse(datagram) else {
            return self.dropped(DropReason::MalformedChannelData);
        };
        let Some(a) = self.table.index_of(&ft).and_then(|i| self.table.get_mut(i)) else {
            return self.dropped(DropReason::NoAllocation);
        };
        if a.expires_at <= now {
            return self.dropped(DropReason::NoAllocation);
        }
        // "If the ChannelData message is received on a channel that is not
        // bound to any peer, then the message is silently discarded."
        let Some(ch) = a.active_channel(cd.channel, now) else {
            return self.dropped(DropReason::NoChannel);
        };
        let peer = ch.peer;
        // Another allocation's relayed address is a peer only while a relay holds it: once
        // its allocation ended, whatever takes that port is not one.
        if ch.relayed && !relays.holds(peer) {
            return self.dropped(DropReason::PeerDenied);
        }
        // Relaying also requires a permission for the peer (RFC 8656 §9).
        if !a.has_permission(&peer.ip(), now) {
            return self.dropped(DropReason::NoPermission);
        }
        let Some(relay) = a.relay_for(Family::of(&peer.ip())) else {
            return self.dropped(DropReason::FamilyMismatch);
        };
        a.traffic.to_peer_packets += 1;
        a.traffic.to_peer_bytes += cd.payload.len() as u64;
        self.counters.to_peer += 1;
        self.counters.to_peer_traffic.add(ft.transport, cd.payload.len());
        Output::ToPeer { relay: relay.id, peer, data: cd.payload, dont_fragment: false }
    }

    /// RFC 8656 §12.2, Receiving a ChannelBind Request.
    pub(super) fn channel_bind(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        msg: &Message<'_>,
        auth: &Auth<'_>,
        relays: &(impl RelayAllocator + ?Sized),
    ) -> Result<Reply, TurnError> {
        let idx = self.owned_allocation(&ft, now, auth)?;
        let tid = msg.transaction_id();
        // "The request contains both a CHANNEL-NUMBER and an
        // XOR-PEER-ADDRESS attribute" (else 400).
        let number = match msg
            .get(attr::CHANNEL_NUMBER)
            .map(|v| Attribute::decode(attr::CHANNEL_NUMBER, v, &tid))
        {
            Some(Ok(Attribute::ChannelNumber(n))) => n,
            _ => return Err(BAD_REQUEST),
        };
        let peer = match msg.get(attr::XOR_PEER_ADDRESS) {
            Some(v) => attr::decode_xor_address(v, &tid).map_err(|_| BAD_REQUEST)?,
            None => return Err(BAD_REQUEST),
        };
        // "The channel number is in the range 0x4000 through 0x4FFF" (RFC 8656 §12.2);
        // we accept RFC 5766's 0x4000-0x7FFF for deployed clients (see channel_data).
        if !channel_data::is_valid_channel(number) {
            return Err(BAD_REQUEST);
        }
        let Some(a) = self.table.get(idx) else {
            return Err(TurnError::Code(code::ALLOCATION_MISMATCH));
        };
        // Family mismatch with the relayed addresses -> 443.
        if a.relay_for(Family::of(&peer.ip())).is_none() {
            return Err(TurnError::Code(code::PEER_ADDRESS_FAMILY_MISMATCH));
        }
        // "The channel number is not currently bound to a different
        // transport address (same transport address is OK); the transport
        // address is not currently bound to a different channel number."
        // Bindings in their hold-down period still count (RFC 8656 §12).
        if a.channels.iter().any(|c| (c.number == number) != (c.peer == peer)) {
            return Err(BAD_REQUEST);
        }
        // Peer policy -> 403.
        let policy = &self.cfg.peer_policy;
        if policy.check_peer_held(&peer, |a| relays.holds(a)).is_err() {
            return Err(TurnError::Code(code::FORBIDDEN));
        }
        // Allowed only as another allocation's relayed address?
        let relayed = policy.check_peer_held(&peer, |_| false).is_err();
        // Capacity -> 508.
        let existing = a.channels.iter().any(|c| c.number == number);
        if !existing && a.channels.len() >= self.cfg.max_channels_per_allocation {
            return Err(TurnError::Code(code::INSUFFICIENT_CAPACITY));
        }
        let needs_permission = !a.permissions.iter().any(|p| p.ip == peer.ip());
        if needs_permission && a.permissions.len() >= self.cfg.max_permissions_per_allocation {
            return Err(TurnError::Code(code::INSUFFICIENT_CAPACITY));
        }
        let channel_expiry = now + secs(self.cfg.channel_lifetime_secs);
        let permission_expiry = now + secs(self.cfg.permission_lifetime_secs);
        let cap = self.cfg.max_permissions_per_allocation;
        if let Some(a) = self.table.get_mut(idx) {
            // "creates or refreshes the channel binding".
            match a.channels.iter_mut().find(|c| c.number == number) {
                Some(c) => {
                    c.expires_at = c.expires_at.max(channel_expiry);
                    c.relayed = relayed;
                }
                None => a.channels.push(ChannelBinding {
                    number,
                    peer,
                    expires_at: channel_expiry,
                    relayed,
                }),
            }
            // "also installs or refreshes a permission for the IP address".
            a.install_permission(peer.ip(), permission_expiry, cap);
        }
        self.sync_fast_path(idx, Some(now));
        self.table.reschedule(idx);
        Ok(Reply::Empty)
    }
}
