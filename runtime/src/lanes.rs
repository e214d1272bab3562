//! Two lanes for guests, so that long requests never delay short ones.
//!
//! A guest starts on the caller's tokio runtime, beside the connections
//! (the fast lane). One that uses [`LONG_AFTER`] of CPU after the first
//! epoch tick it sees moves, at its next yield, to the long lane: a
//! runtime of its own (as many threads as tokio would give the caller's)
//! whose threads the kernel runs at the lowest priority, nice 19. Short
//! requests, of every tenant, then take a core from a long one the moment
//! they need it, instead of waiting for its time slice to end; long
//! requests share what short ones leave, and all of the machine when
//! there are none. Everything the guest does after the move runs there
//! too: its host calls, its response, its teardown (resetting a big
//! memory is the long request's work).
//!
//! A guest's CPU is read from its thread's CPU clock around each poll
//! (a system call), and only once it has seen a tick: most requests end
//! before one and pay nothing, and time a guest spends preempted or
//! queued behind other tasks is never taken for its own.
//!
//! A deployment whose last request went long starts its next one on the
//! long lane directly (a CPU hog's requests never take the fast lane's
//! workers at all); its first short request brings it back.
//!
//! A deployment whose last request went long also makes its next ones
//! take turns ([`Lane::turn`]): at most twice as many as the long lane
//! has threads (one computing per thread, one more each being
//! instantiated or torn down) are instantiated and computing at once, in
//! the order they came; the others wait for a turn before they get an
//! instance (under their deadline). Without turns, every request admitted
//! was instantiated at once, at the fast lane's priority, and the long
//! lane shared its threads among all of them: at 64 connections on a
//! Python component, a p99 three times the mean. A guest that waits on
//! something other than the CPU (its client, a host call, a timer) gives
//! its turn up for good, so slow I/O never holds one; it then goes on
//! without one, never queueing behind new requests (its deadline and a
//! stop reach it as before).
//!
//! The long lane is one per process, started on first use (a guest's
//! move, or [`in_long_lane`]). If it cannot be started, everything stays
//! where it is.

use crate::usage::thread_cpu_time;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// CPU a guest may use, after its first epoch tick, before it is long.
pub(crate) const LONG_AFTER: Duration = Duration::from_millis(1);

/// The nice value of the long lane's threads: the lowest priority.
const LONG_NICE: libc::c_int = 19;

/// What the lanes keep for one deployment: whether its last request went
/// long, and its turns on the long lane.
pub(crate) struct Lane {
    last_long: AtomicBool,
    turns: Arc<Semaphore>,
}

/// A guest's turn on the long lane ([`Lane::turn`]).
pub(crate) struct Turn(Option<OwnedSemaphorePermit>);

impl Lane {
    pub(crate) fn new() -> Lane {
        Lane::with_turns(2 * long_threads())
    }

    fn with_turns(turns: usize) -> Lane {
        Lane { last_long: AtomicBool::new(false), turns: Arc::new(Semaphore::new(turns)) }
    }

    /// Waits, in order, for a turn on the long lane when the deployment's
    /// last request went long (the next starts there); otherwise returns
    /// at once with none (a guest that starts on the fast lane, or moves
    /// from it later, goes without).
    pub(crate) async fn turn(&self) -> Turn {
        if !self.last_long.load(Ordering::Relaxed) {
            return Turn(None);
        }
        Turn(self.turns.clone().acquire_owned().await.ok())
    }
}

/// Runs `guest`, one request of a deployment whose `lane` says whether
/// its last request ended long: if so on the long lane from the start,
/// holding `turn` ([`Lane::turn`]) until it ends or waits on I/O;
/// otherwise where it is polled until it has used [`LONG_AFTER`] of CPU
/// since `ticked` was set, then on the long lane until it ends. Leaves
/// `lane` saying whether this one went long. Sets `ticked` for a guest
/// that starts on the long lane:
/// there, at the lowest priority, preemption is the rule, and only the
/// thread's CPU clock tells the guest's time (metering reads it once
/// `ticked` is set). Dropping the result stops the guest wherever it runs
/// (at its next yield).
pub(crate) async fn run<F>(guest: F, ticked: Arc<AtomicBool>, lane: Arc<Lane>, turn: Turn) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut guest = Box::pin(guest);
    let mut turn = turn.0;
    if !lane.last_long.load(Ordering::Relaxed) {
        // A turn taken just before a short request ended the streak.
        turn = None;
        let mut used = Duration::ZERO;
        let done = std::future::poll_fn(|cx| {
            let start = ticked.load(Ordering::Relaxed).then(thread_cpu_time);
            let polled = guest.as_mut().poll(cx);
            if let Some(start) = start {
                used += thread_cpu_time().saturating_sub(start);
            }
            match polled {
                Poll::Ready(output) => Poll::Ready(Some(output)),
                Poll::Pending if used >= LONG_AFTER => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        if let Some(output) = done {
            lane.last_long.store(false, Ordering::Relaxed);
            return output;
        }
    } else {
        ticked.store(true, Ordering::Relaxed);
    }
    let output = on_long_lane(Box::pin(holding(guest, turn))).await;
    lane.last_long.store(true, Ordering::Relaxed);
    output
}

/// Polls `guest`, holding `turn` until the guest waits on something else
/// than its own yield; then the turn goes to the next request, and the
/// guest goes on without one.
async fn holding<F: Future>(mut guest: Pin<Box<F>>, mut turn: Option<OwnedSemaphorePermit>) -> F::Output {
    std::future::poll_fn(|cx| {
        if turn.is_none() {
            return guest.as_mut().poll(cx);
        }
        let woken = Arc::new(Woken { woken: AtomicBool::new(false), waker: cx.waker().clone() });
        let polled = guest.as_mut().poll(&mut Context::from_waker(&Waker::from(woken.clone())));
        if polled.is_pending() && !woken.woken.load(Ordering::Relaxed) {
            turn = None;
        }
        polled
    })
    .await
}

/// A waker that remembers being woken: a guest that yields (an epoch
/// tick) wakes itself before its poll returns; one waiting on I/O does not.
struct Woken {
    woken: AtomicBool,
    waker: Waker,
}

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Relaxed);
        self.waker.wake_by_ref();
    }
}

/// Runs `work` on the long lane, where guests that run long go: for a
/// host's own heavy work (uploads, deploys, durable commits) that must
/// not delay requests. Dropping the result stops `work` at its next
/// await; runs `work` here if the long lane cannot be started.
pub async fn in_long_lane<F>(work: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    on_long_lane(Box::pin(work)).await
}

async fn on_long_lane<F>(work: Pin<Box<F>>) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let Some(lane) = long_lane() else { return work.await };
    let mut task = AbortOnDrop(lane.spawn(work));
    match (&mut task.0).await {
        Ok(output) => output,
        Err(join) => match join.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Only dropping `task` cancels it, and then nobody awaits.
            Err(join) => panic!("the long lane dropped a task: {join}"),
        },
    }
}

/// Aborts a long-lane task when the request waiting for it goes away.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The long lane's runtime, started on first use; `None` if it could not be.
fn long_lane() -> Option<&'static tokio::runtime::Handle> {
    static LANE: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    let lane = LANE.get_or_init(|| {
        // Timers and sockets for the guest's host calls.
        let built = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(long_threads())
            .enable_all()
            .thread_name("gpuwasm-long")
            .on_thread_start(lower_priority)
            .build();
        built.inspect_err(|e| tracing::warn!("long requests stay beside short ones: cannot start their runtime: {e}")).ok()
    });
    lane.as_ref().map(|runtime| runtime.handle())
}

/// The long lane's threads: as many as tokio gives the caller's runtime
/// (`TOKIO_WORKER_THREADS`, or one per core).
fn long_threads() -> usize {
    let set = std::env::var("TOKIO_WORKER_THREADS").ok().and_then(|n| n.parse().ok()).filter(|&n| n > 0);
    set.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Gives the calling thread the long lane's priority.
fn lower_priority() {
    // SAFETY: setpriority takes plain integers. On Linux the nice value
    // is per thread and `who` 0 is the calling thread; elsewhere it is the
    // process's, which the long lane must not change.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, LONG_NICE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread_name() -> String {
        std::thread::current().name().unwrap_or_default().to_string()
    }

    /// Sets `ticked` (when `tick`; as a guest's epoch callback does, in a
    /// poll), yields, burns `ms` of CPU in the next poll, yields again,
    /// and reports the threads it ran on first and last.
    async fn guest(ticked: Arc<AtomicBool>, tick: bool, ms: u64) -> (String, String) {
        let before = thread_name();
        ticked.store(tick, Ordering::Relaxed);
        tokio::task::yield_now().await;
        let start = thread_cpu_time();
        while thread_cpu_time() - start < Duration::from_millis(ms) {}
        tokio::task::yield_now().await;
        (before, thread_name())
    }

    /// A deployment's lane with `turns`, whose last request went long when `last_long`.
    fn lane(turns: usize, last_long: bool) -> Arc<Lane> {
        let lane = Lane::with_turns(turns);
        lane.last_long.store(last_long, Ordering::Relaxed);
        Arc::new(lane)
    }

    async fn lanes(tick: bool, ms: u64, last_long: bool) -> (String, String, bool) {
        let (ticked, lane) = (Arc::new(AtomicBool::new(false)), lane(2, last_long));
        let turn = lane.turn().await;
        let (before, after) = tokio::spawn(run(guest(ticked.clone(), tick, ms), ticked, lane.clone(), turn)).await.unwrap();
        (before, after, lane.last_long.load(Ordering::Relaxed))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_guest_that_computes_past_a_tick_moves_to_the_long_lane() {
        let (before, after, went_long) = lanes(true, 2, false).await;
        assert!(before.starts_with("tokio-"), "{before}");
        assert_eq!(after, "gpuwasm-long");
        assert!(went_long);
        #[cfg(target_os = "linux")]
        {
            let lane = long_lane().unwrap();
            // SAFETY: getpriority takes plain integers; 0 is the calling thread.
            let nice = lane.spawn(async { unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) } }).await.unwrap();
            assert_eq!(nice, LONG_NICE);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn short_guests_stay_where_they_started_ticks_or_not() {
        for tick in [false, true] {
            let (before, after, went_long) = lanes(tick, 0, false).await;
            assert!(before.starts_with("tokio-") && before == after, "{before} then {after}");
            assert!(!went_long);
        }
        // Computing without a tick is never measured: it stays too.
        let (before, after, _) = lanes(false, 2, false).await;
        assert_eq!(before, after);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn after_a_long_request_the_next_starts_on_the_long_lane_and_a_short_one_ends_that() {
        let (ticked, last) = (Arc::new(AtomicBool::new(false)), lane(2, true));
        let probe = ticked.clone();
        let turn = last.turn().await;
        assert!(turn.0.is_some(), "the next request of a long deployment waits for a turn before its instance");
        let (thread, timed_by_thread_clock) =
            tokio::spawn(run(async move { (thread_name(), probe.load(Ordering::Relaxed)) }, ticked, last.clone(), turn)).await.unwrap();
        assert_eq!(thread, "gpuwasm-long");
        assert!(timed_by_thread_clock, "a guest on the long lane is timed on the thread clock from its start");
        assert!(last.last_long.load(Ordering::Relaxed), "a request run on the long lane counts as long");
        assert_eq!(last.turns.available_permits(), 2, "its turn ends with it");
        let (before, _, went_long) = lanes(false, 0, false).await;
        assert!(before.starts_with("tokio-") && !went_long);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn dropping_the_request_stops_a_guest_on_the_long_lane() {
        let (ticked, last_long) = (Arc::new(AtomicBool::new(true)), lane(2, true));
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        let spinning = async move {
            let _tell_when_dropped = dropped_tx;
            loop {
                tokio::task::yield_now().await;
            }
        };
        let waiting = tokio::spawn(async move {
            let turn = last_long.turn().await;
            run(spinning, ticked, last_long, turn).await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        waiting.abort();
        // The sender inside the guest is dropped with it: the receiver ends.
        let ended = tokio::time::timeout(Duration::from_secs(5), dropped_rx).await;
        assert!(matches!(ended, Ok(Err(_))), "the guest kept running on the long lane");
    }

    /// Yields as wasmtime does at an epoch tick: wakes itself, then
    /// returns pending. (tokio's `yield_now` defers its wake-up past the
    /// poll: a guest yielding so would count as waiting, and take its
    /// turn again from the back of the queue.)
    async fn epoch_yield() {
        let mut yielded = false;
        std::future::poll_fn(|cx| {
            if std::mem::replace(&mut yielded, true) {
                return Poll::Ready(());
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await
    }

    /// Three computing guests of one deployment with one turn: each starts
    /// computing only after the one before ended, in the order they asked,
    /// though all yield at every step (each step takes a millisecond: with
    /// more turns, or none, they interleave).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deployments_computing_guests_take_turns_in_order() {
        let (lane, order) = (lane(1, true), Arc::new(std::sync::Mutex::new(Vec::new())));
        let order_of = order.clone();
        let computing = move |name: &'static str| {
            let order = order_of.clone();
            async move {
                for step in 0..20 {
                    order.lock().unwrap().push((name, step));
                    std::thread::sleep(Duration::from_millis(1));
                    epoch_yield().await;
                }
            }
        };
        let first_turn = lane.turn().await;
        let first = tokio::spawn(run(computing("first"), Arc::default(), lane.clone(), first_turn));
        let mut waiters = Vec::new();
        for name in ["second", "third"] {
            let waiting = lane.clone();
            let computing = computing.clone();
            waiters.push(tokio::spawn(async move {
                let turn = waiting.turn().await;
                run(computing(name), Arc::default(), waiting, turn).await
            }));
            // "third" asks after "second".
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        first.await.unwrap();
        for waiter in waiters {
            waiter.await.unwrap();
        }
        let order = order.lock().unwrap();
        let mut runs: Vec<(&str, usize)> = Vec::new();
        for (name, _) in order.iter() {
            match runs.last_mut() {
                Some((last, n)) if last == name => *n += 1,
                _ => runs.push((name, 1)),
            }
        }
        assert_eq!(runs, [("first", 20), ("second", 20), ("third", 20)], "not one after another, in order: {order:?}");
    }

    /// A guest waiting on something other than the CPU gives its turn up,
    /// for good: with one turn, a second guest takes it while the first
    /// waits, and the first, woken while the turn is still held, finishes
    /// without waiting for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_guest_waiting_on_io_gives_its_turn_up_and_goes_on_without() {
        let lane = lane(1, true);
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let waiting = async move {
            release_rx.await.unwrap();
            epoch_yield().await;
            "waited"
        };
        let turn = lane.turn().await;
        let first = tokio::spawn(run(waiting, Arc::default(), lane.clone(), turn));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let held = tokio::time::timeout(Duration::from_secs(5), lane.turn()).await.expect("the waiting guest kept its turn");
        assert!(held.0.is_some());
        release_tx.send(()).unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), first).await.expect("the woken guest waited for a turn");
        assert_eq!(first.unwrap(), "waited");
        assert_eq!(lane.turns.available_permits(), 0, "the turn is still held");
        drop(held);
        assert_eq!(lane.turns.available_permits(), 1);
    }
}
