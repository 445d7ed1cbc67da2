//! Counters the connection loop bumps and the debug server shows, as Prometheus text and JSON.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::error::Phase;
use crate::h1::decode::DecodeError;

/// Upper bounds of the request-duration histogram buckets, in microseconds (Prometheus'
/// defaults plus 1 ms, so fast services do not all land in the first bucket). Integers: the
/// bucket is found on every request.
pub(crate) const BUCKETS: [u64; 12] =
    [1_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000];

/// Why a request was refused before reaching the handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reject {
    /// Malformed (400).
    BadRequest,
    /// Head too large or too many fields (431).
    HeadTooLarge,
    /// Not HTTP/1.0 or 1.1 (505).
    UnsupportedVersion,
    /// A transfer coding other than chunked (501).
    UnsupportedTransferCoding,
    /// An expectation other than 100-continue (417).
    UnsupportedExpectation,
}

impl Reject {
    /// All reasons, in display order.
    const ALL: [Reject; 5] = [
        Reject::BadRequest,
        Reject::HeadTooLarge,
        Reject::UnsupportedVersion,
        Reject::UnsupportedTransferCoding,
        Reject::UnsupportedExpectation,
    ];

    /// The label value.
    fn as_str(self) -> &'static str {
        match self {
            Reject::BadRequest => "bad_request",
            Reject::HeadTooLarge => "head_too_large",
            Reject::UnsupportedVersion => "unsupported_version",
            Reject::UnsupportedTransferCoding => "unsupported_transfer_coding",
            Reject::UnsupportedExpectation => "unsupported_expectation",
        }
    }
}

impl From<&DecodeError> for Reject {
    fn from(e: &DecodeError) -> Self {
        match e {
            DecodeError::Malformed(_) => Reject::BadRequest,
            DecodeError::HeadTooLarge | DecodeError::TooManyHeaders => Reject::HeadTooLarge,
            DecodeError::UnsupportedVersion => Reject::UnsupportedVersion,
            DecodeError::UnsupportedTransferCoding => Reject::UnsupportedTransferCoding,
            DecodeError::UnsupportedExpectation => Reject::UnsupportedExpectation,
        }
    }
}

/// One server's counters, in one shard per place its connections run (per thread of the
/// group's own): a connection bumps only its own shard, so threads never contend for a
/// counter; a scrape sums them.
#[derive(Debug)]
pub(crate) struct Metrics {
    /// When the server started, for uptime.
    started: Instant,
    /// The shards.
    shards: Box<[Shard]>,
}

/// One place's counters. All relaxed atomics: each is read on its own. Aligned to two cache
/// lines so that shards of different threads never share one.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct Shard {
    /// Connections accepted.
    connections_accepted: AtomicU64,
    /// Requests whose handler has started. Those in flight are these less those finished
    /// (counted in `duration_buckets`): one atomic add a request, not two.
    started: AtomicU64,
    /// Responses by status class, 1xx to 5xx.
    responses: [AtomicU64; 5],
    /// Request durations, per bucket (not cumulative); the last is +Inf.
    duration_buckets: [AtomicU64; BUCKETS.len() + 1],
    /// Sum of request durations in microseconds.
    duration_micros: AtomicU64,
    /// Timeouts by phase, in [`Phase::ALL`] order.
    timeouts: [AtomicU64; Phase::ALL.len()],
    /// Refused requests, in [`Reject::ALL`] order.
    rejected: [AtomicU64; 5],
    /// Handler panics.
    panics: AtomicU64,
    /// Connections handed to an upgraded protocol.
    upgraded: AtomicU64,
    /// Upgraded connections that have closed.
    upgraded_closed: AtomicU64,
}

impl Default for Metrics {
    /// One shard.
    fn default() -> Self {
        Metrics::new(1)
    }
}

impl Metrics {
    /// Counters with `shards` shards (at least one).
    pub(crate) fn new(shards: usize) -> Metrics {
        Metrics { started: Instant::now(), shards: (0..shards.max(1)).map(|_| Shard::default()).collect() }
    }

    /// The shard for place `i` (any `i`: it wraps).
    pub(crate) fn shard(&self, i: usize) -> &Shard {
        &self.shards[i % self.shards.len()]
    }

    /// A consistent-enough copy for rendering: the shards summed.
    pub(crate) fn snapshot(&self, open_connections: usize, shutting_down: bool) -> Snapshot {
        let load = |a: &AtomicU64| a.load(Relaxed);
        let sum = |field: fn(&Shard) -> &AtomicU64| self.shards.iter().map(|s| load(field(s))).sum::<u64>();
        let sums =
            |field: fn(&Shard, usize) -> &AtomicU64, i: usize| self.shards.iter().map(|s| load(field(s, i))).sum();
        Snapshot {
            uptime: self.started.elapsed(),
            connections_accepted: sum(|s| &s.connections_accepted),
            connections_open: open_connections as u64,
            // Started less finished, the finished read first: a request finishing while this
            // is read can be off by one either way, never below zero.
            in_flight: {
                let finished: u64 = self.shards.iter().flat_map(|s| &s.duration_buckets).map(load).sum();
                sum(|s| &s.started).saturating_sub(finished)
            },
            responses: std::array::from_fn(|i| sums(|s, i| &s.responses[i], i)),
            duration_buckets: std::array::from_fn(|i| sums(|s, i| &s.duration_buckets[i], i)),
            duration_micros: sum(|s| &s.duration_micros),
            timeouts: std::array::from_fn(|i| sums(|s, i| &s.timeouts[i], i)),
            rejected: std::array::from_fn(|i| sums(|s, i| &s.rejected[i], i)),
            panics: sum(|s| &s.panics),
            upgraded: sum(|s| &s.upgraded),
            upgraded_closed: sum(|s| &s.upgraded_closed),
            requests_by_place: self.shards.iter().map(|s| s.duration_buckets.iter().map(load).sum()).collect(),
            shutting_down,
        }
    }
}

impl Default for Shard {
    fn default() -> Self {
        Shard {
            connections_accepted: AtomicU64::new(0),
            started: AtomicU64::new(0),
            responses: Default::default(),
            duration_buckets: Default::default(),
            duration_micros: AtomicU64::new(0),
            timeouts: Default::default(),
            rejected: Default::default(),
            panics: AtomicU64::new(0),
            upgraded: AtomicU64::new(0),
            upgraded_closed: AtomicU64::new(0),
        }
    }
}

impl Shard {
    /// A connection was accepted.
    pub(crate) fn accepted(&self) {
        self.connections_accepted.fetch_add(1, Relaxed);
    }

    /// A request reached the handler.
    pub(crate) fn request_started(&self) {
        self.started.fetch_add(1, Relaxed);
    }

    /// A request's exchange ended after `elapsed`, with `status` sent (if any was).
    pub(crate) fn request_finished(&self, status: Option<u16>, elapsed: Duration) {
        if let Some(status) = status {
            self.response(status);
        }
        let micros = elapsed.as_micros() as u64;
        let bucket = BUCKETS.iter().position(|&le| micros <= le).unwrap_or(BUCKETS.len());
        self.duration_buckets[bucket].fetch_add(1, Relaxed);
        self.duration_micros.fetch_add(micros, Relaxed);
    }

    /// A response with `status` was sent outside a handler (an error the server answered).
    pub(crate) fn response(&self, status: u16) {
        if let Some(class) = (status as usize / 100).checked_sub(1).filter(|&c| c < 5) {
            self.responses[class].fetch_add(1, Relaxed);
        }
    }

    /// A timeout expired.
    pub(crate) fn timed_out(&self, phase: Phase) {
        let i = Phase::ALL.iter().position(|&p| p == phase).unwrap_or(0);
        self.timeouts[i].fetch_add(1, Relaxed);
    }

    /// A request was refused before its handler.
    pub(crate) fn rejected(&self, reason: Reject) {
        let i = Reject::ALL.iter().position(|&r| r == reason).unwrap_or(0);
        self.rejected[i].fetch_add(1, Relaxed);
    }

    /// A handler panicked.
    pub(crate) fn panicked(&self) {
        self.panics.fetch_add(1, Relaxed);
    }

    /// A connection switched to an upgraded protocol.
    pub(crate) fn upgraded(&self) {
        self.upgraded.fetch_add(1, Relaxed);
    }

    /// An upgraded connection closed.
    pub(crate) fn upgraded_closed(&self) {
        self.upgraded_closed.fetch_add(1, Relaxed);
    }
}

/// The counters at one moment.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    /// Time since the server started.
    uptime: Duration,
    /// See [`Metrics`].
    connections_accepted: u64,
    /// Connections open now.
    connections_open: u64,
    /// See [`Metrics`].
    in_flight: u64,
    /// See [`Metrics`].
    responses: [u64; 5],
    /// See [`Metrics`].
    duration_buckets: [u64; BUCKETS.len() + 1],
    /// See [`Metrics`].
    duration_micros: u64,
    /// See [`Metrics`].
    timeouts: [u64; Phase::ALL.len()],
    /// See [`Metrics`].
    rejected: [u64; 5],
    /// See [`Metrics`].
    panics: u64,
    /// See [`Metrics`].
    upgraded: u64,
    /// See [`Metrics`].
    upgraded_closed: u64,
    /// Requests finished per place (thread of the group's own), in place order.
    requests_by_place: Vec<u64>,
    /// Whether shutdown has started.
    shutting_down: bool,
}

impl Snapshot {
    /// The Prometheus text exposition format (version 0.0.4).
    pub(crate) fn prometheus(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
            let _ = writeln!(out, "# HELP servicegroup_{name} {help}\n# TYPE servicegroup_{name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "servicegroup_{name}{labels} {value}");
            }
        };
        let one = |v: u64| vec![(String::new(), v.to_string())];
        metric("connections_accepted_total", "counter", "Connections accepted.", &one(self.connections_accepted));
        metric("connections_open", "gauge", "Connections open now.", &one(self.connections_open));
        metric("requests_in_flight", "gauge", "Requests being handled now.", &one(self.in_flight));
        let classes: Vec<_> =
            (0..5).map(|i| (format!("{{class=\"{}xx\"}}", i + 1), self.responses[i].to_string())).collect();
        metric("responses_total", "counter", "Responses sent, by status class.", &classes);
        let mut cumulative = 0;
        let mut buckets: Vec<_> = BUCKETS
            .iter()
            .zip(self.duration_buckets)
            .map(|(le, n)| {
                cumulative += n;
                (format!("_bucket{{le=\"{}\"}}", *le as f64 / 1e6), cumulative.to_string())
            })
            .collect();
        let count = cumulative + self.duration_buckets[BUCKETS.len()];
        buckets.push(("_bucket{le=\"+Inf\"}".into(), count.to_string()));
        buckets.push(("_sum".into(), (self.duration_micros as f64 / 1e6).to_string()));
        buckets.push(("_count".into(), count.to_string()));
        metric(
            "request_duration_seconds",
            "histogram",
            "Time from a parsed request head to the end of its response.",
            &buckets,
        );
        let phases: Vec<_> = Phase::ALL
            .iter()
            .zip(self.timeouts)
            .map(|(p, n)| (format!("{{phase=\"{}\"}}", p.as_str()), n.to_string()))
            .collect();
        metric("timeouts_total", "counter", "Connection timeouts, by phase.", &phases);
        let reasons: Vec<_> = Reject::ALL
            .iter()
            .zip(self.rejected)
            .map(|(r, n)| (format!("{{reason=\"{}\"}}", r.as_str()), n.to_string()))
            .collect();
        metric("rejected_requests_total", "counter", "Requests refused before the handler, by reason.", &reasons);
        metric("handler_panics_total", "counter", "Handlers that panicked.", &one(self.panics));
        metric(
            "upgraded_connections_total",
            "counter",
            "Connections switched to another protocol (WebSocket, CONNECT tunnels).",
            &one(self.upgraded),
        );
        metric(
            "upgraded_connections_open",
            "gauge",
            "Upgraded connections open now (counted in connections_open too).",
            &one(self.upgraded.saturating_sub(self.upgraded_closed)),
        );
        let places: Vec<_> = self
            .requests_by_place
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("{{thread=\"{i}\"}}"), n.to_string()))
            .collect();
        metric(
            "thread_requests_total",
            "counter",
            "Requests finished, by the thread that served them (one series when the group runs on the caller's executor \
             or inside its own future).",
            &places,
        );
        metric("shutting_down", "gauge", "1 once graceful shutdown has started.", &one(u64::from(self.shutting_down)));
        metric(
            "uptime_seconds",
            "gauge",
            "Seconds since the server started.",
            &[(String::new(), self.uptime.as_secs_f64().to_string())],
        );
        metric(
            "build_info",
            "gauge",
            "The servicegroup crate version.",
            &[(format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")), "1".into())],
        );
        out
    }

    /// The same figures as a JSON object (Go's expvar `/debug/vars` shape: one flat object).
    pub(crate) fn json(&self) -> String {
        let mut out = String::with_capacity(1024);
        let _ = write!(
            out,
            "{{\"version\":\"{}\",\"uptime_seconds\":{},\"shutting_down\":{},\"connections_accepted\":{},\
             \"connections_open\":{},\"requests_in_flight\":{},\"handler_panics\":{},\"upgraded_connections\":{},\
             \"upgraded_connections_open\":{}",
            env!("CARGO_PKG_VERSION"),
            self.uptime.as_secs_f64(),
            self.shutting_down,
            self.connections_accepted,
            self.connections_open,
            self.in_flight,
            self.panics,
            self.upgraded,
            self.upgraded.saturating_sub(self.upgraded_closed)
        );
        let object = |out: &mut String, name: &str, pairs: &mut dyn Iterator<Item = (String, u64)>| {
            let _ = write!(out, ",\"{name}\":{{");
            for (i, (k, v)) in pairs.enumerate() {
                let _ = write!(out, "{}\"{k}\":{v}", if i == 0 { "" } else { "," });
            }
            out.push('}');
        };
        object(&mut out, "responses", &mut (0..5).map(|i| (format!("{}xx", i + 1), self.responses[i])));
        object(&mut out, "timeouts", &mut Phase::ALL.iter().zip(self.timeouts).map(|(p, n)| (p.as_str().into(), n)));
        object(&mut out, "rejected", &mut Reject::ALL.iter().zip(self.rejected).map(|(r, n)| (r.as_str().into(), n)));
        let threads: Vec<String> = self.requests_by_place.iter().map(u64::to_string).collect();
        let _ = write!(out, ",\"thread_requests\":[{}]", threads.join(","));
        let count: u64 = self.duration_buckets.iter().sum();
        let _ = write!(
            out,
            ",\"request_duration_seconds\":{{\"count\":{count},\"sum\":{}}}}}",
            self.duration_micros as f64 / 1e6
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_in_both_formats() {
        let metrics = Metrics::new(2);
        let m = metrics.shard(0);
        m.accepted();
        m.request_started();
        m.request_finished(Some(200), Duration::from_micros(300));
        m.request_started();
        m.request_finished(Some(503), Duration::from_secs(20));
        m.timed_out(Phase::Write);
        m.rejected(Reject::HeadTooLarge);
        m.response(431);
        metrics.shard(1).request_started();
        metrics.shard(1).request_finished(Some(200), Duration::from_micros(10));
        m.upgraded();
        m.upgraded();
        metrics.shard(1).upgraded_closed();
        // In flight: started on one shard, not finished yet.
        metrics.shard(1).request_started();
        assert_eq!(metrics.snapshot(1, false).in_flight, 1);
        metrics.shard(1).request_finished(None, Duration::from_micros(5));
        let s = metrics.snapshot(1, true);
        let text = s.prometheus();
        for line in [
            "servicegroup_connections_accepted_total 1",
            "servicegroup_connections_open 1",
            "servicegroup_requests_in_flight 0",
            "servicegroup_responses_total{class=\"2xx\"} 2",
            "servicegroup_responses_total{class=\"4xx\"} 1",
            "servicegroup_responses_total{class=\"5xx\"} 1",
            "servicegroup_request_duration_seconds_bucket{le=\"0.001\"} 3",
            "servicegroup_request_duration_seconds_bucket{le=\"10\"} 3",
            "servicegroup_request_duration_seconds_bucket{le=\"+Inf\"} 4",
            "servicegroup_request_duration_seconds_count 4",
            "servicegroup_thread_requests_total{thread=\"0\"} 2",
            "servicegroup_thread_requests_total{thread=\"1\"} 2",
            "servicegroup_timeouts_total{phase=\"write\"} 1",
            "servicegroup_rejected_requests_total{reason=\"head_too_large\"} 1",
            "servicegroup_shutting_down 1",
            "servicegroup_upgraded_connections_total 2",
            "servicegroup_upgraded_connections_open 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        let json = s.json();
        assert!(json.starts_with('{') && json.ends_with('}'), "{json}");
        for part in [
            "\"timeouts\":{\"header_read\":0,\"write\":1,\"idle\":0,\"upgraded\":0}",
            "\"2xx\":2",
            "\"count\":4",
            "\"upgraded_connections\":2,\"upgraded_connections_open\":1",
        ] {
            assert!(json.contains(part), "missing {part} in {json}");
        }
    }
}
