//! The HTTP client for `POST {endpoint}/v1/batch`: Basic auth with the write key and a trailing
//! colon, JSON body, optional gzip, a timeout per request.

use base64::Engine;
use reqwest::header::{self, HeaderMap, HeaderValue};
use std::sync::Arc;
use std::time::Duration;

use super::batch::{Bodies, Body};

use crate::backoff::parse_retry_after;
use crate::config::WriteKey;
use crate::transport::Transport;

/// What Segment said (or that it could not be reached).
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    /// `None` for a connect error, reset, or timeout.
    pub status: Option<u16>,
    pub retry_after: Option<Duration>,
    /// A short description for status and logs (never includes headers).
    pub detail: String,
}

#[derive(Clone)]
pub(crate) struct Client {
    http: reqwest::Client,
    url: String,
    /// Builds the bodies (gzip or not), sharing compressors between this client's requests.
    bodies: Arc<Bodies>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("url", &self.url).finish()
    }
}

impl Client {
    /// `transport`: the proxy and extra CA roots of `[segment]` (see [`crate::transport`]).
    pub(crate) fn new(
        endpoint: &str,
        key: &WriteKey,
        timeout: Duration,
        gzip: bool,
        // Idle connections kept per host: the most requests ever in flight, so each one reuses
        // a warm connection (no TCP or TLS handshake per request).
        pool_size: usize,
        transport: &Transport,
    ) -> Result<Client, reqwest::Error> {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{}:", key.expose()));
        let mut auth = HeaderValue::from_str(&format!("Basic {token}"))
            .unwrap_or_else(|_| HeaderValue::from_static("Basic"));
        // Keeps the value out of reqwest's Debug output.
        auth.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, auth);
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let http = transport
            .client_builder()
            .default_headers(headers)
            .user_agent(concat!(
                "leanplum-segment-agent/",
                env!("CARGO_PKG_VERSION")
            ))
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(pool_size)
            .build()?;
        Ok(Client {
            http,
            url: format!("{}/v1/batch", endpoint.trim_end_matches('/')),
            bodies: Arc::new(Bodies::new(gzip)),
        })
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// The request body for `events` (serialized track events) sent at `sent_at`, gzipped when
    /// `segment.gzip` says so.
    pub(crate) fn body<'a, I>(&self, events: I, sent_at: &str) -> Body
    where
        I: IntoIterator<Item = &'a [u8]>,
        I::IntoIter: Clone,
    {
        self.bodies.build(events, sent_at)
    }

    /// Sends one request body (see [`Client::body`]).
    pub(crate) async fn send(&self, body: Body) -> Answer {
        let mut req = self.http.post(&self.url);
        if body.gzipped {
            req = req.header(header::CONTENT_ENCODING, "gzip");
        }
        match req.body(body.bytes).send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, crate::clock::now()));
                let text = resp.text().await.unwrap_or_default();
                let mut detail = format!("HTTP {status}");
                let text = text.trim();
                if !(200..300).contains(&status) && !text.is_empty() {
                    detail.push_str(": ");
                    detail.extend(text.chars().take(200));
                }
                Answer {
                    status: Some(status),
                    retry_after,
                    detail,
                }
            }
            Err(e) => Answer {
                status: None,
                retry_after: None,
                detail: describe(&e),
            },
        }
    }
}

/// A one-line reason for a transport failure. reqwest's Display includes the URL (no secrets
/// there: the key travels in a header), and the source chain says what actually happened.
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect error"
    } else {
        "request error"
    };
    crate::transport::with_causes(kind.to_string(), e)
}
