//! Data to and from peers: RFC 8656 §11.2 (Receiving a Send Indication), §11.3 and
//! §12.6 (Receiving Data from a Peer: ChannelData or a Data indication to the client),
//! and §11.5 (ICMP errors from peers).

use std::net::SocketAddr;
use std::time::Instant;

use super::{
    DropReason, FiveTuple, Output, PEER_HEADROOM, PeerIcmp, RelayAllocator, RelayId, Server,
};
use crate::channel_data;
use crate::stun::attr::{self, Attribute};
use crate::stun::message::pad4;
use crate::stun::{
    Class, EncodeError, Family, HEADER_LEN, MAGIC_COOKIE, Message, MessageEncoder, Method,
};

impl Server {
    /// RFC 8656 §11.2, Receiving a Send Indication.
    pub(super) fn send_indication<'a>(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        msg: &Message<'a>,
        relays: &(impl RelayAllocator + ?Sized),
    ) -> Output<'a> {
        let Some((idx, a)) = self.table.index_of(&ft).and_then(|i| Some((i, self.table.get(i)?)))
        else {
            return self.dropped(DropReason::NoAllocation);
        };
        if a.expires_at <= now {
            return self.dropped(DropReason::NoAllocation);
        }
        let (mut peer_v, mut data, mut df) = (None, None, false);
        for at in msg.attributes() {
            match at.typ {
                attr::XOR_PEER_ADDRESS if peer_v.is_none() => peer_v = Some(at.value),
                attr::DATA if data.is_none() => data = Some(at.value),
                attr::DONT_FRAGMENT => df = true,
                t if t < 0x8000 && !attr::is_known(t) => {
                    // Unknown comprehension-required: discard.
                    return self.dropped(DropReason::InvalidSend);
                }
                _ => {}
            }
        }
        // "MUST contain both an XOR-PEER-ADDRESS attribute and a DATA
        // attribute. If one of these attributes is missing or invalid, then
        // the message is discarded."
        let (Some(peer_v), Some(data)) = (peer_v, data) else {
            return self.dropped(DropReason::InvalidSend);
        };
        let Ok(peer) = attr::decode_xor_address(peer_v, &msg.transaction_id()) else {
            return self.dropped(DropReason::InvalidSend);
        };
        // "If the server is unable to set the DF bit ... acts as if the
        // DONT-FRAGMENT attribute is an unknown comprehension-required
        // attribute (and thus the Send indication is discarded)."
        if df && !self.cfg.dont_fragment {
            return self.dropped(DropReason::InvalidSend);
        }
        let Some(relay) = a.relay_for(Family::of(&peer.ip())) else {
            return self.dropped(DropReason::FamilyMismatch);
        };
        // "The server also checks that there is a permission installed for
        // the IP address ... If no such permission exists, the message is
        // discarded. ... a Send indication never causes the server to
        // refresh the permission."
        if !a.has_permission(&peer.ip(), now) {
            return self.dropped(DropReason::NoPermission);
        }
        // "The server MAY impose restrictions on the IP address and port
        // values ... silently discards".
        if self.cfg.peer_policy.check_peer_held(&peer, |a| relays.holds(a)).is_err() {
            return self.dropped(DropReason::PeerDenied);
        }
        if let Some(a) = self.table.get_mut(idx) {
            a.traffic.to_peer_packets += 1;
            a.traffic.to_peer_bytes += data.len() as u64;
        }
        self.counters.to_peer += 1;
        self.counters.to_peer_traffic.add(ft.transport, data.len());
        Output::ToPeer { relay: relay.id, peer, data, dont_fragment: df }
    }

    /// Handle a datagram received on relay socket `relay` from `peer`
    /// (RFC 8656 §11.3, §12.6).
    ///
    /// Buffer contract (no copy of the payload): the caller receives the
    /// peer datagram into `buf[PEER_HEADROOM..PEER_HEADROOM + len]`, with
    /// `buf.len() >= PEER_HEADROOM + len + PEER_TAILROOM`. The server writes
    /// the ChannelData header (4 bytes) or the Data indication header (36
    /// or 48 bytes) right in front of the payload and padding behind it,
    /// and returns [`Output::ToClient`] with the framed slice of `buf`. For a client on
    /// TCP or TLS a ChannelData message is padded with zeros to a multiple of four bytes
    /// (RFC 8656 §12.5; the length field gives the payload's length, not the padding).
    pub fn handle_peer_datagram<'a>(
        &mut self,
        now: Instant,
        relay: RelayId,
        peer: SocketAddr,
        buf: &'a mut [u8],
        len: usize,
    ) -> Output<'a> {
        let Some(a) = self.table.index_of_relay(&relay).and_then(|i| self.table.get_mut(i)) else {
            return self.dropped(DropReason::UnknownRelay);
        };
        if a.expires_at <= now {
            return self.dropped(DropReason::NoAllocation);
        }
        let end = PEER_HEADROOM.saturating_add(len);
        if buf.len() < end {
            return self.dropped(DropReason::BufferTooSmall);
        }
        // "checks to see whether the set of permissions for the allocation
        // allow the relaying of the UDP datagram".
        if !a.has_permission(&peer.ip(), now) {
            return self.dropped(DropReason::NoPermission);
        }
        let (ft, conn) = (a.five_tuple, a.conn);
        // "If relaying is permitted, then the server checks if there is a
        // channel bound to the peer ... [then] ChannelData" (§12.6).
        if let Some(ch) = a.active_channel_for_peer(&peer, now) {
            let number = ch.number;
            let Ok(len16) = u16::try_from(len) else {
                return self.dropped(DropReason::PayloadTooLarge);
            };
            let start = PEER_HEADROOM - channel_data::CHANNEL_DATA_HEADER_LEN;
            // "Over TCP and TLS-over-TCP, the ChannelData message MUST be padded to a
            // multiple of four bytes in order to ensure the alignment of subsequent
            // messages." (§12.5) Over UDP the padding is optional: none is sent.
            let framed_end = if ft.transport.is_stream() { PEER_HEADROOM + pad4(len) } else { end };
            if buf.len() < framed_end {
                return self.dropped(DropReason::BufferTooSmall);
            }
            let mut head = [0u8; 4];
            channel_data::write_header(&mut head, number, len16);
            buf[start..PEER_HEADROOM].copy_from_slice(&head);
            buf[end..framed_end].fill(0);
            a.traffic.to_client_packets += 1;
            a.traffic.to_client_bytes += len as u64;
            self.counters.channel_data_to_client += 1;
            self.counters.to_client_traffic.add(ft.transport, len);
            let buf: &'a [u8] = buf;
            return Output::ToClient { five_tuple: ft, conn, data: &buf[start..framed_end] };
        }
        // "... no channel is bound to the peer, then the server forms and
        // sends a Data indication" with XOR-PEER-ADDRESS and DATA.
        let addr_len = attr::address_len(&peer);
        let header_len = HEADER_LEN + 4 + addr_len + 4;
        let body_len = 4 + addr_len + 4 + pad4(len);
        if body_len > 0xFFFC {
            return self.dropped(DropReason::PayloadTooLarge);
        }
        let padded_end = PEER_HEADROOM + pad4(len);
        if buf.len() < padded_end {
            return self.dropped(DropReason::BufferTooSmall);
        }
        let txid = self.next_txid();
        let start = PEER_HEADROOM - header_len;
        let h = &mut buf[start..PEER_HEADROOM];
        h[0..2].copy_from_slice(
            &crate::stun::message::message_type(Method::DATA, Class::Indication).to_be_bytes(),
        );
        h[2..4].copy_from_slice(&(body_len as u16).to_be_bytes());
        h[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        h[8..20].copy_from_slice(&txid.0);
        h[20..22].copy_from_slice(&attr::XOR_PEER_ADDRESS.to_be_bytes());
        h[22..24].copy_from_slice(&(addr_len as u16).to_be_bytes());
        attr::write_xor_address(&mut h[24..24 + addr_len], peer, &txid);
        let d = 24 + addr_len;
        h[d..d + 2].copy_from_slice(&attr::DATA.to_be_bytes());
        h[d + 2..d + 4].copy_from_slice(&(len as u16).to_be_bytes());
        buf[end..padded_end].fill(0);
        if let Some(a) = self.table.index_of_relay(&relay).and_then(|i| self.table.get_mut(i)) {
            a.traffic.to_client_packets += 1;
            a.traffic.to_client_bytes += len as u64;
        }
        self.counters.data_indications_to_client += 1;
        self.counters.to_client_traffic.add(ft.transport, len);
        let buf: &'a [u8] = buf;
        Output::ToClient { five_tuple: ft, conn, data: &buf[start..padded_end] }
    }

    /// Report an ICMP error the relay socket received for traffic to
    /// `peer` (RFC 8656 §11.5): if a permission exists, the client gets a
    /// Data indication with ICMP and XOR-PEER-ADDRESS (and no DATA),
    /// written into `out`. Optional: daemons that do not read socket error
    /// queues never call it.
    pub fn handle_peer_icmp<'a>(
        &mut self,
        now: Instant,
        relay: RelayId,
        icmp: PeerIcmp,
        out: &'a mut [u8],
    ) -> Output<'a> {
        let peer = icmp.peer;
        let Some(a) = self.table.index_of_relay(&relay).and_then(|i| self.table.get(i)) else {
            return self.dropped(DropReason::UnknownRelay);
        };
        if a.expires_at <= now {
            return self.dropped(DropReason::NoAllocation);
        }
        // "... checks to see whether the set of permissions for the
        // allocation allows the relaying of the ICMP packet".
        if !a.has_permission(&peer.ip(), now) {
            return self.dropped(DropReason::NoPermission);
        }
        let (ft, conn) = (a.five_tuple, a.conn);
        let txid = self.next_txid();
        let r = (|| {
            let mut enc = MessageEncoder::new(out, Method::DATA, Class::Indication, &txid)?;
            Attribute::Icmp { typ: icmp.icmp_type, code: icmp.icmp_code, data: icmp.info }
                .encode(&mut enc)?;
            enc.xor_address(attr::XOR_PEER_ADDRESS, peer)?;
            Ok::<usize, EncodeError>(enc.finish())
        })();
        match r {
            Ok(n) => {
                let out: &'a [u8] = out;
                Output::ToClient { five_tuple: ft, conn, data: &out[..n] }
            }
            Err(_) => self.dropped(DropReason::BufferTooSmall),
        }
    }
}
