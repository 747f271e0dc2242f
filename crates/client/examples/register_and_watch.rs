//! Registers this process as an instance of a service, subscribes to it, and prints
//! every change until Ctrl-C; then says Goodbye, which removes the instance.
//!
//! ```text
//! SHOAL_SERVERS=127.0.0.1:7400 SHOAL_CA=.shoal/ca.pem \
//!     cargo run -p shoal-client --example register_and_watch -- orders 10.0.0.7 8080
//! ```
//!
//! `SHOAL_SERVERS` is a comma-separated list of node addresses (default
//! `127.0.0.1:7400`); `SHOAL_CA` the CA file (default `.shoal/ca.pem`).

use shoal_client::{Client, ClientConfig, InstanceSpec, ServiceKey, ServiceView};

fn print_view(view: &ServiceView) {
    println!(
        "{} revision {}: {} instance(s){}",
        view.key,
        view.revision,
        view.instances.len(),
        if view.protected {
            " (protection applied)"
        } else {
            ""
        }
    );
    for i in &view.instances {
        println!(
            "  {} {}:{} weight {} healthy {} enabled {}",
            i.cluster, i.ip, i.port, i.weight, i.healthy, i.enabled
        );
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let service = args.next().unwrap_or_else(|| "example".to_string());
    let ip = args.next().unwrap_or_else(|| "127.0.0.1".to_string());
    let port: u16 = args.next().as_deref().unwrap_or("8080").parse()?;

    let servers = std::env::var("SHOAL_SERVERS").unwrap_or_else(|_| "127.0.0.1:7400".into());
    let ca = std::env::var("SHOAL_CA").unwrap_or_else(|_| ".shoal/ca.pem".into());
    let config = ClientConfig::new(servers.split(',').map(str::trim), ca)
        .with_client_name("register_and_watch");

    let client = Client::connect(config).await?;
    let key = ServiceKey::named(service);
    let spec = InstanceSpec::new(ip, port);
    let revision = client.register(&key, spec.clone()).await?;
    println!(
        "registered {key} {} at revision {revision}; session {} on {}",
        spec.key(),
        client.session_id(),
        client.home().unwrap_or_default()
    );

    let mut sub = client.subscribe(&key).await?;
    print_view(&sub.current());
    loop {
        tokio::select! {
            view = sub.next() => match view {
                Some(view) => print_view(&view),
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    client.close().await?;
    println!("goodbye: instance removed");
    Ok(())
}
