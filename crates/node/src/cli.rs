//! Command-line entry points used by the `shoal` binary.

/// Arguments of `shoal server`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServerArgs {
    /// Configuration file (TOML).
    #[arg(long, env = "SHOAL_CONFIG")]
    pub config: Option<std::path::PathBuf>,
}

/// Runs `shoal server` until SIGTERM or Ctrl-C.
pub fn run_server(args: ServerArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("not yet built")
}

/// Arguments of `shoal dev`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DevArgs {
    /// Number of nodes to start.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
}

/// Runs `shoal dev`: starts a local cluster and stops it on Ctrl-C.
pub fn run_dev(args: DevArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("not yet built")
}
