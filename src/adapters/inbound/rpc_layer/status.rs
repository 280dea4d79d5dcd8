//! Where each protocol puts an RPC's status, read from the response as it
//! streams by: Connect unary errors in a JSON body (`{"code": "not_found",
//! ..}`; the HTTP status alone is ambiguous, 400 is invalid_argument,
//! failed_precondition or out_of_range), gRPC in the `grpc-status` trailer
//! (or header, for trailers-only responses), gRPC-Web in the trailer frame at
//! the end of the body (base64-encoded for `grpc-web-text`). A response that
//! ends, or is dropped, before its status is known gets the code a client
//! would infer.

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use connectrpc::ErrorCode;
use http::{HeaderMap, Response};

/// Largest Connect error body inspected for its code.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// Largest gRPC-Web trailer frame inspected.
const MAX_WEB_TRAILER: usize = 8 * 1024;

/// The wire protocol of a request, from its content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    Connect,
    Grpc,
    GrpcWeb { text: bool },
}

impl Protocol {
    pub(super) fn of(headers: &HeaderMap) -> Self {
        let ct = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if ct.starts_with("application/grpc-web-text") {
            Protocol::GrpcWeb { text: true }
        } else if ct.starts_with("application/grpc-web") {
            Protocol::GrpcWeb { text: false }
        } else if ct.starts_with("application/grpc") {
            Protocol::Grpc
        } else {
            Protocol::Connect
        }
    }

    pub(super) fn system(self) -> &'static str {
        match self {
            Protocol::Connect => "connect_rpc",
            Protocol::Grpc | Protocol::GrpcWeb { .. } => "grpc",
        }
    }
}

/// Where the status of a response will come from.
pub(super) enum Watch {
    /// Known from the headers already.
    Known(Option<ErrorCode>, Option<String>),
    /// In the `grpc-status` trailer.
    GrpcTrailers,
    /// In the gRPC-Web trailer frame inside the body.
    GrpcWeb(WebScanner),
    /// In a Connect JSON error body; `fallback` from the HTTP status.
    ConnectError { fallback: ErrorCode, body: Vec<u8> },
}

impl Watch {
    pub(super) fn for_response<B>(protocol: Protocol, response: &Response<B>) -> Self {
        let headers = response.headers();
        let status = response.status();
        match protocol {
            Protocol::Grpc | Protocol::GrpcWeb { .. } => {
                if let Some((code, message)) = grpc_status(headers) {
                    Watch::Known(code, message)
                } else if status != http::StatusCode::OK {
                    Watch::Known(Some(code_from_http(status.as_u16())), None)
                } else if let Protocol::GrpcWeb { text } = protocol {
                    Watch::GrpcWeb(WebScanner::new(text))
                } else {
                    Watch::GrpcTrailers
                }
            }
            Protocol::Connect => {
                if status.is_success() {
                    Watch::Known(None, None)
                } else {
                    Watch::ConnectError {
                        fallback: code_from_http(status.as_u16()),
                        body: Vec::new(),
                    }
                }
            }
        }
    }

    pub(super) fn on_data(&mut self, data: &[u8]) {
        match self {
            Watch::ConnectError { body, .. } => {
                let room = MAX_ERROR_BODY.saturating_sub(body.len());
                body.extend_from_slice(&data[..data.len().min(room)]);
            }
            Watch::GrpcWeb(scanner) => scanner.feed(data),
            Watch::Known(..) | Watch::GrpcTrailers => {}
        }
    }

    pub(super) fn on_trailers(&mut self, trailers: &HeaderMap) {
        if let Watch::GrpcTrailers = self
            && let Some((code, message)) = grpc_status(trailers)
        {
            *self = Watch::Known(code, message);
        }
    }

    /// The status to report; `ended` is false when the body was dropped early.
    pub(super) fn verdict(self, ended: bool) -> (Option<ErrorCode>, Option<String>) {
        match self {
            Watch::Known(code, message) => (code, message),
            Watch::ConnectError { fallback, body } => {
                #[derive(serde::Deserialize)]
                struct ConnectErrorBody {
                    code: Option<String>,
                    message: Option<String>,
                }
                match serde_json::from_slice::<ConnectErrorBody>(&body) {
                    Ok(parsed) => (
                        Some(parsed.code.and_then(|c| c.parse().ok()).unwrap_or(fallback)),
                        parsed.message,
                    ),
                    Err(_) if !ended => (Some(ErrorCode::Canceled), None),
                    Err(_) => (Some(fallback), None),
                }
            }
            Watch::GrpcWeb(scanner) => match scanner.status() {
                Some((code, message)) => (code, message),
                None if !ended => (Some(ErrorCode::Canceled), None),
                None => (
                    Some(ErrorCode::Unknown),
                    Some("response ended without grpc-status".into()),
                ),
            },
            Watch::GrpcTrailers if !ended => (Some(ErrorCode::Canceled), None),
            Watch::GrpcTrailers => (
                Some(ErrorCode::Unknown),
                Some("response ended without grpc-status".into()),
            ),
        }
    }
}

/// `grpc-status` (and `grpc-message`) from headers or trailers.
fn grpc_status(map: &HeaderMap) -> Option<(Option<ErrorCode>, Option<String>)> {
    let raw = map.get("grpc-status")?.to_str().ok()?.trim();
    let message = map
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(percent_decode);
    Some(parse_grpc_status(raw, message))
}

fn parse_grpc_status(raw: &str, message: Option<String>) -> (Option<ErrorCode>, Option<String>) {
    match raw.parse::<u32>() {
        Ok(0) => (None, None),
        Ok(n) => (
            Some(ErrorCode::from_grpc_code(n).unwrap_or(ErrorCode::Unknown)),
            message,
        ),
        Err(_) => (Some(ErrorCode::Unknown), message),
    }
}

/// The code a client infers from an HTTP status without a usable error body
/// (the mapping the Connect and gRPC specifications give).
pub(super) fn code_from_http(status: u16) -> ErrorCode {
    match status {
        400 => ErrorCode::Internal,
        401 => ErrorCode::Unauthenticated,
        403 => ErrorCode::PermissionDenied,
        404 => ErrorCode::Unimplemented,
        429 | 502 | 503 | 504 => ErrorCode::Unavailable,
        _ => ErrorCode::Unknown,
    }
}

/// Decodes the percent-encoding of `grpc-message`; a `%` that starts no
/// valid escape is kept as is, and invalid UTF-8 is replaced.
pub(super) fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Finds the trailer frame of a gRPC-Web body (flag 0x80) as the body
/// streams by, decoding base64 first for `grpc-web-text`.
pub(super) struct WebScanner {
    text: Option<Base64Decoder>,
    header: [u8; 5],
    header_len: usize,
    remaining: usize,
    in_trailer: bool,
    trailer: Vec<u8>,
    trailer_done: bool,
}

impl WebScanner {
    pub(super) fn new(text: bool) -> Self {
        Self {
            text: text.then(Base64Decoder::default),
            header: [0; 5],
            header_len: 0,
            remaining: 0,
            in_trailer: false,
            trailer: Vec::new(),
            trailer_done: false,
        }
    }

    pub(super) fn feed(&mut self, data: &[u8]) {
        match self.text.take() {
            Some(mut decoder) => {
                let decoded = decoder.feed(data);
                self.text = Some(decoder);
                self.feed_binary(&decoded);
            }
            None => self.feed_binary(data),
        }
    }

    fn feed_binary(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining == 0 {
                let take = (5 - self.header_len).min(data.len());
                self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
                self.header_len += take;
                data = &data[take..];
                if self.header_len < 5 {
                    return;
                }
                self.header_len = 0;
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                self.in_trailer = self.header[0] & 0x80 != 0;
                if self.in_trailer {
                    self.trailer.clear();
                    self.trailer_done = len == 0;
                }
                self.remaining = len;
            } else {
                let take = self.remaining.min(data.len());
                if self.in_trailer {
                    let room = MAX_WEB_TRAILER.saturating_sub(self.trailer.len());
                    self.trailer.extend_from_slice(&data[..take.min(room)]);
                }
                self.remaining -= take;
                data = &data[take..];
                if self.remaining == 0 && self.in_trailer {
                    self.trailer_done = true;
                }
            }
        }
    }

    pub(super) fn status(&self) -> Option<(Option<ErrorCode>, Option<String>)> {
        if !self.trailer_done {
            return None;
        }
        let text = String::from_utf8_lossy(&self.trailer);
        let mut status = None;
        let mut message = None;
        for line in text.split("\r\n").flat_map(|l| l.split('\n')) {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let key = key.trim();
            if key.eq_ignore_ascii_case("grpc-status") {
                status = Some(value.trim().to_owned());
            } else if key.eq_ignore_ascii_case("grpc-message") {
                message = Some(percent_decode(value.trim()));
            }
        }
        status.map(|s| parse_grpc_status(&s, message))
    }
}

/// Standard base64 as gRPC-Web frames it: each frame is encoded on its own,
/// so padding may end any 4-character group, and stray bits are tolerated.
const WEB_TEXT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Incremental base64 decoding of a `grpc-web-text` body; each 4-character
/// group is decoded on its own, so padding in the middle of the stream (one
/// group per frame) is fine. Whitespace is skipped, the URL-safe characters
/// are read as their standard twins, and a group that is not base64 yields
/// nothing (its frame cannot be read either way).
#[derive(Default)]
struct Base64Decoder {
    quad: [u8; 4],
    len: usize,
}

impl Base64Decoder {
    fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() / 4 * 3 + 3);
        for &c in data.iter().filter(|c| !c.is_ascii_whitespace()) {
            self.quad[self.len] = match c {
                b'-' => b'+',
                b'_' => b'/',
                c => c,
            };
            self.len += 1;
            if self.len == 4 {
                self.len = 0;
                let mut bytes = [0; 3];
                if let Ok(n) = WEB_TEXT.decode_slice(self.quad, &mut bytes) {
                    out.extend_from_slice(&bytes[..n]);
                }
            }
        }
        out
    }
}
