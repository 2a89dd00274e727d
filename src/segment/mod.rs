//! Segment's side: batch assembly within Segment's limits, the HTTP client for `/v1/batch`,
//! and the retry policy that reads its answers. The event itself is [`crate::event`].

pub mod batch;
pub mod client;
pub mod concurrency;
pub mod rate;
pub mod retry;
