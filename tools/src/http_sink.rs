//! A minimal HTTP/1.1 receiver for the benches on 127.0.0.1: keep-alive connections,
//! `Content-Length` bodies (what an OTLP exporter and Kiln's webhook sender send), each body
//! handed to a callback the moment it is read, before the fixed answer is written. Nothing is
//! routed or decoded: a bench's receiver must cost as little as possible, and the same for
//! Kiln's requests and the floor's.

use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Serves until the process ends; returns `http://127.0.0.1:<port>`. `answer` is the whole
/// response written after each request (status line, headers, blank line).
pub async fn serve(answer: &'static [u8], on_body: impl Fn(&[u8]) + Send + Sync + 'static) -> Result<String, String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let base = format!("http://{}", listener.local_addr().map_err(|e| e.to_string())?);
    let on_body = Arc::new(on_body);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let on_body = on_body.clone();
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut read = BufReader::new(read);
                loop {
                    let Some(length) = content_length(&mut read).await else { return };
                    let mut body = vec![0; length];
                    if read.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    on_body(&body);
                    if write.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(base)
}

/// Reads a request's head to its blank line: its `Content-Length` (0 without one); `None` once
/// the connection ends.
async fn content_length(read: &mut (impl AsyncBufReadExt + Unpin)) -> Option<usize> {
    let (mut length, mut line) = (0usize, String::new());
    loop {
        line.clear();
        match read.read_line(&mut line).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        if line == "\r\n" {
            return Some(length);
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
}
