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
use tokio::net::TcpStream;

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

/// A client socket that can move between runtimes: [`Rehome::detach`] deregisters it from the current runtime's I/O
/// driver, [`Rehome::attach`] (called on the destination runtime) registers it there. Between the two it is neither
/// readable nor writable (an error, never a hang). Used to move a connection from its probation thread to its worker
/// once it has sent a request head ([`crate::workers`]); the layers above it (replayed bytes, TLS state) move with it.
pub struct Rehome {
    registered: Option<TcpStream>,
    detached: Option<std::net::TcpStream>,
}

impl Rehome {
    pub fn new(s: TcpStream) -> Self {
        Self { registered: Some(s), detached: None }
    }

    pub fn detach(&mut self) -> io::Result<()> {
        if let Some(s) = self.registered.take() {
            self.detached = Some(s.into_std()?);
        }
        Ok(())
    }

    /// Must run inside the destination runtime.
    pub fn attach(&mut self) -> io::Result<()> {
        if let Some(s) = self.detached.take() {
            self.registered = Some(TcpStream::from_std(s)?);
        }
        Ok(())
    }

    fn io(&mut self) -> io::Result<&mut TcpStream> {
        self.registered.as_mut().ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "socket between runtimes"))
    }
}

impl AsyncRead for Rehome {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.io() {
            Ok(s) => Pin::new(s).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Rehome {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self.io() {
            Ok(s) => Pin::new(s).poll_write(cx, data),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.io() {
            Ok(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io() {
            Ok(s) => Pin::new(s).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io() {
            Ok(s) => Pin::new(s).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// A connection's layers that lead down to its [`Rehome`] socket.
pub trait HasSocket {
    fn socket(&mut self) -> &mut Rehome;
}

impl HasSocket for Rehome {
    fn socket(&mut self) -> &mut Rehome {
        self
    }
}

impl<S: HasSocket> HasSocket for ConnIo<S> {
    fn socket(&mut self) -> &mut Rehome {
        self.inner.socket()
    }
}

impl<S: HasSocket> HasSocket for Sniffed<S> {
    fn socket(&mut self) -> &mut Rehome {
        self.inner.socket()
    }
}

impl<S: HasSocket> HasSocket for tokio_rustls::server::TlsStream<S> {
    fn socket(&mut self) -> &mut Rehome {
        self.get_mut().0.socket()
    }
}

/// Reads, until the end of the first request head (an empty line), more of an HTTP/1.1 connection whose first
/// bytes are in `sniffed`; returns everything read (to be replayed to the HTTP server). Stops early, without an
/// error, after `limit` bytes or at a request line that does not parse: the HTTP server then refuses the head
/// itself (431, 400). Unbounded in time: the caller puts a deadline on it. Each read scans only the new bytes.
pub async fn read_head<S: AsyncRead + Unpin>(io: &mut S, limit: usize) -> io::Result<Bytes> {
    let mut buf = bytes::BytesMut::with_capacity(1024);
    let mut scan = HeadScan::default();
    loop {
        if io.read_buf(&mut buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if scan.done(&buf) || buf.len() >= limit {
            return Ok(buf.freeze());
        }
    }
}

/// Where a request head ends, fed the growing head one read at a time.
#[derive(Default)]
struct HeadScan {
    scanned: usize,
    line_checked: bool,
}

impl HeadScan {
    /// Whether `head` (everything read so far) is complete, or shows already that it is not a request.
    fn done(&mut self, head: &[u8]) -> bool {
        // The request line is parsed on the first read (garbage, such as a TLS ClientHello on a plain port, ends the
        // wait at once) and once more when it is complete.
        let first = self.scanned == 0;
        if !self.line_checked && (first || head[self.scanned..].contains(&b'\n')) {
            self.line_checked = head[self.scanned..].contains(&b'\n');
            let mut none = [];
            match httparse::Request::new(&mut none).parse(head) {
                Ok(httparse::Status::Complete(_)) => return true,
                Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {}
                Err(_) => return true,
            }
        }
        // The head ends at the first empty line: "\n\r\n" or (bare line feeds, which HTTP parsers accept) "\n\n". The
        // last two bytes already scanned are scanned again, for an ending split across reads.
        let from = self.scanned.saturating_sub(2);
        self.scanned = head.len();
        let new = &head[from..];
        new.windows(3).any(|w| w == b"\n\r\n") || new.windows(2).any(|w| w == b"\n\n")
    }
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

    fn scan_in_pieces(head: &[u8], piece: usize) -> Option<usize> {
        let mut scan = HeadScan::default();
        (piece..=head.len()).step_by(piece).chain([head.len()]).find(|&n| scan.done(&head[..n]))
    }

    #[test]
    fn a_head_ends_at_its_empty_line_however_it_is_split() {
        let head = b"GET /v1 HTTP/1.1\r\nHost: a\r\nX-Key: k\r\n\r\nbody";
        let end = head.len() - 4;
        for piece in 1..head.len() {
            let n = scan_in_pieces(head, piece).expect("complete");
            assert!(n >= end && n < end + piece, "piece {piece}: done at {n}");
        }
        assert_eq!(scan_in_pieces(b"GET / HTTP/1.1\nHost: a\n\n", 1), Some(24), "bare line feeds");
        assert_eq!(scan_in_pieces(b"GET / HTTP/1.0\r\n\r\n", 1), Some(18), "no headers");
        assert_eq!(scan_in_pieces(b"GET /v1 HTTP/1.1\r\nHost: a\r\nX-Slow: aaaa", 1), None, "incomplete");
    }

    #[test]
    fn a_request_line_that_does_not_parse_ends_the_wait() {
        assert_eq!(
            scan_in_pieces(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\nrest", 1),
            Some(1),
            "TLS on a plain port"
        );
        assert_eq!(scan_in_pieces(b"GET /a b c\r\nHost: a\r\n", 1), Some(12));
    }

    #[tokio::test]
    async fn read_head_returns_everything_read_and_stops_at_the_limit() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
        let got = read_head(&mut server, 1024).await.unwrap();
        assert_eq!(&got[..], b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(&[b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 2000]].concat()).await.unwrap();
        let got = read_head(&mut server, 100).await.unwrap();
        assert!(got.len() >= 100, "stops once over the limit: {}", got.len());
        drop(client);
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        assert_eq!(read_head(&mut server, 100).await.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

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
