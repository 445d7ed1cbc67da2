//! One own thread's I/O readiness (Linux): an epoll set in edge-triggered mode, each socket
//! added once for reading and writing, and readiness kept as bits beside the socket. Knows
//! nothing of HTTP.
//!
//! async-io's reactor is one epoll set for the process, in one-shot mode: every wait for a
//! socket re-arms it (an `epoll_ctl`), and the thread that happens to poll it wakes tasks of
//! every other thread (a futex wake each). Here each own thread polls its own set, between
//! running its own tasks, so an event wakes a task on the thread that will run it, and a
//! socket costs one `epoll_ctl` in its life. The model is tokio's (and mio's): an edge says
//! "something changed"; a read or write that would block clears the bit; a short read or
//! write clears it too, since the socket's buffer was drained (filled) at that moment.
//!
//! Cross-thread use stays correct: the body of a request or an upgraded stream may be polled
//! from another thread while this thread's reactor reports events. A clear only succeeds if
//! no event arrived since the bits were read (a count of events sits above the bits), and a
//! waiter registers its waker before it checks the bits a last time.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use rustix::event::epoll::{self, EventData, EventFlags};
use rustix::event::{eventfd, EventfdFlags, Timespec};
use slab::Slab;

/// The readiness bit for reading.
const READABLE: u64 = 1;
/// The readiness bit for writing.
const WRITABLE: u64 = 2;
/// Set for good once the peer has closed its side (or the socket failed): reads never block
/// again. Kept apart from [`READABLE`] because a short read clears that one even when the end
/// of the stream is still to be read, and no further edge would report it.
const READ_CLOSED: u64 = READABLE << 2;
/// Set for good once writes can only fail: they never block again.
const WRITE_CLOSED: u64 = WRITABLE << 2;
/// One event, counted above the bits: a clear compares the whole word, so it never erases
/// readiness an event reported after the bits were read.
const EVENT: u64 = 16;

/// The key of the reactor's own wake-up (its eventfd) in the epoll set.
const WAKE: u64 = u64::MAX;

/// Events taken from the kernel per wait, at most.
pub(crate) const EVENTS: usize = 256;

/// An epoll set and the sockets in it.
pub(crate) struct Reactor {
    /// The epoll set.
    epoll: OwnedFd,
    /// An eventfd in the set: writing to it ends a wait.
    wake: OwnedFd,
    /// The readiness of every socket in the set, by the key its events carry. Locked once
    /// per wait that returns events, and when a socket is added or closed.
    sources: Mutex<Slab<Arc<Readiness>>>,
    /// Set while the owning thread waits (or is about to) with no timeout: a task scheduled
    /// from elsewhere must then write to `wake`.
    sleeping: AtomicBool,
}

impl Reactor {
    /// A new, empty set.
    pub(crate) fn new() -> io::Result<Reactor> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        // Edge-triggered: every write to an eventfd is an edge, so it is never read (its
        // counter would take 2^64 writes to fill).
        epoll::add(&epoll, &wake, EventData::new_u64(WAKE), EventFlags::IN | EventFlags::ET)?;
        Ok(Reactor { epoll, wake, sources: Mutex::new(Slab::new()), sleeping: AtomicBool::new(false) })
    }

    /// Adds `io` (a non-blocking socket) to the set, for as long as the returned source lives.
    pub(crate) fn register<T: AsFd>(self: &Arc<Self>, io: T) -> io::Result<Source<T>> {
        let readiness = Arc::new(Readiness::default());
        let key = lock(&self.sources).insert(readiness.clone());
        let flags = EventFlags::IN | EventFlags::OUT | EventFlags::RDHUP | EventFlags::ET;
        if let Err(e) = epoll::add(&self.epoll, &io, EventData::new_u64(key as u64), flags) {
            lock(&self.sources).remove(key);
            return Err(e.into());
        }
        Ok(Source { io, readiness, reactor: self.clone(), key })
    }

    /// Marks the owning thread as about to wait with no timeout (`true`) or awake (`false`).
    /// Sequentially consistent, like the check in [`Reactor::wake`]: either the waiting
    /// thread sees what was scheduled, or the scheduler sees it waiting and wakes it.
    pub(crate) fn set_sleeping(&self, sleeping: bool) {
        self.sleeping.store(sleeping, Ordering::SeqCst);
    }

    /// Ends the owning thread's wait, if it waits: something was scheduled from elsewhere.
    pub(crate) fn wake(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            self.notify();
        }
    }

    /// Ends the owning thread's next or current wait.
    pub(crate) fn notify(&self) {
        // Full or failed: either way the set reports the eventfd readable.
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }

    /// Waits for events (at most until something is scheduled, when `block`; not at all
    /// otherwise), records each socket's readiness, and adds the wakers of the tasks waiting
    /// for them to `wakers`, to be woken once this returns (no lock is held then: waking may
    /// drop a task, and with it a socket of this set).
    pub(crate) fn poll(&self, events: &mut [epoll::Event], wakers: &mut Vec<Waker>, block: bool) -> io::Result<()> {
        const NOW: Timespec = Timespec { tv_sec: 0, tv_nsec: 0 };
        let n = match epoll::wait(&self.epoll, &mut *events, if block { None } else { Some(&NOW) }) {
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => 0,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Ok(());
        }
        let sources = lock(&self.sources);
        for event in &events[..n] {
            let (flags, key) = (event.flags, event.data.u64());
            if key == WAKE {
                continue;
            }
            // A key whose socket closed since the wait returned (on another thread) may be
            // another socket's by now: a spurious wake-up, which readiness tolerates.
            let Some(source) = usize::try_from(key).ok().and_then(|key| sources.get(key)) else { continue };
            let mut bits = 0;
            if flags.intersects(EventFlags::IN | EventFlags::PRI) {
                bits |= READABLE;
            }
            if flags.intersects(EventFlags::OUT) {
                bits |= WRITABLE;
            }
            if flags.intersects(EventFlags::RDHUP | EventFlags::HUP | EventFlags::ERR) {
                bits |= READ_CLOSED;
            }
            if flags.intersects(EventFlags::HUP | EventFlags::ERR) {
                bits |= WRITE_CLOSED;
            }
            source.set(bits, wakers);
        }
        Ok(())
    }
}

/// An empty event, to size the buffer [`Reactor::poll`] fills.
pub(crate) const NO_EVENT: epoll::Event = epoll::Event { flags: EventFlags::empty(), data: EventData::new_u64(0) };

/// Locks `m`; a panic elsewhere leaves the data consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a socket is ready for, and who waits for it.
#[derive(Default)]
pub(crate) struct Readiness {
    /// [`READABLE`], [`WRITABLE`] and their closed bits, and above them a count of events.
    /// All start clear: a new socket may already hold bytes, but adding it to the set reports
    /// them.
    state: AtomicU64,
    /// The tasks waiting to read (0) and to write (1).
    wakers: Mutex<[Option<Waker>; 2]>,
}

impl Readiness {
    /// Records an event for `bits` and takes the wakers waiting for them.
    fn set(&self, bits: u64, wakers: &mut Vec<Waker>) {
        let _ = self.state.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| Some((s | bits).wrapping_add(EVENT)));
        let mut waiting = lock(&self.wakers);
        for (i, bit) in [READABLE, WRITABLE].into_iter().enumerate() {
            if bits & ready(bit) != 0 {
                wakers.extend(waiting[i].take());
            }
        }
    }

    /// Runs `op` while the socket is ready for `bit`, until it does not block: `Ready` with
    /// its result, or `Pending` with the task registered for the next event. `drained` says
    /// whether a result left the socket's buffer empty (full), so the bit can clear without
    /// another call that would block.
    fn poll_io<R>(
        &self,
        bit: u64,
        cx: &mut Context<'_>,
        mut op: impl FnMut() -> io::Result<R>,
        drained: impl Fn(&R) -> bool,
    ) -> Poll<io::Result<R>> {
        loop {
            let seen = self.state.load(Ordering::Acquire);
            if seen & ready(bit) == 0 {
                if self.wait(bit, cx) {
                    continue;
                }
                return Poll::Pending;
            }
            match op() {
                Ok(done) => {
                    if drained(&done) {
                        self.clear(seen, bit);
                    }
                    return Poll::Ready(Ok(done));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.clear(seen, bit),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// `Ready` once the socket is ready for `bit` (a hint: the read or write may still
    /// block), registering the task otherwise.
    fn poll_ready(&self, bit: u64, cx: &mut Context<'_>) -> Poll<()> {
        match self.state.load(Ordering::Acquire) & ready(bit) != 0 || self.wait(bit, cx) {
            true => Poll::Ready(()),
            false => Poll::Pending,
        }
    }

    /// Registers the task for the next event on `bit`; then says whether the bit is set after
    /// all (an event arrived meanwhile, and its wake-up may have missed this waker).
    fn wait(&self, bit: u64, cx: &mut Context<'_>) -> bool {
        {
            let mut waiting = lock(&self.wakers);
            let slot = &mut waiting[usize::from(bit == WRITABLE)];
            match slot {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                _ => *slot = Some(cx.waker().clone()),
            }
        }
        self.state.load(Ordering::Acquire) & ready(bit) != 0
    }

    /// Clears `bit`, unless an event came after `seen` was read.
    fn clear(&self, seen: u64, bit: u64) {
        let _ = self.state.compare_exchange(seen, seen & !bit, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// The bits that say a socket will not block for `bit` ([`READABLE`] or [`WRITABLE`]): it,
/// or its closed bit.
fn ready(bit: u64) -> u64 {
    bit | bit << 2
}

/// A socket in a [`Reactor`]'s set; leaves the set when dropped (closing the socket).
pub(crate) struct Source<T: AsFd> {
    /// The socket (non-blocking).
    io: T,
    /// Its readiness.
    readiness: Arc<Readiness>,
    /// The set it is in.
    reactor: Arc<Reactor>,
    /// Its key there.
    key: usize,
}

impl<T: AsFd> Source<T> {
    /// The socket.
    pub(crate) fn get_ref(&self) -> &T {
        &self.io
    }
}

impl<T: AsFd> Source<T>
where
    for<'a> &'a T: Read + Write,
{
    /// Reads into `buf`; `Ok(0)` at the end of the stream.
    pub(crate) fn poll_read(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let len = buf.len();
        self.readiness.poll_io(READABLE, cx, || (&self.io).read(buf), |&n| n > 0 && n < len)
    }

    /// Writes from `bufs` in order.
    pub(crate) fn poll_write_vectored(&self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        self.readiness.poll_io(WRITABLE, cx, || (&self.io).write_vectored(bufs), |&n| n < len)
    }

    /// Writes from `buf`.
    pub(crate) fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let len = buf.len();
        self.readiness.poll_io(WRITABLE, cx, || (&self.io).write(buf), |&n| n < len)
    }

    /// `Ready` when a read may not block (a hint).
    pub(crate) fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.readiness.poll_ready(READABLE, cx).map(Ok)
    }
}

impl<T: AsFd> Drop for Source<T> {
    fn drop(&mut self) {
        // The socket leaves the epoll set as it closes (right after this), with no syscall;
        // only the key is given back.
        lock(&self.reactor.sources).try_remove(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    #[test]
    fn a_read_waits_for_an_edge_and_a_short_read_clears_readiness() {
        let reactor = Arc::new(Reactor::new().unwrap());
        let (mut client, server) = pair();
        let source = reactor.register(server).unwrap();
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let (mut events, mut wakers) = (vec![NO_EVENT; EVENTS], Vec::new());
        let mut buf = [0u8; 64];

        // Nothing reported yet: the read waits without a syscall.
        assert!(source.poll_read(&mut cx, &mut buf).is_pending());
        client.write_all(b"hello").unwrap();
        reactor.poll(&mut events, &mut wakers, true).unwrap();
        assert_eq!(wakers.len(), 1, "the reader is woken by the edge");
        wakers.drain(..).for_each(Waker::wake);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(matches!(source.poll_read(&mut cx, &mut buf), Poll::Ready(Ok(5))));
        // The short read drained the socket: the next read waits, and readable says so too.
        assert!(source.poll_read(&mut cx, &mut buf).is_pending());
        assert!(source.poll_readable(&mut cx).is_pending());

        // The peer's data and its end arrive before a read: the short read takes the data, and
        // the end is still readable though no new edge reports it.
        client.write_all(b"bye").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        reactor.poll(&mut events, &mut wakers, true).unwrap();
        assert!(matches!(source.poll_read(&mut cx, &mut buf), Poll::Ready(Ok(3))));
        assert!(source.poll_readable(&mut cx).is_ready());
        assert!(matches!(source.poll_read(&mut cx, &mut buf), Poll::Ready(Ok(0))));
        // It stays so.
        assert!(source.poll_readable(&mut cx).is_ready());
        assert!(matches!(source.poll_read(&mut cx, &mut buf), Poll::Ready(Ok(0))));
        assert!(matches!(source.poll_read(&mut cx, &mut buf), Poll::Ready(Ok(0))));
    }

    #[test]
    fn a_clear_never_erases_a_newer_event() {
        let readiness = Readiness::default();
        let mut wakers = Vec::new();
        readiness.set(READABLE, &mut wakers);
        let seen = readiness.state.load(Ordering::SeqCst);
        readiness.set(READABLE, &mut wakers);
        readiness.clear(seen, READABLE);
        assert_ne!(readiness.state.load(Ordering::SeqCst) & READABLE, 0);
        let seen = readiness.state.load(Ordering::SeqCst);
        readiness.clear(seen, READABLE);
        assert_eq!(readiness.state.load(Ordering::SeqCst) & READABLE, 0);
    }

    #[test]
    fn a_notify_ends_a_wait_and_a_closed_socket_gives_its_key_back() {
        let reactor = Arc::new(Reactor::new().unwrap());
        let (_client, server) = pair();
        let source = reactor.register(server).unwrap();
        assert_eq!(lock(&reactor.sources).len(), 1);
        drop(source);
        assert_eq!(lock(&reactor.sources).len(), 0);
        reactor.notify();
        let (mut events, mut wakers) = (vec![NO_EVENT; EVENTS], Vec::new());
        reactor.poll(&mut events, &mut wakers, true).unwrap();
        assert!(wakers.is_empty());
    }
}
