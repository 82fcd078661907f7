//! Upgraded connections (HTTP/1.1 `Upgrade`, i.e. WebSocket): which protocols may be upgraded to, and the tunnel
//! that copies bytes both ways once the application has answered 101.
//!
//! Policy ([`judge`]): the request's `Upgrade` tokens (protocol name before any `/version`, case-insensitive) must
//! all be in `--upgrade-protocols` (default `websocket`). An `Upgrade` listing only `h2c` is treated as absent
//! (RFC 9113 §3.1 deprecates the h2c upgrade; the proxy does not speak it, so the request is served as the HTTP/1.1
//! request it also is, as nginx does), so `curl --http2` against a plain listener still works. Anything else (an
//! unknown protocol, `h2c` next to another protocol, `TLS/1.0`, ...) is refused with 400 `upgrade_not_allowed`
//! after the access decision. The application's 101 must name an allowed protocol too, or the client gets 502 and
//! no tunnel.
//!
//! Lifetime: the tunnel runs in the client connection's own task after the HTTP/1.1 connection hands its socket
//! over, so it holds that connection's `--max-connections` slot (and its `--max-connections-per-source` count) for
//! as long as it lives. It is closed when no byte has crossed it in either direction for `--tunnel-idle-timeout`,
//! and as soon as shutdown begins: a tunnel has no end to wait for, and holding the process for the whole grace
//! period would only delay the client's reconnection (to another replica).

use crate::io::now_millis;
use http::HeaderMap;
use http::header::{self, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

/// `--upgrade-protocols`: lowercase protocol names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeProtocols(Vec<String>);

impl Default for UpgradeProtocols {
    fn default() -> Self {
        Self(vec!["websocket".to_string()])
    }
}

impl UpgradeProtocols {
    /// A comma-separated list of protocol names; empty allows no upgrade at all. `h2c` cannot be allowed: the proxy
    /// would then pass HTTP/2 requests through a tunnel without checking them.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut names = Vec::new();
        for t in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if !t.bytes().all(is_tchar) {
                return Err(format!("{t:?} is not a protocol name"));
            }
            let t = t.to_ascii_lowercase();
            if t == "h2c" {
                return Err("h2c cannot be allowed: requests inside the tunnel would not be checked".to_string());
            }
            if !names.contains(&t) {
                names.push(t);
            }
        }
        Ok(Self(names))
    }

    pub fn none() -> Self {
        Self(Vec::new())
    }

    fn allows(&self, token: &str) -> bool {
        let name = token.split('/').next().unwrap_or(token);
        self.0.iter().any(|a| a.eq_ignore_ascii_case(name))
    }

    pub fn names(&self) -> &[String] {
        &self.0
    }
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// What to do with an HTTP/1.1 request that asks to upgrade (`Connection: upgrade` and `Upgrade`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward `Upgrade` and `Connection: upgrade`; tunnel on a 101.
    Pass,
    /// Serve it as a plain request: `Upgrade` is dropped with the other hop-by-hop headers.
    Strip,
    /// 400 `upgrade_not_allowed`.
    Refuse,
}

fn tokens(values: header::GetAll<'_, HeaderValue>) -> impl Iterator<Item = &str> {
    values
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{0}"))
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The request's fate under `allowed` (call only for requests that ask to upgrade).
pub fn judge(headers: &HeaderMap, allowed: &UpgradeProtocols) -> Verdict {
    let (mut any, mut only_h2c, mut all_allowed) = (false, true, true);
    for t in tokens(headers.get_all(header::UPGRADE)) {
        any = true;
        only_h2c &= t.eq_ignore_ascii_case("h2c");
        all_allowed &= allowed.allows(t);
    }
    if !any || only_h2c {
        Verdict::Strip
    } else if all_allowed {
        Verdict::Pass
    } else {
        Verdict::Refuse
    }
}

/// Whether the application's 101 switches to exactly one allowed protocol.
pub fn response_allowed(headers: &HeaderMap, allowed: &UpgradeProtocols) -> bool {
    let mut it = tokens(headers.get_all(header::UPGRADE));
    matches!((it.next(), it.next()), (Some(t), None) if allowed.allows(t))
}

/// The two halves of a tunnel, set by the request that got a 101 and taken by its connection once the HTTP/1.1
/// connection has ended. The lock is never held across an await.
#[derive(Default)]
pub struct Pending(Mutex<Option<(OnUpgrade, OnUpgrade)>>);

impl Pending {
    pub fn set(&self, client: OnUpgrade, upstream: OnUpgrade) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((client, upstream));
    }

    pub fn take(&self) -> Option<(OnUpgrade, OnUpgrade)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// How a tunnel ended.
#[derive(Debug)]
pub enum End {
    /// One side closed (or failed): `Ok` with the bytes copied client→upstream and back.
    Closed(io::Result<(u64, u64)>),
    /// No byte either way for the idle timeout.
    Idle,
    /// Shutdown began.
    Shutdown,
    /// An upgrade did not complete.
    Failed(hyper::Error),
}

/// Runs a tunnel until a side closes, it has been idle for `idle`, or `stop` flips.
pub async fn run(client: OnUpgrade, upstream: OnUpgrade, idle: Duration, mut stop: watch::Receiver<bool>) -> End {
    if *stop.borrow() {
        return End::Shutdown;
    }
    let (c, u) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => return End::Failed(e),
    };
    let last = Arc::new(AtomicU64::new(now_millis()));
    let mut c = Touching { inner: TokioIo::new(c), last: last.clone() };
    let mut u = Touching { inner: TokioIo::new(u), last: last.clone() };
    let copy = tokio::io::copy_bidirectional(&mut c, &mut u);
    let mut copy = std::pin::pin!(copy);
    let mut check = tokio::time::interval((idle / 4).max(Duration::from_millis(10)));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let idle_ms = idle.as_millis() as u64;
    loop {
        tokio::select! {
            r = copy.as_mut() => return End::Closed(r),
            _ = stop.changed() => return End::Shutdown,
            _ = check.tick() => {
                if now_millis().saturating_sub(last.load(Ordering::Relaxed)) >= idle_ms {
                    return End::Idle;
                }
            }
        }
    }
}

/// Records the time of every read that returned bytes (each byte crossing the tunnel is read once).
struct Touching<S> {
    inner: S,
    last: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Touching<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last.store(now_millis(), Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Touching<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        for v in values {
            h.append(header::UPGRADE, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn websocket_passes_by_default() {
        let ws = UpgradeProtocols::default();
        assert_eq!(judge(&upgrade(&["websocket"]), &ws), Verdict::Pass);
        assert_eq!(judge(&upgrade(&["WebSocket"]), &ws), Verdict::Pass);
        assert_eq!(judge(&upgrade(&["websocket/13"]), &ws), Verdict::Pass, "a version does not change the name");
    }

    #[test]
    fn h2c_alone_is_ignored_anything_else_refused() {
        let ws = UpgradeProtocols::default();
        assert_eq!(judge(&upgrade(&["h2c"]), &ws), Verdict::Strip);
        assert_eq!(judge(&upgrade(&["H2C"]), &ws), Verdict::Strip);
        assert_eq!(judge(&upgrade(&["h2c", "h2c"]), &ws), Verdict::Strip);
        assert_eq!(judge(&upgrade(&[""]), &ws), Verdict::Strip, "an empty Upgrade asks for nothing");
        assert_eq!(judge(&upgrade(&["websocket, h2c"]), &ws), Verdict::Refuse);
        assert_eq!(judge(&upgrade(&["websocket", "h2c"]), &ws), Verdict::Refuse, "every header line counts");
        assert_eq!(judge(&upgrade(&["TLS/1.0"]), &ws), Verdict::Refuse);
        assert_eq!(judge(&upgrade(&["HTTP/2.0"]), &ws), Verdict::Refuse);
        assert_eq!(judge(&upgrade(&["websocketx"]), &ws), Verdict::Refuse);
        assert_eq!(judge(&upgrade(&["websocket"]), &UpgradeProtocols::none()), Verdict::Refuse);
        let mut h = upgrade(&[]);
        h.insert(header::UPGRADE, HeaderValue::from_bytes(b"websocket\xff").unwrap());
        assert_eq!(judge(&h, &ws), Verdict::Refuse, "a non-ASCII value is not an allowed protocol");
    }

    #[test]
    fn the_list_is_parsed_and_h2c_cannot_be_allowed() {
        assert_eq!(UpgradeProtocols::parse("websocket").unwrap(), UpgradeProtocols::default());
        assert_eq!(UpgradeProtocols::parse(" WebSocket , websocket,").unwrap(), UpgradeProtocols::default());
        assert_eq!(UpgradeProtocols::parse("").unwrap(), UpgradeProtocols::none());
        let two = UpgradeProtocols::parse("websocket,x-custom").unwrap();
        assert_eq!(judge(&upgrade(&["x-custom"]), &two), Verdict::Pass);
        assert!(UpgradeProtocols::parse("h2c").unwrap_err().contains("not be checked"));
        assert!(UpgradeProtocols::parse("web socket").is_err());
        assert!(UpgradeProtocols::parse("a/b").is_err());
    }

    #[test]
    fn the_applications_101_must_name_one_allowed_protocol() {
        let ws = UpgradeProtocols::default();
        let mut h = HeaderMap::new();
        assert!(!response_allowed(&h, &ws));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(response_allowed(&h, &ws));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(!response_allowed(&h, &ws));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket, h2c"));
        assert!(!response_allowed(&h, &ws));
    }
}
