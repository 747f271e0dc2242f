//! The client commands, one a file.

pub(crate) mod deregister;
pub(crate) mod list;
pub(crate) mod members;
pub(crate) mod register;
pub(crate) mod ring;
pub(crate) mod services;
pub(crate) mod watch;

use shoal_client::Client;

/// Ctrl-C and SIGTERM, caught from the moment [`Shutdown::install`] is called (a
/// signal that arrives before anyone waits is kept, not lost to the default handler,
/// which would kill the process without its Goodbye).
pub(crate) struct Shutdown {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Shutdown {
    /// Installs the handlers now.
    pub(crate) fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Shutdown {
                interrupt: signal(SignalKind::interrupt()).ok(),
                terminate: signal(SignalKind::terminate()).ok(),
            }
        }
        #[cfg(not(unix))]
        Shutdown {}
    }

    /// Resolves on the next Ctrl-C or SIGTERM.
    pub(crate) async fn wait(&mut self) {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                _ = next(&mut self.interrupt) => {}
                _ = next(&mut self.terminate) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Tells the operator on stderr each time a long-running command's client reconnected,
/// so that a failover is visible. Ends with the client.
pub(crate) fn report_reconnects(client: &Client) {
    let mut generations = client.watch_generation();
    let observer = client.clone();
    // The task holds a clone of the client, so it would keep a dropped client alive:
    // the commands that use it close their client explicitly, and the task ends with
    // the process.
    tokio::spawn(async move {
        let mut seen = *generations.borrow_and_update();
        let mut session = observer.session_id();
        while generations.changed().await.is_ok() {
            let now = *generations.borrow_and_update();
            if now <= seen {
                continue;
            }
            seen = now;
            let Some(w) = observer.welcome() else {
                continue;
            };
            let how = if w.resumed {
                "session resumed"
            } else if w.session_id == session {
                "session continued, instances registered again"
            } else {
                "the old session had expired: NEW session, instances registered again"
            };
            eprintln!(
                "reconnected to {} at {} ({how}; session {})",
                w.node_id,
                observer.home().unwrap_or_default(),
                w.session_id
            );
            session = w.session_id;
        }
    });
}
