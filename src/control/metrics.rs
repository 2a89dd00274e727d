//! An optional Prometheus text endpoint (`[control] metrics_listen`, loopback only, off by
//! default): `GET /metrics` gives the status counters and the delivery-latency histogram.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::socket::ReportFn;
use super::status::StatusReport;
use crate::stats::Stats;

/// Binds `addr`; errors (address in use) surface at startup.
pub(crate) async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `GET /metrics` until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    report: ReportFn,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let (report, stats) = (report.clone(), stats.clone());
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, report, stats)).await;
                });
            }
        }
    }
}

async fn answer(mut stream: TcpStream, report: ReportFn, stats: Arc<Stats>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let first = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let (status, body) =
        if first.starts_with(b"GET /metrics ") || first.starts_with(b"GET /metrics?") {
            let r = tokio::task::spawn_blocking(move || report())
                .await
                .map_err(std::io::Error::other)?;
            ("200 OK", render(&r, &stats))
        } else {
            ("404 Not Found", "only /metrics here\n".to_string())
        };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The Prometheus text exposition of a report and the latency histogram.
pub(crate) fn render(r: &StatusReport, stats: &Stats) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP lsa_{name} {help}\n# TYPE lsa_{name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "lsa_{name}{labels} {v}");
        }
    };
    let one = |v: u64| vec![(String::new(), v as f64)];
    metric(
        "state",
        "gauge",
        "1 for the agent's current state",
        &[
            "running",
            "backing_off",
            "auth_failed",
            "rejected",
            "spool_full",
        ]
        .iter()
        .map(|s| {
            (
                format!("{{state=\"{s}\"}}"),
                f64::from(u8::from(r.state == *s)),
            )
        })
        .collect::<Vec<_>>(),
    );
    metric(
        "spool_events",
        "gauge",
        "Events waiting in the spool",
        &one(r.spool_events),
    );
    metric(
        "spool_bytes",
        "gauge",
        "Bytes of events waiting in the spool",
        &one(r.spool_bytes),
    );
    metric(
        "oldest_event_age_seconds",
        "gauge",
        "Age of the oldest queued event",
        &one(r.oldest_event_age_secs.unwrap_or(0)),
    );
    metric(
        "events_read_total",
        "counter",
        "Records read from files",
        &one(r.events_read),
    );
    metric(
        "events_spooled_total",
        "counter",
        "Events committed to the spool",
        &one(r.events_spooled),
    );
    metric(
        "events_delivered_total",
        "counter",
        "Events Segment accepted",
        &one(r.events_delivered),
    );
    metric(
        "duplicates_skipped_total",
        "counter",
        "Events skipped as already spooled",
        &one(r.duplicates_skipped),
    );
    metric(
        "skipped_total",
        "counter",
        "Engagements not sent, by Leanplum action",
        &r.skipped_by_action
            .iter()
            .map(|(a, n)| (format!("{{action=\"{}\"}}", escape(a)), *n as f64))
            .collect::<Vec<_>>(),
    );
    metric(
        "quarantined_total",
        "counter",
        "Bad records quarantined",
        &one(r.quarantined),
    );
    metric(
        "dead_lettered_total",
        "counter",
        "Events Segment refused for good",
        &one(r.dead_lettered),
    );
    metric(
        "files",
        "gauge",
        "Files the spool knows, by status",
        &[
            ("seen", r.files_seen),
            ("in_progress", r.files_in_progress),
            ("done", r.files_done),
            ("failed", r.files_failed),
        ]
        .iter()
        .map(|(s, n)| (format!("{{status=\"{s}\"}}"), *n as f64))
        .collect::<Vec<_>>(),
    );
    metric(
        "backoff_seconds",
        "gauge",
        "Current retry wait",
        &[(
            String::new(),
            r.current_backoff_ms.unwrap_or(0) as f64 / 1000.0,
        )],
    );
    if let Some(limit) = r.concurrency_limit {
        metric(
            "concurrency_limit",
            "gauge",
            "Requests that may be in flight now (fixed or adaptive)",
            &one(limit),
        );
        metric(
            "max_concurrency",
            "gauge",
            "The most the concurrency limit can be",
            &one(r.max_concurrency.unwrap_or(limit)),
        );
    }
    metric(
        "in_flight_requests",
        "gauge",
        "Requests to Segment in flight now",
        &one(r.in_flight),
    );
    if let Some(rtt) = r.rtt_ms {
        metric(
            "rtt_seconds",
            "gauge",
            "Smoothed round trip of a request to Segment",
            &[(String::new(), rtt / 1000.0)],
        );
    }
    if let Some(rate) = r.max_events_per_sec {
        metric(
            "max_events_per_second",
            "gauge",
            "segment.max_events_per_sec in force (0 = unlimited)",
            &one(rate),
        );
    }
    let (buckets, count, sum) = stats.delivery_latency.snapshot();
    let _ = writeln!(
        out,
        "# HELP lsa_delivery_latency_seconds Time from spooling to Segment's 2xx\n# TYPE lsa_delivery_latency_seconds histogram"
    );
    for (bound, n) in buckets {
        let _ = writeln!(
            out,
            "lsa_delivery_latency_seconds_bucket{{le=\"{bound}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "lsa_delivery_latency_seconds_bucket{{le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(out, "lsa_delivery_latency_seconds_sum {sum}");
    let _ = writeln!(out, "lsa_delivery_latency_seconds_count {count}");
    out
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_the_text_format_on_loopback() {
        let listener = bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        stats.delivery_latency.observe_ms(700);
        let report: ReportFn = Arc::new(|| StatusReport {
            state: "backing_off".into(),
            spool_events: 12,
            concurrency_limit: Some(7),
            max_concurrency: Some(32),
            in_flight: 4,
            rtt_ms: Some(150.0),
            max_events_per_sec: Some(0),
            skipped_by_action: [("Held Back".to_string(), 3)].into(),
            ..StatusReport::default()
        });
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, report, stats, stop.clone()));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        assert!(body.contains("lsa_spool_events 12\n"), "{body}");
        assert!(body.contains("lsa_concurrency_limit 7\n"), "{body}");
        assert!(body.contains("lsa_in_flight_requests 4\n"), "{body}");
        assert!(body.contains("lsa_rtt_seconds 0.15\n"), "{body}");
        assert!(body.contains("lsa_max_events_per_second 0\n"), "{body}");
        assert!(
            body.contains("lsa_state{state=\"backing_off\"} 1\n"),
            "{body}"
        );
        assert!(
            body.contains("lsa_skipped_total{action=\"Held Back\"} 3\n"),
            "{body}"
        );
        assert!(
            body.contains("lsa_delivery_latency_seconds_bucket{le=\"1\"} 1\n"),
            "{body}"
        );
        assert!(
            body.contains("lsa_delivery_latency_seconds_count 1\n"),
            "{body}"
        );
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        assert!(body.starts_with("HTTP/1.1 404"), "{body}");
        stop.cancel();
    }
}
