//! `shoal ring`: each member's share of the ring and, for a service, its owner.

use shoal_client::{ServiceKey, DEFAULT_GROUP, DEFAULT_NAMESPACE};

use crate::opts::ClientOpts;
use crate::output::{print_json, table};

/// Arguments of `shoal ring`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// A service whose owner to show.
    #[arg(value_name = "SERVICE")]
    service: Option<String>,
    /// Namespace of the service.
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    namespace: String,
    /// Group of the service.
    #[arg(long, default_value = DEFAULT_GROUP)]
    group: String,
    #[command(flatten)]
    client: ClientOpts,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let key = args
        .service
        .as_ref()
        .map(|s| ServiceKey::new(&args.namespace, &args.group, s));
    let client = args.client.connect().await?;
    let result = client.ring(key.as_ref()).await;
    let _ = client.close().await;
    let ring = result?;
    if args.client.json {
        return print_json(&ring);
    }
    let mut shares = ring.shares.clone();
    shares.sort_by(|a, b| a.0.cmp(&b.0));
    let rows: Vec<Vec<String>> = shares
        .iter()
        .map(|(node, share)| vec![node.to_string(), format!("{:.1}%", share * 100.0)])
        .collect();
    print!("{}", table(&["NODE", "SHARE"], &rows));
    println!("{} virtual nodes per member", ring.vnodes);
    if let Some(key) = key {
        match (&ring.owner, ring.position) {
            (Some(owner), Some(pos)) => {
                println!("{key} is owned by {owner} (position {pos:#018x})")
            }
            (Some(owner), None) => println!("{key} is owned by {owner}"),
            _ => println!("{key} has no owner: the ring is empty"),
        }
    }
    Ok(())
}
