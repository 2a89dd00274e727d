//! Delivery, spool -> Segment, in one place: batch assembly within Segment's limits
//! (`batch`), the HTTP client for `/v1/batch` (`client`), the decision table that says what
//! an answer does to a batch (`retry`), how many requests may be in flight (`concurrency`),
//! the `max_events_per_sec` bucket (`rate`), and the drain loop that runs them (`drain`).
//! The event itself is [`crate::event`]; the backoff timer is [`crate::backoff`].

pub(crate) mod batch;
pub(crate) mod client;
pub(crate) mod concurrency;
pub(crate) mod drain;
pub(crate) mod rate;
pub(crate) mod retry;
