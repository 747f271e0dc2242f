//! `shoal members`: the cluster's members as the home node sees them.

use crate::opts::ClientOpts;
use crate::output::{print_json, table};

/// Arguments of `shoal members`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(flatten)]
    client: ClientOpts,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let client = args.client.connect().await?;
    let result = client.members().await;
    let _ = client.close().await;
    let mut members = result?;
    members.sort_by(|a, b| a.id.cmp(&b.id));
    if args.client.json {
        return print_json(&members);
    }
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.addr.clone(),
                m.state.clone(),
                m.ready.to_string(),
                if m.is_self { "*".into() } else { String::new() },
                m.last_heard_ago_ms
                    .map(|ms| format!("{ms} ms ago"))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["NODE", "ADDR", "STATE", "READY", "SELF", "LAST HEARD"],
            &rows
        )
    );
    Ok(())
}
