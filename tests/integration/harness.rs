//! The harness's own guarantees, which every delivery test relies on: the fake Segment server
//! answers every request, however many arrive at once and however long their answers are
//! delayed, in both its modes (recording for the tests, counting for the benchmarks); the TLS
//! one speaks the protocol it offered by ALPN and counts gzipped batches.

use std::time::Duration;

use std::io::Write;

use crate::util::{
    Offer, PATIENCE, SegmentServer, TlsSegmentServer, WRITE_KEY, basic_auth, wait_until,
};

/// More connections at once than the agent ever opens (`max_concurrency` 32), each answer
/// delayed: every request is answered, and recorded as answered.
#[test]
fn the_fake_segment_server_answers_every_request_of_many_at_once() {
    const CONNECTIONS: usize = 64;
    const ROUNDS: usize = 3;
    let runtime = client_runtime();
    for (mode, server) in both_modes() {
        server.set_delay(Duration::from_millis(300));
        let url = format!("{}/v1/batch", server.url());
        let statuses: Vec<u16> = runtime.block_on(async {
            let client = http_client();
            let tasks: Vec<_> = (0..CONNECTIONS)
                .map(|c| {
                    let (client, url) = (client.clone(), url.clone());
                    tokio::spawn(async move {
                        let mut statuses = Vec::new();
                        for round in 0..ROUNDS {
                            let body = format!(
                                r#"{{"batch":[{{"messageId":"m-{c}-{round}-a"}},{{"messageId":"m-{c}-{round}-b"}}]}}"#
                            );
                            statuses.push(post_batch(&client, &url, body.into(), false).await);
                        }
                        statuses
                    })
                })
                .collect();
            let mut all = Vec::new();
            for task in tasks {
                all.extend(task.await.expect("a client task"));
            }
            all
        });
        assert_eq!(statuses, vec![200; CONNECTIONS * ROUNDS], "{mode}");
        assert_eq!(server.requests().len(), CONNECTIONS * ROUNDS, "{mode}");
        // The answer is recorded just after it was written.
        assert!(
            wait_until(PATIENCE, || server
                .requests()
                .iter()
                .all(|r| r.answered_at.is_some() && r.respond_error.is_none())),
            "{mode}: every request recorded as answered"
        );
        assert_eq!(server.accepted_count(), 2 * CONNECTIONS * ROUNDS, "{mode}");
    }
}

/// Both modes count the same events in a gzipped batch larger than the counting server's
/// piece (256 KiB plain), and both refuse a body that does not gunzip (a CRC-32 broken).
#[test]
fn the_counting_server_counts_a_gzipped_batch_as_the_recording_one_does() {
    let events: Vec<String> = (0..5000)
        .map(|i| {
            format!(
                r#"{{"messageId":"lp-e-{i}","properties":{{"pad":"{}"}}}}"#,
                "x".repeat(i % 97)
            )
        })
        .collect();
    let plain = format!(
        r#"{{"batch":[{}],"sentAt":"2026-11-01T12:08:19.612Z"}}"#,
        events.join(",")
    );
    assert!(plain.len() > 256 << 10);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(plain.as_bytes()).expect("gzip");
    let good = gz.finish().expect("gzip");
    let mut broken = good.clone();
    let crc = broken.len() - 8;
    broken[crc] ^= 0xff;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    for (mode, server) in both_modes() {
        let url = format!("{}/v1/batch", server.url());
        let statuses: Vec<u16> = runtime.block_on(async {
            let client = http_client();
            let mut statuses = Vec::new();
            for body in [&good, &broken] {
                statuses.push(post_batch(&client, &url, body.clone(), true).await);
            }
            statuses
        });
        assert_eq!(statuses, [200, 400], "{mode}");
        assert_eq!(server.accepted_count(), events.len(), "{mode}");
    }
}

/// The TLS server, counting: many gzipped batches at once over the protocol it offered (HTTP/2
/// or HTTP/1.1), each counted; a wrong write key is refused with 401.
#[test]
fn the_tls_segment_server_counts_gzipped_batches_over_the_protocol_it_offers() {
    const REQUESTS: usize = 40;
    let runtime = client_runtime();
    for (name, version) in [("h2", "HTTP/2.0"), ("h1", "HTTP/1.1")] {
        let server = TlsSegmentServer::start_counting(Offer::parse(name).unwrap());
        server.set_delay(Duration::from_millis(100));
        let url = format!("{}/v1/batch", server.url());
        let root = reqwest::Certificate::from_pem(server.ca_pem().as_bytes()).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(br#"{"batch":[{"messageId":"a"},{"messageId":"b"}]}"#)
            .unwrap();
        let body = gz.finish().unwrap();
        let statuses: Vec<(u16, reqwest::Version)> = runtime.block_on(async {
            let client = reqwest::Client::builder()
                .no_proxy()
                .add_root_certificate(root)
                .timeout(PATIENCE)
                .build()
                .expect("an HTTP client");
            let tasks: Vec<_> = (0..=REQUESTS)
                .map(|i| {
                    let (client, url, body) = (client.clone(), url.clone(), body.clone());
                    // The last one with a wrong key.
                    let key = if i == REQUESTS { "wrong" } else { WRITE_KEY };
                    tokio::spawn(async move {
                        let response = post(&client, &url, key, Some("gzip"), body).await;
                        (response.status().as_u16(), response.version())
                    })
                })
                .collect();
            let mut all = Vec::new();
            for task in tasks {
                all.push(task.await.expect("a client task"));
            }
            all
        });
        let codes: Vec<u16> = statuses.iter().map(|(s, _)| *s).collect();
        let mut expected = vec![200; REQUESTS];
        expected.push(401);
        assert_eq!(codes, expected, "{name}");
        assert!(
            statuses.iter().all(|(_, v)| format!("{v:?}") == version),
            "{name}: {statuses:?}"
        );
        assert_eq!(server.accepted_count(), 2 * REQUESTS as u64, "{name}");
        assert_eq!(server.accepted_requests(), REQUESTS as u64, "{name}");
        assert!(server.first_request().is_some());
        assert_eq!(server.versions()[version], REQUESTS as u64 + 1, "{name}");
        let alpn = if name == "h2" { "h2" } else { "http/1.1" };
        let connections = server.connections();
        assert_eq!(
            connections.keys().collect::<Vec<_>>(),
            [alpn],
            "{connections:?}"
        );
    }
}

/// The fake server in both its modes.
fn both_modes() -> [(&'static str, SegmentServer); 2] {
    [
        ("recording", SegmentServer::start()),
        ("counting", SegmentServer::start_counting()),
    ]
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(PATIENCE)
        .build()
        .expect("an HTTP client")
}

/// POSTs a batch body (gzipped when `gzip`) with the right write key; the answer's status.
async fn post_batch(client: &reqwest::Client, url: &str, body: Vec<u8>, gzip: bool) -> u16 {
    post(client, url, WRITE_KEY, gzip.then_some("gzip"), body)
        .await
        .status()
        .as_u16()
}

/// A batch POSTed with `key`, its body in `encoding` when given.
async fn post(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    encoding: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut request = client
        .post(url)
        .header("Authorization", basic_auth(key))
        .header("Content-Type", "application/json");
    if let Some(encoding) = encoding {
        request = request.header("Content-Encoding", encoding);
    }
    request.body(body).send().await.expect("an answer")
}

/// A runtime for the test's HTTP clients.
fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}
