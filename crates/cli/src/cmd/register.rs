//! `shoal register`: register an instance and hold its session until Ctrl-C.

use std::time::Duration;

use anyhow::Context;
use shoal_client::{Client, ClientError, ErrorCode, InstanceSpec, ServiceKey, TtlLease};

use crate::opts::{meta_map, parse_ip_port, parse_meta, ClientOpts, ServiceOpts};
use crate::output::print_json;

/// Beat interval of `--ttl` instances (Nacos v1's, with the default 15 s / 30 s lease).
const BEAT_INTERVAL: Duration = Duration::from_secs(5);

/// Arguments of `shoal register`.
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
    /// Relative weight, 0..=10000 (0 takes no traffic).
    #[arg(long, default_value_t = 1.0)]
    weight: f64,
    /// Metadata entry KEY=VALUE; repeat for more.
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_meta)]
    meta: Vec<(String, String)>,
    /// Register the instance disabled (it takes no traffic).
    #[arg(long)]
    disabled: bool,
    /// Register the instance as unhealthy.
    #[arg(long)]
    unhealthy: bool,
    /// Keep the instance alive by beats (every 5 s; unhealthy after 15 s without, removed
    /// after 30 s) instead of by this session.
    #[arg(long)]
    ttl: bool,
    #[command(flatten)]
    client: ClientOpts,
}

/// The line `shoal register --json` prints once registered.
#[derive(serde::Serialize)]
struct Registered<'a> {
    event: &'static str,
    service: &'a ServiceKey,
    instance: &'a InstanceSpec,
    lease: &'static str,
    revision: u64,
    /// Hex, as everywhere else: a 128-bit number does not survive most JSON parsers.
    session_id: String,
    node_id: &'a str,
    home: &'a str,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let mut shutdown = crate::cmd::Shutdown::install();
    let (ip, port) = parse_ip_port(&args.address)?;
    let key = args.service.key();
    let spec = InstanceSpec {
        cluster: args.cluster.clone(),
        weight: args.weight,
        healthy: !args.unhealthy,
        enabled: !args.disabled,
        metadata: meta_map(&args.meta),
        ttl: args.ttl.then(TtlLease::default),
        ..InstanceSpec::new(ip.to_string(), port)
    };
    let client = args.client.connect().await?;
    let revision = match client.register(&key, spec.clone()).await {
        Ok(r) => r,
        Err(e) => {
            let _ = client.close().await;
            return Err(e.into());
        }
    };
    let welcome = client.welcome();
    let node = welcome
        .as_ref()
        .map(|w| w.node_id.to_string())
        .unwrap_or_default();
    let home = client.home().unwrap_or_default();
    let lease = if args.ttl { "ttl" } else { "session" };
    if args.client.json {
        print_json(&Registered {
            event: "registered",
            service: &key,
            instance: &spec,
            lease,
            revision,
            session_id: client.session_id().to_string(),
            node_id: &node,
            home: &home,
        })?;
    } else {
        println!(
            "registered {key} {} weight {} ({lease} lease) at revision {revision}; session {} on {node} ({home}); Ctrl-C removes it",
            spec.key(),
            spec.weight,
            client.session_id(),
        );
    }
    crate::cmd::report_reconnects(&client);

    if args.ttl {
        let held = tokio::select! {
            r = beat_forever(&client, &key, &spec) => r,
            _ = shutdown.wait() => Ok(()),
        };
        // A Ttl instance outlives the session: remove it explicitly.
        let removed = match client.deregister(&key, &spec.key()).await {
            Ok(_) => Ok(()),
            Err(ClientError::Server(b)) if b.code == ErrorCode::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        let closed = client.close().await;
        held?;
        removed.context("removing the instance")?;
        closed.context("closing the session")?;
    } else {
        shutdown.wait().await;
        // A second Ctrl-C stops waiting for the Goodbye (e.g. while no node answers).
        tokio::select! {
            closed = client.close() => closed.context(
                "saying Goodbye (the node removes the instance after the session grace period)",
            )?,
            _ = shutdown.wait() => anyhow::bail!(
                "interrupted before Goodbye: the node removes the instance after the session grace period"
            ),
        }
    }
    if !args.client.json {
        eprintln!("deregistered {key} {}", spec.key());
    }
    Ok(())
}

/// Beats every [`BEAT_INTERVAL`]; registers again if the node forgot the instance
/// (it expired while beats could not get through).
async fn beat_forever(
    client: &Client,
    key: &ServiceKey,
    spec: &InstanceSpec,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(BEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; the registration was the first beat
    loop {
        tick.tick().await;
        match client.beat(key, &spec.key()).await {
            Ok(()) => {}
            Err(ClientError::Server(b)) if b.code == ErrorCode::NotFound => {
                eprintln!("the instance expired; registering it again");
                client.register(key, spec.clone()).await?;
            }
            Err(e) if e.is_transient() => eprintln!("beat failed (will retry): {e}"),
            Err(e) => return Err(e.into()),
        }
    }
}
