//! The QUIC and TLS settings of a client connection.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use crate::config::ClientConfig;
use crate::error::{ClientError, Result};

/// Builds the quinn client configuration: TLS 1.3 with the ring provider (chosen
/// explicitly: with two providers in the build, rustls's `builder()` panics), ALPN
/// `shoal/1`, the CA file as the only root, and QUIC keep-alives as the session
/// heartbeat.
pub(crate) fn quinn_config(config: &ClientConfig) -> Result<quinn::ClientConfig> {
    let ca = config
        .ca_file
        .as_deref()
        .ok_or_else(|| ClientError::Config("no CA file given".into()))?;
    let roots = load_roots(ca)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![shoal_proto::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ClientError::Tls(e.to_string()))?;

    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(config.keep_alive_interval));
    let idle = quinn::IdleTimeout::try_from(config.idle_timeout)
        .map_err(|e| ClientError::Config(format!("idle timeout: {e}")))?;
    transport.max_idle_timeout(Some(idle));
    // Nodes send heartbeat datagrams; receiving one is all they are for (it restarts
    // the idle and keep-alive timers), so they are never read. quinn keeps unread
    // datagrams up to this many bytes, counting its own overhead of about 40 bytes
    // each, and drops the oldest beyond it: about a dozen one-byte heartbeats.
    transport.datagram_receive_buffer_size(Some(HEARTBEAT_BUFFER_BYTES));

    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(Arc::new(transport));
    Ok(client)
}

/// Bytes of unread heartbeat datagrams a connection keeps (see [`quinn_config`]).
const HEARTBEAT_BUFFER_BYTES: usize = 512;

fn load_roots(path: &Path) -> Result<rustls::RootCertStore> {
    let file = File::open(path)
        .map_err(|e| ClientError::Tls(format!("cannot open CA file {}: {e}", path.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut BufReader::new(file)) {
        let cert = cert.map_err(|e| {
            ClientError::Tls(format!("cannot read CA file {}: {e}", path.display()))
        })?;
        roots
            .add(cert)
            .map_err(|e| ClientError::Tls(format!("bad certificate in {}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(ClientError::Tls(format!(
            "CA file {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_empty_ca_is_a_clear_error() {
        let cfg = ClientConfig::new(["127.0.0.1:7400"], "/nonexistent/ca.pem");
        let err = quinn_config(&cfg).unwrap_err().to_string();
        assert!(err.contains("cannot open CA file"), "{err}");

        let dir = std::env::temp_dir().join(format!("shoal-client-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let cfg = ClientConfig::new(["127.0.0.1:7400"], &empty);
        let err = quinn_config(&cfg).unwrap_err().to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
