//! Portcullis proxy: the sidecar that checks an API key, the source address, the route, a throttle and a quota
//! before forwarding a request to the application on loopback.

pub mod decision;
