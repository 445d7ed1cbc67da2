//! A reference request parser, written straight from RFC 9112 (with RFC 9110 for fields and
//! RFC 3986 for targets), for differential fuzzing. Slow and plain on purpose: every rule is
//! one visible step, and it shares no code with servicegroup's codec or with httparse.
//!
//! Where the RFCs leave a choice to the server, these are servicegroup's choices:
//! - a bare LF ends a line (RFC 9112 §2.2 MAY); a CR anywhere else is an error;
//! - empty lines before the request line are skipped (§2.2);
//! - obs-fold is an error (§5.2 MAY reject);
//! - a Content-Length list of identical values is one value (RFC 9110 §8.6);
//! - Transfer-Encoding with Content-Length, or in HTTP/1.0, is an error (§6.1, §6.3);
//! - the only transfer coding is chunked, applied once, last;
//! - an Expect other than 100-continue is an error (RFC 9110 §10.1.1 MAY 417);
//! - the request-target character rules of `valid_target` in `src/h1/decode.rs`, as
//!   documented there (RFC 3986 plus `[]{}|\^`` in queries, no userinfo, no fragment,
//!   absolute-form only for `http` and `https`, host names of letters, digits and `-._~`);
//! - HTTP/1.1 needs exactly one Host; HTTP/1.0 at most one (RFC 9112 §3.2).

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// This many bytes.
    Length(u64),
    /// Chunked.
    Chunked,
}

/// An accepted request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method, as sent.
    pub method: String,
    /// The request-target, as sent.
    pub target: String,
    /// Minor version: 0 or 1.
    pub minor: u8,
    /// How the body is delimited.
    pub framing: Framing,
    /// Bytes from the start of the request line to the end of the blank line.
    pub head_len: usize,
    /// Whether the connection stays open after this request.
    pub keep_alive: bool,
    /// Whether the request asks for 100 Continue.
    pub expect_continue: bool,
}

/// What the reference made of a head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The head has not ended yet (and is within the limit).
    Incomplete,
    /// The request is refused.
    Rejected,
    /// The request head is valid.
    Accepted(Request),
}

/// Limits, as in `Config`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most bytes in a head.
    pub max_head_bytes: usize,
    /// Most header fields.
    pub max_headers: usize,
}

/// Bytes of leading empty lines (CRLF or LF).
pub fn empty_lines(input: &[u8]) -> usize {
    let mut i = 0;
    loop {
        if input[i..].starts_with(b"\r\n") {
            i += 2;
        } else if input[i..].starts_with(b"\n") {
            i += 1;
        } else {
            return i;
        }
    }
}

/// Parses one request head at the start of `input` (no leading empty lines).
pub fn parse_head(input: &[u8], limits: Limits) -> Parsed {
    // Lines: split at LF; a CR must come right before an LF.
    let mut lines: Vec<&[u8]> = Vec::new();
    let mut start = 0;
    let mut head_len = None;
    for (i, &b) in input.iter().enumerate() {
        if b != b'\n' {
            continue;
        }
        let mut line = &input[start..i];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        start = i + 1;
        if line.is_empty() && !lines.is_empty() {
            head_len = Some(i + 1);
            break;
        }
        lines.push(line);
    }
    let Some(head_len) = head_len else {
        // Incomplete; but a head already past the limit, or a stray CR, is refused now.
        if input.len() > limits.max_head_bytes {
            return Parsed::Rejected;
        }
        return Parsed::Incomplete;
    };
    if head_len > limits.max_head_bytes || input[..head_len].windows(2).any(|w| w[0] == b'\r' && w[1] != b'\n') {
        return Parsed::Rejected;
    }
    match request(&lines, limits) {
        Some(mut request) => {
            request.head_len = head_len;
            Parsed::Accepted(request)
        }
        None => Parsed::Rejected,
    }
}

/// Validates the request line and fields (everything but the limits on bytes).
fn request(lines: &[&[u8]], limits: Limits) -> Option<Request> {
    // request-line = method SP request-target SP HTTP-version (§3)
    let parts: Vec<&[u8]> = lines[0].split(|&b| b == b' ').collect();
    let [method, target, version] = parts[..] else { return None };
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return None;
    }
    let minor = match version {
        b"HTTP/1.0" => 0,
        b"HTTP/1.1" => 1,
        _ => return None,
    };
    if !target_ok(method, target) {
        return None;
    }

    // field-line = field-name ":" OWS field-value OWS (§5)
    let fields = &lines[1..];
    if fields.len() > limits.max_headers {
        return None;
    }
    let mut content_lengths: Vec<u64> = Vec::new();
    let mut codings: Vec<String> = Vec::new();
    let mut saw_te = false;
    let mut hosts = 0;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut expect_continue = false;
    for line in fields {
        let colon = line.iter().position(|&b| b == b':')?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        // No whitespace before the colon, no obs-fold (a line starting with whitespace).
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return None;
        }
        let value = trim(value);
        if !value.iter().all(|&b| b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80) {
            return None;
        }
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        let items = || value.split(|&b| b == b',').map(trim).filter(|s| !s.is_empty());
        match name.as_str() {
            "content-length" => {
                let before = content_lengths.len();
                for item in items() {
                    if !item.iter().all(u8::is_ascii_digit) {
                        return None;
                    }
                    content_lengths.push(std::str::from_utf8(item).ok()?.parse::<u64>().ok()?);
                }
                if content_lengths.len() == before {
                    return None;
                }
            }
            "transfer-encoding" => {
                saw_te = true;
                codings.extend(items().map(|c| String::from_utf8_lossy(c).to_ascii_lowercase()));
            }
            "host" => {
                hosts += 1;
                if !value.is_empty() && !host_port_ok(value) {
                    return None;
                }
            }
            "connection" => {
                for item in items() {
                    close |= item.eq_ignore_ascii_case(b"close");
                    keep_alive_token |= item.eq_ignore_ascii_case(b"keep-alive");
                }
            }
            "expect" => {
                for item in items() {
                    if !item.eq_ignore_ascii_case(b"100-continue") {
                        return None;
                    }
                    expect_continue = true;
                }
            }
            _ => {}
        }
    }
    if (minor == 1 && hosts != 1) || hosts > 1 {
        return None;
    }

    // Message body length, RFC 9112 §6.3, for a request:
    let framing = if saw_te {
        // 3. Transfer-Encoding and Content-Length together: refuse (smuggling).
        // 4. chunked must be the final coding, else the length cannot be known: 400.
        if !content_lengths.is_empty() || minor == 0 {
            return None;
        }
        if codings.last().map(String::as_str) != Some("chunked")
            || codings.iter().filter(|c| *c == "chunked").count() != 1
        {
            return None;
        }
        // Other codings under chunked are not implemented.
        if codings.len() != 1 {
            return None;
        }
        Framing::Chunked
    } else if let Some(&first) = content_lengths.first() {
        // 5. Content-Length values must all agree.
        if content_lengths.iter().any(|&n| n != first) {
            return None;
        }
        Framing::Length(first)
    } else {
        // 6. A request with neither has no body.
        Framing::Length(0)
    };
    let keep_alive = if minor == 0 { keep_alive_token && !close } else { !close };
    let expect_continue = expect_continue && minor == 1 && framing != Framing::Length(0);
    Some(Request {
        method: String::from_utf8_lossy(method).into_owned(),
        target: String::from_utf8_lossy(target).into_owned(),
        minor,
        framing,
        head_len: 0,
        keep_alive,
        expect_continue,
    })
}

/// tchar (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Trims SP and HTAB from both ends.
fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(s.len());
    let end = s.iter().rposition(|&b| b != b' ' && b != b'\t').map_or(start, |e| e + 1);
    &s[start..end]
}

/// The request-target rules (RFC 9112 §3.2, RFC 3986 §3), written as a scan with states.
fn target_ok(method: &[u8], target: &[u8]) -> bool {
    if method == b"CONNECT" {
        // authority-form = uri-host ":" port
        let Some(colon) = target.iter().rposition(|&b| b == b':') else { return false };
        return host_ok(&target[..colon]) && target[colon + 1..].iter().all(u8::is_ascii_digit);
    }
    if target == b"*" {
        return method == b"OPTIONS";
    }
    if target.starts_with(b"/") {
        return path_query_ok(target);
    }
    // absolute-form, for the schemes this server serves
    let lower = target.to_ascii_lowercase();
    let rest = if lower.starts_with(b"http://") {
        &target[7..]
    } else if lower.starts_with(b"https://") {
        &target[8..]
    } else {
        return false;
    };
    let authority_end = rest.iter().position(|&b| b == b'/' || b == b'?').unwrap_or(rest.len());
    host_port_ok(&rest[..authority_end]) && path_query_ok(&rest[authority_end..])
}

/// host [ ":" port ].
fn host_port_ok(authority: &[u8]) -> bool {
    let host = if authority.ends_with(b"]") {
        authority
    } else {
        match authority.iter().rposition(|&b| b == b':') {
            Some(c) if authority[c + 1..].iter().all(u8::is_ascii_digit) => &authority[..c],
            Some(_) => return false,
            None => authority,
        }
    };
    host_ok(host)
}

/// A DNS name or IPv4 address, or a bracketed IPv6 literal; never empty, never userinfo.
fn host_ok(host: &[u8]) -> bool {
    if host.len() >= 2 && host[0] == b'[' && host[host.len() - 1] == b']' {
        let inner = &host[1..host.len() - 1];
        return !inner.is_empty() && inner.iter().all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
    }
    !host.is_empty() && host.iter().all(|&b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

/// path-abempty, then an optional query with the lenient extras.
fn path_query_ok(s: &[u8]) -> bool {
    let pchar = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b);
    let q = s.iter().position(|&b| b == b'?').unwrap_or(s.len());
    escapes_ok(&s[..q], &|b| pchar(b) || b == b'/')
        && (q == s.len() || escapes_ok(&s[q + 1..], &|b| pchar(b) || b"/?[]{}|\\^`".contains(&b)))
}

/// Every byte allowed, or part of a `%` HEXDIG HEXDIG escape.
fn escapes_ok(s: &[u8], allowed: &dyn Fn(u8) -> bool) -> bool {
    let mut rest = s;
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            match tail {
                [h, l, more @ ..] if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => rest = more,
                _ => return false,
            }
        } else if allowed(b) {
            rest = tail;
        } else {
            return false;
        }
    }
    true
}

/// What the reference made of a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// The whole body, and the bytes it took on the wire.
    Complete(Vec<u8>, usize),
    /// The input ended first.
    Incomplete,
    /// The framing is broken.
    Invalid,
}

/// Decodes a body with `framing` from the start of `input` (RFC 9112 §6.3, §7.1).
pub fn body(framing: Framing, input: &[u8]) -> Body {
    match framing {
        Framing::Length(n) => {
            if (input.len() as u64) < n {
                Body::Incomplete
            } else {
                Body::Complete(input[..n as usize].to_vec(), n as usize)
            }
        }
        Framing::Chunked => chunked(input),
    }
}

/// chunked-body = *chunk last-chunk trailer-section CRLF (§7.1), lines strictly CRLF.
fn chunked(input: &[u8]) -> Body {
    let mut data = Vec::new();
    let mut at = 0;
    loop {
        // chunk-size [ chunk-ext ] CRLF
        let Some(line) = crlf_line(&input[at..]) else {
            return if input[at..].contains(&b'\n') { Body::Invalid } else { partial_size_line(&input[at..]) };
        };
        at += line.len() + 2;
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        if digits == 0 || digits > 16 {
            return Body::Invalid;
        }
        let size = u64::from_str_radix(std::str::from_utf8(&line[..digits]).unwrap(), 16).unwrap();
        let ext = &line[digits..];
        let after_ws = ext.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(ext.len());
        if after_ws < ext.len() && ext[after_ws] != b';' {
            return Body::Invalid;
        }
        if ext.len() > 4096 || !ext.iter().all(|&b| b == b'\t' || (0x20..=0x7e).contains(&b) || b >= 0x80) {
            return Body::Invalid;
        }
        if size == 0 {
            break;
        }
        if ((input.len() - at) as u64) < size {
            return Body::Incomplete;
        }
        data.extend_from_slice(&input[at..at + size as usize]);
        at += size as usize;
        match &input[at..] {
            [b'\r', b'\n', ..] => at += 2,
            [] | [b'\r'] => return Body::Incomplete,
            _ => return Body::Invalid,
        }
    }
    // trailer-section = *( field-line CRLF ), then CRLF; skipped, bounded at 16 KiB.
    let mut trailer_bytes = 0;
    loop {
        let Some(line) = crlf_line(&input[at..]) else {
            return if input[at..].contains(&b'\n') {
                Body::Invalid
            } else {
                partial_trailer(&input[at..], trailer_bytes)
            };
        };
        at += line.len() + 2;
        if line.is_empty() {
            return Body::Complete(data, at);
        }
        trailer_bytes += line.len();
        if trailer_bytes > 16 * 1024 || !line.iter().all(|&b| b == b'\t' || (0x20..=0x7e).contains(&b) || b >= 0x80) {
            return Body::Invalid;
        }
    }
}

/// The line before the first CRLF, if the input has one and no bare CR or LF comes first.
fn crlf_line(input: &[u8]) -> Option<&[u8]> {
    let lf = input.iter().position(|&b| b == b'\n')?;
    if lf == 0 || input[lf - 1] != b'\r' || input[..lf - 1].contains(&b'\r') {
        return None;
    }
    Some(&input[..lf - 1])
}

/// An unfinished size line: invalid if what is there already breaks the grammar.
fn partial_size_line(rest: &[u8]) -> Body {
    let cr = rest.iter().position(|&b| b == b'\r');
    let line = &rest[..cr.unwrap_or(rest.len())];
    if cr.is_some_and(|c| c + 1 < rest.len()) {
        return Body::Invalid; // a CR followed by something other than LF
    }
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let ext = &line[digits..];
    let after_ws = ext.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(ext.len());
    let ext_ok = (after_ws == ext.len() || ext[after_ws] == b';')
        && ext.len() <= 4096
        && ext.iter().all(|&b| b == b'\t' || (0x20..=0x7e).contains(&b) || b >= 0x80);
    if digits > 16 || (digits == 0 && !line.is_empty()) || (digits == 0 && cr.is_some()) || !ext_ok {
        Body::Invalid
    } else {
        Body::Incomplete
    }
}

/// An unfinished trailer line, after `so_far` trailer bytes.
fn partial_trailer(rest: &[u8], so_far: usize) -> Body {
    let cr = rest.iter().position(|&b| b == b'\r');
    if cr.is_some_and(|c| c + 1 < rest.len()) {
        return Body::Invalid;
    }
    let line = &rest[..cr.unwrap_or(rest.len())];
    if so_far + line.len() <= 16 * 1024 && line.iter().all(|&b| b == b'\t' || (0x20..=0x7e).contains(&b) || b >= 0x80) {
        Body::Incomplete
    } else {
        Body::Invalid
    }
}
