//! `shoal services`: the services of a namespace.

use crate::opts::ClientOpts;
use crate::output::{print_json, services_table};

/// Arguments of `shoal services`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Namespace to list.
    #[arg(long, default_value = shoal_client::DEFAULT_NAMESPACE)]
    namespace: String,
    /// Only this group (default: every group).
    #[arg(long)]
    group: Option<String>,
    #[command(flatten)]
    client: ClientOpts,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let client = args.client.connect().await?;
    let result = client
        .list_services(&args.namespace, args.group.as_deref())
        .await;
    let _ = client.close().await;
    let mut services = result?;
    services.sort_by(|a, b| a.key.cmp(&b.key));
    if args.client.json {
        print_json(&services)?;
    } else {
        print!("{}", services_table(&services));
    }
    Ok(())
}
