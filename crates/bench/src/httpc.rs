//! A keep-alive HTTP/1.1 client, just enough for the Nacos v1 HTTP API of rnacos: one
//! request at a time per connection (HTTP/1.1 without pipelining, as the Nacos 1.x
//! SDKs do), bodies framed by `Content-Length` or chunked. A connection that fails is
//! dropped and the next request opens a new one, moving to the next address of its
//! list, so a load generator lane survives the death of its node.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A response: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    /// The body, or an error with the status and the body's text unless 200.
    pub fn ok(self) -> Result<Vec<u8>> {
        if self.status == 200 {
            Ok(self.body)
        } else {
            bail!(
                "status {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body).trim()
            )
        }
    }
}

/// One keep-alive connection (opened on first use) to the first reachable address of
/// a list.
pub struct HttpConn {
    addrs: Vec<String>,
    current: usize,
    stream: Option<BufReader<TcpStream>>,
    timeout: Duration,
    /// Connections opened so far (1 on a healthy lane).
    pub connects: u64,
}

impl HttpConn {
    /// A connection to `addrs[0]`, falling over to the next address when a request
    /// fails.
    pub fn new(addrs: Vec<String>, timeout: Duration) -> Self {
        HttpConn {
            addrs,
            current: 0,
            stream: None,
            timeout,
            connects: 0,
        }
    }

    /// The address requests go to now.
    pub fn addr(&self) -> &str {
        &self.addrs[self.current]
    }

    /// Sends one request and reads its response. On an I/O error or timeout the
    /// connection is closed and the next call opens one to the next address.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        form: Option<&str>,
    ) -> Result<Response> {
        let outcome = tokio::time::timeout(self.timeout, self.exchange(method, path, form)).await;
        let failed = match outcome {
            Ok(Ok(response)) => return Ok(response),
            Ok(Err(e)) => e,
            Err(_) => anyhow!("no answer within {:?}", self.timeout),
        };
        self.stream = None;
        let addr = self.addr().to_string();
        self.current = (self.current + 1) % self.addrs.len();
        Err(failed.context(format!("{method} http://{addr}{path}")))
    }

    async fn exchange(&mut self, method: &str, path: &str, form: Option<&str>) -> Result<Response> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.addr()).await?;
            stream.set_nodelay(true)?;
            self.connects += 1;
            self.stream = Some(BufReader::with_capacity(64 * 1024, stream));
        }
        let addr = self.addr().to_string();
        let stream = self
            .stream
            .as_mut()
            .ok_or_else(|| anyhow!("no connection"))?;
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
        match form {
            Some(body) => {
                request.push_str(&format!(
                    "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                ));
            }
            None => request.push_str("\r\n"),
        }
        stream.get_mut().write_all(request.as_bytes()).await?;
        let response = read_response(stream).await?;
        Ok(response)
    }
}

/// Reads one response from a keep-alive stream: the head up to the empty line, then
/// exactly the body its framing announces.
async fn read_response(stream: &mut BufReader<TcpStream>) -> Result<Response> {
    let mut head = Vec::with_capacity(256);
    loop {
        let before = head.len();
        let n = stream.read_until(b'\n', &mut head).await?;
        if n == 0 {
            bail!("connection closed before the response");
        }
        if head.len() > 64 * 1024 {
            bail!("response head too long");
        }
        if &head[before..] == b"\r\n" || &head[before..] == b"\n" {
            break;
        }
    }
    let head = parse_head(&head)?;
    let body = match head.framing {
        Framing::Length(n) => {
            let mut body = vec![0; n];
            stream.read_exact(&mut body).await?;
            body
        }
        Framing::Chunked => {
            let mut body = Vec::new();
            loop {
                let mut line = Vec::new();
                stream.read_until(b'\n', &mut line).await?;
                let text = std::str::from_utf8(&line)?.trim();
                let size_text = text.split(';').next().unwrap_or_default().trim();
                let size = usize::from_str_radix(size_text, 16)
                    .with_context(|| format!("bad chunk size {size_text:?}"))?;
                if size == 0 {
                    // Trailers end with an empty line.
                    loop {
                        line.clear();
                        stream.read_until(b'\n', &mut line).await?;
                        if line == b"\r\n" || line == b"\n" || line.is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                stream.read_exact(&mut body[start..]).await?;
                let mut crlf = [0u8; 2];
                stream.read_exact(&mut crlf).await?;
            }
            body
        }
        Framing::None => Vec::new(),
    };
    Ok(Response {
        status: head.status,
        body,
    })
}

/// How the body of a response is delimited.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    /// No body framing given: none is read (rnacos always sends a length).
    None,
}

/// The parts of a response head the client needs.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    status: u16,
    framing: Framing,
}

/// Parses `HTTP/1.1 200 OK\r\nName: value\r\n...\r\n\r\n`.
fn parse_head(raw: &[u8]) -> Result<Head> {
    let text = std::str::from_utf8(raw).context("response head is not UTF-8")?;
    let mut lines = text.lines();
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1.x response: {status_line:?}");
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status code in {status_line:?}"))?;
    let mut framing = Framing::None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            framing = Framing::Length(value.parse().context("bad content-length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.eq_ignore_ascii_case("chunked")
        {
            framing = Framing::Chunked;
            break;
        }
    }
    Ok(Head { status, framing })
}

/// Percent-encodes a query or form value (RFC 3986 unreserved characters stay).
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn heads() {
        let h = parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nx: y\r\n\r\n").unwrap();
        assert_eq!(
            h,
            Head {
                status: 200,
                framing: Framing::Length(7)
            }
        );
        let h = parse_head(b"HTTP/1.1 500 Internal\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        assert_eq!(h.status, 500);
        assert!(parse_head(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 abc\r\n\r\n").is_err());
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(encode("g@@svc-1"), "g%40%40svc-1");
        assert_eq!(encode("{\"seq\":\"1\"}"), "%7B%22seq%22%3A%221%22%7D");
        assert_eq!(encode("a.b~c_d"), "a.b~c_d");
    }

    #[tokio::test]
    async fn keep_alive_reads_two_responses_on_one_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut reader = BufReader::new(socket);
            let answers: [&[u8]; 2] = [
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n\
                  3\r\nno \r\n4\r\nsuch\r\n0\r\n\r\n",
            ];
            for answer in answers {
                let mut line = String::new();
                loop {
                    line.clear();
                    if reader.read_line(&mut line).await.unwrap() == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                reader.get_mut().write_all(answer).await.unwrap();
            }
            // Keep the connection open until the client is done.
            tokio::time::sleep(Duration::from_millis(500)).await;
        });
        let mut conn = HttpConn::new(vec![addr], Duration::from_secs(5));
        let a = conn.request("GET", "/a", None).await.unwrap();
        assert_eq!(a.clone().ok().unwrap(), b"ok");
        let b = conn.request("GET", "/b", None).await.unwrap();
        assert_eq!(b.status, 404);
        assert_eq!(b.body, b"no such");
        assert!(b.ok().unwrap_err().to_string().contains("404"));
        assert_eq!(conn.connects, 1);
    }
}
