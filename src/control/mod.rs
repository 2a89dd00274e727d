//! Talking to a running agent: the status report (SPEC section 9) and the Unix control socket
//! that `status` queries. The report is built by the caller's closure, so this module knows
//! nothing of the tasks that feed it; when no agent answers, [`offline_report`] reads the spool.
//!
//! - [`status`]: [`StatusReport`] (its JSON field names are a stable interface, documented
//!   there), the human and one-line renderings, live and offline reports.
//! - [`socket`]: the server ([`serve`], [`ControlSocket`]) and the client ([`query_status`]).

pub mod files;
pub mod metrics;
pub mod socket;
pub mod status;

pub use socket::{
    CommandFn, ControlSocket, QueryError, REQUEST_TIMEOUT, ReportFn, query_status, request, serve,
};
pub use status::{
    LiveSources, STATE_STOPPED, StatusReport, live_report, offline_report, state_name,
};
