//! The application's own probes, run by the sidecar on loopback for the kubelet (`/app-health/...` on the admin
//! port). The webhook rewrites the probes of a pod annotated `portcullis.dev/app-loopback: "true"` to those paths
//! and passes the originals in `PORTCULLIS_APP_PROBES` (format: [`portcullis_table::sidecar`]).
//!
//! `httpGet`: one `GET` to `127.0.0.1:<port><path>` with the probe's headers (a `Host` header among them replaces
//! the default `127.0.0.1:<port>`), the kubelet's `User-Agent` passed on; 2xx and 3xx are success, redirects are not
//! followed, the body is not read. `tcpSocket`: a connection to `127.0.0.1:<port>` is success. Either way the
//! probe's `timeoutSeconds` bounds the whole attempt. Only the configured probes run: the admin caller chooses a
//! path among them, never a port, path or header.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use portcullis_table::sidecar::AppProbe;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::net::TcpStream;

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The app answered with this (2xx/3xx) status, or accepted the connection (`None`).
    Healthy(Option<u16>),
    /// The app answered with this status (4xx/5xx).
    Unhealthy(u16),
    /// No answer: connection refused, timeout, broken response.
    Failed(String),
}

impl Outcome {
    pub fn is_healthy(&self) -> bool {
        matches!(self, Outcome::Healthy(_))
    }

    /// One line for the kubelet (it records failed probes' bodies in Events).
    pub fn describe(&self) -> String {
        match self {
            Outcome::Healthy(Some(s)) => format!("ok: the app answered {s}\n"),
            Outcome::Healthy(None) => "ok: the app accepted a connection\n".into(),
            Outcome::Unhealthy(s) => format!("unhealthy: the app answered {s}\n"),
            Outcome::Failed(e) => format!("unhealthy: {e}\n"),
        }
    }
}

/// Runs `probe` against the app on loopback; `user_agent` is the caller's (the kubelet's `kube-probe/1.x`).
pub async fn run(probe: &AppProbe, user_agent: Option<&HeaderValue>) -> Outcome {
    let timeout = Duration::from_secs(u64::from(probe.timeout_seconds.max(1)));
    match tokio::time::timeout(timeout, attempt(probe, user_agent)).await {
        Ok(o) => o,
        Err(_) => Outcome::Failed(format!("no answer within {}s", timeout.as_secs())),
    }
}

async fn attempt(probe: &AppProbe, user_agent: Option<&HeaderValue>) -> Outcome {
    let port = match (&probe.http_get, &probe.tcp_socket) {
        (Some(h), _) => h.port,
        (None, Some(t)) => t.port,
        (None, None) => return Outcome::Failed("probe without a handler".into()),
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(format!("connecting to {addr}: {e}")),
    };
    let Some(h) = &probe.http_get else { return Outcome::Healthy(None) };
    let mut req = Request::builder().method(Method::GET).uri(h.path.as_str()).header(header::HOST, addr.to_string());
    if let Some(ua) = user_agent {
        req = req.header(header::USER_AGENT, ua.clone());
    }
    let mut req = match req.body(Empty::<Bytes>::new()) {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(format!("probe path {:?}: {e}", h.path)),
    };
    for hd in &h.http_headers {
        // Validated when the configuration was parsed; a header that still does not convert is skipped.
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(hd.name.as_bytes()), HeaderValue::from_str(&hd.value)) {
            req.headers_mut().insert(n, v);
        }
    }
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok(v) => v,
        Err(e) => return Outcome::Failed(format!("HTTP to {addr}: {e}")),
    };
    let conn = tokio::spawn(conn);
    let outcome = match sender.send_request(req).await {
        Ok(resp) => {
            let s = resp.status().as_u16();
            if (200..400).contains(&s) { Outcome::Healthy(Some(s)) } else { Outcome::Unhealthy(s) }
        }
        Err(e) => Outcome::Failed(format!("HTTP to {addr}: {e}")),
    };
    // The body is not needed: drop the connection.
    conn.abort();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_table::sidecar::{HttpGetProbe, ProbeHeader, TcpSocketProbe};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// An app on loopback answering every request with `status`, sending back the request head it saw.
    async fn app(status: u16) -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let Ok(n) = s.read(&mut buf).await else { return };
                        if n == 0 {
                            return;
                        }
                        head.extend_from_slice(&buf[..n]);
                    }
                    let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                    let _ = s.write_all(format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\n\r\nhi").as_bytes()).await;
                });
            }
        });
        (port, rx)
    }

    fn http(port: u16, path: &str) -> AppProbe {
        AppProbe {
            http_get: Some(HttpGetProbe {
                port,
                path: path.into(),
                http_headers: vec![ProbeHeader { name: "X-Probe".into(), value: "1".into() }],
            }),
            tcp_socket: None,
            timeout_seconds: 1,
        }
    }

    #[tokio::test]
    async fn http_probes_forward_path_headers_and_judge_the_status() {
        let (port, mut seen) = app(204).await;
        let ua = HeaderValue::from_static("kube-probe/1.37");
        assert_eq!(run(&http(port, "/healthz?deep=1"), Some(&ua)).await, Outcome::Healthy(Some(204)));
        let head = seen.recv().await.unwrap().to_ascii_lowercase();
        assert!(head.starts_with("get /healthz?deep=1 http/1.1\r\n"), "{head}");
        assert!(head.contains("x-probe: 1") && head.contains("user-agent: kube-probe/1.37"), "{head}");
        assert!(head.contains(&format!("host: 127.0.0.1:{port}")), "{head}");
        let (port, _seen) = app(302).await;
        assert!(run(&http(port, "/"), None).await.is_healthy(), "3xx is success, not followed");
        let (port, _seen) = app(500).await;
        assert_eq!(run(&http(port, "/"), None).await, Outcome::Unhealthy(500));
    }

    #[tokio::test]
    async fn tcp_probes_connect_and_failures_are_described() {
        let (port, _seen) = app(200).await;
        let tcp = |port| AppProbe { http_get: None, tcp_socket: Some(TcpSocketProbe { port }), timeout_seconds: 1 };
        assert_eq!(run(&tcp(port), None).await, Outcome::Healthy(None));
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let o = run(&tcp(closed), None).await;
        assert!(!o.is_healthy() && o.describe().contains("connecting to 127.0.0.1"), "{o:?}");
        // A listener that never answers: the probe's timeout bounds it.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let started = std::time::Instant::now();
        let o = run(&http(silent.local_addr().unwrap().port(), "/"), None).await;
        assert!(matches!(o, Outcome::Failed(ref e) if e.contains("within 1s")), "{o:?}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
