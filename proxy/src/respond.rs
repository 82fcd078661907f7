//! Responses the proxy writes itself: constant JSON bodies, never anything from the request.

use crate::decision::Denial;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};

/// The body type of every response the proxy sends (the application's, streamed, or one of its own).
pub type Body = BoxBody<Bytes, hyper::Error>;

pub fn json_response(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub fn denial_response(d: &Denial) -> Response<Body> {
    let status = StatusCode::from_u16(d.reason.status()).expect("valid status");
    let mut r = json_response(status, d.reason.body());
    let h = r.headers_mut();
    if let Some(s) = d.retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    if let Some(rl) = &d.rate_limit {
        if let Ok(v) = HeaderValue::from_str(&rl.policy) {
            h.insert(HeaderName::from_static("ratelimit-policy"), v);
        }
        if let Ok(v) = HeaderValue::from_str(&rl.state) {
            h.insert(HeaderName::from_static("ratelimit"), v);
        }
    }
    r
}
