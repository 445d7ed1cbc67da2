//! The timer behind every connection deadline: one sweeper per group instead of one reactor
//! timer per connection.
//!
//! async-io keeps its timers in a map it locks, splits and re-allocates on every reactor wake
//! (about 700 instructions a wake with even one timer registered), and registering a timer
//! wakes the reactor; a timer per connection cost 5% of a keep-alive request. Here a deadline
//! is a number of milliseconds in the connection's [`Deadline`] slot: starting a phase is an
//! atomic store. The sweeper sleeps until the earliest deadline, at least [`GRANULARITY`]
//! apart, marks the expired slots and wakes their connections; a deadline earlier than the
//! sweeper's plan pokes it. Deadlines fire on time or up to [`GRANULARITY`] late, never
//! early. When the group has threads of its own the sweeper is one more (parked between
//! sweeps: no async-io timer at all); otherwise it is a future ([`Clock::sweep`]) that
//! sleeps on one async-io timer, driven by whatever drives the group.

use std::future::Future;
use std::io;
use std::ops::Add;
use std::pin::Pin;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

use async_io::Timer;
use event_listener::Event;
use futures_lite::future::poll_fn;
use futures_lite::FutureExt;
use slab::Slab;

use crate::listen::Peer;

/// The least time between two sweeps: deadlines fire up to this late. It bounds the sweeper's
/// work when many connections have deadlines close together.
pub(crate) const GRANULARITY: Duration = Duration::from_millis(5);

/// A slot's deadline when none is set.
const NONE: u64 = u64::MAX;

/// A slot's deadline once the sweeper found it passed.
const EXPIRED: u64 = 0;

/// Nanoseconds in a millisecond.
const NANOS_PER_MILLI: u64 = 1_000_000;

/// A reading of the monotonic clock: nanoseconds since the process first read it. Whole
/// numbers, so a phase change (a deadline, the connections view's activity) costs an addition
/// and a division by a constant instead of `Instant` arithmetic (seven `Instant` subtractions
/// a request were 7% of a pipelined one); one `Tick::now` a wake-up is the only clock read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Tick(u64);

/// The instant ticks count from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Tick {
    /// The time now.
    pub(crate) fn now() -> Tick {
        let epoch = epoch();
        Tick::since_epoch(Instant::now().saturating_duration_since(epoch))
    }

    /// A tick `since` the epoch.
    fn since_epoch(since: Duration) -> Tick {
        Tick(nanos_in(since))
    }

    /// `self + timeout`, or none without a timeout.
    pub(crate) fn after(self, timeout: Option<Duration>) -> Option<Tick> {
        timeout.map(|t| self + t)
    }

    /// The time from `earlier` to this tick (zero if `earlier` is later).
    pub(crate) fn since(self, earlier: Tick) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// The time from this tick to now.
    pub(crate) fn elapsed(self) -> Duration {
        Tick::now().since(self)
    }

    /// Nanoseconds since the epoch, for an atomic.
    pub(crate) fn nanos(self) -> u64 {
        self.0
    }

    /// The tick `nanos` after the epoch (what [`Tick::nanos`] gave).
    pub(crate) const fn from_nanos(nanos: u64) -> Tick {
        Tick(nanos)
    }

    /// The instant of this tick.
    fn instant(self) -> Instant {
        epoch() + Duration::from_nanos(self.0)
    }
}

impl Add<Duration> for Tick {
    type Output = Tick;

    /// Saturates (a timeout of centuries is no timeout).
    fn add(self, d: Duration) -> Tick {
        Tick(self.0.saturating_add(nanos_in(d)))
    }
}

/// The nanoseconds in `d`, saturating at `u64::MAX` (584 years).
fn nanos_in(d: Duration) -> u64 {
    d.as_secs().saturating_mul(1_000_000_000).saturating_add(u64::from(d.subsec_nanos()))
}

/// A server's deadlines and their sweeper.
#[derive(Clone, Default)]
pub(crate) struct Clock(Arc<Inner>);

/// The shared state of a [`Clock`].
///
/// Deadlines are whole milliseconds of [`Tick`]s plus one, rounded up (0 is `EXPIRED`).
struct Inner {
    /// Every live deadline slot, for the sweeper to look at.
    slots: Mutex<Slab<Arc<Slot>>>,
    /// The millisecond the sweeper will next look; `NONE` while it is looking.
    next_sweep: AtomicU64,
    /// Set when a deadline earlier than `next_sweep` appeared.
    poked: AtomicBool,
    /// The sweeper thread, to unpark.
    sweeper: OnceLock<Thread>,
    /// Wakes the sweeper future.
    woken: Event,
    /// Tells the sweeper to exit.
    stopped: AtomicBool,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            slots: Mutex::default(),
            next_sweep: AtomicU64::new(NONE),
            poked: AtomicBool::new(false),
            sweeper: OnceLock::new(),
            woken: Event::new(),
            stopped: AtomicBool::new(false),
        }
    }
}

/// One connection's deadline, shared with the sweeper, and what `/debug/connections` shows
/// of it: the slot is the one per-connection record the server already keeps, so the view
/// costs a store per phase change, not a lock or a list of its own.
struct Slot {
    /// Milliseconds after the epoch, `NONE`, or `EXPIRED`.
    deadline: AtomicU64,
    /// The connection waiting on it.
    waker: Mutex<Option<Waker>>,
    /// Whether the connections view lists it (the service's are; the debug server's not).
    listed: bool,
    /// The client's address.
    peer: Option<Peer>,
    /// When the connection was accepted.
    opened: Tick,
    /// The [`Activity`] (top byte) and when it started, in milliseconds after `opened`.
    activity: AtomicU64,
    /// Requests that reached the handler on this connection. Written by its one task.
    requests: AtomicU32,
    /// Method and target of the exchange in flight, set only once its handler has to wait
    /// (a request answered in one poll is never seen, so never recorded). A thin box: every
    /// idle connection carries this field.
    #[allow(clippy::box_collection)] // thin on purpose: 8 bytes, not 24, per idle connection
    current: Mutex<Option<Box<String>>>,
}

/// What a connection is doing, as `/debug/connections` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activity {
    /// Waiting for a request.
    Idle,
    /// Reading a request head.
    ReadingHead,
    /// Reading the body and running the handler.
    InHandler,
    /// Writing the response.
    Writing,
    /// Finishing: the last response is out and the connection closes.
    Closing,
    /// Switched to another protocol (see [`crate::upgrade`]).
    Upgraded,
}

impl Activity {
    /// Every activity, in display order.
    pub(crate) const ALL: [Activity; 6] = [
        Activity::Idle,
        Activity::ReadingHead,
        Activity::InHandler,
        Activity::Writing,
        Activity::Closing,
        Activity::Upgraded,
    ];

    /// The name shown.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Activity::Idle => "idle",
            Activity::ReadingHead => "reading head",
            Activity::InHandler => "in handler",
            Activity::Writing => "writing",
            Activity::Closing => "closing",
            Activity::Upgraded => "upgraded",
        }
    }
}

/// One row of the connections view.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    /// The client's address.
    pub(crate) peer: Option<Peer>,
    /// What it is doing.
    pub(crate) activity: Activity,
    /// Age of the connection.
    pub(crate) age: Duration,
    /// Time in the current activity.
    pub(crate) in_activity: Duration,
    /// Requests served on it.
    pub(crate) requests: u64,
    /// Method and target of the exchange in flight, if its handler is waiting.
    pub(crate) current: Option<String>,
}

/// The connections view: the first rows, and totals per activity over every connection.
#[derive(Debug, Clone, Default)]
pub(crate) struct Listing {
    /// At most the limit asked for.
    pub(crate) rows: Vec<Row>,
    /// Connections per activity, in [`Activity::ALL`] order.
    pub(crate) totals: [usize; Activity::ALL.len()],
}

/// A connection's handle on its slot, for what the connections view shows.
#[derive(Clone)]
pub(crate) struct Tracker(Arc<Slot>);

impl Tracker {
    /// The connection starts `activity` at `at`.
    pub(crate) fn enter(&self, activity: Activity, at: Tick) {
        let since = (at.0.saturating_sub(self.0.opened.0) / NANOS_PER_MILLI).min(u64::MAX >> 8);
        // Relaxed: only the connections view reads it, as a snapshot (a plain store on x86,
        // where SeqCst is an `xchg`; this runs three times a request).
        self.0.activity.store((activity as u64) << 56 | since, Relaxed);
    }

    /// Another request reached the handler.
    pub(crate) fn count_request(&self) {
        let slot = &self.0;
        slot.requests.store(slot.requests.load(Relaxed).wrapping_add(1), Relaxed);
    }

    /// The client's address.
    pub(crate) fn peer(&self) -> Option<Peer> {
        self.0.peer.clone()
    }

    /// The client's address as logs name it.
    pub(crate) fn peer_name(&self) -> String {
        self.0.peer.as_ref().map_or_else(|| "unknown peer".into(), |a| a.to_string())
    }

    /// Shows (or with `None` clears) the exchange in flight.
    pub(crate) fn show(&self, current: Option<String>) {
        *lock(&self.0.current) = current.map(Box::new);
    }
}

/// Locks a mutex; a poisoned one (a panic elsewhere) still holds consistent data here.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Clock {
    /// A new deadline slot for a connection from `peer`, registered with the sweeper (and
    /// shown in the connections view if `listed`) until dropped.
    pub(crate) fn deadline(&self, peer: Option<Peer>, listed: bool) -> Deadline {
        let slot = Arc::new(Slot {
            deadline: AtomicU64::new(NONE),
            waker: Mutex::default(),
            listed,
            peer,
            opened: Tick::now(),
            activity: AtomicU64::new(0),
            requests: AtomicU32::new(0),
            current: Mutex::new(None),
        });
        let index = lock(&self.0.slots).insert(slot.clone());
        Deadline { clock: self.clone(), slot, index, when: NONE }
    }

    /// The listed connections: the first `limit` rows, and totals over all of them.
    pub(crate) fn connections(&self, limit: usize) -> Listing {
        let now = Tick::now();
        let mut listing = Listing::default();
        for (_, slot) in lock(&self.0.slots).iter().filter(|(_, slot)| slot.listed) {
            let packed = slot.activity.load(Relaxed);
            let activity = Activity::ALL.get((packed >> 56) as usize).copied().unwrap_or(Activity::Idle);
            listing.totals[activity as usize] += 1;
            if listing.rows.len() < limit {
                let age = now.since(slot.opened);
                let since = Duration::from_millis(packed & (u64::MAX >> 8));
                listing.rows.push(Row {
                    peer: slot.peer.clone(),
                    activity,
                    age,
                    in_activity: age.saturating_sub(since),
                    requests: u64::from(slot.requests.load(Relaxed)),
                    current: lock(&slot.current).as_deref().cloned(),
                });
            }
        }
        listing
    }

    /// A deadline `at`, in the slots' milliseconds, rounded up.
    fn millis(at: Tick) -> u64 {
        at.0.div_ceil(NANOS_PER_MILLI).saturating_add(1).min(NONE - 1)
    }

    /// The time now, in the same milliseconds rounded down: a deadline at or before it has
    /// passed, so none fires early.
    fn now() -> u64 {
        Tick::now().0 / NANOS_PER_MILLI + 1
    }

    /// The instant of millisecond `millis`.
    fn instant(millis: u64) -> Instant {
        Tick(millis.saturating_sub(1).saturating_mul(NANOS_PER_MILLI)).instant()
    }

    /// Wakes the sweeper to look again.
    fn poke(&self) {
        self.0.poked.store(true, SeqCst);
        if let Some(thread) = self.0.sweeper.get() {
            thread.unpark();
        }
        self.0.woken.notify(1);
    }

    /// Starts the sweeper thread; it runs until the returned guard is dropped.
    pub(crate) fn start(&self, name: &str) -> io::Result<Sweeper> {
        let clock = self.clone();
        let thread = std::thread::Builder::new()
            .name(format!("servicegroup-{name}-clock"))
            .spawn(move || clock.sweep_thread())?;
        let _ = self.0.sweeper.set(thread.thread().clone());
        Ok(Sweeper(self.clone()))
    }

    /// One look: expires the passed deadlines, wakes their connections, and plans the next
    /// look (returned, and stored in `next_sweep`).
    fn look(&self) -> u64 {
        // While looking, every new deadline pokes (next_sweep is NONE).
        self.0.next_sweep.store(NONE, SeqCst);
        self.0.poked.store(false, SeqCst);
        let now = Clock::now();
        let mut earliest = NONE;
        let mut due = Vec::new();
        for (_, slot) in lock(&self.0.slots).iter() {
            let deadline = slot.deadline.load(SeqCst);
            if deadline == NONE || deadline == EXPIRED {
                continue;
            }
            // A connection that just moved its deadline keeps it (the exchange fails).
            if deadline <= now && slot.deadline.compare_exchange(deadline, EXPIRED, SeqCst, SeqCst).is_ok() {
                due.extend(lock(&slot.waker).take());
            } else {
                earliest = earliest.min(deadline);
            }
        }
        due.into_iter().for_each(Waker::wake);
        let next = if earliest == NONE { NONE } else { earliest.max(now + GRANULARITY.as_millis() as u64) };
        self.0.next_sweep.store(next, SeqCst);
        next
    }

    /// The sweeper thread: looks, then parks until the next look or a poke (spurious
    /// wake-ups just look again).
    fn sweep_thread(self) {
        while !self.0.stopped.load(SeqCst) {
            let next = self.look();
            if self.0.poked.load(SeqCst) || self.0.stopped.load(SeqCst) {
                continue;
            }
            match next {
                NONE => std::thread::park(),
                next => std::thread::park_timeout(Clock::instant(next).saturating_duration_since(Instant::now())),
            }
        }
    }

    /// The sweeper as a future, for a group without threads of its own: looks, then sleeps
    /// on one timer until the next look or a poke. Never returns; drop it to stop.
    pub(crate) async fn sweep(&self) {
        let mut timer = Timer::never();
        loop {
            // Listen before looking, so that a poke during the look is not lost.
            let poked = self.0.woken.listen();
            let next = self.look();
            if self.0.poked.load(SeqCst) {
                continue;
            }
            if next == NONE {
                poked.await;
            } else {
                timer.set_at(Clock::instant(next));
                let expired = async {
                    (&mut timer).await;
                };
                expired.or(poked).await;
            }
        }
    }
}

/// Keeps a clock's sweeper thread running; stops it when dropped.
pub(crate) struct Sweeper(Clock);

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.0 .0.stopped.store(true, SeqCst);
        self.0.poke();
    }
}

/// One connection's deadline: set per phase (an atomic store), raced against the work.
pub(crate) struct Deadline {
    /// The clock that sweeps it.
    clock: Clock,
    /// The slot the sweeper looks at.
    slot: Arc<Slot>,
    /// Where the slot is registered.
    index: usize,
    /// The phase's deadline in the slot's milliseconds (`NONE`: none), for
    /// [`Deadline::at_most`] and [`Deadline::poll_expired`].
    when: u64,
}

impl Deadline {
    /// A handle for what the connections view shows of this connection.
    pub(crate) fn tracker(&self) -> Tracker {
        Tracker(self.slot.clone())
    }

    /// Starts a phase with this deadline (`None`: no timeout).
    pub(crate) fn set(&mut self, when: Option<Tick>) {
        let millis = when.map_or(NONE, Clock::millis);
        self.when = millis;
        self.slot.deadline.store(millis, SeqCst);
        if millis < self.clock.0.next_sweep.load(SeqCst) {
            self.clock.poke();
        }
    }

    /// Moves the current deadline to `until` if that is sooner (or there was none).
    pub(crate) fn at_most(&mut self, until: Tick) {
        if Clock::millis(until) < self.when {
            self.set(Some(until));
        }
    }

    /// Ready once the sweeper has found the current deadline passed.
    pub(crate) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.slot.deadline.load(SeqCst) == EXPIRED {
            return Poll::Ready(());
        }
        if self.when == NONE {
            return Poll::Pending;
        }
        {
            let mut waker = lock(&self.slot.waker);
            match &*waker {
                Some(current) if current.will_wake(cx.waker()) => {}
                _ => *waker = Some(cx.waker().clone()),
            }
        }
        // Re-check: the sweeper may have expired the slot before the waker went in.
        if self.slot.deadline.load(SeqCst) == EXPIRED {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Runs a poll function until it is ready (`Some`) or the deadline passes (`None`); the
    /// smallest future for the waits an idle or slow connection sits in.
    pub(crate) fn race_fn<'a, T>(
        &'a mut self,
        mut work: impl FnMut(&mut Context<'_>) -> Poll<T> + 'a,
    ) -> impl Future<Output = Option<T>> + 'a {
        poll_fn(move |cx| match work(cx) {
            Poll::Ready(done) => Poll::Ready(Some(done)),
            Poll::Pending => self.poll_expired(cx).map(|()| None),
        })
    }

    /// Runs `work` until it finishes (`Some`) or the deadline passes (`None`, and `work` is
    /// dropped). Work that finishes in the same poll as the deadline wins.
    pub(crate) async fn race<T>(&mut self, work: impl Future<Output = T>) -> Option<T> {
        let mut work = std::pin::pin!(work);
        self.race_fn(|cx| Pin::new(&mut work).poll(cx)).await
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        lock(&self.clock.0.slots).try_remove(self.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::{block_on, poll_once};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_deadline_fires_on_time_not_early() {
        let clock = Clock::default();
        let _sweeper = clock.start("test").unwrap();
        let mut deadline = clock.deadline(None, false);
        // Measured on std's clock, read before the tick: never less than the tick's elapsed.
        let begun = Instant::now();
        let start = Tick::now();
        deadline.set(Some(start + ms(60)));
        assert!(block_on(deadline.race(futures_lite::future::pending::<()>())).is_none());
        let elapsed = begun.elapsed();
        assert!(elapsed >= ms(60) && elapsed < ms(60) + Duration::from_secs(3), "{elapsed:?}");
    }

    #[test]
    fn a_deadline_moved_later_does_not_fire_at_the_old_time() {
        let clock = Clock::default();
        let _sweeper = clock.start("test").unwrap();
        let mut deadline = clock.deadline(None, false);
        let begun = Instant::now();
        let start = Tick::now();
        deadline.set(Some(start + ms(30)));
        deadline.set(Some(start + ms(120)));
        assert!(block_on(deadline.race(futures_lite::future::pending::<()>())).is_none());
        assert!(begun.elapsed() >= ms(120));
        // Moved earlier than the sweeper's plan: the sweeper is poked.
        let mut late = clock.deadline(None, false);
        late.set(Some(Tick::now() + Duration::from_secs(3600)));
        let mut soon = clock.deadline(None, false);
        let start = Tick::now();
        soon.set(Some(start + ms(40)));
        assert!(block_on(soon.race(futures_lite::future::pending::<()>())).is_none());
        assert!(start.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn no_deadline_never_fires_and_work_that_is_ready_wins() {
        let clock = Clock::default();
        let mut deadline = clock.deadline(None, false);
        deadline.set(None);
        let mut pending = Box::pin(deadline.race(futures_lite::future::pending::<()>()));
        assert!(block_on(poll_once(&mut pending)).is_none());
        drop(pending);
        // Already expired (no sweeper running here: mark it by hand) and work ready: work wins.
        deadline.set(Some(Tick::now()));
        deadline.slot.deadline.store(EXPIRED, SeqCst);
        assert_eq!(block_on(deadline.race(async { 7 })), Some(7));
        assert_eq!(block_on(deadline.race(futures_lite::future::pending::<u8>())), None);
    }

    #[test]
    fn ticks_add_subtract_and_round_deadlines_up() {
        let t = Tick(5 * NANOS_PER_MILLI + 1);
        assert_eq!(t + ms(2), Tick(7 * NANOS_PER_MILLI + 1));
        assert_eq!((t + ms(2)).since(t), ms(2));
        assert_eq!(t.since(t + ms(2)), Duration::ZERO);
        assert_eq!(t.after(None), None);
        assert_eq!(t.after(Some(ms(1))), Some(t + ms(1)));
        // Saturates: a timeout of centuries is as good as none.
        assert_eq!(t + Duration::MAX, Tick(u64::MAX));
        assert!(Clock::millis(Tick(u64::MAX)) < NONE);
        // A deadline is rounded up, the time now down: none fires early.
        assert_eq!(Clock::millis(Tick(5 * NANOS_PER_MILLI)), 6);
        assert_eq!(Clock::millis(t), 7);
        let before = Tick::now();
        let now = Clock::now();
        assert!(now <= Clock::millis(Tick::now()));
        assert!(now >= Clock::millis(before) - 1);
        // The instant of a millisecond reads back as the same millisecond.
        let instant = Clock::instant(now);
        assert_eq!(Clock::millis(Tick::since_epoch(instant - epoch())), now);
    }

    #[test]
    fn slots_are_reused() {
        let clock = Clock::default();
        let a = clock.deadline(None, false);
        let b = clock.deadline(None, false);
        let freed = a.index;
        drop(a);
        let c = clock.deadline(None, false);
        assert_eq!(c.index, freed);
        assert_eq!(lock(&clock.0.slots).len(), 2);
        drop((b, c));
        assert!(lock(&clock.0.slots).is_empty());
    }
}
