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
//! The long lane is one per process, started on first use (a guest's
//! move, or [`in_long_lane`]). If it cannot be started, everything stays
//! where it is.

use crate::usage::thread_cpu_time;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::Duration;

/// CPU a guest may use, after its first epoch tick, before it is long.
pub(crate) const LONG_AFTER: Duration = Duration::from_millis(1);

/// The nice value of the long lane's threads: the lowest priority.
const LONG_NICE: libc::c_int = 19;

/// Runs `guest`, one request of a deployment whose last request ended
/// long when `last_long` is set: then on the long lane from the start;
/// otherwise where it is polled until it has used [`LONG_AFTER`] of CPU
/// since `ticked` was set, then on the long lane until it ends. Leaves
/// `last_long` saying whether this one went long. Sets `ticked` for a
/// guest that starts on the long lane: there, at the lowest priority,
/// preemption is the rule, and only the thread's CPU clock tells the
/// guest's time (metering reads it once `ticked` is set). Dropping the
/// result stops the guest wherever it runs (at its next yield).
pub(crate) async fn run<F>(guest: F, ticked: Arc<AtomicBool>, last_long: Arc<AtomicBool>) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut guest = Box::pin(guest);
    if !last_long.load(Ordering::Relaxed) {
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
            last_long.store(false, Ordering::Relaxed);
            return output;
        }
    } else {
        ticked.store(true, Ordering::Relaxed);
    }
    let output = on_long_lane(guest).await;
    last_long.store(true, Ordering::Relaxed);
    output
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
        // Worker threads as tokio counts them (TOKIO_WORKER_THREADS, or
        // one per core); timers and sockets for the guest's host calls.
        let built = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("gpuwasm-long")
            .on_thread_start(lower_priority)
            .build();
        built.inspect_err(|e| tracing::warn!("long requests stay beside short ones: cannot start their runtime: {e}")).ok()
    });
    lane.as_ref().map(|runtime| runtime.handle())
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

    async fn lanes(tick: bool, ms: u64, last_long: bool) -> (String, String, bool) {
        let (ticked, last) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(last_long)));
        let (before, after) = tokio::spawn(run(guest(ticked.clone(), tick, ms), ticked, last.clone())).await.unwrap();
        (before, after, last.load(Ordering::Relaxed))
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
        let (ticked, last) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(true)));
        let probe = ticked.clone();
        let (thread, timed_by_thread_clock) =
            tokio::spawn(run(async move { (thread_name(), probe.load(Ordering::Relaxed)) }, ticked, last.clone())).await.unwrap();
        assert_eq!(thread, "gpuwasm-long");
        assert!(timed_by_thread_clock, "a guest on the long lane is timed on the thread clock from its start");
        assert!(last.load(Ordering::Relaxed), "a request run on the long lane counts as long");
        let (before, _, went_long) = lanes(false, 0, false).await;
        assert!(before.starts_with("tokio-") && !went_long);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn dropping_the_request_stops_a_guest_on_the_long_lane() {
        let (ticked, last_long) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicBool::new(true)));
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        let spinning = async move {
            let _tell_when_dropped = dropped_tx;
            loop {
                tokio::task::yield_now().await;
            }
        };
        let waiting = tokio::spawn(async move { run(spinning, ticked, last_long).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        waiting.abort();
        // The sender inside the guest is dropped with it: the receiver ends.
        let ended = tokio::time::timeout(Duration::from_secs(5), dropped_rx).await;
        assert!(matches!(ended, Ok(Err(_))), "the guest kept running on the long lane");
    }
}
