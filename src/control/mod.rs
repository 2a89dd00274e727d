//! Talking to a running agent: the typed control protocol, the Unix control socket it travels
//! on, what the answers hold (status report, files), signals, metrics. The answers are built by
//! the agent's handler (`app`), so this module knows nothing of the tasks that feed them;
//! when no agent answers, [`offline_report`] and [`files::list`] read the spool.
//!
//! - [`protocol`]: [`Request`] and [`Answer`] (serde), and the one client call, [`ask`].
//! - [`socket`]: the server ([`ControlSocket`]) that hands each request to the
//!   agent's [`Handler`], and the client's side of the wire.
//! - [`status`]: [`StatusReport`] (its JSON field names are a stable interface, documented
//!   there), the human and one-line renderings, live and offline reports.
//! - [`files`]: `files` (every input file and its state) and starting a `replay`.
//! - [`metrics`]: the Prometheus endpoint (`[control] metrics_listen`).
//! - `signals`: SIGTERM / SIGINT / SIGHUP / SIGUSR1 into the agent's controls.

pub(crate) mod files;
pub(crate) mod metrics;
pub(crate) mod protocol;
pub(crate) mod signals;
pub(crate) mod socket;
pub(crate) mod status;

pub(crate) use protocol::{Answer, DeadLetterRequest, Request, ask};
pub(crate) use socket::Handler;
pub(crate) use socket::{ControlSocket, QueryError, ReportFn};
pub(crate) use status::{LiveSources, STATE_STOPPED, StatusReport, live_report, offline_report};
