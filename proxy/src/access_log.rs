//! The access log: one JSON line per request on stdout, written by a background thread so the request path never
//! waits on a pipe.
//!
//! ```json
//! {"time":"2026-12-02T06:30:00.123456Z","log":"access","client":"team-a/acme","source":"203.0.113.7",
//!  "method":"GET","path":"/v1/orders","status":200,"reason":"allowed","upstream_ms":0.41,"total_ms":0.52,"bytes":1234}
//! ```
//!
//! - `client`: the client the key (or certificate) identified, also on refusals after identification
//!   (`source_not_allowed`, `rate_limited`…); `"-"` when none was (unknown key, no table).
//! - `source`: the client address the decision used (the peer, a trusted PROXY header's source, or the forwarded
//!   address from a trusted hop).
//! - `path`: the normalised path the decision saw, without the query (which may carry the key as a parameter); for a
//!   path refused as invalid, the path as received, cut at 256 bytes. Never the key, never a header value.
//! - `reason`: `allowed`, or the refusal's reason code (the same as the 4xx/5xx body's `reason`).
//! - `upstream_ms`: from sending to the application to its response headers (absent when not forwarded);
//!   `total_ms`: from the request head to the last byte of the response body (or its abandonment); `bytes`: response
//!   body bytes sent.
//!
//! Every refusal is logged; allowed requests are sampled (`--access-log-sample`, exactly ⌊n × fraction⌋ of n).
//! Lines are written in batches at most [`FLUSH_EVERY`] apart; when stdout cannot keep up, lines beyond
//! [`MAX_PENDING`] bytes are dropped and counted (`portcullis_proxy_access_log_dropped_total`), requests are never
//! slowed.

use crate::decision::Reason;
use crate::respond::Body;
use bytes::Bytes;
use http::Method;
use hyper::body::{Frame, SizeHint};
use std::io::Write;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Longest raw (un-normalisable) path logged.
const MAX_RAW_PATH: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessLogFormat {
    /// One JSON object per line.
    Json,
    /// No access log.
    Off,
}

/// `--access-log` and `--access-log-sample`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AccessLogSettings {
    pub format: AccessLogFormat,
    /// Fraction of allowed requests logged, 0..=1 (refusals: all).
    pub sample: f64,
}

impl Default for AccessLogSettings {
    fn default() -> Self {
        Self { format: AccessLogFormat::Off, sample: 1.0 }
    }
}

/// Parses a `--access-log-sample` value: a fraction from 0 to 1.
pub fn parse_sample(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number from 0 to 1"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{s:?} must be from 0 to 1 (the fraction of allowed requests logged)"));
    }
    Ok(v)
}

/// Picks exactly ⌊n × fraction⌋ of n allowed requests, spread evenly (no randomness: tests can count).
pub struct Sampler {
    per_million: u64,
    seen: AtomicU64,
}

impl Sampler {
    pub fn new(fraction: f64) -> Self {
        Self { per_million: (fraction.clamp(0.0, 1.0) * 1e6).round() as u64, seen: AtomicU64::new(0) }
    }

    pub fn take(&self) -> bool {
        match self.per_million {
            0 => false,
            1_000_000 => true,
            p => {
                let i = self.seen.fetch_add(1, Ordering::Relaxed);
                (i + 1) * p / 1_000_000 > i * p / 1_000_000
            }
        }
    }
}

/// How often the writer thread writes what has been logged since (the most a line waits).
const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// Bytes waiting for the writer beyond which new lines are dropped (and counted), so a stuck stdout costs bounded
/// memory and never blocks a request.
const MAX_PENDING: usize = 8 << 20;

/// Lines are appended to one shared buffer (a short lock, no allocation, no wake-up) and written by a thread that
/// wakes every [`FLUSH_EVERY`]: a request never waits on stdout and never makes a system call for the log. (A
/// channel per line, as in `tracing-appender`, costs an allocation and often a futex wake-up per request; measured
/// with `cargo xtask bench throughput`, arm P1L.)
pub struct AccessLog {
    shared: Arc<Pending>,
    sampler: Sampler,
    writer: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Pending {
    buf: Mutex<Vec<u8>>,
    dropped: AtomicU64,
    stop: AtomicBool,
}

impl AccessLog {
    /// `None` when the log is off.
    pub fn stdout(settings: AccessLogSettings) -> Option<Arc<Self>> {
        Self::to_writer(settings, std::io::stdout())
    }

    /// Lines go to `out`, written in batches by a background thread.
    pub fn to_writer(settings: AccessLogSettings, mut out: impl Write + Send + 'static) -> Option<Arc<Self>> {
        if settings.format == AccessLogFormat::Off {
            return None;
        }
        let shared = Arc::new(Pending::default());
        let pending = shared.clone();
        let writer = std::thread::Builder::new()
            .name("portcullis-access-log".into())
            .spawn(move || {
                let mut spare = Vec::with_capacity(64 * 1024);
                loop {
                    let stopping = pending.stop.load(Ordering::Acquire);
                    std::mem::swap(&mut *pending.buf.lock().unwrap_or_else(|e| e.into_inner()), &mut spare);
                    if !spare.is_empty() {
                        // A failing stdout (closed pipe) loses these lines; requests are unaffected.
                        let _ = out.write_all(&spare).and_then(|()| out.flush());
                        spare.clear();
                    }
                    if stopping {
                        break;
                    }
                    std::thread::park_timeout(FLUSH_EVERY);
                }
            })
            .ok()?;
        Some(Arc::new(Self { shared, sampler: Sampler::new(settings.sample), writer: Some(writer) }))
    }

    /// Lines dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Whether an allowed request is logged (refusals always are).
    pub fn sample_allowed(&self) -> bool {
        self.sampler.take()
    }

    fn write(&self, e: &Entry, bytes: u64, total: Duration) {
        thread_local! {
            static LINE: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(512));
        }
        LINE.with_borrow_mut(|line| {
            line.clear();
            e.render(bytes, total, line);
            let mut buf = self.shared.buf.lock().unwrap_or_else(|e| e.into_inner());
            if buf.len() + line.len() > MAX_PENDING {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            } else {
                buf.extend_from_slice(line);
            }
        });
    }
}

impl Drop for AccessLog {
    /// Writes what is pending, then stops the writer.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(w) = self.writer.take() {
            w.thread().unpark();
            let _ = w.join();
        }
    }
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog").field("dropped", &self.dropped()).finish_non_exhaustive()
    }
}

/// What is known about a request when its response starts; the line is written when the response body ends.
pub struct Entry {
    pub time: jiff::Timestamp,
    pub start: Instant,
    pub client: Option<http::HeaderValue>,
    pub source: IpAddr,
    pub method: Method,
    pub path: String,
    pub status: u16,
    pub reason: Option<Reason>,
    pub upstream: Option<Duration>,
}

impl Entry {
    fn render(&self, bytes: u64, total: Duration, out: &mut Vec<u8>) {
        let client = self.client.as_ref().and_then(|c| c.to_str().ok()).unwrap_or("-");
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let _ = write!(out, "{{\"time\":\"{}\",\"log\":\"access\",\"client\":", self.time);
        let _ = serde_json::to_writer(&mut *out, client);
        let _ = write!(out, ",\"source\":\"{}\",\"method\":", self.source);
        let _ = serde_json::to_writer(&mut *out, self.method.as_str());
        out.extend_from_slice(b",\"path\":");
        let _ = serde_json::to_writer(&mut *out, &self.path);
        let reason = self.reason.map_or("allowed", Reason::code);
        let _ = write!(out, ",\"status\":{},\"reason\":\"{reason}\"", self.status);
        if let Some(u) = self.upstream {
            let _ = write!(out, ",\"upstream_ms\":{}", ms(u));
        }
        let _ = writeln!(out, ",\"total_ms\":{},\"bytes\":{bytes}}}", ms(total));
    }
}

/// The path to log for a request whose path could not be normalised: as received, without the query, cut short.
pub fn raw_path(path: &str) -> String {
    let mut end = path.len().min(MAX_RAW_PATH);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    path[..end].to_string()
}

/// A response body that counts its bytes and writes the access-log line when it ends (or is dropped unfinished).
pub struct Logged {
    inner: Body,
    bytes: u64,
    entry: Option<Entry>,
    log: Arc<AccessLog>,
}

impl Logged {
    pub fn new(inner: Body, entry: Entry, log: Arc<AccessLog>) -> Self {
        Self { inner, bytes: 0, entry: Some(entry), log }
    }

    fn finish(&mut self) {
        if let Some(e) = self.entry.take() {
            self.log.write(&e, self.bytes, e.start.elapsed());
        }
    }
}

impl hyper::body::Body for Logged {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(_) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_sampler_takes_exactly_the_fraction() {
        for (f, n, want) in [(0.0, 1000, 0), (1.0, 1000, 1000), (0.1, 1000, 100), (0.25, 10, 2), (0.333, 3000, 999)] {
            let s = Sampler::new(f);
            assert_eq!((0..n).filter(|_| s.take()).count(), want, "{f} of {n}");
        }
        assert!(parse_sample("1.5").is_err() && parse_sample("-0.1").is_err() && parse_sample("x").is_err());
        assert_eq!(parse_sample("0.01"), Ok(0.01));
    }

    #[test]
    fn a_line_has_every_field_and_escapes_what_the_client_sent() {
        let e = Entry {
            time: "2026-12-02T06:30:00.5Z".parse().unwrap(),
            start: Instant::now(),
            client: Some(http::HeaderValue::from_static("team-a/acme")),
            source: "203.0.113.7".parse().unwrap(),
            method: Method::from_bytes(b"PURGE").unwrap(),
            path: "/v1/\"quoted\"\\".into(),
            status: 429,
            reason: Some(Reason::RateLimited),
            upstream: None,
        };
        let mut out = Vec::new();
        e.render(17, Duration::from_micros(1500), &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"time": "2026-12-02T06:30:00.5Z", "log": "access", "client": "team-a/acme",
                "source": "203.0.113.7", "method": "PURGE", "path": "/v1/\"quoted\"\\", "status": 429,
                "reason": "rate_limited", "total_ms": 1.5, "bytes": 17})
        );
        assert!(out.ends_with(b"}\n"));
        assert_eq!(raw_path(&"é".repeat(200)).len(), 256);
    }

    #[tokio::test]
    async fn the_line_is_written_when_the_body_ends_with_its_byte_count() {
        let sink = Sink::default();
        let log = AccessLog::to_writer(AccessLogSettings { format: AccessLogFormat::Json, sample: 1.0 }, sink.clone())
            .unwrap();
        let body: Body = Full::new(Bytes::from_static(b"hello world")).map_err(|never| match never {}).boxed();
        let entry = Entry {
            time: jiff::Timestamp::now(),
            start: Instant::now(),
            client: None,
            source: "127.0.0.1".parse().unwrap(),
            method: Method::GET,
            path: "/x".into(),
            status: 200,
            reason: None,
            upstream: Some(Duration::from_millis(2)),
        };
        let collected = Logged::new(body, entry, log.clone()).collect().await.unwrap().to_bytes();
        assert_eq!(&collected[..], b"hello world");
        drop(log); // joins the writer thread: everything queued is written
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 1, "{text}");
        assert_eq!(lines[0]["bytes"], 11);
        assert_eq!(lines[0]["client"], "-");
        assert_eq!(lines[0]["reason"], "allowed");
        assert_eq!(lines[0]["upstream_ms"], 2.0);
    }

    #[test]
    fn off_is_no_log() {
        assert!(AccessLog::to_writer(AccessLogSettings::default(), Sink::default()).is_none());
    }
}
