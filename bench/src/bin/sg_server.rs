//! servicegroup answering every request with `hello`, with its default timeouts on
//! (`TIMEOUTS=off` switches all three off, to measure what they cost).
//!
//! Environment: `PORT` (default 3000), `THREADS` (default 2), `TIMEOUTS`.

use servicegroup::http::{Request, Response};
use servicegroup::{Body, Config, Group};

fn main() {
    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(3000);
    let mut config = Config::default();
    config.addr = ([127, 0, 0, 1], port).into();
    config.debug_addr = None;
    config.threads = std::env::var("THREADS").ok().and_then(|p| p.parse().ok()).unwrap_or(2);
    if std::env::var("TIMEOUTS").as_deref() == Ok("off") {
        config.header_read_timeout = None;
        config.write_timeout = None;
        config.idle_timeout = None;
    }
    config.shutdown_timeout = std::time::Duration::from_secs(1);
    let group = Group::new(|_req: Request<Body>| async { Response::new(Body::from("hello")) }, config).unwrap();
    eprintln!("sg_server listening on {}", group.addr());
    let _ = smol::block_on(group.run());
}
