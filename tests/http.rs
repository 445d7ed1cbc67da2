//! HTTP/1.1 behaviour over real loopback sockets: raw bytes in, responses checked byte-exactly.

#[macro_use]
mod common;

use std::io::{self, Read, Write};
use std::net::Shutdown as SocketShutdown;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{app, app_server, config, exchange, get, is_closed, read_to_close, Client, Server};

in_every_runtime! {
    fn get_is_answered_with_length_date_and_body() -> io::Result<()> {
        let (handler, _) = app();
        let server = Server::start(handler, config());
        let text = exchange(server.addr, b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\ndate: "), "{text}");
        let date = text.lines().find_map(|l| l.strip_prefix("date: ")).unwrap();
        assert_eq!(date.len(), 29, "IMF-fixdate: {date}");
        assert!(date.ends_with(" GMT"), "{date}");
        assert!(text.contains("\r\ncontent-length: 5\r\n"), "{text}");
        assert!(text.contains("\r\nconnection: close\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nhello"), "{text}");
        Ok(())
    }
}

in_every_runtime! {
    fn keep_alive_connection_serves_many_requests() -> io::Result<()> {
        let (handler, calls) = app();
        let server = Server::start(handler, config());
        let mut client = Client::new(server.addr);
        for _ in 0..5 {
            let response = client.request(&get("/"));
            assert_eq!((response.status, response.text().as_str()), (200, "hello"));
            assert_eq!(response.header("connection"), None);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        Ok(())
    }
}

in_every_runtime! {
    fn pipelined_requests_are_answered_in_order() -> io::Result<()> {
        let (handler, _) = app();
        let server = Server::start(handler, config());
        let mut client = Client::new(server.addr);
        let mut batch = Vec::new();
        for path in ["/sleep?ms=80", "/", "/sleep?ms=5", "/len", "/"] {
            batch.extend(get(path));
        }
        client.send(&batch);
        let bodies: Vec<String> = (0..5).map(|_| client.response().text()).collect();
        assert_eq!(bodies, ["slept 80", "hello", "slept 5", "0", "hello"]);
        Ok(())
    }
}

in_every_runtime! {
    fn http10_is_closed_unless_it_asks_for_keep_alive() -> io::Result<()> {
        let (handler, _) = app();
        let server = Server::start(handler, config());
        let text = exchange(server.addr, b"GET / HTTP/1.0\r\n\r\n");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("hello"), "{text}");
        assert!(text.contains("connection: close\r\n"), "{text}");

        let mut client = Client::new(server.addr);
        for _ in 0..2 {
            let response = client.request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
            assert_eq!(response.header("connection"), Some("keep-alive"));
            assert_eq!(response.text(), "hello");
        }
        Ok(())
    }
}

in_every_runtime! {
    fn connection_close_is_honoured_from_either_side() -> io::Result<()> {
        let (handler, _) = app();
        let server = Server::start(handler, config());
        let mut client = Client::new(server.addr);
        let response = client.request(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        assert_eq!(response.header("connection"), Some("close"));
        assert!(client.is_closed());

        let mut client = Client::new(server.addr);
        let response = client.request(&get("/close"));
        assert_eq!((response.header("connection"), response.text().as_str()), (Some("close"), "bye"));
        assert_eq!(response.count("connection"), 1);
        assert!(client.is_closed());
        Ok(())
    }
}

in_every_runtime! {
    fn request_bodies_are_read_by_length_and_chunked() -> io::Result<()> {
        let (handler, _) = app();
        let server = Server::start(handler, config());
        let mut client = Client::new(server.addr);
        let response = client.request(b"POST /len HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!(response.text(), "5");
        // Extensions and trailers are accepted and skipped.
        let chunked = b"POST /len HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n";
        assert_eq!(client.request(chunked).text(), "11");
        // The connection is still in step: the next request is parsed where the body ended.
        assert_eq!(client.request(&get("/")).text(), "hello");
        // A body of many tiny chunks.
        let mut many = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for i in 0..200 {
            many.extend(format!("1\r\n{}\r\n", i % 10).bytes());
        }
        many.extend(b"0\r\n\r\n");
        let expected: String = (0..200).map(|i| char::from(b'0' + (i % 10) as u8)).collect();
        let response = client.request(&many);
        assert_eq!(response.header("transfer-encoding"), Some("chunked"));
        assert_eq!(response.text(), expected);
        Ok(())
    }
}

in_every_runtime! {
    fn streamed_responses_are_chunked_for_http11_and_close_delimited_for_http10() -> io::Result<()> {
        let (handler, _) = app();
        let server = Server::start(handler, config());
        let mut client = Client::new(server.addr);
        for path in ["/stream", "/reader"] {
            let response = client.request(&get(path));
            assert_eq!(response.header("transfer-encoding"), Some("chunked"), "{path}");
            assert_eq!(response.header("content-length"), None);
        }
        let response = client.request(&get("/stream"));
        assert_eq!(response.text(), "first,second,third");
        let response = client.request(&get("/sized-reader"));
        assert_eq!((response.header("content-length"), response.text().as_str()), (Some("5"), "sized"));

        let text = exchange(server.addr, b"GET /stream HTTP/1.0\r\n\r\n");
        assert!(!text.contains("transfer-encoding") && !text.contains("content-length"), "{text}");
        assert!(text.contains("connection: close\r\n") && text.ends_with("\r\n\r\nfirst,second,third"), "{text}");
        Ok(())
    }
}

in_every_runtime! {
    fn large_bodies_arrive_intact() -> io::Result<()> {
        let (handler, _) = app();
        let server = Server::start(handler, config());
        let mut client = Client::new(server.addr);
        for path in ["/big?bytes=3000000", "/big-stream?bytes=3000000", "/big?bytes=20000"] {
            let response = client.request(&get(path));
            let n: usize = path.rsplit('=').next().unwrap().parse().unwrap();
            assert_eq!(response.body.len(), n, "{path}");
            assert!(response.body.iter().all(|&b| b == response.body[0]), "{path}");
        }
        // A 3 MB upload streamed back.
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut request = format!("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        request.extend(&body);
        let writer = {
            let mut stream = client.stream.try_clone()?;
            std::thread::spawn(move || stream.write_all(&request))
        };
        let response = client.response();
        writer.join().unwrap()?;
        assert_eq!(response.header("content-length"), Some("3000000"));
        assert!(response.body == body, "echoed body differs");
        Ok(())
    }
}

in_every_runtime! {
    fn head_gets_the_get_headers_and_no_body() -> io::Result<()> {
        let (handler, _) = app();
        let server = Server::start(handler, config());
        let mut client = Client::new(server.addr);
        client.send(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n");
        let response = client.head_response();
        assert_eq!((response.status, response.header("content-length")), (200, Some("5")));
        client.send(b"HEAD /stream HTTP/1.1\r\nHost: t\r\n\r\n");
        let response = client.head_response();
        assert_eq!(response.header("content-length"), None);
        assert_eq!(response.header("transfer-encoding"), None);
        // Had a body been sent, this response would not parse.
        assert_eq!(client.request(&get("/")).text(), "hello");
        Ok(())
    }
}

in_every_runtime! {
    fn no_content_and_not_modified_have_no_body() -> io::Result<()> {
        let (handler, _) = app();
        let server = Server::start(handler, config());
        let mut client = Client::new(server.addr);
        let response = client.request(&get("/nocontent"));
        assert_eq!(response.status, 204);
        assert_eq!((response.header("content-length"), response.header("transfer-encoding")), (None, None));
        let response = client.request(&get("/notmodified"));
        assert_eq!((response.status, response.header("content-length")), (304, Some("42")));
        assert_eq!(client.request(&get("/")).text(), "hello");
        Ok(())
    }
}

in_every_runtime! {
    fn expect_100_continue_is_answered_only_when_the_handler_reads() -> io::Result<()> {
        let (handler, _) = app();
        let server = Server::start(handler, config());

        // The handler reads: 100 first, then the final response.
        let mut client = Client::new(server.addr);
        client.send(b"POST /len HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n");
        let interim = client.response();
        assert_eq!(interim.head, "HTTP/1.1 100 Continue\r\n\r\n");
        client.send(b"hello");
        assert_eq!(client.response().text(), "5");

        // The handler does not read: no 100, and the connection closes after the answer.
        let mut client = Client::new(server.addr);
        client.send(b"POST /ignore HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n");
        let response = client.response();
        assert_eq!((response.status, response.header("connection")), (200, Some("close")));
        assert!(client.is_closed());

        // Streaming the body back asks for it before the head.
        let mut client = Client::new(server.addr);
        client.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(client.response().status, 100);
        client.send(b"abc");
        let response = client.response();
        assert_eq!((response.status, response.text().as_str()), (200, "abc"));

        // Any other expectation.
        let text = exchange(server.addr, b"POST /len HTTP/1.1\r\nHost: t\r\nExpect: teapot\r\nContent-Length: 1\r\n\r\nx");
        assert!(text.starts_with("HTTP/1.1 417 Expectation Failed\r\n"), "{text}");
        Ok(())
    }
}

in_every_runtime! {
    fn bad_requests_get_the_right_status_and_a_closed_connection() -> io::Result<()> {
        let (handler, calls) = app();
        let mut cfg = config();
        cfg.max_header_bytes = 4096;
        cfg.max_headers = 20;
        let server = Server::start(handler, cfg);
        let many_fields: String = (0..21).map(|i| format!("X-{i}: v\r\n")).collect();
        let big_field = format!("X: {}\r\n", "a".repeat(5000));
        let table: Vec<(u16, Vec<u8>)> = vec![
            (400, b"GET / HTTP/1.1\r\nHost : t\r\n\r\n".to_vec()),
            (400, b"GET / HTTP/1.1\r\nHost: t\rX: y\r\n\r\n".to_vec()),
            (400, b"GET / HTTP/1.1\r\nHost: t\r\nX: a\r\n folded\r\n\r\n".to_vec()),
            (
                400,
                b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            ),
            (400, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".to_vec()),
            (400, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3x\r\n\r\nabc".to_vec()),
            (400, b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nabc".to_vec()),
            (400, b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, identity\r\n\r\n".to_vec()),
            (501, b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".to_vec()),
            (400, b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec()),
            (400, b"GET / HTTP/1.1\r\n\r\n".to_vec()),
            (400, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec()),
            (400, b"NOT HTTP AT ALL\r\n\r\n".to_vec()),
            (400, b"GET /\x01 HTTP/1.1\r\nHost: t\r\n\r\n".to_vec()),
            (505, b"GET / HTTP/2.0\r\nHost: t\r\n\r\n".to_vec()),
            (505, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()),
            (431, format!("GET / HTTP/1.1\r\nHost: t\r\n{many_fields}\r\n").into_bytes()),
            (431, format!("GET / HTTP/1.1\r\nHost: t\r\n{big_field}\r\n").into_bytes()),
            (431, format!("GET / HTTP/1.1\r\nHost: t\r\n{big_field}").into_bytes()),
            (417, b"GET / HTTP/1.1\r\nHost: t\r\nExpect: something\r\n\r\n".to_vec()),
        ];
        for (status, request) in table {
            let text = exchange(server.addr, &request);
            let shown = String::from_utf8_lossy(&request);
            assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{shown:?} got {text:?}");
            assert!(text.contains("\r\nconnection: close\r\n"), "{shown:?} got {text:?}");
            let responses = text.lines().filter(|l| l.starts_with("HTTP/1.1 ")).count();
            assert_eq!(responses, 1, "one response only for {shown:?}: {text:?}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0, "no bad request reached the handler");
        // The server keeps serving everyone else.
        assert!(exchange(server.addr, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").ends_with("hello"));
        Ok(())
    }
}

in_every_runtime! {
    fn smuggled_requests_are_never_served() -> io::Result<()> {
        let (handler, calls) = app();
        let server = Server::start(handler, config());
        let attacks: [&[u8]; 4] = [
            // CL.TE: a front end using Content-Length would forward the smuggled GET as body.
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 35\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /count HTTP/1.1\r\nHost: t\r\n\r\n",
            // TE.CL, with an obfuscated coding.
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\nContent-Length: 4\r\n\r\n5c\r\nGET /count HTTP/1.1\r\nHost: t\r\n\r\n0\r\n\r\n",
            // A chunk size line ended by a bare LF.
            b"POST /len HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\nGET /count HTTP/1.1\r\nHost: t\r\n\r\n",
            // Chunk data longer than its size.
            b"POST /len HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcGET /count HTTP/1.1\r\nHost: t\r\n\r\n\r\n0\r\n\r\n",
        ];
        for attack in attacks {
            let text = exchange(server.addr, attack);
            assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
            assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
            assert!(!text.contains("counted"), "{text}");
        }
        // Only the two /len requests reached a handler, which saw the broken framing.
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        Ok(())
    }
}

in_every_runtime! {
    fn whole_body_reads_over_the_limit_get_413() -> io::Result<()> {
        let server = app_server(|cfg| cfg.max_body_bytes = 1000);
        let mut client = Client::new(server.addr);
        let body = vec![b'a'; 1000];
        let mut request = b"POST /len HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n".to_vec();
        request.extend(&body);
        assert_eq!(client.request(&request).text(), "1000");
        // Refused by its Content-Length before a byte is read.
        let mut request = b"POST /len HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\n\r\n".to_vec();
        request.extend(vec![b'a'; 1001]);
        let response = client.request(&request);
        assert_eq!(response.status, 413);
        assert!(response.text().contains("1000-byte limit"), "{}", response.text());
        // Chunked: found out while reading.
        let mut client = Client::new(server.addr);
        let request = format!(
            "POST /len HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n{}\r\n1\r\nb\r\n0\r\n\r\n",
            "a".repeat(1000)
        );
        assert_eq!(client.request(request.as_bytes()).status, 413);
        Ok(())
    }
}

in_every_runtime! {
    fn unread_bodies_are_drained_up_to_256k_then_the_connection_closes() -> io::Result<()> {
        let (handler, _) = app();
        let server = Server::start(handler, config());

        let mut client = Client::new(server.addr);
        let mut request = b"POST /ignore HTTP/1.1\r\nHost: t\r\nContent-Length: 200000\r\n\r\n".to_vec();
        request.extend(vec![b'z'; 200_000]);
        let response = client.request(&request);
        assert_eq!((response.text().as_str(), response.header("connection")), ("ignored", None));
        assert_eq!(client.request(&get("/")).text(), "hello", "connection reused after the drain");

        // Known to be too long: the response says close.
        let mut client = Client::new(server.addr);
        client.send(b"POST /ignore HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n");
        let response = client.response();
        assert_eq!(response.header("connection"), Some("close"));
        assert!(client.is_closed());

        // Chunked and too long: found out while draining.
        let mut client = Client::new(server.addr);
        let mut request = b"POST /ignore HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..40 {
            request.extend(format!("2000\r\n{}\r\n", "c".repeat(0x2000)).bytes());
        }
        let writer = {
            let mut stream = client.stream.try_clone()?;
            std::thread::spawn(move || {
                let _ = stream.write_all(&request);
            })
        };
        let response = client.response();
        assert_eq!(response.text(), "ignored");
        assert!(client.is_closed());
        writer.join().unwrap();
        Ok(())
    }
}

in_every_runtime! {
    fn a_half_closed_client_still_gets_its_response() -> io::Result<()> {
        let (handler, _) = app();
        let server = Server::start(handler, config());
        let mut stream = common::connect(server.addr);
        stream.write_all(b"GET /sleep?ms=20 HTTP/1.1\r\nHost: t\r\n\r\n")?;
        stream.shutdown(SocketShutdown::Write)?;
        let text = read_to_close(&mut stream);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("slept 20"), "{text}");
        Ok(())
    }
}

in_every_runtime! {
    fn a_body_read_on_another_thread_waits_there_for_its_bytes() -> io::Result<()> {
        let (handler, _) = app();
        let server = Server::start(handler, config());
        let mut client = Client::new(server.addr);
        client.send(b"POST /len-elsewhere HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhello");
        // The reader on the other thread has taken these five bytes and waits for more.
        std::thread::sleep(Duration::from_millis(50));
        client.send(b"world");
        let response = client.response();
        assert_eq!((response.status, response.text()), (200, "10".to_string()));
        // The connection goes on serving on its own thread.
        assert_eq!(client.request(&get("/")).text(), "hello");
        Ok(())
    }
}

in_every_runtime! {
    fn a_panicking_handler_gets_its_client_a_500_and_others_are_served() -> io::Result<()> {
        let (handler, _) = app();
        let server = Server::start(handler, config());
        let mut healthy = Client::new(server.addr);
        assert_eq!(healthy.request(&get("/")).status, 200);
        for _ in 0..3 {
            let text = exchange(server.addr, &get("/panic"));
            assert!(text.starts_with("HTTP/1.1 500 Internal Server Error\r\n"), "{text}");
            assert!(text.contains("connection: close\r\n"), "{text}");
        }
        assert_eq!(healthy.request(&get("/")).text(), "hello");
        assert_eq!(Client::new(server.addr).request(&get("/")).text(), "hello");
        Ok(())
    }
}

in_every_runtime! {
    fn max_connections_leaves_excess_connections_in_the_backlog() -> io::Result<()> {
        let server = app_server(|cfg| cfg.max_connections = Some(1));
        let mut first = Client::new(server.addr);
        assert_eq!(first.request(&get("/")).text(), "hello");
        // The second connection completes its TCP handshake in the backlog, but is not accepted.
        let mut second = Client::new(server.addr);
        second.send(&get("/"));
        second.stream.set_read_timeout(Some(Duration::from_millis(300)))?;
        let mut byte = [0u8; 1];
        let waited = second.stream.read(&mut byte);
        assert!(
            matches!(&waited, Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)),
            "the second connection was served while the first was open: {waited:?}"
        );
        second.stream.set_read_timeout(Some(common::PATIENCE))?;
        drop(first);
        assert_eq!(second.response().text(), "hello");
        Ok(())
    }
}

in_every_runtime! {
    fn binding_a_busy_address_names_it() -> io::Result<()> {
        let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
        let mut cfg = config();
        cfg.addr = taken.local_addr()?.into();
        let (handler, _) = app();
        let err = servicegroup::Group::new(handler, cfg).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&taken.local_addr()?.to_string()) && text.contains("SERVICEGROUP_ADDR"), "{text}");
        Ok(())
    }
}

in_every_runtime! {
    fn a_stale_body_handle_cannot_read_the_next_request() -> io::Result<()> {
        use servicegroup::http::{Request, Response};
        use servicegroup::Body;
        use std::sync::{Arc, Mutex};
        // The handler hides the body away; a later read of it must fail, not steal bytes.
        let stash: Arc<Mutex<Option<Body>>> = Arc::default();
        let kept = stash.clone();
        let handler = move |req: Request<Body>| {
            let kept = kept.clone();
            async move {
                if req.uri().path() == "/keep" {
                    *kept.lock().unwrap() = Some(req.into_body());
                    return Response::new(Body::from("kept"));
                }
                let mut stale = kept.lock().unwrap().take().expect("kept body");
                let read = stale.bytes().await;
                Response::new(Body::from(format!("{}", read.is_err())))
            }
        };
        let server = Server::start(handler, config());
        let mut client = Client::new(server.addr);
        assert_eq!(client.request(b"POST /keep HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc").text(), "kept");
        let response = client.request(b"POST /read HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nxyz");
        assert_eq!(response.text(), "true");
        Ok(())
    }
}

in_every_runtime! {
    fn the_connection_is_closed_after_a_response_body_shorter_than_declared() -> io::Result<()> {
        use servicegroup::http::{Request, Response};
        use servicegroup::Body;
        let handler = |_req: Request<Body>| async { Response::new(Body::from_reader(&b"short"[..], Some(10))) };
        let server = Server::start(handler, config());
        let mut stream = common::connect(server.addr);
        stream.write_all(&get("/"))?;
        let text = read_to_close(&mut stream);
        assert!(text.contains("content-length: 10\r\n") && text.ends_with("short"), "{text}");
        assert!(is_closed(&mut stream));
        Ok(())
    }
}

/// A handler whose response body is not ready when first asked (it wakes itself at once), then
/// fails, or fails when first asked (`at_once`).
fn failing_body_server(at_once: bool) -> Server {
    use servicegroup::http::{Request, Response};
    use servicegroup::Body;
    let handler = move |req: Request<Body>| async move {
        if req.uri().path() != "/fails" {
            return Response::new(Body::from("hello"));
        }
        let mut waited = at_once;
        let source = futures_lite::stream::poll_fn(move |cx| {
            if !std::mem::replace(&mut waited, true) {
                cx.waker().wake_by_ref();
                return std::task::Poll::Pending;
            }
            std::task::Poll::Ready(Some(Err(io::Error::other("the body's source failed"))))
        });
        Response::new(Body::from_stream(source))
    };
    Server::start(handler, config())
}

in_every_runtime! {
    fn a_response_body_that_fails_before_its_first_bytes_gets_500_and_a_close() -> io::Result<()> {
        let server = failing_body_server(true);
        let mut stream = common::connect(server.addr);
        stream.write_all(&get("/fails"))?;
        let text = read_to_close(&mut stream);
        assert!(text.starts_with("HTTP/1.1 500 "), "{text}");
        assert!(text.contains("connection: close\r\n"), "{text}");
        Ok(())
    }
}

in_every_runtime! {
    fn a_response_body_that_fails_after_its_head_is_cut_short_after_the_pipelined_responses_before_it(
    ) -> io::Result<()> {
        let server = failing_body_server(false);
        let mut stream = common::connect(server.addr);
        // In one write: the first response waits in the output buffer while the second is
        // framed (its head goes in after it) and then fails.
        let mut batch = get("/");
        batch.extend(get("/fails"));
        stream.write_all(&batch)?;
        let text = read_to_close(&mut stream);
        let (first, second) = text.split_at(text.find("hello").map_or(0, |i| i + "hello".len()));
        assert!(first.starts_with("HTTP/1.1 200 OK\r\n") && first.contains("content-length: 5\r\n"), "{text:?}");
        // The second is cut short: its head says chunked, and no last chunk follows.
        assert!(second.starts_with("HTTP/1.1 200 OK\r\n"), "{text:?}");
        assert!(second.contains("transfer-encoding: chunked\r\n") && second.ends_with("\r\n\r\n"), "{text:?}");
        assert!(!second.contains("0\r\n\r\n"), "{text:?}");
        Ok(())
    }
}
