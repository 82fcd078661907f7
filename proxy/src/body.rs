//! The bodies that cross the proxy, with what bounds them.
//!
//! [`RequestBody`]: the client's request body on its way to the application, with a progress timeout
//! (`--body-read-timeout`): the client must deliver at least [`PROGRESS_FLOOR`] bytes (or the rest of the body) in
//! every `--body-read-timeout` of time the proxy spends *waiting on the client*. A body that stalls, or trickles in
//! below the floor, ends in [`BodyStalled`]: the upstream request is aborted (its connection closed, so the
//! application does not wait for the rest) and the client is answered 408 `body_timeout` if no response has
//! started. Time the proxy spends not reading (the application not reading yet) never counts against the client.
//! The timer is created the first time the proxy actually has to wait for body bytes: a request without a body, or
//! whose body came with its head, allocates nothing.
//!
//! [`ResponseBody`]: the application's response body, carrying, for requests sent on the shared side pool, that
//! pool's permit until it has been read. [`Counted`]: any response body with the request's [`InFlight`] guard, so a
//! request (an HTTP/2 stream) counts as in progress until its response body has been sent.

use crate::io::InFlight;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};

/// Bytes a request body must advance by in every `--body-read-timeout` of waiting (≈ 34 B/s at the default 30 s).
pub const PROGRESS_FLOOR: u64 = 1024;

/// The client did not deliver its request body in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request body made no progress for {0:?} (at least {PROGRESS_FLOOR} bytes per period)")]
pub struct BodyStalled(pub Duration);

impl BodyStalled {
    /// Whether `e` or any error in its source chain is a stalled body.
    pub fn in_chain(e: &(dyn std::error::Error + 'static)) -> bool {
        let mut cur = Some(e);
        while let Some(e) = cur {
            if e.is::<BodyStalled>() || matches!(e.downcast_ref(), Some(RequestBodyError::Stalled(_))) {
                return true;
            }
            cur = e.source();
        }
        false
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error("reading the request body")]
    Client(#[source] hyper::Error),
    #[error(transparent)]
    Stalled(#[from] BodyStalled),
}

impl RequestBodyError {
    /// Whether `e` or any error in its source chain is the client's body failing (malformed chunked framing, a body
    /// cut short, an h2 stream reset): hyper reports an error of the body it was sending as a "user" error whose
    /// source is this body's error.
    pub fn client_in_chain(e: &(dyn std::error::Error + 'static)) -> bool {
        let mut cur = Some(e);
        while let Some(e) = cur {
            if matches!(e.downcast_ref(), Some(RequestBodyError::Client(_))) {
                return true;
            }
            cur = e.source();
        }
        false
    }
}

/// The progress rule, without I/O: time spent waiting accumulates until [`PROGRESS_FLOOR`] bytes have arrived.
#[derive(Debug, Clone)]
pub struct Progress {
    limit: Duration,
    /// Waiting time in the current period, not counting the wait in progress.
    waited: Duration,
    /// Bytes in the current period.
    bytes: u64,
    waiting_since: Option<Instant>,
}

impl Progress {
    pub fn new(limit: Duration) -> Self {
        Self { limit, waited: Duration::ZERO, bytes: 0, waiting_since: None }
    }

    /// The proxy has to wait for the client (from `now`, or from when this wait began): the deadline.
    pub fn waiting(&mut self, now: Instant) -> Instant {
        let since = *self.waiting_since.get_or_insert(now);
        since + self.limit.saturating_sub(self.waited)
    }

    /// `n` bytes arrived; `now` is read only if a wait was in progress.
    pub fn arrived(&mut self, n: usize, now: impl FnOnce() -> Instant) {
        if let Some(since) = self.waiting_since.take() {
            self.waited += now().saturating_duration_since(since);
        }
        self.bytes += n as u64;
        if self.bytes >= PROGRESS_FLOOR {
            self.bytes = 0;
            self.waited = Duration::ZERO;
        }
    }
}

/// The client's request body with the progress timeout.
pub struct RequestBody {
    inner: Incoming,
    progress: Progress,
    /// Created on the first wait; reset (not reallocated) after that.
    timer: Option<Pin<Box<Sleep>>>,
    armed: Option<Instant>,
    failed: bool,
}

impl RequestBody {
    pub fn new(inner: Incoming, timeout: Duration) -> Self {
        Self { inner, progress: Progress::new(timeout), timer: None, armed: None, failed: false }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.progress.arrived(d.len(), Instant::now);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(RequestBodyError::Client(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let deadline = this.progress.waiting(Instant::now());
                let timer = match &mut this.timer {
                    Some(t) => {
                        if this.armed != Some(deadline) {
                            t.as_mut().reset(deadline);
                        }
                        t
                    }
                    None => this.timer.insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                this.armed = Some(deadline);
                ready!(timer.as_mut().poll(cx));
                this.failed = true;
                Poll::Ready(Some(Err(BodyStalled(this.progress.limit).into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The application's response body, holding the side-pool permit (if any) until it has been read.
pub struct ResponseBody {
    inner: Incoming,
    permit: Option<OwnedSemaphorePermit>,
}

impl ResponseBody {
    pub fn new(inner: Incoming, permit: Option<OwnedSemaphorePermit>) -> Self {
        Self { inner, permit }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let r = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if r.is_none() {
            // Done: release the permit now rather than when hyper drops the body.
            self.permit = None;
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps its request counted as in progress until it has been sent (or dropped).
pub struct Counted<B> {
    inner: B,
    in_flight: Option<InFlight>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, in_flight: InFlight) -> Self {
        Self { inner, in_flight: Some(in_flight) }
    }
}

impl<B: Body + Unpin> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let r = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if r.is_none() {
            self.in_flight = None;
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn a_stall_runs_out_the_whole_period() {
        let t0 = Instant::now();
        let mut p = Progress::new(T);
        assert_eq!(p.waiting(t0), t0 + T);
        assert_eq!(p.waiting(t0 + Duration::from_secs(3)), t0 + T, "the same wait keeps its deadline");
    }

    #[test]
    fn trickling_below_the_floor_does_not_reset_the_clock() {
        let t0 = Instant::now();
        let mut p = Progress::new(T);
        let mut now = t0;
        // One byte every 2 s of waiting: the waits add up to the limit.
        for _ in 0..4 {
            p.waiting(now);
            now += Duration::from_secs(2);
            p.arrived(1, || now);
        }
        assert_eq!(p.waiting(now), now + Duration::from_secs(2), "8 s of the 10 s used");
    }

    #[test]
    fn the_floor_reached_starts_a_new_period() {
        let t0 = Instant::now();
        let mut p = Progress::new(T);
        p.waiting(t0);
        p.arrived(PROGRESS_FLOOR as usize - 1, || t0 + Duration::from_secs(9));
        p.waiting(t0 + Duration::from_secs(9));
        p.arrived(1, || t0 + Duration::from_millis(9500));
        let now = t0 + Duration::from_secs(20);
        assert_eq!(p.waiting(now), now + T);
    }

    #[test]
    fn time_not_spent_waiting_on_the_client_does_not_count() {
        let t0 = Instant::now();
        let mut p = Progress::new(T);
        p.waiting(t0);
        p.arrived(10, || t0 + Duration::from_secs(4));
        // The application did not read for a minute: the proxy was not waiting on the client.
        let later = t0 + Duration::from_secs(64);
        assert_eq!(p.waiting(later), later + Duration::from_secs(6));
    }

    #[test]
    fn a_stalled_body_is_found_in_an_error_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] RequestBodyError);
        let e = Outer(BodyStalled(T).into());
        assert!(BodyStalled::in_chain(&e));
        let io = std::io::Error::other("x");
        assert!(!BodyStalled::in_chain(&io));
    }
}
