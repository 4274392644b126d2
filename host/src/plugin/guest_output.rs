//! A plugin's stdout and stderr. What a call writes is kept until the call returns, then
//! written line by line as the plugin's log lines (`stdout: ...` at info, `stderr: ...` at
//! warn) under the same log budget as `host.log`, so `print` debugging and a guest's panic
//! message reach the run, `plugin call` and the host's log. The bytes are bounded before
//! they arrive ([`super::wasi_io`] charges every write against the per-call stdio budget),
//! and a buffer drops whatever would still exceed its capacity.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi_io::bytes::Bytes;
use wasmtime_wasi_io::poll::Pollable;
use wasmtime_wasi_io::streams::{OutputStream, StreamResult};

use super::wasi_io::MAX_STREAM_OP_BYTES;

/// One of a store's two output streams; clones share the buffer.
#[derive(Clone)]
pub(crate) struct GuestOutput {
    buffer: Arc<Mutex<Vec<u8>>>,
    capacity: usize,
}

impl GuestOutput {
    pub(crate) fn new(capacity: u64) -> Self {
        Self {
            buffer: Arc::default(),
            capacity: usize::try_from(capacity).unwrap_or(usize::MAX),
        }
    }

    /// The lines written since the last take (an unfinished last line too: a call's output
    /// ends with its call), without blank ones.
    pub(crate) fn take_lines(&self) -> Vec<String> {
        let bytes = std::mem::take(&mut *crate::sync::lock(&self.buffer));
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(str::to_string)
            .collect()
    }

    fn append(&self, bytes: &[u8]) {
        let mut buffer = crate::sync::lock(&self.buffer);
        let room = self.capacity.saturating_sub(buffer.len());
        buffer.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always ready: what exceeds the budget is refused by the caller or dropped here.
        Ok(MAX_STREAM_OP_BYTES as usize)
    }
}

#[wasmtime_wasi_io::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_taken_once_and_the_capacity_holds() {
        let mut out = GuestOutput::new(16);
        out.write(Bytes::from_static(b"first\n\nsec")).unwrap();
        out.write(Bytes::from_static(b"ond\nthird line is cut"))
            .unwrap();
        assert_eq!(out.take_lines(), ["first", "second", "th"]);
        assert!(out.take_lines().is_empty(), "taken lines are gone");
        out.write(Bytes::from_static(b"again\n")).unwrap();
        assert_eq!(out.take_lines(), ["again"], "the capacity is per take");
    }
}
