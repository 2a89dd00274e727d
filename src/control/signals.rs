//! What signals ask of a running agent (SPEC section 9): SIGTERM and SIGINT stop it, SIGHUP
//! reloads the config, SIGUSR1 drains now. Through tokio's signal handling
//! (`signal-hook-registry` underneath); this module only turns signals into the agent's
//! controls and knows nothing of what they do.

use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Where each signal goes.
pub(crate) struct SignalTargets {
    /// SIGTERM, SIGINT.
    pub shutdown: CancellationToken,
    /// SIGUSR1.
    pub drain_now: Arc<Notify>,
    /// SIGHUP.
    pub reload: Arc<Notify>,
}

/// Installs the handlers (failing here, before the agent starts, if one cannot be) and spawns
/// the task that forwards each signal. Call it inside the runtime.
pub(crate) fn spawn_handlers(targets: SignalTargets) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut hup = signal(SignalKind::hangup())?;
    let SignalTargets {
        shutdown,
        drain_now,
        reload,
    } = targets;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM received"); shutdown.cancel(); }
                _ = int.recv() => { tracing::info!("SIGINT received"); shutdown.cancel(); }
                _ = usr1.recv() => { tracing::info!("SIGUSR1 received: draining now"); drain_now.notify_one(); }
                _ = hup.recv() => { tracing::info!("SIGHUP received: reloading the config"); reload.notify_one(); }
            }
        }
    });
    Ok(())
}
