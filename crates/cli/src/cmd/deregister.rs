//! `shoal deregister`: remove an instance.

use shoal_client::InstanceKey;

use crate::opts::{parse_ip_port, ClientOpts, ServiceOpts};
use crate::output::print_json;

/// Arguments of `shoal deregister`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    service: ServiceOpts,
    /// Address of the instance: IP:PORT, e.g. 10.0.0.1:8080 or [::1]:8080.
    #[arg(value_name = "IP:PORT")]
    address: String,
    /// Cluster of the instance.
    #[arg(long, default_value = shoal_client::DEFAULT_CLUSTER)]
    cluster: String,
    #[command(flatten)]
    client: ClientOpts,
}

/// The line `shoal deregister --json` prints.
#[derive(serde::Serialize)]
struct Deregistered<'a> {
    event: &'static str,
    service: &'a shoal_client::ServiceKey,
    instance: &'a InstanceKey,
    revision: u64,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let (ip, port) = parse_ip_port(&args.address)?;
    let key = args.service.key();
    let instance = InstanceKey {
        cluster: args.cluster.clone(),
        ip: ip.to_string(),
        port,
    };
    let client = args.client.connect().await?;
    let result = client.deregister(&key, &instance).await;
    let _ = client.close().await;
    let revision = result?;
    if args.client.json {
        print_json(&Deregistered {
            event: "deregistered",
            service: &key,
            instance: &instance,
            revision,
        })?;
    } else {
        println!("deregistered {key} {instance} at revision {revision}");
    }
    Ok(())
}
