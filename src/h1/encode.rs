//! Response encoding: a status, fields and the framing the connection chose, into bytes.
//!
//! The connection loop decides the framing (RFC 9112 §6.1-6.3) and whether to close; this
//! module only writes what it is told, appending to a caller-owned buffer so that several
//! pipelined responses leave in one write. Fields that belong to the framing
//! (`Connection`, `Content-Length`, `Transfer-Encoding`) are always ours, never the handler's.

use http::header::{self, HeaderMap, HeaderValue};
use http::StatusCode;

/// The interim response sent when a handler starts reading a body the client is holding back.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The last chunk of a chunked body, with no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// The line ending after each chunk's data.
pub const CRLF: &[u8] = b"\r\n";

/// Length of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub const DATE_LEN: usize = 29;

/// What the `Connection` field of a response says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    /// Nothing: the version's default applies (HTTP/1.1 persistent).
    Default,
    /// `keep-alive`, for HTTP/1.0 clients that asked for it.
    KeepAlive,
    /// `close`: this is the last response on the connection.
    Close,
    /// `upgrade`: a `101 Switching Protocols`; the handler's `Upgrade` field names the protocol.
    Upgrade,
}

/// A response head, with the framing already decided.
#[derive(Debug)]
pub struct ResponseHead<'a> {
    /// The status code; the reason phrase is the canonical one.
    pub status: StatusCode,
    /// The handler's fields, minus those the framing owns.
    pub headers: &'a HeaderMap,
    /// Written as `Content-Length` when set.
    pub content_length: Option<u64>,
    /// Written as `Transfer-Encoding: chunked` when true.
    pub chunked: bool,
    /// The `Connection` field.
    pub connection: Connection,
    /// A `Date` value to add; `None` when the handler set its own.
    pub date: Option<&'a [u8; DATE_LEN]>,
}

/// Appends the status line and fields of `head`, and the blank line, to `out`.
pub fn encode_head(out: &mut Vec<u8>, head: &ResponseHead<'_>) {
    match head.status {
        // The usual case in one copy of a constant.
        StatusCode::OK => out.extend_from_slice(b"HTTP/1.1 200 OK\r\n"),
        status => {
            out.extend_from_slice(b"HTTP/1.1 ");
            out.extend_from_slice(status.as_str().as_bytes());
            out.push(b' ');
            out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
            out.extend_from_slice(CRLF);
        }
    }
    if let Some(date) = head.date {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(date);
        out.extend_from_slice(CRLF);
    }
    for (name, value) in head.headers {
        if name == header::CONNECTION || name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(CRLF);
    }
    if let Some(len) = head.content_length {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
        out.extend_from_slice(CRLF);
    }
    if head.chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    match head.connection {
        Connection::Default => {}
        Connection::KeepAlive => out.extend_from_slice(b"connection: keep-alive\r\n"),
        Connection::Close => out.extend_from_slice(b"connection: close\r\n"),
        Connection::Upgrade => out.extend_from_slice(b"connection: upgrade\r\n"),
    }
    out.extend_from_slice(CRLF);
}

/// Appends a complete plain-text error response that closes the connection.
pub fn encode_error(out: &mut Vec<u8>, status: StatusCode, message: &str, date: &[u8; DATE_LEN]) {
    let mut fields = HeaderMap::new();
    fields.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    let head = ResponseHead {
        status,
        headers: &fields,
        content_length: Some(message.len() as u64 + 1),
        chunked: false,
        connection: Connection::Close,
        date: Some(date),
    };
    encode_head(out, &head);
    out.extend_from_slice(message.as_bytes());
    out.push(b'\n');
}

/// Appends a chunk-size line (`1a2b\r\n`) for a chunk of `len` bytes.
pub fn encode_chunk_size(out: &mut Vec<u8>, len: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(CRLF);
}

/// Formats seconds since the Unix epoch as an IMF-fixdate (RFC 9110 §5.6.7).
pub fn encode_date(unix_secs: u64) -> [u8; DATE_LEN] {
    const DAYS: [&[u8; 3]; 7] = [b"Sun", b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat"];
    const MONTHS: [&[u8; 3]; 12] =
        [b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec"];
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's days_from_civil, inverted).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = (yoe + era * 400 + u64::from(month <= 2)) % 10_000;

    let mut out = *b"Thu, 01 Jan 1970 00:00:00 GMT";
    out[..3].copy_from_slice(DAYS[((days + 4) % 7) as usize]);
    let two = |out: &mut [u8], n: u64| {
        out[0] = b'0' + (n / 10) as u8;
        out[1] = b'0' + (n % 10) as u8;
    };
    two(&mut out[5..7], day);
    out[8..11].copy_from_slice(MONTHS[(month - 1) as usize]);
    two(&mut out[12..14], year / 100);
    two(&mut out[14..16], year % 100);
    two(&mut out[17..19], secs / 3600);
    two(&mut out[20..22], secs / 60 % 60);
    two(&mut out[23..25], secs % 60);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATE: &[u8; DATE_LEN] = b"Sun, 06 Nov 1994 08:49:37 GMT";

    fn head(status: u16, headers: &HeaderMap, length: Option<u64>, chunked: bool, connection: Connection) -> String {
        let mut out = Vec::new();
        encode_head(
            &mut out,
            &ResponseHead {
                status: StatusCode::from_u16(status).unwrap(),
                headers,
                content_length: length,
                chunked,
                connection,
                date: Some(DATE),
            },
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn heads() {
        let mut fields = HeaderMap::new();
        fields.insert("content-type", HeaderValue::from_static("text/plain"));
        assert_eq!(
            head(200, &fields, Some(5), false, Connection::Default),
            "HTTP/1.1 200 OK\r\ndate: Sun, 06 Nov 1994 08:49:37 GMT\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\n"
        );
        assert_eq!(
            head(404, &HeaderMap::new(), None, true, Connection::Close),
            "HTTP/1.1 404 Not Found\r\ndate: Sun, 06 Nov 1994 08:49:37 GMT\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        assert_eq!(
            head(599, &HeaderMap::new(), None, false, Connection::KeepAlive),
            "HTTP/1.1 599 \r\ndate: Sun, 06 Nov 1994 08:49:37 GMT\r\nconnection: keep-alive\r\n\r\n"
        );
    }

    #[test]
    fn framing_fields_from_the_handler_are_dropped() {
        let mut fields = HeaderMap::new();
        fields.insert("content-length", HeaderValue::from_static("999"));
        fields.insert("transfer-encoding", HeaderValue::from_static("gzip"));
        fields.insert("connection", HeaderValue::from_static("upgrade"));
        fields.append("x-multi", HeaderValue::from_static("a"));
        fields.append("x-multi", HeaderValue::from_static("b"));
        let text = head(200, &fields, Some(2), false, Connection::Default);
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ndate: Sun, 06 Nov 1994 08:49:37 GMT\r\nx-multi: a\r\nx-multi: b\r\ncontent-length: 2\r\n\r\n"
        );
    }

    #[test]
    fn error_response() {
        let mut out = b"previous".to_vec();
        encode_error(&mut out, StatusCode::BAD_REQUEST, "invalid chunk size line", DATE);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "previousHTTP/1.1 400 Bad Request\r\ndate: Sun, 06 Nov 1994 08:49:37 GMT\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 24\r\nconnection: close\r\n\r\ninvalid chunk size line\n"
        );
    }

    #[test]
    fn chunk_sizes() {
        for (len, text) in [(0, "0\r\n"), (1, "1\r\n"), (15, "f\r\n"), (16, "10\r\n"), (0x1a2b, "1a2b\r\n")] {
            let mut out = Vec::new();
            encode_chunk_size(&mut out, len);
            assert_eq!(out, text.as_bytes());
        }
        let mut out = Vec::new();
        encode_chunk_size(&mut out, usize::MAX);
        assert_eq!(out, format!("{:x}\r\n", usize::MAX).as_bytes());
    }

    #[test]
    fn dates() {
        let table = [
            (0, "Thu, 01 Jan 1970 00:00:00 GMT"),
            (784_111_777, "Sun, 06 Nov 1994 08:49:37 GMT"),
            (951_782_400, "Tue, 29 Feb 2000 00:00:00 GMT"),
            (1_798_761_599, "Thu, 31 Dec 2026 23:59:59 GMT"),
            (4_107_542_400, "Mon, 01 Mar 2100 00:00:00 GMT"),
            (253_402_300_799, "Fri, 31 Dec 9999 23:59:59 GMT"),
        ];
        for (secs, text) in table {
            assert_eq!(std::str::from_utf8(&encode_date(secs)).unwrap(), text, "{secs}");
        }
    }
}
