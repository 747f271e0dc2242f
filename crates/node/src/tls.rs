//! TLS for the QUIC endpoint: loading certificates, and generating development ones.
//!
//! Production deployments configure `tls.cert`, `tls.key` and `tls.ca` (PEM files).
//! Without them a node uses a development CA in its data directory (`ca.pem`,
//! `ca.key`), created on first start unless one is already there (so `shoal dev`
//! can give every node of a local cluster the same CA), and issues itself a
//! certificate for `localhost`, `127.0.0.1`, `::1` and its advertised host.
//!
//! The crypto provider is always `ring`, chosen explicitly: with two providers in the
//! dependency graph rustls' `builder()` would panic at run time.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The subject of the development CA. A node re-derives the CA's parameters from it to
/// sign its own certificate, so it must never change.
const DEV_CA_NAME: &str = "Shoal development CA";

/// Where the PEM files of a node's identity and trust root are.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The node's certificate chain.
    pub cert: PathBuf,
    /// The node's private key.
    pub key: PathBuf,
    /// The CA that signs every node (and that clients trust).
    pub ca: PathBuf,
}

/// The crypto provider Shoal uses everywhere.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes sure a development CA exists in `dir` (creating `ca.pem` and `ca.key` if
/// absent) and returns the path of `ca.pem`.
pub fn ensure_dev_ca(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_pem = dir.join("ca.pem");
    let ca_key = dir.join("ca.key");
    if ca_pem.exists() && ca_key.exists() {
        return Ok(ca_pem);
    }
    let key = rcgen::KeyPair::generate().context("generating the CA key")?;
    let cert = dev_ca_params()?
        .self_signed(&key)
        .context("signing the CA")?;
    write_private(&ca_key, key.serialize_pem().as_bytes())?;
    std::fs::write(&ca_pem, cert.pem()).with_context(|| format!("writing {}", ca_pem.display()))?;
    Ok(ca_pem)
}

fn dev_ca_params() -> Result<rcgen::CertificateParams> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, DEV_CA_NAME);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    Ok(params)
}

/// Issues a certificate for `node_id` signed by the development CA in `ca_dir`,
/// valid for `hosts` (DNS names or IP addresses), and writes `node.pem`/`node.key`
/// into `out_dir`. Returns the files to load.
pub fn issue_dev_cert(
    ca_dir: &Path,
    out_dir: &Path,
    node_id: &str,
    hosts: &[String],
) -> Result<TlsFiles> {
    let ca = ensure_dev_ca(ca_dir)?;
    let ca_key_pem = std::fs::read_to_string(ca_dir.join("ca.key"))
        .with_context(|| format!("reading {}", ca_dir.join("ca.key").display()))?;
    let ca_key = rcgen::KeyPair::from_pem(&ca_key_pem).context("parsing the CA key")?;
    let issuer = rcgen::Issuer::new(dev_ca_params()?, ca_key);

    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for h in hosts {
        if !names.contains(h) {
            names.push(h.clone());
        }
    }
    let mut params = rcgen::CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("shoal node {node_id}"));
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let key = rcgen::KeyPair::generate().context("generating the node key")?;
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing the node certificate")?;

    std::fs::create_dir_all(out_dir)?;
    let files = TlsFiles {
        cert: out_dir.join("node.pem"),
        key: out_dir.join("node.key"),
        ca,
    };
    std::fs::write(&files.cert, cert.pem())?;
    write_private(&files.key, key.serialize_pem().as_bytes())?;
    Ok(files)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in {}", path.display());
    Ok(certs)
}

/// Reads the private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("parsing the key in {}", path.display()))?
        .with_context(|| format!("no private key in {}", path.display()))
}

fn roots(files: &TlsFiles) -> Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(&files.ca)? {
        roots.add(cert).context("adding the cluster CA")?;
    }
    Ok(Arc::new(roots))
}

/// The server side of the QUIC endpoint: TLS 1.3 only, the given ALPNs.
///
/// A client certificate is optional (applications connect without one) but, when
/// presented, must chain to the cluster CA. Peer links additionally require one:
/// see `peer::accept`.
pub fn server_config(files: &TlsFiles, alpns: &[&[u8]]) -> Result<rustls::ServerConfig> {
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(files)?, provider())
            .allow_unauthenticated()
            .build()
            .context("building the client certificate verifier")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .context("the node certificate and key do not match")?;
    config.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    Ok(config)
}

/// The client side of a peer link: trusts the cluster CA and presents this node's
/// certificate (mutual TLS), ALPN `shoal-peer/1`.
pub fn peer_client_config(files: &TlsFiles) -> Result<rustls::ClientConfig> {
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .with_root_certificates(roots(files)?)
        .with_client_auth_cert(certs, key)
        .context("the node certificate and key do not match")?;
    config.alpn_protocols = vec![shoal_proto::PEER_ALPN.to_vec()];
    Ok(config)
}
