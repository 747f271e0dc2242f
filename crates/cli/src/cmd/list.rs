//! `shoal list`: the instances of a service.

use shoal_client::QueryOptions;

use crate::opts::{ClientOpts, ServiceOpts};
use crate::output::{instances_table, print_json, view_summary};

/// Arguments of `shoal list`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    service: ServiceOpts,
    /// Only instances of this cluster; repeat for more (default: all clusters).
    #[arg(long = "cluster", value_name = "CLUSTER")]
    clusters: Vec<String>,
    /// Only healthy, enabled instances (all of them when the protection threshold is
    /// reached; the summary line says so).
    #[arg(long)]
    healthy: bool,
    #[command(flatten)]
    pub(crate) client: ClientOpts,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let client = args.client.connect().await?;
    let options = QueryOptions {
        clusters: args.clusters.clone(),
        healthy_only: args.healthy,
    };
    let result = client.query(&args.service.key(), options).await;
    let _ = client.close().await;
    let view = result?;
    if args.client.json {
        print_json(&view)?;
    } else {
        print!("{}", instances_table(&view));
        println!("{}", view_summary(&view));
    }
    Ok(())
}
