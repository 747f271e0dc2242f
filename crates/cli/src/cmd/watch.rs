//! `shoal watch`: the instances of a service, then every change as it arrives.

use shoal_client::ServiceView;

use crate::opts::{ClientOpts, ServiceOpts};
use crate::output::{instances_table, now_rfc3339, print_json, view_summary};

/// Arguments of `shoal watch`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    service: ServiceOpts,
    /// Only show instances of this cluster; repeat for more (default: all clusters).
    #[arg(long = "cluster", value_name = "CLUSTER")]
    clusters: Vec<String>,
    /// Only show healthy, enabled instances.
    #[arg(long)]
    healthy: bool,
    #[command(flatten)]
    client: ClientOpts,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let mut shutdown = crate::cmd::Shutdown::install();
    let client = args.client.connect().await?;
    let key = args.service.key();
    let mut sub = match client.subscribe(&key).await {
        Ok(sub) => sub,
        Err(e) => {
            let _ = client.close().await;
            return Err(e.into());
        }
    };
    crate::cmd::report_reconnects(&client);
    show(&args, &sub.current())?;
    let ended = loop {
        tokio::select! {
            next = sub.next() => match next {
                Some(view) => show(&args, &view)?,
                None => break true,
            },
            _ = shutdown.wait() => break false,
        }
    };
    let _ = client.close().await;
    if ended {
        anyhow::bail!("the subscription ended");
    }
    Ok(())
}

/// One line of `shoal watch --json`.
#[derive(serde::Serialize)]
struct WatchLine<'a> {
    /// When the view arrived (RFC 3339, UTC).
    time: String,
    view: &'a ServiceView,
}

/// The view as the filters of `args` leave it.
fn filtered(args: &Args, view: &ServiceView) -> ServiceView {
    let mut view = view.clone();
    view.instances.retain(|i| {
        (args.clusters.is_empty() || args.clusters.contains(&i.cluster))
            && (!args.healthy || (i.healthy && i.enabled))
    });
    view
}

fn show(args: &Args, view: &ServiceView) -> anyhow::Result<()> {
    let view = filtered(args, view);
    let time = now_rfc3339();
    if args.client.json {
        print_json(&WatchLine { time, view: &view })?;
    } else {
        println!("--- {time} revision {}", view.revision);
        print!("{}", instances_table(&view));
        println!("{}", view_summary(&view));
    }
    Ok(())
}
