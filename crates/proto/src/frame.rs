//! Framing: a 4-byte big-endian length, then a MessagePack body encoded as maps.
//!
//! The length is checked against the maximum before a single byte of the body is
//! allocated, so an oversized or hostile length prefix costs nothing.

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use crate::error::ErrorBody;
use crate::messages::{RequestId, Response};

/// Default largest frame body, in bytes (1 MiB).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1 << 20;
/// Size of the length prefix.
pub const LEN_PREFIX_BYTES: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The length prefix announced more than the maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Largest allowed.
        max: usize,
    },
    /// The body did not decode as the expected message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A message could not be encoded (a bug, not bad input).
    #[error("cannot encode frame: {0}")]
    Encode(String),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The underlying stream failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `msg` as one frame: length prefix and body.
pub fn encode_frame<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; LEN_PREFIX_BYTES];
    rmp_serde::encode::write_named(&mut out, msg).map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = out.len() - LEN_PREFIX_BYTES;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    out[..LEN_PREFIX_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Encodes the `result` of a [`ServerFrame::Response`](crate::ServerFrame::Response)
/// on its own, so that the same answer can be framed for many requests by
/// [`append_response_frame`] without encoding it again.
pub fn encode_result(result: &Result<Response, ErrorBody>) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    rmp_serde::encode::write_named(&mut out, result)
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    Ok(out)
}

/// Appends one frame `ServerFrame::Response{id, result}` to `out`, where `result` is
/// what [`encode_result`] made. The bytes are exactly those [`encode_frame`] gives for
/// the same frame: only the id is written here. On error `out` is left as it was.
pub fn append_response_frame(
    out: &mut Vec<u8>,
    id: RequestId,
    result: &[u8],
    max: usize,
) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; LEN_PREFIX_BYTES]);
    // {"Response": {"id": id, "result": result}}: a one-entry map naming the variant,
    // then the variant's fields as a map (as rmp_serde's named encoding writes them).
    out.push(0x81);
    push_fixstr(out, "Response");
    out.push(0x82);
    push_fixstr(out, "id");
    push_uint(out, id);
    push_fixstr(out, "result");
    out.extend_from_slice(result);
    let len = out.len() - start - LEN_PREFIX_BYTES;
    if len > max {
        out.truncate(start);
        return Err(FrameError::TooLarge { len, max });
    }
    out[start..start + LEN_PREFIX_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// A MessagePack fixstr (shorter than 32 bytes).
fn push_fixstr(out: &mut Vec<u8>, s: &str) {
    debug_assert!(s.len() < 32);
    out.push(0xa0 | s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// A MessagePack unsigned integer in its shortest form.
fn push_uint(out: &mut Vec<u8>, v: u64) {
    if v < 0x80 {
        out.push(v as u8);
    } else if v <= u8::MAX as u64 {
        out.extend_from_slice(&[0xcc, v as u8]);
    } else if v <= u16::MAX as u64 {
        out.push(0xcd);
        out.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v <= u32::MAX as u64 {
        out.push(0xce);
        out.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// Reads the body length from a length prefix, refusing lengths above `max`.
pub fn decode_len(prefix: [u8; LEN_PREFIX_BYTES], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decodes a frame body (without its prefix).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    rmp_serde::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Reads one frame. `Ok(None)` when the stream ended cleanly between frames.
#[cfg(feature = "tokio")]
pub async fn read_frame<T, R>(reader: &mut R, max: usize) -> Result<Option<T>, FrameError>
where
    T: DeserializeOwned,
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut prefix = [0u8; LEN_PREFIX_BYTES];
    let mut got = 0;
    while got < LEN_PREFIX_BYTES {
        let n = reader.read(&mut prefix[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    let len = decode_len(prefix, max)?;
    let mut body = vec![0u8; len];
    match reader.read_exact(&mut body).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(FrameError::Truncated)
        }
        Err(e) => return Err(e.into()),
    }
    decode(&body).map(Some)
}

/// Writes one frame.
#[cfg(feature = "tokio")]
pub async fn write_frame<T, W>(writer: &mut W, msg: &T, max: usize) -> Result<(), FrameError>
where
    T: Serialize,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let bytes = encode_frame(msg, max)?;
    writer.write_all(&bytes).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::*;
    use shoal_storage::{InstanceSpec, ServiceKey};

    #[test]
    fn round_trip_as_maps() {
        let frame = ClientFrame::Request {
            id: 7,
            body: Request::Register {
                service: ServiceKey::named("orders"),
                instance: InstanceSpec::new("10.0.0.1", 8080),
            },
        };
        let bytes = encode_frame(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap();
        let len = decode_len(bytes[..4].try_into().unwrap(), DEFAULT_MAX_FRAME_BYTES).unwrap();
        assert_eq!(len, bytes.len() - 4);
        // Field names are on the wire: structs are maps.
        let body = &bytes[4..];
        assert!(body.windows(4).any(|w| w == b"port"));
        let back: ClientFrame = decode(body).unwrap();
        assert_eq!(back, frame);
    }

    #[test]
    fn spliced_response_frames_equal_encoded_ones() {
        let mut view = shoal_storage::ServiceView {
            key: ServiceKey::named("orders"),
            revision: 42,
            instances: Vec::new(),
            protected: false,
        };
        let spec = InstanceSpec::new("10.0.0.1", 8080);
        view.instances.push(shoal_storage::Instance {
            ip: spec.ip,
            port: spec.port,
            cluster: spec.cluster,
            weight: 2.5,
            healthy: true,
            enabled: true,
            metadata: [("seq".to_string(), "7".to_string())].into(),
            lease: shoal_storage::Lease::Session(shoal_storage::SessionId(u128::MAX - 3)),
            last_beat_ms: 1_700_000_000_000,
            stamp: 41,
        });
        let results = [
            Ok(Response::View(view)),
            Ok(Response::Done),
            Err(ErrorBody::new(crate::ErrorCode::NotFound, "nope")),
        ];
        for result in results {
            let body = encode_result(&result).unwrap();
            for id in [
                0,
                1,
                127,
                128,
                255,
                256,
                65_535,
                65_536,
                u32::MAX as u64,
                u32::MAX as u64 + 1,
                u64::MAX,
            ] {
                let frame = ServerFrame::Response {
                    id,
                    result: result.clone(),
                };
                let want = encode_frame(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap();
                let mut got = vec![9, 9];
                append_response_frame(&mut got, id, &body, DEFAULT_MAX_FRAME_BYTES).unwrap();
                assert_eq!(&got[..2], &[9, 9]);
                assert_eq!(&got[2..], &want[..], "id {id}");
                let back: ServerFrame = decode(&got[2 + LEN_PREFIX_BYTES..]).unwrap();
                assert_eq!(back, frame);
            }
        }
    }

    #[test]
    fn spliced_response_frames_respect_the_limit() {
        let body = encode_result(&Ok(Response::Done)).unwrap();
        let mut out = vec![1, 2, 3];
        let err = append_response_frame(&mut out, 7, &body, 4).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
        assert_eq!(out, vec![1, 2, 3]);
    }

    #[test]
    fn session_ids_keep_all_128_bits() {
        let id = shoal_storage::SessionId(u128::MAX - 12345);
        let frame = ClientFrame::Hello(Hello {
            version: 1,
            client_name: String::new(),
            resume: Some(id),
        });
        let bytes = encode_frame(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap();
        let back: ClientFrame = decode(&bytes[4..]).unwrap();
        assert_eq!(back, frame);
    }

    #[test]
    fn oversized_prefix_is_refused_before_allocation() {
        let err = decode_len(u32::MAX.to_be_bytes(), DEFAULT_MAX_FRAME_BYTES).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
    }

    #[test]
    fn garbage_is_malformed() {
        let err = decode::<ClientFrame>(&[0xc1, 0xff, 0x00]).unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)));
    }

    #[test]
    fn unknown_fields_are_ignored() {
        // A newer client may send fields this version does not know.
        #[derive(serde::Serialize)]
        struct HelloV2 {
            version: u32,
            client_name: String,
            resume: Option<shoal_storage::SessionId>,
            shiny_new_field: u64,
        }
        #[derive(serde::Serialize)]
        enum Frame {
            Hello(HelloV2),
        }
        let bytes = rmp_serde::to_vec_named(&Frame::Hello(HelloV2 {
            version: 1,
            client_name: "x".into(),
            resume: None,
            shiny_new_field: 5,
        }))
        .unwrap();
        let back: ClientFrame = decode(&bytes).unwrap();
        assert!(matches!(back, ClientFrame::Hello(h) if h.version == 1));
    }
}
