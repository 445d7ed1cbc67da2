//! Request decoding: a request head from bytes, then the body's framing, then its bytes.
//!
//! [`parse_head`] returns `Ok(None)` while the head is incomplete (incomplete input is never
//! an error, as in httparse), the parsed [`Head`] and its length once complete, or a
//! [`DecodeError`] naming what the client got wrong. [`BodyDecoder`] is a step function over
//! whatever bytes have arrived: it never needs the whole body, so it is fed split at every
//! byte in the tests below and with arbitrary splits by the fuzzers.

use std::mem::MaybeUninit;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};

/// Header slots on the stack for one parse; `Config::max_headers` is clamped to this.
///
/// 256 fields is more than twice what any browser sends, and the uninitialised array costs
/// nothing to create.
pub const MAX_HEADERS: usize = 256;

/// Bytes of chunk extensions accepted on one chunk-size line.
///
/// Extensions are skipped, never interpreted; the bound stops a client from streaming an
/// endless "size line" that never yields body bytes.
pub const MAX_CHUNK_EXT_BYTES: usize = 4096;

/// Bytes of trailer fields accepted after the last chunk (they are skipped).
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// What is wrong with a request; each maps to one status code (see `error.rs`).
///
/// Incomplete input is never an error: it is `Ok(None)` from [`parse_head`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The request is malformed (400); the text says how.
    Malformed(&'static str),
    /// The head is larger than the configured maximum (431).
    HeadTooLarge,
    /// The head has more header fields than the configured maximum (431).
    TooManyHeaders,
    /// The HTTP version is well-formed but not 1.0 or 1.1 (505).
    UnsupportedVersion,
    /// A transfer coding other than `chunked` was applied to the body (501).
    UnsupportedTransferCoding,
    /// An `Expect` other than `100-continue` (417).
    UnsupportedExpectation,
}

impl DecodeError {
    /// A short sentence for the client and the log.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Malformed(why) => why,
            DecodeError::HeadTooLarge => "request head is larger than the server accepts",
            DecodeError::TooManyHeaders => "request has more header fields than the server accepts",
            DecodeError::UnsupportedVersion => "only HTTP/1.0 and HTTP/1.1 are supported",
            DecodeError::UnsupportedTransferCoding => "only the chunked transfer coding is supported",
            DecodeError::UnsupportedExpectation => "only the 100-continue expectation is supported",
        }
    }
}

/// Limits applied while parsing a head.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest head in bytes (request line, fields and the blank line).
    pub max_head_bytes: usize,
    /// Most header fields; at most `MAX_HEADERS` (256).
    pub max_headers: usize,
}

/// How the request body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// Exactly this many bytes follow the head (0: no body).
    Length(u64),
    /// The body is chunked.
    Chunked,
}

/// A parsed request head: the request line, the fields, and what they imply.
#[derive(Debug)]
pub struct Head {
    /// The request method.
    pub method: Method,
    /// The request target.
    pub uri: Uri,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub version: Version,
    /// All header fields, in order.
    pub headers: HeaderMap,
    /// How the body is delimited.
    pub body: BodyLength,
    /// Whether the client wants the connection kept open after the response.
    pub keep_alive: bool,
    /// Whether the client waits for `100 Continue` before sending the body.
    pub expect_continue: bool,
    /// Whether the client offers to switch protocols: an HTTP/1.1 request with an `Upgrade`
    /// field named in `Connection` (RFC 9110 §7.8), or a `CONNECT` (§9.3.6). The handler
    /// decides; the connection stays HTTP/1.1 unless it takes the offer.
    pub upgrade: bool,
    /// Where the head's bytes are copied for the target and field values to share.
    store: HeadStore,
    /// Whether `uri` may hold a parsed target (not yet handed over).
    holds_target: bool,
}

impl Head {
    /// A placeholder that holds nothing: a `GET /` with no fields (no allocation).
    pub fn empty() -> Head {
        Head {
            method: Method::GET,
            uri: Uri::default(),
            version: Version::HTTP_11,
            headers: HeaderMap::new(),
            body: BodyLength::Length(0),
            keep_alive: true,
            expect_continue: false,
            upgrade: false,
            store: HeadStore::default(),
            holds_target: false,
        }
    }

    /// Drops what the head holds of a request (its target and field values), keeping the
    /// storage for the next head's bytes and the fields map's capacity. Nearly free once
    /// [`Head::hand_over`] took them (the usual case).
    pub fn clear(&mut self) {
        self.method = Method::GET;
        if std::mem::take(&mut self.holds_target) {
            self.uri = Uri::default();
        }
        if !self.headers.is_empty() {
            self.headers.clear();
        }
    }

    /// Moves the target and the fields into `request`, swapped with its own (a new request's
    /// empty defaults, which the head keeps: nothing is cloned, and nothing dropped).
    pub fn hand_over<B>(&mut self, request: &mut Request<B>) {
        std::mem::swap(request.uri_mut(), &mut self.uri);
        std::mem::swap(request.headers_mut(), &mut self.headers);
        self.holds_target = false;
    }
}

/// Storage that request heads are copied into, so that a head's target and field values can
/// be zero-copy slices of it (`Bytes`) that outlive the read buffer.
///
/// Heads are appended to one buffer of [`STORE_CHUNK`] bytes, and each is split off as its
/// own `Bytes`: a head costs a copy and a reference count, not an allocation. When the buffer
/// is full and every earlier head's slices are gone (the usual case: a request's fields are
/// dropped with it), `BytesMut::reserve` reuses it from the start; while a request still
/// holds some, a new buffer is allocated and the old one lives as long as they do. A head
/// larger than a chunk gets a copy of its own, so a store (kept in a pooled box) never grows
/// past one chunk.
#[derive(Default)]
struct HeadStore(BytesMut);

/// Bytes of a [`HeadStore`]'s buffer: about one browser's head (0.5 to 1 KiB), or dozens of
/// an API client's. A request still running keeps the buffer its head is in alive.
const STORE_CHUNK: usize = 1024;

impl HeadStore {
    /// A copy of `head` that its slices (the target, the field values) share.
    fn keep(&mut self, head: &[u8]) -> Bytes {
        if head.len() > STORE_CHUNK {
            return Bytes::copy_from_slice(head);
        }
        let store = &mut self.0;
        if store.capacity() < head.len() {
            store.reserve(STORE_CHUNK);
        }
        store.extend_from_slice(head);
        store.split().freeze()
    }
}

impl std::fmt::Debug for HeadStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeadStore")
    }
}

/// Parses a request head from the start of `buf`.
///
/// Returns the head and its length in bytes (the body, if any, starts there), `Ok(None)` if
/// more bytes are needed, or what is wrong. Leading empty lines are skipped (RFC 9112 §2.2).
#[cfg(any(test, feature = "fuzzing"))]
pub fn parse_head(buf: &[u8], limits: Limits) -> Result<Option<(Head, usize)>, DecodeError> {
    let mut head = Head::empty();
    Ok(parse_head_into(buf, limits, &mut head)?.map(|len| (head, len)))
}

/// [`parse_head`] into `head`, which keeps its place (no move of the head) and the storage
/// of its fields map if it has any (an empty map is not dropped and rebuilt). Returns the
/// head's length; unless that is returned, `head` holds no request (but something valid).
pub fn parse_head_into(buf: &[u8], limits: Limits, head: &mut Head) -> Result<Option<usize>, DecodeError> {
    let max_headers = limits.max_headers.min(MAX_HEADERS);
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots[..max_headers]) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > limits.max_head_bytes { Err(DecodeError::HeadTooLarge) } else { Ok(None) };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(DecodeError::TooManyHeaders),
        Err(httparse::Error::Version) => {
            return match version_error(buf) {
                Some(e) => Err(e),
                None if buf.len() > limits.max_head_bytes => Err(DecodeError::HeadTooLarge),
                None => Ok(None),
            }
        }
        Err(httparse::Error::HeaderName) => {
            return Err(DecodeError::Malformed(
                "invalid header field name (no whitespace is allowed before the colon, and obs-fold is rejected)",
            ))
        }
        Err(httparse::Error::HeaderValue) => {
            return Err(DecodeError::Malformed("invalid byte in a header field value"))
        }
        Err(httparse::Error::NewLine) => {
            return Err(DecodeError::Malformed("invalid line ending (a CR must be followed by LF)"))
        }
        Err(_) => return Err(DecodeError::Malformed("malformed request line")),
    };
    if len > limits.max_head_bytes {
        return Err(DecodeError::HeadTooLarge);
    }

    // One copy of the head; the target and every field value are zero-copy slices of it.
    let shared = head.store.keep(&buf[..len]);
    let slice = |part: &[u8]| shared.slice(offset(buf, part));

    let method = req.method.unwrap_or_default();
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| DecodeError::Malformed("invalid method"))?;
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let target = req.path.unwrap_or_default();
    let uri = parse_target(&method, target.as_bytes(), slice(target.as_bytes()))?;

    let headers = &mut head.headers;
    // (Empty already, unless an earlier parse into this head failed part way.)
    if !headers.is_empty() {
        headers.clear();
    }
    headers.reserve(req.headers.len());
    let mut framing = Framing::default();
    for field in req.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| DecodeError::Malformed("invalid header field name"))?;
        let value = HeaderValue::from_maybe_shared(slice(field.value))
            .map_err(|_| DecodeError::Malformed("invalid byte in a header field value"))?;
        framing.observe(&name, field.value)?;
        headers.append(name, value);
    }
    let body = framing.finish(version)?;
    let keep_alive = match version {
        Version::HTTP_10 => framing.keep_alive && !framing.close,
        _ => !framing.close,
    };
    // RFC 9110 §10.1.1: a 100-continue expectation in an HTTP/1.0 request is ignored.
    let expect_continue = framing.expect_continue && version == Version::HTTP_11 && body != BodyLength::Length(0);
    // RFC 9110 §7.8: an Upgrade in an HTTP/1.0 request is ignored (its Connection semantics
    // are not reliable there).
    let upgrade =
        version == Version::HTTP_11 && (method == Method::CONNECT || (framing.upgrade_option && framing.upgrade_field));
    // Field by field: assigning a whole `Head` would drop and rebuild the fields map.
    head.method = method;
    head.uri = uri;
    head.holds_target = true;
    head.version = version;
    head.body = body;
    head.keep_alive = keep_alive;
    head.expect_continue = expect_continue;
    head.upgrade = upgrade;
    Ok(Some(len))
}

/// Bytes of empty lines (CRLF or bare LF) before a request line, which a server should ignore
/// (RFC 9112 §2.2). The caller consumes them, so they never count against the head limit
/// and are never rescanned.
pub fn leading_empty_lines(buf: &[u8]) -> usize {
    let mut i = 0;
    loop {
        match buf[i..] {
            [b'\n', ..] => i += 1,
            [b'\r', b'\n', ..] => i += 2,
            _ => return i,
        }
    }
}

/// Decides when parsing a growing head can give a new answer, and how much of it to parse,
/// so that a head dribbled in one byte at a time costs linear time, not quadratic, and the
/// answer does not depend on how the bytes were split.
///
/// httparse is not incremental: it reparses from the start each time. Parsing helps once the
/// request line is complete (parse just that line: an early 400 or 505), and once the blank
/// line that ends the head has arrived or the head is over the limit (parse everything). In
/// between, the scanner looks at each new byte once. Parsing only the request line early
/// means an error in a field is reported when the head is complete, whatever the splits.
#[derive(Debug, Default, Clone)]
pub struct HeadScanner {
    /// Bytes of the buffer already scanned.
    scanned: usize,
    /// Whether the end of the request line has been seen.
    line_seen: bool,
}

impl HeadScanner {
    /// Whether it has not looked at this head yet.
    pub fn is_fresh(&self) -> bool {
        self.scanned == 0
    }

    /// How many bytes of `buf` (the same head as last time, with bytes appended) to parse
    /// now: all of them once the head has ended or is over `limit`; the request line when it
    /// has just ended; `None` when parsing cannot tell anything new.
    pub fn ready(&mut self, buf: &[u8], limit: usize) -> Option<usize> {
        let mut line_end = None;
        let mut head_end = buf.len() > limit;
        // A head ends at LF followed by LF or CRLF; start far enough back to see one that
        // straddles the previous end.
        for i in self.scanned.saturating_sub(2)..buf.len() {
            if buf[i] != b'\n' {
                continue;
            }
            if !self.line_seen {
                self.line_seen = true;
                line_end = Some(i + 1);
            }
            if matches!(buf[i + 1..], [b'\n', ..] | [b'\r', b'\n', ..]) {
                head_end = true;
                break;
            }
        }
        self.scanned = buf.len();
        if head_end {
            Some(buf.len())
        } else {
            line_end
        }
    }
}

/// The range `part` occupies inside `whole`; `part` must be a subslice of `whole`.
fn offset(whole: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    start..start + part.len()
}

/// Tells a well-formed but unsupported version (505) from a malformed one (400), or says
/// the version is still arriving. httparse rejects `HTTP/2` as soon as it sees the `2`;
/// deciding on the whole token keeps the answer independent of how the bytes were split.
fn version_error(buf: &[u8]) -> Option<DecodeError> {
    const SHAPE: &[u8] = b"HTTP/d.d";
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(buf.len());
    let rest = &buf[start..];
    let (line, complete) = match rest.iter().position(|&b| b == b'\n') {
        Some(end) => (&rest[..end], true),
        None => (rest, false),
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // request-line = method SP request-target SP HTTP-version: the third token, and no fourth.
    let tokens: Vec<&[u8]> = line.splitn(4, |&b| b == b' ').collect();
    const MALFORMED: DecodeError = DecodeError::Malformed("malformed request line (expected: METHOD TARGET HTTP/1.1)");
    let [_, _, token] = tokens[..] else { return Some(MALFORMED) };
    let fits = token.len() <= SHAPE.len()
        && token.iter().zip(SHAPE).all(|(&b, &s)| if s == b'd' { b.is_ascii_digit() } else { b == s });
    if !complete && fits {
        return None;
    }
    if complete && fits && token.len() == SHAPE.len() {
        Some(DecodeError::UnsupportedVersion)
    } else {
        Some(MALFORMED)
    }
}

/// Checks the request-target's form and characters, then builds the `Uri`.
fn parse_target(method: &Method, raw: &[u8], shared: Bytes) -> Result<Uri, DecodeError> {
    if !valid_target(method, raw) {
        return Err(DecodeError::Malformed("invalid request target (RFC 9112 section 3.2)"));
    }
    Uri::from_maybe_shared(shared).map_err(|_| DecodeError::Malformed("invalid request target"))
}

/// The request-target forms of RFC 9112 §3.2, in the characters of RFC 3986 §3:
///
/// 1. `CONNECT` takes only authority-form, `host:port`;
/// 2. `*` (asterisk-form) goes only with `OPTIONS`;
/// 3. origin-form is an absolute path with an optional query;
/// 4. anything else must be absolute-form, `http://` or `https://` then the authority, path
///    and query (we serve HTTP, so no other scheme can name a resource here).
///
/// Percent signs must start a `%XX` escape. A query may also hold `[ ] { } | \ ^ \``, which
/// RFC 3986 reserves or excludes but real clients send unescaped. A fragment (`#`) never
/// belongs in a request; userinfo (`user@`) is refused (RFC 9110 §4.2.4).
pub(crate) fn valid_target(method: &Method, target: &[u8]) -> bool {
    if method == Method::CONNECT {
        return match target.iter().rposition(|&b| b == b':') {
            Some(colon) => valid_host(&target[..colon]) && target[colon + 1..].iter().all(u8::is_ascii_digit),
            None => false,
        };
    }
    if target == b"*" {
        return method == Method::OPTIONS;
    }
    if target.first() == Some(&b'/') {
        return valid_path_and_query(target);
    }
    // absolute-form: scheme "://" authority path-abempty [ "?" query ]
    let Some(colon) = target.iter().position(|&b| b == b':') else { return false };
    let (scheme, rest) = (&target[..colon], &target[colon + 1..]);
    let scheme_ok = scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https");
    let Some(rest) = rest.strip_prefix(b"//") else { return false };
    let end = rest.iter().position(|&b| b == b'/' || b == b'?').unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    scheme_ok && valid_authority(authority) && (tail.is_empty() || valid_path_and_query(tail))
}

/// `host [ ":" port ]`, as in absolute-form targets and the Host field.
///
/// One pass: the host ends at its first byte that no reg-name or IPv4 address holds (an IPv6
/// literal, at its `]`); what follows must be nothing, or `:` and digits.
pub(crate) fn valid_authority(authority: &[u8]) -> bool {
    let (host_ok, host_len) = match authority.first() {
        Some(b'[') => match authority.iter().position(|&b| b == b']') {
            Some(end) => (valid_host(&authority[..=end]), end + 1),
            None => return false,
        },
        // All unreserved up to there: a valid host unless empty.
        _ => {
            let len = authority.iter().position(|&b| !UNRESERVED[usize::from(b)]).unwrap_or(authority.len());
            (len > 0, len)
        }
    };
    host_ok
        && match &authority[host_len..] {
            [] => true,
            [b':', digits @ ..] => digits.iter().all(u8::is_ascii_digit),
            _ => false,
        }
}

/// uri-host as HTTP uses it: a DNS name or IPv4 address (letters, digits, `-._~`), or an IPv6
/// literal in brackets. RFC 3986 also allows sub-delims and `%` escapes in a reg-name; no HTTP
/// host name needs them, so they are refused.
fn valid_host(host: &[u8]) -> bool {
    match host {
        [b'[', inner @ .., b']'] => {
            !inner.is_empty() && inner.iter().all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        }
        _ => !host.is_empty() && host.iter().all(|&b| UNRESERVED[usize::from(b)]),
    }
}

/// path-abempty [ "?" query ], the path possibly empty (after an authority) or starting with `/`.
fn valid_path_and_query(s: &[u8]) -> bool {
    let (path, query) = match s.iter().position(|&b| b == b'?') {
        Some(q) => (&s[..q], Some(&s[q + 1..])),
        None => (s, None),
    };
    valid_chars(path, &PATH) && query.is_none_or(|q| valid_chars(q, &QUERY))
}

/// Whether every byte is in `allowed`, treating `%XX` escapes as allowed.
fn valid_chars(s: &[u8], allowed: &[bool; 256]) -> bool {
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            if !(i + 2 < s.len() && s[i + 1].is_ascii_hexdigit() && s[i + 2].is_ascii_hexdigit()) {
                return false;
            }
            i += 3;
        } else if allowed[usize::from(s[i])] {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

/// The bytes that are ASCII letters or digits, or in `extra`: a table looked up once per byte
/// (the targets and hosts of every request are checked against these).
const fn alnum_and(extra: &[u8]) -> [bool; 256] {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < extra.len() {
        table[extra[i] as usize] = true;
        i += 1;
    }
    table
}

/// RFC 3986 unreserved characters.
const UNRESERVED: [bool; 256] = alnum_and(b"-._~");

/// A path's characters: pchar (unreserved, sub-delims `!$&'()*+,;=`, `:`, `@`) and `/`.
const PATH: [bool; 256] = alnum_and(b"-._~!$&'()*+,;=:@/");

/// A query's: a path's, `?`, and the characters real clients send unescaped.
const QUERY: [bool; 256] = alnum_and(b"-._~!$&'()*+,;=:@/?[]{}|\\^`");

/// What the framing-relevant fields said, gathered while the fields are copied.
#[derive(Default)]
struct Framing {
    /// `Content-Length`, once seen; every occurrence must agree.
    content_length: Option<u64>,
    /// Codings named by `Transfer-Encoding`, in order: how many, and whether the last is chunked.
    codings: usize,
    chunked_count: usize,
    last_is_chunked: bool,
    /// A `Transfer-Encoding` field was present (even an empty one).
    transfer_encoding: bool,
    hosts: usize,
    close: bool,
    keep_alive: bool,
    expect_continue: bool,
    /// `Connection` names `upgrade`.
    upgrade_option: bool,
    /// An `Upgrade` field is present and not empty.
    upgrade_field: bool,
}

impl Framing {
    /// Records one field.
    fn observe(&mut self, name: &HeaderName, value: &[u8]) -> Result<(), DecodeError> {
        if name == header::CONTENT_LENGTH {
            let mut items = 0;
            for item in list(value) {
                let n = parse_length(item)?;
                if self.content_length.is_some_and(|seen| seen != n) {
                    return Err(DecodeError::Malformed("Content-Length values differ"));
                }
                self.content_length = Some(n);
                items += 1;
            }
            if items == 0 {
                return Err(DecodeError::Malformed("empty Content-Length"));
            }
        } else if name == header::TRANSFER_ENCODING {
            self.transfer_encoding = true;
            for coding in list(value) {
                let chunked = coding.eq_ignore_ascii_case(b"chunked");
                self.codings += 1;
                self.chunked_count += usize::from(chunked);
                self.last_is_chunked = chunked;
            }
        } else if name == header::HOST {
            self.hosts += 1;
            if !value.is_empty() && !valid_authority(value) {
                return Err(DecodeError::Malformed("invalid Host"));
            }
        } else if name == header::CONNECTION {
            for option in list(value) {
                self.close |= option.eq_ignore_ascii_case(b"close");
                self.keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
                self.upgrade_option |= option.eq_ignore_ascii_case(b"upgrade");
            }
        } else if name == header::UPGRADE {
            self.upgrade_field |= list(value).next().is_some();
        } else if name == header::EXPECT {
            for expectation in list(value) {
                if expectation.eq_ignore_ascii_case(b"100-continue") {
                    self.expect_continue = true;
                } else {
                    return Err(DecodeError::UnsupportedExpectation);
                }
            }
        }
        Ok(())
    }

    /// Decides the body length, in the order of RFC 9112 §6.3 for requests.
    fn finish(&self, version: Version) -> Result<BodyLength, DecodeError> {
        if version == Version::HTTP_11 && self.hosts != 1 {
            return Err(DecodeError::Malformed("an HTTP/1.1 request needs exactly one Host field"));
        }
        if self.hosts > 1 {
            return Err(DecodeError::Malformed("more than one Host field"));
        }
        if self.transfer_encoding {
            // 1. Transfer-Encoding overrides Content-Length, but a request with both is a
            //    smuggling attempt or a broken client: reject it (RFC 9112 §6.1, §6.3 item 3).
            if self.content_length.is_some() {
                return Err(DecodeError::Malformed("both Transfer-Encoding and Content-Length are present"));
            }
            // 2. HTTP/1.0 has no transfer codings; the framing is faulty (§6.1).
            if version == Version::HTTP_10 {
                return Err(DecodeError::Malformed("Transfer-Encoding in an HTTP/1.0 request"));
            }
            // 3. The last coding must be chunked, applied once (§6.1, §7).
            if !self.last_is_chunked || self.chunked_count != 1 {
                return Err(DecodeError::Malformed("the last transfer coding must be chunked, applied once"));
            }
            // 4. Codings under chunked (gzip, ...) are not implemented (§6.1: 501).
            if self.codings != 1 {
                return Err(DecodeError::UnsupportedTransferCoding);
            }
            return Ok(BodyLength::Chunked);
        }
        // 5. A valid Content-Length gives the length; 6. without either, a request has no body.
        Ok(BodyLength::Length(self.content_length.unwrap_or(0)))
    }
}

/// Whether any `Connection` field in `headers` names `option` (case-insensitive, RFC 9110
/// §7.6.1): for the handler's `close` and a request's `upgrade`.
pub fn connection_names(headers: &HeaderMap, option: &[u8]) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| lists(v.as_bytes(), option))
}

/// Whether the comma-separated field `value` has `option` among its items (case-insensitive).
pub fn lists(value: &[u8], option: &[u8]) -> bool {
    list(value).any(|o| o.eq_ignore_ascii_case(option))
}

/// Splits a comma-separated field value into trimmed, non-empty items (RFC 9110 §5.6.1).
fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(trim).filter(|item| !item.is_empty())
}

/// Trims optional whitespace (SP, HTAB) from both ends.
fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Parses `1*DIGIT` into a u64, rejecting signs, spaces and overflow.
fn parse_length(digits: &[u8]) -> Result<u64, DecodeError> {
    if digits.is_empty() {
        return Err(DecodeError::Malformed("invalid Content-Length"));
    }
    digits.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return Err(DecodeError::Malformed("invalid Content-Length"));
        }
        n.checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(b - b'0')))
            .ok_or(DecodeError::Malformed("Content-Length is too large"))
    })
}

/// What one [`BodyDecoder::decode`] step did with its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// Bytes of input used up, framing and data together.
    pub consumed: usize,
    /// Where the body bytes are within the input; empty if none were reached.
    pub data: Range<usize>,
}

/// Decodes a request body of either framing, a step at a time.
#[derive(Debug, Clone)]
pub enum BodyDecoder {
    /// This many body bytes remain.
    Length(u64),
    /// A chunked body.
    Chunked(ChunkedDecoder),
}

impl BodyDecoder {
    /// A decoder for the given framing.
    pub fn new(length: BodyLength) -> BodyDecoder {
        match length {
            BodyLength::Length(n) => BodyDecoder::Length(n),
            BodyLength::Chunked => BodyDecoder::Chunked(ChunkedDecoder::new()),
        }
    }

    /// Consumes framing from `input` until body bytes (at most `max` of them) or the end.
    ///
    /// If `consumed == input.len()` with no data and the body is not done, more input is
    /// needed. Data ranges always end at `consumed`.
    pub fn decode(&mut self, input: &[u8], max: usize) -> Result<Decoded, DecodeError> {
        match self {
            BodyDecoder::Length(remaining) => {
                let n = (*remaining).min(input.len() as u64).min(max as u64) as usize;
                *remaining -= n as u64;
                Ok(Decoded { consumed: n, data: 0..n })
            }
            BodyDecoder::Chunked(chunked) => chunked.decode(input, max),
        }
    }

    /// Whether the whole body, with its framing, has been consumed.
    pub fn is_done(&self) -> bool {
        match self {
            BodyDecoder::Length(remaining) => *remaining == 0,
            BodyDecoder::Chunked(chunked) => chunked.state == Chunk::Done,
        }
    }

    /// Body bytes still to come, when the framing says.
    pub fn remaining(&self) -> Option<u64> {
        match self {
            BodyDecoder::Length(remaining) => Some(*remaining),
            BodyDecoder::Chunked(_) => None,
        }
    }
}

/// Where a chunked decoder is within the grammar of RFC 9112 §7.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading the hex chunk-size; this many digits so far.
    Size(u8),
    /// After the size: optional whitespace, then `;` or CR.
    SizeEnd,
    /// Inside chunk extensions (skipped), until CR.
    Ext,
    /// Saw the CR ending a size line; LF must follow.
    SizeLf,
    /// Inside chunk data.
    Data,
    /// Chunk data ended; CR must follow.
    DataCr,
    /// Saw the CR after chunk data; LF must follow.
    DataLf,
    /// At the start of a trailer line, or of the final empty line.
    TrailerStart,
    /// Inside a trailer field line (skipped), until CR.
    Trailer,
    /// Saw the CR ending a trailer line; LF must follow.
    TrailerLf,
    /// Saw the CR of the final empty line; LF must follow.
    EndLf,
    /// The body is complete.
    Done,
}

/// A chunked-body decoder. Strict where leniency enables smuggling: every line ends in CRLF
/// (a bare LF or CR is an error), sizes are hex digits only, and data must be followed by CRLF.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    /// Position in the grammar.
    state: Chunk,
    /// The chunk size being read, then the data bytes left in the chunk.
    size: u64,
    /// Bytes after the digits of the current size line (bounded: u16 is enough).
    ext_bytes: u16,
    /// Trailer bytes so far (bounded: u16 is enough).
    trailer_bytes: u16,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder::new()
    }
}

impl ChunkedDecoder {
    /// A decoder at the start of a chunked body.
    pub fn new() -> ChunkedDecoder {
        ChunkedDecoder { state: Chunk::Size(0), size: 0, ext_bytes: 0, trailer_bytes: 0 }
    }

    /// See [`BodyDecoder::decode`].
    pub fn decode(&mut self, input: &[u8], max: usize) -> Result<Decoded, DecodeError> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                Chunk::Done => break,
                Chunk::Data => {
                    let n = self.size.min((input.len() - i) as u64).min(max as u64) as usize;
                    self.size -= n as u64;
                    if self.size == 0 {
                        self.state = Chunk::DataCr;
                    }
                    return Ok(Decoded { consumed: i + n, data: i..i + n });
                }
                _ => {
                    self.step(input[i])?;
                    i += 1;
                }
            }
        }
        Ok(Decoded { consumed: i, data: i..i })
    }

    /// Counts one byte after the size digits (whitespace, `;`, extensions) against
    /// [`MAX_CHUNK_EXT_BYTES`].
    fn after_size(&mut self, next: Chunk) -> Result<Chunk, DecodeError> {
        self.ext_bytes += 1;
        if usize::from(self.ext_bytes) > MAX_CHUNK_EXT_BYTES {
            return Err(DecodeError::Malformed("chunk extensions are too long"));
        }
        Ok(next)
    }

    /// Advances the grammar by one framing byte.
    fn step(&mut self, b: u8) -> Result<(), DecodeError> {
        const BAD_SIZE: DecodeError = DecodeError::Malformed("invalid chunk size line");
        const BARE_LF: DecodeError = DecodeError::Malformed("chunk framing lines must end in CRLF");
        self.state = match (self.state, b) {
            (Chunk::Size(digits), _) if b.is_ascii_hexdigit() => {
                if digits == 16 {
                    return Err(DecodeError::Malformed("chunk size is too large"));
                }
                let digit = (b as char).to_digit(16).unwrap_or(0);
                self.size = (self.size << 4) | u64::from(digit);
                Chunk::Size(digits + 1)
            }
            (Chunk::Size(0), _) => return Err(BAD_SIZE),
            (Chunk::Size(_) | Chunk::SizeEnd | Chunk::Ext, b'\r') => Chunk::SizeLf,
            (Chunk::Size(_) | Chunk::SizeEnd, b' ' | b'\t') => self.after_size(Chunk::SizeEnd)?,
            (Chunk::Size(_) | Chunk::SizeEnd, b';') => self.after_size(Chunk::Ext)?,
            (Chunk::Size(_) | Chunk::SizeEnd, _) => return Err(BAD_SIZE),
            (Chunk::Ext, _) if is_text(b) => self.after_size(Chunk::Ext)?,
            (Chunk::Ext, b'\n') => return Err(BARE_LF),
            (Chunk::Ext, _) => return Err(DecodeError::Malformed("invalid byte in a chunk extension")),
            (Chunk::SizeLf, b'\n') => {
                self.ext_bytes = 0;
                if self.size == 0 {
                    Chunk::TrailerStart
                } else {
                    Chunk::Data
                }
            }
            (Chunk::DataCr, b'\r') => Chunk::DataLf,
            (Chunk::DataCr, _) => return Err(DecodeError::Malformed("chunk data is longer than its size")),
            (Chunk::DataLf, b'\n') => {
                self.size = 0;
                Chunk::Size(0)
            }
            (Chunk::TrailerStart, b'\r') => Chunk::EndLf,
            (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
            (Chunk::TrailerStart | Chunk::Trailer, _) if is_text(b) => {
                self.trailer_bytes += 1;
                if usize::from(self.trailer_bytes) > MAX_TRAILER_BYTES {
                    return Err(DecodeError::Malformed("trailer fields are too large"));
                }
                Chunk::Trailer
            }
            (Chunk::TrailerStart | Chunk::Trailer, b'\n') => return Err(BARE_LF),
            (Chunk::TrailerStart | Chunk::Trailer, _) => {
                return Err(DecodeError::Malformed("invalid byte in a trailer field"))
            }
            (Chunk::TrailerLf, b'\n') => Chunk::TrailerStart,
            (Chunk::EndLf, b'\n') => Chunk::Done,
            (Chunk::SizeLf | Chunk::DataLf | Chunk::TrailerLf | Chunk::EndLf, _) => return Err(BARE_LF),
            (Chunk::Data | Chunk::Done, _) => unreachable!("data and done are handled by decode"),
        };
        Ok(())
    }
}

/// Field-value text: HTAB, visible ASCII, SP and obs-text; no other control bytes.
fn is_text(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_head_bytes: 1024, max_headers: 8 };

    fn parse(input: &str) -> Result<Option<(Head, usize)>, DecodeError> {
        parse_head(input.as_bytes(), LIMITS)
    }

    fn head(input: &str) -> Head {
        match parse(input) {
            Ok(Some((head, len))) => {
                assert_eq!(len, input.len(), "head length for {input:?}");
                head
            }
            other => panic!("{input:?} gave {other:?}"),
        }
    }

    fn err(input: &str) -> DecodeError {
        match parse(input) {
            Err(e) => e,
            other => panic!("{input:?} should fail, gave {other:?}"),
        }
    }

    /// Every prefix of a complete head is "need more", never an error.
    fn assert_prefixes_incomplete(input: &str) {
        for end in 0..input.len() {
            assert!(matches!(parse(&input[..end]), Ok(None)), "prefix {:?}", &input[..end]);
        }
    }

    #[test]
    fn character_tables_hold_exactly_the_rfc_3986_sets() {
        let unreserved = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
        let pchar = |b: u8| unreserved(b) || b"!$&'()*+,;=".contains(&b) || b == b':' || b == b'@';
        for b in 0..=255u8 {
            assert_eq!(UNRESERVED[usize::from(b)], unreserved(b), "unreserved {b:#04x}");
            assert_eq!(PATH[usize::from(b)], pchar(b) || b == b'/', "path {b:#04x}");
            let query = pchar(b) || b"/?[]{}|\\^`".contains(&b);
            assert_eq!(QUERY[usize::from(b)], query, "query {b:#04x}");
        }
    }

    #[test]
    fn a_head_parsed_into_a_used_one_keeps_nothing_of_it() {
        let heads = [
            "POST http://a.example:8080/x?y HTTP/1.1\r\nHost: a.example:8080\r\nTransfer-Encoding: chunked\r\n\
             Expect: 100-continue\r\nConnection: upgrade, close\r\nUpgrade: websocket\r\nA: 1\r\nA: 2\r\n\r\n",
            "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            "PUT /p HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n",
            "GET /q HTTP/1.1\r\nHost: h\r\n\r\n",
        ];
        let mut reused = Head::empty();
        for (i, input) in heads.iter().cycle().take(9).enumerate() {
            // Every other round, a failed parse first leaves fields behind.
            if i % 2 == 1 {
                let bad = "GET / HTTP/1.1\r\nB: 1\r\nC: 2\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
                assert!(parse_head_into(bad.as_bytes(), LIMITS, &mut reused).is_err());
            }
            let len = parse_head_into(input.as_bytes(), LIMITS, &mut reused).unwrap();
            assert_eq!(len, Some(input.len()));
            assert_eq!(format!("{reused:?}"), format!("{:?}", head(input)), "{input:?} after round {i}");
        }
    }

    #[test]
    fn a_store_never_holds_more_than_one_chunk_even_after_a_large_head() {
        // A store lives on in a pooled box: a large head once must not leave it holding (and
        // reusing) a large buffer. Some heads are kept alive and some dropped, so the store
        // both moves on to new buffers and reuses its own.
        let limits = Limits { max_head_bytes: 16 * 1024, max_headers: 8 };
        let mut head = Head::empty();
        let mut kept = Vec::new();
        let heads = [(8000, false), (100, true), (900, false), (8000, true), (1000, false), (100, false), (1000, true)];
        for (i, (len, keep)) in heads.into_iter().enumerate() {
            let fixed = "GET /p HTTP/1.1\r\nHost: h\r\nX-Pad: \r\n\r\n".len();
            let input = format!("GET /p HTTP/1.1\r\nHost: h\r\nX-Pad: {}\r\n\r\n", "p".repeat(len - fixed));
            assert_eq!(parse_head_into(input.as_bytes(), limits, &mut head), Ok(Some(len)), "head {i}");
            let left = head.store.0.capacity();
            assert!(left <= STORE_CHUNK, "head {i}: {left} bytes left in the store");
            // As a server does: the request takes the target and fields, and lives on or not.
            let mut request = Request::new(());
            head.hand_over(&mut request);
            if keep {
                kept.push(request);
            }
        }
    }

    #[test]
    fn clear_drops_what_was_not_handed_over_and_hand_over_moves_it_to_the_request() {
        let input = b"LONGCUSTOMMETHODNAME /x?y HTTP/1.1\r\nHost: h\r\nA: 1\r\n\r\n";
        let mut head = Head::empty();
        // Parsed, never handed over: cleared.
        parse_head_into(input, LIMITS, &mut head).unwrap();
        head.clear();
        assert_eq!((head.method.clone(), head.uri.clone(), head.headers.len()), (Method::GET, Uri::default(), 0));
        // A failed parse leaves fields behind: cleared.
        assert!(parse_head_into(b"GET / HTTP/1.1\r\nB: 1\r\nContent-Length: x\r\n\r\n", LIMITS, &mut head).is_err());
        head.clear();
        assert_eq!(head.headers.len(), 0);
        // Handed over: the request has them; the head keeps the request's empty defaults.
        parse_head_into(input, LIMITS, &mut head).unwrap();
        let mut request = Request::new(());
        head.hand_over(&mut request);
        head.clear();
        assert_eq!((request.uri(), request.headers()["a"].as_bytes()), (&"/x?y".parse::<Uri>().unwrap(), &b"1"[..]));
        assert_eq!((head.method.clone(), head.uri.clone(), head.headers.len()), (Method::GET, Uri::default(), 0));
    }

    #[test]
    fn heads_of_every_size_keep_their_target_and_values_while_the_store_is_reused() {
        // Around the store's chunk size, all parsed into one head. Every other request's fields
        // are kept alive, so the store both reuses its buffer (once nothing holds it) and moves
        // on to a new one (while something does); the kept values must stay intact.
        let limits = Limits { max_head_bytes: 8192, max_headers: 8 };
        let mut head = Head::empty();
        let mut kept = Vec::new();
        let lens = [40, 63, 64, 65, 1023, 1024, 1025, 4097, 40, 700, 700, 40, 400, 400, 400, 400];
        for (i, len) in lens.into_iter().enumerate() {
            let fixed = "GET /p HTTP/1.1\r\nX-Pad: \r\nHost: h\r\n\r\n".len();
            let pad = char::from(b'a' + i as u8).to_string().repeat(len - fixed);
            let input = format!("GET /p HTTP/1.1\r\nX-Pad: {pad}\r\nHost: h\r\n\r\n");
            assert_eq!(input.len(), len);
            assert_eq!(parse_head_into(input.as_bytes(), limits, &mut head), Ok(Some(len)));
            assert_eq!(head.uri, "/p", "at {len} bytes");
            assert_eq!(head.headers["x-pad"], pad.as_str(), "at {len} bytes");
            assert_eq!(head.headers["host"], "h", "at {len} bytes");
            let headers = std::mem::take(&mut head.headers);
            if i % 2 == 0 {
                kept.push((pad, headers));
            }
        }
        for (pad, headers) in kept {
            assert_eq!(headers["x-pad"], pad.as_str());
        }
    }

    #[test]
    fn simple_get() {
        let input = "GET /path?q=1 HTTP/1.1\r\nHost: example.com\r\nX-Thing: a b\r\n\r\n";
        assert_prefixes_incomplete(input);
        let h = head(input);
        assert_eq!(h.method, Method::GET);
        assert_eq!(h.uri.path(), "/path");
        assert_eq!(h.uri.query(), Some("q=1"));
        assert_eq!(h.version, Version::HTTP_11);
        assert_eq!(h.headers["host"], "example.com");
        assert_eq!(h.headers["x-thing"], "a b");
        assert_eq!(h.body, BodyLength::Length(0));
        assert!(h.keep_alive);
        assert!(!h.expect_continue);
    }

    #[test]
    fn head_length_excludes_the_body() {
        let input = "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello";
        let (h, len) = parse(input).unwrap().unwrap();
        assert_eq!(&input[len..], "hello");
        assert_eq!(h.body, BodyLength::Length(5));
    }

    #[test]
    fn leading_empty_lines_are_skipped() {
        let h = head("\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(h.method, Method::GET);
    }

    #[test]
    fn upgrade_offers() {
        let table = [
            ("GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", true),
            ("GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, upgrade\r\nUpgrade: h2c\r\n\r\n", true),
            ("GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n", false), // not in Connection
            ("GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\n\r\n", false), // no Upgrade
            ("GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: ,\r\n\r\n", false),
            ("GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n", false), // §7.8
            ("CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", true),
            ("CONNECT h:443 HTTP/1.0\r\n\r\n", false),
            ("GET / HTTP/1.1\r\nHost: h\r\n\r\n", false),
        ];
        for (input, upgrade) in table {
            assert_eq!(head(input).upgrade, upgrade, "{input:?}");
        }
    }

    #[test]
    fn keep_alive_rules() {
        let table = [
            ("GET / HTTP/1.1\r\nHost: h\r\n\r\n", true),
            ("GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", false),
            ("GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, CLOSE\r\n\r\n", false),
            ("GET / HTTP/1.0\r\n\r\n", false),
            ("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", true),
            ("GET / HTTP/1.0\r\nConnection: Keep-Alive, close\r\n\r\n", false),
        ];
        for (input, keep_alive) in table {
            assert_eq!(head(input).keep_alive, keep_alive, "{input:?}");
        }
    }

    #[test]
    fn framing_table() {
        let table = [
            ("Content-Length: 10\r\n", BodyLength::Length(10)),
            ("Content-Length: 0\r\n", BodyLength::Length(0)),
            ("Content-Length: 7\r\nContent-Length: 7\r\n", BodyLength::Length(7)),
            ("Content-Length: 7, 7\r\n", BodyLength::Length(7)),
            ("Transfer-Encoding: chunked\r\n", BodyLength::Chunked),
            ("Transfer-Encoding: Chunked\r\n", BodyLength::Chunked),
            ("", BodyLength::Length(0)),
        ];
        for (fields, body) in table {
            let input = format!("POST / HTTP/1.1\r\nHost: h\r\n{fields}\r\n");
            assert_eq!(head(&input).body, body, "{fields:?}");
        }
    }

    #[test]
    fn bad_framing_table() {
        let malformed = [
            "Content-Length: 1\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 1\r\n",
            "Content-Length: 1\r\nContent-Length: 2\r\n",
            "Content-Length: 1, 2\r\n",
            "Content-Length: +1\r\n",
            "Content-Length: -1\r\n",
            "Content-Length: 1 2\r\n",
            "Content-Length: 0x10\r\n",
            "Content-Length: \r\n",
            "Content-Length: 1\r\nContent-Length: \r\n",
            "Content-Length: 99999999999999999999999\r\n",
            "Transfer-Encoding: gzip\r\n",
            "Transfer-Encoding: chunked, gzip\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: \r\n",
            "Transfer-Encoding: xchunked\r\n",
        ];
        for fields in malformed {
            let input = format!("POST / HTTP/1.1\r\nHost: h\r\n{fields}\r\n");
            assert!(matches!(err(&input), DecodeError::Malformed(_)), "{fields:?}");
        }
        let input = "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert_eq!(err(input), DecodeError::UnsupportedTransferCoding);
        let input = "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(err(input), DecodeError::Malformed(_)));
    }

    #[test]
    fn host_rules() {
        assert!(matches!(err("GET / HTTP/1.1\r\n\r\n"), DecodeError::Malformed(_)));
        assert!(matches!(err("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), DecodeError::Malformed(_)));
        assert!(matches!(err("GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n"), DecodeError::Malformed(_)));
        assert!(matches!(err("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n"), DecodeError::Malformed(_)));
        assert!(matches!(err("GET / HTTP/1.1\r\nHost: u@a\r\n\r\n"), DecodeError::Malformed(_)));
        assert!(matches!(err("GET / HTTP/1.1\r\nHost: a:b\r\n\r\n"), DecodeError::Malformed(_)));
        assert!(matches!(err("GET / HTTP/1.1\r\nHost: a,b\r\n\r\n"), DecodeError::Malformed(_)));
        head("GET / HTTP/1.1\r\nHost: a.example:80\r\n\r\n");
        head("GET / HTTP/1.0\r\n\r\n");
        head("GET / HTTP/1.1\r\nHost:\r\n\r\n");
        head("GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n");
    }

    #[test]
    fn authority_in_one_pass_agrees_with_splitting_at_the_last_colon() {
        // The plain reading of `host [ ":" port ]`: split at the last colon unless it is inside
        // an IPv6 literal, then check each side. Every string of up to 6 bytes over the bytes
        // that matter must get the same answer.
        fn split_at_last_colon(authority: &[u8]) -> bool {
            match authority.iter().rposition(|&b| b == b':') {
                Some(colon) if !authority[colon..].contains(&b']') => {
                    valid_host(&authority[..colon]) && authority[colon + 1..].iter().all(u8::is_ascii_digit)
                }
                _ => valid_host(authority),
            }
        }
        const BYTES: &[u8] = b"a1[]:.@\x80";
        let mut checked = 0;
        for len in 0..=6u32 {
            for mut n in 0..BYTES.len().pow(len) {
                let s: Vec<u8> = (0..len)
                    .map(|_| {
                        let b = BYTES[n % BYTES.len()];
                        n /= BYTES.len();
                        b
                    })
                    .collect();
                assert_eq!(valid_authority(&s), split_at_last_colon(&s), "{:?}", String::from_utf8_lossy(&s));
                checked += 1;
            }
        }
        assert!(checked > 100_000);
    }

    #[test]
    fn malformed_heads() {
        let table = [
            "GET / HTTP/1.1\r\nHost : h\r\n\r\n",              // whitespace before colon
            "GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n", // obs-fold
            "GET / HTTP/1.1\rHost: h\r\n\r\n",                 // bare CR
            "GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n",         // bare CR in a field
            "GET  / HTTP/1.1\r\nHost: h\r\n\r\n",              // double space
            "GET /\x7f HTTP/1.1\r\nHost: h\r\n\r\n",           // control byte in target
            "G@T / HTTP/1.1\r\nHost: h\r\n\r\n",               // bad method token
            "GET / HTXP/1.1\r\nHost: h\r\n\r\n",               // not HTTP
            "GET / HTTP/1.1 x\r\nHost: h\r\n\r\n",
            "GET / HTTP/11\r\nHost: h\r\n\r\n",
            "GET / HTTP/1.1\r\n: empty-name\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nX: a\x01b\r\n\r\n",
            "GET * HTTP/1.1\r\nHost: h\r\n\r\n", // asterisk only for OPTIONS
            "GET example.com:80 HTTP/1.1\r\nHost: h\r\n\r\n", // authority only for CONNECT
            "CONNECT / HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET path HTTP/1.1\r\nHost: h\r\n\r\n",
        ];
        for input in table {
            assert!(matches!(err(input), DecodeError::Malformed(_)), "{input:?}");
        }
    }

    #[test]
    fn target_characters() {
        let good: &[&[u8]] = &[
            b"/",
            b"/a/b;c=d/%20e?x=1&y=%2F",
            b"/search?q=a[0]{b}|c\\d^e`f",
            b"/p@th:x!$&'()*+,;=~",
            b"http://example.com",
            b"http://example.com:8080/x?y",
            b"https://[::1]:443/",
            b"HTTPS://host?only-query",
        ];
        for target in good {
            assert!(valid_target(&Method::GET, target), "{:?}", String::from_utf8_lossy(target));
        }
        let bad: &[&[u8]] = &[
            b"/a#frag",
            b"/a b",
            b"/%",
            b"/%4",
            b"/%zz",
            b"/\"",
            b"/<x>",
            b"/path[0]",
            b"/caf\xc3\xa9",
            b"http://user@host/",
            b"http:/host",
            b"http://",
            b"1http://h/",
            b"ftp://h/",
            b"http://h:80x/",
            b"*",
            b"host:80",
        ];
        for target in bad {
            assert!(!valid_target(&Method::GET, target), "{:?}", String::from_utf8_lossy(target));
        }
        assert!(valid_target(&Method::CONNECT, b"example.com:443"));
        assert!(valid_target(&Method::CONNECT, b"[::1]:443"));
        assert!(!valid_target(&Method::CONNECT, b"example.com"));
        assert!(!valid_target(&Method::CONNECT, b"/"));
        assert!(valid_target(&Method::OPTIONS, b"*"));
    }

    #[test]
    fn target_forms() {
        assert_eq!(head("OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n").uri, "*");
        assert_eq!(head("CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n").uri.authority().unwrap(), "h:443");
        let h = head("GET http://h/x?y HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!((h.uri.host(), h.uri.path()), (Some("h"), "/x"));
    }

    #[test]
    fn versions() {
        assert_eq!(err("GET / HTTP/2.0\r\nHost: h\r\n\r\n"), DecodeError::UnsupportedVersion);
        assert_eq!(err("GET / HTTP/1.2\r\nHost: h\r\n\r\n"), DecodeError::UnsupportedVersion);
        assert_eq!(err("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), DecodeError::UnsupportedVersion);
        assert_eq!(err("GET / HTTP/0.9\r\n\r\n"), DecodeError::UnsupportedVersion);
        // The version is the third token, however many follow.
        assert!(matches!(err("GET a b HTTP/2.0\r\n\r\n"), DecodeError::Malformed(_)));
        // Undecided until the whole token is in, whatever the split.
        let input = "GET / HTTP/3.0\r\n";
        for end in 0..input.len() {
            assert!(matches!(parse(&input[..end]), Ok(None)), "prefix {:?}", &input[..end]);
        }
    }

    #[test]
    fn limits() {
        let many: String = (0..9).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(err(&format!("GET / HTTP/1.1\r\nHost: h\r\n{many}\r\n")), DecodeError::TooManyHeaders);
        let big = format!("GET / HTTP/1.1\r\nHost: h\r\nX: {}\r\n\r\n", "a".repeat(1024));
        assert_eq!(err(&big), DecodeError::HeadTooLarge);
        // An incomplete head longer than the limit is refused without waiting for the rest.
        assert_eq!(err(&big[..1030]), DecodeError::HeadTooLarge);
    }

    #[test]
    fn scanner_says_ready_exactly_when_parsing_can_tell_more() {
        let input = b"GET / HTTP/1.1\r\nHost: h\r\nX: y\r\n\r\n";
        let mut scanner = HeadScanner::default();
        let mut ready_at = Vec::new();
        for end in 1..=input.len() {
            if let Some(n) = scanner.ready(&input[..end], 1024) {
                ready_at.push((end, n));
            }
        }
        // The request line alone once it ends, then everything once the head ends.
        assert_eq!(ready_at, [(16, 16), (input.len(), input.len())]);
        let mut scanner = HeadScanner::default();
        assert_eq!(scanner.ready(b"GET / HTTP/1.0\n\n", 1024), Some(16));
        let mut scanner = HeadScanner::default();
        assert_eq!(scanner.ready(b"GET / HTTP/1.0", 1024), None);
        assert_eq!(scanner.ready(b"GET / HTTP/1.0\nA: b\r", 1024), Some(15));
        assert_eq!(scanner.ready(b"GET / HTTP/1.0\nA: b\r\n\r", 1024), None);
        assert_eq!(scanner.ready(b"GET / HTTP/1.0\nA: b\r\n\r\n", 1024), Some(23));
        let mut scanner = HeadScanner::default();
        assert_eq!(scanner.ready(&[b'a'; 11], 10), Some(11), "over the limit: parse to get 431");
        // A field error shows only once the head is complete, however the bytes came.
        let bad = b"GET / HTTP/1.1\r\n Host: h\r\n";
        let mut scanner = HeadScanner::default();
        let n = scanner.ready(bad, 1024).unwrap();
        assert!(matches!(parse_head(&bad[..n], LIMITS), Ok(None)));
    }

    #[test]
    fn empty_lines_before_the_request_line() {
        assert_eq!(leading_empty_lines(b"\r\n\nGET"), 3);
        assert_eq!(leading_empty_lines(b"\r\n\r"), 2);
        assert_eq!(leading_empty_lines(b"\rGET"), 0);
        assert_eq!(leading_empty_lines(b""), 0);
    }

    #[test]
    fn expectations() {
        let h = head("POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n");
        assert!(h.expect_continue);
        // Nothing to continue with: no body.
        assert!(!head("GET / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\r\n").expect_continue);
        // Ignored in HTTP/1.0.
        assert!(!head("POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n").expect_continue);
        assert_eq!(err("POST / HTTP/1.1\r\nHost: h\r\nExpect: teapot\r\n\r\n"), DecodeError::UnsupportedExpectation);
    }

    /// Decodes `input` split into pieces at `splits`, with at most `max` data bytes a step.
    fn decode_split(
        length: BodyLength,
        input: &[u8],
        splits: &[usize],
        max: usize,
    ) -> Result<(Vec<u8>, usize), DecodeError> {
        let mut decoder = BodyDecoder::new(length);
        let mut out = Vec::new();
        let mut buffered: Vec<u8> = Vec::new();
        let mut fed = 0;
        let mut bounds: Vec<usize> = splits.to_vec();
        bounds.push(input.len());
        for end in bounds {
            buffered.extend_from_slice(&input[fed..end]);
            fed = end;
            loop {
                let step = decoder.decode(&buffered, max)?;
                out.extend_from_slice(&buffered[step.data.clone()]);
                buffered.drain(..step.consumed);
                if decoder.is_done() || step.consumed == 0 {
                    break;
                }
            }
            if decoder.is_done() {
                break;
            }
        }
        assert!(decoder.is_done(), "decoder not done after all input");
        Ok((out, fed - buffered.len()))
    }

    /// Every single split point and every small `max` give the same answer as one piece.
    fn assert_all_splits(length: BodyLength, input: &[u8], expected: Result<(&[u8], usize), DecodeError>) {
        let expected = expected.map(|(data, used)| (data.to_vec(), used));
        for max in [1, 2, 3, 7, usize::MAX] {
            assert_eq!(decode_split(length, input, &[], max), expected, "whole, max {max}");
            for split in 0..=input.len() {
                assert_eq!(decode_split(length, input, &[split], max), expected, "split at {split}, max {max}");
            }
        }
        // One byte at a time.
        let every: Vec<usize> = (1..input.len()).collect();
        assert_eq!(decode_split(length, input, &every, usize::MAX), expected, "byte by byte");
    }

    fn chunked_ok(input: &str, data: &str) {
        assert_all_splits(BodyLength::Chunked, input.as_bytes(), Ok((data.as_bytes(), input.len())));
    }

    fn chunked_err(input: &str) {
        let got = decode_split(BodyLength::Chunked, input.as_bytes(), &[], usize::MAX);
        assert!(matches!(got, Err(DecodeError::Malformed(_))), "{input:?} gave {got:?}");
        for split in 0..=input.len() {
            let got = decode_split(BodyLength::Chunked, input.as_bytes(), &[split], 1);
            assert!(got.is_err(), "{input:?} split at {split} gave {got:?}");
        }
    }

    #[test]
    fn content_length_body() {
        assert_all_splits(BodyLength::Length(5), b"hello", Ok((b"hello", 5)));
        // Bytes after the body belong to the next request.
        assert_all_splits(BodyLength::Length(5), b"helloGET", Ok((b"hello", 5)));
        assert_all_splits(BodyLength::Length(0), b"GET", Ok((b"", 0)));
    }

    #[test]
    fn chunked_bodies() {
        chunked_ok("0\r\n\r\n", "");
        chunked_ok("5\r\nhello\r\n0\r\n\r\n", "hello");
        chunked_ok("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", "hello world");
        chunked_ok("A\r\n0123456789\r\n0\r\n\r\n", "0123456789");
        chunked_ok("a\r\n0123456789\r\n0000\r\n\r\n", "0123456789");
        chunked_ok("5;name=value;x=\"q\"\r\nhello\r\n0;last\r\n\r\n", "hello");
        chunked_ok("5 ;ext\r\nhello\r\n0 \r\n\r\n", "hello");
        chunked_ok("5\r\nhello\r\n0\r\nTrailer: one\r\nOther: two\r\n\r\n", "hello");
    }

    #[test]
    fn chunked_body_leaves_the_next_request() {
        let input = b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n";
        assert_all_splits(BodyLength::Chunked, input, Ok((b"abc", 13)));
    }

    #[test]
    fn invalid_chunks() {
        let table = [
            "\r\n",                         // empty size
            "x\r\n",                        // not hex
            "+5\r\nhello\r\n0\r\n\r\n",     // sign
            "0x5\r\nhello\r\n0\r\n\r\n",    // prefix
            "5\nhello\r\n0\r\n\r\n",        // bare LF after size
            "5\rhello\r\n0\r\n\r\n",        // bare CR after size
            "5\r\nhelloX\r\n0\r\n\r\n",     // data longer than size
            "5\r\nhello\n0\r\n\r\n",        // bare LF after data
            "5\r\nhello\r\n0\r\n\n",        // bare LF at end
            "5;a\nb\r\nhello\r\n0\r\n\r\n", // bare LF in extension
            "5;\x01\r\nhello\r\n0\r\n\r\n", // control byte in extension
            "0\r\nX: y\nZ: w\r\n\r\n",      // bare LF in trailer
            "0\r\nX: \x00\r\n\r\n",         // control byte in trailer
            "10000000000000000\r\n",        // 17 hex digits
            " 5\r\nhello\r\n0\r\n\r\n",     // leading space
        ];
        for input in table {
            chunked_err(input);
        }
        let long_ext = format!("1;{}\r\na\r\n0\r\n\r\n", "e".repeat(MAX_CHUNK_EXT_BYTES));
        chunked_err(&long_ext);
        let long_space = format!("1{}\r\na\r\n0\r\n\r\n", " ".repeat(MAX_CHUNK_EXT_BYTES + 1));
        chunked_err(&long_space);
        let longest = format!("1;{}\r\na\r\n0\r\n\r\n", "e".repeat(MAX_CHUNK_EXT_BYTES - 1));
        chunked_ok(&longest, "a");
        let long_trailer = format!("0\r\nX: {}\r\n\r\n", "t".repeat(MAX_TRAILER_BYTES));
        chunked_err(&long_trailer);
    }

    #[test]
    fn huge_chunk_size_is_read_not_allocated() {
        let mut d = ChunkedDecoder::new();
        let step = d.decode(b"ffffffffffffffff\r\nab", usize::MAX).unwrap();
        assert_eq!(step.data, 18..20);
        assert_eq!(d.size, u64::MAX - 2);
    }
}
