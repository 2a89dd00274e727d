//! What the Segment client and the Leanplum API client share about the network: the proxy and
//! extra CA roots (`segment.proxy`, `segment.ca_file`, `leanplum.proxy`, `leanplum.ca_file`).
//!
//! - With `proxy` set, every request goes through it (HTTPS by `CONNECT`, plain HTTP in
//!   absolute form), whatever the environment says; `NO_PROXY` does not apply to it.
//! - Without it, the environment's proxy applies, as curl reads it: `HTTPS_PROXY` /
//!   `https_proxy` for `https://` URLs, `HTTP_PROXY` / `http_proxy` for `http://` ones,
//!   `ALL_PROXY` / `all_proxy` for both, and `NO_PROXY` / `no_proxy` (host names with their
//!   subdomains, IP addresses, CIDR ranges, `*`) to go direct. Loopback is not exempt unless
//!   `NO_PROXY` names it. (reqwest does this itself, with or without its `system-proxy`
//!   feature, which only adds the macOS and Windows settings. As a guard against
//!   "httpoxy", the environment's proxy is ignored when `REQUEST_METHOD` is set.)
//! - `ca_file` adds its certificates to the built-in roots (the system's and Mozilla's),
//!   for a TLS-inspecting corporate proxy or a private endpoint.
//!
//! A proxy URL may carry `user:password@`: it is never logged or shown ([`redact`]), and no
//! error message built here quotes it.

use std::path::Path;

use crate::config::ProxyUrl;

/// The proxy and roots for one client, ready to apply to a `reqwest::ClientBuilder`.
#[derive(Clone, Default)]
pub(crate) struct Transport {
    proxy: Option<(reqwest::Proxy, String)>,
    roots: Vec<reqwest::Certificate>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("proxy", &self.proxy.as_ref().map(|(_, shown)| shown))
            .field("roots", &self.roots.len())
            .finish()
    }
}

impl Transport {
    /// From a section's `proxy` and `ca_file` (empty: unset). The errors name neither the
    /// key nor the proxy's credentials; the caller adds the key.
    pub(crate) fn new(proxy: &ProxyUrl, ca_file: &Path) -> Result<Transport, String> {
        let proxy = if proxy.is_set() {
            let url = check_proxy(proxy.expose())?;
            let shown = redact(proxy.expose());
            let p = reqwest::Proxy::all(url).map_err(|e| format!("{shown}: {e}"))?;
            Some((p, shown))
        } else {
            None
        };
        let roots = if ca_file.as_os_str().is_empty() {
            Vec::new()
        } else {
            load_ca_file(ca_file)?
        };
        Ok(Transport { proxy, roots })
    }

    /// `reqwest::Client::builder()` with the proxy and the extra roots.
    pub(crate) fn client_builder(&self) -> reqwest::ClientBuilder {
        let mut builder = reqwest::Client::builder();
        if let Some((proxy, _)) = &self.proxy {
            // Replaces the environment's proxy (reqwest drops it once one is added).
            builder = builder.proxy(proxy.clone());
        }
        for root in &self.roots {
            builder = builder.add_root_certificate(root.clone());
        }
        builder
    }

    /// How requests to `url` leave, for a log line: the configured proxy (without its
    /// credentials), the environment variable that names one, or `direct`.
    pub(crate) fn route(&self, url: &str) -> String {
        if let Some((_, shown)) = &self.proxy {
            return shown.clone();
        }
        let https = url.starts_with("https://");
        let names: &[&str] = if https {
            &["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
        } else {
            &["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
        };
        if std::env::var_os("REQUEST_METHOD").is_some() {
            return "direct".into();
        }
        let set = |n: &str| std::env::var(n).is_ok_and(|v| !v.trim().is_empty());
        match names.iter().find(|n| set(n)) {
            Some(name) if ["NO_PROXY", "no_proxy"].into_iter().any(set) => {
                format!("${name} (unless $NO_PROXY matches)")
            }
            Some(name) => format!("${name}"),
            None => "direct".into(),
        }
    }

    /// How many certificates `ca_file` added.
    pub(crate) fn extra_roots(&self) -> usize {
        self.roots.len()
    }
}

/// Checks a proxy URL: `http://` or `https://`, a host and a port, nothing after them but `/`.
/// Messages show the URL without its credentials.
pub(crate) fn check_proxy(text: &str) -> Result<reqwest::Url, String> {
    let shown = redact(text);
    let url = reqwest::Url::parse(text.trim())
        .map_err(|e| format!("{shown:?} is not a URL ({e}); expected http://host:port"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "{shown:?}: the scheme must be http:// or https:// (the proxy's own protocol)"
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{shown:?} has no host"));
    }
    if url.port().is_none() && !has_explicit_port(text.trim()) {
        return Err(format!("{shown:?} has no port (http://host:port)"));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{shown:?}: a proxy URL has no path or query"));
    }
    Ok(url)
}

/// Whether the authority of `text` ends in `:<digits>` (the URL parser forgets a port that is
/// the scheme's default, `https://proxy:443`).
fn has_explicit_port(text: &str) -> bool {
    let rest = text.split_once("://").map_or(text, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    host_port.rsplit_once(':').is_some_and(|(host, port)| {
        !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with('[')
    })
}

/// A proxy URL fit for a log line: `user:password@` becomes `<redacted>@`. Text that does not
/// parse loses everything up to its last `@`.
pub(crate) fn redact(text: &str) -> String {
    let text = text.trim();
    match reqwest::Url::parse(text) {
        Ok(url) if !url.username().is_empty() || url.password().is_some() => {
            let host = url.host_str().unwrap_or("");
            let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!("{}://<redacted>@{host}{port}", url.scheme())
        }
        Ok(_) => text.trim_end_matches('/').to_owned(),
        Err(_) => match text.rsplit_once('@') {
            Some((before, after)) => {
                let scheme = before.split_once("://").map(|(s, _)| s).unwrap_or("");
                format!("{scheme}://<redacted>@{after}")
            }
            None => text.to_owned(),
        },
    }
}

/// The certificates of a PEM file (one or more `BEGIN CERTIFICATE` blocks), each checked the
/// way the TLS stack will take it. An error names the file and what is wrong with it.
pub(crate) fn load_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&bytes)
        .map_err(|_| format!("{}: not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    for (i, cert) in certs.iter().enumerate() {
        // The DER inside is only parsed when a client is built: build one with this root
        // alone (no built-in roots to load, so this is cheap).
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(cert.clone())
            .build()
            .map_err(|e| {
                let text = format!(
                    "{}: certificate {} of {} is not usable",
                    path.display(),
                    i + 1,
                    certs.len()
                );
                with_causes(text, &e)
            })?;
    }
    Ok(certs)
}

/// `text`, then every cause of `e` after a colon: reqwest's and rustls's errors say what
/// happened ("connection refused", "UnknownIssuer") only in their sources.
pub(crate) fn with_causes(mut text: String, e: &dyn std::error::Error) -> String {
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_are_checked_without_showing_credentials() {
        for ok in [
            "http://proxy.corp:3128",
            "https://proxy.corp:443",
            "http://proxy.corp:80",
            "http://u:p@10.0.0.1:8080/",
            "http://[::1]:3128",
        ] {
            assert!(check_proxy(ok).is_ok(), "{ok}");
        }
        for (wrong, why) in [
            ("proxy.corp:3128", "scheme"),
            ("socks5://proxy:1080", "scheme"),
            ("http://proxy.corp", "no port"),
            ("https://[::1]", "no port"),
            ("http://u:s3cret@proxy.corp:3128/path", "no path"),
            ("http://u:s3cret@:8080", "not a URL"),
            ("not a url", "not a URL"),
        ] {
            let e = check_proxy(wrong).unwrap_err();
            assert!(e.contains(why), "{wrong}: {e}");
            assert!(!e.contains("s3cret"), "{wrong}: {e}");
        }
    }

    #[test]
    fn redact_hides_user_and_password() {
        assert_eq!(
            redact("http://alice:s3cret@proxy:3128"),
            "http://<redacted>@proxy:3128"
        );
        assert_eq!(
            redact("http://alice@proxy:3128"),
            "http://<redacted>@proxy:3128"
        );
        assert_eq!(redact("http://proxy:3128/"), "http://proxy:3128");
        assert!(!redact("http://a:s3cret@@bad url:1").contains("s3cret"));
        let t = Transport::new(
            &ProxyUrl::new("http://alice:s3cret@proxy:3128"),
            Path::new(""),
        )
        .unwrap();
        assert!(!format!("{t:?} {}", t.route("https://x")).contains("s3cret"));
        assert_eq!(
            t.route("https://api.segment.io"),
            "http://<redacted>@proxy:3128"
        );
    }

    #[test]
    fn ca_files_must_hold_a_usable_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(load_ca_file(&missing).unwrap_err().contains("cannot read"));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no pem here\n").unwrap();
        assert!(load_ca_file(&empty).unwrap_err().contains("no certificate"));
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = load_ca_file(&garbage).unwrap_err();
        assert!(e.contains("certificate 1 of 1"), "{e}");

        let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["example".into()]).unwrap();
        let good = dir.path().join("good.pem");
        std::fs::write(&good, format!("{}{}", ca.cert.pem(), other.cert.pem())).unwrap();
        assert_eq!(load_ca_file(&good).unwrap().len(), 2);
        let t = Transport::new(&ProxyUrl::default(), &good).unwrap();
        assert_eq!(t.extra_roots(), 2);
        t.client_builder().build().unwrap();
    }
}
