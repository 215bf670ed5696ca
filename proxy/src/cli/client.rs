//! A minimal blocking HTTP/1.1 client over the agent's Unix socket. One
//! request per connection (`Connection: close`), so the response ends at EOF.
use anyhow::{anyhow, bail, Context};
use serde::de::DeserializeOwned;
use shepherd::api::types::ErrorBody;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

pub struct Api {
    socket: PathBuf,
}

impl Api {
    pub fn new(socket: PathBuf) -> Self {
        Self { socket }
    }

    /// Sends a request and returns the parsed JSON response, or an error
    /// carrying the API's `{error, detail}` as one readable line.
    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<T> {
        let (status, text) = self.raw(method, path, body)?;
        if !(200..300).contains(&status) {
            if let Ok(e) = serde_json::from_str::<ErrorBody>(&text) {
                bail!("{} ({})", e.detail, e.error);
            }
            bail!("the agent answered HTTP {status}: {}", text.trim());
        }
        let text = if text.trim().is_empty() {
            "null"
        } else {
            &text
        };
        serde_json::from_str(text)
            .with_context(|| format!("unexpected response from the agent: {text}"))
    }

    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<(u16, String)> {
        let mut s = UnixStream::connect(&self.socket).with_context(|| {
            format!(
                "cannot reach the shepherd agent at {} (is `shepherd run` running there? set --api-socket or SHEPHERD_SOCKET)",
                self.socket.display()
            )
        })?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: shepherd\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())
            .context("sending the request to the agent")?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp)
            .context("reading the agent's response")?;
        parse_response(&resp)
    }
}

/// Splits a raw HTTP/1.1 response into status and body (de-chunking if needed).
fn parse_response(resp: &[u8]) -> anyhow::Result<(u16, String)> {
    let text = String::from_utf8_lossy(resp);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("truncated response from the agent"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("malformed status line from the agent"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s
            .split_once("\r\n")
            .ok_or_else(|| anyhow!("bad chunked body"))?;
        let n = usize::from_str_radix(size.trim(), 16).map_err(|_| anyhow!("bad chunk size"))?;
        if n == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..n).ok_or_else(|| anyhow!("short chunk"))?;
        out.push_str(chunk);
        s = rest.get(n + 2..).unwrap_or("");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked() {
        let (s, b) =
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").expect("plain");
        assert_eq!((s, b.as_str()), (200, "{}"));
        let (s, b) = parse_response(b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            .expect("chunked");
        assert_eq!((s, b.as_str()), (404, "abcde"));
        assert!(parse_response(b"garbage").is_err());
    }
}
