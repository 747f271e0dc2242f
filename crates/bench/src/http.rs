//! The few HTTP GETs the cluster benchmark makes to the nodes' admin API
//! (`/v1/node`, `/v1/members`, `/v1/ring`): HTTP/1.1 over a fresh TCP connection,
//! `Connection: close`, JSON body. Written out here so the benchmark needs no HTTP
//! client crate.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one GET may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// `GET http://{addr}{path}` and its body parsed as JSON; an error unless the status
/// is 200.
pub async fn get_json(addr: &str, path: &str) -> Result<serde_json::Value> {
    let raw = tokio::time::timeout(TIMEOUT, get_raw(addr, path))
        .await
        .map_err(|_| anyhow!("GET http://{addr}{path}: no answer within {TIMEOUT:?}"))?
        .with_context(|| format!("GET http://{addr}{path}"))?;
    let body = parse_response(&raw).with_context(|| format!("GET http://{addr}{path}"))?;
    serde_json::from_slice(&body).with_context(|| format!("GET http://{addr}{path}: not JSON"))
}

async fn get_raw(addr: &str, path: &str) -> Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    Ok(raw)
}

/// The body of a complete HTTP/1.1 response with status 200 (plain or chunked).
fn parse_response(raw: &[u8]) -> Result<Vec<u8>> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("truncated response"))?;
    let head = std::str::from_utf8(&raw[..split]).context("response head is not UTF-8")?;
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!(
            "status {status:?}: {}",
            String::from_utf8_lossy(body).trim()
        );
    }
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    if chunked {
        dechunk(body)
    } else {
        Ok(body.to_vec())
    }
}

/// Decodes a chunked body: `size-in-hex\r\n data \r\n`, until a chunk of size 0.
fn dechunk(mut body: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("truncated chunk size"))?;
        let size_text = std::str::from_utf8(&body[..eol])?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        body = &body[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_body() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n{\"a\":1}";
        assert_eq!(parse_response(raw).unwrap(), b"{\"a\":1}");
    }

    #[test]
    fn chunked_body() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n";
        assert_eq!(parse_response(raw).unwrap(), b"[1,2]");
    }

    #[test]
    fn other_status_is_an_error() {
        let raw = b"HTTP/1.1 503 Service Unavailable\r\n\r\nnot ready\n";
        let e = parse_response(raw).unwrap_err().to_string();
        assert!(e.contains("503") && e.contains("not ready"), "{e}");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
