#!/usr/bin/env python3
"""Writes the seed corpus (fuzz/seeds/<target>/seed-*) from the requests the tests use.

Input layout (fuzz/src/input.rs): selector byte, piece count, piece sizes, payload."""
import hashlib, os

HERE = os.path.dirname(os.path.abspath(__file__))

def encode(selector, pieces, payload):
    return bytes([selector, len(pieces)]) + bytes(pieces) + payload

heads = [
    b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /path?q=1&r=[0] HTTP/1.1\r\nHost: example.com:8080\r\nAccept: */*\r\nX-Y: a b\r\n\r\n",
    b"\r\nGET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"POST /len HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /e HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: v\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n",
    b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n",
    b"GET http://h/x?y HTTP/1.1\r\nHost: h\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc",
    b"GET / HTTP/1.1\nHost: t\n\n",
    # refused
    b"GET / HTTP/1.1\r\nHost : t\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\rX: y\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nX: a\r\n folded\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: t\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET /a#b HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nExpect: teapot\r\n\r\n",
]
bodies = [
    (0, b"5\r\nhello\r\n0\r\n\r\n"),
    (0, b"5;a=b\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\nGET"),
    (0, b"ffffffffffffffff\r\nab"),
    (0, b"5\nhello\r\n0\r\n\r\n"),
    (0, b"3\r\nabcd\r\n0\r\n\r\n"),
    (0, b"1 ;ext\r\na\r\n0 \r\n\r\n"),
    (3, b"hello, world"),
    (21, b"0123456789abcdefghijklmnop"),
]
pipelined = [
    b"GET / HTTP/1.1\r\nHost: t\r\n\r\nPOST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabcGET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\nGET /never HTTP/1.1\r\nHost: t\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 35\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n",
    b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\nGET /after-close HTTP/1.1\r\nHost: t\r\n\r\n",
    b"HEAD /h HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nxyGET / HTTP/1.1\r\nHost: t\r\n\r\n",
    b"POST /e HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\nbodyGET / HTTP/1.1\r\nHost: t\r\n\r\n",
    b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nshort",
]

def write(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    digest = hashlib.sha1(data).hexdigest()[:12]
    with open(os.path.join(d, f"seed-{name}-{digest}"), "wb") as f:
        f.write(data)

for i, h in enumerate(heads):
    write("head", str(i), encode(0, [], h))
    write("head", f"{i}-split", encode(1, [1, 3, 7], h))
    write("differential", str(i), encode(1, [], h))
for i, (sel, b) in enumerate(bodies):
    write("body", str(i), encode(sel, [], b))
    write("body", f"{i}-split", encode(sel, [2, 1, 5], b))
for i, p in enumerate(heads + pipelined):
    write("connection", str(i), encode(0, [], p))
    write("connection", f"{i}-stalls", encode(0b01_011_010, [1, 2, 9], p))
