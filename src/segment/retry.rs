//! The decision table (SPEC section 6): the one place that maps Segment's answer to a batch
//! (or a failure to get one) to what the drain does with the batch, and what the answer says
//! about load. Pure: a table over the status code and the batch size, tested row by row. How
//! long to wait is [`crate::backoff`]'s.

use super::concurrency::Outcome;

/// What to do with a batch after one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// 2xx: the events are Segment's now; remove them from the spool.
    Ack,
    /// Transient (connect error, timeout, 408, 410, 429, 460, most 5xx): send the same events
    /// again after a backoff (or `Retry-After`).
    Retry,
    /// 400 on a batch of several events: some event is bad; send each half on its own.
    Bisect,
    /// 400 on a single event: Segment refuses that event; move it to the dead letters.
    DeadLetter,
    /// The write key is wrong (401, 403): stop sending, keep everything, retry at max backoff.
    AuthFailed,
    /// Segment refuses this kind of request (other 4xx, 501, 505, 511): same as `AuthFailed`
    /// but reported as `rejected`, since the key is not the problem.
    Rejected,
}

/// The response table of SPEC section 6 for a batch of `events` events. `status` is `None` for
/// a connect error, a reset or a timeout.
pub(crate) fn decide(status: Option<u16>, events: usize) -> Decision {
    match status {
        None => Decision::Retry,
        Some(200..=299) => Decision::Ack,
        Some(400) if events <= 1 => Decision::DeadLetter,
        Some(400) => Decision::Bisect,
        Some(401 | 403) => Decision::AuthFailed,
        Some(408 | 410 | 429 | 460) => Decision::Retry,
        Some(501 | 505 | 511) => Decision::Rejected,
        Some(500..=599) => Decision::Retry,
        // 1xx/3xx should never reach us (reqwest follows redirects); treat as transient.
        Some(100..=399) => Decision::Retry,
        Some(_) => Decision::Rejected,
    }
}

impl Decision {
    /// What the answer says about load: transient failures (408, 410, 429, 460, 5xx, timeouts
    /// and transport errors) mean overload; a refusal of the content or the key says nothing.
    pub(crate) fn outcome(self) -> Outcome {
        match self {
            Decision::Ack => Outcome::Success,
            Decision::Retry => Outcome::Overloaded,
            Decision::Bisect | Decision::DeadLetter | Decision::AuthFailed | Decision::Rejected => {
                Outcome::Neutral
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_response_table() {
        use Decision::*;
        let rows: &[(Option<u16>, usize, Decision, Outcome)] = &[
            (Some(200), 10, Ack, Outcome::Success),
            (Some(204), 10, Ack, Outcome::Success),
            (Some(400), 10, Bisect, Outcome::Neutral),
            (Some(400), 2, Bisect, Outcome::Neutral),
            (Some(400), 1, DeadLetter, Outcome::Neutral),
            (Some(401), 10, AuthFailed, Outcome::Neutral),
            (Some(403), 1, AuthFailed, Outcome::Neutral),
            (Some(404), 10, Rejected, Outcome::Neutral),
            (Some(408), 10, Retry, Outcome::Overloaded),
            (Some(410), 10, Retry, Outcome::Overloaded),
            (Some(413), 10, Rejected, Outcome::Neutral),
            (Some(429), 1, Retry, Outcome::Overloaded),
            (Some(460), 10, Retry, Outcome::Overloaded),
            (Some(500), 10, Retry, Outcome::Overloaded),
            (Some(501), 10, Rejected, Outcome::Neutral),
            (Some(502), 10, Retry, Outcome::Overloaded),
            (Some(503), 10, Retry, Outcome::Overloaded),
            (Some(504), 10, Retry, Outcome::Overloaded),
            (Some(505), 10, Rejected, Outcome::Neutral),
            (Some(511), 10, Rejected, Outcome::Neutral),
            (Some(599), 10, Retry, Outcome::Overloaded),
            (None, 10, Retry, Outcome::Overloaded),
            (None, 1, Retry, Outcome::Overloaded),
        ];
        for (status, events, want, load) in rows {
            let got = decide(*status, *events);
            assert_eq!(got, *want, "status {status:?}, {events} events");
            assert_eq!(got.outcome(), *load, "status {status:?}");
        }
    }
}
