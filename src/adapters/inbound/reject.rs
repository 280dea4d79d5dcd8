//! Errors answered before a request reaches the RPC service (authentication,
//! load shedding, rate limiting), written in the caller's own protocol so every
//! client library decodes them as ordinary RPC errors: Connect gets its JSON
//! error body with the code's HTTP status; gRPC and gRPC-Web get HTTP 200 with
//! a trailers-only `grpc-status`/`grpc-message` (gRPC-Web also carries the
//! trailers as a body frame, which is where its clients look).

use bytes::{BufMut, Bytes, BytesMut};
use connectrpc::ErrorCode;
use connectrpc::protocol::Protocol;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use super::server::Body;

/// Characters gRPC requires percent-encoded in `grpc-message`.
const GRPC_MESSAGE: &AsciiSet = &CONTROLS.add(b'%');

/// The flag byte of a gRPC-Web trailers frame.
const GRPC_WEB_TRAILERS: u8 = 0x80;

/// Builds the error response for a request with headers `req` in its own protocol.
pub fn error_response(req: &HeaderMap, code: ErrorCode, message: &str) -> Response<Body> {
    let detected = Protocol::detect(req);
    match detected.map(|p| p.protocol) {
        Some(Protocol::Grpc) => grpc(req, code, message, false),
        // Text mode would need the frame base64-encoded; its clients read the headers.
        Some(Protocol::GrpcWeb) => grpc(
            req,
            code,
            message,
            !detected.is_some_and(|p| p.is_text_mode),
        ),
        // Connect, Connect GET (no content type) and anything unrecognised get the Connect form.
        _ => connect(code, message),
    }
}

fn connect(code: ErrorCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({"code": code.as_str(), "message": message}).to_string();
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *r.status_mut() = code.http_status();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn grpc(req: &HeaderMap, code: ErrorCode, message: &str, web: bool) -> Response<Body> {
    let status = code.grpc_code().to_string();
    let encoded = utf8_percent_encode(message, GRPC_MESSAGE).to_string();
    let body = if web {
        let block = format!("grpc-status: {status}\r\ngrpc-message: {encoded}\r\n");
        let mut b = BytesMut::with_capacity(5 + block.len());
        b.put_u8(GRPC_WEB_TRAILERS);
        // The block is a few hundred bytes at most, far below u32::MAX.
        b.put_u32(u32::try_from(block.len()).unwrap_or(u32::MAX));
        b.put_slice(block.as_bytes());
        b.freeze()
    } else {
        Bytes::new()
    };
    let mut r = Response::new(Full::new(body).boxed_unsync());
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    // Echo the request's content type (e.g. application/grpc+proto); it was recognised above.
    let content_type = req
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("application/grpc"));
    h.insert(header::CONTENT_TYPE, content_type);
    if let Ok(v) = HeaderValue::from_str(&status) {
        h.insert("grpc-status", v);
    }
    if let Ok(v) = HeaderValue::from_str(&encoded) {
        h.insert("grpc-message", v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(content_type: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(ct) = content_type {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_str(ct).expect("valid"),
            );
        }
        h
    }

    async fn body(r: Response<Body>) -> Bytes {
        r.into_body()
            .collect()
            .await
            .expect("infallible")
            .to_bytes()
    }

    #[tokio::test]
    async fn connect_gets_json_and_the_codes_http_status() {
        for ct in [
            Some("application/json"),
            Some("application/proto"),
            None,
            Some("text/plain"),
        ] {
            let r = error_response(
                &headers(ct),
                ErrorCode::Unauthenticated,
                "missing bearer token",
            );
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{ct:?}");
            assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
            let v: serde_json::Value =
                serde_json::from_slice(&body(r).await).expect("JSON error body");
            assert_eq!(v["code"], "unauthenticated");
            assert_eq!(v["message"], "missing bearer token");
        }
        let r = error_response(
            &headers(Some("application/json")),
            ErrorCode::ResourceExhausted,
            "x",
        );
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        let r = error_response(&headers(None), ErrorCode::Unavailable, "x");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn grpc_is_trailers_only_with_status_16() {
        let r = error_response(
            &headers(Some("application/grpc+proto")),
            ErrorCode::Unauthenticated,
            "bad token: 100%",
        );
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "16");
        assert_eq!(r.headers()["grpc-message"], "bad token: 100%25");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/grpc+proto");
        assert!(body(r).await.is_empty());
    }

    #[tokio::test]
    async fn grpc_web_text_gets_headers_only() {
        let r = error_response(
            &headers(Some("application/grpc-web-text")),
            ErrorCode::Unauthenticated,
            "no",
        );
        assert_eq!(r.headers()["grpc-status"], "16");
        assert!(body(r).await.is_empty());
    }

    #[tokio::test]
    async fn grpc_web_carries_a_trailers_frame() {
        let r = error_response(
            &headers(Some("application/grpc-web+proto")),
            ErrorCode::Unauthenticated,
            "no",
        );
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "16");
        let b = body(r).await;
        assert_eq!(b[0], GRPC_WEB_TRAILERS);
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        assert_eq!(len, b.len() - 5);
        let block = std::str::from_utf8(&b[5..]).expect("ASCII");
        assert!(block.contains("grpc-status: 16\r\n"), "{block}");
        assert!(block.contains("grpc-message: no\r\n"), "{block}");
    }
}
