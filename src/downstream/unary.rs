//! A unary gRPC call to a downstream: the request message framed and sent
//! through the balancer, the answer's one message and status read back.
//!
//! Why not tonic's generated clients: every call through one builds an
//! encoding body stream, a boxed body and a streaming decoder, and boxes
//! the transport's future: 1.3 KiB of future and several allocations per
//! downstream call, for a message bfb sends whole and an answer it reads
//! whole (docs/performance.md). What tonic's client does that matters here
//! is kept: the caller's metadata (grpc-timeout, trace context, identity)
//! as headers, the answer's size limit, and its status and trailers as a
//! `tonic::Status`, so [`crate::resilience::attempt`] classifies them as
//! before. bfb neither sends nor accepts compressed messages.

use std::marker::PhantomData;

use futures::{TryFutureExt, future::Either};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{
    HeaderMap, HeaderValue, Method, StatusCode, Uri,
    header::{CONTENT_TYPE, TE},
    uri::PathAndQuery,
};
use prost::Message;
use tonic::{Code, Request, Response, Status, metadata::MetadataMap};

use super::{
    balance::Balanced,
    transport::{Answer, AnswerBody, SendError},
};
use crate::resilience::Tried;

/// The gRPC message prefix: a compressed flag and a 4-byte length.
const PREFIX: usize = 5;

/// One unary method of a downstream, sent through its balancer.
pub struct Unary<M, T> {
    balanced: Balanced,
    path: PathAndQuery,
    /// The largest answer accepted (bytes of message).
    max_response: usize,
    /// The static service token's `authorization` value, if any.
    token: Option<HeaderValue>,
    _types: PhantomData<fn(M) -> T>,
}

impl<M, T> Unary<M, T>
where
    M: Message,
    T: Message + Default,
{
    /// The method at `path` (`/package.Service/Method`).
    pub fn new(
        balanced: Balanced,
        path: &'static str,
        max_response: usize,
        token: Option<HeaderValue>,
    ) -> Unary<M, T> {
        Unary {
            balanced,
            path: PathAndQuery::from_static(path),
            max_response,
            token,
            _types: PhantomData,
        }
    }

    /// Calls the method: `request`'s metadata become headers, its extensions
    /// may name the endpoint a previous attempt went to ([`Tried`]).
    ///
    /// Not an `async fn`: the request is encoded and sent before it returns,
    /// and the future holds only what the answer needs (see
    /// [`super::transport::Connection::send`]).
    pub fn call(
        &self,
        request: Request<M>,
    ) -> impl Future<Output = Result<Response<T>, Status>> + Send + use<M, T> {
        let (metadata, extensions, message) = request.into_parts();
        let mut head = request_head(metadata, self.path.clone());
        if let Some(token) = &self.token {
            head.headers
                .insert(http::header::AUTHORIZATION, token.clone());
        }
        let sent = self
            .balanced
            .send(extensions.get::<Tried>(), head, encode(&message));
        let max_response = self.max_response;
        // Combinators rather than an `async` block, which would keep `sent`
        // beside `read`'s future instead of in its place.
        sent.map_err(status_of)
            .and_then(move |answer| read(answer, max_response))
            .map_ok(Response::new)
    }
}

/// A failed send as the status tonic's client would have reported: a
/// transport failure carries its error as the source.
pub(super) fn status_of(e: SendError) -> Status {
    match e {
        SendError::Status(status) => status,
        SendError::Transport(e) => Status::from_error(Box::new(e)),
    }
}

/// The request's headers: a POST to `path` with gRPC's content type, and
/// the call's metadata.
pub(super) fn request_head(metadata: MetadataMap, path: PathAndQuery) -> http::request::Parts {
    let (mut head, ()) = http::Request::new(()).into_parts();
    head.method = Method::POST;
    head.uri = Uri::from(path);
    head.headers = metadata.into_headers();
    head.headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    head.headers
        .insert(TE, HeaderValue::from_static("trailers"));
    head
}

/// `message` framed as one uncompressed gRPC message.
pub(super) fn encode<M: Message>(message: &M) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(PREFIX + len);
    buf.put_u8(0);
    // A message over 4 GiB cannot be built from bfb's bounded requests.
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // Cannot fail: the buffer has room for the encoded length.
    let _ = message.encode(&mut buf);
    buf.freeze()
}

/// Reads the answer: its one message and its status, which wins over the
/// message when not OK. The headers are checked at once; the future reads
/// the body without keeping them.
pub(super) fn read<T: Message + Default>(
    answer: Answer,
    max_response: usize,
) -> impl Future<Output = Result<T, Status>> {
    // A trailers-only answer: the status in the headers, no message.
    if let Some(status) = grpc_status(&answer.head.headers) {
        return Either::Left(std::future::ready(Err(match status.code() {
            Code::Ok => Status::internal("downstream answered OK without a message"),
            _ => status,
        })));
    }
    if answer.head.status != StatusCode::OK {
        return Either::Left(std::future::ready(Err(http_status(answer.head.status))));
    }
    Either::Right(read_body(answer.into_body(), max_response))
}

async fn read_body<T: Message + Default>(
    mut answer: AnswerBody,
    max_response: usize,
) -> Result<T, Status> {
    let mut body = Body::default();
    while let Some(data) = answer.data().await {
        body.push(data?);
        if body.len() > PREFIX + max_response {
            return Err(too_large(body.len() - PREFIX, max_response));
        }
    }
    let trailers = answer.trailers().await?.unwrap_or_default();
    // OK is read without building a status (which copies the trailers).
    match trailers.get("grpc-status").map(HeaderValue::as_bytes) {
        Some(b"0") => decode(body.into_bytes(), max_response),
        _ => Err(grpc_status(&trailers)
            .unwrap_or_else(|| Status::internal("downstream answer has no grpc-status"))),
    }
}

/// The answer's data frames: usually one, kept without a copy.
#[derive(Default)]
struct Body {
    first: Option<Bytes>,
    rest: BytesMut,
}

impl Body {
    fn push(&mut self, data: Bytes) {
        match &self.first {
            None if self.rest.is_empty() => self.first = Some(data),
            _ => {
                if let Some(first) = self.first.take() {
                    self.rest.extend_from_slice(&first);
                }
                self.rest.extend_from_slice(&data);
            }
        }
    }

    fn len(&self) -> usize {
        self.first.as_ref().map_or(self.rest.len(), Bytes::len)
    }

    fn into_bytes(self) -> Bytes {
        self.first.unwrap_or_else(|| self.rest.freeze())
    }
}

/// Decodes the one message of a unary answer.
fn decode<T: Message + Default>(mut frame: Bytes, max_response: usize) -> Result<T, Status> {
    if frame.len() < PREFIX {
        return Err(Status::internal("downstream answered OK without a message"));
    }
    let compressed = frame.get_u8();
    let len = frame.get_u32() as usize;
    if compressed != 0 {
        return Err(Status::internal(
            "downstream sent a compressed message; none was negotiated",
        ));
    }
    if len > max_response {
        return Err(too_large(len, max_response));
    }
    if frame.len() != len {
        return Err(Status::internal(
            "downstream answer is not one whole gRPC message",
        ));
    }
    T::decode(frame)
        .map_err(|e| Status::internal(format!("downstream answer does not decode: {e}")))
}

/// tonic's status for an answer over the limit.
fn too_large(len: usize, max: usize) -> Status {
    Status::out_of_range(format!(
        "Error, decoded message length too large: found {len} bytes, the limit is: {max} bytes"
    ))
}

/// The status in `headers` (`grpc-status`, `grpc-message`), the rest of
/// them as its metadata (where `grpc-retry-pushback-ms` is read).
/// Status details are not read: nothing of a downstream's error leaves bfb.
fn grpc_status(headers: &HeaderMap) -> Option<Status> {
    let code = Code::from_bytes(headers.get("grpc-status")?.as_bytes());
    let message = headers
        .get("grpc-message")
        .map(|m| {
            percent_encoding::percent_decode(m.as_bytes())
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    Some(Status::with_metadata(
        code,
        message,
        MetadataMap::from_headers(headers.clone()),
    ))
}

/// gRPC's mapping of an HTTP status without a gRPC one.
fn http_status(status: StatusCode) -> Status {
    let code = match status {
        StatusCode::BAD_REQUEST => Code::Internal,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::NOT_FOUND => Code::Unimplemented,
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
        _ => Code::Unknown,
    };
    Status::new(
        code,
        format!("downstream answered HTTP {}", status.as_u16()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::downstream::profile::v1::{GetProfileResponse, Profile};

    fn framed(message: &impl Message) -> Bytes {
        encode(message)
    }

    #[test]
    fn one_framed_message_decodes_and_anything_else_is_an_error() {
        let answer = GetProfileResponse {
            profile: Some(Profile {
                display_name: "Ada".into(),
                ..Profile::default()
            }),
        };
        let bytes = framed(&answer);
        let back: GetProfileResponse = decode(bytes.clone(), 1 << 20).expect("decodes");
        assert_eq!(back, answer);
        // Over the limit: tonic's code for it.
        let big = decode::<GetProfileResponse>(bytes.clone(), 3).expect_err("too large");
        assert_eq!(big.code(), Code::OutOfRange);
        // Two messages, a cut one, a compressed one, none.
        let two = [bytes.clone(), bytes.clone()].concat();
        let cut = bytes.slice(..bytes.len() - 1);
        let mut compressed = bytes.to_vec();
        compressed[0] = 1;
        for bad in [two.into(), cut, compressed.into(), Bytes::new()] {
            let e = decode::<GetProfileResponse>(bad, 1 << 20).expect_err("bad framing");
            assert_eq!(e.code(), Code::Internal);
        }
    }

    #[test]
    fn split_frames_are_joined() {
        let bytes = framed(&GetProfileResponse::default());
        let mut body = Body::default();
        body.push(bytes.slice(..2));
        body.push(bytes.slice(2..));
        assert_eq!(body.len(), bytes.len());
        assert_eq!(body.into_bytes(), bytes);
    }

    #[test]
    fn a_status_in_headers_keeps_its_metadata_and_decodes_its_message() {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("14"));
        h.insert("grpc-message", HeaderValue::from_static("down%20for%20now"));
        h.insert("grpc-retry-pushback-ms", HeaderValue::from_static("-1"));
        let s = grpc_status(&h).expect("a status");
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.message(), "down for now");
        assert!(s.metadata().get("grpc-retry-pushback-ms").is_some());
        assert!(grpc_status(&HeaderMap::new()).is_none());
        assert_eq!(
            http_status(StatusCode::BAD_GATEWAY).code(),
            Code::Unavailable
        );
        assert_eq!(http_status(StatusCode::IM_A_TEAPOT).code(), Code::Unknown);
    }
}
