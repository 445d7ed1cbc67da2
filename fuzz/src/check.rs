//! The properties each fuzz target asserts. A failed assertion is a finding.

use servicegroup::__fuzz as sg;

use super::input::{self, Input};
use super::reference::{self, Framing, Parsed};

/// Bytes of unread body a server drains before reusing a connection (`DRAIN_LIMIT`).
const DRAIN_LIMIT: usize = 256 * 1024;

/// The limits a selector picks: small ones reach the 431 paths quickly.
fn limits(selector: u8) -> (sg::Limits, reference::Limits) {
    let (bytes, fields) = if selector & 1 == 0 { (512, 8) } else { (64 * 1024, 100) };
    (
        sg::Limits { max_head_bytes: bytes, max_headers: fields },
        reference::Limits { max_head_bytes: bytes, max_headers: fields },
    )
}

/// A comparable summary of a parse result; error kinds are kept except "too large", which
/// legitimately depends on how much had arrived.
fn summary(result: &Result<Option<(sg::Head, usize)>, sg::DecodeError>) -> String {
    match result {
        Ok(None) => "incomplete".into(),
        Err(sg::DecodeError::HeadTooLarge) => "error".into(),
        Err(e) => format!("error {e:?}"),
        Ok(Some((h, len))) => format!(
            "{} {} {:?} {:?} {:?} keep-alive={} continue={} len={len}",
            h.method, h.uri, h.version, h.headers, h.body, h.keep_alive, h.expect_continue
        ),
    }
}

/// `head`: the head parser never panics, and its answer does not depend on how the bytes
/// arrived; a complete head reparses to the same value.
pub fn head(data: &[u8]) {
    let Input { selector, pieces, payload } = input::decode(data);
    let (ours, _) = limits(selector);
    let (split, used_split) = sg::head_in_pieces(payload, &pieces, ours);
    let (whole, used_whole) = sg::head_in_pieces(payload, &[], ours);
    let (a, b) = (summary(&split), summary(&whole));
    // "Too large" may stand for another error the bytes that had arrived did not show yet.
    let too_large = (a == "error" && b.starts_with("error")) || (b == "error" && a.starts_with("error"));
    if !too_large {
        assert_eq!(a, b, "the answer depends on the split {pieces:?}");
    }
    if let Ok(Some((_, len))) = &whole {
        assert_eq!(used_split, used_whole);
        let start = used_whole - len;
        let again = sg::parse_head(&payload[start..used_whole], ours);
        assert_eq!(summary(&again), b, "the head alone parses differently");
        // A valid head has no invalid prefix.
        for end in [start, start + len / 2, used_whole - 1] {
            let prefix = sg::parse_head(&payload[start..end], ours);
            assert!(matches!(prefix, Ok(None)), "prefix of {end} bytes gave {}", summary(&prefix));
        }
    }
}

/// Decodes a body arriving in pieces, at most `max` data bytes a step.
fn decode_pieces(
    framing: sg::BodyLength,
    payload: &[u8],
    pieces: &[usize],
    max: usize,
) -> (Result<Vec<u8>, sg::DecodeError>, usize, bool) {
    let mut decoder = sg::BodyDecoder::new(framing);
    let mut buffered = Vec::new();
    let mut data = Vec::new();
    let mut consumed = 0;
    for piece in input::cut(payload, pieces) {
        buffered.extend_from_slice(&piece);
        loop {
            let step = match decoder.decode(&buffered, max) {
                Ok(step) => step,
                // Where in the input an error is found is the decoder's business.
                Err(e) => return (Err(e), 0, false),
            };
            assert!(step.data.end <= step.consumed && step.consumed <= buffered.len(), "{step:?}");
            assert!(step.data.len() <= max);
            data.extend_from_slice(&buffered[step.data.clone()]);
            buffered.drain(..step.consumed);
            consumed += step.consumed;
            if decoder.is_done() || step.consumed == 0 {
                break;
            }
        }
        if decoder.is_done() {
            break;
        }
    }
    (Ok(data), consumed, decoder.is_done())
}

/// `body`: the Content-Length and chunked decoders give the same bytes, errors and end
/// whatever the read splits and step sizes, and agree with the reference decoder.
pub fn body(data: &[u8]) {
    let Input { selector, pieces, payload } = input::decode(data);
    let (ours, theirs) = if selector & 1 == 0 {
        (sg::BodyLength::Chunked, Framing::Chunked)
    } else {
        let n = u64::from(selector >> 1) * 3;
        (sg::BodyLength::Length(n), Framing::Length(n))
    };
    let max = pieces.first().copied().unwrap_or(usize::MAX);
    let split = decode_pieces(ours, payload, &pieces, max);
    let whole = decode_pieces(ours, payload, &[], usize::MAX);
    assert_eq!(split, whole, "the body depends on the split {pieces:?} or step size {max}");
    match (reference::body(theirs, payload), whole) {
        (reference::Body::Complete(expected, used), (Ok(data), consumed, true)) => {
            assert_eq!(data, expected);
            assert_eq!(consumed, used);
        }
        (reference::Body::Incomplete, (Ok(_), consumed, false)) => assert_eq!(consumed, payload.len()),
        (reference::Body::Invalid, (Err(_), _, _)) => {}
        (expected, got) => panic!("reference says {expected:?}, the decoder says {got:?}"),
    }
}

/// The target as it should compare: http's `Uri` writes the scheme in lower case and an
/// absolute-form target with no path gains `/`.
fn normalized_target(target: &str) -> String {
    match target.find("://") {
        Some(i) if !target.starts_with('/') => {
            let (scheme, rest) = target.split_at(i);
            let rest = &rest[3..];
            let path_at = rest.find(['/', '?']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(path_at);
            let tail = if tail.starts_with('/') { tail.to_string() } else { format!("/{tail}") };
            format!("{}://{authority}{tail}", scheme.to_ascii_lowercase())
        }
        _ => target.to_string(),
    }
}

/// `differential`: the head parser and message-length decision agree with the reference
/// (accept or reject; method, target, version, framing, persistence, length of the head).
pub fn differential(data: &[u8]) {
    let Input { selector, payload, .. } = input::decode(data);
    let (ours, theirs) = limits(selector);
    let (parsed, used) = sg::head_in_pieces(payload, &[], ours);
    let skip = reference::empty_lines(payload);
    let expected = reference::parse_head(&payload[skip..], theirs);
    match (&parsed, &expected) {
        (Ok(Some((head, len))), Parsed::Accepted(r)) => {
            assert_eq!(head.method.as_str(), r.method);
            assert_eq!(normalized_target(&head.uri.to_string()), normalized_target(&r.target));
            assert_eq!(head.version == http::Version::HTTP_10, r.minor == 0);
            let framing = match head.body {
                sg::BodyLength::Length(n) => Framing::Length(n),
                sg::BodyLength::Chunked => Framing::Chunked,
            };
            assert_eq!(framing, r.framing);
            assert_eq!((head.keep_alive, head.expect_continue), (r.keep_alive, r.expect_continue));
            assert_eq!((*len, used), (r.head_len, skip + r.head_len));
        }
        (Err(_), Parsed::Rejected) | (Ok(None), Parsed::Incomplete) | (Err(_), Parsed::Incomplete) => {}
        _ => panic!("servicegroup: {}\nreference: {expected:?}", summary(&parsed)),
    }
}

/// Most polls a connection may take for a payload of `len` bytes before it counts as hung.
fn poll_budget(len: usize) -> usize {
    1_000 + 20 * len
}

/// What the reference expects a connection to do with a payload.
struct Walk {
    /// Requests the handler must see, with their bodies.
    messages: Vec<(reference::Request, reference::Body)>,
    /// How the walk ended.
    end: End,
}

/// Why the walk stopped.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The server closes after the last message (it asked to, or its body cannot be skipped).
    Closed,
    /// The input ended (possibly mid-head).
    Incomplete,
    /// The next head is refused: one error response follows.
    Rejected,
}

/// Walks the payload as a sequence of messages, the way RFC 9112 frames them.
fn walk(payload: &[u8], limits: reference::Limits) -> Walk {
    let mut messages = Vec::new();
    let mut at = 0;
    loop {
        at += reference::empty_lines(&payload[at..]);
        let request = match reference::parse_head(&payload[at..], limits) {
            Parsed::Incomplete => return Walk { messages, end: End::Incomplete },
            Parsed::Rejected => return Walk { messages, end: End::Rejected },
            Parsed::Accepted(request) => request,
        };
        let body = reference::body(request.framing, &payload[at + request.head_len..]);
        let next = match &body {
            reference::Body::Complete(data, used) => {
                // A HEAD response never reads the body: the server drains it, up to a limit,
                // and cannot ask for it after an Expect.
                let unskippable = request.method == "HEAD" && (request.expect_continue || data.len() > DRAIN_LIMIT);
                (request.keep_alive && !unskippable).then_some(at + request.head_len + used)
            }
            _ => None,
        };
        messages.push((request, body));
        match next {
            Some(next) => at = next,
            None => return Walk { messages, end: End::Closed },
        }
    }
}

/// A response read from the output.
struct Response {
    /// Status code.
    status: u16,
    /// Content-Length, if sent.
    length: Option<usize>,
    /// Whether it was sent chunked.
    chunked: bool,
    /// Whether it said `Connection: close`.
    close: bool,
}

/// Parses one response head from the front of `out`; `None` if it is cut short.
fn response_head(out: &mut &[u8]) -> Option<Response> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut fields);
    let len = match parsed.parse(out).expect("a malformed response head") {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return None,
    };
    let value = |name: &str| parsed.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
    let length = value("content-length").map(|v| std::str::from_utf8(v).unwrap().parse().expect("numeric length"));
    let chunked = value("transfer-encoding").is_some();
    assert!(!(length.is_some() && chunked), "both Content-Length and Transfer-Encoding");
    let close = value("connection").is_some_and(|v| v.eq_ignore_ascii_case(b"close"));
    let response = Response { status: parsed.code.unwrap(), length, chunked, close };
    *out = &out[len..];
    Some(response)
}

/// Reads a response body with the response's framing; `None` if it is cut short.
fn response_body(out: &mut &[u8], response: &Response) -> Option<Vec<u8>> {
    if let Some(len) = response.length {
        let body = out.get(..len)?.to_vec();
        *out = &out[len..];
        return Some(body);
    }
    if !response.chunked {
        return Some(Vec::new());
    }
    let mut body = Vec::new();
    loop {
        let line_end = out.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&out[..line_end]).unwrap(), 16).expect("chunk size");
        *out = &out[line_end + 2..];
        if size == 0 {
            assert_eq!(out.get(..2)?, b"\r\n", "trailers or junk after the last chunk");
            *out = &out[2..];
            return Some(body);
        }
        body.extend_from_slice(out.get(..size)?);
        assert_eq!(out.get(size..size + 2)?, b"\r\n", "chunk data not followed by CRLF");
        *out = &out[size + 2..];
    }
}

/// `connection`: the whole connection loop over an in-memory pipe with arbitrary read
/// splits, stalls and short writes, with a handler that streams each body back. It never
/// panics or hangs; it serves exactly the requests RFC 9112 framing finds, in order, never a
/// smuggled one; and every response is well-framed and carries its request's exact body.
pub fn connection(data: &[u8]) {
    let Input { selector, pieces, payload } = input::decode(data);
    let pending_every = [0, 0, 2, 3, 5, 7, 11, 13][usize::from(selector & 7)];
    let write_limit = [usize::MAX, 1, 3, 17, 64, 1024, 4096, 65_536][usize::from((selector >> 3) & 7)];
    let (ours, theirs) = limits(selector >> 6);
    let script = sg::Script { reads: input::cut(payload, &pieces), pending_every, write_limit, limits: ours };
    let exchange = sg::connection(script, poll_budget(payload.len()));
    assert!(exchange.finished, "the connection loop did not finish in {} polls", exchange.polls);

    let expected = walk(payload, theirs);
    let served: Vec<(String, String)> =
        exchange.served.iter().map(|(m, t)| (m.to_string(), normalized_target(t))).collect();
    let wanted: Vec<(String, String)> =
        expected.messages.iter().map(|(r, _)| (r.method.clone(), normalized_target(&r.target))).collect();
    assert_eq!(served, wanted, "served requests differ from RFC 9112 framing");

    let mut out = exchange.output.as_slice();
    for (i, (request, body)) in expected.messages.iter().enumerate() {
        let last = i + 1 == expected.messages.len();
        let mut response = response_head(&mut out);
        while let Some(interim) = response.as_ref().filter(|r| r.status == 100) {
            assert!(request.expect_continue && interim.length.is_none());
            response = response_head(&mut out);
        }
        let complete = matches!(body, reference::Body::Complete(..));
        let Some(response) = response else {
            assert!(last && !complete, "response {i} is missing or cut short");
            return;
        };
        if !complete {
            // The body broke or ended: an error, or a response cut short. Nothing after it.
            assert!(last);
            if request.method == "CONNECT" {
                // Answered 405 before its body was read (the handler's 2xx is replaced, its
                // body never read), or 400 if the broken framing was seen first; never 2xx.
                assert!(
                    response.status == 405 || (response.status == 400 && response.close),
                    "CONNECT got {}",
                    response.status
                );
            } else if response.status != 200 {
                assert!(matches!(response.status, 400 | 500) && response.close, "status {}", response.status);
            }
            return;
        }
        // RFC 9110 §9.3.6: a 2xx to CONNECT would open a tunnel the handler never took.
        if request.method == "CONNECT" {
            assert_eq!(response.status, 405, "response {i}");
            let _ = response_body(&mut out, &response).expect("a complete 405 body");
            continue;
        }
        assert_eq!(response.status, 200, "response {i}");
        let reference::Body::Complete(data, _) = body else { unreachable!() };
        if request.method == "HEAD" {
            continue;
        }
        let sent = response_body(&mut out, &response).expect("a complete body was cut short");
        assert!(sent == *data, "response {i} does not carry its request's body");
    }
    match expected.end {
        End::Rejected => {
            let response = response_head(&mut out).expect("no error response for a refused head");
            assert!(matches!(response.status, 400 | 417 | 431 | 501 | 505) && response.close, "{}", response.status);
            let _ = response_body(&mut out, &response).expect("error response body");
        }
        End::Incomplete if !out.is_empty() => {
            // An early refusal of a head that had not ended.
            let response = response_head(&mut out).expect("junk after the last response");
            assert!(matches!(response.status, 400 | 417 | 431 | 501 | 505) && response.close, "{}", response.status);
            let _ = response_body(&mut out, &response).expect("error response body");
        }
        _ => {}
    }
    assert!(out.is_empty(), "bytes after the last response: {:?}", String::from_utf8_lossy(out));
}
