//! Leanplum's content API, read-only: `getMessages`, `getAbTests` and `getMessage`.
//!
//! Calls are `GET {api_base}/api?appId=..&clientKey=..&apiVersion=1.0.6&action=..`, the form
//! Leanplum documents (and the one `curl` users save as `messages.json`). The content key travels
//! in the query string, so every error this module returns is built without the URL (reqwest's
//! `without_url`) and with the key scrubbed from any text the server sent back: a failed call
//! can be logged and shown in `status` as it is.

use std::time::Duration;

use super::Id;
use super::catalog::{API_FAILURE, AbTest, Catalog, LookupError, Message, says_not_found};
use crate::config::Secret;
use crate::transport::Transport;

/// The API version the requests name; the response shapes parsed here are this version's.
pub(crate) const API_VERSION: &str = "1.0.6";

/// Why a call gave nothing usable. The text never holds the content key or the URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ApiError {
    /// No answer: connection refused or reset, DNS, TLS, timeout.
    #[error("cannot reach Leanplum: {0}")]
    Transport(String),
    /// An HTTP status other than 2xx, with Leanplum's error message when it sent one.
    #[error("Leanplum answered HTTP {status}: {message}")]
    Http { status: u16, message: String },
    /// Leanplum refused the app id or content key (401, 403, or `Invalid clientKey`): a
    /// configuration problem, shown in `status`; retried, since a fixed key needs no restart.
    #[error("Leanplum refused the content key or app id: {0}")]
    Auth(String),
    /// HTTP 404 with Leanplum's own "not found" (`getMessage` of a deleted message).
    #[error("Leanplum says it does not exist: {0}")]
    NotFound(String),
    /// `"success": false`, with Leanplum's `error.message`.
    #[error("Leanplum says: {0}")]
    Leanplum(String),
    /// A 2xx whose body is not the expected response.
    #[error("malformed Leanplum response: {0}")]
    Malformed(String),
}

/// A client for one app.
pub(crate) struct LeanplumApi {
    http: reqwest::Client,
    url: String,
    app_id: String,
    key: Secret,
}

impl std::fmt::Debug for LeanplumApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeanplumApi")
            .field("url", &self.url)
            .field("app_id", &self.app_id)
            .finish_non_exhaustive()
    }
}

impl LeanplumApi {
    /// `transport`: the proxy and extra CA roots of `[leanplum]` (see [`crate::transport`]).
    pub(crate) fn new(
        api_base: &str,
        app_id: &str,
        key: Secret,
        timeout: Duration,
        transport: &Transport,
    ) -> Result<LeanplumApi, ApiError> {
        let http = transport
            .client_builder()
            .user_agent(concat!(
                "leanplum-segment-agent/",
                env!("CARGO_PKG_VERSION")
            ))
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| ApiError::Transport(e.without_url().to_string()))?;
        Ok(LeanplumApi {
            http,
            url: format!("{}/api", api_base.trim_end_matches('/')),
            app_id: app_id.to_owned(),
            key,
        })
    }

    /// Every message, finished ones included (`recent=false`).
    pub(crate) async fn messages(&self) -> Result<Vec<Message>, ApiError> {
        let body = self.call("getMessages", &[("recent", "false")]).await?;
        Catalog::parse_messages(&body).map_err(|e| self.classify(e))
    }

    /// Every A/B test, finished ones included.
    pub(crate) async fn abtests(&self) -> Result<Vec<AbTest>, ApiError> {
        let body = self.call("getAbTests", &[("recent", "false")]).await?;
        Catalog::parse_abtests(&body).map_err(|e| self.classify(e))
    }

    /// One message; `Ok(None)` when Leanplum says it does not exist: HTTP 404 with its error
    /// body (`{"response":[{"success":false,"error":{"message":"Message not found."}}]}`, what
    /// the real API answers for a deleted message), or a 2xx with `success: false` and a "not
    /// found" message. A 404 without Leanplum's word (a proxy, a wrong `api_base`) stays an
    /// error: taking it for "does not exist" would map every message wrong.
    pub(crate) async fn message(&self, id: Id) -> Result<Option<Message>, ApiError> {
        let id = id.to_string();
        let body = match self.call("getMessage", &[("id", &id)]).await {
            Ok(body) => body,
            Err(ApiError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        Catalog::parse_message_lookup(&body).map_err(|e| match e {
            LookupError::Leanplum(m) if is_auth_message(&m) => ApiError::Auth(self.scrub(&m)),
            LookupError::Leanplum(m) => ApiError::Leanplum(self.scrub(&m)),
            LookupError::Malformed(m) => ApiError::Malformed(self.scrub(&m)),
        })
    }

    async fn call(&self, action: &str, extra: &[(&str, &str)]) -> Result<Vec<u8>, ApiError> {
        let mut query: Vec<(&str, &str)> = vec![
            ("appId", &self.app_id),
            ("clientKey", self.key.expose()),
            ("apiVersion", API_VERSION),
            ("action", action),
        ];
        query.extend_from_slice(extra);
        let transport = |e: reqwest::Error| ApiError::Transport(self.scrub(&describe(e)));
        let response = self
            .http
            .get(&self.url)
            .query(&query)
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        let body = response.bytes().await.map_err(transport)?;
        if !status.is_success() {
            let leanplum_said = error_message(&body);
            if matches!(status.as_u16(), 401 | 403) {
                let message = leanplum_said.unwrap_or_else(|| format!("HTTP {}", status.as_u16()));
                return Err(ApiError::Auth(self.scrub(&message)));
            }
            // Leanplum's own word only: a 404 page from a proxy or a wrong `api_base` says
            // nothing about the message.
            if status.as_u16() == 404
                && let Some(m) = leanplum_said.as_deref().filter(|m| says_not_found(m))
            {
                return Err(ApiError::NotFound(self.scrub(m)));
            }
            let message = leanplum_said.unwrap_or_else(|| {
                status
                    .canonical_reason()
                    .unwrap_or("no reason given")
                    .to_owned()
            });
            return Err(ApiError::Http {
                status: status.as_u16(),
                message: self.scrub(&message),
            });
        }
        Ok(body.to_vec())
    }

    /// `Catalog`'s parse errors for a 2xx body: Leanplum's own failure, or a malformed body.
    fn classify(&self, e: String) -> ApiError {
        match e.strip_prefix(API_FAILURE) {
            Some(m) if is_auth_message(m) => ApiError::Auth(self.scrub(m)),
            Some(m) => ApiError::Leanplum(self.scrub(m)),
            None => ApiError::Malformed(self.scrub(&e)),
        }
    }

    /// Removes the key from text the server or a library produced (a proxy's error page might
    /// echo the request line).
    fn scrub(&self, text: &str) -> String {
        let key = self.key.expose();
        let mut text: String = text.chars().take(300).collect();
        if !key.is_empty() {
            text = text.replace(key, "<redacted>");
        }
        text
    }
}

/// reqwest's error without the URL (which holds the key), with its cause chain: "error sending
/// request" alone does not say "connection refused".
fn describe(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() { "timed out: " } else { "" };
    let e = e.without_url();
    crate::transport::with_causes(format!("{kind}{e}"), &e)
}

/// Whether Leanplum's error message is about the credentials (`Invalid clientKey`, `Invalid
/// appId`), not the request.
fn is_auth_message(message: &str) -> bool {
    let lower = message.to_lowercase();
    lower.contains("invalid")
        && ["clientkey", "client key", "appid", "app id"]
            .iter()
            .any(|p| lower.contains(p))
}

/// Leanplum's `{"response": [{"success": false, "error": {"message": ...}}]}`, or `{"error":
/// {"message"}}`, from an error body.
fn error_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let error = v
        .get("response")
        .and_then(|r| r.get(0))
        .and_then(|r| r.get("error"))
        .or_else(|| v.get("error"))?;
    match error {
        serde_json::Value::String(s) => Some(s.clone()),
        e => e.get("message").and_then(|m| m.as_str()).map(str::to_owned),
    }
}

/// A stand-in for Leanplum in unit tests.
#[cfg(test)]
pub(crate) mod test_server {
    use std::time::Duration;

    /// A server on loopback answering every request with `status` and `body` after `delay`.
    pub(crate) fn serve_one_answer(status: u16, body: &'static str, delay: Duration) -> String {
        let http = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url = format!("http://{}", http.server_addr().to_ip().unwrap());
        std::thread::spawn(move || {
            for request in http.incoming_requests() {
                std::thread::sleep(delay);
                let _ = request
                    .respond(tiny_http::Response::from_string(body).with_status_code(status));
            }
        });
        url
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `leanplum.proxy`: the calls go to the proxy in absolute form, with the proxy's
    /// credentials; and a transport error through it names neither them nor the content key.
    #[tokio::test]
    async fn calls_go_through_the_configured_proxy() {
        use crate::config::ProxyUrl;
        use base64::Engine as _;
        let proxy = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let addr = proxy.server_addr().to_ip().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for request in proxy.incoming_requests() {
                let auth = request
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv("Proxy-Authorization"))
                    .map(|h| h.value.to_string());
                let _ = tx.send((request.url().to_owned(), auth));
                let body = r#"{"response":[{"success":true,"messages":[]}]}"#;
                let _ = request.respond(tiny_http::Response::from_string(body));
            }
        });
        let transport = Transport::new(
            &ProxyUrl::new(format!("http://lp:pr0xyPass@{addr}")),
            std::path::Path::new(""),
        )
        .unwrap();
        let api = LeanplumApi::new(
            "http://api.leanplum.invalid",
            "app",
            Secret::new("K_content"),
            Duration::from_secs(5),
            &transport,
        )
        .unwrap();
        assert_eq!(api.messages().await.unwrap(), vec![]);
        let (url, auth) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(
            url.starts_with("http://api.leanplum.invalid/api?"),
            "not an absolute-form request to the proxy: {url}"
        );
        let expected = base64::engine::general_purpose::STANDARD.encode("lp:pr0xyPass");
        assert_eq!(auth, Some(format!("Basic {expected}")));

        // A proxy that is not there: the error says so without the secrets.
        let closed = Transport::new(
            &ProxyUrl::new("http://lp:pr0xyPass@127.0.0.1:9"),
            std::path::Path::new(""),
        )
        .unwrap();
        let api = LeanplumApi::new(
            "https://api.leanplum.invalid",
            "app",
            Secret::new("K_content"),
            Duration::from_secs(5),
            &closed,
        )
        .unwrap();
        let text = api.messages().await.unwrap_err().to_string();
        assert!(text.starts_with("cannot reach Leanplum"), "{text}");
        assert!(
            !text.contains("pr0xyPass") && !text.contains("K_content"),
            "{text}"
        );
    }

    #[test]
    fn error_bodies_give_leanplum_message() {
        let body = br#"{"response":[{"success":false,"error":{"message":"Invalid clientKey"}}]}"#;
        assert_eq!(error_message(body).as_deref(), Some("Invalid clientKey"));
        assert_eq!(
            error_message(br#"{"error":"quota"}"#).as_deref(),
            Some("quota")
        );
        assert_eq!(error_message(b"<html>bad gateway</html>"), None);
    }

    #[test]
    fn scrub_removes_the_key() {
        let api = LeanplumApi::new(
            "http://127.0.0.1:9",
            "app",
            Secret::new("K3yK3y"),
            Duration::from_secs(1),
            &Default::default(),
        )
        .unwrap();
        assert_eq!(
            api.scrub("GET /api?clientKey=K3yK3y failed"),
            "GET /api?clientKey=<redacted> failed"
        );
    }

    #[tokio::test]
    async fn transport_errors_hold_neither_url_nor_key() {
        // Port 9 (discard) is closed on loopback: connection refused.
        let api = LeanplumApi::new(
            "http://127.0.0.1:9",
            "app",
            Secret::new("S3cretContentKey"),
            Duration::from_secs(2),
            &Default::default(),
        )
        .unwrap();
        let e = api.messages().await.unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, ApiError::Transport(_)), "{text}");
        assert!(!text.contains("S3cretContentKey"), "{text}");
        assert!(!text.contains("clientKey"), "{text}");
    }

    #[tokio::test]
    async fn each_kind_of_failure_is_told_apart_without_the_key() {
        let key = "K_s3cret_content";
        let rows: &[(u16, &'static str, u64, &str)] = &[
            (
                200,
                r#"{"response":[{"success":false,"error":{"message":"Quota exceeded"}}]}"#,
                0,
                "Leanplum says: Quota exceeded",
            ),
            (
                401,
                r#"{"response":[{"success":false,"error":{"message":"Invalid clientKey K_s3cret_content"}}]}"#,
                0,
                "Leanplum refused the content key or app id: Invalid clientKey <redacted>",
            ),
            (
                502,
                "<html>bad gateway</html>",
                0,
                "Leanplum answered HTTP 502: Bad Gateway",
            ),
            (200, "{\"response\": [", 0, "malformed Leanplum response"),
            (
                200,
                r#"{"response":[{"success":true}]}"#,
                0,
                "malformed Leanplum response",
            ),
            (200, "[]", 3, "cannot reach Leanplum: timed out"),
        ];
        for (status, body, delay, want) in rows {
            let url = test_server::serve_one_answer(*status, body, Duration::from_secs(*delay));
            let api = LeanplumApi::new(
                &url,
                "app",
                Secret::new(key),
                Duration::from_secs(1),
                &Default::default(),
            )
            .unwrap();
            let text = api.messages().await.unwrap_err().to_string();
            assert!(text.starts_with(want), "{status} {body}: {text}");
            assert!(
                !text.contains(key) && !text.contains("clientKey="),
                "{text}"
            );
        }
    }

    /// `getMessage` answers, as the real API gives them, each told apart: "does not exist" is
    /// an answer (`Ok(None)`), a refused key is `Auth`, an outage is retried (`Http`,
    /// `Transport`), and a 404 without Leanplum's word is not taken for "does not exist".
    #[tokio::test]
    async fn get_message_answers_are_told_apart() {
        const NOT_FOUND: &str =
            r#"{"response":[{"success":false,"error":{"message":"Message not found."}}]}"#;
        const FOUND: &str = r#"{"response":[{"success":true,"message":{"messageType":"Email","created":1.506018056324E9,"name":"Welcome","active":true,"id":5342363864268800}}]}"#;
        let rows: &[(u16, &'static str, &str)] = &[
            (404, NOT_FOUND, "none"),
            (200, NOT_FOUND, "none"),
            (
                200,
                r#"{"response":[{"success":false,"error":{"message":"MESSAGE NOT FOUND"}}]}"#,
                "none",
            ),
            (200, FOUND, "found"),
            (404, "<html>no such page</html>", "http"),
            (
                401,
                r#"{"response":[{"success":false,"error":{"message":"Invalid clientKey"}}]}"#,
                "auth",
            ),
            (403, "", "auth"),
            (
                200,
                r#"{"response":[{"success":false,"error":{"message":"Invalid appId or clientKey."}}]}"#,
                "auth",
            ),
            (
                200,
                r#"{"response":[{"success":false,"error":{"message":"Quota exceeded"}}]}"#,
                "leanplum",
            ),
            (503, "maintenance", "http"),
            (429, "", "http"),
        ];
        for (status, body, want) in rows {
            let url = test_server::serve_one_answer(*status, body, Duration::ZERO);
            let api = LeanplumApi::new(
                &url,
                "app",
                Secret::new("k"),
                Duration::from_secs(2),
                &Default::default(),
            )
            .unwrap();
            let got = match api.message(Id(5342363864268800)).await {
                Ok(None) => "none",
                Ok(Some(m)) => {
                    assert_eq!(m.name.as_deref(), Some("Welcome"));
                    "found"
                }
                Err(ApiError::Auth(_)) => "auth",
                Err(ApiError::Http { .. }) => "http",
                Err(ApiError::Leanplum(_)) => "leanplum",
                Err(e) => panic!("{status} {body}: {e}"),
            };
            assert_eq!(got, *want, "{status} {body}");
        }
    }
}
