//! A request's wall-clock deadline, which a streamed generation may move
//! later: `timeout_ms` from admission, or `stream_ms` once the guest
//! starts generating text (`gpuwasm:llm`).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// When a request must be done.
#[derive(Debug)]
pub(crate) struct Deadline {
    start: Instant,
    /// Milliseconds after `start`.
    after_ms: AtomicU64,
}

impl Deadline {
    /// `limit_ms` from now.
    pub(crate) fn new(limit_ms: u64) -> Deadline {
        Deadline { start: Instant::now(), after_ms: AtomicU64::new(limit_ms) }
    }

    /// The instant it falls at now.
    pub(crate) fn at(&self) -> Instant {
        self.start + Duration::from_millis(self.after_ms.load(Ordering::Relaxed))
    }

    /// The limit it stands at, in milliseconds from the start.
    pub(crate) fn limit_ms(&self) -> u64 {
        self.after_ms.load(Ordering::Relaxed)
    }

    /// Moves it to `limit_ms` from the start, if that is later.
    pub(crate) fn extend_to(&self, limit_ms: u64) {
        self.after_ms.fetch_max(limit_ms, Ordering::Relaxed);
    }

    /// Runs `future` until it ends or the deadline (as it stands then)
    /// passes; `None` when the deadline passed first.
    pub(crate) async fn run<F: Future>(&self, future: F) -> Option<F::Output> {
        tokio::pin!(future);
        loop {
            let at = self.at();
            tokio::select! {
                out = &mut future => return Some(out),
                _ = tokio::time::sleep_until(at) => {
                    if self.at() <= at {
                        return None;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_deadline_moved_later_lets_the_future_finish() {
        let deadline = Deadline::new(30);
        let slow = tokio::time::sleep(Duration::from_millis(80));
        assert!(deadline.run(slow).await.is_none(), "30 ms < 80 ms");
        let deadline = std::sync::Arc::new(Deadline::new(30));
        let moved = deadline.clone();
        let slow = async move {
            moved.extend_to(200);
            tokio::time::sleep(Duration::from_millis(80)).await;
            "done"
        };
        assert_eq!(deadline.run(slow).await, Some("done"));
        assert_eq!(deadline.limit_ms(), 200);
        deadline.extend_to(50);
        assert_eq!(deadline.limit_ms(), 200, "never earlier");
    }
}
