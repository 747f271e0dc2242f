//! Framing: a 4-byte big-endian length, then a MessagePack body encoded as maps.
//!
//! The length is checked against the maximum before a single byte of the body is
//! allocated, so an oversized or hostile length prefix costs nothing.

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use crate::error::ErrorBody;
use crate::messages::{RequestId, Response};
use crate::mpack;

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
    encode_with(msg, max, true)
}

/// Like [`encode_frame`], but structs as arrays, without their field names: smaller and
/// cheaper, and [`decode`] reads them too, but only a reader whose types have the same
/// fields does (one with fewer fields refuses the longer array). For links between two
/// ends that agreed on the shape of their messages.
pub fn encode_frame_compact<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    encode_with(msg, max, false)
}

/// Room a new frame buffer starts with: most requests and answers fit (a registration
/// is about 90 bytes), so the buffer is allocated once instead of growing from 8 bytes
/// through 16, 32, 64 and 128 as it is written.
const FIRST_FRAME_BYTES: usize = 256;

fn encode_with<T: Serialize>(msg: &T, max: usize, named: bool) -> Result<Vec<u8>, FrameError> {
    new_frame(|out| append_with(out, msg, max, named))
}

/// A new frame buffer holding what `append` appends to it (a frame).
pub(crate) fn new_frame(
    append: impl FnOnce(&mut Vec<u8>) -> Result<(), FrameError>,
) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(FIRST_FRAME_BYTES);
    append(&mut out)?;
    Ok(out)
}

/// Appends `msg` to `out` as one frame, as [`encode_frame`] encodes it, without a
/// buffer of its own: a writer gathering queued messages into one write. On error
/// `out` is left as it was.
pub fn append_frame<T: Serialize>(
    out: &mut Vec<u8>,
    msg: &T,
    max: usize,
) -> Result<(), FrameError> {
    append_with(out, msg, max, true)
}

/// Appends `msg` to `out` as one frame, as [`encode_frame_compact`] encodes it. On
/// error `out` is left as it was.
pub fn append_frame_compact<T: Serialize>(
    out: &mut Vec<u8>,
    msg: &T,
    max: usize,
) -> Result<(), FrameError> {
    append_with(out, msg, max, false)
}

fn append_with<T: Serialize>(
    out: &mut Vec<u8>,
    msg: &T,
    max: usize,
    named: bool,
) -> Result<(), FrameError> {
    append_frame_with(out, max, |out| {
        if named {
            rmp_serde::encode::write_named(out, msg)
        } else {
            rmp_serde::encode::write(out, msg)
        }
        .map_err(|e| FrameError::Encode(e.to_string()))
    })
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
    append_frame_with(out, max, |out| {
        put_response_head(out, id);
        out.extend_from_slice(result);
        Ok(())
    })
}

/// The start of `ServerFrame::Response { id, result }` with field names, up to the
/// result, which follows: `{"Response": {"id": id, "result": `, a one-entry map naming
/// the variant, then the variant's fields as a map (as rmp_serde's named encoding
/// writes them).
pub(crate) fn put_response_head(out: &mut Vec<u8>, id: RequestId) {
    mpack::put_variant(out, "Response");
    mpack::put_map_len(out, 2);
    mpack::put_str(out, "id");
    mpack::put_uint(out, id);
    mpack::put_str(out, "result");
}

/// Appends one frame whose body `body` writes (serde's encoding, or a hand-written
/// one), with its length in front. On error (the body's own, or a body over `max`)
/// `out` is left as it was.
pub fn append_frame_with(
    out: &mut Vec<u8>,
    max: usize,
    body: impl FnOnce(&mut Vec<u8>) -> Result<(), FrameError>,
) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; LEN_PREFIX_BYTES]);
    if let Err(e) = body(out) {
        out.truncate(start);
        return Err(e);
    }
    let len = out.len() - start - LEN_PREFIX_BYTES;
    if len > max {
        out.truncate(start);
        return Err(FrameError::TooLarge { len, max });
    }
    out[start..start + LEN_PREFIX_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
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

/// Reads frames from a stream through a buffer of its own: one read takes whatever
/// the stream has (several frames, or part of one), and each frame is decoded in place,
/// without a buffer of its own. The same checks as [`read_frame`]: the length is
/// checked before the buffer grows for it, and the end of the stream inside a frame is
/// [`FrameError::Truncated`].
#[cfg(feature = "tokio")]
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    max: usize,
    buf: Vec<u8>,
    /// Bytes `start..end` of `buf` are read and not yet returned.
    start: usize,
    end: usize,
    /// The buffer's size between frames: it grows for a larger frame and shrinks back
    /// once that frame is taken.
    read_bytes: usize,
}

/// What a [`FrameReader`] asks of its stream at least, when it has room.
#[cfg(feature = "tokio")]
const READ_BYTES: usize = 64 << 10;

#[cfg(feature = "tokio")]
impl<R: tokio::io::AsyncRead + Unpin> FrameReader<R> {
    /// Reads frames of at most `max` bytes from `inner`, 64 KiB at a time.
    pub fn new(inner: R, max: usize) -> Self {
        Self::with_read_bytes(inner, max, READ_BYTES)
    }

    /// Reads frames of at most `max` bytes from `inner`, `read_bytes` at a time: the
    /// memory it keeps between frames. A node reading ten thousand sessions keeps this
    /// small; a larger frame grows the buffer until it is taken.
    pub fn with_read_bytes(inner: R, max: usize, read_bytes: usize) -> Self {
        FrameReader {
            inner,
            max,
            buf: Vec::new(),
            start: 0,
            end: 0,
            read_bytes: read_bytes.max(LEN_PREFIX_BYTES),
        }
    }

    /// The next frame sent by a node, decoded by [`decode_server_frame`](crate::decode_server_frame).
    /// `Ok(None)` when the stream ended cleanly between frames.
    pub async fn next_server_frame(&mut self) -> Result<Option<crate::ServerFrame>, FrameError> {
        match self.next_body().await? {
            Some(body) => crate::decode_server_frame(&self.buf[body]).map(Some),
            None => Ok(None),
        }
    }

    /// The next frame, decoded by [`decode`]. `Ok(None)` when the stream ended cleanly
    /// between frames.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match self.next_body().await? {
            Some(body) => decode(&self.buf[body]).map(Some),
            None => Ok(None),
        }
    }

    /// The next frame, decoded by `decode` (a decoder with a fast path for some
    /// frames, such as [`crate::decode_client_frame`]). `Ok(None)` when the stream
    /// ended cleanly between frames.
    pub async fn next_with<T>(
        &mut self,
        decode: impl FnOnce(&[u8]) -> Result<T, FrameError>,
    ) -> Result<Option<T>, FrameError> {
        match self.next_body().await? {
            Some(body) => decode(&self.buf[body]).map(Some),
            None => Ok(None),
        }
    }

    /// As [`FrameReader::try_next`], decoded by `decode`.
    pub fn try_next_with<T>(
        &mut self,
        decode: impl FnOnce(&[u8]) -> Result<T, FrameError>,
    ) -> Option<Result<T, FrameError>> {
        match self.split_body() {
            Ok(Ok(body)) => Some(decode(&self.buf[body])),
            Ok(Err(_)) => None,
            Err(e) => Some(Err(e)),
        }
    }

    /// The next frame if the buffer already holds all of it, decoded by [`decode`];
    /// `None` when the next frame has not (wholly) arrived yet. Reads nothing from the
    /// stream: a reader takes what one read brought, frame by frame, and then waits.
    pub fn try_next<T: DeserializeOwned>(&mut self) -> Option<Result<T, FrameError>> {
        match self.split_body() {
            Ok(Ok(body)) => Some(decode(&self.buf[body])),
            Ok(Err(_)) => None,
            Err(e) => Some(Err(e)),
        }
    }

    /// Where the next frame's body is in `buf` if it has arrived whole, else how many
    /// bytes from `start` it needs (`Err`), after checking its length.
    fn split_body(&mut self) -> Result<Result<std::ops::Range<usize>, usize>, FrameError> {
        let have = self.end - self.start;
        if have < LEN_PREFIX_BYTES {
            return Ok(Err(LEN_PREFIX_BYTES));
        }
        let prefix = self.buf[self.start..self.start + LEN_PREFIX_BYTES]
            .try_into()
            .expect("4 bytes");
        let len = decode_len(prefix, self.max)?;
        if have < LEN_PREFIX_BYTES + len {
            return Ok(Err(LEN_PREFIX_BYTES + len));
        }
        let body = self.start + LEN_PREFIX_BYTES..self.start + LEN_PREFIX_BYTES + len;
        self.start = body.end;
        Ok(Ok(body))
    }

    /// Where the next frame's body is in `buf`.
    async fn next_body(&mut self) -> Result<Option<std::ops::Range<usize>>, FrameError> {
        use tokio::io::AsyncReadExt;
        loop {
            let have = self.end - self.start;
            let need = match self.split_body()? {
                Ok(body) => return Ok(Some(body)),
                Err(need) => need,
            };
            let size = need.max(self.read_bytes);
            if have == 0 {
                // Every frame read so far was taken: start over at the front, and give
                // back the room a larger frame took.
                self.start = 0;
                self.end = 0;
                if self.buf.len() > size {
                    self.buf.truncate(size);
                    self.buf.shrink_to_fit();
                }
            }
            // Room for the whole frame after `start`, and something to read into.
            if self.buf.len() - self.start < need || self.end == self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.start = 0;
                self.end = have;
            }
            if self.buf.len() < size {
                self.buf.resize(size, 0);
            }
            let n = self.inner.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return if have == 0 {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
            self.end += n;
        }
    }
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

    /// A registration request, as a client frames it.
    fn register_frame() -> ClientFrame {
        ClientFrame::Request {
            id: 7,
            body: Request::Register {
                service: ServiceKey::named("orders"),
                instance: InstanceSpec::new("10.0.0.1", 8080),
            },
        }
    }

    #[test]
    fn round_trip_as_maps() {
        let frame = register_frame();
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
    fn compact_frames_round_trip_and_carry_no_field_names() {
        let frame = register_frame();
        let named = encode_frame(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap();
        let bytes = encode_frame_compact(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap();
        assert!(bytes.len() < named.len());
        assert!(!bytes[4..].windows(4).any(|w| w == b"port"));
        let back: ClientFrame = decode(&bytes[4..]).unwrap();
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
            for id in crate::mpack::EDGE_UINTS {
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
                // A view reads as clients see it: no session ids, no stamps.
                let seen = match &result {
                    Ok(Response::View(v)) => Ok(Response::View(crate::compact::as_clients_see(v))),
                    other => other.clone(),
                };
                assert_eq!(back, ServerFrame::Response { id, result: seen });
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

    /// A stream that hands out at most `step` bytes a read.
    #[cfg(feature = "tokio")]
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        step: usize,
    }

    #[cfg(feature = "tokio")]
    impl tokio::io::AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = self
                .step
                .min(buf.remaining())
                .min(self.data.len() - self.pos);
            let pos = self.pos;
            buf.put_slice(&self.data[pos..pos + n]);
            self.pos += n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn frame_reader_reads_frames_however_the_bytes_arrive() {
        let view = |n: usize| shoal_storage::ServiceView {
            key: ServiceKey::named("orders"),
            revision: n as u64,
            instances: (0..n)
                .map(|i| shoal_storage::Instance {
                    ip: format!("10.0.{}.{}", i / 256, i % 256),
                    port: 8080,
                    cluster: "DEFAULT".into(),
                    weight: 1.0,
                    healthy: true,
                    enabled: true,
                    metadata: Default::default(),
                    // As clients read them: no stamps, no last beats of session
                    // instances (see crate::compact).
                    lease: shoal_storage::Lease::Session(shoal_storage::SessionId(0)),
                    last_beat_ms: 0,
                    stamp: 0,
                })
                .collect(),
            protected: false,
        };
        let frames = vec![
            ServerFrame::Push(view(3)),
            ServerFrame::Response {
                id: 1,
                result: Ok(Response::Done),
            },
            // Larger than one read of the reader's buffer.
            ServerFrame::Push(view(5_000)),
            ServerFrame::Response {
                id: 2,
                result: Ok(Response::View(view(140))),
            },
            ServerFrame::Error(ErrorBody::new(crate::ErrorCode::NotReady, "x")),
        ];
        let mut bytes = Vec::new();
        for f in &frames {
            bytes.extend(encode_frame(f, DEFAULT_MAX_FRAME_BYTES).unwrap());
        }
        assert!(bytes.len() > 2 * READ_BYTES);
        for step in [1, 3, 4, 5, 1000, 70_000, usize::MAX] {
            let data = Trickle {
                data: bytes.clone(),
                pos: 0,
                step,
            };
            let mut rd = FrameReader::new(data, DEFAULT_MAX_FRAME_BYTES);
            for f in &frames {
                assert_eq!(rd.next_server_frame().await.unwrap().as_ref(), Some(f));
            }
            assert!(
                rd.next_server_frame().await.unwrap().is_none(),
                "step {step}"
            );
            // A small buffer grows for the large frame and shrinks back after it.
            let data = Trickle {
                data: bytes.clone(),
                pos: 0,
                step,
            };
            let mut rd = FrameReader::with_read_bytes(data, DEFAULT_MAX_FRAME_BYTES, 4096);
            let mut largest = 0;
            for f in &frames {
                assert_eq!(rd.next_server_frame().await.unwrap().as_ref(), Some(f));
                largest = largest.max(rd.buf.len());
            }
            assert!(largest > READ_BYTES, "step {step}: grew to {largest}");
            assert!(rd.next_server_frame().await.unwrap().is_none());
            assert!(rd.buf.len() <= 4096, "step {step}: kept {}", rd.buf.len());
            // The generic decoding, same frames.
            let mut rd = FrameReader::new(&bytes[..], DEFAULT_MAX_FRAME_BYTES);
            for f in &frames {
                assert_eq!(rd.next::<ServerFrame>().await.unwrap().as_ref(), Some(f));
            }
            assert!(rd.next::<ServerFrame>().await.unwrap().is_none());
        }
        // Ends inside a frame, in its prefix or its body.
        for cut in [1, 3, 4, 10, bytes.len() - 1] {
            let mut rd = FrameReader::new(&bytes[..cut], DEFAULT_MAX_FRAME_BYTES);
            let mut got = Vec::new();
            let err = loop {
                match rd.next_server_frame().await {
                    Ok(Some(f)) => got.push(f),
                    Ok(None) => panic!("cut at {cut}: clean end"),
                    Err(e) => break e,
                }
            };
            assert!(matches!(err, FrameError::Truncated), "{err}");
            assert!(got.len() < frames.len());
        }
        // A prefix above the limit is refused before the buffer grows for it.
        let huge = u32::MAX.to_be_bytes();
        let mut rd = FrameReader::new(&huge[..], DEFAULT_MAX_FRAME_BYTES);
        let err = rd.next_server_frame().await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
        assert!(rd.buf.len() <= READ_BYTES);
        // A malformed body is an error.
        let mut rd = FrameReader::new(&[0, 0, 0, 2, 0xc1, 0xc1][..], DEFAULT_MAX_FRAME_BYTES);
        let err = rd.next_server_frame().await.unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)));
    }

    /// `try_next` hands out the frames one read brought, and never reads itself.
    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn try_next_takes_only_what_has_arrived() {
        let frames: Vec<ServerFrame> = (0..5)
            .map(|i| ServerFrame::Response {
                id: i,
                result: Ok(crate::Response::Applied { revision: i }),
            })
            .collect();
        let mut bytes = Vec::new();
        for f in &frames {
            bytes.extend(encode_frame(f, DEFAULT_MAX_FRAME_BYTES).unwrap());
        }
        let one = bytes.len() / frames.len();
        // Each read brings two and a half frames.
        let data = Trickle {
            data: bytes.clone(),
            pos: 0,
            step: one * 5 / 2,
        };
        let mut rd = FrameReader::new(data, DEFAULT_MAX_FRAME_BYTES);
        assert!(rd.try_next::<ServerFrame>().is_none(), "nothing read yet");
        assert_eq!(
            rd.next::<ServerFrame>().await.unwrap().as_ref(),
            Some(&frames[0])
        );
        assert_eq!(rd.try_next::<ServerFrame>().unwrap().unwrap(), frames[1]);
        assert!(rd.try_next::<ServerFrame>().is_none(), "half of the third");
        assert_eq!(
            rd.next::<ServerFrame>().await.unwrap().as_ref(),
            Some(&frames[2])
        );
        assert_eq!(rd.try_next::<ServerFrame>().unwrap().unwrap(), frames[3]);
        assert_eq!(rd.try_next::<ServerFrame>().unwrap().unwrap(), frames[4]);
        assert!(rd.try_next::<ServerFrame>().is_none());
        assert!(rd.next::<ServerFrame>().await.unwrap().is_none());
        // A bad length in the buffer is an error at once.
        let huge = u32::MAX.to_be_bytes();
        let mut rd = FrameReader::new(&huge[..], DEFAULT_MAX_FRAME_BYTES);
        assert!(rd.try_next::<ServerFrame>().is_none());
        let _ = rd.next::<ServerFrame>().await.unwrap_err();
    }

    /// A service key and a node id are shared text in memory; on the wire they are
    /// what they always were: the key a struct of three strings, the id a string.
    #[test]
    fn shared_keys_and_ids_keep_their_wire_form() {
        #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
        struct PlainKey {
            namespace: String,
            group: String,
            service: String,
        }
        #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
        struct PlainId(String);
        let key = ServiceKey::new("prod", "payments", "orders");
        let plain = PlainKey {
            namespace: "prod".into(),
            group: "payments".into(),
            service: "orders".into(),
        };
        for named in [true, false] {
            let (a, b) = (
                encode_with(&key, DEFAULT_MAX_FRAME_BYTES, named).unwrap(),
                encode_with(&plain, DEFAULT_MAX_FRAME_BYTES, named).unwrap(),
            );
            assert_eq!(a, b, "named: {named}");
            assert_eq!(decode::<ServiceKey>(&b[4..]).unwrap(), key);
            assert_eq!(decode::<PlainKey>(&a[4..]).unwrap(), plain);
        }
        let id = shoal_storage::NodeId::new("node-7");
        let a = encode_frame_compact(&id, DEFAULT_MAX_FRAME_BYTES).unwrap();
        let b = encode_frame_compact(&PlainId("node-7".into()), DEFAULT_MAX_FRAME_BYTES).unwrap();
        assert_eq!(a, b);
        assert_eq!(decode::<shoal_storage::NodeId>(&b[4..]).unwrap(), id);
    }

    #[test]
    fn appended_frames_are_the_encoded_frames_and_a_refused_one_leaves_nothing() {
        let frame = register_frame();
        let mut out = vec![9u8; 3];
        append_frame(&mut out, &frame, DEFAULT_MAX_FRAME_BYTES).unwrap();
        append_frame_compact(&mut out, &frame, DEFAULT_MAX_FRAME_BYTES).unwrap();
        let named = encode_frame(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap();
        let compact = encode_frame_compact(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap();
        assert_eq!(out, [&[9u8; 3][..], &named, &compact].concat());
        // Too large: an error, and `out` as it was.
        let before = out.clone();
        let err = append_frame(&mut out, &frame, 8).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { max: 8, .. }), "{err}");
        assert_eq!(out, before);
    }

    #[test]
    fn a_frame_by_reference_is_the_frame() {
        let frame = register_frame();
        let ClientFrame::Request { id, body } = &frame else {
            unreachable!()
        };
        let by_ref = ClientFrameRef::Request { id: *id, body };
        for named in [true, false] {
            assert_eq!(
                encode_with(&by_ref, DEFAULT_MAX_FRAME_BYTES, named).unwrap(),
                encode_with(&frame, DEFAULT_MAX_FRAME_BYTES, named).unwrap(),
                "named: {named}"
            );
        }
        let hello = Hello {
            version: crate::PROTOCOL_VERSION,
            client_name: "test".into(),
            resume: None,
        };
        assert_eq!(
            encode_frame(&ClientFrameRef::Hello(&hello), DEFAULT_MAX_FRAME_BYTES).unwrap(),
            encode_frame(&ClientFrame::Hello(hello), DEFAULT_MAX_FRAME_BYTES).unwrap()
        );
    }

    /// One request of every kind, every field set (options `Some`, lists and maps not
    /// empty).
    fn every_request() -> Vec<(&'static str, Request)> {
        let service = ServiceKey::new("prod", "payments", "orders");
        let mut spec = InstanceSpec::new("10.0.0.1", 8080);
        spec.metadata.insert("zone".into(), "a".into());
        spec.ttl = Some(shoal_storage::TtlLease::default());
        let key = spec.key();
        let meta = shoal_storage::ServiceMeta {
            protect_threshold: 0.5,
            metadata: [("team".to_string(), "x".to_string())].into(),
        };
        vec![
            (
                "RegisterMany",
                Request::RegisterMany {
                    items: vec![(service.clone(), spec.clone())],
                },
            ),
            (
                "Register",
                Request::Register {
                    service: service.clone(),
                    instance: spec.clone(),
                },
            ),
            (
                "Update",
                Request::Update {
                    service: service.clone(),
                    instance: spec,
                },
            ),
            (
                "Deregister",
                Request::Deregister {
                    service: service.clone(),
                    instance: key.clone(),
                },
            ),
            (
                "Beat",
                Request::Beat {
                    service: service.clone(),
                    instance: key,
                },
            ),
            (
                "SetServiceMeta",
                Request::SetServiceMeta {
                    service: service.clone(),
                    meta,
                },
            ),
            (
                "Query",
                Request::Query {
                    service: service.clone(),
                    clusters: vec!["DEFAULT".into()],
                    healthy_only: true,
                },
            ),
            (
                "ListServices",
                Request::ListServices {
                    namespace: "prod".into(),
                    group: Some("payments".into()),
                },
            ),
            (
                "Subscribe",
                Request::Subscribe {
                    service: service.clone(),
                },
            ),
            (
                "Unsubscribe",
                Request::Unsubscribe {
                    service: service.clone(),
                },
            ),
            ("Members", Request::Members),
            (
                "Ring",
                Request::Ring {
                    service: Some(service),
                },
            ),
            ("Ping", Request::Ping),
            ("Goodbye", Request::Goodbye),
        ]
    }

    /// Every request reads back the same from structs as arrays, as from maps.
    #[test]
    fn every_request_round_trips_with_structs_as_arrays() {
        for (name, body) in every_request() {
            let frame = ClientFrame::Request { id: 9, body };
            for named in [true, false] {
                let bytes = encode_with(&frame, DEFAULT_MAX_FRAME_BYTES, named).unwrap();
                let back: ClientFrame = decode(&bytes[4..]).unwrap();
                assert_eq!(back, frame, "{name}, named: {named}");
            }
        }
    }

    /// The array form of each request, pinned: when this fails, the shape of a request
    /// type changed. Bump `REQUEST_SHAPE` (a client and a node of different shapes then
    /// keep to maps), and update the sizes and the shape here.
    #[test]
    fn the_request_shape_is_pinned() {
        let sizes: Vec<(&str, usize)> = every_request()
            .into_iter()
            .map(|(name, body)| {
                let frame = ClientFrame::Request { id: 9, body };
                (
                    name,
                    encode_frame_compact(&frame, DEFAULT_MAX_FRAME_BYTES)
                        .unwrap()
                        .len(),
                )
            })
            .collect();
        assert_eq!(crate::REQUEST_SHAPE, 1);
        let pinned = vec![
            ("RegisterMany", 101),
            ("Register", 95),
            ("Update", 93),
            ("Deregister", 71),
            ("Beat", 65),
            ("SetServiceMeta", 72),
            ("Query", 55),
            ("ListServices", 44),
            ("Subscribe", 49),
            ("Unsubscribe", 51),
            ("Members", 23),
            ("Ring", 44),
            ("Ping", 20),
            ("Goodbye", 23),
        ];
        assert_eq!(
            sizes, pinned,
            "the request shape changed: bump REQUEST_SHAPE"
        );
        // A registration without metadata or Ttl: less than half the bytes of its map
        // form (docs/protocol.md).
        let frame = register_frame();
        let named = encode_frame(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap().len();
        let compact = encode_frame_compact(&frame, DEFAULT_MAX_FRAME_BYTES)
            .unwrap()
            .len();
        assert_eq!((named, compact), (190, 89));
    }
}
