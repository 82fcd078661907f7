//! Connection I/O: replaying bytes read while sniffing (a PROXY header, the HTTP/2 preface), telling HTTP/1.1 from
//! HTTP/2 by the first bytes, and the request count that drives the idle timeout.
//!
//! Idle means *no request in progress*: a request counts from its head until its response body has been sent (or
//! dropped). Bytes on the wire do not count, so HTTP/2 PINGs — the client's, or the answers to the server's own
//! keep-alive PINGs — do not keep a connection with no open stream alive.

use bytes::{Buf, Bytes};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

pub(crate) fn now_millis() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// Per-connection request count, and since when none has been in progress.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    idle_since: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self { in_flight: AtomicUsize::new(0), idle_since: AtomicU64::new(now_millis()) }
    }
}

impl Activity {
    /// No request in progress, and none for at least `d`.
    pub fn idle_for(&self, d: Duration) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && now_millis().saturating_sub(self.idle_since.load(Ordering::Relaxed)) >= d.as_millis() as u64
    }

    /// Requests in progress (HTTP/2: open streams).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

/// One request in progress; the connection is idle again (from now) when the last one is dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl InFlight {
    pub fn new(a: Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(a)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Stored before the decrement: whoever sees the count reach 0 sees this time or a later one.
        self.0.idle_since.store(now_millis(), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Replays `prefix` (bytes read while sniffing for a PROXY header) before reading from `inner`.
pub struct ConnIo<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> ConnIo<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ConnIo<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

macro_rules! forward_write {
    () => {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, data)
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
        }
        fn is_write_vectored(&self) -> bool {
            self.inner.is_write_vectored()
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    };
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ConnIo<S> {
    forward_write!();
}

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// What the first bytes of a connection say: `None` while they are still a strict prefix of the HTTP/2 preface.
pub fn classify(first: &[u8]) -> Option<Protocol> {
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] != H2_PREFACE[..n] {
        Some(Protocol::Http1)
    } else if n == H2_PREFACE.len() {
        Some(Protocol::Http2)
    } else {
        None
    }
}

/// A stream whose first bytes (at most the 24 of the HTTP/2 preface) were read to tell the protocol, and are
/// replayed before the rest. Inline: no allocation per connection.
pub struct Sniffed<S> {
    head: [u8; 24],
    pos: u8,
    len: u8,
    inner: S,
}

/// Reads until the first bytes tell HTTP/1.1 from HTTP/2 (one read for an HTTP/1.1 request, the 24-byte preface for
/// HTTP/2). A connection closed before that is an `UnexpectedEof` error. Unbounded in time: the caller puts a
/// deadline on it.
pub async fn sniff<S: AsyncRead + Unpin>(mut inner: S) -> io::Result<(Protocol, Sniffed<S>)> {
    let mut head = [0u8; 24];
    let mut len = 0;
    loop {
        let n = inner.read(&mut head[len..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        len += n;
        if let Some(p) = classify(&head[..len]) {
            return Ok((p, Sniffed { head, pos: 0, len: len as u8, inner }));
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Sniffed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.pos < self.len {
            let (pos, len) = (self.pos as usize, self.len as usize);
            let n = (len - pos).min(buf.remaining());
            buf.put_slice(&self.head[pos..pos + n]);
            self.pos += n as u8;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sniffed<S> {
    forward_write!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn classification_by_first_bytes() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"PRI * HTTP/2.0"), None, "only part of the preface: undecided");
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r"), None);
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\x12\x04"), Some(Protocol::Http2));
        assert_eq!(classify(b"G"), Some(Protocol::Http1));
        assert_eq!(classify(b"POST / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"PRI / HTTP/1.1\r\n"), Some(Protocol::Http1));
    }

    #[tokio::test]
    async fn sniffed_bytes_are_replayed_then_the_rest() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let sniffing = tokio::spawn(sniff(b));
        let (p, mut s) = sniffing.await.unwrap().unwrap();
        assert_eq!(p, Protocol::Http1);
        a.write_all(b"Host: x\r\n\r\n").await.unwrap();
        drop(a);
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    }

    #[tokio::test]
    async fn the_preface_arriving_in_pieces_is_waited_for() {
        let (mut a, b) = tokio::io::duplex(64);
        let sniffing = tokio::spawn(sniff(b));
        for piece in H2_PREFACE.chunks(5) {
            a.write_all(piece).await.unwrap();
            tokio::task::yield_now().await;
        }
        a.write_all(b"\0\0\0\x04\0\0\0\0\0").await.unwrap();
        drop(a);
        let (p, mut s) = sniffing.await.unwrap().unwrap();
        assert_eq!(p, Protocol::Http2);
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        assert_eq!(&all[..24], H2_PREFACE);
        assert_eq!(all.len(), 33);
    }

    #[tokio::test]
    async fn closing_before_the_protocol_is_known_is_an_error() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"PRI * HTTP/2.0").await.unwrap();
        drop(a);
        let e = sniff(b).await.err().expect("an error");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn idle_counts_requests_not_time_alone() {
        let a = Arc::new(Activity::default());
        assert!(a.idle_for(Duration::ZERO));
        let g1 = InFlight::new(a.clone());
        let g2 = InFlight::new(a.clone());
        assert!(!a.idle_for(Duration::ZERO), "a request in progress is never idle");
        drop(g1);
        assert!(!a.idle_for(Duration::ZERO));
        assert_eq!(a.in_flight(), 1);
        drop(g2);
        assert!(a.idle_for(Duration::ZERO));
        assert!(!a.idle_for(Duration::from_secs(3600)), "the idle clock restarts when the last request ends");
    }
}
