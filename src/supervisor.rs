//! The supervisor: a race of named futures and one shared stop signal. Knows nothing of HTTP.
//!
//! As in oklog/run: the first member to finish, `Ok` or `Err`, stops the group; every member
//! sees the stop (through the shared [`Latch`] it was given) and is awaited; members still
//! running when the grace period ends are dropped. No members: immediate return.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_io::Timer;
use futures_lite::future::poll_fn;
use futures_lite::FutureExt;

use crate::error::{BoxError, Error};
use crate::shutdown::Latch;

/// A member's future; it may borrow what the group's run lends it for `'a`.
pub(crate) type MemberFuture<'a> = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + 'a>>;

/// A named long-running task.
pub(crate) struct Member<'a> {
    /// For errors and logs.
    pub(crate) name: String,
    /// The task.
    pub(crate) future: MemberFuture<'a>,
}

/// How a supervised run ended.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// What ended the group: the first member's result, or `Ok` if the stop came from outside.
    pub(crate) result: Result<(), Error>,
    /// Members still running at the end of the grace period (they were dropped).
    pub(crate) unfinished: Vec<String>,
}

/// Runs `members` until one finishes or `stop` is set; then sets `stop` and waits up to
/// `grace` for the rest.
pub(crate) async fn supervise(members: Vec<Member<'_>>, stop: &Latch, grace: Duration) -> Outcome {
    let mut slots: Vec<Option<Member>> = members.into_iter().map(Some).collect();
    let mut first: Option<Result<(), Error>> = None;

    // Phase 1: until the first member ends, or someone else stops the group.
    let stopped = stop.wait();
    let running = poll_fn(|cx| {
        poll_members(&mut slots, cx, &mut first);
        if first.is_some() || slots.iter().all(Option::is_none) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    });
    running.or(stopped).await;
    let result = first.take().unwrap_or(Ok(()));
    if stop.set() {
        match &result {
            Ok(()) => log::info!("a group member finished; stopping the group"),
            Err(e) => log::error!("{e}; stopping the group"),
        }
    }

    // Phase 2: every member sees the stop; wait for them, up to the grace period.
    let finished = poll_fn(|cx| {
        poll_members(&mut slots, cx, &mut first);
        if slots.iter().all(Option::is_none) {
            Poll::Ready(true)
        } else {
            Poll::Pending
        }
    });
    let expired = async {
        Timer::after(grace).await;
        false
    };
    if !finished.or(expired).await {
        log::warn!("grace period of {grace:?} is over; dropping the members still running");
    }
    let unfinished = slots.into_iter().flatten().map(|m| m.name).collect();
    Outcome { result, unfinished }
}

/// Polls every running member once; records the first to end in `first` and logs the rest.
fn poll_members(slots: &mut [Option<Member<'_>>], cx: &mut Context<'_>, first: &mut Option<Result<(), Error>>) {
    for slot in slots.iter_mut() {
        let Some(member) = slot else { continue };
        let polled = catch_unwind(AssertUnwindSafe(|| member.future.as_mut().poll(cx)));
        let result = match polled {
            Ok(Poll::Pending) => continue,
            Ok(Poll::Ready(Ok(()))) => {
                log::debug!("group member `{}` finished", member.name);
                Ok(())
            }
            Ok(Poll::Ready(Err(source))) => Err(Error::Member { name: member.name.clone(), source }),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into());
                Err(Error::Panicked { name: member.name.clone(), message })
            }
        };
        *slot = None;
        match (&*first, result) {
            (None, result) => *first = Some(result),
            (Some(_), Err(e)) => log::warn!("after the group stopped: {e}"),
            (Some(_), Ok(())) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::block_on;
    use std::io;

    fn member(name: &str, future: impl Future<Output = Result<(), BoxError>> + Send + 'static) -> Member<'static> {
        Member { name: name.into(), future: Box::pin(future) }
    }

    /// A member that runs until the group stops, then returns `Ok`.
    fn until_stopped(name: &str, stop: &Latch) -> Member<'static> {
        let stop = stop.wait();
        member(name, async move {
            stop.await;
            Ok(())
        })
    }

    #[test]
    fn no_members_return_at_once() {
        let stop = Latch::default();
        let outcome = block_on(supervise(Vec::new(), &stop, Duration::from_secs(60)));
        assert!(outcome.result.is_ok());
        assert!(outcome.unfinished.is_empty());
    }

    #[test]
    fn one_member_ending_ends_the_group() {
        let stop = Latch::default();
        let outcome = block_on(supervise(vec![member("only", async { Ok(()) })], &stop, Duration::from_secs(60)));
        assert!(outcome.result.is_ok());
        assert!(stop.is_set());
    }

    #[test]
    fn the_first_error_wins_and_names_its_member() {
        let stop = Latch::default();
        let members = vec![
            until_stopped("a", &stop),
            member("broken", async { Err(io::Error::other("disk full").into()) }),
            until_stopped("c", &stop),
            member("late", {
                let stop = stop.wait();
                async move {
                    stop.await;
                    Err(io::Error::other("second error").into())
                }
            }),
        ];
        let outcome = block_on(supervise(members, &stop, Duration::from_secs(60)));
        let text = outcome.result.unwrap_err().to_string();
        assert_eq!(text, "group member `broken` failed: disk full");
        assert!(outcome.unfinished.is_empty());
    }

    #[test]
    fn a_panicking_member_ends_the_group_with_its_name() {
        let stop = Latch::default();
        let members = vec![until_stopped("steady", &stop), member("crashy", async { panic!("boom") })];
        let outcome = block_on(supervise(members, &stop, Duration::from_secs(60)));
        assert_eq!(outcome.result.unwrap_err().to_string(), "group member `crashy` panicked: boom");
    }

    #[test]
    fn an_outside_stop_is_a_clean_end() {
        let stop = Latch::default();
        stop.set();
        let outcome = block_on(supervise(vec![until_stopped("a", &stop)], &stop, Duration::from_secs(60)));
        assert!(outcome.result.is_ok());
        assert!(outcome.unfinished.is_empty());
    }

    #[test]
    fn members_that_ignore_the_stop_are_dropped_after_the_grace_period() {
        struct DropFlag(std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl Drop for DropFlag {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = DropFlag(dropped.clone());
        let stop = Latch::default();
        let members = vec![
            member("quick", async { Ok(()) }),
            member("stubborn", async move {
                let _flag = flag;
                futures_lite::future::pending::<()>().await;
                Ok(())
            }),
        ];
        let outcome = block_on(supervise(members, &stop, Duration::from_millis(20)));
        assert!(outcome.result.is_ok());
        assert_eq!(outcome.unfinished, ["stubborn"]);
        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
    }
}
