#!/usr/bin/env python3
"""Write the seed corpus (deterministic). Run from turn-proto/fuzz/."""
import os, struct

COOKIE = 0x2112A442

def attr(t, v):
    pad = (4 - len(v) % 4) % 4
    return struct.pack(">HH", t, len(v)) + v + b"\0" * pad

def msg(mtype, attrs, tid=b"\x01" * 12):
    body = b"".join(attrs)
    return struct.pack(">HHI", mtype, len(body), COOKIE) + tid + body

def xor4(ip, port):
    a = bytes(int(x) for x in ip.split("."))
    x = struct.unpack(">I", a)[0] ^ COOKIE
    return struct.pack(">BBHI", 0, 1, port ^ 0x2112, x)

def hexb(s):
    return bytes.fromhex("".join(s.split()))

RFC = {
 "rfc5769_request": """00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
   80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74 00 24 00 04 6e 00 01 ff
   80 29 00 08 93 2f f9 b1 51 26 3b 36 00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
   00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2 80 28 00 04 e5 7a 3b cf""",
 "rfc5769_ipv4_response": """01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
   80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20 00 20 00 08 00 01 a1 47 e1 12 a6 43
   00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7 80 28 00 04 c0 7d 4c 96""",
 "rfc5769_ipv6_response": """01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
   80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20 00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79
   bc 25 f4 b5 be d2 b9 d9 00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
   80 28 00 04 c8 fb 0b 4c""",
 "rfc5769_long_term": """00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
   00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
   00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34 73 41
   00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
   00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66""",
 "rfc8489_b1": """00 01 00 90 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
   00 1e 00 20 4a 3c f3 8f ef 69 92 bd a9 52 c6 78 04 17 da 0f 24 81 94 15 56 9e 60 b2 05 c4 6e 41 40 7f 17 04
   00 15 00 29 6f 62 4d 61 74 4a 6f 73 32 41 41 41 43 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33
   34 6f 4c 39 46 53 54 76 79 36 34 73 41 00 00 00
   00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00 00 1d 00 04 00 02 00 00
   00 1c 00 20 b5 c7 bf 00 5b 6c 52 a2 1c 51 c5 e8 92 f8 19 24 13 62 96 cb 92 7c 43 14 93 09 27 8c c6 51 8e 65""",
}

REQUESTED_TRANSPORT = attr(0x0019, bytes([17, 0, 0, 0]))
send = msg(0x0016, [attr(0x0012, xor4("198.51.100.21", 6000)), attr(0x0013, b"hello peer")])
allocate = msg(0x0003, [REQUESTED_TRANSPORT, attr(0x000D, struct.pack(">I", 1200)),
                        attr(0x8000, bytes([2, 0, 0, 0])), attr(0x0018, b"\x00")])
chan = struct.pack(">HH", 0x4000, 5) + b"hello"
binding = msg(0x0001, [])
create_perm = msg(0x0008, [attr(0x0012, xor4("198.51.100.22", 7000)), attr(0x0012, xor4("8.8.8.8", 53))])

def write(target, name, data):
    d = os.path.join("corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

for name, h in RFC.items():
    write("parse_message", name, hexb(h))
for name, m in [("send_indication", send), ("allocate", allocate), ("channel_data", chan),
                ("binding", binding), ("create_permission", create_perm)]:
    write("parse_message", name, m)

def rec(kind, payload):
    return bytes([kind]) + struct.pack(">H", len(payload)) + payload

seeds = {
    "refresh": rec(4, b"\x01" + attr(0x000D, struct.pack(">I", 900))),
    "channel_data": rec(0, chan),
    "peer_on_channel": rec(2, b"\x01" + b"from peer"),
    "peer_data_indication": rec(2, b"\x41" + b"from peer2") + rec(2, b"\x81" + b"other port"),
    "advance_then_refresh": rec(3, b"\x50") + rec(4, b"\x01") + rec(0, chan),
    "create_permission": rec(4, b"\x02" + attr(0x0012, xor4("198.51.100.22", 7000))) + rec(0, send),
    "channel_bind": rec(4, b"\x03" + attr(0x000C, b"\x40\x01\x00\x00") + attr(0x0012, xor4("198.51.100.22", 7000)))
                    + rec(0, struct.pack(">HH", 0x4001, 3) + b"abc"),
    "send": rec(0, send),
    "bob_dual_sha256": rec(5, b"\x80" + REQUESTED_TRANSPORT + attr(0x8000, bytes([2, 0, 0, 0]))),
    "bob_allocate_then_delete": rec(5, b"\x00" + REQUESTED_TRANSPORT) + rec(5, b"\x01" + attr(0x000D, b"\0\0\0\0")),
    "binding_b": rec(1, binding),
    "delete_then_data": rec(4, b"\x01" + attr(0x000D, b"\0\0\0\0")) + rec(0, chan) + rec(2, b"\x01x"),
    "expire_all": rec(3, b"\xff") + rec(3, b"\xff") + rec(3, b"\xff") + rec(0, chan),
}
for name, s in seeds.items():
    write("server_datagram", name, s)
